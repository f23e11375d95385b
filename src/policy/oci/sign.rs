//! cosign-compatible key-pair signatures: ECDSA P-256 with SHA-256, ASN.1 DER, base64, over
//! cosign's "simple signing" payload, which names the signed manifest digest. The payload is
//! the layer of a manifest tagged `sha256-<hex>.sig` in the same repository, the signature its
//! `dev.cosignproject.cosign/signature` annotation — so `cosign sign --key` /
//! `cosign verify --key` and cachelock read each other's signatures.
//!
//! Keys are PEM: private keys unencrypted PKCS#8 (`PRIVATE KEY`, what `openssl genpkey`
//! writes) or SEC1 (`EC PRIVATE KEY`, `openssl ecparam -genkey`); public keys SPKI
//! (`PUBLIC KEY`, like `cosign.pub` or `openssl pkey -pubout`).

use std::path::{Path, PathBuf};

use base64::Engine as _;
use p256::ecdsa::signature::{Signer, Verifier};
use p256::ecdsa::{Signature, SigningKey, VerifyingKey};
use p256::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePublicKey};
use serde::{Deserialize, Serialize};

/// Media type of the payload layer.
pub const PAYLOAD_MEDIA_TYPE: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
/// The annotation holding the base64 signature.
pub const SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";
/// `critical.type` of a cosign image signature.
pub const SIGNATURE_TYPE: &str = "cosign container image signature";
/// Largest key file read.
const MAX_KEY_BYTES: usize = 64 * 1024;

/// A public key that verifies signatures, with where it came from.
#[derive(Debug, Clone)]
pub struct PublicKey {
    key: VerifyingKey,
    /// The file it was read from.
    pub path: PathBuf,
    /// `sha256:<hex>` of its SPKI DER encoding: the same key has the same fingerprint whatever
    /// file holds it.
    pub fingerprint: String,
}

impl PublicKey {
    /// `PATH (sha256:0123456789abcdef…)`: how messages and `status` name a key.
    pub fn describe(&self) -> String {
        format!("{} ({}…)", self.path.display(), &self.fingerprint[..23])
    }
}

/// The private key of `policy sign` / `policy push --sign-key`.
pub struct PrivateKey {
    key: SigningKey,
    /// The file it was read from.
    pub path: PathBuf,
}

impl std::fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PrivateKey({}, <redacted>)", self.path.display())
    }
}

impl PrivateKey {
    /// The matching public key.
    pub fn public(&self) -> PublicKey {
        public_key(*self.key.verifying_key(), self.path.clone())
    }
}

fn public_key(key: VerifyingKey, path: PathBuf) -> PublicKey {
    let der = key
        .to_public_key_der()
        .expect("a P-256 public key encodes as SPKI");
    PublicKey {
        key,
        path,
        fingerprint: format!(
            "sha256:{}",
            crate::policy::cache::sha256_hex(der.as_bytes())
        ),
    }
}

/// The text of the PEM block labelled `label` in `text` (files may hold several blocks, e.g.
/// `EC PARAMETERS` before `EC PRIVATE KEY`).
fn pem_block<'a>(text: &'a str, label: &str) -> Option<&'a str> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = text.find(&begin)?;
    let stop = text[start..].find(&end)? + start + end.len();
    Some(&text[start..stop])
}

fn read_key_file(path: &Path) -> Result<String, String> {
    crate::config::read_text(path)
        .map_err(|e| format!("cannot read key {}: {e}", path.display()))
        .and_then(|t| {
            if t.len() > MAX_KEY_BYTES {
                Err(format!("key {} is larger than 64 KiB", path.display()))
            } else {
                Ok(t)
            }
        })
}

/// Reads an SPKI `PUBLIC KEY` PEM file holding a P-256 key.
pub fn load_public(path: &Path) -> Result<PublicKey, String> {
    let text = read_key_file(path)?;
    let block = pem_block(&text, "PUBLIC KEY").ok_or_else(|| {
        format!(
            "key {} holds no `PUBLIC KEY` PEM block (a public key as `cosign.pub` or `openssl pkey -pubout` writes it)",
            path.display()
        )
    })?;
    let key = VerifyingKey::from_public_key_pem(block).map_err(|e| {
        format!(
            "key {} is not an ECDSA P-256 public key ({e}); cosign key pairs and `openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256` make one",
            path.display()
        )
    })?;
    Ok(public_key(key, path.to_path_buf()))
}

