//! Building the exposition: one [`Registry`] holds the agent's counters, registered once, and a collector
//! ([`ScrapeCollector`]) that writes the scrape-time families from the snapshot being encoded; `encode` of the
//! registry writes the whole page.

use std::collections::{HashMap, HashSet};
use std::fmt::{self, Write as _};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeGaugeValue, EncodeLabelSet, EncodeLabelValue, EncodeMetric,
    LabelSetEncoder,
};
use prometheus_client::metrics::TypedMetric;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
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

/// Counters the agent updates as it works, registered once, and the scrape-time families of each encoding.
#[derive(Debug)]
pub struct AgentMetrics {
    registry: Registry,
    allocations: Family<AllocateLabels, Counter>,
    allocate_seconds: Family<EndpointLabels, Histogram>,
    region_read_errors: Counter,
    node_writes: Counter,
    nvml_up: Gauge,
    nvml_errors: Family<NvmlErrorLabels, Gauge>,
    region_tampering: Family<TamperLabels, Counter>,
    memory_violations: Family<ViolationLabels, Counter>,
    /// Registered in `registry` too.
    scrape: Arc<ScrapeCollector>,
    /// Held for one encoding of `registry`, so that the collector reads that encoding's snapshot.
    encoding: Mutex<()>,
}

/// What a container changed in its shared region against the node's record (`vgpu_agent_region_tampering`).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TamperLabels {
    kind: String,
}

/// A container over its memory cap on a GPU, and what the agent did (`vgpu_container_memory_violations`).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ViolationLabels {
    namespace: String,
    pod: String,
    container: String,
    gpu_uuid: String,
    gpu_index: u32,
    action: String,
}

/// Why NVML is unavailable (`vgpu_agent_nvml_error`).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NvmlErrorLabels {
    reason: String,
    library: String,
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
        let nvml_up = Gauge::default();
        registry.register(
            "vgpu_agent_nvml_up",
            "1 when NVML is initialised; 0 while the agent waits for it (see vgpu_agent_nvml_error)",
            nvml_up.clone(),
        );
        let nvml_errors = Family::<NvmlErrorLabels, Gauge>::default();
        registry.register(
            "vgpu_agent_nvml_error",
            "1 for the current reason NVML cannot be initialised, with the library tried; absent when it is up",
            nvml_errors.clone(),
        );
        let region_tampering = Family::<TamperLabels, Counter>::default();
        registry.register(
            "vgpu_agent_region_tampering",
            "Changes a container made to its shared region against the node's record (limits, gpus, priority, \
             symlink, not_regular, truncated, deleted, replaced); the pod is named in the log and an Event",
            region_tampering.clone(),
        );
        let memory_violations = Family::<ViolationLabels, Counter>::default();
        registry.register(
            "vgpu_container_memory_violations",
            "Times the memory backstop found a container over its memory cap on a GPU as NVML sees it (action \
             report), and times it killed the container's processes on that GPU for it (action kill)",
            memory_violations.clone(),
        );
        registry.register(
            "vgpu_agent_build",
            "Build information of the node agent",
            Info::new(vec![("version".to_owned(), version.to_owned())]),
        );
        let scrape = Arc::new(ScrapeCollector::default());
        registry.register_collector(Box::new(Arc::clone(&scrape)));
        Self {
            registry,
            allocations,
            allocate_seconds,
            region_read_errors,
            node_writes,
            nvml_up,
            nvml_errors,
            region_tampering,
            memory_violations,
            scrape,
            encoding: Mutex::default(),
        }
    }

    /// Records one change a container made to its region against the node's record, by kind.
    pub fn region_tampered(&self, kind: &str) {
        self.region_tampering
            .get_or_create(&TamperLabels {
                kind: kind.to_owned(),
            })
            .inc();
    }

    /// Records one memory-cap violation of a container on a GPU (`action`: `report` or `kill`).
    pub fn memory_violation(
        &self,
        (namespace, pod, container): (&str, &str, &str),
        (gpu_uuid, gpu_index): (&str, u32),
        action: &str,
    ) {
        self.memory_violations
            .get_or_create(&ViolationLabels {
                namespace: namespace.to_owned(),
                pod: pod.to_owned(),
                container: container.to_owned(),
                gpu_uuid: gpu_uuid.to_owned(),
                gpu_index,
                action: action.to_owned(),
            })
            .inc();
    }

    /// Records NVML's state: `Ok(())` when initialised, else `Err((reason, library))`.
    pub fn nvml_status(&self, status: Result<(), (&str, &str)>) {
        self.nvml_errors.clear();
        match status {
            Ok(()) => {
                self.nvml_up.set(1);
            }
            Err((reason, library)) => {
                self.nvml_up.set(0);
                self.nvml_errors
                    .get_or_create(&NvmlErrorLabels {
                        reason: reason.to_owned(),
                        library: library.to_owned(),
                    })
                    .set(1);
            }
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

    /// The whole exposition (OpenMetrics text) for one scrape, of a copy of `snapshot`.
    pub fn encode(&self, snapshot: &Snapshot) -> Result<String, fmt::Error> {
        self.encode_owned(snapshot.clone())
    }

    /// [`Self::encode`] of a snapshot the caller has no more use for (the server's), without copying it.
    pub(crate) fn encode_owned(&self, snapshot: Snapshot) -> Result<String, fmt::Error> {
        // About 2.4 KiB per container and GPU, a few KiB for the rest.
        let mut out = String::with_capacity(16 * 1024 + snapshot.containers.len() * 2560);
        // The collector takes the snapshot put here; one encoding at a time, so that it is this one's.
        let _one_at_a_time = lock(&self.encoding);
        lock(&self.scrape.state).snapshot = Some(snapshot);
        encode(&mut out, &self.registry)?;
        Ok(out)
    }

    /// The same exposition in the Prometheus text format 0.0.4, for clients that do not ask for OpenMetrics
    /// (`curl`, `promtool check metrics`, older scrapers): what Volcano's Go monitor serves to everybody.
    pub fn encode_text(&self, snapshot: &Snapshot) -> Result<String, fmt::Error> {
        Ok(openmetrics_to_text(&self.encode(snapshot)?))
    }
}

/// Rewrites OpenMetrics text as written by `prometheus-client` into text format 0.0.4: a counter family is
/// named after its `_total` samples (and loses `_created` samples), an `info` family becomes a gauge named
/// `<name>_info`, `unknown` becomes `untyped`, and `# UNIT` and `# EOF` lines go. Sample lines, label escaping
/// and histograms are the same in both formats.
pub fn openmetrics_to_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut help: Option<(&str, &str)> = None;
    let mut counter: Option<&str> = None;
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            help = Some(rest.split_once(' ').unwrap_or((rest, "")));
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (family, kind) = rest.split_once(' ').unwrap_or((rest, "unknown"));
            counter = (kind == "counter").then_some(family);
            let (name, kind) = match kind {
                "counter" => (format!("{family}_total"), "counter"),
                "info" => (format!("{family}_info"), "gauge"),
                "gauge" | "histogram" | "summary" => (family.to_owned(), kind),
                _ => (family.to_owned(), "untyped"),
            };
            if let Some((_, text)) = help.take().filter(|(h, _)| *h == family) {
                // OpenMetrics also escapes `"` in HELP; text 0.0.4 knows only `\\` and `\n`.
                let _ = writeln!(out, "# HELP {name} {}", text.replace("\\\"", "\""));
            }
            let _ = writeln!(out, "# TYPE {name} {kind}");
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let sample = line.split(['{', ' ']).next().unwrap_or("");
        if counter.is_some_and(|c| sample.strip_prefix(c) == Some("_created")) {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
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
    /// Allocations the limiter refused at the cap, summed over the region's live process slots (it goes down
    /// when a process exits; the exposition turns it into a counter).
    pub allocations_refused: u64,
    /// Unix seconds of the last kernel launch, when known.
    pub last_kernel_unix: Option<i64>,
    /// The region's task priority (`CUDA_TASK_PRIORITY`; 0 high, 1 low).
    pub priority: i32,
    /// The monitor blocks the container's launches (`recent_kernel` < 0): a higher-priority container is
    /// active on one of its GPUs.
    pub launches_blocked: bool,
    /// The SM cap is enforced (`utilization_switch` = 1): the GPU is contended at this priority.
    pub sm_limit_enforced: bool,
}

/// Everything read at scrape time.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Snapshot {
    /// The node's GPUs.
    pub gpus: Vec<GpuSample>,
    /// Per container and GPU.
    pub containers: Vec<ContainerSample>,
    /// Per container and GPU, as NVML sees it (the memory backstop's last round; empty when it is off).
    pub observed: Vec<ObservedSample>,
    /// Per GPU, memory held by processes of no container the agent handed a GPU to (the memory backstop's
    /// last round; empty when it is off).
    pub unaccounted: Vec<UnaccountedSample>,
    /// The MIG devices of the GPUs in MIG mode (none for a GPU without MIG support or with MIG off).
    pub mig_devices: Vec<MigDeviceSample>,
    /// Now, for ages.
    pub now_unix: i64,
}

