//! Pooling: MaxPool (with Indices), AveragePool, LpPool, GlobalAveragePool, GlobalMaxPool,
//! GlobalLpPool, MaxUnpool, MaxRoiPool.
//!
//! Windows are described per spatial dim by a tap table (the valid input indices of each output
//! index), so padding, dilation and ceil mode are settled once and the inner loops never test
//! bounds. Up to three spatial dims are handled by padding the geometry to 3-D with unit dims.

use kiln_runtime::{DType, Error, Result, Tensor};
use rayon::prelude::*;

use crate::cpu::ctx::OpCtx;
use crate::cpu::gemm::pack::AlignedBuf;
use crate::cpu::isa::{self, Isa};
use crate::cpu::registry::Registry;
use crate::cpu::util::{real_tensor, real_vec, Real};
use crate::with_real;

pub fn register(r: &mut Registry) {
    r.add("MaxPool", max_pool);
    r.add("AveragePool", average_pool);
    r.add("LpPool", lp_pool);
    r.add("GlobalAveragePool", global_average_pool);
    r.add("GlobalMaxPool", global_max_pool);
    r.add("GlobalLpPool", global_lp_pool);
    r.add("MaxUnpool", max_unpool);
    r.add("MaxRoiPool", max_roi_pool);
}

// ---------------------------------------------------------------------------------------------
// Geometry
// ---------------------------------------------------------------------------------------------

/// Padding and output size of one spatial dim.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct DimGeom {
    pub input: usize,
    pub output: usize,
    pub kernel: usize,
    pub stride: usize,
    pub dilation: usize,
    pub pad_begin: usize,
    pub pad_end: usize,
}

/// The attributes shared by pooling (and convolution) ops, resolved against the input's spatial
/// shape. `ceil` applies to explicit padding only.
pub(crate) fn spatial_geometry(
    ctx: &OpCtx,
    input: &[usize],
    kernel: &[usize],
    ceil: bool,
) -> Result<Vec<DimGeom>> {
    let nd = input.len();
    if kernel.len() != nd {
        return Err(Error::Shape(format!("kernel_shape {kernel:?} does not match {nd} spatial dims")));
    }
    let ints = |name: &str, default: i64, len: usize| -> Result<Vec<usize>> {
        let v = ctx.attr_ints(name).unwrap_or_else(|| vec![default; len]);
        if v.len() != len || v.iter().any(|&x| x < 0) {
            return Err(Error::Shape(format!("attribute {name} = {v:?} is invalid for {nd} spatial dims")));
        }
        Ok(v.into_iter().map(|x| x as usize).collect())
    };
    let strides = ints("strides", 1, nd)?;
    let dilations = ints("dilations", 1, nd)?;
    let pads = ints("pads", 0, 2 * nd)?;
    if strides.iter().chain(&dilations).chain(kernel).any(|&x| x == 0) {
        return Err(Error::Shape("kernel, strides and dilations must be positive".into()));
    }
    let auto_pad = ctx.attr_s("auto_pad", "NOTSET");
    let mut dims = Vec::with_capacity(nd);
    for i in 0..nd {
        let (inp, k, s, d) = (input[i], kernel[i], strides[i], dilations[i]);
        let ek = (k - 1) * d + 1;
        let (output, pb, pe) = match auto_pad.as_str() {
            "SAME_UPPER" | "SAME_LOWER" => {
                let out = inp.div_ceil(s);
                let total = ((out.max(1) - 1) * s + ek).saturating_sub(inp);
                let small = total / 2;
                if auto_pad == "SAME_UPPER" { (out, small, total - small) } else { (out, total - small, small) }
            }
            "VALID" => ((inp.saturating_sub(ek)) / s + usize::from(inp >= ek), 0, 0),
            "NOTSET" | "" => {
                let (pb, pe) = (pads[i], pads[i + nd]);
                let padded = inp + pb + pe;
                if padded < ek {
                    (0, pb, pe)
                } else {
                    let span = padded - ek;
                    let mut out = if ceil { span.div_ceil(s) + 1 } else { span / s + 1 };
                    // The last window must start inside the input or the left padding.
                    if ceil && (out - 1) * s >= inp + pb {
                        out -= 1;
                    }
                    (out, pb, pe)
                }
            }
            other => return Err(Error::Other(format!("unknown auto_pad '{other}'"))),
        };
        dims.push(DimGeom { input: inp, output, kernel: k, stride: s, dilation: d, pad_begin: pb, pad_end: pe });
    }
    Ok(dims)
}

/// Per output index of one dim: the valid input indices of its window and the number of window
/// positions inside the explicitly padded extent (the divisor of count_include_pad).
struct Taps {
    taps: Vec<Vec<usize>>,
    padded_count: Vec<usize>,
}

fn taps(g: &DimGeom) -> Taps {
    let mut taps = Vec::with_capacity(g.output);
    let mut padded_count = Vec::with_capacity(g.output);
    for o in 0..g.output {
        let start = (o * g.stride) as isize - g.pad_begin as isize;
        let mut t = Vec::with_capacity(g.kernel);
        let mut cnt = 0;
        for j in 0..g.kernel {
            let p = start + (j * g.dilation) as isize;
            if p < (g.input + g.pad_end) as isize {
                cnt += 1;
            }
            if p >= 0 && (p as usize) < g.input {
                t.push(p as usize);
            }
        }
        taps.push(t);
        padded_count.push(cnt);
    }
    Taps { taps, padded_count }
}

/// A pooling problem padded to three spatial dims.
struct Pool3 {
    planes: usize,
    input: [usize; 3],
    output: [usize; 3],
    taps: [Taps; 3],
}

