//! The bundle file: one self-contained, signed artifact per model version.
//!
//! ```text
//! offset  size  field
//! 0       8     magic  "EDGEFLT\0"
//! 8       2     format version (u16 LE): 1 (zstd payload) or 2 (stored payload, piece digest)
//! 10      2     reserved, must be 0
//! 12      4     manifest length M (u32 LE)
//! 16      4     signature block length S (u32 LE)
//! 20      M     manifest (postcard, see crate::manifest)
//! 20+M    S     signature block: count (u16 LE), then count × (key id [32], ed25519 signature [64])
//! 20+M+S  C     payload: the model, zstd-compressed or as is; C = manifest.payload.compressed_len
//! ```
//!
//! Reading order is the security argument: sizes are checked against
//! [`Limits`] before anything is allocated, the manifest bytes are only
//! decoded after the signatures over *those exact bytes* verify, and payload
//! bytes are hashed before the decompressor or any model parser sees them.

use std::io::{Read, Write};
use std::marker::PhantomData;

use ed25519_dalek::{Signature, Signer, SigningKey};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::keys::KeyId;
use crate::manifest::{Compression, Manifest, ModelFormat, PayloadInfo};

pub const MAGIC: [u8; 8] = *b"EDGEFLT\0";
/// Format version 1: a zstd payload, whose digest is its SHA-256.
pub const FORMAT_VERSION: u16 = 1;
/// Format version 2: an uncompressed payload, whose digest is a
/// [`PieceDigest`]. The newest version this build reads.
pub const FORMAT_VERSION_PIECES: u16 = 2;
/// The piece length of a [`PieceDigest`].
pub const PIECE_LEN: usize = 1 << 20;
/// Prepended to the piece digests before they are hashed together.
pub const PIECES_DOMAIN: &[u8] = b"edgefleet/v2/payload-pieces\0";
pub const HEADER_LEN: usize = 20;
/// Prepended to the manifest bytes before signing, so that a signature over
/// a bundle manifest can never be replayed as a signature over anything else.
pub const SIGNING_DOMAIN: &[u8] = b"edgefleet/v1/bundle-manifest\0";
const SIGNATURE_ENTRY_LEN: usize = 32 + 64;

/// Size caps applied before reading. Defaults suit a 1 GB board.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Manifest bytes (golden vectors live here, so allow a few MB).
    pub max_manifest_bytes: u32,
    /// Signatures in one bundle.
    pub max_signatures: u16,
    /// Compressed payload bytes.
    pub max_payload_bytes: u64,
    /// Uncompressed model bytes.
    pub max_model_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_manifest_bytes: 64 * 1024 * 1024,
            max_signatures: 16,
            max_payload_bytes: 512 * 1024 * 1024,
            max_model_bytes: 1024 * 1024 * 1024,
        }
    }
}

/// One signature in the bundle's signature block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignatureEntry {
    pub key_id: KeyId,
    pub signature: Signature,
}

/// A manifest as it travels: the exact encoded bytes plus signatures over
/// them. Nothing here has been checked; see [`crate::verify::verify`].
#[derive(Clone, Debug)]
pub struct Signed<T> {
    /// The header's format version: for a manifest, which payload digest
    /// the reader computes before the manifest is trusted.
    format_version: u16,
    bytes: Vec<u8>,
    signatures: Vec<SignatureEntry>,
    _kind: PhantomData<fn() -> T>,
}

/// The message each key signs: domain tag, then the manifest bytes.
pub(crate) fn signing_message(manifest_bytes: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(SIGNING_DOMAIN.len() + manifest_bytes.len());
    m.extend_from_slice(SIGNING_DOMAIN);
    m.extend_from_slice(manifest_bytes);
    m
}

impl Signed<Manifest> {
    /// Encodes and signs a manifest with every given key.
    pub fn sign(manifest: &Manifest, keys: &[&SigningKey]) -> Result<Self> {
        manifest.validate()?;
        let bytes = postcard::to_allocvec(manifest).map_err(|e| Error::invalid("manifest", e))?;
        let msg = signing_message(&bytes);
        let signatures = keys
            .iter()
            .map(|k| SignatureEntry {
                key_id: KeyId::of(&k.verifying_key()),
                signature: k.sign(&msg),
            })
            .collect();
        Ok(Signed {
            format_version: manifest.payload.compression.format_version(),
            bytes,
            signatures,
            _kind: PhantomData,
        })
    }

