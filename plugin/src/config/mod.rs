//! The agent's configuration after flags, environment and defaults have been merged and checked.
//!
//! Everything the agent touches on the host (the kubelet socket, the NVML library, sysfs) is a field here, so
//! tests point the real binary at temporary directories and the gpu-sim.

pub mod device;
pub mod load;

use std::path::PathBuf;
use std::time::Duration;

/// The config map's name and key.
pub const DEVICE_CONFIG_MAP: &str = "volcano-vgpu-device-config";
/// The key inside the config map.
pub const DEVICE_CONFIG_KEY: &str = "device-config.yaml";
/// Namespaces searched, in order, when none is given.
pub const DEVICE_CONFIG_NAMESPACES: [&str; 2] = ["kube-system", "volcano-system"];
/// Where the DaemonSet mounts the per-node config map.
pub const NODE_CONFIG_PATH: &str = "/config/config.json";

/// Flags the operator set explicitly; they win over both config maps.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ExplicitFlags {
    /// `--device-split-count`.
    pub split_count: Option<u32>,
    /// `--gpu-memory-factor`.
    pub memory_factor: Option<u32>,
    /// `--device-cores-scaling`.
    pub core_scaling: Option<f64>,
}

/// The default `volcano.sh/...` resource names the scheduler and the Go plugin use.
pub const DEFAULT_NUMBER_RESOURCE: &str = "volcano.sh/vgpu-number";
/// Memory, in `gpuMemoryFactor` MiB units.
pub const DEFAULT_MEMORY_RESOURCE: &str = "volcano.sh/vgpu-memory";
/// Cores, 100 per GPU times the core scaling.
pub const DEFAULT_CORES_RESOURCE: &str = "volcano.sh/vgpu-cores";

/// `deviceSplitCount` (and `--device-split-count`) the agent serves. The upper end keeps the `vgpu-number` list of
/// a node with 64 GPUs well inside the kubelet's 4 MiB message, so no value in the range can stop the agent.
pub const SPLIT_COUNT_RANGE: std::ops::RangeInclusive<u32> = 1..=1000;
/// `deviceCoreScaling` (and `--device-cores-scaling`): at most 1,000 `vgpu-cores` IDs per GPU, for the same reason.
pub const CORE_SCALING_RANGE: std::ops::RangeInclusive<f64> = 0.01..=10.0;
/// `deviceMemoryScaling`: physical memory × this is advertised.
pub const MEMORY_SCALING_RANGE: std::ops::RangeInclusive<f64> = 0.01..=100.0;

/// How the node's GPUs are cut into device-plugin IDs (docs/volcano-contract.md §1.2).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SharingSettings {
    /// `deviceSplitCount`: how many containers may share one GPU; IDs per GPU on the number resource.
    pub split_count: u32,
    /// `gpuMemoryFactor`: MiB per unit of `vgpu-memory`.
    pub memory_factor: u32,
    /// `deviceCoreScaling`: the cores resource advertises `floor(100 × scaling)` IDs per GPU.
    pub core_scaling: f64,
    /// `deviceMemoryScaling`: memory is advertised as physical × this (> 1 oversubscribes).
    pub memory_scaling: f64,
}

impl Default for SharingSettings {
    /// The values that work when no config map exists: split 10, factor 1, scaling 1.
    fn default() -> Self {
        Self {
            split_count: 10,
            memory_factor: 1,
            core_scaling: 1.0,
            memory_scaling: 1.0,
        }
    }
}

/// A setting with a value outside what the agent can serve.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("invalid {field} = {value}: expected {expected}")]
pub struct InvalidSetting {
    /// The flag or config key, as an operator would write it.
    pub field: &'static str,
    /// The offending value.
    pub value: String,
    /// What would have been accepted.
    pub expected: &'static str,
}

