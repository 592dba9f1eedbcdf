//! Helpers shared by the integration tests: the binary, isolated stores, and
//! the builder image the VM tests boot.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A `reprovm` command with an isolated cache (store) and TMPDIR.
pub fn reprovm(env: &TestEnv) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_reprovm"));
    cmd.env("XDG_CACHE_HOME", &env.cache).env("TMPDIR", &env.tmp).env_remove("REPROVM_IMAGE");
    cmd
}

/// Private directories for one test.
pub struct TestEnv {
    pub root: tempfile::TempDir,
    pub cache: PathBuf,
    pub tmp: PathBuf,
}

impl TestEnv {
    pub fn new() -> TestEnv {
        let root = tempfile::tempdir().unwrap();
        let cache = root.path().join("cache");
        let tmp = root.path().join("tmp");
        std::fs::create_dir_all(&cache).unwrap();
        std::fs::create_dir_all(&tmp).unwrap();
        TestEnv { root, cache, tmp }
    }

    pub fn path(&self) -> &Path {
        self.root.path()
    }

    /// Files left in this test's TMPDIR.
    pub fn leftovers(&self) -> Vec<PathBuf> {
        walk(&self.tmp)
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        out.push(entry.path());
        if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            out.extend(walk(&entry.path()));
        }
    }
    out
}

/// stdout, stderr and exit code as text, for assertions.
pub fn text(out: &Output) -> (String, String, i32) {
    (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned(), out.status.code().unwrap_or(-1))
}

/// The builder image the VM tests boot: `REPROVM_TEST_IMAGE` (a pin in the
/// user's store, set by scripts/test). VM tests are `#[ignore]`d by default
/// and run by scripts/test with --include-ignored; without an image they
/// panic with the reason, so a VM test is never counted as passed unrun.
pub fn test_image() -> (String, PathBuf) {
    let pin = std::env::var("REPROVM_TEST_IMAGE")
        .unwrap_or_else(|_| panic!("VM test needs REPROVM_TEST_IMAGE (a builder image pin in the store); run it through scripts/test"));
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache"));
    (pin, cache)
}

/// A `reprovm` command that sees the real store (for the test image) but
/// keeps its per-run files in `tmp`.
pub fn reprovm_vm(tmp: &Path) -> Command {
    let (pin, cache) = test_image();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_reprovm"));
    cmd.env("XDG_CACHE_HOME", cache).env("TMPDIR", tmp).env("REPROVM_IMAGE", pin).env_remove("REPROVM_QEMU");
    cmd
}

/// QEMU processes whose command line mentions `needle`.
pub fn qemu_processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains("qemu-system") && cmdline.contains(needle) {
                found.push(cmdline);
            }
        }
    }
    found
}

/// Fails unless no QEMU of this test runs and its TMPDIR is empty.
pub fn assert_nothing_left(env: &TestEnv, what: &str) {
    let tmp = env.tmp.display().to_string();
    assert!(qemu_processes_mentioning(&tmp).is_empty(), "{what}: QEMU still running: {:?}", qemu_processes_mentioning(&tmp));
    assert!(env.leftovers().is_empty(), "{what}: left behind in TMPDIR: {:?}", env.leftovers());
}

/// A spawned reprovm that cannot outlive its test: dropped while it still
/// runs (the test failed or panicked), it is killed and reaped, and its QEMU
/// dies with it (PDEATHSIG). Waits have a limit.
pub struct Spawned(Child);

impl Spawned {
    /// Spawns `cmd`.
    pub fn new(cmd: &mut Command) -> Spawned {
        Spawned(cmd.spawn().unwrap())
    }

