/* Calls our hooks (reached with RTLD_NEXT from the program, i.e. the preloaded exports) on a
 * machine without libcuda.so.1 / libnvidia-ml.so.1: each must return an error code. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stddef.h>
#include <stdio.h>

typedef int (*init_fn)(unsigned int);
typedef int (*alloc_fn)(unsigned long long *, size_t);
typedef int (*nvml_init_fn)(void);

int main(void)
{
    init_fn cu_init = (init_fn)dlsym(RTLD_NEXT, "cuInit");
    alloc_fn cu_alloc = (alloc_fn)dlsym(RTLD_NEXT, "cuMemAlloc_v2");
    nvml_init_fn nvml_init = (nvml_init_fn)dlsym(RTLD_NEXT, "nvmlInit_v2");
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
