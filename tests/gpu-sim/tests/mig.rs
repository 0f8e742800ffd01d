//! MIG in the fake NVML: modes and their pending state, GPU and compute instance profiles of an
//! A100 80GB and an H100 80GB, placements, MIG device handles and UUIDs, the error codes of a busy
//! GPU or an impossible placement, the node file's initial layout and the `mig-fail` fault switch.
//!
//! `ctests/mig_check.c` (linked `-lnvidia-ml`, compiled once per test process with `$CC`) drives
//! the raw C ABI: `abi` runs its built-in checks, other arguments are a script of MIG commands,
//! one output line each (see the file). `nvml-wrapper` covers what it wraps, in a re-executed
//! child of this test binary.

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

use gpu_sim::{GpuSpec, Mig, NodeSpec, SimNode};
use nvml_wrapper::Nvml;
use nvml_wrapper::error::NvmlError;

const CHILD_ENV: &str = "GPU_SIM_TEST_CHILD";
// NVML return codes.
const SUCCESS: i32 = 0;
const INVALID_ARGUMENT: i32 = 2;
const NOT_SUPPORTED: i32 = 3;
const NO_PERMISSION: i32 = 4;
const IN_USE: i32 = 19;
const INSUFFICIENT_RESOURCES: i32 = 23;
const UNKNOWN: i32 = 999;
// GPU instance profile ids (nvidia-smi's "Profile ID").
const P_1G_10GB: u32 = 19;
const P_2G_20GB: u32 = 14;
const P_3G_40GB: u32 = 9;
const P_4G_40GB: u32 = 5;

fn mig_check_program() -> &'static Path {
    static PROGRAM: OnceLock<PathBuf> = OnceLock::new();
    PROGRAM.get_or_init(|| common::compile_ctest("mig_check.c", "mig-check", &[], &["-lnvidia-ml"]))
}

fn mig_check_output(node: &SimNode, args: &[&str], extra: &[(&str, &str)]) -> Output {
    let (k, v) = gpu_sim::library_path_env();
    Command::new(mig_check_program())
        .args(args)
        .env_remove(gpu_sim::ENV_NODE)
        .env_remove(gpu_sim::ENV_CONTROL)
        .envs(node.env())
        .envs(extra.iter().copied())
        .env(k, v)
        .stdin(Stdio::null())
        .output()
        .expect("run mig-check")
}

/// Runs a script; returns its output lines, each split into words.
fn run(node: &SimNode, args: &[&str]) -> Vec<Vec<String>> {
    run_env(node, args, &[])
}

fn run_env(node: &SimNode, args: &[&str], extra: &[(&str, &str)]) -> Vec<Vec<String>> {
    let output = mig_check_output(node, args, extra);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "mig-check {args:?} failed ({}):\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
        .lines()
        .map(|l| l.split_whitespace().map(str::to_owned).collect())
        .collect()
}

/// The return code (second word) of each line.
fn codes(lines: &[Vec<String>]) -> Vec<i32> {
    lines.iter().map(|l| l[1].parse().expect("code")).collect()
}

/// A MIG device as `list` prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct MigDev {
    uuid: String,
    gi: u32,
    ci: u32,
    mib: u64,
    name: String,
}

fn list(node: &SimNode, gpu: u32) -> Vec<MigDev> {
    let lines = run(node, &["list", &gpu.to_string()]);
    let (count, devs) = lines.split_last().expect("count line");
    let devs: Vec<MigDev> = devs
        .iter()
        .map(|w| {
            assert_eq!(w[0], "dev", "{w:?}");
            MigDev {
                uuid: w[2].clone(),
                gi: w[3].parse().expect("gi id"),
                ci: w[4].parse().expect("ci id"),
                mib: w[5].parse().expect("MiB"),
                name: w[6..].join(" "),
            }
        })
        .collect();
    assert_eq!(count, &vec!["count".to_owned(), devs.len().to_string()]);
    devs
}

