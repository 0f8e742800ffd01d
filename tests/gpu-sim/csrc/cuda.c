/*
 * The fake libcuda.so.1: the CUDA driver API's C ABI on top of the simulated
 * node (sim_node.c) and the node-wide device state (sim_state.c).
 *
 * No GPU work happens. What is modelled is what a memory/compute limiter sees:
 * devices and their properties, contexts (each costing device memory), every
 * way of allocating device memory with the driver's rounding, memory shared
 * with the other processes on the node, kernel launches (validated and
 * counted), cuGetProcAddress, and faithful error codes. The rules are written
 * down in tests/gpu-sim/README.md ("CUDA driver").
 *
 * One mutex serialises the entry points; the context stack is per thread, as
 * in the driver. Only the functions declared in cuda_api.h are exported.
 */
#define _GNU_SOURCE
#pragma GCC visibility push(default)
#include "cuda_api.h"
#pragma GCC visibility pop

#include "cuda_procs.h"
#include "sim_node.h"
#include "sim_state.h"
#include "timeline.h"

#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

/* ------------------------------------------------------------------------ */
/* Model constants                                                           */
/* ------------------------------------------------------------------------ */

#define KIB 1024ull
#define MIB (1024ull * 1024ull)
/* Physical page of device memory; also cuMemGetAllocationGranularity's answer. */
#define PAGE (2ull * MIB)
/* cuMemAlloc returns addresses aligned to this and rounds sizes up to it. */
#define ALLOC_ALIGN 512ull
/* Allocations below this are packed into shared 2 MiB pages (per process and device). */
#define SMALL_LIMIT (1ull * MIB)
/* cuMemAllocPitch pads rows to this. */
#define PITCH_ALIGN 512ull
/* Nothing larger is ever allocatable: keeps the rounding arithmetic far from overflow. */
#define MAX_REQUEST (1ull << 50)
/* Fake device virtual addresses: far from anything Linux maps in a process. */
#define VA_BASE 0x300000000000ull
#define VA32_BASE 0x10000000u
#define VA32_LIMIT 0xF0000000u
#define CTX_STACK_DEPTH 64
#define CUDA_ARRAY3D_LAYERED 0x01

static inline uint64_t round_up(uint64_t n, uint64_t to)
{
    return (n + to - 1) / to * to;
}

/* ------------------------------------------------------------------------ */
/* Objects                                                                   */
/* ------------------------------------------------------------------------ */

struct CUctx_st {
    int dev;                  /* CUDA ordinal */
    bool primary;
    bool alive;
    unsigned int flags;
    CUresult sticky;          /* a sticky error (the GPU fell off the bus), or 0 */
    struct sim_tl_queue *tl_legacy; /* the legacy default stream's pending kernels */
    struct sim_tl_mark tl_last; /* the last kernel this process queued in the context */
};

struct CUstream_st {
    struct CUctx_st *ctx;
    unsigned int flags;
    struct sim_tl_queue *tl_queue; /* pending kernels (NULL until the first timed launch) */
    struct CUgraph_st *capture; /* the graph being captured into (stream capture), or NULL */
};

struct CUmod_st {
    struct CUctx_st *ctx;
};

struct CUfunc_st {
    struct CUmod_st *mod;
    char *name;
    uint64_t wave_ns;         /* time per wave ("@wave_ns=N" or GPU_SIM_WAVE_NS) */
    uint64_t kernel_ns;       /* fixed time per launch ("@kernel_ns=N"); 0: by waves */
};

struct CUmemPoolHandle_st {
    int dev;
    bool is_default;
    uint64_t max_size;        /* 0: unlimited */
    uint64_t used;
};

/* Handles of arrays and mipmapped arrays point at one of these. */
struct CUarray_st {
    int unused;
};
struct CUmipmappedArray_st {
    int unused;
};

/* Live objects of one kind (pointers), for validating handles. Freed objects
 * leave the registry; contexts are never freed, so a thread whose current
 * context was destroyed elsewhere can still be told so. */
struct registry {
    void **items;
    size_t count, capacity;
};

enum alloc_kind {
    A_LINEAR,       /* cuMemAlloc_v2, cuMemAllocPitch_v2 */
    A_LINEAR_V1,    /* the 32-bit legacy cuMemAlloc / cuMemAllocPitch */
    A_MANAGED,      /* cuMemAllocManaged (host-backed) */
    A_ASYNC,        /* cuMemAllocAsync, cuMemAllocFromPoolAsync */
    A_ARRAY,        /* cuArrayCreate*, cuArray3DCreate* */
    A_MIPMAP,       /* cuMipmappedArrayCreate */
    A_VMM,          /* cuMemCreate */
    A_GRAPH,        /* a launched graph allocation not freed inside its graph (graph memory) */
    A_IPC,          /* another process's cuMemAlloc memory opened with cuIpcOpenMemHandle */
};

struct alloc {
    struct alloc *next;
    enum alloc_kind kind;
    uint64_t key;             /* device address, array handle or VMM handle */
    uint64_t size;            /* bytes of the object after rounding to ALLOC_ALIGN */
    uint64_t charge;          /* device bytes charged (not for small ones: see small_sum) */
    bool small;
    int dev;                  /* CUDA ordinal; -1: host memory (VMM) */
    struct CUctx_st *ctx;     /* owning context (freed with it); NULL for VMM */
    struct CUmemPoolHandle_st *pool;
    void *host;               /* managed memory's host backing */
    void *contents;           /* linear memory's bytes, mapped at the first copy (else NULL) */
    unsigned int ipc_refs;    /* A_IPC: cuIpcOpenMemHandle calls not yet closed */
    int ipc_pid;              /* A_IPC: the exporting process */
    uint64_t ipc_key;         /* A_IPC: the exporter's device address */
    unsigned int map_count;   /* VMM: live cuMemMap mappings */
    unsigned int handle_refs; /* VMM: cuMemCreate + cuMemRetainAllocationHandle - cuMemRelease */
    bool released;            /* VMM: no handle reference left while still mapped */
};

struct reservation {
    struct reservation *next;
    uint64_t va, size;
};

struct mapping {
    struct mapping *next;
    uint64_t va, size;
    struct alloc *handle;
};

struct device {
    unsigned int gpu;         /* index in the node file */
    struct CUctx_st *primary; /* non-NULL while retained */
    unsigned int primary_refs;
    unsigned int primary_flags;
    uint64_t small_sum;       /* bytes of small allocations (packed into 2 MiB pages) */
    struct CUmemPoolHandle_st *default_pool;
    uint64_t graph_reserved;  /* graph memory pool: physical bytes held (charged) */
    uint64_t graph_in_use;    /* ... of which used by live graph allocations */
};

/* Per-GPU model numbers for cuDeviceGetAttribute, picked by product name. */
struct model {
    const char *match;
    int cc_major, cc_minor, sms, clock_khz, mem_clock_khz, bus_width, l2_bytes;
    int smem_per_sm, smem_optin, threads_per_sm;
};

static const struct model models[] = {
    {"H100", 9, 0, 132, 1980000, 2619000, 5120, 52428800, 233472, 232448, 2048},
    {"A100", 8, 0, 108, 1410000, 1593000, 5120, 41943040, 167936, 166912, 2048},
    {"V100", 7, 0, 80, 1530000, 877000, 4096, 6291456, 98304, 98304, 2048},
    {"T4", 7, 5, 40, 1590000, 5001000, 256, 4194304, 65536, 65536, 1024},
    {NULL, 8, 0, 108, 1410000, 1593000, 5120, 41943040, 167936, 166912, 2048}, /* default */
};

enum init_state { INIT_NONE = 0, INIT_OK, INIT_FAILED };

static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static enum init_state g_init;
static CUresult g_init_result;
static bool g_forked;                 /* this is a child forked after cuInit */
static struct sim_node *g_node;
static struct sim_state g_state;
static struct sim_tl g_tl;            /* the node's kernel timelines (timeline.h) */
static uint64_t g_wave_ns;            /* GPU_SIM_WAVE_NS: default time per wave */
static uint64_t g_graph_ns;           /* GPU_SIM_GRAPH_NS: time of a graph launch */
static int g_host_pid;                /* getpid() + GPU_SIM_HOST_PID_OFFSET, what NVML reports */
static unsigned int g_dev_count;
static struct device g_devs[SIM_MAX_GPUS];
static struct alloc *g_allocs;
static struct reservation *g_reservations;
static struct mapping *g_mappings;
static struct registry g_contexts, g_streams, g_modules, g_functions, g_pools;
static struct registry g_graphs, g_graph_nodes, g_graph_execs;
static uint64_t g_next_va = VA_BASE;
static uint32_t g_next_va32 = VA32_BASE;
static uint64_t g_next_handle = 0x1000;

static __thread struct CUctx_st *t_stack[CTX_STACK_DEPTH];
static __thread int t_depth;
static __thread struct sim_tl_queue *t_ptds_queue; /* this thread's per-thread default stream */

/* ------------------------------------------------------------------------ */
/* Small helpers                                                             */
/* ------------------------------------------------------------------------ */

static bool reg_add(struct registry *r, void *item)
{
    if (r->count == r->capacity) {
        size_t capacity = r->capacity ? r->capacity * 2 : 16;
        void **items = realloc(r->items, capacity * sizeof *items);
        if (items == NULL)
            return false;
        r->items = items;
        r->capacity = capacity;
    }
    r->items[r->count++] = item;
    return true;
}

static bool reg_has(const struct registry *r, const void *item)
{
    size_t i;

    if (item == NULL)
        return false;
    for (i = 0; i < r->count; i++) {
        if (r->items[i] == item)
            return true;
    }
    return false;
}

static void reg_remove(struct registry *r, const void *item)
{
    size_t i;

    for (i = 0; i < r->count; i++) {
        if (r->items[i] == item) {
            r->items[i] = r->items[--r->count];
            return;
        }
    }
}

static void lock(void)
{
    pthread_mutex_lock(&g_lock);
}

static void unlock(void)
{
    pthread_mutex_unlock(&g_lock);
}

/* Takes the lock if the driver is initialised in this process. */
static CUresult enter(void)
{
    lock();
    if (g_init != INIT_OK || g_forked) {
        unlock();
        return CUDA_ERROR_NOT_INITIALIZED;
    }
    return CUDA_SUCCESS;
}

static CUresult leave(CUresult r)
{
    unlock();
    return r;
}

/*
 * Waits until the kernel of mark (and so every earlier one of this process on that GPU) has
 * completed, sleeping without the driver lock; the lock is held again on return.
 */
static void wait_for(const struct sim_tl_mark *mark)
{
    struct sim_tl_mark m = *mark; /* the owner may be freed while we sleep */
    uint64_t hint;

    while ((hint = sim_tl_wait_hint(&g_tl, &m, sim_tl_now_ns())) != 0) {
        unlock();
        sim_tl_sleep_until(hint);
        lock();
    }
}

static struct sim_gpu *gpu_of(int dev)
{
    return &g_node->gpus[g_devs[dev].gpu];
}

static bool valid_dev(CUdevice dev)
{
    return dev >= 0 && (unsigned int)dev < g_dev_count;
}

static bool gpu_failed(int dev)
{
    sim_node_sync(g_node);
    return gpu_of(dev)->failed;
}

/*
 * A context whose GPU fell off the bus is broken for good, like after any
 * sticky error: every later call in it answers CUDA_ERROR_LAUNCH_FAILED,
 * also after the GPU recovers, until the context is destroyed.
 */
static CUresult ctx_health(struct CUctx_st *c)
{
    if (c->sticky == CUDA_SUCCESS && gpu_failed(c->dev))
        c->sticky = CUDA_ERROR_LAUNCH_FAILED;
    return c->sticky;
}

static struct CUctx_st *top_ctx(void)
{
    return t_depth > 0 ? t_stack[t_depth - 1] : NULL;
}

/* The calling thread's current context, usable for device work. */
static CUresult current_ctx(struct CUctx_st **out)
{
    struct CUctx_st *c = top_ctx();

    if (c == NULL || !c->alive)
        return CUDA_ERROR_INVALID_CONTEXT;
    *out = c;
    return ctx_health(c);
}

/* Memory a device can hand out: total - reserved - what the node file says is in use. */
static uint64_t capacity_of(int dev)
{
    const struct sim_gpu *gpu = gpu_of(dev);
    uint64_t taken = gpu->memory_reserved_bytes + sim_gpu_allocated_bytes(gpu);

    return gpu->memory_total_bytes > taken ? gpu->memory_total_bytes - taken : 0;
}

static CUresult charge(int dev, uint64_t bytes)
{
    if (!sim_state_charge(&g_state, g_devs[dev].gpu, bytes, capacity_of(dev)))
        return CUDA_ERROR_OUT_OF_MEMORY;
    return CUDA_SUCCESS;
}

static void uncharge(int dev, uint64_t bytes)
{
    sim_state_uncharge(&g_state, g_devs[dev].gpu, bytes);
}

static uint64_t next_va(uint64_t size, uint64_t align)
{
    uint64_t va = round_up(g_next_va, align);

    g_next_va = va + round_up(size ? size : 1, ALLOC_ALIGN);
    return va;
}

static struct alloc *find_alloc(uint64_t key, bool (*kind_ok)(enum alloc_kind))
{
    struct alloc *a;

    for (a = g_allocs; a != NULL; a = a->next) {
        if (a->key == key && kind_ok(a->kind))
            return a;
    }
    return NULL;
}

static bool is_linear(enum alloc_kind k)
{
    return k == A_LINEAR || k == A_LINEAR_V1 || k == A_MANAGED || k == A_ASYNC || k == A_GRAPH;
}

static bool is_array(enum alloc_kind k)
{
    return k == A_ARRAY;
}

static bool is_mipmap(enum alloc_kind k)
{
    return k == A_MIPMAP;
}

static bool is_graph_kind(enum alloc_kind k)
{
    return k == A_GRAPH;
}

static bool is_vmm(enum alloc_kind k)
{
    return k == A_VMM;
}

static void unlink_alloc(struct alloc *target)
{
    struct alloc **link;

    for (link = &g_allocs; *link != NULL; link = &(*link)->next) {
        if (*link == target) {
            *link = target->next;
            return;
        }
    }
}

/*
 * Charges and records a device-memory object of `bytes` on `dev`:
 *   - the size is rounded up to 512 bytes;
 *   - below 1 MiB it is "small": small objects of a process share 2 MiB pages,
 *     so the device is charged for the process's small total rounded up to 2 MiB;
 *   - otherwise it is charged rounded up to 2 MiB on its own.
 * Over capacity: CUDA_ERROR_OUT_OF_MEMORY and nothing changes.
 */
static CUresult new_device_object(struct CUctx_st *ctx, int dev, enum alloc_kind kind,
                                  uint64_t bytes, struct alloc **out)
{
    struct device *d = &g_devs[dev];
    struct alloc *a;
    uint64_t size, cost;
    bool small;
    CUresult r;

    if (bytes > MAX_REQUEST)
        return CUDA_ERROR_OUT_OF_MEMORY;
    size = round_up(bytes, ALLOC_ALIGN);
    if (kind == A_MANAGED) {
        /* Managed memory lives in host pages until the device touches them (it may exceed
         * the device's memory and pages migrate/spill on demand); no kernel ever runs here,
         * so none of it is resident: nothing is charged to the device, it is only counted. */
        a = calloc(1, sizeof *a);
        if (a == NULL)
            return CUDA_ERROR_OUT_OF_MEMORY;
        sim_state_add_managed(&g_state, d->gpu, size);
        a->kind = kind;
        a->size = size;
        a->dev = dev;
        a->ctx = ctx;
        a->next = g_allocs;
        g_allocs = a;
        *out = a;
        return CUDA_SUCCESS;
    }
    small = size < SMALL_LIMIT;
    cost = small ? round_up(d->small_sum + size, PAGE) - round_up(d->small_sum, PAGE)
                 : round_up(size, PAGE);
    a = calloc(1, sizeof *a);
    if (a == NULL)
        return CUDA_ERROR_OUT_OF_MEMORY;
    r = charge(dev, cost);
    if (r != CUDA_SUCCESS) {
        free(a);
        return r;
    }
    if (small)
        d->small_sum += size;
    a->kind = kind;
    a->size = size;
    a->charge = small ? 0 : cost;
    a->small = small;
    a->dev = dev;
    a->ctx = ctx;
    a->next = g_allocs;
    g_allocs = a;
    *out = a;
    return CUDA_SUCCESS;
}

static void free_object(struct alloc *a)
{
    if (a->kind == A_MANAGED) {
        sim_state_sub_managed(&g_state, g_devs[a->dev].gpu, a->size);
    } else if (a->kind == A_GRAPH) {
        /* Back to the device's graph pool, which keeps it until cuDeviceGraphMemTrim. */
        g_devs[a->dev].graph_in_use -= a->size;
    } else if (a->dev >= 0) {
        struct device *d = &g_devs[a->dev];
        if (a->small) {
            uint64_t before = round_up(d->small_sum, PAGE);
            d->small_sum -= a->size;
            uncharge(a->dev, before - round_up(d->small_sum, PAGE));
        } else {
            uncharge(a->dev, a->charge);
        }
    }
    if (a->pool != NULL)
        a->pool->used -= a->size;
    if (a->host != NULL)
        munmap(a->host, a->size);
    if (a->contents != NULL)
        munmap(a->contents, a->size);
    if (a->kind == A_ARRAY || a->kind == A_MIPMAP)
        free((void *)(uintptr_t)a->key);
    unlink_alloc(a);
    free(a);
}