    /// Decodes the manifest **without** checking signatures: for display
    /// (`fleetctl bundle inspect`) only. Nothing that installs or serves a
    /// model accepts a plain `Manifest`.
    pub fn peek_unverified(&self) -> Result<Manifest> {
        decode_manifest(&self.bytes)
    }
}

impl<T> Signed<T> {
    /// The exact bytes the signatures cover (without the domain tag).
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub fn signatures(&self) -> &[SignatureEntry] {
        &self.signatures
    }

    /// The format version in the header, unverified: the signed manifest
    /// must agree with it ([`crate::verify::verify`]).
    pub fn format_version(&self) -> u16 {
        self.format_version
    }
}

pub(crate) fn decode_manifest(bytes: &[u8]) -> Result<Manifest> {
    let (m, rest): (Manifest, &[u8]) = match postcard::take_from_bytes(bytes) {
        Ok(decoded) => decoded,
        // Manifests signed before `pack_latency` existed end where it
        // begins: postcard writes `None` as one zero byte, so such a
        // manifest is exactly the new encoding without that byte. Only
        // this one trailing field is treated so; anything else is refused.
        Err(postcard::Error::DeserializeUnexpectedEnd) => {
            let mut padded = Vec::with_capacity(bytes.len() + 1);
            padded.extend_from_slice(bytes);
            padded.push(0);
            return match postcard::take_from_bytes::<Manifest>(&padded) {
                Ok((m, [])) if m.pack_latency.is_none() => Ok(m),
                Ok(_) => Err(Error::malformed("manifest", "ends inside a field")),
                Err(e) => Err(Error::malformed("manifest", e)),
            };
        }
        Err(e) => return Err(Error::malformed("manifest", e)),
    };
    if !rest.is_empty() {
        return Err(Error::malformed(
            "manifest",
            format!("{} trailing bytes", rest.len()),
        ));
    }
    Ok(m)
}

/// Reads exactly `buf.len()` bytes or reports how many were there.
fn fill(r: &mut impl Read, buf: &mut [u8], region: &'static str) -> Result<()> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => {
                return Err(Error::Truncated {
                    region,
                    needed: buf.len() as u64,
                    available: got as u64,
                });
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(Error::Io {
                    what: region,
                    source: e,
                });
            }
        }
    }
    Ok(())
}

/// Reads the header, manifest bytes and signatures, leaving `r` at the first
/// payload byte. Nothing is decoded or trusted yet.
pub fn read_signed<R: Read>(r: &mut R, limits: &Limits) -> Result<Signed<Manifest>> {
    let mut header = [0u8; HEADER_LEN];
    fill(r, &mut header, "header")?;
    if header[..8] != MAGIC {
        return Err(Error::BadMagic);
    }
    let version = u16::from_le_bytes([header[8], header[9]]);
    if !(FORMAT_VERSION..=FORMAT_VERSION_PIECES).contains(&version) {
        return Err(Error::UnsupportedVersion {
            found: version,
            supported: FORMAT_VERSION_PIECES,
        });
    }
    if header[10..12] != [0, 0] {
        return Err(Error::malformed("header", "reserved bytes are not zero"));
    }
    let manifest_len = u32::from_le_bytes([header[12], header[13], header[14], header[15]]);
    let sig_len = u32::from_le_bytes([header[16], header[17], header[18], header[19]]);
    if manifest_len > limits.max_manifest_bytes {
        return Err(Error::TooLarge {
            what: "manifest",
            size: manifest_len.into(),
            limit: limits.max_manifest_bytes.into(),
        });
    }
    let max_sig_len = 2 + SIGNATURE_ENTRY_LEN * usize::from(limits.max_signatures);
    if sig_len as usize > max_sig_len {
        return Err(Error::TooLarge {
            what: "signature block",
            size: sig_len.into(),
            limit: max_sig_len as u64,
        });
    }
    let mut bytes = vec![0u8; manifest_len as usize];
    fill(r, &mut bytes, "manifest")?;
    let mut block = vec![0u8; sig_len as usize];
    fill(r, &mut block, "signature block")?;
    let signatures = parse_signature_block(&block)?;
    Ok(Signed {
        format_version: version,
        bytes,
        signatures,
        _kind: PhantomData,
    })
}

