//! `reprovm image` without a VM: import, fetch, list, verify, bad input.

mod common;

use std::io::Write;
use std::path::Path;

use common::{reprovm, small_bundle, text, TestEnv};
use reprovm::image::pin::hash_file;

fn store_entries(env: &TestEnv) -> Vec<String> {
    let images = env.cache.join("reprovm/images");
    std::fs::read_dir(images).map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect()).unwrap_or_default()
}

#[test]
fn import_list_verify_round_trip() {
    let env = TestEnv::new();
    let bundle = small_bundle(env.path());
    let pin = hash_file(&bundle).unwrap();
    let (out, err, code) = text(&reprovm(&env).args(["image", "import"]).arg(&bundle).args(["--sha256", &pin.hex()]).output().unwrap());
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().last().unwrap(), pin.to_string());
    let (out, _, code) = text(&reprovm(&env).args(["image", "list"]).output().unwrap());
    assert_eq!(code, 0);
    assert!(
        out.contains(&pin.to_string()) && out.contains("tiny") && out.contains("2024-11-25") && out.contains("debian bookworm"),
        "{out}"
    );
    let (out, _, code) = text(&reprovm(&env).args(["image", "verify"]).output().unwrap());
    assert_eq!(code, 0);
    assert!(out.contains(&format!("ok       {pin}")), "{out}");
}

#[test]
fn import_of_a_flipped_byte_exits_3_naming_the_expected_hash() {
    let env = TestEnv::new();
    let bundle = small_bundle(env.path());
    let pin = hash_file(&bundle).unwrap();
    let mut bytes = std::fs::read(&bundle).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    let flipped = env.path().join("flipped.img");
    std::fs::write(&flipped, &bytes).unwrap();
    let (_, err, code) =
        text(&reprovm(&env).args(["image", "import"]).arg(&flipped).args(["--sha256", &pin.to_string()]).output().unwrap());
    assert_eq!(code, 3, "{err}");
    assert!(err.contains(&format!("expected {pin}")), "{err}");
    assert!(err.contains("actual sha256:"), "{err}");
    assert!(store_entries(&env).is_empty(), "nothing may enter the store: {:?}", store_entries(&env));
}

#[test]
fn garbage_and_truncated_bundles_are_refused() {
    let env = TestEnv::new();
    let garbage = env.path().join("garbage.img");
    std::fs::write(&garbage, vec![0x42u8; 50_000]).unwrap();
    let bundle = small_bundle(env.path());
    let truncated = env.path().join("truncated.img");
    let bytes = std::fs::read(&bundle).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    for file in [&garbage, &truncated] {
        let (_, err, code) = text(&reprovm(&env).args(["image", "import"]).arg(file).output().unwrap());
        assert_eq!(code, 2, "{err}");
        assert!(err.contains("not a usable reprovm image bundle"), "{err}");
    }
    assert!(store_entries(&env).is_empty());
}

#[test]
fn a_bad_pin_flag_is_a_usage_error() {
    let env = TestEnv::new();
    let bundle = small_bundle(env.path());
    let (_, err, code) = text(&reprovm(&env).args(["image", "import"]).arg(&bundle).args(["--sha256", "xyz"]).output().unwrap());
    assert_eq!(code, 2);
    assert!(err.contains("--sha256") && err.contains("xyz"), "{err}");
}

#[test]
fn recipe_with_unknown_field_or_bad_value_exits_2_naming_file_field_value() {
    let env = TestEnv::new();
    let shipped =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("vm-images/debian-bookworm-amd64/image.toml")).unwrap();
    for (name, text_, field, value) in [
        ("unknown", format!("{shipped}\nflavour = \"vanilla\"\n"), "flavour", ""),
        ("badarch", shipped.replace("architecture = \"amd64\"", "architecture = \"sparc\""), "architecture", "sparc"),
    ] {
        let dir = env.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("image.toml"), text_).unwrap();
        let (_, err, code) = text(&reprovm(&env).args(["image", "build"]).arg(&dir).output().unwrap());
        assert_eq!(code, 2, "{err}");
        assert!(err.contains(&dir.join("image.toml").display().to_string()), "{err}");
        assert!(err.contains(field) && err.contains(value), "{err}");
    }
}

