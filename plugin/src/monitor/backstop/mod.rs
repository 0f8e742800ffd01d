//! The memory backstop: the node's own check of every container's GPU memory cap, from outside the container.
//!
//! The in-container limiter is only as strong as a library the tenant can bypass (a static binary, an unset
//! `ld.so.preload`) and a region file the tenant can write. Every period (`--memory-backstop-period`) this
//! loop asks NVML for every compute process on every GPU and its memory ([`crate::gpu::processes`], host
//! PIDs), maps each PID to its pod and container through its cgroup under `--host-proc-root`
//! ([`procfs`], cached by PID and start time), sums per container and GPU and compares with the caps recorded
//! at Allocate plus a per-process tolerance ([`attribute`]), and reports or kills ([`policy`], the state
//! machine and the Event rate limits). What it observes also goes to the metrics
//! (`vgpu_container_memory_observed_bytes`, `vgpu_unaccounted_memory_bytes`) through a [`BackstopView`], so a
//! bypassed or tampered limiter is visible beside the region's own figures.
//!
//! The attribution and the policy are pure; NVML ([`ProcessSource`]) and `/proc` are the edges. A round runs
//! on a blocking thread; Events go out through the shared [`EventPublisher`] and never hold up a round.

pub mod attribute;
pub mod policy;
pub mod procfs;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::core::v1::Pod;
use nvml_wrapper::Nvml;
use vgpu_metrics::{ObservedSample, UnaccountedSample};

use crate::config::{BackstopMode, BackstopSettings};
use crate::gpu::inventory::Inventory;
use crate::gpu::processes::{GpuProcess, Lister, ProcessError};
use crate::handoff::pod_cache::{PodCache, container_ids};
use crate::handoff::record::{ContainerRecord, RecordStore};
use crate::monitor::events::{PodEvent, Reporting};
use crate::monitor::feedback::RateLimitedWarnings;

use attribute::{GpuRound, PodInfo, ProcSample, attribute};
use policy::{Decision, Policy, PolicySettings, effective_cap, kill_event};
use procfs::{KillError, Killed, Owner, OwnerCache, kill_verified};

/// How often one GPU's (or one PID's) failure is logged.
const WARN_EVERY: Duration = Duration::from_secs(300);

/// Where the processes come from: NVML in the agent, a fake in the benchmark.
pub trait ProcessSource: Send {
    /// `(uuid, index on the node)` of every GPU.
    fn gpus(&self) -> Vec<(String, u32)>;
    /// The compute processes of GPU `i` (position in [`ProcessSource::gpus`]) into `out`, which is empty on entry.
    fn list(&mut self, i: usize, out: &mut Vec<GpuProcess>) -> Result<(), ProcessError>;
}

/// NVML as the [`ProcessSource`].
pub struct NvmlSource {
    nvml: Arc<Nvml>,
    inventory: Arc<Inventory>,
    lister: Lister,
}

impl std::fmt::Debug for NvmlSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmlSource")
            .field("gpus", &self.inventory.gpus.len())
            .field("version", &self.lister.version())
            .finish()
    }
}

impl NvmlSource {
    /// The GPUs of `inventory`, through `nvml`.
    pub fn new(nvml: Arc<Nvml>, inventory: Arc<Inventory>) -> Self {
        Self {
            nvml,
            inventory,
            lister: Lister::default(),
        }
    }
}

impl ProcessSource for NvmlSource {
    fn gpus(&self) -> Vec<(String, u32)> {
        self.inventory
            .gpus
            .iter()
            .enumerate()
            .map(|(i, g)| (g.uuid.clone(), i as u32))
            .collect()
    }

    fn list(&mut self, i: usize, out: &mut Vec<GpuProcess>) -> Result<(), ProcessError> {
        let index = self.inventory.gpus.get(i).map_or(0, |g| g.nvml_index);
        let device = self
            .nvml
            .device_by_index(index)
            .map_err(|source| ProcessError {
                function: "nvmlDeviceGetHandleByIndex",
                source,
            })?;
        self.lister.list(&device, out)
    }
}

/// What the last round observed, for the metrics (read at scrape time).
#[derive(Debug, Default)]
pub struct BackstopView {
    state: Mutex<(Vec<ObservedSample>, Vec<UnaccountedSample>)>,
}

