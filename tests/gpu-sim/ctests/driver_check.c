/*
 * Scenarios against the fake libcuda.so.1, linked the way CUDA programs link
 * the driver (-lcuda). Run by tests/cuda_driver.rs as
 *
 *     driver-check <scenario> [args...]
 *
 * Each scenario checks exact CUresult codes itself (a mismatch prints the call
 * and both codes on stderr and exits 1) and prints "key=value" lines that the
 * Rust test asserts on. "ok" on the last line means the scenario completed.
 */
#define _GNU_SOURCE
#include "cuda_api.h"
#include "check.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define MIB (1024ull * 1024ull)

static size_t free_mem(void)
{
    size_t free_b = 0, total_b = 0;
    OK(cuMemGetInfo_v2(&free_b, &total_b));
    return free_b;
}

/* A context on device `ordinal`, current. */
static CUcontext context_on(int ordinal)
{
    CUcontext ctx = NULL;
    CUdevice dev;
    OK(cuDeviceGet(&dev, ordinal));
    OK(cuCtxCreate_v2(&ctx, 0, dev));
    return ctx;
}

/* Waits for the parent to write a line on stdin (or close it). */
static void wait_parent(const char *what)
{
    char line[64];
    printf("%s\n", what);
    fflush(stdout);
    if (fgets(line, sizeof line, stdin) == NULL)
        return;
}

static int before_init(void)
{
    CUdevice dev;
    CUcontext ctx;
    CUdeviceptr ptr;
    size_t f, t;
    int count, version = 0;
    const char *s = NULL;
    void *pfn = NULL;

    EXPECT(CUDA_ERROR_NOT_INITIALIZED, cuDeviceGetCount(&count));
    EXPECT(CUDA_ERROR_NOT_INITIALIZED, cuDeviceGet(&dev, 0));
    EXPECT(CUDA_ERROR_NOT_INITIALIZED, cuCtxGetCurrent(&ctx));
    EXPECT(CUDA_ERROR_NOT_INITIALIZED, cuCtxCreate_v2(&ctx, 0, 0));
    EXPECT(CUDA_ERROR_NOT_INITIALIZED, cuDevicePrimaryCtxRetain(&ctx, 0));
    EXPECT(CUDA_ERROR_NOT_INITIALIZED, cuMemAlloc_v2(&ptr, 1));
    EXPECT(CUDA_ERROR_NOT_INITIALIZED, cuMemGetInfo_v2(&f, &t));
    EXPECT(CUDA_ERROR_NOT_INITIALIZED, cuDeviceTotalMem_v2(&t, 0));
    EXPECT(CUDA_ERROR_NOT_INITIALIZED, cuLaunchKernel(NULL, 1, 1, 1, 1, 1, 1, 0, NULL, NULL, NULL));
    EXPECT(CUDA_ERROR_NOT_INITIALIZED, cuCtxSynchronize());
    /* These need no initialisation. */
    OK(cuDriverGetVersion(&version));
    OK(cuGetErrorString(CUDA_ERROR_OUT_OF_MEMORY, &s));
    CHECK(strcmp(s, "out of memory") == 0);
    OK(cuGetProcAddress("cuInit", &pfn, 12040, 0));
    CHECK(pfn == (void *)&cuInit);
    EXPECT(CUDA_ERROR_INVALID_VALUE, cuInit(1));
    printf("driver_version=%d\n", version);
    printf("init=%d\n", (int)cuInit(0));
    printf("init_again=%d\n", (int)cuInit(0));
    printf("count_after=%d\n", (int)cuDeviceGetCount(&count));
    return 0;
}

static void print_device(int i)
{
    char name[128], bus[32];
    CUuuid uuid;
    size_t total;
    int major, minor, sms;
    CUdevice dev, back;

    OK(cuDeviceGet(&dev, i));
    OK(cuDeviceGetName(name, sizeof name, dev));
    OK(cuDeviceGetUuid_v2(&uuid, dev));
    OK(cuDeviceTotalMem_v2(&total, dev));
    OK(cuDeviceGetAttribute(&major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev));
    OK(cuDeviceGetAttribute(&minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev));
    OK(cuDeviceGetAttribute(&sms, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, dev));
    OK(cuDeviceGetPCIBusId(bus, sizeof bus, dev));
    OK(cuDeviceGetByPCIBusId(&back, bus));
    CHECK(back == dev);
    printf("dev%d.name=%s\n", i, name);
    printf("dev%d.uuid=", i);
    for (int b = 0; b < 16; b++)
        printf("%02x", (unsigned char)uuid.bytes[b]);
    printf("\n");
    printf("dev%d.total=%zu\n", i, total);
    printf("dev%d.cc=%d.%d\n", i, major, minor);
    printf("dev%d.sms=%d\n", i, sms);
    printf("dev%d.pci=%s\n", i, bus);
}

