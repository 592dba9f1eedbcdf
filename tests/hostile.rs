//! The hostile-input suite: each test is an attack by something reprovm does
//! not trust — the source tree and its `.git`, the recipe, the guest and
//! what it sends back — and proves the host untouched: no program of theirs
//! ran, no host file was read, no output of reprovm's was forged, no host
//! service was reached, no raw control character reached the terminal, and
//! the host paid a bounded price. Tests that boot a VM are `#[ignore]`d and
//! run by scripts/test; the others need no image.

mod common;

use std::fs;
use std::io::Read;
use std::net::TcpListener;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::{assert_nothing_left, reprovm, reprovm_vm, text, TestEnv};

/// A plain source tree whose recipe is a small machine plus `build` (the
/// `[build]` section and anything after it).
fn tree(env: &TestEnv, name: &str, build: &str) -> PathBuf {
    let src = env.path().join(name);
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("reprovm.toml"), format!("[machine]\ncpus = 1\nmemory_mib = 512\n{build}")).unwrap();
    src
}

/// `reprovm build SRC --out OUT EXTRA…` (VM) as raw bytes and exit code.
fn build_raw(env: &TestEnv, src: &Path, out: &Path, extra: &[&str]) -> (Vec<u8>, Vec<u8>, i32) {
    let o = reprovm_vm(&env.tmp).arg("build").arg(src).arg("--out").arg(out).args(extra).output().unwrap();
    (o.stdout, o.stderr, o.status.code().unwrap_or(-1))
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

/// git with no global or system configuration.
fn git(dir: &Path, args: &[&str]) {
    let out = Command::new("git")
        .current_dir(dir)
        .args(["-c", "user.name=t", "-c", "user.email=t@example.org", "-c", "init.defaultBranch=main"])
        .args(args)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .output()
        .unwrap();
    assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A TCP listener on the host's 127.0.0.1 that counts the connections it gets.
fn host_listener() -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            counter.fetch_add(1, Ordering::SeqCst);
            drop(stream);
        }
    });
    (port, hits)
}

