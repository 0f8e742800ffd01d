//! The environment HAMi's device plugin sets, read exactly as HAMi-core reads it — but only on the
//! first CUDA/NVML call (never at load), through libc `getenv` (no allocation, no std env lock).
//!
//! * `CUDA_DEVICE_MEMORY_LIMIT_<i>` (i = 0..15) and the fallback `CUDA_DEVICE_MEMORY_LIMIT`:
//!   **decimal** digits (or `0x` hex) times a one-letter suffix `g`/`m`/`k` (either case; none =
//!   bytes), surrounding whitespace ignored. `0` means "no limit", as in HAMi-core. HAMi-core's
//!   `strtoul(value, base 0)` read `010g` as 8 GiB (octal): a leading zero here is just a zero
//!   (`010g` = 10 GiB); `0x…` stays hex, which cannot be misread. Unlike HAMi-core, a malformed or
//!   overflowing value is reported once and **fails closed** (a cap of 0 bytes) instead of
//!   silently meaning unlimited. An empty (or all-blank) value counts as unset. An index the
//!   container has no device for is reported and fails closed too: see
//!   [`indexed_beyond`].
//! * `CUDA_DEVICE_MEMORY_SHARED_CACHE` (default `/tmp/cudevshr.cache`): the shared-region path,
//!   read here for the region crate; opened (created if missing) only by a process with a cap.
//! * `LIBCUDA_LOG_LEVEL`: see [`crate::infra::log`].

use std::ffi::{CStr, c_char};

/// Devices HAMi-core supports (`CUDA_DEVICE_MAX_COUNT`).
pub(crate) const MAX_DEVICES: usize = 16;

/// HAMi-core's default shared-region path.
pub(crate) const DEFAULT_SHARED_CACHE: &CStr = c"/tmp/cudevshr.cache";

/// What one limit variable says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Limit {
    /// Unset, empty or `0`.
    Unlimited,
    /// A cap in bytes (a malformed value yields `Bytes(0)`).
    Bytes(u64),
}

/// Why a limit value was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LimitError {
    NoDigits,
    TrailingGarbage,
    Negative,
    Overflow,
}

impl LimitError {
    pub(crate) fn describe(self) -> &'static str {
        match self {
            Self::NoDigits => "no number",
            Self::TrailingGarbage => {
                "characters other than decimal (or 0x hex) digits and one optional g/m/k suffix"
            }
            Self::Negative => "negative",
            Self::Overflow => "too large for 64 bits",
        }
    }
}

/// Decimal digits to a number; `None` without digits or with anything else, `Some(Err)` on
/// overflow.
fn decimal(digits: &[u8]) -> Option<Result<u64, ()>> {
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(digits.iter().try_fold(0u64, |n, &b| {
        n.checked_mul(10)
            .and_then(|n| n.checked_add(u64::from(b - b'0')))
            .ok_or(())
    }))
}

/// Decimal digits, or hex after `0x`/`0X` (unambiguous, and HAMi-core's `strtoul` base 0 took
/// it); a leading `0` is just a zero, never octal.
fn number(digits: &[u8]) -> Option<Result<u64, ()>> {
    match digits {
        [b'0', b'x' | b'X', hex @ ..] => {
            if hex.is_empty() || !hex.iter().all(u8::is_ascii_hexdigit) {
                return None;
            }
            Some(hex.iter().try_fold(0u64, |n, &b| {
                let d = (b as char).to_digit(16).unwrap_or(0);
                n.checked_mul(16)
                    .and_then(|n| n.checked_add(u64::from(d)))
                    .ok_or(())
            }))
        }
        _ => decimal(digits),
    }
}

/// Parses one limit value: optional `+`, a [`number`], at most one of `g G m M k K`; blanks
/// around it are ignored.
pub(crate) fn parse_limit(value: &[u8]) -> Result<Limit, LimitError> {
    let mut s = value.trim_ascii();
    if s.is_empty() {
        return Ok(Limit::Unlimited);
    }
    match s[0] {
        b'-' => return Err(LimitError::Negative),
        b'+' => s = &s[1..],
        _ => {}
    }
    let (multiplier, digits) = match s.last() {
        Some(b'g' | b'G') => (1u64 << 30, &s[..s.len() - 1]),
        Some(b'm' | b'M') => (1u64 << 20, &s[..s.len() - 1]),
        Some(b'k' | b'K') => (1u64 << 10, &s[..s.len() - 1]),
        _ => (1, s),
    };
    let n = match number(digits) {
        Some(Ok(n)) => n,
        Some(Err(())) => return Err(LimitError::Overflow),
        None if digits.is_empty() => return Err(LimitError::NoDigits),
        None => return Err(LimitError::TrailingGarbage),
    };
    let bytes = n.checked_mul(multiplier).ok_or(LimitError::Overflow)?;
    Ok(if bytes == 0 {
        Limit::Unlimited
    } else {
        Limit::Bytes(bytes)
    })
}

