/* A hostile tenant's CUDA process for tests/hostile_region.rs (linked -lcuda against the gpu-sim
 * fake driver, run under LD_PRELOAD=libvgpu.so). Usage: hostile_region <path> <mode> [args]
 * <path> is how the driver functions are reached: direct (linked symbols), dlsym (dlopen +
 * dlsym of the versioned name) or procaddr (cuGetProcAddress of the base name, CUDA 12.4).
 * "used" below is the container's used bytes as the process sees them (cuMemGetInfo: total - free,
 * virtualised). Modes, one fact per output line:
 *   absurd        hold one 256 MiB chunk, then three rounds of absurd requests in every family
 *                 ("<name> rc R used U" each), then "fill K rc R used U" (256 MiB chunks)
 *   teardown      "first rc R used U" (2000 MiB), "reset rc R used U" (cuDevicePrimaryCtxReset),
 *                 "second rc R used U" (retain again, 2000 MiB)
 *   ctxdestroy    (direct) a cuCtxCreate_v2 context with 1500 MiB in it and 100 MiB in the primary
 *                 context: "created used U", "destroyed rc R used U", "after rc R used U" (2000 MiB)
 *   small N       N allocations of 4 KiB: "small ok K rc R used U", then "freed F used U"
 *   fill          256 MiB chunks until refused, each call timed: "fill K rc R used U max_ms T"
 *   hold N        N chunks of 256 MiB: "held K rc R used U"; then per line on stdin "more": chunks
 *                 until refused, "more K rc R used U"; at EOF frees everything, "freed F"
 *   fork N HOW    hold N chunks, then 8 times: fork (HOW = "fork": fork(); "thread": fork() while
 *                 a second thread allocates and frees 64 MiB in a loop, so charges are in flight;
 *                 "raw": syscall(SYS_clone), no atfork handlers); each child fills 256 MiB chunks
 *                 in the parent's context until refused, "child K rc R used U", and exits; then
 *                 "parent used U"
 *   vfork N       hold N chunks; a vfork() child calls exit(0) (its atexit handlers run in the
 *                 parent's memory); "parent used U"; then per line on stdin "one": one more chunk,
 *                 "one rc R used U"; at EOF frees everything
 *   hammer FILE I T N BUDGET   T threads x N operations of 2..64 MiB (random alloc or free, every
 *                 7th an absurd request); after every successful allocation the bytes held by all
 *                 hammer processes (8-byte counters, one per process index I, in FILE) must not
 *                 exceed BUDGET. Prints "READY used U" once its context exists and waits for a
 *                 line on stdin; at the end "hammer ok X refused R absurd_granted A violations V max M",
 *                 then waits for EOF on stdin (so its context stays charged while others hammer) */
#define _GNU_SOURCE
#include "cuda_api.h"

#include <dlfcn.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <signal.h>
#include <time.h>
#include <unistd.h>

#define MIB ((size_t)1 << 20)
#define CHUNK (256 * MIB)
#define MAXP 4096

typedef CUresult (*alloc_fn)(CUdeviceptr *, size_t);
typedef CUresult (*free_fn)(CUdeviceptr);
typedef CUresult (*info_fn)(size_t *, size_t *);
typedef CUresult (*managed_fn)(CUdeviceptr *, size_t, unsigned int);
typedef CUresult (*pitch_fn)(CUdeviceptr *, size_t *, size_t, size_t, unsigned int);
typedef CUresult (*async_fn)(CUdeviceptr *, size_t, CUstream);
typedef CUresult (*pool_fn)(CUdeviceptr *, size_t, CUmemoryPool, CUstream);
typedef CUresult (*create_fn)(CUmemGenericAllocationHandle *, size_t, const CUmemAllocationProp *,
                              unsigned long long);
typedef CUresult (*array_fn)(CUarray *, const CUDA_ARRAY_DESCRIPTOR *);
typedef CUresult (*array3d_fn)(CUarray *, const CUDA_ARRAY3D_DESCRIPTOR *);
typedef CUresult (*mipmap_fn)(CUmipmappedArray *, const CUDA_ARRAY3D_DESCRIPTOR *, unsigned int);
typedef CUresult (*reset_fn)(CUdevice);
typedef CUresult (*retain_fn)(CUcontext *, CUdevice);
typedef CUresult (*gpa_fn)(const char *, void **, int, cuuint64_t);

