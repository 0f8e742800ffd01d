//! The Allocate decision, pure: from the pod the search found (and what [`choose`] made of it), the request
//! and the settings, what to do, with no read or write of its own. [`crate::handoff::allocator::Allocator`]
//! reads the pods before it and makes the writes a [`Decision`] asks for after it.
//!
//! [`choose`]: crate::handoff::selection::choose

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, PatchOperation, ReplaceOperation, TestOperation};

use crate::cluster::{ApiBounds, ApiCallError};
use crate::config::device::VolcanoConfig;
use crate::container::response::{
    ContainerAnswer, Handoff, LimiterSettings, MigHanded, cache_dir_name, container_answer,
    mig_answer,
};
use crate::handoff::record::{ContainerRecord, PriorityError, RecordError};
use crate::handoff::selection::{AllocatingEndpoint, PodView, Verdict};
use crate::volcano::{BIND_PHASE, DEVICES_TO_ALLOCATE, PHASE_SUCCESS, VGPU_TIME, VGPU_TIME_DONE};

/// How the hand-off is configured.
#[derive(Debug, Clone)]
pub struct HandoffSettings {
    /// The merged Volcano configuration (resource names among others).
    pub config: Arc<VolcanoConfig>,
    /// What goes into each container's environment and mounts.
    pub limiter: LimiterSettings,
    /// The one host directory holding the per-container caches.
    pub cache_root: PathBuf,
    /// The bound on each apiserver call (`--apiserver-timeout`).
    pub bounds: ApiBounds,
}

