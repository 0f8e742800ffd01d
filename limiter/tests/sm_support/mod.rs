//! Helpers of the SM-cap tests: run `tests/c/sm_load.c` under the limiter on a simulated node and
//! measure what it achieved from the gpu-sim's own kernel-time accounting (never from wall-clock
//! timing in the test).

#![allow(dead_code)] // each test file uses a subset

use crate::common::{compile, libvgpu};
use gpu_sim::{GpuSpec, NodeSpec, SimNode};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, UNIX_EPOCH};

/// A 1 ms kernel whatever its grid (gpu-sim's per-function duration syntax).
pub const KERNEL_1MS: &str = "spin@kernel_ns=1000000";

/// The workload program, compiled once per test binary.
pub fn sm_load() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let lib_dir = gpu_sim::cuda_library()
                .parent()
                .expect("fake driver dir")
                .to_string_lossy()
                .into_owned();
            let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("sm-tests");
            std::fs::create_dir_all(&dir).expect("mkdir");
            compile(&dir, "sm_load", &["-L", &lib_dir, "-lcuda"])
        })
        .clone()
}

/// A simulated node of `gpus` A100s with 100 ms NVML sample periods, recorded up to 4 ms late (a
/// real driver's samples are a few varying ms late).
pub fn node(gpus: usize) -> SimNode {
    SimNode::new(
        NodeSpec::uniform(gpus as u32, GpuSpec::a100_80gb)
            .with_utilization_period_us(100_000)
            .with_utilization_jitter_us(4_000),
    )
    .expect("sim node")
}

/// One workload run.
#[derive(Debug, Clone)]
pub struct Load<'a> {
    pub seconds: f64,
    pub function: &'a str,
    pub entry: &'a str,
    pub access: &'a str,
    pub sync_every: u32,
    pub grid: u32,
    pub device: u32,
    /// The container's region file (its identity).
    pub region: PathBuf,
    pub env: Vec<(String, String)>,
}

impl<'a> Load<'a> {
    pub fn new(region: PathBuf, seconds: f64) -> Self {
        Self {
            seconds,
            function: KERNEL_1MS,
            entry: "kernel",
            access: "direct",
            sync_every: 1,
            grid: 10,
            device: 0,
            region,
            env: Vec::new(),
        }
    }

    pub fn sync_every(mut self, n: u32) -> Self {
        self.sync_every = n;
        self
    }

    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.to_owned(), v.to_owned()));
        self
    }

    /// A capped tenant with `GPU_CORE_UTILIZATION_POLICY=force`.
    pub fn capped(self, cap: u32) -> Self {
        self.env("CUDA_DEVICE_SM_LIMIT", &cap.to_string())
            .env("GPU_CORE_UTILIZATION_POLICY", "force")
    }

    pub fn spawn(&self, node: &SimNode) -> Child {
        self.command(node)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn sm_load")
    }

    /// The command line and environment of this run.
    pub fn command(&self, node: &SimNode) -> Command {
        let (k, v) = gpu_sim::library_path_env();
        let mut cmd = Command::new(sm_load());
        cmd.arg(self.seconds.to_string())
            .arg(self.function)
            .arg(self.entry)
            .arg(self.access)
            .arg(self.sync_every.to_string())
            .arg(self.grid.to_string())
            .arg(self.device.to_string())
            .env_remove("CUDA_DEVICE_SM_LIMIT")
            .env_remove("GPU_CORE_UTILIZATION_POLICY")
            .env("CUDA_DEVICE_MEMORY_SHARED_CACHE", &self.region)
            // No broker unless a test starts one: this machine's PID namespace is the host's.
            .env("VGPU_HOSTPID_SOCKET", "off")
            .envs(node.env())
            .env(k, v)
            .env("LD_PRELOAD", libvgpu())
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        cmd
    }
}

/// What a run printed.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub pid: u32,
    pub launches: u64,
    pub start_ns: u64,
    pub end_ns: u64,
    pub via: String,
    pub stderr: String,
}

pub fn finish(child: Child) -> Outcome {
    let out = child.wait_with_output().expect("wait sm_load");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "sm_load failed: {stdout}{stderr}");
    let words: Vec<&str> = stdout.split_whitespace().collect();
    let field = |name: &str| -> &str {
        let i = words
            .iter()
            .position(|w| *w == name)
            .unwrap_or_else(|| panic!("no {name} in {stdout:?}"));
        words[i + 1]
    };
    Outcome {
        pid: field("pid").parse().expect("pid"),
        launches: field("launches").parse().expect("launches"),
        start_ns: field("start_ns").parse().expect("start"),
        end_ns: field("end_ns").parse().expect("end"),
        via: field("via").to_owned(),
        stderr,
    }
}

/// Runs the loads at the same time and waits for all.
pub fn run_all(node: &SimNode, loads: &[Load<'_>]) -> Vec<Outcome> {
    let children: Vec<Child> = loads.iter().map(|l| l.spawn(node)).collect();
    children.into_iter().map(finish).collect()
}

/// The share of GPU `gpu` (percent) the process NVML knows as `host_pid` used between
/// `skip` after its start and its end, from the simulator's exact accounting.
pub fn achieved(node: &SimNode, gpu: usize, host_pid: u32, o: &Outcome, skip: Duration) -> f64 {
    let t = node.timeline().expect("timeline").expect("timeline file");
    let from = t.period_at(UNIX_EPOCH + Duration::from_nanos(o.start_ns) + skip) + 1;
    let to = t.period_at(UNIX_EPOCH + Duration::from_nanos(o.end_ns));
    assert!(to > from + 5, "measurement window too short: {from}..{to}");
    t.process_utilization(gpu, host_pid, from..to)
}

/// A fresh region path for one simulated container.
pub fn region(node: &SimNode, name: &str) -> PathBuf {
    node.dir().join(format!("{name}.cache"))
}

pub fn dir_of(p: &Path) -> &Path {
    p.parent().expect("parent")
}
