//! The per-process SM watcher thread: started by the first capped launch, it resolves the host
//! PID, then measures each capped device through NVML just after each of NVML's sample periods
//! ends (at most every [`TICK`]) and sets its gate's spacing.
//!
//! Measurement: `nvmlDeviceGetProcessUtilization(device, …, lastSeen)` answers, as real drivers
//! do (printed answers in nvtop#110 and go-nvml#51, NVML's header), **one entry per process**
//! that ran since `lastSeen`: stamped with its newest record, its `smUtil` averaged over the
//! sample periods it ran in. Polled just after each period ends, an answer covers one period
//! and the average is that period's share. A process's share over a span is its entry's `smUtil`
//! (entries of one process averaged, for a driver that answers more), taken to hold for every
//! period of the span — the larger reading of an average "over the periods it ran in", so a late
//! poll never under-counts; the first span, from the first launch to inside a period, counts the
//! periods that ended after it. The container's share is the sum over the container's host PIDs
//! (every live slot of the shared region that has one — each process writes its own). NVML's
//! period (`period.rs`) is learnt from the newest stamps of successive polls. A query that brings
//! no new sample carries no information and changes nothing. The launches of a span are read from
//! a log of the launch counter at each poll,
//! at the span's two ends. Without a host PID (see `hostpid.rs`), or without a usable shared
//! region (the other processes of the container cannot be seen), the device's overall utilisation
//! stands in for both, once a second: the cap holds, at the price of over-throttling on a shared
//! GPU.
//!
//! It writes this process's share (percent) into its slot's `device_util[i].sm_util` at each
//! measurement, for the monitor and the metrics.

use crate::driver::ffi::{Handle, NVML_SUCCESS, NvmlReturn, ProcessSample, Utilization};
use crate::driver::table::real;
use crate::infra::config::MAX_DEVICES;
use crate::infra::fork::ChildReset;
use crate::infra::imports;
use crate::infra::log::{DEBUG, INFO, WARN, log_at};
use crate::policy::budget;
use crate::policy::sm::controller::{Controller, Measurement};
use crate::policy::sm::gate;
use crate::policy::sm::hostpid::{self, HostPid};
use crate::policy::sm::period::SamplePeriod;
use crate::policy::sm::shared::{self, CAPS, GATES};
use std::collections::{HashMap, VecDeque};
use std::ffi::c_uint;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;
use vgpu_region::layout::SLOT_STATUS_EXITED;

/// Longest sleep between two polls (the control period when NVML's sampling period is unknown).
const TICK: Duration = Duration::from_millis(100);

/// How often the device-wide fallback measurement is used (NVML's averaging window).
const DEVICE_WINDOW_US: u64 = 1_000_000;

const NVML_ERROR_NOT_FOUND: NvmlReturn = 6;
const NVML_ERROR_INSUFFICIENT_SIZE: NvmlReturn = 7;

const NOT_STARTED: u8 = 0;
/// The thread is being spawned or is bringing NVML up, the first time: launches pass meanwhile (the
/// gate probes until the watcher's first measurement anyway, see `gate.rs`).
const STARTING: u8 = 1;
/// NVML is up: the thread measures and sets the gates.
const RUNNING: u8 = 2;
/// Being started again after a failure: launches wait for it ([`START_WAIT`] at most).
const RETRYING: u8 = 3;