fn parse_signature_block(block: &[u8]) -> Result<Vec<SignatureEntry>> {
    let Some((count, entries)) = block.split_first_chunk::<2>() else {
        return Err(Error::malformed(
            "signature block",
            "shorter than its count field",
        ));
    };
    let count = usize::from(u16::from_le_bytes(*count));
    if entries.len() != count * SIGNATURE_ENTRY_LEN {
        return Err(Error::malformed(
            "signature block",
            format!(
                "{count} signatures need {} bytes, block has {}",
                count * SIGNATURE_ENTRY_LEN,
                entries.len()
            ),
        ));
    }
    Ok(entries
        .chunks_exact(SIGNATURE_ENTRY_LEN)
        .map(|e| {
            let mut key_id = [0u8; 32];
            key_id.copy_from_slice(&e[..32]);
            let mut sig = [0u8; 64];
            sig.copy_from_slice(&e[32..]);
            SignatureEntry {
                key_id: KeyId(key_id),
                signature: Signature::from_bytes(&sig),
            }
        })
        .collect())
}

/// Writes a complete bundle.
pub fn write_bundle<W: Write>(
    mut w: W,
    signed: &Signed<Manifest>,
    compressed_payload: &[u8],
) -> Result<()> {
    let io = |e| Error::Io {
        what: "bundle output",
        source: e,
    };
    let manifest_len = u32::try_from(signed.bytes.len()).map_err(|_| Error::TooLarge {
        what: "manifest",
        size: signed.bytes.len() as u64,
        limit: u32::MAX.into(),
    })?;
    let count = u16::try_from(signed.signatures.len())
        .map_err(|_| Error::invalid("signatures", "too many"))?;
    let sig_len = 2 + SIGNATURE_ENTRY_LEN * signed.signatures.len();
    let mut header = Vec::with_capacity(HEADER_LEN);
    header.extend_from_slice(&MAGIC);
    header.extend_from_slice(&signed.format_version.to_le_bytes());
    header.extend_from_slice(&[0, 0]);
    header.extend_from_slice(&manifest_len.to_le_bytes());
    header.extend_from_slice(&(sig_len as u32).to_le_bytes());
    w.write_all(&header).map_err(io)?;
    w.write_all(&signed.bytes).map_err(io)?;
    w.write_all(&count.to_le_bytes()).map_err(io)?;
    for s in &signed.signatures {
        w.write_all(&s.key_id.0).map_err(io)?;
        w.write_all(&s.signature.to_bytes()).map_err(io)?;
    }
    w.write_all(compressed_payload).map_err(io)?;
    Ok(())
}

/// Compresses model bytes and describes them for the manifest.
pub fn compress_model(
    model: &[u8],
    format: ModelFormat,
    level: i32,
) -> Result<(PayloadInfo, Vec<u8>)> {
    let compressed = zstd::bulk::compress(model, level).map_err(|e| Error::Io {
        what: "zstd compression",
        source: e,
    })?;
    let info = PayloadInfo {
        compression: Compression::Zstd,
        format,
        len: model.len() as u64,
        sha256: Sha256::digest(model).into(),
        compressed_len: compressed.len() as u64,
        compressed_sha256: Sha256::digest(&compressed).into(),
    };
    Ok((info, compressed))
}

/// Describes model bytes stored as they are ([`Compression::None`]): the
/// payload is `model` itself.
pub fn stored_model(model: &[u8], format: ModelFormat) -> PayloadInfo {
    let mut pieces = PieceDigest::default();
    pieces.update(model);
    PayloadInfo {
        compression: Compression::None,
        format,
        len: model.len() as u64,
        sha256: Sha256::digest(model).into(),
        compressed_len: model.len() as u64,
        compressed_sha256: pieces.finish(),
    }
}

/// The content address of a bundle file: the hex sha256 of all its bytes.
/// The registry stores bundles under it, devices download and check by it,
/// and it is the bundle id everywhere. Computed only here (or with
/// [`StreamDigest::content_address`] for bytes that arrive in pieces).
pub fn content_address(bytes: &[u8]) -> String {
    let mut d = StreamDigest::default();
    d.update(bytes);
    d.content_address()
}

