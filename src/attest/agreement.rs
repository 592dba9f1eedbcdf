//! Agreement: do at least N distinct trusted rebuilders attest the
//! published bytes? Every envelope in a directory gets a verdict (read
//! within its cap, a DSSE envelope of in-toto type, signed by a trusted key
//! whose signature verifies, a SLSA provenance statement); then each
//! published artifact is counted: the trusted keys whose accepted
//! statements attest exactly its published SHA-256. Without published
//! hashes the reference is the hash most keys attest (a tie has none). The
//! threshold is met when every artifact has at least N such keys. The
//! outcome can be summarised as a SLSA Verification Summary Attestation.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::{self, Write as _};
use std::path::{Path, PathBuf};

use serde_json::json;
use sha2::{Digest, Sha256};
use time::format_description::well_known::Rfc3339;

use crate::attest::dsse::{Envelope, SignatureCheck, MAX_ENVELOPE};
use crate::attest::keys::TrustedKeys;
use crate::attest::statement::{self, Attested, ResourceDescriptor, Statement, STATEMENT_TYPE};
use crate::attest::{read_regular_capped, ReadError};
use crate::escape::escape;
use crate::path_error::{path_error, PathError};
use crate::rebuild::compare::Status;
use crate::rebuild::result::Record;

/// `predicateType` of a SLSA Verification Summary Attestation v1.
pub const VSA_TYPE: &str = "https://slsa.dev/verification_summary/v1";
/// `verifier.id` of reprovm's summaries.
pub const VERIFIER_ID: &str = "https://reprovm.invalid/attestations/verifier/v1";
/// The policy a summary names: N distinct trusted keys attest every artifact.
pub const POLICY_URI: &str = "https://reprovm.invalid/attestations/policy/threshold/v1";

/// The directory of envelopes cannot be listed.
#[derive(Debug, thiserror::Error)]
pub enum AgreementError {
    /// Listing the directory failed.
    #[error(transparent)]
    List(#[from] PathError),
}

/// Why an envelope counts for nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rejection {
    /// Cannot be read, or larger than the cap.
    Unreadable(String),
    /// Not a DSSE envelope (truncated, not JSON, bad base64, unsigned).
    Malformed(String),
    /// Its payload type is not in-toto's.
    PayloadType(String),
    /// No signature names a trusted key.
    UnknownKey(Vec<String>),
    /// A signature names a trusted key that does not verify it.
    BadSignature(String),
    /// The signed payload is not a usable provenance statement.
    Statement(String),
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rejection::Unreadable(why) => write!(f, "UNREADABLE: {why}"),
            Rejection::Malformed(why) => write!(f, "MALFORMED: {why}"),
            Rejection::PayloadType(why) => write!(f, "WRONG PAYLOAD TYPE: {why}"),
            Rejection::UnknownKey(ids) if ids.is_empty() => write!(f, "UNKNOWN KEY: no signature names a key (keyid empty)"),
            Rejection::UnknownKey(ids) => write!(f, "UNKNOWN KEY: signed by {}, not in the trusted keys", ids.join(", ")),
            Rejection::BadSignature(id) => {
                write!(f, "BAD SIGNATURE: {id}'s signature does not verify (the envelope was changed after signing, or forged)")
            }
            Rejection::Statement(why) => write!(f, "NOT A PROVENANCE STATEMENT: {why}"),
        }
    }
}

/// One envelope file and its verdict.
#[derive(Clone, Debug)]
pub struct EnvelopeReport {
    /// The file name within the directory, escaped.
    pub name: String,
    /// SHA-256 of the file (empty when it was not read).
    pub sha256: String,
    /// Accepted (the trusted signers and what they attest) or rejected.
    pub verdict: Result<(Vec<usize>, Attested), Rejection>,
}

/// One artifact counted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tally {
    /// Artifact path.
    pub path: String,
    /// The published (or, without them, the majority) SHA-256.
    pub reference: Option<String>,
    /// Trusted keys that attest exactly the reference.
    pub agree: Vec<usize>,
    /// Trusted keys that attest something else (or two different hashes).
    pub differ: Vec<usize>,
    /// Trusted keys with accepted statements that do not list the artifact.
    pub missing: Vec<usize>,
}

/// The whole check.
#[derive(Clone, Debug)]
pub struct Report {
    /// Every envelope, in file-name order.
    pub envelopes: Vec<EnvelopeReport>,
    /// Every artifact of the reference set.
    pub tallies: Vec<Tally>,
    /// The number of distinct trusted keys required per artifact.
    pub threshold: usize,
    /// Whether every artifact has `threshold` agreeing keys.
    pub met: bool,
}

