//! [`Region`]: a mapped v1.2 region file, opened or created the way HAMi-core does it (but without following
//! links), with lock-free accounting for the limiter's hot paths.
//!
//! # Which fields are updated how
//!
//! | field | writer | how |
//! |---|---|---|
//! | `procs[s].used[d].total` | owner of slot `s` | checked CAS add (never wraps), exact sub (saturating only if tampered), `SeqCst` |
//! | `procs[s].used[d].{context,module,data}_size` | owner of slot `s` | saturating add / sub, relaxed |
//! | `procs[s].seqlock` | owner of slot `s` | `fetch_add(1)` before and after each update (HAMi-core readers) |
//! | `procs[s].pid` | anybody | CAS only: `0 → pid` takes a free slot, `pid → −reaper` claims a dead one for freeing |
//! | `procs[s].{status,hostpid}`, `unused[1]` (start time) | whoever holds `pid` (owner, or the reaper holding the mark) | atomic stores |
//! | `proc_num` | registrants (`fetch_max`), the region-lock holder (CAS down over reserved free slots) | atomic |
//! | `recent_kernel` | limiter on launch (CAS to 2 unless negative); monitor write-back | atomic |
//! | `utilization_switch` | monitor write-back | atomic |
//! | `last_kernel_time` | limiter on launch (`fetch_max`, at most once a second per process) | atomic |
//! | `limit`, `sm_limit` | initialiser (before the magic); any opener may only *lower* a limit ([`Region::tighten_limit`]) | CAS |
//! | `priority`, versions | initialiser, under the whole-file OFD lock, before the magic | atomic stores, then magic with release |
//! | `device_num`, `uuids` | [`Region::set_device_info`], ordered by the region lock when it is free | atomic stores |
//! | `owner_pid` | the region lock, see [`crate::lock`] | CAS |
//!
//! Readers on the hot path ([`Region::device_usage`]) only do relaxed loads of `proc_num`, `status` and
//! `used[d].total`: each value is exact, the sum is a moment's view, which is what HAMi-core's own check gives.
//!
//! # A hostile tenant
//!
//! Every process of the container can write the file. What a process guarantees from its own view, whatever
//! the others write: it never admits a charge that makes the container's usage (the others' slots as found,
//! its own as it knows it) pass the limit; a charge never wraps a counter (a refusal leaves every usage
//! counter as it was); it counts its own charges in process memory (so zeroed words do not fool its own
//! checks) and takes its slot back when somebody clears its status or frees it; a limit can only be lowered
//! by an opener, never
//! raised; a slot whose PID was reused by another process is reaped (start time in `unused[1]`). What it
//! cannot do is stop a writer from lowering the others' usage words: that only the node can see and undo.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::error::{RegionError, Result};
use crate::layout::{
    CUDA_DEVICE_MAX_COUNT, DEFAULT_PRIORITY, DEVICE_GRANT_WORD, DeviceMemory,
    INITIAL_UTILIZATION_SWITCH, MAJOR_VERSION, MINOR_VERSION,
    MULTIPROCESS_SHARED_REGION_MAGIC_FLAG, ProcSlot, RECENT_KERNEL_ACTIVE, REGION_FILE_SIZE,
    REGION_SIZE, SHARED_CACHE_DEFAULT, SHARED_REGION_MAX_PROCESS_NUM, SLOT_START_TIME_WORD,
    SLOT_STATUS_EXITED, SLOT_STATUS_RUNNING, SharedRegion, UUID_LEN, v0,
};
use crate::lock::{self, Acquired};
use crate::mapping::{Mapping, ofd_lock};

/// Default wait for the region lock before [`RegionError::LockTimeout`] (HAMi-core: 10 s per attempt). Only
/// explicit [`Region::lock`] callers wait this long; the writer's own operations never wait for the lock.
pub const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(10);

/// How long [`Region::set_device_info`] waits for the lock before writing without it (the values written by
/// the processes of one container are the same, so an unordered write is harmless).
const DEVICE_INFO_LOCK_WAIT: Duration = Duration::from_millis(50);

/// Serialises `open_or_create` within this process: POSIX-style locks of one process never conflict with each
/// other, and two threads initialising the same file would both write the limits.
/// The word holds the holder's pid instead of being a `Mutex`: a child forked while another thread of its
/// parent was in here (a thread the fork did not copy) takes it over instead of waiting for ever.
static OPEN_LOCK: AtomicI32 = AtomicI32::new(0);

/// Holds [`OPEN_LOCK`]; released on drop.
struct OpenGuard;

impl Drop for OpenGuard {
    fn drop(&mut self) {
        OPEN_LOCK.store(0, Ordering::Release);
    }
}

fn open_lock() -> OpenGuard {
    let me = std::process::id() as i32;
    loop {
        let held = OPEN_LOCK.load(Ordering::Acquire);
        // Free, or held in the parent we were forked from: ours.
        if held != me
            && OPEN_LOCK
                .compare_exchange(held, me, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            return OpenGuard;
        }
        std::thread::yield_now();
    }
}

/// Sentinel for "no slot" in [`Region`]'s cached slot index.
const NO_SLOT: usize = usize::MAX;

/// HAMi-core's allocation categories (`add_gpu_device_memory_usage(.., type)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(i32)]
pub enum MemoryKind {
    /// Type 0: context memory (HAMi-core adds the measured primary-context footprint).
    Context = 0,
    /// Type 1: module memory (HAMi-core never uses it).
    Module = 1,
    /// Type 2: data allocations (`cuMemAlloc*` and friends).
    Data = 2,
}

/// The limits a process brings; written only when it creates (initialises) the region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionConfig {
    /// Memory limit per device, bytes; 0 = unlimited (`CUDA_DEVICE_MEMORY_LIMIT[_i]`).
    pub limits: [u64; CUDA_DEVICE_MAX_COUNT],
    /// SM limit per device, percent (`CUDA_DEVICE_SM_LIMIT[_i]`).
    pub sm_limits: [u64; CUDA_DEVICE_MAX_COUNT],
    /// `CUDA_TASK_PRIORITY` (HAMi-core default 1).
    pub priority: i32,
}

impl Default for RegionConfig {
    fn default() -> Self {
        Self {
            limits: [0; CUDA_DEVICE_MAX_COUNT],
            sm_limits: [0; CUDA_DEVICE_MAX_COUNT],
            priority: DEFAULT_PRIORITY,
        }
    }
}

/// The limits an existing region holds where they differ from the caller's (HAMi-core logs "Limit
/// inconsistency" and keeps the file's values; so do we, reporting it once per open).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitMismatch {
    /// Limits in the file (these are in force).
    pub file_limits: [u64; CUDA_DEVICE_MAX_COUNT],
    /// Limits the caller asked for.
    pub requested_limits: [u64; CUDA_DEVICE_MAX_COUNT],
    /// SM limits in the file (in force).
    pub file_sm_limits: [u64; CUDA_DEVICE_MAX_COUNT],
    /// SM limits the caller asked for.
    pub requested_sm_limits: [u64; CUDA_DEVICE_MAX_COUNT],
}

/// What [`Region::open_or_create`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenReport {
    /// True when this call initialised the region (new, empty or never-finished file).
    pub initialized_here: bool,
    /// Set when the file already held limits different from the caller's (the values found, before repair).
    pub limit_mismatch: Option<LimitMismatch>,
    /// Devices whose memory limit in the file was unlimited or looser than the caller's and was lowered to the
    /// caller's (the stricter wins; a limit is never raised).
    pub memory_limits_tightened: Vec<usize>,
    /// Devices whose SM limit in the file was uncapped or looser than the caller's and was lowered.
    pub sm_limits_tightened: Vec<usize>,
}

/// Whether a kernel launch may proceed (HAMi-core's `rate_limiter` priority gate).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LaunchGate {
    /// Proceed; `recent_kernel` now says "active".
    Proceed,
    /// The monitor set `recent_kernel` to −1 (a higher-priority task is active): HAMi-core sleeps 1 s and asks
    /// again.
    Blocked,
}

/// The region file path HAMi-core uses: `$CUDA_DEVICE_MEMORY_SHARED_CACHE`, else `/tmp/cudevshr.cache`.
/// Takes the value of [`crate::layout::SHARED_CACHE_ENV`] so callers decide where the environment comes from.
pub fn region_path_from_env(value: Option<&std::ffi::OsStr>) -> PathBuf {
    match value {
        Some(v) if !v.is_empty() => PathBuf::from(v),
        _ => PathBuf::from(SHARED_CACHE_DEFAULT),
    }
}

