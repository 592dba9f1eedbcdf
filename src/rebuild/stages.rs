//! The stages of a rebuild, in order: verify the image (while the rest
//! goes on), archive the source onto a scratch disk, boot, build in the
//! guest ([`crate::rebuild::guest_steps`]), collect the artifacts onto the
//! output disk, stop QEMU, extract and hash them, write SHA256SUMS and
//! result.json, and move the output directory into place. [`rebuild`] runs
//! them; each stage is one [`stage`] call, which reports and times it.

use std::fs::{self, File};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::egress::{AllowedHost, Download, DownloadCache, EgressMode, EgressPolicy, Proxy, DEFAULT_DOWNLOAD_LIMIT};
use crate::escape::escape;
use crate::guest::contract::{ARTIFACT_GLOBS_FILE, OUTPUT_SERIAL, SCRATCH_SERIAL};
use crate::guest::{FirstContact, GuestFacts};
use crate::host_tools::{make_ext4, Ext4Spec};
use crate::image::{ImageCheck, OpenImage, Pin, Store};
use crate::path_error::path_error;
use crate::rebuild::artifacts::{self, Artifact};
use crate::rebuild::guest_steps::{guest_build, guest_collect, in_guest};
use crate::rebuild::output::OutputDir;
use crate::rebuild::recipe::{BuildRecipe, MachineConfig};
use crate::rebuild::result::{BuildResult, EgressRecord, Inputs, MachineRecord, RecipeRecord, Timings, RESULT_FORMAT};
use crate::rebuild::source::SourceTree;
use crate::rebuild::RebuildError;
use crate::vm::{BootOptions, EgressRelay, ExtraDisk, LaunchedMachine, Machine, Network};

/// One build to run, validated by the command line.
#[derive(Clone, Debug)]
pub struct BuildRequest {
    /// The source directory.
    pub source: PathBuf,
    /// The recipe file, as given.
    pub recipe_file: PathBuf,
    /// The recipe with command-line overrides applied.
    pub recipe: BuildRecipe,
    /// Its machine, resolved (the defaults for what neither set).
    pub machine: MachineConfig,
    /// The image to boot.
    pub image: Pin,
    /// The store holding it.
    pub store: Store,
    /// The QEMU binary.
    pub qemu: PathBuf,
    /// Limit from QEMU start to an authenticated SSH session.
    pub boot_timeout: Duration,
    /// The output directory.
    pub out: PathBuf,
    /// The most bytes kept of build.log and of serial.log each.
    pub log_limit: u64,
    /// What the user adds to a build with an allow list.
    pub egress: EgressRequest,
    /// The key that signs the provenance (provenance.intoto.dsse.json).
    pub sign: Option<crate::attest::keys::SigningKey>,
}

/// The hosts a build may reach and how (docs/network.md), resolved from the
/// recipe's allow list and the command line.
#[derive(Clone, Debug, Default)]
pub struct EgressRequest {
    /// The recipe's `build.network.allow`.
    pub allow: Vec<AllowedHost>,
    /// `--allow` hosts: allowed even where they resolve to this host or its
    /// private network.
    pub allow_cli: Vec<AllowedHost>,
    /// `--replay`: the result.json and the downloads it recorded; the build
    /// then runs with no network at all.
    pub replay: Option<(PathBuf, Vec<Download>)>,
    /// `--replay-fetch`: a recorded download missing from the cache may be
    /// fetched from its URL (and must match its hash).
    pub fetch_missing: bool,
}

/// The stages a build reports, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// The source archived onto the scratch disk.
    Source,
    /// The builder booted, its facts taken.
    Boot,
    /// The provision and build commands.
    Build,
    /// The artifacts collected, QEMU stopped, the artifacts extracted.
    Fetch,
}

impl Stage {
    /// Its stable name (`--progress json`).
    pub fn name(self) -> &'static str {
        match self {
            Stage::Source => "source",
            Stage::Boot => "boot",
            Stage::Build => "build",
            Stage::Fetch => "fetch",
        }
    }

    /// What a person reads while it runs.
    pub fn what(self) -> &'static str {
        match self {
            Stage::Source => "archiving the source",
            Stage::Boot => "booting the builder",
            Stage::Build => "building",
            Stage::Fetch => "fetching the artifacts",
        }
    }
}

