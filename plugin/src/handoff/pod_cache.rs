//! The pods bound to this node, from a watch (field selector `spec.nodeName=<node>`), with a direct,
//! equally node-scoped LIST as the fallback for a pod the watch has not delivered yet. Nothing here ever lists
//! every pod in the cluster (the Go plugin does, on every Allocate).

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Container, Pod};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::ListParams;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tokio::task::JoinHandle;

use crate::cluster::{ApiBounds, WatchBackoff};
use crate::config::ResourceNames;
use crate::handoff::selection::{ContainerLimits, PodView};

/// The node's pods.
#[derive(Clone)]
pub struct PodCache {
    store: Store<Pod>,
    pods: Api<Pod>,
    node: String,
}

impl std::fmt::Debug for PodCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodCache")
            .field("node", &self.node)
            .field("cached", &self.store.state().len())
            .finish()
    }
}

impl PodCache {
    /// Starts the watch on one client with the default bounds (benchmarks, tools); see [`Self::start_bounded`].
    pub fn start(client: Client, node: &str) -> (Self, JoinHandle<()>) {
        Self::start_bounded(client.clone(), client, node, ApiBounds::default())
    }

    /// Starts the watch on `watches` (its LIST and WATCH) and reads directly on `requests`. The watch asks the
    /// apiserver to end it after [`ApiBounds::watch_timeout`], so a stream silent for longer than that (plus
    /// the way) is a dead one: the watches client's read bound fails it and the watcher starts again, resuming
    /// from the last resourceVersion. The task runs until aborted and rides out apiserver outages with backoff.
    pub fn start_bounded(
        requests: Client,
        watches: Client,
        node: &str,
        bounds: ApiBounds,
    ) -> (Self, JoinHandle<()>) {
        let pods: Api<Pod> = Api::all(requests);
        let (store, writer) = reflector::store();
        let selector = format!("spec.nodeName={node}");
        let config = watcher::Config::default()
            .fields(&selector)
            .timeout(bounds.watch_timeout_secs());
        let stream = reflector::reflector(writer, watcher(Api::all(watches), config))
            .backoff(WatchBackoff::default());
        let task = tokio::spawn(async move {
            let mut failing = false;
            let mut stream = std::pin::pin!(stream);
            while let Some(event) = stream.next().await {
                match event {
                    Ok(_) if failing => {
                        tracing::info!("pod watch recovered");
                        failing = false;
                    }
                    Ok(_) => {}
                    Err(error) if !failing => {
                        tracing::warn!(%error, "pod watch failed; retrying with backoff (Allocate falls back to direct reads)");
                        failing = true;
                    }
                    Err(_) => {}
                }
            }
        });
        (
            Self {
                store,
                pods,
                node: node.to_owned(),
            },
            task,
        )
    }

    /// The pods the watch has delivered.
    pub fn cached(&self) -> Vec<Arc<Pod>> {
        self.store.state()
    }

    /// A direct read of the pods bound to this node.
    pub async fn list_direct(&self) -> kube::Result<Vec<Pod>> {
        let params = ListParams::default().fields(&format!("spec.nodeName={}", self.node));
        Ok(self.pods.list(&params).await?.items)
    }

