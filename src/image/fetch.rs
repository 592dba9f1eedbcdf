//! `reprovm image fetch`: downloads a bundle over HTTP(S) straight into the
//! store's private temporary area, hashing as it goes. A partial or wrong
//! download is refused by the pin check and never enters the store.

use std::time::Duration;

use crate::image::pin::Pin;
use crate::image::store::{Store, StoreError, StoredImage};

/// A failed fetch.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The URL is not http or https.
    #[error("cannot fetch {url:?}: only http:// and https:// URLs are supported")]
    Scheme {
        /// The URL given.
        url: String,
    },
    /// The server could not be reached or answered with an error status.
    #[error("cannot download {url}")]
    Request {
        /// The URL.
        url: String,
        /// The cause.
        #[source]
        source: Box<ureq::Error>,
    },
    /// The download or the store refused the bytes.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Downloads `url`, proves it hashes to `expected`, and adds it to `store`.
/// A progress bar is drawn on stderr when it is a terminal (not with --quiet).
pub fn fetch_image(url: &str, expected: Pin, store: &Store) -> Result<StoredImage, FetchError> {
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(FetchError::Scheme { url: url.to_string() });
    }
    let agent = ureq::AgentBuilder::new().timeout_connect(Duration::from_secs(30)).timeout_read(Duration::from_secs(60)).build();
    let response = agent.get(url).call().map_err(|e| FetchError::Request { url: url.to_string(), source: Box::new(e) })?;
    let length = response.header("Content-Length").and_then(|v| v.parse::<u64>().ok());
    let bar = crate::terminal::bytes_bar("downloading", length);
    tracing::info!("downloading {url}{}", length.map(|l| format!(" ({l} bytes)")).unwrap_or_default());
    let result = store.import_reader(response.into_reader(), url, Some(expected), |n| bar.set_position(n));
    bar.finish_and_clear();
    Ok(result?)
}