/* A linear allocation at a fresh device address (or host-backed for managed memory). */
static CUresult linear_alloc(struct CUctx_st *ctx, int dev, enum alloc_kind kind, uint64_t bytes,
                             uint64_t *addr)
{
    struct alloc *a;
    CUresult r = new_device_object(ctx, dev, kind, bytes, &a);

    if (r != CUDA_SUCCESS)
        return r;
    if (kind == A_MANAGED) {
        /* Managed memory is usable from the host: back it with real pages. */
        void *p = mmap(NULL, a->size, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED) {
            free_object(a);
            return CUDA_ERROR_OUT_OF_MEMORY;
        }
        a->host = p;
        a->key = (uint64_t)(uintptr_t)p;
    } else if (kind == A_LINEAR_V1) {
        if (a->size > VA32_LIMIT - g_next_va32) {
            free_object(a);
            return CUDA_ERROR_OUT_OF_MEMORY; /* the 32-bit address space is full */
        }
        a->key = g_next_va32;
        g_next_va32 += (uint32_t)a->size;
    } else {
        a->key = next_va(a->size, a->small ? ALLOC_ALIGN : PAGE);
    }
    *addr = a->key;
    return CUDA_SUCCESS;
}

static void ctx_stack_remove(struct CUctx_st *c)
{
    int i, j = 0;

    for (i = 0; i < t_depth; i++) {
        if (t_stack[i] != c)
            t_stack[j++] = t_stack[i];
    }
    t_depth = j;
}

static CUresult ctx_new(int dev, unsigned int flags, bool primary, struct CUctx_st **out)
{
    struct CUctx_st *c;
    CUresult r;

    /* A GPU that fell off the bus cannot get new contexts: "unknown error". */
    if (gpu_failed(dev))
        return CUDA_ERROR_UNKNOWN;
    c = calloc(1, sizeof *c);
    if (c == NULL)
        return CUDA_ERROR_OUT_OF_MEMORY;
    r = charge(dev, g_node->cuda_context_bytes);
    if (r == CUDA_SUCCESS && !reg_add(&g_contexts, c)) {
        uncharge(dev, g_node->cuda_context_bytes);
        r = CUDA_ERROR_OUT_OF_MEMORY;
    }
    if (r != CUDA_SUCCESS) {
        free(c);
        return r;
    }
    c->dev = dev;
    c->primary = primary;
    c->alive = true;
    c->flags = flags;
    *out = c;
    /* The memory is in use (NVML sees it) before the creation returns, as on a real driver. */
    if (g_node->cuda_context_create_ns > 0)
        sim_tl_sleep_until(sim_tl_now_ns() + g_node->cuda_context_create_ns);
    return CUDA_SUCCESS;
}

/* Destroys a context: its memory, modules and streams go with it. The struct stays
 * (dead) because other threads may still have it current. */
static void ctx_destroy(struct CUctx_st *c)
{
    struct alloc *a, *next;
    size_t i;

    for (a = g_allocs; a != NULL; a = next) {
        next = a->next;
        if (a->ctx == c)
            free_object(a);
    }
    for (i = g_streams.count; i-- > 0;) {
        struct CUstream_st *s = g_streams.items[i];
        if (s->ctx == c) {
            reg_remove(&g_streams, s);
            free(s->tl_queue);
            free(s);
        }
    }
    for (i = g_modules.count; i-- > 0;) {
        struct CUmod_st *m = g_modules.items[i];
        if (m->ctx == c) {
            size_t k;
            for (k = g_functions.count; k-- > 0;) {
                struct CUfunc_st *f = g_functions.items[k];
                if (f->mod == m) {
                    reg_remove(&g_functions, f);
                    free(f->name);
                    free(f);
                }
            }
            reg_remove(&g_modules, m);
            free(m);
        }
    }
    uncharge(c->dev, g_node->cuda_context_bytes);
    c->alive = false;
    reg_remove(&g_contexts, c);
    ctx_stack_remove(c);
}

static bool ctx_flags_ok(unsigned int flags)
{
    unsigned int sched = flags & CU_CTX_SCHED_MASK;

    return (flags & ~(unsigned int)CU_CTX_FLAGS_MASK) == 0 &&
           (sched == CU_CTX_SCHED_AUTO || sched == CU_CTX_SCHED_SPIN ||
            sched == CU_CTX_SCHED_YIELD || sched == CU_CTX_SCHED_BLOCKING_SYNC);
}

static CUresult check_stream(CUstream s)
{
    if (s == NULL || s == CU_STREAM_LEGACY || s == CU_STREAM_PER_THREAD)
        return CUDA_SUCCESS;
    return reg_has(&g_streams, s) ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE;
}

/* ------------------------------------------------------------------------ */
/* Initialisation                                                            */
/* ------------------------------------------------------------------------ */

static void after_fork_in_child(void)
{
    /* The driver does not survive fork: the child must not use the parent's state. */
    g_forked = true;
    pthread_mutex_init(&g_lock, NULL);
}

__attribute__((destructor)) static void on_exit_release(void)
{
    /* A process that exits gives its device memory back, as with the real driver. */
    if (g_init == INIT_OK && !g_forked)
        sim_state_detach(&g_state);
}

