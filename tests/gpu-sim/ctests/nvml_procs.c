/*
 * nvml-procs <gpu-index>: what a node agent's memory backstop sees of one GPU through the C ABI
 * (linked with -lnvidia-ml). For each of nvmlDeviceGetComputeRunningProcesses_v3, _v2 and the v1
 * name, sizes the list the NVML way (*infoCount = 0, infos = NULL) and fetches it, printing
 *
 *   v3 <nvmlReturn_t> <count> [<pid>:<usedGpuMemory> ...]
 *   v2 ...
 *   v1 ...
 *   graphics_v3 <nvmlReturn_t>
 *   used <nvmlDeviceGetMemoryInfo used bytes>
 *
 * A failing query prints its code and a count of 0. Checks the MIG fields of the v2 layout itself.
 * nvmlInit_v2 failing prints "init <code>" and exits 0 (the caller asserts on it).
 */
#include "nvml_api.h"

#include <stdio.h>
#include <stdlib.h>

#include "check.h"

#define MAX 512

typedef nvmlReturn_t (*v2_fn)(nvmlDevice_t, unsigned int *, nvmlProcessInfo_v2_t *);

static void list_v2(const char *name, v2_fn fn, nvmlDevice_t dev)
{
    static nvmlProcessInfo_v2_t infos[MAX];
    unsigned int count = 0, i;
    nvmlReturn_t r = fn(dev, &count, NULL);

    if (r == NVML_ERROR_INSUFFICIENT_SIZE) {
        CHECK(count > 0 && count <= MAX);
        r = fn(dev, &count, infos);
    }
    if (r != NVML_SUCCESS)
        count = 0;
    printf("%s %d %u", name, (int)r, count);
    for (i = 0; i < count; i++) {
        CHECK(infos[i].gpuInstanceId == 0xFFFFFFFFu && infos[i].computeInstanceId == 0xFFFFFFFFu);
        printf(" %u:%llu", infos[i].pid, infos[i].usedGpuMemory);
    }
    printf("\n");
}

int main(int argc, char **argv)
{
    static nvmlProcessInfo_v1_t v1[MAX];
    unsigned int count = 0, i;
    nvmlDevice_t dev;
    nvmlMemory_t mem;
    nvmlReturn_t r;

    CHECK(argc == 2);
    r = nvmlInit_v2();
    if (r != NVML_SUCCESS) {
        printf("init %d\n", (int)r);
        return 0;
    }
    OK(nvmlDeviceGetHandleByIndex_v2((unsigned int)atoi(argv[1]), &dev));

    list_v2("v3", nvmlDeviceGetComputeRunningProcesses_v3, dev);
    list_v2("v2", nvmlDeviceGetComputeRunningProcesses_v2, dev);

    r = nvmlDeviceGetComputeRunningProcesses(dev, &count, NULL);
    if (r == NVML_ERROR_INSUFFICIENT_SIZE) {
        CHECK(count > 0 && count <= MAX);
        r = nvmlDeviceGetComputeRunningProcesses(dev, &count, v1);
    }
    if (r != NVML_SUCCESS)
        count = 0;
    printf("v1 %d %u", (int)r, count);
    for (i = 0; i < count; i++)
        printf(" %u:%llu", v1[i].pid, v1[i].usedGpuMemory);
    printf("\n");

    count = 0;
    printf("graphics_v3 %d\n", (int)nvmlDeviceGetGraphicsRunningProcesses_v3(dev, &count, NULL));
    OK(nvmlDeviceGetMemoryInfo(dev, &mem));
    printf("used %llu\n", mem.used);
    OK(nvmlShutdown());
    return 0;
}
