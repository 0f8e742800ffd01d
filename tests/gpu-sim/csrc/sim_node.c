/*
 * The simulated node: node-file parser, control-log reader, device table,
 * failure state and injected events. See sim_node.h and README.md.
 */
#define _GNU_SOURCE
#include "sim_node.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define DEFAULT_DRIVER_VERSION "550.54.15"
#define DEFAULT_CUDA_DRIVER_VERSION 12040
/* Largest memory size accepted, in MiB (16 TiB): keeps byte counts far from overflow. */
#define MAX_MEMORY_MIB (16ULL * 1024ULL * 1024ULL)
/* /dev/nvidia<minor>: 255 is /dev/nvidiactl, so GPU minors stop at 254. */
#define MAX_MINOR 254u
#define MAX_NUMA_NODE 1023

/* Emits one diagnostic line on stderr as a single write, so that concurrent
 * processes sharing a terminal or log do not interleave inside a line. */
static void sim_report(const char *path, unsigned long line, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void sim_report(const char *path, unsigned long line, const char *fmt, ...)
{
    char message[1024];
    char out[SIM_PATH_SIZE + 1100];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(message, sizeof message, fmt, ap);
    va_end(ap);
    if (line > 0)
        snprintf(out, sizeof out, "gpu-sim: %s:%lu: %s\n", path, line, message);
    else
        snprintf(out, sizeof out, "gpu-sim: %s: %s\n", path, message);
    fputs(out, stderr);
    fflush(stderr);
}

/* ------------------------------------------------------------------------ */
/* Small parsing helpers                                                     */
/* ------------------------------------------------------------------------ */

static char *trim(char *s)
{
    char *end;

    while (*s != '\0' && isspace((unsigned char)*s))
        s++;
    end = s + strlen(s);
    while (end > s && isspace((unsigned char)end[-1]))
        end--;
    *end = '\0';
    return s;
}

int sim_hex_digit(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* Decimal unsigned number, no sign, no junk, no overflow. */
static bool parse_decimal(const char *s, unsigned long long max, unsigned long long *out)
{
    unsigned long long value = 0;

    if (*s == '\0')
        return false;
    for (; *s != '\0'; s++) {
        if (*s < '0' || *s > '9')
            return false;
        if (value > (ULLONG_MAX - (unsigned long long)(*s - '0')) / 10)
            return false;
        value = value * 10 + (unsigned long long)(*s - '0');
    }
    if (value > max)
        return false;
    *out = value;
    return true;
}

/* "0x..." hexadecimal or plain decimal. */
static bool parse_hex_or_decimal(const char *s, unsigned long long max, unsigned long long *out)
{
    unsigned long long value = 0;

    if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
        s += 2;
        if (*s == '\0')
            return false;
        for (; *s != '\0'; s++) {
            int d = sim_hex_digit(*s);
            if (d < 0 || value > (ULLONG_MAX >> 4))
                return false;
            value = (value << 4) | (unsigned long long)d;
        }
        if (value > max)
            return false;
        *out = value;
        return true;
    }
    return parse_decimal(s, max, out);
}

static bool parse_bool(const char *s, bool *out)
{
    if (strcmp(s, "true") == 0) {
        *out = true;
        return true;
    }
    if (strcmp(s, "false") == 0) {
        *out = false;
        return true;
    }
    return false;
}

/* 1 to 8 hex digits; advances *s past them. */
static bool parse_hex_field(const char **s, unsigned long long *out)
{
    unsigned long long value = 0;
    int digits = 0;
    int d;

    while ((d = sim_hex_digit(**s)) >= 0) {
        if (++digits > 8)
            return false;
        value = (value << 4) | (unsigned long long)d;
        (*s)++;
    }
    if (digits == 0)
        return false;
    *out = value;
    return true;
}

/*
 * NVML documents three accepted spellings for a bus id, all hexadecimal:
 * "domain:bus:device.function", "domain:bus:device" and "bus:device.function".
 */
bool sim_parse_pci_address(const char *text, unsigned int *domain, unsigned int *bus,
                           unsigned int *device, unsigned int *function)
{
    unsigned long long fields[3];
    unsigned long long fn = 0;
    int count = 0;
    bool has_function = false;
    const char *s = text;

    if (text == NULL)
        return false;
    for (;;) {
        if (count == 3 || !parse_hex_field(&s, &fields[count]))
            return false;
        count++;
        if (*s == ':') {
            s++;
            continue;
        }
        break;
    }
    if (*s == '.') {
        s++;
        if (!parse_hex_field(&s, &fn))
            return false;
        has_function = true;
    }
    if (*s != '\0')
        return false;
    if (count == 2 && !has_function)
        return false;
    if (count < 2)
        return false;
    if (count == 3) {
        *domain = (unsigned int)fields[0];
        *bus = (unsigned int)fields[1];
        *device = (unsigned int)fields[2];
    } else {
        *domain = 0;
        *bus = (unsigned int)fields[0];
        *device = (unsigned int)fields[1];
    }
    if (*bus > 0xff || *device > 0x1f || fn > 7)
        return false;
    *function = (unsigned int)fn;
    return true;
}

/* GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx with lowercase hex, as NVML prints them. */
static bool valid_gpu_uuid(const char *s)
{
    static const int groups[] = {8, 4, 4, 4, 12};
    size_t g;

    if (strncmp(s, "GPU-", 4) != 0)
        return false;
    s += 4;
    for (g = 0; g < sizeof groups / sizeof groups[0]; g++) {
        int i;
        if (g > 0 && *s++ != '-')
            return false;
        for (i = 0; i < groups[g]; i++, s++) {
            if (!((*s >= '0' && *s <= '9') || (*s >= 'a' && *s <= 'f')))
                return false;
        }
    }
    return *s == '\0';
}

static bool printable(const char *s)
{
    for (; *s != '\0'; s++) {
        if (!isprint((unsigned char)*s))
            return false;
    }
    return true;
}

static bool has_space(const char *s)
{
    for (; *s != '\0'; s++) {
        if (isspace((unsigned char)*s))
            return true;
    }
    return false;
}

/* ------------------------------------------------------------------------ */
/* Node file                                                                 */
/* ------------------------------------------------------------------------ */

enum global_key {
    GK_DRIVER_VERSION,
    GK_CUDA_DRIVER_VERSION,
    GK_NVML_VERSION,
    GK_CUDA_CONTEXT_MIB,
    GK_UTILIZATION_PERIOD_US,
    GK_UTILIZATION_JITTER_US,
    GK_UTILIZATION_JUNK_ENTRIES,
    GK_CUDA_CONTEXT_CREATE_MS,
    GK_COUNT
};

static const char *const global_keys[GK_COUNT] = {
    "driver_version",
    "cuda_driver_version",
    "nvml_version",
    "cuda_context_mib",
    "utilization_period_us",
    "utilization_jitter_us",
    "utilization_junk_entries",
    "cuda_context_create_ms",
};

enum gpu_key {
    K_UUID,
    K_NAME,
    K_MEMORY_MIB,
    K_MEMORY_RESERVED_MIB,
    K_MEMORY_USED_MIB,
    K_MINOR,
    K_NUMA_NODE,
    K_PCI_BUS_ID,
    K_PCI_DEVICE_ID,
    K_PCI_SUBSYSTEM_ID,
    K_EVENTS,
    K_ECC,
    K_MIG,
    K_UTILIZATION_GPU,
    K_UTILIZATION_MEMORY,
    K_PROCESS,
    K_MIG_INSTANCE,
    K_COUNT
};

static const char *const gpu_keys[K_COUNT] = {
    "uuid",
    "name",
    "memory_mib",
    "memory_reserved_mib",
    "memory_used_mib",
    "minor",
    "numa_node",
    "pci_bus_id",
    "pci_device_id",
    "pci_subsystem_id",
    "events",
    "ecc",
    "mig",
    "utilization_gpu",
    "utilization_memory",
    "process",
    "mig_instance",
};

struct parser {
    const char *path;
    unsigned long line;
    struct sim_node *node;
    unsigned long global_line[GK_COUNT];   /* 0: not seen */
    /* current [gpu] section */
    struct sim_gpu *gpu;
    unsigned long section_line;
    unsigned long key_line[K_COUNT];
    unsigned long long memory_mib;
    unsigned long long reserved_mib;
    unsigned long long used_mib;
};

static bool bad_value(struct parser *p, const char *key, const char *value, const char *expected)
{
    sim_report(p->path, p->line, "bad value '%s' for key '%s': expected %s", value, key, expected);
    return false;
}

static bool set_global(struct parser *p, const char *key, const char *value)
{
    struct sim_node *node = p->node;
    unsigned long long n;
    int k;

    for (k = 0; k < GK_COUNT; k++) {
        if (strcmp(key, global_keys[k]) == 0)
            break;
    }
    if (k == GK_COUNT) {
        sim_report(p->path, p->line,
                   "unknown key '%s' before the first [gpu] section (expected one of "
                   "driver_version, cuda_driver_version, nvml_version, cuda_context_mib, "
                   "utilization_period_us, utilization_jitter_us, utilization_junk_entries, "
                   "cuda_context_create_ms)",
                   key);
        return false;
    }
    if (p->global_line[k] != 0) {
        sim_report(p->path, p->line, "duplicate key '%s' (first set on line %lu)", key,
                   p->global_line[k]);
        return false;
    }
    p->global_line[k] = p->line;

    switch ((enum global_key)k) {
    case GK_DRIVER_VERSION:
    case GK_NVML_VERSION:
        if (strlen(value) >= SIM_VERSION_SIZE || has_space(value) || !printable(value))
            return bad_value(p, key, value, "a version string without spaces, under 80 characters");
        strcpy(k == GK_DRIVER_VERSION ? node->driver_version : node->nvml_version, value);
        return true;
    case GK_CUDA_DRIVER_VERSION:
        if (!parse_decimal(value, INT_MAX, &n) || n == 0)
            return bad_value(p, key, value, "a positive decimal number such as 12040 (CUDA 12.4)");
        node->cuda_driver_version = (int)n;
        return true;
    case GK_CUDA_CONTEXT_MIB:
        if (!parse_decimal(value, MAX_MEMORY_MIB, &n))
            return bad_value(p, key, value, "a decimal number of MiB");
        node->cuda_context_bytes = n * SIM_MIB;
        return true;
    case GK_UTILIZATION_PERIOD_US:
        if (!parse_decimal(value, 1000000, &n) || n < 10000)
            return bad_value(p, key, value,
                             "a decimal number of microseconds from 10000 to 1000000");
        node->utilization_period_ns = n * 1000ull;
        return true;
    case GK_UTILIZATION_JITTER_US:
        /* Checked against the period once both are known (see sim_node_load). */
        if (!parse_decimal(value, 1000000, &n))
            return bad_value(p, key, value, "a decimal number of microseconds");
        node->utilization_jitter_ns = n * 1000ull;
        return true;
    case GK_UTILIZATION_JUNK_ENTRIES:
        if (!parse_decimal(value, SIM_MAX_JUNK_ENTRIES, &n))
            return bad_value(p, key, value, "a decimal number of entries from 0 to 100");
        node->utilization_junk_entries = (unsigned int)n;
        return true;
    case GK_CUDA_CONTEXT_CREATE_MS:
        if (!parse_decimal(value, 10000, &n))
            return bad_value(p, key, value, "a decimal number of milliseconds from 0 to 10000");
        node->cuda_context_create_ns = n * 1000000ull;
        return true;
    case GK_COUNT:
        break;
    }
    return false;
}

static bool begin_gpu(struct parser *p)
{
    struct sim_node *node = p->node;
    struct sim_gpu *gpus;

    if (node->gpu_count == SIM_MAX_GPUS) {
        sim_report(p->path, p->line, "too many [gpu] sections (at most %d)", SIM_MAX_GPUS);
        return false;
    }
    gpus = realloc(node->gpus, (node->gpu_count + 1) * sizeof *gpus);
    if (gpus == NULL) {
        sim_report(p->path, p->line, "out of memory");
        return false;
    }
    node->gpus = gpus;
    p->gpu = &gpus[node->gpu_count];
    memset(p->gpu, 0, sizeof *p->gpu);
    p->section_line = p->line;
    memset(p->key_line, 0, sizeof p->key_line);
    p->memory_mib = 0;
    p->reserved_mib = 0;
    p->used_mib = 0;

    /* Defaults for optional keys. */
    p->gpu->numa_node = -1;
    p->gpu->events = true;
    p->gpu->ecc = true;
    p->gpu->mig = SIM_MIG_UNSUPPORTED;
    p->gpu->minor = node->gpu_count;
    p->gpu->pci_bus = node->gpu_count + 1; /* 00000000:01:00.0, 00000000:02:00.0, ... */
    p->gpu->pci_device_id = 0x000010deu; /* vendor NVIDIA, device id unknown */
    p->gpu->pci_subsystem_id = 0x000010deu;
    node->gpu_count++;
    return true;
}

static bool set_gpu_key(struct parser *p, const char *key, char *value)
{
    struct sim_gpu *gpu = p->gpu;
    unsigned long long n;
    int k;

    for (k = 0; k < K_COUNT; k++) {
        if (strcmp(key, gpu_keys[k]) == 0)
            break;
    }
    if (k == K_COUNT) {
        sim_report(p->path, p->line, "unknown key '%s' in [gpu] section", key);
        return false;
    }
    if (k != K_PROCESS && k != K_MIG_INSTANCE && p->key_line[k] != 0) {
        sim_report(p->path, p->line, "duplicate key '%s' (first set on line %lu)", key,
                   p->key_line[k]);
        return false;
    }
    p->key_line[k] = p->line;

    switch ((enum gpu_key)k) {
    case K_UUID:
        if (!valid_gpu_uuid(value))
            return bad_value(p, key, value,
                             "GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx with lowercase hex digits");
        strcpy(gpu->uuid, value);
        return true;
    case K_NAME:
        if (strlen(value) >= SIM_NAME_SIZE || !printable(value))
            return bad_value(p, key, value, "printable text under 96 characters");
        strcpy(gpu->name, value);
        return true;
    case K_MEMORY_MIB:
        if (!parse_decimal(value, MAX_MEMORY_MIB, &n) || n == 0)
            return bad_value(p, key, value, "a positive decimal number of MiB");
        p->memory_mib = n;
        return true;
    case K_MEMORY_RESERVED_MIB:
        if (!parse_decimal(value, MAX_MEMORY_MIB, &n))
            return bad_value(p, key, value, "a decimal number of MiB");
        p->reserved_mib = n;
        return true;
    case K_MEMORY_USED_MIB:
        if (!parse_decimal(value, MAX_MEMORY_MIB, &n))
            return bad_value(p, key, value, "a decimal number of MiB");
        p->used_mib = n;
        return true;
    case K_MINOR:
        if (!parse_decimal(value, MAX_MINOR, &n))
            return bad_value(p, key, value, "a decimal number from 0 to 254");
        gpu->minor = (unsigned int)n;
        return true;
    case K_NUMA_NODE:
        if (strcmp(value, "-1") == 0) {
            gpu->numa_node = -1;
            return true;
        }
        if (!parse_decimal(value, MAX_NUMA_NODE, &n))
            return bad_value(p, key, value, "-1 or a decimal number from 0 to 1023");
        gpu->numa_node = (int)n;
        return true;
    case K_PCI_BUS_ID: {
        unsigned int domain, bus, device, function;
        if (!sim_parse_pci_address(value, &domain, &bus, &device, &function) || function != 0)
            return bad_value(p, key, value, "a PCI address such as 00000000:07:00.0 (function 0)");
        gpu->pci_domain = domain;
        gpu->pci_bus = bus;
        gpu->pci_device = device;
        gpu->pci_function = function;
        return true;
    }
    case K_PCI_DEVICE_ID:
    case K_PCI_SUBSYSTEM_ID:
        if (!parse_hex_or_decimal(value, 0xffffffffULL, &n))
            return bad_value(p, key, value, "a 32-bit number such as 0x20B210DE");
        if (k == K_PCI_DEVICE_ID)
            gpu->pci_device_id = (unsigned int)n;
        else
            gpu->pci_subsystem_id = (unsigned int)n;
        return true;
    case K_EVENTS:
        if (!parse_bool(value, &gpu->events))
            return bad_value(p, key, value, "true or false");
        return true;
    case K_ECC:
        if (!parse_bool(value, &gpu->ecc))
            return bad_value(p, key, value, "true or false");
        return true;
    case K_MIG:
        if (strcmp(value, "unsupported") == 0)
            gpu->mig = SIM_MIG_UNSUPPORTED;
        else if (strcmp(value, "disabled") == 0)
            gpu->mig = SIM_MIG_DISABLED;
        else if (strcmp(value, "enabled") == 0)
            gpu->mig = SIM_MIG_ENABLED;
        else
            return bad_value(p, key, value, "unsupported, disabled or enabled");
        return true;
    case K_UTILIZATION_GPU:
    case K_UTILIZATION_MEMORY:
        if (!parse_decimal(value, 100, &n))
            return bad_value(p, key, value, "a percentage from 0 to 100");
        if (k == K_UTILIZATION_GPU)
            gpu->utilization_gpu = (unsigned int)n;
        else
            gpu->utilization_memory = (unsigned int)n;
        return true;
    case K_PROCESS: {
        /* "<pid> <used_mib>" */
        char *save = NULL;
        char *pid_text = strtok_r(value, " \t", &save);
        char *mib_text = strtok_r(NULL, " \t", &save);
        unsigned long long pid, mib;
        unsigned int i;

        if (pid_text == NULL || mib_text == NULL || strtok_r(NULL, " \t", &save) != NULL ||
            !parse_decimal(pid_text, INT_MAX, &pid) || pid == 0 ||
            !parse_decimal(mib_text, MAX_MEMORY_MIB, &mib))
            return bad_value(p, key, value, "'<pid> <used_mib>' (two decimal numbers)");
        if (gpu->process_count == SIM_MAX_PROCESSES) {
            sim_report(p->path, p->line, "too many 'process' keys (at most %d per GPU)",
                       SIM_MAX_PROCESSES);
            return false;
        }
        for (i = 0; i < gpu->process_count; i++) {
            if (gpu->processes[i].pid == pid) {
                sim_report(p->path, p->line, "duplicate pid %llu for key 'process'", pid);
                return false;
            }
        }
        gpu->processes[gpu->process_count].pid = (unsigned int)pid;
        gpu->processes[gpu->process_count].used_bytes = mib * SIM_MIB;
        gpu->process_count++;
        return true;
    }
    case K_MIG_INSTANCE:
        /* Checked against the GPU's profile table when the MIG state file is created. */
        if (gpu->mig_initial_count == SIM_MIG_MAX_INITIAL) {
            sim_report(p->path, p->line, "too many 'mig_instance' keys (at most %d per GPU)",
                       SIM_MIG_MAX_INITIAL);
            return false;
        }
        if (strlen(value) >= SIM_MIG_SPEC_SIZE || strchr(value, '@') == NULL)
            return bad_value(p, key, value, "'<profile>@<start>' or '<profile>@<start> gi-only'");
        strcpy(gpu->mig_initial[gpu->mig_initial_count++], value);
        return true;
    case K_COUNT:
        break;
    }
    return false;
}

/* Checks a finished [gpu] section and fills derived values. */
static bool end_gpu(struct parser *p)
{
    static const enum gpu_key required[] = {K_UUID, K_NAME, K_MEMORY_MIB};
    struct sim_node *node = p->node;
    struct sim_gpu *gpu = p->gpu;
    unsigned long long process_mib = 0;
    unsigned int i;
    size_t r;

    if (gpu == NULL)
        return true;
    for (r = 0; r < sizeof required / sizeof required[0]; r++) {
        if (p->key_line[required[r]] == 0) {
            sim_report(p->path, p->section_line, "[gpu] section is missing required key '%s'",
                       gpu_keys[required[r]]);
            return false;
        }
    }
    for (i = 0; i < gpu->process_count; i++)
        process_mib += gpu->processes[i].used_bytes / SIM_MIB;
    if (p->key_line[K_MEMORY_RESERVED_MIB] == 0)
        p->reserved_mib = p->memory_mib / 200; /* the driver keeps ~0.5% for itself */
    if (p->reserved_mib + p->used_mib + process_mib > p->memory_mib) {
        unsigned long line = p->key_line[K_MEMORY_USED_MIB] ? p->key_line[K_MEMORY_USED_MIB]
                                                           : p->key_line[K_MEMORY_MIB];
        sim_report(p->path, line,
                   "memory_reserved_mib (%llu) + memory_used_mib (%llu) + process memory (%llu) "
                   "exceed memory_mib (%llu)",
                   p->reserved_mib, p->used_mib, process_mib, p->memory_mib);
        return false;
    }
    gpu->memory_total_bytes = p->memory_mib * SIM_MIB;
    gpu->memory_reserved_bytes = p->reserved_mib * SIM_MIB;
    gpu->memory_used_bytes = p->used_mib * SIM_MIB;

    for (i = 0; i + 1 < node->gpu_count; i++) {
        const struct sim_gpu *other = &node->gpus[i];
        if (strcmp(other->uuid, gpu->uuid) == 0) {
            sim_report(p->path, p->key_line[K_UUID], "duplicate uuid '%s' (key 'uuid')", gpu->uuid);
            return false;
        }
        if (other->minor == gpu->minor) {
            sim_report(p->path, p->key_line[K_MINOR] ? p->key_line[K_MINOR] : p->section_line,
                       "duplicate minor %u (key 'minor'; GPU %u has it)", gpu->minor, i);
            return false;
        }
        if (other->pci_domain == gpu->pci_domain && other->pci_bus == gpu->pci_bus &&
            other->pci_device == gpu->pci_device) {
            sim_report(p->path,
                       p->key_line[K_PCI_BUS_ID] ? p->key_line[K_PCI_BUS_ID] : p->section_line,
                       "duplicate PCI address %08X:%02X:%02X.0 (key 'pci_bus_id'; GPU %u has it)",
                       gpu->pci_domain, gpu->pci_bus, gpu->pci_device, i);
            return false;
        }
    }
    p->gpu = NULL;
    return true;
}

static bool parse_line(struct parser *p, char *raw)
{
    char *hash = strchr(raw, '#');
    char *line, *eq, *key, *value;

    if (hash != NULL)
        *hash = '\0';
    line = trim(raw);
    if (*line == '\0')
        return true;

    if (*line == '[') {
        if (strcmp(line, "[gpu]") != 0) {
            sim_report(p->path, p->line, "unknown section '%s' (only [gpu] exists)", line);
            return false;
        }
        return end_gpu(p) && begin_gpu(p);
    }

    eq = strchr(line, '=');
    if (eq == NULL) {
        sim_report(p->path, p->line, "expected 'key = value' or '[gpu]', got '%s'", line);
        return false;
    }
    *eq = '\0';
    key = trim(line);
    value = trim(eq + 1);
    if (*key == '\0') {
        sim_report(p->path, p->line, "missing key before '='");
        return false;
    }
    if (*value == '\0') {
        sim_report(p->path, p->line, "empty value for key '%s'", key);
        return false;
    }
    if (p->gpu == NULL)
        return set_global(p, key, value);
    return set_gpu_key(p, key, value);
}

static enum sim_load_status parse_node_file(struct sim_node *node)
{
    struct parser p;
    FILE *f;
    char *buf = NULL;
    size_t cap = 0;
    ssize_t len;
    bool ok = true;

    f = fopen(node->node_path, "re");
    if (f == NULL)
        return SIM_LOAD_NO_NODE;

    memset(&p, 0, sizeof p);
    p.path = node->node_path;
    p.node = node;
    while (ok && (len = getline(&buf, &cap, f)) >= 0) {
        p.line++;
        if ((size_t)len != strlen(buf)) {
            sim_report(p.path, p.line, "NUL byte in line");
            ok = false;
            break;
        }
        ok = parse_line(&p, buf);
    }
    if (ok && ferror(f)) {
        sim_report(p.path, 0, "read error: %s", strerror(errno));
        ok = false;
    }
    free(buf);
    fclose(f);
    if (ok)
        ok = end_gpu(&p);
    if (!ok)
        return SIM_LOAD_INVALID;

    if (node->driver_version[0] == '\0')
        strcpy(node->driver_version, DEFAULT_DRIVER_VERSION);
    if (node->cuda_driver_version == 0)
        node->cuda_driver_version = DEFAULT_CUDA_DRIVER_VERSION;
    if (p.global_line[GK_CUDA_CONTEXT_MIB] == 0)
        node->cuda_context_bytes = SIM_DEFAULT_CUDA_CONTEXT_MIB * SIM_MIB;
    if (p.global_line[GK_UTILIZATION_PERIOD_US] == 0)
        node->utilization_period_ns = SIM_DEFAULT_UTILIZATION_PERIOD_NS;
    if (node->utilization_jitter_ns * 4 > node->utilization_period_ns) {
        sim_report(p.path, p.global_line[GK_UTILIZATION_JITTER_US],
                   "bad value %llu for key 'utilization_jitter_us': expected at most a quarter "
                   "of the sample period (%llu us)",
                   node->utilization_jitter_ns / 1000ull, node->utilization_period_ns / 4000ull);
        return SIM_LOAD_INVALID;
    }
    if (node->nvml_version[0] == '\0') {
        /* Real NVML reports "<CUDA major>.<driver version>", e.g. "12.550.54.15". */
        char version[SIM_VERSION_SIZE + 16];
        snprintf(version, sizeof version, "%d.%s", node->cuda_driver_version / 1000,
                 node->driver_version);
        if (strlen(version) >= SIM_VERSION_SIZE) {
            sim_report(p.path, 0, "derived nvml_version '%s' is too long", version);
            return SIM_LOAD_INVALID;
        }
        strcpy(node->nvml_version, version);
    }
    return SIM_LOAD_OK;
}

/* ------------------------------------------------------------------------ */
/* Control log                                                               */
/* ------------------------------------------------------------------------ */

static void push_event(struct sim_node *node, unsigned int gpu, enum sim_event_kind kind,
                       unsigned long long data)
{
    if (node->event_count == node->event_capacity) {
        size_t capacity = node->event_capacity ? node->event_capacity * 2 : 64;
        struct sim_event *events = realloc(node->events, capacity * sizeof *events);
        if (events == NULL) {
            sim_report(node->control_path, node->control_lines, "out of memory; event dropped");
            return;
        }
        node->events = events;
        node->event_capacity = capacity;
    }
    node->events[node->event_count].gpu = gpu;
    node->events[node->event_count].kind = kind;
    node->events[node->event_count].data = data;
    node->event_count++;
}

/* One complete control line (without its newline). Bad lines are reported and ignored. */
static void apply_control_line(struct sim_node *node, char *raw)
{
    char *hash = strchr(raw, '#');
    char *save = NULL;
    char *command, *uuid, *arg, *extra;
    unsigned long long code = 0;
    int gpu;
    unsigned long line = node->control_lines;
    const char *path = node->control_path;

    if (hash != NULL)
        *hash = '\0';
    command = strtok_r(raw, " \t\r", &save);
    if (command == NULL)
        return; /* blank or comment */
    uuid = strtok_r(NULL, " \t\r", &save);
    arg = strtok_r(NULL, " \t\r", &save);
    extra = arg ? strtok_r(NULL, " \t\r", &save) : NULL;

    if (uuid == NULL) {
        sim_report(path, line, "'%s' needs a GPU uuid; line ignored", command);
        return;
    }
    gpu = sim_node_find_uuid(node, uuid);
    if (gpu < 0) {
        sim_report(path, line, "no GPU with uuid '%s' on this node; line ignored", uuid);
        return;
    }

    if (strcmp(command, "mig-fail") == 0) {
        unsigned long long count = 0;
        if (arg == NULL || extra == NULL || strtok_r(NULL, " \t\r", &save) != NULL ||
            !parse_decimal(arg, 1000000, &count) || !parse_decimal(extra, 999, &code) ||
            code == 0) {
            sim_report(path, line,
                       "expected 'mig-fail <uuid> <count> <nvml error code>'; line ignored");
            return;
        }
        node->gpus[gpu].mig_fault_line = line;
        node->gpus[gpu].mig_fault_count = (unsigned int)count;
        node->gpus[gpu].mig_fault_code = (unsigned int)code;
        return;
    }
    if (strcmp(command, "xid") == 0) {
        if (arg == NULL || extra != NULL || !parse_decimal(arg, ULLONG_MAX, &code)) {
            sim_report(path, line, "expected 'xid <uuid> <decimal code>'; line ignored");
            return;
        }
        push_event(node, (unsigned int)gpu, SIM_EVENT_XID, code);
        return;
    }
    if (arg != NULL) {
        sim_report(path, line, "unexpected argument '%s' after '%s <uuid>'; line ignored", arg,
                   command);
        return;
    }
    if (strcmp(command, "fail") == 0)
        node->gpus[gpu].failed = true;
    else if (strcmp(command, "recover") == 0)
        node->gpus[gpu].failed = false;
    else if (strcmp(command, "reset-pending") == 0) {
        node->gpus[gpu].reset_pending = true;
        node->gpus[gpu].repairs++;
    }
    else if (strcmp(command, "reset") == 0)
        node->gpus[gpu].reset_pending = false;
    else if (strcmp(command, "ecc-dbe") == 0)
        push_event(node, (unsigned int)gpu, SIM_EVENT_ECC_DBE, 0);
    else if (strcmp(command, "ecc-sbe") == 0)
        push_event(node, (unsigned int)gpu, SIM_EVENT_ECC_SBE, 0);
    else
        sim_report(path, line,
                   "unknown command '%s' (expected xid, fail, recover, reset-pending, reset, "
                   "ecc-dbe, ecc-sbe or mig-fail); "
                   "line ignored",
                   command);
}

void sim_node_sync(struct sim_node *node)
{
    struct stat st;
    unsigned long long size;
    size_t want, have = 0, start = 0, i;
    char *buf;
    int fd;

    if (stat(node->control_path, &st) != 0)
        return; /* no control log yet: nothing injected */
    size = (unsigned long long)st.st_size;
    if (size == node->control_offset)
        return;
    if (size < node->control_offset) {
        /* The log is append-only by contract; a truncated log would make processes
         * disagree about the node's state, so say so once and keep the old state. */
        if (!node->control_shrunk_warned) {
            sim_report(node->control_path, 0,
                       "control log shrank from %llu to %llu bytes; it must only be appended to",
                       node->control_offset, size);
            node->control_shrunk_warned = true;
        }
        return;
    }

    fd = open(node->control_path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return;
    want = (size_t)(size - node->control_offset);
    buf = malloc(want + 1);
    if (buf == NULL) {
        close(fd);
        return;
    }
    while (have < want) {
        ssize_t n = pread(fd, buf + have, want - have, (off_t)(node->control_offset + have));
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        have += (size_t)n;
    }
    close(fd);

    /* Apply complete lines only; a trailing partial line waits for its newline. */
    for (i = 0; i < have; i++) {
        if (buf[i] != '\n')
            continue;
        buf[i] = '\0';
        node->control_lines++;
        apply_control_line(node, buf + start);
        start = i + 1;
    }
    node->control_offset += start;
    free(buf);
}

/* ------------------------------------------------------------------------ */
/* Public functions                                                          */
/* ------------------------------------------------------------------------ */

enum sim_load_status sim_node_load(const char *node_path, const char *control_path,
                                   struct sim_node **out)
{
    struct sim_node *node;
    enum sim_load_status status;

    *out = NULL;
    if (node_path == NULL || node_path[0] == '\0')
        return SIM_LOAD_NO_NODE;
    if (strlen(node_path) + strlen(SIM_CONTROL_SUFFIX) >= SIM_PATH_SIZE ||
        (control_path != NULL && strlen(control_path) >= SIM_PATH_SIZE))
        return SIM_LOAD_NO_NODE;

    node = calloc(1, sizeof *node);
    if (node == NULL)
        return SIM_LOAD_NO_MEMORY;
    strcpy(node->node_path, node_path);
    if (control_path != NULL && control_path[0] != '\0')
        strcpy(node->control_path, control_path);
    else
        snprintf(node->control_path, sizeof node->control_path, "%s%s", node_path,
                 SIM_CONTROL_SUFFIX);

    status = parse_node_file(node);
    if (status != SIM_LOAD_OK) {
        sim_node_free(node);
        return status;
    }
    /* Replay the whole log so that a process started after "fail" sees the GPU lost. */
    sim_node_sync(node);
    *out = node;
    return SIM_LOAD_OK;
}

enum sim_load_status sim_node_load_from_env(struct sim_node **out)
{
    return sim_node_load(getenv(SIM_ENV_NODE), getenv(SIM_ENV_CONTROL), out);
}

void sim_node_free(struct sim_node *node)
{
    if (node == NULL)
        return;
    free(node->gpus);
    free(node->events);
    free(node);
}

int sim_node_find_uuid(const struct sim_node *node, const char *uuid)
{
    unsigned int i;

    for (i = 0; i < node->gpu_count; i++) {
        if (strcmp(node->gpus[i].uuid, uuid) == 0)
            return (int)i;
    }
    return -1;
}

int sim_node_find_pci(const struct sim_node *node, unsigned int domain, unsigned int bus,
                      unsigned int device)
{
    unsigned int i;

    for (i = 0; i < node->gpu_count; i++) {
        const struct sim_gpu *gpu = &node->gpus[i];
        if (gpu->pci_domain == domain && gpu->pci_bus == bus && gpu->pci_device == device)
            return (int)i;
    }
    return -1;
}

unsigned long long sim_gpu_allocated_bytes(const struct sim_gpu *gpu)
{
    unsigned long long total = gpu->memory_used_bytes;
    unsigned int i;

    for (i = 0; i < gpu->process_count; i++)
        total += gpu->processes[i].used_bytes;
    return total;
}

int sim_map_node_file(const char *node_path, const char *suffix, size_t size, bool create,
                      bool (*init)(void *map, void *arg), bool (*check)(const void *map),
                      void *arg, void **out)
{
    char path[SIM_PATH_SIZE + 32];
    struct stat st;
    void *map;
    int fd, saved;

    *out = NULL;
    if (node_path == NULL || node_path[0] == '\0') {
        errno = ENOENT;
        return -1;
    }
    if ((size_t)snprintf(path, sizeof path, "%s%s", node_path, suffix) >= sizeof path) {
        errno = ENAMETOOLONG;
        return -1;
    }
    fd = open(path, O_RDWR | O_CLOEXEC | (create ? O_CREAT : 0), 0666);
    if (fd < 0)
        return -1;
    /* Creators serialise on the file lock: the first one sizes and stamps it. */
    if (flock(fd, LOCK_EX) != 0)
        goto fail;
    if (fstat(fd, &st) != 0)
        goto fail_unlock;
    if (st.st_size == 0) {
        if (!create) {
            errno = ENOENT; /* being created right now: not there yet */
            goto fail_unlock;
        }
        if (ftruncate(fd, (off_t)size) != 0)
            goto fail_unlock;
    } else if ((size_t)st.st_size != size) {
        errno = EINVAL;
        goto fail_unlock;
    }
    map = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (map == MAP_FAILED)
        goto fail_unlock;
    if (st.st_size == 0 ? !init(map, arg) : !check(map)) {
        munmap(map, size);
        if (st.st_size == 0 && ftruncate(fd, 0) != 0) {
            /* left empty or not, the next creator starts over */
        }
        errno = EINVAL;
        goto fail_unlock;
    }
    flock(fd, LOCK_UN);
    close(fd); /* the mapping stays */
    *out = map;
    return 0;

fail_unlock:
    saved = errno;
    flock(fd, LOCK_UN);
    errno = saved;
fail:
    saved = errno;
    close(fd);
    errno = saved;
    return -1;
}