static alloc_fn p_alloc;
static free_fn p_free;
static info_fn p_info;
static managed_fn p_managed;
static pitch_fn p_pitch;
static async_fn p_async;
static pool_fn p_pool;
static create_fn p_create;
static array_fn p_array;
static array3d_fn p_array3d;
static mipmap_fn p_mipmap;
static reset_fn p_reset;
static retain_fn p_retain;

static CUcontext primary;

static void *lookup(const char *path, void *lib, const char *base, const char *versioned)
{
    void *p = NULL;
    if (strcmp(path, "dlsym") == 0)
        return dlsym(lib, versioned);
    if (strcmp(path, "procaddr") == 0) {
        gpa_fn gpa = (gpa_fn)dlsym(lib, "cuGetProcAddress");
        if (gpa == NULL || gpa(base, &p, 12040, 0) != CUDA_SUCCESS)
            return NULL;
        return p;
    }
    return NULL;
}

static int resolve(const char *path)
{
    if (strcmp(path, "direct") == 0) {
        p_alloc = cuMemAlloc_v2;
        p_free = cuMemFree_v2;
        p_info = cuMemGetInfo_v2;
        p_managed = cuMemAllocManaged;
        p_pitch = cuMemAllocPitch_v2;
        p_async = cuMemAllocAsync;
        p_pool = cuMemAllocFromPoolAsync;
        p_create = cuMemCreate;
        p_array = cuArrayCreate_v2;
        p_array3d = cuArray3DCreate_v2;
        p_mipmap = cuMipmappedArrayCreate;
        p_reset = cuDevicePrimaryCtxReset_v2;
        p_retain = cuDevicePrimaryCtxRetain;
        return 0;
    }
    void *lib = dlopen("libcuda.so.1", RTLD_NOW);
    if (lib == NULL)
        return 1;
    p_alloc = (alloc_fn)lookup(path, lib, "cuMemAlloc", "cuMemAlloc_v2");
    p_free = (free_fn)lookup(path, lib, "cuMemFree", "cuMemFree_v2");
    p_info = (info_fn)lookup(path, lib, "cuMemGetInfo", "cuMemGetInfo_v2");
    p_managed = (managed_fn)lookup(path, lib, "cuMemAllocManaged", "cuMemAllocManaged");
    p_pitch = (pitch_fn)lookup(path, lib, "cuMemAllocPitch", "cuMemAllocPitch_v2");
    p_async = (async_fn)lookup(path, lib, "cuMemAllocAsync", "cuMemAllocAsync");
    p_pool = (pool_fn)lookup(path, lib, "cuMemAllocFromPoolAsync", "cuMemAllocFromPoolAsync");
    p_create = (create_fn)lookup(path, lib, "cuMemCreate", "cuMemCreate");
    p_array = (array_fn)lookup(path, lib, "cuArrayCreate", "cuArrayCreate_v2");
    p_array3d = (array3d_fn)lookup(path, lib, "cuArray3DCreate", "cuArray3DCreate_v2");
    p_mipmap = (mipmap_fn)lookup(path, lib, "cuMipmappedArrayCreate", "cuMipmappedArrayCreate");
    p_reset = (reset_fn)lookup(path, lib, "cuDevicePrimaryCtxReset", "cuDevicePrimaryCtxReset_v2");
    p_retain = (retain_fn)lookup(path, lib, "cuDevicePrimaryCtxRetain", "cuDevicePrimaryCtxRetain");
    return !(p_alloc && p_free && p_info && p_managed && p_pitch && p_async && p_pool && p_create &&
             p_array && p_array3d && p_mipmap && p_reset && p_retain);
}

static size_t used(void)
{
    size_t free_b = 0, total_b = 0;
    if (p_info(&free_b, &total_b) != CUDA_SUCCESS)
        return (size_t)-1;
    return total_b - free_b;
}

static long long now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int fill(CUdeviceptr *p, int k, int max, CUresult *rc, long long *max_ns)
{
    *rc = CUDA_SUCCESS;
    while (k < max) {
        long long t0 = now_ns();
        *rc = p_alloc(&p[k], CHUNK);
        long long t = now_ns() - t0;
        if (max_ns && t > *max_ns)
            *max_ns = t;
        if (*rc != CUDA_SUCCESS)
            break;
        k++;
    }
    return k;
}

