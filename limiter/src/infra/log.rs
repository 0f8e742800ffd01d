//! Diagnostics on stderr, HAMi-core's way: `LIBCUDA_LOG_LEVEL` (default 2) — errors always,
//! ≥2 warnings, ≥3 info, ≥4 debug.
//!
//! Messages are formatted into a stack buffer and written with one `write(2)`: no allocation, no
//! locks, usable from any hook. Nothing is ever printed before the first CUDA/NVML call.
//!
//! **Refusals** (an allocation or context refused at the cap: the cap doing its job, decided by
//! the tenant's own requests) go through [`log_refusal!`]: a warning, so `LIBCUDA_LOG_LEVEL` 0 or
//! 1 silences them as HAMi-core's levels silence its warnings, and at most **one line per second
//! per process**, the next line saying how many were left out. A program that retries a refused
//! allocation in a loop once printed 677 MB of stderr; the exact count is in the region's
//! refused counter (and the agent's metrics) anyway.

use std::fmt::{self, Write as _};
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};

pub(crate) const ERROR: i32 = 0;
pub(crate) const WARN: i32 = 2;
pub(crate) const INFO: i32 = 3;
pub(crate) const DEBUG: i32 = 4;

static LEVEL: AtomicI32 = AtomicI32::new(WARN);

/// Sets the level from `LIBCUDA_LOG_LEVEL` (`atoi` semantics: garbage reads as 0).
pub(crate) fn set_level_from(value: Option<&[u8]>) {
    if let Some(v) = value {
        LEVEL.store(atoi(v), Ordering::Relaxed);
    }
}

#[inline]
pub(crate) fn enabled(level: i32) -> bool {
    level == ERROR || LEVEL.load(Ordering::Relaxed) >= level
}

/// C `atoi`: optional whitespace and sign, then digits; stops at the first non-digit.
pub(crate) fn atoi(v: &[u8]) -> i32 {
    let mut i = 0;
    while i < v.len() && v[i].is_ascii_whitespace() {
        i += 1;
    }
    let negative = i < v.len() && v[i] == b'-';
    if i < v.len() && (v[i] == b'-' || v[i] == b'+') {
        i += 1;
    }
    let mut n: i64 = 0;
    while i < v.len() && v[i].is_ascii_digit() {
        n = (n * 10 + i64::from(v[i] - b'0')).min(i64::from(i32::MAX));
        i += 1;
    }
    let n = if negative { -n } else { n };
    i32::try_from(n).unwrap_or(0)
}

/// A fixed buffer that silently truncates.
struct Line {
    buf: [u8; 512],
    len: usize,
}

impl fmt::Write for Line {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let room = self.buf.len() - 1 - self.len; // keep one byte for '\n'
        let n = s.len().min(room);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

pub(crate) fn emit(level: i32, args: fmt::Arguments<'_>) {
    if !enabled(level) {
        return;
    }
    let tag = match level {
        ERROR => "ERROR",
        WARN => "WARN",
        INFO => "INFO",
        _ => "DEBUG",
    };
    let mut line = Line {
        buf: [0; 512],
        len: 0,
    };
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    let _ = write!(line, "[vgpu-limiter {tag}({pid})]: ");
    let _ = line.write_fmt(args);
    line.buf[line.len] = b'\n';
    line.len += 1;
    // SAFETY: the pointer and length describe initialised bytes of `line.buf`. A short or failed
    // write to stderr is deliberately ignored: diagnostics must never fail a CUDA call.
    let _ = unsafe { libc::write(2, line.buf.as_ptr().cast(), line.len) };
}

/// Logs at `level`; the arguments are only formatted (and evaluated) when the level is enabled,
/// so a disabled per-allocation debug line costs one atomic load.
macro_rules! log_at {
    ($level:expr, $($arg:tt)*) => {{
        let level = $level;
        if $crate::infra::log::enabled(level) {
            $crate::infra::log::emit(level, format_args!($($arg)*))
        }
    }};
}
pub(crate) use log_at;

/// When the last refusal line was written (`CLOCK_MONOTONIC_COARSE` ns; 0 = never).
static LAST_REFUSAL_NS: AtomicU64 = AtomicU64::new(0);
/// Refusals not written since the last line.
static SUPPRESSED: AtomicU64 = AtomicU64::new(0);
/// The least time between two refusal lines.
const REFUSAL_INTERVAL_NS: u64 = 1_000_000_000;

fn monotonic_coarse_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer; the coarse clock exists on every Linux since 2.6.32 (vDSO).
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    (ts.tv_sec.max(0) as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec.max(0) as u64)
        .max(1) // 0 means "never"
}

/// Whether a refusal seen at `now` (ns) may be written: at most one per [`REFUSAL_INTERVAL_NS`];
/// `Some(n)` with the number left out since the last line, `None` when this one is left out.
/// Lock-free: one thread wins the window with a compare-exchange, the others count themselves.
fn refusal_window(now: u64) -> Option<u64> {
    let last = LAST_REFUSAL_NS.load(Ordering::Relaxed);
    if (last == 0 || now.saturating_sub(last) >= REFUSAL_INTERVAL_NS)
        && LAST_REFUSAL_NS
            .compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
    {
        return Some(SUPPRESSED.swap(0, Ordering::AcqRel));
    }
    SUPPRESSED.fetch_add(1, Ordering::Relaxed);
    None
}

/// Writes one refusal line if the rate allows (see the module docs); call through
/// [`log_refusal!`], which checks the level first.
pub(crate) fn refusal(args: fmt::Arguments<'_>) {
    let Some(left_out) = refusal_window(monotonic_coarse_ns()) else {
        return;
    };
    if left_out == 0 {
        emit(WARN, args);
    } else {
        emit(
            WARN,
            format_args!(
                "{args} ({left_out} more refusals not shown: at most one line per second)"
            ),
        );
    }
}

/// Logs a refusal at the cap: a warning, at most one line per second per process.
macro_rules! log_refusal {
    ($($arg:tt)*) => {{
        if $crate::infra::log::enabled($crate::infra::log::WARN) {
            $crate::infra::log::refusal(format_args!($($arg)*))
        }
    }};
}
pub(crate) use log_refusal;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_get_one_line_per_second_and_count_the_rest() {
        // One test drives the process-wide window (unit tests share the statics).
        let t0 = 5_000_000_000;
        assert_eq!(refusal_window(t0), Some(0), "the first is written");
        for i in 1..=9 {
            assert_eq!(
                refusal_window(t0 + i * 10_000_000),
                None,
                "within the second"
            );
        }
        assert_eq!(refusal_window(t0 + 999_999_999), None);
        assert_eq!(
            refusal_window(t0 + 1_000_000_000),
            Some(10),
            "the next second's line counts the ten left out"
        );
        assert_eq!(refusal_window(t0 + 3_000_000_000), Some(0));
    }

    #[test]
    fn atoi_reads_like_c() {
        assert_eq!(atoi(b"4"), 4);
        assert_eq!(atoi(b" 3x"), 3);
        assert_eq!(atoi(b"-1"), -1);
        assert_eq!(atoi(b"abc"), 0);
        assert_eq!(atoi(b""), 0);
    }
}
