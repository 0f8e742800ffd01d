//! The legacy `volcano.sh/node-vgpu-handshake` heartbeat (docs/volcano-contract.md §2.3), needed by Volcano ≤ v1.15.0 only.
//!
//! The plugin writes `Reported <Go time.Time.String()>`; an old scheduler answers `Requesting_<time>` when it
//! uses the node, and `Deleted_<time>` once the plugin has been silent for 60 s after that. Scheduler times use
//! the layout `2006.01.02 15:04:05` and are parsed as UTC (the scheduler formats them in its local zone, so a
//! scheduler outside UTC is off by its offset; that is its bug, reproduced here on purpose). A new scheduler
//! never writes the annotation, so its presence in `Requesting_`/`Deleted_` form reveals an old one.
//!
//! Calendar arithmetic is jiff's (the proleptic Gregorian calendar, years -9999 to 9999); the formats are Go's
//! and are written here.

use std::time::SystemTime;

use jiff::Timestamp;
use jiff::civil::DateTime;
use jiff::tz::Offset;

/// The handshake as the agent reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handshake {
    /// No annotation: a new scheduler, or a node no old scheduler has seen yet.
    Missing,
    /// Our own (or the Go plugin's) heartbeat, `Reported …`.
    Reported,
    /// An old scheduler uses the node; the time it wrote, when it parses.
    Requesting {
        /// Unix seconds, read as UTC as the scheduler does.
        at_unix: Option<i64>,
    },
    /// An old scheduler dropped the node for lack of a heartbeat.
    Deleted {
        /// Unix seconds, read as UTC as the scheduler does.
        at_unix: Option<i64>,
    },
    /// Anything else (an old scheduler treats it like `Reported`).
    Other(String),
}

/// Reads the annotation value in the scheduler's order of checks: `Requesting` anywhere, then `Deleted`
/// anywhere, then our `Reported` prefix. The time is the text between the first and second `_`, as the
/// scheduler's `strings.Split(v, "_")[1]` takes it (where a value without `_` would crash the scheduler; here
/// it is just a time of `None`).
pub fn parse_handshake(value: Option<&str>) -> Handshake {
    let Some(value) = value else {
        return Handshake::Missing;
    };
    let at_unix = || value.split('_').nth(1).and_then(parse_scheduler_time);
    if value.contains("Requesting") {
        Handshake::Requesting { at_unix: at_unix() }
    } else if value.contains("Deleted") {
        Handshake::Deleted { at_unix: at_unix() }
    } else if value.starts_with("Reported") {
        Handshake::Reported
    } else {
        Handshake::Other(value.to_owned())
    }
}

/// The heartbeat value for `now`: `Reported ` and Go's `time.Time.String()` of it in UTC,
/// `Reported 2026-08-20 10:00:00.123456789 +0000 UTC`, the fraction trimmed of trailing zeros and left out when
/// zero. (Go adds ` m=+…` for a monotonic reading; nobody parses it, so we leave it out.) A clock beyond the
/// years jiff represents (±9999) is written as the nearest representable time.
pub fn reported_value(now: SystemTime) -> String {
    let at = Timestamp::try_from(now).unwrap_or(if now > SystemTime::UNIX_EPOCH {
        Timestamp::MAX
    } else {
        Timestamp::MIN
    });
    let utc = Offset::UTC.to_datetime(at);
    let nanos = utc.subsec_nanosecond();
    let fraction = if nanos == 0 {
        String::new()
    } else {
        format!(".{nanos:09}").trim_end_matches('0').to_owned()
    };
    format!("Reported {}{fraction} +0000 UTC", go_layout(utc, '-'))
}

/// A Unix time in the scheduler's layout, `2026.08.20 10:00:00` (UTC); clamped to the years ±9999.
pub fn format_scheduler_time(unix: i64) -> String {
    let at = Timestamp::from_second(unix).unwrap_or(if unix > 0 {
        Timestamp::MAX
    } else {
        Timestamp::MIN
    });
    go_layout(Offset::UTC.to_datetime(at), '.')
}

