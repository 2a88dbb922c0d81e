//! The npz reader against files numpy itself wrote (`numpy.savez` with its
//! zip64 extra fields, and `numpy.savez_compressed` with deflate), made by
//! scripts/make_npz_fixtures.py from the multi model's first golden input.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use edgefleet_wire::npz::{NpzLimits, from_npz_bytes};

fn repo(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .join(rel)
}

fn read(rel: &str) -> Vec<edgefleet_wire::tensor::NamedTensor> {
    let mut v = from_npz_bytes(&std::fs::read(repo(rel)).unwrap(), NpzLimits::default()).unwrap();
    v.sort_by(|a, b| a.name.cmp(&b.name));
    v
}

#[test]
fn reads_what_numpy_savez_and_savez_compressed_write() {
    let expected = read("models/multi/golden/in_0.npz");
    assert_eq!(expected.len(), 2);
    for file in [
        "tests/data/npz/savez_multi_in_0.npz",
        "tests/data/npz/savez_compressed_multi_in_0.npz",
    ] {
        let got = read(file);
        assert_eq!(got, expected, "{file}");
        let ids = got.iter().find(|t| t.name == "step/ids").unwrap();
        assert_eq!(ids.tensor.shape(), &[1, 4]);
        assert_eq!(ids.tensor.as_i64().unwrap().len(), 4);
    }
}
