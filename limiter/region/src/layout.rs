//! The byte layout of HAMi-core's shared-region file, v1.2 (mapped and written) and v0 (read only).
//!
//! The v1.2 structs mirror `src/multiprocess/multiprocess_memory_limit.h` of HAMi-core (commit `8f3a89c`)
//! field for field, including the C11 `_Atomic` qualifiers: a field HAMi-core declares `_Atomic uint64_t` is an
//! [`AtomicU64`] here, so a `&SharedRegion` into a `MAP_SHARED` mapping is sound to hold while other processes
//! write it (every byte we touch is either an atomic or inside an [`UnsafeCell`]). The fields HAMi-core left
//! plain (`limit`, `sm_limit`, `device_num`, versions, `priority`) are atomics here too: the bytes are the same
//! and a relaxed load compiles to the plain load HAMi-core does.
//!
//! Every offset and size is pinned by a compile-time assertion; the numbers are those of
//! `volcano-vectors.json` → `shared_region_layout_c` (v1.2) and `shared_region_layout_go_mirror.v0`.

use std::cell::UnsafeCell;
use std::mem::{align_of, offset_of, size_of};
use std::sync::atomic::{AtomicI32, AtomicU8, AtomicU32, AtomicU64};

/// `CUDA_DEVICE_MAX_COUNT`: device entries per region (limits, UUIDs, per-slot usage).
pub const CUDA_DEVICE_MAX_COUNT: usize = 16;
/// The same bound under the name the brief and the monitor use.
pub const MAX_DEVICES: usize = CUDA_DEVICE_MAX_COUNT;
/// `SHARED_REGION_MAX_PROCESS_NUM`: process slots per region.
pub const SHARED_REGION_MAX_PROCESS_NUM: usize = 1024;
/// The same bound under the name the brief uses.
pub const MAX_PIDS: usize = SHARED_REGION_MAX_PROCESS_NUM;
/// `MULTIPROCESS_SHARED_REGION_MAGIC_FLAG`, stored in `initialized_flag` once the region is initialised.
pub const MULTIPROCESS_SHARED_REGION_MAGIC_FLAG: i32 = 19_920_718;
/// `MAJOR_VERSION` HAMi-core writes (and the only one the monitor maps as v1).
pub const MAJOR_VERSION: u32 = 1;
/// `MINOR_VERSION` of the layout mirrored here.
pub const MINOR_VERSION: u32 = 2;
/// `FACTOR` (CUDA cores per thread slot in the SM token bucket; kept for the limiter).
pub const FACTOR: u64 = 32;
/// Length of one UUID slot (`typedef char uuid[96]`).
pub const UUID_LEN: usize = 96;
/// How many leading UUID bytes the monitors use as the `deviceuuid` label.
pub const UUID_LABEL_LEN: usize = 40;
/// `sizeof(sem_t)` on x86_64 and aarch64 glibc.
pub const SEM_T_SIZE: usize = 32;
/// Environment variable naming the region file (`MULTIPROCESS_SHARED_REGION_CACHE_ENV`).
pub const SHARED_CACHE_ENV: &str = "CUDA_DEVICE_MEMORY_SHARED_CACHE";
/// Region file used when [`SHARED_CACHE_ENV`] is unset (`MULTIPROCESS_SHARED_REGION_CACHE_DEFAULT`).
pub const SHARED_CACHE_DEFAULT: &str = "/tmp/cudevshr.cache";
/// Environment variable carrying the task priority (`CUDA_TASK_PRIORITY`; HAMi: 0 high, 1 low).
pub const TASK_PRIORITY_ENV: &str = "CUDA_TASK_PRIORITY";
/// Priority HAMi-core writes when [`TASK_PRIORITY_ENV`] is unset.
pub const DEFAULT_PRIORITY: i32 = 1;
/// `utilization_switch` written at initialisation (throttle on until the monitor says otherwise).
pub const INITIAL_UTILIZATION_SWITCH: i32 = 1;
/// `recent_kernel` written at initialisation and on every recorded launch.
pub const RECENT_KERNEL_ACTIVE: i32 = 2;

