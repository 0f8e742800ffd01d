//! Command-line entry point: flags and environment in, [`crate::agent::run`] out.
//!
//! Lives in the library so the gpu-sim runner can start the very same agent as a child process of its own.

use std::ffi::OsString;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

use crate::agent;
use crate::config::device::ExplicitFlags;
use crate::config::{
    AgentConfig, BackstopMode, BackstopSettings, ClusterSettings, ContainerFeatures,
    DeliverySettings, DeviceListStrategies, DriverPaths, HandshakeMode, HealthSettings,
    parse_bytes, parse_device_list_strategies, parse_duration,
};
use crate::error::error_chain;

/// Volcano vGPU device plugin: serves volcano.sh/vgpu-number, -memory and -cores to the kubelet.
#[derive(Debug, Parser)]
#[command(name = "vgpu-device-plugin", version)]
pub struct Flags {
    /// The NVML library to load: a file name searched like dlopen does, or a path.
    #[arg(long, env = "NVML_LIB", default_value = "libnvidia-ml.so.1")]
    nvml_lib: PathBuf,

    /// The kubelet's registration socket; our sockets go in the same directory.
    #[arg(long, env = "KUBELET_SOCKET", default_value = kubelet_api::v1beta1::KUBELET_SOCKET)]
    kubelet_socket: PathBuf,

    /// The name of this node (from the downward API).
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,

    /// Where libvgpu.so and ld.so.preload are installed on the host.
    #[arg(long, env = "HOOK_PATH", default_value = "/usr/local/vgpu")]
    hook_path: PathBuf,

    /// How many containers may share one GPU (deviceSplitCount), 1 to 1000 [default: 10].
    // Negative numbers reach the parser, so `-1` is refused with the range instead of "unexpected argument".
    #[arg(long, allow_negative_numbers = true, value_parser = parse_split_count)]
    device_split_count: Option<u32>,

    /// MiB per unit of volcano.sh/vgpu-memory (gpuMemoryFactor), 1 to 4294967295 [default: 1].
    #[arg(long, allow_negative_numbers = true, value_parser = parse_memory_factor)]
    gpu_memory_factor: Option<u32>,

    /// Core IDs per GPU are 100 × this (deviceCoreScaling), 0.01 to 10 [default: 1].
    #[arg(long, allow_negative_numbers = true, value_parser = parse_core_scaling)]
    device_cores_scaling: Option<f64>,

    /// How long a GPU must be free of critical XIDs, and answer NVML, before it is Healthy again.
    #[arg(long, default_value = "5m", allow_hyphen_values = true, value_parser = parse_duration)]
    health_recovery_period: std::time::Duration,

    /// How often each GPU is probed through NVML for faults that raise no event.
    #[arg(long, default_value = "5s", allow_hyphen_values = true, value_parser = parse_duration)]
    health_probe_interval: std::time::Duration,

    /// XIDs to ignore besides the default application XIDs, or `all`.
    #[arg(long, env = "DP_DISABLE_HEALTHCHECKS", hide = true)]
    disable_healthchecks: Option<String>,

    /// XIDs that always count, even when disabled.
    #[arg(long, env = "DP_ENABLE_HEALTHCHECKS", hide = true)]
    enable_healthchecks: Option<String>,

    /// Namespace of the volcano-vgpu-device-config config map [default: kube-system, then volcano-system].
    #[arg(long, env = "DEVICE_CONFIG_NAMESPACE")]
    device_config_namespace: Option<String>,

    /// Name of the device config map.
    #[arg(long, env = "DEVICE_CONFIG_NAME", default_value = crate::config::device::DEVICE_CONFIG_MAP)]
    device_config_name: String,

    /// The per-node config.json (volcano-vgpu-node-config, mounted).
    #[arg(long, env = "NODE_CONFIG_PATH", default_value = crate::config::device::NODE_CONFIG_PATH)]
    node_config: PathBuf,

    /// The legacy node handshake for Volcano schedulers up to v1.15.0.
    #[arg(long, value_enum, default_value = "auto")]
    legacy_handshake: HandshakeMode,

    /// How long to retry an unreachable apiserver at start.
    #[arg(long, default_value = "60s", allow_hyphen_values = true, value_parser = parse_duration)]
    apiserver_wait: std::time::Duration,

    /// The bound on one apiserver request; watches are bounded by six of them (tests shorten it).
    #[arg(long, default_value = "10s", hide = true, value_parser = parse_apiserver_timeout)]
    apiserver_timeout: std::time::Duration,

