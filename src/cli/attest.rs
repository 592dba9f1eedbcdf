//! `reprovm attest sign` (a provenance statement into a DSSE envelope) and
//! `reprovm verify --attestations` (do N trusted rebuilders attest the
//! published bytes? no rebuild, nothing booted), plus the reader that lets
//! `compare` take envelopes beside result.json and SHA256SUMS files.

use std::path::{Path, PathBuf};

use clap::Subcommand;

use crate::attest::agreement::check_dir;
use crate::attest::dsse::{Envelope, MAX_ENVELOPE};
use crate::attest::keys::{SigningKey, TrustedKeys};
use crate::attest::statement::{self, PROVENANCE_FILE};
use crate::attest::{read_capped, ENVELOPE_FILE};
use crate::cli::Error;
use crate::path_error::path_error;
use crate::rebuild::artifacts::parse_sha256sums;
use crate::rebuild::Record;
use crate::Exit;

/// `reprovm attest …`
#[derive(Debug, Subcommand)]
pub enum AttestCommand {
    /// Sign a provenance statement (provenance.intoto.json) into a DSSE
    /// envelope with an OpenSSH Ed25519 key.
    Sign {
        /// The OpenSSH Ed25519 private key (encrypted: REPROVM_KEY_PASSPHRASE, or asked on a terminal).
        #[arg(long, value_name = "KEY")]
        key: PathBuf,
        /// Where to write the envelope [default: provenance.intoto.dsse.json beside the statement].
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// provenance.intoto.json, or a build's output directory holding it.
        #[arg(value_name = "STATEMENT")]
        statement: PathBuf,
    },
}

/// `verify --attestations`: check published attestations instead of rebuilding.
#[derive(Clone, Debug, clap::Args)]
pub struct AgreementArgs {
    /// Check the DSSE envelopes in DIR instead of rebuilding: exit 0 only
    /// when every artifact is attested by --threshold distinct trusted keys.
    #[arg(
        long,
        value_name = "DIR",
        requires_all = ["trusted_keys", "threshold"],
        conflicts_with_all = ["src", "recipe", "out", "diffoscope", "scratch", "network", "timeout", "json", "accel", "cpu_model", "cpus", "memory", "clock"]
    )]
    pub attestations: Option<PathBuf>,
    /// The trusted rebuilders: `ssh-ed25519 <base64> [comment]` lines (authorized_keys style).
    #[arg(long, value_name = "FILE", requires = "attestations")]
    pub trusted_keys: Option<PathBuf>,
    /// How many distinct trusted keys must attest each artifact.
    #[arg(long, value_name = "N", requires = "attestations", value_parser = clap::value_parser!(u32).range(1..=10000))]
    pub threshold: Option<u32>,
    /// Write a SLSA Verification Summary Attestation of the check to FILE
    /// (a DSSE envelope when --sign KEY is given).
    #[arg(long, value_name = "FILE", requires = "attestations")]
    pub vsa: Option<PathBuf>,
    /// The summary's resourceUri: where the artifacts are published [default: the --expect file].
    #[arg(long, value_name = "URI", requires = "vsa")]
    pub resource_uri: Option<String>,
}

/// Reads a result.json, a SHA256SUMS or a DSSE envelope of a provenance
/// statement, within the envelope cap (an envelope's signatures are not
/// checked here: `verify --attestations` does that).
pub fn load_record(file: &Path) -> Result<Record, Error> {
    let bytes = read_capped(file, MAX_ENVELOPE)?;
    let is_envelope = serde_json::from_slice::<serde_json::Value>(&bytes).is_ok_and(|v| v.get("payloadType").is_some());
    if !is_envelope {
        return Ok(Record::parse(&String::from_utf8_lossy(&bytes), file)?);
    }
    let (_, payload) = Envelope::parse(&bytes).map_err(|source| Error::Envelope { file: file.to_path_buf(), source })?;
    let attested = statement::parse(&payload).map_err(|source| Error::Statement { file: file.to_path_buf(), source })?;
    Ok(Record { file: file.to_path_buf(), hashes: attested.subjects, result: attested.provenance.map(|p| p.result()) })
}

