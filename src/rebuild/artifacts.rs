//! Artifacts out of the builder, and their SHA256SUMS. The guest writes the
//! artifacts as one tar onto the output disk; the host reads that disk only
//! after the builder is off, and trusts nothing in it: every entry must be a
//! regular file whose path stays inside the output directory, and is hashed
//! as it is written there. `SHA256SUMS` is exactly what `sha256sum -c` reads.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};

use indicatif::HumanBytes;

use crate::image::pin::hash_reader;
use crate::path_error::{path_error, PathError};
use crate::rebuild::output::OWN_NAMES;
use serde::{Deserialize, Serialize};

/// One artifact: where it is (relative to the output directory), its size
/// and SHA-256.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Artifact {
    /// Path relative to the build directory and to the output directory.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// SHA-256, lowercase hex.
    pub sha256: String,
}

/// The artifacts could not be brought back safely.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    /// The guest's archive holds an entry the host refuses.
    #[error("refusing artifact \"{path}\" from the builder: {why}")]
    Unsafe {
        /// The entry's path as the guest wrote it, escaped.
        path: String,
        /// Why it is refused.
        why: &'static str,
    },
    /// The guest's archive is not a readable tar.
    #[error("the builder's artifact archive is unreadable")]
    Archive(#[source] io::Error),
    /// Writing into the output directory failed.
    #[error(transparent)]
    Write(#[from] PathError),
    /// SIGINT or SIGTERM arrived.
    #[error(transparent)]
    Interrupted(#[from] crate::interrupt::Interrupted),
}

/// Checks an artifact path from the guest: relative, plain components only,
/// UTF-8 without control characters (one line of SHA256SUMS without
/// escapes, safe to print), and not one of reprovm's own output names.
fn checked_path(raw: &[u8]) -> Result<PathBuf, ArtifactError> {
    let shown = crate::escape::escape_bytes(raw);
    let unsafe_path = |why| ArtifactError::Unsafe { path: shown.clone(), why };
    let text = std::str::from_utf8(raw).map_err(|_| unsafe_path("the name is not UTF-8"))?;
    if text.is_empty() || text.contains('\\') || crate::escape::escape(text) != text {
        return Err(unsafe_path("empty, or a control character or backslash in the name"));
    }
    let path = Path::new(text);
    if !path.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(unsafe_path("the path is absolute or has `.`/`..` components"));
    }
    if path.components().next().is_some_and(|first| OWN_NAMES.iter().any(|own| first.as_os_str() == *own)) {
        return Err(unsafe_path(
            "reprovm writes this name itself (SHA256SUMS, result.json, the logs…); return the file from a subdirectory",
        ));
    }
    Ok(path.to_path_buf())
}

/// Artifacts at least this large show their progress on the stage's bar.
const SHOWN_SIZE: u64 = 16 << 20;

/// Unpacks the guest's artifact tar (`archive`, the raw output disk) into
/// `dest` (a fresh directory) and returns the artifacts sorted by path.
/// Large artifacts show their name and bytes so far on `bar`.
pub fn extract(archive: &Path, dest: &Path, bar: &indicatif::ProgressBar) -> Result<Vec<Artifact>, ArtifactError> {
    let file = File::open(archive).map_err(path_error("open", archive))?;
    let mut tar = tar::Archive::new(BufReader::with_capacity(1 << 20, file));
    let mut seen = BTreeSet::new();
    let mut artifacts = Vec::new();
    for entry in tar.entries().map_err(ArtifactError::Archive)? {
        // Stop at once on SIGINT/SIGTERM: the staging directory is going away.
        crate::interrupt::check()?;
        let mut entry = entry.map_err(ArtifactError::Archive)?;
        let raw = entry.path_bytes().into_owned();
        let rel = checked_path(&raw)?;
        let shown = rel.display().to_string();
        if !matches!(entry.header().entry_type(), tar::EntryType::Regular | tar::EntryType::Continuous) {
            return Err(ArtifactError::Unsafe { path: shown, why: "not a regular file (links, devices and FIFOs are never brought back)" });
        }
        if !seen.insert(rel.clone()) {
            return Err(ArtifactError::Unsafe { path: shown, why: "it appears twice in the archive" });
        }
        let target = dest.join(&rel);
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent).map_err(path_error("create", parent))?;
        }
        let executable = entry.header().mode().is_ok_and(|m| m & 0o111 != 0);
        let mut out = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(if executable { 0o755 } else { 0o644 })
            .open(&target)
            .map_err(path_error("create", &target))?;
        let total = entry.size();
        let mut done = 0;
        let (digest, size) = hash_reader(&mut entry, |chunk| {
            if total >= SHOWN_SIZE {
                done += chunk.len() as u64;
                bar.set_message(format!("fetching {shown} {}/{}", HumanBytes(done), HumanBytes(total)));
            }
            out.write_all(chunk)
        })
        .and_then(|hashed| out.flush().map(|()| hashed))
        .map_err(path_error("write", &target))?;
        artifacts.push(Artifact { path: shown, size, sha256: digest.hex() });
    }
    artifacts.sort();
    Ok(artifacts)
}

/// SHA256SUMS text: `<sha256>  <path>` per artifact, sorted by path.
pub fn sha256sums(artifacts: &[Artifact]) -> String {
    let mut sorted: Vec<&Artifact> = artifacts.iter().collect();
    sorted.sort_by(|a, b| a.path.cmp(&b.path));
    sorted.iter().map(|a| format!("{}  {}\n", a.sha256, a.path)).collect()
}

