//! The node monitor's priority feedback: what HAMi's `vGPUmonitor` does every 5 s in `feedback.go`
//! (`Observe`), written into every container's shared region under the cache root, so SM caps and task
//! priorities behave the same whichever limiter (ours or HAMi-core) a container runs.
//!
//! The protocol (`docs/hami-core-region.md` §4.3): each launch stores `recent_kernel = 2` in the container's
//! region. Every round the monitor
//! 1. decrements every positive `recent_kernel`; a container whose value is still > 0 is *active* on each GPU
//!    of its region, at its `priority` (`CUDA_TASK_PRIORITY`; a smaller number is a higher priority, HAMi
//!    uses 0 high and 1 low);
//! 2. for every container: when a higher-priority container is active on one of its GPUs, stores
//!    `recent_kernel = −1` (the limiter then holds that container's launches), otherwise turns a −1 back into
//!    0; and stores `utilization_switch = 1` (enforce the SM cap) when a higher-priority container is active
//!    on one of its GPUs or two or more containers of its own priority are, else 0 (run free, so a container
//!    alone on its GPU is not throttled).
//!
//! A container also counts as active while its `last_kernel_time` is recent (see
//! [`PriorityFeedback::with_activity_window`]): current HAMi-core stops storing `recent_kernel` once its switch
//! is 0, and would otherwise never be capped again.
//!
//! Where HAMi's monitor has bugs, this one does not: a priority other than 0 or 1 indexes past a two-entry
//! array there and crashes the monitor, here any `i32` is a priority; its blocking check looks only at the
//! first of a container's GPUs that any active container uses, here every GPU counts. Regions are read and
//! written with `pread`/`pwrite` of the few words involved (never a mapping: a container truncating its file
//! must not be able to raise SIGBUS in the agent); a corrupt, truncated or foreign file is skipped with one
//! warning per file every [`WARN_EVERY`].
//!
//! The agent runs the feedback [`PriorityFeedback::guarded`]: each round first checks every recorded
//! container's region against the node's record ([`crate::handoff::record`]) and writes back what a tenant loosened,
//! and the feedback then trusts only the record for a container's GPUs, its priority and its region file: a
//! tenant writing GPU UUIDs or a priority into its region can neither block nor throttle a container on a GPU it
//! was not given. A region claims at most HAMi-core's two priority levels (clamped), a `recent_kernel` above the
//! `2` a launch stores counts as `2`, and a container without a record (allocated before the record existed)
//! counts at the lowest priority, so it can be throttled but never block anyone.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use vgpu_region::RegionReader;
use vgpu_region::layout::RECENT_KERNEL_ACTIVE;

use crate::handoff::record::{
    ContainerRecord, LOW_PRIORITY, RecordStore, RegionGuard, Tamper, clamp_priority,
};
use crate::monitor::events::{PodEvent, Reporting};

/// How often HAMi's monitor runs its feedback round (`Observe`, every 5 s: `docs/hami-core-region.md` §4.3).
pub const FEEDBACK_PERIOD: Duration = Duration::from_secs(5);

/// How often one unreadable region file may be warned about.
pub const WARN_EVERY: Duration = Duration::from_secs(600);

/// `(dir, pod uid, container)` for every `<pod-uid>_<container>` directory under `root` (the layout Allocate
/// creates). Entries that are not directories (symlinks included) or whose name is not UTF-8 are skipped; an
/// unreadable root has none.
pub(crate) fn container_dirs(root: &Path) -> impl Iterator<Item = (PathBuf, String, String)> {
    std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let (uid, container) = name.split_once('_')?;
            Some((e.path(), uid.to_owned(), container.to_owned()))
        })
}

/// Every `<pod-uid>_<container>` directory under `root` that holds a region file, as `(pod uid, container,
/// file)`: the file the node's record names for the container ([`crate::handoff::record`]; a tenant's decoy beside
/// it is never taken), else the newest `*.cache` (every Allocate draws a fresh name). Unreadable entries are
/// skipped.
pub fn region_files(root: &Path) -> Vec<(String, String, PathBuf)> {
    let recorded = recorded_files(root);
    container_dirs(root)
        .filter_map(|(dir, uid, container)| {
            let file = match recorded.get(&dir_key(&dir)) {
                Some(name) => regular_file(dir.join(name)),
                None => newest_cache_file(&dir),
            };
            Some((uid, container, file?))
        })
        .collect()
}

