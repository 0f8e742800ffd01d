//! Allocation and free hooks: the enforcement seam.
//!
//! On a capped device an allocation is charged to the [`Budget`](crate::policy::budget::Budget) *before*
//! the driver is called (refused with `CUDA_ERROR_OUT_OF_MEMORY` without calling it when it does
//! not fit), given back if the driver fails, and recorded by pointer/handle on success. A free
//! removes the record first (so an address the driver reuses at once cannot be confused with
//! it), calls the driver, and credits the bytes on success — or restores the record on failure.
//! Frees of pointers we never saw pass through untouched. Uncapped devices pass through.
//!
//! What is charged: the size the driver reserves, approximated. Linear, managed, stream-ordered
//! allocations and arrays: [`linear_reserved`] of the requested size (512 B rounding, whole 2 MiB
//! pages from 1 MiB); pitched allocations: `linear_reserved(pitch × height)`; arrays: an
//! element-size estimate, then the same rounding; `cuMemCreate`: the size rounded up to
//! `cuMemGetAllocationGranularity(MINIMUM)` (the driver rejects other sizes anyway).
//! `cuMemAllocAsync`/`FromPoolAsync` are charged to the current context's device.
//!
//! Context overhead is charged in [`crate::hooks::context`], graph memory nodes (including
//! stream-ordered allocations made during stream capture) in [`crate::hooks::graph`]. With a
//! single visible device the allocation hooks do not ask the driver for the current context's
//! device ([`alloc_device`]).

use crate::driver::ffi::*;
use crate::driver::real::{Lib, unavailable};
use crate::driver::table::real;
use crate::hooks::graph;
use crate::infra::log::{DEBUG, ERROR, log_at, log_refusal};
use crate::policy::budget::{
    ARRAYS, AllocTable, Budget, Charge, DEVICE_PTRS, VMM_HANDLES, linear_reserved, shared as budget,
};
use crate::policy::devices;
use crate::policy::devices::current_device;
use crate::policy::state;
use std::ffi::c_uint;
use std::sync::atomic::Ordering;
use vgpu_region::MemoryKind;

/// The device an allocation in the current context lands on: with a single visible device that
/// one, without asking the driver (if no context is current the driver refuses the allocation and
/// the charge is given back — only the error may then be OOM instead of `INVALID_CONTEXT` when
/// the cap is also full); otherwise the current context's device (`cuCtxGetDevice`).
#[inline(always)]
fn alloc_device() -> Option<usize> {
    devices::only_device().or_else(current_device)
}

/// Charges `bytes` on `dev`, runs `call` (which returns the driver's result and the new key),
/// and records the key. `undo` frees a successful allocation that cannot be recorded. `bytes` is
/// computed only on a capped device (the uncapped path is the flag, two loads and the call).
#[inline(always)]
fn tracked_alloc<const N: usize, const TAGGED: bool, const COUNTED: bool>(
    table: &AllocTable<N, TAGGED, COUNTED>,
    dev: impl FnOnce() -> Option<usize>,
    bytes: impl FnOnce() -> u64,
    call: impl FnOnce() -> (CUresult, u64),
    undo: impl FnOnce(u64),
) -> CUresult {
    state::ensure();
    let b = budget();
    // Within the process's grant on the device (only ever taken on a capped one): charged without
    // reading the limits or summing the container; otherwise the full admission. `None`: the device
    // is not capped (one call site for that, so the uncapped path stays the flag and the call).
    let charged = if b.any_limit()
        && let Some(dev) = dev()
    {
        let bytes = bytes();
        if b.try_charge_leased(dev, bytes) {
            Some((dev, bytes))
        } else if let Some(limit) = b.limit(dev) {
            if let Err(over) = b.charge_checked(dev, MemoryKind::Data, bytes, limit) {
                log_refusal!(
                    "Device {dev} OOM: {} + {bytes} bytes requested exceeds the limit of {} bytes",
                    over.usage,
                    over.limit
                );
                return CUDA_ERROR_OUT_OF_MEMORY;
            }
            Some((dev, bytes))
        } else {
            None
        }
    } else {
        None
    };
    let Some((dev, bytes)) = charged else {
        return call().0;
    };
    let (rc, key) = call();
    if rc != CUDA_SUCCESS {
        b.credit(dev, bytes);
        return rc;
    }
    let charge = Charge {
        dev: dev as u32,
        bytes,
    };
    if !table.insert(key, charge) {
        return unrecorded(dev, key, bytes, undo);
    }
    log_at!(DEBUG, "device {dev}: +{bytes} bytes at {key:#x}");
    CUDA_SUCCESS
}

