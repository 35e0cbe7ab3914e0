//! int8 quantization (`--quantize int8` and `int8-dynamic`): MatMul, Gemm and kiln.FusedMatMul
//! with constant weights become `kiln.MatMulInt8`, Conv and kiln.FusedConv (group 1, 2-D) become
//! `kiln.ConvInt8` (kernels in backends/src/cpu/kernels/qlinear.rs).
//!
//! Weights are quantized symmetrically per output channel to [-127, 127] and packed here, at
//! compile time, into the int8 GEMM's panel layout with their per-channel sums; bias and activation
//! move into the new node. For `int8` the u8 (scale, zero point) of each rewritten node's input
//! comes from the calibration set (`calibrate::ranges_scaled` under `--calibrator`, after
//! `--smoothing`) and is stored as the node's `a_scale` / `a_zero`, and the weights are rounded
//! with GPTQ (`gptq.rs`) unless `--int8-weights rtn`, then bias-corrected for the mean shift the
//! rounding causes (`corrected_bias`); `int8-dynamic` leaves the input parameters out, so the
//! kernel picks them per run.
//!
//! Layers where int8 costs accuracy for no gain stay float: depthwise and grouped convolutions
//! (tiny per-output dot products), and products with fewer than `MIN_K` terms.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};

use rayon::prelude::*;

use kiln_backends::cpu::qgemm::{self, QWeights};
use kiln_compiler::ir::{AttrValue, Attribute, Graph, Model, Node, ValueId};
use kiln_compiler::pass::Pass;
use kiln_runtime::{DType, Error, Result, Tensor};

use super::budget::{self, LayerId};
use super::calibrate::{self, ChannelAxis, ChannelStats, Samples};
use super::gptq::{self, Hessian};
use super::{CompressOptions, Quantize, Smoothing};

/// Products shorter than this stay float (quantization noise is not averaged out, and the GEMM
/// has nothing to gain).
const MIN_K: usize = 16;

const KILN: &str = "kiln";

pub fn pass(opts: &CompressOptions) -> Result<Box<dyn Pass>> {
    let dynamic = match opts.quantize {
        Some(Quantize::Int8Dynamic) => true,
        Some(Quantize::Int8) => false,
        q => return Err(Error::Other(format!("quant_int8::pass called for {q:?}"))),
    };
    if !dynamic && opts.calibration.is_none() {
        return Err(Error::Input("--quantize int8 needs --calibration DIR (or use int8-dynamic)".into()));
    }
    Ok(Box::new(QuantInt8 { dynamic, opts: opts.clone() }))
}

pub struct QuantInt8 {
    dynamic: bool,
    opts: CompressOptions,
}

/// A node to rewrite: its f32 input, the float weights, bias and the new node's attributes.
struct Plan {
    node: usize,
    /// The node's first output, which names the layer (stable while nodes are rewritten).
    layer: LayerId,
    op: &'static str,
    x: ValueId,
    /// Weights as the int8 GEMM multiplies them, row-major [k, n]. Row r reads input channel
    /// r % period (rows whose channel is >= `channels` are padding, zero).
    w: Vec<f32>,
    k: usize,
    n: usize,
    channels: usize,
    period: usize,
    axis: ChannelAxis,
    /// A convolution's geometry (None for MatMul, and for auto_pad convolutions, whose rows
    /// GPTQ does not rebuild).
    patch: Option<Patch>,
    bias: Option<Vec<f32>>,
    attrs: Vec<Attribute>,
}

/// Where a convolution's im2col rows read the input, for GPTQ's input statistics.
#[derive(Clone, Copy, Debug)]
struct Patch {
    kernel: [usize; 2],
    stride: [usize; 2],
    dilation: [usize; 2],
    /// Begin and end padding per spatial axis.
    pad: [usize; 4],
}

