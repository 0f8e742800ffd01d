//! Benchmark (not a test): the cost `libvgpu.so` adds per `cuLaunchKernel` and per
//! `cuMemAlloc_v2` + `cuMemFree_v2` pair, on the gpu-sim fake driver, for the three ways programs
//! reach the driver (direct link, `dlopen` + `dlsym`, `cuGetProcAddress`).
//!
//! `cargo run --release -p vgpu-limiter --example bench [-- <runs> <launches> <pairs>]`
//!
//! Builds `libvgpu.so` in release (nested `cargo build --release -p vgpu-limiter --lib
//! --target-dir target/limiter-cdylib`), compiles `benches/c/bench.c` with `cc -O2`, and runs it
//! `runs` times (default 5) per path and variant, interleaved: without the preload, with the
//! preload and no cap, with the preload and a cap (80 GiB, a private shared region), with the
//! preload, that cap and an SM cap (50 %, the default policy; the gate's path). Prints the
//! median ns/op of each variant and the median minus the no-preload median ("added").
//!
//! `cargo run --release -p vgpu-limiter --example bench -- callgrind [<n>]` counts instructions
//! instead (needs `valgrind`; load does not change them): for each path and variant,
//! `valgrind --tool=callgrind` on `bench <path> 0 <n+1>` and `bench <path> 0 1` (pairs), and the
//! same for launches; (difference) ÷ n per operation, and what the preload adds over no preload.
//! Only the main thread's instructions are counted (`--separate-threads=yes`), not the SM watcher's.
//! `VGPU_BENCH_LIB=<path>` measures another `libvgpu.so` (e.g. a build of an older commit);
//! `VGPU_BENCH_CALLGRIND_OUT=<dir>` keeps the profiles there (`callgrind.<path>.<variant>.<launches>.<pairs>`,
//! with `--dump-instr=yes`, for `callgrind_annotate`).

use gpu_sim::{GpuSpec, NodeSpec, SimNode};
use std::path::Path;
use std::process::Command;

const PATHS: [&str; 3] = ["direct", "dlsym", "procaddr"];
const VARIANTS: [&str; 4] = [
    "no preload",
    "preload, no cap",
    "preload, cap",
    "preload, SM cap",
];

/// The simulated node's environment with a private region, then the preload and the caps of
/// `variant` (the SM-capped variant has its own region: a region records its SM caps, and the
/// memory-capped variant must not find them there).
fn variant_env(cmd: &mut Command, node: &SimNode, lib: &Path, variant: usize) {
    let (k, v) = gpu_sim::library_path_env();
    cmd.envs(node.env())
        .env(k, v)
        .env_remove("LD_PRELOAD")
        .env_remove("CUDA_DEVICE_MEMORY_LIMIT")
        .env(
            "CUDA_DEVICE_MEMORY_SHARED_CACHE",
            node.dir().join("cudevshr.cache"),
        );
    if variant > 0 {
        cmd.env("LD_PRELOAD", lib);
    }
    if variant >= 2 {
        cmd.env("CUDA_DEVICE_MEMORY_LIMIT", "80g");
    }
    if variant == 3 {
        cmd.env("CUDA_DEVICE_SM_LIMIT", "50").env(
            "CUDA_DEVICE_MEMORY_SHARED_CACHE",
            node.dir().join("cudevshr-sm.cache"),
        );
    }
}

#[path = "support/mod.rs"]
mod support;
use support::{bench_library, compile};

/// One run: (ns per launch, ns per alloc/free pair).
fn run_once(
    prog: &Path,
    node: &SimNode,
    lib: &Path,
    path: &str,
    variant: usize,
    counts: (u64, u64),
) -> (f64, f64) {
    let mut cmd = Command::new(prog);
    cmd.args([path, &counts.0.to_string(), &counts.1.to_string()]);
    variant_env(&mut cmd, node, lib, variant);
    let out = cmd.output().expect("spawn bench");
    if !out.stderr.is_empty() {
        // E.g. the dynamic linker refusing the preload: the figures would be "no preload".
        eprintln!(
            "{path} variant {variant}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bench {path} variant {variant} failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let field = |name: &str| -> f64 {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {stdout}"))
    };
    (field("launch_ns"), field("alloc_free_ns"))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Instructions valgrind's callgrind counts for one run of `bench <path> <launches> <pairs>`.
