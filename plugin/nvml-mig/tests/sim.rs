//! `nvml-mig` against the gpu-sim's fake `libnvidia-ml.so.1` (its MIG model: A100/H100 profiles, placements,
//! GPU/compute instances, MIG devices, the `mig-fail` fault switch), through the real nvml-wrapper.
//!
//! The fake reads its environment at `nvmlInit` and keeps process-wide state, so every scenario runs in a
//! child process (the gpu-sim's own pattern, `tests/gpu-sim/tests/nvml_wrapper.rs`): the test re-executes
//! this binary filtered to itself with the node's environment and `NVML_MIG_TEST_CHILD=<name>`; in the
//! child the same function sees the variable and runs the NVML part.

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use gpu_sim::{ControlLog, GpuSpec, Mig, NodeSpec, SimNode};
use nvml_mig::{
    AppliedLayout, ComputeInstance, GiProfile, GpuInstance, Holder, Layout, MigBackend, MigDevice,
    MigError, MigGpu, MigMode, NvmlCode, Placement, Rollback, apply, apply_with, current,
};
use nvml_wrapper::Nvml;

const CHILD_ENV: &str = "NVML_MIG_TEST_CHILD";

fn is_child(name: &str) -> bool {
    std::env::var(CHILD_ENV).is_ok_and(|v| v == name)
}

/// Runs `body` in a child process that sees a fresh simulated node made from `spec`.
fn scenario(name: &str, spec: NodeSpec, body: impl FnOnce()) {
    scenario_with(name, spec, |_| ((), Vec::new()), body);
}

/// [`scenario`], with `before` run in the parent once the node exists: what it returns is kept alive
/// while the child runs, and its variables are added to the child's environment.
fn scenario_with<T>(
    name: &str,
    spec: NodeSpec,
    before: impl FnOnce(&SimNode) -> (T, Vec<(String, String)>),
    body: impl FnOnce(),
) {
    if is_child(name) {
        body();
        return;
    }
    let node = SimNode::new(spec).expect("write node");
    let (_keep, extra) = before(&node);
    let exe = std::env::current_exe().expect("current_exe");
    let output = Command::new(exe)
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, name)
        .env_remove(gpu_sim::ENV_NODE)
        .env_remove(gpu_sim::ENV_CONTROL)
        .envs(node.env())
        .envs(extra)
        .stdin(Stdio::null())
        .output()
        .expect("spawn child");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stdout.contains("test result: ok. 1 passed"),
        "child for {name} failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        output.status
    );
}

fn init() -> Nvml {
    Nvml::builder()
        .lib_path(gpu_sim::nvml_library().as_os_str())
        .init()
        .expect("nvmlInit_v2 on the simulated node")
}

fn placements(applied: &AppliedLayout) -> Vec<Placement> {
    applied.instances.iter().map(|i| i.placement).collect()
}

fn p(start: u32, size: u32) -> Placement {
    Placement { start, size }
}

/// Checks what every applied layout must be: one distinct `MIG-` UUID per position, each a MIG device of
/// this GPU with the reported GPU/compute instance ids and memory.
fn check_applied(gpu: &MigGpu<'_, '_>, layout: &Layout, applied: &AppliedLayout) {
    assert_eq!(applied.layout(), *layout);
    let uuids: BTreeSet<&str> = applied.uuids().into_iter().collect();
    assert_eq!(uuids.len(), layout.profiles().len(), "{applied:?}");
    let devices = gpu.mig_devices().expect("MIG devices");
    assert_eq!(devices.len(), layout.profiles().len());
    for inst in &applied.instances {
        assert!(inst.uuid.starts_with("MIG-"), "{}", inst.uuid);
        let dev = devices
            .iter()
            .find(|d| d.uuid == inst.uuid)
            .expect("the UUID is a MIG device of this GPU");
        assert_eq!((dev.gi_id, dev.ci_id), (inst.gi_id, inst.ci_id));
        assert_eq!(dev.memory_bytes, inst.memory_bytes);
        assert!(inst.memory_bytes > 0);
    }
    assert_eq!(
        current(gpu.device()).expect("current"),
        sorted_by_placement(applied)
    );
}

