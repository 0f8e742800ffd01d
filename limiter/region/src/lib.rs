//! HAMi-core's per-container "shared region" file, byte for byte (layout v1.2, and v0 for reading).
//!
//! The limiter (`libvgpu.so`) and HAMi-core processes write one region per container; HAMi's and Volcano's
//! monitors, and our metrics, read it. This crate owns that file:
//!
//! * [`layout`]: `#[repr(C)]` mirrors of `shared_region_t`, `shrreg_proc_slot_t`, `device_memory_t`,
//!   `device_util_t` with every offset pinned at compile time, the constants, and the v0 layout.
//! * [`Region`]: open-or-create and map a region the way HAMi-core does, register the process into a slot,
//!   account bytes per device and kind lock-free, record kernel launches, reap dead processes' slots. The
//!   cross-process lock is described in [`lock`].
//! * [`reader`]: a `pread`-based snapshot of v0/v1 files for metrics, and the monitor's `pread`/`pwrite`
//!   feedback: `priority`, `recent_kernel` and `utilization_switch`.
//!
//! Start at [`Region::open_or_create`] (limiter side) or [`RegionReader::open`] (metrics side).
//! Linux only: the file layout is x86_64/aarch64 glibc's.

pub mod error;
pub mod layout;
pub mod lock;
mod mapping;
pub mod reader;
mod region;

pub use error::{RegionError, Result};
pub use lock::Acquired;
pub use reader::{
    DeviceUsage, FeedbackFields, LayoutVersion, ProcessUsage, RegionReader, RegionSnapshot,
};
pub use region::{
    DEFAULT_LOCK_TIMEOUT, LaunchGate, LimitMismatch, MemoryKind, OpenReport, Region, RegionConfig,
    RegionLock, grant_slack, region_path_from_env,
};