static int basics(void)
{
    CUcontext ctx = NULL, cur = NULL, primary = NULL, popped = NULL;
    CUdevice dev = -1;
    CUdeviceptr ptr;
    CUuuid uuid;
    char name[8];
    unsigned int flags;
    int count, active, value;
    const char *s;

    OK(cuInit(0));
    OK(cuInit(0)); /* idempotent */
    OK(cuDeviceGetCount(&count));
    printf("count=%d\n", count);
    for (int i = 0; i < count; i++)
        print_device(i);

    /* Argument errors. */
    EXPECT(CUDA_ERROR_INVALID_VALUE, cuDeviceGetCount(NULL));
    EXPECT(CUDA_ERROR_INVALID_VALUE, cuDeviceGet(NULL, 0));
    EXPECT(CUDA_ERROR_INVALID_DEVICE, cuDeviceGet(&dev, count));
    EXPECT(CUDA_ERROR_INVALID_DEVICE, cuDeviceGet(&dev, -1));
    EXPECT(CUDA_ERROR_INVALID_VALUE, cuDeviceGetName(NULL, 8, 0));
    EXPECT(CUDA_ERROR_INVALID_DEVICE, cuDeviceGetName(name, sizeof name, count));
    OK(cuDeviceGetName(name, sizeof name, 0)); /* truncated, terminated */
    CHECK(strlen(name) == sizeof name - 1);
    EXPECT(CUDA_ERROR_INVALID_VALUE, cuDeviceGetUuid(NULL, 0));
    EXPECT(CUDA_ERROR_INVALID_DEVICE, cuDeviceGetUuid(&uuid, count));
    EXPECT(CUDA_ERROR_INVALID_VALUE, cuDeviceGetAttribute(NULL, CU_DEVICE_ATTRIBUTE_WARP_SIZE, 0));
    EXPECT(CUDA_ERROR_INVALID_VALUE, cuDeviceGetAttribute(&value, (CUdevice_attribute)0, 0));
    EXPECT(CUDA_ERROR_INVALID_VALUE, cuDeviceGetAttribute(&value, (CUdevice_attribute)100000, 0));
    OK(cuDeviceGetAttribute(&value, CU_DEVICE_ATTRIBUTE_WARP_SIZE, 0));
    CHECK(value == 32);

    /* No context yet. */
    OK(cuCtxGetCurrent(&cur));
    CHECK(cur == NULL);
    EXPECT(CUDA_ERROR_INVALID_VALUE, cuCtxGetCurrent(NULL));
    EXPECT(CUDA_ERROR_INVALID_CONTEXT, cuCtxGetDevice(&dev));
    EXPECT(CUDA_ERROR_INVALID_CONTEXT, cuCtxSynchronize());
    EXPECT(CUDA_ERROR_INVALID_CONTEXT, cuMemAlloc_v2(&ptr, 1));
    EXPECT(CUDA_ERROR_INVALID_CONTEXT, cuCtxPopCurrent_v2(&popped));

    /* Created contexts are pushed and current. */
    EXPECT(CUDA_ERROR_INVALID_VALUE, cuCtxCreate_v2(NULL, 0, 0));
    EXPECT(CUDA_ERROR_INVALID_DEVICE, cuCtxCreate_v2(&ctx, 0, count));
    EXPECT(CUDA_ERROR_INVALID_VALUE, cuCtxCreate_v2(&ctx, 0x3, 0)); /* SPIN | YIELD */
    EXPECT(CUDA_ERROR_INVALID_VALUE, cuCtxCreate_v2(&ctx, 0x100, 0));
    OK(cuCtxCreate_v2(&ctx, CU_CTX_SCHED_BLOCKING_SYNC, 0));
    OK(cuCtxGetCurrent(&cur));
    CHECK(cur == ctx);
    OK(cuCtxGetDevice(&dev));
    CHECK(dev == 0);
    OK(cuCtxSynchronize());
    OK(cuCtxPopCurrent_v2(&popped));
    CHECK(popped == ctx);
    OK(cuCtxGetCurrent(&cur));
    CHECK(cur == NULL);
    OK(cuCtxPushCurrent_v2(ctx));
    OK(cuCtxSetCurrent(NULL)); /* pops */
    OK(cuCtxGetCurrent(&cur));
    CHECK(cur == NULL);
    OK(cuCtxSetCurrent(ctx));
    OK(cuCtxDestroy_v2(ctx));
    OK(cuCtxGetCurrent(&cur));
    CHECK(cur == NULL);
    EXPECT(CUDA_ERROR_INVALID_CONTEXT, cuCtxDestroy_v2(ctx));
    EXPECT(CUDA_ERROR_INVALID_CONTEXT, cuCtxSetCurrent(ctx));

    /* _v3 and _v4 signatures. */
    {
        CUexecAffinityParam aff = {CU_EXEC_AFFINITY_TYPE_SM_COUNT, {{4}}};
        CUctxCreateParams params = {&aff, 1, NULL};
        OK(cuCtxCreate_v3(&ctx, &aff, 1, 0, 0));
        OK(cuCtxDestroy_v2(ctx));
        EXPECT(CUDA_ERROR_INVALID_VALUE, cuCtxCreate_v3(&ctx, NULL, 1, 0, 0));
        OK(cuCtxCreate_v4(&ctx, &params, 0, 0));
        OK(cuCtxDestroy(ctx));
        OK(cuCtxCreate_v4(&ctx, NULL, 0, 0));
        OK(cuCtxDestroy_v2(ctx));
    }

    /* Primary context: reference counted, not current until set, not destroyable. */
    OK(cuDevicePrimaryCtxGetState(0, &flags, &active));
    CHECK(active == 0);
    OK(cuDevicePrimaryCtxRetain(&primary, 0));
    OK(cuDevicePrimaryCtxRetain(&cur, 0));
    CHECK(cur == primary);
    OK(cuDevicePrimaryCtxGetState(0, &flags, &active));
    CHECK(active == 1);
    OK(cuCtxGetCurrent(&cur));
    CHECK(cur == NULL);
    OK(cuCtxSetCurrent(primary));
    OK(cuCtxGetDevice(&dev));
    EXPECT(CUDA_ERROR_INVALID_CONTEXT, cuCtxDestroy_v2(primary));
    OK(cuDevicePrimaryCtxRelease_v2(0));
    OK(cuCtxSynchronize()); /* one reference left */
    OK(cuDevicePrimaryCtxRelease_v2(0));
    EXPECT(CUDA_ERROR_INVALID_CONTEXT, cuCtxSynchronize()); /* destroyed while current */
    EXPECT(CUDA_ERROR_INVALID_CONTEXT, cuDevicePrimaryCtxRelease_v2(0));
    EXPECT(CUDA_ERROR_INVALID_DEVICE, cuDevicePrimaryCtxRetain(&primary, count));

    /* Error strings and names. */
    OK(cuGetErrorName(CUDA_ERROR_INVALID_CONTEXT, &s));
    printf("name201=%s\n", s);
    OK(cuGetErrorString(CUDA_ERROR_NO_DEVICE, &s));
    printf("string100=%s\n", s);
    s = "unchanged";
    EXPECT(CUDA_ERROR_INVALID_VALUE, cuGetErrorString((CUresult)12345, &s));
    CHECK(s == NULL);
    printf("ok\n");
    return 0;
}

