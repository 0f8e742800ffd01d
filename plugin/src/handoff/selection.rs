//! Which pod, and which of its containers, an Allocate call is for (docs/volcano-contract.md §3.2).
//!
//! The kubelet's AllocateRequest names device IDs only, so the pod is inferred from the scheduler's
//! annotations. The rules here are ours; they fix the Go plugin's selection bugs (docs/volcano-contract.md §10):
//! - #2/#3: the request size is compared with the **next segment's** device count, not the pod's total, so a
//!   pod with two 1-vGPU containers is found for each of its two Allocate calls;
//! - #4: segment k belongs to the k-th container that has a vGPU limit, not to `spec.containers[k]`, so a
//!   sidecar before the GPU container no longer takes its devices (and init containers never count);
//! - #5: only `Pending` pods still in bind-phase `allocating` are candidates, so a running pod whose final
//!   PATCH failed is never handed out again;
//! - #9: a memory-only container (no `vgpu-number` limit) is served by the memory endpoint, the only one the
//!   kubelet calls for it;
//! - a pod the kubelet has already started (`status.startTime`, or a container with a runtime ID) is never a
//!   candidate, whatever its annotations say: the kubelet calls Allocate only while it admits a pod, before it
//!   starts it, and a pod stays `Pending` while any of its containers waits (an image that never pulls), so a
//!   tenant allowed to patch its own pod could otherwise put a running pod back to `allocating` with a queue
//!   of its choosing and be handed the next pod's Allocate call: that pod's container would then start with
//!   the tenant's GPUs, limits and cache directory (shared with the tenant's running container).
//!
//! Among candidates the smallest `vgpu-time` wins, then the older pod, then namespace/name: the answer does not
//! depend on list order. The Go plugin takes the **last** listed pod on a `vgpu-time` tie, which with its
//! 1-second resolution makes gang pods land in list order, i.e. at random; the kubelet admits pods in
//! creation order, so the older pod is the one it is asking about.

use std::collections::BTreeMap;

use crate::volcano::pod_devices::{ContainerDevice, PodDevices};
use crate::volcano::{
    AnnotationError, BIND_PHASE, DEVICE_TYPE_NVIDIA, DEVICES_TO_ALLOCATE, PHASE_ALLOCATING,
    VGPU_NODE, VGPU_TIME,
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
    /// `spec.initContainers` (native sidecars included) that have a vGPU limit: the scheduler gives them no
    /// segment, yet the kubelet calls Allocate for them, first.
    pub init_with_vgpu: Vec<ContainerLimits>,
    /// The kubelet has started the pod (`status.startTime` set, or a container with a runtime ID): it
    /// was admitted, and admission is the only time the kubelet calls Allocate for it.
    pub started: bool,
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

/// What one Allocate call asks for: the endpoint the kubelet called and how many of its IDs it sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// The endpoint.
    pub endpoint: AllocatingEndpoint,
    /// The number of device IDs: vGPUs on the number endpoint, memory units on the memory endpoint.
    pub size: usize,
}

/// The call the kubelet makes to one of the two allocating endpoints for a container, from its limits alone.
///
/// The kubelet sends a container's own limit of a resource as the request size, on that resource's endpoint,
/// and makes no call for a zero quantity. A container with a `vgpu-number` limit is served by the number
/// endpoint (its memory call is answered empty); a memory-only container by the memory endpoint (#9).
pub fn kubelet_request(container: &ContainerLimits) -> Option<Request> {
    let (endpoint, size) = match (container.count, container.memory) {
        (Some(count), _) => (AllocatingEndpoint::Number, count),
        (None, Some(memory)) => (AllocatingEndpoint::Memory, memory),
        (None, None) => return None,
    };
    if size == 0 {
        return None;
    }
    Some(Request {
        endpoint,
        size: usize::try_from(size).ok()?,
    })
}