impl SharingSettings {
    /// Refuses values that would divide by zero, advertise nothing, or overflow the kubelet's counters.
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        if !SPLIT_COUNT_RANGE.contains(&self.split_count) {
            return Err(InvalidSetting {
                field: "--device-split-count (deviceSplitCount)",
                value: self.split_count.to_string(),
                expected: "a whole number from 1 to 1000",
            });
        }
        if self.memory_factor == 0 {
            return Err(InvalidSetting {
                field: "--gpu-memory-factor (gpuMemoryFactor)",
                value: self.memory_factor.to_string(),
                expected: "a whole number of MiB of at least 1",
            });
        }
        if !CORE_SCALING_RANGE.contains(&self.core_scaling) {
            return Err(InvalidSetting {
                field: "--device-cores-scaling (deviceCoreScaling)",
                value: self.core_scaling.to_string(),
                expected: "a number from 0.01 to 10 (1 = 100 core IDs per GPU)",
            });
        }
        Ok(())
    }

    /// Refuses a `gpuMemoryFactor` larger than a GPU's (scaled) memory: that GPU would advertise no
    /// `vgpu-memory` at all and register 0 memory with the scheduler. `memories_mib` are the served GPUs'.
    /// Falling back to another factor is not an option: pods ask for memory in units of this one.
    pub fn check_memory_factor(
        &self,
        memories_mib: impl IntoIterator<Item = u64>,
    ) -> Result<(), InvalidSetting> {
        let smallest = memories_mib.into_iter().min().unwrap_or(u64::MAX);
        if self.memory_units(smallest) == 0 {
            // The same GPU at factor 1: its (scaled) MiB, the largest factor that still works.
            let advertised = SharingSettings {
                memory_factor: 1,
                ..*self
            }
            .memory_units(smallest);
            return Err(InvalidSetting {
                field: "--gpu-memory-factor (gpuMemoryFactor)",
                value: format!(
                    "{} (the smallest GPU advertises {advertised} MiB)",
                    self.memory_factor
                ),
                expected: "at most the smallest GPU's memory in MiB (times deviceMemoryScaling), so every GPU \
                           advertises vgpu-memory",
            });
        }
        Ok(())
    }

    /// Memory units one GPU advertises: `floor(MiB × memory scaling) / factor` (with scaling 1, docs/volcano-contract.md §1.2).
    pub fn memory_units(&self, memory_mib: u64) -> u64 {
        let scaled = if self.memory_scaling == 1.0 {
            memory_mib
        } else {
            (memory_mib as f64 * self.memory_scaling) as u64
        };
        scaled / u64::from(self.memory_factor.max(1))
    }

    /// IDs per GPU on the cores resource: Go's `int(100 * scaling)`, i.e. truncation.
    pub fn core_ids_per_gpu(&self) -> u64 {
        // Scaling is validated to 0.01..=10, so the product is 1..=1000 and the cast cannot overflow.
        // The small epsilon keeps 1.1 × 100 (= 110.00000000000001) and 0.29 × 100 (= 28.999999999999996) at
        // what an operator means; Go truncates the latter to 28, which no one asks for on purpose.
        (100.0 * self.core_scaling + 1e-9).floor() as u64
    }
}

/// One of the three extended resources.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ResourceKind {
    /// `volcano.sh/vgpu-number`: slots on a GPU.
    Number,
    /// `volcano.sh/vgpu-memory`: memory units.
    Memory,
    /// `volcano.sh/vgpu-cores`: percent of a GPU's SMs.
    Cores,
}

impl ResourceKind {
    /// The three, in the order they are served and registered.
    pub const ALL: [ResourceKind; 3] = [
        ResourceKind::Number,
        ResourceKind::Memory,
        ResourceKind::Cores,
    ];

    /// A short name for logs and socket names.
    pub fn short_name(self) -> &'static str {
        match self {
            ResourceKind::Number => "vgpu-number",
            ResourceKind::Memory => "vgpu-memory",
            ResourceKind::Cores => "vgpu-cores",
        }
    }

    /// How many IDs one GPU with this much memory contributes.
    pub fn ids_per_gpu(self, gpu_memory_mib: u64, sharing: &SharingSettings) -> u64 {
        match self {
            ResourceKind::Number => u64::from(sharing.split_count),
            ResourceKind::Memory => sharing.memory_units(gpu_memory_mib),
            ResourceKind::Cores => sharing.core_ids_per_gpu(),
        }
    }
}

/// The three extended-resource names, one kubelet endpoint each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceNames {
    /// `resourceCountName`.
    pub number: String,
    /// `resourceMemoryName`.
    pub memory: String,
    /// `resourceCoreName`.
    pub cores: String,
}

