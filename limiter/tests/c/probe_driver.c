/* Probes for the driver the way optional-GPU programs do. Without a driver every lookup must
 * fail quietly (HAMi-core segfaults in dlclose(NULL) here). */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>

int main(void)
{
    printf("RTLD_DEFAULT cuMemAlloc_v2: %s\n", dlsym(RTLD_DEFAULT, "cuMemAlloc_v2") ? "found" : "NULL");
    printf("RTLD_DEFAULT cuInit: %s\n", dlsym(RTLD_DEFAULT, "cuInit") ? "found" : "NULL");
    printf("RTLD_DEFAULT nvmlInit_v2: %s\n", dlsym(RTLD_DEFAULT, "nvmlInit_v2") ? "found" : "NULL");
    printf("dlopen libcuda.so.1: %s\n", dlopen("libcuda.so.1", RTLD_NOW) ? "loaded" : "absent");
    printf("dlopen libnvidia-ml.so.1: %s\n", dlopen("libnvidia-ml.so.1", RTLD_NOW) ? "loaded" : "absent");
    return 0;
}
