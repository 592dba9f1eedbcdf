//! The host-variation suite: the same sources built with reprovm under many
//! host-side variations (environment, TZ, locale, umask, paths, TMPDIR,
//! user, host CPUs, accelerator, QEMU binary) must give identical
//! SHA256SUMS and identical guest facts; and the control: the same sources
//! built directly on the host under two variations must differ, proving the
//! suite could see a leak. VM tests, `#[ignore]`d and run by scripts/test.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{qemu_processes_mentioning, test_image, text, TestEnv};

/// The hostile environment of the bar, plus more.
const HOSTILE_ENV: &[(&str, &str)] = &[
    ("TZ", "Pacific/Kiritimati"),
    ("LANG", "tr_TR.UTF-8"),
    ("LC_ALL", "tr_TR.UTF-8"),
    ("MAKEFLAGS", "-j7"),
    ("CFLAGS", "-O0 -march=native"),
    ("CC", "clang"),
    ("LD_PRELOAD", "/nonexistent/libreprovm-test.so"),
    ("SOURCE_DATE_EPOCH", "1"),
    ("HOSTNAME", "somebody-laptop"),
    ("USER", "mallory"),
];

/// One way of running `reprovm build` on this host.
struct Variation {
    name: String,
    /// Program and arguments put in front of reprovm (taskset, setpriv).
    wrapper: Vec<String>,
    /// Start from an empty environment (then `env` and the test's own).
    clear_env: bool,
    env: Vec<(String, String)>,
    umask: Option<u32>,
    cwd: PathBuf,
    /// The source directory to build.
    src: PathBuf,
    /// TMPDIR for reprovm's per-run files.
    tmp: PathBuf,
    /// XDG_CACHE_HOME holding the image.
    cache: PathBuf,
    /// The output directory.
    out: PathBuf,
    extra_args: Vec<String>,
}

/// What one build produced: SHA256SUMS and the parts of result.json that
/// must not depend on the host.
#[derive(Debug, PartialEq)]
struct Outcome {
    sums: String,
    guest: serde_json::Value,
    machine: serde_json::Value,
    source: serde_json::Value,
}

fn build(v: &Variation) -> Outcome {
    let out = &v.out;
    let program = env!("CARGO_BIN_EXE_reprovm");
    let mut cmd = match v.wrapper.split_first() {
        None => Command::new(program),
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(program);
            c
        }
    };
    if v.clear_env {
        cmd.env_clear().env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
    }
    let (pin, _) = test_image();
    cmd.envs(v.env.iter().map(|(k, v)| (k, v)))
        .env("XDG_CACHE_HOME", &v.cache)
        .env("TMPDIR", &v.tmp)
        .env("REPROVM_IMAGE", &pin)
        .env_remove("REPROVM_QEMU")
        .current_dir(&v.cwd)
        .arg("build")
        .arg(&v.src)
        .arg("--out")
        .arg(out)
        .args(&v.extra_args);
    if let Some(mask) = v.umask {
        use std::os::unix::process::CommandExt;
        // SAFETY: umask(2) is async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                libc::umask(mask);
                Ok(())
            });
        }
    }
    let (stdout, err, code) = text(&cmd.output().unwrap());
    assert_eq!(code, 0, "{}: reprovm build failed:\n{err}", v.name);
    let sums = fs::read_to_string(out.join("SHA256SUMS")).unwrap();
    assert_eq!(stdout, sums, "{}", v.name);
    let result: serde_json::Value = serde_json::from_str(&fs::read_to_string(out.join("result.json")).unwrap()).unwrap();
    let mut machine = result["machine"].clone();
    // The QEMU binary and the accelerator may vary: that is the point.
    for key in ["qemu_binary", "qemu_version", "accelerator"] {
        machine.as_object_mut().unwrap().remove(key);
    }
    assert!(qemu_processes_mentioning(&v.tmp.display().to_string()).is_empty(), "{}: QEMU left running", v.name);
    Outcome { sums, guest: result["guest"].clone(), machine, source: result["inputs"]["source"].clone() }
}

/// The fields of two JSON objects that differ, each as `field: a ≠ b`
/// (a field missing on one side counts as different).
fn differing_fields(a: &serde_json::Value, b: &serde_json::Value) -> Vec<String> {
    let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else { return vec![format!("{a} ≠ {b}")] };
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    keys.into_iter().filter(|k| a.get(*k) != b.get(*k)).map(|k| format!("{k}: {:?} ≠ {:?}", a.get(k), b.get(k))).collect()
}