static int alloc(void)
{
    CUdeviceptr a, b, c, d, big;
    CUdeviceptr_v1 small32;
    size_t f0, f1, total, pitch;
    unsigned int free32, total32;

    OK(cuInit(0));
    OK(cuDeviceTotalMem_v2(&total, 0));
    printf("total=%zu\n", total);
    context_on(0);
    f0 = free_mem();
    printf("free_with_context=%zu\n", f0);

    /* Small allocations share 2 MiB pages. */
    OK(cuMemAlloc_v2(&a, 1));
    CHECK(a % 512 == 0);
    printf("after_1_byte=%zu\n", f0 - free_mem());
    OK(cuMemAlloc_v2(&b, 1000));
    CHECK(b != a && b % 512 == 0);
    printf("after_2_small=%zu\n", f0 - free_mem());
    OK(cuMemAlloc_v2(&c, 2 * MIB - 1536)); /* large: its own pages */
    printf("after_large=%zu\n", f0 - free_mem());
    OK(cuMemAlloc_v2(&d, 3 * MIB));
    printf("after_3mib=%zu\n", f0 - free_mem());
    OK(cuMemFree_v2(c));
    OK(cuMemFree_v2(d));
    OK(cuMemFree_v2(a));
    printf("after_free_most=%zu\n", f0 - free_mem());
    OK(cuMemFree_v2(b));
    CHECK(free_mem() == f0);

    /* Errors. */
    EXPECT(CUDA_ERROR_INVALID_VALUE, cuMemAlloc_v2(&a, 0));
    EXPECT(CUDA_ERROR_INVALID_VALUE, cuMemAlloc_v2(NULL, 16));
    EXPECT(CUDA_ERROR_INVALID_VALUE, cuMemFree_v2(0x1234));
    OK(cuMemAlloc_v2(&a, 4 * MIB));
    EXPECT(CUDA_ERROR_INVALID_VALUE, cuMemFree_v2(a + 512)); /* not the start */
    OK(cuMemFree_v2(a));
    EXPECT(CUDA_ERROR_INVALID_VALUE, cuMemFree_v2(a)); /* twice */
    OK(cuMemFree_v2(0));
    EXPECT(CUDA_ERROR_INVALID_VALUE, cuMemGetInfo_v2(NULL, &total));
    EXPECT(CUDA_ERROR_OUT_OF_MEMORY, cuMemAlloc_v2(&a, (size_t)-1));

    /* The legacy 32-bit entry points. */
    OK(cuMemAlloc(&small32, 1 << 20));
    CHECK(small32 != 0);
    OK(cuMemGetInfo(&free32, &total32));
    CHECK(total32 == (total > 0xFFFFFFFFull ? 0xFFFFFFFFu : total));
    OK(cuMemFree(small32));

    /* Pitch: rows padded to 512 bytes. */
    EXPECT(CUDA_ERROR_INVALID_VALUE, cuMemAllocPitch_v2(&a, &pitch, 100, 10, 3));
    EXPECT(CUDA_ERROR_INVALID_VALUE, cuMemAllocPitch_v2(&a, &pitch, 0, 10, 4));
    OK(cuMemAllocPitch_v2(&a, &pitch, 1000, 4096, 4));
    printf("pitch=%zu\n", pitch);
    printf("after_pitch=%zu\n", f0 - free_mem());
    OK(cuMemFree_v2(a));

    /* Managed memory is usable from the host and takes no device memory until the device
     * touches it, so it may exceed the device's free memory. */
    EXPECT(CUDA_ERROR_INVALID_VALUE, cuMemAllocManaged(&a, 4 * MIB, 0));
    OK(cuMemAllocManaged(&a, 6 * MIB, CU_MEM_ATTACH_GLOBAL));
    memset((void *)(uintptr_t)a, 0x5a, 6 * MIB);
    printf("after_managed=%zu\n", f0 - free_mem());
    OK(cuMemFree_v2(a));
    {
        size_t beyond = free_mem() + 64 * MIB;
        OK(cuMemAllocManaged(&a, beyond, CU_MEM_ATTACH_GLOBAL));
        printf("after_managed_beyond_free=%zu\n", f0 - free_mem());
        OK(cuMemFree_v2(a));
    }

    /* Stream-ordered: default pool and an explicit pool with a cap. */
    {
        CUmemoryPool pool = NULL, dflt = NULL;
        CUmemPoolProps props;
        CUstream stream;
        memset(&props, 0, sizeof props);
        props.allocType = CU_MEM_ALLOCATION_TYPE_PINNED;
        props.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
        props.location.id = 0;
        props.maxSize = 8 * MIB;
        OK(cuStreamCreate(&stream, CU_STREAM_NON_BLOCKING));
        OK(cuMemAllocAsync(&a, 10 * MIB, stream));
        OK(cuMemAllocAsync_ptsz(&b, 1, CU_STREAM_PER_THREAD));
        printf("after_async=%zu\n", f0 - free_mem());
        EXPECT(CUDA_ERROR_INVALID_HANDLE, cuMemAllocAsync(&c, 1, (CUstream)0x1000));
        OK(cuMemPoolCreate(&pool, &props));
        OK(cuMemAllocFromPoolAsync(&c, 6 * MIB, pool, stream));
        EXPECT(CUDA_ERROR_OUT_OF_MEMORY, cuMemAllocFromPoolAsync(&d, 4 * MIB, pool, stream));
        EXPECT(CUDA_ERROR_INVALID_VALUE, cuMemAllocFromPoolAsync(&d, 4 * MIB, NULL, stream));
        OK(cuMemFreeAsync(a, stream));
        OK(cuMemFreeAsync_ptsz(b, NULL));
        OK(cuMemFree_v2(c)); /* stream-ordered memory may be freed synchronously */
        EXPECT(CUDA_ERROR_INVALID_VALUE, cuMemFreeAsync(c, stream));
        OK(cuDeviceGetDefaultMemPool(&dflt, 0));
        EXPECT(CUDA_ERROR_INVALID_VALUE, cuMemPoolDestroy(dflt));
        OK(cuMemPoolDestroy(pool));
        EXPECT(CUDA_ERROR_INVALID_VALUE, cuMemPoolDestroy(pool));
        OK(cuStreamSynchronize(stream));
        OK(cuStreamDestroy_v2(stream));
        EXPECT(CUDA_ERROR_INVALID_HANDLE, cuStreamSynchronize(stream));
        CHECK(free_mem() == f0);
    }

    /* Destroying a context frees what was allocated in it. */
    OK(cuMemAlloc_v2(&big, 64 * MIB));
    OK(cuMemAlloc_v2(&a, 100));
    f1 = free_mem();
    printf("before_destroy_used=%zu\n", f0 - f1);
    {
        CUcontext ctx;
        OK(cuCtxGetCurrent(&ctx));
        OK(cuCtxDestroy_v2(ctx));
        context_on(0);
        CHECK(free_mem() == f0);
        EXPECT(CUDA_ERROR_INVALID_VALUE, cuMemFree_v2(big));
    }
    printf("ok\n");
    return 0;
}

static int oom(void)
{
    CUdeviceptr a, b;
    size_t f0;

    OK(cuInit(0));
    context_on(0);
    f0 = free_mem();
    printf("free=%zu\n", f0);
    EXPECT(CUDA_ERROR_OUT_OF_MEMORY, cuMemAlloc_v2(&a, f0 + 1));
    CHECK(free_mem() == f0);
    OK(cuMemAlloc_v2(&a, f0)); /* exactly everything */
    CHECK(free_mem() == 0);
    EXPECT(CUDA_ERROR_OUT_OF_MEMORY, cuMemAlloc_v2(&b, 1));
    OK(cuMemAllocManaged(&b, f0, CU_MEM_ATTACH_GLOBAL)); /* host-backed: the device is full */
    CHECK(free_mem() == 0);
    OK(cuMemFree_v2(b));
    {
        CUcontext ctx2;
        EXPECT(CUDA_ERROR_OUT_OF_MEMORY, cuCtxCreate_v2(&ctx2, 0, 0)); /* contexts cost memory */
    }
    CHECK(free_mem() == 0);
    OK(cuMemFree_v2(a));
    CHECK(free_mem() == f0);
    printf("ok\n");
    return 0;
}

/* hold <ordinal> <mib>: allocate, report, wait for the parent, exit normally. */
static int hold(int ordinal, unsigned long long mib)
{
    CUdeviceptr a;

    OK(cuInit(0));
    context_on(ordinal);
    if (mib > 0)
        OK(cuMemAlloc_v2(&a, mib * MIB));
    printf("pid=%d\n", (int)getpid());
    printf("free=%zu\n", free_mem());
    wait_parent("holding");
    printf("ok\n");
    return 0;
}

/* meminfo <ordinal>: free/total seen from a fresh primary context. */
static int meminfo(int ordinal)
{
    CUcontext ctx;
    size_t f, t;

    OK(cuInit(0));
    OK(cuDevicePrimaryCtxRetain(&ctx, ordinal));
    OK(cuCtxSetCurrent(ctx));
    OK(cuMemGetInfo_v2(&f, &t));
    printf("free=%zu\ntotal=%zu\nok\n", f, t);
    return 0;
}

