//! Parking commands in the broker through outages (`retry.park`, contract §4).
//!
//! A command that ends `app_offline` or `upstream_unavailable` while delays
//! remain is republished, unchanged but for two headers that count its
//! tries, to a delay queue `<amqp.command_queue>.park.<delay>`. The queue's
//! message TTL is the delay and its dead-letter target is the command queue,
//! so the broker hands the command back when the delay has passed: nothing
//! waits in the worker's memory, and a restart loses nothing.
//!
//! This module picks the delay queue for a command's next try
//! ([`Parking::next`]); the try counters travel in the command's headers
//! ([`crate::command::with_tries`]) and the queues are declared with
//! the rest of the topology ([`crate::broker::topology::declare_delay_queues`]).

use std::time::Duration;

use crate::config::delay_queue_name;

/// Where a command goes when it cannot be carried out now.
#[derive(Debug, Clone)]
pub struct Parking {
    command_queue: String,
    delays: Vec<Duration>,
}

/// A delay queue to park a command in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    /// The delay queue.
    pub queue: String,
    /// Its delay.
    pub delay: Duration,
}

impl Parking {
    /// Parking into `command_queue`'s delay queues for `delays` (empty: off).
    pub fn new(command_queue: &str, delays: &[Duration]) -> Self {
        Self {
            command_queue: command_queue.to_owned(),
            delays: delays.to_vec(),
        }
    }

    /// The delay queue for a command parked `parked` times so far, while
    /// delays remain.
    pub fn next(&self, parked: u32) -> Option<Slot> {
        let delay = *self.delays.get(usize::try_from(parked).ok()?)?;
        Some(Slot {
            queue: delay_queue_name(&self.command_queue, delay),
            delay,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_name_their_queues_and_run_out() {
        let parking = Parking::new(
            "cmds",
            &[Duration::from_secs(60), Duration::from_secs(5400)],
        );
        assert_eq!(
            parking.next(0).map(|s| s.queue),
            Some("cmds.park.1m".into())
        );
        assert_eq!(
            parking.next(1).map(|s| s.queue),
            Some("cmds.park.1h30m".into())
        );
        assert_eq!(parking.next(2), None);
        assert_eq!(Parking::new("cmds", &[]).next(0), None);
    }
}
