//! The node monitor's priority feedback: what HAMi's `vGPUmonitor` does every 5 s in `feedback.go`
//! (`Observe`), written into every container's shared region under the cache root, so SM caps and task
//! priorities behave the same whichever limiter (ours or HAMi-core) a container runs.
//!
//! The protocol (`hami-core-reference.md` §4.3): each launch stores `recent_kernel = 2` in the container's
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

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use vgpu_region::RegionReader;

/// How often HAMi's monitor runs its feedback round (`Observe`, every 5 s: `hami-core-reference.md` §4.3).
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
/// file)`; the file is the newest `*.cache` (every Allocate draws a fresh name). Unreadable entries are
/// skipped.
pub fn region_files(root: &Path) -> Vec<(String, String, PathBuf)> {
    container_dirs(root)
        .filter_map(|(dir, uid, container)| Some((uid, container, newest_cache_file(&dir)?)))
        .collect()
}

/// [`region_files`] for a caller that lists the same root again and again (the scrape): each container
/// directory's choice is kept while the directory's mtime stays the same, so an unchanged directory costs one
/// `stat` instead of a listing. A directory modified in the last two seconds is always listed again (mtimes
/// are coarse, and a file created in the same tick as the last listing must not be missed).
#[derive(Debug, Default)]
pub struct RegionDirs {
    known: HashMap<PathBuf, (SystemTime, Option<PathBuf>)>,
}

impl RegionDirs {
    /// As [`region_files`].
    pub fn files(&mut self, root: &Path) -> Vec<(String, String, PathBuf)> {
        let now = SystemTime::now();
        let mut out = Vec::new();
        let mut seen = HashMap::with_capacity(self.known.len());
        for (dir, uid, container) in container_dirs(root) {
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
}

/// The priority feedback over one cache root.
#[derive(Debug)]
pub struct PriorityFeedback {
    root: PathBuf,
    /// The container directories, re-listed only when one changes (this runs every few seconds).
    dirs: RegionDirs,
    warnings: RateLimitedWarnings,
    activity_window: Duration,
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
        }
    }

    /// A container whose `last_kernel_time` is less than `window` old also counts as active (default: two
    /// periods, as long as a launch's `recent_kernel = 2` lasts). HAMi-core since its March 2026 reordering
    /// stops storing `recent_kernel` once its switch is 0, but still records the launch time; without this,
    /// two such containers sharing a GPU both run free for ever (`hami-core-reference.md` §4.3). Zero turns
    /// it off (HAMi's monitor exactly).
    pub fn with_activity_window(mut self, window: Duration) -> Self {
        self.activity_window = window;
        self
    }

    /// Whether `last_kernel_time` says the container launched within the window (a time in the future beyond
    /// a minute of clock skew is garbage, not activity).
    fn launched_recently(&self, last_kernel_time: Option<u64>, now: u64) -> bool {
        let window = self.activity_window.as_secs();
        last_kernel_time
            .is_some_and(|t| t > 0 && t <= now.saturating_add(60) && now.saturating_sub(t) < window)
    }

    /// One round over every region under the root. Blocking file I/O; never panics on file contents.
    pub fn round(&mut self) -> RoundReport {
        let files: Vec<PathBuf> = self
            .dirs
            .files(&self.root)
            .into_iter()
            .map(|(_, _, f)| f)
            .collect();
        self.round_over(&files)
    }

    /// One round over the given region files.
    pub fn round_over(&mut self, files: &[PathBuf]) -> RoundReport {
        let mut report = RoundReport::default();
        // Active containers per GPU UUID and priority.
        let mut active: HashMap<String, BTreeMap<i32, u32>> = HashMap::new();
        let mut tenants = Vec::with_capacity(files.len());
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        for file in files {
            let step = RegionReader::open_writable(file).and_then(|reader| {
                let fields = reader.feedback()?;
                let recent = if fields.recent_kernel > 0 {
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
            let mut uuids = fields.uuids;
            uuids.sort_unstable();
            uuids.dedup();
            if recent > 0 || self.launched_recently(fields.last_kernel_time, now) {
                for uuid in &uuids {
                    *active
                        .entry(uuid.clone())
                        .or_default()
                        .entry(fields.priority)
                        .or_default() += 1;
                }
            }
            tenants.push(Tenant {
                path: file,
                uuids,
                priority: fields.priority,
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

/// Runs the feedback every `period` until aborted (the agent aborts it at shutdown). Each round runs on a
/// blocking thread.
pub async fn run(root: PathBuf, period: Duration) {
    let fresh = || PriorityFeedback::new(root.clone()).with_activity_window(2 * period);
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
}
