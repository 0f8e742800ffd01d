/* One process of a container sharing a capped GPU (linked -lcuda, run under LD_PRELOAD=libvgpu.so).
 * Modes (argv[1]):
 *   hold N        allocate up to N chunks of 256 MiB; print "held K rc R"; wait for EOF on stdin;
 *                 free them and exit 0
 *   info          print the virtualised cuMemGetInfo / cuDeviceTotalMem / nvmlDeviceGetMemoryInfo
 *   burst T B P   T threads, B bursts; in each burst every thread does P alloc/free pairs of
 *                 64 MiB, then allocates 64 MiB chunks until refused and holds them; the main
 *                 thread prints "BURST b held H" and waits for a line on stdin; then everything
 *                 is freed. At the end "END pairs_ok X refused R" and wait for EOF. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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
