//! kiln's int8 ops (domain "kiln"), produced by the `quant_int8` pass from MatMul / Gemm /
//! FusedMatMul and Conv / FusedConv with constant weights. f32 in and out: the activation is
//! quantized to u8 on entry, the product runs on the int8 GEMM (`cpu::qgemm`) and dequantization,
//! bias and activation happen in its epilogue.
//!
//! - `MatMulInt8(A[..., K], W, w_scale[N], w_sum[N], bias[N]?, x_mul[K]?)`, attribute `k`.
//! - `ConvInt8(X[N, C, H, W], W, w_scale[M], w_sum[M], bias[M]?, x_mul[C]?)`: 2-D, group 1, with Conv's
//!   `kernel_shape` (required), `strides`, `pads`, `dilations`, `auto_pad`, and `channels` = C.
//!   The weight's K runs over (ky, kx, c) with c padded to a multiple of 4, so the input is
//!   quantized once into an NHWC u8 buffer and each im2col row is kernel-area copies of one pixel's
//!   channels (a 1×1 stride-1 Conv uses that buffer as A directly).
//!
//! W is the packed U8 panel layout of `qgemm::pack_i8` (built at compile time, never per call).
//! `a_scale` (float) and `a_zero` (int) give the static, calibrated u8 quantization of the input;
//! without them it is chosen at run time (per row of A for MatMulInt8, per tensor for ConvInt8).
//! Both take FusedMatMul's `activation` and `activation_params`.
//!
//! `x_mul` (static only) multiplies each input channel before quantization: the compiler moved
//! 1/x_mul into the weights' rows (SmoothQuant-style smoothing, so one per-tensor u8 range fits
//! channels of very different magnitude). It costs nothing extra: quantization reads every
//! element anyway.

use rayon::prelude::*;

use kiln_runtime::tensor::Buffer;
use kiln_runtime::{DType, Error, Result, Tensor};

use crate::cpu::ctx::OpCtx;
use crate::cpu::kernels::fused::act_from_ctx;
use crate::cpu::isa;
use crate::cpu::kernels::pool::spatial_geometry;
use crate::cpu::qgemm::{self, PackedRef, QActs, QEpilogue, QKernel};
use crate::cpu::registry::Registry;

pub fn register(r: &mut Registry) {
    r.add_in("kiln", "MatMulInt8", matmul_int8);
    r.add_in("kiln", "ConvInt8", conv_int8);
}


fn typed<'a>(ctx: &OpCtx, inputs: &'a [Option<Tensor>], i: usize, dtype: DType) -> Result<&'a Tensor> {
    let t = ctx.input(inputs, i)?;
    if t.dtype() != dtype {
        return Err(Error::DType(format!("{} '{}': input {i} is {}, expected {dtype}", ctx.op(), ctx.name(), t.dtype())));
    }
    Ok(t)
}

/// The packed weights (inputs 1..=3) for K = `k`, and the optional bias (input 4).
fn weights<'a>(ctx: &OpCtx, inputs: &'a [Option<Tensor>], k: usize) -> Result<(PackedRef<'a>, Option<&'a [f32]>)> {
    let scale = typed(ctx, inputs, 2, DType::F32)?.view::<f32>()?;
    let n = scale.len();
    let w = PackedRef {
        k,
        n,
        packed: typed(ctx, inputs, 1, DType::U8)?.view::<u8>()?,
        scale,
        sum: typed(ctx, inputs, 3, DType::I32)?.view::<i32>()?,
    };
    if w.packed.len() != qgemm::packed_len(k, n) || w.sum.len() != n {
        return Err(Error::Shape(format!("{} '{}': packed weights do not hold {k}x{n}", ctx.op(), ctx.name())));
    }
    let bias = match ctx.opt_input(inputs, 4) {
        Some(b) if b.dtype() == DType::F32 && b.len() == n => Some(b.view::<f32>()?),
        Some(b) => return Err(Error::Shape(format!("{}: bias {:?} for {n} columns", ctx.op(), b.shape()))),
        None => None,
    };
    Ok((w, bias))
}

