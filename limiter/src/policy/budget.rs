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
//! * **The strictest limit wins.** A process enforces the smaller of its own environment's cap and
//!   the region's (read on every allocation, so a limit the node rewrites takes effect at once); a
//!   region whose recorded limit is looser than (or missing from) a process's valid cap is lowered
//!   to it when the process opens it, never raised. So the first process to create the region
//!   does not decide the cap for the others (one with a malformed limit, or with only an SM cap,
//!   records 0 = unlimited; the next process with a valid limit repairs it). A disagreement is
//!   reported once.
//! * **Fails closed.** If the region cannot be opened (permissions, a foreign or corrupt file, no
//!   free slot), one line goes to stderr (always, like HAMi-core's errors) and every allocation on
//!   a capped device is refused with `CUDA_ERROR_OUT_OF_MEMORY`.
//! * **Admission** is [`vgpu_region::Region::charge`]. Within this process's **grant** (a
//!   reservation of a sixteenth of the cap, at most 1 GiB, beyond what it holds, which every other
//!   process's check counts) a data charge is three atomic additions and two loads; beyond it, the
//!   full check: charge the own slot, re-check the container total, roll back on overflow
//!   (race-free across processes; the proofs are in the region crate), then take a new grant if
//!   there is room. On a would-be refusal the unused grants are taken back and the dead processes'
//!   slots reaped (HAMi-core's `oom_check`), and the charge is retried once: a reservation nobody
//!   uses never refuses an allocation. A refusal increments the slot's "allocations refused" counter.
//! * **Fork.** The child forgets the parent's slot (atomics only) and registers on its first
//!   charge; an `atexit` handler frees the slot at a normal exit (a SIGKILLed process's slot is
//!   reaped by the others).
//!
//! Device indices here are *container* device indices (what `CUDA_DEVICE_MEMORY_LIMIT_<i>` and
//! NVML count), not CUDA ordinals; [`crate::policy::devices`] maps one to the other.

use crate::infra::config::{self, MAX_DEVICES};
use crate::infra::fork::ChildReset;
use crate::infra::log::{ERROR, WARN, log_at};
use crate::policy::caps::{self, UNLIMITED};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, Ordering};
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
    #[inline]
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

/// The container's budget, kept in the shared region.
#[derive(Debug)]
pub(crate) struct SharedBudget {
    /// Whether the region, once opened, holds a memory limit for any device (then those devices are
    /// capped even where this process's environment says nothing).
    file_capped: AtomicBool,
    /// Opened (or failed); fork- and re-entry-aware, see `crate::infra::sync`.
    open_state: crate::infra::sync::InitOnce,
    /// The mapped region, leaked for the process's lifetime; null when it could not be opened.
    region: AtomicPtr<Region>,
    registration_reported: AtomicBool,
    device_info_written: AtomicBool,
    atexit_installed: AtomicBool,
}

impl SharedBudget {
    pub(crate) const fn new() -> Self {
        Self {
            file_capped: AtomicBool::new(false),
            open_state: crate::infra::sync::InitOnce::new(),
            region: AtomicPtr::new(std::ptr::null_mut()),
            registration_reported: AtomicBool::new(false),
            device_info_written: AtomicBool::new(false),
            atexit_installed: AtomicBool::new(false),
        }
    }

