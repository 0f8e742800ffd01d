/*
 * A GPU workload for the SM-cap tests: launches one kernel after another for a while and reports
 * what it did. Driver prototypes are declared by hand (no cuda.h), with the real ABI.
 *
 * usage: sm_load <seconds> <function name> <entry> <access> [sync_every] [grid_x] [device]
 *   function name: gpu-sim duration syntax, e.g. "spin@kernel_ns=1000000" (1 ms whatever the grid)
 *   entry:  kernel | kernel_ptsz | ex | ex_ptsz | coop | coop_ptsz | graph | graph_ptsz
 *   access: direct (linked -lcuda) | dlsym (dlopen + dlsym) | procaddr (cuGetProcAddress)
 *   sync_every: cuCtxSynchronize after every N launches (default 1; 0 = never)
 *   grid_x: blocks (default 10, 256 threads each)
 *   device: CUDA ordinal (default 0)
 * prints: "pid <getpid()> launches <n> start_ns <realtime> end_ns <realtime>"
 * SM_LOAD_RLIMIT_AS=1: the first launches run with the address space limited to what the
 * process maps already (plus 1 MiB), so no thread can be started; SM_LOAD_RLIMIT_NOFILE=1: with
 * no file descriptor left to open (so NVML cannot start). Lifted after the first
 * synchronisation, or when a launch is refused (701: said once on stderr, and tolerated from
 * then on).
 * SM_LOAD_RAW_CLONE=1: after the first synchronisation, a raw clone (syscall, no atfork handler)
 * carries on with the workload and prints the line; the original process only waits for it. A
 * launch refused (701) there ends the loop (said on stderr).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

typedef int CUresult;
typedef int CUdevice;
typedef void *CUcontext, *CUmodule, *CUfunction, *CUstream, *CUgraphExec;

typedef struct {
    unsigned int gridDimX, gridDimY, gridDimZ, blockDimX, blockDimY, blockDimZ, sharedMemBytes;
    CUstream hStream;
    void *attrs;
    unsigned int numAttrs;
} CUlaunchConfig;

CUresult cuInit(unsigned int);
CUresult cuDeviceGet(CUdevice *, int);
CUresult cuCtxCreate_v2(CUcontext *, unsigned int, CUdevice);
CUresult cuCtxSynchronize(void);
CUresult cuModuleLoadData(CUmodule *, const void *);
CUresult cuModuleGetFunction(CUfunction *, CUmodule, const char *);
CUresult cuGetProcAddress_v2(const char *, void **, int, uint64_t, int *);
CUresult cuLaunchKernel(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                        unsigned, CUstream, void **, void **);
CUresult cuLaunchKernel_ptsz(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned,
                             unsigned, unsigned, CUstream, void **, void **);
CUresult cuLaunchKernelEx(const CUlaunchConfig *, CUfunction, void **, void **);
CUresult cuLaunchKernelEx_ptsz(const CUlaunchConfig *, CUfunction, void **, void **);
CUresult cuLaunchCooperativeKernel(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned,
                                   unsigned, unsigned, CUstream, void **);
CUresult cuLaunchCooperativeKernel_ptsz(CUfunction, unsigned, unsigned, unsigned, unsigned,
                                        unsigned, unsigned, unsigned, CUstream, void **);
CUresult cuGraphLaunch(CUgraphExec, CUstream);
CUresult cuGraphLaunch_ptsz(CUgraphExec, CUstream);

typedef CUresult (*launch_fn)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned,
                              unsigned, unsigned, CUstream, void **, void **);
typedef CUresult (*launch_ex_fn)(const CUlaunchConfig *, CUfunction, void **, void **);
typedef CUresult (*coop_fn)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned,
                            unsigned, unsigned, CUstream, void **);
typedef CUresult (*graph_fn)(CUgraphExec, CUstream);

static uint64_t realtime_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

#define CHECK(call)                                                                  \
    do {                                                                             \
        CUresult rc_ = (call);                                                       \
        if (rc_ != 0) {                                                              \
            fprintf(stderr, "%s failed: %d\n", #call, rc_);                          \
            exit(2);                                                                 \
        }                                                                            \
    } while (0)

/* The entry point `name` (exported name) through the chosen access path. */
static void *entry(const char *access, const char *exported, const char *base, int ptsz) {
    if (strcmp(access, "direct") == 0)
        return NULL; /* caller uses the linked symbol */
    if (strcmp(access, "dlsym") == 0) {
        void *h = dlopen("libcuda.so.1", RTLD_NOW);
        if (!h) {
            fprintf(stderr, "dlopen: %s\n", dlerror());
            exit(2);
        }
        return dlsym(h, exported);
    }
    void *p = NULL;
    int status = 0;
    CHECK(cuGetProcAddress_v2(base, &p, 12040, ptsz ? 2 : 0, &status));
    return p;
}

