//! Account days and active hours, read in `accounts.timezone`.
//!
//! An account's day is the calendar day of its zone (Asia/Shanghai by
//! default: WeChat's own day), so the daily count starts again at local
//! midnight, not at 00:00 UTC. Days are not always 24 hours long (DST), so
//! every boundary is computed in the zone with jiff, never by adding hours.

use jiff::{Timestamp, Zoned, civil::Date, tz::TimeZone};

use crate::config::ActiveHours;

/// Milliseconds since the Unix epoch: every time the budgets deal in.
pub type Millis = u64;

/// The clock of the budgets: the system's, or a test's.
pub trait Clock: Send + Sync {
    /// Now, in milliseconds since the Unix epoch.
    fn now_ms(&self) -> Millis;
}

/// The system clock.
#[derive(Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> Millis {
        crate::timestamp::now_millis()
    }
}

/// Days and windows in one time zone.
#[derive(Debug, Clone)]
pub struct Calendar {
    zone: TimeZone,
}

/// The account day `at` falls in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Day {
    /// `YYYY-MM-DD` in the zone: the key its count is kept under.
    pub key: String,
    /// When it started.
    pub starts_at: Millis,
    /// When the next day starts.
    pub ends_at: Millis,
}

impl Calendar {
    /// A calendar in `zone` (validated with the configuration).
    pub fn new(zone: TimeZone) -> Self {
        Self { zone }
    }

    fn zoned(&self, at: Millis) -> Zoned {
        let ts = Timestamp::from_millisecond(i64::try_from(at).unwrap_or(i64::MAX))
            .unwrap_or(Timestamp::MAX);
        ts.to_zoned(self.zone.clone())
    }

    fn start_of(&self, date: Date) -> Millis {
        // `Compatible` disambiguation: a midnight skipped by DST starts the
        // day at the first minute that exists.
        date.to_zoned(self.zone.clone())
            .map(|z| millis(z.timestamp()))
            .unwrap_or(Millis::MAX)
    }

    /// The day `at` falls in.
    pub fn day(&self, at: Millis) -> Day {
        let date = self.zoned(at).date();
        let ends_at = date
            .tomorrow()
            .map(|d| self.start_of(d))
            .unwrap_or(Millis::MAX);
        Day {
            key: date.to_string(),
            starts_at: self.start_of(date),
            ends_at,
        }
    }

    /// `None` when `hours` is open at `at`; otherwise when it next opens.
    pub fn closed_until(&self, hours: ActiveHours, at: Millis) -> Option<Millis> {
        let now = self.zoned(at);
        let minute =
            u16::try_from(now.hour()).unwrap_or(0) * 60 + u16::try_from(now.minute()).unwrap_or(0);
        if hours.contains(minute) {
            return None;
        }
        let opening = |date: Date| -> Millis {
            let (h, m) = (
                i8::try_from(hours.start / 60).unwrap_or(0),
                i8::try_from(hours.start % 60).unwrap_or(0),
            );
            date.at(h, m, 0, 0)
                .to_zoned(self.zone.clone())
                .map(|z| millis(z.timestamp()))
                .unwrap_or(Millis::MAX)
        };
        let today = now.date();
        let at_today = opening(today);
        if at_today > at {
            Some(at_today)
        } else {
            Some(today.tomorrow().map(opening).unwrap_or(Millis::MAX))
        }
    }
}

fn millis(ts: Timestamp) -> Millis {
    u64::try_from(ts.as_millisecond()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> Millis {
        millis(text.parse::<Timestamp>().expect("a timestamp"))
    }

    fn shanghai() -> Calendar {
        Calendar::new(TimeZone::get("Asia/Shanghai").expect("bundled zone"))
    }

    #[test]
    fn the_day_turns_at_local_midnight() {
        let c = shanghai();
        // 15:59:59Z is 23:59:59 in Shanghai; a second later is the next day.
        let before = c.day(at("2026-12-03T15:59:59Z"));
        let after = c.day(at("2026-12-03T16:00:00Z"));
        assert_eq!(before.key, "2026-12-03");
        assert_eq!(after.key, "2026-12-04");
        assert_eq!(before.ends_at, at("2026-12-03T16:00:00Z"));
    }

    #[test]
    fn a_dst_day_is_23_hours_long() {
        let c = Calendar::new(TimeZone::get("Europe/Berlin").expect("bundled zone"));
        // 2026-03-29: clocks jump from 02:00 to 03:00 in Berlin.
        let day = c.day(at("2026-03-29T10:00:00Z"));
        assert_eq!(day.key, "2026-03-29");
        assert_eq!(day.ends_at, at("2026-03-29T22:00:00Z"));
    }

    #[test]
    fn windows_open_and_close_and_wrap_midnight() {
        let c = shanghai();
        let day: ActiveHours = "09:00-21:00".parse().unwrap();
        // 08:00 local: opens at 09:00 the same day.
        assert_eq!(
            c.closed_until(day, at("2026-12-03T00:00:00Z")),
            Some(at("2026-12-03T01:00:00Z"))
        );
        assert_eq!(c.closed_until(day, at("2026-12-03T01:00:00Z")), None);
        // 21:00 local: closed until 09:00 tomorrow.
        assert_eq!(
            c.closed_until(day, at("2026-12-03T13:00:00Z")),
            Some(at("2026-12-04T01:00:00Z"))
        );
        let night: ActiveHours = "22:00-06:00".parse().unwrap();
        // 23:30 and 05:59 local are open; 06:00 waits for 22:00.
        assert_eq!(c.closed_until(night, at("2026-12-03T15:30:00Z")), None);
        assert_eq!(c.closed_until(night, at("2026-12-03T21:59:00Z")), None);
        assert_eq!(
            c.closed_until(night, at("2026-12-03T22:00:00Z")),
            Some(at("2026-12-04T14:00:00Z"))
        );
    }
}