/// `getenv(name)` as bytes; `None` when unset.
///
/// Only called from the lazy initialisation, never concurrently with our own `setenv` (we never
/// call it); a concurrent `setenv` in the application is the usual POSIX caveat.
pub(crate) fn getenv(name: &CStr) -> Option<&'static [u8]> {
    // SAFETY: `name` is NUL-terminated; getenv returns NULL or a pointer into the environment,
    // which stays valid until the application modifies that variable.
    let p: *const c_char = unsafe { libc::getenv(name.as_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: getenv returned a NUL-terminated string (see above).
    Some(unsafe { CStr::from_ptr(p) }.to_bytes())
}

/// The per-device limits: `CUDA_DEVICE_MEMORY_LIMIT_<i>` wins over `CUDA_DEVICE_MEMORY_LIMIT`.
/// Each malformed variable is reported once, through `report`.
pub(crate) fn limits_from(
    lookup: impl Fn(&CStr) -> Option<&'static [u8]>,
    mut report: impl FnMut(&str, &[u8], LimitError),
) -> [Limit; MAX_DEVICES] {
    let mut parse = |name: &CStr| -> Option<Limit> {
        let value = lookup(name)?;
        Some(match parse_limit(value) {
            Ok(limit) => limit,
            Err(e) => {
                report(name.to_str().unwrap_or("?"), value, e);
                Limit::Bytes(0)
            }
        })
    };
    let fallback = parse(c"CUDA_DEVICE_MEMORY_LIMIT").unwrap_or(Limit::Unlimited);
    let mut limits = [fallback; MAX_DEVICES];
    for (i, limit) in limits.iter_mut().enumerate() {
        if let Some(l) = parse(PER_DEVICE_NAMES[i]) {
            *limit = l;
        }
    }
    limits
}

const PER_DEVICE_NAMES: [&CStr; MAX_DEVICES] = [
    c"CUDA_DEVICE_MEMORY_LIMIT_0",
    c"CUDA_DEVICE_MEMORY_LIMIT_1",
    c"CUDA_DEVICE_MEMORY_LIMIT_2",
    c"CUDA_DEVICE_MEMORY_LIMIT_3",
    c"CUDA_DEVICE_MEMORY_LIMIT_4",
    c"CUDA_DEVICE_MEMORY_LIMIT_5",
    c"CUDA_DEVICE_MEMORY_LIMIT_6",
    c"CUDA_DEVICE_MEMORY_LIMIT_7",
    c"CUDA_DEVICE_MEMORY_LIMIT_8",
    c"CUDA_DEVICE_MEMORY_LIMIT_9",
    c"CUDA_DEVICE_MEMORY_LIMIT_10",
    c"CUDA_DEVICE_MEMORY_LIMIT_11",
    c"CUDA_DEVICE_MEMORY_LIMIT_12",
    c"CUDA_DEVICE_MEMORY_LIMIT_13",
    c"CUDA_DEVICE_MEMORY_LIMIT_14",
    c"CUDA_DEVICE_MEMORY_LIMIT_15",
];

/// A per-device variable (`CUDA_DEVICE_MEMORY_LIMIT_<i>` or `CUDA_DEVICE_SM_LIMIT_<i>`) that is
/// set for an index `i` at or beyond `count`, the number of devices the container has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Beyond {
    pub(crate) name: &'static CStr,
    pub(crate) value: &'static [u8],
    pub(crate) index: usize,
    /// `true` for the memory limit, `false` for the SM limit.
    pub(crate) memory: bool,
}

