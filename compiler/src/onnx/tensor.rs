//! TensorProto ⇄ runtime `Tensor`, for every dtype kiln knows, plus sparse → dense.
//!
//! `raw_data` (and external data) is shared, not copied, when it is large or already aligned for
//! its element type; small unaligned payloads are copied so typed views on them always work.
//! Typed fields (`float_data`, `int32_data`, …) are converted per the spec comments in onnx.proto:
//! 16-bit floats and float8 travel as bit patterns in `int32_data`, 4-bit and 2-bit types as one
//! packed byte per entry (two 4-bit or four 2-bit elements, first in the lowest bits). In memory,
//! sub-byte types are unpacked one element per byte, int4/int2 sign-extended. Hosts are assumed
//! little-endian, like ONNX's raw_data.

use std::sync::Arc;

use bytes::Bytes;
use half::{bf16, f16};
use kiln_runtime::{DType, Elem, Error, Result, Tensor};

use super::load::{is_external, ExternalStore};
use super::proto::{SparseTensorProto, TensorProto};

/// Payloads at least this large are shared even if unaligned (consumers call `Tensor::aligned`).
const SHARE_UNALIGNED_MIN: usize = 64 * 1024;

fn invalid(msg: impl Into<String>) -> Error {
    Error::InvalidModel(msg.into())
}

fn label(t: &TensorProto) -> String {
    if t.name.is_empty() {
        "<unnamed>".into()
    } else {
        t.name.clone()
    }
}

/// The dtype of an ONNX element-type code, with a clear error for codes kiln does not support.
pub fn dtype_of(code: i32, what: &str) -> Result<DType> {
    DType::from_onnx(code).ok_or_else(|| match code {
        0 => invalid(format!("{what} has no data type")),
        c => invalid(format!("{what}: unknown data type {c}")),
    })
}

/// Validated shape of a TensorProto-like dims list.
pub fn shape_of(dims: &[i64], what: &str) -> Result<(Vec<usize>, usize)> {
    let mut shape = Vec::with_capacity(dims.len());
    let mut n: usize = 1;
    for &d in dims {
        let d =
            usize::try_from(d).map_err(|_| invalid(format!("{what} has a negative dim {d}")))?;
        n = n.checked_mul(d).ok_or_else(|| invalid(format!("{what}: shape {dims:?} overflows")))?;
        shape.push(d);
    }
    Ok((shape, n))
}

/// Bits per element of the types stored packed in files (several elements per byte).
fn packed_bits(dtype: DType) -> Option<u32> {
    match dtype {
        DType::I4 | DType::U4 | DType::F4E2M1 => Some(4),
        DType::I2 | DType::U2 => Some(2),
        _ => None,
    }
}

/// Packed bytes holding `n` elements of `bits` bits each.
fn packed_len(n: usize, bits: u32) -> usize {
    n.div_ceil((8 / bits) as usize)
}

/// A TensorProto as a runtime tensor; external data is read through `ext`.
pub fn to_tensor(t: &TensorProto, ext: &ExternalStore) -> Result<Tensor> {
    let what = format!("tensor '{}'", label(t));
    let dtype = dtype_of(t.data_type, &what)?;
    let (shape, n) = shape_of(&t.dims, &what)?;
    if t.segment.is_some() {
        return Err(Error::Other(format!("{what} is segmented, which kiln does not support")));
    }
    if is_external(t) {
        if dtype == DType::String {
            return Err(invalid(format!("{what}: string tensors cannot use external data")));
        }
        return from_raw(dtype, &shape, n, ext.resolve(t)?, &what);
    }
    if !t.raw_data.is_empty() {
        return from_raw(dtype, &shape, n, t.raw_data.clone(), &what);
    }
    from_typed(t, dtype, &shape, n, &what)
}

/// A TensorProto with inline data only (external data is an error).
pub fn to_tensor_inline(t: &TensorProto) -> Result<Tensor> {
    to_tensor(t, &ExternalStore::none())
}