/// Reads and judges one envelope file.
fn judge(path: &Path, trusted: &TrustedKeys) -> (String, Result<(Vec<usize>, Attested), Rejection>) {
    let bytes = match read_regular_capped(path, MAX_ENVELOPE) {
        Ok(bytes) => bytes,
        Err(ReadError::TooLarge { .. }) => {
            return (String::new(), Err(Rejection::Unreadable(format!("larger than {} MiB: refused unread", MAX_ENVELOPE >> 20))))
        }
        Err(ReadError::NotRegular { .. }) => {
            return (String::new(), Err(Rejection::Unreadable("not a regular file (links are not followed)".into())))
        }
        Err(ReadError::Io(e)) => return (String::new(), Err(Rejection::Unreadable(e.source.to_string()))),
    };
    let sha256 = hex::encode(Sha256::digest(&bytes));
    let verdict = (|| {
        let (envelope, payload) = Envelope::parse(&bytes).map_err(|e| match e {
            crate::attest::dsse::EnvelopeError::PayloadType { .. } => Rejection::PayloadType(e.to_string()),
            other => Rejection::Malformed(escape(&other.to_string()).into_owned()),
        })?;
        let signers = match envelope.check(&payload, trusted).map_err(|e| Rejection::Malformed(e.to_string()))? {
            SignatureCheck::Trusted(signers) => signers,
            SignatureCheck::BadSignature { keyid } => return Err(Rejection::BadSignature(keyid)),
            SignatureCheck::UnknownKeys { keyids } => return Err(Rejection::UnknownKey(keyids)),
        };
        let attested = statement::parse(&payload).map_err(|e| Rejection::Statement(escape(&e.to_string()).into_owned()))?;
        Ok((signers, attested))
    })();
    (sha256, verdict)
}

/// Judges every regular file of `dir` (symbolic links are not followed:
/// they are rejected) and counts the agreement with `expected`.
pub fn check_dir(dir: &Path, trusted: &TrustedKeys, threshold: usize, expected: Option<&Record>) -> Result<Report, AgreementError> {
    let mut names: Vec<(PathBuf, String)> = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(path_error("list", dir))? {
        let entry = entry.map_err(path_error("list", dir))?;
        names.push((entry.path(), crate::escape::escape_bytes(entry.file_name().as_encoded_bytes())));
    }
    names.sort_by(|a, b| a.1.cmp(&b.1));
    let mut envelopes = Vec::new();
    for (path, name) in names {
        if std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir()) {
            continue;
        }
        let (sha256, verdict) = judge(&path, trusted);
        envelopes.push(EnvelopeReport { name, sha256, verdict });
    }
    Ok(tally(envelopes, threshold, expected))
}

/// Counts the accepted envelopes' claims against the reference.
pub fn tally(envelopes: Vec<EnvelopeReport>, threshold: usize, expected: Option<&Record>) -> Report {
    // key → path → every hash it attests for it.
    let mut claims: BTreeMap<usize, BTreeMap<&str, BTreeSet<&str>>> = BTreeMap::new();
    for (signers, attested) in envelopes.iter().filter_map(|e| e.verdict.as_ref().ok()) {
        for &key in signers {
            let mine = claims.entry(key).or_default();
            for (path, hash) in &attested.subjects {
                mine.entry(path.as_str()).or_default().insert(hash.as_str());
            }
        }
    }
    let reference: BTreeMap<String, Option<String>> = match expected {
        Some(record) => record.hashes.iter().map(|(p, h)| (p.clone(), Some(h.to_ascii_lowercase()))).collect(),
        None => {
            let paths: BTreeSet<&str> = claims.values().flat_map(|c| c.keys().copied()).collect();
            paths.into_iter().map(|p| (p.to_string(), majority(claims.values().filter_map(|c| c.get(p))))).collect()
        }
    };
    let tallies: Vec<Tally> = reference
        .into_iter()
        .map(|(path, reference)| {
            let mut t = Tally { path, reference, agree: Vec::new(), differ: Vec::new(), missing: Vec::new() };
            for (&key, mine) in &claims {
                match mine.get(t.path.as_str()) {
                    None => t.missing.push(key),
                    Some(hashes) if hashes.len() == 1 && t.reference.as_deref() == hashes.first().copied() => t.agree.push(key),
                    Some(_) => t.differ.push(key),
                }
            }
            t
        })
        .collect();
    let met = !tallies.is_empty() && tallies.iter().all(|t| t.agree.len() >= threshold);
    Report { envelopes, tallies, threshold, met }
}

