//! The guest side of a build: what reprovm runs in the builder over SSH and
//! how it reads the answers. The scratch disk is mounted (provision/
//! prepare-build), the provision commands run as root and the build command
//! as the build user, each with the same fixed environment, their output
//! teed to build.log and stderr; then the build user's archive of the
//! artifacts goes onto the output disk (provision/collect-artifacts).

use std::fs;
use std::io::{self, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::deadline::Deadline;
use crate::diagnostics::tail_of;
use crate::escape::{escape, EscapingWriter};
use crate::guest::contract::{environment, script_command, user_command, CollectProblem, GuestUser};
use crate::guest::provision::{ARCHIVE_ARTIFACTS, COLLECT_ARTIFACTS, PREPARE_BUILD};
use crate::guest::{GuestError, GuestSession};
use crate::logs::{CappedLog, SharedLog};
use crate::path_error::path_error;
use crate::rebuild::recipe::BuildRecipe;
use crate::rebuild::stages::BuildRequest;
use crate::rebuild::RebuildError;
use crate::vm::{Machine, Network, VmError, EGRESS_PROXY};

/// Limit for the short guest-side steps (mounting the scratch disk).
const GUEST_STEP_LIMIT: Duration = Duration::from_secs(60);

/// The egress proxy as the guest reaches it.
fn egress_proxy_url() -> String {
    format!("http://{}:{}", EGRESS_PROXY.0, EGRESS_PROXY.1)
}

/// The build's environment for `user`: the contract's fixed one, with an
/// allow list the proxy variables that HTTP clients read, then the recipe's
/// `build.env`.
fn build_env(recipe: &BuildRecipe, epoch: i64, user: GuestUser) -> Vec<(String, String)> {
    let mut extra = Vec::new();
    if recipe.build.network.machine_network() == Network::Egress {
        for name in ["http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"] {
            extra.push((name.to_string(), egress_proxy_url()));
        }
    }
    extra.extend(recipe.build.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    environment(user, epoch, &extra)
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
pub(super) struct GuestOutcome {
    pub(super) prepare: Duration,
    pub(super) build: Duration,
}

/// An SSH failure during a guest-side step (the serial console's tail is
/// added by [`in_guest`]).
fn ssh_failure(source: GuestError) -> RebuildError {
    RebuildError::Vm(VmError::Ssh { serial_tail: String::new(), source })
}

/// Mount, provision, build: over SSH, on a blocking thread.
pub(super) fn guest_build(session: &GuestSession, req: &BuildRequest, epoch: i64, log_path: &Path) -> Result<GuestOutcome, RebuildError> {
    let start = Instant::now();
    let proxy = if req.recipe.build.network.machine_network() == Network::Egress { egress_proxy_url() } else { String::new() };
    let mount = script_command("sh", PREPARE_BUILD, "prepare-build", &[&proxy]);
    let (status, out, err) =
        session.exec_capture_until(&mount, Some((Deadline::after(GUEST_STEP_LIMIT), "the scratch disk to mount"))).map_err(ssh_failure)?;
    if status != 0 {
        return Err(RebuildError::Prepare { status, output: format!("{out}{err}").trim().to_string(), serial_tail: String::new() });
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
) -> Result<Duration, RebuildError> {
    let tee = || Tee::new(log);
    let recipe = &req.recipe;
    let limit = Deadline::after(Duration::from_secs(recipe.build.timeout_secs));
    let log_tail = || tail_of(log_path, 30);
    let timed = |e: GuestError| match e {
        GuestError::Deadline(_) => RebuildError::Timeout { secs: recipe.build.timeout_secs, log_tail: log_tail() },
        other => ssh_failure(other),
    };
    let root_env = build_env(recipe, epoch, GuestUser::Root);
    for (i, command) in recipe.build.provision.iter().enumerate() {
        let line = user_command(command, &root_env, GuestUser::Root);
        let status = session.exec_until(&line, Some((limit, "the provision commands")), &mut tee(), &mut tee()).map_err(timed)?;
        if status != 0 {
            return Err(RebuildError::Provision { index: i + 1, command: command.clone(), status, log_tail: log_tail() });
        }
    }
    let start = Instant::now();
    let line = user_command(&recipe.build.command, &build_env(recipe, epoch, GuestUser::Build), GuestUser::Build);
    tracing::debug!("build command line: {}", escape(&line));
    let status = session.exec_until(&line, Some((limit, "the build command")), &mut tee(), &mut tee()).map_err(timed)?;
    if status != 0 {
        return Err(RebuildError::Command { status, log_tail: log_tail() });
    }
    Ok(start.elapsed())
}

/// Collects the artifacts onto the output disk (over SSH, blocking), within
/// the build's own time limit.
pub(super) fn guest_collect(session: &GuestSession, limit: Duration) -> Result<(), RebuildError> {
    let collect = script_command("bash", COLLECT_ARTIFACTS, "collect-artifacts", &[ARCHIVE_ARTIFACTS]);
    let (status, out, err) =
        session.exec_capture_until(&collect, Some((Deadline::after(limit), "the artifacts to be collected"))).map_err(ssh_failure)?;
    let problems: Vec<String> = CollectProblem::parse_report(&out).iter().map(ToString::to_string).collect();
    if !problems.is_empty() {
        return Err(RebuildError::Artifacts { problems });
    }
    if status != 0 {
        return Err(RebuildError::Collect { status, output: format!("{out}{err}").trim().to_string() });
    }
    Ok(())
}

/// Adds the serial console's tail to SSH and guest-side errors.
fn with_serial_tail(e: RebuildError, serial_log: &Path) -> RebuildError {
    match e {
        RebuildError::Vm(VmError::Ssh { source, .. }) => RebuildError::Vm(VmError::Ssh { serial_tail: tail_of(serial_log, 30), source }),
        RebuildError::Prepare { status, output, .. } => RebuildError::Prepare { status, output, serial_tail: tail_of(serial_log, 30) },
        other => other,
    }
}

/// Runs `step` with the machine's SSH session on a blocking thread. On
/// failure the serial console is kept in `serial_copy` and its tail added
/// to the error.
pub(super) async fn in_guest<T: Send + 'static>(
    machine: &mut Machine,
    serial_copy: &Path,
    step: impl FnOnce(&GuestSession) -> Result<T, RebuildError> + Send + 'static,
) -> Result<T, RebuildError> {
    let e = match machine.with_session(step).await {
        Ok(value) => return Ok(value),
        Err(e) => e,
    };
    // A dropped connection is usually the VM's doing: say what happened. The
    // socket closes while QEMU is still exiting, so give it a moment.
    if let RebuildError::Vm(VmError::Ssh { .. }) = e {
        let deadline = Deadline::after(Duration::from_secs(2));
        while !deadline.passed() {
            if let Err(vm) = machine.health() {
                let _ = fs::copy(machine.serial_log(), serial_copy);
                return Err(RebuildError::Vm(vm));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let _ = fs::copy(machine.serial_log(), serial_copy);
    Err(with_serial_tail(e, machine.serial_log()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_recipes_env_and_the_proxy_join_the_fixed_environment() {
        let recipe = BuildRecipe::parse(
            "[build]\ncommand = \"make\"\nartifacts = [\"x\"]\nenv = { LANG = \"de_DE.UTF-8\" }\nnetwork = { allow = [\"deb.debian.org\"] }\n",
            Path::new("r"),
        )
        .unwrap();
        let env = build_env(&recipe, 1_700_000_000, GuestUser::Build);
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("LANG"), Some("de_DE.UTF-8"), "the recipe's env wins");
        assert_eq!(get("https_proxy"), Some("http://10.0.2.100:3128"));
        assert_eq!(get("HOME"), Some("/build/home"));
    }
}
