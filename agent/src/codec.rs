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

/// One JSON element, kept in 16 bytes (not a `serde_json::Value`).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Elem {
    Null,
    Bool(bool),
    I(i64),
    U(u64),
    F(f64),
    /// A string, array or object where a number belongs.
    Other,
}

impl std::fmt::Display for Elem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Elem::Null => write!(f, "null"),
            Elem::Bool(b) => write!(f, "{b}"),
            Elem::I(v) => write!(f, "{v}"),
            Elem::U(v) => write!(f, "{v}"),
            Elem::F(v) => write!(f, "{v}"),
            Elem::Other => write!(f, "not a number"),
        }
    }
}

impl<'de> Deserialize<'de> for Elem {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Elem;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a number, a bool or null")
            }
            fn visit_bool<E>(self, v: bool) -> Result<Elem, E> {
                Ok(Elem::Bool(v))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Elem, E> {
                Ok(Elem::I(v))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Elem, E> {
                Ok(Elem::U(v))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Elem, E> {
                Ok(Elem::F(v))
            }
            fn visit_unit<E>(self) -> Result<Elem, E> {
                Ok(Elem::Null)
            }
            fn visit_none<E>(self) -> Result<Elem, E> {
                Ok(Elem::Null)
            }
            fn visit_str<E>(self, _: &str) -> Result<Elem, E> {
                Ok(Elem::Other)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> Result<Elem, A::Error> {
                // Drained without keeping anything (it is counted below as
                // one bad element).
                while a.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(Elem::Other)
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut a: A) -> Result<Elem, A::Error> {
                while a
                    .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
                    .is_some()
                {}
                Ok(Elem::Other)
            }
        }
        d.deserialize_any(V)
    }
}

/// The marker of the element-budget error inside serde's message.
const OVER_BUDGET: &str = "more data elements than this model takes";

thread_local! {
    /// Elements the request being decoded on this thread may still carry.
    static BUDGET: std::cell::Cell<u64> = const { std::cell::Cell::new(u64::MAX) };
}

/// A tensor's `data`, decoded element by element against the budget: a
/// body can never make the decoder hold more than the budget's worth.
struct Elems(Vec<Elem>);

impl<'de> Deserialize<'de> for Elems {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Elems;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an array of elements")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> Result<Elems, A::Error> {
                let left = BUDGET.with(std::cell::Cell::get);
                let hint = a.size_hint().unwrap_or(0).min(left as usize).min(1 << 16);
                let mut out = Vec::with_capacity(hint);
                loop {
                    let left = BUDGET.with(std::cell::Cell::get);
                    if left == 0 {
                        // One more element would be over: stop here.
                        if a.next_element::<serde::de::IgnoredAny>()?.is_some() {
                            return Err(serde::de::Error::custom(OVER_BUDGET));
                        }
                        return Ok(Elems(out));
                    }
                    match a.next_element::<Elem>()? {
                        Some(e) => {
                            BUDGET.with(|b| b.set(left - 1));
                            out.push(e);
                        }
                        None => return Ok(Elems(out)),
                    }
                }
            }
        }
        d.deserialize_seq(V)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonTensorIn {
    dtype: String,
    shape: Vec<u64>,
    data: Elems,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InferRequest {
    inputs: std::collections::BTreeMap<String, JsonTensorIn>,
}

/// Decodes a `POST /v1/infer` JSON body into named tensors (no element
/// budget; see [`decode_request_within`]).
pub fn decode_request(body: &[u8]) -> Result<Vec<NamedTensor>, CodecError> {
    decode_request_within(body, u64::MAX)
}

/// Decodes a `POST /v1/infer` JSON body, holding at most `max_elements`
/// data elements across all inputs while parsing (`element_count` past
/// it): the decoder's memory is bounded by what the model takes, whatever
/// the body.
pub fn decode_request_within(
    body: &[u8],
    max_elements: u64,
) -> Result<Vec<NamedTensor>, CodecError> {
    BUDGET.with(|b| b.set(max_elements));
    let parsed: Result<InferRequest, _> = serde_json::from_slice(body);
    BUDGET.with(|b| b.set(u64::MAX));
    let req = parsed.map_err(|e| {
        if e.to_string().contains(OVER_BUDGET) {
            err(
                "element_count",
                format!("request body: {OVER_BUDGET} (at most {max_elements} in all)"),
            )
        } else {
            err("malformed_json", format!("request body: {e}"))
        }
    })?;
    req.inputs
        .into_iter()
        .map(|(name, t)| Ok(NamedTensor::new(name.clone(), decode_tensor(&name, t)?)))
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
    let data = t.data.0;
    if count != data.len() as u64 {
        return Err(err(
            "element_count",
            format!(
                "input {name:?}: shape {:?} needs {count} elements, data has {}",
                t.shape,
                data.len()
            ),
        ));
    }
    let mut bytes = Vec::with_capacity(data.len() * dtype.size());
    for (i, v) in data.iter().enumerate() {
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
            DType::F16 => bytes.extend_from_slice(
                &edgefleet_wire::tensor::f64_to_f16_bits(float(v).ok_or_else(bad)?).to_le_bytes(),
            ),
            DType::I8 => bytes.extend_from_slice(&int::<i8>(v).ok_or_else(bad)?.to_le_bytes()),
            DType::I16 => bytes.extend_from_slice(&int::<i16>(v).ok_or_else(bad)?.to_le_bytes()),
            DType::I32 => bytes.extend_from_slice(&int::<i32>(v).ok_or_else(bad)?.to_le_bytes()),
            DType::I64 => bytes.extend_from_slice(&int::<i64>(v).ok_or_else(bad)?.to_le_bytes()),
            DType::U8 => bytes.extend_from_slice(&uint::<u8>(v).ok_or_else(bad)?.to_le_bytes()),
            DType::U16 => bytes.extend_from_slice(&uint::<u16>(v).ok_or_else(bad)?.to_le_bytes()),
            DType::U32 => bytes.extend_from_slice(&uint::<u32>(v).ok_or_else(bad)?.to_le_bytes()),
            DType::U64 => bytes.extend_from_slice(&uint::<u64>(v).ok_or_else(bad)?.to_le_bytes()),
            DType::Bool => bytes.push(match v {
                Elem::Bool(b) => u8::from(*b),
                Elem::U(0) | Elem::I(0) => 0,
                Elem::U(1) | Elem::I(1) => 1,
                _ => return Err(bad()),
            }),
        }
    }
    Tensor::from_bytes(dtype, t.shape, bytes)
        .map_err(|e| err("bad_value", format!("input {name:?}: {e}")))
}

