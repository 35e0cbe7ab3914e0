//! Binary and variadic elementwise ops with ONNX multidirectional broadcasting: Add, Sub, Mul, Div,
//! Pow, Mod, PRelu, BitShift, Bitwise{And,Or,Xor}, Max, Min, Sum, Mean, Where.
//!
//! Also home of the broadcast iteration engine (`Plan`, `map2`, `map3`) that logic.rs reuses: the
//! operands' broadcast strides are collapsed into as few dimensions as possible, so the innermost
//! loop always walks each operand with stride 0 or 1 (same shape, scalar, trailing-vector cases
//! become one tight loop), and large outputs are split across the rayon pool.

use half::{bf16, f16};
use kiln_runtime::{DType, Elem, Error, Result, Tensor};
use rayon::prelude::*;

use super::unary::{take_input, with_isa};
use crate::cpu::ctx::OpCtx;
use crate::cpu::registry::Registry;
use crate::cpu::util::{broadcast_shapes, broadcast_strides};

/// A kernel that takes its inputs by value, so it may write its result into the buffer of an
/// input nobody else holds (the interpreter hands over inputs whose last reader is the step).
pub(crate) type OwnedKernel = fn(&OpCtx, Vec<Option<Tensor>>) -> Result<Vec<Tensor>>;

/// The owned-input form of the kernel for (domain, op), for the ops that can reuse an input.
pub(crate) fn owned_kernel(domain: &str, op: &str) -> Option<OwnedKernel> {
    if !(domain.is_empty() || domain == "ai.onnx") {
        return None;
    }
    match op {
        "Add" => Some(add),
        "Sub" => Some(sub),
        "Mul" => Some(mul),
        "Div" => Some(div),
        _ => super::unary::owned(op)
            .or_else(|| super::softmax::owned(op))
            .or_else(|| super::norm::owned(op)),
    }
}

/// The registry (borrowed-input) form of an owned kernel: inputs are cloned, which only bumps
/// reference counts, so nothing is written in place.
macro_rules! borrowed {
    ($f:ident) => {{
        fn b(
            ctx: &$crate::cpu::ctx::OpCtx,
            inputs: &[Option<kiln_runtime::Tensor>],
        ) -> kiln_runtime::Result<Vec<kiln_runtime::Tensor>> {
            $f(ctx, inputs.to_vec())
        }
        b as $crate::cpu::registry::TensorKernel
    }};
}
pub(crate) use borrowed;

/// Outputs with at least this many elements are split across threads, in chunks of this size.
const PAR_CHUNK: usize = 1 << 15;

/// A broadcast iteration over `N` operands, with dimensions collapsed where every operand is
/// contiguous (or broadcast) across them.
pub(crate) struct Plan<const N: usize> {
    /// Collapsed output shape (never empty).
    shape: Vec<usize>,
    /// Collapsed strides of each operand, in elements.
    strides: [Vec<usize>; N],
}

impl<const N: usize> Plan<N> {
    /// The broadcast output shape of `shapes` and the plan to iterate it.
    pub(crate) fn new(shapes: [&[usize]; N]) -> Result<(Vec<usize>, Plan<N>)> {
        let out = broadcast_shapes(&shapes)?;
        let full: [Vec<usize>; N] = std::array::from_fn(|k| broadcast_strides(shapes[k], &out));
        let mut shape: Vec<usize> = Vec::with_capacity(out.len());
        let mut strides: [Vec<usize>; N] = std::array::from_fn(|_| Vec::with_capacity(out.len()));
        for (d, &n) in out.iter().enumerate() {
            if n == 1 {
                continue;
            }
            let mergeable = !shape.is_empty()
                && (0..N).all(|k| *strides[k].last().unwrap() == full[k][d] * n);
            if mergeable {
                *shape.last_mut().unwrap() *= n;
                for k in 0..N {
                    *strides[k].last_mut().unwrap() = full[k][d];
                }
            } else {
                shape.push(n);
                for k in 0..N {
                    strides[k].push(full[k][d]);
                }
            }
        }
        if shape.is_empty() {
            shape.push(1);
            for s in strides.iter_mut() {
                s.push(0);
            }
        }
        Ok((out, Plan { shape, strides }))
    }

    /// Stride (0 or 1) of each operand along the innermost collapsed dimension.
    pub(crate) fn inner_strides(&self) -> [usize; N] {
        std::array::from_fn(|k| *self.strides[k].last().unwrap())
    }

