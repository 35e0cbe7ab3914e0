//! Reductions: the Reduce* family, ArgMax/ArgMin, and the scans CumSum/CumProd.
//!
//! Every Reduce* op is one generic walk over a "plan": the input shape with size-1 dims dropped and
//! adjacent reduced / kept dims merged, so the innermost loop always runs over a contiguous range
//! (a row being reduced, or a block of outputs accumulated column-wise).

use half::{bf16, f16};
use kiln_runtime::{DType, Elem, Error, Result, Tensor};
use rayon::prelude::*;

use crate::cpu::ctx::OpCtx;
use crate::cpu::registry::Registry;
use crate::cpu::util::{norm_axis, strides};

pub fn register(r: &mut Registry) {
    r.add("ReduceSum", reduce_sum);
    r.add("ReduceMean", reduce_mean);
    r.add("ReduceMax", reduce_max);
    r.add("ReduceMin", reduce_min);
    r.add("ReduceProd", reduce_prod);
    r.add("ReduceL1", reduce_l1);
    r.add("ReduceL2", reduce_l2);
    r.add("ReduceLogSum", reduce_log_sum);
    r.add("ReduceLogSumExp", reduce_log_sum_exp);
    r.add("ReduceSumSquare", reduce_sum_square);
    r.add("ArgMax", argmax);
    r.add("ArgMin", argmin);
    r.add("CumSum", cumsum);
    r.add("CumProd", cumprod);
}

/// Input elements per parallel task; below this, loops stay on one thread.
const PAR_GRAIN: usize = 1 << 15;

// ---------------------------------------------------------------------------------------------
// Accumulator arithmetic
// ---------------------------------------------------------------------------------------------

/// The type a reduction accumulates in: f32 for f32/f16/bf16, f64 for f64, i64 / u64 for integers
/// (integer arithmetic wraps, which equals numpy's in-type wrapping once truncated back).
pub(crate) trait Acc: Copy + Send + Sync + Default + 'static {
    const ZERO: Self;
    const ONE: Self;
    fn add(self, o: Self) -> Self;
    fn mul(self, o: Self) -> Self;
    fn abs(self) -> Self;
    /// Maximum, propagating NaN.
    fn max(self, o: Self) -> Self;
    /// Minimum, propagating NaN.
    fn min(self, o: Self) -> Self;
    fn div_n(self, n: usize) -> Self;
    fn to_f64(self) -> f64;
    fn from_f64(v: f64) -> Self;
    fn sqrt(self) -> Self {
        Self::from_f64(self.to_f64().sqrt())
    }
    fn ln(self) -> Self {
        Self::from_f64(self.to_f64().ln())
    }
    fn exp(self) -> Self {
        Self::from_f64(self.to_f64().exp())
    }
    fn sub(self, o: Self) -> Self {
        Self::from_f64(self.to_f64() - o.to_f64())
    }
    fn is_finite(self) -> bool {
        true
    }
    fn is_nan(self) -> bool {
        false
    }
    fn gt(self, o: Self) -> bool;
}

macro_rules! float_acc {
    ($t:ty) => {
        impl Acc for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            #[inline(always)]
            fn add(self, o: Self) -> Self {
                self + o
            }
            #[inline(always)]
            fn mul(self, o: Self) -> Self {
                self * o
            }
            #[inline(always)]
            fn abs(self) -> Self {
                <$t>::abs(self)
            }
            #[inline(always)]
            fn max(self, o: Self) -> Self {
                if o > self || o.is_nan() {
                    o
                } else {
                    self
                }
            }
            #[inline(always)]
            fn min(self, o: Self) -> Self {
                if o < self || o.is_nan() {
                    o
                } else {
                    self
                }
            }
            fn div_n(self, n: usize) -> Self {
                self / n as $t
            }
            fn to_f64(self) -> f64 {
                self as f64
            }
            fn from_f64(v: f64) -> Self {
                v as $t
            }
            #[inline(always)]
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            #[inline(always)]
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
            #[inline(always)]
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            #[inline(always)]
            fn sub(self, o: Self) -> Self {
                self - o
            }
            fn is_finite(self) -> bool {
                <$t>::is_finite(self)
            }
            fn is_nan(self) -> bool {
                <$t>::is_nan(self)
            }
            #[inline(always)]
            fn gt(self, o: Self) -> bool {
                self > o
            }
        }
    };
}
float_acc!(f32);
float_acc!(f64);

