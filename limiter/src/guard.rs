//! What every export runs inside: panics never cross the C ABI, and a hook entered again on the
//! same thread goes straight to the real function.
//!
//! **Panics.** The code is written not to panic (no indexing without bounds, no `unwrap`); this is
//! the backstop. `catch_unwind` costs nothing on the non-panicking path, so it wraps every export,
//! including `cuLaunchKernel`. (Even without it, Rust aborts instead of unwinding out of an
//! `extern "C"` function; catching lets the application get an error code instead.)
//!
//! **Re-entry.** A driver, or another interposer stacked on ours, may call one of our exports from
//! inside the real function we are calling — while this thread holds a lock or an initialisation
//! claim of ours. Running our body again there could wait for ourselves for ever (or charge one
//! allocation twice). So a thread-local flag marks "this thread is inside a hook", and a nested
//! call is forwarded untouched to the real function: what the caller asked for, from the driver.
//! The flag is a `const`-initialised `Cell<bool>` without a destructor, so it needs no lazy
//! registration and cannot fail during thread teardown; one TLS lookup per call (measured, see
//! the README's Benchmark section). The launch hooks do not take it: they hold no lock across the
//! driver call, and their slow paths use [`crate::sync`], which detects re-entry by itself.

use std::cell::Cell;
use std::panic::{AssertUnwindSafe, catch_unwind};

#[inline(always)]
pub(crate) fn ffi<R>(on_panic: R, body: impl FnOnce() -> R) -> R {
    catch_unwind(AssertUnwindSafe(body)).unwrap_or(on_panic)
}

thread_local! {
    /// This thread is inside one of our hooks.
    static IN_HOOK: Cell<bool> = const { Cell::new(false) };
}

/// Runs `body` (panic-guarded) unless this thread is already inside a hook; then runs `nested`,
/// which calls the real function with the caller's arguments.
#[inline(always)]
pub(crate) fn hook<R>(on_panic: R, body: impl FnOnce() -> R, nested: impl FnOnce() -> R) -> R {
    // Only the address inside `with` (one TLS lookup, a tiny closure that inlines); the hook's
    // body outside it, so the body is not moved into a closure call per hook.
    let inside: *const Cell<bool> = IN_HOOK.with(std::ptr::from_ref);
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
    IN_HOOK.with(Cell::get)
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