fn is_mig_uuid(s: &str) -> bool {
    let Some(rest) = s.strip_prefix("MIG-") else {
        return false;
    };
    let groups: Vec<&str> = rest.split('-').collect();
    groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
        && groups.iter().all(|g| {
            g.chars()
                .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
        })
}

fn node(gpus: Vec<GpuSpec>) -> SimNode {
    SimNode::new(NodeSpec::new(gpus)).expect("sim node")
}

#[test]
fn raw_abi_checks() {
    let node = node(vec![
        GpuSpec::a100_80gb(0),
        GpuSpec::h100_80gb(1),
        GpuSpec::t4(2),
    ]);
    assert_eq!(run(&node, &["abi"]), vec![vec!["abi", "ok"]]);
}

#[test]
fn a100_all_1g_10gb() {
    let node = node(vec![GpuSpec::a100_80gb(0)]);
    let mut script = vec!["set", "0", "1"];
    for _ in 0..7 {
        script.extend(["cgi", "0", "19"]);
    }
    script.extend(["cgi", "0", "19", "cap", "0", "19"]);
    let lines = run(&node, &script);
    assert_eq!(lines[0], ["set", "0", "0"]);
    // The driver's choice without a placement: the highest free start, GI ids 7 + start.
    let ids: Vec<&str> = lines[1..8].iter().map(|l| l[2].as_str()).collect();
    assert_eq!(ids, ["13", "12", "11", "10", "9", "8", "7"]);
    assert!(lines[1..8].iter().all(|l| l[1] == "0"), "{lines:?}");
    assert_eq!(codes(&lines[8..]), [INSUFFICIENT_RESOURCES, SUCCESS]);
    assert_eq!(lines[9][2], "0", "no capacity left");
    // GPU instances without compute instances are no MIG devices yet.
    assert!(list(&node, 0).is_empty());
    let mut script = Vec::new();
    let gis: Vec<String> = (7..14).map(|g: u32| g.to_string()).collect();
    for g in &gis {
        script.extend(["cci", "0", g.as_str(), "0"]);
    }
    assert!(codes(&run(&node, &script)).iter().all(|&c| c == SUCCESS));
    let devs = list(&node, 0);
    assert_eq!(devs.len(), 7);
    assert!(devs.iter().all(|d| is_mig_uuid(&d.uuid)), "{devs:?}");
    assert_eq!(
        devs.iter()
            .map(|d| d.uuid.as_str())
            .collect::<HashSet<_>>()
            .len(),
        7
    );
    for (d, gi) in devs.iter().zip(7..) {
        assert_eq!((d.gi, d.ci, d.mib), (gi, 0, 9728), "{d:?}");
        assert_eq!(d.name, "NVIDIA A100-SXM4-80GB MIG 1g.10gb");
    }
    // Another process sees the same devices with the same UUIDs.
    assert_eq!(list(&node, 0), devs);
}

