"""NVIDIA's own Python NVML binding (nvidia-ml-py, module pynvml), unmodified, as a user inside
the container runs it: while this process holds argv[1] MiB through the CUDA driver, it asks
for the device count, name, UUID, memory (v1 and v2 structs), the compute processes and the
utilisation. Prints one JSON object; the Rust test decides what is right for each mode.
"""

import ctypes
import json
import os
import sys

import pynvml


def hold(mib):
    """cuInit, primary context, cuMemAlloc_v2 of mib MiB (kept for the life of the process)."""
    cuda = ctypes.CDLL("libcuda.so.1")
    dev, ctx, ptr = ctypes.c_int(), ctypes.c_void_p(), ctypes.c_uint64()
    for rc, what in (
        (cuda.cuInit(0), "cuInit"),
        (cuda.cuDeviceGet(ctypes.byref(dev), 0), "cuDeviceGet"),
        (cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain"),
        (cuda.cuCtxSetCurrent(ctx), "cuCtxSetCurrent"),
        (cuda.cuMemAlloc_v2(ctypes.byref(ptr), ctypes.c_size_t(mib << 20)), "cuMemAlloc_v2"),
    ):
        if rc != 0:
            raise SystemExit(f"pynvml_check: {what} returned CUresult {rc}")


def main():
    hold(int(sys.argv[1]))
    pynvml.nvmlInit()
    count = pynvml.nvmlDeviceGetCount()
    devices = []
    for i in range(count):
        h = pynvml.nvmlDeviceGetHandleByIndex(i)
        v1 = pynvml.nvmlDeviceGetMemoryInfo(h)
        v2 = pynvml.nvmlDeviceGetMemoryInfo(h, version=pynvml.nvmlMemory_v2)
        procs = pynvml.nvmlDeviceGetComputeRunningProcesses(h)
        util = pynvml.nvmlDeviceGetUtilizationRates(h)
        devices.append(
            {
                "name": pynvml.nvmlDeviceGetName(h),
                "uuid": pynvml.nvmlDeviceGetUUID(h),
                "v1": {"total": v1.total, "used": v1.used, "free": v1.free},
                "v2": {
                    "total": v2.total,
                    "reserved": v2.reserved,
                    "used": v2.used,
                    "free": v2.free,
                },
                "processes": [{"pid": p.pid, "used": p.usedGpuMemory} for p in procs],
                "util": {"gpu": util.gpu, "memory": util.memory},
            }
        )
    pynvml.nvmlShutdown()
    print(json.dumps({"pid": os.getpid(), "count": count, "devices": devices}))


if __name__ == "__main__":
    main()