static CUmemAllocationProp device_prop(void)
{
    CUmemAllocationProp p;
    memset(&p, 0, sizeof p);
    p.type = CU_MEM_ALLOCATION_TYPE_PINNED;
    p.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    p.location.id = 0;
    return p;
}

/* One absurd request of family `i` (0..n); its name in *name. Returns the driver's (or our) rc
 * and frees whatever was (wrongly) granted, so the rounds stay comparable. */
static CUresult absurd(int i, const char **name, CUmemoryPool pool)
{
    CUdeviceptr d = 0;
    size_t pitch = 0;
    CUmemGenericAllocationHandle h = 0;
    CUarray a = NULL;
    CUmipmappedArray m = NULL;
    CUmemAllocationProp prop = device_prop();
    CUresult rc;
    switch (i) {
    case 0: *name = "alloc_size_max"; rc = p_alloc(&d, SIZE_MAX); break;
    case 1: *name = "alloc_size_max_page"; rc = p_alloc(&d, SIZE_MAX - 4095); break;
    case 2: *name = "alloc_2_63"; rc = p_alloc(&d, (size_t)1 << 63); break;
    case 3: *name = "alloc_3_2_62"; rc = p_alloc(&d, ((size_t)3) << 62); break;
    case 4: *name = "managed_size_max"; rc = p_managed(&d, SIZE_MAX, CU_MEM_ATTACH_GLOBAL); break;
    case 5: *name = "pitch_overflow"; rc = p_pitch(&d, &pitch, (size_t)1 << 40, (size_t)1 << 40, 4); break;
    case 6: *name = "pitch_half_max"; rc = p_pitch(&d, &pitch, SIZE_MAX / 2, 3, 4); break;
    case 7: *name = "async_size_max"; rc = p_async(&d, SIZE_MAX, NULL); break;
    case 8: *name = "pool_size_max"; rc = p_pool(&d, SIZE_MAX, pool, NULL); break;
    case 9: *name = "create_size_max"; rc = p_create(&h, SIZE_MAX, &prop, 0); break;
    case 10: *name = "create_2_63"; rc = p_create(&h, (size_t)1 << 63, &prop, 0); break;
    case 11: {
        CUDA_ARRAY_DESCRIPTOR desc = {SIZE_MAX / 2, 4, CU_AD_FORMAT_FLOAT, 4};
        *name = "array_overflow";
        rc = p_array(&a, &desc);
        break;
    }
    case 12: {
        CUDA_ARRAY_DESCRIPTOR desc = {(size_t)1 << 32, (size_t)1 << 32, CU_AD_FORMAT_FLOAT, 4};
        *name = "array_2_64";
        rc = p_array(&a, &desc);
        break;
    }
    case 13: {
        CUDA_ARRAY3D_DESCRIPTOR desc = {(size_t)1 << 22, (size_t)1 << 22, (size_t)1 << 22,
                                        CU_AD_FORMAT_FLOAT, 4, 0};
        *name = "array3d_overflow";
        rc = p_array3d(&a, &desc);
        break;
    }
    case 14: {
        CUDA_ARRAY3D_DESCRIPTOR desc = {(size_t)1 << 31, (size_t)1 << 31, 0, CU_AD_FORMAT_FLOAT,
                                        4, 0};
        *name = "mipmap_overflow";
        rc = p_mipmap(&m, &desc, 4);
        break;
    }
    default: *name = NULL; return CUDA_SUCCESS;
    }
    if (rc == CUDA_SUCCESS) {
        if (d)
            cuMemFree_v2(d);
        if (h)
            cuMemRelease(h);
        if (a)
            cuArrayDestroy(a);
        if (m)
            cuMipmappedArrayDestroy(m);
    }
    return rc;
}

static int mode_absurd(void)
{
    CUdeviceptr p[MAXP];
    CUmemPoolProps props;
    CUmemoryPool pool = NULL;
    CUresult rc;
    memset(&props, 0, sizeof props);
    props.allocType = CU_MEM_ALLOCATION_TYPE_PINNED;
    props.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    props.location.id = 0;
    if (cuMemPoolCreate(&pool, &props) != CUDA_SUCCESS)
        return 3;
    rc = p_alloc(&p[0], CHUNK);
    printf("first rc %d used %zu\n", rc, used());
    for (int round = 0; round < 3; round++) {
        for (int i = 0;; i++) {
            const char *name;
            rc = absurd(i, &name, pool);
            if (name == NULL)
                break;
            printf("%s rc %d used %zu\n", name, rc, used());
        }
    }
    int k = fill(p, 1, MAXP, &rc, NULL);
    printf("fill %d rc %d used %zu\n", k - 1, rc, used());
    while (k > 0)
        p_free(p[--k]);
    return 0;
}