static int vmm(void)
{
    CUmemAllocationProp prop;
    CUmemGenericAllocationHandle h, hh;
    CUdeviceptr va;
    size_t gran = 0, rec = 0, f0;
    int count;

    OK(cuInit(0));
    OK(cuDeviceGetCount(&count));
    context_on(0);
    f0 = free_mem();
    memset(&prop, 0, sizeof prop);
    prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
    prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    prop.location.id = 0;
    OK(cuMemGetAllocationGranularity(&gran, &prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM));
    OK(cuMemGetAllocationGranularity(&rec, &prop, CU_MEM_ALLOC_GRANULARITY_RECOMMENDED));
    printf("granularity=%zu\nrecommended=%zu\n", gran, rec);
    EXPECT(CUDA_ERROR_INVALID_VALUE, cuMemGetAllocationGranularity(NULL, &prop, 0));
    EXPECT(CUDA_ERROR_INVALID_VALUE,
           cuMemGetAllocationGranularity(&gran, &prop, (CUmemAllocationGranularity_flags)7));

    EXPECT(CUDA_ERROR_INVALID_VALUE, cuMemCreate(&h, gran + 1, &prop, 0));
    EXPECT(CUDA_ERROR_INVALID_VALUE, cuMemCreate(&h, gran, &prop, 1));
    EXPECT(CUDA_ERROR_INVALID_VALUE, cuMemCreate(NULL, gran, &prop, 0));
    OK(cuMemCreate(&h, 4 * gran, &prop, 0));
    printf("device_create_used=%zu\n", f0 - free_mem());

    /* Host locations take no device memory. */
    prop.location.type = CU_MEM_LOCATION_TYPE_HOST;
    OK(cuMemCreate(&hh, 8 * gran, &prop, 0));
    OK(cuMemRelease(hh));
    prop.location.type = CU_MEM_LOCATION_TYPE_HOST_NUMA;
    OK(cuMemCreate(&hh, 8 * gran, &prop, 0));
    printf("after_host_create_used=%zu\n", f0 - free_mem());
    OK(cuMemRelease(hh));
    prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    prop.location.id = count;
    EXPECT(CUDA_ERROR_INVALID_DEVICE, cuMemCreate(&hh, gran, &prop, 0));
    prop.location.id = 0;
    prop.type = CU_MEM_ALLOCATION_TYPE_INVALID;
    EXPECT(CUDA_ERROR_INVALID_VALUE, cuMemCreate(&hh, gran, &prop, 0));

    /* Reserve, map, release while mapped: the memory stays until unmapped. */
    EXPECT(CUDA_ERROR_INVALID_VALUE, cuMemAddressReserve(&va, gran + 1, 0, 0, 0));
    OK(cuMemAddressReserve(&va, 8 * gran, 0, 0, 0));
    CHECK(va % gran == 0);
    EXPECT(CUDA_ERROR_INVALID_VALUE, cuMemMap(va, 4 * gran, gran, h, 0)); /* offset */
    EXPECT(CUDA_ERROR_INVALID_HANDLE, cuMemMap(va, 4 * gran, 0, h + 1, 0));
    EXPECT(CUDA_ERROR_INVALID_VALUE, cuMemMap(va, 8 * gran, 0, h, 0)); /* bigger than handle */
    EXPECT(CUDA_ERROR_INVALID_VALUE, cuMemMap(va + 16 * gran, 4 * gran, 0, h, 0));
    OK(cuMemMap(va, 4 * gran, 0, h, 0));
    EXPECT(CUDA_ERROR_INVALID_VALUE, cuMemMap(va + 2 * gran, 2 * gran, 0, h, 0)); /* overlap */
    /* Retained by address: the same handle, one more reference to release. */
    EXPECT(CUDA_ERROR_INVALID_VALUE, cuMemRetainAllocationHandle(&hh, (void *)(uintptr_t)(va + 4 * gran)));
    OK(cuMemRetainAllocationHandle(&hh, (void *)(uintptr_t)(va + gran)));
    CHECK(hh == h);
    OK(cuMemRelease(h));
    OK(cuMemRelease(h));
    EXPECT(CUDA_ERROR_INVALID_VALUE, cuMemRelease(h));
    printf("released_mapped_used=%zu\n", f0 - free_mem());
    OK(cuMemUnmap(va, 8 * gran));
    EXPECT(CUDA_ERROR_INVALID_VALUE, cuMemUnmap(va, 8 * gran));
    printf("unmapped_used=%zu\n", f0 - free_mem());
    EXPECT(CUDA_ERROR_INVALID_VALUE, cuMemAddressFree(va, 4 * gran));
    OK(cuMemAddressFree(va, 8 * gran));
    printf("ok\n");
    return 0;
}

static int arrays(void)
{
    CUDA_ARRAY_DESCRIPTOR d2;
    CUDA_ARRAY_DESCRIPTOR_v1 d1;
    CUDA_ARRAY3D_DESCRIPTOR d3;
    CUarray a2, a3, a1, small;
    CUmipmappedArray mip;
    size_t f0;

    OK(cuInit(0));
    context_on(0);
    f0 = free_mem();

    memset(&d2, 0, sizeof d2);
    d2.Width = 1024;
    d2.Height = 1024;
    d2.Format = CU_AD_FORMAT_FLOAT;
    d2.NumChannels = 4; /* 16 bytes per element: 16 MiB */
    OK(cuArrayCreate_v2(&a2, &d2));
    printf("array2d_used=%zu\n", f0 - free_mem());

    memset(&d3, 0, sizeof d3);
    d3.Width = 256;
    d3.Height = 256;
    d3.Depth = 48;
    d3.Format = CU_AD_FORMAT_UNSIGNED_INT16;
    d3.NumChannels = 2; /* 4 bytes: 12 MiB */
    OK(cuArray3DCreate_v2(&a3, &d3));
    printf("array3d_used=%zu\n", f0 - free_mem());

    d1.Width = 4096;
    d1.Height = 0; /* 1D */
    d1.Format = CU_AD_FORMAT_UNSIGNED_INT8;
    d1.NumChannels = 1;
    OK(cuArrayCreate(&a1, &d1));
    d2.Width = 1;
    d2.Height = 0;
    OK(cuArrayCreate_v2(&small, &d2));
    printf("with_small_used=%zu\n", f0 - free_mem());

    /* 1024 x 1024 x 4 bytes, 10 levels: 4 MiB + 1 MiB + 256 KiB + ... */
    d3.Width = 1024;
    d3.Height = 1024;
    d3.Depth = 0;
    d3.Format = CU_AD_FORMAT_FLOAT;
    d3.NumChannels = 1;
    EXPECT(CUDA_ERROR_INVALID_VALUE, cuMipmappedArrayCreate(&mip, &d3, 12));
    OK(cuMipmappedArrayCreate(&mip, &d3, 11));
    printf("with_mipmap_used=%zu\n", f0 - free_mem());

    d2.Format = (CUarray_format)0x77;
    EXPECT(CUDA_ERROR_INVALID_VALUE, cuArrayCreate_v2(&small, &d2));
    d2.Format = CU_AD_FORMAT_FLOAT;
    d2.NumChannels = 3;
    EXPECT(CUDA_ERROR_INVALID_VALUE, cuArrayCreate_v2(&small, &d2));
    d2.NumChannels = 1;
    d2.Width = 0;
    EXPECT(CUDA_ERROR_INVALID_VALUE, cuArrayCreate_v2(&small, &d2));
    EXPECT(CUDA_ERROR_INVALID_VALUE, cuArrayCreate_v2(NULL, &d2));

    OK(cuArrayDestroy(a2));
    OK(cuArrayDestroy(a3));
    OK(cuArrayDestroy(a1));
    OK(cuArrayDestroy(small));
    EXPECT(CUDA_ERROR_INVALID_HANDLE, cuArrayDestroy(a2));
    EXPECT(CUDA_ERROR_INVALID_HANDLE, cuArrayDestroy(NULL));
    OK(cuMipmappedArrayDestroy(mip));
    EXPECT(CUDA_ERROR_INVALID_HANDLE, cuMipmappedArrayDestroy(mip));
    CHECK(free_mem() == f0);
    printf("ok\n");
    return 0;
}

