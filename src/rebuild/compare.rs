//! Comparing builds: a rebuild against published hashes (`verify`), and the
//! records of several builders against each other (`compare`), per
//! artifact; when artifacts differ, which recorded inputs differ too.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use serde::Serialize;

use crate::escape::escape;
use crate::rebuild::result::{BuildResult, Record};

/// How one artifact compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Same hash everywhere.
    Identical,
    /// Present everywhere, hashes differ.
    Differs,
    /// Expected (or present elsewhere) but not produced.
    Missing,
    /// Produced but not expected.
    Unexpected,
}

impl Status {
    /// The word tables print for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Identical => "identical",
            Status::Differs => "DIFFERS",
            Status::Missing => "MISSING",
            Status::Unexpected => "UNEXPECTED",
        }
    }
}

/// One artifact across the records: its hash in each (None: absent).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Row {
    /// Artifact path.
    pub path: String,
    /// The verdict.
    pub status: Status,
    /// Hash per record, in the order given.
    pub hashes: Vec<Option<String>>,
}

/// Compares records artifact by artifact. With two records where the first
/// is the expectation, an artifact only in the second is `Unexpected`; in
/// every other case an artifact absent anywhere is `Missing`.
pub fn compare_rows(records: &[&Record], first_is_expected: bool) -> Vec<Row> {
    let paths: BTreeSet<&String> = records.iter().flat_map(|r| r.hashes.keys()).collect();
    paths
        .into_iter()
        .map(|path| {
            let hashes: Vec<Option<String>> = records.iter().map(|r| r.hashes.get(path).cloned()).collect();
            let status = if first_is_expected && hashes[0].is_none() {
                Status::Unexpected
            } else if hashes.iter().any(Option::is_none) {
                Status::Missing
            } else if hashes.iter().all(|h| h == &hashes[0]) {
                Status::Identical
            } else {
                Status::Differs
            };
            Row { path: path.clone(), status, hashes }
        })
        .collect()
}

/// Whether every row is identical.
pub fn all_identical(rows: &[Row]) -> bool {
    rows.iter().all(|r| r.status == Status::Identical)
}

/// The recorded inputs and machine facts that can explain a difference,
/// as (name, value) pairs.
fn explaining_fields(r: &BuildResult) -> Vec<(&'static str, String)> {
    let m = &r.machine.launched;
    let g = &r.guest;
    vec![
        ("image pin", r.inputs.image.clone()),
        ("source sha256", r.inputs.source.sha256.clone()),
        ("SOURCE_DATE_EPOCH", format!("{} (from {})", r.inputs.source_date_epoch, r.inputs.source_date_epoch_from)),
        ("recipe sha256", r.inputs.recipe.sha256.clone()),
        ("build command", r.inputs.recipe.effective.build.command.clone()),
        ("build env", format!("{:?}", r.inputs.recipe.effective.build.env)),
        ("network", format!("{:?}", r.machine.network).to_lowercase()),
        ("network allow list", format!("{:?}", r.inputs.recipe.effective.build.network)),
        ("reprovm version", r.reprovm_version.clone()),
        ("QEMU version", m.qemu_version.clone()),
        ("accelerator", m.accelerator.as_str().to_string()),
        ("machine type", m.machine_type.clone()),
        ("CPU model", m.cpu.clone()),
        ("vCPUs", m.spec.cpus.to_string()),
        ("memory MiB", m.spec.memory_mib.to_string()),
        ("clock", m.spec.clock.to_string()),
        ("guest kernel", g.uname.clone()),
        ("guest CPU", g.cpu_model.clone()),
        ("guest CPU flags", g.cpu_flags.clone()),
        ("guest nproc", g.nproc.to_string()),
        ("guest memory KiB", g.memory_kib.to_string()),
        ("guest hostname", g.hostname.clone()),
    ]
}

