//! CUDA graph memory: allocation nodes (`cuGraphAddMemAllocNode`, and `cuMemAllocAsync` /
//! `cuMemAllocFromPoolAsync` on a capturing stream, which the driver turns into an allocation
//! node of the graph being captured instead of allocating).
//!
//! Semantics chosen (the driver takes the physical memory when the graph is *launched*, from a
//! per-device graph memory pool that keeps it until `cuDeviceGraphMemTrim`; the limiter cannot see
//! inside launches, so it charges what a launch will need up front):
//!
//! * **Charged when the node is made**, at the pool's granularity (whole 2 MiB pages), on the
//!   device of the node's pool location (captured: the current context's device); over the cap the
//!   call returns `CUDA_ERROR_OUT_OF_MEMORY` and the driver is not called.
//! * **Freed inside a graph** (`cuGraphAddMemFreeNode`, or `cuMemFreeAsync` on the capturing
//!   stream): the memory is used and returned to the pool within each launch, so the charge stays
//!   while the graph that owns the allocation exists and is credited by `cuGraphDestroy`.
//! * **Not freed inside the graph**: after a launch the allocation outlives it, and the program
//!   frees it with `cuMemFree`/`cuMemFreeAsync` outside a capture, which credits it.
//! * `cuStreamEndCapture` hands captured allocations to the new graph; a failed capture (the graph
//!   is gone) credits them. `cuDeviceGraphMemTrim` is passed through: charges follow allocation
//!   lifetimes, not the pool's cache.
//!
//! A free node (or a captured `cuMemFreeAsync`) counts as "freed inside the graph" only for an
//! allocation of the same graph (or of the capture in progress): CUDA lets a graph free another
//! graph's allocation, but that memory then lives from the allocating graph's launch until the
//! freeing graph's, which may never come, so crediting it with the allocating graph's destruction
//! let a tenant destroy graphs and keep their memory (found by a review helper on 2026-12-06). Such
//! an allocation stays charged until freed outside a graph or the process exits (an over-count
//! for a program that really frees it in another graph). Not closed: a captured free accepts the
//! allocation of any capture in progress (allocations are keyed by the capturing stream, not the
//! capture), so two captures at once can credit an allocation the other's graph never frees.
//!
//! Limits: an executable graph that outlives its graph (`cuGraphDestroy` before
//! `cuGraphExecDestroy`) can launch again with its in-graph allocations no longer charged; an
//! allocation node never freed inside its graph whose graph is destroyed without the allocation
//! ever being freed outside stays charged until the process exits. Graph allocations are few,
//! so they are kept in a mutex-protected list (never touched on the `cuMemAlloc`/`cuMemFree` fast
//! path unless graph allocations exist).

use crate::driver::ffi::*;
use crate::driver::real::{Lib, unavailable};
use crate::driver::table::real;
use crate::infra::fork::ChildReset;
use crate::infra::log::{DEBUG, log_at, log_refusal};
use crate::infra::sync::SpinLock;
use crate::policy::budget::budget;
use crate::policy::devices;
use crate::policy::devices::current_device;
use crate::policy::state;
use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

/// The granularity of the driver's graph memory pool.
const PAGE: u64 = 2 << 20;

#[derive(Debug, Clone, Copy)]
struct GraphAlloc {
    dptr: u64,
    dev: usize,
    bytes: u64,
    /// The owning graph, or the capturing stream while `pending`; 0 once its graph is gone.
    owner: u64,
    pending: bool,
    freed_in_graph: bool,
    epoch: u32,
}

