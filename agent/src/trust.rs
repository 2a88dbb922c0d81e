//! The device's trust chain: where it starts (the `[trust]` keys, or a
//! provisioned trust document) and the rotations it accepted since, kept in
//! `data_dir/trust.json`. The rule is [`edgefleet_wire::trust`]'s.
//!
//! A rotation is used only once it is on disk (write, fsync, rename): a
//! device never goes back a version, not even across a power cut. A chain
//! file that cannot be read refuses the start, as the anti-rollback floor
//! does: guessing an older version would re-trust a removed key.
//!
//! Bundles are *installed* only under the newest version. A bundle already
//! installed (active, last known good) was verified when it was installed;
//! at start and on rollback its signatures are checked against the newest
//! version that knows its signer, so a rotation never leaves a board
//! without a model. Replace a model signed by a compromised key by rolling
//! out one signed by the new keys.

use std::path::{Path, PathBuf};
use std::sync::RwLock;

use edgefleet_wire::trust::{SignedTrust, Trusted, walk};
use edgefleet_wire::verify::TrustRoot;

use crate::bundle::trust_root_from_files;
use crate::config::TrustSection;
use crate::error::AgentError;
use crate::store::write_atomic;

const CHAIN_FILE: &str = "trust.json";

#[derive(Debug)]
struct Chain {
    start: Trusted,
    accepted: Vec<Trusted>,
}

impl Chain {
    fn current(&self) -> &Trusted {
        self.accepted.last().unwrap_or(&self.start)
    }
}

/// The chain of a running agent.
#[derive(Debug)]
pub struct TrustState {
    chain: RwLock<Chain>,
    path: PathBuf,
    /// Serializes [`TrustState::advance`] (check, persist, publish).
    advancing: std::sync::Mutex<()>,
}

fn bad(path: &Path, source: edgefleet_wire::Error) -> AgentError {
    AgentError::Bundle {
        path: path.display().to_string(),
        source,
    }
}

