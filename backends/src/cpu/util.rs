//! Shared helpers for CPU kernels: dtype dispatch macros, axis normalisation, strides,
//! multidirectional broadcasting. Look here before writing a helper in a kernel file.

use kiln_runtime::{Error, Result};

/// Bind `$T` to the Rust element type of a float dtype and evaluate `$body`.
#[macro_export]
macro_rules! with_float {
    ($dtype:expr, $T:ident, $body:block) => {
        match $dtype {
            kiln_runtime::DType::F32 => { type $T = f32; $body }
            kiln_runtime::DType::F64 => { type $T = f64; $body }
            kiln_runtime::DType::F16 => { type $T = half::f16; $body }
            kiln_runtime::DType::BF16 => { type $T = half::bf16; $body }
            d => return Err(kiln_runtime::Error::DType(format!("unsupported dtype {d} (expected a float type)"))),
        }
    };
}

/// Bind `$T` to the Rust element type of an integer dtype (int4/uint4 excluded) and evaluate `$body`.
#[macro_export]
macro_rules! with_int {
    ($dtype:expr, $T:ident, $body:block) => {
        match $dtype {
            kiln_runtime::DType::I8 => { type $T = i8; $body }
            kiln_runtime::DType::I16 => { type $T = i16; $body }
            kiln_runtime::DType::I32 => { type $T = i32; $body }
            kiln_runtime::DType::I64 => { type $T = i64; $body }
            kiln_runtime::DType::U8 => { type $T = u8; $body }
            kiln_runtime::DType::U16 => { type $T = u16; $body }
            kiln_runtime::DType::U32 => { type $T = u32; $body }
            kiln_runtime::DType::U64 => { type $T = u64; $body }
            d => return Err(kiln_runtime::Error::DType(format!("unsupported dtype {d} (expected an integer type)"))),
        }
    };
}

/// Bind `$T` for any float or integer dtype.
#[macro_export]
macro_rules! with_numeric {
    ($dtype:expr, $T:ident, $body:block) => {
        match $dtype {
            kiln_runtime::DType::F32 => { type $T = f32; $body }
            kiln_runtime::DType::F64 => { type $T = f64; $body }
            kiln_runtime::DType::F16 => { type $T = half::f16; $body }
            kiln_runtime::DType::BF16 => { type $T = half::bf16; $body }
            kiln_runtime::DType::I8 => { type $T = i8; $body }
            kiln_runtime::DType::I16 => { type $T = i16; $body }
            kiln_runtime::DType::I32 => { type $T = i32; $body }
            kiln_runtime::DType::I64 => { type $T = i64; $body }
            kiln_runtime::DType::U8 => { type $T = u8; $body }
            kiln_runtime::DType::U16 => { type $T = u16; $body }
            kiln_runtime::DType::U32 => { type $T = u32; $body }
            kiln_runtime::DType::U64 => { type $T = u64; $body }
            d => return Err(kiln_runtime::Error::DType(format!("unsupported dtype {d}"))),
        }
    };
}

/// Bind `$T` for any dtype whose elements are plain data of their own Rust type: numeric, bool,
/// and the raw-coded kinds (int4 as i8; uint4, float8 and float4 kinds as u8). Use for ops that
/// only move elements (Transpose, Gather, Concat…). Strings are handled separately.
#[macro_export]
macro_rules! with_pod {
    ($dtype:expr, $T:ident, $body:block) => {
        match $dtype.size() {
            _ if $dtype == kiln_runtime::DType::String => {
                return Err(kiln_runtime::Error::DType("string tensors are not supported here".into()))
            }
            1 => { type $T = u8; $body }
            2 => { type $T = u16; $body }
            4 => { type $T = u32; $body }
            8 => { type $T = u64; $body }
            _ => { type $T = u128; $body }
        }
    };
}

/// Resolve a possibly negative axis against `rank`.
pub fn norm_axis(axis: i64, rank: usize) -> Result<usize> {
    let r = rank as i64;
    let a = if axis < 0 { axis + r } else { axis };
    if a < 0 || a >= r.max(1) && !(rank == 0 && a == 0) {
        return Err(Error::Shape(format!("axis {axis} is out of range for rank {rank}")));
    }
    Ok(a as usize)
}

/// Row-major strides (in elements) of `shape`.
pub fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// The ONNX multidirectional broadcast of several shapes.
pub fn broadcast_shapes(shapes: &[&[usize]]) -> Result<Vec<usize>> {
    let rank = shapes.iter().map(|s| s.len()).max().unwrap_or(0);
    let mut out = vec![1usize; rank];
    for s in shapes {
        let off = rank - s.len();
        for (i, &d) in s.iter().enumerate() {
            let o = &mut out[off + i];
            if *o == 1 {
                *o = d;
            } else if d != 1 && d != *o {
                return Err(Error::Shape(format!("shapes {shapes:?} do not broadcast")));
            }
        }
    }
    Ok(out)
}

/// Strides of `shape` viewed in the broadcast `out` shape: 0 along broadcast dims.
pub fn broadcast_strides(shape: &[usize], out: &[usize]) -> Vec<usize> {
    let off = out.len() - shape.len();
    let st = strides(shape);
    let mut r = vec![0; out.len()];
    for i in 0..shape.len() {
        r[off + i] = if shape[i] == 1 { 0 } else { st[i] };
    }
    r
}
