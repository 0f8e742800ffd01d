//! What every export runs inside: panics never cross the C ABI, and a hook entered again on the
//! same thread goes straight to the real function.
//!
//! **Panics.** The code is written not to panic (no indexing without bounds, no `unwrap`); this is
//! the backstop. `catch_unwind` costs nothing on the non-panicking path, so it wraps every export's
//! body. The launch exports' fast path (`hooks/exports.rs`) runs before it: atomic loads and one
//! relaxed store, which cannot panic, then a jump to the real function (inside a `catch_unwind` it
//! could not be a jump, and `cuLaunchKernel`'s five stack arguments would be pushed again). (Even
//! without it, Rust aborts instead of unwinding out of an `extern "C"` function; catching lets the
//! application get an error code instead.)
//!
//! **Re-entry.** A driver, or another interposer stacked on ours, may call one of our exports from
//! inside the real function we are calling — while this thread holds a lock or an initialisation
//! claim of ours. Running our body again there could wait for ourselves for ever (or charge one
//! allocation twice). So a thread-local flag marks "this thread is inside a hook", and a nested
//! call is forwarded untouched to the real function: what the caller asked for, from the driver.
//! The flag is a zero-initialised `Cell<bool>` without a destructor, so it needs no lazy
//! registration and cannot fail during thread teardown; one TLS access per call, without a call
//! to `__tls_get_addr` on x86_64 Linux (see `flag`; measured, see the README's Benchmark section). The launch hooks do not take it: they hold no lock across the
//! driver call, and their slow paths use [`crate::infra::sync`], which detects re-entry by itself.

use std::panic::{AssertUnwindSafe, catch_unwind};

#[inline(always)]
pub(crate) fn ffi<R>(on_panic: R, body: impl FnOnce() -> R) -> R {
    catch_unwind(AssertUnwindSafe(body)).unwrap_or(on_panic)
}

/// The flag "this thread is inside one of our hooks".
///
/// On x86_64 Linux it is a one-byte thread-local of the initial-exec TLS model, defined in
/// assembly: its address is the thread pointer (`%fs:0`) plus an offset the dynamic linker puts in
/// the GOT once, so a lookup is two instructions instead of a call to `__tls_get_addr` (a `cdylib`
/// gets the general-dynamic model for `thread_local!`, and stable Rust cannot choose another).
/// The library is loaded with the program (`LD_PRELOAD`, or linked), where static TLS is always
/// available; loaded later by `dlopen`, the library takes its one byte from glibc's static TLS
/// reserve for such libraries (tunable `glibc.rtld.optional_static_tls`). `.tbss` is zero-filled
/// for every thread (`false`), needs no registration or destructor, so it cannot fail during
/// thread teardown either.
/// Elsewhere, a `const`-initialised `thread_local!`.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod flag {
    use std::cell::Cell;

    // Global but hidden: the function reading it may be inlined into another codegen unit.
    std::arch::global_asm!(
        ".section .tbss.vgpu_in_hook,\"awT\",@nobits",
        ".globl __vgpu_in_hook",
        ".hidden __vgpu_in_hook",
        ".type __vgpu_in_hook, @object",
        ".size __vgpu_in_hook, 1",
        "__vgpu_in_hook:",
        ".zero 1",
        ".text",
    );

    /// This thread's flag.
    #[inline(always)]
    pub(super) fn get() -> *const Cell<bool> {
        let p: *const Cell<bool>;
        // SAFETY: reads the GOT entry of a TLS offset (initial-exec) and adds the thread pointer
        // (`%fs:0` holds its own address on x86_64 Linux): the address of this thread's byte.
        // Nothing is written; the result is the same for the whole life of the thread.
        unsafe {
            std::arch::asm!(
                "mov {p}, qword ptr [rip + __vgpu_in_hook@GOTTPOFF]",
                "add {p}, qword ptr fs:[0]",
                p = out(reg) p,
                options(pure, readonly, nostack, preserves_flags),
            );
        }
        p
    }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
mod flag {
    use std::cell::Cell;

    thread_local! {
        /// This thread is inside one of our hooks.
        static IN_HOOK: Cell<bool> = const { Cell::new(false) };
    }

    /// This thread's flag (one TLS lookup, a tiny closure that inlines).
    #[inline(always)]
    pub(super) fn get() -> *const Cell<bool> {
        IN_HOOK.with(std::ptr::from_ref)
    }
}

/// Runs `body` (panic-guarded) unless this thread is already inside a hook; then runs `nested`,
/// which calls the real function with the caller's arguments.
#[inline(always)]
pub(crate) fn hook<R>(on_panic: R, body: impl FnOnce() -> R, nested: impl FnOnce() -> R) -> R {
    // Only the flag's address (one TLS access); the hook's body outside any closure call.
    let inside = flag::get();
    // SAFETY: this thread's own thread-local, which lives as long as the thread we are running
    // on; `Cell` is only ever used from this thread.
    let inside = unsafe { &*inside };
    if inside.replace(true) {
        return nested();
    }
    // `ffi` catches any panic, so the flag is always cleared.
    let r = ffi(on_panic, body);
    inside.set(false);
    r
}

/// Whether this thread is inside one of our hooks (tests and diagnostics).
#[cfg(test)]
pub(crate) fn inside_hook() -> bool {
    // SAFETY: as in `hook`.
    unsafe { &*flag::get() }.get()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nested_call_takes_the_real_path_and_the_flag_is_cleared() {
        let outer = hook(
            0,
            || {
                assert!(inside_hook());
                hook(0, || 1, || 2)
            },
            || 3,
        );
        assert_eq!(outer, 2, "the nested call must take the real path");
        assert!(!inside_hook());
        assert_eq!(hook(0, || 1, || 2), 1, "a later call runs the body again");
    }

    #[test]
    fn a_panicking_body_clears_the_flag() {
        let r = hook(7, || panic!("bug"), || 2);
        assert_eq!(r, 7);
        assert!(!inside_hook());
    }
}