/// `sizeof(shared_region_t)` for v1.2: the bytes we map.
pub const REGION_SIZE: usize = 2_008_952;
/// Size of a region file as HAMi-core writes it (`lseek(sizeof)` + one byte). We write the same.
pub const REGION_FILE_SIZE: u64 = REGION_SIZE as u64 + 1;
/// `sizeof(shrreg_proc_slot_t)` for v1.2.
pub const PROC_SLOT_SIZE: usize = 1960;

/// `shrreg_proc_slot_t.status` of an exited (free) slot.
pub const SLOT_STATUS_EXITED: i32 = 0;
/// `shrreg_proc_slot_t.status` of a running process.
pub const SLOT_STATUS_RUNNING: i32 = 1;
/// `shrreg_proc_slot_t.status` of a process HAMi-core suspended (SIGUSR2).
pub const SLOT_STATUS_SUSPENDED: i32 = 2;

/// Bytes of one `sem_t`, 8-aligned like glibc's union. We never use it as a semaphore; see [`crate::lock`].
#[repr(C, align(8))]
pub struct SemBytes(pub UnsafeCell<[u8; SEM_T_SIZE]>);

impl std::fmt::Debug for SemBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SemBytes(..)")
    }
}

/// `device_memory_t`: one process's bytes on one device, by HAMi-core's categories.
#[repr(C)]
#[derive(Debug)]
pub struct DeviceMemory {
    /// Context memory (HAMi-core allocation type 0).
    pub context_size: AtomicU64,
    /// Module memory (type 1; HAMi-core never increments it).
    pub module_size: AtomicU64,
    /// Data allocations (type 2; the Go monitor calls it `bufferSize`).
    pub data_size: AtomicU64,
    /// `offset` (always 0 in HAMi-core; the monitor reports `total − ctx − module − data` as offset).
    pub offset: AtomicU64,
    /// Sum of all categories; what the limit is checked against.
    pub total: AtomicU64,
    /// Reserved in HAMi-core (never read or written there). We use word [`DEVICE_GRANT_WORD`] as the
    /// owner's grant on this device (see `Region::try_add_leased`).
    pub unused: [AtomicU64; 3],
}

/// Index in [`DeviceMemory::unused`] of the slot owner's **grant** on the device (byte offset 40 in the
/// device's `device_memory_t`): bytes of the cap it has reserved in advance, counted by every admission
/// check as the slot's usage when larger than `total`, so the owner can charge up to it without summing
/// the container. 0 = none. HAMi-core neither reads nor writes the word (a HAMi-core process in the same
/// container therefore does not count other processes' unused grants).
pub const DEVICE_GRANT_WORD: usize = 0;

/// `device_util_t`: NVML utilisation samples of one process on one device.
#[repr(C)]
#[derive(Debug)]
pub struct DeviceUtil {
    /// Decoder utilisation, percent.
    pub dec_util: AtomicU64,
    /// Encoder utilisation, percent.
    pub enc_util: AtomicU64,
    /// SM utilisation, percent.
    pub sm_util: AtomicU64,
    /// Reserved.
    pub unused: [AtomicU64; 3],
}

/// `shrreg_proc_slot_t` (v1.2): one process of the container.
#[repr(C)]
#[derive(Debug)]
pub struct ProcSlot {
    /// Container PID; 0 = free slot.
    pub pid: AtomicI32,
    /// Host PID as NVML reports it; 0 until known.
    pub hostpid: AtomicI32,
    /// Bytes per device (NVML index).
    pub used: [DeviceMemory; CUDA_DEVICE_MAX_COUNT],
    /// NVML-measured bytes per device (written by the utilisation watcher).
    pub monitorused: [AtomicU64; CUDA_DEVICE_MAX_COUNT],
    /// NVML utilisation per device.
    pub device_util: [DeviceUtil; CUDA_DEVICE_MAX_COUNT],
    /// [`SLOT_STATUS_EXITED`], [`SLOT_STATUS_RUNNING`] or [`SLOT_STATUS_SUSPENDED`]. Followed by 4 bytes padding.
    pub status: AtomicI32,
    /// Bumped before and after every usage update (odd while a write is in progress).
    pub seqlock: AtomicU64,
    /// Reserved in HAMi-core (never read or written there). We use word [`SLOT_REFUSED_WORD`] as the
    /// slot's "allocations refused" counter (monotonic while the slot is owned; zeroed with the slot's other
    /// counters when it is taken or freed) and word [`SLOT_START_TIME_WORD`] for the owner's start time.
    pub unused: [AtomicU64; 2],
}

