//! What Allocate returns for one container in hami-core mode (docs/volcano-contract.md §4): the envs HAMi-core's
//! `libvgpu.so` reads, the mounts that preload it and give it a per-container shared-region file, and the
//! container's GPUs in the form `--device-list-strategy` selects:
//! - `envvar`: `NVIDIA_VISIBLE_DEVICES=<uuid>,…`;
//! - `volume-mounts`: `NVIDIA_VISIBLE_DEVICES=/var/run/nvidia-container-devices` and one `/dev/null` mount
//!   per GPU at `/var/run/nvidia-container-devices/<uuid>` (the NVIDIA runtime's mount-based list);
//! - `cdi-annotations` / `cdi-cri`: the CDI names `volcano.sh/vgpu=<uuid>` (and `…=hami-core-preload` unless
//!   `CUDA_DISABLE_CONTROL`) in a `cdi.k8s.io/vgpu-device-plugin_<id>` annotation or in `cdi_devices`. With
//!   CDI alone the limiter, device nodes and driver come from the spec ([`crate::container::cdi`]), and
//!   `NVIDIA_VISIBLE_DEVICES=void` keeps an NVIDIA runtime that is still the default from handing the
//!   container the image's `all`; combined with `envvar`/`volume-mounts` the response also carries the
//!   classic form (CDI replaces same-path mounts and nodes, so nothing is injected twice).
//!
//! The answer is a value of this domain, [`ContainerAnswer`]; the kubelet edge turns it into the protobuf
//! `ContainerAllocateResponse`.
//!
//! With `--pass-device-specs` the device nodes come back too (as `DeviceSpec`s to the kubelet), and with `--driver-host-path` the
//! driver directory is mounted read-only with `LD_LIBRARY_PATH` (and optionally `PATH`) pointing into it.
//! The per-container envs (limits, shared cache path) always come from here.
//!
//! Differences from the Go plugin, both deliberate: `CUDA_OVERSUBSCRIBE` follows the memory scaling (the Go
//! plugin keys it to `deviceCoreScaling`, which has nothing to do with memory; HAMi upstream uses memory
//! scaling too), and `GPU_CORE_UTILIZATION_POLICY=disable` is reachable through [`LimiterSettings`] (in the Go
//! plugin nothing ever sets its switch).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::config::{DeliverySettings, DeviceListStrategy};
use crate::container::cdi;
use crate::container::device_nodes::{DeviceNode, MigNodeIds, container_nodes, mig_nodes};
use crate::volcano::pod_devices::ContainerDevice;

use crate::container::paths::{
    CONTAINER_CACHE_DIR, CONTAINER_LD_SO_PRELOAD, CONTAINER_LIBVGPU, CONTAINER_LOCK_DIR,
    VOLUME_MOUNTS_ROOT,
};

/// Node-wide limiter settings.
#[derive(Debug, Clone, PartialEq)]
pub struct LimiterSettings {
    /// `gpuMemoryFactor`: MiB per memory unit in the annotation.
    pub memory_factor: u32,
    /// `deviceMemoryScaling`: above 1, HAMi-core may oversubscribe memory.
    pub memory_scaling: f64,
    /// `disableCoreLimit`: tell HAMi-core not to throttle SMs.
    pub disable_core_limit: bool,
    /// Host directory holding `libvgpu.so` and `ld.so.preload` (`HOOK_PATH`, `/usr/local/vgpu`).
    pub hook_path: PathBuf,
    /// Host directory mounted at `/tmp/vgpulock`.
    pub lock_dir: PathBuf,
    /// `--gdrcopy-enabled`.
    pub gdrcopy: bool,
    /// `--gds-enabled`.
    pub gds: bool,
    /// `--mofed-enabled`.
    pub mofed: bool,
    /// Device list strategy, device nodes, driver paths.
    pub delivery: DeliverySettings,
    /// Minor number of each GPU by UUID, for `/dev/nvidia<minor>`.
    pub gpu_minors: BTreeMap<String, u32>,
}

impl Default for LimiterSettings {
    /// The Go plugin's defaults: factor 1, no oversubscription, core limit on, the DaemonSet's paths, and the
    /// GDRCopy/GDS/MOFED flags on (they default to true in its `main.go`).
    fn default() -> Self {
        Self {
            memory_factor: 1,
            memory_scaling: 1.0,
            disable_core_limit: false,
            hook_path: PathBuf::from("/usr/local/vgpu"),
            lock_dir: PathBuf::from("/tmp/vgpulock"),
            gdrcopy: true,
            gds: true,
            mofed: true,
            delivery: DeliverySettings::default(),
            gpu_minors: BTreeMap::new(),
        }
    }
}

