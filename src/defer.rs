//! Deferring commands through the broker (contract §7).
//!
//! A command whose account cannot send now (over its daily limit, outside
//! its hours, cooling down, paused) or that would wait longer than
//! `amqp.max_hold` is not held unacknowledged: RabbitMQ closes a channel
//! whose delivery stays unacked past its `consumer_timeout`. It is
//! republished to one of three delay queues whose TTL hands it back to the
//! command queue, and the delivery is acked once that copy is confirmed.
//! Three fixed delays keep the topology static (declared with the rest and
//! in `definitions.json`) while a backlog costs at most one delivery per
//! command per hour.

use std::time::Duration;

use crate::{accounts::calendar::Millis, config::defer_queue_name};

/// The deferral ladder: `<command_queue>.defer.1m`, `.10m`, `.1h`.
pub const DEFER_DELAYS: [Duration; 3] = [
    Duration::from_secs(60),
    Duration::from_secs(600),
    Duration::from_secs(3600),
];

/// A deferral queue and its delay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeferSlot {
    /// The queue.
    pub queue: String,
    /// Its delay.
    pub delay: Duration,
}

/// The longest delay of the ladder that does not pass `until` (when the
/// account may send again), the shortest when every one would; an unknown
/// end (a pause until resumed) waits the longest.
pub fn defer_slot(command_queue: &str, until: Option<Millis>, now: Millis) -> DeferSlot {
    let delay = match until {
        None => DEFER_DELAYS[DEFER_DELAYS.len() - 1],
        Some(until) => {
            let left = Duration::from_millis(until.saturating_sub(now));
            DEFER_DELAYS
                .iter()
                .rev()
                .find(|d| **d <= left)
                .copied()
                .unwrap_or(DEFER_DELAYS[0])
        }
    };
    DeferSlot {
        queue: defer_queue_name(command_queue, delay),
        delay,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_delay_that_does_not_pass_the_opening() {
        let slot = |left_s: u64| defer_slot("cmds", Some(1_000 + left_s * 1000), 1_000).queue;
        assert_eq!(slot(5), "cmds.defer.1m");
        assert_eq!(slot(60), "cmds.defer.1m");
        assert_eq!(slot(599), "cmds.defer.1m");
        assert_eq!(slot(600), "cmds.defer.10m");
        assert_eq!(slot(3599), "cmds.defer.10m");
        assert_eq!(slot(20 * 3600), "cmds.defer.1h");
        assert_eq!(defer_slot("cmds", None, 0).queue, "cmds.defer.1h");
    }
}
