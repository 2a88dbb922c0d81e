//! Trust-root rotation: a chain of signed trust documents, in the spirit of
//! TUF's root chain (TUF specification 5.3).
//!
//! Version 1 is the root a device is provisioned with: the `[trust]` keys
//! of its config, or a trust document file. Each later version names the
//! keys, threshold and expiry that sign bundles from then on. A holder of
//! version N accepts version N+1 only if it is signed by a threshold of
//! N's keys **and** a threshold of its own keys, so neither a stolen old
//! key alone nor a new key alone can move the root. Versions are never
//! skipped (a device that missed some walks them in order) and never go
//! back. Only the newest version's expiry matters: an expired link in the
//! chain still proves the next one.
//!
//! The document travels as JSON text plus signatures over exactly those
//! bytes; it is decoded from the bytes that were checked, never from a
//! re-serialization.

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::bundle::SignatureEntry;
use crate::error::{Error, Result};
use crate::keys::KeyId;
use crate::verify::{TrustRoot, check_signatures};

/// Domain tag of trust-document signatures (a bundle signature can never
/// be replayed as one, nor the reverse).
pub const TRUST_DOMAIN: &[u8] = b"edgefleet-trust-v1\0";
/// Largest signed document accepted, checked before it is decoded.
pub const MAX_TRUST_BYTES: usize = 64 * 1024;
/// Most keys in one version, and most signatures on one document.
pub const MAX_KEYS: usize = 32;

/// The content of one trust version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustDoc {
    pub version: u64,
    /// Ed25519 public keys that sign bundles, 64 hex characters each.
    pub keys: Vec<String>,
    /// Distinct signatures required, on bundles and on the next version.
    pub threshold: u32,
    /// Unix seconds. Past it, devices install nothing until a newer
    /// version arrives (a frozen or stale root is refused, as in TUF).
    pub expires_at: u64,
}

impl TrustDoc {
    pub fn new(
        version: u64,
        keys: &[VerifyingKey],
        threshold: u32,
        expires_at: u64,
    ) -> Result<TrustDoc> {
        let doc = TrustDoc {
            version,
            keys: keys.iter().map(|k| hex::encode(k.as_bytes())).collect(),
            threshold,
            expires_at,
        };
        doc.validate()?;
        Ok(doc)
    }

    /// The public keys, decoded.
    pub fn public_keys(&self) -> Result<Vec<VerifyingKey>> {
        self.keys
            .iter()
            .map(|k| {
                let b: [u8; 32] = hex::decode(k)
                    .ok()
                    .and_then(|b| b.try_into().ok())
                    .ok_or_else(|| {
                        Error::malformed("trust document", format!("key {k:?} is not 64 hex"))
                    })?;
                VerifyingKey::from_bytes(&b).map_err(|e| Error::malformed("trust document", e))
            })
            .collect()
    }

    /// The keys and threshold as a trust root.
    pub fn root(&self) -> Result<TrustRoot> {
        self.validate()?;
        TrustRoot::new(self.public_keys()?, self.threshold as usize)
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |d: String| Err(Error::invalid("trust document", d));
        if self.version == 0 {
            return bad("version 0: versions start at 1".into());
        }
        if self.keys.is_empty() || self.keys.len() > MAX_KEYS {
            return bad(format!(
                "{} key(s): between 1 and {MAX_KEYS} required",
                self.keys.len()
            ));
        }
        let keys = self.public_keys()?;
        let mut ids: Vec<KeyId> = keys.iter().map(KeyId::of).collect();
        ids.sort();
        ids.dedup();
        if ids.len() != keys.len() {
            return bad("a key is listed twice".into());
        }
        if self.threshold == 0 || self.threshold as usize > keys.len() {
            return bad(format!(
                "threshold {} with {} key(s)",
                self.threshold,
                keys.len()
            ));
        }
        Ok(())
    }
}

/// One signature on a trust document.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct TrustSignature {
    /// sha256 of the public key, 64 hex characters.
    pub key_id: String,
    /// Ed25519 signature over the domain tag and `signed`, 128 hex characters.
    pub signature: String,
}

/// A trust document as it travels (desired state, `/api/v1/trust`, files).
/// Nothing in it has been checked: see [`Trusted::next`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SignedTrust {
    /// The trust document (`version`, `keys`, `threshold`, `expires_at`)
    /// as JSON text: signatures cover exactly these bytes.
    pub signed: String,
    pub signatures: Vec<TrustSignature>,
}

impl SignedTrust {
    /// Encodes `doc` and signs it with every given key.
    pub fn sign(doc: &TrustDoc, keys: &[&SigningKey]) -> Result<SignedTrust> {
        doc.validate()?;
        let signed = serde_json::to_string(doc).map_err(|e| Error::invalid("trust document", e))?;
        let mut st = SignedTrust {
            signed,
            signatures: Vec::new(),
        };
        for k in keys {
            st.add_signature(k);
        }
        Ok(st)
    }