/// One container's allocation.
#[derive(Debug, Clone)]
pub struct Handoff<'a> {
    /// The container's devices, from its `devices-to-allocate` segment.
    pub devices: &'a [ContainerDevice],
    /// The per-container directory on the host, mounted at `/tmp/vgpu`.
    pub cache_host_dir: PathBuf,
    /// The shared-region file name inside it, e.g. `<uuid4>.cache`.
    pub cache_file: String,
    /// The container spec has `CUDA_DISABLE_CONTROL`: do not preload `libvgpu.so`.
    pub disable_control: bool,
}

/// One mount of a container's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerMount {
    /// Where the container sees it.
    pub container_path: String,
    /// What is mounted there from the host.
    pub host_path: PathBuf,
    /// Mounted read-only.
    pub read_only: bool,
}

/// What one container is handed: everything the kubelet's `ContainerAllocateResponse` carries, as values of
/// this domain (the kubelet edge turns it into the protobuf message).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerAnswer {
    /// The container's environment.
    pub envs: BTreeMap<String, String>,
    /// Its mounts, in order.
    pub mounts: Vec<ContainerMount>,
    /// Its device nodes (with `--pass-device-specs`), control nodes first.
    pub devices: Vec<DeviceNode>,
    /// Fully qualified CDI device names for the runtime (`cdi-cri`).
    pub cdi_devices: Vec<String>,
    /// Annotations for the runtime (`cdi-annotations`).
    pub annotations: BTreeMap<String, String>,
}

/// The answer for one container.
///
/// With an empty device list (which [`crate::handoff::selection::next_assignment`] never yields) no limit envs are set and
/// `NVIDIA_VISIBLE_DEVICES` is empty, which the NVIDIA runtime treats as "no GPU".
pub fn container_answer(settings: &LimiterSettings, handoff: &Handoff<'_>) -> ContainerAnswer {
    let delivery = &settings.delivery;
    let strategies = &delivery.strategies;
    let classic = !strategies.cdi_only();
    let mut envs = BTreeMap::new();
    let uuids: Vec<&str> = handoff.devices.iter().map(|d| d.uuid.as_str()).collect();
    let mut mounts = Vec::new();
    if strategies.includes(DeviceListStrategy::VolumeMounts) {
        envs.insert(
            "NVIDIA_VISIBLE_DEVICES".to_owned(),
            VOLUME_MOUNTS_ROOT.to_owned(),
        );
        for uuid in &uuids {
            mounts.push(mount(
                &format!("{VOLUME_MOUNTS_ROOT}/{uuid}"),
                Path::new("/dev/null"),
                true,
            ));
        }
    } else if strategies.includes(DeviceListStrategy::Envvar) {
        envs.insert("NVIDIA_VISIBLE_DEVICES".to_owned(), uuids.join(","));
    } else {
        // CDI only: the devices come from the spec; `void` is the NVIDIA runtime's "no GPU".
        envs.insert("NVIDIA_VISIBLE_DEVICES".to_owned(), "void".to_owned());
    }
    for (i, device) in handoff.devices.iter().enumerate() {
        // u64: u32 units × u32 MiB per unit cannot overflow it.
        let mib = u64::from(device.used_mem) * u64::from(settings.memory_factor);
        envs.insert(format!("CUDA_DEVICE_MEMORY_LIMIT_{i}"), format!("{mib}m"));
    }
    if let Some(first) = handoff.devices.first() {
        // HAMi-core has one SM limit for the whole container; the Go plugin takes the first device's.
        envs.insert(
            "CUDA_DEVICE_SM_LIMIT".to_owned(),
            first.used_cores.to_string(),
        );
    }
    envs.insert(
        "CUDA_DEVICE_MEMORY_SHARED_CACHE".to_owned(),
        format!("{CONTAINER_CACHE_DIR}/{}", handoff.cache_file),
    );
    if settings.memory_scaling > 1.0 {
        envs.insert("CUDA_OVERSUBSCRIBE".to_owned(), "true".to_owned());
    }
    if settings.disable_core_limit {
        envs.insert(
            "GPU_CORE_UTILIZATION_POLICY".to_owned(),
            "disable".to_owned(),
        );
    }
    for (flag, name) in [
        (settings.gdrcopy, "NVIDIA_GDRCOPY"),
        (settings.gds, "NVIDIA_GDS"),
        (settings.mofed, "NVIDIA_MOFED"),
    ] {
        if flag {
            envs.insert(name.to_owned(), "enabled".to_owned());
        }
    }

    if classic {
        mounts.push(mount(
            CONTAINER_LIBVGPU,
            &settings.hook_path.join("libvgpu.so"),
            true,
        ));
    }
    mounts.push(mount(CONTAINER_CACHE_DIR, &handoff.cache_host_dir, false));
    if classic {
        mounts.push(mount(CONTAINER_LOCK_DIR, &settings.lock_dir, false));
        if !handoff.disable_control {
            mounts.push(mount(
                CONTAINER_LD_SO_PRELOAD,
                &settings.hook_path.join("ld.so.preload"),
                true,
            ));
        }
        if let Some(driver) = &delivery.driver {
            mounts.push(mount(
                &driver.container.to_string_lossy(),
                &driver.host,
                true,
            ));
            envs.insert("LD_LIBRARY_PATH".to_owned(), driver.ld_library_path());
            if driver.set_path {
                envs.insert("PATH".to_owned(), driver.path());
            }
        }
    }

    let mut answer = ContainerAnswer {
        envs,
        mounts,
        ..Default::default()
    };
    if delivery.pass_device_specs && classic {
        let minors: Vec<u32> = uuids
            .iter()
            .filter_map(|uuid| settings.gpu_minors.get(*uuid).copied())
            .collect();
        answer.devices = container_nodes(&delivery.dev_root, &minors);
    }
    if strategies.any_cdi() {
        let mut names: Vec<String> = uuids.iter().map(|uuid| cdi::qualified(uuid)).collect();
        if !handoff.disable_control {
            names.push(cdi::qualified(cdi::PRELOAD_DEVICE));
        }
        if strategies.includes(DeviceListStrategy::CdiAnnotations) {
            answer.annotations.insert(
                cdi::annotation_key(&delivery.cdi_annotation_prefix),
                names.join(","),
            );
        }
        if strategies.includes(DeviceListStrategy::CdiCri) {
            answer.cdi_devices = names;
        }
    }
    answer
}