/// One MIG device (one compute instance) of a GPU in MIG mode, at scrape time.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MigDeviceSample {
    /// The parent GPU's `GPU-…`.
    pub gpu_uuid: String,
    /// The parent GPU's index on the node.
    pub gpu_index: u32,
    /// `MIG-…`.
    pub mig_uuid: String,
    /// The MIG profile, e.g. `1g.10gb` (or `1c.3g.40gb` for a compute instance smaller than its GPU instance).
    pub profile: String,
    /// NVML's used memory of the MIG device, when NVML answered.
    pub memory_used_bytes: Option<u64>,
    /// The MIG device's memory, when NVML answered.
    pub memory_total_bytes: Option<u64>,
    /// The parent GPU's advertised health (the kubelet's IDs and the health monitor are per parent GPU).
    pub healthy: bool,
}

/// One container's memory on one GPU as NVML reports it for the container's processes (host PIDs mapped to
/// the container through their cgroups), beside what its shared region says.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ObservedSample {
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
    /// The sum of NVML's `usedGpuMemory` over the container's processes on the GPU.
    pub memory_observed_bytes: u64,
}

/// Memory on one GPU held by processes the agent cannot attribute to a container it allocated.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UnaccountedSample {
    /// The GPU.
    pub gpu_uuid: String,
    /// The GPU's index on the node.
    pub gpu_index: u32,
    /// The sum of NVML's `usedGpuMemory` over those processes.
    pub memory_bytes: u64,
}

/// Where scrape-time values come from; called on a blocking thread.
pub trait SnapshotSource: Send + Sync + 'static {
    /// Reads the current state.
    fn snapshot(&self) -> Snapshot;
}

/// The scrape-time families (legacy and clean), as a collector in the agent's registry: written from the
/// snapshot of the encoding in progress, in a stable order (GPUs and containers as the snapshot lists them).
/// Every family's `# HELP` and `# TYPE` are written even when it has no series.
#[derive(Debug, Default)]
struct ScrapeCollector {
    state: Mutex<ScrapeState>,
}

