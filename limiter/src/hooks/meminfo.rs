//! Virtualised memory queries. On a capped device: `total = min(cap, physical total)`,
//! `used = the container's charged bytes (shared region)`, `free = min(total − used, physical free)` clamped at 0 (never the
//! underflow of HAMi-core#200). The real function is always called first, so its errors (no
//! context, bad device) reach the caller unchanged. Uncapped devices pass through.

use crate::driver::ffi::*;
use crate::driver::real::{Lib, unavailable};
use crate::driver::table::real;
use crate::policy::budget::budget;
use crate::policy::devices;
use crate::policy::devices::current_device;
use crate::policy::state;
use std::ffi::c_uint;

/// `(free, total)` as the container should see them on `dev`, given the physical values.
fn virtual_info(dev: Option<usize>, free: u64, total: u64) -> (u64, u64) {
    let b = budget();
    match dev.and_then(|d| Some((d, b.limit(d)?))) {
        Some((d, cap)) => capped_info(cap, b.usage(d), free, total),
        None => (free, total),
    }
}

/// `(free, total)` on a device capped at `cap` with `used` bytes charged, given the physical values.
fn capped_info(cap: u64, used: u64, free: u64, total: u64) -> (u64, u64) {
    let total = cap.min(total);
    (total.saturating_sub(used).min(free), total)
}

pub(crate) unsafe fn mem_get_info(free: *mut usize, total: *mut usize) -> CUresult {
    let Some(real) = real::cuMemGetInfo_v2() else {
        return unavailable(Lib::Cuda);
    };
    // SAFETY: the caller's arguments, forwarded.
    let rc = unsafe { real(free, total) };
    if rc != CUDA_SUCCESS || free.is_null() || total.is_null() {
        return rc;
    }
    state::ensure();
    if !budget().any_limit() {
        return rc;
    }
    // SAFETY: both pointers are non-null and were just written by the driver.
    unsafe {
        let (f, t) = virtual_info(current_device(), *free as u64, *total as u64);
        *free = f as usize;
        *total = t as usize;
    }
    rc
}

pub(crate) unsafe fn mem_get_info_v1(free: *mut c_uint, total: *mut c_uint) -> CUresult {
    let Some(real) = real::cuMemGetInfo() else {
        return unavailable(Lib::Cuda);
    };
    // SAFETY: the caller's arguments, forwarded.
    let rc = unsafe { real(free, total) };
    if rc != CUDA_SUCCESS || free.is_null() || total.is_null() {
        return rc;
    }
    state::ensure();
    if !budget().any_limit() {
        return rc;
    }
    // SAFETY: both pointers are non-null and were just written by the driver.
    unsafe {
        let (f, t) = virtual_info(current_device(), (*free).into(), (*total).into());
        *free = c_uint::try_from(f).unwrap_or(c_uint::MAX);
        *total = c_uint::try_from(t).unwrap_or(c_uint::MAX);
    }
    rc
}

pub(crate) unsafe fn device_total_mem(bytes: *mut usize, dev: CUdevice) -> CUresult {
    let Some(real) = real::cuDeviceTotalMem_v2() else {
        return unavailable(Lib::Cuda);
    };
    // SAFETY: the caller's arguments, forwarded.
    let rc = unsafe { real(bytes, dev) };
    if rc != CUDA_SUCCESS || bytes.is_null() {
        return rc;
    }
    state::ensure();
    if let Some(cap) = devices::container_index(dev).and_then(|d| budget().limit(d)) {
        // SAFETY: non-null, just written by the driver.
        unsafe { *bytes = (*bytes).min(usize::try_from(cap).unwrap_or(usize::MAX)) };
    }
    rc
}

pub(crate) unsafe fn device_total_mem_v1(bytes: *mut c_uint, dev: CUdevice) -> CUresult {
    let Some(real) = real::cuDeviceTotalMem() else {
        return unavailable(Lib::Cuda);
    };
    // SAFETY: the caller's arguments, forwarded.
    let rc = unsafe { real(bytes, dev) };
    if rc != CUDA_SUCCESS || bytes.is_null() {
        return rc;
    }
    state::ensure();
    if let Some(cap) = devices::container_index(dev).and_then(|d| budget().limit(d)) {
        // SAFETY: non-null, just written by the driver.
        unsafe { *bytes = (*bytes).min(c_uint::try_from(cap).unwrap_or(c_uint::MAX)) };
    }
    rc
}

#[cfg(test)]
mod tests {
    use super::capped_info;

    #[test]
    fn free_never_underflows_and_total_is_the_cap() {
        let (cap, used, phys_free) = (100u64, 150u64, 1000u64);
        assert_eq!(capped_info(cap, used, phys_free, 80_000), (0, cap));
        assert_eq!(capped_info(cap, 30, phys_free, 80_000), (70, cap));
    }

    #[test]
    fn physical_values_bound_the_virtual_ones() {
        // Less physically free than the cap leaves: the physical free wins.
        assert_eq!(capped_info(100, 30, 50, 80_000), (50, 100));
        // A cap above the device's memory: the physical total wins.
        assert_eq!(capped_info(1_000, 0, 500, 800), (500, 800));
    }
}