int main(int argc, char **argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: sm_load <seconds> <function> <entry> <access> [sync_every] "
                        "[grid_x] [device]\n");
        return 2;
    }
    double seconds = atof(argv[1]);
    const char *fname = argv[2], *which = argv[3], *access = argv[4];
    int sync_every = argc > 5 ? atoi(argv[5]) : 1;
    unsigned grid = argc > 6 ? (unsigned)atoi(argv[6]) : 10;
    int ordinal = argc > 7 ? atoi(argv[7]) : 0;

    CUdevice dev;
    CUcontext ctx;
    CUmodule mod;
    CUfunction f;
    CHECK(cuInit(0));
    CHECK(cuDeviceGet(&dev, ordinal));
    CHECK(cuCtxCreate_v2(&ctx, 0, dev));
    CHECK(cuModuleLoadData(&mod, "image"));
    CHECK(cuModuleGetFunction(&f, mod, fname));

    int ptsz = strstr(which, "_ptsz") != NULL;
    char exported[64];
    const char *base = strncmp(which, "kernel", 6) == 0 ? "cuLaunchKernel"
                       : strncmp(which, "ex", 2) == 0   ? "cuLaunchKernelEx"
                       : strncmp(which, "coop", 4) == 0 ? "cuLaunchCooperativeKernel"
                                                        : "cuGraphLaunch";
    snprintf(exported, sizeof exported, "%s%s", base, ptsz ? "_ptsz" : "");
    void *fp = entry(access, exported, base, ptsz);
    if (strcmp(access, "direct") != 0 && fp == NULL) {
        fprintf(stderr, "no %s through %s\n", exported, access);
        return 2;
    }
    if (strcmp(access, "direct") == 0) {
        fp = !strcmp(exported, "cuLaunchKernel")                   ? (void *)cuLaunchKernel
             : !strcmp(exported, "cuLaunchKernel_ptsz")            ? (void *)cuLaunchKernel_ptsz
             : !strcmp(exported, "cuLaunchKernelEx")               ? (void *)cuLaunchKernelEx
             : !strcmp(exported, "cuLaunchKernelEx_ptsz")          ? (void *)cuLaunchKernelEx_ptsz
             : !strcmp(exported, "cuLaunchCooperativeKernel")      ? (void *)cuLaunchCooperativeKernel
             : !strcmp(exported, "cuLaunchCooperativeKernel_ptsz") ? (void *)cuLaunchCooperativeKernel_ptsz
             : !strcmp(exported, "cuGraphLaunch")                  ? (void *)cuGraphLaunch
                                                                   : (void *)cuGraphLaunch_ptsz;
    }
    Dl_info info;
    const char *from = dladdr(fp, &info) && info.dli_fname ? info.dli_fname : "?";

    CUlaunchConfig cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.gridDimX = grid;
    cfg.gridDimY = cfg.gridDimZ = 1;
    cfg.blockDimX = 256;
    cfg.blockDimY = cfg.blockDimZ = 1;
    CUgraphExec exec = (CUgraphExec)(uintptr_t)0x1000;

    uint64_t start = realtime_ns(), end = start + (uint64_t)(seconds * 1e9);
    unsigned long launches = 0;
    /* SM_LOAD_RLIMIT_AS / SM_LOAD_RLIMIT_NOFILE: one resource limited around the first launches. */
    const char *as_env = getenv("SM_LOAD_RLIMIT_AS"), *nofile_env = getenv("SM_LOAD_RLIMIT_NOFILE");
    int resource = as_env != NULL && as_env[0] == '1'           ? RLIMIT_AS
                   : nofile_env != NULL && nofile_env[0] == '1' ? RLIMIT_NOFILE
                                                                : -1;
    struct rlimit as_saved;
    int limit_as = resource >= 0;
    unsigned long refused = 0;
    if (limit_as) {
        rlim_t cur = 0;
        if (resource == RLIMIT_AS) {
            unsigned long pages = 0;
            FILE *statm = fopen("/proc/self/statm", "r");
            if (statm == NULL || fscanf(statm, "%lu", &pages) != 1)
                return 2;
            fclose(statm);
            cur = pages * (rlim_t)sysconf(_SC_PAGESIZE) + (1u << 20);
        } else {
            /* Every descriptor number in use stays usable, no new one can be opened. */
            int fd = dup(0);
            if (fd < 0)
                return 2;
            close(fd);
            cur = (rlim_t)fd;
        }
        getrlimit(resource, &as_saved);
        struct rlimit tight = as_saved;
        tight.rlim_cur = cur;
        if (setrlimit(resource, &tight) != 0)
            return 2;
    }
    const char *rc_env = getenv("SM_LOAD_RAW_CLONE");
    int raw_clone = rc_env != NULL && rc_env[0] == '1';
    int in_clone = 0; /* this is the raw clone (its first launch may already be refused) */
    /* SM_LOAD_DUTY_MS="busy,idle": after a synchronisation, once busy ms have passed since the
     * phase began, sleep idle ms (a bursty workload: training with data loading). */
    const char *duty_env = getenv("SM_LOAD_DUTY_MS");
    long duty_busy = 0, duty_idle = 0;
    if (duty_env != NULL)
        sscanf(duty_env, "%ld,%ld", &duty_busy, &duty_idle);
    uint64_t phase = realtime_ns();
    while (realtime_ns() < end) {
        CUresult rc;
        if (!strcmp(base, "cuLaunchKernel"))
            rc = ((launch_fn)fp)(f, grid, 1, 1, 256, 1, 1, 0, NULL, NULL, NULL);
        else if (!strcmp(base, "cuLaunchKernelEx"))
            rc = ((launch_ex_fn)fp)(&cfg, f, NULL, NULL);
        else if (!strcmp(base, "cuLaunchCooperativeKernel"))
            rc = ((coop_fn)fp)(f, grid, 1, 1, 256, 1, 1, 0, NULL, NULL);
        else
            rc = ((graph_fn)fp)(exec, NULL);
        if (rc == 701 && resource >= 0) {
            /* Refused while no watcher can start: lift the limit and launch again. */
            if (refused++ == 0)
                fprintf(stderr, "refused %d\n", rc);
            if (limit_as)
                setrlimit(resource, &as_saved);
            limit_as = 0;
            usleep(1000);
            continue;
        }
        if (rc == 701 && in_clone) {
            fprintf(stderr, "refused %d after %lu launches\n", rc, launches);
            break;
        }
        if (rc != 0) {
            fprintf(stderr, "launch failed: %d\n", rc);
            return 2;
        }
        launches++;
        if (sync_every > 0 && launches % (unsigned long)sync_every == 0) {
            CHECK(cuCtxSynchronize());
            if (duty_idle > 0 && realtime_ns() - phase >= (uint64_t)duty_busy * 1000000u) {
                usleep((useconds_t)(duty_idle * 1000));
                phase = realtime_ns();
            }
            if (limit_as && launches == (unsigned long)sync_every) {
                setrlimit(resource, &as_saved);
                limit_as = 0;
            }
            if (raw_clone && launches == (unsigned long)sync_every) {
                pid_t c = (pid_t)syscall(SYS_clone, SIGCHLD, 0, 0, 0, 0);
                if (c < 0)
                    return 2;
                if (c > 0) {
                    int status = 0;
                    waitpid(c, &status, 0);
                    _exit(WIFEXITED(status) ? WEXITSTATUS(status) : 2);
                }
                in_clone = 1;
            }
        }
    }
    CHECK(cuCtxSynchronize());
    printf("pid %d launches %lu start_ns %llu end_ns %llu via %s\n", (int)getpid(), launches,
           (unsigned long long)start, (unsigned long long)realtime_ns(), from);
    return 0;
}