/// A mapped HAMi-core v1.2 region. Cheap to share between threads (`&Region` is `Sync`).
#[derive(Debug)]
pub struct Region {
    path: PathBuf,
    map: Mapping,
    // Kept open for the mapping's lifetime, as HAMi-core does.
    file: File,
    report: OpenReport,
    /// Index of this process's slot, or `NO_SLOT`.
    slot: AtomicUsize,
    /// PID the slot was taken for (0 = none).
    slot_pid: AtomicI32,
    /// Set while a thread of this process takes a slot (an atomic, not a mutex: a fork child resets it).
    registering: AtomicBool,
    /// Last `last_kernel_time` this process wrote, to write it at most once a second.
    last_kernel_time: AtomicU64,
    /// Bytes this process has charged per device, by its own count in process memory: what it counts for
    /// itself in admission whatever its slot in the file says, and restores there when the slot was tampered.
    own_total: [AtomicU64; CUDA_DEVICE_MAX_COUNT],
    /// The context part of [`Region::own_total`].
    own_context: [AtomicU64; CUDA_DEVICE_MAX_COUNT],
    /// This process's grant per device (see [`Region::try_add_leased`]).
    leases: [Lease; CUDA_DEVICE_MAX_COUNT],
    /// Set while a thread of this process changes a grant (an atomic try-lock: one thread at a time, the
    /// others simply do without).
    granting: AtomicBool,
    /// How often this process found its slot tampered with and repaired it.
    repairs: AtomicU64,
}

impl Region {
    /// Opens the region file at `path`, creating and initialising it if needed.
    ///
    /// Protocol (compatible with HAMi-core's `try_create_shrreg`): the directory must belong to root or to us
    /// and must not be writable by others without the sticky bit; the file is created exclusively
    /// (`O_CREAT | O_EXCL | O_NOFOLLOW`, then `fchmod` 0666 on the new descriptor, never through the path) or
    /// opened with `O_NOFOLLOW` and must be a regular file with one link; a whole-file OFD write lock (it
    /// conflicts with HAMi-core's `lockf`); the size (0 → extend to 2 008 953 bytes like HAMi-core; 2 008 952
    /// or 2 008 953 → fine; anything else → error); map exactly 2 008 952 bytes; if the magic is absent
    /// initialise versions, limits, semaphores, `utilization_switch = 1`, `recent_kernel = 2`, `proc_num = 0`,
    /// priority, then store the magic last; otherwise check the version and compare limits: where the
    /// caller's limit is stricter than the file's (or the file has none), the file is lowered to the caller's,
    /// never raised. Always sets `last_kernel_time` to now.
    pub fn open_or_create(path: &Path, config: &RegionConfig) -> Result<Self> {
        let _guard = open_lock();
        let (file, created) = open_region_file(path)?;
        ofd_lock(&file, true).map_err(|e| RegionError::io("lock (F_OFD_SETLKW)", path, e))?;
        let result = Self::open_locked(path, file, created, config);
        // The lock goes with the file description: closing it on error releases it; on success release it now.
        if let Ok(region) = &result {
            ofd_lock(&region.file, false)
                .map_err(|e| RegionError::io("unlock (F_OFD_SETLK)", path, e))?;
        }
        result
    }

    fn open_locked(path: &Path, file: File, created: bool, config: &RegionConfig) -> Result<Self> {
        let size = file
            .metadata()
            .map_err(|e| RegionError::io("stat", path, e))?
            .len();
        if size == 0 {
            // New file (ours, or one whose creator has not extended it yet).
            file.set_len(REGION_FILE_SIZE)
                .map_err(|e| RegionError::io("extend", path, e))?;
        } else {
            check_region_file_size(path, size)?;
        }
        if created {
            // umask may have narrowed 0666, and every uid of the container must be able to write the region.
            // HAMi-core sets umask(0) for the same effect, which a library must not do. `fchmod` on the
            // descriptor we created exclusively: never a chmod through a path somebody else could redirect.
            file.set_permissions(std::fs::Permissions::from_mode(0o666))
                .map_err(|e| RegionError::io("fchmod", path, e))?;
        }
        let map = Mapping::map(&file, REGION_SIZE).map_err(|e| RegionError::io("mmap", path, e))?;
        let mut region = Self {
            path: path.to_path_buf(),
            map,
            file,
            report: OpenReport {
                initialized_here: false,
                limit_mismatch: None,
                memory_limits_tightened: Vec::new(),
                sm_limits_tightened: Vec::new(),
            },
            slot: AtomicUsize::new(NO_SLOT),
            slot_pid: AtomicI32::new(0),
            registering: AtomicBool::new(false),
            last_kernel_time: AtomicU64::new(0),
            own_total: [const { AtomicU64::new(0) }; CUDA_DEVICE_MAX_COUNT],
            own_context: [const { AtomicU64::new(0) }; CUDA_DEVICE_MAX_COUNT],
            leases: [const { Lease::none() }; CUDA_DEVICE_MAX_COUNT],
            granting: AtomicBool::new(false),
            repairs: AtomicU64::new(0),
        };
        region.report = region.initialise_or_check(config)?;
        let now = unix_now();
        region
            .shared()
            .last_kernel_time
            .store(now, Ordering::Relaxed);
        region.last_kernel_time.store(now, Ordering::Relaxed);
        Ok(region)
    }

    fn initialise_or_check(&self, config: &RegionConfig) -> Result<OpenReport> {
        let r = self.shared();
        let magic = r.initialized_flag.load(Ordering::Acquire);
        let (major, minor) = (
            r.major_version.load(Ordering::Relaxed),
            r.minor_version.load(Ordering::Relaxed),
        );
        if magic == MULTIPROCESS_SHARED_REGION_MAGIC_FLAG {
            if (major, minor) != (MAJOR_VERSION, MINOR_VERSION) {
                return Err(RegionError::UnsupportedVersion {
                    path: self.path.clone(),
                    major,
                    minor,
                    supported: "1.2",
                });
            }
            let file_limits = load_all(&r.limit);
            let file_sm_limits = load_all(&r.sm_limit);
            let limit_mismatch = (file_limits != config.limits
                || file_sm_limits != config.sm_limits)
                .then_some(LimitMismatch {
                    file_limits,
                    requested_limits: config.limits,
                    file_sm_limits,
                    requested_sm_limits: config.sm_limits,
                });
            // The first process to create the region must not decide the cap for everyone after it (it may
            // have had a malformed limit, recorded as 0 = unlimited, or only an SM cap): every opener with a
            // stricter limit lowers the file's. A limit is never raised here; only the node may raise it.
            let memory_limits_tightened = (0..CUDA_DEVICE_MAX_COUNT)
                .filter(|&d| tighten(&r.limit[d], config.limits[d]))
                .collect();
            let sm_limits_tightened = (0..CUDA_DEVICE_MAX_COUNT)
                .filter(|&d| {
                    let wanted = config.sm_limits[d];
                    // HAMi-core: 0 and >= 100 mean uncapped, so only 1..=99 can tighten.
                    (1..100).contains(&wanted) && tighten_sm(&r.sm_limit[d], wanted)
                })
                .collect();
            return Ok(OpenReport {
                initialized_here: false,
                limit_mismatch,
                memory_limits_tightened,
                sm_limits_tightened,
            });
        }
        // Not initialised: accept only a blank file or one whose initialiser died after writing the versions
        // (HAMi-core and we write them before the magic). Anything else is someone else's file.
        if magic != 0 {
            return Err(RegionError::BadMagic {
                path: self.path.clone(),
                found: magic,
                expected: MULTIPROCESS_SHARED_REGION_MAGIC_FLAG,
            });
        }
        if (major, minor) != (0, 0) && (major, minor) != (MAJOR_VERSION, MINOR_VERSION) {
            return Err(RegionError::UnsupportedVersion {
                path: self.path.clone(),
                major,
                minor,
                supported: "1.2 (or a blank file)",
            });
        }
        // Initialising needs `sem_init`, which the limiter's glibc-2.17 build imports weakly (no
        // DT_NEEDED libpthread.so.0: limiter/src/infra/imports.rs): NULL on glibc < 2.34 in a
        // process that did not load libpthread. Such a process cannot create the region (it can
        // open one that exists). The address goes through `black_box`: Rust assumes a function
        // pointer is never null and would fold a plain comparison away.
        if std::hint::black_box(libc::sem_init as *const ()).is_null() {
            return Err(RegionError::io(
                "sem_init (glibc < 2.34 and libpthread.so.0 not loaded)",
                &self.path,
                io::Error::from_raw_os_error(libc::ENOSYS),
            ));
        }
        r.major_version.store(MAJOR_VERSION, Ordering::Relaxed);
        r.minor_version.store(MINOR_VERSION, Ordering::Relaxed);
        for (slot, value) in r.limit.iter().zip(config.limits) {
            slot.store(value, Ordering::Relaxed);
        }
        for (slot, value) in r.sm_limit.iter().zip(config.sm_limits) {
            slot.store(value, Ordering::Relaxed);
        }
        for sem in [&r.sem, &r.sem_postinit] {
            // SAFETY: the pointer is to 32 bytes inside our mapping, 8-aligned (layout assertions); nobody uses
            // the semaphore before the magic is stored (we hold the whole-file lock HAMi-core also takes), and
            // glibc's sem_t is 32 bytes on the targets we build for.
            let rc = unsafe { libc::sem_init(sem.0.get().cast::<libc::sem_t>(), 1, 1) };
            if rc != 0 {
                return Err(RegionError::io(
                    "sem_init",
                    &self.path,
                    io::Error::last_os_error(),
                ));
            }
        }
        r.owner_pid.store(0, Ordering::Relaxed);
        r.sm_init_flag.store(0, Ordering::Relaxed);
        r.utilization_switch
            .store(INITIAL_UTILIZATION_SWITCH, Ordering::Relaxed);
        r.recent_kernel
            .store(RECENT_KERNEL_ACTIVE, Ordering::Relaxed);
        r.proc_num.store(0, Ordering::Relaxed);
        r.priority.store(config.priority, Ordering::Relaxed);
        r.initialized_flag
            .store(MULTIPROCESS_SHARED_REGION_MAGIC_FLAG, Ordering::Release);
        Ok(OpenReport {
            initialized_here: true,
            limit_mismatch: None,
            memory_limits_tightened: Vec::new(),
            sm_limits_tightened: Vec::new(),
        })
    }

