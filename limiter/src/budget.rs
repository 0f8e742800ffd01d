//! The enforcement seam: who decides whether an allocation fits, and what is in use.
//!
//! Hooks talk only to [`Budget`] (through [`budget()`]) and to the [`AllocTable`]s that remember
//! what each successful allocation charged. The backend is [`SharedBudget`]: the container's
//! HAMi-core shared region (crate `vgpu-region`), so the cap holds for the sum over every process
//! that maps the same file, and HAMi's monitor (or our metrics) sees per-process usage.
//!
//! * **Lazy.** The region is opened (created if missing, with the caps from the environment) the
//!   first time a capped device's limit or usage is needed — an allocation, a memory query — never
//!   at load and never in a process without a cap (`CUDA_DEVICE_MEMORY_LIMIT*` unset or 0: no file
//!   is created and every hook passes through). The process takes a slot on its first charge.
//! * **The file's limits win** (HAMi-core's "Limit inconsistency" rule): a region created by an
//!   earlier process keeps its caps; a disagreement is reported once.
//! * **Fails closed.** If the region cannot be opened (permissions, a foreign or corrupt file, no
//!   free slot), one line goes to stderr (always, like HAMi-core's errors) and every allocation on
//!   a capped device is refused with `CUDA_ERROR_OUT_OF_MEMORY`.
//! * **Admission** is [`vgpu_region::Region::try_add_usage`]: charge the own slot, re-check the
//!   container total, roll back on overflow (race-free across processes; the proof is there). On
//!   a would-be refusal the dead processes' slots are reaped and the charge retried once
//!   (HAMi-core's `oom_check`). A refusal increments the slot's "allocations refused" counter.
//! * **Fork.** The child forgets the parent's slot (atomics only) and registers on its first
//!   charge; an `atexit` handler frees the slot at a normal exit (a SIGKILLed process's slot is
//!   reaped by the others).
//!
//! Device indices here are *container* device indices (what `CUDA_DEVICE_MEMORY_LIMIT_<i>` and
//! NVML count), not CUDA ordinals; [`crate::devices`] maps one to the other.

use crate::config::{self, Limit, MAX_DEVICES};
use crate::log::{ERROR, WARN, log_at};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU8, AtomicU32, AtomicU64, Ordering};
use vgpu_region::{MemoryKind, Region, RegionConfig};

/// An allocation that does not fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OverCap {
    pub(crate) usage: u64,
    pub(crate) limit: u64,
}

/// Per-device memory budget. Implementations must be lock-free enough to call from any hook.
pub(crate) trait Budget: Sync {
    /// The cap of `dev`, `None` when the device is not limited (then hooks pass through).
    fn limit(&self, dev: usize) -> Option<u64>;
    /// Whether any device is capped (when none is, hooks skip the device lookup entirely).
    fn any_limit(&self) -> bool;
    /// Bytes charged on `dev` (by the whole container).
    fn usage(&self, dev: usize) -> u64;
    /// Charges `bytes` of `kind` on `dev` if `usage + bytes <= limit` (atomically: two threads or
    /// processes can never both squeeze under the cap). Unlimited devices always succeed.
    fn try_charge_kind(&self, dev: usize, kind: MemoryKind, bytes: u64) -> Result<(), OverCap>;
    /// Gives `bytes` of `kind` back on `dev` (saturating at 0).
    fn credit_kind(&self, dev: usize, kind: MemoryKind, bytes: u64);
    /// [`Budget::try_charge_kind`] for application data (allocations).
    fn try_charge(&self, dev: usize, bytes: u64) -> Result<(), OverCap> {
        self.try_charge_kind(dev, MemoryKind::Data, bytes)
    }
    /// [`Budget::credit_kind`] for application data (allocations).
    fn credit(&self, dev: usize, bytes: u64) {
        self.credit_kind(dev, MemoryKind::Data, bytes);
    }
    /// The smallest context charge any live process of the container holds on `dev` (each holds
    /// at least one context when it is non-zero): the best container-wide estimate of one
    /// context's size, `None` when nobody has one yet.
    fn context_estimate(&self, dev: usize) -> Option<u64>;
    /// Called in the child after `fork()`: the child owns none of the parent's allocations.
    /// Must only touch atomics.
    fn reset_after_fork(&self);
}

