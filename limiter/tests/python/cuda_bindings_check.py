"""NVIDIA's official driver bindings (cuda-bindings, `cuda.bindings.driver`), unmodified: they
resolve every entry point through cuGetProcAddress, so under LD_PRELOAD this exercises the
limiter's cuGetProcAddress answers. Checks init, the primary context, cuMemGetInfo, cuMemAlloc
with a copy round trip, cuMemAllocAsync, the virtual memory management family (cuMemCreate,
cuMemAddressReserve, cuMemMap, cuMemSetAccess), cuCtxCreate in the three forms the bindings
expose (v2, v3 with affinity parameters, v4 with create parameters), requests past the limit
(each must fail with CUDA_ERROR_OUT_OF_MEMORY), then launches a kernel for argv[2] seconds
(1 ms each, synchronised) so the SM cap can be measured from the simulator's accounting.

argv[1]: the size in MiB of one request that must not fit (more than the device or the cap).
Prints one JSON object; the Rust test decides what is right for each mode.
"""

import json
import os
import sys
import time

import numpy as np
from cuda.bindings import driver as cu

MIB = 1 << 20
OOM = int(cu.CUresult.CUDA_ERROR_OUT_OF_MEMORY)
# A module image: the simulator accepts any, the name below picks the kernel's duration
# (README "Kernel time model": 1 ms per launch whatever the grid).
PTX = b".version 8.0\n.target sm_80\n.address_size 64\n"
KERNEL = b"spin@kernel_ns=1000000"


def ok(result, what):
    """The bindings return (CUresult, values...): fail loudly on anything but success."""
    err, *values = result
    if err != cu.CUresult.CUDA_SUCCESS:
        raise SystemExit(f"cuda_bindings_check: {what} returned {err!r}")
    return values[0] if len(values) == 1 else values


def code(result):
    return int(result[0])


def mem_info():
    free, total = ok(cu.cuMemGetInfo(), "cuMemGetInfo")
    return {"free": int(free), "total": int(total)}


def vmm(dev, mib):
    """cuMemCreate + cuMemAddressReserve + cuMemMap + cuMemSetAccess of mib MiB; the result
    code of cuMemCreate and, when it succeeded, a cleanup function."""
    prop = cu.CUmemAllocationProp()
    prop.type = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
    prop.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    prop.location.id = int(dev)
    gran = ok(
        cu.cuMemGetAllocationGranularity(
            prop, cu.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM
        ),
        "cuMemGetAllocationGranularity",
    )
    size = (mib * MIB + gran - 1) // gran * gran
    created = cu.cuMemCreate(size, prop, 0)
    if code(created) != 0:
        return code(created), None
    handle = created[1]
    va = ok(cu.cuMemAddressReserve(size, 0, 0, 0), "cuMemAddressReserve")
    ok(cu.cuMemMap(va, size, 0, handle, 0), "cuMemMap")
    access = cu.CUmemAccessDesc()
    access.location = prop.location
    access.flags = cu.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
    ok(cu.cuMemSetAccess(va, size, [access], 1), "cuMemSetAccess")

    def release():
        ok(cu.cuMemUnmap(va, size), "cuMemUnmap")
        ok(cu.cuMemAddressFree(va, size), "cuMemAddressFree")
        ok(cu.cuMemRelease(handle), "cuMemRelease")

    return 0, release


def main():
    too_big = int(sys.argv[1]) * MIB
    seconds = float(sys.argv[2])
    out = {"pid": os.getpid()}

    ok(cu.cuInit(0), "cuInit")
    out["driver_version"] = ok(cu.cuDriverGetVersion(), "cuDriverGetVersion")
    dev = ok(cu.cuDeviceGet(0), "cuDeviceGet")
    out["device_total"] = int(ok(cu.cuDeviceTotalMem(dev), "cuDeviceTotalMem"))
    ctx = ok(cu.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")
    ok(cu.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
    out["start"] = mem_info()

    # cuMemAlloc and a copy round trip.
    host = np.arange(64 * MIB // 4, dtype=np.uint32)
    back = np.zeros_like(host)
    ptr = ok(cu.cuMemAlloc(host.nbytes), "cuMemAlloc")
    ok(cu.cuMemcpyHtoD(ptr, host, host.nbytes), "cuMemcpyHtoD")
    ok(cu.cuMemcpyDtoH(back, ptr, host.nbytes), "cuMemcpyDtoH")
    out["roundtrip"] = bool(np.array_equal(host, back))
    out["after_alloc"] = mem_info()
    ok(cu.cuMemFree(ptr), "cuMemFree")

    # Stream-ordered allocation.
    stream = ok(cu.cuStreamCreate(0), "cuStreamCreate")
    aptr = ok(cu.cuMemAllocAsync(256 * MIB, stream), "cuMemAllocAsync")
    ok(cu.cuStreamSynchronize(stream), "cuStreamSynchronize")
    out["after_async"] = mem_info()
    ok(cu.cuMemFreeAsync(aptr, stream), "cuMemFreeAsync")
    ok(cu.cuStreamSynchronize(stream), "cuStreamSynchronize")

    # Virtual memory management.
    rc, release = vmm(dev, 512)
    out["vmm"] = rc
    if release is not None:
        out["after_vmm"] = mem_info()
        release()

    # cuCtxCreate in every form the bindings offer; each context costs device memory.
    created = {}
    ctx2 = ok(cu.cuCtxCreate(0, dev), "cuCtxCreate")
    created["v2"] = mem_info()
    ok(cu.cuCtxDestroy(ctx2), "cuCtxDestroy")
    ctx3 = ok(cu.cuCtxCreate_v3(None, 0, 0, dev), "cuCtxCreate_v3")
    created["v3"] = mem_info()
    ok(cu.cuCtxDestroy(ctx3), "cuCtxDestroy")
    ctx4 = ok(cu.cuCtxCreate_v4(None, 0, dev), "cuCtxCreate_v4")
    created["v4"] = mem_info()
    ok(cu.cuCtxDestroy(ctx4), "cuCtxDestroy")
    out["ctx_create"] = created
    ok(cu.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")

    # Past the limit: every allocation family reports the driver's own out-of-memory.
    out["too_big"] = {
        "cuMemAlloc": code(cu.cuMemAlloc(too_big)),
        "cuMemAllocAsync": code(cu.cuMemAllocAsync(too_big, stream)),
        "cuMemCreate": vmm(dev, too_big // MIB)[0],
    }
    out["end"] = mem_info()

    # Kernels: launch and synchronise for `seconds`.
    module = ok(cu.cuModuleLoadData(PTX), "cuModuleLoadData")
    func = ok(cu.cuModuleGetFunction(module, KERNEL), "cuModuleGetFunction")
    launches = 0
    start_ns = time.time_ns()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        ok(cu.cuLaunchKernel(func, 10, 1, 1, 256, 1, 1, 0, stream, 0, 0), "cuLaunchKernel")
        ok(cu.cuStreamSynchronize(stream), "cuStreamSynchronize")
        launches += 1
    out["launches"] = launches
    out["start_ns"] = start_ns
    out["end_ns"] = time.time_ns()
    ok(cu.cuModuleUnload(module), "cuModuleUnload")
    ok(cu.cuStreamDestroy(stream), "cuStreamDestroy")
    ok(cu.cuDevicePrimaryCtxRelease(dev), "cuDevicePrimaryCtxRelease")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