/* launch <n>: n valid launches of each kind, plus the error cases. */
static int launch(int n)
{
    static const char image[] = "not really a cubin";
    CUmodule mod;
    CUfunction fn, fn2;
    CUstream stream;
    CUlaunchConfig cfg;
    void *params[1] = {NULL};

    OK(cuInit(0));
    EXPECT(CUDA_ERROR_INVALID_CONTEXT, cuModuleLoadData(&mod, image));
    context_on(0);
    EXPECT(CUDA_ERROR_INVALID_VALUE, cuModuleLoadData(&mod, NULL));
    EXPECT(CUDA_ERROR_FILE_NOT_FOUND, cuModuleLoad(&mod, "/nonexistent/kernel.cubin"));
    OK(cuModuleLoadData(&mod, image));
    OK(cuModuleGetFunction(&fn, mod, "vector_add"));
    OK(cuModuleGetFunction(&fn2, mod, "vector_add"));
    CHECK(fn == fn2);
    EXPECT(CUDA_ERROR_INVALID_VALUE, cuModuleGetFunction(&fn2, mod, NULL));
    EXPECT(CUDA_ERROR_INVALID_HANDLE, cuModuleGetFunction(&fn2, NULL, "x"));
    OK(cuStreamCreate(&stream, 0));

    for (int i = 0; i < n; i++) {
        OK(cuLaunchKernel(fn, 4, 2, 1, 256, 1, 1, 0, NULL, params, NULL)); /* 8 blocks */
        OK(cuLaunchKernel_ptsz(fn, 1, 1, 1, 32, 32, 1, 0, stream, NULL, NULL));
        memset(&cfg, 0, sizeof cfg);
        cfg.gridDimX = cfg.gridDimY = cfg.gridDimZ = 2; /* 8 blocks */
        cfg.blockDimX = cfg.blockDimY = cfg.blockDimZ = 1;
        cfg.hStream = stream;
        OK(cuLaunchKernelEx(&cfg, fn, params, NULL));
        OK(cuLaunchCooperativeKernel(fn, 1, 1, 1, 64, 1, 1, 0, NULL, params));
        OK(cuGraphLaunch((CUgraphExec)(uintptr_t)0xabc0, stream));
    }
    EXPECT(CUDA_ERROR_INVALID_HANDLE, cuLaunchKernel(NULL, 1, 1, 1, 1, 1, 1, 0, NULL, NULL, NULL));
    EXPECT(CUDA_ERROR_INVALID_HANDLE,
           cuLaunchKernel((CUfunction)(uintptr_t)0x40, 1, 1, 1, 1, 1, 1, 0, NULL, NULL, NULL));
    EXPECT(CUDA_ERROR_INVALID_VALUE, cuLaunchKernel(fn, 0, 1, 1, 1, 1, 1, 0, NULL, NULL, NULL));
    EXPECT(CUDA_ERROR_INVALID_VALUE, cuLaunchKernel(fn, 1, 1, 1, 1, 0, 1, 0, NULL, NULL, NULL));
    EXPECT(CUDA_ERROR_INVALID_VALUE, cuLaunchKernel(fn, 1, 1, 1, 2048, 1, 1, 0, NULL, NULL, NULL));
    EXPECT(CUDA_ERROR_INVALID_VALUE, cuLaunchKernel(fn, 1, 1, 1, 64, 64, 1, 0, NULL, NULL, NULL));
    EXPECT(CUDA_ERROR_INVALID_VALUE, cuLaunchKernel(fn, 1, 70000, 1, 1, 1, 1, 0, NULL, NULL, NULL));
    EXPECT(CUDA_ERROR_INVALID_VALUE, cuLaunchKernel(fn, 1, 1, 1, 1, 1, 1, 0, NULL, params, params));
    EXPECT(CUDA_ERROR_INVALID_HANDLE,
           cuLaunchKernel(fn, 1, 1, 1, 1, 1, 1, 0, (CUstream)(uintptr_t)0x999, NULL, NULL));
    EXPECT(CUDA_ERROR_INVALID_VALUE, cuLaunchKernelEx(NULL, fn, NULL, NULL));
    cfg.gridDimX = 0;
    EXPECT(CUDA_ERROR_INVALID_VALUE, cuLaunchKernelEx(&cfg, fn, NULL, NULL));
    EXPECT(CUDA_ERROR_INVALID_VALUE, cuGraphLaunch(NULL, stream));
    OK(cuStreamSynchronize(stream));
    OK(cuStreamSynchronize_ptsz(CU_STREAM_PER_THREAD));
    OK(cuCtxSynchronize());
    OK(cuModuleUnload(mod));
    EXPECT(CUDA_ERROR_INVALID_HANDLE, cuLaunchKernel(fn, 1, 1, 1, 1, 1, 1, 0, NULL, NULL, NULL));
    EXPECT(CUDA_ERROR_INVALID_HANDLE, cuModuleUnload(mod));
    OK(cuStreamDestroy_v2(stream));
    {
        CUcontext ctx;
        OK(cuCtxGetCurrent(&ctx));
        OK(cuCtxDestroy_v2(ctx));
        EXPECT(CUDA_ERROR_INVALID_CONTEXT,
               cuLaunchKernel(fn, 1, 1, 1, 1, 1, 1, 0, NULL, NULL, NULL));
        EXPECT(CUDA_ERROR_INVALID_CONTEXT, cuGraphLaunch((CUgraphExec)(uintptr_t)0xabc0, NULL));
    }
    printf("ok\n");
    return 0;
}

/* A GPU failed before the process started: listed, but no context can be made on it. */
static int failed_at_start(void)
{
    CUcontext ctx;
    char name[128];
    int count;

    OK(cuInit(0));
    OK(cuDeviceGetCount(&count));
    printf("count=%d\n", count);
    OK(cuDeviceGetName(name, sizeof name, 0));
    EXPECT(CUDA_ERROR_UNKNOWN, cuCtxCreate_v2(&ctx, 0, 0));
    EXPECT(CUDA_ERROR_UNKNOWN, cuDevicePrimaryCtxRetain(&ctx, 0));
    if (count > 1) {
        OK(cuCtxCreate_v2(&ctx, 0, 1));
        OK(cuCtxDestroy_v2(ctx));
    }
    printf("ok\n");
    return 0;
}

