//! One-time initialisation and a spin lock that survive `fork()` at any moment and re-entry.
//!
//! # Why not `std::sync::Once`/`Mutex`/`OnceLock`
//!
//! This library runs inside every process of a container, and programs `fork()` whenever they
//! like — also while another thread is inside its first CUDA or NVML call, i.e. inside one of our
//! initialisations. The child is a copy with only the forking thread: a `Once` or `Mutex` that
//! another thread held at `fork` stays held for ever in the child, and so did the plain
//! "RUNNING" state words this module replaces (children of such forks spun for ever). A fork
//! handler cannot fix all of them: it is only registered by our own initialisation, which the fork
//! may interrupt before it gets there.
//!
//! Instead, the word that says "someone is initialising" holds **the kernel thread id of that
//! someone**. A waiter that finds the word held checks, with `tgkill(getpid(), tid, 0)`, whether
//! that thread exists in its own process: in a fork child it does not (the child's only thread has
//! a new tid, and the parent's threads are not the child's), so the waiter takes the work over and
//! does it again from the start. The same word detects **re-entry**: when the holder is the
//! calling thread itself (a driver or another interposer calling back into one of our hooks from
//! inside the initialisation), waiting would deadlock, so the caller is told and carries on
//! without the result (see each caller).
//!
//! Costs: nothing on the fast path (the "done" check is one atomic load, as before); `gettid`
//! once per claim; a `tgkill` probe only while actually waiting. Only atomics and raw syscalls:
//! safe in a fork child before anything else has run.

use std::sync::atomic::{AtomicI32, Ordering};

/// Not started (or abandoned: to be tried again).
const FREE: i32 = 0;
/// Finished.
const DONE: i32 = -1;

/// The calling thread's kernel thread id (`gettid`, via `syscall` so glibc 2.17 suffices).
pub(crate) fn current_tid() -> i32 {
    // SAFETY: gettid has no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) as i32 }
}

/// Whether thread `tid` belongs to this process. Only `ESRCH` means "no": any other answer
/// (success, `EPERM`, …) keeps the holder alive, so a doubt makes us wait, never steal.
fn thread_in_this_process(tid: i32) -> bool {
    // SAFETY: __errno_location returns this thread's errno slot; we restore what the
    // application had, since the probe is our business, not its.
    let errno = unsafe { libc::__errno_location() };
    // SAFETY: as above.
    let saved = unsafe { *errno };
    // SAFETY: getpid has no preconditions; tgkill with signal 0 only checks that the target
    // exists and may be signalled (no signal is sent).
    let rc = unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, 0) };
    // SAFETY: as above.
    let gone = rc != 0 && unsafe { *errno } == libc::ESRCH;
    // SAFETY: as above.
    unsafe { *errno = saved };
    !gone
}

/// Waits a little before looking again: spin, then yield, then sleep 100 µs (an initialisation
/// may take a while: NVML start-up, opening the region).
fn back_off(round: u32) {
    if round < 16 {
        std::hint::spin_loop();
    } else if round < 1024 {
        // SAFETY: sched_yield has no preconditions.
        unsafe { libc::sched_yield() };
    } else {
        let ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 100_000,
        };
        // SAFETY: valid timespec; a NULL remainder is allowed.
        unsafe { libc::nanosleep(&ts, std::ptr::null_mut()) };
    }
}

/// Takes the word `state` for the calling thread: `Ok(())` once it holds it, `Err(Busy::Done)` if
/// it reads [`DONE`] (only for [`InitOnce`]), `Err(Busy::Reentered)` if the caller holds it already.
fn acquire(state: &AtomicI32, done_is_final: bool) -> Result<i32, Busy> {
    let me = current_tid();
    let mut round = 0u32;
    loop {
        let held = state.load(Ordering::Acquire);
        if done_is_final && held == DONE {
            return Err(Busy::Done);
        }
        if held == me {
            return Err(Busy::Reentered);
        }
        // Free, or its holder does not exist in this process (a fork child, or — impossible in
        // practice — a thread that died holding it): take it. The probe runs on the first look
        // and then every 64 rounds, only while waiting.
        let takeable =
            held == FREE || (held > 0 && round.is_multiple_of(64) && !thread_in_this_process(held));
        if takeable
            && state
                .compare_exchange(held, me, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            return Ok(me);
        }
        if !takeable {
            back_off(round);
        }
        round = round.saturating_add(1);
    }
}

/// Why a claim did not give the caller the work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Busy {
    /// Someone finished it.
    Done,
    /// The calling thread is the one doing it (re-entry): waiting would never end.
    Reentered,
}

/// A one-time initialisation (see the module docs). `is_done` is the fast path.
#[derive(Debug)]
pub(crate) struct InitOnce {
    state: AtomicI32,
}

