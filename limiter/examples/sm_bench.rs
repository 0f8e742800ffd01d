//! Benchmark (not a test) of the SM cap, on the gpu-sim's kernel time model. Every figure comes
//! from the simulator's own busy-time accounting (exact per 100 ms sample period), never from
//! wall-clock timing of the workload.
//!
//! * **Every cap × grid** (27 cases): caps 10, 20, …, 90 × kernels of 10, 1,320 and 13,200 blocks
//!   (256 threads) that each take 1 ms on a simulated A100 (1 wave of 1 ms, 2 waves of 0.5 ms,
//!   16 waves of 62.5 µs: the grid changes the modelled wave count, not the time), one tenant alone
//!   on its GPU under `CUDA_DEVICE_SM_LIMIT=<cap>` and `GPU_CORE_UTILIZATION_POLICY=force`,
//!   launching back to back and synchronising every 16 launches (like training steps). For each
//!   case: every **1-second window** (sliding by one 100 ms period) from 1 s after the first launch
//!   to the end of the run, and the **worst deviation** of a window's utilisation from the cap
//!   (goal: within ±5 points; of the uncapped run's utilisation if a workload cannot reach the
//!   cap even uncapped); the first second's mean (how the cap starts); the **throughput
//!   kept** = utilisation over those windows ÷ (cap × the uncapped run's utilisation of the same
//!   kernel) (goal ≥ 0.95).
//! * **Two tenants** capped 30 and 60 on one GPU, and a tenant capped at 30 beside an **uncapped**
//!   one: the same 1-second windows while both are busy (from 1 s after the later start).
//! * **Added cost per launch**: `benches/c/sm_launch.c` timing `cuLaunchKernel` of a kernel that
//!   takes no simulated time, without the preload, with it and no cap, with a memory cap only (the
//!   priority protocol runs), and with an SM cap (the gate stays open: the kernels take no time).
//!
//! `cargo run --release -p vgpu-limiter --example sm_bench [-- options]`, options:
//! `--secs S` (each run, default 6), `--reps N` (repetitions of every case; the table shows the
//! median and the worst over them, default 1), `--parallel P` (runs at once, each on its own
//! simulated GPU, default 3), `--launch-runs N` (default 7; 0 skips the launch-cost part),
//! `--lib PATH` (measure that `libvgpu.so` instead of building this tree's), and other workload
//! and driver shapes: `--sync N` (0 = never synchronise), `--kernel-us`, `--period-us` (NVML's
//! sample period), `--jitter-us` (how late NVML records a sample, at most; a real driver is a few
//! ms late), `--caps 10,50`. About 1.5 minutes with the defaults.

use gpu_sim::{GpuSpec, NodeSpec, SimNode, Timeline};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, UNIX_EPOCH};

/// NVML sample period of the simulated node (also the bench's time resolution).
const PERIOD_US: u64 = 100_000;
/// Windows start this long after the first launch.
const WINDOWS_FROM: Duration = Duration::from_secs(1);
/// The goal: every window within this many points of the cap.
const BAND: f64 = 5.0;

#[path = "support/mod.rs"]
mod support;
use support::{build_libvgpu, compile};

/// The three kernel grids (blocks of 256 threads) and their waves on an A100 (864 blocks per
/// wave): each kernel takes the same time, `--kernel-us` (1 ms by default), whatever its grid.
const GRIDS: [(u32, u64); 3] = [(10, 1), (1_320, 2), (13_200, 16)];

/// The gpu-sim function name of a kernel of `grid` blocks taking `kernel_ns`.
fn function(grid: u32, waves: u64, kernel_ns: u64) -> &'static str {
    Box::leak(format!("k{grid}@wave_ns={}", kernel_ns / waves).into_boxed_str())
}

#[derive(Debug, Clone)]
struct Run {
    cap: Option<u32>,
    grid: u32,
    function: &'static str,
}

#[derive(Debug, Clone, Copy)]
struct Outcome {
    pid: u32,
    start_ns: u64,
    end_ns: u64,
}

struct Bench {
    lib: PathBuf,
    sm_load: PathBuf,
    secs: f64,
    sync_every: u32,
    period_us: u64,
    jitter_us: u64,
}

