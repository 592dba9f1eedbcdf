//! Image recipes: `vm-images/<name>/image.toml`, the strict description of
//! how a builder image bundle is made (distribution, mirror, packages, date).

use std::fs;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::path_error::{path_error, PathError};

/// File name of a recipe inside its directory.
pub const IMAGE_RECIPE_FILE: &str = "image.toml";

/// Where the default recipe lies in reprovm's source; `reprovm image build`
/// without a directory builds the copy built into the binary.
pub const DEFAULT_RECIPE_DIR: &str = "vm-images/debian-bookworm-amd64";
const DEFAULT_RECIPE: &str = include_str!("../../vm-images/debian-bookworm-amd64/image.toml");

/// Writes the built-in default recipe and `provision/` under `root` (an
/// empty directory) as they lie in reprovm's source, and returns the
/// recipe's directory: building it gives the same bundle as building the
/// source's.
pub fn write_default_recipe(root: &Path) -> Result<PathBuf, PathError> {
    let recipe_dir = root.join(DEFAULT_RECIPE_DIR);
    let provision = root.join("provision");
    for dir in [&recipe_dir, &provision] {
        fs::create_dir_all(dir).map_err(path_error("create", dir))?;
    }
    let recipe = recipe_dir.join(IMAGE_RECIPE_FILE);
    fs::write(&recipe, DEFAULT_RECIPE).map_err(path_error("write", &recipe))?;
    crate::guest::provision::write_provision(&provision)?;
    Ok(recipe_dir)
}

/// A validated image recipe.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ImageRecipe {
    /// Image name, `[a-z0-9-]+`.
    pub name: String,
    /// Distribution, only `debian` is supported.
    pub distribution: String,
    /// Debian suite, e.g. `bookworm`.
    pub suite: String,
    /// Debian architecture, only `amd64` is supported.
    pub architecture: String,
    /// Package mirror (http or https), e.g. a snapshot.debian.org URL.
    pub mirror: String,
    /// Timestamp for every file in the image, and the image's date.
    pub source_date_epoch: i64,
    /// Packages installed on top of the essential set.
    pub packages: Vec<String>,
    /// dpkg `path-exclude` patterns (files left out of the image).
    #[serde(default)]
    pub path_excludes: Vec<String>,
    /// Free space added to the root filesystem, in MiB.
    pub rootfs_free_mib: u64,
    /// The guest boot path directory, relative to the recipe directory.
    pub provision: PathBuf,
}

/// A recipe that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ImageRecipeError {
    /// The file could not be read.
    #[error("cannot read image recipe {path}")]
    Read {
        /// The recipe path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML of the recipe's shape (unknown field, wrong type…).
    #[error("invalid image recipe {path}: {message}")]
    Parse {
        /// The recipe path.
        path: PathBuf,
        /// The parser's message, which names the field and line.
        message: String,
    },
    /// A field has a value that is not allowed.
    #[error("invalid image recipe {path}: field `{field}` = {value:?}: {expected}")]
    Field {
        /// The recipe path.
        path: PathBuf,
        /// The field name.
        field: &'static str,
        /// The rejected value.
        value: String,
        /// What was expected instead.
        expected: &'static str,
    },
}

/// Whether `s` can be given to mmdebstrap as a mirror: an http(s) URL.
pub fn is_mirror_url(s: &str) -> bool {
    (s.starts_with("http://") || s.starts_with("https://")) && !s.contains(char::is_whitespace)
}

fn is_package_name(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() >= 2
        && b[0].is_ascii_lowercase() | b[0].is_ascii_digit()
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"+-.".contains(c))
}

impl ImageRecipe {
    /// Reads and validates the recipe in `dir` (or the file `dir` itself).
    pub fn load(dir: &Path) -> Result<(ImageRecipe, PathBuf), ImageRecipeError> {
        let path = if dir.is_dir() { dir.join(IMAGE_RECIPE_FILE) } else { dir.to_path_buf() };
        let text = std::fs::read_to_string(&path).map_err(|source| ImageRecipeError::Read { path: path.clone(), source })?;
        let recipe = Self::parse(&text, &path)?;
        Ok((recipe, path))
    }

