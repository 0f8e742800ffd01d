/*
 * The fake libnvidia-ml.so.1: NVML's C ABI on top of the simulated node.
 *
 * Behaviour follows NVIDIA's documentation and the real library where they
 * matter to a caller: reference-counted init, the order of argument checks,
 * NVML_ERROR_INSUFFICIENT_SIZE conventions, versioned structs, GPU_IS_LOST for
 * a GPU that fell off the bus. One mutex serialises every entry point; the
 * only blocking call (nvmlEventSetWait*) drops it while sleeping.
 *
 * Only the functions declared in nvml_api.h are exported (the library is built
 * with -fvisibility=hidden). Anything else a caller looks up is simply absent,
 * as with an old driver: dlsym fails and wrappers report "function not found".
 */
#define _GNU_SOURCE
#pragma GCC visibility push(default)
#include "nvml_api.h"
#pragma GCC visibility pop

#include "sim_node.h"
#include "sim_state.h"
#include "timeline.h"

#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* How often nvmlEventSetWait looks at the control log while it waits. */
#define EVENT_POLL_NS (5ull * 1000ull * 1000ull)

/* A device handle points at one of these; the index is the NVML index. */
struct nvmlDevice_st {
    unsigned int index;
};

struct nvmlEventSet_st {
    struct nvmlEventSet_st *next;
    /* Sequence number (index into sim_node.events) of the next event to examine.
     * Starts at the number of events that existed when the set was created, so
     * a set only sees events injected after it was created. */
    size_t cursor;
    /* Event types registered per GPU, and from which sequence number on each
     * kind counts (events before a registration are not delivered). */
    unsigned long long mask[SIM_MAX_GPUS];
    size_t since[SIM_MAX_GPUS][SIM_EVENT_KIND_COUNT];
};

static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static unsigned int g_init_count;            /* nvmlInit calls minus nvmlShutdown calls */
static struct sim_node *g_node;              /* non-NULL exactly when g_init_count > 0 */
static struct nvmlDevice_st g_devices[SIM_MAX_GPUS];
static struct nvmlEventSet_st *g_sets;       /* every live event set */
static struct sim_state g_cuda;              /* the node's CUDA device state, once it exists */
static struct sim_tl g_tl;                   /* the node's kernel timelines, once they exist */
/* GPU_SIM_NVML_NO_V3=1 (read at init): the _v3 process queries answer FUNCTION_NOT_FOUND, as a
 * library whose driver predates them does, so a caller's fallback to _v2 can be exercised. */
static bool g_no_v3;

static const unsigned long long kind_bits[SIM_EVENT_KIND_COUNT] = {
    [SIM_EVENT_XID] = nvmlEventTypeXidCriticalError,
    [SIM_EVENT_ECC_DBE] = nvmlEventTypeDoubleBitEccError,
    [SIM_EVENT_ECC_SBE] = nvmlEventTypeSingleBitEccError,
};

static void lock(void)
{
    pthread_mutex_lock(&g_lock);
}

static void unlock(void)
{
    pthread_mutex_unlock(&g_lock);
}

/* NVML index of a handle, or -1 if it is not one of ours (lock held, initialised). */
static int device_index(nvmlDevice_t device)
{
    uintptr_t p = (uintptr_t)device;
    uintptr_t base = (uintptr_t)g_devices;
    uintptr_t offset;

    if (device == NULL || p < base)
        return -1;
    offset = p - base;
    if (offset % sizeof g_devices[0] != 0)
        return -1;
    if (offset / sizeof g_devices[0] >= g_node->gpu_count)
        return -1;
    return (int)(offset / sizeof g_devices[0]);
}

/*
 * The common preamble of a device query (lock held). Order as in NVML:
 * initialised, then arguments (handle and output pointers), then the GPU's
 * state. The control log is re-read here, so a "fail" appended by any process
 * is seen by the next query.
 */
static nvmlReturn_t use_device(nvmlDevice_t device, int args_ok, struct sim_gpu **gpu)
{
    int index;

    if (g_init_count == 0)
        return NVML_ERROR_UNINITIALIZED;
    index = device_index(device);
    if (index < 0 || !args_ok)
        return NVML_ERROR_INVALID_ARGUMENT;
    sim_node_sync(g_node);
    *gpu = &g_node->gpus[index];
    if ((*gpu)->failed)
        return NVML_ERROR_GPU_IS_LOST;
    return NVML_SUCCESS;
}

/*
 * The node's CUDA device state (lock held), with processes that died reclaimed first, as
 * the driver does. The state file appears when the first CUDA process initialises, so it
 * is looked for on every query until found; false while there is none.
 */
static bool cuda_state_ready(void)
{
    if (g_cuda.map == NULL && sim_state_open(g_node->node_path, false, &g_cuda) != 0)
        return false;
    sim_state_reap(&g_cuda);
    return true;
}

/* Memory processes hold through the fake libcuda.so.1 on this GPU (lock held). */
static unsigned long long cuda_used_bytes(const struct sim_gpu *gpu)
{
    if (!cuda_state_ready())
        return 0;
    return sim_state_used(&g_cuda, (unsigned int)(gpu - g_node->gpus));
}

/* NVML writes nothing when the buffer is too small; length counts the NUL. */
static nvmlReturn_t copy_string(char *dst, unsigned int length, const char *src)
{
    size_t n = strlen(src);

    if ((size_t)length < n + 1)
        return NVML_ERROR_INSUFFICIENT_SIZE;
    memcpy(dst, src, n + 1);
    return NVML_SUCCESS;
}

static unsigned long long supported_events(const struct sim_gpu *gpu)
{
    unsigned long long mask;

    if (!gpu->events)
        return 0;
    /* What a datacenter GPU reports; P-state and clock events never fire here. */
    mask = nvmlEventTypePState | nvmlEventTypeXidCriticalError | nvmlEventTypeClock;
    if (gpu->ecc)
        mask |= nvmlEventTypeSingleBitEccError | nvmlEventTypeDoubleBitEccError;
    return mask;
}

static void free_all_sets(void)
{
    while (g_sets != NULL) {
        struct nvmlEventSet_st *next = g_sets->next;
        free(g_sets);
        g_sets = next;
    }
}

