/*
 * The device timelines of a simulated node: queueing kernel time per GPU and
 * accounting it per sample period and per process. See timeline.h.
 */
#define _GNU_SOURCE
#include "timeline.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define LOAD(p) __atomic_load_n((p), __ATOMIC_SEQ_CST)
#define STORE(p, v) __atomic_store_n((p), (v), __ATOMIC_SEQ_CST)
#define ADD(p, v) __atomic_fetch_add((p), (v), __ATOMIC_SEQ_CST)

uint64_t sim_tl_now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

void sim_tl_sleep_until(uint64_t deadline_ns)
{
    struct timespec ts;

    ts.tv_sec = (time_t)(deadline_ns / 1000000000ull);
    ts.tv_nsec = (long)(deadline_ns % 1000000000ull);
    while (clock_nanosleep(CLOCK_REALTIME, TIMER_ABSTIME, &ts, NULL) == EINTR) {
    }
}

static bool header_ok(const void *map)
{
    const struct sim_tl_file *f = map;

    return memcmp(f->magic, SIM_TL_MAGIC, 8) == 0 && f->version == SIM_TL_VERSION &&
           f->header_size == offsetof(struct sim_tl_file, devices) &&
           f->max_gpus == SIM_MAX_GPUS && f->slot_count == SIM_TL_SLOTS &&
           f->device_size == sizeof(struct sim_tl_device) &&
           f->slot_size == sizeof(struct sim_tl_slot) && f->period_count == SIM_TL_PERIODS &&
           f->procs_per_period == SIM_TL_PROCS && f->period_ns >= SIM_TL_MIN_PERIOD_NS &&
           f->period_ns <= SIM_TL_MAX_PERIOD_NS && f->horizon_ns > 0 && f->slice_ns > 0;
}

static bool init_mutexes(struct sim_tl_file *f)
{
    pthread_mutexattr_t attr;
    unsigned int g;
    bool ok = true;

    if (pthread_mutexattr_init(&attr) != 0)
        return false;
    if (pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED) != 0 ||
        pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST) != 0)
        ok = false;
    for (g = 0; ok && g < SIM_MAX_GPUS; g++) {
        if (pthread_mutex_init(&f->devices[g].lock.mutex, &attr) != 0)
            ok = false;
    }
    pthread_mutexattr_destroy(&attr);
    return ok;
}

/* Stamps a new file for this period; false (the file is emptied again) if the period is out of
 * range or the mutexes cannot be set up. */
static bool header_init(void *map_, void *arg)
{
    struct sim_tl_file *map = map_;
    uint64_t period_ns = *(const uint64_t *)arg;
    uint64_t horizon = SIM_TL_HORIZON_PERIODS * period_ns;

    if (period_ns < SIM_TL_MIN_PERIOD_NS || period_ns > SIM_TL_MAX_PERIOD_NS ||
        !init_mutexes(map))
        return false;
    map->version = SIM_TL_VERSION;
    map->header_size = offsetof(struct sim_tl_file, devices);
    map->max_gpus = SIM_MAX_GPUS;
    map->slot_count = SIM_TL_SLOTS;
    map->device_size = sizeof(struct sim_tl_device);
    map->slot_size = sizeof(struct sim_tl_slot);
    map->period_count = SIM_TL_PERIODS;
    map->procs_per_period = SIM_TL_PROCS;
    map->period_ns = period_ns;
    map->horizon_ns = horizon < SIM_TL_HORIZON_MAX_NS ? horizon : SIM_TL_HORIZON_MAX_NS;
    map->slice_ns = SIM_TL_SLICE_NS;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    memcpy(map->magic, SIM_TL_MAGIC, 8); /* last: marks the file complete */
    return true;
}

int sim_tl_open(const char *node_path, bool create, uint64_t period_ns, struct sim_tl *out)
{
    void *map;

    out->map = NULL;
    if (sim_map_node_file(node_path, SIM_TL_SUFFIX, sizeof(struct sim_tl_file), create,
                          header_init, header_ok, &period_ns, &map) != 0)
        return -1;
    out->map = map;
    return 0;
}

void sim_tl_close(struct sim_tl *tl)
{
    if (tl->map != NULL)
        munmap(tl->map, sizeof *tl->map);
    tl->map = NULL;
}

