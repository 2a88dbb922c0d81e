//! NumPy `.npy` and `.npz` encoding.
//!
//! Golden vectors, calibration sets and large inference bodies travel as
//! `.npz`, because every ML toolchain can write it (`numpy.savez`). Entry
//! names are the model's tensor names, which may contain `/`; `numpy.savez`
//! stores them verbatim with a `.npy` suffix.
//!
//! The reader treats its input as untrusted: header sizes, entry sizes and
//! the total are checked against [`NpzLimits`] before anything is allocated.

use std::io::{Read, Seek, Write};

use crate::error::{Error, Result};
use crate::tensor::{DType, NamedTensor, Tensor, check_tensor_name, element_count};

const NPY_MAGIC: &[u8; 6] = b"\x93NUMPY";
/// Longest `.npy` header accepted (numpy itself writes < 200 bytes).
const MAX_NPY_HEADER: usize = 64 * 1024;

/// Size caps for decoding untrusted `.npz` data.
#[derive(Clone, Copy, Debug)]
pub struct NpzLimits {
    /// Most entries in one archive.
    pub max_entries: usize,
    /// Most decoded bytes over all entries.
    pub max_total_bytes: u64,
}

impl Default for NpzLimits {
    fn default() -> Self {
        NpzLimits {
            max_entries: 256,
            max_total_bytes: 512 * 1024 * 1024,
        }
    }
}

fn descr(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "<f4",
        DType::F64 => "<f8",
        DType::F16 => "<f2",
        DType::I8 => "|i1",
        DType::I16 => "<i2",
        DType::I32 => "<i4",
        DType::I64 => "<i8",
        DType::U8 => "|u1",
        DType::U16 => "<u2",
        DType::U32 => "<u4",
        DType::U64 => "<u8",
        DType::Bool => "|b1",
    }
}

/// Parses a numpy type string; returns the dtype and whether it is big-endian.
fn parse_descr(s: &str) -> Result<(DType, bool)> {
    let (order, code) = s
        .split_at_checked(1)
        .ok_or_else(|| bad_npy("empty descr"))?;
    let big = match order {
        "<" | "|" | "=" => false,
        ">" => true,
        _ => return Err(bad_npy(format!("unsupported dtype {s:?}"))),
    };
    let dtype = match code {
        "f4" => DType::F32,
        "f8" => DType::F64,
        "f2" => DType::F16,
        "i1" => DType::I8,
        "i2" => DType::I16,
        "i4" => DType::I32,
        "i8" => DType::I64,
        "u1" => DType::U8,
        "u2" => DType::U16,
        "u4" => DType::U32,
        "u8" => DType::U64,
        "b1" => DType::Bool,
        _ => return Err(bad_npy(format!("unsupported dtype {s:?}"))),
    };
    Ok((dtype, big))
}

fn bad_npy(detail: impl std::fmt::Display) -> Error {
    Error::malformed("npy", detail)
}

/// Writes one tensor as a version 1.0 `.npy` stream.
pub fn write_npy<W: Write>(mut w: W, t: &Tensor) -> Result<()> {
    let shape = match t.shape() {
        [] => "()".to_string(),
        [d] => format!("({d},)"),
        dims => format!(
            "({})",
            dims.iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut header = format!(
        "{{'descr': '{}', 'fortran_order': False, 'shape': {shape}, }}",
        descr(t.dtype())
    );
    // Pad so that magic + version + len + header + '\n' is a multiple of 64.
    let unpadded = NPY_MAGIC.len() + 2 + 2 + header.len() + 1;
    header.extend(std::iter::repeat_n(' ', (64 - unpadded % 64) % 64));
    header.push('\n');
    let io = |e| Error::Io {
        what: "npy output",
        source: e,
    };
    let len = u16::try_from(header.len()).map_err(|_| bad_npy("header too long"))?;
    w.write_all(NPY_MAGIC).map_err(io)?;
    w.write_all(&[1, 0]).map_err(io)?;
    w.write_all(&len.to_le_bytes()).map_err(io)?;
    w.write_all(header.as_bytes()).map_err(io)?;
    w.write_all(t.data()).map_err(io)?;
    Ok(())
}

/// Reads one `.npy` stream, refusing payloads over `max_bytes`.
pub fn read_npy<R: Read>(mut r: R, max_bytes: u64) -> Result<Tensor> {
    let io = |e: std::io::Error| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            bad_npy("unexpected end of data")
        } else {
            Error::Io {
                what: "npy input",
                source: e,
            }
        }
    };
    let mut pre = [0u8; 8];
    r.read_exact(&mut pre).map_err(io)?;
    if &pre[..6] != NPY_MAGIC {
        return Err(bad_npy("missing \\x93NUMPY magic"));
    }
    let header_len = match pre[6] {
        1 => {
            let mut len = [0u8; 2];
            r.read_exact(&mut len).map_err(io)?;
            u16::from_le_bytes(len) as usize
        }
        2 | 3 => {
            let mut len = [0u8; 4];
            r.read_exact(&mut len).map_err(io)?;
            u32::from_le_bytes(len) as usize
        }
        v => return Err(bad_npy(format!("unsupported npy version {v}"))),
    };
    if header_len > MAX_NPY_HEADER {
        return Err(bad_npy(format!("header of {header_len} bytes")));
    }
    let mut header = vec![0u8; header_len];
    r.read_exact(&mut header).map_err(io)?;
    let header = std::str::from_utf8(&header).map_err(|_| bad_npy("header is not UTF-8"))?;
    let (dtype, big_endian, shape) = parse_header(header)?;
    let count = element_count(&shape)?;
    let nbytes = count
        .checked_mul(dtype.size() as u64)
        .filter(|&n| n <= max_bytes)
        .ok_or_else(|| Error::TooLarge {
            what: "npy array",
            size: count.saturating_mul(dtype.size() as u64),
            limit: max_bytes,
        })?;
    let mut data = Vec::new();
    r.take(nbytes).read_to_end(&mut data).map_err(io)?;
    if data.len() as u64 != nbytes {
        return Err(bad_npy(format!(
            "{dtype}{shape:?} needs {nbytes} data bytes, found {}",
            data.len()
        )));
    }
    if big_endian && dtype.size() > 1 {
        for chunk in data.chunks_exact_mut(dtype.size()) {
            chunk.reverse();
        }
    }
    Tensor::from_bytes(dtype, shape, data)
}

