//! Every launch entry point: `cuLaunchKernel`, `cuLaunchKernelEx`, `cuLaunchCooperativeKernel`,
//! `cuGraphLaunch`, each with its per-thread-default-stream (`_ptsz`) twin. These are the bodies
//! of the exports' slow path: the exports (`hooks/exports.rs`) first jump straight to the real
//! function when [`sm::passes`] says nothing is to be done (no cap of any kind; or only the
//! priority protocol, its mark fresh and no refresh due). Here: the real function's slot (one atomic
//! load, resolved on first use), [`sm::before_launch`] (the priority protocol and the SM gate), the
//! call. No allocation, no lock.

#![allow(clippy::too_many_arguments)] // the driver's signatures

use crate::driver::ffi::{CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES, CUresult, Handle, LaunchConfig};
use crate::driver::real::{Lib, unavailable};
use crate::driver::table::real;
use crate::policy::sm::launch as sm;
use std::ffi::{c_uint, c_void};

/// Defines a hook body that runs the SM gate, then forwards its arguments unchanged.
macro_rules! gated {
    ($(#[$doc:meta])* $body:ident => $real:ident ( $($arg:ident : $ty:ty),* )) => {
        $(#[$doc])*
        // Into the export's slow path, which is its only caller (left to the compiler, it stopped
        // inlining this one after unrelated changes elsewhere: +16 instructions per SM-capped launch).
        #[inline(always)]
        pub(crate) unsafe fn $body($($arg: $ty),*) -> CUresult {
            match real::$real() {
                // Refused when the device's cap cannot be enforced (`sm::before_launch`).
                Some(_) if !sm::before_launch() => CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES,
                // SAFETY: forwarding the caller's arguments unchanged.
                Some(real) => unsafe { real($($arg),*) },
                None => unavailable(Lib::Cuda),
            }
        }
    };
}

gated!(launch_kernel => cuLaunchKernel(f: Handle, gx: c_uint, gy: c_uint, gz: c_uint, bx: c_uint,
    by: c_uint, bz: c_uint, shmem: c_uint, stream: Handle, params: *mut *mut c_void,
    extra: *mut *mut c_void));
gated!(launch_kernel_ptsz => cuLaunchKernel_ptsz(f: Handle, gx: c_uint, gy: c_uint, gz: c_uint,
    bx: c_uint, by: c_uint, bz: c_uint, shmem: c_uint, stream: Handle, params: *mut *mut c_void,
    extra: *mut *mut c_void));
gated!(launch_kernel_ex => cuLaunchKernelEx(config: *const LaunchConfig, f: Handle,
    params: *mut *mut c_void, extra: *mut *mut c_void));
gated!(launch_kernel_ex_ptsz => cuLaunchKernelEx_ptsz(config: *const LaunchConfig, f: Handle,
    params: *mut *mut c_void, extra: *mut *mut c_void));
gated!(launch_cooperative => cuLaunchCooperativeKernel(f: Handle, gx: c_uint, gy: c_uint,
    gz: c_uint, bx: c_uint, by: c_uint, bz: c_uint, shmem: c_uint, stream: Handle,
    params: *mut *mut c_void));
gated!(launch_cooperative_ptsz => cuLaunchCooperativeKernel_ptsz(f: Handle, gx: c_uint,
    gy: c_uint, gz: c_uint, bx: c_uint, by: c_uint, bz: c_uint, shmem: c_uint, stream: Handle,
    params: *mut *mut c_void));
gated!(
    /// A graph launch is one launch to the gate: its cost is the device time it is measured to take,
    /// like any kernel's, so graphs are capped like everything else (HAMi#1445).
    graph_launch => cuGraphLaunch(exec: Handle, stream: Handle));
gated!(graph_launch_ptsz => cuGraphLaunch_ptsz(exec: Handle, stream: Handle));
