/*
 * The cross-process device state of a simulated node. See sim_state.h.
 */
#define _GNU_SOURCE
#include "sim_state.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define LOAD(p) __atomic_load_n((p), __ATOMIC_SEQ_CST)
#define STORE(p, v) __atomic_store_n((p), (v), __ATOMIC_SEQ_CST)
#define ADD(p, v) __atomic_fetch_add((p), (v), __ATOMIC_SEQ_CST)
#define SUB(p, v) __atomic_fetch_sub((p), (v), __ATOMIC_SEQ_CST)
#define XCHG(p, v) __atomic_exchange_n((p), (v), __ATOMIC_SEQ_CST)
#define CAS(p, expected, desired)                                                             \
    __atomic_compare_exchange_n((p), (expected), (desired), false, __ATOMIC_SEQ_CST,         \
                                __ATOMIC_SEQ_CST)

static bool header_ok(const void *map)
{
    const struct sim_state_file *f = map;

    return memcmp(f->magic, SIM_STATE_MAGIC, 8) == 0 && f->version == SIM_STATE_VERSION &&
           f->header_size == offsetof(struct sim_state_file, devices) &&
           f->max_gpus == SIM_MAX_GPUS && f->slot_count == SIM_STATE_SLOTS &&
           f->device_size == sizeof(struct sim_state_device) &&
           f->slot_size == sizeof(struct sim_state_slot);
}

static bool header_init(void *map_, void *arg)
{
    struct sim_state_file *map = map_;

    (void)arg;
    map->version = SIM_STATE_VERSION;
    map->header_size = offsetof(struct sim_state_file, devices);
    map->max_gpus = SIM_MAX_GPUS;
    map->slot_count = SIM_STATE_SLOTS;
    map->device_size = sizeof(struct sim_state_device);
    map->slot_size = sizeof(struct sim_state_slot);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    memcpy(map->magic, SIM_STATE_MAGIC, 8); /* last: marks the file complete */
    return true;
}

int sim_state_open(const char *node_path, bool create, struct sim_state *out)
{
    void *map;

    out->map = NULL;
    out->slot = -1;
    out->owner_pid = 0;
    if (sim_map_node_file(node_path, SIM_STATE_SUFFIX, sizeof(struct sim_state_file), create,
                          header_init, header_ok, NULL, &map) != 0)
        return -1;
    out->map = map;
    return 0;
}

void sim_state_close(struct sim_state *st)
{
    if (st->map != NULL)
        munmap(st->map, sizeof *st->map);
    st->map = NULL;
    st->slot = -1;
}

/* Moves a slot's bytes out of the device counters and frees it. The caller
 * owns the slot (pid swapped to our marker). */
static void drain_slot(struct sim_state_file *f, struct sim_state_slot *slot)
{
    unsigned int g;

    for (g = 0; g < SIM_MAX_GPUS; g++) {
        uint64_t bytes = XCHG(&slot->used[g], 0);
        if (bytes != 0)
            SUB(&f->devices[g].used_bytes, bytes);
    }
    STORE(&slot->pid, 0);
}

/* The host's /proc when the caller runs in a PID namespace of its own (GPU_SIM_HOST_PROC), as a
 * container does; NULL when the caller's own PIDs are the host's. */
static const char *host_proc(void)
{
    const char *dir = getenv("GPU_SIM_HOST_PROC");

    return dir != NULL && dir[0] == '/' ? dir : NULL;
}

int sim_self_pid(void)
{
    /* Cached per process: a forked child has another getpid() and looks again. */
    static int cached_ns_pid, cached_host_pid;
    const char *proc = host_proc();
    char path[4096], target[32];
    int ns_pid = (int)getpid();
    ssize_t n;

    if (proc == NULL)
        return ns_pid;
    if (LOAD(&cached_ns_pid) == ns_pid && ns_pid != 0)
        return LOAD(&cached_host_pid);
    /* The host procfs resolves "self" in its own PID namespace: the caller's host PID, which is what
     * the kernel driver knows a process by. */
    if (snprintf(path, sizeof path, "%s/self", proc) >= (int)sizeof path)
        return ns_pid;
    n = readlink(path, target, sizeof target - 1);
    if (n <= 0)
        return ns_pid;
    target[n] = '\0';
    STORE(&cached_host_pid, atoi(target) > 0 ? atoi(target) : ns_pid);
    STORE(&cached_ns_pid, ns_pid);
    return LOAD(&cached_host_pid);
}

/* Whether <proc>/<pid>/stat shows a zombie ('Z') or a dead task ('X'): a process that has exited
 * but not been waited for. Its files are closed, so the kernel driver has already freed its
 * memory; only its exit status waits for the parent. Unreadable: not known to be a zombie. */
static bool pid_zombie(const char *proc, int pid)
{
    char path[4096], buf[512];
    const char *paren;
    ssize_t n;
    int fd;

    if (snprintf(path, sizeof path, "%s/%d/stat", proc, pid) >= (int)sizeof path)
        return false;
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return false;
    n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return false;
    buf[n] = '\0';
    /* "<pid> (<comm>) <state> ...": comm may hold ')' itself, so take the last one. */
    paren = strrchr(buf, ')');
    return paren != NULL && paren[1] == ' ' && (paren[2] == 'Z' || paren[2] == 'X');
}

static bool pid_gone(int pid)
{
    const char *proc = host_proc();
    char path[4096];

    if (proc == NULL)
        return (kill((pid_t)pid, 0) != 0 && errno == ESRCH) || pid_zombie("/proc", pid);
    /* Our kill() reaches only our own namespace; the host's /proc lists every process. */
    if (snprintf(path, sizeof path, "%s/%d", proc, pid) >= (int)sizeof path)
        return false;
    return (access(path, F_OK) != 0 && errno == ENOENT) || pid_zombie(proc, pid);
}