static int set_is_live(nvmlEventSet_t set)
{
    struct nvmlEventSet_st *s;

    for (s = g_sets; s != NULL; s = s->next) {
        if (s == set)
            return 1;
    }
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Initialisation                                                            */
/* ------------------------------------------------------------------------ */

/* GPU_SIM_NVML_NO_V3: unset, empty or "0" off, "1" on; anything else is a test bug: one line on
 * stderr and false. */
static bool read_no_v3(bool *out)
{
    const char *v = getenv("GPU_SIM_NVML_NO_V3");

    *out = v != NULL && strcmp(v, "1") == 0;
    if (v == NULL || v[0] == '\0' || strcmp(v, "0") == 0 || strcmp(v, "1") == 0)
        return true;
    fprintf(stderr, "gpu-sim: bad GPU_SIM_NVML_NO_V3 '%s': expected 0 or 1\n", v);
    return false;
}

static nvmlReturn_t init_with_flags(unsigned int flags)
{
    struct sim_node *node = NULL;
    nvmlReturn_t ret = NVML_SUCCESS;
    bool no_v3 = false;
    unsigned int i;

    lock();
    if (g_init_count > 0) {
        /* Already initialised: NVML only counts (shutdown happens at zero). */
        g_init_count++;
        unlock();
        return NVML_SUCCESS;
    }
    switch (sim_node_load_from_env(&node)) {
    case SIM_LOAD_OK:
        break;
    case SIM_LOAD_NO_NODE:
        /* What a machine without the NVIDIA kernel module answers; silent like NVML. */
        ret = NVML_ERROR_DRIVER_NOT_LOADED;
        break;
    case SIM_LOAD_INVALID:
        ret = NVML_ERROR_UNKNOWN; /* the parser already said why on stderr */
        break;
    case SIM_LOAD_NO_MEMORY:
        ret = NVML_ERROR_MEMORY;
        break;
    }
    if (ret == NVML_SUCCESS && !read_no_v3(&no_v3)) {
        sim_node_free(node);
        ret = NVML_ERROR_UNKNOWN;
    }
    if (ret == NVML_SUCCESS && node->gpu_count == 0 && !(flags & NVML_INIT_FLAG_NO_GPUS)) {
        /* "NVML_INIT_FLAG_NO_GPUS: Don't fail nvmlInit() when no GPUs are found." */
        sim_node_free(node);
        ret = NVML_ERROR_GPU_NOT_FOUND;
    }
    if (ret == NVML_SUCCESS) {
        for (i = 0; i < node->gpu_count; i++)
            g_devices[i].index = i;
        g_node = node;
        g_no_v3 = no_v3;
        g_init_count = 1;
    }
    unlock();
    return ret;
}

/* nvmlInit is the pre-5.319 name; today's header maps it to nvmlInit_v2. */
nvmlReturn_t nvmlInit(void)
{
    return init_with_flags(0);
}

nvmlReturn_t nvmlInit_v2(void)
{
    return init_with_flags(0);
}

/* NO_ATTACH only changes when real NVML talks to the GPUs; nothing to attach here. */
nvmlReturn_t nvmlInitWithFlags(unsigned int flags)
{
    return init_with_flags(flags);
}

nvmlReturn_t nvmlShutdown(void)
{
    lock();
    if (g_init_count == 0) {
        unlock();
        return NVML_ERROR_UNINITIALIZED;
    }
    if (--g_init_count == 0) {
        /* Event sets die with the library state; freeing one later answers
         * UNINITIALIZED (or INVALID_ARGUMENT after a new init). */
        free_all_sets();
        sim_state_close(&g_cuda);
        sim_tl_close(&g_tl);
        sim_node_free(g_node);
        g_node = NULL;
    }
    unlock();
    return NVML_SUCCESS;
}

const char *nvmlErrorString(nvmlReturn_t result)
{
    /* The strings libnvidia-ml returns; needs no initialisation. */
    switch (result) {
    case NVML_SUCCESS: return "Success";
    case NVML_ERROR_UNINITIALIZED: return "Uninitialized";
    case NVML_ERROR_INVALID_ARGUMENT: return "Invalid Argument";
    case NVML_ERROR_NOT_SUPPORTED: return "Not Supported";
    case NVML_ERROR_NO_PERMISSION: return "Insufficient Permissions";
    case NVML_ERROR_ALREADY_INITIALIZED: return "Already Initialized";
    case NVML_ERROR_NOT_FOUND: return "Not Found";
    case NVML_ERROR_INSUFFICIENT_SIZE: return "Insufficient Size";
    case NVML_ERROR_INSUFFICIENT_POWER: return "Insufficient External Power";
    case NVML_ERROR_DRIVER_NOT_LOADED: return "Driver Not Loaded";
    case NVML_ERROR_TIMEOUT: return "Timeout";
    case NVML_ERROR_IRQ_ISSUE: return "Interrupt request issue";
    case NVML_ERROR_LIBRARY_NOT_FOUND: return "NVML Shared Library Not Found";
    case NVML_ERROR_FUNCTION_NOT_FOUND: return "Function Not Found";
    case NVML_ERROR_CORRUPTED_INFOROM: return "Corrupted infoROM";
    case NVML_ERROR_GPU_IS_LOST: return "GPU is lost";
    case NVML_ERROR_RESET_REQUIRED: return "GPU requires restart";
    case NVML_ERROR_OPERATING_SYSTEM: return "The operating system has blocked the request.";
    case NVML_ERROR_LIB_RM_VERSION_MISMATCH: return "RM has detected an NVML/RM version mismatch.";
    case NVML_ERROR_IN_USE: return "In use by another client";
    case NVML_ERROR_MEMORY: return "Insufficient Memory";
    case NVML_ERROR_NO_DATA: return "No data";
    case NVML_ERROR_VGPU_ECC_NOT_SUPPORTED:
        return "The requested vgpu operation is not available on target device, becasue ECC is enabled";
    case NVML_ERROR_INSUFFICIENT_RESOURCES: return "Ran out of critical resources, other than memory";
    case NVML_ERROR_FREQ_NOT_SUPPORTED: return "Frequency not supported";
    case NVML_ERROR_ARGUMENT_VERSION_MISMATCH: return "Argument version mismatch";
    case NVML_ERROR_DEPRECATED: return "The requested functionality has been deprecated";
    case NVML_ERROR_NOT_READY: return "The system is not ready for the request";
    case NVML_ERROR_GPU_NOT_FOUND: return "No supported GPUs were found";
    case NVML_ERROR_INVALID_STATE: return "Resource not in correct state to perform requested operation";
    case NVML_ERROR_RESET_TYPE_NOT_SUPPORTED: return "Reset not supported for given device/parameters";
    case NVML_ERROR_UNKNOWN: return "Unknown Error";
    }
    return "Unknown Error";
}

/* ------------------------------------------------------------------------ */
/* System queries                                                            */
/* ------------------------------------------------------------------------ */

static nvmlReturn_t system_string(char *out, unsigned int length, int which)
{
    nvmlReturn_t ret;

    lock();
    if (g_init_count == 0)
        ret = NVML_ERROR_UNINITIALIZED;
    else if (out == NULL)
        ret = NVML_ERROR_INVALID_ARGUMENT;
    else
        ret = copy_string(out, length, which == 0 ? g_node->driver_version : g_node->nvml_version);
    unlock();
    return ret;
}

nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length)
{
    return system_string(version, length, 0);
}

