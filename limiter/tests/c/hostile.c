/* The tenant's own processes doing ordinary but awkward things (limiter/tests/hostile_process.rs).
 * argv[1] picks the case; every case prints one fact per line.
 *
 *   forkinit <n> <path>      n times: a fresh process whose second thread makes its first CUDA and
 *                            NVML calls (through <path>: direct|dlsym|procaddr) while the main
 *                            thread forks CHILDREN times meanwhile; each child makes its own calls
 *                            and must exit within BOUND_S seconds; a round counts as its worst
 *                            child. Prints "ok <k>", "hung in libvgpu
 *                            <k>", "hung in the driver <k>", "other failures <k>".
 *   nvml <path>              nvmlDeviceGetMemoryInfo and _v2 of device 0 (path direct|dlsym):
 *                            "v1 total T used U free F" and "v2 total T reserved R used U free F"
 *   refusals <n> <sleep_ms>  n allocations past the cap, a pause, one more: "refused <k>"
 *   total                    cuDeviceTotalMem_v2 of device 0: "total rc <rc>", "bytes <n>"
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <execinfo.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define BOUND_S 3

typedef unsigned long long devptr;
typedef int (*alloc_fn)(devptr *, size_t);
typedef int (*free_fn)(devptr);
typedef int (*init_fn)(unsigned int);
typedef int (*gpa_fn)(const char *, void **, int, unsigned long long);

int cuInit(unsigned int);
int cuDeviceGet(int *, int);
int cuDevicePrimaryCtxRetain(void **, int);
int cuCtxSetCurrent(void *);
int cuMemAlloc_v2(devptr *, size_t);
int cuMemFree_v2(devptr);
int cuDeviceTotalMem_v2(size_t *, int);

typedef struct { unsigned long long total, free, used; } nvml_mem;
typedef struct { unsigned int version; unsigned long long total, reserved, free, used; } nvml_mem2;
int nvmlInit_v2(void);
int nvmlDeviceGetHandleByIndex_v2(unsigned int, void **);
int nvmlDeviceGetMemoryInfo(void *, nvml_mem *);
int nvmlDeviceGetMemoryInfo_v2(void *, nvml_mem2 *);

/* --- fork at any moment ------------------------------------------------------------------- */

static const char *g_path;
static volatile int g_started;

/* The driver entry points, found through the chosen access path. */
static alloc_fn p_alloc;
static free_fn p_free;
static init_fn p_init;

static void resolve(void)
{
    if (strcmp(g_path, "direct") == 0) {
        p_init = cuInit;
        p_alloc = cuMemAlloc_v2;
        p_free = cuMemFree_v2;
        return;
    }
    void *lib = dlopen("libcuda.so.1", RTLD_NOW);
    if (!lib)
        return;
    p_init = (init_fn)dlsym(lib, "cuInit");
    if (strcmp(g_path, "procaddr") == 0) {
        gpa_fn gpa = (gpa_fn)dlsym(lib, "cuGetProcAddress");
        void *a = NULL, *f = NULL;
        if (gpa && gpa("cuMemAlloc", &a, 12040, 0) == 0 && gpa("cuMemFree", &f, 12040, 0) == 0) {
            p_alloc = (alloc_fn)a;
            p_free = (free_fn)f;
        }
        return;
    }
    p_alloc = (alloc_fn)dlsym(lib, "cuMemAlloc_v2");
    p_free = (free_fn)dlsym(lib, "cuMemFree_v2");
}

/* What a program does first: CUDA and NVML initialisation, a context, an allocation. Results
 * are not checked: a forked child gets NOT_INITIALIZED from a driver its parent initialised. */
static volatile int g_inited;

static void first_calls(void)
{
    int dev = 0;
    void *ctx = NULL, *nvdev = NULL;
    devptr p = 0;
    nvml_mem m;
    resolve();
    if (p_init)
        p_init(0);
    g_inited = 1;
    cuDeviceGet(&dev, 0);
    if (cuDevicePrimaryCtxRetain(&ctx, dev) == 0)
        cuCtxSetCurrent(ctx);
    if (p_alloc && p_alloc(&p, 1 << 20) == 0 && p_free)
        p_free(p);
    if (nvmlInit_v2() == 0 && nvmlDeviceGetHandleByIndex_v2(0, &nvdev) == 0)
        nvmlDeviceGetMemoryInfo(nvdev, &m);
}