macro_rules! int_acc {
    ($t:ty) => {
        impl Acc for $t {
            const ZERO: Self = 0;
            const ONE: Self = 1;
            #[inline(always)]
            fn add(self, o: Self) -> Self {
                self.wrapping_add(o)
            }
            #[inline(always)]
            fn mul(self, o: Self) -> Self {
                self.wrapping_mul(o)
            }
            #[inline(always)]
            #[allow(unused_comparisons)]
            fn abs(self) -> Self {
                if self < 0 {
                    (0 as $t).wrapping_sub(self)
                } else {
                    self
                }
            }
            #[inline(always)]
            fn max(self, o: Self) -> Self {
                Ord::max(self, o)
            }
            #[inline(always)]
            fn min(self, o: Self) -> Self {
                Ord::min(self, o)
            }
            fn div_n(self, n: usize) -> Self {
                if n == 0 {
                    0
                } else {
                    self / n as $t
                }
            }
            fn to_f64(self) -> f64 {
                self as f64
            }
            fn from_f64(v: f64) -> Self {
                v as $t
            }
            #[inline(always)]
            fn gt(self, o: Self) -> bool {
                self > o
            }
        }
    };
}
int_acc!(i64);
int_acc!(u64);

/// A tensor element that can be reduced.
pub(crate) trait RElem: Elem {
    type A: Acc;
    fn acc(self) -> Self::A;
    fn from_acc(a: Self::A) -> Self;
    /// Identity of max (the smallest value).
    fn lowest() -> Self::A;
    /// Identity of min (the largest value).
    fn highest() -> Self::A;
}

macro_rules! relem_prim {
    ($t:ty, $a:ty, $lo:expr, $hi:expr) => {
        impl RElem for $t {
            type A = $a;
            #[inline(always)]
            fn acc(self) -> $a {
                self as $a
            }
            #[inline(always)]
            fn from_acc(a: $a) -> $t {
                a as $t
            }
            fn lowest() -> $a {
                $lo
            }
            fn highest() -> $a {
                $hi
            }
        }
    };
}
relem_prim!(f32, f32, f32::NEG_INFINITY, f32::INFINITY);
relem_prim!(f64, f64, f64::NEG_INFINITY, f64::INFINITY);
relem_prim!(i8, i64, i8::MIN as i64, i8::MAX as i64);
relem_prim!(i16, i64, i16::MIN as i64, i16::MAX as i64);
relem_prim!(i32, i64, i32::MIN as i64, i32::MAX as i64);
relem_prim!(i64, i64, i64::MIN, i64::MAX);
relem_prim!(u8, u64, 0, u8::MAX as u64);
relem_prim!(u16, u64, 0, u16::MAX as u64);
relem_prim!(u32, u64, 0, u32::MAX as u64);
relem_prim!(u64, u64, 0, u64::MAX);

macro_rules! relem_half {
    ($t:ty) => {
        impl RElem for $t {
            type A = f32;
            #[inline(always)]
            fn acc(self) -> f32 {
                self.to_f32()
            }
            #[inline(always)]
            fn from_acc(a: f32) -> $t {
                <$t>::from_f32(a)
            }
            fn lowest() -> f32 {
                f32::NEG_INFINITY
            }
            fn highest() -> f32 {
                f32::INFINITY
            }
        }
    };
}
relem_half!(f16);
relem_half!(bf16);

