//! Opening bundle files on the device: the wire crate's verification plus
//! the checks only a device can make (its architecture, its agent version).

use std::path::Path;

use edgefleet_wire::bundle::Limits;
use edgefleet_wire::keys::decode_public_key;
use edgefleet_wire::manifest::{Manifest, TargetArch};
use edgefleet_wire::time::unix_now as now_unix;
use edgefleet_wire::verify::{DecodedModel, Expiry, TrustRoot, Verified, open_bundle_decoded};

use crate::error::AgentError;

/// A bundle whose signatures, expiry, payload digest, target and agent
/// version all passed. The model's own digest is compared when its bytes
/// are first used: [`TrustedBundle::use_model`], on a second core while
/// they are parsed. Only [`open_file`] and [`open_bytes`] make one.
#[derive(Debug, Clone)]
pub struct TrustedBundle {
    pub manifest: Verified<Manifest>,
    pub model: DecodedModel,
    /// The file or label it was opened from, for errors.
    pub source: String,
}

impl TrustedBundle {
    /// Runs `load` on the model bytes while their signed digest is
    /// compared ([`DecodedModel::verify_while`]); a mismatch is the same
    /// error opening the bundle would have given before.
    pub fn use_model<T>(&self, load: impl FnOnce(&[u8]) -> T) -> Result<T, AgentError> {
        self.model
            .verify_while(load)
            .map_err(|source| AgentError::Bundle {
                path: self.source.clone(),
                source,
            })
    }
}

/// Reads public key files into a trust root.
pub fn trust_root_from_files(
    paths: &[impl AsRef<Path>],
    threshold: usize,
) -> Result<TrustRoot, AgentError> {
    let mut keys = Vec::new();
    for p in paths {
        let p = p.as_ref();
        let text = std::fs::read_to_string(p).map_err(|e| AgentError::io(p, e))?;
        keys.push(
            decode_public_key(&text).map_err(|source| AgentError::Bundle {
                path: p.display().to_string(),
                source,
            })?,
        );
    }
    TrustRoot::new(keys, threshold).map_err(|source| AgentError::Bundle {
        path: "trust root".into(),
        source,
    })
}

/// Device-side checks after the signature: architecture, agent version and
/// model format (NNEF-only builds refuse ONNX here, before loading it).
fn check_device(manifest: &Manifest) -> Result<(), AgentError> {
    let arch = TargetArch::current();
    if !arch.is_some_and(|a| manifest.targets.contains(&a)) {
        return Err(AgentError::WrongArch {
            targets: manifest
                .targets
                .iter()
                .map(|t| t.name())
                .collect::<Vec<_>>()
                .join(", "),
            this: arch.map_or("unknown", TargetArch::name).to_string(),
        });
    }
    let ours = semver::Version::parse(crate::AGENT_VERSION)
        .map_err(|e| AgentError::Invariant(e.to_string()))?;
    if ours < manifest.min_agent_version {
        return Err(AgentError::AgentTooOld {
            required: manifest.min_agent_version.to_string(),
            ours: ours.to_string(),
        });
    }
    edgefleet_runtime::check_format(manifest.payload.format)?;
    Ok(())
}

/// Verifies a bundle held in memory.
pub fn open_bytes(
    bytes: &[u8],
    root: &TrustRoot,
    limits: &Limits,
    label: &str,
) -> Result<TrustedBundle, AgentError> {
    let (manifest, model) = open_bundle_decoded(
        bytes,
        bytes.len() as u64,
        root,
        Expiry::Enforce { now: now_unix() },
        limits,
    )
    .map_err(|source| AgentError::Bundle {
        path: label.to_string(),
        source,
    })?;
    check_device(&manifest)?;
    Ok(TrustedBundle {
        manifest,
        model,
        source: label.to_string(),
    })
}

/// Verifies a bundle file.
pub fn open_file(
    path: &Path,
    root: &TrustRoot,
    limits: &Limits,
) -> Result<TrustedBundle, AgentError> {
    open_file_with(path, root, limits, Expiry::Enforce { now: now_unix() })
}

/// Verifies a bundle file with an explicit expiry policy.
pub fn open_file_with(
    path: &Path,
    root: &TrustRoot,
    limits: &Limits,
    expiry: Expiry,
) -> Result<TrustedBundle, AgentError> {
    let f = std::fs::File::open(path).map_err(|e| AgentError::io(path, e))?;
    let len = f.metadata().map_err(|e| AgentError::io(path, e))?.len();
    let (manifest, model) =
        open_bundle_decoded(std::io::BufReader::new(f), len, root, expiry, limits).map_err(
            |source| AgentError::Bundle {
                path: path.display().to_string(),
                source,
            },
        )?;
    check_device(&manifest)?;
    Ok(TrustedBundle {
        manifest,
        model,
        source: path.display().to_string(),
    })
}
