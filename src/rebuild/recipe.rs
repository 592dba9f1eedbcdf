//! Build recipes: `reprovm.toml` beside the sources, the strict description
//! of which image and machine a build needs, its command, environment,
//! network and artifacts (docs/recipe.md). Unknown fields are errors, and
//! every value is checked here, before anything boots.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::egress::AllowedHost;
use crate::image::Pin;
pub use crate::vm::Network;
use crate::vm::{AccelChoice, MachineSpec};

/// File name of a build recipe beside the sources.
pub const BUILD_RECIPE_FILE: &str = "reprovm.toml";

/// Default vCPUs, memory and scratch disk when the recipe names none.
pub const DEFAULT_CPUS: u32 = 2;
/// Default memory in MiB.
pub const DEFAULT_MEMORY_MIB: u32 = 2048;
/// Default scratch disk in MiB (a sparse file: costs only what is written).
pub const DEFAULT_SCRATCH_MIB: u64 = 16384;
/// Default limit for the build command.
pub const DEFAULT_TIMEOUT_SECS: u64 = 3600;

/// The most a recipe alone may ask of the host: (field, ceiling; the flag
/// that goes beyond it is the field's in [`FLAG_FIELDS`]). A recipe comes
/// with the untrusted source; the command-line flags are the user's own
/// choice and are not capped.
pub const CEILINGS: [(&str, u64); 4] =
    [("machine.cpus", 16), ("machine.memory_mib", 16_384), ("machine.scratch_mib", 65_536), ("build.timeout_secs", 21_600)];

/// The recipe fields a command-line flag sets: (field, flag). A flag's
/// value gets the field's checks, and an error names the flag.
pub const FLAG_FIELDS: [(&str, &str); 6] = [
    ("machine.cpu_model", "--cpu-model"),
    ("machine.cpus", "--cpus"),
    ("machine.memory_mib", "--memory"),
    ("machine.clock", "--clock"),
    ("machine.scratch_mib", "--scratch"),
    ("build.timeout_secs", "--timeout"),
];

/// A build recipe as written.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BuildRecipe {
    /// Which builder image.
    #[serde(default)]
    pub image: ImageSection,
    /// The guest-visible machine.
    #[serde(default)]
    pub machine: MachineSection,
    /// What to run and what comes out.
    pub build: BuildSection,
}

/// `[image]`
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ImageSection {
    /// Exact image pin, `sha256:<hex>`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pin: Option<String>,
    /// Image name (as in `reprovm image list`), used when no pin is given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The image recipe directory it is built from, relative to this file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recipe: Option<PathBuf>,
}

/// `[machine]`
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MachineSection {
    /// Named CPU model.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_model: Option<String>,
    /// vCPUs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    /// Memory in MiB.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u32>,
    /// Guest clock at boot, seconds since 1970.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clock: Option<i64>,
    /// Scratch disk (the build directory) in MiB.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scratch_mib: Option<u64>,
    /// Accelerator choice.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accel: Option<AccelChoice>,
}

/// The machine a build or `run` gets: `[machine]` and the flags, with
/// the defaults for what neither set, resolved once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MachineConfig {
    /// Named CPU model.
    pub cpu_model: String,
    /// vCPUs.
    pub cpus: u32,
    /// Memory in MiB.
    pub memory_mib: u32,
    /// The clock asked for; `None`: the clock policy decides (the image's
    /// date, or SOURCE_DATE_EPOCH when that is later).
    pub clock: Option<i64>,
    /// Scratch disk in MiB.
    pub scratch_mib: u64,
    /// Accelerator choice.
    pub accel: AccelChoice,
}

impl MachineConfig {
    /// The guest-visible machine, its clock at boot being `clock`.
    pub fn spec(&self, clock: i64) -> MachineSpec {
        MachineSpec { cpu_model: self.cpu_model.clone(), cpus: self.cpus, memory_mib: self.memory_mib, clock }
    }
}

impl MachineSection {
    /// The section with the defaults for what it does not set.
    pub fn resolve(&self) -> MachineConfig {
        MachineConfig {
            cpu_model: self.cpu_model.clone().unwrap_or_else(|| crate::vm::args::DEFAULT_CPU_MODEL.to_string()),
            cpus: self.cpus.unwrap_or(DEFAULT_CPUS),
            memory_mib: self.memory_mib.unwrap_or(DEFAULT_MEMORY_MIB),
            clock: self.clock,
            scratch_mib: self.scratch_mib.unwrap_or(DEFAULT_SCRATCH_MIB),
            accel: self.accel.unwrap_or(AccelChoice::Auto),
        }
    }

