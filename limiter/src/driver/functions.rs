//! THE list of driver functions the library touches: one row per function, in one place, with its
//! library, C signature and `cuGetProcAddress` facts (base name, first CUDA version,
//! per-thread-default-stream variant). Like ZLUDA's function lists, the list is a macro that hands
//! its rows to another macro, so it is expanded several times:
//!
//! * in the driver layer (`driver/table.rs`): row indices, the lazily resolved real-function
//!   slots, typed accessors (`table::real::cuMemAlloc_v2()`), and the `ENTRIES` facts `dlsym` and
//!   `cuGetProcAddress` consult;
//! * in the hooks layer (`hooks/exports.rs`): the exported `#[no_mangle] extern "C"` hooks, each
//!   bound to its body there.
//!
//! This file uses nothing; its expansions use it.
//!
//! Groups: `intercepted` (exported, run with the re-entry flag), `launches` (exported, the hot path,
//! no flag), `called` (only called, never exported). Adding a hook is one row here plus its body and
//! its binding in `hooks/exports.rs` (the compiler insists on both). The rows name only C types of
//! `driver/ffi.rs` and `std::ffi`, which every expansion site has in scope.

/// Hands THE list to the macro `$expand` (see the module docs for its grammar).
macro_rules! driver_functions {
    ($expand:ident) => {
        $expand! {
            intercepted {
                Cuda fn cuInit(flags: c_uint) -> CUresult ["cuInit", 2000, false];

                Cuda fn cuMemAlloc(dptr: *mut CUdeviceptrV1, bytesize: c_uint) -> CUresult
                    ["cuMemAlloc", 2000, false];
                Cuda fn cuMemAlloc_v2(dptr: *mut CUdeviceptr, bytesize: usize) -> CUresult
                    ["cuMemAlloc", 3020, false];
                Cuda fn cuMemFree(dptr: CUdeviceptrV1) -> CUresult
                    ["cuMemFree", 2000, false];
                Cuda fn cuMemFree_v2(dptr: CUdeviceptr) -> CUresult
                    ["cuMemFree", 3020, false];
                Cuda fn cuMemAllocPitch(dptr: *mut CUdeviceptrV1, pitch: *mut c_uint, width: c_uint,
                        height: c_uint, elem: c_uint) -> CUresult
                    ["cuMemAllocPitch", 2000, false];
                Cuda fn cuMemAllocPitch_v2(dptr: *mut CUdeviceptr, pitch: *mut usize, width: usize,
                        height: usize, elem: c_uint) -> CUresult
                    ["cuMemAllocPitch", 3020, false];
                Cuda fn cuMemAllocManaged(dptr: *mut CUdeviceptr, bytesize: usize, flags: c_uint) -> CUresult
                    ["cuMemAllocManaged", 6000, false];
                Cuda fn cuMemAllocAsync(dptr: *mut CUdeviceptr, bytesize: usize, stream: Handle) -> CUresult
                    ["cuMemAllocAsync", 11020, false];
                Cuda fn cuMemAllocAsync_ptsz(dptr: *mut CUdeviceptr, bytesize: usize, stream: Handle)
                        -> CUresult
                    ["cuMemAllocAsync", 11020, true];
                Cuda fn cuMemFreeAsync(dptr: CUdeviceptr, stream: Handle) -> CUresult
                    ["cuMemFreeAsync", 11020, false];
                Cuda fn cuMemFreeAsync_ptsz(dptr: CUdeviceptr, stream: Handle) -> CUresult
                    ["cuMemFreeAsync", 11020, true];
                Cuda fn cuMemAllocFromPoolAsync(dptr: *mut CUdeviceptr, bytesize: usize, pool: Handle,
                        stream: Handle) -> CUresult
                    ["cuMemAllocFromPoolAsync", 11020, false];
                Cuda fn cuMemAllocFromPoolAsync_ptsz(dptr: *mut CUdeviceptr, bytesize: usize, pool: Handle,
                        stream: Handle) -> CUresult
                    ["cuMemAllocFromPoolAsync", 11020, true];
                Cuda fn cuMemCreate(handle: *mut CUmemGenericAllocationHandle, size: usize,
                        prop: *const CUmemAllocationPropHead, flags: u64) -> CUresult
                    ["cuMemCreate", 10020, false];
                Cuda fn cuMemRelease(handle: CUmemGenericAllocationHandle) -> CUresult
                    ["cuMemRelease", 10020, false];
                Cuda fn cuMemMap(ptr: CUdeviceptr, size: usize, offset: usize,
                        handle: CUmemGenericAllocationHandle, flags: u64) -> CUresult
                    ["cuMemMap", 10020, false];
                Cuda fn cuMemUnmap(ptr: CUdeviceptr, size: usize) -> CUresult
                    ["cuMemUnmap", 10020, false];
                Cuda fn cuMemRetainAllocationHandle(handle: *mut CUmemGenericAllocationHandle,
                        addr: *mut c_void) -> CUresult
                    ["cuMemRetainAllocationHandle", 11000, false];

                Cuda fn cuCtxCreate(pctx: *mut Handle, flags: c_uint, dev: CUdevice) -> CUresult
                    ["cuCtxCreate", 2000, false];
                Cuda fn cuCtxCreate_v2(pctx: *mut Handle, flags: c_uint, dev: CUdevice) -> CUresult
                    ["cuCtxCreate", 3020, false];
                Cuda fn cuCtxCreate_v3(pctx: *mut Handle, params: *mut c_void, num: c_int, flags: c_uint,
                        dev: CUdevice) -> CUresult
                    ["cuCtxCreate", 11040, false];
                Cuda fn cuCtxCreate_v4(pctx: *mut Handle, params: *mut c_void, flags: c_uint,
                        dev: CUdevice) -> CUresult
                    ["cuCtxCreate", 12050, false];
                Cuda fn cuCtxDestroy(ctx: Handle) -> CUresult
                    ["cuCtxDestroy", 2000, false];
                Cuda fn cuCtxDestroy_v2(ctx: Handle) -> CUresult
                    ["cuCtxDestroy", 4000, false];
                Cuda fn cuDevicePrimaryCtxRetain(pctx: *mut Handle, dev: CUdevice) -> CUresult
                    ["cuDevicePrimaryCtxRetain", 7000, false];
                Cuda fn cuDevicePrimaryCtxRelease(dev: CUdevice) -> CUresult
                    ["cuDevicePrimaryCtxRelease", 7000, false];
                Cuda fn cuDevicePrimaryCtxRelease_v2(dev: CUdevice) -> CUresult
                    ["cuDevicePrimaryCtxRelease", 11000, false];
                Cuda fn cuDevicePrimaryCtxReset(dev: CUdevice) -> CUresult
                    ["cuDevicePrimaryCtxReset", 7000, false];
                Cuda fn cuDevicePrimaryCtxReset_v2(dev: CUdevice) -> CUresult
                    ["cuDevicePrimaryCtxReset", 11000, false];

                Cuda fn cuGraphAddMemAllocNode(node: *mut Handle, graph: Handle, deps: *const Handle,
                        ndeps: usize, params: *mut MemAllocNodeParams) -> CUresult
                    ["cuGraphAddMemAllocNode", 11040, false];
                Cuda fn cuGraphAddMemFreeNode(node: *mut Handle, graph: Handle, deps: *const Handle,
                        ndeps: usize, dptr: CUdeviceptr) -> CUresult
                    ["cuGraphAddMemFreeNode", 11040, false];
                Cuda fn cuGraphDestroy(graph: Handle) -> CUresult
                    ["cuGraphDestroy", 10000, false];
                Cuda fn cuStreamEndCapture(stream: Handle, graph: *mut Handle) -> CUresult
                    ["cuStreamEndCapture", 10000, false];
                Cuda fn cuStreamEndCapture_ptsz(stream: Handle, graph: *mut Handle) -> CUresult
                    ["cuStreamEndCapture", 10000, true];

                Cuda fn cuArrayCreate(array: *mut Handle, desc: *const ArrayDescriptorV1) -> CUresult
                    ["cuArrayCreate", 2000, false];
                Cuda fn cuArrayCreate_v2(array: *mut Handle, desc: *const ArrayDescriptor) -> CUresult
                    ["cuArrayCreate", 3020, false];
                Cuda fn cuArray3DCreate(array: *mut Handle, desc: *const Array3DDescriptorV1) -> CUresult
                    ["cuArray3DCreate", 2000, false];
                Cuda fn cuArray3DCreate_v2(array: *mut Handle, desc: *const Array3DDescriptor) -> CUresult
                    ["cuArray3DCreate", 3020, false];
                Cuda fn cuArrayDestroy(array: Handle) -> CUresult
                    ["cuArrayDestroy", 2000, false];
                Cuda fn cuMipmappedArrayCreate(array: *mut Handle, desc: *const Array3DDescriptor,
                        levels: c_uint) -> CUresult
                    ["cuMipmappedArrayCreate", 5000, false];
                Cuda fn cuMipmappedArrayDestroy(array: Handle) -> CUresult
                    ["cuMipmappedArrayDestroy", 5000, false];

                Cuda fn cuMemGetInfo(free: *mut c_uint, total: *mut c_uint) -> CUresult
                    ["cuMemGetInfo", 2000, false];
                Cuda fn cuMemGetInfo_v2(free: *mut usize, total: *mut usize) -> CUresult
                    ["cuMemGetInfo", 3020, false];
                Cuda fn cuDeviceTotalMem(bytes: *mut c_uint, dev: CUdevice) -> CUresult
                    ["cuDeviceTotalMem", 2000, false];
                Cuda fn cuDeviceTotalMem_v2(bytes: *mut usize, dev: CUdevice) -> CUresult
                    ["cuDeviceTotalMem", 3020, false];

                Cuda fn cuGetProcAddress(symbol: *const c_char, pfn: *mut *mut c_void, version: c_int,
                        flags: u64) -> CUresult
                    ["cuGetProcAddress", 11030, false];
                Cuda fn cuGetProcAddress_v2(symbol: *const c_char, pfn: *mut *mut c_void, version: c_int,
                        flags: u64, status: *mut c_int) -> CUresult
                    ["cuGetProcAddress", 12000, false];

                Nvml fn nvmlInit() -> NvmlReturn ["", 0, false];
                Nvml fn nvmlInit_v2() -> NvmlReturn ["", 0, false];
                Nvml fn nvmlDeviceGetMemoryInfo(device: Handle, memory: *mut NvmlMemory) -> NvmlReturn
                    ["", 0, false];
                Nvml fn nvmlDeviceGetMemoryInfo_v2(device: Handle, memory: *mut NvmlMemoryV2) -> NvmlReturn
                    ["", 0, false];
            }
            // The launch entry points: the hot path (the hooks layer runs them without the re-entry flag).
            launches {
                Cuda fn cuLaunchKernel(f: Handle, gx: c_uint, gy: c_uint, gz: c_uint, bx: c_uint,
                        by: c_uint, bz: c_uint, shmem: c_uint, stream: Handle,
                        params: *mut *mut c_void, extra: *mut *mut c_void) -> CUresult
                    ["cuLaunchKernel", 4000, false];
                Cuda fn cuLaunchKernel_ptsz(f: Handle, gx: c_uint, gy: c_uint, gz: c_uint, bx: c_uint,
                        by: c_uint, bz: c_uint, shmem: c_uint, stream: Handle,
                        params: *mut *mut c_void, extra: *mut *mut c_void) -> CUresult
                    ["cuLaunchKernel", 7000, true];
                Cuda fn cuLaunchKernelEx(config: *const LaunchConfig, f: Handle,
                        params: *mut *mut c_void, extra: *mut *mut c_void) -> CUresult
                    ["cuLaunchKernelEx", 11060, false];
                Cuda fn cuLaunchKernelEx_ptsz(config: *const LaunchConfig, f: Handle,
                        params: *mut *mut c_void, extra: *mut *mut c_void) -> CUresult
                    ["cuLaunchKernelEx", 11060, true];
                Cuda fn cuLaunchCooperativeKernel(f: Handle, gx: c_uint, gy: c_uint, gz: c_uint,
                        bx: c_uint, by: c_uint, bz: c_uint, shmem: c_uint, stream: Handle,
                        params: *mut *mut c_void) -> CUresult
                    ["cuLaunchCooperativeKernel", 9000, false];
                Cuda fn cuLaunchCooperativeKernel_ptsz(f: Handle, gx: c_uint, gy: c_uint, gz: c_uint,
                        bx: c_uint, by: c_uint, bz: c_uint, shmem: c_uint, stream: Handle,
                        params: *mut *mut c_void) -> CUresult
                    ["cuLaunchCooperativeKernel", 9000, true];
                Cuda fn cuGraphLaunch(exec: Handle, stream: Handle) -> CUresult
                    ["cuGraphLaunch", 10000, false];
                Cuda fn cuGraphLaunch_ptsz(exec: Handle, stream: Handle) -> CUresult
                    ["cuGraphLaunch", 10000, true];
            }
            called {
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
                Nvml fn nvmlDeviceGetProcessUtilization(Handle, *mut ProcessSample,
                    *mut c_uint, u64) -> NvmlReturn;
                Nvml fn nvmlDeviceGetUtilizationRates(Handle, *mut Utilization)
                    -> NvmlReturn;
            }
        }
    };
}

pub(crate) use driver_functions;
