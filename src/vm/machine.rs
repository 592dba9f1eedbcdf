//! One builder VM from boot to teardown. [`Machine::boot`] copies the kernel
//! and initrd out of the verified bundle, creates the throw-away overlay and
//! the per-run keys in a private directory, starts QEMU, watches the serial
//! console (the boot watchdog that also catches a KVM that opens but cannot
//! boot), and returns once an authenticated SSH session works. Dropping a
//! `Machine` on any path kills QEMU's process group and removes the directory.

use std::fs::{self, File, Permissions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tempfile::TempDir;

use crate::deadline::{Deadline, Timeout};
use crate::diagnostics::{panic_report, section, tail_of};
use crate::guest::contract::{FW_CFG_AUTHORIZED_KEYS, FW_CFG_HOST_KEY, INIT_MARKER, KEYS_MARKER};
use crate::guest::{GuestError, GuestSession, RunKeys};
use crate::image::bundle;
use crate::image::{ImageCheck, OpenImage, StoreError};
use crate::logs::CappedLog;
use crate::path_error::{path_error, PathError};
use crate::process::Supervised;
use crate::vm::accel::{candidates, probe_kvm, AccelChoice};
use crate::vm::args::{cpu_option, qemu_args, Accelerator, EgressRelay, ExtraDisk, LaunchPlan, MachineSpec, Network, MACHINE_TYPE};
use crate::vm::qmp::{GuestEvent, Qmp, QmpError};

/// The least time a guest's console may stay silent before init before the
/// boot is declared hung (see [`silence_limit`]).
const MIN_SILENCE: Duration = Duration::from_secs(20);
/// How long one attempt to connect to QMP waits (attempts repeat until the
/// boot's limit, unless QEMU exits).
const QMP_ATTEMPT: Duration = Duration::from_secs(2);
/// The first SSH attempt's limit for each step (connect, handshake,
/// authentication); see [`next_ssh_attempt`].
const SSH_ATTEMPT: Duration = Duration::from_secs(2);
/// The longest an SSH attempt waits.
const SSH_ATTEMPT_MAX: Duration = Duration::from_secs(60);
/// How often the boot watchdog looks at the console and at QEMU.
const WATCH_INTERVAL: Duration = Duration::from_millis(20);

/// How to boot.
#[derive(Clone, Debug)]
pub struct BootOptions {
    /// The guest-visible machine.
    pub spec: MachineSpec,
    /// Accelerator choice.
    pub accel: AccelChoice,
    /// The QEMU binary.
    pub qemu: PathBuf,
    /// Limit for the whole boot, up to an authenticated SSH session.
    pub boot_timeout: Duration,
    /// Where the private per-run directory is created (normally $TMPDIR).
    pub runtime_dir: PathBuf,
    /// Disks after the root filesystem.
    pub disks: Vec<ExtraDisk>,
    /// Network access.
    pub network: Network,
    /// With [`Network::Egress`]: how QEMU reaches reprovm's proxy.
    pub egress: Option<EgressRelay>,
    /// The most bytes of the serial console kept in serial.log.
    pub log_limit: u64,
}

/// The machine as launched, for the result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaunchedMachine {
    /// QEMU binary path.
    pub qemu_binary: PathBuf,
    /// QEMU version (`major.minor.micro` and package).
    pub qemu_version: String,
    /// Accelerator used.
    pub accelerator: Accelerator,
    /// Machine type.
    pub machine_type: String,
    /// CPU model with its feature settings.
    pub cpu: String,
    /// The guest-visible machine.
    #[serde(flatten)]
    pub spec: MachineSpec,
}