/// The applied layout as `current` reports it: in placement order.
fn sorted_by_placement(applied: &AppliedLayout) -> Layout {
    let mut v: Vec<_> = applied.instances.iter().collect();
    v.sort_by_key(|i| i.placement.start);
    Layout::new(v.iter().map(|i| &i.profile))
}

#[test]
fn a100_profiles_and_placements_come_from_nvml() {
    let spec = NodeSpec::new(vec![GpuSpec::a100_80gb(0).with_mig(Mig::Enabled)]);
    scenario("a100_profiles_and_placements_come_from_nvml", spec, || {
        let nvml = init();
        let device = nvml.device_by_index(0).expect("device");
        let gpu = MigGpu::new(&device);
        let profiles = gpu.gi_profiles().expect("profiles");
        let names: Vec<&str> = profiles.iter().map(|p| p.name.as_str()).collect();
        for wanted in ["1g.10gb", "2g.20gb", "3g.40gb", "4g.40gb", "7g.80gb"] {
            assert!(names.contains(&wanted), "{wanted} missing from {names:?}");
        }
        let three: &GiProfile = profiles.iter().find(|p| p.name == "3g.40gb").expect("3g");
        assert_eq!(three.slices, 3);
        assert_eq!(three.instance_count, 2);
        assert_eq!(
            gpu.gi_placements(three).expect("placements"),
            [p(0, 4), p(4, 4)]
        );
        assert_eq!(gpu.gi_remaining_capacity(three).expect("capacity"), 2);
        assert_eq!(current(&device).expect("current"), Layout::default());
    });
}

#[test]
fn a100_seven_small_then_two_halves() {
    let spec = NodeSpec::new(vec![GpuSpec::a100_80gb(0).with_mig(Mig::Enabled)]);
    scenario("a100_seven_small_then_two_halves", spec, || {
        let nvml = init();
        let device = nvml.device_by_index(0).expect("device");
        let gpu = MigGpu::new(&device);

        let seven = Layout::new(["1g.10gb"; 7]);
        let first = apply(&device, &seven).expect("apply 7 x 1g.10gb");
        assert_eq!(
            placements(&first),
            (0..7).map(|s| p(s, 1)).collect::<Vec<_>>()
        );
        check_applied(&gpu, &seven, &first);

        let halves = Layout::new(["3g.40gb", "3g.40gb"]);
        let second = apply(&device, &halves).expect("apply 2 x 3g.40gb");
        assert_eq!(placements(&second), [p(0, 4), p(4, 4)]);
        check_applied(&gpu, &halves, &second);
        let old: BTreeSet<&str> = first.uuids().into_iter().collect();
        assert!(second.uuids().iter().all(|u| !old.contains(u)));
    });
}

#[test]
fn h100_mixed_layout() {
    let spec = NodeSpec::new(vec![GpuSpec::h100_80gb(0).with_mig(Mig::Enabled)]);
    scenario("h100_mixed_layout", spec, || {
        let nvml = init();
        let device = nvml.device_by_index(0).expect("device");
        let gpu = MigGpu::new(&device);
        let layout = Layout::new(["1g.10gb", "2g.20gb", "4g.40gb"]);
        let applied = apply(&device, &layout).expect("apply");
        // largest first, first fit: 4g at 0, 2g at 4, 1g at 6
        assert_eq!(placements(&applied), [p(6, 1), p(4, 2), p(0, 4)]);
        check_applied(&gpu, &layout, &applied);
        assert_eq!(
            current(&device).expect("current"),
            Layout::new(["4g.40gb", "2g.20gb", "1g.10gb"])
        );
    });
}

