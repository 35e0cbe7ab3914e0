//! Softmax, LogSoftmax and Hardmax.
//!
//! Before opset 13 these coerce the input to 2-D at `axis` (default 1) and normalise whole rows;
//! from 13 on they normalise along the single `axis` (default -1). Both views are an
//! (outer, dim, inner) split of the shape, so one kernel serves every opset. Max-subtraction keeps
//! exp from overflowing.
//!
//! f32 Softmax has its own vectorised paths, over contiguous rows (the attention case) and over a
//! middle axis: one pass for the max, one for exp and its sum, one to scale, with the shared
//! polynomial exp (no libm), run in the input's buffer when the interpreter hands over a dead input.

use kiln_runtime::{DType, Error, Result, Tensor};
use rayon::prelude::*;

use super::elementwise::{borrowed, OwnedKernel};
use super::unary::{take_input, with_isa};
use crate::cpu::ctx::OpCtx;
use crate::cpu::gemm;
use crate::cpu::registry::Registry;
use crate::cpu::util::{norm_axis, real_tensor, real_vec, Real};
use crate::with_real;

pub fn register(r: &mut Registry) {
    r.add("Softmax", borrowed!(softmax));
    r.add("LogSoftmax", log_softmax);
    r.add("Hardmax", hardmax);
}

/// The owned-input kernels of this file.
pub(crate) fn owned(op: &str) -> Option<OwnedKernel> {
    (op == "Softmax").then_some(softmax as OwnedKernel)
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Soft,
    LogSoft,
    Hard,
}

/// Elements per parallel task.
const GRAIN: usize = 1 << 14;

fn softmax(ctx: &OpCtx, mut inputs: Vec<Option<Tensor>>) -> Result<Vec<Tensor>> {
    let x = ctx.input(&inputs, 0)?;
    let (outer, dim, inner) = split(ctx, x.shape())?;
    if x.dtype() != DType::F32 || dim == 0 || inner == 0 {
        return run(ctx, &inputs, Kind::Soft);
    }
    let mut x = take_input(&mut inputs, 0)?;
    let rows = |y: &mut [f32]| if inner == 1 { rows_f32(y, dim) } else { columns_f32(y, dim, inner) };
    if x.is_unique() {
        rows(x.view_mut::<f32>()?);
        return Ok(vec![x]);
    }
    let src = x.view::<f32>()?;
    let y = Tensor::filled_by::<f32>(DType::F32, x.shape(), |y| {
        y.copy_from_slice(src);
        rows(y);
        Ok(())
    })?;
    debug_assert_eq!(y.len(), outer * dim);
    Ok(vec![y])
}

