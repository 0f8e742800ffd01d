/*
 * The kernel time model of the fake libcuda.so.1 and the utilisation the fake
 * NVML computes from it, driven the way a CUDA program and a monitor would
 * (linked with -lcuda -lnvidia-ml). Run by tests/kernel_time.rs as
 *
 *     kernel-time <scenario> [args...]
 *
 * Each scenario checks exact return codes itself (a mismatch prints the call
 * and both codes on stderr and exits 1) and prints "key=value" lines (times
 * are CLOCK_REALTIME nanoseconds, the timeline's clock) that the Rust test
 * compares with the model's own accounting. "ok" on the last line means the
 * scenario completed.
 */
#define _GNU_SOURCE
#include "cuda_api.h"
#include "nvml_api.h"
#include "timeline.h"
#include "check.h"

#include <fcntl.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void sleep_until(uint64_t t)
{
    struct timespec ts = {.tv_sec = (time_t)(t / 1000000000ull),
                          .tv_nsec = (long)(t % 1000000000ull)};
    while (clock_nanosleep(CLOCK_REALTIME, TIMER_ABSTIME, &ts, NULL) != 0) {
    }
}

static unsigned long long arg_u64(const char *s)
{
    char *end;
    unsigned long long v = strtoull(s, &end, 10);
    CHECK(*s != '\0' && *end == '\0');
    return v;
}

/* Initialises the driver and makes a context on device 0 current; returns a module. */
static CUmodule setup(void)
{
    CUcontext ctx;
    CUdevice dev;
    CUmodule mod;
    OK(cuInit(0));
    OK(cuDeviceGet(&dev, 0));
    OK(cuCtxCreate_v2(&ctx, 0, dev));
    OK(cuModuleLoadData(&mod, "image"));
    return mod;
}

static CUfunction function(CUmodule mod, const char *name)
{
    CUfunction f;
    OK(cuModuleGetFunction(&f, mod, name));
    return f;
}

static void launch(CUfunction f, unsigned int grid, unsigned int block, unsigned int smem,
                   CUstream s)
{
    OK(cuLaunchKernel(f, grid, 1, 1, block, 1, 1, smem, s, NULL, NULL));
}

/* Waits for a line on stdin (the test's start signal) or its end. */
static void wait_stdin(void)
{
    char line[16];
    if (fgets(line, sizeof line, stdin) == NULL) {
        /* closed: go */
    }
}

/*
 * shapes: the duration model. Each kernel below takes exactly 1 ms (A100: 108 SMs, 256-thread
 * blocks -> 8 per SM, 864 per wave), except the shared-memory one (1 block per SM, 2 waves of
 * 1 ms) and "plain", which has no cost.
 */
static void shapes(void)
{
    CUmodule mod = setup();
    CUfunction small = function(mod, "small@wave_ns=1000000");
    CUfunction large = function(mod, "large@wave_ns=62500");
    CUfunction fixed = function(mod, "fixed@kernel_ns=1000000");
    CUfunction plain = function(mod, "plain");
    CUfunction bad;
    CUlaunchAttribute coop = {.id = CU_LAUNCH_ATTRIBUTE_COOPERATIVE};
    CUlaunchConfig config = {.gridDimX = 865, .gridDimY = 1, .gridDimZ = 1, .blockDimX = 256,
                             .blockDimY = 1, .blockDimZ = 1, .attrs = &coop, .numAttrs = 1};
    uint64_t t0 = now_ns();

    coop.value.cooperative = 1;
    EXPECT(CUDA_ERROR_NOT_FOUND, cuModuleGetFunction(&bad, mod, "bad@kernel_ns=12x"));
    launch(small, 10, 256, 0, NULL);          /* 1 wave */
    launch(large, 13200, 256, 0, NULL);       /* 16 waves x 62.5 us */
    launch(fixed, 10, 256, 0, NULL);          /* 1 ms whatever the grid */
    launch(fixed, 13200, 256, 0, NULL);
    launch(small, 216, 256, 100000, NULL);    /* 100 KB smem: 1 block/SM, 2 waves */
    launch(plain, 13200, 256, 0, NULL);       /* no time */
    /* Cooperative: 864 blocks fit at once, 865 do not. */
    OK(cuLaunchCooperativeKernel(small, 864, 1, 1, 256, 1, 1, 0, NULL, NULL));
    EXPECT(CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE,
           cuLaunchCooperativeKernel(small, 865, 1, 1, 256, 1, 1, 0, NULL, NULL));
    EXPECT(CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE, cuLaunchKernelEx(&config, small, NULL, NULL));
    config.gridDimX = 864;
    OK(cuLaunchKernelEx(&config, small, NULL, NULL)); /* 1 ms */
    printf("t_start=%llu\n", (unsigned long long)t0);
    printf("t_launched=%llu\n", (unsigned long long)now_ns());
    OK(cuCtxSynchronize());
    printf("t_synced=%llu\n", (unsigned long long)now_ns());
}

