//! NVML's sample period, learnt from the timestamps of its process samples.
//!
//! The driver records every process that ran at the end of each sample period (about 1/6 s on
//! the GPUs whose stamps are public; "1/6 s to 1 s depending on the product"), stamped when its
//! sampling thread gets to it: late by a varying amount (a few ms), so successive stamps are a
//! period apart only on average. A query returns one entry per process, stamped with its newest
//! record, so the period is seen only between the newest stamps of successive queries
//! (`watcher.rs`). The smallest gap seen (what this replaced) is the period minus the largest
//! difference of delays, and a share computed with it was that much too small: a cap of 30 held
//! at 32-33 % with samples up to 20 ms late on a 100 ms period (`sm_bench -- --jitter-us 20000`).
//! The estimate here is the median of the recent gaps, which the delays do not bias.
//!
//! Gaps shorter than [`SAME_SAMPLE_US`] are one sample seen twice; gaps longer than
//! [`MAX_GAP_US`] are idle stretches. Gaps of several periods (a late poll, nobody running for a
//! while) are left out: only gaps up to 7/4 of the smallest count, which keeps every single-period
//! gap as long as the delays stay below a quarter of the period.

/// Stamps closer than this are one sample.
pub(crate) const SAME_SAMPLE_US: u64 = 4_000;

/// Longer gaps are not one period (NVML's are 1 s at most): an idle stretch.
pub(crate) const MAX_GAP_US: u64 = 2_000_000;

/// Gaps remembered.
const KEPT: usize = 32;

/// The recent gaps between successive samples, and the period they give.
#[derive(Debug, Clone)]
pub(crate) struct SamplePeriod {
    gaps: [u64; KEPT],
    len: usize,
    next: usize,
    estimate: Option<u64>,
}

impl SamplePeriod {
    pub(crate) const fn new() -> Self {
        Self {
            gaps: [0; KEPT],
            len: 0,
            next: 0,
            estimate: None,
        }
    }

    /// The period in µs, once two samples have been seen.
    pub(crate) fn get(&self) -> Option<u64> {
        self.estimate
    }

    /// Notes the gap between two samples that followed each other (`earlier < later`, µs).
    pub(crate) fn note(&mut self, earlier: u64, later: u64) {
        let gap = later.saturating_sub(earlier);
        if !(SAME_SAMPLE_US..=MAX_GAP_US).contains(&gap) {
            return;
        }
        // The driver's period does not change: a gap of several periods must not push the single
        // ones out of the memory (a smaller period still takes over).
        if self.estimate.is_some_and(|e| gap > e.saturating_mul(7) / 4) {
            return;
        }
        self.gaps[self.next] = gap;
        self.next = (self.next + 1) % KEPT;
        self.len = (self.len + 1).min(KEPT);
        self.estimate = median_of_single_gaps(&self.gaps[..self.len]);
    }
}

