/*
 * gpu-sim-bypass: a process that holds device memory without going through any limiter, for the
 * node agent's memory backstop tests (a static binary, or a process started without the preload).
 *
 *   gpu-sim-bypass <cuda-library-path> <device-ordinal> <bytes> [<bytes>...]
 *
 * dlopens the given libcuda (only an LD_PRELOAD the caller sets would interpose), cuInit(0),
 * cuDeviceGet(ordinal), cuCtxCreate_v2 on it, then cuMemAlloc_v2 for each size, printing
 * "alloc <bytes> <CUresult>" per size (a failed allocation is reported, not fatal). Then prints
 * "ready <getpid()>" and sleeps until a signal: SIGTERM or SIGINT end it normally (exit 0, so the
 * driver's exit handlers run, as a process returning from main); anything else kills it as usual.
 * Setup failures print one line ("dlopen ...", "cuInit <code>", ...) on stdout and exit 1; bad
 * arguments exit 2. Every line is flushed at once.
 */
#include <dlfcn.h>
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

/* The CUDA driver API types this program uses, as cuda.h declares them. */
typedef int CUresult;
typedef int CUdevice;
typedef struct CUctx_st *CUcontext;
typedef unsigned long long CUdeviceptr;

typedef CUresult (*cu_init_fn)(unsigned int);
typedef CUresult (*cu_device_get_fn)(CUdevice *, int);
typedef CUresult (*cu_ctx_create_fn)(CUcontext *, unsigned int, CUdevice);
typedef CUresult (*cu_mem_alloc_fn)(CUdeviceptr *, size_t);

static int usage(void)
{
    fprintf(stderr,
            "usage: gpu-sim-bypass <cuda-library-path> <device-ordinal> <bytes> [<bytes>...]\n");
    return 2;
}

static int parse_u64(const char *s, unsigned long long *out)
{
    char *end;

    if (s[0] < '0' || s[0] > '9')
        return -1;
    errno = 0;
    *out = strtoull(s, &end, 10);
    return errno != 0 || *end != '\0' ? -1 : 0;
}

static void *symbol(void *lib, const char *name)
{
    void *f = dlsym(lib, name);

    if (f == NULL)
        printf("dlsym %s: %s\n", name, dlerror());
    return f;
}

int main(int argc, char **argv)
{
    unsigned long long ordinal, bytes;
    cu_init_fn cu_init;
    cu_device_get_fn cu_device_get;
    cu_ctx_create_fn cu_ctx_create;
    cu_mem_alloc_fn cu_mem_alloc;
    CUdevice dev;
    CUcontext ctx;
    sigset_t stop;
    void *lib;
    CUresult r;
    int i, sig;

    setvbuf(stdout, NULL, _IONBF, 0);
    if (argc < 4 || parse_u64(argv[2], &ordinal) != 0 || ordinal > 1024)
        return usage();
    for (i = 3; i < argc; i++) {
        if (parse_u64(argv[i], &bytes) != 0)
            return usage();
    }

    /* Block the ending signals before anything starts threads, so every thread inherits the mask
     * and sigwait below is the only receiver. */
    sigemptyset(&stop);
    sigaddset(&stop, SIGTERM);
    sigaddset(&stop, SIGINT);
    if (pthread_sigmask(SIG_BLOCK, &stop, NULL) != 0) {
        printf("pthread_sigmask failed\n");
        return 1;
    }

    lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (lib == NULL) {
        printf("dlopen %s: %s\n", argv[1], dlerror());
        return 1;
    }
    cu_init = (cu_init_fn)symbol(lib, "cuInit");
    cu_device_get = (cu_device_get_fn)symbol(lib, "cuDeviceGet");
    cu_ctx_create = (cu_ctx_create_fn)symbol(lib, "cuCtxCreate_v2");
    cu_mem_alloc = (cu_mem_alloc_fn)symbol(lib, "cuMemAlloc_v2");
    if (cu_init == NULL || cu_device_get == NULL || cu_ctx_create == NULL || cu_mem_alloc == NULL)
        return 1;

    if ((r = cu_init(0)) != 0) {
        printf("cuInit %d\n", r);
        return 1;
    }
    if ((r = cu_device_get(&dev, (int)ordinal)) != 0) {
        printf("cuDeviceGet %d\n", r);
        return 1;
    }
    if ((r = cu_ctx_create(&ctx, 0, dev)) != 0) {
        printf("cuCtxCreate_v2 %d\n", r);
        return 1;
    }
    for (i = 3; i < argc; i++) {
        CUdeviceptr ptr = 0;
        parse_u64(argv[i], &bytes);
        r = cu_mem_alloc(&ptr, (size_t)bytes);
        printf("alloc %llu %d\n", bytes, r);
    }
    printf("ready %ld\n", (long)getpid());

    for (;;) {
        if (sigwait(&stop, &sig) == 0 && (sig == SIGTERM || sig == SIGINT))
            return 0; /* a normal exit: the driver library's destructor gives the memory back */
    }
}
