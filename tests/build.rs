//! `reprovm build`, `verify` and `compare` against the real builder (VM
//! tests, `#[ignore]`d like those in tests/vm.rs and run by scripts/test),
//! plus the checks that need no VM.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{assert_nothing_left, reprovm, reprovm_vm, test_image, text, TestEnv};

fn hello() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/hello")
}

/// A plain (non-git) source tree with `recipe` as its reprovm.toml.
fn source_tree(env: &TestEnv, recipe: &str) -> PathBuf {
    let src = env.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("reprovm.toml"), recipe).unwrap();
    src
}

#[test]
#[ignore = "boots a VM: run through scripts/test"]
fn build_hello_then_verify_and_compare() {
    let env = TestEnv::new();
    let out = env.path().join("out");
    let (pin, _) = test_image();

    // Build, signing the provenance: exit 0, sha256sum -c passes, result.json
    // has the pin and hashes.
    let key = env.path().join("rebuilder");
    let keygen = Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-C", "rebuilder", "-f"]).arg(&key).output().unwrap();
    assert!(keygen.status.success(), "{}", String::from_utf8_lossy(&keygen.stderr));
    let (stdout, err, code) =
        text(&reprovm_vm(&env.tmp).arg("build").arg(hello()).arg("--out").arg(&out).arg("--sign").arg(&key).output().unwrap());
    assert_eq!(code, 0, "{err}");
    let sums = fs::read_to_string(out.join("SHA256SUMS")).unwrap();
    assert_eq!(stdout, sums, "stdout carries SHA256SUMS");
    let check = Command::new("sha256sum").args(["-c", "SHA256SUMS"]).current_dir(&out).output().unwrap();
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stdout));
    let result: serde_json::Value = serde_json::from_str(&fs::read_to_string(out.join("result.json")).unwrap()).unwrap();
    assert_eq!(result["inputs"]["image"], pin.as_str());
    assert_eq!(result["inputs"]["source"]["kind"], "git");
    for line in sums.lines() {
        let (hash, path) = line.split_once("  ").unwrap();
        assert!(
            result["outputs"].as_array().unwrap().iter().any(|o| o["path"] == path && o["sha256"] == hash),
            "{path} not in result.json"
        );
    }
    let info = fs::read_to_string(out.join("buildinfo.txt")).unwrap();
    for fact in ["hostname: builder", "user: builder", "cpus: 2", "umask: 0022", "build dir: /build/src"] {
        assert!(info.contains(fact), "{fact} missing from {info}");
    }
    assert!(out.join("build.log").is_file() && out.join("serial.log").is_file());
    assert_nothing_left(&env, "");

    // The provenance: its subjects are exactly SHA256SUMS, its predicate
    // records the pin and the machine; the signed envelope is accepted by
    // verify --attestations against the SHA256SUMS, without a rebuild.
    let provenance: serde_json::Value = serde_json::from_slice(&fs::read(out.join("provenance.intoto.json")).unwrap()).unwrap();
    let subjects: Vec<String> = provenance["subject"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| format!("{}  {}\n", s["digest"]["sha256"].as_str().unwrap(), s["name"].as_str().unwrap()))
        .collect();
    assert_eq!(subjects.concat(), sums, "provenance subjects are SHA256SUMS");
    let deps = &provenance["predicate"]["buildDefinition"]["resolvedDependencies"];
    assert_eq!(format!("sha256:{}", deps[0]["digest"]["sha256"].as_str().unwrap()), pin);
    assert_eq!(provenance["predicate"]["buildDefinition"]["internalParameters"]["machine"], result["machine"]);
    let attestations = env.path().join("attestations");
    fs::create_dir(&attestations).unwrap();
    fs::copy(out.join("provenance.intoto.dsse.json"), attestations.join("rebuilder.dsse.json")).unwrap();
    let (table, err, code) = text(
        &reprovm(&env)
            .args(["verify", "--attestations"])
            .arg(&attestations)
            .arg("--trusted-keys")
            .arg(key.with_extension("pub"))
            .args(["--threshold", "1", "--expect"])
            .arg(out.join("SHA256SUMS"))
            .output()
            .unwrap(),
    );
    assert_eq!(code, 0, "{table}{err}");
    assert!(table.contains(&pin[..23]) && table.contains("hello") && !table.contains("DIFFERS"), "{table}");

    // Verify against a "published" set where hello was built differently:
    // exit 1, the artifact named, and a diffoscope report when it is installed.
    let published = env.path().join("published");
    fs::create_dir(&published).unwrap();
    let mut tampered = fs::read(out.join("hello")).unwrap();
    tampered.extend_from_slice(b"built elsewhere");
    fs::write(published.join("hello"), &tampered).unwrap();
    fs::copy(out.join("buildinfo.txt"), published.join("buildinfo.txt")).unwrap();
    let sums_of_published = Command::new("sha256sum").args(["buildinfo.txt", "hello"]).current_dir(&published).output().unwrap();
    fs::write(published.join("SHA256SUMS"), &sums_of_published.stdout).unwrap();
    let out2 = env.path().join("out2");
    let verify = |expect: &Path, extra: &[&str]| {
        text(
            &reprovm_vm(&env.tmp)
                .arg("verify")
                .arg(hello())
                .arg("--out")
                .arg(&out2)
                .arg("--expect")
                .arg(expect)
                .args(extra)
                .output()
                .unwrap(),
        )
    };
    let (table, err, code) = verify(&published.join("SHA256SUMS"), &["--diffoscope"]);
    assert_eq!(code, 1, "{err}");
    let row = table.lines().find(|l| l.starts_with("hello ")).unwrap_or_else(|| panic!("hello not in {table}"));
    assert!(row.contains("DIFFERS"), "{table}");
    assert!(table.lines().any(|l| l.starts_with("buildinfo.txt") && l.contains("identical")), "{table}");
    assert!(err.contains("1 of 2 artifacts do not match"), "{err}");
    if Command::new("diffoscope").arg("--version").output().is_ok_and(|o| o.status.success()) {
        let report = fs::read_to_string(out2.join("diffoscope/hello.txt")).unwrap_or_else(|e| panic!("no diffoscope report ({e}): {err}"));
        assert!(report.contains("hello"), "{report}");
    } else {
        assert!(err.contains("install diffoscope"), "{err}");
    }

    // Against the true SHA256SUMS and the first result.json: exit 0. The
    // second time with --json --quiet: the comparison parses back, and
    // stderr carries neither stage lines nor the build's output.
    let (_, err, code) = verify(&out.join("SHA256SUMS"), &[]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("build finished") && err.contains("hello.c"), "without --quiet: stages and the build's output: {err}");
    let (json, err, code) = verify(&out.join("result.json"), &["--json", "--quiet"]);
    assert_eq!(code, 0, "{err}");
    assert!(!err.contains("build finished") && !err.contains("hello.c") && !err.contains("output in"), "--quiet: {err}");
    let report: serde_json::Value = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}: {json}"));
    assert_eq!(report["identical"], true, "{report}");
    assert_eq!(report["records"][1], out2.join("result.json").to_str().unwrap(), "{report}");
    let rows = report["artifacts"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "{report}");
    assert!(rows.iter().all(|r| r["status"] == "identical"), "{report}");
    assert_eq!(report["result"]["outputs"], result["outputs"], "the rebuilt result, with the first build's hashes");

    // Compare the two builders' results, and the first one's envelope: identical.
    let (table, err, code) = text(
        &reprovm(&env)
            .arg("compare")
            .arg(out.join("result.json"))
            .arg(out2.join("result.json"))
            .arg(out.join("provenance.intoto.dsse.json"))
            .output()
            .unwrap(),
    );
    assert_eq!(code, 0, "{table}{err}");
    assert_nothing_left(&env, "");
}