/// Why the hand-off of a chosen pod failed. The kubelet's error, the pod's Event and the log line all carry
/// this text after the pod's name; each names the field or the write that failed.
#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    /// The pod may be the one the kubelet is admitting but cannot be served; the text names the annotation,
    /// segment, record and field ([`Verdict::Unusable`]).
    #[error("{0}")]
    Unusable(String),
    /// The queue's next segment is for a container the pod does not have.
    #[error("segment {segment} maps to no container (the pod has {containers})")]
    NoContainer {
        /// The segment's index in the queue.
        segment: usize,
        /// How many containers the pod has.
        containers: usize,
    },
    /// The pod's priority annotation names no priority.
    #[error(transparent)]
    Priority(#[from] PriorityError),
    /// The per-container cache directory could not be created.
    #[error("cannot create the cache directory {}: {source}", dir.display())]
    CreateCacheDir {
        /// The directory.
        dir: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The per-container cache directory could not be made writable for every uid (1777).
    #[error("cannot open up the cache directory {}: {source}", dir.display())]
    OpenCacheDir {
        /// The directory.
        dir: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The node's record of the container could not be written.
    #[error(transparent)]
    Record(#[from] RecordError),
    /// The guarded patch that takes the container's segment off the queue failed: a concurrent writer changed
    /// the queue (the `test` failed), or the apiserver refused or did not answer.
    #[error(transparent)]
    Advance(ApiCallError),
    /// The patch was accepted but the queue does not read back as written.
    #[error("{DEVICES_TO_ALLOCATE} reads back as {got:?}, not {want:?}")]
    ReadBack {
        /// What the apiserver returned.
        got: Option<String>,
        /// What was written.
        want: String,
    },
    /// A MIG hand-off (`operatingmode: mig`) could not be made: the text names the device, the GPU and why
    /// (no geometry for the model, a GPU in use by another container, a failed repartition and its rollback).
    #[error("MIG: {0}")]
    Mig(String),
    /// The last container's patch was accepted but the pod does not read back as done.
    #[error("{BIND_PHASE}/{VGPU_TIME} did not read back as {PHASE_SUCCESS}/{VGPU_TIME_DONE}")]
    NotDone,
}

/// What one Allocate call does.
#[derive(Debug)]
pub enum Decision {
    /// Answer empty and change nothing: a memory-endpoint call with no pod for it, or the memory call of a
    /// container the number endpoint hands off (`answered`: that pod's UID and container, to remember).
    Empty {
        /// The container whose memory call this is, when a pod was found.
        answered: Option<(String, usize)>,
    },
    /// A number-endpoint call with no pending pod for it: refuse it.
    NoPendingPod,
    /// Fail this pod with this call.
    Fail {
        /// The pod.
        pod: Box<PodView>,
        /// Why.
        cause: HandoffError,
    },
    /// Hand one container off.
    HandOff(Box<Plan>),
}

/// A hand-off, decided: the writes to make and, once they all succeeded, the answer.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The pod, as read fresh.
    pub pod: PodView,
    /// The container's index in [`PodView::containers`].
    pub container: usize,
    /// The per-container cache directory to create on the host.
    pub cache_host_dir: PathBuf,
    /// The node's record of what the container is handed, written before the patch.
    pub record: ContainerRecord,
    /// `devices-to-allocate` as read (the guarded patch tests it).
    pub old_queue: String,
    /// `devices-to-allocate` after this container's segment is taken off.
    pub new_queue: String,
    /// The NVIDIA devices left in the queue after this container.
    pub remaining: usize,
    /// What the container is handed. For a MIG hand-off ([`Self::mig`] not empty) this is set by
    /// [`Self::resolve_mig`] once the GPUs are partitioned.
    pub answer: ContainerAnswer,
    /// The container's MIG devices, one per device in order, when its devices are bracketed MIG IDs; empty in
    /// hami-core.
    pub mig: Vec<MigUse>,
}

/// One MIG device a container is to get: the parent GPU, the geometry group and the position in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigUse {
    /// The parent GPU's UUID (`GPU-…`).
    pub gpu_uuid: String,
    /// The geometry group the scheduler chose for the whole GPU.
    pub group: String,
    /// The position within the group.
    pub position: u32,
}

/// The MIG devices of a container's devices: empty when none is bracketed; an error when only some are, when
/// the node is not in MIG mode, or when two of them ask one GPU for different groups.
pub fn mig_uses(
    devices: &[crate::volcano::pod_devices::ContainerDevice],
    mode: crate::volcano::node_register::OperatingMode,
) -> Result<Vec<MigUse>, HandoffError> {
    use crate::volcano::mig::{decode_mig_id, is_mig_id};
    let bracketed = devices.iter().filter(|d| is_mig_id(&d.uuid)).count();
    if bracketed == 0 {
        return Ok(Vec::new());
    }
    if mode != crate::volcano::node_register::OperatingMode::Mig {
        return Err(HandoffError::Mig(format!(
            "{DEVICES_TO_ALLOCATE} names MIG device {:?}, but this node's operatingmode is hami-core \
             (volcano-vgpu-node-config): the scheduler and the agent disagree on the node's mode",
            devices
                .iter()
                .find(|d| is_mig_id(&d.uuid))
                .map(|d| d.uuid.as_str())
                .unwrap_or_default()
        )));
    }
    if bracketed != devices.len() {
        return Err(HandoffError::Mig(format!(
            "{DEVICES_TO_ALLOCATE} mixes MIG device IDs and whole GPUs in one container ({})",
            devices
                .iter()
                .map(|d| d.uuid.as_str())
                .collect::<Vec<_>>()
                .join(",")
        )));
    }
    let mut uses: Vec<MigUse> = Vec::with_capacity(devices.len());
    for d in devices {
        let id = decode_mig_id(&d.uuid).map_err(|e| HandoffError::Mig(e.to_string()))?;
        if let Some(other) = uses
            .iter()
            .find(|u| u.gpu_uuid == id.parent_uuid && u.group != id.group)
        {
            return Err(HandoffError::Mig(format!(
                "{DEVICES_TO_ALLOCATE} asks GPU {} for groups {:?} and {:?} at once (one GPU has one layout)",
                id.parent_uuid, other.group, id.group
            )));
        }
        uses.push(MigUse {
            gpu_uuid: id.parent_uuid.to_owned(),
            group: id.group.to_owned(),
            position: id.position,
        });
    }
    Ok(uses)
}

/// The JSON pointer to one annotation of the pod.
fn annotation(key: &str) -> PointerBuf {
    PointerBuf::from_tokens(["metadata", "annotations", key])
}

impl Plan {
    /// Completes a MIG hand-off with the MIG UUID of each device (in [`Self::mig`] order): the answer is
    /// those UUIDs only ([`mig_answer`]) and the record names them, so the monitor takes a region that names a
    /// MIG device as the container's own.
    ///
    /// Fails (the plan unchanged) when the answer cannot be made: the MIG device nodes to pass with
    /// `--pass-device-specs` were not found.
    pub fn resolve_mig(
        &mut self,
        settings: &HandoffSettings,
        devices: &[MigHanded],
    ) -> Result<(), HandoffError> {
        let answer = mig_answer(&settings.limiter, devices).map_err(|e| {
            HandoffError::Mig(format!("the MIG device nodes cannot be handed: {e}"))
        })?;
        for (gpu, device) in self.record.gpus.iter_mut().zip(devices) {
            gpu.uuid.clone_from(&device.uuid);
        }
        self.answer = answer;
        Ok(())
    }

    /// Whether this is the pod's last container: the patch also marks the pod done.
    pub fn done(&self) -> bool {
        self.remaining == 0
    }

    /// The guarded patch: `test` that the queue is still what was read, `replace` it with the rest; for the
    /// last container also `add` `bind-phase=success` and `vgpu-time` done, in the same patch (one round-trip,
    /// and no window in which the queue is empty but the pod still reads `allocating`).
    pub fn patch(&self) -> json_patch::Patch {
        let queue = annotation(DEVICES_TO_ALLOCATE);
        let mut ops = vec![
            PatchOperation::Test(TestOperation {
                path: queue.clone(),
                value: self.old_queue.clone().into(),
            }),
            PatchOperation::Replace(ReplaceOperation {
                path: queue,
                value: self.new_queue.clone().into(),
            }),
        ];
        if self.done() {
            for (key, value) in [(BIND_PHASE, PHASE_SUCCESS), (VGPU_TIME, VGPU_TIME_DONE)] {
                ops.push(PatchOperation::Add(AddOperation {
                    path: annotation(key),
                    value: value.into(),
                }));
            }
        }
        json_patch::Patch(ops)
    }

    /// The guarded patch as its error names it.
    pub fn patch_what(&self) -> String {
        format!(
            "cannot advance {DEVICES_TO_ALLOCATE} from {:?} to {:?}",
            self.old_queue, self.new_queue
        )
    }

    /// Checks the annotations the patch returned: the queue as written, and the pod done after its last
    /// container.
    pub fn check_read_back(
        &self,
        annotations: &BTreeMap<String, String>,
    ) -> Result<(), HandoffError> {
        let read_back = annotations.get(DEVICES_TO_ALLOCATE);
        if read_back != Some(&self.new_queue) {
            return Err(HandoffError::ReadBack {
                got: read_back.cloned(),
                want: self.new_queue.clone(),
            });
        }
        if self.done()
            && (annotations.get(BIND_PHASE).map(String::as_str) != Some(PHASE_SUCCESS)
                || annotations.get(VGPU_TIME).map(String::as_str) != Some(VGPU_TIME_DONE))
        {
            return Err(HandoffError::NotDone);
        }
        Ok(())
    }
}

/// Decides one Allocate call on `endpoint` from the pod the search `found` (with [`choose`]'s verdict on it),
/// under `settings`. `cache_file` is the fresh shared-region file name the container gets if it is handed off.
///
/// [`choose`]: crate::handoff::selection::choose
pub fn decide(
    found: Option<(PodView, Verdict)>,
    endpoint: AllocatingEndpoint,
    settings: &HandoffSettings,
    cache_file: String,
) -> Decision {
    let Some((pod, verdict)) = found else {
        return match endpoint {
            // The kubelet calls the memory endpoint for every container with a memory limit; with no pod
            // waiting for it, the number endpoint's call decides (and refuses).
            AllocatingEndpoint::Memory => Decision::Empty { answered: None },
            AllocatingEndpoint::Number => Decision::NoPendingPod,
        };
    };
    let fail = |pod: PodView, cause: HandoffError| Decision::Fail {
        pod: Box::new(pod),
        cause,
    };
    let assignment = match verdict {
        Verdict::Ready(assignment) => assignment,
        Verdict::Unusable(cause) => return fail(pod, HandoffError::Unusable(cause)),
        Verdict::NotMine(container) => {
            return Decision::Empty {
                answered: Some((pod.uid, container)),
            };
        }
    };
    let Some(container) = pod.containers.get(assignment.container) else {
        let cause = HandoffError::NoContainer {
            segment: assignment.segment,
            containers: pod.containers.len(),
        };
        return fail(pod, cause);
    };
    // Unknown, unhealthy and duplicate GPUs and impossible sizes were refused by `choose`.
    let devices = &assignment.devices;
    let record = match ContainerRecord::new(
        &pod,
        &container.name,
        devices,
        settings.limiter.memory_factor,
        &cache_file,
    ) {
        Ok(record) => record,
        Err(cause) => return fail(pod, cause.into()),
    };
    let mig = match mig_uses(devices, settings.config.operating_mode) {
        Ok(mig) => mig,
        Err(cause) => return fail(pod, cause),
    };
    let cache_host_dir = settings
        .cache_root
        .join(cache_dir_name(&pod.uid, &container.name));
    let answer = container_answer(
        &settings.limiter,
        &Handoff {
            devices,
            cache_host_dir: cache_host_dir.clone(),
            cache_file,
            disable_control: container.disable_control,
        },
    );
    let old_queue = pod
        .annotations
        .get(DEVICES_TO_ALLOCATE)
        .cloned()
        .unwrap_or_default();
    Decision::HandOff(Box::new(Plan {
        container: assignment.container,
        cache_host_dir,
        record,
        old_queue,
        new_queue: assignment.rest.encode(),
        remaining: assignment.rest.remaining(),
        answer,
        mig,
        pod,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handoff::selection::{ContainerLimits, next_assignment};
    use crate::volcano::{PHASE_ALLOCATING, VGPU_NODE};
    use std::path::Path;

    fn settings() -> HandoffSettings {
        HandoffSettings {
            config: Arc::new(VolcanoConfig::default()),
            limiter: LimiterSettings::default(),
            cache_root: PathBuf::from("/var/vgpu/containers"),
            bounds: ApiBounds::default(),
        }
    }

    fn pod(queue: &str) -> PodView {
        PodView {
            namespace: "ns".to_owned(),
            name: "p".to_owned(),
            uid: "uid".to_owned(),
            annotations: [
                (VGPU_NODE, "node-a"),
                (BIND_PHASE, PHASE_ALLOCATING),
                (DEVICES_TO_ALLOCATE, queue),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
            containers: vec![ContainerLimits {
                name: "cuda".to_owned(),
                count: Some(1),
                ..ContainerLimits::default()
            }],
            ..PodView::default()
        }
    }

    fn plan(queue: &str) -> Plan {
        let pod = pod(queue);
        let ready = Verdict::Ready(next_assignment(&pod).unwrap().unwrap());
        let decision = decide(
            Some((pod, ready)),
            AllocatingEndpoint::Number,
            &settings(),
            "x.cache".to_owned(),
        );
        match decision {
            Decision::HandOff(plan) => *plan,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn without_a_pod_the_memory_call_is_answered_empty_and_the_number_call_refused() {
        let s = settings();
        let empty = decide(None, AllocatingEndpoint::Memory, &s, "x.cache".to_owned());
        assert!(
            matches!(empty, Decision::Empty { answered: None }),
            "{empty:?}"
        );
        let refused = decide(None, AllocatingEndpoint::Number, &s, "x.cache".to_owned());
        assert!(matches!(refused, Decision::NoPendingPod), "{refused:?}");
        let mine = decide(
            Some((pod(""), Verdict::NotMine(0))),
            AllocatingEndpoint::Memory,
            &s,
            "x.cache".to_owned(),
        );
        assert!(
            matches!(&mine, Decision::Empty { answered: Some((uid, 0)) } if uid == "uid"),
            "{mine:?}"
        );
    }

    #[test]
    fn the_last_container_s_plan_marks_the_pod_done_in_its_patch_and_checks_it_reads_back_so() {
        let plan = plan("GPU-a,NVIDIA,1000,0:");
        assert!(plan.done());
        assert_eq!(
            plan.cache_host_dir,
            Path::new("/var/vgpu/containers/uid_cuda")
        );
        assert_eq!(plan.record.cache_file, "x.cache");
        assert_eq!(
            plan.answer.envs["CUDA_DEVICE_MEMORY_SHARED_CACHE"],
            "/tmp/vgpu/x.cache"
        );
        let ops = serde_json::to_value(plan.patch()).unwrap();
        assert_eq!(
            ops[3],
            serde_json::json!({ "op": "add", "path": "/metadata/annotations/volcano.sh~1vgpu-time", "value": VGPU_TIME_DONE })
        );
        let written: BTreeMap<String, String> = [(DEVICES_TO_ALLOCATE, "")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let not_done = plan.check_read_back(&written).unwrap_err();
        assert_eq!(
            not_done.to_string(),
            "volcano.sh/bind-phase/volcano.sh/vgpu-time did not read back as success/18446744073709551615"
        );
        let mut done = written.clone();
        done.insert(BIND_PHASE.to_owned(), PHASE_SUCCESS.to_owned());
        done.insert(VGPU_TIME.to_owned(), VGPU_TIME_DONE.to_owned());
        assert!(plan.check_read_back(&done).is_ok());
        done.insert(
            DEVICES_TO_ALLOCATE.to_owned(),
            "GPU-a,NVIDIA,1000,0:".to_owned(),
        );
        assert_eq!(
            plan.check_read_back(&done).unwrap_err().to_string(),
            "volcano.sh/devices-to-allocate reads back as Some(\"GPU-a,NVIDIA,1000,0:\"), not \"\""
        );
    }

    fn mig_settings() -> HandoffSettings {
        HandoffSettings {
            config: Arc::new(VolcanoConfig {
                operating_mode: crate::volcano::node_register::OperatingMode::Mig,
                ..VolcanoConfig::default()
            }),
            ..settings()
        }
    }

    fn decide_on(queue: &str, settings: &HandoffSettings) -> Decision {
        let pod = pod(queue);
        let ready = Verdict::Ready(next_assignment(&pod).unwrap().unwrap());
        decide(
            Some((pod, ready)),
            AllocatingEndpoint::Number,
            settings,
            "x.cache".to_owned(),
        )
    }

    #[test]
    fn a_mig_bind_on_a_mig_node_is_a_hand_off_that_waits_for_its_mig_devices() {
        let s = mig_settings();
        let Decision::HandOff(mut plan) = decide_on("GPU-a[group3-1],NVIDIA,40192,0:", &s) else {
            panic!("a MIG hand-off");
        };
        assert_eq!(
            plan.mig,
            [MigUse {
                gpu_uuid: "GPU-a".to_owned(),
                group: "group3".to_owned(),
                position: 1,
            }]
        );
        let handed = MigHanded {
            uuid: "MIG-x".to_owned(),
            ids: crate::container::device_nodes::MigNodeIds {
                gpu_minor: 0,
                gi_id: 1,
                ci_id: 0,
            },
        };
        plan.resolve_mig(&s, &[handed]).unwrap();
        assert_eq!(plan.record.gpus[0].uuid, "MIG-x");
        let expected: BTreeMap<String, String> =
            [("NVIDIA_VISIBLE_DEVICES".to_owned(), "MIG-x".to_owned())].into();
        assert_eq!(plan.answer.envs, expected);
        assert!(plan.answer.mounts.is_empty());
        // The queue advances as for any hand-off.
        assert!(plan.done() && plan.new_queue.is_empty());
    }

    #[test]
    fn a_whole_gpu_bind_on_a_mig_node_is_a_hami_core_hand_off() {
        let Decision::HandOff(plan) = decide_on("GPU-a,NVIDIA,1000,0:", &mig_settings()) else {
            panic!("a hand-off");
        };
        assert!(plan.mig.is_empty());
        assert_eq!(plan.answer.envs["CUDA_DEVICE_MEMORY_LIMIT_0"], "1000m");
    }

    #[test]
    fn mig_ids_on_a_hami_core_node_mixed_or_contradicting_fail_the_pod_by_name() {
        let fail_text = |queue: &str, s: &HandoffSettings| match decide_on(queue, s) {
            Decision::Fail { cause, .. } => cause.to_string(),
            other => panic!("{other:?}"),
        };
        let text = fail_text("GPU-a[group1-0],NVIDIA,9728,0:", &settings());
        assert!(
            text.starts_with("MIG: ") && text.contains("operatingmode is hami-core"),
            "{text}"
        );
        let devices = |ids: &[&str]| {
            ids.iter()
                .map(|id| crate::volcano::pod_devices::ContainerDevice {
                    uuid: (*id).to_owned(),
                    device_type: "NVIDIA".to_owned(),
                    used_mem: 1,
                    used_cores: 0,
                })
                .collect::<Vec<_>>()
        };
        let mig = crate::volcano::node_register::OperatingMode::Mig;
        let mixed = mig_uses(&devices(&["GPU-a[group1-0]", "GPU-b"]), mig).unwrap_err();
        assert!(
            mixed
                .to_string()
                .contains("mixes MIG device IDs and whole GPUs"),
            "{mixed}"
        );
        let two = mig_uses(&devices(&["GPU-a[group1-0]", "GPU-a[group3-0]"]), mig).unwrap_err();
        assert!(
            two.to_string().contains("\"group1\" and \"group3\""),
            "{two}"
        );
        let ok = mig_uses(
            &devices(&["GPU-a[group1-0]", "GPU-a[group1-5]", "GPU-b[group3-1]"]),
            mig,
        )
        .unwrap();
        assert_eq!(
            ok.iter()
                .map(|u| (u.gpu_uuid.as_str(), u.position))
                .collect::<Vec<_>>(),
            [("GPU-a", 0), ("GPU-a", 5), ("GPU-b", 1)]
        );
        assert!(mig_uses(&devices(&["GPU-a"]), mig).unwrap().is_empty());
    }
}
