//! The fake `libcuda.so.1` driven by C programs, the way CUDA programs (and, later, the limiter's
//! tests under `LD_PRELOAD`) use the driver.
//!
//! `ctests/driver_check.c` is linked with `-lcuda` and runs one scenario per invocation, checking
//! exact `CUresult` codes itself and printing `key=value` lines asserted on here.
//! `ctests/proc_address.c` reaches the driver only through `dlopen("libcuda.so.1")`, `dlsym` and
//! `cuGetProcAddress(_v2)`. Both are compiled once per test process with `$CC` (default `cc`) and
//! run with `LD_LIBRARY_PATH` pointing at the fake and `GPU_SIM_NODE` at a fresh simulated node.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;

use gpu_sim::{GpuSpec, NodeSpec, SimNode};

const MIB: u64 = 1024 * 1024;
const CHILD_ENV: &str = "GPU_SIM_TEST_CHILD";

// ---------------------------------------------------------------------------------------------
// Building and running the C programs
// ---------------------------------------------------------------------------------------------

struct Programs {
    driver_check: PathBuf,
    proc_address: PathBuf,
}

fn programs() -> &'static Programs {
    static PROGRAMS: OnceLock<Programs> = OnceLock::new();
    PROGRAMS.get_or_init(|| Programs {
        driver_check: common::compile_ctest("driver_check.c", "driver-check", &[], &["-lcuda"]),
        proc_address: common::compile_ctest("proc_address.c", "proc-address", &[], &["-ldl"]),
    })
}

/// A command for `program` that sees `node` (if any) and loads the fake libcuda by name.
fn command(program: &Path, node: Option<&SimNode>) -> Command {
    let mut cmd = Command::new(program);
    cmd.env_remove(gpu_sim::ENV_NODE)
        .env_remove(gpu_sim::ENV_CONTROL)
        .env_remove("CUDA_VISIBLE_DEVICES")
        .env_remove(CHILD_ENV)
        .envs([gpu_sim::library_path_env()])
        .stdin(Stdio::null());
    if let Some(node) = node {
        cmd.envs(node.env());
    }
    cmd
}

fn check(args: &[&str], output: Output) -> HashMap<String, String> {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{args:?} failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        output.status
    );
    parse(&stdout)
}

fn parse(stdout: &str) -> HashMap<String, String> {
    stdout
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// Runs a driver-check scenario to completion; it must end with "ok".
fn scenario(node: Option<&SimNode>, args: &[&str]) -> HashMap<String, String> {
    scenario_env(node, args, &[])
}

fn scenario_env(
    node: Option<&SimNode>,
    args: &[&str],
    env: &[(&str, &str)],
) -> HashMap<String, String> {
    let output = command(&programs().driver_check, node)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run driver-check");
    let completed = String::from_utf8_lossy(&output.stdout)
        .lines()
        .last()
        .is_some_and(|l| l == "ok");
    let values = check(args, output);
    assert!(completed, "{args:?} did not finish with ok: {values:?}");
    values
}

fn num(values: &HashMap<String, String>, key: &str) -> u64 {
    values
        .get(key)
        .unwrap_or_else(|| panic!("no {key} in {values:?}"))
        .parse()
        .unwrap_or_else(|e| panic!("{key}: {e}"))
}

/// An interactive `driver-check` (hold, failed-midway): reads its output line by line and
/// answers on stdin.
struct Interactive {
    child: Child,
    out: BufReader<std::process::ChildStdout>,
    seen: String,
}

impl Interactive {
    fn start(node: &SimNode, args: &[&str]) -> Self {
        let mut child = command(&programs().driver_check, Some(node))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn driver-check");
        let out = BufReader::new(child.stdout.take().expect("stdout"));
        Self {
            child,
            out,
            seen: String::new(),
        }
    }

    /// Reads until the line `marker`; returns the key=value lines seen so far.
    fn until(&mut self, marker: &str) -> HashMap<String, String> {
        loop {
            let mut line = String::new();
            let n = self.out.read_line(&mut line).expect("read child");
            assert!(
                n > 0,
                "child ended before {marker:?}; output:\n{}",
                self.seen
            );
            self.seen.push_str(&line);
            if line.trim_end() == marker {
                return parse(&self.seen);
            }
        }
    }

    fn proceed(&mut self) {
        let stdin = self.child.stdin.as_mut().expect("stdin");
        stdin.write_all(b"go\n").expect("write child");
        stdin.flush().expect("flush child");
    }

    fn finish(mut self) -> HashMap<String, String> {
        drop(self.child.stdin.take());
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut self.out, &mut rest).expect("read child");
        self.seen.push_str(&rest);
        let status = self.child.wait().expect("wait child");
        assert!(
            status.success() && self.seen.lines().last() == Some("ok"),
            "child failed ({status}):\n{}",
            self.seen
        );
        parse(&self.seen)
    }
}

