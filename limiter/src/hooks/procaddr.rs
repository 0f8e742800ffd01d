//! `cuGetProcAddress` (CUDA 11.3+) and `cuGetProcAddress_v2` (12.0+): how the CUDA runtime reaches
//! the driver, so hooks must come back from here too.
//!
//! The real function is always called first, with the caller's name, version, flags (and status
//! pointer), so the driver decides which ABI the caller gets. Then, if the name is the base name
//! of any of our rows, the returned address is matched against the real addresses of those rows
//! (`cuMemAlloc` → `cuMemAlloc` or `cuMemAlloc_v2`; `cuLaunchKernel` → `cuLaunchKernel` or
//! `cuLaunchKernel_ptsz`; …): the row whose real function *is* that address gives the hook with
//! the identical ABI. Only if the driver returns an address that is none of its exports do we fall
//! back to the documented mapping: the newest row with `since <= cudaVersion`, the `_ptsz` row iff
//! `CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM` was requested. Names we do not hook, and
//! failed lookups, are returned untouched.

use crate::driver::ffi::*;
use crate::driver::real::{Lib, unavailable};
use crate::driver::table::{ENTRIES, resolve};
use crate::infra::log::{DEBUG, log_at};
use std::ffi::{CStr, c_char, c_int, c_void};

pub(crate) unsafe fn get_proc_address(
    symbol: *const c_char,
    pfn: *mut *mut c_void,
    version: c_int,
    flags: u64,
    hook_address: fn(usize) -> usize,
) -> CUresult {
    let Some(real) = crate::driver::table::real::cuGetProcAddress() else {
        return unavailable(Lib::Cuda);
    };
    // SAFETY: the caller's arguments, forwarded.
    let rc = unsafe { real(symbol, pfn, version, flags) };
    // SAFETY: same pointers the driver just accepted.
    unsafe { substitute(rc, symbol, pfn, version, flags, hook_address) };
    rc
}

pub(crate) unsafe fn get_proc_address_v2(
    symbol: *const c_char,
    pfn: *mut *mut c_void,
    version: c_int,
    flags: u64,
    status: *mut c_int,
    hook_address: fn(usize) -> usize,
) -> CUresult {
    let Some(real) = crate::driver::table::real::cuGetProcAddress_v2() else {
        return unavailable(Lib::Cuda);
    };
    // SAFETY: the caller's arguments, forwarded.
    let rc = unsafe { real(symbol, pfn, version, flags, status) };
    // SAFETY: same pointers the driver just accepted.
    unsafe { substitute(rc, symbol, pfn, version, flags, hook_address) };
    rc
}

/// Replaces `*pfn` by our hook when the driver returned one of the functions we intercept.
///
/// # Safety
/// `symbol` must be null or a C string, `pfn` null or valid for reads and writes.
unsafe fn substitute(
    rc: CUresult,
    symbol: *const c_char,
    pfn: *mut *mut c_void,
    version: c_int,
    flags: u64,
    hook_address: fn(usize) -> usize,
) {
    if rc != CUDA_SUCCESS || symbol.is_null() || pfn.is_null() {
        return;
    }
    // SAFETY: non-null C string from the caller.
    let name = unsafe { CStr::from_ptr(symbol) }.to_bytes();
    // SAFETY: non-null, just written by the driver.
    let found = unsafe { *pfn } as usize;
    if found == 0 {
        return;
    }
    if let Some(hook) = choose(name, found, version, flags, resolve, hook_address) {
        log_at!(
            DEBUG,
            "cuGetProcAddress({}, {version}, {flags}) -> hook",
            String::from_utf8_lossy(name)
        );
        // SAFETY: non-null out-pointer (checked above).
        unsafe { *pfn = hook as *mut c_void };
    }
}

