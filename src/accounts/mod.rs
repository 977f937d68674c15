//! Account budgets (contract §7): what each WeChat account may still send
//! today, and when, and the operator's view of it (§8).
//!
//! WeChat restricts accounts that add friends too eagerly, and a banned
//! account is what users of this worker lose. So before every GeWe call the
//! account is asked, in one step ([`Accounts::admit`]): is it paused, cooling
//! down after a "too often" answer, outside its active hours, over its daily
//! limit, or is its next pacing turn too far away? If so the command is not
//! held in memory but deferred through the broker ([`Rest`] says why and
//! until when). If not, a unit of the day is taken and the turn reserved.
//! A unit is given back when WeChat never saw the request.

pub mod calendar;
pub mod ledger;
pub mod policy;
#[cfg(test)]
mod tests;
pub mod view;

pub use view::{AccountState, AccountView};

use std::{future::Future, pin::Pin, sync::Arc, time::Duration};

use calendar::{Calendar, Clock, Day, Millis};
use ledger::{Admission, AdmitRequest, Ledger, Snapshot};
use policy::{Policies, Policy};

use crate::{
    halt::{Halt, Interrupted},
    meters::{Deferral, meters},
    timestamp,
};

/// Why an operator's request about accounts could not be answered.
#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    /// The state store (Redis) did not answer; nothing was changed.
    #[error("account state is unavailable: {0}")]
    Unavailable(String),
}

/// A boxed future, so the trait stays object-safe for the admin API.
pub type AccountFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, AccountError>> + Send + 'a>>;

/// The accounts as an operator steers them (contract §8). Implemented by the
/// budget keeper; the admin API and console hold it as `Arc<dyn …>`.
pub trait AccountDirectory: Send + Sync {
    /// Every account seen in the last 7 days, sorted by appId.
    fn list(&self) -> AccountFuture<'_, Vec<AccountView>>;
    /// Pauses `app_id` for `duration` (until resumed when `None`); its
    /// commands are deferred with reason `paused`.
    fn pause<'a>(
        &'a self,
        app_id: &'a str,
        duration: Option<Duration>,
        reason: Option<&'a str>,
    ) -> AccountFuture<'a, ()>;
    /// Ends a pause of `app_id` (a no-op when it is not paused).
    fn resume<'a>(&'a self, app_id: &'a str) -> AccountFuture<'a, ()>;
}

/// Why an account's command cannot be sent now, and until when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rest {
    /// The day's limit is used up until the day ends.
    DailyLimit(Millis),
    /// Outside active hours until they open.
    ActiveHours(Millis),
    /// Cooling down until then.
    Cooldown(Millis),
    /// Paused by an operator (until resumed when `None`).
    Paused(Option<Millis>),
    /// The pacing turn is this far away (more than `amqp.max_hold`).
    Pacing(Millis),
}

impl Rest {
    /// The `commands_deferred_total` reason.
    pub fn reason(self) -> Deferral {
        match self {
            Rest::DailyLimit(_) => Deferral::DailyLimit,
            Rest::ActiveHours(_) => Deferral::ActiveHours,
            Rest::Cooldown(_) => Deferral::Cooldown,
            Rest::Paused(_) => Deferral::Paused,
            Rest::Pacing(_) => Deferral::Pacing,
        }
    }

    /// When the account may send again, if known.
    pub fn until(self) -> Option<Millis> {
        match self {
            Rest::DailyLimit(t) | Rest::ActiveHours(t) | Rest::Cooldown(t) | Rest::Pacing(t) => {
                Some(t)
            }
            Rest::Paused(t) => t,
        }
    }
}

/// A unit of an account's day, taken for one call.
#[derive(Debug)]
pub struct Unit {
    app_id: String,
    day: String,
}

/// A call admitted: wait this long, then send.
#[derive(Debug)]
pub struct Admitted {
    /// Wait before the call starts (the pacing turn).
    pub wait: Duration,
    /// The day's unit it took.
    pub unit: Unit,
}

/// The budget keeper: policies, the calendar and the state of every account.
pub struct Accounts {
    policies: Policies,
    calendar: Calendar,
    clock: Arc<dyn Clock>,
    ledger: Ledger,
    /// The day of the last call, reused until it ends: formatting a date
    /// in a time zone on every call costs more than the rest of admitting.
    today: std::sync::Mutex<Option<Day>>,
}

