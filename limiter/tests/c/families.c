/* Every allocation family, driven under LD_PRELOAD=libvgpu.so with a cap (linked -lcuda against
 * the gpu-sim fake driver). argv[1] names the family; the program allocates same-sized objects of
 * that family until a call fails, frees them all, and prints one line:
 *   <family> count K rc R before B held H after A freed F
 * K objects were made, R is the failing call's result, B/H/A are the container's used bytes
 * (cuMemGetInfo: total - free, virtualised) before, while holding them and after freeing, F is
 * how many frees returned 0. Families:
 *   array array_v1 array3d array3d_v1 mipmap pitch pitch_v1 managed async async_ptsz pool
 *   pool_ptsz vmm_device vmm_host vmm_mapped vmm_retained context primary graph_node graph_capture
 *   graph_escape graph_cross
 * Each object is 64 MiB of device memory (80 MiB for mipmap: two levels; 300 MiB-ish contexts;
 * vmm_host: 512 MiB of host memory, up to 4). */
#define _GNU_SOURCE
#include "cuda_api.h"

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MIB ((size_t)1 << 20)
#define OBJ (64 * MIB)
#define MAX 1024

static CUcontext primary;
static CUstream stream;

static size_t used(void)
{
    size_t free_b = 0, total_b = 0;
    if (cuMemGetInfo_v2(&free_b, &total_b) != CUDA_SUCCESS)
        return (size_t)-1;
    return total_b - free_b;
}

static void report(const char *family, int k, int rc, size_t before, size_t held, int freed)
{
    printf("%s count %d rc %d before %zu held %zu after %zu freed %d\n", family, k, rc, before,
           held, used(), freed);
}

static CUmemAllocationProp prop_at(CUmemLocationType type, int id)
{
    CUmemAllocationProp p;
    memset(&p, 0, sizeof p);
    p.type = CU_MEM_ALLOCATION_TYPE_PINNED;
    p.location.type = type;
    p.location.id = id;
    return p;
}

static int linear_family(const char *f)
{
    CUdeviceptr p[MAX];
    CUdeviceptr_v1 p1[MAX];
    CUmemoryPool pool = NULL;
    size_t before = used(), pitch = 0;
    unsigned int pitch1 = 0;
    int k = 0, rc = 0, freed = 0;
    bool v1 = strcmp(f, "pitch_v1") == 0;

    if (strncmp(f, "pool", 4) == 0) {
        CUmemPoolProps props;
        memset(&props, 0, sizeof props);
        props.allocType = CU_MEM_ALLOCATION_TYPE_PINNED;
        props.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
        props.location.id = 0;
        if (cuMemPoolCreate(&pool, &props) != CUDA_SUCCESS)
            return 1;
    }
    for (; k < MAX; k++) {
        if (strcmp(f, "pitch") == 0)
            rc = cuMemAllocPitch_v2(&p[k], &pitch, 1000, OBJ / 1024, 4);
        else if (v1)
            rc = cuMemAllocPitch(&p1[k], &pitch1, 1000, OBJ / 1024, 4);
        else if (strcmp(f, "managed") == 0)
            rc = cuMemAllocManaged(&p[k], OBJ, CU_MEM_ATTACH_GLOBAL);
        else if (strcmp(f, "async") == 0)
            rc = cuMemAllocAsync(&p[k], OBJ, stream);
        else if (strcmp(f, "async_ptsz") == 0)
            rc = cuMemAllocAsync_ptsz(&p[k], OBJ, CU_STREAM_PER_THREAD);
        else if (strcmp(f, "pool") == 0)
            rc = cuMemAllocFromPoolAsync(&p[k], OBJ, pool, stream);
        else if (strcmp(f, "pool_ptsz") == 0)
            rc = cuMemAllocFromPoolAsync_ptsz(&p[k], OBJ, pool, CU_STREAM_PER_THREAD);
        else
            return 2;
        if (rc != CUDA_SUCCESS)
            break;
    }
    size_t held = used();
    for (int i = 0; i < k; i++) {
        if (strcmp(f, "async") == 0 || strcmp(f, "pool") == 0)
            freed += cuMemFreeAsync(p[i], stream) == CUDA_SUCCESS;
        else if (strcmp(f, "async_ptsz") == 0 || strcmp(f, "pool_ptsz") == 0)
            freed += cuMemFreeAsync_ptsz(p[i], CU_STREAM_PER_THREAD) == CUDA_SUCCESS;
        else if (v1)
            freed += cuMemFree(p1[i]) == CUDA_SUCCESS;
        else
            freed += cuMemFree_v2(p[i]) == CUDA_SUCCESS;
    }
    if (pool != NULL)
        cuMemPoolDestroy(pool);
    report(f, k, rc, before, held, freed);
    return 0;
}

