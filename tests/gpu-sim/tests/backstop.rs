//! What a node agent's memory backstop stands on: per-process device memory seen through NVML with
//! host PIDs, for processes that allocate without any limiter (`gpu-sim-bypass`), and gone once the
//! process exits or is killed; and the `_v3` process query failing like an old driver's.
//!
//! `ctests/nvml_procs.c` (linked `-lnvidia-ml`, compiled once per test process with `$CC`) prints
//! what `nvmlDeviceGetComputeRunningProcesses_v3`, `_v2` and the v1 name return for one GPU.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use gpu_sim::{GpuSpec, NodeSpec, SimNode};

const MIB: u64 = 1024 * 1024;
const GIB: u64 = 1024 * MIB;
/// `NVML_ERROR_FUNCTION_NOT_FOUND`.
const FUNCTION_NOT_FOUND: i32 = 13;

fn nvml_procs_program() -> &'static Path {
    static PROGRAM: OnceLock<PathBuf> = OnceLock::new();
    PROGRAM
        .get_or_init(|| common::compile_ctest("nvml_procs.c", "nvml-procs", &[], &["-lnvidia-ml"]))
}

/// One query's answer: its return code and `(pid, bytes)` entries.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Listed {
    ret: i32,
    procs: Vec<(u32, u64)>,
}

/// What `nvml-procs` printed for one GPU.
#[derive(Debug)]
struct Seen {
    v3: Listed,
    v2: Listed,
    v1: Listed,
    graphics_v3: i32,
    used: u64,
}

impl Seen {
    /// The processes, after checking that every version that answered agrees with `_v2`.
    fn procs(&self) -> &[(u32, u64)] {
        assert_eq!(self.v2.ret, 0, "{self:?}");
        assert_eq!(self.v1, self.v2, "v1 and v2 disagree: {self:?}");
        if self.v3.ret == 0 {
            assert_eq!(self.v3, self.v2, "v3 and v2 disagree: {self:?}");
        }
        &self.v2.procs
    }
}

fn parse_listed(line: &str) -> Listed {
    let mut words = line.split_whitespace().skip(1);
    let ret = words.next().expect("code").parse().expect("code");
    let count: usize = words.next().expect("count").parse().expect("count");
    let procs: Vec<(u32, u64)> = words
        .map(|w| {
            let (pid, bytes) = w.split_once(':').expect("pid:bytes");
            (pid.parse().expect("pid"), bytes.parse().expect("bytes"))
        })
        .collect();
    assert_eq!(procs.len(), count, "{line}");
    Listed { ret, procs }
}

