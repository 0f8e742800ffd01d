/* Link-time stand-in for the probe (old_glibc_probe.c), so that it can call dlsym and the CUDA entry points
 * without linking libdl or libcuda (which needs libpthread and libdl). Its definitions carry the version
 * VGPU_E2E_STUB (old_glibc_stub.map): libvgpu.so, preloaded, interposes them (an unversioned definition
 * satisfies a versioned reference), and the limiter's own search for glibc's dlsym
 * (dlvsym(RTLD_NEXT, "dlsym", "GLIBC_...")) never takes this one. Each returns a value the real ones never
 * do, so a call that reached the stub shows. */
#include <stddef.h>

void *dlsym(void *handle, const char *name) {
    (void)handle;
    (void)name;
    return (void *)0x57ab;
}

int cuInit(unsigned flags) {
    (void)flags;
    return 5757;
}

int cuMemAlloc_v2(unsigned long long *ptr, size_t size) {
    (void)ptr;
    (void)size;
    return 5757;
}
