//! The cross-process region lock: only for shrinking `proc_num` and ordering UUID writes. Nothing waits for
//! it long: slots are taken and reaped lock-free (see [`crate::Region::register_current_process`]), shrinking
//! only tries the lock, so a live holder that stopped (SIGSTOP, a debugger, a tenant writing a live PID here)
//! delays nobody's allocations.
//!
//! # Design: an owner word with dead-owner takeover
//!
//! The lock is the 8-byte `owner_pid` field (offset 16), which HAMi-core already uses for "PID of the lock
//! holder, 0 when free". Its value is `0` (free) or `pid | tag << 32`, where `tag` is the low 32 bits of the
//! holder's start time (`/proc/<pid>/stat` field 22), or 0 when that cannot be read.
//!
//! * acquire: `compare_exchange(0, me)`; on failure, if the owner is dead, `compare_exchange(owner, me)` takes
//!   the lock over (only one waiter wins); otherwise back off (spin, yield, then sleep up to 2 ms) until the
//!   timeout.
//! * release: `compare_exchange(me, 0)`.
//! * the owner is dead when `kill(pid, 0)` fails with `ESRCH`, when `/proc/<pid>/stat` shows a zombie (`Z`/`X`,
//!   killed but not yet reaped), or when the PID is alive but its start time does not match the tag (the PID
//!   was reused, possibly by the waiter itself).
//!
//! Why not HAMi-core's `sem_t`: a SIGKILL between its `owner_pid = 0` and `sem_post` leaves the semaphore taken
//! with no owner to blame (HAMi#2500, HAMi-core#86). Here the whole lock state is one word changed by single
//! atomic instructions, so a SIGKILL at any instant leaves either "free" or "held by a PID that will be found
//! dead". Why not a robust `pthread_mutex_t`: it needs 40 bytes and a glibc-specific layout, and its bytes would
//! have to be initialised once by whoever creates the file, including files HAMi-core created with a `sem_t`
//! there; the owner word needs neither. The cost is polling instead of a futex wait, which is fine for a lock
//! taken a few times per process lifetime. The monitor never reads these bytes. A HAMi-core process and ours
//! must not write the same region concurrently (their lock protocols differ); we still `sem_init` the two
//! semaphores when we create a file so that a HAMi-core process opening it later does not block.
//!
//! The lock is not reentrant. Critical sections are written so that every prefix leaves the region consistent
//! (fields first, then `pid`, then `proc_num`), because the holder may die anywhere in them.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Owner word of the calling process: its PID and start-time tag.
pub(crate) fn own_owner_word() -> u64 {
    let pid = std::process::id();
    let tag = start_time(pid as i32).map_or(0, |t| t as u32);
    owner_word(pid as i32, tag)
}

fn owner_word(pid: i32, tag: u32) -> u64 {
    u64::from(pid as u32) | (u64::from(tag) << 32)
}

/// The PID encoded in an owner word.
pub(crate) fn owner_pid(word: u64) -> i32 {
    word as u32 as i32
}

/// Start time of `pid` in clock ticks since boot, from `/proc/<pid>/stat`.
pub(crate) fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces and parentheses) start at field 3 (state).
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(22 - 3)?.parse().ok()
}

/// Whether the process `pid` (in our PID namespace) is gone or a zombie.
pub(crate) fn process_is_dead(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    // SAFETY: signal 0 only checks existence and permission; it delivers nothing.
    let rc = unsafe { libc::kill(pid, 0) };
    if rc != 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH) {
        return true;
    }
    is_zombie(pid)
}

fn is_zombie(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().next());
    matches!(state, Some("Z" | "X"))
}

/// Whether the process that took a slot as `pid` with start time `start` (0 = unknown) is gone: dead, a
/// zombie, or its PID now names a process that started at another time (the PID was reused).
pub(crate) fn slot_owner_is_dead(pid: i32, start: u64) -> bool {
    if process_is_dead(pid) {
        return true;
    }
    match start_time(pid) {
        Some(now) if start != 0 => now != start,
        _ => false,
    }
}

/// Whether the holder named by `word` can no longer release the lock.
fn owner_is_dead(word: u64) -> bool {
    let pid = owner_pid(word);
    if pid <= 0 {
        // Not a PID we wrote (e.g. HAMi-core's size_t PID with garbage, or a negative value): nobody can
        // release it.
        return true;
    }
    if process_is_dead(pid) {
        return true;
    }
    let tag = (word >> 32) as u32;
    match start_time(pid) {
        Some(start) if tag != 0 => start as u32 != tag,
        _ => false,
    }
}

/// Outcome of a successful acquisition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acquired {
    /// The lock was free.
    Free,
    /// The lock was held by a dead process (this PID) and was taken over.
    FromDeadOwner(i32),
}

/// Acquires the owner word for `me`, waiting at most `timeout` for a live holder.
/// On timeout returns the holder's PID.
pub(crate) fn acquire(word: &AtomicU64, me: u64, timeout: Duration) -> Result<Acquired, i32> {
    let start = Instant::now();
    let mut spins = 0u32;
    loop {
        let current = match word.compare_exchange(0, me, Ordering::Acquire, Ordering::Relaxed) {
            Ok(_) => return Ok(Acquired::Free),
            Err(current) => current,
        };
        spins += 1;
        if spins <= 64 {
            std::hint::spin_loop();
            continue;
        }
        if spins <= 80 {
            std::thread::yield_now();
            continue;
        }
        // Slow path: a holder that keeps the lock for more than a few microseconds may be dead.
        if current != me && owner_is_dead(current) {
            if word
                .compare_exchange(current, me, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                return Ok(Acquired::FromDeadOwner(owner_pid(current)));
            }
            continue;
        }
        if start.elapsed() >= timeout {
            return Err(owner_pid(current));
        }
        let sleep_us = u64::from((spins - 80).min(20)) * 100;
        std::thread::sleep(Duration::from_micros(sleep_us.max(50)));
    }
}

/// Releases the owner word if it is still ours.
pub(crate) fn release(word: &AtomicU64, me: u64) {
    let _ = word.compare_exchange(me, 0, Ordering::Release, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_start_time_is_readable_and_matches_tag() {
        let me = own_owner_word();
        assert_eq!(owner_pid(me), std::process::id() as i32);
        assert!(!owner_is_dead(me), "our own owner word must look alive");
    }

    #[test]
    fn reused_pid_with_other_start_time_is_dead() {
        let pid = std::process::id() as i32;
        let real = start_time(pid).expect("/proc/self/stat readable");
        let stale = owner_word(pid, (real as u32).wrapping_add(1));
        assert!(owner_is_dead(stale));
    }

    #[test]
    fn free_then_held_then_released() {
        let word = AtomicU64::new(0);
        let me = own_owner_word();
        assert_eq!(
            acquire(&word, me, Duration::from_millis(10)),
            Ok(Acquired::Free)
        );
        // A second acquisition by a live owner (ourselves) times out rather than deadlocking forever.
        assert_eq!(
            acquire(&word, me ^ (1 << 63), Duration::from_millis(20)),
            Err(owner_pid(me))
        );
        release(&word, me);
        assert_eq!(word.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn garbage_owner_is_taken_over() {
        let word = AtomicU64::new(u64::from(u32::MAX)); // PID -1
        let me = own_owner_word();
        assert_eq!(
            acquire(&word, me, Duration::from_millis(100)),
            Ok(Acquired::FromDeadOwner(-1))
        );
    }
}