/// Whether `id` has the shape of a content address (64 lowercase hex
/// digits): safe as a file name, never a path.
pub fn is_content_address(id: &str) -> bool {
    id.len() == 64
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Incremental sha256 + length over a byte stream, compared against a signed
/// expectation at the end, or turned into a content address. Used for
/// downloads, uploads and files that arrive or are read in pieces.
#[derive(Clone, Debug, Default)]
pub struct StreamDigest {
    hasher: Sha256,
    len: u64,
}

impl StreamDigest {
    pub fn update(&mut self, chunk: &[u8]) {
        self.hasher.update(chunk);
        self.len += chunk.len() as u64;
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The content address of the bytes seen so far (see [`content_address`]).
    pub fn content_address(&self) -> String {
        hex::encode(self.hasher.clone().finalize())
    }

    /// Checks the accumulated bytes against the expected length and digest.
    pub fn check(self, what: &'static str, expected_len: u64, expected: &[u8; 32]) -> Result<()> {
        compare(what, (self.len, expected_len), expected, || {
            self.hasher.finalize().into()
        })
    }
}

/// A digest's length, then (only if that matched) its value, against the
/// signed ones: the errors every payload and model check gives.
fn compare(
    what: &'static str,
    (len, expected_len): (u64, u64),
    expected: &[u8; 32],
    digest: impl FnOnce() -> [u8; 32],
) -> Result<()> {
    if len != expected_len {
        return Err(Error::LengthMismatch {
            what,
            expected: expected_len,
            actual: len,
        });
    }
    let actual = digest();
    if &actual != expected {
        return Err(Error::HashMismatch {
            what,
            expected: hex::encode(expected),
            actual: hex::encode(actual),
        });
    }
    Ok(())
}

/// The digest of an uncompressed payload (format version 2): SHA-256 over
/// [`PIECES_DOMAIN`] and the SHA-256 of each consecutive [`PIECE_LEN`]
/// piece of the bytes (the last one may be shorter; no bytes, no pieces).
/// Unlike one SHA-256 over the whole, the pieces can be hashed on as many
/// cores as a device has; the length is signed beside it, so the pieces
/// are fixed by it. Computed here incrementally, or from piece digests
/// made elsewhere with [`PieceDigest::of_pieces`].
#[derive(Clone, Debug)]
pub struct PieceDigest {
    piece: Sha256,
    in_piece: usize,
    list: Sha256,
    len: u64,
}

impl Default for PieceDigest {
    fn default() -> Self {
        PieceDigest {
            piece: Sha256::new(),
            in_piece: 0,
            list: Sha256::new_with_prefix(PIECES_DOMAIN),
            len: 0,
        }
    }
}

impl PieceDigest {
    pub fn update(&mut self, mut bytes: &[u8]) {
        self.len += bytes.len() as u64;
        while !bytes.is_empty() {
            let take = bytes.len().min(PIECE_LEN - self.in_piece);
            self.piece.update(&bytes[..take]);
            self.in_piece += take;
            bytes = &bytes[take..];
            if self.in_piece == PIECE_LEN {
                self.list.update(std::mem::take(&mut self.piece).finalize());
                self.in_piece = 0;
            }
        }
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The digest of `len` bytes whose pieces' SHA-256s, in order, are
    /// `pieces`.
    pub(crate) fn of_pieces<'a>(len: u64, pieces: impl IntoIterator<Item = &'a [u8; 32]>) -> Self {
        let mut list = Sha256::new_with_prefix(PIECES_DOMAIN);
        for p in pieces {
            list.update(p);
        }
        PieceDigest {
            piece: Sha256::new(),
            in_piece: 0,
            list,
            len,
        }
    }

    pub fn finish(mut self) -> [u8; 32] {
        if self.in_piece > 0 {
            self.list.update(self.piece.finalize());
        }
        self.list.finalize().into()
    }

    /// Checks the bytes seen against the expected length and digest, with
    /// the errors of [`StreamDigest::check`].
    pub fn check(self, what: &'static str, expected_len: u64, expected: &[u8; 32]) -> Result<()> {
        compare(what, (self.len, expected_len), expected, || self.finish())
    }
}
