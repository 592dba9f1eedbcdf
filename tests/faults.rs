//! The fault and abuse suite: faults injected into real builds (QEMU killed,
//! guest panic, SSH dropped, timeouts, full disks, signals at each stage),
//! hostile builds (escaping artifacts, links, FIFOs, floods of files),
//! concurrency, and the permissions of what a run leaves on the host while
//! it runs; one test per fault, named for the fault and how it must end.
//! Every case must end with the right exit code, a message that says what
//! happened, and nothing left behind. Tests that interrupt a build at a
//! stage wait for that stage's event on the `--progress json` stream. VM
//! tests, `#[ignore]`d and run by scripts/test.

mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use common::{
    assert_nothing_left, qemu_processes_mentioning, reprovm, reprovm_vm, signal, spawn_with_events, text, wait_for_event, Spawned, TestEnv,
};
use nix::sys::signal::Signal::{self, SIGINT, SIGTERM};

/// A plain source tree `name` whose reprovm.toml is a small machine (plus
/// `machine` lines) and `build` (the `[build]` section).
fn tree(env: &TestEnv, name: &str, machine: &str, build: &str) -> PathBuf {
    let src = env.path().join(name);
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("reprovm.toml"), format!("[machine]\ncpus = 1\nmemory_mib = 512\n{machine}{build}")).unwrap();
    src
}

/// Runs `reprovm build SRC --out OUT` to the end.
fn build(env: &TestEnv, src: &Path, out: &Path, extra: &[&str]) -> (String, String, i32) {
    text(&reprovm_vm(&env.tmp).arg("build").arg(src).arg("--out").arg(out).args(extra).output().unwrap())
}

/// Staging or old output directories left beside `out`.
fn stray_outputs(out: &Path) -> Vec<String> {
    fs::read_dir(out.parent().unwrap())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".reprovm-"))
        .collect()
}

/// `reprovm build --progress json`: its events and (once it ended) its stderr.
fn spawn_build(env: &TestEnv, src: &Path, out: &Path) -> (Spawned, mpsc::Receiver<serde_json::Value>, JoinHandle<String>) {
    spawn_with_events(reprovm_vm(&env.tmp).arg("build").arg(src).arg("--out").arg(out).args(["--progress", "json"]))
}

/// Once the build ended: its stderr, and the events after those already
/// waited for, the last of which must be the error event with `code`.
fn ended_with(events: &mpsc::Receiver<serde_json::Value>, stderr: JoinHandle<String>, code: i32) -> (String, Vec<serde_json::Value>) {
    let err = stderr.join().unwrap();
    let rest: Vec<serde_json::Value> = events.iter().collect();
    let last = rest.last().unwrap_or_else(|| panic!("no error event: {err}"));
    assert_eq!((last["event"].as_str(), last["exit"].as_i64()), (Some("error"), Some(code as i64)), "{rest:#?}\n{err}");
    (err, rest)
}

/// Checks what a running build exposes on the host: run directories 0700,
/// the QMP socket inside one, no key file left on disk, the SSH forward on
/// 127.0.0.1 only, the image store read-only.
fn check_permissions_while_running(env: &TestEnv) {
    let dirs: Vec<PathBuf> = fs::read_dir(&env.tmp).unwrap().flatten().map(|e| e.path()).collect();
    assert!(!dirs.is_empty());
    for dir in &dirs {
        let mode = fs::metadata(dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "{} is {mode:o}", dir.display());
    }
    let run_dir = dirs.iter().find(|d| d.file_name().unwrap().to_string_lossy().starts_with("reprovm-run-")).expect("a run directory");
    assert!(run_dir.join("qmp.sock").exists(), "QMP socket inside the private run directory");
    for key in ["ssh_host_ed25519_key", "authorized_keys"] {
        assert!(!run_dir.join(key).exists(), "{key} must leave the disk once QEMU read it");
    }
    let cmdline = qemu_processes_mentioning(&env.tmp.display().to_string()).join(" ");
    let fwd = cmdline.split("hostfwd=").nth(1).expect("an SSH forward");
    assert!(fwd.starts_with("tcp:127.0.0.1:"), "the forward must be bound to 127.0.0.1: {fwd}");
    assert!(cmdline.contains("restrict=on"), "the guest must not reach the host or the outside");
    let (pin, cache) = common::test_image();
    let entry = cache.join("reprovm/images").join(pin.trim_start_matches("sha256:"));
    let bundle = fs::metadata(entry.join("bundle.img")).unwrap();
    assert_eq!(bundle.mode() & 0o222, 0, "store entries are read-only");
}

