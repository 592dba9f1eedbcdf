//! Deadlines for everything reprovm waits on. Instead of bare sleep loops,
//! callers poll a condition until a [`Deadline`] passes; the timeout error says
//! what was awaited, for how long, and the last cause seen.

use std::fmt::Display;
use std::time::{Duration, Instant};

/// Waiting for something took longer than allowed.
#[derive(Debug, thiserror::Error)]
#[error("timed out after {waited:.1?} waiting for {what}{}", last_cause.as_ref().map(|c| format!(" (last: {c})")).unwrap_or_default())]
pub struct Timeout {
    /// What was awaited, e.g. "an authenticated SSH session".
    pub what: String,
    /// How long it was awaited.
    pub waited: Duration,
    /// The last error seen while polling, if any.
    pub last_cause: Option<String>,
}

/// A point in time by which something must have happened.
#[derive(Clone, Copy, Debug)]
pub struct Deadline {
    start: Instant,
    limit: Duration,
}

impl Deadline {
    /// A deadline `limit` from now.
    pub fn after(limit: Duration) -> Self {
        Deadline { start: Instant::now(), limit }
    }

    /// Time left before the deadline (zero once passed).
    pub fn remaining(&self) -> Duration {
        self.limit.saturating_sub(self.start.elapsed())
    }

    /// Whether the deadline has passed.
    pub fn passed(&self) -> bool {
        self.start.elapsed() >= self.limit
    }

    /// The timeout error for `what`, with the last cause seen.
    pub fn timeout(&self, what: &str, last_cause: Option<String>) -> Timeout {
        Timeout { what: what.to_string(), waited: self.start.elapsed(), last_cause }
    }

    /// Polls `attempt` every `interval` until it returns `Ok(Some(_))`, an error
    /// that is final (`Err`), or the deadline passes. `Ok(None)` with a cause
    /// means "not yet" and the cause is kept for the timeout message.
    pub async fn poll<T, E: Display>(
        &self,
        what: &str,
        interval: Duration,
        mut attempt: impl FnMut() -> Result<T, E>,
    ) -> Result<T, Timeout> {
        loop {
            let cause = match attempt() {
                Ok(value) => return Ok(value),
                Err(cause) => cause.to_string(),
            };
            if self.passed() {
                return Err(self.timeout(what, Some(cause)));
            }
            tokio::time::sleep(interval.min(self.remaining())).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn poll_returns_first_success() {
        let mut n = 0;
        let got = Deadline::after(Duration::from_secs(5))
            .poll("n to reach 3", Duration::from_millis(1), || {
                n += 1;
                if n >= 3 { Ok(n) } else { Err("too small") }
            })
            .await
            .unwrap();
        assert_eq!(got, 3);
    }

    #[tokio::test]
    async fn poll_timeout_names_what_and_last_cause() {
        let err = Deadline::after(Duration::from_millis(20))
            .poll("the moon", Duration::from_millis(5), || Err::<(), _>("still dark"))
            .await
            .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("waiting for the moon"), "{msg}");
        assert!(msg.contains("last: still dark"), "{msg}");
    }
}