    /// Checks every value set; `path` names where they come from.
    pub fn validate(&self, path: &Path) -> Result<(), BuildRecipeError> {
        let bad = |field: &str, value: &dyn std::fmt::Display, expected: &str| field_error(path, field, value, expected);
        if let Some(model) = &self.cpu_model {
            crate::vm::args::check_cpu_model(model).map_err(|e| bad("machine.cpu_model", model, &e))?;
        }
        if let Some(cpus) = self.cpus.filter(|c| !(1..=64).contains(c)) {
            return Err(bad("machine.cpus", &cpus, "1 to 64"));
        }
        if let Some(memory) = self.memory_mib.filter(|m| !(256..=262_144).contains(m)) {
            return Err(bad("machine.memory_mib", &memory, "256 to 262144"));
        }
        if let Some(scratch) = self.scratch_mib.filter(|m| !(64..=4_194_304).contains(m)) {
            return Err(bad("machine.scratch_mib", &scratch, "64 to 4194304"));
        }
        if let Some(clock) = self.clock.filter(|c| !(0..=253_402_300_799).contains(c)) {
            return Err(bad("machine.clock", &clock, "seconds since 1970, before the year 10000"));
        }
        Ok(())
    }
}

/// A [`BuildRecipeError::Field`].
fn field_error(path: &Path, field: &str, value: &dyn std::fmt::Display, expected: &str) -> BuildRecipeError {
    BuildRecipeError::Field { path: path.to_path_buf(), field: field.to_string(), value: value.to_string(), expected: expected.to_string() }
}

/// `[build]`
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BuildSection {
    /// Run by `/bin/sh -c` in the build directory as the build user.
    pub command: String,
    /// Extra environment for provision scripts and the build.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Network access during provisioning and the build.
    #[serde(default)]
    pub network: NetworkAccess,
    /// Limit for the build command in seconds.
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
    /// SOURCE_DATE_EPOCH; default: the last commit touching the source, else
    /// the guest clock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_date_epoch: Option<i64>,
    /// Globs (relative to the build directory) of the files to bring back.
    pub artifacts: Vec<String>,
    /// Shell commands run as root in the build directory before the build.
    #[serde(default)]
    pub provision: Vec<String>,
}

fn default_timeout() -> u64 {
    DEFAULT_TIMEOUT_SECS
}

/// `build.network`: `"none"` (the default: no route out), `"nat"` (QEMU's
/// NAT, unrecorded; only with `--network nat`), or a table
/// `{ allow = ["host[:port]", …] }`: the build reaches exactly those hosts,
/// through reprovm's allow-listed, recording proxy (docs/network.md).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "NetworkField", into = "NetworkField")]
pub enum NetworkAccess {
    /// No route out of the guest.
    #[default]
    None,
    /// QEMU's user-mode NAT.
    Nat,
    /// Only these hosts (`host` or `host:port`), through the egress proxy.
    Allow(Vec<String>),
}

impl NetworkAccess {
    /// The machine's network for this access.
    pub fn machine_network(&self) -> Network {
        match self {
            NetworkAccess::None => Network::None,
            NetworkAccess::Nat => Network::Nat,
            NetworkAccess::Allow(_) => Network::Egress,
        }
    }
}

