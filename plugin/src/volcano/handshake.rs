//! The legacy `volcano.sh/node-vgpu-handshake` heartbeat (contract §2.3), needed by Volcano ≤ v1.15.0 only.
//!
//! The plugin writes `Reported <Go time.Time.String()>`; an old scheduler answers `Requesting_<time>` when it
//! uses the node, and `Deleted_<time>` once the plugin has been silent for 60 s after that. Scheduler times use
//! the layout `2006.01.02 15:04:05` and are parsed as UTC (the scheduler formats them in its local zone, so a
//! scheduler outside UTC is off by its offset; that is its bug, reproduced here on purpose). A new scheduler
//! never writes the annotation, so its presence in `Requesting_`/`Deleted_` form reveals an old one.
//!
//! Dates are converted with Howard Hinnant's days-from-civil algorithms rather than a date crate: two small
//! pure functions, exact over the whole proleptic Gregorian calendar.

use std::time::{SystemTime, UNIX_EPOCH};

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
/// zero. (Go adds ` m=+…` for a monotonic reading; nobody parses it, so we leave it out.)
pub fn reported_value(now: SystemTime) -> String {
    let (secs, nanos) = unix_parts(now);
    let (date, time) = civil(secs);
    let fraction = if nanos == 0 {
        String::new()
    } else {
        format!(".{nanos:09}").trim_end_matches('0').to_owned()
    };
    format!(
        "Reported {}-{:02}-{:02} {:02}:{:02}:{:02}{fraction} +0000 UTC",
        year(date.0),
        date.1,
        date.2,
        time.0,
        time.1,
        time.2
    )
}

/// A Unix time in the scheduler's layout, `2026.08.20 10:00:00` (UTC).
pub fn format_scheduler_time(unix: i64) -> String {
    let (date, time) = civil(unix);
    format!(
        "{}.{:02}.{:02} {:02}:{:02}:{:02}",
        year(date.0),
        date.1,
        date.2,
        time.0,
        time.1,
        time.2
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
    if !(1..=12).contains(&month)
        || day < 1
        || day > days_in_month(year, month)
        || hour > 23
        || minute > 59
        || second > 59
    {
        return None;
    }
    Some(days_from_civil(year, month, day) * 86_400 + hour * 3_600 + minute * 60 + second)
}

/// Exactly `width` ASCII digits.
fn fixed_digits(text: &str, width: usize) -> Option<i64> {
    if text.len() == width && text.bytes().all(|b| b.is_ascii_digit()) {
        text.parse().ok()
    } else {
        None
    }
}

fn is_leap(year: i64) -> bool {
    year % 4 == 0 && (year % 100 != 0 || year % 400 == 0)
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Go pads the year to four digits.
fn year(y: i64) -> String {
    if y >= 0 {
        format!("{y:04}")
    } else {
        format!("-{:04}", y.unsigned_abs())
    }
}

/// Whole seconds (floored) and nanoseconds since the epoch, for times before it too.
fn unix_parts(t: SystemTime) -> (i64, u32) {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => (
            i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            d.subsec_nanos(),
        ),
        Err(e) => {
            let d = e.duration();
            let secs = i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
            match d.subsec_nanos() {
                0 => (-secs, 0),
                n => (-secs - 1, 1_000_000_000 - n),
            }
        }
    }
}

/// `(year, month, day)` and `(hour, minute, second)` of a Unix time in UTC.
fn civil(unix: i64) -> ((i64, i64, i64), (i64, i64, i64)) {
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    (
        civil_from_days(days),
        (secs / 3_600, secs % 3_600 / 60, secs % 60),
    )
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Hinnant's `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day count since 1970-01-01 (Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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
            253_402_300_799, // 9999-12-31T23:59:59
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
    fn civil_conversion_matches_every_day_of_four_centuries() {
        let mut days = days_from_civil(1600, 1, 1);
        for year in 1600..2001 {
            for month in 1..=12 {
                for day in 1..=days_in_month(year, month) {
                    assert_eq!(days_from_civil(year, month, day), days);
                    assert_eq!(civil_from_days(days), (year, month, day));
                    days += 1;
                }
            }
        }
        assert_eq!(days_from_civil(1970, 1, 1), 0);
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
