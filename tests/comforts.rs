//! The command-line comforts, checked without a VM: shell completions and
//! man pages generated from the clap definitions (checked by bash and by
//! man(1) itself), `--json` outputs parsed back, a `--progress json` that
//! fails before any boot, and `doctor` on this host.

mod common;

use std::fs;
use std::process::{Command, Stdio};

use common::{reprovm, text, TestEnv};

#[test]
fn completions_are_valid_scripts_for_each_shell() {
    let env = TestEnv::new();
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let (out, err, code) = text(&reprovm(&env).args(["completions", shell]).output().unwrap());
        assert_eq!(code, 0, "{shell}: {err}");
        for word in ["build", "verify", "compare", "downloads", "--replay"] {
            assert!(out.contains(word), "{shell} completion lacks {word}");
        }
        assert!(!out.contains("egress-relay"), "{shell}: the internal relay is not offered");
    }
    let (script, _, _) = text(&reprovm(&env).args(["completions", "bash"]).output().unwrap());
    let path = env.path().join("reprovm.bash");
    fs::write(&path, script).unwrap();
    let check = Command::new("bash").arg("-n").arg(&path).output().unwrap();
    assert!(check.status.success(), "bash -n: {}", String::from_utf8_lossy(&check.stderr));
    let (_, err, code) = text(&reprovm(&env).args(["completions", "tcsh"]).output().unwrap());
    assert_eq!(code, 2, "an unknown shell is a usage error: {err}");
}

#[test]
fn man_pages_render_with_man() {
    let env = TestEnv::new();
    let dir = env.path().join("man");
    let (_, err, code) = text(&reprovm(&env).args(["man", "--dir"]).arg(&dir).output().unwrap());
    assert_eq!(code, 0, "{err}");
    for page in ["reprovm.1", "reprovm-build.1", "reprovm-verify.1", "reprovm-image-list.1", "reprovm-downloads-export.1"] {
        assert!(
            dir.join(page).is_file(),
            "{page} missing: {:?}",
            fs::read_dir(&dir).unwrap().flatten().map(|e| e.file_name()).collect::<Vec<_>>()
        );
    }
    let (page, _, code) = text(&reprovm(&env).arg("man").output().unwrap());
    assert_eq!(code, 0);
    let file = env.path().join("reprovm.1");
    fs::write(&file, page).unwrap();
    // man(1) itself renders it (groff underneath): an independent reader.
    let rendered =
        Command::new("man").arg("-l").arg(&file).env("MANWIDTH", "100").env("MANPAGER", "cat").stderr(Stdio::piped()).output().unwrap();
    assert!(rendered.status.success(), "{}", String::from_utf8_lossy(&rendered.stderr));
    let rendered = String::from_utf8_lossy(&rendered.stdout);
    assert!(rendered.contains("pinned, checksummed builder VM") && rendered.contains("compare"), "{rendered}");
}

#[test]
fn json_outputs_parse_back() {
    let env = TestEnv::new();
    let (out, err, code) = text(&reprovm(&env).args(["image", "list", "--json"]).output().unwrap());
    assert_eq!(code, 0, "{err}");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&out).unwrap(), serde_json::json!([]), "an empty store");

    let (a, b, c) = (env.path().join("a"), env.path().join("b"), env.path().join("c"));
    let (h1, h2) = ("1".repeat(64), "2".repeat(64));
    fs::write(&a, format!("{h1}  hello\n{h2}  tar.gz\n")).unwrap();
    fs::write(&b, format!("{h1}  hello\n{h2}  tar.gz\n")).unwrap();
    fs::write(&c, format!("{h2}  hello\n")).unwrap();
    let (out, err, code) = text(&reprovm(&env).args(["compare", "--json"]).arg(&a).arg(&b).output().unwrap());
    assert_eq!(code, 0, "{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["identical"], true);
    assert_eq!(report["artifacts"].as_array().unwrap().len(), 2);
    let (out, _, code) = text(&reprovm(&env).args(["compare", "--json"]).arg(&a).arg(&c).output().unwrap());
    assert_eq!(code, 1);
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["identical"], false);
    let statuses: Vec<(&str, &str)> =
        report["artifacts"].as_array().unwrap().iter().map(|r| (r["path"].as_str().unwrap(), r["status"].as_str().unwrap())).collect();
    assert_eq!(statuses, [("hello", "differs"), ("tar.gz", "missing")]);
    assert_eq!(report["artifacts"][0]["hashes"], serde_json::json!([h1, h2]));
    assert_eq!(report["records"][1], c.to_str().unwrap());
}

