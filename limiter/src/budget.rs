//! The enforcement seam: who decides whether an allocation fits, and what is in use.
//!
//! Hooks talk only to [`Budget`] (through [`budget()`]) and to the [`AllocTable`]s that remember
//! what each successful allocation charged. Today the backend is [`InProcessBudget`]: per-device
//! atomics holding this process's usage against the caps from the environment. The shared region
//! (crate `vgpu-region`, HAMi-core's per-container file summed over all processes) will replace it
//! behind the same trait; the hooks do not change.
//!
//! Device indices here are *container* device indices (what `CUDA_DEVICE_MEMORY_LIMIT_<i>` and
//! NVML count), not CUDA ordinals; [`crate::devices`] maps one to the other.

use crate::config::{Limit, MAX_DEVICES};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

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
    /// Bytes charged on `dev`.
    fn usage(&self, dev: usize) -> u64;
    /// Charges `bytes` on `dev` if `usage + bytes <= limit` (atomically: two threads can never
    /// both squeeze under the cap). Unlimited devices always succeed.
    fn try_charge(&self, dev: usize, bytes: u64) -> Result<(), OverCap>;
    /// Gives `bytes` back on `dev` (saturating at 0).
    fn credit(&self, dev: usize, bytes: u64);
    /// Called in the child after `fork()`: the child owns none of the parent's allocations.
    /// Must only touch atomics.
    fn reset_after_fork(&self);
}

const UNLIMITED: u64 = u64::MAX;

/// This process's usage against the environment's caps.
#[derive(Debug)]
pub(crate) struct InProcessBudget {
    limits: [AtomicU64; MAX_DEVICES],
    used: [AtomicU64; MAX_DEVICES],
}

impl InProcessBudget {
    pub(crate) const fn new() -> Self {
        Self {
            limits: [const { AtomicU64::new(UNLIMITED) }; MAX_DEVICES],
            used: [const { AtomicU64::new(0) }; MAX_DEVICES],
        }
    }

    /// Installs the caps (once, during initialisation).
    pub(crate) fn set_limits(&self, limits: &[Limit; MAX_DEVICES]) {
        for (slot, limit) in self.limits.iter().zip(limits) {
            let v = match *limit {
                Limit::Unlimited => UNLIMITED,
                Limit::Bytes(b) => b.min(UNLIMITED - 1),
            };
            slot.store(v, Ordering::Release);
        }
    }
}

impl Budget for InProcessBudget {
    fn limit(&self, dev: usize) -> Option<u64> {
        let v = self.limits.get(dev)?.load(Ordering::Acquire);
        (v != UNLIMITED).then_some(v)
    }

    fn any_limit(&self) -> bool {
        self.limits
            .iter()
            .any(|l| l.load(Ordering::Relaxed) != UNLIMITED)
    }

    fn usage(&self, dev: usize) -> u64 {
        self.used.get(dev).map_or(0, |u| u.load(Ordering::Acquire))
    }

    fn try_charge(&self, dev: usize, bytes: u64) -> Result<(), OverCap> {
        let Some(limit) = self.limit(dev) else {
            return Ok(());
        };
        let Some(used) = self.used.get(dev) else {
            return Ok(());
        };
        used.fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
            u.checked_add(bytes).filter(|&n| n <= limit)
        })
        .map(|_| ())
        .map_err(|usage| OverCap { usage, limit })
    }

    fn credit(&self, dev: usize, bytes: u64) {
        if let Some(used) = self.used.get(dev) {
            let _ = used.fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                Some(u.saturating_sub(bytes))
            });
        }
    }

    fn reset_after_fork(&self) {
        for u in &self.used {
            u.store(0, Ordering::Relaxed);
        }
    }
}

static IN_PROCESS: InProcessBudget = InProcessBudget::new();

/// The active backend.
pub(crate) fn budget() -> &'static dyn Budget {
    &IN_PROCESS
}

/// The in-process backend, for initialisation (limits come from the environment).
pub(crate) fn in_process() -> &'static InProcessBudget {
    &IN_PROCESS
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

/// The fork-child reset: usage and every table. Only atomics.
pub(crate) fn reset_after_fork() {
    budget().reset_after_fork();
    DEVICE_PTRS.clear();
    VMM_HANDLES.clear();
    ARRAYS.clear();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn capped(limit: u64) -> InProcessBudget {
        let b = InProcessBudget::new();
        let mut limits = [Limit::Unlimited; MAX_DEVICES];
        limits[0] = Limit::Bytes(limit);
        b.set_limits(&limits);
        b
    }

    #[test]
    fn charges_up_to_exactly_the_cap() {
        let b = capped(100);
        assert_eq!(b.try_charge(0, 60), Ok(()));
        assert_eq!(b.try_charge(0, 40), Ok(()));
        assert_eq!(
            b.try_charge(0, 1),
            Err(OverCap {
                usage: 100,
                limit: 100
            })
        );
        b.credit(0, 40);
        assert_eq!(b.usage(0), 60);
        b.credit(0, 1000);
        assert_eq!(b.usage(0), 0, "credit saturates");
    }

    #[test]
    fn unlimited_devices_always_fit() {
        let b = capped(100);
        assert_eq!(b.limit(1), None);
        assert_eq!(b.try_charge(1, u64::MAX), Ok(()));
        assert_eq!(
            b.try_charge(99, 1),
            Ok(()),
            "out-of-range device is unlimited"
        );
    }

    #[test]
    fn concurrent_charges_never_exceed_the_cap() {
        let b = capped(1000);
        let granted = AtomicU64::new(0);
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    for _ in 0..100 {
                        if b.try_charge(0, 7).is_ok() {
                            granted.fetch_add(7, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(granted.load(Ordering::Relaxed), 994);
        assert_eq!(b.usage(0), 994);
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
