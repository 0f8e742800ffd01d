//! Where things are inside the container: the paths the hand-off mounts and the limiter reads. They are part
//! of the contract with HAMi-core's `libvgpu.so` (docs/hami-core-region.md) and with the DaemonSet
//! (`volcano-config/`), so they change only together with both.

/// Where the container sees HAMi-core.
pub const CONTAINER_LIBVGPU: &str = "/usr/local/vgpu/libvgpu.so";
/// Where the container's per-container cache directory is mounted.
pub const CONTAINER_CACHE_DIR: &str = "/tmp/vgpu";
/// Where HAMi-core takes its cross-container lock (`/tmp/vgpulock/lock`).
pub const CONTAINER_LOCK_DIR: &str = "/tmp/vgpulock";
/// The preload file that injects `libvgpu.so` into every process of the container.
pub const CONTAINER_LD_SO_PRELOAD: &str = "/etc/ld.so.preload";
/// Where the NVIDIA runtime looks for the mount-based device list (`volume-mounts`).
pub const VOLUME_MOUNTS_ROOT: &str = "/var/run/nvidia-container-devices";
