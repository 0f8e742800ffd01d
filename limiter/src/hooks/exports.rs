//! The hooks layer's expansion of THE list (`driver/functions.rs`): the exported
//! `#[no_mangle] extern "C"` functions, each a panic-guarded call of its body, and
//! [`hook_address`], the address of our export for a row (what `dlsym` and `cuGetProcAddress` hand
//! out). [`bodies`] binds each exported name to its body; a row without a binding does not compile
//! (and a binding without a row is an unused import, an error under clippy's `-D warnings`).
//!
//! `intercepted` rows run inside [`guard::hook`] (the re-entry flag: a nested call goes to the real
//! function untouched); `launches`, the hot path, first try a fast path of atomic loads
//! ([`crate::policy::sm::launch::passes`]: no cap at all, or only the priority protocol with a fresh
//! mark) that jumps to the real function, and otherwise run their body inside [`guard::ffi`] only
//! (see `infra/guard.rs`).

#![allow(clippy::missing_safety_doc)] // the exports are called by C with the driver's contract

use crate::driver::ffi::*;
use crate::driver::functions::driver_functions;
use crate::driver::real::{Lib, unavailable};
use crate::driver::table::{Sym, real};
use crate::infra::guard;
use std::ffi::{c_char, c_int, c_uint, c_void};

/// Each exported name, bound to the body that implements it (the C names, so the expansion can
/// find them).
#[allow(non_snake_case)]
mod bodies {
    use crate::driver::ffi::CUresult;
    pub(super) use crate::hooks::context::{
        ctx_create_v1 as cuCtxCreate, ctx_create_v2 as cuCtxCreate_v2,
        ctx_create_v3 as cuCtxCreate_v3, ctx_create_v4 as cuCtxCreate_v4,
        ctx_destroy_v1 as cuCtxDestroy, ctx_destroy_v2 as cuCtxDestroy_v2,
        primary_release_v1 as cuDevicePrimaryCtxRelease,
        primary_release_v2 as cuDevicePrimaryCtxRelease_v2,
        primary_reset_v1 as cuDevicePrimaryCtxReset,
        primary_reset_v2 as cuDevicePrimaryCtxReset_v2, primary_retain as cuDevicePrimaryCtxRetain,
    };
    pub(super) use crate::hooks::graph::{
        add_mem_alloc_node as cuGraphAddMemAllocNode, add_mem_free_node as cuGraphAddMemFreeNode,
        graph_destroy as cuGraphDestroy, stream_end_capture as cuStreamEndCapture,
        stream_end_capture_ptsz as cuStreamEndCapture_ptsz,
    };
    pub(super) use crate::hooks::init::cu_init as cuInit;
    pub(super) use crate::hooks::launch::{
        graph_launch as cuGraphLaunch, graph_launch_ptsz as cuGraphLaunch_ptsz,
        launch_cooperative as cuLaunchCooperativeKernel,
        launch_cooperative_ptsz as cuLaunchCooperativeKernel_ptsz, launch_kernel as cuLaunchKernel,
        launch_kernel_ex as cuLaunchKernelEx, launch_kernel_ex_ptsz as cuLaunchKernelEx_ptsz,
        launch_kernel_ptsz as cuLaunchKernel_ptsz,
    };
    pub(super) use crate::hooks::meminfo::{
        device_total_mem as cuDeviceTotalMem_v2, device_total_mem_v1 as cuDeviceTotalMem,
        mem_get_info as cuMemGetInfo_v2, mem_get_info_v1 as cuMemGetInfo,
    };
    pub(super) use crate::hooks::memory::{
        array_create as cuArrayCreate_v2, array_create_v1 as cuArrayCreate,
        array_destroy as cuArrayDestroy, array3d_create as cuArray3DCreate_v2,
        array3d_create_v1 as cuArray3DCreate, mem_alloc as cuMemAlloc_v2,
        mem_alloc_async as cuMemAllocAsync, mem_alloc_async_ptsz as cuMemAllocAsync_ptsz,
        mem_alloc_from_pool as cuMemAllocFromPoolAsync,
        mem_alloc_from_pool_ptsz as cuMemAllocFromPoolAsync_ptsz,
        mem_alloc_managed as cuMemAllocManaged, mem_alloc_pitch as cuMemAllocPitch_v2,
        mem_alloc_pitch_v1 as cuMemAllocPitch, mem_alloc_v1 as cuMemAlloc,
        mem_create as cuMemCreate, mem_free as cuMemFree_v2, mem_free_async as cuMemFreeAsync,
        mem_free_async_ptsz as cuMemFreeAsync_ptsz, mem_free_v1 as cuMemFree,
        mipmapped_create as cuMipmappedArrayCreate, mipmapped_destroy as cuMipmappedArrayDestroy,
    };
    pub(super) use crate::hooks::nvml::{
        device_memory_info as nvmlDeviceGetMemoryInfo,
        device_memory_info_v2 as nvmlDeviceGetMemoryInfo_v2, init_v1 as nvmlInit,
        init_v2 as nvmlInit_v2,
    };
    use crate::hooks::procaddr;
    pub(super) use crate::hooks::vmm::{
        mem_map as cuMemMap, mem_release as cuMemRelease,
        mem_retain_allocation_handle as cuMemRetainAllocationHandle, mem_unmap as cuMemUnmap,
    };
    use std::ffi::{c_char, c_int, c_void};

