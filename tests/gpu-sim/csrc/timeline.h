/*
 * The kernel time model of a simulated node: one device timeline per GPU,
 * shared by every process of the node, from which NVML utilisation is
 * computed. The rules are in tests/gpu-sim/README.md ("Kernel time model").
 *
 * Scheduling (as on a GPU without MPS): every process with pending work on a
 * GPU has a *lane* (its kernels in launch order, whatever the stream); the GPU
 * runs one lane at a time, round-robin between the lanes that have work, for a
 * time slice of SIM_TL_SLICE_NS (or until the lane runs dry), preempting a
 * kernel at the end of a slice. A kernel is never split between processes, so
 * busy time = the sum of the durations run.
 *
 * The simulation is lazy and exact: the record holds what is queued and the
 * time sim_ns up to which the schedule has been played; whoever touches the GPU
 * (a launch, a synchronisation, an NVML query) first plays it forward to now
 * under the lock, accounting busy time into sample periods. Nothing depends on
 * when that happens, since work only arrives at the present.
 *
 * It lives in "<node file>.timeline", created by the first cuInit (under
 * flock) and mapped MAP_SHARED by every process using the fake libcuda.so.1 or
 * the fake NVML. Times are CLOCK_REALTIME nanoseconds.
 *
 *   offset   size            field
 *   0        8               magic "GPUSIMTL"
 *   8        4               version (1)
 *   12       4               header size (64): devices[] starts here
 *   16       4               max GPUs (128)
 *   20       4               slots (256, the .cuda-state slot count)
 *   24       4               device record size (334912)
 *   28       4               slot record size (1040)
 *   32       4               periods per device ring (256)
 *   36       4               processes per period (16)
 *   40       8               period_ns (sample period)
 *   48       8               horizon_ns (most pending work per process and GPU)
 *   56       8               slice_ns (time slice)
 *   64       128 x struct sim_tl_device
 *   42868800 256 x struct sim_tl_slot
 *   43135040 end of file (sparse: untouched GPUs take no disk)
 *
 * Per GPU, a robust process-shared mutex guards the record: a process killed
 * while holding it cannot wedge the others (the next locker gets EOWNERDEAD,
 * marks it consistent, recomputes the pending totals from the lanes and carries
 * on; the record may then miss that one update). Writers also bump `seq` to odd before and to even after changing
 * anything, so a lock-free reader (the Rust helpers) can take a consistent copy
 * by retrying until it reads the same even seq before and after.
 *
 * Period p (p = floor(t / period_ns)) is kept in periods[p % 256] with
 * epoch = p + 1 (0: never used); a stale entry (epoch != p + 1) means nothing
 * ran in p.
 */
#ifndef GPU_SIM_TIMELINE_H
#define GPU_SIM_TIMELINE_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#include "sim_node.h"

#define SIM_TL_SUFFIX ".timeline"
#define SIM_TL_MAGIC "GPUSIMTL"
#define SIM_TL_VERSION 1u
#define SIM_TL_SLOTS 256
#define SIM_TL_PERIODS 256
#define SIM_TL_PROCS 16
/* A process's pending work on a GPU is at most min(SIM_TL_HORIZON_MAX_NS,
 * SIM_TL_HORIZON_PERIODS periods) (its launch blocks beyond; other processes' launches do not);
 * a single kernel lasts at most that long. */
#define SIM_TL_HORIZON_PERIODS 64u
#define SIM_TL_HORIZON_MAX_NS 4000000000ull
/* Periods that stay readable behind the current one. */
#define SIM_TL_HISTORY (SIM_TL_PERIODS - SIM_TL_HORIZON_PERIODS - 2u)
/* Pending kernels per stream before a launch blocks (the driver's launch queue). */
#define SIM_TL_STREAM_DEPTH 1024u
/* Processes with pending work per GPU, and pending kernels per process and GPU. */
#define SIM_TL_LANES 16
#define SIM_TL_LANE_DEPTH 2048u
/* Time slice between processes. */
#define SIM_TL_SLICE_NS 2000000ull

