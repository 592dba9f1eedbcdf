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
use std::time::Duration;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

use crate::image::bundle::{self, ImageMetadata, FORMAT_VERSION};
use crate::image::pin::{hash_file, Pin};
use crate::image::recipe::{is_mirror_url, ImageRecipe, RecipeError};
use crate::image::store::{Store, StoreError, StoredImage};
use crate::interrupt::{self, Interrupted};
use crate::process::Supervised;
use crate::path_error::{path_error, PathError};
use crate::Exit;

/// Label of the root filesystem.
const ROOTFS_LABEL: &str = "builder-root";
/// mke2fs configuration used instead of the host's /etc/mke2fs.conf, so the
/// host's defaults cannot change the filesystem.
const MKE2FS_CONF: &str = "[defaults]
\tbase_features = sparse_super,large_file,filetype,resize_inode,dir_index,ext_attr
\tblocksize = 4096
\tinode_size = 256
\tinode_ratio = 16384
[fs_types]
\text4 = {
\t\tfeatures = extent,huge_file,flex_bg,metadata_csum,64bit,dir_nlink,extra_isize
\t}
";

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
pub enum BuildError {
    /// The recipe is unusable.
    #[error(transparent)]
    Recipe(#[from] RecipeError),
    /// `--mirror` is not a URL mmdebstrap can use.
    #[error("invalid value {value:?} for --mirror: expected an http:// or https:// URL")]
    BadMirror {
        /// The value given.
        value: String,
    },
    /// A host tool is missing.
    #[error("{tool} is not installed: install the Debian package {package}")]
    MissingTool {
        /// The program.
        tool: &'static str,
        /// The Debian package that provides it.
        package: &'static str,
    },
    /// A host tool is too old for what the build needs.
    #[error("{tool} {found} is too old: version {needed} or later is needed; install the Debian package {package}")]
    ToolTooOld {
        /// The program.
        tool: &'static str,
        /// The version found.
        found: String,
        /// The minimum version.
        needed: &'static str,
        /// Where to get a newer one.
        package: &'static str,
    },
    /// A host tool exited with failure.
    #[error("{tool} failed ({status}){}", if log_tail.is_empty() { String::new() } else { format!("; last output:\n{log_tail}") })]
    ToolFailed {
        /// The program.
        tool: &'static str,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// The end of its output.
        log_tail: String,
    },
    /// The root filesystem tar lacks something the image needs.
    #[error("the root filesystem made by mmdebstrap has no {what}")]
    Incomplete {
        /// What is missing.
        what: &'static str,
    },
    /// A file operation failed.
    #[error(transparent)]
    Io(#[from] PathError),
    /// SIGINT or SIGTERM arrived.
    #[error(transparent)]
    Interrupted(#[from] Interrupted),
    /// The bundle could not be added to the store.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl BuildError {
    /// The process exit code for this error.
    pub fn exit(&self) -> Exit {
        match self {
            BuildError::Store(e) => e.exit(),
            BuildError::Interrupted(_) => Exit::Interrupted,
            _ => Exit::Usage,
        }
    }
}

/// A command with nothing of the host's environment: fixed PATH, locale,
/// timezone, umask and working directory (the work dir), plus SOURCE_DATE_EPOCH.
fn clean_command(program: &str, epoch: i64, tmpdir: &Path) -> Command {
    let mut cmd = Command::new(program);
    cmd.current_dir(tmpdir)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("LC_ALL", "C.UTF-8")
        .env("TZ", "UTC")
        .env("TMPDIR", tmpdir)
        .env("SOURCE_DATE_EPOCH", epoch.to_string());
    // SAFETY: umask(2) is async-signal-safe and touches no memory.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
            Ok(())
        });
    }
    cmd
}

/// Runs `cmd` as a supervised child with its output in `log`. On failure the
/// error carries the log's tail; on SIGINT/SIGTERM the child's group gets
/// SIGTERM (mmdebstrap then unmounts and cleans up) before we return.
fn run_logged(tool: &'static str, package: &'static str, cmd: &mut Command, log: &Path) -> Result<(), BuildError> {
    tracing::info!("running {tool}");
    let log_file = File::create(log).map_err(path_error("create", log))?;
    cmd.stdin(Stdio::null()).stdout(log_file.try_clone().map_err(path_error("open", log))?).stderr(log_file);
    let mut child = Supervised::spawn(tool, cmd).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => BuildError::MissingTool { tool, package },
        _ => path_error("run", Path::new(tool))(e).into(),
    })?;
    let status = loop {
        if let Err(interrupted) = interrupt::check() {
            child.terminate(Duration::from_secs(60)).map_err(path_error("stop", Path::new(tool)))?;
            return Err(interrupted.into());
        }
        if let Some(status) = child.wait_for(Duration::from_millis(200)).map_err(path_error("wait for", Path::new(tool)))? {
            break status;
        }
    };
    if status.success() {
        return Ok(());
    }
    let text = fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let log_tail = lines[lines.len().saturating_sub(25)..].join("\n");
    Err(BuildError::ToolFailed { tool, status, log_tail })
}

