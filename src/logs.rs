//! Logs that outside parties write into (the build's output, the guest's
//! serial console). A [`CappedLog`] keeps at most a limit of bytes from the
//! start plus the last part of what came after, so a build printing
//! gigabytes costs the host a bounded file. What error reports read back
//! from them is in [`crate::diagnostics`].

use std::fs::File;
use std::io::{self, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};

/// Default cap of build.log and serial.log, in MiB (`--log-limit`).
pub const DEFAULT_LOG_LIMIT_MIB: u64 = 64;
/// The most of the end of a capped log that is kept beyond the cap.
const KEPT_TAIL: usize = 1 << 20;

/// A log file that stops growing at `limit` bytes. What comes after is
/// counted, and its last part (up to 1 MiB) is appended, after a line saying
/// how much was left out, when the log is dropped.
pub struct CappedLog {
    file: File,
    limit: u64,
    written: u64,
    omitted: u64,
    tail: Vec<u8>,
}

impl CappedLog {
    /// Creates (truncates) `path`, keeping at most `limit` bytes of it.
    pub fn create(path: &Path, limit: u64) -> io::Result<CappedLog> {
        Ok(CappedLog { file: File::create(path)?, limit, written: 0, omitted: 0, tail: Vec::new() })
    }

    /// Appends `buf`; returns how many of its bytes went into the file
    /// (the rest is past the cap: counted, and kept in the tail buffer).
    pub fn append(&mut self, buf: &[u8]) -> io::Result<usize> {
        let room = self.limit.saturating_sub(self.written);
        let now = buf.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        self.file.write_all(&buf[..now])?;
        self.written += now as u64;
        let rest = &buf[now..];
        if !rest.is_empty() {
            self.omitted += rest.len() as u64;
            let keep = KEPT_TAIL.min(self.limit.try_into().unwrap_or(KEPT_TAIL)).max(1);
            self.tail.extend_from_slice(&rest[rest.len().saturating_sub(keep)..]);
            if self.tail.len() > 2 * keep {
                self.tail.drain(..self.tail.len() - keep);
            }
        }
        Ok(now)
    }

    /// Bytes past the cap so far.
    pub fn omitted(&self) -> u64 {
        self.omitted
    }
}

impl Drop for CappedLog {
    fn drop(&mut self) {
        if self.omitted == 0 {
            return;
        }
        let keep = KEPT_TAIL.min(self.limit.try_into().unwrap_or(KEPT_TAIL)).max(1);
        let tail = &self.tail[self.tail.len().saturating_sub(keep)..];
        let note = format!(
            "\n[reprovm: log capped at {} bytes: {} bytes left out; the last {} bytes follow]\n",
            self.limit,
            self.omitted - tail.len() as u64,
            tail.len()
        );
        let _ = self.file.write_all(note.as_bytes()).and_then(|()| self.file.write_all(tail));
    }
}

/// A [`CappedLog`] shared by several writers (a command's stdout and stderr).
#[derive(Clone)]
pub struct SharedLog(Arc<Mutex<CappedLog>>);

impl SharedLog {
    /// Shares `log`.
    pub fn new(log: CappedLog) -> SharedLog {
        SharedLog(Arc::new(Mutex::new(log)))
    }

    /// Appends `buf`; returns how many of its bytes fell within the cap.
    pub fn append(&self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().expect("log lock").append(buf)
    }

    /// Bytes past the cap so far.
    pub fn omitted(&self) -> u64 {
        self.0.lock().expect("log lock").omitted()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_is_capped_and_its_end_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("build.log");
        let log = SharedLog::new(CappedLog::create(&path, 1000).unwrap());
        assert_eq!(log.append(&[b'a'; 600]).unwrap(), 600);
        assert_eq!(log.append(&[b'b'; 600]).unwrap(), 400);
        for _ in 0..10_000 {
            log.append(&[b'c'; 997]).unwrap();
        }
        log.append(b"the end\n").unwrap();
        assert_eq!(log.omitted(), 200 + 9_970_000 + 8);
        drop(log);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.len() < 2200, "{}", text.len());
        assert!(text.starts_with(&"a".repeat(600)));
        assert!(text.contains("[reprovm: log capped at 1000 bytes: 9969208 bytes left out; the last 1000 bytes follow]"), "{text}");
        assert!(text.ends_with("cccthe end\n"), "{text}");
    }

    #[test]
    fn an_uncapped_log_is_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let mut log = CappedLog::create(&path, 1 << 20).unwrap();
        log.append(b"one\ntwo\n").unwrap();
        drop(log);
        assert_eq!(std::fs::read(&path).unwrap(), b"one\ntwo\n");
    }
}
