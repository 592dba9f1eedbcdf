//! The guest contract: every name, path, id and console line that reprovm
//! and the builder's scripts (`provision/`) must agree on, written only
//! here. The scripts receive them as environment variables
//! ([`variables`]): [`script_command`] sets them for each script sent over
//! SSH, and an image build hands them ([`definitions`]) to
//! `provision/customize-image`, which installs them as `/etc/reprovm/contract`
//! for the scripts baked into the image (init, the initrd's init). A test
//! checks that no value below appears as a literal in `provision/`.
//!
//! Also here: the one command line that runs a command as the build user
//! with the build's environment (build, `run` and `shell` alike), and the
//! parser of the report the artifact collection sends back.

use std::collections::BTreeMap;

/// The unprivileged user every build, `run` and `shell` command runs as.
pub const BUILD_USER: &str = "builder";
/// Its uid and gid; the scratch disk's files belong to it.
pub const BUILD_UID: u32 = 1000;
/// The builder's host name (a guest fact).
pub const HOSTNAME: &str = "builder";
/// Where the scratch disk is mounted.
pub const BUILD_ROOT: &str = "/build";
/// The scratch disk's top-level directories, under [`BUILD_ROOT`]: the
/// source (the build's working directory), the build user's home, its
/// TMPDIR, and reprovm's own files (root's, read-only to the build).
pub const SCRATCH_DIRS: ScratchDirs = ScratchDirs { src: "src", home: "home", tmp: "tmp", meta: ".reprovm" };
/// The recipe's artifact globs, NUL-separated, in the scratch disk's `meta`
/// directory.
pub const ARTIFACT_GLOBS_FILE: &str = "artifacts";
/// Serial numbers by which the guest finds the extra disks.
pub const SCRATCH_SERIAL: &str = "reprovm-scratch";
/// See [`SCRATCH_SERIAL`].
pub const OUTPUT_SERIAL: &str = "reprovm-output";
/// The fw_cfg directory of the per-run files…
pub const FW_CFG_DIR: &str = "opt/reprovm";
/// …the guest's SSH host key (private)…
pub const FW_CFG_HOST_KEY: &str = "ssh_host_ed25519_key";
/// …and the one client key sshd accepts.
pub const FW_CFG_AUTHORIZED_KEYS: &str = "authorized_keys";
/// The kernel parameter naming the root disk for the initrd.
pub const ROOT_PARAMETER: &str = "reprovm.root";
/// Console line: the builder's init runs (the kernel booted).
pub const INIT_MARKER: &str = "reprovm-init: started";
/// Console line: the per-run keys are in place, sshd starts next.
pub const KEYS_MARKER: &str = "reprovm-init: keys installed";
/// Collect report: a glob that matched nothing (`nomatch<TAB>GLOB`).
pub const REPORT_NO_MATCH: &str = "nomatch";
/// Collect report: a match refused (`refused<TAB>PATH<TAB>WHY`).
pub const REPORT_REFUSED: &str = "refused";
/// PATH of every command reprovm runs for the user.
pub const BUILD_PATH: &str = "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin";

/// The scratch disk's directories (see [`SCRATCH_DIRS`]).
pub struct ScratchDirs {
    /// The source tree, the build's working directory.
    pub src: &'static str,
    /// The build user's home.
    pub home: &'static str,
    /// The build's TMPDIR.
    pub tmp: &'static str,
    /// reprovm's files for the guest scripts.
    pub meta: &'static str,
}

/// `dir` (one of [`SCRATCH_DIRS`]) as the guest sees it.
fn guest_path(dir: &str) -> String {
    format!("{BUILD_ROOT}/{dir}")
}

/// The build's working directory in the guest.
fn build_dir() -> String {
    guest_path(SCRATCH_DIRS.src)
}

