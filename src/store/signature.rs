//! Signed versions: who built a version, in a form every host checks.
//!
//! The deploy host signs a **statement** about each version it builds (its
//! root ID, its parent, labels, author and time) with an ed25519 **deploy
//! key**; the statement and its signatures are kept beside the version
//! record as `versions/<id>.sig` and served like it. An agent configured
//! with the public keys it trusts ([`Trust`]) switches only to a version
//! whose statement names that very version and carries a valid signature
//! by a trusted key that is not revoked. The format is specified in
//! store-format.md ("Signed versions").
//!
//! The signature covers the statement's bytes exactly as stored, so no
//! canonical form is needed: a verifier parses the bytes it verified.

use std::fmt;
use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use serde::{Deserialize, Serialize};

use super::id::VersionId;

/// Version of the `.sig` file format.
pub const SIG_FORMAT: u32 = 1;
/// What the statement's `scap` field says.
pub const STATEMENT_KIND: &str = "version-statement-v1";
/// Prefixed to the statement's bytes before signing: a signature made for
/// anything else can never pass as a version signature.
const CONTEXT: &[u8] = b"scap signed version statement v1\0";
/// Largest `.sig` file accepted (a few signatures are a few hundred bytes).
pub const MAX_SIG_FILE: usize = 64 << 10;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignatureError {
    #[error(
        "version {version} is not signed: sign it on the deploy host (`scap sign {short}`) with a key this host trusts",
        short = version.short()
    )]
    Unsigned { version: VersionId },
    #[error(
        "version {version}: its signature file is malformed ({why}): re-sign it on the deploy host"
    )]
    Malformed { version: VersionId, why: String },
    #[error(
        "version {version}: the signed statement is about version {signed}, not this one: refusing it"
    )]
    OtherVersion {
        version: VersionId,
        signed: VersionId,
    },
    #[error(
        "version {version} is signed only by key(s) {keys} that this host does not trust (it trusts {trusted}): re-sign it with a trusted key, or add the key with --trusted-key"
    )]
    Untrusted {
        version: VersionId,
        keys: String,
        trusted: String,
    },
    #[error(
        "version {version} is signed by key {key}, which is revoked on this host: re-sign it with a trusted key"
    )]
    Revoked { version: VersionId, key: KeyId },
    #[error(
        "version {version}: the signature by key {key} does not verify: the statement or signature was altered"
    )]
    BadSignature { version: VersionId, key: KeyId },
    #[error("{path}: {why}")]
    Key { path: String, why: String },
    #[error("deploy order: {0}")]
    Order(String),
    #[error(
        "version {version}: {kept}; and {sources}: re-sign it on the deploy host with a key this host trusts (`scap sign`), and make the caches in front of it fetch the new .sig"
    )]
    NoneAccepted {
        version: VersionId,
        /// Why the signature at hand (kept, or sent) is refused.
        kept: String,
        /// What the sources said.
        sources: String,
    },
}

/// A key's short ID: the first 8 bytes of BLAKE3 (derive-key context
/// `scap 2026-11-27 deploy key id v1`) of its 32-byte public key, as 16
/// hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId([u8; 8]);

impl KeyId {
    fn of(public: &[u8; 32]) -> KeyId {
        let h = blake3::Hasher::new_derive_key("scap 2026-11-27 deploy key id v1")
            .update(public)
            .finalize();
        KeyId(h.as_bytes()[..8].try_into().expect("8 bytes"))
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

impl std::str::FromStr for KeyId {
    type Err = String;

    fn from_str(s: &str) -> Result<KeyId, String> {
        let bad = || format!("{s:?} is not a key ID: expected 16 hex digits");
        if s.len() != 16 {
            return Err(bad());
        }
        let mut out = [0u8; 8];
        for (i, pair) in s.as_bytes().chunks(2).enumerate() {
            let hex = std::str::from_utf8(pair).map_err(|_| bad())?;
            out[i] = u8::from_str_radix(hex, 16).map_err(|_| bad())?;
        }
        Ok(KeyId(out))
    }
}

impl Serialize for KeyId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for KeyId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<KeyId, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A deploy key's public half: `scap-ed25519 <base64 of 32 bytes> [comment]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublicKey {
    pub id: KeyId,
    bytes: [u8; 32],
    pub comment: String,
}

impl PublicKey {
    pub fn parse(line: &str) -> Result<PublicKey, String> {
        let mut parts = line.split_whitespace();
        if parts.next() != Some("scap-ed25519") {
            return Err(
                "not a scap public key (expected a line `scap-ed25519 <base64> [comment]`)".into(),
            );
        }
        let b = B64
            .decode(parts.next().unwrap_or(""))
            .map_err(|e| format!("bad base64: {e}"))?;
        let bytes: [u8; 32] = b
            .try_into()
            .map_err(|_| "an ed25519 public key is 32 bytes".to_string())?;
        Ok(PublicKey {
            id: KeyId::of(&bytes),
            bytes,
            comment: parts.collect::<Vec<_>>().join(" "),
        })
    }