/// The answer for a container handed MIG devices (`operatingmode: mig`), as the Go plugin gives it ([P]
/// `server.go:390-410`): `NVIDIA_VISIBLE_DEVICES` with the MIG UUIDs and nothing else: no HAMi-core limit envs,
/// no `libvgpu.so`, cache directory or `ld.so.preload` mounts (a MIG device is isolated by the hardware).
///
/// Under a CDI strategy the devices are named `nvidia.com/gpu=<MIG UUID>` (the name `nvidia-ctk cdi generate
/// --device-name-strategy=uuid` gives a MIG device; the node's CDI spec must be regenerated after a
/// repartition, since MIG UUIDs change) and `NVIDIA_VISIBLE_DEVICES` is `void` when CDI is the only strategy.
///
/// With `--pass-device-specs` (and a strategy other than CDI only, as for a HAMi-core container) the device
/// nodes are passed as NVIDIA's device plugin passes a MIG device's: the control nodes, the parent GPU's
/// `/dev/nvidia<minor>` and the `/dev/nvidia-caps/nvidia-cap<N>` of the GPU and compute instances' `access`
/// capabilities ([`mig_nodes`], N from `--nvidia-caps-minors`). When those cannot be found the error says
/// why and the container gets nothing: a MIG device it cannot open is never handed out.
pub fn mig_answer(
    settings: &LimiterSettings,
    devices: &[MigHanded],
) -> Result<ContainerAnswer, String> {
    let delivery = &settings.delivery;
    let strategies = &delivery.strategies;
    let mig_uuids: Vec<String> = devices.iter().map(|d| d.uuid.clone()).collect();
    let mut answer = ContainerAnswer::default();
    if delivery.pass_device_specs && !strategies.cdi_only() {
        let ids: Vec<MigNodeIds> = devices.iter().map(|d| d.ids).collect();
        answer.devices = mig_nodes(&delivery.dev_root, &delivery.mig_minors, &ids)?;
    }
    let visible = if strategies.cdi_only() {
        "void".to_owned()
    } else {
        mig_uuids.join(",")
    };
    answer
        .envs
        .insert("NVIDIA_VISIBLE_DEVICES".to_owned(), visible);
    if strategies.any_cdi() {
        let names: Vec<String> = mig_uuids.iter().map(|u| cdi::qualified(u)).collect();
        if strategies.includes(DeviceListStrategy::CdiAnnotations) {
            answer.annotations.insert(
                cdi::annotation_key(&settings.delivery.cdi_annotation_prefix),
                names.join(","),
            );
        }
        if strategies.includes(DeviceListStrategy::CdiCri) {
            answer.cdi_devices = names;
        }
    }
    Ok(answer)
}