/// A checkout whose own configuration names host programs in every place
/// git would run one (signature display with a signed HEAD, fsmonitor, a
/// clean filter, a pager, an external diff): reprovm builds it and none runs.
#[test]
#[ignore = "boots a VM: run through scripts/test"]
fn a_hostile_checkout_builds_and_runs_nothing_on_the_host() {
    let env = TestEnv::new();
    let marker = env.path().join("pwned");
    let evil = env.path().join("evil.sh");
    fs::write(&evil, format!("#!/bin/sh\necho \"$0 $*\" >> '{}'\ncat\n", marker.display())).unwrap();
    fs::set_permissions(&evil, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let src = tree(&env, "checkout", "[build]\ncommand = \"cat data.txt > artifact.txt\"\nartifacts = [\"artifact.txt\"]\n");
    fs::write(src.join("data.txt"), "release contents\n").unwrap();
    fs::write(src.join(".gitattributes"), "*.txt filter=evil diff=evil\n").unwrap();
    git(&src, &["init", "-q"]);
    git(&src, &["add", "-A"]);
    git(&src, &["commit", "-qm", "release"]);
    // HEAD becomes a commit carrying a signature, so that showing the log
    // verifies it with gpg.program.
    let head =
        String::from_utf8(Command::new("git").current_dir(&src).args(["cat-file", "commit", "HEAD"]).output().unwrap().stdout).unwrap();
    let (headers, message) = head.split_once("\n\n").unwrap();
    let signed = format!("{headers}\ngpgsig -----BEGIN PGP SIGNATURE-----\n \n =abcd\n -----END PGP SIGNATURE-----\n\n{message}");
    fs::write(env.path().join("signed"), signed).unwrap();
    let id =
        Command::new("git").current_dir(&src).args(["hash-object", "-t", "commit", "-w"]).arg(env.path().join("signed")).output().unwrap();
    git(&src, &["update-ref", "HEAD", String::from_utf8(id.stdout).unwrap().trim()]);
    let e = evil.display().to_string();
    for (key, value) in [
        ("log.showSignature", "true"),
        ("gpg.program", &e),
        ("core.fsmonitor", &e),
        ("filter.evil.clean", &e),
        ("filter.evil.smudge", &e),
        ("filter.evil.required", "true"),
        ("diff.evil.textconv", &e),
        ("diff.external", &e),
        ("core.pager", &e),
        ("core.hooksPath", env.path().to_str().unwrap()),
    ] {
        git(&src, &["config", key, value]);
    }
    // The attack is real: git itself runs the checkout's program.
    let _ = Command::new("git").current_dir(&src).args(["log", "-1"]).env("GIT_CONFIG_NOSYSTEM", "1").output().unwrap();
    assert!(marker.exists(), "the attack must work against git itself");
    fs::remove_file(&marker).unwrap();

    let out = env.path().join("out");
    let (stdout, err, code) = text(&reprovm_vm(&env.tmp).arg("build").arg(&src).arg("--out").arg(&out).output().unwrap());
    assert_eq!(code, 0, "{err}");
    assert!(!marker.exists(), "reprovm ran the checkout's program: {}", fs::read_to_string(&marker).unwrap_or_default());
    assert!(stdout.contains("  artifact.txt"), "{stdout}");
    let result: serde_json::Value = serde_json::from_str(&fs::read_to_string(out.join("result.json")).unwrap()).unwrap();
    assert_eq!(result["inputs"]["source"]["kind"], "git");
    assert_eq!(fs::read_to_string(out.join("artifact.txt")).unwrap(), "release contents\n");
    assert_nothing_left(&env, "");
    println!("hostile checkout: 10 program-running settings, none ran; the build succeeded");
}

/// A tracked directory replaced by a link to a host directory holding a
/// secret: refused before boot, naming the path; the secret goes nowhere.
#[test]
#[ignore = "verifies the builder image: run through scripts/test"]
fn a_symlinked_parent_directory_leaks_no_host_file() {
    let env = TestEnv::new();
    let secret_dir = env.path().join("home-ssh");
    fs::create_dir(&secret_dir).unwrap();
    fs::write(secret_dir.join("id_ed25519"), "HOST-PRIVATE-KEY-BYTES\n").unwrap();
    let src = tree(&env, "checkout", "[build]\ncommand = \"cat conf/id_ed25519 > a\"\nartifacts = [\"a\"]\n");
    fs::create_dir(src.join("conf")).unwrap();
    fs::write(src.join("conf/id_ed25519"), "harmless\n").unwrap();
    git(&src, &["init", "-q"]);
    git(&src, &["add", "-A"]);
    git(&src, &["commit", "-qm", "x"]);
    fs::remove_dir_all(src.join("conf")).unwrap();
    symlink(&secret_dir, src.join("conf")).unwrap();

    let out = env.path().join("out");
    let (_, err, code) = text(&reprovm_vm(&env.tmp).arg("build").arg(&src).arg("--out").arg(&out).output().unwrap());
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("conf"), "the error names the path: {err}");
    assert!(!err.contains("HOST-PRIVATE-KEY-BYTES"), "{err}");
    assert!(!out.exists(), "nothing written: {:?}", names_in(&out));
    assert_nothing_left(&env, "");
}