/// A build that runs past its limit is stopped: exit 5 with the log's tail,
/// no SHA256SUMS.
#[test]
#[ignore = "boots VMs: run through scripts/test"]
fn a_build_past_its_limit_exits_5_with_the_logs_tail() {
    let env = TestEnv::new();
    let out = env.path().join("out");
    let src = tree(&env, "timeout", "", "[build]\ncommand = \"echo started; sleep 600\"\nartifacts = [\"x\"]\ntimeout_secs = 3\n");
    let (_, err, code) = build(&env, &src, &out, &[]);
    assert_eq!(code, 5, "{err}");
    assert!(err.contains("ran past its limit of 3 s") && err.contains("started"), "{err}");
    assert!(!out.join("SHA256SUMS").exists());
    assert_nothing_left(&env, "timeout");
}

/// The guest kernel panics mid-build: exit 4 with the panic from the console.
#[test]
#[ignore = "boots VMs: run through scripts/test"]
fn a_guest_kernel_panic_mid_build_exits_4_with_the_panic() {
    let env = TestEnv::new();
    let out = env.path().join("out");
    let src =
        tree(&env, "panic", "", "[build]\ncommand = \"sleep 600\"\nartifacts = [\"x\"]\nprovision = [\"echo c > /proc/sysrq-trigger\"]\n");
    let (_, err, code) = build(&env, &src, &out, &[]);
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("panicked") && err.contains("Kernel panic"), "{err}");
    assert_nothing_left(&env, "panic");
}

/// sshd dies mid-build: exit 4, SSH named (with the console's tail).
#[test]
#[ignore = "boots VMs: run through scripts/test"]
fn sshd_killed_mid_build_exits_4_naming_ssh() {
    let env = TestEnv::new();
    let out = env.path().join("out");
    let src = tree(
        &env,
        "sshd",
        "", "[build]\ncommand = \"sleep 600\"\nartifacts = [\"x\"]\nprovision = [\"setsid sh -c 'sleep 4; pkill -x sshd' </dev/null >/dev/null 2>&1 &\"]\n",
    );
    let (_, err, code) = build(&env, &src, &out, &[]);
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("SSH"), "{err}");
    assert_nothing_left(&env, "sshd killed");
}

/// The scratch disk fills up: the build fails (exit 5) and says why.
#[test]
#[ignore = "boots VMs: run through scripts/test"]
fn a_full_scratch_disk_fails_the_build_with_exit_5_and_no_space_left() {
    let env = TestEnv::new();
    let out = env.path().join("out");
    let src = tree(&env, "full", "scratch_mib = 96\n", "[build]\ncommand = \"head -c 200M /dev/zero > fill\"\nartifacts = [\"fill\"]\n");
    let (_, err, code) = build(&env, &src, &out, &[]);
    assert_eq!(code, 5, "{err}");
    assert!(err.contains("No space left on device"), "{err}");
    assert_nothing_left(&env, "disk full");
}

/// The guest never boots in time: the boot watchdog, exit 4.
#[test]
#[ignore = "boots VMs: run through scripts/test"]
fn a_guest_that_does_not_boot_in_time_exits_4() {
    let env = TestEnv::new();
    let out = env.path().join("out");
    let src = tree(&env, "slow", "", "[build]\ncommand = \"true\"\nartifacts = [\"x\"]\n");
    let (_, err, code) = build(&env, &src, &out, &["--boot-timeout", "1"]);
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("did not boot") || err.contains("timed out"), "{err}");
    assert_nothing_left(&env, "boot timeout");
}

/// The output directory cannot be written: exit 2 before anything boots.
#[test]
#[ignore = "needs the builder image: run through scripts/test"]
fn an_unwritable_output_directory_exits_2_before_anything_boots() {
    let env = TestEnv::new();
    let src = tree(&env, "unwritable", "", "[build]\ncommand = \"true\"\nartifacts = [\"x\"]\n");
    let (_, err, code) = build(&env, &src, Path::new("/proc/reprovm-out"), &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("/proc"), "{err}");
    assert_nothing_left(&env, "unwritable output");
}

/// QEMU killed mid-build: exit 4 saying so. Meanwhile, what the running
/// build exposes on the host is checked (check_permissions_while_running).
#[test]
#[ignore = "boots VMs: run through scripts/test"]
fn qemu_killed_mid_build_exits_4_and_the_running_build_exposes_nothing() {
    let env = TestEnv::new();
    let out = env.path().join("out");
    let src = tree(&env, "kill", "", "[build]\ncommand = \"sleep 600\"\nartifacts = [\"x\"]\n");
    let (mut child, events, stderr) = spawn_build(&env, &src, &out);
    wait_for_event(&events, "build", "stage-begin", Duration::from_secs(300));
    check_permissions_while_running(&env);
    let qemu = qemu_processes_mentioning(&env.tmp.display().to_string());
    assert_eq!(qemu.len(), 1);
    Command::new("pkill").arg("-KILL").arg("-f").arg(env.tmp.join("reprovm-run-").display().to_string()).status().unwrap();
    let status = child.wait_within(Duration::from_secs(120));
    let (err, _) = ended_with(&events, stderr, 4);
    assert_eq!(status.code(), Some(4), "{err}");
    assert!(err.contains("QEMU exited"), "{err}");
    assert_nothing_left(&env, "QEMU killed");
}