impl RElem for bool {
    type A = u64;
    fn acc(self) -> u64 {
        self as u64
    }
    fn from_acc(a: u64) -> bool {
        a != 0
    }
    fn lowest() -> u64 {
        0
    }
    fn highest() -> u64 {
        1
    }
}

// ---------------------------------------------------------------------------------------------
// The reduction plan and the generic walk
// ---------------------------------------------------------------------------------------------

/// How to visit, for each output element, the input elements it reduces.
struct Plan {
    out_len: usize,
    /// Input elements per output element.
    count: usize,
    /// Length of the contiguous run reduced innermost (0 when the innermost group is kept).
    run: usize,
    /// Length of the contiguous block of outputs innermost (1 when the innermost group is reduced).
    block: usize,
    /// Offsets of the reduced positions, excluding the innermost run.
    roffs: Vec<usize>,
    /// (size, stride) of the kept groups, outermost first, excluding the innermost block.
    keep: Vec<(usize, usize)>,
}

impl Plan {
    fn new(shape: &[usize], reduced: &[bool]) -> Plan {
        let st = strides(shape);
        // Merge adjacent dims of the same kind; size-1 dims change no offsets and are dropped.
        let mut groups: Vec<(usize, usize, bool)> = Vec::new();
        for (i, &d) in shape.iter().enumerate() {
            if d == 1 {
                continue;
            }
            match groups.last_mut() {
                Some(g) if g.2 == reduced[i] && g.1 == st[i] * d => {
                    g.0 *= d;
                    g.1 = st[i];
                }
                _ => groups.push((d, st[i], reduced[i])),
            }
        }
        let count = shape.iter().zip(reduced).filter(|(_, &r)| r).map(|(&d, _)| d).product();
        let out_len = shape.iter().zip(reduced).filter(|(_, &r)| !r).map(|(&d, _)| d).product();
        let (run, block) = match groups.last() {
            Some(&(d, _, true)) => (d, 1),
            Some(&(d, _, false)) => (0, d),
            None => (0, 1),
        };
        if !groups.is_empty() {
            groups.pop();
        }
        let mut roffs = vec![0usize];
        for &(d, s, r) in &groups {
            if r {
                roffs = roffs.iter().flat_map(|&o| (0..d).map(move |i| o + i * s)).collect();
            }
        }
        let keep = groups.iter().filter(|g| !g.2).map(|g| (g.0, g.1)).collect();
        Plan { out_len, count, run, block, roffs, keep }
    }

    /// Input offset of the first element of outer block `b`.
    #[inline]
    fn base(&self, mut b: usize) -> usize {
        let mut off = 0;
        for &(d, s) in self.keep.iter().rev() {
            off += (b % d) * s;
            b /= d;
        }
        off
    }
}

