//! NVML: `nvmlInit(_v2)` start our lazy initialisation; `nvmlDeviceGetMemoryInfo(_v2)` report,
//! on a capped device, a view that adds up: `total = min(cap, physical)`,
//! `used = min(charged bytes, total)`, `free = total − used`, and for v2 `reserved = 0`, so
//! `used + free = total` (v1) and `reserved + used + free = total` (v2). HAMi-core left the
//! driver's `reserved` untouched, so v2 summed to more than the cap; but the driver's reserve is
//! not part of the container's cap (its allocations may use the whole cap), so showing it inside
//! the cap would understate what the tenant can allocate.
//!
//! "Charged bytes" are the container's, summed over the shared region's live slots, so
//! `nvidia-smi` in the pod sees what the other processes hold. Another tenant's use of the same
//! GPU is not shown here (`cuMemGetInfo` bounds `free` by the physical free memory instead).

use crate::driver::ffi::*;
use crate::driver::real::{Lib, unavailable};
use crate::driver::table::real;
use crate::policy::budget::budget;
use crate::policy::state;
use std::ffi::c_uint;

pub(crate) unsafe fn init_v1() -> NvmlReturn {
    state::ensure();
    match real::nvmlInit() {
        // SAFETY: no arguments.
        Some(f) => unsafe { f() },
        None => unavailable(Lib::Nvml),
    }
}

pub(crate) unsafe fn init_v2() -> NvmlReturn {
    state::ensure();
    match real::nvmlInit_v2() {
        // SAFETY: no arguments.
        Some(f) => unsafe { f() },
        None => unavailable(Lib::Nvml),
    }
}

/// The cap and usage of the device behind an NVML handle, if it is capped.
fn capped(device: Handle) -> Option<(u64, u64)> {
    state::ensure();
    let b = budget();
    if !b.any_limit() {
        return None;
    }
    let index_fn = real::nvmlDeviceGetIndex()?;
    let mut index: c_uint = 0;
    // SAFETY: `device` is the caller's handle (already accepted by the real call); `index` is a
    // valid out-pointer.
    if unsafe { index_fn(device, &mut index) } != NVML_SUCCESS {
        return None;
    }
    let dev = usize::try_from(index).ok()?;
    Some((b.limit(dev)?, b.usage(dev)))
}

/// `(total, used, free)` on a device capped at `cap` with `charged` bytes charged, given the
/// physical total: always `used + free = total`.
fn capped_view(cap: u64, charged: u64, physical_total: u64) -> (u64, u64, u64) {
    let total = cap.min(physical_total);
    let used = charged.min(total);
    (total, used, total - used)
}

/// On a capped device, replaces the driver's figures with [`capped_view`]'s; `true` if it did.
fn virtualise(device: Handle, total: &mut u64, used: &mut u64, free: &mut u64) -> bool {
    let Some((cap, charged)) = capped(device) else {
        return false;
    };
    (*total, *used, *free) = capped_view(cap, charged, *total);
    true
}

pub(crate) unsafe fn device_memory_info(device: Handle, memory: *mut NvmlMemory) -> NvmlReturn {
    let Some(real) = real::nvmlDeviceGetMemoryInfo() else {
        return unavailable(Lib::Nvml);
    };
    // SAFETY: the caller's arguments, forwarded.
    let rc = unsafe { real(device, memory) };
    if rc != NVML_SUCCESS || memory.is_null() {
        return rc;
    }
    // SAFETY: non-null, just filled by NVML.
    let m = unsafe { &mut *memory };
    virtualise(device, &mut m.total, &mut m.used, &mut m.free);
    rc
}

pub(crate) unsafe fn device_memory_info_v2(
    device: Handle,
    memory: *mut NvmlMemoryV2,
) -> NvmlReturn {
    let Some(real) = real::nvmlDeviceGetMemoryInfo_v2() else {
        return unavailable(Lib::Nvml);
    };
    // SAFETY: the caller's arguments, forwarded.
    let rc = unsafe { real(device, memory) };
    if rc != NVML_SUCCESS || memory.is_null() {
        return rc;
    }
    // SAFETY: non-null, just filled by NVML.
    let m = unsafe { &mut *memory };
    if virtualise(device, &mut m.total, &mut m.used, &mut m.free) {
        m.reserved = 0; // inside the cap nothing is the driver's: see the module docs
    }
    rc
}

#[cfg(test)]
mod tests {
    use super::capped_view;

    #[test]
    fn the_capped_view_adds_up() {
        const GIB: u64 = 1 << 30;
        for (cap, charged, physical) in [
            (GIB, 300 << 20, 80 * GIB),
            (GIB, GIB, 80 * GIB),
            (GIB, 2 * GIB, 80 * GIB), // charged past the cap (a cap lowered under usage)
            (100 * GIB, GIB, 80 * GIB), // a cap above the device
            (GIB, 0, 80 * GIB),
        ] {
            let (total, used, free) = capped_view(cap, charged, physical);
            assert_eq!(used + free, total, "{cap} {charged} {physical}");
            assert_eq!(total, cap.min(physical));
            assert!(used <= charged);
        }
        assert_eq!(
            capped_view(GIB, 300 << 20, 80 * GIB),
            (GIB, 300 << 20, GIB - (300 << 20))
        );
    }
}
