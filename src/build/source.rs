//! The source tree as a deterministic tar: the git-tracked files when the
//! source is a git checkout, otherwise every file except the output
//! directory; sorted, every mtime set to SOURCE_DATE_EPOCH, normalised modes,
//! no owner names. The canonical archive (uid/gid 0) is only hashed: its
//! SHA-256 identifies the source in the result. The archive that populates
//! the scratch disk holds the same entries under `src/`, owned by the build
//! user, beside the build user's empty home and temporary directories.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::path_error::{path_error, PathError};

/// uid and gid of the build user in the builder image.
pub const BUILD_UID: u32 = 1000;

/// How the file list was chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// `git ls-files` of a checkout.
    Git,
    /// Every file under the directory.
    Tree,
}

/// One entry of the source tree, relative to its root.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Entry {
    Dir(PathBuf),
    File { path: PathBuf, executable: bool },
    Symlink { path: PathBuf, target: PathBuf },
}

impl Entry {
    fn path(&self) -> &Path {
        match self {
            Entry::Dir(p) | Entry::File { path: p, .. } | Entry::Symlink { path: p, .. } => p,
        }
    }
}

/// The source tree to archive.
#[derive(Debug)]
pub struct SourceTree {
    root: PathBuf,
    /// Git checkout or plain tree.
    pub kind: SourceKind,
    /// Committer time of the last commit touching the tree (git only).
    pub last_commit_time: Option<i64>,
    entries: Vec<Entry>,
}

/// What the result records about the source.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceRecord {
    /// Git checkout or plain tree.
    pub kind: SourceKind,
    /// SHA-256 of the canonical archive.
    pub sha256: String,
    /// Regular files in it.
    pub files: u64,
    /// Their total size.
    pub bytes: u64,
}