/// Where a build reports its stages: a spinner on a terminal, plain lines
/// otherwise.
pub trait Progress: Send + Sync {
    /// A stage begins; `streams_output` when its output follows on stderr.
    fn begin(&self, stage: Stage, streams_output: bool);
    /// The stage ended; `summary` says what it did.
    fn end(&self, stage: Stage, summary: &str, took: Duration);
    /// The current stage's bar, on which it may show what it is at (hidden
    /// when none is drawn).
    fn bar(&self) -> indicatif::ProgressBar;
}

/// Runs `what` on a blocking thread (hashing, archiving, SSH).
async fn blocking<T: Send + 'static>(what: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(what).await.expect("a build thread panicked")
}

/// The scratch and output disks, in a private directory removed on drop.
struct Disks {
    dir: tempfile::TempDir,
}

impl Disks {
    fn scratch(&self) -> PathBuf {
        self.dir.path().join("scratch.img")
    }
    fn output(&self) -> PathBuf {
        self.dir.path().join("output.img")
    }
}

/// The source stage's outcome.
struct Prepared {
    disks: Disks,
    source: crate::rebuild::source::SourceRecord,
    epoch: i64,
    epoch_from: &'static str,
}

/// Archives the source onto a fresh scratch disk and makes the (sparse)
/// output disk. The output directory and its staging directory are left out
/// of a plain source tree (with the default `SRC/out` both lie inside).
fn prepare_disks(req: &BuildRequest, staging: &Path, machine_clock: i64) -> Result<Prepared, RebuildError> {
    let tree = SourceTree::scan(&req.source, &[&req.out, staging])?;
    let (epoch, epoch_from) = match (req.recipe.build.source_date_epoch, tree.last_commit_time) {
        (Some(e), _) => (e, "recipe"),
        (None, Some(e)) => (e, "git"),
        (None, None) => (machine_clock, "clock"),
    };
    let source = tree.record(epoch)?;
    let scratch_mib = req.machine.scratch_mib;
    let source_mib = source.bytes.div_ceil(1 << 20);
    if source_mib + source_mib / 5 + 64 > scratch_mib {
        return Err(RebuildError::ScratchTooSmall { recipe: req.recipe_file.clone(), source_mib, scratch_mib });
    }
    let tmp = std::env::temp_dir();
    let dir = tempfile::Builder::new()
        .prefix("reprovm-build-")
        .permissions(fs::Permissions::from_mode(0o700))
        .tempdir_in(&tmp)
        .map_err(path_error("create a build directory in", &tmp))?;
    let disks = Disks { dir };
    let tar = disks.dir.path().join("scratch.tar");
    let globs: Vec<u8> = req.recipe.build.artifacts.iter().flat_map(|g| g.bytes().chain([0])).collect();
    tree.write_scratch_tar(&tar, epoch, &[(ARTIFACT_GLOBS_FILE, globs)])?;
    make_ext4(
        &Ext4Spec {
            tar: tar.clone(),
            image: disks.scratch(),
            size_mib: scratch_mib,
            label: SCRATCH_SERIAL,
            uuid_name: SCRATCH_SERIAL.to_string(),
            root_owner: (0, 0),
            epoch,
        },
        disks.dir.path(),
    )?;
    let _ = fs::remove_file(&tar);
    let output = disks.output();
    File::create(&output).and_then(|f| f.set_len(scratch_mib << 20)).map_err(path_error("create", &output))?;
    Ok(Prepared { disks, source, epoch, epoch_from })
}

/// Runs the build. On failure after the build began, the output directory
/// receives build.log and serial.log (never SHA256SUMS or result.json).
pub async fn rebuild(req: BuildRequest, progress: &dyn Progress) -> Result<BuildResult, RebuildError> {
    let output = OutputDir::prepare(&req.out)?;
    match run_stages(&req, &output, progress).await {
        Ok(result) => {
            output.commit()?;
            Ok(result)
        }
        Err(e) => {
            // Only the logs: never an artifact, SHA256SUMS or result.json.
            let _ = output.commit_logs_only();
            Err(e)
        }
    }
}