    fn shared(&self) -> &SharedRegion {
        debug_assert_eq!(self.map.len(), REGION_SIZE);
        // SAFETY: the mapping is REGION_SIZE bytes (= size_of::<SharedRegion>()), page-aligned (≥ its 8-byte
        // alignment) and lives as long as `self`. Every field of `SharedRegion` is an atomic or an `UnsafeCell`,
        // so shared references stay sound while other processes write the file.
        unsafe { &*self.map.as_ptr().cast::<SharedRegion>() }
    }

    /// The file this region maps.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What opening found (created here? limits disagreeing with the caller's?).
    pub fn open_report(&self) -> &OpenReport {
        &self.report
    }

    /// The raw mapped layout, for callers that need a field this API does not wrap. All fields are atomics.
    pub fn layout(&self) -> &SharedRegion {
        self.shared()
    }

    /// Memory limit of `device` in bytes (0 = unlimited).
    pub fn limit(&self, device: usize) -> Result<u64> {
        Ok(self.shared().limit[check_device(device)?].load(Ordering::Relaxed))
    }

    /// Lowers the memory limit of `device` in the file to `bytes` if the file has none (0) or a larger one;
    /// never raises it. `bytes == 0` (no limit) changes nothing. Returns whether the file changed.
    pub fn tighten_limit(&self, device: usize, bytes: u64) -> Result<bool> {
        Ok(tighten(&self.shared().limit[check_device(device)?], bytes))
    }

    /// How often this process found its own slot tampered with (usage words lowered, status cleared, slot
    /// freed or taken) and repaired it.
    pub fn repairs(&self) -> u64 {
        self.repairs.load(Ordering::Relaxed)
    }

    /// SM limit of `device` in percent.
    pub fn sm_limit(&self, device: usize) -> Result<u64> {
        Ok(self.shared().sm_limit[check_device(device)?].load(Ordering::Relaxed))
    }

    /// Task priority stored in the region.
    pub fn priority(&self) -> i32 {
        self.shared().priority.load(Ordering::Relaxed)
    }

    /// `utilization_switch` (1 = throttle, 0 = run free), as the monitor last set it.
    pub fn utilization_switch(&self) -> i32 {
        self.shared().utilization_switch.load(Ordering::Relaxed)
    }

    /// `recent_kernel` (> 0 recently active, −1 blocked by a higher-priority task).
    pub fn recent_kernel(&self) -> i32 {
        self.shared().recent_kernel.load(Ordering::Relaxed)
    }

    /// `proc_num`, clamped to the slot count.
    pub fn proc_num(&self) -> usize {
        clamp_proc_num(self.shared().proc_num.load(Ordering::Acquire))
    }

    /// Writes `device_num` and the UUIDs (NUL-padded, truncated to 95 bytes). Ordered with other writers by the
    /// region lock when it can be had within a few milliseconds; otherwise written anyway (every process of
    /// a container writes the same values, and a stopped lock holder must not delay anybody).
    pub fn set_device_info(&self, uuids: &[&str]) -> Result<()> {
        if uuids.len() > CUDA_DEVICE_MAX_COUNT {
            return Err(RegionError::TooManyDevices { count: uuids.len() });
        }
        let _lock = self.lock(DEVICE_INFO_LOCK_WAIT).ok();
        let r = self.shared();
        for (dev, cell) in r.uuids.iter().enumerate() {
            let bytes = uuids.get(dev).map_or(&[][..], |u| u.as_bytes());
            for (i, b) in cell.iter().enumerate() {
                let v = if i < UUID_LEN - 1 {
                    bytes.get(i).copied().unwrap_or(0)
                } else {
                    0
                };
                b.store(v, Ordering::Relaxed);
            }
        }
        r.device_num.store(uuids.len() as u64, Ordering::Release);
        Ok(())
    }