    pub fn load(path: &Path) -> Result<PublicKey, SignatureError> {
        let text = std::fs::read_to_string(path).map_err(|e| SignatureError::Key {
            path: path.display().to_string(),
            why: e.to_string(),
        })?;
        PublicKey::parse(text.trim()).map_err(|why| SignatureError::Key {
            path: path.display().to_string(),
            why,
        })
    }

    pub fn to_line(&self) -> String {
        format!("scap-ed25519 {} {}", B64.encode(self.bytes), self.comment)
            .trim_end()
            .to_string()
    }

    fn verify(&self, message: &[u8], sig: &[u8]) -> bool {
        UnparsedPublicKey::new(&ED25519, &self.bytes)
            .verify(message, sig)
            .is_ok()
    }
}

/// A deploy key's private half, from a PKCS#8 PEM file.
pub struct SigningKey {
    pair: Ed25519KeyPair,
    pub public: PublicKey,
}

const PEM_LABEL: &str = "PRIVATE KEY";

impl SigningKey {
    /// A new key: (PKCS#8 PEM of the private key, the public key).
    pub fn generate(comment: &str) -> Result<(String, PublicKey), SignatureError> {
        let rng = ring::rand::SystemRandom::new();
        let doc = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|e| SignatureError::Key {
            path: "(new key)".into(),
            why: e.to_string(),
        })?;
        let key = SigningKey::from_pkcs8(doc.as_ref(), comment, "(new key)")?;
        let b64 = B64.encode(doc.as_ref());
        let mut pem = format!("-----BEGIN {PEM_LABEL}-----\n");
        for line in b64.as_bytes().chunks(64) {
            pem.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
            pem.push('\n');
        }
        pem.push_str(&format!("-----END {PEM_LABEL}-----\n"));
        Ok((pem, key.public))
    }

    fn from_pkcs8(der: &[u8], comment: &str, shown: &str) -> Result<SigningKey, SignatureError> {
        let pair =
            Ed25519KeyPair::from_pkcs8_maybe_unchecked(der).map_err(|e| SignatureError::Key {
                path: shown.into(),
                why: format!("not an ed25519 private key (PKCS#8): {e}"),
            })?;
        let bytes: [u8; 32] = pair
            .public_key()
            .as_ref()
            .try_into()
            .expect("ed25519 public keys are 32 bytes");
        Ok(SigningKey {
            pair,
            public: PublicKey {
                id: KeyId::of(&bytes),
                bytes,
                comment: comment.to_string(),
            },
        })
    }

    /// Loads a private key file (which must not be readable by others).
    pub fn load(path: &Path) -> Result<SigningKey, SignatureError> {
        let shown = path.display().to_string();
        let err = |why: String| SignatureError::Key {
            path: shown.clone(),
            why,
        };
        crate::sys::check_private(path).map_err(err)?;
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let body: String = text
            .lines()
            .skip_while(|l| !l.starts_with(&format!("-----BEGIN {PEM_LABEL}")))
            .skip(1)
            .take_while(|l| !l.starts_with("-----END"))
            .collect();
        let der = B64
            .decode(body)
            .map_err(|e| err(format!("not a PEM private key: {e}")))?;
        SigningKey::from_pkcs8(&der, "", &shown)
    }