/// One stage: announced on `progress`, timed, and ended with the summary
/// its work returns. Returns the work's value and how long the stage took.
async fn stage<T>(
    progress: &dyn Progress,
    name: Stage,
    streams_output: bool,
    work: impl std::future::Future<Output = Result<(T, String), RebuildError>>,
) -> Result<(T, Duration), RebuildError> {
    progress.begin(name, streams_output);
    let start = Instant::now();
    let (value, summary) = work.await?;
    let took = start.elapsed();
    progress.end(name, &summary, took);
    Ok((value, took))
}

/// The guest's clock, decided from the inputs alone: the recipe's
/// `machine.clock`, else the image's date, or SOURCE_DATE_EPOCH when that
/// is later (sources from the future make make(1) and configure scripts
/// misbehave).
struct ClockPolicy {
    recipe: Option<i64>,
    image_date: i64,
}

impl ClockPolicy {
    /// SOURCE_DATE_EPOCH when neither the recipe nor git gives one.
    fn fallback_epoch(&self) -> i64 {
        self.recipe.unwrap_or(self.image_date)
    }

    /// The clock at boot for a build whose SOURCE_DATE_EPOCH is `epoch`.
    fn at_boot(&self, epoch: i64) -> i64 {
        let clock = self.recipe.unwrap_or(self.image_date.max(epoch));
        if clock < epoch {
            tracing::warn!(
                "machine.clock ({clock}) is earlier than SOURCE_DATE_EPOCH ({epoch}): the source files will lie in the guest's future"
            );
        }
        clock
    }
}

async fn run_stages(req: &BuildRequest, output: &OutputDir, progress: &dyn Progress) -> Result<BuildResult, RebuildError> {
    let total = Instant::now();
    let mut timings = Timings::default();

    // The image is hashed on its own thread while the source is archived,
    // QEMU starts and the kernel boots; the guest gets its first command
    // only once the hash matched (Machine::boot).
    let (store, pin) = (req.store.clone(), req.image);
    let (image, check) = blocking(move || store.open_checking(pin)).await?;
    let clock = ClockPolicy { recipe: req.machine.clock, image_date: image.stored.layout.metadata.source_date_epoch };

    let (prepared, took) = stage(progress, Stage::Source, false, async {
        let (req, staging, fallback) = (req.clone(), output.path().to_path_buf(), clock.fallback_epoch());
        let prepared = blocking(move || prepare_disks(&req, &staging, fallback)).await?;
        let summary = format!(
            "source archived: {} files, {:.1} MiB, sha256:{} (SOURCE_DATE_EPOCH {} from {})",
            prepared.source.files,
            prepared.source.bytes as f64 / 1048576.0,
            &prepared.source.sha256[..16],
            prepared.epoch,
            prepared.epoch_from
        );
        Ok((prepared, summary))
    })
    .await?;
    timings.source = took.as_secs_f64();

    let egress = start_egress(req, prepared.disks.dir.path())?;
    let opts = BootOptions {
        spec: req.machine.spec(clock.at_boot(prepared.epoch)),
        accel: req.machine.accel,
        qemu: req.qemu.clone(),
        boot_timeout: req.boot_timeout,
        runtime_dir: std::env::temp_dir(),
        disks: vec![
            ExtraDisk { path: prepared.disks.scratch(), serial: SCRATCH_SERIAL.into() },
            ExtraDisk { path: prepared.disks.output(), serial: OUTPUT_SERIAL.into() },
        ],
        network: req.recipe.build.network.machine_network(),
        egress: egress.as_ref().map(|e| e.relay.clone()),
        log_limit: req.log_limit,
    };
    let guest = guest_stages(req, (&image, check), &opts, &prepared, output, progress, &mut timings).await;
    let egress = match egress {
        Some(egress) => Some(egress.finish(req).await?),
        None => None,
    };
    let (launched, facts, artifacts) = guest?;
    let machine = MachineRecord { launched, network: opts.network, scratch_mib: req.machine.scratch_mib };
    timings.total = total.elapsed().as_secs_f64();
    let result = assemble_result(req, &image, prepared, machine, (facts, artifacts), egress, timings)?;
    write_results(output.path(), &result)?;
    crate::attest::write_provenance(output.path(), &result, req.sign.as_ref())?;
    Ok(result)
}

