//! THE symbol table: one row per intercepted entry point, and one per driver function the library
//! only calls. The [`interpose!`] macro turns it into
//!
//! * the exported `#[no_mangle] extern "C"` hooks (each a panic-guarded call of its body),
//! * [`ENTRIES`]: name, library and `cuGetProcAddress` facts (base name, first CUDA version,
//!   per-thread-default-stream variant) — what `dlsym` and `cuGetProcAddress` consult,
//! * [`SLOTS`]: the lazily resolved real addresses, and typed accessors in [`real`],
//! * [`hook_address`]: the address of our export for a row.
//!
//! Adding a hook is one row here plus its body.

#![allow(clippy::missing_safety_doc)] // the exports are called by C with the driver's contract

use crate::ffi::*;
use crate::hooks::{context, graph, init, launch, meminfo, memory, nvml, procaddr};
use crate::real::Lib;
use std::ffi::{CStr, c_char, c_int, c_uint, c_void};
use std::sync::atomic::AtomicUsize;

/// One row of the table.
#[derive(Debug)]
pub(crate) struct Entry {
    /// Exported / resolved symbol name.
    pub(crate) name: &'static CStr,
    pub(crate) lib: Lib,
    /// `true` for rows we export; `false` for functions we only call.
    pub(crate) hooked: bool,
    /// The name `cuGetProcAddress` callers ask for (no `_v2`/`_ptsz` suffix); empty for NVML
    /// and internal rows.
    pub(crate) base: &'static str,
    /// The first `cudaVersion` (1000 × major + 10 × minor) for which `cuGetProcAddress(base)`
    /// returns this ABI.
    pub(crate) since: c_int,
    /// A per-thread-default-stream (`_ptsz`/`_ptds`) variant.
    pub(crate) per_thread: bool,
}