/// What the agent knows of one of its GPUs when it checks an assignment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuFacts {
    /// `GPU-…` UUID.
    pub uuid: String,
    /// Whether the agent currently reports it `Healthy`.
    pub healthy: bool,
    /// The memory units it advertises (`gpuMemoryFactor` units, after `deviceMemoryScaling`).
    pub memory_units: u64,
}

/// What a pending pod is to one Allocate call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Its next container is what the call asks for, and its devices can be handed out.
    Ready(Assignment),
    /// It may be the pod the kubelet is admitting, but it cannot be served: the cause, naming the field.
    Unusable(String),
    /// A memory-endpoint call that is the memory call of this pod's next container (index into
    /// [`PodView::containers`]): it has a `vgpu-number` limit, so the number endpoint hands it off and this call
    /// is answered empty.
    NotMine(usize),
}

/// The pod an Allocate call is for, and what to do with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    /// Index into the pods given to [`choose`].
    pub index: usize,
    /// Serve it or fail it.
    pub verdict: Verdict,
}

/// The pod an Allocate call is for, whether or not it can be served.
///
/// Candidates are the pods `Pending` on `node`, still `allocating`, that may be the one the kubelet is
/// admitting (see `verdict` for why the others provably are not). Among them the first in the serving order
/// wins (smallest `vgpu-time`, then oldest, then namespace/name), **usable or not**: a pod that cannot be
/// served is never skipped in favour of the next one, since the kubelet may be admitting exactly that pod and
/// would then start it with another pod's GPUs and limits. The caller fails it instead, and this call with it.
///
/// `gpus` are this node's GPUs; `None` leaves out the checks against them (used where only the annotation
/// contract is under test).
pub fn choose(
    pods: &[PodView],
    node: &str,
    gpus: Option<&[GpuFacts]>,
    request: Request,
) -> Option<Choice> {
    pods.iter()
        .enumerate()
        .filter(|(_, pod)| is_allocating_on(pod, node))
        .filter_map(|(index, pod)| verdict(pod, gpus, request).map(|v| (index, v)))
        .min_by(|(a, _), (b, _)| order_key(&pods[*a]).cmp(&order_key(&pods[*b])))
        .map(|(index, verdict)| Choice { index, verdict })
}

/// Whether this pod is the one an Allocate call of `request_size` IDs on `endpoint` can be for and can be
/// served: `Pending`, bound to `node` by the scheduler, still `allocating`, its next container asks for exactly
/// this request and its annotations are usable (GPU checks left out).
///
/// A pod whose `spec.nodeName` names another node is never a candidate (the kubelet only admits its own pods);
/// one with no `nodeName` yet still is, since a lister can lag behind the bind.
pub fn matches(
    pod: &PodView,
    node: &str,
    endpoint: AllocatingEndpoint,
    request_size: usize,
) -> bool {
    let request = Request {
        endpoint,
        size: request_size,
    };
    is_allocating_on(pod, node) && matches!(verdict(pod, None, request), Some(Verdict::Ready(_)))
}

/// The pod an Allocate call is for, as an index into `pods`, usable or not; see [`choose`].
pub fn select_pending_pod(
    pods: &[PodView],
    node: &str,
    endpoint: AllocatingEndpoint,
    request_size: usize,
) -> Option<usize> {
    let request = Request {
        endpoint,
        size: request_size,
    };
    choose(pods, node, None, request).map(|c| c.index)
}

