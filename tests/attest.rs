//! Attestations end to end, through the real binary and without a VM:
//! reprovm's signed provenance checked by the in-toto reference
//! implementation and the attestation bindings (tests/interop/intoto.py, in
//! the venv of scripts/install-interop-python, found through
//! REPROVM_TEST_PYTHON), an envelope made by that implementation verified by
//! reprovm, three rebuilders of whom two agree, and every tampering an
//! attacker can try on an envelope, an artifact or the published list —
//! each written as the attack, each with its verdict and exit code.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{reprovm, text, TestEnv};
use reprovm::attest::statement;
use reprovm::rebuild::BuildResult;

/// The in-toto side's interpreter: None (skipped, with the reason printed)
/// without REPROVM_TEST_PYTHON, except under REPROVM_REQUIRE_VM=1 (CI).
fn python() -> Option<PathBuf> {
    match std::env::var_os("REPROVM_TEST_PYTHON") {
        Some(p) if !p.is_empty() => Some(PathBuf::from(p)),
        _ if std::env::var("REPROVM_REQUIRE_VM").as_deref() == Ok("1") => {
            panic!("REPROVM_TEST_PYTHON is unset and REPROVM_REQUIRE_VM=1: run scripts/install-interop-python (scripts/test does)")
        }
        _ => {
            eprintln!("SKIPPED: REPROVM_TEST_PYTHON is unset (export REPROVM_TEST_PYTHON=\"$(scripts/install-interop-python)\")");
            None
        }
    }
}

/// Runs tests/interop/intoto.py; (success, stderr).
fn intoto(python: &Path, args: &[&dyn AsRef<std::ffi::OsStr>]) -> (bool, String) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/intoto.py");
    let out = Command::new(python).arg(script).args(args.iter().map(|a| a.as_ref())).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// examples/hello's result.json, its artifacts being files written into
/// `published` (the project's release directory).
fn hello_result(published: &Path) -> BuildResult {
    let mut result: BuildResult =
        serde_json::from_str(&fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/hello-result.json")).unwrap())
            .unwrap();
    fs::create_dir_all(published).unwrap();
    for artifact in &mut result.outputs {
        let bytes = format!("the bytes of {} as released\n", artifact.path).into_bytes();
        fs::write(published.join(&artifact.path), &bytes).unwrap();
        artifact.size = bytes.len() as u64;
        artifact.sha256 = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes));
    }
    result
}

/// `sha256sum` of the files in `dir`, as a project publishes it.
fn sha256sum(dir: &Path, names: &[&str]) -> PathBuf {
    let out = Command::new("sha256sum").args(names).current_dir(dir).output().unwrap();
    assert!(out.status.success());
    fs::write(dir.join("SHA256SUMS"), &out.stdout).unwrap();
    dir.join("SHA256SUMS")
}

/// An OpenSSH Ed25519 key made by ssh-keygen, as rebuilders have them:
/// (private key file, public key file, fingerprint).
fn keygen(dir: &Path, name: &str, passphrase: &str) -> (PathBuf, PathBuf, String) {
    let key = dir.join(name);
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", passphrase, "-C", &format!("{name}@example.org"), "-f"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let fp = Command::new("ssh-keygen").args(["-l", "-E", "sha256", "-f"]).arg(&key).output().unwrap();
    let fingerprint = String::from_utf8_lossy(&fp.stdout).split_whitespace().nth(1).unwrap().to_string();
    (key.clone(), key.with_extension("pub"), fingerprint)
}

/// A build output directory as `reprovm build` leaves it: SHA256SUMS and
/// provenance.intoto.json for `result`.
fn output_dir(dir: &Path, result: &BuildResult) -> PathBuf {
    fs::create_dir_all(dir).unwrap();
    fs::write(dir.join("SHA256SUMS"), reprovm::rebuild::artifacts::sha256sums(&result.outputs)).unwrap();
    let t = time::OffsetDateTime::now_utc();
    let s = statement::provenance(result, t - time::Duration::seconds(12), t, &statement::invocation_id());
    fs::write(dir.join("provenance.intoto.json"), s.to_file_bytes()).unwrap();
    dir.to_path_buf()
}

fn sign(env: &TestEnv, key: &Path, out_dir: &Path) -> PathBuf {
    let (_, err, code) = text(&reprovm(env).args(["attest", "sign", "--key"]).arg(key).arg(out_dir).output().unwrap());
    assert_eq!(code, 0, "{err}");
    out_dir.join("provenance.intoto.dsse.json")
}

