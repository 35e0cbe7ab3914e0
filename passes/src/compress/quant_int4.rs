//! `--quantize int4`: weight-only int4, block-wise along the reduction axis.
//!
//! Rewrites every MatMul / Gemm / kiln.FusedMatMul whose weight is a constant f32 matrix into
//! `kiln.MatMulInt4` (bias and activation kept in its epilogue), and every Gather from a constant
//! f32 `[rows, dim]` table along axis 0 into `kiln.GatherInt4` (the embedding table is most of a
//! small transformer). The format and kernels are in kiln-backends' `cpu::kernels::int4`.
//!
//! `--int4-method rtn` rounds each block to nearest. `awq` first makes the model easier to round
//! (activation-aware weight quantization): from the calibration data it takes each input
//! channel's mean |x| of a MatMul's activation, and for every group of MatMuls reading the same
//! activation searches the exponent alpha in [0, 1] of channel scales s = mean|x|^alpha that
//! minimises the group's output error on calibration rows once the weights diag(s)·W are rounded.
//! The scaled weights replace W and the activation is divided by s, folded into the producing
//! LayerNormalization when the group is its only reader, else by an inserted Mul (exact in float).
//! `gptq` rounds each MatMul weight with GPTQ (`gptq.rs`) against its input's second moments on
//! the calibration data; tables are rounded to nearest (a Gather has no product to compensate
//! within). `--accuracy-budget` keeps the most sensitive layers in float (see `budget`).

use std::collections::HashMap;

use kiln_backends::cpu::gemm::{self, BRef, Epilogue, MatRef};
use kiln_backends::cpu::kernels::int4::{dequantize_matmul, quantize_matmul, quantize_table, Int4Format, Int4Weight};
use rayon::prelude::*;
use kiln_compiler::ir::{AttrValue, Attribute, Graph, Model, Node, ValueId};
use kiln_compiler::pass::Pass;
use kiln_runtime::{DType, Error, Result, Tensor};

use super::budget::{self, LayerId};
use super::gptq;
use super::calibrate::{load_samples, observe, Samples};
use super::{CompressOptions, Int4Method};

/// Weights smaller than this stay in float: the saving is negligible and tiny tables (token
/// types) or projections are the most sensitive.
const MIN_ELEMENTS: usize = 4096;
/// Calibration rows per activation kept for the AWQ error search.
const AWQ_ROWS: usize = 256;
/// Calibration rows per sample and layer for GPTQ's input statistics.
const GPTQ_ROWS: usize = 1024;
/// Steps of the alpha grid over [0, 1].
const AWQ_GRID: usize = 20;
/// Embedding tables use blocks of at most this many: a table row feeds the model directly
/// (no averaging over K as in a product), so its rounding error matters most (measured on
/// MiniLM: the word embedding is the most sensitive layer by far).
const TABLE_BLOCK_MAX: usize = 16;

pub fn pass(opts: &CompressOptions) -> Result<Box<dyn Pass>> {
    Ok(Box::new(QuantizeInt4 { opts: opts.clone() }))
}

struct QuantizeInt4 {
    opts: CompressOptions,
}

impl QuantizeInt4 {
    fn format(&self) -> Int4Format {
        Int4Format { block: self.opts.block_size, zero_points: self.opts.int4_zero_points, f16_scales: self.opts.int4_f16_scales }
    }
}

