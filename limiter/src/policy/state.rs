//! Lazy, once-only initialisation, run by the first hook that needs it (never at load time):
//! log level, `CUDA_OVERSUBSCRIBE`, and the memory limits from the environment into
//! [`crate::policy::caps`]. (The shared region itself is opened later still, on the first use of a
//! capped device: see `budget.rs`. Fork-child resets are registered by each module at its own lazy
//! initialisation: see `infra/fork.rs`.)
//!
//! A plain atomic state machine instead of `OnceLock`/`pthread_once`: the winner initialises, the
//! others spin briefly; initialisation calls only `getenv` and `write(2)`, neither
//! of which re-enters a hook.

use crate::infra::config;
use crate::infra::log::{self, ERROR, log_at};
use crate::infra::sync::InitOnce;
use crate::policy::caps;
use std::sync::atomic::{AtomicBool, Ordering};

/// Fork- and re-entry-aware (see `crate::infra::sync`): a fork child whose parent was initialising
/// initialises afresh instead of waiting for a thread it does not have.
static STATE: InitOnce = InitOnce::new();

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
    caps::set_memory(&limits);
}
