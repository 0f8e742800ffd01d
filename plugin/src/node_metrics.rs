//! What the exporter reads at scrape time on this node: each GPU from NVML and the advertised health, and the
//! vGPUs the scheduler has placed on it (from the pods bound here).

use std::collections::HashMap;
use std::sync::Arc;

use nvml_wrapper::Nvml;
use tokio::sync::watch;
use vgpu_metrics::{GpuSample, Snapshot, SnapshotSource};

use crate::inventory::Inventory;
use crate::pod_cache::PodCache;
use crate::volcano::pod_devices::PodDevices;
use crate::volcano::{VGPU_IDS_NEW, VGPU_NODE};

/// The agent's [`SnapshotSource`].
pub struct NodeSnapshot {
    nvml: Arc<Nvml>,
    inventory: Arc<Inventory>,
    health: watch::Receiver<Vec<bool>>,
    pods: Option<(PodCache, String)>,
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
        }
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
        let gpus = self
            .inventory
            .gpus
            .iter()
            .enumerate()
            .map(|(i, gpu)| {
                let device = self.nvml.device_by_index(gpu.nvml_index).ok();
                let memory = device.as_ref().and_then(|d| d.memory_info().ok());
                let utilization = device.as_ref().and_then(|d| d.utilization_rates().ok());
                GpuSample {
                    index: i as u32,
                    uuid: gpu.uuid.clone(),
                    memory_used_bytes: memory.as_ref().map(|m| m.used),
                    memory_total_bytes: gpu.memory_bytes,
                    utilization_percent: utilization.map(|u| u.gpu),
                    healthy: healthy.get(i).copied().unwrap_or(false),
                    vgpus_allocated: allocated.get(&gpu.uuid).copied().unwrap_or(0),
                }
            })
            .collect();
        let now_unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        // Per-container series come from the containers' shared regions, read once the limiter writes them.
        Snapshot {
            gpus,
            containers: Vec::new(),
            now_unix,
        }
    }
}
