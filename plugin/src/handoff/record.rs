//! The node's record of every container's limits, and the check that makes it win over the container's region.
//!
//! A container's shared region (`<cache-root>/<pod-uid>_<container>/<file>.cache`, mounted read-write at
//! `/tmp/vgpu`) is written by the container's own processes: every word in it is the tenant's to change. The
//! agent is the only party that knows, from Allocate, what the container was given. So Allocate writes a
//! [`ContainerRecord`] (GPUs, memory cap per GPU, SM cap, priority, the region file's name) into the agent's own
//! directory, `<cache-root>.records/<pod-uid>_<container>.json` (mode 0700, never mounted into a container),
//! atomically (a temporary file, `fsync`, `rename`, `fsync` of the directory), so the record survives an agent
//! restart and is never seen half-written.
//!
//! Every monitor round ([`crate::monitor::feedback`]) then [`RegionGuard::check`]s each recorded container's region:
//!
//! | the tenant… | the agent… |
//! |---|---|
//! | raises or zeroes (= unlimited) a memory cap, raises an SM cap | writes the recorded cap back; reports it |
//! | writes a GPU UUID it was not given | writes the recorded UUID back (or clears the entry); reports it; the priority feedback never uses the region's UUIDs anyway |
//! | claims a priority | the feedback uses the recorded priority; the word is written back; a claim higher than recorded is reported |
//! | replaces the region file with a symlink (e.g. to another container's region) | removes the link (never follows it, never writes through it); reports it |
//! | puts a directory, FIFO or other non-file there | leaves it (nothing of another tenant's is reachable through it); reports it once |
//! | truncates the region | reports it once; does not extend it (its own processes fault on the lost pages, and the driver frees their memory when they exit; extending would hand them a zeroed, uncapped region) |
//! | deletes the region, or renames another file over it | reports it once; new processes create a fresh region that the next round caps again |
//! | zeroes its usage words or clears its process slots | nothing it can see: the region is the limiter's accounting, not evidence the agent can check; the host-side backstop (NVML's view of the GPU) is what bounds it |
//!
//! Every report is one log line naming the pod and container, one increment of
//! `vgpu_agent_region_tampering_total{kind}`, and one Kubernetes Event (`VGPURegionTampered`) on the pod. A report
//! is made per change: a cap written back is reported each time the tenant changes it again; a state the agent
//! leaves alone (truncated, not a file, gone) is reported once until it changes.
//!
//! A container's priority comes from its pod, never from its environment: the annotation
//! [`PRIORITY_ANNOTATION`] (`high`/`0` or `low`/`1`), default [`LOW_PRIORITY`] (HAMi-core's default), clamped to
//! HAMi-core's two levels.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vgpu_region::layout::{
    self, CUDA_DEVICE_MAX_COUNT, MAJOR_VERSION, MULTIPROCESS_SHARED_REGION_MAGIC_FLAG, UUID_LEN,
};

use crate::handoff::selection::PodView;
use crate::volcano::pod_devices::ContainerDevice;

/// The pod annotation that sets its containers' task priority: `high` (or `0`) or `low` (or `1`).
pub const PRIORITY_ANNOTATION: &str = "volcano.sh/vgpu-task-priority";
/// HAMi-core's high priority (`CUDA_TASK_PRIORITY=0`).
pub const HIGH_PRIORITY: i32 = 0;
/// HAMi-core's low priority, and its default (`CUDA_TASK_PRIORITY=1`).
pub const LOW_PRIORITY: i32 = layout::DEFAULT_PRIORITY;

/// The range HAMi-core defines (0 high, 1 low; its monitor indexes a two-entry array by it): anything a region
/// claims outside it is clamped into it.
pub fn clamp_priority(priority: i32) -> i32 {
    priority.clamp(HIGH_PRIORITY, LOW_PRIORITY)
}

/// A pod's [`PRIORITY_ANNOTATION`] that names no priority.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("annotation {PRIORITY_ANNOTATION} is {value:?}; expected high, low, 0 (high) or 1 (low)")]
pub struct PriorityError {
    /// The annotation's value, trimmed.
    pub value: String,
}