/// A VM failure (exit code 4).
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// A host program is missing.
    #[error("{program} is not installed: install the Debian package {package}")]
    MissingProgram {
        /// The program.
        program: String,
        /// The Debian package.
        package: &'static str,
    },
    /// A file operation failed.
    #[error(transparent)]
    Io(#[from] PathError),
    /// `qemu-img create` failed.
    #[error("cannot create the overlay: qemu-img said: {0}")]
    Overlay(String),
    /// `--accel kvm` was asked for but KVM cannot be used.
    #[error("KVM cannot be used: {0}")]
    KvmUnusable(String),
    /// `--accel kvm`: the builder did not boot under KVM.
    #[error("KVM cannot be used: the builder did not boot under it (use --accel tcg or auto)")]
    KvmFailed(#[source] Box<VmError>),
    /// QEMU exited before the guest was ready.
    #[error(
        "QEMU exited ({status}) before the builder was ready{}{}",
        section("QEMU said", qemu_log),
        section("serial console (last lines)", serial_tail)
    )]
    QemuExited {
        /// Exit status.
        status: String,
        /// QEMU's stderr.
        qemu_log: String,
        /// End of the serial console.
        serial_tail: String,
    },
    /// The guest did not reach init, or did not answer SSH, in time.
    #[error("the builder did not boot under {accel}{}", section("serial console (last lines)", serial_tail))]
    BootTimeout {
        /// Accelerator used.
        accel: &'static str,
        /// End of the serial console.
        serial_tail: String,
        /// What timed out.
        #[source]
        source: Timeout,
    },
    /// The console stopped moving before the guest's init ran.
    #[error(
        "the builder hung under {accel}: its console was silent for {:.0}s before its init ran{}",
        silent.as_secs_f64(),
        section("serial console (last lines)", serial_tail)
    )]
    Hung {
        /// Accelerator used.
        accel: &'static str,
        /// How long the console had been silent.
        silent: Duration,
        /// End of the serial console.
        serial_tail: String,
    },
    /// The guest kernel panicked.
    #[error("the guest kernel panicked{}", section("serial console (last lines)", serial_tail))]
    Panicked {
        /// End of the serial console.
        serial_tail: String,
    },
    /// The guest powered off or QEMU stopped it unexpectedly.
    #[error("the guest stopped unexpectedly ({event:?}){}", section("serial console (last lines)", serial_tail))]
    Stopped {
        /// The event.
        event: GuestEvent,
        /// End of the serial console.
        serial_tail: String,
    },
    /// QMP failed.
    #[error(transparent)]
    Qmp(#[from] QmpError),
    /// SSH failed.
    #[error("SSH to the builder failed{}", section("serial console (last lines)", serial_tail))]
    Ssh {
        /// End of the serial console.
        serial_tail: String,
        /// The cause.
        #[source]
        source: GuestError,
    },
    /// Key generation failed.
    #[error(transparent)]
    Keys(#[from] crate::guest::keys::KeyError),
    /// The image, hashed while the builder booted, does not match its pin
    /// (or could not be read).
    #[error("{0}; the builder was stopped before anything was sent to it")]
    Image(Box<StoreError>),
}

/// A free TCP port on 127.0.0.1 (QEMU binds it right after; a lost race
/// makes QEMU fail and the caller retry with another port).
fn free_port() -> io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A running builder with an authenticated SSH session.
pub struct Machine {
    qemu: Supervised,
    qmp: Qmp,
    session: Option<GuestSession>,
    ssh_port: u16,
    serial_log: PathBuf,
    /// The machine as launched.
    pub launched: LaunchedMachine,
    /// When QEMU started (the guest clock runs from then).
    pub qemu_started: Instant,
    /// How long the boot took, up to the authenticated session.
    pub boot_time: Duration,
    /// How long the image's hash took (on its own thread, during the boot).
    pub image_check: Duration,
    serial: SerialCapture,
    // Declared last: removed after QEMU is gone.
    run_dir: TempDir,
}

/// The serial console's reader. QEMU connects the console to a socket
/// reprovm listens on, and everything the guest prints goes to serial.log,
/// capped (a guest printing gigabytes costs the host a bounded file).
struct SerialCapture(tokio::task::JoinHandle<()>);

impl SerialCapture {
    fn listen(socket: &Path, log: &Path, limit: u64) -> Result<SerialCapture, VmError> {
        let _ = fs::remove_file(socket);
        let listener = tokio::net::UnixListener::bind(socket).map_err(path_error("listen on", socket))?;
        let mut log = CappedLog::create(log, limit).map_err(path_error("create", log))?;
        Ok(SerialCapture(tokio::spawn(async move {
            let Ok((mut stream, _)) = listener.accept().await else { return };
            let mut buf = vec![0u8; 64 << 10];
            while let Ok(n @ 1..) = tokio::io::AsyncReadExt::read(&mut stream, &mut buf).await {
                if log.append(&buf[..n]).is_err() {
                    break;
                }
            }
        })))
    }
}

impl SerialCapture {
    /// Waits (up to `limit`) until QEMU closed the console and the capped
    /// log is complete, its kept tail included.
    async fn finish(&mut self, limit: Duration) {
        let _ = tokio::time::timeout(limit, &mut self.0).await;
    }
}

impl Drop for SerialCapture {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The per-run files of one boot attempt.
struct RunFiles {
    plan: LaunchPlan,
    keys: RunKeys,
    key_files: Vec<PathBuf>,
    qemu_log: PathBuf,
    serial_log: PathBuf,
}

fn prepare(image: &OpenImage, opts: &BootOptions, accel: Accelerator, sandbox: bool, dir: &Path) -> Result<RunFiles, VmError> {
    let layout = &image.stored.layout;
    let kernel = dir.join("vmlinux");
    let initrd = dir.join("initrd.img");
    for (path, extent) in [(&kernel, layout.kernel), (&initrd, layout.initrd)] {
        if !path.exists() {
            let mut out = File::create(path).map_err(path_error("create", path))?;
            bundle::copy_member(&image.file, extent, &mut out).map_err(path_error("copy the kernel and initrd to", path))?;
        }
    }
    let overlay = dir.join("overlay.qcow2");
    let _ = fs::remove_file(&overlay);
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&overlay)
        .arg(layout.rootfs.size.to_string())
        .stdin(Stdio::null())
        .output()
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => VmError::MissingProgram { program: "qemu-img".into(), package: "qemu-utils" },
            _ => path_error("run qemu-img for", &overlay)(e).into(),
        })?;
    if !out.status.success() {
        return Err(VmError::Overlay(String::from_utf8_lossy(&out.stderr).trim().to_string()));
    }
    let keys = RunKeys::generate()?;
    let mut key_files = Vec::new();
    for (name, content) in [(FW_CFG_HOST_KEY, keys.host_private.as_str()), (FW_CFG_AUTHORIZED_KEYS, keys.client_public_line.as_str())] {
        let path = dir.join(name);
        let _ = fs::remove_file(&path);
        fs::write(&path, content).map_err(path_error("write", &path))?;
        fs::set_permissions(&path, Permissions::from_mode(0o600)).map_err(path_error("protect", &path))?;
        key_files.push(path);
    }
    let plan = LaunchPlan {
        spec: opts.spec.clone(),
        accel,
        bundle_fd: image.file.as_raw_fd(),
        rootfs: layout.rootfs,
        overlay,
        kernel,
        initrd,
        qmp_socket: dir.join("qmp.sock"),
        serial_socket: dir.join("serial.sock"),
        ssh_port: free_port().map_err(path_error("find a free port on", Path::new("127.0.0.1")))?,
        fw_cfg: key_files.iter().map(|p| (p.file_name().unwrap_or_default().to_string_lossy().into_owned(), p.clone())).collect(),
        disks: opts.disks.clone(),
        network: opts.network,
        egress: opts.egress.clone(),
        sandbox,
    };
    Ok(RunFiles { plan, keys, key_files, qemu_log: dir.join("qemu.log"), serial_log: dir.join("serial.log") })
}