static STATE: AtomicU8 = AtomicU8::new(NOT_STARTED);
/// The process the watcher was started in (`getpid`).
static PID: AtomicU32 = AtomicU32::new(0);
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
                // Non-zero once a start failed: from then on a start is a `RETRYING` one.
                let next_retry = NEXT_RETRY.load(Ordering::Acquire);
                let retry = next_retry != 0;
                if retry && gate::monotonic_ns() < next_retry {
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
                // No thread without libpthread's functions (glibc < 2.34, a process that did not
                // load it at start: `infra/imports.rs`): a failed start, so paced launches are refused.
                if !imports::threads() {
                    failed(format_args!(
                        "cannot start the SM watcher thread (glibc < 2.34 and libpthread.so.0 \
                         not loaded by this process)"
                    ));
                    return false;
                }
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
        Ordering::Release,
    );
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
    /// Newest sample timestamp used (µs since the epoch); before the first measurement, the
    /// moment the device's first launch may have happened (the span measured starts here).
    last_seen: u64,
    /// Whether a measurement has been made (the first one may cover part of a period).
    measured: bool,
    /// NVML's sampling period, learnt from the gaps between its samples.
    period: SamplePeriod,
    /// The newest sample stamp any query returned (µs; 0 = none yet).
    newest_seen: u64,
    controller: Controller,
    cap: u8,
    samples: Vec<ProcessSample>,
    /// (realtime µs, launches so far) at each poll: the launches in a measured span are read
    /// from it at the span's ends, so the cost per launch divides matching quantities.
    launch_log: VecDeque<(u64, u64)>,
    launches: u64,
    /// "Held back" since the last measurement that brought news.
    throttled: bool,
    /// Realtime µs of the last measurement that brought news (device-wide fallback only).
    measured_at_us: u64,
    created_us: u64,
    /// NVML's answer to the last query.
    last_rc: NvmlReturn,
    /// No sample from anybody for several periods: poll at the slow pace until one comes.
    idle: bool,
}

impl Device {
    /// Launches counted up to realtime `t_us` (linear between polls).
    fn launches_at(&self, t_us: u64) -> u64 {
        let mut before = (0, 0);
        for &(at, n) in &self.launch_log {
            if at >= t_us {
                if at == before.0 || before == (0, 0) {
                    return n;
                }
                let frac = (t_us - before.0) as f64 / (at - before.0) as f64;
                return before.1 + ((n - before.1) as f64 * frac) as u64;
            }
            before = (at, n);
        }
        self.launches
    }

    /// Forgets the launch log before `t_us` (keeping the entry at or before it).
    fn prune_log(&mut self, t_us: u64) {
        while self.launch_log.len() > 2 && self.launch_log[1].0 <= t_us {
            self.launch_log.pop_front();
        }
        while self.launch_log.len() > LAUNCH_LOG {
            self.launch_log.pop_front();
        }
    }

    /// Whether the gate should stop probing although nothing has been measured: NVML answers
    /// with an error (no process samples here, e.g. a MIG device: the cap cannot be enforced
    /// anyway), its launches left no sample at all for a while (they take no measurable time),
    /// or a measurement takes too long.
    fn probe_over(&self, now_us: u64) -> bool {
        let waited = now_us.saturating_sub(self.created_us);
        self.last_rc != NVML_SUCCESS && self.last_rc != NVML_ERROR_NOT_FOUND
            || self.last_rc == NVML_ERROR_NOT_FOUND && waited > NO_SAMPLE_US
            || waited > PROBE_TIMEOUT_US
    }

    /// When the next sample is expected (realtime µs), if the sampling period is known.
    fn next_sample_due(&self) -> Option<u64> {
        let period = self.period.get()?;
        (self.measured && !self.idle).then(|| self.last_seen + period + SAMPLE_MARGIN_US)
    }
}

/// Most polls kept in a device's launch log (one period or a few back are all that is read).
const LAUNCH_LOG: usize = 256;
/// Poll this long after a sample period is due to end: the driver records it when it ends.
const SAMPLE_MARGIN_US: u64 = 2_000;
/// How often to ask while a sample is awaited (first samples, a late sample).
const FAST_POLL: Duration = Duration::from_millis(10);
/// A gate probes (see `gate.rs`) at most this long without a measurement,
const PROBE_TIMEOUT_US: u64 = 1_000_000;
/// or this long while NVML has no sample at all.
const NO_SAMPLE_US: u64 = 300_000;
/// Fast polling for a first sample lasts at most this long after a device's first launch.
const FIRST_SAMPLE_WINDOW_US: u64 = 2_000_000;