    /// Call `row(out_run, offsets)` for every run of consecutive outputs that lies within one
    /// innermost row; `offsets[k]` is operand k's element offset for the run's first output.
    pub(crate) fn run<O: Send>(&self, out: &mut [O], row: impl Fn(&mut [O], [usize; N]) + Sync) {
        if out.len() >= 2 * PAR_CHUNK && crate::cpu::par::threads() > 1 {
            out.par_chunks_mut(PAR_CHUNK)
                .enumerate()
                .for_each(|(i, chunk)| with_isa(#[inline(always)] || self.run_range(chunk, i * PAR_CHUNK, &row)));
        } else if !out.is_empty() {
            with_isa(#[inline(always)] || self.run_range(out, 0, &row));
        }
    }

    /// Process outputs `[start, start + out.len())`.
    #[inline(always)]
    fn run_range<O>(&self, out: &mut [O], start: usize, row: &impl Fn(&mut [O], [usize; N])) {
        let rank = self.shape.len();
        let inner = self.shape[rank - 1];
        let mut idx = vec![0usize; rank];
        let mut rem = start;
        for d in (0..rank).rev() {
            idx[d] = rem % self.shape[d];
            rem /= self.shape[d];
        }
        let mut pos = 0;
        while pos < out.len() {
            let offs: [usize; N] = std::array::from_fn(|k| {
                idx.iter().zip(&self.strides[k]).map(|(i, s)| i * s).sum()
            });
            let take = (inner - idx[rank - 1]).min(out.len() - pos);
            row(&mut out[pos..pos + take], offs);
            pos += take;
            idx[rank - 1] = 0;
            for d in (0..rank - 1).rev() {
                idx[d] += 1;
                if idx[d] < self.shape[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
    }
}

/// One run of a binary map; `sa`/`sb` are the operands' inner strides (0 or 1).
#[inline(always)]
fn row2<A, B, O>(o: &mut [O], a: &[A], sa: usize, b: &[B], sb: usize, f: &impl Fn(&A, &B) -> O) {
    let n = o.len();
    match (sa, sb) {
        (1, 1) => {
            for ((o, x), y) in o.iter_mut().zip(&a[..n]).zip(&b[..n]) {
                *o = f(x, y);
            }
        }
        (1, 0) => {
            let y = &b[0];
            for (o, x) in o.iter_mut().zip(&a[..n]) {
                *o = f(x, y);
            }
        }
        (0, 1) => {
            let x = &a[0];
            for (o, y) in o.iter_mut().zip(&b[..n]) {
                *o = f(x, y);
            }
        }
        _ => {
            for o in o.iter_mut() {
                *o = f(&a[0], &b[0]);
            }
        }
    }
}

/// Broadcast `f` over two element slices of the given shapes into `out` (already sized to the
/// broadcast shape, as returned by `Plan::new`).
pub(crate) fn map2_into<A: Sync, B: Sync, O: Send>(
    plan: &Plan<2>,
    a: &[A],
    b: &[B],
    out: &mut [O],
    f: impl Fn(&A, &B) -> O + Sync,
) {
    let [sa, sb] = plan.inner_strides();
    plan.run(out, |o, [ia, ib]| row2(o, &a[ia..], sa, &b[ib..], sb, &f));
}

/// Broadcast `f(a, b)` over two numeric/bool tensors into a new tensor of dtype `dt` (elements `O`).
pub(crate) fn map2<A: Elem, B: Elem, O: Elem>(
    a: &Tensor,
    b: &Tensor,
    dt: DType,
    f: impl Fn(A, B) -> O + Sync,
) -> Result<Tensor> {
    let (shape, plan) = Plan::new([a.shape(), b.shape()])?;
    let (av, bv) = (a.view::<A>()?, b.view::<B>()?);
    Tensor::filled_by::<O>(dt, &shape, |out| {
        map2_into(&plan, av, bv, out, |x, y| f(*x, *y));
        Ok(())
    })
}

/// `o[i] = f(o[i], b[i·sb])`: one run of a binary map written over its first operand.
#[inline(always)]
fn row_over<T: Copy>(o: &mut [T], b: &[T], sb: usize, f: &impl Fn(T, T) -> T) {
    let n = o.len();
    if sb == 1 {
        o.iter_mut().zip(&b[..n]).for_each(|(x, &y)| *x = f(*x, y));
    } else {
        let y = b[0];
        o.iter_mut().for_each(|x| *x = f(*x, y));
    }
}

/// `f(a, b)` broadcast, for same-typed operands taken by value: the result goes into the buffer of
/// an operand that already has the output's shape and no other owner, else into a new tensor.
pub(crate) fn map2_owned<T: Elem>(a: Tensor, b: Tensor, f: impl Fn(T, T) -> T + Sync) -> Result<Tensor> {
    let (shape, plan) = Plan::new([a.shape(), b.shape()])?;
    let [sa, sb] = plan.inner_strides();
    // The reused operand has the output's shape, so its offsets are the output positions.
    if a.shape() == &shape[..] && a.is_unique() {
        let mut a = a;
        let bv = b.view::<T>()?;
        plan.run(a.view_mut::<T>()?, |o, [_, ib]| row_over(o, &bv[ib..], sb, &f));
        return Ok(a);
    }
    if b.shape() == &shape[..] && b.is_unique() {
        let mut b = b;
        let av = a.view::<T>()?;
        plan.run(b.view_mut::<T>()?, |o, [ia, _]| row_over(o, &av[ia..], sa, &|y, x| f(x, y)));
        return Ok(b);
    }
    map2::<T, T, T>(&a, &b, a.dtype(), f)
}

/// Broadcast `f` over three element slices into `out` (sized to the broadcast shape).
pub(crate) fn map3_into<A: Sync, B: Sync, C: Sync, O: Send>(
    plan: &Plan<3>,
    a: &[A],
    b: &[B],
    c: &[C],
    out: &mut [O],
    f: impl Fn(&A, &B, &C) -> O + Sync,
) {
    let [sa, sb, sc] = plan.inner_strides();
    plan.run(out, |o, [ia, ib, ic]| {
        let (a, b, c) = (&a[ia..], &b[ib..], &c[ic..]);
        if (sa, sb, sc) == (1, 1, 1) {
            let n = o.len();
            for (((o, x), y), z) in o.iter_mut().zip(&a[..n]).zip(&b[..n]).zip(&c[..n]) {
                *o = f(x, y, z);
            }
        } else {
            for (i, o) in o.iter_mut().enumerate() {
                *o = f(&a[i * sa], &b[i * sb], &c[i * sc]);
            }
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Per-type arithmetic.

/// Arithmetic with ONNX semantics for one element type: integers wrap and never trap (division
/// or remainder by zero gives 0), f16/bf16 compute in f32, Max/Min propagate NaN like numpy.
pub(crate) trait Arith: Elem {
    fn add(self, o: Self) -> Self;
    fn sub(self, o: Self) -> Self;
    fn mul(self, o: Self) -> Self;
    fn div(self, o: Self) -> Self;
    /// Remainder with the sign of the dividend (C fmod / truncated).
    fn fmod(self, o: Self) -> Self;
    /// Remainder with the sign of the divisor (Python / floored); floats behave like `fmod`
    /// with NaN turned into 0, as the ONNX reference does.
    fn pymod(self, o: Self) -> Self;
    fn max_nan(self, o: Self) -> Self;
    fn min_nan(self, o: Self) -> Self;
    fn is_pos(self) -> bool;
    fn to_f64(self) -> f64;
    /// From f64: floats round, integers truncate toward zero and saturate.
    fn from_f64(v: f64) -> Self;
}

macro_rules! arith_int {
    ($($t:ty),*) => {$(
        impl Arith for $t {
            #[inline(always)] fn add(self, o: Self) -> Self { self.wrapping_add(o) }
            #[inline(always)] fn sub(self, o: Self) -> Self { self.wrapping_sub(o) }
            #[inline(always)] fn mul(self, o: Self) -> Self { self.wrapping_mul(o) }
            #[inline(always)] fn div(self, o: Self) -> Self {
                if o == 0 { 0 } else { self.wrapping_div(o) }
            }
            #[inline(always)] fn fmod(self, o: Self) -> Self {
                if o == 0 { 0 } else { self.wrapping_rem(o) }
            }
            #[inline(always)] fn pymod(self, o: Self) -> Self {
                if o == 0 { return 0; }
                let r = self.wrapping_rem(o);
                #[allow(unused_comparisons)]
                if r != 0 && ((r < 0) != (o < 0)) { r.wrapping_add(o) } else { r }
            }
            #[inline(always)] fn max_nan(self, o: Self) -> Self { Ord::max(self, o) }
            #[inline(always)] fn min_nan(self, o: Self) -> Self { Ord::min(self, o) }
            #[inline(always)] fn is_pos(self) -> bool { self > 0 }
            #[inline(always)] fn to_f64(self) -> f64 { self as f64 }
            #[inline(always)] fn from_f64(v: f64) -> Self { v as $t }
        }
    )*};
}
arith_int!(i8, i16, i32, i64, u8, u16, u32, u64);

macro_rules! arith_float {
    ($($t:ty),*) => {$(
        impl Arith for $t {
            #[inline(always)] fn add(self, o: Self) -> Self { self + o }
            #[inline(always)] fn sub(self, o: Self) -> Self { self - o }
            #[inline(always)] fn mul(self, o: Self) -> Self { self * o }
            #[inline(always)] fn div(self, o: Self) -> Self { self / o }
            #[inline(always)] fn fmod(self, o: Self) -> Self { self % o }
            #[inline(always)] fn pymod(self, o: Self) -> Self {
                let r = self % o;
                if r.is_nan() { 0.0 } else { r }
            }
            #[inline(always)] fn max_nan(self, o: Self) -> Self {
                if self.is_nan() || o.is_nan() { <$t>::NAN } else { self.max(o) }
            }
            #[inline(always)] fn min_nan(self, o: Self) -> Self {
                if self.is_nan() || o.is_nan() { <$t>::NAN } else { self.min(o) }
            }
            #[inline(always)] fn is_pos(self) -> bool { self > 0.0 }
            #[inline(always)] fn to_f64(self) -> f64 { self as f64 }
            #[inline(always)] fn from_f64(v: f64) -> Self { v as $t }
        }
    )*};
}
arith_float!(f32, f64);

macro_rules! arith_half {
    ($($t:ty),*) => {$(
        impl Arith for $t {
            #[inline(always)] fn add(self, o: Self) -> Self { <$t>::from_f32(self.to_f32() + o.to_f32()) }
            #[inline(always)] fn sub(self, o: Self) -> Self { <$t>::from_f32(self.to_f32() - o.to_f32()) }
            #[inline(always)] fn mul(self, o: Self) -> Self { <$t>::from_f32(self.to_f32() * o.to_f32()) }
            #[inline(always)] fn div(self, o: Self) -> Self { <$t>::from_f32(self.to_f32() / o.to_f32()) }
            #[inline(always)] fn fmod(self, o: Self) -> Self { <$t>::from_f32(self.to_f32() % o.to_f32()) }
            #[inline(always)] fn pymod(self, o: Self) -> Self {
                <$t>::from_f32(Arith::pymod(self.to_f32(), o.to_f32()))
            }
            #[inline(always)] fn max_nan(self, o: Self) -> Self {
                <$t>::from_f32(Arith::max_nan(self.to_f32(), o.to_f32()))
            }
            #[inline(always)] fn min_nan(self, o: Self) -> Self {
                <$t>::from_f32(Arith::min_nan(self.to_f32(), o.to_f32()))
            }
            #[inline(always)] fn is_pos(self) -> bool { self.to_f32() > 0.0 }
            #[inline(always)] fn to_f64(self) -> f64 { self.to_f64() }
            #[inline(always)] fn from_f64(v: f64) -> Self { <$t>::from_f64(v) }
        }
    )*};
}
arith_half!(f16, bf16);

// ---------------------------------------------------------------------------------------------
// Kernels.

/// Inputs 0 and 1, which must share a dtype.
pub(crate) fn same_dtype_pair<'t>(
    ctx: &OpCtx,
    inputs: &'t [Option<Tensor>],
) -> Result<(&'t Tensor, &'t Tensor)> {
    let (a, b) = (ctx.input(inputs, 0)?, ctx.input(inputs, 1)?);
    if a.dtype() != b.dtype() {
        return Err(Error::DType(format!(
            "operands have different dtypes {} and {}",
            a.dtype(),
            b.dtype()
        )));
    }
    Ok((a, b))
}