/// The priority a pod's annotation asks for.
pub fn priority_of(pod: &PodView) -> Result<i32, PriorityError> {
    match pod.annotations.get(PRIORITY_ANNOTATION).map(|v| v.trim()) {
        None => Ok(LOW_PRIORITY),
        Some("high" | "0") => Ok(HIGH_PRIORITY),
        Some("low" | "1") => Ok(LOW_PRIORITY),
        Some(other) => Err(PriorityError {
            value: other.to_owned(),
        }),
    }
}

/// One GPU a container was given.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedGpu {
    /// The GPU's UUID as Allocate handed it out.
    pub uuid: String,
    /// The memory cap on it in bytes (`CUDA_DEVICE_MEMORY_LIMIT_<i>`); 0 = none.
    pub memory_limit_bytes: u64,
}

/// What Allocate gave one container: the node's record, which wins over the container's region.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerRecord {
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name.
    pub pod: String,
    /// The pod's UID.
    pub pod_uid: String,
    /// The container's name.
    pub container: String,
    /// The region file's name inside the container's cache directory (`CUDA_DEVICE_MEMORY_SHARED_CACHE`).
    pub cache_file: String,
    /// The GPUs, in the order of `CUDA_DEVICE_MEMORY_LIMIT_<i>`.
    pub gpus: Vec<RecordedGpu>,
    /// The SM cap in percent, 1..=100 (100 = none).
    pub sm_limit_percent: u64,
    /// The task priority, [`HIGH_PRIORITY`] or [`LOW_PRIORITY`].
    pub priority: i32,
}

impl ContainerRecord {
    /// The record of one container's hand-off. `memory_factor` is MiB per memory unit, as in Allocate's envs.
    pub fn new(
        pod: &PodView,
        container: &str,
        devices: &[ContainerDevice],
        memory_factor: u32,
        cache_file: &str,
    ) -> Result<Self, PriorityError> {
        let gpus = devices
            .iter()
            .map(|d| RecordedGpu {
                uuid: d.uuid.clone(),
                // The same product Allocate puts in the environment, in bytes (u64: cannot overflow).
                memory_limit_bytes: (u64::from(d.used_mem) * u64::from(memory_factor)) << 20,
            })
            .collect();
        // HAMi-core: one SM cap for the container, the first device's; 0 (or ≥ 100) means none.
        let sm_limit_percent = devices
            .first()
            .map(|d| u64::from(d.used_cores))
            .filter(|cores| (1..=99).contains(cores))
            .unwrap_or(100);
        Ok(Self {
            namespace: pod.namespace.clone(),
            pod: pod.name.clone(),
            pod_uid: pod.uid.clone(),
            container: container.to_owned(),
            cache_file: cache_file.to_owned(),
            gpus,
            sm_limit_percent,
            priority: priority_of(pod)?,
        })
    }

    /// Whether `uuid` (as a region stores it) is one of this container's GPUs. A MIG hand-off carries a
    /// `[group-position]` suffix the region never shows; its region names the MIG device (`MIG-…`).
    fn owns_gpu(&self, uuid: &str) -> bool {
        self.gpus.iter().any(|g| {
            let base = g.uuid.split('[').next().unwrap_or(&g.uuid);
            base == uuid || (g.uuid.contains('[') && uuid.starts_with("MIG-"))
        })
    }
}

/// Recording failed; the message names the path and the cause.
#[derive(Debug, thiserror::Error)]
#[error("cannot keep the node's record of container {key} in {dir}: {source}")]
pub struct RecordError {
    key: String,
    dir: PathBuf,
    #[source]
    source: std::io::Error,
}

/// The agent's directory of container records.
#[derive(Debug, Clone)]
pub struct RecordStore {
    dir: PathBuf,
}