impl Pool3 {
    fn new(planes: usize, dims: &[DimGeom]) -> Result<Pool3> {
        if dims.len() > 3 {
            return Err(Error::Other(format!("pooling over {} spatial dims is not supported", dims.len())));
        }
        let unit = DimGeom { input: 1, output: 1, kernel: 1, stride: 1, dilation: 1, pad_begin: 0, pad_end: 0 };
        let mut g = [unit; 3];
        for (i, d) in dims.iter().enumerate() {
            g[3 - dims.len() + i] = *d;
        }
        Ok(Pool3 {
            planes,
            input: [g[0].input, g[1].input, g[2].input],
            output: [g[0].output, g[1].output, g[2].output],
            taps: [taps(&g[0]), taps(&g[1]), taps(&g[2])],
        })
    }

    fn in_plane(&self) -> usize {
        self.input.iter().product()
    }

    fn out_plane(&self) -> usize {
        self.output.iter().product()
    }

    /// Call `f(out_index_in_plane, window_offsets_iter, padded_count)` for every output of a plane.
    fn for_each_window(&self, mut f: impl FnMut(usize, &mut dyn Iterator<Item = usize>, usize)) {
        let [_, h, w] = self.input;
        let mut idx = 0;
        for od in 0..self.output[0] {
            for oh in 0..self.output[1] {
                for ow in 0..self.output[2] {
                    let (td, th, tw) = (&self.taps[0].taps[od], &self.taps[1].taps[oh], &self.taps[2].taps[ow]);
                    let cnt = self.taps[0].padded_count[od] * self.taps[1].padded_count[oh] * self.taps[2].padded_count[ow];
                    let mut it = td.iter().flat_map(|&d| {
                        th.iter().flat_map(move |&y| tw.iter().map(move |&x| (d * h + y) * w + x))
                    });
                    f(idx, &mut it, cnt);
                    idx += 1;
                }
            }
        }
    }
}

fn kernel_shape(ctx: &OpCtx, x: &Tensor) -> Result<Vec<usize>> {
    let k = ctx.attr_ints("kernel_shape").ok_or_else(|| Error::Other("kernel_shape is required".into()))?;
    if x.rank() < 3 || k.len() != x.rank() - 2 || k.iter().any(|&v| v <= 0) {
        return Err(Error::Shape(format!("kernel_shape {k:?} does not fit input shape {:?}", x.shape())));
    }
    Ok(k.into_iter().map(|v| v as usize).collect())
}

/// Geometry plus output shape of a (non-global) pooling op.
fn setup(ctx: &OpCtx, x: &Tensor, allow_ceil: bool) -> Result<(Pool3, Vec<usize>, Vec<DimGeom>)> {
    let k = kernel_shape(ctx, x)?;
    let ceil = allow_ceil && ctx.attr_i("ceil_mode", 0) != 0;
    let dims = spatial_geometry(ctx, &x.shape()[2..], &k, ceil)?;
    let planes = x.shape()[0] * x.shape()[1];
    let mut shape = x.shape()[..2].to_vec();
    shape.extend(dims.iter().map(|d| d.output));
    Ok((Pool3::new(planes, &dims)?, shape, dims))
}

// ---------------------------------------------------------------------------------------------
// MaxPool
// ---------------------------------------------------------------------------------------------

fn max_pool(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    let (p, shape, dims) = setup(ctx, x, ctx.opset() >= 10)?;
    let col_major = ctx.attr_i("storage_order", 0) != 0;
    let want_idx = ctx.output_wanted(1);
    if x.dtype() == DType::F32 && !want_idx && dims.len() <= 2 {
        return Ok(vec![pool_f32(&p, &dims, &shape, x.view::<f32>()?, PoolKind::Max)?]);
    }
    let (y, idx) = match x.dtype() {
        DType::I8 => {
            let (y, i) = max_planes(&p, x.view::<i8>()?, want_idx);
            (Tensor::from_vec(&shape, y)?, i)
        }
        DType::U8 => {
            let (y, i) = max_planes(&p, x.view::<u8>()?, want_idx);
            (Tensor::from_vec(&shape, y)?, i)
        }
        dt => with_real!(dt, R, {
            let (y, i) = max_planes(&p, &real_vec::<R>(x)?, want_idx);
            (real_tensor(dt, &shape, y)?, i)
        }),
    };
    let mut out = vec![y];
    if want_idx {
        let idx = idx.into_iter().map(|i| index_in_storage(&p, i, col_major)).collect();
        out.push(Tensor::from_vec(&shape, idx)?);
    }
    Ok(out)
}

/// Max over every window; with `want_idx` also the flat input index of each max (first wins).
fn max_planes<T: Copy + PartialOrd + Send + Sync + Default>(p: &Pool3, x: &[T], want_idx: bool) -> (Vec<T>, Vec<usize>) {
    let (ip, op) = (p.in_plane(), p.out_plane());
    let mut y = vec![T::default(); p.planes * op];
    let mut idx = vec![0usize; if want_idx { p.planes * op } else { 0 }];
    if op == 0 {
        return (y, idx);
    }
    let plane = |pi: usize, yp: &mut [T], ip_out: Option<&mut [usize]>| {
        let xp = &x[pi * ip..(pi + 1) * ip];
        let mut best_idx = vec![0usize; if ip_out.is_some() { op } else { 0 }];
        p.for_each_window(|o, win, _| {
            let mut best: Option<(T, usize)> = None;
            for off in win {
                let v = xp[off];
                if best.is_none_or(|(b, _)| v > b) {
                    best = Some((v, off));
                }
            }
            if let Some((b, off)) = best {
                yp[o] = b;
                if !best_idx.is_empty() {
                    best_idx[o] = pi * ip + off;
                }
            }
        });
        if let Some(io) = ip_out {
            io.copy_from_slice(&best_idx);
        }
    };
    if want_idx {
        crate::cpu::par::chunks_mut2(&mut y, op, &mut idx, op, |pi, yp, io| plane(pi, yp, Some(io)));
    } else {
        crate::cpu::par::chunks_mut(&mut y, op, |pi, yp| plane(pi, yp, None));
    }
    (y, idx)
}

