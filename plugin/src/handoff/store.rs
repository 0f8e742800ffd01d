//! What the Allocate path needs from the cluster, as one trait ([`PodStore`]): the candidate pods on this
//! node, a fresh read of one pod, the guarded (compare-and-swap) JSON patch of its annotations, the `failed`
//! mark, a Warning Event on it, and the release of the scheduler's node lock. [`KubePodStore`] is the
//! apiserver's (the pod watch of [`PodCache`] and direct calls, each under the request bound of
//! [`ApiBounds`]); the unit tests of the hand-off use an in-memory store.
//!
//! Pods cross this boundary as [`PodView`]s, the parts of a pod the hand-off decides on.

use std::collections::BTreeMap;
use std::future::Future;

use k8s_openapi::api::core::v1::{Node, ObjectReference, Pod};
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Api, Client};

use crate::cluster::{ApiBounds, ApiCallError, bounded};
use crate::config::ResourceNames;
use crate::handoff::node_annotations::release_node_lock;
use crate::handoff::pod_cache::{PodCache, pod_view};
use crate::handoff::selection::PodView;
use crate::volcano::{
    BIND_PHASE, PHASE_ALLOCATING, PHASE_FAILED, VGPU_NODE, VGPU_TIME, VGPU_TIME_DONE,
};

/// The reason of the Event a failed hand-off records on its pod.
pub const FAILED_REASON: &str = "VGPUAllocateFailed";

/// Which pod, for the writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodKey {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// Its UID (empty when unknown).
    pub uid: String,
}

impl PodKey {
    /// The key of a pod view.
    pub fn of(pod: &PodView) -> Self {
        Self {
            namespace: pod.namespace.clone(),
            name: pod.name.clone(),
            uid: pod.uid.clone(),
        }
    }
}

impl std::fmt::Display for PodKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The cluster as the Allocate path sees it. Every call that reaches the apiserver is bounded by the store
/// (an error or [`ApiCallError::TimedOut`], never a hang); the futures are `Send` so the writes that follow a
/// hand-off can run off the Allocate lock.
pub trait PodStore: Send + Sync + 'static {
    /// The pods the watch has delivered that still wait for this node (`vgpu-node` is this node and
    /// `bind-phase` is `allocating`). No apiserver call; may lag behind the apiserver.
    fn cached_waiting(&self) -> Vec<PodView>;

    /// A fresh read of one pod; `None` when it is gone.
    fn get(
        &self,
        namespace: &str,
        name: &str,
    ) -> impl Future<Output = Result<Option<PodView>, ApiCallError>> + Send;

    /// A direct read of the pods bound to this node that still wait for it (as [`Self::cached_waiting`]).
    fn list_waiting(&self) -> impl Future<Output = Result<Vec<PodView>, ApiCallError>> + Send;

    /// Applies a JSON patch to the pod (all of it or, when a `test` fails, none of it) and returns its
    /// annotations as they are after the patch.
    fn patch_annotations(
        &self,
        pod: &PodKey,
        what: &str,
        patch: json_patch::Patch,
    ) -> impl Future<Output = Result<BTreeMap<String, String>, ApiCallError>> + Send;

    /// Marks the pod `bind-phase=failed`, `vgpu-time` done, so no later call sees it `allocating`.
    fn mark_failed(&self, pod: &PodKey) -> impl Future<Output = Result<(), ApiCallError>> + Send;

    /// Records a Warning Event on the pod ([`FAILED_REASON`], action `Allocate`).
    fn record_failure(
        &self,
        pod: &PodKey,
        note: &str,
    ) -> impl Future<Output = Result<(), ApiCallError>> + Send;

    /// Releases the scheduler's node lock if it is held; whether it wrote.
    fn release_node_lock(&self) -> impl Future<Output = bool> + Send;
}

/// Whether the scheduler bound `annotations`' pod to `node` and it is still `allocating`: the cheap part of
/// the candidate test, so most of the node's pods (long done) are never turned into views.
fn waiting_here(annotations: Option<&BTreeMap<String, String>>, node: &str) -> bool {
    annotations.is_some_and(|a| {
        a.get(VGPU_NODE).map(String::as_str) == Some(node)
            && a.get(BIND_PHASE).map(String::as_str) == Some(PHASE_ALLOCATING)
    })
}

/// The apiserver: the pod watch for the candidates, direct calls for the rest, each under `bounds.request`.
#[derive(Clone)]
pub struct KubePodStore {
    client: Client,
    node: String,
    pods: PodCache,
    nodes: Api<Node>,
    names: ResourceNames,
    recorder: Recorder,
    bounds: ApiBounds,
}

impl std::fmt::Debug for KubePodStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubePodStore")
            .field("node", &self.node)
            .field("bounds", &self.bounds)
            .finish_non_exhaustive()
    }
}

