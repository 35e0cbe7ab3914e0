//! Normalisations: BatchNormalization, InstanceNormalization, LayerNormalization,
//! GroupNormalization, RMSNormalization, LpNormalization, LRN, MeanVarianceNormalization.
//!
//! Statistics are computed in f32 for f32/f16/bf16 inputs and in f64 for f64 (the stash type of
//! the opset-17+ ops is honoured by that choice: f32 is the default and the only one models use
//! with non-f64 inputs). Means and variances use two passes for accuracy.

use kiln_runtime::{DType, Error, Result, Tensor};
use rayon::prelude::*;

use super::elementwise::{borrowed, OwnedKernel};
use super::unary::{take_input, with_isa};
use crate::cpu::ctx::OpCtx;
use crate::cpu::registry::Registry;
use crate::cpu::util::{norm_axis, real_tensor, real_vec, strides, Real};
use crate::with_real;

pub fn register(r: &mut Registry) {
    r.add("BatchNormalization", batch_norm);
    r.add("InstanceNormalization", instance_norm);
    r.add("LayerNormalization", borrowed!(layer_norm));
    r.add("GroupNormalization", group_norm);
    r.add("RMSNormalization", rms_norm);
    r.add("LpNormalization", lp_norm);
    r.add("LRN", lrn);
    r.add("MeanVarianceNormalization", mvn);
}

/// The owned-input kernels of this file.
pub(crate) fn owned(op: &str) -> Option<OwnedKernel> {
    (op == "LayerNormalization").then_some(layer_norm as OwnedKernel)
}

/// Elements per parallel task.
const GRAIN: usize = 1 << 14;

/// Rows of `row` elements per parallel task.
fn rows_per_task(row: usize) -> usize {
    (GRAIN / row.max(1)).max(1)
}

/// Mean and population variance of a slice (two passes).
fn mean_var<R: Real>(v: &[R]) -> (R, R) {
    let n = R::from_usize(v.len().max(1));
    let mean = v.iter().copied().sum::<R>() / n;
    let var = v.iter().map(|&x| (x - mean) * (x - mean)).sum::<R>() / n;
    (mean, var)
}

/// (N, C, spatial size) of an N x C x D1... tensor.
fn ncs(shape: &[usize]) -> Result<(usize, usize, usize)> {
    if shape.len() < 2 {
        return Err(Error::Shape(format!("expected an N x C x ... tensor, got shape {shape:?}")));
    }
    Ok((shape[0], shape[1], shape[2..].iter().product()))
}

/// A per-channel (or per channel-and-position) parameter in the compute type.
fn param<R: Real>(t: &Tensor, want: &[usize], what: &str) -> Result<Vec<R>> {
    let v = real_vec::<R>(t)?.into_owned();
    if !want.contains(&v.len()) {
        return Err(Error::Shape(format!("{what} has {} elements, expected one of {want:?}", v.len())));
    }
    Ok(v)
}

// ---------------------------------------------------------------------------------------------
// BatchNormalization
// ---------------------------------------------------------------------------------------------

fn batch_norm(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    let training = if ctx.opset() >= 14 {
        ctx.attr_i("training_mode", 0) != 0
    } else {
        // Before 14, asking for the statistics outputs is what selects training mode.
        (1..ctx.num_outputs()).any(|i| ctx.output_wanted(i))
    };
    with_real!(x.dtype(), R, { batch_norm_t::<R>(ctx, inputs, training) })
}