/// A flat row-major input index as ONNX reports it: row-major, or with the spatial dims in
/// column-major order for storage_order = 1.
fn index_in_storage(p: &Pool3, flat: usize, col_major: bool) -> i64 {
    if !col_major {
        return flat as i64;
    }
    let ip = p.in_plane();
    let (plane, off) = (flat / ip, flat % ip);
    let [d, h, w] = p.input;
    let (z, y, x) = (off / (h * w), off / w % h, off % w);
    // Column-major over (D, H, W); the unit dims padding 1-D/2-D geometry contribute nothing.
    (plane * ip + z + y * d + x * d * h) as i64
}

// ---------------------------------------------------------------------------------------------
// AveragePool, LpPool
// ---------------------------------------------------------------------------------------------

fn average_pool(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    let (p, shape, dims) = setup(ctx, x, true)?;
    let include_pad = ctx.attr_i("count_include_pad", 0) != 0;
    if x.dtype() == DType::F32 && dims.len() <= 2 {
        return Ok(vec![pool_f32(&p, &dims, &shape, x.view::<f32>()?, PoolKind::Avg { include_pad })?]);
    }
    let y = with_real!(x.dtype(), R, {
        let xv = real_vec::<R>(x)?;
        let y = reduce_planes(&p, &xv, |win, cnt| {
            let (mut s, mut n) = (R::ZERO, 0usize);
            for v in win {
                s += v;
                n += 1;
            }
            let div = if include_pad { cnt } else { n };
            if div == 0 { R::ZERO } else { s / R::from_usize(div) }
        });
        real_tensor(x.dtype(), &shape, y)?
    });
    Ok(vec![y])
}

fn lp_pool(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    let (p, shape, _) = setup(ctx, x, ctx.opset() >= 18)?;
    let pw = ctx.attr_i("p", 2) as f64;
    let y = with_real!(x.dtype(), R, {
        let xv = real_vec::<R>(x)?;
        let y = reduce_planes(&p, &xv, |win, _| lp_of::<R>(win, pw));
        real_tensor(x.dtype(), &shape, y)?
    });
    Ok(vec![y])
}

fn lp_of<R: Real>(win: &mut dyn Iterator<Item = R>, p: f64) -> R {
    if p == 2.0 {
        win.map(|v| v * v).sum::<R>().sqrt()
    } else if p == 1.0 {
        win.map(|v| v.abs()).sum::<R>()
    } else {
        let e = R::from_f64(p);
        win.map(|v| v.abs().powf(e)).sum::<R>().powf(R::from_f64(1.0 / p))
    }
}

/// Apply `f(window values, padded count)` to every window of every plane.
fn reduce_planes<R: Real>(p: &Pool3, x: &[R], f: impl Fn(&mut dyn Iterator<Item = R>, usize) -> R + Sync) -> Vec<R> {
    let (ip, op) = (p.in_plane(), p.out_plane());
    let mut y = vec![R::ZERO; p.planes * op];
    if op == 0 {
        return y;
    }
    crate::cpu::par::chunks_mut(&mut y, op, |pi, yp| {
        let xp = &x[pi * ip..(pi + 1) * ip];
        p.for_each_window(|o, win, cnt| {
            let mut vals = win.map(|off| xp[off]);
            yp[o] = f(&mut vals, cnt);
        });
    });
    y
}

// ---------------------------------------------------------------------------------------------
// Global pools
// ---------------------------------------------------------------------------------------------

fn global_shape(x: &Tensor) -> Result<Vec<usize>> {
    if x.rank() < 2 {
        return Err(Error::Shape(format!("global pooling needs N x C x ..., got {:?}", x.shape())));
    }
    let mut s = x.shape()[..2].to_vec();
    s.extend(std::iter::repeat_n(1, x.rank() - 2));
    Ok(s)
}

fn global<R: Real>(x: &Tensor, f: impl Fn(&[R]) -> R + Sync) -> Result<Tensor> {
    let shape = global_shape(x)?;
    let planes = shape[0] * shape[1];
    let xv = real_vec::<R>(x)?;
    let s = xv.len().checked_div(planes).unwrap_or(0);
    let y: Vec<R> = crate::cpu::par::map_range(planes, |p| f(&xv[p * s..(p + 1) * s]));
    real_tensor(x.dtype(), &shape, y)
}

fn global_average_pool(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    if x.dtype() == DType::F32 {
        return Ok(vec![global_average_pool_f32(x)?]);
    }
    let y = with_real!(x.dtype(), R, {
        global::<R>(x, |v| v.iter().copied().sum::<R>() / R::from_usize(v.len().max(1)))?
    });
    Ok(vec![y])
}

fn global_max_pool(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    let y = with_real!(x.dtype(), R, {
        global::<R>(x, |v| v.iter().copied().fold(-R::INFINITY, |a, b| a.max_nan(b)))?
    });
    Ok(vec![y])
}

fn global_lp_pool(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    let p = ctx.attr_i("p", 2) as f64;
    let y = with_real!(x.dtype(), R, { global::<R>(x, |v| lp_of::<R>(&mut v.iter().copied(), p))? });
    Ok(vec![y])
}

