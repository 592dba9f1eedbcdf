//! The content-addressed download cache:
//! `$XDG_CACHE_HOME/reprovm/downloads/<sha256 hex>`. The directory is 0700,
//! entries are 0444; an entry is written to a temporary file in the same
//! directory and renamed into place once complete (two writers of one hash
//! leave the same bytes), and every read for a replay re-hashes it.

use std::fs::{self, File, Permissions};
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::egress::report::Download;
use crate::egress::EgressError;
use crate::escape::escape;
use crate::image::pin::hash_reader;
use crate::image::store::Store;
use crate::path_error::path_error;

/// Prefix of entries being written (never read as entries).
const INCOMING_PREFIX: &str = ".incoming-";

/// Whether `s` is 64 lowercase hex digits (the only names entries have).
pub(crate) fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The download cache rooted at one directory.
#[derive(Clone, Debug)]
pub struct DownloadCache {
    dir: PathBuf,
}

impl DownloadCache {
    /// The cache beside the image store: `$XDG_CACHE_HOME/reprovm/downloads`
    /// (default `~/.cache/reprovm/downloads`), created if missing.
    pub fn open_default() -> Result<DownloadCache, EgressError> {
        let images = Store::from_env().map_err(|_| EgressError::NoCacheDir)?;
        // The image store is `<cache>/reprovm/images`: the downloads sit beside it.
        let reprovm = images.root().parent().ok_or(EgressError::NoCacheDir)?;
        DownloadCache::at(reprovm.join("downloads"))
    }

    /// The cache in `dir`, created (0700) if missing.
    pub fn at(dir: PathBuf) -> Result<DownloadCache, EgressError> {
        fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir).map_err(path_error("create the download cache", &dir))?;
        Ok(DownloadCache { dir })
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The entry for `sha256` (64 lowercase hex digits), if it is present.
    pub fn path_of(&self, sha256: &str) -> Option<PathBuf> {
        let path = self.dir.join(sha256);
        (is_sha256(sha256) && fs::symlink_metadata(&path).is_ok_and(|m| m.is_file())).then_some(path)
    }

    /// Re-hashes the entry for `download`: `HashMismatch` (naming the URL)
    /// unless its bytes hash to `download.sha256`, `NotCached` if absent.
    pub fn verify(&self, download: &Download) -> Result<(), EgressError> {
        self.open_verified(download).map(drop)
    }

    /// The entry for `download`, opened once, hashed through that descriptor
    /// and rewound: what is read from it is what was checked.
    pub(crate) fn open_verified(&self, download: &Download) -> Result<File, EgressError> {
        // The record may come from an imported file: its text is escaped before it goes into an error.
        let url = || escape(&download.url).into_owned();
        let missing = || EgressError::NotCached { url: url(), sha256: escape(&download.sha256).into_owned(), dir: self.dir.clone() };
        let path = self.path_of(&download.sha256).ok_or_else(missing)?;
        let mut file = File::open(&path).map_err(path_error("open", &path))?;
        let (actual, _) = hash_reader(&file, |_| Ok(())).map_err(path_error("hash", &path))?;
        if actual.hex() != download.sha256 {
            return Err(EgressError::HashMismatch { url: url(), expected: download.sha256.clone(), actual: actual.hex() });
        }
        file.seek(SeekFrom::Start(0)).map_err(path_error("rewind", &path))?;
        Ok(file)
    }

    /// A new entry, written to a temporary file in the cache directory.
    pub(crate) fn writer(&self) -> Result<CacheWriter, EgressError> {
        let tmp = tempfile::Builder::new()
            .prefix(INCOMING_PREFIX)
            .tempfile_in(&self.dir)
            .map_err(path_error("create a temporary file in", &self.dir))?;
        let (file, path) = tmp.into_parts();
        Ok(CacheWriter { file: BufWriter::new(file), path, hasher: Sha256::new(), size: 0, dir: self.dir.clone() })
    }
}

/// An entry being written: hashed as it is written, removed unless committed.
pub(crate) struct CacheWriter {
    file: BufWriter<File>,
    path: tempfile::TempPath,
    hasher: Sha256,
    size: u64,
    dir: PathBuf,
}

impl CacheWriter {
    /// Appends `chunk`.
    pub(crate) fn write(&mut self, chunk: &[u8]) -> Result<(), EgressError> {
        self.hasher.update(chunk);
        self.size += chunk.len() as u64;
        Ok(self.file.write_all(chunk).map_err(path_error("write", &self.path))?)
    }

    /// Lowercase hex SHA-256 of what was written so far.
    pub(crate) fn sha256(&self) -> String {
        hex::encode(self.hasher.clone().finalize())
    }

    /// Bytes written so far.
    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    /// Makes the bytes the entry for their hash (read-only), atomically.
    pub(crate) fn commit(self) -> Result<(), EgressError> {
        let sha256 = self.sha256();
        let file = self.file.into_inner().map_err(|e| path_error("write", &self.path)(e.into_error()))?;
        file.sync_all().map_err(path_error("sync", &self.path))?;
        file.set_permissions(Permissions::from_mode(0o444)).map_err(path_error("make read-only", &self.path))?;
        let entry = self.dir.join(sha256);
        self.path.persist(&entry).map_err(|e| path_error("move the download into", &entry)(e.error))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn download(sha256: &str) -> Download {
        Download { method: "GET".into(), url: "http://h/f".into(), status: 200, size: 3, sha256: sha256.into() }
    }

    #[test]
    fn entries_are_content_addressed_read_only_and_verified() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = DownloadCache::at(tmp.path().join("c")).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(cache.dir()), 0o700);
        let mut w = cache.writer().unwrap();
        w.write(b"a").unwrap();
        w.write(b"bc").unwrap();
        let sha = w.sha256();
        assert_eq!(sha, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert_eq!(w.size(), 3);
        w.commit().unwrap();
        let path = cache.path_of(&sha).unwrap();
        assert_eq!(mode(&path), 0o444);
        assert_eq!(fs::read_dir(cache.dir()).unwrap().count(), 1, "no temporary file is left");
        cache.verify(&download(&sha)).unwrap();
        assert!(cache.path_of("../c").is_none() && cache.path_of(&sha.to_uppercase()).is_none());
        assert!(matches!(cache.verify(&download(&"0".repeat(64))), Err(EgressError::NotCached { .. })));
        // An abandoned writer leaves nothing.
        let mut w = cache.writer().unwrap();
        w.write(b"partial").unwrap();
        drop(w);
        assert_eq!(fs::read_dir(cache.dir()).unwrap().count(), 1);
    }

    #[test]
    fn a_tampered_entry_is_a_hash_mismatch_naming_the_url() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = DownloadCache::at(tmp.path().to_path_buf()).unwrap();
        let mut w = cache.writer().unwrap();
        w.write(b"abc").unwrap();
        let sha = w.sha256();
        w.commit().unwrap();
        let path = cache.path_of(&sha).unwrap();
        fs::set_permissions(&path, Permissions::from_mode(0o644)).unwrap();
        fs::write(&path, b"abd").unwrap();
        let err = cache.verify(&download(&sha)).unwrap_err();
        assert!(matches!(&err, EgressError::HashMismatch { url, expected, .. } if url == "http://h/f" && *expected == sha), "{err:?}");
        assert_eq!(crate::ExitCode::exit(&err), crate::Exit::PinMismatch);
    }
}
