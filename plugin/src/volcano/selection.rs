//! Which pod, and which of its containers, an Allocate call is for (contract §3.2).
//!
//! The kubelet's AllocateRequest names device IDs only, so the pod is inferred from the scheduler's
//! annotations. The rules here are ours; they fix the Go plugin's selection bugs (contract §10):
//! - #2/#3: the request size is compared with the **next segment's** device count, not the pod's total, so a
//!   pod with two 1-vGPU containers is found for each of its two Allocate calls;
//! - #4: segment k belongs to the k-th container that has a vGPU limit, not to `spec.containers[k]`, so a
//!   sidecar before the GPU container no longer takes its devices (and init containers never count);
//! - #5: only `Pending` pods still in bind-phase `allocating` are candidates, so a running pod whose final
//!   PATCH failed is never handed out again;
//! - #9: a memory-only container (no `vgpu-number` limit) is served by the memory endpoint, the only one the
//!   kubelet calls for it.
//!
//! Among candidates the smallest `vgpu-time` wins, then the older pod, then namespace/name: the answer does not
//! depend on list order. The Go plugin takes the **last** listed pod on a `vgpu-time` tie, which with its
//! 1-second resolution makes gang pods land in list order, i.e. at random; the kubelet admits pods in
//! creation order, so the older pod is the one it is asking about.

use std::collections::BTreeMap;

use super::pod_devices::{ContainerDevice, PodDevices};
use super::{
    AnnotationError, BIND_PHASE, DEVICES_TO_ALLOCATE, PHASE_ALLOCATING, VGPU_NODE, VGPU_TIME,
};

/// `status.phase` of a pod the kubelet has not started yet.
pub const PHASE_PENDING: &str = "Pending";

/// What the agent needs of one entry of `spec.containers`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ContainerLimits {
    /// Container name.
    pub name: String,
    /// The `vgpu-number` limit, if present (even 0: the scheduler writes a segment for it).
    pub count: Option<u64>,
    /// The `vgpu-memory` limit in units, if present.
    pub memory: Option<u64>,
    /// The container spec has an env var named `CUDA_DISABLE_CONTROL`, whatever its value.
    pub disable_control: bool,
}

impl ContainerLimits {
    /// Whether the scheduler gave this container a segment: it has a count or a memory limit.
    pub fn has_vgpu(&self) -> bool {
        self.count.is_some() || self.memory.is_some()
    }
}

/// What the agent needs of one pod.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PodView {
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// `metadata.uid`.
    pub uid: String,
    /// `status.phase`.
    pub phase: Option<String>,
    /// `spec.nodeName`.
    pub node_name: Option<String>,
    /// `metadata.creationTimestamp` in Unix seconds.
    pub creation_timestamp: Option<i64>,
    /// `metadata.annotations`.
    pub annotations: BTreeMap<String, String>,
    /// `spec.containers` only, in order (init containers never get a segment).
    pub containers: Vec<ContainerLimits>,
}

/// Which kubelet endpoint is asking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllocatingEndpoint {
    /// `vgpu-number`: the request size is a number of vGPUs.
    Number,
    /// `vgpu-memory`: the request size is a number of memory units; it allocates only memory-only containers.
    Memory,
}

/// The devices one container gets now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    /// Index of the `;` segment in `devices-to-allocate`.
    pub segment: usize,
    /// Index into [`PodView::containers`].
    pub container: usize,
    /// The segment's NVIDIA devices.
    pub devices: Vec<ContainerDevice>,
    /// The whole queue with [`Self::devices`] taken off: what `devices-to-allocate` becomes.
    pub rest: PodDevices,
}

/// Indices of the containers with a count or a memory limit: segment k belongs to the k-th of these.
pub fn gpu_containers(pod: &PodView) -> Vec<usize> {
    pod.containers
        .iter()
        .enumerate()
        .filter(|(_, c)| c.has_vgpu())
        .map(|(i, _)| i)
        .collect()
}

