//! The launch gate of one device: launches of this process are spaced `step_ns` apart on average
//! (a GCRA / virtual-scheduling token bucket), with a little slack either way so that bursts up to
//! a few milliseconds pass untouched and sleeps are never shorter than the OS can honour.
//!
//! Lock-free: a launch reads the step (one atomic load; 0 = open, nothing else happens), counts
//! itself, reads the monotonic clock and reserves its slot with a CAS on the theoretical arrival
//! time. Only a launch whose slot lies more than [`AHEAD_NS`] in the future sleeps, and it notes
//! that it did (the controller's "held back" input).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// How far ahead of now a launch may reserve without waiting.
pub(crate) const AHEAD_NS: u64 = 2_000_000;
/// Credit an idle process may bank for a later burst.
pub(crate) const BURST_NS: u64 = 2_000_000;

#[derive(Debug)]
pub(crate) struct Gate {
    step_ns: AtomicU64,
    /// Theoretical arrival time (monotonic ns) of the next launch.
    tat_ns: AtomicU64,
    launches: AtomicU64,
    waited: AtomicBool,
}

impl Gate {
    pub(crate) const fn new() -> Self {
        Self {
            step_ns: AtomicU64::new(0),
            tat_ns: AtomicU64::new(0),
            launches: AtomicU64::new(0),
            waited: AtomicBool::new(false),
        }
    }

    /// Sets the spacing (0 opens the gate).
    pub(crate) fn set_step(&self, step_ns: u64) {
        self.step_ns.store(step_ns, Ordering::Relaxed);
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
        let step = self.step_ns.load(Ordering::Relaxed);
        if step == 0 {
            return 0;
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

    /// Forgets everything (fork child, cap change). Atomics only.
    pub(crate) fn reset(&self) {
        self.step_ns.store(0, Ordering::Relaxed);
        self.tat_ns.store(0, Ordering::Relaxed);
        self.launches.store(0, Ordering::Relaxed);
        self.waited.store(false, Ordering::Relaxed);
    }
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
    fn an_open_gate_only_counts() {
        let g = Gate::new();
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