nvmlReturn_t nvmlSystemGetNVMLVersion(char *version, unsigned int length)
{
    return system_string(version, length, 1);
}

static nvmlReturn_t cuda_driver_version(int *out)
{
    nvmlReturn_t ret = NVML_SUCCESS;

    lock();
    if (g_init_count == 0)
        ret = NVML_ERROR_UNINITIALIZED;
    else if (out == NULL)
        ret = NVML_ERROR_INVALID_ARGUMENT;
    else
        *out = g_node->cuda_driver_version;
    unlock();
    return ret;
}

nvmlReturn_t nvmlSystemGetCudaDriverVersion(int *cudaDriverVersion)
{
    return cuda_driver_version(cudaDriverVersion);
}

nvmlReturn_t nvmlSystemGetCudaDriverVersion_v2(int *cudaDriverVersion)
{
    return cuda_driver_version(cudaDriverVersion);
}

/* ------------------------------------------------------------------------ */
/* Enumeration and handles                                                   */
/* ------------------------------------------------------------------------ */

static nvmlReturn_t device_count(unsigned int *count)
{
    nvmlReturn_t ret = NVML_SUCCESS;

    lock();
    if (g_init_count == 0)
        ret = NVML_ERROR_UNINITIALIZED;
    else if (count == NULL)
        ret = NVML_ERROR_INVALID_ARGUMENT;
    else
        *count = g_node->gpu_count; /* a lost GPU is still counted */
    unlock();
    return ret;
}

nvmlReturn_t nvmlDeviceGetCount(unsigned int *deviceCount)
{
    return device_count(deviceCount);
}

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *deviceCount)
{
    return device_count(deviceCount);
}

/*
 * Handle lookups succeed for a lost GPU: the handle exists and it is the
 * queries made with it that answer NVML_ERROR_GPU_IS_LOST.
 */
static nvmlReturn_t handle_by_index(unsigned int index, nvmlDevice_t *device)
{
    nvmlReturn_t ret = NVML_SUCCESS;

    lock();
    if (g_init_count == 0)
        ret = NVML_ERROR_UNINITIALIZED;
    else if (device == NULL || index >= g_node->gpu_count)
        ret = NVML_ERROR_INVALID_ARGUMENT;
    else
        *device = &g_devices[index];
    unlock();
    return ret;
}

nvmlReturn_t nvmlDeviceGetHandleByIndex(unsigned int index, nvmlDevice_t *device)
{
    return handle_by_index(index, device);
}

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device)
{
    return handle_by_index(index, device);
}

nvmlReturn_t nvmlDeviceGetHandleByUUID(const char *uuid, nvmlDevice_t *device)
{
    nvmlReturn_t ret = NVML_SUCCESS;
    int index;

    lock();
    if (g_init_count == 0) {
        ret = NVML_ERROR_UNINITIALIZED;
    } else if (uuid == NULL || device == NULL || uuid[0] == '\0') {
        ret = NVML_ERROR_INVALID_ARGUMENT;
    } else {
        index = sim_node_find_uuid(g_node, uuid);
        if (index < 0)
            ret = NVML_ERROR_NOT_FOUND;
        else
            *device = &g_devices[index];
    }
    unlock();
    return ret;
}

/* Accepts "domain:bus:device.function", "domain:bus:device" and "bus:device.function" (hex). */
nvmlReturn_t nvmlDeviceGetHandleByPciBusId_v2(const char *pciBusId, nvmlDevice_t *device)
{
    nvmlReturn_t ret = NVML_SUCCESS;
    unsigned int domain, bus, dev, function;
    int index;

    lock();
    if (g_init_count == 0) {
        ret = NVML_ERROR_UNINITIALIZED;
    } else if (pciBusId == NULL || device == NULL ||
               !sim_parse_pci_address(pciBusId, &domain, &bus, &dev, &function)) {
        ret = NVML_ERROR_INVALID_ARGUMENT;
    } else {
        /* GPUs are function 0; function 1 is e.g. the HDMI audio device. */
        index = function == 0 ? sim_node_find_pci(g_node, domain, bus, dev) : -1;
        if (index < 0)
            ret = NVML_ERROR_NOT_FOUND;
        else
            *device = &g_devices[index];
    }
    unlock();
    return ret;
}

/* ------------------------------------------------------------------------ */
/* Device queries                                                            */
/* ------------------------------------------------------------------------ */

/* The index is bookkeeping inside the library: documented without GPU_IS_LOST,
 * and it answers for a lost GPU (callers use it to attribute events). */
nvmlReturn_t nvmlDeviceGetIndex(nvmlDevice_t device, unsigned int *index)
{
    nvmlReturn_t ret = NVML_SUCCESS;
    int i;

    lock();
    if (g_init_count == 0) {
        ret = NVML_ERROR_UNINITIALIZED;
    } else {
        i = device_index(device);
        if (i < 0 || index == NULL)
            ret = NVML_ERROR_INVALID_ARGUMENT;
        else
            *index = (unsigned int)i;
    }
    unlock();
    return ret;
}

nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned int length)
{
    struct sim_gpu *gpu;
    nvmlReturn_t ret;

    lock();
    ret = use_device(device, uuid != NULL, &gpu);
    if (ret == NVML_SUCCESS)
        ret = copy_string(uuid, length, gpu->uuid);
    unlock();
    return ret;
}

nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length)
{
    struct sim_gpu *gpu;
    nvmlReturn_t ret;

    lock();
    ret = use_device(device, name != NULL, &gpu);
    if (ret == NVML_SUCCESS)
        ret = copy_string(name, length, gpu->name);
    unlock();
    return ret;
}

/*
 * Version 1: "used" is everything not free, i.e. the driver's reserved memory
 * plus allocations, so free = total - used.
 */
nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t *memory)
{
    struct sim_gpu *gpu;
    nvmlReturn_t ret;

    lock();
    ret = use_device(device, memory != NULL, &gpu);
    if (ret == NVML_SUCCESS) {
        unsigned long long used =
            gpu->memory_reserved_bytes + sim_gpu_allocated_bytes(gpu) + cuda_used_bytes(gpu);
        if (used > gpu->memory_total_bytes)
            used = gpu->memory_total_bytes;
        memory->total = gpu->memory_total_bytes;
        memory->used = used;
        memory->free = gpu->memory_total_bytes - used;
    }
    unlock();
    return ret;
}

/*
 * Version 2 splits the driver's share out: total = reserved + used + free,
 * with "used" only the allocations. The caller must set
 * version = nvmlMemory_v2 (sizeof | 2 << 24), which NVML checks exactly.
 */
nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t device, nvmlMemory_v2_t *memory)
{
    struct sim_gpu *gpu;
    nvmlReturn_t ret;

    lock();
    ret = use_device(device, memory != NULL, &gpu);
    if (ret == NVML_SUCCESS && memory->version != nvmlMemory_v2)
        ret = NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
    if (ret == NVML_SUCCESS) {
        unsigned long long allocated = sim_gpu_allocated_bytes(gpu) + cuda_used_bytes(gpu);
        if (allocated > gpu->memory_total_bytes - gpu->memory_reserved_bytes)
            allocated = gpu->memory_total_bytes - gpu->memory_reserved_bytes;
        memory->total = gpu->memory_total_bytes;
        memory->reserved = gpu->memory_reserved_bytes;
        memory->used = allocated;
        memory->free = gpu->memory_total_bytes - gpu->memory_reserved_bytes - allocated;
    }
    unlock();
    return ret;
}

nvmlReturn_t nvmlDeviceGetMinorNumber(nvmlDevice_t device, unsigned int *minorNumber)
{
    struct sim_gpu *gpu;
    nvmlReturn_t ret;

    lock();
    ret = use_device(device, minorNumber != NULL, &gpu);
    if (ret == NVML_SUCCESS)
        *minorNumber = gpu->minor;
    unlock();
    return ret;
}

static void fill_pci(const struct sim_gpu *gpu, nvmlPciInfo_t *pci)
{
    memset(pci, 0, sizeof *pci);
    snprintf(pci->busIdLegacy, sizeof pci->busIdLegacy, "%04X:%02X:%02X.0",
             gpu->pci_domain & 0xffffu, gpu->pci_bus, gpu->pci_device);
    pci->domain = gpu->pci_domain;
    pci->bus = gpu->pci_bus;
    pci->device = gpu->pci_device;
    pci->pciDeviceId = gpu->pci_device_id;
    pci->pciSubSystemId = gpu->pci_subsystem_id;
    snprintf(pci->busId, sizeof pci->busId, "%08X:%02X:%02X.0", gpu->pci_domain, gpu->pci_bus,
             gpu->pci_device);
}

/*
 * The unversioned entry point belongs to the old nvmlPciInfo_t, whose 16-byte
 * busId (4-digit domain) was followed by reserved words where today's 32-byte
 * busId lives. Callers built against that header pass the smaller struct, so
 * only the legacy fields are written; busId stays as the caller left it.
 */
nvmlReturn_t nvmlDeviceGetPciInfo(nvmlDevice_t device, nvmlPciInfo_t *pci)
{
    struct sim_gpu *gpu;
    nvmlReturn_t ret;

    lock();
    ret = use_device(device, pci != NULL, &gpu);
    if (ret == NVML_SUCCESS) {
        nvmlPciInfo_t full;
        fill_pci(gpu, &full);
        memcpy(pci, &full, offsetof(nvmlPciInfo_t, busId));
    }
    unlock();
    return ret;
}

static nvmlReturn_t pci_info_full(nvmlDevice_t device, nvmlPciInfo_t *pci)
{
    struct sim_gpu *gpu;
    nvmlReturn_t ret;

    lock();
    ret = use_device(device, pci != NULL, &gpu);
    if (ret == NVML_SUCCESS)
        fill_pci(gpu, pci);
    unlock();
    return ret;
}

nvmlReturn_t nvmlDeviceGetPciInfo_v2(nvmlDevice_t device, nvmlPciInfo_t *pci)
{
    return pci_info_full(device, pci);
}

nvmlReturn_t nvmlDeviceGetPciInfo_v3(nvmlDevice_t device, nvmlPciInfo_t *pci)
{
    return pci_info_full(device, pci);
}

/* NOT_SUPPORTED when the platform gives the GPU no NUMA affinity (numa_node = -1). */
nvmlReturn_t nvmlDeviceGetNumaNodeId(nvmlDevice_t device, unsigned int *node)
{
    struct sim_gpu *gpu;
    nvmlReturn_t ret;

    lock();
    ret = use_device(device, node != NULL, &gpu);
    if (ret == NVML_SUCCESS && gpu->numa_node < 0)
        ret = NVML_ERROR_NOT_SUPPORTED;
    if (ret == NVML_SUCCESS)
        *node = (unsigned int)gpu->numa_node;
    unlock();
    return ret;
}

/*
 * The kernel timelines (lock held): they appear when the first CUDA process initialises,
 * so they are looked for on every query until found.
 */
static bool timeline_ready(void)
{
    return g_tl.map != NULL || sim_tl_open(g_node->node_path, false, 0, &g_tl) == 0;
}

/*
 * Percent of the last completed sample periods covering one second (at least one period)
 * during which a kernel ran on the GPU, rounded down; 0 before any CUDA process.
 */
static unsigned int timeline_utilization(const struct sim_gpu *gpu)
{
    uint64_t period, now_period, window, busy, pct;

    if (!timeline_ready())
        return 0;
    period = g_tl.map->period_ns;
    now_period = sim_tl_now_ns() / period;
    window = (1000000000ull + period / 2) / period;
    if (window == 0)
        window = 1;
    busy = sim_tl_device_busy(&g_tl, (unsigned int)(gpu - g_node->gpus), now_period - window,
                              now_period);
    pct = busy * 100 / (window * period);
    return pct > 100 ? 100 : (unsigned int)pct;
}

/*
 * gpu: from the kernel timeline (README "Kernel time model"), with the node file's
 * utilization_gpu as a floor (work the simulator does not run); memory: the node file's.
 * With MIG enabled the parent GPU has no meaningful utilisation: NOT_SUPPORTED, as on A100.
 */
nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t device, nvmlUtilization_t *utilization)
{
    struct sim_gpu *gpu;
    nvmlReturn_t ret;

    lock();
    ret = use_device(device, utilization != NULL, &gpu);
    if (ret == NVML_SUCCESS && gpu->mig == SIM_MIG_ENABLED)
        ret = NVML_ERROR_NOT_SUPPORTED;
    if (ret == NVML_SUCCESS) {
        unsigned int measured = timeline_utilization(gpu);
        utilization->gpu = measured > gpu->utilization_gpu ? measured : gpu->utilization_gpu;
        utilization->memory = gpu->utilization_memory;
    }
    unlock();
    return ret;
}

#define MAX_SAMPLES (SIM_TL_HISTORY * SIM_TL_PROCS)

struct sample_list {
    nvmlProcessUtilizationSample_t items[MAX_SAMPLES];
    unsigned int count;
    uint64_t period_ns;
    unsigned long long last_seen;
};

static void add_sample(uint64_t period, int pid, uint64_t busy_ns, void *arg)
{
    struct sample_list *list = arg;
    unsigned long long stamp = (period + 1) * list->period_ns / 1000ull; /* period end, in us */
    uint64_t pct = (busy_ns * 100 + list->period_ns / 2) / list->period_ns;
    nvmlProcessUtilizationSample_t *out;

    if (stamp <= list->last_seen || list->count == MAX_SAMPLES)
        return;
    out = &list->items[list->count++];
    out->pid = (unsigned int)pid;
    out->timeStamp = stamp;
    out->smUtil = pct > 100 ? 100 : (unsigned int)pct;
    out->memUtil = 0;
    out->encUtil = 0;
    out->decUtil = 0;
}