const UNLIMITED: u64 = u64::MAX;

const NOT_OPENED: u8 = 0;
const OPENING: u8 = 1;
const OPENED: u8 = 2;

/// The container's budget, kept in the shared region.
#[derive(Debug)]
pub(crate) struct SharedBudget {
    /// Caps in force (`UNLIMITED` = none): the environment's, then the region file's.
    limits: [AtomicU64; MAX_DEVICES],
    /// Whether the environment capped any device (decides whether the region is opened at all).
    env_capped: AtomicBool,
    open_state: AtomicU8,
    /// The mapped region, leaked for the process's lifetime; null when it could not be opened.
    region: AtomicPtr<Region>,
    registration_reported: AtomicBool,
    device_info_written: AtomicBool,
    atexit_installed: AtomicBool,
}

impl SharedBudget {
    pub(crate) const fn new() -> Self {
        Self {
            limits: [const { AtomicU64::new(UNLIMITED) }; MAX_DEVICES],
            env_capped: AtomicBool::new(false),
            open_state: AtomicU8::new(NOT_OPENED),
            region: AtomicPtr::new(std::ptr::null_mut()),
            registration_reported: AtomicBool::new(false),
            device_info_written: AtomicBool::new(false),
            atexit_installed: AtomicBool::new(false),
        }
    }

    /// Installs the environment's caps (once, during initialisation).
    pub(crate) fn set_limits(&self, limits: &[Limit; MAX_DEVICES]) {
        let mut any = false;
        for (slot, limit) in self.limits.iter().zip(limits) {
            let v = match *limit {
                Limit::Unlimited => UNLIMITED,
                Limit::Bytes(b) => {
                    any = true;
                    b.min(UNLIMITED - 1)
                }
            };
            slot.store(v, Ordering::Release);
        }
        self.env_capped.store(any, Ordering::Release);
    }

    /// The region, opening it on first use; `None` without a cap or when it cannot be opened.
    fn region(&self) -> Option<&'static Region> {
        if !self.env_capped.load(Ordering::Acquire) && !crate::sm::wants_region() {
            return None;
        }
        if self.open_state.load(Ordering::Acquire) != OPENED {
            self.open_slow();
        }
        let p = self.region.load(Ordering::Acquire);
        // SAFETY: non-null pointers come from `Box::leak` in `open_slow` and are never freed.
        unsafe { p.as_ref() }
    }

    #[cold]
    fn open_slow(&self) {
        if self
            .open_state
            .compare_exchange(NOT_OPENED, OPENING, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            while self.open_state.load(Ordering::Acquire) != OPENED {
                std::hint::spin_loop();
                // SAFETY: sched_yield has no preconditions.
                unsafe { libc::sched_yield() };
            }
            return;
        }
        let path = Path::new(OsStr::from_bytes(config::shared_cache_path().to_bytes()));
        let mut cfg = RegionConfig::default();
        crate::sm::fill_region_config(&mut cfg);
        for (dst, src) in cfg.limits.iter_mut().zip(&self.limits) {
            let v = src.load(Ordering::Acquire);
            *dst = if v == UNLIMITED { 0 } else { v };
        }
        match Region::open_or_create(path, &cfg) {
            Ok(region) => {
                if let Some(m) = &region.open_report().limit_mismatch
                    && m.file_limits != m.requested_limits
                {
                    log_at!(
                        WARN,
                        "Limit inconsistency: {} holds memory limits {:?}, the environment asks for \
                         {:?}; the file's limits are in force",
                        path.display(),
                        nonzero(&m.file_limits),
                        nonzero(&m.requested_limits)
                    );
                }
                for (d, slot) in self.limits.iter().enumerate() {
                    // A malformed variable's cap of 0 (fail closed) is this process's alone: the
                    // file cannot say "0 bytes" (0 means unlimited there), so it is kept.
                    if slot.load(Ordering::Acquire) == 0 {
                        continue;
                    }
                    if let Ok(l) = region.limit(d) {
                        slot.store(if l == 0 { UNLIMITED } else { l }, Ordering::Release);
                    }
                }
                self.region
                    .store(Box::into_raw(Box::new(region)), Ordering::Release);
            }
            Err(e) => log_at!(
                ERROR,
                "cannot use the shared region: {e}; refusing device memory on capped devices \
                 (check CUDA_DEVICE_MEMORY_SHARED_CACHE and the file's permissions)"
            ),
        }
        self.open_state.store(OPENED, Ordering::Release);
    }

    /// The region with this process registered in a slot; `None` (reported once) otherwise.
    fn registered(&self) -> Option<&'static Region> {
        let region = self.region()?;
        if region.slot_index().is_some() {
            return Some(region);
        }
        match region.register_current_process() {
            Ok(_) => {
                if !self.atexit_installed.swap(true, Ordering::AcqRel) {
                    // SAFETY: `release_slot_at_exit` is a valid `extern "C" fn()`.
                    unsafe { libc::atexit(release_slot_at_exit) };
                }
                if !self.device_info_written.swap(true, Ordering::AcqRel) {
                    write_device_info(region);
                }
                Some(region)
            }
            Err(e) => {
                if !self.registration_reported.swap(true, Ordering::AcqRel) {
                    log_at!(
                        ERROR,
                        "cannot take a slot in the shared region: {e}; refusing device memory on \
                         capped devices"
                    );
                }
                None
            }
        }
    }

    /// [`Budget::try_charge_kind`] on a device whose cap `limit` the caller has just read with
    /// [`Budget::limit`] (the allocation hooks do, to decide whether to track at all): spares the
    /// hot path a second lookup.
    pub(crate) fn try_charge_within(
        &self,
        dev: usize,
        kind: MemoryKind,
        bytes: u64,
        limit: u64,
    ) -> Result<(), OverCap> {
        let Some(region) = self.registered() else {
            return Err(OverCap { usage: 0, limit });
        };
        let attempt = || {
            region
                .try_add_usage(dev, kind, bytes, limit)
                .unwrap_or(Err(0))
        };
        let mut result = attempt();
        if result.is_err() && region.reap_dead_slots().is_ok_and(|n| n > 0) {
            result = attempt();
        }
        match result {
            Ok(_) => Ok(()),
            Err(usage) => {
                let _ = region.add_refused();
                Err(OverCap { usage, limit })
            }
        }
    }
}