impl Pass for QuantizeInt4 {
    fn name(&self) -> &'static str {
        "quantize-int4"
    }

    fn run(&self, model: &mut Model) -> Result<(usize, Vec<String>)> {
        let fmt = self.format();
        let mut notes = Vec::new();
        // Candidate nodes and their layers, once: AWQ below rescales weights but keeps both.
        let targets: Vec<(usize, LayerId)> = candidates(&model.graph).iter().map(|c| (c.node, c.layer)).collect();
        let nodes: Vec<usize> = targets.iter().map(|t| t.0).collect();
        self.opts.check_keep_float(&model.graph, &nodes)?;
        let samples = match &self.opts.calibration {
            Some(dir) if self.opts.int4_method != Int4Method::Rtn || self.opts.accuracy_budget.is_some() => {
                Some(load_samples(dir, model)?)
            }
            _ => None,
        };
        if self.opts.int4_method == Int4Method::Awq {
            let s = samples.as_ref().ok_or_else(|| Error::Input("--int4-method awq needs --calibration DIR".into()))?;
            notes.extend(awq(model, s, &fmt)?);
        }
        let gptq = if self.opts.int4_method == Int4Method::Gptq {
            let s = samples.as_ref().ok_or_else(|| Error::Input("--int4-method gptq needs --calibration DIR".into()))?;
            gptq_weights(model, s, &fmt, self.opts.bias_correction)?
        } else {
            HashMap::new()
        };
        if self.opts.int4_method == Int4Method::Gptq {
            notes.push(format!("GPTQ rounding: {} MatMul-like layers (tables rounded to nearest)", gptq.len()));
        }
        let layers: Vec<LayerId> = targets.iter().filter(|t| !self.opts.keeps_float(&model.graph, t.0)).map(|t| t.1).collect();
        if layers.len() < targets.len() {
            notes.push(format!("kept {} layers in float by --keep-float", targets.len() - layers.len()));
        }
        let keep_float = match (self.opts.accuracy_budget, &samples) {
            (Some(b), Some(s)) => {
                let q = |m: &mut Model, l: &[LayerId]| quantize_layers(m, l, &fmt, &gptq).map(|_| ());
                let sel = budget::select(model, s, &layers, &q, b)?;
                notes.extend(budget::table(&sel));
                sel.kept_float
            }
            _ => Vec::new(),
        };
        let chosen: Vec<LayerId> = layers.into_iter().filter(|l| !keep_float.contains(l)).collect();
        let st = quantize_layers(model, &chosen, &fmt, &gptq)?;
        notes.push(format!(
            "int4 ({}, block {}, {} scales{}): {} MatMul-like and {} Gather layers, weights {:.2} MB -> {:.2} MB (saved {:.2} MB)",
            match self.opts.int4_method {
                Int4Method::Rtn => "rtn",
                Int4Method::Awq => "awq",
                Int4Method::Gptq => "gptq",
            },
            fmt.block,
            if fmt.f16_scales { "f16" } else { "f32" },
            if fmt.zero_points { ", zero points" } else { "" },
            st.matmuls,
            st.gathers,
            st.bytes_before as f64 / 1e6,
            st.bytes_after as f64 / 1e6,
            (st.bytes_before as f64 - st.bytes_after as f64) / 1e6
        ));
        Ok((st.matmuls + st.gathers, notes))
    }
}

// ---------------------------------------------------------------------------------------------
// Candidates
// ---------------------------------------------------------------------------------------------

/// What a quantizable node computes, in the terms of the int4 ops.
enum Kind {
    /// `act(A · W + bias)`, W row-major `[k, n]`.
    MatMul { a: ValueId, w: Vec<f32>, k: usize, n: usize, bias: Option<Vec<f32>>, act: Vec<Attribute> },
    /// Rows of a `[rows, dim]` table.
    Gather { table: ValueId, indices: ValueId, rows: usize, dim: usize },
}

struct Candidate {
    node: usize,
    layer: LayerId,
    kind: Kind,
}

fn is_onnx(n: &Node) -> bool {
    n.domain.is_empty() || n.domain == "ai.onnx"
}

/// A constant f32 input, aligned (weights imported from ONNX share the file's bytes, which need
/// not be aligned for f32 views).
fn f32_const(g: &Graph, v: Option<ValueId>) -> Option<Tensor> {
    g.konst(v?).filter(|t| t.dtype() == DType::F32).map(|t| t.clone().aligned())
}

fn is_f32(g: &Graph, v: ValueId) -> bool {
    g.values[v].ty.dtype() == Some(DType::F32)
}

/// Every quantizable node of `g` (top level only), in node order.
fn candidates(g: &Graph) -> Vec<Candidate> {
    g.nodes.iter().enumerate().filter_map(|(i, n)| Some(Candidate { node: i, layer: n.output(0)?, kind: kind_of(g, n)? })).collect()
}