/// A booted QEMU whose guest reached init, before SSH.
struct Started {
    qemu: Supervised,
    qmp: Qmp,
    serial: SerialCapture,
    started: Instant,
}

impl Machine {
    /// Boots the builder from `image` (from
    /// [`crate::image::Store::open_checking`]) while `check` hashes it,
    /// and waits for SSH. The first command reaches the guest only after
    /// the check passed; a mismatch stops QEMU and fails with exit 3.
    pub async fn boot(image: &OpenImage, check: ImageCheck, opts: &BootOptions) -> Result<Machine, VmError> {
        let boot_start = Instant::now();
        let tmp = &opts.runtime_dir;
        let run_dir = tempfile::Builder::new()
            .prefix("reprovm-run-")
            .permissions(Permissions::from_mode(0o700))
            .tempdir_in(tmp)
            .map_err(path_error("create a run directory in", tmp))?;
        let deadline = Deadline::after(opts.boot_timeout);
        let (files, started) = launch(image, opts, &accelerators(opts)?, run_dir.path(), deadline).await?;
        let Started { mut qemu, mut qmp, serial, started } = started;
        // QEMU has read the fw_cfg files: the keys leave the disk now.
        for path in &files.key_files {
            let _ = fs::remove_file(path);
        }
        let serial_log = files.serial_log.clone();
        let session = wait_for_ssh(&mut qemu, &mut qmp, files.plan.ssh_port, files.keys, &serial_log, &files.qemu_log, deadline).await?;
        let boot_time = boot_start.elapsed();
        // Nothing reaches the guest from an image not proven to be its pin
        // (dropping `qemu` on the error kills its process group).
        let image_check = tokio::task::spawn_blocking(move || check.wait())
            .await
            .expect("hash thread panicked")
            .map_err(|e| VmError::Image(Box::new(e)))?;
        tracing::info!("image {} verified in {:.2}s, while the builder booted", image.stored.pin, image_check.as_secs_f64());
        let launched = LaunchedMachine {
            qemu_binary: opts.qemu.clone(),
            qemu_version: qmp.version().await?,
            accelerator: files.plan.accel,
            machine_type: MACHINE_TYPE.to_string(),
            cpu: cpu_option(&opts.spec.cpu_model),
            spec: opts.spec.clone(),
        };
        let ssh_port = files.plan.ssh_port;
        tracing::info!(
            "builder ready in {:.1}s under {} (SSH on 127.0.0.1:{ssh_port})",
            boot_time.as_secs_f64(),
            launched.accelerator.as_str()
        );
        let session = Some(session);
        Ok(Machine { qemu, qmp, session, ssh_port, serial_log, launched, qemu_started: started, boot_time, image_check, serial, run_dir })
    }