/*
 * One sample per (completed sample period, process that ran kernels in it), oldest first,
 * newer than lastSeenTimeStamp (microseconds since the epoch; 0: all that are kept).
 * *processSamplesCount is the capacity in and the count out; too small (or no buffer) →
 * INSUFFICIENT_SIZE with the count needed; no samples → NOT_FOUND with 0.
 */
nvmlReturn_t nvmlDeviceGetProcessUtilization(nvmlDevice_t device,
                                             nvmlProcessUtilizationSample_t *utilization,
                                             unsigned int *processSamplesCount,
                                             unsigned long long lastSeenTimeStamp)
{
    static struct sample_list list; /* large; used under the lock only */
    struct sim_gpu *gpu;
    nvmlReturn_t ret;

    lock();
    ret = use_device(device, processSamplesCount != NULL, &gpu);
    if (ret == NVML_SUCCESS && gpu->mig == SIM_MIG_ENABLED)
        ret = NVML_ERROR_NOT_SUPPORTED;
    if (ret == NVML_SUCCESS) {
        list.count = 0;
        if (timeline_ready()) {
            uint64_t now_period;
            list.period_ns = g_tl.map->period_ns;
            list.last_seen = lastSeenTimeStamp;
            now_period = sim_tl_now_ns() / list.period_ns;
            sim_tl_for_each_sample(&g_tl, (unsigned int)(gpu - g_node->gpus),
                                   now_period - SIM_TL_HISTORY, now_period, add_sample, &list);
        }
        if (list.count == 0) {
            *processSamplesCount = 0;
            ret = NVML_ERROR_NOT_FOUND;
        } else if (utilization == NULL || *processSamplesCount < list.count) {
            *processSamplesCount = list.count;
            ret = NVML_ERROR_INSUFFICIENT_SIZE;
        } else {
            memcpy(utilization, list.items, list.count * sizeof *utilization);
            *processSamplesCount = list.count;
        }
    }
    unlock();
    return ret;
}

/*
 * NVML's list convention: *infoCount is the capacity of infos on input and
 * the number of entries on output. If it is too small, *infoCount is set to
 * the number needed and INSUFFICIENT_SIZE returned (infos may then be NULL;
 * callers size with *infoCount = 0). No processes: SUCCESS with 0.
 */
struct process_list {
    struct sim_process items[SIM_MAX_PROCESSES + SIM_STATE_SLOTS];
    unsigned int count;
};

static void add_cuda_process(int pid, uint64_t bytes, void *arg)
{
    struct process_list *list = arg;

    /* NVML reports host pids (GPU_SIM_HOST_PID_OFFSET simulates a container's namespace). */
    list->items[list->count].pid =
        (unsigned int)(timeline_ready() ? sim_tl_host_pid(&g_tl, pid) : pid);
    list->items[list->count].used_bytes = bytes;
    list->count++;
}

/* The node file's processes, then those holding memory through the fake libcuda.so.1. */
static void collect_processes(const struct sim_gpu *gpu, struct process_list *list)
{
    unsigned int i;

    list->count = 0;
    for (i = 0; i < gpu->process_count; i++)
        list->items[list->count++] = gpu->processes[i];
    if (cuda_state_ready()) {
        sim_state_for_each_process(&g_cuda, (unsigned int)(gpu - g_node->gpus),
                                   add_cuda_process, list);
    }
}

static nvmlReturn_t running_processes(nvmlDevice_t device, unsigned int *infoCount, void *infos,
                                      int version)
{
    static struct process_list list; /* large; used under the lock only */
    struct sim_gpu *gpu;
    nvmlReturn_t ret;
    unsigned int i, n;

    lock();
    if (version == 3 && g_init_count > 0 && g_no_v3)
        ret = NVML_ERROR_FUNCTION_NOT_FOUND; /* the entry point of a newer driver */
    else
        ret = use_device(device, infoCount != NULL, &gpu);
    if (ret == NVML_SUCCESS) {
        collect_processes(gpu, &list);
        n = list.count;
        if (*infoCount < n) {
            *infoCount = n;
            ret = NVML_ERROR_INSUFFICIENT_SIZE;
        } else if (n > 0 && infos == NULL) {
            ret = NVML_ERROR_INVALID_ARGUMENT;
        } else {
            for (i = 0; i < n; i++) {
                if (version == 1) {
                    nvmlProcessInfo_v1_t *out = (nvmlProcessInfo_v1_t *)infos + i;
                    out->pid = list.items[i].pid;
                    out->usedGpuMemory = list.items[i].used_bytes;
                } else {
                    nvmlProcessInfo_v2_t *out = (nvmlProcessInfo_v2_t *)infos + i;
                    out->pid = list.items[i].pid;
                    out->usedGpuMemory = list.items[i].used_bytes;
                    /* Not running in a MIG instance. */
                    out->gpuInstanceId = NVML_VALUE_NOT_AVAILABLE_UINT;
                    out->computeInstanceId = NVML_VALUE_NOT_AVAILABLE_UINT;
                }
            }
            *infoCount = n;
        }
    }
    unlock();
    return ret;
}

nvmlReturn_t nvmlDeviceGetComputeRunningProcesses(nvmlDevice_t device, unsigned int *infoCount,
                                                  nvmlProcessInfo_v1_t *infos)
{
    return running_processes(device, infoCount, infos, 1);
}

nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v2(nvmlDevice_t device, unsigned int *infoCount,
                                                     nvmlProcessInfo_v2_t *infos)
{
    return running_processes(device, infoCount, infos, 2);
}

nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t device, unsigned int *infoCount,
                                                     nvmlProcessInfo_t *infos)
{
    return running_processes(device, infoCount, infos, 3);
}

/* NOT_SUPPORTED on GPUs that are not MIG-capable (T4, V100, ...). */
nvmlReturn_t nvmlDeviceGetMigMode(nvmlDevice_t device, unsigned int *currentMode,
                                  unsigned int *pendingMode)
{
    struct sim_gpu *gpu;
    nvmlReturn_t ret;

    lock();
    ret = use_device(device, currentMode != NULL && pendingMode != NULL, &gpu);
    if (ret == NVML_SUCCESS && gpu->mig == SIM_MIG_UNSUPPORTED)
        ret = NVML_ERROR_NOT_SUPPORTED;
    if (ret == NVML_SUCCESS) {
        unsigned int mode =
            gpu->mig == SIM_MIG_ENABLED ? NVML_DEVICE_MIG_ENABLE : NVML_DEVICE_MIG_DISABLE;
        *currentMode = mode;
        *pendingMode = mode;
    }
    unlock();
    return ret;
}

