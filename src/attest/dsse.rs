//! DSSE envelopes (the Dead Simple Signing Envelope of in-toto):
//! `{"payloadType", "payload", "signatures": [{"keyid", "sig"}]}` with the
//! payload and signatures in base64, each signature an Ed25519 signature of
//! the pre-authentication encoding
//! `PAE(type, body) = "DSSEv1" SP LEN(type) SP type SP LEN(body) SP body`
//! (LEN: the byte length in ASCII decimal). reprovm writes the envelope as
//! one line of JSON, the keyid being the signer's `SHA256:` fingerprint.
//!
//! Reading is strict: unknown fields, a payload type other than
//! `application/vnd.in-toto+json`, non-canonical base64 and envelopes over
//! [`MAX_ENVELOPE`] are refused, and a signature counts only when its keyid
//! names a trusted key and that key verifies it.

use base64::engine::general_purpose::{STANDARD, URL_SAFE};
use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::attest::keys::{SigningKey, TrustedKeys};
use crate::attest::shown;

/// The payload type of in-toto statements.
pub const PAYLOAD_TYPE: &str = "application/vnd.in-toto+json";
/// The largest envelope read (16 MiB): a larger file is refused unread.
pub const MAX_ENVELOPE: u64 = 16 << 20;
/// The most signatures one envelope may carry (each costs a verification).
pub const MAX_SIGNATURES: usize = 64;

/// A DSSE envelope as it is stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Envelope {
    /// How to read the payload ([`PAYLOAD_TYPE`]).
    pub payload_type: String,
    /// The payload, base64.
    pub payload: String,
    /// The signatures.
    pub signatures: Vec<Signature>,
}

/// One signature of an envelope.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Signature {
    /// The signer's key: its `SHA256:` fingerprint.
    #[serde(default)]
    pub keyid: String,
    /// The signature of the PAE, base64.
    pub sig: String,
}

/// An envelope that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    /// Not a DSSE envelope (truncated, not JSON, missing or unknown fields).
    #[error("not a DSSE envelope: {0}")]
    Json(String),
    /// A payload type other than in-toto's.
    #[error("payload type \"{found}\" is not {PAYLOAD_TYPE}")]
    PayloadType {
        /// The type it declares, escaped.
        found: String,
    },
    /// A field that is not canonical base64.
    #[error("{field} is not base64")]
    Base64 {
        /// Which field.
        field: &'static str,
    },
    /// No signature at all.
    #[error("the envelope is not signed")]
    Unsigned,
    /// More signatures than anyone needs.
    #[error("{count} signatures: more than {MAX_SIGNATURES} are refused")]
    TooManySignatures {
        /// How many it carries.
        count: usize,
    },
}

/// What the signatures of an envelope say, given the trusted keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SignatureCheck {
    /// Signed by these trusted keys (indices into [`TrustedKeys::keys`]), each
    /// signature naming a trusted key valid.
    Trusted(Vec<usize>),
    /// A signature names a trusted key that does not verify it: the
    /// envelope was changed after signing, or forged.
    BadSignature {
        /// The trusted key named.
        keyid: String,
    },
    /// No signature names a trusted key.
    UnknownKeys {
        /// The keyids named, escaped.
        keyids: Vec<String>,
    },
}

/// The pre-authentication encoding DSSE signs.
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = format!("DSSEv1 {} {payload_type} {} ", payload_type.len(), payload.len()).into_bytes();
    out.extend_from_slice(payload);
    out
}

/// Decodes standard or URL-safe base64, padded and canonical.
fn base64(text: &str, field: &'static str) -> Result<Vec<u8>, EnvelopeError> {
    STANDARD.decode(text).or_else(|_| URL_SAFE.decode(text)).map_err(|_| EnvelopeError::Base64 { field })
}

impl Envelope {
    /// An in-toto envelope of `payload` signed with `key`.
    pub fn sign(payload: &[u8], key: &SigningKey) -> Envelope {
        let sig = key.sign(&pae(PAYLOAD_TYPE, payload));
        Envelope {
            payload_type: PAYLOAD_TYPE.to_string(),
            payload: STANDARD.encode(payload),
            signatures: vec![Signature { keyid: key.fingerprint().to_string(), sig: STANDARD.encode(sig) }],
        }
    }

    /// The envelope as reprovm writes it: one line of JSON.
    pub fn to_file_bytes(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec(self).expect("an envelope serializes");
        out.push(b'\n');
        out
    }