/// A SHA256SUMS line that cannot be read.
#[derive(Debug, thiserror::Error)]
#[error("{}:{line}: {why}: {text:?}", file.display())]
pub struct BadSums {
    /// The file.
    pub file: PathBuf,
    /// 1-based line number.
    pub line: usize,
    /// The line.
    pub text: String,
    /// What is wrong.
    pub why: &'static str,
}

/// Parses SHA256SUMS text (`sha256sum` output, text or binary mode) into
/// (path, sha256) pairs; `file` names it in errors.
pub fn parse_sha256sums(text: &str, file: &Path) -> Result<Vec<(String, String)>, BadSums> {
    let mut out = Vec::new();
    let mut seen = BTreeSet::new();
    for (i, line) in text.lines().enumerate() {
        let bad = |why| BadSums { file: file.to_path_buf(), line: i + 1, text: line.chars().take(200).collect(), why };
        if line.trim().is_empty() {
            continue;
        }
        if line.starts_with('\\') {
            return Err(bad("escaped names are not supported"));
        }
        let (hash, rest) = line.split_at_checked(64).ok_or_else(|| bad("expected `<64 hex digits>  <path>`"))?;
        if !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad("expected `<64 hex digits>  <path>`"));
        }
        let path = rest
            .strip_prefix("  ")
            .or_else(|| rest.strip_prefix(" *"))
            .ok_or_else(|| bad("expected two spaces (or ` *`) after the hash"))?;
        let path = path.strip_prefix("./").unwrap_or(path);
        if path.is_empty() {
            return Err(bad("no path after the hash"));
        }
        if !seen.insert(path.to_string()) {
            return Err(bad("the path is listed twice"));
        }
        out.push((path.to_string(), hash.to_ascii_lowercase()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_with(entries: &[(&str, tar::EntryType, &[u8])]) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().unwrap();
        let mut b = tar::Builder::new(file.reopen().unwrap());
        for (name, kind, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_size(data.len() as u64);
            h.set_mode(0o755);
            if *kind == tar::EntryType::Symlink {
                h.set_link_name("/etc/passwd").unwrap();
            }
            // Bypass the tar crate's own path checks: write the raw name.
            h.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name.as_bytes());
            h.set_cksum();
            b.append(&h, *data).unwrap();
        }
        b.finish().unwrap();
        // Trailing zeros, as on the raw output disk.
        file.as_file().set_len(file.as_file().metadata().unwrap().len() + 65536).unwrap();
        file
    }

    #[test]
    fn extracts_and_hashes_regular_files() {
        let t = tar_with(&[("b/hello", tar::EntryType::Regular, b"hi\n"), ("a.txt", tar::EntryType::Regular, b"")]);
        let dest = tempfile::tempdir().unwrap();
        let got = extract(t.path(), dest.path(), &indicatif::ProgressBar::hidden()).unwrap();
        assert_eq!(
            got[0],
            Artifact { path: "a.txt".into(), size: 0, sha256: "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855".into() }
        );
        assert_eq!(got[1].path, "b/hello");
        assert_eq!(fs::read(dest.path().join("b/hello")).unwrap(), b"hi\n");
        let text = sha256sums(&got);
        assert!(text.starts_with("e3b0c442") && text.ends_with("  b/hello\n"), "{text}");
        assert_eq!(parse_sha256sums(&text, Path::new("S")).unwrap().len(), 2);
    }

    #[test]
    fn refuses_escapes_links_and_duplicates() {
        for (entries, needle) in [
            (vec![("../evil", tar::EntryType::Regular, &b"x"[..])], "../evil"),
            (vec![("/etc/cron.d/x", tar::EntryType::Regular, &b"x"[..])], "/etc/cron.d/x"),
            (vec![("link", tar::EntryType::Symlink, &b""[..])], "not a regular file"),
            (vec![("dev", tar::EntryType::Char, &b""[..])], "not a regular file"),
            (vec![("a", tar::EntryType::Regular, &b"1"[..]), ("a", tar::EntryType::Regular, &b"2"[..])], "twice"),
            (vec![("a\\b", tar::EntryType::Regular, &b"1"[..])], "backslash"),
            (vec![("x\x1b]52;c;ZXZpbA==\x07", tar::EntryType::Regular, &b"1"[..])], "x\\x1b]52;c;ZXZpbA==\\x07"),
            (vec![("SHA256SUMS", tar::EntryType::Regular, &b"forged"[..])], "reprovm writes this name itself"),
            (vec![("hello", tar::EntryType::Regular, &b"1"[..]), ("result.json", tar::EntryType::Regular, &b"{}"[..])], "result.json"),
            (vec![("build.log/x", tar::EntryType::Regular, &b"1"[..])], "reprovm writes this name itself"),
            (vec![("provenance.intoto.dsse.json", tar::EntryType::Regular, &b"{}"[..])], "reprovm writes this name itself"),
        ] {
            let t = tar_with(&entries);
            let dest = tempfile::tempdir().unwrap();
            let e = extract(t.path(), dest.path(), &indicatif::ProgressBar::hidden()).unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
            assert!(!dest.path().parent().unwrap().join("evil").exists());
        }
    }

    #[test]
    fn sha256sums_reader_is_strict_and_names_the_line() {
        let h = "a".repeat(64);
        let ok = format!("{h}  x\n{h} *./y\n\n");
        assert_eq!(parse_sha256sums(&ok, Path::new("S")).unwrap(), [("x".to_string(), h.clone()), ("y".to_string(), h.clone())]);
        for bad in ["zz  x", &format!("{h} x"), &format!("{h}  "), &format!("{h}  x\n{h}  x"), "\\abc", "é"] {
            let e = parse_sha256sums(bad, Path::new("dir/SHA256SUMS")).unwrap_err().to_string();
            assert!(e.starts_with("dir/SHA256SUMS:"), "{e}");
        }
    }
}
