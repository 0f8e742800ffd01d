//! Reaching the real functions: the real `dlsym`, the driver libraries, and what a lazy per-symbol
//! slot holds (the slots themselves are `table.rs`'s `SLOTS`, one per row of the list, which this
//! file does not know about).
//!
//! Every slot is an `AtomicUsize`: 0 = not resolved yet, 1 = missing, anything else = the address.
//! Resolution happens on first use (`dlopen` + the real `dlsym`), never at load time; afterwards a
//! call costs one atomic load. Races are benign: two threads resolve the same address.

use crate::infra::imports;
use std::ffi::{CStr, c_char, c_int, c_void};
use std::sync::atomic::{AtomicUsize, Ordering};

pub(crate) const NOT_YET: usize = 0;
pub(crate) const MISSING: usize = 1;

/// Which library a symbol lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lib {
    Cuda,
    Nvml,
}

impl Lib {
    fn soname(self) -> &'static CStr {
        match self {
            Self::Cuda => c"libcuda.so.1",
            Self::Nvml => c"libnvidia-ml.so.1",
        }
    }
}

static LIB_HANDLES: [AtomicUsize; 2] = [const { AtomicUsize::new(NOT_YET) }; 2];

/// The driver library's `dlopen` handle, opened on first use (`RTLD_NOW | RTLD_NODELETE`, like
/// HAMi-core, but never `dlclose`d — HAMi-core's `dlclose(NULL)` is what crashes without a driver).
pub(crate) fn library(lib: Lib) -> Option<*mut c_void> {
    let slot = &LIB_HANDLES[lib as usize];
    match slot.load(Ordering::Acquire) {
        MISSING => None,
        NOT_YET => {
            // Without `dlopen` (glibc < 2.34 and a process that did not load libdl at start:
            // `infra/imports.rs`) the driver cannot be loaded: the same answer as no driver.
            if !imports::dl() {
                slot.store(MISSING, Ordering::Release);
                return None;
            }
            // SAFETY: the soname is NUL-terminated; dlopen has no other preconditions. A failed
            // dlopen only sets dlerror.
            let h = unsafe {
                libc::dlopen(
                    lib.soname().as_ptr(),
                    libc::RTLD_NOW | libc::RTLD_NODELETE | libc::RTLD_LOCAL,
                )
            };
            let v = if h.is_null() { MISSING } else { h as usize };
            slot.store(v, Ordering::Release);
            (v != MISSING).then_some(h)
        }
        h => Some(h as *mut c_void),
    }
}

/// Signature of `dlsym`.
pub(crate) type DlsymFn = unsafe extern "C" fn(*mut c_void, *const c_char) -> *mut c_void;

static REAL_DLSYM: AtomicUsize = AtomicUsize::new(NOT_YET);

/// Versions under which glibc has published `dlsym`: 2.34 moved it into libc (new default
/// version); 2.2.5 is the original x86_64 version, still present as a compat alias; 2.17 is the
/// aarch64 baseline.
const DLSYM_VERSIONS: [&CStr; 3] = [c"GLIBC_2.34", c"GLIBC_2.2.5", c"GLIBC_2.17"];

/// The `dlsym` that ours hides: the next definition after this library, found with
/// `dlvsym(RTLD_NEXT, "dlsym", <version>)` (we do not export `dlvsym`, so this cannot recurse).
pub(crate) fn real_dlsym_addr() -> usize {
    let v = REAL_DLSYM.load(Ordering::Acquire);
    if v > MISSING {
        return v;
    }
    if v == MISSING {
        return 0;
    }
    let mut found = MISSING;
    // Without `dlvsym` there is no real `dlsym` to find (`infra/imports.rs`): 0, and our `dlsym`
    // answers NULL.
    let versions: &[&CStr] = if imports::dl() { &DLSYM_VERSIONS } else { &[] };
    for &version in versions {
        // SAFETY: both strings are NUL-terminated; RTLD_NEXT is a valid pseudo-handle.
        let p = unsafe { libc::dlvsym(libc::RTLD_NEXT, c"dlsym".as_ptr(), version.as_ptr()) };
        if !p.is_null() {
            found = p as usize;
            break;
        }
    }
    REAL_DLSYM.store(found, Ordering::Release);
    if found == MISSING { 0 } else { found }
}

/// Calls the real `dlsym` (lookups relative to *this* library for `RTLD_NEXT`; only used with
/// explicit handles and `RTLD_DEFAULT`).
pub(crate) fn real_dlsym(handle: *mut c_void, name: &CStr) -> *mut c_void {
    let addr = real_dlsym_addr();
    if addr == 0 {
        return std::ptr::null_mut();
    }
    // SAFETY: `addr` is glibc's dlsym (found by dlvsym above), whose type is `DlsymFn`.
    let f = unsafe { std::mem::transmute::<usize, DlsymFn>(addr) };
    // SAFETY: `name` is NUL-terminated; `handle` is whatever the caller of dlsym passed or a
    // handle from dlopen, which dlsym validates itself.
    unsafe { f(handle, name.as_ptr()) }
}

/// Whether `lib` could be opened (opening it if needed).
pub(crate) fn library_present(lib: Lib) -> bool {
    library(lib).is_some()
}

/// The error a hook returns when its real function is unavailable.
pub(crate) fn unavailable(lib: Lib) -> c_int {
    use crate::driver::ffi::*;
    match (lib, library_present(lib)) {
        (Lib::Cuda, false) => CUDA_ERROR_NOT_INITIALIZED,
        (Lib::Cuda, true) => CUDA_ERROR_NOT_SUPPORTED,
        (Lib::Nvml, false) => NVML_ERROR_LIBRARY_NOT_FOUND,
        (Lib::Nvml, true) => NVML_ERROR_FUNCTION_NOT_FOUND,
    }
}
