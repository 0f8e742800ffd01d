//! [`Region`]: a mapped v1.2 region file, opened or created the way HAMi-core does it, with lock-free
//! accounting for the limiter's hot paths.
//!
//! # Which fields are updated how
//!
//! | field | writer | how |
//! |---|---|---|
//! | `procs[s].used[d].{context,module,data}_size`, `.total` | owner of slot `s` | atomic add / saturating CAS-sub, relaxed |
//! | `procs[s].seqlock` | owner of slot `s` | `fetch_add(1)` before and after each update (HAMi-core readers) |
//! | `procs[s].{pid,status,hostpid}`, `proc_num` | region-lock holder (allocate, reap); slot owner (release) | atomic stores, release/acquire |
//! | `recent_kernel` | limiter on launch (CAS to 2 unless negative); monitor write-back | atomic |
//! | `utilization_switch` | monitor write-back | atomic |
//! | `last_kernel_time` | limiter on launch (`fetch_max`, at most once a second per process) | atomic |
//! | `limit`, `sm_limit`, `priority`, versions | initialiser, under the whole-file OFD lock, before the magic | atomic stores, then magic with release |
//! | `device_num`, `uuids` | [`Region::set_device_info`], under the region lock | atomic stores |
//! | `owner_pid` | the region lock, see [`crate::lock`] | CAS |
//!
//! Readers on the hot path ([`Region::device_usage`]) only do relaxed loads of `proc_num`, `status` and
//! `used[d].total`: each value is exact, the sum is a moment's view, which is what HAMi-core's own check gives.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::error::{RegionError, Result};
use crate::layout::{
    CUDA_DEVICE_MAX_COUNT, DEFAULT_PRIORITY, DeviceMemory, INITIAL_UTILIZATION_SWITCH,
    MAJOR_VERSION, MINOR_VERSION, MULTIPROCESS_SHARED_REGION_MAGIC_FLAG, ProcSlot,
    RECENT_KERNEL_ACTIVE, REGION_FILE_SIZE, REGION_SIZE, SHARED_CACHE_DEFAULT,
    SHARED_REGION_MAX_PROCESS_NUM, SLOT_STATUS_EXITED, SLOT_STATUS_RUNNING, SharedRegion, UUID_LEN,
    v0,
};
use crate::lock::{self, Acquired};
use crate::mapping::{Mapping, ofd_lock};

/// Default wait for the region lock before [`RegionError::LockTimeout`] (HAMi-core: 10 s per attempt).
pub const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(10);

/// Serialises `open_or_create` within this process: POSIX-style locks of one process never conflict with each
/// other, and two threads initialising the same file would both write the limits.
static OPEN_LOCK: Mutex<()> = Mutex::new(());

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
    /// Set when the file already held limits different from the caller's.
    pub limit_mismatch: Option<LimitMismatch>,
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
    /// Last `last_kernel_time` this process wrote, to write it at most once a second.
    last_kernel_time: AtomicU64,
}