/// The next container to allocate and its devices; `Ok(None)` when nothing is left (or the pod has no
/// `devices-to-allocate` at all).
///
/// An error means the annotation cannot be trusted: it does not decode, or its segments do not line up with
/// the pod's vGPU containers (the scheduler writes exactly one per such container, so a mismatch would hand
/// devices to the wrong container).
pub fn next_assignment(pod: &PodView) -> Result<Option<Assignment>, AnnotationError> {
    let Some(value) = pod.annotations.get(DEVICES_TO_ALLOCATE) else {
        return Ok(None);
    };
    let mut devices = PodDevices::decode(DEVICES_TO_ALLOCATE, value)?;
    let Some(segment) = devices.next_segment() else {
        return Ok(None);
    };
    let gpu = gpu_containers(pod);
    if devices.0.len() != gpu.len() {
        return Err(AnnotationError::new(
            DEVICES_TO_ALLOCATE,
            format!(
                "whole value ({} segments, but the pod has {} containers with a vgpu-number or vgpu-memory limit)",
                devices.0.len(),
                gpu.len()
            ),
            value,
            "one segment per container with a vgpu-number or vgpu-memory limit",
        ));
    }
    let Some(&container) = gpu.get(segment) else {
        // Unreachable given the length check, but an error is cheaper than a proof.
        return Err(AnnotationError::new(
            DEVICES_TO_ALLOCATE,
            format!("segment {segment}"),
            value,
            "a segment that belongs to a container with a vGPU limit",
        ));
    };
    Ok(Some(Assignment {
        segment,
        container,
        devices: devices.take_segment(segment),
        rest: devices,
    }))
}

/// Whether this pod is the one an Allocate call of `request_size` IDs on `endpoint` can be for: `Pending`,
/// bound to `node` by the scheduler, still `allocating`, and its next container wants exactly this request.
///
/// For [`AllocatingEndpoint::Number`] the next container has a count limit and its segment holds
/// `request_size` devices; for [`AllocatingEndpoint::Memory`] it has no count limit and a memory limit of
/// `request_size` units. A pod whose `spec.nodeName` names another node is never a candidate (the kubelet only
/// admits its own pods); one with no `nodeName` yet still is, since a lister can lag behind the bind.
pub fn matches(
    pod: &PodView,
    node: &str,
    endpoint: AllocatingEndpoint,
    request_size: usize,
) -> bool {
    if !is_allocating_on(pod, node) {
        return false;
    }
    let Ok(Some(assignment)) = next_assignment(pod) else {
        return false;
    };
    let Some(container) = pod.containers.get(assignment.container) else {
        return false;
    };
    match endpoint {
        AllocatingEndpoint::Number => {
            container.count.is_some() && assignment.devices.len() == request_size
        }
        AllocatingEndpoint::Memory => {
            container.count.is_none()
                && container.memory.is_some()
                && container.memory == u64::try_from(request_size).ok()
        }
    }
}

/// The pod an Allocate call is for, as an index into `pods`; see the module docs for the order.
pub fn select_pending_pod(
    pods: &[PodView],
    node: &str,
    endpoint: AllocatingEndpoint,
    request_size: usize,
) -> Option<usize> {
    pods.iter()
        .enumerate()
        .filter(|(_, pod)| matches(pod, node, endpoint, request_size))
        .min_by(|(_, a), (_, b)| order_key(a).cmp(&order_key(b)))
        .map(|(index, _)| index)
}

/// The pods that would be candidates on `node` but whose annotations cannot be used, with the reason, so the
/// caller can log each one instead of silently skipping it.
pub fn malformed_pods(pods: &[PodView], node: &str) -> Vec<(usize, AnnotationError)> {
    pods.iter()
        .enumerate()
        .filter(|(_, pod)| is_allocating_on(pod, node))
        .filter_map(|(index, pod)| next_assignment(pod).err().map(|err| (index, err)))
        .collect()
}

/// `vgpu-time` as the Go plugin reads it: missing or not a plain decimal `u64` counts as `u64::MAX` (last).
pub fn vgpu_time(pod: &PodView) -> u64 {
    pod.annotations
        .get(VGPU_TIME)
        .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|t| t.parse().ok())
        .unwrap_or(u64::MAX)
}

