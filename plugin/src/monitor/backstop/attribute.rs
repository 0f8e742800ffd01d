//! Attribution (pure): which recorded container each GPU process belongs to, and the sums per container and
//! GPU, from plain data: the round's processes with their cgroup owners, the node's records of Allocate, and
//! the pods' container statuses.
//!
//! A process counts for a recorded container on a GPU when
//! 1. its cgroup names the pod UID of a record, and
//! 2. its runtime container ID is, in the pod's `status.containerStatuses`, the container of that record
//!    (`confirmed`), or the pod's status has no such ID yet and the pod has exactly one recorded container
//!    (not `confirmed`: reported, never killed), and
//! 3. the GPU is one the record gives the container.
//!
//! Everything else on a GPU is unaccounted: host processes, processes that exited between NVML's answer and
//! the cgroup read, containers the agent never handed a GPU (a sidecar, `NVIDIA_VISIBLE_DEVICES=all`), and a
//! recorded container on a GPU it was not given.

use std::collections::HashMap;

use crate::handoff::record::ContainerRecord;
use crate::monitor::cgroup::ContainerRef;

use super::procfs::Owner;

/// One GPU process in a round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcSample {
    /// Host PID.
    pub pid: u32,
    /// Its start time (`stat` field 22; 0 when gone).
    pub start_time: u64,
    /// NVML's `usedGpuMemory` (`None`: not available, e.g. MIG).
    pub used_bytes: Option<u64>,
    /// From its cgroup.
    pub owner: Owner,
}

/// One GPU's processes in a round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuRound {
    /// `GPU-…`.
    pub uuid: String,
    /// Index on the node.
    pub index: u32,
    /// Its compute processes.
    pub processes: Vec<ProcSample>,
}

/// What the agent knows of one pod: identity and its containers' runtime IDs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PodInfo {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// `(container name, runtime ID without prefix)`.
    pub container_ids: Vec<(String, String)>,
}

/// A process of a recorded container, as the policy may act on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Host PID.
    pub pid: u32,
    /// Start time, to kill this process and no other.
    pub start_time: u64,
    /// Its container, as its cgroup said.
    pub container: ContainerRef,
    /// The container ID is the record's container's in the pod's status (killable).
    pub confirmed: bool,
    /// What NVML says it holds.
    pub used_bytes: Option<u64>,
}

/// A recorded container's use of one GPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Usage {
    /// The record's key, `<pod-uid>_<container>`.
    pub key: String,
    /// Namespace.
    pub namespace: String,
    /// Pod.
    pub pod: String,
    /// Pod UID.
    pub pod_uid: String,
    /// Container.
    pub container: String,
    /// GPU UUID.
    pub gpu_uuid: String,
    /// GPU index on the node.
    pub gpu_index: u32,
    /// The cap recorded at Allocate (0 = none).
    pub limit_bytes: u64,
    /// Sum of NVML's per-process memory.
    pub used_bytes: u64,
    /// Its processes on the GPU.
    pub members: Vec<Member>,
}

/// A process no recorded container accounts for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stray {
    /// Host PID.
    pub pid: u32,
    /// What NVML says it holds.
    pub used_bytes: Option<u64>,
    /// Its pod, when its cgroup names one the agent knows: `(namespace, name, uid)`.
    pub pod: Option<(String, String, String)>,
    /// The container name, when the pod's status has its ID.
    pub container: Option<String>,
}

/// What no recorded container accounts for on one GPU.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Unaccounted {
    /// GPU UUID.
    pub gpu_uuid: String,
    /// GPU index.
    pub gpu_index: u32,
    /// The sum of their memory.
    pub bytes: u64,
    /// The processes.
    pub processes: Vec<Stray>,
}

/// A round's attribution.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Attributed {
    /// Per recorded container and GPU sampled this round (every recorded GPU, used or not).
    pub usage: Vec<Usage>,
    /// Per GPU sampled this round.
    pub unaccounted: Vec<Unaccounted>,
}

/// A recorded GPU's UUID as NVML spells it (a record may carry a `[...]` suffix, as the region does).
pub fn bare_uuid(uuid: &str) -> &str {
    uuid.split('[').next().unwrap_or(uuid)
}