impl Default for ResourceNames {
    fn default() -> Self {
        Self {
            number: DEFAULT_NUMBER_RESOURCE.to_owned(),
            memory: DEFAULT_MEMORY_RESOURCE.to_owned(),
            cores: DEFAULT_CORES_RESOURCE.to_owned(),
        }
    }
}

impl ResourceNames {
    /// The configured name of one resource.
    pub fn get(&self, kind: ResourceKind) -> &str {
        match kind {
            ResourceKind::Number => &self.number,
            ResourceKind::Memory => &self.memory,
            ResourceKind::Cores => &self.cores,
        }
    }
}

/// Health checking knobs (docs/volcano-contract.md §8, plus recovery, which no peer has).
#[derive(Debug, Clone)]
pub struct HealthSettings {
    /// `DP_DISABLE_HEALTHCHECKS`, raw.
    pub disable: Option<String>,
    /// `DP_ENABLE_HEALTHCHECKS`, raw.
    pub enable: Option<String>,
    /// How long a GPU must stay free of critical events, and answer NVML, before it is `Healthy` again.
    pub recovery_quiet_period: Duration,
    /// How often every GPU is asked a cheap NVML question to catch one that is lost without an event.
    pub probe_interval: Duration,
}

impl Default for HealthSettings {
    fn default() -> Self {
        Self {
            disable: None,
            enable: None,
            recovery_quiet_period: Duration::from_secs(300),
            probe_interval: Duration::from_secs(5),
        }
    }
}

/// How the legacy `volcano.sh/node-vgpu-handshake` (schedulers up to v1.15.0) is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum HandshakeMode {
    /// Answer only when an old scheduler asks (the key is missing or marked `Deleted_…`): no writes at rest
    /// with a current scheduler.
    #[default]
    Auto,
    /// Also heartbeat every 30 s like the Go plugin up to v1.12 (for schedulers that need it; costs writes).
    On,
    /// Never write the handshake.
    Off,
}

/// Where the agent finds the cluster side of its configuration.
#[derive(Debug, Clone)]
pub struct ClusterSettings {
    /// Namespace of the device config map; `None` searches `kube-system` then `volcano-system`.
    pub device_config_namespace: Option<String>,
    /// Name of the device config map.
    pub device_config_name: String,
    /// The per-node `config.json` (a mounted config map).
    pub node_config_path: PathBuf,
    /// The legacy handshake.
    pub handshake: HandshakeMode,
    /// How long to keep retrying an unreachable apiserver at start before giving up.
    pub apiserver_wait: Duration,
    /// How long each apiserver request and watch may stay silent (`crate::cluster::ApiBounds`).
    pub api_bounds: crate::cluster::ApiBounds,
}

impl Default for ClusterSettings {
    fn default() -> Self {
        Self {
            device_config_namespace: None,
            device_config_name: DEVICE_CONFIG_MAP.to_owned(),
            node_config_path: PathBuf::from(NODE_CONFIG_PATH),
            handshake: HandshakeMode::Auto,
            apiserver_wait: Duration::from_secs(60),
            api_bounds: crate::cluster::ApiBounds::default(),
        }
    }
}

/// One `--device-list-strategy` value: how a container is told which GPUs it got (the Go plugin's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DeviceListStrategy {
    /// `NVIDIA_VISIBLE_DEVICES=<uuid>,…`, read by the NVIDIA container runtime (the default).
    Envvar,
    /// One `/dev/null` mount per GPU under `/var/run/nvidia-container-devices`, read by the NVIDIA runtime
    /// when `accept-nvidia-visible-devices-as-volume-mounts` is on (unprivileged pods cannot forge mounts).
    VolumeMounts,
    /// CDI device names in the `cdi.k8s.io/…` container annotation.
    CdiAnnotations,
    /// CDI device names in the `cdi_devices` field of the Allocate response (kubelet ≥ 1.28 with CDI).
    CdiCri,
}

