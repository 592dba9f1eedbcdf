//! Build-time downloads through the allow-listed, recording egress proxy,
//! each test written as what a build (or a hostile recipe) would try: a
//! package installed with apt-get from the Debian mirror, the host's own
//! services and hosts off the list out of reach, an origin whose bytes
//! change under a rebuild, and an offline replay of the first build. VM
//! tests are `#[ignore]`d and run by scripts/test; the checks of the command
//! line need no VM.

mod common;

use std::fs;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use common::{assert_nothing_left, reprovm, reprovm_vm, test_image, text, TestEnv};

/// A plain source tree holding only `recipe` as its reprovm.toml.
fn source_tree(env: &TestEnv, name: &str, recipe: &str) -> PathBuf {
    let src = env.path().join(name);
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("reprovm.toml"), recipe).unwrap();
    src
}

/// An HTTP origin on 127.0.0.1 that answers every request with `body` (which
/// the test may change) and counts the requests it saw.
struct Origin {
    port: u16,
    body: Arc<Mutex<Vec<u8>>>,
    requests: Arc<AtomicUsize>,
    listener: Option<TcpListener>,
}

impl Origin {
    fn start(body: &[u8]) -> Origin {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let (body, requests) = (Arc::new(Mutex::new(body.to_vec())), Arc::new(AtomicUsize::new(0)));
        let server = listener.try_clone().unwrap();
        let (b, r) = (body.clone(), requests.clone());
        std::thread::spawn(move || {
            for mut stream in server.incoming().map_while(Result::ok) {
                r.fetch_add(1, Ordering::SeqCst);
                let mut head = [0u8; 4096];
                let _ = stream.read(&mut head);
                let body = b.lock().unwrap().clone();
                let _ = write!(stream, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
                let _ = stream.write_all(&body);
            }
        });
        Origin { port, body, requests, listener: Some(listener) }
    }

    fn set_body(&self, body: &[u8]) {
        *self.body.lock().unwrap() = body.to_vec();
    }

    /// Closes the listening socket: connections are refused from now on.
    fn stop(&mut self) {
        if let Some(listener) = self.listener.take() {
            // SAFETY: shutdown(2) on a descriptor this value owns.
            unsafe { libc::shutdown(std::os::fd::AsRawFd::as_raw_fd(&listener), libc::SHUT_RDWR) };
        }
    }
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap()
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// The download cache of the store the VM tests use.
fn download_cache() -> PathBuf {
    test_image().1.join("reprovm/downloads")
}

#[test]
#[ignore = "boots a VM and fetches from the Debian mirror: run through scripts/test"]
fn apt_installs_a_package_through_the_proxy_and_nothing_else_is_reachable() {
    let env = TestEnv::new();
    // A service of this host on its loopback: a build must never reach it.
    let host_service = Origin::start(b"a secret of the host\n");
    let port = host_service.port;
    let recipe = format!(
        r#"[build]
command = """
set -u
hello > hello.out
probe() {{ if timeout 10 "$@" > /dev/null 2>&1; then echo reached; else echo refused; fi; }}
echo "direct host loopback: $(probe env -u http_proxy busybox wget -q -O - http://10.0.2.2:{port}/)" > probes.txt
echo "proxy host loopback: $(probe busybox wget -q -O - http://127.0.0.1:{port}/)" >> probes.txt
echo "proxy localhost: $(probe busybox wget -q -O - http://localhost:{port}/)" >> probes.txt
echo "proxy not allowed: $(probe busybox wget -q -O - http://example.org/)" >> probes.txt
"""
provision = [
  "apt-get -o Acquire::Check-Date=false -o Acquire::Languages=none update",
  "apt-get install -y --no-install-recommends hello",
]
artifacts = ["hello.out", "probes.txt"]
timeout_secs = 1200
[build.network]
allow = ["deb.debian.org"]
"#
    );
    let src = source_tree(&env, "src", &recipe);
    let out = env.path().join("out");
    let (_, err, code) = text(&reprovm_vm(&env.tmp).arg("build").arg(&src).arg("--out").arg(&out).output().unwrap());
    assert_eq!(code, 0, "{err}");
    assert_eq!(fs::read_to_string(out.join("hello.out")).unwrap(), "Hello, world!\n", "the package from the mirror runs");
    let probes = fs::read_to_string(out.join("probes.txt")).unwrap();
    for line in probes.lines() {
        assert!(line.ends_with("refused"), "{probes}");
    }
    assert_eq!(host_service.requests.load(Ordering::SeqCst), 0, "the host's own service saw a connection");

    let result = json(&out.join("result.json"));
    assert_eq!(result["machine"]["network"], "egress");
    let downloads = result["inputs"]["downloads"].as_array().unwrap();
    let deb = downloads
        .iter()
        .find(|d| d["url"].as_str().unwrap().contains("/pool/main/h/hello/hello_"))
        .unwrap_or_else(|| panic!("the package is recorded: {downloads:#?}"));
    assert_eq!(deb["status"], 200);
    assert!(downloads.iter().any(|d| d["url"].as_str().unwrap().ends_with("/dists/bookworm/InRelease")), "{downloads:#?}");
    for d in downloads {
        assert!(d["url"].as_str().unwrap().starts_with("http://deb.debian.org/"), "only the allowed host: {d}");
        let sha = d["sha256"].as_str().unwrap();
        let cached = fs::read(download_cache().join(sha)).unwrap_or_else(|e| panic!("{sha} not in the download cache: {e}"));
        assert_eq!(sha256_hex(&cached), sha, "the cache holds the recorded bytes");
        assert_eq!(cached.len() as u64, d["size"].as_u64().unwrap());
    }
    let keys: Vec<(&str, &str)> = downloads.iter().map(|d| (d["method"].as_str().unwrap(), d["url"].as_str().unwrap())).collect();
    assert!(keys.windows(2).all(|w| w[0] <= w[1]), "downloads are sorted: {keys:?}");
    let refused: Vec<String> = result["egress"]["refused"].as_array().unwrap().iter().map(|r| r["target"].to_string()).collect();
    for target in [format!("127.0.0.1:{port}"), format!("localhost:{port}"), "example.org".to_string()] {
        assert!(refused.iter().any(|r| r.contains(&target)), "{target} not among the refused: {refused:?}");
    }
    assert!(err.contains("egress: 3 requests refused"), "refusals are in the summary: {err}");
    assert_nothing_left(&env, "after an egress build");
}

#[test]
#[ignore = "boots four VMs: run through scripts/test"]
fn a_changed_origin_changes_the_rebuild_and_replay_gives_the_first_bytes_offline() {
    let env = TestEnv::new();
    // Bytes of this run only, so that no earlier run's cache entry helps.
    let nonce = format!("{:?}", std::time::SystemTime::now());
    let first = format!("release tarball, first state {nonce}\n");
    let mut origin = Origin::start(first.as_bytes());
    let url = format!("http://127.0.0.1:{}/data.bin", origin.port);
    let recipe = format!(
        "[build]\ncommand = \"busybox wget -q -O data.bin {url} && sha256sum data.bin > data.sha256\"\nartifacts = [\"data.bin\", \"data.sha256\"]\n"
    );
    let src = source_tree(&env, "src", &recipe);
    let build =
        |out: &Path, extra: &[&str]| text(&reprovm_vm(&env.tmp).arg("build").arg(&src).arg("--out").arg(out).args(extra).output().unwrap());
    let allow = format!("127.0.0.1:{}", origin.port);

    // Without --allow the recipe has no network: the fetch fails.
    let (_, err, code) = build(&env.path().join("none"), &[]);
    assert_eq!(code, 5, "{err}");
    assert_eq!(origin.requests.load(Ordering::SeqCst), 0);

    let (out1, out2, out3) = (env.path().join("out1"), env.path().join("out2"), env.path().join("out3"));
    let (_, err, code) = build(&out1, &["--allow", &allow]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(fs::read_to_string(out1.join("data.bin")).unwrap(), first);
    let result1 = json(&out1.join("result.json"));
    let recorded = &result1["inputs"]["downloads"];
    assert_eq!(recorded.as_array().unwrap().len(), 1, "{recorded}");
    assert_eq!(recorded[0]["url"], url.as_str());
    assert_eq!(recorded[0]["sha256"], sha256_hex(first.as_bytes()).as_str());
    assert_eq!(result1["egress"]["allow_cli"][0], allow.as_str());

    // The origin moves on: a plain rebuild differs, and compare says which download.
    origin.set_body(format!("release tarball, second state {nonce}\n").as_bytes());
    let (_, err, code) = build(&out2, &["--allow", &allow]);
    assert_eq!(code, 0, "{err}");
    let (stdout, _, code) =
        text(&reprovm(&env).arg("compare").arg(out1.join("result.json")).arg(out2.join("result.json")).output().unwrap());
    assert_eq!(code, 1, "{stdout}");
    assert!(stdout.contains(&format!("download GET {url}")), "compare names the download: {stdout}");

    // Offline replay of the first result: the first bytes, the origin untouched.
    origin.stop();
    let before = origin.requests.load(Ordering::SeqCst);
    let (_, err, code) = build(&out3, &["--replay", out1.join("result.json").to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        fs::read(out3.join("SHA256SUMS")).unwrap(),
        fs::read(out1.join("SHA256SUMS")).unwrap(),
        "replay gives the first build's bytes"
    );
    assert_eq!(origin.requests.load(Ordering::SeqCst), before, "replay touched no network");
    assert_eq!(json(&out3.join("result.json"))["inputs"]["downloads"], *recorded);

    // The export file moves the downloads to another machine's cache.
    let export = env.path().join("downloads.tar");
    let (_, err, code) =
        text(&reprovm_vm(&env.tmp).args(["downloads", "export"]).arg(out1.join("result.json")).arg("--out").arg(&export).output().unwrap());
    assert_eq!(code, 0, "{err}");
    let other = TestEnv::new();
    let (stdout, err, code) = text(&reprovm(&other).args(["downloads", "import"]).arg(&export).output().unwrap());
    assert_eq!(code, 0, "{err}");
    assert!(stdout.contains("1 downloads imported"), "{stdout}");
    let sha = sha256_hex(first.as_bytes());
    assert_eq!(fs::read(other.cache.join("reprovm/downloads").join(&sha)).unwrap(), first.as_bytes());

    // A cache entry whose bytes changed is refused at replay: exit 3, naming the URL.
    let entry = download_cache().join(&sha);
    let mut perms = fs::metadata(&entry).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o644);
    fs::set_permissions(&entry, perms).unwrap();
    fs::write(&entry, b"tampered").unwrap();
    let (_, err, code) = build(&env.path().join("out4"), &["--replay", out1.join("result.json").to_str().unwrap()]);
    let _ = fs::remove_file(&entry);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains(&url) && err.contains(&sha), "names the URL and the expected hash: {err}");
    assert_nothing_left(&env, "after the replays");
}

#[test]
fn egress_flags_and_allow_lists_are_checked_before_anything_boots() {
    let env = TestEnv::new();
    let recipe = "[build]\ncommand = \"true\"\nartifacts = [\"x\"]\n";
    let src = source_tree(&env, "src", recipe);
    let run = |args: &[&str]| text(&reprovm(&env).arg("build").arg(&src).args(args).output().unwrap());

    let (_, err, code) = run(&["--allow", "*.debian.org"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--allow") && err.contains("*.debian.org"), "{err}");
    let (_, err, code) = run(&["--allow", "deb.debian.org", "--network", "none"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--network none"), "{err}");
    let sums = env.path().join("SHA256SUMS");
    fs::write(&sums, format!("{}  x\n", "a".repeat(64))).unwrap();
    let (_, err, code) = run(&["--replay", sums.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("result.json"), "{err}");
    let (_, err, code) = run(&["--replay-fetch"]);
    assert_eq!(code, 2, "--replay-fetch needs --replay: {err}");

    let hostile =
        source_tree(&env, "hostile", "[build]\ncommand = \"true\"\nartifacts = [\"x\"]\n[build.network]\nallow = [\"http://evil/\"]\n");
    let (_, err, code) = text(&reprovm(&env).arg("build").arg(&hostile).output().unwrap());
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("build.network.allow[0]") && err.contains("reprovm.toml"), "{err}");
    assert_nothing_left(&env, "refused before boot");
}