fn kind_of(g: &Graph, n: &Node) -> Option<Kind> {
    match (is_onnx(n), n.domain.as_str(), n.op.as_str()) {
        (true, _, "MatMul") => {
            let w = f32_const(g, n.input(1)).filter(|w| w.rank() == 2)?;
            matmul_kind(g, n.input(0)?, w.view::<f32>().ok()?.to_vec(), w.shape()[0], w.shape()[1], None, vec![])
        }
        (true, _, "Gemm") => gemm_kind(g, n),
        (false, "kiln", "FusedMatMul") => {
            let w = f32_const(g, n.input(1)).filter(|w| w.rank() == 2)?;
            let (k, nn) = (w.shape()[0], w.shape()[1]);
            let bias = match n.input(2) {
                Some(b) => Some(f32_const(g, Some(b)).filter(|b| b.len() == nn)?.view::<f32>().ok()?.to_vec()),
                None => None,
            };
            let act = n.attrs.iter().filter(|a| a.name.starts_with("activation")).cloned().collect();
            matmul_kind(g, n.input(0)?, w.view::<f32>().ok()?.to_vec(), k, nn, bias, act)
        }
        (true, _, "Gather") => {
            let t = g.konst(n.input(0)?).filter(|t| t.dtype() == DType::F32 && t.rank() == 2 && t.len() >= MIN_ELEMENTS)?;
            let axis = n.attr_int("axis").unwrap_or(0);
            let indices = n.input(1)?;
            let int_idx = matches!(g.values[indices].ty.dtype(), Some(DType::I64 | DType::I32));
            ((axis == 0 || axis == -2) && int_idx && n.outputs.len() == 1)
                .then(|| Kind::Gather { table: n.input(0).unwrap(), indices, rows: t.shape()[0], dim: t.shape()[1] })
        }
        _ => None,
    }
}

fn matmul_kind(g: &Graph, a: ValueId, w: Vec<f32>, k: usize, n: usize, bias: Option<Vec<f32>>, act: Vec<Attribute>) -> Option<Kind> {
    (is_f32(g, a) && k * n >= MIN_ELEMENTS && k >= 16).then_some(Kind::MatMul { a, w, k, n, bias, act })
}

/// Gemm(A, B, C) with constant B as `alpha·op(B)` and a constant C broadcast along rows as bias.
fn gemm_kind(g: &Graph, n: &Node) -> Option<Kind> {
    if n.attr_int("transA").unwrap_or(0) != 0 {
        return None;
    }
    let b = f32_const(g, n.input(1)).filter(|b| b.rank() == 2)?;
    let bv = b.view::<f32>().ok()?;
    let alpha = n.attr_float("alpha").unwrap_or(1.0);
    let beta = n.attr_float("beta").unwrap_or(1.0);
    let (k, nn, w) = if n.attr_int("transB").unwrap_or(0) != 0 {
        let (nn, k) = (b.shape()[0], b.shape()[1]);
        let mut w = vec![0f32; k * nn];
        for j in 0..nn {
            for kk in 0..k {
                w[kk * nn + j] = alpha * bv[j * k + kk];
            }
        }
        (k, nn, w)
    } else {
        (b.shape()[0], b.shape()[1], bv.iter().map(|x| alpha * x).collect())
    };
    let bias = match n.input(2) {
        None => None,
        Some(c) => {
            let c = f32_const(g, Some(c))?;
            let cv = c.view::<f32>().ok()?;
            // Only a C that is the same for every row: a scalar or [N] / [1, N].
            if cv.len() == 1 {
                Some(vec![beta * cv[0]; nn])
            } else if cv.len() == nn && c.shape().last() == Some(&nn) {
                Some(cv.iter().map(|x| beta * x).collect())
            } else {
                return None;
            }
        }
    };
    matmul_kind(g, n.input(0)?, w, k, nn, bias, vec![])
}

// ---------------------------------------------------------------------------------------------
// Rewriting
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct Stats {
    matmuls: usize,
    gathers: usize,
    bytes_before: usize,
    bytes_after: usize,
}