#[derive(Debug, Default)]
struct ScrapeState {
    /// Put here by [`AgentMetrics::encode_owned`], taken by the encoding.
    snapshot: Option<Snapshot>,
    /// `vgpu_container_allocations_refused_total`, kept across the exits of the processes that made them.
    refused: RefusedTotals,
}

impl Collector for ScrapeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        let mut state = lock(&self.state);
        let Some(snapshot) = state.snapshot.take() else {
            return Ok(());
        };
        let refused = state.refused.update(&snapshot);
        drop(state);
        encode_gpus(&mut encoder, &snapshot.gpus)?;
        encode_containers(&mut encoder, &snapshot, &refused)?;
        encode_backstop(&mut encoder, &snapshot)?;
        encode_mig_devices(&mut encoder, &snapshot.mig_devices)
    }
}

/// The guard, also of a mutex a panic poisoned (every state it guards is valid between statements).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Legacy per-GPU series (docs/volcano-contract.md §7.1), then the clean per-GPU set. (`Registry::register` adds the full stop
/// at the end of a help text; a collector writes it as given.)
fn encode_gpus(e: &mut DescriptorEncoder<'_>, gpus: &[GpuSample]) -> fmt::Result {
    gauges(
        e,
        "HostGPUMemoryUsage",
        "GPU device memory usage.",
        gpus,
        |g| Some((GpuLegacy(g), g.memory_used_bytes?)),
    )?;
    gauges(
        e,
        "HostCoreUtilization",
        "GPU core utilization.",
        gpus,
        |g| Some((GpuLegacy(g), g.utilization_percent?)),
    )?;
    gauges(
        e,
        "vgpu_gpu_memory_used_bytes",
        "Memory in use on the GPU, from NVML.",
        gpus,
        |g| Some((GpuClean(g), g.memory_used_bytes?)),
    )?;
    gauges(
        e,
        "vgpu_gpu_memory_total_bytes",
        "Physical memory of the GPU.",
        gpus,
        |g| Some((GpuClean(g), g.memory_total_bytes)),
    )?;
    gauges(
        e,
        "vgpu_gpu_utilization_ratio",
        "Share of time the GPU was busy, from NVML.",
        gpus,
        |g| Some((GpuClean(g), f64::from(g.utilization_percent?) / 100.0)),
    )?;
    gauges(
        e,
        "vgpu_gpu_healthy",
        "1 when the GPU is advertised Healthy to the kubelet.",
        gpus,
        |g| Some((GpuClean(g), u32::from(g.healthy))),
    )?;
    gauges(
        e,
        "vgpu_gpu_vgpus_allocated",
        "Containers holding a vGPU of this GPU.",
        gpus,
        |g| Some((GpuClean(g), g.vgpus_allocated)),
    )
}

/// Legacy per-container series, then the clean set: one series per container and GPU index, even if a region
/// lists a GPU twice or under two spellings of its UUID.
fn encode_containers(
    e: &mut DescriptorEncoder<'_>,
    s: &Snapshot,
    refused: &HashMap<ContainerRef<'_>, u64>,
) -> fmt::Result {
    let mut seen = HashSet::new();
    let containers: Vec<&ContainerSample> = s
        .containers
        .iter()
        .filter(|c| seen.insert((container_ref(c), c.gpu_index)))
        .collect();
    let age = |c: &ContainerSample| {
        c.last_kernel_unix
            .filter(|t| *t > 0)
            .map(|t| s.now_unix.saturating_sub(t).max(0))
    };

    // `Device_memory_desc_of_container` was a Go counter without `_total`; an OpenMetrics counter must end in
    // `_total`, so it is exposed as a gauge under its old name instead.
    gauges(
        e,
        "vGPU_device_memory_usage_in_bytes",
        "vGPU device usage.",
        &containers,
        |&c| Some((ContainerLegacy(c), c.memory_used_bytes)),
    )?;
    gauges(
        e,
        "vGPU_device_memory_limit_in_bytes",
        "vGPU device limit.",
        &containers,
        |&c| Some((ContainerLegacy(c), c.memory_limit_bytes)),
    )?;
    gauges(
        e,
        "Device_memory_desc_of_container",
        "Container device meory description.",
        &containers,
        |&c| Some((ContainerMemoryDesc(c), c.memory_used_bytes)),
    )?;
    gauges(
        e,
        "Device_utilization_desc_of_container",
        "Container device utilization description.",
        &containers,
        |&c| Some((ContainerLegacy(c), c.sm_utilization_percent)),
    )?;
    gauges(
        e,
        "Device_last_kernel_of_container",
        "Container device last kernel description.",
        &containers,
        |&c| Some((ContainerLegacy(c), age(c)?)),
    )?;

    gauges(
        e,
        "vgpu_container_memory_used_bytes",
        "GPU memory the container's processes hold.",
        &containers,
        |&c| Some((ContainerClean(c), c.memory_used_bytes)),
    )?;
    gauges(
        e,
        "vgpu_container_memory_limit_bytes",
        "The container's GPU memory cap.",
        &containers,
        |&c| Some((ContainerClean(c), c.memory_limit_bytes)),
    )?;
    gauges(
        e,
        "vgpu_container_sm_utilization_ratio",
        "Share of the GPU's SMs the container used.",
        &containers,
        |&c| Some((ContainerClean(c), c.sm_utilization_percent as f64 / 100.0)),
    )?;
    gauges(
        e,
        "vgpu_container_sm_limit_ratio",
        "The container's SM cap; absent when it has none.",
        &containers,
        |&c| Some((ContainerClean(c), sm_cap(c)?)),
    )?;
    // A counter (`increase()` works on it), one series per container that has a memory cap on any of its GPUs,
    // the only place the limiter refuses (see `RefusedTotals`).
    let capped: HashSet<ContainerRef<'_>> = containers
        .iter()
        .filter(|c| c.memory_limit_bytes > 0)
        .map(|c| container_ref(c))
        .collect();
    let mut written = HashSet::new();
    family(
        e,
        "vgpu_container_allocations_refused",
        "Allocations the limiter refused at the container's memory caps (the application saw an out-of-memory \
         error), per container, kept across process exits.",
        containers.iter().filter_map(|&c| {
            let key = container_ref(c);
            (capped.contains(&key) && written.insert(key)).then(|| {
                let total = refused.get(&key).copied().unwrap_or(0);
                (Container(c), ConstCounter::new(total))
            })
        }),
    )?;
    gauges(
        e,
        "vgpu_container_last_kernel_age_seconds",
        "Seconds since the container's last kernel launch.",
        &containers,
        |&c| Some((ContainerClean(c), age(c)?)),
    )?;
    gauges(
        e,
        "vgpu_container_priority",
        "The container's task priority (CUDA_TASK_PRIORITY: 0 high, 1 low).",
        &containers,
        |&c| Some((ContainerClean(c), c.priority)),
    )?;
    gauges(
        e,
        "vgpu_container_launches_blocked",
        "1 while a higher-priority container active on the same GPU blocks this one's kernel launches.",
        &containers,
        |&c| Some((ContainerClean(c), u32::from(c.launches_blocked))),
    )?;
    gauges(
        e,
        "vgpu_container_sm_limit_enforced",
        "1 while the SM cap is enforced because the GPU is shared at this priority, 0 while it runs free; absent \
         for a container without an SM cap.",
        &containers,
        |&c| sm_cap(c).map(|_| (ContainerClean(c), u32::from(c.sm_limit_enforced))),
    )
}

