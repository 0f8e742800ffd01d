/*
 * MIG through NVML's raw C ABI, for tests/mig.rs (linked -lnvidia-ml).
 *
 *   mig-check abi                 the built-in checks below (node: GPU 0 an A100 80GB, GPU 1 an
 *                                 H100 80GB, GPU 2 a T4, all with MIG off); prints "abi ok"
 *   mig-check <command>...        runs commands in order, one output line each:
 *     mode <g>                    "mode <ret> <current> <pending>"
 *     set <g> <0|1>               "set <ret> <activationStatus>"
 *     cgi <g> <profile id> [<start>]   "cgi <ret> <gi id>"   (start: WithPlacement)
 *     cci <g> <gi> <ci profile>   "cci <ret> <ci id>"
 *     dci <g> <gi> <ci>           "dci <ret>"
 *     dgi <g> <gi>                "dgi <ret>"
 *     cap <g> <profile id>        "cap <ret> <remaining>"
 *     list <g>                    "dev <i> <uuid> <gi> <ci> <total MiB> <name>" per MIG device,
 *                                 then "count <n>"
 */
#include "check.h"
#include "nvml_api.h"

#include <stdbool.h>
#include <string.h>

static nvmlDevice_t dev(const char *index)
{
    nvmlDevice_t d;
    OK(nvmlDeviceGetHandleByIndex_v2((unsigned int)atoi(index), &d));
    return d;
}

static nvmlGpuInstance_t gi_by_id(nvmlDevice_t d, unsigned int id)
{
    nvmlGpuInstance_t gi = NULL;
    OK(nvmlDeviceGetGpuInstanceById(d, id, &gi));
    return gi;
}

static nvmlComputeInstance_t ci_by_id(nvmlGpuInstance_t gi, unsigned int id)
{
    nvmlComputeInstance_t cis[8], direct = NULL;
    nvmlReturn_t r = nvmlGpuInstanceGetComputeInstanceById(gi, id, &direct);
    unsigned int p, n, i;

    for (p = 0; p < NVML_COMPUTE_INSTANCE_PROFILE_COUNT; p++) {
        nvmlComputeInstanceInfo_t info;
        n = 0;
        OK(nvmlGpuInstanceGetComputeInstances(gi, p, cis, &n));
        for (i = 0; i < n; i++) {
            OK(nvmlComputeInstanceGetInfo_v2(cis[i], &info));
            if (info.id == id) {
                CHECK(r == NVML_SUCCESS && direct == cis[i]); /* both lookups agree */
                return cis[i];
            }
        }
    }
    CHECK(r == NVML_ERROR_NOT_FOUND);
    fprintf(stderr, "no compute instance %u\n", id);
    exit(1);
}

struct expect_gi {
    unsigned int index, id, slices, count;
    unsigned long long mib;
    const char *name;
    unsigned int starts[8], nstarts, size;
};

static void check_profiles(nvmlDevice_t d, const struct expect_gi *e, unsigned int n)
{
    unsigned int k;

    for (k = 0; k < n; k++) {
        nvmlGpuInstanceProfileInfo_t v1;
        nvmlGpuInstanceProfileInfo_v2_t v2;
        nvmlGpuInstanceProfileInfo_v3_t v3;
        nvmlGpuInstancePlacement_t pl[8];
        unsigned int count = 0, i;
        char name[100];

        OK(nvmlDeviceGetGpuInstanceProfileInfo(d, e[k].index, &v1));
        CHECK(v1.id == e[k].id && v1.sliceCount == e[k].slices && v1.instanceCount == e[k].count);
        CHECK(v1.memorySizeMB == e[k].mib);
        memset(&v2, 0, sizeof v2);
        v2.version = nvmlGpuInstanceProfileInfo_v2;
        OK(nvmlDeviceGetGpuInstanceProfileInfoV(d, e[k].index, &v2));
        snprintf(name, sizeof name, "MIG %s", e[k].name);
        CHECK(v2.version == nvmlGpuInstanceProfileInfo_v2 && v2.id == e[k].id);
        CHECK(strcmp(v2.name, name) == 0 && v2.memorySizeMB == e[k].mib);
        memset(&v3, 0, sizeof v3);
        v3.version = nvmlGpuInstanceProfileInfo_v3;
        OK(nvmlDeviceGetGpuInstanceProfileInfoV(d, e[k].index,
                                                (nvmlGpuInstanceProfileInfo_v2_t *)&v3));
        CHECK(v3.id == e[k].id && v3.sliceCount == e[k].slices && v3.memorySizeMB == e[k].mib);
        CHECK(strcmp(v3.name, name) == 0 && v3.capabilities == 0);
        OK(nvmlDeviceGetGpuInstancePossiblePlacements_v2(d, e[k].id, NULL, &count));
        CHECK(count == e[k].nstarts);
        OK(nvmlDeviceGetGpuInstancePossiblePlacements_v2(d, e[k].id, pl, &count));
        for (i = 0; i < count; i++)
            CHECK(pl[i].start == e[k].starts[i] && pl[i].size == e[k].size);
    }
}