impl DeviceListStrategy {
    /// Every value, as the flag spells them.
    pub const ALL: [(&'static str, Self); 4] = [
        ("envvar", Self::Envvar),
        ("volume-mounts", Self::VolumeMounts),
        ("cdi-annotations", Self::CdiAnnotations),
        ("cdi-cri", Self::CdiCri),
    ];
}

/// The set of strategies `--device-list-strategy` selected; never empty.
///
/// Like the Go plugin (whose helm chart passes a list), several may be combined, e.g. `envvar,cdi-annotations`
/// for a runtime that may or may not do CDI: the response then carries both forms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceListStrategies(Vec<DeviceListStrategy>);

impl Default for DeviceListStrategies {
    fn default() -> Self {
        Self(vec![DeviceListStrategy::Envvar])
    }
}

impl DeviceListStrategies {
    /// Whether `strategy` is one of the selected.
    pub fn includes(&self, strategy: DeviceListStrategy) -> bool {
        self.0.contains(&strategy)
    }

    /// A CDI spec is needed (either CDI strategy).
    pub fn any_cdi(&self) -> bool {
        self.includes(DeviceListStrategy::CdiAnnotations)
            || self.includes(DeviceListStrategy::CdiCri)
    }

    /// Only CDI: the runtime gets devices, device nodes and the limiter from the CDI spec alone.
    pub fn cdi_only(&self) -> bool {
        !self.includes(DeviceListStrategy::Envvar)
            && !self.includes(DeviceListStrategy::VolumeMounts)
    }

    /// The selected strategies, sorted.
    pub fn iter(&self) -> impl Iterator<Item = DeviceListStrategy> + '_ {
        self.0.iter().copied()
    }
}

/// Parses `--device-list-strategy`: one value or a comma-separated list of `envvar`, `volume-mounts`,
/// `cdi-annotations`, `cdi-cri`.
pub fn parse_device_list_strategies(text: &str) -> Result<DeviceListStrategies, String> {
    let mut chosen = Vec::new();
    for item in text.split(',').map(str::trim) {
        let Some((_, strategy)) = DeviceListStrategy::ALL
            .iter()
            .find(|(name, _)| *name == item)
        else {
            return Err(format!(
                "unknown device list strategy {item:?}: expected envvar, volume-mounts, cdi-annotations or cdi-cri \
                 (or a comma-separated list of them)"
            ));
        };
        chosen.push(*strategy);
    }
    chosen.sort();
    chosen.dedup();
    Ok(DeviceListStrategies(chosen))
}

/// A host directory of driver libraries and binaries handed to every GPU container (nodes without the
/// NVIDIA container runtime, such as GKE's Container-Optimized OS; the GCP plugin's `-host-path` and
/// `-container-path`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriverPaths {
    /// The directory on the host (`--driver-host-path`), e.g. `/home/kubernetes/bin/nvidia`.
    pub host: PathBuf,
    /// Where containers see it (`--driver-container-path`), `/usr/local/nvidia` by default: the directory
    /// CUDA images already list in `LD_LIBRARY_PATH` and `PATH`.
    pub container: PathBuf,
    /// Also set `PATH` (`<container>/bin` first), which replaces the image's own `PATH`.
    pub set_path: bool,
}

impl DriverPaths {
    /// `LD_LIBRARY_PATH` for containers: the driver's `lib64` then `lib`.
    pub fn ld_library_path(&self) -> String {
        format!(
            "{}:{}",
            self.container.join("lib64").display(),
            self.container.join("lib").display()
        )
    }

    /// `PATH` for containers when [`Self::set_path`]: the driver's `bin`, CUDA's, then the usual image `PATH`.
    pub fn path(&self) -> String {
        format!(
            "{}:/usr/local/cuda/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            self.container.join("bin").display()
        )
    }
}

/// Where the driver lists the minor number of each MIG capability (`/dev/nvidia-caps/nvidia-cap<N>`), the
/// default of `--nvidia-caps-minors`.
pub const MIG_MINORS: &str = "/proc/driver/nvidia-caps/mig-minors";

