/* One process of a container sharing a capped GPU (linked -lcuda, run under LD_PRELOAD=libvgpu.so).
 * Modes (argv[1]):
 *   hold N        allocate up to N chunks of 256 MiB; print "held K rc R"; wait for EOF on stdin;
 *                 free them and exit 0
 *   cycle N       like hold, but after the first line on stdin frees them, prints "freed F" (F =
 *                 frees that returned 0) and waits for EOF
 *   pairs T N     T threads each do N alloc/free pairs of 64 MiB; a shared counter of the bytes
 *                 held (added after a successful allocation, subtracted before its free, so it
 *                 never exceeds what the cap admitted) tracks its maximum; prints
 *                 "pairs ok X refused R max_held M" and waits for EOF
 *   steady        alloc/free pairs of 64 MiB until stdin reaches EOF, timing every call
 *                 (CLOCK_MONOTONIC); prints "steady pairs X refused R max_ns L"
 *   churn         alloc/free pairs of 64 MiB forever (200 µs apart); prints "churning" after
 *                 the first one
 *   info          print the virtualised cuMemGetInfo / cuDeviceTotalMem / nvmlDeviceGetMemoryInfo
 *   burst T B P   prints "READY", waits for a line; T threads, B bursts; in each burst every thread does P alloc/free pairs of
 *                 64 MiB, then allocates 64 MiB chunks until refused and holds them; the main
 *                 thread prints "BURST b held H" and waits for a line on stdin; then everything
 *                 is freed. At the end "END pairs_ok X refused R" and wait for EOF. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

typedef unsigned long long devptr;
int cuInit(unsigned int);
int cuDeviceGet(int *, int);
int cuDevicePrimaryCtxRetain(void **, int);
int cuCtxSetCurrent(void *);
int cuMemAlloc_v2(devptr *, size_t);
int cuMemFree_v2(devptr);
int cuMemGetInfo_v2(size_t *, size_t *);
int cuDeviceTotalMem_v2(size_t *, int);

#define CHUNK ((size_t)256 << 20)
#define SMALL ((size_t)64 << 20)
#define MAX_HELD 64

static void *ctx;

static void wait_eof(void)
{
    char line[64];
    while (fgets(line, sizeof line, stdin))
        ;
}

static void wait_line(void)
{
    char line[64];
    if (!fgets(line, sizeof line, stdin))
        exit(3);
}

static int hold(int n)
{
    devptr p[1024];
    int k = 0, rc = 0;
    while (k < n && k < 1024 && (rc = cuMemAlloc_v2(&p[k], CHUNK)) == 0)
        k++;
    printf("held %d rc %d\n", k, rc);
    fflush(stdout);
    wait_eof();
    while (k > 0)
        cuMemFree_v2(p[--k]);
    return 0;
}

static int cycle(int n)
{
    devptr p[1024];
    int k = 0, rc = 0, freed = 0;
    while (k < n && k < 1024 && (rc = cuMemAlloc_v2(&p[k], CHUNK)) == 0)
        k++;
    printf("held %d rc %d\n", k, rc);
    fflush(stdout);
    wait_line();
    while (k > 0)
        freed += cuMemFree_v2(p[--k]) == 0;
    printf("freed %d\n", freed);
    fflush(stdout);
    wait_eof();
    return 0;
}

static int info(void)
{
    size_t free_b = 0, total_b = 0, dev_total = 0;
    typedef struct { unsigned long long total, free, used; } mem_t;
    mem_t m;
    void *lib, *dev = NULL;
    int (*init)(void), (*by_index)(unsigned int, void **), (*minfo)(void *, mem_t *);
    if (cuMemGetInfo_v2(&free_b, &total_b) == 0)
        printf("cuda free %zu total %zu\n", free_b, total_b);
    if (cuDeviceTotalMem_v2(&dev_total, 0) == 0)
        printf("device total %zu\n", dev_total);
    lib = dlopen("libnvidia-ml.so.1", RTLD_NOW);
    if (!lib)
        return 0;
    init = (int (*)(void))dlsym(lib, "nvmlInit_v2");
    by_index = (int (*)(unsigned int, void **))dlsym(lib, "nvmlDeviceGetHandleByIndex_v2");
    minfo = (int (*)(void *, mem_t *))dlsym(lib, "nvmlDeviceGetMemoryInfo");
    if (init && by_index && minfo && init() == 0 && by_index(0, &dev) == 0 && minfo(dev, &m) == 0)
        printf("nvml total %llu used %llu free %llu\n", m.total, m.used, m.free);
    return 0;
}

static int nthreads, nbursts, npairs;
static pthread_barrier_t barrier;
static unsigned long long held_bytes, pairs_ok, refused;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;

static void *worker(void *arg)
{
    (void)arg;
    cuCtxSetCurrent(ctx);
    for (int b = 0; b < nbursts; b++) {
        devptr p[MAX_HELD];
        int k = 0;
        unsigned long long ok = 0, no = 0;
        for (int i = 0; i < npairs; i++) {
            devptr d;
            if (cuMemAlloc_v2(&d, SMALL) == 0) {
                ok++;
                cuMemFree_v2(d);
            } else {
                no++;
            }
        }
        while (k < MAX_HELD && cuMemAlloc_v2(&p[k], SMALL) == 0)
            k++;
        no++; /* the refusal that ended the grab */
        pthread_mutex_lock(&mu);
        held_bytes += (unsigned long long)k * SMALL;
        pairs_ok += ok;
        refused += no;
        pthread_mutex_unlock(&mu);
        pthread_barrier_wait(&barrier); /* everybody holds */
        pthread_barrier_wait(&barrier); /* main has reported */
        while (k > 0)
            cuMemFree_v2(p[--k]);
        pthread_barrier_wait(&barrier); /* everything freed */
    }
    return NULL;
}

