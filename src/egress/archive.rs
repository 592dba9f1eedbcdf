//! The downloads file (`reprovm downloads export` / `import`): a plain,
//! deterministic tar holding `downloads.json` (the list of [`Download`]s)
//! first, then one `sha256/<hex>` member per distinct body, sorted, every
//! member mode 0444, mtime 0, owner 0. Imports are hostile input: member
//! names, types and sizes are checked against the manifest, and each body's
//! SHA-256 against its name before it enters the cache.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, Permissions};
use std::io::{BufReader, BufWriter, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::egress::cache::{is_sha256, DownloadCache};
use crate::egress::report::Download;
use crate::egress::EgressError;
use crate::escape::escape;
use crate::path_error::path_error;

/// The manifest's member name.
const MANIFEST: &str = "downloads.json";
/// The directory of the bodies inside the file.
const BODY_PREFIX: &str = "sha256/";
/// The largest manifest an import reads: 16 MiB.
pub const MAX_MANIFEST_BYTES: u64 = 16 << 20;

/// Each distinct body of `downloads` with its size, checking that every hash
/// is well-formed and that one hash never comes with two sizes.
fn bodies(downloads: &[Download]) -> Result<BTreeMap<&str, &Download>, EgressError> {
    let mut bodies: BTreeMap<&str, &Download> = BTreeMap::new();
    for d in downloads {
        let bad = |reason: String| EgressError::BadDownload { url: escape(&d.url).into_owned(), reason };
        if !is_sha256(&d.sha256) {
            return Err(bad(format!("{} is not 64 lowercase hex digits", escape(&d.sha256))));
        }
        if let Some(prev) = bodies.insert(&d.sha256, d) {
            if prev.size != d.size {
                return Err(bad(format!("sha256 {} is recorded with sizes {} and {}", d.sha256, prev.size, d.size)));
            }
        }
    }
    Ok(bodies)
}

/// A member header: regular file, 0444, mtime 0, owner 0.
fn header(size: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_size(size);
    h.set_mode(0o444);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    h
}

/// Writes `out`: the downloads' manifest and their bytes from the cache, each
/// re-hashed on the way (a tampered entry is a `HashMismatch`). The file is
/// written beside `out` and renamed into place.
pub fn export(cache: &DownloadCache, downloads: &[Download], out: &Path) -> Result<(), EgressError> {
    let mut manifest = downloads.to_vec();
    manifest.sort();
    manifest.dedup();
    let bodies = bodies(&manifest)?;
    let json = serde_json::to_vec_pretty(&manifest).map_err(|source| EgressError::Manifest { file: out.to_path_buf(), source })?;
    let dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let tmp =
        tempfile::Builder::new().prefix(".reprovm-export-").tempfile_in(dir).map_err(path_error("create a temporary file in", dir))?;
    let write_err = |e: std::io::Error| path_error("write", tmp.path())(e);
    let mut tar = tar::Builder::new(BufWriter::new(tmp.as_file()));
    let mut add = |name: &str, size: u64, data: &mut dyn Read| tar.append_data(&mut header(size), name, data);
    add(MANIFEST, json.len() as u64, &mut &json[..]).map_err(&write_err)?;
    for (sha256, d) in &bodies {
        let mut file = cache.open_verified(d)?;
        let name = format!("{BODY_PREFIX}{sha256}");
        let size = file.metadata().map_err(&write_err)?.len();
        if size != d.size {
            return Err(EgressError::BadDownload {
                url: escape(&d.url).into_owned(),
                reason: format!("recorded size {}, cached size {size}", d.size),
            });
        }
        add(&name, size, &mut file).map_err(&write_err)?;
    }
    tar.into_inner().and_then(|mut w| w.flush()).map_err(&write_err)?;
    tmp.as_file().set_permissions(Permissions::from_mode(0o644)).map_err(&write_err)?;
    tmp.persist(out).map_err(|e| path_error("create", out)(e.error))?;
    Ok(())
}

/// Reads a downloads file into the cache and returns its manifest. Refused
/// (`BadExport`, nothing of the offending member enters the cache): a first
/// member other than `downloads.json` or larger than [`MAX_MANIFEST_BYTES`],
/// any member that is not a regular file named `sha256/<64 lowercase hex>`
/// listed in the manifest, a duplicate, a size other than the manifest's, a
/// body the manifest lists but the file lacks. A body that does not hash to
/// its name is a `HashMismatch`.
pub fn import(cache: &DownloadCache, file: &Path) -> Result<Vec<Download>, EgressError> {
    let bad = |reason: String| EgressError::BadExport { file: file.to_path_buf(), reason };
    let read_err = |e: std::io::Error| path_error("read", file)(e);
    let mut archive = tar::Archive::new(BufReader::new(File::open(file).map_err(path_error("open", file))?));
    let mut entries = archive.entries().map_err(&read_err)?;

    let mut first = entries.next().ok_or_else(|| bad("it holds no members".into()))?.map_err(&read_err)?;
    if first.path_bytes().as_ref() != MANIFEST.as_bytes() || first.header().entry_type() != tar::EntryType::Regular {
        return Err(bad(format!(
            "the first member must be the regular file {MANIFEST}, not {}",
            crate::escape::escape_bytes(&first.path_bytes())
        )));
    }
    if first.size() > MAX_MANIFEST_BYTES {
        return Err(bad(format!("{MANIFEST} is {} bytes, more than the {MAX_MANIFEST_BYTES} allowed", first.size())));
    }
    let mut json = Vec::new();
    first.by_ref().take(MAX_MANIFEST_BYTES).read_to_end(&mut json).map_err(&read_err)?;
    drop(first);
    let manifest: Vec<Download> =
        serde_json::from_slice(&json).map_err(|source| EgressError::Manifest { file: file.to_path_buf(), source })?;
    let bodies = bodies(&manifest)?;

    let mut seen = BTreeSet::new();
    let mut buf = vec![0u8; 1 << 16];
    for entry in entries {
        let mut entry = entry.map_err(&read_err)?;
        let raw = entry.path_bytes().into_owned();
        let name = crate::escape::escape_bytes(&raw);
        let sha256 = std::str::from_utf8(&raw).ok().and_then(|n| n.strip_prefix(BODY_PREFIX)).filter(|h| is_sha256(h));
        let (sha256, d) = match sha256.and_then(|h| bodies.get_key_value(h)) {
            Some((h, d)) if entry.header().entry_type() == tar::EntryType::Regular => (*h, *d),
            _ => return Err(bad(format!("unexpected member {name}: only regular files {BODY_PREFIX}<sha256> listed in {MANIFEST}"))),
        };
        if !seen.insert(sha256) {
            return Err(bad(format!("member {name} appears twice")));
        }
        if entry.size() != d.size {
            return Err(bad(format!("member {name} is {} bytes, {MANIFEST} says {}", entry.size(), d.size)));
        }
        let mut writer = cache.writer()?;
        loop {
            let n = entry.read(&mut buf).map_err(&read_err)?;
            if n == 0 {
                break;
            }
            writer.write(&buf[..n])?;
        }
        if writer.size() != d.size {
            return Err(bad(format!("member {name} is truncated")));
        }
        let actual = writer.sha256();
        if actual != sha256 {
            return Err(EgressError::HashMismatch { url: escape(&d.url).into_owned(), expected: sha256.to_string(), actual });
        }
        writer.commit()?;
    }
    if let Some(missing) = bodies.keys().find(|h| !seen.contains(*h)) {
        return Err(bad(format!("{BODY_PREFIX}{missing}, listed in {MANIFEST}, is missing")));
    }
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cache holding `bodies`, and the downloads that name them.
    fn cache_with(dir: &Path, bodies: &[&[u8]]) -> (DownloadCache, Vec<Download>) {
        let cache = DownloadCache::at(dir.to_path_buf()).unwrap();
        let downloads = bodies
            .iter()
            .enumerate()
            .map(|(i, body)| {
                let mut w = cache.writer().unwrap();
                w.write(body).unwrap();
                let sha256 = w.sha256();
                w.commit().unwrap();
                Download { method: "GET".into(), url: format!("http://h/{i}"), status: 200, size: body.len() as u64, sha256 }
            })
            .collect();
        (cache, downloads)
    }

    /// A member of a hand-made tar: name, type, bytes.
    type Member<'a> = (&'a str, tar::EntryType, &'a [u8]);

    /// A tar written member by member, to build hostile files.
    fn raw_tar(out: &Path, members: &[Member<'_>]) {
        let mut tar = tar::Builder::new(File::create(out).unwrap());
        for (name, kind, data) in members {
            let mut h = header(data.len() as u64);
            h.set_entry_type(*kind);
            // Raw name bytes: the tar crate itself refuses to write `..`.
            h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
            h.set_cksum();
            tar.append(&h, *data).unwrap();
        }
        tar.finish().unwrap();
    }

    #[test]
    fn export_is_deterministic_and_imports_into_a_fresh_cache() {
        let tmp = tempfile::tempdir().unwrap();
        let (cache, downloads) = cache_with(&tmp.path().join("a"), &[b"one", b"two", b"one"]);
        let (f1, f2) = (tmp.path().join("d1.tar"), tmp.path().join("d2.tar"));
        export(&cache, &downloads, &f1).unwrap();
        let mut reversed = downloads.clone();
        reversed.reverse();
        export(&cache, &reversed, &f2).unwrap();
        assert_eq!(std::fs::read(&f1).unwrap(), std::fs::read(&f2).unwrap(), "same downloads, same bytes");

        let mut archive = tar::Archive::new(File::open(&f1).unwrap());
        let names: Vec<String> = archive
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let h = e.header();
                assert_eq!((h.mode().unwrap(), h.mtime().unwrap(), h.uid().unwrap(), h.gid().unwrap()), (0o444, 0, 0, 0));
                e.path().unwrap().display().to_string()
            })
            .collect();
        assert_eq!(names.len(), 3, "{names:?}");
        assert_eq!(names[0], MANIFEST);

        let fresh = DownloadCache::at(tmp.path().join("b")).unwrap();
        let mut manifest = import(&fresh, &f1).unwrap();
        manifest.sort();
        let mut expected = downloads.clone();
        expected.sort();
        assert_eq!(manifest, expected);
        for d in &downloads {
            fresh.verify(d).unwrap();
        }
    }

    #[test]
    fn hostile_import_files_are_refused_and_leave_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let (_, downloads) = cache_with(&tmp.path().join("a"), &[b"body"]);
        let sha = downloads[0].sha256.clone();
        let json = serde_json::to_vec(&downloads).unwrap();
        let member = format!("sha256/{sha}");
        let upper = format!("sha256/{}", sha.to_uppercase());
        let reg = tar::EntryType::Regular;
        let cases: Vec<(&str, Vec<Member<'_>>)> = vec![
            ("no manifest first", vec![(member.as_str(), reg, b"body"), (MANIFEST, reg, &json)]),
            ("traversal", vec![(MANIFEST, reg, &json), ("sha256/../../evil", reg, b"body")]),
            (
                "unlisted member",
                vec![(MANIFEST, reg, &json), ("sha256/0000000000000000000000000000000000000000000000000000000000000000", reg, b"x")],
            ),
            ("uppercase hash", vec![(MANIFEST, reg, &json), (upper.as_str(), reg, b"body")]),
            ("symlink", vec![(MANIFEST, reg, &json), (member.as_str(), tar::EntryType::Symlink, b"")]),
            ("wrong size", vec![(MANIFEST, reg, &json), (member.as_str(), reg, b"bodyy")]),
            ("missing body", vec![(MANIFEST, reg, &json)]),
            ("duplicate", vec![(MANIFEST, reg, &json), (member.as_str(), reg, b"body"), (member.as_str(), reg, b"body")]),
            ("bad json", vec![(MANIFEST, reg, b"{\"downloads\": 1}")]),
        ];
        for (what, members) in cases {
            let file = tmp.path().join("hostile.tar");
            raw_tar(&file, &members);
            let fresh = DownloadCache::at(tmp.path().join(format!("fresh-{}", what.replace(' ', "-")))).unwrap();
            let err = import(&fresh, &file).unwrap_err();
            assert_eq!(crate::ExitCode::exit(&err), crate::Exit::Usage, "{what}: {err:?}");
            if what != "duplicate" {
                assert_eq!(std::fs::read_dir(fresh.dir()).unwrap().count(), 0, "{what}: nothing enters the cache");
            }
        }

        // A body whose bytes do not match its name: a hash mismatch, and not stored.
        let file = tmp.path().join("forged.tar");
        raw_tar(&file, &[(MANIFEST, reg, &json), (member.as_str(), reg, b"BODY")]);
        let fresh = DownloadCache::at(tmp.path().join("forged")).unwrap();
        let err = import(&fresh, &file).unwrap_err();
        assert!(matches!(err, EgressError::HashMismatch { .. }), "{err:?}");
        assert_eq!(std::fs::read_dir(fresh.dir()).unwrap().count(), 0);
    }

    #[test]
    fn an_oversized_manifest_is_refused_unread() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("big.tar");
        // A header announcing a 17 MiB manifest, with no data behind it.
        let mut h = header(MAX_MANIFEST_BYTES + (1 << 20));
        h.set_path(MANIFEST).unwrap();
        h.set_cksum();
        std::fs::write(&file, h.as_bytes()).unwrap();
        let cache = DownloadCache::at(tmp.path().join("c")).unwrap();
        let err = import(&cache, &file).unwrap_err();
        assert!(err.to_string().contains("more than"), "{err}");
    }
}