/// Serves one file over HTTP on 127.0.0.1, optionally cut short.
fn serve_once(body: Vec<u8>, advertised_len: usize) -> (u16, std::thread::JoinHandle<()>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let handle = std::thread::spawn(move || {
        if let Ok((mut stream, _)) = listener.accept() {
            let mut request = [0u8; 4096];
            let _ = std::io::Read::read(&mut stream, &mut request);
            let _ = write!(stream, "HTTP/1.1 200 OK\r\nContent-Length: {advertised_len}\r\nConnection: close\r\n\r\n");
            let _ = stream.write_all(&body);
        }
    });
    (port, handle)
}

#[test]
fn fetch_verifies_and_refuses_partial_or_wrong_downloads() {
    let env = TestEnv::new();
    let bundle = small_bundle(env.path());
    let bytes = std::fs::read(&bundle).unwrap();
    let pin = hash_file(&bundle).unwrap();

    // Cut short: the server promises more than it sends.
    let (port, h) = serve_once(bytes[..bytes.len() / 3].to_vec(), bytes.len());
    let url = format!("http://127.0.0.1:{port}/tiny.img");
    let (_, err, code) = text(&reprovm(&env).args(["image", "fetch", &url, "--sha256", &pin.hex()]).output().unwrap());
    h.join().unwrap();
    assert_ne!(code, 0, "{err}");
    assert!(store_entries(&env).is_empty());

    // Whole but not what the pin says.
    let (port, h) = serve_once(bytes.clone(), bytes.len());
    let url = format!("http://127.0.0.1:{port}/tiny.img");
    let wrong = "ab".repeat(32);
    let (_, err, code) = text(&reprovm(&env).args(["image", "fetch", &url, "--sha256", &wrong]).output().unwrap());
    h.join().unwrap();
    assert_eq!(code, 3, "{err}");
    assert!(err.contains(&format!("expected sha256:{wrong}")), "{err}");
    assert!(store_entries(&env).is_empty());

    // Right.
    let (port, h) = serve_once(bytes.clone(), bytes.len());
    let url = format!("http://127.0.0.1:{port}/tiny.img");
    let (out, err, code) = text(&reprovm(&env).args(["image", "fetch", &url, "--sha256", &pin.hex()]).output().unwrap());
    h.join().unwrap();
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), pin.to_string());
    assert_eq!(store_entries(&env), [pin.hex()]);
}

#[test]
fn concurrent_cli_imports_leave_one_intact_entry() {
    let env = TestEnv::new();
    let bundle = small_bundle(env.path());
    let children: Vec<_> = (0..4).map(|_| reprovm(&env).args(["image", "import"]).arg(&bundle).spawn().unwrap()).collect();
    for mut c in children {
        assert!(c.wait().unwrap().success());
    }
    assert_eq!(store_entries(&env).len(), 1);
    assert_eq!(text(&reprovm(&env).args(["image", "verify"]).output().unwrap()).2, 0);
}

#[test]
fn concurrent_fetches_of_one_bundle_leave_one_intact_entry() {
    let env = TestEnv::new();
    let bundle = small_bundle(env.path());
    let bytes = std::fs::read(&bundle).unwrap();
    let pin = hash_file(&bundle).unwrap();
    let servers: Vec<_> = (0..3).map(|_| serve_once(bytes.clone(), bytes.len())).collect();
    let children: Vec<_> = servers
        .iter()
        .map(|(port, _)| {
            let url = format!("http://127.0.0.1:{port}/tiny.img");
            reprovm(&env).args(["image", "fetch", &url, "--sha256", &pin.hex()]).stdout(std::process::Stdio::null()).spawn().unwrap()
        })
        .collect();
    for mut c in children {
        assert!(c.wait().unwrap().success());
    }
    for (_, h) in servers {
        h.join().unwrap();
    }
    assert_eq!(store_entries(&env), [pin.hex()]);
    assert_eq!(text(&reprovm(&env).args(["image", "verify"]).output().unwrap()).2, 0);
}

#[test]
fn a_bad_mirror_flag_exits_2_naming_flag_and_value() {
    let env = TestEnv::new();
    let recipe = Path::new(env!("CARGO_MANIFEST_DIR")).join("vm-images/debian-bookworm-amd64");
    let (_, err, code) = text(&reprovm(&env).args(["image", "build"]).arg(&recipe).args(["--mirror", "ftp://nowhere"]).output().unwrap());
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--mirror") && err.contains("ftp://nowhere"), "{err}");
}

