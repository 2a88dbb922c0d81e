//! JSON encoding of tensors for the local API:
//! `{"dtype": "f32", "shape": [1, 3], "data": [0.1, 0.2, 0.3]}`.
//!
//! `data` is the flat row-major element list. Floats accept `null` for NaN
//! (JSON has no NaN literal); bools accept `true`/`false` or `0`/`1`.
//! Integers must be integral and in range for their dtype.

use edgefleet_wire::tensor::{DType, NamedTensor, Tensor, element_count};
use serde::{Deserialize, Serialize};

/// A decoding failure, with the stable code the API reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodecError {
    pub code: &'static str,
    pub message: String,
}

fn err(code: &'static str, message: String) -> CodecError {
    CodecError { code, message }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonTensorIn {
    dtype: String,
    shape: Vec<u64>,
    data: Vec<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InferRequest {
    inputs: serde_json::Map<String, serde_json::Value>,
}

/// Decodes a `POST /v1/infer` JSON body into named tensors.
pub fn decode_request(body: &[u8]) -> Result<Vec<NamedTensor>, CodecError> {
    let req: InferRequest = serde_json::from_slice(body)
        .map_err(|e| err("malformed_json", format!("request body: {e}")))?;
    req.inputs
        .into_iter()
        .map(|(name, v)| {
            let t: JsonTensorIn = serde_json::from_value(v)
                .map_err(|e| err("malformed_json", format!("input {name:?}: {e}")))?;
            Ok(NamedTensor::new(name.clone(), decode_tensor(&name, t)?))
        })
        .collect()
}

fn decode_tensor(name: &str, t: JsonTensorIn) -> Result<Tensor, CodecError> {
    let dtype = DType::from_name(&t.dtype).ok_or_else(|| {
        err(
            "unknown_dtype",
            format!("input {name:?}: unknown dtype {:?}", t.dtype),
        )
    })?;
    let count =
        element_count(&t.shape).map_err(|e| err("wrong_shape", format!("input {name:?}: {e}")))?;
    if count != t.data.len() as u64 {
        return Err(err(
            "element_count",
            format!(
                "input {name:?}: shape {:?} needs {count} elements, data has {}",
                t.shape,
                t.data.len()
            ),
        ));
    }
    let mut bytes = Vec::with_capacity(t.data.len() * dtype.size());
    for (i, v) in t.data.iter().enumerate() {
        let bad = || {
            err(
                "bad_value",
                format!("input {name:?}: element {i} ({v}) is not a valid {dtype}"),
            )
        };
        match dtype {
            DType::F32 => {
                bytes.extend_from_slice(&(float(v).ok_or_else(bad)? as f32).to_le_bytes())
            }
            DType::F64 => bytes.extend_from_slice(&float(v).ok_or_else(bad)?.to_le_bytes()),
            DType::F16 => {
                return Err(err(
                    "unknown_dtype",
                    format!("input {name:?}: f16 is accepted in .npz bodies only"),
                ));
            }
            DType::I8 => bytes.extend_from_slice(&int::<i8>(v).ok_or_else(bad)?.to_le_bytes()),
            DType::I16 => bytes.extend_from_slice(&int::<i16>(v).ok_or_else(bad)?.to_le_bytes()),
            DType::I32 => bytes.extend_from_slice(&int::<i32>(v).ok_or_else(bad)?.to_le_bytes()),
            DType::I64 => bytes.extend_from_slice(&v.as_i64().ok_or_else(bad)?.to_le_bytes()),
            DType::U8 => bytes.extend_from_slice(&uint::<u8>(v).ok_or_else(bad)?.to_le_bytes()),
            DType::U16 => bytes.extend_from_slice(&uint::<u16>(v).ok_or_else(bad)?.to_le_bytes()),
            DType::U32 => bytes.extend_from_slice(&uint::<u32>(v).ok_or_else(bad)?.to_le_bytes()),
            DType::U64 => bytes.extend_from_slice(&v.as_u64().ok_or_else(bad)?.to_le_bytes()),
            DType::Bool => bytes.push(match v {
                serde_json::Value::Bool(b) => u8::from(*b),
                other => match other.as_u64() {
                    Some(0) => 0,
                    Some(1) => 1,
                    _ => return Err(bad()),
                },
            }),
        }
    }
    Tensor::from_bytes(dtype, t.shape, bytes)
        .map_err(|e| err("bad_value", format!("input {name:?}: {e}")))
}

fn float(v: &serde_json::Value) -> Option<f64> {
    match v {
        serde_json::Value::Null => Some(f64::NAN),
        other => other.as_f64(),
    }
}

fn int<T: TryFrom<i64>>(v: &serde_json::Value) -> Option<T> {
    T::try_from(v.as_i64()?).ok()
}

fn uint<T: TryFrom<u64>>(v: &serde_json::Value) -> Option<T> {
    T::try_from(v.as_u64()?).ok()
}

/// Element data typed for serialization (floats print in their own
/// precision; NaN/inf become `null`).
#[derive(Debug, Serialize)]
#[serde(untagged)]
enum Data {
    F32(Vec<f32>),
    F64(Vec<f64>),
    I64(Vec<i64>),
    U64(Vec<u64>),
    Bool(Vec<bool>),
}

/// A tensor in the API's JSON form.
#[derive(Debug, Serialize)]
pub struct JsonTensorOut {
    dtype: DType,
    shape: Vec<u64>,
    data: Data,
}

/// The `POST /v1/infer` JSON response, serialized straight from the tensors.
#[derive(Debug, Serialize)]
pub struct InferResponse<'a> {
    pub outputs: std::collections::BTreeMap<&'a str, JsonTensorOut>,
    pub model: ModelRef<'a>,
    pub latency_ms: f64,
}

/// Name and version of the model that answered.
#[derive(Debug, Serialize)]
pub struct ModelRef<'a> {
    pub name: &'a str,
    pub version: &'a str,
}

