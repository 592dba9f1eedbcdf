//! `provenance.intoto.json`: an in-toto Statement v1 whose subjects are
//! exactly the artifacts of SHA256SUMS, with a SLSA Provenance v1 predicate
//! of reprovm's build type [`BUILD_TYPE`] (docs/attestations.md): the source
//! and the recipe as used (external parameters), the machine, the guest's
//! facts and SOURCE_DATE_EPOCH (internal parameters), the builder image and
//! the source archive (resolved dependencies), reprovm's version, a random
//! invocation id and the run's start and finish.
//!
//! The types are reprovm's own (no maintained crate covers Statement v1
//! with SLSA v1); tests/attest.rs checks what they write against the
//! in-toto attestation bindings. Statements read back are hostile: the
//! statement layer follows in-toto's rule of ignoring unknown fields, the
//! parts of reprovm's own build type are read strictly.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::attest::shown;
use crate::egress::Download;
use crate::guest::GuestFacts;
use crate::rebuild::result::{BuildResult, Inputs, MachineRecord, RecipeRecord, Timings, RESULT_FORMAT};
use crate::rebuild::source::SourceRecord;

/// The file every build writes.
pub const PROVENANCE_FILE: &str = "provenance.intoto.json";
/// `_type` of an in-toto Statement v1.
pub const STATEMENT_TYPE: &str = "https://in-toto.io/Statement/v1";
/// `predicateType` of SLSA Provenance v1.
pub const PROVENANCE_TYPE: &str = "https://slsa.dev/provenance/v1";
/// reprovm's build type, specified in docs/attestations.md. The `.invalid`
/// domain (RFC 2606) never resolves: nobody else can own this name.
pub const BUILD_TYPE: &str = "https://reprovm.invalid/attestations/build/v1";
/// `runDetails.builder.id`: reprovm, run by the key that signs.
pub const BUILDER_ID: &str = "https://reprovm.invalid/attestations/builder/v1";
/// The name of the builder image among the resolved dependencies.
pub const IMAGE_DEPENDENCY: &str = "builder-image";
/// The name of the source archive among the resolved dependencies.
pub const SOURCE_DEPENDENCY: &str = "source";
/// The name of each download the build received through the egress proxy
/// among the resolved dependencies (its `uri` the URL, annotations the
/// method, status and size).
pub const DOWNLOAD_DEPENDENCY: &str = "download";

/// An in-toto Statement v1.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Statement {
    /// [`STATEMENT_TYPE`].
    #[serde(rename = "_type")]
    pub type_: String,
    /// What it is about.
    pub subject: Vec<ResourceDescriptor>,
    /// The predicate's type.
    #[serde(rename = "predicateType")]
    pub predicate_type: String,
    /// The predicate.
    pub predicate: Value,
}

/// An in-toto ResourceDescriptor (the fields reprovm uses).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResourceDescriptor {
    /// A name (for subjects: the artifact's path).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// A URI.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub uri: String,
    /// Algorithm → lowercase hex digest.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub digest: BTreeMap<String, String>,
    /// Where it was downloaded from.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub download_location: String,
    /// Further facts.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, Value>,
}

/// The SLSA Provenance v1 predicate of [`BUILD_TYPE`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Provenance {
    /// What was built, from what.
    pub build_definition: BuildDefinition,
    /// Who built it, when.
    pub run_details: RunDetails,
}

/// `buildDefinition`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BuildDefinition {
    /// [`BUILD_TYPE`].
    pub build_type: String,
    /// The inputs the user chose.
    pub external_parameters: ExternalParameters,
    /// What reprovm fixed.
    pub internal_parameters: InternalParameters,
    /// The builder image, the source archive, and (later) every download.
    pub resolved_dependencies: Vec<ResourceDescriptor>,
}

/// `externalParameters`: the source and the recipe as used.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExternalParameters {
    /// The source archive (as in result.json).
    pub source: SourceRecord,
    /// The recipe with its hash and the command-line overrides applied.
    pub recipe: RecipeRecord,
}

/// `internalParameters`: the machine and what the build was given.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InternalParameters {
    /// QEMU, accelerator, machine type, CPU, vCPUs, memory, clock, network, disk.
    pub machine: MachineRecord,
    /// What the guest reported about itself.
    pub guest: GuestFacts,
    /// SOURCE_DATE_EPOCH given to the build.
    pub source_date_epoch: i64,
    /// `recipe`, `git` or `clock`.
    pub source_date_epoch_from: String,
}

