//! Softmax, LogSoftmax and Hardmax.
//!
//! Before opset 13 these coerce the input to 2-D at `axis` (default 1) and normalise whole rows;
//! from 13 on they normalise along the single `axis` (default -1). Both views are an
//! (outer, dim, inner) split of the shape, so one kernel serves every opset. Max-subtraction keeps
//! exp from overflowing.

use kiln_runtime::{Error, Result, Tensor};
use rayon::prelude::*;

use crate::cpu::ctx::OpCtx;
use crate::cpu::registry::Registry;
use crate::cpu::util::{norm_axis, real_tensor, real_vec, Real};
use crate::with_real;

pub fn register(r: &mut Registry) {
    r.add("Softmax", softmax);
    r.add("LogSoftmax", log_softmax);
    r.add("Hardmax", hardmax);
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Soft,
    LogSoft,
    Hard,
}

/// Elements per parallel task.
const GRAIN: usize = 1 << 14;

fn softmax(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    run(ctx, inputs, Kind::Soft)
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
    y.par_chunks_mut(block * per_task).for_each(|chunk| {
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
}