/// `2006-01-02 15:04:05` with `separator` between the date's fields; Go pads the year to four digits.
fn go_layout(at: DateTime, separator: char) -> String {
    let year = at.year();
    let year = if year >= 0 {
        format!("{year:04}")
    } else {
        format!("-{:04}", year.unsigned_abs())
    };
    format!(
        "{year}{separator}{:02}{separator}{:02} {:02}:{:02}:{:02}",
        at.month(),
        at.day(),
        at.hour(),
        at.minute(),
        at.second()
    )
}

/// Parses the layout `2006.01.02 15:04:05` as Go's `time.Parse` does, in UTC: four-digit year, two-digit
/// month, day, minute and second, a one- or two-digit hour, an optional fractional second (Go accepts one after
/// the seconds even when the layout has none; it is dropped here), and nothing else.
pub fn parse_scheduler_time(text: &str) -> Option<i64> {
    let (date, clock) = text.split_once(' ')?;
    let mut date_parts = date.split('.');
    let year = fixed_digits(date_parts.next()?, 4)?;
    let month = fixed_digits(date_parts.next()?, 2)?;
    let day = fixed_digits(date_parts.next()?, 2)?;
    if date_parts.next().is_some() {
        return None;
    }
    let (clock, fraction) = match clock.split_once('.') {
        Some((clock, fraction)) => (clock, Some(fraction)),
        None => (clock, None),
    };
    if let Some(f) = fraction
        && (f.is_empty() || !f.bytes().all(|b| b.is_ascii_digit()))
    {
        return None;
    }
    let mut clock_parts = clock.split(':');
    let hour_text = clock_parts.next()?;
    let hour = if hour_text.len() == 1 {
        fixed_digits(hour_text, 1)?
    } else {
        fixed_digits(hour_text, 2)?
    };
    let minute = fixed_digits(clock_parts.next()?, 2)?;
    let second = fixed_digits(clock_parts.next()?, 2)?;
    if clock_parts.next().is_some() {
        return None;
    }
    // jiff refuses a day the month does not have, an hour over 23 and the like.
    let at = DateTime::new(
        i16::try_from(year).ok()?,
        i8::try_from(month).ok()?,
        i8::try_from(day).ok()?,
        i8::try_from(hour).ok()?,
        i8::try_from(minute).ok()?,
        i8::try_from(second).ok()?,
        0,
    )
    .ok()?;
    Some(Offset::UTC.to_timestamp(at).ok()?.as_second())
}