#[test]
fn a100_two_3g_40gb_and_impossible_placements() {
    let node = node(vec![GpuSpec::a100_80gb(0).with_mig(Mig::Enabled)]);
    let lines = run(
        &node,
        &[
            "cgi", "0", "9", "2", // 3g.40gb starts at 0 or 4 only
            "cgi", "0", "9", "0", "cgi", "0", "9", "4", "cci", "0", "1", "2", "cci", "0", "2", "2",
            "cgi", "0", "5", "cap", "0", "5", "cap", "0", "19", "cgi", "0", "19",
        ],
    );
    assert_eq!(
        codes(&lines),
        [
            INVALID_ARGUMENT,
            SUCCESS,
            SUCCESS,
            SUCCESS,
            SUCCESS,
            INSUFFICIENT_RESOURCES,
            SUCCESS,
            SUCCESS,
            INSUFFICIENT_RESOURCES
        ]
    );
    assert_eq!((lines[1][2].as_str(), lines[2][2].as_str()), ("1", "2"));
    assert_eq!((lines[6][2].as_str(), lines[7][2].as_str()), ("0", "0"));
    let devs = list(&node, 0);
    assert_eq!(
        devs.iter().map(|d| (d.gi, d.ci, d.mib)).collect::<Vec<_>>(),
        [(1, 0, 40192), (2, 0, 40192)]
    );
    assert!(
        devs.iter()
            .all(|d| d.name == "NVIDIA A100-SXM4-80GB MIG 3g.40gb")
    );
    // A colliding placement: 4g.40gb at 0 over the first 3g.40gb, 2g.20gb at 4 over the second.
    let lines = run(&node, &["cgi", "0", "5", "0", "cgi", "0", "14", "4"]);
    assert_eq!(
        codes(&lines),
        [INSUFFICIENT_RESOURCES, INSUFFICIENT_RESOURCES]
    );
    // Repartition: compute instances first, then GPU instances, then 4g.40gb + 3g.40gb.
    let lines = run(
        &node,
        &[
            "dgi", "0", "1", "dci", "0", "1", "0", "dgi", "0", "1", "cgi", "0", "5", "0", "cap",
            "0", "9",
        ],
    );
    assert_eq!(
        codes(&lines),
        [IN_USE, SUCCESS, SUCCESS, SUCCESS, SUCCESS],
        "{lines:?}"
    );
    assert_eq!(lines[3][2], "1", "4g.40gb at start 0 has GI id 1");
    assert_eq!(lines[4][2], "0", "the other half is taken by GI 2");
}

#[test]
fn h100_layout_with_placements() {
    let node = node(vec![GpuSpec::h100_80gb(0).with_mig(Mig::Enabled)]);
    let p4 = P_4G_40GB.to_string();
    let p2 = P_2G_20GB.to_string();
    let p1 = P_1G_10GB.to_string();
    let lines = run(
        &node,
        &[
            "cgi", "0", &p4, "0", "cgi", "0", &p2, "4", "cgi", "0", &p1, "6", "cci", "0", "1", "3",
            "cci", "0", "5", "1", "cci", "0", "13", "0", "cap", "0", &p1, "cgi", "0", &p1,
        ],
    );
    assert_eq!(
        codes(&lines),
        [0, 0, 0, 0, 0, 0, 0, INSUFFICIENT_RESOURCES],
        "{lines:?}"
    );
    assert_eq!(
        lines[..3].iter().map(|l| l[2].as_str()).collect::<Vec<_>>(),
        ["1", "5", "13"]
    );
    assert_eq!(lines[6][2], "0");
    let devs = list(&node, 0);
    assert_eq!(
        devs.iter()
            .map(|d| (d.gi, d.ci, d.mib, d.name.as_str()))
            .collect::<Vec<_>>(),
        [
            (1, 0, 40448, "NVIDIA H100 80GB HBM3 MIG 4g.40gb"),
            (5, 0, 20224, "NVIDIA H100 80GB HBM3 MIG 2g.20gb"),
            (13, 0, 9984, "NVIDIA H100 80GB HBM3 MIG 1g.10gb"),
        ]
    );
}