/// Input rows GPTQ takes from one sample of one layer: enough to estimate XᵀX, bounded so that
/// accumulating it stays cheap for large K.
fn rows_per_sample(k: usize) -> usize {
    (200_000_000 / (k * k).max(1)).clamp(64, 1024)
}

impl Plan {
    /// Up to `max` rows (evenly spread) of the matrix the int8 GEMM multiplies by the weights,
    /// built from an input tensor `x`, row-major [rows, k]; None if `x` does not fit.
    fn gemm_rows(&self, x: &Tensor, max: usize) -> Option<Vec<f32>> {
        let xv = x.view::<f32>().ok()?;
        let shape = x.shape();
        match self.patch {
            None => (shape.last() == Some(&self.k)).then(|| gptq::sample_rows(xv, self.k, max)),
            Some(p) => {
                let [n, c, h, w] = <[usize; 4]>::try_from(shape).ok()?;
                if c != self.channels {
                    return None;
                }
                let span = |i: usize| (p.kernel[i] - 1) * p.dilation[i] + 1;
                let oh = (h + p.pad[0] + p.pad[2]).checked_sub(span(0))? / p.stride[0] + 1;
                let ow = (w + p.pad[1] + p.pad[3]).checked_sub(span(1))? / p.stride[1] + 1;
                let total = n * oh * ow;
                let step = total.div_ceil(max).max(1);
                let mut rows = Vec::with_capacity(total.div_ceil(step) * self.k);
                for o in (0..total).step_by(step) {
                    let (img, oy, ox) = (o / (oh * ow), (o / ow) % oh, o % ow);
                    let start = rows.len();
                    rows.resize(start + self.k, 0.0);
                    for ky in 0..p.kernel[0] {
                        let iy = (oy * p.stride[0] + ky * p.dilation[0]) as isize - p.pad[0] as isize;
                        for kx in 0..p.kernel[1] {
                            let ix = (ox * p.stride[1] + kx * p.dilation[1]) as isize - p.pad[1] as isize;
                            if iy < 0 || ix < 0 || iy as usize >= h || ix as usize >= w {
                                continue;
                            }
                            let base = start + (ky * p.kernel[1] + kx) * self.period;
                            for ch in 0..c {
                                rows[base + ch] = xv[((img * c + ch) * h + iy as usize) * w + ix as usize];
                            }
                        }
                    }
                }
                Some(rows)
            }
        }
    }

    /// Largest |w| of each input channel.
    fn channel_absmax(&self) -> Vec<f32> {
        let mut m = vec![0f32; self.channels];
        for (r, row) in self.w.chunks_exact(self.n).enumerate() {
            if let Some(mc) = m.get_mut(r % self.period) {
                *mc = row.iter().fold(*mc, |a, v| a.max(v.abs()));
            }
        }
        m
    }

    /// The weights with row r divided by `mul[r % period]` (what smoothing multiplies the input by).
    fn smoothed(&self, mul: Option<&[f32]>) -> Cow<'_, [f32]> {
        match mul {
            Some(mul) => self
                .w
                .chunks_exact(self.n)
                .enumerate()
                .flat_map(|(r, row)| {
                    let f = mul.get(r % self.period).map_or(1.0, |m| 1.0 / m);
                    row.iter().map(move |v| v * f)
                })
                .collect(),
            None => Cow::Borrowed(&self.w),
        }
    }

    /// The packed int8 weights, and whether GPTQ rounded them (with `hess`, where it applies
    /// and H factors), else rounded to nearest.
    fn quantize(&self, mul: Option<&[f32]>, hess: Option<&Hessian>) -> Result<(QWeights, bool)> {
        match hess.and_then(|h| gptq::quantize(&self.w, self.k, self.n, h, mul, self.period)) {
            Some(q) => Ok((q?, true)),
            None => Ok((qgemm::quantize_weights(&self.smoothed(mul), self.k, self.n, self.n, 1)?, false)),
        }
    }
}

