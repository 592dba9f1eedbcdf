//! What a run's egress did: the downloads (replayable), the tunnels
//! (unrecorded HTTPS) and every refused request, in a stable order.

use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::egress::EgressError;

/// One recorded HTTP exchange: the bytes the guest received for a request.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Download {
    /// `GET` or `HEAD`.
    pub method: String,
    /// The full URL, host in lowercase, without a default `:80`.
    pub url: String,
    /// The upstream status code (every status is recorded, not only 200).
    pub status: u16,
    /// The body's length in bytes.
    pub size: u64,
    /// Lowercase hex SHA-256 of the body bytes the guest received.
    pub sha256: String,
}

/// HTTPS through CONNECT: reached, but its content is not recorded.
/// One entry per host and port, with the bytes of all its tunnels added up.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tunnel {
    /// The host as requested (canonical).
    pub host: String,
    /// The port.
    pub port: u16,
    /// Bytes from the guest to the host.
    pub bytes_up: u64,
    /// Bytes from the host to the guest.
    pub bytes_down: u64,
}

/// A request the proxy did not satisfy, and why.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Refusal {
    /// The request method.
    pub method: String,
    /// The URL, or `host:port` for CONNECT.
    pub target: String,
    /// The status sent to the guest (0 when the connection was cut instead).
    pub status: u16,
    /// Why, in one line.
    pub reason: String,
}

/// Everything one run's proxy did. Each list is sorted and free of duplicates.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EgressReport {
    /// What was downloaded (and can be replayed).
    pub downloads: Vec<Download>,
    /// HTTPS tunnels, per host and port.
    pub tunnels: Vec<Tunnel>,
    /// Refused or failed requests.
    pub refused: Vec<Refusal>,
}

/// The start of a refusal's reason for a body that did not match its hash.
const MISMATCH_PREFIX: &str = "hash mismatch: expected ";
/// Between the expected and the actual hash in that reason.
const MISMATCH_ACTUAL: &str = " actual ";

/// The refusal reason for a body hashing to `actual` instead of `expected`
/// (read back by [`EgressReport::check_hashes`]).
pub(crate) fn mismatch_reason(expected: &str, actual: &str) -> String {
    format!("{MISMATCH_PREFIX}{expected}{MISMATCH_ACTUAL}{actual}")
}

impl EgressReport {
    /// Sorts each list and removes duplicates; tunnels to one host and port
    /// become one entry with their bytes added up.
    pub fn normalize(&mut self) {
        self.downloads.sort();
        self.downloads.dedup();
        self.refused.sort();
        self.refused.dedup();
        self.tunnels.sort();
        let mut merged: Vec<Tunnel> = Vec::with_capacity(self.tunnels.len());
        for t in self.tunnels.drain(..) {
            match merged.last_mut() {
                Some(last) if last.host == t.host && last.port == t.port => {
                    last.bytes_up = last.bytes_up.saturating_add(t.bytes_up);
                    last.bytes_down = last.bytes_down.saturating_add(t.bytes_down);
                }
                _ => merged.push(t),
            }
        }
        self.tunnels = merged;
    }

    /// `Err(HashMismatch)` for the first replayed or fetched body that did not
    /// match its recorded SHA-256 (a 502 refusal), which reprovm reports as a
    /// pin mismatch (exit 3).
    pub fn check_hashes(&self) -> Result<(), EgressError> {
        for r in self.refused.iter().filter(|r| r.status == 502) {
            if let Some((expected, actual)) = r.reason.strip_prefix(MISMATCH_PREFIX).and_then(|rest| rest.split_once(MISMATCH_ACTUAL)) {
                return Err(EgressError::HashMismatch {
                    url: r.target.clone(),
                    expected: expected.to_string(),
                    actual: actual.to_string(),
                });
            }
        }
        Ok(())
    }
}

/// The report as it fills up, shared by the proxy's connections.
#[derive(Debug, Default)]
pub(crate) struct Recorder(Mutex<EgressReport>);

impl Recorder {
    fn with(&self, f: impl FnOnce(&mut EgressReport)) {
        // A poisoned lock only means a connection task panicked mid-push: the report is still usable.
        let mut report = self.0.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut report);
    }

    /// Records a completed download.
    pub(crate) fn download(&self, d: Download) {
        self.with(|r| r.downloads.push(d));
    }

    /// Records a tunnel's byte counts.
    pub(crate) fn tunnel(&self, t: Tunnel) {
        self.with(|r| r.tunnels.push(t));
    }

    /// Records a refusal.
    pub(crate) fn refuse(&self, method: &str, target: &str, status: u16, reason: String) {
        tracing::info!("egress refused {} {} ({status}): {}", method, crate::escape::escape(target), crate::escape::escape(&reason));
        self.with(|r| r.refused.push(Refusal { method: method.to_string(), target: target.to_string(), status, reason }));
    }

    /// The final, normalized report.
    pub(crate) fn take(&self) -> EgressReport {
        let mut report = std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()));
        report.normalize();
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_is_sorted_deduplicated_and_tunnels_are_merged() {
        let rec = Recorder::default();
        let d = |url: &str| Download { method: "GET".into(), url: url.into(), status: 200, size: 1, sha256: "ab".into() };
        rec.download(d("http://b/"));
        rec.download(d("http://a/"));
        rec.download(d("http://b/"));
        rec.tunnel(Tunnel { host: "h".into(), port: 443, bytes_up: 1, bytes_down: 2 });
        rec.tunnel(Tunnel { host: "h".into(), port: 443, bytes_up: 10, bytes_down: 20 });
        rec.refuse("GET", "http://x/", 403, "no".into());
        rec.refuse("GET", "http://x/", 403, "no".into());
        let report = rec.take();
        assert_eq!(report.downloads, vec![d("http://a/"), d("http://b/")]);
        assert_eq!(report.tunnels, vec![Tunnel { host: "h".into(), port: 443, bytes_up: 11, bytes_down: 22 }]);
        assert_eq!(report.refused.len(), 1);
        assert!(report.check_hashes().is_ok());
    }

    #[test]
    fn a_mismatch_refusal_reads_back_as_hash_mismatch() {
        let mut report = EgressReport::default();
        report.refused.push(Refusal {
            method: "GET".into(),
            target: "http://h/f".into(),
            status: 502,
            reason: mismatch_reason("aa", "bb"),
        });
        match report.check_hashes() {
            Err(EgressError::HashMismatch { url, expected, actual }) => {
                assert_eq!((url.as_str(), expected.as_str(), actual.as_str()), ("http://h/f", "aa", "bb"))
            }
            other => panic!("{other:?}"),
        }
    }
}
