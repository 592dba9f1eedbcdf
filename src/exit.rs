//! The process's exit code for every error a command can end with, in one
//! place. README's "Exit codes" table says the same; `tests/exit_codes.rs`
//! runs one real command per code.
//!
//! | code | meaning |
//! |---|---|
//! | 0 | success; `verify`/`compare`: the artifacts are identical |
//! | 1 | `verify`/`compare`: artifacts differ |
//! | 2 | the input: a flag, a recipe, a source tree, a file to read, a missing image, a host program that is missing or too old; fix it and run again |
//! | 3 | a pinned input does not match its pin: an image, a recorded download, `--sha256` |
//! | 4 | the machinery failed while running: QEMU, KVM, the guest, SSH, a host tool that failed, the network, the host's disk (full, I/O error) |
//! | 5 | the build failed: a provision or build command, its time limit, its artifacts (unmatched globs, refused entries) |
//! | 130 | interrupted by SIGINT or SIGTERM |

use std::io::ErrorKind;

use crate::attest::agreement::AgreementError;
use crate::cli::Error;
use crate::egress::EgressError;
use crate::host_tools::ToolError;
use crate::image::build::ImageBuildError;
use crate::image::fetch::FetchError;
use crate::image::StoreError;
use crate::path_error::PathError;
use crate::rebuild::artifacts::ArtifactError;
use crate::rebuild::output::OutputError;
use crate::rebuild::source::SourceError;
use crate::rebuild::RebuildError;
use crate::vm::VmError;

/// The process exit codes of the CLI contract (the table above).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// Success, or the artifacts are identical.
    Ok = 0,
    /// Artifacts differ.
    Differ = 1,
    /// The input needs fixing: usage, recipe, files, host programs.
    Usage = 2,
    /// A pinned input does not match its pin.
    PinMismatch = 3,
    /// The machinery failed while running: VM, SSH, host tools, network, disk.
    Failed = 4,
    /// The build failed.
    BuildFailed = 5,
    /// Interrupted by SIGINT or SIGTERM.
    Interrupted = 130,
}

impl Exit {
    /// The numeric process exit status.
    pub fn code(self) -> u8 {
        self as u8
    }
}

/// The exit code an error ends the process with.
pub trait ExitCode {
    /// The code (see the module's table).
    fn exit(&self) -> Exit;
}

impl ExitCode for Error {
    fn exit(&self) -> Exit {
        match self {
            Error::Store(e) => e.exit(),
            Error::ImageBuild(e) => e.exit(),
            Error::Fetch(e) => e.exit(),
            Error::Vm(e) => e.exit(),
            Error::Rebuild(e) => e.exit(),
            Error::Egress(e) => e.exit(),
            Error::Io(e) => e.exit(),
            Error::Agreement(AgreementError::List(e)) => e.exit(),
            Error::Corrupt { .. } => Exit::PinMismatch,
            Error::Facts(_) => Exit::Failed,
            Error::Interrupted(_) => Exit::Interrupted,
            Error::BadPin { .. }
            | Error::NoImage { .. }
            | Error::BadCommand
            | Error::BuildRecipe(_)
            | Error::Record(_)
            | Error::Usage(_)
            | Error::Key(_)
            | Error::Read(_)
            | Error::Envelope { .. }
            | Error::Statement { .. } => Exit::Usage,
        }
    }
}

/// A file operation: what the user named is missing, unreachable or of the
/// wrong kind (2), or the host failed under it: a full disk, an I/O error (4).
impl ExitCode for PathError {
    fn exit(&self) -> Exit {
        match self.source.kind() {
            ErrorKind::NotFound
            | ErrorKind::PermissionDenied
            | ErrorKind::AlreadyExists
            | ErrorKind::IsADirectory
            | ErrorKind::NotADirectory
            | ErrorKind::DirectoryNotEmpty
            | ErrorKind::InvalidInput
            | ErrorKind::InvalidData
            | ErrorKind::InvalidFilename
            | ErrorKind::ReadOnlyFilesystem
            | ErrorKind::FileTooLarge => Exit::Usage,
            _ => Exit::Failed,
        }
    }
}

impl ExitCode for StoreError {
    fn exit(&self) -> Exit {
        match self {
            StoreError::PinMismatch { .. } => Exit::PinMismatch,
            StoreError::Io(e) => e.exit(),
            // A file or download that ends early or does not decompress is
            // the input's fault; a connection that broke is the network's.
            StoreError::Read { source, .. } => match source.kind() {
                ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::TimedOut | ErrorKind::BrokenPipe => Exit::Failed,
                _ => Exit::Usage,
            },
            StoreError::NoCacheDir | StoreError::Bundle { .. } | StoreError::TooLarge { .. } | StoreError::NotFound { .. } => Exit::Usage,
        }
    }
}

impl ExitCode for ToolError {
    fn exit(&self) -> Exit {
        match self {
            ToolError::Missing { .. } | ToolError::TooOld { .. } => Exit::Usage,
            ToolError::Failed { .. } => Exit::Failed,
            ToolError::Io(e) => e.exit(),
            ToolError::Interrupted(_) => Exit::Interrupted,
        }
    }
}

