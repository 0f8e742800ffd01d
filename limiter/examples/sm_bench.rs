//! Benchmark (not a test) of the SM cap, on the gpu-sim's kernel time model:
//!
//! * **accuracy**: for caps 10, 20, …, 90, one tenant launching 1 ms kernels (synchronising every
//!   16, like training steps) under `CUDA_DEVICE_SM_LIMIT=<cap>` and
//!   `GPU_CORE_UTILIZATION_POLICY=force`, alone on a simulated A100; its utilisation over the
//!   steady part of the run (after [`STEADY_FROM`]) from the simulator's own busy-time accounting;
//! * **settling**: the time from the program's start (the load appearing) until the utilisation,
//!   averaged over 0.5 s, stays within 5 points of the cap for the rest of the run;
//! * **throughput kept**: the kernels completed per second at cap c divided by c % of the kernels
//!   an uncapped run completes (goal ≥ 0.95);
//! * **added cost per launch**: `benches/c/sm_launch.c` timing `cuLaunchKernel` of a kernel that
//!   takes no simulated time, without the preload, with it and no cap, with a memory cap only (the
//!   priority protocol runs), and with an SM cap (the gate is consulted; it stays open because the
//!   kernels take no time).
//!
//! `cargo run --release -p vgpu-limiter --example sm_bench [-- <seconds per cap> <launch runs>]`
//! (defaults 6 and 7; about 1.5 minutes).

use gpu_sim::{GpuSpec, NodeSpec, SimNode};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, UNIX_EPOCH};

/// The steady window starts this long after the program starts.
const STEADY_FROM: Duration = Duration::from_secs(3);
/// NVML sample period of the simulated node (also the bench's time resolution).
const PERIOD_US: u64 = 100_000;

#[path = "support/mod.rs"]
mod support;
use support::{build_libvgpu, compile};

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

/// (pid, start ns) of one workload run.
fn load(
    prog: &Path,
    node: &SimNode,
    lib: &Path,
    cap: Option<u32>,
    secs: f64,
    tag: &str,
) -> (u32, u64, u64) {
    let mut cmd = base_command(prog, node, &node.dir().join(format!("{tag}.cache")));
    cmd.args([
        &secs.to_string(),
        "spin@kernel_ns=1000000",
        "kernel",
        "direct",
        "16",
        "10",
        "0",
    ])
    .env("LD_PRELOAD", lib);
    if let Some(cap) = cap {
        cmd.env("CUDA_DEVICE_SM_LIMIT", cap.to_string())
            .env("GPU_CORE_UTILIZATION_POLICY", "force");
    }
    let out = cmd.output().expect("spawn sm_load");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "sm_load failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let words: Vec<&str> = stdout.split_whitespace().collect();
    let field = |n: &str| -> u64 {
        let i = words.iter().position(|w| *w == n).expect("field");
        words[i + 1].parse().expect("number")
    };
    (field("pid") as u32, field("start_ns"), field("end_ns"))
}

