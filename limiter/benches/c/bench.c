/* Times the hot paths through one of the ways programs reach the driver (argv[1]):
 *   direct   - the symbols linked with -lcuda
 *   dlsym    - dlopen("libcuda.so.1") + dlsym(handle, "cuLaunchKernel"/"cuMemAlloc_v2"/...)
 *   procaddr - cuGetProcAddress (found with dlsym), CUDA 12.4 versions
 * argv[2] = launches, argv[3] = alloc/free pairs, argv[4] = allocation size in bytes.
 * Prints "launch_ns <ns per cuLaunchKernel>" and "alloc_free_ns <ns per cuMemAlloc+cuMemFree>". */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef unsigned long long devptr;
typedef int (*alloc_fn)(devptr *, size_t);
typedef int (*free_fn)(devptr);
typedef int (*launch_fn)(void *, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                         unsigned, void *, void **, void **);
typedef int (*gpa_fn)(const char *, void **, int, unsigned long long);

int cuInit(unsigned int);
int cuDeviceGet(int *, int);
int cuDevicePrimaryCtxRetain(void **, int);
int cuCtxSetCurrent(void *);
int cuModuleLoadData(void **, const void *);
int cuModuleGetFunction(void **, void *, const char *);
int cuMemAlloc_v2(devptr *, size_t);
int cuMemFree_v2(devptr);
int cuLaunchKernel(void *, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                   void *, void **, void **);

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
    return NULL;
}

static double now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

int main(int argc, char **argv)
{
    const char *mode = argc > 1 ? argv[1] : "direct";
    long launches = argc > 2 ? atol(argv[2]) : 1000000;
    long pairs = argc > 3 ? atol(argv[3]) : 100000;
    size_t size = argc > 4 ? (size_t)atoll(argv[4]) : ((size_t)1 << 20);
    static const char image[] = "fake cubin";
    void *ctx = NULL, *mod = NULL, *fn = NULL;
    int dev = 0;
    alloc_fn p_alloc;
    free_fn p_free;
    launch_fn p_launch;
    double t0;
    long i;

    if (cuInit(0) != 0 || cuDeviceGet(&dev, 0) != 0 || cuDevicePrimaryCtxRetain(&ctx, dev) != 0 ||
        cuCtxSetCurrent(ctx) != 0 || cuModuleLoadData(&mod, image) != 0 ||
        cuModuleGetFunction(&fn, mod, "k") != 0) {
        printf("setup failed\n");
        return 1;
    }
    if (strcmp(mode, "direct") == 0) {
        p_alloc = cuMemAlloc_v2;
        p_free = cuMemFree_v2;
        p_launch = cuLaunchKernel;
    } else {
        void *lib = dlopen("libcuda.so.1", RTLD_NOW);
        p_alloc = (alloc_fn)lookup(mode, lib, "cuMemAlloc", "cuMemAlloc_v2");
        p_free = (free_fn)lookup(mode, lib, "cuMemFree", "cuMemFree_v2");
        p_launch = (launch_fn)lookup(mode, lib, "cuLaunchKernel", "cuLaunchKernel");
    }
    if (!p_alloc || !p_free || !p_launch) {
        printf("lookup failed\n");
        return 1;
    }

    /* Warm up both paths (lazy resolution, first-use initialisation, page faults). */
    for (i = 0; i < 1000; i++) {
        devptr d = 0;
        if (p_launch(fn, 1, 1, 1, 32, 1, 1, 0, NULL, NULL, NULL) != 0 || p_alloc(&d, size) != 0 ||
            p_free(d) != 0) {
            printf("warm-up failed\n");
            return 1;
        }
    }

    t0 = now_ns();
    for (i = 0; i < launches; i++)
        if (p_launch(fn, 1, 1, 1, 32, 1, 1, 0, NULL, NULL, NULL) != 0) {
            printf("launch failed\n");
            return 1;
        }
    printf("launch_ns %.3f\n", (now_ns() - t0) / (double)launches);

    t0 = now_ns();
    for (i = 0; i < pairs; i++) {
        devptr d = 0;
        if (p_alloc(&d, size) != 0 || p_free(d) != 0) {
            printf("alloc/free failed\n");
            return 1;
        }
    }
    printf("alloc_free_ns %.3f\n", (now_ns() - t0) / (double)pairs);
    return 0;
}