    /// The host directory for per-container caches (mounted at /tmp/vgpu) [default: <hook-path>/vgpu/containers].
    /// HAMi's own monitor scans /tmp/vgpu/containers; set that to share the directory with it.
    #[arg(long, env = "VGPU_CACHE_ROOT")]
    cache_root: Option<PathBuf>,

    /// How long a pod must be gone from the node before its cache directories are removed.
    #[arg(long, default_value = "5m", allow_hyphen_values = true, value_parser = parse_duration)]
    cache_grace_period: std::time::Duration,

    /// HAMi-core's host lock directory, mounted at /tmp/vgpulock.
    #[arg(long, env = "VGPU_LOCK_DIR", default_value = "/tmp/vgpulock")]
    lock_dir: PathBuf,

    /// Set NVIDIA_GDRCOPY=enabled in containers.
    #[arg(long, env = "GDRCOPY_ENABLED", default_value_t = true, action = clap::ArgAction::Set)]
    gdrcopy_enabled: bool,

    /// Set NVIDIA_GDS=enabled in containers.
    #[arg(long, env = "GDS_ENABLED", default_value_t = true, action = clap::ArgAction::Set)]
    gds_enabled: bool,

    /// Set NVIDIA_MOFED=enabled in containers.
    #[arg(long, env = "MOFED_ENABLED", default_value_t = true, action = clap::ArgAction::Set)]
    mofed_enabled: bool,

    /// Where /metrics, /healthz and /readyz are served (`:9394` = every interface; `off` = nowhere).
    #[arg(long, env = "METRICS_BIND_ADDRESS", default_value = ":9394", value_parser = parse_metrics_address)]
    metrics_bind_address: MetricsAddress,

    /// How containers are told their GPUs: envvar, volume-mounts, cdi-annotations, cdi-cri, or a
    /// comma-separated list of them.
    #[arg(long, env = "DEVICE_LIST_STRATEGY", default_value = "envvar", value_parser = parse_device_list_strategies)]
    device_list_strategy: DeviceListStrategies,

    /// Return the GPU device nodes (/dev/nvidia*) in Allocate, for nodes without the NVIDIA runtime.
    #[arg(long, env = "PASS_DEVICE_SPECS", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pass_device_specs: bool,

    /// The root under which /dev/nvidia* are found on the host (and in the agent's container).
    #[arg(long, env = "NVIDIA_DEV_ROOT", default_value = "/")]
    dev_root: PathBuf,

    /// The driver's list of MIG capability minors (/dev/nvidia-caps/nvidia-cap<N>), read in MIG mode to hand
    /// a MIG device's device nodes with --pass-device-specs.
    #[arg(long, env = "NVIDIA_CAPS_MINORS", default_value = crate::config::MIG_MINORS)]
    nvidia_caps_minors: PathBuf,

    /// A host directory of driver libraries (lib64/, lib/) and binaries (bin/) to mount read-only into every
    /// GPU container (the GCP plugin's -host-path), e.g. /home/kubernetes/bin/nvidia.
    #[arg(long, env = "DRIVER_HOST_PATH")]
    driver_host_path: Option<PathBuf>,

    /// Where containers see --driver-host-path (the GCP plugin's -container-path).
    #[arg(
        long,
        env = "DRIVER_CONTAINER_PATH",
        default_value = "/usr/local/nvidia"
    )]
    driver_container_path: PathBuf,

    /// With --driver-host-path, also set PATH in containers (the driver bin directory first); this
    /// replaces the image's PATH.
    #[arg(long, env = "DRIVER_SET_PATH", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    driver_set_path: bool,

    /// Where the CDI spec for this node's GPUs is written (cdi-annotations, cdi-cri).
    #[arg(long, env = "CDI_SPEC_DIR", default_value = "/var/run/cdi")]
    cdi_spec_dir: PathBuf,

    /// The prefix of the CDI annotation key (cdi-annotations).
    #[arg(long, env = "CDI_ANNOTATION_PREFIX", default_value = "cdi.k8s.io/")]
    cdi_annotation_prefix: String,

    /// Exit when NVML cannot be initialised, instead of retrying with backoff (1 s to 60 s) while serving
    /// /metrics and a not-ready /readyz.
    #[arg(long, env = "FAIL_ON_INIT_ERROR", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    fail_on_init_error: bool,

    /// Root of sysfs (for NUMA nodes NVML cannot report).
    #[arg(long, default_value = "/sys", hide = true)]
    sysfs_root: PathBuf,

    /// The memory backstop: compare each container's GPU memory as NVML sees it with its cap, and report
    /// (an Event, a log line, metrics) or also kill the container's processes on that GPU.
    #[arg(long, env = "MEMORY_BACKSTOP", value_enum, default_value = "report")]
    memory_backstop: BackstopMode,

    /// How often the memory backstop asks NVML for every GPU's processes.
    #[arg(long, env = "MEMORY_BACKSTOP_PERIOD", default_value = "1s", allow_hyphen_values = true, value_parser = parse_backstop_period)]
    memory_backstop_period: std::time::Duration,

    /// With --memory-backstop=kill: how long a container must stay over its cap before it is killed.
    #[arg(long, env = "MEMORY_BACKSTOP_GRACE", default_value = "5s", allow_hyphen_values = true, value_parser = parse_duration)]
    memory_backstop_grace: std::time::Duration,

    /// Bytes allowed over the cap per process on a GPU, for the CUDA context NVML counts and the limiter does
    /// not (512Mi-style or plain bytes).
    #[arg(long, env = "MEMORY_BACKSTOP_TOLERANCE", default_value = "512Mi", allow_hyphen_values = true, value_parser = parse_bytes)]
    memory_backstop_tolerance: u64,

    /// The host's /proc as the agent sees it (hostPID: /proc), for the cgroup of each GPU process.
    #[arg(long, env = "HOST_PROC_ROOT", default_value = "/proc")]
    host_proc_root: PathBuf,
}