fn attr(name: &str, value: AttrValue) -> Attribute {
    Attribute { name: name.into(), value }
}

fn is_onnx(n: &Node) -> bool {
    n.domain.is_empty() || n.domain == "ai.onnx"
}

fn f32_const<'a>(g: &'a Graph, v: Option<ValueId>) -> Option<&'a Tensor> {
    g.konst(v?).filter(|t| t.dtype() == DType::F32)
}

fn is_f32(g: &Graph, v: ValueId) -> bool {
    g.values[v].ty.dtype() == Some(DType::F32)
}

/// The activation attributes of a fused node, carried over unchanged.
fn act_attrs(n: &Node) -> Vec<Attribute> {
    n.attrs.iter().filter(|a| a.name == "activation" || a.name == "activation_params").cloned().collect()
}

/// A bias of N values from a constant of shape [N], [1, N] or a scalar (times `beta`).
fn bias_vec(t: &Tensor, n: usize, beta: f32) -> Option<Vec<f32>> {
    let v = t.view::<f32>().ok()?;
    let lead_ones = t.shape().iter().rev().skip(1).all(|&d| d == 1);
    match v.len() {
        1 => Some(vec![v[0] * beta; n]),
        l if l == n && lead_ones => Some(v.iter().map(|x| x * beta).collect()),
        _ => None,
    }
}

/// Why a candidate node stays float, or how to rewrite it. `None`: not a candidate at all.
fn plan(g: &Graph, i: usize) -> Option<std::result::Result<Plan, &'static str>> {
    let n = &g.nodes[i];
    let x = n.input(0)?;
    let kind = match (is_onnx(n), n.domain.as_str(), n.op.as_str()) {
        (true, _, "MatMul") | (true, _, "Gemm") | (false, KILN, "FusedMatMul") => "MatMul",
        (true, _, "Conv") | (false, KILN, "FusedConv") => "Conv",
        _ => return None,
    };
    let w = f32_const(g, n.input(1))?;
    if !is_f32(g, x) {
        return Some(Err("input not f32"));
    }
    Some(if kind == "MatMul" { plan_matmul(g, i, x, w) } else { plan_conv(g, i, x, w) })
}

fn plan_matmul(g: &Graph, i: usize, x: ValueId, w: &Tensor) -> std::result::Result<Plan, &'static str> {
    let n = &g.nodes[i];
    if w.rank() != 2 {
        return Err("weight not 2-D");
    }
    let wv = w.view::<f32>().map_err(|_| "weight not f32")?;
    let gemm = n.op == "Gemm";
    let trans_b = gemm && n.attr_int("transB").unwrap_or(0) != 0;
    let (k, cols) = if trans_b { (w.shape()[1], w.shape()[0]) } else { (w.shape()[0], w.shape()[1]) };

    if k < MIN_K {
        return Err("tiny K");
    }
    if k > qgemm::MAX_K {
        return Err("K too large");
    }
    let x_rank = g.values[x].ty.shape().map(|s| s.len());
    let mut bias = None;
    let mut alpha = 1.0;
    if gemm {
        if n.attr_int("transA").unwrap_or(0) != 0 || x_rank != Some(2) {
            return Err("Gemm with transA or A not 2-D");
        }
        alpha = n.attr_float("alpha").unwrap_or(1.0);
        if let Some(c) = n.input(2) {
            let ct = f32_const(g, Some(c)).ok_or("Gemm C not a constant")?;
            bias = Some(bias_vec(ct, cols, n.attr_float("beta").unwrap_or(1.0)).ok_or("Gemm C not a row")?);
        }
    } else if n.op == "FusedMatMul" {
        if let Some(b) = n.input(2) {
            bias = Some(bias_vec(f32_const(g, Some(b)).ok_or("bias not a constant")?, cols, 1.0).ok_or("bias shape")?);
        }
    } else if x_rank.is_none_or(|r| r < 2) {
        // MatMul with a 1-D A drops a dim; leave that rare case to the float kernel.
        return Err("MatMul with A of unknown or 1-D shape");
    }
    if !wv.iter().all(|v| v.is_finite()) {
        return Err("weights not finite");
    }
    let w: Vec<f32> = if trans_b {
        (0..k * cols).map(|i| wv[(i % cols) * k + i / cols] * alpha).collect()
    } else {
        wv.iter().map(|v| v * alpha).collect()
    };
    let mut attrs = act_attrs(n);
    attrs.push(attr("k", AttrValue::Int(k as i64)));
    Ok(Plan { node: i, layer: n.output(0).ok_or("no output")?, op: "MatMulInt8", x, w, k, n: cols, channels: k, period: k, axis: ChannelAxis::Last, patch: None, bias, attrs })
}

