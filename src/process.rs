//! Child processes reprovm supervises (mmdebstrap, mkfs, QEMU): each runs in
//! its own process group, is logged before it is spawned, is stopped with
//! SIGTERM and then SIGKILL of the whole group, and is always reaped — also
//! when the owner is dropped on an error path.

use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus};
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use crate::deadline::Deadline;

/// How often a waiting loop looks at the child.
const POLL: Duration = Duration::from_millis(20);

/// A running child in its own process group.
#[derive(Debug)]
pub struct Supervised {
    name: &'static str,
    child: Child,
    status: Option<ExitStatus>,
}

impl Supervised {
    /// Logs and spawns `cmd` as the leader of a new process group. The child
    /// is also killed by the kernel if reprovm itself dies (even by SIGKILL).
    pub fn spawn(name: &'static str, cmd: &mut Command) -> io::Result<Supervised> {
        tracing::debug!("spawning {name}: {cmd:?}");
        // SAFETY: prctl(2) is async-signal-safe and touches no memory.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.process_group(0).spawn()?;
        Ok(Supervised { name, child, status: None })
    }

    /// The child's process id (also its process group id).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status if the child has exited (reaping it).
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self.child.try_wait()?;
        }
        Ok(self.status)
    }

    /// Waits for the child to exit, up to `limit`.
    pub fn wait_for(&mut self, limit: Duration) -> io::Result<Option<ExitStatus>> {
        let deadline = Deadline::after(limit);
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(Some(status));
            }
            if deadline.passed() {
                return Ok(None);
            }
            std::thread::sleep(POLL.min(deadline.remaining()));
        }
    }

    /// Sends `signal` to the child's whole process group.
    fn signal_group(&self, signal: Signal) {
        if self.status.is_none() {
            let _ = killpg(Pid::from_raw(self.child.id() as i32), signal);
        }
    }

    /// Stops the child: SIGTERM to the group, `grace` to exit, then SIGKILL
    /// to the group; reaps it and returns its status.
    pub fn terminate(&mut self, grace: Duration) -> io::Result<ExitStatus> {
        if let Some(status) = self.try_wait()? {
            // The leader is gone; make sure nothing of its group lingers.
            let _ = killpg(Pid::from_raw(self.child.id() as i32), Signal::SIGKILL);
            return Ok(status);
        }
        self.signal_group(Signal::SIGTERM);
        if let Some(status) = self.wait_for(grace)? {
            let _ = killpg(Pid::from_raw(self.child.id() as i32), Signal::SIGKILL);
            return Ok(status);
        }
        tracing::warn!("{} did not stop within {grace:?} of SIGTERM: killing its process group", self.name);
        self.kill()
    }

    /// SIGKILL to the whole group, then reap.
    pub fn kill(&mut self) -> io::Result<ExitStatus> {
        let _ = killpg(Pid::from_raw(self.child.id() as i32), Signal::SIGKILL);
        let status = self.child.wait()?;
        self.status = Some(status);
        Ok(status)
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.kill();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminate_stops_the_whole_group() {
        let mut child = Supervised::spawn("sh", Command::new("sh").args(["-c", "sleep 30 & sleep 30; wait"])).unwrap();
        let pgid = child.pid() as i32;
        std::thread::sleep(Duration::from_millis(100));
        child.terminate(Duration::from_secs(2)).unwrap();
        // No live process of the group may remain (orphaned zombies wait for
        // init; signalled ones take a moment to die).
        let live = || -> Vec<String> {
            std::fs::read_dir("/proc")
                .unwrap()
                .filter_map(|e| std::fs::read_to_string(e.unwrap().path().join("stat")).ok())
                .filter(|stat| {
                    let fields: Vec<&str> = stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
                    fields.get(2) == Some(&pgid.to_string().as_str()) && fields.first() != Some(&"Z")
                })
                .collect()
        };
        let deadline = Deadline::after(Duration::from_secs(5));
        while !live().is_empty() && !deadline.passed() {
            std::thread::sleep(Duration::from_millis(10));
        }
        let live = live();
        assert!(live.is_empty(), "{live:?}");
    }

    #[test]
    fn drop_kills_and_reaps() {
        let child = Supervised::spawn("sleep", Command::new("sleep").arg("30")).unwrap();
        let pid = child.pid() as i32;
        drop(child);
        assert!(nix::sys::signal::kill(Pid::from_raw(pid), None).is_err());
    }

    #[test]
    fn wait_for_returns_status() {
        let mut child = Supervised::spawn("true", &mut Command::new("true")).unwrap();
        assert!(child.wait_for(Duration::from_secs(5)).unwrap().unwrap().success());
    }
}