/// A build returning files named SHA256SUMS and result.json, beside a real
/// artifact: refused (exit 5), and --out holds only the logs, never the
/// forged files.
#[test]
#[ignore = "boots a VM: run through scripts/test"]
fn artifacts_cannot_pose_as_reprovms_own_files() {
    let env = TestEnv::new();
    let forged = "0000000000000000000000000000000000000000000000000000000000000000  hello";
    let src = tree(
        &env,
        "forger",
        &format!(
            "[build]\ncommand = \"echo real > hello && echo '{forged}' > SHA256SUMS && echo '{{}}' > result.json && echo fake > build.log\"\nartifacts = [\"hello\", \"SHA256SUMS\", \"result.json\", \"build.log\"]\n"
        ),
    );
    let out = env.path().join("out");
    let (stdout, err, code) = text(&reprovm_vm(&env.tmp).arg("build").arg(&src).arg("--out").arg(&out).output().unwrap());
    assert_eq!(code, 5, "{err}");
    assert!(stdout.is_empty(), "{stdout}");
    assert!(err.contains("reprovm writes this name itself"), "{err}");
    assert_eq!(names_in(&out), ["build.log", "serial.log"], "only the logs of a failed build");
    assert!(!fs::read_to_string(out.join("build.log")).unwrap().contains("fake"), "build.log is reprovm's own");
    assert_nothing_left(&env, "");
}

/// The recipe asks for NAT; without `--network nat` reprovm refuses before
/// boot and a service on the host's 127.0.0.1 sees nothing. With consent,
/// the same build does reach it (what docs/security.md says nat exposes).
#[test]
#[ignore = "boots a VM: run through scripts/test"]
fn nat_from_a_recipe_alone_reaches_nothing_on_the_host() {
    let env = TestEnv::new();
    let (port, hits) = host_listener();
    let src = tree(
        &env,
        "prober",
        &format!(
            "[build]\nnetwork = \"nat\"\ncommand = \"if bash -c 'exec 3<>/dev/tcp/10.0.2.2/{port}'; then echo reached; else echo unreachable; fi > probe.txt\"\nartifacts = [\"probe.txt\"]\n"
        ),
    );
    let out = env.path().join("out");
    let (_, err, code) = text(&reprovm_vm(&env.tmp).arg("build").arg(&src).arg("--out").arg(&out).output().unwrap());
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("build.network") && err.contains("--network nat") && err.contains("reprovm.toml"), "{err}");
    assert!(!out.exists());
    assert_eq!(hits.load(Ordering::SeqCst), 0);
    assert_nothing_left(&env, "refused");

    let (_, err, code) =
        text(&reprovm_vm(&env.tmp).arg("build").arg(&src).arg("--out").arg(&out).args(["--network", "nat"]).output().unwrap());
    assert_eq!(code, 0, "{err}");
    assert_eq!(fs::read_to_string(out.join("probe.txt")).unwrap().trim(), "reached", "nat exposes the host's loopback");
    assert!(hits.load(Ordering::SeqCst) >= 1);
    assert_nothing_left(&env, "granted");
}

/// Escape sequences everywhere a build can put them — its output (OSC 52
/// clipboard write, screen clear, fake verdict line), an artifact's name and
/// the recipe's own command — reach reprovm's stderr only escaped; the raw
/// bytes stay in build.log.
#[test]
#[ignore = "boots a VM: run through scripts/test"]
fn escape_sequences_from_the_build_never_reach_the_terminal() {
    let env = TestEnv::new();
    let src = tree(
        &env,
        "escaper",
        "[build]\ncommand = \"printf '\\\\033]52;c;cHduZWQ=\\\\007\\\\033[2J\\\\rall 2 artifacts are identical\\\\n'; touch \\\"$(printf 'name\\\\033[31m')\\\"; : '\\u001b]0;title\\u0007'\"\nartifacts = [\"name*\"]\n",
    );
    let out = env.path().join("out");
    let (stdout, stderr, code) = build_raw(&env, &src, &out, &[]);
    assert_eq!(code, 5, "{}", String::from_utf8_lossy(&stderr));
    for (what, bytes) in [("stdout", &stdout), ("stderr", &stderr)] {
        let raw: Vec<_> = bytes.iter().filter(|b| matches!(b, 0x1b | 0x07 | b'\r')).collect();
        assert!(raw.is_empty(), "{what} carries raw control bytes: {}", String::from_utf8_lossy(bytes));
    }
    let err = String::from_utf8_lossy(&stderr);
    assert!(err.contains("\\x1b]52;c;cHduZWQ=\\x07"), "the clipboard write is shown escaped: {err}");
    assert!(err.contains("name\\x1b[31m") && err.contains("control character"), "the artifact's name, escaped: {err}");
    assert!(err.contains("\\x1b]0;title\\x07"), "the recipe's command, escaped: {err}");
    let log = fs::read(out.join("build.log")).unwrap();
    assert!(log.windows(5).any(|w| w == b"\x1b]52;"), "build.log keeps the raw bytes");
    assert_nothing_left(&env, "");
}