/// The hash that strictly more keys attest than any other (keys attesting
/// two hashes count for neither).
fn majority<'a>(per_key: impl Iterator<Item = &'a BTreeSet<&'a str>>) -> Option<String> {
    let mut votes: BTreeMap<&str, usize> = BTreeMap::new();
    for hashes in per_key.filter(|h| h.len() == 1) {
        *votes.entry(hashes.first().expect("one hash")).or_default() += 1;
    }
    let mut ranked: Vec<(&str, usize)> = votes.into_iter().collect();
    ranked.sort_by_key(|r| std::cmp::Reverse(r.1));
    match ranked.as_slice() {
        [(hash, _)] => Some(hash.to_string()),
        [(hash, first), (_, second), ..] if first > second => Some(hash.to_string()),
        _ => None,
    }
}

fn short(hash: &str, n: usize) -> String {
    hash.chars().take(n).collect()
}

impl Report {
    /// The verdict of an accepted envelope's key on one artifact.
    fn status(&self, attested: &Attested, path: &str) -> Status {
        let reference = self.tallies.iter().find(|t| t.path == path).and_then(|t| t.reference.as_deref());
        match (attested.subjects.get(path), self.tallies.iter().any(|t| t.path == path)) {
            (None, _) => Status::Missing,
            (Some(_), false) => Status::Unexpected,
            (Some(h), true) if Some(h.as_str()) == reference => Status::Identical,
            (Some(_), true) => Status::Differs,
        }
    }