// ---------------------------------------------------------------------------------------------
// f32 fast paths: MaxPool / AveragePool over 1-D and 2-D planes, GlobalAveragePool
// ---------------------------------------------------------------------------------------------

/// Elements below which a pooling op stays on the calling thread.
const PAR_MIN_ELEMS: usize = 1 << 16;

#[derive(Clone, Copy, PartialEq)]
enum PoolKind {
    Max,
    Avg { include_pad: bool },
}

/// The interior output columns of a dim: those whose every tap lies inside the input.
fn interior(g: &DimGeom) -> (usize, usize) {
    let span = (g.kernel - 1) * g.dilation;
    if g.input + g.pad_begin < span + 1 {
        return (0, 0);
    }
    let lo = g.pad_begin.div_ceil(g.stride);
    let hi = ((g.input - 1 + g.pad_begin - span) / g.stride + 1).min(g.output);
    (lo.min(hi), hi)
}

/// MaxPool (values only) or AveragePool on f32 with at most two spatial dims: per output row,
/// the columns whose windows lie inside the input combine whole tap rows at a time (vectorized),
/// the few border columns go through the tap tables. Same tap order and arithmetic as the
/// generic path, so results are identical.
fn pool_f32(p: &Pool3, dims: &[DimGeom], shape: &[usize], x: &[f32], kind: PoolKind) -> Result<Tensor> {
    let unit = DimGeom { input: 1, output: 1, kernel: 1, stride: 1, dilation: 1, pad_begin: 0, pad_end: 0 };
    let gw = dims.last().copied().unwrap_or(unit);
    let (ip, op) = (p.in_plane(), p.out_plane());
    if x.len() != p.planes * ip {
        return Err(Error::Shape("pooling: input size does not match its shape".into()));
    }
    let isa = isa::active();
    Tensor::filled_by::<f32>(DType::F32, shape, |y| {
        if op == 0 {
            return Ok(());
        }
        let plane = |(pi, yp): (usize, &mut [f32])| pool_plane(isa, p, &gw, &x[pi * ip..(pi + 1) * ip], yp, kind);
        if crate::cpu::par::threads() > 1 && y.len() >= PAR_MIN_ELEMS {
            y.par_chunks_mut(op).enumerate().for_each(plane);
        } else {
            y.chunks_mut(op).enumerate().for_each(plane);
        }
        Ok(())
    })
}