const fn cstr(bytes: &'static [u8]) -> &'static CStr {
    match CStr::from_bytes_with_nul(bytes) {
        Ok(c) => c,
        Err(_) => panic!("symbol name with an interior NUL"),
    }
}

macro_rules! interpose {
    (
        hooks {
            $( $lib:ident fn $name:ident ( $($arg:ident : $ty:ty),* $(,)? ) -> $ret:ty
                [$base:literal, $since:literal, $pt:literal] => $body:path; )*
        }
        launches {
            $( $llib:ident fn $lname:ident ( $($larg:ident : $lty:ty),* $(,)? ) -> $lret:ty
                [$lbase:literal, $lsince:literal, $lpt:literal] => $lbody:path; )*
        }
        calls {
            $( $ilib:ident fn $iname:ident ( $($ity:ty),* $(,)? ) -> $iret:ty; )*
        }
    ) => {
        /// Row indices.
        #[allow(non_camel_case_types, dead_code)]
        #[derive(Debug, Clone, Copy)]
        #[repr(usize)]
        pub(crate) enum Sym { $($name,)* $($lname,)* $($iname,)* }

        pub(crate) static ENTRIES: &[Entry] = &[
            $( Entry {
                name: cstr(concat!(stringify!($name), "\0").as_bytes()),
                lib: Lib::$lib,
                hooked: true,
                base: $base,
                since: $since,
                per_thread: $pt,
            }, )*
            $( Entry {
                name: cstr(concat!(stringify!($lname), "\0").as_bytes()),
                lib: Lib::$llib,
                hooked: true,
                base: $lbase,
                since: $lsince,
                per_thread: $lpt,
            }, )*
            $( Entry {
                name: cstr(concat!(stringify!($iname), "\0").as_bytes()),
                lib: Lib::$ilib,
                hooked: false,
                base: "",
                since: 0,
                per_thread: false,
            }, )*
        ];

        const COUNT: usize =
            [$(stringify!($name),)* $(stringify!($lname),)* $(stringify!($iname),)*].len();

        /// Real addresses: 0 = not resolved yet, 1 = missing, else the address.
        pub(crate) static SLOTS: [AtomicUsize; COUNT] = [const { AtomicUsize::new(0) }; COUNT];

        /// Typed access to the real functions (resolved on first use; `None` when missing).
        #[allow(non_snake_case, dead_code)]
        pub(crate) mod real {
            use super::*;
            $(
                #[inline]
                pub(crate) fn $name() -> Option<unsafe extern "C" fn($($ty),*) -> $ret> {
                    let addr = crate::real::resolve(Sym::$name as usize);
                    // SAFETY: a non-zero address was returned by dlsym for exactly this name,
                    // whose C prototype is the one declared in the table row.
                    (addr != 0).then(|| unsafe {
                        std::mem::transmute::<usize, unsafe extern "C" fn($($ty),*) -> $ret>(addr)
                    })
                }
            )*
            $(
                #[inline]
                pub(crate) fn $lname() -> Option<unsafe extern "C" fn($($lty),*) -> $lret> {
                    let addr = crate::real::resolve(Sym::$lname as usize);
                    // SAFETY: as above — dlsym's address for this name and declared prototype.
                    (addr != 0).then(|| unsafe {
                        std::mem::transmute::<usize, unsafe extern "C" fn($($lty),*) -> $lret>(addr)
                    })
                }
            )*
            $(
                #[inline]
                pub(crate) fn $iname() -> Option<unsafe extern "C" fn($($ity),*) -> $iret> {
                    let addr = crate::real::resolve(Sym::$iname as usize);
                    // SAFETY: as above — dlsym's address for this name and declared prototype.
                    (addr != 0).then(|| unsafe {
                        std::mem::transmute::<usize, unsafe extern "C" fn($($ity),*) -> $iret>(addr)
                    })
                }
            )*
        }

        $(
            #[unsafe(no_mangle)]
            pub unsafe extern "C" fn $name($($arg: $ty),*) -> $ret {
                crate::guard::hook(
                    ERROR_UNKNOWN,
                    || {
                        // SAFETY: called by C with the driver's contract for this entry point,
                        // which the body relies on exactly as the real function would.
                        unsafe { $body($($arg),*) }
                    },
                    // Re-entered from inside one of our hooks: the real function, untouched.
                    || match real::$name() {
                        // SAFETY: the caller's arguments, forwarded under the same contract.
                        Some(f) => unsafe { f($($arg),*) },
                        None => crate::real::unavailable(Lib::$lib),
                    },
                )
            }
        )*

        $(
            #[unsafe(no_mangle)]
            pub unsafe extern "C" fn $lname($($larg: $lty),*) -> $lret {
                crate::guard::ffi(ERROR_UNKNOWN, || {
                    // SAFETY: called by C with the driver's contract for this entry point, which
                    // the body relies on exactly as the real function would.
                    unsafe { $lbody($($larg),*) }
                })
            }
        )*

        /// The address of our export for row `idx`, 0 for rows we do not export.
        pub(crate) fn hook_address(idx: usize) -> usize {
            $( if idx == Sym::$name as usize { return $name as *const () as usize; } )*
            $( if idx == Sym::$lname as usize { return $lname as *const () as usize; } )*
            0
        }
    };
}

interpose! {
    hooks {
        Cuda fn cuInit(flags: c_uint) -> CUresult ["cuInit", 2000, false] => init::cu_init;

        Cuda fn cuMemAlloc(dptr: *mut CUdeviceptrV1, bytesize: c_uint) -> CUresult
            ["cuMemAlloc", 2000, false] => memory::mem_alloc_v1;
        Cuda fn cuMemAlloc_v2(dptr: *mut CUdeviceptr, bytesize: usize) -> CUresult
            ["cuMemAlloc", 3020, false] => memory::mem_alloc;
        Cuda fn cuMemFree(dptr: CUdeviceptrV1) -> CUresult
            ["cuMemFree", 2000, false] => memory::mem_free_v1;
        Cuda fn cuMemFree_v2(dptr: CUdeviceptr) -> CUresult
            ["cuMemFree", 3020, false] => memory::mem_free;
        Cuda fn cuMemAllocPitch(dptr: *mut CUdeviceptrV1, pitch: *mut c_uint, width: c_uint,
                height: c_uint, elem: c_uint) -> CUresult
            ["cuMemAllocPitch", 2000, false] => memory::mem_alloc_pitch_v1;
        Cuda fn cuMemAllocPitch_v2(dptr: *mut CUdeviceptr, pitch: *mut usize, width: usize,
                height: usize, elem: c_uint) -> CUresult
            ["cuMemAllocPitch", 3020, false] => memory::mem_alloc_pitch;
        Cuda fn cuMemAllocManaged(dptr: *mut CUdeviceptr, bytesize: usize, flags: c_uint) -> CUresult
            ["cuMemAllocManaged", 6000, false] => memory::mem_alloc_managed;
        Cuda fn cuMemAllocAsync(dptr: *mut CUdeviceptr, bytesize: usize, stream: Handle) -> CUresult
            ["cuMemAllocAsync", 11020, false] => memory::mem_alloc_async;
        Cuda fn cuMemAllocAsync_ptsz(dptr: *mut CUdeviceptr, bytesize: usize, stream: Handle)
                -> CUresult
            ["cuMemAllocAsync", 11020, true] => memory::mem_alloc_async_ptsz;
        Cuda fn cuMemFreeAsync(dptr: CUdeviceptr, stream: Handle) -> CUresult
            ["cuMemFreeAsync", 11020, false] => memory::mem_free_async;
        Cuda fn cuMemFreeAsync_ptsz(dptr: CUdeviceptr, stream: Handle) -> CUresult
            ["cuMemFreeAsync", 11020, true] => memory::mem_free_async_ptsz;
        Cuda fn cuMemAllocFromPoolAsync(dptr: *mut CUdeviceptr, bytesize: usize, pool: Handle,
                stream: Handle) -> CUresult
            ["cuMemAllocFromPoolAsync", 11020, false] => memory::mem_alloc_from_pool;
        Cuda fn cuMemAllocFromPoolAsync_ptsz(dptr: *mut CUdeviceptr, bytesize: usize, pool: Handle,
                stream: Handle) -> CUresult
            ["cuMemAllocFromPoolAsync", 11020, true] => memory::mem_alloc_from_pool_ptsz;
        Cuda fn cuMemCreate(handle: *mut CUmemGenericAllocationHandle, size: usize,
                prop: *const CUmemAllocationPropHead, flags: u64) -> CUresult
            ["cuMemCreate", 10020, false] => memory::mem_create;
        Cuda fn cuMemRelease(handle: CUmemGenericAllocationHandle) -> CUresult
            ["cuMemRelease", 10020, false] => memory::mem_release;

        Cuda fn cuCtxCreate(pctx: *mut Handle, flags: c_uint, dev: CUdevice) -> CUresult
            ["cuCtxCreate", 2000, false] => context::ctx_create_v1;
        Cuda fn cuCtxCreate_v2(pctx: *mut Handle, flags: c_uint, dev: CUdevice) -> CUresult
            ["cuCtxCreate", 3020, false] => context::ctx_create_v2;
        Cuda fn cuCtxCreate_v3(pctx: *mut Handle, params: *mut c_void, num: c_int, flags: c_uint,
                dev: CUdevice) -> CUresult
            ["cuCtxCreate", 11040, false] => context::ctx_create_v3;
        Cuda fn cuCtxCreate_v4(pctx: *mut Handle, params: *mut c_void, flags: c_uint,
                dev: CUdevice) -> CUresult
            ["cuCtxCreate", 12050, false] => context::ctx_create_v4;
        Cuda fn cuCtxDestroy(ctx: Handle) -> CUresult
            ["cuCtxDestroy", 2000, false] => context::ctx_destroy_v1;
        Cuda fn cuCtxDestroy_v2(ctx: Handle) -> CUresult
            ["cuCtxDestroy", 4000, false] => context::ctx_destroy_v2;
        Cuda fn cuDevicePrimaryCtxRetain(pctx: *mut Handle, dev: CUdevice) -> CUresult
            ["cuDevicePrimaryCtxRetain", 7000, false] => context::primary_retain;
        Cuda fn cuDevicePrimaryCtxRelease(dev: CUdevice) -> CUresult
            ["cuDevicePrimaryCtxRelease", 7000, false] => context::primary_release_v1;
        Cuda fn cuDevicePrimaryCtxRelease_v2(dev: CUdevice) -> CUresult
            ["cuDevicePrimaryCtxRelease", 11000, false] => context::primary_release_v2;
        Cuda fn cuDevicePrimaryCtxReset(dev: CUdevice) -> CUresult
            ["cuDevicePrimaryCtxReset", 7000, false] => context::primary_reset_v1;
        Cuda fn cuDevicePrimaryCtxReset_v2(dev: CUdevice) -> CUresult
            ["cuDevicePrimaryCtxReset", 11000, false] => context::primary_reset_v2;

        Cuda fn cuGraphAddMemAllocNode(node: *mut Handle, graph: Handle, deps: *const Handle,
                ndeps: usize, params: *mut MemAllocNodeParams) -> CUresult
            ["cuGraphAddMemAllocNode", 11040, false] => graph::add_mem_alloc_node;
        Cuda fn cuGraphAddMemFreeNode(node: *mut Handle, graph: Handle, deps: *const Handle,
                ndeps: usize, dptr: CUdeviceptr) -> CUresult
            ["cuGraphAddMemFreeNode", 11040, false] => graph::add_mem_free_node;
        Cuda fn cuGraphDestroy(graph: Handle) -> CUresult
            ["cuGraphDestroy", 10000, false] => graph::graph_destroy;
        Cuda fn cuStreamEndCapture(stream: Handle, graph: *mut Handle) -> CUresult
            ["cuStreamEndCapture", 10000, false] => graph::stream_end_capture;
        Cuda fn cuStreamEndCapture_ptsz(stream: Handle, graph: *mut Handle) -> CUresult
            ["cuStreamEndCapture", 10000, true] => graph::stream_end_capture_ptsz;

        Cuda fn cuArrayCreate(array: *mut Handle, desc: *const ArrayDescriptorV1) -> CUresult
            ["cuArrayCreate", 2000, false] => memory::array_create_v1;
        Cuda fn cuArrayCreate_v2(array: *mut Handle, desc: *const ArrayDescriptor) -> CUresult
            ["cuArrayCreate", 3020, false] => memory::array_create;
        Cuda fn cuArray3DCreate(array: *mut Handle, desc: *const Array3DDescriptorV1) -> CUresult
            ["cuArray3DCreate", 2000, false] => memory::array3d_create_v1;
        Cuda fn cuArray3DCreate_v2(array: *mut Handle, desc: *const Array3DDescriptor) -> CUresult
            ["cuArray3DCreate", 3020, false] => memory::array3d_create;
        Cuda fn cuArrayDestroy(array: Handle) -> CUresult
            ["cuArrayDestroy", 2000, false] => memory::array_destroy;
        Cuda fn cuMipmappedArrayCreate(array: *mut Handle, desc: *const Array3DDescriptor,
                levels: c_uint) -> CUresult
            ["cuMipmappedArrayCreate", 5000, false] => memory::mipmapped_create;
        Cuda fn cuMipmappedArrayDestroy(array: Handle) -> CUresult
            ["cuMipmappedArrayDestroy", 5000, false] => memory::mipmapped_destroy;

        Cuda fn cuMemGetInfo(free: *mut c_uint, total: *mut c_uint) -> CUresult
            ["cuMemGetInfo", 2000, false] => meminfo::mem_get_info_v1;
        Cuda fn cuMemGetInfo_v2(free: *mut usize, total: *mut usize) -> CUresult
            ["cuMemGetInfo", 3020, false] => meminfo::mem_get_info;
        Cuda fn cuDeviceTotalMem(bytes: *mut c_uint, dev: CUdevice) -> CUresult
            ["cuDeviceTotalMem", 2000, false] => meminfo::device_total_mem_v1;
        Cuda fn cuDeviceTotalMem_v2(bytes: *mut usize, dev: CUdevice) -> CUresult
            ["cuDeviceTotalMem", 3020, false] => meminfo::device_total_mem;

        Cuda fn cuGetProcAddress(symbol: *const c_char, pfn: *mut *mut c_void, version: c_int,
                flags: u64) -> CUresult
            ["cuGetProcAddress", 11030, false] => procaddr::get_proc_address;
        Cuda fn cuGetProcAddress_v2(symbol: *const c_char, pfn: *mut *mut c_void, version: c_int,
                flags: u64, status: *mut c_int) -> CUresult
            ["cuGetProcAddress", 12000, false] => procaddr::get_proc_address_v2;

        Nvml fn nvmlInit() -> NvmlReturn ["", 0, false] => nvml::init_v1;
        Nvml fn nvmlInit_v2() -> NvmlReturn ["", 0, false] => nvml::init_v2;
        Nvml fn nvmlDeviceGetMemoryInfo(device: Handle, memory: *mut NvmlMemory) -> NvmlReturn
            ["", 0, false] => nvml::device_memory_info;
        Nvml fn nvmlDeviceGetMemoryInfo_v2(device: Handle, memory: *mut NvmlMemoryV2) -> NvmlReturn
            ["", 0, false] => nvml::device_memory_info_v2;
    }
    // The hot path: no re-entry flag (see `guard`); the SM gate's slow paths detect re-entry.
    launches {
        Cuda fn cuLaunchKernel(f: Handle, gx: c_uint, gy: c_uint, gz: c_uint, bx: c_uint,
                by: c_uint, bz: c_uint, shmem: c_uint, stream: Handle,
                params: *mut *mut c_void, extra: *mut *mut c_void) -> CUresult
            ["cuLaunchKernel", 4000, false] => launch::launch_kernel;
        Cuda fn cuLaunchKernel_ptsz(f: Handle, gx: c_uint, gy: c_uint, gz: c_uint, bx: c_uint,
                by: c_uint, bz: c_uint, shmem: c_uint, stream: Handle,
                params: *mut *mut c_void, extra: *mut *mut c_void) -> CUresult
            ["cuLaunchKernel", 7000, true] => launch::launch_kernel_ptsz;
        Cuda fn cuLaunchKernelEx(config: *const launch::LaunchConfig, f: Handle,
                params: *mut *mut c_void, extra: *mut *mut c_void) -> CUresult
            ["cuLaunchKernelEx", 11060, false] => launch::launch_kernel_ex;
        Cuda fn cuLaunchKernelEx_ptsz(config: *const launch::LaunchConfig, f: Handle,
                params: *mut *mut c_void, extra: *mut *mut c_void) -> CUresult
            ["cuLaunchKernelEx", 11060, true] => launch::launch_kernel_ex_ptsz;
        Cuda fn cuLaunchCooperativeKernel(f: Handle, gx: c_uint, gy: c_uint, gz: c_uint,
                bx: c_uint, by: c_uint, bz: c_uint, shmem: c_uint, stream: Handle,
                params: *mut *mut c_void) -> CUresult
            ["cuLaunchCooperativeKernel", 9000, false] => launch::launch_cooperative;
        Cuda fn cuLaunchCooperativeKernel_ptsz(f: Handle, gx: c_uint, gy: c_uint, gz: c_uint,
                bx: c_uint, by: c_uint, bz: c_uint, shmem: c_uint, stream: Handle,
                params: *mut *mut c_void) -> CUresult
            ["cuLaunchCooperativeKernel", 9000, true] => launch::launch_cooperative_ptsz;
        Cuda fn cuGraphLaunch(exec: Handle, stream: Handle) -> CUresult
            ["cuGraphLaunch", 10000, false] => launch::graph_launch;
        Cuda fn cuGraphLaunch_ptsz(exec: Handle, stream: Handle) -> CUresult
            ["cuGraphLaunch", 10000, true] => launch::graph_launch_ptsz;
    }
    calls {
        Cuda fn cuCtxGetDevice(*mut CUdevice) -> CUresult;
        Cuda fn cuCtxGetCurrent(*mut Handle) -> CUresult;
        Cuda fn cuStreamIsCapturing(Handle, *mut c_int) -> CUresult;
        Cuda fn cuStreamIsCapturing_ptsz(Handle, *mut c_int) -> CUresult;
        Cuda fn cuDeviceGetCount(*mut c_int) -> CUresult;
        Cuda fn cuDeviceGetUuid(*mut [u8; 16], CUdevice) -> CUresult;
        Cuda fn cuMemGetAllocationGranularity(*mut usize, *const CUmemAllocationPropHead, c_int)
            -> CUresult;
        Nvml fn nvmlDeviceGetIndex(Handle, *mut c_uint) -> NvmlReturn;
        Nvml fn nvmlDeviceGetCount_v2(*mut c_uint) -> NvmlReturn;
        Nvml fn nvmlDeviceGetHandleByIndex_v2(c_uint, *mut Handle) -> NvmlReturn;
        Nvml fn nvmlDeviceGetUUID(Handle, *mut c_char, c_uint) -> NvmlReturn;
        Nvml fn nvmlShutdown() -> NvmlReturn;
        Nvml fn nvmlDeviceGetProcessUtilization(Handle, *mut crate::sm::watcher::ProcessSample,
            *mut c_uint, u64) -> NvmlReturn;
        Nvml fn nvmlDeviceGetUtilizationRates(Handle, *mut crate::sm::watcher::Utilization)
            -> NvmlReturn;
    }
}

/// The row exporting `name`, if we intercept it.
pub(crate) fn hooked_index(name: &[u8]) -> Option<usize> {
    ENTRIES
        .iter()
        .position(|e| e.hooked && e.name.to_bytes() == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_hook_has_an_address_and_internal_rows_do_not() {
        for (i, e) in ENTRIES.iter().enumerate() {
            assert_eq!(hook_address(i) != 0, e.hooked, "{:?}", e.name);
        }
        assert_eq!(ENTRIES.len(), SLOTS.len());
    }

    #[test]
    fn cuda_rows_carry_proc_address_facts() {
        for e in ENTRIES.iter().filter(|e| e.hooked && e.lib == Lib::Cuda) {
            let name = e.name.to_str().unwrap_or_default();
            assert!(name.starts_with(e.base), "{name} vs {}", e.base);
            assert!(e.since >= 2000, "{name}");
            assert_eq!(e.per_thread, name.ends_with("_ptsz"), "{name}");
        }
    }

    #[test]
    fn lookup_by_name() {
        assert_eq!(
            hooked_index(b"cuMemAlloc_v2"),
            Some(Sym::cuMemAlloc_v2 as usize)
        );
        assert_eq!(
            hooked_index(b"cuCtxGetDevice"),
            None,
            "internal rows are not hooks"
        );
        assert_eq!(hooked_index(b"malloc"), None);
    }
}