/// [`tracked_alloc`] when the allocation table cannot grow: the allocation is freed and refused.
#[cold]
#[inline(never)]
fn unrecorded(dev: usize, key: u64, bytes: u64, undo: impl FnOnce(u64)) -> CUresult {
    undo(key);
    budget().credit(dev, bytes);
    crate::policy::budget::count_refusal();
    log_at!(
        ERROR,
        "cannot record the allocation (no memory to grow the allocation table); refusing {bytes} bytes on device {dev}"
    );
    CUDA_ERROR_OUT_OF_MEMORY
}

/// Un-records `key`, runs the driver's free, and credits the charge if it succeeded. A key the
/// table does not know is passed through — for device pointers (`graph_memory`) after checking
/// whether it is graph memory that outlived its launch.
#[inline(always)]
pub(crate) fn tracked_free<const N: usize, const TAGGED: bool, const COUNTED: bool>(
    table: &AllocTable<N, TAGGED, COUNTED>,
    key: u64,
    graph_memory: bool,
    call: impl FnOnce() -> CUresult,
) -> CUresult {
    if !budget().any_limit() {
        return call(); // nothing is ever recorded without a cap
    }
    let Some(charge) = table.remove(key) else {
        log_at!(DEBUG, "free of untracked {key:#x}: passed through");
        if graph_memory {
            return graph::free_escaped(key, call);
        }
        return call();
    };
    let rc = call();
    log_at!(
        DEBUG,
        "device {}: -{} bytes at {key:#x} (driver rc {rc})",
        charge.dev,
        charge.bytes
    );
    if rc == CUDA_SUCCESS {
        budget().credit(charge.dev as usize, charge.bytes);
    } else {
        table.insert(key, charge);
    }
    rc
}

/// Driver out-values widened to `u64` (`usize` has no `Into<u64>`).
trait AsU64: Copy {
    fn as_u64(self) -> u64;
}
impl AsU64 for u32 {
    fn as_u64(self) -> u64 {
        self.into()
    }
}
impl AsU64 for u64 {
    fn as_u64(self) -> u64 {
        self
    }
}
impl AsU64 for usize {
    fn as_u64(self) -> u64 {
        self as u64
    }
}

/// Reads `*p` if the call succeeded and `p` is non-null.
///
/// # Safety
/// `p` must be null or valid for reads.
unsafe fn out<T: AsU64>(rc: CUresult, p: *const T) -> u64 {
    if rc == CUDA_SUCCESS && !p.is_null() {
        // SAFETY: non-null, and the driver just wrote it (caller contract).
        unsafe { *p }.as_u64()
    } else {
        0
    }
}

fn free_device_ptr(ptr: u64) {
    if let Some(free) = real::cuMemFree_v2() {
        // SAFETY: `ptr` was just returned by the driver's allocator.
        unsafe { free(ptr) };
    }
}

#[inline(always)] // into its export: the hot path
pub(crate) unsafe fn mem_alloc(dptr: *mut CUdeviceptr, bytesize: usize) -> CUresult {
    let Some(real) = real::cuMemAlloc_v2() else {
        return unavailable(Lib::Cuda);
    };
    tracked_alloc(
        &DEVICE_PTRS,
        alloc_device,
        || linear_reserved(bytesize as u64),
        || {
            // SAFETY: the caller's arguments, forwarded.
            let mut rc = unsafe { real(dptr, bytesize) };
            if rc == CUDA_ERROR_OUT_OF_MEMORY && state::OVERSUBSCRIBE.load(Ordering::Relaxed) {
                rc = managed_fallback(dptr, bytesize);
            }
            // SAFETY: `dptr` is the caller's out-pointer.
            (rc, unsafe { out(rc, dptr) })
        },
        free_device_ptr,
    )
}

