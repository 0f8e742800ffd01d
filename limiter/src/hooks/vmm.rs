//! How long a VMM physical allocation (`cuMemCreate`) stays charged.
//!
//! The driver frees a physical allocation only when every reference to its handle has been
//! released — `cuMemCreate`'s and each `cuMemRetainAllocationHandle`'s — **and** no mapping
//! (`cuMemMap`) uses it any more. NVIDIA's samples and programming guide release the handle right
//! after mapping it (the memory then lives until `cuMemUnmap`); NCCL retains and releases around
//! its unmap; PyTorch's expandable segments and vLLM unmap first, then release. The charge
//! (`memory::mem_create`, recorded in [`VMM_HANDLES`]) lasts exactly as long: per charged handle
//! this module counts the references not yet released and the live mappings, and credits when
//! both are zero — at the last `cuMemRelease` or the last `cuMemUnmap`, whichever comes last.
//! (Before 2026-12-06 `cuMemRelease` credited at once: map, release, repeat held any amount of
//! memory uncharged, honest programs following the samples included.)
//!
//! A handle never mapped nor retained is released as before (`memory::tracked_free`: un-record,
//! call the driver, credit on success). Mappings are counted only for charged handles; a range
//! unmapped is matched as the driver matches it (every mapping wholly inside it).
//!
//! Every map, unmap, release and retain of a process with a memory cap runs under one lock,
//! **driver call included** (`cuMemCreate` needs none: its handle is new), so
//! the counts and the driver cannot disagree: a release that finds "last reference, nothing
//! mapped" cannot race a map of the same handle into the driver, and a map counted is a map made.
//! These calls are rare and slow (page-table updates in the driver); without a cap each is the
//! flag and the call. A fork child forgets the counts (and the table forgets the charges).
//!
//! Limits: a handle exported (`cuMemExportToShareableHandle`) and imported and mapped by another
//! process of the container keeps the memory alive there after the exporter's last release
//! credits it; a handle imported into this process is not charged (its memory is the exporter's).

use crate::driver::ffi::*;
use crate::driver::real::{Lib, unavailable};
use crate::driver::table::real;
use crate::hooks::memory::tracked_free;
use crate::infra::fork::ChildReset;
use crate::infra::log::{DEBUG, log_at};
use crate::infra::sync::SpinLock;
use crate::policy::budget::{VMM_HANDLES, budget};
use std::cell::UnsafeCell;
use std::collections::BTreeMap;
use std::ffi::c_void;
use std::sync::atomic::{AtomicU32, Ordering};

/// What keeps a charged handle's memory alive, besides the charge itself.
#[derive(Debug, Clone, Copy)]
struct Held {
    /// References to the handle not yet released (1 from `cuMemCreate`, +1 per retain).
    refs: u32,
    /// Live mappings of it.
    maps: u32,
}

#[derive(Default)]
struct State {
    /// Charged handles that were mapped or retained at least once.
    held: BTreeMap<u64, Held>,
    /// Live mappings of charged handles: start address → (size, handle).
    mappings: BTreeMap<u64, (u64, u64)>,
}

/// Guarded by [`LOCK`] (a [`SpinLock`]: a forked child takes it over from a holder that does not
/// exist there). `UnsafeCell` access only through [`with_state`].
struct Cell(UnsafeCell<Option<State>>);
// SAFETY: the state is only reached through `with_state`, which holds `LOCK`.
unsafe impl Sync for Cell {}
static STATE: Cell = Cell(UnsafeCell::new(None));
static LOCK: SpinLock = SpinLock::new();
/// Bumped in a forked child, whose counts from the parent are void (atomics only).
static EPOCH: AtomicU32 = AtomicU32::new(0);
/// The epoch the state was last used in.
static STATE_EPOCH: AtomicU32 = AtomicU32::new(0);

static RESET: ChildReset = ChildReset::new(|| {
    EPOCH.fetch_add(1, Ordering::AcqRel);
});

/// Runs `f` on the counts under the lock; `None` if this thread already holds it (re-entered:
/// not reachable through the exports, which forward nested calls to the driver).
fn with_state<R>(f: impl FnOnce(&mut State) -> R) -> Option<R> {
    RESET.register();
    let _held = LOCK.lock().ok()?;
    // SAFETY: `LOCK` is held, so this is the only reference to the state.
    let slot = unsafe { &mut *STATE.0.get() };
    let epoch = EPOCH.load(Ordering::Acquire);
    if STATE_EPOCH.swap(epoch, Ordering::AcqRel) != epoch {
        // First use in a fork child: the parent's maps may have been half-way through an update
        // when another thread forked; leak them (once per fork) rather than read them.
        std::mem::forget(slot.take());
    }
    Some(f(slot.get_or_insert_with(State::default)))
}

