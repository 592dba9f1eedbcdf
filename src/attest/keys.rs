//! Keys: the OpenSSH Ed25519 private key a rebuilder signs with (the file
//! `ssh-keygen -t ed25519` writes, as for git's SSH signing; an encrypted
//! one is opened with `REPROVM_KEY_PASSPHRASE` or a terminal prompt), and
//! the `authorized_keys`-style file of public keys that names the trusted
//! rebuilders. A key is named by its OpenSSH SHA256 fingerprint
//! (`SHA256:<base64>`, as `ssh-keygen -lf` prints it): that is the keyid of
//! the DSSE signatures reprovm makes.

use std::fmt;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use ed25519_dalek::{Signer as _, VerifyingKey};
use ssh_key::{HashAlg, PrivateKey, PublicKey};
use zeroize::Zeroizing;

use crate::attest::{read_capped, ReadError};
use crate::escape::escape;

/// The environment variable holding the passphrase of an encrypted key.
pub const PASSPHRASE_ENV: &str = "REPROVM_KEY_PASSPHRASE";
/// The most bytes read of a key file or a trusted-keys file.
pub const MAX_KEY_FILE: u64 = 1 << 20;

/// A key file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The file cannot be read, or is too large.
    #[error(transparent)]
    Read(#[from] ReadError),
    /// Not an OpenSSH private key.
    #[error("{} is not an OpenSSH private key (expected the file `ssh-keygen -t ed25519` writes): {message}", file.display())]
    BadPrivateKey {
        /// The file.
        file: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// A key of another algorithm.
    #[error("{} holds a {algorithm} key: reprovm signs and verifies with Ed25519 keys only (ssh-keygen -t ed25519)", file.display())]
    NotEd25519 {
        /// The file.
        file: PathBuf,
        /// The algorithm it holds.
        algorithm: String,
    },
    /// The key is encrypted and no passphrase can be had.
    #[error("{} is encrypted: set {PASSPHRASE_ENV} or run on a terminal to be asked for its passphrase", file.display())]
    NeedsPassphrase {
        /// The file.
        file: PathBuf,
    },
    /// The passphrase does not open the key.
    #[error("cannot decrypt {}: wrong passphrase (or a damaged key file)", file.display())]
    WrongPassphrase {
        /// The file.
        file: PathBuf,
    },
    /// The public half stored in the file is not the private key's.
    #[error("{}: the public key stored in the file does not belong to its private key (a damaged or forged key file)", file.display())]
    Mismatch {
        /// The file.
        file: PathBuf,
    },
    /// A line of a trusted-keys file that is not a usable public key.
    #[error("{}:{line}: {why}: {text}", file.display())]
    BadLine {
        /// The file.
        file: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        why: String,
        /// The start of the line, escaped.
        text: String,
    },
    /// A trusted-keys file that names no key.
    #[error("{} names no key (expected `ssh-ed25519 <base64> [comment]` lines)", file.display())]
    NoKeys {
        /// The file.
        file: PathBuf,
    },
}

/// The OpenSSH SHA256 fingerprint of a public key: `SHA256:<base64>`.
pub fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

/// An Ed25519 private key to sign with. Its `Debug` shows the fingerprint
/// only; the secret is wiped when it is dropped.
#[derive(Clone)]
pub struct SigningKey {
    key: ed25519_dalek::SigningKey,
    fingerprint: String,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey").field("fingerprint", &self.fingerprint).finish_non_exhaustive()
    }
}

impl SigningKey {
    /// Reads an OpenSSH private key; an encrypted one is opened with
    /// [`PASSPHRASE_ENV`], else a passphrase asked on the terminal (only when
    /// stdin is one), else it is refused.
    pub fn load(file: &Path) -> Result<SigningKey, KeyError> {
        Self::load_with(file, || {
            if let Some(p) = std::env::var_os(PASSPHRASE_ENV) {
                return Some(Zeroizing::new(p.to_string_lossy().into_owned()));
            }
            if !std::io::stdin().is_terminal() {
                return None;
            }
            rpassword::prompt_password(format!("passphrase for {}: ", escape(&file.display().to_string()))).ok().map(Zeroizing::new)
        })
    }

