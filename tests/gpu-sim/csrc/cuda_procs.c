/*
 * The cuGetProcAddress table of the fake libcuda.so.1.
 *
 * One row per (base name, first CUDA version, stream mode) -> exported
 * function. The real driver works the same way: cuda.h maps cuMemAlloc to
 * cuMemAlloc_v2 since CUDA 3.2, so a caller built for 3.2 or later asking for
 * "cuMemAlloc" gets cuMemAlloc_v2 and an older one the 32-bit legacy entry
 * point; CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM selects the _ptsz/_ptds
 * variant where one exists (per-thread default stream arrived in CUDA 7.0).
 *
 * To add a function: export it (cuda_api.h + cuda.c), add its rows here, and
 * add it to the expectations in tests/cuda_driver.rs.
 */
#include "cuda_procs.h"

#include <stdbool.h>
#include <string.h>

#define ROW(base, ver, mode, sym) {base, ver, mode, #sym, (void *)&sym}
/* A function without default-stream semantics and without versions. */
#define ONE(sym, ver) ROW(#sym, ver, PROC_ANY, sym)

const struct cuda_proc cuda_procs[] = {
    /* Initialisation, version, errors, entry points */
    ONE(cuInit, 2000),
    ONE(cuDriverGetVersion, 2020),
    ONE(cuGetErrorString, 6000),
    ONE(cuGetErrorName, 6000),
    ROW("cuGetProcAddress", 11030, PROC_ANY, cuGetProcAddress),
    ROW("cuGetProcAddress", 12000, PROC_ANY, cuGetProcAddress_v2),

    /* Devices */
    ONE(cuDeviceGet, 2000),
    ONE(cuDeviceGetCount, 2000),
    ONE(cuDeviceGetName, 2000),
    ROW("cuDeviceGetUuid", 9020, PROC_ANY, cuDeviceGetUuid),
    ROW("cuDeviceGetUuid", 11040, PROC_ANY, cuDeviceGetUuid_v2),
    ROW("cuDeviceTotalMem", 2000, PROC_ANY, cuDeviceTotalMem),
    ROW("cuDeviceTotalMem", 3020, PROC_ANY, cuDeviceTotalMem_v2),
    ONE(cuDeviceGetAttribute, 2000),
    ONE(cuDeviceGetPCIBusId, 4010),
    ONE(cuDeviceGetByPCIBusId, 4010),
    ONE(cuDeviceGetDefaultMemPool, 11020),

    /* Contexts */
    ROW("cuCtxCreate", 2000, PROC_ANY, cuCtxCreate),
    ROW("cuCtxCreate", 3020, PROC_ANY, cuCtxCreate_v2),
    ROW("cuCtxCreate", 11040, PROC_ANY, cuCtxCreate_v3),
    ROW("cuCtxCreate", 12050, PROC_ANY, cuCtxCreate_v4),
    ROW("cuCtxDestroy", 2000, PROC_ANY, cuCtxDestroy),
    ROW("cuCtxDestroy", 4000, PROC_ANY, cuCtxDestroy_v2),
    ROW("cuCtxPushCurrent", 2000, PROC_ANY, cuCtxPushCurrent),
    ROW("cuCtxPushCurrent", 4000, PROC_ANY, cuCtxPushCurrent_v2),
    ROW("cuCtxPopCurrent", 2000, PROC_ANY, cuCtxPopCurrent),
    ROW("cuCtxPopCurrent", 4000, PROC_ANY, cuCtxPopCurrent_v2),
    ONE(cuCtxGetCurrent, 4000),
    ONE(cuCtxSetCurrent, 4000),
    ONE(cuCtxGetDevice, 2000),
    ONE(cuCtxSynchronize, 2000),
    ONE(cuDevicePrimaryCtxRetain, 7000),
    ROW("cuDevicePrimaryCtxRelease", 7000, PROC_ANY, cuDevicePrimaryCtxRelease),
    ROW("cuDevicePrimaryCtxRelease", 11000, PROC_ANY, cuDevicePrimaryCtxRelease_v2),
    ROW("cuDevicePrimaryCtxReset", 7000, PROC_ANY, cuDevicePrimaryCtxReset),
    ROW("cuDevicePrimaryCtxReset", 11000, PROC_ANY, cuDevicePrimaryCtxReset_v2),
    ONE(cuDevicePrimaryCtxGetState, 7000),

    /* Linear memory */
    ROW("cuMemAlloc", 2000, PROC_ANY, cuMemAlloc),
    ROW("cuMemAlloc", 3020, PROC_ANY, cuMemAlloc_v2),
    ROW("cuMemFree", 2000, PROC_ANY, cuMemFree),
    ROW("cuMemFree", 3020, PROC_ANY, cuMemFree_v2),
    ROW("cuMemGetInfo", 2000, PROC_ANY, cuMemGetInfo),
    ROW("cuMemGetInfo", 3020, PROC_ANY, cuMemGetInfo_v2),
    ROW("cuMemAllocPitch", 2000, PROC_ANY, cuMemAllocPitch),
    ROW("cuMemAllocPitch", 3020, PROC_ANY, cuMemAllocPitch_v2),
    ONE(cuMemAllocManaged, 6000),

    /* Copies (synchronous ones have _ptds variants, asynchronous ones _ptsz) */
    ROW("cuMemcpyHtoD", 2000, PROC_LEGACY, cuMemcpyHtoD),
    ROW("cuMemcpyHtoD", 3020, PROC_LEGACY, cuMemcpyHtoD_v2),
    ROW("cuMemcpyHtoD", 7000, PROC_PTDS, cuMemcpyHtoD_v2_ptds),
    ROW("cuMemcpyDtoH", 2000, PROC_LEGACY, cuMemcpyDtoH),
    ROW("cuMemcpyDtoH", 3020, PROC_LEGACY, cuMemcpyDtoH_v2),
    ROW("cuMemcpyDtoH", 7000, PROC_PTDS, cuMemcpyDtoH_v2_ptds),
    ROW("cuMemcpyDtoD", 2000, PROC_LEGACY, cuMemcpyDtoD),
    ROW("cuMemcpyDtoD", 3020, PROC_LEGACY, cuMemcpyDtoD_v2),
    ROW("cuMemcpyDtoD", 7000, PROC_PTDS, cuMemcpyDtoD_v2_ptds),
    ROW("cuMemcpyHtoDAsync", 2000, PROC_LEGACY, cuMemcpyHtoDAsync),
    ROW("cuMemcpyHtoDAsync", 3020, PROC_LEGACY, cuMemcpyHtoDAsync_v2),
    ROW("cuMemcpyHtoDAsync", 7000, PROC_PTDS, cuMemcpyHtoDAsync_v2_ptsz),
    ROW("cuMemcpyDtoHAsync", 2000, PROC_LEGACY, cuMemcpyDtoHAsync),
    ROW("cuMemcpyDtoHAsync", 3020, PROC_LEGACY, cuMemcpyDtoHAsync_v2),
    ROW("cuMemcpyDtoHAsync", 7000, PROC_PTDS, cuMemcpyDtoHAsync_v2_ptsz),

    /* Inter-process memory handles */
    ONE(cuIpcGetMemHandle, 4010),
    ROW("cuIpcOpenMemHandle", 4010, PROC_ANY, cuIpcOpenMemHandle),
    ROW("cuIpcOpenMemHandle", 11000, PROC_ANY, cuIpcOpenMemHandle_v2),
    ONE(cuIpcCloseMemHandle, 4010),

    /* Stream-ordered allocator */
    ROW("cuMemAllocAsync", 11020, PROC_LEGACY, cuMemAllocAsync),
    ROW("cuMemAllocAsync", 11020, PROC_PTDS, cuMemAllocAsync_ptsz),
    ROW("cuMemFreeAsync", 11020, PROC_LEGACY, cuMemFreeAsync),
    ROW("cuMemFreeAsync", 11020, PROC_PTDS, cuMemFreeAsync_ptsz),
    ROW("cuMemAllocFromPoolAsync", 11020, PROC_LEGACY, cuMemAllocFromPoolAsync),
    ROW("cuMemAllocFromPoolAsync", 11020, PROC_PTDS, cuMemAllocFromPoolAsync_ptsz),
    ONE(cuMemPoolCreate, 11020),
    ONE(cuMemPoolDestroy, 11020),

    /* Virtual memory management */
    ONE(cuMemCreate, 10020),
    ONE(cuMemRelease, 10020),
    ONE(cuMemGetAllocationGranularity, 10020),
    ONE(cuMemAddressReserve, 10020),
    ONE(cuMemAddressFree, 10020),
    ONE(cuMemMap, 10020),
    ONE(cuMemUnmap, 10020),
    ONE(cuMemRetainAllocationHandle, 11000),
    ONE(cuMemSetAccess, 10020),

    /* Arrays */
    ROW("cuArrayCreate", 2000, PROC_ANY, cuArrayCreate),
    ROW("cuArrayCreate", 3020, PROC_ANY, cuArrayCreate_v2),
    ROW("cuArray3DCreate", 2000, PROC_ANY, cuArray3DCreate),
    ROW("cuArray3DCreate", 3020, PROC_ANY, cuArray3DCreate_v2),
    ONE(cuArrayDestroy, 2000),
    ONE(cuMipmappedArrayCreate, 5000),
    ONE(cuMipmappedArrayDestroy, 5000),

    /* Modules */
    ONE(cuModuleLoad, 2000),
    ONE(cuModuleLoadData, 2000),
    ONE(cuModuleLoadDataEx, 2010),
    ONE(cuModuleUnload, 2000),
    ONE(cuModuleGetFunction, 2000),

    /* Streams */
    ONE(cuStreamCreate, 2000),
    ROW("cuStreamDestroy", 2000, PROC_ANY, cuStreamDestroy),
    ROW("cuStreamDestroy", 4000, PROC_ANY, cuStreamDestroy_v2),
    ROW("cuStreamSynchronize", 2000, PROC_LEGACY, cuStreamSynchronize),
    ROW("cuStreamSynchronize", 7000, PROC_PTDS, cuStreamSynchronize_ptsz),

    /* Launches */
    ROW("cuLaunchKernel", 4000, PROC_LEGACY, cuLaunchKernel),
    ROW("cuLaunchKernel", 7000, PROC_PTDS, cuLaunchKernel_ptsz),
    ROW("cuLaunchKernelEx", 11060, PROC_LEGACY, cuLaunchKernelEx),
    ROW("cuLaunchKernelEx", 11060, PROC_PTDS, cuLaunchKernelEx_ptsz),
    ROW("cuLaunchCooperativeKernel", 9000, PROC_LEGACY, cuLaunchCooperativeKernel),
    ROW("cuLaunchCooperativeKernel", 9000, PROC_PTDS, cuLaunchCooperativeKernel_ptsz),
    ROW("cuGraphLaunch", 10000, PROC_LEGACY, cuGraphLaunch),
    ROW("cuGraphLaunch", 10000, PROC_PTDS, cuGraphLaunch_ptsz),

    /* Graph memory */
    ONE(cuGraphCreate, 10000),
    ONE(cuGraphDestroy, 10000),
    ONE(cuGraphAddMemAllocNode, 11040),
    ONE(cuGraphAddMemFreeNode, 11040),
    ONE(cuGraphInstantiateWithFlags, 11040),
    ONE(cuGraphExecDestroy, 10000),
    ONE(cuDeviceGraphMemTrim, 11040),
    ROW("cuStreamBeginCapture", 10010, PROC_LEGACY, cuStreamBeginCapture_v2),
    ROW("cuStreamBeginCapture", 10010, PROC_PTDS, cuStreamBeginCapture_v2_ptsz),
    ROW("cuStreamEndCapture", 10000, PROC_LEGACY, cuStreamEndCapture),
    ROW("cuStreamEndCapture", 10000, PROC_PTDS, cuStreamEndCapture_ptsz),
    ROW("cuStreamIsCapturing", 10000, PROC_LEGACY, cuStreamIsCapturing),
    ROW("cuStreamIsCapturing", 10000, PROC_PTDS, cuStreamIsCapturing_ptsz),
};