/* ------------------------------------------------------------------------ */
/* Events                                                                    */
/* ------------------------------------------------------------------------ */

nvmlReturn_t nvmlDeviceGetSupportedEventTypes(nvmlDevice_t device, unsigned long long *eventTypes)
{
    struct sim_gpu *gpu;
    nvmlReturn_t ret;

    lock();
    ret = use_device(device, eventTypes != NULL, &gpu);
    if (ret == NVML_SUCCESS)
        *eventTypes = supported_events(gpu);
    unlock();
    return ret;
}

nvmlReturn_t nvmlEventSetCreate(nvmlEventSet_t *set)
{
    struct nvmlEventSet_st *s;
    nvmlReturn_t ret = NVML_SUCCESS;

    lock();
    if (g_init_count == 0) {
        ret = NVML_ERROR_UNINITIALIZED;
    } else if (set == NULL) {
        ret = NVML_ERROR_INVALID_ARGUMENT;
    } else {
        s = calloc(1, sizeof *s);
        if (s == NULL) {
            ret = NVML_ERROR_MEMORY;
        } else {
            /* Everything already in the log happened before this set existed. */
            sim_node_sync(g_node);
            s->cursor = g_node->event_count;
            s->next = g_sets;
            g_sets = s;
            *set = s;
        }
    }
    unlock();
    return ret;
}

/*
 * Registration is all or nothing: any requested type the GPU does not support
 * (all of them, for a GPU without event support) gives NOT_SUPPORTED, as the
 * documentation says ("... or some of requested event types").
 */
nvmlReturn_t nvmlDeviceRegisterEvents(nvmlDevice_t device, unsigned long long eventTypes,
                                      nvmlEventSet_t set)
{
    struct sim_gpu *gpu;
    nvmlReturn_t ret;
    int index, kind;

    lock();
    ret = use_device(device, 1, &gpu);
    if (ret != NVML_ERROR_UNINITIALIZED && !set_is_live(set))
        ret = NVML_ERROR_INVALID_ARGUMENT;
    if (ret == NVML_SUCCESS && (!gpu->events || (eventTypes & ~supported_events(gpu)) != 0))
        ret = NVML_ERROR_NOT_SUPPORTED;
    if (ret == NVML_SUCCESS) {
        index = device_index(device);
        for (kind = 0; kind < SIM_EVENT_KIND_COUNT; kind++) {
            if ((eventTypes & kind_bits[kind]) && !(set->mask[index] & kind_bits[kind]))
                set->since[index][kind] = g_node->event_count;
        }
        set->mask[index] |= eventTypes;
    }
    unlock();
    return ret;
}

static uint64_t monotonic_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/*
 * Waits for the next event of the set. The control log is polled every few
 * milliseconds. Events already injected are delivered first; after that, if a
 * GPU registered in the set has fallen off the bus, the wait fails at once
 * with GPU_IS_LOST (every call, until the GPU recovers) instead of sleeping,
 * so callers must not retry in a tight loop.
 */
static nvmlReturn_t event_wait(nvmlEventSet_t set, nvmlEventData_t *data, unsigned int timeoutms,
                               int version)
{
    const uint64_t deadline = monotonic_ns() + (uint64_t)timeoutms * 1000000ull;

    for (;;) {
        struct nvmlEventSet_st *s = set;
        int lost = 0;
        size_t i;
        uint64_t now, nap;
        struct timespec ts;

        lock();
        if (g_init_count == 0) {
            unlock();
            return NVML_ERROR_UNINITIALIZED;
        }
        if (!set_is_live(set) || data == NULL) {
            unlock();
            return NVML_ERROR_INVALID_ARGUMENT;
        }
        sim_node_sync(g_node);
        for (i = s->cursor; i < g_node->event_count; i++) {
            const struct sim_event *ev = &g_node->events[i];
            if ((s->mask[ev->gpu] & kind_bits[ev->kind]) && i >= s->since[ev->gpu][ev->kind]) {
                nvmlEventData_t out;
                out.device = &g_devices[ev->gpu];
                out.eventType = kind_bits[ev->kind];
                out.eventData = ev->data; /* the XID for XID events, 0 otherwise */
                out.gpuInstanceId = NVML_VALUE_NOT_AVAILABLE_UINT;
                out.computeInstanceId = NVML_VALUE_NOT_AVAILABLE_UINT;
                s->cursor = i + 1;
                unlock();
                /* The unversioned call has the pre-MIG layout without instance ids. */
                memcpy(data, &out, version == 1 ? sizeof(nvmlEventData_v1_t) : sizeof out);
                return NVML_SUCCESS;
            }
        }
        s->cursor = g_node->event_count;
        for (i = 0; i < g_node->gpu_count; i++) {
            if (s->mask[i] != 0 && g_node->gpus[i].failed)
                lost = 1;
        }
        unlock();
        if (lost)
            return NVML_ERROR_GPU_IS_LOST;

        now = monotonic_ns();
        if (now >= deadline)
            return NVML_ERROR_TIMEOUT;
        nap = deadline - now < EVENT_POLL_NS ? deadline - now : EVENT_POLL_NS;
        ts.tv_sec = (time_t)(nap / 1000000000ull);
        ts.tv_nsec = (long)(nap % 1000000000ull);
        while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
        }
    }
}

nvmlReturn_t nvmlEventSetWait(nvmlEventSet_t set, nvmlEventData_t *data, unsigned int timeoutms)
{
    return event_wait(set, data, timeoutms, 1);
}

nvmlReturn_t nvmlEventSetWait_v2(nvmlEventSet_t set, nvmlEventData_t *data, unsigned int timeoutms)
{
    return event_wait(set, data, timeoutms, 2);
}

nvmlReturn_t nvmlEventSetFree(nvmlEventSet_t set)
{
    struct nvmlEventSet_st **link;
    nvmlReturn_t ret = NVML_ERROR_INVALID_ARGUMENT;

    lock();
    if (g_init_count == 0) {
        ret = NVML_ERROR_UNINITIALIZED;
    } else {
        for (link = &g_sets; *link != NULL; link = &(*link)->next) {
            if (*link == set) {
                *link = set->next;
                free(set);
                ret = NVML_SUCCESS;
                break;
            }
        }
    }
    unlock();
    return ret;
}

/* ------------------------------------------------------------------------ */
/* What monitoring tools (nvitop, gpustat, nvidia-smi-alikes) ask besides     */
/* ------------------------------------------------------------------------ */

/*
 * Per-product facts, picked by the product name like the CUDA side's model table: the
 * application clocks' maxima (MHz) and the board's power limit and idle draw (mW), from
 * NVIDIA's data sheets and what nvidia-smi -q shows on those boards. Data-centre boards are
 * passively cooled (no fan to report) and run Linux's only driver model.
 */
