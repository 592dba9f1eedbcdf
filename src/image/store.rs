//! The content-addressed image store: `$XDG_CACHE_HOME/reprovm/images/<hex>/bundle.img`.
//! Entries appear atomically (written and verified in a private temporary
//! directory, then renamed into place), are read-only once there, and every
//! boot goes through [`Store::open_verified`], which re-hashes the bytes.

use std::fs::{self, File, Permissions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use crate::image::bundle::{self, BundleError, BundleLayout};
use crate::image::pin::{hash_reader, Pin};
use crate::image::transport;
use crate::path_error::{path_error, PathError};

/// File name of the bundle inside a store entry.
const BUNDLE_FILE: &str = "bundle.img";
/// Prefix of in-progress imports (never read as entries).
const INCOMING_PREFIX: &str = ".incoming-";
/// The largest bundle an import accepts (the default image is under 1 GiB):
/// a source that streams, or a transport file that inflates, past it
/// cannot fill the disk.
pub const MAX_BUNDLE_BYTES: u64 = 64 << 30;

/// A failure of the image store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Neither XDG_CACHE_HOME nor HOME is set.
    #[error("cannot locate the image store: set XDG_CACHE_HOME or HOME")]
    NoCacheDir,
    /// A file operation failed.
    #[error(transparent)]
    Io(#[from] PathError),
    /// The bytes do not hash to the pin they were given.
    #[error("{what} does not match its pin: expected {expected}, actual {actual}")]
    PinMismatch {
        /// What was hashed (a file path or URL).
        what: String,
        /// The pin it was supposed to have.
        expected: Pin,
        /// What it hashes to.
        actual: Pin,
    },
    /// The file is not a well-formed bundle.
    #[error("{path} is not a usable reprovm image bundle")]
    Bundle {
        /// The bundle path.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        source: BundleError,
    },
    /// The bundle's bytes could not be read (or decompressed) from their source.
    #[error("cannot read the bundle from {what}")]
    Read {
        /// The file path or URL.
        what: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The bundle is larger than any builder image may be.
    #[error("{what} holds more than {} GiB: no builder image is that large (refused, nothing stored)", MAX_BUNDLE_BYTES >> 30)]
    TooLarge {
        /// The file path or URL.
        what: String,
    },
    /// No store entry has this pin.
    #[error("image {pin} is not in the store ({root}); build it with `reprovm image build`, or add it with `reprovm image import` or `reprovm image fetch`")]
    NotFound {
        /// The pin asked for.
        pin: Pin,
        /// The store directory.
        root: PathBuf,
    },
}

/// A bundle in the store.
#[derive(Clone, Debug)]
pub struct StoredImage {
    /// Its pin (the SHA-256 of the bundle file).
    pub pin: Pin,
    /// The bundle file.
    pub path: PathBuf,
    /// Its size in bytes.
    pub size: u64,
    /// When it entered the store.
    pub added: SystemTime,
    /// Its table of contents and metadata.
    pub layout: BundleLayout,
}

/// A bundle opened once for booting, with the descriptor its hash is
/// computed over: everything booted from it (the kernel, the initrd, the
/// root filesystem QEMU reads through `/dev/fdset`) comes from these very
/// bytes, not from a path that could have been swapped after the check.
/// From [`Store::open_verified`] it is proven; from [`Store::open_checking`]
/// it is proven once its [`ImageCheck`] passed.
#[derive(Clone, Debug)]
pub struct OpenImage {
    /// The store entry.
    pub stored: StoredImage,
    /// The bundle, opened read-only, as hashed.
    pub file: Arc<File>,
}

/// The hash of an [`OpenImage`] being computed on its own thread (through
/// positional reads of the same descriptor) while the caller goes on: QEMU
/// starts and the kernel boots meanwhile, and nothing may reach the guest
/// before [`ImageCheck::wait`] returned `Ok`.
#[derive(Debug)]
pub struct ImageCheck {
    pin: Pin,
    path: PathBuf,
    thread: std::thread::JoinHandle<io::Result<(Pin, std::time::Duration)>>,
}

impl ImageCheck {
    /// Waits for the hash: `Ok` with the time it took when the bytes match
    /// the pin, the mismatch (exit 3) otherwise.
    pub fn wait(self) -> Result<std::time::Duration, StoreError> {
        let (actual, took) = self.thread.join().expect("the hash thread panicked").map_err(path_error("hash", &self.path))?;
        if actual != self.pin {
            return Err(StoreError::PinMismatch { what: self.path.display().to_string(), expected: self.pin, actual });
        }
        Ok(took)
    }
}

/// The image store rooted at one directory.
#[derive(Clone, Debug)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    /// The store at `$XDG_CACHE_HOME/reprovm/images` (default `~/.cache/reprovm/images`).
    pub fn from_env() -> Result<Store, StoreError> {
        let cache = match std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
            Some(dir) => PathBuf::from(dir),
            None => PathBuf::from(std::env::var_os("HOME").filter(|v| !v.is_empty()).ok_or(StoreError::NoCacheDir)?).join(".cache"),
        };
        Ok(Store::at(cache.join("reprovm").join("images")))
    }

    /// The store rooted at `root`.
    pub fn at(root: impl Into<PathBuf>) -> Store {
        Store { root: root.into() }
    }

    /// The store directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn entry_dir(&self, pin: &Pin) -> PathBuf {
        self.root.join(pin.hex())
    }

    /// Adds the bundle file at `file`; see [`Store::import_reader`].
    pub fn import(&self, file: &Path, expected: Option<Pin>) -> Result<StoredImage, StoreError> {
        let reader = File::open(file).map_err(path_error("open", file))?;
        self.import_reader(reader, &file.display().to_string(), expected, |_| {})
    }

    /// Copies a bundle, or its transport file (decompressed on the way,
    /// see [`crate::image::transport`]), from `reader` into the store,
    /// hashing the bundle as it goes. With `expected`, bytes that hash
    /// otherwise are refused; a malformed bundle, or one over
    /// [`MAX_BUNDLE_BYTES`], is refused too. Nothing enters the store unless
    /// the checks pass, and two processes importing the same bundle at once
    /// leave one entry. `progress` is told the bundle bytes copied so far.
    pub fn import_reader(
        &self,
        reader: impl Read,
        what: &str,
        expected: Option<Pin>,
        mut progress: impl FnMut(u64),
    ) -> Result<StoredImage, StoreError> {
        // Private to its owner: nobody else may read, add or swap entries.
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.root)
            .map_err(path_error("create the store directory", &self.root))?;
        let incoming = tempfile::Builder::new()
            .prefix(INCOMING_PREFIX)
            .tempdir_in(&self.root)
            .map_err(path_error("create a temporary directory in", &self.root))?;
        let tmp_bundle = incoming.path().join(BUNDLE_FILE);
        let mut out = File::create(&tmp_bundle).map_err(path_error("create", &tmp_bundle))?;
        let mut copied = 0u64;
        let reader = transport::bundle_reader(reader).map_err(|source| StoreError::Read { what: what.to_string(), source })?;
        // A read error is the source's (a truncated download, a corrupt
        // transport file); a write error is this host's.
        let mut write_failed = false;
        let hashed = hash_reader(reader.take(MAX_BUNDLE_BYTES + 1), |chunk| {
            out.write_all(chunk).inspect_err(|_| write_failed = true)?;
            copied += chunk.len() as u64;
            progress(copied);
            Ok(())
        });
        let (actual, _) = match hashed {
            Ok(hashed) => hashed,
            Err(e) if write_failed => return Err(path_error("write", &tmp_bundle)(e).into()),
            Err(source) => return Err(StoreError::Read { what: what.to_string(), source }),
        };
        if copied > MAX_BUNDLE_BYTES {
            return Err(StoreError::TooLarge { what: what.to_string() });
        }
        out.sync_all().map_err(path_error("sync", &tmp_bundle))?;
        drop(out);
        if let Some(expected) = expected {
            if expected != actual {
                return Err(StoreError::PinMismatch { what: what.to_string(), expected, actual });
            }
        }
        bundle::read_layout(&tmp_bundle).map_err(|source| StoreError::Bundle { path: PathBuf::from(what), source })?;
        fs::set_permissions(&tmp_bundle, Permissions::from_mode(0o444)).map_err(path_error("make read-only", &tmp_bundle))?;

        let entry = self.entry_dir(&actual);
        if !entry.exists() {
            match fs::rename(incoming.path(), &entry) {
                Ok(()) => {
                    // The entry is in place: the temporary directory is gone.
                    let _ = incoming.keep();
                    fs::set_permissions(&entry, Permissions::from_mode(0o500)).map_err(path_error("make read-only", &entry))?;
                }
                // Another process put the same bundle in place first: keep theirs.
                Err(e) if entry.exists() => tracing::debug!("{} appeared concurrently: {e}", entry.display()),
                Err(e) => return Err(path_error("move the bundle into", &entry)(e).into()),
            }
        }
        self.stored(actual)
    }

    /// The entry for `pin` as it is on disk, without re-hashing.
    pub fn stored(&self, pin: Pin) -> Result<StoredImage, StoreError> {
        let path = self.entry_dir(&pin).join(BUNDLE_FILE);
        let meta = match fs::metadata(&path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(StoreError::NotFound { pin, root: self.root.clone() }),
            Err(e) => return Err(path_error("read", &path)(e).into()),
        };
        let layout = bundle::read_layout(&path).map_err(|source| StoreError::Bundle { path: path.clone(), source })?;
        let added = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
        Ok(StoredImage { pin, size: meta.len(), added, layout, path })
    }

    /// Every entry in the store, sorted by pin. Directories that are not
    /// entries (in-progress imports, stray files) are skipped.
    pub fn list(&self) -> Result<Vec<StoredImage>, StoreError> {
        let dir = match fs::read_dir(&self.root) {
            Ok(dir) => dir,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(path_error("read", &self.root)(e).into()),
        };
        let mut pins = Vec::new();
        for entry in dir {
            let entry = entry.map_err(path_error("read", &self.root))?;
            if let Some(pin) = entry.file_name().to_str().and_then(|n| n.parse::<Pin>().ok()) {
                pins.push(pin);
            }
        }
        pins.sort();
        pins.into_iter().map(|pin| self.stored(pin)).collect()
    }

    /// Opens the entry for `pin` once, re-hashes the bytes through that
    /// descriptor and proves they match the pin. This is the one gate every
    /// boot passes: nothing is booted that fails it, and what is booted is
    /// read through the descriptor that was hashed.
    pub fn open_verified(&self, pin: Pin) -> Result<OpenImage, StoreError> {
        let (image, check) = self.open_checking(pin)?;
        check.wait()?;
        Ok(image)
    }

    /// Opens the entry for `pin` once and starts re-hashing it through that
    /// descriptor on its own thread; the caller may start QEMU from the
    /// image meanwhile, and sends nothing to the guest before the check
    /// passed (see `vm::Machine::boot`). The bundle's table of contents is
    /// read first (a malformed bundle is refused at once).
    pub fn open_checking(&self, pin: Pin) -> Result<(OpenImage, ImageCheck), StoreError> {
        let path = self.entry_dir(&pin).join(BUNDLE_FILE);
        let file = match File::open(&path) {
            Ok(file) => Arc::new(file),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(StoreError::NotFound { pin, root: self.root.clone() }),
            Err(e) => return Err(path_error("open", &path)(e).into()),
        };
        let layout = bundle::layout_of(&file).map_err(|source| StoreError::Bundle { path: path.clone(), source })?;
        let metadata = file.metadata().map_err(path_error("stat", &path))?;
        let added = metadata.modified().unwrap_or(SystemTime::UNIX_EPOCH);
        let hashed = Arc::clone(&file);
        let thread = std::thread::Builder::new()
            .name("image-hash".into())
            .spawn(move || {
                let start = std::time::Instant::now();
                let (actual, _) = hash_reader(PositionalReader { file: &hashed, offset: 0 }, |_| Ok(()))?;
                Ok((actual, start.elapsed()))
            })
            .map_err(path_error("start hashing", &path))?;
        let image = OpenImage { stored: StoredImage { pin, path: path.clone(), size: metadata.len(), added, layout }, file };
        Ok((image, ImageCheck { pin, path, thread }))
    }
}

