//! The bundle file format. A bundle is one uncompressed tar with exactly four
//! regular members, in this order:
//!
//! | member               | content                                         |
//! |----------------------|-------------------------------------------------|
//! | `reprovm-image.json` | [`ImageMetadata`]                               |
//! | `vmlinux`            | the guest kernel (ELF, booted through PVH)      |
//! | `initrd.img`         | the initrd (newc cpio)                          |
//! | `rootfs.ext4`        | the root filesystem image                       |
//!
//! Members are 512-byte aligned, so QEMU opens `rootfs.ext4` in place (raw
//! driver with offset and size) and nothing is ever unpacked by member name:
//! a hostile bundle cannot make reprovm write anywhere.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

/// Name of the metadata member.
pub const METADATA: &str = "reprovm-image.json";
/// Name of the kernel member.
pub const KERNEL: &str = "vmlinux";
/// Name of the initrd member.
pub const INITRD: &str = "initrd.img";
/// Name of the root filesystem member.
pub const ROOTFS: &str = "rootfs.ext4";
/// The members in the only order a bundle may have them.
pub const MEMBERS: [&str; 4] = [METADATA, KERNEL, INITRD, ROOTFS];
/// The bundle format version written in the metadata.
pub const FORMAT_VERSION: u32 = 1;
/// Largest metadata member accepted (the package list fits easily).
const MAX_METADATA_BYTES: u64 = 4 << 20;

/// What a bundle says about itself (`reprovm-image.json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageMetadata {
    /// Bundle format version ([`FORMAT_VERSION`]).
    pub format: u32,
    /// Recipe name, e.g. `debian-bookworm-amd64`.
    pub name: String,
    /// Distribution and suite, e.g. `debian bookworm`.
    pub distribution: String,
    /// Architecture, e.g. `amd64`.
    pub architecture: String,
    /// The mirror the packages came from.
    pub mirror: String,
    /// The SOURCE_DATE_EPOCH the image was built with (also its date).
    pub source_date_epoch: i64,
    /// SHA-256 of the recipe file it was built from.
    pub recipe_sha256: String,
    /// Guest kernel release (`uname -r`).
    pub kernel_release: String,
    /// Root filesystem label, mounted by the initrd as the root.
    pub rootfs_label: String,
    /// Every installed package as `name=version`, sorted.
    pub packages: Vec<String>,
}

/// Where one member's bytes lie inside the bundle file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Byte offset of the member's data from the start of the file.
    pub offset: u64,
    /// Member size in bytes.
    pub size: u64,
}

/// A bundle's validated table of contents.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BundleLayout {
    /// The parsed metadata.
    pub metadata: ImageMetadata,
    /// The kernel's bytes.
    pub kernel: Extent,
    /// The initrd's bytes.
    pub initrd: Extent,
    /// The root filesystem's bytes.
    pub rootfs: Extent,
}