#[test]
fn refuses_while_a_process_holds_memory() {
    let spec = NodeSpec::new(vec![
        GpuSpec::a100_80gb(0)
            .with_mig(Mig::Enabled)
            .with_mig_instance("3g.40gb@0")
            .with_mig_instance("3g.40gb@4")
            .with_process(4321, 2048),
    ]);
    scenario("refuses_while_a_process_holds_memory", spec, || {
        let nvml = init();
        let device = nvml.device_by_index(0).expect("device");
        let before = current(&device).expect("current");
        assert_eq!(before, Layout::new(["3g.40gb", "3g.40gb"]));
        match apply(&device, &Layout::new(["1g.10gb"; 7])) {
            Err(MigError::InUse { pids, .. }) => assert_eq!(pids, [4321]),
            other => panic!("expected InUse, got {other:?}"),
        }
        assert_eq!(current(&device).expect("current"), before);
    });
}

#[test]
fn an_impossible_layout_changes_nothing() {
    let spec = NodeSpec::new(vec![
        GpuSpec::a100_80gb(0)
            .with_mig(Mig::Enabled)
            .with_mig_instance("7g.80gb@0"),
    ]);
    scenario("an_impossible_layout_changes_nothing", spec, || {
        let nvml = init();
        let device = nvml.device_by_index(0).expect("device");
        for layout in [
            Layout::new(["3g.40gb", "3g.40gb", "1g.10gb"]),
            Layout::new(["1g.10gb"; 8]),
            Layout::new(["4g.40gb", "4g.40gb"]),
        ] {
            match apply(&device, &layout) {
                Err(MigError::Impossible { .. }) => {}
                other => panic!("expected Impossible for [{layout}], got {other:?}"),
            }
        }
        match apply(&device, &Layout::new(["5g.50gb"])) {
            Err(MigError::UnknownProfile { profile, .. }) => assert_eq!(profile, "5g.50gb"),
            other => panic!("expected UnknownProfile, got {other:?}"),
        }
        assert_eq!(current(&device).expect("current"), Layout::new(["7g.80gb"]));
    });
}

/// A [`MigBackend`] that forwards to the real one and arms the sim's `mig-fail` switch once `after`
/// GPU instances have been created, so the next creation fails inside NVML mid-apply.
struct ArmAfter<'a, 'd, 'n> {
    inner: &'a MigGpu<'d, 'n>,
    after: usize,
    created: std::cell::Cell<usize>,
    control: ControlLog,
    uuid: String,
}

impl MigBackend for ArmAfter<'_, '_, '_> {
    fn gpu(&self) -> &str {
        self.inner.gpu()
    }
    fn mig_mode(&self) -> Result<MigMode, MigError> {
        self.inner.mig_mode()
    }
    fn set_mig_mode(&self, enabled: bool) -> Result<(), MigError> {
        self.inner.set_mig_mode(enabled)
    }
    fn gi_profiles(&self) -> Result<Vec<GiProfile>, MigError> {
        self.inner.gi_profiles()
    }
    fn gi_placements(&self, profile: &GiProfile) -> Result<Vec<Placement>, MigError> {
        self.inner.gi_placements(profile)
    }
    fn gi_remaining_capacity(&self, profile: &GiProfile) -> Result<u32, MigError> {
        self.inner.gi_remaining_capacity(profile)
    }
    fn gpu_instances(&self, profile: &GiProfile) -> Result<Vec<GpuInstance>, MigError> {
        self.inner.gpu_instances(profile)
    }
    fn create_gpu_instance(
        &self,
        profile: &GiProfile,
        placement: Placement,
    ) -> Result<GpuInstance, MigError> {
        if self.created.get() == self.after {
            self.control
                .fail_mig_creations(&self.uuid, 1, NvmlCode::INSUFFICIENT_RESOURCES.0)
                .expect("arm mig-fail");
        }
        let gi = self.inner.create_gpu_instance(profile, placement)?;
        self.created.set(self.created.get() + 1);
        Ok(gi)
    }
    fn destroy_gpu_instance(&self, gi: u32) -> Result<(), MigError> {
        self.inner.destroy_gpu_instance(gi)
    }
    fn ci_profiles(&self, gi: u32) -> Result<Vec<nvml_mig::CiProfile>, MigError> {
        self.inner.ci_profiles(gi)
    }
    fn compute_instances(
        &self,
        gi: u32,
        profile: &nvml_mig::CiProfile,
    ) -> Result<Vec<ComputeInstance>, MigError> {
        self.inner.compute_instances(gi, profile)
    }
    fn create_compute_instance(
        &self,
        gi: u32,
        profile: &nvml_mig::CiProfile,
    ) -> Result<ComputeInstance, MigError> {
        self.inner.create_compute_instance(gi, profile)
    }
    fn destroy_compute_instance(&self, gi: u32, ci: u32) -> Result<(), MigError> {
        self.inner.destroy_compute_instance(gi, ci)
    }
    fn processes(&self) -> Result<Vec<Holder>, MigError> {
        self.inner.processes()
    }
    fn mig_devices(&self) -> Result<Vec<MigDevice>, MigError> {
        self.inner.mig_devices()
    }
}

