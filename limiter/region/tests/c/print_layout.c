/* Prints "name value" for every size and offset of the HAMi-core v1.2 layout. */
#include <stdio.h>
#include "hami_core_v1_2.h"

#define R(f) printf("%s %zu\n", #f, offsetof(shared_region_t, f))
#define S(f) printf("slot.%s %zu\n", #f, offsetof(shrreg_proc_slot_t, f))
#define M(f) printf("mem.%s %zu\n", #f, offsetof(device_memory_t, f))
#define U(f) printf("util.%s %zu\n", #f, offsetof(device_util_t, f))

int main(void) {
    printf("sizeof_shared_region %zu\n", sizeof(shared_region_t));
    printf("sizeof_proc_slot %zu\n", sizeof(shrreg_proc_slot_t));
    printf("sizeof_device_memory %zu\n", sizeof(device_memory_t));
    printf("sizeof_device_util %zu\n", sizeof(device_util_t));
    printf("sizeof_sem_t %zu\n", sizeof(sem_t));
    printf("alignof_shared_region %zu\n", _Alignof(shared_region_t));
    R(initialized_flag); R(major_version); R(minor_version); R(sm_init_flag); R(owner_pid); R(sem);
    R(device_num); R(uuids); R(limit); R(sm_limit); R(procs); R(proc_num); R(utilization_switch);
    R(recent_kernel); R(priority); R(last_kernel_time); R(sem_postinit);
    S(pid); S(hostpid); S(used); S(monitorused); S(device_util); S(status); S(seqlock); S(unused);
    M(context_size); M(module_size); M(data_size); M(offset); M(total); M(unused);
    U(dec_util); U(enc_util); U(sm_util); U(unused);
    return 0;
}