/// What `pod` (allocating on this node) is to `request`: `None` when it provably is not the pod the kubelet
/// is admitting, else whether it can be served.
///
/// Why `None` is safe:
/// - none of its vGPU containers asks for this request: the kubelet's request for a container is that
///   container's own limit on that resource's endpoint ([`kubelet_request`]), so no container of this pod can
///   produce it, whatever its annotations say;
/// - its queue is usable and its next container asks for something else: the kubelet allocates a pod's
///   containers in `spec.containers` order, one call per container and resource, and stops at the first
///   failure; the queue is in the same order, is advanced only by us, one container per call under the
///   Allocate lock, and every failed call marks the pod `failed`. So while the pod is `allocating`, the
///   kubelet's next call for it is the next queue container's.
///
/// Everything else that may be this pod but cannot be served is [`Verdict::Unusable`]: an undecodable queue
/// or one that does not line up with the vGPU containers, no NVIDIA device left while still `allocating`
/// (empty, `;`-only, or other types only), a segment of another type only, a segment whose device count is
/// not the container's limit, a container with devices but no request, the same GPU twice in one segment, a
/// GPU this node does not serve or has marked unhealthy, more memory than the GPU has (cores over 100 are
/// refused by the decoder), and a `vgpu-time` that cannot be read (its place in the order is unknown, so it is
/// put first rather than risk being skipped).
fn verdict(pod: &PodView, gpus: Option<&[GpuFacts]>, request: Request) -> Option<Verdict> {
    let next = next_assignment(pod);
    // The kubelet calls the memory endpoint for every container with a `vgpu-memory` limit, also for one the
    // number endpoint serves. Such a call must take its place in the order too: answered empty when this pod
    // comes first, so it never takes a later memory-only container's devices.
    if let (AllocatingEndpoint::Memory, Ok(Some(a))) = (request.endpoint, &next) {
        let container = &pod.containers[a.container];
        if container.count.is_some_and(|n| n > 0)
            && container.memory == u64::try_from(request.size).ok()
        {
            return Some(Verdict::NotMine(a.container));
        }
    }
    let vgpu = gpu_containers(pod);
    let asks = |c: usize| kubelet_request(&pod.containers[c]) == Some(request);
    let unusable = |cause: String| Some(Verdict::Unusable(cause));
    // An init container with a vGPU limit: the kubelet allocates it first, and the queue's first segment is
    // an app container's, which it would take (the Go plugin's behaviour). Its call is refused instead,
    // naming it; a call only an app container of this pod could make is not this pod's (the init
    // container's call comes first and fails the pod).
    if let Some(init) = pod
        .init_with_vgpu
        .iter()
        .find(|c| kubelet_request(c) == Some(request))
    {
        return unusable(format!(
            "init container {:?} has a vGPU limit, but Volcano's scheduler places devices for spec.containers \
             only (no segment of {DEVICES_TO_ALLOCATE} is an init container's), so the kubelet's call for it \
             would take an app container's devices; move the limit to an app container",
            init.name
        ));
    }
    if !pod.init_with_vgpu.is_empty() {
        return None;
    }
    let &first_asking = vgpu.iter().find(|&&c| asks(c))?;
    let assignment = match next {
        Err(error) => return unusable(error.to_string()),
        Ok(None) => {
            let value = pod.annotations.get(DEVICES_TO_ALLOCATE).map(String::as_str);
            let container = &pod.containers[first_asking];
            return unusable(format!(
                "annotation {DEVICES_TO_ALLOCATE}: {} is not a queue with an {DEVICE_TYPE_NVIDIA} device left, yet \
                 {BIND_PHASE} is still {PHASE_ALLOCATING} and container {:?} asks for {} (expected the scheduler's \
                 devices for every container with a vGPU limit)",
                value.map_or_else(
                    || "missing".to_owned(),
                    |v| format!("{:?}", crate::volcano::quote(v))
                ),
                container.name,
                describe(request),
            ));
        }
        Ok(Some(a)) => a,
    };
    // A segment with devices but none of them NVIDIA is skipped by the queue walk, which would hand its
    // container's call the next container's devices.
    if let Some((s, d)) = assignment
        .rest
        .0
        .iter()
        .enumerate()
        .filter(|(s, _)| *s != assignment.segment)
        .find_map(|(s, seg)| {
            (!seg.is_empty() && !seg.iter().any(ContainerDevice::is_nvidia)).then(|| (s, &seg[0]))
        })
    {
        return unusable(format!(
            "annotation {DEVICES_TO_ALLOCATE}, segment {s}, record 0, field 1 (type): {:?} is not \
             {DEVICE_TYPE_NVIDIA}, the only type Volcano's vGPU scheduler writes and the agent hands out",
            crate::volcano::quote(&d.device_type)
        ));
    }
    let container = &pod.containers[assignment.container];
    let s = assignment.segment;
    match kubelet_request(container) {
        Some(r) if r == request => {}
        Some(_) => return None,

        None => {
            return unusable(format!(
                "annotation {DEVICES_TO_ALLOCATE}, segment {s}: {} device(s) is not what container {:?} asks for \
                 (it has no vGPU limit the kubelet allocates, e.g. vgpu-number 0, so its devices could only go \
                 to another container)",
                assignment.devices.len(),
                container.name
            ));
        }
    }
    if let Some(cause) = unreadable_time(pod) {
        return unusable(cause);
    }
    let wanted = match request.endpoint {
        AllocatingEndpoint::Number => request.size,
        // The scheduler gives a memory-only container one GPU.
        AllocatingEndpoint::Memory => 1,
    };
    if assignment.devices.len() != wanted {
        return unusable(format!(
            "annotation {DEVICES_TO_ALLOCATE}, segment {s}: {} device(s) is not the {wanted} GPU(s) container {:?} \
             asks for ({})",
            assignment.devices.len(),
            container.name,
            describe(request)
        ));
    }
    let position = |r: usize, f: &str| {
        format!("annotation {DEVICES_TO_ALLOCATE}, segment {s}, record {r}, field {f}")
    };
    for (r, device) in assignment.devices.iter().enumerate() {
        if let Some(first) = assignment.devices[..r]
            .iter()
            .position(|d| d.uuid == device.uuid)
        {
            return unusable(format!(
                "{}: {:?} is not a GPU distinct from record {first}'s (one container cannot hold the same GPU \
                 twice)",
                position(r, "0 (UUID)"),
                device.uuid
            ));
        }
        let Some(gpus) = gpus else { continue };
        // A MIG device ID (`GPU-…[<group>-<position>]`) names its parent GPU; the hand-off resolves the rest.
        let gpu_uuid = if crate::volcano::mig::is_mig_id(&device.uuid) {
            match crate::volcano::mig::decode_mig_id(&device.uuid) {
                Ok(id) => id.parent_uuid,
                Err(e) => return unusable(format!("{}: {e}", position(r, "0 (UUID)"))),
            }
        } else {
            device.uuid.as_str()
        };
        let Some(gpu) = gpus.iter().find(|g| g.uuid == gpu_uuid) else {
            return unusable(format!(
                "{}: {:?} is not one of this node's GPUs: this node serves no such GPU (it serves {})",
                position(r, "0 (UUID)"),
                device.uuid,
                list_uuids(gpus)
            ));
        };
        if !gpu.healthy {
            return unusable(format!(
                "{}: {:?} is not a healthy GPU: the agent has marked it Unhealthy (a critical XID, or it stopped \
                 answering NVML) and the scheduler placed the pod before it saw that; delete the pod so it is placed \
                 again",
                position(r, "0 (UUID)"),
                device.uuid
            ));
        }
        if u64::from(device.used_mem) > gpu.memory_units {
            return unusable(format!(
                "{}: \"{}\" is not at most {}, the memory units GPU {} has",
                position(r, "2 (used memory)"),
                device.used_mem,
                gpu.memory_units,
                gpu.uuid
            ));
        }
    }
    Some(Verdict::Ready(assignment))
}