/// A `--progress json` build that fails ends its stream with one error
/// event carrying the exit code and the message of stderr; `--json` with
/// it, and `verify --attestations` (no rebuild to report), are refused.
#[test]
fn a_progress_stream_that_fails_ends_with_its_error_event() {
    let env = TestEnv::new();
    let src = env.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("reprovm.toml"), "[build]\ncommand = \"true\"\nartifacts = [\"x\"]\nbogus = 1\n").unwrap();
    let (out, err, code) = text(&reprovm(&env).arg("build").arg(&src).args(["--progress", "json"]).output().unwrap());
    assert_eq!(code, 2, "{err}");
    let lines: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 1, "{out}");
    assert_eq!((lines[0]["event"].as_str(), lines[0]["exit"].as_u64()), (Some("error"), Some(2)));
    let message = lines[0]["message"].as_str().unwrap();
    assert!(message.contains("bogus") && err.contains(message), "the message is the error of stderr: {message}\n{err}");

    let (out, err, code) = text(&reprovm(&env).arg("build").arg(&src).args(["--progress", "json", "--json"]).output().unwrap());
    assert_eq!((code, out.as_str()), (2, ""), "{err}");
    assert!(err.contains("cannot be used with"), "{err}");

    let keys = env.path().join("trusted.pub");
    fs::write(&keys, "").unwrap();
    let (out, err, code) = text(
        &reprovm(&env)
            .args(["verify", "--progress", "json", "--threshold", "1", "--attestations"])
            .arg(env.path())
            .arg("--trusted-keys")
            .arg(&keys)
            .output()
            .unwrap(),
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--attestations"), "{err}");
    assert!(out.starts_with(r#"{"event":"error","exit":2,"#) && out.lines().count() == 1, "{out}");
}

#[test]
fn doctor_says_what_this_host_can_do_and_why_kvm_cannot() {
    let env = TestEnv::new();
    let (out, err, code) = text(&reprovm(&env).arg("doctor").output().unwrap());
    assert_eq!(code, 0, "{err}");
    for label in ["QEMU", "KVM", "qemu-img", "mmdebstrap", "mkfs.ext4", "image store", "images", "download cache", "run files"] {
        assert!(out.lines().any(|l| l.starts_with(label)), "no {label} line in {out}");
    }
    let kvm = out.lines().find(|l| l.starts_with("KVM")).unwrap();
    // Here /dev/kvm cannot run the pinned machine; a host where it can says so.
    let usable = kvm.contains("QEMU accepts");
    let why = kvm.split_once("not usable: ").map(|(_, why)| why.trim()).unwrap_or_default();
    assert!(usable || why.len() > 10, "KVM's line says why it is not usable: {kvm}");
    assert!(out.contains("none: run `reprovm image build`"), "an empty store says what to do: {out}");
}

/// Colour in the logs only on a terminal (a pseudo-terminal from script(1))
/// and never with NO_COLOR; `--quiet` and `--verbose` exclude each other.
#[test]
fn colour_only_on_a_terminal_and_never_with_no_color() {
    let env = TestEnv::new();
    let command = format!("{} -v doctor", shlex::try_quote(env!("CARGO_BIN_EXE_reprovm")).unwrap());
    let on_terminal = |no_color: Option<&str>| {
        let mut script = Command::new("script");
        script.args(["-qec", &command, "/dev/null"]).env("XDG_CACHE_HOME", &env.cache).env("TMPDIR", &env.tmp).env_remove("NO_COLOR");
        if let Some(value) = no_color {
            script.env("NO_COLOR", value);
        }
        let out = script.stdin(Stdio::null()).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let coloured = on_terminal(None);
    assert!(coloured.contains("\x1b[") && coloured.contains("DEBUG"), "debug lines in colour on a terminal: {coloured:?}");
    let plain = on_terminal(Some("1"));
    assert!(plain.contains("DEBUG") && !plain.contains('\x1b'), "NO_COLOR=1: {plain:?}");
    // An empty NO_COLOR does not count (https://no-color.org).
    assert!(on_terminal(Some("")).contains("\x1b["));
    let (_, err, _) = text(&reprovm(&env).args(["-v", "doctor"]).env_remove("NO_COLOR").output().unwrap());
    assert!(err.contains("DEBUG") && !err.contains('\x1b'), "piped: {err:?}");

    let (_, err, code) = text(&reprovm(&env).args(["-q", "-v", "doctor"]).output().unwrap());
    assert_eq!(code, 2, "--quiet with --verbose is a usage error: {err}");
}
