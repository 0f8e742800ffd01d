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
//!
//! The pod chosen is the first in the serving order that may be the one the kubelet is admitting, **usable or
//! not** (`volcano::selection::choose`): a pod whose annotations cannot be served is failed with this call,
//! never skipped for the next pod, whose GPUs would then start in the wrong pod. Only the pod search, the
//! guarded patch and the `failed` mark run under the lock, each bounded; Events and the scheduler's node-lock
//! release follow off the lock, and [`Allocator::drain`] waits for all of it when the agent stops.

use std::collections::HashSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use k8s_openapi::api::core::v1::{Node, ObjectReference, Pod};
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Api, Client};
use kubelet_api::v1beta1::{ContainerAllocateResponse, ContainerPreferredAllocationRequest};
use tokio::sync::Mutex;
use tokio::task::JoinSet;
use vgpu_metrics::AgentMetrics;

use crate::config::ResourceKind;
use crate::config::device::VolcanoConfig;
use crate::container::response::{
    Handoff, LimiterSettings, cache_dir_name, container_response, new_cache_file,
};
use crate::gpu::inventory::Inventory;
use crate::gpu::plan::{DevicePlan, device_id};
use crate::handoff::node_annotations::release_node_lock;
use crate::handoff::pod_cache::{PodCache, pod_view};
use crate::handoff::selection::{
    AllocatingEndpoint, Assignment, GpuFacts, PodView, Request, Verdict, choose,
};
use crate::volcano::{
    BIND_PHASE, DEVICES_TO_ALLOCATE, PHASE_ALLOCATING, PHASE_FAILED, PHASE_SUCCESS, VGPU_NODE,
    VGPU_TIME, VGPU_TIME_DONE,
};

/// How long one apiserver call of the hand-off may take. The kubelet waits for Allocate without a deadline and
/// calls are serialized, so a hung apiserver must not hold every later container hostage.
///
/// Under the Allocate lock there are at most three such calls one after the other (the pod search, which is
/// bounded as a whole, the guarded patch, and the `failed` mark), so one call holds the lock for at most
/// 3 × this. Events and the node-lock release run after the lock is let go, each bounded the same way.
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
    /// The agent is stopping and takes no new allocation; nothing was changed.
    #[error(
        "the vGPU agent on node {node} is stopping and hands out no more devices; the kubelet retries with the next \
         agent"
    )]
    Stopping {
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
    /// Set by [`Allocator::drain`]: later calls are refused without touching any pod.
    draining: AtomicBool,
    /// Work that follows a hand-off but need not hold the lock (Events, the node-lock release).
    after: std::sync::Mutex<JoinSet<()>>,
    /// Memory calls of count containers, owed or already answered; only touched under `serial`.
    memory_calls: std::sync::Mutex<MemoryCalls>,
}

/// The memory-endpoint calls of containers the number endpoint serves.
///
/// The kubelet calls both endpoints for a container with a `vgpu-number` and a `vgpu-memory` limit, in no fixed
/// order (it walks the container's limits map), and allocates a pod's containers one after the other. Once the
/// number call has handed a container off, the pod's queue points at its next container, so the memory call
/// still to come for the container just served would look like the next container's if that one is
/// memory-only with the same size. So each such memory call is remembered: answered before the number call,
/// or owed after it; an owed call is answered empty when it comes.
#[derive(Debug, Default)]
struct MemoryCalls {
    entries: Vec<MemoryCall>,
}

#[derive(Debug)]
struct MemoryCall {
    uid: String,
    container: usize,
    size: usize,
    /// True: the number call came first and this memory call is still to come.
    owed: bool,
    at: std::time::Instant,
}

impl MemoryCalls {
    /// A call is answered within milliseconds of its container's other call; entries older than this belong to
    /// an admission the kubelet gave up on.
    const KEEP: std::time::Duration = std::time::Duration::from_secs(600);
    const MOST: usize = 256;

    fn expire(&mut self) {
        let now = std::time::Instant::now();
        self.entries
            .retain(|e| now.saturating_duration_since(e.at) < Self::KEEP);
        if self.entries.len() > Self::MOST {
            let extra = self.entries.len() - Self::MOST;
            self.entries.drain(..extra);
        }
    }

    /// The memory call of `container` was answered empty before its number call.
    fn answered(&mut self, uid: &str, container: usize, size: usize) {
        self.expire();
        self.entries.push(MemoryCall {
            uid: uid.to_owned(),
            container,
            size,
            owed: false,
            at: std::time::Instant::now(),
        });
    }