/// Sends `sig` to a build `delay_ms` after the event `after` (stage, kind;
/// none: after its start), with an earlier output in its output directory:
/// exit 130, the error event, nothing left, the earlier output untouched.
fn signal_during(what: &str, after: Option<(&str, &str)>, delay_ms: u64, sig: Signal) {
    let env = TestEnv::new();
    let out = env.path().join("out");
    let src = tree(&env, "signals", "", "[build]\ncommand = \"head -c 300M /dev/zero > big; sleep 5\"\nartifacts = [\"big\"]\n");
    fs::create_dir_all(&out).unwrap();
    fs::write(out.join("SHA256SUMS"), "previous\n").unwrap();
    let (mut child, events, stderr) = spawn_build(&env, &src, &out);
    if let Some((stage, kind)) = after {
        wait_for_event(&events, stage, kind, Duration::from_secs(300));
    }
    std::thread::sleep(Duration::from_millis(delay_ms));
    signal(&child, sig);
    let status = child.wait_within(Duration::from_secs(120));
    let (err, _) = ended_with(&events, stderr, 130);
    assert_eq!(status.code(), Some(130), "{what}: {err}");
    assert!(err.contains("interrupted by"), "{what}: {err}");
    assert_nothing_left(&env, what);
    assert!(stray_outputs(&out).is_empty(), "{what}: {:?}", stray_outputs(&out));
    assert_eq!(fs::read_to_string(out.join("SHA256SUMS")).unwrap(), "previous\n", "{what}: the previous output must stay");
}

#[test]
#[ignore = "boots VMs: run through scripts/test"]
fn sigint_while_the_image_is_verified_exits_130_and_keeps_the_previous_output() {
    signal_during("image verification", None, 150, SIGINT);
}

#[test]
#[ignore = "boots VMs: run through scripts/test"]
fn sigterm_during_the_boot_exits_130_and_keeps_the_previous_output() {
    signal_during("boot", Some(("source", "stage-end")), 300, SIGTERM);
}

#[test]
#[ignore = "boots VMs: run through scripts/test"]
fn sigint_during_the_build_exits_130_and_keeps_the_previous_output() {
    signal_during("build", Some(("build", "stage-begin")), 1000, SIGINT);
}

#[test]
#[ignore = "boots VMs: run through scripts/test"]
fn sigterm_while_the_artifacts_are_fetched_exits_130_and_keeps_the_previous_output() {
    signal_during("artifact download", Some(("build", "stage-end")), 300, SIGTERM);
}

/// SIGINT while the source is archived onto the scratch disk (a 1 GiB
/// sparse file keeps that stage busy for seconds): exit 130, nothing left.
#[test]
#[ignore = "boots VMs: run through scripts/test"]
fn sigint_while_the_source_is_archived_exits_130_and_leaves_nothing() {
    let env = TestEnv::new();
    let out = env.path().join("out");
    let big_src = tree(&env, "big-source", "", "[build]\ncommand = \"true\"\nartifacts = [\"x\"]\n");
    fs::File::create(big_src.join("zeros.bin")).unwrap().set_len(1 << 30).unwrap();
    let (mut child, events, stderr) = spawn_build(&env, &big_src, &out);
    // The source is archived first thing (the image is hashed meanwhile,
    // on its own thread), and for about two seconds: half a second in.
    std::thread::sleep(Duration::from_millis(500));
    signal(&child, SIGINT);
    let status = child.wait_within(Duration::from_secs(120));
    let (err, events) = ended_with(&events, stderr, 130);
    assert_eq!(status.code(), Some(130), "source upload: {err}");
    let ended = |stage: &str| events.iter().any(|e| e["event"] == "stage-end" && e["stage"] == stage);
    assert!(!ended("source"), "the signal came too late to test the source stage: {events:#?}");
    assert!(!ended("boot"), "{events:#?}");
    assert_nothing_left(&env, "source upload");
    assert!(stray_outputs(&out).is_empty());
}