unsigned int sim_state_reap(struct sim_state *st)
{
    struct sim_state_file *f = st->map;
    unsigned int s, reaped = 0;
    int self = sim_self_pid();

    if (f == NULL)
        return 0;
    for (s = 0; s < SIM_STATE_SLOTS; s++) {
        struct sim_state_slot *slot = &f->slots[s];
        int32_t pid = LOAD(&slot->pid);
        if (pid <= 0)
            continue;
        /* Our own pid is alive by definition. Another library of this same process
         * (the fake NVML reaps too, with no slot of its own) must never drain the
         * slot the CUDA side holds; a slot left by an earlier process that had our
         * pid is reclaimed by sim_state_attach instead. */
        if (pid == self || !pid_gone(pid))
            continue;
        if (!CAS(&slot->pid, &pid, -pid))
            continue; /* someone else reclaims it */
        drain_slot(f, slot);
        reaped++;
    }
    return reaped;
}

bool sim_state_attach(struct sim_state *st)
{
    struct sim_state_file *f = st->map;
    int self = sim_self_pid();
    unsigned int s;

    if (f == NULL)
        return false;
    if (st->slot >= 0 && st->owner_pid == self)
        return true;
    st->slot = -1; /* a forked child does not own its parent's slot */
    sim_state_reap(st);
    /* Not attached yet, so a slot with our pid was left by an earlier process that
     * had the same pid (pid reuse): reclaim it. */
    for (s = 0; s < SIM_STATE_SLOTS; s++) {
        int32_t pid = self;
        if (CAS(&f->slots[s].pid, &pid, -self))
            drain_slot(f, &f->slots[s]);
    }
    for (s = 0; s < SIM_STATE_SLOTS; s++) {
        int32_t expected = 0;
        if (CAS(&f->slots[s].pid, &expected, self)) {
            st->slot = (int)s;
            st->owner_pid = self;
            return true;
        }
    }
    return false;
}

void sim_state_detach(struct sim_state *st)
{
    struct sim_state_file *f = st->map;
    struct sim_state_slot *slot;
    int32_t pid;

    if (f == NULL || st->slot < 0 || st->owner_pid != sim_self_pid())
        return;
    slot = &f->slots[st->slot];
    pid = st->owner_pid;
    if (CAS(&slot->pid, &pid, -pid))
        drain_slot(f, slot);
    st->slot = -1;
}

static bool try_charge(struct sim_state_file *f, unsigned int gpu, uint64_t bytes,
                       uint64_t capacity)
{
    uint64_t *used = &f->devices[gpu].used_bytes;
    uint64_t old = LOAD(used);

    do {
        if (bytes > capacity || old > capacity - bytes)
            return false;
    } while (!CAS(used, &old, old + bytes));
    return true;
}

bool sim_state_charge(struct sim_state *st, unsigned int gpu, uint64_t bytes, uint64_t capacity)
{
    struct sim_state_file *f = st->map;

    if (f == NULL || st->slot < 0 || gpu >= SIM_MAX_GPUS)
        return false;
    if (bytes == 0)
        return true;
    if (!try_charge(f, gpu, bytes, capacity)) {
        /* Like the driver, memory of processes that died is given back first. */
        if (sim_state_reap(st) == 0 || !try_charge(f, gpu, bytes, capacity))
            return false;
    }
    ADD(&f->slots[st->slot].used[gpu], bytes);
    return true;
}

void sim_state_uncharge(struct sim_state *st, unsigned int gpu, uint64_t bytes)
{
    struct sim_state_file *f = st->map;

    if (f == NULL || st->slot < 0 || gpu >= SIM_MAX_GPUS || bytes == 0)
        return;
    SUB(&f->slots[st->slot].used[gpu], bytes);
    SUB(&f->devices[gpu].used_bytes, bytes);
}

uint64_t sim_state_used(const struct sim_state *st, unsigned int gpu)
{
    if (st->map == NULL || gpu >= SIM_MAX_GPUS)
        return 0;
    return LOAD(&st->map->devices[gpu].used_bytes);
}

void sim_state_add_managed(struct sim_state *st, unsigned int gpu, uint64_t bytes)
{
    if (st->map != NULL && gpu < SIM_MAX_GPUS)
        ADD(&st->map->devices[gpu].managed_bytes, bytes);
}

void sim_state_sub_managed(struct sim_state *st, unsigned int gpu, uint64_t bytes)
{
    if (st->map != NULL && gpu < SIM_MAX_GPUS)
        SUB(&st->map->devices[gpu].managed_bytes, bytes);
}

void sim_state_count_launch(struct sim_state *st, unsigned int gpu, uint64_t blocks, bool graph)
{
    struct sim_state_device *d;

    if (st->map == NULL || gpu >= SIM_MAX_GPUS)
        return;
    d = &st->map->devices[gpu];
    if (graph) {
        ADD(&d->graph_launches, 1);
    } else {
        ADD(&d->launches, 1);
        ADD(&d->blocks, blocks);
    }
}

void sim_state_for_each_process(const struct sim_state *st, unsigned int gpu,
                                void (*fn)(int pid, uint64_t bytes, void *arg), void *arg)
{
    unsigned int s;

    if (st->map == NULL || gpu >= SIM_MAX_GPUS)
        return;
    for (s = 0; s < SIM_STATE_SLOTS; s++) {
        const struct sim_state_slot *slot = &st->map->slots[s];
        int32_t pid = LOAD(&slot->pid);
        uint64_t bytes = LOAD(&slot->used[gpu]);
        if (pid > 0 && bytes > 0)
            fn(pid, bytes, arg);
    }
}