    /// Adds this key's signature over `doc`'s statement.
    pub fn sign_into(&self, doc: &mut SignedVersion) -> Result<(), SignatureError> {
        let statement = doc.statement_bytes()?;
        let sig = self.pair.sign(&message(&statement));
        doc.signatures.retain(|s| s.key != self.public.id);
        doc.signatures.push(Signature {
            key: self.public.id,
            sig: B64.encode(sig.as_ref()),
        });
        Ok(())
    }

    /// A new signed statement about a version.
    pub fn sign(&self, statement: &Statement) -> Result<SignedVersion, SignatureError> {
        let mut doc = SignedVersion {
            format: SIG_FORMAT,
            statement: B64.encode(serde_json::to_vec(statement).expect("serializes")),
            signatures: Vec::new(),
        };
        self.sign_into(&mut doc)?;
        Ok(doc)
    }
}

impl SigningKey {
    /// A deploy order for one host, signed by this key.
    pub fn sign_order(&self, order: &Order) -> SignedOrder {
        let bytes = serde_json::to_vec(order).expect("serializes");
        let mut m = ORDER_CONTEXT.to_vec();
        m.extend_from_slice(&bytes);
        let sig = self.pair.sign(&m);
        SignedOrder {
            statement: B64.encode(&bytes),
            signatures: vec![Signature {
                key: self.public.id,
                sig: B64.encode(sig.as_ref()),
            }],
        }
    }
}

/// What a deploy order's statement says: `scap`'s field.
pub const ORDER_KIND: &str = "deploy-order-v1";
/// Prefixed to an order's bytes before signing: an order's signature can
/// never pass as a version's, nor the other way round.
const ORDER_CONTEXT: &[u8] = b"scap signed deploy order v1\0";
/// Largest order accepted (one is about 400 bytes).
pub const MAX_ORDER_BYTES: usize = 4 << 10;

/// A deploy host's order to one host: switch to (or stage, or roll back
/// to) this version. Its `seq` is strictly increasing across every order
/// the deploy host gives; an agent takes an order only if it is newer
/// than the newest it took, so a replayed or stale request can never move
/// a host, while a revert (a version the host ran before) is just a newer
/// order. Specified in store-format.md ("Deploy orders").
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    /// Always [`ORDER_KIND`].
    pub scap: String,
    /// The host it is for (the agent's `--host`).
    pub host: String,
    pub version: VersionId,
    /// "sync", "stage" or "rollback".
    pub action: String,
    pub seq: u64,
    /// Unix seconds when it was given (for people).
    pub time: u64,
}

/// An order and its signatures, as sent inside a request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedOrder {
    /// The order's JSON bytes, exactly as signed, base64.
    pub statement: String,
    pub signatures: Vec<Signature>,
}

fn message(statement: &[u8]) -> Vec<u8> {
    let mut m = CONTEXT.to_vec();
    m.extend_from_slice(statement);
    m
}

/// What a signature vouches for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Statement {
    /// Always [`STATEMENT_KIND`].
    pub scap: String,
    pub version: VersionId,
    pub parent: Option<VersionId>,
    pub labels: Vec<String>,
    pub author: String,
    /// When it was built (Unix seconds): agents refuse a sync to a version
    /// older than the one they run (a replay); a rollback may go back.
    pub time: u64,
}

impl Statement {
    pub fn new(
        version: VersionId,
        parent: Option<VersionId>,
        labels: Vec<String>,
        author: &str,
        time: u64,
    ) -> Statement {
        Statement {
            scap: STATEMENT_KIND.into(),
            version,
            parent,
            labels,
            author: author.to_string(),
            time,
        }
    }
}

/// `versions/<id>.sig`: a statement and the signatures over its bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedVersion {
    pub format: u32,
    /// The statement's JSON bytes, exactly as signed, base64.
    pub statement: String,
    pub signatures: Vec<Signature>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signature {
    pub key: KeyId,
    /// The ed25519 signature over `CONTEXT ‖ statement bytes`, base64.
    pub sig: String,
}