/// A build printing a gigabyte, and a provision command flooding the serial
/// console: with --log-limit 1 each log stays near 2 MiB (its start and its
/// last MiB), and the terminal gets about 1 MiB.
#[test]
#[ignore = "boots a VM: run through scripts/test"]
fn a_gigabyte_of_output_costs_the_host_a_bounded_log() {
    let env = TestEnv::new();
    let src = tree(
        &env,
        "flood",
        "[build]\nprovision = [\"head -c 8M /dev/zero | tr '\\\\0' s > /dev/ttyS0\"]\ncommand = \"head -c 1G /dev/zero | tr '\\\\0' x; echo; echo the very end; echo ok > a\"\nartifacts = [\"a\"]\n",
    );
    let out = env.path().join("out");
    let (_, stderr, code) = build_raw(&env, &src, &out, &["--log-limit", "1"]);
    let err = String::from_utf8_lossy(&stderr);
    assert_eq!(code, 0, "{}", &err[err.len().saturating_sub(3000)..]);
    assert!(stderr.len() < 3 << 20, "stderr: {} bytes", stderr.len());
    assert!(err.contains("build.log capped at 1 MiB"), "the cap is reported");
    let size = |name: &str| fs::metadata(out.join(name)).unwrap().len();
    assert!(size("build.log") <= (2 << 20) + 200, "build.log: {} bytes", size("build.log"));
    assert!(size("serial.log") <= (2 << 20) + 200, "serial.log: {} bytes", size("serial.log"));
    let mut tail = String::new();
    fs::File::open(out.join("build.log")).unwrap().read_to_string(&mut tail).unwrap();
    assert!(tail.contains("bytes left out; the last 1048576 bytes follow") && tail.ends_with("the very end\n"), "the end is kept");
    let serial = fs::read(out.join("serial.log")).unwrap();
    assert!(serial.windows(11).any(|w| w == b"bytes left "), "serial.log says it was capped");
    assert_nothing_left(&env, "");
    println!(
        "1 GiB of build output and 8 MiB of console: build.log {} bytes, serial.log {} bytes, stderr {} bytes",
        size("build.log"),
        size("serial.log"),
        stderr.len()
    );
}

/// What a recipe alone may ask of the host is capped: a terabyte of disk,
/// 256 GiB of memory, 64 vCPUs or a week are refused before anything boots,
/// naming the file, the field, the value and the flag that allows it.
#[test]
fn a_recipe_asking_for_a_terabyte_is_refused_before_boot() {
    let env = TestEnv::new();
    for (field, value, flag) in [
        ("machine.scratch_mib", "1048576", "--scratch"),
        ("machine.memory_mib", "262144", "--memory"),
        ("machine.cpus", "64", "--cpus"),
        ("build.timeout_secs", "604800", "--timeout"),
    ] {
        let (section, key) = field.split_once('.').unwrap();
        let src = env.path().join(key);
        fs::create_dir_all(&src).unwrap();
        let recipe = if section == "machine" {
            format!("[machine]\n{key} = {value}\n[build]\ncommand = \"true\"\nartifacts = [\"a\"]\n")
        } else {
            format!("[build]\ncommand = \"true\"\nartifacts = [\"a\"]\n{key} = {value}\n")
        };
        fs::write(src.join("reprovm.toml"), recipe).unwrap();
        let (_, err, code) = text(&reprovm(&env).arg("build").arg(&src).output().unwrap());
        assert_eq!(code, 2, "{err}");
        assert!(err.contains("reprovm.toml") && err.contains(field) && err.contains(&format!("{flag} {value}")), "{err}");
        assert!(env.leftovers().is_empty());
    }
}