/// Index in [`ProcSlot::unused`] of the per-process "allocations refused by the limiter" counter (byte
/// offset 1944 in the slot). HAMi-core leaves the word zero, so its processes read as 0 refusals. It also
/// counts allocations refused because the process's allocation table could not grow (the limiter's only
/// bound besides the cap, see `limiter/README.md`).
pub const SLOT_REFUSED_WORD: usize = 0;

/// Index in [`ProcSlot::unused`] of the slot owner's start time (byte offset 1952 in the slot): field 22 of
/// `/proc/<pid>/stat`, clock ticks since boot; 0 = unknown (a HAMi-core process, or `/proc` unreadable).
/// A slot whose PID is alive but whose start time differs belongs to a dead process whose PID was reused:
/// it is reaped like a dead one. HAMi-core never reads or writes this word.
pub const SLOT_START_TIME_WORD: usize = 1;

/// `shared_region_t` (v1.2): the whole mapped file.
#[repr(C)]
#[derive(Debug)]
pub struct SharedRegion {
    /// [`MULTIPROCESS_SHARED_REGION_MAGIC_FLAG`] once initialised.
    pub initialized_flag: AtomicI32,
    /// [`MAJOR_VERSION`].
    pub major_version: AtomicU32,
    /// [`MINOR_VERSION`].
    pub minor_version: AtomicU32,
    /// Set by the SM limiter once its token pools are initialised.
    pub sm_init_flag: AtomicI32,
    /// HAMi-core: `size_t` PID of the lock holder. Here: the owner word of our lock, see [`crate::lock`].
    pub owner_pid: AtomicU64,
    /// HAMi-core's process-shared semaphore (slot add/remove). Initialised for HAMi-core's sake, unused by us.
    pub sem: SemBytes,
    /// Number of devices described in `uuids`.
    pub device_num: AtomicU64,
    /// NUL-padded device UUIDs.
    pub uuids: [[AtomicU8; UUID_LEN]; CUDA_DEVICE_MAX_COUNT],
    /// Memory limit per device, bytes (0 = unlimited).
    pub limit: [AtomicU64; CUDA_DEVICE_MAX_COUNT],
    /// SM limit per device, percent.
    pub sm_limit: [AtomicU64; CUDA_DEVICE_MAX_COUNT],
    /// Process slots; only `procs[0..proc_num)` are meaningful.
    pub procs: [ProcSlot; SHARED_REGION_MAX_PROCESS_NUM],
    /// Number of slots in use (including freed holes below the last used slot).
    pub proc_num: AtomicI32,
    /// 1 = throttle SM use, 0 = run free; written by the monitor.
    pub utilization_switch: AtomicI32,
    /// Launch activity: the limiter stores 2 per launch, the monitor decrements it, −1 blocks launches.
    pub recent_kernel: AtomicI32,
    /// Task priority (0 high, 1 low).
    pub priority: AtomicI32,
    /// Unix seconds of the last kernel launch.
    pub last_kernel_time: AtomicU64,
    /// HAMi-core's semaphore serialising host-PID detection. Initialised for HAMi-core's sake, unused by us.
    pub sem_postinit: SemBytes,
}

// The atomic types must have the size and alignment of the C integers they stand for.
const _: () = assert!(size_of::<AtomicU64>() == 8 && align_of::<AtomicU64>() == 8);
const _: () = assert!(size_of::<AtomicI32>() == 4 && align_of::<AtomicI32>() == 4);
const _: () = assert!(size_of::<SemBytes>() == SEM_T_SIZE && align_of::<SemBytes>() == 8);