    /// Takes the cross-process region lock (see [`crate::lock`]), waiting at most `timeout` for a live holder.
    pub fn lock(&self, timeout: Duration) -> Result<RegionLock<'_>> {
        let me = lock::own_owner_word();
        match lock::acquire(&self.shared().owner_pid, me, timeout) {
            Ok(acquired) => Ok(RegionLock {
                region: self,
                me,
                acquired,
            }),
            Err(owner_pid) => Err(RegionError::LockTimeout {
                path: self.path.clone(),
                owner_pid,
                waited: timeout,
            }),
        }
    }

    /// Takes a slot for the calling process (PID `getpid()`, its start time in `unused[1]`, host PID 0,
    /// status running), lock-free, after reaping dead processes' slots. Idempotent for this handle. A slot
    /// already carrying our PID (left by an earlier process that had the same PID, HAMi-core's crash-loop
    /// case) is taken over and zeroed; otherwise the lowest free slot below `proc_num`, else the first free
    /// one above, and `proc_num` grows to cover it.
    ///
    /// A slot is taken by one CAS of its `pid` from 0 to ours, so two registrants never share one, and no lock
    /// is needed: a process that holds the region lock and stopped (SIGSTOP, a debugger) delays nobody.
    ///
    /// One handle per process should register: two handles registering in one process share (and zero) the
    /// slot. After `fork`, the child must call [`Region::forget_slot_after_fork`] and register again.
    pub fn register_current_process(&self) -> Result<usize> {
        let pid = std::process::id() as i32;
        let cached = self.slot.load(Ordering::Acquire);
        if cached != NO_SLOT && self.slot_pid.load(Ordering::Relaxed) == pid {
            return Ok(cached);
        }
        while self
            .registering
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            std::thread::yield_now();
        }
        let result = self.register_exclusive(pid);
        self.registering.store(false, Ordering::Release);
        result
    }

    fn register_exclusive(&self, pid: i32) -> Result<usize> {
        // Another thread of this process may have registered while we waited.
        let cached = self.slot.load(Ordering::Acquire);
        if cached != NO_SLOT && self.slot_pid.load(Ordering::Relaxed) == pid {
            return Ok(cached);
        }
        let start = lock::start_time(pid).unwrap_or(0);
        let r = self.shared();
        self.reap_pass();
        // A few rounds: a round fails only when every slot is taken (then reaping may free one) or when a
        // reaper misjudged our fresh slot (see `free_if_dead`).
        for _ in 0..4 {
            let Some(index) = self.claim_slot(pid) else {
                if self.reap_pass() == 0 {
                    break;
                }
                continue;
            };
            let slot = &r.procs[index];
            // The start time first: a reaper checking our PID now sees it alive with a matching start time.
            slot.unused[SLOT_START_TIME_WORD].store(start, Ordering::SeqCst);
            zero_slot_counters(slot);
            slot.hostpid.store(0, Ordering::Relaxed);
            // SeqCst (not just Release): [`Region::try_add_usage`]'s proof needs a checker that comes after
            // this slot's first charge in the SeqCst order to see the slot.
            slot.status.store(SLOT_STATUS_RUNNING, Ordering::SeqCst);
            r.proc_num.fetch_max(index as i32 + 1, Ordering::SeqCst);
            if slot.pid.load(Ordering::SeqCst) != pid {
                continue; // freed under us by a reaper that read a stale start time: take another
            }
            // What this process already holds (0 for a first registration or a fork child, which
            // forgets its counts): a slot taken again — after it was freed or taken under us, or
            // forgotten in this process's memory — shows the process's charges to the others.
            self.restore_own_counts(slot);
            // The fresh slot holds no grant (zeroed): neither does the process.
            for lease in &self.leases {
                lease.grant.store(0, Ordering::SeqCst);
            }
            self.slot_pid.store(pid, Ordering::Relaxed);
            self.slot.store(index, Ordering::Release);
            return Ok(index);
        }
        Err(RegionError::SlotsFull {
            path: self.path.clone(),
            pid,
        })
    }

    /// Takes a slot for `pid` by CAS on its `pid` word: one already carrying `pid`, else a free one.
    fn claim_slot(&self, pid: i32) -> Option<usize> {
        let r = self.shared();
        let proc_num = clamp_proc_num(r.proc_num.load(Ordering::Acquire));
        if let Some(i) = r.procs[..proc_num]
            .iter()
            .position(|s| s.pid.load(Ordering::Acquire) == pid)
        {
            return Some(i);
        }
        // Below proc_num first (holes), then above it; a slot above proc_num holding a dead process's
        // reservation mark (a shrinker killed mid-way) is taken too.
        (0..SHARED_REGION_MAX_PROCESS_NUM).find(|&i| {
            let slot = &r.procs[i];
            let current = slot.pid.load(Ordering::Acquire);
            let takeable = current == 0
                || (i >= proc_num
                    && current < 0
                    && lock::process_is_dead(current.saturating_neg()));
            takeable
                && slot
                    .pid
                    .compare_exchange(current, pid, Ordering::SeqCst, Ordering::Relaxed)
                    .is_ok()
        })
    }

    /// Index of this process's slot, if registered through this handle.
    pub fn slot_index(&self) -> Option<usize> {
        let slot = self.slot.load(Ordering::Acquire);
        (slot != NO_SLOT).then_some(slot)
    }

    /// Forgets the slot and this process's own counts without touching the region: for a `pthread_atfork`
    /// child handler (atomics only). The child owns none of the parent's charges.
    pub fn forget_slot_after_fork(&self) {
        self.slot.store(NO_SLOT, Ordering::Release);
        self.slot_pid.store(0, Ordering::Relaxed);
        self.registering.store(false, Ordering::Release);
        for c in self.own_total.iter().chain(&self.own_context) {
            c.store(0, Ordering::Relaxed);
        }
        for lease in &self.leases {
            lease.grant.store(0, Ordering::Relaxed);
        }
        self.granting.store(false, Ordering::Relaxed);
    }

    /// Releases this process's slot (exit path): claimed for freeing by CAS (so a concurrent reaper cannot
    /// free it twice), status 0, counters zeroed, then pid 0. Lock-free, so it can run from an `atexit`
    /// handler even while another process holds the lock; `proc_num` shrinks at a later reap.
    ///
    /// Only the process that took the slot frees it, and only it forgets it: a child that shares this
    /// handle without having run the atfork reset — a `vfork()` child calling `exit()` (its atexit
    /// handlers run in the parent's memory), a raw `clone` — leaves both the parent's slot and the
    /// parent's memory alone (before: the parent's charges vanished from the region for good).
    pub fn unregister(&self) {
        if self.slot_pid.load(Ordering::Relaxed) != std::process::id() as i32 {
            return;
        }
        let index = self.slot.swap(NO_SLOT, Ordering::AcqRel);
        let pid = self.slot_pid.swap(0, Ordering::Relaxed);
        if index == NO_SLOT {
            return;
        }
        let slot = &self.shared().procs[index];
        if slot
            .pid
            .compare_exchange(
                pid,
                pid.saturating_neg(),
                Ordering::SeqCst,
                Ordering::Relaxed,
            )
            .is_ok()
        {
            free_claimed_slot(slot);
        }
    }

    /// Frees the slots of dead processes — `kill(pid, 0)` = `ESRCH`, a zombie, or a live PID whose start
    /// time is not the one recorded in the slot (the PID was reused) — lock-free, then shrinks `proc_num` over
    /// trailing free slots if the region lock is free at this moment (never waits for it). Live slots never
    /// move. Returns how many were freed.
    pub fn reap_dead_slots(&self) -> Result<usize> {
        let freed = self.reap_pass();
        if let Ok(guard) = self.lock(Duration::ZERO) {
            guard.shrink_proc_num();
        }
        Ok(freed)
    }

    fn reap_pass(&self) -> usize {
        let r = self.shared();
        let own = std::process::id() as i32;
        let proc_num = clamp_proc_num(r.proc_num.load(Ordering::Acquire));
        r.procs[..proc_num]
            .iter()
            .filter(|slot| free_if_dead(slot, own))
            .count()
    }

    /// This process's slot, checked: if somebody freed or took it, it is repaired (see
    /// [`Region::repair_own_slot`]); a slot marked exited or hidden above `proc_num` is found by the
    /// admission sum, which skips it ([`Region::device_usage_seqcst`]). One load and compare on the fast
    /// path.
    #[inline]
    fn own_slot(&self) -> Result<(usize, &ProcSlot)> {
        let index = self.slot.load(Ordering::Acquire);
        if index == NO_SLOT {
            return Err(self.not_registered());
        }
        let slot = &self.shared().procs[index];
        if slot.pid.load(Ordering::Relaxed) != self.slot_pid.load(Ordering::Relaxed) {
            return self.repair_own_slot(index);
        }
        Ok((index, slot))
    }

    /// The error of a charge or credit made without a slot (out of line: it clones the path).
    #[cold]
    #[inline(never)]
    fn not_registered(&self) -> RegionError {
        RegionError::NotRegistered {
            path: self.path.clone(),
        }
    }

    /// The own slot was freed or taken by somebody else: take a new slot and put the own counts there, so
    /// the other processes see this process's charges again. (Called with the PID intact, it only marks
    /// the slot running.)
    #[cold]
    fn repair_own_slot(&self, index: usize) -> Result<(usize, &ProcSlot)> {
        self.repairs.fetch_add(1, Ordering::Relaxed);
        let pid = self.slot_pid.load(Ordering::Relaxed);
        let r = self.shared();
        let slot = &r.procs[index];
        let moved = slot.pid.load(Ordering::SeqCst) != pid;
        let index = if moved {
            self.slot.store(NO_SLOT, Ordering::Release);
            self.slot_pid.store(0, Ordering::Relaxed);
            self.register_current_process()?
        } else {
            // Still ours, only hidden: its words are what they were (a lowered word is handled by the
            // own count in admission).
            slot.status.store(SLOT_STATUS_RUNNING, Ordering::SeqCst);
            r.proc_num.fetch_max(index as i32 + 1, Ordering::SeqCst);
            index
        };
        // A fresh slot holds this process's charges again (`register_exclusive`). (Charges of other
        // threads in flight on the old slot are lost to the others' view, not to this process's own,
        // which counts `own_total`.)
        Ok((index, &r.procs[index]))
    }

    /// Puts this process's own counts into `slot`, freshly taken and zeroed, so the other processes see
    /// what it holds.
    fn restore_own_counts(&self, slot: &ProcSlot) {
        for (d, mem) in slot.used.iter().enumerate() {
            let total = self.own_total[d].load(Ordering::Relaxed);
            let context = self.own_context[d].load(Ordering::Relaxed).min(total);
            saturating_add(&mem.total, total, Ordering::SeqCst);
            saturating_add(&mem.context_size, context, Ordering::Relaxed);
            saturating_add(&mem.data_size, total - context, Ordering::Relaxed);
        }
    }

    /// Adds `bytes` of `kind` on `device` (NVML index) to this process's slot, saturating (never wraps).
    /// Lock-free. Unconditional: admission control is [`Region::try_add_usage`].
    pub fn add_usage(&self, device: usize, kind: MemoryKind, bytes: u64) -> Result<()> {
        let device = check_device(device)?;
        let (_, slot) = self.own_slot()?;
        let mem = &slot.used[device];
        slot.seqlock.fetch_add(1, Ordering::AcqRel);
        saturating_add(kind_counter(mem, kind), bytes, Ordering::Relaxed);
        saturating_add(&mem.total, bytes, Ordering::SeqCst);
        self.own_add(device, kind, bytes);
        slot.seqlock.fetch_add(1, Ordering::Release);
        Ok(())
    }

    /// Removes `bytes` of `kind` on `device` from this process's slot, saturating at 0 (HAMi-core's
    /// unsigned underflow shows up as 17 TB in use, HAMi-core#200; here only a tampered counter can be
    /// smaller than what is removed). Lock-free.
    #[inline]
    pub fn remove_usage(&self, device: usize, kind: MemoryKind, bytes: u64) -> Result<()> {
        let device = check_device(device)?;
        let (_, slot) = self.own_slot()?;
        let mem = &slot.used[device];
        slot.seqlock.fetch_add(1, Ordering::AcqRel);
        // The own count first, so it never exceeds the slot's total (a lower slot total means tampering).
        own_sub(&self.own_total[device], bytes);
        if kind == MemoryKind::Context {
            own_sub(&self.own_context[device], bytes);
        }
        saturating_sub(kind_counter(mem, kind), bytes, Ordering::Relaxed);
        // SeqCst: ordered with the checks of [`Region::try_add_usage`].
        saturating_sub(&mem.total, bytes, Ordering::SeqCst);
        slot.seqlock.fetch_add(1, Ordering::Release);
        Ok(())
    }

    /// Adds to the own count: process memory nobody else writes, holding only admitted charges (at
    /// most the limit), so a plain `fetch_add` cannot wrap.
    #[inline]
    fn own_add(&self, device: usize, kind: MemoryKind, bytes: u64) {
        self.own_total[device].fetch_add(bytes, Ordering::Relaxed);
        if kind == MemoryKind::Context {
            self.own_context[device].fetch_add(bytes, Ordering::Relaxed);
        }
    }

    /// Admission control: charges `bytes` of `kind` on `device` to this process's slot **only if** the
    /// container's usage of `device` stays within `limit` afterwards. Returns `Ok(Ok(usage_after))` when
    /// charged, `Ok(Err(usage_seen))` when refused — and then every usage counter is exactly as it was.
    /// Lock-free; no reaping (callers reap and retry, as HAMi-core's `oom_check`).
    ///
    /// # Arithmetic
    ///
    /// A request larger than `limit` is refused before anything is written. The charge is a CAS that fails
    /// rather than wrap (a `fetch_add` of `u64::MAX` would leave `total − 1` for every reader to see, and
    /// the old saturating rollback then cleared the slot: three rounds of `cuMemAlloc(SIZE_MAX)` turned a
    /// 1 GiB cap into 2.7 GiB). The rollback subtracts exactly what was added: only this process adds to
    /// its slot, and its own frees never take more than it holds, so the subtraction cannot underflow unless
    /// somebody else wrote the word (then it saturates at 0, and the own count below restores the truth).
    ///
    /// # Why two processes can never together exceed `limit`
    ///
    /// Charge optimistically, then check: add to the own slot's `total`, then sum all slots' `total`s, and if
    /// the sum exceeds `limit` undo the add and refuse. All these operations are `SeqCst`, so they lie in one
    /// total order S consistent with each thread's program order. Suppose at some moment the admitted, not
    /// yet released charges c₁…cₙ sum to more than `limit`. Let cₖ be the one whose add comes last in S.
    /// Every other cᵢ's add precedes cₖ's add, which precedes cₖ's check (program order); and no cᵢ has been
    /// released (subtracted) before that moment, which is after cₖ's check. So cₖ's check read every cᵢ's
    /// contribution (SeqCst loads see the latest value in S of each counter; a slot's counter can only have
    /// *more* than its admitted charges, from in-flight charges not yet rolled back) and saw a sum greater
    /// than `limit` — it would have refused. Contradiction. The price is conservative: an in-flight charge
    /// that will be rolled back can make a concurrent one be refused too (both then see the other); never the
    /// reverse. Reaping a dead slot only lowers sums. Frees that race with a check make it see *more* than is
    /// held, again only conservative.
    ///
    /// Against tampering the check counts this process's own slot as the larger of what the file says and
    /// what the process knows it holds (`own_total` plus this charge): a tenant zeroing the usage words
    /// gains nothing in the processes that hold the memory. (The others then see the lowered word and may
    /// admit more; only the node sees and undoes that.)
    ///
    /// HAMi-core processes writing the same file do not follow this protocol (they check, then add under
    /// their lock); a mixed container is as exact as HAMi-core alone.
    #[inline(always)]
    pub fn try_add_usage(
        &self,
        device: usize,
        kind: MemoryKind,
        bytes: u64,
        limit: u64,
    ) -> Result<std::result::Result<u64, u64>> {
        let device = check_device(device)?;
        if bytes > limit {
            return Ok(Err(self.device_usage(device)?));
        }
        let (index, slot) = self.own_slot()?;
        let mem = &slot.used[device];
        slot.seqlock.fetch_add(1, Ordering::AcqRel);
        let result = if mem
            .total
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| v.checked_add(bytes))
            .is_err()
        {
            // Only a tampered word can be this close to 2^64 (a real one is at most the limit).
            Err(u64::MAX)
        } else {
            // What this process may hold: its charges with this one, or its grant if larger.
            let own_floor = self.own_total[device]
                .load(Ordering::SeqCst)
                .saturating_add(bytes)
                .max(self.leases[device].grant.load(Ordering::SeqCst));
            let usage = self.device_usage_seqcst(device, index, own_floor);
            if usage <= limit {
                saturating_add(kind_counter(mem, kind), bytes, Ordering::Relaxed);
                self.own_add(device, kind, bytes);
                Ok(usage)
            } else {
                saturating_sub(&mem.total, bytes, Ordering::SeqCst);
                Err(usage.saturating_sub(bytes))
            }
        };
        slot.seqlock.fetch_add(1, Ordering::Release);
        Ok(result)
    }

    /// Admission, whole: charges `bytes` of `kind` on `device` if the container stays within `limit`.
    /// Application data within this process's grant takes the fast path ([`Region::try_add_leased`]);
    /// everything else [`Region::charge_checked`]. `Ok(Err(usage))` = refused, nothing changed.
    #[inline(always)]
    pub fn charge(
        &self,
        device: usize,
        kind: MemoryKind,
        bytes: u64,
        limit: u64,
    ) -> Result<std::result::Result<(), u64>> {
        if kind == MemoryKind::Data && self.try_add_leased(device, bytes) {
            return Ok(Ok(()));
        }
        self.charge_checked(device, kind, bytes, limit)
    }

    /// [`Region::charge`] beyond the grant: the full check ([`Region::try_add_usage`]); once admitted,
    /// a grant for the next charges ([`Region::try_raise_grant`]); on a would-be refusal, the unused
    /// grants are taken back ([`Region::revoke_grants`]) and the dead processes' slots reaped
    /// (HAMi-core's `oom_check`), then one more try. A request larger than `limit` is refused before
    /// anything is written.
    #[cold]
    #[inline(never)]
    pub fn charge_checked(
        &self,
        device: usize,
        kind: MemoryKind,
        bytes: u64,
        limit: u64,
    ) -> Result<std::result::Result<(), u64>> {
        let first = self.try_add_usage(device, kind, bytes, limit)?;
        if let Ok(usage) = first {
            self.try_raise_grant(device, usage, limit);
            return Ok(Ok(()));
        }
        if bytes > limit {
            return Ok(Err(self.device_usage(device)?));
        }
        let revoked = self.revoke_grants(device)? > 0;
        let reaped = self.reap_dead_slots()? > 0;
        if !(revoked || reaped) {
            return Ok(first.map(drop));
        }
        Ok(self.try_add_usage(device, kind, bytes, limit)?.map(drop))
    }

    /// Gives back `bytes` of `kind` on `device`: [`Region::remove_leased`] for application data while
    /// the process holds a grant, else [`Region::remove_usage`].
    #[inline(always)]
    pub fn credit(&self, device: usize, kind: MemoryKind, bytes: u64) -> Result<()> {
        if kind == MemoryKind::Data && self.remove_leased(device, bytes) {
            return Ok(());
        }
        self.remove_usage(device, kind, bytes)
    }

    /// The fast path of [`Region::try_add_usage`] for application data: charges `bytes` on `device` without
    /// summing the container when this process holds a **grant** there that covers them — admitted earlier
    /// under this same `limit` by [`Region::try_raise_grant`], and still in the slot's grant word. `false`
    /// (nothing changed) sends the caller to [`Region::try_add_usage`].
    ///
    /// # Why the cap still holds
    ///
    /// A grant is a reservation every admission check counts: a slot contributes the larger of its grant
    /// and its `total` ([`Region::try_add_usage`] sums contributions, grant first, then total). A grant is
    /// taken like a charge — raise the own contribution, then sum all, and take it back if the sum exceeds
    /// the limit — so the proof of [`Region::try_add_usage`] holds with "contribution" for "total": no two
    /// processes' contributions together exceed the limit. Within its grant a process charges by its own
    /// count (`own_total + bytes <= own_grant`, process memory nobody else writes), so what it holds never
    /// exceeds its contribution while the grant stands.
    ///
    /// A grant is taken away by another process's admission ([`Region::revoke_grants`], on a would-be
    /// refusal) or by tampering. The charge here therefore adds to `total` first and only then checks that
    /// the grant word still holds this process's grant (all `SeqCst`). A revoker writes the word and then
    /// reads `total`; a checker reads the word and then `total`. If the check here read the grant, it came
    /// before the revocation in the total order, so the add came before it too, and whoever read the
    /// revoked word reads a `total` that includes the charge; if the check read anything else, the charge
    /// is undone and refused here (the caller takes the slow path). The own count is added first and
    /// checked against the grant by its result, so two threads cannot both squeeze under it.
    ///
    /// Against tampering: the grant word is only trusted to *equal* the process's own grant (raising it
    /// gains nothing; lowering it — or freeing, reaping or re-taking the slot, which zero it — sends every
    /// later charge to the slow path, which repairs the slot). A tenant lowering it lets *other* processes
    /// admit more, like lowering `total` does; only the node can see and undo that.
    #[inline(always)]
    pub fn try_add_leased(&self, device: usize, bytes: u64) -> bool {
        let (Some(lease), Some(own), Some(file_limit)) = (
            self.leases.get(device),
            self.own_total.get(device),
            self.shared().limit.get(device),
        ) else {
            return false;
        };
        let grant = lease.grant.load(Ordering::SeqCst);
        // A grant is valid under the file's limit word it was taken with (the environment's cap never
        // changes): the node lowering the word voids it.
        if bytes > grant
            || file_limit.load(Ordering::Relaxed) != lease.file_limit.load(Ordering::Relaxed)
        {
            return false;
        }
        // SAFETY: set (to the own slot, in the mapping that lives as long as `self`) before `grant`
        // became non-zero, and never cleared.
        let Some(slot) = (unsafe { lease.slot.load(Ordering::Acquire).as_ref() }) else {
            return false;
        };
        // The slot as the others see it: still ours, running, below `proc_num` (a tenant hiding it
        // sends the charge to the full check, which makes it visible again).
        if slot.pid.load(Ordering::Relaxed) != self.slot_pid.load(Ordering::Relaxed)
            || slot.status.load(Ordering::Relaxed) == SLOT_STATUS_EXITED
            || self.shared().proc_num.load(Ordering::Relaxed) <= lease.index.load(Ordering::Relaxed)
        {
            return false;
        }
        let mem = &slot.used[device];
        // `bytes <= grant` (checked above), so `grant - bytes` cannot wrap; `old + bytes` could under
        // a cap near 2^64.
        if own.fetch_add(bytes, Ordering::SeqCst) > grant - bytes {
            own.fetch_sub(bytes, Ordering::SeqCst);
            return false;
        }
        // Never wraps, even a word a tenant set near 2^64 (then: the full check, which refuses).
        if mem
            .total
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| v.checked_add(bytes))
            .is_err()
        {
            own.fetch_sub(bytes, Ordering::SeqCst);
            return false;
        }
        // The word, then the own grant again: a raise by another thread of this process zeroes the
        // own grant before it writes a provisional word (which may equal the old grant) and sets it
        // only once a sum admitted it.
        if mem.unused[DEVICE_GRANT_WORD].load(Ordering::SeqCst) != grant
            || lease.grant.load(Ordering::SeqCst) != grant
        {
            saturating_sub(&mem.total, bytes, Ordering::SeqCst);
            own.fetch_sub(bytes, Ordering::SeqCst);
            return false;
        }
        saturating_add(&mem.data_size, bytes, Ordering::Relaxed);
        true
    }

    /// The credit matching [`Region::try_add_leased`]: gives `bytes` of application data back on `device`
    /// while this process holds a grant there (the grant stays: the next charges need no sum). `false`
    /// (nothing changed) sends the caller to [`Region::remove_usage`]. A grant that has grown far beyond
    /// what the process holds (more than twice [`grant_slack`] above it) is cut back to
    /// `own_total + grant_slack`.
    #[inline(always)]
    pub fn remove_leased(&self, device: usize, bytes: u64) -> bool {
        let (Some(lease), Some(own)) = (self.leases.get(device), self.own_total.get(device)) else {
            return false;
        };
        let grant = lease.grant.load(Ordering::SeqCst);
        // SAFETY: as in `try_add_leased`.
        let Some(slot) = (unsafe { lease.slot.load(Ordering::Acquire).as_ref() }) else {
            return false;
        };
        let mem = &slot.used[device];
        if grant == 0 || mem.unused[DEVICE_GRANT_WORD].load(Ordering::SeqCst) != grant {
            return false;
        }
        let before = own.fetch_sub(bytes, Ordering::SeqCst);
        if before < bytes {
            own.store(0, Ordering::SeqCst); // a caller's bug; never a wrapped count
        }
        saturating_sub(&mem.data_size, bytes, Ordering::Relaxed);
        saturating_sub(&mem.total, bytes, Ordering::SeqCst);
        if before.wrapping_sub(bytes) < lease.trim_below.load(Ordering::Relaxed) {
            self.trim_grant(device);
        }
        true
    }

    /// After a charge admitted by [`Region::try_add_usage`] (with `usage` the container's usage it saw,
    /// this charge included), reserves [`grant_slack`] more than this process holds on `device` as its
    /// grant, if the container has that much room under `limit` (and under the file's limit word as it
    /// is now, if lower: the grant stays valid while that word does); otherwise, or when the word
    /// changed, holds no grant. The same optimistic protocol as a charge: the word is raised, then the
    /// container summed, and the grant dropped again if the sum exceeds the limit. One thread of the
    /// process at a time; another one arriving meanwhile does without.
    pub fn try_raise_grant(&self, device: usize, usage: u64, limit: u64) {
        let Ok(device) = check_device(device) else {
            return;
        };
        let slack = grant_slack(limit);
        let lease = &self.leases[device];
        let file_limit = self.shared().limit[device].load(Ordering::SeqCst);
        let under = if file_limit == 0 {
            limit
        } else {
            limit.min(file_limit)
        };
        let room = under.saturating_sub(usage) >= slack;
        let held_valid = lease.grant.load(Ordering::SeqCst) != 0
            && lease.file_limit.load(Ordering::Relaxed) == file_limit;
        if slack == 0 || (!room && held_valid) {
            return; // no room for more: keep what is held (possibly nothing)
        }
        if self
            .granting
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            return;
        }
        if let Ok((index, slot)) = self.own_slot() {
            let mem = &slot.used[device];
            let word = &mem.unused[DEVICE_GRANT_WORD];
            // Void the old grant first (word, then own: a charge that read the old own value then
            // finds the word changed and takes the full check).
            word.store(0, Ordering::SeqCst);
            lease.grant.store(0, Ordering::SeqCst);
            if room {
                let want = self.own_total[device]
                    .load(Ordering::SeqCst)
                    .saturating_add(slack);
                word.store(want, Ordering::SeqCst);
                if self.device_usage_seqcst(device, index, want) <= under {
                    lease
                        .slot
                        .store(std::ptr::from_ref(slot).cast_mut(), Ordering::Relaxed);
                    lease.index.store(index as i32, Ordering::Relaxed);
                    lease.file_limit.store(file_limit, Ordering::Relaxed);
                    lease.slack.store(slack, Ordering::Relaxed);
                    lease
                        .trim_below
                        .store(want.saturating_sub(2 * slack), Ordering::Relaxed);
                    lease.grant.store(want, Ordering::SeqCst);
                } else {
                    word.store(0, Ordering::SeqCst);
                }
            }
        }
        self.granting.store(false, Ordering::Release);
    }

    /// Cuts this process's grant on `device` back to what it holds plus the slack it was taken with
    /// (lowering a grant is always safe: the others see at least what it holds in `total`).
    #[cold]
    #[inline(never)]
    fn trim_grant(&self, device: usize) {
        if self
            .granting
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            return;
        }
        let lease = &self.leases[device];
        if let Ok((_, slot)) = self.own_slot() {
            let word = &slot.used[device].unused[DEVICE_GRANT_WORD];
            let slack = lease.slack.load(Ordering::Relaxed);
            let want = self.own_total[device]
                .load(Ordering::SeqCst)
                .saturating_add(slack);
            let held = lease.grant.load(Ordering::SeqCst);
            // A CAS from the grant held, never a store: another process may have revoked it (the
            // word is 0 and it counts only our `total`); writing the trimmed value then would
            // reinstate a grant nobody's sum admitted.
            if want < held
                && word
                    .compare_exchange(held, want, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
            {
                lease
                    .trim_below
                    .store(want.saturating_sub(2 * slack), Ordering::Relaxed);
                lease.grant.store(want, Ordering::SeqCst);
            }
        }
        self.granting.store(false, Ordering::Release);
    }

    /// Takes away the grants on `device` that exceed what their processes hold (their `total`), this
    /// process's own included: called before refusing an allocation, so reservations nobody uses never
    /// refuse one. A process whose grant is taken charges through the full check from then on (until it
    /// takes a grant again). Returns how many grants were taken.
    pub fn revoke_grants(&self, device: usize) -> Result<usize> {
        let device = check_device(device)?;
        let r = self.shared();
        let own = self.slot.load(Ordering::Acquire);
        let proc_num = clamp_proc_num(r.proc_num.load(Ordering::SeqCst));
        // The own grant counts as taken even when somebody else already zeroed its word: this
        // process's own checks count it until here.
        let mut taken = usize::from(self.leases[device].grant.swap(0, Ordering::SeqCst) != 0);
        for (i, slot) in r.procs[..proc_num].iter().enumerate() {
            let mem = &slot.used[device];
            let word = &mem.unused[DEVICE_GRANT_WORD];
            let grant = word.load(Ordering::SeqCst);
            if grant != 0
                && (i == own || grant > mem.total.load(Ordering::SeqCst))
                && word
                    .compare_exchange(grant, 0, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
            {
                taken += 1;
            }
        }
        Ok(taken)
    }

    /// This process's grant on `device` (0 = none).
    pub fn grant(&self, device: usize) -> Result<u64> {
        Ok(self.leases[check_device(device)?]
            .grant
            .load(Ordering::SeqCst))
    }

    /// Counts one allocation refused to this process (the slot's [`crate::layout::SLOT_REFUSED_WORD`]
    /// word). Lock-free.
    pub fn add_refused(&self) -> Result<()> {
        let (_, slot) = self.own_slot()?;
        saturating_add(
            &slot.unused[crate::layout::SLOT_REFUSED_WORD],
            1,
            Ordering::Relaxed,
        );
        Ok(())
    }

    /// Allocations refused to this process so far.
    pub fn refused(&self) -> Result<u64> {
        Ok(self.own_slot()?.1.unused[crate::layout::SLOT_REFUSED_WORD].load(Ordering::Relaxed))
    }

    /// The container's usage of `device` for admission: every live slot's `total` (`SeqCst`), this
    /// process's own slot (`own`) counted as at least `own_floor` (what it knows it holds plus this
    /// charge). The floor is not written back to the file: the own count and the slot word are two
    /// atomics, and a free in another thread between reading one and the other would make a write-back
    /// inflate the word for good; counting the larger is only conservative for this one check, like a
    /// racing free. If the own slot is hidden above `proc_num` (somebody lowered it), `proc_num` is
    /// raised again so the others see it.
    #[inline(always)]
    fn device_usage_seqcst(&self, device: usize, own: usize, own_floor: u64) -> u64 {
        let r = self.shared();
        let proc_num = clamp_proc_num(r.proc_num.load(Ordering::SeqCst));
        let procs = &r.procs[..proc_num];
        // A live slot's contribution, the larger of its grant and its total; every slot in index
        // order, status, grant, then total, as one loop would read them (the grant before the total:
        // see `try_add_leased`). The own slot is taken out of the loops, so they compare no index.
        let live = |s: &ProcSlot| {
            (s.status.load(Ordering::SeqCst) != SLOT_STATUS_EXITED)
                .then(|| contribution(&s.used[device]))
        };
        let (before, from_own) = procs.split_at(own.min(proc_num));
        let mut sum = before
            .iter()
            .filter_map(live)
            .fold(0u64, u64::saturating_add);
        let mut own_seen = false;
        if let Some((mine, after)) = from_own.split_first() {
            if let Some(v) = live(mine) {
                own_seen = true;
                sum = sum.saturating_add(v.max(own_floor));
            }
            sum = after.iter().filter_map(live).fold(sum, u64::saturating_add);
        }
        if !own_seen {
            self.unhide_own_slot(own);
            sum = sum.saturating_add(own_floor);
        }
        sum
    }

    /// The own slot was skipped by the admission sum: marked exited, or above `proc_num`. Make it
    /// visible again (its words are as they were; a lowered word is covered by the own count).
    #[cold]
    fn unhide_own_slot(&self, own: usize) {
        self.repairs.fetch_add(1, Ordering::Relaxed);
        let r = self.shared();
        if r.procs[own].pid.load(Ordering::SeqCst) == self.slot_pid.load(Ordering::Relaxed) {
            r.procs[own]
                .status
                .store(SLOT_STATUS_RUNNING, Ordering::SeqCst);
        }
        r.proc_num.fetch_max(own as i32 + 1, Ordering::SeqCst);
    }

    /// This process's `used[device].total`.
    pub fn process_usage(&self, device: usize) -> Result<u64> {
        let device = check_device(device)?;
        Ok(self.own_slot()?.1.used[device]
            .total
            .load(Ordering::Relaxed))
    }

    /// Bytes in use on `device` by the whole container: the sum of `used[device].total` over slots
    /// `0..proc_num` whose status is not "exited". Lock-free; dead-but-unreaped slots still count (call
    /// [`Region::reap_dead_slots`] and ask again before refusing an allocation, as HAMi-core's `oom_check` does).
    pub fn device_usage(&self, device: usize) -> Result<u64> {
        let device = check_device(device)?;
        let r = self.shared();
        let proc_num = clamp_proc_num(r.proc_num.load(Ordering::Acquire));
        Ok(r.procs[..proc_num]
            .iter()
            .filter(|s| s.status.load(Ordering::Acquire) != SLOT_STATUS_EXITED)
            .fold(0u64, |sum, s| {
                sum.saturating_add(s.used[device].total.load(Ordering::Relaxed))
            }))
    }

    /// Records a kernel launch at `now_unix_secs` (HAMi-core's `pre_launch_kernel` + the `rate_limiter`
    /// priority gate, in the original order): if the monitor has blocked this container (`recent_kernel < 0`)
    /// returns [`LaunchGate::Blocked`] and changes nothing; otherwise sets `recent_kernel = 2` (a CAS, so a
    /// concurrent −1 from the monitor is not overwritten) and advances `last_kernel_time`. Lock-free; writes to
    /// shared memory only when a value changes.
    pub fn record_kernel_launch(&self, now_unix_secs: u64) -> LaunchGate {
        let r = self.shared();
        let mut current = r.recent_kernel.load(Ordering::Relaxed);
        loop {
            if current < 0 {
                return LaunchGate::Blocked;
            }
            if current == RECENT_KERNEL_ACTIVE {
                break;
            }
            match r.recent_kernel.compare_exchange_weak(
                current,
                RECENT_KERNEL_ACTIVE,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => break,
                Err(actual) => current = actual,
            }
        }
        if now_unix_secs > self.last_kernel_time.load(Ordering::Relaxed) {
            self.last_kernel_time
                .store(now_unix_secs, Ordering::Relaxed);
            r.last_kernel_time
                .fetch_max(now_unix_secs, Ordering::Relaxed);
        }
        LaunchGate::Proceed
    }

    /// `last_kernel_time` (unix seconds).
    pub fn last_kernel_time(&self) -> u64 {
        self.shared().last_kernel_time.load(Ordering::Relaxed)
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        if self.slot_pid.load(Ordering::Relaxed) == std::process::id() as i32 {
            self.unregister();
        }
    }
}

