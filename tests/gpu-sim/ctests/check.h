/*
 * Assertions shared by the C test programs: a failed one prints the location
 * (and, for EXPECT, the call and both codes) on stderr and exits 1.
 */
#ifndef GPU_SIM_CTESTS_CHECK_H
#define GPU_SIM_CTESTS_CHECK_H

#include <stdio.h>
#include <stdlib.h>

/* expr (a CUresult or nvmlReturn_t) must return exactly `expected`. */
#define EXPECT(expected, expr)                                                                 \
    do {                                                                                       \
        int r_ = (int)(expr);                                                                  \
        if (r_ != (int)(expected)) {                                                           \
            fprintf(stderr, "%s:%d: %s returned %d, expected %d\n", __FILE__, __LINE__, #expr, \
                    r_, (int)(expected));                                                      \
            exit(1);                                                                           \
        }                                                                                      \
    } while (0)
/* Success is 0 in both APIs. */
#define OK(expr) EXPECT(0, expr)
#define CHECK(cond)                                                                            \
    do {                                                                                       \
        if (!(cond)) {                                                                         \
            fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond);           \
            exit(1);                                                                           \
        }                                                                                      \
    } while (0)

#endif /* GPU_SIM_CTESTS_CHECK_H */