    /// Adds (or replaces) `key`'s signature: co-signing by key holders on
    /// other machines.
    pub fn add_signature(&mut self, key: &SigningKey) {
        let key_id = hex::encode(KeyId::of(&key.verifying_key()).0);
        self.signatures.retain(|s| s.key_id != key_id);
        self.signatures.push(TrustSignature {
            key_id,
            signature: hex::encode(key.sign(&self.message()).to_bytes()),
        });
    }

    /// Decodes the document **without** checking signatures: for display
    /// and for ordering a chain before it is walked.
    pub fn peek_unverified(&self) -> Result<TrustDoc> {
        if self.signed.len() > MAX_TRUST_BYTES {
            return Err(Error::TooLarge {
                what: "trust document",
                size: self.signed.len() as u64,
                limit: MAX_TRUST_BYTES as u64,
            });
        }
        serde_json::from_str(&self.signed).map_err(|e| Error::malformed("trust document", e))
    }

    fn message(&self) -> Vec<u8> {
        let mut m = Vec::with_capacity(TRUST_DOMAIN.len() + self.signed.len());
        m.extend_from_slice(TRUST_DOMAIN);
        m.extend_from_slice(self.signed.as_bytes());
        m
    }

    fn entries(&self) -> Result<Vec<SignatureEntry>> {
        if self.signatures.len() > MAX_KEYS {
            return Err(Error::TooLarge {
                what: "trust signatures",
                size: self.signatures.len() as u64,
                limit: MAX_KEYS as u64,
            });
        }
        self.signatures
            .iter()
            .map(|s| {
                let id: [u8; 32] = hex::decode(&s.key_id)
                    .ok()
                    .and_then(|b| b.try_into().ok())
                    .ok_or_else(|| Error::malformed("trust signature", "key_id is not 64 hex"))?;
                let sig: [u8; 64] = hex::decode(&s.signature)
                    .ok()
                    .and_then(|b| b.try_into().ok())
                    .ok_or_else(|| {
                        Error::malformed("trust signature", "signature is not 128 hex")
                    })?;
                Ok(SignatureEntry {
                    key_id: KeyId(id),
                    signature: Signature::from_bytes(&sig),
                })
            })
            .collect()
    }
}

/// A verified position in a trust chain: the version, its root, and the
/// signed document that proved it (none for a configured version 1).
#[derive(Clone, Debug)]
pub struct Trusted {
    version: u64,
    root: TrustRoot,
    expires_at: Option<u64>,
    doc: Option<SignedTrust>,
}

impl Trusted {
    /// Version 1 from configured keys: no document, no expiry.
    pub fn genesis(root: TrustRoot) -> Trusted {
        Trusted {
            version: 1,
            root,
            expires_at: None,
            doc: None,
        }
    }

    /// A document a device is provisioned with, trusted as configured keys
    /// are; it must at least carry a threshold of its own keys' signatures.
    pub fn provisioned(st: &SignedTrust) -> Result<Trusted> {
        let doc = st.peek_unverified()?;
        let root = doc.root()?;
        check_signatures(&root, &st.message(), &st.entries()?)?;
        Ok(Trusted {
            version: doc.version,
            root,
            expires_at: Some(doc.expires_at),
            doc: Some(st.clone()),
        })
    }

    /// The rotation rule: `st` becomes the next version only if it is
    /// exactly this version + 1 and signed by a threshold of this version's
    /// keys and a threshold of its own.
    pub fn next(&self, st: &SignedTrust) -> Result<Trusted> {
        let peeked = st.peek_unverified()?.version;
        let refused = |detail: String| Error::RotationRefused {
            version: peeked,
            detail,
        };
        let entries = st.entries()?;
        let msg = st.message();
        // The current keys first: nothing from an untrusted party is
        // interpreted beyond its version number before this.
        check_signatures(&self.root, &msg, &entries).map_err(|e| {
            refused(format!(
                "not signed by a threshold of version {}'s keys: {e}",
                self.version
            ))
        })?;
        let doc = st.peek_unverified()?;
        if doc.version != self.version + 1 {
            return Err(refused(format!(
                "expected version {} after version {}",
                self.version + 1,
                self.version
            )));
        }
        let root = doc.root()?;
        check_signatures(&root, &msg, &entries)
            .map_err(|e| refused(format!("not signed by a threshold of its own keys: {e}")))?;
        Ok(Trusted {
            version: doc.version,
            root,
            expires_at: Some(doc.expires_at),
            doc: Some(st.clone()),
        })
    }