#define SIM_TL_DEFAULT_PERIOD_NS 166666667ull
#define SIM_TL_MIN_PERIOD_NS 10000000ull
#define SIM_TL_MAX_PERIOD_NS 1000000000ull

struct sim_tl_proc {
    int32_t pid;              /* the pid NVML reports (host pid) */
    int32_t slot;             /* .cuda-state slot of the process */
    uint64_t busy_ns;         /* its kernels' time in this period */
};

struct sim_tl_period {
    uint64_t epoch;           /* period index + 1; 0 never used */
    uint64_t busy_ns;         /* the GPU's busy time in this period */
    uint32_t proc_count;      /* used entries of procs[] */
    uint32_t dropped;         /* processes beyond SIM_TL_PROCS (counted in busy_ns only) */
    struct sim_tl_proc procs[SIM_TL_PROCS];
};

/* The pending kernels of one process on one GPU. Free when empty: another process may then
 * claim it (done and queued keep counting, so a finished process's marks stay valid). */
struct sim_tl_lane {
    int32_t slot;             /* .cuda-state slot of the owner */
    int32_t host_pid;         /* the pid NVML reports for the owner */
    int32_t owner;            /* the owner's getpid() (0: never used) */
    uint32_t head, count;     /* ring[] of pending durations, oldest first */
    uint32_t reserved;
    uint64_t done;            /* kernels completed (sequence number of the last one) */
    uint64_t queued;          /* kernels queued (sequence number of the last one) */
    uint64_t head_left;       /* what is left to run of the oldest pending kernel */
    uint64_t pending_ns;      /* what is left to run of all of them */
    uint64_t ring[SIM_TL_LANE_DEPTH];
};

struct sim_tl_device {
    union {
        pthread_mutex_t mutex;
        uint8_t pad[64];
    } lock;
    uint64_t seq;             /* odd while a writer changes the record */
    uint64_t sim_ns;          /* the schedule has been played up to here (0: never) */
    uint64_t busy_total_ns;   /* kernel time run so far */
    uint64_t kernels;         /* kernels (and graphs with a duration) queued */
    uint64_t queued_ns;       /* kernel time queued so far */
    uint64_t pending_ns;      /* kernel time queued and not run yet */
    uint64_t last_end_ns;     /* when the last kernel completed (0: none yet) */
    uint32_t rr;              /* the lane running (or that ran last) */
    uint32_t reserved0;
    uint64_t slice_left;      /* of the running lane's time slice; 0: pick the next lane */
    uint64_t reserved[7];
    struct sim_tl_lane lanes[SIM_TL_LANES];
    struct sim_tl_period periods[SIM_TL_PERIODS];
};

struct sim_tl_slot {
    int32_t pid;              /* owner (getpid()); 0 free. Valid while it matches the
                                 .cuda-state slot's pid */
    int32_t host_pid;         /* the pid NVML reports for it */
    uint64_t reserved;
    uint64_t busy_ns[SIM_MAX_GPUS]; /* kernel time run per GPU, cumulative */
};

struct sim_tl_file {
    char magic[8];
    uint32_t version;
    uint32_t header_size;
    uint32_t max_gpus;
    uint32_t slot_count;
    uint32_t device_size;
    uint32_t slot_size;
    uint32_t period_count;
    uint32_t procs_per_period;
    uint64_t period_ns;
    uint64_t horizon_ns;
    uint64_t slice_ns;
    struct sim_tl_device devices[SIM_MAX_GPUS];
    struct sim_tl_slot slots[SIM_TL_SLOTS];
};

_Static_assert(sizeof(pthread_mutex_t) <= 64, "pthread_mutex_t fits");
_Static_assert(sizeof(struct sim_tl_proc) == 16, "sim_tl_proc size");
_Static_assert(sizeof(struct sim_tl_period) == 280, "sim_tl_period size");
_Static_assert(sizeof(struct sim_tl_lane) == 16440, "sim_tl_lane size");
_Static_assert(__builtin_offsetof(struct sim_tl_device, lanes) == 192, "lanes offset");
_Static_assert(sizeof(struct sim_tl_device) == 334912, "sim_tl_device size");
_Static_assert(sizeof(struct sim_tl_slot) == 1040, "sim_tl_slot size");
_Static_assert(__builtin_offsetof(struct sim_tl_file, devices) == 64, "devices offset");
_Static_assert(__builtin_offsetof(struct sim_tl_file, slots) == 42868800, "slots offset");
_Static_assert(sizeof(struct sim_tl_file) == 43135040, "sim_tl_file size");

