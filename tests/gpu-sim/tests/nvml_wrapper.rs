//! The fake `libnvidia-ml.so.1` seen through the real `nvml-wrapper`, the way the node agent sees it.
//!
//! The fake reads `GPU_SIM_NODE` / `GPU_SIM_CONTROL` when NVML is initialised and keeps process-wide
//! state, and a test cannot set environment variables in its own process (`set_var` is `unsafe`). So
//! every scenario runs in a child process: the test re-executes this binary, filtered to itself
//! (`<name> --exact`), with the simulated node's environment plus `GPU_SIM_TEST_CHILD=<name>`; in the
//! child the same test function sees that variable and runs the NVML part. This works the same under
//! `cargo test` (tests as threads of one process) and `cargo nextest` (one process per test).

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use gpu_sim::{ControlLog, GpuSpec, Mig, NodeSpec, SimNode};
use nvml_wrapper::Nvml;
use nvml_wrapper::bitmasks::InitFlags;
use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::enums::event::XidError;
use nvml_wrapper::error::NvmlError;

const CHILD_ENV: &str = "GPU_SIM_TEST_CHILD";
const READY: &str = "GPU_SIM_CHILD_READY";
const MIB: u64 = 1024 * 1024;

// ---------------------------------------------------------------------------------------------
// Child-process plumbing
// ---------------------------------------------------------------------------------------------

/// True in the child process started for test `name`.
fn is_child(name: &str) -> bool {
    std::env::var(CHILD_ENV).is_ok_and(|v| v == name)
}

/// This test binary, filtered to test `name`, with exactly `env` as the simulator environment.
fn child_command(name: &str, env: &[(String, String)]) -> Command {
    let exe = std::env::current_exe().expect("current_exe");
    let mut cmd = Command::new(exe);
    cmd.args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, name)
        .env_remove(gpu_sim::ENV_NODE)
        .env_remove(gpu_sim::ENV_CONTROL)
        .envs(env.iter().cloned())
        .stdin(Stdio::null());
    cmd
}

/// Checks that the child ran exactly its one test and passed; returns its output.
fn check_child(name: &str, output: Output) -> Output {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stdout.contains("test result: ok. 1 passed"),
        "child for {name} failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        output.status
    );
    output
}

fn run_child(name: &str, env: &[(String, String)]) -> Output {
    let output = child_command(name, env).output().expect("spawn child");
    check_child(name, output)
}

/// Runs the test's NVML part in a child that sees a fresh simulated node made from `spec`;
/// `before_start` runs in the parent after the node is written and before the child starts.
fn scenario_with(
    name: &str,
    spec: &NodeSpec,
    before_start: impl FnOnce(&SimNode),
    body: impl FnOnce(&NodeSpec),
) {
    if is_child(name) {
        body(spec);
        return;
    }
    let node = SimNode::new(spec.clone()).expect("write node");
    before_start(&node);
    run_child(name, &node.env());
}

fn scenario(name: &str, spec: &NodeSpec, body: impl FnOnce(&NodeSpec)) {
    scenario_with(name, spec, |_| {}, body);
}

/// The control log of the node this child process sees.
fn control() -> ControlLog {
    ControlLog::from_env().expect("GPU_SIM_CONTROL set by the parent")
}

fn try_init() -> Result<Nvml, NvmlError> {
    Nvml::builder()
        .lib_path(gpu_sim::nvml_library().as_os_str())
        .init()
}

fn init() -> Nvml {
    try_init().expect("nvmlInit_v2 on the simulated node")
}