/// `reprovm verify --attestations DIR --trusted-keys KEYS --threshold N [extra]`: (stdout, stderr, code).
fn verify(env: &TestEnv, dir: &Path, keys: &Path, threshold: u32, extra: &[&dyn AsRef<std::ffi::OsStr>]) -> (String, String, i32) {
    let mut cmd = reprovm(env);
    cmd.arg("verify").arg("--attestations").arg(dir).arg("--trusted-keys").arg(keys).arg("--threshold").arg(threshold.to_string());
    cmd.args(extra.iter().map(|a| a.as_ref())).current_dir(env.path());
    let (out, err, code) = text(&cmd.output().unwrap());
    assert!(!err.contains("panicked"), "{err}");
    (out, err, code)
}

fn trusted_keys(env: &TestEnv, publics: &[&Path]) -> PathBuf {
    let file = env.path().join("trusted-keys");
    let lines: String = publics.iter().map(|p| fs::read_to_string(p).unwrap()).collect();
    fs::write(&file, format!("# the project's trusted rebuilders\n{lines}")).unwrap();
    file
}

#[test]
fn reprovm_s_signed_provenance_passes_the_in_toto_reference_implementation_and_the_slsa_bindings() {
    let Some(py) = python() else { return };
    let env = TestEnv::new();
    let (key, public, _) = keygen(env.path(), "alice", "");
    let (_, other, _) = keygen(env.path(), "mallory", "");
    let out = output_dir(&env.path().join("out"), &hello_result(&env.path().join("published")));
    let envelope = sign(&env, &key, &out);

    let (ok, err) = intoto(&py, &[&"check-statement", &out.join("provenance.intoto.json")]);
    assert!(ok, "the attestation bindings refuse reprovm's statement: {err}");
    let (ok, err) = intoto(&py, &[&"verify", &envelope, &public]);
    assert!(ok, "in-toto does not verify reprovm's envelope: {err}");
    println!("in-toto verified reprovm's envelope; the bindings accept its Statement v1 and SLSA Provenance v1");

    // The checkers can fail: another key, a statement missing a required field.
    let (ok, _) = intoto(&py, &[&"verify", &envelope, &other]);
    assert!(!ok, "in-toto verified with the wrong key");
    let mut broken: serde_json::Value = serde_json::from_slice(&fs::read(out.join("provenance.intoto.json")).unwrap()).unwrap();
    broken["predicate"]["buildDefinition"].as_object_mut().unwrap().remove("buildType");
    fs::write(env.path().join("broken.json"), broken.to_string()).unwrap();
    let (ok, err) = intoto(&py, &[&"check-statement", &env.path().join("broken.json")]);
    assert!(!ok && err.contains("buildType"), "{err}");
    broken["predicate"]["buildDefinition"]["buildType"] = statement::BUILD_TYPE.into();
    broken["predicate"]["runDetails"]["surprise"] = 1.into();
    fs::write(env.path().join("broken.json"), broken.to_string()).unwrap();
    let (ok, err) = intoto(&py, &[&"check-statement", &env.path().join("broken.json")]);
    assert!(!ok && err.contains("surprise"), "an unknown field passes the strict parse: {err}");
}

#[test]
fn an_envelope_signed_by_the_in_toto_reference_implementation_is_verified_by_reprovm() {
    let Some(py) = python() else { return };
    let env = TestEnv::new();
    let (key, public, fingerprint) = keygen(env.path(), "python", "");
    let ours = output_dir(&env.path().join("ours"), &hello_result(&env.path().join("published")));
    let dir = env.path().join("attestations");
    fs::create_dir(&dir).unwrap();
    let theirs = dir.join("python.dsse.json");
    let (ok, err) = intoto(&py, &[&"sign", &ours.join("SHA256SUMS"), &key, &theirs]);
    assert!(ok, "{err}");
    let keys = trusted_keys(&env, &[&public]);
    let (table, err, code) = verify(&env, &dir, &keys, 1, &[&"--expect", &ours.join("SHA256SUMS")]);
    assert_eq!(code, 0, "{table}{err}");
    assert!(table.contains(&format!("accepted: signed by {fingerprint} (python@example.org)")), "{table}");
    for artifact in ["hello", "buildinfo.txt"] {
        let row = table.lines().find(|l| l.starts_with(&fingerprint) && l.contains(artifact)).unwrap_or_else(|| panic!("{table}"));
        assert!(row.ends_with("identical") && row.contains(" - "), "a foreign build type has no image or QEMU: {row}");
    }
    // compare reads its envelope beside reprovm's own provenance.
    let ours_signed = sign(&env, &keygen(env.path(), "alice", "").0, &ours);
    let (out, err, code) = text(&reprovm(&env).arg("compare").arg(&theirs).arg(&ours_signed).output().unwrap());
    assert_eq!(code, 0, "{out}{err}");
    println!("reprovm verified in-toto's envelope:\n{table}");
}