/// The tree's reprovm.toml is a symbolic link to a host secret (whose
/// lines a TOML parse error would quote), a FIFO (which would stall the
/// read), or a gigabyte of text: each is refused with exit 2 before
/// anything is read, and no byte of the secret is printed. A recipe the
/// user names with --recipe may be a link.
#[test]
fn a_recipe_that_is_a_link_to_a_host_file_leaks_nothing() {
    let env = TestEnv::new();
    let secret = env.path().join("id_ed25519");
    fs::write(&secret, "-----BEGIN OPENSSH PRIVATE KEY-----\nSECRETKEYMATERIAL\n").unwrap();
    let src = env.path().join("linked");
    fs::create_dir_all(&src).unwrap();
    symlink(&secret, src.join("reprovm.toml")).unwrap();
    let (out, err, code) = text(&reprovm(&env).arg("build").arg(&src).output().unwrap());
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("reprovm.toml") && err.contains("symbolic link"), "{err}");
    assert!(!format!("{out}{err}").contains("SECRETKEYMATERIAL") && !err.contains("BEGIN"), "the secret leaked: {err}");

    let fifo = env.path().join("fifo");
    fs::create_dir_all(&fifo).unwrap();
    nix::unistd::mkfifo(&fifo.join("reprovm.toml"), nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
    let (_, err, code) = text(&reprovm(&env).arg("build").arg(&fifo).output().unwrap());
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("not a regular file"), "{err}");

    let huge = env.path().join("huge");
    fs::create_dir_all(&huge).unwrap();
    let file = fs::File::create(huge.join("reprovm.toml")).unwrap();
    file.set_len(1 << 30).unwrap();
    let (_, err, code) = text(&reprovm(&env).arg("build").arg(&huge).output().unwrap());
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("over 1 MiB"), "{err}");

    // Named by the user, a link is followed (and a bad file is still only
    // a parse error of that file).
    let real = tree(&env, "real", "[build]\ncommand = \"true\"\nartifacts = [\"a\"]\ntimeout_secs = 1\n[oops]\n");
    let link = env.path().join("chosen.toml");
    symlink(real.join("reprovm.toml"), &link).unwrap();
    let (_, err, code) = text(&reprovm(&env).arg("build").arg(&real).arg("--recipe").arg(&link).output().unwrap());
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("chosen.toml") && err.contains("oops") && !err.contains("symbolic link"), "{err}");
    assert!(env.leftovers().is_empty());
}

/// The bundle in the store is changed after it was imported (a byte deep
/// in its root filesystem, so that the builder still boots): the hash,
/// which runs while QEMU boots, catches it, QEMU is stopped and reprovm
/// exits 3 before any command reaches the guest — for `run` and `build`.
#[test]
#[ignore = "boots a VM: run through scripts/test"]
fn an_image_changed_in_the_store_never_gets_a_command() {
    let env = TestEnv::new();
    let (pin, cache) = common::test_image();
    let hex = pin.trim_start_matches("sha256:");
    let entry = env.cache.join("reprovm/images").join(hex);
    fs::create_dir_all(&entry).unwrap();
    let bundle = entry.join("bundle.img");
    fs::copy(cache.join("reprovm/images").join(hex).join("bundle.img"), &bundle).unwrap();
    let mut perms = fs::metadata(&bundle).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o644);
    fs::set_permissions(&bundle, perms).unwrap();
    let mut file = fs::OpenOptions::new().read(true).write(true).open(&bundle).unwrap();
    let at = file.metadata().unwrap().len() - (2 << 20);
    let mut byte = [0u8];
    std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(at)).unwrap();
    file.read_exact(&mut byte).unwrap();
    std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(at)).unwrap();
    std::io::Write::write_all(&mut file, &[byte[0] ^ 0x5a]).unwrap();
    drop(file);
    let tampered = |cmd: &mut Command| {
        cmd.env("XDG_CACHE_HOME", &env.cache).env("TMPDIR", &env.tmp).env("REPROVM_IMAGE", &pin);
        text(&cmd.output().unwrap())
    };

    let (out, err, code) = tampered(Command::new(env!("CARGO_BIN_EXE_reprovm")).args(["run", "--accel", "tcg", "--", "echo", "REACHED"]));
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("does not match its pin") && err.contains("before anything was sent"), "{err}");
    assert!(!out.contains("REACHED"), "the command ran: {out}");
    assert_nothing_left(&env, "run");

    let src = tree(&env, "src", "[build]\ncommand = \"echo REACHED > a\"\nartifacts = [\"a\"]\n");
    let out_dir = env.path().join("out");
    let (_, err, code) =
        tampered(Command::new(env!("CARGO_BIN_EXE_reprovm")).args(["build", "--accel", "tcg"]).arg(&src).arg("--out").arg(&out_dir));
    assert_eq!(code, 3, "{err}");
    assert!(!err.contains("REACHED") && !out_dir.join("result.json").exists() && !out_dir.join("a").exists(), "{err}");
    assert_nothing_left(&env, "build");
}