impl Bench {
    fn node(gpus: usize, period_us: u64, jitter_us: u64) -> SimNode {
        SimNode::new(
            NodeSpec::uniform(gpus as u32, GpuSpec::a100_80gb)
                .with_utilization_period_us(period_us)
                .with_utilization_jitter_us(jitter_us),
        )
        .expect("sim node")
    }

    fn spawn(&self, node: &SimNode, run: &Run, gpu: usize, tag: &str) -> Child {
        let mut cmd = base_command(
            &self.sm_load,
            node,
            &node.dir().join(format!("{tag}.cache")),
        );
        cmd.args([
            &self.secs.to_string(),
            run.function,
            "kernel",
            "direct",
            &self.sync_every.to_string(),
            &run.grid.to_string(),
            "0",
        ])
        .env("CUDA_VISIBLE_DEVICES", gpu.to_string())
        .env("LD_PRELOAD", &self.lib)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        if let Some(cap) = run.cap {
            cmd.env("CUDA_DEVICE_SM_LIMIT", cap.to_string())
                .env("GPU_CORE_UTILIZATION_POLICY", "force");
        }
        cmd.spawn().expect("spawn sm_load")
    }

    /// Runs the batch at once, run i on GPU i of a fresh node; returns each run's per-period
    /// utilisation (percent) and outcome.
    fn batch(&self, runs: &[(Run, usize)]) -> (Timeline, Vec<Outcome>) {
        let gpus = runs.iter().map(|r| r.1 + 1).max().unwrap_or(1);
        let node = Self::node(gpus, self.period_us, self.jitter_us);
        let children: Vec<Child> = runs
            .iter()
            .enumerate()
            .map(|(i, (run, gpu))| self.spawn(&node, run, *gpu, &format!("r{i}")))
            .collect();
        let out = children.into_iter().map(finish).collect();
        let t = node.timeline().expect("timeline").expect("timeline file");
        (t, out)
    }
}

fn base_command(prog: &Path, node: &SimNode, region: &Path) -> Command {
    let (k, v) = gpu_sim::library_path_env();
    let mut cmd = Command::new(prog);
    cmd.envs(node.env())
        .env(k, v)
        .env_remove("LD_PRELOAD")
        .env_remove("CUDA_DEVICE_SM_LIMIT")
        .env_remove("CUDA_DEVICE_MEMORY_LIMIT")
        .env_remove("GPU_CORE_UTILIZATION_POLICY")
        .env("VGPU_HOSTPID_SOCKET", "off")
        .env("CUDA_DEVICE_MEMORY_SHARED_CACHE", region);
    cmd
}

fn finish(child: Child) -> Outcome {
    let out = child.wait_with_output().expect("wait sm_load");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "sm_load failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    if std::env::var_os("SM_BENCH_TRACE").is_some() {
        eprint!("{}", String::from_utf8_lossy(&out.stderr));
    }
    let words: Vec<&str> = stdout.split_whitespace().collect();
    let field = |n: &str| -> u64 {
        let i = words.iter().position(|w| *w == n).expect("field");
        words[i + 1].parse().expect("number")
    };
    Outcome {
        pid: field("pid") as u32,
        start_ns: field("start_ns"),
        end_ns: field("end_ns"),
    }
}

fn at(ns: u64) -> std::time::SystemTime {
    UNIX_EPOCH + Duration::from_nanos(ns)
}