/// Runs `nvml-procs gpu` on `node` with `extra` environment.
fn nvml_procs(node: &SimNode, gpu: u32, extra: &[(&str, &str)]) -> Result<Seen, String> {
    let output = Command::new(nvml_procs_program())
        .arg(gpu.to_string())
        .env_remove("CUDA_VISIBLE_DEVICES")
        .env_remove("GPU_SIM_NVML_NO_V3")
        .envs(node.env())
        .envs([gpu_sim::library_path_env()])
        .envs(extra.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("run nvml-procs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "nvml-procs failed ({}):\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    if let Some(code) = stdout.strip_prefix("init ") {
        return Err(format!(
            "nvmlInit_v2 returned {} ({})",
            code.trim(),
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    let line = |prefix: &str| {
        stdout
            .lines()
            .find(|l| l.split_whitespace().next() == Some(prefix))
            .unwrap_or_else(|| panic!("no {prefix} line in:\n{stdout}"))
            .to_owned()
    };
    let value = |prefix: &str| {
        line(prefix)
            .split_whitespace()
            .nth(1)
            .expect("value")
            .to_owned()
    };
    Ok(Seen {
        v3: parse_listed(&line("v3")),
        v2: parse_listed(&line("v2")),
        v1: parse_listed(&line("v1")),
        graphics_v3: value("graphics_v3").parse().expect("code"),
        used: value("used").parse().expect("used"),
    })
}

fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{name} {pid}: {status}");
}

fn a100_node(gpus: u32) -> SimNode {
    SimNode::new(NodeSpec::uniform(gpus, GpuSpec::a100_80gb)).expect("sim node")
}

/// The node's memory use other than through the driver (reserved memory) on `gpu`.
fn baseline_used(node: &SimNode, gpu: u32) -> u64 {
    nvml_procs(node, gpu, &[]).expect("nvml").used
}

#[test]
fn bypass_memory_is_listed_on_its_gpu_with_context_and_gone_after_sigkill() {
    let node = a100_node(2);
    let base = baseline_used(&node, 1);
    let mut held = node.bypass(1, &[GIB, 512 * MIB], &[]);
    assert_eq!(held.results, vec![0, 0]);

    // Each context costs cuda_context_mib (300 by default), charged to its process as on a real GPU.
    let expected = NodeSpec::DEFAULT_CUDA_CONTEXT_MIB * MIB + GIB + 512 * MIB;
    let on_1 = nvml_procs(&node, 1, &[]).expect("nvml");
    assert_eq!(on_1.v3.ret, 0);
    assert_eq!(on_1.procs(), &[(held.pid, expected)]);
    assert_eq!(on_1.used, base + expected);
    let on_0 = nvml_procs(&node, 0, &[]).expect("nvml");
    assert_eq!(on_0.procs(), &[] as &[(u32, u64)]);

    // SIGKILL, and ask before the parent reaps it: a zombie has closed its files, so the driver has
    // freed its memory already.
    held.child().kill().expect("SIGKILL");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !std::fs::read_to_string(format!("/proc/{}/stat", held.pid))
        .map(|s| {
            s.rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('Z'))
        })
        .unwrap_or(true)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "never became a zombie"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let after = nvml_procs(&node, 1, &[]).expect("nvml");
    assert_eq!(after.procs(), &[] as &[(u32, u64)], "a zombie listed");
    assert_eq!(after.used, base);
    let status = held.child().wait().expect("wait");
    assert!(!status.success());
    assert_eq!(
        nvml_procs(&node, 1, &[]).expect("nvml").procs(),
        &[] as &[(u32, u64)]
    );
}

#[test]
fn sigterm_ends_the_bypass_normally_and_frees_its_memory() {
    let node = a100_node(1);
    let mut held = node.bypass(0, &[256 * MIB], &[]);
    assert_eq!(
        nvml_procs(&node, 0, &[]).expect("nvml").procs(),
        &[(held.pid, 556 * MIB)]
    );
    signal(held.pid, "TERM");
    let status = held.child().wait().expect("wait");
    assert_eq!(status.code(), Some(0), "{status}");
    // Returned by the driver's exit handler, not by a reaper: the state file shows it at once.
    let state = node.cuda_state().expect("state").expect("exists");
    assert_eq!(state.devices[0].used_bytes, 0);
    assert!(state.process(held.pid).is_none());
    assert_eq!(
        nvml_procs(&node, 0, &[]).expect("nvml").procs(),
        &[] as &[(u32, u64)]
    );
}

#[test]
fn processes_in_a_pid_namespace_are_listed_by_host_pid_on_the_visible_gpu() {
    let node = a100_node(3);
    let offset = 700_000;
    // CUDA ordinal 0 is node GPU 2 for this process; NVML indexes by node GPU.
    let a = node.bypass(
        0,
        &[GIB],
        &[
            ("GPU_SIM_HOST_PID_OFFSET", "700000"),
            ("CUDA_VISIBLE_DEVICES", "2"),
        ],
    );
    let b = node.bypass(2, &[2 * GIB], &[]);
    let ctx = NodeSpec::DEFAULT_CUDA_CONTEXT_MIB * MIB;
    let mut listed = nvml_procs(&node, 2, &[]).expect("nvml").procs().to_vec();
    listed.sort_unstable();
    let mut expected = vec![(a.pid + offset, ctx + GIB), (b.pid, ctx + 2 * GIB)];
    expected.sort_unstable();
    assert_eq!(listed, expected);
    for gpu in [0, 1] {
        assert_eq!(
            nvml_procs(&node, gpu, &[]).expect("nvml").procs(),
            &[] as &[(u32, u64)]
        );
    }
}

#[test]
fn context_cost_is_the_node_files_and_failed_allocations_are_not_counted() {
    let node =
        SimNode::new(NodeSpec::uniform(1, GpuSpec::t4).with_cuda_context_mib(0)).expect("node");
    let held = node.bypass(0, &[10 * GIB, 10 * GIB, 64 * MIB], &[]);
    // CUDA_ERROR_OUT_OF_MEMORY for the one that does not fit on a 16 GB T4.
    assert_eq!(held.results, vec![0, 2, 0]);
    assert_eq!(
        nvml_procs(&node, 0, &[]).expect("nvml").procs(),
        &[(held.pid, 10 * GIB + 64 * MIB)]
    );
}

#[test]
fn v3_can_be_missing_as_on_an_old_driver() {
    let node = a100_node(1);
    let held = node.bypass(0, &[GIB], &[]);
    let old = nvml_procs(&node, 0, &[("GPU_SIM_NVML_NO_V3", "1")]).expect("nvml");
    assert_eq!(
        old.v3,
        Listed {
            ret: FUNCTION_NOT_FOUND,
            procs: Vec::new()
        }
    );
    assert_eq!(old.graphics_v3, FUNCTION_NOT_FOUND);
    assert_eq!(old.procs(), &[(held.pid, (300 + 1024) * MIB)]);

    for off in ["0", ""] {
        let new = nvml_procs(&node, 0, &[("GPU_SIM_NVML_NO_V3", off)]).expect("nvml");
        assert_eq!(new.v3.ret, 0);
        assert_eq!(new.graphics_v3, 0);
        assert_eq!(new.procs(), &[(held.pid, (300 + 1024) * MIB)]);
    }
    // NVML_ERROR_UNKNOWN, as for any malformed setting.
    let err = nvml_procs(&node, 0, &[("GPU_SIM_NVML_NO_V3", "yes")]).expect_err("refused");
    assert!(err.starts_with("nvmlInit_v2 returned 999"), "{err}");
    assert!(err.contains("GPU_SIM_NVML_NO_V3"), "{err}");
}

#[test]
fn bypass_refuses_bad_arguments_and_reports_setup_failures() {
    let node = a100_node(1);
    let run = |args: &[&str]| {
        Command::new(gpu_sim::bypass_program())
            .args(args)
            .envs(node.env())
            .env_remove("CUDA_VISIBLE_DEVICES")
            .stdin(Stdio::null())
            .output()
            .expect("run bypass")
    };
    let cuda = gpu_sim::cuda_library().to_str().expect("utf-8");
    for args in [vec![cuda, "0"], vec![cuda, "x", "1"], vec![cuda, "0", "1M"]] {
        assert_eq!(run(&args).status.code(), Some(2), "{args:?}");
    }
    let missing = run(&["/nonexistent/libcuda.so.1", "0", "1"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stdout).starts_with("dlopen "));
    // CUDA_ERROR_INVALID_DEVICE (101) for an ordinal the node does not have.
    let bad_device = run(&[cuda, "5", "1"]);
    assert_eq!(bad_device.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&bad_device.stdout),
        "cuDeviceGet 101\n"
    );
}
