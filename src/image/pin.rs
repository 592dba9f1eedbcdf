//! Pins: `sha256:<64 hex>` names for bundles, and the fast file hashing that
//! proves a file matches one.

use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::path::Path;
use std::str::FromStr;

use sha2::{Digest, Sha256};

/// A bundle's identity: the SHA-256 of the bundle file.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Pin([u8; 32]);

/// A string that is not a pin.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{value:?} is not a pin: expected sha256: followed by 64 lowercase hex digits (or the 64 hex digits alone)")]
pub struct BadPin {
    /// The rejected text.
    pub value: String,
}

impl Pin {
    /// The pin of these digest bytes.
    pub fn from_digest(bytes: [u8; 32]) -> Self {
        Pin(bytes)
    }

    /// The 64 lowercase hex digits.
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl FromStr for Pin {
    type Err = BadPin;

    /// Accepts `sha256:<hex>` or bare `<hex>`; hex may be upper or lower case.
    fn from_str(s: &str) -> Result<Self, BadPin> {
        let hex_part = s.strip_prefix("sha256:").unwrap_or(s);
        let mut bytes = [0u8; 32];
        if hex_part.len() != 64 || hex::decode_to_slice(hex_part, &mut bytes).is_err() {
            return Err(BadPin { value: s.to_string() });
        }
        Ok(Pin(bytes))
    }
}

impl fmt::Display for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl fmt::Debug for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Size of each read while hashing: large enough that the SHA-NI code path,
/// not system calls, sets the pace.
const HASH_CHUNK: usize = 4 << 20;

/// Streams `reader` through SHA-256, handing every chunk to `sink` as well
/// (used to copy and hash in one pass). Returns the pin and the byte count.
pub fn hash_reader(mut reader: impl Read, mut sink: impl FnMut(&[u8]) -> io::Result<()>) -> io::Result<(Pin, u64)> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; HASH_CHUNK];
    let mut total = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        sink(&buf[..n])?;
        total += n as u64;
    }
    Ok((Pin(hasher.finalize().into()), total))
}

/// The SHA-256 of the file at `path`.
pub fn hash_file(path: &Path) -> io::Result<Pin> {
    hash_reader(File::open(path)?, |_| Ok(())).map(|(pin, _)| pin)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn parses_prefixed_and_bare_hex() {
        let a: Pin = format!("sha256:{EMPTY}").parse().unwrap();
        let b: Pin = EMPTY.to_uppercase().parse().unwrap();
        assert_eq!(a, b);
        assert_eq!(a.to_string(), format!("sha256:{EMPTY}"));
    }

    #[test]
    fn rejects_wrong_length_and_non_hex() {
        for bad in ["", "sha256:", "sha256:abc", &format!("md5:{EMPTY}"), &"g".repeat(64)] {
            let err = bad.parse::<Pin>().unwrap_err();
            assert_eq!(err.value, bad);
        }
    }

    #[test]
    fn hashes_like_sha256sum() {
        let (pin, n) = hash_reader(&b""[..], |_| Ok(())).unwrap();
        assert_eq!((pin.hex().as_str(), n), (EMPTY, 0));
        let (pin, n) = hash_reader(&b"abc"[..], |_| Ok(())).unwrap();
        assert_eq!(n, 3);
        assert_eq!(pin.hex(), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }
}