impl RecordStore {
    /// The store kept beside `cache_root`: `<cache-root>.records`. Beside, not inside: every entry of the cache
    /// root is some container's directory, and no container mounts the cache root's parent.
    pub fn beside(cache_root: &Path) -> Self {
        let mut name = cache_root
            .file_name()
            .map(|n| n.to_os_string())
            .unwrap_or_else(|| "containers".into());
        name.push(".records");
        Self {
            dir: cache_root.with_file_name(name),
        }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes (or replaces) the record of the container directory `key` (`<pod-uid>_<container>`), atomically.
    pub fn write(&self, key: &str, record: &ContainerRecord) -> Result<(), RecordError> {
        let fail = |source| RecordError {
            key: key.to_owned(),
            dir: self.dir.clone(),
            source,
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(fail)?;
        // Only the agent reads or writes records: a pre-existing directory is tightened too.
        std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700))
            .map_err(fail)?;
        let body = serde_json::to_vec_pretty(record).map_err(|e| fail(std::io::Error::other(e)))?;
        let tmp = self
            .dir
            .join(format!(".{key}.json.{}.tmp", uuid::Uuid::new_v4().simple()));
        let result = (|| {
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            file.write_all(&body)?;
            file.sync_all()?;
            std::fs::rename(&tmp, self.path_of(key))?;
            // The rename is durable only once the directory is.
            File::open(&self.dir)?.sync_all()
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result.map_err(fail)
    }

    /// Whether a record of `key` exists (anything at its path counts: a path that cannot be checked too).
    pub fn contains(&self, key: &str) -> bool {
        !matches!(
            std::fs::symlink_metadata(self.path_of(key)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound
        )
    }

    /// Removes the record of `key` (its pod is gone); a missing record is fine.
    pub fn remove(&self, key: &str) {
        match std::fs::remove_file(self.path_of(key)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => {
                tracing::warn!(key, %error, dir = %self.dir.display(), "cannot remove a container record")
            }
        }
    }

    /// Every record, by container directory name. An unreadable record is logged and left out (its
    /// container is then treated as unrecorded: its region can never block anyone).
    pub fn load(&self) -> HashMap<String, ContainerRecord> {
        let mut out = HashMap::new();
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return out;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(key) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
                continue;
            };
            if key.starts_with('.') {
                continue;
            }
            match std::fs::read(entry.path())
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
            {
                Ok(record) => {
                    out.insert(key.to_owned(), record);
                }
                Err(error) => {
                    tracing::warn!(file = %entry.path().display(), %error, "unreadable container record; ignored")
                }
            }
        }
        out
    }

    fn path_of(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.json"))
    }
}

/// Allocate's hook: writes the record of what one container is being handed (before the hand-off is
/// committed, so a container never runs unrecorded) into the store beside `cache_root`, the one Allocate uses,
/// under the container's cache directory name.
pub fn record_allocation(cache_root: &Path, record: &ContainerRecord) -> Result<(), RecordError> {
    let key = crate::container::response::cache_dir_name(&record.pod_uid, &record.container);
    RecordStore::beside(cache_root).write(&key, record)
}

/// Whether the node holds a record of container `container` of the pod with uid `pod_uid`.
pub fn recorded_container(cache_root: &Path, pod_uid: &str, container: &str) -> bool {
    let key = crate::container::response::cache_dir_name(pod_uid, container);
    RecordStore::beside(cache_root).contains(&key)
}

/// What a tenant changed, as reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TamperKind {
    /// A memory or SM cap was raised or removed.
    Limits,
    /// The region names a GPU the container was not given.
    Gpus,
    /// The region claims a higher priority than the pod's.
    Priority,
    /// The region file was replaced by a symlink.
    Symlink,
    /// The region path holds something other than a regular file.
    NotRegular,
    /// The region file shrank below a region's size.
    Truncated,
    /// The region file disappeared.
    Deleted,
    /// Another file now sits at the region's path.
    Replaced,
}

impl TamperKind {
    /// The metric label and Event wording.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Limits => "limits",
            Self::Gpus => "gpus",
            Self::Priority => "priority",
            Self::Symlink => "symlink",
            Self::NotRegular => "not_regular",
            Self::Truncated => "truncated",
            Self::Deleted => "deleted",
            Self::Replaced => "replaced",
        }
    }
}

/// One reported change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tamper {
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name.
    pub pod: String,
    /// The pod's UID.
    pub pod_uid: String,
    /// The container.
    pub container: String,
    /// What changed.
    pub kind: TamperKind,
    /// What was found and what the agent did.
    pub detail: String,
}

/// The last state the guard saw of one recorded container's region path, so a state is reported once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    /// Nothing there yet (no process has created the region).
    Absent,
    /// A regular file, by device and inode.
    File(u64, u64),
    /// A state reported and left alone (truncated, not a file, deleted).
    Reported(TamperKind, u64, u64),
}

/// Byte offsets of the words the guard reads and writes, for one layout.
struct Words {
    device_num: usize,
    uuids: usize,
    limit: usize,
    sm_limit: usize,
    priority: usize,
    header_len: usize,
}

