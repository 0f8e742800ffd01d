//! The Volcano hand-off: turning the kubelet's `Allocate` (device IDs only, no pod, no container) into the
//! scheduler's placement for one container, and that placement into the limiter's environment and mounts.
//!
//! One call at a time (a mutex shared by the number and memory endpoints): find the pending pod whose next
//! container the request fits (`volcano::selection`), decide what to do with it ([`decide`], pure), take that
//! container's segment off `volcano.sh/devices-to-allocate` with a JSON patch guarded by a `test` of the old
//! value (so a concurrent writer makes us fail loudly rather than hand out a segment twice; the patch that
//! empties the queue also marks the pod `success`), read the result back from the patch response, and answer
//! with the container's [`ContainerAnswer`]. Any failure after a pod was chosen marks it `failed`, records a
//! Kubernetes Event on it, and answers the kubelet with an error naming the pod and the cause. Every read and
//! write goes through a [`PodStore`].
//!
//! The pod chosen is the first in the serving order that may be the one the kubelet is admitting, **usable or
//! not** (`volcano::selection::choose`): a pod whose annotations cannot be served is failed with this call,
//! never skipped for the next pod, whose GPUs would then start in the wrong pod. Only the pod search, the
//! guarded patch and the `failed` mark run under the lock, each bounded by the request bound of
//! [`crate::cluster::ApiBounds`]; Events and the scheduler's node-lock release follow off the lock, and
//! [`Allocator::drain`] waits for all of it when the agent stops.

use std::collections::HashSet;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use kube::Client;
use tokio::sync::Mutex;
use tokio::task::JoinSet;
use vgpu_metrics::AgentMetrics;

use crate::cluster::ApiCallError;
use crate::config::ResourceKind;
use crate::container::device_nodes::MigNodeIds;
use crate::container::response::{ContainerAnswer, MigHanded, new_cache_file};
use crate::gpu::inventory::Inventory;
use crate::gpu::mig::{MigControl, MigInstance};
use crate::gpu::plan::{DevicePlan, device_id};
use crate::handoff::decision::{Decision, HandoffError, HandoffSettings, Plan, decide};
use crate::handoff::pod_cache::PodCache;
use crate::handoff::record::{RecordStore, record_allocation, recorded_container};
use crate::handoff::selection::{
    AllocatingEndpoint, GpuFacts, PHASE_PENDING, PodView, Request, Verdict, choose,
};
use crate::handoff::store::{KubePodStore, PodKey, PodStore};
use crate::volcano::mig::{MigDeviceId, encode_mig_id, lookup_mig_slot};
use crate::volcano::{BIND_PHASE, PHASE_FAILED};

/// What an Allocate call resolved to.
#[derive(Debug)]
pub enum Outcome {
    /// This container's devices and limiter environment.
    Handoff(ContainerAnswer),
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
        "the apiserver did not answer within {limit:?} while looking for the pod on node {node}"
    )]
    TimedOut {
        /// This node.
        node: String,
        /// The bound the search ran under.
        limit: Duration,
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
        #[source]
        cause: HandoffError,
    },
}

/// The hand-off machinery, shared by the endpoints; `S` is where it reads and writes pods (the apiserver in
/// the agent).
pub struct Allocator<S = KubePodStore> {
    node: String,
    store: Arc<S>,
    settings: HandoffSettings,
    inventory: Arc<Inventory>,
    serial: Mutex<()>,
    metrics: Arc<AgentMetrics>,
    /// Set by [`Allocator::drain`]: later calls are refused without touching any pod.
    draining: AtomicBool,
    /// Work that follows a hand-off but need not hold the lock (Events, the node-lock release).
    after: std::sync::Mutex<JoinSet<()>>,
    /// Memory calls of count containers, owed or already answered; only touched under `serial`.
    memory_calls: std::sync::Mutex<MemoryCalls>,
    /// MIG repartitioning (`operatingmode: mig`); `None` fails every MIG hand-off.
    mig: Option<Arc<dyn MigControl>>,
}

/// The memory-endpoint calls of containers the number endpoint serves.
///
/// The kubelet calls both endpoints for a container with a `vgpu-number` and a `vgpu-memory` limit, in no fixed
/// order (it walks the container's limits map), and allocates a pod's containers one after the other. Once the
/// number call has handed a container off, the pod's queue points at its next container, so the memory call
/// still to come for the container just served would look like the next container's if that one is
/// memory-only with the same size. So each such memory call is remembered: answered before the number call,
/// or owed after it; an owed call is answered empty when it comes, if its pod is still the one being admitted
/// (entries match by size only: the kubelet's request names no pod).
#[derive(Debug, Default)]
struct MemoryCalls {
    entries: Vec<MemoryCall>,
}

#[derive(Debug)]
struct MemoryCall {
    /// The pod's namespace and name, to check that it is still being admitted.
    pod: (String, String),
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
            pod: Default::default(),
            uid: uid.to_owned(),
            container,
            size,
            owed: false,
            at: std::time::Instant::now(),
        });
    }

    /// The number endpoint handed `container` of `pod` off; `memory` is its `vgpu-memory` limit.
    fn handed_off(&mut self, pod: &PodView, container: usize, memory: Option<u64>) {
        let uid = pod.uid.as_str();
        self.expire();
        // The kubelet admits one pod at a time: a memory call still owed by another pod belongs to an
        // admission it gave up on, and must not be taken for this pod's (it would be answered in its place).
        self.entries.retain(|e| !e.owed || e.uid == uid);
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
                pod: (pod.namespace.clone(), pod.name.clone()),
                uid: uid.to_owned(),
                container,
                size,
                owed: true,
                at: std::time::Instant::now(),
            }),
        }
    }

    /// The owed memory call of `size`, if any (consumed): the pod it is owed by, as (namespace, name, uid).
    /// Whether the call is really that one is for the caller to check ([`Allocator::still_owed`]).
    fn take_owed(&mut self, size: usize) -> Option<(String, String, String)> {
        self.expire();
        let i = self
            .entries
            .iter()
            .rposition(|e| e.owed && e.size == size)?;
        let e = self.entries.remove(i);
        Some((e.pod.0, e.pod.1, e.uid))
    }
}

impl<S> std::fmt::Debug for Allocator<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Allocator")
            .field("node", &self.node)
            .field("cache_root", &self.settings.cache_root)
            .finish()
    }
}