fn t4_node(count: u32) -> SimNode {
    SimNode::new(NodeSpec::uniform(count, GpuSpec::t4)).expect("write node")
}

/// Memory a GPU of the node can hand out: total - reserved - the node file's used memory.
fn capacity(spec: &GpuSpec) -> u64 {
    let reserved = spec.memory_reserved_mib.unwrap_or(spec.memory_mib / 200);
    let processes: u64 = spec.processes.iter().map(|p| p.used_mib).sum();
    (spec.memory_mib - reserved - spec.memory_used_mib - processes) * MIB
}

const CONTEXT: u64 = NodeSpec::DEFAULT_CUDA_CONTEXT_MIB * MIB;

// ---------------------------------------------------------------------------------------------
// Initialisation, devices, contexts
// ---------------------------------------------------------------------------------------------

#[test]
fn calls_before_cuinit_fail_and_cuinit_needs_a_node() {
    let node =
        SimNode::new(NodeSpec::uniform(1, GpuSpec::a100_80gb).with_driver("535.161.08", 12020))
            .unwrap();
    let with_node = check(
        &["before-init"],
        command(&programs().driver_check, Some(&node))
            .arg("before-init")
            .output()
            .unwrap(),
    );
    assert_eq!(with_node["driver_version"], "12020");
    assert_eq!(with_node["init"], "0");
    assert_eq!(with_node["init_again"], "0");
    assert_eq!(with_node["count_after"], "0");

    // No node file: what the driver answers on a machine whose kernel module sees no GPU
    // (CUDA_ERROR_NO_DEVICE), for good: later calls say NOT_INITIALIZED.
    let without = check(
        &["before-init"],
        command(&programs().driver_check, None)
            .arg("before-init")
            .output()
            .unwrap(),
    );
    assert_eq!(without["driver_version"], "12040");
    assert_eq!(without["init"], "100");
    assert_eq!(without["init_again"], "100");
    assert_eq!(without["count_after"], "3");

    // A node without GPUs, and one with every GPU hidden: also NO_DEVICE.
    let empty = SimNode::new(NodeSpec::new(Vec::new())).unwrap();
    assert_eq!(scenario_no_ok(&empty, &["visible"], &[])["init"], "100");
    assert_eq!(
        scenario_no_ok(&node, &["visible"], &[("CUDA_VISIBLE_DEVICES", "")])["init"],
        "100"
    );
}

fn scenario_no_ok(node: &SimNode, args: &[&str], env: &[(&str, &str)]) -> HashMap<String, String> {
    let output = command(&programs().driver_check, Some(node))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run driver-check");
    check(args, output)
}

#[test]
fn devices_and_contexts_behave_like_the_driver() {
    let spec = NodeSpec::new(vec![GpuSpec::a100_80gb(0), GpuSpec::t4(1)]);
    let node = SimNode::new(spec.clone()).unwrap();
    let v = scenario(Some(&node), &["basics"]);
    assert_eq!(v["count"], "2");
    for (i, gpu) in spec.gpus.iter().enumerate() {
        assert_eq!(v[&format!("dev{i}.name")], gpu.name);
        assert_eq!(
            v[&format!("dev{i}.uuid")],
            gpu.uuid.trim_start_matches("GPU-").replace('-', "")
        );
        assert_eq!(num(&v, &format!("dev{i}.total")), gpu.memory_mib * MIB);
        assert_eq!(v[&format!("dev{i}.pci")], gpu.pci_bus_id);
    }
    assert_eq!(v["dev0.cc"], "8.0");
    assert_eq!(v["dev0.sms"], "108");
    assert_eq!(v["dev1.cc"], "7.5");
    assert_eq!(v["name201"], "CUDA_ERROR_INVALID_CONTEXT");
    assert_eq!(v["string100"], "no CUDA-capable device is detected");
}

#[test]
fn cuda_visible_devices_selects_and_orders_gpus() {
    let spec = NodeSpec::uniform(3, GpuSpec::a100_40gb);
    let node = SimNode::new(spec.clone()).unwrap();
    let visible =
        |value: &str| scenario_no_ok(&node, &["visible"], &[("CUDA_VISIBLE_DEVICES", value)]);

    let v = visible("2,0");
    assert_eq!(v["count"], "2");
    assert_eq!(v["dev0.pci"], spec.gpus[2].pci_bus_id);
    assert_eq!(v["dev1.pci"], spec.gpus[0].pci_bus_id);
    // A UUID prefix works; the list ends at the first bad or repeated entry.
    let v = visible(&format!("{},0", &spec.gpus[1].uuid[..12]));
    assert_eq!(v["count"], "2");
    assert_eq!(v["dev0.pci"], spec.gpus[1].pci_bus_id);
    assert_eq!(v["dev1.pci"], spec.gpus[0].pci_bus_id);
    assert_eq!(visible("1,1,0")["count"], "1");
    assert_eq!(visible("0,bogus,1")["count"], "1");
    assert_eq!(visible("7")["init"], "100");
}