#[test]
fn initial_layout_from_the_node_file() {
    let node = node(vec![
        GpuSpec::a100_80gb(0)
            .with_mig(Mig::Enabled)
            .with_mig_instance("3g.40gb@4")
            .with_mig_instance("2g.20gb@0 gi-only"),
        GpuSpec::a100_80gb(1),
    ]);
    assert_eq!(
        run(&node, &["mode", "0", "mode", "1"]),
        [["mode", "0", "1", "1"], ["mode", "0", "0", "0"]]
    );
    let devs = list(&node, 0);
    assert_eq!(
        devs.iter().map(|d| (d.gi, d.ci, d.mib)).collect::<Vec<_>>(),
        [(2, 0, 40192)]
    );
    // The 2g.20gb GI at 0 exists (GI id 3) and takes slots 0-1: a 2g.20gb still fits at 2.
    let lines = run(&node, &["cci", "0", "3", "1", "cap", "0", "14"]);
    assert_eq!(codes(&lines), [SUCCESS, SUCCESS]);
    assert_eq!(lines[1][2], "1");
    assert_eq!(list(&node, 0).len(), 2);

    // A layout that cannot exist fails nvmlInit with one line naming it.
    for (mig, spec) in [
        (Mig::Enabled, "4g.40gb@4"),
        (Mig::Enabled, "5g.50gb@0"),
        (Mig::Disabled, "3g.40gb@0"),
    ] {
        let bad = SimNode::new(NodeSpec::new(vec![
            GpuSpec::a100_80gb(0).with_mig(mig).with_mig_instance(spec),
        ]))
        .unwrap();
        let out = mig_check_output(&bad, &["mode", "0"], &[]);
        assert!(!out.status.success(), "{spec}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(&format!("mig_instance '{spec}' cannot be created")),
            "{stderr}"
        );
        assert!(
            stderr.contains(&format!("returned {UNKNOWN}")),
            "nvmlInit_v2 fails: {stderr}"
        );
    }
}

#[test]
fn busy_gpu_mode_change_stays_pending_and_destroy_is_in_use() {
    let node = node(vec![
        GpuSpec::a100_80gb(0),
        GpuSpec::a100_80gb(1)
            .with_mig(Mig::Enabled)
            .with_mig_instance("7g.80gb@0"),
    ]);
    let h0 = node.hold(0, 1 << 30);
    let h1 = node.hold(1, 1 << 30);
    // Enabling while a process holds memory: accepted, not activated (IN_USE), pending.
    let lines = run(&node, &["set", "0", "1", "mode", "0"]);
    assert_eq!(lines, [vec!["set", "0", "19"], vec!["mode", "0", "0", "1"]]);
    // Destroying the instance a process may be using: IN_USE, nothing destroyed.
    let lines = run(&node, &["dci", "1", "0", "0", "dgi", "1", "0"]);
    assert_eq!(codes(&lines), [IN_USE, IN_USE]);
    assert_eq!(list(&node, 1).len(), 1);
    drop(h0);
    drop(h1);
    // Still pending until the caller retries on the idle GPU (NVML's documented contract).
    assert_eq!(run(&node, &["mode", "0"]), [["mode", "0", "0", "1"]]);
    let lines = run(
        &node,
        &[
            "set", "0", "1", "mode", "0", "dci", "1", "0", "0", "dgi", "1", "0",
        ],
    );
    assert_eq!(
        lines,
        [
            vec!["set", "0", "0"],
            vec!["mode", "0", "1", "1"],
            vec!["dci", "0"],
            vec!["dgi", "0"]
        ]
    );
    assert!(list(&node, 1).is_empty());
}

#[test]
fn node_file_process_makes_the_gpu_busy() {
    let node = node(vec![GpuSpec::a100_80gb(0).with_process(4242, 2048)]);
    assert_eq!(
        run(&node, &["set", "0", "1", "set", "0", "1", "mode", "0"]),
        [
            vec!["set", "0", "19"],
            vec!["set", "0", "19"],
            vec!["mode", "0", "0", "1"]
        ]
    );
}

#[test]
fn not_supported_without_mig() {
    let node = node(vec![
        GpuSpec::t4(0),
        GpuSpec::new("Tesla V100-SXM2-32GB", 32768, 1),
    ]);
    for g in ["0", "1"] {
        let lines = run(&node, &["mode", g, "set", g, "1", "cgi", g, "19"]);
        assert_eq!(
            codes(&lines),
            [NOT_SUPPORTED, NOT_SUPPORTED, NOT_SUPPORTED],
            "{lines:?}"
        );
    }
    assert_eq!(list(&node, 0), []);
}

