//! Lazy, once-only initialisation, run by the first hook that needs it (never at load time):
//! log level, limits from the environment into the budget, and the fork handler. (The shared
//! region itself is opened later still, on the first use of a capped device: see [`budget`].)
//!
//! A plain atomic state machine instead of `OnceLock`/`pthread_once`: the winner initialises, the
//! others spin briefly; initialisation calls only `getenv`, `write(2)` and `pthread_atfork`, none
//! of which re-enters a hook.

use crate::budget;
use crate::config;
use crate::log::{self, ERROR, log_at};
use crate::sync::InitOnce;
use std::ffi::c_int;
use std::sync::atomic::{AtomicBool, Ordering};

/// Fork- and re-entry-aware (see `crate::sync`): a fork child whose parent was initialising
/// initialises afresh instead of waiting for a thread it does not have.
static STATE: InitOnce = InitOnce::new();

unsafe extern "C" {
    // glibc: in libpthread before 2.28 (the linker script pulls it from libc_nonshared.a later).
    fn pthread_atfork(
        prepare: Option<unsafe extern "C" fn()>,
        parent: Option<unsafe extern "C" fn()>,
        child: Option<unsafe extern "C" fn()>,
    ) -> c_int;
}

/// Makes sure initialisation has happened; one atomic load once it has.
#[inline]
pub(crate) fn ensure() {
    if !STATE.is_done() {
        init_slow();
    }
}

#[cold]
fn init_slow() {
    // Err: done by another thread, or re-entered from inside `initialise` (nothing there calls a
    // hook, so only a bug could): never wait for ourselves.
    if let Ok(claim) = STATE.claim() {
        initialise();
        claim.finish();
    }
}

/// `CUDA_OVERSUBSCRIBE=true`: allocations the driver refuses for lack of physical memory fall
/// back to managed memory (set once in [`initialise`]).
pub(crate) static OVERSUBSCRIBE: AtomicBool = AtomicBool::new(false);

fn initialise() {
    log::set_level_from(config::getenv(c"LIBCUDA_LOG_LEVEL"));
    OVERSUBSCRIBE.store(
        config::oversubscribe_from(config::getenv(c"CUDA_OVERSUBSCRIBE")),
        Ordering::Relaxed,
    );
    let limits = config::limits_from(config::getenv, |name, value, err| {
        log_at!(
            ERROR,
            "{name}={:?} is not a memory size ({}); expected decimal bytes or a decimal number \
             with a g/m/k suffix, e.g. 2048m. Refusing all device memory on the affected devices.",
            String::from_utf8_lossy(value),
            err.describe()
        );
    });
    budget::shared().set_limits(&limits);
    // SAFETY: `after_fork_in_child` is a valid `extern "C" fn()` that only touches atomics.
    let rc = unsafe { pthread_atfork(None, None, Some(after_fork_in_child)) };
    if rc != 0 {
        log_at!(
            ERROR,
            "pthread_atfork failed ({rc}); forked children inherit usage"
        );
    }
}

/// Fork handler (child side): the child owns none of the parent's allocations. Atomics only.
unsafe extern "C" fn after_fork_in_child() {
    budget::reset_after_fork();
    crate::sm::reset_after_fork();
}
