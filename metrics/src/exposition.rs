//! Building the exposition: agent counters registered once, scrape-time families built per scrape.

use std::fmt::Write as _;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

/// How an Allocate call ended, for `vgpu_agent_allocations_total`.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types, missing_docs)]
pub enum AllocateResult {
    /// A container got its devices and limiter environment.
    handed_off,
    /// An empty response (memory/cores endpoint for a container the number endpoint serves).
    empty,
    /// No pending pod matched the request.
    no_pending_pod,
    /// A pod was chosen and the hand-off failed (the pod was marked failed).
    failed,
    /// The apiserver could not be reached or did not answer.
    unavailable,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AllocateLabels {
    endpoint: String,
    result: AllocateResult,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabels {
    endpoint: String,
}

/// Counters the agent updates as it works, registered once.
#[derive(Debug)]
pub struct AgentMetrics {
    registry: Registry,
    allocations: Family<AllocateLabels, Counter>,
    allocate_seconds: Family<EndpointLabels, Histogram>,
    region_read_errors: Counter,
    node_writes: Counter,
}

impl AgentMetrics {
    /// Registers the agent families; `version` goes into `vgpu_agent_build_info`.
    pub fn new(version: &str) -> Self {
        let mut registry = Registry::default();
        let allocations = Family::<AllocateLabels, Counter>::default();
        registry.register(
            "vgpu_agent_allocations",
            "Allocate calls from the kubelet, by endpoint and result",
            allocations.clone(),
        );
        let allocate_seconds = Family::<EndpointLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.0, 14))
        });
        registry.register(
            "vgpu_agent_allocate_duration_seconds",
            "Time to answer an Allocate call, apiserver round trips included",
            allocate_seconds.clone(),
        );
        let region_read_errors = Counter::default();
        registry.register(
            "vgpu_agent_region_read_errors",
            "Container shared-region files that could not be read (corrupt, truncated, foreign)",
            region_read_errors.clone(),
        );
        let node_writes = Counter::default();
        registry.register(
            "vgpu_agent_node_writes",
            "Writes of this node's annotations (register, handshake, lock release)",
            node_writes.clone(),
        );
        registry.register(
            "vgpu_agent_build",
            "Build information of the node agent",
            Info::new(vec![("version".to_owned(), version.to_owned())]),
        );
        Self {
            registry,
            allocations,
            allocate_seconds,
            region_read_errors,
            node_writes,
        }
    }

    /// Records one Allocate call.
    pub fn allocate(&self, endpoint: &str, result: AllocateResult, seconds: f64) {
        self.allocations
            .get_or_create(&AllocateLabels {
                endpoint: endpoint.to_owned(),
                result,
            })
            .inc();
        self.allocate_seconds
            .get_or_create(&EndpointLabels {
                endpoint: endpoint.to_owned(),
            })
            .observe(seconds);
    }

    /// Records a region file that could not be read.
    pub fn region_read_error(&self) {
        self.region_read_errors.inc();
    }

    /// Records a node write.
    pub fn node_write(&self) {
        self.node_writes.inc();
    }

    /// The whole exposition (OpenMetrics text) for one scrape.
    pub fn encode(&self, snapshot: &Snapshot) -> Result<String, std::fmt::Error> {
        let mut out = String::with_capacity(16 * 1024);
        encode_registry(&mut out, &self.registry)?;
        encode_registry(&mut out, &scrape_registry(snapshot))?;
        encode_eof(&mut out)?;
        Ok(out)
    }
}

/// One GPU at scrape time.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuSample {
    /// Position on the node (minor order), the scheduler's device index.
    pub index: u32,
    /// `GPU-…`.
    pub uuid: String,
    /// NVML's used memory, when NVML answered.
    pub memory_used_bytes: Option<u64>,
    /// Physical memory.
    pub memory_total_bytes: u64,
    /// NVML utilisation.gpu, percent, when NVML answered.
    pub utilization_percent: Option<u32>,
    /// The health the endpoints advertise.
    pub healthy: bool,
    /// Containers holding a vGPU of this GPU (from the pods' assignments).
    pub vgpus_allocated: u64,
}