#[test]
fn three_rebuilders_two_agree_threshold_two_passes_and_three_fails_naming_the_dissenter_and_the_artifact() {
    let env = TestEnv::new();
    let published = hello_result(&env.path().join("published"));
    let mut dissent = published.clone();
    dissent.outputs[1].sha256 = "0".repeat(64);
    dissent.machine.launched.accelerator = reprovm::vm::Accelerator::Kvm;
    let dir = env.path().join("attestations");
    fs::create_dir(&dir).unwrap();
    let mut publics = Vec::new();
    let mut fingerprints = Vec::new();
    for (name, result) in [("alice", &published), ("bob", &published), ("carol", &dissent)] {
        let (key, public, fingerprint) = keygen(env.path(), name, "");
        let out = output_dir(&env.path().join(format!("out-{name}")), result);
        fs::copy(sign(&env, &key, &out), dir.join(format!("{name}.dsse.json"))).unwrap();
        publics.push(public);
        fingerprints.push(fingerprint);
    }
    let keys = trusted_keys(&env, &publics.iter().map(PathBuf::as_path).collect::<Vec<_>>());
    let sums = sha256sum(&env.path().join("published"), &["hello", "buildinfo.txt"]);

    let (table, err, code) = verify(&env, &dir, &keys, 2, &[&"--expect", &sums]);
    assert_eq!(code, 0, "{table}{err}");
    assert!(err.contains("threshold 2 met"), "{err}");
    println!("threshold 2:\n{table}{err}");

    let vsa = env.path().join("vsa.json");
    let (table, err, code) = verify(&env, &dir, &keys, 3, &[&"--expect", &sums, &"--vsa", &vsa]);
    assert_eq!(code, 1, "{table}{err}");
    let carol = &fingerprints[2];
    let row = table.lines().find(|l| l.starts_with(carol.as_str()) && l.contains("hello")).unwrap_or_else(|| panic!("{table}"));
    assert!(row.ends_with("DIFFERS") && row.contains("kvm"), "{row}");
    assert!(
        table.lines().any(|l| l.starts_with("hello: 2 of 3") && l.contains(&format!("DIFFERS: {carol} (carol@example.org)"))),
        "{table}"
    );
    assert!(table.lines().any(|l| l.starts_with("buildinfo.txt: 3 of 3")), "{table}");
    assert!(err.contains("threshold 3 not met for hello (2)"), "{err}");
    println!("threshold 3:\n{table}{err}");
    let summary: serde_json::Value = serde_json::from_slice(&fs::read(&vsa).unwrap()).unwrap();
    assert_eq!(summary["predicate"]["verificationResult"], "FAILED");
    if let Some(py) = python() {
        let (ok, err) = intoto(&py, &[&"check-statement", &vsa, &"--vsa"]);
        assert!(ok, "{err}");
    }

    // Without --expect the reference is the majority: alice and bob.
    let (table, err, code) = verify(&env, &dir, &keys, 2, &[]);
    assert_eq!(code, 0, "{table}{err}");
    // A signed summary of a passing check, verifiable like any envelope.
    let alice_key = env.path().join("alice");
    let (table, err, code) = verify(&env, &dir, &keys, 2, &[&"--expect", &sums, &"--vsa", &vsa, &"--sign", &alice_key]);
    assert_eq!(code, 0, "{table}{err}");
    let (_, payload) = reprovm::attest::dsse::Envelope::parse(&fs::read(&vsa).unwrap()).unwrap();
    let summary: serde_json::Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(summary["predicate"]["verificationResult"], "PASSED");
    assert_eq!(summary["predicate"]["inputAttestations"].as_array().unwrap().len(), 3);
    if let Some(py) = python() {
        let (ok, err) = intoto(&py, &[&"verify", &vsa, &publics[0], &"--vsa"]);
        assert!(ok, "in-toto does not verify reprovm's signed summary: {err}");
    }
}

