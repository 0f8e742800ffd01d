/* dlsym(<handle>, <name>) with handle default|self|next (RTLD_DEFAULT, dlopen(NULL), RTLD_NEXT),
 * then dlerror(), twice: prints "<name>: found|NULL" and "dlerror: <message>|(null)" each time.
 * Links no driver. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <string.h>

static void *handle_of(const char *h)
{
    if (strcmp(h, "next") == 0)
        return RTLD_NEXT;
    if (strcmp(h, "self") == 0)
        return dlopen(NULL, RTLD_NOW);
    return RTLD_DEFAULT;
}

static int lookup(const char *h, const char *name)
{
    void *handle = handle_of(h);
    void *p;
    const char *err;
    /* Twice: the second lookup finds libvgpu's caches warm (the driver already probed). */
    for (int i = 0; i < 2; i++) {
        dlerror(); /* clear */
        p = dlsym(handle, name);
        err = dlerror();
        printf("%s: %s\n", name, p ? "found" : "NULL");
        printf("dlerror: %s\n", err ? err : "(null)");
    }
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: dlerror default|self|next <name>\n");
        return 64;
    }
    return lookup(argv[1], argv[2]);
}
