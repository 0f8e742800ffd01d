//! Bodies of the exported hooks (the table in [`crate::table`] wires names to these).
//!
//! Every body takes the exact C arguments and is `unsafe`: the caller's pointers are trusted as
//! the real driver would trust them.

pub(crate) mod context;
pub(crate) mod graph;
pub(crate) mod init;
pub(crate) mod launch;
pub(crate) mod meminfo;
pub(crate) mod memory;
pub(crate) mod nvml;
pub(crate) mod procaddr;

use crate::devices;
use crate::ffi::{CUDA_SUCCESS, CUdevice};
use crate::table::real;

/// The container device index of the current context's device; `None` without a context.
pub(crate) fn current_device() -> Option<usize> {
    let f = real::cuCtxGetDevice()?;
    let mut dev: CUdevice = 0;
    // SAFETY: `dev` is a valid out-pointer.
    if unsafe { f(&mut dev) } != CUDA_SUCCESS {
        return None;
    }
    devices::container_index(dev)
}