/// `--memory-backstop-period`: 10ms to 1h.
fn parse_backstop_period(text: &str) -> Result<std::time::Duration, String> {
    let d = parse_duration(text).map_err(|e| e.to_string())?;
    if d < std::time::Duration::from_millis(10) || d > std::time::Duration::from_secs(3600) {
        return Err(format!(
            "expected a duration from 10ms to 1h (how often NVML is asked), not {text:?}"
        ));
    }
    Ok(d)
}

/// `--metrics-bind-address`: an address, or off.
#[derive(Debug, Clone, Copy)]
pub struct MetricsAddress(Option<std::net::SocketAddr>);

fn parse_metrics_address(text: &str) -> Result<MetricsAddress, String> {
    match text.trim() {
        "" | "off" | "0" => Ok(MetricsAddress(None)),
        other => vgpu_metrics::parse_bind_address(other).map(|a| MetricsAddress(Some(a))),
    }
}

/// A whole number in `range`; the message gives the range and what the number counts, because clap itself
/// only says "invalid digit found in string".
fn whole_number(
    text: &str,
    range: std::ops::RangeInclusive<u32>,
    meaning: &str,
) -> Result<u32, String> {
    text.trim()
        .parse::<u32>()
        .ok()
        .filter(|n| range.contains(n))
        .ok_or_else(|| {
            format!(
                "expected a whole number from {} to {} ({meaning})",
                range.start(),
                range.end()
            )
        })
}

/// `--device-split-count`: the range the config map's `deviceSplitCount` has, checked before anything starts.
fn parse_split_count(text: &str) -> Result<u32, String> {
    whole_number(
        text,
        crate::config::SPLIT_COUNT_RANGE,
        "containers that may share one GPU",
    )
}

/// `--apiserver-timeout`: 0 would fail every request at once, and past a minute a hung apiserver would hold
/// Allocate for longer than the kubelet waits.
fn parse_apiserver_timeout(text: &str) -> Result<std::time::Duration, String> {
    let d = parse_duration(text).map_err(|e| e.to_string())?;
    if d < std::time::Duration::from_millis(100) || d > std::time::Duration::from_secs(60) {
        return Err(format!(
            "expected a duration from 100ms to 60s (the bound on one apiserver request), not {text:?}"
        ));
    }
    Ok(d)
}

/// `--gpu-memory-factor`: 0 would divide every GPU's memory by zero; the upper end depends on the GPUs and is
/// checked once they are known.
fn parse_memory_factor(text: &str) -> Result<u32, String> {
    whole_number(text, 1..=u32::MAX, "MiB per unit of volcano.sh/vgpu-memory")
}

/// The range [`crate::config::SharingSettings::validate`] accepts for `deviceCoreScaling`.
const CORE_SCALING: std::ops::RangeInclusive<f64> = crate::config::CORE_SCALING_RANGE;

/// `--device-cores-scaling`: the cores resource advertises `floor(100 × scaling)` IDs per GPU.
fn parse_core_scaling(text: &str) -> Result<f64, String> {
    text.trim()
        .parse::<f64>()
        .ok()
        .filter(|v| CORE_SCALING.contains(v))
        .ok_or_else(|| {
            format!(
                "expected a number from {} to {} (vgpu-cores IDs per GPU are 100 × this)",
                CORE_SCALING.start(),
                CORE_SCALING.end()
            )
        })
}