#[test]
fn a_forked_child_cannot_use_the_parents_driver() {
    scenario(Some(&t4_node(1)), &["fork"]);
}

// ---------------------------------------------------------------------------------------------
// Memory
// ---------------------------------------------------------------------------------------------

#[test]
fn allocations_are_accounted_with_the_driver_granularity() {
    let spec = NodeSpec::uniform(1, GpuSpec::t4);
    let node = SimNode::new(spec.clone()).unwrap();
    let v = scenario(Some(&node), &["alloc"]);
    let gpu = &spec.gpus[0];
    assert_eq!(num(&v, "total"), gpu.memory_mib * MIB);
    assert_eq!(num(&v, "free_with_context"), capacity(gpu) - CONTEXT);
    // Small allocations share a 2 MiB page; large ones take whole 2 MiB pages.
    assert_eq!(num(&v, "after_1_byte"), 2 * MIB);
    assert_eq!(num(&v, "after_2_small"), 2 * MIB);
    assert_eq!(num(&v, "after_large"), 4 * MIB);
    assert_eq!(num(&v, "after_3mib"), 8 * MIB);
    assert_eq!(num(&v, "after_free_most"), 2 * MIB);
    assert_eq!(num(&v, "pitch"), 1024);
    assert_eq!(num(&v, "after_pitch"), 4 * MIB);
    assert_eq!(
        num(&v, "after_managed"),
        0,
        "managed memory is not device memory"
    );
    assert_eq!(num(&v, "after_managed_beyond_free"), 0);
    assert_eq!(num(&v, "after_async"), 12 * MIB);
    assert_eq!(num(&v, "before_destroy_used"), 66 * MIB);
    // The process exited normally: it gave everything back.
    let state = node.cuda_state().unwrap().expect("state file");
    assert_eq!(state.devices[0].used_bytes, 0);
    assert!(state.processes.is_empty(), "{:?}", state.processes);
}

#[test]
fn graph_memory_is_taken_at_launch_and_kept_by_the_pool_until_trimmed() {
    let node = SimNode::new(NodeSpec::uniform(1, GpuSpec::a100_80gb)).unwrap();
    let v = scenario(Some(&node), &["graphs"]);
    assert_eq!(num(&v, "after_nodes"), 0, "nodes only reserve addresses");
    // 3 MiB and 8 MiB nodes, in whole 2 MiB pages: 4 + 8.
    assert_eq!(num(&v, "after_launch"), 12 * MIB);
    assert_eq!(
        num(&v, "after_free"),
        12 * MIB,
        "freed memory stays in the graph pool"
    );
    assert_eq!(
        num(&v, "after_relaunch"),
        12 * MIB,
        "a relaunch reuses the pool"
    );
    assert_eq!(num(&v, "after_trim"), 0);
    assert_eq!(
        num(&v, "after_capture"),
        0,
        "captured allocations are nodes"
    );
    assert_eq!(num(&v, "after_capture_launch"), 8 * MIB);
    assert_eq!(num(&v, "after_capture_trim"), 0);
    // Another graph's free: the memory outlives its own graph until the freeing graph runs.
    assert_eq!(num(&v, "cross_live"), 6 * MIB);
    assert_eq!(num(&v, "cross_freed"), 0);
}

#[test]
fn out_of_memory_exactly_at_capacity() {
    let gpu = GpuSpec::t4(0).with_memory_used_mib(1000);
    let node = SimNode::new(NodeSpec::new(vec![gpu.clone()]).with_cuda_context_mib(250)).unwrap();
    let v = scenario(Some(&node), &["oom"]);
    assert_eq!(num(&v, "free"), capacity(&gpu) - 250 * MIB);
}

#[test]
fn two_processes_share_one_gpu() {
    let spec = NodeSpec::uniform(2, GpuSpec::a100_80gb);
    let node = SimNode::new(spec.clone()).unwrap();
    let cap = capacity(&spec.gpus[1]);

    let mut holder = Interactive::start(&node, &["hold", "1", "1000"]);
    let held = holder.until("holding");
    let holder_pid: u32 = held["pid"].parse().unwrap();
    assert_eq!(num(&held, "free"), cap - CONTEXT - 1000 * MIB);

    // The second process sees the first one's context and allocation, on GPU 1 only.
    let seen = scenario(Some(&node), &["meminfo", "1"]);
    assert_eq!(num(&seen, "free"), cap - 2 * CONTEXT - 1000 * MIB);
    assert_eq!(num(&seen, "total"), spec.gpus[1].memory_mib * MIB);
    let other = scenario(Some(&node), &["meminfo", "0"]);
    assert_eq!(num(&other, "free"), capacity(&spec.gpus[0]) - CONTEXT);

    let state = node.cuda_state().unwrap().unwrap();
    assert_eq!(state.devices[1].used_bytes, CONTEXT + 1000 * MIB);
    assert_eq!(
        state.process(holder_pid).expect("holder slot").used_bytes[1],
        CONTEXT + 1000 * MIB
    );

    holder.proceed();
    holder.finish();
    let state = node.cuda_state().unwrap().unwrap();
    assert_eq!(state.devices[1].used_bytes, 0);
    assert!(state.process(holder_pid).is_none());
}