static void *first_thread(void *arg)
{
    (void)arg;
    g_started = 1;
    first_calls();
    return NULL;
}

/* A child still running after BOUND_S seconds prints its stack and says whose code it is stuck
 * in: the first frame (after this handler, the signal trampoline and libc's waiting functions)
 * that is neither this program nor libc. Exit 42: libvgpu (ours to fix); 43: the driver (a
 * driver whose own lock was held by a thread the fork did not copy). */
static void on_alarm(int sig)
{
    void *frames[32];
    int n = backtrace(frames, 32);
    int code = 44;
    Dl_info self, info;
    (void)sig;
    dladdr((void *)on_alarm, &self);
    for (int i = 1; i < n; i++) {
        if (!dladdr(frames[i], &info) || !info.dli_fname)
            continue;
        if (info.dli_fbase == self.dli_fbase || strstr(info.dli_fname, "libc.so") ||
            strstr(info.dli_fname, "libpthread"))
            continue;
        code = strstr(info.dli_fname, "libvgpu") ? 42 : 43;
        break;
    }
    dprintf(2, "child %d stuck (%s):\n", (int)getpid(),
            code == 42 ? "libvgpu" : code == 43 ? "driver" : "unknown");
    backtrace_symbols_fd(frames, n, 2);
    _exit(code);
}

/* One fresh process: a thread starts the first calls, the main thread forks CHILDREN times
 * meanwhile, at pseudo-random gaps of 0-300 us (so the forks sample the whole first-call window).
 * Returns the worst child's code: 0 if all finished. */
#define CHILDREN 8
static int one_round(unsigned seed)
{
    pthread_t t;
    pid_t kids[CHILDREN];
    int worst = 0;
    pthread_create(&t, NULL, first_thread, NULL);
    while (!g_started)
        sched_yield();
    for (int k = 0; k < CHILDREN; k++) {
        struct timespec gap = {0, (long)(seed % 300) * 1000};
        seed = seed * 1103515245u + 12345u;
        /* The first child at once (libvgpu's own initialisation, inside the cuInit hook before
         * the driver's); the others after the driver's cuInit, whose own lock a fork would
         * otherwise catch held (the fake's, like any driver's, is not fork-safe mid-init). */
        if (k == 1)
            while (!g_inited)
                sched_yield();
        if (k > 0)
            nanosleep(&gap, NULL);
        kids[k] = fork();
        if (kids[k] == 0) {
            signal(SIGALRM, on_alarm);
            alarm(BOUND_S);
            first_calls();
            _exit(0);
        }
    }
    for (int k = 0; k < CHILDREN; k++) {
        int status = 0, code;
        waitpid(kids[k], &status, 0);
        code = WIFEXITED(status) ? WEXITSTATUS(status) : 1; /* a signal: a crash */
        /* Rank: libvgpu hang (42) > crash/other > driver hang (43) > fine (0). */
        if (code == 42 || (worst != 42 && code != 0 && code != 43) || (worst == 0 && code == 43))
            worst = code;
    }
    pthread_join(t, NULL);
    return worst;
}

static int forkinit(int n)
{
    int ok = 0, hung_ours = 0, hung_driver = 0, other = 0;
    for (int i = 0; i < n; i++) {
        pid_t p = fork();
        int status = 0;
        if (p == 0)
            _exit(one_round((unsigned)i * 2654435761u));
        waitpid(p, &status, 0);
        int code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
        if (code == 0)
            ok++;
        else if (code == 42)
            hung_ours++;
        else if (code == 43)
            hung_driver++;
        else
            other++;
    }
    printf("ok %d\nhung in libvgpu %d\nhung in the driver %d\nother failures %d\n", ok,
           hung_ours, hung_driver, other);
    return 0;
}