/// The region lock, held. Released on drop.
#[derive(Debug)]
pub struct RegionLock<'a> {
    region: &'a Region,
    me: u64,
    acquired: Acquired,
}

impl RegionLock<'_> {
    /// How the lock was obtained (free, or taken over from a dead holder).
    pub fn acquired(&self) -> Acquired {
        self.acquired
    }

    /// Lowers `proc_num` over trailing free slots. Each free slot is first reserved (CAS of its `pid` from 0 to
    /// our negated PID), so a lock-free registrant cannot take it meanwhile; `proc_num` is lowered by CAS from
    /// the value the scan started from, so a registrant that grew it meanwhile wins; then the reservations are
    /// released. A holder killed half-way leaves reservations that [`Region::register_current_process`] and
    /// the reapers recognise as a dead process's.
    fn shrink_proc_num(&self) {
        let r = self.region.shared();
        let mark = (std::process::id() as i32).saturating_neg();
        let proc_num = clamp_proc_num(r.proc_num.load(Ordering::SeqCst));
        let mut n = proc_num;
        while n > 0
            && r.procs[n - 1]
                .pid
                .compare_exchange(0, mark, Ordering::SeqCst, Ordering::Relaxed)
                .is_ok()
        {
            n -= 1;
        }
        if n != proc_num {
            let _ = r.proc_num.compare_exchange(
                proc_num as i32,
                n as i32,
                Ordering::SeqCst,
                Ordering::Relaxed,
            );
        }
        for slot in &r.procs[n..proc_num] {
            let _ = slot
                .pid
                .compare_exchange(mark, 0, Ordering::SeqCst, Ordering::Relaxed);
        }
    }
}