/* The GPU fails while a context is in use (the parent appends "fail" and "recover"). */
static int failed_midway(void)
{
    CUcontext ctx, fresh;
    CUdeviceptr a, b;
    size_t f, t;

    OK(cuInit(0));
    ctx = context_on(0);
    OK(cuMemAlloc_v2(&a, 8 * MIB));
    wait_parent("step1");
    /* Fallen off the bus: the context is broken. */
    EXPECT(CUDA_ERROR_LAUNCH_FAILED, cuCtxSynchronize());
    EXPECT(CUDA_ERROR_LAUNCH_FAILED, cuMemAlloc_v2(&b, MIB));
    EXPECT(CUDA_ERROR_LAUNCH_FAILED, cuMemGetInfo_v2(&f, &t));
    EXPECT(CUDA_ERROR_UNKNOWN, cuCtxCreate_v2(&fresh, 0, 0));
    wait_parent("step2");
    /* Recovered: the old context stays broken (sticky), a new one works. */
    EXPECT(CUDA_ERROR_LAUNCH_FAILED, cuCtxSynchronize());
    OK(cuCtxDestroy_v2(ctx));
    fresh = context_on(0);
    OK(cuMemAlloc_v2(&b, MIB));
    OK(cuCtxSynchronize());
    (void)fresh;
    printf("ok\n");
    return 0;
}

static int visible(void)
{
    CUresult r = cuInit(0);
    int count = 0;

    printf("init=%d\n", (int)r);
    if (r != CUDA_SUCCESS)
        return 0;
    OK(cuDeviceGetCount(&count));
    printf("count=%d\n", count);
    for (int i = 0; i < count; i++)
        print_device(i);
    return 0;
}

/* The driver does not survive fork: the child gets NOT_INITIALIZED. */
static int forked(void)
{
    int count, status;
    pid_t pid;

    OK(cuInit(0));
    pid = fork();
    if (pid == 0) {
        if (cuDeviceGetCount(&count) != CUDA_ERROR_NOT_INITIALIZED ||
            cuInit(0) != CUDA_ERROR_NOT_INITIALIZED)
            _exit(3);
        _exit(0);
    }
    CHECK(pid > 0 && waitpid(pid, &status, 0) == pid);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    OK(cuDeviceGetCount(&count));
    printf("ok\n");
    return 0;
}

/* Graph memory: nodes take no memory, launches take it from the device's graph pool, which
 * keeps it until cuDeviceGraphMemTrim; stream capture turns async alloc/free into nodes. */
static int graphs(void)
{
    CUgraph g, cg;
    CUgraphNode a, fr, b;
    CUgraphExec e, ce;
    CUstream s;
    CUstreamCaptureStatus st;
    CUdeviceptr p, q, live;
    CUDA_MEM_ALLOC_NODE_PARAMS np;
    size_t f0;

    OK(cuInit(0));
    context_on(0);
    OK(cuStreamCreate(&s, 0));
    f0 = free_mem();
    memset(&np, 0, sizeof np);
    np.poolProps.allocType = CU_MEM_ALLOCATION_TYPE_PINNED;
    np.poolProps.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    np.poolProps.location.id = 0;
    np.bytesize = 3 * MIB;
    OK(cuGraphCreate(&g, 0));
    EXPECT(CUDA_ERROR_INVALID_VALUE, cuGraphCreate(&g, 1));
    OK(cuGraphAddMemAllocNode(&a, g, NULL, 0, &np));
    p = np.dptr;
    CHECK(p != 0 && p % (2 * MIB) == 0);
    np.bytesize = 0;
    EXPECT(CUDA_ERROR_INVALID_VALUE, cuGraphAddMemAllocNode(&b, g, NULL, 0, &np));
    np.bytesize = 8 * MIB;
    OK(cuGraphAddMemAllocNode(&b, g, &a, 1, &np)); /* not freed in the graph */
    q = np.dptr;
    OK(cuGraphAddMemFreeNode(&fr, g, &b, 1, p));
    EXPECT(CUDA_ERROR_INVALID_VALUE, cuGraphAddMemFreeNode(&fr, g, NULL, 0, p)); /* twice */
    printf("after_nodes=%zu\n", f0 - free_mem());
    OK(cuGraphInstantiateWithFlags(&e, g, 0));
    OK(cuGraphLaunch(e, s));
    printf("after_launch=%zu\n", f0 - free_mem());
    EXPECT(CUDA_ERROR_INVALID_VALUE, cuGraphLaunch(e, s)); /* q is still live */
    OK(cuMemFree_v2(q));
    printf("after_free=%zu\n", f0 - free_mem());
    OK(cuGraphLaunch(e, s)); /* reuses the pool */
    printf("after_relaunch=%zu\n", f0 - free_mem());
    OK(cuMemFreeAsync(q, s));
    OK(cuDeviceGraphMemTrim(0));
    printf("after_trim=%zu\n", f0 - free_mem());
    OK(cuGraphExecDestroy(e));
    OK(cuGraphDestroy(g));
    EXPECT(CUDA_ERROR_INVALID_VALUE, cuGraphDestroy(g));

    /* Stream capture */
    EXPECT(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,
           cuStreamBeginCapture_v2(NULL, CU_STREAM_CAPTURE_MODE_GLOBAL));
    EXPECT(CUDA_ERROR_ILLEGAL_STATE, cuStreamEndCapture(s, &cg));
    OK(cuStreamBeginCapture_v2(s, CU_STREAM_CAPTURE_MODE_GLOBAL));
    EXPECT(CUDA_ERROR_ILLEGAL_STATE, cuStreamBeginCapture_v2(s, CU_STREAM_CAPTURE_MODE_GLOBAL));
    OK(cuStreamIsCapturing(s, &st));
    CHECK(st == CU_STREAM_CAPTURE_STATUS_ACTIVE);
    OK(cuMemAllocAsync(&live, 4 * MIB, s));
    OK(cuMemAllocAsync(&p, 4 * MIB, s));
    OK(cuMemFreeAsync(p, s));
    printf("after_capture=%zu\n", f0 - free_mem());
    OK(cuStreamEndCapture(s, &cg));
    OK(cuStreamIsCapturing(s, &st));
    CHECK(st == CU_STREAM_CAPTURE_STATUS_NONE);
    OK(cuGraphInstantiateWithFlags(&ce, cg, 0));
    OK(cuGraphLaunch(ce, s));
    printf("after_capture_launch=%zu\n", f0 - free_mem());
    OK(cuMemFree_v2(live));
    OK(cuDeviceGraphMemTrim(0));
    printf("after_capture_trim=%zu\n", f0 - free_mem());
    OK(cuGraphExecDestroy(ce));
    OK(cuGraphDestroy(cg));

    /* A graph frees another graph's allocation: live from the first's launch until the
     * second's; destroying the first changes nothing. */
    {
        CUgraph g1, g2;
        CUgraphNode n1, n2;
        CUgraphExec e1, e2;
        OK(cuGraphCreate(&g1, 0));
        np.bytesize = 6 * MIB;
        OK(cuGraphAddMemAllocNode(&n1, g1, NULL, 0, &np));
        p = np.dptr;
        OK(cuGraphCreate(&g2, 0));
        OK(cuGraphAddMemFreeNode(&n2, g2, NULL, 0, p));
        EXPECT(CUDA_ERROR_INVALID_VALUE, cuGraphAddMemFreeNode(&n2, g2, NULL, 0, p)); /* twice */
        EXPECT(CUDA_ERROR_INVALID_VALUE, cuGraphAddMemFreeNode(&n2, g2, NULL, 0, p + 64 * MIB));
        OK(cuGraphInstantiateWithFlags(&e1, g1, 0));
        OK(cuGraphInstantiateWithFlags(&e2, g2, 0));
        EXPECT(CUDA_ERROR_INVALID_VALUE, cuGraphLaunch(e2, s)); /* not live yet */
        OK(cuGraphLaunch(e1, s));
        OK(cuGraphExecDestroy(e1));
        OK(cuGraphDestroy(g1));
        OK(cuDeviceGraphMemTrim(0));
        printf("cross_live=%zu\n", f0 - free_mem());
        OK(cuGraphLaunch(e2, s));
        OK(cuDeviceGraphMemTrim(0));
        printf("cross_freed=%zu\n", f0 - free_mem());
        OK(cuGraphExecDestroy(e2));
        OK(cuGraphDestroy(g2));
    }
    printf("ok\n");
    return 0;
}