/// The median of the gaps below 7/4 of the smallest (the single-period ones).
fn median_of_single_gaps(gaps: &[u64]) -> Option<u64> {
    let smallest = *gaps.iter().min()?;
    let bound = smallest.saturating_mul(7) / 4;
    let mut single: Vec<u64> = gaps.iter().copied().filter(|&g| g <= bound).collect();
    single.sort_unstable();
    Some(single[(single.len() - 1) / 2])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Successive sample stamps of a `period` late by `delay(i)`, as the driver records them.
    fn stamps(period: u64, n: u64, delay: impl Fn(u64) -> u64) -> Vec<u64> {
        (1..=n)
            .map(|i| 1_700_000_000_000_000 + i * period + delay(i))
            .collect()
    }

    /// A repeatable delay in `0..=max` (the gpu-sim's kind of jitter).
    fn jitter(i: u64, max: u64) -> u64 {
        let mut x = i.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5bd1_e995;
        x ^= x >> 29;
        x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x ^= x >> 32;
        x % (max + 1)
    }

    fn note_all(p: &mut SamplePeriod, stamps: &[u64]) {
        for pair in stamps.windows(2) {
            p.note(pair[0], pair[1]);
        }
    }

    #[test]
    fn exact_stamps_give_the_period() {
        let mut p = SamplePeriod::new();
        assert_eq!(p.get(), None);
        note_all(&mut p, &stamps(166_667, 2, |_| 0));
        assert_eq!(p.get(), Some(166_667));
    }

    #[test]
    fn late_samples_do_not_bias_the_period() {
        // Up to a quarter of the period late: the smallest gap is ~25 % short, the estimate is
        // within 2 % after a few polls.
        for (period, max) in [(100_000, 20_000), (166_667, 40_000), (1_000_000, 5_000)] {
            let mut p = SamplePeriod::new();
            let all = stamps(period, 40, |i| jitter(i, max));
            note_all(&mut p, &all);
            let smallest = all.windows(2).map(|w| w[1] - w[0]).min().unwrap();
            assert!(smallest < period - max / 2, "the old estimate was biased");
            let got = p.get().unwrap();
            assert!(
                got.abs_diff(period) * 50 <= period,
                "period {period}, delays up to {max}: estimated {got}"
            );
        }
    }

    #[test]
    fn multi_period_gaps_are_left_out() {
        // Late polls and idle stretches: gaps of 2 and 5 periods among single ones.
        let mut p = SamplePeriod::new();
        let period = 166_667;
        for (i, k) in [2, 1, 5, 2, 1, 2, 2, 1].into_iter().enumerate() {
            let from = 10_000_000 * (i as u64 + 1);
            p.note(from, from + k * period + jitter(i as u64, 3_000));
        }
        let got = p.get().unwrap();
        assert!(got.abs_diff(period) <= 3_000, "estimated {got}");
    }

    #[test]
    fn the_same_sample_twice_and_idle_stretches_are_no_period() {
        let base = 1_700_000_000_000_000;
        let mut p = SamplePeriod::new();
        p.note(base, base + 50);
        p.note(base, base + SAME_SAMPLE_US - 1);
        p.note(base, base + MAX_GAP_US + 1);
        assert_eq!(p.get(), None);
        p.note(base, base + 100_000);
        p.note(base, base + 30);
        p.note(base, base + 60_000_000);
        assert_eq!(p.get(), Some(100_000));
    }

    #[test]
    fn only_recent_gaps_count() {
        let mut p = SamplePeriod::new();
        note_all(&mut p, &stamps(1_000_000, 40, |_| 0));
        assert_eq!(p.get(), Some(1_000_000));
        // A period then seen shorter takes over.
        note_all(&mut p, &stamps(200_000, KEPT as u64 + 1, |_| 0));
        assert_eq!(p.get(), Some(200_000));
    }

    /// A lone tenant whose bursts mostly fall in every other period (a 3 Hz pipeline on a 1/6 s
    /// grid) shows gaps of 2 periods, and now and then a single one. The driver's period never
    /// changes: the single one must not be forgotten after KEPT double gaps (the estimate doubled,
    /// and each measurement took one period's share to hold for two).
    #[test]
    fn a_period_once_seen_is_not_forgotten_for_multi_period_gaps() {
        let period = 166_667;
        let mut p = SamplePeriod::new();
        let mut t = 1_700_000_000_000_000u64;
        p.note(t, t + period);
        t += period;
        assert_eq!(p.get(), Some(period));
        for _ in 0..KEPT {
            p.note(t, t + 2 * period);
            t += 2 * period;
        }
        assert_eq!(p.get(), Some(period), "the estimate drifted to 2 periods");
    }

    /// The first gap seen is 2 periods (the process idled): the estimate is 2 periods until a
    /// single gap comes, and then corrects at once.
    #[test]
    fn a_first_double_gap_is_corrected_by_the_first_single_one() {
        let period = 166_667;
        let mut p = SamplePeriod::new();
        p.note(0, 2 * period);
        assert_eq!(p.get(), Some(2 * period));
        p.note(2 * period, 3 * period + 3_000);
        assert_eq!(p.get(), Some(period + 3_000));
    }
}