/// Builds every variation and asserts identical outcomes; returns how many ran.
fn assert_all_identical(what: &str, variations: &[Variation], skipped: &[String]) {
    let mut first: Option<(String, Outcome)> = None;
    for v in variations {
        let outcome = build(v);
        eprintln!("  {what}: {:<60} {}", v.name, outcome.sums.lines().map(|l| &l[..12]).collect::<Vec<_>>().join(" "));
        match &first {
            None => first = Some((v.name.clone(), outcome)),
            Some((name, expected)) => {
                assert_eq!(&outcome.sums, &expected.sums, "{what}: SHA256SUMS of `{}` differ from `{name}`", v.name);
                let differing = differing_fields(&outcome.guest, &expected.guest);
                assert!(differing.is_empty(), "{what}: guest facts of `{}` differ from `{name}`: {}", v.name, differing.join("; "));
                assert_eq!(&outcome.machine, &expected.machine, "{what}: machine of `{}` differs from `{name}`", v.name);
                assert_eq!(&outcome.source, &expected.source, "{what}: source archive of `{}` differs from `{name}`", v.name);
            }
        }
    }
    eprintln!(
        "host-variation suite, {what}: {} variations tried, all produced identical SHA256SUMS and guest facts{}",
        variations.len(),
        if skipped.is_empty() { String::new() } else { format!("; skipped: {}", skipped.join("; ")) }
    );
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A fresh clone of this repository's HEAD at `dest` (so every variation
/// builds the same committed sources, whatever the working tree holds).
fn clone_repo(dest: &Path) {
    fs::create_dir_all(dest.parent().unwrap()).unwrap();
    let st = Command::new("git").arg("clone").arg("-q").arg(repo_root()).arg(dest).status().unwrap();
    assert!(st.success());
}

/// A path several levels deep with spaces and non-ASCII in it.
fn deep(base: &Path) -> PathBuf {
    base.join("a deep/path with spaces/and ünïcödé/x/y/z")
}

/// The second QEMU (REPROVM_SECOND_QEMU, set by scripts/test from
/// scripts/install-second-qemu), if there is one.
fn second_qemu() -> Option<PathBuf> {
    std::env::var_os("REPROVM_SECOND_QEMU").map(PathBuf::from).filter(|p| p.exists())
}

fn chown_tree(path: &Path, uid: u32) {
    let st = Command::new("chown").arg("-R").arg(format!("{uid}:{uid}")).arg(path).status().unwrap();
    assert!(st.success());
}

/// The variations shared by both examples: `src_in(dir)` prepares the
/// source under `dir` and returns the directory to build.
fn variations(env: &TestEnv, src_in: &dyn Fn(&Path) -> PathBuf, skipped: &mut Vec<String>, full: bool) -> Vec<Variation> {
    let (_, cache) = test_image();
    let base = env.path();
    let plain_tmp = base.join("tmp-plain");
    fs::create_dir_all(&plain_tmp).unwrap();
    let plain = Variation {
        name: "plain".into(),
        wrapper: vec![],
        clear_env: false,
        env: vec![],
        umask: None,
        cwd: repo_root(),
        src: src_in(&base.join("plain")),
        tmp: plain_tmp,
        cache: cache.clone(),
        out: base.join("out-plain"),
        extra_args: vec![],
    };
    let bar_tmp = deep(&base.join("tmp bar"));
    fs::create_dir_all(&bar_tmp).unwrap();
    // The full suite pins reprovm to one host CPU here too; a long build
    // (GNU hello's configure) keeps both.
    let bar = Variation {
        name: format!(
            "env -i, deep path with spaces, TZ, tr_TR, umask 077, MAKEFLAGS=-j7, hostile env{}",
            if full { ", taskset -c 0" } else { "" }
        ),
        wrapper: if full { vec!["taskset".into(), "-c".into(), "0".into()] } else { vec![] },
        clear_env: true,
        env: HOSTILE_ENV.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        umask: Some(0o077),
        cwd: "/".into(),
        src: src_in(&deep(&base.join("bar"))),
        tmp: bar_tmp,
        cache: cache.clone(),
        out: deep(&base.join("out bar")),
        extra_args: vec!["--accel".into(), "auto".into()],
    };
    let mut all = vec![plain, bar];
    if !full {
        return all;
    }
    let tmp_spaces = base.join("tmp with spaces/and more");
    fs::create_dir_all(&tmp_spaces).unwrap();
    all.push(Variation {
        name: "TMPDIR with spaces, umask 002, cwd = the source, LANG=C".into(),
        wrapper: vec![],
        clear_env: false,
        env: vec![("LANG".into(), "C".into()), ("LC_ALL".into(), "C".into()), ("TZ".into(), "America/St_Johns".into())],
        umask: Some(0o002),
        cwd: base.to_path_buf(),
        src: src_in(&base.join("tmpdir")),
        tmp: tmp_spaces,
        cache: cache.clone(),
        out: base.join("out-tmpdir"),
        extra_args: vec![],
    });
    let cpu1_tmp = base.join("tmp-cpu1");
    fs::create_dir_all(&cpu1_tmp).unwrap();
    all.push(Variation {
        name: "taskset -c 1, --accel tcg, unset HOME and LANG".into(),
        wrapper: vec!["taskset".into(), "-c".into(), "1".into(), "env".into(), "-u".into(), "HOME".into(), "-u".into(), "LANG".into()],
        clear_env: false,
        env: vec![],
        umask: None,
        cwd: repo_root(),
        src: src_in(&base.join("cpu1")),
        tmp: cpu1_tmp,
        cache: cache.clone(),
        out: base.join("out-cpu1"),
        extra_args: vec!["--accel".into(), "tcg".into()],
    });
    match second_qemu() {
        Some(qemu) => {
            let tmp = base.join("tmp-qemu2");
            fs::create_dir_all(&tmp).unwrap();
            all.push(Variation {
                name: format!("second QEMU ({})", qemu.display()),
                wrapper: vec![],
                clear_env: false,
                env: vec![],
                umask: None,
                cwd: repo_root(),
                src: src_in(&base.join("qemu2")),
                tmp,
                cache: cache.clone(),
                out: base.join("out-qemu2"),
                extra_args: vec!["--qemu".into(), qemu.display().to_string()],
            });
        }
        None => skipped.push("second QEMU (REPROVM_SECOND_QEMU unset: run scripts/install-second-qemu)".into()),
    }
    if nix::unistd::geteuid().is_root() {
        // An unprivileged user with its own store, TMPDIR and source.
        let home = base.join("nobody");
        fs::create_dir_all(home.join("tmp")).unwrap();
        fs::set_permissions(base, fs::Permissions::from_mode(0o755)).unwrap();
        let (pin, cache) = test_image();
        let bundle = cache.join("reprovm/images").join(pin.trim_start_matches("sha256:")).join("bundle.img");
        fs::copy(&bundle, home.join("bundle.img")).unwrap();
        let src = src_in(&home.join("src"));
        chown_tree(&home, 65534);
        let import = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(env!("CARGO_BIN_EXE_reprovm"))
            .args(["image", "import"])
            .arg(home.join("bundle.img"))
            .env("XDG_CACHE_HOME", home.join("cache"))
            .env("TMPDIR", home.join("tmp"))
            .output()
            .unwrap();
        assert!(import.status.success(), "{}", String::from_utf8_lossy(&import.stderr));
        fs::remove_file(home.join("bundle.img")).unwrap();
        all.push(Variation {
            name: "unprivileged user (nobody), own store and TMPDIR".into(),
            wrapper: ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"].map(String::from).to_vec(),
            clear_env: false,
            env: vec![("HOME".into(), home.display().to_string())],
            umask: None,
            cwd: home.clone(),
            src,
            tmp: home.join("tmp"),
            cache: home.join("cache"),
            out: home.join("out"),
            extra_args: vec![],
        });
    } else {
        skipped.push("another user (needs root to switch users)".into());
    }
    if kvm_boots() {
        let tmp = base.join("tmp-kvm");
        fs::create_dir_all(&tmp).unwrap();
        all.push(Variation {
            name: "--accel kvm".into(),
            wrapper: vec![],
            clear_env: false,
            env: vec![],
            umask: None,
            cwd: repo_root(),
            src: src_in(&base.join("kvm")),
            tmp,
            cache,
            out: base.join("out-kvm"),
            extra_args: vec!["--accel".into(), "kvm".into()],
        });
    } else {
        skipped.push("KVM (the builder does not boot under this host's /dev/kvm; --accel auto fell back to TCG above)".into());
    }
    all
}

/// Whether the builder boots under KVM here.
fn kvm_boots() -> bool {
    let env = TestEnv::new();
    common::reprovm_vm(&env.tmp).args(["run", "--accel", "kvm", "--", "true"]).output().is_ok_and(|o| o.status.success())
}

#[test]
#[ignore = "boots VMs: run through scripts/test"]
fn examples_hello_is_identical_whatever_the_host() {
    let env = TestEnv::new();
    let mut skipped = Vec::new();
    let src_in = |dir: &Path| {
        clone_repo(&dir.join("repo"));
        dir.join("repo/examples/hello")
    };
    let variations = variations(&env, &src_in, &mut skipped, true);
    assert_all_identical("examples/hello", &variations, &skipped);
}

/// GNU hello's source (the pinned Debian orig tarball) in `dir`.
fn fetch_gnu_hello(dir: &Path) -> PathBuf {
    fs::create_dir_all(dir.parent().unwrap()).unwrap();
    let out = Command::new(repo_root().join("examples/gnu-hello/fetch-source")).arg(dir).output().unwrap();
    assert!(out.status.success(), "fetch-source: {}", String::from_utf8_lossy(&out.stderr));
    dir.to_path_buf()
}

#[test]
#[ignore = "boots VMs: run through scripts/test"]
fn gnu_hello_is_identical_whatever_the_host() {
    let env = TestEnv::new();
    let mut skipped = Vec::new();
    let variations = variations(&env, &|dir: &Path| fetch_gnu_hello(&dir.join("gnu-hello")), &mut skipped, false);
    assert_all_identical("examples/gnu-hello", &variations, &skipped);
}

/// Runs `command` with `sh -c` directly on the host in `dir`.
fn host_build(dir: &Path, command: &str, env: &[(&str, &str)], umask: u32) {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("umask {umask:03o}; {command}"))
        .current_dir(dir)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert!(out.status.success(), "host build in {}: {}", dir.display(), String::from_utf8_lossy(&out.stderr));
}

