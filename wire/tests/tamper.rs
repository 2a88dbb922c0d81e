//! Tamper suite for the bundle format: every manipulation an attacker or a
//! flaky link can produce must be rejected with the right reason.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use ed25519_dalek::{Signer, SigningKey};
use edgefleet_wire::bundle::{
    FORMAT_VERSION, FORMAT_VERSION_PIECES, Limits, MAGIC, PIECE_LEN, PIECES_DOMAIN, PieceDigest,
    SIGNING_DOMAIN, Signed, compress_model, stored_model, write_bundle,
};
use edgefleet_wire::keys::KeyId;
use edgefleet_wire::keys::signing_key_from_seed;
use edgefleet_wire::manifest::{
    Compression, GoldenCase, GoldenSet, Manifest, ModelFormat, NonFiniteInputs, PackLatency,
    ReferenceSource, TargetArch,
};
use edgefleet_wire::names::ModelName;
use edgefleet_wire::tensor::{DType, NamedTensor, Tensor, TensorSpec};
use edgefleet_wire::verify::{
    Expiry, TrustRoot, Verified, VerifiedModel, check_bundle, open_bundle, open_bundle_decoded,
    open_bundle_sized,
};
use edgefleet_wire::{Error, bundle::HEADER_LEN};
use proptest::prelude::*;
use sha2::{Digest, Sha256};

const NOW: u64 = 1_800_000_000;

fn key(seed: u8) -> SigningKey {
    signing_key_from_seed([seed; 32])
}

fn manifest_for(payload: &[u8], sequence: u64) -> (Manifest, Vec<u8>) {
    let (info, compressed) = compress_model(payload, ModelFormat::Onnx, 3).unwrap();
    let x = Tensor::from_f32(vec![1, 2], &[0.5, -1.0]).unwrap();
    let y = Tensor::from_f32(vec![1, 1], &[0.25]).unwrap();
    let m = Manifest {
        name: ModelName::new("cls").unwrap(),
        version: semver::Version::new(1, 0, sequence),
        sequence,
        created_at: NOW - 10,
        expires_at: NOW + 3600,
        payload: info,
        tract_version: "0.23.9".into(),
        inputs: vec![TensorSpec {
            name: "x".into(),
            dtype: DType::F32,
            shape: vec![1, 2],
        }],
        outputs: vec![TensorSpec {
            name: "y".into(),
            dtype: DType::F32,
            shape: vec![1, 1],
        }],
        targets: TargetArch::ALL.to_vec(),
        min_agent_version: semver::Version::new(0, 1, 0),
        non_finite_inputs: NonFiniteInputs::Reject,
        golden: GoldenSet {
            tolerance: 1e-4,
            reference: ReferenceSource::External,
            cases: vec![GoldenCase {
                inputs: vec![NamedTensor::new("x", x)],
                outputs: vec![NamedTensor::new("y", y)],
            }],
        },
        drift_baseline: None,
        pack_latency: None,
    };
    (m, compressed)
}

fn build(payload: &[u8], sequence: u64, keys: &[&SigningKey]) -> Vec<u8> {
    let (m, compressed) = manifest_for(payload, sequence);
    let signed = Signed::sign(&m, keys).unwrap();
    let mut out = Vec::new();
    write_bundle(&mut out, &signed, &compressed).unwrap();
    out
}