fn batch_norm_t<R: Real>(ctx: &OpCtx, inputs: &[Option<Tensor>], training: bool) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    let (n, c, s) = ncs(x.shape())?;
    let xv = real_vec::<R>(x)?;
    let eps = R::from_f64(ctx.attr_f("epsilon", 1e-5) as f64);
    let momentum = R::from_f64(ctx.attr_f("momentum", 0.9) as f64);
    // spatial = 0 (before opset 9) gives parameters per channel and position.
    let sizes = [c, c * s];
    let scale = param::<R>(ctx.input(inputs, 1)?, &sizes, "scale")?;
    let bias = param::<R>(ctx.input(inputs, 2)?, &sizes, "B")?;
    let mean_t = ctx.input(inputs, 3)?;
    let var_t = ctx.input(inputs, 4)?;
    let mut mean = param::<R>(mean_t, &sizes, "input_mean")?;
    let mut var = param::<R>(var_t, &sizes, "input_var")?;
    let mut extra = Vec::new();
    if training {
        if mean.len() != c {
            return Err(ctx.unsupported("training mode with per-position statistics (spatial = 0)"));
        }
        let (bm, bv) = batch_stats(&xv, n, c, s);
        let run_mean: Vec<R> = mean.iter().zip(&bm).map(|(&m, &b)| m * momentum + b * (R::ONE - momentum)).collect();
        let run_var: Vec<R> = var.iter().zip(&bv).map(|(&v, &b)| v * momentum + b * (R::ONE - momentum)).collect();
        extra.push(real_tensor(mean_t.dtype(), &[c], run_mean)?);
        extra.push(real_tensor(var_t.dtype(), &[c], run_var)?);
        if ctx.opset() < 14 {
            extra.push(real_tensor(mean_t.dtype(), &[c], bm.clone())?);
            extra.push(real_tensor(var_t.dtype(), &[c], bv.clone())?);
        }
        mean = bm;
        var = bv;
    }
    // y = x * a + b with a = scale / sqrt(var + eps), b = bias - mean * a.
    let a: Vec<R> = scale.iter().zip(&var).map(|(&g, &v)| g / (v + eps).sqrt()).collect();
    let b: Vec<R> = bias.iter().zip(&mean).zip(&a).map(|((&bb, &m), &aa)| bb - m * aa).collect();
    let per_pos = a.len() != c;
    let mut y = xv.into_owned();
    if s > 0 {
        crate::cpu::par::chunks_mut(&mut y, s, |i, plane| {
            let ch = i % c;
            if per_pos {
                let (a, b) = (&a[ch * s..(ch + 1) * s], &b[ch * s..(ch + 1) * s]);
                plane.iter_mut().zip(a.iter().zip(b)).for_each(|(v, (&a, &b))| *v = *v * a + b);
            } else {
                let (a, b) = (a[ch], b[ch]);
                plane.iter_mut().for_each(|v| *v = *v * a + b);
            }
        });
    }
    let mut out = vec![real_tensor(x.dtype(), x.shape(), y)?];
    out.extend(extra);
    Ok(out)
}

/// Per-channel mean and population variance over N and the spatial dims.
fn batch_stats<R: Real>(x: &[R], n: usize, c: usize, s: usize) -> (Vec<R>, Vec<R>) {
    let cnt = R::from_usize((n * s).max(1));
    crate::cpu::par::map_range(c, |ch| {
            let planes = || (0..n).map(move |b| &x[(b * c + ch) * s..(b * c + ch + 1) * s]);
            let mean = planes().map(|p| p.iter().copied().sum::<R>()).sum::<R>() / cnt;
            let var = planes().map(|p| p.iter().map(|&v| (v - mean) * (v - mean)).sum::<R>()).sum::<R>() / cnt;
            (mean, var)
        })
        .into_iter()
        .unzip()
}

// ---------------------------------------------------------------------------------------------
// InstanceNormalization, GroupNormalization
// ---------------------------------------------------------------------------------------------

fn instance_norm(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    let c = ncs(x.shape())?.1;
    let out = with_real!(x.dtype(), R, {
        let scale = param::<R>(ctx.input(inputs, 1)?, &[c], "scale")?;
        let bias = param::<R>(ctx.input(inputs, 2)?, &[c], "B")?;
        let eps = R::from_f64(ctx.attr_f("epsilon", 1e-5) as f64);
        grouped_norm(x, c, eps, &scale, &bias)?
    });
    Ok(vec![out])
}

