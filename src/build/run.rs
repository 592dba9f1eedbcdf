//! The default chain of build stages: verify the image, archive the source
//! onto a scratch disk, boot, mount and provision, run the build command as
//! the build user in a clean environment, collect the artifacts onto the
//! output disk, stop QEMU, extract and hash them, write SHA256SUMS and
//! result.json, and move the output directory into place.

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::build::artifacts::{self, Artifact};
use crate::build::output::OutputDir;
use crate::build::recipe::BuildRecipe;
use crate::build::result::{BuildResult, EgressRecord, Inputs, MachineRecord, RecipeRecord, Timings, RESULT_FORMAT};
use crate::build::source::SourceTree;
use crate::build::BuildError;
use crate::deadline::Deadline;
use crate::egress::{AllowedHost, Download, DownloadCache, EgressMode, EgressPolicy, Proxy, DEFAULT_DOWNLOAD_LIMIT};
use crate::escape::{escape, EscapingWriter};
use crate::guest::provision::{ARCHIVE_ARTIFACTS, COLLECT_ARTIFACTS, PREPARE_BUILD};
use crate::guest::session::BUILD_USER;
use crate::guest::{GuestError, GuestFacts, GuestSession};
use crate::host_tools::{make_ext4, Ext4Spec};
use crate::image::{ImageCheck, OpenImage, Pin, Store};
use crate::logs::tail_of;
use crate::logs::{CappedLog, SharedLog};
use crate::path_error::path_error;
use crate::vm::{AccelChoice, BootOptions, EgressRelay, ExtraDisk, LaunchedMachine, Machine, Network, VmError, EGRESS_PROXY};

/// Serial numbers the guest scripts find the disks by.
const SCRATCH_SERIAL: &str = "reprovm-scratch";
const OUTPUT_SERIAL: &str = "reprovm-output";
/// Limit for the short guest-side steps (mounting the scratch disk).
const GUEST_STEP_LIMIT: Duration = Duration::from_secs(60);
/// The build directory in the guest.
const BUILD_DIR: &str = "/build/src";
/// PATH of the build.
const BUILD_PATH: &str = "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin";

