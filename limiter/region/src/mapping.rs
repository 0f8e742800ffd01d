//! A `MAP_SHARED` mapping of exactly one layout's bytes, and the whole-file OFD lock used for initialisation.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;

/// `len` bytes of a file mapped read-write and shared, starting at offset 0. Unmapped on drop.
#[derive(Debug)]
pub(crate) struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory owned by this value; all access from safe code goes through
// atomics (`atomic_i32_at` or the atomic-typed layout structs), which are `Sync`.
unsafe impl Send for Mapping {}
// SAFETY: as above, shared references only hand out atomics.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps the first `len` bytes of `file` (which must be at least `len` long) read-write, shared.
    pub(crate) fn map(file: &File, len: usize) -> io::Result<Self> {
        // SAFETY: a fresh mapping (null hint) of a valid open fd; no existing memory is affected. The kernel
        // validates fd, length and protection and reports failure as MAP_FAILED.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr =
            NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(Self { ptr, len })
    }

    pub(crate) fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly what mmap returned, and no reference into the mapping outlives `self`
        // (every borrow handed out is tied to `&self`).
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

/// Takes (or releases) a whole-file open-file-description write lock, blocking.
///
/// OFD locks conflict with HAMi-core's `lockf` record lock on the same file, so a HAMi-core process and ours
/// never initialise one region at once; the kernel drops the lock when the holder dies (SIGKILL included), and,
/// unlike `lockf`, it is not released when some other descriptor of the file is closed.
pub(crate) fn ofd_lock(file: &File, lock: bool) -> io::Result<()> {
    // SAFETY: `flock` is a plain C struct for which all-zero is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = if lock { libc::F_WRLCK } else { libc::F_UNLCK } as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = 0;
    fl.l_len = 0; // to the end of the file, however it grows
    fl.l_pid = 0; // required for OFD locks
    loop {
        // SAFETY: valid fd and a pointer to an initialised `flock` that lives across the call.
        let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLKW, &fl) };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}