/// The memory backstop's view: per container and GPU from NVML, and what no container accounts for per GPU.
fn encode_backstop(e: &mut DescriptorEncoder<'_>, s: &Snapshot) -> fmt::Result {
    gauges(
        e,
        "vgpu_container_memory_observed_bytes",
        "GPU memory NVML reports for the container's processes (host PIDs mapped through their cgroups); compare \
         with vgpu_container_memory_used_bytes, which the container's own region reports.",
        &s.observed,
        |o| Some((Observed(o), o.memory_observed_bytes)),
    )?;
    gauges(
        e,
        "vgpu_unaccounted_memory_bytes",
        "GPU memory NVML reports for processes of no container the agent handed this GPU to (host processes, \
         pods that bypassed the device plugin).",
        &s.unaccounted,
        |u| Some((Unaccounted(u), u.memory_bytes)),
    )
}

/// One series per MIG device of the GPUs in MIG mode, labelled with its parent GPU.
fn encode_mig_devices(e: &mut DescriptorEncoder<'_>, migs: &[MigDeviceSample]) -> fmt::Result {
    let mut seen = HashSet::new();
    let migs: Vec<&MigDeviceSample> = migs
        .iter()
        .filter(|m| seen.insert((m.gpu_index, m.mig_uuid.as_str())))
        .collect();
    gauges(
        e,
        "vgpu_mig_device_memory_used_bytes",
        "Memory in use on the MIG device, from NVML.",
        &migs,
        |&m| Some((Mig(m), m.memory_used_bytes?)),
    )?;
    gauges(
        e,
        "vgpu_mig_device_memory_total_bytes",
        "Memory of the MIG device, from NVML.",
        &migs,
        |&m| Some((Mig(m), m.memory_total_bytes?)),
    )?;
    gauges(
        e,
        "vgpu_mig_device_healthy",
        "1 when the MIG device's parent GPU is advertised Healthy to the kubelet (the kubelet's device IDs and \
         the health monitor are per parent GPU, not per MIG device).",
        &migs,
        |&m| Some((Mig(m), u32::from(m.healthy))),
    )
}

/// The labels of a [`MigDeviceSample`]: `gpu_uuid`, `gpu_index` (its parent's), `mig_uuid`, `profile`.
struct Mig<'a>(&'a MigDeviceSample);

impl EncodeLabelSet for Mig<'_> {
    fn encode(&self, encoder: &mut LabelSetEncoder<'_>) -> fmt::Result {
        let m = self.0;
        [("gpu_uuid", m.gpu_uuid.as_str())].encode(encoder)?;
        [("gpu_index", m.gpu_index)].encode(encoder)?;
        [("mig_uuid", m.mig_uuid.as_str()), ("profile", &m.profile)].encode(encoder)
    }
}

/// The labels of an [`UnaccountedSample`]: `gpu_uuid`, `gpu_index`.
struct Unaccounted<'a>(&'a UnaccountedSample);

impl EncodeLabelSet for Unaccounted<'_> {
    fn encode(&self, encoder: &mut LabelSetEncoder<'_>) -> fmt::Result {
        [("gpu_uuid", self.0.gpu_uuid.as_str())].encode(encoder)?;
        [("gpu_index", self.0.gpu_index)].encode(encoder)
    }
}

/// The clean labels of an [`ObservedSample`].
struct Observed<'a>(&'a ObservedSample);

impl EncodeLabelSet for Observed<'_> {
    fn encode(&self, encoder: &mut LabelSetEncoder<'_>) -> fmt::Result {
        let o = self.0;
        [
            ("namespace", o.namespace.as_str()),
            ("pod", &o.pod),
            ("container", &o.container),
            ("gpu_uuid", &o.gpu_uuid),
        ]
        .encode(encoder)?;
        [("gpu_index", o.gpu_index)].encode(encoder)
    }
}