/// How a container's GPUs, device nodes, limiter and driver reach it (docs/volcano-contract.md §4, issue #8).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliverySettings {
    /// `--device-list-strategy`.
    pub strategies: DeviceListStrategies,
    /// `--pass-device-specs`: return the device nodes as `DeviceSpec`s (no NVIDIA runtime on the node).
    pub pass_device_specs: bool,
    /// `--dev-root`: the root under which `/dev/nvidia*` are found on the host (and seen by the agent).
    pub dev_root: PathBuf,
    /// `--nvidia-caps-minors`: the driver's `mig-minors` (`/proc/driver/nvidia-caps/mig-minors`), which gives the
    /// `/dev/nvidia-caps/nvidia-cap<N>` of a MIG device's capabilities (MIG mode with `--pass-device-specs`).
    pub mig_minors: PathBuf,
    /// `--driver-host-path` / `--driver-container-path`.
    pub driver: Option<DriverPaths>,
    /// `--cdi-spec-dir`: where the CDI spec is written (`/var/run/cdi`).
    pub cdi_spec_dir: PathBuf,
    /// `--cdi-annotation-prefix`: `cdi.k8s.io/`.
    pub cdi_annotation_prefix: String,
}

impl Default for DeliverySettings {
    fn default() -> Self {
        Self {
            strategies: DeviceListStrategies::default(),
            pass_device_specs: false,
            dev_root: PathBuf::from("/"),
            mig_minors: PathBuf::from(MIG_MINORS),
            driver: None,
            cdi_spec_dir: PathBuf::from("/var/run/cdi"),
            cdi_annotation_prefix: "cdi.k8s.io/".to_owned(),
        }
    }
}

impl DeliverySettings {
    /// Refuses settings that would produce paths or annotations a runtime rejects.
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        let absolute = |field: &'static str, path: &std::path::Path| {
            if path.is_absolute() {
                Ok(())
            } else {
                Err(InvalidSetting {
                    field,
                    value: path.display().to_string(),
                    expected: "an absolute path",
                })
            }
        };
        absolute("--dev-root", &self.dev_root)?;
        absolute("--nvidia-caps-minors", &self.mig_minors)?;
        absolute("--cdi-spec-dir", &self.cdi_spec_dir)?;
        if let Some(driver) = &self.driver {
            absolute("--driver-host-path", &driver.host)?;
            absolute("--driver-container-path", &driver.container)?;
            if driver.container == std::path::Path::new("/") {
                return Err(InvalidSetting {
                    field: "--driver-container-path",
                    value: "/".to_owned(),
                    expected: "a directory other than / (such as /usr/local/nvidia)",
                });
            }
        }
        let prefix = &self.cdi_annotation_prefix;
        let domain = prefix.strip_suffix('/').unwrap_or("");
        if domain.is_empty()
            || domain.len() > 253
            || !domain.split('.').all(|label| {
                !label.is_empty()
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            })
        {
            return Err(InvalidSetting {
                field: "--cdi-annotation-prefix",
                value: prefix.clone(),
                expected: "a DNS domain followed by /, such as cdi.k8s.io/",
            });
        }
        Ok(())
    }
}

/// Everything `agent::run` needs.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The NVML shared library to load (a bare name is searched like `dlopen` does).
    pub nvml_lib: PathBuf,
    /// The kubelet's Registration socket; its parent directory holds our endpoint sockets too.
    pub kubelet_socket: PathBuf,
    /// Root of sysfs, for the NUMA node of GPUs whose NVML cannot say.
    pub sysfs_root: PathBuf,
    /// The node this agent runs on (`NODE_NAME`). Without it the agent serves device counts only
    /// ("standalone"): no node annotations and no Volcano hand-off in Allocate.
    pub node_name: Option<String>,
    /// Where `libvgpu.so` and `ld.so.preload` live on the host (`HOOK_PATH`); per-container cache
    /// directories go under `<hook_path>/vgpu/containers`.
    pub hook_path: PathBuf,
    /// The one host directory holding every container's cache directory (`<pod-uid>_<container>`), mounted
    /// at `/tmp/vgpu` in the container and read by the metrics side; `None` = `<hook_path>/vgpu/containers`.
    pub cache_root: Option<PathBuf>,
    /// The host lock directory HAMi-core uses (`/tmp/vgpulock`).
    pub lock_dir: PathBuf,
    /// Flags the operator set explicitly; they win over the config maps.
    pub explicit: ExplicitFlags,
    /// Config maps and the handshake.
    pub cluster: ClusterSettings,
    /// `NVIDIA_GDRCOPY`, `NVIDIA_GDS`, `NVIDIA_MOFED` in containers (the Go plugin's flags, all default on).
    pub container_features: ContainerFeatures,
    /// Health checking.
    pub health: HealthSettings,
    /// How long a pod must be gone before its cache directories are removed.
    pub cache_grace: Duration,
    /// Where `/metrics`, `/healthz` and `/readyz` are served; `None` turns the listener off.
    pub metrics_address: Option<std::net::SocketAddr>,
    /// Device list strategy, CDI, device nodes and driver paths.
    pub delivery: DeliverySettings,
    /// `--fail-on-init-error`: exit when NVML cannot be initialised instead of retrying with backoff.
    pub fail_on_init_error: bool,
    /// The memory backstop (`--memory-backstop*`, `--host-proc-root`).
    pub backstop: BackstopSettings,
}