static int mode_teardown(void)
{
    CUdeviceptr d = 0;
    CUresult rc = p_alloc(&d, 2000 * MIB);
    printf("first rc %d used %zu\n", rc, used());
    rc = p_reset(0);
    printf("reset rc %d used %zu\n", rc, used());
    if (p_retain(&primary, 0) != CUDA_SUCCESS || cuCtxSetCurrent(primary) != CUDA_SUCCESS)
        return 3;
    rc = p_alloc(&d, 2000 * MIB);
    printf("second rc %d used %zu\n", rc, used());
    return 0;
}

static int mode_ctxdestroy(void)
{
    CUcontext other = NULL;
    CUdeviceptr big = 0, small = 0, again = 0;
    if (cuCtxCreate_v2(&other, 0, 0) != CUDA_SUCCESS)
        return 3;
    if (cuMemAlloc_v2(&big, 1500 * MIB) != CUDA_SUCCESS)
        return 4;
    if (cuCtxSetCurrent(primary) != CUDA_SUCCESS || cuMemAlloc_v2(&small, 100 * MIB) != CUDA_SUCCESS)
        return 5;
    printf("created used %zu\n", used());
    CUresult rc = cuCtxDestroy_v2(other);
    printf("destroyed rc %d used %zu\n", rc, used());
    if (cuCtxSetCurrent(primary) != CUDA_SUCCESS)
        return 6;
    rc = cuMemAlloc_v2(&again, 2000 * MIB);
    printf("after rc %d used %zu\n", rc, used());
    return 0;
}

static int mode_small(int n)
{
    CUdeviceptr *p = calloc((size_t)n, sizeof *p);
    CUresult rc = CUDA_SUCCESS;
    int k = 0, freed = 0;
    if (p == NULL)
        return 3;
    for (; k < n; k++) {
        rc = p_alloc(&p[k], 4096);
        if (rc != CUDA_SUCCESS)
            break;
    }
    printf("small ok %d rc %d used %zu\n", k, rc, used());
    for (int i = 0; i < k; i++)
        freed += p_free(p[i]) == CUDA_SUCCESS;
    printf("freed %d used %zu\n", freed, used());
    free(p);
    return 0;
}

static int mode_fill(void)
{
    CUdeviceptr p[MAXP];
    CUresult rc;
    long long max_ns = 0;
    int k = fill(p, 0, MAXP, &rc, &max_ns);
    printf("fill %d rc %d used %zu max_ms %lld\n", k, rc, used(), max_ns / 1000000);
    while (k > 0)
        p_free(p[--k]);
    return 0;
}

static int mode_hold(int n)
{
    CUdeviceptr p[MAXP];
    CUresult rc = CUDA_SUCCESS;
    char line[64];
    int k = 0, freed = 0;
    while (k < n && (rc = p_alloc(&p[k], CHUNK)) == CUDA_SUCCESS)
        k++;
    printf("held %d rc %d used %zu\n", k, rc, used());
    fflush(stdout);
    /* "small [n]": 512 KiB allocations (charged exactly, and within a grant) until one is refused,
     * or n of them. */
    static CUdeviceptr s[MAXP];
    int ns = 0;
    while (fgets(line, sizeof line, stdin)) {
        if (strncmp(line, "small", 5) == 0) {
            int before = ns, want = atoi(line + 5);
            int end = want > 0 && ns + want < MAXP ? ns + want : MAXP;
            while (ns < end && (rc = p_alloc(&s[ns], 512 * 1024)) == CUDA_SUCCESS)
                ns++;
            printf("small %d rc %d used %zu\n", ns - before, rc, used());
            fflush(stdout);
            continue;
        }
        if (strncmp(line, "more", 4) != 0)
            continue;
        int before = k;
        k = fill(p, k, MAXP, &rc, NULL);
        printf("more %d rc %d used %zu\n", k - before, rc, used());
        fflush(stdout);
    }
    while (ns > 0)
        freed += p_free(s[--ns]) == CUDA_SUCCESS;
    while (k > 0)
        freed += p_free(p[--k]) == CUDA_SUCCESS;
    printf("freed %d\n", freed);
    return 0;
}