/// The calibrated (scale, zero point) if the node has them.
fn static_params(ctx: &OpCtx) -> Result<Option<(f32, i32)>> {
    match (ctx.attr_f_opt("a_scale"), ctx.attr_i_opt("a_zero")) {
        (None, None) => Ok(None),
        (Some(s), Some(z)) if s > 0.0 && s.is_finite() && (0..=255).contains(&z) => Ok(Some((s, z as i32))),
        _ => Err(ctx.unsupported("a_scale / a_zero must come together, scale > 0, zero in 0..=255")),
    }
}

/// The optional per-channel input multiplier (input 5) of `len` values; only with static params.
fn x_mul<'a>(ctx: &OpCtx, inputs: &'a [Option<Tensor>], len: usize, is_static: bool) -> Result<Option<&'a [f32]>> {
    match ctx.opt_input(inputs, 5) {
        None => Ok(None),
        Some(_) if !is_static => Err(ctx.unsupported("x_mul needs a_scale / a_zero")),
        Some(m) if m.dtype() == DType::F32 && m.len() == len => Ok(Some(m.view::<f32>()?)),
        Some(m) => Err(Error::Shape(format!("{} '{}': x_mul {:?} for {len} channels", ctx.op(), ctx.name(), m.shape()))),
    }
}

fn positive_attr(ctx: &OpCtx, name: &str) -> Result<usize> {
    match ctx.attr_i_opt(name) {
        Some(v) if v > 0 => Ok(v as usize),
        _ => Err(ctx.unsupported(format!("attribute {name} missing or not positive"))),
    }
}

fn matmul_int8(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let a = typed(ctx, inputs, 0, DType::F32)?;
    let k = positive_attr(ctx, "k")?;
    let (w, bias) = weights(ctx, inputs, k)?;
    let act = act_from_ctx(ctx)?;
    if a.rank() < 1 || a.shape()[a.rank() - 1] != k {
        return Err(Error::Shape(format!("MatMulInt8 '{}': A {:?} for K = {k}", ctx.name(), a.shape())));
    }
    let m = a.len() / k;
    let av = a.view::<f32>()?;
    let params = static_params(ctx)?;
    let mul = x_mul(ctx, inputs, k, params.is_some())?;
    let (q, scale, zero) = match params {
        None => qgemm::quantize_rows(av, m, k),
        Some((s, z)) => {
            let ld = qgemm::padded_k(k);
            let mut q = vec![0u8; m * ld];
            for (dst, src) in q.chunks_mut(ld).zip(av.chunks(k)) {
                match mul {
                    Some(mul) => qgemm::quantize_u8_scaled(src, mul, &mut dst[..k], s, z),
                    None => qgemm::quantize_u8(src, &mut dst[..k], s, z),
                }
            }
            (q, vec![s], vec![z])
        }
    };
    let mut out_shape = a.shape().to_vec();
    *out_shape.last_mut().unwrap() = w.n;
    let mut y = vec![0f32; m * w.n];
    let acts = QActs { data: &q, ld: qgemm::padded_k(k), scale: &scale, zero: &zero };
    let out = qgemm::Out { data: &mut y, rs: w.n, cs: 1 };
    qgemm::qgemm(m, acts, w, &QEpilogue { bias, act }, out, true)?;
    Ok(vec![Tensor::from_vec(&out_shape, y)?])
}

/// 2-D convolution geometry of a ConvInt8 node.
struct ConvGeo {
    c: usize,
    cp: usize,
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
    kernel: [usize; 2],
    stride: [usize; 2],
    dilation: [usize; 2],
    pad: [usize; 2],
}

impl ConvGeo {
    fn pointwise(&self) -> bool {
        self.kernel == [1, 1] && self.stride == [1, 1] && self.pad == [0, 0] && (self.oh, self.ow) == (self.h, self.w)
    }

    fn k(&self) -> usize {
        self.kernel[0] * self.kernel[1] * self.cp
    }
}