/// result.json of a finished build: what went in, the machine, what the
/// guest said, the egress proxy's account and what came out.
fn assemble_result(
    req: &BuildRequest,
    image: &OpenImage,
    prepared: Prepared,
    machine: MachineRecord,
    (guest, outputs): (GuestFacts, Vec<Artifact>),
    egress: Option<(Vec<Download>, EgressRecord)>,
    timings: Timings,
) -> Result<BuildResult, RebuildError> {
    let recipe_sha256 = crate::image::pin::hash_file(&req.recipe_file).map_err(path_error("hash", &req.recipe_file))?.hex();
    let (downloads, egress) = match egress {
        Some((downloads, record)) => (downloads, Some(record)),
        None => (Vec::new(), None),
    };
    Ok(BuildResult {
        format: RESULT_FORMAT,
        reprovm_version: env!("CARGO_PKG_VERSION").to_string(),
        inputs: Inputs {
            image: req.image.to_string(),
            image_name: image.stored.layout.metadata.name.clone(),
            source: prepared.source,
            source_date_epoch: prepared.epoch,
            source_date_epoch_from: prepared.epoch_from.to_string(),
            recipe: RecipeRecord { file: req.recipe_file.clone(), sha256: recipe_sha256, effective: req.recipe.clone() },
            downloads,
        },
        machine,
        guest,
        egress,
        outputs,
        timings,
    })
}

/// Boot, build, collect, stop, extract: the stages with the guest.
async fn guest_stages(
    req: &BuildRequest,
    (image, check): (&OpenImage, ImageCheck),
    opts: &BootOptions,
    prepared: &Prepared,
    output: &OutputDir,
    progress: &dyn Progress,
    timings: &mut Timings,
) -> Result<(LaunchedMachine, GuestFacts, Vec<Artifact>), RebuildError> {
    let serial_copy = output.path().join("serial.log");
    let (mut machine, contact) = stage(progress, Stage::Boot, false, async {
        let mut machine = Machine::boot(image, check, opts).await?;
        let (pinned, started) = (opts.spec.clock, machine.qemu_started);
        let contact = in_guest(&mut machine, &serial_copy, move |session| Ok(FirstContact::take(session, pinned, started)?)).await?;
        let summary = format!(
            "builder booted under {} in {:.1}s, SSH ready; image {} verified meanwhile ({:.1}s)",
            machine.launched.accelerator.as_str(),
            machine.boot_time.as_secs_f64(),
            image.stored.pin,
            machine.image_check.as_secs_f64()
        );
        Ok(((machine, contact), summary))
    })
    .await?
    .0;
    timings.boot = machine.boot_time.as_secs_f64();
    timings.image_verify = machine.image_check.as_secs_f64();

    tracing::info!("building: {}", escape(&req.recipe.build.command));
    let (outcome, _) = stage(progress, Stage::Build, true, async {
        let (req, epoch, log_path) = (req.clone(), prepared.epoch, output.path().join("build.log"));
        let outcome = in_guest(&mut machine, &serial_copy, move |session| guest_build(session, &req, epoch, &log_path)).await?;
        let summary = format!("build finished: the command took {:.1}s", outcome.build.as_secs_f64());
        Ok((outcome, summary))
    })
    .await?;
    timings.prepare = outcome.prepare.as_secs_f64();
    timings.build = outcome.build.as_secs_f64();

    let (launched, facts) = (machine.launched.clone(), contact.facts);
    let (artifacts, took) = stage(progress, Stage::Fetch, false, async {
        let collect_limit = Duration::from_secs(req.recipe.build.timeout_secs);
        in_guest(&mut machine, &serial_copy, move |session| guest_collect(session, collect_limit)).await?;
        machine.stop(Some(&serial_copy)).await;
        let (disk, staging, bar) = (prepared.disks.output(), output.path().to_path_buf(), progress.bar());
        let artifacts: Vec<Artifact> = blocking(move || artifacts::extract(&disk, &staging, &bar)).await?;
        let bytes: u64 = artifacts.iter().map(|a| a.size).sum();
        let summary = format!("{} artifacts fetched, {:.1} MiB", artifacts.len(), bytes as f64 / 1048576.0);
        Ok((artifacts, summary))
    })
    .await?;
    timings.artifacts = took.as_secs_f64();
    Ok((launched, facts, artifacts))
}

