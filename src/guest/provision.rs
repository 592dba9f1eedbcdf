//! The `provision/` scripts, built into the binary: the guest boot path that
//! an image build installs into the image (init, sshd's configuration, the
//! initrd builder) and the scripts a build sends over SSH. An installed
//! reprovm needs no checkout of its source to build the default image.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::path_error::{path_error, PathError};

/// Mounts the scratch disk in the guest (run as root).
pub const PREPARE_BUILD: &str = include_str!("../../provision/prepare-build");
/// Collects the artifacts onto the output disk (run as root)…
pub const COLLECT_ARTIFACTS: &str = include_str!("../../provision/collect-artifacts");
/// …after it made the build user list and archive them with this.
pub const ARCHIVE_ARTIFACTS: &str = include_str!("../../provision/archive-artifacts");

/// One file of `provision/`: its name, contents and whether it is executable.
pub struct ProvisionFile {
    /// File name inside `provision/`.
    pub name: &'static str,
    /// Its bytes.
    pub contents: &'static str,
    /// Mode 0755 rather than 0644.
    pub executable: bool,
}

/// Every file of `provision/` (a test checks the table against the directory).
pub const FILES: &[ProvisionFile] = &[
    ProvisionFile { name: "archive-artifacts", contents: ARCHIVE_ARTIFACTS, executable: true },
    ProvisionFile { name: "collect-artifacts", contents: COLLECT_ARTIFACTS, executable: true },
    ProvisionFile { name: "customize-image", contents: include_str!("../../provision/customize-image"), executable: true },
    ProvisionFile { name: "init", contents: include_str!("../../provision/init"), executable: true },
    ProvisionFile { name: "initrd-init", contents: include_str!("../../provision/initrd-init"), executable: true },
    ProvisionFile { name: "inittab", contents: include_str!("../../provision/inittab"), executable: false },
    ProvisionFile { name: "mkinitrd", contents: include_str!("../../provision/mkinitrd"), executable: true },
    ProvisionFile { name: "prepare-build", contents: PREPARE_BUILD, executable: true },
    ProvisionFile { name: "sshd_config", contents: include_str!("../../provision/sshd_config"), executable: false },
];

/// Writes every file of [`FILES`] into the existing directory `dir`, with
/// its mode.
pub fn write_provision(dir: &Path) -> Result<(), PathError> {
    for file in FILES {
        let path = dir.join(file.name);
        fs::write(&path, file.contents).map_err(path_error("write", &path))?;
        let mode = if file.executable { 0o755 } else { 0o644 };
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).map_err(path_error("set permissions of", &path))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table is `provision/` exactly: every file, its bytes, its mode.
    #[test]
    fn table_matches_the_directory() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("provision");
        let mut on_disk: Vec<String> = fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        on_disk.sort();
        let names: Vec<&str> = FILES.iter().map(|f| f.name).collect();
        assert_eq!(on_disk, names, "provision/ and FILES list different files");
        for file in FILES {
            let path = dir.join(file.name);
            assert_eq!(fs::read_to_string(&path).unwrap(), file.contents, "{}", file.name);
            let executable = fs::metadata(&path).unwrap().permissions().mode() & 0o111 != 0;
            assert_eq!(executable, file.executable, "{}: mode", file.name);
        }
    }

    #[test]
    fn written_files_have_their_modes() {
        let dir = tempfile::tempdir().unwrap();
        write_provision(dir.path()).unwrap();
        for file in FILES {
            let mode = fs::metadata(dir.path().join(file.name)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, if file.executable { 0o755 } else { 0o644 }, "{}", file.name);
        }
    }
}