/// `runDetails`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RunDetails {
    /// The builder.
    pub builder: Builder,
    /// The run.
    pub metadata: BuildMetadata,
}

/// `runDetails.builder`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Builder {
    /// [`BUILDER_ID`].
    pub id: String,
    /// `{"reprovm": "<version>"}`.
    pub version: BTreeMap<String, String>,
}

/// `runDetails.metadata`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BuildMetadata {
    /// A random id of this run.
    pub invocation_id: String,
    /// RFC 3339, UTC.
    pub started_on: String,
    /// RFC 3339, UTC.
    pub finished_on: String,
}

/// A statement that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StatementError {
    /// Not JSON of a statement's shape.
    #[error("not an in-toto statement: {0}")]
    Json(String),
    /// Another `_type`.
    #[error("_type \"{found}\" is not {STATEMENT_TYPE}")]
    Type {
        /// What it says, escaped.
        found: String,
    },
    /// Another predicate type.
    #[error("predicateType \"{found}\" is not {PROVENANCE_TYPE}")]
    PredicateType {
        /// What it says, escaped.
        found: String,
    },
    /// No subject, or a subject without a name or a SHA-256.
    #[error("subject {index}: {why}")]
    Subject {
        /// 0-based index.
        index: usize,
        /// What is wrong.
        why: String,
    },
    /// A predicate that claims reprovm's build type but does not follow it.
    #[error("the predicate claims build type {BUILD_TYPE} but does not follow it: {0}")]
    Provenance(String),
}

/// A random invocation id: 32 hex digits.
pub fn invocation_id() -> String {
    let mut bytes = [0u8; 16];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut bytes);
    hex::encode(bytes)
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.replace_nanosecond(0).unwrap_or(t).format(&Rfc3339).expect("a UTC time formats as RFC 3339")
}

fn sha256_digest(hex: &str) -> BTreeMap<String, String> {
    BTreeMap::from([("sha256".to_string(), hex.to_string())])
}

/// A recorded download as a resolved dependency.
fn download_dependency(d: &Download) -> ResourceDescriptor {
    ResourceDescriptor {
        name: DOWNLOAD_DEPENDENCY.into(),
        uri: d.url.clone(),
        digest: sha256_digest(&d.sha256),
        annotations: BTreeMap::from([
            ("method".to_string(), Value::from(d.method.clone())),
            ("status".to_string(), Value::from(d.status)),
            ("size".to_string(), Value::from(d.size)),
        ]),
        ..Default::default()
    }
}

/// The download a resolved dependency records, if it is one.
fn recorded_download(dep: &ResourceDescriptor) -> Option<Download> {
    let annotation = |k: &str| dep.annotations.get(k);
    Some(Download {
        method: annotation("method")?.as_str()?.to_string(),
        url: dep.uri.clone(),
        status: u16::try_from(annotation("status")?.as_u64()?).ok()?,
        size: annotation("size")?.as_u64()?,
        sha256: dep.digest.get("sha256")?.clone(),
    })
    .filter(|_| dep.name == DOWNLOAD_DEPENDENCY)
}

/// The provenance statement of `result`.
pub fn provenance(result: &BuildResult, started: OffsetDateTime, finished: OffsetDateTime, invocation_id: &str) -> Statement {
    let i = &result.inputs;
    let subject = result
        .outputs
        .iter()
        .map(|a| ResourceDescriptor { name: a.path.clone(), digest: sha256_digest(&a.sha256), ..Default::default() })
        .collect();
    let image = ResourceDescriptor {
        name: IMAGE_DEPENDENCY.into(),
        digest: sha256_digest(i.image.strip_prefix("sha256:").unwrap_or(&i.image)),
        annotations: BTreeMap::from([("image_name".to_string(), Value::from(i.image_name.clone()))]),
        ..Default::default()
    };
    let source = ResourceDescriptor { name: SOURCE_DEPENDENCY.into(), digest: sha256_digest(&i.source.sha256), ..Default::default() };
    let predicate = Provenance {
        build_definition: BuildDefinition {
            build_type: BUILD_TYPE.into(),
            external_parameters: ExternalParameters { source: i.source.clone(), recipe: i.recipe.clone() },
            internal_parameters: InternalParameters {
                machine: result.machine.clone(),
                guest: result.guest.clone(),
                source_date_epoch: i.source_date_epoch,
                source_date_epoch_from: i.source_date_epoch_from.clone(),
            },
            resolved_dependencies: [image, source].into_iter().chain(i.downloads.iter().map(download_dependency)).collect(),
        },
        run_details: RunDetails {
            builder: Builder { id: BUILDER_ID.into(), version: BTreeMap::from([("reprovm".to_string(), result.reprovm_version.clone())]) },
            metadata: BuildMetadata { invocation_id: invocation_id.into(), started_on: rfc3339(started), finished_on: rfc3339(finished) },
        },
    };
    Statement {
        type_: STATEMENT_TYPE.into(),
        subject,
        predicate_type: PROVENANCE_TYPE.into(),
        predicate: serde_json::to_value(predicate).expect("a predicate serializes"),
    }
}