/// One container's use of one GPU at scrape time, from its shared region.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ContainerSample {
    /// Pod namespace.
    pub namespace: String,
    /// Pod name.
    pub pod: String,
    /// Container name.
    pub container: String,
    /// The GPU.
    pub gpu_uuid: String,
    /// The GPU's index on the node.
    pub gpu_index: u32,
    /// Memory the container's processes hold on it.
    pub memory_used_bytes: u64,
    /// Of which: contexts, modules, data, and the offset HAMi-core reports.
    pub memory_context_bytes: u64,
    /// Modules.
    pub memory_module_bytes: u64,
    /// Data.
    pub memory_data_bytes: u64,
    /// HAMi-core's `offset`.
    pub memory_offset_bytes: u64,
    /// The container's cap.
    pub memory_limit_bytes: u64,
    /// SM utilisation, percent, summed over its processes.
    pub sm_utilization_percent: u64,
    /// The SM cap, percent (0 = none).
    pub sm_limit_percent: u64,
    /// Allocations the limiter refused at the cap.
    pub allocations_refused: u64,
    /// Unix seconds of the last kernel launch, when known.
    pub last_kernel_unix: Option<i64>,
}

/// Everything read at scrape time.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Snapshot {
    /// The node's GPUs.
    pub gpus: Vec<GpuSample>,
    /// Per container and GPU.
    pub containers: Vec<ContainerSample>,
    /// Now, for ages.
    pub now_unix: i64,
}

/// Where scrape-time values come from; called on a blocking thread.
pub trait SnapshotSource: Send + Sync + 'static {
    /// Reads the current state.
    fn snapshot(&self) -> Snapshot;
}

type Labels = Vec<(String, String)>;
type FloatGauge = Gauge<f64, AtomicU64>;

fn gauge_family(registry: &mut Registry, name: &str, help: &str) -> Family<Labels, FloatGauge> {
    let family = Family::<Labels, FloatGauge>::default();
    registry.register(name, help, family.clone());
    family
}

fn set(family: &Family<Labels, FloatGauge>, labels: Labels, value: f64) {
    family.get_or_create(&labels).set(value);
}