impl TrustState {
    /// The configured start, then the chain kept in `data_dir`.
    pub fn open(cfg: &TrustSection, data_dir: &Path) -> Result<TrustState, AgentError> {
        let start = match &cfg.document {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| AgentError::io(p, e))?;
                let doc: SignedTrust = serde_json::from_str(&text).map_err(|e| {
                    AgentError::Config(format!("{}: not a trust document: {e}", p.display()))
                })?;
                Trusted::provisioned(&doc).map_err(|e| bad(p, e))?
            }
            None => Trusted::genesis(trust_root_from_files(&cfg.keys, cfg.threshold)?),
        };
        Self::starting_at(start, data_dir)
    }

    /// Configured keys given as a root (tests, tools).
    pub fn with_root(root: TrustRoot, data_dir: &Path) -> Result<TrustState, AgentError> {
        Self::starting_at(Trusted::genesis(root), data_dir)
    }

    fn starting_at(start: Trusted, data_dir: &Path) -> Result<TrustState, AgentError> {
        let path = data_dir.join(CHAIN_FILE);
        let stored: Vec<SignedTrust> = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                AgentError::Config(format!(
                    "{}: unreadable trust chain ({e}); refusing to guess an older trust \
                     version: restore it or re-provision the device",
                    path.display()
                ))
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(AgentError::io(&path, e)),
        };
        let (accepted, err) = walk(&start, &stored);
        if let Some(e) = err {
            return Err(AgentError::Config(format!(
                "{}: the kept trust chain does not follow from [trust] ({e}); refusing to \
                 guess an older trust version",
                path.display()
            )));
        }
        Ok(TrustState {
            chain: RwLock::new(Chain { start, accepted }),
            path,
            advancing: std::sync::Mutex::new(()),
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Chain> {
        self.chain.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The newest version.
    pub fn current(&self) -> Trusted {
        self.read().current().clone()
    }

    pub fn version(&self) -> u64 {
        self.read().current().version()
    }

    /// Every root the device has trusted, newest first (installed bundles).
    pub fn roots_newest_first(&self) -> Vec<TrustRoot> {
        let c = self.read();
        c.accepted
            .iter()
            .rev()
            .chain(std::iter::once(&c.start))
            .map(|t| t.root().clone())
            .collect()
    }

    /// Walks to the newest version among `docs`. Versions accepted are
    /// persisted before they are used; returns the version reached and the
    /// refusal that stopped the walk early, if any.
    pub fn advance(
        &self,
        docs: &[SignedTrust],
    ) -> Result<(u64, Option<edgefleet_wire::Error>), AgentError> {
        let _one = self.advancing.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.current();
        let (accepted, refusal) = walk(&current, docs);
        if accepted.is_empty() {
            return Ok((current.version(), refusal));
        }
        let mut chain: Vec<SignedTrust> = {
            let c = self.read();
            c.accepted
                .iter()
                .filter_map(|t| t.document().cloned())
                .collect()
        };
        chain.extend(accepted.iter().filter_map(|t| t.document().cloned()));
        let bytes =
            serde_json::to_vec_pretty(&chain).map_err(|e| AgentError::Invariant(e.to_string()))?;
        write_atomic(&self.path, &bytes, 0o644)?;
        let version = accepted.last().map_or(current.version(), Trusted::version);
        self.chain
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .accepted
            .extend(accepted);
        Ok((version, refusal))
    }
}

#[cfg(test)]
mod tests {
    use edgefleet_wire::keys::{encode_public_key, signing_key_from_seed};
    use edgefleet_wire::trust::TrustDoc;

    use super::*;

    fn setup(dir: &Path) -> (TrustSection, Vec<edgefleet_wire::keys::SigningKey>) {
        let keys: Vec<_> = (1..=4).map(|n| signing_key_from_seed([n; 32])).collect();
        let p = dir.join("k1.pub");
        std::fs::write(&p, encode_public_key(&keys[0].verifying_key())).unwrap();
        let cfg = TrustSection {
            keys: vec![p],
            threshold: 1,
            document: None,
        };
        (cfg, keys)
    }

    fn rotation(
        version: u64,
        from: &edgefleet_wire::keys::SigningKey,
        to: &edgefleet_wire::keys::SigningKey,
    ) -> SignedTrust {
        let d = TrustDoc::new(version, &[to.verifying_key()], 1, 4_000_000_000).unwrap();
        SignedTrust::sign(&d, &[from, to]).unwrap()
    }

    #[test]
    fn accepted_versions_survive_a_restart_and_never_go_back() {
        let dir = tempfile::tempdir().unwrap();
        let (cfg, k) = setup(dir.path());
        let t = TrustState::open(&cfg, dir.path()).unwrap();
        assert_eq!(t.version(), 1);
        let v2 = rotation(2, &k[0], &k[1]);
        let v3 = rotation(3, &k[1], &k[2]);
        assert_eq!(t.advance(&[v3.clone(), v2.clone()]).unwrap().0, 3);
        drop(t);
        let t = TrustState::open(&cfg, dir.path()).unwrap();
        assert_eq!(t.version(), 3, "the chain file is read back");
        // Older documents change nothing; a version 4 by the removed key
        // alone is refused and not kept.
        assert_eq!(t.advance(&[v2]).unwrap().0, 3);
        let forged = {
            let d = TrustDoc::new(4, &[k[0].verifying_key()], 1, 4_000_000_000).unwrap();
            SignedTrust::sign(&d, &[&k[0]]).unwrap()
        };
        let (v, refusal) = t.advance(&[forged]).unwrap();
        assert_eq!(v, 3);
        assert_eq!(refusal.unwrap().code(), "rotation_refused");
        let roots = t.roots_newest_first();
        assert_eq!(roots.len(), 3);
        let id = |n: usize| edgefleet_wire::keys::KeyId::of(&k[n].verifying_key());
        assert!(roots[0].contains(&id(2)) && !roots[0].contains(&id(0)));
        assert!(roots[2].contains(&id(0)));
    }

    #[test]
    fn an_unreadable_chain_refuses_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let (cfg, _) = setup(dir.path());
        std::fs::write(dir.path().join(CHAIN_FILE), b"{not json").unwrap();
        let e = TrustState::open(&cfg, dir.path()).unwrap_err();
        assert!(e.to_string().contains("refusing to guess"), "{e}");
    }

    #[test]
    fn a_provisioned_document_is_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let (mut cfg, k) = setup(dir.path());
        let v2 = rotation(2, &k[0], &k[1]);
        let p = dir.path().join("trust-v2.json");
        std::fs::write(&p, serde_json::to_vec(&v2).unwrap()).unwrap();
        cfg.keys.clear();
        cfg.document = Some(p);
        let t = TrustState::open(&cfg, dir.path()).unwrap();
        assert_eq!(t.version(), 2);
        // It walks on from there.
        assert_eq!(t.advance(&[rotation(3, &k[1], &k[3])]).unwrap().0, 3);
    }
}
