//! What the exporter reads at scrape time on this node: each GPU (and its MIG devices) from NVML and the
//! advertised health, the vGPUs the scheduler has placed on it (from the pods bound here), and every container's
//! use of its GPUs from the shared-region files in the one cache directory the Allocate side creates.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use nvml_wrapper::{Device, Nvml};
use tokio::sync::watch;
use vgpu_metrics::{
    AgentMetrics, ContainerSample, GpuSample, MigDeviceSample, Snapshot, SnapshotSource,
};
use vgpu_region::reader::RegionReader;

use crate::gpu::inventory::Inventory;
use crate::handoff::pod_cache::PodCache;
use crate::monitor::backstop::BackstopView;
use crate::monitor::feedback::{RateLimitedWarnings, RegionDirs, WARN_EVERY};
use crate::volcano::pod_devices::PodDevices;
use crate::volcano::{VGPU_IDS_NEW, VGPU_NODE};

/// The agent's [`SnapshotSource`].
pub struct NodeSnapshot {
    nvml: Arc<Nvml>,
    inventory: Arc<Inventory>,
    health: watch::Receiver<Vec<bool>>,
    pods: Option<(PodCache, String)>,
    regions: Option<Regions>,
    backstop: Option<Arc<BackstopView>>,
}

/// The per-container cache directories (`<pod-uid>_<container>`) and what to do about unreadable ones.
struct Regions {
    root: PathBuf,
    metrics: Arc<AgentMetrics>,
    /// A corrupt file costs one log line every few minutes, not one per scrape.
    warned: Mutex<RateLimitedWarnings>,
    /// Which file each container directory holds, re-listed only when the directory changes.
    dirs: Mutex<RegionDirs>,
}

impl std::fmt::Debug for NodeSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeSnapshot")
            .field("gpus", &self.inventory.gpus.len())
            .finish()
    }
}

impl NodeSnapshot {
    /// `pods` (with the node name) is absent when the agent runs without the Volcano hand-off.
    pub fn new(
        nvml: Arc<Nvml>,
        inventory: Arc<Inventory>,
        health: watch::Receiver<Vec<bool>>,
        pods: Option<(PodCache, String)>,
    ) -> Self {
        Self {
            nvml,
            inventory,
            health,
            pods,
            regions: None,
            backstop: None,
        }
    }

    /// Also reports every container's region found under `cache_root` (needs the pod cache for names).
    pub fn with_regions(mut self, cache_root: PathBuf, metrics: Arc<AgentMetrics>) -> Self {
        self.regions = Some(Regions {
            root: cache_root,
            metrics,
            warned: Mutex::new(RateLimitedWarnings::new(WARN_EVERY)),
            dirs: Mutex::default(),
        });
        self
    }

    /// Also reports what the memory backstop's last round observed through NVML.
    pub fn with_backstop(mut self, view: Arc<BackstopView>) -> Self {
        self.backstop = Some(view);
        self
    }