/// The egress proxy of one build, on a socket in the build's private
/// directory, and how QEMU reaches it.
struct Egress {
    proxy: Proxy,
    relay: EgressRelay,
}

/// Starts the egress proxy when the build has an allow list (or replays).
fn start_egress(req: &BuildRequest, dir: &Path) -> Result<Option<Egress>, RebuildError> {
    if req.recipe.build.network.machine_network() != Network::Egress {
        return Ok(None);
    }
    let mode = match &req.egress.replay {
        Some((_, downloads)) => EgressMode::Replay { downloads: downloads.clone(), fetch_missing: req.egress.fetch_missing },
        None => EgressMode::Record,
    };
    let policy = EgressPolicy {
        allow: req.egress.allow.clone(),
        allow_private: req.egress.allow_cli.clone(),
        mode,
        download_limit: DEFAULT_DOWNLOAD_LIMIT,
    };
    let socket = dir.join("egress.sock");
    let listener = tokio::net::UnixListener::bind(&socket).map_err(path_error("listen on", &socket))?;
    let program = std::env::current_exe().map_err(path_error("locate", Path::new("the reprovm binary")))?;
    let proxy = Proxy::start(listener, policy, DownloadCache::open_default()?);
    Ok(Some(Egress { proxy, relay: EgressRelay { program, socket } }))
}

impl Egress {
    /// Stops the proxy; its account for result.json. Refused requests are
    /// summed up in one line (escaped); a replayed download whose bytes no longer match
    /// its record fails the build (exit 3).
    async fn finish(self, req: &BuildRequest) -> Result<(Vec<Download>, EgressRecord), RebuildError> {
        let report = self.proxy.finish().await;
        if !report.refused.is_empty() {
            let targets: Vec<String> = report.refused.iter().map(|r| format!("{} {} ({})", r.method, r.target, r.status)).collect();
            tracing::warn!(
                "egress: {} requests refused (result.json egress.refused): {}",
                report.refused.len(),
                escape(&targets.join(", "))
            );
        }
        if !report.tunnels.is_empty() {
            let targets: Vec<String> = report.tunnels.iter().map(|t| format!("{}:{}", t.host, t.port)).collect();
            tracing::warn!(
                "egress: HTTPS to {} went through unrecorded tunnels: a replay cannot serve it (result.json egress.unrecorded_tunnels)",
                escape(&targets.join(", "))
            );
        }
        report.check_hashes()?;
        let names = |hosts: &[AllowedHost]| hosts.iter().map(AllowedHost::to_string).collect();
        let record = EgressRecord {
            allow: names(&req.egress.allow),
            allow_cli: names(&req.egress.allow_cli),
            replayed_from: req.egress.replay.as_ref().map(|(file, _)| file.clone()),
            unrecorded_tunnels: report.tunnels,
            refused: report.refused,
        };
        Ok((report.downloads, record))
    }
}

/// Writes result.json and SHA256SUMS into the staging directory (which
/// appears as the output directory only once complete).
fn write_results(dir: &Path, result: &BuildResult) -> Result<(), RebuildError> {
    let json = serde_json::to_string_pretty(result).expect("a result serializes") + "\n";
    for (name, text) in [("result.json", json), ("SHA256SUMS", artifacts::sha256sums(&result.outputs))] {
        let path = dir.join(name);
        fs::write(&path, text).map_err(path_error("write", &path))?;
    }
    Ok(())
}