impl KubePodStore {
    /// The store of `node` on `client` (the requests client), with the watch of `pods`; `names` are the
    /// resource names a pod's limits are read under.
    pub fn new(
        client: Client,
        node: &str,
        pods: PodCache,
        names: ResourceNames,
        bounds: ApiBounds,
    ) -> Self {
        let reporter = Reporter {
            controller: "vgpu-device-plugin".into(),
            instance: Some(node.to_owned()),
        };
        Self {
            nodes: Api::all(client.clone()),
            recorder: Recorder::new(client.clone(), reporter),
            client,
            node: node.to_owned(),
            pods,
            names,
            bounds,
        }
    }

    fn pods_in(&self, namespace: &str) -> Api<Pod> {
        Api::namespaced(self.client.clone(), namespace)
    }
}

impl PodStore for KubePodStore {
    fn cached_waiting(&self) -> Vec<PodView> {
        self.pods
            .cached()
            .iter()
            .filter(|p| waiting_here(p.metadata.annotations.as_ref(), &self.node))
            .map(|p| pod_view(p, &self.names))
            .collect()
    }

    async fn get(&self, namespace: &str, name: &str) -> Result<Option<PodView>, ApiCallError> {
        let pod = bounded(
            &format!("read pod {namespace}/{name}"),
            self.bounds.request,
            self.pods_in(namespace).get_opt(name),
        )
        .await?;
        Ok(pod.map(|p| pod_view(&p, &self.names)))
    }

    async fn list_waiting(&self) -> Result<Vec<PodView>, ApiCallError> {
        let listed = bounded(
            &format!("list the pods of node {}", self.node),
            self.bounds.request,
            self.pods.list_direct(),
        )
        .await?;
        Ok(listed
            .iter()
            .filter(|p| waiting_here(p.metadata.annotations.as_ref(), &self.node))
            .map(|p| pod_view(p, &self.names))
            .collect())
    }

    async fn patch_annotations(
        &self,
        pod: &PodKey,
        what: &str,
        patch: json_patch::Patch,
    ) -> Result<BTreeMap<String, String>, ApiCallError> {
        let updated = bounded(
            what,
            self.bounds.request,
            self.pods_in(&pod.namespace).patch(
                &pod.name,
                &PatchParams::default(),
                &Patch::<()>::Json(patch),
            ),
        )
        .await?;
        Ok(updated.metadata.annotations.unwrap_or_default())
    }

    async fn mark_failed(&self, pod: &PodKey) -> Result<(), ApiCallError> {
        // A merge patch: it only sets two annotations, whatever else is there (no `test` to guard).
        let body = serde_json::json!({ "metadata": { "annotations": {
            BIND_PHASE: PHASE_FAILED, VGPU_TIME: VGPU_TIME_DONE,
        } } });
        bounded(
            "patch",
            self.bounds.request,
            self.pods_in(&pod.namespace).patch(
                &pod.name,
                &PatchParams::default(),
                &Patch::Merge(&body),
            ),
        )
        .await
        .map(drop)
    }

    async fn record_failure(&self, pod: &PodKey, note: &str) -> Result<(), ApiCallError> {
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
            reason: FAILED_REASON.into(),
            note: Some(note.to_owned()),
            action: "Allocate".into(),
            secondary: None,
        };
        bounded(
            &format!("record an event on pod {pod}"),
            self.bounds.request,
            self.recorder.publish(&event, &reference),
        )
        .await
    }

    async fn release_node_lock(&self) -> bool {
        release_node_lock(&self.nodes, &self.node, self.bounds.request).await
    }
}

#[cfg(test)]
pub(crate) mod memory {
    //! An in-memory [`PodStore`] for the hand-off's unit tests: pods as views, JSON patches applied for real
    //! (a failed `test` is the apiserver's 422), and switches for a watch that lags, a concurrent writer and a
    //! write that fails.

    use std::collections::BTreeMap;
    use std::sync::Mutex;
    use std::time::Duration;

    use super::{PodKey, PodStore, waiting_here};
    use crate::cluster::ApiCallError;
    use crate::handoff::selection::PodView;
    use crate::volcano::{BIND_PHASE, PHASE_FAILED, VGPU_TIME, VGPU_TIME_DONE};

