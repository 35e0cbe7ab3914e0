//! Convolutions: Conv, ConvTranspose, ConvInteger, QLinearConv, DeformConv, CausalConvWithState.
//!
//! Conv lowers to im2col + GEMM per (image, group), tiled over output rows so the column buffer
//! stays a few MB; 1x1 stride-1 unpadded kernels skip im2col, and depthwise convolutions
//! (one input channel per group) run a direct loop instead. ConvTranspose is GEMM + col2im.
//! Integer convolutions reuse the same code with exact i32 arithmetic. Geometry is padded to three
//! spatial dims (unit leading dims) so one code path serves 1-D, 2-D and 3-D.

use half::{bf16, f16};
use kiln_runtime::{DType, Error, Result, Tensor};
use rayon::prelude::*;

use super::matmul::{gemm, quant_range, quant_tensor, requant_multiplier, requantize, Mat, MatElem};
use super::pool::{spatial_geometry, DimGeom};
use crate::cpu::ctx::OpCtx;
use crate::cpu::registry::Registry;

pub fn register(r: &mut Registry) {
    r.add("Conv", conv);
    r.add("ConvTranspose", conv_transpose);
    r.add("ConvInteger", conv_integer);
    r.add("QLinearConv", qlinear_conv);
    r.add("DeformConv", deform_conv);
    r.add("CausalConvWithState", causal_conv_with_state);
}

/// Target size (elements) of one im2col tile.
const COL_TILE: usize = 1 << 20;

// ---------------------------------------------------------------------------------------------
// Geometry
// ---------------------------------------------------------------------------------------------

/// Convolution geometry padded to three spatial dims.
#[derive(Clone, Debug)]
struct Geo3 {
    input: [usize; 3],
    output: [usize; 3],
    kernel: [usize; 3],
    stride: [usize; 3],
    dilation: [usize; 3],
    pad: [usize; 3],
}

impl Geo3 {
    fn new(dims: &[DimGeom]) -> Result<Geo3> {
        if dims.is_empty() || dims.len() > 3 {
            return Err(Error::Other(format!("convolution over {} spatial dims is not supported", dims.len())));
        }
        let mut g = Geo3 { input: [1; 3], output: [1; 3], kernel: [1; 3], stride: [1; 3], dilation: [1; 3], pad: [0; 3] };
        let off = 3 - dims.len();
        for (i, d) in dims.iter().enumerate() {
            g.input[off + i] = d.input;
            g.output[off + i] = d.output;
            g.kernel[off + i] = d.kernel;
            g.stride[off + i] = d.stride;
            g.dilation[off + i] = d.dilation;
            g.pad[off + i] = d.pad_begin;
        }
        Ok(g)
    }

    fn in_size(&self) -> usize {
        self.input.iter().product()
    }

    fn out_size(&self) -> usize {
        self.output.iter().product()
    }

    fn k_size(&self) -> usize {
        self.kernel.iter().product()
    }

    /// Output indices `o` of dim `i` whose tap `kk` lands inside the input:
    /// `0 <= o*s + kk*d - pad < input`.
    fn valid(&self, i: usize, kk: usize) -> (usize, usize) {
        let (s, off) = (self.stride[i] as isize, (kk * self.dilation[i]) as isize - self.pad[i] as isize);
        let inp = self.input[i] as isize;
        let lo = if off >= 0 { 0 } else { (-off + s - 1) / s };
        let hi = if inp - 1 - off < 0 { 0 } else { (inp - 1 - off) / s + 1 };
        let hi = (hi as usize).min(self.output[i]);
        ((lo as usize).min(hi), hi)
    }

    /// Input index of output `o`, tap `kk` along dim `i` (only meaningful inside `valid`).
    fn src(&self, i: usize, o: usize, kk: usize) -> usize {
        o * self.stride[i] + kk * self.dilation[i] - self.pad[i]
    }

    fn is_pointwise(&self) -> bool {
        self.kernel == [1; 3] && self.stride == [1; 3] && self.pad == [0; 3] && self.input == self.output
    }
}

/// Kernel shape from the attribute or W's trailing dims.
fn kernel_dims(ctx: &OpCtx, w: &Tensor) -> Result<Vec<usize>> {
    let from_w = w.shape()[2..].to_vec();
    match ctx.attr_ints("kernel_shape") {
        Some(k) => {
            let k: Vec<usize> = k.into_iter().map(|v| v.max(0) as usize).collect();
            if k != from_w {
                return Err(Error::Shape(format!("kernel_shape {k:?} does not match W of shape {:?}", w.shape())));
            }
            Ok(k)
        }
        None => Ok(from_w),
    }
}

/// Checked shapes of a forward convolution.
struct ConvShape {
    n: usize,
    c: usize,
    m: usize,
    group: usize,
    geo: Geo3,
    out_shape: Vec<usize>,
}

