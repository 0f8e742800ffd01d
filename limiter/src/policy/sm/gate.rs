//! The launch gate of one device: launches of this process are spaced `step_ns` apart on average
//! (a GCRA / virtual-scheduling token bucket), with a little slack either way so that bursts up to
//! a few milliseconds pass untouched and sleeps are never shorter than the OS can honour.
//!
//! Lock-free: a launch reads the step (one atomic load; 0 = open, nothing else happens), counts
//! itself, reads the monotonic clock and reserves its slot with a CAS on the theoretical arrival
//! time. Only a launch whose slot lies more than [`AHEAD_NS`] in the future sleeps, and it notes
//! that it did (the controller's "held back" input).
//!
//! **Probing.** A gate starts (and restarts after a fork) in the probing state: until the watcher's
//! first measurement sets a step, [`PROBE_LAUNCHES`] launches pass and then one per
//! [`PROBE_STEP_NS`], the spacing doubling with each launch up to [`PROBE_MAX_STEP_NS`].
//! Launches are asynchronous: unpaced, a process that does not synchronise would queue about a
//! second of kernels (the driver's launch queue) before anything is measured, and that backlog
//! would run uncapped whatever the gate did next. The probe keeps the backlog to what its launches
//! cost, and gives the first measurement a cost per launch that is the GPU's, not the queue's. The
//! probe is short and its spacing grows because nothing yet says what a launch costs: 32 launches
//! and then one per 10 ms let kernels of 20 ms queue about 0.75 s of work before NVML's first
//! sample, which two such tenants then ran side by side, uncapped, for 1.5 s. Where the first
//! measurement covers a whole second (the device-wide fallback) the probe is patient
//! ([`Gate::probe_patiently`]): backed off, it would be too little for NVML's whole percents.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// How far ahead of now a launch may reserve without waiting.
pub(crate) const AHEAD_NS: u64 = 2_000_000;
/// Credit an idle process may bank for a later burst.
pub(crate) const BURST_NS: u64 = 2_000_000;
/// Launches a probing gate lets through at once.
pub(crate) const PROBE_LAUNCHES: u64 = 8;
/// Spacing of a probing gate's first launch after [`PROBE_LAUNCHES`] (it doubles with each later
/// launch up to [`PROBE_MAX_STEP_NS`]; a patient probe keeps it).
pub(crate) const PROBE_STEP_NS: u64 = 10_000_000;
/// The longest spacing of a probing gate: 4 × [`PROBE_STEP_NS`].
pub(crate) const PROBE_MAX_STEP_NS: u64 = PROBE_STEP_NS << 2;
/// Longest uninterrupted sleep of a held-back launch.
pub(crate) const SLEEP_SLICE_NS: u64 = 20_000_000;
/// The step of a probing gate (no step has been set since it started).
const PROBING: u64 = u64::MAX;

#[derive(Debug)]
pub(crate) struct Gate {
    step_ns: AtomicU64,
    /// Theoretical arrival time (monotonic ns) of the next launch.
    tat_ns: AtomicU64,
    launches: AtomicU64,
    /// Launches while probing.
    probed: AtomicU64,
    /// Probe at [`PROBE_STEP_NS`] without backing off (see [`Gate::probe_patiently`]).
    patient: AtomicBool,
    /// Bumped when the step shortens a lot: launches sleeping on the old step stop sleeping.
    epoch: AtomicU64,
    waited: AtomicBool,
}

impl Gate {
    pub(crate) const fn new() -> Self {
        Self {
            step_ns: AtomicU64::new(PROBING),
            tat_ns: AtomicU64::new(0),
            launches: AtomicU64::new(0),
            probed: AtomicU64::new(0),
            patient: AtomicBool::new(false),
            epoch: AtomicU64::new(0),
            waited: AtomicBool::new(false),
        }
    }