impl Statement {
    /// The statement as reprovm writes it (pretty JSON, final newline).
    pub fn to_file_bytes(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec_pretty(self).expect("a statement serializes");
        out.push(b'\n');
        out
    }
}

/// What a provenance statement attests, checked.
#[derive(Clone, Debug, PartialEq)]
pub struct Attested {
    /// Artifact path → lowercase SHA-256.
    pub subjects: BTreeMap<String, String>,
    /// The predicate's build type.
    pub build_type: String,
    /// The predicate, when it is of reprovm's build type.
    pub provenance: Option<Provenance>,
}

/// Parses and checks a SLSA provenance statement (an envelope's payload or
/// a provenance.intoto.json): Statement v1, at least one subject, each with
/// a name and a 64-hex-digit SHA-256, names unique; a predicate of
/// reprovm's build type must follow it exactly.
pub fn parse(bytes: &[u8]) -> Result<Attested, StatementError> {
    let statement: Statement = serde_json::from_slice(bytes).map_err(|e| StatementError::Json(e.to_string()))?;
    if statement.type_ != STATEMENT_TYPE {
        return Err(StatementError::Type { found: shown(&statement.type_) });
    }
    if statement.predicate_type != PROVENANCE_TYPE {
        return Err(StatementError::PredicateType { found: shown(&statement.predicate_type) });
    }
    if statement.subject.is_empty() {
        return Err(StatementError::Subject { index: 0, why: "the statement has no subject".into() });
    }
    let mut subjects = BTreeMap::new();
    for (index, s) in statement.subject.iter().enumerate() {
        let bad = |why: String| StatementError::Subject { index, why };
        if s.name.is_empty() {
            return Err(bad("no name".into()));
        }
        let hash = s.digest.get("sha256").ok_or_else(|| bad(format!("\"{}\" has no sha256 digest", shown(&s.name))))?;
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad(format!("the sha256 of \"{}\" is not 64 hex digits", shown(&s.name))));
        }
        if subjects.insert(s.name.clone(), hash.to_ascii_lowercase()).is_some() {
            return Err(bad(format!("\"{}\" is listed twice", shown(&s.name))));
        }
    }
    let build_type = statement.predicate.pointer("/buildDefinition/buildType").and_then(Value::as_str).unwrap_or("").to_string();
    let provenance = if build_type == BUILD_TYPE {
        Some(serde_json::from_value::<Provenance>(statement.predicate).map_err(|e| StatementError::Provenance(e.to_string()))?)
    } else {
        None
    };
    Ok(Attested { subjects, build_type, provenance })
}

impl Provenance {
    /// The builder image pin, `sha256:<hex>` (`-` when not recorded).
    pub fn image(&self) -> String {
        self.dependency(IMAGE_DEPENDENCY).and_then(|d| d.digest.get("sha256")).map_or_else(|| "-".into(), |h| format!("sha256:{h}"))
    }

    fn dependency(&self, name: &str) -> Option<&ResourceDescriptor> {
        self.build_definition.resolved_dependencies.iter().find(|d| d.name == name)
    }