/// Gives back the charge of `handle`, whose memory the driver has just freed.
fn credit(handle: u64) {
    if let Some(charge) = VMM_HANDLES.remove(handle) {
        budget().credit(charge.dev as usize, charge.bytes);
        log_at!(
            DEBUG,
            "device {}: -{} bytes of VMM handle {handle:#x} (last release or unmap)",
            charge.dev,
            charge.bytes
        );
    }
}

pub(crate) unsafe fn mem_release(handle: CUmemGenericAllocationHandle) -> CUresult {
    let Some(real) = real::cuMemRelease() else {
        return unavailable(Lib::Cuda);
    };
    // SAFETY: the caller's argument, forwarded.
    let call = || unsafe { real(handle) };
    if !budget().any_limit() {
        return call();
    }
    with_state(|s| match s.held.get_mut(&handle) {
        Some(h) if h.maps > 0 || h.refs > 1 => {
            // Another reference or a mapping keeps the memory: the charge stays.
            let rc = call();
            if rc == CUDA_SUCCESS {
                h.refs = h.refs.saturating_sub(1);
            }
            rc
        }
        _ => {
            s.held.remove(&handle);
            tracked_free(&VMM_HANDLES, handle, false, call)
        }
    })
    .unwrap_or_else(call)
}

/// Runs the driver's `call` under the lock and, on success, `counted` on the counts; without a cap
/// (or re-entered) the call alone.
fn counted_call(call: impl Fn() -> CUresult, counted: impl FnOnce(&mut State)) -> CUresult {
    if !budget().any_limit() {
        return call();
    }
    with_state(|s| {
        let rc = call();
        if rc == CUDA_SUCCESS {
            counted(s);
        }
        rc
    })
    .unwrap_or_else(call)
}

pub(crate) unsafe fn mem_map(
    ptr: CUdeviceptr,
    size: usize,
    offset: usize,
    handle: CUmemGenericAllocationHandle,
    flags: u64,
) -> CUresult {
    let Some(real) = real::cuMemMap() else {
        return unavailable(Lib::Cuda);
    };
    // SAFETY: the caller's arguments, forwarded.
    let call = || unsafe { real(ptr, size, offset, handle, flags) };
    counted_call(call, |s| {
        if VMM_HANDLES.contains(handle) {
            let h = s.held.entry(handle).or_insert(Held { refs: 1, maps: 0 });
            h.maps = h.maps.saturating_add(1);
            s.mappings.insert(ptr, (size as u64, handle));
        }
    })
}

pub(crate) unsafe fn mem_unmap(ptr: CUdeviceptr, size: usize) -> CUresult {
    let Some(real) = real::cuMemUnmap() else {
        return unavailable(Lib::Cuda);
    };
    // SAFETY: the caller's arguments, forwarded.
    let call = || unsafe { real(ptr, size) };
    counted_call(call, |s| {
        let end = ptr.saturating_add(size as u64);
        let gone: Vec<u64> = s
            .mappings
            .range(ptr..end)
            .filter(|(va, (len, _))| va.saturating_add(*len) <= end)
            .map(|(va, _)| *va)
            .collect();
        for va in gone {
            let Some((_, handle)) = s.mappings.remove(&va) else {
                continue;
            };
            if let Some(h) = s.held.get_mut(&handle) {
                h.maps = h.maps.saturating_sub(1);
                if h.maps == 0 && h.refs == 0 {
                    s.held.remove(&handle);
                    credit(handle);
                }
            }
        }
    })
}

pub(crate) unsafe fn mem_retain_allocation_handle(
    handle: *mut CUmemGenericAllocationHandle,
    addr: *mut c_void,
) -> CUresult {
    let Some(real) = real::cuMemRetainAllocationHandle() else {
        return unavailable(Lib::Cuda);
    };
    // SAFETY: the caller's arguments, forwarded.
    let call = || unsafe { real(handle, addr) };
    counted_call(call, |s| {
        if handle.is_null() {
            return;
        }
        // SAFETY: the driver just wrote it (the call succeeded).
        let retained = unsafe { *handle };
        if VMM_HANDLES.contains(retained) {
            let h = s.held.entry(retained).or_insert(Held { refs: 1, maps: 0 });
            h.refs = h.refs.saturating_add(1);
        }
    })
}
