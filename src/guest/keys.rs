//! Per-run SSH keys, generated on the host: the client key reprovm logs in
//! with and the host key the guest's sshd must present. Both reach the guest
//! through QEMU fw_cfg; nothing is trusted on first use.

use ssh_key::{Algorithm, LineEnding, PrivateKey};
use zeroize::Zeroizing;

/// The two key pairs of one run.
pub struct RunKeys {
    /// The guest's host private key (OpenSSH format), for fw_cfg.
    pub host_private: Zeroizing<String>,
    /// The host key's public blob as it appears on the wire.
    pub host_public_blob: Vec<u8>,
    /// The client's private key (OpenSSH format), kept in memory only.
    pub client_private: Zeroizing<String>,
    /// The client's public key line, the guest's authorized_keys.
    pub client_public_line: String,
}

/// Key generation failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot generate the per-run SSH keys")]
pub struct KeyError(#[source] ssh_key::Error);

impl RunKeys {
    /// Generates fresh ed25519 host and client keys.
    pub fn generate() -> Result<RunKeys, KeyError> {
        let mut rng = rand_core::OsRng;
        let host = PrivateKey::random(&mut rng, Algorithm::Ed25519).map_err(KeyError)?;
        let client = PrivateKey::random(&mut rng, Algorithm::Ed25519).map_err(KeyError)?;
        Ok(RunKeys {
            host_private: host.to_openssh(LineEnding::LF).map_err(KeyError)?,
            host_public_blob: host.public_key().to_bytes().map_err(KeyError)?,
            client_private: client.to_openssh(LineEnding::LF).map_err(KeyError)?,
            client_public_line: format!("{}\n", client.public_key().to_openssh().map_err(KeyError)?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_fresh_and_well_formed() {
        let a = RunKeys::generate().unwrap();
        let b = RunKeys::generate().unwrap();
        assert_ne!(a.host_public_blob, b.host_public_blob);
        assert!(a.client_public_line.starts_with("ssh-ed25519 "));
        assert!(a.host_private.starts_with("-----BEGIN OPENSSH PRIVATE KEY-----"));
        // The wire blob starts with the length-prefixed algorithm name.
        assert_eq!(&a.host_public_blob[..15], b"\0\0\0\x0bssh-ed25519");
    }
}