#[test]
fn memory_of_a_killed_process_is_reclaimed() {
    let spec = NodeSpec::uniform(1, GpuSpec::h100_80gb);
    let node = SimNode::new(spec.clone()).unwrap();
    let mut holder = Interactive::start(&node, &["hold", "0", "4096"]);
    let pid: u32 = holder.until("holding")["pid"].parse().unwrap();
    holder.child.kill().unwrap(); // SIGKILL: no destructor runs
    holder.child.wait().unwrap();

    // Nobody has looked yet: the dead process still holds its memory.
    let state = node.cuda_state().unwrap().unwrap();
    assert_eq!(state.devices[0].used_bytes, CONTEXT + 4096 * MIB);
    assert!(state.process(pid).is_some());

    // The next process to ask notices the pid is gone and gives the memory back.
    let seen = scenario(Some(&node), &["meminfo", "0"]);
    assert_eq!(num(&seen, "free"), capacity(&spec.gpus[0]) - CONTEXT);
    let state = node.cuda_state().unwrap().unwrap();
    assert!(state.process(pid).is_none());
    assert_eq!(state.devices[0].used_bytes, 0);
}

#[test]
fn nvml_reports_memory_held_through_cuda() {
    const NAME: &str = "nvml_reports_memory_held_through_cuda";
    if std::env::var(CHILD_ENV).is_ok_and(|v| v == NAME) {
        // In the child: the fake NVML sees the CUDA process's memory and pid.
        let holder: u32 = std::env::var("HOLDER_PID").unwrap().parse().unwrap();
        let nvml = nvml_wrapper::Nvml::builder()
            .lib_path(gpu_sim::nvml_library().as_os_str())
            .init()
            .unwrap();
        let device = nvml.device_by_index(0).unwrap();
        let memory = device.memory_info().unwrap();
        // nvml-wrapper reads nvmlDeviceGetMemoryInfo_v2: "used" excludes the reserved memory.
        assert_eq!(memory.used, 100 * MIB + CONTEXT + 512 * MIB);
        assert_eq!(
            memory.free,
            capacity(&GpuSpec::t4(0)) - 100 * MIB - CONTEXT - 512 * MIB
        );
        let processes = device.running_compute_processes().unwrap();
        let pids: Vec<u32> = processes.iter().map(|p| p.pid).collect();
        assert_eq!(pids, [4242, holder]);
        assert_eq!(
            processes[1].used_gpu_memory,
            nvml_wrapper::enums::device::UsedGpuMemory::Used(CONTEXT + 512 * MIB)
        );
        return;
    }
    let node = SimNode::new(NodeSpec::new(vec![GpuSpec::t4(0).with_process(4242, 100)])).unwrap();
    let mut holder = Interactive::start(&node, &["hold", "0", "512"]);
    let pid = holder.until("holding")["pid"].clone();
    let output = Command::new(std::env::current_exe().unwrap())
        .args([NAME, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, NAME)
        .env("HOLDER_PID", &pid)
        .envs(node.env())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("1 passed"),
        "NVML child failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    holder.proceed();
    holder.finish();
}

#[test]
fn virtual_memory_management_counts_device_locations_only() {
    let v = scenario(Some(&t4_node(1)), &["vmm"]);
    assert_eq!(num(&v, "granularity"), 2 * MIB);
    assert_eq!(num(&v, "recommended"), 2 * MIB);
    assert_eq!(num(&v, "device_create_used"), 8 * MIB);
    assert_eq!(num(&v, "after_host_create_used"), 8 * MIB);
    assert_eq!(num(&v, "released_mapped_used"), 8 * MIB);
    assert_eq!(num(&v, "unmapped_used"), 0);
}

#[test]
fn arrays_take_their_element_bytes() {
    let v = scenario(Some(&t4_node(1)), &["arrays"]);
    assert_eq!(num(&v, "array2d_used"), 16 * MIB);
    assert_eq!(num(&v, "array3d_used"), 28 * MIB);
    // A 4 KiB 1D array and a 16-byte one share one small page.
    assert_eq!(num(&v, "with_small_used"), 30 * MIB);
    // One object of 4 MiB + 1 MiB + 256 KiB + ... (~5.3 MiB), rounded up to 6 MiB.
    assert_eq!(num(&v, "with_mipmap_used"), 36 * MIB);
}

// ---------------------------------------------------------------------------------------------
// Launches and failures
// ---------------------------------------------------------------------------------------------

#[test]
fn launches_are_validated_and_counted() {
    let node = t4_node(2);
    scenario(Some(&node), &["launch", "5"]);
    let state = node.cuda_state().unwrap().unwrap();
    assert_eq!(state.devices[0].launches, 4 * 5);
    assert_eq!(state.devices[0].blocks, (8 + 1 + 8 + 1) * 5);
    assert_eq!(state.devices[0].graph_launches, 5);
    assert_eq!(state.devices[1].launches, 0);
}

#[test]
fn a_gpu_that_fell_off_the_bus() {
    let node = t4_node(2);
    node.fail_gpu(&node.spec().gpus[0].uuid).unwrap();
    assert_eq!(scenario(Some(&node), &["failed-at-start"])["count"], "2");
    node.recover_gpu(&node.spec().gpus[0].uuid).unwrap();

    let mut child = Interactive::start(&node, &["failed-midway"]);
    child.until("step1");
    node.fail_gpu(&node.spec().gpus[0].uuid).unwrap();
    child.proceed();
    child.until("step2");
    node.recover_gpu(&node.spec().gpus[0].uuid).unwrap();
    child.proceed();
    child.finish();
}

// ---------------------------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------------------------

type Rows = &'static [(i32, &'static str)];