/// A same-dtype numeric binary kernel from an `Arith` method (owned inputs: may work in place).
macro_rules! arith_kernel {
    ($name:ident, $method:ident) => {
        fn $name(ctx: &OpCtx, mut inputs: Vec<Option<Tensor>>) -> Result<Vec<Tensor>> {
            same_dtype_pair(ctx, &inputs)?;
            let (a, b) = (take_input(&mut inputs, 0)?, take_input(&mut inputs, 1)?);
            let out = crate::with_numeric!(a.dtype(), T, { map2_owned::<T>(a, b, |x, y| x.$method(y))? });
            Ok(vec![out])
        }
    };
}
arith_kernel!(add, add);
arith_kernel!(sub, sub);
arith_kernel!(mul, mul);
arith_kernel!(div, div);

fn modulo(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let (a, b) = same_dtype_pair(ctx, inputs)?;
    let dt = a.dtype();
    let out = if ctx.attr_i("fmod", 0) != 0 {
        crate::with_numeric!(dt, T, { map2::<T, T, T>(a, b, dt, |x, y| x.fmod(y))? })
    } else {
        crate::with_numeric!(dt, T, { map2::<T, T, T>(a, b, dt, |x, y| x.pymod(y))? })
    };
    Ok(vec![out])
}

/// Integer power by squaring, wrapping on overflow; negative exponents truncate toward zero.
fn ipow(base: i64, exp: i64) -> i64 {
    if exp < 0 {
        return match base {
            1 => 1,
            -1 => if exp % 2 == 0 { 1 } else { -1 },
            _ => 0,
        };
    }
    let (mut acc, mut b, mut e) = (1i64, base, exp as u64);
    while e > 0 {
        if e & 1 == 1 {
            acc = acc.wrapping_mul(b);
        }
        b = b.wrapping_mul(b);
        e >>= 1;
    }
    acc
}