static const struct expect_gi a100[] = {
    {NVML_GPU_INSTANCE_PROFILE_1_SLICE, 19, 1, 7, 9728, "1g.10gb", {0, 1, 2, 3, 4, 5, 6}, 7, 1},
    {NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV1, 20, 1, 1, 9728, "1g.10gb+me", {0, 1, 2, 3, 4, 5, 6}, 7, 1},
    {NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV2, 15, 1, 4, 19968, "1g.20gb", {0, 2, 4, 6}, 4, 2},
    {NVML_GPU_INSTANCE_PROFILE_2_SLICE, 14, 2, 3, 19968, "2g.20gb", {0, 2, 4}, 3, 2},
    {NVML_GPU_INSTANCE_PROFILE_3_SLICE, 9, 3, 2, 40192, "3g.40gb", {0, 4}, 2, 4},
    {NVML_GPU_INSTANCE_PROFILE_4_SLICE, 5, 4, 1, 40192, "4g.40gb", {0}, 1, 4},
    {NVML_GPU_INSTANCE_PROFILE_7_SLICE, 0, 7, 1, 81152, "7g.80gb", {0}, 1, 8},
};

static const struct expect_gi h100[] = {
    {NVML_GPU_INSTANCE_PROFILE_1_SLICE, 19, 1, 7, 9984, "1g.10gb", {0, 1, 2, 3, 4, 5, 6}, 7, 1},
    {NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV1, 20, 1, 1, 9984, "1g.10gb+me", {0, 1, 2, 3, 4, 5, 6}, 7, 1},
    {NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV2, 15, 1, 4, 20224, "1g.20gb", {0, 2, 4, 6}, 4, 2},
    {NVML_GPU_INSTANCE_PROFILE_2_SLICE, 14, 2, 3, 20224, "2g.20gb", {0, 2, 4}, 3, 2},
    {NVML_GPU_INSTANCE_PROFILE_3_SLICE, 9, 3, 2, 40448, "3g.40gb", {0, 4}, 2, 4},
    {NVML_GPU_INSTANCE_PROFILE_4_SLICE, 5, 4, 1, 40448, "4g.40gb", {0}, 1, 4},
    {NVML_GPU_INSTANCE_PROFILE_7_SLICE, 0, 7, 1, 80896, "7g.80gb", {0}, 1, 8},
};

