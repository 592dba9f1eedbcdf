//! The output directory. A build writes into a private staging directory
//! beside it and moves it into place in one rename at the end, so the
//! output directory never holds a half-written SHA256SUMS, and an interrupted
//! build leaves the previous output as it was. Only an empty directory or an
//! earlier reprovm output is ever replaced.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use tempfile::TempDir;

use crate::path_error::{path_error, PathError};

/// Files that mark a directory as a reprovm output.
const MARKERS: [&str; 3] = ["result.json", "build.log", "SHA256SUMS"];

/// The logs a failed build leaves (nothing else of it is kept).
pub const LOG_FILES: [&str; 2] = ["build.log", "serial.log"];

/// Every top-level name reprovm writes into an output directory itself.
/// No artifact may take one of them: whatever a build returns can never
/// replace or pose as reprovm's own files. A file reprovm starts writing
/// must be added here first.
pub const OWN_NAMES: [&str; 7] =
    ["SHA256SUMS", "result.json", "build.log", "serial.log", "diffoscope", "provenance.intoto.json", "provenance.intoto.dsse.json"];

/// The output directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    /// It exists and holds something else.
    #[error("refusing to replace {}: it is not empty and holds no earlier reprovm output (no result.json, build.log or SHA256SUMS); choose another --out", path.display())]
    NotOurs {
        /// The directory.
        path: PathBuf,
    },
    /// It exists and is not a directory.
    #[error("{} exists and is not a directory", path.display())]
    NotADirectory {
        /// The path.
        path: PathBuf,
    },
    /// A file operation failed (not writable, disk full…).
    #[error(transparent)]
    Io(#[from] PathError),
}

/// A staging directory that becomes the output directory on commit.
#[derive(Debug)]
pub struct OutputDir {
    target: PathBuf,
    staging: TempDir,
}

impl OutputDir {
    /// Checks that `target` may be replaced and creates the staging
    /// directory beside it (creating `target`'s parents if needed).
    pub fn prepare(target: &Path) -> Result<OutputDir, OutputError> {
        match fs::symlink_metadata(target) {
            Ok(meta) if !meta.is_dir() => return Err(OutputError::NotADirectory { path: target.to_path_buf() }),
            Ok(_) => {
                let mut entries = fs::read_dir(target).map_err(path_error("list", target))?;
                let empty = entries.next().is_none();
                if !empty && !MARKERS.iter().any(|m| target.join(m).is_file()) {
                    return Err(OutputError::NotOurs { path: target.to_path_buf() });
                }
            }
            Err(_) => {}
        }
        let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "out".into());
        let parent = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        fs::create_dir_all(&parent).map_err(path_error("create", &parent))?;
        let staging = tempfile::Builder::new()
            .prefix(&format!(".{name}.reprovm-"))
            .permissions(fs::Permissions::from_mode(0o755))
            .tempdir_in(&parent)
            .map_err(path_error("create a staging directory in", &parent))?;
        Ok(OutputDir { target: target.to_path_buf(), staging })
    }

    /// Where to write now.
    pub fn path(&self) -> &Path {
        self.staging.path()
    }

    /// The final location.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// For a failed build: removes everything but the logs from the staging
    /// directory (artifacts already unpacked included), then moves it into
    /// place if a log is there.
    pub fn commit_logs_only(self) -> Result<Option<PathBuf>, OutputError> {
        let dir = self.path().to_path_buf();
        for entry in fs::read_dir(&dir).map_err(path_error("list", &dir))? {
            let entry = entry.map_err(path_error("list", &dir))?;
            if LOG_FILES.iter().any(|log| entry.file_name() == *log) && entry.file_type().is_ok_and(|t| t.is_file()) {
                continue;
            }
            let path = entry.path();
            let removed = if entry.file_type().is_ok_and(|t| t.is_dir()) { fs::remove_dir_all(&path) } else { fs::remove_file(&path) };
            removed.map_err(path_error("remove", &path))?;
        }
        if LOG_FILES.iter().any(|log| dir.join(log).is_file()) {
            self.commit().map(Some)
        } else {
            Ok(None)
        }
    }

    /// Moves the staging directory into place, replacing the previous output.
    pub fn commit(self) -> Result<PathBuf, OutputError> {
        let staging = self.staging.keep();
        let old = staging.with_extension("old");
        let had_old = match fs::rename(&self.target, &old) {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => {
                let _ = fs::remove_dir_all(&staging);
                return Err(path_error("move aside", &self.target)(e).into());
            }
        };
        if let Err(e) = fs::rename(&staging, &self.target) {
            if had_old {
                let _ = fs::rename(&old, &self.target);
            }
            let _ = fs::remove_dir_all(&staging);
            return Err(path_error("move the output into", &self.target)(e).into());
        }
        if had_old {
            let _ = fs::remove_dir_all(&old);
        }
        Ok(self.target)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_earlier_output_and_refuses_foreign_directories() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("a/out");
        let o = OutputDir::prepare(&out).unwrap();
        fs::write(o.path().join("SHA256SUMS"), "x").unwrap();
        o.commit().unwrap();
        assert!(out.join("SHA256SUMS").is_file());
        let o = OutputDir::prepare(&out).unwrap();
        fs::write(o.path().join("build.log"), "y").unwrap();
        o.commit().unwrap();
        assert!(!out.join("SHA256SUMS").exists() && out.join("build.log").is_file());
        let names: Vec<_> = fs::read_dir(dir.path().join("a")).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["out"]);

        let foreign = dir.path().join("home");
        fs::create_dir(&foreign).unwrap();
        fs::write(foreign.join("thesis.tex"), "precious").unwrap();
        let e = OutputDir::prepare(&foreign).unwrap_err().to_string();
        assert!(e.contains("refusing to replace") && e.contains("home"), "{e}");
        assert_eq!(fs::read_to_string(foreign.join("thesis.tex")).unwrap(), "precious");
    }

    #[test]
    fn a_failed_build_leaves_only_its_logs() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let o = OutputDir::prepare(&out).unwrap();
        fs::write(o.path().join("build.log"), "log").unwrap();
        // What a hostile build got unpacked before the failure.
        fs::write(o.path().join("SHA256SUMS"), "forged").unwrap();
        fs::create_dir_all(o.path().join("dist/x")).unwrap();
        fs::write(o.path().join("dist/x/result.json"), "forged").unwrap();
        o.commit_logs_only().unwrap();
        let names: Vec<_> = fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["build.log"]);

        let o = OutputDir::prepare(&dir.path().join("none")).unwrap();
        fs::write(o.path().join("hello"), "x").unwrap();
        assert_eq!(o.commit_logs_only().unwrap(), None, "no log, nothing to keep");
        assert!(!dir.path().join("none").exists());
    }

    #[test]
    fn dropped_staging_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let o = OutputDir::prepare(&dir.path().join("out")).unwrap();
        fs::write(o.path().join("SHA256SUMS"), "partial").unwrap();
        drop(o);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
