//! The fleet's trust chain: the configured `[trust]` keys (version 1) and
//! every signed version since ([`edgefleet_wire::trust`] has the rule).
//! The server verifies pushes with the newest version's keys and puts the
//! newest document in every desired state; devices walk to it.

use std::sync::RwLock;

use edgefleet_wire::api::v1::TrustView;
use edgefleet_wire::trust::{SignedTrust, Trusted, walk};
use edgefleet_wire::verify::TrustRoot;

use crate::error::{Error, Result};

#[derive(Debug)]
struct Chain {
    genesis: Trusted,
    accepted: Vec<Trusted>,
}

impl Chain {
    fn current(&self) -> &Trusted {
        self.accepted.last().unwrap_or(&self.genesis)
    }
}

/// The chain in memory. Rotations are serialized by the caller
/// ([`TrustChain::rotating`]) and made durable before [`TrustChain::accept`].
#[derive(Debug)]
pub struct TrustChain {
    chain: RwLock<Chain>,
    /// Held across check, commit and accept of one rotation.
    pub rotating: tokio::sync::Mutex<()>,
}

impl TrustChain {
    /// The configured keys and the stored versions. A stored chain that
    /// does not follow from the configured keys stops the server: it means
    /// `[trust] keys` no longer lists the version 1 keys.
    pub fn load(genesis: TrustRoot, stored: &[SignedTrust]) -> Result<TrustChain> {
        let genesis = Trusted::genesis(genesis);
        let (accepted, err) = walk(&genesis, stored);
        if let Some(e) = err {
            return Err(Error::Usage(format!(
                "[trust]: the stored trust chain does not follow from the configured keys \
                 (keep the version 1 keys in [trust] keys; rotations are in the store): {e}"
            )));
        }
        Ok(TrustChain {
            chain: RwLock::new(Chain { genesis, accepted }),
            rotating: tokio::sync::Mutex::new(()),
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Chain> {
        self.chain.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The newest version.
    pub fn current(&self) -> Trusted {
        self.read().current().clone()
    }

    /// The keys that sign bundles now.
    pub fn root(&self) -> TrustRoot {
        self.read().current().root().clone()
    }

    /// The newest signed document (none before the first rotation).
    pub fn newest_document(&self) -> Option<SignedTrust> {
        self.read().current().document().cloned()
    }

    /// Checks `doc` as the next version, without applying it.
    pub fn check_next(&self, doc: &SignedTrust) -> edgefleet_wire::error::Result<Trusted> {
        self.read().current().next(doc)
    }

    /// Appends a version checked by [`Self::check_next`] and made durable.
    pub fn accept(&self, t: Trusted) {
        let mut c = self.chain.write().unwrap_or_else(|e| e.into_inner());
        if t.version() == c.current().version() + 1 {
            c.accepted.push(t);
        }
    }

    pub fn view(&self) -> TrustView {
        let c = self.read();
        let cur = c.current();
        TrustView {
            version: cur.version(),
            keys: cur
                .root()
                .keys()
                .map(|k| hex::encode(k.as_bytes()))
                .collect(),
            threshold: cur.root().threshold() as u32,
            expires_at: cur.expires_at(),
            chain: c
                .accepted
                .iter()
                .filter_map(|t| t.document().cloned())
                .collect(),
        }
    }
}
