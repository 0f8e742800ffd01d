//! The SM-cap environment, read once by the lazy initialisation (never at load):
//!
//! * `CUDA_DEVICE_SM_LIMIT_<i>` (i = 0..15) over the fallback `CUDA_DEVICE_SM_LIMIT`: percent of the
//!   device's time the container may use, **decimal** digits (a leading zero is a zero, not
//!   octal), blanks around them ignored: `0` and `100` mean "no cap" (HAMi-core's `rate_limiter`
//!   fast exit); empty counts as unset. Unlike HAMi-core, a value that cannot be a percentage
//!   (letters, a suffix, a sign, hex, more than 100) is reported once and **fails closed** to
//!   [`FAIL_CLOSED_PERCENT`], as the memory limits do (HAMi-core read `150` as "no cap").
//! * `GPU_CORE_UTILIZATION_POLICY`: `force`/`FORCE` caps always, `disable`/`DISABLE` never,
//!   anything else (or unset) follows the region's `utilization_switch`, as HAMi-core.
//! * `CUDA_TASK_PRIORITY`: `atoi`, default 1 (HAMi: 0 high, 1 low); written into a region this
//!   process creates.

use crate::infra::config::{MAX_DEVICES, SM_PER_DEVICE_NAMES};
use crate::infra::log::atoi;
use std::ffi::CStr;

/// The cap a malformed `CUDA_DEVICE_SM_LIMIT*` value gets: the smallest meaningful share, so a
/// typo is loud (the workload crawls and stderr says why) instead of silently uncapped.
pub(crate) const FAIL_CLOSED_PERCENT: u8 = 1;

/// Why an SM limit value was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SmLimitError {
    NoDigits,
    NotANumber,
    Negative,
    /// Above 100 (including anything too large for 64 bits).
    OutOfRange,
}

impl SmLimitError {
    pub(crate) fn describe(self) -> &'static str {
        match self {
            Self::NoDigits => "no number",
            Self::NotANumber => "characters other than decimal digits",
            Self::Negative => "negative",
            Self::OutOfRange => "more than 100 percent",
        }
    }
}

/// Parses one value: `Ok(None)` = no cap (empty, 0, 100), `Ok(Some(p))` = cap of p percent
/// (1..=99).
pub(crate) fn parse_sm_limit(value: &[u8]) -> Result<Option<u8>, SmLimitError> {
    let s = value.trim_ascii();
    if s.is_empty() {
        return Ok(None);
    }
    let s = match s[0] {
        b'-' => return Err(SmLimitError::Negative),
        b'+' => &s[1..],
        _ => s,
    };
    if s.is_empty() {
        return Err(SmLimitError::NoDigits);
    }
    if !s.iter().all(u8::is_ascii_digit) {
        return Err(SmLimitError::NotANumber);
    }
    // Leading zeros first, so that `0050` is 50 and a long run of them is no overflow.
    let significant = &s[s.iter().take_while(|&&b| b == b'0').count()..];
    if significant.len() > 3 {
        return Err(SmLimitError::OutOfRange);
    }
    let n = significant
        .iter()
        .fold(0u32, |n, &b| n * 10 + u32::from(b - b'0'));
    match n {
        0 | 100 => Ok(None),
        1..=99 => Ok(Some(n as u8)),
        _ => Err(SmLimitError::OutOfRange),
    }
}

/// Per-device SM caps in percent (`None` = uncapped); the indexed variable wins. Each malformed
/// variable is reported once through `report` and fails closed.
pub(crate) fn sm_limits_from(
    lookup: impl Fn(&CStr) -> Option<&'static [u8]>,
    mut report: impl FnMut(&str, &[u8], SmLimitError),
) -> [Option<u8>; MAX_DEVICES] {
    let mut parse = |name: &CStr| -> Option<Option<u8>> {
        let value = lookup(name)?;
        Some(match parse_sm_limit(value) {
            Ok(cap) => cap,
            Err(e) => {
                report(name.to_str().unwrap_or("?"), value, e);
                Some(FAIL_CLOSED_PERCENT)
            }
        })
    };
    let fallback = parse(c"CUDA_DEVICE_SM_LIMIT").unwrap_or(None);
    let mut caps = [fallback; MAX_DEVICES];
    for (i, cap) in caps.iter_mut().enumerate() {
        if let Some(c) = parse(SM_PER_DEVICE_NAMES[i]) {
            *cap = c;
        }
    }
    caps
}