static void abi(void)
{
    nvmlDevice_t a = dev("0"), h = dev("1"), t4 = dev("2"), m, parent;
    nvmlReturn_t act = NVML_ERROR_UNKNOWN;
    unsigned int cur = 9, pend = 9, n = 9, is_mig = 9;
    nvmlGpuInstanceProfileInfo_t info;
    nvmlGpuInstanceProfileInfo_v2_t v2;
    nvmlComputeInstanceProfileInfo_v2_t civ2;
    nvmlComputeInstanceProfileInfo_t ciinfo;
    nvmlGpuInstancePlacement_t pl[8], place = {6, 4};
    nvmlGpuInstance_t gi, gi2, gis[8];
    nvmlComputeInstance_t ci, cis[8];
    nvmlGpuInstanceInfo_t giinfo;
    nvmlComputeInstanceInfo_t ciinf;
    nvmlMemory_t mem;
    char uuid[96], name[96];

    /* Not MIG-capable. */
    EXPECT(NVML_ERROR_NOT_SUPPORTED, nvmlDeviceGetMigMode(t4, &cur, &pend));
    EXPECT(NVML_ERROR_NOT_SUPPORTED, nvmlDeviceSetMigMode(t4, NVML_DEVICE_MIG_ENABLE, &act));
    OK(nvmlDeviceGetMaxMigDeviceCount(t4, &n));
    CHECK(n == 0);
    EXPECT(NVML_ERROR_NOT_SUPPORTED, nvmlDeviceGetGpuInstanceProfileInfo(t4, 0, &info));

    /* Capable, MIG off: no instances can be managed. */
    OK(nvmlDeviceGetMigMode(a, &cur, &pend));
    CHECK(cur == NVML_DEVICE_MIG_DISABLE && pend == NVML_DEVICE_MIG_DISABLE);
    OK(nvmlDeviceGetMaxMigDeviceCount(a, &n));
    CHECK(n == 0);
    EXPECT(NVML_ERROR_NOT_SUPPORTED, nvmlDeviceGetGpuInstanceProfileInfo(a, 0, &info));
    EXPECT(NVML_ERROR_NOT_SUPPORTED, nvmlDeviceCreateGpuInstance(a, 19, &gi));
    EXPECT(NVML_ERROR_NOT_SUPPORTED, nvmlDeviceGetMigDeviceHandleByIndex(a, 0, &m));
    EXPECT(NVML_ERROR_INVALID_ARGUMENT, nvmlDeviceSetMigMode(a, 2, &act));
    EXPECT(NVML_ERROR_INVALID_ARGUMENT, nvmlDeviceSetMigMode(a, 1, NULL));

    /* Enable: idle, so it applies at once. */
    OK(nvmlDeviceSetMigMode(a, NVML_DEVICE_MIG_ENABLE, &act));
    CHECK(act == NVML_SUCCESS);
    OK(nvmlDeviceGetMigMode(a, &cur, &pend));
    CHECK(cur == 1 && pend == 1);
    OK(nvmlDeviceGetMaxMigDeviceCount(a, &n));
    CHECK(n == 7);
    OK(nvmlDeviceSetMigMode(h, NVML_DEVICE_MIG_ENABLE, &act));
    CHECK(act == NVML_SUCCESS);

    /* Profiles, versions and placements. */
    check_profiles(a, a100, 7);
    check_profiles(h, h100, 7);
    EXPECT(NVML_ERROR_NOT_SUPPORTED,
           nvmlDeviceGetGpuInstanceProfileInfo(a, NVML_GPU_INSTANCE_PROFILE_8_SLICE, &info));
    EXPECT(NVML_ERROR_NOT_SUPPORTED,
           nvmlDeviceGetGpuInstanceProfileInfo(a, NVML_GPU_INSTANCE_PROFILE_2_SLICE_REV1, &info));
    EXPECT(NVML_ERROR_INVALID_ARGUMENT,
           nvmlDeviceGetGpuInstanceProfileInfo(a, NVML_GPU_INSTANCE_PROFILE_COUNT, &info));
    EXPECT(NVML_ERROR_INVALID_ARGUMENT, nvmlDeviceGetGpuInstanceProfileInfo(a, 0, NULL));
    memset(&v2, 0, sizeof v2);
    v2.version = 2; /* the plain number, not the struct version word */
    EXPECT(NVML_ERROR_ARGUMENT_VERSION_MISMATCH, nvmlDeviceGetGpuInstanceProfileInfoV(a, 0, &v2));
    v2.version = nvmlGpuInstanceProfileInfo_v3 + 1;
    EXPECT(NVML_ERROR_ARGUMENT_VERSION_MISMATCH, nvmlDeviceGetGpuInstanceProfileInfoV(a, 0, &v2));
    n = 1;
    EXPECT(NVML_ERROR_INSUFFICIENT_SIZE, nvmlDeviceGetGpuInstancePossiblePlacements_v2(a, 9, pl, &n));
    CHECK(n == 2);
    EXPECT(NVML_ERROR_INVALID_ARGUMENT, nvmlDeviceGetGpuInstancePossiblePlacements_v2(a, 3, pl, &n));
    OK(nvmlDeviceGetGpuInstanceRemainingCapacity(a, 19, &n));
    CHECK(n == 7);
    OK(nvmlDeviceGetGpuInstanceRemainingCapacity(a, 9, &n));
    CHECK(n == 2);

    /* Placements: not a possible one -> INVALID_ARGUMENT; colliding -> INSUFFICIENT_RESOURCES. */
    EXPECT(NVML_ERROR_INVALID_ARGUMENT, nvmlDeviceCreateGpuInstanceWithPlacement(a, 9, &place, &gi));
    place.start = 4;
    place.size = 2;
    EXPECT(NVML_ERROR_INVALID_ARGUMENT, nvmlDeviceCreateGpuInstanceWithPlacement(a, 9, &place, &gi));
    EXPECT(NVML_ERROR_INVALID_ARGUMENT, nvmlDeviceCreateGpuInstance(a, 4, &gi)); /* an index, not an id */
    place.size = 4;
    OK(nvmlDeviceCreateGpuInstanceWithPlacement(a, 9, &place, &gi));
    OK(nvmlGpuInstanceGetInfo(gi, &giinfo));
    CHECK(giinfo.device == a && giinfo.id == 2 && giinfo.profileId == 9);
    CHECK(giinfo.placement.start == 4 && giinfo.placement.size == 4);
    EXPECT(NVML_ERROR_INSUFFICIENT_RESOURCES,
           nvmlDeviceCreateGpuInstanceWithPlacement(a, 9, &place, &gi2));
    place.start = 4;
    place.size = 2;
    EXPECT(NVML_ERROR_INSUFFICIENT_RESOURCES,
           nvmlDeviceCreateGpuInstanceWithPlacement(a, 14, &place, &gi2));
    EXPECT(NVML_ERROR_INSUFFICIENT_RESOURCES, nvmlDeviceCreateGpuInstance(a, 0, &gi2)); /* 7g */
    OK(nvmlDeviceGetGpuInstanceRemainingCapacity(a, 9, &n));
    CHECK(n == 1);
    OK(nvmlDeviceGetGpuInstanceRemainingCapacity(a, 5, &n));
    CHECK(n == 1);
    OK(nvmlDeviceGetGpuInstanceRemainingCapacity(a, 19, &n));
    CHECK(n == 4);
    n = 0;
    OK(nvmlDeviceGetGpuInstances(a, 9, gis, &n));
    CHECK(n == 1 && gis[0] == gi);
    OK(nvmlDeviceGetGpuInstances(a, 19, gis, &n));
    CHECK(n == 0);
    EXPECT(NVML_ERROR_NOT_FOUND, nvmlDeviceGetGpuInstanceById(a, 1, &gi2));
    OK(nvmlDeviceGetGpuInstanceById(a, 2, &gi2));
    CHECK(gi2 == gi);

    /* Compute instances in a 3g GI: 1c x3, 2c x1, 3g x1; no 4c or 7g. */
    OK(nvmlGpuInstanceGetComputeInstanceProfileInfo(gi, NVML_COMPUTE_INSTANCE_PROFILE_1_SLICE,
                                                    NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED,
                                                    &ciinfo));
    CHECK(ciinfo.id == 0 && ciinfo.sliceCount == 1 && ciinfo.instanceCount == 3);
    CHECK(ciinfo.multiprocessorCount == 14);
    EXPECT(NVML_ERROR_NOT_SUPPORTED,
           nvmlGpuInstanceGetComputeInstanceProfileInfo(gi, NVML_COMPUTE_INSTANCE_PROFILE_4_SLICE,
                                                        0, &ciinfo));
    EXPECT(NVML_ERROR_INVALID_ARGUMENT,
           nvmlGpuInstanceGetComputeInstanceProfileInfo(gi, NVML_COMPUTE_INSTANCE_PROFILE_COUNT, 0,
                                                        &ciinfo));
    EXPECT(NVML_ERROR_INVALID_ARGUMENT,
           nvmlGpuInstanceGetComputeInstanceProfileInfo(gi, 0, 1, &ciinfo));
    memset(&civ2, 0, sizeof civ2);
    civ2.version = 2;
    EXPECT(NVML_ERROR_ARGUMENT_VERSION_MISMATCH,
           nvmlGpuInstanceGetComputeInstanceProfileInfoV(gi, 0, 0, &civ2));
    civ2.version = nvmlComputeInstanceProfileInfo_v2;
    OK(nvmlGpuInstanceGetComputeInstanceProfileInfoV(gi, 0, 0, &civ2));
    CHECK(strcmp(civ2.name, "MIG 1c.3g.40gb") == 0);
    OK(nvmlGpuInstanceGetComputeInstanceProfileInfoV(gi, NVML_COMPUTE_INSTANCE_PROFILE_3_SLICE, 0,
                                                     &civ2));
    CHECK(strcmp(civ2.name, "MIG 3g.40gb") == 0 && civ2.multiprocessorCount == 42);
    OK(nvmlGpuInstanceGetComputeInstanceRemainingCapacity(gi, 0, &n));
    CHECK(n == 3);
    OK(nvmlGpuInstanceCreateComputeInstance(gi, 0, &ci));
    OK(nvmlComputeInstanceGetInfo_v2(ci, &ciinf));
    CHECK(ciinf.device == a && ciinf.gpuInstance == gi && ciinf.id == 0 && ciinf.profileId == 0);
    CHECK(ciinf.placement.start == 0 && ciinf.placement.size == 1);
    OK(nvmlGpuInstanceGetComputeInstanceRemainingCapacity(gi, 0, &n));
    CHECK(n == 2);
    OK(nvmlGpuInstanceGetComputeInstanceRemainingCapacity(gi, 2, &n));
    CHECK(n == 0);
    EXPECT(NVML_ERROR_INSUFFICIENT_RESOURCES, nvmlGpuInstanceCreateComputeInstance(gi, 2, &cis[0]));

    /* The MIG device. */
    OK(nvmlDeviceGetMaxMigDeviceCount(a, &n));
    CHECK(n == 7);
    OK(nvmlDeviceGetMigDeviceHandleByIndex(a, 0, &m));
    EXPECT(NVML_ERROR_NOT_FOUND, nvmlDeviceGetMigDeviceHandleByIndex(a, 1, &parent));
    EXPECT(NVML_ERROR_INVALID_ARGUMENT, nvmlDeviceGetMigDeviceHandleByIndex(a, 7, &parent));
    OK(nvmlDeviceIsMigDeviceHandle(m, &is_mig));
    CHECK(is_mig == 1);
    OK(nvmlDeviceIsMigDeviceHandle(a, &is_mig));
    CHECK(is_mig == 0);
    OK(nvmlDeviceGetDeviceHandleFromMigDeviceHandle(m, &parent));
    CHECK(parent == a);
    EXPECT(NVML_ERROR_INVALID_ARGUMENT, nvmlDeviceGetDeviceHandleFromMigDeviceHandle(a, &parent));
    OK(nvmlDeviceGetGpuInstanceId(m, &n));
    CHECK(n == 2);
    OK(nvmlDeviceGetComputeInstanceId(m, &n));
    CHECK(n == 0);
    EXPECT(NVML_ERROR_NOT_SUPPORTED, nvmlDeviceGetGpuInstanceId(a, &n));
    OK(nvmlDeviceGetUUID(m, uuid, sizeof uuid));
    CHECK(strncmp(uuid, "MIG-", 4) == 0 && strlen(uuid) == 40);
    EXPECT(NVML_ERROR_INSUFFICIENT_SIZE, nvmlDeviceGetUUID(m, uuid, 40));
    OK(nvmlDeviceGetName(m, name, sizeof name));
    CHECK(strcmp(name, "NVIDIA A100-SXM4-80GB MIG 1c.3g.40gb") == 0);
    OK(nvmlDeviceGetMemoryInfo(m, &mem));
    CHECK(mem.total == 40192ull << 20 && mem.free + mem.used == mem.total);
    EXPECT(NVML_ERROR_NOT_SUPPORTED, nvmlDeviceGetMigMode(m, &cur, &pend));
    n = 5;
    OK(nvmlDeviceGetComputeRunningProcesses_v3(m, &n, NULL));
    CHECK(n == 0);

    /* Destroying: a GI with compute instances is in use; then the CI, then the GI. */
    EXPECT(NVML_ERROR_IN_USE, nvmlGpuInstanceDestroy(gi));
    /* Disabling MIG while instances exist cannot be activated: pending stays. */
    OK(nvmlDeviceSetMigMode(a, NVML_DEVICE_MIG_DISABLE, &act));
    CHECK(act == NVML_ERROR_IN_USE);
    OK(nvmlDeviceGetMigMode(a, &cur, &pend));
    CHECK(cur == 1 && pend == 0);
    EXPECT(NVML_ERROR_NOT_FOUND, nvmlGpuInstanceGetComputeInstanceById(gi, 1, &cis[1]));
    OK(nvmlGpuInstanceGetComputeInstanceById(gi, 0, &cis[1]));
    CHECK(cis[1] == ci);
    n = 1;
    EXPECT(NVML_ERROR_NOT_SUPPORTED, nvmlDeviceGetGraphicsRunningProcesses_v3(m, &n, NULL));
    OK(nvmlComputeInstanceDestroy(ci));
    EXPECT(NVML_ERROR_INVALID_ARGUMENT, nvmlComputeInstanceDestroy(ci));
    EXPECT(NVML_ERROR_NOT_FOUND, nvmlGpuInstanceGetComputeInstanceById(gi, 0, &cis[1]));
    EXPECT(NVML_ERROR_INVALID_ARGUMENT, nvmlDeviceGetUUID(m, uuid, sizeof uuid)); /* stale */
    OK(nvmlGpuInstanceDestroy(gi));
    EXPECT(NVML_ERROR_INVALID_ARGUMENT, nvmlGpuInstanceGetInfo(gi, &giinfo));
    OK(nvmlDeviceSetMigMode(a, NVML_DEVICE_MIG_DISABLE, &act));
    CHECK(act == NVML_SUCCESS);
    OK(nvmlDeviceGetMigMode(a, &cur, &pend));
    CHECK(cur == 0 && pend == 0);
    (void)cis;
    printf("abi ok\n");
}