/// Reduce `x` along `plan`: each output is `fin(fold(step, init), o)`, with `comb` merging partial
/// accumulators (init must be its identity).
fn walk<T, A, O>(
    x: &[T],
    p: &Plan,
    init: A,
    step: impl Fn(A, T, usize) -> A + Sync,
    comb: impl Fn(A, A) -> A + Sync,
    fin: impl Fn(A, usize) -> O + Sync,
) -> Vec<O>
where
    T: Copy + Sync,
    A: Copy + Send + Sync,
    O: Copy + Send + Default,
{
    let mut out = vec![O::default(); p.out_len];
    if p.out_len == 0 {
        return out;
    }
    if x.is_empty() {
        for (o, v) in out.iter_mut().enumerate() {
            *v = fin(init, o);
        }
        return out;
    }
    let work = p.out_len * p.count.max(1);
    if p.run > 0 {
        let r = p.run;
        let per = (PAR_GRAIN / p.count.max(1)).max(1);
        let row = |o0: usize, chunk: &mut [O]| {
            for (j, v) in chunk.iter_mut().enumerate() {
                let o = o0 + j;
                let base = p.base(o);
                let mut lanes = [init; 8];
                for &ro in &p.roffs {
                    let xs = &x[base + ro..base + ro + r];
                    let mut it = xs.chunks_exact(8);
                    for c in &mut it {
                        for k in 0..8 {
                            lanes[k] = step(lanes[k], c[k], o);
                        }
                    }
                    for &e in it.remainder() {
                        lanes[0] = step(lanes[0], e, o);
                    }
                }
                let mut a = lanes[0];
                for l in &lanes[1..] {
                    a = comb(a, *l);
                }
                *v = fin(a, o);
            }
        };
        if work >= 2 * PAR_GRAIN && crate::cpu::par::threads() > 1 {
            out.par_chunks_mut(per).enumerate().for_each(|(c, ch)| row(c * per, ch));
        } else {
            row(0, &mut out);
        }
    } else {
        let k = p.block;
        let blocks_per = (PAR_GRAIN / (k * p.count.max(1))).max(1);
        let blk = |b0: usize, chunk: &mut [O]| {
            let mut acc = vec![init; k];
            for (j, ob) in chunk.chunks_mut(k).enumerate() {
                let b = b0 + j;
                let base = p.base(b);
                acc.fill(init);
                for &ro in &p.roffs {
                    let xs = &x[base + ro..base + ro + k];
                    for (i, (a, &e)) in acc.iter_mut().zip(xs).enumerate() {
                        *a = step(*a, e, b * k + i);
                    }
                }
                for (i, (v, a)) in ob.iter_mut().zip(&acc).enumerate() {
                    *v = fin(*a, b * k + i);
                }
            }
        };
        if work >= 2 * PAR_GRAIN && crate::cpu::par::threads() > 1 {
            out.par_chunks_mut(k * blocks_per).enumerate().for_each(|(c, ch)| blk(c * blocks_per, ch));
        } else {
            blk(0, &mut out);
        }
    }
    out
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Sum,
    Mean,
    Max,
    Min,
    Prod,
    L1,
    L2,
    LogSum,
    LogSumExp,
    SumSquare,
}

fn reduce_typed<T: RElem>(kind: Kind, x: &[T], p: &Plan) -> Vec<T> {
    let n = p.count;
    let add = |a: T::A, b: T::A| a.add(b);
    let z = T::A::ZERO;
    match kind {
        Kind::Sum => walk(x, p, z, |a, v: T, _| a.add(v.acc()), add, |a, _| T::from_acc(a)),
        Kind::Mean => walk(x, p, z, |a, v: T, _| a.add(v.acc()), add, |a, _| {
            if n == 0 {
                T::from_acc(T::A::from_f64(f64::NAN))
            } else {
                T::from_acc(a.div_n(n))
            }
        }),
        Kind::Max => walk(
            x,
            p,
            T::lowest(),
            |a, v: T, _| a.max(v.acc()),
            |a, b| a.max(b),
            |a, _| T::from_acc(a),
        ),
        Kind::Min => walk(
            x,
            p,
            T::highest(),
            |a, v: T, _| a.min(v.acc()),
            |a, b| a.min(b),
            |a, _| T::from_acc(a),
        ),
        Kind::Prod => walk(
            x,
            p,
            T::A::ONE,
            |a, v: T, _| a.mul(v.acc()),
            |a, b| a.mul(b),
            |a, _| T::from_acc(a),
        ),
        Kind::L1 => walk(x, p, z, |a, v: T, _| a.add(v.acc().abs()), add, |a, _| T::from_acc(a)),
        Kind::L2 => walk(
            x,
            p,
            z,
            |a, v: T, _| {
                let e = v.acc();
                a.add(e.mul(e))
            },
            add,
            |a, _| T::from_acc(a.sqrt()),
        ),
        Kind::SumSquare => walk(
            x,
            p,
            z,
            |a, v: T, _| {
                let e = v.acc();
                a.add(e.mul(e))
            },
            add,
            |a, _| T::from_acc(a),
        ),
        Kind::LogSum => {
            walk(x, p, z, |a, v: T, _| a.add(v.acc()), add, |a, _| T::from_acc(a.ln()))
        }
        Kind::LogSumExp => {
            // Shift by the finite maximum so exp cannot overflow.
            let mx: Vec<T::A> = walk(
                x,
                p,
                T::lowest(),
                |a, v: T, _| {
                    let e = v.acc();
                    if e.is_finite() {
                        a.max(e)
                    } else {
                        a
                    }
                },
                |a, b| a.max(b),
                |a, _| if a.is_finite() { a } else { z },
            );
            walk(
                x,
                p,
                z,
                |a, v: T, o| a.add(v.acc().sub(mx[o]).exp()),
                add,
                |a, o| T::from_acc(a.ln().add(mx[o])),
            )
        }
    }
}