/// `GPU_CORE_UTILIZATION_POLICY`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Policy {
    /// Cap only while the region's `utilization_switch` is non-zero (the monitor's "shared" signal).
    Default = 0,
    /// Always cap.
    Force = 1,
    /// Never cap.
    Disable = 2,
}

pub(crate) fn policy_from(value: Option<&[u8]>) -> Policy {
    match value {
        Some(b"force" | b"FORCE") => Policy::Force,
        Some(b"disable" | b"DISABLE") => Policy::Disable,
        _ => Policy::Default,
    }
}

/// `CUDA_TASK_PRIORITY` (`atoi`, default 1).
pub(crate) fn priority_from(value: Option<&[u8]>) -> i32 {
    value.map_or(vgpu_region::layout::DEFAULT_PRIORITY, atoi)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentages_parse_decimal_and_0_or_100_mean_uncapped() {
        assert_eq!(parse_sm_limit(b"30"), Ok(Some(30)));
        assert_eq!(parse_sm_limit(b" +50 "), Ok(Some(50)));
        assert_eq!(parse_sm_limit(b"\t50\n"), Ok(Some(50)));
        assert_eq!(parse_sm_limit(b"010"), Ok(Some(10)), "decimal, not octal");
        assert_eq!(parse_sm_limit(b"0000000000000000000000050"), Ok(Some(50)));
        assert_eq!(parse_sm_limit(b"1"), Ok(Some(1)));
        assert_eq!(parse_sm_limit(b"99"), Ok(Some(99)));
        for v in [&b"0"[..], b"100", b"0100", b"", b"  "] {
            assert_eq!(parse_sm_limit(v), Ok(None), "{v:?}");
        }
    }

    #[test]
    fn values_outside_0_to_100_are_rejected() {
        for v in [&b"101"[..], b"150", b"1000", b"99999999999999999999"] {
            assert_eq!(parse_sm_limit(v), Err(SmLimitError::OutOfRange), "{v:?}");
        }
        assert_eq!(
            parse_sm_limit(b"0x1e"),
            Err(SmLimitError::NotANumber),
            "no hex"
        );
    }

    #[test]
    fn malformed_values_are_errors() {
        assert_eq!(parse_sm_limit(b"50%"), Err(SmLimitError::NotANumber));
        assert_eq!(parse_sm_limit(b"50m"), Err(SmLimitError::NotANumber));
        assert_eq!(parse_sm_limit(b"half"), Err(SmLimitError::NotANumber));
        assert_eq!(parse_sm_limit(b"-5"), Err(SmLimitError::Negative));
        assert_eq!(parse_sm_limit(b"0x"), Err(SmLimitError::NotANumber));
        assert_eq!(parse_sm_limit(b"+"), Err(SmLimitError::NoDigits));
    }

    #[test]
    fn per_device_wins_and_malformed_fails_closed() {
        let env = |name: &CStr| -> Option<&'static [u8]> {
            match name.to_bytes() {
                b"CUDA_DEVICE_SM_LIMIT" => Some(b"40"),
                b"CUDA_DEVICE_SM_LIMIT_1" => Some(b"70"),
                b"CUDA_DEVICE_SM_LIMIT_2" => Some(b"lots"),
                b"CUDA_DEVICE_SM_LIMIT_3" => Some(b"0"),
                _ => None,
            }
        };
        let mut reports = Vec::new();
        let caps = sm_limits_from(env, |n, _, e| reports.push((n.to_owned(), e)));
        assert_eq!(caps[0], Some(40));
        assert_eq!(caps[1], Some(70));
        assert_eq!(caps[2], Some(FAIL_CLOSED_PERCENT));
        assert_eq!(caps[3], None);
        assert_eq!(caps[15], Some(40));
        assert_eq!(
            reports,
            vec![(
                "CUDA_DEVICE_SM_LIMIT_2".to_owned(),
                SmLimitError::NotANumber
            )]
        );
    }

    #[test]
    fn policy_and_priority_read_like_hami() {
        assert_eq!(policy_from(Some(b"force")), Policy::Force);
        assert_eq!(policy_from(Some(b"FORCE")), Policy::Force);
        assert_eq!(policy_from(Some(b"disable")), Policy::Disable);
        assert_eq!(policy_from(Some(b"Force")), Policy::Default);
        assert_eq!(policy_from(None), Policy::Default);
        assert_eq!(priority_from(Some(b"0")), 0);
        assert_eq!(priority_from(None), 1);
    }
}