fn group_norm(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    let c = ncs(x.shape())?.1;
    let g = ctx.attr_i("num_groups", 0);
    if g <= 0 || c % g as usize != 0 {
        return Err(Error::Shape(format!("num_groups {g} does not divide {c} channels")));
    }
    let g = g as usize;
    let out = with_real!(x.dtype(), R, {
        // Opset 18 has one scale/bias per group, opset 21 one per channel.
        let mut scale = param::<R>(ctx.input(inputs, 1)?, &[c, g], "scale")?;
        let mut bias = param::<R>(ctx.input(inputs, 2)?, &[c, g], "bias")?;
        let per_group = |v: Vec<R>| -> Vec<R> {
            if v.len() == c { v } else { (0..c).map(|ch| v[ch / (c / g)]).collect() }
        };
        scale = per_group(scale);
        bias = per_group(bias);
        let eps = R::from_f64(ctx.attr_f("epsilon", 1e-5) as f64);
        grouped_norm(x, g, eps, &scale, &bias)?
    });
    Ok(vec![out])
}

/// Normalise each (n, group) block of an N x C x ... tensor, then apply per-channel scale/bias.
fn grouped_norm<R: Real>(x: &Tensor, groups: usize, eps: R, scale: &[R], bias: &[R]) -> Result<Tensor> {
    let (_, c, s) = ncs(x.shape())?;
    let cpg = c / groups;
    let block = cpg * s;
    let mut y = real_vec::<R>(x)?.into_owned();
    if block > 0 {
        crate::cpu::par::chunks_mut(&mut y, block, |i, blk| {
            let (mean, var) = mean_var(blk);
            let inv = R::ONE / (var + eps).sqrt();
            let g = i % groups;
            for (j, plane) in blk.chunks_mut(s.max(1)).enumerate() {
                let ch = g * cpg + j;
                let a = scale[ch] * inv;
                let b = bias[ch] - mean * a;
                plane.iter_mut().for_each(|v| *v = *v * a + b);
            }
        });
    }
    real_tensor(x.dtype(), x.shape(), y)
}

// ---------------------------------------------------------------------------------------------
// LayerNormalization, RMSNormalization
// ---------------------------------------------------------------------------------------------

/// A parameter broadcast against X, indexed per normalised row: either one vector shared by all
/// rows or (`full`) an X-sized array.
struct RowParam<R> {
    v: Vec<R>,
    full: bool,
}

impl<R: Real> RowParam<R> {
    fn new(t: &Tensor, x_shape: &[usize], axis: usize) -> Result<RowParam<R>> {
        let v = real_vec::<R>(t)?;
        let ps = t.shape();
        let rank = x_shape.len();
        if ps.len() > rank {
            return Err(Error::Shape(format!("parameter of shape {ps:?} does not broadcast to {x_shape:?}")));
        }
        let off = rank - ps.len();
        for (i, &d) in ps.iter().enumerate() {
            if d != 1 && d != x_shape[off + i] {
                return Err(Error::Shape(format!("parameter of shape {ps:?} does not broadcast to {x_shape:?}")));
            }
        }
        let inner = &x_shape[axis..];
        // Dims before `axis` all 1: one vector over the normalised shape.
        let full = ps.iter().enumerate().any(|(i, &d)| off + i < axis && d != 1);
        let target: Vec<usize> = if full { x_shape.to_vec() } else { inner.to_vec() };
        let tgt_off = if full { 0 } else { axis };
        let pst = strides(ps);
        let tst = strides(&target);
        let total: usize = target.iter().product();
        if ps.iter().product::<usize>() == total {
            // Same element count: already laid out as the target.
            return Ok(RowParam { v: v.into_owned(), full });
        }
        let mut out = Vec::with_capacity(total);
        for idx in 0..total {
            let mut src = 0;
            for (i, &d) in ps.iter().enumerate() {
                if d != 1 {
                    let td = off + i - tgt_off;
                    src += (idx / tst[td] % target[td]) * pst[i];
                }
            }
            out.push(v[src]);
        }
        Ok(RowParam { v: out, full })
    }

    fn row(&self, r: usize, inner: usize) -> &[R] {
        if self.full { &self.v[r * inner..(r + 1) * inner] } else { &self.v }
    }
}