    /// Parses an envelope (already read within [`MAX_ENVELOPE`]) and returns
    /// it with its decoded payload.
    pub fn parse(bytes: &[u8]) -> Result<(Envelope, Vec<u8>), EnvelopeError> {
        let envelope: Envelope = serde_json::from_slice(bytes).map_err(|e| EnvelopeError::Json(e.to_string()))?;
        if envelope.payload_type != PAYLOAD_TYPE {
            return Err(EnvelopeError::PayloadType { found: shown(&envelope.payload_type) });
        }
        if envelope.signatures.is_empty() {
            return Err(EnvelopeError::Unsigned);
        }
        if envelope.signatures.len() > MAX_SIGNATURES {
            return Err(EnvelopeError::TooManySignatures { count: envelope.signatures.len() });
        }
        let payload = base64(&envelope.payload, "payload")?;
        Ok((envelope, payload))
    }

    /// Checks every signature against the trusted keys.
    pub fn check(&self, payload: &[u8], trusted: &TrustedKeys) -> Result<SignatureCheck, EnvelopeError> {
        let message = pae(&self.payload_type, payload);
        let mut signers = Vec::new();
        let mut unknown = Vec::new();
        for signature in &self.signatures {
            let sig = base64(&signature.sig, "sig")?;
            match trusted.keys.iter().position(|k| k.fingerprint == signature.keyid) {
                Some(i) if trusted.keys[i].verifies(&message, &sig) => {
                    if !signers.contains(&i) {
                        signers.push(i);
                    }
                }
                Some(i) => return Ok(SignatureCheck::BadSignature { keyid: trusted.keys[i].fingerprint.clone() }),
                None => unknown.push(shown(&signature.keyid)),
            }
        }
        Ok(if signers.is_empty() { SignatureCheck::UnknownKeys { keyids: unknown } } else { SignatureCheck::Trusted(signers) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attest::keys::tests::new_key;
    use std::path::Path;

    #[test]
    fn pae_is_the_specification_s() {
        // The DSSE specification's test vector.
        assert_eq!(pae("http://example.com/HelloWorld", b"hello world"), b"DSSEv1 29 http://example.com/HelloWorld 11 hello world");
        assert_eq!(pae("", b""), b"DSSEv1 0  0 ");
    }

    #[test]
    fn signed_envelopes_verify_and_every_one_byte_change_fails() {
        let dir = tempfile::tempdir().unwrap();
        let (alice_file, alice_pub) = new_key(dir.path(), "alice", None);
        let (_, bob_pub) = new_key(dir.path(), "bob", None);
        let alice = SigningKey::load_with(&alice_file, || None).unwrap();
        let trusted = TrustedKeys::parse(&format!("{alice_pub}\n"), Path::new("k")).unwrap();
        let only_bob = TrustedKeys::parse(&format!("{bob_pub}\n"), Path::new("k")).unwrap();
        let bytes = Envelope::sign(br#"{"_type":"x"}"#, &alice).to_file_bytes();
        let (envelope, payload) = Envelope::parse(&bytes).unwrap();
        assert_eq!(payload, br#"{"_type":"x"}"#);
        assert_eq!(envelope.check(&payload, &trusted).unwrap(), SignatureCheck::Trusted(vec![0]));
        assert!(matches!(envelope.check(&payload, &only_bob).unwrap(), SignatureCheck::UnknownKeys { .. }));

        // Each byte of the file, flipped in its lowest bit: never trusted.
        for i in 0..bytes.len() {
            let mut changed = bytes.clone();
            changed[i] ^= 1;
            let trusted_still =
                Envelope::parse(&changed).and_then(|(e, p)| e.check(&p, &trusted)).is_ok_and(|c| matches!(c, SignatureCheck::Trusted(_)));
            assert!(!trusted_still, "byte {i} changed and the envelope still verifies: {}", String::from_utf8_lossy(&changed));
        }
        for truncated in [&bytes[..bytes.len() / 2], &b""[..]] {
            assert!(Envelope::parse(truncated).is_err());
        }
        let other_type = String::from_utf8(bytes.clone()).unwrap().replace(PAYLOAD_TYPE, "text/plain\\u001b[2J");
        let e = Envelope::parse(other_type.as_bytes()).unwrap_err().to_string();
        assert!(e.contains("text/plain\\x1b[2J"), "{e}");
        let extra = String::from_utf8(bytes).unwrap().replacen('{', r#"{"extra":1,"#, 1);
        assert!(Envelope::parse(extra.as_bytes()).unwrap_err().to_string().contains("unknown field"));
        let mut many = envelope.clone();
        many.signatures = vec![envelope.signatures[0].clone(); MAX_SIGNATURES + 1];
        assert!(Envelope::parse(&many.to_file_bytes()).unwrap_err().to_string().contains("more than 64"));
        many.signatures.truncate(2);
        let (twice, payload) = Envelope::parse(&many.to_file_bytes()).unwrap();
        assert_eq!(twice.check(&payload, &trusted).unwrap(), SignatureCheck::Trusted(vec![0]), "one key, counted once");
    }
}