/// `image export` writes a zstd transport file (smaller, the same bytes on
/// every run) that `image import` and `image fetch` take in place of the
/// bundle, with the bundle's pin. A truncated or corrupted transport file,
/// or one whose content is another bundle, stores nothing.
#[test]
fn transport_files_export_import_and_fetch_with_the_bundles_pin() {
    let env = TestEnv::new();
    let bundle = small_bundle(env.path());
    let pin = hash_file(&bundle).unwrap();
    let (_, err, code) = text(&reprovm(&env).args(["image", "import"]).arg(&bundle).output().unwrap());
    assert_eq!(code, 0, "{err}");
    let zst = env.path().join("tiny.img.zst");
    let (_, err, code) = text(&reprovm(&env).args(["image", "export", &pin.to_string(), "--out"]).arg(&zst).output().unwrap());
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("its pin is still") && err.contains(&pin.to_string()), "{err}");
    let transport = std::fs::read(&zst).unwrap();
    assert!(transport.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]), "a zstd frame");
    assert!(transport.len() * 10 < std::fs::metadata(&bundle).unwrap().len() as usize, "{} bytes", transport.len());
    // zstd(1) itself reads it back to the bundle: an independent reader.
    let unpacked = std::process::Command::new("zstd").arg("-dc").arg(&zst).output().unwrap();
    assert!(unpacked.status.success());
    assert_eq!(unpacked.stdout, std::fs::read(&bundle).unwrap());
    let again = env.path().join("again.zst");
    let (_, err, code) = text(&reprovm(&env).args(["image", "export", &pin.to_string(), "--out"]).arg(&again).output().unwrap());
    assert_eq!(code, 0, "{err}");
    assert_eq!(std::fs::read(&again).unwrap(), transport, "export is deterministic");

    // Into a fresh store, by file and over HTTP.
    let fresh = TestEnv::new();
    let (out, err, code) = text(&reprovm(&fresh).args(["image", "import"]).arg(&zst).args(["--sha256", &pin.hex()]).output().unwrap());
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), pin.to_string());
    let fetched = TestEnv::new();
    let (port, h) = serve_once(transport.clone(), transport.len());
    let url = format!("http://127.0.0.1:{port}/tiny.img.zst");
    let (out, err, code) = text(&reprovm(&fetched).args(["image", "fetch", &url, "--sha256", &pin.hex()]).output().unwrap());
    h.join().unwrap();
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), pin.to_string());
    assert_eq!(store_entries(&fetched), [pin.hex()]);

    // Truncated, corrupted, or another bundle under this pin: nothing stored.
    let bad = TestEnv::new();
    let cut = bad.path().join("cut.zst");
    std::fs::write(&cut, &transport[..transport.len() / 2]).unwrap();
    let (_, err, code) = text(&reprovm(&bad).args(["image", "import"]).arg(&cut).output().unwrap());
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("cannot read the bundle from") && err.contains("cut.zst"), "{err}");
    let mut flipped = transport.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0x55;
    let corrupt = bad.path().join("corrupt.zst");
    std::fs::write(&corrupt, &flipped).unwrap();
    let (_, err, code) = text(&reprovm(&bad).args(["image", "import"]).arg(&corrupt).args(["--sha256", &pin.hex()]).output().unwrap());
    assert_ne!(code, 0, "{err}");
    let other = zstd_of(b"not a bundle at all");
    let other_file = bad.path().join("other.zst");
    std::fs::write(&other_file, other).unwrap();
    let (_, err, code) = text(&reprovm(&bad).args(["image", "import"]).arg(&other_file).args(["--sha256", &pin.hex()]).output().unwrap());
    assert_eq!(code, 3, "{err}");
    assert!(store_entries(&bad).is_empty(), "{:?}", store_entries(&bad));
}

fn zstd_of(bytes: &[u8]) -> Vec<u8> {
    let mut child = std::process::Command::new("zstd")
        .args(["-q", "-c"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(bytes).unwrap();
    child.wait_with_output().unwrap().stdout
}