/// Base name -> (legacy-stream rows, per-thread-stream rows): (first CUDA version, symbol).
/// Written independently of `csrc/cuda_procs.c`, which must agree with it.
const PROCS: &[(&str, Rows, Rows)] = &[
    ("cuInit", &[(2000, "cuInit")], &[]),
    ("cuDriverGetVersion", &[(2020, "cuDriverGetVersion")], &[]),
    ("cuGetErrorString", &[(6000, "cuGetErrorString")], &[]),
    ("cuGetErrorName", &[(6000, "cuGetErrorName")], &[]),
    (
        "cuGetProcAddress",
        &[(11030, "cuGetProcAddress"), (12000, "cuGetProcAddress_v2")],
        &[],
    ),
    ("cuDeviceGet", &[(2000, "cuDeviceGet")], &[]),
    ("cuDeviceGetCount", &[(2000, "cuDeviceGetCount")], &[]),
    ("cuDeviceGetName", &[(2000, "cuDeviceGetName")], &[]),
    (
        "cuDeviceGetUuid",
        &[(9020, "cuDeviceGetUuid"), (11040, "cuDeviceGetUuid_v2")],
        &[],
    ),
    (
        "cuDeviceTotalMem",
        &[(2000, "cuDeviceTotalMem"), (3020, "cuDeviceTotalMem_v2")],
        &[],
    ),
    (
        "cuDeviceGetAttribute",
        &[(2000, "cuDeviceGetAttribute")],
        &[],
    ),
    ("cuDeviceGetPCIBusId", &[(4010, "cuDeviceGetPCIBusId")], &[]),
    (
        "cuDeviceGetByPCIBusId",
        &[(4010, "cuDeviceGetByPCIBusId")],
        &[],
    ),
    (
        "cuDeviceGetDefaultMemPool",
        &[(11020, "cuDeviceGetDefaultMemPool")],
        &[],
    ),
    (
        "cuCtxCreate",
        &[
            (2000, "cuCtxCreate"),
            (3020, "cuCtxCreate_v2"),
            (11040, "cuCtxCreate_v3"),
            (12050, "cuCtxCreate_v4"),
        ],
        &[],
    ),
    (
        "cuCtxDestroy",
        &[(2000, "cuCtxDestroy"), (4000, "cuCtxDestroy_v2")],
        &[],
    ),
    (
        "cuCtxPushCurrent",
        &[(2000, "cuCtxPushCurrent"), (4000, "cuCtxPushCurrent_v2")],
        &[],
    ),
    (
        "cuCtxPopCurrent",
        &[(2000, "cuCtxPopCurrent"), (4000, "cuCtxPopCurrent_v2")],
        &[],
    ),
    ("cuCtxGetCurrent", &[(4000, "cuCtxGetCurrent")], &[]),
    ("cuCtxSetCurrent", &[(4000, "cuCtxSetCurrent")], &[]),
    ("cuCtxGetDevice", &[(2000, "cuCtxGetDevice")], &[]),
    ("cuCtxSynchronize", &[(2000, "cuCtxSynchronize")], &[]),
    (
        "cuDevicePrimaryCtxRetain",
        &[(7000, "cuDevicePrimaryCtxRetain")],
        &[],
    ),
    (
        "cuDevicePrimaryCtxRelease",
        &[
            (7000, "cuDevicePrimaryCtxRelease"),
            (11000, "cuDevicePrimaryCtxRelease_v2"),
        ],
        &[],
    ),
    (
        "cuDevicePrimaryCtxReset",
        &[
            (7000, "cuDevicePrimaryCtxReset"),
            (11000, "cuDevicePrimaryCtxReset_v2"),
        ],
        &[],
    ),
    (
        "cuDevicePrimaryCtxGetState",
        &[(7000, "cuDevicePrimaryCtxGetState")],
        &[],
    ),
    (
        "cuMemAlloc",
        &[(2000, "cuMemAlloc"), (3020, "cuMemAlloc_v2")],
        &[],
    ),
    (
        "cuMemFree",
        &[(2000, "cuMemFree"), (3020, "cuMemFree_v2")],
        &[],
    ),
    (
        "cuMemGetInfo",
        &[(2000, "cuMemGetInfo"), (3020, "cuMemGetInfo_v2")],
        &[],
    ),
    (
        "cuMemAllocPitch",
        &[(2000, "cuMemAllocPitch"), (3020, "cuMemAllocPitch_v2")],
        &[],
    ),
    ("cuMemAllocManaged", &[(6000, "cuMemAllocManaged")], &[]),
    (
        "cuMemcpyHtoD",
        &[(2000, "cuMemcpyHtoD"), (3020, "cuMemcpyHtoD_v2")],
        &[(7000, "cuMemcpyHtoD_v2_ptds")],
    ),
    (
        "cuMemcpyDtoH",
        &[(2000, "cuMemcpyDtoH"), (3020, "cuMemcpyDtoH_v2")],
        &[(7000, "cuMemcpyDtoH_v2_ptds")],
    ),
    (
        "cuMemcpyDtoD",
        &[(2000, "cuMemcpyDtoD"), (3020, "cuMemcpyDtoD_v2")],
        &[(7000, "cuMemcpyDtoD_v2_ptds")],
    ),
    (
        "cuMemcpyHtoDAsync",
        &[(2000, "cuMemcpyHtoDAsync"), (3020, "cuMemcpyHtoDAsync_v2")],
        &[(7000, "cuMemcpyHtoDAsync_v2_ptsz")],
    ),
    (
        "cuMemcpyDtoHAsync",
        &[(2000, "cuMemcpyDtoHAsync"), (3020, "cuMemcpyDtoHAsync_v2")],
        &[(7000, "cuMemcpyDtoHAsync_v2_ptsz")],
    ),
    ("cuIpcGetMemHandle", &[(4010, "cuIpcGetMemHandle")], &[]),
    (
        "cuIpcOpenMemHandle",
        &[
            (4010, "cuIpcOpenMemHandle"),
            (11000, "cuIpcOpenMemHandle_v2"),
        ],
        &[],
    ),
    ("cuIpcCloseMemHandle", &[(4010, "cuIpcCloseMemHandle")], &[]),
    (
        "cuMemAllocAsync",
        &[(11020, "cuMemAllocAsync")],
        &[(11020, "cuMemAllocAsync_ptsz")],
    ),
    (
        "cuMemFreeAsync",
        &[(11020, "cuMemFreeAsync")],
        &[(11020, "cuMemFreeAsync_ptsz")],
    ),
    (
        "cuMemAllocFromPoolAsync",
        &[(11020, "cuMemAllocFromPoolAsync")],
        &[(11020, "cuMemAllocFromPoolAsync_ptsz")],
    ),
    ("cuMemPoolCreate", &[(11020, "cuMemPoolCreate")], &[]),
    ("cuMemPoolDestroy", &[(11020, "cuMemPoolDestroy")], &[]),
    ("cuMemCreate", &[(10020, "cuMemCreate")], &[]),
    ("cuMemRelease", &[(10020, "cuMemRelease")], &[]),
    (
        "cuMemGetAllocationGranularity",
        &[(10020, "cuMemGetAllocationGranularity")],
        &[],
    ),
    (
        "cuMemAddressReserve",
        &[(10020, "cuMemAddressReserve")],
        &[],
    ),
    ("cuMemAddressFree", &[(10020, "cuMemAddressFree")], &[]),
    ("cuMemMap", &[(10020, "cuMemMap")], &[]),
    ("cuMemUnmap", &[(10020, "cuMemUnmap")], &[]),
    (
        "cuMemRetainAllocationHandle",
        &[(11000, "cuMemRetainAllocationHandle")],
        &[],
    ),
    ("cuMemSetAccess", &[(10020, "cuMemSetAccess")], &[]),
    (
        "cuArrayCreate",
        &[(2000, "cuArrayCreate"), (3020, "cuArrayCreate_v2")],
        &[],
    ),
    (
        "cuArray3DCreate",
        &[(2000, "cuArray3DCreate"), (3020, "cuArray3DCreate_v2")],
        &[],
    ),
    ("cuArrayDestroy", &[(2000, "cuArrayDestroy")], &[]),
    (
        "cuMipmappedArrayCreate",
        &[(5000, "cuMipmappedArrayCreate")],
        &[],
    ),
    (
        "cuMipmappedArrayDestroy",
        &[(5000, "cuMipmappedArrayDestroy")],
        &[],
    ),
    ("cuModuleLoad", &[(2000, "cuModuleLoad")], &[]),
    ("cuModuleLoadData", &[(2000, "cuModuleLoadData")], &[]),
    ("cuModuleLoadDataEx", &[(2010, "cuModuleLoadDataEx")], &[]),
    ("cuModuleUnload", &[(2000, "cuModuleUnload")], &[]),
    ("cuModuleGetFunction", &[(2000, "cuModuleGetFunction")], &[]),
    ("cuStreamCreate", &[(2000, "cuStreamCreate")], &[]),
    (
        "cuStreamDestroy",
        &[(2000, "cuStreamDestroy"), (4000, "cuStreamDestroy_v2")],
        &[],
    ),
    (
        "cuStreamSynchronize",
        &[(2000, "cuStreamSynchronize")],
        &[(7000, "cuStreamSynchronize_ptsz")],
    ),
    (
        "cuLaunchKernel",
        &[(4000, "cuLaunchKernel")],
        &[(7000, "cuLaunchKernel_ptsz")],
    ),
    (
        "cuLaunchKernelEx",
        &[(11060, "cuLaunchKernelEx")],
        &[(11060, "cuLaunchKernelEx_ptsz")],
    ),
    (
        "cuLaunchCooperativeKernel",
        &[(9000, "cuLaunchCooperativeKernel")],
        &[(9000, "cuLaunchCooperativeKernel_ptsz")],
    ),
    (
        "cuGraphLaunch",
        &[(10000, "cuGraphLaunch")],
        &[(10000, "cuGraphLaunch_ptsz")],
    ),
    ("cuGraphCreate", &[(10000, "cuGraphCreate")], &[]),
    ("cuGraphDestroy", &[(10000, "cuGraphDestroy")], &[]),
    (
        "cuGraphAddMemAllocNode",
        &[(11040, "cuGraphAddMemAllocNode")],
        &[],
    ),
    (
        "cuGraphAddMemFreeNode",
        &[(11040, "cuGraphAddMemFreeNode")],
        &[],
    ),
    (
        "cuGraphInstantiateWithFlags",
        &[(11040, "cuGraphInstantiateWithFlags")],
        &[],
    ),
    ("cuGraphExecDestroy", &[(10000, "cuGraphExecDestroy")], &[]),
    (
        "cuDeviceGraphMemTrim",
        &[(11040, "cuDeviceGraphMemTrim")],
        &[],
    ),
    (
        "cuStreamBeginCapture",
        &[(10010, "cuStreamBeginCapture_v2")],
        &[(10010, "cuStreamBeginCapture_v2_ptsz")],
    ),
    (
        "cuStreamEndCapture",
        &[(10000, "cuStreamEndCapture")],
        &[(10000, "cuStreamEndCapture_ptsz")],
    ),
    (
        "cuStreamIsCapturing",
        &[(10000, "cuStreamIsCapturing")],
        &[(10000, "cuStreamIsCapturing_ptsz")],
    ),
];