    /// The build's recorded inputs as a [`BuildResult`], for `compare`'s
    /// list of differing inputs. Provenance records neither artifact sizes
    /// nor stage timings: `outputs` is empty (the hashes are the
    /// statement's subjects) and `timings` zero.
    pub fn result(&self) -> BuildResult {
        let d = &self.build_definition;
        let image_name = self
            .dependency(IMAGE_DEPENDENCY)
            .and_then(|dep| dep.annotations.get("image_name"))
            .and_then(Value::as_str)
            .unwrap_or("-")
            .to_string();
        BuildResult {
            format: RESULT_FORMAT,
            reprovm_version: self.run_details.builder.version.get("reprovm").cloned().unwrap_or_else(|| "-".into()),
            inputs: Inputs {
                image: self.image(),
                image_name,
                source: d.external_parameters.source.clone(),
                source_date_epoch: d.internal_parameters.source_date_epoch,
                source_date_epoch_from: d.internal_parameters.source_date_epoch_from.clone(),
                recipe: d.external_parameters.recipe.clone(),
                downloads: d.resolved_dependencies.iter().filter_map(recorded_download).collect(),
            },
            machine: d.internal_parameters.machine.clone(),
            guest: d.internal_parameters.guest.clone(),
            egress: None,
            outputs: Vec::new(),
            timings: Timings::default(),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A result.json of examples/hello as a real build wrote it.
    pub(crate) fn sample_result() -> BuildResult {
        serde_json::from_str(include_str!("../../tests/interop/hello-result.json")).unwrap()
    }

    #[test]
    fn recorded_downloads_are_resolved_dependencies_and_read_back() {
        let mut result = sample_result();
        result.inputs.downloads = vec![Download {
            method: "GET".into(),
            url: "http://deb.debian.org/debian/pool/main/h/hello/hello_2.10-3_amd64.deb".into(),
            status: 200,
            size: 53080,
            sha256: "2e6e2f1a0007dc43bc91c273fd36e91e40a4f1c2765a03eca68b70a42103878a".into(),
        }];
        let t = OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap();
        let bytes = provenance(&result, t, t, "00ff").to_file_bytes();
        let json: Value = serde_json::from_slice(&bytes).unwrap();
        let deps = json["predicate"]["buildDefinition"]["resolvedDependencies"].as_array().unwrap();
        assert_eq!(deps.len(), 3);
        assert_eq!(deps[2]["uri"], result.inputs.downloads[0].url.as_str());
        assert_eq!(deps[2]["digest"]["sha256"], result.inputs.downloads[0].sha256.as_str());
        let read = parse(&bytes).unwrap().provenance.unwrap().result();
        assert_eq!(read.inputs.downloads, result.inputs.downloads);
    }

    #[test]
    fn provenance_subjects_are_the_artifacts_and_it_reads_back() {
        let result = sample_result();
        let t = OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap();
        let statement = provenance(&result, t, t + time::Duration::seconds(12), "00ff");
        let bytes = statement.to_file_bytes();
        let attested = parse(&bytes).unwrap();
        let sums: BTreeMap<String, String> = result.outputs.iter().map(|a| (a.path.clone(), a.sha256.clone())).collect();
        assert_eq!(attested.subjects, sums);
        let p = attested.provenance.unwrap();
        assert_eq!(p.image(), result.inputs.image);
        assert_eq!(p.run_details.metadata.started_on, "2023-11-14T22:13:20Z");
        assert_eq!(p.run_details.metadata.finished_on, "2023-11-14T22:13:32Z");
        let back = p.result();
        assert_eq!((back.inputs, back.machine, back.guest), (result.inputs, result.machine, result.guest));
    }

    #[test]
    fn hostile_statements_are_refused_with_the_reason() {
        let good: Value = serde_json::from_slice(
            &provenance(&sample_result(), OffsetDateTime::UNIX_EPOCH, OffsetDateTime::UNIX_EPOCH, "0").to_file_bytes(),
        )
        .unwrap();
        let with = |pointer: &str, value: Value| {
            let mut v = good.clone();
            let (parent, key) = pointer.rsplit_once('/').unwrap();
            match v.pointer_mut(parent).unwrap() {
                Value::Object(map) => drop(map.insert(key.to_string(), value)),
                Value::Array(list) => list[key.parse::<usize>().unwrap()] = value,
                _ => unreachable!(),
            }
            serde_json::to_vec(&v).unwrap()
        };
        for (bytes, needle) in [
            (with("/_type", "https://in-toto.io/Statement/v0.1\u{1b}[2J".into()), "v0.1\\x1b[2J"),
            (with("/predicateType", "https://example.org/test-result".into()), "predicateType"),
            (with("/subject", Value::Array(vec![])), "no subject"),
            (with("/subject/0/digest", serde_json::json!({"sha1": "ab"})), "no sha256"),
            (with("/subject/0/digest/sha256", "abc".into()), "64 hex"),
            (with("/subject/1/name", good["subject"][0]["name"].clone()), "twice"),
            (with("/predicate/buildDefinition/internalParameters/extra", Value::Null), "does not follow"),
            (b"{\"_type\":".to_vec(), "not an in-toto statement"),
        ] {
            let e = parse(&bytes).map(|_| ()).unwrap_err().to_string();
            assert!(e.contains(needle), "{needle}: {e}");
        }
    }
}