/// How `build.network` is written in TOML.
#[derive(Deserialize, Serialize)]
#[serde(untagged, expecting = "\"none\", \"nat\" or a table { allow = [\"host[:port]\", ...] }")]
enum NetworkField {
    Mode(String),
    Table(AllowTable),
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct AllowTable {
    allow: Vec<String>,
}

impl TryFrom<NetworkField> for NetworkAccess {
    type Error = String;
    fn try_from(field: NetworkField) -> Result<Self, String> {
        match field {
            NetworkField::Mode(mode) if mode == "none" => Ok(NetworkAccess::None),
            NetworkField::Mode(mode) if mode == "nat" => Ok(NetworkAccess::Nat),
            NetworkField::Mode(mode) => {
                Err(format!("unknown network {:?}: expected \"none\", \"nat\" or a table {{ allow = [\"host[:port]\", ...] }}", mode))
            }
            NetworkField::Table(table) => Ok(NetworkAccess::Allow(table.allow)),
        }
    }
}

impl From<NetworkAccess> for NetworkField {
    fn from(access: NetworkAccess) -> Self {
        match access {
            NetworkAccess::None => NetworkField::Mode("none".into()),
            NetworkAccess::Nat => NetworkField::Mode("nat".into()),
            NetworkAccess::Allow(allow) => NetworkField::Table(AllowTable { allow }),
        }
    }
}

/// A recipe that cannot be used (exit code 2).
#[derive(Debug, thiserror::Error)]
pub enum BuildRecipeError {
    /// The file could not be read.
    #[error("cannot read build recipe {}", path.display())]
    Read {
        /// The recipe path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not one a recipe may be (a link in a source tree, a FIFO,
    /// a huge file).
    #[error("refused build recipe {}: {why}", path.display())]
    Refused {
        /// The recipe path.
        path: PathBuf,
        /// Why.
        why: &'static str,
    },
    /// Not valid TOML of the recipe's shape (unknown field, wrong type…).
    #[error("invalid build recipe {}: {message}", path.display())]
    Parse {
        /// The recipe path.
        path: PathBuf,
        /// The parser's message, which names the field and line.
        message: String,
    },
    /// The recipe asks for more of the host than a recipe alone may.
    #[error("build recipe {}: field `{field}` = {value} is over what a recipe alone may ask of this host ({ceiling}); if you trust it, pass {flag} {value}", path.display())]
    OverCeiling {
        /// The recipe path.
        path: PathBuf,
        /// The field name.
        field: &'static str,
        /// The value asked for.
        value: u64,
        /// The ceiling.
        ceiling: u64,
        /// The flag that allows more.
        flag: &'static str,
    },
    /// The recipe asks for network access the user did not grant.
    #[error("build recipe {}: field `build.network` = \"nat\" asks for unrestricted network access (the build could reach this host's own services on 127.0.0.1, its network and the internet, unrecorded); a recipe alone cannot grant it: pass --network nat if you trust this source (docs/security.md)", path.display())]
    NetworkNotGranted {
        /// The recipe path.
        path: PathBuf,
    },
    /// A field has a value that is not allowed.
    #[error("invalid build recipe {}: field `{field}` = {value:?}: {expected}", path.display())]
    Field {
        /// The recipe path.
        path: PathBuf,
        /// The field name.
        field: String,
        /// The rejected value.
        value: String,
        /// What was expected instead.
        expected: String,
    },
}

/// Whether `name` is a portable environment variable name.
fn is_env_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_alphabetic() || b == b'_') && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Why an artifact glob is refused, if it is: it must stay inside the build
/// directory and fit on one line of SHA256SUMS.
pub fn check_artifact_glob(glob: &str) -> Result<(), &'static str> {
    if glob.is_empty() {
        return Err("an empty glob matches nothing");
    }
    if glob.contains(['\n', '\r', '\0']) {
        return Err("a glob is one line without NUL bytes");
    }
    let path = Path::new(glob);
    if path.is_absolute() {
        return Err("globs are relative to the build directory; an absolute path would reach outside it");
    }
    if path.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err("`..` would reach outside the build directory");
    }
    Ok(())
}

impl BuildRecipe {
    /// Checks what the recipe asks of the host against [`CEILINGS`] and the
    /// network the user granted on the command line (`granted_nat`).
    /// `overridden(field)` says which fields a flag set, which are the
    /// user's own choice.
    pub fn check_host_limits(&self, path: &Path, granted_nat: bool, overridden: impl Fn(&str) -> bool) -> Result<(), BuildRecipeError> {
        let asked = [
            self.machine.cpus.map(u64::from),
            self.machine.memory_mib.map(u64::from),
            self.machine.scratch_mib,
            Some(self.build.timeout_secs),
        ];
        for ((field, ceiling), value) in CEILINGS.into_iter().zip(asked) {
            if let Some(value) = value.filter(|v| *v > ceiling && !overridden(field)) {
                let flag = FLAG_FIELDS.iter().find(|(f, _)| *f == field).map_or("its flag", |(_, flag)| flag);
                return Err(BuildRecipeError::OverCeiling { path: path.to_path_buf(), field, value, ceiling, flag });
            }
        }
        if self.build.network == NetworkAccess::Nat && !granted_nat {
            return Err(BuildRecipeError::NetworkNotGranted { path: path.to_path_buf() });
        }
        Ok(())
    }

    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<BuildRecipe, BuildRecipeError> {
        Self::parse(&read_recipe(path, true)?, path)
    }