/// The region file name the node's record gives each recorded container directory.
fn recorded_files(root: &Path) -> HashMap<String, String> {
    RecordStore::beside(root)
        .load()
        .into_iter()
        .map(|(key, record)| (key, record.cache_file))
        .collect()
}

fn dir_key(dir: &Path) -> String {
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// `path` if it is a regular file itself (not a symlink to one).
fn regular_file(path: PathBuf) -> Option<PathBuf> {
    std::fs::symlink_metadata(&path)
        .is_ok_and(|m| m.file_type().is_file())
        .then_some(path)
}

/// [`region_files`] for a caller that lists the same root again and again (the scrape): each container
/// directory's choice is kept while the directory's mtime stays the same, so an unchanged directory costs one
/// `stat` instead of a listing. A directory modified in the last two seconds is always listed again (mtimes
/// are coarse, and a file created in the same tick as the last listing must not be missed).
#[derive(Debug, Default)]
pub struct RegionDirs {
    known: HashMap<PathBuf, (SystemTime, Option<PathBuf>)>,
    /// The node's records by container directory, read again when the records directory changes (or
    /// changed in the last two seconds).
    recorded: HashMap<String, ContainerRecord>,
    recorded_mtime: Option<SystemTime>,
}

impl RegionDirs {
    /// The node's record of container directory `<uid>_<container>`, as of the last [`Self::files`].
    pub fn record(&self, uid: &str, container: &str) -> Option<&ContainerRecord> {
        self.recorded.get(&format!("{uid}_{container}"))
    }

    /// As [`region_files`].
    pub fn files(&mut self, root: &Path) -> Vec<(String, String, PathBuf)> {
        let now = SystemTime::now();
        let records_mtime = std::fs::metadata(RecordStore::beside(root).dir())
            .and_then(|m| m.modified())
            .ok();
        let records_settled = records_mtime.is_some_and(|m| {
            now.duration_since(m)
                .is_ok_and(|age| age >= Duration::from_secs(2))
        });
        if records_mtime != self.recorded_mtime || !records_settled {
            self.recorded = RecordStore::beside(root).load();
            self.recorded_mtime = records_mtime;
        }
        let mut out = Vec::new();
        let mut seen = HashMap::with_capacity(self.known.len());
        for (dir, uid, container) in container_dirs(root) {
            if let Some(name) = self.recorded.get(&dir_key(&dir)).map(|r| &r.cache_file) {
                // One `lstat`: the recorded file or nothing, whatever else the tenant put beside it.
                if let Some(file) = regular_file(dir.join(name)) {
                    out.push((uid, container, file));
                }
                continue;
            }
            let Ok(mtime) = std::fs::symlink_metadata(&dir).and_then(|m| m.modified()) else {
                continue;
            };
            let settled = now
                .duration_since(mtime)
                .is_ok_and(|age| age >= Duration::from_secs(2));
            let file = match self.known.remove(&dir) {
                Some((known, file)) if known == mtime && settled => file,
                _ => newest_cache_file(&dir),
            };
            if let Some(file) = &file {
                out.push((uid, container, file.clone()));
            }
            seen.insert(dir, (mtime, file));
        }
        // Directories no longer listed (or an unreadable root) are forgotten.
        self.known = seen;
        out
    }
}

fn newest_cache_file(dir: &Path) -> Option<PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter(|e| e.file_name().as_encoded_bytes().ends_with(b".cache"))
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .max()
        .map(|(_, path)| path)
}

/// At most one warning per file every `every`; files not seen for a while are forgotten.
#[derive(Debug)]
pub struct RateLimitedWarnings {
    every: Duration,
    last: HashMap<PathBuf, Instant>,
}

impl RateLimitedWarnings {
    /// Allows one warning per file every `every`.
    pub fn new(every: Duration) -> Self {
        Self {
            every,
            last: HashMap::new(),
        }
    }