fn hashes(dir: &Path, files: &[&str]) -> BTreeMap<String, String> {
    files
        .iter()
        .map(|f| {
            let out = Command::new("sha256sum").arg(dir.join(f)).output().unwrap();
            (f.to_string(), String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap().to_string())
        })
        .collect()
}

/// The control: built directly on the host under two variations, the same
/// examples give different bytes, so the suite above can see a leak.
#[test]
fn control_direct_host_builds_differ() {
    let env = TestEnv::new();
    let a = env.path().join("a");
    let b = deep(&env.path().join("b"));
    clone_repo(&a.join("repo"));
    clone_repo(&b.join("repo"));
    host_build(&a.join("repo/examples/hello"), "make", &[("TZ", "UTC"), ("LANG", "C.UTF-8")], 0o022);
    std::thread::sleep(std::time::Duration::from_millis(1100));
    host_build(&b.join("repo/examples/hello"), "make", &[("TZ", "Pacific/Kiritimati"), ("LC_ALL", "C")], 0o077);
    let files = ["hello", "buildinfo.txt"];
    let (ha, hb) = (hashes(&a.join("repo/examples/hello"), &files), hashes(&b.join("repo/examples/hello"), &files));
    let differing: Vec<&&str> = files.iter().filter(|f| ha[**f] != hb[**f]).collect();
    assert_eq!(differing.len(), files.len(), "direct host builds of examples/hello should differ: {ha:?} {hb:?}");
    eprintln!("control: examples/hello built directly on the host twice: {differing:?} differ");
}