    /// The report as printed: one line per envelope, then one row per
    /// accepted envelope, signer and artifact (key, image pin, accelerator,
    /// QEMU version, verdict), then one line per artifact and the outcome.
    pub fn render(&self, trusted: &TrustedKeys) -> String {
        let mut out = String::new();
        let width = self.envelopes.iter().map(|e| e.name.chars().count()).chain([8]).max().unwrap_or(8);
        let _ = writeln!(out, "{:<width$}  verdict", "envelope");
        for e in &self.envelopes {
            let verdict = match &e.verdict {
                Ok((signers, _)) => {
                    format!("accepted: signed by {}", signers.iter().map(|&k| trusted.keys[k].label()).collect::<Vec<_>>().join(", "))
                }
                Err(rejection) => rejection.to_string(),
            };
            // Rejections quote the envelope; escaping is idempotent, so this is belt and braces.
            let _ = writeln!(out, "{:<width$}  {}", e.name, escape(&verdict));
        }
        let mut rows = vec![["rebuilder".to_string(), "image".into(), "accel".into(), "QEMU".into(), "artifact".into(), "verdict".into()]];
        for (signers, attested) in self.envelopes.iter().filter_map(|e| e.verdict.as_ref().ok()) {
            let (image, accel, qemu) = match &attested.provenance {
                Some(p) => {
                    let m = &p.build_definition.internal_parameters.machine.launched;
                    (short(&p.image(), 23), m.accelerator.as_str().to_string(), escape(&m.qemu_version).into_owned())
                }
                None => ("-".into(), "-".into(), "-".into()),
            };
            let paths: BTreeSet<&str> =
                self.tallies.iter().map(|t| t.path.as_str()).chain(attested.subjects.keys().map(String::as_str)).collect();
            for &key in signers {
                for path in &paths {
                    let status = self.status(attested, path);
                    rows.push([
                        trusted.keys[key].fingerprint.clone(),
                        image.clone(),
                        accel.clone(),
                        qemu.clone(),
                        escape(path).into_owned(),
                        status.as_str().to_string(),
                    ]);
                }
            }
        }
        out.push('\n');
        if rows.len() > 1 {
            let widths: Vec<usize> = (0..6).map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0)).collect();
            for row in &rows {
                let line: Vec<String> = row.iter().zip(&widths).map(|(cell, w)| format!("{cell:<w$}")).collect();
                let _ = writeln!(out, "{}", line.join("  ").trim_end());
            }
            out.push('\n');
        }
        for t in &self.tallies {
            let reference = t.reference.as_deref().map_or_else(|| "no agreed hash (the rebuilders disagree)".to_string(), |h| short(h, 16));
            let rebuilders = t.agree.len() + t.differ.len() + t.missing.len();
            let _ = write!(out, "{}: {} of {rebuilders} trusted rebuilders attest {reference}", escape(&t.path), t.agree.len());
            let name = |keys: &[usize]| keys.iter().map(|&k| trusted.keys[k].label()).collect::<Vec<_>>().join(", ");
            if !t.differ.is_empty() {
                let _ = write!(out, "; DIFFERS: {}", name(&t.differ));
            }
            if !t.missing.is_empty() {
                let _ = write!(out, "; MISSING from: {}", name(&t.missing));
            }
            out.push('\n');
        }
        out
    }

    /// One line saying whether the threshold is met, and where it is not.
    pub fn outcome(&self) -> String {
        let short_of: Vec<String> = self
            .tallies
            .iter()
            .filter(|t| t.agree.len() < self.threshold)
            .map(|t| format!("{} ({})", escape(&t.path), t.agree.len()))
            .collect();
        if self.met {
            format!(
                "threshold {} met: every one of the {} artifacts is attested by at least {} distinct trusted rebuilders",
                self.threshold,
                self.tallies.len(),
                self.threshold
            )
        } else if self.tallies.is_empty() {
            format!("threshold {} not met: no accepted attestation", self.threshold)
        } else {
            format!("threshold {} not met for {}", self.threshold, short_of.join(", "))
        }
    }

    /// A SLSA Verification Summary Attestation v1 of this check: its
    /// subjects are the reference artifacts, its policy the threshold with
    /// the trusted-keys file's SHA-256, its input attestations the accepted
    /// envelopes.
    pub fn summary(&self, trusted_keys_sha256: &str, resource_uri: &str, verified: time::OffsetDateTime) -> Statement {
        let subject = self
            .tallies
            .iter()
            .filter_map(|t| {
                t.reference.as_ref().map(|h| ResourceDescriptor {
                    name: t.path.clone(),
                    digest: BTreeMap::from([("sha256".to_string(), h.clone())]),
                    ..Default::default()
                })
            })
            .collect();
        let inputs: Vec<_> =
            self.envelopes.iter().filter(|e| e.verdict.is_ok()).map(|e| json!({"uri": e.name, "digest": {"sha256": e.sha256}})).collect();
        let (result, levels) = if self.met {
            ("PASSED", vec![format!("REPROVM_REBUILDERS_AGREE_{}", self.threshold)])
        } else {
            ("FAILED", vec!["FAILED".to_string()])
        };
        Statement {
            type_: STATEMENT_TYPE.into(),
            subject,
            predicate_type: VSA_TYPE.into(),
            predicate: json!({
                "verifier": {"id": VERIFIER_ID},
                "timeVerified": verified.replace_nanosecond(0).unwrap_or(verified).format(&Rfc3339).expect("a UTC time formats"),
                "resourceUri": resource_uri,
                "policy": {"uri": format!("{POLICY_URI}?threshold={}", self.threshold), "digest": {"sha256": trusted_keys_sha256}},
                "inputAttestations": inputs,
                "verificationResult": result,
                "verifiedLevels": levels,
                "slsaVersion": "1.0",
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accepted(key: usize, pairs: &[(&str, &str)]) -> EnvelopeReport {
        let subjects = pairs.iter().map(|(p, h)| (p.to_string(), h.to_string())).collect();
        EnvelopeReport {
            name: format!("{key}.json"),
            sha256: String::new(),
            verdict: Ok((vec![key], Attested { subjects, build_type: String::new(), provenance: None })),
        }
    }

    #[test]
    fn distinct_keys_count_once_and_a_tie_has_no_reference() {
        // Key 0 signs twice: it counts once. Key 2 attests two hashes for `a`: it counts for neither.
        let envelopes = vec![
            accepted(0, &[("a", "1"), ("b", "1")]),
            accepted(0, &[("a", "1")]),
            accepted(1, &[("a", "1"), ("b", "2")]),
            accepted(2, &[("a", "1")]),
            accepted(2, &[("a", "9")]),
        ];
        let report = tally(envelopes.clone(), 2, None);
        let a = &report.tallies[0];
        assert_eq!((a.reference.as_deref(), a.agree.clone(), a.differ.clone()), (Some("1"), vec![0, 1], vec![2]));
        let b = &report.tallies[1];
        assert_eq!((b.reference.as_deref(), b.agree.len(), b.missing.clone()), (None, 0, vec![2]), "1 against 2: a tie");
        assert!(!report.met);
        assert!(report.outcome().contains("not met for b (0)"), "{}", report.outcome());

        let expected = Record { file: "S".into(), hashes: [("a".to_string(), "1".to_string())].into(), result: None };
        let report = tally(envelopes, 2, Some(&expected));
        assert!(report.met, "b is not published, so it does not count: {}", report.outcome());
        assert!(!tally(Vec::new(), 1, Some(&expected)).met, "no attestation meets no threshold");
    }
}
