//! Paths inside the source directory, resolved one component at a time
//! from a descriptor of that directory and never through a symbolic link:
//! every directory on the way is opened with `O_DIRECTORY | O_NOFOLLOW`,
//! the last component is examined with `AT_SYMLINK_NOFOLLOW` or opened with
//! `O_NOFOLLOW`. A hostile tree that replaces a directory with a link to,
//! say, `~/.ssh` gets an error naming the path, never the link's target,
//! even when it swaps the directory between the scan and the read.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, Stat};
use rustix::io::Errno;

use super::SourceError;
use crate::path_error::PathError;

const DIRECTORY: OFlags = OFlags::RDONLY.union(OFlags::DIRECTORY).union(OFlags::NOFOLLOW).union(OFlags::CLOEXEC);
/// `NONBLOCK`: a FIFO swapped in after the scan must not hang the read.
const REGULAR: OFlags = OFlags::RDONLY.union(OFlags::NOFOLLOW).union(OFlags::NONBLOCK).union(OFlags::NOCTTY).union(OFlags::CLOEXEC);

/// The source directory, opened once.
#[derive(Debug)]
pub(super) struct Beneath {
    root: PathBuf,
    fd: OwnedFd,
}

/// How far the directories leading to a path could be opened.
enum Parent<'a> {
    /// The directory holding the last component (None: the root) and that component.
    Found(Option<OwnedFd>, &'a OsStr),
    /// Some component does not exist, or is a file where a directory was expected.
    Absent,
    /// A component that must be a directory is a symbolic link.
    Link(PathBuf),
}

impl Beneath {
    /// Opens `root` (a canonical path: the user's own argument may be reached through links).
    pub(super) fn open(root: &Path) -> Result<Beneath, SourceError> {
        let fd = rustix::fs::open(root, DIRECTORY, Mode::empty()).map_err(io_error("open", root))?;
        Ok(Beneath { root: root.to_path_buf(), fd })
    }

    /// The directory's path, for messages.
    pub(super) fn root(&self) -> &Path {
        &self.root
    }

    /// The type, mode and size of `rel` (a link is not followed), or None when it does not exist.
    pub(super) fn lstat(&self, rel: &Path) -> Result<Option<Stat>, SourceError> {
        let (parent, name) = match self.parent(rel)? {
            Parent::Found(parent, name) => (parent, name),
            Parent::Absent => return Ok(None),
            Parent::Link(at) => return Err(SourceError::Symlinked { path: rel.to_path_buf(), component: at }),
        };
        match rustix::fs::statat(fd(&parent, &self.fd), name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(st)),
            Err(Errno::NOENT) => Ok(None),
            Err(e) => Err(io_error("read", &self.root.join(rel))(e)),
        }
    }

    /// The target of the symbolic link `rel`.
    pub(super) fn read_link(&self, rel: &Path) -> Result<PathBuf, SourceError> {
        let (parent, name) = self.existing_parent(rel)?;
        let target =
            rustix::fs::readlinkat(fd(&parent, &self.fd), name, Vec::new()).map_err(io_error("read the link", &self.root.join(rel)))?;
        Ok(PathBuf::from(OsStr::from_bytes(target.as_bytes())))
    }

    /// Opens the regular file `rel` for reading.
    pub(super) fn open_file(&self, rel: &Path) -> Result<File, SourceError> {
        let (parent, name) = self.existing_parent(rel)?;
        let full = self.root.join(rel);
        let file = File::from(rustix::fs::openat(fd(&parent, &self.fd), name, REGULAR, Mode::empty()).map_err(io_error("read", &full))?);
        let kind = FileType::from_raw_mode(rustix::fs::fstat(&file).map_err(io_error("read", &full))?.st_mode);
        if kind != FileType::RegularFile {
            return Err(PathError { action: "read", path: full, source: io::Error::other("it is no longer a regular file") }.into());
        }
        Ok(file)
    }

    /// The names in directory `rel` (empty for the root), unsorted.
    pub(super) fn list(&self, rel: &Path) -> Result<Vec<OsString>, SourceError> {
        let full = self.root.join(rel);
        let dir = match rel.file_name() {
            None => rustix::fs::Dir::read_from(&self.fd),
            Some(_) => {
                let (parent, name) = self.existing_parent(rel)?;
                rustix::fs::openat(fd(&parent, &self.fd), name, DIRECTORY, Mode::empty()).and_then(rustix::fs::Dir::new)
            }
        }
        .map_err(io_error("list", &full))?;
        let mut names = Vec::new();
        for entry in dir {
            let entry = entry.map_err(io_error("list", &full))?;
            let name = entry.file_name().to_bytes();
            if name != b"." && name != b".." {
                names.push(OsStr::from_bytes(name).to_os_string());
            }
        }
        Ok(names)
    }

    /// Like `parent`, for a path the scan found: any miss is an error.
    fn existing_parent<'a>(&self, rel: &'a Path) -> Result<(Option<OwnedFd>, &'a OsStr), SourceError> {
        match self.parent(rel)? {
            Parent::Found(parent, name) => Ok((parent, name)),
            Parent::Absent => Err(io_error("read", &self.root.join(rel))(Errno::NOENT)),
            Parent::Link(at) => Err(SourceError::Symlinked { path: rel.to_path_buf(), component: at }),
        }
    }

    /// Opens each directory leading to `rel`'s last component without following links.
    fn parent<'a>(&self, rel: &'a Path) -> Result<Parent<'a>, SourceError> {
        let mut names = Vec::new();
        for c in rel.components() {
            match c {
                Component::Normal(name) => names.push(name),
                _ => return Err(SourceError::BadPath { path: rel.to_path_buf(), reason: "it is not a plain relative path" }),
            }
        }
        let Some((last, dirs)) = names.split_last() else {
            return Err(SourceError::BadPath { path: rel.to_path_buf(), reason: "it is empty" });
        };
        let mut current: Option<OwnedFd> = None;
        let mut walked = PathBuf::new();
        for name in dirs {
            walked.push(name);
            let at = fd(&current, &self.fd);
            match rustix::fs::openat(at, *name, DIRECTORY, Mode::empty()) {
                Ok(next) => current = Some(next),
                Err(Errno::NOENT) => return Ok(Parent::Absent),
                Err(Errno::LOOP | Errno::NOTDIR) => return self.not_a_directory(at, name, walked),
                Err(e) => return Err(io_error("open", &self.root.join(&walked))(e)),
            }
        }
        Ok(Parent::Found(current, last))
    }

    /// Why `name` in `at` could not be opened as a directory.
    fn not_a_directory(&self, at: BorrowedFd<'_>, name: &OsStr, walked: PathBuf) -> Result<Parent<'static>, SourceError> {
        let st = rustix::fs::statat(at, name, AtFlags::SYMLINK_NOFOLLOW).map_err(io_error("read", &self.root.join(&walked)))?;
        Ok(if FileType::from_raw_mode(st.st_mode) == FileType::Symlink { Parent::Link(walked) } else { Parent::Absent })
    }
}

/// The descriptor to resolve the next component in: `dir`, else the root.
fn fd<'a>(dir: &'a Option<OwnedFd>, root: &'a OwnedFd) -> BorrowedFd<'a> {
    dir.as_ref().unwrap_or(root).as_fd()
}

fn io_error<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(Errno) -> SourceError + 'a {
    move |e| SourceError::Io(PathError { action, path: path.to_path_buf(), source: e.into() })
}
