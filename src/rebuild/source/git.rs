//! The git side of the source, read with gix from the repository's files:
//! which checkout the source directory lies in, whether its owner may be
//! trusted, the tracked paths under it (checked-out submodules included),
//! how many files are left untracked, and the time of the last commit that
//! touched it. No program runs, whatever the repository's configuration
//! names (fsmonitor, gpg, filters, hooks, pagers): gix is built without the
//! features that could start one, and only the repository's own
//! configuration is read (no global, system or environment settings).

use std::collections::HashSet;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use gix::bstr::{BStr, ByteSlice};
use gix::index::entry::Mode;
use gix::worktree::stack::state::ignore::Source as IgnoreSource;
use gix::ObjectId;
use rustix::fs::FileType;

use super::beneath::Beneath;
use super::SourceError;
use crate::path_error::path_error;

/// A git checkout holding the source directory.
pub(super) struct Checkout {
    repo: gix::Repository,
    index: gix::index::File,
    /// The source directory relative to the work tree ("" when they are the same).
    prefix: PathBuf,
    /// The source directory, for messages.
    root: PathBuf,
}

/// What the index lists under the source directory, relative to it.
pub(super) struct Tracked {
    /// Every tracked path, those of checked-out submodules included.
    pub files: Vec<PathBuf>,
    /// The submodules' directories (their untracked files are not counted).
    pub submodules: Vec<PathBuf>,
}

impl Checkout {
    /// The checkout `root` (canonical) lies in, if any. A repository owned
    /// by another user is refused, as git refuses it by default.
    pub(super) fn discover(root: &Path) -> Result<Option<Checkout>, SourceError> {
        let Ok((path, _)) = gix::discover::upwards(root) else { return Ok(None) };
        let Some(worktree) = path.into_repository_and_work_tree_directories().1 else { return Ok(None) };
        let worktree = fs::canonicalize(&worktree).map_err(path_error("find the work tree", &worktree))?;
        let repo = open_owned(&worktree)?;
        let prefix =
            root.strip_prefix(&worktree).map_err(|_| git_error(root)(format!("it is not inside the work tree {}", worktree.display())))?;
        let index = read_index(&repo, root)?;
        Ok(Some(Checkout { repo, index, prefix: prefix.to_path_buf(), root: root.to_path_buf() }))
    }

    /// The tracked paths under the source directory, each checked.
    pub(super) fn tracked(&self, dir: &Beneath) -> Result<Tracked, SourceError> {
        let mut tracked = Tracked { files: Vec::new(), submodules: Vec::new() };
        list_index(&self.index, self.prefix.as_os_str().as_bytes(), Path::new(""), dir, &mut tracked)?;
        Ok(tracked)
    }

    /// Files under the source directory that git would call untracked, but
    /// for `exclude` (paths relative to it). An approximation: ignore rules
    /// come from the `.gitignore` files in the index and the repository's
    /// `info/exclude`, not from the work tree or the user's global
    /// excludes, and an untracked nested repository counts as one.
    pub(super) fn count_untracked(&self, dir: &Beneath, tracked: &Tracked, exclude: &[PathBuf]) -> Result<usize, SourceError> {
        let mut stack = self.repo.excludes(&self.index, None, IgnoreSource::IdMapping).map_err(self.failed())?;
        let known: HashSet<&Path> = tracked.files.iter().chain(&tracked.submodules).chain(exclude).map(PathBuf::as_path).collect();
        let dirs: HashSet<&Path> = tracked.files.iter().flat_map(|f| f.ancestors().skip(1)).collect();
        let mut walk = Untracked { dir, known, dirs, prefix: &self.prefix, count: 0 };
        walk.visit(Path::new(""), &mut |path, is_dir| {
            let mode = if is_dir { Mode::DIR } else { Mode::FILE };
            Ok(stack.at_path(path, Some(mode)).map_err(self.failed())?.is_excluded())
        })?;
        Ok(walk.count)
    }