fn plan_conv(g: &Graph, i: usize, x: ValueId, w: &Tensor) -> std::result::Result<Plan, &'static str> {
    let n = &g.nodes[i];
    if w.rank() != 4 || g.values[x].ty.shape().is_some_and(|s| s.len() != 4) {
        return Err("not a 2-D convolution");
    }
    if n.attr_int("group").unwrap_or(1) != 1 {
        return Err("grouped or depthwise");
    }
    let (m, c, kh, kw) = (w.shape()[0], w.shape()[1], w.shape()[2], w.shape()[3]);
    if c * kh * kw < MIN_K {
        return Err("tiny K");
    }
    let cp = qgemm::padded_k(c);
    let k = kh * kw * cp;
    if k > qgemm::MAX_K {
        return Err("K too large");
    }
    // Weight rows run over (ky, kx, channel padded to cp) to match the kernel's NHWC im2col.
    let wv = w.view::<f32>().map_err(|_| "weight not f32")?;
    let mut wk = vec![0f32; k * m];
    for j in 0..m {
        for ch in 0..c {
            for ky in 0..kh {
                for kx in 0..kw {
                    wk[((ky * kw + kx) * cp + ch) * m + j] = wv[((j * c + ch) * kh + ky) * kw + kx];
                }
            }
        }
    }
    if !wk.iter().all(|v| v.is_finite()) {
        return Err("weights not finite");
    }
    let bias = match n.input(2) {
        Some(b) => Some(bias_vec(f32_const(g, Some(b)).ok_or("bias not a constant")?, m, 1.0).ok_or("bias shape")?),
        None => None,
    };
    let mut attrs: Vec<Attribute> = n
        .attrs
        .iter()
        .filter(|a| matches!(a.name.as_str(), "strides" | "pads" | "dilations" | "auto_pad" | "activation" | "activation_params"))
        .cloned()
        .collect();
    attrs.push(attr("kernel_shape", AttrValue::Ints(vec![kh as i64, kw as i64])));
    attrs.push(attr("channels", AttrValue::Int(c as i64)));
    let ints = |name: &str, len: usize, default: usize| -> Option<Vec<usize>> {
        match n.attrs.iter().find(|a| a.name == name).map(|a| &a.value) {
            None => Some(vec![default; len]),
            Some(AttrValue::Ints(v)) if v.len() == len && v.iter().all(|&x| x >= 0) => Some(v.iter().map(|&x| x as usize).collect()),
            _ => None,
        }
    };
    let explicit = n.attr_str("auto_pad").is_none_or(|s| s == "NOTSET");
    let patch = match (explicit, ints("strides", 2, 1), ints("dilations", 2, 1), ints("pads", 4, 0)) {
        (true, Some(st), Some(d), Some(pd)) if st.iter().chain(&d).all(|&v| v > 0) => Some(Patch {
            kernel: [kh, kw],
            stride: [st[0], st[1]],
            dilation: [d[0], d[1]],
            pad: [pd[0], pd[1], pd[2], pd[3]],
        }),
        _ => None,
    };
    Ok(Plan { node: i, layer: n.output(0).ok_or("no output")?, op: "ConvInt8", x, w: wk, k, n: m, channels: c, period: cp, axis: ChannelAxis::Second, patch, bias, attrs })
}

