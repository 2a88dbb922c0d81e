//! ONNX models whose weights live in separate files (`model.onnx` next to
//! `model.onnx.data`): what `torch.onnx.export` writes by default since
//! its dynamo exporter, and what every model over protobuf's 2 GiB limit
//! must be. A bundle carries one model file, so the packer inlines the
//! weights before it checks, converts and signs anything; the device never
//! reads a file the bundle does not contain.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Component, Path, PathBuf};

use prost::Message;
use tract_onnx::pb;

use crate::error::{Result, RuntimeError};

/// protobuf's limit on one message: a model with its weights inlined must
/// stay under it (ONNX's own limit for a single file).
const PROTOBUF_LIMIT: usize = i32::MAX as usize;

/// The ONNX file `bytes`, whose external data files are named relative to
/// `dir` (the model file's folder), with every external tensor's bytes
/// inlined. A model without external data comes back unchanged, byte for
/// byte.
pub fn inline_external_data(bytes: Vec<u8>, dir: &Path) -> Result<Vec<u8>> {
    let mut model = pb::ModelProto::decode(&bytes[..])
        .map_err(|e| load(format!("not an ONNX model (protobuf: {e})")))?;
    let mut files = Files {
        dir,
        open: HashMap::new(),
        inlined: 0,
    };
    if let Some(graph) = model.graph.as_mut() {
        files.graph(graph)?;
    }
    for function in &mut model.functions {
        for node in &mut function.node {
            files.node(node)?;
        }
    }
    if files.inlined == 0 {
        return Ok(bytes);
    }
    let len = model.encoded_len();
    if len > PROTOBUF_LIMIT {
        return Err(load(format!(
            "with its external data inlined the model is {len} bytes, over protobuf's 2 GiB \
             limit for one ONNX file"
        )));
    }
    Ok(model.encode_to_vec())
}

fn load(detail: String) -> RuntimeError {
    RuntimeError::Load { detail }
}

/// The external data files, opened once each.
struct Files<'a> {
    dir: &'a Path,
    open: HashMap<PathBuf, File>,
    inlined: usize,
}