impl Region {
    /// Opens the region file at `path`, creating and initialising it if needed.
    ///
    /// Protocol (compatible with HAMi-core's `try_create_shrreg`): create the file mode 0666 if missing; take a
    /// whole-file OFD write lock (it conflicts with HAMi-core's `lockf`); check the size (0 → extend to 2 008 953
    /// bytes like HAMi-core; 2 008 952 or 2 008 953 → fine; anything else → error); map exactly 2 008 952
    /// bytes; if the magic is absent initialise versions, limits, semaphores, `utilization_switch = 1`,
    /// `recent_kernel = 2`, `proc_num = 0`, priority, then store the magic last; otherwise check the version
    /// and compare limits (the file's win). Always sets `last_kernel_time` to now.
    pub fn open_or_create(path: &Path, config: &RegionConfig) -> Result<Self> {
        let _guard = OPEN_LOCK
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .mode(0o666)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| RegionError::io("open", path, e))?;
        ofd_lock(&file, true).map_err(|e| RegionError::io("lock (F_OFD_SETLKW)", path, e))?;
        let result = Self::open_locked(path, file, config);
        // The lock goes with the file description: closing it on error releases it; on success release it now.
        if let Ok(region) = &result {
            ofd_lock(&region.file, false)
                .map_err(|e| RegionError::io("unlock (F_OFD_SETLK)", path, e))?;
        }
        result
    }

    fn open_locked(path: &Path, file: File, config: &RegionConfig) -> Result<Self> {
        let size = file
            .metadata()
            .map_err(|e| RegionError::io("stat", path, e))?
            .len();
        if size == 0 {
            // New file (ours, or one whose creator has not extended it yet). umask may have narrowed 0666;
            // HAMi-core sets umask(0) for the same effect, which a library must not do.
            file.set_len(REGION_FILE_SIZE)
                .map_err(|e| RegionError::io("extend", path, e))?;
            file.set_permissions(std::fs::Permissions::from_mode(0o666))
                .map_err(|e| RegionError::io("chmod", path, e))?;
        } else {
            check_region_file_size(path, size)?;
        }
        let map = Mapping::map(&file, REGION_SIZE).map_err(|e| RegionError::io("mmap", path, e))?;
        let mut region = Self {
            path: path.to_path_buf(),
            map,
            file,
            report: OpenReport {
                initialized_here: false,
                limit_mismatch: None,
            },
            slot: AtomicUsize::new(NO_SLOT),
            slot_pid: AtomicI32::new(0),
            last_kernel_time: AtomicU64::new(0),
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
            return Ok(OpenReport {
                initialized_here: false,
                limit_mismatch,
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

    /// Writes `device_num` and the UUIDs (NUL-padded, truncated to 95 bytes) under the region lock.
    pub fn set_device_info(&self, uuids: &[&str]) -> Result<()> {
        if uuids.len() > CUDA_DEVICE_MAX_COUNT {
            return Err(RegionError::TooManyDevices { count: uuids.len() });
        }
        let _lock = self.lock(DEFAULT_LOCK_TIMEOUT)?;
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

    /// Takes a slot for the calling process (PID `getpid()`, host PID 0, status running) under the region
    /// lock, after reaping dead processes' slots. Idempotent for this handle. A slot already carrying our PID
    /// (left by an earlier process that had the same PID, HAMi-core's crash-loop case) is reused and zeroed;
    /// otherwise the lowest free slot below `proc_num`, else a new one at `proc_num`.
    ///
    /// One handle per process should register: two handles registering in one process share (and zero) the
    /// slot. After `fork`, the child must call [`Region::forget_slot_after_fork`] and register again.
    pub fn register_current_process(&self) -> Result<usize> {
        let pid = std::process::id() as i32;
        let cached = self.slot.load(Ordering::Acquire);
        if cached != NO_SLOT && self.slot_pid.load(Ordering::Relaxed) == pid {
            return Ok(cached);
        }
        let guard = self.lock(DEFAULT_LOCK_TIMEOUT)?;
        // Another thread of this process may have registered while we waited for the lock.
        let cached = self.slot.load(Ordering::Acquire);
        if cached != NO_SLOT && self.slot_pid.load(Ordering::Relaxed) == pid {
            return Ok(cached);
        }
        guard.reap_dead_slots();
        let r = self.shared();
        let proc_num = clamp_proc_num(r.proc_num.load(Ordering::Acquire));
        let slots = &r.procs[..proc_num];
        let index = match slots
            .iter()
            .position(|s| s.pid.load(Ordering::Acquire) == pid)
        {
            Some(i) => i,
            None => match slots
                .iter()
                .position(|s| s.pid.load(Ordering::Acquire) == 0)
            {
                Some(i) => i,
                None if proc_num < SHARED_REGION_MAX_PROCESS_NUM => proc_num,
                None => {
                    return Err(RegionError::SlotsFull {
                        path: self.path.clone(),
                        pid,
                    });
                }
            },
        };
        let slot = &r.procs[index];
        // Order matters for a SIGKILL mid-way: counters, then pid (slot now ours, reapable), then status, then
        // proc_num (slot now visible to readers).
        zero_slot_counters(slot);
        slot.hostpid.store(0, Ordering::Relaxed);
        slot.pid.store(pid, Ordering::Release);
        // SeqCst (not just Release): [`Region::try_add_usage`]'s proof needs a checker that comes after
        // this slot's first charge in the SeqCst order to see the slot.
        slot.status.store(SLOT_STATUS_RUNNING, Ordering::SeqCst);
        if index == proc_num {
            r.proc_num.store((proc_num + 1) as i32, Ordering::SeqCst);
        }
        self.slot_pid.store(pid, Ordering::Relaxed);
        self.slot.store(index, Ordering::Release);
        drop(guard);
        Ok(index)
    }

    /// Index of this process's slot, if registered through this handle.
    pub fn slot_index(&self) -> Option<usize> {
        let slot = self.slot.load(Ordering::Acquire);
        (slot != NO_SLOT).then_some(slot)
    }

    /// Forgets the slot without touching the region: for a `pthread_atfork` child handler (atomics only).
    pub fn forget_slot_after_fork(&self) {
        self.slot.store(NO_SLOT, Ordering::Release);
        self.slot_pid.store(0, Ordering::Relaxed);
    }

    /// Releases this process's slot (exit path): status 0, counters zeroed, then pid 0. Lock-free, so it can
    /// run from an `atexit` handler even while another process holds the lock; `proc_num` shrinks at the next
    /// locked operation.
    pub fn unregister(&self) {
        let index = self.slot.swap(NO_SLOT, Ordering::AcqRel);
        let pid = self.slot_pid.swap(0, Ordering::Relaxed);
        if index == NO_SLOT {
            return;
        }
        let slot = &self.shared().procs[index];
        if slot.pid.load(Ordering::Acquire) != pid {
            return; // reaped or reused meanwhile: not ours any more
        }
        free_slot(slot);
    }

    /// Frees the slots of dead processes (`kill(pid, 0)` = `ESRCH`, or a zombie) under the region lock and
    /// shrinks `proc_num` over trailing free slots. Live slots never move. Returns how many were freed.
    pub fn reap_dead_slots(&self) -> Result<usize> {
        let guard = self.lock(DEFAULT_LOCK_TIMEOUT)?;
        Ok(guard.reap_dead_slots())
    }

    fn own_slot(&self) -> Result<&ProcSlot> {
        let index = self.slot.load(Ordering::Acquire);
        if index == NO_SLOT {
            return Err(RegionError::NotRegistered {
                path: self.path.clone(),
            });
        }
        Ok(&self.shared().procs[index])
    }

    /// Adds `bytes` of `kind` on `device` (NVML index) to this process's slot. Lock-free.
    pub fn add_usage(&self, device: usize, kind: MemoryKind, bytes: u64) -> Result<()> {
        let device = check_device(device)?;
        let slot = self.own_slot()?;
        let mem = &slot.used[device];
        slot.seqlock.fetch_add(1, Ordering::AcqRel);
        kind_counter(mem, kind).fetch_add(bytes, Ordering::Relaxed);
        mem.total.fetch_add(bytes, Ordering::Relaxed);
        slot.seqlock.fetch_add(1, Ordering::Release);
        Ok(())
    }

    /// Removes `bytes` of `kind` on `device` from this process's slot, saturating at 0 (HAMi-core's
    /// unsigned underflow shows up as 17 TB in use, HAMi-core#200). Lock-free.
    pub fn remove_usage(&self, device: usize, kind: MemoryKind, bytes: u64) -> Result<()> {
        let device = check_device(device)?;
        let slot = self.own_slot()?;
        let mem = &slot.used[device];
        slot.seqlock.fetch_add(1, Ordering::AcqRel);
        saturating_sub(kind_counter(mem, kind), bytes);
        // SeqCst: ordered with the checks of [`Region::try_add_usage`].
        saturating_sub_seqcst(&mem.total, bytes);
        slot.seqlock.fetch_add(1, Ordering::Release);
        Ok(())
    }

    /// Admission control: charges `bytes` of `kind` on `device` to this process's slot **only if** the
    /// container's usage of `device` (all live slots, [`Region::device_usage`]) stays within `limit`
    /// afterwards. Returns `Ok(Ok(usage_after))` when charged, `Ok(Err(usage_seen))` when refused (nothing
    /// changed). Lock-free; no region lock, no reaping (callers reap and retry, as HAMi-core's `oom_check`).
    ///
    /// # Why two processes can never together exceed `limit`
    ///
    /// Charge optimistically, then check: `fetch_add` to the own slot's `total`, then sum all slots'
    /// `total`s, and if the sum exceeds `limit` undo the add and refuse. All these operations are `SeqCst`, so
    /// they lie in one total order S consistent with each thread's program order. Suppose at some moment the
    /// admitted, not yet released charges c₁…cₙ sum to more than `limit`. Let cₖ be the one whose add comes
    /// last in S. Every other cᵢ's add precedes cₖ's add, which precedes cₖ's check (program order); and no cᵢ
    /// has been released (subtracted) before that moment, which is after cₖ's check. So cₖ's check read every
    /// cᵢ's contribution (SeqCst loads see the latest value in S of each counter; a slot's counter can only
    /// have *more* than its admitted charges, from in-flight charges not yet rolled back) and saw a sum
    /// greater than `limit` — it would have refused. Contradiction. The price is conservative: an in-flight charge that
    /// will be rolled back can make a concurrent one be refused too (both then see the other); never the
    /// reverse. Reaping a dead slot only lowers sums. Frees that race with a check make it see *more* than
    /// is held, again only conservative.
    ///
    /// HAMi-core processes writing the same file do not follow this protocol (they check, then add under
    /// their lock); a mixed container is as exact as HAMi-core alone.
    pub fn try_add_usage(
        &self,
        device: usize,
        kind: MemoryKind,
        bytes: u64,
        limit: u64,
    ) -> Result<std::result::Result<u64, u64>> {
        let device = check_device(device)?;
        let slot = self.own_slot()?;
        let mem = &slot.used[device];
        slot.seqlock.fetch_add(1, Ordering::AcqRel);
        mem.total.fetch_add(bytes, Ordering::SeqCst);
        let usage = self.device_usage_seqcst(device);
        let result = if usage <= limit && usage >= bytes {
            kind_counter(mem, kind).fetch_add(bytes, Ordering::Relaxed);
            Ok(usage)
        } else {
            saturating_sub_seqcst(&mem.total, bytes);
            Err(usage.saturating_sub(bytes))
        };
        slot.seqlock.fetch_add(1, Ordering::Release);
        Ok(result)
    }

    /// Counts one allocation refused to this process (the slot's [`crate::layout::SLOT_REFUSED_WORD`]
    /// word). Lock-free.
    pub fn add_refused(&self) -> Result<()> {
        let slot = self.own_slot()?;
        slot.unused[crate::layout::SLOT_REFUSED_WORD].fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Allocations refused to this process so far.
    pub fn refused(&self) -> Result<u64> {
        Ok(self.own_slot()?.unused[crate::layout::SLOT_REFUSED_WORD].load(Ordering::Relaxed))
    }

    fn device_usage_seqcst(&self, device: usize) -> u64 {
        let r = self.shared();
        let proc_num = clamp_proc_num(r.proc_num.load(Ordering::SeqCst));
        r.procs[..proc_num]
            .iter()
            .filter(|s| s.status.load(Ordering::SeqCst) != SLOT_STATUS_EXITED)
            .fold(0u64, |sum, s| {
                sum.saturating_add(s.used[device].total.load(Ordering::SeqCst))
            })
    }

    /// This process's `used[device].total`.
    pub fn process_usage(&self, device: usize) -> Result<u64> {
        let device = check_device(device)?;
        Ok(self.own_slot()?.used[device].total.load(Ordering::Relaxed))
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

    fn reap_dead_slots(&self) -> usize {
        let r = self.region.shared();
        let own = std::process::id() as i32;
        let proc_num = clamp_proc_num(r.proc_num.load(Ordering::Acquire));
        let mut freed = 0;
        for slot in &r.procs[..proc_num] {
            let pid = slot.pid.load(Ordering::Acquire);
            let abandoned = pid == 0 && slot.status.load(Ordering::Relaxed) != SLOT_STATUS_EXITED;
            if abandoned || (pid != 0 && pid != own && lock::process_is_dead(pid)) {
                free_slot(slot);
                freed += 1;
            }
        }
        let mut n = proc_num;
        while n > 0 && r.procs[n - 1].pid.load(Ordering::Acquire) == 0 {
            n -= 1;
        }
        if n != proc_num {
            r.proc_num.store(n as i32, Ordering::Release);
        }
        freed
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

fn saturating_sub(counter: &AtomicU64, bytes: u64) {
    let _ = counter.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
        Some(v.saturating_sub(bytes))
    });
}

fn saturating_sub_seqcst(counter: &AtomicU64, bytes: u64) {
    let _ = counter.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| {
        Some(v.saturating_sub(bytes))
    });
}

fn zero_slot_counters(slot: &ProcSlot) {
    for w in &slot.unused {
        w.store(0, Ordering::Relaxed);
    }
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

/// Marks a slot exited (readers skip it), zeroes it, then frees it (pid 0) for reuse.
fn free_slot(slot: &ProcSlot) {
    slot.status.store(SLOT_STATUS_EXITED, Ordering::Release);
    zero_slot_counters(slot);
    slot.hostpid.store(0, Ordering::Relaxed);
    slot.pid.store(0, Ordering::Release);
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
