//! reprovm: rebuild software inside a pinned, checksummed builder VM so the
//! bytes that come out do not depend on the host that built them.
//!
//! The pipeline runs down these modules, one stage each (docs/architecture.md):
#![warn(missing_docs)]

/// Attestations: SLSA provenance, DSSE signing with OpenSSH keys, agreement of trusted rebuilders.
pub mod attest;
/// Command-line definitions, validated configuration and the command functions.
pub mod cli;
/// Deadlines for everything that waits: the error says what, how long, and the last cause.
pub mod deadline;
/// What error reports show of the logs: tails, sections, the guest kernel's panic.
pub mod diagnostics;
/// Allow-listed, recorded, replayable network egress: the build's HTTP proxy, download cache, export/import.
pub mod egress;
/// Text from outside escaped before it is printed: no control characters reach a terminal.
pub mod escape;
/// The exit code of every error, in one table.
pub mod exit;
/// The guest stage: per-run SSH keys, the authenticated session, guest facts.
pub mod guest;
/// Host programs that make disks (mmdebstrap, mkfs.ext4), run clean and supervised.
pub mod host_tools;
/// Builder image bundles: pins, the bundle format, the content-addressed store, build, import, fetch.
pub mod image;
/// SIGINT/SIGTERM: a process-wide flag every stage checks or awaits.
pub mod interrupt;
/// Capped logs: the build output and the serial console.
pub mod logs;
/// The error for a failed operation on a path, shared by the stages.
pub mod path_error;
/// Supervised child processes: own process group, graceful stop, always reaped.
pub mod process;
/// The rebuild stage: recipe, source archive, the build in the guest, artifacts, results, comparison.
pub mod rebuild;
/// Spinners, progress bars and colour on stderr: only on a terminal, never with --quiet.
pub mod terminal;
/// The machine stage: QEMU arguments, accelerator choice, QMP, VM lifecycle.
pub mod vm;

pub use exit::{Exit, ExitCode};