struct board {
    const char *match;
    unsigned int graphics_mhz, mem_mhz, video_mhz;
    unsigned int power_limit_mw, idle_power_mw;
};

static const struct board boards[] = {
    {"H100 PCIe", 1755, 1593, 1590, 350000, 50000},
    {"H100", 1980, 2619, 1755, 700000, 70000},
    {"A100-PCIE-40GB", 1410, 1215, 1290, 250000, 35000},
    {"A100-PCIE", 1410, 1512, 1290, 300000, 45000},
    {"A100 80GB PCIe", 1410, 1512, 1290, 300000, 45000},
    {"A100", 1410, 1593, 1290, 400000, 60000},
    {"V100-PCIE", 1380, 877, 1237, 250000, 25000},
    {"V100", 1530, 877, 1372, 300000, 40000},
    {"T4", 1590, 5001, 1470, 70000, 10000},
    {NULL, 1410, 1593, 1290, 400000, 60000}, /* default: an A100 SXM4 */
};

/* Idle clocks of the graphics/SM and video domains (memory stays at its maximum). */
#define IDLE_GRAPHICS_MHZ 210u
#define IDLE_VIDEO_MHZ 585u
/* The encoder/decoder utilisation window the driver reports (µs). */
#define CODEC_SAMPLING_US 167000u

static const struct board *board_of(const struct sim_gpu *gpu)
{
    const struct board *b = boards;

    while (b->match != NULL && strstr(gpu->name, b->match) == NULL)
        b++;
    return b;
}

/* The GPU's utilisation as nvmlDeviceGetUtilizationRates reports it (lock held). */
static unsigned int gpu_busy_percent(const struct sim_gpu *gpu)
{
    unsigned int measured = timeline_utilization(gpu);

    return measured > gpu->utilization_gpu ? measured : gpu->utilization_gpu;
}

nvmlReturn_t nvmlDeviceGetGraphicsRunningProcesses(nvmlDevice_t device, unsigned int *infoCount,
                                                   nvmlProcessInfo_v1_t *infos)
{
    struct sim_gpu *gpu;
    nvmlReturn_t ret;

    (void)infos;
    lock();
    /* A headless compute GPU runs no graphics clients: always an empty list. */
    ret = use_device(device, infoCount != NULL, &gpu);
    if (ret == NVML_SUCCESS)
        *infoCount = 0;
    unlock();
    return ret;
}

nvmlReturn_t nvmlDeviceGetGraphicsRunningProcesses_v2(nvmlDevice_t device, unsigned int *infoCount,
                                                      nvmlProcessInfo_v2_t *infos)
{
    return nvmlDeviceGetGraphicsRunningProcesses(device, infoCount, (nvmlProcessInfo_v1_t *)infos);
}

nvmlReturn_t nvmlDeviceGetGraphicsRunningProcesses_v3(nvmlDevice_t device, unsigned int *infoCount,
                                                      nvmlProcessInfo_t *infos)
{
    bool missing;

    lock();
    missing = g_init_count > 0 && g_no_v3;
    unlock();
    if (missing)
        return NVML_ERROR_FUNCTION_NOT_FOUND;
    return nvmlDeviceGetGraphicsRunningProcesses(device, infoCount, (nvmlProcessInfo_v1_t *)infos);
}

/* A query answering one unsigned value computed from the GPU (lock taken here). */
static nvmlReturn_t device_uint(nvmlDevice_t device, unsigned int *out,
                                unsigned int (*value)(const struct sim_gpu *))
{
    struct sim_gpu *gpu;
    nvmlReturn_t ret;

    lock();
    ret = use_device(device, out != NULL, &gpu);
    if (ret == NVML_SUCCESS)
        *out = value(gpu);
    unlock();
    return ret;
}

/* The same preamble for a query the hardware cannot answer: NOT_SUPPORTED after the checks. */
static nvmlReturn_t device_not_supported(nvmlDevice_t device, bool args_ok)
{
    struct sim_gpu *gpu;
    nvmlReturn_t ret;

    lock();
    ret = use_device(device, args_ok, &gpu);
    unlock();
    return ret == NVML_SUCCESS ? NVML_ERROR_NOT_SUPPORTED : ret;
}

static unsigned int zero(const struct sim_gpu *gpu)
{
    (void)gpu;
    return 0;
}

static unsigned int one(const struct sim_gpu *gpu)
{
    (void)gpu;
    return 1;
}

/* NVML_COMPUTEMODE_DEFAULT (0): what a Kubernetes node's GPUs run in. */
nvmlReturn_t nvmlDeviceGetComputeMode(nvmlDevice_t device, nvmlComputeMode_t *mode)
{
    return device_uint(device, (unsigned int *)mode, zero);
}

/* NVML_PSTATE_0: a data-centre GPU with persistence mode on stays in P0. */
nvmlReturn_t nvmlDeviceGetPerformanceState(nvmlDevice_t device, nvmlPstates_t *pState)
{
    return device_uint(device, (unsigned int *)pState, zero);
}

/* NVML_FEATURE_ENABLED: GPU nodes run nvidia-persistenced. */
nvmlReturn_t nvmlDeviceGetPersistenceMode(nvmlDevice_t device, nvmlEnableState_t *mode)
{
    return device_uint(device, (unsigned int *)mode, one);
}

/* No display is attached to a data-centre GPU (nvidia-smi's "Disp.A Off"). */
nvmlReturn_t nvmlDeviceGetDisplayActive(nvmlDevice_t device, nvmlEnableState_t *isActive)
{
    return device_uint(device, (unsigned int *)isActive, zero);
}

nvmlReturn_t nvmlDeviceGetDisplayMode(nvmlDevice_t device, nvmlEnableState_t *display)
{
    return device_uint(device, (unsigned int *)display, zero);
}

/* Driver models (WDDM/TCC) exist only on Windows. */
nvmlReturn_t nvmlDeviceGetDriverModel(nvmlDevice_t device, nvmlDriverModel_t *current,
                                      nvmlDriverModel_t *pending)
{
    return device_not_supported(device, current != NULL || pending != NULL);
}

/* Passively cooled boards have no fan NVML can read. */
nvmlReturn_t nvmlDeviceGetFanSpeed(nvmlDevice_t device, unsigned int *speed)
{
    return device_not_supported(device, speed != NULL);
}

nvmlReturn_t nvmlDeviceGetFanSpeed_v2(nvmlDevice_t device, unsigned int fan, unsigned int *speed)
{
    (void)fan;
    return device_not_supported(device, speed != NULL);
}

/* Confidential computing is off on these nodes, so there are no protected-memory sizes. */
nvmlReturn_t nvmlDeviceGetConfComputeMemSizeInfo(nvmlDevice_t device,
                                                 nvmlConfComputeMemSizeInfo_t *memInfo)
{
    return device_not_supported(device, memInfo != NULL);
}