const _: () = assert!(size_of::<DeviceMemory>() == 64);
const _: () = assert!(offset_of!(DeviceMemory, context_size) == 0);
const _: () = assert!(offset_of!(DeviceMemory, module_size) == 8);
const _: () = assert!(offset_of!(DeviceMemory, data_size) == 16);
const _: () = assert!(offset_of!(DeviceMemory, offset) == 24);
const _: () = assert!(offset_of!(DeviceMemory, total) == 32);
const _: () = assert!(offset_of!(DeviceMemory, unused) == 40);

const _: () = assert!(size_of::<DeviceUtil>() == 48);
const _: () = assert!(offset_of!(DeviceUtil, dec_util) == 0);
const _: () = assert!(offset_of!(DeviceUtil, enc_util) == 8);
const _: () = assert!(offset_of!(DeviceUtil, sm_util) == 16);
const _: () = assert!(offset_of!(DeviceUtil, unused) == 24);

const _: () = assert!(size_of::<ProcSlot>() == PROC_SLOT_SIZE);
const _: () = assert!(offset_of!(ProcSlot, pid) == 0);
const _: () = assert!(offset_of!(ProcSlot, hostpid) == 4);
const _: () = assert!(offset_of!(ProcSlot, used) == 8);
const _: () = assert!(offset_of!(ProcSlot, monitorused) == 1032);
const _: () = assert!(offset_of!(ProcSlot, device_util) == 1160);
const _: () = assert!(offset_of!(ProcSlot, status) == 1928);
const _: () = assert!(offset_of!(ProcSlot, seqlock) == 1936);
const _: () = assert!(offset_of!(ProcSlot, unused) == 1944);

const _: () = assert!(size_of::<SharedRegion>() == REGION_SIZE);
const _: () = assert!(align_of::<SharedRegion>() == 8);
const _: () = assert!(offset_of!(SharedRegion, initialized_flag) == 0);
const _: () = assert!(offset_of!(SharedRegion, major_version) == 4);
const _: () = assert!(offset_of!(SharedRegion, minor_version) == 8);
const _: () = assert!(offset_of!(SharedRegion, sm_init_flag) == 12);
const _: () = assert!(offset_of!(SharedRegion, owner_pid) == 16);
const _: () = assert!(offset_of!(SharedRegion, sem) == 24);
const _: () = assert!(offset_of!(SharedRegion, device_num) == 56);
const _: () = assert!(offset_of!(SharedRegion, uuids) == 64);
const _: () = assert!(offset_of!(SharedRegion, limit) == 1600);
const _: () = assert!(offset_of!(SharedRegion, sm_limit) == 1728);
const _: () = assert!(offset_of!(SharedRegion, procs) == 1856);
const _: () = assert!(offset_of!(SharedRegion, proc_num) == 2_008_896);
const _: () = assert!(offset_of!(SharedRegion, utilization_switch) == 2_008_900);
const _: () = assert!(offset_of!(SharedRegion, recent_kernel) == 2_008_904);
const _: () = assert!(offset_of!(SharedRegion, priority) == 2_008_908);
const _: () = assert!(offset_of!(SharedRegion, last_kernel_time) == 2_008_912);
const _: () = assert!(offset_of!(SharedRegion, sem_postinit) == 2_008_920);

/// The v0 layout (HAMi-core before the version fields), as the monitors read it. Never mapped for writing
/// except the two monitor write-backs; the reader parses it from bytes, so plain integer types suffice.
pub mod v0 {
    use std::mem::{offset_of, size_of};

    use super::CUDA_DEVICE_MAX_COUNT;

    /// `sizeof(shared_region_t)` for v0.
    pub const REGION_SIZE: usize = 1_197_896;
    /// Size of a v0 file as HAMi-core wrote it; the monitors detect v0 by exactly this size.
    pub const REGION_FILE_SIZE: u64 = REGION_SIZE as u64 + 1;
    /// `sizeof(shrreg_proc_slot_t)` for v0.
    pub const PROC_SLOT_SIZE: usize = 1168;

    /// v0 `device_memory_t`: no reserved words.
    #[repr(C)]
    #[derive(Debug, Clone, Copy)]
    pub struct DeviceMemory {
        /// Context bytes.
        pub context_size: u64,
        /// Module bytes.
        pub module_size: u64,
        /// Data bytes.
        pub data_size: u64,
        /// Offset bytes.
        pub offset: u64,
        /// Total bytes.
        pub total: u64,
    }