    /// Committer time of the last commit that changed the source directory,
    /// as `git log -1 -- .` finds it with git's default history
    /// simplification: from HEAD, follow a parent whose tree at the source
    /// directory is the same, until a commit has none.
    pub(super) fn last_commit_time(&self) -> Result<Option<i64>, SourceError> {
        if self.repo.head().map_err(self.failed())?.is_unborn() {
            return Ok(None);
        }
        let mut commit = self.repo.head_commit().map_err(self.failed())?;
        loop {
            let here = self.subtree(commit.id)?.flatten();
            let mut parents = Vec::new();
            for id in commit.parent_ids() {
                parents.extend(self.subtree(id.detach())?.map(|tree| (id.detach(), tree)));
            }
            match parents.iter().find(|(_, tree)| *tree == here) {
                Some((id, _)) => commit = self.repo.find_commit(*id).map_err(self.failed())?,
                None if here.is_none() && parents.is_empty() => return Ok(None),
                None => return Ok(Some(commit.time().map_err(self.failed())?.seconds)),
            }
        }
    }

    /// The id of the source directory's tree in commit `id` (inner None:
    /// absent there), or None when the commit is not in the repository (the
    /// edge of a shallow clone, which git treats as a root).
    fn subtree(&self, id: ObjectId) -> Result<Option<Option<ObjectId>>, SourceError> {
        let Some(object) = self.repo.try_find_object(id).map_err(self.failed())? else { return Ok(None) };
        let tree = object.try_into_commit().map_err(self.failed())?.tree().map_err(self.failed())?;
        if self.prefix.as_os_str().is_empty() {
            return Ok(Some(Some(tree.id)));
        }
        let entry = tree.lookup_entry_by_path(&self.prefix).map_err(self.failed())?;
        Ok(Some(entry.map(|e| e.object_id())))
    }

    fn failed<E: std::fmt::Display>(&self) -> impl FnOnce(E) -> SourceError + '_ {
        git_error(&self.root)
    }
}

/// Opens the repository of `worktree` after checking that the current user
/// owns the work tree, its `.git` and the repository directories.
fn open_owned(worktree: &Path) -> Result<gix::Repository, SourceError> {
    check_owner(worktree, worktree)?;
    check_owner(worktree, &worktree.join(".git"))?;
    let repo = gix::open_opts(worktree, gix::open::Options::isolated()).map_err(git_error(worktree))?;
    check_owner(worktree, repo.git_dir())?;
    check_owner(worktree, repo.common_dir())?;
    Ok(repo)
}

/// git's `safe.directory` rule without exceptions: the effective user must
/// own `path`, except that root may also use the `SUDO_UID` user's.
fn check_owner(worktree: &Path, path: &Path) -> Result<(), SourceError> {
    let owner = fs::symlink_metadata(path).map_err(path_error("read", path))?.uid();
    let user = nix::unistd::geteuid().as_raw();
    let sudo_uid = || std::env::var("SUDO_UID").ok().and_then(|v| v.parse::<u32>().ok());
    if owner == user || (user == 0 && sudo_uid() == Some(owner)) {
        return Ok(());
    }
    Err(SourceError::NotOwned { worktree: worktree.to_path_buf(), path: path.to_path_buf(), owner, user })
}

/// The index, or an empty one when the repository has none yet.
fn read_index(repo: &gix::Repository, root: &Path) -> Result<gix::index::File, SourceError> {
    if !repo.index_path().exists() {
        return Ok(gix::index::File::from_state(gix::index::State::new(repo.object_hash()), repo.index_path()));
    }
    repo.open_index().map_err(git_error(root))
}

/// Adds `index`'s entries under `prefix` to `out` below `base` (the
/// repository's place relative to the source directory), recursing into
/// checked-out submodules.
fn list_index(index: &gix::index::File, prefix: &[u8], base: &Path, dir: &Beneath, out: &mut Tracked) -> Result<(), SourceError> {
    for entry in index.entries() {
        let path = entry.path(index);
        let Some(rest) = strip_dir_prefix(path, prefix) else { continue };
        let rel = base.join(checked_path(rest)?);
        if entry.mode == Mode::COMMIT {
            submodule(&rel, dir, out)?;
        } else if entry.mode != Mode::DIR {
            out.files.push(rel);
        }
    }
    Ok(())
}

/// Adds the tracked files of the submodule at `rel`, if it is checked out.
fn submodule(rel: &Path, dir: &Beneath, out: &mut Tracked) -> Result<(), SourceError> {
    out.submodules.push(rel.to_path_buf());
    if dir.lstat(&rel.join(".git"))?.is_none() {
        return Ok(());
    }
    let worktree = dir.root().join(rel);
    let repo = open_owned(&worktree)?;
    let index = read_index(&repo, &worktree)?;
    list_index(&index, b"", rel, dir, out)
}