    /// Whether to warn about `file` now (and if so, remembers it).
    pub fn should_warn(&mut self, file: &Path, now: Instant) -> bool {
        // Bound the memory a directory full of junk can cost: forget files whose quiet period is over.
        if self.last.len() > 4096 {
            let every = self.every;
            self.last
                .retain(|_, at| now.saturating_duration_since(*at) < every);
        }
        match self.last.get(file) {
            Some(at) if now.saturating_duration_since(*at) < self.every => false,
            _ => {
                self.last.insert(file.to_path_buf(), now);
                true
            }
        }
    }
}

/// What one feedback round found and did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RoundReport {
    /// Regions taken into account.
    pub regions: usize,
    /// Files skipped (unreadable, corrupt, foreign).
    pub skipped: usize,
    /// Regions whose launches are blocked after the round.
    pub blocked: Vec<PathBuf>,
    /// Regions whose SM cap is enforced after the round.
    pub enforced: Vec<PathBuf>,
    /// Words written (changes only).
    pub writes: usize,
    /// What tenants changed in their regions against the node's record (guarded feedback only).
    pub tampered: Vec<Tamper>,
}

/// The priority feedback over one cache root.
#[derive(Debug)]
pub struct PriorityFeedback {
    root: PathBuf,
    /// The container directories, re-listed only when one changes (this runs every few seconds).
    dirs: RegionDirs,
    warnings: RateLimitedWarnings,
    activity_window: Duration,
    /// The node's record and its check, when the agent runs the feedback.
    guard: Option<RegionGuard>,
}

/// What the feedback believes about a region before reading it.
#[derive(Debug, Clone)]
struct Candidate {
    path: PathBuf,
    /// GPUs and priority from the node's record; `None`: from the region itself (untrusted).
    trusted: Option<(Vec<String>, i32)>,
}

/// One container's region in a round. The file is opened again for the second pass rather than held, so a
/// node with more containers than the agent may have open files is no problem.
struct Tenant<'a> {
    path: &'a Path,
    uuids: Vec<String>,
    priority: i32,
}

impl PriorityFeedback {
    /// Feedback for the regions under `root` (`<pod-uid>_<container>/*.cache`).
    pub fn new(root: PathBuf) -> Self {
        Self {
            root,
            dirs: RegionDirs::default(),
            warnings: RateLimitedWarnings::new(WARN_EVERY),
            activity_window: 2 * FEEDBACK_PERIOD,
            guard: None,
        }
    }

    /// Checks every recorded container's region against the node's record first, each round, and trusts only
    /// the record for GPUs, priority and region file (see the module doc). What the agent runs.
    pub fn guarded(mut self) -> Self {
        self.guard = Some(RegionGuard::new(&self.root));
        self
    }

    /// A container whose `last_kernel_time` is less than `window` old also counts as active (default: two
    /// periods, as long as a launch's `recent_kernel = 2` lasts). HAMi-core since its March 2026 reordering
    /// stops storing `recent_kernel` once its switch is 0, but still records the launch time; without this,
    /// two such containers sharing a GPU both run free for ever (`docs/hami-core-region.md` §4.3). Zero turns
    /// it off (HAMi's monitor exactly).
    pub fn with_activity_window(mut self, window: Duration) -> Self {
        self.activity_window = window;
        self
    }

    /// Whether `last_kernel_time` says the container launched within the window. Containers and the agent
    /// read one kernel clock, so a time more than a few seconds ahead is a tenant keeping itself "active", not
    /// skew: it does not count.
    fn launched_recently(&self, last_kernel_time: Option<u64>, now: u64) -> bool {
        let window = self.activity_window.as_secs();
        last_kernel_time
            .is_some_and(|t| t > 0 && t <= now.saturating_add(5) && now.saturating_sub(t) < window)
    }