fn conv_shape(ctx: &OpCtx, x: &Tensor, w: &Tensor) -> Result<ConvShape> {
    if x.rank() < 3 || w.rank() != x.rank() {
        return Err(Error::Shape(format!("Conv: X {:?} and W {:?} need equal rank >= 3", x.shape(), w.shape())));
    }
    let group = ctx.attr_i("group", 1);
    let (n, c, m) = (x.shape()[0], x.shape()[1], w.shape()[0]);
    if group <= 0 || c % group as usize != 0 || m % group as usize != 0 || w.shape()[1] * group as usize != c {
        return Err(Error::Shape(format!(
            "Conv: X {:?}, W {:?} and group {group} do not agree",
            x.shape(),
            w.shape()
        )));
    }
    let k = kernel_dims(ctx, w)?;
    let dims = spatial_geometry(ctx, &x.shape()[2..], &k, false)?;
    let mut out_shape = vec![n, m];
    out_shape.extend(dims.iter().map(|d| d.output));
    Ok(ConvShape { n, c, m, group: group as usize, geo: Geo3::new(&dims)?, out_shape })
}

// ---------------------------------------------------------------------------------------------
// Forward convolution core
// ---------------------------------------------------------------------------------------------

/// `y = conv(x, w) + bias` over contiguous NC... buffers; `y` is written entirely.
fn conv_core<T: MatElem>(s: &ConvShape, x: &[T], w: &[T], bias: Option<&[T]>, y: &mut [T]) -> Result<()> {
    let g = &s.geo;
    let (insz, outsz, ksz) = (g.in_size(), g.out_size(), g.k_size());
    let (cpg, mpg) = (s.c / s.group, s.m / s.group);
    if x.len() != s.n * s.c * insz || w.len() != s.m * cpg * ksz || y.len() != s.n * s.m * outsz {
        return Err(Error::Shape("Conv: buffer sizes do not match the shapes".into()));
    }
    // Start from the bias so the products accumulate onto it.
    for (i, plane) in y.chunks_mut(outsz.max(1)).enumerate() {
        plane.fill(bias.map_or(T::ZERO, |b| b[i % s.m]));
    }
    if outsz == 0 {
        return Ok(());
    }
    if cpg == 1 && s.group > 1 {
        depthwise(s, x, w, y);
        return Ok(());
    }
    let kdim = cpg * ksz;
    let ow = g.output[2];
    let out_rows = outsz / ow.max(1);
    let tile_rows = (COL_TILE / (kdim * ow).max(1)).clamp(1, out_rows.max(1));
    let mut col: Vec<T> = if g.is_pointwise() { Vec::new() } else { vec![T::ZERO; kdim * tile_rows * ow] };
    for b in 0..s.n {
        for grp in 0..s.group {
            let xg = &x[(b * s.c + grp * cpg) * insz..][..cpg * insz];
            let wg = &w[grp * mpg * kdim..][..mpg * kdim];
            let yg = &mut y[(b * s.m + grp * mpg) * outsz..][..mpg * outsz];
            if g.is_pointwise() {
                gemm(mpg, outsz, kdim, Mat::rows(wg, kdim), Mat::rows(xg, insz), true, yg, outsz, true)?;
                continue;
            }
            let mut r0 = 0;
            while r0 < out_rows {
                let nr = tile_rows.min(out_rows - r0);
                let ncols = nr * ow;
                let col = &mut col[..kdim * ncols];
                im2col(g, xg, r0, nr, col);
                gemm(mpg, ncols, kdim, Mat::rows(wg, kdim), Mat::rows(col, ncols), true, &mut yg[r0 * ow..], outsz, true)?;
                r0 += nr;
            }
        }
    }
    Ok(())
}

/// Fill `col` ([cpg·k, nr·OW]) with the input patches of output rows `r0..r0+nr`
/// (an output row is one (od, oh) pair).
fn im2col<T: MatElem>(g: &Geo3, x: &[T], r0: usize, nr: usize, col: &mut [T]) {
    let ksz = g.k_size();
    let (ow, oh) = (g.output[2], g.output[1]);
    let insz = g.in_size();
    let (ih, iw) = (g.input[1], g.input[2]);
    let ncols = nr * ow;
    col.par_chunks_mut(ncols).enumerate().for_each(|(r, crow)| {
        let (c, kk) = (r / ksz, r % ksz);
        let (kd, kh, kw) = (kk / (g.kernel[1] * g.kernel[2]), kk / g.kernel[2] % g.kernel[1], kk % g.kernel[2]);
        let xc = &x[c * insz..(c + 1) * insz];
        let (vd, vh, vw) = (g.valid(0, kd), g.valid(1, kh), g.valid(2, kw));
        let (s2, d2) = (g.stride[2], kw * g.dilation[2]);
        for (q, dst) in crow.chunks_mut(ow).enumerate() {
            let row = r0 + q;
            let (od, ohh) = (row / oh, row % oh);
            if od < vd.0 || od >= vd.1 || ohh < vh.0 || ohh >= vh.1 {
                dst.fill(T::ZERO);
                continue;
            }
            let base = (g.src(0, od, kd) * ih + g.src(1, ohh, kh)) * iw;
            dst[..vw.0].fill(T::ZERO);
            dst[vw.1..].fill(T::ZERO);
            if vw.0 < vw.1 {
                let first = base + vw.0 * s2 + d2 - g.pad[2];
                if s2 == 1 {
                    dst[vw.0..vw.1].copy_from_slice(&xc[first..first + (vw.1 - vw.0)]);
                } else {
                    for (j, v) in dst[vw.0..vw.1].iter_mut().enumerate() {
                        *v = xc[first + j * s2];
                    }
                }
            }
        }
    });
}