    /// The per-run directory (overlay, sockets, logs).
    pub fn run_dir(&self) -> &Path {
        self.run_dir.path()
    }

    /// The host port forwarded to the guest's sshd (on 127.0.0.1).
    pub fn ssh_port(&self) -> u16 {
        self.ssh_port
    }

    /// The QMP monitor.
    pub fn qmp(&self) -> &Qmp {
        &self.qmp
    }

    /// The serial console log.
    pub fn serial_log(&self) -> &Path {
        &self.serial_log
    }

    /// Runs `work` with the SSH session on a blocking thread (ssh2 blocks)
    /// and keeps the session for the next step.
    pub async fn with_session<T: Send + 'static>(&mut self, work: impl FnOnce(&GuestSession) -> T + Send + 'static) -> T {
        let session = self.session.take().expect("a booted machine has a session");
        let (session, value) = tokio::task::spawn_blocking(move || {
            let value = work(&session);
            (session, value)
        })
        .await
        .expect("SSH thread panicked");
        self.session = Some(session);
        value
    }

    /// Takes the SSH session for good (a step that never gives it back,
    /// such as one that crashes the guest).
    pub fn take_session(&mut self) -> Option<GuestSession> {
        self.session.take()
    }

    /// Why the VM is no longer usable, if it is not: QEMU exited, the guest
    /// panicked or stopped.
    pub fn health(&mut self) -> Result<(), VmError> {
        check_alive(&mut self.qemu, &mut self.qmp, &self.serial_log, &self.run_dir.path().join("qemu.log"))
    }

    /// Stops the builder at once: QMP `quit`, then SIGKILL of QEMU's process
    /// group if it has not exited within 5 s. A throw-away builder needs no
    /// power-off: its overlay is deleted, and what the host keeps is on the
    /// host already (the output disk is written past the guest's page cache
    /// and synced before the collect command returns, and every write QEMU
    /// completed is in the host's file). The complete serial log is copied
    /// to `serial_copy`, and the per-run directory goes with `self`.
    pub async fn stop(mut self, serial_copy: Option<&Path>) {
        drop(self.session.take());
        let _ = self.qmp.quit().await;
        let mut qemu = self.qemu;
        let _ = tokio::task::spawn_blocking(move || {
            if let Ok(None) = qemu.wait_for(Duration::from_secs(5)) {
                let _ = qemu.kill();
            }
        })
        .await;
        self.serial.finish(Duration::from_secs(2)).await;
        if let Some(copy) = serial_copy {
            let _ = fs::copy(&self.serial_log, copy);
        }
        // run_dir is removed as the rest of `self` drops.
    }
}

/// The accelerators to try, in order (`--accel auto`: KVM first when
/// /dev/kvm looks usable, then TCG).
fn accelerators(opts: &BootOptions) -> Result<Vec<Accelerator>, VmError> {
    let kvm_probe = if opts.accel == AccelChoice::Tcg { Err("not asked for".into()) } else { probe_kvm(Path::new("/dev/kvm")) };
    candidates(opts.accel, kvm_probe).map_err(VmError::KvmUnusable)
}