const V1_WORDS: Words = {
    use layout::SharedRegion;
    use std::mem::offset_of;
    Words {
        device_num: offset_of!(SharedRegion, device_num),
        uuids: offset_of!(SharedRegion, uuids),
        limit: offset_of!(SharedRegion, limit),
        sm_limit: offset_of!(SharedRegion, sm_limit),
        priority: offset_of!(SharedRegion, priority),
        header_len: offset_of!(SharedRegion, procs),
    }
};

const V0_WORDS: Words = {
    use layout::v0::SharedRegion;
    use std::mem::offset_of;
    Words {
        device_num: offset_of!(SharedRegion, num),
        uuids: offset_of!(SharedRegion, uuids),
        limit: offset_of!(SharedRegion, limit),
        sm_limit: offset_of!(SharedRegion, sm_limit),
        priority: offset_of!(SharedRegion, priority),
        header_len: offset_of!(SharedRegion, procs),
    }
};

/// Checks recorded containers' regions against their records, every monitor round.
#[derive(Debug)]
pub struct RegionGuard {
    store: RecordStore,
    records: HashMap<String, ContainerRecord>,
    seen: HashMap<String, Seen>,
}

impl RegionGuard {
    /// A guard over the records kept beside `cache_root`.
    pub fn new(cache_root: &Path) -> Self {
        Self {
            store: RecordStore::beside(cache_root),
            records: HashMap::new(),
            seen: HashMap::new(),
        }
    }

    /// Re-reads the records (a few small files; called once per round, so a record written by Allocate, or
    /// left by the agent before a restart, is in force from the next round).
    pub fn reload(&mut self) {
        self.records = self.store.load();
        let records = &self.records;
        self.seen.retain(|key, _| records.contains_key(key));
    }

    /// The record of container directory `key`, if any.
    pub fn record(&self, key: &str) -> Option<&ContainerRecord> {
        self.records.get(key)
    }

    /// Checks the region of recorded container `key` whose directory is `dir`; restores what can be restored.
    /// Returns what to report, and whether the recorded region file is usable by the feedback now.
    pub fn check(&mut self, key: &str, dir: &Path) -> (Vec<Tamper>, bool) {
        let Some(record) = self.records.get(key) else {
            return (Vec::new(), false);
        };
        let path = dir.join(&record.cache_file);
        let previous = self.seen.get(key).copied().unwrap_or(Seen::Absent);
        let mut out = Vec::new();
        let mut report = |kind: TamperKind, detail: String| {
            out.push(Tamper {
                namespace: record.namespace.clone(),
                pod: record.pod.clone(),
                pod_uid: record.pod_uid.clone(),
                container: record.container.clone(),
                kind,
                detail,
            });
        };
        let file_name = &record.cache_file;
        let (next, usable) = match std::fs::symlink_metadata(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if matches!(
                    previous,
                    Seen::File(..) | Seen::Reported(TamperKind::Truncated, ..)
                ) {
                    report(
                        TamperKind::Deleted,
                        format!(
                            "region file {file_name} was deleted; a new one will be capped again when a process creates it"
                        ),
                    );
                    (Seen::Reported(TamperKind::Deleted, 0, 0), false)
                } else {
                    (previous, false)
                }
            }
            Err(error) => {
                tracing::debug!(path = %path.display(), %error, "cannot stat a region file");
                (previous, false)
            }
            Ok(meta) if meta.file_type().is_symlink() => {
                // Never followed, never written through: the link itself goes (unlink does not follow the last
                // component, and the directory is one the tenant cannot replace).
                let target = std::fs::read_link(&path)
                    .map(|t| t.display().to_string())
                    .unwrap_or_default();
                let removed = std::fs::remove_file(&path);
                report(
                    TamperKind::Symlink,
                    format!(
                        "region file {file_name} was a symlink to {target:?}; {}",
                        match removed {
                            Ok(()) =>
                                "the link was removed, nothing was read or written through it"
                                    .to_owned(),
                            Err(e) =>
                                format!("the link could not be removed ({e}); it is never followed"),
                        }
                    ),
                );
                (Seen::Absent, false)
            }
            Ok(meta) if !meta.file_type().is_file() => {
                let state = Seen::Reported(TamperKind::NotRegular, meta.dev(), meta.ino());
                if previous != state {
                    report(
                        TamperKind::NotRegular,
                        format!("region path {file_name} is not a regular file; ignored"),
                    );
                }
                (state, false)
            }
            Ok(meta) => {
                let (dev, ino) = (meta.dev(), meta.ino());
                match previous {
                    Seen::File(d, i) if (d, i) != (dev, ino) => report(
                        TamperKind::Replaced,
                        format!(
                            "region file {file_name} was replaced by another file; capping the new one"
                        ),
                    ),
                    Seen::Reported(TamperKind::Deleted, ..) => report(
                        TamperKind::Replaced,
                        format!(
                            "region file {file_name} was created again after it was deleted; capping the new one"
                        ),
                    ),
                    _ => {}
                }
                match restore(&path, record, (dev, ino)) {
                    Restored::Checked(found) => {
                        for (kind, detail) in found {
                            report(kind, detail);
                        }
                        (Seen::File(dev, ino), true)
                    }
                    Restored::Truncated(size) => {
                        let state = Seen::Reported(TamperKind::Truncated, ino, size);
                        if previous != state {
                            report(
                                TamperKind::Truncated,
                                format!(
                                    "region file {file_name} was truncated to {size} bytes; left as it is"
                                ),
                            );
                        }
                        (state, false)
                    }
                    // Not (yet) a region: a process is creating it, or it was swapped while we looked.
                    Restored::NotYet => (Seen::File(dev, ino), false),
                }
            }
        };
        self.seen.insert(key.to_owned(), next);
        (out, usable)
    }
}