fn nonzero(limits: &[u64]) -> Vec<(usize, u64)> {
    limits
        .iter()
        .enumerate()
        .filter(|(_, l)| **l != 0)
        .map(|(d, l)| (d, *l))
        .collect()
}

/// Writes the visible devices' UUIDs (container index order) into the region, as HAMi-core does
/// at initialisation; best effort, from the driver's `cuDeviceGetUuid`.
fn write_device_info(region: &Region) {
    let uuids = crate::devices::visible_uuids();
    if uuids.is_empty() {
        return;
    }
    let refs: Vec<&str> = uuids.iter().map(String::as_str).collect();
    if let Err(e) = region.set_device_info(&refs) {
        log_at!(WARN, "cannot record device UUIDs in the shared region: {e}");
    }
}

/// `atexit`: frees this process's slot (atomics only; a no-op when it holds none, e.g. a forked
/// child that never used CUDA).
extern "C" fn release_slot_at_exit() {
    let _ = std::panic::catch_unwind(|| {
        let p = SHARED.region.load(Ordering::Acquire);
        // SAFETY: non-null pointers come from `Box::leak` and are never freed.
        if let Some(region) = unsafe { p.as_ref() } {
            region.unregister();
        }
    });
}

impl Budget for SharedBudget {
    fn limit(&self, dev: usize) -> Option<u64> {
        let _ = self.region(); // the file's limits replace the environment's once opened
        let v = self.limits.get(dev)?.load(Ordering::Acquire);
        (v != UNLIMITED).then_some(v)
    }

    fn any_limit(&self) -> bool {
        self.env_capped.load(Ordering::Acquire)
    }

    fn usage(&self, dev: usize) -> u64 {
        self.region()
            .and_then(|r| r.device_usage(dev).ok())
            .unwrap_or(0)
    }

    fn try_charge_kind(&self, dev: usize, kind: MemoryKind, bytes: u64) -> Result<(), OverCap> {
        match self.limit(dev) {
            Some(limit) => self.try_charge_within(dev, kind, bytes, limit),
            None => Ok(()),
        }
    }