/// Inputs whose recorded values differ between the result.json records:
/// (name, value per record; `-` where the record is a bare SHA256SUMS),
/// then each recorded download whose bytes differ (`download <URL>`, the
/// SHA-256 per record; `none` where a record did not fetch it).
pub fn differing_inputs(records: &[&Record]) -> Vec<(String, Vec<String>)> {
    let fields: Vec<Option<Vec<(&'static str, String)>>> = records.iter().map(|r| r.result.as_ref().map(explaining_fields)).collect();
    let Some(template) = fields.iter().flatten().next() else { return Vec::new() };
    let differ = |values: &[String]| values.iter().filter(|v| *v != "-").collect::<BTreeSet<_>>().len() > 1;
    let mut out: Vec<(String, Vec<String>)> = (0..template.len())
        .filter_map(|i| {
            let values: Vec<String> = fields.iter().map(|f| f.as_ref().map_or("-".to_string(), |f| f[i].1.clone())).collect();
            differ(&values).then(|| (template[i].0.to_string(), values))
        })
        .collect();
    let urls: BTreeSet<(&str, &str)> = records
        .iter()
        .flat_map(|r| r.result.iter().flat_map(|res| &res.inputs.downloads))
        .map(|d| (d.method.as_str(), d.url.as_str()))
        .collect();
    for (method, url) in urls {
        let values: Vec<String> = records
            .iter()
            .map(|r| match &r.result {
                None => "-".to_string(),
                Some(res) => {
                    let hashes: Vec<&str> =
                        res.inputs.downloads.iter().filter(|d| d.method == method && d.url == url).map(|d| d.sha256.as_str()).collect();
                    if hashes.is_empty() {
                        "none".to_string()
                    } else {
                        hashes.join(" ")
                    }
                }
            })
            .collect();
        if differ(&values) {
            out.push((format!("download {method} {url}"), values));
        }
    }
    out
}

fn short(hash: &Option<String>) -> String {
    hash.as_ref().map_or_else(|| "-".to_string(), |h| h.chars().take(16).collect())
}

/// The per-artifact table, with one hash column per record.
pub fn render_rows(rows: &[Row], headers: &[String]) -> String {
    // Names and values come from published files and guests: escaped.
    let width = rows.iter().map(|r| escape(&r.path).chars().count()).chain([8]).max().unwrap_or(8);
    let mut out = format!("{:<width$}  {:<10}", "artifact", "status");
    for h in headers {
        let _ = write!(out, "  {h:<16}");
    }
    out.push('\n');
    for row in rows {
        let _ = write!(out, "{:<width$}  {:<10}", escape(&row.path), row.status.as_str());
        for h in &row.hashes {
            let _ = write!(out, "  {:<16}", short(h));
        }
        out.push('\n');
    }
    out.lines().map(str::trim_end).collect::<Vec<_>>().join("\n")
}

/// The "what differs in the inputs" section (empty when nothing differs).
pub fn render_inputs(differences: &[(String, Vec<String>)], headers: &[String]) -> String {
    if differences.is_empty() {
        return String::new();
    }
    let mut out = String::from("recorded inputs that differ:\n");
    for (name, values) in differences {
        let _ = writeln!(out, "  {}:", escape(name));
        for (h, v) in headers.iter().zip(values) {
            let _ = writeln!(out, "    {h}: {}", escape(v));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn record(pairs: &[(&str, &str)]) -> Record {
        Record { file: PathBuf::from("x"), hashes: pairs.iter().map(|(p, h)| (p.to_string(), h.to_string())).collect(), result: None }
    }

    #[test]
    fn verify_statuses() {
        let expected = record(&[("a", "1"), ("b", "2"), ("c", "3")]);
        let actual = record(&[("a", "1"), ("b", "9"), ("d", "4")]);
        let rows = compare_rows(&[&expected, &actual], true);
        let statuses: Vec<(&str, Status)> = rows.iter().map(|r| (r.path.as_str(), r.status)).collect();
        assert_eq!(statuses, [("a", Status::Identical), ("b", Status::Differs), ("c", Status::Missing), ("d", Status::Unexpected)]);
        assert!(!all_identical(&rows));
        let table = render_rows(&rows, &["expected".into(), "actual".into()]);
        assert!(table.contains("b         DIFFERS") || table.contains("DIFFERS"), "{table}");
    }

    #[test]
    fn compare_of_identical_records() {
        let a = record(&[("a", "1")]);
        let b = record(&[("a", "1")]);
        let c = record(&[("a", "1")]);
        assert!(all_identical(&compare_rows(&[&a, &b, &c], false)));
        assert!(differing_inputs(&[&a, &b]).is_empty());
    }
}
