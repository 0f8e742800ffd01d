//! Errors of the region writer and reader. Each variant names the file and what to do about it.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// Result alias of this crate.
pub type Result<T, E = RegionError> = std::result::Result<T, E>;

/// Why a region file could not be opened, mapped, locked or updated.
#[derive(Debug, thiserror::Error)]
pub enum RegionError {
    /// A system call on the file failed.
    #[error("{op} {path}")]
    Io {
        /// What we were doing (`open`, `mmap`, `lock`, …).
        op: &'static str,
        /// The region file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },

    /// The file is shorter than the layout and not empty (a truncated or foreign file).
    #[error(
        "{path} has {size} bytes, fewer than the {expected} of a HAMi-core v1.2 region; \
         it is truncated or not a region file: remove it and restart the container"
    )]
    Truncated {
        /// The region file.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// The layout size.
        expected: u64,
    },

    /// The file is longer than a region file; we never map more than the layout.
    #[error(
        "{path} has {size} bytes, more than the {expected} of a HAMi-core v1.2 region file; \
         it is not a region this library understands: remove it and restart the container"
    )]
    Oversized {
        /// The region file.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// The largest accepted size.
        expected: u64,
    },

    /// The first word is neither 0 (uninitialised) nor the HAMi-core magic.
    #[error(
        "{path} starts with {found:#x}, not the HAMi-core magic {expected:#x}; \
         it is not a region file: remove it or point CUDA_DEVICE_MEMORY_SHARED_CACHE elsewhere"
    )]
    BadMagic {
        /// The region file.
        path: PathBuf,
        /// The first 4 bytes as i32.
        found: i32,
        /// The magic.
        expected: i32,
    },

    /// The magic is right but the version is one whose layout we do not know.
    #[error(
        "{path} is a HAMi-core region of version {major}.{minor}; this library reads {supported}: \
         remove the file (it is recreated) or use a matching libvgpu"
    )]
    UnsupportedVersion {
        /// The region file.
        path: PathBuf,
        /// `major_version`.
        major: u32,
        /// `minor_version`.
        minor: u32,
        /// What is supported.
        supported: &'static str,
    },

    /// A counter in the file is outside what the layout allows (corruption).
    #[error("{path}: {field} is {value}, outside 0..={max}; the region is corrupt: remove it")]
    Corrupt {
        /// The region file.
        path: PathBuf,
        /// The field.
        field: &'static str,
        /// Its value.
        value: i64,
        /// The largest valid value.
        max: i64,
    },

    /// A device index at or beyond `CUDA_DEVICE_MAX_COUNT`.
    #[error("device index {device} is out of range: a region holds 16 devices (0..=15)")]
    DeviceOutOfRange {
        /// The index passed.
        device: usize,
    },

    /// More UUIDs than device entries.
    #[error("{count} device UUIDs given; a region holds at most 16")]
    TooManyDevices {
        /// How many were given.
        count: usize,
    },

    /// All 1024 process slots belong to live processes.
    #[error("{path}: all 1024 process slots are held by live processes; no slot for PID {pid}")]
    SlotsFull {
        /// The region file.
        path: PathBuf,
        /// Our PID.
        pid: i32,
    },

    /// An accounting call before [`crate::Region::register_current_process`].
    #[error("this process has no slot in {path}: call register_current_process first")]
    NotRegistered {
        /// The region file.
        path: PathBuf,
    },

    /// The region lock stayed with a live process for the whole timeout.
    #[error("{path}: the region lock is held by live PID {owner_pid} for more than {waited:?}")]
    LockTimeout {
        /// The region file.
        path: PathBuf,
        /// PID of the holder.
        owner_pid: i32,
        /// How long we waited.
        waited: Duration,
    },

    /// The region path is a symbolic link. Region files are opened with `O_NOFOLLOW`: anybody who can write
    /// the directory could otherwise point the (often root) CUDA process at any file.
    #[error(
        "{path} is a symbolic link; a region file is never opened through a link: remove the link \
         (the next CUDA process recreates the region) or point CUDA_DEVICE_MEMORY_SHARED_CACHE at a real file"
    )]
    Symlink {
        /// The region file.
        path: PathBuf,
    },

    /// The region path names something other than a regular file with one link.
    #[error(
        "{path} is {found}, expected a regular file with one link: remove it \
         (the next CUDA process recreates the region)"
    )]
    NotRegularFile {
        /// The region file.
        path: PathBuf,
        /// What it is (`a directory`, `a FIFO`, `a regular file with 2 links`, ...).
        found: String,
    },

    /// The directory of the region file could let another user replace the file under us.
    #[error(
        "{dir} has mode {mode:04o} and owner uid {owner}; the directory of a region file must belong to \
         root or to uid {euid} and must not be writable by group or others without the sticky bit \
         (e.g. 0755, or 1777 like /tmp): fix the directory or point CUDA_DEVICE_MEMORY_SHARED_CACHE elsewhere"
    )]
    UnsafeDirectory {
        /// The directory.
        dir: PathBuf,
        /// Its permission bits.
        mode: u32,
        /// Its owner.
        owner: u32,
        /// Our effective uid.
        euid: u32,
    },

    /// A write-back on a reader opened without write access.
    #[error("{path} was opened read-only; use RegionReader::open_writable for monitor write-backs")]
    ReadOnly {
        /// The region file.
        path: PathBuf,
    },
}

impl RegionError {
    pub(crate) fn io(op: &'static str, path: &std::path::Path, source: io::Error) -> Self {
        Self::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }
}