    /// Parses and validates recipe text; `path` is only used in errors.
    pub fn parse(text: &str, path: &Path) -> Result<ImageRecipe, ImageRecipeError> {
        let recipe: ImageRecipe =
            toml::from_str(text).map_err(|e| ImageRecipeError::Parse { path: path.to_path_buf(), message: e.to_string() })?;
        let bad = |field, value: String, expected| ImageRecipeError::Field { path: path.to_path_buf(), field, value, expected };
        if recipe.name.is_empty() || !recipe.name.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-') {
            return Err(bad("name", recipe.name, "lowercase letters, digits and '-'"));
        }
        if recipe.distribution != "debian" {
            return Err(bad("distribution", recipe.distribution, "\"debian\" (the only distribution supported)"));
        }
        if recipe.suite.is_empty() || !recipe.suite.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-') {
            return Err(bad("suite", recipe.suite, "a Debian suite name such as \"bookworm\""));
        }
        if recipe.architecture != "amd64" {
            return Err(bad("architecture", recipe.architecture, "\"amd64\" (the only architecture supported)"));
        }
        if !is_mirror_url(&recipe.mirror) {
            return Err(bad("mirror", recipe.mirror, "an http:// or https:// URL"));
        }
        if recipe.source_date_epoch <= 0 {
            return Err(bad("source_date_epoch", recipe.source_date_epoch.to_string(), "seconds since 1970, greater than 0"));
        }
        if let Some(p) = recipe.packages.iter().find(|p| !is_package_name(p)) {
            return Err(bad("packages", p.clone(), "Debian package names"));
        }
        if let Some(p) = recipe.path_excludes.iter().find(|p| !p.starts_with('/') || p.contains(char::is_whitespace)) {
            return Err(bad("path_excludes", p.clone(), "absolute dpkg path patterns without spaces"));
        }
        if !(16..=65536).contains(&recipe.rootfs_free_mib) {
            return Err(bad("rootfs_free_mib", recipe.rootfs_free_mib.to_string(), "between 16 and 65536"));
        }
        if recipe.provision.is_absolute() {
            return Err(bad("provision", recipe.provision.display().to_string(), "a path relative to the recipe directory"));
        }
        Ok(recipe)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "debian-test"
distribution = "debian"
suite = "bookworm"
architecture = "amd64"
mirror = "http://deb.debian.org/debian"
source_date_epoch = 1700000000
packages = ["openssh-server", "g++"]
rootfs_free_mib = 256
provision = "../../provision"
"#;

    fn parse(text: &str) -> Result<ImageRecipe, ImageRecipeError> {
        ImageRecipe::parse(text, Path::new("vm-images/x/image.toml"))
    }

    #[test]
    fn the_shipped_recipe_is_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("vm-images/debian-bookworm-amd64");
        let (recipe, _) = ImageRecipe::load(&dir).unwrap();
        assert_eq!(recipe.name, "debian-bookworm-amd64");
        assert!(dir.join(&recipe.provision).join("customize-image").is_file());
    }

    #[test]
    fn the_built_in_recipe_is_the_shipped_one() {
        let root = tempfile::tempdir().unwrap();
        let dir = write_default_recipe(root.path()).unwrap();
        let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join(DEFAULT_RECIPE_DIR);
        assert_eq!(fs::read(dir.join(IMAGE_RECIPE_FILE)).unwrap(), fs::read(shipped.join(IMAGE_RECIPE_FILE)).unwrap());
        let (recipe, _) = ImageRecipe::load(&dir).unwrap();
        assert!(dir.join(&recipe.provision).join("customize-image").is_file());
    }

    #[test]
    fn accepts_a_good_recipe() {
        assert_eq!(parse(GOOD).unwrap().packages, ["openssh-server", "g++"]);
    }

    #[test]
    fn unknown_field_names_file_and_field() {
        let err = parse(&format!("{GOOD}\ncolour = \"blue\"\n")).unwrap_err().to_string();
        assert!(err.contains("vm-images/x/image.toml") && err.contains("colour"), "{err}");
    }

    #[test]
    fn bad_values_name_field_and_value() {
        for (from, to, field) in [
            ("\"amd64\"", "\"arm64\"", "architecture"),
            ("http://deb.debian.org/debian", "ftp://x", "mirror"),
            ("1700000000", "-5", "source_date_epoch"),
            ("\"g++\"", "\"Bad Name\"", "packages"),
            ("= 256", "= 1", "rootfs_free_mib"),
        ] {
            let err = parse(&GOOD.replace(from, to)).unwrap_err().to_string();
            assert!(err.contains(&format!("`{field}`")), "{err}");
            let value = to.trim_matches('"').trim_start_matches("= ");
            assert!(err.contains(value), "{err}");
        }
    }
}