/// Per-period utilisation (percent) of `pid` on GPU 0 from `start_ns` to `end_ns`.
fn periods(node: &SimNode, pid: u32, start_ns: u64, end_ns: u64) -> Vec<f64> {
    let t = node.timeline().expect("timeline").expect("timeline file");
    let first = t.period_at(UNIX_EPOCH + Duration::from_nanos(start_ns));
    let last = t.period_at(UNIX_EPOCH + Duration::from_nanos(end_ns));
    (first..last)
        .map(|p| t.process_utilization(0, pid, p..p + 1))
        .collect()
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
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

fn main() {
    let args: Vec<f64> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("number"))
        .collect();
    let secs = args.first().copied().unwrap_or(6.0).max(4.0);
    let runs = args.get(1).copied().unwrap_or(7.0).max(1.0) as usize;
    let exe = std::env::current_exe().expect("current_exe");
    let workspace_target = exe
        .ancestors()
        .nth(3)
        .expect("target directory")
        .to_path_buf();
    let lib = build_libvgpu(&workspace_target);
    let dir = tempfile::tempdir().expect("tempdir");
    let sm_load = compile(dir.path(), "tests/c/sm_load.c", "sm_load");
    let sm_launch = compile(dir.path(), "benches/c/sm_launch.c", "sm_launch");
    let node = || {
        SimNode::new(NodeSpec::uniform(1, GpuSpec::a100_80gb).with_utilization_period_us(PERIOD_US))
            .expect("sim node")
    };
    let steady_periods = (STEADY_FROM.as_micros() as u64 / PERIOD_US) as usize;

    println!(
        "libvgpu.so: {}\n1 ms kernels, sync every 16, {secs} s per run, steady window from {} s\n",
        lib.display(),
        STEADY_FROM.as_secs()
    );
    let n = node();
    let (pid, start, end) = load(&sm_load, &n, &lib, None, secs, "uncapped");
    let uncapped = mean(&periods(&n, pid, start, end)[steady_periods..]);
    println!("uncapped: {uncapped:.1} % of the GPU\n");
    println!(
        "{:>4} {:>9} {:>7} {:>9} {:>11} {:>11}",
        "cap", "achieved", "error", "settle", "excursions", "throughput"
    );
    let mut worst_excursions: f64 = 0.0;
    let mut worst_error: f64 = 0.0;
    let mut worst_settle: f64 = 0.0;
    let mut worst_kept = f64::INFINITY;
    for cap in (10..=90).step_by(10) {
        let n = node();
        let (pid, start, end) = load(&sm_load, &n, &lib, Some(cap), secs, &format!("cap{cap}"));
        let per = periods(&n, pid, start, end);
        let achieved = mean(&per[steady_periods..]);
        let target = f64::from(cap);
        // Settled: the end of the first 0.5 s window whose average is within 5 points of the
        // cap; excursions: the share of later 0.5 s windows outside that band.
        let window = 5;
        let averages: Vec<f64> = per.windows(window).map(mean).collect();
        let first = averages.iter().position(|a| (a - target).abs() <= 5.0);
        let settled_at = first.map(|i| (i + window) as f64 * PERIOD_US as f64 / 1e6);
        let excursions = first.map_or(1.0, |i| {
            let later = &averages[i..];
            later.iter().filter(|a| (*a - target).abs() > 5.0).count() as f64 / later.len() as f64
        });
        worst_excursions = worst_excursions.max(excursions);
        let expected = target.min(uncapped);
        let kept = achieved / (target / 100.0 * uncapped);
        let error = achieved - expected;
        worst_error = worst_error.max(error.abs());
        worst_kept = worst_kept.min(kept);
        let settle = settled_at.map_or_else(|| "never".to_owned(), |s| format!("{s:.1} s"));
        worst_settle = worst_settle.max(settled_at.unwrap_or(f64::INFINITY));
        println!(
            "{cap:>3}% {achieved:>8.1}% {error:>+6.1} {settle:>9} {:>10.0}% {kept:>10.2}x",
            excursions * 100.0
        );
    }
    println!(
        "\nworst |error| {worst_error:.1} points (goal ≤ 5), worst settle {worst_settle:.1} s (goal < 2 s), \
         worst throughput kept {worst_kept:.2} (goal ≥ 0.95), \
         worst excursions {:.0}% of 0.5 s windows after settling\n",
        worst_excursions * 100.0
    );

    let launches = 200_000;
    let names = [
        "no preload",
        "preload, no cap",
        "preload, memory cap only",
        "preload, SM cap 50",
    ];
    let n = node();
    let mut fastest = Vec::new();
    for (variant, name) in names.iter().enumerate() {
        let v: Vec<f64> = (0..runs)
            .map(|_| launch_cost(&sm_launch, &n, &lib, variant, launches))
            .collect();
        // The minimum: interference from other work on the machine only ever adds time.
        fastest.push((name, v.iter().copied().fold(f64::INFINITY, f64::min)));
    }
    println!(
        "cuLaunchKernel cost ({runs} runs × {launches} launches, fastest run's ns/launch; the fake itself costs the first row)"
    );
    for (name, ns) in &fastest {
        println!(
            "{name:<26} {ns:>8.1} ns  added {:>+7.1} ns",
            ns - fastest[0].1
        );
    }
}