/// The contract as the scripts read it: `REPROVM_…` variables.
pub fn variables() -> Vec<(&'static str, String)> {
    vec![
        ("REPROVM_BUILD_USER", BUILD_USER.into()),
        ("REPROVM_BUILD_UID", BUILD_UID.to_string()),
        ("REPROVM_HOSTNAME", HOSTNAME.into()),
        ("REPROVM_BUILD_ROOT", BUILD_ROOT.into()),
        ("REPROVM_BUILD_DIR", build_dir()),
        ("REPROVM_BUILD_HOME", guest_path(SCRATCH_DIRS.home)),
        ("REPROVM_BUILD_TMP", guest_path(SCRATCH_DIRS.tmp)),
        ("REPROVM_ARTIFACT_GLOBS", format!("{}/{ARTIFACT_GLOBS_FILE}", guest_path(SCRATCH_DIRS.meta))),
        ("REPROVM_SCRATCH_SERIAL", SCRATCH_SERIAL.into()),
        ("REPROVM_OUTPUT_SERIAL", OUTPUT_SERIAL.into()),
        ("REPROVM_FW_CFG_DIR", FW_CFG_DIR.into()),
        ("REPROVM_FW_CFG_HOST_KEY", FW_CFG_HOST_KEY.into()),
        ("REPROVM_FW_CFG_AUTHORIZED_KEYS", FW_CFG_AUTHORIZED_KEYS.into()),
        ("REPROVM_ROOT_PARAMETER", ROOT_PARAMETER.into()),
        ("REPROVM_INIT_MARKER", INIT_MARKER.into()),
        ("REPROVM_KEYS_MARKER", KEYS_MARKER.into()),
        ("REPROVM_REPORT_NO_MATCH", REPORT_NO_MATCH.into()),
        ("REPROVM_REPORT_REFUSED", REPORT_REFUSED.into()),
    ]
}

/// The contract as a shell file (`NAME='value'` lines), for the image.
pub fn definitions() -> String {
    variables().into_iter().map(|(name, value)| format!("{name}={}\n", quote(&value))).collect()
}

/// Quotes `s` for a POSIX shell.
fn quote(s: &str) -> String {
    shlex::try_quote(s).map(|q| q.into_owned()).unwrap_or_else(|_| "''".into())
}

/// The command line that runs the `provision/` script `script` (its text)
/// with `interpreter`, the contract in its environment, `$0` = `name` and
/// `args` as its arguments.
pub fn script_command(interpreter: &str, script: &str, name: &str, args: &[&str]) -> String {
    let vars: Vec<String> = variables().into_iter().map(|(k, v)| format!("{k}={}", quote(&v))).collect();
    let args: Vec<String> = args.iter().map(|a| quote(a)).collect();
    format!("{} {interpreter} -c {} {name} {}", vars.join(" "), quote(script), args.join(" ")).trim_end().to_string()
}

/// Who a command runs as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestUser {
    /// The unprivileged [`BUILD_USER`] (the build command, `run`, `shell`).
    Build,
    /// root (the recipe's provision commands).
    Root,
}