static int array_family(const char *f)
{
    CUarray a[MAX];
    CUmipmappedArray m[MAX];
    size_t before = used();
    int k = 0, rc = 0, freed = 0;
    bool mip = strcmp(f, "mipmap") == 0;

    for (; k < MAX; k++) {
        if (strcmp(f, "array") == 0) {
            CUDA_ARRAY_DESCRIPTOR d = {4096, 4096, CU_AD_FORMAT_FLOAT, 1};
            rc = cuArrayCreate_v2(&a[k], &d);
        } else if (strcmp(f, "array_v1") == 0) {
            CUDA_ARRAY_DESCRIPTOR_v1 d = {4096, 4096, CU_AD_FORMAT_FLOAT, 1};
            rc = cuArrayCreate(&a[k], &d);
        } else if (strcmp(f, "array3d") == 0) {
            CUDA_ARRAY3D_DESCRIPTOR d = {1024, 1024, 16, CU_AD_FORMAT_UNSIGNED_INT8, 4, 0};
            rc = cuArray3DCreate_v2(&a[k], &d);
        } else if (strcmp(f, "array3d_v1") == 0) {
            CUDA_ARRAY3D_DESCRIPTOR_v1 d = {1024, 1024, 16, CU_AD_FORMAT_UNSIGNED_INT8, 4, 0};
            rc = cuArray3DCreate(&a[k], &d);
        } else if (mip) {
            /* 4096² floats + 2048² floats = 80 MiB */
            CUDA_ARRAY3D_DESCRIPTOR d = {4096, 4096, 0, CU_AD_FORMAT_FLOAT, 1, 0};
            rc = cuMipmappedArrayCreate(&m[k], &d, 2);
        } else {
            return 2;
        }
        if (rc != CUDA_SUCCESS)
            break;
    }
    size_t held = used();
    for (int i = 0; i < k; i++)
        freed += (mip ? cuMipmappedArrayDestroy(m[i]) : cuArrayDestroy(a[i])) == CUDA_SUCCESS;
    report(f, k, rc, before, held, freed);
    return 0;
}

static int vmm_family(const char *f)
{
    CUmemGenericAllocationHandle h[MAX];
    bool host = strcmp(f, "vmm_host") == 0;
    CUmemAllocationProp p = host ? prop_at(CU_MEM_LOCATION_TYPE_HOST, 0)
                                 : prop_at(CU_MEM_LOCATION_TYPE_DEVICE, 0);
    size_t size = host ? 512 * MIB : OBJ, before = used();
    int k = 0, rc = 0, freed = 0, max = host ? 4 : MAX;

    for (; k < max; k++) {
        rc = cuMemCreate(&h[k], size, &p, 0);
        if (rc != CUDA_SUCCESS)
            break;
    }
    size_t held = used();
    for (int i = 0; i < k; i++)
        freed += cuMemRelease(h[i]) == CUDA_SUCCESS;
    report(f, k, rc, before, held, freed);
    return 0;
}

/* VMM memory mapped into reserved address space, which the driver keeps until every handle
 * reference is released and no mapping uses it:
 *   vmm_mapped: create, reserve, map, release at once (NVIDIA's samples and programming guide);
 *     held is measured with every handle released and the mappings in place, freed counts the
 *     unmaps that returned 0;
 *   vmm_retained: create, reserve, map, keep the handle; then NCCL's free: retain the handle by
 *     address, release that reference, unmap; held is measured there (the creation's reference
 *     still holds the memory), freed counts the final releases that returned 0. */
static int vmm_mapped_family(const char *f)
{
    static CUmemGenericAllocationHandle h[MAX];
    static CUdeviceptr va[MAX];
    CUmemAllocationProp p = prop_at(CU_MEM_LOCATION_TYPE_DEVICE, 0);
    bool retained = strcmp(f, "vmm_retained") == 0;
    size_t before = used(), held;
    int k = 0, rc = 0, freed = 0;

    for (; k < MAX; k++) {
        rc = cuMemCreate(&h[k], OBJ, &p, 0);
        if (rc != CUDA_SUCCESS)
            break;
        if (cuMemAddressReserve(&va[k], OBJ, 0, 0, 0) != CUDA_SUCCESS ||
            cuMemMap(va[k], OBJ, 0, h[k], 0) != CUDA_SUCCESS)
            return 1;
        if (!retained && cuMemRelease(h[k]) != CUDA_SUCCESS)
            return 1;
    }
    if (retained) {
        for (int i = 0; i < k; i++) {
            CUmemGenericAllocationHandle again = 0;
            if (cuMemRetainAllocationHandle(&again, (void *)(uintptr_t)va[i]) != CUDA_SUCCESS ||
                again != h[i] || cuMemRelease(again) != CUDA_SUCCESS ||
                cuMemUnmap(va[i], OBJ) != CUDA_SUCCESS)
                return 1;
        }
        held = used();
        for (int i = 0; i < k; i++) {
            freed += cuMemRelease(h[i]) == CUDA_SUCCESS;
            cuMemAddressFree(va[i], OBJ);
        }
    } else {
        held = used();
        for (int i = 0; i < k; i++) {
            freed += cuMemUnmap(va[i], OBJ) == CUDA_SUCCESS;
            cuMemAddressFree(va[i], OBJ);
        }
    }
    report(f, k, rc, before, held, freed);
    return 0;
}

