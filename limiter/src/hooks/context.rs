//! Context creation overhead, charged against the cap (the region's `context_size`, as HAMi-core
//! does for primary contexts), so a container cannot exceed its cap by creating contexts, and
//! `cuMemGetInfo`/NVML show it as used.
//!
//! What is charged: every context this process creates on a capped device — `cuCtxCreate*`
//! contexts by handle (credited by `cuCtxDestroy*`), and the primary context of each device from
//! the `cuDevicePrimaryCtxRetain` that creates it to the `Release` that drops the last reference
//! (or `Reset`), mirroring the driver's reference count.
//!
//! How big a context is — **measured** (decision): the driver does not say, and the size depends
//! on the GPU, the driver version and lazy loading (hundreds of MiB on data-centre GPUs). The
//! first context this process creates on a device is created with NVML's device `used` memory read
//! just before and just after (`nvmlDeviceGetMemoryInfo` works without a context, unlike
//! `cuMemGetInfo`); the difference, minus what the container's other processes charged in the
//! meantime (the shared region's usage before and after), and at most the smallest context another
//! process of the container already holds (same driver, same GPU), is the context's size. It is
//! remembered per device for the process's later contexts, which are then charged *before* the
//! driver is called (refused with `CUDA_ERROR_OUT_OF_MEMORY` without calling it). The first one is
//! charged just after: if it does not fit, the new context is destroyed again and the call
//! refused. First measurements are serialised across the container's processes (the region's
//! lock, waited for at most 1 s: a process stuck in its driver call delays the others' first
//! contexts by that much, after which they measure unserialised), so one never counts another's
//! context. Limits: other containers allocating or freeing on a shared GPU during the creation
//! skew the first measurement either way (later processes of the container take the smallest
//! seen), as do allocations of this container in flight between their charge and the driver
//! call; a result of 0 or more than [`MAX_PLAUSIBLE`] is not trusted: the smallest context the container's other processes hold is
//! charged instead or, when there is none (or no NVML), [`FALLBACK_CONTEXT_BYTES`], and the size is
//! measured again next time. HAMi-core
//! instead reads its process's NVML per-process usage once at start-up, which needs the host PID,
//! and charges only primary contexts.
//!
//! Destroying a context frees what was allocated in it: the allocation tables remember each
//! allocation's context ([`crate::policy::budget::context_destroyed`], `primary_context_gone`), so
//! `cuCtxDestroy*` and the primary context's last release or reset credit them too.

use crate::driver::ffi::*;
use crate::driver::real::{Lib, unavailable};
use crate::driver::table::real;
use crate::infra::config::MAX_DEVICES;
use crate::infra::fork::ChildReset;
use crate::infra::log::{DEBUG, ERROR, log_at, log_refusal};
use crate::infra::sync::{SpinGuard, SpinLock};
use crate::policy::budget::{CONTEXTS, Charge, budget};
use crate::policy::devices;
use crate::policy::state;
use std::ffi::{c_int, c_uint, c_void};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use vgpu_region::MemoryKind;

/// Charged when the size cannot be measured (no NVML): a typical CUDA 12 context on a
/// data-centre GPU with lazy loading.
pub(crate) const FALLBACK_CONTEXT_BYTES: u64 = 300 << 20;
/// Larger measured differences are taken for other processes' activity, not the context.
pub(crate) const MAX_PLAUSIBLE: u64 = 4 << 30;
/// How long a first context's measurement waits for another process of the container measuring
/// its own (a context takes a few hundred ms to create on real GPUs; a holder stuck in the driver
/// — a fork child of a CUDA process, say — must not hold the others for long).
const MEASURE_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Measured context size per container device (0 = not measured yet).
static MEASURED: [AtomicU64; MAX_DEVICES] = [const { AtomicU64::new(0) }; MAX_DEVICES];
/// The driver's primary-context reference count as this process drove it, per device.
static PRIMARY_REFS: [AtomicU32; MAX_DEVICES] = [const { AtomicU32::new(0) }; MAX_DEVICES];
/// What the live primary context of each device was charged.
static PRIMARY_CHARGE: [AtomicU64; MAX_DEVICES] = [const { AtomicU64::new(0) }; MAX_DEVICES];
/// Serialises context creation/destruction on capped devices (rare calls), so a measurement is
/// not confused by this process's other contexts and the primary reference count stays exact.
/// A [`SpinLock`] (not a `Mutex`): a fork child takes it over from a holder that does not exist
/// there, and the fork handler releases it too.
static LOCK: SpinLock = SpinLock::new();