impl SignedVersion {
    fn statement_bytes(&self) -> Result<Vec<u8>, SignatureError> {
        B64.decode(&self.statement)
            .map_err(|e| SignatureError::Key {
                path: "(statement)".into(),
                why: e.to_string(),
            })
    }

    /// Parses a `.sig` file (bounded, any bytes).
    pub fn parse(bytes: &[u8]) -> Result<SignedVersion, String> {
        if bytes.len() > MAX_SIG_FILE {
            return Err(format!("larger than {MAX_SIG_FILE} bytes"));
        }
        let doc: SignedVersion = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if doc.format > SIG_FORMAT {
            return Err(format!(
                "signature format v{}, this scap reads up to v{SIG_FORMAT}: upgrade scap",
                doc.format
            ));
        }
        Ok(doc)
    }

    /// The statement, unverified (for display).
    pub fn statement(&self) -> Option<Statement> {
        serde_json::from_slice(&self.statement_bytes().ok()?).ok()
    }
}

/// The keys a host trusts and the ones it has revoked.
#[derive(Clone, Debug, Default)]
pub struct Trust {
    pub keys: Vec<PublicKey>,
    pub revoked: Vec<KeyId>,
}

/// A statement that passed [`Trust::verify`], and the key that signed it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    pub statement: Statement,
    pub key: KeyId,
}

impl Trust {
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Checks that `doc` is an order for `host` to do `action` to
    /// `version`, signed by a trusted key that is not revoked; returns it.
    pub fn verify_order(
        &self,
        doc: &SignedOrder,
        host: &str,
        version: &VersionId,
        action: &str,
    ) -> Result<Order, SignatureError> {
        let bad = |why: String| SignatureError::Order(why);
        let bytes = B64
            .decode(&doc.statement)
            .map_err(|e| bad(format!("not base64: {e}")))?;
        if bytes.len() > MAX_ORDER_BYTES {
            return Err(bad(format!("larger than {MAX_ORDER_BYTES} bytes")));
        }
        let order: Order =
            serde_json::from_slice(&bytes).map_err(|e| bad(format!("malformed: {e}")))?;
        if order.scap != ORDER_KIND {
            return Err(bad(format!("not a deploy order ({:?})", order.scap)));
        }
        if order.host != host {
            return Err(bad(format!(
                "it is for host {:?}, not this host ({host}): refusing it",
                crate::text::clip(&order.host, 80)
            )));
        }
        if order.version != *version || order.action != action {
            return Err(bad(format!(
                "it orders {} {}, not {action} {}: refusing it",
                crate::text::clip(&order.action, 20),
                order.version.short(),
                version.short()
            )));
        }
        let mut m = ORDER_CONTEXT.to_vec();
        m.extend_from_slice(&bytes);
        let mut why = "it carries no signature".to_string();
        for s in &doc.signatures {
            if self.revoked.contains(&s.key) {
                why = format!(
                    "it is signed by key {}, which is revoked on this host",
                    s.key
                );
                continue;
            }
            let Some(key) = self.keys.iter().find(|k| k.id == s.key) else {
                why = format!(
                    "it is signed by key {}, which this host does not trust",
                    s.key
                );
                continue;
            };
            match B64.decode(&s.sig) {
                Ok(sig) if key.verify(&m, &sig) => return Ok(order),
                _ => why = format!("its signature by key {} does not verify", s.key),
            }
        }
        Err(bad(format!("{why}: refusing it")))
    }

