//! int8 quantization (`--quantize int8` and `int8-dynamic`): MatMul, Gemm and kiln.FusedMatMul
//! with constant weights become `kiln.MatMulInt8`, Conv and kiln.FusedConv (group 1, 2-D) become
//! `kiln.ConvInt8` (kernels in backends/src/cpu/kernels/qlinear.rs).
//!
//! Weights are quantized symmetrically per output channel to [-127, 127] and packed here, at
//! compile time, into the int8 GEMM's panel layout with their per-channel sums; bias and activation
//! move into the new node. For `int8` the u8 (scale, zero point) of each rewritten node's input
//! comes from the calibration set (`calibrate::ranges` under `--calibrator`) and is stored as the
//! node's `a_scale` / `a_zero`; `int8-dynamic` leaves them out, so the kernel picks them per run.
//!
//! Layers where int8 costs accuracy for no gain stay float: depthwise and grouped convolutions
//! (tiny per-output dot products), and products with fewer than `MIN_K` terms.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;

use kiln_backends::cpu::qgemm::{self, QWeights};
use kiln_compiler::ir::{AttrValue, Attribute, Graph, Model, Node, ValueId};
use kiln_compiler::pass::Pass;
use kiln_runtime::{DType, Error, Result, Tensor};

use super::{calibrate, Calibrator, CompressOptions, Quantize};

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
    Ok(Box::new(QuantInt8 { dynamic, calibration: opts.calibration.clone(), calibrator: opts.calibrator }))
}

pub struct QuantInt8 {
    dynamic: bool,
    calibration: Option<PathBuf>,
    calibrator: Calibrator,
}

/// A node to rewrite: its f32 input, the quantized weights, bias and the new node's attributes.
struct Plan {
    node: usize,
    op: &'static str,
    x: ValueId,
    w: QWeights,
    bias: Option<Vec<f32>>,
    attrs: Vec<Attribute>,
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
    let (rs, cs) = if trans_b { (1, k) } else { (cols, 1) };
    if k < MIN_K {
        return Err("tiny K");
    }
    if k > qgemm::MAX_K {
        return Err("K too large");
    }
    let x_rank = g.values[x].ty.shape().map(|s| s.len());
    let mut bias = None;
    let mut scaled;
    let mut wdata = wv;
    if gemm {
        if n.attr_int("transA").unwrap_or(0) != 0 || x_rank != Some(2) {
            return Err("Gemm with transA or A not 2-D");
        }
        let alpha = n.attr_float("alpha").unwrap_or(1.0);
        if alpha != 1.0 {
            scaled = wv.to_vec();
            scaled.iter_mut().for_each(|v| *v *= alpha);
            wdata = &scaled;
        }
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
    let q = qgemm::quantize_weights(wdata, k, cols, rs, cs).map_err(|_| "weights not finite")?;
    let mut attrs = act_attrs(n);
    attrs.push(attr("k", AttrValue::Int(k as i64)));
    Ok(Plan { node: i, op: "MatMulInt8", x, w: q, bias, attrs })
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
    let q = qgemm::quantize_weights(&wk, k, m, m, 1).map_err(|_| "weights not finite")?;
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
    Ok(Plan { node: i, op: "ConvInt8", x, w: q, bias, attrs })
}

impl QuantInt8 {
    /// The calibrated u8 (scale, zero point) of every planned node's input.
    fn calibrate(&self, model: &Model, plans: &[Plan]) -> Result<BTreeMap<ValueId, (f32, i32)>> {
        let dir = self.calibration.as_ref().ok_or_else(|| Error::Input("--quantize int8 needs --calibration DIR".into()))?;
        let samples = calibrate::load_samples(dir, model)?;
        if samples.is_empty() {
            return Err(Error::Input(format!("no calibration samples in {}", dir.display())));
        }
        let mut watch: Vec<ValueId> = plans.iter().map(|p| p.x).collect::<HashSet<_>>().into_iter().collect();
        watch.sort_unstable();
        let ranges = calibrate::ranges(model, &samples, &watch, self.calibrator)?;
        watch
            .iter()
            .map(|&v| {
                let &(lo, hi) = ranges.get(&v).ok_or_else(|| {
                    Error::Other(format!("calibration saw no values of '{}'", model.graph.values[v].name))
                })?;
                Ok((v, qgemm::u8_params(lo, hi)))
            })
            .collect()
    }
}

impl Pass for QuantInt8 {
    fn name(&self) -> &'static str {
        if self.dynamic { "quant-int8-dynamic" } else { "quant-int8" }
    }

    fn run(&self, model: &mut Model) -> Result<(usize, Vec<String>)> {
        let mut plans = Vec::new();
        let mut kept: BTreeMap<&'static str, usize> = BTreeMap::new();
        for i in 0..model.graph.nodes.len() {
            match plan(&model.graph, i) {
                Some(Ok(p)) => plans.push(p),
                Some(Err(why)) => *kept.entry(why).or_default() += 1,
                None => {}
            }
        }
        let params = if self.dynamic || plans.is_empty() { BTreeMap::new() } else { self.calibrate(model, &plans)? };
        let (mut mm, mut conv) = (0, 0);
        let g = &mut model.graph;
        for p in plans {
            let base = g.nodes[p.node].name.clone();
            let n = p.w.n;
            let packed = g.add_const(format!("{base}.w_int8"), Tensor::from_vec(&[p.w.packed.len()], p.w.packed)?);
            let scale = g.add_const(format!("{base}.w_scale"), Tensor::from_vec(&[n], p.w.scale)?);
            let sum = g.add_const(format!("{base}.w_sum"), Tensor::from_vec(&[n], p.w.sum)?);
            let bias = p.bias.map(|b| Tensor::from_vec(&[n], b)).transpose()?.map(|b| g.add_const(format!("{base}.bias"), b));
            let mut attrs = p.attrs;
            if let Some(&(s, z)) = params.get(&p.x) {
                attrs.push(attr("a_scale", AttrValue::Float(s)));
                attrs.push(attr("a_zero", AttrValue::Int(z as i64)));
            }
            let node = &mut g.nodes[p.node];
            node.op = p.op.into();
            node.domain = KILN.into();
            node.opset = 1;
            node.inputs = vec![Some(p.x), Some(packed), Some(scale), Some(sum), bias];
            node.outputs.truncate(1);
            node.attrs = attrs;
            if p.op == "ConvInt8" { conv += 1 } else { mm += 1 }
        }
        let mut notes = vec![format!(
            "{}: quantized {} layers ({mm} MatMul/Gemm, {conv} Conv)",
            self.name(),
            mm + conv
        )];
        let kept_total: usize = kept.values().sum();
        if kept_total > 0 {
            let why: Vec<String> = kept.iter().map(|(w, c)| format!("{c} {w}")).collect();
            notes.push(format!("kept {kept_total} layers in float: {}", why.join(", ")));
        }
        Ok((mm + conv, notes))
    }
}