/// How the int8 kernels quantize one input value (static int8).
#[derive(Clone, Debug)]
struct InputQ {
    scale: f32,
    zero: i32,
    /// Per-channel smoothing multipliers (1/s_c), when smoothing.
    mul: Option<Vec<f32>>,
}

/// What static int8 learned from the calibration set.
#[derive(Default)]
struct Calib {
    inputs: BTreeMap<ValueId, InputQ>,
}

/// SmoothQuant factors s_c = max|X_c|^α / max|W_c|^(1-α), returned as multipliers 1/s_c for
/// the activation. Channels with no signal on either side keep 1. The factors are bounded so
/// a dead channel does not blow up its weights.
fn smoothing_muls(x_max: &[f32], w_max: &[f32], alpha: f32) -> Vec<f32> {
    x_max
        .iter()
        .zip(w_max)
        .map(|(&xm, &wm)| {
            if !(xm > 0.0 && wm > 0.0) {
                return 1.0;
            }
            let s = xm.powf(alpha) / wm.powf(1.0 - alpha);
            if s.is_finite() && s > 0.0 { 1.0 / s.clamp(1e-4, 1e4) } else { 1.0 }
        })
        .collect()
}

/// The strengths `--smoothing auto` weighs against no smoothing.
const AUTO_ALPHAS: [f32; 5] = [0.3, 0.5, 0.6, 0.75, 0.9];

/// Estimated squared error, summed over the outputs of every consumer, of quantizing the input
/// (per tensor, u8) and the weights (per output column, int8) after smoothing with `mul`: each
/// is uniform rounding noise of step²/12, carried through the product by the other operand's
/// second moment. Clipping is ignored; the estimate only ranks the choices for one input.
fn noise_estimate(st: &ChannelStats, consumers: &[&Plan], mul: &[f32]) -> f64 {
    let hi = st.absmax.iter().zip(mul).fold(0f64, |h, (&x, &m)| h.max((x * m) as f64));
    let step_x = if st.min >= 0.0 { hi / 255.0 } else { 2.0 * hi / 255.0 };
    let (mut w_sq, mut from_w) = (0f64, 0f64);
    for p in consumers {
        let mut col_max = vec![0f64; p.n];
        let mut x_sq = 0f64;
        for (r, row) in p.w.chunks_exact(p.n).enumerate() {
            let c = r % p.period;
            if c >= p.channels {
                continue;
            }
            let f = 1.0 / mul[c] as f64;
            x_sq += st.mean_sq[c] * (mul[c] as f64).powi(2);
            for (cm, &w) in col_max.iter_mut().zip(row) {
                let w = w as f64 * f;
                *cm = cm.max(w.abs());
                w_sq += w * w;
            }
        }
        from_w += col_max.iter().map(|m| (m / 127.0).powi(2) / 12.0).sum::<f64>() * x_sq;
    }
    w_sq * step_x * step_x / 12.0 + from_w
}

/// `p`'s bias corrected for the mean shift of its rounded weights `w` (`gptq::corrected_bias`).
fn corrected_bias(p: &Plan, w: &QWeights, hess: &Hessian, mul: Option<&[f32]>) -> Option<Vec<f32>> {
    if w.k != p.k || w.n != p.n {
        return p.bias.clone();
    }
    // The dequantized weights in the input's own domain (smoothing divided rows by mul).
    let deq: Vec<f32> = w
        .unpacked()
        .chunks_exact(p.n)
        .enumerate()
        .flat_map(|(r, row)| {
            let m = mul.and_then(|m| m.get(r % p.period)).map_or(1.0, |&v| v);
            row.iter().zip(&w.scale).map(move |(&q, &s)| q as f32 * s * m)
        })
        .collect();
    gptq::corrected_bias(p.bias.as_deref(), &p.w, &deq, p.n, hess).or_else(|| p.bias.clone())
}

