//! What the guest reports about itself at first contact: kernel, vCPUs, CPU
//! model and flags, memory, hostname, clock. Taken by the commands once the
//! builder booted ([`FirstContact::take`]), kept for the result, and used to
//! fail loudly when something moved the pinned clock.

use serde::{Deserialize, Serialize};

use crate::guest::session::{GuestError, GuestSession};

/// The command that prints the facts, one per line: what `uname -a`,
/// `nproc`, `hostname` and `date -u +%s` print, then /proc/meminfo and
/// /proc/cpuinfo as they are, which the host takes apart
/// ([`GuestFacts::parse`]). Root's shell in the builder is bash, and this
/// uses only its builtins: under TCG every program the guest starts costs
/// tens of milliseconds, and this runs at every boot. (`uname -a` is the
/// kernel's sysname, nodename, release and version, the machine, and
/// coreutils' "GNU/Linux"; `nproc` counts the CPUs /proc/cpuinfo lists.)
const FACTS_COMMAND: &str = r#"k=/proc/sys/kernel; read -r o < $k/ostype; read -r h < $k/hostname; read -r r < $k/osrelease; read -r v < $k/version
n=0; while read -r w _; do [[ $w == processor ]] && n=$((n + 1)); done < /proc/cpuinfo
printf '%s %s %s %s %s GNU/Linux\n%s\n%s\n%(%s)T\n' "$o" "$h" "$r" "$v" "$HOSTTYPE" "$n" "$h" -1
IFS= read -r -d '' m < /proc/meminfo; IFS= read -r -d '' c < /proc/cpuinfo; printf '%s%s' "$m" "$c""#;

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
    /// Parses [`FACTS_COMMAND`] output. /proc/cpuinfo begins at its first
    /// `processor` line; it is hashed without the lines that vary from boot
    /// to boot (`cpu MHz`, `bogomips`: the measured TSC speed).
    pub fn parse(status: i32, output: &str) -> Result<FirstContact, FactsError> {
        let bad = || FactsError::Parse { status, output: output.to_string() };
        let mut lines = output.split_inclusive('\n');
        let mut next = || lines.next().map(|l| l.trim_end_matches('\n')).ok_or_else(bad);
        let (uname, nproc, hostname, clock) = (next()?, next()?, next()?, next()?);
        let rest = &output[uname.len() + nproc.len() + hostname.len() + clock.len() + 4..];
        let cpuinfo_at = rest.find("\nprocessor").map(|i| i + 1).filter(|_| status == 0).ok_or_else(bad)?;
        let (meminfo, cpuinfo) = rest.split_at(cpuinfo_at);
        fn field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
            text.lines().find(|l| l.split(':').next().is_some_and(|k| k.trim_end() == key)).and_then(|l| l.split_once(':')).map(|(_, v)| v)
        }
        // The first CPU's block, as `grep -m1 | cut -d: -f2- | sed 's/^ //'` reads it.
        let first = cpuinfo.split("\n\n").next().unwrap_or_default();
        let value = |key: &str| field(first, key).map(|v| v.strip_prefix(' ').unwrap_or(v).to_string()).ok_or_else(bad);
        let memory = field(meminfo, "MemTotal").and_then(|v| v.split_whitespace().next()).and_then(|n| n.parse().ok()).ok_or_else(bad)?;
        let kept: String = cpuinfo.split_inclusive('\n').filter(|l| !l.starts_with("cpu MHz") && !l.starts_with("bogomips")).collect();
        let facts = GuestFacts {
            uname: uname.to_string(),
            nproc: nproc.trim().parse().map_err(|_| bad())?,
            cpu_model: value("model name")?,
            cpu_flags: value("flags")?,
            memory_kib: memory,
            hostname: hostname.to_string(),
            cpu_signature: format!(
                "{} family {} model {} stepping {}",
                value("vendor_id")?.trim(),
                value("cpu family")?.trim(),
                value("model")?.trim(),
                value("stepping")?.trim()
            ),
            cpuinfo_sha256: crate::image::pin::Pin::from_digest(<sha2::Sha256 as sha2::Digest>::digest(kept.as_bytes()).into()).hex(),
        };
        Ok(FirstContact { facts, clock: clock.trim().parse().map_err(|_| bad())? })
    }

    /// Collects the facts and the clock over `session`.
    pub fn collect(session: &GuestSession) -> Result<FirstContact, FactsError> {
        let (status, out, _) = session.exec_capture(FACTS_COMMAND)?;
        Self::parse(status, &out)
    }
}