fn run() {
    let started_us = realtime_us();
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
    // The launch that started this thread happened just before it: the first poll is at once.
    let mut previous_poll_us = started_us.saturating_sub(1_000);
    loop {
        let now_us = realtime_us();
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
                    GATES[d].set_step(0); // not measurable: do not probe for ever
                    continue;
                };
                if own_pid.is_none() {
                    GATES[d].probe_patiently(); // measured once a second
                }
                let dev = Device {
                    handle,
                    // Its first launch came after the previous poll.
                    last_seen: previous_poll_us,
                    measured: false,
                    period: SamplePeriod::new(),
                    newest_seen: 0,
                    launch_log: VecDeque::from([(previous_poll_us, 0)]),
                    launches: 0,
                    throttled: false,
                    measured_at_us: previous_poll_us,
                    created_us: previous_poll_us,
                    last_rc: NVML_SUCCESS,
                    idle: false,
                    controller: Controller::new(cap),
                    cap,
                    samples: Vec::with_capacity(64),
                };
                *state = Some(dev);
            }
            let Some(dev) = state.as_mut() else { continue };
            if dev.cap != cap {
                dev.cap = cap;
                dev.controller = Controller::new(cap);
            }
            dev.launches += launches;
            dev.launch_log.push_back((now_us, dev.launches));
            dev.throttled |= throttled;
            let Some(span) = measure(dev, own_pid, now_us) else {
                if !dev.measured && dev.probe_over(now_us) {
                    // Nothing to measure yet: stop probing (see `Device::probe_over`).
                    GATES[d].set_step(dev.controller.step_ns());
                }
                continue;
            };
            let window_launches = dev
                .launches_at(span.to_us)
                .saturating_sub(dev.launches_at(span.from_us));
            dev.prune_log(span.to_us);
            write_sm_util(d, span.own);
            if !shared::capping_now(shared::region()) {
                // Not capping now (policy default, the monitor's switch off): the gate stays open
                // and the controller starts afresh when capping resumes.
                dev.controller = Controller::new(cap);
                dev.throttled = false;
                GATES[d].set_step(0);
                continue;
            }
            let step = dev.controller.tick(&Measurement {
                window_ns: span.to_us.saturating_sub(span.from_us).max(1) * 1_000,
                own: span.own,
                container: span.container,
                device: span.device,
                launches: window_launches,
                throttled: std::mem::take(&mut dev.throttled),
            });
            log_at!(
                DEBUG,
                "SM device {d}: span {} ms launches {window_launches} own {:.1} % container {:.1} % cap {cap} % -> step {step} ns",
                (span.to_us - span.from_us) / 1000,
                span.own * 100.0,
                span.container * 100.0
            );
            GATES[d].set_step(step);
        }
        previous_poll_us = now_us;
        std::thread::sleep(next_poll(&devices, started_us, now_us));
    }
}

/// How long to sleep before the next poll: until just after the next sample of a device is due,
/// polling fast while a first or late sample is awaited, and at most [`TICK`].
fn next_poll(devices: &[Option<Device>], started_us: u64, now_us: u64) -> Duration {
    let mut wait_us = TICK.as_micros() as u64;
    let fast = FAST_POLL.as_micros() as u64;
    for (d, state) in devices.iter().enumerate() {
        if CAPS[d].load(Ordering::Relaxed) == 0 {
            continue;
        }
        let want = match state {
            // A capped device with no launch yet, early in the process: its first launch may come.
            None => (now_us < started_us + FIRST_SAMPLE_WINDOW_US).then_some(fast),
            Some(dev) => match (dev.next_sample_due(), dev.period.get()) {
                (Some(due), _) if due > now_us => Some(due - now_us),
                // Late (up to a few periods; longer: the device went idle).
                (Some(due), Some(period)) if now_us < due + 3 * period => Some(fast),
                (Some(_), _) => None,
                // No measurement yet: poll fast for the first samples.
                (None, _) => (now_us < dev.created_us + FIRST_SAMPLE_WINDOW_US).then_some(fast),
            },
        };
        if let Some(w) = want {
            wait_us = wait_us.min(w);
        }
    }
    Duration::from_micros(wait_us.max(1_000))
}

fn device_handle(index: usize) -> Option<Handle> {
    let f = real::nvmlDeviceGetHandleByIndex_v2()?;
    let mut h: Handle = std::ptr::null_mut();
    // SAFETY: valid out-pointer.
    (unsafe { f(index as c_uint, &mut h) } == NVML_SUCCESS).then_some(h)
}

/// What one measurement covered: shares of the device's time over `[from_us, to_us]`
/// (realtime µs).
#[derive(Debug, Clone, Copy)]
struct Span {
    own: f64,
    container: f64,
    device: f64,
    from_us: u64,
    to_us: u64,
}