impl QuantInt8 {
    /// Smoothing multipliers for each planned input value, as `--smoothing` asks.
    fn smoothing(&self, model: &Model, samples: &Samples, plans: &[Plan]) -> Result<HashMap<ValueId, (ChannelAxis, Vec<f32>)>> {
        let mut out = HashMap::new();
        if self.opts.smoothing == Smoothing::Off {
            return Ok(out);
        }
        // One set of factors per input value: its consumers (e.g. Q, K and V) share it. Values
        // whose consumers disagree on where the channels are stay unsmoothed.
        let mut by_x: BTreeMap<ValueId, Vec<&Plan>> = BTreeMap::new();
        for p in plans {
            by_x.entry(p.x).or_default().push(p);
        }
        by_x.retain(|_, ps| ps.iter().all(|p| p.axis == ps[0].axis && p.channels == ps[0].channels));
        let axes: Vec<(ValueId, ChannelAxis)> = by_x.iter().map(|(&x, ps)| (x, ps[0].axis)).collect();
        let stats = calibrate::channel_stats(model, samples, &axes)?;
        for (x, ps) in by_x {
            let Some(st) = stats.get(&x).filter(|st| st.absmax.len() == ps[0].channels) else { continue };
            let mut w_max = vec![0f32; ps[0].channels];
            for p in &ps {
                w_max.iter_mut().zip(p.channel_absmax()).for_each(|(a, b)| *a = a.max(b));
            }
            let chosen = match self.opts.smoothing {
                Smoothing::Alpha(a) => Some(smoothing_muls(&st.absmax, &w_max, a)),
                _ => {
                    let none = vec![1f32; w_max.len()];
                    let mut best = (noise_estimate(st, &ps, &none), None);
                    for a in AUTO_ALPHAS {
                        let m = smoothing_muls(&st.absmax, &w_max, a);
                        let e = noise_estimate(st, &ps, &m);
                        if e < best.0 {
                            best = (e, Some(m));
                        }
                    }
                    best.1
                }
            };
            if let Some(m) = chosen {
                out.insert(x, (ps[0].axis, m));
            }
        }
        Ok(out)
    }

    /// Input statistics (GPTQ's second moments, and the means for bias correction) of every
    /// planned layer whose rows can be rebuilt (MatMul, explicit-pad convolutions).
    fn hessians(&self, model: &Model, samples: &Samples, plans: &[Plan]) -> Result<HashMap<LayerId, Hessian>> {
        let chosen: Vec<&Plan> = plans.iter().filter(|p| p.patch.is_some() || p.axis == ChannelAxis::Last).collect();
        let watch: Vec<gptq::Watch<LayerId>> = chosen.iter().map(|p| gptq::Watch { layer: p.layer, x: p.x, k: p.k }).collect();
        gptq::hessians(model, samples, &watch, |i, t| chosen[i].gemm_rows(t, rows_per_sample(chosen[i].k)))
    }

    /// The calibrated u8 parameters (and smoothing) of every planned node's input.
    fn calibrate(&self, model: &Model, samples: &Samples, plans: &[Plan]) -> Result<(Calib, usize)> {
        let mut watch: Vec<ValueId> = plans.iter().map(|p| p.x).collect();
        watch.sort_unstable();
        watch.dedup();
        let mut muls = self.smoothing(model, samples, plans)?;
        let ranges = calibrate::ranges_scaled(model, samples, &watch, self.opts.calibrator, &muls)?;
        let smoothed = muls.len();
        let params = watch
            .iter()
            .map(|&v| {
                let &(lo, hi) = ranges.get(&v).ok_or_else(|| {
                    Error::Other(format!("calibration saw no values of '{}'", model.graph.values[v].name))
                })?;
                let (scale, zero) = qgemm::u8_params(lo, hi);
                Ok((v, InputQ { scale, zero, mul: muls.remove(&v).map(|m| m.1) }))
            })
            .collect::<Result<BTreeMap<_, _>>>()?;
        Ok((Calib { inputs: params }, smoothed))
    }
}

