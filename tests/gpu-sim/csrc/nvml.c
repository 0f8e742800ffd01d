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

/* MIG (at the end of this file). */
static nvmlReturn_t mig_open(struct sim_node *node);
static void mig_close(void);
static bool mig_enabled(const struct sim_gpu *gpu);
static nvmlReturn_t use_mig_device(nvmlDevice_t device, bool args_ok, bool *is_mig,
                                   struct sim_gpu **gpu, unsigned int *gi, unsigned int *ci);
static nvmlReturn_t mig_device_uuid(struct sim_gpu *gpu, unsigned int gi, unsigned int ci,
                                    char *uuid, unsigned int length);
static nvmlReturn_t mig_device_name(struct sim_gpu *gpu, unsigned int gi, unsigned int ci,
                                    char *name, unsigned int length);
static unsigned long long mig_device_memory(struct sim_gpu *gpu, unsigned int gi);
static void mig_modes(const struct sim_gpu *gpu, unsigned int *current, unsigned int *pending);

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
        ret = mig_open(node);
        if (ret != NVML_SUCCESS)
            sim_node_free(node);
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
        mig_close();
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
    {
        bool is_mig;
        unsigned int gi, ci;

        ret = use_mig_device(device, uuid != NULL, &is_mig, &gpu, &gi, &ci);
        if (is_mig) {
            if (ret == NVML_SUCCESS) {
                ret = mig_device_uuid(gpu, gi, ci, uuid, length);
            }
            unlock();
            return ret;
        }
    }
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
    {
        bool is_mig;
        unsigned int gi, ci;

        ret = use_mig_device(device, name != NULL, &is_mig, &gpu, &gi, &ci);
        if (is_mig) {
            if (ret == NVML_SUCCESS) {
                ret = mig_device_name(gpu, gi, ci, name, length);
            }
            unlock();
            return ret;
        }
    }
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
    {
        bool is_mig;
        unsigned int gi, ci;

        ret = use_mig_device(device, memory != NULL, &is_mig, &gpu, &gi, &ci);
        if (is_mig) {
            if (ret == NVML_SUCCESS) {
                (void)ci;
                memory->total = mig_device_memory(gpu, gi);
                memory->used = 0;
                memory->free = memory->total;
            }
            unlock();
            return ret;
        }
    }
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
    {
        bool is_mig;
        unsigned int gi, ci;

        ret = use_mig_device(device, memory != NULL, &is_mig, &gpu, &gi, &ci);
        if (is_mig) {
            if (ret == NVML_SUCCESS) {
                (void)ci;
                if (memory->version != nvmlMemory_v2) {
                    ret = NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
                } else {
                    memory->total = mig_device_memory(gpu, gi);
                    memory->reserved = 0;
                    memory->used = 0;
                    memory->free = memory->total;
                }
            }
            unlock();
            return ret;
        }
    }
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
    if (ret == NVML_SUCCESS && mig_enabled(gpu))
        ret = NVML_ERROR_NOT_SUPPORTED;
    if (ret == NVML_SUCCESS) {
        unsigned int measured = timeline_utilization(gpu);
        utilization->gpu = measured > gpu->utilization_gpu ? measured : gpu->utilization_gpu;
        utilization->memory = gpu->utilization_memory;
    }
    unlock();
    return ret;
}

/* Entries of one answer at most: every process recorded in the kept periods, and the junk. */
#define MAX_ENTRIES (SIM_TL_HISTORY * SIM_TL_PROCS + SIM_MAX_JUNK_ENTRIES)

/* One process's records newer than lastSeenTimeStamp. */
struct process_records {
    int pid;
    unsigned int count;
    uint64_t pct_sum;
    unsigned long long newest;
};

struct sample_list {
    struct process_records procs[MAX_ENTRIES];
    unsigned int count;
    uint64_t period_ns;
    uint64_t jitter_ns;
    uint64_t now_ns;
    unsigned int gpu;
    unsigned long long last_seen;
};

/* How late period `period` of GPU `gpu` is recorded: 0..=jitter_ns, the same in every process. */
static uint64_t sample_delay_ns(const struct sample_list *list, uint64_t period)
{
    uint64_t x = period * 0x9e3779b97f4a7c15ull + list->gpu + 1;

    if (list->jitter_ns == 0)
        return 0;
    /* splitmix64's finaliser */
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    x ^= x >> 31;
    return x % (list->jitter_ns + 1);
}

/* A record of (period, process): folded into the process's entry. */
static void add_record(uint64_t period, int pid, uint64_t busy_ns, void *arg)
{
    struct sample_list *list = arg;
    /* Recorded at the period's end, late by the sampling thread's delay. */
    uint64_t at_ns = (period + 1) * list->period_ns + sample_delay_ns(list, period);
    unsigned long long stamp = at_ns / 1000ull; /* in us */
    uint64_t pct = (busy_ns * 100 + list->period_ns / 2) / list->period_ns;
    struct process_records *p = NULL;
    unsigned int i;

    if (at_ns > list->now_ns || stamp <= list->last_seen)
        return;
    for (i = 0; i < list->count; i++) {
        if (list->procs[i].pid == pid) {
            p = &list->procs[i];
            break;
        }
    }
    if (p == NULL) {
        if (list->count == MAX_ENTRIES - SIM_MAX_JUNK_ENTRIES)
            return;
        p = &list->procs[list->count++];
        p->pid = pid;
        p->count = 0;
        p->pct_sum = 0;
        p->newest = 0;
    }
    p->count++;
    p->pct_sum += pct > 100 ? 100 : pct;
    if (stamp > p->newest)
        p->newest = stamp;
}

static int by_newest(const void *a, const void *b)
{
    const struct process_records *x = a, *y = b;

    return x->newest < y->newest ? -1 : x->newest > y->newest ? 1 : x->pid - y->pid;
}