#[derive(Serialize)]
struct RequestOut<'a> {
    inputs: std::collections::BTreeMap<&'a str, JsonTensorOut>,
}

/// Named tensors keyed by name in their JSON form.
pub fn encode_named(tensors: &[NamedTensor]) -> std::collections::BTreeMap<&str, JsonTensorOut> {
    tensors
        .iter()
        .map(|t| (t.name.as_str(), encode_tensor(&t.tensor)))
        .collect()
}

/// A `POST /v1/infer` JSON request body for these inputs (clients, bench).
pub fn encode_request(inputs: &[NamedTensor]) -> serde_json::Result<Vec<u8>> {
    serde_json::to_vec(&RequestOut {
        inputs: encode_named(inputs),
    })
}

/// Encodes a tensor for a JSON response.
pub fn encode_tensor(t: &Tensor) -> JsonTensorOut {
    let data = match t.dtype() {
        DType::F32 => Data::F32(t.as_f32().unwrap_or_default()),
        DType::F64 | DType::F16 => Data::F64(t.iter_f64().collect()),
        DType::Bool => Data::Bool(t.data().iter().map(|&b| b != 0).collect()),
        DType::U64 => Data::U64(
            t.data()
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                .collect(),
        ),
        DType::I64 => Data::I64(t.as_i64().unwrap_or_default()),
        // Narrow integers are exact in f64 and in i64.
        _ => Data::I64(t.iter_f64().map(|v| v as i64).collect()),
    };
    JsonTensorOut {
        dtype: t.dtype(),
        shape: t.shape().to_vec(),
        data,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_f32_and_i64_inputs_with_slashes_in_names() {
        let body = br#"{"inputs": {"x": {"dtype": "f32", "shape": [1, 2], "data": [0.5, null]},
                        "step/ids": {"dtype": "i64", "shape": [2], "data": [3, -4]}}}"#;
        let ts = decode_request(body).unwrap();
        let x = ts
            .iter()
            .find(|t| t.name == "x")
            .unwrap()
            .tensor
            .as_f32()
            .unwrap();
        assert_eq!(x[0], 0.5);
        assert!(x[1].is_nan());
        let ids = ts
            .iter()
            .find(|t| t.name == "step/ids")
            .unwrap()
            .tensor
            .as_i64()
            .unwrap();
        assert_eq!(ids, vec![3, -4]);
    }

    #[test]
    fn rejects_with_specific_codes() {
        let cases: &[(&[u8], &str)] = &[
            (b"{", "malformed_json"),
            (
                br#"{"inputs": {"x": {"dtype": "f32", "shape": [2]}}}"#,
                "malformed_json",
            ),
            (br#"{"inputs": {}, "extra": 1}"#, "malformed_json"),
            (
                br#"{"inputs": {"x": {"dtype": "f33", "shape": [1], "data": [1]}}}"#,
                "unknown_dtype",
            ),
            (
                br#"{"inputs": {"x": {"dtype": "f32", "shape": [3], "data": [1, 2]}}}"#,
                "element_count",
            ),
            (
                br#"{"inputs": {"x": {"dtype": "i64", "shape": [1], "data": [1.5]}}}"#,
                "bad_value",
            ),
            (
                br#"{"inputs": {"x": {"dtype": "u8", "shape": [1], "data": [256]}}}"#,
                "bad_value",
            ),
            (
                br#"{"inputs": {"x": {"dtype": "f32", "shape": [1], "data": ["a"]}}}"#,
                "bad_value",
            ),
        ];
        for (body, code) in cases {
            let e = decode_request(body).unwrap_err();
            assert_eq!(
                e.code,
                *code,
                "{}: {}",
                String::from_utf8_lossy(body),
                e.message
            );
        }
    }

    #[test]
    fn encodes_f32_shortest_and_nan_as_null() {
        let t = Tensor::from_f32(vec![2], &[0.1, f32::NAN]).unwrap();
        let s = serde_json::to_string(&encode_tensor(&t)).unwrap();
        assert_eq!(s, r#"{"dtype":"f32","shape":[2],"data":[0.1,null]}"#);
    }
}
