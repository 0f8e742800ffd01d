//! `cuLaunchKernel` and its per-thread-default-stream twin: the hot path. One atomic load and a
//! call; no initialisation check, no allocation, no lock. (The SM limiter will hook in here.)

#![allow(clippy::too_many_arguments)] // the driver's signature

use crate::ffi::{CUresult, Handle};
use crate::real::{Lib, unavailable};
use crate::table::real;
use std::ffi::{c_uint, c_void};

pub(crate) unsafe fn launch_kernel(
    f: Handle,
    gx: c_uint,
    gy: c_uint,
    gz: c_uint,
    bx: c_uint,
    by: c_uint,
    bz: c_uint,
    shmem: c_uint,
    stream: Handle,
    params: *mut *mut c_void,
    extra: *mut *mut c_void,
) -> CUresult {
    match real::cuLaunchKernel() {
        // SAFETY: forwarding the caller's arguments unchanged.
        Some(real) => unsafe { real(f, gx, gy, gz, bx, by, bz, shmem, stream, params, extra) },
        None => unavailable(Lib::Cuda),
    }
}

pub(crate) unsafe fn launch_kernel_ptsz(
    f: Handle,
    gx: c_uint,
    gy: c_uint,
    gz: c_uint,
    bx: c_uint,
    by: c_uint,
    bz: c_uint,
    shmem: c_uint,
    stream: Handle,
    params: *mut *mut c_void,
    extra: *mut *mut c_void,
) -> CUresult {
    match real::cuLaunchKernel_ptsz() {
        // SAFETY: forwarding the caller's arguments unchanged.
        Some(real) => unsafe { real(f, gx, gy, gz, bx, by, bz, shmem, stream, params, extra) },
        None => unavailable(Lib::Cuda),
    }
}
