/*
 * cuGetProcAddress's table: which exported function answers a base symbol name
 * for a requested CUDA version and default-stream mode. Internal to the fake
 * libcuda.so.1.
 */
#ifndef GPU_SIM_CUDA_PROCS_H
#define GPU_SIM_CUDA_PROCS_H

#include "cuda_api.h"

enum cuda_proc_stream {
    PROC_ANY = 0,   /* no default-stream semantics: serves both modes */
    PROC_LEGACY,    /* the legacy-default-stream variant (plain name) */
    PROC_PTDS,      /* the per-thread-default-stream variant (_ptsz / _ptds) */
};

struct cuda_proc {
    const char *name;             /* base name as passed to cuGetProcAddress */
    int version;                  /* first CUDA version (1000*major + 10*minor) it answers for */
    enum cuda_proc_stream stream;
    const char *symbol;           /* the exported symbol it resolves to */
    void *fn;
};

extern const struct cuda_proc cuda_procs[];
extern const unsigned int cuda_proc_count;

/*
 * The lookup behind cuGetProcAddress(_v2): the entry for `symbol` with the
 * highest version <= cudaVersion, preferring the variant for the requested
 * stream mode. status may be NULL.
 */
CUresult cuda_proc_lookup(const char *symbol, void **pfn, int cudaVersion, cuuint64_t flags,
                          CUdriverProcAddressQueryResult *status);

#endif /* GPU_SIM_CUDA_PROCS_H */