/// One MIG device handed to a container: its UUID, and what its device nodes are found by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigHanded {
    /// `MIG-…`.
    pub uuid: String,
    /// The parent GPU's minor, the GPU and compute instance ids.
    pub ids: MigNodeIds,
}

fn mount(container_path: &str, host_path: &Path, read_only: bool) -> ContainerMount {
    ContainerMount {
        container_path: container_path.to_owned(),
        host_path: host_path.to_path_buf(),
        read_only,
    }
}

/// The per-container cache directory name, `<uid>_<container>`.
///
/// Anything outside `[A-Za-z0-9._-]` becomes `_`, so neither part can add a path separator; and since the
/// result always contains the joining `_`, it can never be `.` or `..`. (Real UIDs and container names are
/// already in that set, so real names come out unchanged, as the Go plugin writes them.)
pub fn cache_dir_name(pod_uid: &str, container: &str) -> String {
    let clean = |text: &str| -> String {
        text.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    };
    format!("{}_{}", clean(pod_uid), clean(container))
}

/// A fresh shared-region file name, `<uuid4>.cache`, drawn on every Allocate as the Go plugin does.
pub fn new_cache_file() -> String {
    format!("{}.cache", uuid::Uuid::new_v4())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volcano::DEVICE_TYPE_NVIDIA;

    fn dev(uuid: &str, mem: u32, cores: u32) -> ContainerDevice {
        ContainerDevice {
            uuid: uuid.to_owned(),
            device_type: DEVICE_TYPE_NVIDIA.to_owned(),
            used_mem: mem,
            used_cores: cores,
        }
    }

    fn quiet() -> LimiterSettings {
        LimiterSettings {
            gdrcopy: false,
            gds: false,
            mofed: false,
            ..Default::default()
        }
    }

    fn handoff(devices: &[ContainerDevice]) -> Handoff<'_> {
        Handoff {
            devices,
            cache_host_dir: PathBuf::from("/usr/local/vgpu/vgpu/containers/uid_cuda"),
            cache_file: "x.cache".to_owned(),
            disable_control: false,
        }
    }

    #[test]
    fn envs_and_mounts_of_a_two_gpu_container() {
        let devices = [dev("GPU-a", 3000, 30), dev("GPU-b", 3000, 30)];
        let settings = LimiterSettings {
            memory_factor: 10,
            ..quiet()
        };
        let response = container_answer(&settings, &handoff(&devices));
        let expected: BTreeMap<String, String> = [
            ("NVIDIA_VISIBLE_DEVICES", "GPU-a,GPU-b"),
            ("CUDA_DEVICE_MEMORY_LIMIT_0", "30000m"),
            ("CUDA_DEVICE_MEMORY_LIMIT_1", "30000m"),
            ("CUDA_DEVICE_SM_LIMIT", "30"),
            ("CUDA_DEVICE_MEMORY_SHARED_CACHE", "/tmp/vgpu/x.cache"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        assert_eq!(response.envs, expected);
        let mounts: Vec<(&str, &str, bool)> = response
            .mounts
            .iter()
            .map(|m| {
                (
                    m.container_path.as_str(),
                    m.host_path.to_str().unwrap(),
                    m.read_only,
                )
            })
            .collect();
        assert_eq!(
            mounts,
            vec![
                (
                    "/usr/local/vgpu/libvgpu.so",
                    "/usr/local/vgpu/libvgpu.so",
                    true
                ),
                (
                    "/tmp/vgpu",
                    "/usr/local/vgpu/vgpu/containers/uid_cuda",
                    false
                ),
                ("/tmp/vgpulock", "/tmp/vgpulock", false),
                ("/etc/ld.so.preload", "/usr/local/vgpu/ld.so.preload", true),
            ]
        );
        assert!(response.devices.is_empty());
        assert!(response.annotations.is_empty());
        assert!(response.cdi_devices.is_empty());
    }

    #[test]
    fn disable_control_skips_the_preload_mount_only() {
        let devices = [dev("GPU-a", 1, 0)];
        let mut h = handoff(&devices);
        h.disable_control = true;
        let response = container_answer(&quiet(), &h);
        assert_eq!(response.mounts.len(), 3);
        assert!(
            response
                .mounts
                .iter()
                .all(|m| m.container_path != "/etc/ld.so.preload")
        );
        assert_eq!(response.envs["CUDA_DEVICE_MEMORY_LIMIT_0"], "1m");
    }

    #[test]
    fn oversubscribe_follows_memory_scaling_and_flags_add_their_envs() {
        let devices = [dev("GPU-a", 1, 0)];
        let settings = LimiterSettings {
            memory_scaling: 1.5,
            disable_core_limit: true,
            ..LimiterSettings::default()
        };
        let envs = container_answer(&settings, &handoff(&devices)).envs;
        assert_eq!(envs["CUDA_OVERSUBSCRIBE"], "true");
        assert_eq!(envs["GPU_CORE_UTILIZATION_POLICY"], "disable");
        assert_eq!(envs["NVIDIA_GDRCOPY"], "enabled");
        assert_eq!(envs["NVIDIA_GDS"], "enabled");
        assert_eq!(envs["NVIDIA_MOFED"], "enabled");

        let envs = container_answer(&quiet(), &handoff(&devices)).envs;
        for absent in [
            "CUDA_OVERSUBSCRIBE",
            "GPU_CORE_UTILIZATION_POLICY",
            "NVIDIA_GDRCOPY",
            "NVIDIA_GDS",
            "NVIDIA_MOFED",
        ] {
            assert!(!envs.contains_key(absent), "{absent}");
        }
        let exactly_one = LimiterSettings {
            memory_scaling: 1.0,
            ..quiet()
        };
        assert!(
            !container_answer(&exactly_one, &handoff(&devices))
                .envs
                .contains_key("CUDA_OVERSUBSCRIBE")
        );
    }

    #[test]
    fn huge_memory_does_not_overflow() {
        let devices = [dev("GPU-a", u32::MAX, 100)];
        let settings = LimiterSettings {
            memory_factor: u32::MAX,
            ..quiet()
        };
        let envs = container_answer(&settings, &handoff(&devices)).envs;
        assert_eq!(
            envs["CUDA_DEVICE_MEMORY_LIMIT_0"],
            format!("{}m", u64::from(u32::MAX) * u64::from(u32::MAX))
        );
        assert_eq!(envs["CUDA_DEVICE_SM_LIMIT"], "100");
    }

    #[test]
    fn sm_limit_is_the_first_devices() {
        let devices = [dev("GPU-a", 1, 20), dev("GPU-b", 1, 70)];
        let envs = container_answer(&quiet(), &handoff(&devices)).envs;
        assert_eq!(envs["CUDA_DEVICE_SM_LIMIT"], "20");
    }

    #[test]
    fn no_devices_sets_no_limits() {
        let envs = container_answer(&quiet(), &handoff(&[])).envs;
        assert_eq!(envs["NVIDIA_VISIBLE_DEVICES"], "");
        assert!(!envs.contains_key("CUDA_DEVICE_SM_LIMIT"));
        assert!(
            !envs
                .keys()
                .any(|k| k.starts_with("CUDA_DEVICE_MEMORY_LIMIT"))
        );
    }

    fn with_strategies(list: &str) -> LimiterSettings {
        LimiterSettings {
            delivery: DeliverySettings {
                strategies: crate::config::parse_device_list_strategies(list).unwrap(),
                ..Default::default()
            },
            gpu_minors: [("GPU-a".to_owned(), 2), ("GPU-b".to_owned(), 6)].into(),
            ..quiet()
        }
    }

    fn container_paths(r: &ContainerAnswer) -> Vec<&str> {
        r.mounts.iter().map(|m| m.container_path.as_str()).collect()
    }

    #[test]
    fn volume_mounts_list_each_gpu_as_a_dev_null_mount() {
        let devices = [dev("GPU-a", 1, 0), dev("GPU-b", 1, 0)];
        let r = container_answer(&with_strategies("volume-mounts"), &handoff(&devices));
        assert_eq!(r.envs["NVIDIA_VISIBLE_DEVICES"], VOLUME_MOUNTS_ROOT);
        let lists: Vec<(&str, &str)> = r
            .mounts
            .iter()
            .filter(|m| m.host_path == Path::new("/dev/null"))
            .map(|m| (m.container_path.as_str(), m.host_path.to_str().unwrap()))
            .collect();
        assert_eq!(
            lists,
            vec![
                ("/var/run/nvidia-container-devices/GPU-a", "/dev/null"),
                ("/var/run/nvidia-container-devices/GPU-b", "/dev/null"),
            ]
        );
        assert!(container_paths(&r).contains(&CONTAINER_LD_SO_PRELOAD));
    }

    #[test]
    fn cdi_only_names_devices_and_leaves_the_limiter_to_the_spec() {
        let devices = [dev("GPU-a", 1, 0), dev("GPU-b", 1, 0)];
        let r = container_answer(&with_strategies("cdi-cri"), &handoff(&devices));
        let names: Vec<&str> = r.cdi_devices.iter().map(String::as_str).collect();
        assert_eq!(
            names,
            vec![
                "volcano.sh/vgpu=GPU-a",
                "volcano.sh/vgpu=GPU-b",
                "volcano.sh/vgpu=hami-core-preload"
            ]
        );
        assert!(r.annotations.is_empty());
        assert_eq!(r.envs["NVIDIA_VISIBLE_DEVICES"], "void");
        assert_eq!(r.envs["CUDA_DEVICE_MEMORY_LIMIT_1"], "1m");
        assert_eq!(container_paths(&r), vec![CONTAINER_CACHE_DIR]);

        let mut h = handoff(&devices[..1]);
        h.disable_control = true;
        let r = container_answer(&with_strategies("cdi-annotations"), &h);
        assert!(r.cdi_devices.is_empty());
        let (key, value) = r.annotations.iter().next().unwrap();
        assert!(key.starts_with("cdi.k8s.io/vgpu-device-plugin_"), "{key}");
        assert_eq!(value, "volcano.sh/vgpu=GPU-a");
    }

    #[test]
    fn envvar_with_cdi_carries_both_forms() {
        let devices = [dev("GPU-b", 1, 0)];
        let r = container_answer(
            &with_strategies("envvar,cdi-annotations"),
            &handoff(&devices),
        );
        assert_eq!(r.envs["NVIDIA_VISIBLE_DEVICES"], "GPU-b");
        assert_eq!(r.annotations.len(), 1);
        assert_eq!(r.mounts.len(), 4);
    }

    #[test]
    fn driver_directory_is_mounted_read_only_with_its_library_path() {
        let devices = [dev("GPU-a", 1, 0)];
        let mut settings = with_strategies("envvar");
        settings.delivery.driver = Some(crate::config::DriverPaths {
            host: "/home/kubernetes/bin/nvidia".into(),
            container: "/usr/local/nvidia".into(),
            set_path: false,
        });
        let r = container_answer(&settings, &handoff(&devices));
        let driver = r
            .mounts
            .iter()
            .find(|m| m.container_path == "/usr/local/nvidia")
            .unwrap();
        assert_eq!(
            (driver.host_path.as_path(), driver.read_only),
            (Path::new("/home/kubernetes/bin/nvidia"), true)
        );
        assert_eq!(
            r.envs["LD_LIBRARY_PATH"],
            "/usr/local/nvidia/lib64:/usr/local/nvidia/lib"
        );
        assert!(!r.envs.contains_key("PATH"));
        settings.delivery.driver.as_mut().unwrap().set_path = true;
        let r = container_answer(&settings, &handoff(&devices));
        assert!(r.envs["PATH"].starts_with("/usr/local/nvidia/bin:"));
    }

    #[test]
    fn cache_dir_names_cannot_escape() {
        assert_eq!(
            cache_dir_name("0f1e2d3c-aaaa-bbbb-cccc-000000000000", "cuda"),
            "0f1e2d3c-aaaa-bbbb-cccc-000000000000_cuda"
        );
        assert_eq!(cache_dir_name("..", ".."), ".._..");
        assert_eq!(cache_dir_name("a/b", "../../etc"), "a_b_.._.._etc");
        assert_eq!(cache_dir_name("", ""), "_");
        assert_eq!(cache_dir_name("u", "x\0y\\z é"), "u_x_y_z__");
        for name in [
            cache_dir_name("..", ""),
            cache_dir_name("", ".."),
            cache_dir_name("/", "/"),
        ] {
            assert!(!name.contains('/'), "{name}");
            assert!(name != "." && name != "..", "{name}");
        }
    }

    #[test]
    fn cache_files_are_fresh_uuid4_names() {
        let a = new_cache_file();
        let b = new_cache_file();
        assert_ne!(a, b);
        let stem = a.strip_suffix(".cache").unwrap();
        assert_eq!(uuid::Uuid::parse_str(stem).unwrap().get_version_num(), 4);
    }

    fn handed(uuid: &str, gi_id: u32) -> MigHanded {
        MigHanded {
            uuid: uuid.to_owned(),
            ids: MigNodeIds {
                gpu_minor: 0,
                gi_id,
                ci_id: 0,
            },
        }
    }

    #[test]
    fn a_mig_answer_with_device_specs_passes_the_mig_nodes_or_fails() {
        let root = tempfile::tempdir().unwrap();
        let minors = root.path().join("mig-minors");
        let mut settings = LimiterSettings::default();
        settings.delivery.pass_device_specs = true;
        settings.delivery.dev_root = root.path().to_path_buf();
        settings.delivery.mig_minors = minors.clone();
        let err = mig_answer(&settings, &[handed("MIG-1", 3)]).unwrap_err();
        assert!(
            err.starts_with(&format!("cannot read {}", minors.display())),
            "{err}"
        );
        std::fs::write(
            &minors,
            "config 1\nmonitor 2\ngpu0/gi3/access 30\ngpu0/gi3/ci0/access 31\n",
        )
        .unwrap();
        let answer = mig_answer(&settings, &[handed("MIG-1", 3)]).unwrap();
        let paths: Vec<&str> = answer
            .devices
            .iter()
            .map(|d| d.container_path.as_str())
            .collect();
        assert_eq!(
            paths,
            [
                "/dev/nvidia0",
                "/dev/nvidia-caps/nvidia-cap30",
                "/dev/nvidia-caps/nvidia-cap31"
            ]
        );
        assert_eq!(answer.envs["NVIDIA_VISIBLE_DEVICES"], "MIG-1");
        let err = mig_answer(&settings, &[handed("MIG-1", 4)]).unwrap_err();
        assert!(err.contains("no line `gpu0/gi4/access <minor>`"), "{err}");
    }

    #[test]
    fn a_mig_answer_is_the_mig_uuids_only() {
        let settings = LimiterSettings {
            memory_factor: 10,
            disable_core_limit: true,
            ..LimiterSettings::default()
        };
        let answer = mig_answer(&settings, &[handed("MIG-1", 0), handed("MIG-2", 1)]).unwrap();
        let expected: BTreeMap<String, String> = [(
            "NVIDIA_VISIBLE_DEVICES".to_owned(),
            "MIG-1,MIG-2".to_owned(),
        )]
        .into();
        assert_eq!(answer.envs, expected);
        assert!(answer.mounts.is_empty() && answer.devices.is_empty());
        assert!(answer.cdi_devices.is_empty() && answer.annotations.is_empty());
    }

    #[test]
    fn a_mig_answer_under_cdi_names_the_mig_devices_and_no_preload_device() {
        let mut settings = LimiterSettings::default();
        settings.delivery.strategies =
            crate::config::parse_device_list_strategies("cdi-cri").unwrap();
        let answer = mig_answer(&settings, &[handed("MIG-1", 0)]).unwrap();
        assert_eq!(answer.envs["NVIDIA_VISIBLE_DEVICES"], "void");
        assert_eq!(answer.cdi_devices, [cdi::qualified("MIG-1")]);
        assert!(answer.mounts.is_empty());
        settings.delivery.strategies =
            crate::config::parse_device_list_strategies("envvar,cdi-annotations").unwrap();
        let answer = mig_answer(&settings, &[handed("MIG-1", 0)]).unwrap();
        assert_eq!(answer.envs["NVIDIA_VISIBLE_DEVICES"], "MIG-1");
        assert_eq!(
            answer.annotations.values().collect::<Vec<_>>(),
            [&cdi::qualified("MIG-1")]
        );
    }
}