#[test]
fn a_fault_mid_apply_rolls_back_to_an_empty_layout() {
    let spec = NodeSpec::new(vec![
        GpuSpec::a100_80gb(0)
            .with_mig(Mig::Enabled)
            .with_mig_instance("3g.40gb@0")
            .with_mig_instance("3g.40gb@4"),
    ]);
    scenario(
        "a_fault_mid_apply_rolls_back_to_an_empty_layout",
        spec,
        || {
            let nvml = init();
            let device = nvml.device_by_index(0).expect("device");
            let gpu = MigGpu::new(&device);
            let armed = ArmAfter {
                inner: &gpu,
                after: 3,
                created: std::cell::Cell::new(0),
                control: ControlLog::from_env().expect("GPU_SIM_CONTROL"),
                uuid: device.uuid().expect("uuid"),
            };
            let err = apply_with(&armed, &Layout::new(["1g.10gb"; 7])).expect_err("fault");
            match &err {
                MigError::Aborted {
                    step,
                    cause,
                    rollback,
                    ..
                } => {
                    assert!(step.contains("position 3"), "{step}");
                    match &**cause {
                        MigError::Nvml { function, code, .. } => {
                            assert_eq!(*function, "nvmlDeviceCreateGpuInstanceWithPlacement");
                            assert_eq!(*code, NvmlCode::INSUFFICIENT_RESOURCES);
                        }
                        other => panic!("expected the NVML failure, got {other:?}"),
                    }
                    assert!(matches!(**rollback, Rollback::Clean), "{rollback:?}");
                }
                other => panic!("expected Aborted, got {other:?}"),
            }
            assert_eq!(armed.created.get(), 3);
            assert_eq!(current(&device).expect("current"), Layout::default());
            assert!(gpu.mig_devices().expect("devices").is_empty());
            // the switch was for one creation: the GPU is usable again
            let layout = Layout::new(["1g.10gb"; 7]);
            let applied = apply(&device, &layout).expect("apply after the fault");
            check_applied(&gpu, &layout, &applied);
        },
    );
}

#[test]
fn t4_is_not_supported() {
    let spec = NodeSpec::new(vec![GpuSpec::t4(0)]);
    scenario("t4_is_not_supported", spec, || {
        let nvml = init();
        let device = nvml.device_by_index(0).expect("device");
        match apply(&device, &Layout::new(["1g.10gb"])) {
            Err(MigError::NotSupported { function, .. }) => {
                assert_eq!(function, "nvmlDeviceGetMigMode")
            }
            other => panic!("expected NotSupported, got {other:?}"),
        }
        assert!(matches!(
            current(&device),
            Err(MigError::NotSupported { .. })
        ));
    });
}

#[test]
fn mig_mode_is_switched_on_for_the_first_layout() {
    let spec = NodeSpec::new(vec![GpuSpec::a100_80gb(0).with_mig(Mig::Disabled)]);
    scenario("mig_mode_is_switched_on_for_the_first_layout", spec, || {
        let nvml = init();
        let device = nvml.device_by_index(0).expect("device");
        let gpu = MigGpu::new(&device);
        assert!(matches!(
            current(&device),
            Err(MigError::MigDisabled { .. })
        ));
        let layout = Layout::new(["3g.40gb", "3g.40gb"]);
        let applied = apply(&device, &layout).expect("apply");
        assert_eq!(
            gpu.mig_mode().expect("mode"),
            MigMode {
                current: true,
                pending: true
            }
        );
        check_applied(&gpu, &layout, &applied);
    });
}