static int context_family(const char *f)
{
    CUcontext c[64];
    size_t before = used(), held;
    int k = 0, rc = 0, freed = 0;

    for (; k < 64; k++) {
        rc = cuCtxCreate_v2(&c[k], 0, 0);
        if (rc != CUDA_SUCCESS)
            break;
        cuCtxPopCurrent_v2(NULL); /* keep the primary context current */
    }
    held = used();
    for (int i = 0; i < k; i++)
        freed += cuCtxDestroy_v2(c[i]) == CUDA_SUCCESS;
    report(f, k, rc, before, held, freed);
    return 0;
}

/* The primary context's reference count: with a created context current (for cuMemGetInfo),
 * one more retain changes nothing, and releasing both references (ours and main's) gives the
 * primary context's charge back. count = retains, freed = releases that returned 0. */
static int primary_family(const char *f)
{
    CUcontext c, p;
    size_t before, held;
    int freed = 0, rc;

    if (cuCtxCreate_v2(&c, 0, 0) != CUDA_SUCCESS)
        return 1;
    before = used();
    rc = cuDevicePrimaryCtxRetain(&p, 0);
    held = used();
    freed += cuDevicePrimaryCtxRelease_v2(0) == CUDA_SUCCESS;
    freed += cuDevicePrimaryCtxRelease_v2(0) == CUDA_SUCCESS;
    report(f, rc == CUDA_SUCCESS, rc, before, held, freed);
    return 0;
}

static CUDA_MEM_ALLOC_NODE_PARAMS node_params(size_t bytes)
{
    CUDA_MEM_ALLOC_NODE_PARAMS np;
    memset(&np, 0, sizeof np);
    np.poolProps.allocType = CU_MEM_ALLOCATION_TYPE_PINNED;
    np.poolProps.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    np.poolProps.location.id = 0;
    np.bytesize = bytes;
    return np;
}

/* Allocation nodes added to a graph until refused, each freed by a free node of the same graph;
 * launched once; the graph's destruction gives the memory back. */
static int graph_node_family(const char *f)
{
    CUgraph g;
    CUgraphNode n[MAX], fn;
    CUdeviceptr p[MAX];
    CUgraphExec e;
    size_t before = used(), held;
    int k = 0, rc = 0, freed = 0;

    if (cuGraphCreate(&g, 0) != CUDA_SUCCESS)
        return 1;
    for (; k < MAX; k++) {
        CUDA_MEM_ALLOC_NODE_PARAMS np = node_params(OBJ);
        rc = cuGraphAddMemAllocNode(&n[k], g, NULL, 0, &np);
        if (rc != CUDA_SUCCESS)
            break;
        p[k] = np.dptr;
    }
    for (int i = 0; i < k; i++)
        freed += cuGraphAddMemFreeNode(&fn, g, &n[i], 1, p[i]) == CUDA_SUCCESS;
    if (cuGraphInstantiateWithFlags(&e, g, 0) != CUDA_SUCCESS || cuGraphLaunch(e, stream) != 0 ||
        cuGraphExecDestroy(e) != CUDA_SUCCESS)
        return 3;
    held = used(); /* freed inside the graph: still charged while the graph exists */
    if (cuGraphDestroy(g) != CUDA_SUCCESS)
        return 4;
    report(f, k, rc, before, held, freed);
    return 0;
}

/* Stream capture: cuMemAllocAsync on the capturing stream until refused (allocation nodes),
 * graph_capture: all freed on the stream inside the capture, the graph destroyed after a launch;
 * graph_escape: not freed inside, freed with cuMemFree after the launch. */