/*
 * paced <kernel_ns> <interval_ns> <count> [wait] [hold] [ptds|stream] [nosync]: launches count
 * kernels of kernel_ns, the i-th at t0 + i * interval (0: back to back), then synchronises
 * (not with "nosync": it exits with kernels pending). "wait" waits for a line on stdin before
 * t0; "hold" waits for another one before exiting (the process stays alive, holding its
 * context).
 */
static void paced(int argc, char **argv)
{
    CUmodule mod = setup();
    char name[64];
    CUfunction f;
    CUstream stream = NULL;
    unsigned long long kernel_ns, interval, count, i;
    uint64_t t0;
    int a;
    bool hold = false, wait = false, ptds = false, sync = true;

    CHECK(argc >= 5);
    kernel_ns = arg_u64(argv[2]);
    interval = arg_u64(argv[3]);
    count = arg_u64(argv[4]);
    for (a = 5; a < argc; a++) {
        if (strcmp(argv[a], "wait") == 0)
            wait = true;
        else if (strcmp(argv[a], "hold") == 0)
            hold = true;
        else if (strcmp(argv[a], "ptds") == 0)
            ptds = true;
        else if (strcmp(argv[a], "nosync") == 0)
            sync = false;
        else if (strcmp(argv[a], "stream") == 0)
            OK(cuStreamCreate(&stream, 0));
        else
            CHECK(!"unknown option");
    }
    if (ptds)
        stream = CU_STREAM_PER_THREAD;
    snprintf(name, sizeof name, "paced@kernel_ns=%llu", kernel_ns);
    f = function(mod, name);
    printf("pid=%d\n", (int)getpid());
    fflush(stdout);
    if (wait)
        wait_stdin();
    t0 = now_ns();
    printf("t_start=%llu\n", (unsigned long long)t0);
    for (i = 0; i < count; i++) {
        if (interval > 0)
            sleep_until(t0 + i * interval);
        if (ptds)
            OK(cuLaunchKernel_ptsz(f, 1, 1, 1, 32, 1, 1, 0, stream, NULL, NULL));
        else
            launch(f, 1, 32, 0, stream);
    }
    printf("t_launched=%llu\n", (unsigned long long)now_ns());
    if (!sync)
        return; /* exits with kernels pending */
    if (ptds)
        OK(cuStreamSynchronize_ptsz(stream));
    else
        OK(cuStreamSynchronize(stream));
    printf("t_synced=%llu\n", (unsigned long long)now_ns());
    if (hold) {
        printf("holding=1\n");
        fflush(stdout);
        wait_stdin();
    }
}

/*
 * graph [wait]: two 3 ms kernels captured into a graph, instantiated and launched 3 times,
 * plus one launch of a handle that is not an instantiated graph (GPU_SIM_GRAPH_NS only).
 */
static void graph(void)
{
    CUmodule mod = setup();
    CUfunction f = function(mod, "captured@kernel_ns=3000000");
    CUstream s;
    CUgraph g;
    CUgraphExec exec;
    int i;

    OK(cuStreamCreate(&s, 0));
    OK(cuStreamBeginCapture_v2(s, CU_STREAM_CAPTURE_MODE_GLOBAL));
    launch(f, 10, 256, 0, s);
    launch(f, 13200, 256, 0, s);
    OK(cuStreamEndCapture(s, &g));
    OK(cuGraphInstantiateWithFlags(&exec, g, 0));
    printf("t_start=%llu\n", (unsigned long long)now_ns());
    for (i = 0; i < 3; i++)
        OK(cuGraphLaunch(exec, s));
    OK(cuGraphLaunch_ptsz((CUgraphExec)(uintptr_t)0x1000, s));
    OK(cuStreamSynchronize(s));
    printf("t_synced=%llu\n", (unsigned long long)now_ns());
}

typedef nvmlReturn_t (*util_fn)(nvmlDevice_t, nvmlProcessUtilizationSample_t *, unsigned int *,
                                unsigned long long);

/*
 * nvml <index> <lastSeen>: what a monitor sees. Prints the device utilisation (with the time
 * before and after the query), the compute processes, and the process samples newer than
 * lastSeen, checking the buffer-size protocol on the way.
 */