    /// Refuses a stale root: a version past its expiry signs nothing.
    pub fn check_fresh(&self, now: u64) -> Result<()> {
        match self.expires_at {
            Some(expires_at) if now >= expires_at => Err(Error::TrustExpired {
                version: self.version,
                expires_at,
                now,
            }),
            _ => Ok(()),
        }
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn root(&self) -> &TrustRoot {
        &self.root
    }

    pub fn expires_at(&self) -> Option<u64> {
        self.expires_at
    }

    /// The signed document (none for configured keys).
    pub fn document(&self) -> Option<&SignedTrust> {
        self.doc.as_ref()
    }
}

/// Walks from `from` through `docs` (any order; versions at or below
/// `from`'s are skipped, repeats too). Returns every version accepted, in
/// order, and the error that stopped the walk, if one did: a gap, a
/// document that breaks the rule, or one that cannot be read.
pub fn walk(from: &Trusted, docs: &[SignedTrust]) -> (Vec<Trusted>, Option<Error>) {
    let mut ahead: Vec<(u64, &SignedTrust)> = Vec::new();
    for st in docs {
        match st.peek_unverified() {
            Ok(d) if d.version > from.version => ahead.push((d.version, st)),
            Ok(_) => {}
            Err(e) => return (Vec::new(), Some(e)),
        }
    }
    ahead.sort_by_key(|(v, _)| *v);
    ahead.dedup_by_key(|(v, _)| *v);
    let mut accepted: Vec<Trusted> = Vec::new();
    for (_, st) in ahead {
        let cur = accepted.last().unwrap_or(from);
        match cur.next(st) {
            Ok(t) => accepted.push(t),
            Err(e) => return (accepted, Some(e)),
        }
    }
    (accepted, None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::signing_key_from_seed;

    fn key(n: u8) -> SigningKey {
        signing_key_from_seed([n; 32])
    }

    fn genesis(keys: &[&SigningKey], threshold: usize) -> Trusted {
        Trusted::genesis(TrustRoot::new(keys.iter().map(|k| k.verifying_key()), threshold).unwrap())
    }

    fn doc(version: u64, keys: &[&SigningKey], threshold: u32) -> TrustDoc {
        let pubs: Vec<_> = keys.iter().map(|k| k.verifying_key()).collect();
        TrustDoc::new(version, &pubs, threshold, 4_000_000_000).unwrap()
    }

    #[test]
    fn a_version_signed_by_the_old_and_new_keys_is_accepted() {
        let (k1, k2) = (key(1), key(2));
        let g = genesis(&[&k1], 1);
        let v2 = SignedTrust::sign(&doc(2, &[&k2], 1), &[&k1, &k2]).unwrap();
        let t = g.next(&v2).unwrap();
        assert_eq!(t.version(), 2);
        assert!(t.root().contains(&KeyId::of(&k2.verifying_key())));
        assert!(!t.root().contains(&KeyId::of(&k1.verifying_key())));
    }

    #[test]
    fn the_old_keys_alone_or_the_new_keys_alone_cannot_rotate() {
        let (k1, k2) = (key(1), key(2));
        let g = genesis(&[&k1], 1);
        // A thief of the old key alone.
        let only_old = SignedTrust::sign(&doc(2, &[&k2], 1), &[&k1]).unwrap();
        let e = g.next(&only_old).unwrap_err();
        assert_eq!(e.code(), "rotation_refused");
        assert!(e.to_string().contains("its own keys"), "{e}");
        // Someone with a fresh key and no old one.
        let only_new = SignedTrust::sign(&doc(2, &[&k2], 1), &[&k2]).unwrap();
        let e = g.next(&only_new).unwrap_err();
        assert!(e.to_string().contains("version 1's keys"), "{e}");
    }

    #[test]
    fn thresholds_apply_on_both_sides() {
        let (k1, k2, k3, k4) = (key(1), key(2), key(3), key(4));
        let g = genesis(&[&k1, &k2, &k3], 2);
        let next = doc(2, &[&k2, &k3, &k4], 2);
        // k1 and k3 are two old keys; k3 and k4 two new ones.
        assert!(
            g.next(&SignedTrust::sign(&next, &[&k1, &k3, &k4]).unwrap())
                .is_ok()
        );
        // One old signature is not enough.
        let e = g
            .next(&SignedTrust::sign(&next, &[&k1, &k4]).unwrap())
            .unwrap_err();
        assert!(e.to_string().contains("threshold not met"), "{e}");
    }

    #[test]
    fn versions_are_never_skipped_or_repeated() {
        let (k1, k2, k3) = (key(1), key(2), key(3));
        let g = genesis(&[&k1], 1);
        let v3 = SignedTrust::sign(&doc(3, &[&k3], 1), &[&k1, &k3]).unwrap();
        let e = g.next(&v3).unwrap_err();
        assert!(e.to_string().contains("expected version 2"), "{e}");
        let v2 = SignedTrust::sign(&doc(2, &[&k2], 1), &[&k1, &k2]).unwrap();
        let t2 = g.next(&v2).unwrap();
        // Going back: a version 2 again, or a version 1 document.
        let again = SignedTrust::sign(&doc(2, &[&k2], 1), &[&k2]).unwrap();
        assert!(t2.next(&again).is_err());
        let v1 = SignedTrust::sign(&doc(1, &[&k1], 1), &[&k1, &k2]).unwrap();
        assert!(t2.next(&v1).is_err());
    }

    #[test]
    fn a_device_that_missed_versions_walks_the_chain_in_order() {
        let (k1, k2, k3, k4) = (key(1), key(2), key(3), key(4));
        let g = genesis(&[&k1], 1);
        let v2 = SignedTrust::sign(&doc(2, &[&k2], 1), &[&k1, &k2]).unwrap();
        let v3 = SignedTrust::sign(&doc(3, &[&k3], 1), &[&k2, &k3]).unwrap();
        let v4 = SignedTrust::sign(&doc(4, &[&k4], 1), &[&k3, &k4]).unwrap();
        // Out of order and with a repeat: still walked 2, 3, 4.
        let (acc, err) = walk(&g, &[v4.clone(), v2.clone(), v3.clone(), v2.clone()]);
        assert!(err.is_none(), "{err:?}");
        assert_eq!(
            acc.iter().map(Trusted::version).collect::<Vec<_>>(),
            [2, 3, 4]
        );
        // A gap: version 4 does not follow version 2 (and is not signed
        // by version 2's keys either).
        let (acc, err) = walk(&g, &[v2, v4.clone()]);
        assert_eq!(acc.len(), 1);
        assert_eq!(err.unwrap().code(), "rotation_refused");
        // From version 3, only 4 is new.
        let (acc, err) = walk(&acc[0].next(&v3).unwrap(), &[v3.clone(), v4]);
        assert!(err.is_none());
        assert_eq!(acc.len(), 1);
    }

    #[test]
    fn tampered_documents_and_signatures_are_refused() {
        let (k1, k2, k3) = (key(1), key(2), key(3));
        let g = genesis(&[&k1], 1);
        let v2 = SignedTrust::sign(&doc(2, &[&k2], 1), &[&k1, &k2]).unwrap();
        // Swap in another key after signing.
        let mut t = v2.clone();
        t.signed = t.signed.replace(
            &hex::encode(k2.verifying_key().as_bytes()),
            &hex::encode(k3.verifying_key().as_bytes()),
        );
        let e = g.next(&t).unwrap_err();
        assert!(e.to_string().contains("bad signature"), "{e}");
        // Garbage in a signature.
        let mut t = v2.clone();
        t.signatures[0].signature = "zz".into();
        assert_eq!(g.next(&t).unwrap_err().code(), "malformed");
        // A bundle signature (other domain) does not verify as a trust one.
        let mut t = v2;
        let bundle_sig = k1.sign(&crate::bundle::signing_message(t.signed.as_bytes()));
        t.signatures[0].signature = hex::encode(bundle_sig.to_bytes());
        assert!(g.next(&t).is_err());
    }

    #[test]
    fn only_the_newest_version_must_be_fresh() {
        let (k1, k2) = (key(1), key(2));
        let g = genesis(&[&k1], 1);
        assert!(
            g.check_fresh(u64::MAX).is_ok(),
            "configured keys do not expire"
        );
        let d = TrustDoc::new(2, &[k2.verifying_key()], 1, 1_000).unwrap();
        let t = g
            .next(&SignedTrust::sign(&d, &[&k1, &k2]).unwrap())
            .unwrap();
        assert!(t.check_fresh(999).is_ok());
        assert_eq!(t.check_fresh(1_000).unwrap_err().code(), "trust_expired");
    }

    #[test]
    fn documents_are_validated() {
        let k1 = key(1);
        let pk = k1.verifying_key();
        assert!(TrustDoc::new(2, &[pk, pk], 1, 1).is_err(), "duplicate key");
        assert!(
            TrustDoc::new(2, &[pk], 2, 1).is_err(),
            "threshold above keys"
        );
        assert!(TrustDoc::new(0, &[pk], 1, 1).is_err(), "version 0");
        let st = SignedTrust {
            signed: "x".repeat(MAX_TRUST_BYTES + 1),
            signatures: vec![],
        };
        assert_eq!(st.peek_unverified().unwrap_err().code(), "too_large");
        let provisioned =
            Trusted::provisioned(&SignedTrust::sign(&doc(5, &[&k1], 1), &[&k1]).unwrap()).unwrap();
        assert_eq!(provisioned.version(), 5);
        assert!(
            Trusted::provisioned(&SignedTrust::sign(&doc(5, &[&k1], 1), &[&key(9)]).unwrap())
                .is_err()
        );
    }
}
