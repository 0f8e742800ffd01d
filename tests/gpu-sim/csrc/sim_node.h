/*
 * The simulated GPU node, independent of any driver API.
 *
 * A node is described by a node file (static facts: versions and one [gpu]
 * section per device) and driven by a control log (an append-only text file
 * of fault-injection commands shared by every process on the simulated node).
 * This module parses both and keeps the resulting device table, the per-GPU
 * failure state and the list of injected events. The fake libnvidia-ml.so.1
 * (nvml.c) and the fake libcuda.so.1 (cuda.c) are the two front ends.
 *
 * Nothing here is thread-safe: a front end serialises all calls on one node
 * with its own lock. All symbols are internal (the library is built with
 * -fvisibility=hidden), so the sim_ prefix cannot clash with an application.
 *
 * The file formats are documented in tests/gpu-sim/README.md.
 */
#ifndef GPU_SIM_SIM_NODE_H
#define GPU_SIM_SIM_NODE_H

#include <stdbool.h>
#include <stddef.h>

/* Environment variables read by sim_node_load_from_env(). */
#define SIM_ENV_NODE "GPU_SIM_NODE"
#define SIM_ENV_CONTROL "GPU_SIM_CONTROL"
/* Control log path when SIM_ENV_CONTROL is unset: the node file path plus this. */
#define SIM_CONTROL_SUFFIX ".control"

#define SIM_MAX_GPUS 128
#define SIM_MAX_PROCESSES 64
#define SIM_UUID_SIZE 48     /* "GPU-" + 36 characters + NUL, with room to spare */
#define SIM_NAME_SIZE 96     /* NVML_DEVICE_NAME_V2_BUFFER_SIZE */
#define SIM_VERSION_SIZE 80  /* NVML_SYSTEM_DRIVER_VERSION_BUFFER_SIZE */
#define SIM_PATH_SIZE 4096
#define SIM_MIG_MAX_INITIAL 8     /* mig_instance keys per GPU */
#define SIM_MIG_SPEC_SIZE 48      /* "<profile name>@<start>[ gi-only]" */

#define SIM_MIB (1024ULL * 1024ULL)
/* Device memory a CUDA context costs unless the node file says otherwise. */
#define SIM_DEFAULT_CUDA_CONTEXT_MIB 300ULL
/* The kernel timeline's NVML sample period unless the node file says otherwise (1/6 s). */
#define SIM_DEFAULT_UTILIZATION_PERIOD_NS 166666667ULL
#define SIM_MAX_JUNK_ENTRIES 100

enum sim_mig {
    SIM_MIG_UNSUPPORTED = 0, /* the GPU is not MIG-capable */
    SIM_MIG_DISABLED,        /* MIG-capable, MIG mode off */
    SIM_MIG_ENABLED,         /* MIG mode on */
};

/* Kinds of event the control log can inject. */
enum sim_event_kind {
    SIM_EVENT_XID = 0,     /* critical XID error; data is the XID code */
    SIM_EVENT_ECC_DBE,     /* double-bit (uncorrectable) ECC error */
    SIM_EVENT_ECC_SBE,     /* single-bit (corrected) ECC error */
    SIM_EVENT_KIND_COUNT
};

struct sim_process {
    unsigned int pid;
    unsigned long long used_bytes;
};

struct sim_gpu {
    /* ---- static, from the node file ---- */
    char uuid[SIM_UUID_SIZE];
    char name[SIM_NAME_SIZE];
    unsigned long long memory_total_bytes;
    unsigned long long memory_reserved_bytes; /* set aside by the driver/firmware */
    unsigned long long memory_used_bytes;     /* allocated, beyond the listed processes */
    unsigned int minor;
    int numa_node;                            /* -1: the driver does not report one */
    unsigned int pci_domain, pci_bus, pci_device, pci_function;
    unsigned int pci_device_id;               /* (device id << 16) | vendor id */
    unsigned int pci_subsystem_id;            /* (subsystem id << 16) | subsystem vendor */
    bool events;                              /* supports event notification at all */
    bool ecc;                                 /* ECC enabled: ECC events can be registered */
    enum sim_mig mig;
    /* Initial MIG layout (applied when the node's MIG state file is created), as written. */
    unsigned int mig_initial_count;
    char mig_initial[SIM_MIG_MAX_INITIAL][SIM_MIG_SPEC_SIZE];
    unsigned int utilization_gpu, utilization_memory;
    unsigned int process_count;
    struct sim_process processes[SIM_MAX_PROCESSES];

    /* ---- dynamic, from the control log ---- */
    bool failed;                              /* fallen off the bus */
    bool reset_pending;                       /* retired pages / remapped rows await a GPU reset */
    unsigned int repairs;                     /* "reset-pending" lines so far (rows remapped) */
    /* The last "mig-fail" line for this GPU (0: none): its line number, count and NVML code.
     * The node's MIG state file records which line was adopted, so each line arms once. */
    unsigned long mig_fault_line;
    unsigned int mig_fault_count;
    unsigned int mig_fault_code;
};