    /// Waits up to `timeout` for the first full list, so the first Allocate after start does not have to
    /// fall back to a direct read.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        tokio::time::timeout(timeout, self.store.wait_until_ready())
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

/// Each container of `pod` the kubelet has reported a runtime ID for, as `(container name, ID)`: the ID of
/// `status.containerStatuses[].containerID` (and of init and ephemeral containers) without its runtime prefix
/// (`containerd://`, `cri-o://`, `docker://`), lower-cased, as a cgroup path names it. A status without an ID
/// yet (the container is being created) is skipped.
pub fn container_ids(pod: &Pod) -> impl Iterator<Item = (&str, String)> {
    let status = pod.status.as_ref();
    status
        .into_iter()
        .flat_map(|s| {
            [
                s.container_statuses.as_deref(),
                s.init_container_statuses.as_deref(),
                s.ephemeral_container_statuses.as_deref(),
            ]
        })
        .flatten()
        .flatten()
        .filter_map(|c| {
            let raw = c.container_id.as_deref()?;
            let id = raw.rsplit_once("://").map_or(raw, |(_, id)| id);
            (!id.is_empty()).then(|| (c.name.as_str(), id.to_ascii_lowercase()))
        })
}

/// The parts of a pod the selection rules look at.
pub fn pod_view(pod: &Pod, names: &ResourceNames) -> PodView {
    let meta = &pod.metadata;
    let containers = pod
        .spec
        .as_ref()
        .map(|s| s.containers.iter().map(|c| limits(c, names)).collect())
        .unwrap_or_default();
    PodView {
        namespace: meta.namespace.clone().unwrap_or_default(),
        name: meta.name.clone().unwrap_or_default(),
        uid: meta.uid.clone().unwrap_or_default(),
        phase: pod.status.as_ref().and_then(|s| s.phase.clone()),
        node_name: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
        creation_timestamp: meta.creation_timestamp.as_ref().map(|t| t.0.as_second()),
        annotations: meta.annotations.clone().unwrap_or_default(),
        containers,
        init_with_vgpu: pod
            .spec
            .as_ref()
            .and_then(|s| s.init_containers.as_ref())
            .into_iter()
            .flatten()
            .map(|c| limits(c, names))
            .filter(ContainerLimits::has_vgpu)
            .collect(),
        started: pod.status.as_ref().is_some_and(|s| s.start_time.is_some())
            || container_ids(pod).next().is_some(),
    }
}

fn limits(container: &Container, names: &ResourceNames) -> ContainerLimits {
    let limit = |name: &str| {
        let resources = container.resources.as_ref()?;
        resources
            .limits
            .as_ref()
            .and_then(|l| l.get(name))
            .and_then(quantity_value)
    };
    ContainerLimits {
        name: container.name.clone(),
        count: limit(&names.number),
        // The scheduler takes memory from limits, then requests.
        memory: limit(&names.memory).or_else(|| {
            container
                .resources
                .as_ref()
                .and_then(|r| r.requests.as_ref())
                .and_then(|r| r.get(&names.memory))
                .and_then(quantity_value)
        }),
        disable_control: container
            .env
            .as_ref()
            .is_some_and(|env| env.iter().any(|e| e.name == "CUDA_DISABLE_CONTROL")),
    }
}

/// Extended resources are whole numbers; accept the decimal SI and binary suffixes Kubernetes allows.
pub fn quantity_value(q: &Quantity) -> Option<u64> {
    let text = q.0.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, suffix) = text.split_at(split);
    let base: u64 = digits.parse().ok()?;
    let multiplier: u64 = match suffix {
        "" => 1,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        _ => return None,
    };
    base.checked_mul(multiplier)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_ids_drop_the_runtime_prefix_and_skip_containers_without_one() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p"},
            "status": {
                "containerStatuses": [
                    {"name": "a", "image": "i", "imageID": "", "ready": true, "restartCount": 0,
                     "containerID": "containerd://ABC123"},
                    {"name": "b", "image": "i", "imageID": "", "ready": false, "restartCount": 0},
                    {"name": "c", "image": "i", "imageID": "", "ready": true, "restartCount": 0,
                     "containerID": "cri-o://def"},
                ],
                "initContainerStatuses": [
                    {"name": "init", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
                     "containerID": "docker://0f"},
                ],
            }
        }))
        .unwrap();
        let ids: Vec<(&str, String)> = container_ids(&pod).collect();
        assert_eq!(
            ids,
            [
                ("a", "abc123".to_owned()),
                ("c", "def".to_owned()),
                ("init", "0f".to_owned())
            ]
        );
    }

    #[test]
    fn a_pod_counts_as_started_once_it_has_a_start_time_or_a_container_id() {
        let names = ResourceNames::default();
        let view = |status: serde_json::Value| {
            let pod: Pod = serde_json::from_value(
                serde_json::json!({"metadata": {"name": "p"}, "status": status}),
            )
            .unwrap();
            pod_view(&pod, &names).started
        };
        assert!(!view(serde_json::json!({"phase": "Pending"})));
        assert!(view(
            serde_json::json!({"phase": "Pending", "startTime": "2026-12-06T10:00:00Z"})
        ));
        assert!(view(
            serde_json::json!({"phase": "Pending", "containerStatuses": [
            {"name": "a", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
             "containerID": "containerd://ab"}]})
        ));
        // A status the kubelet wrote before the container was created names no runtime ID yet.
        assert!(!view(
            serde_json::json!({"phase": "Pending", "containerStatuses": [
            {"name": "a", "image": "i", "imageID": "", "ready": false, "restartCount": 0}]})
        ));
    }

    #[test]
    fn quantities_parse_as_whole_numbers() {
        let q = |s: &str| quantity_value(&Quantity(s.into()));
        assert_eq!(q("3000"), Some(3000));
        assert_eq!(q("2k"), Some(2000));
        assert_eq!(q("1Ki"), Some(1024));
        assert_eq!(q("1.5"), None);
        assert_eq!(q("-1"), None);
        assert_eq!(q("99999999999999999999"), None);
    }
}