fn payload() -> Vec<u8> {
    (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

/// Region boundaries of a bundle built by `build`.
struct Regions {
    manifest: std::ops::Range<usize>,
    sigs: std::ops::Range<usize>,
    payload: std::ops::Range<usize>,
}

fn regions(b: &[u8]) -> Regions {
    let m = u32::from_le_bytes(b[12..16].try_into().unwrap()) as usize;
    let s = u32::from_le_bytes(b[16..20].try_into().unwrap()) as usize;
    Regions {
        manifest: HEADER_LEN..HEADER_LEN + m,
        sigs: HEADER_LEN + m..HEADER_LEN + m + s,
        payload: HEADER_LEN + m + s..b.len(),
    }
}

fn open(b: &[u8], root: &TrustRoot) -> Result<(), Error> {
    open_with(b, root, &Limits::default())
}

/// All verifiers must give the same verdict: the device's, in order and
/// with the signatures checked beside the payload read (both keep the
/// model), and the server's streaming one (which keeps nothing).
fn open_with(b: &[u8], root: &TrustRoot, limits: &Limits) -> Result<(), Error> {
    let full = open_bundle(b, root, Expiry::Enforce { now: NOW }, limits).map(|_| ());
    let sized = open_bundle_sized(
        b,
        b.len() as u64,
        root,
        Expiry::Enforce { now: NOW },
        limits,
    )
    .map(|_| ());
    let streamed = check_bundle(b, root, Expiry::Enforce { now: NOW }, limits).map(|_| ());
    // The agent's: the model's digest compared while the bytes are used.
    let decoded = open_bundle_decoded(
        b,
        b.len() as u64,
        root,
        Expiry::Enforce { now: NOW },
        limits,
    )
    .and_then(|(_, model)| model.verify_while(|bytes| bytes.len()))
    .map(|_| ());
    for (other, name) in [
        (&sized, "open_bundle_sized"),
        (&streamed, "check_bundle"),
        (&decoded, "open_bundle_decoded + verify_while"),
    ] {
        assert_eq!(
            full.as_ref().err().map(Error::code),
            other.as_ref().err().map(Error::code),
            "open_bundle and {name} disagree: {full:?} vs {other:?}"
        );
    }
    full
}

/// The device's verifiers on a bundle that must open under `root_a`; both
/// must return the same model.
fn opened(b: &[u8]) -> (Verified<Manifest>, VerifiedModel) {
    let open = || {
        open_bundle(
            b,
            &root_a(),
            Expiry::Enforce { now: NOW },
            &Limits::default(),
        )
    };
    let sized = open_bundle_sized(
        b,
        b.len() as u64,
        &root_a(),
        Expiry::Enforce { now: NOW },
        &Limits::default(),
    )
    .unwrap();
    let (manifest, model) = open().unwrap();
    assert_eq!(sized.0.digest(), manifest.digest());
    assert!(sized.1.bytes() == model.bytes());
    (manifest, model)
}

fn root_a() -> TrustRoot {
    TrustRoot::new([key(1).verifying_key()], 1).unwrap()
}

fn flipped(b: &[u8], at: usize, bit: u8) -> Vec<u8> {
    let mut c = b.to_vec();
    c[at] ^= 1 << bit;
    c
}

#[test]
fn accepts_an_untouched_bundle_and_returns_the_exact_model() {
    let b = build(&payload(), 1, &[&key(1)]);
    let (m, model) = opened(&b);
    assert_eq!(m.sequence, 1);
    assert_eq!(model.bytes(), payload().as_slice());
    assert_eq!(m.signers().len(), 1);
}

#[test]
fn rejects_a_flipped_bit_in_the_magic() {
    let b = build(&payload(), 1, &[&key(1)]);
    for at in 0..8 {
        for bit in 0..8 {
            let err = open(&flipped(&b, at, bit), &root_a()).unwrap_err();
            assert_eq!(err.code(), "bad_magic", "byte {at} bit {bit}: {err}");
        }
    }
}

#[test]
fn rejects_a_flipped_bit_in_the_format_version() {
    let b = build(&payload(), 1, &[&key(1)]);
    for at in 8..10 {
        let err = open(&flipped(&b, at, 1), &root_a()).unwrap_err();
        assert_eq!(err.code(), "unsupported_version", "{err}");
        assert!(err.to_string().starts_with("bad version"), "{err}");
    }
}

#[test]
fn rejects_any_flipped_bit_in_the_manifest_as_a_bad_signature() {
    let b = build(&payload(), 1, &[&key(1)]);
    let r = regions(&b);
    for at in r.manifest.clone() {
        for bit in [0, 3, 7] {
            let err = open(&flipped(&b, at, bit), &root_a()).unwrap_err();
            assert_eq!(err.code(), "bad_signature", "byte {at} bit {bit}: {err}");
        }
    }
}

#[test]
fn rejects_flipped_bits_in_the_signature_block() {
    let b = build(&payload(), 1, &[&key(1)]);
    let r = regions(&b);
    let count = r.sigs.start..r.sigs.start + 2;
    let key_id = r.sigs.start + 2..r.sigs.start + 34;
    let sig = r.sigs.start + 34..r.sigs.end;
    for at in count {
        let err = open(&flipped(&b, at, 0), &root_a()).unwrap_err();
        assert_eq!(err.code(), "malformed", "{err}");
    }
    for at in key_id {
        let err = open(&flipped(&b, at, 2), &root_a()).unwrap_err();
        assert_eq!(err.code(), "unknown_key", "{err}");
    }
    for at in sig {
        for bit in [0, 5] {
            let err = open(&flipped(&b, at, bit), &root_a()).unwrap_err();
            assert_eq!(err.code(), "bad_signature", "byte {at} bit {bit}: {err}");
        }
    }
}

#[test]
fn rejects_any_flipped_bit_in_the_payload_as_a_hash_mismatch() {
    let b = build(&payload(), 1, &[&key(1)]);
    let r = regions(&b);
    for at in r.payload.clone() {
        let err = open(&flipped(&b, at, (at % 8) as u8), &root_a()).unwrap_err();
        assert_eq!(err.code(), "hash_mismatch", "byte {at}: {err}");
        assert!(err.to_string().contains("compressed payload"), "{err}");
    }
}

#[test]
fn rejects_truncation_at_every_offset() {
    let b = build(&payload(), 1, &[&key(1)]);
    for len in 0..b.len() {
        let err = open(&b[..len], &root_a()).unwrap_err();
        assert_eq!(err.code(), "truncated", "cut at {len}: {err}");
    }
}

#[test]
fn rejects_bytes_appended_after_the_payload() {
    let mut b = build(&payload(), 1, &[&key(1)]);
    b.push(0);
    assert_eq!(open(&b, &root_a()).unwrap_err().code(), "trailing_data");
}

#[test]
fn rejects_a_bundle_signed_by_an_unknown_key() {
    let b = build(&payload(), 1, &[&key(2)]);
    let err = open(&b, &root_a()).unwrap_err();
    assert_eq!(err.code(), "unknown_key", "{err}");
}

#[test]
fn rejects_a_bundle_below_the_signature_threshold() {
    let root = TrustRoot::new([key(1).verifying_key(), key(2).verifying_key()], 2).unwrap();
    let one = build(&payload(), 1, &[&key(1)]);
    let err = open(&one, &root).unwrap_err();
    assert!(
        matches!(
            err,
            Error::ThresholdNotMet {
                valid: 1,
                threshold: 2
            }
        ),
        "{err}"
    );
    // The same key twice is still one signer.
    let twice = build(&payload(), 1, &[&key(1), &key(1)]);
    assert_eq!(open(&twice, &root).unwrap_err().code(), "threshold_not_met");
    // An untrusted third key does not help either.
    let with_stranger = build(&payload(), 1, &[&key(1), &key(3)]);
    assert_eq!(
        open(&with_stranger, &root).unwrap_err().code(),
        "threshold_not_met"
    );
    let both = build(&payload(), 1, &[&key(2), &key(1)]);
    open(&both, &root).unwrap();
}

#[test]
fn rejects_an_expired_bundle_unless_expiry_is_ignored() {
    let b = build(&payload(), 1, &[&key(1)]);
    let late = Expiry::Enforce { now: NOW + 3600 };
    let err = open_bundle(&b[..], &root_a(), late, &Limits::default()).unwrap_err();
    assert_eq!(err.code(), "expired");
    open_bundle(&b[..], &root_a(), Expiry::Ignore, &Limits::default()).unwrap();
}

#[test]
fn rejects_oversized_manifest_and_payload_before_reading_them() {
    let b = build(&payload(), 1, &[&key(1)]);
    let r = regions(&b);
    let small_manifest = Limits {
        max_manifest_bytes: (r.manifest.len() - 1) as u32,
        ..Limits::default()
    };
    let err = open_with(&b, &root_a(), &small_manifest).unwrap_err();
    assert!(
        matches!(
            err,
            Error::TooLarge {
                what: "manifest",
                ..
            }
        ),
        "{err}"
    );
    let small_payload = Limits {
        max_payload_bytes: (r.payload.len() - 1) as u64,
        ..Limits::default()
    };
    let err = open_with(&b, &root_a(), &small_payload).unwrap_err();
    assert!(
        matches!(
            err,
            Error::TooLarge {
                what: "payload",
                ..
            }
        ),
        "{err}"
    );
    let small_model = Limits {
        max_model_bytes: 100,
        ..Limits::default()
    };
    let err = open_with(&b, &root_a(), &small_model).unwrap_err();
    assert!(
        matches!(err, Error::TooLarge { what: "model", .. }),
        "{err}"
    );
    // A header that claims a 4 GiB manifest is refused without allocating.
    let mut huge = b.clone();
    huge[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
    assert_eq!(open(&huge, &root_a()).unwrap_err().code(), "too_large");
}

#[test]
fn rejects_a_payload_swapped_in_from_another_valid_bundle() {
    let a = build(&payload(), 1, &[&key(1)]);
    let mut other_payload = payload();
    other_payload.reverse();
    let b = build(&other_payload, 2, &[&key(1)]);
    let (ra, rb) = (regions(&a), regions(&b));
    let mut mixed = a[..ra.payload.start].to_vec();
    mixed.extend_from_slice(&b[rb.payload.clone()]);
    let err = open(&mixed, &root_a()).unwrap_err();
    assert!(
        matches!(err.code(), "hash_mismatch" | "truncated" | "trailing_data"),
        "{err}"
    );
    // Same-length payloads isolate the hash check itself.
    let mut other_same_len = payload();
    other_same_len[0] ^= 0xff;
    let c = build(&other_same_len, 2, &[&key(1)]);
    let rc = regions(&c);
    if rc.payload.len() == ra.payload.len() {
        let mut mixed = a[..ra.payload.start].to_vec();
        mixed.extend_from_slice(&c[rc.payload]);
        assert_eq!(open(&mixed, &root_a()).unwrap_err().code(), "hash_mismatch");
    }
}

#[test]
fn rejects_a_manifest_and_signatures_swapped_between_bundles() {
    // Signatures from bundle B grafted onto bundle A's manifest.
    let a = build(&payload(), 1, &[&key(1)]);
    let b = build(&payload(), 2, &[&key(1)]);
    let (ra, rb) = (regions(&a), regions(&b));
    let mut mixed = a[..ra.sigs.start].to_vec();
    mixed.extend_from_slice(&b[rb.sigs.clone()]);
    mixed.extend_from_slice(&a[ra.payload.clone()]);
    assert_eq!(open(&mixed, &root_a()).unwrap_err().code(), "bad_signature");
}

#[test]
fn signing_refuses_an_inconsistent_manifest() {
    let (mut m, _) = manifest_for(&payload(), 1);
    m.golden.cases[0].inputs[0].name = "not-x".into();
    assert_eq!(Signed::sign(&m, &[&key(1)]).unwrap_err().code(), "invalid");
}

/// An output whose size the model computes from its input values has a
/// dynamic dimension: any golden count fits it, the rank and the fixed
/// dimensions must still match, and an input may never have one.
#[test]
fn dynamic_output_dimensions_admit_any_size_and_inputs_have_none() {
    use edgefleet_wire::tensor::DYNAMIC_DIM;
    let (mut m, _) = manifest_for(&payload(), 1);
    m.outputs[0].shape = vec![DYNAMIC_DIM, 1];
    let rows = |n: usize| Tensor::from_f32(vec![n as u64, 1], &vec![0.5; n]).unwrap();
    for n in [0, 1, 7] {
        m.golden.cases[0].outputs[0].tensor = rows(n);
        Signed::sign(&m, &[&key(1)]).unwrap();
    }
    assert_eq!(m.outputs[0].to_string(), "y f32[?, 1]");
    assert_eq!(m.outputs[0].json_shape(), [None, Some(1)]);

    m.golden.cases[0].outputs[0].tensor = Tensor::from_f32(vec![3, 2], &[0.5; 6]).unwrap();
    assert_eq!(Signed::sign(&m, &[&key(1)]).unwrap_err().code(), "invalid");
    m.golden.cases[0].outputs[0].tensor = Tensor::from_f32(vec![3], &[0.5; 3]).unwrap();
    assert_eq!(Signed::sign(&m, &[&key(1)]).unwrap_err().code(), "invalid");

    let (mut m, _) = manifest_for(&payload(), 1);
    m.inputs[0].shape = vec![1, DYNAMIC_DIM];
    let e = Signed::sign(&m, &[&key(1)]).unwrap_err();
    assert!(e.to_string().contains("dynamic dimension"), "{e}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn decoder_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = open(&bytes, &root_a());
    }

    #[test]
    fn decoder_never_panics_on_mutated_bundles(edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8)) {
        let mut b = build(&payload(), 1, &[&key(1)]);
        let n = b.len();
        for (at, v) in edits {
            b[at % n] = v;
        }
        prop_assert!(open(&b, &root_a()).is_err() || b == build(&payload(), 1, &[&key(1)]));
    }

    #[test]
    fn manifest_postcard_round_trips(seq in any::<u64>(), tol in 0f32..1.0, major in 0u64..100) {
        let (mut m, _) = manifest_for(&payload(), 1);
        m.sequence = seq;
        m.golden.tolerance = tol;
        m.version = semver::Version::new(major, 2, 3);
        let bytes = postcard::to_allocvec(&m).unwrap();
        let back: Manifest = postcard::from_bytes(&bytes).unwrap();
        prop_assert_eq!(back, m);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn bundles_round_trip(payload in proptest::collection::vec(any::<u8>(), 0..4096), seq in 1u64..1_000_000) {
        let b = build(&payload, seq, &[&key(1), &key(2)]);
        let root = TrustRoot::new([key(1).verifying_key(), key(2).verifying_key()], 2).unwrap();
        let (m, model) = open_bundle(&b[..], &root, Expiry::Enforce { now: NOW }, &Limits::default()).unwrap();
        prop_assert_eq!(m.sequence, seq);
        prop_assert_eq!(model.bytes(), payload.as_slice());
        prop_assert_eq!(m.signers().len(), 2);
        let (expected, _) = manifest_for(&payload, seq);
        prop_assert_eq!(&*m, &expected);
    }

    #[test]
    fn model_names_round_trip_or_are_rejected(s in "[a-z0-9._/-]{0,70}") {
        match ModelName::new(s.clone()) {
            Ok(n) => {
                let bytes = postcard::to_allocvec(&n).unwrap();
                prop_assert_eq!(postcard::from_bytes::<ModelName>(&bytes).unwrap(), n);
                prop_assert!(!s.contains('/') && !s.contains("..") && s.len() <= 64);
            }
            Err(e) => prop_assert_eq!(e.code(), "invalid"),
        }
    }
}

/// A bundle file around manifest bytes as given, signed by `k`.
fn bundle_of_manifest_bytes(manifest: &[u8], k: &SigningKey, compressed: &[u8]) -> Vec<u8> {
    let mut msg = SIGNING_DOMAIN.to_vec();
    msg.extend_from_slice(manifest);
    let mut block = 1u16.to_le_bytes().to_vec();
    block.extend_from_slice(&KeyId::of(&k.verifying_key()).0);
    block.extend_from_slice(&k.sign(&msg).to_bytes());
    let mut b = MAGIC.to_vec();
    b.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    b.extend_from_slice(&[0, 0]);
    b.extend_from_slice(&(manifest.len() as u32).to_le_bytes());
    b.extend_from_slice(&(block.len() as u32).to_le_bytes());
    b.extend_from_slice(manifest);
    b.extend_from_slice(&block);
    b.extend_from_slice(compressed);
    b
}

#[test]
fn opens_a_bundle_signed_before_the_pack_latency_field_existed() {
    let (m, compressed) = manifest_for(&payload(), 1);
    let mut bytes = postcard::to_allocvec(&m).unwrap();
    // The old encoding is the new one without the trailing `None` tag.
    assert_eq!(bytes.pop(), Some(0));
    let b = bundle_of_manifest_bytes(&bytes, &key(1), &compressed);
    let (got, model) = opened(&b);
    assert_eq!(got.pack_latency, None);
    assert_eq!(got.sequence, 1);
    assert_eq!(model.bytes(), payload().as_slice());
    open(&b, &root_a()).unwrap();

    // Only that one field may be missing: a manifest cut shorter is refused.
    bytes.pop();
    let cut = bundle_of_manifest_bytes(&bytes, &key(1), &compressed);
    assert_eq!(open(&cut, &root_a()).unwrap_err().code(), "malformed");
}

#[test]
fn the_pack_latency_is_signed_and_read_back() {
    let (mut m, compressed) = manifest_for(&payload(), 1);
    m.pack_latency = Some(PackLatency {
        median_us: 2_306,
        p90_us: 2_410,
        iterations: 50,
        machine: "x86_64, Intel(R) Xeon(R) Processor".into(),
    });
    let signed = Signed::sign(&m, &[&key(1)]).unwrap();
    let mut b = Vec::new();
    write_bundle(&mut b, &signed, &compressed).unwrap();
    let (got, _) = opened(&b);
    assert_eq!(got.pack_latency, m.pack_latency);

    m.pack_latency = Some(PackLatency {
        machine: "evil\x1b[2J".into(),
        ..m.pack_latency.clone().unwrap()
    });
    assert!(
        Signed::sign(&m, &[&key(1)]).is_err(),
        "control characters are refused"
    );
}

/// Signs `m` after `edit` changed its payload description (a signer's
/// mistake, or a malicious signer: the digests are the signed ones).
fn signed_with_payload(edit: impl FnOnce(&mut Manifest, &mut Vec<u8>)) -> Vec<u8> {
    signed_with(&payload(), edit)
}

/// [`signed_with_payload`] for another model.
fn signed_with(model: &[u8], edit: impl FnOnce(&mut Manifest, &mut Vec<u8>)) -> Vec<u8> {
    let (mut m, mut compressed) = manifest_for(model, 1);
    edit(&mut m, &mut compressed);
    m.payload.compressed_len = compressed.len() as u64;
    m.payload.compressed_sha256 = Sha256::digest(&compressed).into();
    let signed = Signed::sign(&m, &[&key(1)]).unwrap();
    let mut out = Vec::new();
    write_bundle(&mut out, &signed, &compressed).unwrap();
    out
}

#[test]
fn a_signed_payload_that_is_not_what_its_manifest_says_is_refused() {
    let n = payload().len() as u64;
    // The model is one byte longer than signed: the one-call decompressor
    // has no room for it, and the streaming one stops one byte past.
    let longer = signed_with_payload(|m, _| m.payload.len = n - 1);
    assert_eq!(
        open(&longer, &root_a()).unwrap_err().code(),
        "length_mismatch"
    );
    // One byte shorter than signed.
    let shorter = signed_with_payload(|m, _| m.payload.len = n + 1);
    assert_eq!(
        open(&shorter, &root_a()).unwrap_err().code(),
        "length_mismatch"
    );
    // Not zstd at all, though its digest is the signed one.
    let garbage = signed_with_payload(|_, c| *c = payload());
    assert_eq!(open(&garbage, &root_a()).unwrap_err().code(), "malformed");
    // A model cut short inside a valid frame.
    let cut = signed_with_payload(|_, c| {
        c.truncate(c.len() - 3);
    });
    assert_eq!(open(&cut, &root_a()).unwrap_err().code(), "malformed");
}

/// A model of several MiB that zstd entropy-codes (a 16-symbol alphabet):
/// its compressed payload is large enough that the device's verifier hashes
/// it on a second thread while reading it, one MiB at a time, and is not a
/// whole number of MiB.
fn large_model() -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..5 * (1 << 20) + 12_345)
        .map(|_| {
            // xorshift64: four random bits per byte, no repeats to match.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 60) as u8
        })
        .collect()
}

#[test]
fn a_large_payload_is_hashed_while_it_is_read_and_checked_alike() {
    let model = large_model();
    let n = model.len() as u64;
    let untouched = signed_with(&model, |_, c| {
        assert!(c.len() > 2 << 20, "the compressed payload spans chunks");
    });
    let (_, got) = opened(&untouched);
    assert!(
        got.bytes() == model.as_slice(),
        "the exact model comes back"
    );
    open(&untouched, &root_a()).unwrap();

    // Two frames that together are the model: valid zstd, which both
    // verifiers take.
    let split = model.len() / 3;
    let frames = signed_with(&model, |_, c| {
        *c = zstd::encode_all(&model[..split], 3).unwrap();
        c.extend(zstd::encode_all(&model[split..], 3).unwrap());
    });
    let (_, got) = opened(&frames);
    assert!(got.bytes() == model.as_slice());

    let refused = |b: &[u8]| open(b, &root_a()).unwrap_err().code();
    assert_eq!(
        refused(&signed_with(&model, |m, _| m.payload.len = n - 1)),
        "length_mismatch"
    );
    assert_eq!(
        refused(&signed_with(&model, |m, _| m.payload.len = n + 1)),
        "length_mismatch"
    );
    assert_eq!(
        refused(&signed_with(&model, |m, _| m.payload.sha256[31] ^= 1)),
        "hash_mismatch"
    );
    // A byte changed inside the frame after compressing: the signed digest
    // covers it, so only the decoder (checksum) or the model digest can tell.
    let corrupt = signed_with(&model, |_, c| {
        let at = c.len() / 2;
        c[at] ^= 0x40;
    });
    assert!(matches!(refused(&corrupt), "malformed" | "hash_mismatch"));
    // A frame cut inside its second MiB of output.
    let cut = signed_with(&model, |_, c| c.truncate(c.len() * 2 / 5));
    assert_eq!(refused(&cut), "malformed");

    // And the reads around it: the file ends early, or has a byte too many.
    let payload_at = regions(&untouched).payload.start;
    let short = &untouched[..untouched.len() - 1];
    assert_eq!(refused(short), "truncated");
    let mut long = untouched.clone();
    long.push(0);
    assert_eq!(refused(&long), "trailing_data");
    let flipped = flipped(&untouched, payload_at + 3 * (1 << 20) / 2, 0);
    assert_eq!(refused(&flipped), "hash_mismatch");
}

/// The agent's open leaves the model's own digest to the first use of its
/// bytes, which hashes them on a second thread while they are used: that
/// use's result comes back only when length and digest match, for a model
/// hashed beside its use (over two chunks) and for a small one hashed
/// first.
#[test]
fn a_decoded_model_gives_its_bytes_only_through_its_digest() {
    let decoded = |b: &[u8]| {
        open_bundle_decoded(
            b,
            b.len() as u64,
            &root_a(),
            Expiry::Enforce { now: NOW },
            &Limits::default(),
        )
        .unwrap()
        .1
    };
    for model in [large_model(), payload()] {
        let good = decoded(&signed_with(&model, |_, _| {}));
        assert!(good.verify_while(|b| b == model.as_slice()).unwrap());
        assert!(good.clone().verify().unwrap().bytes() == model.as_slice());

        // Signed with a wrong model digest or length: it opens (the payload
        // matched), and every way to its bytes refuses.
        let n = model.len() as u64;
        for (edit, code) in [
            (
                Box::new(|m: &mut Manifest| m.payload.sha256[0] ^= 1) as Box<dyn Fn(&mut Manifest)>,
                "hash_mismatch",
            ),
            (
                Box::new(move |m: &mut Manifest| m.payload.len = n + 1),
                "length_mismatch",
            ),
        ] {
            let bad = decoded(&signed_with(&model, |m, _| edit(m)));
            let mut used = false;
            let err = bad
                .verify_while(|b| {
                    used = true;
                    b.len()
                })
                .unwrap_err();
            assert_eq!(err.code(), code, "{} bytes", model.len());
            // a small model is compared before it is used
            assert_eq!(used, model.len() > 2 << 20, "{} bytes", model.len());
            assert_eq!(bad.verify().unwrap_err().code(), code);
        }
    }
}

/// A length that is not the bundle's never makes a damaged bundle pass.
#[test]
fn a_wrong_length_for_the_sized_open_fails_it() {
    let b = signed_with(&large_model(), |_, _| {});
    let sized = |b: &[u8], len: u64| {
        open_bundle_sized(
            b,
            len,
            &root_a(),
            Expiry::Enforce { now: NOW },
            &Limits::default(),
        )
        .map(|_| ())
        .map_err(|e| e.code())
    };
    let n = b.len() as u64;
    sized(&b, n).unwrap();
    assert_eq!(sized(&b, n - 1), Err("truncated"));
    // Too long only sizes the read: the stream still ends where it does.
    sized(&b, n + 1).unwrap();
    let mut long = b.clone();
    long.push(0);
    assert_eq!(sized(&long, n), Err("trailing_data"));
    assert_eq!(sized(&long, n + 1), Err("trailing_data"));
    assert_eq!(sized(&b, 0), Err("truncated"));
    let mut damaged = b.clone();
    let last = damaged.len() - 1;
    damaged[last] ^= 1;
    assert_eq!(sized(&damaged[..last], n), Err("truncated"));
    assert_eq!(sized(&damaged, n), Err("hash_mismatch"));
}

/// A bundle whose model is stored as is (format version 2), signed after
/// `edit`.
fn stored_bundle(model: &[u8], edit: impl FnOnce(&mut Manifest)) -> Vec<u8> {
    let (mut m, _) = manifest_for(model, 1);
    m.payload = stored_model(model, ModelFormat::Onnx);
    edit(&mut m);
    let signed = Signed::sign(&m, &[&key(1)]).unwrap();
    let mut out = Vec::new();
    write_bundle(&mut out, &signed, model).unwrap();
    out
}

/// The piece digest written out from its definition, independently of the
/// crate's incremental and parallel computations.
fn pieces_by_definition(bytes: &[u8]) -> [u8; 32] {
    let mut list = PIECES_DOMAIN.to_vec();
    for piece in bytes.chunks(1 << 20) {
        list.extend_from_slice(&Sha256::digest(piece));
    }
    Sha256::digest(&list).into()
}

#[test]
fn the_piece_digest_is_one_sha256_over_the_domain_and_each_mib() {
    assert_eq!(PIECE_LEN, 1 << 20);
    let big = large_model();
    for len in [
        0,
        1,
        PIECE_LEN - 1,
        PIECE_LEN,
        PIECE_LEN + 1,
        3 * PIECE_LEN,
        big.len(),
    ] {
        let bytes = &big[..len];
        let want = pieces_by_definition(bytes);
        let info = stored_model(bytes, ModelFormat::Onnx);
        assert_eq!(info.compression, Compression::None);
        assert_eq!(info.compressed_sha256, want, "{len} bytes");
        assert_eq!(info.sha256, <[u8; 32]>::from(Sha256::digest(bytes)));
        assert_eq!((info.len, info.compressed_len), (len as u64, len as u64));
        // Fed in uneven pieces, it is the same digest.
        let mut d = PieceDigest::default();
        for part in bytes.chunks(333_333) {
            d.update(part);
        }
        assert_eq!(d.len(), len as u64);
        assert_eq!(d.finish(), want, "{len} bytes in parts");
    }
}

#[test]
fn a_stored_payload_opens_to_the_exact_model_on_every_verifier() {
    // Small (one piece, hashed inline), a whole number of pieces, and
    // pieces hashed on every core while the payload is read.
    let big = large_model();
    for model in [payload(), big[..2 * PIECE_LEN].to_vec(), big] {
        let b = stored_bundle(&model, |_| {});
        assert_eq!(b[8..10], FORMAT_VERSION_PIECES.to_le_bytes());
        let r = regions(&b);
        assert!(b[r.payload] == model[..], "the payload is the model");
        let (m, got) = opened(&b);
        assert_eq!(m.payload.compression, Compression::None);
        assert!(got.bytes() == model.as_slice(), "{} bytes", model.len());
        open(&b, &root_a()).unwrap();
    }
}

#[test]
fn rejects_a_tampered_stored_payload_with_the_same_reason_everywhere() {
    let small = stored_bundle(&payload(), |_| {});
    let r = regions(&small);
    for at in r.payload.clone() {
        let err = open(&flipped(&small, at, (at % 8) as u8), &root_a()).unwrap_err();
        assert_eq!(err.code(), "hash_mismatch", "byte {at}: {err}");
        assert!(err.to_string().contains("payload"), "{err}");
    }
    for len in r.payload.start..small.len() {
        assert_eq!(
            open(&small[..len], &root_a()).unwrap_err().code(),
            "truncated"
        );
    }
    let mut long = small.clone();
    long.push(0);
    assert_eq!(open(&long, &root_a()).unwrap_err().code(), "trailing_data");

    // Over several pieces: the first and last byte, both sides of a piece
    // boundary, and one piece's bytes swapped with the next one's.
    let model = large_model();
    let big = stored_bundle(&model, |_| {});
    let at = regions(&big).payload.start;
    for offset in [
        0,
        PIECE_LEN - 1,
        PIECE_LEN,
        3 * PIECE_LEN + 7,
        model.len() - 1,
    ] {
        let err = open(&flipped(&big, at + offset, 2), &root_a()).unwrap_err();
        assert_eq!(err.code(), "hash_mismatch", "offset {offset}: {err}");
    }
    let mut swapped = big.clone();
    let (one, two) = swapped[at..].split_at_mut(PIECE_LEN);
    one.swap_with_slice(&mut two[..PIECE_LEN]);
    assert_eq!(
        open(&swapped, &root_a()).unwrap_err().code(),
        "hash_mismatch"
    );
    assert_eq!(
        open(&big[..big.len() - 1], &root_a()).unwrap_err().code(),
        "truncated"
    );
}

#[test]
fn a_header_version_that_does_not_match_the_signed_compression_is_refused() {
    let with_version = |b: &[u8], v: u16| {
        let mut c = b.to_vec();
        c[8..10].copy_from_slice(&v.to_le_bytes());
        c
    };
    let big = large_model();
    for model in [payload(), big] {
        // A stored payload announced as zstd, and a zstd one as stored:
        // the manifest is signed, the header is not.
        let stored = stored_bundle(&model, |_| {});
        let zstd = signed_with(&model, |_, _| {});
        for b in [
            with_version(&stored, FORMAT_VERSION),
            with_version(&zstd, FORMAT_VERSION_PIECES),
        ] {
            let err = open(&b, &root_a()).unwrap_err();
            assert_eq!(err.code(), "malformed", "{err}");
            assert!(err.to_string().contains("format version"), "{err}");
        }
        let err = open(&with_version(&stored, 3), &root_a()).unwrap_err();
        assert_eq!(err.code(), "unsupported_version", "{err}");
    }
}

#[test]
fn a_stored_payload_must_be_the_model_its_manifest_signs() {
    // The stored length is the model's, or nothing is signed.
    let (mut m, _) = manifest_for(&payload(), 1);
    m.payload = stored_model(&payload(), ModelFormat::Onnx);
    m.payload.len += 1;
    let err = Signed::sign(&m, &[&key(1)]).unwrap_err();
    assert_eq!(err.code(), "invalid", "{err}");

    // A model digest that is not the payload's: it opens (the piece
    // digest matched) and every way to the bytes refuses it.
    for model in [payload(), large_model()] {
        let b = stored_bundle(&model, |m| m.payload.sha256[7] ^= 1);
        assert_eq!(open(&b, &root_a()).unwrap_err().code(), "hash_mismatch");
        let (_, decoded) = open_bundle_decoded(
            &b[..],
            b.len() as u64,
            &root_a(),
            Expiry::Enforce { now: NOW },
            &Limits::default(),
        )
        .unwrap();
        let err = decoded.verify_while(|b| b.len()).unwrap_err();
        assert_eq!(err.code(), "hash_mismatch");
    }
}