/// What the memory backstop does about a container over its memory cap as NVML sees it (`--memory-backstop`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum BackstopMode {
    /// No loop at all.
    Off,
    /// An Event on the pod, a log line, the metrics.
    #[default]
    Report,
    /// As report, and SIGKILL the container's processes on that GPU once over the cap for the grace period.
    Kill,
}

impl BackstopMode {
    /// The flag value.
    pub fn as_str(self) -> &'static str {
        match self {
            BackstopMode::Off => "off",
            BackstopMode::Report => "report",
            BackstopMode::Kill => "kill",
        }
    }
}

/// The memory backstop's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackstopSettings {
    /// Off, report or kill.
    pub mode: BackstopMode,
    /// How often NVML is asked (`--memory-backstop-period`).
    pub period: Duration,
    /// How long a container must stay over its cap before its processes are killed (`--memory-backstop-grace`).
    pub grace: Duration,
    /// Bytes allowed over the cap per process of the container on the GPU: the CUDA context NVML counts and
    /// the limiter does not (`--memory-backstop-tolerance`).
    pub tolerance_bytes: u64,
    /// The host's `/proc` as the agent sees it (`--host-proc-root`).
    pub proc_root: PathBuf,
}

/// The default `--memory-backstop-tolerance`: 512 MiB per process, above the CUDA context of current GPUs
/// (about 300 MiB on an A100 with CUDA 12 and lazy module loading, up to about 500 MiB without it).
pub const DEFAULT_BACKSTOP_TOLERANCE: u64 = 512 << 20;

impl Default for BackstopSettings {
    fn default() -> Self {
        Self {
            mode: BackstopMode::Report,
            period: Duration::from_secs(1),
            grace: Duration::from_secs(5),
            tolerance_bytes: DEFAULT_BACKSTOP_TOLERANCE,
            proc_root: PathBuf::from("/proc"),
        }
    }
}

/// A byte size: plain bytes, or a number with a binary (`Ki`, `Mi`, `Gi`, `Ti`) or decimal (`k`, `M`, `G`, `T`)
/// suffix, as Kubernetes quantities write them (`512Mi`, `1G`, `536870912`).
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, suffix) = text.split_at(split);
    let unit: u64 = match suffix {
        "" => 1,
        "k" | "K" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        _ => 0,
    };
    digits
        .parse::<u64>()
        .ok()
        .filter(|_| unit > 0)
        .and_then(|n| n.checked_mul(unit))
        .ok_or_else(|| {
            format!(
                "{text:?} is not a byte size: expected whole bytes or a number with Ki, Mi, Gi, Ti (or k, M, G, T), such as 512Mi"
            )
        })
}

/// The NVIDIA container features turned on in every container the agent hands a GPU to (the Go plugin's
/// `--gdrcopy-enabled`, `--gds-enabled`, `--mofed-enabled`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContainerFeatures {
    /// `NVIDIA_GDRCOPY=enabled`.
    pub gdrcopy: bool,
    /// `NVIDIA_GDS=enabled`.
    pub gds: bool,
    /// `NVIDIA_MOFED=enabled`.
    pub mofed: bool,
}

