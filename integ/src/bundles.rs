//! Bundles of the real models in `models/`, packed with `fleetctl`'s own
//! packer: the one place the tests build a `PackRequest`.

use std::path::PathBuf;

use edgefleet_wire::keys::signing_key_from_seed;
use edgefleet_wire::manifest::{NonFiniteInputs, TargetArch};
use fleetctl::pack::{PackRequest, PayloadCompression, pack};

use crate::common::repo;

/// A model of `models/` and its golden cases.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Model {
    /// The PP-OCR text-orientation classifier (bundle name `cls`).
    Cls,
    /// Its int8 form (same inputs and outputs, bundle name `cls`).
    ClsInt8,
    /// A tiny two-input, two-output model (bundle name `multi-io`): packs
    /// in milliseconds.
    MultiIo,
    /// The PP-OCRv4 recognizer (bundle name `rec`): a 10 MiB model, for
    /// bundles larger than one upload part.
    Rec,
}

impl Model {
    fn files(self) -> (&'static str, &'static str, &'static str, usize, f32) {
        match self {
            Model::Cls => (
                "cls",
                "models/cls/ch_ppocr_mobile_v2.0_cls_infer.onnx",
                "models/cls/golden",
                2,
                1e-4,
            ),
            Model::ClsInt8 => (
                "cls",
                "models/cls-int8/cls_int8.onnx",
                "models/cls-int8/golden",
                2,
                1e-4,
            ),
            Model::MultiIo => (
                "multi-io",
                "models/multi/multi_io.onnx",
                "models/multi/golden",
                1,
                1e-5,
            ),
            Model::Rec => (
                "rec",
                "models/rec/ch_PP-OCRv4_rec_infer.onnx",
                "models/rec/golden",
                1,
                1e-4,
            ),
        }
    }
}

/// What to pack; [`Pack::new`] gives version `1.<minor>.0`, sequence
/// `10 × minor`, signed by key seed 1, valid a day, every target.
#[derive(Clone, Debug)]
pub struct Pack {
    pub model: Model,
    pub minor: u64,
    /// The version's third number (0 by default).
    pub patch: u64,
    pub sequence: u64,
    pub key_seed: u8,
    pub expires_in: u64,
    /// Signing time; default: now.
    pub issued: Option<u64>,
    pub targets: Vec<TargetArch>,
    pub nnef: bool,
    pub baseline: Option<PathBuf>,
}

impl Pack {
    pub fn new(model: Model, minor: u64) -> Pack {
        Pack {
            model,
            minor,
            patch: 0,
            sequence: minor * 10,
            key_seed: 1,
            expires_in: 86_400,
            issued: None,
            targets: TargetArch::ALL.to_vec(),
            nnef: false,
            baseline: None,
        }
    }

    /// The bundle's bytes.
    pub fn bytes(&self) -> Vec<u8> {
        let (name, model, golden, cases, tolerance) = self.model.files();
        let files = |k: &str| {
            (0..cases)
                .map(|i| repo(&format!("{golden}/{k}_{i}.npz")))
                .collect::<Vec<_>>()
        };
        let req = PackRequest {
            model: repo(model),
            name: name.parse().expect("a valid model name"),
            version: semver::Version::new(1, self.minor, self.patch),
            sequence: self.sequence,
            golden_inputs: files("in"),
            golden_outputs: files("out"),
            tolerance,
            keys: vec![signing_key_from_seed([self.key_seed; 32])],
            now: self.issued.unwrap_or_else(edgefleet_wire::time::unix_now),
            expires_in: self.expires_in,
            nnef: self.nnef,
            targets: self.targets.clone(),
            min_agent_version: semver::Version::new(0, 1, 0),
            non_finite_inputs: NonFiniteInputs::Reject,
            baseline: self.baseline.clone(),
            max_latency_ms: None,
            compression: PayloadCompression::Auto,
        };
        pack(&req).expect("the test models pack").bundle
    }
}