/// The hook to hand out for `name`, given the driver's answer `found`; `resolve(row)` gives the
/// real address of a row (0 = missing), `hook_address(row)` the address of our export.
pub(crate) fn choose(
    name: &[u8],
    found: usize,
    version: c_int,
    flags: u64,
    resolve: impl Fn(usize) -> usize,
    hook_address: impl Fn(usize) -> usize,
) -> Option<usize> {
    let rows = || {
        ENTRIES.iter().enumerate().filter(|(_, e)| {
            e.hooked
                && e.lib == Lib::Cuda
                && (e.base.as_bytes() == name || e.name.to_bytes() == name)
        })
    };
    rows().next()?;
    if let Some((i, _)) = rows().find(|&(i, _)| resolve(i) == found) {
        return Some(hook_address(i));
    }
    let per_thread = flags & CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM != 0;
    let newest = |pt: bool| {
        rows()
            .filter(|(_, e)| e.per_thread == pt && e.since <= version)
            .max_by_key(|(_, e)| e.since)
    };
    let row = if per_thread {
        newest(true).or_else(|| newest(false))
    } else {
        newest(false)
    };
    row.map(|(i, _)| hook_address(i))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::table::Sym;

    /// Our pretend exports live at 0x9000 + row.
    fn hook_address(i: usize) -> usize {
        0x9000 + i
    }

    /// A pretend driver whose exports live at 0x1000 + row.
    fn fake_real(i: usize) -> usize {
        0x1000 + i
    }

    #[test]
    fn identity_match_picks_the_row_with_the_same_abi() {
        let v1 = Sym::cuMemAlloc as usize;
        let v2 = Sym::cuMemAlloc_v2 as usize;
        assert_eq!(
            choose(
                b"cuMemAlloc",
                fake_real(v1),
                12000,
                0,
                fake_real,
                hook_address
            ),
            Some(hook_address(v1))
        );
        assert_eq!(
            choose(
                b"cuMemAlloc",
                fake_real(v2),
                3020,
                0,
                fake_real,
                hook_address
            ),
            Some(hook_address(v2))
        );
        let pt = Sym::cuLaunchKernel_ptsz as usize;
        assert_eq!(
            choose(
                b"cuLaunchKernel",
                fake_real(pt),
                12000,
                0,
                fake_real,
                hook_address
            ),
            Some(hook_address(pt))
        );
    }

    #[test]
    fn unknown_address_falls_back_to_version_and_flags() {
        let internal = 0xdead_0000;
        let h = |s: Sym| Some(hook_address(s as usize));
        assert_eq!(
            choose(b"cuMemAlloc", internal, 3010, 0, fake_real, hook_address),
            h(Sym::cuMemAlloc)
        );
        assert_eq!(
            choose(b"cuMemAlloc", internal, 12000, 0, fake_real, hook_address),
            h(Sym::cuMemAlloc_v2)
        );
        assert_eq!(
            choose(
                b"cuLaunchKernel",
                internal,
                12000,
                CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM,
                fake_real,
                hook_address
            ),
            h(Sym::cuLaunchKernel_ptsz)
        );
        assert_eq!(
            choose(
                b"cuMemCreate",
                internal,
                12000,
                CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM,
                fake_real,
                hook_address
            ),
            h(Sym::cuMemCreate)
        );
        assert_eq!(
            choose(
                b"cuGetProcAddress",
                internal,
                11030,
                0,
                fake_real,
                hook_address
            ),
            h(Sym::cuGetProcAddress)
        );
        assert_eq!(
            choose(
                b"cuGetProcAddress",
                internal,
                12040,
                0,
                fake_real,
                hook_address
            ),
            h(Sym::cuGetProcAddress_v2)
        );
        assert_eq!(
            choose(
                b"cuMemAllocAsync",
                internal,
                11000,
                0,
                fake_real,
                hook_address
            ),
            None,
            "too old for that ABI"
        );
    }

    #[test]
    fn names_we_do_not_hook_are_left_alone_and_exact_names_work() {
        assert_eq!(
            choose(b"cuMemcpy", 0x1234, 12000, 0, fake_real, hook_address),
            None
        );
        assert_eq!(
            choose(b"cuMemAlloc_v2", 0x1234, 12000, 0, fake_real, hook_address),
            Some(hook_address(Sym::cuMemAlloc_v2 as usize)),
            "an exact versioned name maps to its own row"
        );
        assert_eq!(
            choose(b"nvmlInit", 0x1234, 12000, 0, fake_real, hook_address),
            None
        );
    }
}