/// How many seconds the guest clock may run ahead of the pinned clock plus
/// the time QEMU has run.
const CLOCK_SLACK: i64 = 30;

impl FirstContact {
    /// Collects the facts over `session` and checks the guest clock against
    /// `pinned`, the clock QEMU was started with at `qemu_started`.
    pub fn take(session: &GuestSession, pinned: i64, qemu_started: std::time::Instant) -> Result<FirstContact, FactsError> {
        let contact = GuestFacts::collect(session)?;
        contact.check_clock(pinned, qemu_started.elapsed().as_secs() as i64, CLOCK_SLACK)?;
        tracing::debug!(
            "guest facts: {} vCPUs, {} KiB, {}, clock {}",
            contact.facts.nproc,
            contact.facts.memory_kib,
            crate::escape::escape(&contact.facts.cpu_model),
            contact.clock
        );
        Ok(contact)
    }

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

    const CPUINFO: &str = include_str!("cpuinfo.sample");
    const MEMINFO: &str = include_str!("meminfo.sample");

    fn output() -> String {
        format!("Linux builder 6.1.0 #1 SMP x86_64 GNU/Linux\n2\nbuilder\n1732492807\n{MEMINFO}{CPUINFO}")
    }

    #[test]
    fn parses_the_facts() {
        let c = GuestFacts::parse(0, &output()).unwrap();
        let f = &c.facts;
        assert_eq!((f.nproc, f.hostname.as_str(), c.clock), (2, "builder", 1732492807));
        assert_eq!(f.cpu_signature, "GenuineIntel family 6 model 26 stepping 3");
        assert_eq!(f.cpu_model, "Intel Core i7 9xx (Nehalem Class Core i7)");
        assert!(f.cpu_flags.starts_with("fpu de pse") && f.cpu_flags.ends_with("lahf_lm"), "{}", f.cpu_flags);
    }

    /// The host's reading of a guest's /proc files equals what the shell
    /// pipeline reprovm ran in the guest before gives for the same files
    /// (run here by sh, grep, awk, sed and sha256sum): result.json's facts
    /// stay comparable with those of earlier builds.
    #[test]
    fn reads_the_files_as_the_shell_pipeline_did() {
        let dir = tempfile::tempdir().unwrap();
        let (cpuinfo, meminfo) = (dir.path().join("cpuinfo"), dir.path().join("meminfo"));
        std::fs::write(&cpuinfo, CPUINFO).unwrap();
        std::fs::write(&meminfo, MEMINFO).unwrap();
        let pipeline = "grep -m1 '^model name' \"$1\" | cut -d: -f2- | sed 's/^ //'; \
grep -m1 '^flags' \"$1\" | cut -d: -f2- | sed 's/^ //'; \
awk '/^MemTotal:/ {print $2}' \"$2\"; \
awk -F': *' '/^vendor_id/ {v=$2} /^cpu family/ {f=$2} /^model[ \t]*:/ {m=$2} /^stepping/ {s=$2} /^$/ {exit} \
END {print v \" family \" f \" model \" m \" stepping \" s}' \"$1\"; \
grep -v -e '^cpu MHz' -e '^bogomips' \"$1\" | sha256sum | cut -d' ' -f1";
        let out = std::process::Command::new("sh").args(["-c", pipeline, "facts"]).arg(&cpuinfo).arg(&meminfo).output().unwrap();
        let shell = String::from_utf8(out.stdout).unwrap();
        let shell: Vec<&str> = shell.lines().collect();
        let f = GuestFacts::parse(0, &output()).unwrap().facts;
        assert_eq!([f.cpu_model.as_str(), &f.cpu_flags, &f.memory_kib.to_string(), &f.cpu_signature, &f.cpuinfo_sha256], shell[..]);
    }

    #[test]
    fn rejects_short_output_and_failures() {
        assert!(GuestFacts::parse(0, "Linux\n2\n").is_err());
        assert!(GuestFacts::parse(1, &output()).is_err());
        assert!(GuestFacts::parse(0, &format!("Linux\n2\nbuilder\n1732492807\n{MEMINFO}")).is_err(), "no cpuinfo");
    }

    #[test]
    fn clock_check() {
        let f = GuestFacts::parse(0, &output()).unwrap();
        assert!(f.check_clock(1732492800, 5, 10).is_ok());
        // systemd-style jump forward to a build date.
        assert!(f.check_clock(1600000000, 5, 10).is_err());
        // Clock behind the pin.
        assert!(f.check_clock(1732492900, 5, 10).is_err());
    }
}