/*
 * Copies keep what was written: host -> device -> device -> host round trips through every
 * variant (legacy 32-bit, _v2, _v2_ptds, async _v2 and _v2_ptsz, managed memory seen from the
 * host), offsets inside an allocation, and the driver's refusals.
 */
static int copies(void)
{
    enum { N = 4 * 1024 * 1024 };
    unsigned char *src = malloc(N), *dst = malloc(N);
    CUdeviceptr a = 0, b = 0, m = 0;
    CUdeviceptr_v1 a32 = 0;
    CUstream s = NULL;
    CUcontext ctx, popped;
    size_t i;

    CHECK(src != NULL && dst != NULL);
    for (i = 0; i < N; i++)
        src[i] = (unsigned char)(i * 7 + 3);
    OK(cuInit(0));
    ctx = context_on(0);
    OK(cuMemAlloc_v2(&a, N));
    OK(cuMemAlloc_v2(&b, N));
    OK(cuMemcpyHtoD_v2(a, src, N));
    OK(cuMemcpyDtoD_v2(b, a, N));
    memset(dst, 0, N);
    OK(cuMemcpyDtoH_v2(dst, b, N));
    CHECK(memcmp(src, dst, N) == 0);
    /* Part of an allocation, at an offset; the rest is untouched. */
    OK(cuMemcpyHtoD_v2_ptds(a + 100, src + 5000, 1000));
    OK(cuMemcpyDtoH_v2_ptds(dst, a + 100, 1000));
    CHECK(memcmp(dst, src + 5000, 1000) == 0);
    OK(cuMemcpyDtoH_v2(dst, a, 100));
    CHECK(memcmp(dst, src, 100) == 0);
    OK(cuMemcpyDtoD_v2_ptds(b, a + 100, 1000));
    OK(cuMemcpyDtoH_v2(dst, b, 1000));
    CHECK(memcmp(dst, src + 5000, 1000) == 0);
    /* Asynchronous copies on a created stream and the per-thread stream. */
    OK(cuStreamCreate(&s, 0));
    OK(cuMemcpyHtoDAsync_v2(b, src + 1, 4096, s));
    OK(cuMemcpyDtoHAsync_v2_ptsz(dst, b, 4096, CU_STREAM_PER_THREAD));
    OK(cuStreamSynchronize(s));
    CHECK(memcmp(dst, src + 1, 4096) == 0);
    EXPECT(CUDA_ERROR_INVALID_HANDLE, cuMemcpyHtoDAsync_v2(b, src, 16, (CUstream)&s));
    /* The legacy 32-bit entry points. */
    OK(cuMemAlloc(&a32, 8192));
    OK(cuMemcpyHtoD(a32, src + 9, 8192));
    OK(cuMemcpyDtoH(dst, a32, 8192));
    CHECK(memcmp(dst, src + 9, 8192) == 0);
    /* Managed memory: what a copy writes, the host reads at that address. */
    OK(cuMemAllocManaged(&m, 4096, 1));
    OK(cuMemcpyHtoD_v2(m, src + 77, 4096));
    CHECK(memcmp((void *)(uintptr_t)m, src + 77, 4096) == 0);
    /* Refusals: past the end of the allocation, an unknown address, no host buffer. */
    EXPECT(CUDA_ERROR_INVALID_VALUE, cuMemcpyHtoD_v2(a + N - 10, src, 11));
    EXPECT(CUDA_ERROR_INVALID_VALUE, cuMemcpyDtoH_v2(dst, b + N, 1));
    EXPECT(CUDA_ERROR_INVALID_VALUE, cuMemcpyDtoH_v2(dst, 0x1234, 1));
    EXPECT(CUDA_ERROR_INVALID_VALUE, cuMemcpyHtoD_v2(a, NULL, 1));
    OK(cuMemcpyHtoD_v2(a, src, 0));
    /* A freed allocation keeps nothing. */
    OK(cuMemFree_v2(b));
    EXPECT(CUDA_ERROR_INVALID_VALUE, cuMemcpyDtoH_v2(dst, b, 1));
    /* Copies need a current context. */
    OK(cuCtxPopCurrent_v2(&popped));
    CHECK(popped == ctx);
    EXPECT(CUDA_ERROR_INVALID_CONTEXT, cuMemcpyDtoH_v2(dst, a, 1));
    OK(cuCtxPushCurrent_v2(ctx));
    OK(cuCtxDestroy_v2(ctx));
    free(src);
    free(dst);
    printf("ok\n");
    return 0;
}

/*
 * cuMemFree finds memory by its address, as the driver does with unified addressing: a thread
 * without a current context frees it (numba's cuda.close() does this).
 */
static int free_without_context(void)
{
    CUdeviceptr a = 0, b = 0;
    CUcontext ctx, popped;
    size_t before, full;

    OK(cuInit(0));
    ctx = context_on(0);
    before = free_mem();
    OK(cuMemAlloc_v2(&a, 64 * MIB));
    OK(cuMemAlloc_v2(&b, 64 * MIB));
    full = free_mem();
    OK(cuCtxPopCurrent_v2(&popped));
    CHECK(popped == ctx);
    OK(cuMemFree_v2(a));
    OK(cuMemFree(0)); /* 0 is a no-op, with or without a context */
    EXPECT(CUDA_ERROR_INVALID_VALUE, cuMemFree_v2(a)); /* already freed */
    EXPECT(CUDA_ERROR_INVALID_VALUE, cuMemFree_v2(0x1234));
    OK(cuCtxPushCurrent_v2(ctx));
    printf("freed=%zu\n", free_mem() - full);
    OK(cuMemFree_v2(b));
    CHECK(free_mem() == before);
    /* Memory goes with its context: after cuCtxDestroy its address is unknown. */
    OK(cuMemAlloc_v2(&a, 64 * MIB));
    OK(cuCtxDestroy_v2(ctx));
    EXPECT(CUDA_ERROR_INVALID_VALUE, cuMemFree_v2(a));
    printf("ok\n");
    return 0;
}

static void print_handle(const CUipcMemHandle *h)
{
    size_t i;

    printf("handle=");
    for (i = 0; i < sizeof h->reserved; i++)
        printf("%02x", (unsigned char)h->reserved[i]);
    printf("\n");
}