impl Accounts {
    /// A keeper with `policies`, days read by `calendar`, state in `ledger`.
    pub fn new(
        policies: Policies,
        calendar: Calendar,
        clock: Arc<dyn Clock>,
        ledger: Ledger,
    ) -> Self {
        Self {
            policies,
            calendar,
            clock,
            ledger,
            today: std::sync::Mutex::new(None),
        }
    }

    /// The keeper `settings` configure, on the system clock, with its state
    /// in Redis when a client is given (shared by every replica).
    pub fn from_settings(
        settings: &crate::config::Settings,
        redis: Option<Arc<crate::redis_client::RedisClient>>,
        redis_prefix: &str,
    ) -> Result<Self, jiff::Error> {
        let zone = jiff::tz::TimeZone::get(&settings.accounts.timezone)?;
        let ledger = match redis {
            Some(client) => Ledger::Redis(ledger::RedisLedger::new(client, redis_prefix)),
            None => Ledger::Memory(ledger::MemoryLedger::new()),
        };
        Ok(Self::new(
            Policies::new(&settings.accounts, &settings.pacing),
            Calendar::new(zone),
            Arc::new(calendar::SystemClock),
            ledger,
        ))
    }

    /// The budgets of `app_id`.
    pub fn policy(&self, app_id: &str) -> &Policy {
        self.policies.of(app_id)
    }

    /// The policies (cooldown texts, max wait).
    pub fn policies(&self) -> &Policies {
        &self.policies
    }

    /// Now, on the budgets' clock.
    pub fn now(&self) -> Millis {
        self.clock.now_ms()
    }

    fn day(&self, now: Millis) -> Day {
        let mut today = self
            .today
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match &*today {
            Some(day) if (day.starts_at..day.ends_at).contains(&now) => day.clone(),
            _ => {
                let day = self.calendar.day(now);
                *today = Some(day.clone());
                day
            }
        }
    }

    /// Asks whether `app_id` may send now, waiting at most `hold_left` for
    /// its pacing turn. `Ok(Ok(_))`: a unit is taken and the turn reserved;
    /// `Ok(Err(rest))`: defer the command.
    pub async fn admit(
        &self,
        app_id: &str,
        hold_left: Duration,
        halt: &Halt,
    ) -> Result<Result<Admitted, Rest>, Interrupted> {
        let policy = self.policies.of(app_id);
        let now = self.now();
        if let Some(hours) = policy.active_hours
            && let Some(opens) = self.calendar.closed_until(hours, now)
        {
            return Ok(Err(Rest::ActiveHours(opens)));
        }
        let day = self.day(now);
        let request = AdmitRequest {
            app_id,
            day: &day.key,
            limit: policy.daily_limit.unwrap_or(0),
            interval_ms: ms(policy.interval),
            max_wait_ms: ms(hold_left),
            now,
        };
        Ok(match self.ledger.admit(&request, halt).await? {
            Admission::Go { wait_ms } => Ok(Admitted {
                wait: Duration::from_millis(wait_ms),
                unit: Unit {
                    app_id: app_id.to_owned(),
                    day: day.key,
                },
            }),
            Admission::OverLimit => Err(Rest::DailyLimit(day.ends_at)),
            Admission::TooFar { wait_ms } => Err(Rest::Pacing(now.saturating_add(wait_ms))),
            other => Err(rest_of(&other, now)),
        })
    }

    /// Waits until the budget store answers (Redis through a failover).
    pub async fn until_ready(&self, halt: &Halt) -> Result<(), Interrupted> {
        self.ledger.until_healthy(halt).await
    }

    /// Whether the budget store answers now.
    pub fn ready(&self) -> bool {
        self.ledger.healthy()
    }

    /// Whether `app_id` started resting (a pause, a cooldown) since it was
    /// admitted: asked after a pacing wait, so a call does not go out
    /// right after another one met "too often".
    pub async fn rests_now(&self, app_id: &str, halt: &Halt) -> Result<Option<Rest>, Interrupted> {
        let now = self.now();
        Ok(self
            .ledger
            .rests_now(app_id, now, halt)
            .await?
            .map(|a| rest_of(&a, now)))
    }

