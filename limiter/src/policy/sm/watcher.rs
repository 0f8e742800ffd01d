//! The per-process SM watcher thread: started by the first capped launch, it resolves the host
//! PID, then every [`TICK`] measures each capped device through NVML and sets its gate's spacing.
//!
//! Measurement: `nvmlDeviceGetProcessUtilization(device, …, lastSeen)` returns the samples newer
//! than the last one seen; a process's share is the mean `smUtil` of its samples, the container's
//! is the sum over the container's host PIDs (every live slot of the shared region that has
//! one — each process writes its own). A tick that brings no new sample carries no information
//! and changes nothing (NVML's sampling period may be longer than a tick). Without a host PID
//! (see `hostpid.rs`), or without a usable shared region (the other processes of the container
//! cannot be seen), the device's overall utilisation stands in for both: the cap holds, at the
//! price of over-throttling on a shared GPU.
//!
//! It writes this process's share (percent) into its slot's `device_util[i].sm_util` each tick,
//! for the monitor and the metrics.

use crate::driver::ffi::{Handle, NVML_SUCCESS, NvmlReturn, ProcessSample, Utilization};
use crate::driver::table::real;
use crate::infra::config::MAX_DEVICES;
use crate::infra::fork::ChildReset;
use crate::infra::log::{DEBUG, INFO, WARN, log_at};
use crate::policy::budget;
use crate::policy::sm::controller::{Controller, Measurement};
use crate::policy::sm::gate;
use crate::policy::sm::hostpid::{self, HostPid};
use crate::policy::sm::shared::{self, CAPS, GATES};
use std::collections::HashMap;
use std::ffi::c_uint;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;
use vgpu_region::layout::SLOT_STATUS_EXITED;

/// Control period.
pub(crate) const TICK: Duration = Duration::from_millis(100);

/// How often the device-wide fallback measurement is used (NVML's averaging window).
const DEVICE_WINDOW_NS: u64 = 1_000_000_000;

const NVML_ERROR_NOT_FOUND: NvmlReturn = 6;
const NVML_ERROR_INSUFFICIENT_SIZE: NvmlReturn = 7;

const NOT_STARTED: u8 = 0;
/// The thread is being spawned or is bringing NVML up, the first time: launches pass meanwhile (the
/// gate is open until the watcher's first measurement anyway).
const STARTING: u8 = 1;
/// NVML is up: the thread measures and sets the gates.
const RUNNING: u8 = 2;
/// Being started again after a failure: launches wait for it ([`START_WAIT`] at most).
const RETRYING: u8 = 3;

static STATE: AtomicU8 = AtomicU8::new(NOT_STARTED);
/// The process the watcher was started in (`getpid`).
static PID: AtomicU32 = AtomicU32::new(0);
/// Set by the first failure to start the watcher (no thread, no NVML): from then on a start is a
/// [`RETRYING`] one.
static FAILED_ONCE: AtomicBool = AtomicBool::new(false);
/// How long a capped launch waits for a watcher being started after a failure.
const START_WAIT: Duration = Duration::from_secs(1);
/// After a failure, a new watcher is tried at most this often (monotonic ns of the next try);
/// launches in between are refused at once.
static NEXT_RETRY: AtomicU64 = AtomicU64::new(0);
const RETRY_NS: u64 = 100_000_000;
/// When [`is_own`] next compares `getpid` with the watcher's process (monotonic ns); 0 forces it.
static NEXT_PID_CHECK: AtomicU64 = AtomicU64::new(0);
/// How often a process pacing launches checks that the watcher is its own.
const PID_CHECK_NS: u64 = 100_000_000;

/// Makes sure the watcher runs in this process (or is starting for the first time); `false` if it
/// cannot (no thread, no NVML), and a paced launch must be refused: a watcher that does not run
/// sets no gate, which would leave the device uncapped. A tenant can make it fail on purpose (an
/// address-space or thread limit around its first launch, fewer file descriptors than NVML
/// needs); each capped launch then tries again. One load and compare once started.
#[inline]
pub(crate) fn ensure_started() -> bool {
    matches!(STATE.load(Ordering::Acquire), STARTING | RUNNING) || start()
}

