//! Remembered `v3`s and accepted marks in this process (no `redis.url`):
//! bounded, per process, lost on restart.

use std::{
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use quick_cache::sync::Cache;
use tokio::time::Instant;

use super::{CLAIM_LEASE, Claim, Mark, Sent, sent_key};
use crate::bounded_cache;

/// Bound on the `v3`s remembered, and on the accepted marks kept (quick_cache
/// evicts beyond it). An entry is about half a KiB (a `v3` is ~200
/// characters, plus the ids), so each cache stays within ~10 MiB. Beyond
/// it the oldest unmatched `v3`s are forgotten before `callbacks.match_window`
/// ends; deployments with more friend requests per window set `redis.url`.
pub const MAX_REMEMBERED: usize = 20_000;

struct Kept {
    at: Instant,
    sent: Sent,
}

#[derive(Debug)]
enum State {
    Free,
    Claimed { owner: String, until: Instant },
    Announced { at: Instant },
}

/// The in-process store.
pub struct MemoryStore {
    sent: Cache<String, Arc<Kept>>,
    marks: Cache<String, Arc<Mutex<State>>>,
    window: Duration,
}

impl MemoryStore {
    /// Remembers for `window`.
    pub fn new(window: Duration) -> Self {
        Self {
            sent: bounded_cache::new(MAX_REMEMBERED),
            marks: bounded_cache::new(MAX_REMEMBERED),
            window,
        }
    }

    pub(super) fn remember(&self, sent: &Sent) {
        let key = sent_key(&sent.app_id, &sent.v3);
        if self.lookup(&sent.app_id, &sent.v3).is_none() {
            let kept = Kept {
                at: Instant::now(),
                sent: sent.clone(),
            };
            self.sent.insert(key, Arc::new(kept));
        }
    }

    pub(super) fn lookup(&self, app_id: &str, v3: &str) -> Option<Sent> {
        let key = sent_key(app_id, v3);
        let kept = self.sent.get(key.as_str())?;
        if kept.at.elapsed() < self.window {
            return Some(kept.sent.clone());
        }
        self.sent.remove_if(key.as_str(), |k| Arc::ptr_eq(k, &kept));
        None
    }

    fn mark(&self, command_id: &str) -> Arc<Mutex<State>> {
        let Ok(mark) = self.marks.get_or_insert_with(command_id, || {
            Ok::<_, std::convert::Infallible>(Arc::new(Mutex::new(State::Free)))
        });
        mark
    }

    pub(super) fn claim(&self, claim: Claim) -> Mark {
        let mark = self.mark(&claim.command_id);
        let mut state = mark.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        match &*state {
            State::Announced { at } if now.duration_since(*at) < self.window => Mark::Repeated,
            State::Claimed { owner, until } if *owner != claim.owner && now < *until => Mark::Held,
            State::Free | State::Claimed { .. } | State::Announced { .. } => {
                *state = State::Claimed {
                    owner: claim.owner.clone(),
                    until: now + CLAIM_LEASE,
                };
                Mark::Claimed(claim)
            }
        }
    }

    pub(super) fn announced(&self, claim: &Claim) {
        let mark = self.mark(&claim.command_id);
        *mark.lock().unwrap_or_else(PoisonError::into_inner) =
            State::Announced { at: Instant::now() };
    }

    pub(super) fn release(&self, claim: &Claim) {
        let Some(mark) = self.marks.get(claim.command_id.as_str()) else {
            return;
        };
        let mut state = mark.lock().unwrap_or_else(PoisonError::into_inner);
        if matches!(&*state, State::Claimed { owner, .. } if *owner == claim.owner) {
            *state = State::Free;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent(i: usize) -> Sent {
        Sent {
            command_id: format!("c{i}"),
            app_id: "app".into(),
            chatroom_id: "1@chatroom".into(),
            member_wxid: "wxid_m".into(),
            v3: format!("v3_{i}@stranger"),
            correlation_id: format!("c{i}"),
            completed_at: "2024-05-01T08:00:00.000Z".into(),
        }
    }

    fn claim(id: &str) -> Claim {
        Claim {
            command_id: id.into(),
            owner: uuid::Uuid::new_v4().to_string(),
        }
    }

    #[test]
    fn it_stays_bounded_and_keeps_the_recent_v3s() {
        let store = MemoryStore::new(Duration::from_secs(3600));
        let total = MAX_REMEMBERED * 3;
        for i in 0..total {
            store.remember(&sent(i));
        }
        assert!(store.sent.len() <= MAX_REMEMBERED);
        let recent = MAX_REMEMBERED * 8 / 10;
        let kept = (total - recent..total)
            .filter(|i| store.lookup("app", &format!("v3_{i}@stranger")).is_some())
            .count();
        assert_eq!(
            kept, recent,
            "of the last {recent} v3s only {kept} are kept"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_v3_matches_its_account_only_and_within_the_window() {
        let store = MemoryStore::new(Duration::from_secs(60));
        store.remember(&sent(1));
        assert_eq!(store.lookup("app", "v3_1@stranger"), Some(sent(1)));
        assert_eq!(store.lookup("other", "v3_1@stranger"), None);
        // Keys cannot be spelt by another pair.
        assert_eq!(store.lookup("ap", "p:v3_1@stranger"), None);
        tokio::time::advance(Duration::from_secs(61)).await;
        assert_eq!(store.lookup("app", "v3_1@stranger"), None);
    }

    #[tokio::test(start_paused = true)]
    async fn one_claim_at_a_time_and_repeats_after_the_announcement() {
        let store = MemoryStore::new(Duration::from_secs(600));
        let Mark::Claimed(first) = store.claim(claim("c1")) else {
            panic!("free at first");
        };
        assert!(matches!(store.claim(claim("c1")), Mark::Held));
        store.release(&first);
        let Mark::Claimed(second) = store.claim(claim("c1")) else {
            panic!("free after a release");
        };
        // A holder that never comes back is replaced after the lease.
        tokio::time::advance(CLAIM_LEASE + Duration::from_secs(1)).await;
        let Mark::Claimed(third) = store.claim(claim("c1")) else {
            panic!("free after the lease");
        };
        store.release(&second);
        assert!(matches!(store.claim(claim("c1")), Mark::Held), "{third:?}");
        store.announced(&third);
        assert!(matches!(store.claim(claim("c1")), Mark::Repeated));
        assert!(matches!(store.claim(claim("c2")), Mark::Claimed(_)));
    }
}