enum Restored {
    Checked(Vec<(TamperKind, String)>),
    Truncated(u64),
    NotYet,
}

/// Opens the region at `path` (no symlink, the inode `lstat` saw), and writes the recorded caps, GPUs and
/// priority over any looser value. Only tightening writes: a limiter that repairs its region to a stricter
/// value from its own environment is never undone.
fn restore(path: &Path, record: &ContainerRecord, expected: (u64, u64)) -> Restored {
    let Ok(file) = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
    else {
        return Restored::NotYet;
    };
    let Ok(meta) = file.metadata() else {
        return Restored::NotYet;
    };
    if !meta.is_file() || (meta.dev(), meta.ino()) != expected {
        return Restored::NotYet;
    }
    let size = meta.len();
    let v0 = size == layout::v0::REGION_FILE_SIZE || size == layout::v0::REGION_SIZE as u64;
    if !v0 && size < layout::REGION_SIZE as u64 {
        return Restored::Truncated(size);
    }
    let words = if v0 { &V0_WORDS } else { &V1_WORDS };
    let mut header = vec![0u8; words.header_len];
    if file.read_exact_at(&mut header, 0).is_err() {
        return Restored::Truncated(size);
    }
    let word = |at: usize| -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&header[at..at + 8]);
        u64::from_ne_bytes(b)
    };
    let i32_at = |at: usize| -> i32 {
        let mut b = [0u8; 4];
        b.copy_from_slice(&header[at..at + 4]);
        i32::from_ne_bytes(b)
    };
    if i32_at(0) != MULTIPROCESS_SHARED_REGION_MAGIC_FLAG
        || (!v0 && i32_at(4) as u32 != MAJOR_VERSION)
    {
        return Restored::NotYet;
    }
    let mut found = Vec::new();
    let write_u64 = |at: usize, value: u64| file.write_all_at(&value.to_ne_bytes(), at as u64);
    let mut limits = Vec::new();
    for (i, gpu) in record.gpus.iter().enumerate().take(CUDA_DEVICE_MAX_COUNT) {
        let at = words.limit + 8 * i;
        let now = word(at);
        // 0 is "no cap": looser than any cap.
        if gpu.memory_limit_bytes > 0
            && (now == 0 || now > gpu.memory_limit_bytes)
            && write_u64(at, gpu.memory_limit_bytes).is_ok()
        {
            limits.push(format!(
                "memory cap of device {i} was {now} bytes, restored to {}",
                gpu.memory_limit_bytes
            ));
        }
        let at = words.sm_limit + 8 * i;
        let now = word(at);
        let effective = if now == 0 || now > 100 { 100 } else { now };
        if effective > record.sm_limit_percent && write_u64(at, record.sm_limit_percent).is_ok() {
            limits.push(format!(
                "SM cap of device {i} was {now} %, restored to {} %",
                record.sm_limit_percent
            ));
        }
    }
    if !limits.is_empty() {
        found.push((TamperKind::Limits, limits.join("; ")));
    }
    let device_num = usize::try_from(word(words.device_num))
        .unwrap_or(usize::MAX)
        .min(CUDA_DEVICE_MAX_COUNT);
    let mut foreign = Vec::new();
    for i in 0..device_num {
        let at = words.uuids + i * UUID_LEN;
        let raw = &header[at..at + UUID_LEN];
        let end = raw.iter().position(|&b| b == 0).unwrap_or(UUID_LEN);
        if end == 0 {
            continue;
        }
        let claimed = String::from_utf8_lossy(&raw[..end]).into_owned();
        if record.owns_gpu(&claimed) {
            continue;
        }
        let mut replacement = [0u8; UUID_LEN];
        if let Some(gpu) = record.gpus.get(i) {
            let base = gpu.uuid.split('[').next().unwrap_or(&gpu.uuid).as_bytes();
            let n = base.len().min(UUID_LEN - 1);
            replacement[..n].copy_from_slice(&base[..n]);
        }
        if file.write_all_at(&replacement, at as u64).is_ok() {
            foreign.push(format!("device {i} named {claimed:?}"));
        }
    }
    if !foreign.is_empty() {
        found.push((
            TamperKind::Gpus,
            format!(
                "{} (not a GPU given to this container); the recorded GPUs were written back",
                foreign.join(", ")
            ),
        ));
    }
    let mut tail = [0u8; 4];
    if file.read_exact_at(&mut tail, words.priority as u64).is_ok() {
        let claimed = i32::from_ne_bytes(tail);
        if claimed != record.priority
            && file
                .write_all_at(&record.priority.to_ne_bytes(), words.priority as u64)
                .is_ok()
            && claimed < record.priority
        {
            found.push((
                TamperKind::Priority,
                format!(
                    "priority {claimed} claimed, the pod's is {}; written back",
                    record.priority
                ),
            ));
        }
    }
    Restored::Checked(found)
}

