//! Diagnostics on stderr, HAMi-core's way: `LIBCUDA_LOG_LEVEL` (default 2) — errors always,
//! ≥2 warnings, ≥3 info, ≥4 debug.
//!
//! Messages are formatted into a stack buffer and written with one `write(2)`: no allocation, no
//! locks, usable from any hook. Nothing is ever printed before the first CUDA/NVML call.

use std::fmt::{self, Write as _};
use std::sync::atomic::{AtomicI32, Ordering};

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
        if $crate::log::enabled(level) {
            $crate::log::emit(level, format_args!($($arg)*))
        }
    }};
}
pub(crate) use log_at;

#[cfg(test)]
mod tests {
    use super::atoi;

    #[test]
    fn atoi_reads_like_c() {
        assert_eq!(atoi(b"4"), 4);
        assert_eq!(atoi(b" 3x"), 3);
        assert_eq!(atoi(b"-1"), -1);
        assert_eq!(atoi(b"abc"), 0);
        assert_eq!(atoi(b""), 0);
    }
}