#[test]
fn fault_switch_fails_the_next_creations_node_wide() {
    let node = node(vec![
        GpuSpec::a100_80gb(0).with_mig(Mig::Enabled),
        GpuSpec::a100_80gb(1).with_mig(Mig::Enabled),
    ]);
    let uuid0 = node.spec().gpus[0].uuid.clone();
    node.fail_mig_creations(&uuid0, 2, INSUFFICIENT_RESOURCES as u32)
        .unwrap();
    let p3 = P_3G_40GB.to_string();
    // One failure consumed by this process, on GPU 0 only.
    let lines = run(&node, &["cgi", "0", &p3, "0", "cgi", "1", &p3, "0"]);
    assert_eq!(codes(&lines), [INSUFFICIENT_RESOURCES, SUCCESS]);
    // The second by another process; then creations work again.
    let lines = run(&node, &["cgi", "0", &p3, "0", "cgi", "0", &p3, "0"]);
    assert_eq!(codes(&lines), [INSUFFICIENT_RESOURCES, SUCCESS]);
    // A compute instance creation counts too; a failed creation leaves nothing behind.
    node.fail_mig_creations(&uuid0, 1, UNKNOWN as u32).unwrap();
    let lines = run(&node, &["cci", "0", "1", "2", "cci", "0", "1", "2"]);
    assert_eq!(codes(&lines), [UNKNOWN, SUCCESS]);
    assert_eq!(list(&node, 0).len(), 1);
    // Count 0 disarms.
    node.fail_mig_creations(&uuid0, 5, UNKNOWN as u32).unwrap();
    node.fail_mig_creations(&uuid0, 0, UNKNOWN as u32).unwrap();
    assert_eq!(codes(&run(&node, &["cgi", "0", &p3, "4"])), [SUCCESS]);
}

#[test]
fn unprivileged_caller_gets_no_permission() {
    let node = node(vec![
        GpuSpec::a100_80gb(0)
            .with_mig_instance("3g.40gb@0")
            .with_mig(Mig::Enabled),
    ]);
    let env = [("GPU_SIM_NVML_UNPRIVILEGED", "1")];
    let lines = run_env(
        &node,
        &[
            "set", "0", "0", "cgi", "0", "9", "4", "dci", "0", "1", "0", "mode", "0",
        ],
        &env,
    );
    assert_eq!(
        codes(&lines),
        [NO_PERMISSION, NO_PERMISSION, NO_PERMISSION, SUCCESS]
    );
}

// ---------------------------------------------------------------------------------------------
// Through nvml-wrapper (in a re-executed child)
// ---------------------------------------------------------------------------------------------

fn child_run(name: &str, node: &SimNode) {
    let exe = std::env::current_exe().expect("current_exe");
    let output = Command::new(exe)
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, name)
        .env_remove(gpu_sim::ENV_NODE)
        .env_remove(gpu_sim::ENV_CONTROL)
        .envs(node.env())
        .stdin(Stdio::null())
        .output()
        .expect("spawn child");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("test result: ok. 1 passed"),
        "child for {name} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn nvml_wrapper_mig_devices() {
    const NAME: &str = "nvml_wrapper_mig_devices";
    if std::env::var(CHILD_ENV).is_ok_and(|v| v == NAME) {
        let nvml = Nvml::builder()
            .lib_path(gpu_sim::nvml_library().as_os_str())
            .init()
            .unwrap();
        let a100 = nvml.device_by_index(0).unwrap();
        let t4 = nvml.device_by_index(1).unwrap();
        assert!(matches!(t4.mig_mode(), Err(NvmlError::NotSupported)));
        assert!(matches!(
            t4.set_mig_mode(true),
            Err(NvmlError::NotSupported)
        ));
        assert_eq!(t4.mig_device_count().unwrap(), 0);
        assert!(!t4.mig_is_mig_device_handle().unwrap());
        let mode = a100.mig_mode().unwrap();
        assert_eq!((mode.current, mode.pending), (0, 0));
        assert_eq!(a100.mig_device_count().unwrap(), 0);
        assert_eq!(
            a100.set_mig_mode(true).unwrap(),
            0,
            "activated at once when idle"
        );
        let mode = a100.mig_mode().unwrap();
        assert_eq!((mode.current, mode.pending), (1, 1));
        assert_eq!(a100.mig_device_count().unwrap(), 7);
        // The layout made by the parent (below) before this child started is not there: MIG
        // was off; it is made now by another process through the raw ABI.
        assert!(matches!(
            a100.mig_device_by_index(0),
            Err(NvmlError::NotFound)
        ));
        return;
    }
    let node = node(vec![GpuSpec::a100_80gb(0), GpuSpec::t4(1)]);
    child_run(NAME, &node);
    // The child's mode change is node-wide.
    assert_eq!(run(&node, &["mode", "0"]), [["mode", "0", "1", "1"]]);
    // 2c.3g.40gb takes compute slices 0-1, 1c.3g.40gb then the free slice 2.
    let lines = run(
        &node,
        &[
            "cgi", "0", "9", "4", "cci", "0", "2", "1", "cci", "0", "2", "0",
        ],
    );
    assert_eq!(codes(&lines), [0, 0, 0]);
    child_run("nvml_wrapper_mig_devices_listed", &node);
}