fn conv_geo(ctx: &OpCtx, x: &Tensor) -> Result<ConvGeo> {
    if x.rank() != 4 {
        return Err(ctx.unsupported(format!("input of rank {} (2-D convolutions only)", x.rank())));
    }
    if ctx.attr_i("group", 1) != 1 {
        return Err(ctx.unsupported("group != 1"));
    }
    let kernel = ctx.attr_ints("kernel_shape").ok_or_else(|| ctx.unsupported("kernel_shape missing"))?;
    if kernel.len() != 2 || kernel.iter().any(|&v| v <= 0) {
        return Err(ctx.unsupported(format!("kernel_shape {kernel:?}")));
    }
    let kernel = [kernel[0] as usize, kernel[1] as usize];
    let c = positive_attr(ctx, "channels")?;
    if x.shape()[1] != c {
        return Err(Error::Shape(format!("ConvInt8 '{}': X {:?} for {c} channels", ctx.name(), x.shape())));
    }
    let d = spatial_geometry(ctx, &x.shape()[2..], &kernel, false)?;
    Ok(ConvGeo {
        c,
        cp: qgemm::padded_k(c),
        h: x.shape()[2],
        w: x.shape()[3],
        oh: d[0].output,
        ow: d[1].output,
        kernel,
        stride: [d[0].stride, d[1].stride],
        dilation: [d[0].dilation, d[1].dilation],
        pad: [d[0].pad_begin, d[1].pad_begin],
    })
}

/// Pixels per task when building im2col rows (a multiple of every kernel's tile height).
const PIXEL_CHUNK: usize = 128;

/// Quantize one NCHW image into NHWC u8 with `cp` bytes per pixel (padding channels zero),
/// channel c multiplied by `mul[c]` first when given. Writes every byte of `dst`.
fn quantize_nhwc(x: &[f32], g: &ConvGeo, s: f32, z: i32, mul: Option<&[f32]>, dst: &mut [u8]) {
    let hw = g.h * g.w;
    let zf = z as f32;
    crate::cpu::par::chunks_mut(dst, PIXEL_CHUNK * g.cp, |t, out| {
        isa::with_isa(#[inline(always)] || {
            let p0 = t * PIXEL_CHUNK;
            let np = out.len() / g.cp;
            for c in 0..g.c {
                let inv = mul.map_or(1.0, |m| m[c]) / s;
                let src = &x[c * hw + p0..c * hw + p0 + np];
                for (p, &v) in src.iter().enumerate() {
                    out[p * g.cp + c] = qgemm::q_u8(v, inv, zf);
                }
            }
            if g.cp > g.c {
                for px in out.chunks_exact_mut(g.cp) {
                    px[g.c..].fill(0);
                }
            }
        })
    });
}

/// im2col rows (one per output pixel p0..p0+rows, `k` bytes each) from the NHWC u8 image; taps
/// outside the image read the zero point.
fn im2col_rows(g: &ConvGeo, src: &[u8], zero: u8, p0: usize, rows: &mut [u8]) {
    let k = g.k();
    for (r, row) in rows.chunks_exact_mut(k).enumerate() {
        let (oy, ox) = ((p0 + r) / g.ow, (p0 + r) % g.ow);
        for ky in 0..g.kernel[0] {
            let iy = (oy * g.stride[0] + ky * g.dilation[0]) as isize - g.pad[0] as isize;
            for kx in 0..g.kernel[1] {
                let ix = (ox * g.stride[1] + kx * g.dilation[1]) as isize - g.pad[1] as isize;
                let dst = &mut row[(ky * g.kernel[1] + kx) * g.cp..][..g.cp];
                if iy >= 0 && ix >= 0 && (iy as usize) < g.h && (ix as usize) < g.w {
                    let off = (iy as usize * g.w + ix as usize) * g.cp;
                    dst.copy_from_slice(&src[off..off + g.cp]);
                } else {
                    dst.fill(zero);
                }
            }
        }
    }
}