#[test]
fn a_process_on_a_gpu_with_mig_off_keeps_it_off() {
    let spec = NodeSpec::new(vec![
        GpuSpec::a100_80gb(0)
            .with_mig(Mig::Disabled)
            .with_process(777, 512),
    ]);
    scenario("a_process_on_a_gpu_with_mig_off_keeps_it_off", spec, || {
        let nvml = init();
        let device = nvml.device_by_index(0).expect("device");
        let gpu = MigGpu::new(&device);
        match apply(&device, &Layout::new(["7g.80gb"])) {
            Err(MigError::InUse { pids, .. }) => assert_eq!(pids, [777]),
            other => panic!("expected InUse, got {other:?}"),
        }
        // refused before the mode switch: nothing pending either
        assert_eq!(
            gpu.mig_mode().expect("mode"),
            MigMode {
                current: false,
                pending: false
            }
        );
    });
}

#[test]
fn existing_instances_are_read_in_placement_order_and_replaced() {
    let spec = NodeSpec::new(vec![
        GpuSpec::a100_80gb(0)
            .with_mig(Mig::Enabled)
            .with_mig_instance("1g.10gb@6")
            .with_mig_instance("4g.40gb@0")
            .with_mig_instance("2g.20gb@4 gi-only"),
    ]);
    scenario(
        "existing_instances_are_read_in_placement_order_and_replaced",
        spec,
        || {
            let nvml = init();
            let device = nvml.device_by_index(0).expect("device");
            let gpu = MigGpu::new(&device);
            assert_eq!(
                current(&device).expect("current"),
                Layout::new(["4g.40gb", "2g.20gb", "1g.10gb"])
            );
            // the GPU instance without a compute instance has no MIG device
            assert_eq!(gpu.mig_devices().expect("devices").len(), 2);
            let layout = Layout::new(["7g.80gb"]);
            let applied = apply(&device, &layout).expect("apply");
            assert_eq!(placements(&applied), [p(0, 8)]);
            check_applied(&gpu, &layout, &applied);
        },
    );
}

#[test]
fn a_cuda_process_holding_memory_blocks_repartitioning_until_it_dies() {
    const PID_ENV: &str = "NVML_MIG_TEST_HOLDER_PID";
    let spec = NodeSpec::new(vec![
        GpuSpec::a100_80gb(0)
            .with_mig(Mig::Enabled)
            .with_mig_instance("3g.40gb@0")
            .with_mig_instance("3g.40gb@4"),
    ]);
    scenario_with(
        "a_cuda_process_holding_memory_blocks_repartitioning_until_it_dies",
        spec,
        |node| {
            let holding = node.hold(0, 1 << 30);
            let pid = holding.pid;
            (holding, vec![(PID_ENV.to_owned(), pid.to_string())])
        },
        || {
            let pid: u32 = std::env::var(PID_ENV)
                .expect("holder pid")
                .parse()
                .expect("pid");
            let nvml = init();
            let device = nvml.device_by_index(0).expect("device");
            let before = current(&device).expect("current");
            let seven = Layout::new(["1g.10gb"; 7]);
            match apply(&device, &seven) {
                Err(MigError::InUse { pids, .. }) => assert_eq!(pids, [pid]),
                other => panic!("expected InUse by {pid}, got {other:?}"),
            }
            assert_eq!(current(&device).expect("current"), before);

            let status = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status()
                .expect("run kill");
            assert!(status.success());
            // a SIGKILLed process's memory is reclaimed as soon as it is dead (zombie or reaped)
            let deadline = Instant::now() + Duration::from_secs(10);
            let applied = loop {
                match apply(&device, &seven) {
                    Ok(applied) => break applied,
                    Err(MigError::InUse { .. }) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    Err(e) => panic!("apply after the holder died: {e}"),
                }
            };
            check_applied(&MigGpu::new(&device), &seven, &applied);
        },
    );
}