/// The axes to reduce (sorted, deduplicated), or None for "reduce nothing" (noop).
fn reduce_axes(ctx: &OpCtx, inputs: &[Option<Tensor>], rank: usize, input_since: i64) -> Result<Option<Vec<usize>>> {
    let axes: Option<Vec<i64>> = if ctx.opset() >= input_since {
        match ctx.opt_input(inputs, 1) {
            Some(t) => Some(t.to_i64_vec()?),
            None => None,
        }
    } else {
        ctx.attr_ints("axes")
    };
    let axes = axes.unwrap_or_default();
    if axes.is_empty() {
        if ctx.opset() >= input_since && ctx.attr_i("noop_with_empty_axes", 0) != 0 {
            return Ok(None);
        }
        return Ok(Some((0..rank).collect()));
    }
    let mut v = axes.iter().map(|&a| norm_axis(a, rank)).collect::<Result<Vec<_>>>()?;
    v.sort_unstable();
    v.dedup();
    Ok(Some(v))
}

fn reduce_op(ctx: &OpCtx, inputs: &[Option<Tensor>], kind: Kind, input_since: i64) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    let shape = x.shape().to_vec();
    let rank = shape.len();
    let keepdims = ctx.attr_i("keepdims", 1) != 0;
    let mut reduced = vec![false; rank];
    if let Some(axes) = reduce_axes(ctx, inputs, rank, input_since)? {
        for a in axes {
            reduced[a] = true;
        }
    }
    let out_shape: Vec<usize> = shape
        .iter()
        .zip(&reduced)
        .filter_map(|(&d, &r)| match (r, keepdims) {
            (false, _) => Some(d),
            (true, true) => Some(1),
            (true, false) => None,
        })
        .collect();
    let plan = Plan::new(&shape, &reduced);
    if x.dtype() == DType::Bool {
        if !matches!(kind, Kind::Max | Kind::Min) {
            return Err(Error::DType(format!("{kind:?} does not take bool input")));
        }
        let v = reduce_typed(kind, x.view::<bool>()?, &plan);
        return Ok(vec![Tensor::from_vec(&out_shape, v)?]);
    }
    crate::with_numeric!(x.dtype(), T, {
        let v = reduce_typed(kind, x.view::<T>()?, &plan);
        Ok(vec![Tensor::from_vec(&out_shape, v)?])
    })
}

fn reduce_sum(c: &OpCtx, i: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    reduce_op(c, i, Kind::Sum, 13)
}
fn reduce_mean(c: &OpCtx, i: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    reduce_op(c, i, Kind::Mean, 18)
}
fn reduce_max(c: &OpCtx, i: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    reduce_op(c, i, Kind::Max, 18)
}
fn reduce_min(c: &OpCtx, i: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    reduce_op(c, i, Kind::Min, 18)
}
fn reduce_prod(c: &OpCtx, i: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    reduce_op(c, i, Kind::Prod, 18)
}
fn reduce_l1(c: &OpCtx, i: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    reduce_op(c, i, Kind::L1, 18)
}
fn reduce_l2(c: &OpCtx, i: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    reduce_op(c, i, Kind::L2, 18)
}
fn reduce_log_sum(c: &OpCtx, i: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    reduce_op(c, i, Kind::LogSum, 18)
}
fn reduce_log_sum_exp(c: &OpCtx, i: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    reduce_op(c, i, Kind::LogSumExp, 18)
}
fn reduce_sum_square(c: &OpCtx, i: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    reduce_op(c, i, Kind::SumSquare, 18)
}