#[test]
fn every_tampered_envelope_artifact_or_list_fails_with_a_clear_verdict() {
    let env = TestEnv::new();
    let (key, public, fingerprint) = keygen(env.path(), "alice", "");
    let (stranger, _, stranger_fp) = keygen(env.path(), "stranger", "");
    let keys = trusted_keys(&env, &[&public]);
    let published = env.path().join("published");
    let result = hello_result(&published);
    let out = output_dir(&env.path().join("out"), &result);
    let sums = sha256sum(&published, &["buildinfo.txt", "hello"]);
    let good = fs::read(sign(&env, &key, &out)).unwrap();
    let text_of = String::from_utf8(good.clone()).unwrap();
    let envelope: serde_json::Value = serde_json::from_str(&text_of).unwrap();
    let field = |name: &str| envelope.pointer(name).unwrap().as_str().unwrap().to_string();
    // One byte changed inside a field, to another character of the same alphabet.
    let change_in = |value: &str| {
        let at = text_of.find(value).unwrap() + value.len() / 2;
        let mut bytes = good.clone();
        bytes[at] = if bytes[at] == b'A' { b'B' } else { b'A' };
        bytes
    };
    let unknown = {
        let o = output_dir(&env.path().join("other"), &result);
        fs::read(sign(&env, &stranger, &o)).unwrap()
    };
    let mut oversized = good.clone();
    oversized.resize((16 << 20) + 1, b' ');
    let wrong_type = text_of.replace("application/vnd.in-toto+json", "application/vnd.in-toto+jsom").into_bytes();
    let cases: Vec<(&str, Vec<u8>, String)> = vec![
        ("a byte of the payload", change_in(&field("/payload")), format!("BAD SIGNATURE: {fingerprint}'s signature does not verify")),
        ("a byte of the signature", change_in(&field("/signatures/0/sig")), format!("BAD SIGNATURE: {fingerprint}")),
        ("a byte of the keyid", change_in(&fingerprint["SHA256:".len()..]), "UNKNOWN KEY: signed by SHA256:".into()),
        ("a byte of the payload type", wrong_type, "WRONG PAYLOAD TYPE: payload type \"application/vnd.in-toto+jsom\"".into()),
        ("truncated", good[..good.len() / 2].to_vec(), "MALFORMED: not a DSSE envelope".into()),
        ("oversized", oversized, "UNREADABLE: larger than 16 MiB: refused unread".into()),
        ("an unknown key", unknown, format!("UNKNOWN KEY: signed by {stranger_fp}, not in the trusted keys")),
    ];
    for (what, bytes, verdict) in &cases {
        let dir = env.path().join("case");
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join("x.dsse.json"), bytes).unwrap();
        let (table, err, code) = verify(&env, &dir, &keys, 1, &[&"--expect", &sums]);
        assert_eq!(code, 1, "{what}: {table}{err}");
        let line = table.lines().find(|l| l.starts_with("x.dsse.json")).unwrap_or_else(|| panic!("{what}: {table}"));
        assert!(line.contains(verdict.as_str()), "{what}: {line}");
        assert!(err.contains("threshold 1 not met"), "{what}: {err}");
        println!("{what}: {line}");
    }

    // The published bytes: an artifact changed by one byte (and the list
    // a project would publish for it), or the list changed by one digit.
    let dir = env.path().join("good");
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join("alice.dsse.json"), &good).unwrap();
    let (_, err, code) = verify(&env, &dir, &keys, 1, &[&"--expect", &sums]);
    assert_eq!(code, 0, "{err}");
    let changed = env.path().join("changed");
    fs::create_dir(&changed).unwrap();
    for name in ["buildinfo.txt", "hello"] {
        fs::copy(published.join(name), changed.join(name)).unwrap();
    }
    let mut hello = fs::read(changed.join("hello")).unwrap();
    hello[3] ^= 0x20;
    fs::write(changed.join("hello"), hello).unwrap();
    let changed_sums = sha256sum(&changed, &["buildinfo.txt", "hello"]);
    let sums_text = fs::read_to_string(&sums).unwrap();
    let at = sums_text.find(&result.outputs[0].sha256).unwrap() + 10;
    let mut digit = sums_text.into_bytes();
    digit[at] = if digit[at] == b'0' { b'1' } else { b'0' };
    let digit_sums = env.path().join("SHA256SUMS.digit");
    fs::write(&digit_sums, digit).unwrap();
    for (what, list, artifact) in [("an artifact", &changed_sums, "hello"), ("the expected list", &digit_sums, "buildinfo.txt")] {
        let (table, err, code) = verify(&env, &dir, &keys, 1, &[&"--expect", list]);
        assert_eq!(code, 1, "{what}: {table}{err}");
        let row = table.lines().find(|l| l.starts_with(&fingerprint) && l.contains(artifact)).unwrap();
        assert!(row.ends_with("DIFFERS"), "{what}: {row}");
        assert!(err.contains(&format!("threshold 1 not met for {artifact} (0)")), "{what}: {err}");
        println!("{what} changed by one byte: {row}");
    }
}

