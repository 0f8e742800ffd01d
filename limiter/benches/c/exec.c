/* The cost of process start with a preloaded library: fork + execve of a program (default /bin/true)
 * with LD_PRELOAD set to each library named on the command line ("none" = no preload), interleaved
 * round by round so that machine noise falls on all variants alike. Prints, per variant, the median
 * wall time of fork+exec+exit+wait in microseconds and the median of the child's minor page faults.
 *
 *   exec <rounds> <program> <library|none>...
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/resource.h>
#include <sys/wait.h>

static double now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s <rounds> <program> <library|none>...\n", argv[0]);
        return 2;
    }
    int rounds = atoi(argv[1]);
    char *prog = argv[2];
    int nv = argc - 3;
    if (rounds < 1) {
        fprintf(stderr, "rounds must be a positive number, got %s\n", argv[1]);
        return 2;
    }
    double *wall = calloc((size_t)nv * rounds, sizeof(double));
    double *faults = calloc((size_t)nv * rounds, sizeof(double));
    char **envs = calloc(nv, sizeof(char *));
    if (!wall || !faults || !envs) return 1;
    for (int v = 0; v < nv; v++) {
        const char *lib = argv[3 + v];
        if (strcmp(lib, "none") == 0) {
            envs[v] = "VGPU_EXEC_BENCH=1"; /* same environment size class, no preload */
        } else if (asprintf(&envs[v], "LD_PRELOAD=%s", lib) < 0) {
            return 1;
        }
    }
    for (int i = 0; i < rounds; i++) {
        for (int v = 0; v < nv; v++) {
            char *envp[] = {envs[v], NULL};
            char *args[] = {prog, NULL};
            double start = now_us();
            pid_t pid = fork();
            if (pid == 0) {
                execve(prog, args, envp);
                _exit(127);
            }
            int status;
            struct rusage ru;
            if (pid < 0 || wait4(pid, &status, 0, &ru) != pid) {
                perror("fork/wait4");
                return 1;
            }
            wall[v * rounds + i] = now_us() - start;
            faults[v * rounds + i] = (double)ru.ru_minflt;
            if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
                fprintf(stderr, "%s with %s: status %d\n", prog, argv[3 + v], status);
                return 1;
            }
        }
    }
    for (int v = 0; v < nv; v++) {
        qsort(wall + v * rounds, rounds, sizeof(double), cmp);
        qsort(faults + v * rounds, rounds, sizeof(double), cmp);
        printf("variant=%d median_us=%.2f minflt=%.0f\n", v, wall[v * rounds + rounds / 2],
               faults[v * rounds + rounds / 2]);
    }
    return 0;
}