/// Whether the running watcher is this process's, checked at most every [`PID_CHECK_NS`] (at
/// `now`, the paced launch's clock read). A child that ran no fork reset (a raw `clone` syscall:
/// no atfork handler) inherits "running" but not the thread, and its gates as they were; its
/// kernels run in its parent's context, so NVML shows them as the parent's and no watcher could
/// measure them: its paced launches are refused (each such launch compares `getpid` again).
#[inline]
pub(crate) fn is_own(now: u64) -> bool {
    now < NEXT_PID_CHECK.load(Ordering::Relaxed) || check_pid(now)
}

#[cold]
#[inline(never)]
fn check_pid(now: u64) -> bool {
    if PID.load(Ordering::Relaxed) != std::process::id() {
        NEXT_PID_CHECK.store(0, Ordering::Relaxed);
        crate::infra::log::log_refusal!(
            "this process did not run the fork handlers (a raw clone): its kernels cannot be \
             measured, so its capped launches are refused"
        );
        return false;
    }
    NEXT_PID_CHECK.store(now.saturating_add(PID_CHECK_NS), Ordering::Relaxed);
    true
}

#[cold]
#[inline(never)]
fn start() -> bool {
    // Before the thread exists, so a child forked at any moment after it never inherits "started".
    RESET.register();
    let mut deadline = None;
    let mut spawned_here = false;
    loop {
        match STATE.load(Ordering::Acquire) {
            STARTING | RUNNING => return true,
            RETRYING => {
                let until = *deadline.get_or_insert_with(|| std::time::Instant::now() + START_WAIT);
                if std::time::Instant::now() >= until {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            // It failed (again), possibly the thread this call spawned: the next launch retries.
            _ if spawned_here => return false,
            _ => {
                let retry = FAILED_ONCE.load(Ordering::Acquire);
                if retry && gate::monotonic_ns() < NEXT_RETRY.load(Ordering::Relaxed) {
                    return false;
                }
                let to = if retry { RETRYING } else { STARTING };
                if STATE
                    .compare_exchange(NOT_STARTED, to, Ordering::AcqRel, Ordering::Acquire)
                    .is_err()
                {
                    continue;
                }
                PID.store(std::process::id(), Ordering::Relaxed);
                spawned_here = true;
                let spawned = std::thread::Builder::new()
                    .name("vgpu-sm-watcher".into())
                    .spawn(run);
                if let Err(e) = spawned {
                    failed(format_args!("cannot start the SM watcher thread ({e})"));
                    return false;
                }
            }
        }
    }
}

/// The watcher could not start: said (at most once a second), remembered, and tried again by a
/// capped launch [`RETRY_NS`] later. (NVML that could not even be loaded stays missing: the
/// driver table caches a failed resolution, so then every paced launch is refused.)
fn failed(why: std::fmt::Arguments<'_>) {
    NEXT_RETRY.store(
        gate::monotonic_ns().saturating_add(RETRY_NS),
        Ordering::Relaxed,
    );
    FAILED_ONCE.store(true, Ordering::Release);
    STATE.store(NOT_STARTED, Ordering::Release);
    crate::infra::log::log_refusal!(
        "{why}; capped launches are refused until the SM cap can be enforced"
    );
}

/// Fork child: the thread did not survive the fork (registered when the thread is started).
static RESET: ChildReset = ChildReset::new(|| STATE.store(NOT_STARTED, Ordering::Relaxed));

/// Per-device measurement state.
#[derive(Debug)]
struct Device {
    handle: Handle,
    last_seen: u64,
    primed: bool,
    /// NVML's sampling period as observed (smallest gap between sample timestamps), µs.
    period_us: Option<u64>,
    controller: Controller,
    cap: u8,
    samples: Vec<ProcessSample>,
    /// Launches and "held back" since the last measurement that brought news.
    launches: u64,
    throttled: bool,
    measured_at: u64,
}

fn run() {
    let init = real::nvmlInit_v2();
    // SAFETY: nvmlInit_v2 takes no arguments; NVML is reference counted, never shut down here.
    if init.is_none_or(|f| unsafe { f() } != NVML_SUCCESS) {
        failed(format_args!(
            "NVML is unavailable, so device utilisation cannot be measured"
        ));
        return;
    }
    STATE.store(RUNNING, Ordering::Release);
    let host = hostpid::resolve();
    let own_pid = host.pid();
    match host {
        HostPid::Broker(p) => log_at!(INFO, "host PID {p} (from the node agent's broker)"),
        HostPid::HostNamespace(p) => log_at!(INFO, "host PID {p} (host PID namespace)"),
        HostPid::Unknown => log_at!(
            WARN,
            "host PID unknown (no broker at {}, not in the host PID namespace): the SM cap \
             counts the whole GPU's utilisation as this container's",
            vgpu_hostpid::CONTAINER_SOCKET
        ),
    }
    if let (Some(pid), Some(region)) = (own_pid, budget::registered_region())
        && let Some(slot) = region.slot_index()
    {
        region.layout().procs[slot]
            .hostpid
            .store(pid, Ordering::Release);
    }
    // Without a registered region the container's other processes cannot be seen (each would
    // count only itself, and N processes would get N caps): the device's utilisation stands in for
    // the container's, as without a host PID.
    let own_pid = match budget::registered_region() {
        Some(_) => own_pid,
        None => {
            if own_pid.is_some() {
                log_at!(
                    WARN,
                    "no usable shared region: the SM cap counts the whole GPU's utilisation as \
                     this container's"
                );
            }
            None
        }
    };
    let mut devices: [Option<Device>; MAX_DEVICES] = std::array::from_fn(|_| None);
    loop {
        std::thread::sleep(TICK);
        let now = gate::monotonic_ns();
        for (d, state) in devices.iter_mut().enumerate() {
            let cap = CAPS[d].load(Ordering::Relaxed);
            if cap == 0 {
                continue;
            }
            let (launches, throttled) = GATES[d].take_counts();
            if state.is_none() {
                if launches == 0 {
                    continue; // never launched here: nothing to measure
                }
                let Some(handle) = device_handle(d) else {
                    continue;
                };
                *state = Some(Device {
                    handle,
                    last_seen: 0,
                    primed: false,
                    period_us: None,
                    launches: 0,
                    throttled: false,
                    measured_at: now,
                    controller: Controller::new(cap),
                    cap,
                    samples: Vec::with_capacity(64),
                });
            }
            let Some(dev) = state.as_mut() else { continue };
            if dev.cap != cap {
                dev.cap = cap;
                dev.controller = Controller::new(cap);
            }
            dev.launches += launches;
            dev.throttled |= throttled;
            let was_primed = dev.primed;
            let Some((own, container)) = measure(dev, own_pid, now) else {
                if dev.primed && !was_primed {
                    // The priming answer's samples were discarded: count launches from here on,
                    // so that the first cost estimate divides matching quantities.
                    dev.launches = 0;
                    dev.measured_at = now;
                }
                continue;
            };
            write_sm_util(d, own);
            if !shared::capping_now(shared::region()) {
                // Not capping now (policy default, the monitor's switch off): the gate stays open
                // and the controller starts afresh when capping resumes.
                dev.controller = Controller::new(cap);
                dev.launches = 0;
                dev.throttled = false;
                dev.measured_at = now;
                GATES[d].set_step(0);
                continue;
            }
            let step = dev.controller.tick(&Measurement {
                window_ns: now.saturating_sub(dev.measured_at).max(1),
                own,
                container,
                launches: std::mem::take(&mut dev.launches),
                throttled: std::mem::take(&mut dev.throttled),
            });
            dev.measured_at = now;
            log_at!(
                DEBUG,
                "SM device {d}: own {:.1} % container {:.1} % cap {cap} % -> step {step} ns",
                own * 100.0,
                container * 100.0
            );
            GATES[d].set_step(step);
        }
    }
}

fn device_handle(index: usize) -> Option<Handle> {
    let f = real::nvmlDeviceGetHandleByIndex_v2()?;
    let mut h: Handle = std::ptr::null_mut();
    // SAFETY: valid out-pointer.
    (unsafe { f(index as c_uint, &mut h) } == NVML_SUCCESS).then_some(h)
}

/// (own share, container share) over the samples since the last call; `None` without news.
fn measure(dev: &mut Device, own_pid: Option<i32>, now: u64) -> Option<(f64, f64)> {
    let Some(own_pid) = own_pid else {
        // NVML averages the device's utilisation over about a second: feeding the controller
        // faster than that would make it act on stale data again and again.
        if now.saturating_sub(dev.measured_at) < DEVICE_WINDOW_NS {
            return None;
        }
        return device_utilisation(dev.handle).map(|u| (u, u));
    };
    let f = real::nvmlDeviceGetProcessUtilization()?;
    let mut rc;
    loop {
        let mut count = dev.samples.capacity().max(1) as c_uint;
        dev.samples.resize(count as usize, ProcessSample::default());
        // SAFETY: `samples` has `count` initialised elements; `count` is a valid in/out pointer.
        rc = unsafe {
            f(
                dev.handle,
                dev.samples.as_mut_ptr(),
                &mut count,
                dev.last_seen,
            )
        };
        if rc == NVML_ERROR_INSUFFICIENT_SIZE && (count as usize) > dev.samples.len() {
            dev.samples.reserve(count as usize - dev.samples.len());
            continue;
        }
        dev.samples.truncate(if rc == NVML_SUCCESS {
            count as usize
        } else {
            0
        });
        break;
    }
    if rc == NVML_ERROR_NOT_FOUND
        && dev.primed
        && let Some(period) = dev.period_us
        && realtime_us().saturating_sub(dev.last_seen) > 3 * period
    {
        // Several whole periods without a sample from anybody: the device was idle.
        return Some((0.0, 0.0));
    }
    if rc != NVML_SUCCESS {
        if rc != NVML_ERROR_NOT_FOUND {
            log_at!(WARN, "nvmlDeviceGetProcessUtilization failed ({rc})");
        }
        return None;
    }
    let since = dev.last_seen;
    let mut stamps: Vec<u64> = dev
        .samples
        .iter()
        .map(|s| s.time_stamp)
        .filter(|&t| t > since)
        .collect();
    stamps.sort_unstable();
    stamps.dedup();
    let &newest = stamps.last()?;
    dev.last_seen = newest;
    for pair in stamps.windows(2) {
        let gap = pair[1] - pair[0];
        dev.period_us = Some(dev.period_us.map_or(gap, |p| p.min(gap)));
    }
    if !dev.primed || since == 0 {
        dev.primed = true; // the first answer may hold old samples
        return None;
    }
    // NVML reports a sample per (period, process that ran in it): periods nobody ran in are
    // silent, so count the periods elapsed, not the samples received.
    let periods = dev.period_us.map_or(stamps.len() as f64, |p| {
        ((newest - since) as f64 / p as f64)
            .round()
            .max(stamps.len() as f64)
    });
    let mut per_pid: HashMap<u32, u64> = HashMap::new();
    for s in dev.samples.iter().filter(|s| s.time_stamp > since) {
        *per_pid.entry(s.pid).or_default() += u64::from(s.sm_util.min(100));
    }
    let share = |pid: i32| {
        per_pid
            .get(&(pid as u32))
            .map_or(0.0, |&sum| sum as f64 / periods / 100.0)
    };
    let own = share(own_pid);
    let mut container = own;
    if let Some(region) = budget::registered_region() {
        let me = region.slot_index();
        let r = region.layout();
        for (i, slot) in r.procs[..region.proc_num()].iter().enumerate() {
            if Some(i) == me || slot.status.load(Ordering::Acquire) == SLOT_STATUS_EXITED {
                continue;
            }
            let pid = slot.hostpid.load(Ordering::Acquire);
            if pid > 0 && pid != own_pid {
                container += share(pid);
            }
        }
    }
    Some((own, container.min(1.0)))
}

fn device_utilisation(handle: Handle) -> Option<f64> {
    let f = real::nvmlDeviceGetUtilizationRates()?;
    let mut u = Utilization::default();
    // SAFETY: valid out-pointer.
    (unsafe { f(handle, &mut u) } == NVML_SUCCESS).then(|| f64::from(u.gpu.min(100)) / 100.0)
}

fn write_sm_util(dev: usize, own: f64) {
    if let Some(region) = budget::registered_region()
        && let Some(slot) = region.slot_index()
    {
        region.layout().procs[slot].device_util[dev]
            .sm_util
            .store((own * 100.0).round() as u64, Ordering::Relaxed);
    }
}

/// `CLOCK_REALTIME` in µs (NVML's sample timestamps).
fn realtime_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}