/// What cuGetProcAddress_v2 must answer: (CUresult, symbolStatus, symbol or "-").
fn expected(base: &str, version: i32, per_thread: bool) -> (i32, i32, &'static str) {
    let Some((_, legacy, ptds)) = PROCS.iter().find(|(name, _, _)| *name == base) else {
        return (500, 1, "-"); // CUDA_ERROR_NOT_FOUND, CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND
    };
    let pick = |rows: Rows| {
        rows.iter()
            .filter(|(v, _)| *v <= version)
            .max_by_key(|(v, _)| *v)
            .map(|(_, s)| *s)
    };
    let found = if per_thread { pick(ptds) } else { None }.or_else(|| pick(legacy));
    match found {
        Some(symbol) => (0, 0, symbol),
        None => (500, 2, "-"), // CU_GET_PROC_ADDRESS_VERSION_NOT_SUFFICIENT
    }
}

fn resolve(version: i32, flags: u64, names: &[&str]) -> Vec<(String, i32, i32, String)> {
    let mut args = vec!["resolve".to_owned(), version.to_string(), flags.to_string()];
    args.extend(names.iter().map(|n| (*n).to_owned()));
    let output = command(&programs().proc_address, None)
        .args(&args)
        .output()
        .expect("run proc-address");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "proc-address {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
        .lines()
        .map(|line| {
            let f: Vec<&str> = line.split(' ').collect();
            assert_eq!(f.len(), 4, "{line}");
            (
                f[0].to_owned(),
                f[1].parse().expect("result"),
                f[2].parse().expect("status"),
                f[3].to_owned(),
            )
        })
        .collect()
}