/// A layer's int8 weights and its bias (bias-corrected for static int8).
struct Rounded {
    w: QWeights,
    bias: Option<Vec<f32>>,
}

/// Rewrite the planned nodes whose layer is in `layers` with their quantized `weights`;
/// returns (MatMul, Conv) counts. Static input parameters come from `calib` (empty for
/// int8-dynamic).
fn rewrite(model: &mut Model, plans: &[Plan], weights: &HashMap<LayerId, Rounded>, layers: &[LayerId], calib: &Calib) -> Result<(usize, usize)> {
    let chosen: HashSet<LayerId> = layers.iter().copied().collect();
    let g = &mut model.graph;
    let (mut mm, mut conv) = (0, 0);
    for p in plans.iter().filter(|p| chosen.contains(&p.layer)) {
        let base = g.nodes[p.node].name.clone();
        let iq = calib.inputs.get(&p.x);
        let r = weights.get(&p.layer).ok_or_else(|| Error::Other(format!("int8: no weights for '{base}'")))?;
        let w = &r.w;
        let n = w.n;
        let packed = g.add_const(format!("{base}.w_int8"), Tensor::from_vec(&[w.packed.len()], w.packed.clone())?);
        let scale = g.add_const(format!("{base}.w_scale"), Tensor::from_vec(&[n], w.scale.clone())?);
        let sum = g.add_const(format!("{base}.w_sum"), Tensor::from_vec(&[n], w.sum.clone())?);
        let bias = r.bias.clone().map(|b| Tensor::from_vec(&[n], b)).transpose()?.map(|b| g.add_const(format!("{base}.bias"), b));
        let mut attrs = p.attrs.clone();
        let mut inputs = vec![Some(p.x), Some(packed), Some(scale), Some(sum), bias];
        if let Some(q) = iq {
            attrs.push(attr("a_scale", AttrValue::Float(q.scale)));
            attrs.push(attr("a_zero", AttrValue::Int(q.zero as i64)));
            if let Some(m) = &q.mul {
                inputs.push(Some(g.add_const(format!("{base}.x_mul"), Tensor::from_vec(&[m.len()], m.clone())?)));
            }
        }
        let node = &mut g.nodes[p.node];
        node.op = p.op.into();
        node.domain = KILN.into();
        node.opset = 1;
        node.inputs = inputs;
        node.outputs.truncate(1);
        node.attrs = attrs;
        if p.op == "ConvInt8" { conv += 1 } else { mm += 1 }
    }
    Ok((mm, conv))
}

