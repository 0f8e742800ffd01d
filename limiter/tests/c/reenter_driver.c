/* A libcuda.so.1 that calls back into the exported CUDA API from inside its own functions, as a
 * driver or a second interposer may (limiter/tests/hostile_process.rs). Built as libcuda.so.1 in
 * a directory put first on LD_LIBRARY_PATH; every function forwards to the gpu-sim fake driver,
 * dlopened by absolute path from $REENTER_REAL_CUDA, and a few first call back, by name through
 * the global scope (dlsym(RTLD_DEFAULT)), i.e. into libvgpu's exports when it is preloaded:
 *
 *   cuDeviceGetCount          -> cuDeviceTotalMem_v2        (libvgpu computes its device map here)
 *   cuDevicePrimaryCtxRetain  -> cuDevicePrimaryCtxRetain + cuDevicePrimaryCtxRelease
 *                                (libvgpu holds its context lock around this call)
 *   cuMemAlloc_v2             -> cuMemGetInfo_v2
 *
 * Each callback happens once per thread at a time (a thread-local depth), so the nested call
 * reaching this library again forwards without calling back. At exit, stderr gets
 * "reenter: <n> callbacks". */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef int CUresult;
typedef unsigned long long devptr;
typedef CUresult (*total_mem_fn)(size_t *, int);
typedef CUresult (*mem_info_fn)(size_t *, size_t *);

static void *real_lib(void)
{
    static void *lib;
    if (!lib) {
        const char *path = getenv("REENTER_REAL_CUDA");
        lib = path ? dlopen(path, RTLD_NOW | RTLD_LOCAL) : NULL;
        if (!lib) {
            fprintf(stderr, "reenter: cannot open REENTER_REAL_CUDA=%s: %s\n", path ? path : "",
                    dlerror());
            abort();
        }
    }
    return lib;
}

static void *real(const char *name)
{
    return dlsym(real_lib(), name);
}

static __thread int depth;
static int callbacks;

__attribute__((destructor)) static void report(void)
{
    fprintf(stderr, "reenter: %d callbacks\n", __atomic_load_n(&callbacks, __ATOMIC_RELAXED));
}

/* Calls the exported `name` (whoever defines it first in the global scope) unless this thread is
 * already inside a callback. */
#define CALL_BACK(name, type, ...)                                                                \
    do {                                                                                          \
        if (depth == 0) {                                                                         \
            type f = (type)dlsym(RTLD_DEFAULT, name);                                           \
            depth++;                                                                              \
            if (f) {                                                                              \
                f(__VA_ARGS__);                                                                   \
                __atomic_add_fetch(&callbacks, 1, __ATOMIC_RELAXED);                              \
            }                                                                                     \
            depth--;                                                                              \
        }                                                                                         \
    } while (0)

#define FORWARD(ret, name, params, args)                                                          \
    ret name params                                                                               \
    {                                                                                             \
        ret(*f) params = (ret(*) params)real(#name);                                             \
        return f ? f args : 999;                                                                  \
    }

FORWARD(CUresult, cuInit, (unsigned int flags), (flags))
FORWARD(CUresult, cuDeviceGet, (int *dev, int ordinal), (dev, ordinal))
FORWARD(CUresult, cuCtxSetCurrent, (void *ctx), (ctx))
FORWARD(CUresult, cuCtxGetDevice, (int *dev), (dev))
FORWARD(CUresult, cuDeviceGetUuid, (void *uuid, int dev), (uuid, dev))
FORWARD(CUresult, cuDeviceGetUuid_v2, (void *uuid, int dev), (uuid, dev))
FORWARD(CUresult, cuMemFree_v2, (devptr p), (p))
FORWARD(CUresult, cuMemGetInfo_v2, (size_t *free, size_t *total), (free, total))
FORWARD(CUresult, cuDeviceTotalMem_v2, (size_t *bytes, int dev), (bytes, dev))
FORWARD(CUresult, cuDevicePrimaryCtxRelease, (int dev), (dev))
FORWARD(CUresult, cuDevicePrimaryCtxRelease_v2, (int dev), (dev))
FORWARD(CUresult, cuGetErrorString, (CUresult e, const char **s), (e, s))
FORWARD(CUresult, cuDriverGetVersion, (int *v), (v))

/* cuGetProcAddress: answers with this library's own function for the names it wraps with a
 * callback (as a driver answers with its own), so the procaddr path reaches them too. Built with
 * -Bsymbolic, so these addresses are this library's even when libvgpu exports the same names. */
CUresult cuDeviceGetCount(int *count);
CUresult cuDevicePrimaryCtxRetain(void **ctx, int dev);
CUresult cuMemAlloc_v2(devptr *p, size_t bytes);

CUresult cuGetProcAddress(const char *symbol, void **pfn, int version, unsigned long long flags)
{
    CUresult (*f)(const char *, void **, int, unsigned long long) =
        (CUresult(*)(const char *, void **, int, unsigned long long))real("cuGetProcAddress");
    CUresult rc = f ? f(symbol, pfn, version, flags) : 999;
    if (rc == 0 && pfn && *pfn && symbol) {
        if (strcmp(symbol, "cuMemAlloc") == 0)
            *pfn = (void *)cuMemAlloc_v2;
        else if (strcmp(symbol, "cuMemFree") == 0)
            *pfn = (void *)cuMemFree_v2;
        else if (strcmp(symbol, "cuDeviceGetCount") == 0)
            *pfn = (void *)cuDeviceGetCount;
        else if (strcmp(symbol, "cuDevicePrimaryCtxRetain") == 0)
            *pfn = (void *)cuDevicePrimaryCtxRetain;
    }
    return rc;
}

CUresult cuDeviceGetCount(int *count)
{
    size_t bytes;
    CALL_BACK("cuDeviceTotalMem_v2", total_mem_fn, &bytes, 0);
    CUresult (*f)(int *) = (CUresult(*)(int *))real("cuDeviceGetCount");
    return f ? f(count) : 999;
}

CUresult cuDevicePrimaryCtxRetain(void **ctx, int dev)
{
    void *inner = NULL;
    if (depth == 0) {
        CUresult (*retain)(void **, int) =
            (CUresult(*)(void **, int))dlsym(RTLD_DEFAULT, "cuDevicePrimaryCtxRetain");
        CUresult (*release)(int) = (CUresult(*)(int))dlsym(RTLD_DEFAULT, "cuDevicePrimaryCtxRelease");
        depth++;
        if (retain && release && retain(&inner, dev) == 0) {
            release(dev);
            __atomic_add_fetch(&callbacks, 1, __ATOMIC_RELAXED);
        }
        depth--;
    }
    CUresult (*f)(void **, int) = (CUresult(*)(void **, int))real("cuDevicePrimaryCtxRetain");
    return f ? f(ctx, dev) : 999;
}

CUresult cuMemAlloc_v2(devptr *p, size_t bytes)
{
    size_t free_b, total_b;
    CALL_BACK("cuMemGetInfo_v2", mem_info_fn, &free_b, &total_b);
    CUresult (*f)(devptr *, size_t) = (CUresult(*)(devptr *, size_t))real("cuMemAlloc_v2");
    return f ? f(p, bytes) : 999;
}
