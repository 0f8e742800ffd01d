"""Holds device memory the way a CUDA program in the container would, for the monitoring tools
(pynvml, nvitop, gpustat) to see: cuInit, the primary context, cuMemAlloc of argv[1] MiB, then
prints `pid <n>` and waits until stdin closes.

Only the standard library: libcuda.so.1 is reached through ctypes exactly as the driver is found
in a container (by name, on the loader path), so under LD_PRELOAD the limiter sees every call.
"""

import ctypes
import os
import sys


def check(rc, what):
    if rc != 0:
        raise SystemExit(f"holder: {what} returned CUresult {rc}")


def main():
    mib = int(sys.argv[1])
    cuda = ctypes.CDLL("libcuda.so.1")
    check(cuda.cuInit(0), "cuInit")
    dev = ctypes.c_int()
    check(cuda.cuDeviceGet(ctypes.byref(dev), 0), "cuDeviceGet")
    ctx = ctypes.c_void_p()
    check(cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
    check(cuda.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
    ptr = ctypes.c_uint64()
    if mib:
        check(cuda.cuMemAlloc_v2(ctypes.byref(ptr), ctypes.c_size_t(mib << 20)), "cuMemAlloc_v2")
    print(f"pid {os.getpid()}", flush=True)
    sys.stdin.read()


if __name__ == "__main__":
    main()