static CUipcMemHandle parse_handle(const char *hex)
{
    CUipcMemHandle h;
    size_t i;

    memset(&h, 0, sizeof h);
    CHECK(strlen(hex) == 2 * sizeof h.reserved);
    for (i = 0; i < sizeof h.reserved; i++) {
        unsigned int byte;
        CHECK(sscanf(hex + 2 * i, "%2x", &byte) == 1);
        h.reserved[i] = (char)byte;
    }
    return h;
}

/* Exports a 64 MiB cuMemAlloc allocation, prints its handle and holds it until told. */
static int ipc_export(void)
{
    CUipcMemHandle h;
    CUdeviceptr a = 0, managed = 0;
    CUdeviceptr opened;

    OK(cuInit(0));
    (void)context_on(0);
    OK(cuMemAlloc_v2(&a, 64 * MIB));
    OK(cuIpcGetMemHandle(&h, a));
    /* Only the base of cuMemAlloc memory can be exported. */
    EXPECT(CUDA_ERROR_INVALID_VALUE, cuIpcGetMemHandle(&h, a + 512));
    OK(cuMemAllocManaged(&managed, 4096, 1));
    EXPECT(CUDA_ERROR_INVALID_VALUE, cuIpcGetMemHandle(&h, managed));
    EXPECT(CUDA_ERROR_INVALID_VALUE, cuIpcGetMemHandle(NULL, a));
    OK(cuIpcGetMemHandle(&h, a));
    /* A process cannot open its own handle. */
    EXPECT(CUDA_ERROR_INVALID_CONTEXT, cuIpcOpenMemHandle_v2(&opened, h, 1));
    print_handle(&h);
    wait_parent("exported");
    printf("ok\n");
    return 0;
}

/* Opens a handle from another process: no memory charged, one address per context, refcounted. */
static int ipc_import(const char *hex, int exporter_alive)
{
    CUipcMemHandle h = parse_handle(hex), garbage;
    CUdeviceptr p = 0, q = 0;
    size_t before;

    OK(cuInit(0));
    (void)context_on(0);
    before = free_mem();
    if (!exporter_alive) {
        EXPECT(CUDA_ERROR_INVALID_HANDLE, cuIpcOpenMemHandle_v2(&p, h, 1));
        printf("ok\n");
        return 0;
    }
    EXPECT(CUDA_ERROR_INVALID_VALUE, cuIpcOpenMemHandle_v2(&p, h, 2));
    memset(&garbage, 0x5a, sizeof garbage);
    EXPECT(CUDA_ERROR_INVALID_HANDLE, cuIpcOpenMemHandle_v2(&p, garbage, 1));
    OK(cuIpcOpenMemHandle_v2(&p, h, 1));
    OK(cuIpcOpenMemHandle(&q, h, 1));
    CHECK(p == q && p != 0);
    CHECK(free_mem() == before); /* the exporter's memory, already counted on the device */
    EXPECT(CUDA_ERROR_INVALID_VALUE, cuMemFree_v2(p)); /* closed with cuIpcCloseMemHandle */
    OK(cuIpcCloseMemHandle(p));
    OK(cuIpcCloseMemHandle(p));
    EXPECT(CUDA_ERROR_INVALID_VALUE, cuIpcCloseMemHandle(p));
    printf("ok\n");
    return 0;
}

/* cuMemSetAccess on mapped VMM memory, and its refusals. */
static int set_access(void)
{
    CUmemAllocationProp prop;
    CUmemAccessDesc desc;
    CUmemGenericAllocationHandle h;
    CUdeviceptr va;

    OK(cuInit(0));
    (void)context_on(0);
    memset(&prop, 0, sizeof prop);
    prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
    prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    prop.location.id = 0;
    OK(cuMemCreate(&h, 4 * MIB, &prop, 0));
    OK(cuMemAddressReserve(&va, 8 * MIB, 0, 0, 0));
    OK(cuMemMap(va, 4 * MIB, 0, h, 0));
    desc.location = prop.location;
    desc.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
    OK(cuMemSetAccess(va, 4 * MIB, &desc, 1));
    OK(cuMemSetAccess(va + 2 * MIB, 2 * MIB, &desc, 1));
    /* The second half of the reservation is not mapped. */
    EXPECT(CUDA_ERROR_INVALID_VALUE, cuMemSetAccess(va, 8 * MIB, &desc, 1));
    EXPECT(CUDA_ERROR_INVALID_VALUE, cuMemSetAccess(va, 4 * MIB, &desc, 0));
    EXPECT(CUDA_ERROR_INVALID_VALUE, cuMemSetAccess(va, 4 * MIB, NULL, 1));
    desc.location.id = 7;
    EXPECT(CUDA_ERROR_INVALID_DEVICE, cuMemSetAccess(va, 4 * MIB, &desc, 1));
    desc.location.id = 0;
    desc.flags = (CUmemAccess_flags)2;
    EXPECT(CUDA_ERROR_INVALID_VALUE, cuMemSetAccess(va, 4 * MIB, &desc, 1));
    OK(cuMemUnmap(va, 4 * MIB));
    EXPECT(CUDA_ERROR_INVALID_VALUE, cuMemSetAccess(va, 4 * MIB, &desc, 1));
    OK(cuMemRelease(h));
    OK(cuMemAddressFree(va, 8 * MIB));
    printf("ok\n");
    return 0;
}

int main(int argc, char **argv)
{
    const char *what = argc > 1 ? argv[1] : "";

    setvbuf(stdout, NULL, _IOLBF, 0);
    if (strcmp(what, "before-init") == 0)
        return before_init();
    if (strcmp(what, "basics") == 0)
        return basics();
    if (strcmp(what, "alloc") == 0)
        return alloc();
    if (strcmp(what, "oom") == 0)
        return oom();
    if (strcmp(what, "hold") == 0 && argc == 4)
        return hold(atoi(argv[2]), strtoull(argv[3], NULL, 10));
    if (strcmp(what, "meminfo") == 0 && argc == 3)
        return meminfo(atoi(argv[2]));
    if (strcmp(what, "vmm") == 0)
        return vmm();
    if (strcmp(what, "arrays") == 0)
        return arrays();
    if (strcmp(what, "graphs") == 0)
        return graphs();
    if (strcmp(what, "launch") == 0 && argc == 3)
        return launch(atoi(argv[2]));
    if (strcmp(what, "failed-at-start") == 0)
        return failed_at_start();
    if (strcmp(what, "failed-midway") == 0)
        return failed_midway();
    if (strcmp(what, "visible") == 0)
        return visible();
    if (strcmp(what, "fork") == 0)
        return forked();
    if (strcmp(what, "copies") == 0)
        return copies();
    if (strcmp(what, "free-without-context") == 0)
        return free_without_context();
    if (strcmp(what, "ipc-export") == 0)
        return ipc_export();
    if (strcmp(what, "ipc-import") == 0 && argc == 4)
        return ipc_import(argv[2], strcmp(argv[3], "alive") == 0);
    if (strcmp(what, "set-access") == 0)
        return set_access();
    fprintf(stderr, "usage: driver-check <scenario> [args]\n");
    return 2;
}