fn layer_norm(ctx: &OpCtx, mut inputs: Vec<Option<Tensor>>) -> Result<Vec<Tensor>> {
    if let Some(out) = layer_norm_f32(ctx, &mut inputs)? {
        return Ok(out);
    }
    let inputs = &inputs[..];
    let x = ctx.input(inputs, 0)?;
    let rank = x.rank();
    let axis = norm_axis(ctx.attr_i("axis", -1), rank)?;
    let outer: usize = x.shape()[..axis].iter().product();
    let inner: usize = x.shape()[axis..].iter().product();
    let stat_shape: Vec<usize> = x.shape().iter().enumerate().map(|(i, &d)| if i < axis { d } else { 1 }).collect();
    let stash = match ctx.attr_i("stash_type", 1) {
        11 => DType::F64,
        _ if x.dtype() == DType::F64 => DType::F64,
        _ => DType::F32,
    };
    with_real!(x.dtype(), R, {
        let scale = RowParam::<R>::new(ctx.input(inputs, 1)?, x.shape(), axis)?;
        let bias = ctx.opt_input(inputs, 2).map(|b| RowParam::<R>::new(b, x.shape(), axis)).transpose()?;
        let eps = R::from_f64(ctx.attr_f("epsilon", 1e-5) as f64);
        let mut y = real_vec::<R>(x)?.into_owned();
        let mut mean = vec![R::ZERO; outer];
        let mut inv = vec![R::ZERO; outer];
        if inner > 0 {
            let rpt = rows_per_task(inner);
            let task = |(t, (chunk, (ms, is))): (usize, (&mut [R], (&mut [R], &mut [R])))| {
                    for (j, row) in chunk.chunks_mut(inner).enumerate() {
                        let r = t * rpt + j;
                        let (m, v) = mean_var(row);
                        let iv = R::ONE / (v + eps).sqrt();
                        ms[j] = m;
                        is[j] = iv;
                        let sc = scale.row(r, inner);
                        match &bias {
                            Some(b) => {
                                let bb = b.row(r, inner);
                                for ((x, &s), &b) in row.iter_mut().zip(sc).zip(bb) {
                                    *x = (*x - m) * iv * s + b;
                                }
                            }
                            None => row.iter_mut().zip(sc).for_each(|(x, &s)| *x = (*x - m) * iv * s),
                        }
                    }
                };
            if crate::cpu::par::threads() > 1 {
                y.par_chunks_mut(inner * rpt).zip(mean.par_chunks_mut(rpt).zip(inv.par_chunks_mut(rpt))).enumerate().for_each(task);
            } else {
                y.chunks_mut(inner * rpt).zip(mean.chunks_mut(rpt).zip(inv.chunks_mut(rpt))).enumerate().for_each(task);
            }
        }
        let mut out = vec![real_tensor(x.dtype(), x.shape(), y)?];
        if ctx.num_outputs() > 1 {
            out.push(real_tensor(stash, &stat_shape, mean)?);
            out.push(real_tensor(stash, &stat_shape, inv)?);
        }
        Ok(out)
    })
}