struct sim_tl {
    struct sim_tl_file *map;
};

/* CLOCK_REALTIME in nanoseconds. */
uint64_t sim_tl_now_ns(void);

/* Sleeps until CLOCK_REALTIME reaches deadline_ns (returns at once if it has). */
void sim_tl_sleep_until(uint64_t deadline_ns);

/*
 * Maps "<node_path>.timeline". With create, makes and initialises it with
 * period_ns if it does not exist (an existing file keeps its period). Returns 0,
 * or -1 with errno set (ENOENT when !create and there is none; EINVAL if it is
 * not a timeline of this version).
 */
int sim_tl_open(const char *node_path, bool create, uint64_t period_ns, struct sim_tl *out);

void sim_tl_close(struct sim_tl *tl);

/* Records that slot now belongs to pid, reported to NVML as host_pid; resets its counters. */
void sim_tl_attach(struct sim_tl *tl, int slot, int pid, int host_pid);

/* The pid NVML reports for the process pid (pid itself if it has no record). */
int sim_tl_host_pid(const struct sim_tl *tl, int pid);

/* A queued kernel: done once lanes[lane].done >= seq on that GPU. seq 0: nothing. */
struct sim_tl_mark {
    uint32_t gpu;
    int32_t lane;
    uint64_t seq;
};

/*
 * Queues duration_ns of work on gpu for the process in slot (getpid() owner, reported as
 * host_pid), after playing the schedule to now_ns. Returns 0 and sets *mark, or queues
 * nothing and returns a time (> 0) to retry at: this process already has a horizon of
 * pending work on the GPU, or SIM_TL_LANE_DEPTH kernels, or SIM_TL_LANES other processes have
 * pending work.
 */
uint64_t sim_tl_enqueue(struct sim_tl *tl, unsigned int gpu, int slot, int owner, int host_pid,
                        uint64_t duration_ns, uint64_t now_ns, struct sim_tl_mark *mark);

/*
 * Plays gpu's schedule to now_ns; returns 0 if the kernel of mark has completed, else the
 * earliest time it can (it may take longer if other processes get time slices meanwhile).
 */
uint64_t sim_tl_wait_hint(struct sim_tl *tl, const struct sim_tl_mark *mark, uint64_t now_ns);

/* Whether the kernel of mark has completed, as far as the schedule has been played. */
bool sim_tl_is_done(const struct sim_tl *tl, const struct sim_tl_mark *mark);

/* Busy ns of gpu in periods [from, to) (stale or overwritten periods count 0), after playing
 * the schedule to now. */
uint64_t sim_tl_device_busy(struct sim_tl *tl, unsigned int gpu, uint64_t from, uint64_t to);

/*
 * Calls fn(period, pid, busy_ns, arg) for each process that ran on gpu in the periods
 * [from, to), oldest period first, under the GPU's lock, after playing the schedule to now.
 */
void sim_tl_for_each_sample(struct sim_tl *tl, unsigned int gpu, uint64_t from, uint64_t to,
                            void (*fn)(uint64_t period, int pid, uint64_t busy_ns, void *arg),
                            void *arg);

/*
 * One stream's pending kernels in one process (the driver's launch queue), oldest first,
 * and the last one queued.
 */
struct sim_tl_queue {
    struct sim_tl_mark pending[SIM_TL_STREAM_DEPTH];
    unsigned int head, count;
    struct sim_tl_mark last;
};

/* Forgets completed kernels; returns NULL if one more fits, else the oldest pending one. */
const struct sim_tl_mark *sim_tl_queue_full(const struct sim_tl *tl, struct sim_tl_queue *q);

/* Records a queued kernel (after sim_tl_queue_full said it fits). */
void sim_tl_queue_push(struct sim_tl_queue *q, const struct sim_tl_mark *mark);

#endif /* GPU_SIM_TIMELINE_H */