/// The environment every command reprovm runs for the user gets, and
/// nothing else: the fixed variables, SOURCE_DATE_EPOCH, then `extra` (the
/// proxy variables, the recipe's `build.env`), which win.
pub fn environment(user: GuestUser, epoch: i64, extra: &[(String, String)]) -> Vec<(String, String)> {
    let home = guest_path(SCRATCH_DIRS.home);
    let (name, home) = match user {
        GuestUser::Build => (BUILD_USER, home.as_str()),
        GuestUser::Root => ("root", "/root"),
    };
    let mut env: BTreeMap<String, String> = [
        ("PATH", BUILD_PATH),
        ("HOME", home),
        ("USER", name),
        ("LOGNAME", name),
        ("SHELL", "/bin/sh"),
        ("TMPDIR", &guest_path(SCRATCH_DIRS.tmp)),
        ("TZ", "UTC"),
        ("LANG", "C.UTF-8"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    env.insert("SOURCE_DATE_EPOCH".into(), epoch.to_string());
    env.extend(extra.iter().cloned());
    env.into_iter().collect()
}

/// The one command line that runs `command` (a shell command) in the build
/// directory with exactly `env`, as `user`: what a build, `reprovm run` and
/// `reprovm shell` all send.
pub fn user_command(command: &str, env: &[(String, String)], user: GuestUser) -> String {
    let env: Vec<String> = env.iter().map(|(k, v)| quote(&format!("{k}={v}"))).collect();
    let setpriv = match user {
        GuestUser::Build => format!("setpriv --reuid={BUILD_USER} --regid={BUILD_USER} --init-groups "),
        GuestUser::Root => String::new(),
    };
    format!("cd {} && umask 022 && exec {setpriv}env -i {} /bin/sh -c {}", build_dir(), env.join(" "), quote(command))
}

/// A problem the artifact collection reported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CollectProblem {
    /// A recipe glob matched nothing.
    NoMatch {
        /// The glob, as the guest echoed it.
        glob: String,
    },
    /// A match was refused (a link, a device, outside the build directory…).
    Refused {
        /// The path, as the guest named it.
        path: String,
        /// Why, in the guest's words.
        why: String,
    },
}

impl CollectProblem {
    /// The problems in the collection's report (`provision/archive-artifacts`);
    /// other lines are ignored.
    pub fn parse_report(report: &str) -> Vec<CollectProblem> {
        report
            .lines()
            .filter_map(|line| {
                let mut fields = line.splitn(3, '\t');
                match (fields.next(), fields.next(), fields.next()) {
                    (Some(REPORT_NO_MATCH), Some(glob), _) => Some(CollectProblem::NoMatch { glob: glob.into() }),
                    (Some(REPORT_REFUSED), Some(path), Some(why)) => Some(CollectProblem::Refused { path: path.into(), why: why.into() }),
                    _ => None,
                }
            })
            .collect()
    }
}

impl std::fmt::Display for CollectProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CollectProblem::NoMatch { glob } => write!(f, "glob {glob:?} (build.artifacts) matched nothing in {}", build_dir()),
            CollectProblem::Refused { path, why } => write!(f, "{path:?} refused: {why}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::provision::FILES;

    /// No value of the contract is written out in `provision/` (outside
    /// comments): the scripts take each from its variable.
    #[test]
    fn provision_scripts_hold_no_literal_of_the_contract() {
        let values = variables();
        for file in FILES {
            for (n, line) in file.contents.lines().enumerate() {
                if line.trim_start().starts_with('#') {
                    continue;
                }
                for (name, value) in &values {
                    assert!(!mentions(line, value), "provision/{}:{}: {value:?} is written out; use ${name}: {line}", file.name, n + 1);
                }
            }
        }
    }

    /// Whether `line` holds `value` not as part of a longer word.
    fn mentions(line: &str, value: &str) -> bool {
        let word = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '-');
        line.match_indices(value).any(|(at, _)| !word(line[..at].chars().next_back()) && !word(line[at + value.len()..].chars().next()))
    }

    #[test]
    fn the_literal_check_finds_whole_values_only() {
        assert!(mentions("mkdir -p /build/src", "/build") && mentions("printf 'nomatch\\t%s'", "nomatch"));
        assert!(!mentions("useradd reprovm-builder", "builder") && !mentions("x=$REPROVM_BUILD_ROOT", "/build"));
    }

    #[test]
    fn definitions_are_shell_assignments_of_every_variable() {
        let text = definitions();
        assert_eq!(text.lines().count(), variables().len());
        assert!(text.contains("REPROVM_INIT_MARKER='reprovm-init: started'\n"), "{text}");
        assert!(text.contains("REPROVM_BUILD_DIR=/build/src\n"), "{text}");
    }

    #[test]
    fn a_script_gets_the_contract_its_name_and_quoted_arguments() {
        let line = script_command("sh", "echo \"$1\"", "prepare-build", &["http://10.0.2.100:3128", ""]);
        assert!(line.starts_with("REPROVM_BUILD_USER=builder REPROVM_BUILD_UID=1000 "), "{line}");
        assert!(line.ends_with(r#" sh -c 'echo "$1"' prepare-build http://10.0.2.100:3128 ''"#), "{line}");
    }

    #[test]
    fn build_command_runs_as_the_build_user_with_only_the_fixed_environment() {
        let extra = [("CFLAGS".to_string(), "-O2 -g".to_string()), ("LANG".to_string(), "de_DE.UTF-8".to_string())];
        let env = environment(GuestUser::Build, 1_700_000_000, &extra);
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("SOURCE_DATE_EPOCH"), Some("1700000000"));
        assert_eq!(get("TZ"), Some("UTC"));
        assert_eq!(get("HOME"), Some("/build/home"));
        assert_eq!(get("TMPDIR"), Some("/build/tmp"));
        assert_eq!(get("LANG"), Some("de_DE.UTF-8"), "the recipe's env wins");
        let line = user_command("make 'a b'", &env, GuestUser::Build);
        assert!(
            line.starts_with("cd /build/src && umask 022 && exec setpriv --reuid=builder --regid=builder --init-groups env -i "),
            "{line}"
        );
        assert!(line.contains("'CFLAGS=-O2 -g'") && line.ends_with(r#"/bin/sh -c "make 'a b'""#), "{line}");
        let root = user_command("apt-get update", &environment(GuestUser::Root, 1, &[]), GuestUser::Root);
        assert!(root.contains("exec env -i ") && root.contains("HOME=/root") && !root.contains("setpriv"), "{root}");
    }

    #[test]
    fn the_collect_report_is_parsed_and_other_lines_ignored() {
        let report = "nomatch\t*.iso\nrefused\tpasswd\ta symbolic link (to /etc/passwd)\nnoise\nrefused\tonly-two-fields\n";
        let problems = CollectProblem::parse_report(report);
        assert_eq!(
            problems,
            [
                CollectProblem::NoMatch { glob: "*.iso".into() },
                CollectProblem::Refused { path: "passwd".into(), why: "a symbolic link (to /etc/passwd)".into() }
            ]
        );
        assert_eq!(problems[0].to_string(), "glob \"*.iso\" (build.artifacts) matched nothing in /build/src");
    }
}
