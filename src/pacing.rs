//! Per-account pacing of GeWe calls (`pacing.*`) and the account's budget
//! (§7), asked together before every call.
//!
//! WeChat restricts accounts that add friends in bursts, so for each `appId`
//! at most `per_app_concurrency` calls run at once in this process (a
//! semaphore) and two call starts are at least `per_app_min_interval` apart
//! (reserved, with the daily unit, by [`Accounts::admit`]: in Redis across
//! replicas when configured). A turn further away than the delivery may be
//! held, or an account that rests, ends the wait with [`NoTurn::Rest`]: the
//! command is deferred, not held. A reservation given up stays spent (later
//! calls only start later); an unsent request's daily unit is given back.
//! Idle accounts' semaphores are dropped so memory does not grow with the
//! accounts ever seen.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore},
    time::Instant,
};

use crate::{
    accounts::{Accounts, Rest, Unit},
    halt::{Halt, Interrupted},
    meters::meters,
};

/// Sweep idle accounts once the map holds this many entries.
const SWEEP_THRESHOLD: usize = 1024;

/// Why a call gets no turn now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoTurn {
    /// The wait ended (shutdown, lost session, hold deadline).
    Interrupted(Interrupted),
    /// The account rests, or its turn is too far away: defer.
    Rest(Rest),
}

impl From<Interrupted> for NoTurn {
    fn from(i: Interrupted) -> Self {
        NoTurn::Interrupted(i)
    }
}

/// The pacer shared by all command tasks.
pub struct Pacer {
    accounts: Arc<Accounts>,
    /// ahash: randomly seeded per process like std's SipHash, so input
    /// cannot pick collisions, and cheaper on short keys.
    slots: Mutex<HashMap<String, Arc<Semaphore>, ahash::RandomState>>,
}

/// Held while a GeWe call for the account is in flight. Dropped without
/// [`Turn::sent`], its daily unit is given back: the request never left.
pub struct Turn {
    _permit: Option<OwnedSemaphorePermit>,
    unit: Option<Unit>,
    accounts: Arc<Accounts>,
    /// Time spent waiting for this turn.
    pub waited: Duration,
}

impl Turn {
    /// The request went out; `reached_wechat` false gives the day's unit
    /// back (GeWe's answer shows WeChat never saw it).
    pub async fn sent(mut self, reached_wechat: bool) {
        if let Some(unit) = self.unit.take()
            && !reached_wechat
        {
            self.accounts.give_back(unit).await;
        }
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        if let Some(unit) = self.unit.take() {
            // Abandoned before the request left (shutdown, lost session):
            // rare, so a task here costs nothing on the usual path.
            let accounts = self.accounts.clone();
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move { accounts.give_back(unit).await });
            }
        }
    }
}

impl Pacer {
    /// A pacer keeping `accounts`' budgets.
    pub fn new(accounts: Arc<Accounts>) -> Self {
        Self {
            accounts,
            slots: Mutex::new(HashMap::default()),
        }
    }

    /// The budgets it keeps.
    pub fn accounts(&self) -> &Arc<Accounts> {
        &self.accounts
    }

    /// Waits until `app_id` may start a call, then takes the start. A turn
    /// further away than `halt`'s hold deadline, or an account that rests,
    /// is [`NoTurn::Rest`].
    pub async fn turn(&self, app_id: &str, halt: &Halt) -> Result<Turn, NoTurn> {
        let began = Instant::now();
        let slots = self.slots(app_id);
        // The semaphore is never closed.
        let permit = halt
            .guard(slots.acquire_owned())
            .await?
            .map_err(|_| NoTurn::Interrupted(Interrupted::Shutdown))?;
        let mut turn = loop {
            // No turn is reserved while the store does not answer (a Redis
            // failover): it would be reserved against a master that may be
            // gone.
            self.accounts.until_ready(halt).await?;
            let admitted = match self.accounts.admit(app_id, halt.hold_left(), halt).await? {
                Ok(admitted) => admitted,
                Err(rest) => return Err(NoTurn::Rest(rest)),
            };
            let mut turn = Turn {
                _permit: None,
                unit: Some(admitted.unit),
                accounts: self.accounts.clone(),
                waited: Duration::ZERO,
            };
            if admitted.wait.is_zero() {
                break turn;
            }
            halt.sleep(admitted.wait).await?;
            if !self.accounts.ready() {
                // Redis went away while this call waited: by the time it
                // answers the reserved start may be long past, so another
                // call could start right after this one. Its unit goes back
                // and a new turn is reserved.
                if let Some(unit) = turn.unit.take() {
                    self.accounts.give_back(unit).await;
                }
                continue;
            }
            // The account may have started resting while this call waited
            // (the previous call met "too often").
            if let Some(rest) = self.accounts.rests_now(app_id, halt).await? {
                if let Some(unit) = turn.unit.take() {
                    self.accounts.give_back(unit).await;
                }
                return Err(NoTurn::Rest(rest));
            }
            break turn;
        };
        turn._permit = Some(permit);
        turn.waited = began.elapsed();
        meters().pacing_wait.record(turn.waited.as_secs_f64());
        Ok(turn)
    }