fn pool_plane(isa: Isa, p: &Pool3, gw: &DimGeom, x: &[f32], y: &mut [f32], kind: PoolKind) {
    match isa {
        // SAFETY: `isa` is the active ISA, which the CPU supports.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { pool_plane_avx512(p, gw, x, y, kind) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma => unsafe { pool_plane_avx2(p, gw, x, y, kind) },
        _ => pool_plane_rows(p, gw, x, y, kind),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq,avx512vl,avx2,fma")]
unsafe fn pool_plane_avx512(p: &Pool3, gw: &DimGeom, x: &[f32], y: &mut [f32], kind: PoolKind) {
    pool_plane_rows(p, gw, x, y, kind)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn pool_plane_avx2(p: &Pool3, gw: &DimGeom, x: &[f32], y: &mut [f32], kind: PoolKind) {
    pool_plane_rows(p, gw, x, y, kind)
}

#[inline(always)]
fn pool_plane_rows(p: &Pool3, gw: &DimGeom, x: &[f32], y: &mut [f32], kind: PoolKind) {
    if kind == PoolKind::Max && separable(p, gw) {
        super::conv::with_scratch(|buf, _| max_plane_separable(p, gw, x, y, buf));
        return;
    }
    let (iw, ow) = (p.input[2], p.output[2]);
    let (lo, hi) = interior(gw);
    let (th, tw) = (&p.taps[1], &p.taps[2]);
    for (oh, out) in y.chunks_exact_mut(ow).enumerate() {
        let rows = &th.taps[oh];
        for j in (0..lo).chain(hi..ow) {
            let cols = &tw.taps[j];
            let win = rows.iter().flat_map(|&r| cols.iter().map(move |&c| x[r * iw + c]));
            out[j] = match kind {
                PoolKind::Max => win.fold(None, |b: Option<f32>, v| if b.is_none_or(|b| v > b) { Some(v) } else { b }).unwrap_or(0.0),
                PoolKind::Avg { include_pad } => {
                    let (s, n) = win.fold((0f32, 0usize), |(s, n), v| (s + v, n + 1));
                    let div = if include_pad { th.padded_count[oh] * tw.padded_count[j] } else { n };
                    if div == 0 { 0.0 } else { s / div as f32 }
                }
            };
        }
        if lo >= hi {
            continue;
        }
        let seg = &mut out[lo..hi];
        let Some(&r0) = rows.first() else {
            seg.fill(0.0);
            continue;
        };
        // Tap (r, k) of output column j reads x[r·iw + j·s + k·d − pad].
        let (s, first) = (gw.stride, lo * gw.stride - gw.pad_begin);
        let tap = |r: usize, k: usize| &x[r * iw + first + k * gw.dilation..];
        seg.iter_mut().zip(tap(r0, 0).iter().step_by(s)).for_each(|(o, &v)| *o = v);
        for (ri, &r) in rows.iter().enumerate() {
            for k in usize::from(ri == 0)..gw.kernel {
                let src = tap(r, k);
                match kind {
                    PoolKind::Max => combine(seg, src, s, |o, v| if v > o { v } else { o }),
                    PoolKind::Avg { .. } => combine(seg, src, s, |o, v| o + v),
                }
            }
        }
        if let PoolKind::Avg { include_pad } = kind {
            let div = (if include_pad { th.padded_count[oh] } else { rows.len() } * gw.kernel) as f32;
            seg.iter_mut().for_each(|o| *o /= div);
        }
    }
}

/// Whether `max_plane_separable` computes this MaxPool: unit column stride and dilation, and every
/// window holds at least one input column (so the -inf column padding never shows).
fn separable(p: &Pool3, gw: &DimGeom) -> bool {
    let (iw, ow) = (p.input[2], p.output[2]);
    gw.stride == 1 && gw.dilation == 1 && gw.pad_begin < gw.kernel && ow > 0 && ow - 1 < iw + gw.pad_begin
}

/// MaxPool of one plane with unit column stride, in two passes: the max over each window's columns
/// for every input row (a row padded with -inf, so border windows need no tap tables), then per
/// output row the max of those over the window's rows. kh + kw comparisons per output instead of
/// kh·kw, all over whole rows (vectorized); YOLOv8's SPPF pools 5×5 over 10×10 planes, where the
/// windowed path spent most of its time in the border columns. Max is exact, so results equal
/// the windowed path's.
#[inline(always)]
fn max_plane_separable(p: &Pool3, gw: &DimGeom, x: &[f32], y: &mut [f32], buf: &mut AlignedBuf) {
    let (ih, iw, ow) = (p.input[1], p.input[2], p.output[2]);
    let (kw, pl) = (gw.kernel, gw.pad_begin);
    let wide = ow + kw - 1;
    let scratch = buf.get(ih * ow + wide);
    let (hmax, prow) = scratch.split_at_mut(ih * ow);
    // Columns pl..pl+n of the padded row hold the input row (clipped to the columns read); the
    // rest stay -inf.
    let n = iw.min(wide - pl);
    prow.fill(f32::NEG_INFINITY);
    let max = |o: f32, v: f32| if v > o { v } else { o };
    for (r, hr) in hmax.chunks_exact_mut(ow).enumerate() {
        prow[pl..pl + n].copy_from_slice(&x[r * iw..][..n]);
        hr.copy_from_slice(&prow[..ow]);
        for k in 1..kw {
            combine(hr, &prow[k..], 1, max);
        }
    }
    let rows = &p.taps[1].taps;
    for (oh, out) in y.chunks_exact_mut(ow).enumerate() {
        let Some((&r0, rest)) = rows[oh].split_first() else {
            out.fill(0.0);
            continue;
        };
        out.copy_from_slice(&hmax[r0 * ow..][..ow]);
        for &r in rest {
            combine(out, &hmax[r * ow..], 1, max);
        }
    }
}

/// `o = f(o, src[j·s])` over a row segment (contiguous reads for s = 1 so the loop vectorizes).
#[inline(always)]
fn combine(seg: &mut [f32], src: &[f32], s: usize, f: impl Fn(f32, f32) -> f32) {
    if s == 1 {
        seg.iter_mut().zip(src).for_each(|(o, &v)| *o = f(*o, v));
    } else {
        seg.iter_mut().zip(src.iter().step_by(s)).for_each(|(o, &v)| *o = f(*o, v));
    }
}

/// Sum of an f32 slice in 32 running lanes (vectorized; also more accurate than one running sum).
#[inline(always)]
fn sum_lanes(v: &[f32]) -> f32 {
    let mut acc = [0f32; 32];
    let chunks = v.chunks_exact(32);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += x;
        }
    }
    for (a, &x) in acc.iter_mut().zip(rest) {
        *a += x;
    }
    // Pairwise over the lanes.
    let mut n = 32;
    while n > 1 {
        n /= 2;
        for i in 0..n {
            acc[i] += acc[i + n];
        }
    }
    acc[0]
}

/// Means of consecutive `len`-element planes.
#[inline(always)]
fn plane_means(x: &[f32], len: usize, y: &mut [f32]) {
    for (o, plane) in y.iter_mut().zip(x.chunks_exact(len)) {
        *o = sum_lanes(plane) / len as f32;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq,avx512vl,avx2,fma")]
unsafe fn plane_means_avx512(x: &[f32], len: usize, y: &mut [f32]) {
    plane_means(x, len, y)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn plane_means_avx2(x: &[f32], len: usize, y: &mut [f32]) {
    plane_means(x, len, y)
}

fn plane_means_isa(isa: Isa, x: &[f32], len: usize, y: &mut [f32]) {
    match isa {
        // SAFETY: `isa` is the active ISA, which the CPU supports.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { plane_means_avx512(x, len, y) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma => unsafe { plane_means_avx2(x, len, y) },
        _ => plane_means(x, len, y),
    }
}

/// f32 GlobalAveragePool: one vectorized sum per plane, planes split across threads when large.
fn global_average_pool_f32(x: &Tensor) -> Result<Tensor> {
    let shape = global_shape(x)?;
    let planes = shape[0] * shape[1];
    let xv = x.view::<f32>()?;
    let len = xv.len().checked_div(planes).unwrap_or(0);
    let isa = isa::active();
    Tensor::filled_by::<f32>(DType::F32, &shape, |y| {
        if len == 0 {
            // Empty spatial dims: 0, as the generic path computes it.
            y.fill(0.0);
            return Ok(());
        }
        if crate::cpu::par::threads() > 1 && xv.len() >= 4 * PAR_MIN_ELEMS {
            let per = (PAR_MIN_ELEMS / len).max(1);
            y.par_chunks_mut(per).zip(xv.par_chunks(per * len)).for_each(|(yc, xc)| plane_means_isa(isa, xc, len, yc));
        } else {
            plane_means_isa(isa, xv, len, y);
        }
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------------
// MaxUnpool, MaxRoiPool
// ---------------------------------------------------------------------------------------------

fn max_unpool(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    let ind = ctx.input(inputs, 1)?.to_i64_vec()?;
    let k = kernel_shape(ctx, x)?;
    let nd = k.len();
    let strides = ctx.attr_ints("strides").unwrap_or_else(|| vec![1; nd]);
    let pads = ctx.attr_ints("pads").unwrap_or_else(|| vec![0; 2 * nd]);
    if strides.len() != nd || pads.len() != 2 * nd {
        return Err(Error::Shape("MaxUnpool: strides/pads do not match kernel_shape".into()));
    }
    let mut inferred = x.shape()[..2].to_vec();
    for i in 0..nd {
        let v = (x.shape()[i + 2] as i64 - 1) * strides[i] - pads[i] - pads[i + nd] + k[i] as i64;
        inferred.push(v.max(0) as usize);
    }
    // Indices address the inferred output; an explicit output_shape pads (or crops) it at the end
    // of each dim, as the reference implementation does.
    let shape: Vec<usize> = match ctx.opt_input(inputs, 2) {
        Some(s) => s.to_i64_vec()?.into_iter().map(|d| d.max(0) as usize).collect(),
        None => inferred.clone(),
    };
    if shape.len() != inferred.len() {
        return Err(Error::Shape(format!("MaxUnpool: output_shape {shape:?} has the wrong rank")));
    }
    if ind.len() != x.len() {
        return Err(Error::Shape("MaxUnpool: indices and X differ in size".into()));
    }
    let total: usize = inferred.iter().product();
    crate::with_numeric!(x.dtype(), T, {
        let xv = x.view::<T>()?;
        let mut y = vec![T::default(); total];
        for (&i, &v) in ind.iter().zip(xv) {
            let i = usize::try_from(i).ok().filter(|&i| i < total).ok_or_else(|| {
                Error::Shape(format!("MaxUnpool: index {i} outside an output of {total} elements"))
            })?;
            y[i] = v;
        }
        if shape != inferred {
            y = embed(&y, &inferred, &shape);
        }
        Ok(vec![Tensor::from_slice_as(x.dtype(), &shape, &y)?])
    })
}

/// Copy `v` (of shape `from`) into the leading corner of a zero tensor of shape `to`.
fn embed<T: Copy + Default>(v: &[T], from: &[usize], to: &[usize]) -> Vec<T> {
    let mut out = vec![T::default(); to.iter().product()];
    let fs = crate::cpu::util::strides(from);
    let ts = crate::cpu::util::strides(to);
    'outer: for (i, &x) in v.iter().enumerate() {
        let mut o = 0;
        for d in 0..from.len() {
            let c = i / fs[d] % from[d];
            if c >= to[d] {
                continue 'outer;
            }
            o += c * ts[d];
        }
        out[o] = x;
    }
    out
}

fn max_roi_pool(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    let rois_t = ctx.input(inputs, 1)?;
    if x.rank() != 4 || rois_t.rank() != 2 || rois_t.shape()[1] != 5 {
        return Err(Error::Shape("MaxRoiPool needs X of rank 4 and rois of shape [R, 5]".into()));
    }
    let ps = ctx.attr_ints("pooled_shape").ok_or_else(|| Error::Other("pooled_shape is required".into()))?;
    if ps.len() != 2 || ps.iter().any(|&v| v <= 0) {
        return Err(Error::Shape(format!("bad pooled_shape {ps:?}")));
    }
    let (ph, pw) = (ps[0] as usize, ps[1] as usize);
    let scale = ctx.attr_f("spatial_scale", 1.0) as f64;
    let (n, c, h, w) = (x.shape()[0], x.shape()[1], x.shape()[2], x.shape()[3]);
    let rois = rois_t.to_f64_vec()?;
    let nr = rois_t.shape()[0];
    let y = with_real!(x.dtype(), R, {
        let xv = real_vec::<R>(x)?;
        let mut y = vec![R::ZERO; nr * c * ph * pw];
        for r in 0..nr {
            let roi = &rois[r * 5..r * 5 + 5];
            let b = roi[0] as usize;
            if b >= n {
                return Err(Error::Shape(format!("MaxRoiPool: batch index {b} out of range")));
            }
            let q = |v: f64| (v * scale).round() as i64;
            let (x1, y1, x2, y2) = (q(roi[1]), q(roi[2]), q(roi[3]), q(roi[4]));
            let rh = (y2 - y1 + 1).max(1) as f64;
            let rw = (x2 - x1 + 1).max(1) as f64;
            let (bh, bw) = (rh / ph as f64, rw / pw as f64);
            for ch in 0..c {
                let plane = &xv[(b * c + ch) * h * w..(b * c + ch + 1) * h * w];
                for i in 0..ph {
                    let hs = ((i as f64 * bh).floor() as i64 + y1).clamp(0, h as i64) as usize;
                    let he = (((i + 1) as f64 * bh).ceil() as i64 + y1).clamp(0, h as i64) as usize;
                    for j in 0..pw {
                        let ws = ((j as f64 * bw).floor() as i64 + x1).clamp(0, w as i64) as usize;
                        let we = (((j + 1) as f64 * bw).ceil() as i64 + x1).clamp(0, w as i64) as usize;
                        let mut m: Option<R> = None;
                        for yy in hs..he {
                            for xx in ws..we {
                                let v = plane[yy * w + xx];
                                if m.is_none_or(|m| v > m) {
                                    m = Some(v);
                                }
                            }
                        }
                        y[((r * c + ch) * ph + i) * pw + j] = m.unwrap_or(R::ZERO);
                    }
                }
            }
        }
        real_tensor(x.dtype(), &[nr, c, ph, pw], y)?
    });
    Ok(vec![y])
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_runtime::manifest::{Attr, AttrKind, Step};

    fn ints(name: &str, v: &[i64]) -> Attr {
        Attr { name: name.into(), kind: AttrKind::Ints as i32, ints: v.to_vec(), ..Default::default() }
    }

    fn run(op: &str, attrs: Vec<Attr>, x: Tensor, nout: usize) -> Vec<Tensor> {
        let step = Step { op: op.into(), opset: 19, outputs: (0..nout as i32).collect(), attrs, ..Default::default() };
        crate::cpu::eval_step(&step, &[Some(x)]).unwrap()
    }

    #[test]
    fn maxpool_with_indices_and_padding() {
        let x = Tensor::from_vec(&[1, 1, 2, 2], vec![1f32, 4., 3., 2.]).unwrap();
        let y = run("MaxPool", vec![ints("kernel_shape", &[2, 2]), ints("pads", &[1, 1, 0, 0])], x, 2);
        assert_eq!(y[0].shape(), &[1, 1, 2, 2]);
        assert_eq!(y[0].view::<f32>().unwrap(), &[1., 4., 3., 4.]);
        assert_eq!(y[1].view::<i64>().unwrap(), &[0, 1, 2, 1]);
    }

    #[test]
    fn averagepool_count_include_pad() {
        let x = Tensor::from_vec(&[1, 1, 3], vec![3f32, 6., 9.]).unwrap();
        let attrs = vec![ints("kernel_shape", &[2]), ints("pads", &[1, 0])];
        assert_eq!(run("AveragePool", attrs.clone(), x.clone(), 1)[0].view::<f32>().unwrap(), &[3., 4.5, 7.5]);
        let mut with = attrs;
        with.push(Attr { name: "count_include_pad".into(), kind: AttrKind::Int as i32, i: 1, ..Default::default() });
        assert_eq!(run("AveragePool", with, x, 1)[0].view::<f32>().unwrap(), &[1.5, 4.5, 7.5]);
    }

    #[test]
    fn global_pools() {
        let x = Tensor::from_vec(&[1, 2, 2], vec![1f32, 3., -1., -5.]).unwrap();
        assert_eq!(run("GlobalAveragePool", vec![], x.clone(), 1)[0].view::<f32>().unwrap(), &[2., -3.]);
        assert_eq!(run("GlobalMaxPool", vec![], x, 1)[0].view::<f32>().unwrap(), &[3., -1.]);
    }

    #[test]
    fn global_lp_pool_p2() {
        let x = Tensor::from_vec(&[1, 2, 2], vec![1f32, 3., -1., -5.]).unwrap();
        let y = run("GlobalLpPool", vec![], x, 1);
        let v = y[0].view::<f32>().unwrap();
        assert!((v[0] - 10f32.sqrt()).abs() < 1e-6 && (v[1] - 26f32.sqrt()).abs() < 1e-6, "{v:?}");
    }

    #[test]
    fn max_roi_pool_two_by_two() {
        // A 4x4 ramp, one roi over the whole map, 2x2 bins: the max of each quadrant.
        let x = Tensor::from_vec(&[1, 1, 4, 4], (0..16).map(|v| v as f32).collect()).unwrap();
        let rois = Tensor::from_vec(&[1, 5], vec![0f32, 0., 0., 3., 3.]).unwrap();
        let step = Step { op: "MaxRoiPool".into(), opset: 19, outputs: vec![0], attrs: vec![ints("pooled_shape", &[2, 2])], ..Default::default() };
        let y = crate::cpu::eval_step(&step, &[Some(x), Some(rois)]).unwrap();
        assert_eq!(y[0].shape(), &[1, 1, 2, 2]);
        assert_eq!(y[0].view::<f32>().unwrap(), &[5., 7., 13., 15.]);
    }

    // ---- f32 fast paths against the generic path ----

    use proptest::prelude::*;

    fn attr_i(name: &str, v: i64) -> Attr {
        Attr { name: name.into(), kind: AttrKind::Int as i32, i: v, ..Default::default() }
    }

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed | 1;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                // Coarse values so MaxPool sees ties.
                ((s >> 59) as f32 - 8.0) * 0.25 + ((s >> 30) & 1) as f32 * 0.01
            })
            .collect()
    }

    #[derive(Clone, Debug)]
    struct PoolCase {
        shape: Vec<usize>,
        kernel: Vec<i64>,
        strides: Vec<i64>,
        dil: Vec<i64>,
        pads: Vec<i64>,
        ceil: bool,
        include_pad: bool,
        auto_pad: &'static str,
    }

    impl PoolCase {
        fn attrs(&self, avg: bool) -> Vec<Attr> {
            let mut a = vec![ints("kernel_shape", &self.kernel), ints("strides", &self.strides), attr_i("ceil_mode", self.ceil as i64)];
            if self.auto_pad == "NOTSET" {
                a.push(ints("pads", &self.pads));
            } else {
                a.push(Attr { name: "auto_pad".into(), kind: AttrKind::String as i32, s: self.auto_pad.into(), ..Default::default() });
            }
            if avg {
                a.push(attr_i("count_include_pad", self.include_pad as i64));
            }
            // AveragePool takes dilations from opset 19.
            a.push(ints("dilations", &self.dil));
            a
        }

        fn check(&self, seed: u64) {
            let n: usize = self.shape.iter().product();
            let v = values(n, seed);
            let x32 = Tensor::from_vec(&self.shape, v.clone()).unwrap();
            let x64 = Tensor::from_vec(&self.shape, v.iter().map(|&x| x as f64).collect()).unwrap();
            // MaxPool: the fast path (values only) equals the generic one (values + indices) exactly.
            let fast = run("MaxPool", self.attrs(false), x32.clone(), 1);
            let generic = run("MaxPool", self.attrs(false), x32.clone(), 2);
            assert_eq!(fast[0].shape(), generic[0].shape(), "{self:?}");
            assert_eq!(fast[0].view::<f32>().unwrap(), generic[0].view::<f32>().unwrap(), "{self:?}");
            // AveragePool: the f32 fast path against the generic f64 path.
            let fast = run("AveragePool", self.attrs(true), x32, 1);
            let generic = run("AveragePool", self.attrs(true), x64, 1);
            assert_eq!(fast[0].shape(), generic[0].shape(), "{self:?}");
            for (&a, &b) in fast[0].view::<f32>().unwrap().iter().zip(generic[0].view::<f64>().unwrap()) {
                assert!((a as f64 - b).abs() <= 1e-6 * (1.0 + b.abs()), "{self:?}: {a} vs {b}");
            }
        }
    }

    fn pool_case(max_w: usize) -> impl Strategy<Value = PoolCase> {
        (1usize..=2, 1usize..=3, any::<bool>(), any::<bool>(), 0usize..4)
            .prop_flat_map(move |(nd, c, ceil, include_pad, ap)| {
                let dims = prop::collection::vec((1usize..=max_w, 1i64..=4, 1i64..=3, 1i64..=2, 0i64..=3, 0i64..=3), nd);
                (Just((c, ceil, include_pad, ap)), dims)
            })
            .prop_map(|((c, ceil, include_pad, ap), dims)| {
                let nd = dims.len();
                let mut shape = vec![1, c];
                shape.extend(dims.iter().map(|d| d.0));
                let mut pads = vec![0; 2 * nd];
                for (i, d) in dims.iter().enumerate() {
                    // Pads smaller than the kernel, as the spec requires.
                    pads[i] = d.4.min(d.1 - 1);
                    pads[i + nd] = d.5.min(d.1 - 1);
                }
                PoolCase {
                    shape,
                    kernel: dims.iter().map(|d| d.1).collect(),
                    strides: dims.iter().map(|d| d.2).collect(),
                    dil: dims.iter().map(|d| d.3).collect(),
                    pads,
                    ceil,
                    include_pad,
                    auto_pad: ["NOTSET", "NOTSET", "SAME_UPPER", "SAME_LOWER"][ap],
                }
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

        #[test]
        fn f32_pools_match_generic(c in pool_case(9), seed in any::<u64>()) {
            c.check(seed);
        }

        #[test]
        fn f32_pools_wide_rows_match_generic(c in pool_case(45), seed in any::<u64>()) {
            c.check(seed);
        }

        #[test]
        fn global_average_pool_f32_matches_f64(n in 1usize..3, c in 1usize..5, h in 0usize..40, w in 1usize..40, seed in any::<u64>()) {
            let v = values(n * c * h * w, seed);
            let x32 = Tensor::from_vec(&[n, c, h, w], v.clone()).unwrap();
            let x64 = Tensor::from_vec(&[n, c, h, w], v.iter().map(|&x| x as f64).collect()).unwrap();
            let a = run("GlobalAveragePool", vec![], x32, 1);
            let b = run("GlobalAveragePool", vec![], x64, 1);
            prop_assert_eq!(a[0].shape(), &[n, c, 1, 1]);
            for (&a, &b) in a[0].view::<f32>().unwrap().iter().zip(b[0].view::<f64>().unwrap()) {
                prop_assert!((a as f64 - b).abs() <= 1e-6 * (1.0 + b.abs()), "{} vs {}", a, b);
            }
        }
    }

    #[test]
    fn large_pools_in_parallel() {
        // Enough elements for the parallel split; PP-OCR's shapes (2x2 s2 max, 3x2 s3x2 average).
        let c = |k: [i64; 2], s: [i64; 2], pads: [i64; 4], shape: [usize; 4]| PoolCase {
            shape: shape.to_vec(),
            kernel: k.to_vec(),
            strides: s.to_vec(),
            dil: vec![1, 1],
            pads: pads.to_vec(),
            ceil: false,
            include_pad: false,
            auto_pad: "NOTSET",
        };
        c([2, 2], [2, 2], [0; 4], [1, 8, 48, 192]).check(1);
        c([3, 2], [3, 2], [0; 4], [1, 480, 3, 80]).check(2);
        c([3, 3], [2, 2], [1, 1, 1, 1], [2, 16, 57, 61]).check(3);
        // YOLOv8's SPPF (the separable MaxPool path) and a wide-row variant.
        c([5, 5], [1, 1], [2, 2, 2, 2], [1, 128, 10, 10]).check(5);
        c([3, 3], [1, 1], [1, 1, 1, 1], [1, 4, 33, 70]).check(6);
        let x = Tensor::from_vec(&[1, 64, 40, 40], values(64 * 1600, 4)).unwrap();
        let y = run("GlobalAveragePool", vec![], x.clone(), 1);
        let xv = x.view::<f32>().unwrap();
        for (p, &m) in y[0].view::<f32>().unwrap().iter().enumerate() {
            let want = xv[p * 1600..(p + 1) * 1600].iter().map(|&v| v as f64).sum::<f64>() / 1600.0;
            assert!((m as f64 - want).abs() < 1e-6, "{m} vs {want}");
        }
    }
}