fn from_raw(dtype: DType, shape: &[usize], n: usize, raw: Bytes, what: &str) -> Result<Tensor> {
    if dtype == DType::String {
        return Err(invalid(format!("{what}: string tensors must use string_data, not raw_data")));
    }
    if let Some(bits) = packed_bits(dtype) {
        let want = packed_len(n, bits);
        if raw.len() != want {
            return Err(invalid(format!(
                "{what}: {dtype} {shape:?} needs {want} packed bytes, raw data has {}",
                raw.len()
            )));
        }
        return unpack(dtype, bits, shape, n, raw.iter().copied());
    }
    let want = n * dtype.size();
    if raw.len() != want {
        return Err(invalid(format!(
            "{what}: {dtype} {shape:?} needs {want} bytes, raw data has {}",
            raw.len()
        )));
    }
    share(dtype, shape, raw).map_err(|e| invalid(format!("{what}: {e}")))
}

/// Wrap bytes without copying when typed views will work on them (or they are big).
fn share(dtype: DType, shape: &[usize], raw: Bytes) -> Result<Tensor> {
    if raw.is_empty() {
        return Ok(Tensor::zeros(dtype, shape));
    }
    let align = elem_align(dtype);
    if (raw.as_ptr() as usize).is_multiple_of(align) || raw.len() >= SHARE_UNALIGNED_MIN {
        Tensor::from_shared(dtype, shape, Arc::new(raw))
    } else {
        Tensor::from_bytes(dtype, shape, &raw)
    }
}

fn elem_align(dtype: DType) -> usize {
    match dtype {
        DType::Complex64 => 4,
        d => d.size().min(8),
    }
}

/// Unpack `bits`-bit elements (first in the lowest bits) into one byte each; int4/int2 are
/// sign-extended.
fn unpack(
    dtype: DType,
    bits: u32,
    shape: &[usize],
    n: usize,
    packed: impl Iterator<Item = u8>,
) -> Result<Tensor> {
    let per_byte = 8 / bits;
    let mask = (1u8 << bits) - 1;
    let mut out = Vec::with_capacity(n + per_byte as usize);
    for b in packed {
        out.extend((0..per_byte).map(|k| (b >> (k * bits)) & mask));
    }
    out.truncate(n);
    if matches!(dtype, DType::I4 | DType::I2) {
        let shift = 8 - bits;
        for v in &mut out {
            *v = (((*v << shift) as i8) >> shift) as u8;
        }
    }
    Tensor::from_bytes(dtype, shape, &out)
}

/// Pack one-byte-per-element sub-byte values, `bits` bits each, first in the lowest bits.
fn pack(bytes: &[u8], bits: u32) -> Vec<u8> {
    let mask = (1u8 << bits) - 1;
    bytes
        .chunks((8 / bits) as usize)
        .map(|c| {
            c.iter().enumerate().fold(0u8, |acc, (k, &v)| acc | ((v & mask) << (k as u32 * bits)))
        })
        .collect()
}

fn count_check(what: &str, field: &str, have: usize, want: usize) -> Result<()> {
    if have != want {
        return Err(invalid(format!("{what}: expected {want} values in {field}, found {have}")));
    }
    Ok(())
}

fn typed<T: Elem>(dtype: DType, shape: &[usize], v: Vec<T>) -> Result<Tensor> {
    Tensor::from_slice_as(dtype, shape, &v)
}