/// Guarded by [`ALLOCS_LOCK`] (a [`SpinLock`], not a `Mutex`: a forked child takes it over from a
/// holder that does not exist there, and a re-entering thread is told instead of waiting on
/// itself). `UnsafeCell` access only through [`with_allocs`].
struct Allocs(UnsafeCell<Vec<GraphAlloc>>);
// SAFETY: the vector is only reached through `with_allocs`, which holds `ALLOCS_LOCK`.
unsafe impl Sync for Allocs {}
static ALLOCS: Allocs = Allocs(UnsafeCell::new(Vec::new()));
static ALLOCS_LOCK: SpinLock = SpinLock::new();
/// Live entries (a lock-free "are there any" for the free paths).
static COUNT: AtomicUsize = AtomicUsize::new(0);
/// Bumped in a forked child, whose entries from the parent are void (atomics only).
static EPOCH: AtomicU32 = AtomicU32::new(0);
/// The epoch the vector was last used in.
static VEC_EPOCH: AtomicU32 = AtomicU32::new(0);

/// Fork child: forget every graph allocation without taking the lock. Atomics only. Registered by
/// the first [`with_allocs`], the only way to the vector.
static RESET: ChildReset = ChildReset::new(|| {
    EPOCH.fetch_add(1, Ordering::AcqRel);
    COUNT.store(0, Ordering::Release);
});

fn with_allocs<R: Default>(f: impl FnOnce(&mut Vec<GraphAlloc>) -> R) -> R {
    RESET.register();
    // Re-entered while this thread holds the lock (not reachable through the exports, which
    // forward re-entered calls to the driver): nothing is recorded or found.
    let Ok(_held) = ALLOCS_LOCK.lock() else {
        return R::default();
    };
    // SAFETY: `ALLOCS_LOCK` is held, so this is the only reference to the vector.
    let v = unsafe { &mut *ALLOCS.0.get() };
    let epoch = EPOCH.load(Ordering::Acquire);
    if VEC_EPOCH.swap(epoch, Ordering::AcqRel) != epoch {
        // First use in a fork child: the parent's vector may have been half-way through a
        // reallocation when another thread forked; leak it (once per fork) rather than read it.
        std::mem::forget(std::mem::take(v));
    }
    v.retain(|a| a.epoch == epoch);
    let r = f(v);
    COUNT.store(v.len(), Ordering::Release);
    r
}

fn graph_reserved(bytes: u64) -> u64 {
    bytes.div_ceil(PAGE).saturating_mul(PAGE)
}

fn credit(a: &GraphAlloc) {
    budget().credit(a.dev, a.bytes);
    log_at!(
        DEBUG,
        "device {}: -{} bytes of graph memory at {:#x}",
        a.dev,
        a.bytes,
        a.dptr
    );
}

