//! The SM-cap controller: measured utilisation in, launch spacing out. Pure arithmetic, no I/O, so
//! it is tested against a simulated GPU below.
//!
//! The output is `step_ns`, the wall time the launch gate (`gate.rs`) spaces this process's
//! launches on one device by (0 = no pacing). The input, once per measurement (the span of NVML
//! samples the watcher reads just after each sample period ends, `watcher.rs`), is what NVML
//! measured over that span: this process's share of the device's time, the container's share (all
//! its processes, through their host PIDs), how many launches this process made, and whether the
//! gate made any launch wait.
//!
//! * **First limitation.** While the container stays under its cap and the gate holds nothing
//!   back, nothing is paced. The first measurement over the cap, or in which the probing gate (`gate.rs`)
//!   held a launch back, sets `step = cost / target`, with `cost` = the GPU time per launch just
//!   measured (own busy time ÷ own launches) and `target` = this process's part of the cap (the
//!   cap × its share of the container's use): a process under its cap is not slowed by that step,
//!   one that wants more gets its cap from the start. This is what makes the cap independent of
//!   kernel shape: a launch costs the time it kept the GPU busy, whatever its grid. A first
//!   measurement with nothing measured opens the gate (step 0).
//!   If that first measurement finds the process alone keeping the GPU full (own share ≥ 97 %),
//!   the launches it counted may not have run yet (a process that does not synchronise queues
//!   them), so busy ÷ launches would be the queue's rate: launches are then held (a 1 s step)
//!   until a measurement is no longer full, and the step is set from everything measured since
//!   the start (busy ÷ launches, exact once the queue has run). The gate wakes launches asleep on
//!   the long step when it shortens (`gate.rs`).
//! * **Then an integral controller in log space**: each pooled measurement (8 launches or 1 s) in which the container is
//!   over the cap, or this process was held back by the gate, `step *= (container / cap)^gain` (each
//!   factor bounded to [¼, 4]; the gain is smaller for speeding up than for slowing down). At the fixed point the container's use equals the cap; a process
//!   that is not held back and under the cap keeps its step (no wind-up from idle time). Each
//!   process scales its own step by the same container-wide ratio, so the processes of one
//!   container converge together on the container's cap.
//!
//! Nothing here depends on the SM count (HAMi-core's token step grows with its square).

/// Own share from which a first measurement counts as "the GPU was full with this process's
/// kernels" (or the cap + 2 points, if higher).
const SATURATED: f64 = 0.97;
/// The step that holds launches while a backlog found by the first measurement runs.
const HOLD_STEP_NS: f64 = 1_000_000_000.0;
/// The integral step acts on measurements pooled until they hold this many launches,
const POOL_LAUNCHES: u64 = 8;
/// or cover this long.
const POOL_NS: f64 = 1_000_000_000.0;
/// Bounds of one tick's multiplicative change.
const MAX_FACTOR: f64 = 4.0;
/// Bounds of the step: 1 µs (finer pacing is below what the gate can enforce anyway) to 10 s.
pub(crate) const MIN_STEP_NS: f64 = 1_000.0;
pub(crate) const MAX_STEP_NS: f64 = 10_000_000_000.0;

/// One tick's measurements.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Measurement {
    /// Wall time covered, ns.
    pub(crate) window_ns: u64,
    /// This process's share of the device's time over the window, 0..=1.
    pub(crate) own: f64,
    /// The container's share (all its processes), 0..=1; ≥ `own`.
    pub(crate) container: f64,
    /// The whole device's busy share (every process on it), 0..=1; ≥ `container`.
    pub(crate) device: f64,
    /// This process's launches on the device during the window.
    pub(crate) launches: u64,
    /// Whether the gate made a launch of this process wait during the window.
    pub(crate) throttled: bool,
}

/// Per-process, per-device controller state.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Controller {
    /// The cap, 0 < cap < 1.
    cap: f64,
    /// Current spacing, ns (0 = not pacing yet).
    step_ns: f64,
    /// Own busy time and launches measured since the start: their ratio is the cost per launch
    /// whenever nothing is queued.
    busy_ns: f64,
    launches: u64,
    /// The first measurement found this process keeping the GPU full: launches are held while
    /// the backlog runs (see [`Controller::tick`]).
    draining: bool,
    /// Own share when draining began: the backlog has run when it has fallen to half.
    drain_own: f64,
    /// Skip the next pooled measurement (the step was just anchored).
    skip: bool,
    pool: Pool,
}

