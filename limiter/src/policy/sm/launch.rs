//! The SM (core) cap: `CUDA_DEVICE_SM_LIMIT[_<i>]` percent of each device's time for the whole
//! container, on every launch path (`cuLaunchKernel`, `cuLaunchKernelEx`,
//! `cuLaunchCooperativeKernel`, `cuGraphLaunch`, each with its `_ptsz` twin).
//!
//! * [`passes`] is the launch exports' fast path: in a process with no cap of any kind (no memory
//!   cap, no SM cap: no shared region) one atomic load; with a region but no SM cap on any device
//!   (`MARK_ONLY`) three loads and a counter while the activity mark is fresh. Anything else goes
//!   to [`before_launch`], which every launch hook's body calls. There, in HAMi-core's
//!   original `rate_limiter` order: the priority gate first (wait while the monitor holds
//!   `recent_kernel` at −1, then mark the container active and stamp `last_kernel_time`), then, if
//!   the launch's device is capped, the device's `gate::Gate` — which only counts the launch
//!   while the policy says not to cap now (`utilization_switch` off), so that utilisation is still
//!   measured and written for the monitor.
//! * The gates are driven by `watcher`, one thread per process started on the first capped
//!   launch (never in a process that does not launch under a cap), which reads NVML's
//!   per-process utilisation for the container's host PIDs (`hostpid`) just after each of NVML's
//!   sample periods ends and feeds `controller`; until its first measurement the gate probes
//!   (`gate.rs`). A paced launch while no watcher runs (it cannot start, or this is a raw `clone`
//!   child) is refused: nothing would measure it.
//! * The launch's device is the current context's device; a process that sees one device uses
//!   it ([`crate::policy::devices::only_device`]), others ask `cuCtxGetDevice` on capped launches.
//! * The caps are the stricter of the environment's (`caps`, `config`) and the region's `sm_limit`
//!   once the region is open, like the memory limits: a word the tenant lifts in its file never
//!   lifts the environment's cap.

use crate::infra::config::MAX_DEVICES;
use crate::infra::log::log_at;
use crate::infra::sync::InitOnce;
use crate::policy::budget;
use crate::policy::caps;
use crate::policy::sm::config::Policy;
use crate::policy::sm::shared::{self, CAPS, GATES};
use crate::policy::sm::{gate, watcher};
use std::sync::atomic::{AtomicI32, AtomicPtr, AtomicU8, AtomicU32, Ordering};
use std::time::Duration;
use vgpu_region::LaunchGate;
use vgpu_region::layout::RECENT_KERNEL_ACTIVE;

const UNKNOWN: u8 = 0;
/// No region and no cap: launches pass straight through.
const OFF: u8 = 2;
/// A region (priority protocol) and/or SM caps.
const ON: u8 = 3;
/// A region and no SM cap on any device: only the priority protocol, so a launch whose mark is
/// fresh and that is not due to refresh `last_kernel_time` needs nothing else ([`passes`]).
const MARK_ONLY: u8 = 4;

static MODE: AtomicU8 = AtomicU8::new(UNKNOWN);
/// Guards [`decide`] (fork- and re-entry-aware; `MODE` stays `UNKNOWN` until it is done).
static DECIDE: InitOnce = InitOnce::new();
/// How often a launch blocked by a higher-priority task asks again (HAMi-core: 1 s).
const PRIORITY_POLL: Duration = Duration::from_millis(100);

/// The region's `recent_kernel` word, so the launch path reads it without going through the
/// `Region` (one cache line and page fewer per launch); set together with the cached region
/// ([`shared::set_region`]).
static RECENT_KERNEL: AtomicPtr<AtomicI32> = AtomicPtr::new(std::ptr::null_mut());