/// Softmax of every `dim`-long row of `y`, in place, rows split across the pool when many.
fn rows_f32(y: &mut [f32], dim: usize) {
    let per_task = (GRAIN / dim).max(1);
    let work = |chunk: &mut [f32]| with_isa(#[inline(always)] || chunk.chunks_mut(dim).for_each(softmax_row_f32));
    if y.len() >= 2 * GRAIN && crate::cpu::par::threads() > 1 {
        y.par_chunks_mut(dim * per_task).for_each(work);
    } else {
        work(y);
    }
}

/// Softmax along the middle axis of [outer, dim, inner] blocks, in place (YOLOv8's DFL head:
/// [1, 16, 4, 2100] over axis 1), whole inner rows at a time with the shared polynomial exp;
/// blocks split across the pool when many.
fn columns_f32(y: &mut [f32], dim: usize, inner: usize) {
    let block = dim * inner;
    let per_task = (GRAIN / block).max(1);
    let work = |chunk: &mut [f32]| {
        with_isa(
            #[inline(always)]
            || {
                let mut acc = vec![0f32; 2 * inner];
                for b in chunk.chunks_mut(block) {
                    softmax_columns_f32(b, inner, &mut acc);
                }
            },
        )
    };
    if y.len() >= 2 * GRAIN && crate::cpu::par::threads() > 1 {
        y.par_chunks_mut(block * per_task).for_each(work);
    } else {
        work(y);
    }
}

/// One [dim, inner] block normalised along dim: max (a NaN makes its column NaN, as in the
/// generic path), exp(x − max) with its sum, scale by 1/sum. `acc` holds 2·inner floats.
#[inline(always)]
fn softmax_columns_f32(b: &mut [f32], inner: usize, acc: &mut [f32]) {
    let (mx, sum) = acc.split_at_mut(inner);
    mx.copy_from_slice(&b[..inner]);
    sum.fill(0.0);
    for r in b.chunks_exact(inner).skip(1) {
        for (m, &x) in mx.iter_mut().zip(r) {
            // NaN wins: x > m is false for a NaN x, and x ≠ x marks it.
            *m = if x > *m || x != x { x } else { *m };
        }
    }
    for r in b.chunks_exact_mut(inner) {
        for ((x, &m), s) in r.iter_mut().zip(mx.iter()).zip(sum.iter_mut()) {
            let e = gemm::exp(*x - m);
            *x = e;
            *s += e;
        }
    }
    for s in sum.iter_mut() {
        *s = 1.0 / *s;
    }
    for r in b.chunks_exact_mut(inner) {
        for (x, &i) in r.iter_mut().zip(sum.iter()) {
            *x *= i;
        }
    }
}

/// Lanes of the partial maxima and sums (wide enough for 512-bit vectors, and two of them).
const LANES: usize = 16;

/// One row: max (NaN wins, as in the generic path), exp(x − max) and its sum, scale by 1/sum.
/// Masked entries (−10000, −inf) just give exp ≈ 0: the shared exp clamps, no slow path.
#[inline(always)]
fn softmax_row_f32(v: &mut [f32]) {
    let (head, tail) = v.split_at_mut(v.len() - v.len() % LANES);
    let mut m = [f32::NEG_INFINITY; LANES];
    let mut nan = false;
    for c in head.chunks_exact(LANES) {
        for k in 0..LANES {
            m[k] = if c[k] > m[k] { c[k] } else { m[k] };
            nan |= c[k].is_nan();
        }
    }
    let mut mx = m.iter().fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
    for &x in tail.iter() {
        mx = if x > mx { x } else { mx };
        nan |= x.is_nan();
    }
    if nan {
        v.fill(f32::NAN);
        return;
    }
    let (head, tail) = v.split_at_mut(v.len() - v.len() % LANES);
    let mut s = [0f32; LANES];
    for c in head.chunks_exact_mut(LANES) {
        for k in 0..LANES {
            let e = gemm::exp(c[k] - mx);
            c[k] = e;
            s[k] += e;
        }
    }
    let mut sum: f32 = s.iter().sum();
    for x in tail.iter_mut() {
        *x = gemm::exp(*x - mx);
        sum += *x;
    }
    let inv = 1.0 / sum;
    v.iter_mut().for_each(|x| *x *= inv);
}

fn log_softmax(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    run(ctx, inputs, Kind::LogSoft)
}

fn hardmax(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    run(ctx, inputs, Kind::Hard)
}

/// The (outer, dim, inner) split of `shape` for the op's opset and axis.
fn split(ctx: &OpCtx, shape: &[usize]) -> Result<(usize, usize, usize)> {
    let rank = shape.len();
    if ctx.opset() < 13 {
        // The 2-D coercion also accepts axis == rank (every row is a single element).
        let a = ctx.attr_i("axis", 1);
        let a = if a < 0 { a + rank as i64 } else { a };
        if a < 0 || a > rank as i64 {
            return Err(Error::Shape(format!("axis {a} is out of range for rank {rank}")));
        }
        let axis = a as usize;
        let outer = shape[..axis].iter().product();
        let dim = shape[axis..].iter().product();
        Ok((outer, dim, 1))
    } else {
        if rank == 0 {
            return Ok((1, 1, 1));
        }
        let axis = norm_axis(ctx.attr_i("axis", -1), rank)?;
        Ok((shape[..axis].iter().product(), shape[axis], shape[axis + 1..].iter().product()))
    }
}

fn run(ctx: &OpCtx, inputs: &[Option<Tensor>], kind: Kind) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    let (outer, dim, inner) = split(ctx, x.shape())?;
    let out = with_real!(x.dtype(), R, {
        let xv = real_vec::<R>(x)?;
        let mut y = xv.to_vec();
        normalize::<R>(&mut y, outer, dim, inner, kind);
        real_tensor(x.dtype(), x.shape(), y)?
    });
    Ok(vec![out])
}

/// Normalise `y` in place, block by block (one block = one outer index).
fn normalize<R: Real>(y: &mut [R], outer: usize, dim: usize, inner: usize, kind: Kind) {
    let block = dim * inner;
    if block == 0 || outer == 0 {
        return;
    }
    let per_task = (GRAIN / block).max(1);
    crate::cpu::par::chunks_mut(y, block * per_task, |_, chunk| {
        for b in chunk.chunks_mut(block) {
            if inner == 1 {
                row(b, kind);
            } else {
                strided(b, dim, inner, kind);
            }
        }
    });
}

