/* dlsym(RTLD_NEXT, ...) twice (HAMi-core returns NULL the second time); prints where each
 * lookup landed (library + symbol, stable across runs despite ASLR) and the thread count. */
#define _GNU_SOURCE
#include <dirent.h>
#include <dlfcn.h>
#include <stdio.h>

static int threads(void)
{
    int n = 0;
    DIR *d = opendir("/proc/self/task");
    struct dirent *e;
    if (!d)
        return -1;
    while ((e = readdir(d)) != NULL)
        if (e->d_name[0] != '.')
            n++;
    closedir(d);
    return n;
}

static void where(const char *label, void *p)
{
    Dl_info info;
    if (p == NULL) {
        printf("%s: NULL\n", label);
    } else if (dladdr(p, &info) && info.dli_sname) {
        printf("%s: %s in %s\n", label, info.dli_sname, info.dli_fname);
    } else {
        printf("%s: unknown\n", label);
    }
}

int main(void)
{
    void *a = dlsym(RTLD_NEXT, "malloc");
    void *b = dlsym(RTLD_NEXT, "malloc");
    where("first", a);
    where("second", b);
    printf("same: %d\n", a == b);
    where("default free", dlsym(RTLD_DEFAULT, "free"));
    where("missing", dlsym(RTLD_DEFAULT, "no_such_symbol_xyz"));
    printf("threads: %d\n", threads());
    return 0;
}
