//! One error for "an operation on a path failed", shared by every stage so
//! each names the action and the path the same way.

use std::io;
use std::path::{Path, PathBuf};

/// An I/O operation on `path` failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot {action} {}", path.display())]
pub struct PathError {
    /// What was being done, e.g. "create".
    pub action: &'static str,
    /// The path involved.
    pub path: PathBuf,
    /// The cause.
    #[source]
    pub source: io::Error,
}

/// A `map_err` adapter: `.map_err(path_error("read", &p))?`.
pub fn path_error<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> PathError + 'a {
    move |source| PathError { action, path: path.to_path_buf(), source }
}