fn gpu_sim_lines(stderr: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(stderr)
        .lines()
        .filter(|l| l.starts_with("gpu-sim:"))
        .map(str::to_owned)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Every field, against the spec
// ---------------------------------------------------------------------------------------------

/// Asserts that everything NVML reports matches `spec`, GPU by GPU in NVML index order.
fn assert_node_matches(nvml: &Nvml, spec: &NodeSpec) {
    assert_eq!(
        nvml.sys_driver_version().expect("system query"),
        spec.driver_version
    );
    assert_eq!(
        nvml.sys_nvml_version().expect("system query"),
        spec.effective_nvml_version()
    );
    assert_eq!(
        nvml.sys_cuda_driver_version().expect("system query"),
        spec.cuda_driver_version as i32
    );
    assert_eq!(
        nvml.device_count().expect("system query") as usize,
        spec.gpus.len()
    );

    for (index, gpu) in spec.gpus.iter().enumerate() {
        let index = index as u32;
        let ctx = format!("GPU {index} ({})", gpu.uuid);
        let device = nvml.device_by_index(index).expect(&ctx);
        assert_eq!(device.index().expect(&ctx), index, "{ctx}");
        assert_eq!(device.uuid().expect(&ctx), gpu.uuid, "{ctx}");
        assert_eq!(device.name().expect(&ctx), gpu.name, "{ctx}");
        assert_eq!(device.minor_number().expect(&ctx), gpu.minor, "{ctx}");

        let memory = device.memory_info().expect(&ctx);
        let reserved = gpu.effective_reserved_mib() * MIB;
        let used = gpu.allocated_mib() * MIB;
        assert_eq!(memory.total, gpu.memory_bytes(), "{ctx}");
        assert_eq!(memory.reserved, reserved, "{ctx}");
        assert_eq!(memory.used, used, "{ctx}");
        assert_eq!(memory.free, gpu.memory_bytes() - reserved - used, "{ctx}");

        let pci = device.pci_info().expect(&ctx);
        assert_eq!(pci.bus_id, gpu.pci_bus_id, "{ctx}");
        let parts: Vec<u32> = pci
            .bus_id
            .split([':', '.'])
            .map(|p| u32::from_str_radix(p, 16).expect(&ctx))
            .collect();
        assert_eq!(
            (pci.domain, pci.bus, pci.device),
            (parts[0], parts[1], parts[2]),
            "{ctx}"
        );
        assert_eq!(pci.pci_device_id, gpu.pci_device_id, "{ctx}");
        assert_eq!(pci.pci_sub_system_id, Some(gpu.pci_subsystem_id), "{ctx}");

        match gpu.numa_node {
            Some(node) => assert_eq!(device.numa_node_id().expect(&ctx), node, "{ctx}"),
            None => assert!(
                matches!(device.numa_node_id(), Err(NvmlError::NotSupported)),
                "{ctx}"
            ),
        }

        match gpu.mig {
            Mig::Unsupported => assert!(
                matches!(device.mig_mode(), Err(NvmlError::NotSupported)),
                "{ctx}"
            ),
            Mig::Disabled | Mig::Enabled => {
                let want = u32::from(gpu.mig == Mig::Enabled);
                let mode = device.mig_mode().expect(&ctx);
                assert_eq!((mode.current, mode.pending), (want, want), "{ctx}");
            }
        }
        if gpu.mig == Mig::Enabled {
            assert!(
                matches!(device.utilization_rates(), Err(NvmlError::NotSupported)),
                "{ctx}"
            );
        } else {
            let util = device.utilization_rates().expect(&ctx);
            assert_eq!(
                (util.gpu, util.memory),
                (gpu.utilization_gpu, gpu.utilization_memory),
                "{ctx}"
            );
        }

        let types = device.supported_event_types().expect(&ctx);
        assert_eq!(
            types.contains(EventTypes::CRITICAL_XID_ERROR),
            gpu.events,
            "{ctx}"
        );
        assert_eq!(
            types.contains(EventTypes::DOUBLE_BIT_ECC_ERROR),
            gpu.events && gpu.ecc,
            "{ctx}"
        );
        assert_eq!(
            types.contains(EventTypes::SINGLE_BIT_ECC_ERROR),
            gpu.events && gpu.ecc,
            "{ctx}"
        );
        if !gpu.events {
            assert!(types.is_empty(), "{ctx}");
        }

        let processes = device.running_compute_processes().expect(&ctx);
        let got: Vec<(u32, u64)> = processes
            .iter()
            .map(|p| match p.used_gpu_memory {
                UsedGpuMemory::Used(bytes) => (p.pid, bytes),
                UsedGpuMemory::Unavailable => panic!("{ctx}: memory unavailable"),
            })
            .collect();
        let want: Vec<(u32, u64)> = gpu
            .processes
            .iter()
            .map(|p| (p.pid, p.used_mib * MIB))
            .collect();
        assert_eq!(got, want, "{ctx}");
        assert!(
            processes
                .iter()
                .all(|p| p.gpu_instance_id.is_none() && p.compute_instance_id.is_none())
        );
        assert_eq!(
            device.running_compute_processes_count().expect(&ctx) as usize,
            gpu.processes.len(),
            "{ctx}"
        );

        assert_eq!(
            nvml.device_by_uuid(gpu.uuid.as_str())
                .expect(&ctx)
                .index()
                .expect(&ctx),
            index,
            "{ctx}"
        );
        assert_eq!(
            nvml.device_by_pci_bus_id(gpu.pci_bus_id.as_str())
                .expect(&ctx)
                .index()
                .expect(&ctx),
            index,
            "{ctx}"
        );
    }
    assert!(matches!(
        nvml.device_by_index(spec.gpus.len() as u32),
        Err(NvmlError::InvalidArg)
    ));
}

#[test]
fn one_gpu_every_field() {
    let spec = NodeSpec::new(vec![GpuSpec::a100_80gb(0).with_utilization(37, 12)]);
    scenario("one_gpu_every_field", &spec, |spec| {
        assert_node_matches(&init(), spec)
    });
}

#[test]
fn two_gpus_every_field() {
    let spec = NodeSpec::new(vec![
        GpuSpec::a100_80gb(0)
            .with_process(4242, 1024)
            .with_process(4343, 2048)
            .with_memory_used_mib(100),
        GpuSpec::t4(1)
            .with_numa_node(None)
            .with_ecc(false)
            .with_memory_reserved_mib(250),
    ])
    .with_driver("535.161.08", 12020);
    scenario("two_gpus_every_field", &spec, |spec| {
        let nvml = init();
        assert_eq!(nvml.sys_nvml_version().unwrap(), "12.535.161.08");
        assert_node_matches(&nvml, spec);
    });
}

#[test]
fn eight_gpus_listed_out_of_minor_order() {
    // NVML numbers GPUs in the order the node file lists them, not by minor number.
    let minors = [3, 0, 7, 1, 6, 2, 5, 4];
    let spec = NodeSpec::new(minors.iter().map(|&m| GpuSpec::h100_80gb(m)).collect());
    scenario("eight_gpus_listed_out_of_minor_order", &spec, |spec| {
        let nvml = init();
        assert_node_matches(&nvml, spec);
        for (index, minor) in minors.iter().enumerate() {
            assert_eq!(
                nvml.device_by_index(index as u32)
                    .unwrap()
                    .minor_number()
                    .unwrap(),
                *minor
            );
        }
        assert_eq!(
            nvml.device_by_index(0).unwrap().pci_info().unwrap().bus_id,
            "00000000:4E:00.0"
        );
    });
}

#[test]
fn sixty_four_gpus() {
    let spec = NodeSpec::uniform(64, GpuSpec::a100_40gb);
    scenario("sixty_four_gpus", &spec, |spec| {
        let nvml = init();
        assert_eq!(nvml.device_count().unwrap(), 64);
        assert_node_matches(&nvml, spec);
    });
}

#[test]
fn memory_info_v2_values() {
    let spec = NodeSpec::new(vec![
        GpuSpec::a100_80gb(0)
            .with_memory_reserved_mib(600)
            .with_memory_used_mib(100)
            .with_process(7, 1000),
        GpuSpec::t4(1),
    ]);
    scenario("memory_info_v2_values", &spec, |_| {
        let nvml = init();
        let m = nvml.device_by_index(0).unwrap().memory_info().unwrap();
        assert_eq!(m.total, 81920 * MIB);
        assert_eq!(m.reserved, 600 * MIB);
        assert_eq!(m.used, 1100 * MIB); // allocations only: the reserved part is reported apart
        assert_eq!(m.free, (81920 - 600 - 1100) * MIB);
        // The version word nvml-wrapper sends back untouched: sizeof(nvmlMemory_v2_t) | 2 << 24.
        assert_eq!(m.version, 40 | (2 << 24));

        // Default: the driver keeps ~0.5% (memory_mib / 200 MiB), nothing is allocated.
        let m = nvml.device_by_index(1).unwrap().memory_info().unwrap();
        assert_eq!((m.total, m.reserved, m.used), (15360 * MIB, 76 * MIB, 0));
        assert_eq!(m.free, (15360 - 76) * MIB);
    });
}

#[test]
fn numa_node_not_supported() {
    let spec = NodeSpec::new(vec![
        GpuSpec::t4(0).with_numa_node(None),
        GpuSpec::t4(1).with_numa_node(Some(3)),
    ]);
    scenario("numa_node_not_supported", &spec, |_| {
        let nvml = init();
        assert!(matches!(
            nvml.device_by_index(0).unwrap().numa_node_id(),
            Err(NvmlError::NotSupported)
        ));
        assert_eq!(nvml.device_by_index(1).unwrap().numa_node_id().unwrap(), 3);
    });
}

#[test]
fn pci_info_and_lookup_by_bus_id() {
    let spec = NodeSpec::new(vec![
        GpuSpec::a100_80gb(6),
        GpuSpec::a100_80gb(1).with_pci_bus_id("00000002:0a:00.0"), // lowercase in the file
    ]);
    scenario("pci_info_and_lookup_by_bus_id", &spec, |_| {
        let nvml = init();
        let pci = nvml.device_by_index(0).unwrap().pci_info().unwrap();
        assert_eq!(pci.bus_id, "00000000:B7:00.0");
        assert_eq!((pci.domain, pci.bus, pci.device), (0, 0xB7, 0));
        assert_eq!(pci.pci_device_id, 0x20B2_10DE);
        assert_eq!(pci.pci_sub_system_id, Some(0x1463_10DE));
        let pci = nvml.device_by_index(1).unwrap().pci_info().unwrap();
        assert_eq!(pci.bus_id, "00000002:0A:00.0"); // NVML prints upper case
        assert_eq!((pci.domain, pci.bus, pci.device), (2, 0x0A, 0));

        // NVML accepts domain:bus:device.function, domain:bus:device and bus:device.function.
        for (bus_id, index) in [
            ("00000000:B7:00.0", 0),
            ("0000:b7:00.0", 0),
            ("b7:00.0", 0),
            ("2:a:0", 1),
        ] {
            assert_eq!(
                nvml.device_by_pci_bus_id(bus_id).unwrap().index().unwrap(),
                index,
                "{bus_id}"
            );
        }
        assert!(matches!(
            nvml.device_by_pci_bus_id("00000000:B8:00.0"),
            Err(NvmlError::NotFound)
        ));
        assert!(matches!(
            nvml.device_by_pci_bus_id("00000000:B7:00.1"),
            Err(NvmlError::NotFound)
        ));
        assert!(matches!(
            nvml.device_by_pci_bus_id("b7"),
            Err(NvmlError::InvalidArg)
        ));
    });
}

#[test]
fn lookup_by_uuid() {
    let spec = NodeSpec::uniform(3, GpuSpec::t4);
    scenario("lookup_by_uuid", &spec, |spec| {
        let nvml = init();
        assert_eq!(
            nvml.device_by_uuid(spec.gpus[2].uuid.as_str())
                .unwrap()
                .index()
                .unwrap(),
            2
        );
        let upper = spec.gpus[2].uuid.to_uppercase(); // NVML prints and matches lowercase
        assert!(matches!(
            nvml.device_by_uuid(upper.as_str()),
            Err(NvmlError::NotFound)
        ));
        assert!(matches!(
            nvml.device_by_uuid("GPU-00000000-0000-0000-0000-000000000000"),
            Err(NvmlError::NotFound)
        ));
        assert!(matches!(
            nvml.device_by_uuid(""),
            Err(NvmlError::InvalidArg)
        ));
    });
}

// ---------------------------------------------------------------------------------------------
// Init failures
// ---------------------------------------------------------------------------------------------

#[test]
fn zero_gpus() {
    // Plain nvmlInit fails when no GPU is found; NVML_INIT_FLAG_NO_GPUS makes it succeed with none.
    scenario("zero_gpus", &NodeSpec::default(), |_| {
        assert!(
            matches!(try_init(), Err(NvmlError::UnexpectedVariant(28))),
            "NVML_ERROR_GPU_NOT_FOUND"
        );
        let nvml = Nvml::builder()
            .lib_path(gpu_sim::nvml_library().as_os_str())
            .flags(InitFlags::NO_GPUS)
            .init()
            .unwrap();
        assert_eq!(nvml.device_count().unwrap(), 0);
        assert!(matches!(
            nvml.device_by_index(0),
            Err(NvmlError::InvalidArg)
        ));
        assert_eq!(
            nvml.sys_driver_version().unwrap(),
            NodeSpec::DEFAULT_DRIVER_VERSION
        );
    });
}

#[test]
fn missing_node_file_is_driver_not_loaded() {
    const NAME: &str = "missing_node_file_is_driver_not_loaded";
    if is_child(NAME) {
        assert!(matches!(try_init(), Err(NvmlError::DriverNotLoaded)));
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let missing = dir
        .path()
        .join("no-such-node")
        .to_string_lossy()
        .into_owned();
    let output = run_child(NAME, &[(gpu_sim::ENV_NODE.to_owned(), missing)]);
    assert!(
        gpu_sim_lines(&output.stderr).is_empty(),
        "a missing driver is silent"
    );
    // No GPU_SIM_NODE at all: the same, like a machine without the NVIDIA driver.
    let output = run_child(NAME, &[]);
    assert!(gpu_sim_lines(&output.stderr).is_empty());
}

#[test]
fn malformed_node_file_fails_init_loudly() {
    const NAME: &str = "malformed_node_file_fails_init_loudly";
    if is_child(NAME) {
        assert!(matches!(try_init(), Err(NvmlError::Unknown)));
        return;
    }
    let good = "[gpu]\nuuid = GPU-0fc3eda5-e98b-a25b-5b0d-cf5c855d1448\nname = Tesla T4\nmemory_mib = 15360\n";
    let cases: &[(&str, String, &str)] = &[
        (
            "unknown key",
            format!("{good}flavour = vanilla\n"),
            ":5: unknown key 'flavour'",
        ),
        (
            "bad number",
            good.replace("15360", "16GB"),
            ":4: bad value '16GB' for key 'memory_mib'",
        ),
        (
            "bad bool",
            format!("{good}events = yes\n"),
            ":5: bad value 'yes' for key 'events'",
        ),
        (
            "bad uuid",
            good.replace("GPU-0fc3", "GPU-0FC3"),
            ":2: bad value 'GPU-0FC3",
        ),
        (
            "missing key",
            good.replace("name = Tesla T4\n", ""),
            ":1: [gpu] section is missing required key 'name'",
        ),
        (
            "duplicate key",
            format!("{good}name = T4\n"),
            ":5: duplicate key 'name'",
        ),
        (
            "duplicate uuid",
            format!(
                "{good}{}",
                good.replace("memory_mib", "minor = 1\nmemory_mib")
            ),
            "duplicate uuid",
        ),
        (
            "global key in gpu",
            format!("{good}driver_version = 1\n"),
            ":5: unknown key 'driver_version'",
        ),
        (
            "unknown section",
            format!("[node]\n{good}"),
            ":1: unknown section '[node]'",
        ),
        (
            "bad cuda version",
            format!("cuda_driver_version = 12.4\n{good}"),
            "key 'cuda_driver_version'",
        ),
        (
            "memory overcommitted",
            format!("{good}memory_used_mib = 15300\n"),
            ":5: memory_reserved_mib",
        ),
        (
            "minor out of range",
            format!("{good}minor = 255\n"),
            ":5: bad value '255' for key 'minor'",
        ),
    ];
    for (what, text, expected) in cases {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node");
        std::fs::write(&path, text).unwrap();
        let output = run_child(
            NAME,
            &[(
                gpu_sim::ENV_NODE.to_owned(),
                path.to_string_lossy().into_owned(),
            )],
        );
        let lines = gpu_sim_lines(&output.stderr);
        assert_eq!(
            lines.len(),
            1,
            "{what}: exactly one diagnostic, got {lines:?}"
        );
        assert!(
            lines[0].contains(&format!("{}:", path.display())),
            "{what}: names the file: {}",
            lines[0]
        );
        assert!(
            lines[0].contains(expected),
            "{what}: expected {expected:?} in {:?}",
            lines[0]
        );
    }

    // Too many GPUs for the fake is a fixture error as well.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node");
    NodeSpec::uniform(gpu_sim::MAX_GPUS as u32 + 1, |m| GpuSpec::t4(m % 255))
        .write(&path)
        .unwrap();
    let output = run_child(
        NAME,
        &[(
            gpu_sim::ENV_NODE.to_owned(),
            path.to_string_lossy().into_owned(),
        )],
    );
    let lines = gpu_sim_lines(&output.stderr);
    assert!(
        lines.len() == 1 && lines[0].contains("too many [gpu] sections"),
        "{lines:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Events and faults
// ---------------------------------------------------------------------------------------------

#[test]
fn xid_from_another_process_reaches_event_set_wait() {
    const NAME: &str = "xid_from_another_process_reaches_event_set_wait";
    let spec = NodeSpec::uniform(3, GpuSpec::a100_80gb);
    if is_child(NAME) {
        let nvml = init();
        let mut set = nvml.create_event_set().unwrap();
        for index in 0..3 {
            set = nvml
                .device_by_index(index)
                .unwrap()
                .register_events(EventTypes::CRITICAL_XID_ERROR, set)
                .unwrap();
        }
        println!("{READY}");
        let event = set.wait(10_000).unwrap();
        assert_eq!(event.device.uuid().unwrap(), spec.gpus[1].uuid);
        assert!(event.event_type.contains(EventTypes::CRITICAL_XID_ERROR));
        assert!(matches!(event.event_data, Some(XidError::Value(79))));
        // The DBE on GPU 0 is skipped (only XIDs registered); the XID 48 behind it arrives.
        let event = set.wait(10_000).unwrap();
        assert_eq!(event.device.index().unwrap(), 0);
        assert!(matches!(event.event_data, Some(XidError::Value(48))));
        // The XID 13 injected before this process started was never delivered.
        assert!(matches!(set.wait(100), Err(NvmlError::Timeout)));
        return;
    }

    let node = SimNode::new(spec.clone()).unwrap();
    node.inject_xid(&spec.gpus[2].uuid, 13).unwrap();
    let mut child = child_command(NAME, &node.env())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        if stdout.read_line(&mut line).unwrap() == 0 {
            break; // the child ended before getting ready; check_child reports it
        }
        seen.push_str(&line);
        // libtest prints "test <name> ... " without a newline, so READY may end that line.
        if line.trim_end().ends_with(READY) {
            node.inject_xid(&spec.gpus[1].uuid, 79).unwrap();
            node.inject_ecc_dbe(&spec.gpus[0].uuid).unwrap();
            node.inject_xid(&spec.gpus[0].uuid, 48).unwrap();
            break;
        }
    }
    stdout.read_to_string(&mut seen).unwrap();
    let mut output = child.wait_with_output().unwrap();
    output.stdout = seen.into_bytes();
    check_child(NAME, output);
}

#[test]
fn ecc_events() {
    let spec = NodeSpec::new(vec![
        GpuSpec::a100_80gb(0),
        GpuSpec::a100_80gb(1).with_ecc(false),
    ]);
    scenario("ecc_events", &spec, |spec| {
        let nvml = init();
        let ecc_types = EventTypes::DOUBLE_BIT_ECC_ERROR | EventTypes::SINGLE_BIT_ECC_ERROR;
        let set = nvml.create_event_set().unwrap();
        let err = nvml
            .device_by_index(1)
            .unwrap()
            .register_events(ecc_types, set)
            .unwrap_err();
        assert!(
            matches!(err.error, NvmlError::NotSupported),
            "ECC off: {err:?}"
        );

        let set = nvml.create_event_set().unwrap();
        let set = nvml
            .device_by_index(0)
            .unwrap()
            .register_events(ecc_types, set)
            .unwrap();
        control().inject_ecc_dbe(&spec.gpus[0].uuid).unwrap();
        control().inject_ecc_sbe(&spec.gpus[0].uuid).unwrap();
        let event = set.wait(5_000).unwrap();
        assert_eq!(event.event_type, EventTypes::DOUBLE_BIT_ECC_ERROR);
        assert!(event.event_data.is_none());
        assert_eq!(
            set.wait(5_000).unwrap().event_type,
            EventTypes::SINGLE_BIT_ECC_ERROR
        );
    });
}

#[test]
fn wait_times_out_when_nothing_happens() {
    let spec = NodeSpec::uniform(2, GpuSpec::t4);
    scenario("wait_times_out_when_nothing_happens", &spec, |spec| {
        let nvml = init();
        let set = nvml.create_event_set().unwrap();
        let set = nvml
            .device_by_index(0)
            .unwrap()
            .register_events(EventTypes::CRITICAL_XID_ERROR, set)
            .unwrap();
        // An XID on a GPU that is not in the set does not wake it.
        control().inject_xid(&spec.gpus[1].uuid, 79).unwrap();
        let start = Instant::now();
        assert!(matches!(set.wait(200), Err(NvmlError::Timeout)));
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_millis(200) && waited < Duration::from_secs(3),
            "{waited:?}"
        );
        assert!(matches!(set.wait(0), Err(NvmlError::Timeout)));
    });
}

#[test]
fn gpu_without_event_support() {
    let spec = NodeSpec::new(vec![GpuSpec::t4(0).with_events(false), GpuSpec::t4(1)]);
    scenario("gpu_without_event_support", &spec, |_| {
        let nvml = init();
        let old = nvml.device_by_index(0).unwrap();
        assert!(old.supported_event_types().unwrap().is_empty());
        let set = nvml.create_event_set().unwrap();
        let err = old
            .register_events(EventTypes::CRITICAL_XID_ERROR, set)
            .unwrap_err();
        assert!(matches!(err.error, NvmlError::NotSupported), "{err:?}");
        // The other GPU registers fine.
        let set = nvml.create_event_set().unwrap();
        nvml.device_by_index(1)
            .unwrap()
            .register_events(EventTypes::CRITICAL_XID_ERROR, set)
            .unwrap();
    });
}

#[test]
fn fail_then_recover() {
    let spec = NodeSpec::uniform(2, GpuSpec::a100_80gb);
    scenario("fail_then_recover", &spec, |spec| {
        let nvml = init();
        let lost = nvml.device_by_index(1).unwrap();
        let fine = nvml.device_by_index(0).unwrap();
        control().fail_gpu(&spec.gpus[1].uuid).unwrap();

        assert!(matches!(lost.uuid(), Err(NvmlError::GpuLost)));
        assert!(matches!(lost.memory_info(), Err(NvmlError::GpuLost)));
        assert!(matches!(lost.name(), Err(NvmlError::GpuLost)));
        assert!(matches!(lost.pci_info(), Err(NvmlError::GpuLost)));
        assert!(matches!(lost.minor_number(), Err(NvmlError::GpuLost)));
        assert!(matches!(
            lost.running_compute_processes(),
            Err(NvmlError::GpuLost)
        ));
        // The handle itself still resolves, and its index is known.
        assert_eq!(lost.index().unwrap(), 1);
        assert_eq!(nvml.device_count().unwrap(), 2);
        assert!(matches!(
            nvml.device_by_index(1).unwrap().uuid(),
            Err(NvmlError::GpuLost)
        ));
        assert_eq!(
            nvml.device_by_uuid(spec.gpus[1].uuid.as_str())
                .unwrap()
                .index()
                .unwrap(),
            1
        );
        // The other GPU is unaffected.
        assert_eq!(fine.uuid().unwrap(), spec.gpus[0].uuid);

        control().recover_gpu(&spec.gpus[1].uuid).unwrap();
        assert_eq!(lost.uuid().unwrap(), spec.gpus[1].uuid);
        assert_eq!(lost.memory_info().unwrap().total, 81920 * MIB);
    });
}

#[test]
fn gpu_failed_before_the_process_started() {
    let spec = NodeSpec::uniform(2, GpuSpec::t4);
    scenario_with(
        "gpu_failed_before_the_process_started",
        &spec,
        |node| {
            // fail, recover, fail: the state is the replay of the whole log.
            let uuid = &node.spec().gpus[0].uuid;
            node.fail_gpu(uuid).unwrap();
            node.recover_gpu(uuid).unwrap();
            node.fail_gpu(uuid).unwrap();
            node.fail_gpu(&node.spec().gpus[1].uuid).unwrap();
            node.recover_gpu(&node.spec().gpus[1].uuid).unwrap();
        },
        |spec| {
            let nvml = init();
            assert!(matches!(
                nvml.device_by_index(0).unwrap().memory_info(),
                Err(NvmlError::GpuLost)
            ));
            assert_eq!(
                nvml.device_by_index(1).unwrap().uuid().unwrap(),
                spec.gpus[1].uuid
            );
            control().recover_gpu(&spec.gpus[0].uuid).unwrap();
            assert_eq!(
                nvml.device_by_index(0).unwrap().uuid().unwrap(),
                spec.gpus[0].uuid
            );
        },
    );
}

#[test]
fn event_wait_reports_a_lost_gpu() {
    let spec = NodeSpec::uniform(2, GpuSpec::h100_80gb);
    scenario("event_wait_reports_a_lost_gpu", &spec, |spec| {
        let nvml = init();
        let set = nvml.create_event_set().unwrap();
        let set = nvml
            .device_by_index(1)
            .unwrap()
            .register_events(EventTypes::CRITICAL_XID_ERROR, set)
            .unwrap();
        // XID 79 (fallen off the bus) is delivered first, then the wait fails fast while it is lost.
        control().inject_xid(&spec.gpus[1].uuid, 79).unwrap();
        control().fail_gpu(&spec.gpus[1].uuid).unwrap();
        let event = set.wait(5_000).unwrap();
        assert_eq!(event.device.index().unwrap(), 1);
        assert!(matches!(event.device.uuid(), Err(NvmlError::GpuLost)));
        assert!(matches!(event.event_data, Some(XidError::Value(79))));
        let start = Instant::now();
        assert!(matches!(set.wait(5_000), Err(NvmlError::GpuLost)));
        assert!(start.elapsed() < Duration::from_secs(1));
        control().recover_gpu(&spec.gpus[1].uuid).unwrap();
        assert!(matches!(set.wait(50), Err(NvmlError::Timeout)));
    });
}

// ---------------------------------------------------------------------------------------------
// Misc
// ---------------------------------------------------------------------------------------------

#[test]
fn running_processes() {
    let spec = NodeSpec::new(vec![
        GpuSpec::t4(0),
        GpuSpec::t4(1)
            .with_process(1234, 512)
            .with_process(5678, 256),
    ]);
    scenario("running_processes", &spec, |_| {
        let nvml = init();
        assert!(
            nvml.device_by_index(0)
                .unwrap()
                .running_compute_processes()
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            nvml.device_by_index(0)
                .unwrap()
                .running_compute_processes_count()
                .unwrap(),
            0
        );
        let processes = nvml
            .device_by_index(1)
            .unwrap()
            .running_compute_processes()
            .unwrap();
        let pids: Vec<u32> = processes.iter().map(|p| p.pid).collect();
        assert_eq!(pids, [1234, 5678]);
        assert_eq!(processes[0].used_gpu_memory, UsedGpuMemory::Used(512 * MIB));
    });
}

#[test]
fn mig_modes() {
    let spec = NodeSpec::new(vec![
        GpuSpec::a100_80gb(0),
        GpuSpec::a100_80gb(1).with_mig(Mig::Enabled),
        GpuSpec::t4(2),
    ]);
    scenario("mig_modes", &spec, |spec| {
        let nvml = init();
        let mode = nvml.device_by_index(0).unwrap().mig_mode().unwrap();
        assert_eq!((mode.current, mode.pending), (0, 0));
        let mode = nvml.device_by_index(1).unwrap().mig_mode().unwrap();
        assert_eq!((mode.current, mode.pending), (1, 1));
        assert!(matches!(
            nvml.device_by_index(2).unwrap().mig_mode(),
            Err(NvmlError::NotSupported)
        ));
        assert_node_matches(&nvml, spec);
    });
}

#[test]
fn shutdown_is_reference_counted() {
    let spec = NodeSpec::uniform(1, GpuSpec::t4);
    scenario("shutdown_is_reference_counted", &spec, |spec| {
        let first = init();
        let second = init(); // nvmlInit again: the count goes to 2
        first.shutdown().unwrap(); // back to 1: the library is still initialised
        assert_eq!(second.device_count().unwrap(), 1);
        assert_eq!(
            second.device_by_index(0).unwrap().uuid().unwrap(),
            spec.gpus[0].uuid
        );
        second.shutdown().unwrap(); // 0: shut down (abi_check covers the calls after this)
        // A new init starts over.
        let third = init();
        assert_eq!(third.device_count().unwrap(), 1);
    });
}

#[test]
fn abi_check() {
    // The C-level checks: NULL pointers, buffer sizes, legacy layouts, refcounts, threads.
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(env!("GPU_SIM_NVML_ABI_CHECK"))
        .arg(gpu_sim::nvml_library())
        .arg(dir.path())
        .env_remove(gpu_sim::ENV_NODE)
        .env_remove(gpu_sim::ENV_CONTROL)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "nvml-abi-check failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains(", 0 failed"), "{stdout}");
}

// ---------------------------------------------------------------------------------------------
// What monitoring tools ask (nvitop, gpustat): answers of an A100 / H100 in a Kubernetes node
// ---------------------------------------------------------------------------------------------

#[test]
fn monitoring_queries_answer_like_a_datacentre_gpu() {
    use nvml_wrapper::enum_wrappers::device::{
        Clock, ComputeMode, EccCounter, MemoryError, PerformanceState, TemperatureSensor,
    };
    let spec = NodeSpec::new(vec![
        GpuSpec::a100_80gb(0),
        GpuSpec::h100_80gb(1),
        GpuSpec::a100_80gb(2).with_ecc(false),
    ]);
    scenario(
        "monitoring_queries_answer_like_a_datacentre_gpu",
        &spec,
        |spec| {
            let nvml = init();
            let not_supported = |what: &str, r: Result<u32, NvmlError>| {
                assert!(
                    matches!(r, Err(NvmlError::NotSupported)),
                    "{what}: {r:?}, want NotSupported"
                );
            };
            // (power limit W, max SM MHz, max memory MHz) from the boards' data sheets.
            for (i, (limit_w, sm_mhz, mem_mhz)) in
                [(400, 1410, 1593), (700, 1980, 2619), (400, 1410, 1593)]
                    .into_iter()
                    .enumerate()
            {
                let d = nvml.device_by_index(i as u32).unwrap();
                let what = &spec.gpus[i].name;
                assert!(d.running_graphics_processes().unwrap().is_empty(), "{what}");
                assert!(matches!(d.compute_mode().unwrap(), ComputeMode::Default));
                assert!(matches!(
                    d.performance_state().unwrap(),
                    PerformanceState::Zero
                ));
                assert!(d.is_in_persistent_mode().unwrap(), "{what}");
                assert!(!d.is_display_active().unwrap(), "{what}");
                assert!(!d.is_display_connected().unwrap(), "{what}");
                not_supported("fan", d.fan_speed(0));
                assert_eq!(
                    d.power_management_limit().unwrap(),
                    limit_w * 1000,
                    "{what}"
                );
                assert_eq!(d.power_management_limit_default().unwrap(), limit_w * 1000);
                assert_eq!(d.enforced_power_limit().unwrap(), limit_w * 1000);
                let power = d.power_usage().unwrap();
                assert!(
                    power > 0 && power < limit_w * 1000,
                    "{what}: idle draw {power} mW"
                );
                let temp = d.temperature(TemperatureSensor::Gpu).unwrap();
                assert!((25..=45).contains(&temp), "{what}: idle {temp} C");
                assert_eq!(d.max_clock_info(Clock::SM).unwrap(), sm_mhz, "{what}");
                assert_eq!(d.max_clock_info(Clock::Graphics).unwrap(), sm_mhz, "{what}");
                assert_eq!(d.max_clock_info(Clock::Memory).unwrap(), mem_mhz, "{what}");
                // Idle (nothing runs): SM clocks down, memory clock fixed.
                assert!(d.clock_info(Clock::SM).unwrap() < sm_mhz, "{what}");
                assert_eq!(d.clock_info(Clock::Memory).unwrap(), mem_mhz, "{what}");
                for codec in [
                    d.encoder_utilization().unwrap(),
                    d.decoder_utilization().unwrap(),
                ] {
                    assert_eq!(codec.utilization, 0, "{what}");
                    assert!(codec.sampling_period > 0, "{what}");
                }
            }

            // ECC: counts are the errors injected for that GPU; ECC off counts nothing.
            let ecc = nvml.device_by_index(0).unwrap();
            let count = |e: MemoryError, c: EccCounter| ecc.total_ecc_errors(e, c).unwrap();
            assert!(ecc.is_ecc_enabled().unwrap().currently_enabled);
            assert_eq!(count(MemoryError::Uncorrected, EccCounter::Volatile), 0);
            control().inject_ecc_dbe(&spec.gpus[0].uuid).unwrap();
            control().inject_ecc_sbe(&spec.gpus[0].uuid).unwrap();
            control().inject_ecc_sbe(&spec.gpus[0].uuid).unwrap();
            control().inject_ecc_sbe(&spec.gpus[1].uuid).unwrap();
            assert_eq!(count(MemoryError::Uncorrected, EccCounter::Volatile), 1);
            assert_eq!(count(MemoryError::Corrected, EccCounter::Volatile), 2);
            assert_eq!(count(MemoryError::Corrected, EccCounter::Aggregate), 2);
            let off = nvml.device_by_index(2).unwrap();
            assert!(!off.is_ecc_enabled().unwrap().currently_enabled);
            assert!(matches!(
                off.total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile),
                Err(NvmlError::NotSupported)
            ));

            // A lost GPU answers GPU_IS_LOST like every other query.
            control().fail_gpu(&spec.gpus[1].uuid).unwrap();
            let lost = nvml.device_by_index(1).unwrap();
            assert!(matches!(lost.power_usage(), Err(NvmlError::GpuLost)));
            assert!(matches!(lost.fan_speed(0), Err(NvmlError::GpuLost)));
        },
    );
}

#[test]
fn junk_entries_come_with_every_process_utilisation_answer() {
    // As a real driver next to zombie processes (nvtop#110): even with nothing run, the answer
    // is a success holding the junk (a pid nobody has at 37,100 %, long-past stamps, zeros).
    let spec = NodeSpec::uniform(1, GpuSpec::a100_80gb).with_utilization_junk_entries(3);
    scenario(
        "junk_entries_come_with_every_process_utilisation_answer",
        &spec,
        |_| {
            let nvml = init();
            let dev = nvml.device_by_index(0).unwrap();
            let samples = dev.process_utilization_stats(0).unwrap();
            let got: Vec<(u32, u64, u32)> = samples
                .iter()
                .map(|s| (s.pid, s.timestamp, s.sm_util))
                .collect();
            assert_eq!(got, vec![(50554, 49936, 37100), (0, 0, 0), (0, 0, 0)]);
            // Whatever lastSeen asks for.
            assert_eq!(
                dev.process_utilization_stats(u64::MAX / 2).unwrap().len(),
                3
            );
        },
    );
}
