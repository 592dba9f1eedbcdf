//! Host programs reprovm runs to make disks (mmdebstrap, mkfs.ext4): with
//! nothing of the host's environment, supervised and logged; and the one
//! recipe for an ext4 filesystem populated from a tar, shared by the builder
//! image's root filesystem and each build's scratch disk.

use std::fs::{self, File};
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::interrupt::{self, Interrupted};
use crate::path_error::{path_error, PathError};
use crate::process::Supervised;

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

/// mke2fs populates a filesystem from a tar (`-d FILE.tar`) since 1.47.1.
const MKE2FS_MIN: (u32, u32, u32) = (1, 47, 1);
/// Where to get e2fsprogs 1.47.1 or later (with its libarchive).
pub const E2FSPROGS_PACKAGE: &str = "e2fsprogs (>= 1.47.1, from bookworm-backports on bookworm) and libarchive13";

/// A host program could not do its job.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    /// The program is not installed.
    #[error("{tool} is not installed: install the Debian package {package}")]
    Missing {
        /// The program.
        tool: &'static str,
        /// The Debian package that provides it.
        package: &'static str,
    },
    /// The program is too old.
    #[error("{tool} {found} is too old: version {needed} or later is needed; install the Debian package {package}")]
    TooOld {
        /// The program.
        tool: &'static str,
        /// The version found.
        found: String,
        /// The minimum version.
        needed: &'static str,
        /// Where to get a newer one.
        package: &'static str,
    },
    /// The program exited with failure.
    #[error("{tool} failed ({status}){}", if log_tail.is_empty() { String::new() } else { format!("; last output:\n{log_tail}") })]
    Failed {
        /// The program.
        tool: &'static str,
        /// Its exit status.
        status: ExitStatus,
        /// The end of its output.
        log_tail: String,
    },
    /// A file operation failed.
    #[error(transparent)]
    Io(#[from] PathError),
    /// SIGINT or SIGTERM arrived while it ran.
    #[error(transparent)]
    Interrupted(#[from] Interrupted),
}

/// A command with nothing of the host's environment: fixed PATH, locale,
/// timezone, umask and working directory (`work`), plus SOURCE_DATE_EPOCH.
pub fn clean_command(program: &str, epoch: i64, work: &Path) -> Command {
    let mut cmd = Command::new(program);
    cmd.current_dir(work)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("LC_ALL", "C.UTF-8")
        .env("TZ", "UTC")
        .env("TMPDIR", work)
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
pub fn run_logged(tool: &'static str, package: &'static str, cmd: &mut Command, log: &Path) -> Result<(), ToolError> {
    tracing::info!("running {tool}");
    let log_file = File::create(log).map_err(path_error("create", log))?;
    cmd.stdin(Stdio::null()).stdout(log_file.try_clone().map_err(path_error("open", log))?).stderr(log_file);
    let mut child = Supervised::spawn(tool, cmd).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => ToolError::Missing { tool, package },
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
    Err(ToolError::Failed { tool, status, log_tail: crate::diagnostics::tail_of(log, 25) })
}

/// Runs `tool arg` to see that it exists; returns its output.
pub fn probe(tool: &'static str, arg: &str, package: &'static str) -> Result<std::process::Output, ToolError> {
    Command::new(tool).arg(arg).stdin(Stdio::null()).output().map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => ToolError::Missing { tool, package },
        _ => path_error("run", Path::new(tool))(e).into(),
    })
}

/// Fails unless mkfs.ext4 can populate a filesystem from a tar.
pub fn check_mke2fs() -> Result<(), ToolError> {
    let out = probe("mke2fs", "-V", E2FSPROGS_PACKAGE)?;
    let text = String::from_utf8_lossy(&out.stderr);
    let found = text.split_whitespace().nth(1).unwrap_or_default().to_string();
    let mut parts = found.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let version = (parts.next().unwrap_or(0), parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if version < MKE2FS_MIN {
        return Err(ToolError::TooOld { tool: "mkfs.ext4", found, needed: "1.47.1", package: E2FSPROGS_PACKAGE });
    }
    Ok(())
}

/// Derives a fixed UUID (version-4 layout) from a name and a purpose, so
/// filesystems made for one name always carry the same identifiers.
pub fn fixed_uuid(name: &str, purpose: &str) -> String {
    let d = Sha256::digest(format!("reprovm:{name}:{purpose}"));
    let mut b = [0u8; 16];
    b.copy_from_slice(&d[..16]);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

/// An ext4 filesystem image to make from a tar.
#[derive(Clone, Debug)]
pub struct Ext4Spec {
    /// The tar whose entries (paths, modes, owners, mtimes) populate it.
    pub tar: PathBuf,
    /// The image file to write.
    pub image: PathBuf,
    /// Size in MiB.
    pub size_mib: u64,
    /// Filesystem label.
    pub label: &'static str,
    /// Name the UUID and directory hash seed are derived from: one name,
    /// one UUID and one readdir order, whoever makes the filesystem.
    pub uuid_name: String,
    /// Owner of the root directory (uid, gid).
    pub root_owner: (u32, u32),
    /// Timestamp of everything mke2fs itself creates.
    pub epoch: i64,
}

/// Makes the filesystem: fixed configuration, UUID, hash seed and clock, no
/// journal (nothing needs crash recovery: an image is rebuilt, a scratch
/// disk thrown away), inode tables written now rather than by the guest.
/// `work` holds the configuration file and the log.
pub fn make_ext4(spec: &Ext4Spec, work: &Path) -> Result<(), ToolError> {
    let conf = work.join("mke2fs.conf");
    fs::write(&conf, MKE2FS_CONF).map_err(path_error("write", &conf))?;
    let mut mkfs = clean_command("mkfs.ext4", spec.epoch, work);
    mkfs.env("MKE2FS_CONFIG", &conf)
        .env("E2FSPROGS_FAKE_TIME", spec.epoch.to_string())
        .args(["-q", "-F", "-t", "ext4", "-O", "^has_journal", "-m", "0", "-L", spec.label])
        .arg("-U")
        .arg(fixed_uuid(&spec.uuid_name, "rootfs"))
        .arg("-E")
        .arg(format!(
            "hash_seed={},root_owner={}:{},lazy_itable_init=0,nodiscard",
            fixed_uuid(&spec.uuid_name, "hash-seed"),
            spec.root_owner.0,
            spec.root_owner.1
        ))
        .arg("-d")
        .arg(&spec.tar)
        .arg(&spec.image)
        .arg(format!("{}M", spec.size_mib));
    run_logged("mkfs.ext4", E2FSPROGS_PACKAGE, &mut mkfs, &work.join("mkfs.log"))
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
}