impl Allocator {
    /// The hand-off on the apiserver: reads through `pods` (the watch of this node's pods) and `client`.
    pub fn new(
        client: Client,
        node: &str,
        pods: PodCache,
        settings: HandoffSettings,
        inventory: Arc<Inventory>,
        metrics: Arc<AgentMetrics>,
    ) -> Self {
        let store = KubePodStore::new(
            client,
            node,
            pods,
            settings.config.resources.clone(),
            settings.bounds,
        );
        Self::with_store(store, node, settings, inventory, metrics)
    }
}

impl<S: PodStore> Allocator<S> {
    /// The hand-off of `node` on `store`.
    pub fn with_store(
        store: S,
        node: &str,
        settings: HandoffSettings,
        inventory: Arc<Inventory>,
        metrics: Arc<AgentMetrics>,
    ) -> Self {
        Self {
            node: node.to_owned(),
            store: Arc::new(store),
            settings,
            inventory,
            serial: Mutex::new(()),
            metrics,
            draining: AtomicBool::new(false),
            after: std::sync::Mutex::new(JoinSet::new()),
            memory_calls: std::sync::Mutex::new(MemoryCalls::default()),
            mig: None,
        }
    }

    /// Serves MIG hand-offs through `control` (`operatingmode: mig`).
    #[must_use]
    pub fn with_mig(mut self, control: Arc<dyn MigControl>) -> Self {
        self.mig = Some(control);
        self
    }

    /// The bound on each apiserver call, and on the pod search as a whole.
    fn limit(&self) -> Duration {
        self.settings.bounds.request
    }

