//! Bounded fuzzing (proptest) of every reader of outside input: the build
//! recipe, SHA256SUMS and result.json (verify/compare), and the image bundle.
//! No input may panic or hang; bad input is an error that names the file.

use std::path::Path;

use proptest::prelude::*;
use reprovm::build::artifacts::parse_sha256sums;
use reprovm::build::recipe::check_artifact_glob;
use reprovm::build::{BuildRecipe, Record};

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
