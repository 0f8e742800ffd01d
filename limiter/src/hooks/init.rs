//! `cuInit`: the usual first CUDA call, so it triggers our lazy initialisation.

use crate::driver::ffi::CUresult;
use crate::driver::real::{Lib, unavailable};
use crate::driver::table::real;
use crate::policy::state;
use std::ffi::c_uint;

pub(crate) unsafe fn cu_init(flags: c_uint) -> CUresult {
    state::ensure();
    match real::cuInit() {
        // SAFETY: forwarding the caller's arguments to the real function.
        Some(f) => unsafe { f(flags) },
        None => unavailable(Lib::Cuda),
    }
}