impl Flags {
    /// The agent configuration these flags describe.
    pub fn into_config(self) -> AgentConfig {
        AgentConfig {
            nvml_lib: self.nvml_lib,
            kubelet_socket: self.kubelet_socket,
            sysfs_root: self.sysfs_root,
            node_name: self.node_name.filter(|n| !n.is_empty()),
            hook_path: self.hook_path,
            lock_dir: self.lock_dir,
            cache_root: self.cache_root,
            cache_grace: self.cache_grace_period,
            explicit: ExplicitFlags {
                split_count: self.device_split_count,
                memory_factor: self.gpu_memory_factor,
                core_scaling: self.device_cores_scaling,
            },
            cluster: ClusterSettings {
                device_config_namespace: self.device_config_namespace,
                device_config_name: self.device_config_name,
                node_config_path: self.node_config,
                handshake: self.legacy_handshake,
                apiserver_wait: self.apiserver_wait,
                api_bounds: crate::cluster::ApiBounds::new(self.apiserver_timeout),
            },
            container_features: ContainerFeatures {
                gdrcopy: self.gdrcopy_enabled,
                gds: self.gds_enabled,
                mofed: self.mofed_enabled,
            },
            metrics_address: self.metrics_bind_address.0,
            delivery: DeliverySettings {
                strategies: self.device_list_strategy,
                pass_device_specs: self.pass_device_specs,
                dev_root: self.dev_root,
                mig_minors: self.nvidia_caps_minors,
                driver: self.driver_host_path.map(|host| DriverPaths {
                    host,
                    container: self.driver_container_path,
                    set_path: self.driver_set_path,
                }),
                cdi_spec_dir: self.cdi_spec_dir,
                cdi_annotation_prefix: self.cdi_annotation_prefix,
            },
            fail_on_init_error: self.fail_on_init_error,
            backstop: BackstopSettings {
                mode: self.memory_backstop,
                period: self.memory_backstop_period,
                grace: self.memory_backstop_grace,
                tolerance_bytes: self.memory_backstop_tolerance,
                proc_root: self.host_proc_root,
            },
            health: HealthSettings {
                disable: self.disable_healthchecks,
                enable: self.enable_healthchecks,
                recovery_quiet_period: self.health_recovery_period,
                probe_interval: self.health_probe_interval,
            },
        }
    }
}
/// Runs the agent with the process's own arguments.
pub fn main() -> ExitCode {
    main_from(std::env::args_os())
}