/* A handle from nvmlDeviceGetHandleBy* is a whole GPU, never a MIG device. */
nvmlReturn_t nvmlDeviceIsMigDeviceHandle(nvmlDevice_t device, unsigned int *isMigDevice)
{
    return device_uint(device, isMigDevice, zero);
}

static nvmlReturn_t codec_utilization(nvmlDevice_t device, unsigned int *utilization,
                                      unsigned int *samplingPeriodUs)
{
    struct sim_gpu *gpu;
    nvmlReturn_t ret;

    lock();
    ret = use_device(device, utilization != NULL && samplingPeriodUs != NULL, &gpu);
    if (ret == NVML_SUCCESS) {
        *utilization = 0; /* nothing here uses NVENC/NVDEC */
        *samplingPeriodUs = CODEC_SAMPLING_US;
    }
    unlock();
    return ret;
}

nvmlReturn_t nvmlDeviceGetEncoderUtilization(nvmlDevice_t device, unsigned int *utilization,
                                             unsigned int *samplingPeriodUs)
{
    return codec_utilization(device, utilization, samplingPeriodUs);
}

nvmlReturn_t nvmlDeviceGetDecoderUtilization(nvmlDevice_t device, unsigned int *utilization,
                                             unsigned int *samplingPeriodUs)
{
    return codec_utilization(device, utilization, samplingPeriodUs);
}

static unsigned int power_limit(const struct sim_gpu *gpu)
{
    return board_of(gpu)->power_limit_mw;
}

/* Idle draw plus the busy share of the rest of the budget. */
static unsigned int power_usage(const struct sim_gpu *gpu)
{
    const struct board *b = board_of(gpu);

    return b->idle_power_mw + (b->power_limit_mw - b->idle_power_mw) / 100u * gpu_busy_percent(gpu);
}

nvmlReturn_t nvmlDeviceGetPowerManagementLimit(nvmlDevice_t device, unsigned int *limit)
{
    return device_uint(device, limit, power_limit);
}

nvmlReturn_t nvmlDeviceGetPowerManagementDefaultLimit(nvmlDevice_t device, unsigned int *defaultLimit)
{
    return device_uint(device, defaultLimit, power_limit);
}

nvmlReturn_t nvmlDeviceGetEnforcedPowerLimit(nvmlDevice_t device, unsigned int *limit)
{
    return device_uint(device, limit, power_limit);
}

nvmlReturn_t nvmlDeviceGetPowerUsage(nvmlDevice_t device, unsigned int *power)
{
    return device_uint(device, power, power_usage);
}

/* The GPU die: ~30 °C idle in a cooled rack, rising with load. */
nvmlReturn_t nvmlDeviceGetTemperature(nvmlDevice_t device, nvmlTemperatureSensors_t sensorType,
                                      unsigned int *temp)
{
    struct sim_gpu *gpu;
    nvmlReturn_t ret;

    lock();
    ret = use_device(device, temp != NULL && sensorType == NVML_TEMPERATURE_GPU, &gpu);
    if (ret == NVML_SUCCESS)
        *temp = 30u + gpu_busy_percent(gpu) * 35u / 100u;
    unlock();
    return ret;
}

static nvmlReturn_t clock_of(nvmlDevice_t device, nvmlClockType_t type, unsigned int *clock,
                             bool max)
{
    struct sim_gpu *gpu;
    nvmlReturn_t ret;

    lock();
    ret = use_device(device, clock != NULL && (unsigned int)type < NVML_CLOCK_COUNT, &gpu);
    if (ret == NVML_SUCCESS) {
        const struct board *b = board_of(gpu);
        bool busy = max || gpu_busy_percent(gpu) > 0;
        switch (type) {
        case NVML_CLOCK_GRAPHICS:
        case NVML_CLOCK_SM:
            *clock = busy ? b->graphics_mhz : IDLE_GRAPHICS_MHZ;
            break;
        case NVML_CLOCK_MEM:
            *clock = b->mem_mhz;
            break;
        default:
            *clock = busy ? b->video_mhz : IDLE_VIDEO_MHZ;
            break;
        }
    }
    unlock();
    return ret;
}

nvmlReturn_t nvmlDeviceGetClockInfo(nvmlDevice_t device, nvmlClockType_t type, unsigned int *clock)
{
    return clock_of(device, type, clock, false);
}

nvmlReturn_t nvmlDeviceGetMaxClockInfo(nvmlDevice_t device, nvmlClockType_t type,
                                       unsigned int *clock)
{
    return clock_of(device, type, clock, true);
}

nvmlReturn_t nvmlDeviceGetEccMode(nvmlDevice_t device, nvmlEnableState_t *current,
                                  nvmlEnableState_t *pending)
{
    struct sim_gpu *gpu;
    nvmlReturn_t ret;

    lock();
    ret = use_device(device, current != NULL && pending != NULL, &gpu);
    if (ret == NVML_SUCCESS)
        *current = *pending = gpu->ecc ? NVML_FEATURE_ENABLED : NVML_FEATURE_DISABLED;
    unlock();
    return ret;
}

/*
 * ECC error counts: the ecc-sbe (corrected) / ecc-dbe (uncorrected) lines injected through
 * the control log for this GPU. Volatile and aggregate agree (the counters start with the
 * log; no reboot is modelled). With ECC disabled the driver counts nothing: NOT_SUPPORTED.
 */
nvmlReturn_t nvmlDeviceGetTotalEccErrors(nvmlDevice_t device, nvmlMemoryErrorType_t errorType,
                                         nvmlEccCounterType_t counterType,
                                         unsigned long long *eccCounts)
{
    struct sim_gpu *gpu;
    nvmlReturn_t ret;

    lock();
    ret = use_device(device,
                     eccCounts != NULL && (unsigned int)errorType < NVML_MEMORY_ERROR_TYPE_COUNT &&
                         (unsigned int)counterType < NVML_ECC_COUNTER_TYPE_COUNT,
                     &gpu);
    if (ret == NVML_SUCCESS && !gpu->ecc)
        ret = NVML_ERROR_NOT_SUPPORTED;
    if (ret == NVML_SUCCESS) {
        enum sim_event_kind kind = errorType == NVML_MEMORY_ERROR_TYPE_CORRECTED
                                       ? SIM_EVENT_ECC_SBE
                                       : SIM_EVENT_ECC_DBE;
        unsigned int index = (unsigned int)(gpu - g_node->gpus);
        unsigned long long n = 0;
        size_t i;

        for (i = 0; i < g_node->event_count; i++)
            n += g_node->events[i].gpu == index && g_node->events[i].kind == kind;
        *eccCounts = n;
    }
    unlock();
    return ret;
}