/// Measurements pooled for the integral step.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
struct Pool {
    window_ns: f64,
    own_ns: f64,
    container_ns: f64,
    launches: u64,
    throttled: bool,
}

impl Controller {
    pub(crate) fn new(cap_percent: u8) -> Self {
        Self {
            cap: f64::from(cap_percent.clamp(1, 99)) / 100.0,
            step_ns: 0.0,
            busy_ns: 0.0,
            launches: 0,
            draining: false,
            drain_own: 0.0,
            skip: false,
            pool: Pool {
                window_ns: 0.0,
                own_ns: 0.0,
                container_ns: 0.0,
                launches: 0,
                throttled: false,
            },
        }
    }

    /// `cost / target`: the cost per launch measured since the start, over this process's part
    /// of the cap (the cap × its share of the container's use).
    fn anchored_step(&self, own: f64, container: f64) -> f64 {
        if self.launches == 0 || self.busy_ns <= 0.0 {
            return 0.0;
        }
        let cost_ns = self.busy_ns / self.launches as f64;
        // Nothing ran in this measurement (a backlog has just run out): the whole cap.
        let part = if container > 0.0 {
            own / container
        } else {
            1.0
        };
        let target = self.cap * part;
        (cost_ns / target).clamp(MIN_STEP_NS, MAX_STEP_NS)
    }

    /// The spacing in force.
    pub(crate) fn step_ns(&self) -> u64 {
        self.step_ns as u64
    }

    /// Feeds one tick; returns the new spacing.
    pub(crate) fn tick(&mut self, m: &Measurement) -> u64 {
        let container = m.container.max(m.own);
        self.busy_ns += m.own * m.window_ns as f64;
        self.launches += m.launches;
        // The GPU was (almost) full, this process over its cap or held back: it may have more
        // queued than it ran, so busy ÷ launches may be the queue's rate, not the cost of a
        // launch.
        let saturated = m.own >= SATURATED.max(self.cap + 0.02)
            || m.device.max(container) >= SATURATED && (container > self.cap || m.throttled);
        if self.draining {
            if m.own > self.drain_own / 2.0 {
                // Still running the backlog (held launches add at most one a step).
                self.step_ns = (self.step_ns * 2.0).min(MAX_STEP_NS);
                return self.step_ns();
            }
            // The backlog has run: everything launched so far has cost what was measured.
            self.draining = false;
            self.step_ns = self.anchored_step(m.own, container);
            self.skip = true;
        } else if self.step_ns == 0.0 {
            // Over the cap, or held back by the probing gate: the cost of a launch is measured.
            if (container > self.cap || m.throttled) && m.launches > 0 && m.own > 0.0 {
                if saturated {
                    // Hold launches while the backlog runs, then measure (above).
                    self.draining = true;
                    self.drain_own = m.own;
                    self.step_ns = HOLD_STEP_NS;
                } else {
                    self.step_ns = self.anchored_step(m.own, container);
                    self.skip = true;
                }
            }
        } else {
            self.integral(m, container);
        }
        self.step_ns()
    }

