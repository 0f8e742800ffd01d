/* A non-threaded C tool that links neither libpthread nor libdl (tests/sim-node/src/containers.rs):
 * with libvgpu.so in /etc/ld.so.preload it must start, print and exit 0 on every glibc. */
#include <stdio.h>

int main(void) {
    puts("plain ok");
    return 0;
}