/// How a request reads in an error.
fn describe(request: Request) -> String {
    match request.endpoint {
        AllocatingEndpoint::Number => format!("{} vGPU(s)", request.size),
        AllocatingEndpoint::Memory => {
            format!("{} memory units (memory-only container)", request.size)
        }
    }
}

/// Up to four UUIDs, for an error line.
fn list_uuids(gpus: &[GpuFacts]) -> String {
    let mut names: Vec<&str> = gpus.iter().take(4).map(|g| g.uuid.as_str()).collect();
    if gpus.len() > 4 {
        names.push("…");
    }
    if names.is_empty() {
        return "no GPU".to_owned();
    }
    names.join(", ")
}

/// Why `vgpu-time` cannot place the pod in the serving order, if it cannot.
fn unreadable_time(pod: &PodView) -> Option<String> {
    let value = pod.annotations.get(VGPU_TIME);
    if value.is_some_and(|t| parse_time(t).is_some()) {
        return None;
    }
    Some(format!(
        "annotation {VGPU_TIME}: {} is not a bind time in decimal Unix seconds (the order the agent serves \
         pending pods in)",
        value.map_or_else(
            || "missing".to_owned(),
            |v| format!("{:?}", crate::volcano::quote(v))
        )
    ))
}

fn parse_time(text: &str) -> Option<u64> {
    (!text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()))
        .then(|| text.parse().ok())
        .flatten()
}