/// `CUDA_OVERSUBSCRIBE=true`: the cap allowed `bytesize` but the device cannot hold it, so it is
/// allocated as managed memory (`CU_MEM_ATTACH_GLOBAL`), which the driver may page out to host
/// memory. The charge taken for the linear allocation stands (it is counted like any other), and
/// `cuMemFree` frees managed memory, so the record and the credit on free are unchanged.
fn managed_fallback(dptr: *mut CUdeviceptr, bytesize: usize) -> CUresult {
    let Some(managed) = real::cuMemAllocManaged() else {
        return CUDA_ERROR_OUT_OF_MEMORY;
    };
    // SAFETY: the caller's out-pointer and size, as for cuMemAlloc_v2.
    let rc = unsafe { managed(dptr, bytesize, CU_MEM_ATTACH_GLOBAL) };
    log_at!(
        DEBUG,
        "cuMemAlloc_v2({bytesize}) out of device memory: managed fallback rc {rc}"
    );
    rc
}

pub(crate) unsafe fn mem_alloc_v1(dptr: *mut CUdeviceptrV1, bytesize: c_uint) -> CUresult {
    let Some(real) = real::cuMemAlloc() else {
        return unavailable(Lib::Cuda);
    };
    tracked_alloc(
        &DEVICE_PTRS,
        alloc_device,
        || linear_reserved(u64::from(bytesize)),
        || {
            // SAFETY: the caller's arguments, forwarded.
            let rc = unsafe { real(dptr, bytesize) };
            // SAFETY: `dptr` is the caller's out-pointer.
            (rc, unsafe { out(rc, dptr) })
        },
        free_device_ptr,
    )
}

#[inline(always)] // into its export: the hot path
pub(crate) unsafe fn mem_free(dptr: CUdeviceptr) -> CUresult {
    let Some(real) = real::cuMemFree_v2() else {
        return unavailable(Lib::Cuda);
    };
    // SAFETY: the caller's argument, forwarded.
    tracked_free(&DEVICE_PTRS, dptr, true, || unsafe { real(dptr) })
}

pub(crate) unsafe fn mem_free_v1(dptr: CUdeviceptrV1) -> CUresult {
    let Some(real) = real::cuMemFree() else {
        return unavailable(Lib::Cuda);
    };
    // SAFETY: the caller's argument, forwarded.
    tracked_free(&DEVICE_PTRS, u64::from(dptr), true, || unsafe {
        real(dptr)
    })
}