impl Files<'_> {
    fn graph(&mut self, graph: &mut pb::GraphProto) -> Result<()> {
        for tensor in &mut graph.initializer {
            self.tensor(tensor)?;
        }
        for sparse in &mut graph.sparse_initializer {
            self.sparse(sparse)?;
        }
        for node in &mut graph.node {
            self.node(node)?;
        }
        Ok(())
    }

    fn node(&mut self, node: &mut pb::NodeProto) -> Result<()> {
        for attr in &mut node.attribute {
            if let Some(t) = attr.t.as_mut() {
                self.tensor(t)?;
            }
            for t in &mut attr.tensors {
                self.tensor(t)?;
            }
            if let Some(s) = attr.sparse_tensor.as_mut() {
                self.sparse(s)?;
            }
            if let Some(g) = attr.g.as_mut() {
                self.graph(g)?;
            }
            for g in &mut attr.graphs {
                self.graph(g)?;
            }
        }
        Ok(())
    }

    fn sparse(&mut self, sparse: &mut pb::SparseTensorProto) -> Result<()> {
        if let Some(values) = sparse.values.as_mut() {
            self.tensor(values)?;
        }
        if let Some(indices) = sparse.indices.as_mut() {
            self.tensor(indices)?;
        }
        Ok(())
    }

    fn tensor(&mut self, tensor: &mut pb::TensorProto) -> Result<()> {
        if tensor.data_location != Some(pb::tensor_proto::DataLocation::External as i32) {
            return Ok(());
        }
        let what =
            |detail: String| load(format!("tensor {:?}: external data: {detail}", tensor.name));
        let entry = |key: &str| {
            tensor
                .external_data
                .iter()
                .find(|e| e.key == key)
                .map(|e| e.value.as_str())
        };
        let number = |key: &str| -> Result<Option<u64>> {
            entry(key)
                .map(|v| {
                    v.parse::<u64>()
                        .map_err(|_| what(format!("{key} {v:?} is not a byte count")))
                })
                .transpose()
        };
        let location = entry("location").ok_or_else(|| what("no location".into()))?;
        let relative = Path::new(location);
        // ONNX names the file relative to the model's folder; nothing
        // outside that folder is read into a signed bundle.
        if relative.as_os_str().is_empty()
            || relative
                .components()
                .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
        {
            return Err(what(format!(
                "location {location:?} must be a path inside the model's folder"
            )));
        }
        let offset = number("offset")?.unwrap_or(0);
        let length = number("length")?;
        let path = self.dir.join(relative);
        let file = match self.open.entry(path.clone()) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(
                File::open(&path).map_err(|err| what(format!("{}: {err}", path.display())))?,
            ),
        };
        let size = file
            .metadata()
            .map_err(|err| what(format!("{}: {err}", path.display())))?
            .len();
        let end = match length {
            Some(len) => offset.checked_add(len),
            None => Some(size),
        };
        let end = end
            .filter(|&end| end <= size && offset <= end)
            .ok_or_else(|| {
                what(format!(
                    "{}: bytes {offset}..{} are outside the file ({size} bytes)",
                    path.display(),
                    length.map_or("end".into(), |l| offset.saturating_add(l).to_string())
                ))
            })?;
        let len = usize::try_from(end - offset)
            .ok()
            .filter(|&len| len <= PROTOBUF_LIMIT)
            .ok_or_else(|| {
                what(format!(
                    "{} bytes is over protobuf's 2 GiB limit",
                    end - offset
                ))
            })?;
        let mut data = vec![0u8; len];
        file.seek(SeekFrom::Start(offset))
            .and_then(|_| file.read_exact(&mut data))
            .map_err(|err| what(format!("{}: {err}", path.display())))?;
        tensor.raw_data = data;
        tensor.external_data.clear();
        tensor.data_location = None;
        self.inlined += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Model;
    use edgefleet_wire::manifest::ModelFormat;
    use edgefleet_wire::tensor::{NamedTensor, max_abs_diff};

    fn repo(p: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(p)
    }

    fn golden(which: &str) -> Vec<NamedTensor> {
        let f = File::open(repo(&format!("models/cls/golden/{which}.npz"))).unwrap();
        edgefleet_wire::npz::read_npz(f, edgefleet_wire::npz::NpzLimits::default()).unwrap()
    }

    fn cls() -> Vec<u8> {
        std::fs::read(repo("models/cls/ch_ppocr_mobile_v2.0_cls_infer.onnx")).unwrap()
    }

    /// cls with every tensor over 64 bytes (its weights are `float_data`
    /// in `Constant` nodes) moved to `dir/weights.data`, named as `location`, laid out
    /// as torch.onnx writes it: one file, tensors back to back.
    fn externalize(dir: &Path, location: &str) -> (Vec<u8>, usize) {
        let mut model = pb::ModelProto::decode(&cls()[..]).unwrap();
        let graph = model.graph.as_mut().unwrap();
        let constants = graph
            .node
            .iter_mut()
            .flat_map(|n| n.attribute.iter_mut())
            .filter_map(|a| a.t.as_mut());
        let mut data = Vec::new();
        let mut moved = 0;
        for t in graph.initializer.iter_mut().chain(constants) {
            // Exporters write external tensors as raw little-endian bytes.
            if t.raw_data.is_empty() {
                t.raw_data = t.float_data.drain(..).flat_map(f32::to_le_bytes).collect();
            }
            if t.raw_data.len() <= 64 {
                continue;
            }
            let entry = |key: &str, value: String| pb::StringStringEntryProto {
                key: key.into(),
                value,
            };
            t.external_data = vec![
                entry("location", location.into()),
                entry("offset", data.len().to_string()),
                entry("length", t.raw_data.len().to_string()),
            ];
            data.append(&mut t.raw_data);
            t.data_location = Some(pb::tensor_proto::DataLocation::External as i32);
            moved += 1;
        }
        std::fs::write(dir.join("weights.data"), &data).unwrap();
        (model.encode_to_vec(), moved)
    }

    fn refusal(external: Vec<u8>, dir: &Path) -> RuntimeError {
        match inline_external_data(external, dir) {
            Ok(_) => panic!("inlined"),
            Err(e) => e,
        }
    }

    /// The exported pair loads after inlining and computes cls's golden
    /// outputs; tract alone cannot read it from bytes.
    #[test]
    fn external_weights_are_inlined_and_the_model_computes_its_goldens() {
        let dir = tempfile::tempdir().unwrap();
        let (external, moved) = externalize(dir.path(), "weights.data");
        assert!(moved > 10, "{moved}");
        let inputs = golden("in_0");
        let specs: Vec<_> = inputs.iter().map(NamedTensor::spec).collect();
        match Model::load(ModelFormat::Onnx, &external, &specs, None) {
            Ok(_) => panic!("tract read external data it was not given"),
            Err(e) => assert!(e.to_string().contains("external data"), "{e}"),
        }

        let inlined = inline_external_data(external, dir.path()).unwrap();
        let model = Model::load(ModelFormat::Onnx, &inlined, &specs, None).unwrap();
        let outputs = model.session().unwrap().run(&inputs).unwrap();
        let expected = golden("out_0");
        assert_eq!(outputs.len(), expected.len());
        for (got, want) in outputs.iter().zip(&expected) {
            let diff = max_abs_diff(&got.tensor, &want.tensor).unwrap();
            assert!(diff.max_abs < 1e-4, "{}: {diff:?}", want.name);
        }
    }

    #[test]
    fn a_model_without_external_data_is_returned_byte_for_byte() {
        let bytes = cls();
        assert_eq!(
            inline_external_data(bytes.clone(), Path::new("/nonexistent")).unwrap(),
            bytes
        );
    }

    /// Locations outside the model's folder, missing files and ranges past
    /// a file's end each get an error naming the tensor and the cause.
    #[test]
    fn bad_external_data_is_refused_with_the_tensor_and_the_cause() {
        let dir = tempfile::tempdir().unwrap();
        for (location, cause) in [
            (
                "../weights.data",
                "must be a path inside the model's folder",
            ),
            ("/etc/passwd", "must be a path inside the model's folder"),
            ("missing.data", "No such file"),
        ] {
            let (external, _) = externalize(dir.path(), location);
            let e = refusal(external, dir.path());
            assert_eq!(e.code(), "model_load_failed");
            let msg = e.to_string();
            assert!(
                msg.contains("external data") && msg.contains(cause),
                "{msg}"
            );
            assert!(msg.contains("tensor \""), "{msg}");
        }
        let (external, _) = externalize(dir.path(), "weights.data");
        let full = std::fs::metadata(dir.path().join("weights.data"))
            .unwrap()
            .len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(dir.path().join("weights.data"))
            .unwrap()
            .set_len(full - 1)
            .unwrap();
        let msg = inline_external_data(external, dir.path())
            .unwrap_err()
            .to_string();
        assert!(msg.contains("outside the file"), "{msg}");
    }
}
