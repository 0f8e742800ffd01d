/* Allocates 256 MiB chunks until refused, through one of the paths programs use to reach the
 * driver (argv[1]):
 *   direct      - the symbols linked with -lcuda (cuMemAlloc_v2, ...)
 *   dlsym       - dlopen("libcuda.so.1") + dlsym(handle, "cuMemAlloc_v2")
 *   procaddr    - cuGetProcAddress("cuMemAlloc", 12040), itself found with dlsym
 *   procaddr_v2 - cuGetProcAddress_v2, the CUDA 12 runtime's way
 * and prints what it saw, one fact per line. Also reports NVML's view of device 0 when
 * libnvidia-ml.so.1 is loadable. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef unsigned long long devptr;
typedef int (*alloc_fn)(devptr *, size_t);
typedef int (*free_fn)(devptr);
typedef int (*info_fn)(size_t *, size_t *);
typedef int (*total_fn)(size_t *, int);
typedef int (*gpa_fn)(const char *, void **, int, unsigned long long);
typedef int (*gpa2_fn)(const char *, void **, int, unsigned long long, int *);

int cuInit(unsigned int);
int cuDeviceGet(int *, int);
int cuDevicePrimaryCtxRetain(void **, int);
int cuCtxSetCurrent(void *);
int cuMemAlloc_v2(devptr *, size_t);
int cuMemFree_v2(devptr);
int cuMemGetInfo_v2(size_t *, size_t *);
int cuDeviceTotalMem_v2(size_t *, int);

static alloc_fn p_alloc;
static free_fn p_free;
static info_fn p_info;
static total_fn p_total;

static void *lookup(const char *mode, void *lib, const char *base, const char *versioned)
{
    void *p = NULL;
    if (strcmp(mode, "dlsym") == 0)
        return dlsym(lib, versioned);
    if (strcmp(mode, "procaddr") == 0) {
        gpa_fn gpa = (gpa_fn)dlsym(lib, "cuGetProcAddress");
        if (!gpa || gpa(base, &p, 12040, 0) != 0)
            return NULL;
        return p;
    }
    if (strcmp(mode, "procaddr_v2") == 0) {
        int status = -1;
        gpa2_fn gpa = (gpa2_fn)dlsym(lib, "cuGetProcAddress_v2");
        if (!gpa || gpa(base, &p, 12040, 0, &status) != 0 || status != 0)
            return NULL;
        return p;
    }
    return NULL;
}

static void nvml_view(void)
{
    typedef struct { unsigned long long total, free, used; } mem_t;
    void *lib = dlopen("libnvidia-ml.so.1", RTLD_NOW);
    int (*init)(void);
    int (*by_index)(unsigned int, void **);
    int (*info)(void *, mem_t *);
    void *dev = NULL;
    mem_t m;
    if (!lib)
        return;
    init = (int (*)(void))dlsym(lib, "nvmlInit_v2");
    by_index = (int (*)(unsigned int, void **))dlsym(lib, "nvmlDeviceGetHandleByIndex_v2");
    info = (int (*)(void *, mem_t *))dlsym(lib, "nvmlDeviceGetMemoryInfo");
    if (init && by_index && info && init() == 0 && by_index(0, &dev) == 0 && info(dev, &m) == 0)
        printf("nvml total %llu used %llu free %llu\n", m.total, m.used, m.free);
}

int main(int argc, char **argv)
{
    const char *mode = argc > 1 ? argv[1] : "direct";
    devptr ptrs[1024];
    int n = 0, rc = 0, dev = 0;
    size_t chunk = (size_t)256 << 20, free_b = 0, total_b = 0;
    void *ctx = NULL;

    if (cuInit(0) != 0 || cuDeviceGet(&dev, 0) != 0 || cuDevicePrimaryCtxRetain(&ctx, dev) != 0 ||
        cuCtxSetCurrent(ctx) != 0) {
        printf("no context\n");
        return 1;
    }
    if (strcmp(mode, "direct") == 0) {
        p_alloc = cuMemAlloc_v2;
        p_free = cuMemFree_v2;
        p_info = cuMemGetInfo_v2;
        p_total = cuDeviceTotalMem_v2;
    } else {
        void *lib = dlopen("libcuda.so.1", RTLD_NOW);
        p_alloc = (alloc_fn)lookup(mode, lib, "cuMemAlloc", "cuMemAlloc_v2");
        p_free = (free_fn)lookup(mode, lib, "cuMemFree", "cuMemFree_v2");
        p_info = (info_fn)lookup(mode, lib, "cuMemGetInfo", "cuMemGetInfo_v2");
        p_total = (total_fn)lookup(mode, lib, "cuDeviceTotalMem", "cuDeviceTotalMem_v2");
    }
    if (!p_alloc || !p_free || !p_info || !p_total) {
        printf("lookup failed\n");
        return 1;
    }
    if (p_total(&total_b, dev) == 0)
        printf("device total %zu\n", total_b);
    while (n < 1024 && (rc = p_alloc(&ptrs[n], chunk)) == 0)
        n++;
    printf("allocated %d chunks, then rc %d\n", n, rc);
    if (p_info(&free_b, &total_b) == 0)
        printf("full: free %zu total %zu\n", free_b, total_b);
    nvml_view();
    if (n > 0) {
        printf("free rc %d\n", p_free(ptrs[--n]));
        if (p_info(&free_b, &total_b) == 0)
            printf("after one free: free %zu total %zu\n", free_b, total_b);
        rc = p_alloc(&ptrs[n], chunk);
        printf("realloc rc %d\n", rc);
        if (rc == 0)
            n++;
    }
    printf("unknown free rc %d\n", p_free((devptr)0x1234000));
    while (n > 0)
        p_free(ptrs[--n]);
    if (p_info(&free_b, &total_b) == 0)
        printf("empty: free %zu total %zu\n", free_b, total_b);
    return 0;
}
