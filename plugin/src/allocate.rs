//! The Volcano hand-off: turning the kubelet's `Allocate` (device IDs only, no pod, no container) into the
//! scheduler's placement for one container, and that placement into the limiter's environment and mounts.
//!
//! One call at a time (a mutex shared by the number and memory endpoints): find the pending pod whose next
//! container the request fits (`volcano::selection`), take that container's segment off
//! `volcano.sh/devices-to-allocate` with a JSON patch guarded by a `test` of the old value (so a concurrent
//! writer makes us fail loudly rather than hand out a segment twice; the patch that empties the queue also
//! marks the pod `success`), read the result back from the patch response, and answer with
//! `volcano::allocate_env`. Any failure after a pod was chosen marks it `failed`, records a Kubernetes Event on
//! it, and answers the kubelet with an error naming the pod and the cause.

use std::collections::HashSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, ObjectReference, Pod};
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Api, Client};
use kubelet_api::v1beta1::{ContainerAllocateResponse, ContainerPreferredAllocationRequest};
use tokio::sync::Mutex;
use vgpu_metrics::AgentMetrics;

use crate::device_config::VolcanoConfig;
use crate::devices::{DevicePlan, ResourceKind};
use crate::inventory::Inventory;
use crate::node_annotations::release_node_lock;
use crate::pod_cache::{PodCache, pod_view};
use crate::volcano::allocate_env::{
    Handoff, LimiterSettings, cache_dir_name, container_response, new_cache_file,
};
use crate::volcano::selection::{
    AllocatingEndpoint, Assignment, PodView, malformed_pods, matches, next_assignment,
    select_pending_pod,
};
use crate::volcano::{
    BIND_PHASE, DEVICES_TO_ALLOCATE, PHASE_FAILED, PHASE_SUCCESS, VGPU_TIME, VGPU_TIME_DONE,
};

/// How long one apiserver call of the hand-off may take. The kubelet waits for Allocate without a deadline and
/// calls are serialized, so a hung apiserver must not hold every later container hostage.
pub const API_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Runs one apiserver call under [`API_TIMEOUT`].
async fn bounded<T>(
    what: &str,
    call: impl std::future::Future<Output = Result<T, kube::Error>>,
) -> Result<T, String> {
    match tokio::time::timeout(API_TIMEOUT, call).await {
        Ok(result) => result.map_err(|e| format!("{what}: {e}")),
        Err(_) => Err(format!(
            "{what}: no answer from the apiserver within {API_TIMEOUT:?}"
        )),
    }
}

/// What an Allocate call resolved to.
#[derive(Debug)]
pub enum Outcome {
    /// This container's devices and limiter environment.
    Handoff(ContainerAllocateResponse),
    /// A memory-endpoint call for a container whose hand-off the number endpoint does: empty response.
    NotMine,
}

/// Why an Allocate failed. The message goes to the kubelet, which shows it on the pod.
#[derive(Debug, thiserror::Error)]
pub enum AllocateError {
    /// No pending pod matches.
    #[error(
        "no pending pod bound to node {node} is waiting for a container with {size} {what} (volcano.sh/vgpu-node = \
         {node}, volcano.sh/bind-phase = allocating, next segment of volcano.sh/devices-to-allocate of that size); \
         is deviceshare.VGPUEnable set in the Volcano scheduler?"
    )]
    NoPendingPod {
        /// This node.
        node: String,
        /// The kubelet's request size.
        size: usize,
        /// "vGPU(s)" or "memory units (memory-only container)".
        what: &'static str,
    },
    /// The apiserver could not be asked.
    #[error("cannot read the pods of node {node} from the apiserver: {source}")]
    Unreachable {
        /// This node.
        node: String,
        /// The client error.
        #[source]
        source: kube::Error,
    },
    /// The apiserver did not answer in time; nothing was changed.
    #[error(
        "the apiserver did not answer within {API_TIMEOUT:?} while looking for the pod on node {node}"
    )]
    TimedOut {
        /// This node.
        node: String,
    },
    /// A pod was chosen and the hand-off failed.
    #[error("pod {namespace}/{name}: {cause}")]
    Pod {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
        /// What went wrong.
        cause: String,
    },
}

/// The hand-off machinery, shared by the endpoints.
pub struct Allocator {
    node: String,
    client: Client,
    pods: PodCache,
    nodes: Api<Node>,
    config: Arc<VolcanoConfig>,
    limiter: LimiterSettings,
    cache_root: PathBuf,
    inventory: Arc<Inventory>,
    recorder: Recorder,
    serial: Mutex<()>,
    metrics: Arc<AgentMetrics>,
}

