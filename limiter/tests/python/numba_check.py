"""numba.cuda through its ctypes driver binding, unmodified, as a user runs it: cuda.detect(),
the context's memory info, device_array / to_device / copy_to_host, allocation past the cap
(numba's own CudaAPIError, CUDA_ERROR_OUT_OF_MEMORY = 2), then cuda.close(). Prints one JSON
object; the Rust test decides what is right for each mode.

argv[1]: the size in MiB of one request that must not fit (more than the device or the cap).
argv[2]: the chunk size in MiB used to fill the device up to its limit.
"""

import contextlib
import io
import json
import os
import sys

import numpy as np
from numba import cuda
from numba.cuda.cudadrv.driver import CudaAPIError


def info(ctx):
    free, total = ctx.get_memory_info()
    return {"free": free, "total": total}


def main():
    too_big_mib, chunk_mib = int(sys.argv[1]), int(sys.argv[2])
    out = {"pid": os.getpid()}

    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        out["detect"] = bool(cuda.detect())
    out["detect_text"] = text.getvalue()

    ctx = cuda.current_context()
    out["start"] = info(ctx)

    host = np.arange(1 << 20, dtype=np.float32)  # 4 MiB
    dev = cuda.to_device(host)
    out["roundtrip"] = bool(np.array_equal(dev.copy_to_host(), host))
    empty = cuda.device_array(1 << 18, dtype=np.float64)  # 2 MiB
    empty.copy_to_device(np.full(1 << 18, 7.5))
    out["device_array"] = bool((empty.copy_to_host() == 7.5).all())
    out["with_arrays"] = info(ctx)

    try:
        cuda.device_array(too_big_mib << 20, dtype=np.uint8)
        out["too_big"] = "allocated"
    except CudaAPIError as e:
        out["too_big"] = e.code

    chunks = []
    try:
        while len(chunks) < 10000:
            chunks.append(cuda.device_array(chunk_mib << 20, dtype=np.uint8))
        out["chunk_error"] = None
    except CudaAPIError as e:
        out["chunk_error"] = e.code
    out["chunks"] = len(chunks)
    out["full"] = info(ctx)

    # Closing with the arrays still alive, as a script ending does: numba frees them after
    # the context is gone from the thread (cuMemFree with no current context).
    cuda.close()
    out["closed"] = True
    print(json.dumps(out))


if __name__ == "__main__":
    main()
