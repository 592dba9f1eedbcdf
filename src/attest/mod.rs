//! Attestations (docs/attestations.md): the in-toto Statement with a SLSA
//! Provenance v1 predicate every build writes (`statement`), DSSE envelopes
//! signed with an OpenSSH Ed25519 key (`dsse`, `keys`), and the check that
//! at least N distinct trusted rebuilders attest the published bytes, with
//! its SLSA Verification Summary (`agreement`).
//!
//! Everything read here — envelopes, statements, key files, published
//! hashes — comes from outside: each file is size-capped before it is
//! parsed, parsing is strict, and nothing from it is printed unescaped.

pub mod agreement;
pub mod dsse;
pub mod keys;
pub mod statement;

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::path_error::{path_error, PathError};
use crate::rebuild::result::BuildResult;

/// The file name of the signed provenance beside `provenance.intoto.json`.
pub const ENVELOPE_FILE: &str = "provenance.intoto.dsse.json";

/// A file that cannot be read within its cap.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The file could not be opened or read.
    #[error(transparent)]
    Io(#[from] PathError),
    /// The file is larger than its cap; nothing of it was parsed.
    #[error("{} is larger than {cap} bytes: refused unread", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// The cap in bytes.
        cap: u64,
    },
    /// A symbolic link, FIFO, device or directory where a file was expected.
    #[error("{} is not a regular file (links are not followed)", path.display())]
    NotRegular {
        /// The path.
        path: PathBuf,
    },
}

/// Text from an attestation for a message: its first 100 characters, escaped.
pub(crate) fn shown(text: &str) -> String {
    crate::escape::escape(&text.chars().take(100).collect::<String>()).into_owned()
}

/// Reads `path`, refusing it (before reading it all) when it holds more
/// than `cap` bytes.
pub fn read_capped(path: &Path, cap: u64) -> Result<Vec<u8>, ReadError> {
    let file = std::fs::File::open(path).map_err(path_error("open", path))?;
    read_at_most(file, path, cap)
}

/// Like [`read_capped`] for a file in a downloaded directory: a symbolic
/// link is not followed, and a FIFO or device (even one swapped in after a
/// listing) is refused without blocking on it.
pub fn read_regular_capped(path: &Path, cap: u64) -> Result<Vec<u8>, ReadError> {
    use std::os::unix::fs::OpenOptionsExt;
    let not_regular = || ReadError::NotRegular { path: path.to_path_buf() };
    let file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(path).map_err(|e| {
        if e.raw_os_error() == Some(libc::ELOOP) {
            not_regular()
        } else {
            path_error("open", path)(e).into()
        }
    })?;
    if !file.metadata().map_err(path_error("inspect", path))?.is_file() {
        return Err(not_regular());
    }
    read_at_most(file, path, cap)
}

fn read_at_most(file: std::fs::File, path: &Path, cap: u64) -> Result<Vec<u8>, ReadError> {
    let mut bytes = Vec::new();
    file.take(cap + 1).read_to_end(&mut bytes).map_err(path_error("read", path))?;
    if bytes.len() as u64 > cap {
        return Err(ReadError::TooLarge { path: path.to_path_buf(), cap });
    }
    Ok(bytes)
}

/// Writes `provenance.intoto.json` for `result` into `dir` (a build's
/// staging directory) and, with a key, its DSSE envelope beside it. The
/// run's start is taken as `timings.total` seconds before now.
pub fn write_provenance(dir: &Path, result: &BuildResult, key: Option<&keys::SigningKey>) -> Result<(), PathError> {
    let finished = time::OffsetDateTime::now_utc();
    let started = finished - time::Duration::seconds_f64(result.timings.total.max(0.0));
    let statement = statement::provenance(result, started, finished, &statement::invocation_id());
    let payload = statement.to_file_bytes();
    let path = dir.join(statement::PROVENANCE_FILE);
    std::fs::write(&path, &payload).map_err(path_error("write", &path))?;
    if let Some(key) = key {
        let path = dir.join(ENVELOPE_FILE);
        std::fs::write(&path, dsse::Envelope::sign(&payload, key).to_file_bytes()).map_err(path_error("write", &path))?;
    }
    Ok(())
}