    fn credit_kind(&self, dev: usize, kind: MemoryKind, bytes: u64) {
        if let Some(region) = self.region() {
            let _ = region.remove_usage(dev, kind, bytes);
        }
    }

    fn context_estimate(&self, dev: usize) -> Option<u64> {
        let region = self.region()?;
        let shared = region.layout();
        let n = (shared.proc_num.load(Ordering::Acquire).max(0) as usize).min(shared.procs.len());
        shared.procs[..n]
            .iter()
            .filter(|s| s.status.load(Ordering::Acquire) != vgpu_region::layout::SLOT_STATUS_EXITED)
            .filter_map(|s| s.used.get(dev))
            .map(|m| m.context_size.load(Ordering::Acquire))
            .filter(|&c| c > 0)
            .min()
    }

    fn reset_after_fork(&self) {
        let p = self.region.load(Ordering::Acquire);
        // SAFETY: non-null pointers come from `Box::leak` and are never freed.
        if let Some(region) = unsafe { p.as_ref() } {
            region.forget_slot_after_fork();
        }
    }
}

static SHARED: SharedBudget = SharedBudget::new();

/// The active backend.
pub(crate) fn budget() -> &'static dyn Budget {
    &SHARED
}

/// The container's region with this process registered in a slot, for the SM cap and the
/// priority protocol; `None` without any cap (memory or SM) or when it cannot be used.
pub(crate) fn registered_region() -> Option<&'static Region> {
    SHARED.registered()
}

/// The shared backend: for initialisation (limits come from the environment), and for the
/// allocation hooks, which call it statically dispatched (inlined) rather than through
/// [`budget()`].
#[inline]
pub(crate) fn shared() -> &'static SharedBudget {
    &SHARED
}

/// The size the driver really reserves for a linear allocation (`cuMemAlloc*`, managed,
/// stream-ordered, arrays) of `bytes` — a documented approximation of the allocator: 512-byte
/// rounding, and whole 2 MiB pages from 1 MiB up (gpu-sim's model of the driver; real drivers
/// also put allocations of 1 MiB and more in 2 MiB pages). Small allocations share pages in the
/// driver; they are charged at their 512-byte-rounded size, so many tiny allocations can use
/// up to one 2 MiB page more than charged per device.
pub(crate) fn linear_reserved(bytes: u64) -> u64 {
    const SMALL: u64 = 1 << 20;
    const PAGE: u64 = 2 << 20;
    if bytes >= SMALL {
        bytes.div_ceil(PAGE).saturating_mul(PAGE)
    } else {
        bytes.div_ceil(512) * 512
    }
}

/// What one tracked allocation charged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Charge {
    pub(crate) dev: u32,
    pub(crate) bytes: u64,
}

const EMPTY: u64 = 0;
const TOMBSTONE: u64 = u64::MAX;
const BUSY: u64 = u64::MAX - 1;

/// A fixed-capacity, lock-free open-addressing map from an allocation's key (device pointer, VMM
/// handle, array handle) to what it charged. Keys 0, `u64::MAX` and `u64::MAX - 1` are reserved
/// (no driver hands those out). Writers claim a slot by CAS to `BUSY`, fill the value, then
/// publish the key with `Release`; readers treat `BUSY` like a tombstone.
///
/// Only allocation and free paths use it (never `cuLaunchKernel`), so a linear probe is fine.
#[derive(Debug)]
pub(crate) struct AllocTable<const N: usize> {
    keys: [AtomicU64; N],
    bytes: [AtomicU64; N],
    devs: [AtomicU32; N],
}

impl<const N: usize> AllocTable<N> {
    pub(crate) const fn new() -> Self {
        assert!(N.is_power_of_two());
        Self {
            keys: [const { AtomicU64::new(EMPTY) }; N],
            bytes: [const { AtomicU64::new(0) }; N],
            devs: [const { AtomicU32::new(0) }; N],
        }
    }