const unsigned int cuda_proc_count = sizeof cuda_procs / sizeof cuda_procs[0];

/* The best row for the name among those the filter accepts, or NULL. */
static const struct cuda_proc *best_row(const char *symbol, int cudaVersion,
                                        enum cuda_proc_stream mode)
{
    const struct cuda_proc *best = NULL;
    unsigned int i;

    for (i = 0; i < cuda_proc_count; i++) {
        const struct cuda_proc *row = &cuda_procs[i];
        if (strcmp(row->name, symbol) != 0 || row->version > cudaVersion)
            continue;
        if (row->stream != PROC_ANY && row->stream != mode)
            continue;
        if (best == NULL || row->version > best->version)
            best = row;
    }
    return best;
}

CUresult cuda_proc_lookup(const char *symbol, void **pfn, int cudaVersion, cuuint64_t flags,
                          CUdriverProcAddressQueryResult *status)
{
    const cuuint64_t known =
        CU_GET_PROC_ADDRESS_LEGACY_STREAM | CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM;
    const struct cuda_proc *row;
    bool per_thread;
    unsigned int i;
    int named = 0;

    if (symbol == NULL || pfn == NULL || (flags & ~known) != 0 || flags == known)
        return CUDA_ERROR_INVALID_VALUE;
    *pfn = NULL;
    /* DEFAULT means "as the caller was compiled", which the driver cannot see: legacy. */
    per_thread = (flags & CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM) != 0;
    row = best_row(symbol, cudaVersion, per_thread ? PROC_PTDS : PROC_LEGACY);
    if (row == NULL && per_thread)
        row = best_row(symbol, cudaVersion, PROC_LEGACY); /* before CUDA 7.0: no _ptsz yet */
    if (row != NULL) {
        *pfn = row->fn;
        if (status != NULL)
            *status = CU_GET_PROC_ADDRESS_SUCCESS;
        return CUDA_SUCCESS;
    }
    for (i = 0; i < cuda_proc_count && !named; i++)
        named = strcmp(cuda_procs[i].name, symbol) == 0;
    if (status != NULL)
        *status = named ? CU_GET_PROC_ADDRESS_VERSION_NOT_SUFFICIENT
                        : CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND;
    return CUDA_ERROR_NOT_FOUND;
}