/// Pitched allocations: charge `width × height` up front (a lower bound), call the driver, then top
/// up to the driver's `pitch × height` **before** the record is made, which holds the full size from
/// the start; if the top-up does not fit, free and refuse. (The record used to be made with the
/// lower bound and replaced afterwards: a free of the pointer by another thread in between, and a
/// new allocation at the same address, left that allocation's record with this one's size.)
/// Without any cap the device is not looked up (as in [`tracked_alloc`]).
fn pitched(width: u64, height: u64, call: impl FnOnce() -> (CUresult, u64, u64)) -> CUresult {
    state::ensure();
    let b = budget();
    let dev = if b.any_limit() {
        alloc_device().filter(|&d| b.limit(d).is_some())
    } else {
        None
    };
    let Some(dev) = dev else {
        return call().0;
    };
    let lower = width.saturating_mul(height);
    if let Err(over) = b.try_charge_kind(dev, MemoryKind::Data, lower) {
        log_refusal!(
            "Device {dev} OOM: {} + {lower} bytes requested exceeds the limit of {} bytes",
            over.usage,
            over.limit
        );
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    let (rc, ptr, pitch) = call();
    if rc != CUDA_SUCCESS {
        b.credit(dev, lower);
        return rc;
    }
    let full = linear_reserved(pitch.max(width).saturating_mul(height)).max(lower);
    if full > lower && b.try_charge(dev, full - lower).is_err() {
        free_device_ptr(ptr);
        b.credit(dev, lower);
        log_refusal!(
            "Device {dev} OOM: pitched allocation needs {} more bytes",
            full - lower
        );
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    let charge = Charge {
        dev: dev as u32,
        bytes: full,
    };
    if !DEVICE_PTRS.insert(ptr, charge) {
        return unrecorded(dev, ptr, full, free_device_ptr);
    }
    log_at!(DEBUG, "device {dev}: +{full} bytes at {ptr:#x} (pitched)");
    CUDA_SUCCESS
}

pub(crate) unsafe fn mem_alloc_pitch(
    dptr: *mut CUdeviceptr,
    pitch: *mut usize,
    width: usize,
    height: usize,
    elem: c_uint,
) -> CUresult {
    let Some(real) = real::cuMemAllocPitch_v2() else {
        return unavailable(Lib::Cuda);
    };
    pitched(width as u64, height as u64, || {
        // SAFETY: the caller's arguments, forwarded.
        let rc = unsafe { real(dptr, pitch, width, height, elem) };
        // SAFETY: the caller's out-pointers.
        (rc, unsafe { out(rc, dptr) }, unsafe {
            out(rc, pitch.cast_const())
        })
    })
}

pub(crate) unsafe fn mem_alloc_pitch_v1(
    dptr: *mut CUdeviceptrV1,
    pitch: *mut c_uint,
    width: c_uint,
    height: c_uint,
    elem: c_uint,
) -> CUresult {
    let Some(real) = real::cuMemAllocPitch() else {
        return unavailable(Lib::Cuda);
    };
    pitched(u64::from(width), u64::from(height), || {
        // SAFETY: the caller's arguments, forwarded.
        let rc = unsafe { real(dptr, pitch, width, height, elem) };
        // SAFETY: the caller's out-pointers.
        (rc, unsafe { out(rc, dptr) }, unsafe {
            out(rc, pitch.cast_const())
        })
    })
}

pub(crate) unsafe fn mem_alloc_managed(
    dptr: *mut CUdeviceptr,
    bytesize: usize,
    flags: c_uint,
) -> CUresult {
    let Some(real) = real::cuMemAllocManaged() else {
        return unavailable(Lib::Cuda);
    };
    tracked_alloc(
        &DEVICE_PTRS,
        alloc_device,
        || linear_reserved(bytesize as u64),
        || {
            // SAFETY: the caller's arguments, forwarded.
            let rc = unsafe { real(dptr, bytesize, flags) };
            // SAFETY: the caller's out-pointer.
            (rc, unsafe { out(rc, dptr) })
        },
        free_device_ptr,
    )
}

type AllocAsyncFn = unsafe extern "C" fn(*mut CUdeviceptr, usize, Handle) -> CUresult;
type FreeAsyncFn = unsafe extern "C" fn(CUdeviceptr, Handle) -> CUresult;
type AllocPoolFn = unsafe extern "C" fn(*mut CUdeviceptr, usize, Handle, Handle) -> CUresult;

/// A stream-ordered allocation on a capturing stream is an allocation node of the graph being
/// captured (see [`graph`]): `Some(result)` when it was handled so.
fn captured(
    stream: Handle,
    per_thread: bool,
    dptr: *mut CUdeviceptr,
    bytesize: usize,
    call: impl FnOnce() -> CUresult,
) -> Result<CUresult, impl FnOnce() -> CUresult> {
    state::ensure();
    if !budget().any_limit() || !graph::capturing(stream, per_thread) {
        return Err(call);
    }
    let Some(dev) = graph::capped_current_device() else {
        return Err(call);
    };
    Ok(graph::captured_alloc(dev, stream, bytesize as u64, || {
        let rc = call();
        // SAFETY: the caller's out-pointer.
        (rc, unsafe { out(rc, dptr) })
    }))
}

/// A stream-ordered allocation (`cuMemAllocAsync`, `cuMemAllocFromPoolAsync`): a graph node when
/// `stream` is capturing, otherwise charged like any linear allocation; `call` is the driver's
/// allocation, `free` the matching `cuMemFreeAsync` (to undo one that cannot be recorded).
fn stream_ordered(
    free: Option<FreeAsyncFn>,
    per_thread: bool,
    dptr: *mut CUdeviceptr,
    bytesize: usize,
    stream: Handle,
    call: impl FnOnce() -> CUresult,
) -> CUresult {
    let call = match captured(stream, per_thread, dptr, bytesize, call) {
        Ok(rc) => return rc,
        Err(call) => call,
    };
    tracked_alloc(
        &DEVICE_PTRS,
        alloc_device,
        || linear_reserved(bytesize as u64),
        || {
            let rc = call();
            // SAFETY: the caller's out-pointer.
            (rc, unsafe { out(rc, dptr) })
        },
        |p| {
            if let Some(free) = free {
                // SAFETY: `p` was just allocated on `stream`.
                unsafe { free(p, stream) };
            }
        },
    )
}

fn alloc_async(
    real: Option<AllocAsyncFn>,
    free: Option<FreeAsyncFn>,
    per_thread: bool,
    dptr: *mut CUdeviceptr,
    bytesize: usize,
    stream: Handle,
) -> CUresult {
    let Some(real) = real else {
        return unavailable(Lib::Cuda);
    };
    // SAFETY: the caller's arguments, forwarded.
    stream_ordered(free, per_thread, dptr, bytesize, stream, move || unsafe {
        real(dptr, bytesize, stream)
    })
}

fn free_async(
    real: Option<FreeAsyncFn>,
    per_thread: bool,
    dptr: CUdeviceptr,
    stream: Handle,
) -> CUresult {
    let Some(real) = real else {
        return unavailable(Lib::Cuda);
    };
    // SAFETY: the caller's arguments, forwarded.
    let call = || unsafe { real(dptr, stream) };
    if graph::is_graph_alloc(dptr) && graph::capturing(stream, per_thread) {
        return graph::captured_free(dptr, call);
    }
    tracked_free(&DEVICE_PTRS, dptr, true, call)
}

fn alloc_from_pool(
    real: Option<AllocPoolFn>,
    free: Option<FreeAsyncFn>,
    per_thread: bool,
    dptr: *mut CUdeviceptr,
    bytesize: usize,
    pool: Handle,
    stream: Handle,
) -> CUresult {
    let Some(real) = real else {
        return unavailable(Lib::Cuda);
    };
    // SAFETY: the caller's arguments, forwarded.
    stream_ordered(free, per_thread, dptr, bytesize, stream, move || unsafe {
        real(dptr, bytesize, pool, stream)
    })
}

pub(crate) unsafe fn mem_alloc_async(d: *mut CUdeviceptr, n: usize, s: Handle) -> CUresult {
    alloc_async(
        real::cuMemAllocAsync(),
        real::cuMemFreeAsync(),
        false,
        d,
        n,
        s,
    )
}
pub(crate) unsafe fn mem_alloc_async_ptsz(d: *mut CUdeviceptr, n: usize, s: Handle) -> CUresult {
    alloc_async(
        real::cuMemAllocAsync_ptsz(),
        real::cuMemFreeAsync_ptsz(),
        true,
        d,
        n,
        s,
    )
}
pub(crate) unsafe fn mem_free_async(d: CUdeviceptr, s: Handle) -> CUresult {
    free_async(real::cuMemFreeAsync(), false, d, s)
}
pub(crate) unsafe fn mem_free_async_ptsz(d: CUdeviceptr, s: Handle) -> CUresult {
    free_async(real::cuMemFreeAsync_ptsz(), true, d, s)
}
pub(crate) unsafe fn mem_alloc_from_pool(
    d: *mut CUdeviceptr,
    n: usize,
    pool: Handle,
    s: Handle,
) -> CUresult {
    alloc_from_pool(
        real::cuMemAllocFromPoolAsync(),
        real::cuMemFreeAsync(),
        false,
        d,
        n,
        pool,
        s,
    )
}
pub(crate) unsafe fn mem_alloc_from_pool_ptsz(
    d: *mut CUdeviceptr,
    n: usize,
    pool: Handle,
    s: Handle,
) -> CUresult {
    alloc_from_pool(
        real::cuMemAllocFromPoolAsync_ptsz(),
        real::cuMemFreeAsync_ptsz(),
        true,
        d,
        n,
        pool,
        s,
    )
}

/// `cuMemCreate`: only device-located physical memory is charged, to `prop->location.id`
/// (host/NUMA locations pass through — HAMi-core#187).
pub(crate) unsafe fn mem_create(
    handle: *mut CUmemGenericAllocationHandle,
    size: usize,
    prop: *const CUmemAllocationPropHead,
    flags: u64,
) -> CUresult {
    let Some(real) = real::cuMemCreate() else {
        return unavailable(Lib::Cuda);
    };
    let location = if prop.is_null() {
        None
    } else {
        // SAFETY: non-null `prop` points to the caller's CUmemAllocationProp, which starts with
        // the fields of `CUmemAllocationPropHead`.
        let head = unsafe { *prop };
        (head.location_type == CU_MEM_LOCATION_TYPE_DEVICE).then_some(head.location_id)
    };
    let call = || {
        // SAFETY: the caller's arguments, forwarded.
        let rc = unsafe { real(handle, size, prop, flags) };
        // SAFETY: the caller's out-pointer.
        (rc, unsafe { out(rc, handle) })
    };
    let Some(ordinal) = location else {
        return call().0;
    };
    let granularity = real::cuMemGetAllocationGranularity().map_or(0, |f| {
        let mut g: usize = 0;
        // SAFETY: valid out-pointer; `prop` is the caller's, non-null here.
        let rc = unsafe { f(&mut g, prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM) };
        if rc == CUDA_SUCCESS { g as u64 } else { 0 }
    });
    let bytes = if granularity > 1 {
        (size as u64)
            .div_ceil(granularity)
            .saturating_mul(granularity)
    } else {
        size as u64
    };
    tracked_alloc(
        &VMM_HANDLES,
        || devices::container_index(ordinal),
        || bytes,
        call,
        |h| {
            if let Some(release) = real::cuMemRelease() {
                // SAFETY: `h` was just created.
                unsafe { release(h) };
            }
        },
    )
}

/// Estimated bytes of a `w × h × d` array of `channels` elements of `format`.
fn array_bytes(w: u64, h: u64, d: u64, format: std::ffi::c_int, channels: c_uint) -> u64 {
    let elem = array_format_bytes(format).unwrap_or(4) * u64::from(channels.max(1));
    w.max(1)
        .saturating_mul(h.max(1))
        .saturating_mul(d.max(1))
        .saturating_mul(elem)
}

fn array_alloc(
    array: *mut Handle,
    bytes: u64,
    call: impl FnOnce() -> CUresult,
    destroy: fn(Handle),
) -> CUresult {
    tracked_alloc(
        &ARRAYS,
        alloc_device,
        || linear_reserved(bytes),
        || {
            let rc = call();
            let key = if rc == CUDA_SUCCESS && !array.is_null() {
                // SAFETY: the driver wrote the caller's out-pointer.
                unsafe { *array as u64 }
            } else {
                0
            };
            (rc, key)
        },
        |h| destroy(h as Handle),
    )
}

fn destroy_array(h: Handle) {
    if let Some(f) = real::cuArrayDestroy() {
        // SAFETY: `h` was just created.
        unsafe { f(h) };
    }
}

fn destroy_mipmapped(h: Handle) {
    if let Some(f) = real::cuMipmappedArrayDestroy() {
        // SAFETY: `h` was just created.
        unsafe { f(h) };
    }
}

pub(crate) unsafe fn array_create(array: *mut Handle, desc: *const ArrayDescriptor) -> CUresult {
    let Some(real) = real::cuArrayCreate_v2() else {
        return unavailable(Lib::Cuda);
    };
    // SAFETY: the caller's descriptor (checked for null).
    let bytes = unsafe { desc.as_ref() }.map_or(0, |d| {
        array_bytes(d.width as u64, d.height as u64, 1, d.format, d.num_channels)
    });
    // SAFETY: the caller's arguments, forwarded.
    array_alloc(array, bytes, || unsafe { real(array, desc) }, destroy_array)
}

pub(crate) unsafe fn array_create_v1(
    array: *mut Handle,
    desc: *const ArrayDescriptorV1,
) -> CUresult {
    let Some(real) = real::cuArrayCreate() else {
        return unavailable(Lib::Cuda);
    };
    // SAFETY: the caller's descriptor (checked for null).
    let bytes = unsafe { desc.as_ref() }.map_or(0, |d| {
        array_bytes(d.width.into(), d.height.into(), 1, d.format, d.num_channels)
    });
    // SAFETY: the caller's arguments, forwarded.
    array_alloc(array, bytes, || unsafe { real(array, desc) }, destroy_array)
}

pub(crate) unsafe fn array3d_create(
    array: *mut Handle,
    desc: *const Array3DDescriptor,
) -> CUresult {
    let Some(real) = real::cuArray3DCreate_v2() else {
        return unavailable(Lib::Cuda);
    };
    // SAFETY: the caller's descriptor (checked for null).
    let bytes = unsafe { desc.as_ref() }.map_or(0, |d| {
        array_bytes(
            d.width as u64,
            d.height as u64,
            d.depth as u64,
            d.format,
            d.num_channels,
        )
    });
    // SAFETY: the caller's arguments, forwarded.
    array_alloc(array, bytes, || unsafe { real(array, desc) }, destroy_array)
}

pub(crate) unsafe fn array3d_create_v1(
    array: *mut Handle,
    desc: *const Array3DDescriptorV1,
) -> CUresult {
    let Some(real) = real::cuArray3DCreate() else {
        return unavailable(Lib::Cuda);
    };
    // SAFETY: the caller's descriptor (checked for null).
    let bytes = unsafe { desc.as_ref() }.map_or(0, |d| {
        array_bytes(
            d.width.into(),
            d.height.into(),
            d.depth.into(),
            d.format,
            d.num_channels,
        )
    });
    // SAFETY: the caller's arguments, forwarded.
    array_alloc(array, bytes, || unsafe { real(array, desc) }, destroy_array)
}

pub(crate) unsafe fn array_destroy(array: Handle) -> CUresult {
    let Some(real) = real::cuArrayDestroy() else {
        return unavailable(Lib::Cuda);
    };
    // SAFETY: the caller's argument, forwarded.
    tracked_free(&ARRAYS, array as u64, false, || unsafe { real(array) })
}

/// Mipmapped arrays: the sum over `levels` of the halved extents.
pub(crate) unsafe fn mipmapped_create(
    array: *mut Handle,
    desc: *const Array3DDescriptor,
    levels: c_uint,
) -> CUresult {
    let Some(real) = real::cuMipmappedArrayCreate() else {
        return unavailable(Lib::Cuda);
    };
    // SAFETY: the caller's descriptor (checked for null).
    let bytes = unsafe { desc.as_ref() }.map_or(0, |d| {
        (0..levels.clamp(1, 64)).fold(0u64, |sum, l| {
            let level = |x: usize| ((x as u64) >> l).max(1);
            sum.saturating_add(array_bytes(
                level(d.width),
                if d.height == 0 { 1 } else { level(d.height) },
                if d.depth == 0 { 1 } else { level(d.depth) },
                d.format,
                d.num_channels,
            ))
        })
    });
    // SAFETY: the caller's arguments, forwarded.
    array_alloc(
        array,
        bytes,
        || unsafe { real(array, desc, levels) },
        destroy_mipmapped,
    )
}

pub(crate) unsafe fn mipmapped_destroy(array: Handle) -> CUresult {
    let Some(real) = real::cuMipmappedArrayDestroy() else {
        return unavailable(Lib::Cuda);
    };
    // SAFETY: the caller's argument, forwarded.
    tracked_free(&ARRAYS, array as u64, false, || unsafe { real(array) })
}
