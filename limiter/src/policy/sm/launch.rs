//! The SM (core) cap: `CUDA_DEVICE_SM_LIMIT[_<i>]` percent of each device's time for the whole
//! container, on every launch path (`cuLaunchKernel`, `cuLaunchKernelEx`,
//! `cuLaunchCooperativeKernel`, `cuGraphLaunch`, each with its `_ptsz` twin).
//!
//! * [`before_launch`] is what every launch hook calls. In a process with no cap of any kind (no
//!   memory cap, no SM cap: no shared region) it is one atomic load. Otherwise, in HAMi-core's
//!   original `rate_limiter` order: the priority gate first (wait while the monitor holds
//!   `recent_kernel` at −1, then mark the container active and stamp `last_kernel_time`), then, if
//!   the launch's device is capped, the device's `gate::Gate` — which only counts the launch
//!   while the policy says not to cap now (`utilization_switch` off), so that utilisation is still
//!   measured and written for the monitor.
//! * The gates are driven by `watcher`, one thread per process started on the first capped
//!   launch (never in a process that does not launch under a cap), which every `watcher::TICK`
//!   reads NVML's per-process utilisation for the container's host PIDs (`hostpid`) and feeds
//!   `controller`.
//! * The launch's device is the current context's device; a process that sees one device uses
//!   it ([`crate::policy::devices::only_device`]), others ask `cuCtxGetDevice` on capped launches.
//! * The caps come from the region's `sm_limit` once the region is open (an existing file's values
//!   win, like the memory limits), else from the environment (`caps`, `config`).

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

static MODE: AtomicU8 = AtomicU8::new(UNKNOWN);
/// Guards [`decide`] (fork- and re-entry-aware; `MODE` stays `UNKNOWN` until it is done).
static DECIDE: InitOnce = InitOnce::new();
/// How often a launch blocked by a higher-priority task asks again (HAMi-core: 1 s).
const PRIORITY_POLL: Duration = Duration::from_millis(100);

/// The region's `recent_kernel` word, so the launch path reads it without going through the
/// `Region` (one cache line and page fewer per launch); set together with the cached region
/// ([`shared::set_region`]).
static RECENT_KERNEL: AtomicPtr<AtomicI32> = AtomicPtr::new(std::ptr::null_mut());

/// Called by every launch hook before the real launch.
#[inline(always)]
pub(crate) fn before_launch() {
    if MODE.load(Ordering::Acquire) != OFF {
        launch_slow();
    }
}

#[inline(never)]
fn launch_slow() {
    if MODE.load(Ordering::Acquire) != ON {
        decide();
        if MODE.load(Ordering::Acquire) != ON {
            return;
        }
    }
    // SAFETY: non-null pointers point into the budget's leaked region mapping, never unmapped.
    let recent = unsafe { RECENT_KERNEL.load(Ordering::Acquire).as_ref() };
    let mark_fresh = recent.is_some_and(|r| r.load(Ordering::Relaxed) == RECENT_KERNEL_ACTIVE);
    let region = shared::region();
    if let Some(region) = region {
        // HAMi-core's original order: the priority gate and the activity mark come before any
        // cap or switch check, so uncapped and switched-off containers still take part.
        // While the mark is still fresh (the monitor has not aged it since) and no refresh of
        // `last_kernel_time` is due, one load of `recent_kernel` is all a launch costs; a block
        // (−1) or an aged mark always takes the full path.
        if !mark_fresh || refresh_due() {
            while region.record_kernel_launch(coarse_unix_secs()) == LaunchGate::Blocked {
                std::thread::sleep(PRIORITY_POLL);
            }
        }
    }
    let Some(dev) = launch_device() else {
        return;
    };
    if CAPS[dev].load(Ordering::Relaxed) == 0 {
        return;
    }
    watcher::ensure_started();
    if !shared::capping_now(region) {
        // Measured (for `sm_util`), not paced: the monitor says the GPU is not shared.
        GATES[dev].count();
        return;
    }
    let wait = GATES[dev].admit(gate::monotonic_ns());
    if wait > 0 {
        GATES[dev].sleep(wait);
    }
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
        let cap = match region.and_then(|r| r.sm_limit(d).ok()) {
            Some(file) => match file {
                1..=99 => Some(file as u8),
                _ => None,
            },
            None => env.caps[d],
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
             (device, file, environment): {differing:?}; the file's limits are in force",
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
    let mode = if region.is_some() || (any_cap && env.policy != Policy::Disable) {
        ON
    } else {
        OFF
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
fn refresh_due() -> bool {
    static LAUNCHES: AtomicU32 = AtomicU32::new(0);
    let n = LAUNCHES.load(Ordering::Relaxed);
    LAUNCHES.store(n.wrapping_add(1), Ordering::Relaxed);
    n.is_multiple_of(REFRESH_EVERY)
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