/// The control for GNU hello: configure && make on the host in two places.
#[test]
#[ignore = "downloads GNU hello and builds it on the host: run through scripts/test"]
fn control_direct_host_builds_of_gnu_hello_differ() {
    let env = TestEnv::new();
    let recipe: toml::Value = toml::from_str(&fs::read_to_string(repo_root().join("examples/gnu-hello/reprovm.toml")).unwrap()).unwrap();
    let command = recipe["build"]["command"].as_str().unwrap();
    let a = fetch_gnu_hello(&env.path().join("a"));
    let b = fetch_gnu_hello(&deep(&env.path().join("b")));
    host_build(&a, command, &[("TZ", "UTC"), ("LANG", "C.UTF-8")], 0o022);
    host_build(&b, command, &[("TZ", "Pacific/Kiritimati"), ("LC_ALL", "C")], 0o077);
    let files = ["hello", "hello.1", "hello-2.10-install.tar.gz"];
    let (ha, hb) = (hashes(&a, &files), hashes(&b, &files));
    let differing: Vec<&&str> = files.iter().filter(|f| ha[**f] != hb[**f]).collect();
    assert!(!differing.is_empty(), "direct host builds of GNU hello should differ: {ha:?}");
    eprintln!("control: GNU hello built directly on the host twice: {differing:?} differ");
}