/// The launch exports' fast path: whether this launch needs nothing from us — no cap of any kind,
/// or only the priority protocol with the activity mark still fresh (`recent_kernel` = 2, so not
/// blocked) and no refresh of `last_kernel_time` due. Atomic loads and one relaxed store only (it
/// runs outside the panic guard); `false` sends the launch to [`before_launch`].
#[inline(always)]
pub(crate) fn passes() -> bool {
    match MODE.load(Ordering::Acquire) {
        OFF => true,
        MARK_ONLY => {
            // SAFETY: `MARK_ONLY` is published (Release) only after `RECENT_KERNEL` was set to the
            // region's word (never reset: the mapping is leaked and stays valid for the process's
            // life, also in a fork child); this load is ordered after that (Acquire).
            let recent = unsafe { &*RECENT_KERNEL.load(Ordering::Relaxed) };
            recent.load(Ordering::Relaxed) == RECENT_KERNEL_ACTIVE && !refresh_due()
        }
        _ => false,
    }
}

/// Whether the region's `recent_kernel` holds the activity mark (not aged by the monitor, not −1).
#[inline(always)]
fn mark_fresh() -> bool {
    // SAFETY: non-null pointers point into the budget's leaked region mapping, never unmapped.
    let recent = unsafe { RECENT_KERNEL.load(Ordering::Acquire).as_ref() };
    recent.is_some_and(|r| r.load(Ordering::Relaxed) == RECENT_KERNEL_ACTIVE)
}

/// Called by every launch hook's body (the exports' slow path) before the real launch; `false`:
/// refuse the launch (its device is capped and the cap cannot be enforced: no watcher).
#[inline(always)]
pub(crate) fn before_launch() -> bool {
    MODE.load(Ordering::Acquire) == OFF || launch_slow()
}

#[inline(never)]
fn launch_slow() -> bool {
    let mut mode = MODE.load(Ordering::Acquire);
    if mode != ON && mode != MARK_ONLY {
        decide();
        mode = MODE.load(Ordering::Acquire);
        if mode != ON && mode != MARK_ONLY {
            return true;
        }
    }
    let region = shared::region();
    if let Some(region) = region {
        // HAMi-core's original order: the priority gate and the activity mark come before any
        // cap or switch check, so uncapped and switched-off containers still take part.
        // While the mark is still fresh (the monitor has not aged it since) and no refresh of
        // `last_kernel_time` is due, one load of `recent_kernel` is all a launch costs; a block
        // (−1) or an aged mark always takes the full path. Under `MARK_ONLY` the export's
        // [`passes`] has already looked (and counted the launch for the refresh), so a launch
        // that gets here records.
        if mode == MARK_ONLY || !mark_fresh() || refresh_due() {
            while region.record_kernel_launch(coarse_unix_secs()) == LaunchGate::Blocked {
                std::thread::sleep(PRIORITY_POLL);
            }
        }
    }
    if mode == MARK_ONLY {
        return true; // no device has an SM cap
    }
    let Some(dev) = launch_device() else {
        return true;
    };
    if CAPS[dev].load(Ordering::Relaxed) == 0 {
        return true;
    }
    if !shared::capping_now(region) {
        // Measured (for `sm_util`), not paced: the monitor says the GPU is not shared (no cap in
        // force, so the launch passes even if the watcher cannot run).
        watcher::ensure_started();
        GATES[dev].count();
        return true;
    }
    let now = gate::monotonic_ns();
    if !watcher::ensure_started() || !watcher::is_own(now) {
        // Without its watcher the gate is never set: the launch would be uncapped.
        return false;
    }
    let epoch = GATES[dev].epoch(); // before the reservation: see `Gate::epoch`
    let wait = GATES[dev].admit(now);
    if wait > 0 {
        GATES[dev].sleep(wait, epoch);
    }
    true
}