impl Drop for RegionLock<'_> {
    fn drop(&mut self) {
        lock::release(&self.region.shared().owner_pid, self.me);
    }
}

/// Checks the size of an existing region file: HAMi-core's `sizeof + 1`, or exactly `sizeof`.
fn check_region_file_size(path: &Path, size: u64) -> Result<()> {
    if size == v0::REGION_FILE_SIZE || size == v0::REGION_SIZE as u64 {
        return Err(RegionError::UnsupportedVersion {
            path: path.to_path_buf(),
            major: 0,
            minor: 0,
            supported: "1.2 (this file has the size of a v0 region, which is only read, never written)",
        });
    }
    if size < REGION_SIZE as u64 {
        return Err(RegionError::Truncated {
            path: path.to_path_buf(),
            size,
            expected: REGION_SIZE as u64,
        });
    }
    if size > REGION_FILE_SIZE {
        return Err(RegionError::Oversized {
            path: path.to_path_buf(),
            size,
            expected: REGION_FILE_SIZE,
        });
    }
    Ok(())
}

fn check_device(device: usize) -> Result<usize> {
    if device < CUDA_DEVICE_MAX_COUNT {
        Ok(device)
    } else {
        Err(RegionError::DeviceOutOfRange { device })
    }
}

fn clamp_proc_num(n: i32) -> usize {
    (n.max(0) as usize).min(SHARED_REGION_MAX_PROCESS_NUM)
}