    /// Checks that `doc` vouches for `version` with a valid signature by
    /// a trusted key that is not revoked.
    pub fn verify(
        &self,
        version: &VersionId,
        doc: Option<&SignedVersion>,
    ) -> Result<Verified, SignatureError> {
        let Some(doc) = doc else {
            return Err(SignatureError::Unsigned { version: *version });
        };
        let malformed = |why: String| SignatureError::Malformed {
            version: *version,
            why,
        };
        let bytes = B64
            .decode(&doc.statement)
            .map_err(|e| malformed(format!("statement is not base64: {e}")))?;
        let statement: Statement =
            serde_json::from_slice(&bytes).map_err(|e| malformed(format!("statement: {e}")))?;
        if statement.scap != STATEMENT_KIND {
            return Err(malformed(format!(
                "not a version statement ({:?})",
                statement.scap
            )));
        }
        if statement.version != *version {
            return Err(SignatureError::OtherVersion {
                version: *version,
                signed: statement.version,
            });
        }
        if doc.signatures.is_empty() {
            return Err(SignatureError::Unsigned { version: *version });
        }
        let msg = message(&bytes);
        let mut revoked = None;
        let mut bad = None;
        for s in &doc.signatures {
            if self.revoked.contains(&s.key) {
                revoked = Some(s.key);
                continue;
            }
            let Some(key) = self.keys.iter().find(|k| k.id == s.key) else {
                continue;
            };
            let Ok(sig) = B64.decode(&s.sig) else {
                bad = Some(s.key);
                continue;
            };
            if key.verify(&msg, &sig) {
                return Ok(Verified {
                    statement,
                    key: s.key,
                });
            }
            bad = Some(s.key);
        }
        if let Some(key) = bad {
            return Err(SignatureError::BadSignature {
                version: *version,
                key,
            });
        }
        if let Some(key) = revoked {
            return Err(SignatureError::Revoked {
                version: *version,
                key,
            });
        }
        let list = |ids: Vec<String>| {
            if ids.is_empty() {
                "none".to_string()
            } else {
                ids.join(", ")
            }
        };
        Err(SignatureError::Untrusted {
            version: *version,
            keys: list(doc.signatures.iter().map(|s| s.key.to_string()).collect()),
            trusted: list(self.keys.iter().map(|k| k.id.to_string()).collect()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ObjectKind;

    fn v(s: &[u8]) -> VersionId {
        VersionId::new(ObjectKind::Tree.hash(s))
    }

    #[test]
    fn sign_verify_and_every_refusal() {
        let (pem_a, pub_a) = SigningKey::generate("a").unwrap();
        let (_, pub_b) = SigningKey::generate("b").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.key");
        std::fs::write(&path, &pem_a).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        let a = SigningKey::load(&path).unwrap();
        assert_eq!(a.public.id, pub_a.id);
        assert_eq!(PublicKey::parse(&pub_a.to_line()).unwrap().id, pub_a.id);
        let (v1, v2) = (v(b"1"), v(b"2"));
        let doc = a
            .sign(&Statement::new(v1, None, vec!["x".into()], "jdoe", 5))
            .unwrap();
        let trust = Trust {
            keys: vec![pub_a.clone(), pub_b.clone()],
            revoked: vec![],
        };
        assert_eq!(trust.verify(&v1, Some(&doc)).unwrap().key, pub_a.id);
        // Over another version, unsigned, untrusted, revoked, altered.
        assert!(matches!(
            trust.verify(&v2, Some(&doc)),
            Err(SignatureError::OtherVersion { .. })
        ));
        assert!(matches!(
            trust.verify(&v1, None),
            Err(SignatureError::Unsigned { .. })
        ));
        let only_b = Trust {
            keys: vec![pub_b.clone()],
            revoked: vec![],
        };
        let e = only_b.verify(&v1, Some(&doc)).unwrap_err();
        assert!(e.to_string().contains(&pub_a.id.to_string()), "{e}");
        let revoked = Trust {
            keys: vec![pub_a.clone()],
            revoked: vec![pub_a.id],
        };
        assert!(matches!(
            revoked.verify(&v1, Some(&doc)),
            Err(SignatureError::Revoked { .. })
        ));
        let mut altered = doc.clone();
        let st = Statement::new(v1, None, vec!["y".into()], "mallory", 5);
        altered.statement = B64.encode(serde_json::to_vec(&st).unwrap());
        assert!(matches!(
            trust.verify(&v1, Some(&altered)),
            Err(SignatureError::BadSignature { .. })
        ));
        // Garbage never panics.
        for junk in [&b""[..], b"{}", b"[1,2]", &[0xff; 70_000]] {
            let _ = SignedVersion::parse(junk);
        }
    }
}