fn instructions(
    prog: &Path,
    node: &SimNode,
    lib: &Path,
    path: &str,
    variant: usize,
    counts: (u64, u64),
) -> u64 {
    let name = format!("callgrind.{path}.{variant}.{}.{}", counts.0, counts.1);
    let out_file = match std::env::var_os("VGPU_BENCH_CALLGRIND_OUT") {
        Some(dir) => Path::new(&dir).join(name),
        None => node.dir().join("callgrind.out"),
    };
    let mut cmd = Command::new("valgrind");
    cmd.arg("--tool=callgrind")
        .arg("--dump-instr=yes")
        // One profile per thread: the main thread's is the one measured (the SM watcher's NVML
        // calls depend on how long the run takes, not on how many operations it does).
        .arg("--separate-threads=yes")
        .arg(format!("--callgrind-out-file={}", out_file.display()))
        .arg(prog)
        .args([path, &counts.0.to_string(), &counts.1.to_string()]);
    variant_env(&mut cmd, node, lib, variant);
    let out = cmd.output().expect("spawn valgrind");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "valgrind bench {path} variant {variant} failed: {stderr}"
    );
    let main_thread = format!("{}-01", out_file.display());
    let profile = std::fs::read_to_string(&main_thread)
        .unwrap_or_else(|e| panic!("{main_thread}: {e}; valgrind said: {stderr}"));
    profile
        .lines()
        .find_map(|l| l.strip_prefix("totals:").map(|n| n.trim().parse().ok()))
        .flatten()
        .unwrap_or_else(|| panic!("no totals in {main_thread}"))
}

/// The `callgrind` mode (see the module docs).
fn callgrind(prog: &Path, node: &SimNode, lib: &Path, n: u64) {
    println!(
        "libvgpu.so: {}\ninstructions per operation (callgrind, n = {n}); added = over no preload\n",
        lib.display()
    );
    println!(
        "{:<9} {:<16} {:>10} {:>8} {:>12} {:>8}",
        "path", "variant", "launch", "added", "alloc+free", "added"
    );
    for path in PATHS {
        let per_op = |variant: usize, op: fn(u64) -> (u64, u64)| {
            let many = instructions(prog, node, lib, path, variant, op(n + 1));
            let one = instructions(prog, node, lib, path, variant, op(1));
            (many as f64 - one as f64) / n as f64
        };
        let cells: Vec<(f64, f64)> = (0..VARIANTS.len())
            .map(|v| (per_op(v, |k| (k, 0)), per_op(v, |k| (0, k))))
            .collect();
        for (variant, (l, a)) in cells.iter().enumerate() {
            println!(
                "{:<9} {:<16} {:>10.1} {:>+8.1} {:>12.1} {:>+8.1}",
                path,
                VARIANTS[variant],
                l,
                l - cells[0].0,
                a,
                a - cells[0].1
            );
        }
    }
}

fn main() {
    let lib = bench_library();
    let dir = tempfile::tempdir().expect("tempdir");
    let prog = compile(dir.path(), "benches/c/bench.c", "bench");
    let node = SimNode::new(NodeSpec::uniform(1, GpuSpec::a100_80gb)).expect("sim node");
    if std::env::args().nth(1).as_deref() == Some("callgrind") {
        let n = std::env::args()
            .nth(2)
            .map_or(20_000, |a| a.parse().expect("numeric argument"));
        callgrind(&prog, &node, &lib, n);
        return;
    }
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("numeric argument"))
        .collect();
    let runs = args.first().copied().unwrap_or(5).max(1);
    let counts = (
        args.get(1).copied().unwrap_or(300_000),
        args.get(2).copied().unwrap_or(50_000),
    );

    println!(
        "libvgpu.so: {}\n{runs} runs per cell, {} launches and {} alloc/free pairs (1 MiB) per run; medians in ns/op\n",
        lib.display(),
        counts.0,
        counts.1
    );
    println!(
        "{:<9} {:<16} {:>10} {:>10} {:>12} {:>10}",
        "path", "variant", "launch", "added", "alloc+free", "added"
    );
    for path in PATHS {
        let mut samples = vec![(Vec::new(), Vec::new()); VARIANTS.len()];
        for _ in 0..runs {
            for (variant, s) in samples.iter_mut().enumerate() {
                let (l, a) = run_once(&prog, &node, &lib, path, variant, counts);
                s.0.push(l);
                s.1.push(a);
            }
        }
        let medians: Vec<(f64, f64)> = samples
            .into_iter()
            .map(|(l, a)| (median(l), median(a)))
            .collect();
        let (base_l, base_a) = medians[0];
        for (variant, (l, a)) in medians.iter().enumerate() {
            println!(
                "{:<9} {:<16} {:>10.1} {:>+10.1} {:>12.1} {:>+10.1}",
                path,
                VARIANTS[variant],
                l,
                l - base_l,
                a,
                a - base_a
            );
        }
    }
}