/// Charges a graph allocation of `bytes` on container device `dev`, runs `call` (the driver's
/// result and the device address), and records it for `owner`.
fn charged_node(
    dev: usize,
    bytes: u64,
    owner: u64,
    pending: bool,
    call: impl FnOnce() -> (CUresult, u64),
) -> CUresult {
    let bytes = graph_reserved(bytes);
    if let Err(over) = budget().try_charge(dev, bytes) {
        log_refusal!(
            "Device {dev} OOM: {} + {bytes} bytes of graph memory requested exceeds the limit \
             of {} bytes",
            over.usage,
            over.limit
        );
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    let (rc, dptr) = call();
    if rc != CUDA_SUCCESS {
        budget().credit(dev, bytes);
        return rc;
    }
    log_at!(
        DEBUG,
        "device {dev}: +{bytes} bytes of graph memory at {dptr:#x}"
    );
    let epoch = EPOCH.load(Ordering::Acquire);
    with_allocs(|v| {
        v.push(GraphAlloc {
            dptr,
            dev,
            bytes,
            owner,
            pending,
            freed_in_graph: false,
            epoch,
        });
    });
    CUDA_SUCCESS
}

/// The capped container device behind CUDA ordinal `ordinal`.
fn capped(ordinal: Option<CUdevice>) -> Option<usize> {
    state::ensure();
    let b = budget();
    if !b.any_limit() {
        return None;
    }
    let dev = match ordinal {
        Some(o) => devices::container_index(o),
        None => current_device(),
    }?;
    b.limit(dev).is_some().then_some(dev)
}

pub(crate) unsafe fn add_mem_alloc_node(
    node: *mut Handle,
    graph: Handle,
    deps: *const Handle,
    ndeps: usize,
    params: *mut MemAllocNodeParams,
) -> CUresult {
    let Some(real) = real::cuGraphAddMemAllocNode() else {
        return unavailable(Lib::Cuda);
    };
    // SAFETY: the caller's arguments, forwarded.
    let call = || unsafe { real(node, graph, deps, ndeps, params) };
    // SAFETY: the caller's parameters (checked for null), read before the driver sees them.
    let Some(p) = (unsafe { params.as_ref() }).copied() else {
        return call();
    };
    let dev = (p.location_type == CU_MEM_LOCATION_TYPE_DEVICE)
        .then(|| capped(Some(p.location_id)))
        .flatten();
    let Some(dev) = dev else {
        return call();
    };
    charged_node(dev, p.bytesize as u64, graph as u64, false, || {
        let rc = call();
        if rc != CUDA_SUCCESS {
            return (rc, 0);
        }
        // SAFETY: non-null (checked above); the driver wrote `dptr` into it on success.
        (rc, unsafe { (*params).dptr })
    })
}

pub(crate) unsafe fn add_mem_free_node(
    node: *mut Handle,
    graph: Handle,
    deps: *const Handle,
    ndeps: usize,
    dptr: CUdeviceptr,
) -> CUresult {
    let Some(real) = real::cuGraphAddMemFreeNode() else {
        return unavailable(Lib::Cuda);
    };
    // SAFETY: the caller's arguments, forwarded.
    let rc = unsafe { real(node, graph, deps, ndeps, dptr) };
    if rc == CUDA_SUCCESS && COUNT.load(Ordering::Acquire) > 0 {
        // Only an allocation of this same graph is freed within each of its launches; one made
        // by another graph outlives that graph's launch until this graph runs, which may be never.
        let key = graph as u64;
        mark_freed_in_graph(dptr, |a| !a.pending && a.owner == key);
    }
    rc
}

/// Marks the graph allocation at `dptr` that `owned` accepts as freed inside its own graph.
fn mark_freed_in_graph(dptr: u64, owned: impl Fn(&GraphAlloc) -> bool) -> bool {
    with_allocs(|v| {
        v.iter_mut()
            .find(|a| a.dptr == dptr && !a.freed_in_graph && owned(a))
            .map(|a| a.freed_in_graph = true)
            .is_some()
    })
}

pub(crate) unsafe fn graph_destroy(graph: Handle) -> CUresult {
    let Some(real) = real::cuGraphDestroy() else {
        return unavailable(Lib::Cuda);
    };
    // SAFETY: the caller's argument, forwarded.
    let rc = unsafe { real(graph) };
    if rc != CUDA_SUCCESS || COUNT.load(Ordering::Acquire) == 0 {
        return rc;
    }
    let key = graph as u64;
    let gone = with_allocs(|v| {
        let mut gone = Vec::new();
        v.retain_mut(|a| {
            if a.pending || a.owner != key {
                return true;
            }
            if a.freed_in_graph {
                gone.push(*a);
                return false;
            }
            a.owner = 0; // may be live after a launch: credited when freed outside
            true
        });
        gone
    });
    gone.iter().for_each(credit);
    rc
}

fn end_capture(stream: Handle, graph: *mut Handle, call: impl FnOnce() -> CUresult) -> CUresult {
    let rc = call();
    if COUNT.load(Ordering::Acquire) == 0 {
        return rc;
    }
    let key = stream as u64;
    let new_owner = if rc == CUDA_SUCCESS && !graph.is_null() {
        // SAFETY: the driver wrote the caller's out-pointer on success.
        Some(unsafe { *graph } as u64)
    } else {
        None
    };
    let gone = with_allocs(|v| {
        let mut gone = Vec::new();
        v.retain_mut(|a| {
            if !a.pending || a.owner != key {
                return true;
            }
            match new_owner {
                Some(g) => {
                    a.owner = g;
                    a.pending = false;
                    true
                }
                None => {
                    gone.push(*a);
                    false
                }
            }
        });
        gone
    });
    gone.iter().for_each(credit);
    rc
}

pub(crate) unsafe fn stream_end_capture(stream: Handle, graph: *mut Handle) -> CUresult {
    let Some(real) = real::cuStreamEndCapture() else {
        return unavailable(Lib::Cuda);
    };
    // SAFETY: the caller's arguments, forwarded.
    end_capture(stream, graph, || unsafe { real(stream, graph) })
}

pub(crate) unsafe fn stream_end_capture_ptsz(stream: Handle, graph: *mut Handle) -> CUresult {
    let Some(real) = real::cuStreamEndCapture_ptsz() else {
        return unavailable(Lib::Cuda);
    };
    // SAFETY: the caller's arguments, forwarded.
    end_capture(stream, graph, || unsafe { real(stream, graph) })
}

/// Whether `stream` is capturing a graph (asked of the driver; `per_thread` picks the
/// `_ptsz` variant, matching the allocation entry point).
pub(crate) fn capturing(stream: Handle, per_thread: bool) -> bool {
    let f = if per_thread {
        real::cuStreamIsCapturing_ptsz()
    } else {
        real::cuStreamIsCapturing()
    };
    let Some(f) = f else { return false };
    let mut status: std::ffi::c_int = 0;
    // SAFETY: valid out-pointer; the caller's stream (the driver validates it).
    unsafe { f(stream, &mut status) == CUDA_SUCCESS && status == CU_STREAM_CAPTURE_STATUS_ACTIVE }
}

/// The current context's container device, if it is capped.
pub(crate) fn capped_current_device() -> Option<usize> {
    capped(None)
}

/// `cuMemAllocAsync`/`FromPoolAsync` on a capturing stream (capped device `dev`): an allocation
/// node of the graph being captured, charged like one.
pub(crate) fn captured_alloc(
    dev: usize,
    stream: Handle,
    bytes: u64,
    call: impl FnOnce() -> (CUresult, u64),
) -> CUresult {
    charged_node(dev, bytes, stream as u64, true, call)
}

/// Whether `dptr` is a graph allocation not yet freed inside a graph (cheap when there are none).
pub(crate) fn is_graph_alloc(dptr: u64) -> bool {
    COUNT.load(Ordering::Acquire) > 0
        && with_allocs(|v| v.iter().any(|a| a.dptr == dptr && !a.freed_in_graph))
}

/// `cuMemFreeAsync` of graph allocation `dptr` on a capturing stream: a free node; the charge
/// stays while its graph lives.
pub(crate) fn captured_free(dptr: u64, call: impl FnOnce() -> CUresult) -> CUresult {
    let rc = call();
    if rc == CUDA_SUCCESS {
        // An allocation captured in a capture still going on (on any of its streams); one of a
        // finished graph stays charged (see `add_mem_free_node`).
        mark_freed_in_graph(dptr, |a| a.pending);
    }
    rc
}

/// A free outside capture of a pointer the linear table does not know: if it is a graph
/// allocation that outlived its launch, it is credited once the driver frees it.
pub(crate) fn free_escaped(dptr: u64, call: impl FnOnce() -> CUresult) -> CUresult {
    if COUNT.load(Ordering::Acquire) == 0 {
        return call();
    }
    let entry = with_allocs(|v| {
        let i = v
            .iter()
            .position(|a| a.dptr == dptr && !a.freed_in_graph && !a.pending)?;
        Some(v.swap_remove(i))
    });
    let Some(entry) = entry else {
        return call();
    };
    let rc = call();
    if rc == CUDA_SUCCESS {
        credit(&entry);
    } else {
        with_allocs(|v| v.push(entry));
    }
    rc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn graph_memory_is_charged_in_whole_pool_pages() {
        assert_eq!(graph_reserved(1), PAGE);
        assert_eq!(graph_reserved(PAGE), PAGE);
        assert_eq!(graph_reserved(PAGE + 1), 2 * PAGE);
        assert_eq!(graph_reserved(u64::MAX), u64::MAX, "saturates");
    }
}