    /// What the store was asked to write, in order.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub(crate) enum Write {
        /// A JSON patch of a pod, by name, and its operations as JSON.
        Patch(String, serde_json::Value),
        /// The `failed` mark of a pod.
        Failed(String),
        /// A failure Event on a pod, and its note.
        Event(String, String),
        /// The node lock was released.
        NodeLock,
    }

    #[derive(Debug, Default)]
    struct State {
        pods: Vec<PodView>,
        /// What the watch shows instead of `pods`, while it lags.
        stale: Option<Vec<PodView>>,
        /// Set on a pod just before the next patch lands: another writer got there first.
        interfere: Option<(String, String, String)>,
        /// The next patch fails with this status code, untouched.
        fail_patch: Option<u16>,
        writes: Vec<Write>,
    }

    /// The in-memory store.
    #[derive(Debug, Default)]
    pub(crate) struct MemoryPodStore {
        node: String,
        state: Mutex<State>,
    }

    impl MemoryPodStore {
        pub(crate) fn new(node: &str, pods: Vec<PodView>) -> Self {
            Self {
                node: node.to_owned(),
                state: Mutex::new(State {
                    pods,
                    ..State::default()
                }),
            }
        }

        fn state(&self) -> std::sync::MutexGuard<'_, State> {
            self.state.lock().unwrap_or_else(|e| e.into_inner())
        }

        /// The pod as it is now.
        pub(crate) fn pod(&self, name: &str) -> PodView {
            let state = self.state();
            state
                .pods
                .iter()
                .find(|p| p.name == name)
                .cloned()
                .unwrap_or_default()
        }

        /// The kubelet sets pod `name`'s `status.phase` (e.g. `Failed` when its admission failed).
        pub(crate) fn set_phase(&self, name: &str, phase: &str) {
            let mut state = self.state();
            if let Some(p) = state.pods.iter_mut().find(|p| p.name == name) {
                p.phase = Some(phase.to_owned());
            }
        }

        /// The scheduler binds another pod to the node.
        pub(crate) fn add(&self, pod: PodView) {
            self.state().pods.push(pod);
        }

        /// From now on the watch shows the pods as they are now: it lags behind every later write.
        pub(crate) fn watch_lags(&self) {
            let mut state = self.state();
            state.stale = Some(state.pods.clone());
        }

        /// Before the next patch, another writer sets `key` of pod `name` to `value`.
        pub(crate) fn interfere_before_next_patch(&self, name: &str, key: &str, value: &str) {
            self.state().interfere = Some((name.to_owned(), key.to_owned(), value.to_owned()));
        }

        /// The next patch fails with `code` and changes nothing.
        pub(crate) fn fail_next_patch(&self, code: u16) {
            self.state().fail_patch = Some(code);
        }

        /// Everything written so far.
        pub(crate) fn writes(&self) -> Vec<Write> {
            self.state().writes.clone()
        }
    }

    fn api_error(what: &str, code: u16, message: &str) -> ApiCallError {
        ApiCallError::Failed {
            what: what.to_owned(),
            source: kube::Error::Api(
                kube::core::Status::failure(message, "Invalid")
                    .with_code(code)
                    .boxed(),
            ),
        }
    }

    impl PodStore for MemoryPodStore {
        fn cached_waiting(&self) -> Vec<PodView> {
            let state = self.state();
            state
                .stale
                .as_ref()
                .unwrap_or(&state.pods)
                .iter()
                .filter(|p| waiting_here(Some(&p.annotations), &self.node))
                .cloned()
                .collect()
        }

        async fn get(&self, namespace: &str, name: &str) -> Result<Option<PodView>, ApiCallError> {
            let state = self.state();
            Ok(state
                .pods
                .iter()
                .find(|p| p.namespace == namespace && p.name == name)
                .cloned())
        }

        async fn list_waiting(&self) -> Result<Vec<PodView>, ApiCallError> {
            let state = self.state();
            Ok(state
                .pods
                .iter()
                .filter(|p| waiting_here(Some(&p.annotations), &self.node))
                .cloned()
                .collect())
        }

        async fn patch_annotations(
            &self,
            pod: &PodKey,
            what: &str,
            patch: json_patch::Patch,
        ) -> Result<BTreeMap<String, String>, ApiCallError> {
            let mut state = self.state();
            let ops = serde_json::to_value(&patch).unwrap_or_default();
            state.writes.push(Write::Patch(pod.name.clone(), ops));
            if let Some(code) = state.fail_patch.take() {
                return Err(api_error(what, code, "the apiserver refused the write"));
            }
            if let Some((name, key, value)) = state.interfere.take()
                && let Some(p) = state.pods.iter_mut().find(|p| p.name == name)
            {
                p.annotations.insert(key, value);
            }
            let Some(target) = state.pods.iter_mut().find(|p| p.name == pod.name) else {
                return Err(api_error(what, 404, "pods not found"));
            };
            let mut doc = serde_json::json!({ "metadata": { "annotations": target.annotations } });
            json_patch::patch(&mut doc, &patch)
                .map_err(|e| api_error(what, 422, &e.to_string()))?;
            target.annotations = serde_json::from_value(doc["metadata"]["annotations"].take())
                .map_err(|e| api_error(what, 422, &e.to_string()))?;
            Ok(target.annotations.clone())
        }

        async fn mark_failed(&self, pod: &PodKey) -> Result<(), ApiCallError> {
            let mut state = self.state();
            state.writes.push(Write::Failed(pod.name.clone()));
            if let Some(p) = state.pods.iter_mut().find(|p| p.name == pod.name) {
                p.annotations
                    .insert(BIND_PHASE.to_owned(), PHASE_FAILED.to_owned());
                p.annotations
                    .insert(VGPU_TIME.to_owned(), VGPU_TIME_DONE.to_owned());
            }
            Ok(())
        }

        async fn record_failure(&self, pod: &PodKey, note: &str) -> Result<(), ApiCallError> {
            // Events reach the apiserver after the kubelet's answer; a little later here too.
            tokio::time::sleep(Duration::from_millis(1)).await;
            self.state()
                .writes
                .push(Write::Event(pod.name.clone(), note.to_owned()));
            Ok(())
        }

        async fn release_node_lock(&self) -> bool {
            self.state().writes.push(Write::NodeLock);
            true
        }
    }
}