/// The scrape-time families, legacy and clean.
fn scrape_registry(s: &Snapshot) -> Registry {
    let mut r = Registry::default();
    let zone = || ("zone".to_owned(), "vGPU".to_owned());

    // Legacy per-GPU series (contract §7.1).
    let host_mem = gauge_family(&mut r, "HostGPUMemoryUsage", "GPU device memory usage");
    let host_util = gauge_family(&mut r, "HostCoreUtilization", "GPU core utilization");
    // Clean per-GPU series.
    let gpu_used = gauge_family(
        &mut r,
        "vgpu_gpu_memory_used_bytes",
        "Memory in use on the GPU, from NVML",
    );
    let gpu_total = gauge_family(
        &mut r,
        "vgpu_gpu_memory_total_bytes",
        "Physical memory of the GPU",
    );
    let gpu_util = gauge_family(
        &mut r,
        "vgpu_gpu_utilization_ratio",
        "Share of time the GPU was busy, from NVML",
    );
    let gpu_healthy = gauge_family(
        &mut r,
        "vgpu_gpu_healthy",
        "1 when the GPU is advertised Healthy to the kubelet",
    );
    let gpu_vgpus = gauge_family(
        &mut r,
        "vgpu_gpu_vgpus_allocated",
        "Containers holding a vGPU of this GPU",
    );
    for g in &s.gpus {
        let legacy = vec![
            ("deviceidx".to_owned(), g.index.to_string()),
            ("deviceuuid".to_owned(), g.uuid.clone()),
            zone(),
        ];
        let clean = vec![
            ("gpu_uuid".to_owned(), g.uuid.clone()),
            ("gpu_index".to_owned(), g.index.to_string()),
        ];
        if let Some(used) = g.memory_used_bytes {
            set(&host_mem, legacy.clone(), used as f64);
            set(&gpu_used, clean.clone(), used as f64);
        }
        if let Some(util) = g.utilization_percent {
            set(&host_util, legacy.clone(), f64::from(util));
            set(&gpu_util, clean.clone(), f64::from(util) / 100.0);
        }
        set(&gpu_total, clean.clone(), g.memory_total_bytes as f64);
        set(
            &gpu_healthy,
            clean.clone(),
            if g.healthy { 1.0 } else { 0.0 },
        );
        set(&gpu_vgpus, clean, g.vgpus_allocated as f64);
    }

    // Legacy per-container series. `Device_memory_desc_of_container` was a Go counter without `_total`; an
    // OpenMetrics counter must end in `_total`, so it is exposed as a gauge under its old name instead.
    let usage = gauge_family(
        &mut r,
        "vGPU_device_memory_usage_in_bytes",
        "vGPU device usage",
    );
    let limit = gauge_family(
        &mut r,
        "vGPU_device_memory_limit_in_bytes",
        "vGPU device limit",
    );
    let desc = gauge_family(
        &mut r,
        "Device_memory_desc_of_container",
        "Container device meory description",
    );
    let util = gauge_family(
        &mut r,
        "Device_utilization_desc_of_container",
        "Container device utilization description",
    );
    let last = gauge_family(
        &mut r,
        "Device_last_kernel_of_container",
        "Container device last kernel description",
    );
    // Clean per-container series.
    let c_used = gauge_family(
        &mut r,
        "vgpu_container_memory_used_bytes",
        "GPU memory the container's processes hold",
    );
    let c_limit = gauge_family(
        &mut r,
        "vgpu_container_memory_limit_bytes",
        "The container's GPU memory cap",
    );
    let c_sm = gauge_family(
        &mut r,
        "vgpu_container_sm_utilization_ratio",
        "Share of the GPU's SMs the container used",
    );
    let c_sm_limit = gauge_family(
        &mut r,
        "vgpu_container_sm_limit_ratio",
        "The container's SM cap (1 = none)",
    );
    let c_refused = gauge_family(
        &mut r,
        "vgpu_container_allocations_refused",
        "Allocations the limiter refused at the cap since the region was created",
    );
    let c_last = gauge_family(
        &mut r,
        "vgpu_container_last_kernel_age_seconds",
        "Seconds since the container's last kernel launch",
    );
    for c in &s.containers {
        let legacy = vec![
            ("podnamespace".to_owned(), c.namespace.clone()),
            ("podname".to_owned(), c.pod.clone()),
            ("ctrname".to_owned(), c.container.clone()),
            ("vdeviceid".to_owned(), c.gpu_index.to_string()),
            ("deviceuuid".to_owned(), c.gpu_uuid.clone()),
            zone(),
        ];
        set(&usage, legacy.clone(), c.memory_used_bytes as f64);
        set(&limit, legacy.clone(), c.memory_limit_bytes as f64);
        let mut described = legacy.clone();
        described.extend([
            ("context".to_owned(), c.memory_context_bytes.to_string()),
            ("module".to_owned(), c.memory_module_bytes.to_string()),
            ("data".to_owned(), c.memory_data_bytes.to_string()),
            ("offset".to_owned(), c.memory_offset_bytes.to_string()),
        ]);
        set(&desc, described, c.memory_used_bytes as f64);
        set(&util, legacy.clone(), c.sm_utilization_percent as f64);
        let age = c
            .last_kernel_unix
            .filter(|t| *t > 0)
            .map(|t| (s.now_unix - t).max(0) as f64);
        if let Some(age) = age {
            set(&last, legacy, age);
        }

        let clean = vec![
            ("namespace".to_owned(), c.namespace.clone()),
            ("pod".to_owned(), c.pod.clone()),
            ("container".to_owned(), c.container.clone()),
            ("gpu_uuid".to_owned(), c.gpu_uuid.clone()),
            ("gpu_index".to_owned(), c.gpu_index.to_string()),
        ];
        set(&c_used, clean.clone(), c.memory_used_bytes as f64);
        set(&c_limit, clean.clone(), c.memory_limit_bytes as f64);
        set(
            &c_sm,
            clean.clone(),
            c.sm_utilization_percent as f64 / 100.0,
        );
        let cap = if c.sm_limit_percent == 0 || c.sm_limit_percent >= 100 {
            1.0
        } else {
            c.sm_limit_percent as f64 / 100.0
        };
        set(&c_sm_limit, clean.clone(), cap);
        set(&c_refused, clean.clone(), c.allocations_refused as f64);
        if let Some(age) = age {
            set(&c_last, clean, age);
        }
    }
    r
}