fn int_attr(name: &str, v: usize) -> Attribute {
    Attribute { name: name.into(), value: AttrValue::Int(v as i64) }
}

/// A MatMul's GPTQ-rounded weights and its bias corrected for their mean output shift
/// (`gptq::corrected_bias`; None: no bias and no correction).
#[derive(Clone)]
struct Rounded {
    w: Int4Weight,
    bias: Option<Vec<f32>>,
}

/// GPTQ-rounded weights of every MatMul-like candidate (computed once, layers in parallel: the
/// accuracy budget rewrites layers many times).
fn gptq_weights(model: &Model, s: &Samples, fmt: &Int4Format, bias_correction: bool) -> Result<HashMap<LayerId, Rounded>> {
    let cands = candidates(&model.graph);
    let watch: Vec<gptq::Watch<LayerId>> = cands
        .iter()
        .filter_map(|c| match &c.kind {
            Kind::MatMul { a, k, .. } => Some(gptq::Watch { layer: c.layer, x: *a, k: *k }),
            _ => None,
        })
        .collect();
    let hess = gptq::hessians(model, s, &watch, |i, t| {
        let k = watch[i].k;
        let x = t.view::<f32>().ok()?;
        (t.shape().last() == Some(&k)).then(|| gptq::sample_rows(x, k, GPTQ_ROWS))
    })?;
    cands
        .par_iter()
        .filter_map(|c| match &c.kind {
            Kind::MatMul { w, k, n, bias, .. } => {
                let h = hess.get(&c.layer)?;
                let round = |q: Int4Weight| -> Result<(LayerId, Rounded)> {
                    let bias = match bias_correction {
                        true => gptq::corrected_bias(bias.as_deref(), w, &dequantize_matmul(&q, *k, *n, fmt.block)?, *n, h).or_else(|| bias.clone()),
                        false => bias.clone(),
                    };
                    Ok((c.layer, Rounded { w: q, bias }))
                };
                Some(gptq::quantize_int4(w, *k, *n, h, fmt)?.and_then(round))
            }
            _ => None,
        })
        .collect()
}

/// Quantize the candidates of `model` whose layer is in `layers` (MatMul weights from `gptq`
/// where it has them).
fn quantize_layers(model: &mut Model, layers: &[LayerId], fmt: &Int4Format, gptq: &HashMap<LayerId, Rounded>) -> Result<Stats> {
    let mut st = Stats::default();
    let g = &mut model.graph;
    for c in candidates(g).into_iter().filter(|c| layers.contains(&c.layer)) {
        let base = g.nodes[c.node].name.clone();
        let base = if base.is_empty() { g.values[c.layer].name.clone() } else { base };
        let (inputs, op, attrs) = match c.kind {
            Kind::MatMul { a, w, k, n, bias, act } => {
                let (q, bias) = match gptq.get(&c.layer) {
                    Some(r) => (r.w.clone(), r.bias.clone()),
                    None => (quantize_matmul(&w, k, n, fmt)?, bias),
                };
                st.matmuls += 1;
                st.bytes_before += w.len() * 4;
                st.bytes_after += q.bytes();
                let wq = g.add_const(format!("{base}.int4"), q.data);
                let sc = g.add_const(format!("{base}.int4_scales"), q.scales);
                let zp = q.zero_points.map(|z| g.add_const(format!("{base}.int4_zero_points"), z));
                let b = bias.map(|b| Tensor::from_vec(&[n], b)).transpose()?.map(|b| g.add_const(format!("{base}.bias"), b));
                let mut attrs = vec![int_attr("K", k), int_attr("N", n), int_attr("block_size", fmt.block)];
                attrs.extend(act);
                (vec![Some(a), Some(wq), Some(sc), zp, b], "MatMulInt4", attrs)
            }
            Kind::Gather { table, indices, rows, dim } => {
                let t = g.konst(table).expect("candidates have constant tables").clone().aligned();
                let tfmt = Int4Format { block: fmt.block.min(TABLE_BLOCK_MAX), ..*fmt };
                let q = quantize_table(t.view::<f32>()?, rows, dim, &tfmt)?;
                st.gathers += 1;
                st.bytes_before += rows * dim * 4;
                st.bytes_after += q.bytes();
                let name = g.values[table].name.clone();
                let wq = g.add_const(format!("{name}.int4"), q.data);
                let sc = g.add_const(format!("{name}.int4_scales"), q.scales);
                let zp = q.zero_points.map(|z| g.add_const(format!("{name}.int4_zero_points"), z));
                let attrs = vec![int_attr("dim", dim), int_attr("block_size", tfmt.block)];
                (vec![Some(wq), Some(sc), zp, Some(indices)], "GatherInt4", attrs)
            }
        };
        let old = &g.nodes[c.node];
        let new = Node {
            name: old.name.clone(),
            op: op.into(),
            domain: "kiln".into(),
            opset: 1,
            inputs,
            outputs: old.outputs[..1].to_vec(),
            attrs,
        };
        g.nodes[c.node] = new;
    }
    Ok(st)
}