fn load_all(values: &[AtomicU64; CUDA_DEVICE_MAX_COUNT]) -> [u64; CUDA_DEVICE_MAX_COUNT] {
    std::array::from_fn(|i| values[i].load(Ordering::Relaxed))
}

fn kind_counter(mem: &DeviceMemory, kind: MemoryKind) -> &AtomicU64 {
    match kind {
        MemoryKind::Context => &mem.context_size,
        MemoryKind::Module => &mem.module_size,
        MemoryKind::Data => &mem.data_size,
    }
}

/// Subtracts from an own count: every credit matches an earlier charge, so it cannot go below 0; if a
/// caller's bug made it, 0 (never a wrapped, huge count that would refuse everything).
#[inline]
fn own_sub(counter: &AtomicU64, bytes: u64) {
    if counter.fetch_sub(bytes, Ordering::Relaxed) < bytes {
        counter.store(0, Ordering::Relaxed);
    }
}

/// A process's grant on one device, in process memory (see [`Region::try_add_leased`]). Everything the
/// charges within it read, on one cache line.
#[repr(C, align(64))]
#[derive(Debug)]
struct Lease {
    /// The grant in bytes, valid only while the own slot's grant word holds the same value; 0 = none.
    grant: AtomicU64,
    /// The own slot (set before `grant` becomes non-zero), and its index (as `proc_num` counts).
    slot: AtomicPtr<ProcSlot>,
    index: AtomicI32,
    /// The file's limit word the grant was admitted under.
    file_limit: AtomicU64,
    /// A credit that leaves the own count below this cuts the grant back ([`Region::remove_leased`]).
    trim_below: AtomicU64,
    /// The slack the grant was taken with.
    slack: AtomicU64,
}

