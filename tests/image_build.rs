//! `reprovm image build` is bit-for-bit reproducible: a second build from
//! another directory, with another TZ, locale, umask, TMPDIR and store gives
//! the same bytes, and the pin printed is their SHA-256. Needs mmdebstrap and
//! the Debian mirror, so it is `#[ignore]`d and run by scripts/test.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::text;
use reprovm::image::pin::hash_file;

fn recipe() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("vm-images/debian-bookworm-amd64")
}

/// Runs `reprovm image build --out OUT` through `sh -c` (for the umask) in
/// `cwd` with exactly `env`; returns the pin printed on the last stdout line.
fn build(out: &Path, cwd: &Path, umask: &str, env: &[(&str, String)]) -> String {
    let script = format!("umask {umask} && exec \"$0\" image build \"$1\" --out \"$2\"");
    let output = Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg(env!("CARGO_BIN_EXE_reprovm"))
        .arg(recipe())
        .arg(out)
        .current_dir(cwd)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap())
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .unwrap();
    let (stdout, stderr, code) = text(&output);
    assert_eq!(code, 0, "image build failed: {stderr}");
    stdout.lines().last().unwrap_or_default().to_string()
}

#[test]
#[ignore = "runs mmdebstrap against the Debian mirror: run through scripts/test"]
fn two_builds_in_different_host_settings_give_the_same_bundle() {
    let dir = tempfile::tempdir().unwrap();
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    // First build: scripts/test's, when it made one; else a plain one here.
    let (first, first_pin) = match std::env::var_os("REPROVM_TEST_BUNDLE") {
        Some(path) => (PathBuf::from(path), std::env::var("REPROVM_TEST_IMAGE").unwrap()),
        None => {
            let out = dir.path().join("a.img");
            let pin = build(
                &out,
                Path::new(env!("CARGO_MANIFEST_DIR")),
                "022",
                &[("HOME", home.clone()), ("TZ", "UTC".into()), ("LANG", "C.UTF-8".into())],
            );
            (out, pin)
        }
    };
    let elsewhere = dir.path().join("some where/deeper");
    let tmp = dir.path().join("other tmp");
    let cache = dir.path().join("other cache");
    for d in [&elsewhere, &tmp, &cache] {
        std::fs::create_dir_all(d).unwrap();
    }
    let second = dir.path().join("b.img");
    let second_pin = build(
        &second,
        &elsewhere,
        "077",
        &[
            ("HOME", home),
            ("TZ", "Asia/Kathmandu".into()),
            ("LANG", "tr_TR.UTF-8".into()),
            ("LC_ALL", "tr_TR.UTF-8".into()),
            ("TMPDIR", tmp.display().to_string()),
            ("XDG_CACHE_HOME", cache.display().to_string()),
            ("SOURCE_DATE_EPOCH", "1".into()),
        ],
    );
    let (a, b) = (hash_file(&first).unwrap(), hash_file(&second).unwrap());
    assert_eq!(a, b, "the two bundles differ");
    assert_eq!(first_pin, a.to_string(), "the printed pin is not the bundle's SHA-256");
    assert_eq!(second_pin, b.to_string(), "the printed pin is not the bundle's SHA-256");
}
