//! What each account may do: the configured budgets (`accounts.*`, with
//! `pacing.*` as the default pace), resolved per `appId` once at start-up.

use std::{collections::HashMap, time::Duration};

use crate::config::{AccountsSettings, ActiveHours, PacingSettings};

/// The budgets of one account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Requests per day that may reach WeChat; `None`: no limit.
    pub daily_limit: Option<u32>,
    /// When calls may start; `None`: all day.
    pub active_hours: Option<ActiveHours>,
    /// Least gap between two call starts.
    pub interval: Duration,
    /// Calls in flight at once (in one process).
    pub concurrency: u32,
}

/// Every account's policy, plus what is the same for all of them.
#[derive(Debug, Clone)]
pub struct Policies {
    default: Policy,
    overrides: HashMap<String, Policy>,
    /// Rest after a "too often" answer.
    pub cooldown: Duration,
    cooldown_on: Vec<String>,
    /// Longest wait for an account before a command expires.
    pub max_wait: Duration,
}

impl Policies {
    /// The policies `accounts` and `pacing` configure.
    pub fn new(accounts: &AccountsSettings, pacing: &PacingSettings) -> Self {
        let default = Policy {
            daily_limit: (accounts.daily_limit > 0).then_some(accounts.daily_limit),
            active_hours: accounts.active_hours,
            interval: pacing.per_app_min_interval,
            concurrency: pacing.per_app_concurrency.max(1),
        };
        let overrides = accounts
            .overrides
            .iter()
            .map(|(app, o)| {
                let limit = o
                    .daily_limit
                    .map_or(default.daily_limit, |n| (n > 0).then_some(n));
                let policy = Policy {
                    daily_limit: limit,
                    // `""` in an override opens that account all day.
                    active_hours: o.active_hours.unwrap_or(default.active_hours),
                    interval: o.per_app_min_interval.unwrap_or(default.interval),
                    concurrency: o.per_app_concurrency.unwrap_or(default.concurrency).max(1),
                };
                (app.clone(), policy)
            })
            .collect();
        Self {
            default,
            overrides,
            cooldown: accounts.cooldown,
            cooldown_on: accounts.cooldown_on.clone(),
            max_wait: accounts.max_wait,
        }
    }

    /// The policy of `app_id`.
    pub fn of(&self, app_id: &str) -> &Policy {
        self.overrides.get(app_id).unwrap_or(&self.default)
    }

    /// The one of `texts` (GeWe's `msg` and `data.msg`) that holds a
    /// configured text, when WeChat said the account adds friends too
    /// often: what the cooldown's log line and the console show.
    pub fn too_often<'a>(&self, texts: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
        let texts: Vec<&str> = texts.into_iter().collect();
        texts.into_iter().find(|t| {
            self.cooldown_on
                .iter()
                .any(|needle| t.contains(needle.as_str()))
        })
    }

    /// Whether any account has a budget beyond pacing (a limit or a
    /// window); without one, and without Redis, nothing but pacing is kept.
    pub fn any_budget(&self) -> bool {
        let budgeted = |p: &Policy| p.daily_limit.is_some() || p.active_hours.is_some();
        budgeted(&self.default) || self.overrides.values().any(budgeted)
    }
}
