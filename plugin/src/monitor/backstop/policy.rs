//! The policy (pure): from a round's [`Usage`] and [`Unaccounted`], what to say and what to kill, with the
//! state that makes Events rate-limited.
//!
//! Per recorded container and GPU:
//!
//! ```text
//!   Within ──over──▶ Over ──(kill mode, over for the whole grace, a confirmed process)──▶ Killed
//!     ▲               │ ▲                                                                 │
//!     └──── within ───┘ └──────────── (still over: the kill is repeated every round) ─────┘
//! ```
//!
//! "Over" is `used > limit + tolerance × processes` (a limit of 0 is no cap). Entering Over reports once (an
//! Event, a log line, `violations{action="report"}`); entering Killed once more (`action="kill"`); while a
//! state lasts a reminder Event goes out at most every [`REMIND_EVERY`]. Back within the cap (or the processes
//! gone) is logged and the state forgotten. A GPU that could not be sampled this round keeps its states.
//! Processes no recorded container accounts for: one `VGPUUnaccountedMemory` Event per pod and GPU when first
//! seen, reminders at most every [`REMIND_EVERY`]; never killed.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use crate::config::BackstopMode;
use crate::monitor::events::PodEvent;

use super::attribute::{Member, Unaccounted, Usage};

/// The most often one container and GPU (or one pod's unaccounted use of a GPU) gets an Event while its
/// state lasts.
pub const REMIND_EVERY: Duration = Duration::from_secs(300);

/// `reason` of the over-limit Events.
pub const OVER_LIMIT: &str = "VGPUMemoryOverLimit";
/// `reason` of the unaccounted-memory Events.
pub const UNACCOUNTED: &str = "VGPUUnaccountedMemory";

/// The policy's knobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicySettings {
    /// Report or kill (off never gets here).
    pub mode: BackstopMode,
    /// Over the cap continuously this long before a kill.
    pub grace: Duration,
    /// Bytes allowed per process over the cap.
    pub tolerance_bytes: u64,
}

/// Something the round does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Publish an Event and log its note at warn.
    Notice(PodEvent),
    /// Count `vgpu_container_memory_violations_total`.
    Violation {
        /// `(namespace, pod, container)`.
        container: (String, String, String),
        /// `(gpu_uuid, gpu_index)`.
        gpu: (String, u32),
        /// `report` or `kill`.
        action: &'static str,
    },
    /// SIGKILL these processes (confirmed members of one container on one GPU); `announce`: this is the
    /// transition into Killed, so the round publishes an Event naming what it killed.
    Kill {
        /// The container and GPU (for the Event).
        usage: Box<Usage>,
        /// The processes.
        members: Vec<Member>,
        /// Publish the kill Event.
        announce: bool,
    },
    /// Log at info: back within the cap.
    Recovered {
        /// `<pod-uid>_<container>`.
        key: String,
        /// The GPU.
        gpu_uuid: String,
    },
}

/// `(namespace, name, uid)`.
type PodKey = (String, String, String);

/// A pod's unaccounted use of one GPU: bytes, PIDs, container names.
type StrayPod<'a> = (u64, Vec<u32>, Vec<&'a str>);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Over,
    Killed,
}

#[derive(Debug, Clone, Copy)]
struct Track {
    state: State,
    over_since: Instant,
    last_event: Instant,
}

/// The policy's memory between rounds.
#[derive(Debug)]
pub struct Policy {
    settings: PolicySettings,
    tracks: HashMap<(String, String), Track>,
    /// `(pod uid, gpu uuid)` → last Event.
    strays: HashMap<(String, String), Instant>,
}

/// The cap with the tolerance for `processes` processes, or `None` for no cap.
pub fn effective_cap(limit_bytes: u64, processes: usize, tolerance_bytes: u64) -> Option<u64> {
    (limit_bytes > 0)
        .then(|| limit_bytes.saturating_add(tolerance_bytes.saturating_mul(processes as u64)))
}

fn mib(bytes: u64) -> u64 {
    bytes >> 20
}