    /// Its exit status; fails the test (and the drop kills it) when it is
    /// still running after `limit`.
    pub fn wait_within(&mut self, limit: Duration) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                return status;
            }
            assert!(start.elapsed() < limit, "reprovm still running after {limit:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl std::ops::Deref for Spawned {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Spawned {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Spawns `cmd` with stdout discarded and its stderr lines sent to the
/// returned channel.
pub fn spawn_with_stderr_lines(cmd: &mut Command) -> (Spawned, mpsc::Receiver<String>) {
    let mut child = Spawned::new(cmd.stdout(Stdio::null()).stderr(Stdio::piped()));
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    (child, rx)
}

/// Waits for a stderr line containing `needle`; returns the lines seen.
pub fn wait_for_line(rx: &mpsc::Receiver<String>, needle: &str, limit: Duration) -> Vec<String> {
    let start = Instant::now();
    let mut seen = Vec::new();
    while start.elapsed() < limit {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(100)) {
            let hit = line.contains(needle);
            seen.push(line);
            if hit {
                return seen;
            }
        }
    }
    panic!("no {needle:?} within {limit:?}; stderr so far: {seen:#?}");
}

/// Spawns `cmd`, a `reprovm build` (or `verify`) given `--progress json`:
/// each line of its stdout, parsed, goes to the returned channel (a line
/// that is not JSON as a `Value::String`, which [`wait_for_event`] rejects),
/// and its whole stderr is what the returned thread ends with.
pub fn spawn_with_events(cmd: &mut Command) -> (Spawned, mpsc::Receiver<serde_json::Value>, std::thread::JoinHandle<String>) {
    let mut child = Spawned::new(cmd.stdout(Stdio::piped()).stderr(Stdio::piped()));
    let (stdout, mut stderr) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(serde_json::from_str(&line).unwrap_or(serde_json::Value::String(line)));
        }
    });
    let stderr = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut text);
        text
    });
    (child, rx, stderr)
}

/// Waits for the `kind` event (`stage-begin`, `stage-end`) of `stage`
/// (`source`, `boot`, `build`, `fetch`); returns the events seen. Fails on
/// a stdout line that is not a JSON object with an `event`, on a result or
/// error event first, and past `limit`.
pub fn wait_for_event(rx: &mpsc::Receiver<serde_json::Value>, stage: &str, kind: &str, limit: Duration) -> Vec<serde_json::Value> {
    let start = Instant::now();
    let mut seen = Vec::new();
    while start.elapsed() < limit {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(event) => {
                let what = event["event"].as_str().unwrap_or_else(|| panic!("not an event on stdout: {event}")).to_string();
                let hit = what == kind && event["stage"] == stage;
                seen.push(event);
                if hit {
                    return seen;
                }
                assert!(what != "result" && what != "error", "the build ended before {kind} {stage}: {seen:#?}");
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => panic!("stdout closed before {kind} {stage}: {seen:#?}"),
        }
    }
    panic!("no {kind} {stage} within {limit:?}; events so far: {seen:#?}");
}

/// Sends `sig` to `child`.
pub fn signal(child: &Child, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), sig).unwrap();
}

/// A tiny bundle (`tiny.img` in `dir`) with 100 kB stand-ins for the kernel,
/// initrd and root filesystem: enough for the store, never booted.
pub fn small_bundle(dir: &Path) -> PathBuf {
    use reprovm::image::bundle::{write_bundle, ImageMetadata, FORMAT_VERSION};
    let metadata = ImageMetadata {
        format: FORMAT_VERSION,
        name: "tiny".into(),
        distribution: "debian bookworm".into(),
        architecture: "amd64".into(),
        mirror: "http://deb.debian.org/debian".into(),
        source_date_epoch: 1_732_492_800,
        recipe_sha256: "0".repeat(64),
        kernel_release: "6.1.0-test".into(),
        rootfs_label: "builder-root".into(),
        packages: vec!["base-files=12.4".into()],
    };
    let parts: Vec<PathBuf> = ["k", "i", "r"]
        .iter()
        .map(|n| {
            let p = dir.join(n);
            std::fs::write(&p, vec![n.as_bytes()[0]; 100_000]).unwrap();
            p
        })
        .collect();
    let out = dir.join("tiny.img");
    write_bundle(std::fs::File::create(&out).unwrap(), &metadata, &parts[0], &parts[1], &parts[2]).unwrap();
    out
}