/// The f32 LayerNormalization of rows with one scale (and bias) vector shared by all rows, the
/// form transformer models use; None (inputs untouched) for every other case. Writes into X's
/// buffer when X is handed over unshared.
fn layer_norm_f32(ctx: &OpCtx, inputs: &mut [Option<Tensor>]) -> Result<Option<Vec<Tensor>>> {
    let x = ctx.input(inputs, 0)?;
    let rank = x.rank();
    let axis = norm_axis(ctx.attr_i("axis", -1), rank)?;
    let inner: usize = x.shape()[axis..].iter().product();
    let shared = |t: Option<&Tensor>| {
        t.is_none_or(|t| t.dtype() == DType::F32 && t.len() == inner && t.rank() <= rank - axis)
    };
    let stash_f64 = ctx.attr_i("stash_type", 1) == 11;
    if x.dtype() != DType::F32
        || inner == 0
        || stash_f64
        || !shared(Some(ctx.input(inputs, 1)?))
        || !shared(ctx.opt_input(inputs, 2))
    {
        return Ok(None);
    }
    // The parameter's dims must equal X's trailing dims exactly, so its data is one row in order.
    let fits = |t: &Tensor| {
        let off = rank - t.rank();
        t.shape().iter().enumerate().all(|(i, &d)| d == x.shape()[off + i])
    };
    if !fits(ctx.input(inputs, 1)?) || !ctx.opt_input(inputs, 2).is_none_or(fits) {
        return Ok(None);
    }
    let eps = ctx.attr_f("epsilon", 1e-5);
    let outer = x.len() / inner;
    let stat_shape: Vec<usize> = x.shape().iter().enumerate().map(|(i, &d)| if i < axis { d } else { 1 }).collect();
    let mut x = take_input(inputs, 0)?;
    let scale = ctx.input(inputs, 1)?.view::<f32>()?;
    let bias = ctx.opt_input(inputs, 2).map(|b| b.view::<f32>()).transpose()?;
    let mut mean = vec![0f32; outer];
    let mut inv = vec![0f32; outer];
    let rows = |y: &mut [f32], mean: &mut [f32], inv: &mut [f32]| {
        let rpt = rows_per_task(inner);
        let work = |(chunk, (ms, is)): (&mut [f32], (&mut [f32], &mut [f32]))| {
            with_isa(#[inline(always)] || {
                for ((row, m), i) in chunk.chunks_mut(inner).zip(ms).zip(is) {
                    (*m, *i) = ln_row_f32(row, scale, bias, eps);
                }
            })
        };
        if y.len() >= 2 * GRAIN && crate::cpu::par::threads() > 1 {
            y.par_chunks_mut(inner * rpt)
                .zip(mean.par_chunks_mut(rpt).zip(inv.par_chunks_mut(rpt)))
                .for_each(work);
        } else {
            work((y, (mean, inv)));
        }
    };
    let y = if x.is_unique() {
        rows(x.view_mut::<f32>()?, &mut mean, &mut inv);
        x
    } else {
        let src = x.view::<f32>()?;
        Tensor::filled_by::<f32>(DType::F32, x.shape(), |y| {
            y.copy_from_slice(src);
            rows(y, &mut mean, &mut inv);
            Ok(())
        })?
    };
    let mut out = vec![y];
    if ctx.num_outputs() > 1 {
        out.push(Tensor::from_vec(&stat_shape, mean)?);
        out.push(Tensor::from_vec(&stat_shape, inv)?);
    }
    Ok(Some(out))
}

/// Partial sums kept per lane so the reductions vectorise (16 = one 512-bit vector).
const LANES: usize = 16;