impl std::fmt::Debug for Allocator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Allocator")
            .field("node", &self.node)
            .field("cache_root", &self.cache_root)
            .finish()
    }
}

/// How the hand-off is configured.
#[derive(Debug, Clone)]
pub struct HandoffSettings {
    /// The merged Volcano configuration (resource names among others).
    pub config: Arc<VolcanoConfig>,
    /// What goes into each container's environment and mounts.
    pub limiter: LimiterSettings,
    /// The one host directory holding the per-container caches.
    pub cache_root: PathBuf,
}

impl Allocator {
    /// Everything the hand-off needs.
    pub fn new(
        client: Client,
        node: &str,
        pods: PodCache,
        settings: HandoffSettings,
        inventory: Arc<Inventory>,
        metrics: Arc<AgentMetrics>,
    ) -> Self {
        let HandoffSettings {
            config,
            limiter,
            cache_root,
        } = settings;
        let reporter = Reporter {
            controller: "vgpu-device-plugin".into(),
            instance: Some(node.to_owned()),
        };
        Self {
            node: node.to_owned(),
            nodes: Api::all(client.clone()),
            recorder: Recorder::new(client.clone(), reporter),
            client,
            pods,
            config,
            limiter,
            cache_root,
            inventory,
            serial: Mutex::new(()),
            metrics,
        }
    }

    async fn release_lock(&self) {
        if release_node_lock(&self.nodes, &self.node).await {
            self.metrics.node_write();
        }
    }

    /// Finds the pending pod a request of `size` fits, from the watch cache, then from a direct read.
    async fn find(
        &self,
        endpoint: AllocatingEndpoint,
        size: usize,
    ) -> Result<Option<PodView>, AllocateError> {
        let names = &self.config.resources;
        let cached: Vec<PodView> = self
            .pods
            .cached()
            .iter()
            .map(|p| pod_view(p, names))
            .collect();
        if let Some(i) = select_pending_pod(&cached, &self.node, endpoint, size) {
            // The watch may lag behind our own last patch (the kubelet allocates a pod's next container
            // milliseconds after the previous one), so the chosen pod is read fresh before it is trusted.
            let candidate = &cached[i];
            let pods: Api<Pod> = Api::namespaced(self.client.clone(), &candidate.namespace);
            match pods.get_opt(&candidate.name).await {
                Ok(Some(fresh)) => {
                    let fresh = pod_view(&fresh, names);
                    if matches(&fresh, &self.node, endpoint, size) {
                        return Ok(Some(fresh));
                    }
                }
                Ok(None) => {}
                Err(source) => {
                    return Err(AllocateError::Unreachable {
                        node: self.node.clone(),
                        source,
                    });
                }
            }
        }
        let listed =
            self.pods
                .list_direct()
                .await
                .map_err(|source| AllocateError::Unreachable {
                    node: self.node.clone(),
                    source,
                })?;
        let views: Vec<PodView> = listed.iter().map(|p| pod_view(p, names)).collect();
        if let Some(i) = select_pending_pod(&views, &self.node, endpoint, size) {
            return Ok(Some(views[i].clone()));
        }
        // A pod waiting here whose annotations cannot be read can never be allocated: fail it now, with the
        // reason on the pod, rather than leave it stuck in `allocating` behind a generic kubelet error.
        for (i, error) in malformed_pods(&views, &self.node) {
            let _ = self.fail(&views[i], error.to_string()).await;
        }
        Ok(None)
    }

    /// [`Self::find`] under [`API_TIMEOUT`]: both callers hold the serial lock while it runs.
    async fn find_bounded(
        &self,
        endpoint: AllocatingEndpoint,
        size: usize,
    ) -> Result<Option<PodView>, AllocateError> {
        tokio::time::timeout(API_TIMEOUT, self.find(endpoint, size))
            .await
            .map_err(|_| AllocateError::TimedOut {
                node: self.node.clone(),
            })?
    }

    /// Allocates one container.
    pub async fn allocate(
        &self,
        endpoint: AllocatingEndpoint,
        size: usize,
    ) -> Result<Outcome, AllocateError> {
        let _one_at_a_time = self.serial.lock().await;
        let Some(pod) = self.find_bounded(endpoint, size).await? else {
            if endpoint == AllocatingEndpoint::Memory {
                return Ok(Outcome::NotMine);
            }
            self.release_lock().await;
            return Err(AllocateError::NoPendingPod {
                node: self.node.clone(),
                size,
                what: "vGPU(s)",
            });
        };
        let assignment = match next_assignment(&pod) {
            Ok(Some(a)) => a,
            Ok(None) => {
                return Err(self
                    .fail(
                        &pod,
                        "nothing left in volcano.sh/devices-to-allocate".into(),
                    )
                    .await);
            }
            Err(error) => return Err(self.fail(&pod, error.to_string()).await),
        };
        match self.hand_off(&pod, &assignment).await {
            Ok(response) => Ok(Outcome::Handoff(response)),
            Err(cause) => Err(self.fail(&pod, cause).await),
        }
    }