// ---------------------------------------------------------------------------------------------
// AWQ
// ---------------------------------------------------------------------------------------------

/// Per activation value: sum of |x| per channel, rows seen, and up to AWQ_ROWS kept rows.
struct ActStats {
    k: usize,
    abs_sum: Vec<f64>,
    rows_seen: usize,
    rows: Vec<f32>,
}

/// Apply AWQ channel scaling to every group of MatMul-like candidates sharing an activation.
fn awq(model: &mut Model, s: &Samples, fmt: &Int4Format) -> Result<Vec<String>> {
    let g = &model.graph;
    let mut groups: Vec<(ValueId, Vec<LayerId>)> = Vec::new();
    for c in candidates(g) {
        if let Kind::MatMul { a, .. } = c.kind {
            match groups.iter_mut().find(|(x, _)| *x == a) {
                Some((_, l)) => l.push(c.layer),
                None => groups.push((a, vec![c.layer])),
            }
        }
    }
    let watch: Vec<ValueId> = groups.iter().map(|(x, _)| *x).collect();
    let mut stats: HashMap<ValueId, ActStats> = HashMap::new();
    let mut err = None;
    observe(model, s, &watch, &mut |_, v, t| {
        if err.is_some() {
            return;
        }
        let Ok(x) = t.view::<f32>() else {
            err = Some(Error::DType(format!("awq: activation {} is {}", model.graph.values[v].name, t.dtype())));
            return;
        };
        let k = t.shape().last().copied().unwrap_or(1).max(1);
        let st = stats.entry(v).or_insert_with(|| ActStats { k, abs_sum: vec![0.0; k], rows_seen: 0, rows: Vec::new() });
        if st.k != k {
            return;
        }
        for row in x.chunks_exact(k) {
            for (a, &v) in st.abs_sum.iter_mut().zip(row) {
                *a += v.abs() as f64;
            }
            // Keep an evenly spread subset: every row until full, then replace by a hash of the count.
            if st.rows.len() < AWQ_ROWS * k {
                st.rows.extend_from_slice(row);
            } else {
                let slot = (st.rows_seen.wrapping_mul(2654435761) >> 7) % (st.rows_seen + 1);
                if slot < AWQ_ROWS {
                    st.rows[slot * k..(slot + 1) * k].copy_from_slice(row);
                }
            }
            st.rows_seen += 1;
        }
    })?;
    if let Some(e) = err {
        return Err(e);
    }
    let mut notes = Vec::new();
    for (x, layers) in groups {
        let Some(st) = stats.get(&x) else { continue };
        let cands: Vec<Candidate> = candidates(&model.graph).into_iter().filter(|c| layers.contains(&c.layer)).collect();
        let weights: Vec<(&[f32], usize)> = cands
            .iter()
            .filter_map(|c| match &c.kind {
                Kind::MatMul { w, n, k, .. } if *k == st.k => Some((w.as_slice(), *n)),
                _ => None,
            })
            .collect();
        if weights.len() != cands.len() || st.rows_seen == 0 {
            continue;
        }
        let mean: Vec<f32> = st.abs_sum.iter().map(|a| (a / st.rows_seen as f64) as f32).collect();
        let (alpha, scales, gain) = search_alpha(&mean, &st.rows, st.k, &weights, fmt)?;
        if alpha == 0.0 {
            notes.push(format!("awq {}: alpha 0 (plain rounding is best)", model.graph.values[x].name));
            continue;
        }
        let how = apply_scales(model, x, &layers, &scales)?;
        notes.push(format!(
            "awq {}: alpha {alpha:.2}, calibration output error x{gain:.3} of rtn, {} layer(s), activation divided by {how}",
            model.graph.values[x].name,
            layers.len()
        ));
    }
    Ok(notes)
}