/// Reads an unencrypted P-256 private key: PKCS#8 `PRIVATE KEY` or SEC1 `EC PRIVATE KEY`.
pub fn load_private(path: &Path) -> Result<PrivateKey, String> {
    let text = read_key_file(path)?;
    let bad = |e: String| {
        format!(
            "key {} is not an ECDSA P-256 private key ({e}); make one with `openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out KEY`",
            path.display()
        )
    };
    let key = if let Some(b) = pem_block(&text, "PRIVATE KEY") {
        SigningKey::from_pkcs8_pem(b).map_err(|e| bad(e.to_string()))?
    } else if let Some(b) = pem_block(&text, "EC PRIVATE KEY") {
        SigningKey::from(p256::SecretKey::from_sec1_pem(b).map_err(|e| bad(e.to_string()))?)
    } else if text.contains("ENCRYPTED SIGSTORE PRIVATE KEY")
        || text.contains("ENCRYPTED COSIGN PRIVATE KEY")
        || text.contains("ENCRYPTED PRIVATE KEY")
    {
        return Err(format!(
            "key {} is encrypted; cachelock reads unencrypted PKCS#8 or SEC1 PEM keys (e.g. `openssl pkey -in KEY -out PLAIN.pem`, kept where only the signer can read it)",
            path.display()
        ));
    } else {
        return Err(bad("no `PRIVATE KEY` or `EC PRIVATE KEY` PEM block".into()));
    };
    Ok(PrivateKey {
        key,
        path: path.to_path_buf(),
    })
}

/// cosign's simple-signing payload (field order as cosign writes it).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Payload {
    /// What is signed.
    pub critical: Critical,
    /// Free annotations (null when none).
    pub optional: Option<serde_json::Map<String, serde_json::Value>>,
}

/// The signed claims.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Critical {
    /// The repository signed for.
    pub identity: Identity,
    /// The manifest signed.
    pub image: Image,
    /// Always [`SIGNATURE_TYPE`].
    #[serde(rename = "type")]
    pub kind: String,
}

/// `critical.identity`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Identity {
    /// `host/repository`.
    #[serde(rename = "docker-reference")]
    pub docker_reference: String,
}

/// `critical.image`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Image {
    /// `sha256:<hex>` of the signed manifest.
    #[serde(rename = "docker-manifest-digest")]
    pub docker_manifest_digest: String,
}

/// The payload cosign signs for the manifest `digest` of `docker_reference` (`host/repo`).
pub fn payload(docker_reference: &str, digest: &str) -> Vec<u8> {
    let p = Payload {
        critical: Critical {
            identity: Identity {
                docker_reference: docker_reference.to_string(),
            },
            image: Image {
                docker_manifest_digest: digest.to_string(),
            },
            kind: SIGNATURE_TYPE.to_string(),
        },
        optional: None,
    };
    serde_json::to_vec(&p).expect("the payload serializes")
}

/// Signs `payload`: base64 of the DER signature (what the annotation holds).
pub fn sign(key: &PrivateKey, payload: &[u8]) -> String {
    let sig: Signature = key.key.sign(payload);
    base64::engine::general_purpose::STANDARD.encode(sig.to_der().as_bytes())
}

/// One signature found beside a manifest: the payload and its base64 signature.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Found {
    /// The payload's bytes, base64.
    pub payload: String,
    /// The annotation's value.
    pub signature: String,
}

/// Why no signature verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No signature at all.
    Unsigned,
    /// Signatures exist, none by a configured key.
    WrongKey(usize),
    /// A configured key signed, but for another manifest (a signature copied from another
    /// artifact).
    OtherDigest(String),
    /// Something that is not a cosign signature.
    Malformed(String),
}

impl Refusal {
    /// The reason, in words.
    pub fn describe(&self, keys: &[PublicKey]) -> String {
        let names: Vec<String> = keys.iter().map(PublicKey::describe).collect();
        match self {
            Refusal::Unsigned => "it is not signed (no cosign signature tag sha256-<digest>.sig in its repository)".into(),
            Refusal::WrongKey(n) => format!(
                "none of its {n} signature(s) verifies with the configured key(s) {}",
                names.join(", ")
            ),
            Refusal::OtherDigest(d) => format!(
                "its signature by a configured key is for another manifest ({d}): refusing a signature copied from another artifact"
            ),
            Refusal::Malformed(m) => format!("its signature is malformed: {m}"),
        }
    }
}