/// A gauge family: a series for each item `sample` gives labels and a value for.
fn gauges<'a, T: 'a, L: EncodeLabelSet, V: EncodeGaugeValue>(
    e: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    items: impl IntoIterator<Item = &'a T>,
    sample: impl Fn(&'a T) -> Option<(L, V)>,
) -> fmt::Result {
    let series = items.into_iter().filter_map(sample);
    family(e, name, help, series.map(|(l, v)| (l, ConstGauge::new(v))))
}

/// A family: its `# HELP` and `# TYPE`, then its series.
fn family<L: EncodeLabelSet, M: EncodeMetric + TypedMetric>(
    e: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    series: impl Iterator<Item = (L, M)>,
) -> fmt::Result {
    let mut family = e.encode_descriptor(name, help, None, M::TYPE)?;
    for (labels, metric) in series {
        metric.encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// Volcano's labels of a GPU: `deviceidx` (its index on the node), `deviceuuid`, `zone="vGPU"`.
struct GpuLegacy<'a>(&'a GpuSample);

impl EncodeLabelSet for GpuLegacy<'_> {
    fn encode(&self, encoder: &mut LabelSetEncoder<'_>) -> fmt::Result {
        [("deviceidx", self.0.index)].encode(encoder)?;
        [("deviceuuid", self.0.uuid.as_str()), ("zone", "vGPU")].encode(encoder)
    }
}

/// The clean labels of a GPU: `gpu_uuid`, `gpu_index`.
struct GpuClean<'a>(&'a GpuSample);

impl EncodeLabelSet for GpuClean<'_> {
    fn encode(&self, encoder: &mut LabelSetEncoder<'_>) -> fmt::Result {
        [("gpu_uuid", self.0.uuid.as_str())].encode(encoder)?;
        [("gpu_index", self.0.index)].encode(encoder)
    }
}

/// A container: `namespace`, `pod`, `container`.
struct Container<'a>(&'a ContainerSample);

impl EncodeLabelSet for Container<'_> {
    fn encode(&self, encoder: &mut LabelSetEncoder<'_>) -> fmt::Result {
        let c = self.0;
        [
            ("namespace", c.namespace.as_str()),
            ("pod", &c.pod),
            ("container", &c.container),
        ]
        .encode(encoder)
    }
}

/// The clean labels of a container's GPU: the container's, `gpu_uuid`, `gpu_index`.
struct ContainerClean<'a>(&'a ContainerSample);

impl EncodeLabelSet for ContainerClean<'_> {
    fn encode(&self, encoder: &mut LabelSetEncoder<'_>) -> fmt::Result {
        Container(self.0).encode(encoder)?;
        [("gpu_uuid", self.0.gpu_uuid.as_str())].encode(encoder)?;
        [("gpu_index", self.0.gpu_index)].encode(encoder)
    }
}

/// Volcano's labels of a container's GPU: `podnamespace`, `podname`, `ctrname`, `vdeviceid` (the GPU's index on
/// the node, where upstream has the index in the container's region), `deviceuuid`, `zone="vGPU"`.
struct ContainerLegacy<'a>(&'a ContainerSample);

impl EncodeLabelSet for ContainerLegacy<'_> {
    fn encode(&self, encoder: &mut LabelSetEncoder<'_>) -> fmt::Result {
        let c = self.0;
        [
            ("podnamespace", c.namespace.as_str()),
            ("podname", &c.pod),
            ("ctrname", &c.container),
        ]
        .encode(encoder)?;
        [("vdeviceid", c.gpu_index)].encode(encoder)?;
        [("deviceuuid", c.gpu_uuid.as_str()), ("zone", "vGPU")].encode(encoder)
    }
}

/// [`ContainerLegacy`] and the memory breakdown, bytes: `context`, `module`, `data`, `offset`.
struct ContainerMemoryDesc<'a>(&'a ContainerSample);

impl EncodeLabelSet for ContainerMemoryDesc<'_> {
    fn encode(&self, encoder: &mut LabelSetEncoder<'_>) -> fmt::Result {
        let c = self.0;
        ContainerLegacy(c).encode(encoder)?;
        [
            ("context", c.memory_context_bytes),
            ("module", c.memory_module_bytes),
            ("data", c.memory_data_bytes),
            ("offset", c.memory_offset_bytes),
        ]
        .encode(encoder)
    }
}

/// A container: namespace, pod, container.
type ContainerKey = (String, String, String);

/// [`ContainerKey`], borrowed from a sample.
type ContainerRef<'a> = (&'a str, &'a str, &'a str);

fn container_ref(c: &ContainerSample) -> ContainerRef<'_> {
    (&c.namespace, &c.pod, &c.container)
}

/// Refusals per container as a counter. The limiter counts them per process slot of the region, not per GPU,
/// and a slot is cleared when its process exits, so the region's sum goes down; a count that goes down is not a
/// count (`increase()` would read it as a reset and miss what the new processes did). What the region lost since
/// the last scrape is kept here, so the counter only resets when the agent restarts or the pod is gone.
/// Refusals a process makes after the last scrape before it exits are not seen. One series per container, with
/// no GPU labels: the count is not per GPU, and one series per GPU would show refusals on GPUs never used and
/// count them twice in a sum.
#[derive(Debug, Default)]
struct RefusedTotals(HashMap<ContainerKey, Refused>);

#[derive(Debug, Clone, Copy, Default)]
struct Refused {
    /// The region's sum at the last scrape.
    last: u64,
    /// Refusals of processes that have exited since the series appeared.
    gone: u64,
}