/* ---- fork ---- */

static volatile int churn_stop;

static void *churn(void *arg)
{
    (void)arg;
    while (!churn_stop) {
        CUdeviceptr q;
        if (p_alloc(&q, 64 * MIB) == CUDA_SUCCESS)
            p_free(q);
    }
    return NULL;
}

static pid_t raw_fork(void)
{
    return (pid_t)syscall(SYS_clone, SIGCHLD, 0, 0, 0, 0);
}

/* In a child: fill until refused in the parent's context, report, free. */
static void child_fill(void)
{
    CUdeviceptr p[MAXP];
    CUresult rc;
    int k = fill(p, 0, MAXP, &rc, NULL);
    printf("child %d rc %d used %zu\n", k, rc, used());
    fflush(stdout);
    while (k > 0)
        p_free(p[--k]);
}

static int mode_fork(int n, const char *how)
{
    CUdeviceptr p[MAXP];
    int k = 0;
    pthread_t t;
    while (k < n && p_alloc(&p[k], CHUNK) == CUDA_SUCCESS)
        k++;
    int threaded = strcmp(how, "thread") == 0;
    if (threaded)
        pthread_create(&t, NULL, churn, NULL);
    for (int i = 0; i < 8; i++) {
        pid_t c = strcmp(how, "raw") == 0 ? raw_fork() : fork();
        if (c < 0)
            return 3;
        if (c == 0) {
            child_fill();
            exit(0);
        }
        int status;
        waitpid(c, &status, 0);
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
            printf("child died %d\n", status);
    }
    if (threaded) {
        churn_stop = 1;
        pthread_join(t, NULL);
    }
    printf("parent used %zu\n", used());
    while (k > 0)
        p_free(p[--k]);
    return 0;
}

static int mode_vfork(int n)
{
    CUdeviceptr p[MAXP];
    int k = 0;
    char line[64];
    while (k < n && p_alloc(&p[k], CHUNK) == CUDA_SUCCESS)
        k++;
    pid_t c = vfork();
    if (c < 0)
        return 3;
    if (c == 0)
        exit(0); /* not _exit: the atexit handlers run, in the parent's memory */
    waitpid(c, NULL, 0);
    printf("parent used %zu\n", used());
    fflush(stdout);
    while (fgets(line, sizeof line, stdin)) {
        if (strncmp(line, "one", 3) != 0)
            continue;
        CUresult rc = p_alloc(&p[k], CHUNK);
        k += rc == CUDA_SUCCESS;
        printf("one rc %d used %zu\n", rc, used());
        fflush(stdout);
    }
    while (k > 0)
        p_free(p[--k]);
    return 0;
}

/* ---- hammer ---- */

static volatile unsigned long long *held; /* one counter per hammer process, in a shared file */
static int my_index, nprocs = 8;
static unsigned long long budget, n_ok, n_refused, n_absurd_granted, n_violations, max_seen;

static unsigned long long held_total(void)
{
    unsigned long long sum = 0;
    for (int i = 0; i < nprocs; i++)
        sum += __atomic_load_n(&held[i], __ATOMIC_SEQ_CST);
    return sum;
}