/// `nvmlDeviceGetProcessUtilization` for the samples newer than `dev.last_seen` into
/// `dev.samples`; returns NVML's code.
fn query(dev: &mut Device) -> NvmlReturn {
    let Some(f) = real::nvmlDeviceGetProcessUtilization() else {
        return NVML_ERROR_NOT_FOUND;
    };
    loop {
        let mut count = dev.samples.capacity().max(1) as c_uint;
        dev.samples.resize(count as usize, ProcessSample::default());
        // SAFETY: `samples` has `count` initialised elements; `count` is a valid in/out pointer.
        let rc = unsafe {
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
        return rc;
    }
}

/// Drops the entries a driver should not return (seen on real ones next to zombie processes:
/// pid 0, shares above 100 %, stamps older than asked for); `false` if nothing else was there: the
/// answer is then "nothing new" (junk that keeps coming must not hide idle periods).
fn keep_real_entries(samples: &mut Vec<ProcessSample>, since: u64) -> bool {
    samples.retain(|s| s.pid != 0 && s.sm_util <= 100 && s.time_stamp > since);
    !samples.is_empty()
}

/// After an answer of "nothing new" at `now_us`, the µs since the last sample (`last_seen`) that
/// nobody ran in: the whole periods whose records would be visible by now (stamps are less than
/// a quarter period late), so that `last_seen` stays a period's end; 0 if none has passed. They
/// are counted as idle at once, or the next entry's average (over the periods its process ran
/// in) would be taken to hold for them too.
fn idle_since(last_seen: u64, now_us: u64, period: u64) -> u64 {
    now_us.saturating_sub(last_seen).saturating_sub(period / 4) / period * period
}

/// Own and container share over the samples since the last measurement; `None` without news.
fn measure(dev: &mut Device, own_pid: Option<i32>, now_us: u64) -> Option<Span> {
    let Some(own_pid) = own_pid else {
        // NVML averages the device's utilisation over about a second: feeding the controller
        // faster than that would make it act on stale data again and again.
        if now_us.saturating_sub(dev.measured_at_us) < DEVICE_WINDOW_US {
            return None;
        }
        let u = device_utilisation(dev.handle)?;
        let from_us = std::mem::replace(&mut dev.measured_at_us, now_us);
        return Some(Span {
            own: u,
            container: u,
            device: u,
            from_us,
            to_us: now_us,
        });
    };
    let mut rc = query(dev);
    let since = dev.last_seen;
    if rc == NVML_SUCCESS && !keep_real_entries(&mut dev.samples, since) {
        rc = NVML_ERROR_NOT_FOUND;
    }
    let repeated = rc == dev.last_rc;
    dev.last_rc = rc;
    if rc == NVML_ERROR_NOT_FOUND
        && dev.measured
        && let Some(period) = dev.period.get()
        && let idle = idle_since(dev.last_seen, now_us, period)
        && idle > 0
    {
        let from_us = dev.last_seen;
        dev.last_seen += idle;
        dev.idle = now_us - from_us > 3 * period;
        return Some(Span {
            own: 0.0,
            container: 0.0,
            device: 0.0,
            from_us,
            to_us: dev.last_seen,
        });
    }
    if rc != NVML_SUCCESS {
        // Once per change of answer, not at every poll (every 10-100 ms, for the process's life).
        if rc != NVML_ERROR_NOT_FOUND && !repeated {
            log_at!(
                WARN,
                "nvmlDeviceGetProcessUtilization failed ({rc}): this device's SM use cannot be \
                 measured, so its SM cap is not enforced"
            );
        }
        return None;
    }
    let newest = dev.samples.iter().map(|s| s.time_stamp).max()?;
    dev.idle = false;
    // The period is learnt from the newest sample of successive queries (polls come at least
    // every TICK, more often than samples): within one query, the entries of different processes
    // are each one's newest record, not successive samples.
    if dev.newest_seen != 0 && newest > dev.newest_seen {
        dev.period.note(dev.newest_seen, newest);
    }
    dev.newest_seen = dev.newest_seen.max(newest);
    // Without the period a share cannot be turned into busy time: wait for a second sample
    // (the next query returns these processes again, as `last_seen` stays).
    let period = dev.period.get()?;
    // The first measurement starts at the first launch, maybe late in a period: wait until it
    // covers half a period at least, so that one short period does not set the first step.
    if !dev.measured && newest.saturating_sub(since) < period / 2 {
        return None;
    }
    dev.last_seen = newest;
    let first = !std::mem::replace(&mut dev.measured, true);
    // NVML's answer (see the module doc): one entry per process that ran since `since`, its
    // share averaged over the sample periods it ran in. (A driver that answered one entry per
    // sample instead gets the same treatment: the entries of a process are averaged.)
    let mut per_pid: HashMap<u32, (u64, u64)> = HashMap::new();
    for s in &dev.samples {
        let e = per_pid.entry(s.pid).or_default();
        e.0 += u64::from(s.sm_util);
        e.1 += 1;
    }
    // Each process is taken to have run in every period of the span: the larger reading of an
    // average over "the periods it ran in", so a measurement never under-counts (when polls come
    // on time, a span is one period and there is nothing to choose). Later measurements start
    // at a sample and cover whole periods (stamps are late by a varying amount, less than half
    // a period: rounding removes it); the first starts at the first launch, inside a period, and
    // covers the periods that ended after it: for this process, which started inside it, that
    // many periods' worth of its average over the span (`coverage` ≥ 1); the others ran before
    // it began and are counted at their average.
    let elapsed = newest - since;
    let (periods, span_us) = if first {
        (elapsed.div_ceil(period).max(1), elapsed.max(1))
    } else {
        let periods = ((elapsed + period / 2) / period).max(1);
        (periods, periods * period)
    };
    let coverage = (periods * period) as f64 / span_us as f64;
    let average = |&(sum, n): &(u64, u64)| sum as f64 / n as f64 / 100.0;
    let share = |pid: i32| per_pid.get(&(pid as u32)).map_or(0.0, average);
    let own_entry = per_pid.get(&(own_pid as u32)).map_or(0.0, average);
    let own = (own_entry * coverage).min(1.0);
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
    // The device's share, which only tells the controller whether the GPU was full (its kernels
    // may then be queued, not run): the upper reading, every process scaled like this one (on
    // the first span others may have started inside it too; a false "full" costs a tick or two
    // of held launches, a missed one lets a queue of seconds build up).
    let device = (per_pid.values().map(average).sum::<f64>() * coverage).max(own);
    Some(Span {
        own,
        container: container.min(1.0),
        device: device.clamp(container.min(1.0), 1.0),
        from_us: since,
        to_us: newest,
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = 166_667;

    #[test]
    fn periods_nobody_ran_in_are_idle_once_their_records_would_be_visible() {
        let last = 1_700_000_000_000_000;
        // Within the next period, or before its record can have come (a quarter late): nothing.
        assert_eq!(idle_since(last, last + P / 2, P), 0);
        assert_eq!(idle_since(last, last + P + P / 4 - 1, P), 0);
        // One period later than its record could be: that period was idle (the old rule waited
        // for three, and the next entry's average was taken to hold for them).
        assert_eq!(idle_since(last, last + P + P / 4, P), P);
        assert_eq!(idle_since(last, last + 2 * P + P / 4, P), 2 * P);
        assert_eq!(idle_since(last, last + 3 * P, P), 2 * P);
        // A clock that went back counts nothing.
        assert_eq!(idle_since(last, last - 5, P), 0);
    }

    fn entry(pid: u32, time_stamp: u64, sm_util: u32) -> ProcessSample {
        ProcessSample {
            pid,
            time_stamp,
            sm_util,
            ..ProcessSample::default()
        }
    }

    #[test]
    fn junk_entries_are_dropped_and_an_answer_of_only_junk_is_nothing_new() {
        let since = 1_700_000_000_000_000;
        // As a real driver printed next to zombies (nvtop#110): a pid at 37,100 %, zeros.
        let junk = [entry(50554, 49_936, 37_100), entry(0, 0, 0), entry(0, 0, 0)];
        let mut only_junk = junk.to_vec();
        assert!(!keep_real_entries(&mut only_junk, since));
        let real = entry(4242, since + P, 30);
        let mut mixed = junk.to_vec();
        mixed.insert(1, real);
        // An entry older than asked for, and one above 100 %, are junk too.
        mixed.push(entry(4243, since, 20));
        mixed.push(entry(4244, since + P, 101));
        assert!(keep_real_entries(&mut mixed, since));
        assert_eq!(mixed.len(), 1);
        assert_eq!((mixed[0].pid, mixed[0].sm_util), (4242, 30));
    }
}
