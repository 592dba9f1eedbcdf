//! Deadlines for everything reprovm waits on. Instead of bare sleep loops,
//! waiting loops run until a [`Deadline`] passes; its timeout error says what
//! was awaited, for how long, and the last cause seen.

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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeout_names_what_and_last_cause() {
        let deadline = Deadline::after(Duration::ZERO);
        assert!(deadline.passed());
        assert_eq!(deadline.remaining(), Duration::ZERO);
        let msg = deadline.timeout("the moon", Some("still dark".into())).to_string();
        assert!(msg.contains("waiting for the moon"), "{msg}");
        assert!(msg.contains("last: still dark"), "{msg}");
    }

    #[test]
    fn remaining_counts_down() {
        let deadline = Deadline::after(Duration::from_secs(60));
        assert!(!deadline.passed());
        assert!(deadline.remaining() > Duration::from_secs(59));
    }
}