#[test]
#[ignore = "boots a VM: run through scripts/test"]
fn the_build_sees_only_the_fixed_environment() {
    let env = TestEnv::new();
    let src = source_tree(
        &env,
        r#"[machine]
cpus = 1
memory_mib = 512
[build]
command = """
set -e
env | sort > env.txt
umask > umask.txt
id > id.txt
pwd > pwd.txt
if bash -c 'exec 3<>/dev/tcp/10.0.2.2/22' 2>/dev/null; then echo reachable; else echo unreachable; fi > net.txt
mkdir -p deep/er && echo x > deep/er/f.txt
"""
env = { EXTRA = "from the recipe" }
artifacts = ["*.txt", "deep"]
"#,
    );
    let out = env.path().join("out");
    let (_, err, code) = text(
        &reprovm_vm(&env.tmp)
            .arg("build")
            .arg(&src)
            .arg("--out")
            .arg(&out)
            .env("TZ", "Pacific/Kiritimati")
            .env("LANG", "tr_TR.UTF-8")
            .env("MAKEFLAGS", "-j7")
            .env("CFLAGS", "-march=native")
            .current_dir("/")
            .output()
            .unwrap(),
    );
    assert_eq!(code, 0, "{err}");
    let read = |name: &str| fs::read_to_string(out.join(name)).unwrap();
    let names: Vec<String> = read("env.txt").lines().map(|l| l.split('=').next().unwrap().to_string()).collect();
    assert_eq!(
        names,
        ["EXTRA", "HOME", "LANG", "LOGNAME", "OLDPWD", "PATH", "PWD", "SHELL", "SOURCE_DATE_EPOCH", "TMPDIR", "TZ", "USER"]
            .into_iter()
            .filter(|n| *n != "OLDPWD")
            .collect::<Vec<_>>(),
        "{}",
        read("env.txt")
    );
    let env_txt = read("env.txt");
    assert!(env_txt.contains("TZ=UTC\n") && env_txt.contains("LANG=C.UTF-8\n") && env_txt.contains("SOURCE_DATE_EPOCH="), "{env_txt}");
    assert_eq!(read("umask.txt").trim(), "0022");
    assert!(read("id.txt").starts_with("uid=1000(builder) gid=1000(builder)"), "{}", read("id.txt"));
    assert_eq!(read("pwd.txt").trim(), "/build/src");
    assert_eq!(read("net.txt").trim(), "unreachable", "network = none must not reach the host");
    assert_eq!(read("deep/er/f.txt"), "x\n", "a directory glob brings its files back");
    let result: serde_json::Value = serde_json::from_str(&read("result.json")).unwrap();
    assert_eq!(result["inputs"]["source"]["kind"], "tree");
    assert_eq!(result["inputs"]["source_date_epoch_from"], "clock");

    // `reprovm run` (and so `shell`) runs commands exactly as the build did:
    // the same user, directory, umask and environment (SOURCE_DATE_EPOCH is
    // the machine's clock there, as it was for this build without git).
    let (run_out, err, code) = text(
        &reprovm_vm(&env.tmp)
            .args(["run", "--cpus", "1", "--memory", "512", "--", "sh", "-c", "env | sort; umask; id; pwd"])
            .env("TZ", "Pacific/Kiritimati")
            .env("CFLAGS", "-march=native")
            .current_dir("/")
            .output()
            .unwrap(),
    );
    assert_eq!(code, 0, "{err}");
    let build_saw: String = env_txt.lines().filter(|l| !l.starts_with("EXTRA=")).map(|l| format!("{l}\n")).collect();
    let expected = format!("{build_saw}{}{}{}", read("umask.txt"), read("id.txt"), read("pwd.txt"));
    assert_eq!(run_out, expected, "reprovm run must see what the build saw");
    assert_nothing_left(&env, "");
}

