//! The budget state of every account in this process's memory: exact for
//! one replica, lost on restart (the README says to use Redis for more).

use std::{
    collections::HashMap,
    sync::{Mutex, PoisonError},
};

use super::{Admission, AdmitRequest, KEEP_MS, Snapshot};
use crate::accounts::calendar::Millis;

/// Look for forgotten accounts once the map holds this many.
const SWEEP_AT: usize = 4096;

#[derive(Debug, Default)]
struct Entry {
    seen: Millis,
    day: String,
    sent: u32,
    next_start: Millis,
    paused: Option<Option<Millis>>,
    pause_reason: Option<String>,
    cool_until: Option<Millis>,
    cool_reason: Option<String>,
    last_sent: Option<Millis>,
    last_outcome: Option<&'static str>,
}

impl Entry {
    fn rest(&self, now: Millis) -> Option<Admission> {
        match self.paused {
            Some(None) => return Some(Admission::Paused(None)),
            Some(Some(until)) if until > now => return Some(Admission::Paused(Some(until))),
            _ => {}
        }
        self.cool_until
            .filter(|until| *until > now)
            .map(Admission::Cooling)
    }
}

/// Budget state in memory.
#[derive(Debug, Default)]
pub struct MemoryLedger {
    accounts: Mutex<HashMap<String, Entry, ahash::RandomState>>,
}

impl MemoryLedger {
    /// An empty ledger.
    pub fn new() -> Self {
        Self::default()
    }

    fn with<T>(&self, app_id: &str, now: Millis, f: impl FnOnce(&mut Entry) -> T) -> T {
        let mut map = self.accounts.lock().unwrap_or_else(PoisonError::into_inner);
        if map.len() >= SWEEP_AT && !map.contains_key(app_id) {
            map.retain(|_, e| e.seen + KEEP_MS > now || e.paused == Some(None));
        }
        let entry = map.entry(app_id.to_owned()).or_default();
        entry.seen = entry.seen.max(now);
        f(entry)
    }

    /// See [`super::Ledger::admit`].
    pub fn admit(&self, req: &AdmitRequest<'_>) -> Admission {
        self.with(req.app_id, req.now, |e| {
            if let Some(rest) = e.rest(req.now) {
                return rest;
            }
            if e.day != req.day {
                e.day = req.day.to_owned();
                e.sent = 0;
            }
            if req.limit > 0 && e.sent >= req.limit {
                return Admission::OverLimit;
            }
            let start = if req.interval_ms > 0 {
                req.now.max(e.next_start)
            } else {
                req.now
            };
            let wait_ms = start - req.now;
            if wait_ms > req.max_wait_ms {
                return Admission::TooFar { wait_ms };
            }
            e.sent += 1;
            e.next_start = start.saturating_add(req.interval_ms);
            e.last_sent = Some(start);
            Admission::Go { wait_ms }
        })
    }

    /// See [`super::Ledger::rests_now`].
    pub fn rests_now(&self, app_id: &str, now: Millis) -> Option<Admission> {
        self.with(app_id, now, |e| e.rest(now))
    }

    /// See [`super::Ledger::give_back`].
    pub fn give_back(&self, app_id: &str, day: &str) {
        let mut map = self.accounts.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(e) = map.get_mut(app_id)
            && e.day == day
        {
            e.sent = e.sent.saturating_sub(1);
        }
    }

    /// See [`super::Ledger::cool_down`].
    pub fn cool_down(&self, app_id: &str, until: Millis, reason: &str) {
        self.with(app_id, 0, |e| {
            e.cool_until = Some(until);
            e.cool_reason = Some(reason.to_owned());
        });
    }

    /// See [`super::Ledger::note_outcome`].
    pub fn note_outcome(&self, app_id: &str, outcome: &'static str) {
        self.with(app_id, 0, |e| e.last_outcome = Some(outcome));
    }

    /// See [`super::Ledger::pause`].
    pub fn pause(&self, app_id: &str, until: Option<Millis>, reason: Option<&str>, now: Millis) {
        self.with(app_id, now, |e| {
            e.paused = Some(until);
            e.pause_reason = reason.map(str::to_owned);
        });
    }

    /// See [`super::Ledger::resume`].
    pub fn resume(&self, app_id: &str) {
        let mut map = self.accounts.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(e) = map.get_mut(app_id) {
            e.paused = None;
            e.pause_reason = None;
        }
    }

    /// See [`super::Ledger::list`].
    pub fn list(&self, since: Millis) -> Vec<Snapshot> {
        let map = self.accounts.lock().unwrap_or_else(PoisonError::into_inner);
        map.iter()
            .filter(|(_, e)| e.seen >= since || e.paused.is_some())
            .map(|(app, e)| Snapshot {
                app_id: app.clone(),
                day: e.day.clone(),
                sent: e.sent,
                paused: e.paused,
                pause_reason: e.pause_reason.clone(),
                cool_until: e.cool_until,
                cool_reason: e.cool_reason.clone(),
                last_sent: e.last_sent,
                last_outcome: e.last_outcome.map(str::to_owned),
            })
            .collect()
    }
}