/// Channel scales mean^alpha, normalised so that their geometric middle is 1.
fn channel_scales(mean: &[f32], alpha: f32) -> Vec<f32> {
    let s: Vec<f32> = mean.iter().map(|&m| m.max(1e-4).powf(alpha)).collect();
    let (lo, hi) = s.iter().fold((f32::MAX, 0f32), |(l, h), &v| (l.min(v), h.max(v)));
    let mid = (lo * hi).sqrt();
    s.iter().map(|v| v / mid).collect()
}

/// Squared output error on `rows` of rounding `w` (`[k, n]`) after scaling its rows by `s`.
fn rounding_error(rows: &[f32], k: usize, w: &[f32], n: usize, s: &[f32], fmt: &Int4Format) -> Result<f64> {
    let scaled: Vec<f32> = w.chunks_exact(n).zip(s).flat_map(|(r, &sv)| r.iter().map(move |x| x * sv)).collect();
    let dq = dequantize_matmul(&quantize_matmul(&scaled, k, n, fmt)?, k, n, fmt.block)?;
    // D = diag(1/s)·Q(diag(s)·W) - W; the error is |X·D|².
    let d: Vec<f32> = dq.chunks_exact(n).zip(w.chunks_exact(n)).zip(s)
        .flat_map(|((q, o), &sv)| q.iter().zip(o).map(move |(q, o)| q / sv - o))
        .collect();
    let m = rows.len() / k;
    let mut out = vec![0f32; m * n];
    gemm::sgemm(m, n, k, MatRef::rows(rows, k), BRef::Mat(MatRef::rows(&d, n)), &mut out, n, false, &Epilogue::NONE, true)?;
    Ok(out.iter().map(|&v| (v as f64) * (v as f64)).sum())
}

/// The alpha on the grid minimising the group's error; returns (alpha, scales, error / rtn error).
fn search_alpha(mean: &[f32], rows: &[f32], k: usize, weights: &[(&[f32], usize)], fmt: &Int4Format) -> Result<(f32, Vec<f32>, f64)> {
    let mut best = (0f32, vec![1f32; k], f64::INFINITY);
    let mut rtn = f64::INFINITY;
    for step in 0..=AWQ_GRID {
        let alpha = step as f32 / AWQ_GRID as f32;
        let s = if step == 0 { vec![1f32; k] } else { channel_scales(mean, alpha) };
        let mut e = 0f64;
        for &(w, n) in weights {
            e += rounding_error(rows, k, w, n, &s, fmt)?;
        }
        if step == 0 {
            rtn = e;
        }
        if e < best.2 {
            best = (alpha, s, e);
        }
    }
    let gain = if rtn > 0.0 { best.2 / rtn } else { 1.0 };
    Ok((best.0, best.1, gain))
}