    /// The integral step, on measurements pooled until they hold [`POOL_LAUNCHES`] launches or
    /// [`POOL_NS`]: with kernels long against the tick, one tick's share is a whole number of
    /// kernels (0, 20 or 40 % at 20 ms kernels in 100 ms), noise the controller must not chase.
    fn integral(&mut self, m: &Measurement, container: f64) {
        let w = m.window_ns as f64;
        let p = &mut self.pool;
        p.window_ns += w;
        p.own_ns += m.own * w;
        p.container_ns += container * w;
        p.launches += m.launches;
        p.throttled |= m.throttled;
        if p.launches < POOL_LAUNCHES && p.window_ns < POOL_NS {
            return;
        }
        let pooled = std::mem::take(p);
        if self.skip {
            // The first measurement after the step was anchored may still show the old step.
            self.skip = false;
            return;
        }
        let container = pooled.container_ns / pooled.window_ns;
        if container > self.cap || pooled.throttled {
            let factor = if container > 0.0 {
                let ratio = container / self.cap;
                // The integral gain in log space: ½ over the cap (halves the log error per
                // measurement without overshoot even when the measurement lags the gate by one);
                // ¼ when under the cap and held back, i.e. speeding up, because a shortfall can
                // also come from outside the gate (the process was descheduled, the GPU was busy
                // with a neighbour) and over-correcting it overshoots the cap once that ends:
                // exceeding the cap costs the neighbours, falling short only costs this tenant a
                // little time. Square roots, one instruction each: `f64::powf` would call the
                // system's `pow` and make every process of the container load `libm.so.6`
                // (about 40 µs per exec, measured).
                let scaled = if container > self.cap {
                    ratio.sqrt()
                } else {
                    ratio.sqrt().sqrt()
                };
                scaled.clamp(1.0 / MAX_FACTOR, MAX_FACTOR)
            } else {
                // Held back yet nothing measured: the step is far too long (e.g. a kernel became
                // much shorter). Speed up as fast as allowed.
                1.0 / MAX_FACTOR
            };
            self.step_ns = (self.step_ns * factor).clamp(MIN_STEP_NS, MAX_STEP_NS);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TICK: u64 = 100_000_000;

    /// A GPU shared by processes that each want to launch kernels of `cost` ns back to back
    /// (`demand` launches per second at most), paced by their step. Kernels of all processes
    /// serialise; when the sum of wishes exceeds the device, each gets a proportional slice.
    struct Plant {
        costs: Vec<f64>,
        demand: Vec<f64>,
    }

    impl Plant {
        /// Utilisation of each process over one tick with the given steps (0 = unpaced).
        fn run(&self, steps: &[u64]) -> Vec<(f64, u64, bool)> {
            let wish: Vec<f64> = self
                .costs
                .iter()
                .zip(&self.demand)
                .zip(steps)
                .map(|((&c, &d), &s)| {
                    let paced = if s == 0 {
                        f64::INFINITY
                    } else {
                        1e9 / s as f64
                    };
                    (d.min(paced) * c / 1e9).min(1.0)
                })
                .collect();
            let total: f64 = wish.iter().sum();
            let scale = if total > 1.0 { 1.0 / total } else { 1.0 };
            wish.iter()
                .zip(&self.costs)
                .zip(steps)
                .zip(&self.demand)
                .map(|(((&w, &c), &s), &d)| {
                    let u = w * scale;
                    let launches = (u * TICK as f64 / c) as u64;
                    let paced_below_demand = s != 0 && 1e9 / (s as f64) < d;
                    (u, launches, paced_below_demand)
                })
                .collect()
        }
    }

    /// Runs `ticks` ticks for one container of the plant's processes; returns the container's
    /// utilisation per tick.
    fn simulate(plant: &Plant, cap: u8, ticks: usize) -> Vec<f64> {
        let mut ctls: Vec<Controller> = plant.costs.iter().map(|_| Controller::new(cap)).collect();
        let mut history = Vec::new();
        for _ in 0..ticks {
            let steps: Vec<u64> = ctls.iter().map(Controller::step_ns).collect();
            let out = plant.run(&steps);
            let container: f64 = out.iter().map(|o| o.0).sum();
            history.push(container);
            for (ctl, &(own, launches, throttled)) in ctls.iter_mut().zip(&out) {
                ctl.tick(&Measurement {
                    window_ns: TICK,
                    own,
                    container,
                    device: container,
                    launches,
                    throttled,
                });
            }
        }
        history
    }

    /// Tenants (each its own container, `None` = uncapped) on one GPU of the plant, the
    /// controllers fed measurements `lag` ticks old and, on the first one, a launch count off by
    /// `first_count_error` (launches queued ahead of the GPU, or polls between samples); returns
    /// each tenant's utilisation per tick.
    fn simulate_tenants(
        plant: &Plant,
        caps: &[Option<u8>],
        ticks: usize,
        lag: usize,
        first_count_error: f64,
    ) -> Vec<Vec<f64>> {
        let mut ctls: Vec<Option<Controller>> =
            caps.iter().map(|c| c.map(Controller::new)).collect();
        let mut history: Vec<Vec<f64>> = vec![Vec::new(); caps.len()];
        let mut seen: Vec<Vec<(f64, u64, bool)>> = Vec::new();
        for tick in 0..ticks {
            let steps: Vec<u64> = ctls
                .iter()
                .map(|c| c.as_ref().map_or(0, Controller::step_ns))
                .collect();
            let out = plant.run(&steps);
            for (h, o) in history.iter_mut().zip(&out) {
                h.push(o.0);
            }
            seen.push(out);
            let Some(old) = tick.checked_sub(lag).map(|t| seen[t].clone()) else {
                continue;
            };
            let device: f64 = old.iter().map(|o| o.0).sum();
            for (ctl, &(own, launches, throttled)) in ctls.iter_mut().zip(&old) {
                let Some(ctl) = ctl else { continue };
                let launches = if ctl.step_ns() == 0 {
                    (launches as f64 * (1.0 + first_count_error)) as u64
                } else {
                    launches
                };
                ctl.tick(&Measurement {
                    window_ns: TICK,
                    own,
                    container: own,
                    device,
                    launches,
                    throttled,
                });
            }
        }
        history
    }

    /// The 1 s (10-tick) windows from `from` on: the largest deviation from `target`, points.
    fn worst_window(h: &[f64], from: usize, target: f64) -> f64 {
        h[from..]
            .windows(10)
            .map(|w| (w.iter().sum::<f64>() / 10.0 - target).abs() * 100.0)
            .fold(0.0, f64::max)
    }

    #[test]
    fn every_one_second_window_after_the_first_second_is_within_5_points() {
        // Caps 10..90 × kernels of 10 µs, 1 ms and 20 ms; measurements fresh or a tick old; the
        // first cost estimate exact, or 30 % low (launches counted ahead of the GPU's work).
        for cap in (10..=90).step_by(10) {
            for cost in [1e4, 1e6, 2e7] {
                for (lag, error) in [(0, 0.0), (1, 0.0), (0, 0.3), (1, 0.3)] {
                    let plant = Plant {
                        costs: vec![cost],
                        demand: vec![f64::INFINITY],
                    };
                    let h = simulate_tenants(&plant, &[Some(cap)], 60, lag, error);
                    // The first tick runs before any measurement; windows start after 1 s.
                    let worst = worst_window(&h[0], 10, f64::from(cap) / 100.0);
                    assert!(
                        worst <= 5.0,
                        "cap {cap}, cost {cost}, lag {lag}, error {error}: {worst:.1} points {h:?}"
                    );
                }
            }
        }
    }

    /// One process that never synchronises: it launches as fast as its gate lets it (or the
    /// first tick, before any step, `probe` launches), the driver queues up to `depth` launches,
    /// the GPU runs the queue. Returns the utilisation per tick.
    fn simulate_queue(cap: u8, cost: f64, probe: u64, depth: u64, ticks: usize) -> Vec<f64> {
        let mut ctl = Controller::new(cap);
        let mut queued = 0u64;
        let mut head_left = 0.0f64; // ns left of the kernel running
        let mut credit = 0.0f64; // launches the gate allows, fractional
        let mut history = Vec::new();
        for tick in 0..ticks {
            let step = ctl.step_ns();
            let allowed = if tick == 0 {
                probe
            } else if step == 0 {
                u64::MAX
            } else {
                credit += TICK as f64 / step as f64;
                let whole = credit as u64;
                credit -= whole as f64;
                whole
            };
            let launches = allowed.min(depth - queued);
            queued += launches;
            let mut left = TICK as f64;
            let mut busy = 0.0;
            while left > 0.0 && queued > 0 {
                if head_left == 0.0 {
                    head_left = cost;
                }
                let run = head_left.min(left);
                head_left -= run;
                left -= run;
                busy += run;
                if head_left == 0.0 {
                    queued -= 1;
                }
            }
            let own = busy / TICK as f64;
            history.push(own);
            ctl.tick(&Measurement {
                window_ns: TICK,
                own,
                container: own,
                device: own,
                launches,
                throttled: step != 0 && allowed < u64::MAX && queued < depth,
            });
        }
        history
    }

    #[test]
    fn a_backlog_found_by_the_first_measurement_runs_then_the_cap_holds() {
        // 20 ms kernels, 32 launches before the first measurement (640 ms of work: the probe before
        // 2026-12-06, harsher than today's 8 and back-off) and a 1,024-launch queue: the first
        // measurement sees a full GPU and 32 launches; busy ÷ launches would be 3 ms.
        for cap in (10..=90).step_by(10) {
            let h = simulate_queue(cap, 2e7, 32, 1024, 80);
            // The backlog (0.64 s) runs, then one hold tick; windows from 1 s on hold the cap.
            let worst = worst_window(&h, 10, f64::from(cap) / 100.0);
            assert!(worst <= 5.0, "cap {cap}: {worst:.1} points: {h:?}");
        }
    }

    #[test]
    fn two_tenants_30_and_60_and_a_capped_one_beside_an_uncapped_one_hold_their_caps() {
        let plant = Plant {
            costs: vec![1e6, 1e6],
            demand: vec![f64::INFINITY, f64::INFINITY],
        };
        for lag in [0, 1] {
            let h = simulate_tenants(&plant, &[Some(30), Some(60)], 60, lag, 0.0);
            assert!(worst_window(&h[0], 10, 0.30) <= 5.0, "30, lag {lag}: {h:?}");
            assert!(worst_window(&h[1], 10, 0.60) <= 5.0, "60, lag {lag}: {h:?}");
            let h = simulate_tenants(&plant, &[Some(30), None], 60, lag, 0.0);
            assert!(worst_window(&h[0], 10, 0.30) <= 5.0, "30, lag {lag}: {h:?}");
            assert!(
                worst_window(&h[1], 10, 0.70) <= 5.0,
                "uncapped, lag {lag}: {h:?}"
            );
        }
    }

    #[test]
    fn one_saturating_process_settles_on_every_cap_within_two_seconds() {
        for cap in (10..=90).step_by(10) {
            let plant = Plant {
                costs: vec![1e6],
                demand: vec![f64::INFINITY],
            };
            let h = simulate(&plant, cap, 50);
            let target = f64::from(cap) / 100.0;
            for (t, u) in h.iter().enumerate().skip(20) {
                assert!((u - target).abs() < 0.01, "cap {cap}, tick {t}: {u}");
            }
        }
    }

    #[test]
    fn cost_is_time_not_grid_size_so_short_and_long_kernels_settle_alike() {
        // 10 µs kernels and 20 ms kernels: same cap, same steady state.
        for cost in [1e4, 2e7] {
            let plant = Plant {
                costs: vec![cost],
                demand: vec![f64::INFINITY],
            };
            let h = simulate(&plant, 30, 40);
            assert!((h[39] - 0.30).abs() < 0.01, "cost {cost}: {}", h[39]);
        }
    }

    #[test]
    fn two_processes_of_one_container_share_its_cap() {
        let plant = Plant {
            costs: vec![1e6, 3e6],
            demand: vec![f64::INFINITY, f64::INFINITY],
        };
        let h = simulate(&plant, 50, 60);
        assert!((h[59] - 0.5).abs() < 0.02, "{}", h[59]);
    }

    #[test]
    fn a_process_under_its_cap_is_never_paced() {
        let plant = Plant {
            costs: vec![1e6],
            demand: vec![200.0], // 20 % of the device
        };
        let mut ctl = Controller::new(50);
        for _ in 0..20 {
            let out = plant.run(&[ctl.step_ns()]);
            ctl.tick(&Measurement {
                window_ns: TICK,
                own: out[0].0,
                container: out[0].0,
                device: out[0].0,
                launches: out[0].1,
                throttled: out[0].2,
            });
        }
        assert_eq!(ctl.step_ns(), 0);
    }

    #[test]
    fn a_held_back_process_with_no_measurement_speeds_up() {
        let mut ctl = Controller::new(50);
        ctl.tick(&Measurement {
            window_ns: TICK,
            own: 0.8,
            container: 0.8,
            device: 0.8,
            launches: 80,
            throttled: false,
        });
        let before = ctl.step_ns();
        assert_eq!(before, 2_000_000, "1 ms per launch at 50 %");
        // The first pooled measurement after the anchor is skipped (it may show the old step);
        // then one that held launches back and measured nothing speeds up as fast as allowed.
        let held = Measurement {
            window_ns: TICK,
            own: 0.0,
            container: 0.0,
            device: 0.0,
            launches: 8,
            throttled: true,
        };
        ctl.tick(&held);
        assert_eq!(ctl.step_ns(), before);
        ctl.tick(&held);
        assert_eq!(ctl.step_ns(), before / 4);
        // Without launches in a tick (a long step), measurements pool for a second first.
        let sparse = Measurement {
            launches: 0,
            ..held
        };
        let after = ctl.step_ns();
        for _ in 0..9 {
            ctl.tick(&sparse);
        }
        assert_eq!(ctl.step_ns(), after);
        ctl.tick(&sparse);
        assert_eq!(ctl.step_ns(), after / 4);
    }
}