/// The container directory names of `records` whose pods are not in `live_uids` (for the cache cleanup).
pub fn records_of_gone_pods(
    records: &HashMap<String, ContainerRecord>,
    live_uids: &HashSet<String>,
) -> Vec<String> {
    records
        .iter()
        .filter(|(_, r)| !live_uids.contains(&r.pod_uid))
        .map(|(k, _)| k.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn pod(annotations: &[(&str, &str)]) -> PodView {
        PodView {
            namespace: "ns".into(),
            name: "p".into(),
            uid: "uid-1".into(),
            annotations: annotations
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<BTreeMap<_, _>>(),
            ..PodView::default()
        }
    }

    #[test]
    fn priority_comes_from_the_annotation_within_hamis_range() {
        assert_eq!(priority_of(&pod(&[])), Ok(LOW_PRIORITY));
        assert_eq!(priority_of(&pod(&[(PRIORITY_ANNOTATION, "high")])), Ok(0));
        assert_eq!(priority_of(&pod(&[(PRIORITY_ANNOTATION, " 1 ")])), Ok(1));
        let error = priority_of(&pod(&[(PRIORITY_ANNOTATION, "-5")])).unwrap_err();
        assert_eq!(
            error.to_string(),
            format!(
                "annotation {PRIORITY_ANNOTATION} is \"-5\"; expected high, low, 0 (high) or 1 (low)"
            )
        );
        assert_eq!(clamp_priority(-5), 0);
        assert_eq!(clamp_priority(i32::MAX), 1);
    }

    #[test]
    fn records_are_written_atomically_privately_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("containers");
        let devices = [ContainerDevice {
            uuid: "GPU-a".into(),
            device_type: "NVIDIA".into(),
            used_mem: 3000,
            used_cores: 30,
        }];
        let record = ContainerRecord::new(&pod(&[]), "cuda", &devices, 1, "x.cache").unwrap();
        record_allocation(&root, &record).unwrap();
        let store = RecordStore::beside(&root);
        assert_eq!(store.dir(), dir.path().join("containers.records"));
        let mode = std::fs::metadata(store.dir()).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o700);
        let records = store.load();
        let record = &records["uid-1_cuda"];
        assert_eq!(record.gpus[0].memory_limit_bytes, 3000 << 20);
        assert_eq!(record.sm_limit_percent, 30);
        assert_eq!(record.cache_file, "x.cache");
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(store.dir()).unwrap().count(), 1);
        store.remove("uid-1_cuda");
        assert!(store.load().is_empty());
    }
}
