//! Hostile source trees. Each test first shows that the attack is real
//! (the git program falls for it, or the file layout would leak) and then
//! that scanning and archiving the tree leaves the host untouched.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use super::test_repo::{commit_all, git, git_command, repo_with};
use super::{SourceError, SourceKind, SourceTree};

/// A directory outside the source, with a script that creates `marker` when run.
struct Host {
    dir: tempfile::TempDir,
}

impl Host {
    fn new() -> Host {
        let host = Host { dir: tempfile::tempdir().unwrap() };
        let script = format!("#!/bin/sh\ntouch '{}'\nexec cat\n", host.marker().display());
        fs::write(host.script(), script).unwrap();
        fs::set_permissions(host.script(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        host
    }

    fn script(&self) -> PathBuf {
        self.dir.path().join("evil.sh")
    }

    fn marker(&self) -> PathBuf {
        self.dir.path().join("marker")
    }

    /// Whether the script ran since the last call.
    fn ran(&self) -> bool {
        fs::remove_file(self.marker()).is_ok()
    }
}

/// Runs git as a user would (the attack), ignoring its status.
fn user_runs_git(dir: &Path, args: &[&str]) {
    git_command(dir, args).output().unwrap();
}

/// Scans, hashes and writes the scratch archive of `dir` as a build would.
fn archive(dir: &Path) -> SourceTree {
    let tree = SourceTree::scan(dir, &[]).unwrap();
    tree.record(1_700_000_000).unwrap();
    let tar = tempfile::NamedTempFile::new().unwrap();
    tree.write_scratch_tar(tar.path(), 1_700_000_000, &[]).unwrap();
    tree
}

fn set(dir: &Path, key: &str, value: &Path) {
    git(dir, &["config", key, &value.display().to_string()]);
}

#[test]
fn a_signed_head_with_a_configured_gpg_program_runs_nothing() {
    let (host, src) = (Host::new(), tempfile::tempdir().unwrap());
    let repo = src.path();
    repo_with(repo, &[("a.txt", "a")], 1000);
    let tree = git(repo, &["rev-parse", "HEAD^{tree}"]);
    let signed = format!(
        "tree {}\nauthor t <t@example.org> 2000 +0000\ncommitter t <t@example.org> 2000 +0000\ngpgsig -----BEGIN PGP SIGNATURE-----\n \n iQEzBAABCAAdFiEE\n -----END PGP SIGNATURE-----\n\nsigned\n",
        tree.trim()
    );
    let commit_file = host.dir.path().join("commit");
    fs::write(&commit_file, signed).unwrap();
    let id = git(repo, &["hash-object", "-t", "commit", "-w", &commit_file.display().to_string()]);
    git(repo, &["update-ref", "refs/heads/main", id.trim()]);
    git(repo, &["config", "log.showSignature", "true"]);
    set(repo, "gpg.program", &host.script());

    user_runs_git(repo, &["log", "-1"]);
    assert!(host.ran(), "the attack is real: git log runs gpg.program");
    assert_eq!(archive(repo).last_commit_time, Some(2000), "the signed commit was read");
    assert!(!host.ran());
}

#[test]
fn a_configured_fsmonitor_or_clean_filter_runs_nothing() {
    let (host, src) = (Host::new(), tempfile::tempdir().unwrap());
    let repo = src.path();
    repo_with(repo, &[("a.txt", "a"), (".gitattributes", "*.txt filter=x\n")], 1000);
    set(repo, "core.fsmonitor", &host.script());
    user_runs_git(repo, &["status"]);
    assert!(host.ran(), "the attack is real: git status runs core.fsmonitor");
    git(repo, &["config", "--unset", "core.fsmonitor"]);
    set(repo, "filter.x.clean", &host.script());
    fs::write(repo.join("a.txt"), "modified").unwrap();
    user_runs_git(repo, &["diff"]);
    assert!(host.ran(), "the attack is real: git diff runs the clean filter");

    set(repo, "core.fsmonitor", &host.script());
    assert_eq!(archive(repo).kind, SourceKind::Git);
    assert!(!host.ran());
}

#[test]
fn a_submodule_with_hostile_configuration_is_listed_and_runs_nothing() {
    let (host, src) = (Host::new(), tempfile::tempdir().unwrap());
    let (lib, parent) = (src.path().join("lib"), src.path().join("parent"));
    repo_with(&lib, &[("a.txt", "a"), (".gitattributes", "*.txt filter=x\n"), ("deep/b.txt", "b")], 1000);
    repo_with(&parent, &[("p.txt", "p")], 1000);
    git(&parent, &["submodule", "add", "-q", &lib.display().to_string(), "sub"]);
    commit_all(&parent, 2000, "add sub");
    let by_git = git(&parent, &["ls-files", "--recurse-submodules"]);
    let sub = parent.join("sub");
    set(&sub, "core.fsmonitor", &host.script());
    user_runs_git(&parent, &["status"]);
    assert!(host.ran(), "the attack is real: git status runs the submodule's core.fsmonitor");
    set(&sub, "filter.x.clean", &host.script());
    fs::write(sub.join("a.txt"), "modified").unwrap();
    user_runs_git(&parent, &["diff", "--submodule=diff"]);
    assert!(host.ran(), "the attack is real: git diff runs the submodule's clean filter");

    let tree = archive(&parent);
    assert!(!host.ran());
    let files: Vec<String> =
        tree.entries.iter().filter(|e| !matches!(e, super::Entry::Dir(_))).map(|e| e.path().display().to_string()).collect();
    assert_eq!(files, by_git.lines().collect::<Vec<_>>());
}

/// A checkout tracking `conf/key` and `a.txt`, and a host directory with a secret `key`.
fn checkout_and_secret() -> (tempfile::TempDir, PathBuf, PathBuf, &'static str) {
    let dir = tempfile::tempdir().unwrap();
    let secret = "SECRET-c2VjcmV0-BYTES";
    let host = dir.path().join("host-ssh");
    fs::create_dir(&host).unwrap();
    fs::write(host.join("key"), secret).unwrap();
    let repo = dir.path().join("repo");
    repo_with(&repo, &[("a.txt", "a"), ("conf/key", "harmless")], 1000);
    (dir, repo, host, secret)
}

fn swap_for_link(repo: &Path, host: &Path) {
    fs::remove_dir_all(repo.join("conf")).unwrap();
    symlink(host, repo.join("conf")).unwrap();
}

fn assert_names_conf(e: SourceError) {
    assert!(matches!(e, SourceError::Symlinked { .. }), "{e:?}");
    let e = e.to_string();
    assert!(e.contains("\"conf/key\"") && e.contains("\"conf\" is a symbolic link"), "{e}");
}

#[test]
fn a_tracked_path_under_a_symlinked_directory_is_refused_and_nothing_leaks() {
    let (dir, repo, host, secret) = checkout_and_secret();
    swap_for_link(&repo, &host);
    assert_eq!(fs::read_to_string(repo.join("conf/key")).unwrap(), secret, "the attack is real: joining paths reads the host file");
    assert_names_conf(SourceTree::scan(&repo, &[]).unwrap_err());

    // The same swap between the scan and the reads.
    fs::remove_file(repo.join("conf")).unwrap();
    fs::create_dir(repo.join("conf")).unwrap();
    fs::write(repo.join("conf/key"), "harmless").unwrap();
    let tree = SourceTree::scan(&repo, &[]).unwrap();
    swap_for_link(&repo, &host);
    assert_names_conf(tree.record(1_700_000_000).unwrap_err());
    let tar = dir.path().join("scratch.tar");
    assert_names_conf(tree.write_scratch_tar(&tar, 1_700_000_000, &[]).unwrap_err());
    let written = fs::read(&tar).unwrap();
    assert!(!written.windows(secret.len()).any(|w| w == secret.as_bytes()));
}

#[test]
fn a_symlinked_directory_in_a_plain_tree_stays_a_link() {
    let (dir, _, host, secret) = checkout_and_secret();
    let plain = dir.path().join("plain");
    fs::create_dir(&plain).unwrap();
    symlink(&host, plain.join("conf")).unwrap();
    let tree = SourceTree::scan(&plain, &[]).unwrap();
    let tar = dir.path().join("scratch.tar");
    tree.write_scratch_tar(&tar, 1_700_000_000, &[]).unwrap();
    assert_eq!(tree.record(1_700_000_000).unwrap().files, 0);
    let written = fs::read(&tar).unwrap();
    assert!(!written.windows(secret.len()).any(|w| w == secret.as_bytes()));
}

#[test]
fn a_repository_owned_by_another_user_above_the_source_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    repo_with(&repo, &[("tracked.txt", "t")], 1000);
    let plain = repo.join("release");
    fs::create_dir(&plain).unwrap();
    fs::write(plain.join("main.c"), "int main(){}").unwrap();
    let chown = std::process::Command::new("chown").args(["-R", "65534:65534"]).arg(repo.join(".git")).status().unwrap();
    if !chown.success() || !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root to give .git to another user");
        return;
    }
    let by_git = git_command(&plain, &["status"]).output().unwrap();
    assert!(String::from_utf8_lossy(&by_git.stderr).contains("dubious ownership"), "git refuses it too");
    let e = SourceTree::scan(&plain, &[]).unwrap_err();
    assert!(matches!(e, SourceError::NotOwned { owner: 65534, user: 0, .. }), "{e:?}");
    let e = e.to_string();
    assert!(e.contains(".git") && e.contains("uid 65534") && e.contains("build a copy"), "{e}");
}
