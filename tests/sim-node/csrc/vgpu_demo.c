/*
 * vgpu-demo: a small CUDA driver-API program for the sim-node flow, run with exactly the environment a
 * container gets from Allocate (libvgpu.so preloaded). Linked -lcuda against the gpu-sim's libcuda.so.1.
 *
 *   vgpu-demo <kernel_ns> <run_ms>
 *
 * 1. Creates a context on device 0 and prints what cuMemGetInfo_v2 reports (libvgpu shows the cap).
 * 2. Allocates 256 MiB, then 16 MiB blocks until the driver API refuses one, and prints where and why.
 * 3. Prints "holding", then waits for a line on stdin (the flow scrapes the agent's metrics meanwhile).
 * 4. Frees everything, then launches a kernel of <kernel_ns> modelled nanoseconds (the gpu-sim's
 *    "name@kernel_ns=N" convention), synchronising after each, for <run_ms> ms, and prints the launches,
 *    the elapsed time and the GPU utilisation NVML reports for its GPU (looked up by UUID).
 *
 * Output: one line per step, "<step> key=value ...". Exit status 0 unless a step could not run.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef struct CUctx_st *CUcontext;
typedef struct CUmod_st *CUmodule;
typedef struct CUfunc_st *CUfunction;
typedef struct CUstream_st *CUstream;
typedef struct { char bytes[16]; } CUuuid;

CUresult cuInit(unsigned int flags);
CUresult cuDeviceGet(CUdevice *device, int ordinal);
CUresult cuDeviceGetName(char *name, int len, CUdevice dev);
CUresult cuDeviceGetUuid(CUuuid *uuid, CUdevice dev);
CUresult cuCtxCreate_v2(CUcontext *ctx, unsigned int flags, CUdevice dev);
CUresult cuCtxSynchronize(void);
CUresult cuMemGetInfo_v2(size_t *free_bytes, size_t *total_bytes);
CUresult cuMemAlloc_v2(CUdeviceptr *ptr, size_t bytes);
CUresult cuMemFree_v2(CUdeviceptr ptr);
CUresult cuModuleLoadData(CUmodule *module, const void *image);
CUresult cuModuleGetFunction(CUfunction *fn, CUmodule module, const char *name);
CUresult cuLaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                        unsigned bz, unsigned shared_mem, CUstream stream, void **params, void **extra);
CUresult cuGetErrorName(CUresult error, const char **name);

#define MIB (1024ull * 1024ull)
#define MAX_BLOCKS 4096

static const char *err_name(CUresult rc) {
    const char *name = NULL;
    if (cuGetErrorName(rc, &name) != 0 || name == NULL) return "?";
    return name;
}

#define CHECK(call)                                                                             \
    do {                                                                                        \
        CUresult rc_ = (call);                                                                  \
        if (rc_ != 0) {                                                                         \
            printf("error call=%s rc=%d name=%s\n", #call, rc_, err_name(rc_));                 \
            return 1;                                                                           \
        }                                                                                       \
    } while (0)

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

/* The GPU's utilisation as NVML reports it (-1 when NVML cannot say). */
static int nvml_utilization(const char *uuid) {
    void *nvml = dlopen("libnvidia-ml.so.1", RTLD_NOW);
    if (nvml == NULL) return -1;
    typedef int (*init_t)(void);
    typedef int (*by_uuid_t)(const char *, void **);
    typedef struct { unsigned int gpu; unsigned int memory; } util_t;
    typedef int (*util_fn_t)(void *, util_t *);
    init_t init = (init_t)dlsym(nvml, "nvmlInit_v2");
    by_uuid_t by_uuid = (by_uuid_t)dlsym(nvml, "nvmlDeviceGetHandleByUUID");
    util_fn_t get_util = (util_fn_t)dlsym(nvml, "nvmlDeviceGetUtilizationRates");
    void *device = NULL;
    util_t util = {0, 0};
    if (init == NULL || by_uuid == NULL || get_util == NULL || init() != 0 ||
        by_uuid(uuid, &device) != 0 || get_util(device, &util) != 0)
        return -1;
    return (int)util.gpu;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: vgpu-demo <kernel_ns> <run_ms>\n");
        return 2;
    }
    unsigned long long kernel_ns = strtoull(argv[1], NULL, 10);
    double run_ms = strtod(argv[2], NULL);
    setvbuf(stdout, NULL, _IOLBF, 0);

    CUdevice dev;
    CUcontext ctx;
    char name[96] = {0};
    CUuuid raw;
    CHECK(cuInit(0));
    CHECK(cuDeviceGet(&dev, 0));
    CHECK(cuDeviceGetName(name, (int)sizeof name, dev));
    CHECK(cuDeviceGetUuid(&raw, dev));
    unsigned char *u = (unsigned char *)raw.bytes;
    char uuid[64];
    snprintf(uuid, sizeof uuid,
             "GPU-%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", u[0], u[1],
             u[2], u[3], u[4], u[5], u[6], u[7], u[8], u[9], u[10], u[11], u[12], u[13], u[14], u[15]);
    CHECK(cuCtxCreate_v2(&ctx, 0, dev));
    size_t free_bytes = 0, total_bytes = 0;
    CHECK(cuMemGetInfo_v2(&free_bytes, &total_bytes));
    printf("device uuid=%s total_mib=%llu free_mib=%llu name=%s\n", uuid,
           (unsigned long long)(total_bytes / MIB), (unsigned long long)(free_bytes / MIB), name);

    static CUdeviceptr blocks[MAX_BLOCKS];
    int count = 0;
    unsigned long long held = 0;
    CUresult refused = 0;
    unsigned long long refused_mib = 0;
    const unsigned long long steps[2] = {256, 16};
    for (int s = 0; s < 2; s++) {
        while (count < MAX_BLOCKS) {
            CUresult rc = cuMemAlloc_v2(&blocks[count], steps[s] * MIB);
            if (rc != 0) {
                refused = rc;
                refused_mib = steps[s];
                break;
            }
            count++;
            held += steps[s];
        }
    }
    CHECK(cuMemGetInfo_v2(&free_bytes, &total_bytes));
    printf("alloc held_mib=%llu refused_mib=%llu rc=%d name=%s free_mib=%llu\n", held, refused_mib,
           refused, refused ? err_name(refused) : "none", (unsigned long long)(free_bytes / MIB));

    printf("holding\n");
    char line[16];
    if (fgets(line, sizeof line, stdin) == NULL) {
        /* The flow went away: still clean up. */
    }
    for (int i = 0; i < count; i++) CHECK(cuMemFree_v2(blocks[i]));

    CUmodule module;
    CUfunction kernel;
    static const char image[] = "vgpu-demo module";
    char kernel_name[64];
    snprintf(kernel_name, sizeof kernel_name, "spin@kernel_ns=%llu", kernel_ns);
    CHECK(cuModuleLoadData(&module, image));
    CHECK(cuModuleGetFunction(&kernel, module, kernel_name));
    unsigned long long launches = 0;
    double start = now_ms();
    while (now_ms() - start < run_ms) {
        CHECK(cuLaunchKernel(kernel, 1, 1, 1, 256, 1, 1, 0, NULL, NULL, NULL));
        CHECK(cuCtxSynchronize());
        launches++;
    }
    double elapsed = now_ms() - start;
    int util = nvml_utilization(uuid);
    printf("kernels launches=%llu kernel_ns=%llu elapsed_ms=%.0f busy_pct=%.1f nvml_gpu_pct=%d sm_limit=%s\n",
           launches, kernel_ns, elapsed, 100.0 * (double)launches * (double)kernel_ns / 1e6 / elapsed,
           util, getenv("CUDA_DEVICE_SM_LIMIT") ? getenv("CUDA_DEVICE_SM_LIMIT") : "unset");
    return 0;
}