/// `reprovm attest sign`.
pub fn execute(cmd: AttestCommand) -> Result<u8, Error> {
    let AttestCommand::Sign { key, out, statement } = cmd;
    let file = if statement.is_dir() { statement.join(PROVENANCE_FILE) } else { statement };
    let key = SigningKey::load(&key)?;
    let payload = read_capped(&file, MAX_ENVELOPE)?;
    let attested = statement::parse(&payload).map_err(|source| Error::Statement { file: file.clone(), source })?;
    let dir = file.parent().unwrap_or(Path::new("."));
    let sums = dir.join("SHA256SUMS");
    if sums.is_file() {
        let listed: std::collections::BTreeMap<String, String> =
            parse_sha256sums(&String::from_utf8_lossy(&read_capped(&sums, MAX_ENVELOPE)?), &sums)
                .map_err(crate::rebuild::RecordError::from)?
                .into_iter()
                .collect();
        if listed != attested.subjects {
            return Err(Error::Usage(format!(
                "refusing to sign {}: its subjects are not the artifacts of {} beside it",
                file.display(),
                sums.display()
            )));
        }
    }
    let target = out.unwrap_or_else(|| dir.join(ENVELOPE_FILE));
    std::fs::write(&target, Envelope::sign(&payload, &key).to_file_bytes()).map_err(path_error("write", &target))?;
    crate::terminal::note(format_args!("{} signed with {}: {}", file.display(), key.fingerprint(), target.display()));
    Ok(Exit::Ok.code())
}

/// `reprovm verify --attestations DIR --trusted-keys FILE --threshold N [--expect FILE]`.
pub fn verify(args: AgreementArgs, expect: Option<PathBuf>, sign: Option<PathBuf>) -> Result<u8, Error> {
    let (Some(dir), Some(keys_file), Some(threshold)) = (args.attestations, args.trusted_keys, args.threshold) else {
        return Err(Error::Usage("--attestations needs --trusted-keys and --threshold".into()));
    };
    if sign.is_some() && args.vsa.is_none() {
        return Err(Error::Usage("with --attestations, --sign signs the summary: give --vsa FILE too".into()));
    }
    let trusted = TrustedKeys::load(&keys_file)?;
    let expected = expect.as_deref().map(load_record).transpose()?;
    let key = sign.as_deref().map(SigningKey::load).transpose()?;
    let report = check_dir(&dir, &trusted, threshold as usize, expected.as_ref())?;
    print!("{}", report.render(&trusted));
    if expected.is_none() {
        crate::terminal::note(format_args!("(no --expect: each artifact's reference is the hash most trusted rebuilders attest)"));
    }
    crate::terminal::say(format_args!("{}", report.outcome()));
    if let Some(vsa) = args.vsa {
        let keys_sha256 = crate::image::pin::hash_file(&keys_file).map_err(path_error("hash", &keys_file))?.hex();
        let resource = args.resource_uri.unwrap_or_else(|| match &expect {
            Some(f) => format!("file://{}", std::fs::canonicalize(f).unwrap_or_else(|_| f.clone()).display()),
            None => format!("file://{}", std::fs::canonicalize(&dir).unwrap_or_else(|_| dir.clone()).display()),
        });
        let payload = report.summary(&keys_sha256, &resource, time::OffsetDateTime::now_utc()).to_file_bytes();
        let bytes = match &key {
            Some(key) => Envelope::sign(&payload, key).to_file_bytes(),
            None => payload,
        };
        std::fs::write(&vsa, bytes).map_err(path_error("write", &vsa))?;
        crate::terminal::note(format_args!("verification summary written to {}", vsa.display()));
    }
    Ok(if report.met { Exit::Ok } else { Exit::Differ }.code())
}