/// Pending, bound to `node` by the scheduler, and waiting for the agent.
fn is_allocating_on(pod: &PodView, node: &str) -> bool {
    pod.phase.as_deref() == Some(PHASE_PENDING)
        && pod.annotations.get(VGPU_NODE).map(String::as_str) == Some(node)
        && pod.node_name.as_deref().is_none_or(|n| n == node)
        && pod.annotations.get(BIND_PHASE).map(String::as_str) == Some(PHASE_ALLOCATING)
}

/// Smallest `vgpu-time`, then oldest (a missing timestamp sorts last), then namespace/name.
fn order_key(pod: &PodView) -> (u64, i64, &str, &str) {
    (
        vgpu_time(pod),
        pod.creation_timestamp.unwrap_or(i64::MAX),
        &pod.namespace,
        &pod.name,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volcano::{PHASE_SUCCESS, VGPU_TIME_DONE};

    const A: &str = "GPU-0fc3eda5-e98b-a25b-5b0d-cf5c855d1448";
    const B: &str = "GPU-8664316c-6888-5063-1e4d-f2a09cfbf180";

    fn limits(name: &str, count: Option<u64>, memory: Option<u64>) -> ContainerLimits {
        ContainerLimits {
            name: name.to_owned(),
            count,
            memory,
            disable_control: false,
        }
    }

    fn pod(name: &str, time: &str, queue: &str, containers: Vec<ContainerLimits>) -> PodView {
        let annotations = [
            (VGPU_NODE, "node-a"),
            (VGPU_TIME, time),
            (BIND_PHASE, PHASE_ALLOCATING),
            (DEVICES_TO_ALLOCATE, queue),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        PodView {
            namespace: "default".to_owned(),
            name: name.to_owned(),
            uid: format!("uid-{name}"),
            phase: Some(PHASE_PENDING.to_owned()),
            node_name: Some("node-a".to_owned()),
            creation_timestamp: Some(1_787_219_000),
            annotations,
            containers,
        }
    }

    fn one(uuid: &str, mem: u32) -> String {
        format!("{uuid},NVIDIA,{mem},0:")
    }

    fn single(name: &str, time: &str) -> PodView {
        pod(
            name,
            time,
            &one(A, 1000),
            vec![limits("cuda", Some(1), Some(1000))],
        )
    }

    #[test]
    fn sidecar_before_the_gpu_container_does_not_take_its_devices() {
        let p = pod(
            "p",
            "1",
            &one(A, 1000),
            vec![
                limits("sidecar", None, None),
                limits("cuda", Some(1), Some(1000)),
            ],
        );
        assert_eq!(gpu_containers(&p), vec![1]);
        let a = next_assignment(&p).unwrap().unwrap();
        assert_eq!((a.segment, a.container), (0, 1));
        assert_eq!(a.devices[0].uuid, A);
    }

    #[test]
    fn multi_container_pod_is_found_for_each_container_in_turn() {
        let containers = vec![
            limits("trainer", Some(1), None),
            limits("sidecar", None, None),
            limits("eval", Some(2), None),
        ];
        let queue = format!("{};{}{}", one(A, 1000), one(B, 2000), one(A, 2000));
        let mut p = pod("multi", "1", &queue, containers);
        let pods = [p.clone()];
        // The Go plugin compares the pod's total (3) with the request and finds nothing.
        assert_eq!(
            select_pending_pod(&pods, "node-a", AllocatingEndpoint::Number, 1),
            Some(0)
        );
        assert_eq!(
            select_pending_pod(&pods, "node-a", AllocatingEndpoint::Number, 3),
            None
        );
        let a = next_assignment(&p).unwrap().unwrap();
        assert_eq!((a.segment, a.container, a.devices.len()), (0, 0, 1));

        let mut devices = PodDevices::decode(DEVICES_TO_ALLOCATE, &queue).unwrap();
        devices.take_segment(0);
        p.annotations
            .insert(DEVICES_TO_ALLOCATE.to_owned(), devices.encode());
        assert!(!matches(&p, "node-a", AllocatingEndpoint::Number, 1));
        assert!(matches(&p, "node-a", AllocatingEndpoint::Number, 2));
        let a = next_assignment(&p).unwrap().unwrap();
        assert_eq!((a.segment, a.container, a.devices.len()), (1, 2, 2));
    }

    #[test]
    fn init_containers_never_count() {
        // PodView carries spec.containers only; an init container's limits simply are not there, so the only
        // segment maps to the first app container with a limit.
        let p = pod("p", "1", &one(A, 1000), vec![limits("app", Some(1), None)]);
        assert_eq!(next_assignment(&p).unwrap().unwrap().container, 0);
    }

    #[test]
    fn memory_only_container_is_served_by_the_memory_endpoint() {
        let p = pod(
            "mem",
            "1",
            &one(A, 4096),
            vec![limits("cuda", None, Some(4096))],
        );
        assert!(matches(&p, "node-a", AllocatingEndpoint::Memory, 4096));
        assert!(!matches(&p, "node-a", AllocatingEndpoint::Memory, 4095));
        assert!(!matches(&p, "node-a", AllocatingEndpoint::Number, 1));
        // A container with a count limit is the number endpoint's, even if its memory matches.
        let both = single("both", "1");
        assert!(!matches(&both, "node-a", AllocatingEndpoint::Memory, 1000));
        assert!(matches(&both, "node-a", AllocatingEndpoint::Number, 1));
    }

    #[test]
    fn two_pods_bound_in_the_same_second_go_oldest_first_whatever_the_list_order() {
        let mut older = single("zeta", "1787220000");
        older.creation_timestamp = Some(100);
        let mut newer = single("alpha", "1787220000");
        newer.creation_timestamp = Some(200);
        let pods = [newer.clone(), older.clone()];
        assert_eq!(
            select_pending_pod(&pods, "node-a", AllocatingEndpoint::Number, 1),
            Some(1)
        );
        let pods = [older, newer];
        assert_eq!(
            select_pending_pod(&pods, "node-a", AllocatingEndpoint::Number, 1),
            Some(0)
        );
    }

    #[test]
    fn full_tie_falls_back_to_namespace_then_name() {
        let a = single("a", "5");
        let b = single("b", "5");
        let mut other_ns = single("a", "5");
        other_ns.namespace = "aaa".to_owned();
        for pods in [
            [b.clone(), a.clone(), other_ns.clone()],
            [other_ns.clone(), b.clone(), a.clone()],
        ] {
            let i = select_pending_pod(&pods, "node-a", AllocatingEndpoint::Number, 1).unwrap();
            assert_eq!(
                (pods[i].namespace.as_str(), pods[i].name.as_str()),
                ("aaa", "a")
            );
        }
        let mut unknown_age = single("0", "5");
        unknown_age.creation_timestamp = None;
        let pods = [unknown_age, b];
        assert_eq!(
            select_pending_pod(&pods, "node-a", AllocatingEndpoint::Number, 1),
            Some(1)
        );
    }

    #[test]
    fn smaller_vgpu_time_beats_age() {
        let mut early = single("early", "10");
        early.creation_timestamp = Some(500);
        let mut late = single("late", "20");
        late.creation_timestamp = Some(1);
        let pods = [late, early];
        assert_eq!(
            select_pending_pod(&pods, "node-a", AllocatingEndpoint::Number, 1),
            Some(1)
        );
    }

    #[test]
    fn pod_already_done_never_matches() {
        let mut done = pod(
            "done",
            VGPU_TIME_DONE,
            "",
            vec![limits("cuda", Some(1), None)],
        );
        assert_eq!(next_assignment(&done).unwrap(), None);
        assert!(!matches(&done, "node-a", AllocatingEndpoint::Number, 1));
        assert_eq!(vgpu_time(&done), u64::MAX);
        done.annotations
            .insert(BIND_PHASE.to_owned(), PHASE_SUCCESS.to_owned());
        let pods = [done, single("p", "3")];
        assert_eq!(
            select_pending_pod(&pods, "node-a", AllocatingEndpoint::Number, 1),
            Some(1)
        );
    }

    #[test]
    fn only_pending_allocating_pods_on_this_node_are_candidates() {
        let base = single("p", "1");
        assert!(matches(&base, "node-a", AllocatingEndpoint::Number, 1));
        assert!(!matches(&base, "node-b", AllocatingEndpoint::Number, 1));

        let mut running = base.clone();
        running.phase = Some("Running".to_owned());
        assert!(!matches(&running, "node-a", AllocatingEndpoint::Number, 1));

        let mut no_phase = base.clone();
        no_phase.phase = None;
        assert!(!matches(&no_phase, "node-a", AllocatingEndpoint::Number, 1));

        for phase in [Some(PHASE_SUCCESS), Some("failed"), None] {
            let mut p = base.clone();
            match phase {
                Some(v) => p.annotations.insert(BIND_PHASE.to_owned(), v.to_owned()),
                None => p.annotations.remove(BIND_PHASE),
            };
            assert!(
                !matches(&p, "node-a", AllocatingEndpoint::Number, 1),
                "{phase:?}"
            );
        }

        let mut elsewhere = base.clone();
        elsewhere.node_name = Some("node-b".to_owned());
        assert!(!matches(
            &elsewhere,
            "node-a",
            AllocatingEndpoint::Number,
            1
        ));

        let mut unbound_yet = base.clone();
        unbound_yet.node_name = None;
        assert!(matches(
            &unbound_yet,
            "node-a",
            AllocatingEndpoint::Number,
            1
        ));

        let mut no_queue = base;
        no_queue.annotations.remove(DEVICES_TO_ALLOCATE);
        assert_eq!(next_assignment(&no_queue).unwrap(), None);
        assert!(!matches(&no_queue, "node-a", AllocatingEndpoint::Number, 1));
    }

    #[test]
    fn malformed_pods_are_skipped_and_reported() {
        let bad = pod(
            "bad",
            "1",
            &format!("{A},NVIDIA,-1,0:"),
            vec![limits("cuda", Some(1), None)],
        );
        let good = single("good", "2");
        let pods = [bad, good];
        assert_eq!(
            select_pending_pod(&pods, "node-a", AllocatingEndpoint::Number, 1),
            Some(1)
        );
        let reported = malformed_pods(&pods, "node-a");
        assert_eq!(reported.len(), 1);
        assert_eq!(reported[0].0, 0);
        assert!(
            reported[0].1.position.contains("used memory"),
            "{}",
            reported[0].1
        );
        assert!(malformed_pods(&pods, "node-b").is_empty());
    }

    #[test]
    fn segments_that_do_not_line_up_with_vgpu_containers_are_an_error() {
        // Two segments, one vGPU container.
        let p = pod(
            "p",
            "1",
            &format!("{};{}", one(A, 1), one(B, 1)),
            vec![limits("cuda", Some(1), None), limits("sidecar", None, None)],
        );
        let err = next_assignment(&p).unwrap_err();
        assert!(err.position.contains("2 segments"), "{err}");
        assert!(err.position.contains("1 containers"), "{err}");
        // No vGPU container at all.
        let p = pod("p", "1", &one(A, 1), vec![limits("plain", None, None)]);
        assert!(next_assignment(&p).is_err());
        assert!(!matches(&p, "node-a", AllocatingEndpoint::Number, 1));
    }

    #[test]
    fn count_limit_of_zero_still_owns_its_empty_segment() {
        let p = pod(
            "p",
            "1",
            &format!(";{}", one(A, 1)),
            vec![limits("zero", Some(0), None), limits("cuda", Some(1), None)],
        );
        let a = next_assignment(&p).unwrap().unwrap();
        assert_eq!((a.segment, a.container), (1, 1));
    }

    #[test]
    fn vgpu_time_parses_plain_decimals_only() {
        let mut p = single("p", "1787220000");
        assert_eq!(vgpu_time(&p), 1_787_220_000);
        for bad in ["", "+1", "-1", "1.0", " 1", "18446744073709551616", "abc"] {
            p.annotations.insert(VGPU_TIME.to_owned(), bad.to_owned());
            assert_eq!(vgpu_time(&p), u64::MAX, "{bad:?}");
        }
        p.annotations.remove(VGPU_TIME);
        assert_eq!(vgpu_time(&p), u64::MAX);
        p.annotations
            .insert(VGPU_TIME.to_owned(), VGPU_TIME_DONE.to_owned());
        assert_eq!(vgpu_time(&p), u64::MAX);
    }

    #[test]
    fn empty_pod_list_selects_nothing() {
        assert_eq!(
            select_pending_pod(&[], "node-a", AllocatingEndpoint::Number, 1),
            None
        );
    }
}