/* --- NVML memory info --------------------------------------------------------------------- */

static int nvml(const char *path)
{
    int (*init)(void) = nvmlInit_v2;
    int (*by_index)(unsigned int, void **) = nvmlDeviceGetHandleByIndex_v2;
    int (*info)(void *, nvml_mem *) = nvmlDeviceGetMemoryInfo;
    int (*info2)(void *, nvml_mem2 *) = nvmlDeviceGetMemoryInfo_v2;
    void *dev = NULL;
    nvml_mem m;
    nvml_mem2 m2;
    int dev0 = 0;
    void *ctx = NULL;
    devptr p = 0;
    if (strcmp(path, "dlsym") == 0) {
        void *lib = dlopen("libnvidia-ml.so.1", RTLD_NOW);
        if (!lib)
            return 2;
        init = (int (*)(void))dlsym(lib, "nvmlInit_v2");
        by_index = (int (*)(unsigned int, void **))dlsym(lib, "nvmlDeviceGetHandleByIndex_v2");
        info = (int (*)(void *, nvml_mem *))dlsym(lib, "nvmlDeviceGetMemoryInfo");
        info2 = (int (*)(void *, nvml_mem2 *))dlsym(lib, "nvmlDeviceGetMemoryInfo_v2");
    }
    /* Something charged: a context and 256 MiB. */
    cuInit(0);
    cuDeviceGet(&dev0, 0);
    if (cuDevicePrimaryCtxRetain(&ctx, dev0) == 0)
        cuCtxSetCurrent(ctx);
    printf("alloc rc %d\n", cuMemAlloc_v2(&p, 256u << 20));
    if (init() != 0 || by_index(0, &dev) != 0)
        return 3;
    printf("v1 rc %d\n", info(dev, &m));
    printf("v1 total %llu used %llu free %llu\n", m.total, m.used, m.free);
    m2.version = (unsigned int)sizeof(nvml_mem2) | 2u << 24;
    printf("v2 rc %d\n", info2(dev, &m2));
    printf("v2 total %llu reserved %llu used %llu free %llu\n", m2.total, m2.reserved, m2.used,
           m2.free);
    return 0;
}

/* --- refusal logs ------------------------------------------------------------------------- */

static int refusals(int n, int sleep_ms)
{
    int dev = 0, refused = 0;
    void *ctx = NULL;
    devptr p = 0;
    struct timespec pause = {sleep_ms / 1000, (long)(sleep_ms % 1000) * 1000000};
    cuInit(0);
    cuDeviceGet(&dev, 0);
    if (cuDevicePrimaryCtxRetain(&ctx, dev) == 0)
        cuCtxSetCurrent(ctx);
    for (int i = 0; i < n; i++)
        refused += cuMemAlloc_v2(&p, (size_t)4 << 30) == 2;
    nanosleep(&pause, NULL);
    refused += cuMemAlloc_v2(&p, (size_t)4 << 30) == 2;
    printf("refused %d\n", refused);
    return 0;
}

static int total(void)
{
    size_t bytes = 0;
    cuInit(0);
    printf("total rc %d\n", cuDeviceTotalMem_v2(&bytes, 0));
    printf("bytes %zu\n", bytes);
    return 0;
}

int main(int argc, char **argv)
{
    const char *mode = argc > 1 ? argv[1] : "";
    setvbuf(stdout, NULL, _IONBF, 0);
    if (strcmp(mode, "forkinit") == 0 && argc > 3) {
        g_path = argv[3];
        return forkinit(atoi(argv[2]));
    }
    if (strcmp(mode, "nvml") == 0 && argc > 2)
        return nvml(argv[2]);
    if (strcmp(mode, "refusals") == 0 && argc > 3)
        return refusals(atoi(argv[2]), atoi(argv[3]));
    if (strcmp(mode, "total") == 0)
        return total();
    fprintf(stderr, "usage: hostile forkinit|nvml|refusals|total ...\n");
    return 64;
}