#[test]
fn cu_get_proc_address_maps_names_by_version_and_stream_mode() {
    let mut names: Vec<&str> = PROCS.iter().map(|(n, _, _)| *n).collect();
    // Not base names: unknown functions, and suffixed names (only base names are looked up).
    names.extend([
        "cuNoSuchFunction",
        "cuMemAlloc_v2",
        "cuLaunchKernel_ptsz",
        "",
    ]);
    for (version, flags) in [
        (11030, 0),
        (12040, 0),
        (12040, 1), // CU_GET_PROC_ADDRESS_LEGACY_STREAM
        (12040, 2), // CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM
        (11030, 2),
        (12050, 0),
        (3000, 0),
        (6050, 2), // before per-thread default streams existed
    ] {
        let got = resolve(version, flags, &names);
        assert_eq!(got.len(), names.len());
        for (name, result, status, symbol) in got {
            let (want_result, want_status, want_symbol) = expected(&name, version, flags == 2);
            assert_eq!(
                (result, status, symbol.as_str()),
                (want_result, want_status, want_symbol),
                "cuGetProcAddress_v2({name:?}, {version}, {flags})"
            );
        }
    }
    // Spot checks of the rules themselves.
    assert_eq!(expected("cuMemAlloc", 11030, false).2, "cuMemAlloc_v2");
    assert_eq!(expected("cuMemAlloc", 3000, false).2, "cuMemAlloc");
    assert_eq!(
        expected("cuLaunchKernel", 12040, true).2,
        "cuLaunchKernel_ptsz"
    );
    assert_eq!(expected("cuMemAlloc", 12040, true).2, "cuMemAlloc_v2");
    assert_eq!(expected("cuCtxCreate", 12040, false).2, "cuCtxCreate_v3");
    assert_eq!(expected("cuMemAllocAsync", 11000, false), (500, 2, "-"));
}