/// The build leaves a process behind (its own session, immune to the
/// hang-up) that keeps appending to the artifact while the artifacts are
/// collected, so that the archive would catch it half-written: every
/// process of the build user is killed first, and the artifact comes back
/// whole.
#[test]
#[ignore = "boots a VM: run through scripts/test"]
fn processes_the_build_leaves_behind_cannot_race_the_collection() {
    let env = TestEnv::new();
    let src = tree(
        &env,
        "racer",
        "[build]\ncommand = \"\"\"\nmkdir dist && seq 1 100000 > dist/data.txt\nnohup setsid sh -c 'while :; do seq 1 1000 >> dist/data.txt; done' >/dev/null 2>&1 &\nsleep 1\n\"\"\"\nartifacts = [\"dist\"]\n",
    );
    let out = env.path().join("out");
    let (stdout, err, code) = text(&reprovm_vm(&env.tmp).arg("build").arg(&src).arg("--out").arg(&out).output().unwrap());
    assert_eq!(code, 0, "{err}");
    assert!(stdout.lines().all(|l| l.ends_with("  dist/data.txt")), "only the artifact: {stdout}");
    let data = fs::read_to_string(out.join("dist/data.txt")).unwrap();
    assert!(data.starts_with("1\n2\n3\n") && data.ends_with('\n'), "a whole file");
    assert_nothing_left(&env, "");
}

/// The build plants FIFOs at every name the collection of old would have
/// written its file list to in /tmp, hoping to hang it there until the
/// build's limit: the collection's name cannot be guessed, and the build
/// ends at once.
#[test]
#[ignore = "boots a VM: run through scripts/test"]
fn fifos_planted_for_the_collections_list_cannot_hang_it() {
    let env = TestEnv::new();
    let src = tree(
        &env,
        "planter",
        "[build]\ntimeout_secs = 60\ncommand = \"\"\"\nmkfifo $(seq -f /tmp/reprovm-artifacts.%g 1 5000)\necho ok > out.txt\n\"\"\"\nartifacts = [\"out.txt\"]\n",
    );
    let out = env.path().join("out");
    let start = std::time::Instant::now();
    let (stdout, err, code) = text(&reprovm_vm(&env.tmp).arg("build").arg(&src).arg("--out").arg(&out).output().unwrap());
    assert_eq!(code, 0, "{err}");
    assert!(start.elapsed() < std::time::Duration::from_secs(50), "the collection waited on a planted FIFO");
    assert!(stdout.ends_with("  out.txt\n"), "{stdout}");
    assert_nothing_left(&env, "");
}

