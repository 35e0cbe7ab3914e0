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

/// The float types kernels compute in: f64 for f64 tensors, f32 for f32/f16/bf16 tensors (half
/// types are widened on the way in and narrowed on the way out; see `real_vec` / `real_tensor`).
pub trait Real:
    kiln_runtime::Elem
    + PartialOrd
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::Neg<Output = Self>
    + std::ops::AddAssign
    + std::ops::MulAssign
    + std::iter::Sum
{
    const ZERO: Self;
    const ONE: Self;
    const INFINITY: Self;
    fn from_f64(v: f64) -> Self;
    fn to_f64(self) -> f64;
    fn from_usize(v: usize) -> Self;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn sqrt(self) -> Self;
    fn abs(self) -> Self;
    fn powf(self, e: Self) -> Self;
    fn is_nan(self) -> bool;
    /// Maximum that propagates NaN (like numpy's max).
    fn max_nan(self, o: Self) -> Self {
        if self.is_nan() || o > self {
            if self.is_nan() { self } else { o }
        } else {
            self
        }
    }
}

macro_rules! impl_real {
    ($t:ty) => {
        impl Real for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            const INFINITY: Self = <$t>::INFINITY;
            fn from_f64(v: f64) -> Self { v as $t }
            fn to_f64(self) -> f64 { self as f64 }
            fn from_usize(v: usize) -> Self { v as $t }
            fn exp(self) -> Self { <$t>::exp(self) }
            fn ln(self) -> Self { <$t>::ln(self) }
            fn sqrt(self) -> Self { <$t>::sqrt(self) }
            fn abs(self) -> Self { <$t>::abs(self) }
            fn powf(self, e: Self) -> Self { <$t>::powf(self, e) }
            fn is_nan(self) -> bool { <$t>::is_nan(self) }
        }
    };
}
impl_real!(f32);
impl_real!(f64);

/// Bind `$R` to the compute type of a float dtype (f64 for f64, f32 for f32/f16/bf16).
#[macro_export]
macro_rules! with_real {
    ($dtype:expr, $R:ident, $body:block) => {
        match $dtype {
            kiln_runtime::DType::F64 => { type $R = f64; $body }
            kiln_runtime::DType::F32 | kiln_runtime::DType::F16 | kiln_runtime::DType::BF16 => {
                type $R = f32;
                $body
            }
            d => return Err(kiln_runtime::Error::DType(format!("unsupported dtype {d} (expected a float type)"))),
        }
    };
}

/// A float tensor's elements in compute type `R`: borrowed when the tensor already is `R`,
/// widened from f16/bf16 (or converted between f32/f64) otherwise.
pub fn real_vec<R: Real>(t: &kiln_runtime::Tensor) -> Result<std::borrow::Cow<'_, [R]>> {
    use kiln_runtime::DType;
    use std::borrow::Cow;
    if t.dtype() == R::DTYPE {
        return Ok(Cow::Borrowed(t.view::<R>()?));
    }
    let v: Vec<R> = match t.dtype() {
        DType::F32 => t.view::<f32>()?.iter().map(|&x| R::from_f64(x as f64)).collect(),
        DType::F64 => t.view::<f64>()?.iter().map(|&x| R::from_f64(x)).collect(),
        DType::F16 => t.view::<half::f16>()?.iter().map(|x| R::from_f64(x.to_f64())).collect(),
        DType::BF16 => t.view::<half::bf16>()?.iter().map(|x| R::from_f64(x.to_f64())).collect(),
        d => return Err(Error::DType(format!("expected a float tensor, got {d}"))),
    };
    Ok(Cow::Owned(v))
}

/// A tensor of float `dtype` from compute-type values (narrowed to f16/bf16 if needed).
pub fn real_tensor<R: Real>(
    dtype: kiln_runtime::DType,
    shape: &[usize],
    v: Vec<R>,
) -> Result<kiln_runtime::Tensor> {
    use kiln_runtime::{DType, Tensor};
    if dtype == R::DTYPE {
        return Tensor::from_vec(shape, v);
    }
    match dtype {
        DType::F32 => Tensor::from_vec(shape, v.iter().map(|x| x.to_f64() as f32).collect()),
        DType::F64 => Tensor::from_vec(shape, v.iter().map(|x| x.to_f64()).collect()),
        DType::F16 => Tensor::from_vec(shape, v.iter().map(|x| half::f16::from_f64(x.to_f64())).collect()),
        DType::BF16 => Tensor::from_vec(shape, v.iter().map(|x| half::bf16::from_f64(x.to_f64())).collect()),
        d => Err(Error::DType(format!("expected a float dtype, got {d}"))),
    }
}