/// Per-period utilisation (percent) of `pid` on `gpu` over the whole periods in `[from, to)` ns.
fn periods(t: &Timeline, gpu: usize, pid: u32, from_ns: u64, to_ns: u64) -> Vec<f64> {
    // Whole periods only: the first one starting at or after `from`, up to the one holding `to`.
    let first = t.period_at(at(from_ns + t.period_ns() - 1));
    let last = t.period_at(at(to_ns));
    (first..last)
        .map(|p| t.process_utilization(gpu, pid, p..p + 1))
        .collect()
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        f64::NAN
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

/// 1-second sliding windows of a per-period series: their means.
fn windows(per: &[f64], period_ns: u64) -> Vec<f64> {
    let window = (1_000_000_000 / period_ns).max(1) as usize;
    per.windows(window).map(mean).collect()
}

/// What one case measured.
#[derive(Debug, Clone, Copy)]
struct Case {
    /// Signed deviation of the window farthest from the cap, points.
    worst: f64,
    /// Mean over all windows' periods, percent.
    mean: f64,
    /// Mean over the first second after the first launch, percent.
    first_second: f64,
}

fn case(t: &Timeline, gpu: usize, o: &Outcome, from_ns: u64, to_ns: u64, cap: f64) -> Case {
    let per = periods(t, gpu, o.pid, from_ns, to_ns);
    let w = windows(&per, t.period_ns());
    if std::env::var_os("SM_BENCH_TRACE").is_some() {
        let all = periods(t, gpu, o.pid, o.start_ns, to_ns);
        let row: Vec<String> = all.iter().map(|u| format!("{u:.0}")).collect();
        eprintln!("cap {cap} gpu {gpu}: {}", row.join(" "));
    }
    let worst = w
        .iter()
        .map(|u| u - cap)
        .fold(0.0f64, |a, d| if d.abs() > a.abs() { d } else { a });
    let first = periods(t, gpu, o.pid, o.start_ns, o.start_ns + 1_000_000_000);
    Case {
        worst,
        mean: mean(&per),
        first_second: mean(&first),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        f64::NAN
    } else if v.len() % 2 == 1 {
        v[v.len() / 2]
    } else {
        (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
    }
}

/// The value of largest magnitude (keeping its sign).
fn worst_of(v: &[f64]) -> f64 {
    v.iter()
        .copied()
        .fold(0.0f64, |a, d| if d.abs() > a.abs() { d } else { a })
}

/// Median of the worst deviations over the repetitions (signed by the median's own sign), and
/// the worst of all.
fn summarise(worsts: &[f64]) -> (f64, f64) {
    let med_abs = median(worsts.iter().map(|d| d.abs()).collect());
    let signed = worsts
        .iter()
        .copied()
        .min_by(|a, b| {
            (a.abs() - med_abs)
                .abs()
                .total_cmp(&(b.abs() - med_abs).abs())
        })
        .unwrap_or(f64::NAN);
    (signed, worst_of(worsts))
}

fn launch_cost(prog: &Path, node: &SimNode, lib: &Path, variant: usize, n: u64) -> f64 {
    let mut cmd = base_command(prog, node, &node.dir().join(format!("cost{variant}.cache")));
    cmd.arg(n.to_string());
    if variant > 0 {
        cmd.env("LD_PRELOAD", lib);
    }
    match variant {
        2 => {
            cmd.env("CUDA_DEVICE_MEMORY_LIMIT", "80g");
        }
        3 => {
            cmd.env("CUDA_DEVICE_SM_LIMIT", "50")
                .env("GPU_CORE_UTILIZATION_POLICY", "force");
        }
        _ => {}
    }
    let out = cmd.output().expect("spawn sm_launch");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "sm_launch failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("launch_ns"))
        .and_then(|v| v.trim().parse().ok())
        .expect("launch_ns")
}

struct Options {
    secs: f64,
    reps: usize,
    parallel: usize,
    launch_runs: usize,
    lib: Option<PathBuf>,
    sync_every: u32,
    period_us: u64,
    jitter_us: u64,
    caps: Vec<u32>,
    kernel_ns: u64,
}

fn options() -> Options {
    let mut o = Options {
        secs: 6.0,
        reps: 1,
        parallel: 3,
        launch_runs: 7,
        lib: None,
        sync_every: 16,
        period_us: PERIOD_US,
        jitter_us: 0,
        caps: (1..=9).map(|c| c * 10).collect(),
        kernel_ns: 1_000_000,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        let number = || -> f64 { value.parse().unwrap_or_else(|_| panic!("{flag} {value}")) };
        match flag.as_str() {
            "--secs" => o.secs = number().max(3.0),
            "--reps" => o.reps = (number() as usize).max(1),
            "--parallel" => o.parallel = (number() as usize).max(1),
            "--launch-runs" => o.launch_runs = number() as usize,
            "--lib" => o.lib = Some(PathBuf::from(value)),
            "--sync" => o.sync_every = number() as u32,
            "--period-us" => o.period_us = number() as u64,
            "--jitter-us" => o.jitter_us = number() as u64,
            "--kernel-us" => o.kernel_ns = (number() * 1000.0) as u64,
            "--caps" => {
                o.caps = value
                    .split(',')
                    .map(|c| c.parse().unwrap_or_else(|_| panic!("--caps {value}")))
                    .collect();
            }
            _ => panic!(
                "unknown option {flag} (--secs, --reps, --parallel, --launch-runs, --lib, --sync, \
                 --period-us, --jitter-us, --caps, --kernel-us)"
            ),
        }
    }
    o
}

fn main() {
    let opt = options();
    let lib = opt
        .lib
        .clone()
        .unwrap_or_else(|| build_libvgpu(&support::workspace_target()));
    let dir = tempfile::tempdir().expect("tempdir");
    let sm_load = compile(dir.path(), "tests/c/sm_load.c", "sm_load");
    let sm_launch = compile(dir.path(), "benches/c/sm_launch.c", "sm_launch");
    let bench = Bench {
        lib: lib.clone(),
        sm_load,
        secs: opt.secs,
        sync_every: opt.sync_every,
        period_us: opt.period_us,
        jitter_us: opt.jitter_us,
    };
    println!(
        "libvgpu.so: {}\n{} µs kernels, sync every {}, NVML period {} µs (samples recorded up to {} µs late), {} s per run, {} run(s) at once, {} repetition(s); \
         1 s windows sliding by {} ms from {} s after the first launch; goal: every window within \
         ±{BAND} points of the cap\n",
        lib.display(),
        opt.kernel_ns / 1000,
        opt.sync_every,
        opt.period_us,
        opt.jitter_us,
        opt.secs,
        opt.parallel,
        opt.reps,
        opt.period_us / 1000,
        WINDOWS_FROM.as_secs()
    );

    // Uncapped reference per grid.
    let runs: Vec<(Run, usize)> = GRIDS
        .iter()
        .enumerate()
        .map(|(i, &(grid, waves))| {
            (
                Run {
                    cap: None,
                    grid,
                    function: function(grid, waves, opt.kernel_ns),
                },
                i,
            )
        })
        .collect();
    let (t, out) = bench.batch(&runs);
    let uncapped: Vec<f64> = out
        .iter()
        .enumerate()
        .map(|(gpu, o)| {
            let from = o.start_ns + WINDOWS_FROM.as_nanos() as u64;
            mean(&periods(&t, gpu, o.pid, from, o.end_ns))
        })
        .collect();
    println!(
        "uncapped: {}\n",
        GRIDS
            .iter()
            .zip(&uncapped)
            .map(|((g, _), u)| format!("{g} blocks {u:.1} %"))
            .collect::<Vec<_>>()
            .join(", ")
    );

    // The 27 cases, `parallel` at a time, each repeated `reps` times.
    let cases: Vec<(u32, usize)> = opt
        .caps
        .iter()
        .flat_map(|&c| (0..GRIDS.len()).map(move |g| (c, g)))
        .collect();
    let mut results: Vec<Vec<Case>> = vec![Vec::new(); cases.len()];
    for _ in 0..opt.reps {
        for chunk in (0..cases.len()).collect::<Vec<_>>().chunks(opt.parallel) {
            let runs: Vec<(Run, usize)> = chunk
                .iter()
                .enumerate()
                .map(|(gpu, &i)| {
                    let (cap, g) = cases[i];
                    (
                        Run {
                            cap: Some(cap),
                            grid: GRIDS[g].0,
                            function: function(GRIDS[g].0, GRIDS[g].1, opt.kernel_ns),
                        },
                        gpu,
                    )
                })
                .collect();
            let (t, out) = bench.batch(&runs);
            for (gpu, (&i, o)) in chunk.iter().zip(&out).enumerate() {
                // A workload that cannot reach the cap even uncapped (launch overhead with tiny
                // kernels) is held to what it reaches.
                let target = f64::from(cases[i].0).min(uncapped[cases[i].1]);
                let from = o.start_ns + WINDOWS_FROM.as_nanos() as u64;
                results[i].push(case(&t, gpu, o, from, o.end_ns, target));
            }
        }
    }
    print!("{:>4}", "cap");
    for (g, _) in GRIDS {
        print!(
            " | {:>28}",
            format!("{g} blocks: worst (max) mean kept 1st s")
        );
    }
    println!();
    let mut worst_all: f64 = 0.0;
    let mut worst_kept = f64::INFINITY;
    let mut failing = 0;
    for &cap in &opt.caps {
        print!("{cap:>3}%");
        for (g, _) in GRIDS.iter().enumerate() {
            let i = cases.iter().position(|&c| c == (cap, g)).expect("case");
            let r = &results[i];
            let (med, max) = summarise(&r.iter().map(|c| c.worst).collect::<Vec<_>>());
            let m = median(r.iter().map(|c| c.mean).collect());
            let first = median(r.iter().map(|c| c.first_second).collect());
            let kept = m / (f64::from(cap) * uncapped[g] / 100.0);
            worst_all = if max.abs() > worst_all.abs() {
                max
            } else {
                worst_all
            };
            worst_kept = worst_kept.min(kept);
            failing += usize::from(max.abs() > BAND);
            print!(" | {med:>+6.1} ({max:>+5.1}) {m:>5.1}% {kept:>5.2} {first:>5.1}%");
        }
        println!();
    }
    println!(
        "\nworst 1 s window over all 27 cases and repetitions: {worst_all:+.1} points (goal ±{BAND}); \
         cases with a window outside: {failing}/{}; worst throughput kept {worst_kept:.2} (goal ≥ 0.95)\n",
        cases.len()
    );

    // Two tenants on one GPU (30 and 60), and a capped tenant beside an uncapped one.
    let pairs: [(&str, [Option<u32>; 2]); 2] = [
        ("two tenants 30 + 60", [Some(30), Some(60)]),
        ("capped 30 + uncapped", [Some(30), None]),
    ];
    for (name, caps) in pairs {
        let mut per_tenant: [Vec<Case>; 2] = [Vec::new(), Vec::new()];
        for _ in 0..opt.reps {
            let runs: Vec<(Run, usize)> = caps
                .iter()
                .map(|&cap| {
                    (
                        Run {
                            cap,
                            grid: GRIDS[0].0,
                            function: function(GRIDS[0].0, GRIDS[0].1, opt.kernel_ns),
                        },
                        0,
                    )
                })
                .collect();
            let (t, out) = bench.batch(&runs);
            let from =
                out.iter().map(|o| o.start_ns).max().unwrap_or(0) + WINDOWS_FROM.as_nanos() as u64;
            let to = out.iter().map(|o| o.end_ns).min().unwrap_or(0);
            assert!(to > from + 1_000_000_000, "the runs did not overlap");
            for (k, o) in out.iter().enumerate() {
                let cap = f64::from(caps[k].unwrap_or(100));
                per_tenant[k].push(case(&t, 0, o, from, to, cap));
            }
        }
        let describe = |k: usize| -> String {
            let r = &per_tenant[k];
            let m = median(r.iter().map(|c| c.mean).collect());
            match caps[k] {
                Some(cap) => {
                    let (med, max) = summarise(&r.iter().map(|c| c.worst).collect::<Vec<_>>());
                    let kept = m / (f64::from(cap) * uncapped[0] / 100.0);
                    format!(
                        "cap {cap}: worst window {med:+.1} (max {max:+.1}) points, mean {m:.1} %, kept {kept:.2}"
                    )
                }
                None => {
                    let low = r
                        .iter()
                        .map(|c| 100.0 + c.worst)
                        .fold(f64::INFINITY, f64::min);
                    format!("uncapped: mean {m:.1} %, lowest window ≥ {low:.1} %")
                }
            }
        };
        println!("{name}: {}; {}", describe(0), describe(1));
    }

    if opt.launch_runs == 0 {
        return;
    }
    let launches = 200_000;
    let names = [
        "no preload",
        "preload, no cap",
        "preload, memory cap only",
        "preload, SM cap 50",
    ];
    let n = Bench::node(1, PERIOD_US, 0);
    let mut fastest = Vec::new();
    for (variant, name) in names.iter().enumerate() {
        let v: Vec<f64> = (0..opt.launch_runs)
            .map(|_| launch_cost(&sm_launch, &n, &lib, variant, launches))
            .collect();
        // The minimum: interference from other work on the machine only ever adds time.
        fastest.push((name, v.iter().copied().fold(f64::INFINITY, f64::min)));
    }
    println!(
        "\ncuLaunchKernel cost ({} runs × {launches} launches, fastest run's ns/launch; the fake itself costs the first row)",
        opt.launch_runs
    );
    for (name, ns) in &fastest {
        println!(
            "{name:<26} {ns:>8.1} ns  added {:>+7.1} ns",
            ns - fastest[0].1
        );
    }
}