void sim_tl_attach(struct sim_tl *tl, int slot, int pid, int host_pid)
{
    struct sim_tl_file *f = tl->map;
    struct sim_tl_slot *s;
    unsigned int i;

    if (f == NULL || slot < 0 || slot >= SIM_TL_SLOTS)
        return;
    /* A record elsewhere with our pid is left from an earlier process with this pid. */
    for (i = 0; i < SIM_TL_SLOTS; i++) {
        if ((int)i != slot && LOAD(&f->slots[i].pid) == pid)
            STORE(&f->slots[i].pid, 0);
    }
    s = &f->slots[slot];
    STORE(&s->pid, 0);
    for (i = 0; i < SIM_MAX_GPUS; i++)
        STORE(&s->busy_ns[i], 0);
    STORE(&s->host_pid, host_pid);
    STORE(&s->pid, pid);
}

int sim_tl_host_pid(const struct sim_tl *tl, int pid)
{
    unsigned int i;

    if (tl->map == NULL)
        return pid;
    for (i = 0; i < SIM_TL_SLOTS; i++) {
        const struct sim_tl_slot *s = &tl->map->slots[i];
        if (LOAD(&s->pid) == pid) {
            int host = LOAD(&s->host_pid);
            return host > 0 ? host : pid;
        }
    }
    return pid;
}

/*
 * After a holder died mid-update: recomputes the totals from the lanes, so a half-done
 * update cannot leave the GPU looking busy (or full) for ever.
 */
static void repair(struct sim_tl_device *d)
{
    uint64_t total = 0;
    unsigned int i, k;

    for (i = 0; i < SIM_TL_LANES; i++) {
        struct sim_tl_lane *l = &d->lanes[i];
        uint64_t pending = 0;
        if (l->count > SIM_TL_LANE_DEPTH)
            l->count = SIM_TL_LANE_DEPTH;
        l->head %= SIM_TL_LANE_DEPTH;
        if (l->count > 0) {
            pending = l->head_left;
            for (k = 1; k < l->count; k++)
                pending += l->ring[(l->head + k) % SIM_TL_LANE_DEPTH];
        }
        l->pending_ns = pending;
        total += pending;
    }
    d->pending_ns = total;
}

/* Locks a GPU's record; a holder that died leaves it usable (robust mutex). */
static void dev_lock(struct sim_tl_device *d)
{
    int r = pthread_mutex_lock(&d->lock.mutex);

    if (r == EOWNERDEAD) {
        pthread_mutex_consistent(&d->lock.mutex);
        /* The dead writer may have left seq odd (mid-write); the repair is a write too. */
        if ((LOAD(&d->seq) & 1u) == 0)
            ADD(&d->seq, 1);
        repair(d);
        ADD(&d->seq, 1);
    }
}

static void dev_unlock(struct sim_tl_device *d)
{
    pthread_mutex_unlock(&d->lock.mutex);
}

static void begin_write(struct sim_tl_device *d)
{
    ADD(&d->seq, 1);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
}

static void end_write(struct sim_tl_device *d)
{
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    ADD(&d->seq, 1);
}

/* The ring entry of period p, reset if it still holds an older period. */
static struct sim_tl_period *period_for_write(struct sim_tl_device *d, uint64_t p)
{
    struct sim_tl_period *e = &d->periods[p % SIM_TL_PERIODS];

    if (e->epoch != p + 1) {
        memset(e, 0, sizeof *e);
        e->epoch = p + 1;
    }
    return e;
}

static void account(struct sim_tl_period *e, int slot, int host_pid, uint64_t ns)
{
    uint32_t i;

    e->busy_ns += ns;
    for (i = 0; i < e->proc_count; i++) {
        if (e->procs[i].slot == slot && e->procs[i].pid == host_pid) {
            e->procs[i].busy_ns += ns;
            return;
        }
    }
    if (e->proc_count < SIM_TL_PROCS) {
        e->procs[e->proc_count].pid = host_pid;
        e->procs[e->proc_count].slot = slot;
        e->procs[e->proc_count].busy_ns = ns;
        e->proc_count++;
    } else {
        e->dropped++;
    }
}

/* The lane to run next after the current one (round-robin), or NULL if none has work. */
static struct sim_tl_lane *next_lane(struct sim_tl_device *d)
{
    unsigned int i;

    for (i = 1; i <= SIM_TL_LANES; i++) {
        unsigned int l = (d->rr + i) % SIM_TL_LANES;
        if (d->lanes[l].count > 0) {
            d->rr = l;
            return &d->lanes[l];
        }
    }
    return NULL;
}

