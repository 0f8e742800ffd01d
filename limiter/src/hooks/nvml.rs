//! NVML: `nvmlInit(_v2)` start our lazy initialisation; `nvmlDeviceGetMemoryInfo(_v2)` report,
//! on a capped device, `total = min(cap, physical)`, `used = charged bytes`,
//! `free = total − used` clamped at 0 (`reserved` of v2 untouched, as in HAMi-core).
//!
//! "Charged bytes" are the container's, summed over the shared region's live slots, so
//! `nvidia-smi` in the pod sees what the other processes hold.

use crate::budget::budget;
use crate::ffi::*;
use crate::real::{Lib, unavailable};
use crate::state;
use crate::table::real;
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

/// On a capped device: `total = min(cap, physical)`, `used = charged`, `free = total − used`.
fn virtualise(device: Handle, total: &mut u64, used: &mut u64, free: &mut u64) {
    if let Some((cap, charged)) = capped(device) {
        *total = cap.min(*total);
        *used = charged;
        *free = total.saturating_sub(charged);
    }
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
    virtualise(device, &mut m.total, &mut m.used, &mut m.free);
    rc
}