/// The first key of `keys` that signed `digest` among `found`.
pub fn verify<'k>(
    keys: &'k [PublicKey],
    found: &[Found],
    digest: &str,
) -> Result<&'k PublicKey, Refusal> {
    if found.is_empty() {
        return Err(Refusal::Unsigned);
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut refusal = Refusal::WrongKey(found.len());
    for f in found {
        let (Ok(payload), Ok(der)) = (b64.decode(&f.payload), b64.decode(f.signature.trim()))
        else {
            refusal = Refusal::Malformed("not base64".into());
            continue;
        };
        let Ok(sig) = Signature::from_der(&der) else {
            refusal = Refusal::Malformed("not an ASN.1 DER ECDSA signature".into());
            continue;
        };
        // Signers other than RustCrypto (Go, OpenSSL) may give the high-S form; both verify.
        let sig = sig.normalize_s().unwrap_or(sig);
        let Some(key) = keys.iter().find(|k| k.key.verify(&payload, &sig).is_ok()) else {
            continue;
        };
        match serde_json::from_slice::<Payload>(&payload) {
            Ok(p) if p.critical.kind != SIGNATURE_TYPE => {
                refusal = Refusal::Malformed(format!("payload type {:?}", p.critical.kind))
            }
            Ok(p) if p.critical.image.docker_manifest_digest == digest => return Ok(key),
            Ok(p) => refusal = Refusal::OtherDigest(p.critical.image.docker_manifest_digest),
            Err(e) => refusal = Refusal::Malformed(format!("payload is not cosign's JSON: {e}")),
        }
    }
    Err(refusal)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keypair(dir: &Path, name: &str) -> (PrivateKey, PublicKey) {
        let key = SigningKey::from_slice(&sha2_of(name.as_bytes())).unwrap();
        let pem = key
            .to_pkcs8_pem(p256::pkcs8::LineEnding::LF)
            .unwrap()
            .to_string();
        let path = dir.join(format!("{name}.key"));
        std::fs::write(&path, pem).unwrap();
        let private = load_private(&path).unwrap();
        let pub_pem = private
            .key
            .verifying_key()
            .to_public_key_pem(p256::pkcs8::LineEnding::LF)
            .unwrap();
        let pub_path = dir.join(format!("{name}.pub"));
        std::fs::write(&pub_path, pub_pem).unwrap();
        (private, load_public(&pub_path).unwrap())
    }

    fn sha2_of(b: &[u8]) -> [u8; 32] {
        use sha2::Digest;
        sha2::Sha256::digest(b).into()
    }

    use p256::pkcs8::EncodePrivateKey;

    const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

    #[test]
    fn the_payload_is_cosigns() {
        assert_eq!(
            String::from_utf8(payload("reg:5000/team/p", D1)).unwrap(),
            format!(
                r#"{{"critical":{{"identity":{{"docker-reference":"reg:5000/team/p"}},"image":{{"docker-manifest-digest":"{D1}"}},"type":"cosign container image signature"}},"optional":null}}"#
            )
        );
    }

    #[test]
    fn signatures_verify_with_the_right_key_for_the_right_digest_only() {
        let dir = tempfile::tempdir().unwrap();
        let (a, a_pub) = keypair(dir.path(), "a");
        let (_, b_pub) = keypair(dir.path(), "b");
        let b64 = base64::engine::general_purpose::STANDARD;
        let p = payload("h/r", D1);
        let found = vec![Found {
            payload: b64.encode(&p),
            signature: sign(&a, &p),
        }];
        let keys = [b_pub.clone(), a_pub.clone()];
        assert_eq!(
            verify(&keys, &found, D1).unwrap().fingerprint,
            a_pub.fingerprint
        );
        assert_eq!(a.public().fingerprint, a_pub.fingerprint);
        assert_eq!(
            verify(std::slice::from_ref(&b_pub), &found, D1).unwrap_err(),
            Refusal::WrongKey(1)
        );
        assert_eq!(
            verify(&keys, &found, D2).unwrap_err(),
            Refusal::OtherDigest(D1.into())
        );
        assert_eq!(verify(&keys, &[], D1).unwrap_err(), Refusal::Unsigned);
        // A payload changed after signing does not verify.
        let mut tampered = p.clone();
        tampered[10] ^= 1;
        let bad = vec![Found {
            payload: b64.encode(&tampered),
            signature: found[0].signature.clone(),
        }];
        assert_eq!(verify(&keys, &bad, D1).unwrap_err(), Refusal::WrongKey(1));
        assert!(a_pub.describe().contains("a.pub (sha256:"));
    }

    #[test]
    fn sec1_keys_with_parameters_and_bad_keys() {
        let dir = tempfile::tempdir().unwrap();
        let key = SigningKey::from_slice(&sha2_of(b"sec1")).unwrap();
        let sec1 = p256::SecretKey::from(key)
            .to_sec1_pem(p256::pkcs8::LineEnding::LF)
            .unwrap();
        let path = dir.path().join("ec.pem");
        std::fs::write(
            &path,
            format!(
                "-----BEGIN EC PARAMETERS-----\nBggqhkjOPQMBBw==\n-----END EC PARAMETERS-----\n{}",
                &*sec1
            ),
        )
        .unwrap();
        assert!(load_private(&path).is_ok());
        std::fs::write(&path, "-----BEGIN ENCRYPTED SIGSTORE PRIVATE KEY-----\nx\n-----END ENCRYPTED SIGSTORE PRIVATE KEY-----\n").unwrap();
        assert!(load_private(&path).unwrap_err().contains("encrypted"));
        std::fs::write(&path, "hello").unwrap();
        assert!(load_public(&path).unwrap_err().contains("PUBLIC KEY"));
    }
}