fn pow(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let (a, b) = (ctx.input(inputs, 0)?, ctx.input(inputs, 1)?);
    let dt = a.dtype();
    let out = if dt.is_float() {
        // The exponent is brought to the base's type (usually a tiny tensor, often a scalar).
        let e = if b.dtype() == dt {
            b.clone()
        } else {
            let v = b.to_f64_vec()?;
            crate::with_float!(dt, T, {
                Tensor::from_vec(b.shape(), v.into_iter().map(T::from_f64).collect::<Vec<T>>())?
            })
        };
        crate::with_float!(dt, T, { float_pow::<T>(a, &e)? })
    } else if b.dtype().is_float() {
        let e = Tensor::from_vec(b.shape(), b.to_f64_vec()?)?;
        crate::with_int!(dt, T, {
            map2::<T, f64, T>(a, &e, dt, |x, y| T::from_f64(x.to_f64().powf(y)))?
        })
    } else {
        let e = Tensor::from_vec(b.shape(), b.to_i64_vec()?)?;
        crate::with_int!(dt, T, { map2::<T, i64, T>(a, &e, dt, |x, y| ipow(x as i64, y) as T)? })
    };
    Ok(vec![out])
}

/// Float power (exponent already of the base's type), with the common scalar exponents of
/// decomposed normalisations special-cased.
fn float_pow<T: Arith>(a: &Tensor, e: &Tensor) -> Result<Tensor> {
    let dt = a.dtype();
    if e.len() == 1 && e.rank() <= a.rank() {
        let shape = broadcast_shapes(&[a.shape(), e.shape()])?;
        let k = e.view::<T>()?[0].to_f64();
        let special: Option<fn(f64) -> f64> = if k == 2.0 {
            Some(|x| x * x)
        } else if k == 1.0 {
            Some(|x| x)
        } else if k == 0.5 {
            Some(f64::sqrt)
        } else {
            None
        };
        if let Some(g) = special {
            // Squares and square roots of f32/f16 values are exactly rounded through f64.
            let av = a.view::<T>()?;
            return Tensor::filled_by::<T>(dt, &shape, |out| {
                par_map(av, out, |x| T::from_f64(g(x.to_f64())));
                Ok(())
            });
        }
    }
    if dt == DType::F32 {
        return map2::<f32, f32, f32>(a, e, dt, f32::powf);
    }
    map2::<T, T, T>(a, e, dt, |x, y| T::from_f64(x.to_f64().powf(y.to_f64())))
}

/// `out[i] = f(inp[i])`, split across threads when large.
pub(crate) fn par_map<A: Copy + Sync, O: Send>(inp: &[A], out: &mut [O], f: impl Fn(A) -> O + Sync) {
    super::unary::transform(out, #[inline(always)]
    |s, o| {
        for (o, &x) in o.iter_mut().zip(&inp[s..]) {
            *o = f(x);
        }
    });
}