// ---------------------------------------------------------------------------------------------
// ArgMax / ArgMin
// ---------------------------------------------------------------------------------------------

/// Index of the extreme element along the axis for each (outer, inner) position. NaN beats every
/// number (numpy's rule); ties go to the first index, or the last with `last`.
fn arg_typed<T: RElem>(x: &[T], outer: usize, n: usize, inner: usize, max: bool, last: bool) -> Vec<i64> {
    let mut out = vec![0i64; outer * inner];
    if n == 0 || inner == 0 {
        return out;
    }
    let body = |o: usize, dst: &mut [i64]| {
        let base = o * n * inner;
        let mut best: Vec<T::A> = x[base..base + inner].iter().map(|v| v.acc()).collect();
        for j in 1..n {
            let row = &x[base + j * inner..base + (j + 1) * inner];
            for i in 0..inner {
                let v = row[i].acc();
                let b = best[i];
                let take = if b.is_nan() {
                    last && v.is_nan()
                } else if v.is_nan() {
                    true
                } else {
                    let (hi, lo) = if max { (v, b) } else { (b, v) };
                    hi.gt(lo) || (last && !lo.gt(hi))
                };
                if take {
                    best[i] = v;
                    dst[i] = j as i64;
                }
            }
        }
    };
    if outer * n * inner >= 2 * PAR_GRAIN && outer > 1 && crate::cpu::par::threads() > 1 {
        out.par_chunks_mut(inner).enumerate().for_each(|(o, d)| body(o, d));
    } else {
        for (o, d) in out.chunks_mut(inner).enumerate() {
            body(o, d);
        }
    }
    out
}

fn arg_op(ctx: &OpCtx, inputs: &[Option<Tensor>], max: bool) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    let shape = x.shape();
    let rank = shape.len();
    let axis = norm_axis(ctx.attr_i("axis", 0), rank)?;
    let keepdims = ctx.attr_i("keepdims", 1) != 0;
    let last = ctx.attr_i("select_last_index", 0) != 0;
    if rank == 0 {
        return Ok(vec![Tensor::from_vec(&[], vec![0i64])?]);
    }
    let outer: usize = shape[..axis].iter().product();
    let n = shape[axis];
    let inner: usize = shape[axis + 1..].iter().product();
    if n == 0 && outer * inner > 0 {
        return Err(Error::Shape(format!("{} over an empty axis", ctx.op())));
    }
    let mut out_shape = shape.to_vec();
    if keepdims {
        out_shape[axis] = 1;
    } else {
        out_shape.remove(axis);
    }
    let v = if x.dtype() == DType::Bool {
        arg_typed(x.view::<bool>()?, outer, n, inner, max, last)
    } else {
        crate::with_numeric!(x.dtype(), T, { arg_typed(x.view::<T>()?, outer, n, inner, max, last) })
    };
    Ok(vec![Tensor::from_vec(&out_shape, v)?])
}

fn argmax(c: &OpCtx, i: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    arg_op(c, i, true)
}
fn argmin(c: &OpCtx, i: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    arg_op(c, i, false)
}

// ---------------------------------------------------------------------------------------------
// CumSum / CumProd
// ---------------------------------------------------------------------------------------------