/// Σ f(v) with lane-parallel partial sums.
#[inline(always)]
fn lane_sum(v: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = v.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().map(|&x| f(x)).sum();
    for c in chunks {
        for k in 0..LANES {
            acc[k] += f(c[k]);
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Normalise one row in place (two-pass mean and variance); returns (mean, 1/σ).
#[inline(always)]
fn ln_row_f32(row: &mut [f32], scale: &[f32], bias: Option<&[f32]>, eps: f32) -> (f32, f32) {
    let n = row.len() as f32;
    let m = lane_sum(row, |x| x) / n;
    let var = lane_sum(row, |x| (x - m) * (x - m)) / n;
    let iv = 1.0 / (var + eps).sqrt();
    match bias {
        Some(b) => {
            for ((x, &s), &b) in row.iter_mut().zip(scale).zip(b) {
                *x = (*x - m) * iv * s + b;
            }
        }
        None => row.iter_mut().zip(scale).for_each(|(x, &s)| *x = (*x - m) * iv * s),
    }
    (m, iv)
}

fn rms_norm(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    let axis = norm_axis(ctx.attr_i("axis", -1), x.rank())?;
    let inner: usize = x.shape()[axis..].iter().product();
    let out = with_real!(x.dtype(), R, {
        let scale = RowParam::<R>::new(ctx.input(inputs, 1)?, x.shape(), axis)?;
        let eps = R::from_f64(ctx.attr_f("epsilon", 1e-5) as f64);
        let mut y = real_vec::<R>(x)?.into_owned();
        if inner > 0 {
            let rpt = rows_per_task(inner);
            crate::cpu::par::chunks_mut(&mut y, inner * rpt, |t, chunk| {
                for (j, row) in chunk.chunks_mut(inner).enumerate() {
                    let ms = row.iter().map(|&v| v * v).sum::<R>() / R::from_usize(inner);
                    let iv = R::ONE / (ms + eps).sqrt();
                    let sc = scale.row(t * rpt + j, inner);
                    row.iter_mut().zip(sc).for_each(|(x, &s)| *x = *x * iv * s);
                }
            });
        }
        real_tensor(x.dtype(), x.shape(), y)?
    });
    Ok(vec![out])
}

// ---------------------------------------------------------------------------------------------
// LpNormalization, LRN, MeanVarianceNormalization
// ---------------------------------------------------------------------------------------------

fn lp_norm(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    let axis = norm_axis(ctx.attr_i("axis", -1), x.rank())?;
    let p = ctx.attr_i("p", 2);
    if p != 1 && p != 2 {
        return Err(ctx.unsupported(format!("p = {p} (only 1 and 2 are defined)")));
    }
    let shape = x.shape();
    let (dim, inner) = (shape[axis], shape[axis + 1..].iter().product::<usize>());
    let out = with_real!(x.dtype(), R, {
        let mut y = real_vec::<R>(x)?.into_owned();
        if dim * inner > 0 {
            crate::cpu::par::chunks_mut(&mut y, dim * inner, |_, b| {
                for j in 0..inner {
                    let norm = if p == 1 {
                        (0..dim).map(|d| b[d * inner + j].abs()).sum::<R>()
                    } else {
                        (0..dim).map(|d| b[d * inner + j] * b[d * inner + j]).sum::<R>().sqrt()
                    };
                    for d in 0..dim {
                        let v = &mut b[d * inner + j];
                        *v = if norm == R::ZERO { R::ZERO } else { *v / norm };
                    }
                }
            });
        }
        real_tensor(x.dtype(), x.shape(), y)?
    });
    Ok(vec![out])
}

fn lrn(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    let (_, c, s) = ncs(x.shape())?;
    let size = ctx.attr_i("size", 0);
    if size <= 0 {
        return Err(Error::Other("LRN needs a positive size".into()));
    }
    let size = size as usize;
    let (lo, hi) = ((size - 1) / 2, size / 2);
    let out = with_real!(x.dtype(), R, {
        let alpha = R::from_f64(ctx.attr_f("alpha", 1e-4) as f64 / size as f64);
        let beta = R::from_f64(ctx.attr_f("beta", 0.75) as f64);
        let bias = R::from_f64(ctx.attr_f("bias", 1.0) as f64);
        let xv = real_vec::<R>(x)?;
        let mut y = vec![R::ZERO; xv.len()];
        if c * s > 0 {
            crate::cpu::par::chunks_mut(&mut y, c * s, |bi, yb| {
                let xb = &xv[bi * c * s..(bi + 1) * c * s];
                for ch in 0..c {
                    let (c0, c1) = (ch.saturating_sub(lo), (ch + hi).min(c - 1));
                    for i in 0..s {
                        let sq: R = (c0..=c1).map(|k| xb[k * s + i] * xb[k * s + i]).sum();
                        yb[ch * s + i] = xb[ch * s + i] / (bias + alpha * sq).powf(beta);
                    }
                }
            });
        }
        real_tensor(x.dtype(), x.shape(), y)?
    });
    Ok(vec![out])
}

fn mvn(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    let rank = x.rank();
    let axes = ctx.attr_ints("axes").unwrap_or_else(|| vec![0, 2, 3]);
    let mut reduced = vec![false; rank];
    for a in axes {
        reduced[norm_axis(a, rank)?] = true;
    }
    // Each element's statistics group: its index over the kept axes.
    let shape = x.shape();
    let kept: Vec<usize> = shape.iter().zip(&reduced).map(|(&d, &r)| if r { 1 } else { d }).collect();
    let kst = strides(&kept);
    let xst = strides(shape);
    let n = x.len();
    let group = |i: usize| -> usize {
        (0..rank).filter(|&d| !reduced[d]).map(|d| (i / xst[d] % shape[d]) * kst[d]).sum()
    };
    let ngroups: usize = kept.iter().product();
    let out = with_real!(x.dtype(), R, {
        let xv = real_vec::<R>(x)?;
        let gid: Vec<usize> = (0..n).map(group).collect();
        let mut sum = vec![R::ZERO; ngroups];
        let mut sq = vec![R::ZERO; ngroups];
        let mut cnt = vec![0usize; ngroups];
        for (i, &g) in gid.iter().enumerate() {
            sum[g] += xv[i];
            sq[g] += xv[i] * xv[i];
            cnt[g] += 1;
        }
        let eps = R::from_f64(1e-9);
        let stats: Vec<(R, R)> = (0..ngroups)
            .map(|g| {
                let c = R::from_usize(cnt[g].max(1));
                let m = sum[g] / c;
                let var = sq[g] / c - m * m;
                let var = if var < R::ZERO { R::ZERO } else { var };
                (m, var.sqrt() + eps)
            })
            .collect();
        let y: Vec<R> = xv.iter().zip(&gid).map(|(&v, &g)| (v - stats[g].0) / stats[g].1).collect();
        real_tensor(x.dtype(), x.shape(), y)?
    });
    Ok(vec![out])
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_runtime::manifest::{Attr, AttrKind, Step};

    fn run(op: &str, opset: i64, attrs: Vec<Attr>, inputs: Vec<Option<Tensor>>, nout: usize) -> Vec<Tensor> {
        let step = Step { op: op.into(), opset, outputs: (0..nout as i32).collect(), attrs, ..Default::default() };
        crate::cpu::eval_step(&step, &inputs).unwrap()
    }

    fn t(v: &[f32], shape: &[usize]) -> Option<Tensor> {
        Some(Tensor::from_vec(shape, v.to_vec()).unwrap())
    }

    fn close(a: &[f32], b: &[f32]) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-4, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn batchnorm_inference() {
        let y = run(
            "BatchNormalization",
            15,
            vec![],
            vec![t(&[1., 2., 3., 4.], &[1, 2, 2]), t(&[1., 2.], &[2]), t(&[0., 1.], &[2]), t(&[1., 3.], &[2]), t(&[4., 1.], &[2])],
            1,
        );
        let e = 1e-5f32;
        close(y[0].view::<f32>().unwrap(), &[0., 1. / (4. + e).sqrt(), 1. + 2. * 0. / (1. + e).sqrt(), 1. + 2. / (1. + e).sqrt()]);
    }

    #[test]
    fn layernorm_with_stats() {
        let y = run("LayerNormalization", 17, vec![], vec![t(&[1., 3., 2., 2.], &[2, 2]), t(&[1., 1.], &[2]), None], 3);
        let inv = 1. / (1f32 + 1e-5).sqrt();
        close(y[0].view::<f32>().unwrap(), &[-inv, inv, 0., 0.]);
        close(y[1].view::<f32>().unwrap(), &[2., 2.]);
        assert_eq!(y[2].shape(), &[2, 1]);
    }

    #[test]
    fn group_norm_per_group_scale() {
        let ng = Attr { name: "num_groups".into(), kind: AttrKind::Int as i32, i: 2, ..Default::default() };
        let y = run("GroupNormalization", 18, vec![ng], vec![t(&[1., 3., 5., 5.], &[1, 2, 2]), t(&[2., 1.], &[2]), t(&[0., 7.], &[2])], 1);
        let inv = 1. / (1f32 + 1e-5).sqrt();
        close(y[0].view::<f32>().unwrap(), &[-2. * inv, 2. * inv, 7., 7.]);
    }

    #[test]
    fn lrn_and_lp() {
        let sz = Attr { name: "size".into(), kind: AttrKind::Int as i32, i: 3, ..Default::default() };
        let y = run("LRN", 13, vec![sz], vec![t(&[1., 2.], &[1, 2, 1, 1])], 1);
        let d = |v: f32| (1. + 1e-4 / 3. * v).powf(0.75);
        close(y[0].view::<f32>().unwrap(), &[1. / d(5.), 2. / d(5.)]);
        let y = run("LpNormalization", 13, vec![], vec![t(&[3., 4., 0., 0.], &[2, 2])], 1);
        close(y[0].view::<f32>().unwrap(), &[0.6, 0.8, 0., 0.]);
    }

    /// LayerNormalization over the last `inner` elements in f64.
    fn ln_ref(x: &[f32], inner: usize, scale: &[f32], bias: Option<&[f32]>, eps: f64) -> Vec<f64> {
        x.chunks(inner)
            .flat_map(|r| {
                let n = inner as f64;
                let m = r.iter().map(|&v| v as f64).sum::<f64>() / n;
                let var = r.iter().map(|&v| (v as f64 - m).powi(2)).sum::<f64>() / n;
                let iv = 1.0 / (var + eps).sqrt();
                r.iter()
                    .enumerate()
                    .map(|(i, &v)| (v as f64 - m) * iv * scale[i] as f64 + bias.map_or(0.0, |b| b[i] as f64))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    #[test]
    fn layernorm_f32_rows_match_reference() {
        use crate::cpu::kernels::elementwise::testing::rand_f32;
        // (x shape, axis, scale shape, with bias): fast path cases and ones that fall back.
        let cases: &[(&[usize], i64, &[usize], bool)] = &[
            (&[2, 3, 8], -1, &[8], true),
            (&[2, 3, 8], -1, &[8], false),
            (&[4, 37], 1, &[37], true),
            (&[2, 3, 8], 1, &[3, 8], true),
            (&[2, 3, 8], 1, &[8], true),
            (&[2, 3, 8], -1, &[1, 8], true),
            (&[64, 384], -1, &[384], true),
            (&[0, 8], -1, &[8], true),
        ];
        for (ci, &(shape, axis, ss, with_bias)) in cases.iter().enumerate() {
            let n: usize = shape.iter().product();
            let ax = if axis < 0 { shape.len() as i64 + axis } else { axis } as usize;
            let inner: usize = shape[ax..].iter().product();
            let x: Vec<f32> = rand_f32(n, ci as u64, 4.0).iter().enumerate().map(|(i, v)| v + (i % 3) as f32).collect();
            let sn: usize = ss.iter().product();
            let scale = rand_f32(sn, 50 + ci as u64, 2.0);
            let bias = rand_f32(sn, 90 + ci as u64, 1.0);
            // Expand a per-row-vector parameter (the [8]-under-[3,8] case) to the whole row.
            let full = |p: &[f32]| -> Vec<f32> { (0..inner).map(|i| p[i % p.len()]).collect() };
            let want = ln_ref(&x, inner, &full(&scale), with_bias.then(|| full(&bias)).as_deref(), 1e-5);
            for keep in [false, true] {
                let xt = Tensor::from_vec(shape, x.clone()).unwrap();
                let held = keep.then(|| xt.clone());
                let attrs = vec![Attr { name: "axis".into(), kind: AttrKind::Int as i32, i: axis, ..Default::default() }];
                let ins = vec![Some(xt), t(&scale, ss), if with_bias { t(&bias, ss) } else { None }];
                let step = Step { op: "LayerNormalization".into(), opset: 17, outputs: vec![0, 1, 2], attrs, ..Default::default() };
                let k = crate::cpu::kernels::elementwise::owned_kernel("", "LayerNormalization").unwrap();
                let y = k(&OpCtx::new(&step, None), ins).unwrap();
                assert_eq!(y[0].shape(), shape);
                for (g, w) in y[0].view::<f32>().unwrap().iter().zip(&want) {
                    assert!((*g as f64 - w).abs() < 1e-5 + 1e-5 * w.abs(), "case {ci}: {g} vs {w}");
                }
                assert_eq!(y[1].len(), n / inner.max(1));
                if let Some(h) = held {
                    assert_eq!(h.view::<f32>().unwrap(), &x[..]);
                }
            }
        }
    }
}