/// Exactly `width` ASCII digits.
fn fixed_digits(text: &str, width: usize) -> Option<i64> {
    if text.len() == width && text.bytes().all(|b| b.is_ascii_digit()) {
        text.parse().ok()
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    const T: i64 = 1_787_220_000; // 2026-08-20T10:00:00Z

    fn at(secs: i64, nanos: u32) -> SystemTime {
        if secs >= 0 {
            UNIX_EPOCH + Duration::new(secs.unsigned_abs(), nanos)
        } else {
            UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
                + Duration::from_nanos(u64::from(nanos))
        }
    }

    #[test]
    fn reported_value_is_go_time_string() {
        assert_eq!(
            reported_value(at(T, 0)),
            "Reported 2026-08-20 10:00:00 +0000 UTC"
        );
        assert_eq!(
            reported_value(at(T, 123_456_789)),
            "Reported 2026-08-20 10:00:00.123456789 +0000 UTC"
        );
        assert_eq!(
            reported_value(at(T, 120_000_000)),
            "Reported 2026-08-20 10:00:00.12 +0000 UTC"
        );
        assert_eq!(
            reported_value(at(T, 1)),
            "Reported 2026-08-20 10:00:00.000000001 +0000 UTC"
        );
        assert_eq!(
            reported_value(UNIX_EPOCH),
            "Reported 1970-01-01 00:00:00 +0000 UTC"
        );
        assert_eq!(
            reported_value(at(-1, 500_000_000)),
            "Reported 1969-12-31 23:59:59.5 +0000 UTC"
        );
    }

    #[test]
    fn scheduler_times_round_trip() {
        assert_eq!(format_scheduler_time(T), "2026.08.20 10:00:00");
        assert_eq!(parse_scheduler_time("2026.08.20 10:00:00"), Some(T));
        for unix in [
            0,
            -1,
            951_782_400,     // 2000-02-29
            4_107_542_399,   // 2100-02-28T23:59:59
            253_402_128_000, // 9999-12-30, near the end of the range jiff represents
            -62_135_596_800, // 0001-01-01
        ] {
            assert_eq!(
                parse_scheduler_time(&format_scheduler_time(unix)),
                Some(unix),
                "{unix}"
            );
        }
    }

    #[test]
    fn scheduler_time_parsing_is_as_strict_as_go() {
        assert_eq!(parse_scheduler_time("2026.08.20 9:00:00"), Some(T - 3_600));
        assert_eq!(parse_scheduler_time("2026.08.20 10:00:00.75"), Some(T));
        assert_eq!(
            parse_scheduler_time("2024.02.29 00:00:00"),
            Some(1_709_164_800)
        );
        for bad in [
            "",
            "2026.08.20",
            "2026.8.20 10:00:00",
            "2026.08.20 10:0:00",
            "2026.08.20 10:00:00 ",
            "2026.08.20 10:00:00.",
            "2026.08.20 10:00:00.x",
            "2026.08.20  10:00:00",
            "2026-08-20 10:00:00",
            "2026.13.20 10:00:00",
            "2026.00.20 10:00:00",
            "2026.02.29 10:00:00",
            "2026.04.31 10:00:00",
            "2026.08.00 10:00:00",
            "2026.08.20 24:00:00",
            "2026.08.20 10:60:00",
            "2026.08.20 10:00:60",
            "2026.08.20 010:00:00",
            "+026.08.20 10:00:00",
            "2026.08.20 10:00:00:00",
            "2026.08.20.1 10:00:00",
        ] {
            assert_eq!(parse_scheduler_time(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn handshake_states() {
        assert_eq!(parse_handshake(None), Handshake::Missing);
        assert_eq!(
            parse_handshake(Some("Reported 2026-08-20 10:00:00 +0000 UTC")),
            Handshake::Reported
        );
        assert_eq!(
            parse_handshake(Some("Requesting_2026.08.20 10:00:00")),
            Handshake::Requesting { at_unix: Some(T) }
        );
        assert_eq!(
            parse_handshake(Some("Deleted_2026.08.20 10:01:01")),
            Handshake::Deleted {
                at_unix: Some(T + 61)
            }
        );
        assert_eq!(
            parse_handshake(Some("Requesting")),
            Handshake::Requesting { at_unix: None }
        );
        assert_eq!(
            parse_handshake(Some("Requesting_garbage")),
            Handshake::Requesting { at_unix: None }
        );
        // Only the text between the first and second '_' counts, as in the scheduler.
        assert_eq!(
            parse_handshake(Some("Requesting_2026.08.20 10:00:00_extra")),
            Handshake::Requesting { at_unix: Some(T) }
        );
        // The scheduler checks Requesting before Deleted, anywhere in the value.
        assert_eq!(
            parse_handshake(Some("Deleted Requesting_2026.08.20 10:00:00")),
            Handshake::Requesting { at_unix: Some(T) }
        );
        assert_eq!(parse_handshake(Some("")), Handshake::Other(String::new()));
        assert_eq!(
            parse_handshake(Some("hello")),
            Handshake::Other("hello".to_owned())
        );
    }
}