    async fn hand_off(
        &self,
        pod: &PodView,
        a: &Assignment,
    ) -> Result<ContainerAllocateResponse, String> {
        let container = pod
            .containers
            .get(a.container)
            .ok_or("segment maps to no container")?;
        let cache_host_dir = self
            .cache_root
            .join(cache_dir_name(&pod.uid, &container.name));
        prepare_cache_dir(&cache_host_dir)?;

        let old = pod
            .annotations
            .get(DEVICES_TO_ALLOCATE)
            .cloned()
            .unwrap_or_default();
        let (devices, queue) = (&a.devices, &a.rest);
        // A GPU this node does not serve would reach the container as an unknown UUID, an unresolvable CDI
        // name or a missing device node: refuse it here, with the reason on the pod.
        if let Some(unknown) = devices
            .iter()
            .find(|d| !self.inventory.gpus.iter().any(|g| g.uuid == d.uuid))
        {
            return Err(format!(
                "{DEVICES_TO_ALLOCATE} assigns GPU {} to container {}, but this node serves no such GPU",
                unknown.uuid, container.name
            ));
        }
        let new = queue.encode();
        let done = queue.remaining() == 0;
        let pointer = |key: &str| {
            format!(
                "/metadata/annotations/{}",
                key.replace('~', "~0").replace('/', "~1")
            )
        };
        let path = pointer(DEVICES_TO_ALLOCATE);
        let mut ops = vec![
            serde_json::json!({ "op": "test", "path": path, "value": old }),
            serde_json::json!({ "op": "replace", "path": path, "value": new }),
        ];
        // The last container also marks the pod done, in the same patch: one round-trip, and no window in
        // which the queue is empty but the pod still reads `allocating`.
        if done {
            for (key, value) in [(BIND_PHASE, PHASE_SUCCESS), (VGPU_TIME, VGPU_TIME_DONE)] {
                ops.push(serde_json::json!({ "op": "add", "path": pointer(key), "value": value }));
            }
        }
        let patch: json_patch::Patch = serde_json::from_value(serde_json::Value::Array(ops))
            .map_err(|e| format!("building the patch: {e}"))?;
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &pod.namespace);
        let updated = bounded(
            &format!("cannot advance {DEVICES_TO_ALLOCATE} from {old:?} to {new:?}"),
            pods.patch(
                &pod.name,
                &PatchParams::default(),
                &Patch::<()>::Json(patch),
            ),
        )
        .await?;
        let annotations = updated.metadata.annotations.unwrap_or_default();
        let read_back = annotations.get(DEVICES_TO_ALLOCATE);
        if read_back != Some(&new) {
            return Err(format!(
                "{DEVICES_TO_ALLOCATE} reads back as {read_back:?}, not {new:?}"
            ));
        }
        if done {
            if annotations.get(BIND_PHASE).map(String::as_str) != Some(PHASE_SUCCESS)
                || annotations.get(VGPU_TIME).map(String::as_str) != Some(VGPU_TIME_DONE)
            {
                return Err(format!(
                    "{BIND_PHASE}/{VGPU_TIME} did not read back as {PHASE_SUCCESS}/{VGPU_TIME_DONE}"
                ));
            }
            self.release_lock().await;
        }
        let response = container_response(
            &self.limiter,
            &Handoff {
                devices,
                cache_host_dir,
                cache_file: new_cache_file(),
                disable_control: container.disable_control,
            },
        );
        tracing::info!(
            pod = %format!("{}/{}", pod.namespace, pod.name), container = %container.name,
            devices = ?devices.iter().map(|d| d.uuid.as_str()).collect::<Vec<_>>(), left = queue.remaining(),
            "container handed its vGPUs"
        );
        Ok(response)
    }

    /// Marks the pod failed, records why on it, releases the node lock; returns the error for the kubelet.
    async fn fail(&self, pod: &PodView, cause: String) -> AllocateError {
        tracing::error!(pod = %format!("{}/{}", pod.namespace, pod.name), %cause, "vGPU allocation failed");
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &pod.namespace);
        let body = serde_json::json!({ "metadata": { "annotations": { BIND_PHASE: PHASE_FAILED, VGPU_TIME: VGPU_TIME_DONE } } });
        if let Err(error) = bounded(
            "patch",
            pods.patch(&pod.name, &PatchParams::default(), &Patch::Merge(&body)),
        )
        .await
        {
            tracing::warn!(%error, "cannot mark the pod {BIND_PHASE}={PHASE_FAILED}");
        }
        let reference = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            namespace: Some(pod.namespace.clone()),
            name: Some(pod.name.clone()),
            uid: Some(pod.uid.clone()).filter(|u| !u.is_empty()),
            ..Default::default()
        };
        let event = Event {
            type_: EventType::Warning,
            reason: "VGPUAllocateFailed".into(),
            note: Some(truncate(&cause, 1000)),
            action: "Allocate".into(),
            secondary: None,
        };
        if let Err(error) = self.recorder.publish(&event, &reference).await {
            tracing::warn!(%error, "cannot record the failure as an event");
        }
        self.release_lock().await;
        AllocateError::Pod {
            namespace: pod.namespace.clone(),
            name: pod.name.clone(),
            cause,
        }
    }

    /// `GetPreferredAllocation`: the IDs of the GPUs the scheduler assigned to the pending container, so the
    /// kubelet's device IDs (and the PodResources API) match the real placement. Reads only; falls back to the
    /// kubelet's own choice (must-include first, then available in order) when no pending pod fits.
    pub async fn preferred(
        &self,
        endpoint: AllocatingEndpoint,
        plan: &DevicePlan,
        request: &ContainerPreferredAllocationRequest,
    ) -> Vec<String> {
        let size = usize::try_from(request.allocation_size).unwrap_or(0);
        let assigned = {
            let _one_at_a_time = self.serial.lock().await;
            match self.find_bounded(endpoint, size).await {
                Ok(Some(pod)) => next_assignment(&pod).ok().flatten(),
                _ => None,
            }
        };
        let uuids: Vec<&str> = assigned
            .as_ref()
            .map(|a| a.devices.iter().map(|d| d.uuid.as_str()).collect())
            .unwrap_or_default();
        prefer(&self.inventory, plan, request, &uuids)
    }
}