/// `path` below the directory `prefix` ("" for all), relative to it.
fn strip_dir_prefix<'a>(path: &'a BStr, prefix: &[u8]) -> Option<&'a BStr> {
    if prefix.is_empty() {
        return Some(path);
    }
    path.strip_prefix(prefix)?.strip_prefix(b"/").map(ByteSlice::as_bstr)
}

/// A path from an index as a relative path made of plain components, none
/// of them `.git`, without NUL or newline; anything else is refused.
fn checked_path(path: &BStr) -> Result<PathBuf, SourceError> {
    let as_path = || PathBuf::from(std::ffi::OsStr::from_bytes(path));
    let bad = |reason| Err(SourceError::BadPath { path: as_path(), reason });
    if path.contains(&0) || path.contains(&b'\n') {
        return bad("it contains a NUL or newline");
    }
    for c in path.split(|b| *b == b'/') {
        match c {
            b"" | b"." | b".." => return bad("it is not a plain relative path"),
            c if c.eq_ignore_ascii_case(b".git") => return bad("it has a .git component"),
            _ => {}
        }
    }
    Ok(as_path())
}

/// The walk that counts untracked files.
struct Untracked<'a> {
    dir: &'a Beneath,
    /// Tracked files, submodules and excluded paths: not counted, not entered.
    known: HashSet<&'a Path>,
    /// Directories holding tracked files: entered whatever the ignore rules say.
    dirs: HashSet<&'a Path>,
    prefix: &'a Path,
    count: usize,
}

impl Untracked<'_> {
    /// Counts below `rel`; `ignored(repo-relative path, is_dir)` applies the ignore rules.
    fn visit(&mut self, rel: &Path, ignored: &mut dyn FnMut(&Path, bool) -> Result<bool, SourceError>) -> Result<(), SourceError> {
        for name in self.dir.list(rel)? {
            let rel = rel.join(name);
            if rel.file_name().is_some_and(|n| n == ".git") || self.known.contains(rel.as_path()) {
                continue;
            }
            let Some(st) = self.dir.lstat(&rel)? else { continue };
            let is_dir = FileType::from_raw_mode(st.st_mode) == FileType::Directory;
            if self.dirs.contains(rel.as_path()) {
                self.visit(&rel, ignored)?;
            } else if ignored(&self.prefix.join(&rel), is_dir)? {
                continue;
            } else if is_dir && self.dir.lstat(&rel.join(".git"))?.is_none() {
                self.visit(&rel, ignored)?;
            } else {
                self.count += 1;
            }
        }
        Ok(())
    }
}