#[derive(Clone, Copy)]
struct YPtr(*mut f32);
// SAFETY: each task writes only its own pixel range of every output channel.
unsafe impl Send for YPtr {}
unsafe impl Sync for YPtr {}

fn conv_int8(ctx: &OpCtx, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let x = typed(ctx, inputs, 0, DType::F32)?;
    let g = conv_geo(ctx, x)?;
    let (w, bias) = weights(ctx, inputs, g.k())?;
    let act = act_from_ctx(ctx)?;
    let xv = x.view::<f32>()?;
    let params = static_params(ctx)?;
    let mul = x_mul(ctx, inputs, g.c, params.is_some())?;
    let (s, z) = match params {
        Some(p) => p,
        None => {
            let (lo, hi) = xv.iter().fold((0f32, 0f32), |(lo, hi), &v| (lo.min(v), hi.max(v)));
            qgemm::u8_params(lo, hi)
        }
    };
    let (hw, ohw) = (g.h * g.w, g.oh * g.ow);
    let mut shape = x.shape().to_vec();
    shape[1] = w.n;
    shape[2] = g.oh;
    shape[3] = g.ow;
    let kern = QKernel::for_isa(isa::active());
    let epi = QEpilogue { bias, act };
    let (scale, zero) = ([s], [z]);
    // Output and the quantized image come from the tensor pool and are written whole: no zero
    // fill, and no fresh pages on every call (both are megabytes in PP-OCR det).
    let mut nhwc = Buffer::recycled(hw * g.cp);
    let nhwc = nhwc.make_mut();
    let y = Tensor::filled_by::<f32>(DType::F32, &shape, |y| {
        for (img, yimg) in y.chunks_mut(w.n * ohw).enumerate() {
            quantize_nhwc(&xv[img * g.c * hw..(img + 1) * g.c * hw], &g, s, z, mul, nhwc);
            if g.pointwise() {
                let acts = QActs { data: nhwc, ld: g.cp, scale: &scale, zero: &zero };
                let out = qgemm::Out { data: yimg, rs: 1, cs: ohw };
                qgemm::qgemm_with(kern, ohw, acts, w, &epi, out, true)?;
                continue;
            }
            let k = g.k();
            let yp = YPtr(yimg.as_mut_ptr());
            let len = yimg.len();
            let chunks = ohw.div_ceil(PIXEL_CHUNK);
            let task = |rows: &mut Vec<u8>, t: usize| -> Result<()> {
                let p0 = t * PIXEL_CHUNK;
                let m = PIXEL_CHUNK.min(ohw - p0);
                rows.resize(m * k, 0);
                im2col_rows(&g, nhwc, z as u8, p0, rows);
                let acts = QActs { data: rows, ld: k, scale: &scale, zero: &zero };
                let yp = yp;
                // SAFETY: the output pointer covers this image; this task writes pixels p0..p0+m of
                // every channel, which no other task touches.
                unsafe { qgemm::qgemm_raw(kern, m, acts, w, &epi, yp.0.add(p0), len - p0, 1, ohw, false) }
            };
            if crate::cpu::par::threads() > 1 {
                (0..chunks).into_par_iter().try_for_each_init(Vec::new, task)?;
            } else {
                let mut rows = Vec::new();
                (0..chunks).try_for_each(|t| task(&mut rows, t))?;
            }
        }
        Ok(())
    })?;
    Ok(vec![y])
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_runtime::manifest::Attr;
    use crate::cpu::kernels::elementwise::testing::{rand_f32, run_kiln as run};

    fn int(name: &str, i: i64) -> Attr {
        Attr { name: name.into(), i, ..Default::default() }
    }

    fn ints(name: &str, v: &[i64]) -> Attr {
        Attr { name: name.into(), ints: v.to_vec(), ..Default::default() }
    }


    fn packed_inputs(q: &qgemm::QWeights, bias: &[f32]) -> Vec<Option<Tensor>> {
        vec![
            Some(Tensor::from_vec(&[q.packed.len()], q.packed.clone()).unwrap()),
            Some(Tensor::from_vec(&[q.n], q.scale.clone()).unwrap()),
            Some(Tensor::from_vec(&[q.n], q.sum.clone()).unwrap()),
            Some(Tensor::from_vec(&[q.n], bias.to_vec()).unwrap()),
        ]
    }

    /// Largest |got - want| relative to the largest |want|.
    fn rel_err(got: &[f32], want: &[f32]) -> f32 {
        let peak = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        got.iter().zip(want).fold(0f32, |m, (g, w)| m.max((g - w).abs())) / peak
    }

    #[test]
    fn matmul_int8_dynamic_and_static_match_float() {
        let (m, k, n) = (5, 70, 19);
        let a = rand_f32(m * k, 1, 1.0);
        let w = rand_f32(k * n, 2, 1.0);
        let bias = rand_f32(n, 3, 1.0);
        let mut want = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                want[i * n + j] = bias[j] + (0..k).map(|p| a[i * k + p] * w[p * n + j]).sum::<f32>();
            }
        }
        let q = qgemm::quantize_weights(&w, k, n, n, 1).unwrap();
        let mut ins = vec![Some(Tensor::from_vec(&[m, k], a.clone()).unwrap())];
        ins.extend(packed_inputs(&q, &bias));
        let dynamic = run("MatMulInt8", vec![int("k", k as i64)], ins.clone()).unwrap().remove(0);
        assert_eq!(dynamic.shape(), &[m, n]);
        assert!(rel_err(dynamic.view::<f32>().unwrap(), &want) < 0.02);
        let (s, z) = qgemm::u8_params(-1.0, 1.0);
        let attrs = vec![int("k", k as i64), Attr { name: "a_scale".into(), f: s, ..Default::default() }, int("a_zero", z as i64)];
        let fixed = run("MatMulInt8", attrs, ins.clone()).unwrap().remove(0);
        assert!(rel_err(fixed.view::<f32>().unwrap(), &want) < 0.02);
        // Wrong K for the packed weights is an error, not a panic.
        assert!(run("MatMulInt8", vec![int("k", 69)], ins).is_err());
    }

    /// Float reference convolution (NCHW, group 1), pads = [top, left, bottom, right].
    #[allow(clippy::too_many_arguments)]
    fn conv_ref(x: &[f32], c: usize, h: usize, wd: usize, wt: &[f32], co: usize, k: [usize; 2], st: [usize; 2], pads: [usize; 4], dil: [usize; 2], bias: &[f32]) -> (Vec<f32>, usize, usize) {
        let oh = (h + pads[0] + pads[2] - ((k[0] - 1) * dil[0] + 1)) / st[0] + 1;
        let ow = (wd + pads[1] + pads[3] - ((k[1] - 1) * dil[1] + 1)) / st[1] + 1;
        let mut want = vec![0f32; co * oh * ow];
        for o in 0..co {
            for y in 0..oh {
                for xx in 0..ow {
                    let mut acc = bias[o];
                    for ci in 0..c {
                        for ky in 0..k[0] {
                            for kx in 0..k[1] {
                                let iy = (y * st[0] + ky * dil[0]) as isize - pads[0] as isize;
                                let ix = (xx * st[1] + kx * dil[1]) as isize - pads[1] as isize;
                                if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < wd {
                                    acc += x[(ci * h + iy as usize) * wd + ix as usize] * wt[((o * c + ci) * k[0] + ky) * k[1] + kx];
                                }
                            }
                        }
                    }
                    want[(o * oh + y) * ow + xx] = acc;
                }
            }
        }
        (want, oh, ow)
    }

    /// ConvInt8 against the float reference on several geometries (asymmetric pads, strides
    /// per axis, dilation, 1-row images), with dynamic and static input ranges.
    #[test]
    fn conv_int8_matches_float_conv() {
        let cases: [(usize, usize, usize, usize, [usize; 2], [usize; 2], [usize; 4], [usize; 2]); 6] = [
            (3, 7, 6, 4, [3, 3], [1, 1], [1, 1, 1, 1], [1, 1]),
            (40, 1, 12, 6, [1, 3], [1, 1], [0, 1, 0, 1], [1, 1]),
            (9, 9, 8, 20, [3, 3], [2, 1], [1, 1, 1, 1], [1, 1]),
            (5, 8, 9, 3, [3, 3], [1, 2], [0, 2, 1, 0], [1, 1]),
            (6, 9, 9, 5, [3, 3], [1, 1], [2, 2, 2, 2], [2, 2]),
            (17, 5, 5, 33, [1, 1], [1, 1], [0, 0, 0, 0], [1, 1]),
        ];
        for (i, &(c, h, wd, co, k, st, pads, dil)) in cases.iter().enumerate() {
            let x = rand_f32(c * h * wd, 4 + i as u64, 1.0);
            let wt = rand_f32(co * c * k[0] * k[1], 5 + i as u64, 1.0);
            let bias = rand_f32(co, 6 + i as u64, 1.0);
            let (want, oh, ow) = conv_ref(&x, c, h, wd, &wt, co, k, st, pads, dil, &bias);
            // Weights as the kernel reads them: K = (ky·kw + kx)·cp + ci, zero for padded channels.
            let cp = qgemm::padded_k(c);
            let kk = k[0] * k[1] * cp;
            let mut wm = vec![0f32; kk * co];
            for o in 0..co {
                for ci in 0..c {
                    for t in 0..k[0] * k[1] {
                        wm[(t * cp + ci) * co + o] = wt[(o * c + ci) * k[0] * k[1] + t];
                    }
                }
            }
            let q = qgemm::quantize_weights(&wm, kk, co, co, 1).unwrap();
            let mut ins = vec![Some(Tensor::from_vec(&[1, c, h, wd], x.clone()).unwrap())];
            ins.extend(packed_inputs(&q, &bias));
            let geo = vec![
                ints("kernel_shape", &[k[0] as i64, k[1] as i64]),
                ints("strides", &[st[0] as i64, st[1] as i64]),
                ints("dilations", &[dil[0] as i64, dil[1] as i64]),
                ints("pads", &pads.map(|p| p as i64)),
                int("channels", c as i64),
            ];
            let y = run("ConvInt8", geo.clone(), ins.clone()).unwrap().remove(0);
            assert_eq!(y.shape(), &[1, co, oh, ow], "case {i}");
            let e = rel_err(y.view::<f32>().unwrap(), &want);
            assert!(e < 0.03, "case {i}: dynamic error {e}");
            // Static range plus a per-channel multiplier with its inverse folded into the weights.
            let mul: Vec<f32> = (0..c).map(|ci| 0.5 + ci as f32 * 0.37 % 2.0).collect();
            let wm2: Vec<f32> = wm.iter().enumerate().map(|(r, &v)| v / mul.get((r / co) % cp).copied().unwrap_or(1.0)).collect();
            let q2 = qgemm::quantize_weights(&wm2, kk, co, co, 1).unwrap();
            let peak = x.iter().zip((0..).map(|i| mul[(i / (h * wd)) % c])).fold(0f32, |m, (v, f)| m.max((v * f).abs()));
            let (s, z) = qgemm::u8_params(-peak, peak);
            let mut ins2 = vec![Some(Tensor::from_vec(&[1, c, h, wd], x.clone()).unwrap())];
            ins2.extend(packed_inputs(&q2, &bias));
            ins2.push(Some(Tensor::from_vec(&[c], mul).unwrap()));
            let mut attrs = geo;
            attrs.push(Attr { name: "a_scale".into(), f: s, ..Default::default() });
            attrs.push(int("a_zero", z as i64));
            let y2 = run("ConvInt8", attrs, ins2).unwrap().remove(0);
            let e2 = rel_err(y2.view::<f32>().unwrap(), &want);
            assert!(e2 < 0.03, "case {i}: static smoothed error {e2}");
        }
    }
}
