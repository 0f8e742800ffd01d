/* Built without -lpthread and -ldl (tests/sim-node/src/containers.rs): what a process that loaded neither
 * file can reach of libvgpu.so. Before glibc 2.34 the limiter's imports from those files are NULL here
 * (limiter/src/infra/imports.rs): its dlsym must answer NULL, the driver must fail closed (no dlopen), and
 * a fork must work. From glibc 2.34 on, libc.so.6 has them all, and the answers are the usual ones.
 * Prints key=value lines; exits 0 unless something it can judge by itself went wrong. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <gnu/libc-version.h>
#include <stdio.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

int cuInit(unsigned flags);
int cuMemAlloc_v2(unsigned long long *ptr, size_t size);

static const char *ptr(void *p) {
    return p == NULL ? "null" : p == (void *)0x57ab ? "stub" : "set";
}

int main(void) {
    printf("glibc=%s\n", gnu_get_libc_version());
    printf("dlsym_printf=%s\n", ptr(dlsym(RTLD_DEFAULT, "printf")));
    printf("dlsym_cuInit=%s\n", ptr(dlsym(RTLD_DEFAULT, "cuInit")));
    int init = cuInit(0);
    printf("cuInit=%d\n", init);
    unsigned long long dptr = 0;
    printf("cuMemAlloc=%d\n", cuMemAlloc_v2(&dptr, 1 << 20));
    fflush(stdout);
    pid_t child = fork();
    if (child == 0) {
        /* The limiter's fork handler ran; the child's cuInit answer is its exit code (3 either way: no
         * driver, or a driver that, like NVIDIA's, does not survive a fork). */
        _exit(cuInit(0));
    }
    int status = 0;
    if (child < 0 || waitpid(child, &status, 0) != child) {
        perror("fork/waitpid");
        return 1;
    }
    printf("fork_child_cuInit=%d\n", WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status));
    return 0;
}