    /// [`SigningKey::load`] with the passphrase from `passphrase` (None: none to be had).
    pub fn load_with(file: &Path, passphrase: impl FnOnce() -> Option<Zeroizing<String>>) -> Result<SigningKey, KeyError> {
        let bytes = Zeroizing::new(read_capped(file, MAX_KEY_FILE)?);
        let bad = |message: String| KeyError::BadPrivateKey { file: file.to_path_buf(), message };
        let mut key = PrivateKey::from_openssh(&*bytes).map_err(|e| bad(e.to_string()))?;
        if key.is_encrypted() {
            let passphrase = passphrase().ok_or_else(|| KeyError::NeedsPassphrase { file: file.to_path_buf() })?;
            key = key.decrypt(passphrase.as_bytes()).map_err(|_| KeyError::WrongPassphrase { file: file.to_path_buf() })?;
        }
        let Some(pair) = key.key_data().ed25519() else {
            let algorithm = key.algorithm().to_string();
            return Err(KeyError::NotEd25519 { file: file.to_path_buf(), algorithm });
        };
        let signing = ed25519_dalek::SigningKey::from(&pair.private);
        if signing.verifying_key().as_bytes() != &pair.public.0 || key.public_key().key_data().ed25519() != Some(&pair.public) {
            return Err(KeyError::Mismatch { file: file.to_path_buf() });
        }
        Ok(SigningKey { key: signing, fingerprint: fingerprint(key.public_key()) })
    }

    /// The key's `SHA256:` fingerprint.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The Ed25519 signature of `message`.
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.key.sign(message).to_bytes()
    }
}

/// One trusted rebuilder's public key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrustedKey {
    /// `SHA256:` fingerprint.
    pub fingerprint: String,
    /// The line's comment (often the rebuilder's address), as written.
    pub comment: String,
    key: VerifyingKey,
}

impl TrustedKey {
    /// Whether `sig` is this key's valid signature of `message` (strict
    /// Ed25519: no malleable signatures, no weak keys).
    pub fn verifies(&self, message: &[u8], sig: &[u8]) -> bool {
        ed25519_dalek::Signature::from_slice(sig).is_ok_and(|sig| self.key.verify_strict(message, &sig).is_ok())
    }

    /// The fingerprint and, when there is one, the comment, escaped.
    pub fn label(&self) -> String {
        if self.comment.is_empty() {
            self.fingerprint.clone()
        } else {
            format!("{} ({})", self.fingerprint, escape(&self.comment))
        }
    }
}

/// The trusted rebuilders: an `authorized_keys`-style file, one
/// `ssh-ed25519 <base64> [comment]` per line; blank lines and `#` comments
/// are skipped. Options, other algorithms and repeated keys are refused.
#[derive(Clone, Debug)]
pub struct TrustedKeys {
    /// The file.
    pub file: PathBuf,
    /// The keys in file order.
    pub keys: Vec<TrustedKey>,
}

impl TrustedKeys {
    /// Reads and parses `file`.
    pub fn load(file: &Path) -> Result<TrustedKeys, KeyError> {
        let bytes = read_capped(file, MAX_KEY_FILE)?;
        Self::parse(&String::from_utf8_lossy(&bytes), file)
    }