    /// Gives `unit` back: WeChat never saw its request.
    pub async fn give_back(&self, unit: Unit) {
        self.ledger.give_back(&unit.app_id, &unit.day).await;
    }

    /// Rests `app_id` for `accounts.cooldown` because WeChat answered
    /// `text`; returns when the rest ends.
    pub async fn cool_down(&self, app_id: &str, text: &str) -> Millis {
        let now = self.now();
        let until = now.saturating_add(ms(self.policies.cooldown));
        meters().account_cooldowns.increment(1);
        tracing::warn!(
            app_id,
            until = %timestamp::format_millis(until),
            answer = text,
            "WeChat says this account adds friends too often; it rests until then"
        );
        self.ledger.cool_down(app_id, until, text, now).await;
        until
    }

    /// Notes the outcome of `app_id`'s last call, for the console.
    pub fn note_outcome(&self, app_id: &str, outcome: &'static str) {
        self.ledger.note_outcome(app_id, outcome);
    }

    /// The operator's view of every account seen in the last 7 days.
    pub async fn views(&self) -> Result<Vec<AccountView>, AccountError> {
        let now = self.now();
        let day = self.day(now);
        let since = now.saturating_sub(7 * 24 * 3600 * 1000);
        let mut views: Vec<AccountView> = self
            .ledger
            .list(since)
            .await?
            .into_iter()
            .map(|s| self.view(s, now, &day))
            .collect();
        views.sort_by(|a, b| a.app_id.cmp(&b.app_id));
        Ok(views)
    }

    fn view(&self, s: Snapshot, now: Millis, day: &Day) -> AccountView {
        let policy = self.policies.of(&s.app_id);
        let sent_today = if s.day == day.key { s.sent } else { 0 };
        let closed = policy
            .active_hours
            .and_then(|h| self.calendar.closed_until(h, now));
        let cooling = s.cool_until.filter(|t| *t > now);
        let paused = match s.paused {
            Some(Some(t)) if t <= now => None,
            p => p,
        };
        let (state, resting_until, reason) = if let Some(until) = paused {
            (AccountState::Paused, until, s.pause_reason.clone())
        } else if let Some(until) = cooling {
            (
                AccountState::CoolingDown,
                Some(until),
                s.cool_reason.clone(),
            )
        } else if let Some(opens) = closed {
            (AccountState::OutsideHours, Some(opens), None)
        } else if policy.daily_limit.is_some_and(|l| sent_today >= l) {
            (AccountState::OverLimit, Some(day.ends_at), None)
        } else {
            (AccountState::Active, None, None)
        };
        AccountView {
            app_id: s.app_id,
            state,
            sent_today,
            daily_limit: policy.daily_limit,
            resting_until: resting_until.map(timestamp::format_millis),
            reason: reason.filter(|r| !r.is_empty()),
            last_sent_at: s.last_sent.map(timestamp::format_millis),
            last_outcome: s.last_outcome,
        }
    }
}

impl AccountDirectory for Accounts {
    fn list(&self) -> AccountFuture<'_, Vec<AccountView>> {
        Box::pin(self.views())
    }

    fn pause<'a>(
        &'a self,
        app_id: &'a str,
        duration: Option<Duration>,
        reason: Option<&'a str>,
    ) -> AccountFuture<'a, ()> {
        Box::pin(async move {
            let now = self.now();
            let until = duration.map(|d| now.saturating_add(ms(d)));
            self.ledger.pause(app_id, until, reason, now).await
        })
    }

    fn resume<'a>(&'a self, app_id: &'a str) -> AccountFuture<'a, ()> {
        Box::pin(self.ledger.resume(app_id))
    }
}

fn rest_of(admission: &Admission, now: Millis) -> Rest {
    match *admission {
        Admission::Paused(until) => Rest::Paused(until),
        Admission::Cooling(until) => Rest::Cooldown(until),
        Admission::OverLimit => Rest::DailyLimit(now),
        Admission::TooFar { wait_ms } => Rest::Pacing(now.saturating_add(wait_ms)),
        Admission::Go { .. } => Rest::Pacing(now),
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