    /// Accounts currently tracked (for tests and metrics).
    pub fn tracked_accounts(&self) -> usize {
        self.slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    fn slots(&self, app_id: &str) -> Arc<Semaphore> {
        let mut map = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(a) = map.get(app_id) {
            return a.clone();
        }
        if map.len() >= SWEEP_THRESHOLD {
            // Idle: nobody holds or waits for it (its interval lives in
            // the ledger), so forgetting it changes nothing.
            map.retain(|_, a| Arc::strong_count(a) > 1);
        }
        let concurrency = self.accounts.policy(app_id).concurrency.max(1) as usize;
        let a = Arc::new(Semaphore::new(concurrency));
        map.insert(app_id.to_owned(), a.clone());
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        accounts::{
            calendar::Calendar,
            ledger::{Ledger, MemoryLedger},
            policy::Policies,
        },
        config::Settings,
    };

    fn pacer(concurrency: u32, interval_ms: u64) -> Arc<Pacer> {
        let mut settings = Settings::load_from(None, Some(Default::default())).expect("defaults");
        settings.pacing.per_app_concurrency = concurrency;
        settings.pacing.per_app_min_interval = Duration::from_millis(interval_ms);
        let accounts = Accounts::new(
            Policies::new(&settings.accounts, &settings.pacing),
            Calendar::new(jiff::tz::TimeZone::UTC),
            Arc::new(TokioClock {
                base: 1_764_770_000_000,
                start: Instant::now(),
            }),
            Ledger::Memory(MemoryLedger::new()),
        );
        Arc::new(Pacer::new(Arc::new(accounts)))
    }

    /// The budgets' clock on tokio's time, so a paused test clock drives
    /// both the reservations and the waits (the wall clock would let a
    /// loaded machine's scheduling show up as short gaps).
    struct TokioClock {
        base: u64,
        start: Instant,
    }

    impl crate::accounts::calendar::Clock for TokioClock {
        fn now_ms(&self) -> u64 {
            self.base + u64::try_from(self.start.elapsed().as_millis()).unwrap_or(0)
        }
    }

    #[tokio::test(start_paused = true)]
    async fn starts_of_one_account_are_spaced() {
        let p = pacer(5, 100);
        let t0 = Instant::now();
        let mut starts = Vec::new();
        for _ in 0..3 {
            let turn = p.turn("a", &Halt::never()).await.expect("turn");
            starts.push(t0.elapsed());
            turn.sent(true).await;
        }
        for w in starts.windows(2) {
            assert!(w[1] - w[0] >= Duration::from_millis(100), "{starts:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn other_accounts_are_not_delayed() {
        let p = pacer(1, 60_000);
        let _a1 = p.turn("a", &Halt::never()).await.expect("turn");
        let t0 = Instant::now();
        let _b = p.turn("b", &Halt::never()).await.expect("turn");
        assert!(t0.elapsed() < Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn concurrency_limits_calls_in_flight() {
        let p = pacer(1, 0);
        let first = p.turn("a", &Halt::never()).await.expect("turn");
        let p2 = p.clone();
        let waiter =
            tokio::spawn(async move { p2.turn("a", &Halt::never()).await.map(|t| t.waited) });
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(!waiter.is_finished());
        drop(first);
        let waited = waiter.await.expect("joined").expect("turn");
        assert!(waited >= Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn a_turn_beyond_the_hold_is_a_rest_not_a_wait() {
        let p = pacer(5, 60_000);
        p.turn("a", &Halt::never())
            .await
            .expect("turn")
            .sent(true)
            .await;
        let halt = Halt::never().holding_until(Instant::now() + Duration::from_secs(10));
        let t0 = Instant::now();
        match p.turn("a", &halt).await {
            Err(NoTurn::Rest(Rest::Pacing(_))) => {}
            Err(other) => panic!("{other:?}"),
            Ok(_) => panic!("a turn a minute away within a 10 s hold"),
        }
        assert!(t0.elapsed() < Duration::from_secs(1), "not waited for");
    }

    #[tokio::test]
    async fn idle_accounts_are_forgotten() {
        let p = pacer(1, 0);
        for i in 0..5_000 {
            p.turn(&format!("app-{i}"), &Halt::never())
                .await
                .expect("turn")
                .sent(true)
                .await;
        }
        assert!(
            p.tracked_accounts() <= SWEEP_THRESHOLD + 1,
            "{}",
            p.tracked_accounts()
        );
    }
}
