//! Feeds arbitrary bytes through the whole untrusted-bundle path: header,
//! limits, signature block, signature check, manifest decode, payload check.
#![no_main]

use edgefleet_wire::bundle::{Limits, read_signed};
use edgefleet_wire::keys::signing_key_from_seed;
use edgefleet_wire::verify::{Expiry, TrustRoot, open_bundle};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = Limits { max_manifest_bytes: 1 << 20, max_payload_bytes: 1 << 20, max_model_bytes: 1 << 22, ..Limits::default() };
    if let Ok(signed) = read_signed(&mut &data[..], &limits) {
        // Inspection decodes unverified manifests too: it must not panic.
        let _ = signed.peek_unverified();
    }
    let root = TrustRoot::new([signing_key_from_seed([1; 32]).verifying_key()], 1).expect("valid root");
    let _ = open_bundle(data, &root, Expiry::Ignore, &limits);
});