/*
 * As the real driver: one entry per process, never one per sample. The driver records, at the
 * end of each sample period (stamped when recorded: late by up to utilization_jitter_us), each
 * process that ran kernels in it; a query returns, for every process with records newer than
 * lastSeenTimeStamp (microseconds since the epoch; 0: all that are kept), ONE entry: timeStamp =
 * its newest record, smUtil = the mean of its records' shares (rounded), so a process that ran
 * in some of the periods only is averaged over those. Ordered oldest first, then the node's
 * utilization_junk_entries (a real driver's junk next to zombies, even when nothing ran: pid
 * 50554 with smUtil 37100 and timeStamp 49936, the rest all zero). *processSamplesCount
 * is the capacity in and the count out; too small (or no buffer) → INSUFFICIENT_SIZE with the
 * count needed; none → NOT_FOUND with 0.
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
    if (ret == NVML_SUCCESS && mig_enabled(gpu))
        ret = NVML_ERROR_NOT_SUPPORTED;
    if (ret == NVML_SUCCESS) {
        list.count = 0;
        if (timeline_ready()) {
            uint64_t now_period;
            list.period_ns = g_tl.map->period_ns;
            list.jitter_ns = g_node->utilization_jitter_ns;
            list.gpu = (unsigned int)(gpu - g_node->gpus);
            list.last_seen = lastSeenTimeStamp;
            list.now_ns = sim_tl_now_ns();
            now_period = list.now_ns / list.period_ns;
            sim_tl_for_each_sample(&g_tl, (unsigned int)(gpu - g_node->gpus),
                                   now_period - SIM_TL_HISTORY, now_period, add_record, &list);
        }
        /* After the real entries (sorted below, the junk kept last); MAX_ENTRIES leaves room. */
        for (unsigned int k = 0; k < g_node->utilization_junk_entries; k++) {
            struct process_records *j = &list.procs[list.count++];
            j->pid = k == 0 ? 50554 : 0;
            j->count = 1;
            j->pct_sum = k == 0 ? 37100 : 0;
            j->newest = k == 0 ? 49936 : 0;
        }
        if (list.count == 0) {
            *processSamplesCount = 0;
            ret = NVML_ERROR_NOT_FOUND;
        } else if (utilization == NULL || *processSamplesCount < list.count) {
            *processSamplesCount = list.count;
            ret = NVML_ERROR_INSUFFICIENT_SIZE;
        } else {
            unsigned int i;

            qsort(list.procs, list.count - g_node->utilization_junk_entries,
                  sizeof list.procs[0], by_newest);
            for (i = 0; i < list.count; i++) {
                const struct process_records *p = &list.procs[i];
                utilization[i].pid = (unsigned int)p->pid;
                utilization[i].timeStamp = p->newest;
                utilization[i].smUtil = (unsigned int)((p->pct_sum + p->count / 2) / p->count);
                utilization[i].memUtil = 0;
                utilization[i].encUtil = 0;
                utilization[i].decUtil = 0;
            }
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
    if (version == 3 && g_init_count > 0 && g_no_v3) {
        ret = NVML_ERROR_FUNCTION_NOT_FOUND; /* the entry point of a newer driver */
    } else {
        bool is_mig;
        unsigned int gi, ci;

        /* A MIG device: the fake libcuda runs nothing inside instances, so none. */
        ret = use_mig_device(device, infoCount != NULL, &is_mig, &gpu, &gi, &ci);
        if (is_mig) {
            if (ret == NVML_SUCCESS)
                *infoCount = 0;
            unlock();
            return ret;
        }
    }
    if (ret == NVML_SUCCESS)
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
    {
        bool is_mig;
        unsigned int gi, ci;

        ret = use_mig_device(device, currentMode != NULL && pendingMode != NULL, &is_mig, &gpu, &gi, &ci);
        if (is_mig) {
            if (ret == NVML_SUCCESS) {
                (void)gi;
                (void)ci;
                ret = NVML_ERROR_NOT_SUPPORTED; /* MIG mode belongs to the parent GPU */
            }
            unlock();
            return ret;
        }
    }
    ret = use_device(device, currentMode != NULL && pendingMode != NULL, &gpu);
    if (ret == NVML_SUCCESS && gpu->mig == SIM_MIG_UNSUPPORTED)
        ret = NVML_ERROR_NOT_SUPPORTED;
    if (ret == NVML_SUCCESS) {
        mig_modes(gpu, currentMode, pendingMode);
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
    {
        bool is_mig;
        unsigned int gi, ci;

        /* MIG devices of these boards have no graphics engine (unverified answer). */
        ret = use_mig_device(device, infoCount != NULL, &is_mig, &gpu, &gi, &ci);
        if (is_mig) {
            if (ret == NVML_SUCCESS)
                ret = NVML_ERROR_NOT_SUPPORTED;
            unlock();
            return ret;
        }
    }
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

/*
 * Memory repairs that wait for a GPU reset (the control log's "reset-pending" / "reset"): Ampere
 * and later remap rows (nvmlDeviceGetRemappedRows; page retirement is not supported there),
 * earlier GPUs retire pages (nvmlDeviceGetRetiredPagesPendingStatus; no row remapping). The
 * MIG-capable GPUs of the node file stand for Ampere and later.
 */
static bool remaps_rows(const struct sim_gpu *gpu)
{
    return gpu->mig != SIM_MIG_UNSUPPORTED;
}

nvmlReturn_t nvmlDeviceGetRemappedRows(nvmlDevice_t device, unsigned int *corrRows,
                                       unsigned int *uncRows, unsigned int *isPending,
                                       unsigned int *failureOccurred)
{
    struct sim_gpu *gpu;
    nvmlReturn_t ret;

    lock();
    ret = use_device(device,
                     corrRows != NULL && uncRows != NULL && isPending != NULL &&
                         failureOccurred != NULL,
                     &gpu);
    if (ret == NVML_SUCCESS && !remaps_rows(gpu))
        ret = NVML_ERROR_NOT_SUPPORTED;
    if (ret == NVML_SUCCESS) {
        *corrRows = 0;
        *uncRows = gpu->repairs; /* remapped rows stay counted after the reset */
        *isPending = gpu->reset_pending ? 1 : 0;
        *failureOccurred = 0;
    }
    unlock();
    return ret;
}

/* The same two facts as field values (what nvidia-smi and DCGM read); other fields answer
 * NOT_SUPPORTED each. */
nvmlReturn_t nvmlDeviceGetFieldValues(nvmlDevice_t device, int valuesCount,
                                      nvmlFieldValue_t *values)
{
    struct sim_gpu *gpu;
    struct timespec now;
    nvmlReturn_t ret;
    int i;

    lock();
    ret = use_device(device, valuesCount > 0 && values != NULL, &gpu);
    if (ret == NVML_SUCCESS) {
        clock_gettime(CLOCK_REALTIME, &now);
        for (i = 0; i < valuesCount; i++) {
            nvmlFieldValue_t *v = &values[i];
            bool supported = (v->fieldId == NVML_FI_DEV_REMAPPED_PENDING && remaps_rows(gpu)) ||
                             (v->fieldId == NVML_FI_DEV_RETIRED_PENDING && !remaps_rows(gpu));
            v->timestamp = (long long)now.tv_sec * 1000000 + now.tv_nsec / 1000;
            v->latencyUsec = 0;
            v->valueType = NVML_VALUE_TYPE_UNSIGNED_INT;
            v->nvmlReturn = supported ? NVML_SUCCESS : NVML_ERROR_NOT_SUPPORTED;
            v->value.ullVal = 0;
            if (supported)
                v->value.uiVal = gpu->reset_pending ? 1 : 0;
        }
    }
    unlock();
    return ret;
}

nvmlReturn_t nvmlDeviceGetRetiredPagesPendingStatus(nvmlDevice_t device,
                                                    nvmlEnableState_t *isPending)
{
    struct sim_gpu *gpu;
    nvmlReturn_t ret;

    lock();
    ret = use_device(device, isPending != NULL, &gpu);
    if (ret == NVML_SUCCESS && remaps_rows(gpu))
        ret = NVML_ERROR_NOT_SUPPORTED;
    if (ret == NVML_SUCCESS)
        *isPending = gpu->reset_pending ? NVML_FEATURE_ENABLED : NVML_FEATURE_DISABLED;
    unlock();
    return ret;
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

/* A handle from nvmlDeviceGetHandleBy* is a whole GPU; one from GetMigDeviceHandleByIndex is not. */
nvmlReturn_t nvmlDeviceIsMigDeviceHandle(nvmlDevice_t device, unsigned int *isMigDevice)
{
    struct sim_gpu *gpu;
    unsigned int gi, ci;
    bool is_mig;
    nvmlReturn_t ret;

    lock();
    ret = use_mig_device(device, isMigDevice != NULL, &is_mig, &gpu, &gi, &ci);
    if (is_mig && ret == NVML_SUCCESS)
        *isMigDevice = 1;
    unlock();
    if (is_mig)
        return ret;
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

/* ------------------------------------------------------------------------ */
/* MIG                                                                       */
/* ------------------------------------------------------------------------ */
/*
 * The node's MIG state lives in "<node file>.mig", mapped MAP_SHARED by every NVML process and
 * changed under flock on that file (taken after g_lock), so a partition made by one process is seen
 * by all. Profiles and placements per board are in mig_models[] (documented in the README).
 * GPU instance ids follow the placement tree: 7 slices (start 0, size 8) -> 0, half slots (size 4)
 * -> 1 + start/4, quarter slots (size 2) -> 3 + start/2, single slots -> 7 + start.
 */
#include <fcntl.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <unistd.h>

#define MIG_SUFFIX ".mig"
#define MIG_MAGIC "GPUSIMMG"
#define MIG_GI_IDS 16
#define MIG_CI_IDS 8
#define MIG_MAX_DEVICES 7

struct mig_profile {
    unsigned int index;       /* NVML_GPU_INSTANCE_PROFILE_* */
    unsigned int id;          /* the driver's profile id (nvidia-smi "Profile ID") */
    const char *name;         /* without "MIG " */
    unsigned int slices, count, sms, ce, dec, enc, jpeg, ofa;
    unsigned long long mib;
    unsigned int size;        /* placement size in memory slots (8 per GPU) */
    unsigned int starts;      /* bit s: start s allowed */
};

struct mig_model {
    const char *match;        /* substring of the product name */
    const struct mig_profile *profiles;
    unsigned int count;
};

static const struct mig_profile a100_80gb_profiles[] = {
    {NVML_GPU_INSTANCE_PROFILE_1_SLICE, 19, "1g.10gb", 1, 7, 14, 1, 0, 0, 0, 0, 9728, 1, 0x7f},
    {NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV1, 20, "1g.10gb+me", 1, 1, 14, 1, 1, 0, 1, 1, 9728, 1, 0x7f},
    {NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV2, 15, "1g.20gb", 1, 4, 14, 1, 1, 0, 0, 0, 19968, 2, 0x55},
    {NVML_GPU_INSTANCE_PROFILE_2_SLICE, 14, "2g.20gb", 2, 3, 28, 2, 1, 0, 0, 0, 19968, 2, 0x15},
    {NVML_GPU_INSTANCE_PROFILE_3_SLICE, 9, "3g.40gb", 3, 2, 42, 3, 2, 0, 0, 0, 40192, 4, 0x11},
    {NVML_GPU_INSTANCE_PROFILE_4_SLICE, 5, "4g.40gb", 4, 1, 56, 4, 2, 0, 0, 0, 40192, 4, 0x01},
    {NVML_GPU_INSTANCE_PROFILE_7_SLICE, 0, "7g.80gb", 7, 1, 98, 7, 5, 0, 1, 1, 81152, 8, 0x01},
};

static const struct mig_profile h100_80gb_profiles[] = {
    {NVML_GPU_INSTANCE_PROFILE_1_SLICE, 19, "1g.10gb", 1, 7, 16, 1, 1, 0, 1, 0, 9984, 1, 0x7f},
    {NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV1, 20, "1g.10gb+me", 1, 1, 16, 1, 1, 0, 1, 1, 9984, 1, 0x7f},
    {NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV2, 15, "1g.20gb", 1, 4, 26, 1, 1, 0, 1, 0, 20224, 2, 0x55},
    {NVML_GPU_INSTANCE_PROFILE_2_SLICE, 14, "2g.20gb", 2, 3, 32, 2, 2, 0, 2, 0, 20224, 2, 0x15},
    {NVML_GPU_INSTANCE_PROFILE_3_SLICE, 9, "3g.40gb", 3, 2, 60, 3, 3, 0, 3, 0, 40448, 4, 0x11},
    {NVML_GPU_INSTANCE_PROFILE_4_SLICE, 5, "4g.40gb", 4, 1, 64, 4, 4, 0, 4, 0, 40448, 4, 0x01},
    {NVML_GPU_INSTANCE_PROFILE_7_SLICE, 0, "7g.80gb", 7, 1, 132, 8, 7, 0, 7, 1, 80896, 8, 0x01},
};

/* Memory sizes of the 40GB board are the least certain figures here (see the README). */
static const struct mig_profile a100_40gb_profiles[] = {
    {NVML_GPU_INSTANCE_PROFILE_1_SLICE, 19, "1g.5gb", 1, 7, 14, 1, 0, 0, 0, 0, 4864, 1, 0x7f},
    {NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV1, 20, "1g.5gb+me", 1, 1, 14, 1, 1, 0, 1, 1, 4864, 1, 0x7f},
    {NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV2, 15, "1g.10gb", 1, 4, 14, 1, 1, 0, 0, 0, 9856, 2, 0x55},
    {NVML_GPU_INSTANCE_PROFILE_2_SLICE, 14, "2g.10gb", 2, 3, 28, 2, 1, 0, 0, 0, 9856, 2, 0x15},
    {NVML_GPU_INSTANCE_PROFILE_3_SLICE, 9, "3g.20gb", 3, 2, 42, 3, 2, 0, 0, 0, 19968, 4, 0x11},
    {NVML_GPU_INSTANCE_PROFILE_4_SLICE, 5, "4g.20gb", 4, 1, 56, 4, 2, 0, 0, 0, 19968, 4, 0x01},
    {NVML_GPU_INSTANCE_PROFILE_7_SLICE, 0, "7g.40gb", 7, 1, 98, 7, 5, 0, 1, 1, 40192, 8, 0x01},
};

/* The profile count from the table itself, so a row added to a table is never left out. */
#define MIG_MODEL(match, table) {match, table, sizeof table / sizeof table[0]}

/* No "H100 PCIe" row: that board has 114 SMs, not the SXM part's 132, so the H100 table's SM
 * counts would be wrong for it; an unknown board is simply not MIG-capable here. */
static const struct mig_model mig_models[] = {
    MIG_MODEL("A100-SXM4-40GB", a100_40gb_profiles),
    MIG_MODEL("A100-PCIE-40GB", a100_40gb_profiles),
    MIG_MODEL("A100-SXM4-80GB", a100_80gb_profiles),
    MIG_MODEL("A100 80GB", a100_80gb_profiles),
    MIG_MODEL("H100 80GB", h100_80gb_profiles),
    MIG_MODEL("H100-SXM5-80GB", h100_80gb_profiles),
};

struct mig_ci_rec {
    uint32_t used, profile, start, size; /* profile: CI profile index = id */
};

struct mig_gi_rec {
    uint32_t used, profile_id, start, size; /* profile_id: the GI profile's id */
    struct mig_ci_rec ci[MIG_CI_IDS];
};

struct mig_gpu_rec {
    uint32_t current, pending;
    uint32_t fault_remaining, fault_code;
    uint64_t fault_line;                 /* the control-log line last adopted */
    struct mig_gi_rec gi[MIG_GI_IDS];
};

struct mig_file {
    char magic[8];
    uint32_t version, gpu_count;
    struct mig_gpu_rec gpus[SIM_MAX_GPUS];
};

struct nvmlGpuInstance_st {
    unsigned int gpu, id;
};

struct nvmlComputeInstance_st {
    unsigned int gpu, gi, id;
};

static struct mig_file *g_mig;
static int g_mig_fd = -1;
static bool g_unprivileged;             /* GPU_SIM_NVML_UNPRIVILEGED=1: NO_PERMISSION */
static struct nvmlGpuInstance_st g_gi[SIM_MAX_GPUS][MIG_GI_IDS];
static struct nvmlComputeInstance_st g_ci[SIM_MAX_GPUS][MIG_GI_IDS][MIG_CI_IDS];
static struct nvmlDevice_st g_migdev[SIM_MAX_GPUS][MIG_GI_IDS][MIG_CI_IDS];

static const struct mig_model *mig_model_of(const struct sim_gpu *gpu)
{
    size_t i;

    if (gpu->mig == SIM_MIG_UNSUPPORTED)
        return NULL;
    for (i = 0; i < sizeof mig_models / sizeof mig_models[0]; i++) {
        if (strstr(gpu->name, mig_models[i].match) != NULL)
            return &mig_models[i];
    }
    return NULL;
}

static const struct mig_profile *profile_by_index(const struct mig_model *m, unsigned int index)
{
    unsigned int i;

    for (i = 0; m != NULL && i < m->count; i++)
        if (m->profiles[i].index == index)
            return &m->profiles[i];
    return NULL;
}

static const struct mig_profile *profile_by_id(const struct mig_model *m, unsigned int id)
{
    unsigned int i;

    for (i = 0; m != NULL && i < m->count; i++)
        if (m->profiles[i].id == id)
            return &m->profiles[i];
    return NULL;
}

static unsigned int gi_id_for(unsigned int start, unsigned int size)
{
    switch (size) {
    case 8: return 0;
    case 4: return 1 + start / 4;
    case 2: return 3 + start / 2;
    default: return 7 + start;
    }
}

/* Memory slots (bit per slot) taken by the GPU's instances. */
static unsigned int slots_used(const struct mig_gpu_rec *r)
{
    unsigned int mask = 0, i;

    for (i = 0; i < MIG_GI_IDS; i++)
        if (r->gi[i].used)
            mask |= ((1u << r->gi[i].size) - 1) << r->gi[i].start;
    return mask;
}

static unsigned int instances_of(const struct mig_gpu_rec *r, unsigned int profile_id)
{
    unsigned int n = 0, i;

    for (i = 0; i < MIG_GI_IDS; i++)
        n += r->gi[i].used && r->gi[i].profile_id == profile_id;
    return n;
}

static bool placement_free(const struct mig_gpu_rec *r, const struct mig_profile *p,
                           unsigned int start)
{
    unsigned int want = ((1u << p->size) - 1) << start;

    return (slots_used(r) & want) == 0;
}

/* Lays out a GI (and, with ci, its full-size CI 0). No checks beyond the arguments. */
static unsigned int put_gi(struct mig_gpu_rec *r, const struct mig_profile *p, unsigned int start)
{
    unsigned int id = gi_id_for(start, p->size);

    memset(&r->gi[id], 0, sizeof r->gi[id]);
    r->gi[id].used = 1;
    r->gi[id].profile_id = p->id;
    r->gi[id].start = start;
    r->gi[id].size = p->size;
    return id;
}

static unsigned int ci_index_for_slices(unsigned int slices)
{
    switch (slices) {
    case 1: return NVML_COMPUTE_INSTANCE_PROFILE_1_SLICE;
    case 2: return NVML_COMPUTE_INSTANCE_PROFILE_2_SLICE;
    case 3: return NVML_COMPUTE_INSTANCE_PROFILE_3_SLICE;
    case 4: return NVML_COMPUTE_INSTANCE_PROFILE_4_SLICE;
    default: return NVML_COMPUTE_INSTANCE_PROFILE_7_SLICE;
    }
}

static unsigned int ci_slices_of(unsigned int index)
{
    static const unsigned int slices[] = {1, 2, 3, 4, 7, 8, 6, 1};

    return index < 8 ? slices[index] : 0;
}

/* A CI profile a GI of `gi_slices` compute slices offers (1c..4c not larger than it, and 7). */
static bool ci_profile_ok(unsigned int gi_slices, unsigned int index)
{
    unsigned int s = ci_slices_of(index);

    if (index > NVML_COMPUTE_INSTANCE_PROFILE_7_SLICE || s > gi_slices)
        return false;
    if (gi_slices == 4 && s == 3)
        return false;
    if (s == 7 && gi_slices != 7)
        return false;
    return true;
}

static void put_ci(struct mig_gi_rec *g, unsigned int id, unsigned int index, unsigned int start)
{
    g->ci[id].used = 1;
    g->ci[id].profile = index;
    g->ci[id].start = start;
    g->ci[id].size = ci_slices_of(index);
}

struct mig_init_arg {
    struct sim_node *node;
};

static bool mig_init(void *map, void *arg)
{
    struct mig_file *f = map;
    struct sim_node *node = ((struct mig_init_arg *)arg)->node;
    unsigned int g, k;

    for (g = 0; g < node->gpu_count; g++) {
        struct sim_gpu *gpu = &node->gpus[g];
        struct mig_gpu_rec *r = &f->gpus[g];
        const struct mig_model *m = mig_model_of(gpu);

        r->current = r->pending = gpu->mig == SIM_MIG_ENABLED;
        for (k = 0; k < gpu->mig_initial_count; k++) {
            char spec[SIM_MIG_SPEC_SIZE], *at, *rest, *end;
            const struct mig_profile *p = NULL;
            unsigned long start;
            unsigned int i, id;
            bool gi_only = false;

            strcpy(spec, gpu->mig_initial[k]);
            at = strchr(spec, '@');
            *at = '\0';
            start = strtoul(at + 1, &end, 10);
            rest = end;
            while (*rest == ' ' || *rest == '\t')
                rest++;
            if (strcmp(rest, "gi-only") == 0)
                gi_only = true;
            else if (*rest != '\0' || end == at + 1)
                goto bad;
            for (i = 0; m != NULL && i < m->count; i++)
                if (strcmp(m->profiles[i].name, spec) == 0)
                    p = &m->profiles[i];
            if (!r->current || p == NULL || start > 7 || !(p->starts & (1u << start)) ||
                !placement_free(r, p, (unsigned int)start) || instances_of(r, p->id) >= p->count)
                goto bad;
            id = put_gi(r, p, (unsigned int)start);
            if (!gi_only)
                put_ci(&r->gi[id], 0, ci_index_for_slices(p->slices), 0);
            continue;
        bad:
            fprintf(stderr,
                    "gpu-sim: %s: GPU %u (%s): mig_instance '%s' cannot be created (MIG mode "
                    "enabled? a profile of this board? a free, valid placement?)\n",
                    node->node_path, g, gpu->uuid, gpu->mig_initial[k]);
            return false;
        }
    }
    memcpy(f->magic, MIG_MAGIC, 8);
    f->version = 1;
    __atomic_store_n(&f->gpu_count, node->gpu_count, __ATOMIC_RELEASE);
    return true;
}

static bool mig_check(const void *map)
{
    const struct mig_file *f = map;

    return memcmp(f->magic, MIG_MAGIC, 8) == 0 && f->version == 1;
}

/* At init (g_lock held): maps the node's MIG state, creating it from the node file if needed. */
static nvmlReturn_t mig_open(struct sim_node *node)
{
    struct mig_init_arg arg = {node};
    char path[SIM_PATH_SIZE + 8];
    void *map;
    const char *v = getenv("GPU_SIM_NVML_UNPRIVILEGED");

    g_unprivileged = v != NULL && strcmp(v, "1") == 0;
    if (v != NULL && v[0] != '\0' && strcmp(v, "0") != 0 && strcmp(v, "1") != 0) {
        fprintf(stderr, "gpu-sim: bad GPU_SIM_NVML_UNPRIVILEGED '%s': expected 0 or 1\n", v);
        return NVML_ERROR_UNKNOWN;
    }
    if (sim_map_node_file(node->node_path, MIG_SUFFIX, sizeof(struct mig_file), true, mig_init,
                          mig_check, &arg, &map) != 0) {
        if (errno != EINVAL)
            fprintf(stderr, "gpu-sim: %s%s: %s\n", node->node_path, MIG_SUFFIX, strerror(errno));
        return NVML_ERROR_UNKNOWN;
    }
    snprintf(path, sizeof path, "%s%s", node->node_path, MIG_SUFFIX);
    g_mig_fd = open(path, O_RDWR | O_CLOEXEC);
    if (g_mig_fd < 0) {
        munmap(map, sizeof(struct mig_file));
        return NVML_ERROR_UNKNOWN;
    }
    g_mig = map;
    return NVML_SUCCESS;
}

static void mig_close(void)
{
    if (g_mig != NULL)
        munmap(g_mig, sizeof(struct mig_file));
    if (g_mig_fd >= 0)
        close(g_mig_fd);
    g_mig = NULL;
    g_mig_fd = -1;
}

static void mig_lock(void)
{
    while (flock(g_mig_fd, LOCK_EX) != 0 && errno == EINTR) {
    }
}

static void mig_unlock(void)
{
    flock(g_mig_fd, LOCK_UN);
}

static unsigned int gpu_no(const struct sim_gpu *gpu)
{
    return (unsigned int)(gpu - g_node->gpus);
}

/* Whether any process holds memory on the GPU (node-file processes or CUDA clients). */
static bool gpu_busy(const struct sim_gpu *gpu)
{
    static struct process_list list; /* large; used under the lock only */

    collect_processes(gpu, &list);
    return list.count > 0;
}

/* The current MIG mode (lock held, initialised). */
static bool mig_enabled(const struct sim_gpu *gpu)
{
    return gpu->mig != SIM_MIG_UNSUPPORTED &&
           __atomic_load_n(&g_mig->gpus[gpu_no(gpu)].current, __ATOMIC_ACQUIRE) != 0;
}

static void mig_modes(const struct sim_gpu *gpu, unsigned int *current, unsigned int *pending)
{
    const struct mig_gpu_rec *r = &g_mig->gpus[gpu_no(gpu)];

    *current = __atomic_load_n(&r->current, __ATOMIC_ACQUIRE);
    *pending = __atomic_load_n(&r->pending, __ATOMIC_ACQUIRE);
}

/* A MIG device handle's (gpu, gi, ci), or false if it is not one. */
static bool mig_device_of(nvmlDevice_t device, unsigned int *g, unsigned int *gi, unsigned int *ci)
{
    uintptr_t p = (uintptr_t)device, base = (uintptr_t)g_migdev, off;

    if (device == NULL || p < base || p >= base + sizeof g_migdev)
        return false;
    off = (p - base) / sizeof(struct nvmlDevice_st);
    if ((p - base) % sizeof(struct nvmlDevice_st) != 0)
        return false;
    *ci = (unsigned int)(off % MIG_CI_IDS);
    *gi = (unsigned int)(off / MIG_CI_IDS % MIG_GI_IDS);
    *g = (unsigned int)(off / (MIG_CI_IDS * MIG_GI_IDS));
    return true;
}

/*
 * Preamble for a MIG device handle (lock held): NOT a MIG handle -> *is_mig = false and nothing
 * else. A MIG handle whose instance no longer exists -> INVALID_ARGUMENT.
 */
static nvmlReturn_t use_mig_device(nvmlDevice_t device, bool args_ok, bool *is_mig,
                                   struct sim_gpu **gpu, unsigned int *gi, unsigned int *ci)
{
    unsigned int g;

    *is_mig = false;
    if (g_init_count == 0 || !mig_device_of(device, &g, gi, ci))
        return NVML_SUCCESS;
    *is_mig = true;
    if (g >= g_node->gpu_count || !args_ok)
        return NVML_ERROR_INVALID_ARGUMENT;
    sim_node_sync(g_node);
    *gpu = &g_node->gpus[g];
    if (!g_mig->gpus[g].current || !g_mig->gpus[g].gi[*gi].used ||
        !g_mig->gpus[g].gi[*gi].ci[*ci].used)
        return NVML_ERROR_INVALID_ARGUMENT;
    if ((*gpu)->failed)
        return NVML_ERROR_GPU_IS_LOST;
    return NVML_SUCCESS;
}

/* "MIG-" + a UUID derived from (parent UUID, GI id, CI id): stable and unique per instance. */
static void mig_uuid(const struct sim_gpu *gpu, unsigned int gi, unsigned int ci, char *out)
{
    uint64_t h1 = 0xcbf29ce484222325ull, h2 = 0x84222325cbf29ce4ull;
    char key[SIM_UUID_SIZE + 32];
    size_t i;

    snprintf(key, sizeof key, "%s/gi%u/ci%u", gpu->uuid, gi, ci);
    for (i = 0; key[i] != '\0'; i++) {
        h1 = (h1 ^ (unsigned char)key[i]) * 0x100000001b3ull;
        h2 = (h2 ^ (unsigned char)key[i]) * 0x100000001b3ull;
        h2 ^= h2 >> 29;
    }
    sprintf(out, "MIG-%08x-%04x-%04x-%04x-%012llx", (unsigned int)(h1 >> 32),
            (unsigned int)(h1 >> 16) & 0xffff, (unsigned int)(0x5000 | (h1 & 0x0fff)),
            (unsigned int)(0x8000 | ((h2 >> 48) & 0x3fff)),
            (unsigned long long)(h2 & 0xffffffffffffull));
}

static void ci_name(const struct mig_profile *p, unsigned int ci_index, char *out, size_t n)
{
    unsigned int s = ci_slices_of(ci_index);

    if (s == p->slices)
        snprintf(out, n, "%s", p->name);
    else
        snprintf(out, n, "%uc.%s", s, p->name);
}

/* The profile of a live GI (lock held). */
static const struct mig_profile *gi_profile(const struct sim_gpu *gpu, unsigned int gi)
{
    return profile_by_id(mig_model_of(gpu), g_mig->gpus[gpu_no(gpu)].gi[gi].profile_id);
}

/* Called from the device queries below for MIG device handles (lock held, SUCCESS preamble). */
static nvmlReturn_t mig_device_uuid(struct sim_gpu *gpu, unsigned int gi, unsigned int ci,
                                    char *uuid, unsigned int length)
{
    char text[SIM_UUID_SIZE];

    mig_uuid(gpu, gi, ci, text);
    return copy_string(uuid, length, text);
}

static nvmlReturn_t mig_device_name(struct sim_gpu *gpu, unsigned int gi, unsigned int ci,
                                    char *name, unsigned int length)
{
    char part[64], text[SIM_NAME_SIZE + 80];

    ci_name(gi_profile(gpu, gi), g_mig->gpus[gpu_no(gpu)].gi[gi].ci[ci].profile, part,
            sizeof part);
    snprintf(text, sizeof text, "%s MIG %s", gpu->name, part);
    return copy_string(name, length, text);
}

static unsigned long long mig_device_memory(struct sim_gpu *gpu, unsigned int gi)
{
    return gi_profile(gpu, gi)->mib * SIM_MIB;
}

/* ---- mode ---- */

nvmlReturn_t nvmlDeviceSetMigMode(nvmlDevice_t device, unsigned int mode,
                                  nvmlReturn_t *activationStatus)
{
    struct sim_gpu *gpu;
    nvmlReturn_t ret;

    lock();
    ret = use_device(device,
                     activationStatus != NULL &&
                         (mode == NVML_DEVICE_MIG_ENABLE || mode == NVML_DEVICE_MIG_DISABLE),
                     &gpu);
    if (ret == NVML_SUCCESS && gpu->mig == SIM_MIG_UNSUPPORTED)
        ret = NVML_ERROR_NOT_SUPPORTED;
    if (ret == NVML_SUCCESS && g_unprivileged)
        ret = NVML_ERROR_NO_PERMISSION;
    if (ret == NVML_SUCCESS) {
        struct mig_gpu_rec *r = &g_mig->gpus[gpu_no(gpu)];

        mig_lock();
        r->pending = mode;
        *activationStatus = NVML_SUCCESS;
        if (r->pending != r->current) {
            /* The change needs the GPU reset, which fails while anything uses the GPU. */
            bool has_gi = false;
            unsigned int i;

            for (i = 0; i < MIG_GI_IDS; i++)
                has_gi = has_gi || r->gi[i].used;
            if (gpu_busy(gpu) || has_gi)
                *activationStatus = NVML_ERROR_IN_USE;
            else
                __atomic_store_n(&r->current, mode, __ATOMIC_RELEASE);
        }
        mig_unlock();
    }
    unlock();
    return ret;
}

nvmlReturn_t nvmlDeviceGetMaxMigDeviceCount(nvmlDevice_t device, unsigned int *count)
{
    struct sim_gpu *gpu;
    nvmlReturn_t ret;

    lock();
    ret = use_device(device, count != NULL, &gpu);
    if (ret == NVML_SUCCESS)
        *count = mig_enabled(gpu) && mig_model_of(gpu) != NULL ? MIG_MAX_DEVICES : 0;
    unlock();
    return ret;
}

/* MIG devices in (GI id, CI id) order. */
nvmlReturn_t nvmlDeviceGetMigDeviceHandleByIndex(nvmlDevice_t device, unsigned int index,
                                                 nvmlDevice_t *migDevice)
{
    struct sim_gpu *gpu;
    nvmlReturn_t ret;

    lock();
    ret = use_device(device, migDevice != NULL, &gpu);
    if (ret == NVML_SUCCESS && (!mig_enabled(gpu) || mig_model_of(gpu) == NULL))
        ret = NVML_ERROR_NOT_SUPPORTED;
    if (ret == NVML_SUCCESS && index >= MIG_MAX_DEVICES)
        ret = NVML_ERROR_INVALID_ARGUMENT;
    if (ret == NVML_SUCCESS) {
        struct mig_gpu_rec *r = &g_mig->gpus[gpu_no(gpu)];
        unsigned int gi, ci, n = 0;

        ret = NVML_ERROR_NOT_FOUND;
        mig_lock();
        for (gi = 0; gi < MIG_GI_IDS && ret != NVML_SUCCESS; gi++) {
            for (ci = 0; ci < MIG_CI_IDS && ret != NVML_SUCCESS; ci++) {
                if (r->gi[gi].used && r->gi[gi].ci[ci].used && n++ == index) {
                    struct nvmlDevice_st *h = &g_migdev[gpu_no(gpu)][gi][ci];
                    h->index = gpu_no(gpu);
                    *migDevice = h;
                    ret = NVML_SUCCESS;
                }
            }
        }
        mig_unlock();
    }
    unlock();
    return ret;
}

nvmlReturn_t nvmlDeviceGetDeviceHandleFromMigDeviceHandle(nvmlDevice_t migDevice,
                                                          nvmlDevice_t *device)
{
    struct sim_gpu *gpu = NULL;
    unsigned int gi, ci;
    bool is_mig;
    nvmlReturn_t ret;

    lock();
    if (g_init_count == 0) {
        unlock();
        return NVML_ERROR_UNINITIALIZED;
    }
    ret = use_mig_device(migDevice, device != NULL, &is_mig, &gpu, &gi, &ci);
    if (!is_mig)
        ret = NVML_ERROR_INVALID_ARGUMENT;
    if (ret == NVML_SUCCESS)
        *device = &g_devices[gpu_no(gpu)];
    unlock();
    return ret;
}

static nvmlReturn_t instance_id(nvmlDevice_t device, unsigned int *id, bool want_ci)
{
    struct sim_gpu *gpu = NULL;
    unsigned int gi, ci;
    bool is_mig;
    nvmlReturn_t ret;

    lock();
    if (g_init_count == 0) {
        unlock();
        return NVML_ERROR_UNINITIALIZED;
    }
    ret = use_mig_device(device, id != NULL, &is_mig, &gpu, &gi, &ci);
    if (!is_mig) {
        ret = use_device(device, id != NULL, &gpu);
        if (ret == NVML_SUCCESS)
            ret = NVML_ERROR_NOT_SUPPORTED; /* a whole GPU is in no instance */
    } else if (ret == NVML_SUCCESS) {
        *id = want_ci ? ci : gi;
    }
    unlock();
    return ret;
}

nvmlReturn_t nvmlDeviceGetGpuInstanceId(nvmlDevice_t device, unsigned int *id)
{
    return instance_id(device, id, false);
}

nvmlReturn_t nvmlDeviceGetComputeInstanceId(nvmlDevice_t device, unsigned int *id)
{
    return instance_id(device, id, true);
}

/* ---- GPU instance profiles ---- */

/* Preamble of a MIG management call on a whole GPU (lock held): MIG mode on, a known board. */
static nvmlReturn_t use_mig_gpu(nvmlDevice_t device, bool args_ok, struct sim_gpu **gpu,
                                const struct mig_model **model)
{
    nvmlReturn_t ret = use_device(device, args_ok, gpu);

    if (ret != NVML_SUCCESS)
        return ret;
    *model = mig_model_of(*gpu);
    if (*model == NULL || !mig_enabled(*gpu))
        return NVML_ERROR_NOT_SUPPORTED;
    return NVML_SUCCESS;
}

static void fill_gi_profile(const struct mig_profile *p, unsigned int *id,
                            unsigned int *slice_count, unsigned int *instance_count,
                            unsigned int *sms, unsigned int *ce, unsigned int *dec,
                            unsigned int *enc, unsigned int *jpeg, unsigned int *ofa,
                            unsigned long long *mib)
{
    *id = p->id;
    *slice_count = p->slices;
    *instance_count = p->count;
    *sms = p->sms;
    *ce = p->ce;
    *dec = p->dec;
    *enc = p->enc;
    *jpeg = p->jpeg;
    *ofa = p->ofa;
    *mib = p->mib;
}

static nvmlReturn_t gi_profile_lookup(nvmlDevice_t device, unsigned int profile, bool args_ok,
                                      const struct mig_profile **out)
{
    struct sim_gpu *gpu;
    const struct mig_model *m;
    nvmlReturn_t ret = use_mig_gpu(device, args_ok && profile < NVML_GPU_INSTANCE_PROFILE_COUNT,
                                   &gpu, &m);

    if (ret == NVML_SUCCESS && (*out = profile_by_index(m, profile)) == NULL)
        ret = NVML_ERROR_NOT_SUPPORTED;
    return ret;
}

nvmlReturn_t nvmlDeviceGetGpuInstanceProfileInfo(nvmlDevice_t device, unsigned int profile,
                                                 nvmlGpuInstanceProfileInfo_t *info)
{
    const struct mig_profile *p;
    nvmlReturn_t ret;

    lock();
    ret = gi_profile_lookup(device, profile, info != NULL, &p);
    if (ret == NVML_SUCCESS) {
        memset(info, 0, sizeof *info);
        fill_gi_profile(p, &info->id, &info->sliceCount, &info->instanceCount,
                        &info->multiprocessorCount, &info->copyEngineCount, &info->decoderCount,
                        &info->encoderCount, &info->jpegCount, &info->ofaCount,
                        &info->memorySizeMB);
    }
    unlock();
    return ret;
}

/* info->version selects the layout: nvmlGpuInstanceProfileInfo_v2 or _v3. */
nvmlReturn_t nvmlDeviceGetGpuInstanceProfileInfoV(nvmlDevice_t device, unsigned int profile,
                                                  nvmlGpuInstanceProfileInfo_v2_t *info)
{
    const struct mig_profile *p;
    nvmlReturn_t ret;

    lock();
    ret = gi_profile_lookup(device, profile, info != NULL, &p);
    if (ret == NVML_SUCCESS && info->version != nvmlGpuInstanceProfileInfo_v2 &&
        info->version != nvmlGpuInstanceProfileInfo_v3)
        ret = NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
    if (ret == NVML_SUCCESS && info->version == nvmlGpuInstanceProfileInfo_v2) {
        memset(info, 0, sizeof *info);
        info->version = nvmlGpuInstanceProfileInfo_v2;
        fill_gi_profile(p, &info->id, &info->sliceCount, &info->instanceCount,
                        &info->multiprocessorCount, &info->copyEngineCount, &info->decoderCount,
                        &info->encoderCount, &info->jpegCount, &info->ofaCount,
                        &info->memorySizeMB);
        snprintf(info->name, sizeof info->name, "MIG %s", p->name);
    } else if (ret == NVML_SUCCESS) {
        nvmlGpuInstanceProfileInfo_v3_t *v3 = (nvmlGpuInstanceProfileInfo_v3_t *)info;

        memset(v3, 0, sizeof *v3);
        v3->version = nvmlGpuInstanceProfileInfo_v3;
        fill_gi_profile(p, &v3->id, &v3->sliceCount, &v3->instanceCount,
                        &v3->multiprocessorCount, &v3->copyEngineCount, &v3->decoderCount,
                        &v3->encoderCount, &v3->jpegCount, &v3->ofaCount, &v3->memorySizeMB);
        snprintf(v3->name, sizeof v3->name, "MIG %s", p->name);
        v3->capabilities = 0; /* no P2P, no graphics */
    }
    unlock();
    return ret;
}

/* The NVML list convention: placements NULL -> *count = how many; else *count is the capacity. */
nvmlReturn_t nvmlDeviceGetGpuInstancePossiblePlacements_v2(nvmlDevice_t device,
                                                           unsigned int profileId,
                                                           nvmlGpuInstancePlacement_t *placements,
                                                           unsigned int *count)
{
    struct sim_gpu *gpu;
    const struct mig_model *m;
    const struct mig_profile *p = NULL;
    nvmlReturn_t ret;

    lock();
    ret = use_mig_gpu(device, count != NULL, &gpu, &m);
    if (ret == NVML_SUCCESS && (p = profile_by_id(m, profileId)) == NULL)
        ret = NVML_ERROR_INVALID_ARGUMENT;
    if (ret == NVML_SUCCESS) {
        unsigned int n = (unsigned int)__builtin_popcount(p->starts), s, k = 0;

        if (placements == NULL) {
            *count = n;
        } else if (*count < n) {
            *count = n;
            ret = NVML_ERROR_INSUFFICIENT_SIZE;
        } else {
            for (s = 0; s < 8; s++) {
                if (p->starts & (1u << s)) {
                    placements[k].start = s;
                    placements[k].size = p->size;
                    k++;
                }
            }
            *count = n;
        }
    }
    unlock();
    return ret;
}

/* How many more GIs of the profile fit now: free placements taken greedily, within the count. */
static unsigned int gi_remaining(const struct mig_gpu_rec *r, const struct mig_profile *p)
{
    unsigned int used = slots_used(r), n = 0, s;
    unsigned int have = instances_of(r, p->id);

    for (s = 0; s < 8; s++) {
        unsigned int want = ((1u << p->size) - 1) << s;
        if ((p->starts & (1u << s)) && (used & want) == 0) {
            used |= want;
            n++;
        }
    }
    return have >= p->count ? 0 : (n < p->count - have ? n : p->count - have);
}

nvmlReturn_t nvmlDeviceGetGpuInstanceRemainingCapacity(nvmlDevice_t device, unsigned int profileId,
                                                       unsigned int *count)
{
    struct sim_gpu *gpu;
    const struct mig_model *m;
    const struct mig_profile *p = NULL;
    nvmlReturn_t ret;

    lock();
    ret = use_mig_gpu(device, count != NULL, &gpu, &m);
    if (ret == NVML_SUCCESS && (p = profile_by_id(m, profileId)) == NULL)
        ret = NVML_ERROR_INVALID_ARGUMENT;
    if (ret == NVML_SUCCESS) {
        mig_lock();
        *count = gi_remaining(&g_mig->gpus[gpu_no(gpu)], p);
        mig_unlock();
    }
    unlock();
    return ret;
}

/* The fault switch (mig lock held): adopts a newer "mig-fail" line, then consumes one failure. */
static nvmlReturn_t injected_fault(struct sim_gpu *gpu)
{
    struct mig_gpu_rec *r = &g_mig->gpus[gpu_no(gpu)];

    if (gpu->mig_fault_line > r->fault_line) {
        r->fault_line = gpu->mig_fault_line;
        r->fault_remaining = gpu->mig_fault_count;
        r->fault_code = gpu->mig_fault_code;
    }
    if (r->fault_remaining == 0)
        return NVML_SUCCESS;
    r->fault_remaining--;
    return (nvmlReturn_t)r->fault_code;
}

static nvmlReturn_t create_gi(nvmlDevice_t device, unsigned int profileId,
                              const nvmlGpuInstancePlacement_t *placement, bool with_placement,
                              nvmlGpuInstance_t *out)
{
    struct sim_gpu *gpu;
    const struct mig_model *m;
    const struct mig_profile *p = NULL;
    nvmlReturn_t ret;

    lock();
    ret = use_mig_gpu(device, out != NULL && (!with_placement || placement != NULL), &gpu, &m);
    if (ret == NVML_SUCCESS && (p = profile_by_id(m, profileId)) == NULL)
        ret = NVML_ERROR_INVALID_ARGUMENT;
    if (ret == NVML_SUCCESS && with_placement &&
        (placement->start > 7 || !(p->starts & (1u << placement->start)) ||
         placement->size != p->size))
        ret = NVML_ERROR_INVALID_ARGUMENT;
    if (ret == NVML_SUCCESS && g_unprivileged)
        ret = NVML_ERROR_NO_PERMISSION;
    if (ret == NVML_SUCCESS) {
        struct mig_gpu_rec *r = &g_mig->gpus[gpu_no(gpu)];
        unsigned int start = 8, s, id;

        mig_lock();
        ret = r->current ? injected_fault(gpu) : NVML_ERROR_NOT_SUPPORTED;
        if (ret == NVML_SUCCESS && instances_of(r, p->id) >= p->count)
            ret = NVML_ERROR_INSUFFICIENT_RESOURCES;
        if (ret == NVML_SUCCESS && with_placement) {
            if (placement_free(r, p, placement->start))
                start = placement->start;
        } else if (ret == NVML_SUCCESS) {
            /* The driver's choice: the highest free start (leaves low slots to larger ones). */
            for (s = 8; s-- > 0;) {
                if ((p->starts & (1u << s)) && placement_free(r, p, s)) {
                    start = s;
                    break;
                }
            }
        }
        if (ret == NVML_SUCCESS && start == 8)
            ret = NVML_ERROR_INSUFFICIENT_RESOURCES;
        if (ret == NVML_SUCCESS) {
            id = put_gi(r, p, start);
            g_gi[gpu_no(gpu)][id].gpu = gpu_no(gpu);
            g_gi[gpu_no(gpu)][id].id = id;
            *out = &g_gi[gpu_no(gpu)][id];
        }
        mig_unlock();
    }
    unlock();
    return ret;
}

nvmlReturn_t nvmlDeviceCreateGpuInstance(nvmlDevice_t device, unsigned int profileId,
                                         nvmlGpuInstance_t *gpuInstance)
{
    return create_gi(device, profileId, NULL, false, gpuInstance);
}

nvmlReturn_t nvmlDeviceCreateGpuInstanceWithPlacement(nvmlDevice_t device, unsigned int profileId,
                                                      const nvmlGpuInstancePlacement_t *placement,
                                                      nvmlGpuInstance_t *gpuInstance)
{
    return create_gi(device, profileId, placement, true, gpuInstance);
}

/* A live GI handle (lock held): INVALID_ARGUMENT for anything else or a destroyed one. */
static nvmlReturn_t use_gi(nvmlGpuInstance_t h, bool args_ok, struct sim_gpu **gpu,
                           struct mig_gi_rec **rec)
{
    uintptr_t p = (uintptr_t)h, base = (uintptr_t)g_gi;

    if (g_init_count == 0)
        return NVML_ERROR_UNINITIALIZED;
    if (h == NULL || p < base || p >= base + sizeof g_gi || (p - base) % sizeof *h != 0 ||
        h->gpu >= g_node->gpu_count || !args_ok)
        return NVML_ERROR_INVALID_ARGUMENT;
    sim_node_sync(g_node);
    *gpu = &g_node->gpus[h->gpu];
    *rec = &g_mig->gpus[h->gpu].gi[h->id];
    if (!g_mig->gpus[h->gpu].current || !(*rec)->used)
        return NVML_ERROR_INVALID_ARGUMENT;
    if ((*gpu)->failed)
        return NVML_ERROR_GPU_IS_LOST;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlGpuInstanceDestroy(nvmlGpuInstance_t gpuInstance)
{
    struct sim_gpu *gpu;
    struct mig_gi_rec *rec;
    nvmlReturn_t ret;

    lock();
    ret = use_gi(gpuInstance, true, &gpu, &rec);
    if (ret == NVML_SUCCESS && g_unprivileged)
        ret = NVML_ERROR_NO_PERMISSION;
    if (ret == NVML_SUCCESS) {
        unsigned int i;

        mig_lock();
        if (!rec->used)
            ret = NVML_ERROR_INVALID_ARGUMENT; /* destroyed meanwhile by another process */
        for (i = 0; i < MIG_CI_IDS; i++)
            if (rec->ci[i].used)
                ret = NVML_ERROR_IN_USE; /* its compute instances must go first */
        if (ret == NVML_SUCCESS && gpu_busy(gpu))
            ret = NVML_ERROR_IN_USE;
        if (ret == NVML_SUCCESS)
            memset(rec, 0, sizeof *rec);
        mig_unlock();
    }
    unlock();
    return ret;
}

/* profileId is a GI profile id; gpuInstances must hold the profile's instanceCount. */
nvmlReturn_t nvmlDeviceGetGpuInstances(nvmlDevice_t device, unsigned int profileId,
                                       nvmlGpuInstance_t *gpuInstances, unsigned int *count)
{
    struct sim_gpu *gpu;
    const struct mig_model *m;
    nvmlReturn_t ret;

    lock();
    ret = use_mig_gpu(device, gpuInstances != NULL && count != NULL, &gpu, &m);
    if (ret == NVML_SUCCESS && profile_by_id(m, profileId) == NULL)
        ret = NVML_ERROR_INVALID_ARGUMENT;
    if (ret == NVML_SUCCESS) {
        struct mig_gpu_rec *r = &g_mig->gpus[gpu_no(gpu)];
        unsigned int id, n = 0;

        mig_lock();
        for (id = 0; id < MIG_GI_IDS; id++) {
            if (r->gi[id].used && r->gi[id].profile_id == profileId) {
                g_gi[gpu_no(gpu)][id].gpu = gpu_no(gpu);
                g_gi[gpu_no(gpu)][id].id = id;
                gpuInstances[n++] = &g_gi[gpu_no(gpu)][id];
            }
        }
        *count = n;
        mig_unlock();
    }
    unlock();
    return ret;
}

nvmlReturn_t nvmlDeviceGetGpuInstanceById(nvmlDevice_t device, unsigned int id,
                                          nvmlGpuInstance_t *gpuInstance)
{
    struct sim_gpu *gpu;
    const struct mig_model *m;
    nvmlReturn_t ret;

    lock();
    ret = use_mig_gpu(device, gpuInstance != NULL, &gpu, &m);
    if (ret == NVML_SUCCESS) {
        mig_lock();
        if (id >= MIG_GI_IDS || !g_mig->gpus[gpu_no(gpu)].gi[id].used) {
            ret = NVML_ERROR_NOT_FOUND;
        } else {
            g_gi[gpu_no(gpu)][id].gpu = gpu_no(gpu);
            g_gi[gpu_no(gpu)][id].id = id;
            *gpuInstance = &g_gi[gpu_no(gpu)][id];
        }
        mig_unlock();
    }
    unlock();
    return ret;
}

nvmlReturn_t nvmlGpuInstanceGetInfo(nvmlGpuInstance_t gpuInstance, nvmlGpuInstanceInfo_t *info)
{
    struct sim_gpu *gpu;
    struct mig_gi_rec *rec;
    nvmlReturn_t ret;

    lock();
    ret = use_gi(gpuInstance, info != NULL, &gpu, &rec);
    if (ret == NVML_SUCCESS) {
        info->device = &g_devices[gpu_no(gpu)];
        info->id = gpuInstance->id;
        info->profileId = rec->profile_id;
        info->placement.start = rec->start;
        info->placement.size = rec->size;
    }
    unlock();
    return ret;
}

/* ---- compute instances ---- */

struct ci_profile_values {
    unsigned int id, slices, count, sms, ce, dec, enc, jpeg, ofa;
};

static nvmlReturn_t ci_profile_lookup(nvmlGpuInstance_t gpuInstance, unsigned int profile,
                                      unsigned int engProfile, bool args_ok,
                                      struct ci_profile_values *v, char *name, size_t name_size)
{
    struct sim_gpu *gpu;
    struct mig_gi_rec *rec;
    const struct mig_profile *p;
    nvmlReturn_t ret = use_gi(gpuInstance,
                              args_ok && profile < NVML_COMPUTE_INSTANCE_PROFILE_COUNT &&
                                  engProfile < NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_COUNT,
                              &gpu, &rec);

    if (ret != NVML_SUCCESS)
        return ret;
    p = gi_profile(gpu, gpuInstance->id);
    if (!ci_profile_ok(p->slices, profile))
        return NVML_ERROR_NOT_SUPPORTED;
    v->id = profile;
    v->slices = ci_slices_of(profile);
    v->count = p->slices / v->slices;
    v->sms = p->sms / p->slices * v->slices;
    v->ce = p->ce;
    v->dec = p->dec;
    v->enc = p->enc;
    v->jpeg = p->jpeg;
    v->ofa = p->ofa;
    if (name != NULL) {
        char part[64];
        ci_name(p, profile, part, sizeof part);
        snprintf(name, name_size, "MIG %s", part);
    }
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlGpuInstanceGetComputeInstanceProfileInfo(nvmlGpuInstance_t gpuInstance,
                                                          unsigned int profile,
                                                          unsigned int engProfile,
                                                          nvmlComputeInstanceProfileInfo_t *info)
{
    struct ci_profile_values v;
    nvmlReturn_t ret;

    lock();
    ret = ci_profile_lookup(gpuInstance, profile, engProfile, info != NULL, &v, NULL, 0);
    if (ret == NVML_SUCCESS) {
        info->id = v.id;
        info->sliceCount = v.slices;
        info->instanceCount = v.count;
        info->multiprocessorCount = v.sms;
        info->sharedCopyEngineCount = v.ce;
        info->sharedDecoderCount = v.dec;
        info->sharedEncoderCount = v.enc;
        info->sharedJpegCount = v.jpeg;
        info->sharedOfaCount = v.ofa;
    }
    unlock();
    return ret;
}

/* info->version selects the layout: nvmlComputeInstanceProfileInfo_v2 or _v3. */
nvmlReturn_t nvmlGpuInstanceGetComputeInstanceProfileInfoV(nvmlGpuInstance_t gpuInstance,
                                                           unsigned int profile,
                                                           unsigned int engProfile,
                                                           nvmlComputeInstanceProfileInfo_v2_t *info)
{
    struct ci_profile_values v;
    char name[96];
    nvmlReturn_t ret;

    lock();
    ret = ci_profile_lookup(gpuInstance, profile, engProfile, info != NULL, &v, name, sizeof name);
    if (ret == NVML_SUCCESS && info->version != nvmlComputeInstanceProfileInfo_v2 &&
        info->version != nvmlComputeInstanceProfileInfo_v3)
        ret = NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
    if (ret == NVML_SUCCESS) {
        unsigned int version = info->version;

        /* v2 and v3 share every field up to name; v3 adds capabilities. */
        memset(info, 0, version == nvmlComputeInstanceProfileInfo_v3
                            ? sizeof(nvmlComputeInstanceProfileInfo_v3_t)
                            : sizeof *info);
        info->version = version;
        info->id = v.id;
        info->sliceCount = v.slices;
        info->instanceCount = v.count;
        info->multiprocessorCount = v.sms;
        info->sharedCopyEngineCount = v.ce;
        info->sharedDecoderCount = v.dec;
        info->sharedEncoderCount = v.enc;
        info->sharedJpegCount = v.jpeg;
        info->sharedOfaCount = v.ofa;
        memcpy(info->name, name, sizeof info->name);
    }
    unlock();
    return ret;
}

static unsigned int ci_instances_of(const struct mig_gi_rec *rec, unsigned int profile)
{
    unsigned int n = 0, i;

    for (i = 0; i < MIG_CI_IDS; i++)
        n += rec->ci[i].used && rec->ci[i].profile == profile;
    return n;
}

static unsigned int ci_slices_used(const struct mig_gi_rec *rec)
{
    unsigned int mask = 0, i;

    for (i = 0; i < MIG_CI_IDS; i++)
        if (rec->ci[i].used)
            mask |= ((1u << rec->ci[i].size) - 1) << rec->ci[i].start;
    return mask;
}

/* Placements of a CI profile inside a GI of gi_slices: starts k * size. */
static unsigned int ci_remaining(const struct mig_gi_rec *rec, unsigned int gi_slices,
                                 unsigned int profile, unsigned int *first_start)
{
    unsigned int size = ci_slices_of(profile), count = gi_slices / size, used = ci_slices_used(rec);
    unsigned int k, n = 0;

    *first_start = 8;
    for (k = 0; k < count; k++) {
        unsigned int want = ((1u << size) - 1) << (k * size);
        if ((used & want) == 0) {
            if (*first_start == 8)
                *first_start = k * size;
            used |= want;
            n++;
        }
    }
    return n;
}

nvmlReturn_t nvmlGpuInstanceGetComputeInstanceRemainingCapacity(nvmlGpuInstance_t gpuInstance,
                                                                unsigned int profileId,
                                                                unsigned int *count)
{
    struct ci_profile_values v;
    nvmlReturn_t ret;

    lock();
    ret = ci_profile_lookup(gpuInstance, profileId, 0, count != NULL, &v, NULL, 0);
    if (ret == NVML_SUCCESS) {
        unsigned int first;
        mig_lock();
        *count = ci_remaining(&g_mig->gpus[gpuInstance->gpu].gi[gpuInstance->id],
                              gi_profile(&g_node->gpus[gpuInstance->gpu], gpuInstance->id)->slices,
                              profileId, &first);
        mig_unlock();
    }
    unlock();
    return ret;
}

static nvmlReturn_t create_ci(nvmlGpuInstance_t gpuInstance, unsigned int profileId,
                              const nvmlComputeInstancePlacement_t *placement,
                              nvmlComputeInstance_t *out)
{
    struct ci_profile_values v;
    nvmlReturn_t ret;

    lock();
    ret = ci_profile_lookup(gpuInstance, profileId, 0, out != NULL, &v, NULL, 0);
    if (ret == NVML_ERROR_NOT_SUPPORTED)
        ret = NVML_ERROR_INVALID_ARGUMENT; /* not a profile this GI offers */
    if (ret == NVML_SUCCESS && placement != NULL &&
        (placement->size != v.slices || placement->start % v.slices != 0 ||
         placement->start / v.slices >= v.count))
        ret = NVML_ERROR_INVALID_ARGUMENT;
    if (ret == NVML_SUCCESS && g_unprivileged)
        ret = NVML_ERROR_NO_PERMISSION;
    if (ret == NVML_SUCCESS) {
        struct sim_gpu *gpu = &g_node->gpus[gpuInstance->gpu];
        struct mig_gi_rec *rec = &g_mig->gpus[gpuInstance->gpu].gi[gpuInstance->id];
        const struct mig_profile *p = gi_profile(gpu, gpuInstance->id);
        unsigned int start = 8, id;

        mig_lock();
        /* Another process may have destroyed the GI since use_gi looked. */
        ret = rec->used ? injected_fault(gpu) : NVML_ERROR_INVALID_ARGUMENT;
        if (ret == NVML_SUCCESS) {
            if (placement != NULL) {
                unsigned int want = ((1u << v.slices) - 1) << placement->start;
                if ((ci_slices_used(rec) & want) == 0)
                    start = placement->start;
            } else {
                ci_remaining(rec, p->slices, profileId, &start);
            }
            if (start == 8 || ci_instances_of(rec, profileId) >= v.count)
                ret = NVML_ERROR_INSUFFICIENT_RESOURCES;
        }
        if (ret == NVML_SUCCESS) {
            for (id = 0; id < MIG_CI_IDS && rec->ci[id].used; id++) {
            }
            put_ci(rec, id, profileId, start);
            g_ci[gpuInstance->gpu][gpuInstance->id][id].gpu = gpuInstance->gpu;
            g_ci[gpuInstance->gpu][gpuInstance->id][id].gi = gpuInstance->id;
            g_ci[gpuInstance->gpu][gpuInstance->id][id].id = id;
            *out = &g_ci[gpuInstance->gpu][gpuInstance->id][id];
        }
        mig_unlock();
    }
    unlock();
    return ret;
}

nvmlReturn_t nvmlGpuInstanceCreateComputeInstance(nvmlGpuInstance_t gpuInstance,
                                                  unsigned int profileId,
                                                  nvmlComputeInstance_t *computeInstance)
{
    return create_ci(gpuInstance, profileId, NULL, computeInstance);
}

nvmlReturn_t nvmlGpuInstanceCreateComputeInstanceWithPlacement(
    nvmlGpuInstance_t gpuInstance, unsigned int profileId,
    const nvmlComputeInstancePlacement_t *placement, nvmlComputeInstance_t *computeInstance)
{
    if (placement == NULL) {
        nvmlReturn_t ret;
        lock();
        ret = g_init_count == 0 ? NVML_ERROR_UNINITIALIZED : NVML_ERROR_INVALID_ARGUMENT;
        unlock();
        return ret;
    }
    return create_ci(gpuInstance, profileId, placement, computeInstance);
}

static nvmlReturn_t use_ci(nvmlComputeInstance_t h, bool args_ok, struct sim_gpu **gpu,
                           struct mig_ci_rec **rec)
{
    uintptr_t p = (uintptr_t)h, base = (uintptr_t)g_ci;
    struct mig_gpu_rec *r;

    if (g_init_count == 0)
        return NVML_ERROR_UNINITIALIZED;
    if (h == NULL || p < base || p >= base + sizeof g_ci || (p - base) % sizeof *h != 0 ||
        h->gpu >= g_node->gpu_count || !args_ok)
        return NVML_ERROR_INVALID_ARGUMENT;
    sim_node_sync(g_node);
    *gpu = &g_node->gpus[h->gpu];
    r = &g_mig->gpus[h->gpu];
    *rec = &r->gi[h->gi].ci[h->id];
    if (!r->current || !r->gi[h->gi].used || !(*rec)->used)
        return NVML_ERROR_INVALID_ARGUMENT;
    if ((*gpu)->failed)
        return NVML_ERROR_GPU_IS_LOST;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlComputeInstanceDestroy(nvmlComputeInstance_t computeInstance)
{
    struct sim_gpu *gpu;
    struct mig_ci_rec *rec;
    nvmlReturn_t ret;

    lock();
    ret = use_ci(computeInstance, true, &gpu, &rec);
    if (ret == NVML_SUCCESS && g_unprivileged)
        ret = NVML_ERROR_NO_PERMISSION;
    if (ret == NVML_SUCCESS) {
        mig_lock();
        if (!rec->used)
            ret = NVML_ERROR_INVALID_ARGUMENT; /* destroyed meanwhile by another process */
        else if (gpu_busy(gpu))
            ret = NVML_ERROR_IN_USE;
        else
            memset(rec, 0, sizeof *rec);
        mig_unlock();
    }
    unlock();
    return ret;
}

nvmlReturn_t nvmlGpuInstanceGetComputeInstances(nvmlGpuInstance_t gpuInstance,
                                                unsigned int profileId,
                                                nvmlComputeInstance_t *computeInstances,
                                                unsigned int *count)
{
    struct sim_gpu *gpu;
    struct mig_gi_rec *rec;
    nvmlReturn_t ret;

    lock();
    ret = use_gi(gpuInstance, computeInstances != NULL && count != NULL &&
                                  profileId < NVML_COMPUTE_INSTANCE_PROFILE_COUNT,
                 &gpu, &rec);
    if (ret == NVML_SUCCESS) {
        unsigned int id, n = 0, g = gpuInstance->gpu, gi = gpuInstance->id;

        mig_lock();
        for (id = 0; id < MIG_CI_IDS; id++) {
            if (rec->ci[id].used && rec->ci[id].profile == profileId) {
                g_ci[g][gi][id].gpu = g;
                g_ci[g][gi][id].gi = gi;
                g_ci[g][gi][id].id = id;
                computeInstances[n++] = &g_ci[g][gi][id];
            }
        }
        *count = n;
        mig_unlock();
    }
    unlock();
    return ret;
}

nvmlReturn_t nvmlComputeInstanceGetInfo_v2(nvmlComputeInstance_t computeInstance,
                                           nvmlComputeInstanceInfo_t *info)
{
    struct sim_gpu *gpu;
    struct mig_ci_rec *rec;
    nvmlReturn_t ret;

    lock();
    ret = use_ci(computeInstance, info != NULL, &gpu, &rec);
    if (ret == NVML_SUCCESS) {
        unsigned int g = computeInstance->gpu, gi = computeInstance->gi;

        g_gi[g][gi].gpu = g;
        g_gi[g][gi].id = gi;
        info->device = &g_devices[g];
        info->gpuInstance = &g_gi[g][gi];
        info->id = computeInstance->id;
        info->profileId = rec->profile;
        info->placement.start = rec->start;
        info->placement.size = rec->size;
    }
    unlock();
    return ret;
}

nvmlReturn_t nvmlGpuInstanceGetComputeInstanceById(nvmlGpuInstance_t gpuInstance, unsigned int id,
                                                   nvmlComputeInstance_t *computeInstance)
{
    struct sim_gpu *gpu;
    struct mig_gi_rec *rec;
    nvmlReturn_t ret;

    lock();
    ret = use_gi(gpuInstance, computeInstance != NULL, &gpu, &rec);
    if (ret == NVML_SUCCESS) {
        unsigned int g = gpuInstance->gpu, gi = gpuInstance->id;

        mig_lock();
        if (id >= MIG_CI_IDS || !rec->ci[id].used) {
            ret = NVML_ERROR_NOT_FOUND;
        } else {
            g_ci[g][gi][id].gpu = g;
            g_ci[g][gi][id].gi = gi;
            g_ci[g][gi][id].id = id;
            *computeInstance = &g_ci[g][gi][id];
        }
        mig_unlock();
    }
    unlock();
    return ret;
}