int main(int argc, char **argv)
{
    int i;

    setvbuf(stdout, NULL, _IONBF, 0);
    OK(nvmlInit_v2());
    if (argc == 2 && strcmp(argv[1], "abi") == 0) {
        abi();
        OK(nvmlShutdown());
        return 0;
    }
    for (i = 1; i < argc;) {
        const char *c = argv[i];
        nvmlReturn_t ret, act = 0;
        unsigned int a = 0, b = 0;

        if (strcmp(c, "mode") == 0 && i + 1 < argc) {
            ret = nvmlDeviceGetMigMode(dev(argv[i + 1]), &a, &b);
            printf("mode %d %u %u\n", ret, a, b);
            i += 2;
        } else if (strcmp(c, "set") == 0 && i + 2 < argc) {
            ret = nvmlDeviceSetMigMode(dev(argv[i + 1]), (unsigned int)atoi(argv[i + 2]), &act);
            printf("set %d %d\n", ret, act);
            i += 3;
        } else if (strcmp(c, "cgi") == 0 && i + 2 < argc) {
            nvmlGpuInstance_t gi = NULL;
            nvmlGpuInstanceInfo_t info = {0};
            bool placed = i + 3 < argc && argv[i + 3][0] >= '0' && argv[i + 3][0] <= '9';
            if (placed) {
                nvmlGpuInstanceProfileInfo_t p;
                nvmlGpuInstancePlacement_t pl;
                unsigned int k;
                /* the placement size is the profile's: look it up by id */
                for (k = 0; k < NVML_GPU_INSTANCE_PROFILE_COUNT; k++)
                    if (nvmlDeviceGetGpuInstanceProfileInfo(dev(argv[i + 1]), k, &p) == 0 &&
                        p.id == (unsigned int)atoi(argv[i + 2]))
                        break;
                pl.start = (unsigned int)atoi(argv[i + 3]);
                pl.size = 0;
                if (k < NVML_GPU_INSTANCE_PROFILE_COUNT) {
                    nvmlGpuInstancePlacement_t all[8];
                    unsigned int n = 8;
                    if (nvmlDeviceGetGpuInstancePossiblePlacements_v2(dev(argv[i + 1]), p.id, all,
                                                                      &n) == 0 && n > 0)
                        pl.size = all[0].size;
                }
                ret = nvmlDeviceCreateGpuInstanceWithPlacement(
                    dev(argv[i + 1]), (unsigned int)atoi(argv[i + 2]), &pl, &gi);
            } else {
                ret = nvmlDeviceCreateGpuInstance(dev(argv[i + 1]),
                                                  (unsigned int)atoi(argv[i + 2]), &gi);
            }
            if (ret == 0)
                OK(nvmlGpuInstanceGetInfo(gi, &info));
            printf("cgi %d %d\n", ret, ret == 0 ? (int)info.id : -1);
            i += placed ? 4 : 3;
        } else if (strcmp(c, "cci") == 0 && i + 3 < argc) {
            nvmlComputeInstance_t ci = NULL;
            nvmlComputeInstanceInfo_t info = {0};
            ret = nvmlGpuInstanceCreateComputeInstance(
                gi_by_id(dev(argv[i + 1]), (unsigned int)atoi(argv[i + 2])),
                (unsigned int)atoi(argv[i + 3]), &ci);
            if (ret == 0)
                OK(nvmlComputeInstanceGetInfo_v2(ci, &info));
            printf("cci %d %d\n", ret, ret == 0 ? (int)info.id : -1);
            i += 4;
        } else if (strcmp(c, "dci") == 0 && i + 3 < argc) {
            nvmlGpuInstance_t gi = gi_by_id(dev(argv[i + 1]), (unsigned int)atoi(argv[i + 2]));
            ret = nvmlComputeInstanceDestroy(ci_by_id(gi, (unsigned int)atoi(argv[i + 3])));
            printf("dci %d\n", ret);
            i += 4;
        } else if (strcmp(c, "dgi") == 0 && i + 2 < argc) {
            ret = nvmlGpuInstanceDestroy(gi_by_id(dev(argv[i + 1]), (unsigned int)atoi(argv[i + 2])));
            printf("dgi %d\n", ret);
            i += 3;
        } else if (strcmp(c, "cap") == 0 && i + 2 < argc) {
            ret = nvmlDeviceGetGpuInstanceRemainingCapacity(dev(argv[i + 1]),
                                                            (unsigned int)atoi(argv[i + 2]), &a);
            printf("cap %d %u\n", ret, a);
            i += 3;
        } else if (strcmp(c, "list") == 0 && i + 1 < argc) {
            nvmlDevice_t d = dev(argv[i + 1]), m;
            unsigned int max = 0, k, n = 0;
            OK(nvmlDeviceGetMaxMigDeviceCount(d, &max));
            for (k = 0; k < max; k++) {
                char uuid[96], name[96];
                nvmlMemory_t mem;
                ret = nvmlDeviceGetMigDeviceHandleByIndex(d, k, &m);
                if (ret == NVML_ERROR_NOT_FOUND)
                    continue;
                OK(ret);
                OK(nvmlDeviceGetUUID(m, uuid, sizeof uuid));
                OK(nvmlDeviceGetName(m, name, sizeof name));
                OK(nvmlDeviceGetGpuInstanceId(m, &a));
                OK(nvmlDeviceGetComputeInstanceId(m, &b));
                OK(nvmlDeviceGetMemoryInfo(m, &mem));
                printf("dev %u %s %u %u %llu %s\n", k, uuid, a, b, mem.total >> 20, name);
                n++;
            }
            printf("count %u\n", n);
            i += 2;
        } else {
            fprintf(stderr, "mig-check: bad command at '%s'\n", c);
            return 2;
        }
    }
    OK(nvmlShutdown());
    return 0;
}
