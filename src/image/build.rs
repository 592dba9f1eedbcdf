//! `reprovm image build`: turns an image recipe into a bit-reproducible bundle.
//!
//! mmdebstrap writes the root filesystem as a tar (reproducible given
//! SOURCE_DATE_EPOCH and the mirror state); `provision/customize-image` puts
//! the guest boot path in and takes host- and time-specific files out;
//! `mkfs.ext4 -d` populates the filesystem straight from that tar (so neither
//! the host's directory order nor extraction times leak in), with a fixed
//! configuration, UUID, hash seed and clock. Every tool runs with a cleared
//! environment, umask 022 and TZ=UTC, so the host's settings cannot reach it.

use std::fs::{self, File};
use std::io::{self, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::host_tools::{check_mke2fs, clean_command, make_ext4, probe, run_logged, Ext4Spec, ToolError};
use crate::image::bundle::{self, ImageMetadata, FORMAT_VERSION};
use crate::image::pin::{hash_file, Pin};
use crate::image::recipe::{is_mirror_url, ImageRecipe, ImageRecipeError};
use crate::image::store::{Store, StoreError, StoredImage};
use crate::path_error::{path_error, PathError};

/// Label of the root filesystem.
const ROOTFS_LABEL: &str = "builder-root";

/// Options of one image build.
#[derive(Clone, Debug, Default)]
pub struct BuildOptions {
    /// Where to write the bundle file (besides the store).
    pub out: Option<PathBuf>,
    /// Mirror overriding the recipe's.
    pub mirror: Option<String>,
}

/// A failure while building an image.
#[derive(Debug, thiserror::Error)]
pub enum ImageBuildError {
    /// The recipe is unusable.
    #[error(transparent)]
    Recipe(#[from] ImageRecipeError),
    /// `--mirror` is not a URL mmdebstrap can use.
    #[error("invalid value {value:?} for --mirror: expected an http:// or https:// URL")]
    BadMirror {
        /// The value given.
        value: String,
    },
    /// A host tool is missing or failed.
    #[error(transparent)]
    Tool(#[from] ToolError),
    /// The root filesystem tar lacks something the image needs.
    #[error("the root filesystem made by mmdebstrap has no {what}")]
    Incomplete {
        /// What is missing.
        what: &'static str,
    },
    /// A file operation failed.
    #[error(transparent)]
    Io(#[from] PathError),
    /// The bundle could not be added to the store.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Fails early, before minutes of mmdebstrap, when a needed tool is missing
/// or too old.
fn check_tools() -> Result<(), ImageBuildError> {
    probe("mmdebstrap", "--version", "mmdebstrap")?;
    Ok(check_mke2fs()?)
}

/// Removes the work directory unless something is still mounted inside it
/// (an mmdebstrap that was killed mid-way): deleting through a mount of the
/// host's /dev or /sys would destroy host files.
fn remove_work_dir(work: tempfile::TempDir) {
    let path = work.keep();
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let prefix = format!("{}/", path.display());
    if mounts.lines().filter_map(|l| l.split(' ').nth(4)).any(|m| m.starts_with(&prefix)) {
        tracing::warn!("not removing {}: something is still mounted inside it", path.display());
    } else if let Err(e) = fs::remove_dir_all(&path) {
        tracing::warn!("cannot remove {}: {e}", path.display());
    }
}

/// What the root filesystem tar says about itself.
#[derive(Debug, Default)]
struct RootfsFacts {
    packages: Vec<String>,
    kernel_release: Option<String>,
}

/// Reads the installed packages and the kernel release out of the rootfs tar.
fn rootfs_facts(tar_path: &Path) -> Result<RootfsFacts, ImageBuildError> {
    let file = File::open(tar_path).map_err(path_error("open", tar_path))?;
    let mut archive = tar::Archive::new(BufReader::new(file));
    let mut facts = RootfsFacts::default();
    for entry in archive.entries().map_err(path_error("read", tar_path))? {
        let mut entry = entry.map_err(path_error("read", tar_path))?;
        let path = entry.path().map_err(path_error("read", tar_path))?.into_owned();
        let path = path.strip_prefix("./").unwrap_or(&path).to_path_buf();
        if path == Path::new("var/lib/dpkg/status") {
            let mut text = String::new();
            entry.read_to_string(&mut text).map_err(path_error("read dpkg status in", tar_path))?;
            facts.packages = installed_packages(&text);
        } else if let Ok(rest) = path.strip_prefix("usr/lib/modules").or_else(|_| path.strip_prefix("lib/modules")) {
            if let (Some(release), 1) = (rest.to_str(), rest.components().count()) {
                facts.kernel_release.get_or_insert_with(|| release.to_string());
            }
        }
    }
    Ok(facts)
}

/// `name=version` of every installed package in a dpkg status file, sorted.
fn installed_packages(status: &str) -> Vec<String> {
    let mut out: Vec<String> = status
        .split("\n\n")
        .filter_map(|stanza| {
            let field = |key: &str| stanza.lines().find_map(|l| l.strip_prefix(key).map(str::trim));
            match (field("Package:"), field("Version:"), field("Status:")) {
                (Some(name), Some(version), Some("install ok installed")) => Some(format!("{name}={version}")),
                _ => None,
            }
        })
        .collect();
    out.sort();
    out
}

/// A writer that hashes what passes through it.
struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Builds the image described by the recipe in `recipe_dir`, adds it to
/// `store`, and returns the stored entry.
pub fn build_image(recipe_dir: &Path, opts: &BuildOptions, store: &Store) -> Result<StoredImage, ImageBuildError> {
    let (recipe, recipe_path) = ImageRecipe::load(recipe_dir)?;
    let recipe_dir = recipe_path.parent().unwrap_or(Path::new("."));
    let provision = recipe_dir.join(&recipe.provision);
    let customize = fs::canonicalize(provision.join("customize-image")).map_err(path_error("find", &provision.join("customize-image")))?;
    let mirror = opts.mirror.clone().unwrap_or_else(|| recipe.mirror.clone());
    if !is_mirror_url(&mirror) {
        return Err(ImageBuildError::BadMirror { value: mirror });
    }
    check_tools()?;

    let base_tmp = std::env::temp_dir();
    // 0755: apt, inside mmdebstrap, checks that its sandbox user can reach
    // its download directories; a private work dir would change the owner of
    // var/lib/apt/lists/partial in the image.
    let work_dir = tempfile::Builder::new()
        .prefix("reprovm-image-")
        .permissions(fs::Permissions::from_mode(0o755))
        .tempdir_in(&base_tmp)
        .map_err(path_error("create a directory in", &base_tmp))?;
    let result = build_in(&recipe, &recipe_path, &customize, mirror, work_dir.path(), opts, store);
    remove_work_dir(work_dir);
    result
}

/// The steps of [`build_image`] inside the private work directory `work`.
fn build_in(
    recipe: &ImageRecipe,
    recipe_path: &Path,
    customize: &Path,
    mirror: String,
    work: &Path,
    opts: &BuildOptions,
    store: &Store,
) -> Result<StoredImage, ImageBuildError> {
    let boot_dir = work.join("boot");
    fs::create_dir(&boot_dir).map_err(path_error("create", &boot_dir))?;
    let rootfs_tar = run_mmdebstrap(recipe, customize, &mirror, work, &boot_dir)?;

    let facts = rootfs_facts(&rootfs_tar)?;
    let kernel_release = facts.kernel_release.ok_or(ImageBuildError::Incomplete { what: "kernel modules directory" })?;
    if facts.packages.is_empty() {
        return Err(ImageBuildError::Incomplete { what: "installed packages in /var/lib/dpkg/status" });
    }
    let kernel = boot_dir.join("vmlinux");
    let initrd = boot_dir.join("initrd.img");
    for (path, what) in [(&kernel, "kernel written by provision/mkinitrd"), (&initrd, "initrd written by provision/mkinitrd")] {
        if !path.is_file() {
            return Err(ImageBuildError::Incomplete { what });
        }
    }
    let rootfs = make_rootfs(recipe, rootfs_tar, work)?;

    let metadata = ImageMetadata {
        format: FORMAT_VERSION,
        name: recipe.name.clone(),
        distribution: format!("{} {}", recipe.distribution, recipe.suite),
        architecture: recipe.architecture.clone(),
        mirror,
        source_date_epoch: recipe.source_date_epoch,
        recipe_sha256: hash_file(recipe_path).map_err(path_error("hash", recipe_path))?.hex(),
        kernel_release,
        rootfs_label: ROOTFS_LABEL.to_string(),
        packages: facts.packages,
    };
    let out = opts.out.clone().unwrap_or_else(|| work.join("bundle.img"));
    let pin = write_bundle_file(&out, &metadata, [&kernel, &initrd, &rootfs])?;
    tracing::info!("bundle {} written to {}", pin, out.display());
    Ok(store.import(&out, Some(pin))?)
}

/// Runs mmdebstrap: the root filesystem as a tar in `work`, customised by
/// `customize` (provision/customize-image, given the guest contract), the
/// PVH kernel and the initrd copied into `boot_dir`.
fn run_mmdebstrap(recipe: &ImageRecipe, customize: &Path, mirror: &str, work: &Path, boot_dir: &Path) -> Result<PathBuf, ImageBuildError> {
    let rootfs_tar = work.join("rootfs.tar");
    let mode = if nix::unistd::geteuid().is_root() { "root" } else { "unshare" };
    let mut mm = clean_command("mmdebstrap", recipe.source_date_epoch, work);
    mm.arg(format!("--mode={mode}"))
        .arg("--variant=apt")
        .arg("--format=tar")
        .arg(format!("--architectures={}", recipe.architecture))
        .arg(format!("--include={}", recipe.packages.join(",")))
        .arg("--aptopt=Acquire::Check-Valid-Until \"false\"");
    for pattern in &recipe.path_excludes {
        mm.arg(format!("--dpkgopt=path-exclude={pattern}"));
    }
    // Hooks are shell command lines: quote our paths (mmdebstrap's own
    // copy-out splits on spaces, so the kernel and initrd leave by `cp`).
    let quoted = |p: &Path| shlex::try_quote(&p.to_string_lossy()).map(|q| q.into_owned()).unwrap_or_default();
    mm.env("REPROVM_BOOT_OUT", boot_dir)
        .env("REPROVM_CONTRACT", crate::guest::contract::definitions())
        .arg(format!("--customize-hook={} \"$1\"", quoted(customize)))
        .arg("--customize-hook=cp \"$1/boot/reprovm/vmlinux\" \"$1/boot/reprovm/initrd.img\" \"$REPROVM_BOOT_OUT/\"")
        .arg("--customize-hook=rm -rf \"$1/boot/reprovm\"")
        .arg(&recipe.suite)
        .arg(&rootfs_tar)
        .arg(mirror);
    run_logged("mmdebstrap", "mmdebstrap", &mut mm, &work.join("mmdebstrap.log"))?;
    Ok(rootfs_tar)
}

/// The root filesystem image from the tar. Its size is the tar's plus ext4
/// overhead plus the free space asked for, in whole MiB, all derived from
/// deterministic inputs.
fn make_rootfs(recipe: &ImageRecipe, rootfs_tar: PathBuf, work: &Path) -> Result<PathBuf, ImageBuildError> {
    let tar_size = fs::metadata(&rootfs_tar).map_err(path_error("stat", &rootfs_tar))?.len();
    let rootfs = work.join("rootfs.ext4");
    let spec = Ext4Spec {
        tar: rootfs_tar,
        image: rootfs.clone(),
        size_mib: (tar_size / (1 << 20)) * 115 / 100 + recipe.rootfs_free_mib,
        label: ROOTFS_LABEL,
        uuid_name: recipe.name.clone(),
        root_owner: (0, 0),
        epoch: recipe.source_date_epoch,
    };
    make_ext4(&spec, work)?;
    Ok(rootfs)
}

/// Writes the bundle to `out` (through a temporary file beside it, mode
/// 0644) and returns its pin.
fn write_bundle_file(out: &Path, metadata: &ImageMetadata, [kernel, initrd, rootfs]: [&Path; 3]) -> Result<Pin, ImageBuildError> {
    let out_dir = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let partial =
        tempfile::Builder::new().prefix(".reprovm-bundle-").tempfile_in(out_dir).map_err(path_error("create a file in", out_dir))?;
    let pin = {
        let mut writer = HashingWriter { inner: io::BufWriter::with_capacity(4 << 20, partial.as_file()), hasher: Sha256::new() };
        bundle::write_bundle(&mut writer, metadata, kernel, initrd, rootfs).map_err(path_error("write", out))?;
        Pin::from_digest(writer.hasher.finalize().into())
    };
    fs::set_permissions(partial.path(), fs::Permissions::from_mode(0o644)).map_err(path_error("set permissions of", partial.path()))?;
    partial.persist(out).map_err(|e| path_error("write", out)(e.error))?;
    Ok(pin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn installed_packages_skips_removed_ones() {
        let status = "Package: b\nStatus: install ok installed\nVersion: 2\n\nPackage: a\nStatus: install ok installed\nVersion: 1:1.0\n\nPackage: c\nStatus: deinstall ok config-files\nVersion: 3\n";
        assert_eq!(installed_packages(status), ["a=1:1.0", "b=2"]);
    }
}
