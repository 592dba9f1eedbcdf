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
use crate::guest::provision::{ARCHIVE_ARTIFACTS, COLLECT_ARTIFACTS, PREPARE_BUILD};
use crate::guest::session::BUILD_USER;
use crate::guest::{GuestError, GuestSession};
use crate::logs::{CappedLog, SharedLog};
use crate::path_error::path_error;
use crate::rebuild::recipe::BuildRecipe;
use crate::rebuild::stages::BuildRequest;
use crate::rebuild::RebuildError;
use crate::vm::{Machine, Network, VmError, EGRESS_PROXY};

/// Limit for the short guest-side steps (mounting the scratch disk).
const GUEST_STEP_LIMIT: Duration = Duration::from_secs(60);
/// The build directory in the guest.
const BUILD_DIR: &str = "/build/src";
/// PATH of the build.
const BUILD_PATH: &str = "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin";

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
    let mount = format!("sh -c {} prepare-build {}", quote(PREPARE_BUILD), quote(&proxy));
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
    let root_env = build_env(recipe, epoch, true);
    for (i, command) in recipe.build.provision.iter().enumerate() {
        let line = guest_command(command, &root_env, true);
        let status = session.exec_until(&line, Some((limit, "the provision commands")), &mut tee(), &mut tee()).map_err(timed)?;
        if status != 0 {
            return Err(RebuildError::Provision { index: i + 1, command: command.clone(), status, log_tail: log_tail() });
        }
    }
    let start = Instant::now();
    let line = guest_command(&recipe.build.command, &build_env(recipe, epoch, false), false);
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