/*
 * Plays the schedule from sim_ns to now (lock held, inside a write): the running lane runs
 * its oldest kernel until the kernel ends, its slice ends or now is reached; a lane that ran
 * dry or used its slice hands over to the next lane with work.
 */
static void advance(struct sim_tl_file *f, unsigned int gpu, uint64_t now)
{
    struct sim_tl_device *d = &f->devices[gpu];
    uint64_t t = d->sim_ns, period = f->period_ns;

    if (t == 0 || t > now) {
        if (t == 0)
            d->sim_ns = now; /* nothing ever queued: nothing to play */
        return;          /* (t > now: the clock stepped back; wait for it) */
    }
    while (t < now && d->pending_ns > 0) {
        struct sim_tl_lane *l = &d->lanes[d->rr % SIM_TL_LANES];
        uint64_t run, stop;

        if (d->slice_left == 0 || l->count == 0) {
            l = next_lane(d);
            if (l == NULL)
                break;
            d->slice_left = f->slice_ns;
        }
        run = l->head_left < d->slice_left ? l->head_left : d->slice_left;
        if (run > now - t)
            run = now - t;
        for (stop = t + run; t < stop;) {
            uint64_t p = t / period;
            uint64_t end = (p + 1) * period < stop ? (p + 1) * period : stop;
            account(period_for_write(d, p), l->slot, l->host_pid, end - t);
            t = end;
        }
        if (l->slot >= 0 && l->slot < SIM_TL_SLOTS && LOAD(&f->slots[l->slot].pid) == l->owner)
            ADD(&f->slots[l->slot].busy_ns[gpu], run);
        l->head_left -= run;
        l->pending_ns -= run;
        d->pending_ns -= run;
        d->busy_total_ns += run;
        d->slice_left -= run;
        if (l->head_left == 0) {
            l->head = (l->head + 1) % SIM_TL_LANE_DEPTH;
            l->count--;
            STORE(&l->done, l->done + 1);
            d->last_end_ns = t;
            if (l->count > 0)
                l->head_left = l->ring[l->head];
        }
    }
    d->sim_ns = now;
}

/* The lane of the process (slot, owner), claiming an empty one if it has none; NULL if every
 * lane has another process's work. */
static struct sim_tl_lane *lane_of(struct sim_tl_device *d, int slot, int owner, int host_pid)
{
    struct sim_tl_lane *empty = NULL;
    unsigned int i;

    for (i = 0; i < SIM_TL_LANES; i++) {
        struct sim_tl_lane *l = &d->lanes[i];
        if (l->owner == owner && l->slot == slot)
            return l;
        if (empty == NULL && l->count == 0)
            empty = l;
    }
    if (empty != NULL) {
        empty->slot = slot;
        empty->owner = owner;
        empty->host_pid = host_pid;
    }
    return empty;
}

uint64_t sim_tl_enqueue(struct sim_tl *tl, unsigned int gpu, int slot, int owner, int host_pid,
                        uint64_t duration_ns, uint64_t now_ns, struct sim_tl_mark *mark)
{
    struct sim_tl_file *f = tl->map;
    struct sim_tl_device *d;
    struct sim_tl_lane *l;
    uint64_t retry = 0;

    mark->seq = 0; /* nothing queued */
    if (gpu >= SIM_MAX_GPUS || duration_ns == 0)
        return 0;
    if (duration_ns > f->horizon_ns)
        duration_ns = f->horizon_ns;
    d = &f->devices[gpu];
    dev_lock(d);
    begin_write(d);
    advance(f, gpu, now_ns);
    l = lane_of(d, slot, owner, host_pid);
    if (l == NULL) {
        retry = now_ns + f->slice_ns; /* a lane frees when its process's work is done */
    } else if (l->pending_ns + duration_ns > f->horizon_ns) {
        /* The horizon bounds each process's pending work, not the GPU's: as on a real GPU, where
         * each context has its own channel, another process's deep queue never blocks a launch.
         * A lane drains at one ns per ns at best. */
        retry = now_ns + (l->pending_ns + duration_ns - f->horizon_ns);
    } else if (l->count == SIM_TL_LANE_DEPTH) {
        retry = now_ns + l->head_left;
    } else {
        l->ring[(l->head + l->count) % SIM_TL_LANE_DEPTH] = duration_ns;
        if (l->count == 0)
            l->head_left = duration_ns;
        l->count++;
        l->pending_ns += duration_ns;
        STORE(&l->queued, l->queued + 1);
        d->pending_ns += duration_ns;
        d->queued_ns += duration_ns;
        d->kernels++;
        if (d->sim_ns < now_ns)
            d->sim_ns = now_ns;
        mark->gpu = gpu;
        mark->lane = (int32_t)(l - d->lanes);
        mark->seq = l->queued;
    }
    end_write(d);
    dev_unlock(d);
    return retry;
}