    /// Loads `src/reprovm.toml`, the recipe a source tree brings: outside
    /// input, so a symbolic link there (to a host file whose lines a parse
    /// error would quote) is refused, as is anything but a regular file.
    pub fn load_from_tree(src: &Path) -> Result<BuildRecipe, BuildRecipeError> {
        let path = src.join(BUILD_RECIPE_FILE);
        Self::parse(&read_recipe(&path, false)?, &path)
    }

    /// Parses and validates recipe text; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<BuildRecipe, BuildRecipeError> {
        let recipe: BuildRecipe = toml::from_str(text)
            .map_err(|e| BuildRecipeError::Parse { path: path.to_path_buf(), message: e.to_string().trim_end().to_string() })?;
        recipe.validate(path)?;
        Ok(recipe)
    }

    /// Checks every value; `path` names the recipe in errors.
    pub fn validate(&self, path: &Path) -> Result<(), BuildRecipeError> {
        let bad = |field: &str, value: &dyn std::fmt::Display, expected: &str| field_error(path, field, value, expected);
        if let Some(pin) = &self.image.pin {
            pin.parse::<Pin>().map_err(|e| bad("image.pin", pin, &e.to_string()))?;
        }
        self.machine.validate(path)?;
        let build = &self.build;
        if build.command.trim().is_empty() || build.command.contains('\0') {
            return Err(bad("build.command", &build.command, "a non-empty shell command line without NUL bytes"));
        }
        if !(1..=7 * 24 * 3600).contains(&build.timeout_secs) {
            return Err(bad("build.timeout_secs", &build.timeout_secs, "1 to 604800 seconds"));
        }
        if let Some(epoch) = build.source_date_epoch.filter(|c| !(0..=253_402_300_799).contains(c)) {
            return Err(bad("build.source_date_epoch", &epoch, "seconds since 1970, before the year 10000"));
        }
        for (name, value) in &build.env {
            if !is_env_name(name) {
                return Err(bad("build.env", name, "variable names are letters, digits and _, not starting with a digit"));
            }
            if name == "SOURCE_DATE_EPOCH" {
                return Err(bad("build.env", name, "set build.source_date_epoch instead"));
            }
            if value.contains('\0') {
                return Err(bad(&format!("build.env.{name}"), value, "a value without NUL bytes"));
            }
        }
        if build.artifacts.is_empty() {
            return Err(bad("build.artifacts", &"[]", "at least one glob of the files to bring back"));
        }
        for glob in &build.artifacts {
            check_artifact_glob(glob).map_err(|why| bad("build.artifacts", glob, why))?;
        }
        if let NetworkAccess::Allow(hosts) = &build.network {
            for (i, host) in hosts.iter().enumerate() {
                host.parse::<AllowedHost>().map_err(|e| bad(&format!("build.network.allow[{i}]"), host, &e.to_string()))?;
            }
        }
        if let Some(script) = build.provision.iter().find(|s| s.trim().is_empty() || s.contains('\0')) {
            return Err(bad("build.provision", script, "non-empty shell command lines without NUL bytes"));
        }
        Ok(())
    }
}

/// Largest recipe read (a recipe is a few hundred bytes).
const MAX_RECIPE_BYTES: u64 = 1 << 20;