impl Policy {
    /// A policy with no history.
    pub fn new(settings: PolicySettings) -> Self {
        Self {
            settings,
            tracks: HashMap::new(),
            strays: HashMap::new(),
        }
    }

    /// Containers and GPUs currently over their cap (for tests and logs).
    pub fn over(&self) -> usize {
        self.tracks.len()
    }

    /// One round's decisions. `sampled`: the GPUs NVML answered for this round.
    pub fn decide(
        &mut self,
        usage: &[Usage],
        unaccounted: &[Unaccounted],
        sampled: &HashSet<&str>,
        now: Instant,
    ) -> Vec<Decision> {
        let mut out = Vec::new();
        let mut present = HashSet::new();
        for u in usage {
            let id = (u.key.clone(), u.gpu_uuid.clone());
            let cap = effective_cap(
                u.limit_bytes,
                u.members.len(),
                self.settings.tolerance_bytes,
            );
            let over = cap.is_some_and(|cap| u.used_bytes > cap);
            if !over {
                if self.tracks.remove(&id).is_some() {
                    out.push(Decision::Recovered {
                        key: u.key.clone(),
                        gpu_uuid: u.gpu_uuid.clone(),
                    });
                }
                continue;
            }
            let cap = cap.unwrap_or(0);
            present.insert(id.clone());
            let killable: Vec<Member> = u.members.iter().filter(|m| m.confirmed).cloned().collect();
            let kill_mode = self.settings.mode == BackstopMode::Kill;
            let track = match self.tracks.get_mut(&id) {
                Some(track) => track,
                None => {
                    let plan = if !kill_mode {
                        String::new()
                    } else if killable.is_empty() {
                        "; not killed: the container ID of its processes is not in the pod's status yet".into()
                    } else if self.settings.grace.is_zero() {
                        "; its processes on this GPU are killed now".into()
                    } else {
                        format!(
                            "; its processes on this GPU are killed if it stays over for {:?}",
                            self.settings.grace
                        )
                    };
                    out.push(Decision::Violation {
                        container: (u.namespace.clone(), u.pod.clone(), u.container.clone()),
                        gpu: (u.gpu_uuid.clone(), u.gpu_index),
                        action: "report",
                    });
                    out.push(Decision::Notice(over_event(u, cap, &plan)));
                    self.tracks.entry(id.clone()).or_insert(Track {
                        state: State::Over,
                        over_since: now,
                        last_event: now,
                    })
                }
            };
            let due = now.saturating_duration_since(track.over_since) >= self.settings.grace;
            if kill_mode && due && !killable.is_empty() {
                let announce = track.state != State::Killed;
                if announce {
                    track.state = State::Killed;
                    track.last_event = now;
                    out.push(Decision::Violation {
                        container: (u.namespace.clone(), u.pod.clone(), u.container.clone()),
                        gpu: (u.gpu_uuid.clone(), u.gpu_index),
                        action: "kill",
                    });
                }
                out.push(Decision::Kill {
                    usage: Box::new(u.clone()),
                    members: killable,
                    announce,
                });
            } else if now.saturating_duration_since(track.last_event) >= REMIND_EVERY {
                track.last_event = now;
                out.push(Decision::Notice(over_event(u, cap, "; still over")));
            }
        }
        // Gone from the usage (pod or record gone) on a GPU that answered: no longer over.
        let before: Vec<(String, String)> = self
            .tracks
            .keys()
            .filter(|id| !present.contains(*id) && sampled.contains(id.1.as_str()))
            .cloned()
            .collect();
        for id in before {
            self.tracks.remove(&id);
            out.push(Decision::Recovered {
                key: id.0,
                gpu_uuid: id.1,
            });
        }

        let mut seen = HashSet::new();
        for gpu in unaccounted {
            let mut per_pod: HashMap<&PodKey, StrayPod<'_>> = HashMap::new();
            for p in &gpu.processes {
                let Some(pod) = &p.pod else { continue };
                let entry = per_pod.entry(pod).or_default();
                entry.0 = entry.0.saturating_add(p.used_bytes.unwrap_or(0));
                entry.1.push(p.pid);
                if let Some(c) = &p.container {
                    entry.2.push(c);
                }
            }
            let mut pods: Vec<_> = per_pod.into_iter().collect();
            pods.sort_by(|a, b| a.0.cmp(b.0));
            for ((namespace, name, uid), (bytes, pids, containers)) in pods {
                let id = (uid.clone(), gpu.gpu_uuid.clone());
                seen.insert(id.clone());
                let due = self
                    .strays
                    .get(&id)
                    .is_none_or(|last| now.saturating_duration_since(*last) >= REMIND_EVERY);
                if !due {
                    continue;
                }
                self.strays.insert(id, now);
                let who = if containers.is_empty() {
                    "a container the agent did not hand this GPU".to_owned()
                } else {
                    format!("container {}", containers.join(", "))
                };
                out.push(Decision::Notice(PodEvent {
                    namespace: namespace.clone(),
                    pod: name.clone(),
                    pod_uid: uid.clone(),
                    reason: UNACCOUNTED,
                    action: "Report",
                    note: format!(
                        "{who} holds {} MiB on GPU {} (index {}) without a vGPU of it from the device plugin \
                         (PIDs {pids:?}); not limited, not killed",
                        mib(bytes),
                        gpu.gpu_uuid,
                        gpu.gpu_index
                    ),
                }));
            }
        }
        self.strays
            .retain(|id, _| seen.contains(id) || !sampled.contains(id.1.as_str()));
        out
    }
}