#[test]
#[ignore = "boots a VM: run through scripts/test"]
fn unsafe_artifacts_and_unmatched_globs_fail_the_build_and_touch_nothing() {
    let env = TestEnv::new();
    let src = source_tree(
        &env,
        r#"[machine]
cpus = 1
memory_mib = 512
[build]
command = "ln -s /etc etc-link && ln -s /etc/passwd passwd && mkfifo fifo && echo ok > real.txt"
artifacts = ["passwd", "etc-link/hostname", "fifo", "real.txt", "missing-*.tar"]
"#,
    );
    let out = env.path().join("out");
    let (stdout, err, code) = text(&reprovm_vm(&env.tmp).arg("build").arg(&src).arg("--out").arg(&out).output().unwrap());
    assert_eq!(code, 5, "{err}");
    assert!(stdout.is_empty(), "{stdout}");
    for needle in [
        "\"passwd\" refused: a symbolic link",
        "\"etc-link/hostname\" refused: resolves outside",
        "\"fifo\" refused: not a regular file",
        "\"missing-*.tar\" (build.artifacts) matched nothing",
    ] {
        assert!(err.contains(needle), "{needle} not in {err}");
    }
    assert!(!out.join("SHA256SUMS").exists() && !out.join("result.json").exists() && !out.join("passwd").exists());
    assert!(out.join("build.log").is_file(), "the log stays for diagnosis");
    assert_nothing_left(&env, "");

    // A failing command: exit 5 with the log's tail.
    fs::write(src.join("reprovm.toml"), "[build]\ncommand = \"echo the compiler broke >&2; exit 3\"\nartifacts = [\"x\"]\n").unwrap();
    let (_, err, code) = text(&reprovm_vm(&env.tmp).arg("build").arg(&src).arg("--out").arg(&out).output().unwrap());
    assert_eq!(code, 5, "{err}");
    assert!(err.contains("failed with status 3") && err.contains("--- build.log (last lines) ---\nthe compiler broke"), "{err}");
    assert_nothing_left(&env, "");
}

