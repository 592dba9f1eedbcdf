//! Test helpers: small repositories made with the real git program, which
//! the tests also use to show what git itself would do.

use std::fs;
use std::path::Path;
use std::process::Command;

/// Runs git in `dir` with no global or system configuration; panics on failure.
pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = git_command(dir, args).output().unwrap();
    assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// git in `dir` with no global or system configuration and a fixed identity.
pub fn git_command(dir: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new("git");
    cmd.current_dir(dir)
        .args(["-c", "user.name=t", "-c", "user.email=t@example.org", "-c", "protocol.file.allow=always", "-c", "init.defaultBranch=main"])
        .args(args)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env_remove("GIT_DIR")
        .env_remove("GIT_WORK_TREE")
        .env_remove("GIT_INDEX_FILE");
    cmd
}

/// Commits everything in `dir` with author and committer time `time`.
pub fn commit_all(dir: &Path, time: i64, message: &str) {
    git(dir, &["add", "-A"]);
    let date = format!("@{time} +0000");
    let out = git_command(dir, &["commit", "-q", "--allow-empty", "-m", message])
        .env("GIT_AUTHOR_DATE", &date)
        .env("GIT_COMMITTER_DATE", &date)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// A new repository at `dir` holding `files` (path, contents), committed at `time`.
pub fn repo_with(dir: &Path, files: &[(&str, &str)], time: i64) {
    fs::create_dir_all(dir).unwrap();
    git(dir, &["init", "-q"]);
    for (path, contents) in files {
        let path = dir.join(path);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, contents).unwrap();
    }
    commit_all(dir, time, "initial");
}

/// What `git log -1 --format=%ct -- .` says in `dir`.
pub fn git_last_commit_time(dir: &Path) -> Option<i64> {
    git(dir, &["log", "-1", "--format=%ct", "--", "."]).trim().parse().ok()
}