/// Runs the agent with `args` (the first one is the program name), until SIGTERM or SIGINT.
pub fn main_from(args: impl IntoIterator<Item = impl Into<OsString> + Clone>) -> ExitCode {
    let flags = match Flags::try_parse_from(args) {
        Ok(flags) => flags,
        Err(error) => {
            // clap prints usage errors, --help and --version itself, with the right exit code.
            let _ = error.print();
            return if error.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let config = flags.into_config();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(agent::run(config, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{}", error_chain(&error));
            ExitCode::FAILURE
        }
    }
}

/// SIGTERM (the kubelet stopping the pod) or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler installs");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler installs");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handoff::start_check::check_handoff_paths;

    /// The message clap prints for `args`, which must be refused.
    fn refusal(args: &[&str]) -> String {
        let argv = std::iter::once("vgpu-device-plugin").chain(args.iter().copied());
        match Flags::try_parse_from(argv) {
            Ok(flags) => panic!("{args:?} accepted: {flags:?}"),
            Err(error) => error.to_string(),
        }
    }

    #[test]
    fn bad_sharing_flags_are_refused_with_the_flag_the_value_and_the_range() {
        for (args, flag, value, range) in [
            (
                &["--device-split-count", "abc"][..],
                "--device-split-count",
                "abc",
                "from 1 to 1000",
            ),
            (
                &["--device-split-count", "0"],
                "--device-split-count",
                "0",
                "from 1 to 1000",
            ),
            (
                &["--device-split-count", "100000"],
                "--device-split-count",
                "100000",
                "from 1 to 1000",
            ),
            (
                &["--gpu-memory-factor", "-1"],
                "--gpu-memory-factor",
                "-1",
                "from 1 to 4294967295",
            ),
            (
                &["--gpu-memory-factor=-1"],
                "--gpu-memory-factor",
                "-1",
                "from 1 to 4294967295",
            ),
            (
                &["--gpu-memory-factor", "4294967296"],
                "--gpu-memory-factor",
                "4294967296",
                "from 1 to 4294967295",
            ),
            (
                &["--device-cores-scaling", "1000"],
                "--device-cores-scaling",
                "1000",
                "from 0.01 to 10",
            ),
            (
                &["--device-cores-scaling", "-2"],
                "--device-cores-scaling",
                "-2",
                "from 0.01 to 10",
            ),
            (
                &["--device-cores-scaling", "NaN"],
                "--device-cores-scaling",
                "NaN",
                "from 0.01 to 10",
            ),
            (
                &["--apiserver-wait", "-5s"],
                "--apiserver-wait",
                "-5s",
                "out of range: expected 0 to 365 days",
            ),
            (
                &["--health-probe-interval", "soon"],
                "--health-probe-interval",
                "soon",
                "expected a number with a unit (ms, s, m, h)",
            ),
            (
                &["--apiserver-timeout", "0s"],
                "--apiserver-timeout",
                "0s",
                "from 100ms to 60s",
            ),
            (
                &["--memory-backstop", "maybe"],
                "--memory-backstop",
                "maybe",
                "off, report, kill",
            ),
            (
                &["--memory-backstop-period", "0s"],
                "--memory-backstop-period",
                "0s",
                "from 10ms to 1h",
            ),
            (
                &["--memory-backstop-grace", "soon"],
                "--memory-backstop-grace",
                "soon",
                "expected a number with a unit",
            ),
            (
                &["--memory-backstop-tolerance", "512MB"],
                "--memory-backstop-tolerance",
                "512MB",
                "expected whole bytes or a number with Ki, Mi, Gi, Ti",
            ),
            (
                &["--memory-backstop-tolerance", "-1"],
                "--memory-backstop-tolerance",
                "-1",
                "such as 512Mi",
            ),
        ] {
            let message = refusal(args);
            for needle in [flag, &format!("'{value}'"), range] {
                assert!(
                    message.contains(needle),
                    "{args:?}: {needle:?} missing from {message}"
                );
            }
            assert!(
                !message.contains("unexpected argument"),
                "{args:?}: {message}"
            );
        }
    }

    #[test]
    fn the_edges_of_each_range_are_accepted() {
        let flags = Flags::try_parse_from([
            "vgpu-device-plugin",
            "--device-split-count",
            "1000",
            "--gpu-memory-factor",
            "4294967295",
            "--device-cores-scaling",
            "0.01",
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(flags.device_split_count, Some(1000));
        assert_eq!(flags.gpu_memory_factor, Some(u32::MAX));
        assert_eq!(flags.device_cores_scaling, Some(0.01));
    }

    fn config_with(hook: &std::path::Path, cache: Option<PathBuf>) -> AgentConfig {
        let argv = ["vgpu-device-plugin", "--hook-path"];
        let mut flags = Flags::try_parse_from(argv.iter().copied().chain([hook.to_str().unwrap()]))
            .unwrap_or_else(|e| panic!("{e}"));
        flags.cache_root = cache;
        flags.into_config()
    }

    #[test]
    fn a_hook_path_that_cannot_be_created_names_the_flag_the_path_and_the_os_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a-file");
        std::fs::write(&file, "").unwrap();
        let hook = file.join("vgpu");
        let error = check_handoff_paths(&config_with(&hook, None))
            .expect_err("a path under a regular file cannot be created")
            .to_string();
        for needle in ["--hook-path", hook.to_str().unwrap(), "Not a directory"] {
            assert!(error.contains(needle), "{needle:?} missing from {error}");
        }
    }

    #[test]
    fn a_cache_root_that_cannot_be_created_names_its_flag() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a-file");
        std::fs::write(&file, "").unwrap();
        let cache = file.join("containers");
        let error =
            check_handoff_paths(&config_with(&dir.path().join("hook"), Some(cache.clone())))
                .expect_err("a path under a regular file cannot be created")
                .to_string();
        for needle in ["--cache-root", cache.to_str().unwrap(), "Not a directory"] {
            assert!(error.contains(needle), "{needle:?} missing from {error}");
        }
    }

    #[test]
    fn usable_paths_are_created_and_left_without_the_probe() {
        let dir = tempfile::tempdir().unwrap();
        let hook = dir.path().join("usr/local/vgpu");
        let config = config_with(&hook, None);
        check_handoff_paths(&config).unwrap_or_else(|e| panic!("{e}"));
        let cache = hook.join("vgpu/containers");
        assert!(cache.is_dir());
        assert_eq!(
            std::fs::read_dir(&cache).unwrap().count(),
            0,
            "probe removed"
        );
    }
}
