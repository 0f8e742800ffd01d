/* Times N cuLaunchKernel calls (direct link) of a kernel that takes no simulated time, after a
 * warm-up, so that only the cost of the launch path is measured (gpu-sim + libvgpu.so if
 * preloaded). usage: sm_launch <launches>. Prints "launch_ns <ns per launch>". */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

typedef int CUresult;
CUresult cuInit(unsigned int);
CUresult cuDeviceGet(int *, int);
CUresult cuCtxCreate_v2(void **, unsigned int, int);
CUresult cuModuleLoadData(void **, const void *);
CUresult cuModuleGetFunction(void **, void *, const char *);
CUresult cuLaunchKernel(void *, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                        unsigned, void *, void **, void **);

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 200000;
    int dev;
    void *ctx, *mod, *f;
    if (cuInit(0) || cuDeviceGet(&dev, 0) || cuCtxCreate_v2(&ctx, 0, dev) ||
        cuModuleLoadData(&mod, "image") || cuModuleGetFunction(&f, mod, "noop")) {
        fprintf(stderr, "setup failed\n");
        return 2;
    }
    for (long i = 0; i < n / 10 + 1; i++)
        if (cuLaunchKernel(f, 1, 1, 1, 32, 1, 1, 0, NULL, NULL, NULL)) {
            fprintf(stderr, "launch failed\n");
            return 2;
        }
    uint64_t t0 = now_ns();
    for (long i = 0; i < n; i++)
        cuLaunchKernel(f, 1, 1, 1, 32, 1, 1, 0, NULL, NULL, NULL);
    uint64_t t1 = now_ns();
    printf("launch_ns %.1f\n", (double)(t1 - t0) / (double)n);
    return 0;
}
