/*
 * Device state shared by every process on a simulated node: how much memory
 * each GPU has handed out, to which process, and how many kernels ran on it.
 *
 * It lives in a small binary file next to the node file,
 * "<node file>.cuda-state", mapped MAP_SHARED by every process that uses the
 * fake libcuda.so.1 (which creates it) or the fake NVML (which only reads and
 * reaps it). Counters are updated with __atomic builtins, so there is no lock
 * a dying process could leave held.
 *
 *   offset  size   field
 *   0       8      magic "GPUSIMST"
 *   8       4      version (1)
 *   12      4      header size in bytes (64): devices[] starts here
 *   16      4      max GPUs (SIM_MAX_GPUS = 128)
 *   20      4      slots (SIM_STATE_SLOTS = 256)
 *   24      4      device record size (64)
 *   28      4      slot record size (1040)
 *   32      32     reserved (0)
 *   64      128 x struct sim_state_device       (indexed by node-file GPU index)
 *   8256    256 x struct sim_state_slot         (one per process)
 *   274496         end of file
 *
 * All integers are little-endian x86_64 native. Invariant (outside the short
 * window of an update): devices[g].used_bytes == sum over slots of
 * slots[s].used[g]. used_bytes covers only what processes allocated through
 * the fake driver; the node file's reserved/used/process memory comes on top.
 *
 * A slot belongs to the process whose pid is in it (0 = free). A process takes
 * a slot when it initialises, returns its memory when it exits normally (a
 * destructor), and the memory of a process that died without exiting
 * (SIGKILL) is reclaimed by whichever process next notices that the pid is
 * gone (kill(pid, 0) fails with ESRCH, or /proc/<pid>/stat shows a zombie: an
 * exited process its parent has not waited for, whose memory the kernel driver
 * has already freed): it swaps the pid for -pid, moves the slot's bytes out of
 * the device counters and frees the slot. Pid reuse
 * before that happens is not detected (the slot then looks alive).
 */
#ifndef GPU_SIM_SIM_STATE_H
#define GPU_SIM_SIM_STATE_H

#include <stdbool.h>
#include <stdint.h>

#include "sim_node.h"

#define SIM_STATE_SUFFIX ".cuda-state"
#define SIM_STATE_MAGIC "GPUSIMST"
#define SIM_STATE_VERSION 1u
#define SIM_STATE_SLOTS 256

struct sim_state_device {
    uint64_t used_bytes;      /* device memory held by all processes through the driver */
    uint64_t launches;        /* kernel launches (cuLaunchKernel*, cuLaunchCooperativeKernel*) */
    uint64_t blocks;          /* thread blocks launched (grid x*y*z summed) */
    uint64_t graph_launches;  /* cuGraphLaunch* */
    uint64_t managed_bytes;   /* cuMemAllocManaged bytes live (host-backed, not in used_bytes) */
    uint64_t reserved[3];
};

struct sim_state_slot {
    int32_t pid;              /* owner; 0 free; negative while being reclaimed */
    uint32_t reserved0;
    uint64_t reserved1;
    uint64_t used[SIM_MAX_GPUS]; /* bytes this process holds on each GPU */
};

struct sim_state_file {
    char magic[8];
    uint32_t version;
    uint32_t header_size;
    uint32_t max_gpus;
    uint32_t slot_count;
    uint32_t device_size;
    uint32_t slot_size;
    uint64_t reserved[4];
    struct sim_state_device devices[SIM_MAX_GPUS];
    struct sim_state_slot slots[SIM_STATE_SLOTS];
};

_Static_assert(sizeof(struct sim_state_device) == 64, "sim_state_device size");
_Static_assert(sizeof(struct sim_state_slot) == 1040, "sim_state_slot size");
_Static_assert(__builtin_offsetof(struct sim_state_file, devices) == 64, "devices offset");
_Static_assert(__builtin_offsetof(struct sim_state_file, slots) == 8256, "slots offset");
_Static_assert(sizeof(struct sim_state_file) == 274496, "sim_state_file size");

struct sim_state {
    struct sim_state_file *map;
    int slot;                 /* our slot, -1 if none */
    int owner_pid;            /* the pid that took the slot (a forked child is not it) */
};

/*
 * Maps "<node_path>.cuda-state". With create, makes and initialises the file
 * if it does not exist (under flock, so concurrent creators agree). Returns 0,
 * or -1 with errno set (ENOENT when !create and there is no file; EINVAL if the
 * file is not a state file of this version).
 */
int sim_state_open(const char *node_path, bool create, struct sim_state *out);

/* Unmaps (without giving back the slot). */
void sim_state_close(struct sim_state *st);

/*
 * The calling process's PID as the driver knows it: its host PID. With GPU_SIM_HOST_PROC naming the
 * host's /proc mounted in a container (a PID namespace of its own), read from there; otherwise
 * getpid(). Slots, liveness checks and NVML all use this PID, so processes of different containers
 * never share an identity, as on a real node.
 */
int sim_self_pid(void);

/* Takes a slot for the calling process. Returns false if all slots are in use. */
bool sim_state_attach(struct sim_state *st);

/* Returns this process's memory and frees its slot (normal exit). */
void sim_state_detach(struct sim_state *st);

/* Reclaims the slots of processes that no longer exist. Returns how many. */
unsigned int sim_state_reap(struct sim_state *st);

/*
 * Adds bytes to GPU gpu for this process if the device's driver-allocated
 * total stays within capacity; otherwise reaps dead processes, tries once
 * more and returns false without changing anything.
 */
bool sim_state_charge(struct sim_state *st, unsigned int gpu, uint64_t bytes, uint64_t capacity);

/* Gives back bytes charged earlier by this process. */
void sim_state_uncharge(struct sim_state *st, unsigned int gpu, uint64_t bytes);

/* Memory all processes hold on a GPU through the driver. */
uint64_t sim_state_used(const struct sim_state *st, unsigned int gpu);

/*
 * Managed memory (cuMemAllocManaged) attached to a GPU, node-wide. It is host
 * memory until the device touches it (the simulator runs no kernels), so it is
 * not device memory in use and never limited by capacity: only counted, for
 * tests and NVML-side queries. Not reaped when a process dies (informational).
 */
void sim_state_add_managed(struct sim_state *st, unsigned int gpu, uint64_t bytes);
void sim_state_sub_managed(struct sim_state *st, unsigned int gpu, uint64_t bytes);

/* Counts a launch of `blocks` thread blocks (graph: a graph launch). */
void sim_state_count_launch(struct sim_state *st, unsigned int gpu, uint64_t blocks, bool graph);

/*
 * Processes holding memory on a GPU: calls fn(pid, bytes, arg) for every live
 * slot with used[gpu] > 0, in slot order.
 */
void sim_state_for_each_process(const struct sim_state *st, unsigned int gpu,
                                void (*fn)(int pid, uint64_t bytes, void *arg), void *arg);

#endif /* GPU_SIM_SIM_STATE_H */
