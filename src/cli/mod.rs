//! The command line: clap definitions, the error type every command returns
//! (with its exit code), logging set-up, and dispatch to the command functions.

mod attest;
mod build;
mod doctor;
mod generate;
mod image;
mod run;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::egress::{DownloadCache, EgressError};
use crate::image::build::ImageBuildError;
use crate::image::fetch::FetchError;
use crate::image::pin::BadPin;
use crate::image::StoreError;
use crate::interrupt::{self, Interrupted};
use crate::rebuild::recipe::{BuildRecipeError, MachineSection, FLAG_FIELDS};
use crate::vm::{AccelChoice, VmError};
use crate::{Exit, ExitCode};

/// Rebuild software inside a pinned, checksummed builder VM and check the bytes.
#[derive(Debug, Parser)]
#[command(name = "reprovm", version, about)]
pub struct Args {
    /// More detail in the logs (repeat for even more).
    #[arg(short, long, global = true, action = clap::ArgAction::Count, conflicts_with = "quiet")]
    pub verbose: u8,
    /// Only warnings, errors and what goes to stdout: no stage lines, no
    /// live build output (build.log still has it), no progress bars.
    #[arg(short, long, global = true)]
    pub quiet: bool,
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
    /// Boot the builder, run one command as the build user, tear down; exits with its status.
    Run {
        /// The machine to boot.
        #[command(flatten)]
        machine: MachineArgs,
        /// The command and its arguments (after --).
        #[arg(last = true, required = true, value_name = "CMD")]
        command: Vec<String>,
    },
    /// Rebuild a source tree in the builder: artifacts, SHA256SUMS, result.json,
    /// provenance.intoto.json, build.log and serial.log in --out.
    Build(build::BuildArgs),
    /// Rebuild, then compare with published hashes; exit 1 when any artifact
    /// differs, is missing or is unexpected. With --attestations: no rebuild,
    /// check that N trusted rebuilders' signed provenance attests the bytes.
    Verify {
        /// The build.
        #[command(flatten)]
        build: build::BuildArgs,
        /// The published SHA256SUMS or result.json (or a provenance envelope).
        #[arg(long, value_name = "FILE", required_unless_present = "attestations")]
        expect: Option<PathBuf>,
        /// Run diffoscope on each differing artifact (reports in OUT/diffoscope/).
        /// diffoscope opens the rebuilt and the published files on this host
        /// with dozens of external tools: ask for it only for files you are
        /// willing to open (docs/security.md).
        #[arg(long)]
        diffoscope: bool,
        /// Published attestations to check instead of rebuilding.
        #[command(flatten)]
        agreement: attest::AgreementArgs,
    },
    /// Compare recorded results (result.json, SHA256SUMS or DSSE provenance
    /// envelopes) of several builders without rebuilding; exit 1 when they differ.
    Compare {
        /// Two or more result.json, SHA256SUMS or provenance envelope files.
        #[arg(required = true, num_args = 2.., value_name = "RESULT")]
        results: Vec<PathBuf>,
        /// Print the comparison as JSON (records, artifacts with a status and
        /// a hash per record, differing inputs) instead of the tables.
        #[arg(long)]
        json: bool,
    },
    /// Attestations: sign a build's provenance.
    #[command(subcommand)]
    Attest(attest::AttestCommand),
    /// An interactive shell in the builder, torn down on exit.
    Shell {
        /// The machine to boot.
        #[command(flatten)]
        machine: MachineArgs,
    },
    /// Recorded downloads: move a build's downloads between machines as one file.
    #[command(subcommand)]
    Downloads(DownloadsCommand),
    /// What this host can do: KVM (and why not), QEMU, free space, the image
    /// store and the download cache, in one screen.
    Doctor,
    /// Print the shell completion script for SHELL (bash, zsh, fish, elvish, powershell).
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page reprovm(1), or write one page per command into --dir.
    Man {
        /// Write reprovm.1, reprovm-build.1, … into this directory.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

/// Which image to boot and the guest-visible machine. For `build` and
/// `verify`, flags given override the recipe.
#[derive(Clone, Debug, clap::Args)]
pub struct MachineArgs {
    /// Image pin (sha256:<hex>); default: the recipe's, else the store's only image.
    #[arg(long, env = "REPROVM_IMAGE")]
    pub image: Option<String>,
    /// Accelerator: KVM when it boots (auto, the default), KVM or fail, or TCG.
    #[arg(long, value_enum)]
    pub accel: Option<AccelChoice>,
    /// QEMU binary to run.
    #[arg(long, env = "REPROVM_QEMU", default_value = "qemu-system-x86_64")]
    pub qemu: PathBuf,
    /// Named CPU model, never host or max [default: Nehalem-v1].
    #[arg(long)]
    pub cpu_model: Option<String>,
    /// vCPUs, 1 to 64 [default: 2].
    #[arg(long)]
    pub cpus: Option<u32>,
    /// Memory in MiB, 256 to 262144 [default: 2048].
    #[arg(long)]
    pub memory: Option<u32>,
    /// Guest clock at boot, seconds since 1970 [default: the image's date].
    #[arg(long, allow_negative_numbers = true)]
    pub clock: Option<i64>,
    /// Seconds allowed from QEMU start to an authenticated SSH session.
    #[arg(long, default_value_t = 300)]
    pub boot_timeout: u64,
    /// Keep at most this many MiB of build.log and of serial.log each (and
    /// of the build output shown live); past it the log's last MiB is kept.
    #[arg(long, value_name = "MIB", default_value_t = crate::logs::DEFAULT_LOG_LIMIT_MIB, value_parser = clap::value_parser!(u64).range(1..=1_048_576))]
    pub log_limit: u64,
}

impl MachineArgs {
    /// `base` (a recipe's `[machine]`) with the machine flags given set over it.
    pub fn over(&self, base: &MachineSection) -> MachineSection {
        MachineSection {
            cpu_model: self.cpu_model.clone().or_else(|| base.cpu_model.clone()),
            cpus: self.cpus.or(base.cpus),
            memory_mib: self.memory.or(base.memory_mib),
            clock: self.clock.or(base.clock),
            accel: self.accel.or(base.accel),
            scratch_mib: base.scratch_mib,
        }
    }

    /// Whether a flag set the recipe field `field` (see `FLAG_FIELDS`).
    fn sets(&self, field: &str) -> bool {
        match field {
            "machine.cpu_model" => self.cpu_model.is_some(),
            "machine.cpus" => self.cpus.is_some(),
            "machine.memory_mib" => self.memory.is_some(),
            "machine.clock" => self.clock.is_some(),
            _ => false,
        }
    }
}

/// A recipe field's error in a value that a flag set (`set(field)`), as a
/// usage error naming the flag; other errors as they are.
pub fn name_the_flag(e: BuildRecipeError, set: impl Fn(&str) -> bool) -> Error {
    if let BuildRecipeError::Field { field, value, expected, .. } = &e {
        if let Some((_, flag)) = FLAG_FIELDS.iter().find(|(f, _)| f == field && set(f)) {
            return Error::Usage(format!("invalid value {value:?} for {flag}: {expected}"));
        }
    }
    e.into()
}

/// `reprovm image …`
#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Build a bundle from a recipe and add it to the store; prints sha256:<hex> last.
    Build {
        /// Recipe directory (or its image.toml) [default: the recipe built
        /// into reprovm, vm-images/debian-bookworm-amd64 of its source].
        recipe_dir: Option<PathBuf>,
        /// Also write the bundle to this file.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Package mirror overriding the recipe's (e.g. a snapshot.debian.org URL).
        #[arg(long)]
        mirror: Option<String>,
    },
    /// Add a bundle file (or its transport file) to the store.
    Import {
        /// The bundle file, or a transport file from `image export`.
        file: PathBuf,
        /// The SHA-256 it must have (refused otherwise).
        #[arg(long, value_name = "HEX")]
        sha256: Option<String>,
    },
    /// Write a bundle of the store as a transport file (zstd, about a fifth
    /// of its size) for others to `image fetch` or `image import`; its pin
    /// stays the bundle's.
    Export {
        /// The pin of the bundle.
        pin: String,
        /// The transport file to write (e.g. debian-bookworm-amd64.img.zst).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// zstd level, 1 (fast) to 19 (small).
        #[arg(long, default_value_t = crate::image::transport::DEFAULT_LEVEL, value_parser = clap::value_parser!(i32).range(1..=19))]
        level: i32,
    },
    /// Download a bundle, verify it and add it to the store.
    Fetch {
        /// http:// or https:// URL of the bundle or of its transport file.
        url: String,
        /// The SHA-256 it must have.
        #[arg(long, value_name = "HEX")]
        sha256: String,
    },
    /// List the bundles in the store.
    List {
        /// Print a JSON array (pin, size, name, distribution, architecture, source_date_epoch) instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Re-hash bundles in the store (all of them when no pin is given).
    Verify {
        /// The pin to verify.
        pin: Option<String>,
    },
}

/// `reprovm downloads …`
#[derive(Debug, Subcommand)]
pub enum DownloadsCommand {
    /// Write the downloads a result.json recorded, from the download cache,
    /// into one file (a tar: the list, then each body by its SHA-256).
    Export {
        /// The build's result.json.
        result: PathBuf,
        /// The file to write.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Add the downloads of an exported file to the download cache (each
    /// checked against its SHA-256 first); prints how many.
    Import {
        /// The exported file.
        file: PathBuf,
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
    ImageBuild(#[from] ImageBuildError),
    /// Image fetch failure.
    #[error(transparent)]
    Fetch(#[from] FetchError),
    /// Some store entries do not match their pins.
    #[error("{count} image(s) in the store do not match their pins")]
    Corrupt {
        /// How many.
        count: usize,
    },
    /// No image was named and the store does not hold exactly one.
    #[error("no --image given and {detail}")]
    NoImage {
        /// What the store holds.
        detail: String,
    },
    /// The command after `--` cannot be quoted for the guest shell.
    #[error("the command cannot be passed to the guest (it contains a NUL byte)")]
    BadCommand,
    /// VM failure.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// A build failed.
    #[error(transparent)]
    Rebuild(#[from] crate::rebuild::RebuildError),
    /// The build recipe is unusable.
    #[error(transparent)]
    BuildRecipe(#[from] crate::rebuild::BuildRecipeError),
    /// A result or SHA256SUMS file is unusable.
    #[error(transparent)]
    Record(#[from] crate::rebuild::RecordError),
    /// The download cache, an export file or the egress proxy failed.
    #[error(transparent)]
    Egress(#[from] EgressError),
    /// A command-line value contradicts another or the file system.
    #[error("{0}")]
    Usage(String),
    /// A key file or trusted-keys file is unusable.
    #[error(transparent)]
    Key(#[from] crate::attest::keys::KeyError),
    /// A file to read is missing or over its cap.
    #[error(transparent)]
    Read(#[from] crate::attest::ReadError),
    /// A file cannot be written or hashed.
    #[error(transparent)]
    Io(#[from] crate::path_error::PathError),
    /// A DSSE envelope is unusable.
    #[error("{}", file.display())]
    Envelope {
        /// The file.
        file: PathBuf,
        /// What is wrong.
        #[source]
        source: crate::attest::dsse::EnvelopeError,
    },
    /// A provenance statement is unusable.
    #[error("{}", file.display())]
    Statement {
        /// The file.
        file: PathBuf,
        /// What is wrong.
        #[source]
        source: crate::attest::statement::StatementError,
    },
    /// The attestations directory cannot be listed.
    #[error(transparent)]
    Agreement(#[from] crate::attest::agreement::AgreementError),
    /// The guest's facts could not be taken, or its clock moved.
    #[error(transparent)]
    Facts(#[from] crate::guest::FactsError),
    /// Interrupted by a signal.
    #[error(transparent)]
    Interrupted(#[from] Interrupted),
}

/// Sets up logging to stderr: `info` by default, `-q` for warnings and
/// errors only, `-v` for debug, `-vv` for trace; `REPROVM_LOG` (an
/// env-filter directive) overrides them.
pub fn init_logging(verbose: u8, quiet: bool) {
    let default = match (quiet, verbose) {
        (true, _) => "reprovm=warn",
        (false, 0) => "reprovm=info",
        (false, 1) => "reprovm=debug",
        (false, _) => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("REPROVM_LOG").unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Logs piped to a file stay plain text.
        .with_ansi(crate::terminal::colour())
        .with_writer(|| crate::terminal::LossyStderr)
        .with_target(false)
        .without_time()
        .init();
}

/// An error and its chain of causes, escaped: errors quote names, logs and
/// consoles from outside.
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(&format!("\n  caused by: {cause}"));
        source = cause.source();
    }
    crate::escape::escape(&text).into_owned()
}

/// Prints an error and its chain of causes to stderr, once, escaped.
pub fn report(err: &(dyn std::error::Error + 'static)) {
    crate::terminal::say(format_args!("error: {}", error_chain(err)));
}

/// Runs the command and returns the process exit code. A signal cancels the
/// command: dropping its future stops QEMU and removes every per-run file.
pub async fn execute(args: Args) -> u8 {
    if let Err(e) = interrupt::install() {
        crate::terminal::say(format_args!("error: cannot install signal handlers: {e}"));
        return Exit::Usage.code();
    }
    // `--progress json`: a failure ends the stream with an error event.
    let events = match &args.command {
        Commands::Build(build) | Commands::Verify { build, .. } => build.progress == build::ProgressFormat::Json,
        _ => false,
    };
    let command = async {
        match args.command {
            Commands::Image(cmd) => image::execute(cmd).await.map(Exit::code),
            Commands::Run { machine, command } => run::run_command(machine, command).await,
            Commands::Shell { machine } => run::shell(machine).await,
            Commands::Build(args) => build::build(args).await,
            Commands::Verify { build: args, expect, diffoscope, agreement } => match (&agreement.attestations, expect) {
                (Some(_), _) if events => Err(Error::Usage("--progress json reports a rebuild, which --attestations does not run".into())),
                (Some(_), expect) => attest::verify(agreement, expect, args.sign),
                (None, Some(expect)) => build::verify(args, expect, diffoscope).await,
                (None, None) => Err(Error::Usage("verify needs --expect FILE (or --attestations DIR)".into())),
            },
            Commands::Compare { results, json } => build::compare(results, json),
            Commands::Attest(cmd) => attest::execute(cmd),
            Commands::Downloads(cmd) => downloads(cmd),
            Commands::Doctor => doctor::doctor().await,
            Commands::Completions { shell } => {
                generate::completions(shell);
                Ok(Exit::Ok.code())
            }
            Commands::Man { dir } => generate::man(dir.as_deref()).map(|()| Exit::Ok.code()),
        }
    };
    let result = tokio::select! {
        result = command => result,
        interrupted = interrupt::wait() => Err(Error::Interrupted(interrupted)),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            report(&err);
            if events {
                build::Events::stdout().error(err.exit().code(), &error_chain(&err));
            }
            err.exit().code()
        }
    }
}

/// `reprovm downloads export|import`.
fn downloads(cmd: DownloadsCommand) -> Result<u8, Error> {
    let cache = DownloadCache::open_default()?;
    match cmd {
        DownloadsCommand::Export { result, out } => {
            let record = crate::rebuild::Record::load(&result)?;
            let result = record.result.ok_or_else(|| Error::Usage(format!("{}: a result.json is needed", result.display())))?;
            crate::egress::export(&cache, &result.inputs.downloads, &out)?;
            crate::terminal::say(format_args!("{} downloads written to {}", result.inputs.downloads.len(), out.display()));
        }
        DownloadsCommand::Import { file } => {
            let downloads = crate::egress::import(&cache, &file)?;
            println!("{} downloads imported into the download cache", downloads.len());
        }
    }
    Ok(Exit::Ok.code())
}

fn parse_pin(flag: &'static str, value: &str) -> Result<crate::image::Pin, Error> {
    value.parse().map_err(|source| Error::BadPin { flag, source })
}