    fn start(key: u64) -> usize {
        // Fibonacci hashing; device pointers are aligned, so the low bits alone would cluster.
        (key.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as usize & (N - 1)
    }

    /// Records `key`; `false` when the table is full or the key is reserved.
    pub(crate) fn insert(&self, key: u64, charge: Charge) -> bool {
        if key == EMPTY || key >= BUSY {
            return false;
        }
        let start = Self::start(key);
        for i in 0..N {
            let slot = (start + i) & (N - 1);
            let current = self.keys[slot].load(Ordering::Acquire);
            if (current == EMPTY || current == TOMBSTONE)
                && self.keys[slot]
                    .compare_exchange(current, BUSY, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            {
                self.bytes[slot].store(charge.bytes, Ordering::Relaxed);
                self.devs[slot].store(charge.dev, Ordering::Relaxed);
                self.keys[slot].store(key, Ordering::Release);
                return true;
            }
        }
        false
    }

    /// Removes `key` and returns its charge; `None` when it was never recorded.
    pub(crate) fn remove(&self, key: u64) -> Option<Charge> {
        if key == EMPTY || key >= BUSY {
            return None;
        }
        let start = Self::start(key);
        for i in 0..N {
            let slot = (start + i) & (N - 1);
            let current = self.keys[slot].load(Ordering::Acquire);
            if current == EMPTY {
                return None;
            }
            if current == key
                && self.keys[slot]
                    .compare_exchange(key, BUSY, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            {
                let charge = Charge {
                    bytes: self.bytes[slot].load(Ordering::Relaxed),
                    dev: self.devs[slot].load(Ordering::Relaxed),
                };
                self.keys[slot].store(TOMBSTONE, Ordering::Release);
                return Some(charge);
            }
        }
        None
    }

    /// Forgets everything (fork child). Atomics only.
    pub(crate) fn clear(&self) {
        for k in &self.keys {
            k.store(EMPTY, Ordering::Relaxed);
        }
    }
}

/// Device allocations (`cuMemAlloc*`, `cuMemAllocManaged`, `cuMemAllocAsync`, pools) by pointer.
pub(crate) static DEVICE_PTRS: AllocTable<32768> = AllocTable::new();
/// VMM physical allocations (`cuMemCreate`) by handle.
pub(crate) static VMM_HANDLES: AllocTable<4096> = AllocTable::new();
/// `CUarray` and `CUmipmappedArray` handles.
pub(crate) static ARRAYS: AllocTable<4096> = AllocTable::new();
/// Contexts made by `cuCtxCreate*` (primary contexts are counted per device instead).
pub(crate) static CONTEXTS: AllocTable<1024> = AllocTable::new();

/// The fork-child reset: usage and every table. Only atomics.
pub(crate) fn reset_after_fork() {
    budget().reset_after_fork();
    DEVICE_PTRS.clear();
    VMM_HANDLES.clear();
    ARRAYS.clear();
    CONTEXTS.clear();
    crate::hooks::context::reset_after_fork();
    crate::hooks::graph::reset_after_fork();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_allocations_are_charged_at_the_reserved_size() {
        assert_eq!(linear_reserved(1), 512);
        assert_eq!(linear_reserved(512), 512);
        assert_eq!(linear_reserved(513), 1024);
        assert_eq!(linear_reserved((1 << 20) - 1), 1 << 20);
        assert_eq!(linear_reserved(1 << 20), 2 << 20);
        assert_eq!(linear_reserved((2 << 20) + 1), 4 << 20);
        assert_eq!(linear_reserved(256 << 20), 256 << 20);
        assert_eq!(linear_reserved(u64::MAX), u64::MAX, "saturates");
    }

    #[test]
    fn table_records_removes_and_reuses_slots() {
        let t: AllocTable<8> = AllocTable::new();
        let c = |bytes| Charge { dev: 1, bytes };
        for k in 1..=8u64 {
            assert!(t.insert(k << 20, c(k)));
        }
        assert!(!t.insert(9 << 20, c(9)), "full");
        assert_eq!(t.remove(3 << 20), Some(c(3)));
        assert_eq!(t.remove(3 << 20), None, "second free is unknown");
        assert!(t.insert(9 << 20, c(9)), "tombstone reused");
        assert_eq!(t.remove(9 << 20), Some(c(9)));
        assert_eq!(t.remove(12345), None);
        assert!(!t.insert(0, c(1)), "null is never tracked");
        t.clear();
        assert_eq!(t.remove(1 << 20), None);
    }
}