/// Chooses `allocation_size` IDs: the must-include ones, then one available ID per assigned GPU in order
/// (number resource) or all from the assigned GPU (memory resource), then any available ones. Linear in the
/// number of available IDs (a memory endpoint offers tens of thousands).
pub fn prefer(
    inventory: &Inventory,
    plan: &DevicePlan,
    request: &ContainerPreferredAllocationRequest,
    assigned: &[&str],
) -> Vec<String> {
    let size = usize::try_from(request.allocation_size).unwrap_or(0);
    let mut chosen: Vec<String> = Vec::with_capacity(size);
    let mut taken: HashSet<String> = HashSet::with_capacity(size);
    let mut push = |chosen: &mut Vec<String>, id: &str| {
        if chosen.len() < size && !taken.contains(id) {
            taken.insert(id.to_owned());
            chosen.push(id.to_owned());
        }
    };
    for id in &request.must_include_device_i_ds {
        push(&mut chosen, id);
    }
    let gpu_of = |id: &str| {
        plan.gpu_of(inventory, id)
            .map(|g| inventory.gpus[g].uuid.as_str())
    };
    match plan.kind {
        ResourceKind::Number => {
            for uuid in assigned {
                if chosen.iter().any(|id| gpu_of(id) == Some(uuid)) {
                    continue;
                }
                if let Some(id) = request
                    .available_device_i_ds
                    .iter()
                    .find(|id| gpu_of(id) == Some(uuid))
                {
                    push(&mut chosen, id);
                }
            }
        }
        ResourceKind::Memory | ResourceKind::Cores => {
            if let Some(uuid) = assigned.first() {
                for id in &request.available_device_i_ds {
                    if chosen.len() >= size {
                        break;
                    }
                    if gpu_of(id) == Some(uuid) {
                        push(&mut chosen, id);
                    }
                }
            }
        }
    }
    for id in &request.available_device_i_ds {
        if chosen.len() >= size {
            break;
        }
        push(&mut chosen, id);
    }
    chosen
}

/// Creates the per-container cache directory (0777, like HAMi-core expects) if it is not there. It is never
/// emptied or removed here: a running container of the same pod may have it mounted (the Go plugin's
/// `RemoveAll` left stale bind mounts); each Allocate draws a fresh cache file name inside it instead.
fn prepare_cache_dir(dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir)
        .map_err(|e| format!("cannot create the cache directory {}: {e}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777))
        .map_err(|e| format!("cannot open up the cache directory {}: {e}", dir.display()))
}

fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}
