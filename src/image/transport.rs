//! The transport file: a bundle compressed as one zstd frame, for download
//! (a fifth of the bundle's size). Its pin stays the SHA-256 of the
//! uncompressed bundle: `image export` hashes what it compresses and refuses
//! a store entry that no longer matches its pin, and the store's import
//! decompresses while hashing (`image import` and `image fetch` take either
//! form), so unverified bytes never enter the store. The file is the same
//! whatever the host and its number of cores: a fixed level, a fixed number
//! of compression workers, the content size and checksum in the frame.

use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::image::pin::{hash_reader, Pin};
use crate::image::store::{Store, StoreError};
use crate::path_error::path_error;

/// The first bytes of a zstd frame.
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];
/// Compression level of `image export` (zstd's range is 1–19; past 3 the
/// file shrinks little and compression slows down a lot).
pub const DEFAULT_LEVEL: i32 = 9;
/// Compression workers: fixed, so that the bytes do not depend on the host.
const WORKERS: u32 = 4;

/// `reader`'s bytes as a bundle: decompressed when they start like a zstd
/// frame (a transport file), else as they are.
pub fn bundle_reader<'a>(reader: impl Read + 'a) -> io::Result<Box<dyn Read + 'a>> {
    let mut buffered = BufReader::with_capacity(1 << 20, reader);
    let head = buffered.fill_buf()?;
    if head.starts_with(&ZSTD_MAGIC) {
        Ok(Box::new(zstd::Decoder::with_buffer(buffered)?))
    } else {
        Ok(Box::new(buffered))
    }
}

/// Writes the transport file of the store's bundle `pin` to `out` (replaced
/// only once complete) and returns its size and the bundle's. The bundle is
/// hashed as it is compressed: a store entry that does not match its pin
/// leaves no file.
pub fn export(store: &Store, pin: Pin, out: &Path, level: i32) -> Result<(u64, u64), StoreError> {
    let stored = store.stored(pin)?;
    let source = File::open(&stored.path).map_err(path_error("open", &stored.path))?;
    let out_dir = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let partial =
        tempfile::Builder::new().prefix(".reprovm-export-").tempfile_in(out_dir).map_err(path_error("create a file in", out_dir))?;
    let actual = compress(source, partial.as_file(), stored.size, level).map_err(path_error("write", out))?;
    if actual != pin {
        // Dropping `partial` removes the file.
        return Err(StoreError::PinMismatch { what: stored.path.display().to_string(), expected: pin, actual });
    }
    fs::set_permissions(partial.path(), fs::Permissions::from_mode(0o644)).map_err(path_error("set permissions of", partial.path()))?;
    let file = partial.persist(out).map_err(|e| path_error("write", out)(e.error))?;
    Ok((file.metadata().map_err(path_error("stat", out))?.len(), stored.size))
}

/// Compresses `size` bytes of `source` into `out` as one frame and returns
/// the SHA-256 of what it read.
fn compress(source: impl Read, out: &File, size: u64, level: i32) -> io::Result<Pin> {
    let mut encoder = zstd::Encoder::new(io::BufWriter::with_capacity(4 << 20, out), level)?;
    encoder.multithread(WORKERS)?;
    encoder.include_checksum(true)?;
    encoder.include_contentsize(true)?;
    encoder.set_pledged_src_size(Some(size))?;
    let (actual, _) = hash_reader(source, |chunk| encoder.write_all(chunk))?;
    encoder.finish()?.flush()?;
    Ok(actual)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_bytes_pass_through_and_a_frame_is_decompressed() {
        let data: Vec<u8> = (0..200_000u32).flat_map(|i| (i % 251).to_le_bytes()).collect();
        let mut plain = Vec::new();
        bundle_reader(&data[..]).unwrap().read_to_end(&mut plain).unwrap();
        assert_eq!(plain, data);
        let frame = zstd::encode_all(&data[..], 3).unwrap();
        assert!(frame.len() < data.len() / 4);
        let mut unpacked = Vec::new();
        bundle_reader(&frame[..]).unwrap().read_to_end(&mut unpacked).unwrap();
        assert_eq!(unpacked, data);
    }

    #[test]
    fn a_corrupt_frame_is_an_error_not_short_data() {
        let data = vec![7u8; 1 << 20];
        let mut frame = zstd::stream::encode_all(&data[..], 3).unwrap();
        let last = frame.len() - 2;
        frame[last] ^= 0xff;
        let mut out = Vec::new();
        assert!(bundle_reader(&frame[..]).unwrap().read_to_end(&mut out).is_err());
    }
}
