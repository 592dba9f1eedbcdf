//! Allow-listed, recorded, replayable network egress for builds
//! (docs/network.md): an HTTP forward proxy the guest reaches through one
//! Unix socket, the hosts it may reach, the content-addressed download
//! cache, replay from that cache, and the export/import file that carries
//! a build's downloads to another host.

mod archive;
mod cache;
mod policy;
mod proxy;
#[cfg(test)]
mod proxy_tests;
mod report;

use std::path::PathBuf;

pub use archive::{export, import, MAX_MANIFEST_BYTES};
pub use cache::DownloadCache;
pub use policy::{canonical_host, forbidden_reason, AllowedHost, BadAllowedHost, EgressMode, EgressPolicy, DEFAULT_DOWNLOAD_LIMIT};
pub use proxy::{Proxy, MAX_CONNECTIONS, MAX_HEADER_BYTES, MAX_REQUEST_BODY};
pub use report::{Download, EgressReport, Refusal, Tunnel};

use crate::path_error::PathError;

/// A failure of the download cache or of an export file.
#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    /// Neither XDG_CACHE_HOME nor HOME is set.
    #[error("cannot locate the download cache: set XDG_CACHE_HOME or HOME")]
    NoCacheDir,
    /// A file operation failed.
    #[error(transparent)]
    Io(#[from] PathError),
    /// A download's bytes do not hash to what was recorded.
    #[error("{url} does not match its recorded hash: expected sha256 {expected}, actual {actual}")]
    HashMismatch {
        /// The download's URL.
        url: String,
        /// The recorded SHA-256 (hex).
        expected: String,
        /// What the bytes hash to (hex).
        actual: String,
    },
    /// A recorded download is not in the cache.
    #[error("{url} (sha256 {sha256}) is not in the download cache {}", dir.display())]
    NotCached {
        /// The download's URL.
        url: String,
        /// Its recorded SHA-256.
        sha256: String,
        /// The cache directory.
        dir: PathBuf,
    },
    /// A download record that cannot be right (bad hash, sizes that disagree).
    #[error("bad download record for {url}: {reason}")]
    BadDownload {
        /// The URL, escaped.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// An export file that is not well-formed.
    #[error("{} is not a usable reprovm downloads file: {reason}", file.display())]
    BadExport {
        /// The file.
        file: PathBuf,
        /// What is wrong, escaped.
        reason: String,
    },
    /// An export file's manifest is not valid JSON for a list of downloads.
    #[error("{} has an unreadable downloads.json", file.display())]
    Manifest {
        /// The file.
        file: PathBuf,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
}