impl ExitCode for ImageBuildError {
    fn exit(&self) -> Exit {
        match self {
            ImageBuildError::Recipe(_) | ImageBuildError::BadMirror { .. } => Exit::Usage,
            ImageBuildError::Tool(e) => e.exit(),
            ImageBuildError::Incomplete { .. } => Exit::Failed,
            ImageBuildError::Io(e) => e.exit(),
            ImageBuildError::Store(e) => e.exit(),
        }
    }
}

impl ExitCode for FetchError {
    fn exit(&self) -> Exit {
        match self {
            FetchError::Scheme { .. } => Exit::Usage,
            FetchError::Request { .. } => Exit::Failed,
            FetchError::Store(e) => e.exit(),
        }
    }
}

impl ExitCode for EgressError {
    fn exit(&self) -> Exit {
        match self {
            EgressError::HashMismatch { .. } => Exit::PinMismatch,
            EgressError::Io(e) => e.exit(),
            EgressError::NoCacheDir
            | EgressError::NotCached { .. }
            | EgressError::BadDownload { .. }
            | EgressError::BadExport { .. }
            | EgressError::Manifest { .. } => Exit::Usage,
        }
    }
}

impl ExitCode for VmError {
    fn exit(&self) -> Exit {
        match self {
            VmError::Image(e) => e.exit(),
            VmError::MissingProgram { .. } => Exit::Usage,
            VmError::Io(e) => e.exit(),
            VmError::Overlay(_)
            | VmError::KvmUnusable(_)
            | VmError::KvmFailed(_)
            | VmError::QemuExited { .. }
            | VmError::BootTimeout { .. }
            | VmError::Hung { .. }
            | VmError::Panicked { .. }
            | VmError::Stopped { .. }
            | VmError::Qmp(_)
            | VmError::Ssh { .. }
            | VmError::Keys(_) => Exit::Failed,
        }
    }
}

impl ExitCode for RebuildError {
    fn exit(&self) -> Exit {
        match self {
            RebuildError::Output(OutputError::Io(e)) | RebuildError::Io(e) => e.exit(),
            RebuildError::Output(_) | RebuildError::ScratchTooSmall { .. } => Exit::Usage,
            RebuildError::Store(e) => e.exit(),
            RebuildError::Source(SourceError::Io(e)) => e.exit(),
            RebuildError::Source(SourceError::Interrupted(_)) => Exit::Interrupted,
            RebuildError::Source(_) => Exit::Usage,
            RebuildError::Tool(e) => e.exit(),
            RebuildError::Vm(e) => e.exit(),
            RebuildError::Egress(e) => e.exit(),
            RebuildError::Prepare { .. } | RebuildError::Collect { .. } | RebuildError::Facts(_) => Exit::Failed,
            RebuildError::Provision { .. }
            | RebuildError::Command { .. }
            | RebuildError::Timeout { .. }
            | RebuildError::Artifacts { .. }
            | RebuildError::Extract(ArtifactError::Unsafe { .. } | ArtifactError::Archive(_)) => Exit::BuildFailed,
            RebuildError::Extract(ArtifactError::Write(e)) => e.exit(),
            RebuildError::Extract(ArtifactError::Interrupted(_)) | RebuildError::Interrupted(_) => Exit::Interrupted,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::path::PathBuf;

    use super::*;

    fn path_error(kind: ErrorKind) -> PathError {
        PathError { action: "write", path: PathBuf::from("out/big.iso"), source: io::Error::from(kind) }
    }

    #[test]
    fn a_full_disk_is_a_failure_a_missing_file_is_the_input() {
        assert_eq!(path_error(ErrorKind::StorageFull).exit(), Exit::Failed);
        assert_eq!(RebuildError::Extract(ArtifactError::Write(path_error(ErrorKind::StorageFull))).exit(), Exit::Failed);
        assert_eq!(path_error(ErrorKind::NotFound).exit(), Exit::Usage);
        assert_eq!(Error::Io(path_error(ErrorKind::PermissionDenied)).exit(), Exit::Usage);
    }

    #[test]
    fn a_host_tool_fails_the_same_way_in_an_image_build_and_a_rebuild() {
        let status = || std::os::unix::process::ExitStatusExt::from_raw(1 << 8);
        let failed = || ToolError::Failed { tool: "mkfs.ext4", status: status(), log_tail: String::new() };
        assert_eq!(ImageBuildError::Tool(failed()).exit(), Exit::Failed);
        assert_eq!(RebuildError::Tool(failed()).exit(), Exit::Failed);
        let missing = || ToolError::Missing { tool: "mmdebstrap", package: "mmdebstrap" };
        assert_eq!(ImageBuildError::Tool(missing()).exit(), Exit::Usage);
        assert_eq!(RebuildError::Tool(missing()).exit(), Exit::Usage);
        assert_eq!(VmError::MissingProgram { program: "qemu-system-x86_64".into(), package: "qemu-system-x86" }.exit(), Exit::Usage);
    }
}
