//! The command line: clap definitions, the error type every command returns
//! (with its exit code), logging set-up, and dispatch to the command functions.

mod image;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::image::build::BuildError;
use crate::image::fetch::FetchError;
use crate::image::pin::BadPin;
use crate::image::StoreError;
use crate::interrupt::{self, Interrupted};
use crate::Exit;

/// Rebuild software inside a pinned, checksummed builder VM and check the bytes.
#[derive(Debug, Parser)]
#[command(name = "reprovm", version, about)]
pub struct Args {
    /// More detail in the logs (repeat for even more).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// The command to run.
    #[command(subcommand)]
    pub command: Commands,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Commands {
    /// Builder images: build, import, fetch, list, verify.
    #[command(subcommand)]
    Image(ImageCommand),
}

/// `reprovm image …`
#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Build a bundle from a recipe and add it to the store; prints sha256:<hex> last.
    Build {
        /// Recipe directory (or its image.toml).
        #[arg(default_value = "vm-images/debian-bookworm-amd64")]
        recipe_dir: PathBuf,
        /// Also write the bundle to this file.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Package mirror overriding the recipe's (e.g. a snapshot.debian.org URL).
        #[arg(long)]
        mirror: Option<String>,
    },
    /// Add a bundle file to the store.
    Import {
        /// The bundle file.
        file: PathBuf,
        /// The SHA-256 it must have (refused otherwise).
        #[arg(long, value_name = "HEX")]
        sha256: Option<String>,
    },
    /// Download a bundle, verify it and add it to the store.
    Fetch {
        /// http:// or https:// URL of the bundle.
        url: String,
        /// The SHA-256 it must have.
        #[arg(long, value_name = "HEX")]
        sha256: String,
    },
    /// List the bundles in the store.
    List,
    /// Re-hash bundles in the store (all of them when no pin is given).
    Verify {
        /// The pin to verify.
        pin: Option<String>,
    },
}

/// Any failure of a command, with the exit code it maps to.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A command-line value is invalid.
    #[error("invalid value for {flag}")]
    BadPin {
        /// The flag or argument.
        flag: &'static str,
        /// What is wrong.
        #[source]
        source: BadPin,
    },
    /// Image store failure.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Image build failure.
    #[error("image build failed")]
    Build(#[from] BuildError),
    /// Image fetch failure.
    #[error(transparent)]
    Fetch(#[from] FetchError),
    /// Some store entries do not match their pins.
    #[error("{count} image(s) in the store do not match their pins")]
    Corrupt {
        /// How many.
        count: usize,
    },
    /// Interrupted by a signal.
    #[error(transparent)]
    Interrupted(#[from] Interrupted),
}

impl Error {
    /// The process exit code for this error.
    pub fn exit(&self) -> Exit {
        match self {
            Error::BadPin { .. } => Exit::Usage,
            Error::Store(e) => e.exit(),
            Error::Build(e) => e.exit(),
            Error::Fetch(e) => e.exit(),
            Error::Corrupt { .. } => Exit::PinMismatch,
            Error::Interrupted(_) => Exit::Interrupted,
        }
    }
}

/// Sets up logging to stderr: `info` by default, `-v` for debug, `-vv` for
/// trace; `REPROVM_LOG` (an env-filter directive) overrides both.
pub fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "reprovm=info",
        1 => "reprovm=debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("REPROVM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .init();
}

/// Prints an error and its chain of causes to stderr, once.
pub fn report(err: &(dyn std::error::Error + 'static)) {
    let mut text = format!("error: {err}");
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(&format!("\n  caused by: {cause}"));
        source = cause.source();
    }
    eprintln!("{text}");
}

/// Runs the command and returns the process exit code.
pub async fn run(args: Args) -> Exit {
    if let Err(e) = interrupt::install() {
        eprintln!("error: cannot install signal handlers: {e}");
        return Exit::Usage;
    }
    let result = match args.command {
        Commands::Image(cmd) => image::run(cmd).await,
    };
    match result {
        Ok(exit) => exit,
        Err(err) => {
            report(&err);
            err.exit()
        }
    }
}

fn parse_pin(flag: &'static str, value: &str) -> Result<crate::image::Pin, Error> {
    value.parse().map_err(|source| Error::BadPin { flag, source })
}