fn float(v: &Elem) -> Option<f64> {
    match *v {
        Elem::Null => Some(f64::NAN),
        Elem::F(x) => Some(x),
        Elem::I(x) => Some(x as f64),
        Elem::U(x) => Some(x as f64),
        Elem::Bool(_) | Elem::Other => None,
    }
}

fn int<T: TryFrom<i64>>(v: &Elem) -> Option<T> {
    let x = match *v {
        Elem::I(x) => x,
        Elem::U(x) => i64::try_from(x).ok()?,
        _ => return None,
    };
    T::try_from(x).ok()
}

fn uint<T: TryFrom<u64>>(v: &Elem) -> Option<T> {
    let x = match *v {
        Elem::U(x) => x,
        Elem::I(x) => u64::try_from(x).ok()?,
        _ => return None,
    };
    T::try_from(x).ok()
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

    /// fp16 models (common on Jetson boards) take JSON numbers, rounded
    /// to half precision as numpy's `astype(float16)` rounds them, and
    /// answer with JSON numbers.
    #[test]
    fn f16_inputs_take_json_numbers_and_outputs_are_numbers() {
        let body =
            br#"{"inputs": {"x": {"dtype": "f16", "shape": [5], "data": [1, -2.5, 0.1, 70000, null]}}}"#;
        let x = &decode_request(body).unwrap()[0].tensor;
        assert_eq!(x.dtype(), DType::F16);
        let halves: Vec<u16> = x
            .data()
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        assert_eq!(&halves[..4], [0x3c00, 0xc100, 0x2e66, 0x7c00]);
        assert_eq!(halves[4] & 0x7c00, 0x7c00);
        assert_ne!(halves[4] & 0x03ff, 0, "null is NaN");
        let out = serde_json::to_string(&encode_tensor(x)).unwrap();
        assert!(out.contains(r#""data":[1.0,-2.5,0.0999755859375"#), "{out}");
        let bad = br#"{"inputs": {"x": {"dtype": "f16", "shape": [1], "data": [true]}}}"#;
        assert_eq!(decode_request(bad).unwrap_err().code, "bad_value");
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
    fn the_element_budget_bounds_the_decoder_whatever_the_order_of_fields() {
        let body = br#"{"inputs": {"x": {"data": [1, 2, 3], "shape": [3], "dtype": "f32"}}}"#;
        assert_eq!(decode_request_within(body, 3).unwrap().len(), 1);
        let e = decode_request_within(body, 2).unwrap_err();
        assert_eq!(e.code, "element_count", "{}", e.message);
        // Across inputs, and nested junk counts as one bad element.
        let body = br#"{"inputs": {"a": {"dtype": "f32", "shape": [2], "data": [1, 2]},
                                    "b": {"dtype": "f32", "shape": [2], "data": [[1, 2, 3], 4]}}}"#;
        assert_eq!(
            decode_request_within(body, 3).unwrap_err().code,
            "element_count"
        );
        assert_eq!(
            decode_request_within(body, 4).unwrap_err().code,
            "bad_value"
        );
        // The budget does not leak into the next request on the thread.
        let ok = br#"{"inputs": {"x": {"dtype": "u8", "shape": [4], "data": [1, 2, 3, 4]}}}"#;
        assert!(decode_request(ok).is_ok());
    }

    #[test]
    fn encodes_f32_shortest_and_nan_as_null() {
        let t = Tensor::from_f32(vec![2], &[0.1, f32::NAN]).unwrap();
        let s = serde_json::to_string(&encode_tensor(&t)).unwrap();
        assert_eq!(s, r#"{"dtype":"f32","shape":[2],"data":[0.1,null]}"#);
    }
}