#[cold]
fn decide() {
    // Decided by another thread, or re-entered (a launch from inside the driver while this thread
    // opens the region): such a launch passes ungated, `MODE` is still `UNKNOWN`.
    let Ok(claim) = DECIDE.claim() else {
        return;
    };
    crate::policy::state::ensure();
    shared::GATES_RESET.register();
    // The device map first: it applies per-device variables that name absent devices to the
    // environment's caps read just below.
    let _ = crate::policy::devices::only_device();
    let env = caps::sm();
    let region = budget::registered_region();
    let mut any_cap = false;
    for (d, slot) in CAPS.iter().enumerate() {
        // The stricter of the environment's cap and the file's, as for memory: the file is the
        // tenant's, and a word it lifts (0 or 100, "uncapped") between the opening that lowered it
        // and this read would otherwise disable the cap for the process's life (this decision is
        // taken once; the node repairing the word later changes nothing here).
        let file = region
            .and_then(|r| r.sm_limit(d).ok())
            .filter(|f| (1..=99).contains(f))
            .map(|f| f as u8);
        let cap = match (env.caps[d], file) {
            (Some(e), Some(f)) => Some(e.min(f)),
            (e, f) => e.or(f),
        };
        any_cap |= cap.is_some();
        slot.store(cap.unwrap_or(0), Ordering::Relaxed);
    }
    if let Some(r) = region
        && let Some(m) = &r.open_report().limit_mismatch
        && m.file_sm_limits != m.requested_sm_limits
    {
        let differing: Vec<(usize, u64, u64)> = (0..MAX_DEVICES)
            .filter(|&d| m.file_sm_limits[d] != m.requested_sm_limits[d])
            .map(|d| (d, m.file_sm_limits[d], m.requested_sm_limits[d]))
            .collect();
        log_at!(
            crate::infra::log::WARN,
            "Limit inconsistency: {} holds other SM limits than the environment asks for \
             (device, file, environment): {differing:?}; the stricter of the two is in force",
            r.path().display()
        );
    }
    if let Some(r) = region {
        RECENT_KERNEL.store(
            std::ptr::from_ref(&r.layout().recent_kernel).cast_mut(),
            Ordering::Release,
        );
        shared::set_region(r);
    }
    let mode = match region {
        // Only the priority protocol: `RECENT_KERNEL` is set above, before `MODE` publishes it.
        Some(_) if !any_cap => MARK_ONLY,
        Some(_) => ON,
        None if any_cap && env.policy != Policy::Disable => ON,
        None => OFF,
    };
    MODE.store(mode, Ordering::Release);
    claim.finish();
}

/// The container index of the device a launch runs on: the only device this process sees (as
/// for allocations, [`crate::policy::devices::only_device`]), else the current context's device.
#[inline]
fn launch_device() -> Option<usize> {
    crate::policy::devices::only_device().or_else(crate::policy::devices::current_device)
}

/// Launches between two refreshes of `last_kernel_time` while the activity mark stays fresh. The
/// monitor ages the mark every 5 s, which forces a refresh on the next launch anyway, so the stamp
/// lags by at most this many launches or one feedback period, whichever comes first.
const REFRESH_EVERY: u32 = 256;

/// Whether this launch should refresh `last_kernel_time`. A plain load and store, not a
/// read-modify-write: two threads may count one launch between them, which only shifts a refresh.
#[inline(always)]
fn refresh_due() -> bool {
    static LAUNCHES: AtomicU32 = AtomicU32::new(0);
    // Counted launches, this one included: the first of every `REFRESH_EVERY` is due (tested on
    // the new value, so the fast path needs one register for it).
    let n = LAUNCHES.load(Ordering::Relaxed).wrapping_add(1);
    LAUNCHES.store(n, Ordering::Relaxed);
    n % REFRESH_EVERY == 1
}

/// Unix seconds from `CLOCK_REALTIME_COARSE` (vDSO; `last_kernel_time` has 1 s resolution).
fn coarse_unix_secs() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer; the clock exists on every Linux since 2.6.32.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut ts) };
    ts.tv_sec.max(0) as u64
}