    /// Sets the spacing (0 opens the gate); ends probing. When the step shortens to half or less,
    /// reservations made on the old one are forgotten and launches sleeping on them wake (see
    /// [`Gate::sleep`]): a step that grew long while a backlog drained must not keep a launch
    /// asleep for seconds after the GPU has gone idle.
    pub(crate) fn set_step(&self, step_ns: u64) {
        let old = match self.step_ns.swap(step_ns, Ordering::Relaxed) {
            // Reservations made while probing were spaced by the probe's steps, at most this.
            PROBING if self.patient.load(Ordering::Relaxed) => PROBE_STEP_NS,
            PROBING => PROBE_MAX_STEP_NS,
            old => old,
        };
        if step_ns.saturating_mul(2) <= old {
            let now = monotonic_ns();
            let _ = self
                .tat_ns
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |tat| {
                    Some(tat.min(now.saturating_add(step_ns)))
                });
            self.epoch.fetch_add(1, Ordering::Release);
        }
    }

    /// The gate's epoch, bumped when the step shortens a lot: read it before [`Gate::admit`] and
    /// pass it to [`Gate::sleep`]. Read after, a step set between the reservation and the read
    /// would go unseen and the launch would sleep out a reservation the gate has forgotten.
    #[inline]
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Sleeps `wait_ns` as [`Gate::admit`] told, in slices of at most [`SLEEP_SLICE_NS`],
    /// returning early when the step has shortened a lot since `epoch` ([`Gate::epoch`], read
    /// before the launch was admitted). A launch still asleep after a slice counts as held back.
    pub(crate) fn sleep(&self, wait_ns: u64, epoch: u64) {
        let mut left = wait_ns;
        while left > 0 {
            let slice = left.min(SLEEP_SLICE_NS);
            std::thread::sleep(std::time::Duration::from_nanos(slice));
            left -= slice;
            if left > 0 {
                if self.epoch.load(Ordering::Acquire) != epoch {
                    return;
                }
                self.waited.store(true, Ordering::Relaxed);
            }
        }
    }

    /// Launches since the last call, and whether any of them waited.
    pub(crate) fn take_counts(&self) -> (u64, bool) {
        (
            self.launches.swap(0, Ordering::Relaxed),
            self.waited.swap(false, Ordering::Relaxed),
        )
    }

    /// Counts a launch that is not paced (the policy does not cap right now).
    #[inline]
    pub(crate) fn count(&self) {
        self.launches.fetch_add(1, Ordering::Relaxed);
    }

    /// Admits one launch at monotonic time `now`; returns how long the caller must wait first.
    #[inline]
    pub(crate) fn admit(&self, now: u64) -> u64 {
        self.launches.fetch_add(1, Ordering::Relaxed);
        let mut step = self.step_ns.load(Ordering::Relaxed);
        if step == 0 {
            return 0;
        }
        if step == PROBING {
            let n = self.probed.fetch_add(1, Ordering::Relaxed);
            if n < PROBE_LAUNCHES {
                return 0;
            }
            step = if self.patient.load(Ordering::Relaxed) {
                PROBE_STEP_NS
            } else {
                probe_step(n - PROBE_LAUNCHES)
            };
        }
        let mut tat = self.tat_ns.load(Ordering::Relaxed);
        let start = loop {
            let start = tat.max(now.saturating_sub(BURST_NS));
            match self.tat_ns.compare_exchange_weak(
                tat,
                start.saturating_add(step),
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => break start,
                Err(actual) => tat = actual,
            }
        };
        let wait = start.saturating_sub(now.saturating_add(AHEAD_NS));
        if wait > 0 {
            self.waited.store(true, Ordering::Relaxed);
        }
        wait
    }

    /// The first measurement will cover a second (the device-wide fallback, see `watcher.rs`):
    /// the probe keeps its first spacing instead of backing off, or a second of a backed-off probe
    /// would be a few percent of the GPU, a cost per launch NVML's whole percents cannot tell
    /// (a cap of 30 held at 46 %).
    pub(crate) fn probe_patiently(&self) {
        self.patient.store(true, Ordering::Relaxed);
    }

    /// Forgets everything and probes again (fork child). Atomics only.
    pub(crate) fn reset(&self) {
        self.patient.store(false, Ordering::Relaxed);
        self.step_ns.store(PROBING, Ordering::Relaxed);
        self.tat_ns.store(0, Ordering::Relaxed);
        self.launches.store(0, Ordering::Relaxed);
        self.probed.store(0, Ordering::Relaxed);
        self.epoch.fetch_add(1, Ordering::Relaxed);
        self.waited.store(false, Ordering::Relaxed);
    }
}

/// The spacing of the `k`-th launch after a probing gate's first [`PROBE_LAUNCHES`].
fn probe_step(k: u64) -> u64 {
    PROBE_MAX_STEP_NS.min(PROBE_STEP_NS << k.min(2))
}