/// Attributes every process of `gpus`; `records` by key, `pods` by UID.
pub fn attribute(
    gpus: &[GpuRound],
    records: &HashMap<String, ContainerRecord>,
    pods: &HashMap<String, PodInfo>,
) -> Attributed {
    let mut by_uid: HashMap<&str, Vec<(&str, &ContainerRecord)>> = HashMap::new();
    for (key, record) in records {
        by_uid
            .entry(record.pod_uid.as_str())
            .or_default()
            .push((key.as_str(), record));
    }
    // Every recorded container on every sampled GPU it was given, in a stable order.
    let mut keys: Vec<&String> = records.keys().collect();
    keys.sort();
    let mut usage = Vec::new();
    let mut slot: HashMap<(&str, &str), usize> = HashMap::new();
    for key in keys {
        let record = &records[key];
        for gpu in &record.gpus {
            let Some(round) = gpus.iter().find(|g| g.uuid == bare_uuid(&gpu.uuid)) else {
                continue;
            };
            if slot.contains_key(&(key.as_str(), round.uuid.as_str())) {
                continue;
            }
            slot.insert((key.as_str(), round.uuid.as_str()), usage.len());
            usage.push(Usage {
                key: key.clone(),
                namespace: record.namespace.clone(),
                pod: record.pod.clone(),
                pod_uid: record.pod_uid.clone(),
                container: record.container.clone(),
                gpu_uuid: round.uuid.clone(),
                gpu_index: round.index,
                limit_bytes: gpu.memory_limit_bytes,
                used_bytes: 0,
                members: Vec::new(),
            });
        }
    }
    let mut unaccounted = Vec::with_capacity(gpus.len());
    for round in gpus {
        let mut stray = Unaccounted {
            gpu_uuid: round.uuid.clone(),
            gpu_index: round.index,
            ..Default::default()
        };
        for p in &round.processes {
            let bytes = p.used_bytes.unwrap_or(0);
            let Owner::Container(cref) = &p.owner else {
                stray.bytes = stray.bytes.saturating_add(bytes);
                stray.processes.push(Stray {
                    pid: p.pid,
                    used_bytes: p.used_bytes,
                    pod: None,
                    container: None,
                });
                continue;
            };
            let pod = pods.get(&cref.pod_uid);
            let name = pod.and_then(|pod| {
                pod.container_ids
                    .iter()
                    .find(|(_, id)| *id == cref.container_id)
                    .map(|(name, _)| name.as_str())
            });
            let recorded = by_uid.get(cref.pod_uid.as_str());
            let found = match (name, recorded) {
                (Some(name), Some(recorded)) => recorded
                    .iter()
                    .find(|(_, r)| r.container == name)
                    .map(|(key, _)| (*key, true)),
                // The ID is not in the status yet: the pod's only vGPU container, for reporting.
                (None, Some(recorded)) if recorded.len() == 1 => Some((recorded[0].0, false)),
                _ => None,
            };
            let at = found.and_then(|(key, confirmed)| {
                slot.get(&(key, round.uuid.as_str()))
                    .map(|i| (*i, confirmed))
            });
            match at {
                Some((i, confirmed)) => {
                    let u = &mut usage[i];
                    u.used_bytes = u.used_bytes.saturating_add(bytes);
                    u.members.push(Member {
                        pid: p.pid,
                        start_time: p.start_time,
                        container: cref.clone(),
                        confirmed,
                        used_bytes: p.used_bytes,
                    });
                }
                None => {
                    stray.bytes = stray.bytes.saturating_add(bytes);
                    let pod_ref = pod
                        .map(|pod| {
                            (
                                pod.namespace.clone(),
                                pod.name.clone(),
                                cref.pod_uid.clone(),
                            )
                        })
                        .or_else(|| {
                            recorded.and_then(|r| r.first()).map(|(_, r)| {
                                (r.namespace.clone(), r.pod.clone(), r.pod_uid.clone())
                            })
                        });
                    stray.processes.push(Stray {
                        pid: p.pid,
                        used_bytes: p.used_bytes,
                        pod: pod_ref,
                        container: name.map(str::to_owned),
                    });
                }
            }
        }
        unaccounted.push(stray);
    }
    Attributed { usage, unaccounted }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handoff::record::RecordedGpu;

    pub(crate) fn record(uid: &str, container: &str, gpus: &[(&str, u64)]) -> ContainerRecord {
        ContainerRecord {
            namespace: "ns".into(),
            pod: format!("pod-{uid}"),
            pod_uid: uid.into(),
            container: container.into(),
            cache_file: "x.cache".into(),
            gpus: gpus
                .iter()
                .map(|(uuid, limit)| RecordedGpu {
                    uuid: (*uuid).into(),
                    memory_limit_bytes: *limit,
                })
                .collect(),
            sm_limit_percent: 100,
            priority: 1,
        }
    }

    fn proc(pid: u32, bytes: u64, owner: Owner) -> ProcSample {
        ProcSample {
            pid,
            start_time: u64::from(pid) * 10,
            used_bytes: Some(bytes),
            owner,
        }
    }

    fn ctr(uid: &str, id: &str) -> Owner {
        Owner::Container(ContainerRef {
            pod_uid: uid.into(),
            container_id: id.into(),
        })
    }

    fn pod(name: &str, ids: &[(&str, &str)]) -> PodInfo {
        PodInfo {
            namespace: "ns".into(),
            name: name.into(),
            container_ids: ids
                .iter()
                .map(|(n, i)| ((*n).into(), (*i).into()))
                .collect(),
        }
    }

    #[test]
    fn processes_sum_per_recorded_container_and_gpu() {
        let records = HashMap::from([
            (
                "u1_a".to_owned(),
                record("u1", "a", &[("GPU-0", 100), ("GPU-1[0]", 50)]),
            ),
            ("u1_b".to_owned(), record("u1", "b", &[("GPU-0", 10)])),
        ]);
        let pods = HashMap::from([("u1".to_owned(), pod("p1", &[("a", "ida"), ("b", "idb")]))]);
        let gpus = vec![
            GpuRound {
                uuid: "GPU-0".into(),
                index: 0,
                processes: vec![
                    proc(1, 60, ctr("u1", "ida")),
                    proc(2, 70, ctr("u1", "ida")),
                    proc(3, 5, ctr("u1", "idb")),
                    proc(4, 1000, Owner::Host),
                    proc(5, 7, Owner::Gone),
                ],
            },
            GpuRound {
                uuid: "GPU-1".into(),
                index: 1,
                processes: vec![proc(6, 40, ctr("u1", "ida"))],
            },
        ];
        let a = attribute(&gpus, &records, &pods);
        let find = |key: &str, gpu: &str| {
            a.usage
                .iter()
                .find(|u| u.key == key && u.gpu_uuid == gpu)
                .unwrap()
                .clone()
        };
        let a0 = find("u1_a", "GPU-0");
        assert_eq!(
            (a0.used_bytes, a0.limit_bytes, a0.members.len()),
            (130, 100, 2)
        );
        assert!(a0.members.iter().all(|m| m.confirmed));
        assert_eq!(
            find("u1_a", "GPU-1").used_bytes,
            40,
            "the [..] suffix is ignored"
        );
        assert_eq!(find("u1_b", "GPU-0").used_bytes, 5);
        assert_eq!(a.usage.len(), 3);
        assert_eq!(a.unaccounted[0].bytes, 1007);
        assert_eq!(a.unaccounted[0].processes.len(), 2);
        assert_eq!(a.unaccounted[1].bytes, 0);
    }

    #[test]
    fn an_id_not_in_the_status_is_the_only_vgpu_container_unconfirmed_or_nobody() {
        let one = HashMap::from([("u1_a".to_owned(), record("u1", "a", &[("GPU-0", 100)]))]);
        let two = HashMap::from([
            ("u1_a".to_owned(), record("u1", "a", &[("GPU-0", 100)])),
            ("u1_b".to_owned(), record("u1", "b", &[("GPU-0", 100)])),
        ]);
        let gpus = vec![GpuRound {
            uuid: "GPU-0".into(),
            index: 0,
            processes: vec![proc(1, 60, ctr("u1", "new"))],
        }];
        let no_status = HashMap::new();
        let a = attribute(&gpus, &one, &no_status);
        assert_eq!(a.usage[0].used_bytes, 60);
        assert!(!a.usage[0].members[0].confirmed, "reported, never killed");
        let a = attribute(&gpus, &two, &no_status);
        assert!(a.usage.iter().all(|u| u.used_bytes == 0));
        assert_eq!(a.unaccounted[0].bytes, 60);
        assert_eq!(
            a.unaccounted[0].processes[0].pod,
            Some(("ns".into(), "pod-u1".into(), "u1".into()))
        );
    }

    #[test]
    fn other_containers_other_gpus_and_other_pods_are_unaccounted() {
        let records = HashMap::from([("u1_a".to_owned(), record("u1", "a", &[("GPU-0", 100)]))]);
        let pods = HashMap::from([
            (
                "u1".to_owned(),
                pod("p1", &[("a", "ida"), ("sidecar", "ids")]),
            ),
            ("u2".to_owned(), pod("p2", &[("all", "id2")])),
        ]);
        let gpus = vec![
            GpuRound {
                uuid: "GPU-0".into(),
                index: 0,
                processes: vec![proc(1, 1, ctr("u1", "ids")), proc(2, 2, ctr("u2", "id2"))],
            },
            GpuRound {
                uuid: "GPU-1".into(),
                index: 1,
                processes: vec![proc(3, 4, ctr("u1", "ida"))],
            },
        ];
        let a = attribute(&gpus, &records, &pods);
        assert_eq!(a.usage.len(), 1);
        assert_eq!(a.usage[0].used_bytes, 0);
        assert_eq!(a.unaccounted[0].bytes, 3);
        let sidecar = &a.unaccounted[0].processes[0];
        assert_eq!(sidecar.container.as_deref(), Some("sidecar"));
        assert_eq!(a.unaccounted[0].processes[1].pod.as_ref().unwrap().1, "p2");
        assert_eq!(
            a.unaccounted[1].bytes, 4,
            "a recorded container on a GPU it was not given"
        );
    }
}