static int burst(void)
{
    pthread_t t[64];
    /* Every process of the race has its context before anybody grabs memory. */
    printf("READY\n");
    fflush(stdout);
    wait_line();
    pthread_barrier_init(&barrier, NULL, (unsigned)nthreads + 1);
    for (int i = 0; i < nthreads; i++)
        pthread_create(&t[i], NULL, worker, NULL);
    for (int b = 0; b < nbursts; b++) {
        pthread_barrier_wait(&barrier);
        printf("BURST %d held %llu\n", b, held_bytes);
        fflush(stdout);
        wait_line();
        held_bytes = 0;
        pthread_barrier_wait(&barrier);
        pthread_barrier_wait(&barrier);
    }
    for (int i = 0; i < nthreads; i++)
        pthread_join(t[i], NULL);
    printf("END pairs_ok %llu refused %llu\n", pairs_ok, refused);
    fflush(stdout);
    wait_eof();
    return 0;
}

#define PAIR ((size_t)64 << 20)

static long long held_now, held_max;
static unsigned long long n_ok, n_refused;

static void *pair_worker(void *arg)
{
    long n = (long)arg;
    unsigned long long ok = 0, no = 0;
    cuCtxSetCurrent(ctx);
    for (long i = 0; i < n; i++) {
        devptr d;
        if (cuMemAlloc_v2(&d, PAIR) != 0) {
            no++;
            continue;
        }
        long long now = __atomic_add_fetch(&held_now, (long long)PAIR, __ATOMIC_SEQ_CST);
        long long seen = __atomic_load_n(&held_max, __ATOMIC_RELAXED);
        while (now > seen &&
               !__atomic_compare_exchange_n(&held_max, &seen, now, false, __ATOMIC_SEQ_CST,
                                            __ATOMIC_RELAXED))
            ;
        __atomic_sub_fetch(&held_now, (long long)PAIR, __ATOMIC_SEQ_CST);
        cuMemFree_v2(d);
        ok++;
    }
    __atomic_add_fetch(&n_ok, ok, __ATOMIC_RELAXED);
    __atomic_add_fetch(&n_refused, no, __ATOMIC_RELAXED);
    return NULL;
}

static int pairs(int threads, long n)
{
    pthread_t t[64];
    for (int i = 0; i < threads; i++)
        pthread_create(&t[i], NULL, pair_worker, (void *)n);
    for (int i = 0; i < threads; i++)
        pthread_join(t[i], NULL);
    printf("pairs ok %llu refused %llu max_held %lld\n", n_ok, n_refused, held_max);
    fflush(stdout);
    wait_eof();
    return 0;
}

static volatile int stop;

static void *stdin_watcher(void *arg)
{
    (void)arg;
    wait_eof();
    stop = 1;
    return NULL;
}

static long long now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int steady(void)
{
    pthread_t w;
    unsigned long long ok = 0, no = 0;
    long long max_ns = 0;
    pthread_create(&w, NULL, stdin_watcher, NULL);
    printf("steady\n");
    fflush(stdout);
    while (!stop) {
        devptr d;
        long long t0 = now_ns();
        int rc = cuMemAlloc_v2(&d, PAIR);
        long long t1 = now_ns();
        if (t1 - t0 > max_ns)
            max_ns = t1 - t0;
        if (rc != 0) {
            no++;
            continue;
        }
        cuMemFree_v2(d);
        t0 = now_ns();
        if (t0 - t1 > max_ns)
            max_ns = t0 - t1;
        ok++;
    }
    pthread_join(w, NULL);
    printf("steady pairs %llu refused %llu max_ns %lld\n", ok, no, max_ns);
    return 0;
}

static __attribute__((noreturn)) int churn(void)
{
    int announced = 0;
    for (;;) {
        devptr d;
        if (cuMemAlloc_v2(&d, PAIR) == 0)
            cuMemFree_v2(d);
        usleep(200); /* keep allocating without starving the measured processes of CPU */
        if (!announced) {
            printf("churning\n");
            fflush(stdout);
            announced = 1;
        }
    }
}

int main(int argc, char **argv)
{
    const char *mode = argc > 1 ? argv[1] : "info";
    int dev = 0;
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (cuInit(0) != 0 || cuDeviceGet(&dev, 0) != 0 || cuDevicePrimaryCtxRetain(&ctx, dev) != 0 ||
        cuCtxSetCurrent(ctx) != 0) {
        printf("no context\n");
        return 1;
    }
    if (strcmp(mode, "hold") == 0 && argc > 2)
        return hold(atoi(argv[2]));
    if (strcmp(mode, "cycle") == 0 && argc > 2)
        return cycle(atoi(argv[2]));
    if (strcmp(mode, "pairs") == 0 && argc > 3 && atoi(argv[2]) >= 1 && atoi(argv[2]) <= 64)
        return pairs(atoi(argv[2]), atol(argv[3]));
    if (strcmp(mode, "steady") == 0)
        return steady();
    if (strcmp(mode, "churn") == 0)
        return churn();
    if (strcmp(mode, "info") == 0)
        return info();
    if (strcmp(mode, "burst") == 0 && argc > 4) {
        nthreads = atoi(argv[2]);
        nbursts = atoi(argv[3]);
        npairs = atoi(argv[4]);
        if (nthreads < 1 || nthreads > 64)
            return 2;
        return burst();
    }
    return 2;
}