fn over_event(u: &Usage, cap: u64, plan: &str) -> PodEvent {
    PodEvent {
        namespace: u.namespace.clone(),
        pod: u.pod.clone(),
        pod_uid: u.pod_uid.clone(),
        reason: OVER_LIMIT,
        action: "Report",
        note: format!(
            "container {} uses {} MiB on GPU {} (index {}) as NVML sees it, over its limit of {} MiB ({} MiB with \
             the per-process tolerance, {} processes){plan}",
            u.container,
            mib(u.used_bytes),
            u.gpu_uuid,
            u.gpu_index,
            mib(u.limit_bytes),
            mib(cap),
            u.members.len()
        ),
    }
}

/// The Event of a kill: what was killed, and what was not.
pub fn kill_event(u: &Usage, cap: u64, killed: &[u32], not_killed: &[(u32, String)]) -> PodEvent {
    let mut note = format!(
        "container {} used {} MiB on GPU {} (index {}) as NVML sees it, over its limit of {} MiB ({} MiB with \
         the per-process tolerance) for the grace period: killed PIDs {killed:?} (SIGKILL)",
        u.container,
        mib(u.used_bytes),
        u.gpu_uuid,
        u.gpu_index,
        mib(u.limit_bytes),
        mib(cap),
    );
    if !not_killed.is_empty() {
        note.push_str(&format!("; not killed: {not_killed:?}"));
    }
    PodEvent {
        namespace: u.namespace.clone(),
        pod: u.pod.clone(),
        pod_uid: u.pod_uid.clone(),
        reason: OVER_LIMIT,
        action: "Kill",
        note,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::monitor::backstop::attribute::Stray;
    use crate::monitor::cgroup::ContainerRef;

    const MIB: u64 = 1 << 20;

    fn usage(used: u64, limit: u64, confirmed: &[bool]) -> Usage {
        Usage {
            key: "u1_a".into(),
            namespace: "ns".into(),
            pod: "p1".into(),
            pod_uid: "u1".into(),
            container: "a".into(),
            gpu_uuid: "GPU-0".into(),
            gpu_index: 0,
            limit_bytes: limit,
            used_bytes: used,
            members: confirmed
                .iter()
                .enumerate()
                .map(|(i, c)| Member {
                    pid: 100 + i as u32,
                    start_time: 1,
                    container: ContainerRef {
                        pod_uid: "u1".into(),
                        container_id: "id".into(),
                    },
                    confirmed: *c,
                    used_bytes: Some(used / confirmed.len().max(1) as u64),
                })
                .collect(),
        }
    }

    fn policy(mode: BackstopMode, grace: u64) -> Policy {
        Policy::new(PolicySettings {
            mode,
            grace: Duration::from_secs(grace),
            tolerance_bytes: 10 * MIB,
        })
    }

    fn sampled() -> HashSet<&'static str> {
        HashSet::from(["GPU-0"])
    }

    fn kinds(d: &[Decision]) -> Vec<String> {
        d.iter()
            .map(|d| match d {
                Decision::Notice(e) => format!("event:{}:{}", e.reason, e.action),
                Decision::Violation { action, .. } => format!("violation:{action}"),
                Decision::Kill {
                    members, announce, ..
                } => {
                    format!("kill:{}:{announce}", members.len())
                }
                Decision::Recovered { .. } => "recovered".into(),
            })
            .collect()
    }

    #[test]
    fn the_tolerance_is_per_process_and_a_zero_limit_is_no_cap() {
        assert_eq!(effective_cap(100, 2, 10), Some(120));
        assert_eq!(effective_cap(0, 2, 10), None);
        assert_eq!(effective_cap(u64::MAX, 2, 10), Some(u64::MAX));
        let mut p = policy(BackstopMode::Report, 0);
        let t = Instant::now();
        // 100 MiB cap, 2 processes: 120 MiB allowed.
        assert!(
            p.decide(
                &[usage(120 * MIB, 100 * MIB, &[true, true])],
                &[],
                &sampled(),
                t
            )
            .is_empty()
        );
        assert!(
            p.decide(&[usage(500 * MIB, 0, &[true])], &[], &sampled(), t)
                .is_empty()
        );
        let d = p.decide(
            &[usage(121 * MIB, 100 * MIB, &[true, true])],
            &[],
            &sampled(),
            t,
        );
        assert_eq!(
            kinds(&d),
            ["violation:report", "event:VGPUMemoryOverLimit:Report"]
        );
        let Decision::Notice(e) = &d[1] else {
            unreachable!()
        };
        assert!(
            e.note.contains("container a uses 121 MiB on GPU GPU-0"),
            "{}",
            e.note
        );
        assert!(e.note.contains("limit of 100 MiB"), "{}", e.note);
    }

    #[test]
    fn report_once_per_state_change_with_reminders() {
        let mut p = policy(BackstopMode::Report, 0);
        let t = Instant::now();
        let over = [usage(200 * MIB, 100 * MIB, &[true])];
        assert_eq!(p.decide(&over, &[], &sampled(), t).len(), 2);
        for s in 1..300 {
            let d = p.decide(&over, &[], &sampled(), t + Duration::from_secs(s));
            assert!(d.is_empty(), "second {s}: {d:?}");
        }
        let d = p.decide(&over, &[], &sampled(), t + REMIND_EVERY);
        assert_eq!(kinds(&d), ["event:VGPUMemoryOverLimit:Report"]);
        let within = [usage(50 * MIB, 100 * MIB, &[true])];
        let d = p.decide(
            &within,
            &[],
            &sampled(),
            t + REMIND_EVERY + Duration::from_secs(1),
        );
        assert_eq!(kinds(&d), ["recovered"]);
        // Over again: a new state, a new Event at once.
        let d = p.decide(
            &over,
            &[],
            &sampled(),
            t + REMIND_EVERY + Duration::from_secs(2),
        );
        assert_eq!(
            kinds(&d),
            ["violation:report", "event:VGPUMemoryOverLimit:Report"]
        );
    }

    #[test]
    fn kill_waits_for_a_continuous_grace_and_kills_only_confirmed_processes() {
        let mut p = policy(BackstopMode::Kill, 5);
        let t = Instant::now();
        let over = [usage(300 * MIB, 100 * MIB, &[true, false])];
        let within = [usage(10 * MIB, 100 * MIB, &[true, false])];
        let s = |n| t + Duration::from_secs(n);
        assert_eq!(
            kinds(&p.decide(&over, &[], &sampled(), s(0))),
            ["violation:report", "event:VGPUMemoryOverLimit:Report"]
        );
        assert!(p.decide(&over, &[], &sampled(), s(4)).is_empty());
        // Dips under the cap: the grace starts again.
        assert_eq!(
            kinds(&p.decide(&within, &[], &sampled(), s(5))),
            ["recovered"]
        );
        assert_eq!(p.decide(&over, &[], &sampled(), s(6)).len(), 2);
        assert!(p.decide(&over, &[], &sampled(), s(10)).is_empty());
        let d = p.decide(&over, &[], &sampled(), s(11));
        assert_eq!(kinds(&d), ["violation:kill", "kill:1:true"]);
        let Decision::Kill { members, .. } = &d[1] else {
            unreachable!()
        };
        assert_eq!(members[0].pid, 100, "the unconfirmed process is not killed");
        // Still over next round (dying): killed again, announced once.
        assert_eq!(
            kinds(&p.decide(&over, &[], &sampled(), s(12))),
            ["kill:1:false"]
        );
    }

    #[test]
    fn nothing_confirmed_is_never_killed_and_the_event_says_why() {
        let mut p = policy(BackstopMode::Kill, 0);
        let t = Instant::now();
        let over = [usage(300 * MIB, 100 * MIB, &[false])];
        let d = p.decide(&over, &[], &sampled(), t);
        assert_eq!(
            kinds(&d),
            ["violation:report", "event:VGPUMemoryOverLimit:Report"]
        );
        let Decision::Notice(e) = &d[1] else {
            unreachable!()
        };
        assert!(e.note.contains("not killed"), "{}", e.note);
        assert!(
            p.decide(&over, &[], &sampled(), t + Duration::from_secs(60))
                .is_empty()
        );
    }

    #[test]
    fn report_mode_never_kills() {
        let mut p = policy(BackstopMode::Report, 0);
        let t = Instant::now();
        let over = [usage(300 * MIB, 100 * MIB, &[true])];
        for s in 0..1000 {
            let d = p.decide(&over, &[], &sampled(), t + Duration::from_secs(s));
            assert!(!d.iter().any(|d| matches!(d, Decision::Kill { .. })));
        }
    }

    #[test]
    fn a_gpu_that_did_not_answer_keeps_its_state_and_a_gone_container_recovers() {
        let mut p = policy(BackstopMode::Report, 0);
        let t = Instant::now();
        p.decide(&[usage(300 * MIB, 100 * MIB, &[true])], &[], &sampled(), t);
        assert!(p.decide(&[], &[], &HashSet::new(), t).is_empty());
        assert_eq!(p.over(), 1);
        assert_eq!(kinds(&p.decide(&[], &[], &sampled(), t)), ["recovered"]);
        assert_eq!(p.over(), 0);
    }

    #[test]
    fn unaccounted_pods_get_one_event_per_gpu_and_reminders_hosts_none() {
        let mut p = policy(BackstopMode::Kill, 0);
        let t = Instant::now();
        let stray = |pod: Option<&str>| Stray {
            pid: 7,
            used_bytes: Some(64 * MIB),
            pod: pod.map(|n| ("ns".into(), n.into(), format!("uid-{n}"))),
            container: None,
        };
        let u = [Unaccounted {
            gpu_uuid: "GPU-0".into(),
            gpu_index: 0,
            bytes: 128 * MIB,
            processes: vec![stray(Some("rogue")), stray(None)],
        }];
        let d = p.decide(&[], &u, &sampled(), t);
        assert_eq!(kinds(&d), ["event:VGPUUnaccountedMemory:Report"]);
        let Decision::Notice(e) = &d[0] else {
            unreachable!()
        };
        assert_eq!(e.pod, "rogue");
        assert!(e.note.contains("64 MiB on GPU GPU-0"), "{}", e.note);
        assert!(
            p.decide(&[], &u, &sampled(), t + Duration::from_secs(299))
                .is_empty()
        );
        assert_eq!(p.decide(&[], &u, &sampled(), t + REMIND_EVERY).len(), 1);
        // Gone, then back: a state change, an Event at once.
        assert!(p.decide(&[], &[], &sampled(), t + REMIND_EVERY).is_empty());
        assert_eq!(
            p.decide(
                &[],
                &u,
                &sampled(),
                t + REMIND_EVERY + Duration::from_secs(1)
            )
            .len(),
            1
        );
    }
}