impl Pass for QuantInt8 {
    fn name(&self) -> &'static str {
        if self.dynamic { "quant-int8-dynamic" } else { "quant-int8" }
    }

    fn run(&self, model: &mut Model) -> Result<(usize, Vec<String>)> {
        let mut plans = Vec::new();
        let mut kept: BTreeMap<&'static str, usize> = BTreeMap::new();
        let planned: Vec<_> = (0..model.graph.nodes.len()).map(|i| (i, plan(&model.graph, i))).collect();
        let quantizable: Vec<usize> = planned.iter().filter(|(_, p)| matches!(p, Some(Ok(_)))).map(|(i, _)| *i).collect();
        self.opts.check_keep_float(&model.graph, &quantizable)?;
        for (i, planned) in planned {
            match planned {
                Some(Ok(_)) if self.opts.keeps_float(&model.graph, i) => *kept.entry("by --keep-float").or_default() += 1,
                Some(Ok(p)) => plans.push(p),
                Some(Err(why)) => *kept.entry(why).or_default() += 1,
                None => {}
            }
        }
        let samples = match &self.opts.calibration {
            Some(dir) if !plans.is_empty() && (!self.dynamic || self.opts.accuracy_budget.is_some()) => {
                let s = calibrate::load_samples(dir, model)?;
                if s.is_empty() {
                    return Err(Error::Input(format!("no calibration samples in {}", dir.display())));
                }
                Some(s)
            }
            Some(_) => None,
            None if self.dynamic => None,
            None => return Err(Error::Input("--quantize int8 needs --calibration DIR".into())),
        };
        let (calib, smoothed) = match (&samples, self.dynamic) {
            (Some(s), false) => self.calibrate(model, s, &plans)?,
            _ => (Calib::default(), 0),
        };
        // Every layer's weights once (GPTQ needs the statistics; layers in parallel, each
        // factorises its own K×K matrix): the accuracy budget rewrites layers many times.
        let stats = match (&samples, self.dynamic) {
            (Some(s), false) if self.opts.int8_gptq || self.opts.bias_correction => self.hessians(model, s, &plans)?,
            _ => HashMap::new(),
        };
        let rounded: Vec<(Rounded, bool)> = plans
            .par_iter()
            .map(|p| {
                let mul = calib.inputs.get(&p.x).and_then(|q| q.mul.as_deref());
                let st = stats.get(&p.layer);
                let (w, gptq) = p.quantize(mul, st.filter(|_| self.opts.int8_gptq))?;
                let bias = match st {
                    Some(h) if self.opts.bias_correction => corrected_bias(p, &w, h, mul),
                    _ => p.bias.clone(),
                };
                Ok((Rounded { w, bias }, gptq))
            })
            .collect::<Result<_>>()?;
        let gptq_layers = rounded.iter().filter(|r| r.1).count();
        let corrected = plans.iter().filter(|p| self.opts.bias_correction && stats.contains_key(&p.layer)).count();
        let weights: HashMap<LayerId, Rounded> = plans.iter().map(|p| p.layer).zip(rounded.into_iter().map(|r| r.0)).collect();
        let layers: Vec<LayerId> = plans.iter().map(|p| p.layer).collect();
        let mut notes = Vec::new();
        let keep_float = match (self.opts.accuracy_budget, &samples) {
            (Some(b), Some(s)) => {
                let q = |m: &mut Model, l: &[LayerId]| rewrite(m, &plans, &weights, l, &calib).map(|_| ());
                let sel = budget::select(model, s, &layers, &q, b)?;
                notes.extend(budget::table(&sel));
                sel.kept_float
            }
            _ => Vec::new(),
        };
        let chosen: Vec<LayerId> = layers.iter().copied().filter(|l| !keep_float.contains(l)).collect();
        let (mm, conv) = rewrite(model, &plans, &weights, &chosen, &calib)?;
        notes.push(format!(
            "{}: quantized {} layers ({mm} MatMul/Gemm, {conv} Conv)",
            self.name(),
            mm + conv
        ));
        if gptq_layers > 0 {
            notes.push(format!("GPTQ weight rounding: {gptq_layers} layers (the rest rounded to nearest)"));
        }
        if corrected > 0 {
            notes.push(format!("bias correction: {corrected} layers"));
        }
        if smoothed > 0 {
            notes.push(format!("smoothing ({:?}): {smoothed} of the layers' input values smoothed", self.opts.smoothing));
        }
        if !keep_float.is_empty() {
            *kept.entry("by the accuracy budget").or_default() += keep_float.len();
        }
        let kept_total: usize = kept.values().sum();
        if kept_total > 0 {
            let why: Vec<String> = kept.iter().map(|(w, c)| format!("{c} {w}")).collect();
            notes.push(format!("kept {kept_total} layers in float: {}", why.join(", ")));
        }
        Ok((mm + conv, notes))
    }
}