/// `CLOCK_MONOTONIC` in ns (vDSO, no syscall).
#[inline]
pub(crate) fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_gate_probes_then_spaces_launches_by_the_probe_step() {
        let g = Gate::new();
        let now = 10_000_000_000;
        for _ in 0..PROBE_LAUNCHES {
            assert_eq!(g.admit(now), 0);
        }
        assert_eq!(g.take_counts(), (PROBE_LAUNCHES, false));
        // Then spaced by the probe's step, doubling up to its longest, after the usual slack.
        let waits: Vec<u64> = (0..8).map(|_| g.admit(now)).collect();
        assert_eq!(waits[0], 0);
        let gaps: Vec<u64> = waits.windows(2).skip(1).map(|w| w[1] - w[0]).collect();
        assert_eq!(
            gaps,
            [2, 4, 4, 4, 4, 4].map(|m| m * PROBE_STEP_NS),
            "waits {waits:?}"
        );
        assert!(g.take_counts().1, "the probe held launches back");
        // A step from the watcher ends probing.
        g.set_step(0);
        assert_eq!(g.admit(now), 0);
        g.reset();
        assert_eq!(g.step_ns.load(Ordering::Relaxed), PROBING);
    }

    #[test]
    fn a_patient_probe_keeps_its_first_spacing_until_a_fork_resets_it() {
        let g = Gate::new();
        g.probe_patiently();
        let now = 10_000_000_000;
        for _ in 0..PROBE_LAUNCHES {
            assert_eq!(g.admit(now), 0);
        }
        let waits: Vec<u64> = (0..6).map(|_| g.admit(now)).collect();
        let gaps: Vec<u64> = waits.windows(2).skip(1).map(|w| w[1] - w[0]).collect();
        assert_eq!(gaps, [PROBE_STEP_NS; 4], "waits {waits:?}");
        g.reset();
        assert!(!g.patient.load(Ordering::Relaxed));
    }

    #[test]
    fn the_first_step_forgets_the_probe_s_reservations_only_when_much_shorter_than_them() {
        // Backed off, the probe spaced launches up to 40 ms apart: a 15 ms step is much shorter.
        let g = Gate::new();
        let e = g.epoch();
        g.set_step(15_000_000);
        assert_ne!(g.epoch(), e);
        // A patient probe spaced them 10 ms apart: 15 ms is not, 5 ms is.
        let g = Gate::new();
        g.probe_patiently();
        let e = g.epoch();
        g.set_step(15_000_000);
        assert_eq!(g.epoch(), e);
        let g = Gate::new();
        g.probe_patiently();
        let e = g.epoch();
        g.set_step(5_000_000);
        assert_ne!(g.epoch(), e);
    }

    #[test]
    fn a_step_set_between_a_reservation_and_its_sleep_still_wakes_it() {
        static G: Gate = Gate::new();
        G.set_step(10_000_000_000); // 10 s
        let now = monotonic_ns();
        G.admit(now);
        let epoch = G.epoch(); // read before the launch was admitted
        let wait = G.admit(now);
        assert!(wait > 1_000_000_000, "far ahead: {wait}");
        G.set_step(1_000_000); // before the launch goes to sleep
        let t = std::time::Instant::now();
        G.sleep(wait, epoch);
        assert!(
            t.elapsed() < std::time::Duration::from_secs(1),
            "slept {:?}",
            t.elapsed()
        );
    }

    #[test]
    fn a_much_shorter_step_forgets_reservations_and_wakes_sleepers() {
        let g = Gate::new();
        g.set_step(10_000_000_000); // 10 s
        let now = monotonic_ns();
        for _ in 0..3 {
            g.admit(now);
        }
        assert!(g.admit(now) > 1_000_000_000, "far ahead");
        let epoch = g.epoch.load(Ordering::Relaxed);
        g.set_step(1_000_000); // 1 ms: the next launch waits at most about one new step
        assert_ne!(g.epoch.load(Ordering::Relaxed), epoch);
        assert!(g.admit(monotonic_ns()) <= 1_000_000);
        // A slightly shorter step keeps the reservations.
        let epoch = g.epoch.load(Ordering::Relaxed);
        g.set_step(800_000);
        assert_eq!(g.epoch.load(Ordering::Relaxed), epoch);
    }

    #[test]
    fn a_sleeping_launch_wakes_when_the_step_shortens() {
        static G: Gate = Gate::new();
        G.set_step(10_000_000_000);
        let t = std::time::Instant::now();
        let sleeper = std::thread::spawn(|| G.sleep(5_000_000_000, G.epoch()));
        std::thread::sleep(std::time::Duration::from_millis(50));
        G.set_step(1_000_000);
        sleeper.join().expect("sleeper");
        // Generous bound (a loaded CI box): far below the 5 s it was told to sleep.
        assert!(
            t.elapsed() < std::time::Duration::from_secs(2),
            "{:?}",
            t.elapsed()
        );
        assert!(G.take_counts().1, "counted as held back while asleep");
    }

    #[test]
    fn an_open_gate_only_counts() {
        let g = Gate::new();
        g.set_step(0);
        for _ in 0..10 {
            assert_eq!(g.admit(1_000), 0);
        }
        assert_eq!(g.take_counts(), (10, false));
        assert_eq!(g.take_counts(), (0, false));
    }

    #[test]
    fn launches_are_spaced_by_the_step_after_the_slack() {
        let g = Gate::new();
        g.set_step(1_000_000); // 1 ms
        let now = 10_000_000_000;
        // Banked burst (2 ms) + reservable slack (2 ms) pass at once: 4 or 5 launches.
        let free = (0..10).take_while(|_| g.admit(now) == 0).count();
        assert!((4..=5).contains(&free), "{free}");
        let (n, waited) = g.take_counts();
        assert_eq!(n as usize, free + 1);
        assert!(waited);
        // The next ones wait one more step each.
        let w1 = g.admit(now);
        let w2 = g.admit(now);
        assert_eq!(w2 - w1, 1_000_000);
    }

    #[test]
    fn long_run_rate_is_one_launch_per_step() {
        let g = Gate::new();
        g.set_step(250_000);
        let mut now = 5_000_000_000u64;
        let start = now;
        for _ in 0..10_000 {
            now += g.admit(now); // the caller sleeps exactly as told
        }
        let elapsed = now - start;
        let expected = 10_000 * 250_000 - BURST_NS - AHEAD_NS;
        assert!(
            elapsed.abs_diff(expected) <= 250_000,
            "{elapsed} vs {expected}"
        );
    }
}