static void nvml(int argc, char **argv)
{
    nvmlDevice_t dev;
    nvmlUtilization_t util;
    nvmlProcessInfo_t procs[64];
    nvmlProcessUtilizationSample_t *samples;
    unsigned int count, needed, i, n = 64;
    unsigned long long last_seen;
    uint64_t before, after;
    nvmlReturn_t r;

    CHECK(argc == 4);
    last_seen = arg_u64(argv[3]);
    OK(nvmlInit_v2());
    OK(nvmlDeviceGetHandleByIndex_v2((unsigned int)arg_u64(argv[2]), &dev));
    before = now_ns();
    OK(nvmlDeviceGetUtilizationRates(dev, &util));
    after = now_ns();
    printf("util_before=%llu\nutil_after=%llu\nutil_gpu=%u\nutil_memory=%u\n",
           (unsigned long long)before, (unsigned long long)after, util.gpu, util.memory);
    OK(nvmlDeviceGetComputeRunningProcesses_v3(dev, &n, procs));
    for (i = 0; i < n; i++)
        printf("process=%u\n", procs[i].pid);

    EXPECT(NVML_ERROR_INVALID_ARGUMENT, nvmlDeviceGetProcessUtilization(dev, NULL, NULL, 0));
    count = 0;
    r = nvmlDeviceGetProcessUtilization(dev, NULL, &count, last_seen);
    if (r == NVML_ERROR_NOT_FOUND) {
        CHECK(count == 0);
        printf("samples=none\n");
        return;
    }
    EXPECT(NVML_ERROR_INSUFFICIENT_SIZE, r);
    CHECK(count > 0);
    needed = count;
    samples = calloc(needed + 1, sizeof *samples);
    CHECK(samples != NULL);
    if (needed > 1) {
        count = needed - 1;
        EXPECT(NVML_ERROR_INSUFFICIENT_SIZE,
               nvmlDeviceGetProcessUtilization(dev, samples, &count, last_seen));
        CHECK(count == needed);
    }
    count = needed + 1;
    OK(nvmlDeviceGetProcessUtilization(dev, samples, &count, last_seen));
    CHECK(count == needed);
    printf("samples=%u\n", count);
    for (i = 0; i < count; i++) {
        CHECK(samples[i].timeStamp > last_seen);
        CHECK(i == 0 || samples[i].timeStamp >= samples[i - 1].timeStamp);
        CHECK(samples[i].memUtil == 0 && samples[i].encUtil == 0 && samples[i].decUtil == 0);
        printf("sample=%u,%llu,%u\n", samples[i].pid, samples[i].timeStamp, samples[i].smUtil);
    }
    free(samples);
    OK(nvmlShutdown());
}

/*
 * die-holding-the-lock: maps the node's timeline (after a cuInit created it), takes GPU 0's
 * lock the way a launching process does, leaves the record half-written (odd seq, a wrong
 * pending total), prints "locked=1" and waits to be SIGKILLed.
 */
static void die_holding_the_lock(void)
{
    char path[4200];
    struct sim_tl_file *f;
    int fd;

    OK(cuInit(0));
    snprintf(path, sizeof path, "%s%s", getenv("GPU_SIM_NODE"), SIM_TL_SUFFIX);
    fd = open(path, O_RDWR);
    CHECK(fd >= 0);
    f = mmap(NULL, sizeof *f, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    CHECK(f != MAP_FAILED);
    OK(pthread_mutex_lock(&f->devices[0].lock.mutex));
    __atomic_fetch_add(&f->devices[0].seq, 1, __ATOMIC_SEQ_CST);
    f->devices[0].pending_ns = UINT64_MAX / 2; /* a total left half-updated */
    printf("locked=1\n");
    fflush(stdout);
    for (;;)
        pause();
}

/* env-error: cuInit with a malformed time-model variable fails with CUDA_ERROR_UNKNOWN. */
static void env_error(void)
{
    EXPECT(CUDA_ERROR_UNKNOWN, cuInit(0));
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc < 2) {
        fprintf(stderr, "usage: kernel-time shapes|paced|graph|nvml|env-error ...\n");
        return 2;
    }
    if (strcmp(argv[1], "shapes") == 0)
        shapes();
    else if (strcmp(argv[1], "paced") == 0)
        paced(argc, argv);
    else if (strcmp(argv[1], "graph") == 0)
        graph();
    else if (strcmp(argv[1], "nvml") == 0)
        nvml(argc, argv);
    else if (strcmp(argv[1], "env-error") == 0)
        env_error();
    else if (strcmp(argv[1], "die-holding-the-lock") == 0)
        die_holding_the_lock();
    else
        return 2;
    printf("ok\n");
    return 0;
}
