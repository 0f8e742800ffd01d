//! Fork-child resets: each module that keeps per-process state a `fork()` child must not inherit
//! (its allocations, its slot, its locks, its watcher thread) registers its own reset here, at its
//! own lazy initialisation, with a [`ChildReset`]. The first registration installs one fork
//! child handler, which runs every registered reset in registration order. So
//! nothing happens at load time, nobody reaches into another module to reset it, and a process that
//! never initialises anything registers nothing.
//!
//! Only atomics: registering takes no lock (a fixed array of pointers, claimed by `fetch_add`),
//! and the child handler only loads them. A reset must itself touch only atomics (the child may
//! have been forked while any other thread was anywhere).

use crate::infra::log::{ERROR, log_at};
use std::ffi::{c_int, c_void};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};

/// Room for every module's reset (five modules register one today).
const CAPACITY: usize = 8;

/// Registered resets, in registration order.
struct Registry {
    resets: [AtomicPtr<ChildReset>; CAPACITY],
    len: AtomicUsize,
}

impl Registry {
    const fn new() -> Self {
        Self {
            resets: [const { AtomicPtr::new(std::ptr::null_mut()) }; CAPACITY],
            len: AtomicUsize::new(0),
        }
    }

    /// Appends `r`; `false` when full.
    fn push(&self, r: &'static ChildReset) -> bool {
        let i = self.len.fetch_add(1, Ordering::AcqRel);
        let Some(slot) = self.resets.get(i) else {
            return false;
        };
        slot.store(std::ptr::from_ref(r).cast_mut(), Ordering::Release);
        true
    }

    /// Runs every reset pushed so far (one not yet fully pushed by a racing thread is skipped).
    fn run(&self) {
        let n = self.len.load(Ordering::Acquire).min(CAPACITY);
        for slot in &self.resets[..n] {
            // SAFETY: non-null pointers are `&'static ChildReset`s stored by `push`.
            if let Some(r) = unsafe { slot.load(Ordering::Acquire).as_ref() } {
                (r.reset)();
            }
        }
    }
}

static REGISTRY: Registry = Registry::new();
static HANDLER_INSTALLED: AtomicBool = AtomicBool::new(false);

unsafe extern "C" {
    /// What `pthread_atfork` is in glibc: `libc_nonshared.a`'s `pthread_atfork` only calls this
    /// with the caller's `__dso_handle`. Unlike `pthread_atfork` (in `libpthread.so.0` before
    /// glibc 2.28, where the glibc-2.17 build imports it from), it is in `libc.so.6` in every
    /// glibc (`GLIBC_2.3.2` on x86_64, `GLIBC_2.17` on aarch64), so it is never a NULL weak import
    /// (`infra/imports.rs`). A NULL `dso_handle` means "never unregistered": this library is
    /// never unloaded (it is preloaded, and the driver handles are `RTLD_NODELETE`).
    fn __register_atfork(
        prepare: Option<unsafe extern "C" fn()>,
        parent: Option<unsafe extern "C" fn()>,
        child: Option<unsafe extern "C" fn()>,
        dso_handle: *mut c_void,
    ) -> c_int;
}

/// One module's fork-child reset; a `static` of that module, registered by
/// [`ChildReset::register`] (idempotent, one atomic load once done).
#[derive(Debug)]
pub(crate) struct ChildReset {
    reset: fn(),
    registered: AtomicBool,
}

impl ChildReset {
    /// `reset` runs in every child forked after the registration; atomics only.
    pub(crate) const fn new(reset: fn()) -> Self {
        Self {
            reset,
            registered: AtomicBool::new(false),
        }
    }

    /// Makes sure the reset runs in forked children from now on.
    #[inline]
    pub(crate) fn register(&'static self) {
        if !self.registered.load(Ordering::Acquire) {
            self.register_slow();
        }
    }

    #[cold]
    fn register_slow(&'static self) {
        if self.registered.swap(true, Ordering::AcqRel) {
            return;
        }
        install_handler();
        if !REGISTRY.push(self) {
            // Only if CAPACITY fell behind the number of modules registering.
            log_at!(
                ERROR,
                "too many fork handlers; forked children inherit state"
            );
        }
    }
}

/// Installs the child handler once per process (a forked child inherits it).
fn install_handler() {
    if HANDLER_INSTALLED.swap(true, Ordering::AcqRel) {
        return;
    }
    // SAFETY: `after_fork_in_child` is a valid `extern "C" fn()` that only touches atomics; a
    // NULL `dso_handle` is allowed (the handler is then never unregistered).
    let rc =
        unsafe { __register_atfork(None, None, Some(after_fork_in_child), std::ptr::null_mut()) };
    if rc != 0 {
        log_at!(
            ERROR,
            "__register_atfork failed ({rc}); forked children inherit usage"
        );
    }
}

/// The child side of `fork()`: every registered reset, in registration order. Atomics only.
unsafe extern "C" fn after_fork_in_child() {
    REGISTRY.run();
}

#[cfg(test)]
mod tests {
    use super::*;

    static ORDER: AtomicUsize = AtomicUsize::new(0);
    fn first() {
        let _ = ORDER.compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire);
    }
    fn second() {
        let _ = ORDER.compare_exchange(1, 2, Ordering::AcqRel, Ordering::Acquire);
    }
    static FIRST: ChildReset = ChildReset::new(first);
    static SECOND: ChildReset = ChildReset::new(second);

    #[test]
    fn resets_run_in_registration_order_and_a_full_registry_says_so() {
        let registry = Registry::new();
        assert!(registry.push(&FIRST));
        assert!(registry.push(&SECOND));
        registry.run();
        assert_eq!(
            ORDER.load(Ordering::Acquire),
            2,
            "both ran, first before second"
        );
        for _ in 2..CAPACITY {
            assert!(registry.push(&FIRST));
        }
        assert!(!registry.push(&FIRST), "full");
    }

    static NOOP: ChildReset = ChildReset::new(|| {});

    #[test]
    fn registering_twice_registers_once_and_installs_the_handler() {
        NOOP.register();
        NOOP.register();
        assert!(HANDLER_INSTALLED.load(Ordering::Acquire));
        let n = REGISTRY.len.load(Ordering::Acquire).min(CAPACITY);
        let mine = REGISTRY.resets[..n]
            .iter()
            .filter(|p| std::ptr::eq(p.load(Ordering::Acquire), &NOOP))
            .count();
        assert_eq!(mine, 1);
    }
}