/// Scale the weights of `layers` (all reading `x`) by `s` along K and divide `x` by `s`.
fn apply_scales(model: &mut Model, x: ValueId, layers: &[LayerId], s: &[f32]) -> Result<&'static str> {
    let g = &mut model.graph;
    for &l in layers {
        let ni = g.nodes.iter().position(|n| n.output(0) == Some(l)).ok_or_else(|| Error::Other("awq: layer vanished".into()))?;
        let wv = g.nodes[ni].input(1).ok_or_else(|| Error::Other("awq: no weight".into()))?;
        let w = g.konst(wv).ok_or_else(|| Error::Other("awq: weight not constant".into()))?.clone().aligned();
        let trans_b = g.nodes[ni].op == "Gemm" && g.nodes[ni].attr_int("transB").unwrap_or(0) != 0;
        let (r, c) = (w.shape()[0], w.shape()[1]);
        let mut v = w.view::<f32>()?.to_vec();
        for (i, x) in v.iter_mut().enumerate() {
            // Row index along K: rows of W, or columns of a transposed Gemm B.
            let kk = if trans_b { i % c } else { i / c };
            *x *= s[kk];
        }
        let name = format!("{}.awq", g.values[wv].name);
        let nw = g.add_const(name, Tensor::from_vec(&[r, c], v)?);
        g.nodes[ni].inputs[1] = Some(nw);
    }
    let inv: Vec<f32> = s.iter().map(|v| 1.0 / v).collect();
    if fold_into_layernorm(g, x, layers, &inv)? {
        return Ok("the LayerNormalization's scale and bias");
    }
    // A Mul right before the first reader.
    let uses = g.consumers();
    let first = uses[x].iter().copied().min().ok_or_else(|| Error::Other("awq: activation unread".into()))?;
    let k = s.len();
    let c = g.add_const(format!("{}.awq_inv_scale", g.values[x].name), Tensor::from_vec(&[k], inv)?);
    let y = g.add_value(format!("{}.awq", g.values[x].name), g.values[x].ty.clone());
    for &l in layers {
        if let Some(n) = g.nodes.iter_mut().find(|n| n.output(0) == Some(l)) {
            n.inputs[0] = Some(y);
        }
    }
    let name = format!("{}.awq_scale", g.values[x].name);
    let opset = model.opsets.iter().find(|(d, _)| d.is_empty() || d == "ai.onnx").map_or(14, |o| o.1);
    let g = &mut model.graph;
    g.nodes.insert(first, Node { name, op: "Mul".into(), domain: String::new(), opset, inputs: vec![Some(x), Some(c)], outputs: vec![Some(y)], attrs: vec![] });
    Ok("a Mul")
}

/// Divide a LayerNormalization output by folding `inv` into its scale and bias, when the group
/// reads it alone and the normalisation is over the last axis with constant scale and bias.
fn fold_into_layernorm(g: &mut Graph, x: ValueId, layers: &[LayerId], inv: &[f32]) -> Result<bool> {
    let uses = g.consumers();
    let only_group = uses[x].iter().all(|&ni| g.nodes[ni].output(0).is_some_and(|o| layers.contains(&o)));
    if !only_group || g.outputs.contains(&x) {
        return Ok(false);
    }
    let Some(pi) = g.producers()[x] else { return Ok(false) };
    let p = &g.nodes[pi];
    let last_axis = matches!(p.attr_int("axis").unwrap_or(-1), -1) || g.values[x].ty.shape().is_some_and(|s| p.attr_int("axis") == Some(s.len() as i64 - 1));
    if !is_onnx(p) || p.op != "LayerNormalization" || !last_axis || p.output(0) != Some(x) || p.outputs.iter().skip(1).any(|o| o.is_some()) {
        return Ok(false);
    }
    let k = inv.len();
    let scale = f32_const(g, p.input(1)).filter(|t| t.len() == k);
    let bias = match p.input(2) {
        Some(b) => match f32_const(g, Some(b)).filter(|t| t.len() == k) {
            Some(t) => Some(t.view::<f32>()?.to_vec()),
            None => return Ok(false),
        },
        None => None,
    };
    let Some(scale) = scale else { return Ok(false) };
    let sv: Vec<f32> = scale.view::<f32>()?.iter().zip(inv).map(|(a, b)| a * b).collect();
    let shape = scale.shape().to_vec();
    let name = g.values[x].name.clone();
    let ns = g.add_const(format!("{name}.awq_ln_scale"), Tensor::from_vec(&shape, sv)?);
    g.nodes[pi].inputs[1] = Some(ns);
    if let Some(b) = bias {
        let bv: Vec<f32> = b.iter().zip(inv).map(|(a, c)| a * c).collect();
        let nb = g.add_const(format!("{name}.awq_ln_bias"), Tensor::from_vec(&shape, bv)?);
        g.nodes[pi].inputs[2] = Some(nb);
    }
    Ok(true)
}
