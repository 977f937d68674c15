//! One task per commandId in this process at a time.
//!
//! A delivery holds its commandId from the moment it looks for a stored
//! outcome until its event is confirmed (or it gives up). Copies of the same
//! commandId delivered meanwhile wait here, then find the outcome and its
//! published mark, so only the first confirmed event goes out unmarked.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
};

use tokio::sync::Notify;

use crate::halt::{Halt, Interrupted};

/// The commandIds held by tasks of this process.
#[derive(Default)]
pub struct LocalClaims {
    /// ahash: randomly seeded per process like std's SipHash, so input
    /// cannot pick collisions, and cheaper on short commandIds.
    held: Mutex<HashMap<String, Arc<Notify>, ahash::RandomState>>,
}

/// Holds a commandId in this process; dropping it wakes the waiters.
pub struct LocalGuard<'a> {
    claims: &'a LocalClaims,
    command_id: &'a str,
    released: Arc<Notify>,
}

impl LocalClaims {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Arc<Notify>, ahash::RandomState>> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes `command_id`, waiting while another task of this process holds it.
    pub async fn acquire<'a>(
        &'a self,
        command_id: &'a str,
        halt: &Halt,
    ) -> Result<LocalGuard<'a>, Interrupted> {
        loop {
            let holder = {
                let mut held = self.lock();
                match held.get(command_id) {
                    Some(holder) => holder.clone(),
                    None => {
                        let released = Arc::new(Notify::new());
                        held.insert(command_id.to_owned(), released.clone());
                        return Ok(LocalGuard {
                            claims: self,
                            command_id,
                            released,
                        });
                    }
                }
            };
            let notified = holder.notified();
            tokio::pin!(notified);
            // Registered before looking again, so a release between the
            // look and the wait is not missed.
            notified.as_mut().enable();
            let still_held = self
                .lock()
                .get(command_id)
                .is_some_and(|current| Arc::ptr_eq(current, &holder));
            if still_held {
                halt.guard(notified).await?;
            }
        }
    }

    /// How many commandIds are held (for tests).
    #[cfg(test)]
    pub fn held(&self) -> usize {
        self.lock().len()
    }
}

impl Drop for LocalGuard<'_> {
    fn drop(&mut self) {
        let mut held = self.claims.lock();
        if held
            .get(self.command_id)
            .is_some_and(|current| Arc::ptr_eq(current, &self.released))
        {
            held.remove(self.command_id);
        }
        drop(held);
        self.released.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn a_second_task_waits_until_the_first_lets_go() {
        let claims = Arc::new(LocalClaims::default());
        let first = claims.acquire("c", &Halt::never()).await.expect("free");
        let waiter = tokio::spawn({
            let claims = claims.clone();
            async move {
                let _g = claims
                    .acquire("c", &Halt::never())
                    .await
                    .expect("after release");
            }
        });
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(!waiter.is_finished(), "waits while held");
        let other = claims.acquire("d", &Halt::never()).await;
        assert!(other.is_ok(), "other ids are not held up");
        drop(other);
        drop(first);
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("woken")
            .expect("join");
        assert_eq!(claims.held(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_halted_waiter_gives_up() {
        let claims = LocalClaims::default();
        let _first = claims.acquire("c", &Halt::never()).await.expect("free");
        let session = crate::halt::Signal::new();
        let halt = Halt::new(crate::halt::Signal::new(), session.clone());
        session.raise();
        assert_eq!(
            claims.acquire("c", &halt).await.err(),
            Some(Interrupted::SessionLost)
        );
    }
}