/// Direct convolution when every group has one input channel (M = C · multiplier). Works one
/// output row at a time so the row and the few input rows it reads stay in L1.
fn depthwise<T: MatElem>(s: &ConvShape, x: &[T], w: &[T], y: &mut [T]) {
    let g = &s.geo;
    let (insz, outsz, ksz) = (g.in_size(), g.out_size(), g.k_size());
    let mult = s.m / s.c;
    let (od_n, oh_n, ow) = (g.output[0], g.output[1], g.output[2]);
    let (ih, iw) = (g.input[1], g.input[2]);
    let [kd_n, kh_n, kw_n] = g.kernel;
    let vd: Vec<(usize, usize)> = (0..kd_n).map(|k| g.valid(0, k)).collect();
    let vh: Vec<(usize, usize)> = (0..kh_n).map(|k| g.valid(1, k)).collect();
    let vw: Vec<(usize, usize)> = (0..kw_n).map(|k| g.valid(2, k)).collect();
    let s2 = g.stride[2];
    y.par_chunks_mut(outsz).enumerate().for_each(|(p, yp)| {
        let (b, m) = (p / s.m, p % s.m);
        let xc = &x[(b * s.c + m / mult) * insz..][..insz];
        let wk = &w[m * ksz..(m + 1) * ksz];
        for od in 0..od_n {
            for ohh in 0..oh_n {
                let dst = &mut yp[(od * oh_n + ohh) * ow..][..ow];
                for kd in (0..kd_n).filter(|&k| od >= vd[k].0 && od < vd[k].1) {
                    for kh in (0..kh_n).filter(|&k| ohh >= vh[k].0 && ohh < vh[k].1) {
                        let xr = &xc[(g.src(0, od, kd) * ih + g.src(1, ohh, kh)) * iw..][..iw];
                        for (kw, &(lo, hi)) in vw.iter().enumerate() {
                            if lo >= hi {
                                continue;
                            }
                            let wv = wk[(kd * kh_n + kh) * kw_n + kw];
                            let first = lo * s2 + kw * g.dilation[2] - g.pad[2];
                            let d = &mut dst[lo..hi];
                            if s2 == 1 {
                                let len = d.len();
                                for (o, &v) in d.iter_mut().zip(&xr[first..first + len]) {
                                    *o = o.add(wv.mul(v));
                                }
                            } else {
                                for (o, &v) in d.iter_mut().zip(xr[first..].iter().step_by(s2)) {
                                    *o = o.add(wv.mul(v));
                                }
                            }
                        }
                    }
                }
            }
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Conv
// ---------------------------------------------------------------------------------------------

pub(crate) fn conv(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    let w = ctx.input(inputs, 1)?;
    let b = ctx.opt_input(inputs, 2);
    let s = conv_shape(ctx, x, w)?;
    let y = match x.dtype() {
        DType::F32 => typed::<f32>(&s, x, w, b)?,
        DType::F64 => typed::<f64>(&s, x, w, b)?,
        DType::F16 | DType::BF16 => {
            let mut y = vec![0f32; s.out_shape.iter().product()];
            let bv = b.map(widen).transpose()?;
            conv_core(&s, &widen(x)?, &widen(w)?, bv.as_deref(), &mut y)?;
            narrow(x.dtype(), &s.out_shape, &y)?
        }
        d => return Err(Error::DType(format!("Conv does not support {d}"))),
    };
    Ok(vec![y])
}

/// A float conv written straight into the output tensor.
fn typed<T: MatElem>(s: &ConvShape, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let mut y = Tensor::zeros(x.dtype(), &s.out_shape);
    let bias = b.map(|b| b.view::<T>()).transpose()?;
    if let Some(bv) = bias {
        if bv.len() != s.m {
            return Err(Error::Shape(format!("Conv: bias has {} elements, expected {}", bv.len(), s.m)));
        }
    }
    conv_core(s, x.view::<T>()?, w.view::<T>()?, bias, y.view_mut::<T>()?)?;
    Ok(y)
}

fn widen(t: &Tensor) -> Result<Vec<f32>> {
    Ok(match t.dtype() {
        DType::F16 => t.view::<f16>()?.iter().map(|x| x.to_f32()).collect(),
        DType::BF16 => t.view::<bf16>()?.iter().map(|x| x.to_f32()).collect(),
        DType::F32 => t.view::<f32>()?.to_vec(),
        d => return Err(Error::DType(format!("expected a float tensor, got {d}"))),
    })
}

fn narrow(dtype: DType, shape: &[usize], v: &[f32]) -> Result<Tensor> {
    match dtype {
        DType::F16 => Tensor::from_vec(shape, v.iter().map(|&x| f16::from_f32(x)).collect()),
        DType::BF16 => Tensor::from_vec(shape, v.iter().map(|&x| bf16::from_f32(x)).collect()),
        _ => Tensor::from_slice_as(DType::F32, shape, v),
    }
}

// ---------------------------------------------------------------------------------------------
// ConvInteger, QLinearConv
// ---------------------------------------------------------------------------------------------

/// 8-bit (or 4-bit) integers widened to i32, minus a zero point per tensor or per `block`-sized
/// run (per output channel of W).
fn centered(t: &Tensor, zp: Option<&Tensor>, block: usize) -> Result<Vec<i32>> {
    let mut v: Vec<i32> = match t.dtype() {
        DType::U8 | DType::U4 => t.view::<u8>()?.iter().map(|&x| x as i32).collect(),
        DType::I8 | DType::I4 => t.view::<i8>()?.iter().map(|&x| x as i32).collect(),
        d => return Err(Error::DType(format!("expected an 8-bit integer tensor, got {d}"))),
    };
    if let Some(zp) = zp {
        let z: Vec<i32> = zp.to_i64_vec()?.into_iter().map(|x| x as i32).collect();
        if z.len() == 1 {
            v.iter_mut().for_each(|x| *x -= z[0]);
        } else if block > 0 && z.len() * block == v.len() {
            for (chunk, &zz) in v.chunks_mut(block).zip(&z) {
                chunk.iter_mut().for_each(|x| *x -= zz);
            }
        } else {
            return Err(Error::Shape(format!("zero point of {} elements does not fit {:?}", z.len(), t.shape())));
        }
    }
    Ok(v)
}

/// The exact i32 convolution of zero-point-adjusted integer operands (plus an optional i32 bias).
fn int_conv(ctx: &OpCtx, x: &Tensor, xz: Option<&Tensor>, w: &Tensor, wz: Option<&Tensor>, bias: Option<&Tensor>) -> Result<(ConvShape, Vec<i32>)> {
    let s = conv_shape(ctx, x, w)?;
    let xv = centered(x, xz, 0)?;
    let wv = centered(w, wz, w.len() / s.m.max(1))?;
    let bv = bias.map(|b| b.view::<i32>().map(|v| v.to_vec())).transpose()?;
    if bv.as_ref().is_some_and(|b| b.len() != s.m) {
        return Err(Error::Shape("bias does not have one element per output channel".into()));
    }
    let mut y = vec![0i32; s.out_shape.iter().product()];
    conv_core(&s, &xv, &wv, bv.as_deref(), &mut y)?;
    Ok((s, y))
}

fn conv_integer(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    let w = ctx.input(inputs, 1)?;
    let (s, y) = int_conv(ctx, x, ctx.opt_input(inputs, 2), w, ctx.opt_input(inputs, 3), None)?;
    Ok(vec![Tensor::from_vec(&s.out_shape, y)?])
}

fn qlinear_conv(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    let xs = ctx.input(inputs, 1)?.to_f64_vec()?;
    let xz = ctx.opt_input(inputs, 2);
    let w = ctx.input(inputs, 3)?;
    let ws = ctx.input(inputs, 4)?.to_f64_vec()?;
    let wz = ctx.opt_input(inputs, 5);
    let ys = ctx.input(inputs, 6)?.to_f64_vec()?;
    let yz = ctx.opt_input(inputs, 7);
    let bias = ctx.opt_input(inputs, 8);
    let (s, acc) = int_conv(ctx, x, xz, w, wz, bias)?;
    if xs.len() != 1 || ys.len() != 1 || (ws.len() != 1 && ws.len() != s.m) {
        return Err(ctx.unsupported("x_scale and y_scale must be scalars, w_scale scalar or per output channel"));
    }
    let out_dtype = yz.map_or(x.dtype(), |z| z.dtype());
    let (lo, hi) = quant_range(out_dtype)?;
    let zy = match yz {
        Some(z) => *z.to_i64_vec()?.first().ok_or_else(|| Error::Shape("empty y_zero_point".into()))? as i32,
        None => 0,
    };
    let mults: Vec<f64> = (0..s.m)
        .map(|m| requant_multiplier(xs[0] as f32, ws[if ws.len() == 1 { 0 } else { m }] as f32, ys[0] as f32, false))
        .collect();
    let outsz = s.geo.out_size().max(1);
    let y: Vec<i32> = acc
        .iter()
        .enumerate()
        .map(|(i, &v)| requantize(v as f64 * mults[(i / outsz) % s.m], zy, lo, hi))
        .collect();
    Ok(vec![quant_tensor(out_dtype, &s.out_shape, &y)?])
}

// ---------------------------------------------------------------------------------------------
// ConvTranspose
// ---------------------------------------------------------------------------------------------

/// Geometry of a transposed convolution: `geo` describes the *forward* conv from the output
/// (as its input) to X (as its output), which is exactly the scatter pattern of col2im.
fn conv_transpose_shape(ctx: &OpCtx, x: &Tensor, w: &Tensor) -> Result<ConvShape> {
    if x.rank() < 3 || w.rank() != x.rank() {
        return Err(Error::Shape(format!("ConvTranspose: X {:?} and W {:?} need equal rank >= 3", x.shape(), w.shape())));
    }
    let nd = x.rank() - 2;
    let group = ctx.attr_i("group", 1);
    let (n, c) = (x.shape()[0], x.shape()[1]);
    if group <= 0 || c % group as usize != 0 || w.shape()[0] != c {
        return Err(Error::Shape(format!("ConvTranspose: X {:?}, W {:?}, group {group} disagree", x.shape(), w.shape())));
    }
    let group = group as usize;
    let m = w.shape()[1] * group;
    let k = kernel_dims(ctx, w)?;
    let ints = |name: &str, default: i64, len: usize| -> Result<Vec<i64>> {
        let v = ctx.attr_ints(name).unwrap_or_else(|| vec![default; len]);
        if v.len() != len {
            return Err(Error::Shape(format!("attribute {name} = {v:?} does not fit {nd} spatial dims")));
        }
        Ok(v)
    };
    let strides = ints("strides", 1, nd)?;
    let dil = ints("dilations", 1, nd)?;
    let out_pad = ints("output_padding", 0, nd)?;
    let auto_pad = ctx.attr_s("auto_pad", "NOTSET");
    let out_shape_attr = ctx.attr_ints("output_shape").map(|v| v[v.len().saturating_sub(nd)..].to_vec());
    let explicit_pads = ctx.attr_ints("pads");
    let mut dims = Vec::with_capacity(nd);
    for i in 0..nd {
        let inp = x.shape()[2 + i] as i64;
        let (s, d, kk) = (strides[i], dil[i], k[i] as i64);
        if s <= 0 || d <= 0 {
            return Err(Error::Shape("strides and dilations must be positive".into()));
        }
        let ek = (kk - 1) * d + 1;
        let full = s * (inp - 1) + out_pad[i] + ek;
        let (pb, out) = if let Some(os) = &out_shape_attr {
            let total = full - os[i];
            let pb = if total <= 0 {
                0
            } else if auto_pad == "SAME_UPPER" {
                total / 2
            } else {
                total - total / 2
            };
            (pb, os[i])
        } else if auto_pad == "SAME_UPPER" || auto_pad == "SAME_LOWER" {
            let out = inp * s;
            let total = (full - out).max(0);
            let pb = if auto_pad == "SAME_UPPER" { total / 2 } else { total - total / 2 };
            (pb, out)
        } else {
            let p = explicit_pads.clone().unwrap_or_else(|| vec![0; 2 * nd]);
            if p.len() != 2 * nd {
                return Err(Error::Shape(format!("pads {p:?} do not fit {nd} spatial dims")));
            }
            (p[i], full - p[i] - p[i + nd])
        };
        if out < 0 || pb < 0 {
            return Err(Error::Shape(format!("ConvTranspose: negative output size or padding in dim {i}")));
        }
        // Seen from the output: a forward conv producing X's spatial dims.
        dims.push(DimGeom {
            input: out as usize,
            output: inp as usize,
            kernel: kk as usize,
            stride: s as usize,
            dilation: d as usize,
            pad_begin: pb as usize,
            pad_end: 0,
        });
    }
    let mut out_shape = vec![n, m];
    out_shape.extend(dims.iter().map(|d| d.input));
    Ok(ConvShape { n, c, m, group, geo: Geo3::new(&dims)?, out_shape })
}

fn conv_transpose(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    let w = ctx.input(inputs, 1)?;
    let b = ctx.opt_input(inputs, 2);
    let s = conv_transpose_shape(ctx, x, w)?;
    let total: usize = s.out_shape.iter().product();
    let y = match x.dtype() {
        DType::F32 | DType::F64 => crate::with_real!(x.dtype(), T, {
            let mut y = Tensor::zeros(x.dtype(), &s.out_shape);
            let bv = b.map(|b| b.view::<T>()).transpose()?;
            conv_transpose_core(&s, x.view::<T>()?, w.view::<T>()?, bv, y.view_mut::<T>()?)?;
            y
        }),
        DType::F16 | DType::BF16 => {
            let mut y = vec![0f32; total];
            let bv = b.map(widen).transpose()?;
            conv_transpose_core(&s, &widen(x)?, &widen(w)?, bv.as_deref(), &mut y)?;
            narrow(x.dtype(), &s.out_shape, &y)?
        }
        d => return Err(Error::DType(format!("ConvTranspose does not support {d}"))),
    };
    Ok(vec![y])
}

/// Per (image, group): col = W_gᵀ · X_g, then scatter-add col into the output (col2im).
fn conv_transpose_core<T: MatElem>(s: &ConvShape, x: &[T], w: &[T], bias: Option<&[T]>, y: &mut [T]) -> Result<()> {
    let g = &s.geo;
    // In `geo`, "input" is the ConvTranspose output and "output" is X.
    let (xsz, ysz, ksz) = (g.out_size(), g.in_size(), g.k_size());
    let (cpg, mpg) = (s.c / s.group, s.m / s.group);
    if x.len() != s.n * s.c * xsz || w.len() != s.c * mpg * ksz || y.len() != s.n * s.m * ysz {
        return Err(Error::Shape("ConvTranspose: buffer sizes do not match the shapes".into()));
    }
    if let Some(b) = bias {
        if b.len() != s.m {
            return Err(Error::Shape("ConvTranspose: bias does not have one element per output channel".into()));
        }
    }
    for (i, plane) in y.chunks_mut(ysz.max(1)).enumerate() {
        plane.fill(bias.map_or(T::ZERO, |b| b[i % s.m]));
    }
    if ysz == 0 || xsz == 0 {
        return Ok(());
    }
    let rows = mpg * ksz;
    let mut col = vec![T::ZERO; rows * xsz];
    for b in 0..s.n {
        for grp in 0..s.group {
            let xg = &x[(b * s.c + grp * cpg) * xsz..][..cpg * xsz];
            let wg = &w[grp * cpg * rows..][..cpg * rows];
            gemm(rows, xsz, cpg, Mat::cols(wg, rows), Mat::rows(xg, xsz), false, &mut col, xsz, true)?;
            let yg = &mut y[(b * s.m + grp * mpg) * ysz..][..mpg * ysz];
            yg.par_chunks_mut(ysz).enumerate().for_each(|(m, yp)| {
                col2im(g, &col[m * ksz * xsz..(m + 1) * ksz * xsz], yp);
            });
        }
    }
    Ok(())
}

/// Scatter-add one output channel's columns ([k, X positions]) into its output plane.
fn col2im<T: MatElem>(g: &Geo3, col: &[T], yp: &mut [T]) {
    let xsz = g.out_size();
    let (xh, xw) = (g.output[1], g.output[2]);
    let (yh, yw) = (g.input[1], g.input[2]);
    for kd in 0..g.kernel[0] {
        let vd = g.valid(0, kd);
        for kh in 0..g.kernel[1] {
            let vh = g.valid(1, kh);
            for kw in 0..g.kernel[2] {
                let vw = g.valid(2, kw);
                if vw.0 >= vw.1 {
                    continue;
                }
                let kk = (kd * g.kernel[1] + kh) * g.kernel[2] + kw;
                let crow = &col[kk * xsz..(kk + 1) * xsz];
                let s2 = g.stride[2];
                for id in vd.0..vd.1 {
                    for ih in vh.0..vh.1 {
                        let src = &crow[(id * xh + ih) * xw..][..xw];
                        let base = (g.src(0, id, kd) * yh + g.src(1, ih, kh)) * yw;
                        let first = base + vw.0 * s2 + kw * g.dilation[2] - g.pad[2];
                        for (j, &v) in src[vw.0..vw.1].iter().enumerate() {
                            let o = &mut yp[first + j * s2];
                            *o = o.add(v);
                        }
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// DeformConv (2-D)
// ---------------------------------------------------------------------------------------------

fn deform_conv(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    let w = ctx.input(inputs, 1)?;
    if x.rank() != 4 {
        return Err(ctx.unsupported("only 2-D deformable convolution is implemented"));
    }
    let s = conv_shape(ctx, x, w)?;
    let offset = ctx.input(inputs, 2)?;
    let og = ctx.attr_i("offset_group", 1).max(1) as usize;
    let ksz = s.geo.k_size();
    let (oh, ow) = (s.geo.output[1], s.geo.output[2]);
    if s.c % og != 0 || offset.shape() != [s.n, og * ksz * 2, oh, ow] {
        return Err(Error::Shape(format!("DeformConv: offset {:?} does not fit the geometry", offset.shape())));
    }
    let mask = ctx.opt_input(inputs, 4);
    if mask.is_some_and(|m| m.shape() != [s.n, og * ksz, oh, ow]) {
        return Err(Error::Shape("DeformConv: mask does not fit the geometry".into()));
    }
    crate::with_real!(x.dtype(), R, {
        let xv = crate::cpu::util::real_vec::<R>(x)?;
        let wv = crate::cpu::util::real_vec::<R>(w)?;
        let ov = crate::cpu::util::real_vec::<R>(offset)?;
        let mv = mask.map(crate::cpu::util::real_vec::<R>).transpose()?;
        let bv = ctx.opt_input(inputs, 3).map(crate::cpu::util::real_vec::<R>).transpose()?;
        let mut y = vec![<R as MatElem>::ZERO; s.out_shape.iter().product()];
        let d = DeformArgs { s: &s, og, offset: &ov, mask: mv.as_deref() };
        d.run(&xv, &wv, bv.as_deref(), &mut y)?;
        Ok(vec![crate::cpu::util::real_tensor(x.dtype(), &s.out_shape, y)?])
    })
}

struct DeformArgs<'a, R> {
    s: &'a ConvShape,
    og: usize,
    offset: &'a [R],
    mask: Option<&'a [R]>,
}

impl<R: crate::cpu::util::Real + MatElem> DeformArgs<'_, R> {
    /// Bilinearly sampled columns per (image, group), then the same GEMM as Conv.
    fn run(&self, x: &[R], w: &[R], bias: Option<&[R]>, y: &mut [R]) -> Result<()> {
        let s = self.s;
        let g = &s.geo;
        let (ih, iw) = (g.input[1], g.input[2]);
        let (oh, ow) = (g.output[1], g.output[2]);
        let (insz, outsz, ksz) = (ih * iw, oh * ow, g.k_size());
        let (cpg, mpg) = (s.c / s.group, s.m / s.group);
        let cpo = s.c / self.og;
        if bias.is_some_and(|b| b.len() != s.m) {
            return Err(Error::Shape("DeformConv: bias does not have one element per output channel".into()));
        }
        for (i, plane) in y.chunks_mut(outsz.max(1)).enumerate() {
            plane.fill(bias.map_or(<R as MatElem>::ZERO, |b| b[i % s.m]));
        }
        let kdim = cpg * ksz;
        let mut col = vec![<R as MatElem>::ZERO; kdim * outsz];
        for b in 0..s.n {
            for grp in 0..s.group {
                col.par_chunks_mut(outsz.max(1)).enumerate().for_each(|(r, crow)| {
                    let (ci, kk) = (r / ksz, r % ksz);
                    let c = grp * cpg + ci;
                    let o = c / cpo;
                    let (kh, kw) = (kk / g.kernel[2], kk % g.kernel[2]);
                    let plane = &x[(b * s.c + c) * insz..][..insz];
                    let off_h = &self.offset[((b * self.og + o) * ksz + kk) * 2 * outsz..][..outsz];
                    let off_w = &self.offset[(((b * self.og + o) * ksz + kk) * 2 + 1) * outsz..][..outsz];
                    let mask = self.mask.map(|m| &m[((b * self.og + o) * ksz + kk) * outsz..][..outsz]);
                    for (p, v) in crow.iter_mut().enumerate() {
                        let (i, j) = (p / ow, p % ow);
                        let h = (i * g.stride[1] + kh * g.dilation[1]) as f64 - g.pad[1] as f64 + off_h[p].to_f64();
                        let ww = (j * g.stride[2] + kw * g.dilation[2]) as f64 - g.pad[2] as f64 + off_w[p].to_f64();
                        let val = bilinear(plane, ih, iw, h, ww);
                        let m = mask.map_or(1.0, |m| m[p].to_f64());
                        *v = R::from_f64(val * m);
                    }
                });
                let wg = &w[grp * mpg * kdim..][..mpg * kdim];
                let yg = &mut y[(b * s.m + grp * mpg) * outsz..][..mpg * outsz];
                gemm(mpg, outsz, kdim, Mat::rows(wg, kdim), Mat::rows(&col, outsz), true, yg, outsz, true)?;
            }
        }
        Ok(())
    }
}

/// Bilinear sample of a plane at (h, w); neighbours outside the plane count as zero.
fn bilinear<R: crate::cpu::util::Real>(plane: &[R], ih: usize, iw: usize, h: f64, w: f64) -> f64 {
    let (h0, w0) = (h.floor(), w.floor());
    let (dh, dw) = (h - h0, w - w0);
    let at = |y: f64, x: f64| -> f64 {
        if y < 0.0 || x < 0.0 || y >= ih as f64 || x >= iw as f64 {
            0.0
        } else {
            plane[y as usize * iw + x as usize].to_f64()
        }
    };
    at(h0, w0) * (1.0 - dh) * (1.0 - dw)
        + at(h0, w0 + 1.0) * (1.0 - dh) * dw
        + at(h0 + 1.0, w0) * dh * (1.0 - dw)
        + at(h0 + 1.0, w0 + 1.0) * dh * dw
}

// ---------------------------------------------------------------------------------------------
// CausalConvWithState (opset 27)
// ---------------------------------------------------------------------------------------------

/// Causal depthwise 1-D convolution over `[past_state | input]`, with an optional fused SiLU;
/// also returns the last k-1 positions as the next state.
fn causal_conv_with_state(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let x = ctx.input(inputs, 0)?;
    let w = ctx.input(inputs, 1)?;
    if x.rank() != 3 || w.rank() != 3 || w.shape()[0] != x.shape()[1] || w.shape()[1] != 1 || w.shape()[2] == 0 {
        return Err(Error::Shape(format!("CausalConvWithState: input {:?} / weight {:?}", x.shape(), w.shape())));
    }
    let (b, c, l) = (x.shape()[0], x.shape()[1], x.shape()[2]);
    let k = w.shape()[2];
    let silu = match ctx.attr_s("activation", "none").as_str() {
        "none" => false,
        "silu" | "swish" => true,
        a => return Err(ctx.unsupported(format!("activation '{a}'"))),
    };
    let past = ctx.opt_input(inputs, 3);
    if past.is_some_and(|p| p.shape() != [b, c, k - 1]) {
        return Err(Error::Shape("CausalConvWithState: past_state must be [batch, channels, k - 1]".into()));
    }
    let dtype = x.dtype();
    crate::with_real!(x.dtype(), R, {
        use crate::cpu::util::{real_tensor, real_vec, Real};
        let xv = real_vec::<R>(x)?;
        let wv = real_vec::<R>(w)?;
        let bv = ctx.opt_input(inputs, 2).map(real_vec::<R>).transpose()?;
        if bv.as_ref().is_some_and(|v| v.len() != c) {
            return Err(Error::Shape("CausalConvWithState: bias must have one element per channel".into()));
        }
        let pv = past.map(real_vec::<R>).transpose()?;
        let plen = l + k - 1;
        let mut y = vec![<R as Real>::ZERO; b * c * l];
        // One state row per (batch, channel) even when k = 1 leaves it empty, so the zip below
        // still visits every row.
        let srow = (k - 1).max(1);
        let mut state = vec![<R as Real>::ZERO; b * c * srow];
        y.par_chunks_mut(l.max(1)).zip(state.par_chunks_mut(srow)).enumerate().for_each(|(p, (yr, sr))| {
            let ch = p % c;
            let mut padded = vec![<R as Real>::ZERO; plen];
            if let Some(pv) = &pv {
                padded[..k - 1].copy_from_slice(&pv[p * (k - 1)..(p + 1) * (k - 1)]);
            }
            padded[k - 1..].copy_from_slice(&xv[p * l..(p + 1) * l]);
            let wk = &wv[ch * k..(ch + 1) * k];
            let b0 = bv.as_ref().map_or(<R as Real>::ZERO, |b| b[ch]);
            for (t, o) in yr.iter_mut().enumerate() {
                let mut acc = b0;
                for (j, &wj) in wk.iter().enumerate() {
                    acc += wj * padded[t + j];
                }
                // The reference rounds the convolution to the input type before activating.
                if dtype == DType::F16 {
                    acc = R::from_f64(f16::from_f64(acc.to_f64()).to_f64());
                } else if dtype == DType::BF16 {
                    acc = R::from_f64(bf16::from_f64(acc.to_f64()).to_f64());
                }
                *o = if silu { acc / (R::ONE + (-acc).exp()) } else { acc };
            }
            if k > 1 {
                sr.copy_from_slice(&padded[plen - (k - 1)..]);
            }
        });
        state.truncate(b * c * (k - 1));
        Ok(vec![real_tensor(x.dtype(), x.shape(), y)?, real_tensor(x.dtype(), &[b, c, k - 1], state)?])
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_runtime::manifest::{Attr, AttrKind, Step};

    fn ints(name: &str, v: &[i64]) -> Attr {
        Attr { name: name.into(), kind: AttrKind::Ints as i32, ints: v.to_vec(), ..Default::default() }
    }

    fn run(op: &str, attrs: Vec<Attr>, inputs: Vec<Option<Tensor>>) -> Tensor {
        let step = Step { op: op.into(), opset: 17, outputs: vec![0], attrs, ..Default::default() };
        crate::cpu::eval_step(&step, &inputs).unwrap().remove(0)
    }

    fn t(v: Vec<f32>, shape: &[usize]) -> Option<Tensor> {
        Some(Tensor::from_vec(shape, v).unwrap())
    }

    #[test]
    fn conv_padded_3x3_and_bias() {
        // 3x3 input of ones, 3x3 kernel of ones, pad 1: counts of in-bounds taps, plus bias 1.
        let y = run(
            "Conv",
            vec![ints("pads", &[1, 1, 1, 1])],
            vec![t(vec![1.; 9], &[1, 1, 3, 3]), t(vec![1.; 9], &[1, 1, 3, 3]), t(vec![1.], &[1])],
        );
        assert_eq!(y.view::<f32>().unwrap(), &[5., 7., 5., 7., 10., 7., 5., 7., 5.]);
    }

    #[test]
    fn depthwise_matches_grouped_reference() {
        // Two channels, group 2, stride 2: each channel scaled by its own 1x1 kernel.
        let a = Attr { name: "group".into(), kind: AttrKind::Int as i32, i: 2, ..Default::default() };
        let y = run(
            "Conv",
            vec![a, ints("strides", &[2, 2])],
            vec![t((0..8).map(|v| v as f32).collect(), &[1, 2, 2, 2]), t(vec![2., 3.], &[2, 1, 1, 1]), None],
        );
        assert_eq!(y.shape(), &[1, 2, 1, 1]);
        assert_eq!(y.view::<f32>().unwrap(), &[0., 12.]);
    }

    #[test]
    fn conv_transpose_stride2() {
        // 1-D: x = [1, 2], w = [1, 1, 1], stride 2 -> [1, 1, 3, 2, 2].
        let y = run(
            "ConvTranspose",
            vec![ints("strides", &[2])],
            vec![t(vec![1., 2.], &[1, 1, 2]), t(vec![1., 1., 1.], &[1, 1, 3]), None],
        );
        assert_eq!(y.view::<f32>().unwrap(), &[1., 1., 3., 2., 2.]);
    }
}