    /// One round over every region under the root. Blocking file I/O; never panics on file contents.
    pub fn round(&mut self) -> RoundReport {
        let listed = self.dirs.files(&self.root);
        let Some(guard) = self.guard.as_mut() else {
            let files: Vec<PathBuf> = listed.into_iter().map(|(_, _, f)| f).collect();
            return self.round_over(&files);
        };
        guard.reload();
        let mut tampered = Vec::new();
        let mut candidates = Vec::with_capacity(listed.len());
        let mut recorded = std::collections::HashSet::new();
        for (dir, uid, container) in container_dirs(&self.root) {
            let key = format!("{uid}_{container}");
            let Some(record) = guard.record(&key) else {
                continue;
            };
            let path = dir.join(&record.cache_file);
            let trusted = (
                record
                    .gpus
                    .iter()
                    .map(|g| g.uuid.split('[').next().unwrap_or(&g.uuid).to_owned())
                    .collect(),
                clamp_priority(record.priority),
            );
            recorded.insert(key.clone());
            let (found, usable) = guard.check(&key, &dir);
            for t in &found {
                tracing::warn!(
                    pod = %format!("{}/{}", t.namespace, t.pod), container = %t.container, kind = t.kind.as_str(),
                    "a container changed its shared region against the node's record: {}", t.detail
                );
            }
            tampered.extend(found);
            if usable {
                candidates.push(Candidate {
                    path,
                    trusted: Some(trusted),
                });
            }
        }
        // Containers without a record: the newest region file, believed for nothing but its own GPUs, at the
        // lowest priority.
        candidates.extend(
            listed
                .into_iter()
                .filter(|(uid, container, _)| !recorded.contains(&format!("{uid}_{container}")))
                .map(|(_, _, path)| Candidate {
                    path,
                    trusted: None,
                }),
        );
        let mut report = self.round_candidates(&candidates, Some(LOW_PRIORITY));
        report.tampered = tampered;
        report
    }

    /// One round over the given region files, each believed for its own GPUs and (clamped) priority.
    pub fn round_over(&mut self, files: &[PathBuf]) -> RoundReport {
        let candidates: Vec<Candidate> = files
            .iter()
            .map(|f| Candidate {
                path: f.clone(),
                trusted: None,
            })
            .collect();
        self.round_candidates(&candidates, None)
    }

    /// One round. `untrusted_priority`: the priority of a region without a record (`None`: its own claim,
    /// clamped to HAMi-core's range).
    fn round_candidates(
        &mut self,
        candidates: &[Candidate],
        untrusted_priority: Option<i32>,
    ) -> RoundReport {
        let mut report = RoundReport::default();
        // Active containers per GPU UUID and priority.
        let mut active: HashMap<String, BTreeMap<i32, u32>> = HashMap::new();
        let mut tenants = Vec::with_capacity(candidates.len());
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        for candidate in candidates {
            let file = &candidate.path;
            let step = RegionReader::open_writable(file).and_then(|reader| {
                let fields = reader.feedback()?;
                let recent = if fields.recent_kernel > RECENT_KERNEL_ACTIVE {
                    // A launch stores 2; more is a tenant keeping itself active for minutes: count it as one
                    // launch, decayed once.
                    reader.set_recent_kernel(RECENT_KERNEL_ACTIVE - 1)?;
                    RECENT_KERNEL_ACTIVE - 1
                } else if fields.recent_kernel > 0 {
                    reader.decay_recent_kernel()?
                } else {
                    fields.recent_kernel
                };
                Ok((fields, recent))
            });
            let (fields, recent) = match step {
                Ok(step) => step,
                Err(error) => {
                    report.skipped += 1;
                    if self.warnings.should_warn(file, Instant::now()) {
                        tracing::warn!(file = %file.display(), %error, "container region unusable; the priority feedback skips it");
                    }
                    continue;
                }
            };
            let (mut uuids, priority) = match &candidate.trusted {
                Some((uuids, priority)) => (uuids.clone(), *priority),
                None => (
                    fields.uuids,
                    untrusted_priority.unwrap_or_else(|| clamp_priority(fields.priority)),
                ),
            };
            uuids.sort_unstable();
            uuids.dedup();
            if recent > 0 || self.launched_recently(fields.last_kernel_time, now) {
                for uuid in &uuids {
                    *active
                        .entry(uuid.clone())
                        .or_default()
                        .entry(priority)
                        .or_default() += 1;
                }
            }
            tenants.push(Tenant {
                path: file,
                uuids,
                priority,
            });
        }

        for tenant in &tenants {
            let path = tenant.path;
            let on_gpus = || tenant.uuids.iter().filter_map(|u| active.get(u));
            let blocked = on_gpus().any(|by_priority| {
                by_priority
                    .range(..tenant.priority)
                    .any(|(_, count)| *count > 0)
            });
            let contended = blocked
                || on_gpus()
                    .any(|by_priority| by_priority.get(&tenant.priority).copied().unwrap_or(0) > 1);
            // Re-read: a launch may have stored 2 since the first pass (HAMi reads again here too).
            let reread = RegionReader::open_writable(path)
                .and_then(|reader| reader.feedback().map(|now| (reader, now)));
            let (reader, now) = match reread {
                Ok(found) => found,
                Err(error) => {
                    report.skipped += 1;
                    if self.warnings.should_warn(path, Instant::now()) {
                        tracing::warn!(file = %path.display(), %error, "container region unusable; the priority feedback skips it");
                    }
                    continue;
                }
            };
            report.regions += 1;
            let mut write = |what: &'static str,
                             set: fn(&RegionReader, i32) -> vgpu_region::Result<()>,
                             value: i32| {
                match set(&reader, value) {
                    Ok(()) => {
                        report.writes += 1;
                        tracing::debug!(file = %path.display(), what, value, "priority feedback");
                    }
                    Err(error) => {
                        if self.warnings.should_warn(path, Instant::now()) {
                            tracing::warn!(file = %path.display(), %error, "cannot write the priority feedback");
                        }
                    }
                }
            };
            if blocked && now.recent_kernel >= 0 {
                write("recent_kernel", RegionReader::set_recent_kernel, -1);
            } else if !blocked && now.recent_kernel < 0 {
                write("recent_kernel", RegionReader::set_recent_kernel, 0);
            }
            let switch = i32::from(contended);
            if now.utilization_switch != switch {
                write(
                    "utilization_switch",
                    RegionReader::set_utilization_switch,
                    switch,
                );
            }
            if blocked {
                report.blocked.push(path.to_path_buf());
            }
            if contended {
                report.enforced.push(path.to_path_buf());
            }
        }
        report
    }
}