    /// For a stop (SIGTERM): refuses every later Allocate and `GetPreferredAllocation` lookup, waits for the one
    /// in flight (so the kubelet's answer and the pod's annotations agree) and for the Events and node-lock
    /// releases it queued, all within `bound`. Returns whether everything finished in time.
    pub async fn drain(&self, bound: std::time::Duration) -> bool {
        self.draining.store(true, Ordering::SeqCst);
        let deadline = tokio::time::Instant::now() + bound;
        // Taking the lock waits for the call in flight; it is bounded by 3 request bounds anyway.
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

    /// Runs `work` off the Allocate lock, bounded by the request bound, and keeps it where [`Self::drain`] can
    /// wait for it.
    fn after_lock(
        &self,
        what: &'static str,
        work: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        let limit = self.limit();
        let bounded = async move {
            if tokio::time::timeout(limit, work).await.is_err() {
                tracing::warn!("{what}: no answer from the apiserver within {limit:?}; given up");
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
        let store = Arc::clone(&self.store);
        let metrics = Arc::clone(&self.metrics);
        self.after_lock("releasing the node lock", async move {
            if store.release_node_lock().await {
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
                memory_units: self.settings.config.sharing.memory_units(gpu.memory_mib()),
            })
            .collect()
    }

    /// What a failed store read means for the call: nothing was changed either way.
    fn unavailable(&self, error: ApiCallError) -> AllocateError {
        match error {
            ApiCallError::Failed { source, .. } => AllocateError::Unreachable {
                node: self.node.clone(),
                source,
            },
            ApiCallError::TimedOut { limit, .. } => AllocateError::TimedOut {
                node: self.node.clone(),
                limit,
            },
        }
    }

    /// Finds the pod a request is for, from the watch cache, then from a direct read; see
    /// [`crate::handoff::selection::choose`].
    async fn find(
        &self,
        request: Request,
        gpus: &[GpuFacts],
    ) -> Result<Option<(PodView, Verdict)>, AllocateError> {
        // Only pods still waiting for this node can be chosen: most of the node's pods are long done, and
        // building the view of each would cost more than the rest of the search. A pod whose next container
        // the node already holds a record of was handed out before and its queue rewritten since: provably
        // not the pod being admitted (a pod is admitted once), so it is passed over, never chosen to fail
        // the call of the pod that is.
        let not_handed_out = |views: Vec<PodView>| -> Vec<PodView> {
            views
                .into_iter()
                .filter(|p| !self.handed_out_before(p))
                .collect()
        };
        let cached = not_handed_out(self.store.cached_waiting());
        if let Some(choice) = choose(&cached, &self.node, Some(gpus), request) {
            // The watch may lag behind our own last patch (the kubelet allocates a pod's next container
            // milliseconds after the previous one), so the chosen pod, usable or not, is read fresh and judged
            // again before anything is handed out or failed.
            let candidate = &cached[choice.index];
            let fresh = self
                .store
                .get(&candidate.namespace, &candidate.name)
                .await
                .map_err(|e| self.unavailable(e))?;
            if let Some(fresh) = fresh
                && !self.handed_out_before(&fresh)
                && let Some(choice) = choose(
                    std::slice::from_ref(&fresh),
                    &self.node,
                    Some(gpus),
                    request,
                )
            {
                return Ok(Some((fresh, choice.verdict)));
            }
        }
        let views = not_handed_out(
            self.store
                .list_waiting()
                .await
                .map_err(|e| self.unavailable(e))?,
        );
        Ok(choose(&views, &self.node, Some(gpus), request)
            .map(|choice| (views[choice.index].clone(), choice.verdict)))
    }

    /// Whether the node already holds a record of `pod`'s next queue container.
    fn handed_out_before(&self, pod: &PodView) -> bool {
        matches!(
            crate::handoff::selection::next_assignment(pod),
            Ok(Some(a)) if recorded_container(&self.settings.cache_root, &pod.uid, &pod.containers[a.container].name)
        )
    }

    /// [`Self::find`] under the request bound as a whole: both callers hold the serial lock while it runs.
    async fn find_bounded(
        &self,
        request: Request,
        gpus: &[GpuFacts],
    ) -> Result<Option<(PodView, Verdict)>, AllocateError> {
        let limit = self.limit();
        tokio::time::timeout(limit, self.find(request, gpus))
            .await
            .map_err(|_| AllocateError::TimedOut {
                node: self.node.clone(),
                limit,
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
        let owed = if endpoint == AllocatingEndpoint::Memory {
            self.memory_calls().take_owed(size)
        } else {
            None
        };
        if let Some(owed) = owed
            && self.still_owed(&owed).await
        {
            return Ok(Outcome::NotMine);
        }
        let gpus = self.gpu_facts(healthy);
        let found = self.find_bounded(Request { endpoint, size }, &gpus).await?;
        match decide(found, endpoint, &self.settings, new_cache_file()) {
            Decision::Empty { answered } => {
                if let Some((uid, container)) = answered {
                    self.memory_calls().answered(&uid, container, size);
                }
                Ok(Outcome::NotMine)
            }
            Decision::NoPendingPod => {
                self.release_lock();
                Err(AllocateError::NoPendingPod {
                    node: self.node.clone(),
                    size,
                    what: "vGPU(s)",
                })
            }
            Decision::Fail { pod, cause } => Err(self.fail(&pod, cause).await),
            Decision::HandOff(mut plan) => {
                if !plan.mig.is_empty()
                    && let Err(cause) = self.partition(&mut plan).await
                {
                    return Err(self.fail(&plan.pod, cause).await);
                }
                self.hand_off(endpoint, plan).await
            }
        }
    }

    /// Whether the pod an owed memory call was remembered for is still being admitted: the same pod (uid),
    /// `Pending` and not started. The kubelet admits one pod at a time and fails a pod whose admission
    /// failed, so an entry whose pod has moved on was left by an admission given up on (another plugin
    /// refused, too few healthy IDs) and must not answer a later memory-only container of the same size
    /// empty: that container would start without its GPU and limits.
    /// A read that fails (apiserver down or slow) keeps the entry's word, as before there was a check: the
    /// call is answered empty.
    async fn still_owed(&self, (namespace, name, uid): &(String, String, String)) -> bool {
        let read = tokio::time::timeout(self.limit(), self.store.get(namespace, name)).await;
        let Ok(Ok(pod)) = read else {
            tracing::warn!(
                pod = %format!("{namespace}/{name}"),
                "cannot read the pod a remembered memory call is owed by; answered empty as owed"
            );
            return true;
        };
        let owed = pod.is_some_and(|p| {
            &p.uid == uid && p.phase.as_deref() == Some(PHASE_PENDING) && !p.started
        });
        if !owed {
            tracing::info!(
                pod = %format!("{namespace}/{name}"),
                "a remembered memory call of a container handed off earlier is stale (its pod was not \
                 admitted); this call is served as a new one"
            );
        }
        owed
    }

    /// Commits a decided hand-off and answers with it, or fails the pod.
    async fn hand_off(
        &self,
        endpoint: AllocatingEndpoint,
        plan: Box<Plan>,
    ) -> Result<Outcome, AllocateError> {
        match self.commit(&plan).await {
            Ok(()) => {
                if endpoint == AllocatingEndpoint::Number {
                    let memory = plan.pod.containers[plan.container].memory;
                    self.memory_calls()
                        .handed_off(&plan.pod, plan.container, memory);
                }
                Ok(Outcome::Handoff(plan.answer))
            }
            Err(cause) => Err(self.fail(&plan.pod, cause).await),
        }
    }

    /// A MIG hand-off: for each parent GPU, the group's layout made (repartitioning only if it differs and no
    /// other container the node's records hold on that GPU is alive, and no process holds memory on it), then
    /// each position's MIG UUID put into the plan's answer and record.
    async fn partition(&self, plan: &mut Plan) -> Result<(), HandoffError> {
        let Some(control) = self.mig.clone() else {
            return Err(HandoffError::Mig(
                "this agent serves no MIG hand-off (it was not started with operatingmode: mig)"
                    .to_owned(),
            ));
        };
        let known = &self.settings.config.mig_geometries;
        let mut done: std::collections::BTreeMap<String, Vec<MigInstance>> = Default::default();
        let mut handed = Vec::with_capacity(plan.mig.len());
        for u in &plan.mig {
            let Some(gpu) = self.inventory.gpus.iter().find(|g| g.uuid == u.gpu_uuid) else {
                return Err(HandoffError::Mig(format!(
                    "GPU {} is not one of this node's GPUs",
                    u.gpu_uuid
                )));
            };
            let id = MigDeviceId {
                parent_uuid: &u.gpu_uuid,
                group: &u.group,
                position: u.position,
            };
            let slot = lookup_mig_slot(known, &gpu.model, &id).map_err(|e| {
                HandoffError::Mig(format!(
                    "device {}: GPU {} ({}): {e}",
                    encode_mig_id(&u.gpu_uuid, &u.group, u.position),
                    gpu.uuid,
                    gpu.model
                ))
            })?;
            if !done.contains_key(&u.gpu_uuid) {
                let holders = self.holders(&control, &u.gpu_uuid, plan).await?;
                let geometry = slot.geometry.clone();
                let gpu_uuid = u.gpu_uuid.clone();
                let c = Arc::clone(&control);
                let result =
                    tokio::task::spawn_blocking(move || c.ensure(&gpu_uuid, &geometry, &holders))
                        .await
                        .map_err(|e| {
                            HandoffError::Mig(format!("the repartition task failed: {e}"))
                        })?;
                let partitioned = result.map_err(|e| {
                    let what = if e.is_in_use() {
                        "GPU in use, this pod fails and running containers are left alone"
                    } else {
                        "cannot give the GPU the group's layout"
                    };
                    HandoffError::Mig(format!("group {} on {}: {what}: {e}", u.group, gpu.model))
                })?;
                tracing::info!(
                    gpu = %u.gpu_uuid, group = %u.group, repartitioned = partitioned.repartitioned,
                    mig_devices = ?partitioned.uuids(), "MIG layout ready"
                );
                done.insert(u.gpu_uuid.clone(), partitioned.instances);
            }
            let position = usize::try_from(u.position).unwrap_or(usize::MAX);
            let Some(inst) = done.get(&u.gpu_uuid).and_then(|all| all.get(position)) else {
                return Err(HandoffError::Mig(format!(
                    "GPU {} has no MIG device at position {} of group {}",
                    u.gpu_uuid, u.position, u.group
                )));
            };
            handed.push(MigHanded {
                uuid: inst.uuid.clone(),
                ids: MigNodeIds {
                    gpu_minor: gpu.minor,
                    gi_id: inst.gi_id,
                    ci_id: inst.ci_id,
                },
            });
        }
        plan.resolve_mig(&self.settings, &handed)
    }

    /// The other containers the node's records hold on `gpu_uuid` (by its MIG devices' UUIDs or its own) whose
    /// pod is still alive (not gone, not `Succeeded`/`Failed`), described for an error.
    async fn holders(
        &self,
        control: &Arc<dyn MigControl>,
        gpu_uuid: &str,
        plan: &Plan,
    ) -> Result<Vec<String>, HandoffError> {
        let c = Arc::clone(control);
        let gpu = gpu_uuid.to_owned();
        let mut on_gpu: HashSet<String> = tokio::task::spawn_blocking(move || c.mig_uuids(&gpu))
            .await
            .map_err(|e| HandoffError::Mig(format!("the MIG query task failed: {e}")))?
            .map_err(|e| HandoffError::Mig(e.to_string()))?
            .into_iter()
            .collect();
        on_gpu.insert(gpu_uuid.to_owned());
        let records = RecordStore::beside(&self.settings.cache_root).load();
        let mut holders = Vec::new();
        for record in records.values() {
            let this = record.pod_uid == plan.pod.uid && record.container == plan.record.container;
            if this || !record.gpus.iter().any(|g| on_gpu.contains(&g.uuid)) {
                continue;
            }
            let alive = match self.store.get(&record.namespace, &record.pod).await {
                Ok(Some(pod)) => {
                    pod.uid == record.pod_uid
                        && !matches!(pod.phase.as_deref(), Some("Succeeded" | "Failed"))
                }
                Ok(None) => false,
                // Unknown counts as alive: never repartition under a container that may run.
                Err(_) => true,
            };
            if alive {
                holders.push(format!(
                    "container {:?} of pod {}/{} holds {}",
                    record.container,
                    record.namespace,
                    record.pod,
                    record
                        .gpus
                        .iter()
                        .map(|g| g.uuid.as_str())
                        .collect::<Vec<_>>()
                        .join(",")
                ));
            }
        }
        holders.sort();
        Ok(holders)
    }

    /// Makes the writes of a hand-off: the cache directory, the node's record of the container (before the
    /// hand-off is committed: the monitor restores the region from it, so a tenant cannot lift its caps), then
    /// the guarded patch, checked as read back.
    async fn commit(&self, plan: &Plan) -> Result<(), HandoffError> {
        prepare_cache_dir(&plan.cache_host_dir)?;
        record_allocation(&self.settings.cache_root, &plan.record)?;
        let annotations = self
            .store
            .patch_annotations(&PodKey::of(&plan.pod), &plan.patch_what(), plan.patch())
            .await
            .map_err(HandoffError::Advance)?;
        plan.check_read_back(&annotations)?;
        if plan.done() {
            self.release_lock();
        }
        tracing::info!(
            pod = %format!("{}/{}", plan.pod.namespace, plan.pod.name),
            container = %plan.record.container,
            devices = ?plan.record.gpus.iter().map(|g| g.uuid.as_str()).collect::<Vec<_>>(),
            left = plan.remaining,
            "container handed its vGPUs"
        );
        Ok(())
    }

    /// Marks the pod failed (under the lock, so the next call no longer sees it `allocating`), then records why
    /// on it as an Event and releases the node lock off the lock; returns the error for the kubelet, which
    /// names the pod and the cause.
    async fn fail(&self, pod: &PodView, cause: HandoffError) -> AllocateError {
        tracing::error!(pod = %format!("{}/{}", pod.namespace, pod.name), %cause, "vGPU allocation failed");
        let key = PodKey::of(pod);
        if let Err(error) = self.store.mark_failed(&key).await {
            tracing::warn!(%error, "cannot mark the pod {BIND_PHASE}={PHASE_FAILED}");
        }
        let note = truncate(&cause.to_string(), 1000);
        let store = Arc::clone(&self.store);
        self.after_lock("recording the failure as an event", async move {
            if let Err(error) = store.record_failure(&key, &note).await {
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
        request: &PreferredRequest<'_>,
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

/// The most device IDs one request may name: what the kubelet's 4 MiB message could carry is far more than
/// any node has, so the real bound is the resource's own count (checked too).
const MAX_IDS: usize = 1 << 20;

/// The kubelet's `GetPreferredAllocation` request for one container (its fields keep the protobuf's names).
#[derive(Debug, Clone, Copy)]
pub struct PreferredRequest<'a> {
    /// The IDs the kubelet may choose from.
    pub available_device_i_ds: &'a [String],
    /// The IDs the answer must include.
    pub must_include_device_i_ds: &'a [String],
    /// How many IDs to choose.
    pub allocation_size: i32,
}

/// A kubelet request this resource cannot have; the text names the field and what it must be.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// An Allocate container request without IDs.
    #[error("devices_ids is empty, not at least one ID this resource advertises")]
    NoIds,
    /// More IDs than the resource has.
    #[error("{field} names {count} IDs, not at most {most}, the IDs this resource advertises")]
    TooManyIds {
        /// The protobuf field.
        field: &'static str,
        /// How many it names.
        count: usize,
        /// How many this resource has.
        most: usize,
    },
    /// One ID twice.
    #[error("{field} names {id:?} twice, not each ID once")]
    Twice {
        /// The protobuf field.
        field: &'static str,
        /// The ID (at most 100 bytes of it).
        id: String,
    },
    /// An ID this resource does not advertise.
    #[error("{field} names {id:?}, not an ID this resource advertises")]
    NotAdvertised {
        /// The protobuf field.
        field: &'static str,
        /// The ID (at most 100 bytes of it).
        id: String,
    },
    /// A size beyond what is offered.
    #[error(
        "allocation_size {size} is not a number from 0 to {available}, the count of available_device_i_ds"
    )]
    Size {
        /// The size asked for.
        size: i32,
        /// How many IDs are offered.
        available: usize,
    },
    /// A must-include ID that is not offered.
    #[error("must_include_device_i_ds {id:?} is not one of available_device_i_ds")]
    NotOffered {
        /// The ID.
        id: String,
    },
    /// More must-include IDs than the size.
    #[error("must_include_device_i_ds ({count} IDs) is not at most allocation_size {size}")]
    TooManyMustInclude {
        /// How many must be included.
        count: usize,
        /// The size asked for.
        size: i32,
    },
}

/// Checks a `GetPreferredAllocation` container request against what this resource has, before anything is
/// allocated for it: `allocation_size` from 0 to the number of available IDs, available and must-include IDs
/// known to this resource and each named once, must-include a subset of available and no more than the size.
pub fn validate_preferred(
    inventory: &Inventory,
    plan: &DevicePlan,
    request: &PreferredRequest<'_>,
) -> Result<(), RequestError> {
    let available = request.available_device_i_ds;
    let must = request.must_include_device_i_ds;
    validate_ids("available_device_i_ds", inventory, plan, available)?;
    validate_ids("must_include_device_i_ds", inventory, plan, must)?;
    let size = request.allocation_size;
    let fits = usize::try_from(size).is_ok_and(|s| s <= available.len());
    if !fits {
        return Err(RequestError::Size {
            size,
            available: available.len(),
        });
    }
    let offered: HashSet<&str> = available.iter().map(String::as_str).collect();
    if let Some(id) = must.iter().find(|id| !offered.contains(id.as_str())) {
        return Err(RequestError::NotOffered { id: id.clone() });
    }
    if must.len() > available.len().min(size as usize) {
        return Err(RequestError::TooManyMustInclude {
            count: must.len(),
            size,
        });
    }
    Ok(())
}

/// Checks the device IDs of an `Allocate` container request: at least one, each an ID this resource
/// advertises, each once, no more than it has.
pub fn validate_allocate(
    inventory: &Inventory,
    plan: &DevicePlan,
    ids: &[String],
) -> Result<(), RequestError> {
    if ids.is_empty() {
        return Err(RequestError::NoIds);
    }
    validate_ids("devices_ids", inventory, plan, ids)
}

fn validate_ids(
    field: &'static str,
    inventory: &Inventory,
    plan: &DevicePlan,
    ids: &[String],
) -> Result<(), RequestError> {
    let most = usize::try_from(plan.total())
        .unwrap_or(usize::MAX)
        .min(MAX_IDS);
    if ids.len() > most {
        return Err(RequestError::TooManyIds {
            field,
            count: ids.len(),
            most,
        });
    }
    let prefixes = id_prefixes(inventory, plan);
    let mut seen: HashSet<&str> = HashSet::with_capacity(ids.len());
    for id in ids {
        if !seen.insert(id) {
            return Err(RequestError::Twice {
                field,
                id: truncate(id, 100),
            });
        }
        if !is_advertised(&prefixes, id) {
            return Err(RequestError::NotAdvertised {
                field,
                id: truncate(id, 100),
            });
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
    request: &PreferredRequest<'_>,
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
    for id in request.must_include_device_i_ds {
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
                for id in request.available_device_i_ds {
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
    for id in request.available_device_i_ds {
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
fn prepare_cache_dir(dir: &Path) -> Result<(), HandoffError> {
    std::fs::create_dir_all(dir).map_err(|source| HandoffError::CreateCacheDir {
        dir: dir.to_owned(),
        source,
    })?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o1777)).map_err(|source| {
        HandoffError::OpenCacheDir {
            dir: dir.to_owned(),
            source,
        }
    })
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
    use std::collections::BTreeMap;

    use crate::cluster::ApiBounds;
    use crate::config::SharingSettings;
    use crate::config::device::VolcanoConfig;
    use crate::container::response::LimiterSettings;
    use crate::gpu::inventory::Gpu;
    use crate::handoff::record::{PRIORITY_ANNOTATION, RecordStore};
    use crate::handoff::selection::{ContainerLimits, PHASE_PENDING};
    use crate::handoff::store::memory::{MemoryPodStore, Write};
    use crate::volcano::{
        DEVICES_TO_ALLOCATE, PHASE_ALLOCATING, PHASE_SUCCESS, VGPU_NODE, VGPU_TIME, VGPU_TIME_DONE,
    };

    const NODE: &str = "node-a";

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

    struct Ask {
        available: Vec<String>,
        must: Vec<String>,
        size: i32,
    }

    impl Ask {
        fn request(&self) -> PreferredRequest<'_> {
            PreferredRequest {
                available_device_i_ds: &self.available,
                must_include_device_i_ds: &self.must,
                allocation_size: self.size,
            }
        }
    }

    fn ask(available: &[&str], must: &[&str], size: i32) -> Ask {
        Ask {
            available: available.iter().map(|s| (*s).to_owned()).collect(),
            must: must.iter().map(|s| (*s).to_owned()).collect(),
            size,
        }
    }

    /// A pod the scheduler bound to this node, still `allocating`; `containers` are (name, vgpu-number,
    /// vgpu-memory).
    fn bound(name: &str, containers: &[(&str, Option<u64>, Option<u64>)], queue: &str) -> PodView {
        PodView {
            namespace: "default".to_owned(),
            name: name.to_owned(),
            uid: format!("uid-{name}"),
            phase: Some(PHASE_PENDING.to_owned()),
            node_name: Some(NODE.to_owned()),
            creation_timestamp: Some(1_787_220_000),
            annotations: [
                (VGPU_NODE, NODE),
                (VGPU_TIME, "1787220000"),
                (BIND_PHASE, PHASE_ALLOCATING),
                (DEVICES_TO_ALLOCATE, queue),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
            containers: containers
                .iter()
                .map(|&(name, count, memory)| ContainerLimits {
                    name: name.to_owned(),
                    count,
                    memory,
                    disable_control: false,
                })
                .collect(),
            init_with_vgpu: Vec::new(),
            started: false,
        }
    }

    /// An allocator of two healthy T4s on `pods`, its caches under `root`.
    fn serving(root: &Path, pods: Vec<PodView>) -> Allocator<MemoryPodStore> {
        let (inventory, _) = node();
        let settings = HandoffSettings {
            config: Arc::new(VolcanoConfig::default()),
            limiter: LimiterSettings {
                gdrcopy: false,
                gds: false,
                mofed: false,
                ..LimiterSettings::default()
            },
            cache_root: root.join("containers"),
            bounds: ApiBounds::new(Duration::from_secs(1)),
        };
        Allocator::with_store(
            MemoryPodStore::new(NODE, pods),
            NODE,
            settings,
            Arc::new(inventory),
            Arc::new(AgentMetrics::new("test")),
        )
    }

    const HEALTHY: [bool; 2] = [true, true];

    async fn number(
        allocator: &Allocator<MemoryPodStore>,
        size: usize,
    ) -> Result<Outcome, AllocateError> {
        allocator
            .allocate(AllocatingEndpoint::Number, size, &HEALTHY)
            .await
    }

    async fn memory(
        allocator: &Allocator<MemoryPodStore>,
        size: usize,
    ) -> Result<Outcome, AllocateError> {
        allocator
            .allocate(AllocatingEndpoint::Memory, size, &HEALTHY)
            .await
    }

    fn handed(outcome: Result<Outcome, AllocateError>) -> ContainerAnswer {
        match outcome {
            Ok(Outcome::Handoff(answer)) => answer,
            other => panic!("not handed off: {other:?}"),
        }
    }

    /// The GPU a handed-off container sees (`NVIDIA_VISIBLE_DEVICES`).
    fn visible(outcome: Result<Outcome, AllocateError>) -> String {
        handed(outcome).envs["NVIDIA_VISIBLE_DEVICES"].clone()
    }

    fn annotations(store: &MemoryPodStore, pod: &str) -> BTreeMap<String, String> {
        store.pod(pod).annotations
    }

    /// Waits for the Events and node-lock releases queued off the lock; the allocator refuses calls after.
    async fn settle(allocator: &Allocator<MemoryPodStore>) {
        assert!(allocator.drain(Duration::from_secs(5)).await);
    }

    fn events(store: &MemoryPodStore) -> Vec<(String, String)> {
        store
            .writes()
            .into_iter()
            .filter_map(|w| match w {
                Write::Event(pod, note) => Some((pod, note)),
                _ => None,
            })
            .collect()
    }

    const QUEUE: &str = "GPU-a,NVIDIA,1000,30:;GPU-b,NVIDIA,2000,0:";

    #[tokio::test]
    async fn each_container_is_handed_its_segment_under_a_test_of_the_queue_it_was_read_with() {
        let root = tempfile::tempdir().unwrap();
        let two = [("c0", Some(1), None), ("c1", Some(1), None)];
        let allocator = serving(root.path(), vec![bound("p", &two, QUEUE)]);
        let store = Arc::clone(&allocator.store);

        let first = handed(number(&allocator, 1).await);
        assert_eq!(first.envs["NVIDIA_VISIBLE_DEVICES"], "GPU-a");
        assert_eq!(first.envs["CUDA_DEVICE_MEMORY_LIMIT_0"], "1000m");
        assert_eq!(first.envs["CUDA_DEVICE_SM_LIMIT"], "30");
        let cache_dir = root.path().join("containers/uid-p_c0");
        assert!(
            first
                .mounts
                .iter()
                .any(|m| m.container_path == "/tmp/vgpu" && m.host_path == cache_dir)
        );
        let mode = std::fs::metadata(&cache_dir).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o1777);
        let records = RecordStore::beside(&root.path().join("containers")).load();
        assert_eq!(records["uid-p_c0"].gpus[0].uuid, "GPU-a");
        let after_first = annotations(&store, "p");
        assert_eq!(after_first[DEVICES_TO_ALLOCATE], ";GPU-b,NVIDIA,2000,0:");
        assert_eq!(after_first[BIND_PHASE], PHASE_ALLOCATING);
        // The typed operations go out as the JSON patch the apiserver has always been sent.
        let queue_path = "/metadata/annotations/volcano.sh~1devices-to-allocate";
        assert_eq!(
            store.writes(),
            vec![Write::Patch(
                "p".to_owned(),
                serde_json::json!([
                    { "op": "test", "path": queue_path, "value": QUEUE },
                    { "op": "replace", "path": queue_path, "value": ";GPU-b,NVIDIA,2000,0:" },
                ])
            )]
        );

        // The watch still shows the pod as it was: the fresh read decides, and the next container gets GPU-b.
        store.watch_lags();
        let second = handed(number(&allocator, 1).await);
        assert_eq!(second.envs["NVIDIA_VISIBLE_DEVICES"], "GPU-b");
        let done = annotations(&store, "p");
        assert_eq!(done[DEVICES_TO_ALLOCATE], ";");
        assert_eq!(done[BIND_PHASE], PHASE_SUCCESS);
        assert_eq!(done[VGPU_TIME], VGPU_TIME_DONE);
        let Some(Write::Patch(_, last)) = store.writes().into_iter().nth(1) else {
            panic!("{:?}", store.writes());
        };
        assert_eq!(
            last[2],
            serde_json::json!({ "op": "add", "path": "/metadata/annotations/volcano.sh~1bind-phase", "value": "success" })
        );
        assert_eq!(last.as_array().unwrap().len(), 4, "{last}");
        settle(&allocator).await;
        assert_eq!(store.writes().last(), Some(&Write::NodeLock));
        assert!(events(&store).is_empty());
    }

    #[tokio::test]
    async fn memory_calls_of_a_count_container_are_answered_empty_and_never_take_the_next_container_s_gpu()
     {
        let root = tempfile::tempdir().unwrap();
        let containers = [
            ("counted", Some(1), Some(1000)),
            ("memory-only", None, Some(1000)),
        ];
        let queue = "GPU-a,NVIDIA,1000,0:;GPU-b,NVIDIA,1000,0:";
        let allocator = serving(root.path(), vec![bound("p", &containers, queue)]);
        let store = Arc::clone(&allocator.store);
        // Before the number call: answered empty, nothing written.
        assert!(matches!(
            memory(&allocator, 1000).await,
            Ok(Outcome::NotMine)
        ));
        assert!(store.writes().is_empty());
        assert_eq!(visible(number(&allocator, 1).await), "GPU-a");
        // The memory-only container's call gets its own GPU.
        assert_eq!(visible(memory(&allocator, 1000).await), "GPU-b");

        // Number first, then the counted container's memory call: owed, answered empty; the next one is served.
        let allocator = serving(root.path(), vec![bound("q", &containers, queue)]);
        assert_eq!(visible(number(&allocator, 1).await), "GPU-a");
        assert!(matches!(
            memory(&allocator, 1000).await,
            Ok(Outcome::NotMine)
        ));
        assert_eq!(
            annotations(&allocator.store, "q")[DEVICES_TO_ALLOCATE],
            ";GPU-b,NVIDIA,1000,0:"
        );
        assert_eq!(visible(memory(&allocator, 1000).await), "GPU-b");

        // An admission given up on after the number call (another plugin refused; the kubelet fails the pod):
        // the memory call it owed never comes, and a memory-only container of the same size bound later is
        // served, not answered empty (it would start without its GPU and limits: upstream bug #9 again).
        let allocator = serving(root.path(), vec![bound("r", &containers, queue)]);
        assert_eq!(visible(number(&allocator, 1).await), "GPU-a");
        allocator.store.set_phase("r", "Failed");
        allocator.store.add(bound(
            "s",
            &[("memory-only", None, Some(1000))],
            "GPU-b,NVIDIA,1000,0:",
        ));
        assert_eq!(visible(memory(&allocator, 1000).await), "GPU-b");
        assert_eq!(annotations(&allocator.store, "s")[BIND_PHASE], "success");
        // A stale entry must not hide the next pod's own: its number call drops the entries other pods owe,
        // so its count container's memory call is answered empty and its memory-only container is served.
        let allocator = serving(root.path(), vec![bound("u", &containers, queue)]);
        assert_eq!(visible(number(&allocator, 1).await), "GPU-a");
        allocator.store.set_phase("u", "Failed");
        allocator.store.add(bound("v", &containers, queue));
        assert_eq!(visible(number(&allocator, 1).await), "GPU-a");
        assert!(matches!(
            memory(&allocator, 1000).await,
            Ok(Outcome::NotMine)
        ));
        assert_eq!(visible(memory(&allocator, 1000).await), "GPU-b");
        assert_eq!(annotations(&allocator.store, "v")[BIND_PHASE], "success");

        // No pod at all: a memory call is answered empty and changes nothing.
        let idle = serving(root.path(), Vec::new());
        assert!(matches!(memory(&idle, 7).await, Ok(Outcome::NotMine)));
        settle(&idle).await;
        assert!(idle.store.writes().is_empty());
    }

    #[tokio::test]
    async fn no_pending_pod_refuses_the_call_names_the_node_and_releases_the_node_lock() {
        let root = tempfile::tempdir().unwrap();
        // A pod that asks for 2 vGPUs is not the one a 1-vGPU call is for.
        let other = bound(
            "other",
            &[("c", Some(2), None)],
            "GPU-a,NVIDIA,1,0:GPU-b,NVIDIA,1,0:",
        );
        let allocator = serving(root.path(), vec![other]);
        let error = number(&allocator, 1).await.unwrap_err();
        assert!(
            matches!(error, AllocateError::NoPendingPod { size: 1, .. }),
            "{error:?}"
        );
        assert!(
            error.to_string().starts_with(
                "no pending pod bound to node node-a is waiting for a container with 1 vGPU(s)"
            ),
            "{error}"
        );
        settle(&allocator).await;
        assert_eq!(allocator.store.writes(), vec![Write::NodeLock]);
        assert_eq!(
            annotations(&allocator.store, "other")[BIND_PHASE],
            PHASE_ALLOCATING
        );
    }

    #[tokio::test]
    async fn a_queue_changed_under_the_guarded_patch_fails_the_pod_and_the_retry_hands_nothing_out()
    {
        let root = tempfile::tempdir().unwrap();
        let allocator = serving(
            root.path(),
            vec![bound("p", &[("c", Some(1), None)], "GPU-a,NVIDIA,1000,0:")],
        );
        let store = Arc::clone(&allocator.store);
        // Another writer takes the segment between our read and our patch: the `test` fails (422).
        store.interfere_before_next_patch("p", DEVICES_TO_ALLOCATE, "");
        let error = number(&allocator, 1).await.unwrap_err();
        let AllocateError::Pod { cause, .. } = &error else {
            panic!("{error:?}");
        };
        let HandoffError::Advance(ApiCallError::Failed {
            source: kube::Error::Api(status),
            ..
        }) = cause
        else {
            panic!("{cause:?}");
        };
        assert_eq!(status.code, 422);
        assert!(
            error.to_string().starts_with(
                "pod default/p: cannot advance volcano.sh/devices-to-allocate from \"GPU-a,NVIDIA,1000,0:\" to \"\""
            ),
            "{error}"
        );
        let now = annotations(&store, "p");
        assert_eq!(now[BIND_PHASE], PHASE_FAILED);
        assert_eq!(
            now[DEVICES_TO_ALLOCATE], "",
            "the other writer's value stands"
        );
        // The kubelet's retry finds no pod waiting: the segment is never handed out twice.
        let retry = number(&allocator, 1).await.unwrap_err();
        assert!(
            matches!(retry, AllocateError::NoPendingPod { .. }),
            "{retry}"
        );
        settle(&allocator).await;
        let patches = store
            .writes()
            .iter()
            .filter(|w| matches!(w, Write::Patch(..)))
            .count();
        assert_eq!(patches, 1);
        let events = events(&store);
        assert_eq!(events.len(), 1);
        assert!(
            events[0]
                .1
                .starts_with("cannot advance volcano.sh/devices-to-allocate"),
            "{events:?}"
        );
    }

    #[tokio::test]
    async fn a_failing_write_marks_the_pod_failed_records_why_and_releases_the_node_lock() {
        let root = tempfile::tempdir().unwrap();
        let allocator = serving(
            root.path(),
            vec![bound("p", &[("c", Some(1), None)], "GPU-a,NVIDIA,1000,0:")],
        );
        let store = Arc::clone(&allocator.store);
        store.fail_next_patch(500);
        let error = number(&allocator, 1).await.unwrap_err();
        assert!(
            matches!(&error, AllocateError::Pod { cause: HandoffError::Advance(_), namespace, name }
                if namespace == "default" && name == "p"),
            "{error:?}"
        );
        let now = annotations(&store, "p");
        assert_eq!(now[BIND_PHASE], PHASE_FAILED);
        assert_eq!(now[VGPU_TIME], VGPU_TIME_DONE);
        assert_eq!(
            now[DEVICES_TO_ALLOCATE], "GPU-a,NVIDIA,1000,0:",
            "the queue is untouched"
        );
        settle(&allocator).await;
        let writes = store.writes();
        assert!(matches!(writes[0], Write::Patch(..)), "{writes:?}");
        assert_eq!(writes[1], Write::Failed("p".to_owned()));
        assert!(writes.contains(&Write::NodeLock), "{writes:?}");
        let events = events(&store);
        // The Event carries the cause once, without the pod's name the Event is already attached to.
        assert_eq!(events.len(), 1);
        assert_eq!(format!("pod default/p: {}", events[0].1), error.to_string());
    }

    #[tokio::test]
    async fn bad_annotations_fail_their_pod_by_field_and_the_next_pod_is_still_served() {
        let root = tempfile::tempdir().unwrap();
        let one = [("c", Some(1), None)];
        let malformed = bound("bad", &one, "GPU-a,NVIDIA,-1,0:");
        let mut priority = bound("urgent", &one, "GPU-a,NVIDIA,1000,0:");
        priority
            .annotations
            .insert(PRIORITY_ANNOTATION.to_owned(), "urgent".to_owned());
        priority
            .annotations
            .insert(VGPU_TIME.to_owned(), "1787220001".to_owned());
        let mut good = bound("good", &one, "GPU-b,NVIDIA,1000,0:");
        good.annotations
            .insert(VGPU_TIME.to_owned(), "1787220002".to_owned());
        let allocator = serving(root.path(), vec![malformed, priority, good]);
        let store = Arc::clone(&allocator.store);

        // The oldest pod first, usable or not: its queue names the field.
        let error = number(&allocator, 1).await.unwrap_err();
        assert!(
            matches!(
                &error,
                AllocateError::Pod {
                    cause: HandoffError::Unusable(_),
                    ..
                }
            ),
            "{error:?}"
        );
        let text = error.to_string();
        assert!(
            text.starts_with("pod default/bad: annotation volcano.sh/devices-to-allocate")
                && text.contains("used memory"),
            "{text}"
        );
        assert_eq!(annotations(&store, "bad")[BIND_PHASE], PHASE_FAILED);

        // Then the pod whose priority annotation names no priority: failed before anything is written for it.
        let error = number(&allocator, 1).await.unwrap_err();
        assert!(
            matches!(
                &error,
                AllocateError::Pod {
                    cause: HandoffError::Priority(_),
                    ..
                }
            ),
            "{error:?}"
        );
        assert_eq!(
            error.to_string(),
            "pod default/urgent: annotation volcano.sh/vgpu-task-priority is \"urgent\"; expected high, low, 0 (high) or 1 (low)"
        );
        assert_eq!(
            annotations(&store, "urgent")[DEVICES_TO_ALLOCATE],
            "GPU-a,NVIDIA,1000,0:"
        );
        assert!(!root.path().join("containers/uid-urgent_c").exists());

        assert_eq!(visible(number(&allocator, 1).await), "GPU-b");
        settle(&allocator).await;
        let failed: Vec<String> = events(&store).into_iter().map(|(pod, _)| pod).collect();
        assert_eq!(failed, ["bad", "urgent"]);
    }

    #[tokio::test]
    async fn drain_waits_for_the_call_in_flight_then_refuses_new_ones_without_touching_a_pod() {
        let root = tempfile::tempdir().unwrap();
        let allocator = serving(
            root.path(),
            vec![bound("p", &[("c", Some(1), None)], "GPU-a,NVIDIA,1000,0:")],
        );
        let in_flight = allocator.serial.lock().await;
        let short = Duration::from_millis(100);
        assert!(
            !allocator.drain(short).await,
            "the call in flight still holds the lock"
        );
        drop(in_flight);
        assert!(allocator.drain(short).await);
        let refused = number(&allocator, 1).await.unwrap_err();
        assert!(
            matches!(refused, AllocateError::Stopping { .. }),
            "{refused}"
        );
        assert!(
            refused.to_string().contains("node-a is stopping"),
            "{refused}"
        );
        assert!(allocator.store.writes().is_empty());
    }

    #[test]
    fn a_count_container_s_memory_call_is_owed_or_answered_whatever_the_order() {
        let mut calls = MemoryCalls::default();
        let (p, q) = (bound("p", &[], ""), bound("q", &[], ""));
        // Number first: the memory call of 1000 is owed and answered empty once.
        calls.handed_off(&p, 0, Some(1000));
        assert!(calls.take_owed(999).is_none());
        assert_eq!(
            calls.take_owed(1000),
            Some(("default".to_owned(), "p".to_owned(), "uid-p".to_owned()))
        );
        assert!(
            calls.take_owed(1000).is_none(),
            "the next memory-only container's call is served"
        );
        // Memory first: nothing is owed after the number call.
        calls.answered("uid-p", 1, 1000);
        calls.handed_off(&p, 1, Some(1000));
        assert!(calls.take_owed(1000).is_none());
        assert!(calls.entries.is_empty());
        // No memory limit, no memory call.
        calls.handed_off(&p, 2, None);
        calls.handed_off(&p, 3, Some(0));
        assert!(calls.entries.is_empty());
        for i in 0..1000 {
            calls.handed_off(&q, i, Some(1));
        }
        assert_eq!(calls.entries.len(), MemoryCalls::MOST + 1);
    }

    #[test]
    fn preferred_sizes_beyond_what_is_offered_are_refused_before_allocating() {
        let (inventory, plan) = node();
        let ok = ask(&["GPU-a-0", "GPU-b-9"], &["GPU-b-9"], 2);
        assert_eq!(validate_preferred(&inventory, &plan, &ok.request()), Ok(()));
        assert_eq!(prefer(&inventory, &plan, &ok.request(), &[]).len(), 2);
        for size in [i32::MAX, 3, -1, i32::MIN] {
            let err = validate_preferred(
                &inventory,
                &plan,
                &ask(&["GPU-a-0", "GPU-a-1"], &[], size).request(),
            )
            .unwrap_err()
            .to_string();
            assert!(
                err.starts_with(&format!("allocation_size {size} is not")),
                "{err}"
            );
        }
        assert!(validate_preferred(&inventory, &plan, &ask(&[], &[], 0).request()).is_ok());
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
            let err = validate_preferred(&inventory, &plan, &request.request())
                .unwrap_err()
                .to_string();
            assert!(err.contains(expected), "{expected}: {err}");
        }
        let many: Vec<String> = (0..21).map(|i| format!("GPU-a-{i}")).collect();
        let err = validate_allocate(&inventory, &plan, &many)
            .unwrap_err()
            .to_string();
        assert!(err.contains("names 21 IDs, not at most 20"), "{err}");
        assert_eq!(
            validate_allocate(&inventory, &plan, &[]),
            Err(RequestError::NoIds)
        );
        assert!(validate_allocate(&inventory, &plan, &["GPU-b-9".to_owned()]).is_ok());
    }
}
