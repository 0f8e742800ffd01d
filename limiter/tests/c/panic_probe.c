/* A bug in a hook (a panic, provoked by the test-only feature `panic-probe` with cuInit's flags)
 * must be contained: the caller gets 999 (CUDA_ERROR_UNKNOWN), the process goes on, and the hooks
 * keep enforcing the cap afterwards (the re-entry flag is not left set by the unwinding). Linked
 * with the gpu-sim's fake libcuda.so.1; run with a 1 GiB cap. */
#include <stdio.h>

typedef unsigned long long devptr;
int cuInit(unsigned int);
int cuDeviceGet(int *, int);
int cuDevicePrimaryCtxRetain(void **, int);
int cuCtxSetCurrent(void *);
int cuMemAlloc_v2(devptr *, size_t);
int cuMemFree_v2(devptr);

int main(void)
{
    int dev = -1;
    void *ctx = NULL;
    devptr small = 0, big = 0;
    printf("probe %d\n", cuInit(0x70616e63));
    printf("probe again %d\n", cuInit(0x70616e63));
    printf("init %d\n", cuInit(0));
    if (cuDeviceGet(&dev, 0) != 0 || cuDevicePrimaryCtxRetain(&ctx, dev) != 0 ||
        cuCtxSetCurrent(ctx) != 0) {
        printf("no context\n");
        return 1;
    }
    printf("small %d\n", cuMemAlloc_v2(&small, 64 << 20));
    printf("over the cap %d\n", cuMemAlloc_v2(&big, 2ULL << 30));
    printf("free %d\n", cuMemFree_v2(small));
    return 0;
}