fn from_typed(
    t: &TensorProto,
    dtype: DType,
    shape: &[usize],
    n: usize,
    what: &str,
) -> Result<Tensor> {
    use DType::*;
    let no_data = t.float_data.is_empty()
        && t.int32_data.is_empty()
        && t.string_data.is_empty()
        && t.int64_data.is_empty()
        && t.double_data.is_empty()
        && t.uint64_data.is_empty();
    if n == 0 && no_data {
        return Ok(Tensor::zeros(dtype, shape));
    }
    let i32d = &t.int32_data;
    match dtype {
        F32 => {
            count_check(what, "float_data", t.float_data.len(), n)?;
            typed(F32, shape, t.float_data.clone())
        }
        Complex64 => {
            count_check(what, "float_data", t.float_data.len(), 2 * n)?;
            let bytes: Vec<u8> = t.float_data.iter().flat_map(|x| x.to_le_bytes()).collect();
            Tensor::from_bytes(Complex64, shape, &bytes)
        }
        F64 => {
            count_check(what, "double_data", t.double_data.len(), n)?;
            typed(F64, shape, t.double_data.clone())
        }
        Complex128 => {
            count_check(what, "double_data", t.double_data.len(), 2 * n)?;
            let bytes: Vec<u8> = t.double_data.iter().flat_map(|x| x.to_le_bytes()).collect();
            Tensor::from_bytes(Complex128, shape, &bytes)
        }
        I64 => {
            count_check(what, "int64_data", t.int64_data.len(), n)?;
            typed(I64, shape, t.int64_data.clone())
        }
        U64 => {
            count_check(what, "uint64_data", t.uint64_data.len(), n)?;
            typed(U64, shape, t.uint64_data.clone())
        }
        U32 => {
            count_check(what, "uint64_data", t.uint64_data.len(), n)?;
            typed(U32, shape, t.uint64_data.iter().map(|&x| x as u32).collect())
        }
        String => {
            count_check(what, "string_data", t.string_data.len(), n)?;
            let strings = t
                .string_data
                .iter()
                .map(|s| match std::str::from_utf8(s) {
                    Ok(s) => s.to_owned(),
                    Err(_) => std::string::String::from_utf8_lossy(s).into_owned(),
                })
                .collect();
            Tensor::from_strings(shape, strings)
        }
        I4 | U4 | F4E2M1 | I2 | U2 => {
            let bits = packed_bits(dtype).unwrap_or(4);
            count_check(what, "int32_data", i32d.len(), packed_len(n, bits))?;
            unpack(dtype, bits, shape, n, i32d.iter().map(|&x| x as u8))
        }
        _ => {
            count_check(what, "int32_data", i32d.len(), n)?;
            match dtype {
                I32 => typed(I32, shape, i32d.clone()),
                I16 => typed(I16, shape, i32d.iter().map(|&x| x as i16).collect()),
                U16 => typed(U16, shape, i32d.iter().map(|&x| x as u16).collect()),
                I8 => typed(I8, shape, i32d.iter().map(|&x| x as i8).collect()),
                U8 | F8E4M3FN | F8E4M3FNUZ | F8E5M2 | F8E5M2FNUZ | F8E8M0 => {
                    typed(dtype, shape, i32d.iter().map(|&x| x as u8).collect())
                }
                Bool => typed(Bool, shape, i32d.iter().map(|&x| x != 0).collect()),
                F16 => typed(F16, shape, i32d.iter().map(|&x| f16::from_bits(x as u16)).collect()),
                BF16 => {
                    typed(BF16, shape, i32d.iter().map(|&x| bf16::from_bits(x as u16)).collect())
                }
                d => Err(invalid(format!("{what}: {d} data cannot be stored in int32_data"))),
            }
        }
    }
    .map_err(|e| match e {
        e @ Error::InvalidModel(_) => e,
        e => invalid(format!("{what}: {e}")),
    })
}

/// A runtime tensor as a TensorProto (data in `raw_data`, strings in `string_data`, 4-bit types
/// packed two per byte, 2-bit types four per byte).
pub fn from_tensor(t: &Tensor, name: &str) -> Result<TensorProto> {
    let mut p = TensorProto {
        name: name.to_string(),
        dims: t.shape().iter().map(|&d| d as i64).collect(),
        data_type: t.dtype().onnx_code(),
        ..Default::default()
    };
    if t.dtype() == DType::String {
        p.string_data = t.strings()?.iter().map(|s| s.as_bytes().to_vec()).collect();
    } else if let Some(bits) = packed_bits(t.dtype()) {
        p.raw_data = Bytes::from(pack(t.bytes(), bits));
    } else {
        p.raw_data = Bytes::copy_from_slice(t.bytes());
    }
    Ok(p)
}

