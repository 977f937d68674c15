//! The `accounts.*` section (contract §7): budgets per WeChat account.

use std::{collections::BTreeMap, fmt, str::FromStr, time::Duration};

use serde::{Deserialize, Deserializer, Serialize, Serializer, de};

use super::ConfigError;

/// Budgets that protect each account (`appId`) from WeChat's restrictions.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AccountsSettings {
    /// Requests per account per day that may reach WeChat; 0: no limit.
    pub daily_limit: u32,
    /// IANA zone in which an account's day and active hours are read.
    pub timezone: String,
    /// Daily window in which calls may start; `None`: all day.
    #[serde(default, with = "optional_hours")]
    pub active_hours: Option<ActiveHours>,
    /// Rest after WeChat said "too often".
    #[serde(with = "humantime_serde")]
    pub cooldown: Duration,
    /// Texts in GeWe's `msg`/`data.msg` that mean "too often".
    #[serde(with = "text_list")]
    pub cooldown_on: Vec<String>,
    /// Longest a command waits for its account before it expires.
    #[serde(with = "humantime_serde")]
    pub max_wait: Duration,
    /// Per-`appId` settings (TOML only).
    #[serde(default)]
    pub overrides: BTreeMap<String, AccountOverride>,
}

/// What `accounts.overrides."<appId>"` may set for one account.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AccountOverride {
    /// Its own daily limit (0: none).
    #[serde(default)]
    pub daily_limit: Option<u32>,
    /// Its own active hours when set (`Some(None)`: `""`, all day).
    #[serde(default, with = "override_hours")]
    pub active_hours: Option<Option<ActiveHours>>,
    /// Its own gap between call starts.
    #[serde(default, with = "humantime_serde")]
    pub per_app_min_interval: Option<Duration>,
    /// Its own calls in flight at once.
    #[serde(default)]
    pub per_app_concurrency: Option<u32>,
}

/// A daily window `HH:MM-HH:MM`, start inclusive, end exclusive; an end
/// before the start wraps midnight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActiveHours {
    /// Minutes after midnight the window opens.
    pub start: u16,
    /// Minutes after midnight the window closes.
    pub end: u16,
}

impl ActiveHours {
    /// Whether the minute of the day `minute` (0..1440) is inside.
    pub fn contains(self, minute: u16) -> bool {
        if self.start <= self.end {
            (self.start..self.end).contains(&minute)
        } else {
            minute >= self.start || minute < self.end
        }
    }
}

impl FromStr for ActiveHours {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let bad = || format!("`{text}` is not a window like 08:30-22:00");
        let (start, end) = text.trim().split_once('-').ok_or_else(bad)?;
        let minute = |hm: &str| -> Option<u16> {
            let (h, m) = hm.trim().split_once(':')?;
            let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
            (h < 24 && m < 60 && hm.trim().len() == 5).then_some(h * 60 + m)
        };
        let (start, end) = (minute(start).ok_or_else(bad)?, minute(end).ok_or_else(bad)?);
        if start == end {
            return Err(format!(
                "`{text}` opens and closes at the same minute; leave it empty for all day"
            ));
        }
        Ok(Self { start, end })
    }
}

impl fmt::Display for ActiveHours {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hm = |m: u16| format!("{:02}:{:02}", m / 60, m % 60);
        write!(f, "{}-{}", hm(self.start), hm(self.end))
    }
}

/// `active_hours` as a string; empty means all day.
mod optional_hours {
    use super::*;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<ActiveHours>, D::Error> {
        let text = String::deserialize(d)?;
        if text.trim().is_empty() {
            return Ok(None);
        }
        text.parse().map(Some).map_err(de::Error::custom)
    }

    pub fn serialize<S: Serializer>(v: &Option<ActiveHours>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(h) => s.serialize_str(&h.to_string()),
            None => s.serialize_str(""),
        }
    }
}

/// An override's `active_hours`: absent keeps the default, `""` is all day.
mod override_hours {
    use super::*;

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Option<ActiveHours>>, D::Error> {
        super::optional_hours::deserialize(d).map(Some)
    }

    pub fn serialize<S: Serializer>(
        v: &Option<Option<ActiveHours>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match v {
            Some(hours) => super::optional_hours::serialize(hours, s),
            None => s.serialize_none(),
        }
    }
}

/// A list of texts: a TOML list, or from the environment one
/// comma-separated string.
mod text_list {
    use super::*;

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Texts {
        One(String),
        Many(Vec<String>),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
        let texts = match Texts::deserialize(d)? {
            Texts::One(text) => text.split(',').map(str::to_owned).collect(),
            Texts::Many(texts) => texts,
        };
        Ok(texts
            .into_iter()
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty())
            .collect())
    }

    pub fn serialize<S: Serializer>(v: &[String], s: S) -> Result<S::Ok, S::Error> {
        v.serialize(s)
    }
}

/// Longest `accounts.cooldown` / `accounts.max_wait` accepted: beyond it a
/// typo (`6d` for `6h`) would silence an account for a season.
const LONGEST: Duration = Duration::from_secs(90 * 24 * 3600);

impl AccountsSettings {
    /// Checks what the types do not: a known zone, sane durations, texts
    /// that can match, overrides that can work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if jiff::tz::TimeZone::get(&self.timezone).is_err() {
            return Err(ConfigError::invalid(
                "accounts.timezone",
                format!(
                    "`{}` is not an IANA time zone (e.g. Asia/Shanghai, UTC)",
                    self.timezone
                ),
            ));
        }
        for (key, d) in [
            ("accounts.cooldown", self.cooldown),
            ("accounts.max_wait", self.max_wait),
        ] {
            if d < Duration::from_secs(1) || d > LONGEST {
                return Err(ConfigError::invalid(key, "must be between 1s and 90d"));
            }
        }
        if self.cooldown_on.is_empty() {
            return Err(ConfigError::invalid(
                "accounts.cooldown_on",
                "must name at least one text (WeChat's \"too often\" answer says 频繁)",
            ));
        }
        for (app, o) in &self.overrides {
            if app.trim().is_empty() {
                return Err(ConfigError::invalid(
                    "accounts.overrides",
                    "has a table without an appId",
                ));
            }
            if o.per_app_concurrency == Some(0) {
                return Err(ConfigError::invalid(
                    "accounts.overrides",
                    format!("\"{app}\".per_app_concurrency must be at least 1"),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_parse_and_wrap_midnight() {
        let day: ActiveHours = "08:30-22:00".parse().unwrap();
        assert!(day.contains(8 * 60 + 30) && !day.contains(22 * 60) && !day.contains(0));
        let night: ActiveHours = "22:00-06:00".parse().unwrap();
        assert!(night.contains(23 * 60) && night.contains(0) && !night.contains(6 * 60));
        assert_eq!(night.to_string(), "22:00-06:00");
        for bad in ["8-22", "24:00-01:00", "08:60-09:00", "08:00", "09:00-09:00"] {
            assert!(bad.parse::<ActiveHours>().is_err(), "{bad}");
        }
    }
}
