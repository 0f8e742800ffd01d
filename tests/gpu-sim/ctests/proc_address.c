/*
 * The fake libcuda.so.1 reached the way the CUDA runtime and HAMi-core reach
 * the driver: dlopen("libcuda.so.1") + dlsym, and cuGetProcAddress(_v2). Not
 * linked against the library. Run by tests/cuda_driver.rs as
 *
 *     proc-address resolve <cudaVersion> <flags> <name>...
 *         one line per name: "<name> <result> <status> <symbol>", where symbol is
 *         the exported name the returned pointer belongs to (dladdr) or "-";
 *         cuGetProcAddress (v1) must agree with cuGetProcAddress_v2.
 *     proc-address dlsym <symbol>...
 *         checks each symbol is exported with its own address, calls the driver
 *         through dlsym'd pointers, prints "count=<n>" and "missing=<names>".
 */
#define _GNU_SOURCE
#include "cuda_api.h"
#include "check.h"

#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef CUresult (*get_proc_t)(const char *, void **, int, cuuint64_t);
typedef CUresult (*get_proc_v2_t)(const char *, void **, int, cuuint64_t,
                                  CUdriverProcAddressQueryResult *);

static void *lib;
static get_proc_t get_proc;
static get_proc_v2_t get_proc_v2;

static void open_driver(void)
{
    lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (lib == NULL) {
        fprintf(stderr, "dlopen: %s\n", dlerror());
        exit(1);
    }
    get_proc = (get_proc_t)dlsym(lib, "cuGetProcAddress");
    get_proc_v2 = (get_proc_v2_t)dlsym(lib, "cuGetProcAddress_v2");
    CHECK(get_proc != NULL && get_proc_v2 != NULL);
}

static int resolve(int version, unsigned long long flags, int count, char **names)
{
    void *pfn, *pfn1;
    CUdriverProcAddressQueryResult status;
    Dl_info info;

    /* Argument checks, before cuInit (the runtime resolves cuInit this way). */
    CHECK(get_proc_v2(NULL, &pfn, version, 0, &status) == CUDA_ERROR_INVALID_VALUE);
    CHECK(get_proc_v2("cuInit", NULL, version, 0, &status) == CUDA_ERROR_INVALID_VALUE);
    CHECK(get_proc_v2("cuInit", &pfn, version, 4, &status) == CUDA_ERROR_INVALID_VALUE);
    CHECK(get_proc_v2("cuInit", &pfn, version, 3, &status) == CUDA_ERROR_INVALID_VALUE);
    CHECK(get_proc_v2("cuInit", &pfn, version, 0, NULL) == CUDA_SUCCESS); /* status optional */

    for (int i = 0; i < count; i++) {
        CUresult r, r1;
        const char *symbol = "-";
        pfn = (void *)0x1;
        pfn1 = (void *)0x1;
        status = (CUdriverProcAddressQueryResult)99;
        r = get_proc_v2(names[i], &pfn, version, flags, &status);
        r1 = get_proc(names[i], &pfn1, version, flags);
        CHECK(r == r1 && pfn == pfn1);
        if (r == CUDA_SUCCESS) {
            CHECK(pfn != NULL && dladdr(pfn, &info) != 0 && info.dli_sname != NULL);
            CHECK(info.dli_saddr == pfn); /* the start of an exported function */
            CHECK(dlsym(lib, info.dli_sname) == pfn);
            symbol = info.dli_sname;
        } else {
            CHECK(pfn == NULL);
        }
        printf("%s %d %d %s\n", names[i], (int)r, (int)status, symbol);
    }
    return 0;
}

static int dlsym_paths(int count, char **names)
{
    typedef CUresult (*init_t)(unsigned int);
    typedef CUresult (*count_t)(int *);
    char missing[4096] = "";
    init_t init;
    count_t get_count;
    void *via_proc = NULL;
    int n = -1;

    for (int i = 0; i < count; i++) {
        void *p = dlsym(lib, names[i]);
        if (p == NULL) {
            strncat(missing, names[i], sizeof missing - strlen(missing) - 2);
            strcat(missing, " ");
            continue;
        }
        CHECK(dlsym(RTLD_DEFAULT, names[i]) == NULL || dlsym(RTLD_DEFAULT, names[i]) == p);
        for (int j = 0; j < i; j++) /* every exported name has its own function */
            CHECK(dlsym(lib, names[j]) != p);
    }
    /* Internal helpers stay hidden. */
    CHECK(dlsym(lib, "sim_node_load") == NULL);
    CHECK(dlsym(lib, "sim_state_charge") == NULL);
    CHECK(dlsym(lib, "cuda_proc_lookup") == NULL);
    CHECK(dlsym(lib, "cuda_procs") == NULL);

    init = (init_t)dlsym(lib, "cuInit");
    get_count = (count_t)dlsym(lib, "cuDeviceGetCount");
    CHECK(init != NULL && get_count != NULL);
    CHECK(get_count(&n) == CUDA_ERROR_NOT_INITIALIZED);
    CHECK(init(0) == CUDA_SUCCESS);
    CHECK(get_count(&n) == CUDA_SUCCESS);
    CHECK(get_proc("cuDeviceGetCount", &via_proc, 12040, 0) == CUDA_SUCCESS);
    CHECK(via_proc == (void *)get_count);
    printf("count=%d\n", n);
    printf("missing=%s\n", missing);
    /* A second dlopen gives the same library. */
    CHECK(dlopen("libcuda.so.1", RTLD_NOW) == lib);
    printf("ok\n");
    return 0;
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    open_driver();
    if (argc >= 4 && strcmp(argv[1], "resolve") == 0)
        return resolve(atoi(argv[2]), strtoull(argv[3], NULL, 0), argc - 4, argv + 4);
    if (argc >= 2 && strcmp(argv[1], "dlsym") == 0)
        return dlsym_paths(argc - 2, argv + 2);
    fprintf(stderr, "usage: proc-address resolve <version> <flags> <name>... | dlsym <name>...\n");
    return 2;
}