/// A SparseTensorProto expanded into a dense tensor (zeros / empty strings elsewhere).
pub fn sparse_to_tensor(sp: &SparseTensorProto, ext: &ExternalStore) -> Result<Tensor> {
    let values = sp.values.as_ref().ok_or_else(|| invalid("sparse tensor without values"))?;
    let what = format!("sparse tensor '{}'", label(values));
    let indices = sp.indices.as_ref().ok_or_else(|| invalid(format!("{what} has no indices")))?;
    let vals = to_tensor(values, ext)?;
    let idx_t = to_tensor(indices, ext)?;
    let idx = idx_t.to_i64_vec().map_err(|e| invalid(format!("{what}: indices: {e}")))?;
    let (shape, n) = shape_of(&sp.dims, &what)?;
    let nnz = vals.len();
    let rank = shape.len();
    let linear: Vec<usize> = match idx_t.shape() {
        [k] if *k == nnz => idx
            .iter()
            .map(|&i| usize::try_from(i).ok().filter(|&i| i < n))
            .collect::<Option<_>>()
            .ok_or_else(|| invalid(format!("{what}: an index is out of range")))?,
        [k, r] if *k == nnz && *r == rank => idx
            .chunks(rank.max(1))
            .map(|c| {
                c.iter().zip(&shape).try_fold(0usize, |acc, (&i, &d)| {
                    usize::try_from(i).ok().filter(|&i| i < d).map(|i| acc * d + i)
                })
            })
            .collect::<Option<_>>()
            .ok_or_else(|| invalid(format!("{what}: an index is out of range")))?,
        s => {
            return Err(invalid(format!(
                "{what}: indices of shape {s:?} do not fit {nnz} values of a rank-{rank} tensor"
            )))
        }
    };
    if vals.dtype() == DType::String {
        let src = vals.strings()?;
        let mut out = vec![std::string::String::new(); n];
        for (&i, s) in linear.iter().zip(src) {
            out[i] = s.clone();
        }
        return Tensor::from_strings(&shape, out);
    }
    let size = vals.dtype().size();
    let src = vals.bytes();
    let mut dense = vec![0u8; n * size];
    for (k, &i) in linear.iter().enumerate() {
        dense[i * size..(i + 1) * size].copy_from_slice(&src[k * size..(k + 1) * size]);
    }
    Tensor::from_bytes(vals.dtype(), &shape, &dense)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::load::decode_tensor_file;
    use std::path::PathBuf;

    /// The ONNX node test suite, if unpacked (tests using it are skipped otherwise).
    fn node_case(case: &str, file: &str) -> Option<PathBuf> {
        let root = std::env::var_os("KILN_CACHE")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/kiln")))?;
        let p = root
            .join("onnx-1.22.0/onnx/backend/test/data/node")
            .join(case)
            .join("test_data_set_0")
            .join(file);
        if p.exists() {
            Some(p)
        } else {
            eprintln!("skipping: {} not found", p.display());
            None
        }
    }

    fn load(case: &str, file: &str) -> Option<Tensor> {
        node_case(case, file).map(|p| decode_tensor_file(&p).unwrap().aligned())
    }

    #[test]
    fn node_suite_raw_dtypes() {
        let Some(t) = load("test_abs", "input_0.pb") else { return };
        assert_eq!((t.dtype(), t.shape()), (DType::F32, &[3, 4, 5][..]));
        assert_eq!(&t.view::<f32>().unwrap()[..2], &[1.764_052_4, 0.400_157_2]);

        let t = load("test_add_uint8", "input_0.pb").unwrap();
        assert_eq!(&t.view::<u8>().unwrap()[..4], &[23, 21, 13, 9]);
        let t = load("test_add_int8", "input_0.pb").unwrap();
        assert_eq!(&t.view::<i8>().unwrap()[..4], &[0, 8, 11, 8]);
        let t = load("test_and2d", "input_0.pb").unwrap();
        assert_eq!((t.dtype(), t.shape()), (DType::Bool, &[3, 4][..]));
        assert!(t.view::<bool>().unwrap()[0]);
        let t = load("test_cast_FLOAT_to_BFLOAT16", "output_0.pb").unwrap();
        assert_eq!(t.view::<bf16>().unwrap()[0].to_f32(), 0.478_515_63);
        let t = load("test_attention_4d_fp16", "input_0.pb").unwrap();
        assert_eq!(t.shape(), &[2, 3, 4, 8]);
        assert_eq!(t.view::<f16>().unwrap()[1].to_f32(), 0.715_332_03);
        let t = load("test_add_uint64", "input_0.pb").unwrap();
        assert_eq!(&t.view::<u64>().unwrap()[..4], &[14, 0, 19, 6]);
        let t = load("test_add_uint32", "input_0.pb").unwrap();
        assert_eq!(&t.view::<u32>().unwrap()[..4], &[17, 7, 20, 2]);
        let t = load("test_ai_onnx_ml_tree_ensemble_single_tree", "input_0.pb").unwrap();
        assert_eq!(&t.view::<f64>().unwrap()[..2], &[1.2, 3.4]);
    }

    #[test]
    fn node_suite_packed_and_typed() {
        let Some(t) = load("test_cast_FLOAT_to_INT4", "output_0.pb") else { return };
        assert_eq!((t.dtype(), t.shape()), (DType::I4, &[5, 5][..]));
        assert_eq!(&t.view::<i8>().unwrap()[..4], &[7, -8, -7, -6]);
        let t = load("test_cast_FLOAT_to_UINT4", "output_0.pb").unwrap();
        assert_eq!(&t.view::<u8>().unwrap()[..4], &[7, 8, 9, 10]);
        // 2-bit raw data: 57 = 0b00_11_10_01 holds 1, -2, -1, 0 (int2) / 1, 2, 3, 0 (uint2).
        let t = load("test_cast_FLOAT_to_INT2", "output_0.pb").unwrap();
        assert_eq!((t.dtype(), t.shape()), (DType::I2, &[7, 1][..]));
        assert_eq!(t.view::<i8>().unwrap(), &[1, -2, -1, 0, 1, -2, -1]);
        let t = load("test_cast_FLOAT_to_UINT2", "output_0.pb").unwrap();
        assert_eq!((t.dtype(), t.view::<u8>().unwrap()), (DType::U2, &[1, 2, 3, 0, 1, 2, 3][..]));
        let t = load("test_cast_FLOAT4E2M1_to_FLOAT", "input_0.pb").unwrap();
        assert_eq!((t.dtype(), t.len()), (DType::F4E2M1, 15));
        assert_eq!(&t.view::<u8>().unwrap()[..4], &[1, 0, 2, 14]);
        // int32_data carrying packed 4-bit pairs and float8 bit patterns.
        let t = load("test_dequantizelinear_int4", "input_0.pb").unwrap();
        assert_eq!(t.view::<i8>().unwrap(), &[0, 1, 7, -4, -8]);
        let t = load("test_dequantizelinear_uint4", "input_0.pb").unwrap();
        assert_eq!(t.view::<u8>().unwrap(), &[0, 1, 7, 10, 15]);
        let t = load("test_dequantizelinear_int2", "input_0.pb").unwrap();
        assert_eq!(t.view::<i8>().unwrap(), &[0, 1, -1, -2]);
        let t = load("test_dequantizelinear_uint2", "input_0.pb").unwrap();
        assert_eq!(t.view::<u8>().unwrap(), &[0, 1, 2, 3]);
        let t = load("test_dequantizelinear_e4m3fn", "input_0.pb").unwrap();
        assert_eq!(
            (t.dtype(), t.view::<u8>().unwrap()),
            (DType::F8E4M3FN, &[0, 48, 56, 126, 237][..])
        );
        let t = load("test_quantizelinear_blocked_symmetric", "output_0.pb").unwrap();
        assert_eq!(&t.view::<i16>().unwrap()[..4], &[4, -5, -4, 2]);
        let t = load("test_ai_onnx_ml_label_encoder_string_int", "input_0.pb").unwrap();
        assert_eq!(&t.strings().unwrap()[..4], &["a", "b", "d", "c"]);
        let t = load("test_castlike_BFLOAT16_to_FLOAT", "input_1.pb").unwrap();
        assert_eq!((t.dtype(), t.shape()), (DType::F32, &[0][..]));
    }

    fn proto(dtype: DType, dims: &[i64]) -> TensorProto {
        TensorProto {
            data_type: dtype.onnx_code(),
            dims: dims.to_vec(),
            name: "t".into(),
            ..Default::default()
        }
    }

    #[test]
    fn typed_fields_every_kind() {
        let mut p = proto(DType::F16, &[2]);
        p.int32_data = vec![0x3c00, 0xc000];
        let t = to_tensor_inline(&p).unwrap();
        assert_eq!(t.view::<f16>().unwrap(), &[f16::from_f32(1.0), f16::from_f32(-2.0)]);

        let mut p = proto(DType::Complex64, &[2]);
        p.float_data = vec![1.0, 2.0, 3.0, 4.0];
        let t = to_tensor_inline(&p).unwrap();
        assert_eq!(t.bytes().len(), 16);
        assert_eq!(&t.bytes()[4..8], &2f32.to_le_bytes());

        let mut p = proto(DType::Complex128, &[1]);
        p.double_data = vec![1.5, -2.5];
        assert_eq!(&to_tensor_inline(&p).unwrap().bytes()[8..], &(-2.5f64).to_le_bytes());

        let mut p = proto(DType::U32, &[2]);
        p.uint64_data = vec![7, 4_000_000_000];
        assert_eq!(to_tensor_inline(&p).unwrap().view::<u32>().unwrap(), &[7, 4_000_000_000]);

        let mut p = proto(DType::Bool, &[3]);
        p.int32_data = vec![1, 0, 1];
        assert_eq!(to_tensor_inline(&p).unwrap().view::<bool>().unwrap(), &[true, false, true]);

        let mut p = proto(DType::I64, &[]);
        p.int64_data = vec![-5];
        assert_eq!(to_tensor_inline(&p).unwrap().item::<i64>().unwrap(), -5);

        let mut p = proto(DType::I4, &[3]);
        p.int32_data = vec![0xF1, 0x08];
        assert_eq!(to_tensor_inline(&p).unwrap().view::<i8>().unwrap(), &[1, -1, -8]);

        // 0x9C = 0b10_01_11_00: codes 0, 3, 1, 2 from the low bits up; 0x02 pads after code 2.
        let mut p = proto(DType::I2, &[5]);
        p.int32_data = vec![0x9C, 0x02];
        assert_eq!(to_tensor_inline(&p).unwrap().view::<i8>().unwrap(), &[0, -1, 1, -2, -2]);
        p.data_type = DType::U2.onnx_code();
        assert_eq!(to_tensor_inline(&p).unwrap().view::<u8>().unwrap(), &[0, 3, 1, 2, 2]);
        p.int32_data = vec![0x9C];
        assert!(to_tensor_inline(&p).is_err(), "5 two-bit values need 2 packed bytes");
    }

    #[test]
    fn bad_tensors_are_errors() {
        let mut p = proto(DType::F32, &[3]);
        p.float_data = vec![1.0];
        assert!(to_tensor_inline(&p).is_err());
        let mut p = proto(DType::F32, &[2]);
        p.raw_data = Bytes::from_static(&[0; 7]);
        assert!(to_tensor_inline(&p).is_err());
        let mut p = proto(DType::Bool, &[2]);
        p.raw_data = Bytes::from_static(&[1, 2]);
        assert!(to_tensor_inline(&p).is_err());
        assert!(to_tensor_inline(&proto(DType::F32, &[-1])).is_err());
        assert!(to_tensor_inline(&proto(DType::F32, &[1 << 40, 1 << 40])).is_err());
        assert!(to_tensor_inline(&proto(DType::F32, &[4])).is_err(), "no data");
        let mut p = proto(DType::F32, &[1]);
        p.data_type = 99;
        assert!(to_tensor_inline(&p).is_err());
    }

    #[test]
    fn roundtrip_through_raw_data() {
        let cases = vec![
            Tensor::from_vec(&[2, 2], vec![1.0f32, -2.0, 3.5, 0.0]).unwrap(),
            Tensor::from_vec(&[3], vec![true, false, true]).unwrap(),
            Tensor::from_slice_as(DType::I4, &[3], &[-8i8, 7, -1]).unwrap(),
            Tensor::from_slice_as(DType::U4, &[4], &[0u8, 15, 3, 9]).unwrap(),
            Tensor::from_slice_as(DType::I2, &[5], &[-2i8, 1, -1, 0, 1]).unwrap(),
            Tensor::from_slice_as(DType::U2, &[4], &[3u8, 0, 2, 1]).unwrap(),
            Tensor::from_strings(&[2], vec!["x".into(), "yz".into()]).unwrap(),
            Tensor::from_vec(&[0, 3], Vec::<i64>::new()).unwrap(),
        ];
        let packed = from_tensor(&Tensor::from_slice_as(DType::U2, &[5], &[3u8, 0, 2, 1, 2]).unwrap(), "v");
        assert_eq!(&packed.unwrap().raw_data[..], &[0b01_10_00_11, 0b10]);
        for t in cases {
            let p = from_tensor(&t, "v").unwrap();
            let back = to_tensor_inline(&p).unwrap();
            assert_eq!((back.dtype(), back.shape()), (t.dtype(), t.shape()));
            assert_eq!(back.bytes(), t.bytes());
            if t.dtype() == DType::String {
                assert_eq!(back.strings().unwrap(), t.strings().unwrap());
            }
        }
    }

    #[test]
    fn large_raw_data_is_shared() {
        let data: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        let raw = Bytes::from(data);
        let mut p = proto(DType::U8, &[200_000]);
        p.raw_data = raw.clone();
        let t = to_tensor_inline(&p).unwrap();
        assert_eq!(t.bytes().as_ptr(), raw.as_ptr(), "no copy");
        assert!(t.buffer().unwrap().is_borrowed());
    }

    #[test]
    fn sparse_to_dense() {
        let mut values = proto(DType::F32, &[2]);
        values.float_data = vec![5.0, 6.0];
        // Linear indices.
        let mut idx = proto(DType::I64, &[2]);
        idx.int64_data = vec![1, 5];
        let sp = SparseTensorProto {
            values: Some(values.clone()),
            indices: Some(idx),
            dims: vec![2, 3],
        };
        let t = sparse_to_tensor(&sp, &ExternalStore::none()).unwrap();
        assert_eq!(t.view::<f32>().unwrap(), &[0.0, 5.0, 0.0, 0.0, 0.0, 6.0]);
        // Coordinate indices.
        let mut idx = proto(DType::I64, &[2, 2]);
        idx.int64_data = vec![0, 2, 1, 0];
        let sp = SparseTensorProto {
            values: Some(values.clone()),
            indices: Some(idx),
            dims: vec![2, 3],
        };
        let t = sparse_to_tensor(&sp, &ExternalStore::none()).unwrap();
        assert_eq!(t.view::<f32>().unwrap(), &[0.0, 0.0, 5.0, 6.0, 0.0, 0.0]);
        // Out of range.
        let mut idx = proto(DType::I64, &[2]);
        idx.int64_data = vec![1, 6];
        let sp = SparseTensorProto { values: Some(values), indices: Some(idx), dims: vec![2, 3] };
        assert!(sparse_to_tensor(&sp, &ExternalStore::none()).is_err());
    }
}
