//! `result.json`: what went into a build (image pin, source hash, recipe),
//! the machine as launched, what the guest reported, what came out, and how
//! long each stage took (docs/result.md). Also the reader `verify` and
//! `compare` use, which accepts a result.json or a SHA256SUMS file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::egress::{Download, Refusal, Tunnel};
use crate::guest::GuestFacts;
use crate::rebuild::artifacts::{parse_sha256sums, Artifact, BadSums};
use crate::rebuild::recipe::BuildRecipe;
use crate::rebuild::source::SourceRecord;
use crate::vm::{LaunchedMachine, Network};

/// Version of the result.json layout.
pub const RESULT_FORMAT: u32 = 1;

/// Everything `reprovm build` records about one build.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BuildResult {
    /// [`RESULT_FORMAT`].
    pub format: u32,
    /// The reprovm version that built it.
    pub reprovm_version: String,
    /// What went in.
    pub inputs: Inputs,
    /// The machine as launched.
    pub machine: MachineRecord,
    /// What the guest reported about itself.
    pub guest: GuestFacts,
    /// The egress proxy's account, for a build with an allow list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<EgressRecord>,
    /// The artifacts, sorted by path.
    pub outputs: Vec<Artifact>,
    /// Seconds per stage.
    pub timings: Timings,
}

/// The inputs of a build.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inputs {
    /// Image pin, `sha256:<hex>`.
    pub image: String,
    /// The image's name.
    pub image_name: String,
    /// The source archive.
    pub source: SourceRecord,
    /// SOURCE_DATE_EPOCH given to the build.
    pub source_date_epoch: i64,
    /// Where it came from: `recipe`, `git` (last commit) or `clock`.
    pub source_date_epoch_from: String,
    /// The recipe.
    pub recipe: RecipeRecord,
    /// Every plain-HTTP response the build received through the egress
    /// proxy (method, URL, status, size, SHA-256), sorted; what `--replay`
    /// answers from (docs/network.md).
    #[serde(default)]
    pub downloads: Vec<Download>,
}

/// What the egress proxy allowed and saw, for a build with an allow list.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressRecord {
    /// The recipe's allow list.
    pub allow: Vec<String>,
    /// Hosts the user allowed with `--allow` (which may be private addresses).
    pub allow_cli: Vec<String>,
    /// The result.json whose downloads were replayed, with no network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replayed_from: Option<PathBuf>,
    /// HTTPS tunnels (CONNECT): host, port and byte counts. Their content
    /// is not recorded and cannot be replayed, as the name says.
    pub unrecorded_tunnels: Vec<Tunnel>,
    /// Requests the proxy refused, and why.
    pub refused: Vec<Refusal>,
}

/// The recipe as used.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecipeRecord {
    /// The file, as given.
    pub file: PathBuf,
    /// SHA-256 of the file.
    pub sha256: String,
    /// The recipe with command-line overrides applied.
    pub effective: BuildRecipe,
}

/// The machine as launched, plus the build's disks and network.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineRecord {
    /// QEMU, accelerator, machine type, CPU, vCPUs, memory, clock.
    #[serde(flatten)]
    pub launched: LaunchedMachine,
    /// Network access during the build.
    pub network: Network,
    /// Scratch disk size in MiB.
    pub scratch_mib: u64,
}

/// Wall-clock seconds per stage.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Timings {
    /// Re-hashing the image against its pin (on its own thread, while the
    /// source is archived and the builder boots).
    pub image_verify: f64,
    /// Archiving the source and making the scratch disk.
    pub source: f64,
    /// QEMU start to an authenticated SSH session.
    pub boot: f64,
    /// Mounting the scratch disk and the recipe's provision commands.
    pub prepare: f64,
    /// The build command.
    pub build: f64,
    /// Collecting, shutting down, extracting and hashing the artifacts.
    pub artifacts: f64,
    /// The whole run.
    pub total: f64,
}

