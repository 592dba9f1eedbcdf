//! One real command per exit code of the table in src/exit.rs (and
//! README's "Exit codes"). Only the code for a failed build needs a VM
//! (`#[ignore]`d, run by scripts/test).

mod common;

use std::fs;
use std::time::Duration;

use common::{reprovm, reprovm_vm, small_bundle, spawn_with_stderr_lines, text, TestEnv};

/// The recorded result of examples/hello (tests/interop), and a copy of it
/// whose `hello` has another hash.
fn two_results(env: &TestEnv) -> (std::path::PathBuf, std::path::PathBuf) {
    let ours = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/hello-result.json");
    let mut theirs: serde_json::Value = serde_json::from_str(&fs::read_to_string(&ours).unwrap()).unwrap();
    let outputs = theirs["outputs"].as_array_mut().unwrap();
    let hello = outputs.iter_mut().find(|o| o["path"] == "hello").unwrap();
    hello["sha256"] = serde_json::Value::String("0".repeat(64));
    let theirs_file = env.path().join("theirs.json");
    fs::write(&theirs_file, serde_json::to_string_pretty(&theirs).unwrap()).unwrap();
    (ours, theirs_file)
}

#[test]
fn exit_0_the_same_result_twice_is_identical() {
    let env = TestEnv::new();
    let (ours, _) = two_results(&env);
    let (_, err, code) = text(&reprovm(&env).arg("compare").arg(&ours).arg(&ours).output().unwrap());
    assert_eq!(code, 0, "{err}");
}

#[test]
fn exit_1_results_whose_artifacts_differ() {
    let env = TestEnv::new();
    let (ours, theirs) = two_results(&env);
    let (out, err, code) = text(&reprovm(&env).arg("compare").arg(&ours).arg(&theirs).output().unwrap());
    assert_eq!(code, 1, "{out}{err}");
}

#[test]
fn exit_2_a_recipe_with_an_unknown_field() {
    let env = TestEnv::new();
    let src = env.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("reprovm.toml"), "[build]\ncommand = \"true\"\nartifacts = [\"x\"]\ncomand = \"typo\"\n").unwrap();
    let (_, err, code) = text(&reprovm(&env).arg("build").arg(&src).output().unwrap());
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("comand"), "{err}");
}

#[test]
fn exit_3_an_import_whose_bytes_are_not_its_pin() {
    let env = TestEnv::new();
    let bundle = small_bundle(env.path());
    let (_, err, code) = text(&reprovm(&env).args(["image", "import"]).arg(&bundle).args(["--sha256", &"ab".repeat(32)]).output().unwrap());
    assert_eq!(code, 3, "{err}");
}

#[test]
fn exit_4_a_download_that_cannot_connect() {
    let env = TestEnv::new();
    // A port nothing listens on: bound, then closed.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{port}/bundle.img");
    let (_, err, code) = text(&reprovm(&env).args(["image", "fetch", &url, "--sha256", &"ab".repeat(32)]).output().unwrap());
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("cannot download"), "{err}");
}

#[test]
#[ignore = "boots a VM: run through scripts/test"]
fn exit_5_a_build_command_that_fails() {
    let env = TestEnv::new();
    let src = env.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("reprovm.toml"), "[machine]\ncpus = 1\nmemory_mib = 512\n[build]\ncommand = \"exit 7\"\nartifacts = [\"x\"]\n")
        .unwrap();
    let (_, err, code) = text(&reprovm_vm(&env.tmp).arg("build").arg(&src).arg("--out").arg(env.path().join("out")).output().unwrap());
    assert_eq!(code, 5, "{err}");
    assert!(err.contains("the build command failed with status 7"), "{err}");
}

#[test]
fn exit_130_sigint_while_a_download_waits() {
    let env = TestEnv::new();
    // A server that accepts and never answers.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/bundle.img", listener.local_addr().unwrap());
    let (mut child, _stderr) = spawn_with_stderr_lines(reprovm(&env).args(["image", "fetch", &url, "--sha256", &"ab".repeat(32)]));
    // Connected: reprovm's signal handlers are in place, and it waits for
    // an answer that never comes.
    let _held = listener.accept().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    common::signal(&child, nix::sys::signal::Signal::SIGINT);
    assert_eq!(child.wait_within(Duration::from_secs(120)).code(), Some(130));
}