fn prelu(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let (x, slope) = same_dtype_pair(ctx, inputs)?;
    // Before opset 7 a 1-D slope of one value per channel applies along axis 1 (the Caffe form
    // old exporters emit), not along the last axis as numpy broadcasting would.
    let slope = if ctx.opset() < 7 && x.rank() > 2 && slope.rank() == 1 && slope.len() == x.shape()[1] && slope.len() > 1 {
        let mut shape = vec![1; x.rank() - 1];
        shape[0] = slope.len();
        slope.reshape(&shape)?
    } else {
        slope.clone()
    };
    let slope = &slope;
    let dt = x.dtype();
    let out = crate::with_numeric!(dt, T, {
        map2::<T, T, T>(x, slope, dt, |x, s| if x.is_pos() { x } else { x.mul(s) })?
    });
    if out.shape() != x.shape() {
        return Err(Error::Shape(format!(
            "PRelu slope of shape {:?} does not broadcast to X of shape {:?}",
            slope.shape(),
            x.shape()
        )));
    }
    Ok(vec![out])
}

fn bitshift(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let (a, b) = same_dtype_pair(ctx, inputs)?;
    let dt = a.dtype();
    let left = match ctx.attr_s("direction", "").as_str() {
        "LEFT" => true,
        "RIGHT" => false,
        d => return Err(ctx.unsupported(format!("direction '{d}'"))),
    };
    // Shifting by the bit width or more gives 0 (numpy), never a panic.
    let out = crate::with_int!(dt, T, {
        if left {
            map2::<T, T, T>(a, b, dt, |x, s| {
                u32::try_from(s).ok().and_then(|s| x.checked_shl(s)).unwrap_or(0)
            })?
        } else {
            map2::<T, T, T>(a, b, dt, |x, s| {
                u32::try_from(s).ok().and_then(|s| x.checked_shr(s)).unwrap_or(0)
            })?
        }
    });
    Ok(vec![out])
}

macro_rules! bitwise_kernel {
    ($name:ident, $op:tt) => {
        fn $name(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
            let (a, b) = same_dtype_pair(ctx, inputs)?;
            let dt = a.dtype();
            let out = if dt == DType::Bool {
                map2::<bool, bool, bool>(a, b, dt, |x, y| x $op y)?
            } else {
                crate::with_int!(dt, T, { map2::<T, T, T>(a, b, dt, |x, y| x $op y)? })
            };
            Ok(vec![out])
        }
    };
}
bitwise_kernel!(bitwise_and, &);
bitwise_kernel!(bitwise_or, |);
bitwise_kernel!(bitwise_xor, ^);