    /// The region, opening it on first use; `None` without a cap or when it cannot be opened.
    /// Once open, one load: the pointer is set only after a cap made the process open it, and is
    /// never cleared.
    #[inline(always)]
    fn region(&self) -> Option<&'static Region> {
        let p = self.region.load(Ordering::Acquire);
        // SAFETY: non-null pointers come from `Box::leak` in `open_slow` and are never freed.
        match unsafe { p.as_ref() } {
            Some(region) => Some(region),
            None => self.region_slow(),
        }
    }

    /// [`SharedBudget::region`] before the region is open (or when it cannot be).
    #[cold]
    #[inline(never)]
    fn region_slow(&self) -> Option<&'static Region> {
        if !caps::memory_capped() && !caps::sm_capped() {
            return None;
        }
        if !self.open_state.is_done() {
            self.open_slow();
        }
        let p = self.region.load(Ordering::Acquire);
        // SAFETY: non-null pointers come from `Box::leak` in `open_slow` and are never freed.
        unsafe { p.as_ref() }
    }

    #[cold]
    fn open_slow(&self) {
        // Opened by another thread, or re-entered from inside the opening (then: no region yet,
        // capped devices refuse): never wait for ourselves or for a thread a fork left behind.
        let Ok(claim) = self.open_state.claim() else {
            return;
        };
        let path = Path::new(OsStr::from_bytes(config::shared_cache_path().to_bytes()));
        let mut cfg = RegionConfig::default();
        caps::sm_for_region(&mut cfg);
        caps::memory_for_region(&mut cfg);
        match Region::open_or_create(path, &cfg) {
            Ok(region) => {
                let report = region.open_report();
                if let Some(m) = &report.limit_mismatch
                    && m.file_limits != m.requested_limits
                {
                    log_at!(
                        WARN,
                        "Limit inconsistency: {} holds memory limits {:?}, the environment asks for \
                         {:?}; the stricter of the two is in force{}",
                        path.display(),
                        nonzero(&m.file_limits),
                        nonzero(&m.requested_limits),
                        if report.memory_limits_tightened.is_empty() {
                            ""
                        } else {
                            " (the file was lowered to the environment's)"
                        }
                    );
                }
                // A malformed variable's cap of 0 (fail closed) stays this process's alone: the file
                // cannot say "0 bytes" (0 means unlimited there). Every other cap is combined with the
                // file's on each use (`Budget::limit`).
                let any_file_limit =
                    (0..MAX_DEVICES).any(|d| region.limit(d).is_ok_and(|l| l != 0));
                self.file_capped.store(any_file_limit, Ordering::Release);
                RESET.register(); // before the slot can be taken: a child must forget it
                self.region
                    .store(Box::into_raw(Box::new(region)), Ordering::Release);
            }
            Err(e) => log_at!(
                ERROR,
                "cannot use the shared region: {e}; refusing device memory on capped devices \
                 (check CUDA_DEVICE_MEMORY_SHARED_CACHE and the file's permissions)"
            ),
        }
        claim.finish();
    }

    /// The region with this process registered in a slot; `None` (reported once) otherwise.
    #[inline(always)]
    fn registered(&self) -> Option<&'static Region> {
        let region = self.region()?;
        if region.slot_index().is_some() {
            return Some(region);
        }
        self.register(region)
    }

    /// [`SharedBudget::registered`] when this process holds no slot yet (first charge, after a fork).
    #[cold]
    #[inline(never)]
    fn register(&self, region: &'static Region) -> Option<&'static Region> {
        match region.register_current_process() {
            Ok(_) => {
                if !self.atexit_installed.swap(true, Ordering::AcqRel) {
                    // SAFETY: `release_slot_at_exit` is a valid `extern "C" fn()`.
                    unsafe { libc::atexit(release_slot_at_exit) };
                }
                if !self.device_info_written.swap(true, Ordering::AcqRel) {
                    write_device_info(region);
                }
                record_host_pid(region);
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

    /// Charges `bytes` of application data on `dev` within this process's grant there
    /// ([`Region::try_add_leased`]): three atomic additions and a few loads, no limit read and no sum
    /// over the container. `false` (nothing changed): no region yet, no grant, or not within it — the
    /// caller then reads the limit and takes [`SharedBudget::charge_checked`].
    #[inline(always)]
    pub(crate) fn try_charge_leased(&self, dev: usize, bytes: u64) -> bool {
        let p = self.region.load(Ordering::Acquire);
        // SAFETY: non-null pointers come from `Box::leak` in `open_slow` and are never freed.
        unsafe { p.as_ref() }.is_some_and(|region| region.try_add_leased(dev, bytes))
    }

    /// A charge beyond the process's grant, on a device capped at `limit`: the full check of
    /// [`Region::charge_checked`] (the region is opened here on first use); without a slot, take one
    /// and try again; a refusal is counted.
    #[cold]
    #[inline(never)]
    pub(crate) fn charge_checked(
        &self,
        dev: usize,
        kind: MemoryKind,
        bytes: u64,
        limit: u64,
    ) -> Result<(), OverCap> {
        let Some(region) = self.region() else {
            return Err(OverCap { usage: 0, limit });
        };
        let result = match region.charge_checked(dev, kind, bytes, limit) {
            Err(vgpu_region::RegionError::NotRegistered { .. }) => match self.registered() {
                // The first charge of a process (or of a fork child) takes its slot here.
                Some(region) => region.charge_checked(dev, kind, bytes, limit),
                None => return Err(OverCap { usage: 0, limit }),
            },
            other => other,
        };
        match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(usage)) => {
                // Counted in the slot (taken now if this was the process's first charge).
                if let Some(region) = self.registered() {
                    let _ = region.add_refused();
                }
                Err(OverCap { usage, limit })
            }
            Err(_) => Err(OverCap { usage: 0, limit }),
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
    let uuids = crate::policy::devices::visible_uuids();
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
    /// The stricter of the environment's cap and the region's (0 in the file = none). Read from the
    /// region on every call: a tenant raising the file's word gains nothing (the environment still
    /// bounds it) and the node lowering it takes effect at the next allocation. Inlined into the
    /// allocation hooks (it was, by the compiler's choice, before the environment's caps moved to
    /// `caps.rs`; out of line it costs ~20 instructions per capped allocation).
    #[inline]
    fn limit(&self, dev: usize) -> Option<u64> {
        let env = caps::memory(dev)?;
        let file = self.region().map_or(0, |r| r.limit(dev).unwrap_or(0));
        if file == 0 {
            (env != UNLIMITED).then_some(env)
        } else {
            Some(env.min(file))
        }
    }

    fn any_limit(&self) -> bool {
        caps::memory_capped() || self.file_capped.load(Ordering::Acquire)
    }

    fn usage(&self, dev: usize) -> u64 {
        self.region()
            .and_then(|r| r.device_usage(dev).ok())
            .unwrap_or(0)
    }

    /// The grant first (data only; it is only ever taken on a capped device), then the device's cap
    /// and the full check — the order of the allocation hooks' own path (`hooks::memory`).
    fn try_charge_kind(&self, dev: usize, kind: MemoryKind, bytes: u64) -> Result<(), OverCap> {
        if kind == MemoryKind::Data && self.try_charge_leased(dev, bytes) {
            return Ok(());
        }
        match self.limit(dev) {
            Some(limit) => self.charge_checked(dev, kind, bytes, limit),
            None => Ok(()),
        }
    }

    #[inline(always)]
    fn credit_kind(&self, dev: usize, kind: MemoryKind, bytes: u64) {
        if let Some(region) = self.region() {
            let _ = region.credit(dev, kind, bytes);
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

/// Writes this process's host PID into its slot, as HAMi-core does at initialisation: the node's
/// monitor, its metrics and its backstop know processes by host PID, memory-only containers included
/// (the SM watcher, which also needs it, runs only under an SM cap). Asked once per slot taken, of the
/// agent's broker (bounded by its timeout; a missing socket fails at once).
fn record_host_pid(region: &Region) {
    if let (Some(pid), Some(slot)) = (
        crate::policy::sm::hostpid::resolve().pid(),
        region.slot_index(),
    ) && let Some(s) = region.layout().procs.get(slot)
    {
        s.hostpid.store(pid, Ordering::Release);
    }
}

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
#[inline(always)]
pub(crate) fn linear_reserved(bytes: u64) -> u64 {
    const SMALL: u64 = 1 << 20;
    const PAGE: u64 = 2 << 20;
    let mask = if bytes >= SMALL { PAGE - 1 } else { 511 };
    // Rounding up to a multiple of a power of two; near u64::MAX it saturates to a size no cap
    // admits (a wrapped, tiny size would be charged instead of refused).
    bytes.saturating_add(mask) & !mask
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

/// Context tag of an allocation made in the primary context of its device (`Charge::dev`).
const PRIMARY_TAG: u64 = 1;

/// Segments a table can grow to: segment `i` holds `N << i` entries, so the first segment's
/// capacity times 2^18 − 1 in all (8.6 × 10⁹ allocations for [`DEVICE_PTRS`]) — far beyond what
/// memory allows, so the only real bound is the process's memory (32 bytes per entry).
const MAX_SEGMENTS: usize = 18;
/// Positions probed per segment before the next segment is tried (or grown).
const PROBE: usize = 32;

/// One entry; all-zero is a valid empty entry, so a segment is `alloc_zeroed` memory.
#[repr(C)]
struct Entry {
    key: AtomicU64,
    bytes: AtomicU64,
    /// The context the allocation was made in: [`PRIMARY_TAG`], or a `cuCtxCreate*` handle.
    tag: AtomicU64,
    dev: AtomicU32,
}

/// A growable, lock-free open-addressing map from an allocation's key (device pointer, VMM
/// handle, array handle, context) to what it charged.
///
/// It never refuses for lack of room below the cap: when the probe window of every segment is
/// full, a segment twice the size of the last is allocated (`alloc_zeroed`, never freed, so readers
/// need no reclamation) — the old fixed `AllocTable<32768>` refused allocation 32,769 at 428 MiB
/// of a 4 GiB cap. Only a failed allocation of a new segment (the process is out of memory)
/// refuses an insert; the hooks then refuse the allocation, and it is counted in the slot's
/// refused word like any refusal.
///
/// Keys 0, `u64::MAX` and `u64::MAX - 1` are reserved (no driver hands those out). Writers claim
/// an entry by CAS to `BUSY`, fill the value, then publish the key with `Release`; readers treat
/// `BUSY` like a tombstone. Tagged tables remember the context each allocation was made in, so a
/// context's teardown can give its allocations back ([`context_destroyed`]).
#[derive(Debug)]
///
/// `TAGGED` tables remember each entry's context; `COUNTED` ones count their live entries (only the
/// context table, which allocations ask "any?"). Both are type parameters, so the hot paths test
/// neither.
pub(crate) struct AllocTable<
    const N: usize,
    const TAGGED: bool = false,
    const COUNTED: bool = false,
> {
    segments: [AtomicPtr<Entry>; MAX_SEGMENTS],
    live: AtomicU64,
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Entry")
    }
}

impl<const N: usize, const TAGGED: bool, const COUNTED: bool> AllocTable<N, TAGGED, COUNTED> {
    pub(crate) const fn new() -> Self {
        assert!(N.is_power_of_two() && N >= PROBE);
        Self {
            segments: [const { AtomicPtr::new(std::ptr::null_mut()) }; MAX_SEGMENTS],
            live: AtomicU64::new(0),
        }
    }

    fn layout(seg: usize) -> Option<std::alloc::Layout> {
        std::alloc::Layout::array::<Entry>(N << seg).ok()
    }

    /// Segment `seg`, or `None` when it has not been allocated.
    fn segment(&self, seg: usize) -> Option<&[Entry]> {
        let p = self.segments[seg].load(Ordering::Acquire);
        // SAFETY: non-null pointers were stored by `grow` from `alloc_zeroed` of `N << seg`
        // entries and are never freed; all-zero `Entry`s are valid atomics.
        (!p.is_null()).then(|| unsafe { std::slice::from_raw_parts(p, N << seg) })
    }

    /// Allocates segment `seg` (or returns the one another thread allocated meanwhile).
    #[cold]
    fn grow(&self, seg: usize) -> Option<&[Entry]> {
        RESET.register();
        let layout = Self::layout(seg)?;
        // SAFETY: the layout has a non-zero size (N >= PROBE > 0).
        let fresh = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<Entry>();
        if fresh.is_null() {
            return None;
        }
        if let Err(winner) = self.segments[seg].compare_exchange(
            std::ptr::null_mut(),
            fresh,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            // SAFETY: `fresh` came from `alloc_zeroed(layout)` just above and was never shared.
            unsafe { std::alloc::dealloc(fresh.cast(), layout) };
            let _ = winner;
        }
        self.segment(seg)
    }

    #[inline(always)]
    fn start(key: u64, len: usize) -> usize {
        // Fibonacci hashing; device pointers are aligned, so the low bits alone would cluster.
        (key.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 20) as usize & (len - 1)
    }

    /// Records `key`; `false` when the key is reserved or no segment can take it (out of memory).
    #[inline(always)]
    pub(crate) fn insert(&self, key: u64, charge: Charge) -> bool {
        if key == EMPTY || key >= BUSY {
            return false;
        }
        let tag = if TAGGED { context_tag() } else { 0 };
        // The first segment inline (the common case: it is allocated and has room); the rest, and
        // growing, out of line.
        if let Some(entries) = self.segment(0)
            && Self::claim(entries, key, charge, tag)
        {
            if COUNTED {
                self.live.fetch_add(1, Ordering::AcqRel);
            }
            return true;
        }
        self.insert_slow(key, charge, tag)
    }

    #[cold]
    fn insert_slow(&self, key: u64, charge: Charge, tag: u64) -> bool {
        for seg in 0..MAX_SEGMENTS {
            let Some(entries) = self.segment(seg).or_else(|| self.grow(seg)) else {
                return false;
            };
            if Self::claim(entries, key, charge, tag) {
                if COUNTED {
                    self.live.fetch_add(1, Ordering::AcqRel);
                }
                return true;
            }
        }
        false
    }

    /// Puts `key` into a free entry of its probe window in `entries`, if there is one.
    #[inline(always)]
    fn claim(entries: &[Entry], key: u64, charge: Charge, tag: u64) -> bool {
        let len = entries.len();
        let start = Self::start(key, len);
        for i in 0..PROBE {
            let e = &entries[(start + i) & (len - 1)];
            let current = e.key.load(Ordering::Acquire);
            if (current == EMPTY || current == TOMBSTONE)
                && e.key
                    .compare_exchange(current, BUSY, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            {
                e.bytes.store(charge.bytes, Ordering::Relaxed);
                e.dev.store(charge.dev, Ordering::Relaxed);
                e.tag.store(tag, Ordering::Relaxed);
                e.key.store(key, Ordering::Release);
                return true;
            }
        }
        false
    }

    /// The entry holding `key`, if recorded.
    #[inline(always)]
    fn find(&self, key: u64) -> Option<&Entry> {
        if key == EMPTY || key >= BUSY {
            return None;
        }
        // The first segment inline (where nearly every key is); the others out of line.
        match self.segment(0) {
            Some(entries) => Self::probe(entries, key).or_else(|| self.find_slow(key)),
            None => None,
        }
    }

    #[cold]
    #[inline(never)]
    fn find_slow(&self, key: u64) -> Option<&Entry> {
        (1..MAX_SEGMENTS)
            .map_while(|seg| self.segment(seg))
            .find_map(|entries| Self::probe(entries, key))
    }

    /// The entry of `entries` holding `key` within its probe window (which ends at the first
    /// never-used entry); one load per entry.
    #[inline(always)]
    fn probe(entries: &[Entry], key: u64) -> Option<&Entry> {
        let len = entries.len();
        let start = Self::start(key, len);
        for i in 0..PROBE {
            let e = &entries[(start + i) & (len - 1)];
            match e.key.load(Ordering::Acquire) {
                EMPTY => return None,
                k if k == key => return Some(e),
                _ => {}
            }
        }
        None
    }

    /// Takes `e` (holding `key`) out of the table if `matches(dev, tag)` holds for what it holds
    /// once claimed, and returns its charge; `None` if another thread took it first or it does not
    /// match (then it is left as it was).
    #[inline(always)]
    fn take_if(&self, e: &Entry, key: u64, matches: impl Fn(u32, u64) -> bool) -> Option<Charge> {
        e.key
            .compare_exchange(key, BUSY, Ordering::AcqRel, Ordering::Acquire)
            .ok()?;
        let charge = Charge {
            bytes: e.bytes.load(Ordering::Relaxed),
            dev: e.dev.load(Ordering::Relaxed),
        };
        if !matches(charge.dev, e.tag.load(Ordering::Relaxed)) {
            e.key.store(key, Ordering::Release);
            return None;
        }
        e.key.store(TOMBSTONE, Ordering::Release);
        if COUNTED {
            self.live.fetch_sub(1, Ordering::AcqRel);
        }
        Some(charge)
    }

    /// Removes `key` and returns its charge; `None` when it was never recorded.
    #[inline(always)]
    pub(crate) fn remove(&self, key: u64) -> Option<Charge> {
        let e = self.find(key)?;
        self.take_if(e, key, |_, _| true)
    }

    /// Whether `key` is recorded.
    pub(crate) fn contains(&self, key: u64) -> bool {
        self.find(key).is_some()
    }

    /// Live entries (only for tables built with counting).
    fn live(&self) -> u64 {
        self.live.load(Ordering::Acquire)
    }

    /// Removes every entry for which `matches(dev, tag)` holds and hands each to `gone`. A scan of
    /// the whole table: only for context teardown, which is rare.
    fn remove_matching(&self, matches: impl Fn(u32, u64) -> bool, mut gone: impl FnMut(Charge)) {
        for entries in (0..MAX_SEGMENTS).map_while(|seg| self.segment(seg)) {
            for e in entries {
                let key = e.key.load(Ordering::Acquire);
                if key == EMPTY || key >= BUSY {
                    continue;
                }
                if let Some(charge) = self.take_if(e, key, &matches) {
                    gone(charge);
                }
            }
        }
    }

    /// Forgets everything (fork child). Atomics only; segments stay allocated.
    pub(crate) fn clear(&self) {
        for entries in (0..MAX_SEGMENTS).map_while(|seg| self.segment(seg)) {
            for e in entries {
                e.key.store(EMPTY, Ordering::Relaxed);
            }
        }
        self.live.store(0, Ordering::Relaxed);
    }
}

/// The context an allocation being recorded now is made in. Without any `cuCtxCreate*` context in
/// this process (the usual case: the runtime uses primary contexts only) every allocation on a
/// device is in that device's primary context, and the driver is not asked; otherwise the current
/// context (`cuCtxGetCurrent`): one of the created contexts, or a primary one.
#[inline]
fn context_tag() -> u64 {
    if CONTEXTS.live() == 0 {
        return PRIMARY_TAG;
    }
    current_context_tag()
}

#[cold]
fn current_context_tag() -> u64 {
    let Some(get) = crate::driver::table::real::cuCtxGetCurrent() else {
        return PRIMARY_TAG;
    };
    let mut ctx: crate::driver::ffi::Handle = std::ptr::null_mut();
    // SAFETY: a valid out-pointer; cuCtxGetCurrent has no other preconditions.
    if unsafe { get(&mut ctx) } != crate::driver::ffi::CUDA_SUCCESS {
        return PRIMARY_TAG;
    }
    let h = ctx as u64;
    if CONTEXTS.contains(h) { h } else { PRIMARY_TAG }
}

/// Gives back everything allocated in the context `ctx` (a `cuCtxCreate*` handle) after the driver
/// destroyed it with its allocations. Called by `cuCtxDestroy*`.
pub(crate) fn context_destroyed(ctx: u64) {
    credit_matching(|_, tag| tag == ctx);
}

/// Gives back everything allocated in the primary context of container device `dev` after the
/// driver destroyed it (last `cuDevicePrimaryCtxRelease`, or `cuDevicePrimaryCtxReset`).
pub(crate) fn primary_context_gone(dev: usize) {
    credit_matching(|d, tag| d as usize == dev && tag == PRIMARY_TAG);
}

fn credit_matching(matches: impl Fn(u32, u64) -> bool + Copy) {
    let b = shared();
    let mut credit = |c: Charge| b.credit(c.dev as usize, c.bytes);
    DEVICE_PTRS.remove_matching(matches, &mut credit);
    ARRAYS.remove_matching(matches, &mut credit);
}

/// Counts a refusal that did not come from the cap (an allocation table that could not grow) in
/// the slot's refused word, the counter the agent's metrics read.
pub(crate) fn count_refusal() {
    if let Some(region) = SHARED.registered() {
        let _ = region.add_refused();
    }
}

/// Device allocations (`cuMemAlloc*`, `cuMemAllocManaged`, `cuMemAllocAsync`, pools) by pointer.
pub(crate) static DEVICE_PTRS: AllocTable<32768, true> = AllocTable::new();
/// VMM physical allocations (`cuMemCreate`) by handle (they outlive contexts).
pub(crate) static VMM_HANDLES: AllocTable<4096> = AllocTable::new();
/// `CUarray` and `CUmipmappedArray` handles.
pub(crate) static ARRAYS: AllocTable<4096, true> = AllocTable::new();
/// Contexts made by `cuCtxCreate*` (primary contexts are counted per device instead).
pub(crate) static CONTEXTS: AllocTable<1024, false, true> = AllocTable::new();

/// The fork-child reset: the region's slot and every table (the child owns none of the parent's
/// allocations). Only atomics. Registered when the region is opened and when a table first grows,
/// before either holds anything of the parent's.
static RESET: ChildReset = ChildReset::new(|| {
    budget().reset_after_fork();
    DEVICE_PTRS.clear();
    VMM_HANDLES.clear();
    ARRAYS.clear();
    CONTEXTS.clear();
});

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
        assert_eq!(
            linear_reserved(u64::MAX),
            !((2u64 << 20) - 1),
            "saturates far above any cap, never wraps"
        );
        assert_eq!(linear_reserved(u64::MAX - (1 << 20)), !((2u64 << 20) - 1));
    }

    #[test]
    fn table_records_removes_and_reuses_slots() {
        let t: AllocTable<32> = AllocTable::new();
        let c = |bytes| Charge { dev: 1, bytes };
        for k in 1..=8u64 {
            assert!(t.insert(k << 20, c(k)));
        }
        assert_eq!(t.remove(3 << 20), Some(c(3)));
        assert_eq!(t.remove(3 << 20), None, "second free is unknown");
        assert!(t.insert(9 << 20, c(9)), "tombstone reused");
        assert_eq!(t.remove(9 << 20), Some(c(9)));
        assert_eq!(t.remove(12345), None);
        assert!(!t.insert(0, c(1)), "null is never tracked");
        t.clear();
        assert_eq!(t.remove(1 << 20), None);
    }

    #[test]
    fn table_grows_instead_of_refusing_far_below_the_cap() {
        // The old fixed table of 32,768 entries refused allocation 32,769; this one starts with 32
        // entries and must take 100,000 (and give every one back exactly once).
        let t: AllocTable<32> = AllocTable::new();
        let key = |i: u64| 0x7f00_0000_0000 + (i << 9);
        for i in 0..100_000u64 {
            assert!(t.insert(key(i), Charge { dev: 0, bytes: i }), "insert {i}");
        }
        for i in (0..100_000u64).rev() {
            assert_eq!(
                t.remove(key(i)),
                Some(Charge { dev: 0, bytes: i }),
                "remove {i}"
            );
        }
        assert_eq!(t.remove(key(5)), None);
    }

    #[test]
    fn teardown_takes_exactly_the_entries_of_one_context() {
        // Without created contexts every allocation is tagged with its device's primary context.
        let t: AllocTable<32, true, true> = AllocTable::new();
        for i in 1..=1000u64 {
            assert!(t.insert(
                i << 12,
                Charge {
                    dev: (i % 2) as u32,
                    bytes: i
                }
            ));
        }
        assert_eq!(t.live(), 1000);
        let mut got = Vec::new();
        t.remove_matching(
            |dev, tag| dev == 1 && tag == PRIMARY_TAG,
            |c| got.push(c.bytes),
        );
        got.sort_unstable();
        assert_eq!(got, (1..=1000).filter(|i| i % 2 == 1).collect::<Vec<_>>());
        assert_eq!(t.live(), 500);
        assert_eq!(t.remove(1 << 12), None, "taken by the teardown");
        assert_eq!(t.remove(2 << 12), Some(Charge { dev: 0, bytes: 2 }));
    }
}