fn scan_typed<T: RElem>(
    x: &[T],
    outer: usize,
    n: usize,
    inner: usize,
    prod: bool,
    exclusive: bool,
    reverse: bool,
) -> Vec<T> {
    let mut out = vec![T::default(); x.len()];
    if x.is_empty() {
        return out;
    }
    let init = if prod { T::A::ONE } else { T::A::ZERO };
    let body = |o: usize, dst: &mut [T]| {
        let src = &x[o * n * inner..(o + 1) * n * inner];
        let mut acc = vec![init; inner];
        for jj in 0..n {
            let j = if reverse { n - 1 - jj } else { jj };
            let row = &src[j * inner..(j + 1) * inner];
            let drow = &mut dst[j * inner..(j + 1) * inner];
            for i in 0..inner {
                let v = row[i].acc();
                if exclusive {
                    drow[i] = T::from_acc(acc[i]);
                }
                acc[i] = if prod { acc[i].mul(v) } else { acc[i].add(v) };
                if !exclusive {
                    drow[i] = T::from_acc(acc[i]);
                }
            }
        }
    };
    if x.len() >= 2 * PAR_GRAIN && outer > 1 && crate::cpu::par::threads() > 1 {
        out.par_chunks_mut(n * inner).enumerate().for_each(|(o, d)| body(o, d));
    } else {
        for (o, d) in out.chunks_mut(n * inner).enumerate() {
            body(o, d);
        }
    }
    out
}

fn scan_op(ctx: &OpCtx, inputs: &[Option<Tensor>], prod: bool) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    let axis_t = ctx.input(inputs, 1)?;
    let axis = *axis_t
        .to_i64_vec()?
        .first()
        .ok_or_else(|| Error::Shape(format!("{}: axis input is empty", ctx.op())))?;
    let shape = x.shape();
    let axis = norm_axis(axis, shape.len())?;
    let exclusive = ctx.attr_i("exclusive", 0) != 0;
    let reverse = ctx.attr_i("reverse", 0) != 0;
    if shape.is_empty() {
        return Ok(vec![x.clone()]);
    }
    let outer: usize = shape[..axis].iter().product();
    let n = shape[axis];
    let inner: usize = shape[axis + 1..].iter().product();
    crate::with_numeric!(x.dtype(), T, {
        let v = scan_typed(x.view::<T>()?, outer, n, inner, prod, exclusive, reverse);
        Ok(vec![Tensor::from_vec(shape, v)?])
    })
}

