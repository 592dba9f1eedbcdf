//! The source tree as a deterministic tar: the git-tracked files when the
//! source is a git checkout, otherwise every file except the output
//! directory; sorted, every mtime set to SOURCE_DATE_EPOCH, normalised modes,
//! no owner names. The canonical archive (uid/gid 0) is only hashed: its
//! SHA-256 identifies the source in the result. The archive that populates
//! the scratch disk holds the same entries under `src/`, owned by the build
//! user, beside the build user's empty home and temporary directories.
//!
//! The source is hostile: its repository is read with gix, never with the
//! git program (see `git`), and every path in it is opened without following
//! a symbolic link in any component (see `beneath`).

#[cfg(test)]
mod attacks;
mod beneath;
mod git;
#[cfg(test)]
mod test_repo;

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use rustix::fs::FileType;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::guest::contract::{BUILD_UID, SCRATCH_DIRS};
use crate::path_error::{path_error, PathError};
use beneath::Beneath;

/// How the file list was chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// The files in the index of a checkout.
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
    dir: Beneath,
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
    /// The repository cannot be read, or tracks nothing under the source.
    #[error("cannot use the git checkout {}: {message}", root.display())]
    Git {
        /// The source directory.
        root: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The repository belongs to another user (git's `safe.directory` rule).
    #[error("refusing the git checkout {}: {} is owned by uid {owner}, not by you (uid {user}), and its owner decides which files are built; build as that user, or build a copy you own (git clone it, or copy the files without .git)", worktree.display(), path.display())]
    NotOwned {
        /// The work tree.
        worktree: PathBuf,
        /// The directory or file with the foreign owner.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// The effective uid of this process.
        user: u32,
    },
    /// A path from the index that could escape or confuse the archive.
    #[error("refusing the git-tracked path {path:?}: {reason}")]
    BadPath {
        /// The path as the index has it.
        path: PathBuf,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A path whose parent directory is a symbolic link.
    #[error(
        "refusing {path:?}: {component:?} is a symbolic link, and source files are only read through real directories inside the source"
    )]
    Symlinked {
        /// The path, relative to the source directory.
        path: PathBuf,
        /// The component that is a link.
        component: PathBuf,
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

/// The entry for `rel` by what is on disk, or None when nothing is there.
fn entry_for(dir: &Beneath, rel: PathBuf) -> Result<Option<Entry>, SourceError> {
    let Some(st) = dir.lstat(&rel)? else { return Ok(None) };
    let entry = match FileType::from_raw_mode(st.st_mode) {
        FileType::Directory => Entry::Dir(rel),
        FileType::RegularFile => Entry::File { path: rel, executable: st.st_mode & 0o111 != 0 },
        FileType::Symlink => Entry::Symlink { target: dir.read_link(&rel)?, path: rel },
        other => {
            let kind = match other {
                FileType::Fifo => "FIFO",
                FileType::Socket => "socket",
                _ => "device file",
            };
            return Err(SourceError::Unsupported { path: dir.root().join(rel), kind });
        }
    };
    Ok(Some(entry))
}

/// Every entry under `rel`, skipping `exclude` (relative to the root).
fn walk(dir: &Beneath, rel: &Path, exclude: &[PathBuf], out: &mut Vec<Entry>) -> Result<(), SourceError> {
    let mut names = dir.list(rel)?;
    names.sort();
    for name in names {
        let rel = rel.join(name);
        if exclude.contains(&rel) {
            continue;
        }
        let Some(entry) = entry_for(dir, rel.clone())? else { continue };
        let is_dir = matches!(entry, Entry::Dir(_));
        out.push(entry);
        if is_dir {
            walk(dir, &rel, exclude, out)?;
        }
    }
    Ok(())
}

/// The tracked entries of `checkout` under `dir`.
fn tracked_entries(dir: &Beneath, checkout: &git::Checkout, exclude: &[PathBuf]) -> Result<Vec<Entry>, SourceError> {
    let tracked = checkout.tracked(dir)?;
    let mut dirs = BTreeSet::new();
    let mut entries = Vec::new();
    for rel in &tracked.files {
        let Some(entry) = entry_for(dir, rel.clone())? else {
            tracing::warn!("{rel:?}: tracked by git but deleted; left out");
            continue;
        };
        dirs.extend(rel.ancestors().skip(1).filter(|a| !a.as_os_str().is_empty()).map(Path::to_path_buf));
        entries.push(entry);
    }
    if entries.is_empty() {
        let message = "no file under this directory is tracked by git (git add them, or build a copy outside the checkout)".into();
        return Err(SourceError::Git { root: dir.root().to_path_buf(), message });
    }
    let untracked = checkout.count_untracked(dir, &tracked, exclude)?;
    if untracked > 0 {
        tracing::warn!(
            "about {untracked} untracked file(s) under {} are left out of the source (only git-tracked files are built; ignore rules are taken from the .gitignore files in the index)",
            dir.root().display()
        );
    }
    entries.extend(dirs.into_iter().map(Entry::Dir));
    Ok(entries)
}

impl SourceTree {
    /// Lists the tree at `root`; `exclude` (the output directory and its
    /// staging directory, where they lie inside) is left out of a plain
    /// tree and of the untracked-file count.
    pub fn scan(root: &Path, exclude: &[&Path]) -> Result<SourceTree, SourceError> {
        let root = fs::canonicalize(root).map_err(path_error("find the source directory", root))?;
        let exclude: Vec<PathBuf> = exclude
            .iter()
            .filter_map(|x| Some(fs::canonicalize(x).ok()?.strip_prefix(&root).ok()?.to_path_buf()))
            .filter(|x| !x.as_os_str().is_empty())
            .collect();
        let dir = Beneath::open(&root)?;
        let (kind, last_commit_time, mut entries) = match git::Checkout::discover(&root)? {
            Some(checkout) => (SourceKind::Git, checkout.last_commit_time()?, tracked_entries(&dir, &checkout, &exclude)?),
            None => {
                let mut entries = Vec::new();
                walk(&dir, Path::new(""), &exclude, &mut entries)?;
                (SourceKind::Tree, None, entries)
            }
        };
        entries.sort_by(|a, b| a.path().cmp(b.path()));
        entries.dedup_by(|a, b| a.path() == b.path());
        Ok(SourceTree { dir, kind, last_commit_time, entries })
    }

    /// The canonical root directory.
    pub fn root(&self) -> &Path {
        self.dir.root()
    }

    /// Appends the entries to `tar`: paths under `prefix`, owned by `owner`,
    /// every mtime `epoch`. Returns (regular files, their bytes).
    fn append_tree<W: Write>(&self, tar: &mut tar::Builder<W>, prefix: &Path, owner: u32, epoch: i64) -> Result<(u64, u64), SourceError> {
        let (mut files, mut bytes) = (0, 0);
        let err = |p: &Path| {
            let full = self.dir.root().join(p);
            move |e: io::Error| PathError { action: "archive", path: full, source: e }
        };
        for entry in &self.entries {
            crate::interrupt::check()?;
            let name = prefix.join(entry.path());
            match entry {
                Entry::Dir(p) => {
                    tar.append_data(&mut header(tar::EntryType::Directory, 0o755, owner, epoch), &name, io::empty()).map_err(err(p))?
                }
                Entry::File { path, executable } => {
                    let file = self.dir.open_file(path)?;
                    let size = file.metadata().map_err(path_error("read", &self.dir.root().join(path)))?.len();
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
        let hasher = tar.into_inner().map_err(path_error("archive", self.dir.root()))?;
        Ok(SourceRecord { kind: self.kind, sha256: hex::encode(hasher.0.finalize()), files, bytes })
    }

    /// Writes the scratch disk's contents as a tar (the contract's
    /// `SCRATCH_DIRS`): the tree in `src`, owned by the build user, its
    /// `home` and `tmp`, and root's `meta` directory with `extra` files
    /// (name, contents) for the guest-side steps.
    pub fn write_scratch_tar(&self, path: &Path, epoch: i64, extra: &[(&str, Vec<u8>)]) -> Result<(), SourceError> {
        let file = File::create(path).map_err(path_error("create", path))?;
        let mut tar = tar::Builder::new(io::BufWriter::with_capacity(1 << 20, file));
        let err = || path_error("write", path);
        let dirs = &SCRATCH_DIRS;
        let mut top = [(dirs.meta, 0), (dirs.home, BUILD_UID), (dirs.src, BUILD_UID), (dirs.tmp, BUILD_UID)];
        top.sort();
        for (name, uid) in top {
            tar.append_data(&mut header(tar::EntryType::Directory, 0o755, uid, epoch), name, io::empty()).map_err(err())?;
        }
        for (name, contents) in extra {
            let mut h = header(tar::EntryType::Regular, 0o644, 0, epoch);
            h.set_size(contents.len() as u64);
            tar.append_data(&mut h, Path::new(dirs.meta).join(name), contents.as_slice()).map_err(err())?;
        }
        self.append_tree(&mut tar, Path::new(dirs.src), BUILD_UID, epoch)?;
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
    use std::os::unix::fs::{symlink, PermissionsExt};

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
        let t = SourceTree::scan(dir.path(), &[&dir.path().join("out")]).unwrap();
        let paths: Vec<_> = t.entries.iter().map(|e| e.path().display().to_string()).collect();
        assert_eq!(paths, ["a.c", "b", "b/c", "b/c/z.txt", "link", "run.sh"]);
        assert_eq!(t.kind, SourceKind::Tree);
    }

    #[test]
    fn archive_hash_ignores_mtimes_and_permissions_beyond_the_exec_bit() {
        let dir = tree();
        let a = SourceTree::scan(dir.path(), &[]).unwrap().record(1_700_000_000).unwrap();
        let f = dir.path().join("a.c");
        fs::set_permissions(&f, fs::Permissions::from_mode(0o600)).unwrap();
        File::options().append(true).open(&f).unwrap().set_modified(std::time::SystemTime::UNIX_EPOCH).unwrap();
        let b = SourceTree::scan(dir.path(), &[]).unwrap().record(1_700_000_000).unwrap();
        assert_eq!(a, b);
        assert_eq!((a.files, a.bytes), (4, 1 + 12 + 9 + 1), "a.c, b/c/z.txt, run.sh, out/old; the link is no file");
        fs::write(&f, "int main(){return 1;}").unwrap();
        let c = SourceTree::scan(dir.path(), &[]).unwrap().record(1_700_000_000).unwrap();
        assert_ne!(a.sha256, c.sha256);
    }

    #[test]
    fn scratch_tar_has_the_tree_under_src_owned_by_the_build_user() {
        let dir = tree();
        let t = SourceTree::scan(dir.path(), &[&dir.path().join("out")]).unwrap();
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
        assert_eq!(
            names,
            [
                ".reprovm",
                "home",
                "src",
                "tmp",
                ".reprovm/artifacts",
                "src/a.c",
                "src/b",
                "src/b/c",
                "src/b/c/z.txt",
                "src/link",
                "src/run.sh"
            ]
        );
        assert!(entries.iter().filter(|e| e.0.starts_with("src/")).all(|e| e.1 == 1000));
        assert_eq!(entries.iter().find(|e| e.0 == "src/run.sh").unwrap().2, 0o755);
    }

    #[test]
    fn fifos_are_refused_naming_the_path() {
        let dir = tree();
        nix::unistd::mkfifo(&dir.path().join("pipe"), nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
        let e = SourceTree::scan(dir.path(), &[]).unwrap_err().to_string();
        assert!(e.contains("pipe") && e.contains("FIFO"), "{e}");
    }

    #[test]
    fn plain_tree_hash_ignores_the_output_staging_directory() {
        let dir = tree();
        let out = dir.path().join("out");
        fs::write(out.join("SHA256SUMS"), "an earlier build's").unwrap();
        let before = SourceTree::scan(dir.path(), &[&out]).unwrap().record(1_700_000_000).unwrap();
        let staging = crate::rebuild::output::OutputDir::prepare(&out).unwrap();
        fs::write(staging.path().join("build.log"), "partial").unwrap();
        assert!(staging.path().starts_with(dir.path()), "the default --out puts the staging directory inside the source");
        let during = SourceTree::scan(dir.path(), &[&out, staging.path()]).unwrap().record(1_700_000_000).unwrap();
        assert_eq!(before, during);
    }
}