/// Parses the Python-dict header numpy writes, e.g.
/// `{'descr': '<f4', 'fortran_order': False, 'shape': (1, 3), }`.
fn parse_header(h: &str) -> Result<(DType, bool, Vec<u64>)> {
    let value_after = |key: &str| -> Result<&str> {
        let k = format!("'{key}':");
        let at = h
            .find(&k)
            .ok_or_else(|| bad_npy(format!("header lacks {key:?}")))?;
        Ok(h[at + k.len()..].trim_start())
    };
    let d = value_after("descr")?;
    let d = d
        .strip_prefix('\'')
        .and_then(|d| d.split_once('\''))
        .map(|(v, _)| v)
        .ok_or_else(|| bad_npy("descr is not a string (structured dtypes are unsupported)"))?;
    let (dtype, big) = parse_descr(d)?;
    let f = value_after("fortran_order")?;
    if f.starts_with("True") {
        return Err(bad_npy(
            "fortran_order arrays are unsupported; save with numpy.ascontiguousarray",
        ));
    } else if !f.starts_with("False") {
        return Err(bad_npy("fortran_order is not a bool"));
    }
    let s = value_after("shape")?;
    let inner = s
        .strip_prefix('(')
        .and_then(|s| s.split_once(')'))
        .map(|(v, _)| v)
        .ok_or_else(|| bad_npy("shape is not a tuple"))?;
    let shape = inner
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.trim_end_matches('L')
                .parse::<u64>()
                .map_err(|_| bad_npy(format!("bad dimension {p:?}")))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((dtype, big, shape))
}

/// Reads every array of an `.npz` archive (stored or deflated entries).
/// Entry names lose their `.npy` suffix; order follows the archive.
pub fn read_npz<R: Read + Seek>(r: R, limits: NpzLimits) -> Result<Vec<NamedTensor>> {
    let zip_err = |e: zip::result::ZipError| Error::malformed("npz", e);
    let mut archive = zip::ZipArchive::new(r).map_err(zip_err)?;
    if archive.len() > limits.max_entries {
        return Err(Error::TooLarge {
            what: "npz entry count",
            size: archive.len() as u64,
            limit: limits.max_entries as u64,
        });
    }
    let mut out: Vec<NamedTensor> = Vec::with_capacity(archive.len());
    let mut budget = limits.max_total_bytes;
    for i in 0..archive.len() {
        let entry = archive.by_index(i).map_err(zip_err)?;
        if entry.is_dir() {
            continue;
        }
        let raw_name = entry.name().map_err(zip_err)?.into_owned();
        let name = raw_name
            .strip_suffix(".npy")
            .unwrap_or(&raw_name)
            .to_string();
        check_tensor_name(&name)?;
        if out.iter().any(|t| t.name == name) {
            return Err(Error::malformed("npz", format!("duplicate entry {name:?}")));
        }
        // The declared size is attacker-controlled too; the npy reader caps
        // what it actually reads at the remaining budget.
        let tensor = read_npy(entry, budget).map_err(|e| match e {
            Error::Malformed { detail, .. } => {
                Error::malformed("npz", format!("entry {name:?}: {detail}"))
            }
            other => other,
        })?;
        budget -= tensor.data().len() as u64;
        out.push(NamedTensor { name, tensor });
    }
    Ok(out)
}

