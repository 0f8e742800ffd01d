/* HAMi-core v1.2 shared-region typedefs, reproduced from docs/hami-core-region.md §3.2
 * (src/multiprocess/multiprocess_memory_limit.h at HAMi-core 8f3a89c, MAJOR 1 / MINOR 2),
 * for the layout test only. */
#ifndef HAMI_CORE_V1_2_H
#define HAMI_CORE_V1_2_H

#include <semaphore.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#define MULTIPROCESS_SHARED_REGION_MAGIC_FLAG 19920718
#define CUDA_DEVICE_MAX_COUNT 16
#define SHARED_REGION_MAX_PROCESS_NUM 1024
#define MAJOR_VERSION 1
#define MINOR_VERSION 2
#define FACTOR 32

typedef struct {
    _Atomic uint64_t context_size;
    _Atomic uint64_t module_size;
    _Atomic uint64_t data_size;
    _Atomic uint64_t offset;
    _Atomic uint64_t total;
    uint64_t unused[3];
} device_memory_t;

typedef struct {
    _Atomic uint64_t dec_util;
    _Atomic uint64_t enc_util;
    _Atomic uint64_t sm_util;
    uint64_t unused[3];
} device_util_t;

typedef struct {
    _Atomic int32_t pid;
    _Atomic int32_t hostpid;
    device_memory_t used[CUDA_DEVICE_MAX_COUNT];
    _Atomic uint64_t monitorused[CUDA_DEVICE_MAX_COUNT];
    device_util_t device_util[CUDA_DEVICE_MAX_COUNT];
    _Atomic int32_t status;
    _Atomic uint64_t seqlock;
    uint64_t unused[2];
} shrreg_proc_slot_t;

typedef char uuid[96];

typedef struct {
    _Atomic int32_t initialized_flag;
    uint32_t major_version;
    uint32_t minor_version;
    _Atomic int32_t sm_init_flag;
    _Atomic size_t owner_pid;
    sem_t sem;
    uint64_t device_num;
    uuid uuids[CUDA_DEVICE_MAX_COUNT];
    uint64_t limit[CUDA_DEVICE_MAX_COUNT];
    uint64_t sm_limit[CUDA_DEVICE_MAX_COUNT];
    shrreg_proc_slot_t procs[SHARED_REGION_MAX_PROCESS_NUM];
    _Atomic int proc_num;
    _Atomic int utilization_switch;
    _Atomic int recent_kernel;
    int priority;
    _Atomic uint64_t last_kernel_time;
    sem_t sem_postinit;
} shared_region_t;

#endif