/// A bundle that is not well-formed.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// The file could not be read.
    #[error("cannot read bundle")]
    Read(#[source] io::Error),
    /// The tar structure is broken (truncated or not a tar at all).
    #[error("bundle is not a valid reprovm image (tar structure broken or truncated)")]
    NotTar(#[source] io::Error),
    /// A member is not the one expected at its position.
    #[error("bundle member {index} is {found:?}, expected {expected:?}")]
    UnexpectedMember {
        /// Position of the member.
        index: usize,
        /// The name found.
        found: String,
        /// The name required there.
        expected: &'static str,
    },
    /// A member is a link, directory or device rather than a regular file.
    #[error("bundle member {name:?} is a {kind}, only regular files are allowed")]
    NotRegular {
        /// The member name.
        name: String,
        /// Its tar entry type.
        kind: String,
    },
    /// More members than the four allowed.
    #[error("bundle has an extra member {name:?} after {}", ROOTFS)]
    ExtraMember {
        /// The member name.
        name: String,
    },
    /// Fewer members than required.
    #[error("bundle ends after {count} members, expected {}", MEMBERS.len())]
    MissingMembers {
        /// How many were present.
        count: usize,
    },
    /// A member's data runs past the end of the file.
    #[error("bundle member {name:?} ({size} bytes at offset {offset}) runs past the end of the {file_size}-byte file: truncated")]
    Truncated {
        /// The member name.
        name: String,
        /// Data offset.
        offset: u64,
        /// Declared size.
        size: u64,
        /// Actual file size.
        file_size: u64,
    },
    /// The metadata is not valid JSON of the expected shape.
    #[error("bundle member {} is invalid", METADATA)]
    Metadata(#[source] serde_json::Error),
    /// The metadata is too large to be genuine.
    #[error("bundle member {} is {size} bytes, more than the {max} allowed", METADATA)]
    MetadataTooLarge {
        /// Its size.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// The metadata names a format this reprovm does not know.
    #[error("bundle format {found} is not supported (this reprovm reads format {})", FORMAT_VERSION)]
    Format {
        /// The format found.
        found: u32,
    },
}

/// Reads and validates the table of contents of the bundle at `path`.
pub fn read_layout(path: &Path) -> Result<BundleLayout, BundleError> {
    layout_of(&File::open(path).map_err(BundleError::Read)?)
}

/// Reads and validates the table of contents of an open bundle (from its
/// start, whatever the file offset was).
pub fn layout_of(mut file: &File) -> Result<BundleLayout, BundleError> {
    file.seek(SeekFrom::Start(0)).map_err(BundleError::Read)?;
    let file_size = file.metadata().map_err(BundleError::Read)?.len();
    let mut extents = Vec::with_capacity(MEMBERS.len());
    {
        let mut archive = tar::Archive::new(&mut file);
        let entries = archive.entries().map_err(BundleError::NotTar)?;
        for (index, entry) in entries.enumerate() {
            let entry = entry.map_err(BundleError::NotTar)?;
            let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
            let Some(&expected) = MEMBERS.get(index) else {
                return Err(BundleError::ExtraMember { name });
            };
            if name != expected {
                return Err(BundleError::UnexpectedMember { index, found: name, expected });
            }
            let kind = entry.header().entry_type();
            if !kind.is_file() {
                return Err(BundleError::NotRegular { name, kind: format!("{kind:?}") });
            }
            let extent = Extent { offset: entry.raw_file_position(), size: entry.size() };
            if extent.offset.checked_add(extent.size).is_none_or(|end| end > file_size) {
                return Err(BundleError::Truncated { name, offset: extent.offset, size: extent.size, file_size });
            }
            extents.push(extent);
        }
    }
    if extents.len() < MEMBERS.len() {
        return Err(BundleError::MissingMembers { count: extents.len() });
    }
    let meta = extents[0];
    if meta.size > MAX_METADATA_BYTES {
        return Err(BundleError::MetadataTooLarge { size: meta.size, max: MAX_METADATA_BYTES });
    }
    let mut json = vec![0u8; meta.size as usize];
    file.seek(SeekFrom::Start(meta.offset)).map_err(BundleError::Read)?;
    file.read_exact(&mut json).map_err(BundleError::Read)?;
    let metadata: ImageMetadata = serde_json::from_slice(&json).map_err(BundleError::Metadata)?;
    if metadata.format != FORMAT_VERSION {
        return Err(BundleError::Format { found: metadata.format });
    }
    Ok(BundleLayout { metadata, kernel: extents[1], initrd: extents[2], rootfs: extents[3] })
}

/// Copies one member's bytes out of an open bundle into `dest`.
pub fn copy_member(mut bundle: &File, extent: Extent, dest: &mut impl Write) -> io::Result<()> {
    bundle.seek(SeekFrom::Start(extent.offset))?;
    let copied = io::copy(&mut bundle.take(extent.size), dest)?;
    if copied != extent.size {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "bundle member shorter than its header says"));
    }
    Ok(())
}

/// Writes a bundle to `out`: the metadata and the three files, with fixed
/// headers (mode 0444, uid/gid 0, mtime = SOURCE_DATE_EPOCH) so the same
/// inputs always give the same bytes.
pub fn write_bundle(out: impl Write, metadata: &ImageMetadata, kernel: &Path, initrd: &Path, rootfs: &Path) -> io::Result<()> {
    let mut json = serde_json::to_vec_pretty(metadata).map_err(io::Error::other)?;
    json.push(b'\n');
    let mtime = u64::try_from(metadata.source_date_epoch).unwrap_or(0);
    let mut builder = tar::Builder::new(out);
    let mut append = |name: &str, size: u64, data: &mut dyn Read| {
        let mut header = tar::Header::new_ustar();
        header.set_path(name)?;
        header.set_size(size);
        header.set_mode(0o444);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(mtime);
        header.set_entry_type(tar::EntryType::Regular);
        header.set_cksum();
        builder.append(&header, data)
    };
    append(METADATA, json.len() as u64, &mut &json[..])?;
    for (name, path) in [(KERNEL, kernel), (INITRD, initrd), (ROOTFS, rootfs)] {
        let mut file = File::open(path)?;
        let size = file.metadata()?.len();
        append(name, size, &mut file)?;
    }
    builder.into_inner()?.flush()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::path::PathBuf;

    pub(crate) fn sample_metadata() -> ImageMetadata {
        ImageMetadata {
            format: FORMAT_VERSION,
            name: "test-image".into(),
            distribution: "debian bookworm".into(),
            architecture: "amd64".into(),
            mirror: "http://deb.debian.org/debian".into(),
            source_date_epoch: 1_700_000_000,
            recipe_sha256: "0".repeat(64),
            kernel_release: "6.1.0-test".into(),
            rootfs_label: "builder-root".into(),
            packages: vec!["a=1".into(), "b=2".into()],
        }
    }

    /// Writes a small but well-formed bundle into `dir` and returns its path.
    pub(crate) fn sample_bundle(dir: &Path, rootfs_bytes: &[u8]) -> PathBuf {
        let parts: Vec<PathBuf> = [("k", &b"kernel"[..]), ("i", b"initrd"), ("r", rootfs_bytes)]
            .iter()
            .map(|(name, data)| {
                let p = dir.join(name);
                std::fs::write(&p, data).unwrap();
                p
            })
            .collect();
        let out = dir.join("bundle.img");
        write_bundle(File::create(&out).unwrap(), &sample_metadata(), &parts[0], &parts[1], &parts[2]).unwrap();
        out
    }

    #[test]
    fn round_trip_layout_and_members() {
        let dir = tempfile::tempdir().unwrap();
        let path = sample_bundle(dir.path(), b"root filesystem bytes");
        let layout = read_layout(&path).unwrap();
        assert_eq!(layout.metadata, sample_metadata());
        assert_eq!(layout.rootfs.offset % 512, 0);
        let mut out = Vec::new();
        copy_member(&File::open(&path).unwrap(), layout.rootfs, &mut out).unwrap();
        assert_eq!(out, b"root filesystem bytes");
    }

    #[test]
    fn same_inputs_same_bytes() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let pa = sample_bundle(a.path(), b"x");
        let pb = sample_bundle(b.path(), b"x");
        assert_eq!(std::fs::read(pa).unwrap(), std::fs::read(pb).unwrap());
    }

    #[test]
    fn truncated_bundle_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = sample_bundle(dir.path(), &[7u8; 4096]);
        let len = std::fs::metadata(&path).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(len - 3000).unwrap();
        let err = read_layout(&path).unwrap_err();
        assert!(matches!(err, BundleError::Truncated { .. } | BundleError::NotTar(_)), "{err:?}");
    }

    #[test]
    fn garbage_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("garbage");
        std::fs::write(&path, vec![0x5a; 10_000]).unwrap();
        assert!(read_layout(&path).is_err());
    }

    fn tar_with(entries: &[(&str, tar::EntryType, &[u8])]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (name, kind, data) in entries {
            let mut h = tar::Header::new_gnu();
            // set_path refuses "..", so write the raw name like a hostile tool would.
            let raw = &mut h.as_old_mut().name;
            raw[..name.len()].copy_from_slice(name.as_bytes());
            h.set_size(data.len() as u64);
            h.set_entry_type(*kind);
            if *kind == tar::EntryType::Symlink {
                h.set_link_name("/etc/passwd").unwrap();
            }
            h.set_cksum();
            builder.append(&h, *data).unwrap();
        }
        builder.into_inner().unwrap()
    }

    #[test]
    fn escaping_and_linked_members_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let json = serde_json::to_vec(&sample_metadata()).unwrap();
        let cases: Vec<Vec<u8>> = vec![
            tar_with(&[("../reprovm-image.json", tar::EntryType::Regular, &json)]),
            tar_with(&[("/etc/passwd", tar::EntryType::Regular, b"x")]),
            tar_with(&[(METADATA, tar::EntryType::Regular, &json), (KERNEL, tar::EntryType::Symlink, b"")]),
            tar_with(&[(METADATA, tar::EntryType::Regular, &json), (KERNEL, tar::EntryType::Link, b"")]),
        ];
        for (i, bytes) in cases.iter().enumerate() {
            let path = dir.path().join(format!("case{i}"));
            std::fs::write(&path, bytes).unwrap();
            let err = read_layout(&path).unwrap_err();
            assert!(matches!(err, BundleError::UnexpectedMember { .. } | BundleError::NotRegular { .. }), "case {i}: {err:?}");
        }
    }

    #[test]
    fn unknown_metadata_field_is_rejected() {
        let mut value = serde_json::to_value(sample_metadata()).unwrap();
        value["surprise"] = serde_json::json!(1);
        assert!(serde_json::from_value::<ImageMetadata>(value).is_err());
    }
}
