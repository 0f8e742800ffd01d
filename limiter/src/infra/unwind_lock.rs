//! The unwinder's lock, defined here for the zig build (cfg `vgpu_zig_unwinder`, set by
//! `build.rs` when the linker is zig's, as in `limiter/build-portable.sh`).
//!
//! That build links zig's LLVM libunwind statically, and libunwind guards its FDE cache with a
//! `pthread_rwlock_t` (`pthread_rwlock_rdlock`/`wrlock`/`unlock`, called on every unwind, i.e.
//! every panic that `infra/guard.rs` contains) and names functions with `dladdr`. Those are
//! libpthread/libdl functions before glibc 2.34; since the library no longer needs those two
//! files (`limiter/elf-unneed`), as imports they would be NULL in a process that did not load them
//! (`infra/imports.rs`), and a contained panic would become a jump to address 0. So the link
//! gets them from here instead: hidden symbols (never exported, never interposing the process's
//! own), which only libunwind calls.
//!
//! * The lock: libunwind's one `pthread_rwlock_t` is a zero-initialised static private to this
//!   library; its first 4 bytes serve as a reader count, `u32::MAX` meaning a writer. Unwinds are
//!   rare (panics), so waiting is a yield loop.
//! * `dladdr` answers 0 ("not found"): libunwind then reports no procedure name, which only its
//!   own debug tracing asks for (Rust's backtraces symbolise with their own code).
//!
//! The build for the host's glibc links GCC's `libgcc_eh.a` instead, which uses neither; this
//! file is not compiled there.

use std::ffi::{c_int, c_void};
use std::sync::atomic::{AtomicU32, Ordering};

const WRITER: u32 = u32::MAX;

/// # Safety
/// `lock` points to a zero-initialised or previously used `pthread_rwlock_t` (at least 4 bytes,
/// 4-aligned) that is only ever used through these functions.
unsafe fn word<'a>(lock: *mut c_void) -> &'a AtomicU32 {
    // SAFETY: per the contract; `AtomicU32` has the layout of `u32`.
    unsafe { &*lock.cast::<AtomicU32>() }
}

unsafe extern "C" fn rdlock(lock: *mut c_void) -> c_int {
    // SAFETY: libunwind passes its own `pthread_rwlock_t`, used only through these functions.
    let w = unsafe { word(lock) };
    loop {
        let v = w.load(Ordering::Relaxed);
        if v < WRITER - 1
            && w.compare_exchange_weak(v, v + 1, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
        {
            return 0;
        }
        std::thread::yield_now();
    }
}

unsafe extern "C" fn wrlock(lock: *mut c_void) -> c_int {
    // SAFETY: as in `rdlock`.
    let w = unsafe { word(lock) };
    while w
        .compare_exchange_weak(0, WRITER, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        std::thread::yield_now();
    }
    0
}

unsafe extern "C" fn unlock(lock: *mut c_void) -> c_int {
    // SAFETY: as in `rdlock`.
    let w = unsafe { word(lock) };
    if w.load(Ordering::Relaxed) == WRITER {
        w.store(0, Ordering::Release);
    } else {
        w.fetch_sub(1, Ordering::Release);
    }
    0
}

unsafe extern "C" fn dladdr(_addr: *const c_void, _info: *mut c_void) -> c_int {
    0
}

/// The label of a hidden global function `name` (`%function`: the spelling both assemblers accept
/// on both architectures; `@` starts a comment on aarch64).
macro_rules! tail {
    ($name:literal) => {
        concat!(
            ".globl ",
            $name,
            "\n.hidden ",
            $name,
            "\n.type ",
            $name,
            ",%function\n",
            $name,
            ":\n"
        )
    };
}

// Hidden global definitions the static link binds libunwind's references to (an object's
// definition wins over the shared libc stub's), each a tail jump into the Rust function.
#[cfg(target_arch = "x86_64")]
std::arch::global_asm!(
    ".pushsection .text.vgpu_unwind_lock,\"ax\",@progbits",
    tail!("pthread_rwlock_rdlock"), "jmp {rd}",
    tail!("pthread_rwlock_wrlock"), "jmp {wr}",
    tail!("pthread_rwlock_unlock"), "jmp {un}",
    tail!("dladdr"), "jmp {da}",
    ".popsection",
    rd = sym rdlock,
    wr = sym wrlock,
    un = sym unlock,
    da = sym dladdr,
);

#[cfg(target_arch = "aarch64")]
std::arch::global_asm!(
    ".pushsection .text.vgpu_unwind_lock,\"ax\",%progbits",
    tail!("pthread_rwlock_rdlock"), "b {rd}",
    tail!("pthread_rwlock_wrlock"), "b {wr}",
    tail!("pthread_rwlock_unlock"), "b {un}",
    tail!("dladdr"), "b {da}",
    ".popsection",
    rd = sym rdlock,
    wr = sym wrlock,
    un = sym unlock,
    da = sym dladdr,
);