    /// The number endpoint handed `container` off; `memory` is its `vgpu-memory` limit.
    fn handed_off(&mut self, uid: &str, container: usize, memory: Option<u64>) {
        self.expire();
        let Some(size) = memory
            .filter(|&m| m > 0)
            .and_then(|m| usize::try_from(m).ok())
        else {
            return;
        };
        let answered = self
            .entries
            .iter()
            .position(|e| !e.owed && e.uid == uid && e.container == container);
        match answered {
            Some(i) => {
                self.entries.remove(i);
            }
            None => self.entries.push(MemoryCall {
                uid: uid.to_owned(),
                container,
                size,
                owed: true,
                at: std::time::Instant::now(),
            }),
        }
    }

    /// Whether a memory call of `size` is one still owed (and so answered empty); consumes it.
    fn take_owed(&mut self, size: usize) -> bool {
        self.expire();
        match self.entries.iter().position(|e| e.owed && e.size == size) {
            Some(i) => {
                self.entries.remove(i);
                true
            }
            None => false,
        }
    }
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
            draining: AtomicBool::new(false),
            after: std::sync::Mutex::new(JoinSet::new()),
            memory_calls: std::sync::Mutex::new(MemoryCalls::default()),
        }
    }

    /// For a stop (SIGTERM): refuses every later Allocate and `GetPreferredAllocation` lookup, waits for the one
    /// in flight (so the kubelet's answer and the pod's annotations agree) and for the Events and node-lock
    /// releases it queued, all within `bound`. Returns whether everything finished in time.
    pub async fn drain(&self, bound: std::time::Duration) -> bool {
        self.draining.store(true, Ordering::SeqCst);
        let deadline = tokio::time::Instant::now() + bound;
        // Taking the lock waits for the call in flight; it is bounded by 3 × API_TIMEOUT anyway.
        let Ok(_in_flight_done) = tokio::time::timeout_at(deadline, self.serial.lock()).await
        else {
            return false;
        };
        let mut after = match self.after.lock() {
            Ok(mut set) => std::mem::take(&mut *set),
            Err(poisoned) => std::mem::take(&mut *poisoned.into_inner()),
        };
        tokio::time::timeout_at(deadline, async {
            while after.join_next().await.is_some() {}
        })
        .await
        .is_ok()
    }

    /// Runs `work` off the Allocate lock, bounded by [`API_TIMEOUT`], and keeps it where [`Self::drain`] can
    /// wait for it.
    fn after_lock(
        &self,
        what: &'static str,
        work: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        let bounded = async move {
            if tokio::time::timeout(API_TIMEOUT, work).await.is_err() {
                tracing::warn!(
                    "{what}: no answer from the apiserver within {API_TIMEOUT:?}; given up"
                );
            }
        };
        let mut set = match self.after.lock() {
            Ok(set) => set,
            Err(poisoned) => poisoned.into_inner(),
        };
        // Reap what already finished so the set holds only work in flight.
        while set.try_join_next().is_some() {}
        set.spawn(bounded);
    }

    /// Releases the scheduler's node lock, off the Allocate lock (it only has to go eventually: a lock
    /// nobody releases expires after 5 minutes).
    fn release_lock(&self) {
        let nodes = self.nodes.clone();
        let node = self.node.clone();
        let metrics = Arc::clone(&self.metrics);
        self.after_lock("releasing the node lock", async move {
            if release_node_lock(&nodes, &node).await {
                metrics.node_write();
            }
        });
    }

    fn memory_calls(&self) -> std::sync::MutexGuard<'_, MemoryCalls> {
        self.memory_calls
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// This node's GPUs as the checks need them, with their current health (inventory order).
    fn gpu_facts(&self, healthy: &[bool]) -> Vec<GpuFacts> {
        self.inventory
            .gpus
            .iter()
            .enumerate()
            .map(|(i, gpu)| GpuFacts {
                uuid: gpu.uuid.clone(),
                // A GPU the health channel says nothing about is not vouched for.
                healthy: healthy.get(i).copied().unwrap_or(false),
                memory_units: self.config.sharing.memory_units(gpu.memory_mib()),
            })
            .collect()
    }

    /// Finds the pod a request is for, from the watch cache, then from a direct read; see
    /// [`crate::handoff::selection::choose`].
    async fn find(
        &self,
        request: Request,
        gpus: &[GpuFacts],
    ) -> Result<Option<(PodView, Verdict)>, AllocateError> {
        let names = &self.config.resources;
        // Only pods still waiting for this node can be chosen: most of the node's pods are long done, and
        // building the view of each would cost more than the rest of the search.
        let cached: Vec<PodView> = self
            .pods
            .cached()
            .iter()
            .filter(|p| waiting_here(p, &self.node))
            .map(|p| pod_view(p, names))
            .collect();
        if let Some(choice) = choose(&cached, &self.node, Some(gpus), request) {
            // The watch may lag behind our own last patch (the kubelet allocates a pod's next container
            // milliseconds after the previous one), so the chosen pod, usable or not, is read fresh and judged
            // again before anything is handed out or failed.
            let candidate = &cached[choice.index];
            let pods: Api<Pod> = Api::namespaced(self.client.clone(), &candidate.namespace);
            match pods.get_opt(&candidate.name).await {
                Ok(Some(fresh)) => {
                    let fresh = pod_view(&fresh, names);
                    if let Some(choice) = choose(
                        std::slice::from_ref(&fresh),
                        &self.node,
                        Some(gpus),
                        request,
                    ) {
                        return Ok(Some((fresh, choice.verdict)));
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
        let views: Vec<PodView> = listed
            .iter()
            .filter(|p| waiting_here(p, &self.node))
            .map(|p| pod_view(p, names))
            .collect();
        Ok(choose(&views, &self.node, Some(gpus), request)
            .map(|choice| (views[choice.index].clone(), choice.verdict)))
    }

    /// [`Self::find`] under [`API_TIMEOUT`]: both callers hold the serial lock while it runs.
    async fn find_bounded(
        &self,
        request: Request,
        gpus: &[GpuFacts],
    ) -> Result<Option<(PodView, Verdict)>, AllocateError> {
        tokio::time::timeout(API_TIMEOUT, self.find(request, gpus))
            .await
            .map_err(|_| AllocateError::TimedOut {
                node: self.node.clone(),
            })?
    }

    /// Allocates one container; `healthy` is the agent's current health of each GPU (inventory order).
    pub async fn allocate(
        &self,
        endpoint: AllocatingEndpoint,
        size: usize,
        healthy: &[bool],
    ) -> Result<Outcome, AllocateError> {
        let _one_at_a_time = self.serial.lock().await;
        if self.draining.load(Ordering::SeqCst) {
            return Err(AllocateError::Stopping {
                node: self.node.clone(),
            });
        }
        if endpoint == AllocatingEndpoint::Memory && self.memory_calls().take_owed(size) {
            return Ok(Outcome::NotMine);
        }
        let gpus = self.gpu_facts(healthy);
        let request = Request { endpoint, size };
        let Some((pod, verdict)) = self.find_bounded(request, &gpus).await? else {
            if endpoint == AllocatingEndpoint::Memory {
                return Ok(Outcome::NotMine);
            }
            self.release_lock();
            return Err(AllocateError::NoPendingPod {
                node: self.node.clone(),
                size,
                what: "vGPU(s)",
            });
        };
        let assignment = match verdict {
            Verdict::Ready(assignment) => assignment,
            Verdict::Unusable(cause) => return Err(self.fail(&pod, cause).await),
            Verdict::NotMine(container) => {
                self.memory_calls().answered(&pod.uid, container, size);
                return Ok(Outcome::NotMine);
            }
        };
        match self.hand_off(&pod, &assignment).await {
            Ok(response) => {
                if endpoint == AllocatingEndpoint::Number {
                    let memory = pod
                        .containers
                        .get(assignment.container)
                        .and_then(|c| c.memory);
                    self.memory_calls()
                        .handed_off(&pod.uid, assignment.container, memory);
                }
                Ok(Outcome::Handoff(response))
            }
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
        // Unknown, unhealthy and duplicate GPUs and impossible sizes were refused by `choose`.
        let (devices, queue) = (&a.devices, &a.rest);
        // The node's record of this container's limits, written before the hand-off is committed (see
        // `node_record`): the monitor restores the region from it, so a tenant cannot lift its caps.
        let cache_file = new_cache_file();
        crate::handoff::record::record_allocation(
            &self.cache_root,
            pod,
            &container.name,
            devices,
            self.limiter.memory_factor,
            &cache_file,
        )?;
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
            self.release_lock();
        }
        let response = container_response(
            &self.limiter,
            &Handoff {
                devices,
                cache_host_dir,
                cache_file,
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

    /// Marks the pod failed (under the lock, so the next call no longer sees it `allocating`), then records why
    /// on it as an Event and releases the node lock off the lock; returns the error for the kubelet, which
    /// names the pod and the cause.
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
        let recorder = self.recorder.clone();
        self.after_lock("recording the failure as an event", async move {
            if let Err(error) = recorder.publish(&event, &reference).await {
                tracing::warn!(%error, "cannot record the failure as an event");
            }
        });
        self.release_lock();
        AllocateError::Pod {
            namespace: pod.namespace.clone(),
            name: pod.name.clone(),
            cause,
        }
    }

    /// `GetPreferredAllocation`: the IDs of the GPUs the scheduler assigned to the pending container, so the
    /// kubelet's device IDs (and the PodResources API) match the real placement. Reads only; falls back to the
    /// kubelet's own choice (must-include first, then available in order) when no pending pod fits. The
    /// request must have passed [`validate_preferred`].
    pub async fn preferred(
        &self,
        endpoint: AllocatingEndpoint,
        plan: &DevicePlan,
        request: &ContainerPreferredAllocationRequest,
        healthy: &[bool],
    ) -> Vec<String> {
        let size = usize::try_from(request.allocation_size).unwrap_or(0);
        let assigned = {
            let _one_at_a_time = self.serial.lock().await;
            if self.draining.load(Ordering::SeqCst) {
                None
            } else {
                let gpus = self.gpu_facts(healthy);
                match self.find_bounded(Request { endpoint, size }, &gpus).await {
                    Ok(Some((_, Verdict::Ready(a)))) => Some(a),
                    _ => None,
                }
            }
        };
        let uuids: Vec<&str> = assigned
            .as_ref()
            .map(|a| a.devices.iter().map(|d| d.uuid.as_str()).collect())
            .unwrap_or_default();
        prefer(&self.inventory, plan, request, &uuids)
    }
}

/// The cheap part of [`choose`]'s candidate test, on the raw pod: the scheduler bound it to `node` and it is
/// still `allocating`.
fn waiting_here(pod: &Pod, node: &str) -> bool {
    pod.metadata.annotations.as_ref().is_some_and(|a| {
        a.get(VGPU_NODE).map(String::as_str) == Some(node)
            && a.get(BIND_PHASE).map(String::as_str) == Some(PHASE_ALLOCATING)
    })
}

/// The most device IDs one request may name: what the kubelet's 4 MiB message could carry is far more than
/// any node has, so the real bound is the resource's own count (checked too).
const MAX_IDS: usize = 1 << 20;

/// Checks a `GetPreferredAllocation` container request against what this resource has, before anything is
/// allocated for it: `allocation_size` from 0 to the number of available IDs, available and must-include IDs
/// known to this resource and each named once, must-include a subset of available and no more than the size.
pub fn validate_preferred(
    inventory: &Inventory,
    plan: &DevicePlan,
    request: &ContainerPreferredAllocationRequest,
) -> Result<(), String> {
    let available = &request.available_device_i_ds;
    validate_ids("available_device_i_ds", inventory, plan, available)?;
    validate_ids(
        "must_include_device_i_ds",
        inventory,
        plan,
        &request.must_include_device_i_ds,
    )?;
    let size = request.allocation_size;
    let fits = usize::try_from(size).is_ok_and(|s| s <= available.len());
    if !fits {
        return Err(format!(
            "allocation_size {size} is not a number from 0 to {}, the count of available_device_i_ds",
            available.len()
        ));
    }
    let offered: HashSet<&str> = available.iter().map(String::as_str).collect();
    if let Some(id) = request
        .must_include_device_i_ds
        .iter()
        .find(|id| !offered.contains(id.as_str()))
    {
        return Err(format!(
            "must_include_device_i_ds {id:?} is not one of available_device_i_ds"
        ));
    }
    if request.must_include_device_i_ds.len() > available.len().min(size as usize) {
        return Err(format!(
            "must_include_device_i_ds ({} IDs) is not at most allocation_size {size}",
            request.must_include_device_i_ds.len()
        ));
    }
    Ok(())
}

/// Checks the device IDs of an `Allocate` container request: at least one, each an ID this resource
/// advertises, each once, no more than it has.
pub fn validate_allocate(
    inventory: &Inventory,
    plan: &DevicePlan,
    ids: &[String],
) -> Result<(), String> {
    if ids.is_empty() {
        return Err(
            "devices_ids is empty, not at least one ID this resource advertises".to_owned(),
        );
    }
    validate_ids("devices_ids", inventory, plan, ids)
}

fn validate_ids(
    field: &str,
    inventory: &Inventory,
    plan: &DevicePlan,
    ids: &[String],
) -> Result<(), String> {
    let most = usize::try_from(plan.total())
        .unwrap_or(usize::MAX)
        .min(MAX_IDS);
    if ids.len() > most {
        return Err(format!(
            "{field} names {} IDs, not at most {most}, the IDs this resource advertises",
            ids.len()
        ));
    }
    let prefixes = id_prefixes(inventory, plan);
    let mut seen: HashSet<&str> = HashSet::with_capacity(ids.len());
    for id in ids {
        if !seen.insert(id) {
            return Err(format!(
                "{field} names {:?} twice, not each ID once",
                truncate(id, 100)
            ));
        }
        if !is_advertised(&prefixes, id) {
            return Err(format!(
                "{field} names {:?}, not an ID this resource advertises",
                truncate(id, 100)
            ));
        }
    }
    Ok(())
}

/// Per GPU, the spelling of its IDs without the index ([`device_id`] of index 0 without the `0`), and how many
/// it has.
fn id_prefixes(inventory: &Inventory, plan: &DevicePlan) -> Vec<(String, u64)> {
    inventory
        .gpus
        .iter()
        .zip(&plan.per_gpu)
        .filter_map(|(gpu, &count)| {
            let first = device_id(plan.kind, plan.style, gpu, 0);
            Some((first.strip_suffix('0')?.to_owned(), count))
        })
        .collect()
}

/// Whether `id` is exactly one of the advertised IDs: a GPU's prefix and a canonical index below its count.
fn is_advertised(prefixes: &[(String, u64)], id: &str) -> bool {
    prefixes.iter().any(|(prefix, count)| {
        id.strip_prefix(prefix.as_str()).is_some_and(|index| {
            let canonical = !index.is_empty()
                && index.bytes().all(|b| b.is_ascii_digit())
                && (index == "0" || !index.starts_with('0'));
            canonical && index.parse::<u64>().is_ok_and(|i| i < *count)
        })
    })
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

/// Creates the per-container cache directory (1777: every uid in the container may create its region file, as
/// HAMi-core expects, but with the sticky bit none may remove or rename another uid's file) if it is not there. It is never
/// emptied or removed here: a running container of the same pod may have it mounted (the Go plugin's
/// `RemoveAll` left stale bind mounts); each Allocate draws a fresh cache file name inside it instead.
fn prepare_cache_dir(dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir)
        .map_err(|e| format!("cannot create the cache directory {}: {e}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o1777))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SharingSettings;
    use crate::gpu::inventory::Gpu;

    fn node() -> (Inventory, DevicePlan) {
        let gpu = |minor: u32, uuid: &str| Gpu {
            nvml_index: minor,
            uuid: uuid.to_owned(),
            model: "Tesla T4".to_owned(),
            memory_bytes: 15360 << 20,
            minor,
            numa_node: None,
            pci_bus_id: String::new(),
        };
        let inventory = Inventory {
            gpus: vec![gpu(0, "GPU-a"), gpu(1, "GPU-b")],
        };
        let plan = DevicePlan::new(
            ResourceKind::Number,
            &inventory,
            &SharingSettings::default(),
        )
        .unwrap();
        (inventory, plan)
    }

    fn ask(available: &[&str], must: &[&str], size: i32) -> ContainerPreferredAllocationRequest {
        ContainerPreferredAllocationRequest {
            available_device_i_ds: available.iter().map(|s| (*s).to_owned()).collect(),
            must_include_device_i_ds: must.iter().map(|s| (*s).to_owned()).collect(),
            allocation_size: size,
        }
    }

    /// An allocator whose apiserver is a closed port: nothing in these tests may reach it.
    async fn offline_allocator() -> Allocator {
        let config = kube::Config::new("http://127.0.0.1:9".parse().unwrap());
        let client = Client::try_from(config).unwrap();
        let (pods, watch) = PodCache::start(client.clone(), "node-a");
        watch.abort();
        let (inventory, _) = node();
        let settings = HandoffSettings {
            config: Arc::new(VolcanoConfig::default()),
            limiter: LimiterSettings::default(),
            cache_root: std::env::temp_dir(),
        };
        Allocator::new(
            client,
            "node-a",
            pods,
            settings,
            Arc::new(inventory),
            Arc::new(AgentMetrics::new("test")),
        )
    }

    #[tokio::test]
    async fn drain_waits_for_the_call_in_flight_then_refuses_new_ones_without_touching_a_pod() {
        let allocator = offline_allocator().await;
        let in_flight = allocator.serial.lock().await;
        let short = std::time::Duration::from_millis(100);
        assert!(
            !allocator.drain(short).await,
            "the call in flight still holds the lock"
        );
        drop(in_flight);
        assert!(allocator.drain(short).await);
        let refused = allocator
            .allocate(AllocatingEndpoint::Number, 1, &[true, true])
            .await
            .unwrap_err();
        assert!(
            matches!(refused, AllocateError::Stopping { .. }),
            "{refused}"
        );
        assert!(
            refused.to_string().contains("node-a is stopping"),
            "{refused}"
        );
    }

    #[test]
    fn a_count_container_s_memory_call_is_owed_or_answered_whatever_the_order() {
        let mut calls = MemoryCalls::default();
        // Number first: the memory call of 1000 is owed and answered empty once.
        calls.handed_off("p", 0, Some(1000));
        assert!(!calls.take_owed(999));
        assert!(calls.take_owed(1000));
        assert!(
            !calls.take_owed(1000),
            "the next memory-only container's call is served"
        );
        // Memory first: nothing is owed after the number call.
        calls.answered("p", 1, 1000);
        calls.handed_off("p", 1, Some(1000));
        assert!(!calls.take_owed(1000));
        assert!(calls.entries.is_empty());
        // No memory limit, no memory call.
        calls.handed_off("p", 2, None);
        calls.handed_off("p", 3, Some(0));
        assert!(calls.entries.is_empty());
        for i in 0..1000 {
            calls.handed_off("q", i, Some(1));
        }
        assert_eq!(calls.entries.len(), MemoryCalls::MOST + 1);
    }

    #[test]
    fn preferred_sizes_beyond_what_is_offered_are_refused_before_allocating() {
        let (inventory, plan) = node();
        let ok = ask(&["GPU-a-0", "GPU-b-9"], &["GPU-b-9"], 2);
        assert_eq!(validate_preferred(&inventory, &plan, &ok), Ok(()));
        assert_eq!(prefer(&inventory, &plan, &ok, &[]).len(), 2);
        for size in [i32::MAX, 3, -1, i32::MIN] {
            let err =
                validate_preferred(&inventory, &plan, &ask(&["GPU-a-0", "GPU-a-1"], &[], size))
                    .unwrap_err();
            assert!(
                err.starts_with(&format!("allocation_size {size} is not")),
                "{err}"
            );
        }
        assert!(validate_preferred(&inventory, &plan, &ask(&[], &[], 0)).is_ok());
    }

    #[test]
    fn id_lists_must_name_advertised_ids_once() {
        let (inventory, plan) = node();
        let cases = [
            (
                ask(&["GPU-a-0", "GPU-a-0"], &[], 1),
                "available_device_i_ds names \"GPU-a-0\" twice",
            ),
            (ask(&["GPU-c-0"], &[], 1), "\"GPU-c-0\", not an ID"),
            (ask(&["GPU-a-10"], &[], 1), "\"GPU-a-10\", not an ID"),
            (ask(&["GPU-a-01"], &[], 1), "\"GPU-a-01\", not an ID"),
            (ask(&["GPU-a-"], &[], 1), "not an ID"),
            (ask(&["GPU-a-memory-0"], &[], 1), "not an ID"),
            (
                ask(&["GPU-a-0"], &["GPU-b-0"], 1),
                "must_include_device_i_ds \"GPU-b-0\" is not one of",
            ),
            (
                ask(&["GPU-a-0", "GPU-a-1"], &["GPU-a-0", "GPU-a-1"], 1),
                "is not at most allocation_size 1",
            ),
        ];
        for (request, expected) in cases {
            let err = validate_preferred(&inventory, &plan, &request).unwrap_err();
            assert!(err.contains(expected), "{expected}: {err}");
        }
        let many: Vec<String> = (0..21).map(|i| format!("GPU-a-{i}")).collect();
        let err = validate_allocate(&inventory, &plan, &many).unwrap_err();
        assert!(err.contains("names 21 IDs, not at most 20"), "{err}");
        assert!(
            validate_allocate(&inventory, &plan, &[])
                .unwrap_err()
                .contains("empty")
        );
        assert!(validate_allocate(&inventory, &plan, &["GPU-b-9".to_owned()]).is_ok());
    }
}