    /// Parses the text of `file`.
    pub fn parse(text: &str, file: &Path) -> Result<TrustedKeys, KeyError> {
        let mut keys: Vec<TrustedKey> = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let trimmed = line.trim();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            let bad = |why: String| KeyError::BadLine {
                file: file.to_path_buf(),
                line: i + 1,
                why,
                text: escape(&trimmed.chars().take(80).collect::<String>()).into_owned(),
            };
            let public = PublicKey::from_openssh(trimmed)
                .map_err(|e| bad(format!("not `ssh-ed25519 <base64> [comment]` (options are not supported): {e}")))?;
            let Some(ed) = public.key_data().ed25519() else {
                return Err(bad(format!("a {} key: only Ed25519 keys are supported", public.algorithm())));
            };
            let key = VerifyingKey::try_from(ed).map_err(|e| bad(format!("not a valid Ed25519 point: {e}")))?;
            if key.is_weak() {
                return Err(bad("a weak (small-order) Ed25519 key".into()));
            }
            let fingerprint = fingerprint(&public);
            if keys.iter().any(|k| k.fingerprint == fingerprint) {
                return Err(bad(format!("{fingerprint} is listed twice")));
            }
            keys.push(TrustedKey { fingerprint, comment: public.comment().to_string(), key });
        }
        if keys.is_empty() {
            return Err(KeyError::NoKeys { file: file.to_path_buf() });
        }
        Ok(TrustedKeys { file: file.to_path_buf(), keys })
    }

    /// The key whose fingerprint is `keyid`.
    pub fn get(&self, keyid: &str) -> Option<&TrustedKey> {
        self.keys.iter().find(|k| k.fingerprint == keyid)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A fresh key in OpenSSH format (optionally encrypted) and its public line.
    pub(crate) fn new_key(dir: &Path, name: &str, passphrase: Option<&str>) -> (PathBuf, String) {
        let mut key = PrivateKey::random(&mut rand_core::OsRng, ssh_key::Algorithm::Ed25519).unwrap();
        key.set_comment(format!("{name}@example.org"));
        if let Some(p) = passphrase {
            key = key.encrypt(&mut rand_core::OsRng, p).unwrap();
        }
        let path = dir.join(name);
        std::fs::write(&path, key.to_openssh(ssh_key::LineEnding::LF).unwrap().as_bytes()).unwrap();
        (path, key.public_key().to_openssh().unwrap())
    }

    #[test]
    fn signs_with_plain_and_encrypted_keys_and_verifies_with_the_public_line() {
        let dir = tempfile::tempdir().unwrap();
        let (plain, plain_pub) = new_key(dir.path(), "alice", None);
        let (locked, locked_pub) = new_key(dir.path(), "bob", Some("correct horse"));
        let trusted = TrustedKeys::parse(&format!("# rebuilders\n\n{plain_pub}\n  {locked_pub}\n"), Path::new("keys")).unwrap();
        assert_eq!(trusted.keys.len(), 2);
        assert_eq!(trusted.keys[0].comment, "alice@example.org");

        let alice = SigningKey::load_with(&plain, || panic!("a plain key needs no passphrase")).unwrap();
        assert!(alice.fingerprint().starts_with("SHA256:") && alice.fingerprint().len() == 50, "{}", alice.fingerprint());
        assert!(!format!("{alice:?}").contains("key:"), "Debug shows no secret");
        let sig = alice.sign(b"bytes");
        let key = trusted.get(alice.fingerprint()).unwrap();
        assert!(key.verifies(b"bytes", &sig));
        assert!(!key.verifies(b"bytez", &sig));
        assert!(!key.verifies(b"bytes", &sig[..63]));
        assert!(!trusted.keys[1].verifies(b"bytes", &sig));

        let e = SigningKey::load_with(&locked, || None).unwrap_err().to_string();
        assert!(e.contains("bob") && e.contains("is encrypted") && e.contains(PASSPHRASE_ENV), "{e}");
        let e = SigningKey::load_with(&locked, || Some(Zeroizing::new("wrong".into()))).unwrap_err().to_string();
        assert!(e.contains("wrong passphrase") && e.contains("bob"), "{e}");
        let bob = SigningKey::load_with(&locked, || Some(Zeroizing::new("correct horse".into()))).unwrap();
        assert!(trusted.get(bob.fingerprint()).unwrap().verifies(b"x", &bob.sign(b"x")));
    }

    #[test]
    fn hostile_key_files_are_refused_naming_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let (_, line) = new_key(dir.path(), "alice", None);
        let rsa = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQC7 x";
        for (text, needle) in [
            (format!("{line}\n{line}\n"), "keys:2: SHA256:"),
            (format!("command=\"rm -rf /\" {line}\n"), "keys:1: not `ssh-ed25519"),
            (format!("{rsa}\n"), "keys:1:"),
            ("ssh-ed25519 AAAA\u{1b}]52;c;x\u{7}\n".to_string(), "\\x1b]52"),
            ("# nothing\n".to_string(), "names no key"),
        ] {
            let e = TrustedKeys::parse(&text, Path::new("keys")).unwrap_err().to_string();
            assert!(e.contains(needle), "{needle}: {e}");
            assert!(!e.contains('\u{1b}'), "{e}");
        }
        let garbage = dir.path().join("garbage");
        std::fs::write(&garbage, "-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----\n").unwrap();
        let e = SigningKey::load_with(&garbage, || None).unwrap_err().to_string();
        assert!(e.contains("garbage") && e.contains("not an OpenSSH private key"), "{e}");
        let huge = dir.path().join("huge");
        std::fs::File::create(&huge).unwrap().set_len(MAX_KEY_FILE + 1).unwrap();
        let e = SigningKey::load_with(&huge, || None).unwrap_err().to_string();
        assert!(e.contains("huge") && e.contains("refused unread"), "{e}");
        let e = TrustedKeys::load(&dir.path().join("absent")).unwrap_err().to_string();
        assert!(e.contains("absent"), "{e}");
    }
}