/// Fold a variadic op pairwise over its (broadcast) inputs.
fn variadic(
    ctx: &OpCtx,
    inputs: &[Option<Tensor>],
    step: impl Fn(&Tensor, &Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let mut it = inputs.iter().flatten();
    let mut acc = it.next().ok_or_else(|| ctx.unsupported("no inputs"))?.clone();
    for t in it {
        if t.dtype() != acc.dtype() {
            return Err(Error::DType(format!(
                "inputs have different dtypes {} and {}",
                acc.dtype(),
                t.dtype()
            )));
        }
        acc = step(&acc, t)?;
    }
    Ok(acc)
}

macro_rules! variadic_kernel {
    ($name:ident, $method:ident) => {
        fn $name(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
            let out = variadic(ctx, inputs, |a, b| {
                let dt = a.dtype();
                crate::with_numeric!(dt, T, { map2::<T, T, T>(a, b, dt, |x, y| x.$method(y)) })
            })?;
            Ok(vec![out])
        }
    };
}
variadic_kernel!(max, max_nan);
variadic_kernel!(min, min_nan);
variadic_kernel!(sum, add);

fn mean(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let n = inputs.iter().flatten().count() as f64;
    let total = sum(ctx, inputs)?.pop().unwrap();
    let dt = total.dtype();
    let mut out = Tensor::zeros(dt, total.shape());
    crate::with_numeric!(dt, T, {
        par_map(total.view::<T>()?, out.view_mut::<T>()?, |x| T::from_f64(x.to_f64() / n));
    });
    Ok(vec![out])
}

fn where_(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let c = ctx.input(inputs, 0)?;
    let (x, y) = same_dtype_pair(ctx, &inputs[1..])?;
    let (shape, plan) = Plan::new([c.shape(), x.shape(), y.shape()])?;
    let cv = c.view::<bool>()?;
    let dt = x.dtype();
    if dt == DType::String {
        let mut out = vec![String::new(); kiln_runtime::tensor::numel(&shape)];
        map3_into(&plan, cv, x.strings()?, y.strings()?, &mut out, |c, a, b| {
            if *c { a.clone() } else { b.clone() }
        });
        return Ok(vec![Tensor::from_strings(&shape, out)?]);
    }
    // Where only moves elements: run it on the raw bits of a same-sized unsigned type.
    let raw = super::cast::raw_dtype(dt)?;
    let (xr, yr) = (super::cast::reinterpret(x, raw)?, super::cast::reinterpret(y, raw)?);
    let mut out = Tensor::zeros(raw, &shape);
    macro_rules! go {
        ($T:ty) => {
            map3_into(&plan, cv, xr.view::<$T>()?, yr.view::<$T>()?, out.view_mut::<$T>()?, |c, a, b| {
                if *c { *a } else { *b }
            })
        };
    }
    match raw {
        DType::U8 => go!(u8),
        DType::U16 => go!(u16),
        DType::U32 => go!(u32),
        _ => go!(u64),
    }
    Ok(vec![super::cast::reinterpret(&out, dt)?])
}

pub fn register(r: &mut Registry) {
    r.add("Add", borrowed!(add));
    r.add("Sub", borrowed!(sub));
    r.add("Mul", borrowed!(mul));
    r.add("Div", borrowed!(div));
    r.add("Pow", pow);
    r.add("Mod", modulo);
    r.add("PRelu", prelu);
    r.add("BitShift", bitshift);
    r.add("BitwiseAnd", bitwise_and);
    r.add("BitwiseOr", bitwise_or);
    r.add("BitwiseXor", bitwise_xor);
    r.add("Max", max);
    r.add("Min", min);
    r.add("Sum", sum);
    r.add("Mean", mean);
    r.add("Where", where_);
}

/// Helpers for the kernel unit tests (this file's and the other kernels').
#[cfg(test)]
pub(crate) mod testing {
    use kiln_runtime::manifest::{Attr, AttrKind, Step};
    use kiln_runtime::{Result, Tensor};

    use crate::cpu::ctx::OpCtx;
    use crate::cpu::registry::{registry, Kernel};

    pub(crate) fn run(op: &str, opset: i64, attrs: Vec<Attr>, inputs: Vec<Option<Tensor>>) -> Result<Tensor> {
        let step = Step { op: op.into(), opset, outputs: vec![0], attrs, ..Default::default() };
        Ok(run_step(&step, &inputs)?.remove(0))
    }

    /// Run the tensor kernel registered for `step`'s domain and op.
    pub(crate) fn run_step(step: &Step, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
        match registry().get(&step.domain, &step.op) {
            Some(Kernel::Tensor(k)) => k(&OpCtx::new(step, None), inputs),
            _ => panic!("no tensor kernel for {}:{}", step.domain, step.op),
        }
    }

    /// Run a kiln-domain op (opset 1) with one output.
    pub(crate) fn run_kiln(op: &str, attrs: Vec<Attr>, inputs: Vec<Option<Tensor>>) -> Result<Vec<Tensor>> {
        let step = Step { op: op.into(), domain: "kiln".into(), opset: 1, attrs, outputs: vec![0], ..Default::default() };
        run_step(&step, &inputs)
    }

    pub(crate) fn ai(name: &str, i: i64) -> Attr {
        Attr { name: name.into(), kind: AttrKind::Int as i32, i, ..Default::default() }
    }

    pub(crate) fn af(name: &str, f: f32) -> Attr {
        Attr { name: name.into(), kind: AttrKind::Float as i32, f, ..Default::default() }
    }

    pub(crate) fn as_(name: &str, s: &str) -> Attr {
        Attr { name: name.into(), kind: AttrKind::String as i32, s: s.as_bytes().to_vec(), ..Default::default() }
    }

    pub(crate) fn t<T: kiln_runtime::Elem>(shape: &[usize], v: Vec<T>) -> Option<Tensor> {
        Some(Tensor::from_vec(shape, v).unwrap())
    }

    /// Deterministic pseudo-random f32 values in [-scale, scale).
    pub(crate) fn rand_f32(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect()
    }

    /// Run the owned-input form of `op` (what the interpreter calls when inputs are dead).
    pub(crate) fn run_owned(op: &str, opset: i64, attrs: Vec<Attr>, inputs: Vec<Option<Tensor>>) -> Result<Vec<Tensor>> {
        let step = Step { op: op.into(), opset, outputs: vec![0], attrs, ..Default::default() };
        let k = super::owned_kernel("", op).expect("an owned kernel");
        k(&OpCtx::new(&step, None), inputs)
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    #[test]
    fn broadcast_matches_naive_indexing() {
        // Shapes exercising collapse, middle broadcast, scalar, and the parallel path.
        let cases: &[(&[usize], &[usize])] = &[
            (&[2, 3, 4], &[3, 1]),
            (&[2, 3, 4], &[4]),
            (&[2, 1, 4], &[1, 3, 1]),
            (&[5], &[]),
            (&[], &[2, 2]),
            (&[3, 1, 50000], &[1, 2, 1]),
            (&[70000], &[70000]),
            (&[0, 3], &[3]),
        ];
        for &(sa, sb) in cases {
            let na: usize = sa.iter().product();
            let nb: usize = sb.iter().product();
            let a: Vec<i64> = (0..na as i64).collect();
            let b: Vec<i64> = (0..nb as i64).map(|v| v * 1_000_000).collect();
            let out = run("Add", 14, vec![], vec![t(sa, a.clone()), t(sb, b.clone())]).unwrap();
            let shape = broadcast_shapes(&[sa, sb]).unwrap();
            assert_eq!(out.shape(), &shape[..]);
            let (ta, tb) = (broadcast_strides(sa, &shape), broadcast_strides(sb, &shape));
            let got = out.view::<i64>().unwrap();
            let n: usize = shape.iter().product();
            for (i, &g) in got.iter().enumerate().take(n) {
                let (mut rem, mut ia, mut ib) = (i, 0, 0);
                for d in (0..shape.len()).rev() {
                    let k = rem % shape[d];
                    rem /= shape[d];
                    ia += k * ta[d];
                    ib += k * tb[d];
                }
                assert_eq!(g, a[ia] + b[ib], "{sa:?} + {sb:?} at {i}");
            }
        }
    }

    #[test]
    fn integer_division_truncates_and_never_traps() {
        let out = run("Div", 14, vec![], vec![t(&[6], vec![-3i32, 3, -3, 3, 5, i32::MIN]), t(&[6], vec![2i32, 2, -2, -2, 0, -1])]);
        assert_eq!(out.unwrap().view::<i32>().unwrap(), &[-1, 1, 1, -1, 0, i32::MIN]);
        let out = run("Div", 14, vec![], vec![t(&[2], vec![7u8, 9]), t(&[], vec![2u8])]).unwrap();
        assert_eq!(out.view::<u8>().unwrap(), &[3, 4]);
    }

    #[test]
    fn modulo_sign_rules() {
        let a = vec![-4i8, 7, 5, 4, -7, 8];
        let b = vec![2i8, -3, 8, -2, 3, 5];
        let py = run("Mod", 13, vec![], vec![t(&[6], a.clone()), t(&[6], b.clone())]).unwrap();
        assert_eq!(py.view::<i8>().unwrap(), &[0, -2, 5, 0, 2, 3]);
        let c = run("Mod", 13, vec![ai("fmod", 1)], vec![t(&[6], a), t(&[6], b)]).unwrap();
        assert_eq!(c.view::<i8>().unwrap(), &[0, 1, 5, 0, -1, 3]);
        let f = run("Mod", 13, vec![ai("fmod", 1)], vec![t(&[2], vec![-4.5f32, 7.0]), t(&[2], vec![2.0f32, -3.0])]).unwrap();
        assert_eq!(f.view::<f32>().unwrap(), &[-0.5, 1.0]);
    }

    #[test]
    fn pow_mixed_types() {
        let out = run("Pow", 15, vec![], vec![t(&[3], vec![1i32, 2, 3]), t(&[3], vec![4.0f32, 5.0, 6.0])]).unwrap();
        assert_eq!(out.view::<i32>().unwrap(), &[1, 32, 729]);
        let out = run("Pow", 15, vec![], vec![t(&[3], vec![2i64, -3, 5]), t(&[3], vec![10i64, 3, -1])]).unwrap();
        assert_eq!(out.view::<i64>().unwrap(), &[1024, -27, 0]);
        let out = run("Pow", 15, vec![], vec![t(&[3], vec![1.5f32, -2.0, 4.0]), t(&[], vec![2i64])]).unwrap();
        assert_eq!(out.view::<f32>().unwrap(), &[2.25, 4.0, 16.0]);
        let out = run("Pow", 15, vec![], vec![t(&[2], vec![4.0f64, 8.0]), t(&[2], vec![0.5f64, 1.0 / 3.0])]).unwrap();
        let v = out.view::<f64>().unwrap();
        assert!((v[0] - 2.0).abs() < 1e-12 && (v[1] - 2.0).abs() < 1e-12);
    }

    #[test]
    fn variadic_ops() {
        let nan = f32::NAN;
        let out = run("Max", 13, vec![], vec![t(&[3], vec![1.0f32, nan, 3.0]), t(&[1], vec![2.0f32]), t(&[3], vec![0.0f32, 0.0, 5.0])]).unwrap();
        let v = out.view::<f32>().unwrap();
        assert_eq!((v[0], v[2]), (2.0, 5.0));
        assert!(v[1].is_nan());
        let out = run("Min", 13, vec![], vec![t(&[2], vec![3u16, 1])]).unwrap();
        assert_eq!(out.view::<u16>().unwrap(), &[3, 1]);
        let out = run("Sum", 13, vec![], vec![t(&[2], vec![1.0f32, 2.0]), t(&[2, 1], vec![10.0f32, 20.0])]).unwrap();
        assert_eq!(out.shape(), &[2, 2]);
        assert_eq!(out.view::<f32>().unwrap(), &[11.0, 12.0, 21.0, 22.0]);
        let out = run("Mean", 13, vec![], vec![t(&[2], vec![1i32, -4]), t(&[2], vec![2i32, 1])]).unwrap();
        assert_eq!(out.view::<i32>().unwrap(), &[1, -1]);
        let h = |v: f32| f16::from_f32(v);
        let out = run("Mean", 13, vec![], vec![t(&[1], vec![h(1.0)]), t(&[1], vec![h(2.0)])]).unwrap();
        assert_eq!(out.view::<f16>().unwrap(), &[h(1.5)]);
    }

    #[test]
    fn prelu_bitshift_bitwise() {
        let out = run("PRelu", 16, vec![], vec![t(&[2, 2], vec![-1.0f32, 2.0, -3.0, 4.0]), t(&[2], vec![0.5f32, 0.25])]).unwrap();
        assert_eq!(out.view::<f32>().unwrap(), &[-0.5, 2.0, -1.5, 4.0]);
        assert!(run("PRelu", 16, vec![], vec![t(&[2], vec![1.0f32, 2.0]), t(&[2, 2], vec![0.0f32; 4])]).is_err());
        let out = run("BitShift", 11, vec![as_("direction", "LEFT")], vec![t(&[3], vec![16u8, 4, 1]), t(&[3], vec![1u8, 2, 9])]).unwrap();
        assert_eq!(out.view::<u8>().unwrap(), &[32, 16, 0]);
        let out = run("BitShift", 11, vec![as_("direction", "RIGHT")], vec![t(&[2], vec![16u32, 4]), t(&[], vec![2u32])]).unwrap();
        assert_eq!(out.view::<u32>().unwrap(), &[4, 1]);
        let out = run("BitwiseXor", 18, vec![], vec![t(&[2], vec![0b1100i16, -1]), t(&[2], vec![0b1010i16, 0])]).unwrap();
        assert_eq!(out.view::<i16>().unwrap(), &[0b0110, -1]);
    }

    #[test]
    fn where_any_dtype() {
        let c = t(&[2, 1], vec![true, false]);
        let out = run("Where", 16, vec![], vec![c.clone(), t(&[2], vec![1i64, 2]), t(&[], vec![9i64])]).unwrap();
        assert_eq!(out.shape(), &[2, 2]);
        assert_eq!(out.view::<i64>().unwrap(), &[1, 2, 9, 9]);
        let h = |v: f32| bf16::from_f32(v);
        let out = run("Where", 16, vec![], vec![c.clone(), t(&[1], vec![h(1.0)]), t(&[1], vec![h(2.0)])]).unwrap();
        assert_eq!(out.dtype(), DType::BF16);
        assert_eq!(out.view::<bf16>().unwrap(), &[h(1.0), h(2.0)]);
        let s = |v: &[&str]| Some(Tensor::from_strings(&[v.len()], v.iter().map(|s| s.to_string()).collect()).unwrap());
        let out = run("Where", 16, vec![], vec![c, s(&["a", "b"]), s(&["z"])]).unwrap();
        assert_eq!(out.strings().unwrap(), &["a", "b", "z", "z"]);
    }

    /// Reference broadcast of f32 `f` by explicit index arithmetic.
    fn naive2(sa: &[usize], a: &[f32], sb: &[usize], b: &[f32], f: impl Fn(f32, f32) -> f32) -> (Vec<usize>, Vec<f32>) {
        let shape = broadcast_shapes(&[sa, sb]).unwrap();
        let (ta, tb) = (broadcast_strides(sa, &shape), broadcast_strides(sb, &shape));
        let n: usize = shape.iter().product();
        let out = (0..n)
            .map(|i| {
                let (mut rem, mut ia, mut ib) = (i, 0, 0);
                for d in (0..shape.len()).rev() {
                    let k = rem % shape[d];
                    rem /= shape[d];
                    ia += k * ta[d];
                    ib += k * tb[d];
                }
                f(a[ia], b[ib])
            })
            .collect();
        (shape, out)
    }

    #[test]
    fn owned_binary_in_place_matches_naive() {
        // Same shape, scalar either side, trailing row, per-channel NCHW, middle broadcast, both
        // broadcast (no operand has the output shape), empty, and the parallel size.
        let cases: &[(&[usize], &[usize])] = &[
            (&[3, 5], &[3, 5]),
            (&[2, 3, 4], &[]),
            (&[], &[2, 3, 4]),
            (&[4, 7], &[7]),
            (&[7], &[4, 7]),
            (&[2, 3, 5, 5], &[3, 1, 1]),
            (&[2, 3, 5, 5], &[1, 3, 1, 1]),
            (&[2, 1, 4], &[1, 3, 1]),
            (&[0, 3], &[3]),
            (&[3], &[0, 3]),
            (&[2, 70000], &[2, 1]),
        ];
        type F = fn(f32, f32) -> f32;
        let ops: [(&str, F); 4] = [("Add", |x, y| x + y), ("Sub", |x, y| x - y), ("Mul", |x, y| x * y), ("Div", |x, y| x / y)];
        for (ci, &(sa, sb)) in cases.iter().enumerate() {
            let na: usize = sa.iter().product();
            let nb: usize = sb.iter().product();
            let a = rand_f32(na, ci as u64, 3.0);
            let b: Vec<f32> = rand_f32(nb, 100 + ci as u64, 3.0).into_iter().map(|v| v + 4.0).collect();
            for (op, f) in ops {
                let (shape, want) = naive2(sa, &a, sb, &b, f);
                for keep in [false, true] {
                    let (ta, tb) = (t(sa, a.clone()).unwrap(), t(sb, b.clone()).unwrap());
                    // With `keep`, the caller still holds the operands: they must not change.
                    let held = keep.then(|| (ta.clone(), tb.clone()));
                    let out = run_owned(op, 14, vec![], vec![Some(ta), Some(tb)]).unwrap().remove(0);
                    assert_eq!(out.shape(), &shape[..], "{op} {sa:?} {sb:?}");
                    assert_eq!(out.view::<f32>().unwrap(), &want[..], "{op} {sa:?} {sb:?} keep={keep}");
                    if let Some((ha, hb)) = held {
                        assert_eq!(ha.view::<f32>().unwrap(), &a[..]);
                        assert_eq!(hb.view::<f32>().unwrap(), &b[..]);
                    }
                }
            }
        }
    }

    #[test]
    fn owned_binary_same_buffer_twice() {
        // Add(x, x): both operands share one buffer, so neither is unique and x must survive.
        let x = t(&[5], vec![1.0f32, 2.0, 3.0, 4.0, 5.0]).unwrap();
        let out = run_owned("Mul", 14, vec![], vec![Some(x.clone()), Some(x.clone())]).unwrap().remove(0);
        assert_eq!(out.view::<f32>().unwrap(), &[1.0, 4.0, 9.0, 16.0, 25.0]);
        assert_eq!(x.view::<f32>().unwrap(), &[1.0, 2.0, 3.0, 4.0, 5.0]);
        // Integer in place keeps the wrapping semantics.
        let out = run_owned("Add", 14, vec![], vec![t(&[2], vec![i8::MAX, 1]), t(&[], vec![1i8])]).unwrap();
        assert_eq!(out[0].view::<i8>().unwrap(), &[i8::MIN, 2]);
        assert!(run_owned("Add", 14, vec![], vec![t(&[2], vec![1i8, 1]), t(&[2], vec![1i16, 1])]).is_err());
        assert!(run_owned("Add", 14, vec![], vec![t(&[2], vec![1f32, 1.]), t(&[3], vec![1f32, 1., 1.])]).is_err());
    }
}
