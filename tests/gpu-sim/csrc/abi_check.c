/*
 * Checks the fake libnvidia-ml.so.1 at the raw C ABI level, where nvml-wrapper
 * cannot reach: NULL pointers, invalid handles, buffer sizes, the older struct
 * layouts of the unversioned entry points, struct version words, init
 * reference counting, partial control-log lines, and concurrent callers.
 *
 * Usage: nvml-abi-check <path to libnvidia-ml.so.1> <scratch directory>
 * Writes its own node file into the scratch directory, sets GPU_SIM_NODE and
 * loads the library with dlopen. Prints one line per failed check and exits
 * non-zero if any failed. Run by tests/nvml_wrapper.rs (abi_check test).
 */
#define _GNU_SOURCE
#include "nvml_api.h"

#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static int failures;
static int checks;

#define CHECK(cond)                                                                      \
    do {                                                                                 \
        checks++;                                                                        \
        if (!(cond)) {                                                                   \
            fprintf(stderr, "abi_check.c:%d: check failed: %s\n", __LINE__, #cond);      \
            failures++;                                                                  \
        }                                                                                \
    } while (0)

#define EXPECT(call, code)                                                               \
    do {                                                                                 \
        nvmlReturn_t got_ = (call);                                                      \
        checks++;                                                                        \
        if (got_ != (code)) {                                                            \
            fprintf(stderr, "abi_check.c:%d: %s returned %d, expected %d (%s)\n", __LINE__, \
                    #call, (int)got_, (int)(code), #code);                               \
            failures++;                                                                  \
        }                                                                                \
    } while (0)

/* Every entry point, resolved with dlsym into a pointer of the right type. */
#define NVML_FUNCTIONS(X)                                                                \
    X(nvmlInit) X(nvmlInit_v2) X(nvmlInitWithFlags) X(nvmlShutdown) X(nvmlErrorString)   \
    X(nvmlSystemGetDriverVersion) X(nvmlSystemGetNVMLVersion)                            \
    X(nvmlSystemGetCudaDriverVersion) X(nvmlSystemGetCudaDriverVersion_v2)               \
    X(nvmlDeviceGetCount) X(nvmlDeviceGetCount_v2) X(nvmlDeviceGetHandleByIndex)          \
    X(nvmlDeviceGetHandleByIndex_v2) X(nvmlDeviceGetHandleByUUID)                         \
    X(nvmlDeviceGetHandleByPciBusId_v2) X(nvmlDeviceGetIndex) X(nvmlDeviceGetUUID)        \
    X(nvmlDeviceGetName) X(nvmlDeviceGetMemoryInfo) X(nvmlDeviceGetMemoryInfo_v2)          \
    X(nvmlDeviceGetMinorNumber) X(nvmlDeviceGetPciInfo) X(nvmlDeviceGetPciInfo_v2)         \
    X(nvmlDeviceGetPciInfo_v3) X(nvmlDeviceGetNumaNodeId) X(nvmlDeviceGetUtilizationRates) \
    X(nvmlDeviceGetComputeRunningProcesses) X(nvmlDeviceGetComputeRunningProcesses_v2)     \
    X(nvmlDeviceGetComputeRunningProcesses_v3) X(nvmlDeviceGetMigMode)                     \
    X(nvmlDeviceGetSupportedEventTypes) X(nvmlEventSetCreate) X(nvmlDeviceRegisterEvents)  \
    X(nvmlEventSetWait) X(nvmlEventSetWait_v2) X(nvmlEventSetFree)                      \
    X(nvmlDeviceIsMigDeviceHandle) X(nvmlDeviceSetMigMode) X(nvmlDeviceGetMaxMigDeviceCount) \
    X(nvmlDeviceGetMigDeviceHandleByIndex) X(nvmlDeviceGetDeviceHandleFromMigDeviceHandle) \
    X(nvmlDeviceGetGpuInstanceId) X(nvmlDeviceGetComputeInstanceId)                      \
    X(nvmlDeviceGetGpuInstanceProfileInfo) X(nvmlDeviceGetGpuInstanceProfileInfoV)       \
    X(nvmlDeviceGetGpuInstancePossiblePlacements_v2)                                     \
    X(nvmlDeviceGetGpuInstanceRemainingCapacity) X(nvmlDeviceCreateGpuInstance)          \
    X(nvmlDeviceCreateGpuInstanceWithPlacement) X(nvmlGpuInstanceDestroy)                \
    X(nvmlDeviceGetGpuInstances) X(nvmlDeviceGetGpuInstanceById) X(nvmlGpuInstanceGetInfo) \
    X(nvmlGpuInstanceGetComputeInstanceProfileInfo)                                      \
    X(nvmlGpuInstanceGetComputeInstanceProfileInfoV)                                     \
    X(nvmlGpuInstanceGetComputeInstanceRemainingCapacity)                                \
    X(nvmlGpuInstanceCreateComputeInstance)                                              \
    X(nvmlGpuInstanceCreateComputeInstanceWithPlacement) X(nvmlComputeInstanceDestroy)   \
    X(nvmlGpuInstanceGetComputeInstances) X(nvmlComputeInstanceGetInfo_v2)              \
    X(nvmlGpuInstanceGetComputeInstanceById)

#define DECLARE(name) static __typeof__(name) *p_##name;
NVML_FUNCTIONS(DECLARE)
#undef DECLARE

#define MIB (1024ull * 1024ull)
#define UUID0 "GPU-11111111-2222-3333-4444-555555555555"
#define UUID1 "GPU-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"

static const char *const node_text =
    "# gpu-sim node v1\n"
    "driver_version = 535.161.08\n"
    "cuda_driver_version = 12020\n"
    "\n"
    "[gpu]\n"
    "uuid = " UUID0 "\n"
    "name = NVIDIA A100-SXM4-80GB\n"
    "memory_mib = 81920\n"
    "memory_reserved_mib = 512\n"
    "memory_used_mib = 100\n"
    "minor = 3\n"
    "numa_node = 1\n"
    "pci_bus_id = 0000:b7:00.0\n"
    "pci_device_id = 0x20B210DE\n"
    "pci_subsystem_id = 0x147F10DE\n"
    "mig = disabled\n"
    "utilization_gpu = 42\n"
    "utilization_memory = 7\n"
    "process = 4242 1024\n"
    "process = 4343 2048\n"
    "\n"
    "[gpu]   # the second GPU: few options\n"
    "uuid = " UUID1 "\n"
    "name = Tesla T4\n"
    "memory_mib = 15360\n"
    "minor = 0\n"
    "pci_bus_id = 00000000:3B:00.0\n"
    "ecc = false\n";

static char control_path[4096];

static void write_file(const char *path, const char *text, const char *mode)
{
    FILE *f = fopen(path, mode);
    if (f == NULL || fputs(text, f) < 0 || fclose(f) != 0) {
        perror(path);
        exit(2);
    }
}

static void control(const char *line)
{
    write_file(control_path, line, "a");
}

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

static nvmlDevice_t handle(unsigned int index)
{
    nvmlDevice_t d = NULL;
    EXPECT(p_nvmlDeviceGetHandleByIndex_v2(index, &d), NVML_SUCCESS);
    return d;
}

/* ---- concurrency: queries racing with fail/recover lines ---- */

static void *hammer(void *arg)
{
    nvmlDevice_t d = arg;
    long bad = 0;
    int i;

    for (i = 0; i < 3000; i++) {
        nvmlMemory_v2_t m;
        char uuid[NVML_DEVICE_UUID_V2_BUFFER_SIZE];
        nvmlReturn_t r;

        memset(&m, 0, sizeof m);
        m.version = nvmlMemory_v2;
        r = p_nvmlDeviceGetMemoryInfo_v2(d, &m);
        if (r != NVML_SUCCESS && r != NVML_ERROR_GPU_IS_LOST)
            bad++;
        if (r == NVML_SUCCESS && m.total != 15360 * MIB)
            bad++;
        r = p_nvmlDeviceGetUUID(d, uuid, sizeof uuid);
        if (r != NVML_SUCCESS && r != NVML_ERROR_GPU_IS_LOST)
            bad++;
        if (r == NVML_SUCCESS && strcmp(uuid, UUID1) != 0)
            bad++;
    }
    return (void *)bad;
}

int main(int argc, char **argv)
{
    char node_path[4096], empty_path[4096], bad_path[4096];
    char buf[128];
    void *lib;
    nvmlDevice_t d0, d1, d;
    unsigned int u, cur, pend, count;
    int cuda;
    unsigned long long types;
    nvmlEventSet_t set, other;
    nvmlEventData_t ev;
    double t0;

    if (argc != 3) {
        fprintf(stderr, "usage: %s <libnvidia-ml.so.1> <scratch dir>\n", argv[0]);
        return 2;
    }
    snprintf(node_path, sizeof node_path, "%s/node", argv[2]);
    snprintf(empty_path, sizeof empty_path, "%s/empty-node", argv[2]);
    snprintf(bad_path, sizeof bad_path, "%s/bad-node", argv[2]);
    snprintf(control_path, sizeof control_path, "%s/node.control", argv[2]);
    write_file(node_path, node_text, "w");
    write_file(control_path, "", "w");
    write_file(empty_path, "driver_version = 550.54.15\n", "w");
    write_file(bad_path, "[gpu]\nuuid = " UUID0 "\nname = x\nmemory_mib = lots\n", "w");

    lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (lib == NULL) {
        fprintf(stderr, "dlopen: %s\n", dlerror());
        return 2;
    }
#define RESOLVE(name)                                                                    \
    p_##name = (__typeof__(name) *)dlsym(lib, #name);                                   \
    if (p_##name == NULL) {                                                              \
        fprintf(stderr, "missing symbol %s\n", #name);                                   \
        return 2;                                                                        \
    }
    NVML_FUNCTIONS(RESOLVE)
#undef RESOLVE
    /* No internal helper leaks out of the library. */
    CHECK(dlsym(lib, "sim_node_load") == NULL);
    CHECK(dlsym(lib, "sim_node_sync") == NULL);
    CHECK(dlsym(lib, "mig_open") == NULL);

    /* ---- before init ---- */
    EXPECT(p_nvmlDeviceGetCount_v2(&u), NVML_ERROR_UNINITIALIZED);
    EXPECT(p_nvmlShutdown(), NVML_ERROR_UNINITIALIZED);
    EXPECT(p_nvmlEventSetCreate(&set), NVML_ERROR_UNINITIALIZED);
    EXPECT(p_nvmlSystemGetDriverVersion(buf, sizeof buf), NVML_ERROR_UNINITIALIZED);
    CHECK(strcmp(p_nvmlErrorString(NVML_ERROR_GPU_IS_LOST), "GPU is lost") == 0);
    CHECK(strcmp(p_nvmlErrorString((nvmlReturn_t)12345), "Unknown Error") == 0);

    /* ---- no node, empty node, bad node ---- */
    unsetenv("GPU_SIM_NODE");
    EXPECT(p_nvmlInit_v2(), NVML_ERROR_DRIVER_NOT_LOADED);
    setenv("GPU_SIM_NODE", "/nonexistent/gpu-sim/node", 1);
    EXPECT(p_nvmlInit_v2(), NVML_ERROR_DRIVER_NOT_LOADED);
    EXPECT(p_nvmlDeviceGetCount_v2(&u), NVML_ERROR_UNINITIALIZED);
    setenv("GPU_SIM_NODE", empty_path, 1);
    EXPECT(p_nvmlInit_v2(), NVML_ERROR_GPU_NOT_FOUND);
    EXPECT(p_nvmlInitWithFlags(NVML_INIT_FLAG_NO_GPUS), NVML_SUCCESS);
    EXPECT(p_nvmlDeviceGetCount_v2(&u), NVML_SUCCESS);
    CHECK(u == 0);
    EXPECT(p_nvmlDeviceGetHandleByIndex_v2(0, &d), NVML_ERROR_INVALID_ARGUMENT);
    EXPECT(p_nvmlShutdown(), NVML_SUCCESS);
    setenv("GPU_SIM_NODE", bad_path, 1);
    fprintf(stderr, "(the next line is an expected complaint about a bad node file)\n");
    EXPECT(p_nvmlInit_v2(), NVML_ERROR_UNKNOWN);

    /* ---- init, reference counted ---- */
    setenv("GPU_SIM_NODE", node_path, 1);
    EXPECT(p_nvmlInit_v2(), NVML_SUCCESS);
    EXPECT(p_nvmlInit(), NVML_SUCCESS);

    /* ---- system ---- */
    EXPECT(p_nvmlSystemGetDriverVersion(NULL, 80), NVML_ERROR_INVALID_ARGUMENT);
    EXPECT(p_nvmlSystemGetDriverVersion(buf, 10), NVML_ERROR_INSUFFICIENT_SIZE);
    EXPECT(p_nvmlSystemGetDriverVersion(buf, 11), NVML_SUCCESS);
    CHECK(strcmp(buf, "535.161.08") == 0);
    EXPECT(p_nvmlSystemGetNVMLVersion(buf, sizeof buf), NVML_SUCCESS);
    CHECK(strcmp(buf, "12.535.161.08") == 0);
    EXPECT(p_nvmlSystemGetCudaDriverVersion(&cuda), NVML_SUCCESS);
    CHECK(cuda == 12020);
    EXPECT(p_nvmlSystemGetCudaDriverVersion_v2(&cuda), NVML_SUCCESS);
    CHECK(cuda == 12020);
    EXPECT(p_nvmlSystemGetCudaDriverVersion_v2(NULL), NVML_ERROR_INVALID_ARGUMENT);

    /* ---- enumeration ---- */
    EXPECT(p_nvmlDeviceGetCount(&u), NVML_SUCCESS);
    CHECK(u == 2);
    EXPECT(p_nvmlDeviceGetCount_v2(&u), NVML_SUCCESS);
    CHECK(u == 2);
    EXPECT(p_nvmlDeviceGetCount_v2(NULL), NVML_ERROR_INVALID_ARGUMENT);
    EXPECT(p_nvmlDeviceGetHandleByIndex_v2(2, &d), NVML_ERROR_INVALID_ARGUMENT);
    EXPECT(p_nvmlDeviceGetHandleByIndex_v2(0, NULL), NVML_ERROR_INVALID_ARGUMENT);
    d0 = handle(0);
    d1 = handle(1);
    EXPECT(p_nvmlDeviceGetHandleByIndex(1, &d), NVML_SUCCESS);
    CHECK(d == d1 && d0 != d1);

    EXPECT(p_nvmlDeviceGetHandleByUUID(UUID1, &d), NVML_SUCCESS);
    CHECK(d == d1);
    EXPECT(p_nvmlDeviceGetHandleByUUID("GPU-AAAAAAAA-BBBB-CCCC-DDDD-EEEEEEEEEEEE", &d),
           NVML_ERROR_NOT_FOUND);
    EXPECT(p_nvmlDeviceGetHandleByUUID("", &d), NVML_ERROR_INVALID_ARGUMENT);
    EXPECT(p_nvmlDeviceGetHandleByUUID(NULL, &d), NVML_ERROR_INVALID_ARGUMENT);
    EXPECT(p_nvmlDeviceGetHandleByUUID(UUID1, NULL), NVML_ERROR_INVALID_ARGUMENT);

    d = NULL;
    EXPECT(p_nvmlDeviceGetHandleByPciBusId_v2("00000000:B7:00.0", &d), NVML_SUCCESS);
    CHECK(d == d0);
    d = NULL;
    EXPECT(p_nvmlDeviceGetHandleByPciBusId_v2("0000:b7:00.0", &d), NVML_SUCCESS);
    CHECK(d == d0);
    d = NULL;
    EXPECT(p_nvmlDeviceGetHandleByPciBusId_v2("b7:00.0", &d), NVML_SUCCESS);
    CHECK(d == d0);
    d = NULL;
    EXPECT(p_nvmlDeviceGetHandleByPciBusId_v2("0:3b:0", &d), NVML_SUCCESS);
    CHECK(d == d1);
    EXPECT(p_nvmlDeviceGetHandleByPciBusId_v2("00000000:B7:00.1", &d), NVML_ERROR_NOT_FOUND);
    EXPECT(p_nvmlDeviceGetHandleByPciBusId_v2("00000000:99:00.0", &d), NVML_ERROR_NOT_FOUND);
    EXPECT(p_nvmlDeviceGetHandleByPciBusId_v2("b7:00", &d), NVML_ERROR_INVALID_ARGUMENT);
    EXPECT(p_nvmlDeviceGetHandleByPciBusId_v2("zz", &d), NVML_ERROR_INVALID_ARGUMENT);
    EXPECT(p_nvmlDeviceGetHandleByPciBusId_v2(NULL, &d), NVML_ERROR_INVALID_ARGUMENT);

    /* ---- invalid handles ---- */
    EXPECT(p_nvmlDeviceGetMinorNumber(NULL, &u), NVML_ERROR_INVALID_ARGUMENT);
    EXPECT(p_nvmlDeviceGetMinorNumber((nvmlDevice_t)(void *)buf, &u), NVML_ERROR_INVALID_ARGUMENT);
    EXPECT(p_nvmlDeviceGetMinorNumber((nvmlDevice_t)((char *)d0 + 1), &u),
           NVML_ERROR_INVALID_ARGUMENT);
    EXPECT(p_nvmlDeviceGetMinorNumber((nvmlDevice_t)((char *)d0 + 5 * ((char *)d1 - (char *)d0)), &u),
           NVML_ERROR_INVALID_ARGUMENT);
    EXPECT(p_nvmlDeviceGetIndex((nvmlDevice_t)(void *)buf, &u), NVML_ERROR_INVALID_ARGUMENT);

    /* ---- identity ---- */
    EXPECT(p_nvmlDeviceGetIndex(d1, &u), NVML_SUCCESS);
    CHECK(u == 1);
    EXPECT(p_nvmlDeviceGetIndex(d1, NULL), NVML_ERROR_INVALID_ARGUMENT);
    EXPECT(p_nvmlDeviceGetMinorNumber(d0, &u), NVML_SUCCESS);
    CHECK(u == 3);
    EXPECT(p_nvmlDeviceGetMinorNumber(d0, NULL), NVML_ERROR_INVALID_ARGUMENT);
    EXPECT(p_nvmlDeviceGetUUID(d0, buf, NVML_DEVICE_UUID_BUFFER_SIZE), NVML_SUCCESS);
    CHECK(strcmp(buf, UUID0) == 0);
    EXPECT(p_nvmlDeviceGetUUID(d0, buf, (unsigned int)strlen(UUID0)), NVML_ERROR_INSUFFICIENT_SIZE);
    EXPECT(p_nvmlDeviceGetUUID(d0, buf, (unsigned int)strlen(UUID0) + 1), NVML_SUCCESS);
    EXPECT(p_nvmlDeviceGetUUID(d0, NULL, 80), NVML_ERROR_INVALID_ARGUMENT);
    EXPECT(p_nvmlDeviceGetName(d0, buf, NVML_DEVICE_NAME_BUFFER_SIZE), NVML_SUCCESS);
    CHECK(strcmp(buf, "NVIDIA A100-SXM4-80GB") == 0);
    EXPECT(p_nvmlDeviceGetName(d1, buf, 8), NVML_ERROR_INSUFFICIENT_SIZE);
    EXPECT(p_nvmlDeviceGetName(d1, buf, 9), NVML_SUCCESS);
    CHECK(strcmp(buf, "Tesla T4") == 0);

    /* ---- memory ---- */
    {
        nvmlMemory_t m1;
        nvmlMemory_v2_t m2;
        const unsigned long long total = 81920 * MIB;
        const unsigned long long allocated = (100 + 1024 + 2048) * MIB;

        EXPECT(p_nvmlDeviceGetMemoryInfo(d0, &m1), NVML_SUCCESS);
        CHECK(m1.total == total);
        CHECK(m1.used == 512 * MIB + allocated);
        CHECK(m1.free == total - 512 * MIB - allocated);
        EXPECT(p_nvmlDeviceGetMemoryInfo(d0, NULL), NVML_ERROR_INVALID_ARGUMENT);

        memset(&m2, 0, sizeof m2);
        EXPECT(p_nvmlDeviceGetMemoryInfo_v2(d0, &m2), NVML_ERROR_ARGUMENT_VERSION_MISMATCH);
        m2.version = 2; /* what the documentation says, and what NVML rejects */
        EXPECT(p_nvmlDeviceGetMemoryInfo_v2(d0, &m2), NVML_ERROR_ARGUMENT_VERSION_MISMATCH);
        m2.version = nvmlMemory_v2;
        EXPECT(p_nvmlDeviceGetMemoryInfo_v2(d0, &m2), NVML_SUCCESS);
        CHECK(m2.version == nvmlMemory_v2);
        CHECK(m2.total == total);
        CHECK(m2.reserved == 512 * MIB);
        CHECK(m2.used == allocated);
        CHECK(m2.free == total - 512 * MIB - allocated);
        CHECK(m2.total == m2.reserved + m2.used + m2.free);

        /* Defaults: reserved is total / 200 (in whole MiB), nothing allocated. */
        EXPECT(p_nvmlDeviceGetMemoryInfo_v2(d1, &m2), NVML_SUCCESS);
        CHECK(m2.total == 15360 * MIB);
        CHECK(m2.reserved == (15360 / 200) * MIB);
        CHECK(m2.used == 0);
    }

    /* ---- PCI ---- */
    {
        nvmlPciInfo_t pci;
        const unsigned char *raw = (const unsigned char *)&pci;
        size_t i;
        int untouched = 1;

        memset(&pci, 0xAB, sizeof pci);
        EXPECT(p_nvmlDeviceGetPciInfo_v3(d0, &pci), NVML_SUCCESS);
        CHECK(strcmp(pci.busId, "00000000:B7:00.0") == 0);
        CHECK(strcmp(pci.busIdLegacy, "0000:B7:00.0") == 0);
        CHECK(pci.domain == 0 && pci.bus == 0xB7 && pci.device == 0);
        CHECK(pci.pciDeviceId == 0x20B210DEu);
        CHECK(pci.pciSubSystemId == 0x147F10DEu);
        EXPECT(p_nvmlDeviceGetPciInfo_v3(d0, NULL), NVML_ERROR_INVALID_ARGUMENT);

        memset(&pci, 0xAB, sizeof pci);
        EXPECT(p_nvmlDeviceGetPciInfo_v2(d1, &pci), NVML_SUCCESS);
        CHECK(strcmp(pci.busId, "00000000:3B:00.0") == 0);
        CHECK(pci.pciDeviceId == 0x000010DEu); /* node file default: vendor only */

        /* The unversioned call writes only the legacy layout. */
        memset(&pci, 0xAB, sizeof pci);
        EXPECT(p_nvmlDeviceGetPciInfo(d0, &pci), NVML_SUCCESS);
        CHECK(strcmp(pci.busIdLegacy, "0000:B7:00.0") == 0);
        CHECK(pci.bus == 0xB7 && pci.pciDeviceId == 0x20B210DEu);
        for (i = offsetof(nvmlPciInfo_t, busId); i < sizeof pci; i++)
            untouched &= raw[i] == 0xAB;
        CHECK(untouched);
    }

    /* ---- NUMA, utilisation, MIG ---- */
    EXPECT(p_nvmlDeviceGetNumaNodeId(d0, &u), NVML_SUCCESS);
    CHECK(u == 1);
    EXPECT(p_nvmlDeviceGetNumaNodeId(d1, &u), NVML_ERROR_NOT_SUPPORTED);
    EXPECT(p_nvmlDeviceGetNumaNodeId(d0, NULL), NVML_ERROR_INVALID_ARGUMENT);
    {
        nvmlUtilization_t util;
        EXPECT(p_nvmlDeviceGetUtilizationRates(d0, &util), NVML_SUCCESS);
        CHECK(util.gpu == 42 && util.memory == 7);
        EXPECT(p_nvmlDeviceGetUtilizationRates(d0, NULL), NVML_ERROR_INVALID_ARGUMENT);
    }
    cur = pend = 77;
    EXPECT(p_nvmlDeviceGetMigMode(d0, &cur, &pend), NVML_SUCCESS);
    CHECK(cur == NVML_DEVICE_MIG_DISABLE && pend == NVML_DEVICE_MIG_DISABLE);
    EXPECT(p_nvmlDeviceGetMigMode(d1, &cur, &pend), NVML_ERROR_NOT_SUPPORTED);
    EXPECT(p_nvmlDeviceGetMigMode(d0, &cur, NULL), NVML_ERROR_INVALID_ARGUMENT);

    /* ---- running processes ---- */
    {
        nvmlProcessInfo_t v3[5];
        nvmlProcessInfo_v2_t v2[5];
        nvmlProcessInfo_v1_t v1[5];

        count = 0;
        EXPECT(p_nvmlDeviceGetComputeRunningProcesses_v3(d0, &count, NULL),
               NVML_ERROR_INSUFFICIENT_SIZE);
        CHECK(count == 2);
        count = 1;
        EXPECT(p_nvmlDeviceGetComputeRunningProcesses_v3(d0, &count, v3),
               NVML_ERROR_INSUFFICIENT_SIZE);
        CHECK(count == 2);
        count = 5;
        EXPECT(p_nvmlDeviceGetComputeRunningProcesses_v3(d0, &count, NULL),
               NVML_ERROR_INVALID_ARGUMENT);
        EXPECT(p_nvmlDeviceGetComputeRunningProcesses_v3(d0, NULL, v3), NVML_ERROR_INVALID_ARGUMENT);
        count = 5;
        EXPECT(p_nvmlDeviceGetComputeRunningProcesses_v3(d0, &count, v3), NVML_SUCCESS);
        CHECK(count == 2);
        CHECK(v3[0].pid == 4242 && v3[0].usedGpuMemory == 1024 * MIB);
        CHECK(v3[1].pid == 4343 && v3[1].usedGpuMemory == 2048 * MIB);
        CHECK(v3[1].gpuInstanceId == 0xFFFFFFFFu && v3[1].computeInstanceId == 0xFFFFFFFFu);
        count = 5;
        EXPECT(p_nvmlDeviceGetComputeRunningProcesses_v2(d0, &count, v2), NVML_SUCCESS);
        CHECK(count == 2 && v2[1].pid == 4343 && v2[1].gpuInstanceId == 0xFFFFFFFFu);
        count = 5;
        EXPECT(p_nvmlDeviceGetComputeRunningProcesses(d0, &count, v1), NVML_SUCCESS);
        CHECK(count == 2 && v1[1].pid == 4343 && v1[1].usedGpuMemory == 2048 * MIB);

        count = 0;
        EXPECT(p_nvmlDeviceGetComputeRunningProcesses_v3(d1, &count, NULL), NVML_SUCCESS);
        CHECK(count == 0);
        count = 5;
        EXPECT(p_nvmlDeviceGetComputeRunningProcesses_v3(d1, &count, v3), NVML_SUCCESS);
        CHECK(count == 0);
    }

    /* ---- events ---- */
    EXPECT(p_nvmlDeviceGetSupportedEventTypes(d0, &types), NVML_SUCCESS);
    CHECK(types == 0x1Full); /* SBE | DBE | PState | XID | Clock */
    EXPECT(p_nvmlDeviceGetSupportedEventTypes(d1, &types), NVML_SUCCESS);
    CHECK(types == 0x1Cull); /* no ECC events with ECC off */
    EXPECT(p_nvmlDeviceGetSupportedEventTypes(d1, NULL), NVML_ERROR_INVALID_ARGUMENT);
    EXPECT(p_nvmlEventSetCreate(NULL), NVML_ERROR_INVALID_ARGUMENT);

    control("xid " UUID1 " 13\n"); /* before the set exists: never delivered */
    EXPECT(p_nvmlEventSetCreate(&set), NVML_SUCCESS);
    EXPECT(p_nvmlDeviceRegisterEvents(d1, nvmlEventTypeDoubleBitEccError, set),
           NVML_ERROR_NOT_SUPPORTED);
    EXPECT(p_nvmlDeviceRegisterEvents(d1, nvmlEventTypeXidCriticalError, set), NVML_SUCCESS);
    EXPECT(p_nvmlDeviceRegisterEvents(d1, nvmlEventTypeXidCriticalError, (nvmlEventSet_t)(void *)buf),
           NVML_ERROR_INVALID_ARGUMENT);
    EXPECT(p_nvmlEventSetWait_v2(set, NULL, 0), NVML_ERROR_INVALID_ARGUMENT);
    EXPECT(p_nvmlEventSetWait_v2((nvmlEventSet_t)(void *)buf, &ev, 0), NVML_ERROR_INVALID_ARGUMENT);
    t0 = now_ms();
    EXPECT(p_nvmlEventSetWait_v2(set, &ev, 0), NVML_ERROR_TIMEOUT);
    EXPECT(p_nvmlEventSetWait_v2(set, &ev, 60), NVML_ERROR_TIMEOUT);
    CHECK(now_ms() - t0 >= 59.0);

    /* Unversioned wait: the 24-byte pre-MIG layout. */
    control("xid " UUID1 " 48\n");
    memset(&ev, 0xAB, sizeof ev);
    EXPECT(p_nvmlEventSetWait(set, &ev, 1000), NVML_SUCCESS);
    CHECK(ev.device == d1);
    CHECK(ev.eventType == nvmlEventTypeXidCriticalError);
    CHECK(ev.eventData == 48);
    CHECK(ev.gpuInstanceId == 0xABABABABu && ev.computeInstanceId == 0xABABABABu);

    /* A GPU not registered in the set, then registered: earlier events stay out. */
    control("ecc-dbe " UUID0 "\n");
    EXPECT(p_nvmlEventSetWait_v2(set, &ev, 30), NVML_ERROR_TIMEOUT);
    EXPECT(p_nvmlDeviceRegisterEvents(d0, nvmlEventTypeDoubleBitEccError |
                                              nvmlEventTypeXidCriticalError, set),
           NVML_SUCCESS);
    EXPECT(p_nvmlEventSetWait_v2(set, &ev, 30), NVML_ERROR_TIMEOUT);
    control("ecc-dbe " UUID0 "\n");
    memset(&ev, 0xAB, sizeof ev);
    EXPECT(p_nvmlEventSetWait_v2(set, &ev, 1000), NVML_SUCCESS);
    CHECK(ev.device == d0 && ev.eventType == nvmlEventTypeDoubleBitEccError && ev.eventData == 0);
    CHECK(ev.gpuInstanceId == 0xFFFFFFFFu && ev.computeInstanceId == 0xFFFFFFFFu);

    /* Bad lines are reported and skipped; a partial line waits for its newline. */
    fprintf(stderr, "(the next two lines are expected complaints about bad control lines)\n");
    control("explode " UUID0 "\n");
    control("xid GPU-00000000-0000-0000-0000-000000000000 79\n");
    control("xid " UUID1 " 31");
    EXPECT(p_nvmlEventSetWait_v2(set, &ev, 40), NVML_ERROR_TIMEOUT);
    control("\n");
    EXPECT(p_nvmlEventSetWait_v2(set, &ev, 1000), NVML_SUCCESS);
    CHECK(ev.device == d1 && ev.eventData == 31);

    /* Two sets each get their own copy of an event. */
    EXPECT(p_nvmlEventSetCreate(&other), NVML_SUCCESS);
    EXPECT(p_nvmlDeviceRegisterEvents(d0, nvmlEventTypeXidCriticalError, other), NVML_SUCCESS);
    control("xid " UUID0 " 94\n");
    EXPECT(p_nvmlEventSetWait_v2(set, &ev, 1000), NVML_SUCCESS);
    CHECK(ev.device == d0 && ev.eventData == 94);
    EXPECT(p_nvmlEventSetWait_v2(other, &ev, 1000), NVML_SUCCESS);
    CHECK(ev.device == d0 && ev.eventData == 94);
    EXPECT(p_nvmlEventSetWait_v2(other, &ev, 0), NVML_ERROR_TIMEOUT);

    /* ---- a GPU falls off the bus, then comes back ---- */
    control("xid " UUID1 " 79\nfail " UUID1 "\n");
    EXPECT(p_nvmlDeviceGetUUID(d1, buf, sizeof buf), NVML_ERROR_GPU_IS_LOST);
    {
        nvmlMemory_v2_t m2;
        memset(&m2, 0, sizeof m2);
        m2.version = nvmlMemory_v2;
        EXPECT(p_nvmlDeviceGetMemoryInfo_v2(d1, &m2), NVML_ERROR_GPU_IS_LOST);
        EXPECT(p_nvmlDeviceGetMemoryInfo_v2(d0, &m2), NVML_SUCCESS);
    }
    EXPECT(p_nvmlDeviceGetMinorNumber(d1, &u), NVML_ERROR_GPU_IS_LOST);
    EXPECT(p_nvmlDeviceGetMinorNumber(d1, NULL), NVML_ERROR_INVALID_ARGUMENT);
    EXPECT(p_nvmlDeviceGetIndex(d1, &u), NVML_SUCCESS);
    CHECK(u == 1);
    EXPECT(p_nvmlDeviceGetCount_v2(&u), NVML_SUCCESS);
    CHECK(u == 2);
    EXPECT(p_nvmlDeviceGetHandleByIndex_v2(1, &d), NVML_SUCCESS);
    EXPECT(p_nvmlDeviceGetHandleByUUID(UUID1, &d), NVML_SUCCESS);
    /* The XID queued before the failure is still delivered, then the wait fails fast. */
    EXPECT(p_nvmlEventSetWait_v2(set, &ev, 1000), NVML_SUCCESS);
    CHECK(ev.device == d1 && ev.eventData == 79);
    t0 = now_ms();
    EXPECT(p_nvmlEventSetWait_v2(set, &ev, 1000), NVML_ERROR_GPU_IS_LOST);
    CHECK(now_ms() - t0 < 500.0);
    EXPECT(p_nvmlEventSetWait_v2(other, &ev, 0), NVML_ERROR_TIMEOUT); /* only GPU 0 there */
    EXPECT(p_nvmlDeviceRegisterEvents(d1, nvmlEventTypeXidCriticalError, other),
           NVML_ERROR_GPU_IS_LOST);
    control("recover " UUID1 "\n");
    EXPECT(p_nvmlDeviceGetUUID(d1, buf, sizeof buf), NVML_SUCCESS);
    CHECK(strcmp(buf, UUID1) == 0);
    EXPECT(p_nvmlEventSetWait_v2(set, &ev, 0), NVML_ERROR_TIMEOUT);

    /* ---- concurrent callers while the GPU flaps ---- */
    {
        pthread_t threads[8];
        void *bad;
        long total_bad = 0;
        int i;

        for (i = 0; i < 8; i++)
            pthread_create(&threads[i], NULL, hammer, d1);
        for (i = 0; i < 50; i++)
            control(i % 2 ? "recover " UUID1 "\n" : "fail " UUID1 "\n");
        for (i = 0; i < 8; i++) {
            pthread_join(threads[i], &bad);
            total_bad += (long)bad;
        }
        CHECK(total_bad == 0);
        EXPECT(p_nvmlDeviceGetUUID(d1, buf, sizeof buf), NVML_SUCCESS); /* last line: recover */
    }

    /* ---- free ---- */
    EXPECT(p_nvmlEventSetFree(other), NVML_SUCCESS);
    EXPECT(p_nvmlEventSetFree(other), NVML_ERROR_INVALID_ARGUMENT);
    EXPECT(p_nvmlEventSetWait_v2(other, &ev, 0), NVML_ERROR_INVALID_ARGUMENT);

    /* ---- shutdown is reference counted ---- */
    EXPECT(p_nvmlShutdown(), NVML_SUCCESS);
    EXPECT(p_nvmlDeviceGetCount_v2(&u), NVML_SUCCESS);
    EXPECT(p_nvmlShutdown(), NVML_SUCCESS);
    EXPECT(p_nvmlDeviceGetCount_v2(&u), NVML_ERROR_UNINITIALIZED);
    EXPECT(p_nvmlDeviceGetUUID(d0, buf, sizeof buf), NVML_ERROR_UNINITIALIZED);
    EXPECT(p_nvmlEventSetWait_v2(set, &ev, 0), NVML_ERROR_UNINITIALIZED);
    EXPECT(p_nvmlEventSetFree(set), NVML_ERROR_UNINITIALIZED);
    EXPECT(p_nvmlShutdown(), NVML_ERROR_UNINITIALIZED);
    CHECK(strcmp(p_nvmlErrorString(NVML_ERROR_UNINITIALIZED), "Uninitialized") == 0);

    /* ---- a fresh init replays the log: failures persist, old events do not ---- */
    control("fail " UUID0 "\n");
    fprintf(stderr, "(init replays the control log: the same two complaints again)\n");
    EXPECT(p_nvmlInit_v2(), NVML_SUCCESS);
    d0 = handle(0);
    EXPECT(p_nvmlDeviceGetUUID(d0, buf, sizeof buf), NVML_ERROR_GPU_IS_LOST);
    EXPECT(p_nvmlEventSetCreate(&set), NVML_SUCCESS);
    EXPECT(p_nvmlDeviceRegisterEvents(handle(1), nvmlEventTypeXidCriticalError, set), NVML_SUCCESS);
    EXPECT(p_nvmlEventSetWait_v2(set, &ev, 20), NVML_ERROR_TIMEOUT);
    EXPECT(p_nvmlEventSetFree(set), NVML_SUCCESS);
    EXPECT(p_nvmlShutdown(), NVML_SUCCESS);

    dlclose(lib);
    printf("nvml-abi-check: %d checks, %d failed\n", checks, failures);
    return failures == 0 ? 0 : 1;
}