/// The per-device limit variables (non-blank) that name a device index `>= count`. Such a value
/// cannot mean what it says; the caller reports each and applies its strictest meaning (a cap
/// on every device) instead of ignoring it.
pub(crate) fn indexed_beyond(
    lookup: impl Fn(&CStr) -> Option<&'static [u8]>,
    count: usize,
) -> Vec<Beyond> {
    let memory = PER_DEVICE_NAMES.iter().map(|n| (*n, true));
    let sm = SM_PER_DEVICE_NAMES.iter().map(|n| (*n, false));
    memory
        .chain(sm)
        .enumerate()
        .map(|(i, (name, memory))| (i % MAX_DEVICES, name, memory))
        .filter(|&(index, _, _)| index >= count)
        .filter_map(|(index, name, memory)| {
            let value = lookup(name).filter(|v| !v.trim_ascii().is_empty())?;
            Some(Beyond {
                name,
                value,
                index,
                memory,
            })
        })
        .collect()
}

/// `CUDA_DEVICE_MEMORY_SHARED_CACHE` or the default path (opened by the budget, `policy/budget.rs`).
/// `CUDA_OVERSUBSCRIBE`: `true` (any case) or `1` enables the managed-memory fallback.
pub(crate) fn oversubscribe_from(value: Option<&[u8]>) -> bool {
    value.is_some_and(|v| v.eq_ignore_ascii_case(b"true") || v == b"1")
}

pub(crate) fn shared_cache_path() -> &'static CStr {
    match getenv(c"CUDA_DEVICE_MEMORY_SHARED_CACHE") {
        Some(v) if !v.is_empty() => {
            // SAFETY: `v` is getenv's NUL-terminated string without its NUL, so `v.len() + 1`
            // bytes are readable and the last one is the terminator.
            let with_nul = unsafe { std::slice::from_raw_parts(v.as_ptr(), v.len() + 1) };
            CStr::from_bytes_with_nul(with_nul).unwrap_or(DEFAULT_SHARED_CACHE)
        }
        _ => DEFAULT_SHARED_CACHE,
    }
}

