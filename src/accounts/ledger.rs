//! Where each account's budget state lives: in this process, or in Redis
//! for every replica (`redis.url`). Both keep the same state and answer the
//! same questions; only Redis makes the daily limit hold across replicas
//! and restarts.

mod memory;
mod redis;

pub use memory::MemoryLedger;
pub use redis::RedisLedger;

use super::{AccountError, calendar::Millis};
use crate::halt::{Halt, Interrupted};

/// What [`Ledger::admit`] asks for one GeWe call.
#[derive(Debug, Clone)]
pub struct AdmitRequest<'a> {
    /// The account.
    pub app_id: &'a str,
    /// Key of the account's current day.
    pub day: &'a str,
    /// Daily limit; 0: none.
    pub limit: u32,
    /// Least gap between call starts, in ms; 0: none.
    pub interval_ms: u64,
    /// Longest acceptable wait for the turn, in ms (what is left of
    /// `amqp.max_hold`).
    pub max_wait_ms: u64,
    /// Now (the budgets' clock).
    pub now: Millis,
}

/// The answer to [`Ledger::admit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// A unit of the day is taken and the start reserved `wait_ms` from now.
    Go {
        /// Wait before the call starts.
        wait_ms: u64,
    },
    /// Paused by an operator until then (`None`: until resumed).
    Paused(Option<Millis>),
    /// Cooling down until then.
    Cooling(Millis),
    /// The day's limit is reached.
    OverLimit,
    /// The next turn is further away than allowed (nothing reserved).
    TooFar {
        /// How far away it is.
        wait_ms: u64,
    },
}

/// One account's state as stored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// The account.
    pub app_id: String,
    /// Key of the day `sent` counts.
    pub day: String,
    /// Units taken that day.
    pub sent: u32,
    /// `Some(None)`: paused until resumed; `Some(Some(t))`: until `t`.
    pub paused: Option<Option<Millis>>,
    /// The operator's reason.
    pub pause_reason: Option<String>,
    /// End of a cooldown (may be past).
    pub cool_until: Option<Millis>,
    /// The text that started it.
    pub cool_reason: Option<String>,
    /// Start of its last call.
    pub last_sent: Option<Millis>,
    /// Outcome of its last call.
    pub last_outcome: Option<String>,
}

/// Days an account is remembered after it was last seen; the console lists
/// seven.
pub const KEEP_DAYS: u64 = 8;
/// [`KEEP_DAYS`] in milliseconds.
pub const KEEP_MS: u64 = KEEP_DAYS * 24 * 3600 * 1000;

/// The budget store.
pub enum Ledger {
    /// In this process.
    Memory(MemoryLedger),
    /// In Redis, shared by every replica.
    Redis(RedisLedger),
}

impl Ledger {
    /// Atomically checks pause, cooldown and the daily limit, then takes a
    /// unit and reserves the pacing turn. Waits while Redis is unavailable
    /// (no call is made meanwhile).
    pub async fn admit(
        &self,
        req: &AdmitRequest<'_>,
        halt: &Halt,
    ) -> Result<Admission, Interrupted> {
        match self {
            Ledger::Memory(m) => Ok(m.admit(req)),
            Ledger::Redis(r) => r.admit(req, halt).await,
        }
    }

    /// Whether the store answers now (memory: always).
    pub fn healthy(&self) -> bool {
        match self {
            Ledger::Memory(_) => true,
            Ledger::Redis(r) => r.healthy(),
        }
    }

    /// Waits until the store answers (memory: at once).
    pub async fn until_healthy(&self, halt: &Halt) -> Result<(), Interrupted> {
        match self {
            Ledger::Memory(_) => Ok(()),
            Ledger::Redis(r) => halt.guard(r.until_healthy()).await,
        }
    }

    /// Whether the account is paused or cooling down at `now`.
    pub async fn rests_now(
        &self,
        app_id: &str,
        now: Millis,
        halt: &Halt,
    ) -> Result<Option<Admission>, Interrupted> {
        match self {
            Ledger::Memory(m) => Ok(m.rests_now(app_id, now)),
            Ledger::Redis(r) => r.rests_now(app_id, now, halt).await,
        }
    }

    /// Returns a unit of `day` that WeChat never saw.
    pub async fn give_back(&self, app_id: &str, day: &str) {
        match self {
            Ledger::Memory(m) => m.give_back(app_id, day),
            Ledger::Redis(r) => r.give_back(app_id, day).await,
        }
    }

    /// Rests the account until `until`.
    pub async fn cool_down(&self, app_id: &str, until: Millis, reason: &str, now: Millis) {
        match self {
            Ledger::Memory(m) => m.cool_down(app_id, until, reason),
            Ledger::Redis(r) => r.cool_down(app_id, until, reason, now).await,
        }
    }

    /// Notes the outcome of the account's last call (for the console).
    pub fn note_outcome(&self, app_id: &str, outcome: &'static str) {
        match self {
            Ledger::Memory(m) => m.note_outcome(app_id, outcome),
            Ledger::Redis(r) => r.note_outcome(app_id, outcome),
        }
    }

    /// Pauses the account until `until` (`None`: until resumed).
    pub async fn pause(
        &self,
        app_id: &str,
        until: Option<Millis>,
        reason: Option<&str>,
        now: Millis,
    ) -> Result<(), AccountError> {
        match self {
            Ledger::Memory(m) => {
                m.pause(app_id, until, reason, now);
                Ok(())
            }
            Ledger::Redis(r) => r.pause(app_id, until, reason, now).await,
        }
    }

    /// Ends a pause.
    pub async fn resume(&self, app_id: &str) -> Result<(), AccountError> {
        match self {
            Ledger::Memory(m) => {
                m.resume(app_id);
                Ok(())
            }
            Ledger::Redis(r) => r.resume(app_id).await,
        }
    }

    /// Every account seen since `since`.
    pub async fn list(&self, since: Millis) -> Result<Vec<Snapshot>, AccountError> {
        match self {
            Ledger::Memory(m) => Ok(m.list(since)),
            Ledger::Redis(r) => r.list(since).await,
        }
    }
}