impl BackstopView {
    /// Per container and GPU, and per GPU unaccounted.
    pub fn samples(&self) -> (Vec<ObservedSample>, Vec<UnaccountedSample>) {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set(&self, observed: Vec<ObservedSample>, unaccounted: Vec<UnaccountedSample>) {
        *self.state.lock().unwrap_or_else(PoisonError::into_inner) = (observed, unaccounted);
    }
}

/// The node's records, read again only when their directory changes (or changed in the last two seconds).
#[derive(Debug)]
struct Records {
    store: RecordStore,
    mtime: Option<SystemTime>,
    records: HashMap<String, ContainerRecord>,
}

impl Records {
    fn new(cache_root: &Path) -> Self {
        Self {
            store: RecordStore::beside(cache_root),
            mtime: None,
            records: HashMap::new(),
        }
    }

    fn current(&mut self) -> &HashMap<String, ContainerRecord> {
        let mtime = std::fs::metadata(self.store.dir())
            .and_then(|m| m.modified())
            .ok();
        let settled = mtime.is_some_and(|m| {
            SystemTime::now()
                .duration_since(m)
                .is_ok_and(|age| age >= Duration::from_secs(2))
        });
        if mtime != self.mtime || !settled {
            self.records = self.store.load();
            self.mtime = mtime;
        }
        &self.records
    }
}

/// A violation to count: `((namespace, pod, container), (gpu_uuid, gpu_index), action)`.
pub type Violation = ((String, String, String), (String, u32), &'static str);

/// One round's results beside its side effects.
#[derive(Debug, Default)]
pub struct RoundReport {
    /// GPUs sampled.
    pub gpus: usize,
    /// GPU processes seen.
    pub processes: usize,
    /// Events to publish.
    pub events: Vec<PodEvent>,
    /// Violations to count: `((namespace, pod, container), (gpu_uuid, gpu_index), action)`.
    pub violations: Vec<Violation>,
    /// Processes killed.
    pub killed: Vec<u32>,
}

/// The backstop's state between rounds.
pub struct Backstop {
    settings: BackstopSettings,
    owners: OwnerCache,
    policy: Policy,
    records: Records,
    warnings: RateLimitedWarnings,
    listed: Vec<GpuProcess>,
}

impl std::fmt::Debug for Backstop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backstop")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// The pods by UID, as attribution needs them.
pub fn pod_infos(pods: &[Arc<Pod>]) -> HashMap<String, PodInfo> {
    pods.iter()
        .filter_map(|p| {
            let m = &p.metadata;
            Some((
                m.uid.clone()?.to_ascii_lowercase(),
                PodInfo {
                    namespace: m.namespace.clone().unwrap_or_default(),
                    name: m.name.clone()?,
                    container_ids: container_ids(p)
                        .map(|(name, id)| (name.to_owned(), id))
                        .collect(),
                },
            ))
        })
        .collect()
}

impl Backstop {
    /// A backstop over the records beside `cache_root`.
    pub fn new(settings: BackstopSettings, cache_root: &Path) -> Self {
        Self {
            owners: OwnerCache::new(settings.proc_root.clone()),
            policy: Policy::new(PolicySettings {
                mode: settings.mode,
                grace: settings.grace,
                tolerance_bytes: settings.tolerance_bytes,
            }),
            records: Records::new(cache_root),
            settings,
            warnings: RateLimitedWarnings::new(WARN_EVERY),
            listed: Vec::new(),
        }
    }

    /// cgroup files read since start.
    pub fn cgroup_reads(&self) -> u64 {
        self.owners.cgroup_reads
    }

    /// One round: sample, attribute, decide, kill, and the view for the metrics.
    pub fn round(
        &mut self,
        source: &mut dyn ProcessSource,
        pods: &HashMap<String, PodInfo>,
        view: &BackstopView,
        now: Instant,
    ) -> RoundReport {
        let mut report = RoundReport::default();
        let mut rounds = Vec::new();
        for (i, (uuid, index)) in source.gpus().into_iter().enumerate() {
            self.listed.clear();
            if let Err(error) = source.list(i, &mut self.listed) {
                if self.warnings.should_warn(Path::new(&uuid), now) {
                    tracing::warn!(gpu = %uuid, error = %crate::error::error_chain(&error), "cannot list the GPU's processes; the memory backstop skips it this round");
                }
                continue;
            }
            let mut processes = Vec::with_capacity(self.listed.len());
            for p in &self.listed {
                let (start_time, owner) = match self.owners.owner(p.pid) {
                    Ok(found) => found,
                    Err(error) => {
                        let key = PathBuf::from(format!("pid/{}", p.pid));
                        if self.warnings.should_warn(&key, now) {
                            tracing::warn!(pid = p.pid, error = %crate::error::error_chain(&error), "cannot tell which container a GPU process is in; counted as unaccounted");
                        }
                        (0, Owner::Gone)
                    }
                };
                processes.push(ProcSample {
                    pid: p.pid,
                    start_time,
                    used_bytes: p.used_bytes,
                    owner,
                });
            }
            report.processes += processes.len();
            rounds.push(GpuRound {
                uuid,
                index,
                processes,
            });
        }
        self.owners.end_round();
        report.gpus = rounds.len();
        let records = self.records.current();
        let attributed = attribute(&rounds, records, pods);
        view.set(
            attributed
                .usage
                .iter()
                .map(|u| ObservedSample {
                    namespace: u.namespace.clone(),
                    pod: u.pod.clone(),
                    container: u.container.clone(),
                    gpu_uuid: u.gpu_uuid.clone(),
                    gpu_index: u.gpu_index,
                    memory_observed_bytes: u.used_bytes,
                })
                .collect(),
            attributed
                .unaccounted
                .iter()
                .map(|u| UnaccountedSample {
                    gpu_uuid: u.gpu_uuid.clone(),
                    gpu_index: u.gpu_index,
                    memory_bytes: u.bytes,
                })
                .collect(),
        );
        let sampled: HashSet<&str> = rounds.iter().map(|r| r.uuid.as_str()).collect();
        let decisions =
            self.policy
                .decide(&attributed.usage, &attributed.unaccounted, &sampled, now);
        for decision in decisions {
            match decision {
                Decision::Notice(event) => {
                    tracing::warn!(namespace = %event.namespace, pod = %event.pod, reason = event.reason, "{}", event.note);
                    report.events.push(event);
                }
                Decision::Violation {
                    container,
                    gpu,
                    action,
                } => report.violations.push((container, gpu, action)),
                Decision::Recovered { key, gpu_uuid } => {
                    tracing::info!(container = %key, gpu = %gpu_uuid, "back within its memory cap as NVML sees it")
                }
                Decision::Kill {
                    usage,
                    members,
                    announce,
                } => {
                    let mut killed = Vec::new();
                    let mut not_killed = Vec::new();
                    for m in &members {
                        match kill_verified(&mut self.owners, m.pid, m.start_time, &m.container) {
                            Ok(Killed::Pidfd | Killed::Kill) => killed.push(m.pid),
                            Ok(Killed::Gone) => not_killed.push((m.pid, "gone".to_owned())),
                            Ok(Killed::NotTheContainer) => {
                                not_killed.push((m.pid, "no longer the container's".to_owned()))
                            }
                            Err(error) => {
                                let error: KillError = error;
                                tracing::warn!(pid = m.pid, error = %crate::error::error_chain(&error), "cannot kill a process over its container's memory cap");
                                not_killed.push((m.pid, error.to_string()));
                            }
                        }
                    }
                    report.killed.extend(&killed);
                    // Said once, at the transition; a kill repeated while the processes die is logged at debug.
                    if !announce {
                        tracing::debug!(container = %usage.key, gpu = %usage.gpu_uuid, ?killed, ?not_killed, "memory backstop: kill repeated");
                    } else {
                        let cap = effective_cap(
                            usage.limit_bytes,
                            usage.members.len(),
                            self.settings.tolerance_bytes,
                        )
                        .unwrap_or(0);
                        let event = kill_event(&usage, cap, &killed, &not_killed);
                        tracing::warn!(namespace = %event.namespace, pod = %event.pod, reason = event.reason, "{}", event.note);
                        report.events.push(event);
                    }
                }
            }
        }
        report
    }
}

/// Runs the backstop every period until aborted. `pods`: the node's pods (container IDs); without them only
/// processes of a pod's only vGPU container are attributed (reported, never killed).
pub async fn run(
    settings: BackstopSettings,
    source: Box<dyn ProcessSource>,
    cache_root: PathBuf,
    pods: Option<PodCache>,
    view: Arc<BackstopView>,
    reporting: Reporting,
) {
    if settings.mode == BackstopMode::Off {
        return;
    }
    tracing::info!(
        mode = settings.mode.as_str(),
        period = ?settings.period,
        grace = ?settings.grace,
        tolerance_mib = settings.tolerance_bytes >> 20,
        proc_root = %settings.proc_root.display(),
        "memory backstop: comparing every container's GPU memory as NVML sees it with its cap"
    );
    let mut events = reporting.publisher("memory backstop");
    let mut state = Some((Backstop::new(settings.clone(), &cache_root), source));
    let (mut panics, mut last_panic_log) = (0u64, None);
    let mut ticker = tokio::time::interval(settings.period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let Some((mut backstop, mut source)) = state.take() else {
            return;
        };
        let cached = pods.as_ref().map(PodCache::cached).unwrap_or_default();
        let round_view = Arc::clone(&view);
        let done = tokio::task::spawn_blocking(move || {
            let infos = pod_infos(&cached);
            // A panic is caught here so that the source (the NVML handle) survives it.
            let report = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                backstop.round(source.as_mut(), &infos, &round_view, Instant::now())
            }));
            (backstop, source, report)
        })
        .await;
        match done {
            // A panic in a round is a bug. The cap must not go unwatched because of it: log it (at most once
            // per WARN_EVERY, with the count) and go on from a clean state (the containers' over-limit
            // clocks start again, so a kill waits one more grace period).
            Ok((_, source, Err(panic))) => {
                panics += 1;
                if last_panic_log.is_none_or(|at: Instant| at.elapsed() >= WARN_EVERY) {
                    let what = panic
                        .downcast_ref::<&str>()
                        .map(|s| (*s).to_owned())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "a panic without a message".to_owned());
                    tracing::error!(
                        panic = %what,
                        rounds_failed = panics,
                        "memory backstop round panicked; starting again from a clean state"
                    );
                    last_panic_log = Some(Instant::now());
                }
                state = Some((Backstop::new(settings.clone(), &cache_root), source));
            }
            Ok((backstop, source, Ok(report))) => {
                state = Some((backstop, source));
                if let Some(metrics) = &reporting.metrics {
                    for ((ns, pod, container), (uuid, index), action) in &report.violations {
                        metrics.memory_violation((ns, pod, container), (uuid, *index), action);
                    }
                }
                if let Some(events) = events.as_mut() {
                    for event in report.events {
                        events.send(event);
                    }
                }
            }
            // Only a cancelled runtime gets here (the panic is caught above).
            Err(error) => {
                tracing::error!(%error, "memory backstop round could not run; the backstop stops");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handoff::record::RecordedGpu;

    const MIB: u64 = 1 << 20;
    const UID: &str = "0b7e6a8c-0000-4000-8000-000000000001";

    /// The node's record of container `cuda` of pod `ns/p` with a 100 MiB cap on each of `gpus`.
    fn record_cuda(cache_root: &Path, gpus: &[&str]) {
        RecordStore::beside(cache_root)
            .write(
                &format!("{UID}_cuda"),
                &ContainerRecord {
                    namespace: "ns".into(),
                    pod: "p".into(),
                    pod_uid: UID.into(),
                    container: "cuda".into(),
                    cache_file: "x.cache".into(),
                    gpus: gpus
                        .iter()
                        .map(|uuid| RecordedGpu {
                            uuid: (*uuid).into(),
                            memory_limit_bytes: 100 * MIB,
                        })
                        .collect(),
                    sm_limit_percent: 100,
                    priority: 1,
                },
            )
            .unwrap();
    }

    /// `/proc/<pid>/stat` (start time 77) and `/proc/<pid>/cgroup` under `proc_root`.
    fn add_proc(proc_root: &Path, pid: u32, cgroup: &str) {
        let d = proc_root.join(pid.to_string());
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(
            d.join("stat"),
            format!("{pid} (x) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 77 0 0\n"),
        )
        .unwrap();
        std::fs::write(d.join("cgroup"), cgroup).unwrap();
    }

    /// GPU 0 answers with `processes`; GPU 1 always fails.
    struct Fake(Vec<GpuProcess>);

    impl ProcessSource for Fake {
        fn gpus(&self) -> Vec<(String, u32)> {
            vec![("GPU-0".into(), 0), ("GPU-1".into(), 1)]
        }

        fn list(&mut self, i: usize, out: &mut Vec<GpuProcess>) -> Result<(), ProcessError> {
            if i == 1 {
                return Err(ProcessError {
                    function: "nvmlDeviceGetComputeRunningProcesses_v3",
                    source: nvml_wrapper::error::NvmlError::GpuLost,
                });
            }
            out.clone_from(&self.0);
            Ok(())
        }
    }

    #[test]
    fn a_round_samples_attributes_reports_and_skips_a_failing_gpu() {
        let dir = tempfile::tempdir().unwrap();
        let cache_root = dir.path().join("containers");
        std::fs::create_dir_all(&cache_root).unwrap();
        let id = "ab".repeat(32);
        record_cuda(&cache_root, &["GPU-0", "GPU-1"]);
        let proc_root = dir.path().join("proc");
        for (pid, cgroup) in [
            (10, format!("0::/kubepods/pod{UID}/{id}\n")),
            (11, "0::/system.slice/sshd.service\n".to_owned()),
        ] {
            add_proc(&proc_root, pid, &cgroup);
        }
        let settings = BackstopSettings {
            tolerance_bytes: 0,
            proc_root,
            ..BackstopSettings::default()
        };
        let mut backstop = Backstop::new(settings, &cache_root);
        let mut source = Fake(vec![
            GpuProcess {
                pid: 10,
                used_bytes: Some(300 * MIB),
            },
            GpuProcess {
                pid: 11,
                used_bytes: Some(5 * MIB),
            },
            // Listed by NVML, exited before its cgroup was read.
            GpuProcess {
                pid: 12,
                used_bytes: Some(7 * MIB),
            },
        ]);
        let pods = HashMap::from([(
            UID.to_owned(),
            PodInfo {
                namespace: "ns".into(),
                name: "p".into(),
                container_ids: vec![("cuda".into(), id.clone())],
            },
        )]);
        let view = BackstopView::default();
        let now = Instant::now();
        let report = backstop.round(&mut source, &pods, &view, now);
        assert_eq!((report.gpus, report.processes), (1, 3), "GPU 1 is skipped");
        assert_eq!(report.violations.len(), 1);
        assert_eq!(report.violations[0].2, "report");
        assert_eq!(report.events.len(), 1);
        assert!(report.killed.is_empty(), "report mode");
        let (observed, unaccounted) = view.samples();
        assert_eq!(observed.len(), 1, "only the GPU that answered");
        assert_eq!(observed[0].memory_observed_bytes, 300 * MIB);
        assert_eq!(unaccounted.len(), 1);
        assert_eq!(unaccounted[0].memory_bytes, 12 * MIB);
        // The next round: same state, nothing new to say, no cgroup read again.
        let reads = backstop.cgroup_reads();
        let report = backstop.round(&mut source, &pods, &view, now + Duration::from_secs(1));
        assert!(report.events.is_empty() && report.violations.is_empty());
        assert_eq!(backstop.cgroup_reads(), reads);
    }

    /// Panics on its first listing, then lists one process of 300 MiB on GPU-0.
    struct PanicsOnce(bool);

    impl ProcessSource for PanicsOnce {
        fn gpus(&self) -> Vec<(String, u32)> {
            vec![("GPU-0".into(), 0)]
        }

        fn list(&mut self, _: usize, out: &mut Vec<GpuProcess>) -> Result<(), ProcessError> {
            if !std::mem::replace(&mut self.0, true) {
                panic!("a bug in one round");
            }
            out.push(GpuProcess {
                pid: 10,
                used_bytes: Some(300 * MIB),
            });
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_round_that_panics_is_logged_and_the_next_round_still_watches_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let cache_root = dir.path().join("containers");
        std::fs::create_dir_all(&cache_root).unwrap();
        record_cuda(&cache_root, &["GPU-0"]);
        let proc_root = dir.path().join("proc");
        let id = "ab".repeat(32);
        add_proc(&proc_root, 10, &format!("0::/kubepods/pod{UID}/{id}\n"));
        let settings = BackstopSettings {
            tolerance_bytes: 0,
            period: Duration::from_millis(10),
            proc_root,
            ..BackstopSettings::default()
        };
        let view = Arc::new(BackstopView::default());
        let reporting = Reporting {
            metrics: None,
            client: None,
            node: None,
            event_timeout: Duration::from_secs(1),
        };
        let task = tokio::spawn(run(
            settings,
            Box::new(PanicsOnce(false)),
            cache_root,
            None,
            Arc::clone(&view),
            reporting,
        ));
        let mut observed = Vec::new();
        for _ in 0..500 {
            observed = view.samples().0;
            if !observed.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            !task.is_finished(),
            "the backstop kept running after the panic"
        );
        task.abort();
        assert_eq!(observed.len(), 1, "a later round observed the container");
        assert_eq!(observed[0].memory_observed_bytes, 300 * MIB);
    }
}