#[test]
fn unreadable_inputs_exit_2_and_verify_attestations_needs_no_source() {
    let env = TestEnv::new();
    let (key, public, _) = keygen(env.path(), "alice", "");
    let keys = trusted_keys(&env, &[&public]);
    let out = output_dir(&env.path().join("out"), &hello_result(&env.path().join("published")));
    let dir = env.path().join("attestations");
    fs::create_dir(&dir).unwrap();
    fs::copy(sign(&env, &key, &out), dir.join("a.dsse.json")).unwrap();
    // A link to an envelope elsewhere and a FIFO (which would hang a
    // reader) beside it: rejected, not followed, not waited on.
    std::os::unix::fs::symlink(out.join("provenance.intoto.dsse.json"), dir.join("link.json")).unwrap();
    assert!(Command::new("mkfifo").arg(dir.join("fifo.json")).status().unwrap().success());
    // No SRC, no recipe in the working directory, an image pin from the environment: nothing boots.
    let (table, err, code) = verify(&env, &dir, &keys, 1, &[]);
    assert_eq!(code, 0, "{table}{err}");
    for name in ["link.json", "fifo.json"] {
        let line = table.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("{table}"));
        assert!(line.contains("UNREADABLE: not a regular file (links are not followed)"), "{line}");
    }
    let bad_keys = env.path().join("bad-keys");
    fs::write(&bad_keys, "ssh-ed25519 not-base64 x\n").unwrap();
    let huge = env.path().join("huge");
    fs::File::create(&huge).unwrap().set_len((16 << 20) + 1).unwrap();
    for (what, dir_arg, keys_arg, extra, needle) in [
        ("a missing directory", env.path().join("nowhere"), keys.clone(), None, "cannot list"),
        ("a bad trusted-keys file", dir.clone(), bad_keys.clone(), None, "bad-keys:1:"),
        ("a missing --expect", dir.clone(), keys.clone(), Some(env.path().join("SHA256SUMS.absent")), "SHA256SUMS.absent"),
        ("an oversized --expect", dir.clone(), keys.clone(), Some(huge.clone()), "refused unread"),
    ] {
        let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = Vec::new();
        if let Some(e) = &extra {
            args.push(&"--expect");
            args.push(e);
        }
        let (_, err, code) = verify(&env, &dir_arg, &keys_arg, 1, &args);
        assert_eq!(code, 2, "{what}: {err}");
        assert!(err.contains(needle), "{what}: {err}");
    }
    // A source directory or a build flag with --attestations is a usage error, as is a missing threshold.
    for args in [
        vec!["verify", "--attestations", "d", "--trusted-keys", "k", "--threshold", "1", "."],
        vec!["verify", "--attestations", "d", "--trusted-keys", "k", "--threshold", "1", "--cpus", "4"],
        vec!["verify", "--attestations", "d", "--trusted-keys", "k"],
        vec!["verify", "--attestations", "d", "--trusted-keys", "k", "--threshold", "0"],
        vec!["verify", "--attestations", "d", "--trusted-keys", "k", "--threshold", "1", "--sign", "key"],
        vec!["verify", "."],
    ] {
        let (_, err, code) = text(&reprovm(&env).args(&args).env("REPROVM_IMAGE", format!("sha256:{}", "a".repeat(64))).output().unwrap());
        assert_eq!(code, 2, "{args:?}: {err}");
    }
}