/// The source tree cannot be read or archived.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// A file operation failed.
    #[error(transparent)]
    Io(#[from] PathError),
    /// `git` failed on what looks like a checkout, or lists nothing.
    #[error("cannot list the git-tracked files in {}: {message}", root.display())]
    Git {
        /// The source directory.
        root: PathBuf,
        /// What git said.
        message: String,
    },
    /// SIGINT or SIGTERM arrived while archiving.
    #[error(transparent)]
    Interrupted(#[from] crate::interrupt::Interrupted),
    /// Something that cannot go into an archive (device, FIFO, socket).
    #[error("{}: a {kind} cannot be part of the source; remove it or build from a git checkout", path.display())]
    Unsupported {
        /// The path.
        path: PathBuf,
        /// What it is.
        kind: &'static str,
    },
}

/// `git -C root` that runs no program the repository's configuration names
/// (a hostile checkout's core.fsmonitor would otherwise run on the host) and
/// reads checkouts owned by another user.
fn git(root: &Path) -> Command {
    let mut cmd = Command::new("git");
    cmd.arg("-C")
        .arg(root)
        .args(["-c", "core.fsmonitor=false", "-c", "safe.directory=*"])
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("LC_ALL", "C")
        .stdin(Stdio::null());
    cmd
}

fn run_git(root: &Path, args: &[&str]) -> Result<Option<Vec<u8>>, SourceError> {
    let out = git(root).args(args).output();
    match out {
        Ok(out) if out.status.success() => Ok(Some(out.stdout)),
        Ok(out) => Err(SourceError::Git { root: root.to_path_buf(), message: String::from_utf8_lossy(&out.stderr).trim().to_string() }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(path_error("run git in", root)(e).into()),
    }
}

/// Whether `root` lies inside a git work tree (false when git is missing).
fn is_git_checkout(root: &Path) -> bool {
    git(root)
        .args(["rev-parse", "--is-inside-work-tree"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The entry for `rel` (relative to `root`), by what is on disk.
fn entry_for(root: &Path, rel: PathBuf) -> Result<Entry, SourceError> {
    let full = root.join(&rel);
    let meta = fs::symlink_metadata(&full).map_err(path_error("read", &full))?;
    let ft = meta.file_type();
    if ft.is_dir() {
        Ok(Entry::Dir(rel))
    } else if ft.is_file() {
        Ok(Entry::File { path: rel, executable: meta.permissions().mode() & 0o111 != 0 })
    } else if ft.is_symlink() {
        let target = fs::read_link(&full).map_err(path_error("read the link", &full))?;
        Ok(Entry::Symlink { path: rel, target })
    } else {
        let kind = if ft.is_fifo() {
            "FIFO"
        } else if ft.is_socket() {
            "socket"
        } else {
            "device file"
        };
        Err(SourceError::Unsupported { path: full, kind })
    }
}

/// Every entry under `dir`, skipping `exclude` (the output directory).
fn walk(root: &Path, rel: &Path, exclude: Option<&Path>, out: &mut Vec<Entry>) -> Result<(), SourceError> {
    let dir = root.join(rel);
    let mut names: Vec<_> = fs::read_dir(&dir)
        .map_err(path_error("list", &dir))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()
        .map_err(path_error("list", &dir))?;
    names.sort();
    for name in names {
        let rel = rel.join(name);
        if exclude.is_some_and(|x| root.join(&rel) == x) {
            continue;
        }
        let entry = entry_for(root, rel.clone())?;
        let is_dir = matches!(entry, Entry::Dir(_));
        out.push(entry);
        if is_dir {
            walk(root, &rel, exclude, out)?;
        }
    }
    Ok(())
}

impl SourceTree {
    /// Lists the tree at `root`; `exclude` (the output directory, if it lies
    /// inside) is left out of a plain tree.
    pub fn scan(root: &Path, exclude: Option<&Path>) -> Result<SourceTree, SourceError> {
        let root = fs::canonicalize(root).map_err(path_error("find the source directory", root))?;
        let exclude = exclude.and_then(|x| fs::canonicalize(x).ok());
        if !is_git_checkout(&root) {
            let mut entries = Vec::new();
            walk(&root, Path::new(""), exclude.as_deref(), &mut entries)?;
            entries.sort_by(|a, b| a.path().cmp(b.path()));
            return Ok(SourceTree { root, kind: SourceKind::Tree, last_commit_time: None, entries });
        }
        let listed = run_git(&root, &["ls-files", "-z", "--cached", "--recurse-submodules"])?.unwrap_or_default();
        let mut dirs = BTreeSet::new();
        let mut entries = Vec::new();
        for name in listed.split(|b| *b == 0).filter(|n| !n.is_empty()) {
            let rel = PathBuf::from(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(name));
            if fs::symlink_metadata(root.join(&rel)).is_err() {
                tracing::warn!("{}: tracked by git but deleted; left out", rel.display());
                continue;
            }
            dirs.extend(rel.ancestors().skip(1).filter(|a| !a.as_os_str().is_empty()).map(Path::to_path_buf));
            entries.push(entry_for(&root, rel)?);
        }
        if entries.is_empty() {
            return Err(SourceError::Git { root, message: "no file under this directory is tracked by git (git add them, or build a copy outside the checkout)".into() });
        }
        let untracked = run_git(&root, &["ls-files", "-z", "--others", "--exclude-standard"])?.unwrap_or_default();
        let untracked = untracked.split(|b| *b == 0).filter(|n| !n.is_empty()).count();
        if untracked > 0 {
            tracing::warn!("{untracked} untracked file(s) under {} are left out of the source (only git-tracked files are built)", root.display());
        }
        entries.extend(dirs.into_iter().map(Entry::Dir));
        entries.sort_by(|a, b| a.path().cmp(b.path()));
        entries.dedup_by(|a, b| a.path() == b.path());
        let last_commit_time = run_git(&root, &["log", "-1", "--format=%ct", "--", "."])?
            .and_then(|out| String::from_utf8_lossy(&out).trim().parse().ok());
        Ok(SourceTree { root, kind: SourceKind::Git, last_commit_time, entries })
    }

    /// The canonical root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Appends the entries to `tar`: paths under `prefix`, owned by `owner`,
    /// every mtime `epoch`. Returns (regular files, their bytes).
    fn append_tree<W: Write>(&self, tar: &mut tar::Builder<W>, prefix: &Path, owner: u32, epoch: i64) -> Result<(u64, u64), SourceError> {
        let (mut files, mut bytes) = (0, 0);
        let err = |p: &Path| {
            let full = self.root.join(p);
            move |e: io::Error| PathError { action: "archive", path: full, source: e }
        };
        for entry in &self.entries {
            crate::interrupt::check()?;
            let name = prefix.join(entry.path());
            match entry {
                Entry::Dir(p) => tar.append_data(&mut header(tar::EntryType::Directory, 0o755, owner, epoch), &name, io::empty()).map_err(err(p))?,
                Entry::File { path, executable } => {
                    let full = self.root.join(path);
                    let file = File::open(&full).map_err(path_error("read", &full))?;
                    let size = file.metadata().map_err(path_error("read", &full))?.len();
                    let mut h = header(tar::EntryType::Regular, if *executable { 0o755 } else { 0o644 }, owner, epoch);
                    h.set_size(size);
                    tar.append_data(&mut h, &name, file).map_err(err(path))?;
                    files += 1;
                    bytes += size;
                }
                Entry::Symlink { path, target } => {
                    tar.append_link(&mut header(tar::EntryType::Symlink, 0o777, owner, epoch), &name, target).map_err(err(path))?;
                }
            }
        }
        Ok((files, bytes))
    }

    /// SHA-256 and size of the canonical archive (uid/gid 0, no prefix).
    pub fn record(&self, epoch: i64) -> Result<SourceRecord, SourceError> {
        let mut tar = tar::Builder::new(HashSink(Sha256::new()));
        let (files, bytes) = self.append_tree(&mut tar, Path::new(""), 0, epoch)?;
        let hasher = tar.into_inner().map_err(path_error("archive", &self.root))?;
        Ok(SourceRecord { kind: self.kind, sha256: hex::encode(hasher.0.finalize()), files, bytes })
    }

    /// Writes the scratch disk's contents as a tar: `src/` (the tree, owned
    /// by the build user), `home/`, `tmp/` and `.reprovm/` with `extra`
    /// files (name, contents) for the guest-side steps.
    pub fn write_scratch_tar(&self, path: &Path, epoch: i64, extra: &[(&str, Vec<u8>)]) -> Result<(), SourceError> {
        let file = File::create(path).map_err(path_error("create", path))?;
        let mut tar = tar::Builder::new(io::BufWriter::with_capacity(1 << 20, file));
        let err = || path_error("write", path);
        for (name, uid) in [(".reprovm", 0), ("home", BUILD_UID), ("src", BUILD_UID), ("tmp", BUILD_UID)] {
            tar.append_data(&mut header(tar::EntryType::Directory, 0o755, uid, epoch), name, io::empty()).map_err(err())?;
        }
        for (name, contents) in extra {
            let mut h = header(tar::EntryType::Regular, 0o644, 0, epoch);
            h.set_size(contents.len() as u64);
            tar.append_data(&mut h, Path::new(".reprovm").join(name), contents.as_slice()).map_err(err())?;
        }
        self.append_tree(&mut tar, Path::new("src"), BUILD_UID, epoch)?;
        tar.into_inner().and_then(|mut w| w.flush()).map_err(err())?;
        Ok(())
    }
}

/// A tar header with fixed owner, mode and time and no owner names.
fn header(kind: tar::EntryType, mode: u32, owner: u32, epoch: i64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(0);
    h.set_uid(u64::from(owner));
    h.set_gid(u64::from(owner));
    h.set_mtime(epoch.max(0) as u64);
    h
}

/// A writer that only hashes.
struct HashSink(Sha256);

impl Write for HashSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn tree() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        fs::create_dir_all(p.join("b/c")).unwrap();
        fs::write(p.join("b/c/z.txt"), "z").unwrap();
        fs::write(p.join("a.c"), "int main(){}").unwrap();
        fs::write(p.join("run.sh"), "#!/bin/sh").unwrap();
        fs::set_permissions(p.join("run.sh"), fs::Permissions::from_mode(0o700)).unwrap();
        symlink("a.c", p.join("link")).unwrap();
        fs::create_dir(p.join("out")).unwrap();
        fs::write(p.join("out/old"), "x").unwrap();
        dir
    }

    #[test]
    fn plain_tree_is_sorted_and_skips_the_output_directory() {
        let dir = tree();
        let t = SourceTree::scan(dir.path(), Some(&dir.path().join("out"))).unwrap();
        let paths: Vec<_> = t.entries.iter().map(|e| e.path().display().to_string()).collect();
        assert_eq!(paths, ["a.c", "b", "b/c", "b/c/z.txt", "link", "run.sh"]);
        assert_eq!(t.kind, SourceKind::Tree);
    }

    #[test]
    fn archive_hash_ignores_mtimes_and_permissions_beyond_the_exec_bit() {
        let dir = tree();
        let a = SourceTree::scan(dir.path(), None).unwrap().record(1_700_000_000).unwrap();
        let f = dir.path().join("a.c");
        fs::set_permissions(&f, fs::Permissions::from_mode(0o600)).unwrap();
        File::options().append(true).open(&f).unwrap().set_modified(std::time::SystemTime::UNIX_EPOCH).unwrap();
        let b = SourceTree::scan(dir.path(), None).unwrap().record(1_700_000_000).unwrap();
        assert_eq!(a, b);
        assert_eq!((a.files, a.bytes), (4, 1 + 12 + 9 + 1), "a.c, b/c/z.txt, run.sh, out/old; the link is no file");
        fs::write(&f, "int main(){return 1;}").unwrap();
        let c = SourceTree::scan(dir.path(), None).unwrap().record(1_700_000_000).unwrap();
        assert_ne!(a.sha256, c.sha256);
    }

    #[test]
    fn scratch_tar_has_the_tree_under_src_owned_by_the_build_user() {
        let dir = tree();
        let t = SourceTree::scan(dir.path(), Some(&dir.path().join("out"))).unwrap();
        let tar_path = dir.path().join("out/scratch.tar");
        t.write_scratch_tar(&tar_path, 1_700_000_000, &[("artifacts", b"hello\0".to_vec())]).unwrap();
        let mut archive = tar::Archive::new(File::open(&tar_path).unwrap());
        let entries: Vec<(String, u64, u32)> = archive
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (e.path().unwrap().display().to_string(), e.header().uid().unwrap(), e.header().mode().unwrap())
            })
            .collect();
        let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(names, [".reprovm", "home", "src", "tmp", ".reprovm/artifacts", "src/a.c", "src/b", "src/b/c", "src/b/c/z.txt", "src/link", "src/run.sh"]);
        assert!(entries.iter().filter(|e| e.0.starts_with("src/")).all(|e| e.1 == 1000));
        assert_eq!(entries.iter().find(|e| e.0 == "src/run.sh").unwrap().2, 0o755);
    }

    #[test]
    fn fifos_are_refused_naming_the_path() {
        let dir = tree();
        nix::unistd::mkfifo(&dir.path().join("pipe"), nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
        let e = SourceTree::scan(dir.path(), None).unwrap_err().to_string();
        assert!(e.contains("pipe") && e.contains("FIFO"), "{e}");
    }
}