static void report(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

static void report(const char *fmt, ...)
{
    char line[1024];
    va_list ap;
    int n;

    va_start(ap, fmt);
    n = vsnprintf(line, sizeof line - 1, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if ((size_t)n > sizeof line - 2)
        n = sizeof line - 2;
    line[n] = '\n';
    line[n + 1] = '\0';
    fputs(line, stderr);
    fflush(stderr);
}

/*
 * CUDA_VISIBLE_DEVICES: a comma-separated list of indices or GPU UUIDs (a
 * unique prefix of at least "GPU-x" is enough). As with the driver, the list
 * ends at the first entry that is invalid, unknown or a repeat; set but empty
 * hides every GPU.
 */
static void apply_visible_devices(void)
{
    const char *env = getenv("CUDA_VISIBLE_DEVICES");
    char buf[4096];
    char *save = NULL, *tok;
    bool used[SIM_MAX_GPUS] = {false};
    unsigned int i;

    g_dev_count = 0;
    if (env == NULL) {
        for (i = 0; i < g_node->gpu_count; i++)
            g_devs[g_dev_count++].gpu = i;
        return;
    }
    snprintf(buf, sizeof buf, "%s", env);
    for (tok = strtok_r(buf, ",", &save); tok != NULL; tok = strtok_r(NULL, ",", &save)) {
        int found = -1;
        char *end;
        while (isspace((unsigned char)*tok))
            tok++;
        end = tok + strlen(tok);
        while (end > tok && isspace((unsigned char)end[-1]))
            *--end = '\0';
        if (*tok >= '0' && *tok <= '9') {
            char *rest;
            unsigned long n = strtoul(tok, &rest, 10);
            if (*rest == '\0' && n < g_node->gpu_count)
                found = (int)n;
        } else if (strncmp(tok, "GPU-", 4) == 0 && strlen(tok) > 4) {
            for (i = 0; i < g_node->gpu_count; i++) {
                if (strncmp(g_node->gpus[i].uuid, tok, strlen(tok)) == 0) {
                    if (found >= 0) {
                        found = -1; /* ambiguous prefix */
                        break;
                    }
                    found = (int)i;
                }
            }
        }
        if (found < 0 || used[found])
            break;
        used[found] = true;
        g_devs[g_dev_count++].gpu = (unsigned int)found;
    }
}

/*
 * A decimal environment variable of the kernel time model (unset or empty: 0). False after
 * one line on stderr naming it when it is not a number up to max.
 */
static bool env_number(const char *name, unsigned long long max, const char *unit,
                       unsigned long long *out)
{
    const char *v = getenv(name);
    char *end;

    *out = 0;
    if (v == NULL || v[0] == '\0')
        return true;
    errno = 0;
    *out = strtoull(v, &end, 10);
    if (v[0] < '0' || v[0] > '9' || *end != '\0' || errno != 0 || *out > max) {
        report("gpu-sim: %s='%s': expected a decimal number of %s from 0 to %llu", name, v,
               unit, max);
        return false;
    }
    return true;
}

static bool read_time_env(void)
{
    unsigned long long wave, graph, offset;

    if (!env_number("GPU_SIM_WAVE_NS", SIM_TL_HORIZON_MAX_NS, "nanoseconds", &wave) ||
        !env_number("GPU_SIM_GRAPH_NS", SIM_TL_HORIZON_MAX_NS, "nanoseconds", &graph) ||
        !env_number("GPU_SIM_HOST_PID_OFFSET", 1000000000ull, "pids", &offset))
        return false;
    g_wave_ns = wave;
    g_graph_ns = graph;
    g_host_pid = sim_self_pid() + (int)offset;
    return true;
}

static CUresult do_init(void)
{
    struct sim_node *node = NULL;

    if (!read_time_env())
        return CUDA_ERROR_UNKNOWN;
    switch (sim_node_load_from_env(&node)) {
    case SIM_LOAD_OK:
        break;
    case SIM_LOAD_NO_NODE:
        /* What the driver says when the kernel module finds no GPU. */
        return CUDA_ERROR_NO_DEVICE;
    case SIM_LOAD_INVALID:
        return CUDA_ERROR_UNKNOWN; /* the parser printed why */
    case SIM_LOAD_NO_MEMORY:
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    g_node = node;
    apply_visible_devices();
    if (g_dev_count == 0) {
        sim_node_free(node);
        g_node = NULL;
        return CUDA_ERROR_NO_DEVICE;
    }
    if (sim_state_open(node->node_path, true, &g_state) != 0) {
        report("gpu-sim: %s%s: cannot open the device state: %s", node->node_path,
               SIM_STATE_SUFFIX, strerror(errno));
        sim_node_free(node);
        g_node = NULL;
        return CUDA_ERROR_OPERATING_SYSTEM;
    }
    if (!sim_state_attach(&g_state)) {
        report("gpu-sim: %s%s: all %d process slots are in use", node->node_path,
               SIM_STATE_SUFFIX, SIM_STATE_SLOTS);
        sim_state_close(&g_state);
        sim_node_free(node);
        g_node = NULL;
        return CUDA_ERROR_OPERATING_SYSTEM;
    }
    if (sim_tl_open(node->node_path, true, node->utilization_period_ns, &g_tl) != 0) {
        report("gpu-sim: %s%s: cannot open the kernel timeline: %s", node->node_path,
               SIM_TL_SUFFIX, strerror(errno));
        sim_state_detach(&g_state);
        sim_state_close(&g_state);
        sim_node_free(node);
        g_node = NULL;
        return CUDA_ERROR_OPERATING_SYSTEM;
    }
    sim_tl_attach(&g_tl, g_state.slot, sim_self_pid(), g_host_pid);
    pthread_atfork(NULL, NULL, after_fork_in_child);
    return CUDA_SUCCESS;
}

CUresult cuInit(unsigned int Flags)
{
    CUresult r;

    if (Flags != 0)
        return CUDA_ERROR_INVALID_VALUE;
    lock();
    if (g_forked) {
        r = CUDA_ERROR_NOT_INITIALIZED;
    } else if (g_init != INIT_NONE) {
        r = g_init_result; /* the first answer sticks, success or failure */
    } else {
        r = do_init();
        g_init_result = r;
        g_init = r == CUDA_SUCCESS ? INIT_OK : INIT_FAILED;
    }
    unlock();
    return r;
}

/* Needs no cuInit. Before it, the node file is read just for the version. */
CUresult cuDriverGetVersion(int *driverVersion)
{
    int version = 12040;

    if (driverVersion == NULL)
        return CUDA_ERROR_INVALID_VALUE;
    lock();
    if (g_init == INIT_OK) {
        version = g_node->cuda_driver_version;
    } else {
        struct sim_node *node = NULL;
        if (sim_node_load_from_env(&node) == SIM_LOAD_OK)
            version = node->cuda_driver_version;
        sim_node_free(node);
    }
    unlock();
    *driverVersion = version;
    return CUDA_SUCCESS;
}

struct error_text {
    CUresult code;
    const char *name;
    const char *text;
};

/* The driver's own names and strings. */
static const struct error_text errors[] = {
#define E(code, text) {code, #code, text}
    E(CUDA_SUCCESS, "no error"),
    E(CUDA_ERROR_INVALID_VALUE, "invalid argument"),
    E(CUDA_ERROR_OUT_OF_MEMORY, "out of memory"),
    E(CUDA_ERROR_NOT_INITIALIZED, "initialization error"),
    E(CUDA_ERROR_DEINITIALIZED, "driver shutting down"),
    E(CUDA_ERROR_PROFILER_DISABLED, "profiler disabled while using external profiling tool"),
    E(CUDA_ERROR_STUB_LIBRARY, "CUDA driver is a stub library"),
    E(CUDA_ERROR_DEVICE_UNAVAILABLE, "CUDA-capable device(s) is/are busy or unavailable"),
    E(CUDA_ERROR_NO_DEVICE, "no CUDA-capable device is detected"),
    E(CUDA_ERROR_INVALID_DEVICE, "invalid device ordinal"),
    E(CUDA_ERROR_DEVICE_NOT_LICENSED, "device doesn't have valid Grid license"),
    E(CUDA_ERROR_INVALID_IMAGE, "device kernel image is invalid"),
    E(CUDA_ERROR_INVALID_CONTEXT, "invalid device context"),
    E(CUDA_ERROR_CONTEXT_ALREADY_CURRENT, "context already current"),
    E(CUDA_ERROR_MAP_FAILED, "mapping of buffer object failed"),
    E(CUDA_ERROR_UNMAP_FAILED, "unmapping of buffer object failed"),
    E(CUDA_ERROR_ARRAY_IS_MAPPED, "array is mapped"),
    E(CUDA_ERROR_ALREADY_MAPPED, "resource already mapped"),
    E(CUDA_ERROR_NO_BINARY_FOR_GPU, "no kernel image is available for execution on the device"),
    E(CUDA_ERROR_ALREADY_ACQUIRED, "resource already acquired"),
    E(CUDA_ERROR_NOT_MAPPED, "resource not mapped"),
    E(CUDA_ERROR_ECC_UNCORRECTABLE, "uncorrectable ECC error encountered"),
    E(CUDA_ERROR_CONTEXT_ALREADY_IN_USE, "exclusive-thread device already in use by a different thread"),
    E(CUDA_ERROR_INVALID_PTX, "a PTX JIT compilation failed"),
    E(CUDA_ERROR_INVALID_SOURCE, "device kernel image is invalid"),
    E(CUDA_ERROR_FILE_NOT_FOUND, "file not found"),
    E(CUDA_ERROR_OPERATING_SYSTEM, "OS call failed or operation not supported on this OS"),
    E(CUDA_ERROR_INVALID_HANDLE, "invalid resource handle"),
    E(CUDA_ERROR_ILLEGAL_STATE, "the operation cannot be performed in the present state"),
    E(CUDA_ERROR_NOT_FOUND, "named symbol not found"),
    E(CUDA_ERROR_NOT_READY, "device not ready"),
    E(CUDA_ERROR_ILLEGAL_ADDRESS, "an illegal memory access was encountered"),
    E(CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES, "too many resources requested for launch"),
    E(CUDA_ERROR_LAUNCH_TIMEOUT, "the launch timed out and was terminated"),
    E(CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED, "peer access is already enabled"),
    E(CUDA_ERROR_PEER_ACCESS_NOT_ENABLED, "peer access has not been enabled"),
    E(CUDA_ERROR_PRIMARY_CONTEXT_ACTIVE, "cannot set while device is active in this process"),
    E(CUDA_ERROR_CONTEXT_IS_DESTROYED, "context is destroyed"),
    E(CUDA_ERROR_ASSERT, "device-side assert triggered"),
    E(CUDA_ERROR_HARDWARE_STACK_ERROR, "hardware stack error"),
    E(CUDA_ERROR_ILLEGAL_INSTRUCTION, "an illegal instruction was encountered"),
    E(CUDA_ERROR_MISALIGNED_ADDRESS, "misaligned address"),
    E(CUDA_ERROR_INVALID_ADDRESS_SPACE, "operation not supported on global/shared address space"),
    E(CUDA_ERROR_INVALID_PC, "invalid program counter"),
    E(CUDA_ERROR_LAUNCH_FAILED, "unspecified launch failure"),
    E(CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE, "too many blocks in cooperative launch"),
    E(CUDA_ERROR_NOT_PERMITTED, "operation not permitted"),
    E(CUDA_ERROR_NOT_SUPPORTED, "operation not supported"),
    E(CUDA_ERROR_SYSTEM_NOT_READY, "system not yet initialized"),
    E(CUDA_ERROR_SYSTEM_DRIVER_MISMATCH, "system has unsupported display driver / cuda driver combination"),
    E(CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE, "forward compatibility was attempted on non supported HW"),
    E(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, "operation not permitted when stream is capturing"),
    E(CUDA_ERROR_TIMEOUT, "wait operation timed out"),
    E(CUDA_ERROR_UNKNOWN, "unknown error"),
#undef E
};

static const struct error_text *error_entry(CUresult error)
{
    size_t i;

    for (i = 0; i < sizeof errors / sizeof errors[0]; i++) {
        if (errors[i].code == error)
            return &errors[i];
    }
    return NULL;
}

/* Need no cuInit. An unknown code: CUDA_ERROR_INVALID_VALUE and *pStr = NULL. */
CUresult cuGetErrorString(CUresult error, const char **pStr)
{
    const struct error_text *e = error_entry(error);

    if (pStr == NULL)
        return CUDA_ERROR_INVALID_VALUE;
    *pStr = e ? e->text : NULL;
    return e ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

CUresult cuGetErrorName(CUresult error, const char **pStr)
{
    const struct error_text *e = error_entry(error);

    if (pStr == NULL)
        return CUDA_ERROR_INVALID_VALUE;
    *pStr = e ? e->name : NULL;
    return e ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

/* Work before cuInit: the CUDA runtime fetches cuInit itself through them. */
CUresult cuGetProcAddress(const char *symbol, void **pfn, int cudaVersion, cuuint64_t flags)
{
    return cuda_proc_lookup(symbol, pfn, cudaVersion, flags, NULL);
}

CUresult cuGetProcAddress_v2(const char *symbol, void **pfn, int cudaVersion, cuuint64_t flags,
                             CUdriverProcAddressQueryResult *symbolStatus)
{
    return cuda_proc_lookup(symbol, pfn, cudaVersion, flags, symbolStatus);
}

/* ------------------------------------------------------------------------ */
/* Devices                                                                   */
/* ------------------------------------------------------------------------ */

CUresult cuDeviceGet(CUdevice *device, int ordinal)
{
    CUresult r = enter();

    if (r != CUDA_SUCCESS)
        return r;
    if (device == NULL)
        return leave(CUDA_ERROR_INVALID_VALUE);
    if (!valid_dev(ordinal))
        return leave(CUDA_ERROR_INVALID_DEVICE);
    *device = ordinal;
    return leave(CUDA_SUCCESS);
}

CUresult cuDeviceGetCount(int *count)
{
    CUresult r = enter();

    if (r != CUDA_SUCCESS)
        return r;
    if (count == NULL)
        return leave(CUDA_ERROR_INVALID_VALUE);
    *count = (int)g_dev_count;
    return leave(CUDA_SUCCESS);
}

/* Static device facts keep answering for a GPU that fell off the bus (the driver caches them). */
CUresult cuDeviceGetName(char *name, int len, CUdevice dev)
{
    CUresult r = enter();

    if (r != CUDA_SUCCESS)
        return r;
    if (name == NULL || len <= 0)
        return leave(CUDA_ERROR_INVALID_VALUE);
    if (!valid_dev(dev))
        return leave(CUDA_ERROR_INVALID_DEVICE);
    snprintf(name, (size_t)len, "%s", gpu_of(dev)->name); /* truncated to fit, NUL-terminated */
    return leave(CUDA_SUCCESS);
}

static CUresult device_uuid(CUuuid *uuid, CUdevice dev)
{
    CUresult r = enter();
    const char *s;
    int i = 0;

    if (r != CUDA_SUCCESS)
        return r;
    if (uuid == NULL)
        return leave(CUDA_ERROR_INVALID_VALUE);
    if (!valid_dev(dev))
        return leave(CUDA_ERROR_INVALID_DEVICE);
    /* The 16 bytes NVML prints as GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx. */
    for (s = gpu_of(dev)->uuid + 4; *s != '\0' && i < 16; s++) {
        if (*s == '-')
            continue;
        uuid->bytes[i] = (char)((sim_hex_digit(s[0]) << 4) | sim_hex_digit(s[1]));
        s++;
        i++;
    }
    return leave(CUDA_SUCCESS);
}

CUresult cuDeviceGetUuid(CUuuid *uuid, CUdevice dev)
{
    return device_uuid(uuid, dev);
}

/* _v2 differs from the original only for MIG instances, which are not modelled. */
CUresult cuDeviceGetUuid_v2(CUuuid *uuid, CUdevice dev)
{
    return device_uuid(uuid, dev);
}

static CUresult total_mem(bool out_ok, uint64_t *bytes, CUdevice dev)
{
    CUresult r = enter();

    if (r != CUDA_SUCCESS)
        return r;
    if (!out_ok)
        return leave(CUDA_ERROR_INVALID_VALUE);
    if (!valid_dev(dev))
        return leave(CUDA_ERROR_INVALID_DEVICE);
    *bytes = gpu_of(dev)->memory_total_bytes;
    return leave(CUDA_SUCCESS);
}

/* The pre-3.2 entry point with a 32-bit result: clamped to 4 GiB - 1. */
CUresult cuDeviceTotalMem(unsigned int *bytes, CUdevice dev)
{
    uint64_t total = 0;
    CUresult r = total_mem(bytes != NULL, &total, dev);

    if (r == CUDA_SUCCESS)
        *bytes = total > UINT_MAX ? UINT_MAX : (unsigned int)total;
    return r;
}

CUresult cuDeviceTotalMem_v2(size_t *bytes, CUdevice dev)
{
    uint64_t total = 0;
    CUresult r = total_mem(bytes != NULL, &total, dev);

    if (r == CUDA_SUCCESS)
        *bytes = (size_t)total;
    return r;
}

static const struct model *model_of(const struct sim_gpu *gpu)
{
    const struct model *m;

    for (m = models; m->match != NULL; m++) {
        if (strstr(gpu->name, m->match) != NULL)
            return m;
    }
    return m; /* the default row */
}

/* Values of the GPU model named in the node file (A100 when unrecognised); other valid
 * attributes answer 0. */
CUresult cuDeviceGetAttribute(int *pi, CUdevice_attribute attrib, CUdevice dev)
{
    const struct sim_gpu *gpu;
    const struct model *m;
    CUresult r = enter();
    int v = 0;

    if (r != CUDA_SUCCESS)
        return r;
    if (pi == NULL || (int)attrib < 1 || (int)attrib >= CU_DEVICE_ATTRIBUTE_MAX)
        return leave(CUDA_ERROR_INVALID_VALUE);
    if (!valid_dev(dev))
        return leave(CUDA_ERROR_INVALID_DEVICE);
    gpu = gpu_of(dev);
    m = model_of(gpu);
    switch (attrib) {
    case CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK: v = 1024; break;
    case CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_X: v = 1024; break;
    case CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_Y: v = 1024; break;
    case CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_Z: v = 64; break;
    case CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_X: v = INT_MAX; break;
    case CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Y: v = 65535; break;
    case CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Z: v = 65535; break;
    case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK: v = 49152; break;
    case CU_DEVICE_ATTRIBUTE_TOTAL_CONSTANT_MEMORY: v = 65536; break;
    case CU_DEVICE_ATTRIBUTE_WARP_SIZE: v = 32; break;
    case CU_DEVICE_ATTRIBUTE_MAX_PITCH: v = INT_MAX; break;
    case CU_DEVICE_ATTRIBUTE_MAX_REGISTERS_PER_BLOCK: v = 65536; break;
    case CU_DEVICE_ATTRIBUTE_CLOCK_RATE: v = m->clock_khz; break;
    case CU_DEVICE_ATTRIBUTE_TEXTURE_ALIGNMENT: v = 512; break;
    case CU_DEVICE_ATTRIBUTE_GPU_OVERLAP: v = 1; break;
    case CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT: v = m->sms; break;
    case CU_DEVICE_ATTRIBUTE_CAN_MAP_HOST_MEMORY: v = 1; break;
    case CU_DEVICE_ATTRIBUTE_CONCURRENT_KERNELS: v = 1; break;
    case CU_DEVICE_ATTRIBUTE_ECC_ENABLED: v = gpu->ecc ? 1 : 0; break;
    case CU_DEVICE_ATTRIBUTE_PCI_BUS_ID: v = (int)gpu->pci_bus; break;
    case CU_DEVICE_ATTRIBUTE_PCI_DEVICE_ID: v = (int)gpu->pci_device; break;
    case CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE: v = m->mem_clock_khz; break;
    case CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH: v = m->bus_width; break;
    case CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE: v = m->l2_bytes; break;
    case CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_MULTIPROCESSOR: v = m->threads_per_sm; break;
    case CU_DEVICE_ATTRIBUTE_ASYNC_ENGINE_COUNT: v = 2; break;
    case CU_DEVICE_ATTRIBUTE_UNIFIED_ADDRESSING: v = 1; break;
    case CU_DEVICE_ATTRIBUTE_PCI_DOMAIN_ID: v = (int)gpu->pci_domain; break;
    case CU_DEVICE_ATTRIBUTE_TEXTURE_PITCH_ALIGNMENT: v = 32; break;
    case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR: v = m->cc_major; break;
    case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR: v = m->cc_minor; break;
    case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR: v = m->smem_per_sm; break;
    case CU_DEVICE_ATTRIBUTE_MAX_REGISTERS_PER_MULTIPROCESSOR: v = 65536; break;
    case CU_DEVICE_ATTRIBUTE_MANAGED_MEMORY: v = 1; break;
    case CU_DEVICE_ATTRIBUTE_CONCURRENT_MANAGED_ACCESS: v = 1; break;
    /* FP32:FP64 throughput: 2 on the data-centre parts (A100, H100, V100), 32 on a T4. */
    case CU_DEVICE_ATTRIBUTE_SINGLE_TO_DOUBLE_PRECISION_PERF_RATIO:
        v = m->cc_major == 7 && m->cc_minor == 5 ? 32 : 2;
        break;
    case CU_DEVICE_ATTRIBUTE_COOPERATIVE_LAUNCH: v = 1; break;
    case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN: v = m->smem_optin; break;
    case CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED: v = 1; break;
    case CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED: v = 1; break;
    default: v = 0; break;
    }
    *pi = v;
    return leave(CUDA_SUCCESS);
}

/* "00000000:07:00.0", the NVML spelling; truncated to len like cuDeviceGetName. */
CUresult cuDeviceGetPCIBusId(char *pciBusId, int len, CUdevice dev)
{
    const struct sim_gpu *gpu;
    CUresult r = enter();

    if (r != CUDA_SUCCESS)
        return r;
    if (pciBusId == NULL || len <= 0)
        return leave(CUDA_ERROR_INVALID_VALUE);
    if (!valid_dev(dev))
        return leave(CUDA_ERROR_INVALID_DEVICE);
    gpu = gpu_of(dev);
    snprintf(pciBusId, (size_t)len, "%08X:%02X:%02X.0", gpu->pci_domain, gpu->pci_bus,
             gpu->pci_device);
    return leave(CUDA_SUCCESS);
}

CUresult cuDeviceGetByPCIBusId(CUdevice *dev, const char *pciBusId)
{
    unsigned int domain, bus, device, function, i;
    CUresult r = enter();

    if (r != CUDA_SUCCESS)
        return r;
    if (dev == NULL || pciBusId == NULL ||
        !sim_parse_pci_address(pciBusId, &domain, &bus, &device, &function))
        return leave(CUDA_ERROR_INVALID_VALUE);
    for (i = 0; i < g_dev_count; i++) {
        const struct sim_gpu *gpu = gpu_of((int)i);
        if (function == 0 && gpu->pci_domain == domain && gpu->pci_bus == bus &&
            gpu->pci_device == device) {
            *dev = (CUdevice)i;
            return leave(CUDA_SUCCESS);
        }
    }
    return leave(CUDA_ERROR_INVALID_DEVICE);
}

static struct CUmemPoolHandle_st *default_pool(int dev)
{
    struct device *d = &g_devs[dev];

    if (d->default_pool == NULL) {
        d->default_pool = calloc(1, sizeof *d->default_pool);
        if (d->default_pool != NULL) {
            d->default_pool->dev = dev;
            d->default_pool->is_default = true;
            if (!reg_add(&g_pools, d->default_pool)) {
                free(d->default_pool);
                d->default_pool = NULL;
            }
        }
    }
    return d->default_pool;
}

CUresult cuDeviceGetDefaultMemPool(CUmemoryPool *pool_out, CUdevice dev)
{
    CUresult r = enter();

    if (r != CUDA_SUCCESS)
        return r;
    if (pool_out == NULL)
        return leave(CUDA_ERROR_INVALID_VALUE);
    if (!valid_dev(dev))
        return leave(CUDA_ERROR_INVALID_DEVICE);
    *pool_out = default_pool(dev);
    return leave(*pool_out ? CUDA_SUCCESS : CUDA_ERROR_OUT_OF_MEMORY);
}

/* ------------------------------------------------------------------------ */
/* Contexts                                                                  */
/* ------------------------------------------------------------------------ */

static CUresult push_ctx(struct CUctx_st *c)
{
    if (t_depth == CTX_STACK_DEPTH)
        return CUDA_ERROR_OUT_OF_MEMORY;
    t_stack[t_depth++] = c;
    return CUDA_SUCCESS;
}

/* Creates a context and makes it current (pushed on the thread's stack). */
static CUresult ctx_create(CUcontext *pctx, unsigned int flags, CUdevice dev)
{
    struct CUctx_st *c;
    CUresult r;

    if (pctx == NULL)
        return CUDA_ERROR_INVALID_VALUE;
    if (!valid_dev(dev))
        return CUDA_ERROR_INVALID_DEVICE;
    if (!ctx_flags_ok(flags))
        return CUDA_ERROR_INVALID_VALUE;
    if (t_depth == CTX_STACK_DEPTH)
        return CUDA_ERROR_OUT_OF_MEMORY;
    r = ctx_new(dev, flags, false, &c);
    if (r != CUDA_SUCCESS)
        return r;
    push_ctx(c);
    *pctx = c;
    return CUDA_SUCCESS;
}

static bool affinity_ok(const CUexecAffinityParam *params, int count)
{
    int i;

    if (count < 0 || (count > 0 && params == NULL))
        return false;
    for (i = 0; i < count; i++) {
        if (params[i].type != CU_EXEC_AFFINITY_TYPE_SM_COUNT || params[i].param.smCount.val == 0)
            return false;
    }
    return true;
}

/* The pre-3.2 name; same signature (its CUcontext was already a pointer). */
CUresult cuCtxCreate(CUcontext *pctx, unsigned int flags, CUdevice dev)
{
    CUresult r = enter();
    return r ? r : leave(ctx_create(pctx, flags, dev));
}

CUresult cuCtxCreate_v2(CUcontext *pctx, unsigned int flags, CUdevice dev)
{
    CUresult r = enter();
    return r ? r : leave(ctx_create(pctx, flags, dev));
}

/* Execution affinity (an SM count) is accepted and ignored. */
CUresult cuCtxCreate_v3(CUcontext *pctx, CUexecAffinityParam *paramsArray, int numParams,
                        unsigned int flags, CUdevice dev)
{
    CUresult r = enter();

    if (r != CUDA_SUCCESS)
        return r;
    if (!affinity_ok(paramsArray, numParams))
        return leave(CUDA_ERROR_INVALID_VALUE);
    return leave(ctx_create(pctx, flags, dev));
}

/* CUDA 12.5. CIG (shared graphics contexts) is not supported. */
CUresult cuCtxCreate_v4(CUcontext *pctx, CUctxCreateParams *ctxCreateParams, unsigned int flags,
                        CUdevice dev)
{
    CUresult r = enter();

    if (r != CUDA_SUCCESS)
        return r;
    if (ctxCreateParams != NULL) {
        if (!affinity_ok(ctxCreateParams->execAffinityParams,
                         ctxCreateParams->numExecAffinityParams))
            return leave(CUDA_ERROR_INVALID_VALUE);
        if (ctxCreateParams->cigParams != NULL)
            return leave(CUDA_ERROR_NOT_SUPPORTED);
    }
    return leave(ctx_create(pctx, flags, dev));
}

/* Primary contexts belong to cuDevicePrimaryCtxRelease: INVALID_CONTEXT here. */
static CUresult ctx_destroy_api(CUcontext ctx)
{
    if (ctx == NULL || !reg_has(&g_contexts, ctx) || ctx->primary)
        return CUDA_ERROR_INVALID_CONTEXT;
    ctx_destroy(ctx);
    return CUDA_SUCCESS;
}

CUresult cuCtxDestroy(CUcontext ctx)
{
    CUresult r = enter();
    return r ? r : leave(ctx_destroy_api(ctx));
}

CUresult cuCtxDestroy_v2(CUcontext ctx)
{
    CUresult r = enter();
    return r ? r : leave(ctx_destroy_api(ctx));
}

static CUresult push_api(CUcontext ctx)
{
    if (ctx == NULL || !reg_has(&g_contexts, ctx))
        return CUDA_ERROR_INVALID_CONTEXT;
    return push_ctx(ctx);
}

CUresult cuCtxPushCurrent(CUcontext ctx)
{
    CUresult r = enter();
    return r ? r : leave(push_api(ctx));
}

CUresult cuCtxPushCurrent_v2(CUcontext ctx)
{
    CUresult r = enter();
    return r ? r : leave(push_api(ctx));
}

static CUresult pop_api(CUcontext *pctx)
{
    struct CUctx_st *c = top_ctx();

    if (c == NULL)
        return CUDA_ERROR_INVALID_CONTEXT;
    t_depth--;
    if (pctx != NULL)
        *pctx = c;
    return CUDA_SUCCESS;
}

CUresult cuCtxPopCurrent(CUcontext *pctx)
{
    CUresult r = enter();
    return r ? r : leave(pop_api(pctx));
}

CUresult cuCtxPopCurrent_v2(CUcontext *pctx)
{
    CUresult r = enter();
    return r ? r : leave(pop_api(pctx));
}

/* NULL (and SUCCESS) when the thread has no context. */
CUresult cuCtxGetCurrent(CUcontext *pctx)
{
    CUresult r = enter();

    if (r != CUDA_SUCCESS)
        return r;
    if (pctx == NULL)
        return leave(CUDA_ERROR_INVALID_VALUE);
    *pctx = top_ctx();
    return leave(CUDA_SUCCESS);
}

/* Replaces the top of the stack; NULL pops it (a no-op on an empty stack). */
CUresult cuCtxSetCurrent(CUcontext ctx)
{
    CUresult r = enter();

    if (r != CUDA_SUCCESS)
        return r;
    if (ctx == NULL) {
        if (t_depth > 0)
            t_depth--;
        return leave(CUDA_SUCCESS);
    }
    if (!reg_has(&g_contexts, ctx))
        return leave(CUDA_ERROR_INVALID_CONTEXT);
    if (t_depth == 0)
        t_depth = 1;
    t_stack[t_depth - 1] = ctx;
    return leave(CUDA_SUCCESS);
}

CUresult cuCtxGetDevice(CUdevice *device)
{
    struct CUctx_st *c;
    CUresult r = enter();

    if (r != CUDA_SUCCESS)
        return r;
    c = top_ctx();
    if (c == NULL || !c->alive)
        return leave(CUDA_ERROR_INVALID_CONTEXT);
    if (device == NULL)
        return leave(CUDA_ERROR_INVALID_VALUE);
    *device = c->dev;
    return leave(CUDA_SUCCESS);
}

CUresult cuCtxSynchronize(void)
{
    struct CUctx_st *c;
    CUresult r = enter();

    if (r != CUDA_SUCCESS)
        return r;
    r = current_ctx(&c);
    if (r == CUDA_SUCCESS)
        wait_for(&c->tl_last); /* every kernel this process queued in the context */
    return leave(r);
}

CUresult cuDevicePrimaryCtxRetain(CUcontext *pctx, CUdevice dev)
{
    struct device *d;
    CUresult r = enter();

    if (r != CUDA_SUCCESS)
        return r;
    if (pctx == NULL)
        return leave(CUDA_ERROR_INVALID_VALUE);
    if (!valid_dev(dev))
        return leave(CUDA_ERROR_INVALID_DEVICE);
    d = &g_devs[dev];
    if (d->primary_refs == 0) {
        r = ctx_new(dev, d->primary_flags, true, &d->primary);
        if (r != CUDA_SUCCESS)
            return leave(r);
    }
    d->primary_refs++;
    *pctx = d->primary;
    return leave(CUDA_SUCCESS);
}

/* At zero references the primary context is destroyed with everything in it. */
static CUresult primary_release(CUdevice dev)
{
    struct device *d;

    if (!valid_dev(dev))
        return CUDA_ERROR_INVALID_DEVICE;
    d = &g_devs[dev];
    if (d->primary_refs == 0)
        return CUDA_ERROR_INVALID_CONTEXT;
    if (--d->primary_refs == 0) {
        ctx_destroy(d->primary);
        d->primary = NULL;
    }
    return CUDA_SUCCESS;
}

CUresult cuDevicePrimaryCtxRelease(CUdevice dev)
{
    CUresult r = enter();
    return r ? r : leave(primary_release(dev));
}

CUresult cuDevicePrimaryCtxRelease_v2(CUdevice dev)
{
    CUresult r = enter();
    return r ? r : leave(primary_release(dev));
}

/* Destroys the primary context and its allocations; later retains start a new one. */
static CUresult primary_reset(CUdevice dev)
{
    struct device *d;

    if (!valid_dev(dev))
        return CUDA_ERROR_INVALID_DEVICE;
    d = &g_devs[dev];
    if (d->primary_refs > 0) {
        ctx_destroy(d->primary);
        d->primary = NULL;
        d->primary_refs = 0;
    }
    return CUDA_SUCCESS;
}

CUresult cuDevicePrimaryCtxReset(CUdevice dev)
{
    CUresult r = enter();
    return r ? r : leave(primary_reset(dev));
}

CUresult cuDevicePrimaryCtxReset_v2(CUdevice dev)
{
    CUresult r = enter();
    return r ? r : leave(primary_reset(dev));
}

CUresult cuDevicePrimaryCtxGetState(CUdevice dev, unsigned int *flags, int *active)
{
    CUresult r = enter();

    if (r != CUDA_SUCCESS)
        return r;
    if (flags == NULL || active == NULL)
        return leave(CUDA_ERROR_INVALID_VALUE);
    if (!valid_dev(dev))
        return leave(CUDA_ERROR_INVALID_DEVICE);
    *flags = g_devs[dev].primary_flags;
    *active = g_devs[dev].primary_refs > 0;
    return leave(CUDA_SUCCESS);
}

/* ------------------------------------------------------------------------ */
/* Linear memory                                                             */
/* ------------------------------------------------------------------------ */

static CUresult mem_alloc(enum alloc_kind kind, uint64_t bytes, uint64_t *addr)
{
    struct CUctx_st *c;
    CUresult r = current_ctx(&c);

    if (r != CUDA_SUCCESS)
        return r;
    if (addr == NULL || bytes == 0)
        return CUDA_ERROR_INVALID_VALUE;
    return linear_alloc(c, c->dev, kind, bytes, addr);
}

CUresult cuMemAlloc(CUdeviceptr_v1 *dptr, unsigned int bytesize)
{
    uint64_t addr = 0;
    CUresult r = enter();

    if (r != CUDA_SUCCESS)
        return r;
    r = mem_alloc(A_LINEAR_V1, bytesize, dptr ? &addr : NULL);
    if (r == CUDA_SUCCESS)
        *dptr = (CUdeviceptr_v1)addr;
    return leave(r);
}

CUresult cuMemAlloc_v2(CUdeviceptr *dptr, size_t bytesize)
{
    uint64_t addr = 0;
    CUresult r = enter();

    if (r != CUDA_SUCCESS)
        return r;
    r = mem_alloc(A_LINEAR, bytesize, dptr ? &addr : NULL);
    if (r == CUDA_SUCCESS)
        *dptr = addr;
    return leave(r);
}

/* Frees linear memory of any origin (cuMemAlloc*, managed, stream-ordered). 0 is a no-op;
 * an address that is not the start of a live allocation is CUDA_ERROR_INVALID_VALUE. */
static CUresult mem_free(uint64_t addr)
{
    struct CUctx_st *c;
    struct alloc *a;
    CUresult r = current_ctx(&c);

    /* With unified addressing the driver finds the allocation by its address, so a thread
     * with no current context (numba frees this way when it closes) still frees it; a
     * broken or destroyed current context is still an error. */
    if (r != CUDA_SUCCESS && !(r == CUDA_ERROR_INVALID_CONTEXT && top_ctx() == NULL))
        return r;
    if (addr == 0)
        return CUDA_SUCCESS;
    a = find_alloc(addr, is_linear);
    if (a == NULL)
        return CUDA_ERROR_INVALID_VALUE;
    if (a->ctx != NULL && (r = ctx_health(a->ctx)) != CUDA_SUCCESS)
        return r;
    free_object(a);
    return CUDA_SUCCESS;
}

CUresult cuMemFree(CUdeviceptr_v1 dptr)
{
    CUresult r = enter();
    return r ? r : leave(mem_free(dptr));
}

CUresult cuMemFree_v2(CUdeviceptr dptr)
{
    CUresult r = enter();
    return r ? r : leave(mem_free(dptr));
}

/* (free, total) of the current context's device, seen node-wide: other processes' memory
 * counts, and that of processes that died is reclaimed first. */
static CUresult mem_info(uint64_t *free_bytes, uint64_t *total_bytes)
{
    struct CUctx_st *c;
    uint64_t cap, used;
    CUresult r = current_ctx(&c);

    if (r != CUDA_SUCCESS)
        return r;
    sim_state_reap(&g_state);
    cap = capacity_of(c->dev);
    used = sim_state_used(&g_state, g_devs[c->dev].gpu);
    *free_bytes = cap > used ? cap - used : 0;
    *total_bytes = gpu_of(c->dev)->memory_total_bytes;
    return CUDA_SUCCESS;
}

CUresult cuMemGetInfo(unsigned int *free, unsigned int *total)
{
    uint64_t f = 0, t = 0;
    CUresult r = enter();

    if (r != CUDA_SUCCESS)
        return r;
    r = mem_info(&f, &t);
    if (r == CUDA_SUCCESS && (free == NULL || total == NULL))
        r = CUDA_ERROR_INVALID_VALUE;
    if (r == CUDA_SUCCESS) {
        *free = f > UINT_MAX ? UINT_MAX : (unsigned int)f;
        *total = t > UINT_MAX ? UINT_MAX : (unsigned int)t;
    }
    return leave(r);
}

CUresult cuMemGetInfo_v2(size_t *free, size_t *total)
{
    uint64_t f = 0, t = 0;
    CUresult r = enter();

    if (r != CUDA_SUCCESS)
        return r;
    r = mem_info(&f, &t);
    if (r == CUDA_SUCCESS && (free == NULL || total == NULL))
        r = CUDA_ERROR_INVALID_VALUE;
    if (r == CUDA_SUCCESS) {
        *free = (size_t)f;
        *total = (size_t)t;
    }
    return leave(r);
}

/* ------------------------------------------------------------------------ */
/* Copies                                                                    */
/* ------------------------------------------------------------------------ */

/*
 * Linear device memory keeps its bytes, so what a program copies in it copies back out
 * (numba's to_device/copy_to_host, cuda-python's cuMemcpy*). The bytes live in a private
 * anonymous mapping made at the first copy (MAP_NORESERVE: only pages written cost host
 * memory); managed memory already has host pages. No kernel runs, so only copies change them.
 */
static bool copyable(enum alloc_kind k)
{
    return is_linear(k) || k == A_IPC;
}

/* The allocation holding [addr, addr + n) and its bytes there; NULL bytes: out of memory. */
static CUresult device_span(uint64_t addr, uint64_t n, unsigned char **bytes)
{
    struct alloc *a;

    for (a = g_allocs; a != NULL; a = a->next) {
        if (copyable(a->kind) && addr >= a->key && addr - a->key < a->size)
            break;
    }
    /* The whole range must lie in one allocation, as on the driver. */
    if (a == NULL || n > a->size - (addr - a->key))
        return CUDA_ERROR_INVALID_VALUE;
    if (a->kind == A_MANAGED) {
        *bytes = (unsigned char *)a->host + (addr - a->key);
        return CUDA_SUCCESS;
    }
    if (a->contents == NULL) {
        void *p = mmap(NULL, a->size, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED)
            return CUDA_ERROR_OUT_OF_MEMORY;
        a->contents = p;
    }
    *bytes = (unsigned char *)a->contents + (addr - a->key);
    return CUDA_SUCCESS;
}

static CUresult stream_sync(CUstream s);

enum copy_dir { HTOD, DTOH, DTOD };

/*
 * One copy. A synchronous copy is ordered on the default stream (legacy, or the thread's
 * own with per_thread) and returns when done, so it first waits for the kernels queued
 * there; an asynchronous one is ordered on `stream`, whose kernels never write memory in
 * this model, so it copies at once. A context must be current.
 */
static CUresult copy(enum copy_dir dir, void *host, uint64_t dst, uint64_t src, uint64_t n,
                     bool async, CUstream stream, bool per_thread)
{
    struct CUctx_st *c;
    unsigned char *from = NULL, *to = NULL;
    CUresult r = current_ctx(&c);

    if (r != CUDA_SUCCESS)
        return r;
    r = async ? check_stream(stream) : stream_sync(per_thread ? CU_STREAM_PER_THREAD : NULL);
    if (r != CUDA_SUCCESS)
        return r;
    if (n == 0)
        return CUDA_SUCCESS;
    if (dir != DTOD && host == NULL)
        return CUDA_ERROR_INVALID_VALUE;
    if (dir != DTOH && (r = device_span(dst, n, &to)) != CUDA_SUCCESS)
        return r;
    if (dir != HTOD && (r = device_span(src, n, &from)) != CUDA_SUCCESS)
        return r;
    memmove(dir == DTOH ? host : to, dir == HTOD ? host : from, n);
    return CUDA_SUCCESS;
}

#define COPY_ENTRY(decl, call)                \
    decl                                      \
    {                                         \
        CUresult r = enter();                 \
        return r ? r : leave(call);           \
    }

COPY_ENTRY(CUresult cuMemcpyHtoD(CUdeviceptr_v1 dstDevice, const void *srcHost,
                                 unsigned int ByteCount),
           copy(HTOD, (void *)srcHost, dstDevice, 0, ByteCount, false, NULL, false))
COPY_ENTRY(CUresult cuMemcpyHtoD_v2(CUdeviceptr dstDevice, const void *srcHost, size_t ByteCount),
           copy(HTOD, (void *)srcHost, dstDevice, 0, ByteCount, false, NULL, false))
COPY_ENTRY(CUresult cuMemcpyHtoD_v2_ptds(CUdeviceptr dstDevice, const void *srcHost,
                                         size_t ByteCount),
           copy(HTOD, (void *)srcHost, dstDevice, 0, ByteCount, false, NULL, true))
COPY_ENTRY(CUresult cuMemcpyDtoH(void *dstHost, CUdeviceptr_v1 srcDevice, unsigned int ByteCount),
           copy(DTOH, dstHost, 0, srcDevice, ByteCount, false, NULL, false))
COPY_ENTRY(CUresult cuMemcpyDtoH_v2(void *dstHost, CUdeviceptr srcDevice, size_t ByteCount),
           copy(DTOH, dstHost, 0, srcDevice, ByteCount, false, NULL, false))
COPY_ENTRY(CUresult cuMemcpyDtoH_v2_ptds(void *dstHost, CUdeviceptr srcDevice, size_t ByteCount),
           copy(DTOH, dstHost, 0, srcDevice, ByteCount, false, NULL, true))
COPY_ENTRY(CUresult cuMemcpyDtoD(CUdeviceptr_v1 dstDevice, CUdeviceptr_v1 srcDevice,
                                 unsigned int ByteCount),
           copy(DTOD, NULL, dstDevice, srcDevice, ByteCount, false, NULL, false))
COPY_ENTRY(CUresult cuMemcpyDtoD_v2(CUdeviceptr dstDevice, CUdeviceptr srcDevice,
                                    size_t ByteCount),
           copy(DTOD, NULL, dstDevice, srcDevice, ByteCount, false, NULL, false))
COPY_ENTRY(CUresult cuMemcpyDtoD_v2_ptds(CUdeviceptr dstDevice, CUdeviceptr srcDevice,
                                         size_t ByteCount),
           copy(DTOD, NULL, dstDevice, srcDevice, ByteCount, false, NULL, true))
COPY_ENTRY(CUresult cuMemcpyHtoDAsync(CUdeviceptr_v1 dstDevice, const void *srcHost,
                                      unsigned int ByteCount, CUstream hStream),
           copy(HTOD, (void *)srcHost, dstDevice, 0, ByteCount, true, hStream, false))
COPY_ENTRY(CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dstDevice, const void *srcHost,
                                         size_t ByteCount, CUstream hStream),
           copy(HTOD, (void *)srcHost, dstDevice, 0, ByteCount, true, hStream, false))
COPY_ENTRY(CUresult cuMemcpyHtoDAsync_v2_ptsz(CUdeviceptr dstDevice, const void *srcHost,
                                              size_t ByteCount, CUstream hStream),
           copy(HTOD, (void *)srcHost, dstDevice, 0, ByteCount, true, hStream, true))
COPY_ENTRY(CUresult cuMemcpyDtoHAsync(void *dstHost, CUdeviceptr_v1 srcDevice,
                                      unsigned int ByteCount, CUstream hStream),
           copy(DTOH, dstHost, 0, srcDevice, ByteCount, true, hStream, false))
COPY_ENTRY(CUresult cuMemcpyDtoHAsync_v2(void *dstHost, CUdeviceptr srcDevice, size_t ByteCount,
                                         CUstream hStream),
           copy(DTOH, dstHost, 0, srcDevice, ByteCount, true, hStream, false))
COPY_ENTRY(CUresult cuMemcpyDtoHAsync_v2_ptsz(void *dstHost, CUdeviceptr srcDevice,
                                              size_t ByteCount, CUstream hStream),
           copy(DTOH, dstHost, 0, srcDevice, ByteCount, true, hStream, true))

/* ------------------------------------------------------------------------ */
/* Inter-process memory handles                                              */
/* ------------------------------------------------------------------------ */

/*
 * What a handle carries (the real one is as opaque): the exporting process, the node GPU
 * and the exporter's address and size. Opening maps the same physical memory, so nothing is
 * charged; the bytes are not shared with the exporter (copies into an opened handle stay in
 * the importer), which no test here relies on.
 */
struct ipc_wire {
    char magic[8];
    int32_t pid;
    uint32_t gpu;
    uint64_t key;
    uint64_t size;
};
_Static_assert(sizeof(struct ipc_wire) <= sizeof(CUipcMemHandle), "ipc_wire fits a handle");
static const char IPC_MAGIC[8] = "GPUSIMIP";

/* Whether the process the driver knows as `pid` (sim_self_pid's identity: the host PID when
 * GPU_SIM_HOST_PROC names the host's /proc) has exited. */
static bool exporter_gone(int pid)
{
    const char *proc = getenv("GPU_SIM_HOST_PROC");
    char path[4096];

    if (proc == NULL || proc[0] != '/')
        return kill(pid, 0) != 0 && errno == ESRCH;
    if (snprintf(path, sizeof path, "%s/%d", proc, pid) >= (int)sizeof path)
        return false;
    return access(path, F_OK) != 0 && errno == ENOENT;
}

static CUresult ipc_get(CUipcMemHandle *handle, uint64_t dptr)
{
    struct CUctx_st *c;
    struct ipc_wire w;
    struct alloc *a;
    CUresult r = current_ctx(&c);

    if (r != CUDA_SUCCESS)
        return r;
    if (handle == NULL)
        return CUDA_ERROR_INVALID_VALUE;
    /* Only the base of cuMemAlloc / cuMemAllocPitch memory can be exported this way
     * (stream-ordered pools export through cuMemPoolExportPointer instead). */
    a = find_alloc(dptr, is_linear);
    if (a == NULL || (a->kind != A_LINEAR && a->kind != A_LINEAR_V1))
        return CUDA_ERROR_INVALID_VALUE;
    memset(handle, 0, sizeof *handle);
    memcpy(w.magic, IPC_MAGIC, sizeof w.magic);
    w.pid = (int32_t)sim_self_pid();
    w.gpu = g_devs[a->dev].gpu;
    w.key = a->key;
    w.size = a->size;
    memcpy(handle->reserved, &w, sizeof w);
    return CUDA_SUCCESS;
}

CUresult cuIpcGetMemHandle(CUipcMemHandle *pHandle, CUdeviceptr dptr)
{
    CUresult r = enter();
    return r ? r : leave(ipc_get(pHandle, dptr));
}

static CUresult ipc_open(CUdeviceptr *pdptr, const CUipcMemHandle *handle, unsigned int flags)
{
    struct CUctx_st *c;
    struct ipc_wire w;
    struct alloc *a;
    CUresult r = current_ctx(&c);

    if (r != CUDA_SUCCESS)
        return r;
    if (pdptr == NULL || (flags & ~(unsigned int)CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS) != 0)
        return CUDA_ERROR_INVALID_VALUE;
    memcpy(&w, handle->reserved, sizeof w);
    if (memcmp(w.magic, IPC_MAGIC, sizeof w.magic) != 0 || w.pid <= 0 || w.size == 0)
        return CUDA_ERROR_INVALID_HANDLE;
    /* A process cannot open its own handles. */
    if (w.pid == (int32_t)sim_self_pid())
        return CUDA_ERROR_INVALID_CONTEXT;
    /* The exporter is gone, and its memory with it. */
    if (exporter_gone(w.pid))
        return CUDA_ERROR_INVALID_HANDLE;
    /* Opened again in this context: the same address, one more reference. */
    for (a = g_allocs; a != NULL; a = a->next) {
        if (a->kind == A_IPC && a->ctx == c && a->ipc_pid == w.pid && a->ipc_key == w.key) {
            a->ipc_refs++;
            *pdptr = a->key;
            return CUDA_SUCCESS;
        }
    }
    a = calloc(1, sizeof *a);
    if (a == NULL)
        return CUDA_ERROR_OUT_OF_MEMORY;
    a->kind = A_IPC;
    a->size = w.size;
    a->dev = c->dev;
    a->ctx = c;
    a->ipc_refs = 1;
    a->ipc_pid = w.pid;
    a->ipc_key = w.key;
    a->key = next_va(w.size, PAGE);
    a->next = g_allocs;
    g_allocs = a;
    *pdptr = a->key;
    return CUDA_SUCCESS;
}

CUresult cuIpcOpenMemHandle(CUdeviceptr *pdptr, CUipcMemHandle handle, unsigned int Flags)
{
    CUresult r = enter();
    return r ? r : leave(ipc_open(pdptr, &handle, Flags));
}

CUresult cuIpcOpenMemHandle_v2(CUdeviceptr *pdptr, CUipcMemHandle handle, unsigned int Flags)
{
    CUresult r = enter();
    return r ? r : leave(ipc_open(pdptr, &handle, Flags));
}

static CUresult ipc_close(uint64_t dptr)
{
    struct CUctx_st *c;
    struct alloc *a;
    CUresult r = current_ctx(&c);

    if (r != CUDA_SUCCESS)
        return r;
    for (a = g_allocs; a != NULL; a = a->next) {
        if (a->kind == A_IPC && a->key == dptr)
            break;
    }
    if (a == NULL)
        return CUDA_ERROR_INVALID_VALUE;
    if (--a->ipc_refs == 0)
        free_object(a);
    return CUDA_SUCCESS;
}

CUresult cuIpcCloseMemHandle(CUdeviceptr dptr)
{
    CUresult r = enter();
    return r ? r : leave(ipc_close(dptr));
}

/* Rows padded to 512 bytes; element size 4, 8 or 16. */
static CUresult mem_alloc_pitch(enum alloc_kind kind, uint64_t *addr, uint64_t *pitch,
                                uint64_t width, uint64_t height, unsigned int elem)
{
    struct CUctx_st *c;
    uint64_t row;
    CUresult r = current_ctx(&c);

    if (r != CUDA_SUCCESS)
        return r;
    if (addr == NULL || pitch == NULL || width == 0 || height == 0 ||
        (elem != 4 && elem != 8 && elem != 16))
        return CUDA_ERROR_INVALID_VALUE;
    if (width > MAX_REQUEST || height > MAX_REQUEST)
        return CUDA_ERROR_OUT_OF_MEMORY;
    row = round_up(width, PITCH_ALIGN);
    if (height > MAX_REQUEST / row)
        return CUDA_ERROR_OUT_OF_MEMORY;
    r = linear_alloc(c, c->dev, kind, row * height, addr);
    if (r == CUDA_SUCCESS)
        *pitch = row;
    return r;
}

CUresult cuMemAllocPitch(CUdeviceptr_v1 *dptr, unsigned int *pPitch, unsigned int WidthInBytes,
                         unsigned int Height, unsigned int ElementSizeBytes)
{
    uint64_t addr = 0, pitch = 0;
    CUresult r = enter();

    if (r != CUDA_SUCCESS)
        return r;
    r = mem_alloc_pitch(A_LINEAR_V1, dptr ? &addr : NULL, pPitch ? &pitch : NULL, WidthInBytes,
                        Height, ElementSizeBytes);
    if (r == CUDA_SUCCESS) {
        *dptr = (CUdeviceptr_v1)addr;
        *pPitch = (unsigned int)pitch;
    }
    return leave(r);
}

CUresult cuMemAllocPitch_v2(CUdeviceptr *dptr, size_t *pPitch, size_t WidthInBytes, size_t Height,
                            unsigned int ElementSizeBytes)
{
    uint64_t addr = 0, pitch = 0;
    CUresult r = enter();

    if (r != CUDA_SUCCESS)
        return r;
    r = mem_alloc_pitch(A_LINEAR, dptr ? &addr : NULL, pPitch ? &pitch : NULL, WidthInBytes,
                        Height, ElementSizeBytes);
    if (r == CUDA_SUCCESS) {
        *dptr = addr;
        *pPitch = (size_t)pitch;
    }
    return leave(r);
}

/* Host-backed (the host can touch managed memory) and not charged to the device: like the
 * real driver, managed allocations may exceed the device's memory (pages migrate on demand).
 * Counted node-wide in the state file's managed_bytes. */
CUresult cuMemAllocManaged(CUdeviceptr *dptr, size_t bytesize, unsigned int flags)
{
    uint64_t addr = 0;
    CUresult r = enter();

    if (r != CUDA_SUCCESS)
        return r;
    if (flags != CU_MEM_ATTACH_GLOBAL && flags != CU_MEM_ATTACH_HOST) {
        struct CUctx_st *c;
        r = current_ctx(&c);
        return leave(r ? r : CUDA_ERROR_INVALID_VALUE);
    }
    r = mem_alloc(A_MANAGED, bytesize, dptr ? &addr : NULL);
    if (r == CUDA_SUCCESS)
        *dptr = addr;
    return leave(r);
}

/* ------------------------------------------------------------------------ */
/* Stream-ordered allocator                                                  */
/* ------------------------------------------------------------------------ */

/*
 * Pools release freed memory at once (release threshold 0, the default), so a
 * stream-ordered allocation costs exactly what cuMemAlloc would, on the pool's
 * device, from allocation to free. A pool's maxSize caps what it hands out.
 */
static CUresult graph_alloc_node(struct CUgraph_st *g, int dev, uint64_t bytes, uint64_t *dptr);
static CUresult graph_free_node(struct CUgraph_st *g, uint64_t dptr);

static struct CUgraph_st *capturing(CUstream s)
{
    return s != NULL && s != CU_STREAM_LEGACY && s != CU_STREAM_PER_THREAD ? s->capture : NULL;
}

static CUresult alloc_async(CUdeviceptr *dptr, size_t bytesize, struct CUmemPoolHandle_st *pool,
                            bool explicit_pool, CUstream stream)
{
    struct CUctx_st *c;
    struct alloc *a;
    uint64_t addr = 0;
    CUresult r = current_ctx(&c);

    if (r != CUDA_SUCCESS)
        return r;
    if (dptr == NULL || bytesize == 0)
        return CUDA_ERROR_INVALID_VALUE;
    if (explicit_pool && !reg_has(&g_pools, pool))
        return CUDA_ERROR_INVALID_VALUE;
    r = check_stream(stream);
    if (r != CUDA_SUCCESS)
        return r;
    if (capturing(stream) != NULL) {
        /* Captured: becomes a memory-allocation node of the graph (no memory yet). */
        uint64_t va = 0;
        r = graph_alloc_node(capturing(stream), explicit_pool ? pool->dev : c->dev, bytesize, &va);
        if (r == CUDA_SUCCESS)
            *dptr = va;
        return r;
    }
    if (!explicit_pool) {
        pool = default_pool(c->dev);
        if (pool == NULL)
            return CUDA_ERROR_OUT_OF_MEMORY;
    }
    if (pool->max_size != 0 && round_up(bytesize, ALLOC_ALIGN) > pool->max_size - pool->used)
        return CUDA_ERROR_OUT_OF_MEMORY;
    r = linear_alloc(c, pool->dev, A_ASYNC, bytesize, &addr);
    if (r != CUDA_SUCCESS)
        return r;
    a = find_alloc(addr, is_linear);
    a->pool = pool;
    pool->used += a->size;
    *dptr = addr;
    return CUDA_SUCCESS;
}

CUresult cuMemAllocAsync(CUdeviceptr *dptr, size_t bytesize, CUstream hStream)
{
    CUresult r = enter();
    return r ? r : leave(alloc_async(dptr, bytesize, NULL, false, hStream));
}

CUresult cuMemAllocAsync_ptsz(CUdeviceptr *dptr, size_t bytesize, CUstream hStream)
{
    CUresult r = enter();
    return r ? r : leave(alloc_async(dptr, bytesize, NULL, false, hStream));
}

CUresult cuMemAllocFromPoolAsync(CUdeviceptr *dptr, size_t bytesize, CUmemoryPool pool,
                                 CUstream hStream)
{
    CUresult r = enter();
    return r ? r : leave(alloc_async(dptr, bytesize, pool, true, hStream));
}

CUresult cuMemAllocFromPoolAsync_ptsz(CUdeviceptr *dptr, size_t bytesize, CUmemoryPool pool,
                                      CUstream hStream)
{
    CUresult r = enter();
    return r ? r : leave(alloc_async(dptr, bytesize, pool, true, hStream));
}

static CUresult free_async(CUdeviceptr dptr, CUstream stream)
{
    CUresult r = check_stream(stream);

    if (r == CUDA_SUCCESS && capturing(stream) != NULL)
        return graph_free_node(capturing(stream), dptr); /* a memory-free node */
    return r ? r : mem_free(dptr);
}

CUresult cuMemFreeAsync(CUdeviceptr dptr, CUstream hStream)
{
    CUresult r = enter();
    return r ? r : leave(free_async(dptr, hStream));
}

CUresult cuMemFreeAsync_ptsz(CUdeviceptr dptr, CUstream hStream)
{
    CUresult r = enter();
    return r ? r : leave(free_async(dptr, hStream));
}

/* Device-located pinned pools only. */
CUresult cuMemPoolCreate(CUmemoryPool *pool, const CUmemPoolProps *poolProps)
{
    struct CUmemPoolHandle_st *p;
    CUresult r = enter();

    if (r != CUDA_SUCCESS)
        return r;
    if (pool == NULL || poolProps == NULL ||
        poolProps->allocType != CU_MEM_ALLOCATION_TYPE_PINNED ||
        poolProps->location.type != CU_MEM_LOCATION_TYPE_DEVICE)
        return leave(CUDA_ERROR_INVALID_VALUE);
    if (!valid_dev(poolProps->location.id))
        return leave(CUDA_ERROR_INVALID_DEVICE);
    p = calloc(1, sizeof *p);
    if (p == NULL || !reg_add(&g_pools, p)) {
        free(p);
        return leave(CUDA_ERROR_OUT_OF_MEMORY);
    }
    p->dev = poolProps->location.id;
    p->max_size = poolProps->maxSize;
    *pool = p;
    return leave(CUDA_SUCCESS);
}

/* Allocations still out stay valid (the driver frees the pool when they are gone). */
CUresult cuMemPoolDestroy(CUmemoryPool pool)
{
    struct alloc *a;
    CUresult r = enter();

    if (r != CUDA_SUCCESS)
        return r;
    if (!reg_has(&g_pools, pool) || pool->is_default)
        return leave(CUDA_ERROR_INVALID_VALUE);
    for (a = g_allocs; a != NULL; a = a->next) {
        if (a->pool == pool)
            a->pool = NULL;
    }
    reg_remove(&g_pools, pool);
    free(pool);
    return leave(CUDA_SUCCESS);
}

/* ------------------------------------------------------------------------ */
/* Virtual memory management                                                 */
/* ------------------------------------------------------------------------ */

/* Checks a CUmemAllocationProp; *dev is the device for device memory, -1 for host memory. */
static CUresult check_prop(const CUmemAllocationProp *prop, int *dev)
{
    if (prop->type != CU_MEM_ALLOCATION_TYPE_PINNED)
        return CUDA_ERROR_INVALID_VALUE;
    switch (prop->location.type) {
    case CU_MEM_LOCATION_TYPE_DEVICE:
        if (!valid_dev(prop->location.id))
            return CUDA_ERROR_INVALID_DEVICE;
        *dev = prop->location.id;
        return CUDA_SUCCESS;
    case CU_MEM_LOCATION_TYPE_HOST:
    case CU_MEM_LOCATION_TYPE_HOST_NUMA:
    case CU_MEM_LOCATION_TYPE_HOST_NUMA_CURRENT:
        *dev = -1;
        return CUDA_SUCCESS;
    default:
        return CUDA_ERROR_INVALID_VALUE;
    }
}

CUresult cuMemGetAllocationGranularity(size_t *granularity, const CUmemAllocationProp *prop,
                                       CUmemAllocationGranularity_flags option)
{
    int dev;
    CUresult r = enter();

    if (r != CUDA_SUCCESS)
        return r;
    if (granularity == NULL || prop == NULL ||
        (option != CU_MEM_ALLOC_GRANULARITY_MINIMUM &&
         option != CU_MEM_ALLOC_GRANULARITY_RECOMMENDED))
        return leave(CUDA_ERROR_INVALID_VALUE);
    r = check_prop(prop, &dev);
    if (r == CUDA_SUCCESS)
        *granularity = PAGE;
    return leave(r);
}

/* Size must be a multiple of the granularity (2 MiB). Host locations take no device memory. */
CUresult cuMemCreate(CUmemGenericAllocationHandle *handle, size_t size,
                     const CUmemAllocationProp *prop, unsigned long long flags)
{
    struct alloc *a;
    int dev = -1;
    CUresult r = enter();

    if (r != CUDA_SUCCESS)
        return r;
    if (handle == NULL || prop == NULL || flags != 0 || size == 0 || size % PAGE != 0)
        return leave(CUDA_ERROR_INVALID_VALUE);
    r = check_prop(prop, &dev);
    if (r != CUDA_SUCCESS)
        return leave(r);
    if (dev >= 0) {
        if (gpu_failed(dev))
            return leave(CUDA_ERROR_UNKNOWN);
        if (size > MAX_REQUEST)
            return leave(CUDA_ERROR_OUT_OF_MEMORY);
        r = new_device_object(NULL, dev, A_VMM, size, &a);
        if (r != CUDA_SUCCESS)
            return leave(r);
    } else {
        a = calloc(1, sizeof *a);
        if (a == NULL)
            return leave(CUDA_ERROR_OUT_OF_MEMORY);
        a->kind = A_VMM;
        a->size = size;
        a->dev = -1;
        a->next = g_allocs;
        g_allocs = a;
    }
    a->key = g_next_handle;
    a->handle_refs = 1;
    g_next_handle += 0x10;
    *handle = a->key;
    return leave(CUDA_SUCCESS);
}

/* The memory goes back once every reference to the handle (its creation and each
 * cuMemRetainAllocationHandle) is released and no mapping uses it any more. */
CUresult cuMemRelease(CUmemGenericAllocationHandle handle)
{
    struct alloc *a;
    CUresult r = enter();

    if (r != CUDA_SUCCESS)
        return r;
    a = find_alloc(handle, is_vmm);
    if (a == NULL || a->released || a->handle_refs == 0)
        return leave(CUDA_ERROR_INVALID_VALUE);
    if (--a->handle_refs > 0)
        return leave(CUDA_SUCCESS);
    if (a->map_count > 0)
        a->released = true;
    else
        free_object(a);
    return leave(CUDA_SUCCESS);
}

/* The handle of the allocation mapped at addr (the same value cuMemCreate returned), with one
 * more reference to release; an allocation whose handles were all released while it stayed
 * mapped gets one again. */
CUresult cuMemRetainAllocationHandle(CUmemGenericAllocationHandle *handle, void *addr)
{
    struct mapping *m;
    uint64_t at = (uint64_t)(uintptr_t)addr;
    CUresult r = enter();

    if (r != CUDA_SUCCESS)
        return r;
    if (handle == NULL)
        return leave(CUDA_ERROR_INVALID_VALUE);
    for (m = g_mappings; m != NULL; m = m->next) {
        if (at >= m->va && at - m->va < m->size)
            break;
    }
    if (m == NULL)
        return leave(CUDA_ERROR_INVALID_VALUE);
    m->handle->handle_refs++;
    m->handle->released = false;
    *handle = m->handle->key;
    return leave(CUDA_SUCCESS);
}

CUresult cuMemAddressReserve(CUdeviceptr *ptr, size_t size, size_t alignment, CUdeviceptr addr,
                             unsigned long long flags)
{
    struct reservation *res;
    CUresult r = enter();

    (void)addr; /* a hint only */
    if (r != CUDA_SUCCESS)
        return r;
    if (ptr == NULL || size == 0 || size % PAGE != 0 || flags != 0 ||
        (alignment & (alignment - 1)) != 0 || size > MAX_REQUEST || alignment > MAX_REQUEST)
        return leave(CUDA_ERROR_INVALID_VALUE);
    res = calloc(1, sizeof *res);
    if (res == NULL)
        return leave(CUDA_ERROR_OUT_OF_MEMORY);
    res->va = next_va(size, alignment > PAGE ? alignment : PAGE);
    res->size = size;
    res->next = g_reservations;
    g_reservations = res;
    *ptr = res->va;
    return leave(CUDA_SUCCESS);
}

/* The exact range of one reservation. */
CUresult cuMemAddressFree(CUdeviceptr ptr, size_t size)
{
    struct reservation **link;
    CUresult r = enter();

    if (r != CUDA_SUCCESS)
        return r;
    for (link = &g_reservations; *link != NULL; link = &(*link)->next) {
        struct reservation *res = *link;
        if (res->va == ptr && res->size == size) {
            *link = res->next;
            free(res);
            return leave(CUDA_SUCCESS);
        }
    }
    return leave(CUDA_ERROR_INVALID_VALUE);
}

/* Maps a whole number of pages of a handle (offset 0, as the driver requires) into reserved,
 * unmapped address space. */
CUresult cuMemMap(CUdeviceptr ptr, size_t size, size_t offset, CUmemGenericAllocationHandle handle,
                  unsigned long long flags)
{
    struct reservation *res;
    struct mapping *m;
    struct alloc *a;
    CUresult r = enter();

    if (r != CUDA_SUCCESS)
        return r;
    if (flags != 0 || offset != 0 || size == 0 || size % PAGE != 0)
        return leave(CUDA_ERROR_INVALID_VALUE);
    a = find_alloc(handle, is_vmm);
    if (a == NULL || a->released)
        return leave(CUDA_ERROR_INVALID_HANDLE);
    if (size > a->size)
        return leave(CUDA_ERROR_INVALID_VALUE);
    for (res = g_reservations; res != NULL; res = res->next) {
        if (ptr >= res->va && ptr - res->va <= res->size && size <= res->size - (ptr - res->va))
            break;
    }
    if (res == NULL)
        return leave(CUDA_ERROR_INVALID_VALUE);
    for (m = g_mappings; m != NULL; m = m->next) {
        if (ptr < m->va + m->size && m->va < ptr + size)
            return leave(CUDA_ERROR_INVALID_VALUE); /* already mapped */
    }
    m = calloc(1, sizeof *m);
    if (m == NULL)
        return leave(CUDA_ERROR_OUT_OF_MEMORY);
    m->va = ptr;
    m->size = size;
    m->handle = a;
    m->next = g_mappings;
    g_mappings = m;
    a->map_count++;
    return leave(CUDA_SUCCESS);
}

/*
 * Grants access to mapped memory. The range must be covered by mappings with no hole (the
 * driver refuses unmapped pages); each descriptor names a visible device and READ or
 * READWRITE (PROT_NONE only revokes, which is accepted too). Access is not enforced: no
 * kernel touches memory here.
 */
CUresult cuMemSetAccess(CUdeviceptr ptr, size_t size, const CUmemAccessDesc *desc, size_t count)
{
    uint64_t at = ptr;
    size_t i;
    CUresult r = enter();

    if (r != CUDA_SUCCESS)
        return r;
    if (size == 0 || size % PAGE != 0 || desc == NULL || count == 0)
        return leave(CUDA_ERROR_INVALID_VALUE);
    for (i = 0; i < count; i++) {
        if (desc[i].location.type != CU_MEM_LOCATION_TYPE_DEVICE ||
            !valid_dev(desc[i].location.id))
            return leave(CUDA_ERROR_INVALID_DEVICE);
        if (desc[i].flags != CU_MEM_ACCESS_FLAGS_PROT_NONE &&
            desc[i].flags != CU_MEM_ACCESS_FLAGS_PROT_READ &&
            desc[i].flags != CU_MEM_ACCESS_FLAGS_PROT_READWRITE)
            return leave(CUDA_ERROR_INVALID_VALUE);
    }
    while (at < ptr + size) {
        struct mapping *m;
        for (m = g_mappings; m != NULL; m = m->next) {
            if (at >= m->va && at < m->va + m->size)
                break;
        }
        if (m == NULL)
            return leave(CUDA_ERROR_INVALID_VALUE);
        at = m->va + m->size;
    }
    return leave(CUDA_SUCCESS);
}

/* Unmaps every mapping inside [ptr, ptr + size); there must be at least one. */
CUresult cuMemUnmap(CUdeviceptr ptr, size_t size)
{
    struct mapping **link;
    bool any = false;
    CUresult r = enter();

    if (r != CUDA_SUCCESS)
        return r;
    if (size == 0 || size % PAGE != 0)
        return leave(CUDA_ERROR_INVALID_VALUE);
    for (link = &g_mappings; *link != NULL;) {
        struct mapping *m = *link;
        if (m->va >= ptr && m->va + m->size <= ptr + size) {
            struct alloc *a = m->handle;
            *link = m->next;
            free(m);
            any = true;
            if (--a->map_count == 0 && a->released)
                free_object(a);
        } else {
            link = &m->next;
        }
    }
    return leave(any ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE);
}

/* ------------------------------------------------------------------------ */
/* Graph memory                                                              */
/* ------------------------------------------------------------------------ */

/*
 * Graphs model what memory accounting sees, nothing else: memory-allocation
 * and memory-free nodes (no other node kinds), stream capture of
 * cuMemAllocAsync/cuMemFreeAsync, instantiation and launch. As in the driver:
 *   - an allocation node gets its device address when it is added (or
 *     captured); no physical memory is taken then;
 *   - a launch takes physical memory for the graph's allocations from the
 *     device's graph memory pool, growing the pool (charged to the device,
 *     CUDA_ERROR_OUT_OF_MEMORY when there is no room) only beyond what it
 *     already holds; allocations freed inside the graph return to the pool
 *     at the end of the launch, the others stay live until cuMemFree or
 *     cuMemFreeAsync (launching again while one is live is
 *     CUDA_ERROR_INVALID_VALUE);
 *   - the pool keeps its memory until cuDeviceGraphMemTrim gives back what
 *     no live allocation uses.
 * A free node may also free another graph's allocation (as CUDA allows): it
 * frees that allocation, live since its own graph's launch, when the freeing
 * graph is launched (CUDA_ERROR_INVALID_VALUE if it is not live then), and
 * never if that graph is not launched.
 * Limits: a launch completes at once; dependencies are only checked to belong
 * to the graph.
 */

struct graph_alloc {
    struct graph_alloc *next;
    uint64_t dptr;
    uint64_t size;            /* rounded up to whole 2 MiB pages */
    int dev;
    bool freed_in_graph;      /* a free node of the same graph frees it */
};

struct CUgraph_st {
    struct graph_alloc *allocs;
    struct graph_alloc *frees;  /* free nodes of other graphs' allocations (dptr only) */
    uint64_t kernel_ns;         /* time of the kernels captured into it (kernel time model) */
};

struct CUgraphNode_st {
    struct CUgraph_st *graph;
};

struct CUgraphExec_st {
    struct graph_alloc *allocs; /* a copy of the graph's at instantiation */
    struct graph_alloc *frees;  /* likewise */
    uint64_t kernel_ns;         /* the graph's kernel time at instantiation */
};

static void graph_allocs_free(struct graph_alloc *a)
{
    while (a != NULL) {
        struct graph_alloc *next = a->next;
        free(a);
        a = next;
    }
}

static CUresult graph_alloc_node(struct CUgraph_st *g, int dev, uint64_t bytes, uint64_t *dptr)
{
    struct graph_alloc *a;

    if (bytes == 0)
        return CUDA_ERROR_INVALID_VALUE;
    if (bytes > MAX_REQUEST)
        return CUDA_ERROR_OUT_OF_MEMORY;
    a = calloc(1, sizeof *a);
    if (a == NULL)
        return CUDA_ERROR_OUT_OF_MEMORY;
    a->size = round_up(bytes, PAGE);
    a->dptr = next_va(a->size, PAGE);
    a->dev = dev;
    a->next = g->allocs;
    g->allocs = a;
    *dptr = a->dptr;
    return CUDA_SUCCESS;
}

/* A free node in g of another graph's allocation (one a graph that exists made, or live since a
 * launch): it frees it when g is launched. */
static CUresult graph_foreign_free(struct CUgraph_st *g, uint64_t dptr)
{
    struct graph_alloc *f;
    bool known = find_alloc(dptr, is_graph_kind) != NULL;

    for (f = g->allocs; f != NULL; f = f->next) {
        if (f->dptr == dptr)
            return CUDA_ERROR_INVALID_VALUE; /* its own, freed in it already */
    }
    for (f = g->frees; f != NULL; f = f->next) {
        if (f->dptr == dptr)
            return CUDA_ERROR_INVALID_VALUE; /* freed in it already */
    }
    for (size_t i = 0; !known && i < g_graphs.count; i++) {
        const struct CUgraph_st *other = g_graphs.items[i];
        for (const struct graph_alloc *o = other->allocs; o != NULL && !known; o = o->next)
            known = o->dptr == dptr;
    }
    if (!known)
        return CUDA_ERROR_INVALID_VALUE;
    f = calloc(1, sizeof *f);
    if (f == NULL)
        return CUDA_ERROR_OUT_OF_MEMORY;
    f->dptr = dptr;
    f->next = g->frees;
    g->frees = f;
    return CUDA_SUCCESS;
}

static CUresult graph_free_node(struct CUgraph_st *g, uint64_t dptr)
{
    struct graph_alloc *a;

    for (a = g->allocs; a != NULL; a = a->next) {
        if (a->dptr == dptr && !a->freed_in_graph) {
            a->freed_in_graph = true;
            return CUDA_SUCCESS;
        }
    }
    return graph_foreign_free(g, dptr);
}

static CUresult new_node(CUgraphNode *out, struct CUgraph_st *g, const CUgraphNode *deps,
                         size_t ndeps)
{
    struct CUgraphNode_st *n;
    size_t i;

    if (out == NULL || !reg_has(&g_graphs, g) || (ndeps > 0 && deps == NULL))
        return CUDA_ERROR_INVALID_VALUE;
    for (i = 0; i < ndeps; i++) {
        if (!reg_has(&g_graph_nodes, deps[i]) || deps[i]->graph != g)
            return CUDA_ERROR_INVALID_VALUE;
    }
    n = calloc(1, sizeof *n);
    if (n == NULL || !reg_add(&g_graph_nodes, n)) {
        free(n);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    n->graph = g;
    *out = n;
    return CUDA_SUCCESS;
}

CUresult cuGraphCreate(CUgraph *phGraph, unsigned int flags)
{
    struct CUgraph_st *g;
    CUresult r = enter();

    if (r != CUDA_SUCCESS)
        return r;
    if (phGraph == NULL || flags != 0)
        return leave(CUDA_ERROR_INVALID_VALUE);
    g = calloc(1, sizeof *g);
    if (g == NULL || !reg_add(&g_graphs, g)) {
        free(g);
        return leave(CUDA_ERROR_OUT_OF_MEMORY);
    }
    *phGraph = g;
    return leave(CUDA_SUCCESS);
}

/* Live allocations made by launches stay valid. */
CUresult cuGraphDestroy(CUgraph hGraph)
{
    size_t i;
    CUresult r = enter();

    if (r != CUDA_SUCCESS)
        return r;
    if (!reg_has(&g_graphs, hGraph))
        return leave(CUDA_ERROR_INVALID_VALUE);
    for (i = g_graph_nodes.count; i-- > 0;) {
        struct CUgraphNode_st *n = g_graph_nodes.items[i];
        if (n->graph == hGraph) {
            reg_remove(&g_graph_nodes, n);
            free(n);
        }
    }
    graph_allocs_free(hGraph->allocs);
    graph_allocs_free(hGraph->frees);
    reg_remove(&g_graphs, hGraph);
    free(hGraph);
    return leave(CUDA_SUCCESS);
}

CUresult cuGraphAddMemAllocNode(CUgraphNode *phGraphNode, CUgraph hGraph,
                                const CUgraphNode *dependencies, size_t numDependencies,
                                CUDA_MEM_ALLOC_NODE_PARAMS *nodeParams)
{
    struct CUctx_st *c;
    uint64_t va = 0;
    CUresult r = enter();

    if (r != CUDA_SUCCESS)
        return r;
    r = current_ctx(&c);
    if (r != CUDA_SUCCESS)
        return leave(r);
    if (nodeParams == NULL || nodeParams->bytesize == 0 ||
        nodeParams->poolProps.allocType != CU_MEM_ALLOCATION_TYPE_PINNED ||
        nodeParams->poolProps.location.type != CU_MEM_LOCATION_TYPE_DEVICE ||
        (nodeParams->accessDescCount > 0 && nodeParams->accessDescs == NULL))
        return leave(CUDA_ERROR_INVALID_VALUE);
    if (!valid_dev(nodeParams->poolProps.location.id))
        return leave(CUDA_ERROR_INVALID_DEVICE);
    r = new_node(phGraphNode, hGraph, dependencies, numDependencies);
    if (r != CUDA_SUCCESS)
        return leave(r);
    r = graph_alloc_node(hGraph, nodeParams->poolProps.location.id, nodeParams->bytesize, &va);
    if (r != CUDA_SUCCESS) {
        reg_remove(&g_graph_nodes, *phGraphNode);
        free(*phGraphNode);
        return leave(r);
    }
    nodeParams->dptr = va;
    return leave(CUDA_SUCCESS);
}

CUresult cuGraphAddMemFreeNode(CUgraphNode *phGraphNode, CUgraph hGraph,
                               const CUgraphNode *dependencies, size_t numDependencies,
                               CUdeviceptr dptr)
{
    struct graph_alloc *a;
    CUresult r = enter();

    if (r != CUDA_SUCCESS)
        return r;
    if (!reg_has(&g_graphs, hGraph))
        return leave(CUDA_ERROR_INVALID_VALUE);
    for (a = hGraph->allocs; a != NULL; a = a->next) {
        if (a->dptr == dptr && !a->freed_in_graph)
            break;
    }
    if (a == NULL) {
        r = new_node(phGraphNode, hGraph, dependencies, numDependencies);
        if (r != CUDA_SUCCESS)
            return leave(r);
        r = graph_foreign_free(hGraph, dptr);
        if (r != CUDA_SUCCESS) {
            reg_remove(&g_graph_nodes, *phGraphNode);
            free(*phGraphNode);
        }
        return leave(r);
    }
    r = new_node(phGraphNode, hGraph, dependencies, numDependencies);
    if (r == CUDA_SUCCESS)
        a->freed_in_graph = true;
    return leave(r);
}

/* Copies a list of graph allocations; false when the host is out of memory (*out then holds
 * what was copied, for the caller to free). */
static bool graph_allocs_copy(const struct graph_alloc *from, struct graph_alloc **out)
{
    for (; from != NULL; from = from->next) {
        struct graph_alloc *copy = malloc(sizeof *copy);
        if (copy == NULL)
            return false;
        *copy = *from;
        copy->next = *out;
        *out = copy;
    }
    return true;
}

CUresult cuGraphInstantiateWithFlags(CUgraphExec *phGraphExec, CUgraph hGraph,
                                     unsigned long long flags)
{
    struct CUgraphExec_st *e;
    CUresult r = enter();

    if (r != CUDA_SUCCESS)
        return r;
    /* CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH (1) is the only flag modelled. */
    if (phGraphExec == NULL || !reg_has(&g_graphs, hGraph) || (flags & ~1ull) != 0)
        return leave(CUDA_ERROR_INVALID_VALUE);
    e = calloc(1, sizeof *e);
    if (e == NULL)
        return leave(CUDA_ERROR_OUT_OF_MEMORY);
    e->kernel_ns = hGraph->kernel_ns;
    if (!graph_allocs_copy(hGraph->allocs, &e->allocs) ||
        !graph_allocs_copy(hGraph->frees, &e->frees) || !reg_add(&g_graph_execs, e)) {
        graph_allocs_free(e->allocs);
        graph_allocs_free(e->frees);
        free(e);
        return leave(CUDA_ERROR_OUT_OF_MEMORY);
    }
    *phGraphExec = e;
    return leave(CUDA_SUCCESS);
}

CUresult cuGraphExecDestroy(CUgraphExec hGraphExec)
{
    CUresult r = enter();

    if (r != CUDA_SUCCESS)
        return r;
    if (!reg_has(&g_graph_execs, hGraphExec))
        return leave(CUDA_ERROR_INVALID_VALUE);
    reg_remove(&g_graph_execs, hGraphExec);
    graph_allocs_free(hGraphExec->allocs);
    graph_allocs_free(hGraphExec->frees);
    free(hGraphExec);
    return leave(CUDA_SUCCESS);
}

/*
 * The memory side of launching an instantiated graph in context c: all or
 * nothing. Called by graph_launch for executables made by
 * cuGraphInstantiateWithFlags (other non-NULL handles carry no memory).
 */
static CUresult graph_exec_memory(struct CUgraphExec_st *e, struct CUctx_st *c)
{
    uint64_t need[SIM_MAX_GPUS] = {0}, grown[SIM_MAX_GPUS] = {0};
    struct graph_alloc *a;
    unsigned int d;

    for (a = e->allocs; a != NULL; a = a->next) {
        if (find_alloc(a->dptr, is_linear) != NULL)
            return CUDA_ERROR_INVALID_VALUE; /* still live from an earlier launch */
        need[a->dev] += a->size;
    }
    for (a = e->frees; a != NULL; a = a->next) {
        if (find_alloc(a->dptr, is_graph_kind) == NULL)
            return CUDA_ERROR_INVALID_VALUE; /* another graph's allocation, not live now */
    }
    for (d = 0; d < g_dev_count; d++) {
        struct device *dv = &g_devs[d];
        uint64_t want = dv->graph_in_use + need[d];
        if (want > dv->graph_reserved) {
            if (charge((int)d, want - dv->graph_reserved) != CUDA_SUCCESS) {
                while (d-- > 0) {
                    uncharge((int)d, grown[d]);
                    g_devs[d].graph_reserved -= grown[d];
                }
                return CUDA_ERROR_OUT_OF_MEMORY;
            }
            grown[d] = want - dv->graph_reserved;
            dv->graph_reserved = want;
        }
    }
    /* The launch succeeds from here on: other graphs' allocations it frees go back to the pool. */
    for (a = e->frees; a != NULL; a = a->next)
        free_object(find_alloc(a->dptr, is_graph_kind));
    for (a = e->allocs; a != NULL; a = a->next) {
        struct alloc *live;
        if (a->freed_in_graph)
            continue; /* used and returned to the pool within the launch */
        live = calloc(1, sizeof *live);
        if (live == NULL)
            continue; /* host out of memory: the pool keeps it */
        g_devs[a->dev].graph_in_use += a->size;
        live->kind = A_GRAPH;
        live->key = a->dptr;
        live->size = a->size;
        live->dev = a->dev;
        live->ctx = c;
        live->next = g_allocs;
        g_allocs = live;
    }
    return CUDA_SUCCESS;
}

/* Gives the graph memory pool's unused physical memory back to the device. */
CUresult cuDeviceGraphMemTrim(CUdevice device)
{
    struct device *d;
    CUresult r = enter();

    if (r != CUDA_SUCCESS)
        return r;
    if (!valid_dev(device))
        return leave(CUDA_ERROR_INVALID_DEVICE);
    d = &g_devs[device];
    uncharge(device, d->graph_reserved - d->graph_in_use);
    d->graph_reserved = d->graph_in_use;
    return leave(CUDA_SUCCESS);
}

static CUresult begin_capture(CUstream s, CUstreamCaptureMode mode)
{
    struct CUctx_st *c;
    struct CUgraph_st *g;
    CUresult r = current_ctx(&c);

    if (r != CUDA_SUCCESS)
        return r;
    if (mode != CU_STREAM_CAPTURE_MODE_GLOBAL && mode != CU_STREAM_CAPTURE_MODE_THREAD_LOCAL &&
        mode != CU_STREAM_CAPTURE_MODE_RELAXED)
        return CUDA_ERROR_INVALID_VALUE;
    /* The legacy default stream cannot be captured (the per-thread one can in the driver; it
     * is not modelled here). */
    if (s == NULL || s == CU_STREAM_LEGACY || s == CU_STREAM_PER_THREAD)
        return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
    if (!reg_has(&g_streams, s))
        return CUDA_ERROR_INVALID_HANDLE;
    if (s->capture != NULL)
        return CUDA_ERROR_ILLEGAL_STATE;
    g = calloc(1, sizeof *g);
    if (g == NULL || !reg_add(&g_graphs, g)) {
        free(g);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    s->capture = g;
    return CUDA_SUCCESS;
}

CUresult cuStreamBeginCapture_v2(CUstream hStream, CUstreamCaptureMode mode)
{
    CUresult r = enter();
    return r ? r : leave(begin_capture(hStream, mode));
}

CUresult cuStreamBeginCapture_v2_ptsz(CUstream hStream, CUstreamCaptureMode mode)
{
    CUresult r = enter();
    return r ? r : leave(begin_capture(hStream, mode));
}

static CUresult end_capture(CUstream s, CUgraph *graph)
{
    if (graph == NULL)
        return CUDA_ERROR_INVALID_VALUE;
    if (s == NULL || s == CU_STREAM_LEGACY || s == CU_STREAM_PER_THREAD)
        return CUDA_ERROR_ILLEGAL_STATE;
    if (!reg_has(&g_streams, s))
        return CUDA_ERROR_INVALID_HANDLE;
    if (s->capture == NULL)
        return CUDA_ERROR_ILLEGAL_STATE;
    *graph = s->capture;
    s->capture = NULL;
    return CUDA_SUCCESS;
}

CUresult cuStreamEndCapture(CUstream hStream, CUgraph *phGraph)
{
    CUresult r = enter();
    return r ? r : leave(end_capture(hStream, phGraph));
}

CUresult cuStreamEndCapture_ptsz(CUstream hStream, CUgraph *phGraph)
{
    CUresult r = enter();
    return r ? r : leave(end_capture(hStream, phGraph));
}

static CUresult is_capturing(CUstream s, CUstreamCaptureStatus *status)
{
    CUresult r = check_stream(s);

    if (r != CUDA_SUCCESS)
        return r;
    if (status == NULL)
        return CUDA_ERROR_INVALID_VALUE;
    *status = capturing(s) != NULL ? CU_STREAM_CAPTURE_STATUS_ACTIVE : CU_STREAM_CAPTURE_STATUS_NONE;
    return CUDA_SUCCESS;
}

CUresult cuStreamIsCapturing(CUstream hStream, CUstreamCaptureStatus *captureStatus)
{
    CUresult r = enter();
    return r ? r : leave(is_capturing(hStream, captureStatus));
}

CUresult cuStreamIsCapturing_ptsz(CUstream hStream, CUstreamCaptureStatus *captureStatus)
{
    CUresult r = enter();
    return r ? r : leave(is_capturing(hStream, captureStatus));
}

/* ------------------------------------------------------------------------ */
/* Arrays                                                                    */
/* ------------------------------------------------------------------------ */

/* Bytes of one element (format size times channels), 0 if invalid. */
static uint64_t element_size(CUarray_format format, unsigned int channels)
{
    uint64_t size;

    switch (format) {
    case CU_AD_FORMAT_UNSIGNED_INT8:
    case CU_AD_FORMAT_SIGNED_INT8: size = 1; break;
    case CU_AD_FORMAT_UNSIGNED_INT16:
    case CU_AD_FORMAT_SIGNED_INT16:
    case CU_AD_FORMAT_HALF: size = 2; break;
    case CU_AD_FORMAT_UNSIGNED_INT32:
    case CU_AD_FORMAT_SIGNED_INT32:
    case CU_AD_FORMAT_FLOAT: size = 4; break;
    default: return 0;
    }
    if (channels != 1 && channels != 2 && channels != 4)
        return 0;
    return size * channels;
}

/* width x height x depth x element, each missing dimension counting 1; 0 if invalid,
 * UINT64_MAX if absurdly large. */
static uint64_t array_bytes(uint64_t w, uint64_t h, uint64_t d, CUarray_format format,
                            unsigned int channels, unsigned int flags)
{
    uint64_t elem = element_size(format, channels);
    uint64_t dims[3] = {w, h ? h : 1, d ? d : 1};
    uint64_t bytes = elem;
    int i;

    if (elem == 0 || w == 0 || (h == 0 && d != 0 && !(flags & CUDA_ARRAY3D_LAYERED)))
        return 0;
    for (i = 0; i < 3; i++) {
        if (dims[i] > MAX_REQUEST || bytes > MAX_REQUEST / dims[i])
            return UINT64_MAX;
        bytes *= dims[i];
    }
    return bytes;
}

static CUresult new_handle_object(enum alloc_kind kind, uint64_t bytes, uint64_t *key)
{
    struct CUctx_st *c;
    struct alloc *a;
    void *token;
    CUresult r = current_ctx(&c);

    if (r != CUDA_SUCCESS)
        return r;
    if (bytes == 0)
        return CUDA_ERROR_INVALID_VALUE;
    if (bytes == UINT64_MAX)
        return CUDA_ERROR_OUT_OF_MEMORY;
    token = calloc(1, 16); /* a real pointer, so the handle is unique while it lives */
    if (token == NULL)
        return CUDA_ERROR_OUT_OF_MEMORY;
    r = new_device_object(c, c->dev, kind, bytes, &a);
    if (r != CUDA_SUCCESS) {
        free(token);
        return r;
    }
    a->key = (uint64_t)(uintptr_t)token;
    *key = a->key;
    return CUDA_SUCCESS;
}

static CUresult array_create(CUarray *handle, uint64_t bytes)
{
    uint64_t key = 0;
    CUresult r;

    if (handle == NULL)
        return CUDA_ERROR_INVALID_VALUE;
    r = new_handle_object(A_ARRAY, bytes, &key);
    if (r == CUDA_SUCCESS)
        *handle = (CUarray)(uintptr_t)key;
    return r;
}

CUresult cuArrayCreate(CUarray *pHandle, const CUDA_ARRAY_DESCRIPTOR_v1 *pAllocateArray)
{
    const CUDA_ARRAY_DESCRIPTOR_v1 *d = pAllocateArray;
    CUresult r = enter();

    if (r != CUDA_SUCCESS)
        return r;
    if (d == NULL)
        return leave(CUDA_ERROR_INVALID_VALUE);
    return leave(array_create(pHandle, array_bytes(d->Width, d->Height, 0, d->Format,
                                                   d->NumChannels, 0)));
}

CUresult cuArrayCreate_v2(CUarray *pHandle, const CUDA_ARRAY_DESCRIPTOR *pAllocateArray)
{
    const CUDA_ARRAY_DESCRIPTOR *d = pAllocateArray;
    CUresult r = enter();

    if (r != CUDA_SUCCESS)
        return r;
    if (d == NULL)
        return leave(CUDA_ERROR_INVALID_VALUE);
    return leave(array_create(pHandle, array_bytes(d->Width, d->Height, 0, d->Format,
                                                   d->NumChannels, 0)));
}

CUresult cuArray3DCreate(CUarray *pHandle, const CUDA_ARRAY3D_DESCRIPTOR_v1 *pAllocateArray)
{
    const CUDA_ARRAY3D_DESCRIPTOR_v1 *d = pAllocateArray;
    CUresult r = enter();

    if (r != CUDA_SUCCESS)
        return r;
    if (d == NULL)
        return leave(CUDA_ERROR_INVALID_VALUE);
    return leave(array_create(pHandle, array_bytes(d->Width, d->Height, d->Depth, d->Format,
                                                   d->NumChannels, d->Flags)));
}

CUresult cuArray3DCreate_v2(CUarray *pHandle, const CUDA_ARRAY3D_DESCRIPTOR *pAllocateArray)
{
    const CUDA_ARRAY3D_DESCRIPTOR *d = pAllocateArray;
    CUresult r = enter();

    if (r != CUDA_SUCCESS)
        return r;
    if (d == NULL)
        return leave(CUDA_ERROR_INVALID_VALUE);
    return leave(array_create(pHandle, array_bytes(d->Width, d->Height, d->Depth, d->Format,
                                                   d->NumChannels, d->Flags)));
}

CUresult cuArrayDestroy(CUarray hArray)
{
    struct alloc *a;
    CUresult r = enter();

    if (r != CUDA_SUCCESS)
        return r;
    a = find_alloc((uint64_t)(uintptr_t)hArray, is_array);
    if (hArray == NULL || a == NULL)
        return leave(CUDA_ERROR_INVALID_HANDLE);
    free_object(a);
    return leave(CUDA_SUCCESS);
}

/* Sum of the levels, each dimension halving (down to 1) from level to level. */
CUresult cuMipmappedArrayCreate(CUmipmappedArray *pHandle,
                                const CUDA_ARRAY3D_DESCRIPTOR *pMipmappedArrayDesc,
                                unsigned int numMipmapLevels)
{
    const CUDA_ARRAY3D_DESCRIPTOR *d = pMipmappedArrayDesc;
    uint64_t total = 0, key = 0, largest;
    unsigned int level, max_levels = 1;
    CUresult r = enter();

    if (r != CUDA_SUCCESS)
        return r;
    if (pHandle == NULL || d == NULL || numMipmapLevels == 0)
        return leave(CUDA_ERROR_INVALID_VALUE);
    largest = d->Width > d->Height ? d->Width : d->Height;
    largest = largest > d->Depth ? largest : d->Depth;
    while (max_levels < 64 && (largest >> max_levels) != 0)
        max_levels++;
    if (numMipmapLevels > max_levels)
        return leave(CUDA_ERROR_INVALID_VALUE);
    for (level = 0; level < numMipmapLevels; level++) {
        uint64_t w = d->Width >> level, h = d->Height >> level, z = d->Depth >> level;
        uint64_t bytes = array_bytes(w ? w : 1, d->Height ? (h ? h : 1) : 0,
                                     d->Depth ? (z ? z : 1) : 0, d->Format, d->NumChannels,
                                     d->Flags);
        if (bytes == 0 || d->Width == 0)
            return leave(CUDA_ERROR_INVALID_VALUE);
        if (bytes == UINT64_MAX || total > MAX_REQUEST)
            return leave(CUDA_ERROR_OUT_OF_MEMORY);
        total += bytes;
    }
    r = new_handle_object(A_MIPMAP, total, &key);
    if (r == CUDA_SUCCESS)
        *pHandle = (CUmipmappedArray)(uintptr_t)key;
    return leave(r);
}

CUresult cuMipmappedArrayDestroy(CUmipmappedArray hMipmappedArray)
{
    struct alloc *a;
    CUresult r = enter();

    if (r != CUDA_SUCCESS)
        return r;
    a = find_alloc((uint64_t)(uintptr_t)hMipmappedArray, is_mipmap);
    if (hMipmappedArray == NULL || a == NULL)
        return leave(CUDA_ERROR_INVALID_HANDLE);
    free_object(a);
    return leave(CUDA_SUCCESS);
}

/* ------------------------------------------------------------------------ */
/* Modules                                                                   */
/* ------------------------------------------------------------------------ */

/* Any image is accepted: the module is a token that hands out function tokens. */
static CUresult module_new(CUmodule *module)
{
    struct CUctx_st *c;
    struct CUmod_st *m;
    CUresult r = current_ctx(&c);

    if (r != CUDA_SUCCESS)
        return r;
    m = calloc(1, sizeof *m);
    if (m == NULL || !reg_add(&g_modules, m)) {
        free(m);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    m->ctx = c;
    *module = m;
    return CUDA_SUCCESS;
}

CUresult cuModuleLoad(CUmodule *module, const char *fname)
{
    CUresult r = enter();

    if (r != CUDA_SUCCESS)
        return r;
    if (module == NULL || fname == NULL)
        return leave(CUDA_ERROR_INVALID_VALUE);
    if (access(fname, R_OK) != 0)
        return leave(CUDA_ERROR_FILE_NOT_FOUND);
    return leave(module_new(module));
}

CUresult cuModuleLoadData(CUmodule *module, const void *image)
{
    CUresult r = enter();

    if (r != CUDA_SUCCESS)
        return r;
    if (module == NULL || image == NULL)
        return leave(CUDA_ERROR_INVALID_VALUE);
    return leave(module_new(module));
}

CUresult cuModuleLoadDataEx(CUmodule *module, const void *image, unsigned int numOptions,
                            int *options, void **optionValues)
{
    CUresult r = enter();

    if (r != CUDA_SUCCESS)
        return r;
    if (module == NULL || image == NULL ||
        (numOptions > 0 && (options == NULL || optionValues == NULL)))
        return leave(CUDA_ERROR_INVALID_VALUE);
    return leave(module_new(module));
}

CUresult cuModuleUnload(CUmodule hmod)
{
    size_t k;
    CUresult r = enter();

    if (r != CUDA_SUCCESS)
        return r;
    if (!reg_has(&g_modules, hmod))
        return leave(CUDA_ERROR_INVALID_HANDLE);
    for (k = g_functions.count; k-- > 0;) {
        struct CUfunc_st *f = g_functions.items[k];
        if (f->mod == hmod) {
            reg_remove(&g_functions, f);
            free(f->name);
            free(f);
        }
    }
    reg_remove(&g_modules, hmod);
    free(hmod);
    return leave(CUDA_SUCCESS);
}

/*
 * The kernel time model's cost of a function, from its name: "...@wave_ns=N" (time per wave)
 * or "...@kernel_ns=N" (time per launch, whatever the grid); otherwise GPU_SIM_WAVE_NS per
 * wave. False (after one line on stderr) for a malformed number.
 */
static bool function_cost(struct CUfunc_st *f)
{
    const char *at = strrchr(f->name, '@');
    const char *digits;
    uint64_t *field;
    char *end;
    unsigned long long n;

    f->wave_ns = g_wave_ns;
    f->kernel_ns = 0;
    if (at == NULL)
        return true;
    if (strncmp(at, "@wave_ns=", 9) == 0) {
        digits = at + 9;
        field = &f->wave_ns;
    } else if (strncmp(at, "@kernel_ns=", 11) == 0) {
        digits = at + 11;
        field = &f->kernel_ns;
    } else {
        return true; /* an '@' that is not a cost */
    }
    errno = 0;
    n = strtoull(digits, &end, 10);
    if (digits[0] < '0' || digits[0] > '9' || *end != '\0' || errno != 0) {
        report("gpu-sim: cuModuleGetFunction(\"%s\"): bad cost '%s': expected decimal "
               "nanoseconds, as in \"name@kernel_ns=1000000\"",
               f->name, digits);
        return false;
    }
    *field = n;
    if (field == &f->kernel_ns)
        f->wave_ns = 0;
    return true;
}

/* Every name exists; asking twice for one name gives the same handle. */
CUresult cuModuleGetFunction(CUfunction *hfunc, CUmodule hmod, const char *name)
{
    struct CUfunc_st *f;
    size_t k;
    CUresult r = enter();

    if (r != CUDA_SUCCESS)
        return r;
    if (hfunc == NULL || name == NULL)
        return leave(CUDA_ERROR_INVALID_VALUE);
    if (!reg_has(&g_modules, hmod))
        return leave(CUDA_ERROR_INVALID_HANDLE);
    for (k = 0; k < g_functions.count; k++) {
        f = g_functions.items[k];
        if (f->mod == hmod && strcmp(f->name, name) == 0) {
            *hfunc = f;
            return leave(CUDA_SUCCESS);
        }
    }
    f = calloc(1, sizeof *f);
    if (f != NULL)
        f->name = strdup(name);
    if (f == NULL || f->name == NULL || !reg_add(&g_functions, f)) {
        if (f != NULL)
            free(f->name);
        free(f);
        return leave(CUDA_ERROR_OUT_OF_MEMORY);
    }
    if (!function_cost(f)) {
        reg_remove(&g_functions, f);
        free(f->name);
        free(f);
        return leave(CUDA_ERROR_NOT_FOUND);
    }
    f->mod = hmod;
    *hfunc = f;
    return leave(CUDA_SUCCESS);
}

/* ------------------------------------------------------------------------ */
/* Streams                                                                   */
/* ------------------------------------------------------------------------ */

CUresult cuStreamCreate(CUstream *phStream, unsigned int Flags)
{
    struct CUctx_st *c;
    struct CUstream_st *s;
    CUresult r = enter();

    if (r != CUDA_SUCCESS)
        return r;
    r = current_ctx(&c);
    if (r != CUDA_SUCCESS)
        return leave(r);
    if (phStream == NULL || (Flags & ~(unsigned int)CU_STREAM_NON_BLOCKING) != 0)
        return leave(CUDA_ERROR_INVALID_VALUE);
    s = calloc(1, sizeof *s);
    if (s == NULL || !reg_add(&g_streams, s)) {
        free(s);
        return leave(CUDA_ERROR_OUT_OF_MEMORY);
    }
    s->ctx = c;
    s->flags = Flags;
    *phStream = s;
    return leave(CUDA_SUCCESS);
}

static CUresult stream_destroy(CUstream s)
{
    if (!reg_has(&g_streams, s))
        return CUDA_ERROR_INVALID_HANDLE;
    reg_remove(&g_streams, s);
    free(s->tl_queue);
    free(s);
    return CUDA_SUCCESS;
}

CUresult cuStreamDestroy(CUstream hStream)
{
    CUresult r = enter();
    return r ? r : leave(stream_destroy(hStream));
}

CUresult cuStreamDestroy_v2(CUstream hStream)
{
    CUresult r = enter();
    return r ? r : leave(stream_destroy(hStream));
}

/* Waits for the kernels this process queued on the stream. A created stream carries its
 * context; the default streams need a current one (legacy: the context's; per-thread: the
 * calling thread's). */
static CUresult stream_sync(CUstream s)
{
    struct CUctx_st *c;
    CUresult r = check_stream(s);

    if (r != CUDA_SUCCESS)
        return r;
    if (s != NULL && s != CU_STREAM_LEGACY && s != CU_STREAM_PER_THREAD) {
        r = ctx_health(s->ctx);
        if (r == CUDA_SUCCESS && s->tl_queue != NULL)
            wait_for(&s->tl_queue->last);
        return r;
    }
    r = current_ctx(&c);
    if (r != CUDA_SUCCESS)
        return r;
    if (s == CU_STREAM_PER_THREAD) {
        if (t_ptds_queue != NULL)
            wait_for(&t_ptds_queue->last);
    } else if (c->tl_legacy != NULL) {
        wait_for(&c->tl_legacy->last);
    }
    return CUDA_SUCCESS;
}

CUresult cuStreamSynchronize(CUstream hStream)
{
    CUresult r = enter();
    return r ? r : leave(stream_sync(hStream));
}

CUresult cuStreamSynchronize_ptsz(CUstream hStream)
{
    CUresult r = enter();
    return r ? r : leave(stream_sync(hStream));
}

/* ------------------------------------------------------------------------ */
/* Launches                                                                  */
/* ------------------------------------------------------------------------ */

/*
 * The pending-kernel queue of a stream in context c, allocated on first use (NULL when out
 * of memory): a created stream's own, the context's legacy stream, or the calling thread's
 * per-thread default stream.
 */
static struct sim_tl_queue *queue_of(struct CUctx_st *c, CUstream stream)
{
    struct sim_tl_queue **slot;

    if (stream == CU_STREAM_PER_THREAD)
        slot = &t_ptds_queue;
    else if (stream == NULL || stream == CU_STREAM_LEGACY)
        slot = &c->tl_legacy;
    else
        slot = &stream->tl_queue;
    if (*slot == NULL)
        *slot = calloc(1, sizeof **slot);
    return *slot;
}

/*
 * Queues duration_ns of device work from context c on stream, behind this process's earlier
 * kernels on the GPU's timeline (timeline.h). Blocks (sleeping without the driver lock) while
 * the stream has SIM_TL_STREAM_DEPTH kernels pending or the timeline refuses more (horizon,
 * lanes); the context and stream are checked again after each wait, since another thread may
 * have destroyed them.
 */
static CUresult queue_work(struct CUctx_st *c, CUstream stream, uint64_t duration_ns)
{
    for (;;) {
        struct sim_tl_queue *q = queue_of(c, stream);
        const struct sim_tl_mark *oldest;
        struct sim_tl_mark mark;
        uint64_t wait;
        CUresult r;

        if (q == NULL)
            return CUDA_ERROR_OUT_OF_MEMORY;
        oldest = sim_tl_queue_full(&g_tl, q);
        if (oldest != NULL) {
            wait_for(oldest); /* the stream's queue is full: wait for its oldest kernel */
        } else {
            wait = sim_tl_enqueue(&g_tl, g_devs[c->dev].gpu, g_state.slot, sim_self_pid(),
                                  g_host_pid, duration_ns, sim_tl_now_ns(), &mark);
            if (wait == 0) {
                sim_tl_queue_push(q, &mark);
                c->tl_last = mark;
                return CUDA_SUCCESS;
            }
            unlock();
            sim_tl_sleep_until(wait);
            lock();
        }
        if (!c->alive)
            return CUDA_ERROR_INVALID_CONTEXT;
        r = ctx_health(c);
        if (r == CUDA_SUCCESS)
            r = check_stream(stream);
        if (r != CUDA_SUCCESS)
            return r;
    }
}

/* Blocks of a launch's shape that fit on one SM at once (at least 1). */
static uint64_t blocks_per_sm(int dev, uint64_t threads_per_block, unsigned int shared_mem)
{
    const struct model *m = model_of(gpu_of(dev));
    bool turing = m->cc_major == 7 && m->cc_minor == 5;
    uint64_t fit = turing ? 16 : 32;

    if ((uint64_t)m->threads_per_sm / threads_per_block < fit)
        fit = (uint64_t)m->threads_per_sm / threads_per_block;
    if (shared_mem > 0 && (uint64_t)m->smem_per_sm / shared_mem < fit)
        fit = (uint64_t)m->smem_per_sm / shared_mem;
    return fit > 0 ? fit : 1;
}

/*
 * Validates a launch the way the driver does before it queues anything, queues its time on
 * the current context's GPU (the kernel time model in README.md) and counts it (and its
 * blocks) in the node state.
 */
static CUresult launch(CUfunction f, unsigned int gx, unsigned int gy, unsigned int gz,
                       unsigned int bx, unsigned int by, unsigned int bz, unsigned int smem,
                       bool cooperative, CUstream stream, void **params, void **extra)
{
    struct CUctx_st *c;
    uint64_t blocks, per_wave, duration;
    CUresult r = current_ctx(&c);

    if (r != CUDA_SUCCESS)
        return r;
    if (f == NULL || !reg_has(&g_functions, f))
        return CUDA_ERROR_INVALID_HANDLE;
    if (gx == 0 || gy == 0 || gz == 0 || bx == 0 || by == 0 || bz == 0)
        return CUDA_ERROR_INVALID_VALUE;
    if (bx > 1024 || by > 1024 || bz > 64 || (uint64_t)bx * by * bz > 1024 || gy > 65535 ||
        gz > 65535 || gx > (unsigned int)INT_MAX)
        return CUDA_ERROR_INVALID_VALUE;
    if (params != NULL && extra != NULL)
        return CUDA_ERROR_INVALID_VALUE;
    r = check_stream(stream);
    if (r != CUDA_SUCCESS)
        return r;
    blocks = (uint64_t)gx * gy * gz;
    per_wave = (uint64_t)model_of(gpu_of(c->dev))->sms *
               blocks_per_sm(c->dev, (uint64_t)bx * by * bz, smem);
    if (cooperative && blocks > per_wave)
        return CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE; /* all blocks must be resident at once */
    if (f->kernel_ns > 0) {
        duration = f->kernel_ns;
    } else {
        uint64_t waves = (blocks + per_wave - 1) / per_wave;
        /* Saturates: the timeline caps a kernel at its horizon anyway. */
        duration = f->wave_ns > UINT64_MAX / waves ? UINT64_MAX : waves * f->wave_ns;
    }
    if (stream != NULL && stream != CU_STREAM_LEGACY && stream != CU_STREAM_PER_THREAD &&
        stream->capture != NULL) {
        /* Captured, not run: the kernel becomes part of the graph's time. */
        stream->capture->kernel_ns += duration;
        return CUDA_SUCCESS;
    }
    if (duration > 0) {
        r = queue_work(c, stream, duration);
        if (r != CUDA_SUCCESS)
            return r;
    }
    sim_state_count_launch(&g_state, g_devs[c->dev].gpu, blocks, false);
    return CUDA_SUCCESS;
}

CUresult cuLaunchKernel(CUfunction f, unsigned int gridDimX, unsigned int gridDimY,
                        unsigned int gridDimZ, unsigned int blockDimX, unsigned int blockDimY,
                        unsigned int blockDimZ, unsigned int sharedMemBytes, CUstream hStream,
                        void **kernelParams, void **extra)
{
    CUresult r = enter();

    return r ? r
             : leave(launch(f, gridDimX, gridDimY, gridDimZ, blockDimX, blockDimY, blockDimZ,
                            sharedMemBytes, false, hStream, kernelParams, extra));
}

CUresult cuLaunchKernel_ptsz(CUfunction f, unsigned int gridDimX, unsigned int gridDimY,
                             unsigned int gridDimZ, unsigned int blockDimX, unsigned int blockDimY,
                             unsigned int blockDimZ, unsigned int sharedMemBytes, CUstream hStream,
                             void **kernelParams, void **extra)
{
    CUresult r = enter();

    return r ? r
             : leave(launch(f, gridDimX, gridDimY, gridDimZ, blockDimX, blockDimY, blockDimZ,
                            sharedMemBytes, false, hStream, kernelParams, extra));
}

static CUresult launch_ex(const CUlaunchConfig *config, CUfunction f, void **params, void **extra)
{
    struct CUctx_st *c;
    bool cooperative = false;
    unsigned int i;
    CUresult r = current_ctx(&c);

    if (r != CUDA_SUCCESS)
        return r;
    if (config == NULL || (config->numAttrs > 0 && config->attrs == NULL))
        return CUDA_ERROR_INVALID_VALUE;
    for (i = 0; i < config->numAttrs; i++) {
        if (config->attrs[i].id == CU_LAUNCH_ATTRIBUTE_COOPERATIVE)
            cooperative = config->attrs[i].value.cooperative != 0;
    }
    return launch(f, config->gridDimX, config->gridDimY, config->gridDimZ, config->blockDimX,
                  config->blockDimY, config->blockDimZ, config->sharedMemBytes, cooperative,
                  config->hStream, params, extra);
}

CUresult cuLaunchKernelEx(const CUlaunchConfig *config, CUfunction f, void **kernelParams,
                          void **extra)
{
    CUresult r = enter();
    return r ? r : leave(launch_ex(config, f, kernelParams, extra));
}

CUresult cuLaunchKernelEx_ptsz(const CUlaunchConfig *config, CUfunction f, void **kernelParams,
                               void **extra)
{
    CUresult r = enter();
    return r ? r : leave(launch_ex(config, f, kernelParams, extra));
}

CUresult cuLaunchCooperativeKernel(CUfunction f, unsigned int gridDimX, unsigned int gridDimY,
                                   unsigned int gridDimZ, unsigned int blockDimX,
                                   unsigned int blockDimY, unsigned int blockDimZ,
                                   unsigned int sharedMemBytes, CUstream hStream,
                                   void **kernelParams)
{
    CUresult r = enter();

    return r ? r
             : leave(launch(f, gridDimX, gridDimY, gridDimZ, blockDimX, blockDimY, blockDimZ,
                            sharedMemBytes, true, hStream, kernelParams, NULL));
}

CUresult cuLaunchCooperativeKernel_ptsz(CUfunction f, unsigned int gridDimX, unsigned int gridDimY,
                                        unsigned int gridDimZ, unsigned int blockDimX,
                                        unsigned int blockDimY, unsigned int blockDimZ,
                                        unsigned int sharedMemBytes, CUstream hStream,
                                        void **kernelParams)
{
    CUresult r = enter();

    return r ? r
             : leave(launch(f, gridDimX, gridDimY, gridDimZ, blockDimX, blockDimY, blockDimZ,
                            sharedMemBytes, true, hStream, kernelParams, NULL));
}

/* Any non-NULL executable graph runs as one item on the timeline and is counted: its captured
 * kernels' time (for one made by cuGraphInstantiateWithFlags) plus GPU_SIM_GRAPH_NS. */
static CUresult graph_launch(CUgraphExec exec, CUstream stream)
{
    struct CUctx_st *c;
    uint64_t duration = g_graph_ns;
    CUresult r = current_ctx(&c);

    if (r != CUDA_SUCCESS)
        return r;
    if (exec == NULL)
        return CUDA_ERROR_INVALID_VALUE;
    r = check_stream(stream);
    if (r != CUDA_SUCCESS)
        return r;
    if (reg_has(&g_graph_execs, exec)) {
        r = graph_exec_memory(exec, c); /* graph memory nodes */
        if (r != CUDA_SUCCESS)
            return r;
        duration += exec->kernel_ns;
    }
    if (duration > 0) {
        r = queue_work(c, stream, duration);
        if (r != CUDA_SUCCESS)
            return r;
    }
    sim_state_count_launch(&g_state, g_devs[c->dev].gpu, 0, true);
    return CUDA_SUCCESS;
}

CUresult cuGraphLaunch(CUgraphExec hGraphExec, CUstream hStream)
{
    CUresult r = enter();
    return r ? r : leave(graph_launch(hGraphExec, hStream));
}

CUresult cuGraphLaunch_ptsz(CUgraphExec hGraphExec, CUstream hStream)
{
    CUresult r = enter();
    return r ? r : leave(graph_launch(hGraphExec, hStream));
}