/// Reads a file from `offset` on with `pread`, leaving the descriptor's
/// own offset (shared with whoever copies the kernel out) alone.
struct PositionalReader<'a> {
    file: &'a File,
    offset: u64,
}

impl Read for PositionalReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = std::os::unix::fs::FileExt::read_at(self.file, buf, self.offset)?;
        self.offset += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::bundle::tests::sample_bundle;
    use crate::image::pin::hash_file;

    #[test]
    fn import_list_and_verify() {
        let dir = tempfile::tempdir().unwrap();
        let bundle = sample_bundle(dir.path(), b"rootfs");
        let pin = hash_file(&bundle).unwrap();
        let store = Store::at(dir.path().join("store"));
        let stored = store.import(&bundle, Some(pin)).unwrap();
        assert_eq!(stored.pin, pin);
        assert_eq!(fs::metadata(&stored.path).unwrap().permissions().mode() & 0o777, 0o444);
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(store.root()), 0o700, "the store is private to its owner");
        assert_eq!(mode(stored.path.parent().unwrap()), 0o500, "entries are private and read-only");
        assert_eq!(store.list().unwrap().len(), 1);
        assert_eq!(store.open_verified(pin).unwrap().stored.pin, pin);
        // A second import of the same bytes is a no-op.
        store.import(&bundle, None).unwrap();
        assert_eq!(store.list().unwrap().len(), 1);
    }

    #[test]
    fn wrong_pin_is_refused_and_nothing_enters() {
        let dir = tempfile::tempdir().unwrap();
        let bundle = sample_bundle(dir.path(), b"rootfs");
        let wrong: Pin = "00".repeat(32).parse().unwrap();
        let store = Store::at(dir.path().join("store"));
        let err = store.import(&bundle, Some(wrong)).unwrap_err();
        assert_eq!(crate::ExitCode::exit(&err), crate::Exit::PinMismatch);
        assert!(err.to_string().contains(&wrong.to_string()), "{err}");
        assert_eq!(fs::read_dir(store.root()).unwrap().count(), 0, "nothing may remain in the store");
    }

    #[test]
    fn garbage_is_refused_and_nothing_enters() {
        let dir = tempfile::tempdir().unwrap();
        let garbage = dir.path().join("garbage");
        fs::write(&garbage, b"not a bundle at all").unwrap();
        let store = Store::at(dir.path().join("store"));
        let err = store.import(&garbage, None).unwrap_err();
        assert!(matches!(err, StoreError::Bundle { .. }), "{err:?}");
        assert_eq!(fs::read_dir(store.root()).unwrap().count(), 0);
    }

    #[test]
    fn concurrent_imports_leave_one_entry() {
        let dir = tempfile::tempdir().unwrap();
        let bundle = sample_bundle(dir.path(), &vec![3u8; 1 << 20]);
        let store = Store::at(dir.path().join("store"));
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..4).map(|_| s.spawn(|| store.import(&bundle, None).unwrap().pin)).collect();
            let pins: Vec<Pin> = handles.into_iter().map(|h| h.join().unwrap()).collect();
            assert!(pins.windows(2).all(|w| w[0] == w[1]));
        });
        let names: Vec<_> = fs::read_dir(store.root()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    fn missing_pin_is_not_found() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::at(dir.path());
        let pin: Pin = "ab".repeat(32).parse().unwrap();
        assert!(matches!(store.open_verified(pin), Err(StoreError::NotFound { .. })));
    }
}