#[test]
fn bad_recipes_and_flags_exit_2_naming_the_file_and_field() {
    let env = TestEnv::new();
    let src = source_tree(&env, "[build]\ncommand = \"make\"\nartifacts = [\"../../etc/shadow\"]\n");
    let (_, err, code) = text(&reprovm(&env).arg("build").arg(&src).output().unwrap());
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("reprovm.toml") && err.contains("build.artifacts") && err.contains("../../etc/shadow"), "{err}");

    fs::write(src.join("reprovm.toml"), "[build]\ncommand = \"make\"\nartifacts = [\"a\"]\n[machine]\ncpus = 2\nram = 4\n").unwrap();
    let (_, err, code) = text(&reprovm(&env).arg("build").arg(&src).output().unwrap());
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("reprovm.toml") && err.contains("ram"), "{err}");

    let (_, err, code) = text(&reprovm(&env).arg("build").arg(env.path().join("nowhere")).output().unwrap());
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("nowhere/reprovm.toml"), "{err}");

    // A flag's value gets the recipe field's checks, and the error names the flag.
    fs::write(src.join("reprovm.toml"), "[build]\ncommand = \"make\"\nartifacts = [\"a\"]\n").unwrap();
    for (flag, value, expected) in [
        ("--scratch", "1", "64 to 4194304"),
        ("--timeout", "0", "1 to 604800"),
        ("--cpus", "65", "1 to 64"),
        ("--clock", "-5", "seconds since 1970"),
    ] {
        let (_, err, code) = text(&reprovm(&env).arg("build").arg(&src).args([flag, value]).output().unwrap());
        assert_eq!(code, 2, "{flag}: {err}");
        assert!(err.contains(&format!("invalid value \"{value}\" for {flag}: {expected}")), "{flag}: {err}");
    }
    let (_, err, code) = text(&reprovm(&env).args(["run", "--memory", "100", "--", "true"]).output().unwrap());
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("invalid value \"100\" for --memory: 256 to 262144"), "{err}");

    // An output directory that holds something else is never replaced.
    fs::write(src.join("reprovm.toml"), "[build]\ncommand = \"make\"\nartifacts = [\"a\"]\n").unwrap();
    let foreign = env.path().join("home");
    fs::create_dir(&foreign).unwrap();
    fs::write(foreign.join("notes.txt"), "keep me").unwrap();
    let pin = format!("sha256:{}", "0".repeat(64));
    let (_, err, code) = text(&reprovm(&env).arg("build").arg(&src).arg("--image").arg(&pin).arg("--out").arg(&foreign).output().unwrap());
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("refusing to replace"), "{err}");
    assert_eq!(fs::read_to_string(foreign.join("notes.txt")).unwrap(), "keep me");

    // A bad --expect file is refused before anything boots.
    fs::write(env.path().join("SUMS"), "not a checksum line\n").unwrap();
    let (_, err, code) = text(&reprovm(&env).arg("verify").arg(&src).arg("--expect").arg(env.path().join("SUMS")).output().unwrap());
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("SUMS:1"), "{err}");
    assert!(env.leftovers().is_empty(), "{:?}", env.leftovers());
}