/// Every symbol the table can hand out.
fn exported_symbols() -> BTreeSet<&'static str> {
    PROCS
        .iter()
        .flat_map(|(_, legacy, ptds)| legacy.iter().chain(ptds.iter()).map(|(_, s)| *s))
        .collect()
}

#[test]
fn dlopen_and_dlsym_reach_every_entry_point() {
    let symbols = exported_symbols();
    let node = t4_node(3);
    let mut cmd = command(&programs().proc_address, Some(&node));
    cmd.arg("dlsym").args(&symbols);
    let v = check(&["dlsym"], cmd.output().unwrap());
    assert_eq!(v["count"], "3");
    assert_eq!(v["missing"], "");

    // Exactly these names are exported. binutils' nm comes with the C toolchain that built the
    // library; without it this check must fail, not pass unchecked.
    let out = Command::new("nm")
        .args(["-D", "--defined-only"])
        .arg(gpu_sim::cuda_library())
        .output()
        .expect("run nm (binutils) to list libcuda.so.1's exports");
    assert!(
        out.status.success(),
        "nm failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let exported: BTreeSet<&str> = text
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2))
        .collect();
    assert_eq!(exported, symbols);
}

// ---------------------------------------------------------------------------------------------
// Copies, frees without a context, IPC handles, access rights (what numba and cuda-python use)
// ---------------------------------------------------------------------------------------------

#[test]
fn copies_round_trip_through_every_variant_and_refuse_what_the_driver_refuses() {
    let node = SimNode::new(NodeSpec::uniform(1, GpuSpec::a100_80gb)).unwrap();
    scenario(Some(&node), &["copies"]);
}

#[test]
fn cu_mem_free_without_a_current_context_frees_by_address() {
    let node = SimNode::new(NodeSpec::uniform(1, GpuSpec::a100_80gb)).unwrap();
    let v = scenario(Some(&node), &["free-without-context"]);
    assert_eq!(num(&v, "freed"), 64 * MIB);
}

#[test]
fn ipc_handles_open_in_another_process_without_a_charge_and_die_with_the_exporter() {
    let node = SimNode::new(NodeSpec::uniform(1, GpuSpec::a100_80gb)).unwrap();
    let mut exporter = Interactive::start(&node, &["ipc-export"]);
    let handle = exporter.until("exported")["handle"].clone();
    let used_by_exporter = node.cuda_state().unwrap().unwrap().devices[0].used_bytes;
    scenario(Some(&node), &["ipc-import", &handle, "alive"]);
    // The importer's context is gone with it; the exporter's memory was never charged twice.
    assert_eq!(
        node.cuda_state().unwrap().unwrap().devices[0].used_bytes,
        used_by_exporter
    );
    exporter.proceed();
    exporter.finish();
    scenario(Some(&node), &["ipc-import", &handle, "gone"]);
}

#[test]
fn cu_mem_set_access_needs_mapped_memory_and_a_valid_descriptor() {
    let node = SimNode::new(NodeSpec::uniform(1, GpuSpec::a100_80gb)).unwrap();
    scenario(Some(&node), &["set-access"]);
}