/// The published or recorded outcome of a build: artifact hashes, and the
/// full result when the file was a result.json.
#[derive(Clone, Debug)]
pub struct Record {
    /// The file it came from.
    pub file: PathBuf,
    /// path → sha256.
    pub hashes: BTreeMap<String, String>,
    /// The full result, for result.json files.
    pub result: Option<BuildResult>,
}

/// A result or SHA256SUMS file that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The file could not be read.
    #[error("cannot read {}", file.display())]
    Read {
        /// The file.
        file: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Looks like JSON but is not a result.json.
    #[error("{} is not a reprovm result.json: {message}", file.display())]
    Json {
        /// The file.
        file: PathBuf,
        /// The parser's message (with line and column).
        message: String,
    },
    /// A result.json of a layout this reprovm does not know.
    #[error("{}: result format {found} is not supported (this reprovm reads format {RESULT_FORMAT})", file.display())]
    Format {
        /// The file.
        file: PathBuf,
        /// The format it declares.
        found: u32,
    },
    /// A bad SHA256SUMS line.
    #[error(transparent)]
    Sums(#[from] BadSums),
    /// Neither lists any artifact.
    #[error("{} lists no artifacts", file.display())]
    Empty {
        /// The file.
        file: PathBuf,
    },
}

impl Record {
    /// Reads `file`: a result.json (its first non-blank character is `{`)
    /// or a SHA256SUMS.
    pub fn load(file: &Path) -> Result<Record, RecordError> {
        let text = std::fs::read_to_string(file).map_err(|source| RecordError::Read { file: file.to_path_buf(), source })?;
        Self::parse(&text, file)
    }

    /// Parses the text of `file`.
    pub fn parse(text: &str, file: &Path) -> Result<Record, RecordError> {
        let record = if text.trim_start().starts_with('{') {
            let format = serde_json::from_str::<serde_json::Value>(text)
                .map_err(|e| RecordError::Json { file: file.to_path_buf(), message: e.to_string() })?
                .get("format")
                .and_then(serde_json::Value::as_u64)
                .unwrap_or(0);
            if format != u64::from(RESULT_FORMAT) {
                return Err(RecordError::Format { file: file.to_path_buf(), found: u32::try_from(format).unwrap_or(u32::MAX) });
            }
            let result: BuildResult =
                serde_json::from_str(text).map_err(|e| RecordError::Json { file: file.to_path_buf(), message: e.to_string() })?;
            let hashes = result.outputs.iter().map(|a| (a.path.clone(), a.sha256.clone())).collect();
            Record { file: file.to_path_buf(), hashes, result: Some(result) }
        } else {
            let hashes = parse_sha256sums(text, file)?.into_iter().collect();
            Record { file: file.to_path_buf(), hashes, result: None }
        };
        if record.hashes.is_empty() {
            return Err(RecordError::Empty { file: file.to_path_buf() });
        }
        Ok(record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_sha256sums_and_rejects_other_json() {
        let h = "b".repeat(64);
        let r = Record::parse(&format!("{h}  hello\n"), Path::new("SHA256SUMS")).unwrap();
        assert_eq!(r.hashes["hello"], h);
        assert!(r.result.is_none());
        let e = Record::parse("{\"format\": 1, \"outputs\": 3}", Path::new("r.json")).unwrap_err().to_string();
        assert!(e.contains("r.json") && e.contains("not a reprovm result.json"), "{e}");
        let e = Record::parse("{\"format\": 9}", Path::new("r.json")).unwrap_err().to_string();
        assert!(e.contains("format 9"), "{e}");
        let e = Record::parse("{", Path::new("r.json")).unwrap_err().to_string();
        assert!(e.contains("r.json"), "{e}");
        let e = Record::parse("\n", Path::new("S")).unwrap_err().to_string();
        assert!(e.contains("no artifacts"), "{e}");
    }
}
