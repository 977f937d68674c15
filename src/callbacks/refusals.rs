//! Log lines about refused callback requests, at most one a second per
//! status, with the count since the last line (contract §6): a flood of
//! forged or oversized requests must not flood the logs too (one WARN per
//! 401 made 7,067 lines in 10 s).

use std::{
    collections::HashMap,
    sync::{Mutex, PoisonError},
    time::Duration,
};

use tokio::time::Instant;

/// Least time between two lines about one status.
pub const LOG_EVERY: Duration = Duration::from_secs(1);

/// Refusals per status since the last line about it.
#[derive(Default)]
pub struct Refusals {
    statuses: Mutex<HashMap<u16, Tally>>,
}

struct Tally {
    logged_at: Instant,
    since: u64,
}

impl Refusals {
    /// Counts one refusal with `status`; returns how many to report when a
    /// line is due now (this one included), `None` when it is not.
    pub fn note(&self, status: u16) -> Option<u64> {
        let now = Instant::now();
        let mut statuses = self.statuses.lock().unwrap_or_else(PoisonError::into_inner);
        match statuses.get_mut(&status) {
            Some(tally) if now.duration_since(tally.logged_at) < LOG_EVERY => {
                tally.since += 1;
                None
            }
            Some(tally) => {
                let count = tally.since + 1;
                tally.since = 0;
                tally.logged_at = now;
                Some(count)
            }
            None => {
                statuses.insert(
                    status,
                    Tally {
                        logged_at: now,
                        since: 0,
                    },
                );
                Some(1)
            }
        }
    }

    /// Counts a refusal and writes the line when one is due.
    pub fn log(&self, status: u16, why: &str) {
        if let Some(count) = self.note(status) {
            tracing::warn!(
                status,
                count,
                "callback requests refused since the last such line: {why}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn one_line_a_second_per_status_with_the_count() {
        let r = Refusals::default();
        assert_eq!(r.note(401), Some(1));
        for _ in 0..999 {
            assert_eq!(r.note(401), None);
        }
        assert_eq!(r.note(503), Some(1), "each status on its own");
        tokio::time::advance(LOG_EVERY).await;
        assert_eq!(r.note(401), Some(1000));
        assert_eq!(r.note(401), None);
    }
}
