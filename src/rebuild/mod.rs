//! The build stage: a recipe and a source tree go into a verified builder;
//! artifacts, SHA256SUMS and result.json come out. [`stages::rebuild`] runs
//! the stages in order; the guest's side of them is in `guest_steps`.

pub mod artifacts;
pub mod compare;
mod guest_steps;
pub mod output;
pub mod recipe;
pub mod result;
pub mod source;
pub mod stages;

pub use recipe::{BuildRecipe, BuildRecipeError, BUILD_RECIPE_FILE};
pub use result::{BuildResult, Record, RecordError};
pub use stages::{rebuild, BuildRequest, EgressRequest, Progress, Stage};

use crate::diagnostics::section;
use crate::egress::EgressError;
use crate::guest::FactsError;
use crate::host_tools::ToolError;
use crate::image::StoreError;
use crate::interrupt::Interrupted;
use crate::path_error::PathError;
use crate::rebuild::artifacts::ArtifactError;
use crate::rebuild::output::OutputError;
use crate::rebuild::source::SourceError;
use crate::vm::VmError;

/// A build failure, with the exit code it maps to.
#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    /// The output directory cannot be used.
    #[error(transparent)]
    Output(#[from] OutputError),
    /// The image is missing or does not match its pin.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The source tree cannot be archived.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// The scratch disk is too small for the source.
    #[error("the source ({source_mib} MiB) does not fit the scratch disk: raise machine.scratch_mib (now {scratch_mib}) in {}", recipe.display())]
    ScratchTooSmall {
        /// The recipe file.
        recipe: std::path::PathBuf,
        /// Source size in MiB.
        source_mib: u64,
        /// Scratch disk size in MiB.
        scratch_mib: u64,
    },
    /// mkfs.ext4 failed or is missing.
    #[error("cannot make the scratch disk")]
    Tool(#[from] ToolError),
    /// The VM failed (boot, QEMU, SSH).
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Mounting the scratch disk in the guest failed.
    #[error(
        "the builder could not mount the scratch disk (status {status}): {output}{}",
        section("serial console (last lines)", serial_tail)
    )]
    Prepare {
        /// Exit status.
        status: i32,
        /// What it printed.
        output: String,
        /// End of the serial console.
        serial_tail: String,
    },
    /// A provision command failed.
    #[error("provision command {index} failed with status {status}: {command}{}", section("build.log (last lines)", log_tail))]
    Provision {
        /// 1-based index in build.provision.
        index: usize,
        /// The command.
        command: String,
        /// Its exit status.
        status: i32,
        /// End of build.log.
        log_tail: String,
    },
    /// The build command failed.
    #[error("the build command failed with status {status}{}", section("build.log (last lines)", log_tail))]
    Command {
        /// Its exit status.
        status: i32,
        /// End of build.log.
        log_tail: String,
    },
    /// The build ran past build.timeout_secs.
    #[error(
        "the build ran past its limit of {secs} s (build.timeout_secs) and was stopped{}",
        section("build.log (last lines)", log_tail)
    )]
    Timeout {
        /// The limit.
        secs: u64,
        /// End of build.log.
        log_tail: String,
    },
    /// Artifact globs matched nothing, or matched files that cannot be
    /// brought back safely.
    #[error("artifacts: {}", problems.join("; "))]
    Artifacts {
        /// One line per glob or path.
        problems: Vec<String>,
    },
    /// Collecting the artifacts in the guest failed.
    #[error("collecting the artifacts in the builder failed (status {status}): {output}")]
    Collect {
        /// Exit status.
        status: i32,
        /// What it printed.
        output: String,
    },
    /// The host refused or could not write what the guest returned.
    #[error(transparent)]
    Extract(#[from] ArtifactError),
    /// A file operation on the host failed (output or temporary directory).
    #[error(transparent)]
    Io(#[from] PathError),
    /// The egress proxy or its download cache failed, or a replayed
    /// download does not match its record.
    #[error(transparent)]
    Egress(#[from] EgressError),
    /// The guest's facts could not be taken, or its clock moved.
    #[error(transparent)]
    Facts(#[from] FactsError),
    /// Interrupted by a signal.
    #[error(transparent)]
    Interrupted(#[from] Interrupted),
}