/// For tests and tools: the value of one series in an exposition, by name and label subset.
pub fn find_value(exposition: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (series_name, rest) = series.split_once('{').unwrap_or((series, ""));
            if series_name != name {
                return None;
            }
            let all = labels.iter().all(|(k, v)| {
                let mut needle = String::new();
                let _ = write!(needle, "{k}=\"{v}\"");
                rest.contains(&needle)
            });
            if all { value.parse().ok() } else { None }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot() -> Snapshot {
        Snapshot {
            gpus: vec![GpuSample {
                index: 1,
                uuid: "GPU-b".into(),
                memory_used_bytes: Some(1 << 30),
                memory_total_bytes: 16 << 30,
                utilization_percent: Some(42),
                healthy: true,
                vgpus_allocated: 2,
            }],
            containers: vec![ContainerSample {
                namespace: "ml".into(),
                pod: "train".into(),
                container: "cuda".into(),
                gpu_uuid: "GPU-b".into(),
                gpu_index: 1,
                memory_used_bytes: 3 << 30,
                memory_data_bytes: 3 << 30,
                memory_limit_bytes: 4 << 30,
                sm_utilization_percent: 25,
                sm_limit_percent: 30,
                allocations_refused: 7,
                last_kernel_unix: Some(990),
                ..Default::default()
            }],
            now_unix: 1000,
        }
    }

    #[test]
    fn legacy_series_keep_their_names_labels_and_zone_with_the_real_device_index() {
        let m = AgentMetrics::new("0.1.0");
        let text = m.encode(&snapshot()).unwrap();
        let zone = ("zone", "vGPU");
        assert_eq!(
            find_value(
                &text,
                "HostGPUMemoryUsage",
                &[("deviceidx", "1"), ("deviceuuid", "GPU-b"), zone]
            ),
            Some((1u64 << 30) as f64)
        );
        assert_eq!(
            find_value(&text, "HostCoreUtilization", &[("deviceidx", "1"), zone]),
            Some(42.0)
        );
        let ctr = [
            ("podnamespace", "ml"),
            ("podname", "train"),
            ("ctrname", "cuda"),
            ("vdeviceid", "1"),
            ("deviceuuid", "GPU-b"),
            zone,
        ];
        assert_eq!(
            find_value(&text, "vGPU_device_memory_usage_in_bytes", &ctr),
            Some((3u64 << 30) as f64)
        );
        assert_eq!(
            find_value(&text, "vGPU_device_memory_limit_in_bytes", &ctr),
            Some((4u64 << 30) as f64)
        );
        assert_eq!(
            find_value(
                &text,
                "Device_memory_desc_of_container",
                &[("data", &(3u64 << 30).to_string())]
            ),
            Some((3u64 << 30) as f64)
        );
        assert_eq!(
            find_value(&text, "Device_utilization_desc_of_container", &ctr),
            Some(25.0)
        );
        assert_eq!(
            find_value(&text, "Device_last_kernel_of_container", &ctr),
            Some(10.0)
        );
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn clean_series_use_units_and_ratios() {
        let m = AgentMetrics::new("0.1.0");
        m.allocate("volcano.sh/vgpu-number", AllocateResult::handed_off, 0.004);
        let text = m.encode(&snapshot()).unwrap();
        let c = [
            ("namespace", "ml"),
            ("pod", "train"),
            ("container", "cuda"),
            ("gpu_uuid", "GPU-b"),
            ("gpu_index", "1"),
        ];
        assert_eq!(
            find_value(&text, "vgpu_container_sm_limit_ratio", &c),
            Some(0.3)
        );
        assert_eq!(
            find_value(&text, "vgpu_container_sm_utilization_ratio", &c),
            Some(0.25)
        );
        assert_eq!(
            find_value(&text, "vgpu_container_allocations_refused", &c),
            Some(7.0)
        );
        assert_eq!(
            find_value(&text, "vgpu_container_last_kernel_age_seconds", &c),
            Some(10.0)
        );
        assert_eq!(
            find_value(
                &text,
                "vgpu_gpu_utilization_ratio",
                &[("gpu_uuid", "GPU-b")]
            ),
            Some(0.42)
        );
        assert_eq!(
            find_value(&text, "vgpu_gpu_healthy", &[("gpu_index", "1")]),
            Some(1.0)
        );
        assert_eq!(
            find_value(
                &text,
                "vgpu_agent_allocations_total",
                &[
                    ("endpoint", "volcano.sh/vgpu-number"),
                    ("result", "handed_off")
                ]
            ),
            Some(1.0)
        );
        assert_eq!(
            find_value(&text, "vgpu_agent_allocate_duration_seconds_count", &[]),
            Some(1.0)
        );
        assert!(
            text.contains("vgpu_agent_build_info{version=\"0.1.0\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn a_container_that_never_launched_has_no_last_kernel_series() {
        let mut s = snapshot();
        s.containers[0].last_kernel_unix = None;
        let text = AgentMetrics::new("x").encode(&s).unwrap();
        assert!(!text.contains("Device_last_kernel_of_container{"));
        assert!(!text.contains("vgpu_container_last_kernel_age_seconds{"));
    }
}