static void *hammer_worker(void *arg)
{
    long n = (long)arg;
    CUdeviceptr mine[16];
    size_t sizes[16];
    int k = 0;
    unsigned int seed = (unsigned int)(now_ns() ^ (long long)pthread_self());
    unsigned long long ok = 0, no = 0, absurd_granted = 0, violations = 0, seen_max = 0;
    cuCtxSetCurrent(primary);
    for (long i = 0; i < n; i++) {
        int r = rand_r(&seed);
        if (i % 7 == 6) {
            CUdeviceptr d;
            if (p_alloc(&d, SIZE_MAX - (size_t)(r % 4096)) == CUDA_SUCCESS) {
                absurd_granted++;
                p_free(d);
            }
            continue;
        }
        if (k == 16 || (k > 0 && r % 2 == 0)) {
            int j = r % k;
            __atomic_sub_fetch(&held[my_index], sizes[j], __ATOMIC_SEQ_CST);
            p_free(mine[j]);
            mine[j] = mine[--k];
            sizes[j] = sizes[k];
            continue;
        }
        size_t size = (size_t)(2 + (r / 2) % 32) * 2 * MIB;
        if (p_alloc(&mine[k], size) != CUDA_SUCCESS) {
            no++;
            continue;
        }
        __atomic_add_fetch(&held[my_index], size, __ATOMIC_SEQ_CST);
        sizes[k++] = size;
        ok++;
        unsigned long long total = held_total();
        if (total > budget)
            violations++;
        if (total > seen_max)
            seen_max = total;
    }
    while (k > 0) {
        k--;
        __atomic_sub_fetch(&held[my_index], sizes[k], __ATOMIC_SEQ_CST);
        p_free(mine[k]);
    }
    __atomic_add_fetch(&n_ok, ok, __ATOMIC_RELAXED);
    __atomic_add_fetch(&n_refused, no, __ATOMIC_RELAXED);
    __atomic_add_fetch(&n_absurd_granted, absurd_granted, __ATOMIC_RELAXED);
    __atomic_add_fetch(&n_violations, violations, __ATOMIC_RELAXED);
    unsigned long long cur = __atomic_load_n(&max_seen, __ATOMIC_RELAXED);
    while (seen_max > cur &&
           !__atomic_compare_exchange_n(&max_seen, &cur, seen_max, 0, __ATOMIC_RELAXED,
                                        __ATOMIC_RELAXED))
        ;
    return NULL;
}

static int mode_hammer(const char *file, int index, int threads, long n, unsigned long long b)
{
    pthread_t t[64];
    int fd = open(file, O_RDWR);
    if (fd < 0 || threads < 1 || threads > 64 || index < 0 || index >= nprocs)
        return 3;
    held = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (held == MAP_FAILED)
        return 4;
    my_index = index;
    budget = b;
    /* Contexts are created (and measured) one process at a time: announce ours, wait for "go". */
    char line[64];
    printf("READY used %zu\n", used());
    fflush(stdout);
    if (!fgets(line, sizeof line, stdin))
        return 5;
    for (int i = 0; i < threads; i++)
        pthread_create(&t[i], NULL, hammer_worker, (void *)n);
    for (int i = 0; i < threads; i++)
        pthread_join(t[i], NULL);
    printf("hammer ok %llu refused %llu absurd_granted %llu violations %llu max %llu\n", n_ok,
           n_refused, n_absurd_granted, n_violations, max_seen);
    fflush(stdout);
    /* Keep the context (charged) until every hammer process is done: an exit gives it back, and
     * the others could then rightly use it. */
    while (fgets(line, sizeof line, stdin))
        ;
    return 0;
}

int main(int argc, char **argv)
{
    const char *path = argc > 1 ? argv[1] : "direct";
    const char *mode = argc > 2 ? argv[2] : "fill";
    CUdevice dev = 0;
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (resolve(path) != 0) {
        printf("lookup failed\n");
        return 1;
    }
    if (cuInit(0) != CUDA_SUCCESS || cuDeviceGet(&dev, 0) != CUDA_SUCCESS ||
        p_retain(&primary, dev) != CUDA_SUCCESS || cuCtxSetCurrent(primary) != CUDA_SUCCESS) {
        printf("no context\n");
        return 1;
    }
    if (strcmp(mode, "absurd") == 0)
        return mode_absurd();
    if (strcmp(mode, "teardown") == 0)
        return mode_teardown();
    if (strcmp(mode, "ctxdestroy") == 0)
        return mode_ctxdestroy();
    if (strcmp(mode, "small") == 0 && argc > 3)
        return mode_small(atoi(argv[3]));
    if (strcmp(mode, "fill") == 0)
        return mode_fill();
    if (strcmp(mode, "hold") == 0 && argc > 3)
        return mode_hold(atoi(argv[3]));
    if (strcmp(mode, "fork") == 0 && argc > 4)
        return mode_fork(atoi(argv[3]), argv[4]);
    if (strcmp(mode, "vfork") == 0 && argc > 3)
        return mode_vfork(atoi(argv[3]));
    if (strcmp(mode, "hammer") == 0 && argc > 7)
        return mode_hammer(argv[3], atoi(argv[4]), atoi(argv[5]), atol(argv[6]),
                           strtoull(argv[7], NULL, 10));
    return 2;
}
