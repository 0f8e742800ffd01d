//! `cuInit`: the usual first CUDA call, so it triggers our lazy initialisation.

use crate::driver::ffi::CUresult;
use crate::driver::real::{Lib, unavailable};
use crate::driver::table::real;
use crate::policy::state;
use std::ffi::c_uint;

/// With the test-only feature `panic-probe`, `cuInit` with these flags panics (`tests/panic_probe.rs`).
#[cfg(feature = "panic-probe")]
const PANIC_PROBE: c_uint = 0x7061_6e63;

pub(crate) unsafe fn cu_init(flags: c_uint) -> CUresult {
    #[cfg(feature = "panic-probe")]
    assert_ne!(flags, PANIC_PROBE, "panic probe");
    state::ensure();
    match real::cuInit() {
        // SAFETY: forwarding the caller's arguments to the real function.
        Some(f) => unsafe { f(flags) },
        None => unavailable(Lib::Cuda),
    }
}