    /// One sample per container and GPU, for containers whose pod is still on this node; a pod that is gone
    /// has no series.
    fn containers(&self) -> Vec<ContainerSample> {
        let (Some(regions), Some((pods, _))) = (&self.regions, &self.pods) else {
            return Vec::new();
        };
        let by_uid: HashMap<String, (String, String)> = pods
            .cached()
            .iter()
            .filter_map(|p| {
                let m = &p.metadata;
                Some((
                    m.uid.clone()?,
                    (m.namespace.clone().unwrap_or_default(), m.name.clone()?),
                ))
            })
            .collect();
        let mut samples = Vec::new();
        // A panic mid-listing leaves at worst a stale choice for one directory, re-checked when it changes.
        let files: Vec<_> = {
            let mut dirs = regions.dirs.lock().unwrap_or_else(PoisonError::into_inner);
            let files = dirs.files(&regions.root);
            files
                .into_iter()
                .map(|(uid, container, file)| {
                    let record = dirs.record(&uid, &container).cloned();
                    (uid, container, file, record)
                })
                .collect()
        };
        for (uid, container, file, record) in files {
            let Some((namespace, pod)) = by_uid.get(&uid) else {
                continue;
            };
            match RegionReader::read_snapshot(&file) {
                Ok(region) => {
                    // Per process, not per device: the same count on each of the container's GPUs. Saturating:
                    // the words are the container's to write, and a plain sum overflows (a panic in debug).
                    let refused = region
                        .processes
                        .iter()
                        .fold(0u64, |sum, p| sum.saturating_add(p.refused));
                    for device in 0..region.device_num {
                        // The monitors skip a device whose UUID slot is empty or not UTF-8.
                        let Some(uuid) = region.uuid_label(device).map(str::to_owned) else {
                            continue;
                        };
                        // The GPU and the caps come from the node's record where there is one: the region is
                        // the tenant's to write, and a region naming another container's GPU would put this
                        // container's usage on that GPU's dashboards until the next correction.
                        // The label is the UUID's first 40 bytes, as the monitors take it: compared whole
                        // (a region slot holding only "GPU-" must not match every GPU).
                        let recorded = match &record {
                            Some(r) => match r.gpus.iter().find(|g| label_of(&g.uuid) == uuid) {
                                Some(g) => Some((g.memory_limit_bytes, r.sm_limit_percent)),
                                None => continue,
                            },
                            None => None,
                        };
                        let gpu_index = self
                            .inventory
                            .gpus
                            .iter()
                            .position(|g| g.uuid.starts_with(&uuid))
                            .unwrap_or(device) as u32;
                        let usage = region.device_usage(device);
                        samples.push(ContainerSample {
                            namespace: namespace.clone(),
                            pod: pod.clone(),
                            container: container.clone(),
                            gpu_uuid: uuid,
                            gpu_index,
                            memory_used_bytes: usage.total,
                            memory_context_bytes: usage.context,
                            memory_module_bytes: usage.module,
                            memory_data_bytes: usage.data,
                            memory_offset_bytes: usage.offset,
                            memory_limit_bytes: recorded
                                .map_or_else(|| region.limit(device).unwrap_or(0), |r| r.0),
                            sm_utilization_percent: region.device_sm_util(device),
                            sm_limit_percent: recorded
                                .map_or_else(|| region.sm_limit(device).unwrap_or(0), |r| r.1),
                            allocations_refused: refused,
                            last_kernel_unix: region
                                .last_kernel_time
                                .and_then(|t| i64::try_from(t).ok()),
                            priority: region.priority,
                            launches_blocked: region.recent_kernel < 0,
                            sm_limit_enforced: region.utilization_switch == 1,
                        });
                    }
                }
                Err(error) => {
                    regions.metrics.region_read_error();
                    let first = regions
                        .warned
                        .lock()
                        .map(|mut w| w.should_warn(&file, Instant::now()))
                        .unwrap_or(false);
                    if first {
                        tracing::warn!(file = %file.display(), %error, "container region unreadable; skipped");
                    }
                }
            }
        }
        samples
    }

    /// vGPUs per GPU UUID held by pods on this node that are still Pending or Running.
    fn allocated(&self) -> HashMap<String, u64> {
        let mut per_gpu = HashMap::new();
        let Some((pods, node)) = &self.pods else {
            return per_gpu;
        };
        for pod in pods.cached() {
            let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
            if !matches!(phase, Some("Pending" | "Running")) {
                continue;
            }
            let Some(annotations) = pod.metadata.annotations.as_ref() else {
                continue;
            };
            if annotations.get(VGPU_NODE) != Some(node) {
                continue;
            }
            let Some(ids) = annotations.get(VGPU_IDS_NEW) else {
                continue;
            };
            let Ok(devices) = PodDevices::decode(VGPU_IDS_NEW, ids) else {
                continue;
            };
            for device in devices.0.iter().flatten() {
                *per_gpu.entry(device.uuid.clone()).or_insert(0) += 1;
            }
        }
        per_gpu
    }
}