struct sim_event {
    unsigned int gpu;            /* index into sim_node.gpus */
    enum sim_event_kind kind;
    unsigned long long data;
};

struct sim_node {
    char node_path[SIM_PATH_SIZE];
    char control_path[SIM_PATH_SIZE];

    char driver_version[SIM_VERSION_SIZE];
    int cuda_driver_version;     /* e.g. 12040 for CUDA 12.4 */
    char nvml_version[SIM_VERSION_SIZE];
    unsigned long long cuda_context_bytes; /* device memory each CUDA context takes */
    /* How long creating a context takes once its memory is taken (real drivers: hundreds of ms;
     * 0 by default, so tests that start many processes stay fast). */
    unsigned long long cuda_context_create_ns;
    unsigned long long utilization_period_ns; /* NVML sample period of the kernel timeline */
    /* How late after its period's end each NVML sample is recorded: 0..jitter, fixed per
     * (GPU, period), the same in every process (the real driver's sampling thread is late by a
     * varying amount, so successive sample timestamps are not exactly a period apart). */
    unsigned long long utilization_jitter_ns;
    /* Entries a real driver sometimes appends to nvmlDeviceGetProcessUtilization's answer (seen
     * next to zombie processes, nvtop#110): one with a pid nobody has, smUtil far above 100 and
     * a stamp long past, the rest all zero. 0..=SIM_MAX_JUNK_ENTRIES. */
    unsigned int utilization_junk_entries;

    unsigned int gpu_count;
    struct sim_gpu *gpus;

    /* Control log state: bytes consumed so far (always at a line boundary). */
    unsigned long long control_offset;
    unsigned long control_lines;
    bool control_shrunk_warned;

    /* Every event injected since the log began, in log order. An event's
     * sequence number is its index; consumers remember how far they got. */
    struct sim_event *events;
    size_t event_count;
    size_t event_capacity;
};

enum sim_load_status {
    SIM_LOAD_OK = 0,
    SIM_LOAD_NO_NODE,   /* no node file configured, or it cannot be opened */
    SIM_LOAD_INVALID,   /* the node file is malformed; one line was printed on stderr */
    SIM_LOAD_NO_MEMORY,
};

/*
 * Loads the node named by $GPU_SIM_NODE, with the control log at
 * $GPU_SIM_CONTROL or "<node file>.control", and replays the control log.
 * Prints nothing unless the node file is malformed.
 */
enum sim_load_status sim_node_load_from_env(struct sim_node **out);

/* As above with explicit paths; control_path may be NULL for the default. */
enum sim_load_status sim_node_load(const char *node_path, const char *control_path,
                                   struct sim_node **out);

void sim_node_free(struct sim_node *node);

/*
 * Applies control-log lines appended since the last call. Cheap when nothing
 * changed (one stat). Only complete (newline-terminated) lines are consumed.
 */
void sim_node_sync(struct sim_node *node);

/* Index of the GPU with this UUID (exact match), or -1. */
int sim_node_find_uuid(const struct sim_node *node, const char *uuid);

/* Index of the GPU at this PCI domain/bus/device, or -1. */
int sim_node_find_pci(const struct sim_node *node, unsigned int domain, unsigned int bus,
                      unsigned int device);

/*
 * Parses a PCI address "[domain:]bus:device[.function]" (hex, any case, domain
 * of up to 8 digits). Returns false if it is not one.
 */
bool sim_parse_pci_address(const char *text, unsigned int *domain, unsigned int *bus,
                           unsigned int *device, unsigned int *function);

/* Memory allocated on the GPU (processes plus the extra "used" amount), in bytes. */
unsigned long long sim_gpu_allocated_bytes(const struct sim_gpu *gpu);

/* Value of a hex digit (any case), or -1. */
int sim_hex_digit(char c);

/*
 * Maps "<node_path><suffix>", a node-wide shared file of exactly `size` bytes,
 * read-write and shared. Creators serialise on flock: with create, the first
 * one sizes the file and calls init(map, arg), which must stamp the header
 * last; if init returns false the file is emptied again (the next creator
 * starts over) and the call fails with EINVAL. An existing file must have
 * exactly `size` bytes and pass check(map). Returns 0 with *out set, or -1
 * with errno set (ENOENT when !create and there is no file yet).
 */
int sim_map_node_file(const char *node_path, const char *suffix, size_t size, bool create,
                      bool (*init)(void *map, void *arg), bool (*check)(const void *map),
                      void *arg, void **out);

#endif /* GPU_SIM_SIM_NODE_H */