/// A tamper report as an Event on its pod.
fn tamper_event(t: &Tamper) -> PodEvent {
    PodEvent {
        namespace: t.namespace.clone(),
        pod: t.pod.clone(),
        pod_uid: t.pod_uid.clone(),
        reason: "VGPURegionTampered",
        action: "EnforceLimits",
        note: format!(
            "container {}: {} ({})",
            t.container,
            t.detail,
            t.kind.as_str()
        ),
    }
}

/// Runs the guarded feedback every `period` until aborted (the agent aborts it at shutdown). Each round runs on
/// a blocking thread; its tamper reports are counted and published as Events after it.
pub async fn run(root: PathBuf, period: Duration, reporting: Reporting) {
    let fresh = || {
        PriorityFeedback::new(root.clone())
            .with_activity_window(2 * period)
            .guarded()
    };
    let mut events = reporting.publisher("region change");
    let mut feedback = Some(fresh());
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seen_regions = usize::MAX;
    loop {
        ticker.tick().await;
        let mut current = feedback.take().unwrap_or_else(fresh);
        match tokio::task::spawn_blocking(move || {
            let report = current.round();
            (current, report)
        })
        .await
        {
            Ok((current, report)) => {
                if report.regions != seen_regions {
                    // Once at info (the duty runs), then at debug as containers come and go.
                    if seen_regions == usize::MAX {
                        tracing::info!(
                            root = %root.display(),
                            regions = report.regions,
                            "priority feedback into the containers' shared regions every {period:?}"
                        );
                    } else {
                        tracing::debug!(
                            regions = report.regions,
                            blocked = report.blocked.len(),
                            sm_limit_enforced = report.enforced.len(),
                            "priority feedback"
                        );
                    }
                    seen_regions = report.regions;
                }
                feedback = Some(current);
                if let Some(metrics) = &reporting.metrics {
                    for t in &report.tampered {
                        metrics.region_tampered(t.kind.as_str());
                    }
                }
                if let Some(events) = events.as_mut() {
                    for t in &report.tampered {
                        events.send(tamper_event(t));
                    }
                }
            }
            // A panic in a round is a bug; the next round starts from a fresh state instead of stopping.
            Err(error) => tracing::error!(%error, "priority feedback round failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warnings_are_rate_limited_per_file() {
        let mut w = RateLimitedWarnings::new(Duration::from_secs(60));
        let t0 = Instant::now();
        let (a, b) = (Path::new("/a"), Path::new("/b"));
        assert!(w.should_warn(a, t0));
        assert!(!w.should_warn(a, t0 + Duration::from_secs(59)));
        assert!(w.should_warn(b, t0 + Duration::from_secs(1)));
        assert!(w.should_warn(a, t0 + Duration::from_secs(61)));
    }

    #[test]
    fn the_directory_cache_sees_new_and_removed_containers_and_new_files() {
        let root = tempfile::tempdir().unwrap();
        let mut dirs = RegionDirs::default();
        let a = root.path().join("uid-a_cuda");
        std::fs::create_dir_all(&a).unwrap();
        std::fs::write(a.join("1.cache"), b"x").unwrap();
        assert_eq!(dirs.files(root.path()), region_files(root.path()));
        // A file created right after a listing (same mtime tick) is still found.
        std::fs::write(a.join("2.cache"), b"x").unwrap();
        let found = dirs.files(root.path());
        assert_eq!(found, region_files(root.path()));
        assert_eq!(found.len(), 1);
        let b = root.path().join("uid-b_cuda");
        std::fs::create_dir_all(&b).unwrap();
        std::fs::write(b.join("1.cache"), b"x").unwrap();
        assert_eq!(dirs.files(root.path()).len(), 2);
        std::fs::remove_dir_all(&a).unwrap();
        let found = dirs.files(root.path());
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].2, b.join("1.cache"));
        assert_eq!(dirs.known.len(), 1, "forgotten with its directory");

        // Everything above ran on directories modified just now, which are always listed again; a settled one
        // is not. Prove it: add a file and put the directory's mtime back, and the old choice stands.
        let past = SystemTime::now() - Duration::from_secs(10);
        let set_mtime = |dir: &Path, at: SystemTime| {
            std::fs::File::open(dir).unwrap().set_modified(at).unwrap();
        };
        set_mtime(&b, past);
        assert_eq!(dirs.files(root.path())[0].2, b.join("1.cache"));
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(b.join("2.cache"), b"x").unwrap();
        set_mtime(&b, past);
        assert_eq!(
            dirs.files(root.path())[0].2,
            b.join("1.cache"),
            "an unchanged, settled directory is not listed again"
        );
        // Its mtime changes (as creating a file does): listed again, the newer file found.
        set_mtime(&b, SystemTime::now());
        assert_eq!(dirs.files(root.path())[0].2, b.join("2.cache"));
    }

    #[test]
    fn region_files_take_the_newest_cache_of_each_container_directory() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("uid-1_cuda");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("old.cache"), b"x").unwrap();
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(dir.join("new.cache"), b"x").unwrap();
        std::fs::write(dir.join("libvgpu.so"), b"x").unwrap();
        std::fs::create_dir_all(root.path().join("no-underscore")).unwrap();
        std::fs::create_dir_all(root.path().join("uid-2_empty")).unwrap();
        let found = region_files(root.path());
        assert_eq!(
            found,
            vec![("uid-1".to_owned(), "cuda".to_owned(), dir.join("new.cache"))]
        );
    }

    #[test]
    fn a_recorded_container_is_read_from_its_recorded_file_never_a_decoy_or_a_link() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("uid-1_cuda");
        std::fs::create_dir_all(&dir).unwrap();
        let record = crate::handoff::record::ContainerRecord {
            namespace: "ns".into(),
            pod: "p".into(),
            pod_uid: "uid-1".into(),
            container: "cuda".into(),
            cache_file: "real.cache".into(),
            gpus: vec![],
            sm_limit_percent: 100,
            priority: 1,
        };
        RecordStore::beside(root.path())
            .write("uid-1_cuda", &record)
            .unwrap();
        std::fs::write(dir.join("real.cache"), b"x").unwrap();
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(dir.join("zz-decoy.cache"), b"x").unwrap();
        let mut dirs = RegionDirs::default();
        for found in [region_files(root.path()), dirs.files(root.path())] {
            assert_eq!(found.len(), 1);
            assert_eq!(
                found[0].2,
                dir.join("real.cache"),
                "the newer decoy is ignored"
            );
        }
        // A symlink in the recorded file's place: nothing is read.
        std::fs::remove_file(dir.join("real.cache")).unwrap();
        std::os::unix::fs::symlink("zz-decoy.cache", dir.join("real.cache")).unwrap();
        assert!(region_files(root.path()).is_empty());
        assert!(dirs.files(root.path()).is_empty());
    }
}