impl Lease {
    const fn none() -> Self {
        Self {
            grant: AtomicU64::new(0),
            slot: AtomicPtr::new(std::ptr::null_mut()),
            index: AtomicI32::new(i32::MAX),
            file_limit: AtomicU64::new(0),
            trim_below: AtomicU64::new(0),
            slack: AtomicU64::new(0),
        }
    }
}

/// The grant a process takes beyond what it holds on a device capped at `limit`: a sixteenth of the cap,
/// at most 1 GiB. Unused grants never refuse an allocation ([`Region::revoke_grants`]); the size only
/// decides how often a process needs the full check.
pub const fn grant_slack(limit: u64) -> u64 {
    let s = limit / 16;
    if s < 1 << 30 { s } else { 1 << 30 }
}

/// A slot's contribution to the container's usage of one device: the larger of its grant and its
/// `total`, the grant read first (see [`Region::try_add_leased`]).
#[inline(always)]
fn contribution(mem: &DeviceMemory) -> u64 {
    let grant = mem.unused[DEVICE_GRANT_WORD].load(Ordering::SeqCst);
    mem.total.load(Ordering::SeqCst).max(grant)
}

/// Adds without ever wrapping: a counter another process can also write may hold anything.
#[inline(always)]
fn saturating_add(counter: &AtomicU64, bytes: u64, order: Ordering) {
    let _ = counter.fetch_update(order, Ordering::Relaxed, |v| Some(v.saturating_add(bytes)));
}

#[inline(always)]
fn saturating_sub(counter: &AtomicU64, bytes: u64, order: Ordering) {
    let _ = counter.fetch_update(order, Ordering::Relaxed, |v| Some(v.saturating_sub(bytes)));
}

/// Lowers `limit` to `wanted` when the file has none (0) or a larger one; `wanted == 0` changes nothing.
fn tighten(limit: &AtomicU64, wanted: u64) -> bool {
    wanted != 0
        && limit
            .fetch_update(Ordering::SeqCst, Ordering::Relaxed, |cur| {
                (cur == 0 || cur > wanted).then_some(wanted)
            })
            .is_ok()
}

/// [`tighten`] for SM limits, where both 0 and 100 or more mean "uncapped" (HAMi-core).
fn tighten_sm(limit: &AtomicU64, wanted: u64) -> bool {
    limit
        .fetch_update(Ordering::SeqCst, Ordering::Relaxed, |cur| {
            (cur == 0 || cur > wanted).then_some(wanted)
        })
        .is_ok()
}

/// Zeroes a slot's counters (everything but `pid`, `status`, `hostpid` and the start time).
fn zero_slot_counters(slot: &ProcSlot) {
    slot.unused[crate::layout::SLOT_REFUSED_WORD].store(0, Ordering::Relaxed);
    for mem in &slot.used {
        for c in [
            &mem.context_size,
            &mem.module_size,
            &mem.data_size,
            &mem.offset,
            &mem.total,
        ] {
            c.store(0, Ordering::Relaxed);
        }
        for c in &mem.unused {
            c.store(0, Ordering::SeqCst);
        }
    }
    for m in &slot.monitorused {
        m.store(0, Ordering::Relaxed);
    }
    for u in &slot.device_util {
        for c in [&u.dec_util, &u.enc_util, &u.sm_util] {
            c.store(0, Ordering::Relaxed);
        }
    }
    slot.seqlock.store(0, Ordering::Release);
}

/// Frees a slot whose `pid` holds this process's freeing mark: marked exited (readers skip it), zeroed, start
/// time cleared, then pid 0 (free for the next registrant).
fn free_claimed_slot(slot: &ProcSlot) {
    slot.status.store(SLOT_STATUS_EXITED, Ordering::SeqCst);
    zero_slot_counters(slot);
    slot.unused[SLOT_START_TIME_WORD].store(0, Ordering::Relaxed);
    slot.hostpid.store(0, Ordering::Relaxed);
    slot.pid.store(0, Ordering::Release);
}

/// Frees `slot` if its process is gone (see [`Region::reap_dead_slots`]); `own` is the caller's PID. The slot
/// is claimed by CAS of its `pid` to the caller's negated PID first, so two reapers never free it twice and
/// a registrant never takes it half-freed. Also frees a slot left "running" with pid 0 (HAMi-core's exit
/// handler interrupted, or a tenant's edit) and finishes the job of a reaper that died half-way.
fn free_if_dead(slot: &ProcSlot, own: i32) -> bool {
    let mark = own.saturating_neg();
    let pid = slot.pid.load(Ordering::Acquire);
    let dead = match pid {
        0 => slot.status.load(Ordering::Acquire) != SLOT_STATUS_EXITED,
        p if p < 0 => p != mark && lock::process_is_dead(p.saturating_neg()),
        p if p == own => false,
        p => {
            let start = slot.unused[SLOT_START_TIME_WORD].load(Ordering::Acquire);
            lock::slot_owner_is_dead(p, start)
        }
    };
    if !dead
        || slot
            .pid
            .compare_exchange(pid, mark, Ordering::SeqCst, Ordering::Relaxed)
            .is_err()
    {
        return false;
    }
    if pid > 0 {
        // Between the check and the claim the slot may have been freed and taken by a new process that got
        // the same PID (reuse within microseconds); its registration stored its start time first.
        let start = slot.unused[SLOT_START_TIME_WORD].load(Ordering::SeqCst);
        if !lock::slot_owner_is_dead(pid, start) {
            let _ = slot
                .pid
                .compare_exchange(mark, pid, Ordering::SeqCst, Ordering::Relaxed);
            return false;
        }
    }
    free_claimed_slot(slot);
    true
}

/// Opens (creating exclusively if absent) the region file without following links, after checking that its
/// directory cannot be used by another user to swap the file. Returns the file and whether we created it.
fn open_region_file(path: &Path) -> Result<(File, bool)> {
    let name = path
        .file_name()
        .ok_or_else(|| RegionError::NotRegularFile {
            path: path.to_path_buf(),
            found: "a path without a file name".to_owned(),
        })?;
    let dir_path = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let dir = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(dir_path)
        .map_err(|e| RegionError::io("open directory", dir_path, e))?;
    let meta = dir
        .metadata()
        .map_err(|e| RegionError::io("stat directory", dir_path, e))?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    let mode = meta.mode() & 0o7777;
    let others_write = mode & 0o022 != 0;
    let sticky = mode & 0o1000 != 0;
    if (meta.uid() != 0 && meta.uid() != euid) || (others_write && !sticky) {
        return Err(RegionError::UnsafeDirectory {
            dir: dir_path.to_path_buf(),
            mode,
            owner: meta.uid(),
            euid,
        });
    }
    let cname = CString::new(name.as_bytes()).map_err(|_| RegionError::NotRegularFile {
        path: path.to_path_buf(),
        found: "a name with a NUL byte".to_owned(),
    })?;
    // A few rounds: the file can be removed between our EEXIST and the open of the existing file.
    for _ in 0..8 {
        let flags =
            libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        // SAFETY: a valid directory fd and a NUL-terminated name; the mode is passed as the variadic third
        // argument as open(2) requires with O_CREAT.
        let fd = unsafe {
            libc::openat(
                dir.as_raw_fd(),
                cname.as_ptr(),
                flags,
                0o666 as libc::c_uint,
            )
        };
        if fd >= 0 {
            // SAFETY: `fd` was just returned by openat and is owned by nobody else.
            return Ok((unsafe { File::from_raw_fd(fd) }, true));
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EEXIST) {
            return Err(RegionError::io("create", path, err));
        }
        let flags = libc::O_RDWR | libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK;
        // SAFETY: as above, without O_CREAT (no mode argument needed).
        let fd = unsafe { libc::openat(dir.as_raw_fd(), cname.as_ptr(), flags) };
        if fd < 0 {
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::ENOENT) => continue,
                Some(libc::ELOOP) => {
                    return Err(RegionError::Symlink {
                        path: path.to_path_buf(),
                    });
                }
                _ => return Err(RegionError::io("open", path, err)),
            }
        }
        // SAFETY: `fd` was just returned by openat and is owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        let meta = file
            .metadata()
            .map_err(|e| RegionError::io("stat", path, e))?;
        if !meta.file_type().is_file() || meta.nlink() != 1 {
            let found = if meta.file_type().is_file() {
                format!("a regular file with {} links", meta.nlink())
            } else {
                format!("not a regular file (mode {:o})", meta.mode())
            };
            return Err(RegionError::NotRegularFile {
                path: path.to_path_buf(),
                found,
            });
        }
        return Ok((file, false));
    }
    Err(RegionError::io(
        "open",
        path,
        io::Error::other("the file kept disappearing between create and open"),
    ))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