/// Starts QEMU until the guest's init runs, starting it again as
/// [`relaunch`] decides (unconfined, on another port, under the next
/// accelerator, once more after a hung TCG boot).
async fn launch(
    image: &OpenImage,
    opts: &BootOptions,
    accels: &[Accelerator],
    run_dir: &Path,
    deadline: Deadline,
) -> Result<(RunFiles, Started), VmError> {
    let mut tries = Tries { sandbox: true, other_ports: 0, hung_restarts: 0 };
    let mut accel_index = 0;
    loop {
        let accel = accels[accel_index];
        let files = prepare(image, opts, accel, tries.sandbox, run_dir)?;
        let e = match start_qemu(&files, opts, deadline).await {
            Ok(started) => return Ok((files, started)),
            Err(e) => e,
        };
        match relaunch(&e, accel, &tries) {
            Some(Relaunch::Unconfined) => {
                tracing::warn!("{} has no seccomp sandbox: running it unconfined", opts.qemu.display());
                tries.sandbox = false;
            }
            Some(Relaunch::AnotherPort) => tries.other_ports += 1,
            Some(Relaunch::NextAccelerator) if accel_index + 1 == accels.len() => return Err(VmError::KvmFailed(Box::new(e))),
            Some(Relaunch::NextAccelerator) => {
                tracing::debug!("the builder under KVM: {}", crate::escape::escape(&e.to_string()));
                tracing::warn!(
                    "KVM cannot run the builder on this host ({}); falling back to TCG (--accel tcg skips the attempt, -v shows QEMU's words)",
                    crate::escape::escape(&kvm_failure_reason(&e))
                );
                accel_index += 1;
            }
            Some(Relaunch::Again) => {
                tracing::debug!("the hung boot: {}", crate::escape::escape(&e.to_string()));
                tracing::warn!("the builder hung early in its boot under TCG (its console stopped moving): starting it once more");
                tries.hung_restarts += 1;
            }
            None => return Err(e),
        }
    }
}

/// Starts QEMU for `files` and waits until the guest's init runs.
async fn start_qemu(files: &RunFiles, opts: &BootOptions, deadline: Deadline) -> Result<Started, VmError> {
    let _ = fs::remove_file(&files.plan.qmp_socket);
    let serial = SerialCapture::listen(&files.plan.serial_socket, &files.serial_log, opts.log_limit)?;
    let mut qemu = spawn_qemu(files, opts)?;
    let started = Instant::now();
    let mut qmp = connect_qmp(&mut qemu, files, deadline).await?;
    wait_for_init(&mut qemu, &mut qmp, files, opts, deadline, started).await?;
    Ok(Started { qemu, qmp, serial, started })
}