bool sim_tl_is_done(const struct sim_tl *tl, const struct sim_tl_mark *mark)
{
    if (tl->map == NULL || mark->seq == 0 || mark->gpu >= SIM_MAX_GPUS || mark->lane < 0 ||
        mark->lane >= SIM_TL_LANES)
        return true;
    return LOAD(&tl->map->devices[mark->gpu].lanes[mark->lane].done) >= mark->seq;
}

uint64_t sim_tl_wait_hint(struct sim_tl *tl, const struct sim_tl_mark *mark, uint64_t now_ns)
{
    struct sim_tl_device *d;
    struct sim_tl_lane *l;
    uint64_t left, k;

    if (sim_tl_is_done(tl, mark))
        return 0;
    d = &tl->map->devices[mark->gpu];
    l = &d->lanes[mark->lane];
    dev_lock(d);
    begin_write(d);
    advance(tl->map, mark->gpu, now_ns);
    end_write(d);
    if (l->done >= mark->seq) {
        dev_unlock(d);
        return 0;
    }
    /* The lane's work up to the mark, if it had the GPU to itself. */
    left = l->head_left;
    for (k = l->done + 2; k <= mark->seq; k++)
        left += l->ring[(l->head + (k - l->done - 1)) % SIM_TL_LANE_DEPTH];
    dev_unlock(d);
    return now_ns + (left > 0 ? left : 1);
}

/* The entry of period p if it was recorded and is still in the ring. */
static const struct sim_tl_period *period_for_read(const struct sim_tl_device *d, uint64_t p)
{
    const struct sim_tl_period *e = &d->periods[p % SIM_TL_PERIODS];

    return e->epoch == p + 1 ? e : NULL;
}

/* GPU gpu's device, locked and brought up to now for reading its periods; NULL if there is none. */
static struct sim_tl_device *lock_current(struct sim_tl *tl, unsigned int gpu)
{
    struct sim_tl_device *d;

    if (tl->map == NULL || gpu >= SIM_MAX_GPUS)
        return NULL;
    d = &tl->map->devices[gpu];
    dev_lock(d);
    begin_write(d);
    advance(tl->map, gpu, sim_tl_now_ns());
    end_write(d);
    return d;
}

uint64_t sim_tl_device_busy(struct sim_tl *tl, unsigned int gpu, uint64_t from, uint64_t to)
{
    struct sim_tl_device *d;
    uint64_t p, busy = 0;

    d = lock_current(tl, gpu);
    if (d == NULL)
        return 0;
    for (p = from; p < to; p++) {
        const struct sim_tl_period *e = period_for_read(d, p);
        if (e != NULL)
            busy += e->busy_ns;
    }
    dev_unlock(d);
    return busy;
}

void sim_tl_for_each_sample(struct sim_tl *tl, unsigned int gpu, uint64_t from, uint64_t to,
                            void (*fn)(uint64_t period, int pid, uint64_t busy_ns, void *arg),
                            void *arg)
{
    struct sim_tl_device *d;
    uint64_t p;
    uint32_t i;

    d = lock_current(tl, gpu);
    if (d == NULL)
        return;
    for (p = from; p < to; p++) {
        const struct sim_tl_period *e = period_for_read(d, p);
        if (e == NULL)
            continue;
        for (i = 0; i < e->proc_count && i < SIM_TL_PROCS; i++) {
            if (e->procs[i].busy_ns > 0)
                fn(p, e->procs[i].pid, e->procs[i].busy_ns, arg);
        }
    }
    dev_unlock(d);
}

const struct sim_tl_mark *sim_tl_queue_full(const struct sim_tl *tl, struct sim_tl_queue *q)
{
    while (q->count > 0 && sim_tl_is_done(tl, &q->pending[q->head])) {
        q->head = (q->head + 1) % SIM_TL_STREAM_DEPTH;
        q->count--;
    }
    return q->count < SIM_TL_STREAM_DEPTH ? NULL : &q->pending[q->head];
}

void sim_tl_queue_push(struct sim_tl_queue *q, const struct sim_tl_mark *mark)
{
    q->pending[(q->head + q->count) % SIM_TL_STREAM_DEPTH] = *mark;
    q->count++;
    q->last = *mark;
}
