//! Bounded fuzzing (proptest) of every reader of outside input: the build
//! recipe, SHA256SUMS and result.json (verify/compare), the image bundle,
//! and the attestation readers (DSSE envelopes, statements, trusted keys).
//! No input may panic or hang; bad input is an error that names the file;
//! no change to a signed envelope makes another payload verify.

use std::path::Path;

use std::sync::OnceLock;

use proptest::prelude::*;
use reprovm::attest::dsse::{Envelope, SignatureCheck};
use reprovm::attest::keys::{SigningKey, TrustedKeys};
use reprovm::attest::statement;
use reprovm::rebuild::artifacts::parse_sha256sums;
use reprovm::rebuild::recipe::check_artifact_glob;
use reprovm::rebuild::{BuildRecipe, Record};

const VALID_RECIPE: &str = "[machine]\ncpus = 2\n[build]\ncommand = \"make\"\nartifacts = [\"out/*.bin\"]\n";

/// Text built from the recipe's and the readers' own vocabulary, so the
/// fuzzer reaches past the first syntax error.
fn tokens() -> impl Strategy<Value = String> {
    let words = prop::sample::select(vec![
        "[build]",
        "[machine]",
        "[image]",
        "command",
        "artifacts",
        "env",
        "network",
        "timeout_secs",
        "provision",
        "pin",
        "name",
        "cpus",
        "memory_mib",
        "scratch_mib",
        "accel",
        "clock",
        "=",
        "\"",
        "[",
        "]",
        "{",
        "}",
        ",",
        "\n",
        " ",
        "..",
        "/",
        "*",
        "\"none\"",
        "\"nat\"",
        "\"kvm\"",
        "-1",
        "0",
        "99999999999999999999",
        "sha256:",
        "\u{0}",
        "é",
        "{\"format\": 1",
        "\"outputs\": [",
        "  ",
        " *",
        "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        "\\",
    ]);
    prop::collection::vec(words, 0..40).prop_map(|w| w.concat())
}

/// A signed provenance envelope, its payload and the signer as the only trusted key.
fn signed() -> &'static (Vec<u8>, Vec<u8>, TrustedKeys) {
    static SIGNED: OnceLock<(Vec<u8>, Vec<u8>, TrustedKeys)> = OnceLock::new();
    SIGNED.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key");
        let made = std::process::Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(&key).output().unwrap();
        assert!(made.status.success());
        let signer = SigningKey::load_with(&key, || None).unwrap();
        let trusted = TrustedKeys::load(&key.with_extension("pub")).unwrap();
        let result = serde_json::from_str(include_str!("interop/hello-result.json")).unwrap();
        let t = time::OffsetDateTime::UNIX_EPOCH;
        let payload = statement::provenance(&result, t, t, "0").to_file_bytes();
        (Envelope::sign(&payload, &signer).to_file_bytes(), payload, trusted)
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn recipe_parser_never_panics(text in prop_oneof![any::<String>(), tokens()]) {
        if let Err(e) = BuildRecipe::parse(&text, Path::new("fuzz/reprovm.toml")) {
            prop_assert!(e.to_string().contains("fuzz/reprovm.toml"));
        }
    }

    #[test]
    fn accepted_globs_stay_inside_the_build_directory(glob in prop_oneof![any::<String>(), tokens()]) {
        let text = VALID_RECIPE.replace("out/*.bin", &glob.replace('\\', "\\\\").replace('"', "\\\""));
        if let Ok(recipe) = BuildRecipe::parse(&text, Path::new("r")) {
            for g in &recipe.build.artifacts {
                prop_assert!(check_artifact_glob(g).is_ok());
                prop_assert!(!g.starts_with('/') && !Path::new(g).components().any(|c| c == std::path::Component::ParentDir));
            }
        }
    }

    #[test]
    fn sha256sums_reader_never_panics(text in prop_oneof![any::<String>(), tokens()]) {
        match parse_sha256sums(&text, Path::new("fuzz/SHA256SUMS")) {
            Ok(pairs) => for (path, hash) in pairs {
                prop_assert!(!path.is_empty());
                prop_assert!(hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
            },
            Err(e) => prop_assert!(e.to_string().starts_with("fuzz/SHA256SUMS:")),
        }
    }

    #[test]
    fn result_reader_never_panics(text in prop_oneof![any::<String>(), tokens()]) {
        if let Err(e) = Record::parse(&text, Path::new("fuzz/result.json")) {
            prop_assert!(e.to_string().contains("fuzz/result.json"));
        }
    }

    #[test]
    fn a_changed_envelope_never_verifies_another_payload(edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4)) {
        let (good, payload, trusted) = signed();
        let mut bytes = good.clone();
        for (at, byte) in edits {
            let at = at.index(bytes.len());
            bytes[at] = byte;
        }
        if let Ok((envelope, decoded)) = Envelope::parse(&bytes) {
            if let Ok(SignatureCheck::Trusted(_)) = envelope.check(&decoded, trusted) {
                // Only a re-encoding (whitespace, the other base64 alphabet) of the same signed bytes.
                prop_assert_eq!(&decoded, payload);
            }
            let _ = statement::parse(&decoded);
        }
    }

    #[test]
    fn attestation_readers_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048), text in prop_oneof![any::<String>(), tokens()]) {
        let (_, _, trusted) = signed();
        for input in [&bytes[..], text.as_bytes()] {
            if let Ok((envelope, payload)) = Envelope::parse(input) {
                let _ = envelope.check(&payload, trusted);
            }
            let _ = statement::parse(input);
        }
        if let Err(e) = TrustedKeys::parse(&text, Path::new("fuzz/trusted-keys")) {
            prop_assert!(e.to_string().contains("fuzz/trusted-keys"));
        }
    }

    #[test]
    fn bundle_reader_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..4096), tar_like in any::<bool>()) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bundle.img");
        let mut data = bytes;
        if tar_like && data.len() > 300 {
            // A plausible ustar header so the reader gets past the magic.
            data[257..263].copy_from_slice(b"ustar\0");
            data[..18].copy_from_slice(b"reprovm-image.json");
        }
        std::fs::write(&path, &data).unwrap();
        prop_assert!(reprovm::image::bundle::read_layout(&path).is_err());
    }
}