impl AgentConfig {
    /// The directory the kubelet watches for plugin sockets: the parent of its own socket.
    pub fn socket_dir(&self) -> PathBuf {
        self.kubelet_socket
            .parent()
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("."))
    }

    /// The one host directory that holds every container's cache directory (read by the metrics side).
    pub fn cache_root(&self) -> PathBuf {
        self.cache_root
            .clone()
            .unwrap_or_else(|| self.hook_path.join("vgpu/containers"))
    }
}

/// The longest duration any flag takes.
const MAX_DURATION: Duration = Duration::from_secs(365 * 86_400);

/// A flag's duration that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    /// Not a duration at all.
    #[error(
        "{text:?} is not a duration: expected a number with a unit (ms, s, m, h), such as 300s or 1m30s"
    )]
    Malformed {
        /// What was given.
        text: String,
    },
    /// Negative, or longer than a year.
    #[error("{text:?} is out of range: expected 0 to 365 days")]
    OutOfRange {
        /// What was given.
        text: String,
    },
}

/// Parses a duration the way Go's flags are written (`300s`, `5m`, `1m30s`, `1.5h`, `250ms`; jiff's friendly
/// format, which also takes `5 minutes`) or a bare number of seconds, from 0 to 365 days.
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    static PARSER: jiff::fmt::friendly::SpanParser = jiff::fmt::friendly::SpanParser::new();
    let text = text.trim();
    let malformed = || DurationError::Malformed {
        text: text.to_owned(),
    };
    let out_of_range = || DurationError::OutOfRange {
        text: text.to_owned(),
    };
    let duration = if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        let seconds: f64 = text.parse().map_err(|_| malformed())?;
        Duration::try_from_secs_f64(seconds).map_err(|_| out_of_range())?
    } else {
        let signed = PARSER.parse_duration(text).map_err(|_| malformed())?;
        Duration::try_from(signed).map_err(|_| out_of_range())?
    };
    if duration > MAX_DURATION {
        return Err(out_of_range());
    }
    Ok(duration)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_sizes_take_plain_bytes_and_quantity_suffixes() {
        assert_eq!(parse_bytes("536870912"), Ok(512 << 20));
        assert_eq!(parse_bytes("512Mi"), Ok(512 << 20));
        assert_eq!(parse_bytes(" 1Gi "), Ok(1 << 30));
        assert_eq!(parse_bytes("2G"), Ok(2_000_000_000));
        assert_eq!(parse_bytes("0"), Ok(0));
        for bad in ["", "Mi", "512MB", "-1", "1.5Gi", "99999999999Ti"] {
            let error = parse_bytes(bad).unwrap_err();
            assert!(error.contains("such as 512Mi"), "{bad:?}: {error}");
        }
    }

    #[test]
    fn defaults_are_the_no_configmap_values() {
        let s = SharingSettings::default();
        assert_eq!(
            (s.split_count, s.memory_factor, s.core_scaling),
            (10, 1, 1.0)
        );
        assert_eq!(s.validate(), Ok(()));
        assert_eq!(s.core_ids_per_gpu(), 100);
    }

    #[test]
    fn zero_split_and_factor_are_refused_by_name() {
        let err = SharingSettings {
            split_count: 0,
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        assert!(err.to_string().contains("--device-split-count"), "{err}");
        let err = SharingSettings {
            memory_factor: 0,
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        assert!(err.to_string().contains("gpuMemoryFactor"), "{err}");
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY, 5000.0, 10.5] {
            let err = SharingSettings {
                core_scaling: bad,
                ..Default::default()
            }
            .validate()
            .unwrap_err();
            assert!(err.to_string().contains("--device-cores-scaling"), "{err}");
        }
    }

    #[test]
    fn split_counts_beyond_the_range_are_refused_and_its_ends_accepted() {
        let split = |split_count| {
            SharingSettings {
                split_count,
                ..Default::default()
            }
            .validate()
        };
        assert_eq!(split(1), Ok(()));
        assert_eq!(split(1000), Ok(()));
        let err = split(100_000).unwrap_err();
        assert!(err.to_string().contains("from 1 to 1000"), "{err}");
        let scaling = |core_scaling| {
            SharingSettings {
                core_scaling,
                ..Default::default()
            }
            .validate()
        };
        assert_eq!(scaling(0.01), Ok(()));
        assert_eq!(scaling(10.0), Ok(()));
    }

    #[test]
    fn a_factor_that_leaves_a_gpu_without_memory_is_refused_by_name() {
        let factor = |memory_factor| SharingSettings {
            memory_factor,
            ..Default::default()
        };
        assert_eq!(factor(16_384).check_memory_factor([16_384, 81_559]), Ok(()));
        let err = factor(16_385)
            .check_memory_factor([16_384, 81_559])
            .unwrap_err();
        assert_eq!(err.field, "--gpu-memory-factor (gpuMemoryFactor)");
        assert_eq!(err.value, "16385 (the smallest GPU advertises 16384 MiB)");
        assert!(err.expected.contains("smallest GPU"), "{err}");
    }

    #[test]
    fn core_ids_follow_go_truncation_without_float_noise() {
        let ids = |core_scaling| {
            SharingSettings {
                core_scaling,
                ..Default::default()
            }
            .core_ids_per_gpu()
        };
        assert_eq!(ids(1.5), 150);
        assert_eq!(ids(1.1), 110);
        assert_eq!(ids(0.29), 29);
        assert_eq!(ids(0.555), 55);
    }

    #[test]
    fn device_list_strategies_parse_as_a_set_and_refuse_unknown_values() {
        let s = parse_device_list_strategies("cdi-cri, envvar,cdi-cri").unwrap();
        assert_eq!(
            s.iter().collect::<Vec<_>>(),
            vec![DeviceListStrategy::Envvar, DeviceListStrategy::CdiCri]
        );
        assert!(s.any_cdi() && !s.cdi_only());
        let cdi = parse_device_list_strategies("cdi-annotations").unwrap();
        assert!(cdi.any_cdi() && cdi.cdi_only());
        let plain = DeviceListStrategies::default();
        assert!(!plain.any_cdi() && !plain.cdi_only());
        for bad in ["", "env-var", "envvar,", "CDI-CRI"] {
            let err = parse_device_list_strategies(bad).unwrap_err();
            assert!(
                err.contains("expected envvar, volume-mounts, cdi-annotations or cdi-cri"),
                "{err}"
            );
        }
    }

    #[test]
    fn delivery_settings_refuse_relative_paths_and_bad_prefixes() {
        assert_eq!(DeliverySettings::default().validate(), Ok(()));
        let err = DeliverySettings {
            dev_root: "run/nvidia/driver".into(),
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        assert_eq!(err.field, "--dev-root");
        let err = DeliverySettings {
            driver: Some(DriverPaths {
                host: "/home/kubernetes/bin/nvidia".into(),
                container: "/".into(),
                set_path: false,
            }),
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        assert_eq!(err.field, "--driver-container-path");
        for bad in ["cdi.k8s.io", "CDI.k8s.io/", "/", "a..b/"] {
            let err = DeliverySettings {
                cdi_annotation_prefix: bad.into(),
                ..Default::default()
            }
            .validate()
            .unwrap_err();
            assert_eq!(err.field, "--cdi-annotation-prefix", "{bad}");
        }
    }

    #[test]
    fn driver_paths_put_lib64_first() {
        let d = DriverPaths {
            host: "/home/kubernetes/bin/nvidia".into(),
            container: "/usr/local/nvidia".into(),
            set_path: true,
        };
        assert_eq!(
            d.ld_library_path(),
            "/usr/local/nvidia/lib64:/usr/local/nvidia/lib"
        );
        assert!(d.path().starts_with("/usr/local/nvidia/bin:"));
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("300s"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        // Go's compound and fractional forms, which flags copied from the Go plugin's manifests use.
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1.5h"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration(" 5 minutes "), Ok(Duration::from_secs(300)));
        for bad in ["5 parsecs", "", "s", "1..5s", "1e3s"] {
            let error = parse_duration(bad).unwrap_err().to_string();
            assert!(
                error.contains("expected a number with a unit (ms, s, m, h)"),
                "{bad:?}: {error}"
            );
        }
        for out in ["-1s", "9000h", "99999999999999999999"] {
            let error = parse_duration(out).unwrap_err().to_string();
            assert!(
                error.contains("out of range: expected 0 to 365 days"),
                "{out:?}: {error}"
            );
        }
    }
}
