//! Remembered `v3`s and accepted marks in this process (no `redis.url`):
//! bounded, per process, lost on restart.

use std::{
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use quick_cache::sync::Cache;
use tokio::time::Instant;

use super::{CLAIM_LEASE, Claim, Fields, MAX_PER_V3, Mark, Phase, Remembered, Sent, v3_digest};
use crate::bounded_cache;

/// Bound on the `(appId, v3)` entries remembered, and on the accepted marks
/// kept (quick_cache evicts beyond it). An entry of one command is about a
/// quarter of a KiB (the ids; the `v3` itself is not kept), so each cache
/// stays within a few MiB. Beyond it the oldest unmatched entries are
/// forgotten before `callbacks.match_window` ends; deployments with more
/// friend requests per window set `redis.url`.
pub const MAX_REMEMBERED: usize = 20_000;

/// One command remembered for a `v3`.
struct Kept {
    at: Instant,
    command_id: String,
    phase: Phase,
    fields: Fields,
}

/// The commands of one `(appId, v3)`, oldest first.
type Entry = Arc<Mutex<Vec<Kept>>>;

#[derive(Debug)]
enum State {
    Free,
    Claimed { owner: String, until: Instant },
    Announced { at: Instant },
}

/// The in-process store.
pub struct MemoryStore {
    sent: Cache<[u8; 32], Entry>,
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

    pub(super) fn remember(&self, sent: &Sent, phase: Phase) {
        let digest = v3_digest(&sent.app_id, &sent.v3);
        let Ok(entry) = self.sent.get_or_insert_with(&digest, || {
            Ok::<_, std::convert::Infallible>(Entry::default())
        });
        let mut kept = entry.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        kept.retain(|k| now.duration_since(k.at) < self.window);
        match kept.iter_mut().find(|k| k.command_id == sent.command_id) {
            Some(known) => {
                if phase == Phase::Confirmed {
                    known.phase = Phase::Confirmed;
                }
            }
            None => {
                if kept.len() >= MAX_PER_V3 {
                    kept.remove(0);
                }
                kept.push(Kept {
                    at: now,
                    command_id: sent.command_id.clone(),
                    phase,
                    fields: sent.fields.clone(),
                });
            }
        }
    }

    pub(super) fn lookup(&self, app_id: &str, v3: &str) -> Vec<Remembered> {
        let Some(entry) = self.sent.get(&v3_digest(app_id, v3)) else {
            return Vec::new();
        };
        let kept = entry.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        kept.iter()
            .filter(|k| now.duration_since(k.at) < self.window)
            .map(|k| Remembered {
                sent: Sent {
                    command_id: k.command_id.clone(),
                    app_id: app_id.to_owned(),
                    v3: v3.to_owned(),
                    fields: k.fields.clone(),
                },
                phase: k.phase,
            })
            .collect()
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

    fn sent(i: usize, v3: &str) -> Sent {
        Sent {
            command_id: format!("c{i}"),
            app_id: "app".into(),
            v3: v3.into(),
            fields: Fields {
                chatroom_id: "1@chatroom".into(),
                member_wxid: "wxid_m".into(),
                correlation_id: format!("c{i}"),
                completed_at: "2024-05-01T08:00:00.000Z".into(),
            },
        }
    }

    fn claim(id: &str) -> Claim {
        Claim {
            command_id: id.into(),
            owner: uuid::Uuid::new_v4().to_string(),
        }
    }

    fn ids(found: &[Remembered]) -> Vec<(&str, Phase)> {
        found
            .iter()
            .map(|r| (r.sent.command_id.as_str(), r.phase))
            .collect()
    }

    #[test]
    fn it_stays_bounded_and_keeps_the_recent_v3s() {
        let store = MemoryStore::new(Duration::from_secs(3600));
        let total = MAX_REMEMBERED * 3;
        for i in 0..total {
            store.remember(&sent(i, &format!("v3_{i}@stranger")), Phase::Confirmed);
        }
        assert!(store.sent.len() <= MAX_REMEMBERED);
        let recent = MAX_REMEMBERED * 8 / 10;
        let kept = (total - recent..total)
            .filter(|i| !store.lookup("app", &format!("v3_{i}@stranger")).is_empty())
            .count();
        assert_eq!(
            kept, recent,
            "of the last {recent} v3s only {kept} are kept"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_v3_matches_its_account_only_and_within_the_window() {
        let store = MemoryStore::new(Duration::from_secs(60));
        store.remember(&sent(1, "v3_1@stranger"), Phase::Confirmed);
        let found = store.lookup("app", "v3_1@stranger");
        assert_eq!(ids(&found), [("c1", Phase::Confirmed)]);
        assert_eq!(found[0].sent, sent(1, "v3_1@stranger"));
        assert!(store.lookup("other", "v3_1@stranger").is_empty());
        // Entries cannot be spelt by another pair.
        assert!(store.lookup("ap", "pv3_1@stranger").is_empty());
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(store.lookup("app", "v3_1@stranger").is_empty());
    }

    #[test]
    fn a_reused_v3_holds_every_command_and_pending_never_undoes_a_confirmation() {
        let store = MemoryStore::new(Duration::from_secs(3600));
        let v3 = "v3_same@stranger";
        store.remember(&sent(1, v3), Phase::Pending);
        store.remember(&sent(2, v3), Phase::Pending);
        assert_eq!(
            ids(&store.lookup("app", v3)),
            [("c1", Phase::Pending), ("c2", Phase::Pending)]
        );
        store.remember(&sent(1, v3), Phase::Confirmed);
        store.remember(&sent(1, v3), Phase::Pending);
        assert_eq!(
            ids(&store.lookup("app", v3)),
            [("c1", Phase::Confirmed), ("c2", Phase::Pending)]
        );
        for i in 3..MAX_PER_V3 + 10 {
            store.remember(&sent(i, v3), Phase::Confirmed);
        }
        let found = store.lookup("app", v3);
        assert_eq!(found.len(), MAX_PER_V3);
        assert_eq!(
            found.last().map(|r| r.sent.command_id.clone()),
            Some(format!("c{}", MAX_PER_V3 + 9))
        );
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