fn cumsum(c: &OpCtx, i: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    scan_op(c, i, false)
}
fn cumprod(c: &OpCtx, i: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    scan_op(c, i, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_runtime::manifest::{Attr, Step};

    fn step(op: &str, opset: i64, ints: &[(&str, i64)]) -> Step {
        // "axes" is an ints attribute; the tests only ever pass one axis.
        let attrs = ints
            .iter()
            .map(|(n, v)| match *n {
                "axes" => Attr { name: n.to_string(), ints: vec![*v], ..Default::default() },
                _ => Attr { name: n.to_string(), i: *v, ..Default::default() },
            })
            .collect();
        Step { op: op.into(), opset, attrs, ..Default::default() }
    }

    fn run(op: &str, opset: i64, ints: &[(&str, i64)], inputs: Vec<Option<Tensor>>) -> Tensor {
        let s = step(op, opset, ints);
        let k = match crate::cpu::registry().get("", op) {
            Some(crate::cpu::Kernel::Tensor(k)) => k,
            _ => panic!("no kernel"),
        };
        k(&OpCtx::new(&s, None), &inputs).unwrap().remove(0)
    }

    fn t32(shape: &[usize], v: &[f32]) -> Option<Tensor> {
        Some(Tensor::from_vec(shape, v.to_vec()).unwrap())
    }

    #[test]
    fn sum_middle_axis_and_keepdims() {
        let x = t32(&[2, 2, 2], &[1., 2., 3., 4., 5., 6., 7., 8.]);
        let axes = Some(Tensor::from_vec(&[1], vec![1i64]).unwrap());
        let y = run("ReduceSum", 13, &[("keepdims", 1)], vec![x.clone(), axes.clone()]);
        assert_eq!(y.shape(), &[2, 1, 2]);
        assert_eq!(y.view::<f32>().unwrap(), &[4., 6., 12., 14.]);
        let y = run("ReduceMean", 18, &[("keepdims", 0)], vec![x, axes]);
        assert_eq!(y.shape(), &[2, 2]);
        assert_eq!(y.view::<f32>().unwrap(), &[2., 3., 6., 7.]);
    }

    #[test]
    fn last_axis_and_all_axes() {
        let x = t32(&[2, 3], &[1., -2., 3., 4., 5., -6.]);
        let y = run("ReduceL1", 18, &[], vec![x.clone(), Some(Tensor::from_vec(&[1], vec![-1i64]).unwrap())]);
        assert_eq!(y.view::<f32>().unwrap(), &[6., 15.]);
        let y = run("ReduceMax", 13, &[("keepdims", 0)], vec![x.clone()]);
        assert_eq!(y.shape(), &[] as &[usize]);
        assert_eq!(y.view::<f32>().unwrap(), &[5.]);
        let y = run("ReduceSumSquare", 18, &[("noop_with_empty_axes", 1)], vec![x]);
        assert_eq!(y.view::<f32>().unwrap(), &[1., 4., 9., 16., 25., 36.]);
    }

    #[test]
    fn log_sum_exp_is_stable() {
        let x = t32(&[2], &[1000., 1000.]);
        let y = run("ReduceLogSumExp", 13, &[], vec![x]);
        assert!((y.view::<f32>().unwrap()[0] - (1000. + 2f32.ln())).abs() < 1e-3);
    }

    #[test]
    fn empty_set_identities() {
        let x = Some(Tensor::zeros(DType::F32, &[2, 0]));
        let ax = Some(Tensor::from_vec(&[1], vec![1i64]).unwrap());
        let y = run("ReduceMin", 18, &[], vec![x.clone(), ax.clone()]);
        assert_eq!(y.view::<f32>().unwrap(), &[f32::INFINITY; 2]);
        let y = run("ReduceProd", 18, &[], vec![x, ax]);
        assert_eq!(y.view::<f32>().unwrap(), &[1.; 2]);
    }

    #[test]
    fn int_reductions() {
        let x = Some(Tensor::from_vec(&[2, 2], vec![3i32, -7, 2, 5]).unwrap());
        let y = run("ReduceProd", 13, &[("keepdims", 0)], vec![x.clone()]);
        assert_eq!(y.view::<i32>().unwrap(), &[-210]);
        let y = run("ReduceMin", 13, &[("axes", 0)], vec![x]);
        assert_eq!(y.view::<i32>().unwrap(), &[2, -7]);
    }

    #[test]
    fn argmax_ties_and_last_index() {
        let x = t32(&[2, 3], &[1., 3., 3., 2., 2., 0.]);
        let y = run("ArgMax", 13, &[("axis", 1)], vec![x.clone()]);
        assert_eq!(y.shape(), &[2, 1]);
        assert_eq!(y.view::<i64>().unwrap(), &[1, 0]);
        let y = run("ArgMax", 13, &[("axis", 1), ("select_last_index", 1), ("keepdims", 0)], vec![x.clone()]);
        assert_eq!(y.view::<i64>().unwrap(), &[2, 1]);
        let y = run("ArgMin", 13, &[("axis", 0)], vec![x]);
        assert_eq!(y.view::<i64>().unwrap(), &[0, 1, 1]);
    }

    #[test]
    fn cumsum_exclusive_reverse() {
        let x = t32(&[4], &[1., 2., 3., 4.]);
        let ax = Some(Tensor::scalar(0i64));
        let y = run("CumSum", 14, &[("exclusive", 1), ("reverse", 1)], vec![x.clone(), ax.clone()]);
        assert_eq!(y.view::<f32>().unwrap(), &[9., 7., 4., 0.]);
        let y = run("CumProd", 26, &[], vec![x, ax]);
        assert_eq!(y.view::<f32>().unwrap(), &[1., 2., 6., 24.]);
    }
}