static int graph_capture_family(const char *f)
{
    CUdeviceptr p[MAX];
    CUgraph g;
    CUgraphExec e;
    CUstreamCaptureStatus st = CU_STREAM_CAPTURE_STATUS_NONE;
    bool escape = strcmp(f, "graph_escape") == 0;
    size_t before = used(), held;
    int k = 0, rc = 0, freed = 0;

    if (cuStreamBeginCapture_v2(stream, CU_STREAM_CAPTURE_MODE_GLOBAL) != CUDA_SUCCESS ||
        cuStreamIsCapturing(stream, &st) != CUDA_SUCCESS || st != CU_STREAM_CAPTURE_STATUS_ACTIVE)
        return 1;
    for (; k < MAX; k++) {
        rc = cuMemAllocAsync(&p[k], OBJ, stream);
        if (rc != CUDA_SUCCESS)
            break;
    }
    if (!escape) {
        for (int i = 0; i < k; i++)
            freed += cuMemFreeAsync(p[i], stream) == CUDA_SUCCESS;
    }
    if (cuStreamEndCapture(stream, &g) != CUDA_SUCCESS ||
        cuGraphInstantiateWithFlags(&e, g, 0) != CUDA_SUCCESS || cuGraphLaunch(e, stream) != 0)
        return 3;
    held = used();
    if (escape) {
        for (int i = 0; i < k; i++)
            freed += cuMemFree_v2(p[i]) == CUDA_SUCCESS;
    }
    if (cuGraphExecDestroy(e) != CUDA_SUCCESS || cuGraphDestroy(g) != CUDA_SUCCESS)
        return 4;
    report(f, k, rc, before, held, freed);
    return 0;
}

/* graph_cross: one graph per object, each with an allocation node, launched (the memory is live),
 * then freed by a free node of a second graph that is never launched, and both graphs
 * destroyed: the memory lives on until freed with cuMemFree, and stays charged meanwhile. */
static int graph_cross_family(const char *f)
{
    static CUdeviceptr p[MAX];
    size_t before = used(), held;
    int k = 0, rc = 0, freed = 0;

    for (; k < MAX; k++) {
        CUgraph g, other;
        CUgraphNode n, fn;
        CUgraphExec e;
        CUDA_MEM_ALLOC_NODE_PARAMS np = node_params(OBJ);
        if (cuGraphCreate(&g, 0) != CUDA_SUCCESS)
            return 1;
        rc = cuGraphAddMemAllocNode(&n, g, NULL, 0, &np);
        if (rc != CUDA_SUCCESS) {
            cuGraphDestroy(g);
            break;
        }
        p[k] = np.dptr;
        if (cuGraphInstantiateWithFlags(&e, g, 0) != CUDA_SUCCESS ||
            cuGraphLaunch(e, stream) != CUDA_SUCCESS || cuGraphCreate(&other, 0) != CUDA_SUCCESS ||
            cuGraphAddMemFreeNode(&fn, other, NULL, 0, p[k]) != CUDA_SUCCESS ||
            cuGraphExecDestroy(e) != CUDA_SUCCESS || cuGraphDestroy(g) != CUDA_SUCCESS ||
            cuGraphDestroy(other) != CUDA_SUCCESS)
            return 3;
    }
    held = used();
    for (int i = 0; i < k; i++)
        freed += cuMemFree_v2(p[i]) == CUDA_SUCCESS;
    report(f, k, rc, before, held, freed);
    return 0;
}

int main(int argc, char **argv)
{
    const char *f = argc > 1 ? argv[1] : "";

    setvbuf(stdout, NULL, _IOLBF, 0);
    if (cuInit(0) != 0 || cuDevicePrimaryCtxRetain(&primary, 0) != 0 ||
        cuCtxSetCurrent(primary) != 0 || cuStreamCreate(&stream, CU_STREAM_NON_BLOCKING) != 0) {
        printf("no context\n");
        return 1;
    }
    if (strncmp(f, "array", 5) == 0 || strcmp(f, "mipmap") == 0)
        return array_family(f);
    if (strcmp(f, "vmm_mapped") == 0 || strcmp(f, "vmm_retained") == 0)
        return vmm_mapped_family(f);
    if (strncmp(f, "vmm_", 4) == 0)
        return vmm_family(f);
    if (strcmp(f, "context") == 0)
        return context_family(f);
    if (strcmp(f, "primary") == 0)
        return primary_family(f);
    if (strcmp(f, "graph_node") == 0)
        return graph_node_family(f);
    if (strcmp(f, "graph_cross") == 0)
        return graph_cross_family(f);
    if (strcmp(f, "graph_capture") == 0 || strcmp(f, "graph_escape") == 0)
        return graph_capture_family(f);
    return linear_family(f);
}