fn git_error<E: std::fmt::Display>(root: &Path) -> impl FnOnce(E) -> SourceError + '_ {
    move |e| SourceError::Git { root: root.to_path_buf(), message: e.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rebuild::source::test_repo::{commit_all, git, git_last_commit_time, repo_with};
    use crate::rebuild::source::{SourceKind, SourceTree};

    fn last_commit_time(dir: &Path) -> Option<i64> {
        SourceTree::scan(dir, &[]).unwrap().last_commit_time
    }

    #[test]
    fn index_paths_must_be_plain_relative_paths_without_git_components() {
        for (bad, reason) in [
            ("../etc/passwd", "plain relative"),
            ("/etc/passwd", "plain relative"),
            ("a//b", "plain relative"),
            ("a/./b", "plain relative"),
            ("a/", "plain relative"),
            (".git/config", ".git component"),
            ("sub/.GIT/hooks/pre-commit", ".git component"),
            ("a\nb", "NUL or newline"),
            ("a\0b", "NUL or newline"),
        ] {
            let e = checked_path(bad.into()).unwrap_err().to_string();
            assert!(e.contains(reason) && e.contains(&format!("{:?}", Path::new(bad))), "{bad:?}: {e}");
        }
        assert_eq!(checked_path("a/b.git/.gitignore".into()).unwrap(), Path::new("a/b.git/.gitignore"));
    }

    #[test]
    fn last_commit_time_is_what_git_log_finds_through_merges_and_shallow_clones() {
        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path().join("repo");
        repo_with(&repo, &[("top.txt", "1"), ("sub/a.txt", "1")], 1000);
        fs::write(repo.join("sub/a.txt"), "2").unwrap();
        commit_all(&repo, 2000, "sub changes");
        git(&repo, &["checkout", "-q", "-b", "side"]);
        fs::write(repo.join("top.txt"), "3").unwrap();
        commit_all(&repo, 3000, "side: top only");
        git(&repo, &["checkout", "-q", "main"]);
        fs::write(repo.join("sub/b.txt"), "4").unwrap();
        commit_all(&repo, 4000, "main: sub");
        let merge = |time: i64| {
            let date = format!("@{time} +0000");
            let out = crate::rebuild::source::test_repo::git_command(&repo, &["merge", "-q", "--no-ff", "-m", "merge", "side"])
                .env("GIT_AUTHOR_DATE", &date)
                .env("GIT_COMMITTER_DATE", &date)
                .output()
                .unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        };
        merge(5000);
        let check = |label: &str| {
            for d in [repo.clone(), repo.join("sub")] {
                assert_eq!(last_commit_time(&d), git_last_commit_time(&d), "{label}: {}", d.display());
            }
        };
        check("merge touching only the top through its second parent");
        assert_eq!((last_commit_time(&repo), last_commit_time(&repo.join("sub"))), (Some(5000), Some(4000)));

        git(&repo, &["checkout", "-q", "side"]);
        fs::write(repo.join("sub/c.txt"), "6").unwrap();
        commit_all(&repo, 6000, "side: sub");
        git(&repo, &["checkout", "-q", "main"]);
        fs::write(repo.join("top.txt"), "7").unwrap();
        commit_all(&repo, 7000, "main: top");
        merge(8000);
        fs::write(repo.join("top.txt"), "9").unwrap();
        commit_all(&repo, 9000, "main: top again");
        check("sub changed on both sides of a merge");
        assert_eq!(last_commit_time(&repo.join("sub")), Some(8000));

        let shallow = dir.path().join("shallow");
        git(dir.path(), &["clone", "-q", "--depth", "2", &format!("file://{}", repo.display()), "shallow"]);
        for d in [shallow.clone(), shallow.join("sub")] {
            assert_eq!(last_commit_time(&d), git_last_commit_time(&d), "shallow: {}", d.display());
        }
    }

    #[test]
    fn untracked_files_are_counted_as_git_lists_them() {
        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path();
        repo_with(repo, &[("a.c", "x"), ("src/b.c", "x"), (".gitignore", "*.o\nbuild/\n"), ("src/.gitignore", "gen.c\n")], 1000);
        for f in ["new.txt", "x.o", "build/y", "build/z.c", "src/gen.c", "src/c.c", "src/d/e.o", "other/f", "other/g/h"] {
            fs::create_dir_all(repo.join(f).parent().unwrap()).unwrap();
            fs::write(repo.join(f), "u").unwrap();
        }
        let checkout = Checkout::discover(&fs::canonicalize(repo).unwrap()).unwrap().unwrap();
        let beneath = Beneath::open(&fs::canonicalize(repo).unwrap()).unwrap();
        let tracked = checkout.tracked(&beneath).unwrap();
        let by_git = git(repo, &["ls-files", "--others", "--exclude-standard"]);
        assert_eq!(checkout.count_untracked(&beneath, &tracked, &[]).unwrap(), by_git.lines().count(), "{by_git}");
        assert_eq!(checkout.count_untracked(&beneath, &tracked, &[PathBuf::from("other")]).unwrap(), 2, "new.txt, src/c.c");
    }

    #[test]
    fn a_directory_inside_this_checkout_is_a_git_source() {
        let hello = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/hello");
        if !Path::new(env!("CARGO_MANIFEST_DIR")).join(".git").exists() {
            eprintln!("skipped: not built from a git checkout");
            return;
        }
        let t = SourceTree::scan(&hello, &[]).unwrap();
        assert_eq!(t.kind, SourceKind::Git);
        let files: Vec<String> = t
            .entries
            .iter()
            .filter(|e| !matches!(e, crate::rebuild::source::Entry::Dir(_)))
            .map(|e| e.path().display().to_string())
            .collect();
        let by_git: Vec<String> = git(&hello, &["-c", "core.fsmonitor=false", "ls-files"])
            .lines()
            .filter(|f| hello.join(f).symlink_metadata().is_ok())
            .map(String::from)
            .collect();
        assert_eq!(files, by_git);
        assert_eq!(t.last_commit_time, git_last_commit_time(&hello));
    }
}