/// Spawns QEMU (its own supervised process group) with the verified
/// bundle's descriptor inherited and its stderr in qemu.log.
fn spawn_qemu(files: &RunFiles, opts: &BootOptions) -> Result<Supervised, VmError> {
    let plan = &files.plan;
    let log = File::create(&files.qemu_log).map_err(path_error("create", &files.qemu_log))?;
    let mut cmd = Command::new(&opts.qemu);
    cmd.args(qemu_args(plan)).stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
    let bundle_fd = plan.bundle_fd;
    // SAFETY: fcntl(2) is async-signal-safe; only the child's copy of the
    // descriptor loses close-on-exec, so QEMU inherits the verified bundle.
    unsafe {
        cmd.pre_exec(move || {
            let flags = libc::fcntl(bundle_fd, libc::F_GETFD);
            if flags < 0 || libc::fcntl(bundle_fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    tracing::debug!(
        "QEMU command line: {} {}",
        opts.qemu.display(),
        shlex::try_join(qemu_args(plan).iter().map(|a| a.to_str().unwrap_or("?"))).unwrap_or_default()
    );
    Supervised::spawn("QEMU", &mut cmd).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => VmError::MissingProgram { program: opts.qemu.display().to_string(), package: "qemu-system-x86" },
        _ => path_error("start", &opts.qemu)(e).into(),
    })
}

/// Connects to QEMU's monitor. A loaded host (or a nested KVM) can take
/// long to start QEMU: keep trying within the boot's own limit, but stop as
/// soon as QEMU exits.
async fn connect_qmp(qemu: &mut Supervised, files: &RunFiles, deadline: Deadline) -> Result<Qmp, VmError> {
    loop {
        match Qmp::connect(&files.plan.qmp_socket, QMP_ATTEMPT.min(deadline.remaining())).await {
            Ok(qmp) => return Ok(qmp),
            Err(e) => {
                let _ = qemu.wait_for(Duration::from_millis(100));
                if let Some(status) = qemu.try_wait().ok().flatten() {
                    return Err(VmError::QemuExited {
                        status: status.to_string(),
                        qemu_log: tail_of(&files.qemu_log, 20),
                        serial_tail: tail_of(&files.serial_log, 30),
                    });
                }
                if deadline.passed() {
                    return Err(e.into());
                }
            }
        }
    }
}

/// Waits for the contract's [`INIT_MARKER`] on the console; a console that
/// stops moving before it is a hung boot ([`ConsoleWatchdog`]).
async fn wait_for_init(
    qemu: &mut Supervised,
    qmp: &mut Qmp,
    files: &RunFiles,
    opts: &BootOptions,
    deadline: Deadline,
    started: Instant,
) -> Result<(), VmError> {
    let (serial_log, accel) = (&files.serial_log, files.plan.accel.as_str());
    let mut watchdog = ConsoleWatchdog::new(silence_limit(opts.boot_timeout), Instant::now());
    loop {
        check_alive(qemu, qmp, serial_log, &files.qemu_log)?;
        let console = fs::read(serial_log).unwrap_or_default();
        if String::from_utf8_lossy(&console).contains(INIT_MARKER) {
            tracing::debug!("guest init started after {:.2}s", started.elapsed().as_secs_f64());
            return Ok(());
        }
        // Hung, not slow: the console must keep moving until init runs.
        if let Some(silent) = watchdog.silent_for(console.len(), Instant::now()) {
            return Err(VmError::Hung { accel, silent, serial_tail: tail_of(serial_log, 30) });
        }
        if deadline.passed() {
            let source = deadline.timeout("the guest's init to start", None);
            return Err(VmError::BootTimeout { accel, serial_tail: tail_of(serial_log, 30), source });
        }
        tokio::time::sleep(WATCH_INTERVAL).await;
    }
}

/// Why the builder did not boot under KVM, in one line: the features of
/// the pinned CPU model QEMU says this host's KVM lacks, else QEMU's first
/// words, else what the watchdog saw.
fn kvm_failure_reason(e: &VmError) -> String {
    match e {
        VmError::QemuExited { qemu_log, status, .. } => {
            let missing = missing_kvm_features(qemu_log);
            if missing.is_empty() {
                let first = qemu_log.lines().map(str::trim).find(|l| !l.is_empty());
                first.map_or_else(|| format!("QEMU exited ({status})"), |l| format!("QEMU: {l}"))
            } else {
                format!("its KVM lacks features of the pinned CPU model: {}", missing.join(" "))
            }
        }
        VmError::Hung { silent, .. } => format!("the guest hung: its console was silent for {:.0}s", silent.as_secs_f64()),
        VmError::BootTimeout { source, .. } => format!("the guest did not boot in time: {source}"),
        other => other.to_string(),
    }
}

/// The CPU features QEMU's words say this host's KVM lacks (with
/// `enforce`, QEMU refuses the CPU model then).
pub fn missing_kvm_features(qemu_log: &str) -> Vec<&str> {
    qemu_log
        .lines()
        .filter(|l| l.contains("doesn't support requested feature"))
        // "...: CPUID.01H:ECX.sse4.2 [bit 20]": after the register.
        .filter_map(|l| l.rsplit_once(':')?.1.split_once('.')?.1.split_whitespace().next())
        .collect()
}

/// How long a guest's console may stay silent before its init runs before
/// the boot is declared hung: a tenth of `--boot-timeout`, at least 20 s.
/// The kernel prints its boot messages (see
/// [`crate::vm::args::kernel_cmdline`]), whose longest gap under TCG is about
/// a fifth of the time to init: a slow guest (nested KVM, a loaded host)
/// keeps printing and is waited for up to the boot's limit; a KVM that opens
/// but cannot run the machine, or a rare TCG stall early in the boot, stops
/// printing (see [`relaunch`]).
fn silence_limit(boot_timeout: Duration) -> Duration {
    (boot_timeout / 10).max(MIN_SILENCE)
}

/// What has been tried to launch the builder.
struct Tries {
    /// Whether QEMU runs under its seccomp sandbox.
    sandbox: bool,
    /// SSH ports found taken when QEMU bound them.
    other_ports: u32,
    /// TCG boots started again after they hung.
    hung_restarts: u32,
}

/// How a failed launch is tried again.
#[derive(Debug, PartialEq, Eq)]
enum Relaunch {
    /// This QEMU has no seccomp: the same launch, unconfined.
    Unconfined,
    /// The SSH port was taken between its probe and QEMU's bind.
    AnotherPort,
    /// KVM opens but cannot run the pinned machine (QEMU refuses the CPU
    /// model, or the guest hangs): the next accelerator, if any.
    NextAccelerator,
    /// A TCG boot hung before init (seen about once in a few hundred boots
    /// on a loaded 2-CPU host, in the kernel's early boot): once more.
    Again,
}

/// Whether, and how, the launch that failed with `e` under `accel` is tried
/// again; `None` when the error is final.
fn relaunch(e: &VmError, accel: Accelerator, tries: &Tries) -> Option<Relaunch> {
    match e {
        VmError::QemuExited { qemu_log, .. } if tries.sandbox && qemu_log.contains("seccomp") => Some(Relaunch::Unconfined),
        VmError::QemuExited { qemu_log, .. } if qemu_log.contains("host forwarding") && tries.other_ports < 3 => {
            Some(Relaunch::AnotherPort)
        }
        VmError::BootTimeout { .. } | VmError::QemuExited { .. } | VmError::Hung { .. } if accel == Accelerator::Kvm => {
            Some(Relaunch::NextAccelerator)
        }
        VmError::Hung { .. } if tries.hung_restarts == 0 => Some(Relaunch::Again),
        _ => None,
    }
}

/// Tells a hung guest from a slow one by progress on its console.
struct ConsoleWatchdog {
    limit: Duration,
    seen: usize,
    last_progress: Instant,
}

impl ConsoleWatchdog {
    fn new(limit: Duration, now: Instant) -> Self {
        ConsoleWatchdog { limit, seen: 0, last_progress: now }
    }

    /// Records that the console holds `len` bytes at `now`; returns how long
    /// it has been silent once that reaches the limit.
    fn silent_for(&mut self, len: usize, now: Instant) -> Option<Duration> {
        if len != self.seen {
            (self.seen, self.last_progress) = (len, now);
        }
        let silent = now.saturating_duration_since(self.last_progress);
        (silent >= self.limit).then_some(silent)
    }
}

/// `Err` when QEMU exited or QMP reported a panic or a stop.
fn check_alive(qemu: &mut Supervised, qmp: &mut Qmp, serial_log: &Path, qemu_log: &Path) -> Result<(), VmError> {
    let event = qmp.pending_event();
    let exited = qemu.try_wait().map_err(path_error("wait for", Path::new("QEMU")))?;
    if event == Some(GuestEvent::Panicked) || exited.is_some() {
        // After pvpanic's event the guest still prints the panic and resets
        // (panic=-1), which -no-reboot turns into QEMU's exit.
        let _ = qemu.wait_for(Duration::from_secs(5));
        if let Some(serial_tail) = panic_report(serial_log) {
            return Err(VmError::Panicked { serial_tail });
        }
    }
    if let Some(status) = exited {
        return Err(VmError::QemuExited {
            status: status.to_string(),
            qemu_log: tail_of(qemu_log, 20),
            serial_tail: tail_of(serial_log, 30),
        });
    }
    match event {
        Some(GuestEvent::Panicked) => Err(VmError::Panicked { serial_tail: tail_of(serial_log, 50) }),
        Some(event) => Err(VmError::Stopped { event, serial_tail: tail_of(serial_log, 30) }),
        None => Ok(()),
    }
}

/// The limit of the next SSH attempt after one that failed in `took`. An
/// attempt that ran out of time met a guest too slow to answer within it
/// (nested KVM, a loaded host): the next one waits twice as long, up to
/// [`SSH_ATTEMPT_MAX`]. Fixed short attempts would never finish a slow
/// handshake, and every connection given up on keeps an sshd child busy
/// until sshd's MaxStartups throttling refuses all of them.
fn next_ssh_attempt(limit: Duration, took: Duration) -> Duration {
    if took >= limit {
        (limit * 2).min(SSH_ATTEMPT_MAX)
    } else {
        limit
    }
}

/// Polls SSH until an authenticated session works. A wrong host key is final.
async fn wait_for_ssh(
    qemu: &mut Supervised,
    qmp: &mut Qmp,
    port: u16,
    keys: RunKeys,
    serial_log: &Path,
    qemu_log: &Path,
    deadline: Deadline,
) -> Result<GuestSession, VmError> {
    let keys = std::sync::Arc::new(keys);
    let mut attempt_limit = SSH_ATTEMPT;
    loop {
        check_alive(qemu, qmp, serial_log, qemu_log)?;
        if !fs::read(serial_log).is_ok_and(|b| String::from_utf8_lossy(&b).contains(KEYS_MARKER)) {
            if deadline.passed() {
                return Err(VmError::BootTimeout {
                    accel: "the chosen accelerator",
                    serial_tail: tail_of(serial_log, 30),
                    source: deadline.timeout("the guest's network and keys", None),
                });
            }
            tokio::time::sleep(WATCH_INTERVAL).await;
            continue;
        }
        let attempt_keys = keys.clone();
        let limit = attempt_limit.min(deadline.remaining());
        let tried = Instant::now();
        let attempt =
            tokio::task::spawn_blocking(move || GuestSession::connect(port, &attempt_keys, limit)).await.expect("SSH thread panicked");
        let cause = match attempt {
            Ok(session) => return Ok(session),
            Err(GuestError::NotReady(cause)) => cause,
            Err(source) => return Err(VmError::Ssh { serial_tail: tail_of(serial_log, 30), source }),
        };
        attempt_limit = next_ssh_attempt(attempt_limit, tried.elapsed());
        if deadline.passed() {
            return Err(VmError::BootTimeout {
                accel: "the chosen accelerator",
                serial_tail: tail_of(serial_log, 30),
                source: deadline.timeout("an authenticated SSH session", Some(cause)),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slow_console_is_not_hung_a_silent_one_is() {
        let start = Instant::now();
        let mut watchdog = ConsoleWatchdog::new(Duration::from_secs(20), start);
        // A guest that prints a line every 15 s for ten minutes is slow, not hung.
        for step in 1..=40 {
            assert_eq!(watchdog.silent_for(step * 80, start + Duration::from_secs(15 * step as u64)), None, "step {step}");
        }
        let last = start + Duration::from_secs(600);
        assert_eq!(watchdog.silent_for(3200, last + Duration::from_secs(19)), None);
        assert_eq!(watchdog.silent_for(3200, last + Duration::from_secs(21)), Some(Duration::from_secs(21)));
    }

    #[test]
    fn a_kvm_refusal_is_one_line_naming_the_missing_features() {
        let qemu_log = "qemu-system-x86_64: warning: host doesn't support requested feature: CPUID.01H:ECX.pni [bit 0]\n\
                        qemu-system-x86_64: warning: host doesn't support requested feature: CPUID.01H:ECX.sse4.2 [bit 20]\n\
                        qemu-system-x86_64: Host doesn't support requested features\n";
        let refused = VmError::QemuExited { status: "exit status: 1".into(), qemu_log: qemu_log.into(), serial_tail: String::new() };
        assert_eq!(kvm_failure_reason(&refused), "its KVM lacks features of the pinned CPU model: pni sse4.2");
        let other = VmError::QemuExited {
            status: "exit status: 1".into(),
            qemu_log: "\nqemu: failed to open /dev/kvm\n".into(),
            serial_tail: String::new(),
        };
        assert_eq!(kvm_failure_reason(&other), "QEMU: qemu: failed to open /dev/kvm");
        let hung = VmError::Hung { accel: "kvm", silent: Duration::from_secs(30), serial_tail: String::new() };
        assert_eq!(kvm_failure_reason(&hung), "the guest hung: its console was silent for 30s");
    }

    #[test]
    fn the_silence_limit_follows_the_boot_timeout() {
        assert_eq!(silence_limit(Duration::from_secs(60)), MIN_SILENCE);
        assert_eq!(silence_limit(Duration::from_secs(300)), Duration::from_secs(30));
        assert_eq!(silence_limit(Duration::from_secs(3000)), Duration::from_secs(300));
    }

    #[test]
    fn a_hung_tcg_boot_is_started_once_more_a_hung_kvm_one_falls_back() {
        let hung = VmError::Hung { accel: "tcg", silent: Duration::from_secs(30), serial_tail: String::new() };
        let fresh = Tries { sandbox: true, other_ports: 0, hung_restarts: 0 };
        assert_eq!(relaunch(&hung, Accelerator::Tcg, &fresh), Some(Relaunch::Again));
        assert_eq!(relaunch(&hung, Accelerator::Tcg, &Tries { hung_restarts: 1, ..fresh }), None, "only once");
        let fresh = Tries { sandbox: true, other_ports: 0, hung_restarts: 0 };
        assert_eq!(relaunch(&hung, Accelerator::Kvm, &fresh), Some(Relaunch::NextAccelerator));
        let slow = VmError::BootTimeout {
            accel: "tcg",
            serial_tail: String::new(),
            source: Timeout { what: "the guest's init to start".into(), waited: Duration::from_secs(300), last_cause: None },
        };
        assert_eq!(relaunch(&slow, Accelerator::Tcg, &fresh), None, "a boot that used its whole limit is not started again");
        let port = VmError::QemuExited {
            status: "exit status: 1".into(),
            qemu_log: "qemu: could not set up host forwarding rule".into(),
            serial_tail: String::new(),
        };
        assert_eq!(relaunch(&port, Accelerator::Tcg, &fresh), Some(Relaunch::AnotherPort));
        assert_eq!(relaunch(&port, Accelerator::Tcg, &Tries { other_ports: 3, ..fresh }), None);
    }

    #[test]
    fn ssh_attempts_grow_only_when_they_ran_out_of_time() {
        let two = Duration::from_secs(2);
        assert_eq!(next_ssh_attempt(two, Duration::from_millis(3)), two, "a refused connection retries at the same limit");
        assert_eq!(next_ssh_attempt(two, two), Duration::from_secs(4));
        let mut limit = two;
        for _ in 0..10 {
            limit = next_ssh_attempt(limit, limit);
        }
        assert_eq!(limit, SSH_ATTEMPT_MAX);
    }
}