    /// `cuGetProcAddress` hands out our exports, so its body is given [`super::hook_address`].
    pub(super) unsafe fn cuGetProcAddress(
        symbol: *const c_char,
        pfn: *mut *mut c_void,
        version: c_int,
        flags: u64,
    ) -> CUresult {
        // SAFETY: the caller's arguments under the driver's contract, passed on.
        unsafe { procaddr::get_proc_address(symbol, pfn, version, flags, super::hook_address) }
    }

    /// As [`cuGetProcAddress`].
    pub(super) unsafe fn cuGetProcAddress_v2(
        symbol: *const c_char,
        pfn: *mut *mut c_void,
        version: c_int,
        flags: u64,
        status: *mut c_int,
    ) -> CUresult {
        // SAFETY: the caller's arguments under the driver's contract, passed on.
        unsafe {
            procaddr::get_proc_address_v2(symbol, pfn, version, flags, status, super::hook_address)
        }
    }
}

macro_rules! exports {
    (
        intercepted {
            $( $lib:ident fn $name:ident ( $($arg:ident : $ty:ty),* $(,)? ) -> $ret:ty
                [$base:literal, $since:literal, $pt:literal]; )*
        }
        launches {
            $( $llib:ident fn $lname:ident ( $($larg:ident : $lty:ty),* $(,)? ) -> $lret:ty
                [$lbase:literal, $lsince:literal, $lpt:literal]; )*
        }
        called {
            $( $ilib:ident fn $iname:ident ( $($ity:ty),* $(,)? ) -> $iret:ty; )*
        }
    ) => {
        $(
            #[unsafe(no_mangle)]
            pub unsafe extern "C" fn $name($($arg: $ty),*) -> $ret {
                guard::hook(
                    ERROR_UNKNOWN,
                    || {
                        // SAFETY: called by C with the driver's contract for this entry point,
                        // which the body relies on exactly as the real function would.
                        unsafe { bodies::$name($($arg),*) }
                    },
                    // Re-entered from inside one of our hooks: the real function, untouched.
                    || match real::$name() {
                        // SAFETY: the caller's arguments, forwarded under the same contract.
                        Some(f) => unsafe { f($($arg),*) },
                        None => unavailable(Lib::$lib),
                    },
                )
            }
        )*

        $(
            #[unsafe(no_mangle)]
            pub unsafe extern "C" fn $lname($($larg: $lty),*) -> $lret {
                // The fast path: atomic loads (and one store) only, so nothing here can panic. One
                // call site in tail position for both paths, so the caller's arguments (five of
                // them on the stack) are passed on where they are, with a jump.
                let f = match real::ready::$lname() {
                    Some(real) if crate::policy::sm::launch::passes() => real,
                    _ => launch_slow::$lname,
                };
                // SAFETY: the caller's arguments, forwarded under the same contract (to the real
                // function, or to our guarded body).
                unsafe { f($($larg),*) }
            }
        )*

        /// The launch exports' slow path (first use, the priority gate, the SM gate): the body,
        /// panic-guarded. Out of line and of the export's own type, so the export jumps to it
        /// (or to the real function) from one call site.
        #[allow(non_snake_case)]
        mod launch_slow {
            use super::*;
            $(
                #[inline(never)]
                pub(super) unsafe extern "C" fn $lname($($larg: $lty),*) -> $lret {
                    guard::ffi(ERROR_UNKNOWN, || {
                        // SAFETY: called by C with the driver's contract for this entry point,
                        // which the body relies on exactly as the real function would.
                        unsafe { bodies::$lname($($larg),*) }
                    })
                }
            )*
        }

        /// The address of our export for row `idx`, 0 for rows we do not export.
        pub(crate) fn hook_address(idx: usize) -> usize {
            $( if idx == Sym::$name as usize { return $name as *const () as usize; } )*
            $( if idx == Sym::$lname as usize { return $lname as *const () as usize; } )*
            0
        }
    };
}

driver_functions!(exports);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::table::ENTRIES;

    #[test]
    fn every_hook_has_an_address_and_internal_rows_do_not() {
        for (i, e) in ENTRIES.iter().enumerate() {
            assert_eq!(hook_address(i) != 0, e.hooked, "{:?}", e.name);
        }
    }
}
