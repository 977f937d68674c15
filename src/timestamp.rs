//! RFC 3339 UTC timestamps with milliseconds (`2026-11-27T23:45:15.123Z`),
//! the form of every time in events.
//!
//! Each command's event carries two of them; humantime's `Display` took
//! about 570 instructions for one, through the formatting machinery, a
//! fifth of them spent growing the `String`. This writes the 24 bytes
//! directly. The output is humantime's, byte for byte (tested below).

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch now (0 for a clock set before 1970).
pub fn now_millis() -> u64 {
    millis_since_epoch(SystemTime::now())
}

/// Milliseconds from the Unix epoch to `at`, 0 for a time before it.
fn millis_since_epoch(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Now, as RFC 3339 with milliseconds.
pub fn now() -> String {
    format_millis(now_millis())
}

/// `at`, as RFC 3339 with milliseconds (the epoch for a time before it).
pub fn format(at: SystemTime) -> String {
    format_millis(millis_since_epoch(at))
}

/// `millis` after the Unix epoch, as RFC 3339 with milliseconds. Years past
/// 9999 are written with all their digits rather than cut.
pub fn format_millis(millis: u64) -> String {
    let (secs, ms) = (millis / 1000, millis % 1000);
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_date(days);
    let mut text = *b"0000-00-00T00:00:00.000Z";
    put_digits(&mut text[0..4], year);
    put_digits(&mut text[5..7], month);
    put_digits(&mut text[8..10], day);
    put_digits(&mut text[11..13], rest / 3600);
    put_digits(&mut text[14..16], rest % 3600 / 60);
    put_digits(&mut text[17..19], rest % 60);
    put_digits(&mut text[20..23], ms);
    let mut out = String::with_capacity(text.len() + 1);
    if year >= 10_000 {
        out.push_str(itoa::Buffer::new().format(year / 10_000));
    }
    // Only ASCII digits were written into ASCII.
    out.push_str(std::str::from_utf8(&text).unwrap_or_default());
    out
}

/// The last `into.len()` decimal digits of `n`, zero-padded, into `into`.
fn put_digits(into: &mut [u8], mut n: u64) {
    for byte in into.iter_mut().rev() {
        *byte = b'0' + (n % 10) as u8;
        n /= 10;
    }
}

/// Year, month and day of `days` after 1970-01-01 in the proleptic
/// Gregorian calendar (Howard Hinnant's `civil_from_days`, for days on or
/// after the epoch).
fn civil_date(days: u64) -> (u64, u64, u64) {
    // Counted from 0000-03-01, so that leap days end each 400-year era.
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    // Months from March: 0 = March … 11 = February.
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn humantime_of(millis: u64) -> String {
        humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(millis)).to_string()
    }

    #[test]
    fn writes_what_humantime_writes() {
        // Every day from 1970 to past 2400 (leap years, centuries, the
        // 400-year rule), at a time of day that moves with it.
        for day in 0..160_000u64 {
            let millis = day * 86_400_000 + (day * 7_919_357) % 86_400_000;
            assert_eq!(format_millis(millis), humantime_of(millis), "day {day}");
        }
        for millis in [
            0,
            999,
            1_000,
            86_399_999,
            951_782_400_000,
            4_107_542_399_999,
        ] {
            assert_eq!(format_millis(millis), humantime_of(millis));
        }
        // humantime's own limit.
        let last = 253_402_300_799_999;
        assert_eq!(format_millis(last), humantime_of(last));
        assert_eq!(format_millis(last), "9999-12-31T23:59:59.999Z");
    }

    #[test]
    fn beyond_year_9999_and_before_1970_nothing_panics() {
        assert_eq!(
            format_millis(253_402_300_800_000),
            "10000-01-01T00:00:00.000Z"
        );
        assert!(format_millis(u64::MAX).ends_with('Z'));
        assert_eq!(
            format(UNIX_EPOCH - Duration::from_secs(1)),
            "1970-01-01T00:00:00.000Z"
        );
        let now = SystemTime::now();
        assert_eq!(
            format(now),
            humantime::format_rfc3339_millis(now).to_string()
        );
    }
}