#[test]
fn compare_reads_sha256sums_and_exits_1_on_a_difference() {
    let env = TestEnv::new();
    let (a, b) = ("a".repeat(64), "b".repeat(64));
    let write = |name: &str, text: String| {
        let p = env.path().join(name);
        fs::write(&p, text).unwrap();
        p
    };
    let one = write("one", format!("{a}  hello\n{b}  hello.1\n"));
    let two = write("two", format!("{a}  hello\n{b}  hello.1\n"));
    let three = write("three", format!("{b}  hello\n"));
    let (out, err, code) = text(&reprovm(&env).arg("compare").arg(&one).arg(&two).output().unwrap());
    assert_eq!(code, 0, "{out}{err}");
    let (out, err, code) = text(&reprovm(&env).arg("compare").arg(&one).arg(&two).arg(&three).output().unwrap());
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.lines().any(|l| l.starts_with("hello ") && l.contains("DIFFERS")), "{out}");
    assert!(out.lines().any(|l| l.starts_with("hello.1") && l.contains("MISSING")), "{out}");
}

/// The builder is stopped without a power-off once the artifacts are
/// collected (QMP `quit`, no ACPI): a 500 MB artifact and 3000 small files
/// written by the build come back whole, as the host's own hashes of the
/// same bytes say.
#[test]
#[ignore = "boots a VM: run through scripts/test"]
fn the_fast_stop_loses_no_artifact_byte() {
    use sha2::{Digest, Sha256};
    use std::io::Read;

    let env = TestEnv::new();
    let src = source_tree(
        &env,
        "[machine]\nscratch_mib = 2048\n[build]\ncommand = \"cp big.src big.bin && mkdir small && cd small && seq -w 1 3000 | split -l 1 -a 4 -d - f\"\nartifacts = [\"big.bin\", \"small\"]\n",
    );
    let mut random = fs::File::open("/dev/urandom").unwrap().take(500_000_000);
    let mut big = fs::File::create(src.join("big.src")).unwrap();
    std::io::copy(&mut random, &mut big).unwrap();
    drop(big);
    let hex = |bytes: &[u8]| Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect::<String>();
    let mut expected = vec![(hex(&fs::read(src.join("big.src")).unwrap()), "big.bin".to_string())];
    for i in 1..=3000 {
        expected.push((hex(format!("{i:04}\n").as_bytes()), format!("small/f{:04}", i - 1)));
    }
    expected.sort_by(|a, b| a.1.cmp(&b.1));

    let out = env.path().join("out");
    let (_, err, code) = text(&reprovm_vm(&env.tmp).arg("build").arg(&src).arg("--out").arg(&out).output().unwrap());
    assert_eq!(code, 0, "{err}");
    let sums = fs::read_to_string(out.join("SHA256SUMS")).unwrap();
    let got: Vec<(String, String)> =
        sums.lines().map(|l| l.split_once("  ").map(|(h, p)| (h.to_string(), p.to_string())).unwrap()).collect();
    assert_eq!(got.len(), expected.len());
    assert!(got == expected, "SHA256SUMS differs from the host's hashes of the same bytes");
    let serial = fs::read_to_string(out.join("serial.log")).unwrap();
    assert!(!serial.contains("reboot: Power down"), "the guest was powered off, not stopped");
    assert_nothing_left(&env, "");
}