#[test]
fn nvml_wrapper_mig_devices_listed() {
    const NAME: &str = "nvml_wrapper_mig_devices_listed";
    if !std::env::var(CHILD_ENV).is_ok_and(|v| v == NAME) {
        return; // run as the second child of nvml_wrapper_mig_devices
    }
    let nvml = Nvml::builder()
        .lib_path(gpu_sim::nvml_library().as_os_str())
        .init()
        .unwrap();
    let a100 = nvml.device_by_index(0).unwrap();
    let parent_uuid = a100.uuid().unwrap();
    let mut uuids = HashSet::new();
    for (i, name) in [(0, "2c.3g.40gb"), (1, "1c.3g.40gb")] {
        let m = a100.mig_device_by_index(i).unwrap();
        assert!(m.mig_is_mig_device_handle().unwrap());
        assert_eq!(m.mig_parent_device().unwrap().uuid().unwrap(), parent_uuid);
        let uuid = m.uuid().unwrap();
        assert!(is_mig_uuid(&uuid), "{uuid}");
        assert!(uuids.insert(uuid));
        assert_eq!(
            m.name().unwrap(),
            format!("NVIDIA A100-SXM4-80GB MIG {name}")
        );
        let mem = m.memory_info().unwrap();
        assert_eq!(mem.total, 40192 * 1024 * 1024);
        assert!(matches!(m.mig_mode(), Err(NvmlError::NotSupported)));
        assert!(m.running_compute_processes().unwrap().is_empty());
    }
    assert!(matches!(
        a100.mig_device_by_index(2),
        Err(NvmlError::NotFound)
    ));
    assert!(matches!(
        a100.mig_device_by_index(7),
        Err(NvmlError::InvalidArg)
    ));
    assert!(a100.mig_parent_device().is_err());
}

#[test]
fn concurrent_creations_from_two_processes_never_collide() {
    let node = node(vec![GpuSpec::a100_80gb(0).with_mig(Mig::Enabled)]);
    let mut script = Vec::new();
    for _ in 0..7 {
        script.extend(["cgi", "0", "19"]);
    }
    let spawn = || {
        let (k, v) = gpu_sim::library_path_env();
        Command::new(mig_check_program())
            .args(&script)
            .envs(node.env())
            .env(k, v)
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn mig-check")
    };
    let (a, b) = (spawn(), spawn());
    let mut ids = Vec::new();
    for child in [a, b] {
        let out = child.wait_with_output().expect("wait");
        assert!(out.status.success());
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let w: Vec<&str> = line.split_whitespace().collect();
            match w[1] {
                "0" => ids.push(w[2].parse::<u32>().expect("id")),
                "23" => {}
                other => panic!("unexpected code {other} in {line}"),
            }
        }
    }
    ids.sort_unstable();
    assert_eq!(ids, (7..14).collect::<Vec<_>>(), "each slot once");
}