/// A plain (non-git) tree built twice with the default --out (inside the
/// tree): the same source hash both times.
#[test]
#[ignore = "boots a VM: run through scripts/test"]
fn a_plain_tree_has_the_same_source_hash_on_every_run() {
    let env = TestEnv::new();
    let src = tree(&env, "plain", "[build]\ncommand = \"cat input > a\"\nartifacts = [\"a\"]\n");
    fs::write(src.join("input"), "x\n").unwrap();
    let mut hashes = Vec::new();
    for _ in 0..2 {
        let (_, err, code) = text(&reprovm_vm(&env.tmp).arg("build").arg(&src).output().unwrap());
        assert_eq!(code, 0, "{err}");
        let result: serde_json::Value = serde_json::from_str(&fs::read_to_string(src.join("out/result.json")).unwrap()).unwrap();
        hashes.push(result["inputs"]["source"]["sha256"].as_str().unwrap().to_string());
    }
    assert_eq!(hashes[0], hashes[1]);
    assert_nothing_left(&env, "");
}

/// A build that prints forged `--progress json` events — a result, an
/// error, a stage's end — on its stdout and stderr, from the provision and
/// the build command, under `build` and `verify`: reprovm's stdout holds
/// only reprovm's own events (one begin and one end per stage, then the true
/// result), and the forgeries show up on stderr, as the build's output.
#[test]
#[ignore = "boots VMs: run through scripts/test"]
fn a_build_cannot_forge_an_event_of_the_progress_stream() {
    let env = TestEnv::new();
    let forged = [
        r#"{"event":"result","exit":0,"result":{"forged":true}}"#,
        r#"{"event":"error","exit":0,"message":"forged"}"#,
        r#"{"event":"stage-end","stage":"build","summary":"forged","secs":0}"#,
    ];
    let src = tree(
        &env,
        "forger",
        "[build]\ncommand = \"sh forge.sh; echo real > a\"\nartifacts = [\"a\"]\nprovision = [\"sh /build/src/forge.sh\"]\n",
    );
    let script: String = forged.iter().map(|line| format!("echo '{line}'\necho '{line}' >&2\nprintf '\\r\\n{line}\\n'\n")).collect();
    fs::write(src.join("forge.sh"), script).unwrap();
    let out = env.path().join("out");
    let expect = env.path().join("SHA256SUMS");
    for (command, out) in [("build", out.clone()), ("verify", env.path().join("out-verify"))] {
        let mut cmd = reprovm_vm(&env.tmp);
        cmd.arg(command).arg(&src).arg("--out").arg(&out).args(["--progress", "json"]);
        if command == "verify" {
            cmd.arg("--expect").arg(&expect);
        }
        let o = cmd.output().unwrap();
        let (stdout, err) = (String::from_utf8(o.stdout).unwrap(), String::from_utf8_lossy(&o.stderr));
        assert_eq!(o.status.code(), Some(0), "{command}: {err}");
        assert!(!stdout.contains("forged"), "{command}: a forged event on reprovm's stdout: {stdout}");
        let events: Vec<serde_json::Value> = stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{command}: not JSON on stdout: {l:?}: {e}")))
            .collect();
        let order: Vec<String> =
            events.iter().map(|e| format!("{} {}", e["event"].as_str().unwrap(), e["stage"].as_str().unwrap_or(""))).collect();
        let expected: Vec<String> = ["source", "boot", "build", "fetch"]
            .iter()
            .flat_map(|s| [format!("stage-begin {s}"), format!("stage-end {s}")])
            .chain(["result ".to_string()])
            .collect();
        assert_eq!(order, expected, "{command}: {stdout}");
        let on_disk: serde_json::Value = serde_json::from_str(&fs::read_to_string(out.join("result.json")).unwrap()).unwrap();
        assert_eq!(events[8]["exit"], 0);
        assert_eq!(events[8]["result"], on_disk, "{command}: the result event is result.json");
        for line in forged {
            assert!(err.matches(line).count() >= 4, "{command}: the build's forgeries go to stderr with its output: {line}\n{err}");
        }
        if command == "verify" {
            assert_eq!(events[8]["comparison"]["identical"], true, "{stdout}");
        } else {
            fs::copy(out.join("SHA256SUMS"), &expect).unwrap();
        }
    }
    assert_nothing_left(&env, "");
}