/// mke2fs populates a filesystem from a tar (`-d FILE.tar`) since 1.47.1.
const MKE2FS_MIN: (u32, u32, u32) = (1, 47, 1);
/// Where to get e2fsprogs 1.47.1 or later (with its libarchive).
const E2FSPROGS_PACKAGE: &str = "e2fsprogs (>= 1.47.1, from bookworm-backports on bookworm) and libarchive13";

/// Fails early, before minutes of mmdebstrap, when a needed tool is missing
/// or too old.
fn check_tools() -> Result<(), BuildError> {
    let probe = |tool: &'static str, arg: &str, package: &'static str| {
        Command::new(tool).arg(arg).stdin(Stdio::null()).output().map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => BuildError::MissingTool { tool, package },
            _ => path_error("run", Path::new(tool))(e).into(),
        })
    };
    probe("mmdebstrap", "--version", "mmdebstrap")?;
    let out = probe("mke2fs", "-V", E2FSPROGS_PACKAGE)?;
    let text = String::from_utf8_lossy(&out.stderr);
    let found = text.split_whitespace().nth(1).unwrap_or_default().to_string();
    let mut parts = found.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let version = (parts.next().unwrap_or(0), parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if version < MKE2FS_MIN {
        return Err(BuildError::ToolTooOld { tool: "mkfs.ext4", found, needed: "1.47.1", package: E2FSPROGS_PACKAGE });
    }
    Ok(())
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

/// Derives a fixed UUID (version-4 layout) from the recipe name and a purpose,
/// so filesystems built from one recipe always carry the same identifiers.
fn fixed_uuid(name: &str, purpose: &str) -> String {
    let d = Sha256::digest(format!("reprovm:{name}:{purpose}"));
    let mut b = [0u8; 16];
    b.copy_from_slice(&d[..16]);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

/// What the root filesystem tar says about itself.
#[derive(Debug, Default)]
struct RootfsFacts {
    packages: Vec<String>,
    kernel_release: Option<String>,
}

/// Reads the installed packages and the kernel release out of the rootfs tar.
fn rootfs_facts(tar_path: &Path) -> Result<RootfsFacts, BuildError> {
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
pub fn build_image(recipe_dir: &Path, opts: &BuildOptions, store: &Store) -> Result<StoredImage, BuildError> {
    let (recipe, recipe_path) = ImageRecipe::load(recipe_dir)?;
    let recipe_dir = recipe_path.parent().unwrap_or(Path::new("."));
    let provision = recipe_dir.join(&recipe.provision);
    let customize = fs::canonicalize(provision.join("customize-image")).map_err(path_error("find", &provision.join("customize-image")))?;
    let mirror = opts.mirror.clone().unwrap_or_else(|| recipe.mirror.clone());
    if !is_mirror_url(&mirror) {
        return Err(BuildError::BadMirror { value: mirror });
    }
    check_tools()?;

    let base_tmp = std::env::temp_dir();
    // 0755: apt, inside mmdebstrap, checks that its sandbox user can reach
    // its download directories; a private work dir would change the owner of
    // var/lib/apt/lists/partial in the image.
    let work_dir = tempfile::Builder::new()
        .prefix("reprovm-image-")
        .permissions(fs::Permissions::from_mode(0o755))
        .tempdir_in(&base_tmp).map_err(path_error("create a directory in", &base_tmp))?;
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
) -> Result<StoredImage, BuildError> {
    let epoch = recipe.source_date_epoch;
    let rootfs_tar = work.join("rootfs.tar");
    let boot_dir = work.join("boot");
    fs::create_dir(&boot_dir).map_err(path_error("create", &boot_dir))?;

    let mode = if nix::unistd::geteuid().is_root() { "root" } else { "unshare" };
    let mut mm = clean_command("mmdebstrap", epoch, work);
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
    mm.env("REPROVM_BOOT_OUT", &boot_dir)
        .arg(format!("--customize-hook={} \"$1\"", quoted(customize)))
        .arg("--customize-hook=cp \"$1/boot/reprovm/vmlinux\" \"$1/boot/reprovm/initrd.img\" \"$REPROVM_BOOT_OUT/\"")
        .arg("--customize-hook=rm -rf \"$1/boot/reprovm\"")
        .arg(&recipe.suite)
        .arg(&rootfs_tar)
        .arg(&mirror);
    run_logged("mmdebstrap", "mmdebstrap", &mut mm, &work.join("mmdebstrap.log"))?;

    let facts = rootfs_facts(&rootfs_tar)?;
    let kernel_release = facts.kernel_release.ok_or(BuildError::Incomplete { what: "kernel modules directory" })?;
    if facts.packages.is_empty() {
        return Err(BuildError::Incomplete { what: "installed packages in /var/lib/dpkg/status" });
    }
    let kernel = boot_dir.join("vmlinux");
    let initrd = boot_dir.join("initrd.img");
    for (path, what) in [(&kernel, "kernel written by provision/mkinitrd"), (&initrd, "initrd written by provision/mkinitrd")] {
        if !path.is_file() {
            return Err(BuildError::Incomplete { what });
        }
    }

    // Filesystem size: the tar's size plus ext4 overhead plus the free space
    // asked for, in whole MiB, all derived from deterministic inputs.
    let tar_size = fs::metadata(&rootfs_tar).map_err(path_error("stat", &rootfs_tar))?.len();
    let rootfs_mib = (tar_size / (1 << 20)) * 115 / 100 + recipe.rootfs_free_mib;
    let rootfs = work.join("rootfs.ext4");
    let conf = work.join("mke2fs.conf");
    fs::write(&conf, MKE2FS_CONF).map_err(path_error("write", &conf))?;
    let mut mkfs = clean_command("mkfs.ext4", epoch, work);
    mkfs.env("MKE2FS_CONFIG", &conf)
        .env("E2FSPROGS_FAKE_TIME", epoch.to_string())
        .args(["-q", "-F", "-t", "ext4", "-O", "^has_journal", "-m", "0", "-L", ROOTFS_LABEL])
        .arg("-U")
        .arg(fixed_uuid(&recipe.name, "rootfs"))
        .arg("-E")
        .arg(format!("hash_seed={},root_owner=0:0,lazy_itable_init=0,nodiscard", fixed_uuid(&recipe.name, "hash-seed")))
        .arg("-d")
        .arg(&rootfs_tar)
        .arg(&rootfs)
        .arg(format!("{rootfs_mib}M"));
    run_logged("mkfs.ext4", E2FSPROGS_PACKAGE, &mut mkfs, &work.join("mkfs.log"))?;

    let recipe_sha256 = hash_file(recipe_path).map_err(path_error("hash", recipe_path))?.hex();
    let metadata = ImageMetadata {
        format: FORMAT_VERSION,
        name: recipe.name.clone(),
        distribution: format!("{} {}", recipe.distribution, recipe.suite),
        architecture: recipe.architecture.clone(),
        mirror,
        source_date_epoch: epoch,
        recipe_sha256,
        kernel_release,
        rootfs_label: ROOTFS_LABEL.to_string(),
        packages: facts.packages,
    };

    let out = opts.out.clone().unwrap_or_else(|| work.join("bundle.img"));
    let out_dir = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let partial = tempfile::Builder::new().prefix(".reprovm-bundle-").tempfile_in(out_dir).map_err(path_error("create a file in", out_dir))?;
    let pin = {
        let mut writer = HashingWriter { inner: io::BufWriter::with_capacity(4 << 20, partial.as_file()), hasher: Sha256::new() };
        bundle::write_bundle(&mut writer, &metadata, &kernel, &initrd, &rootfs).map_err(path_error("write", &out))?;
        Pin::from_digest(writer.hasher.finalize().into())
    };
    fs::set_permissions(partial.path(), fs::Permissions::from_mode(0o644)).map_err(path_error("set permissions of", partial.path()))?;
    partial.persist(&out).map_err(|e| path_error("write", &out)(e.error))?;
    tracing::info!("bundle {} written to {}", pin, out.display());
    Ok(store.import(&out, Some(pin))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_uuids_are_stable_and_well_formed() {
        let a = fixed_uuid("debian-bookworm-amd64", "rootfs");
        assert_eq!(a, fixed_uuid("debian-bookworm-amd64", "rootfs"));
        assert_ne!(a, fixed_uuid("debian-bookworm-amd64", "hash-seed"));
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
    }

    #[test]
    fn installed_packages_skips_removed_ones() {
        let status = "Package: b\nStatus: install ok installed\nVersion: 2\n\nPackage: a\nStatus: install ok installed\nVersion: 1:1.0\n\nPackage: c\nStatus: deinstall ok config-files\nVersion: 3\n";
        assert_eq!(installed_packages(status), ["a=1:1.0", "b=2"]);
    }
}