impl InitOnce {
    pub(crate) const fn new() -> Self {
        Self {
            state: AtomicI32::new(FREE),
        }
    }

    #[inline]
    pub(crate) fn is_done(&self) -> bool {
        self.state.load(Ordering::Acquire) == DONE
    }

    /// Waits until the work is done, or gives it to the caller: `Ok(Claim)` means "do it now and
    /// then call [`Claim::finish`] (or drop the claim to let a later call try again)".
    #[cold]
    pub(crate) fn claim(&self) -> Result<Claim<'_>, Busy> {
        acquire(&self.state, true).map(|_| Claim { once: self })
    }

    /// Back to "not started" without a claim (a fork handler, or tests).
    #[allow(dead_code)]
    pub(crate) fn reset(&self) {
        self.state.store(FREE, Ordering::Release);
    }
}

/// The right, and duty, to do an [`InitOnce`]'s work.
#[derive(Debug)]
#[must_use = "dropping a claim abandons the work; call finish() when done"]
pub(crate) struct Claim<'a> {
    once: &'a InitOnce,
}

impl Claim<'_> {
    /// Publishes the work as done (release: everything written before is visible to whoever sees
    /// it done).
    pub(crate) fn finish(self) {
        self.once.state.store(DONE, Ordering::Release);
        std::mem::forget(self);
    }
}

impl Drop for Claim<'_> {
    /// Not finished (a panic, or the work cannot be done yet): let a later call try again.
    fn drop(&mut self) {
        self.once.state.store(FREE, Ordering::Release);
    }
}

/// A lock for rare, short critical sections (context bookkeeping, graph allocations) whose holder
/// word is a thread id, so a fork child takes it over and a re-entering thread is told instead of
/// deadlocking.
#[derive(Debug)]
pub(crate) struct SpinLock {
    owner: AtomicI32,
}

impl SpinLock {
    pub(crate) const fn new() -> Self {
        Self {
            owner: AtomicI32::new(FREE),
        }
    }

    /// Takes the lock; `Err(Busy::Reentered)` if the calling thread already holds it.
    pub(crate) fn lock(&self) -> Result<SpinGuard<'_>, Busy> {
        acquire(&self.owner, false).map(|_| SpinGuard { lock: self })
    }

    /// Releases the lock whoever holds it (a fork handler: the holder may not exist in the child).
    pub(crate) fn force_unlock(&self) {
        self.owner.store(FREE, Ordering::Release);
    }
}

/// Held [`SpinLock`]; released on drop.
#[derive(Debug)]
pub(crate) struct SpinGuard<'a> {
    lock: &'a SpinLock,
}

impl Drop for SpinGuard<'_> {
    fn drop(&mut self) {
        self.lock.owner.store(FREE, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn once_runs_once_and_reports_reentry() {
        let once = InitOnce::new();
        let claim = once.claim().expect("first claim");
        assert_eq!(once.claim().err(), Some(Busy::Reentered), "same thread");
        claim.finish();
        assert!(once.is_done());
        assert_eq!(once.claim().err(), Some(Busy::Done));
    }

    #[test]
    fn a_dropped_claim_lets_the_next_caller_try_again() {
        let once = InitOnce::new();
        drop(once.claim().expect("claim"));
        assert!(!once.is_done());
        once.claim().expect("claimed again").finish();
        assert!(once.is_done());
    }

    #[test]
    fn a_holder_that_is_not_a_thread_of_this_process_is_taken_over() {
        // What a fork child sees: the word names a thread that is not ours. PID 1's tid is never
        // a thread of the test process.
        let once = InitOnce::new();
        once.state.store(1, Ordering::Release);
        once.claim().expect("taken over").finish();
        assert!(once.is_done());
        let lock = SpinLock::new();
        lock.owner.store(1, Ordering::Release);
        drop(lock.lock().expect("taken over"));
    }

    #[test]
    fn a_live_holder_is_waited_for() {
        let once = std::sync::Arc::new(InitOnce::new());
        let claim = once.claim().expect("claim");
        let other = std::sync::Arc::clone(&once);
        let waiter = std::thread::spawn(move || other.claim().err());
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!waiter.is_finished(), "must wait for the live holder");
        claim.finish();
        assert_eq!(waiter.join().ok().flatten(), Some(Busy::Done));
    }

    #[test]
    fn the_lock_excludes_and_reports_reentry() {
        let lock = SpinLock::new();
        let g = lock.lock().expect("lock");
        assert_eq!(lock.lock().err(), Some(Busy::Reentered));
        drop(g);
        drop(lock.lock().expect("free again"));
    }
}