#[test]
fn an_encrypted_key_needs_its_passphrase_and_never_prompts_without_a_terminal() {
    let env = TestEnv::new();
    let (key, public, fingerprint) = keygen(env.path(), "alice", "correct horse");
    let out = output_dir(&env.path().join("out"), &hello_result(&env.path().join("published")));
    let sign_with = |pass: Option<&str>| {
        let mut cmd = reprovm(&env);
        cmd.args(["attest", "sign", "--key"]).arg(&key).arg(&out).env_remove("REPROVM_KEY_PASSPHRASE");
        if let Some(p) = pass {
            cmd.env("REPROVM_KEY_PASSPHRASE", p);
        }
        text(&cmd.stdin(std::process::Stdio::null()).output().unwrap())
    };
    let (_, err, code) = sign_with(None);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains(&key.display().to_string()) && err.contains("REPROVM_KEY_PASSPHRASE"), "{err}");
    let (_, err, code) = sign_with(Some("wrong"));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("wrong passphrase") && !err.contains("correct horse"), "{err}");
    let (_, err, code) = sign_with(Some("correct horse"));
    assert_eq!(code, 0, "{err}");
    assert!(err.contains(&fingerprint) && !err.contains("correct horse"), "{err}");
    let dir = env.path().join("attestations");
    fs::create_dir(&dir).unwrap();
    fs::copy(out.join("provenance.intoto.dsse.json"), dir.join("a.json")).unwrap();
    let (table, err, code) = verify(&env, &dir, &trusted_keys(&env, &[&public]), 1, &[&"--expect", &out.join("SHA256SUMS")]);
    assert_eq!(code, 0, "{table}{err}");

    // A statement whose subjects are not the SHA256SUMS beside it is not signed.
    let mut sums = fs::read_to_string(out.join("SHA256SUMS")).unwrap();
    sums.push_str(&format!("{}  extra\n", "1".repeat(64)));
    fs::write(out.join("SHA256SUMS"), sums).unwrap();
    let (_, err, code) = sign_with(Some("correct horse"));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("not the artifacts of"), "{err}");
}

#[test]
fn escape_sequences_in_envelopes_never_reach_the_terminal() {
    let env = TestEnv::new();
    let (key, public, _) = keygen(env.path(), "alice", "");
    let keys = trusted_keys(&env, &[&public]);
    let osc52 = "\u{1b}]52;c;ZXZpbA==\u{7}";
    // A trusted rebuilder's statement naming an artifact with escapes, a
    // forged keyid with escapes, and an envelope file name with escapes.
    let mut result = hello_result(&env.path().join("published"));
    result.outputs[0].path = format!("{osc52}all artifacts are identical\r");
    result.machine.launched.qemu_version = format!("7.2{osc52}");
    let out = output_dir(&env.path().join("out"), &result);
    fs::remove_file(out.join("SHA256SUMS")).unwrap();
    let dir = env.path().join("attestations");
    fs::create_dir(&dir).unwrap();
    fs::copy(sign(&env, &key, &out), dir.join(format!("{osc52}.json"))).unwrap();
    let mut forged: serde_json::Value = serde_json::from_slice(&fs::read(out.join("provenance.intoto.dsse.json")).unwrap()).unwrap();
    forged["signatures"][0]["keyid"] = format!("SHA256:{osc52}").into();
    fs::write(dir.join("forged.json"), forged.to_string()).unwrap();
    let (table, err, code) = verify(&env, &dir, &keys, 1, &[]);
    assert_eq!(code, 0, "{table}{err}");
    for text in [&table, &err] {
        assert!(!text.contains('\u{1b}') && !text.contains('\u{7}') && !text.contains('\r'), "raw control characters: {text:?}");
    }
    assert!(table.contains("\\x1b]52;c;ZXZpbA==\\x07.json") && table.contains("UNKNOWN KEY: signed by SHA256:\\x1b]52"), "{table}");
    assert!(table.contains("\\x1b]52;c;ZXZpbA==\\x07all artifacts are identical\\x0d"), "{table}");
    let (out, err, _) =
        text(&reprovm(&env).arg("compare").arg(dir.join(format!("{osc52}.json"))).arg(dir.join("forged.json")).output().unwrap());
    assert!(!out.contains('\u{1b}') && !err.contains('\u{1b}'), "{out:?}{err:?}");
}