impl SnapshotSource for NodeSnapshot {
    fn snapshot(&self) -> Snapshot {
        let healthy = self.health.borrow().clone();
        let allocated = self.allocated();
        let mut mig_devices = Vec::new();
        let gpus = self
            .inventory
            .gpus
            .iter()
            .enumerate()
            .map(|(i, gpu)| {
                let device = self.nvml.device_by_index(gpu.nvml_index).ok();
                let memory = device.as_ref().and_then(|d| d.memory_info().ok());
                let utilization = device.as_ref().and_then(|d| d.utilization_rates().ok());
                let sample = GpuSample {
                    index: i as u32,
                    uuid: gpu.uuid.clone(),
                    memory_used_bytes: memory.as_ref().map(|m| m.used),
                    memory_total_bytes: gpu.memory_bytes,
                    utilization_percent: utilization.map(|u| u.gpu),
                    healthy: healthy.get(i).copied().unwrap_or(false),
                    vgpus_allocated: allocated.get(&gpu.uuid).copied().unwrap_or(0),
                };
                if let Some(device) = &device {
                    read_mig_devices(device, &sample, &mut mig_devices);
                }
                sample
            })
            .collect();
        let now_unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let (observed, unaccounted) = self
            .backstop
            .as_ref()
            .map(|v| v.samples())
            .unwrap_or_default();
        Snapshot {
            gpus,
            containers: self.containers(),
            observed,
            unaccounted,
            mig_devices,
            now_unix,
        }
    }
}

/// The MIG devices of `gpu` when it is in MIG mode, each with its parent's UUID, index and health; nothing for a
/// GPU without MIG support or with MIG off. Read as the GPU's own values are: what NVML does not answer is
/// absent (a MIG slot without a device is NVML's `NOT_FOUND`, a device without a UUID has no series).
fn read_mig_devices(device: &Device<'_>, gpu: &GpuSample, out: &mut Vec<MigDeviceSample>) {
    if !device.mig_mode().is_ok_and(|mode| mode.current == 1) {
        return;
    }
    for slot in 0..device.mig_device_count().unwrap_or(0) {
        let Ok(mig) = device.mig_device_by_index(slot) else {
            continue;
        };
        let Ok(mig_uuid) = mig.uuid() else {
            continue;
        };
        let memory = mig.memory_info().ok();
        out.push(MigDeviceSample {
            gpu_uuid: gpu.uuid.clone(),
            gpu_index: gpu.index,
            mig_uuid,
            profile: mig.name().map(|n| mig_profile(&n)).unwrap_or_default(),
            memory_used_bytes: memory.as_ref().map(|m| m.used),
            memory_total_bytes: memory.as_ref().map(|m| m.total),
            healthy: gpu.healthy,
        });
    }
}

/// The profile in a MIG device's NVML name (`NVIDIA A100-SXM4-80GB MIG 1g.10gb` → `1g.10gb`); the whole name
/// when it has no ` MIG ` part.
fn mig_profile(name: &str) -> String {
    name.rsplit_once(" MIG ")
        .map_or(name, |(_, profile)| profile)
        .trim()
        .to_owned()
}

/// The monitors' `deviceuuid` label of a UUID: its first 40 bytes (all of a GPU's or a MIG device's UUID).
fn label_of(uuid: &str) -> &str {
    let mut end = uuid.len().min(vgpu_region::layout::UUID_LABEL_LEN);
    while !uuid.is_char_boundary(end) {
        end -= 1;
    }
    &uuid[..end]
}

#[cfg(test)]
mod tests {
    use super::mig_profile;

    #[test]
    fn the_profile_is_what_follows_mig_in_the_name() {
        assert_eq!(mig_profile("NVIDIA A100-SXM4-80GB MIG 1g.10gb"), "1g.10gb");
        assert_eq!(
            mig_profile("NVIDIA H100 80GB HBM3 MIG 1c.3g.40gb"),
            "1c.3g.40gb"
        );
        assert_eq!(mig_profile("odd"), "odd");
    }
}