/// Held [`LOCK`]; `None` inside when this thread already held it (cannot happen through the
/// exports, which forward re-entered calls to the driver: see `crate::infra::guard`), so that an inner
/// use never releases the outer one's lock.
struct Locked(#[allow(dead_code)] Option<SpinGuard<'static>>);

/// Every change to this module's state happens under [`LOCK`], so taking it is where the fork
/// reset registers.
fn lock() -> Locked {
    RESET.register();
    Locked(LOCK.lock().ok())
}

/// Fork child: the child has no contexts (the driver does not survive `fork`). Atomics only.
static RESET: ChildReset = ChildReset::new(|| {
    for (r, c) in PRIMARY_REFS.iter().zip(&PRIMARY_CHARGE) {
        r.store(0, Ordering::Relaxed);
        c.store(0, Ordering::Relaxed);
    }
    LOCK.force_unlock();
});

/// The capped container device behind CUDA ordinal `ordinal`, if any.
fn capped_device(ordinal: CUdevice) -> Option<usize> {
    state::ensure();
    let b = budget();
    if !b.any_limit() {
        return None;
    }
    devices::container_index(ordinal).filter(|&d| b.limit(d).is_some())
}

/// NVML's `used` bytes of container device `dev` (its NVML index).
fn nvml_used(dev: usize) -> Option<u64> {
    let init = real::nvmlInit_v2()?;
    let by_index = real::nvmlDeviceGetHandleByIndex_v2()?;
    let info = real::nvmlDeviceGetMemoryInfo()?;
    // SAFETY: no arguments; NVML reference-counts initialisation (this one is never undone, so
    // the handles stay valid).
    if unsafe { init() } != NVML_SUCCESS {
        return None;
    }
    let mut handle: Handle = std::ptr::null_mut();
    // SAFETY: valid out-pointer.
    if unsafe { by_index(c_uint::try_from(dev).ok()?, &mut handle) } != NVML_SUCCESS {
        return None;
    }
    let mut m = NvmlMemory {
        total: 0,
        free: 0,
        used: 0,
    };
    // SAFETY: `handle` came from NVML, `m` is a valid out-pointer.
    (unsafe { info(handle, &mut m) } == NVML_SUCCESS).then_some(m.used)
}

/// The size to charge for a context measured as NVML `used` going `before`→`after` while the
/// container's charged bytes (other processes' allocations, all charged before they reach the
/// driver) grew by `container_grew`; `None` when not trustworthy. `known` is the smallest
/// context another process of the container already holds, which caps the result (those
/// processes run the same driver on the same GPU).
pub(crate) fn measured_size(
    before: Option<u64>,
    after: Option<u64>,
    container_grew: i128,
    known: Option<u64>,
) -> Option<u64> {
    let grown = i128::from(after?) - i128::from(before?) - container_grew;
    let grown = u64::try_from(grown).ok()?;
    let size = known.map_or(grown, |k| grown.min(k));
    (size > 0 && size <= MAX_PLAUSIBLE).then_some(size)
}

/// Creates a context (or the first reference of a primary one) on capped device `dev`: `call`
/// runs the driver, `undo` destroys what it made when the charge does not fit afterwards.
/// Returns the driver's result (or OOM) and the bytes charged.
fn charged_create(
    dev: usize,
    call: impl FnOnce() -> CUresult,
    undo: impl FnOnce(),
) -> (CUresult, u64) {
    let b = budget();
    let known = MEASURED[dev].load(Ordering::Acquire);
    if known != 0 {
        if let Err(over) = b.try_charge_kind(dev, MemoryKind::Context, known) {
            refuse(dev, over.usage, known, over.limit);
            return (CUDA_ERROR_OUT_OF_MEMORY, 0);
        }
        let rc = call();
        if rc != CUDA_SUCCESS {
            b.credit_kind(dev, MemoryKind::Context, known);
            return (rc, 0);
        }
        log_at!(DEBUG, "device {dev}: +{known} bytes of context");
        return (rc, known);
    }
    // One first-context measurement at a time in the container: two processes creating their
    // first contexts at once each saw the other's in NVML's `used` (not yet charged: a first
    // context is charged after it is made) and charged both (1 in 5 runs of two racing
    // processes). Under the region's lock, the second measures after the first has charged, and
    // the first's charge bounds it. The process registers first (its slot and its devices'
    // UUIDs, which take the same lock, not reentrant); the lock is not waited for longer than
    // [`MEASURE_LOCK_WAIT`] (a holder stopped mid-creation), after which the measurement runs
    // unserialised, as before.
    let _serial =
        crate::policy::budget::registered_region().and_then(|r| r.lock(MEASURE_LOCK_WAIT).ok());
    let region_before = b.usage(dev);
    let before = nvml_used(dev);
    let rc = call();
    if rc != CUDA_SUCCESS {
        return (rc, 0);
    }
    let after = nvml_used(dev);
    let container_grew = i128::from(b.usage(dev)) - i128::from(region_before);
    let known = b.context_estimate(dev);
    let bytes = match measured_size(before, after, container_grew, known) {
        Some(size) => {
            MEASURED[dev].store(size, Ordering::Release);
            size
        }
        // Untrustworthy (something was freed meanwhile, or no NVML): what the container's other
        // processes hold per context, else the fallback; measured again next time.
        None => known.unwrap_or(FALLBACK_CONTEXT_BYTES),
    };
    if let Err(over) = b.try_charge_kind(dev, MemoryKind::Context, bytes) {
        undo();
        refuse(dev, over.usage, bytes, over.limit);
        return (CUDA_ERROR_OUT_OF_MEMORY, 0);
    }
    log_at!(DEBUG, "device {dev}: +{bytes} bytes of context (measured)");
    (rc, bytes)
}

fn refuse(dev: usize, usage: u64, bytes: u64, limit: u64) {
    log_refusal!(
        "Device {dev} OOM: {usage} + {bytes} bytes of a new context exceeds the limit of {limit} bytes"
    );
}

/// `cuCtxCreate*`: the new context is current on success, so `*pctx` is its handle.
fn ctx_create(pctx: *mut Handle, ordinal: CUdevice, call: impl FnOnce() -> CUresult) -> CUresult {
    let Some(dev) = capped_device(ordinal) else {
        return call();
    };
    let _guard = lock();
    let handle = || {
        if pctx.is_null() {
            return 0;
        }
        // SAFETY: non-null; the driver wrote the caller's out-pointer (read on success only).
        unsafe { *pctx as u64 }
    };
    let (rc, bytes) = charged_create(dev, call, || destroy_raw(handle()));
    if rc == CUDA_SUCCESS && bytes > 0 {
        let charge = Charge {
            dev: dev as u32,
            bytes,
        };
        if !CONTEXTS.insert(handle(), charge) {
            destroy_raw(handle());
            budget().credit_kind(dev, MemoryKind::Context, bytes);
            log_at!(
                ERROR,
                "context table full; refusing a context on device {dev}"
            );
            return CUDA_ERROR_OUT_OF_MEMORY;
        }
    }
    rc
}

fn destroy_raw(ctx: u64) {
    if ctx == 0 {
        return;
    }
    if let Some(f) = real::cuCtxDestroy_v2() {
        // SAFETY: `ctx` was just created by the driver.
        unsafe { f(ctx as Handle) };
    }
}

pub(crate) unsafe fn ctx_create_v1(pctx: *mut Handle, flags: c_uint, dev: CUdevice) -> CUresult {
    let Some(real) = real::cuCtxCreate() else {
        return unavailable(Lib::Cuda);
    };
    // SAFETY: the caller's arguments, forwarded.
    ctx_create(pctx, dev, || unsafe { real(pctx, flags, dev) })
}

pub(crate) unsafe fn ctx_create_v2(pctx: *mut Handle, flags: c_uint, dev: CUdevice) -> CUresult {
    let Some(real) = real::cuCtxCreate_v2() else {
        return unavailable(Lib::Cuda);
    };
    // SAFETY: the caller's arguments, forwarded.
    ctx_create(pctx, dev, || unsafe { real(pctx, flags, dev) })
}

pub(crate) unsafe fn ctx_create_v3(
    pctx: *mut Handle,
    params: *mut c_void,
    num: c_int,
    flags: c_uint,
    dev: CUdevice,
) -> CUresult {
    let Some(real) = real::cuCtxCreate_v3() else {
        return unavailable(Lib::Cuda);
    };
    // SAFETY: the caller's arguments, forwarded.
    ctx_create(pctx, dev, || unsafe { real(pctx, params, num, flags, dev) })
}

pub(crate) unsafe fn ctx_create_v4(
    pctx: *mut Handle,
    params: *mut c_void,
    flags: c_uint,
    dev: CUdevice,
) -> CUresult {
    let Some(real) = real::cuCtxCreate_v4() else {
        return unavailable(Lib::Cuda);
    };
    // SAFETY: the caller's arguments, forwarded.
    ctx_create(pctx, dev, || unsafe { real(pctx, params, flags, dev) })
}

fn ctx_destroy(ctx: Handle, call: impl FnOnce() -> CUresult) -> CUresult {
    let key = ctx as u64;
    let Some(charge) = CONTEXTS.remove(key) else {
        return call();
    };
    let rc = call();
    if rc == CUDA_SUCCESS {
        crate::policy::budget::context_destroyed(key); // the driver freed what was allocated in it
        budget().credit_kind(charge.dev as usize, MemoryKind::Context, charge.bytes);
        log_at!(
            DEBUG,
            "device {}: -{} bytes of context",
            charge.dev,
            charge.bytes
        );
    } else {
        CONTEXTS.insert(key, charge);
    }
    rc
}

pub(crate) unsafe fn ctx_destroy_v1(ctx: Handle) -> CUresult {
    let Some(real) = real::cuCtxDestroy() else {
        return unavailable(Lib::Cuda);
    };
    // SAFETY: the caller's argument, forwarded.
    ctx_destroy(ctx, || unsafe { real(ctx) })
}

pub(crate) unsafe fn ctx_destroy_v2(ctx: Handle) -> CUresult {
    let Some(real) = real::cuCtxDestroy_v2() else {
        return unavailable(Lib::Cuda);
    };
    // SAFETY: the caller's argument, forwarded.
    ctx_destroy(ctx, || unsafe { real(ctx) })
}

pub(crate) unsafe fn primary_retain(pctx: *mut Handle, ordinal: CUdevice) -> CUresult {
    let Some(real) = real::cuDevicePrimaryCtxRetain() else {
        return unavailable(Lib::Cuda);
    };
    // SAFETY: the caller's arguments, forwarded.
    let call = || unsafe { real(pctx, ordinal) };
    let Some(dev) = capped_device(ordinal) else {
        return call();
    };
    let _guard = lock();
    if PRIMARY_REFS[dev].load(Ordering::Acquire) > 0 {
        let rc = call();
        if rc == CUDA_SUCCESS {
            PRIMARY_REFS[dev].fetch_add(1, Ordering::AcqRel);
        }
        return rc;
    }
    let undo = || {
        if let Some(release) = real::cuDevicePrimaryCtxRelease_v2() {
            // SAFETY: the reference was just taken.
            unsafe { release(ordinal) };
        }
    };
    let (rc, bytes) = charged_create(dev, call, undo);
    if rc == CUDA_SUCCESS {
        PRIMARY_REFS[dev].store(1, Ordering::Release);
        PRIMARY_CHARGE[dev].store(bytes, Ordering::Release);
    }
    rc
}

/// The primary context of `ordinal` lost references (`drop_all`: reset) in the driver.
fn primary_dropped(ordinal: CUdevice, drop_all: bool, call: impl FnOnce() -> CUresult) -> CUresult {
    let Some(dev) = capped_device(ordinal) else {
        return call();
    };
    let _guard = lock();
    let rc = call();
    let refs = PRIMARY_REFS[dev].load(Ordering::Acquire);
    if rc != CUDA_SUCCESS || refs == 0 {
        return rc;
    }
    let left = if drop_all { 0 } else { refs - 1 };
    PRIMARY_REFS[dev].store(left, Ordering::Release);
    if left == 0 {
        crate::policy::budget::primary_context_gone(dev); // the driver freed what was allocated in it
        let bytes = PRIMARY_CHARGE[dev].swap(0, Ordering::AcqRel);
        if bytes > 0 {
            budget().credit_kind(dev, MemoryKind::Context, bytes);
            log_at!(DEBUG, "device {dev}: -{bytes} bytes of primary context");
        }
    }
    rc
}

pub(crate) unsafe fn primary_release_v1(ordinal: CUdevice) -> CUresult {
    let Some(real) = real::cuDevicePrimaryCtxRelease() else {
        return unavailable(Lib::Cuda);
    };
    // SAFETY: the caller's argument, forwarded.
    primary_dropped(ordinal, false, || unsafe { real(ordinal) })
}

pub(crate) unsafe fn primary_release_v2(ordinal: CUdevice) -> CUresult {
    let Some(real) = real::cuDevicePrimaryCtxRelease_v2() else {
        return unavailable(Lib::Cuda);
    };
    // SAFETY: the caller's argument, forwarded.
    primary_dropped(ordinal, false, || unsafe { real(ordinal) })
}

pub(crate) unsafe fn primary_reset_v1(ordinal: CUdevice) -> CUresult {
    let Some(real) = real::cuDevicePrimaryCtxReset() else {
        return unavailable(Lib::Cuda);
    };
    // SAFETY: the caller's argument, forwarded.
    primary_dropped(ordinal, true, || unsafe { real(ordinal) })
}

pub(crate) unsafe fn primary_reset_v2(ordinal: CUdevice) -> CUresult {
    let Some(real) = real::cuDevicePrimaryCtxReset_v2() else {
        return unavailable(Lib::Cuda);
    };
    // SAFETY: the caller's argument, forwarded.
    primary_dropped(ordinal, true, || unsafe { real(ordinal) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plausible_growth_is_taken_as_the_context_size() {
        let m = |b, a| measured_size(b, a, 0, None);
        assert_eq!(m(Some(100), Some(100 + (300 << 20))), Some(300 << 20));
        assert_eq!(m(Some(100), Some(100)), None, "nothing grew");
        assert_eq!(m(Some(500), Some(100)), None, "something was freed");
        assert_eq!(m(None, Some(100)), None, "no NVML");
        assert_eq!(m(Some(0), Some(MAX_PLAUSIBLE + 1)), None);
        assert_eq!(m(Some(0), Some(MAX_PLAUSIBLE)), Some(MAX_PLAUSIBLE));
    }

    #[test]
    fn the_containers_concurrent_charges_and_known_contexts_correct_the_measurement() {
        let ctx = 300u64 << 20;
        let other = 64i128 << 20;
        // Another process of the container allocated 64 MiB during the creation.
        let grew = Some(1000 + ctx + (64 << 20));
        assert_eq!(measured_size(Some(1000), grew, other, None), Some(ctx));
        // ... or freed it: the GPU grew by less than the context.
        let shrank = Some(1000 + ctx - (64 << 20));
        assert_eq!(measured_size(Some(1000), shrank, -other, None), Some(ctx));
        // Another container allocated meanwhile: the container's known context caps it.
        assert_eq!(
            measured_size(Some(0), Some(ctx + (1 << 30)), 0, Some(ctx)),
            Some(ctx)
        );
        assert_eq!(
            measured_size(Some(0), Some(ctx), 0, Some(ctx * 2)),
            Some(ctx)
        );
    }
}