/// One contiguous row.
fn row<R: Real>(v: &mut [R], kind: Kind) {
    let mut mx = v[0];
    let mut arg = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > mx || (x.is_nan() && !mx.is_nan()) {
            mx = x;
            arg = i;
        }
    }
    match kind {
        Kind::Hard => {
            v.fill(R::ZERO);
            v[arg] = R::ONE;
        }
        Kind::Soft => {
            let mut sum = R::ZERO;
            for x in v.iter_mut() {
                *x = (*x - mx).exp();
                sum += *x;
            }
            let inv = R::ONE / sum;
            v.iter_mut().for_each(|x| *x *= inv);
        }
        Kind::LogSoft => {
            let sum: R = v.iter().map(|&x| (x - mx).exp()).sum();
            let lse = mx + sum.ln();
            v.iter_mut().for_each(|x| *x = *x - lse);
        }
    }
}

/// A [dim, inner] block normalised along dim, working on whole inner rows at a time.
fn strided<R: Real>(b: &mut [R], dim: usize, inner: usize, kind: Kind) {
    let mut mx: Vec<R> = b[..inner].to_vec();
    let mut arg = vec![0usize; inner];
    for d in 1..dim {
        for (j, &x) in b[d * inner..(d + 1) * inner].iter().enumerate() {
            if x > mx[j] || (x.is_nan() && !mx[j].is_nan()) {
                mx[j] = x;
                arg[j] = d;
            }
        }
    }
    match kind {
        Kind::Hard => {
            b.fill(R::ZERO);
            for (j, &a) in arg.iter().enumerate() {
                b[a * inner + j] = R::ONE;
            }
        }
        Kind::Soft => {
            let mut sum = vec![R::ZERO; inner];
            for r in b.chunks_mut(inner) {
                for ((x, &m), s) in r.iter_mut().zip(&mx).zip(sum.iter_mut()) {
                    *x = (*x - m).exp();
                    *s += *x;
                }
            }
            let inv: Vec<R> = sum.iter().map(|&s| R::ONE / s).collect();
            for r in b.chunks_mut(inner) {
                r.iter_mut().zip(&inv).for_each(|(x, &i)| *x *= i);
            }
        }
        Kind::LogSoft => {
            let mut sum = vec![R::ZERO; inner];
            for r in b.chunks(inner) {
                for ((&x, &m), s) in r.iter().zip(&mx).zip(sum.iter_mut()) {
                    *s += (x - m).exp();
                }
            }
            let lse: Vec<R> = sum.iter().zip(&mx).map(|(&s, &m)| m + s.ln()).collect();
            for r in b.chunks_mut(inner) {
                r.iter_mut().zip(&lse).for_each(|(x, &l)| *x = *x - l);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_runtime::manifest::{Attr, AttrKind, Step};

    fn run_op(op: &str, opset: i64, axis: Option<i64>, x: Tensor) -> Vec<f32> {
        let attrs = axis
            .map(|a| vec![Attr { name: "axis".into(), kind: AttrKind::Int as i32, i: a, ..Default::default() }])
            .unwrap_or_default();
        let step = Step { op: op.into(), opset, outputs: vec![0], attrs, ..Default::default() };
        crate::cpu::eval_step(&step, &[Some(x)]).unwrap()[0].view::<f32>().unwrap().to_vec()
    }

    #[test]
    fn softmax_axis_semantics() {
        let x = Tensor::from_vec(&[2, 2], vec![0f32, 0., 1000., 1000.]).unwrap();
        assert_eq!(run_op("Softmax", 13, None, x.clone()), vec![0.5, 0.5, 0.5, 0.5]);
        // axis 0 (opset 13): columns normalised.
        let y = run_op("Softmax", 13, Some(0), x.clone());
        assert!((y[0] - 0.0).abs() < 1e-6 && (y[2] - 1.0).abs() < 1e-6);
        // opset 11, axis 0: the whole tensor is one row.
        let y = run_op("Softmax", 11, Some(0), x);
        assert!((y[2] - 0.5).abs() < 1e-6 && y[0].abs() < 1e-6);
    }

    #[test]
    fn log_and_hard() {
        let x = Tensor::from_vec(&[3], vec![1f32, 3., 3.]).unwrap();
        assert_eq!(run_op("Hardmax", 13, None, x.clone()), vec![0., 1., 0.]);
        let y = run_op("LogSoftmax", 13, None, x);
        let lse = (1f32.exp() + 2. * 3f32.exp()).ln();
        assert!((y[0] - (1. - lse)).abs() < 1e-6);
    }

    fn softmax_ref(row: &[f32]) -> Vec<f64> {
        let m = row.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b as f64));
        let e: Vec<f64> = row.iter().map(|&x| (x as f64 - m).exp()).collect();
        let s: f64 = e.iter().sum();
        e.iter().map(|v| v / s).collect()
    }

    #[test]
    fn f32_rows_match_reference() {
        use crate::cpu::kernels::elementwise::testing::{rand_f32, run_owned};
        for (ci, &(rows, dim)) in [(3usize, 1usize), (2, 7), (5, 16), (4, 17), (48, 128), (3, 1000), (70, 512), (0, 5)].iter().enumerate() {
            let mut x = rand_f32(rows * dim, ci as u64, 8.0);
            // Attention masks: a big negative bias or -inf on some entries (never a whole row).
            for (i, v) in x.iter_mut().enumerate() {
                if i % 5 == 3 && dim > 1 {
                    *v = if i % 2 == 0 { -10000.0 } else { f32::NEG_INFINITY };
                }
            }
            for keep in [false, true] {
                let t = Tensor::from_vec(&[rows, dim], x.clone()).unwrap();
                let held = keep.then(|| t.clone());
                let y = run_owned("Softmax", 13, vec![], vec![Some(t)]).unwrap().remove(0);
                let y = y.view::<f32>().unwrap();
                for r in 0..rows {
                    let want = softmax_ref(&x[r * dim..(r + 1) * dim]);
                    for (g, w) in y[r * dim..(r + 1) * dim].iter().zip(&want) {
                        assert!((*g as f64 - w).abs() <= 1e-7 + 2e-6 * w.abs(), "rows {rows} dim {dim}: {g} vs {w}");
                    }
                }
                if let Some(h) = held {
                    assert_eq!(h.view::<f32>().unwrap(), &x[..]);
                }
            }
        }
    }

    #[test]
    fn f32_rows_nan_and_all_masked() {
        let nan = f32::NAN;
        let x = Tensor::from_vec(&[3, 17], [vec![1f32; 16], vec![nan], vec![f32::NEG_INFINITY; 17], vec![0f32; 17]].concat()).unwrap();
        let y = run_op("Softmax", 13, None, x);
        assert!(y[..34].iter().all(|v| v.is_nan()), "NaN or all -inf rows give NaN like the reference");
        assert!(y[34..].iter().all(|&v| (v - 1.0 / 17.0).abs() < 1e-7));
        // Along a middle axis: large values, a NaN column, an all -inf column.
        let x = Tensor::from_vec(&[2, 3], vec![0f32, nan, f32::NEG_INFINITY, 1000., 1., f32::NEG_INFINITY]).unwrap();
        let y = run_op("Softmax", 13, Some(0), x);
        assert!((y[3] - 1.0).abs() < 1e-6 && y[0].abs() < 1e-6);
        assert!(y[1].is_nan() && y[4].is_nan() && y[2].is_nan() && y[5].is_nan());
    }

    #[test]
    fn f32_middle_axis_matches_reference() {
        // YOLOv8's DFL shape and odd sizes; the f32 path against a per-column f64 reference.
        for (shape, axis) in [(vec![1usize, 16, 4, 2100], 1i64), (vec![3, 5, 7], 1), (vec![2, 9, 3, 1], 1), (vec![4, 33], 0)] {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n).map(|i| ((i * 7919) % 113) as f32 * 0.173 - 9.0).collect();
            let y = run_op("Softmax", 13, Some(axis), Tensor::from_vec(&shape, v.clone()).unwrap());
            let a = axis as usize;
            let (dim, inner) = (shape[a], shape[a + 1..].iter().product::<usize>());
            for (o, blk) in v.chunks(dim * inner).enumerate() {
                for j in 0..inner {
                    let col: Vec<f32> = (0..dim).map(|d| blk[d * inner + j]).collect();
                    for (d, want) in softmax_ref(&col).into_iter().enumerate() {
                        let got = y[o * dim * inner + d * inner + j] as f64;
                        assert!((got - want).abs() <= 1e-6 * (1.0 + want.abs()), "{shape:?}: {got} vs {want}");
                    }
                }
            }
        }
    }
}