/// Reads a recipe file: a regular file of at most [`MAX_RECIPE_BYTES`],
/// reached through a symbolic link only when `follow_links`. Opened
/// non-blocking, so that a FIFO cannot stall the open.
fn read_recipe(path: &Path, follow_links: bool) -> Result<String, BuildRecipeError> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let read_error = |source| BuildRecipeError::Read { path: path.to_path_buf(), source };
    let refused = |why: &'static str| BuildRecipeError::Refused { path: path.to_path_buf(), why };
    let flags = libc::O_NONBLOCK | libc::O_NOCTTY | if follow_links { 0 } else { libc::O_NOFOLLOW };
    let file = match std::fs::OpenOptions::new().read(true).custom_flags(flags).open(path) {
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) && !follow_links => {
            return Err(refused("it is a symbolic link, and a source tree's recipe must be a regular file in the tree"))
        }
        other => other.map_err(read_error)?,
    };
    let meta = file.metadata().map_err(read_error)?;
    if !meta.is_file() {
        return Err(refused("it is not a regular file"));
    }
    if meta.len() > MAX_RECIPE_BYTES {
        return Err(refused("it is over 1 MiB"));
    }
    let mut text = String::new();
    file.take(MAX_RECIPE_BYTES + 1).read_to_string(&mut text).map_err(read_error)?;
    if text.len() as u64 > MAX_RECIPE_BYTES {
        return Err(refused("it is over 1 MiB"));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "[build]\ncommand = \"make\"\nartifacts = [\"hello\"]\n";

    fn parse(text: &str) -> Result<BuildRecipe, BuildRecipeError> {
        BuildRecipe::parse(text, Path::new("src/reprovm.toml"))
    }

    fn field_error(text: &str) -> String {
        match parse(text) {
            Err(e @ BuildRecipeError::Field { .. }) => e.to_string(),
            other => panic!("expected a field error, got {other:?}"),
        }
    }

    #[test]
    fn minimal_recipe_gets_defaults() {
        let r = parse(MINIMAL).unwrap();
        assert_eq!(r.build.network, NetworkAccess::None);
        assert_eq!(r.build.timeout_secs, DEFAULT_TIMEOUT_SECS);
        assert_eq!(r.machine, MachineSection::default());
        assert!(r.build.provision.is_empty() && r.build.env.is_empty());
    }

    #[test]
    fn full_recipe_parses() {
        let r = parse(
            "[image]\npin = \"sha256:0000000000000000000000000000000000000000000000000000000000000000\"\nname = \"x\"\nrecipe = \"../img\"\n\
             [machine]\ncpu_model = \"Westmere-v1\"\ncpus = 4\nmemory_mib = 4096\nclock = 1700000000\nscratch_mib = 1024\naccel = \"tcg\"\n\
             [build]\ncommand = \"make\"\nenv = { CFLAGS = \"-O2\" }\nnetwork = \"nat\"\ntimeout_secs = 60\nsource_date_epoch = 1\nartifacts = [\"out/*.deb\"]\nprovision = [\"true\"]\n",
        )
        .unwrap();
        assert_eq!(r.machine.accel, Some(AccelChoice::Tcg));
        assert_eq!(r.build.network, NetworkAccess::Nat);
        assert_eq!(r.build.env["CFLAGS"], "-O2");
    }

    #[test]
    fn unknown_fields_are_errors_naming_file_and_field() {
        let e = parse("[build]\ncommand = \"make\"\nartifacts = [\"a\"]\nartefacts = [\"b\"]\n").unwrap_err().to_string();
        assert!(e.contains("src/reprovm.toml") && e.contains("artefacts"), "{e}");
        let e = parse(&format!("{MINIMAL}[machine]\ncpu = 2\n")).unwrap_err().to_string();
        assert!(e.contains("cpu"), "{e}");
        let e = parse("[build]\ncommand = \"make\"\nartifacts = [\"a\"]\nnetwork = \"bridge\"\n").unwrap_err().to_string();
        assert!(e.contains("bridge"), "{e}");
    }

    #[test]
    fn bad_values_name_field_and_value() {
        let e = field_error("[build]\ncommand = \"make\"\nartifacts = [\"../etc/passwd\"]\n");
        assert!(e.contains("build.artifacts") && e.contains("../etc/passwd") && e.contains("outside"), "{e}");
        let e = field_error("[build]\ncommand = \"make\"\nartifacts = [\"/etc/passwd\"]\n");
        assert!(e.contains("absolute"), "{e}");
        let e = field_error("[build]\ncommand = \"make\"\nartifacts = []\n");
        assert!(e.contains("build.artifacts"), "{e}");
        let e = field_error(&format!("{MINIMAL}[machine]\ncpu_model = \"host\"\n"));
        assert!(e.contains("machine.cpu_model") && e.contains("host"), "{e}");
        let e = field_error(&format!("{MINIMAL}[machine]\ncpus = 0\n"));
        assert!(e.contains("machine.cpus"), "{e}");
        let e = field_error(&format!("{MINIMAL}[image]\npin = \"sha256:12\"\n"));
        assert!(e.contains("image.pin"), "{e}");
        let e = field_error("[build]\ncommand = \"  \"\nartifacts = [\"a\"]\n");
        assert!(e.contains("build.command"), "{e}");
        let e = field_error("[build]\ncommand = \"make\"\nartifacts = [\"a\"]\nenv = { \"1X\" = \"y\" }\n");
        assert!(e.contains("build.env") && e.contains("1X"), "{e}");
        let e = field_error("[build]\ncommand = \"make\"\nartifacts = [\"a\"]\nenv = { SOURCE_DATE_EPOCH = \"1\" }\n");
        assert!(e.contains("source_date_epoch"), "{e}");
        let e = field_error("[build]\ncommand = \"make\"\nartifacts = [\"a\"]\ntimeout_secs = 0\n");
        assert!(e.contains("build.timeout_secs"), "{e}");
    }

    #[test]
    fn a_recipe_alone_cannot_take_the_host() {
        let greedy = parse(&format!(
            "{MINIMAL}network = \"nat\"\ntimeout_secs = 604800\n[machine]\ncpus = 64\nmemory_mib = 262144\nscratch_mib = 4194304\n"
        ))
        .unwrap();
        let p = Path::new("src/reprovm.toml");
        let e = greedy.check_host_limits(p, true, |_| false).unwrap_err().to_string();
        assert!(e.contains("src/reprovm.toml") && e.contains("machine.cpus") && e.contains("64") && e.contains("--cpus 64"), "{e}");
        let e = greedy.check_host_limits(p, true, |f| f == "machine.cpus").unwrap_err().to_string();
        assert!(e.contains("machine.memory_mib") && e.contains("--memory 262144"), "{e}");
        let e = greedy.check_host_limits(p, true, |f| f.starts_with("machine.cpus") || f == "machine.memory_mib").unwrap_err().to_string();
        assert!(e.contains("machine.scratch_mib") && e.contains("4194304"), "{e}");
        let e = greedy.check_host_limits(p, true, |f| f.starts_with("machine.")).unwrap_err().to_string();
        assert!(e.contains("build.timeout_secs"), "{e}");
        let e = greedy.check_host_limits(p, false, |_| true).unwrap_err().to_string();
        assert!(e.contains("build.network") && e.contains("--network nat"), "{e}");
        greedy.check_host_limits(p, true, |_| true).unwrap();
        parse(MINIMAL).unwrap().check_host_limits(p, false, |_| false).unwrap();
    }

    #[test]
    fn an_allow_list_means_the_egress_proxy_and_each_host_is_checked() {
        let r = parse(&format!("{MINIMAL}[build.network]\nallow = [\"deb.debian.org\", \"security.debian.org:80\"]\n")).unwrap();
        assert_eq!(r.build.network, NetworkAccess::Allow(vec!["deb.debian.org".into(), "security.debian.org:80".into()]));
        assert_eq!(r.build.network.machine_network(), Network::Egress);
        let again = BuildRecipe::parse(&toml::to_string(&r).unwrap(), Path::new("again")).unwrap();
        assert_eq!(again, r, "the effective recipe round-trips");
        let e = field_error(&format!("{MINIMAL}[build.network]\nallow = [\"ok.example\", \"*.debian.org\"]\n"));
        assert!(e.contains("build.network.allow[1]") && e.contains("*.debian.org"), "{e}");
        let e = field_error(&format!("{MINIMAL}[build.network]\nallow = [\"evil\\u001b[2J\"]\n"));
        assert!(e.contains("build.network.allow[0]") && !e.contains('\u{1b}'), "escaped: {e}");
        let e = parse(&format!("{MINIMAL}[build.network]\nallow = []\nproxy = \"x\"\n")).unwrap_err().to_string();
        assert!(e.contains("src/reprovm.toml") && e.contains("allow"), "{e}");
    }

    #[test]
    fn missing_command_is_a_parse_error() {
        let e = parse("[build]\nartifacts = [\"a\"]\n").unwrap_err().to_string();
        assert!(e.contains("command"), "{e}");
    }

    #[test]
    fn globs_inside_the_build_directory_pass() {
        for glob in ["hello", "dist/*.tar.gz", "**/*.deb", "./out/x", "a..b"] {
            assert!(check_artifact_glob(glob).is_ok(), "{glob}");
        }
    }
}
