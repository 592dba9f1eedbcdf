//! What the guest reports about itself at first contact: kernel, vCPUs, CPU
//! model and flags, memory, hostname, clock. Kept for the result, and used to
//! fail loudly when something moved the pinned clock.

use serde::{Deserialize, Serialize};

use crate::guest::session::{GuestError, GuestSession};

/// The shell command that prints the facts, one per line, in [`GuestFacts`]
/// order, then the clock. /proc/cpuinfo is hashed without the lines that
/// vary from boot to boot (`cpu MHz`, `bogomips`: the measured TSC speed).
const FACTS_COMMAND: &str = "uname -a; nproc; \
grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'; \
grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'; \
awk '/^MemTotal:/ {print $2}' /proc/meminfo; hostname; \
awk -F': *' '/^vendor_id/ {v=$2} /^cpu family/ {f=$2} /^model[ \t]*:/ {m=$2} /^stepping/ {s=$2} /^$/ {exit} \
END {print v \" family \" f \" model \" m \" stepping \" s}' /proc/cpuinfo; \
grep -v -e '^cpu MHz' -e '^bogomips' /proc/cpuinfo | sha256sum | cut -d' ' -f1; \
date -u +%s";

/// The guest's own view of the machine.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestFacts {
    /// `uname -a`.
    pub uname: String,
    /// `nproc`.
    pub nproc: u32,
    /// CPU model name from /proc/cpuinfo.
    pub cpu_model: String,
    /// CPU flags from /proc/cpuinfo.
    pub cpu_flags: String,
    /// MemTotal in KiB.
    pub memory_kib: u64,
    /// `hostname`.
    pub hostname: String,
    /// Vendor, family, model and stepping from /proc/cpuinfo.
    #[serde(default)]
    pub cpu_signature: String,
    /// SHA-256 of /proc/cpuinfo without `cpu MHz` and `bogomips`: every
    /// other thing the guest kernel says about its CPUs (caches, address
    /// sizes, bugs, topology) for every vCPU.
    #[serde(default)]
    pub cpuinfo_sha256: String,
}

/// The facts plus the guest clock at first contact (which advances with the
/// boot time, so it is checked rather than recorded as a fact).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FirstContact {
    /// The guest's view of the machine.
    pub facts: GuestFacts,
    /// The guest clock, seconds since 1970.
    pub clock: i64,
}

/// Facts could not be gathered or do not add up.
#[derive(Debug, thiserror::Error)]
pub enum FactsError {
    /// The command could not run.
    #[error("cannot collect guest facts")]
    Ssh(#[from] GuestError),
    /// The output was not as expected.
    #[error("unexpected guest facts output (status {status}): {output:?}")]
    Parse {
        /// Exit status.
        status: i32,
        /// What was printed.
        output: String,
    },
    /// Something moved the guest clock away from the pinned one.
    #[error("the guest clock reads {guest} but was pinned to {pinned} {elapsed}s ago: something in the guest moved it")]
    ClockMoved {
        /// Guest clock.
        guest: i64,
        /// Pinned clock.
        pinned: i64,
        /// Seconds since QEMU started.
        elapsed: i64,
    },
}

impl GuestFacts {
    /// Parses [`FACTS_COMMAND`] output.
    fn parse(status: i32, output: &str) -> Result<FirstContact, FactsError> {
        let bad = || FactsError::Parse { status, output: output.to_string() };
        let lines: Vec<&str> = output.lines().collect();
        if status != 0 || lines.len() != 9 {
            return Err(bad());
        }
        let facts = GuestFacts {
            uname: lines[0].to_string(),
            nproc: lines[1].trim().parse().map_err(|_| bad())?,
            cpu_model: lines[2].to_string(),
            cpu_flags: lines[3].to_string(),
            memory_kib: lines[4].trim().parse().map_err(|_| bad())?,
            hostname: lines[5].to_string(),
            cpu_signature: lines[6].to_string(),
            cpuinfo_sha256: lines[7].to_string(),
        };
        Ok(FirstContact { facts, clock: lines[8].trim().parse().map_err(|_| bad())? })
    }

    /// Collects the facts and the clock over `session`.
    pub fn collect(session: &GuestSession) -> Result<FirstContact, FactsError> {
        let (status, out, _) = session.exec_capture(FACTS_COMMAND)?;
        Self::parse(status, &out)
    }
}

impl FirstContact {
    /// Fails unless the guest clock lies between the pinned clock and the
    /// pinned clock plus the time the VM has run (with `slack` seconds).
    pub fn check_clock(&self, pinned: i64, elapsed: i64, slack: i64) -> Result<(), FactsError> {
        if self.clock < pinned || self.clock > pinned + elapsed + slack {
            return Err(FactsError::ClockMoved { guest: self.clock, pinned, elapsed });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OUT: &str =
        "Linux builder 6.1.0 #1 SMP x86_64 GNU/Linux\n2\nIntel Core i7 9xx (Nehalem Class Core i7)\nfpu vme de\n2013516\nbuilder\n\
GenuineIntel family 6 model 26 stepping 3\n0f343b0931126a20f133d67c2b018a3b0f343b0931126a20f133d67c2b018a3b\n1732492807\n";

    #[test]
    fn parses_the_facts() {
        let c = GuestFacts::parse(0, OUT).unwrap();
        let f = &c.facts;
        assert_eq!((f.nproc, f.memory_kib, f.hostname.as_str(), c.clock), (2, 2013516, "builder", 1732492807));
        assert_eq!(f.cpu_signature, "GenuineIntel family 6 model 26 stepping 3");
        assert_eq!(f.cpuinfo_sha256.len(), 64);
    }

    #[test]
    fn rejects_short_output_and_failures() {
        assert!(GuestFacts::parse(0, "Linux\n2\n").is_err());
        assert!(GuestFacts::parse(1, OUT).is_err());
    }

    #[test]
    fn clock_check() {
        let f = GuestFacts::parse(0, OUT).unwrap();
        assert!(f.check_clock(1732492800, 5, 10).is_ok());
        // systemd-style jump forward to a build date.
        assert!(f.check_clock(1600000000, 5, 10).is_err());
        // Clock behind the pin.
        assert!(f.check_clock(1732492900, 5, 10).is_err());
    }
}