/// One build to run, validated by the command line.
#[derive(Clone, Debug)]
pub struct BuildRequest {
    /// The source directory.
    pub source: PathBuf,
    /// The recipe file, as given.
    pub recipe_file: PathBuf,
    /// The recipe with command-line overrides applied.
    pub recipe: BuildRecipe,
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

/// Where a build reports its stages: a spinner on a terminal, plain lines
/// otherwise.
pub trait Progress: Send + Sync {
    /// A stage begins; `streams_output` when its output follows on stderr.
    fn begin(&self, what: &str, streams_output: bool);
    /// The current stage ended; `summary` says what it did.
    fn end(&self, summary: &str, took: Duration);
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
    source: crate::build::source::SourceRecord,
    epoch: i64,
    epoch_from: &'static str,
}

/// Archives the source onto a fresh scratch disk and makes the (sparse)
/// output disk. The output directory and its staging directory are left out
/// of a plain source tree (with the default `SRC/out` both lie inside).
fn prepare_disks(req: &BuildRequest, staging: &Path, machine_clock: i64) -> Result<Prepared, BuildError> {
    let tree = SourceTree::scan(&req.source, &[&req.out, staging])?;
    let (epoch, epoch_from) = match (req.recipe.build.source_date_epoch, tree.last_commit_time) {
        (Some(e), _) => (e, "recipe"),
        (None, Some(e)) => (e, "git"),
        (None, None) => (machine_clock, "clock"),
    };
    let source = tree.record(epoch)?;
    let scratch_mib = req.recipe.machine.scratch();
    let source_mib = source.bytes.div_ceil(1 << 20);
    if source_mib + source_mib / 5 + 64 > scratch_mib {
        return Err(BuildError::ScratchTooSmall { recipe: req.recipe_file.clone(), source_mib, scratch_mib });
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
    tree.write_scratch_tar(&tar, epoch, &[("artifacts", globs)])?;
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

/// The egress proxy as the guest reaches it.
fn egress_proxy_url() -> String {
    format!("http://{}:{}", EGRESS_PROXY.0, EGRESS_PROXY.1)
}

/// The build environment: only what reprovm sets (with an allow list, the
/// proxy variables that HTTP clients read), then the recipe's.
fn build_env(recipe: &BuildRecipe, epoch: i64, root: bool) -> Vec<(String, String)> {
    let (user, home) = if root { ("root", "/root") } else { (BUILD_USER, "/build/home") };
    let mut env: std::collections::BTreeMap<String, String> = [
        ("PATH", BUILD_PATH),
        ("HOME", home),
        ("USER", user),
        ("LOGNAME", user),
        ("SHELL", "/bin/sh"),
        ("TMPDIR", "/build/tmp"),
        ("TZ", "UTC"),
        ("LANG", "C.UTF-8"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    env.insert("SOURCE_DATE_EPOCH".into(), epoch.to_string());
    if recipe.build.network.machine_network() == Network::Egress {
        for name in ["http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"] {
            env.insert(name.into(), egress_proxy_url());
        }
    }
    env.extend(recipe.build.env.clone());
    env.into_iter().collect()
}

fn quote(s: &str) -> String {
    shlex::try_quote(s).map(|q| q.into_owned()).unwrap_or_else(|_| "''".into())
}

/// The command line that runs `command` in the build directory with the
/// clean environment, as the build user (or root for provision commands).
fn guest_command(command: &str, env: &[(String, String)], root: bool) -> String {
    let env: Vec<String> = env.iter().map(|(k, v)| quote(&format!("{k}={v}"))).collect();
    let user = if root { String::new() } else { format!("setpriv --reuid={BUILD_USER} --regid={BUILD_USER} --init-groups ") };
    format!("cd {BUILD_DIR} && umask 022 && exec {user}env -i {} /bin/sh -c {}", env.join(" "), quote(command))
}

/// Copies the build's output to build.log (raw, capped) and, unless
/// `--quiet`, to reprovm's stderr (escaped, and only what fits under the
/// log's cap).
struct Tee {
    log: SharedLog,
    stderr: Option<EscapingWriter<io::Stderr>>,
}

impl Tee {
    fn new(log: &SharedLog) -> Tee {
        Tee { log: log.clone(), stderr: (!crate::terminal::quiet()).then(|| EscapingWriter::new(io::stderr())) }
    }
}

impl Write for Tee {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let capped_before = self.log.omitted() > 0;
        let kept = self.log.append(buf)?;
        if let Some(stderr) = &mut self.stderr {
            let _ = stderr.write_all(&buf[..kept]);
            if kept < buf.len() && !capped_before {
                let _ = stderr.flush();
                crate::terminal::say(format_args!(
                    "\n[reprovm: the build's output passed --log-limit; the rest is not shown, and build.log keeps its last MiB]"
                ));
            }
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.stderr.as_mut().map_or(Ok(()), Write::flush)
    }
}

/// What the guest-side steps reported.
struct GuestOutcome {
    prepare: Duration,
    build: Duration,
}

/// An SSH failure during a guest-side step (the serial console's tail is
/// added by [`in_guest`]).
fn ssh_failure(source: GuestError) -> BuildError {
    BuildError::Vm(VmError::Ssh { serial_tail: String::new(), source })
}

/// Mount, provision, build: over SSH, on a blocking thread.
fn guest_build(session: &GuestSession, req: &BuildRequest, epoch: i64, log_path: &Path) -> Result<GuestOutcome, BuildError> {
    let start = Instant::now();
    let proxy = if req.recipe.build.network.machine_network() == Network::Egress { egress_proxy_url() } else { String::new() };
    let mount = format!("sh -c {} prepare-build {}", quote(PREPARE_BUILD), quote(&proxy));
    let (status, out, err) =
        session.exec_capture_until(&mount, Some((Deadline::after(GUEST_STEP_LIMIT), "the scratch disk to mount"))).map_err(ssh_failure)?;
    if status != 0 {
        return Err(BuildError::Prepare { status, output: format!("{out}{err}").trim().to_string(), serial_tail: String::new() });
    }
    let log = SharedLog::new(CappedLog::create(log_path, req.log_limit).map_err(path_error("create", log_path))?);
    let result = guest_commands(session, req, epoch, &log, log_path);
    let omitted = log.omitted();
    drop(log);
    if omitted > 0 {
        tracing::warn!(
            "build.log capped at {} MiB (--log-limit): {omitted} bytes of output left out, its last MiB kept",
            req.log_limit >> 20
        );
    }
    result.map(|build| GuestOutcome { prepare: start.elapsed() - build, build })
}

/// The provision commands (as root), then the build command (as the build
/// user); returns how long the build command took.
fn guest_commands(
    session: &GuestSession,
    req: &BuildRequest,
    epoch: i64,
    log: &SharedLog,
    log_path: &Path,
) -> Result<Duration, BuildError> {
    let tee = || Tee::new(log);
    let recipe = &req.recipe;
    let limit = Deadline::after(Duration::from_secs(recipe.build.timeout_secs));
    let log_tail = || tail_of(log_path, 30);
    let timed = |e: GuestError| match e {
        GuestError::Deadline(_) => BuildError::Timeout { secs: recipe.build.timeout_secs, log_tail: log_tail() },
        other => ssh_failure(other),
    };
    let root_env = build_env(recipe, epoch, true);
    for (i, command) in recipe.build.provision.iter().enumerate() {
        let line = guest_command(command, &root_env, true);
        let status = session.exec_until(&line, Some((limit, "the provision commands")), &mut tee(), &mut tee()).map_err(timed)?;
        if status != 0 {
            return Err(BuildError::Provision { index: i + 1, command: command.clone(), status, log_tail: log_tail() });
        }
    }
    let start = Instant::now();
    let line = guest_command(&recipe.build.command, &build_env(recipe, epoch, false), false);
    tracing::debug!("build command line: {}", escape(&line));
    let status = session.exec_until(&line, Some((limit, "the build command")), &mut tee(), &mut tee()).map_err(timed)?;
    if status != 0 {
        return Err(BuildError::Command { status, log_tail: log_tail() });
    }
    Ok(start.elapsed())
}

/// Collects the artifacts onto the output disk (over SSH, blocking), within
/// the build's own time limit.
fn guest_collect(session: &GuestSession, limit: Duration) -> Result<(), BuildError> {
    let collect = format!("bash -c {} collect-artifacts {}", quote(COLLECT_ARTIFACTS), quote(ARCHIVE_ARTIFACTS));
    let (status, out, err) =
        session.exec_capture_until(&collect, Some((Deadline::after(limit), "the artifacts to be collected"))).map_err(ssh_failure)?;
    let problems: Vec<String> = out
        .lines()
        .filter_map(|l| {
            let mut f = l.splitn(3, '\t');
            match (f.next(), f.next(), f.next()) {
                (Some("nomatch"), Some(glob), _) => Some(format!("glob {glob:?} (build.artifacts) matched nothing in {BUILD_DIR}")),
                (Some("refused"), Some(path), Some(why)) => Some(format!("{path:?} refused: {why}")),
                _ => None,
            }
        })
        .collect();
    if !problems.is_empty() {
        return Err(BuildError::Artifacts { problems });
    }
    if status != 0 {
        return Err(BuildError::Collect { status, output: format!("{out}{err}").trim().to_string() });
    }
    Ok(())
}

/// Adds the serial console's tail to SSH and guest-side errors.
fn with_serial_tail(e: BuildError, serial_log: &Path) -> BuildError {
    match e {
        BuildError::Vm(VmError::Ssh { source, .. }) => BuildError::Vm(VmError::Ssh { serial_tail: tail_of(serial_log, 30), source }),
        BuildError::Prepare { status, output, .. } => BuildError::Prepare { status, output, serial_tail: tail_of(serial_log, 30) },
        other => other,
    }
}

/// Runs `step` with the machine's SSH session on a blocking thread. On
/// failure the serial console is kept in `serial_copy` and its tail added
/// to the error.
async fn in_guest<T: Send + 'static>(
    machine: &mut Machine,
    serial_copy: &Path,
    step: impl FnOnce(&GuestSession) -> Result<T, BuildError> + Send + 'static,
) -> Result<T, BuildError> {
    let session = machine.take_session().expect("a booted machine has a session");
    let (session, outcome) = blocking(move || {
        let outcome = step(&session);
        (session, outcome)
    })
    .await;
    machine.put_session(session);
    let e = match outcome {
        Ok(value) => return Ok(value),
        Err(e) => e,
    };
    // A dropped connection is usually the VM's doing: say what happened. The
    // socket closes while QEMU is still exiting, so give it a moment.
    if let BuildError::Vm(VmError::Ssh { .. }) = e {
        let deadline = Deadline::after(Duration::from_secs(2));
        while !deadline.passed() {
            if let Err(vm) = machine.health() {
                let _ = fs::copy(machine.serial_log(), serial_copy);
                return Err(BuildError::Vm(vm));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let _ = fs::copy(machine.serial_log(), serial_copy);
    Err(with_serial_tail(e, machine.serial_log()))
}

/// Runs the build. On failure after the build began, the output directory
/// receives build.log and serial.log (never SHA256SUMS or result.json).
pub async fn run(req: BuildRequest, progress: &dyn Progress) -> Result<BuildResult, BuildError> {
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

async fn run_stages(req: &BuildRequest, output: &OutputDir, progress: &dyn Progress) -> Result<BuildResult, BuildError> {
    let total = Instant::now();
    let mut timings = Timings::default();

    // The image is hashed on its own thread while the source is archived,
    // QEMU starts and the kernel boots; the guest gets its first command
    // only once the hash matched (Machine::boot).
    let (store, pin) = (req.store.clone(), req.image);
    let (image, check) = blocking(move || store.open_checking(pin)).await?;

    progress.begin("archiving the source", false);
    let start = Instant::now();
    let image_date = image.stored.layout.metadata.source_date_epoch;
    let pinned_clock = req.recipe.machine.clock.unwrap_or(image_date);
    let prepared = {
        let (req, staging) = (req.clone(), output.path().to_path_buf());
        blocking(move || prepare_disks(&req, &staging, pinned_clock)).await?
    };
    timings.source = start.elapsed().as_secs_f64();
    progress.end(
        &format!(
            "source archived: {} files, {:.1} MiB, sha256:{} (SOURCE_DATE_EPOCH {} from {})",
            prepared.source.files,
            prepared.source.bytes as f64 / 1048576.0,
            &prepared.source.sha256[..16],
            prepared.epoch,
            prepared.epoch_from
        ),
        start.elapsed(),
    );

    // The guest clock starts at SOURCE_DATE_EPOCH when that is later than
    // the image's date: sources from the future make make(1) and configure
    // scripts misbehave. It is derived from the inputs alone, as before.
    let clock = req.recipe.machine.clock.unwrap_or(image_date.max(prepared.epoch));
    if clock < prepared.epoch {
        tracing::warn!(
            "machine.clock ({clock}) is earlier than SOURCE_DATE_EPOCH ({}): the source files will lie in the guest's future",
            prepared.epoch
        );
    }
    let egress = start_egress(req, prepared.disks.dir.path())?;
    progress.begin("booting the builder", false);
    let opts = BootOptions {
        spec: req.recipe.machine.spec(clock),
        accel: req.recipe.machine.accel.unwrap_or(AccelChoice::Auto),
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
    let machine = MachineRecord { launched, network: opts.network, scratch_mib: req.recipe.machine.scratch() };
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
) -> Result<BuildResult, BuildError> {
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
) -> Result<(LaunchedMachine, GuestFacts, Vec<Artifact>), BuildError> {
    let mut machine = Machine::boot(image, check, opts).await?;
    timings.boot = machine.boot_time.as_secs_f64();
    timings.image_verify = machine.image_check.as_secs_f64();
    progress.end(
        &format!(
            "builder booted under {}, SSH ready; image {} verified meanwhile ({:.1}s)",
            machine.launched.accelerator.as_str(),
            image.stored.pin,
            machine.image_check.as_secs_f64()
        ),
        machine.boot_time,
    );

    progress.begin("building", true);
    tracing::info!("building: {}", escape(&req.recipe.build.command));
    let log_path = output.path().join("build.log");
    let serial_copy = output.path().join("serial.log");
    let (req_copy, epoch) = (req.clone(), prepared.epoch);
    let outcome = in_guest(&mut machine, &serial_copy, move |session| guest_build(session, &req_copy, epoch, &log_path)).await?;
    timings.prepare = outcome.prepare.as_secs_f64();
    timings.build = outcome.build.as_secs_f64();
    progress.end("build finished", outcome.build);

    progress.begin("fetching the artifacts", false);
    let start = Instant::now();
    let collect_limit = Duration::from_secs(req.recipe.build.timeout_secs);
    in_guest(&mut machine, &serial_copy, move |session| guest_collect(session, collect_limit)).await?;
    let launched = machine.launched.clone();
    let facts = machine.facts.clone();
    machine.stop(Some(&serial_copy)).await;
    let (disk, staging) = (prepared.disks.output(), output.path().to_path_buf());
    let bar = progress.bar();
    let artifacts: Vec<Artifact> = blocking(move || artifacts::extract(&disk, &staging, &bar)).await?;
    let bytes: u64 = artifacts.iter().map(|a| a.size).sum();
    timings.artifacts = start.elapsed().as_secs_f64();
    progress.end(&format!("{} artifacts fetched, {:.1} MiB", artifacts.len(), bytes as f64 / 1048576.0), start.elapsed());
    Ok((launched, facts, artifacts))
}

/// The egress proxy of one build, on a socket in the build's private
/// directory, and how QEMU reaches it.
struct Egress {
    proxy: Proxy,
    relay: EgressRelay,
}

/// Starts the egress proxy when the build has an allow list (or replays).
fn start_egress(req: &BuildRequest, dir: &Path) -> Result<Option<Egress>, BuildError> {
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
    async fn finish(self, req: &BuildRequest) -> Result<(Vec<Download>, EgressRecord), BuildError> {
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
fn write_results(dir: &Path, result: &BuildResult) -> Result<(), BuildError> {
    let json = serde_json::to_string_pretty(result).expect("a result serializes") + "\n";
    for (name, text) in [("result.json", json), ("SHA256SUMS", artifacts::sha256sums(&result.outputs))] {
        let path = dir.join(name);
        fs::write(&path, text).map_err(path_error("write", &path))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_command_runs_as_the_build_user_with_only_the_fixed_environment() {
        let recipe = BuildRecipe::parse(
            "[build]\ncommand = \"make 'a b'\"\nartifacts = [\"x\"]\nenv = { CFLAGS = \"-O2 -g\", LANG = \"de_DE.UTF-8\" }\n",
            Path::new("r"),
        )
        .unwrap();
        let env = build_env(&recipe, 1_700_000_000, false);
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("SOURCE_DATE_EPOCH"), Some("1700000000"));
        assert_eq!(get("TZ"), Some("UTC"));
        assert_eq!(get("HOME"), Some("/build/home"));
        assert_eq!(get("LANG"), Some("de_DE.UTF-8"), "the recipe's env wins");
        let line = guest_command(&recipe.build.command, &env, false);
        assert!(
            line.starts_with("cd /build/src && umask 022 && exec setpriv --reuid=builder --regid=builder --init-groups env -i "),
            "{line}"
        );
        assert!(line.contains("'CFLAGS=-O2 -g'") && line.ends_with(r#"/bin/sh -c "make 'a b'""#), "{line}");
        let root = guest_command("apt-get update", &build_env(&recipe, 1, true), true);
        assert!(root.contains("exec env -i ") && root.contains("HOME=/root") && !root.contains("setpriv"), "{root}");
    }
}