/// Writes tensors as an uncompressed `.npz` archive, readable by `numpy.load`.
pub fn write_npz<W: Write + Seek>(w: W, tensors: &[NamedTensor]) -> Result<()> {
    let zip_err = |e: zip::result::ZipError| Error::Io {
        what: "npz output",
        source: std::io::Error::other(e),
    };
    let mut zw = zip::ZipWriter::new(w);
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .large_file(
            tensors
                .iter()
                .any(|t| t.tensor.data().len() > u32::MAX as usize / 2),
        );
    for t in tensors {
        check_tensor_name(&t.name)?;
        zw.start_file(format!("{}.npy", t.name), opts)
            .map_err(zip_err)?;
        write_npy(&mut zw, &t.tensor)?;
    }
    zw.finish().map_err(zip_err)?;
    Ok(())
}

/// Convenience: an `.npz` archive as bytes.
pub fn to_npz_bytes(tensors: &[NamedTensor]) -> Result<Vec<u8>> {
    let mut cur = std::io::Cursor::new(Vec::new());
    write_npz(&mut cur, tensors)?;
    Ok(cur.into_inner())
}

/// Convenience: decode an in-memory `.npz` archive.
pub fn from_npz_bytes(bytes: &[u8], limits: NpzLimits) -> Result<Vec<NamedTensor>> {
    read_npz(std::io::Cursor::new(bytes), limits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trips_names_with_slashes_and_int64() {
        let ts = vec![
            NamedTensor::new(
                "x",
                Tensor::from_f32(vec![1, 3], &[1.0, -2.5, 3.25]).unwrap(),
            ),
            NamedTensor::new("step/ids", Tensor::from_i64(vec![2], &[7, -1]).unwrap()),
            NamedTensor::new("scalar", Tensor::from_f64(vec![], &[0.5]).unwrap()),
        ];
        let bytes = to_npz_bytes(&ts).unwrap();
        let back = from_npz_bytes(&bytes, NpzLimits::default()).unwrap();
        assert_eq!(back, ts);
    }

    #[test]
    fn parses_numpy_header_forms() {
        let (d, big, s) =
            parse_header("{'descr': '>i8', 'fortran_order': False, 'shape': (4L, 2), }").unwrap();
        assert_eq!((d, big, s), (DType::I64, true, vec![4, 2]));
        let (_, _, s) =
            parse_header("{'descr': '<f4', 'fortran_order': False, 'shape': (), }").unwrap();
        assert!(s.is_empty());
        assert!(parse_header("{'descr': '<f4', 'fortran_order': True, 'shape': (2,), }").is_err());
        assert!(
            parse_header("{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (2,), }")
                .is_err()
        );
    }

    #[test]
    fn refuses_arrays_over_the_byte_limit_before_reading_them() {
        let t = Tensor::from_f32(vec![1000], &[0.0; 1000]).unwrap();
        let mut buf = Vec::new();
        write_npy(&mut buf, &t).unwrap();
        let err = read_npy(&buf[..], 100).unwrap_err();
        assert_eq!(err.code(), "too_large");
    }

    #[test]
    fn reports_short_data_as_malformed() {
        let t = Tensor::from_f32(vec![4], &[1.0; 4]).unwrap();
        let mut buf = Vec::new();
        write_npy(&mut buf, &t).unwrap();
        buf.truncate(buf.len() - 3);
        let err = read_npy(&buf[..], 1 << 20).unwrap_err();
        assert_eq!(err.code(), "malformed");
    }

    #[test]
    fn rejects_garbage_as_malformed_npz() {
        let err = from_npz_bytes(b"not a zip at all", NpzLimits::default()).unwrap_err();
        assert_eq!(err.code(), "malformed");
    }

    proptest! {
        #[test]
        fn npy_header_parser_never_panics(s in ".{0,200}") {
            let _ = parse_header(&s);
        }

        #[test]
        fn npz_reader_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = from_npz_bytes(&bytes, NpzLimits::default());
        }

        #[test]
        fn npz_round_trips_f32(vals in proptest::collection::vec(any::<f32>().prop_filter("finite", |v| v.is_finite()), 0..64)) {
            let t = vec![NamedTensor::new("a/b", Tensor::from_f32(vec![vals.len() as u64], &vals).unwrap())];
            let back = from_npz_bytes(&to_npz_bytes(&t).unwrap(), NpzLimits::default()).unwrap();
            prop_assert_eq!(back, t);
        }
    }
}