impl RefusedTotals {
    /// Folds this scrape's region sums in; returns the counter per series. Series the snapshot no longer has
    /// (the pod left the node) are forgotten.
    fn update<'s>(&mut self, snapshot: &'s Snapshot) -> HashMap<ContainerRef<'s>, u64> {
        let mut totals = HashMap::with_capacity(snapshot.containers.len());
        for c in &snapshot.containers {
            let key = container_ref(c);
            if totals.contains_key(&key) {
                continue;
            }
            let (namespace, pod, container) = key;
            let entry = self
                .0
                .entry((namespace.to_owned(), pod.to_owned(), container.to_owned()))
                .or_default();
            if c.allocations_refused < entry.last {
                entry.gone = entry
                    .gone
                    .saturating_add(entry.last - c.allocations_refused);
            }
            entry.last = c.allocations_refused;
            totals.insert(key, entry.gone.saturating_add(entry.last));
        }
        self.0
            .retain(|(n, p, c), _| totals.contains_key(&(n.as_str(), p.as_str(), c.as_str())));
        totals
    }
}

/// The container's SM cap as a ratio, when it has one (`CUDA_DEVICE_SM_LIMIT` from 1 to 99).
fn sm_cap(c: &ContainerSample) -> Option<f64> {
    (c.sm_limit_percent > 0 && c.sm_limit_percent < 100).then(|| c.sm_limit_percent as f64 / 100.0)
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

    #[test]
    fn the_backstop_families_carry_observed_unaccounted_and_violations() {
        let metrics = AgentMetrics::new("t");
        metrics.memory_violation(("ns", "p", "cuda"), ("GPU-b", 1), "kill");
        let snapshot = Snapshot {
            observed: vec![ObservedSample {
                namespace: "ns".into(),
                pod: "p".into(),
                container: "cuda".into(),
                gpu_uuid: "GPU-b".into(),
                gpu_index: 1,
                memory_observed_bytes: 5 << 30,
            }],
            unaccounted: vec![UnaccountedSample {
                gpu_uuid: "GPU-b".into(),
                gpu_index: 1,
                memory_bytes: 7,
            }],
            ..Default::default()
        };
        let text = metrics.encode(&snapshot).unwrap();
        let c = [
            ("namespace", "ns"),
            ("pod", "p"),
            ("container", "cuda"),
            ("gpu_uuid", "GPU-b"),
            ("gpu_index", "1"),
        ];
        assert_eq!(
            find_value(&text, "vgpu_container_memory_observed_bytes", &c),
            Some((5u64 << 30) as f64)
        );
        assert_eq!(
            find_value(
                &text,
                "vgpu_unaccounted_memory_bytes",
                &[("gpu_uuid", "GPU-b"), ("gpu_index", "1")]
            ),
            Some(7.0)
        );
        let mut v = c.to_vec();
        v.push(("action", "kill"));
        assert_eq!(
            find_value(&text, "vgpu_container_memory_violations_total", &v),
            Some(1.0),
            "{text}"
        );
        let empty = metrics.encode(&Snapshot::default()).unwrap();
        assert!(
            empty.contains("# TYPE vgpu_unaccounted_memory_bytes gauge"),
            "families are described when empty"
        );
    }

    #[test]
    fn mig_devices_are_one_series_each_labelled_with_their_parent_and_profile() {
        let mig = |uuid: &str, used: Option<u64>| MigDeviceSample {
            gpu_uuid: "GPU-a100".into(),
            gpu_index: 0,
            mig_uuid: uuid.into(),
            profile: "3g.40gb".into(),
            memory_used_bytes: used,
            memory_total_bytes: Some(40192 << 20),
            healthy: true,
        };
        let mut s = snapshot();
        s.mig_devices = vec![
            mig("MIG-1", Some(1 << 20)),
            mig("MIG-2", None),
            // Read twice: written once.
            mig("MIG-1", Some(1 << 20)),
        ];
        let text = AgentMetrics::new("x").encode(&s).unwrap();
        let mig_lines: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("vgpu_mig_device_"))
            .collect();
        assert_eq!(
            mig_lines,
            [
                "# HELP vgpu_mig_device_memory_used_bytes Memory in use on the MIG device, from NVML.",
                "# TYPE vgpu_mig_device_memory_used_bytes gauge",
                r#"vgpu_mig_device_memory_used_bytes{gpu_uuid="GPU-a100",gpu_index="0",mig_uuid="MIG-1",profile="3g.40gb"} 1048576"#,
                "# HELP vgpu_mig_device_memory_total_bytes Memory of the MIG device, from NVML.",
                "# TYPE vgpu_mig_device_memory_total_bytes gauge",
                r#"vgpu_mig_device_memory_total_bytes{gpu_uuid="GPU-a100",gpu_index="0",mig_uuid="MIG-1",profile="3g.40gb"} 42144366592"#,
                r#"vgpu_mig_device_memory_total_bytes{gpu_uuid="GPU-a100",gpu_index="0",mig_uuid="MIG-2",profile="3g.40gb"} 42144366592"#,
                "# HELP vgpu_mig_device_healthy 1 when the MIG device's parent GPU is advertised Healthy to the \
                 kubelet (the kubelet's device IDs and the health monitor are per parent GPU, not per MIG device).",
                "# TYPE vgpu_mig_device_healthy gauge",
                r#"vgpu_mig_device_healthy{gpu_uuid="GPU-a100",gpu_index="0",mig_uuid="MIG-1",profile="3g.40gb"} 1"#,
                r#"vgpu_mig_device_healthy{gpu_uuid="GPU-a100",gpu_index="0",mig_uuid="MIG-2",profile="3g.40gb"} 1"#,
            ],
            "{text}"
        );
        // The whole-GPU series are as before, and a node without MIG devices describes the families only.
        assert_eq!(
            find_value(
                &text,
                "vgpu_gpu_memory_total_bytes",
                &[("gpu_uuid", "GPU-b")]
            ),
            Some((16u64 << 30) as f64)
        );
        let plain = AgentMetrics::new("x").encode(&snapshot()).unwrap();
        assert!(plain.contains("# TYPE vgpu_mig_device_healthy gauge\n"));
        assert!(!plain.contains("vgpu_mig_device_healthy{"), "{plain}");
        // Text format 0.0.4 keeps them as they are.
        let text = openmetrics_to_text(&AgentMetrics::new("x").encode(&s).unwrap());
        assert!(text.contains("# TYPE vgpu_mig_device_memory_total_bytes gauge\n"));
    }

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
                priority: 1,
                launches_blocked: true,
                ..Default::default()
            }],
            now_unix: 1000,
            ..Default::default()
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
            find_value(&text, "vgpu_container_allocations_refused_total", &c[..3]),
            Some(7.0)
        );
        assert_eq!(
            find_value(&text, "vgpu_container_sm_utilization_ratio", &c),
            Some(0.25)
        );
        assert_eq!(
            find_value(&text, "vgpu_container_last_kernel_age_seconds", &c),
            Some(10.0)
        );
        assert_eq!(
            find_value(&text, "vgpu_container_launches_blocked", &c),
            Some(1.0)
        );
        assert_eq!(
            find_value(&text, "vgpu_container_sm_limit_enforced", &c),
            Some(0.0)
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
    fn text_format_names_counters_and_info_by_their_samples_and_drops_eof() {
        let m = AgentMetrics::new("1.2.3");
        m.allocate("volcano.sh/vgpu-memory", AllocateResult::empty, 0.001);
        m.region_read_error();
        let text = m.encode_text(&snapshot()).unwrap();
        assert!(text.contains(
            "# HELP vgpu_agent_region_read_errors_total Container shared-region files that could not be \
             read (corrupt, truncated, foreign).\n# TYPE vgpu_agent_region_read_errors_total counter\n\
             vgpu_agent_region_read_errors_total 1\n"
        ), "{text}");
        assert!(text.contains(
            "# TYPE vgpu_agent_build_info gauge\nvgpu_agent_build_info{version=\"1.2.3\"} 1\n"
        ));
        assert!(text.contains("# TYPE vgpu_agent_allocate_duration_seconds histogram\n"));
        assert!(!text.contains("# EOF") && !text.contains("# UNIT"));
        // Every sample of the OpenMetrics exposition is kept, byte for byte.
        let samples = |t: &str| -> Vec<String> {
            t.lines()
                .filter(|l| !l.starts_with('#'))
                .map(str::to_owned)
                .collect()
        };
        assert_eq!(samples(&text), samples(&m.encode(&snapshot()).unwrap()));
        assert_eq!(
            find_value(&text, "vgpu_container_priority", &[("pod", "train")]),
            Some(1.0)
        );
    }

    #[test]
    fn hostile_label_values_are_escaped_and_duplicate_series_written_once() {
        let mut s = snapshot();
        // A UUID read from a container-written region file.
        s.containers[0].gpu_uuid = "GPU-\"x\\\n".into();
        s.containers.push(s.containers[0].clone());
        let text = AgentMetrics::new("x").encode(&s).unwrap();
        let line = "vgpu_container_memory_used_bytes{namespace=\"ml\",pod=\"train\",container=\"cuda\",\
                    gpu_uuid=\"GPU-\\\"x\\\\\\n\",gpu_index=\"1\"} 3221225472\n";
        assert_eq!(text.matches(line).count(), 1, "{text}");
        assert_eq!(text.lines().filter(|l| l.is_empty()).count(), 0);
    }

    #[test]
    fn refusals_are_a_counter_that_survives_the_exit_of_the_processes_that_made_them() {
        let m = AgentMetrics::new("x");
        let c = [("pod", "train"), ("container", "cuda")];
        let scrape = |refused: u64| {
            let mut s = snapshot();
            s.containers[0].allocations_refused = refused;
            m.encode(&s).unwrap()
        };
        let counter = |text: &str| find_value(text, "vgpu_container_allocations_refused_total", &c);
        assert_eq!(counter(&scrape(7)), Some(7.0));
        // The process exited: its slot, and its 7 refusals, left the region.
        let text = scrape(0);
        assert_eq!(counter(&text), Some(7.0), "{text}");
        assert!(text.contains("# TYPE vgpu_container_allocations_refused counter\n"));
        // A new process was refused twice.
        assert_eq!(counter(&scrape(2)), Some(9.0));
        let text = openmetrics_to_text(&scrape(3));
        assert!(
            text.contains("# TYPE vgpu_container_allocations_refused_total counter\n"),
            "{text}"
        );
        assert_eq!(counter(&text), Some(10.0));
        // The pod left the node: the series goes, and a pod of the same name later starts from 0.
        let mut gone = snapshot();
        gone.containers.clear();
        assert_eq!(counter(&m.encode(&gone).unwrap()), None);
        assert_eq!(counter(&scrape(0)), Some(0.0));
    }

    #[test]
    fn refusals_are_one_series_per_container_and_none_without_a_memory_cap() {
        let mut s = snapshot();
        // The same container on a second GPU: the region's count is the container's, not this GPU's.
        let mut other = s.containers[0].clone();
        other.gpu_uuid = "GPU-c".into();
        other.gpu_index = 2;
        other.memory_used_bytes = 0;
        s.containers.push(other);
        // A container with no memory cap anywhere cannot be refused.
        let mut uncapped = s.containers[0].clone();
        uncapped.container = "free".into();
        uncapped.memory_limit_bytes = 0;
        s.containers.push(uncapped);
        let text = AgentMetrics::new("x").encode(&s).unwrap();
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("vgpu_container_allocations_refused_total{"))
            .collect();
        assert_eq!(
            lines,
            [
                "vgpu_container_allocations_refused_total{namespace=\"ml\",pod=\"train\",container=\"cuda\"} 7"
            ],
            "{text}"
        );
    }

    #[test]
    fn a_container_without_an_sm_cap_has_no_sm_limit_series() {
        for cap in [0, 100] {
            let mut s = snapshot();
            s.containers[0].sm_limit_percent = cap;
            s.containers[0].sm_limit_enforced = true;
            let text = AgentMetrics::new("x").encode(&s).unwrap();
            assert!(!text.contains("vgpu_container_sm_limit_ratio{"), "{text}");
            assert!(
                !text.contains("vgpu_container_sm_limit_enforced{"),
                "{text}"
            );
            assert!(text.contains("vgpu_container_sm_utilization_ratio{"));
        }
    }

    #[test]
    fn one_series_per_container_and_gpu_index() {
        let mut s = snapshot();
        // The same GPU read under a second spelling of its UUID (a truncated slot in the region).
        let mut twice = s.containers[0].clone();
        twice.gpu_uuid = "GPU-b-truncated".into();
        twice.memory_used_bytes = 0;
        s.containers.push(twice);
        let text = AgentMetrics::new("x").encode(&s).unwrap();
        let values: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("vgpu_container_memory_used_bytes{"))
            .collect();
        assert_eq!(values.len(), 1, "{text}");
        assert!(values[0].contains("gpu_index=\"1\""));
    }

    #[test]
    fn a_container_that_never_launched_has_no_last_kernel_series() {
        let mut s = snapshot();
        s.containers[0].last_kernel_unix = None;
        let text = AgentMetrics::new("x").encode(&s).unwrap();
        assert!(!text.contains("Device_last_kernel_of_container{"));
        assert!(!text.contains("vgpu_container_last_kernel_age_seconds{"));
    }

    #[test]
    fn legacy_families_are_written_byte_for_byte_as_before_the_collector() {
        let text = AgentMetrics::new("x").encode(&snapshot()).unwrap();
        let legacy: Vec<&str> = text
            .lines()
            .filter(|line| {
                let name = line
                    .strip_prefix("# HELP ")
                    .or_else(|| line.strip_prefix("# TYPE "))
                    .unwrap_or(line);
                ["Host", "vGPU_", "Device_"]
                    .iter()
                    .any(|p| name.starts_with(p))
            })
            .collect();
        // What the hand-written encoding wrote for this snapshot.
        assert_eq!(
            legacy,
            [
                r#"# HELP HostGPUMemoryUsage GPU device memory usage."#,
                r#"# TYPE HostGPUMemoryUsage gauge"#,
                r#"HostGPUMemoryUsage{deviceidx="1",deviceuuid="GPU-b",zone="vGPU"} 1073741824"#,
                r#"# HELP HostCoreUtilization GPU core utilization."#,
                r#"# TYPE HostCoreUtilization gauge"#,
                r#"HostCoreUtilization{deviceidx="1",deviceuuid="GPU-b",zone="vGPU"} 42"#,
                r#"# HELP vGPU_device_memory_usage_in_bytes vGPU device usage."#,
                r#"# TYPE vGPU_device_memory_usage_in_bytes gauge"#,
                r#"vGPU_device_memory_usage_in_bytes{podnamespace="ml",podname="train",ctrname="cuda",vdeviceid="1",deviceuuid="GPU-b",zone="vGPU"} 3221225472"#,
                r#"# HELP vGPU_device_memory_limit_in_bytes vGPU device limit."#,
                r#"# TYPE vGPU_device_memory_limit_in_bytes gauge"#,
                r#"vGPU_device_memory_limit_in_bytes{podnamespace="ml",podname="train",ctrname="cuda",vdeviceid="1",deviceuuid="GPU-b",zone="vGPU"} 4294967296"#,
                r#"# HELP Device_memory_desc_of_container Container device meory description."#,
                r#"# TYPE Device_memory_desc_of_container gauge"#,
                r#"Device_memory_desc_of_container{podnamespace="ml",podname="train",ctrname="cuda",vdeviceid="1",deviceuuid="GPU-b",zone="vGPU",context="0",module="0",data="3221225472",offset="0"} 3221225472"#,
                r#"# HELP Device_utilization_desc_of_container Container device utilization description."#,
                r#"# TYPE Device_utilization_desc_of_container gauge"#,
                r#"Device_utilization_desc_of_container{podnamespace="ml",podname="train",ctrname="cuda",vdeviceid="1",deviceuuid="GPU-b",zone="vGPU"} 25"#,
                r#"# HELP Device_last_kernel_of_container Container device last kernel description."#,
                r#"# TYPE Device_last_kernel_of_container gauge"#,
                r#"Device_last_kernel_of_container{podnamespace="ml",podname="train",ctrname="cuda",vdeviceid="1",deviceuuid="GPU-b",zone="vGPU"} 10"#,
            ],
            "{text}"
        );
    }

    #[test]
    fn encodings_at_the_same_time_each_write_their_own_snapshot() {
        let m = Arc::new(AgentMetrics::new("x"));
        let threads: Vec<_> = ["a", "b"]
            .into_iter()
            .map(|pod| {
                let m = Arc::clone(&m);
                std::thread::spawn(move || {
                    let mut s = snapshot();
                    s.containers[0].pod = pod.into();
                    let own = format!("pod=\"{pod}\"");
                    for _ in 0..300 {
                        let text = m.encode(&s).unwrap();
                        let pods = text.matches("pod=\"").count();
                        assert!(pods > 0, "{text}");
                        assert_eq!(text.matches(&own).count(), pods, "{text}");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }
}