/// `vgpu-time` as the Go plugin reads it: missing or not a plain decimal `u64` counts as `u64::MAX` (last).
pub fn vgpu_time(pod: &PodView) -> u64 {
    pod.annotations
        .get(VGPU_TIME)
        .and_then(|t| parse_time(t))
        .unwrap_or(u64::MAX)
}

/// Pending, bound to `node` by the scheduler, and waiting for the agent.
fn is_allocating_on(pod: &PodView, node: &str) -> bool {
    pod.phase.as_deref() == Some(PHASE_PENDING)
        && !pod.started
        && pod.annotations.get(VGPU_NODE).map(String::as_str) == Some(node)
        && pod.node_name.as_deref().is_none_or(|n| n == node)
        && pod.annotations.get(BIND_PHASE).map(String::as_str) == Some(PHASE_ALLOCATING)
}

/// Smallest `vgpu-time`, then oldest (a missing timestamp sorts last), then namespace/name. A `vgpu-time`
/// that cannot be read sorts **first**: the pod's place is unknown, and a pod that could be the one the
/// kubelet is admitting must never be skipped (it is refused, see [`verdict`]).
fn order_key(pod: &PodView) -> (u64, i64, &str, &str) {
    let time = pod
        .annotations
        .get(VGPU_TIME)
        .and_then(|t| parse_time(t))
        .unwrap_or(0);
    (
        time,
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
            init_with_vgpu: Vec::new(),
            started: false,
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
    fn a_started_pod_is_never_a_candidate_whatever_its_annotations() {
        let fresh = single("fresh", "2");
        let mut reopened = single("reopened", "0");
        reopened.started = true;
        let pods = [reopened.clone(), fresh];
        assert!(!matches(&reopened, "node-a", AllocatingEndpoint::Number, 1));
        assert_eq!(
            select_pending_pod(&pods, "node-a", AllocatingEndpoint::Number, 1),
            Some(1),
            "the older vgpu-time of a started pod does not put it first"
        );
        // Not even as an unusable pod that would be failed in the call's place.
        reopened
            .annotations
            .insert(DEVICES_TO_ALLOCATE.to_owned(), "not a queue".to_owned());
        assert!(choose(&[reopened], "node-a", Some(&gpus()), request(1)).is_none());
    }

    #[test]
    fn an_init_container_with_a_vgpu_limit_fails_the_pod_instead_of_taking_an_app_container_s_devices()
     {
        let mut p = single("p", "1");
        p.init_with_vgpu = vec![limits("setup", Some(1), None)];
        let Some(Verdict::Unusable(cause)) = verdict(&p, Some(&gpus()), request(1)) else {
            panic!("the init container's call is not refused");
        };
        assert!(
            cause.contains("\"setup\"") && cause.contains("init container"),
            "{cause}"
        );
        // Also when only the init container asks for this size; a size only the app container asks for is
        // not this pod's call (its init container's comes first).
        p.init_with_vgpu = vec![limits("setup", Some(2), None)];
        assert!(matches!(
            verdict(&p, Some(&gpus()), request(2)),
            Some(Verdict::Unusable(_))
        ));
        assert!(verdict(&p, Some(&gpus()), request(1)).is_none());
        // An init container without a vGPU limit is not there at all.
        p.init_with_vgpu.clear();
        assert!(matches!(
            verdict(&p, Some(&gpus()), request(1)),
            Some(Verdict::Ready(_))
        ));
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

    fn request(size: usize) -> Request {
        Request {
            endpoint: AllocatingEndpoint::Number,
            size,
        }
    }

    fn gpus() -> Vec<GpuFacts> {
        [A, B]
            .iter()
            .map(|uuid| GpuFacts {
                uuid: (*uuid).to_owned(),
                healthy: true,
                memory_units: 15360,
            })
            .collect()
    }

    /// The cause when `pods[index]` is chosen for `request` and cannot be served; panics otherwise.
    fn refused(pods: &[PodView], gpus: &[GpuFacts], request: Request, index: usize) -> String {
        match choose(pods, "node-a", Some(gpus), request) {
            Some(Choice {
                index: i,
                verdict: Verdict::Unusable(cause),
            }) if i == index => cause,
            other => panic!("expected pod {index} refused, got {other:?}"),
        }
    }

    #[test]
    fn a_malformed_oldest_pod_is_chosen_and_refused_never_skipped() {
        let bad = pod(
            "bad",
            "1",
            &format!("{A},NVIDIA,-1,0:"),
            vec![limits("cuda", Some(1), None)],
        );
        let good = single("good", "2");
        let pods = [good.clone(), bad];
        let cause = refused(&pods, &gpus(), request(1), 1);
        assert!(
            cause.contains("used memory") && cause.contains("\"-1\""),
            "{cause}"
        );
        assert_eq!(
            select_pending_pod(&pods, "node-a", AllocatingEndpoint::Number, 1),
            Some(1)
        );
        assert!(!matches(&pods[1], "node-a", AllocatingEndpoint::Number, 1));
        // Once it is marked failed, the next pod is served.
        let mut failed = pods.clone();
        failed[1]
            .annotations
            .insert(BIND_PHASE.to_owned(), "failed".to_owned());
        let choice = choose(&failed, "node-a", Some(&gpus()), request(1)).unwrap();
        assert_eq!(choice.index, 0);
        assert!(matches!(choice.verdict, Verdict::Ready(_)));
    }

    #[test]
    fn a_malformed_pod_none_of_whose_containers_asks_this_size_is_provably_not_it() {
        let bad = pod(
            "bad",
            "1",
            &format!("{A},NVIDIA,-1,0:"),
            vec![limits("cuda", Some(2), None)],
        );
        let good = single("good", "2");
        let pods = [bad, good];
        let choice = choose(&pods, "node-a", Some(&gpus()), request(1)).unwrap();
        assert_eq!(choice.index, 1);
        assert!(matches!(choice.verdict, Verdict::Ready(_)));
        // The request it could be for: refused.
        assert!(refused(&pods, &gpus(), request(2), 0).contains("used memory"));
    }

    /// Every way a pod that may be the one the kubelet is admitting can be unusable: it is chosen ahead of an
    /// older-by-nothing good pod (it is older) and refused with the field named.
    #[test]
    fn each_unusable_pod_class_is_refused_with_the_field_named() {
        let cuda = || vec![limits("cuda", Some(1), Some(1000))];
        let two = || vec![limits("cuda", Some(2), Some(1000))];
        let mut sick = gpus();
        sick[1].healthy = false;
        let cases: Vec<(&str, PodView, Vec<GpuFacts>, usize, &str)> = vec![
            (
                "undecodable",
                pod("p", "1", &format!("{A},NVIDIA,1,101:"), cuda()),
                gpus(),
                1,
                "field 3 (used cores)",
            ),
            (
                "unknown GPU",
                pod("p", "1", &one("GPU-elsewhere", 1), cuda()),
                gpus(),
                1,
                "serves no such GPU",
            ),
            (
                "unhealthy GPU",
                pod("p", "1", &one(B, 1), cuda()),
                sick,
                1,
                "not a healthy GPU",
            ),
            (
                "other type only",
                pod(
                    "p",
                    "1",
                    &format!("MLU-1,MLU,1,0:;{}", one(A, 1)),
                    vec![limits("mlu", Some(1), None), limits("cuda", Some(1), None)],
                ),
                gpus(),
                1,
                "field 1 (type): \"MLU\" is not NVIDIA",
            ),
            (
                "device count disagrees with the limit",
                pod("p", "1", &one(A, 1), two()),
                gpus(),
                2,
                "1 device(s) is not the 2 GPU(s)",
            ),
            (
                "empty queue",
                pod("p", "1", "", cuda()),
                gpus(),
                1,
                "\"\" is not a queue with an NVIDIA device left",
            ),
            (
                "separators only",
                pod(
                    "p",
                    "1",
                    ";",
                    vec![limits("a", Some(1), None), limits("b", Some(1), None)],
                ),
                gpus(),
                1,
                "\";\" is not a queue with an NVIDIA device left",
            ),
            (
                "more memory than the GPU has",
                pod("p", "1", &one(A, 15361), cuda()),
                gpus(),
                1,
                "\"15361\" is not at most 15360",
            ),
            (
                "the same GPU twice",
                pod("p", "1", &format!("{}{}", one(A, 1), one(A, 1)), two()),
                gpus(),
                2,
                "not a GPU distinct from record 0's",
            ),
            (
                "devices for a container that asks for none",
                pod(
                    "p",
                    "1",
                    &format!("{};{}", one(A, 1), one(B, 1)),
                    vec![limits("zero", Some(0), None), limits("cuda", Some(1), None)],
                ),
                gpus(),
                1,
                "container \"zero\"",
            ),
            (
                "unreadable vgpu-time",
                pod("p", "soon", &one(A, 1), cuda()),
                gpus(),
                1,
                "annotation volcano.sh/vgpu-time: \"soon\"",
            ),
        ];
        for (name, bad, facts, size, expected) in cases {
            let mut good = pod("good", "5", &one(A, 1), cuda());
            if size == 2 {
                good = pod("good", "5", &format!("{}{}", one(A, 1), one(B, 1)), two());
            }
            let pods = [good, bad];
            let cause = refused(&pods, &facts, request(size), 1);
            assert!(cause.contains(expected), "{name}: {cause}");
            assert!(cause.contains("annotation volcano.sh/"), "{name}: {cause}");
        }
    }

    #[test]
    fn an_unreadable_vgpu_time_sorts_first_so_it_cannot_be_skipped() {
        let good = single("good", "1");
        let late = pod("late", "", &one(A, 1), vec![limits("cuda", Some(1), None)]);
        let pods = [good, late];
        assert!(refused(&pods, &gpus(), request(1), 1).contains("vgpu-time"));
    }

    #[test]
    fn a_memory_call_never_takes_a_count_container_and_checks_a_memory_only_one() {
        let both = single("both", "1");
        let memory = Request {
            endpoint: AllocatingEndpoint::Memory,
            size: 1000,
        };
        // Its memory call takes its place in the order and is answered empty, so it cannot take a later
        // memory-only container's devices.
        let later = pod(
            "later",
            "2",
            &one(B, 1000),
            vec![limits("cuda", None, Some(1000))],
        );
        assert_eq!(
            choose(&[later.clone(), both], "node-a", Some(&gpus()), memory),
            Some(Choice {
                index: 1,
                verdict: Verdict::NotMine(0)
            })
        );
        assert!(matches!(
            choose(&[later], "node-a", Some(&gpus()), memory)
                .unwrap()
                .verdict,
            Verdict::Ready(_)
        ));
        let two = pod(
            "mem",
            "1",
            &format!("{}{}", one(A, 1000), one(B, 1000)),
            vec![limits("cuda", None, Some(1000))],
        );
        assert!(refused(&[two], &gpus(), memory, 0).contains("1 GPU(s)"));
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