    /// v0 `device_util_t`: no reserved words.
    #[repr(C)]
    #[derive(Debug, Clone, Copy)]
    pub struct DeviceUtil {
        /// Decoder utilisation.
        pub dec_util: u64,
        /// Encoder utilisation.
        pub enc_util: u64,
        /// SM utilisation.
        pub sm_util: u64,
    }

    /// v0 `shrreg_proc_slot_t`.
    #[repr(C)]
    #[derive(Debug, Clone, Copy)]
    pub struct ProcSlot {
        /// Container PID.
        pub pid: i32,
        /// Host PID.
        pub hostpid: i32,
        /// Bytes per device.
        pub used: [DeviceMemory; CUDA_DEVICE_MAX_COUNT],
        /// NVML-measured bytes per device.
        pub monitorused: [u64; CUDA_DEVICE_MAX_COUNT],
        /// Utilisation per device.
        pub device_util: [DeviceUtil; CUDA_DEVICE_MAX_COUNT],
        /// Slot status.
        pub status: i32,
    }

    /// v0 `shared_region_t`: no version words, a 4-byte owner PID.
    #[repr(C)]
    #[derive(Debug, Clone, Copy)]
    pub struct SharedRegion {
        /// Magic.
        pub initialized_flag: i32,
        /// SM init flag.
        pub sm_init_flag: i32,
        /// Lock owner (4 bytes in v0).
        pub owner_pid: u32,
        /// `sem_t`.
        pub sem: [u8; super::SEM_T_SIZE],
        /// Device count.
        pub num: u64,
        /// Device UUIDs.
        pub uuids: [[u8; super::UUID_LEN]; CUDA_DEVICE_MAX_COUNT],
        /// Memory limits.
        pub limit: [u64; CUDA_DEVICE_MAX_COUNT],
        /// SM limits.
        pub sm_limit: [u64; CUDA_DEVICE_MAX_COUNT],
        /// Process slots.
        pub procs: [ProcSlot; super::SHARED_REGION_MAX_PROCESS_NUM],
        /// Slots in use.
        pub proc_num: i32,
        /// Utilisation switch.
        pub utilization_switch: i32,
        /// Recent kernel.
        pub recent_kernel: i32,
        /// Priority.
        pub priority: i32,
    }

    const _: () = assert!(size_of::<DeviceMemory>() == 40);
    const _: () = assert!(size_of::<DeviceUtil>() == 24);
    const _: () = assert!(size_of::<ProcSlot>() == PROC_SLOT_SIZE);
    const _: () = assert!(offset_of!(ProcSlot, used) == 8);
    const _: () = assert!(offset_of!(ProcSlot, monitorused) == 648);
    const _: () = assert!(offset_of!(ProcSlot, device_util) == 776);
    const _: () = assert!(offset_of!(ProcSlot, status) == 1160);
    const _: () = assert!(size_of::<SharedRegion>() == REGION_SIZE);
    const _: () = assert!(offset_of!(SharedRegion, initialized_flag) == 0);
    const _: () = assert!(offset_of!(SharedRegion, sm_init_flag) == 4);
    const _: () = assert!(offset_of!(SharedRegion, owner_pid) == 8);
    const _: () = assert!(offset_of!(SharedRegion, sem) == 12);
    const _: () = assert!(offset_of!(SharedRegion, num) == 48);
    const _: () = assert!(offset_of!(SharedRegion, uuids) == 56);
    const _: () = assert!(offset_of!(SharedRegion, limit) == 1592);
    const _: () = assert!(offset_of!(SharedRegion, sm_limit) == 1720);
    const _: () = assert!(offset_of!(SharedRegion, procs) == 1848);
    const _: () = assert!(offset_of!(SharedRegion, proc_num) == 1_197_880);
    const _: () = assert!(offset_of!(SharedRegion, utilization_switch) == 1_197_884);
    const _: () = assert!(offset_of!(SharedRegion, recent_kernel) == 1_197_888);
    const _: () = assert!(offset_of!(SharedRegion, priority) == 1_197_892);
}