/// `CUDA_DEVICE_SM_LIMIT_<i>` (parsed in `policy/sm/config.rs`).
pub(crate) const SM_PER_DEVICE_NAMES: [&CStr; MAX_DEVICES] = [
    c"CUDA_DEVICE_SM_LIMIT_0",
    c"CUDA_DEVICE_SM_LIMIT_1",
    c"CUDA_DEVICE_SM_LIMIT_2",
    c"CUDA_DEVICE_SM_LIMIT_3",
    c"CUDA_DEVICE_SM_LIMIT_4",
    c"CUDA_DEVICE_SM_LIMIT_5",
    c"CUDA_DEVICE_SM_LIMIT_6",
    c"CUDA_DEVICE_SM_LIMIT_7",
    c"CUDA_DEVICE_SM_LIMIT_8",
    c"CUDA_DEVICE_SM_LIMIT_9",
    c"CUDA_DEVICE_SM_LIMIT_10",
    c"CUDA_DEVICE_SM_LIMIT_11",
    c"CUDA_DEVICE_SM_LIMIT_12",
    c"CUDA_DEVICE_SM_LIMIT_13",
    c"CUDA_DEVICE_SM_LIMIT_14",
    c"CUDA_DEVICE_SM_LIMIT_15",
];

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn suffixes_and_plain_bytes_parse_like_hami() {
        assert_eq!(parse_limit(b"1g"), Ok(Limit::Bytes(GIB)));
        assert_eq!(parse_limit(b"1G"), Ok(Limit::Bytes(GIB)));
        assert_eq!(parse_limit(b"1024m"), Ok(Limit::Bytes(GIB)));
        assert_eq!(parse_limit(b"1048576k"), Ok(Limit::Bytes(GIB)));
        assert_eq!(parse_limit(b"1073741824"), Ok(Limit::Bytes(GIB)));
        assert_eq!(parse_limit(b" +2m"), Ok(Limit::Bytes(2 << 20)));
    }

    #[test]
    fn numbers_are_decimal_and_blanks_around_them_are_ignored() {
        assert_eq!(
            parse_limit(b"010g"),
            Ok(Limit::Bytes(10 * GIB)),
            "not octal"
        );
        assert_eq!(parse_limit(b"010"), Ok(Limit::Bytes(10)));
        assert_eq!(
            parse_limit(b"0009m"),
            Ok(Limit::Bytes(9 << 20)),
            "9 is no octal digit"
        );
        assert_eq!(parse_limit(b" 1g\n"), Ok(Limit::Bytes(GIB)));
        assert_eq!(parse_limit(b"\t3000m  "), Ok(Limit::Bytes(3000 << 20)));
        assert_eq!(parse_limit(b"   "), Ok(Limit::Unlimited), "blank = unset");
        assert_eq!(
            parse_limit(b"0x40000000"),
            Ok(Limit::Bytes(GIB)),
            "0x is hex"
        );
        assert_eq!(parse_limit(b"0x"), Err(LimitError::TrailingGarbage));
        assert_eq!(parse_limit(b"0xg"), Err(LimitError::TrailingGarbage));
        assert_eq!(parse_limit(b"1 g"), Err(LimitError::TrailingGarbage));
    }

    #[test]
    fn per_device_variables_beyond_the_devices_are_found() {
        let env = |name: &CStr| -> Option<&'static [u8]> {
            match name.to_bytes() {
                b"CUDA_DEVICE_MEMORY_LIMIT_0" => Some(b"1g"),
                b"CUDA_DEVICE_MEMORY_LIMIT_1" => Some(b"2g"),
                b"CUDA_DEVICE_MEMORY_LIMIT_3" => Some(b" "),
                b"CUDA_DEVICE_SM_LIMIT_15" => Some(b"20"),
                _ => None,
            }
        };
        let found = indexed_beyond(env, 1);
        assert_eq!(
            found
                .iter()
                .map(|b| (b.name.to_bytes(), b.index, b.memory))
                .collect::<Vec<_>>(),
            vec![
                (&b"CUDA_DEVICE_MEMORY_LIMIT_1"[..], 1, true),
                (&b"CUDA_DEVICE_SM_LIMIT_15"[..], 15, false)
            ]
        );
        assert!(indexed_beyond(env, 16).is_empty());
    }

    #[test]
    fn oversubscribe_values() {
        assert!(oversubscribe_from(Some(b"true")));
        assert!(oversubscribe_from(Some(b"TRUE")));
        assert!(oversubscribe_from(Some(b"1")));
        for v in [&b"false"[..], b"", b"0", b"yes"] {
            assert!(!oversubscribe_from(Some(v)));
        }
        assert!(!oversubscribe_from(None));
    }

    #[test]
    fn zero_and_empty_mean_unlimited() {
        assert_eq!(parse_limit(b"0"), Ok(Limit::Unlimited));
        assert_eq!(parse_limit(b"0m"), Ok(Limit::Unlimited));
        assert_eq!(parse_limit(b""), Ok(Limit::Unlimited));
    }

    #[test]
    fn malformed_values_are_errors() {
        assert_eq!(parse_limit(b"abc"), Err(LimitError::TrailingGarbage));
        assert_eq!(parse_limit(b"1gb"), Err(LimitError::TrailingGarbage));
        assert_eq!(parse_limit(b"1Gi"), Err(LimitError::TrailingGarbage));
        assert_eq!(parse_limit(b"g"), Err(LimitError::NoDigits));
        assert_eq!(parse_limit(b"-1"), Err(LimitError::Negative));
        assert_eq!(parse_limit(b"0x"), Err(LimitError::TrailingGarbage));
        assert_eq!(
            parse_limit(b"99999999999999999999"),
            Err(LimitError::Overflow)
        );
        assert_eq!(parse_limit(b"17179869184g"), Err(LimitError::Overflow));
        assert_eq!(parse_limit(b"8x"), Err(LimitError::TrailingGarbage));
    }

    #[test]
    fn per_device_overrides_fallback_and_malformed_fails_closed() {
        let env = |name: &CStr| -> Option<&'static [u8]> {
            match name.to_bytes() {
                b"CUDA_DEVICE_MEMORY_LIMIT" => Some(b"2g"),
                b"CUDA_DEVICE_MEMORY_LIMIT_1" => Some(b"512m"),
                b"CUDA_DEVICE_MEMORY_LIMIT_2" => Some(b"lots"),
                b"CUDA_DEVICE_MEMORY_LIMIT_3" => Some(b"0"),
                _ => None,
            }
        };
        let mut reports = Vec::new();
        let limits = limits_from(env, |name, _, e| reports.push((name.to_owned(), e)));
        assert_eq!(limits[0], Limit::Bytes(2 * GIB));
        assert_eq!(limits[1], Limit::Bytes(512 << 20));
        assert_eq!(limits[2], Limit::Bytes(0));
        assert_eq!(limits[3], Limit::Unlimited);
        assert_eq!(limits[15], Limit::Bytes(2 * GIB));
        assert_eq!(
            reports,
            vec![(
                "CUDA_DEVICE_MEMORY_LIMIT_2".to_owned(),
                LimitError::TrailingGarbage
            )]
        );
    }
}