/// Links out of the build directory, devices and FIFOs, hard links to
/// files outside it: refused (exit 5), nothing written on the host.
#[test]
#[ignore = "boots VMs: run through scripts/test"]
fn links_devices_and_fifos_as_artifacts_are_refused_with_exit_5() {
    let env = TestEnv::new();
    let out = env.path().join("out");
    let src = tree(
        &env,
        "links",
        "", "[build]\ncommand = \"ln -s /etc/passwd passwd && ln -s / root && mkfifo fifo && ln /etc/hostname hard 2>/dev/null || cp /etc/hostname hard\"\n\
         artifacts = [\"passwd\", \"root/etc/shadow\", \"fifo\", \"null\"]\nprovision = [\"mknod null c 1 3\"]\n",
    );
    let (_, err, code) = build(&env, &src, &out, &[]);
    assert_eq!(code, 5, "{err}");
    for refused in ["\"passwd\" refused", "\"root/etc/shadow\" refused", "\"fifo\" refused", "\"null\" refused"] {
        assert!(err.contains(refused), "{refused}: {err}");
    }
    assert!(!out.join("SHA256SUMS").exists() && !out.join("passwd").exists());
    assert_nothing_left(&env, "links");
}

/// Globs that would leave the build directory are refused with the recipe
/// (exit 2, naming the field and the glob) and never reach a VM.
#[test]
fn artifact_globs_leaving_the_build_directory_exit_2_before_any_boot() {
    let env = TestEnv::new();
    let src = tree(&env, "globs", "", "");
    for glob in ["../../etc/passwd", "/etc/passwd", "a/../../b"] {
        fs::write(src.join("reprovm.toml"), format!("[build]\ncommand = \"true\"\nartifacts = [\"{glob}\"]\n")).unwrap();
        let (_, err, code) = text(&reprovm(&env).arg("build").arg(&src).arg("--out").arg(env.path().join("out")).output().unwrap());
        assert_eq!(code, 2, "{glob}: {err}");
        assert!(err.contains("build.artifacts") && err.contains(glob), "{err}");
    }
    assert_nothing_left(&env, "globs");
}

/// A flood of 200000 tiny files comes back whole.
#[test]
#[ignore = "boots VMs: run through scripts/test"]
fn two_hundred_thousand_tiny_artifacts_come_back_whole() {
    let env = TestEnv::new();
    let out = env.path().join("out");
    let src =
        tree(&env, "flood", "", "[build]\ncommand = \"mkdir many && cd many && seq -w 1 200000 | xargs touch\"\nartifacts = [\"many\"]\n");
    let (_, err, code) = build(&env, &src, &out, &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(fs::read_to_string(out.join("SHA256SUMS")).unwrap().lines().count(), 200000);
    assert_nothing_left(&env, "flood");
}

/// An artifact larger than the output directory's free space (an 8 MiB
/// tmpfs; mounting it needs root): a clear error, no partial output,
/// nothing left.
#[test]
#[ignore = "boots VMs: run through scripts/test"]
fn an_artifact_larger_than_the_output_directorys_free_space_fails_and_leaves_nothing() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root to mount a small tmpfs");
        return;
    }
    let env = TestEnv::new();
    let small = env.path().join("small");
    fs::create_dir(&small).unwrap();
    let mounted = Command::new("mount").args(["-t", "tmpfs", "-o", "size=8m", "tmpfs"]).arg(&small).status().unwrap();
    assert!(mounted.success());
    let src = tree(&env, "big", "", "[build]\ncommand = \"head -c 32M /dev/zero > big\"\nartifacts = [\"big\"]\n");
    let (_, err, code) = build(&env, &src, &small.join("out"), &[]);
    let _ = Command::new("umount").arg(&small).status();
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("No space left on device"), "{err}");
    assert_nothing_left(&env, "output directory full");
}

#[test]
#[ignore = "boots VMs: run through scripts/test"]
fn four_concurrent_builds_of_hello_agree() {
    let env = TestEnv::new();
    let hello = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/hello");
    let children: Vec<(PathBuf, std::process::Child)> = (0..4)
        .map(|i| {
            let out = env.path().join(format!("out{i}"));
            let child = reprovm_vm(&env.tmp)
                .arg("build")
                .arg(&hello)
                .arg("--out")
                .arg(&out)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            (out, child)
        })
        .collect();
    let mut sums = Vec::new();
    for (out, child) in children {
        let (_, err, code) = text(&child.wait_with_output().unwrap());
        assert_eq!(code, 0, "{err}");
        sums.push(fs::read_to_string(out.join("SHA256SUMS")).unwrap());
    }
    assert!(sums.windows(2).all(|w| w[0] == w[1]), "{sums:#?}");
    assert_nothing_left(&env, "concurrent builds");
    eprintln!("concurrency: 4 concurrent builds of examples/hello, identical SHA256SUMS");
}
