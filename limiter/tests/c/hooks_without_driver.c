/* Calls our hooks on a machine without libcuda.so.1 / libnvidia-ml.so.1: each must return an
 * error code. They are reached as a directly linked program reaches them, through weak references
 * the dynamic linker binds to the preloaded exports (not through dlsym(RTLD_NEXT, ...), which
 * without a driver answers NULL, as it does without the preload). */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stddef.h>
#include <stdio.h>

typedef int (*init_fn)(unsigned int);
typedef int (*alloc_fn)(unsigned long long *, size_t);
typedef int (*nvml_init_fn)(void);

int cuInit(unsigned int) __attribute__((weak));
int cuMemAlloc_v2(unsigned long long *, size_t) __attribute__((weak));
int nvmlInit_v2(void) __attribute__((weak));

int main(void)
{
    init_fn cu_init = cuInit;
    alloc_fn cu_alloc = cuMemAlloc_v2;
    nvml_init_fn nvml_init = nvmlInit_v2;
    unsigned long long p = 0;
    if (!cu_init || !cu_alloc || !nvml_init) {
        printf("hooks not reachable\n");
        return 1;
    }
    printf("cuInit: %d\n", cu_init(0));
    printf("cuInit again: %d\n", cu_init(0));
    printf("cuMemAlloc_v2: %d\n", cu_alloc(&p, 1 << 20));
    printf("nvmlInit_v2: %d\n", nvml_init());
    return 0;
}
