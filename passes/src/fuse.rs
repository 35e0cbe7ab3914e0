//! Fusion passes, each a small named unit over `pattern`'s declarative matcher:
//!
//! - `identity`: Identity and inference-mode Dropout disappear (their readers read the input).
//! - `conv-bn`: Conv or ConvTranspose followed by BatchNormalization (constant statistics),
//!   directly or through a per-channel bias Add, becomes one node of the same op with rescaled
//!   weights and bias.
//! - `gelu`, `layernorm`, `hardswish`, `softmax`: decomposed forms exporters emit are recognised
//!   and replaced by the standard ONNX op (Gelu-20, LayerNormalization-17, HardSwish-14,
//!   Softmax-13), which run as one kernel.
//! - `matmul-bias`: MatMul by a constant 2-D weight followed by a constant bias Add becomes
//!   `kiln.FusedMatMul` (A, W, bias); Conv becomes `kiln.FusedConv` when an activation follows.
//! - `epilogue`: an activation (or SiLU written as x · Sigmoid(x)) after a FusedMatMul /
//!   FusedConv / Conv moves into that node's `activation` attribute, applied while the output is
//!   still in cache.
//! - `attention`: MatMul(Q, Kᵀ) → constant scale → optional mask Add → Softmax → MatMul(·, V)
//!   (→ Transpose) becomes `kiln.Attention`, which also reads Q, K and V through the Transposes
//!   that split heads, so the score tensor is never materialised.
//! - `layout`: Transpose∘Transpose, Reshape∘Reshape, Squeeze/Unsqueeze pairs and no-op Reshapes
//!   collapse; a Transpose that only moves size-1 axes becomes a Reshape.
//! - `rmsnorm`: x / √(mean(x²) + eps) · g becomes RMSNormalization-23.
//! - `conv-affine`: a per-channel constant Mul or Add after a Conv or ConvTranspose folds into its
//!   weights / bias.
//!
//! Every pass leaves the graph computing the same outputs (within float tolerance); the node
//! suite and the real-model goldens run with all of them on.

use std::collections::HashSet;

use kiln_compiler::ir::{AttrValue, Attribute, Dim, Graph, Model, Node, ValueId};
use kiln_compiler::pass::Pass;
use kiln_compiler::Result;
use kiln_runtime::{DType, Tensor};

use crate::pattern::{erf, konst, op, pow, rewrite_all, sqrt, sym, tanh, unary, Match, Matcher, NewConsts, Pat};

/// The domain of kiln's own fused ops (kernels in backends/src/cpu/kernels/fused.rs).
pub const KILN_DOMAIN: &str = "kiln";

fn attr(name: &str, value: AttrValue) -> Attribute {
    Attribute { name: name.into(), value }
}

/// A node that takes over the root's outputs (and name) with a new op.
fn replacing(mx: &Matcher, m: &Match, op: &str, domain: &str, opset: i64, inputs: Vec<Option<ValueId>>, attrs: Vec<Attribute>) -> Node {
    let root = &mx.g.nodes[m.matched[0]];
    Node { name: root.name.clone(), op: op.into(), domain: domain.into(), opset, inputs, outputs: root.outputs.clone(), attrs }
}

fn is_f32(g: &Graph, v: ValueId) -> bool {
    g.values[v].ty.dtype() == Some(DType::F32)
}

fn rank(g: &Graph, v: ValueId) -> Option<usize> {
    g.values[v].ty.shape().map(|s| s.len())
}

fn scalar_of(g: &Graph, v: ValueId) -> Option<f32> {
    let t = g.konst(v)?;
    let vals = t.to_f64_vec().ok()?;
    (vals.len() == 1).then(|| vals[0] as f32)
}

// ---------------------------------------------------------------------------------------------
// identity
// ---------------------------------------------------------------------------------------------

pub struct EliminateIdentity;

/// Whether `n` passes its first input through unchanged at inference.
fn is_passthrough(g: &Graph, n: &Node, uses: &[Vec<usize>]) -> bool {
    match n.op.as_str() {
        "Identity" => true,
        "Dropout" => {
            let mask_unused = n.output(1).is_none_or(|m| uses[m].is_empty() && !g.outputs.contains(&m));
            // training_mode (input 2, opset 12+) must be absent or a constant false.
            let inference = n.input(2).is_none_or(|t| g.konst(t).and_then(|t| t.to_i64_vec().ok()).is_some_and(|v| v == [0]));
            mask_unused && inference
        }
        _ => false,
    }
}

impl Pass for EliminateIdentity {
    fn name(&self) -> &'static str {
        "identity"
    }

    fn run(&self, model: &mut Model) -> Result<(usize, Vec<String>)> {
        let g = &mut model.graph;
        let uses = g.consumers();
        let mut alias: Vec<ValueId> = (0..g.values.len()).collect();
        let mut dropped = HashSet::new();
        for (i, n) in g.nodes.iter().enumerate() {
            let (Some(x), Some(y)) = (n.input(0), n.output(0)) else { continue };
            let onnx = n.domain.is_empty() || n.domain == "ai.onnx";
            // Graph outputs keep their producing node (their name is the interface), and values
            // a subgraph captures by name keep theirs.
            let captured = uses[y].iter().any(|&c| g.nodes[c].subgraphs().next().is_some());
            if onnx && is_passthrough(g, n, &uses) && !g.outputs.contains(&y) && !captured {
                alias[y] = alias[x];
                dropped.insert(i);
            }
        }
        for n in &mut g.nodes {
            for v in n.inputs.iter_mut().flatten() {
                *v = alias[*v];
            }
        }
        let mut i = 0;
        g.nodes.retain(|_| {
            i += 1;
            !dropped.contains(&(i - 1))
        });
        Ok((dropped.len(), vec![]))
    }
}

// ---------------------------------------------------------------------------------------------
// conv-bn
// ---------------------------------------------------------------------------------------------

pub struct FoldConvBatchNorm;

/// BatchNormalization of a conv's output, or of the conv plus a per-channel constant (the bias
/// as a separate Add: PaddleOCR's ConvTranspose → Add → BatchNormalization).
fn conv_bn_pats(conv_op: &'static str) -> [Pat; 2] {
    let conv = || op(conv_op, vec![sym("x"), konst("w")]).named("conv");
    let bn = |input: Pat| op("BatchNormalization", vec![input, konst("scale"), konst("bias"), konst("mean"), konst("var")]).named("bn");
    [bn(conv()), bn(conv() + konst("k"))]
}

fn f32s(g: &Graph, v: ValueId) -> Option<Vec<f32>> {
    let t = g.konst(v)?;
    (t.dtype() == DType::F32).then(|| t.clone().aligned().view::<f32>().ok().map(|s| s.to_vec())).flatten()
}

/// The matched conv (node "conv", weight "w", input "x") as a per-output-channel affine map
/// sees it.
struct ConvOut {
    /// Output channels.
    m: usize,
    /// Weights per kernel window, and the output channel of each window: a Conv's W is
    /// [M, C/g, ...]; a ConvTranspose's is [C, M/g, ...], so there window (ci, j) writes channel
    /// (ci / (C/g))·(M/g) + j.
    per: usize,
    chan: Vec<usize>,
    /// The conv's bias (zeros if it has none).
    bias: Vec<f32>,
}

fn conv_out(mx: &Matcher, m: &Match) -> Option<ConvOut> {
    let g = mx.g;
    let conv = &g.nodes[m.node("conv")];
    let wt = g.konst(m.value("w"))?;
    let group = conv.attr_int("group").unwrap_or(1).max(1) as usize;
    let ws = wt.shape();
    // At most a bias input, as the folded node is built with.
    if conv.inputs.len() > 3 || wt.dtype() != DType::F32 || ws.len() < 3 {
        return None;
    }
    let per = ws[2..].iter().product::<usize>();
    let (a, b) = (ws[0], ws[1]);
    let (mch, chan) = if conv.op == "ConvTranspose" {
        if a % group != 0 {
            return None;
        }
        let cg = a / group;
        (b * group, (0..a * b).map(|e| (e / b / cg) * b + e % b).collect())
    } else {
        (a, (0..a * b).map(|e| e / b).collect())
    };
    if mch == 0 {
        return None;
    }
    let bias = match conv.input(2) {
        Some(cb) => f32s(g, cb).filter(|v| v.len() == mch)?,
        None => vec![0.0; mch],
    };
    Some(ConvOut { m: mch, per, chan, bias })
}

/// The matched conv with output channel c's weights multiplied by `mul[c]` (when given) and the
/// bias `bias`; the new constants are named after the conv with `tag`.
fn refold_conv(mx: &Matcher, m: &Match, consts: &mut NewConsts, co: &ConvOut, mul: Option<&[f32]>, bias: Vec<f32>, tag: &str) -> Option<Node> {
    let g = mx.g;
    let conv = &g.nodes[m.node("conv")];
    let wt = g.konst(m.value("w"))?;
    let mut w = wt.clone().aligned().view::<f32>().ok()?.to_vec();
    if let Some(k) = mul {
        for (window, &c) in w.chunks_mut(co.per).zip(&co.chan) {
            window.iter_mut().for_each(|x| *x *= k[c]);
        }
    }
    let wv = consts.add(format!("{}.w_{tag}", conv.name), Tensor::from_vec(wt.shape(), w).ok()?);
    let bv = consts.add(format!("{}.b_{tag}", conv.name), Tensor::from_vec(&[co.m], bias).ok()?);
    let mut n = replacing(mx, m, &conv.op, "", conv.opset, vec![Some(m.value("x")), Some(wv), Some(bv)], conv.attrs.clone());
    n.name = conv.name.clone();
    Some(n)
}

impl Pass for FoldConvBatchNorm {
    fn name(&self) -> &'static str {
        "conv-bn"
    }

    fn run(&self, model: &mut Model) -> Result<(usize, Vec<String>)> {
        let mut count = 0;
        for p in conv_bn_pats("Conv").iter().chain(&conv_bn_pats("ConvTranspose")) {
            count += rewrite_all(&mut model.graph, p, |mx, m, consts| {
                let g = mx.g;
                let bn = &g.nodes[m.node("bn")];
                // Training-mode outputs (running mean/var) must be unused.
                if bn.outputs.iter().skip(1).flatten().next().is_some() {
                    return None;
                }
                let co = conv_out(mx, m)?;
                let mch = co.m;
                let (s, b, mu, var) =
                    (f32s(g, m.value("scale"))?, f32s(g, m.value("bias"))?, f32s(g, m.value("mean"))?, f32s(g, m.value("var"))?);
                if [s.len(), b.len(), mu.len(), var.len()].iter().any(|&l| l != mch) {
                    return None;
                }
                let added = match m.values.get("k") {
                    Some(&k) => per_channel(g.konst(k)?, g.konst(m.value("w"))?.rank(), mch)?,
                    None => vec![0.0; mch],
                };
                let eps = bn.attr_float("epsilon").unwrap_or(1e-5);
                let k: Vec<f32> = (0..mch).map(|c| s[c] / (var[c] + eps).sqrt()).collect();
                let bias = (0..mch).map(|c| (co.bias[c] + added[c] - mu[c]) * k[c] + b[c]).collect();
                refold_conv(mx, m, consts, &co, Some(&k), bias, "bn")
            });
        }
        Ok((count, vec![]))
    }
}

// ---------------------------------------------------------------------------------------------
// gelu
// ---------------------------------------------------------------------------------------------

pub struct FuseGelu;

fn gelu_erf_pats() -> Vec<Pat> {
    let x = || sym("x");
    let inner = || erf(x() / std::f32::consts::SQRT_2) + 1.0;
    let inner_mul = || erf(x() * std::f32::consts::FRAC_1_SQRT_2) + 1.0;
    vec![
        (x() * inner()) * 0.5,
        (x() * 0.5) * inner(),
        x() * (inner() * 0.5),
        (x() * inner_mul()) * 0.5,
        (x() * 0.5) * inner_mul(),
    ]
}

fn gelu_tanh_pats() -> Vec<Pat> {
    let x = || sym("x");
    // sqrt(2/pi) · (x + 0.044715 x³)
    let k = (2.0f32 / std::f32::consts::PI).sqrt();
    let cube = || pow(x(), 3.0);
    let arg1 = || (x() + cube() * 0.044715) * k;
    let arg2 = || (x() + (x() * x() * x()) * 0.044715) * k;
    let mut v = Vec::new();
    for arg in [arg1(), arg2()] {
        let t = tanh(arg) + 1.0;
        v.push((x() * t.clone()) * 0.5);
        v.push((x() * 0.5) * t);
    }
    v
}

impl Pass for FuseGelu {
    fn name(&self) -> &'static str {
        "gelu"
    }

    fn run(&self, model: &mut Model) -> Result<(usize, Vec<String>)> {
        let g = &mut model.graph;
        let mut count = 0;
        for (pats, approx) in [(gelu_erf_pats(), "none"), (gelu_tanh_pats(), "tanh")] {
            for p in &pats {
                count += rewrite_all(g, p, |mx, m, _| {
                    let x = m.value("x");
                    is_f32(mx.g, x).then(|| {
                        replacing(mx, m, "Gelu", "", 20, vec![Some(x)], vec![attr("approximate", AttrValue::String(approx.as_bytes().to_vec()))])
                    })
                });
            }
        }
        Ok((count, vec![]))
    }
}

// ---------------------------------------------------------------------------------------------
// layernorm
// ---------------------------------------------------------------------------------------------

pub struct FuseLayerNorm;

fn layernorm_pat() -> Pat {
    let x = sym("x");
    let mean = unary("ReduceMean", x.clone()).named("mean");
    let d = x - mean;
    let var = unary("ReduceMean", pow(d.clone(), 2.0)).named("var");
    let normed = d / sqrt(var + konst("eps"));
    normed * konst("gamma") + konst("beta")
}

/// The single reduction axis of a ReduceMean (attribute before opset 18, input after), if it is
/// the last axis of a rank-`r` input and keepdims is on.
fn reduces_last_axis(g: &Graph, n: &Node, r: usize) -> bool {
    let axes: Option<Vec<i64>> = match n.attr_ints("axes") {
        Some(a) => Some(a.to_vec()),
        None => n.input(1).and_then(|a| g.konst(a)).and_then(|t| t.to_i64_vec().ok()),
    };
    let keep = n.attr_int("keepdims").unwrap_or(1) == 1;
    keep && axes.is_some_and(|a| a.len() == 1 && (a[0] == -1 || a[0] == r as i64 - 1))
}

impl Pass for FuseLayerNorm {
    fn name(&self) -> &'static str {
        "layernorm"
    }

    fn run(&self, model: &mut Model) -> Result<(usize, Vec<String>)> {
        let count = rewrite_all(&mut model.graph, &layernorm_pat(), |mx, m, _| {
            let g = mx.g;
            let x = m.value("x");
            let r = rank(g, x)?;
            let eps = scalar_of(g, m.value("eps"))?;
            let (gamma, beta) = (m.value("gamma"), m.value("beta"));
            let last = g.values[x].ty.shape()?.last()?.clone();
            let per_feature = |v: ValueId| {
                let t = g.konst(v).unwrap();
                t.dtype() == DType::F32 && t.rank() == 1 && matches!(last, kiln_compiler::ir::Dim::Fixed(n) if n == t.len())
            };
            let ok = is_f32(g, x)
                && r >= 1
                && reduces_last_axis(g, &g.nodes[m.node("mean")], r)
                && reduces_last_axis(g, &g.nodes[m.node("var")], r)
                && per_feature(gamma)
                && per_feature(beta);
            ok.then(|| {
                replacing(mx, m, "LayerNormalization", "", 17, vec![Some(x), Some(gamma), Some(beta)], vec![
                    attr("axis", AttrValue::Int(-1)),
                    attr("epsilon", AttrValue::Float(eps)),
                ])
            })
        });
        Ok((count, vec![]))
    }
}

// ---------------------------------------------------------------------------------------------
// hardswish
// ---------------------------------------------------------------------------------------------

pub struct FuseHardSwish;

fn hardswish_pats() -> Vec<Pat> {
    let x = || sym("x");
    let relu6 = || op("Clip", vec![x() + 3.0, 0.0.into(), 6.0.into()]);
    vec![
        x() * unary("HardSigmoid", x()).named("hs"),
        (x() * relu6()) / 6.0,
        x() * (relu6() / 6.0),
    ]
}

impl Pass for FuseHardSwish {
    fn name(&self) -> &'static str {
        "hardswish"
    }

    fn run(&self, model: &mut Model) -> Result<(usize, Vec<String>)> {
        let mut count = 0;
        for p in hardswish_pats() {
            count += rewrite_all(&mut model.graph, &p, |mx, m, _| {
                let x = m.value("x");
                if let Some(&hs) = m.nodes.get("hs") {
                    let n = &mx.g.nodes[hs];
                    let alpha = n.attr_float("alpha").unwrap_or(0.2);
                    let beta = n.attr_float("beta").unwrap_or(0.5);
                    if (alpha - 1.0 / 6.0).abs() > 1e-6 || (beta - 0.5).abs() > 1e-6 {
                        return None;
                    }
                }
                is_f32(mx.g, x).then(|| replacing(mx, m, "HardSwish", "", 14, vec![Some(x)], vec![]))
            });
        }
        Ok((count, vec![]))
    }
}

// ---------------------------------------------------------------------------------------------
// matmul-bias and epilogue
// ---------------------------------------------------------------------------------------------

pub struct FuseMatMulBias;

fn matmul_bias_pat() -> Pat {
    op("MatMul", vec![sym("a"), konst("w")]).named("mm") + konst("bias")
}

impl Pass for FuseMatMulBias {
    fn name(&self) -> &'static str {
        "matmul-bias"
    }

    fn run(&self, model: &mut Model) -> Result<(usize, Vec<String>)> {
        let count = rewrite_all(&mut model.graph, &matmul_bias_pat(), |mx, m, _| {
            let g = mx.g;
            let (a, w, bias) = (m.value("a"), m.value("w"), m.value("bias"));
            let wt = g.konst(w)?;
            let bt = g.konst(bias)?;
            let ok = is_f32(g, a)
                && rank(g, a).is_some_and(|r| r >= 2)
                && wt.dtype() == DType::F32
                && wt.rank() == 2
                && bt.dtype() == DType::F32
                && bt.len() == wt.shape()[1]
                && bt.shape().iter().rev().skip(1).all(|&d| d == 1);
            ok.then(|| replacing(mx, m, "FusedMatMul", KILN_DOMAIN, 1, vec![Some(a), Some(w), Some(bias)], vec![]))
        });
        Ok((count, vec![]))
    }
}

pub struct FuseEpilogue;

/// An activation op as the (name, parameters) the fused kernels take, if it is one they apply.
fn activation_of(g: &Graph, n: &Node) -> Option<(&'static str, Vec<f32>)> {
    let onnx = n.domain.is_empty() || n.domain == "ai.onnx";
    if !onnx {
        return None;
    }
    Some(match n.op.as_str() {
        "Relu" => ("Relu", vec![]),
        "Sigmoid" => ("Sigmoid", vec![]),
        "Tanh" => ("Tanh", vec![]),
        "HardSwish" => ("HardSwish", vec![]),
        "LeakyRelu" => ("LeakyRelu", vec![n.attr_float("alpha").unwrap_or(0.01)]),
        "HardSigmoid" => ("HardSigmoid", vec![n.attr_float("alpha").unwrap_or(0.2), n.attr_float("beta").unwrap_or(0.5)]),
        "Gelu" => match n.attr_str("approximate").unwrap_or("none") {
            "tanh" => ("GeluTanh", vec![]),
            _ => ("Gelu", vec![]),
        },
        "Clip" => {
            // Clip-6 has attributes; Clip-11+ optional constant inputs.
            let lo = match n.input(1) {
                Some(v) => scalar_of(g, v)?,
                None => n.attr_float("min").unwrap_or(f32::MIN),
            };
            let hi = match n.input(2) {
                Some(v) => scalar_of(g, v)?,
                None => n.attr_float("max").unwrap_or(f32::MAX),
            };
            ("Clip", vec![lo, hi])
        }
        _ => return None,
    })
}

/// For a Mul node x · Sigmoid(x) (either operand order): x and the Sigmoid's node index.
fn silu_of(g: &Graph, producers: &[Option<usize>], n: &Node) -> Option<(ValueId, usize)> {
    if !(n.domain.is_empty() || n.domain == "ai.onnx") || n.op != "Mul" || n.inputs.len() != 2 {
        return None;
    }
    let (a, b) = (n.input(0)?, n.input(1)?);
    [(a, b), (b, a)].into_iter().find_map(|(x, s)| {
        let si = producers[s]?;
        let sn = &g.nodes[si];
        let onnx = sn.domain.is_empty() || sn.domain == "ai.onnx";
        (onnx && sn.op == "Sigmoid" && sn.input(0) == Some(x) && x != s).then_some((x, si))
    })
}

impl Pass for FuseEpilogue {
    fn name(&self) -> &'static str {
        "epilogue"
    }

    fn run(&self, model: &mut Model) -> Result<(usize, Vec<String>)> {
        let g = &mut model.graph;
        let mut count = 0;
        loop {
            let uses = g.consumers();
            let producers = g.producers();
            let found = g.nodes.iter().enumerate().find_map(|(ai, act)| {
                // A plain activation reading x, or SiLU as x · Sigmoid(x) (YOLO, EfficientNet,
                // LLaMA MLPs): then the Sigmoid goes too and x has exactly those two readers.
                let (name, params, x, sig) = match (activation_of(g, act), silu_of(g, &producers, act)) {
                    (Some((name, params)), _) => (name, params, act.input(0)?, None),
                    (None, Some((x, si))) => ("Silu", vec![], x, Some(si)),
                    _ => return None,
                };
                let readers = if sig.is_some() { 2 } else { 1 };
                if !is_f32(g, x) || g.outputs.contains(&x) || uses[x].len() != readers {
                    return None;
                }
                if let Some(si) = sig {
                    let s = g.nodes[si].outputs.first().copied().flatten()?;
                    if g.outputs.contains(&s) || uses[s].len() != 1 {
                        return None;
                    }
                }
                let pi = producers[x]?;
                let p = &g.nodes[pi];
                let fusable = match (p.domain.as_str(), p.op.as_str()) {
                    (KILN_DOMAIN, "FusedMatMul" | "FusedConv") => p.attr_str("activation").is_none(),
                    ("" | "ai.onnx", "Conv") => p.outputs.len() == 1,
                    _ => false,
                };
                fusable.then(|| (ai, pi, name, params, sig))
            });
            let Some((ai, pi, name, params, sig)) = found else { break };
            let act_out = g.nodes[ai].outputs.clone();
            let p = &mut g.nodes[pi];
            if p.op == "Conv" {
                p.op = "FusedConv".into();
                // Keeps the Conv's opset: the kernel reads its attributes as that Conv would.
                p.domain = KILN_DOMAIN.into();
            }
            p.attrs.push(attr("activation", AttrValue::String(name.as_bytes().to_vec())));
            p.attrs.push(attr("activation_params", AttrValue::Floats(params)));
            p.outputs = act_out;
            // Remove the later index first so the other stays valid.
            let mut gone = [Some(ai), sig];
            gone.sort_unstable_by(|a, b| b.cmp(a));
            for i in gone.into_iter().flatten() {
                g.nodes.remove(i);
            }
            count += 1;
        }
        Ok((count, vec![]))
    }
}

// ---------------------------------------------------------------------------------------------
// softmax
// ---------------------------------------------------------------------------------------------

pub struct FuseSoftmax;

fn softmax_pat() -> Pat {
    let x = sym("x");
    let e = unary("Exp", x.clone() - unary("ReduceMax", x).named("max"));
    e.clone() / unary("ReduceSum", e).named("sum")
}

impl Pass for FuseSoftmax {
    fn name(&self) -> &'static str {
        "softmax"
    }

    fn run(&self, model: &mut Model) -> Result<(usize, Vec<String>)> {
        let count = rewrite_all(&mut model.graph, &softmax_pat(), |mx, m, _| {
            let g = mx.g;
            let x = m.value("x");
            let r = rank(g, x)?;
            let ok = is_f32(g, x) && reduces_last_axis(g, &g.nodes[m.node("max")], r) && reduces_last_axis(g, &g.nodes[m.node("sum")], r);
            ok.then(|| replacing(mx, m, "Softmax", "", 13, vec![Some(x)], vec![attr("axis", AttrValue::Int(-1))]))
        });
        Ok((count, vec![]))
    }
}

// ---------------------------------------------------------------------------------------------
// attention
// ---------------------------------------------------------------------------------------------

pub struct FuseAttention;

/// softmax(scale·Q·Kᵀ + mask)·V as exporters write it: the scale is a constant Mul or Div on Q or
/// on the scores (or absent), the mask Add is optional, and a Transpose may follow. Variants that
/// absorb more nodes come first, so a scale Mul is folded rather than left in front of Q.
fn attention_pats() -> Vec<Pat> {
    let qk = |q: Pat| op("MatMul", vec![q, sym("kt")]).named("qk");
    let scores = [
        qk(sym("q") * konst("scale_mul")),
        qk(sym("q") / konst("scale_div")),
        qk(sym("q")) * konst("scale_mul"),
        qk(sym("q")) / konst("scale_div"),
        qk(sym("q")),
    ];
    let mut pats = Vec::new();
    for transposed in [true, false] {
        for masked in [true, false] {
            for s in &scores {
                let x = if masked { (s.clone() + sym("mask")).named("add") } else { s.clone() };
                let av = op("MatMul", vec![unary("Softmax", x).named("softmax"), sym("v")]);
                pats.push(if transposed { unary("Transpose", av).named("out_t") } else { av });
            }
        }
    }
    pats
}

/// A Transpose's permutation (default: reversed axes) for a rank-`r` input.
fn transpose_perm(n: &Node, r: usize) -> Option<Vec<usize>> {
    match n.attr_ints("perm") {
        Some(p) => {
            let mut seen = vec![false; r];
            let ok = p.len() == r && p.iter().all(|&a| (0..r as i64).contains(&a) && !std::mem::replace(&mut seen[a as usize], true));
            ok.then(|| p.iter().map(|&a| a as usize).collect())
        }
        None => Some((0..r).rev().collect()),
    }
}

/// Follow Transposes back from `v`, read as `Transpose(v, perm)`: the earliest source and the
/// permutation that reads the same logical tensor from it.
fn through_transposes(mx: &Matcher, mut v: ValueId, mut perm: Vec<usize>) -> (ValueId, Vec<usize>, usize) {
    let mut absorbed = 0;
    while let Some(pi) = mx.producer(v) {
        let n = &mx.g.nodes[pi];
        let onnx = n.domain.is_empty() || n.domain == "ai.onnx";
        let Some(src) = n.input(0).filter(|_| onnx && n.op == "Transpose") else { break };
        let Some(t) = transpose_perm(n, perm.len()) else { break };
        perm = perm.iter().map(|&i| t[i]).collect();
        v = src;
        absorbed += 1;
    }
    (v, perm, absorbed)
}

fn ints_attr(name: &str, v: &[usize]) -> Attribute {
    attr(name, AttrValue::Ints(v.iter().map(|&a| a as i64).collect()))
}

/// Whether a Softmax normalises the last axis of its rank-4 input (opset < 13 coerces to 2-D at
/// `axis`, which for the last axis is the same thing).
fn softmax_last_axis(n: &Node) -> bool {
    let default = if n.opset < 13 { 1 } else { -1 };
    matches!(n.attr_int("axis").unwrap_or(default), -1 | 3)
}

impl Pass for FuseAttention {
    fn name(&self) -> &'static str {
        "attention"
    }

    fn run(&self, model: &mut Model) -> Result<(usize, Vec<String>)> {
        let mut notes = Vec::new();
        let mut count = 0;
        for p in attention_pats() {
            count += rewrite_all(&mut model.graph, &p, |mx, m, _| {
                let g = mx.g;
                let (q, kt, v) = (m.value("q"), m.value("kt"), m.value("v"));
                let rank4 = |x: ValueId| is_f32(g, x) && rank(g, x) == Some(4);
                if !(rank4(q) && rank4(kt) && rank4(v) && softmax_last_axis(&g.nodes[m.node("softmax")])) {
                    return None;
                }
                let scale = match (m.values.get("scale_mul"), m.values.get("scale_div")) {
                    (Some(&c), _) => scalar_of(g, c).filter(|_| rank(g, c).is_some_and(|r| r <= 4))?,
                    (_, Some(&c)) => 1.0 / scalar_of(g, c).filter(|_| rank(g, c).is_some_and(|r| r <= 4))?,
                    _ => 1.0,
                };
                let mask = m.values.get("mask").copied();
                if let Some(mk) = mask {
                    // The Add must not broadcast the scores up: its output has their shape.
                    let scores = g.values[g.nodes[m.node("qk")].output(0)?].ty.shape()?;
                    let added = g.values[g.nodes[m.node("add")].output(0)?].ty.shape()?;
                    if !is_f32(g, mk) || rank(g, mk).is_none_or(|r| r > 4) || scores != added || scores.contains(&Dim::Unknown) {
                        return None;
                    }
                }
                let (qs, qp, na) = through_transposes(mx, q, vec![0, 1, 2, 3]);
                let (ks, kp, nb) = through_transposes(mx, kt, vec![0, 1, 3, 2]);
                let (vs, vp, nc) = through_transposes(mx, v, vec![0, 1, 2, 3]);
                let out_perm = match m.nodes.get("out_t") {
                    Some(&t) => transpose_perm(&g.nodes[t], 4)?,
                    None => vec![0, 1, 2, 3],
                };
                let root = &g.nodes[m.matched[0]];
                notes.push(format!(
                    "{}: Q·Kᵀ, scale {scale}, {}softmax, ·V{} → kiln.Attention ({} input transposes read in place)",
                    root.name,
                    if mask.is_some() { "mask, " } else { "" },
                    if m.nodes.contains_key("out_t") { ", Transpose" } else { "" },
                    na + nb + nc
                ));
                let mut inputs = vec![Some(qs), Some(ks), Some(vs)];
                inputs.extend(mask.map(Some));
                Some(replacing(mx, m, "Attention", KILN_DOMAIN, 1, inputs, vec![
                    attr("scale", AttrValue::Float(scale)),
                    ints_attr("q_perm", &qp),
                    ints_attr("k_perm", &kp),
                    ints_attr("v_perm", &vp),
                    ints_attr("out_perm", &out_perm),
                ]))
            });
        }
        Ok((count, notes))
    }
}

// ---------------------------------------------------------------------------------------------
// layout
// ---------------------------------------------------------------------------------------------

pub struct CancelLayout;

/// An op's constant axes (attribute before opset 13, input 1 from 13 on), normalised for rank `r`.
fn const_axes(g: &Graph, n: &Node, r: usize) -> Option<Vec<usize>> {
    let raw: Vec<i64> = match n.attr_ints("axes") {
        Some(a) => a.to_vec(),
        None => g.konst(n.input(1)?)?.to_i64_vec().ok()?,
    };
    let mut v: Vec<usize> = raw.iter().map(|&a| if a < 0 { a + r as i64 } else { a }).map(|a| usize::try_from(a).ok().filter(|&a| a < r)).collect::<Option<_>>()?;
    v.sort_unstable();
    v.dedup();
    (v.len() == raw.len()).then_some(v)
}

fn dims_of(g: &Graph, v: ValueId) -> Option<&[Dim]> {
    g.values[v].ty.shape()
}

/// A Reshape target that reproduces `dims` for any input of that shape: fixed sizes, with at most
/// one unknown size written as -1.
fn reshape_target(dims: &[Dim]) -> Option<Vec<i64>> {
    let mut inferred = 0;
    let t: Vec<i64> = dims
        .iter()
        .map(|d| match d {
            Dim::Fixed(n) => *n as i64,
            _ => {
                inferred += 1;
                -1
            }
        })
        .collect();
    // A fixed 0 would mean "copy the input's dim" to Reshape.
    (inferred <= 1 && !t.contains(&0)).then_some(t)
}

/// What one matched layout chain reduces to.
enum Reduced {
    Nothing(ValueId),
    Transpose(ValueId, Vec<usize>),
    Reshape(ValueId, Vec<i64>),
}

fn layout_pats() -> Vec<Pat> {
    let t = |x: Pat| unary("Transpose", x);
    let r = |x: Pat, s: &'static str| op("Reshape", vec![x, sym(s)]);
    vec![
        t(t(sym("x")).named("inner")).named("outer"),
        r(r(sym("x"), "s1").named("inner"), "s2").named("outer"),
        op("Squeeze", vec![op("Unsqueeze", vec![sym("x")]).named("inner")]).named("outer"),
        op("Unsqueeze", vec![op("Squeeze", vec![sym("x")]).named("inner")]).named("outer"),
        r(sym("x"), "s").named("outer"),
        t(sym("x")).named("outer"),
    ]
}

/// The simpler form of one match of `layout_pats`, if there is one.
fn reduce_layout(mx: &Matcher, m: &Match) -> Option<Reduced> {
    let g = mx.g;
    let x = m.value("x");
    let outer = &g.nodes[m.node("outer")];
    let inner = m.nodes.get("inner").map(|&i| &g.nodes[i]);
    let xr = rank(g, x);
    match (outer.op.as_str(), inner.map(|n| n.op.as_str())) {
        ("Transpose", Some(_)) => {
            let r = xr?;
            let (a, b) = (transpose_perm(inner?, r)?, transpose_perm(outer, r)?);
            let p: Vec<usize> = b.iter().map(|&i| a[i]).collect();
            Some(if p.iter().enumerate().all(|(i, &a)| i == a) { Reduced::Nothing(x) } else { Reduced::Transpose(x, p) })
        }
        ("Reshape", Some(_)) => {
            // The outer target alone decides the result unless it copies dims (0) from its input.
            // The outer target alone decides the result unless it has a 0 (a copied dim, or with
            // allowzero an empty one: either way it depends on more than the target).
            let s2 = g.konst(m.value("s2"))?.to_i64_vec().ok()?;
            (!s2.contains(&0)).then(|| Reduced::Reshape(x, s2))
        }
        ("Squeeze", Some(_)) => {
            let r = xr?;
            let (a, b) = (const_axes(g, inner?, r + const_axes_len(g, inner?)?)?, const_axes(g, outer, r + const_axes_len(g, inner?)?)?);
            (a == b).then_some(Reduced::Nothing(x))
        }
        ("Unsqueeze", Some(_)) => {
            let r = xr?;
            let (a, b) = (const_axes(g, inner?, r)?, const_axes(g, outer, r)?);
            (a == b).then_some(Reduced::Nothing(x))
        }
        ("Reshape", None) => {
            let (din, dout) = (dims_of(g, x)?, dims_of(g, outer.output(0)?)?);
            (din == dout && !din.contains(&Dim::Unknown)).then_some(Reduced::Nothing(x))
        }
        ("Transpose", None) => {
            // Only size-1 axes move when the other axes keep their order: a Reshape.
            let (din, dout) = (dims_of(g, x)?, dims_of(g, outer.output(0)?)?);
            let p = transpose_perm(outer, din.len())?;
            let kept: Vec<usize> = p.iter().copied().filter(|&a| din[a] != Dim::Fixed(1)).collect();
            if p.iter().enumerate().all(|(i, &a)| i == a) {
                return Some(Reduced::Nothing(x));
            }
            if !kept.windows(2).all(|w| w[0] < w[1]) {
                return None;
            }
            reshape_target(dout).map(|t| Reduced::Reshape(x, t))
        }
        _ => None,
    }
}

/// How many axes a Squeeze/Unsqueeze lists (to know the rank they are relative to).
fn const_axes_len(g: &Graph, n: &Node) -> Option<usize> {
    match n.attr_ints("axes") {
        Some(a) => Some(a.len()),
        None => Some(g.konst(n.input(1)?)?.len()),
    }
}

impl Pass for CancelLayout {
    fn name(&self) -> &'static str {
        "layout"
    }

    fn run(&self, model: &mut Model) -> Result<(usize, Vec<String>)> {
        let mut notes = Vec::new();
        let mut count = 0;
        // One simplification can expose another (a cancelled pair between two Reshapes), so
        // rounds repeat until nothing changes.
        for _round in 0..8 {
            let before = count;
            for p in layout_pats() {
                count += rewrite_all(&mut model.graph, &p, |mx, m, consts| {
                    let reduced = reduce_layout(mx, m)?;
                    let root = &mx.g.nodes[m.matched[0]];
                    let chain: Vec<&str> = m.matched.iter().rev().map(|&i| mx.g.nodes[i].op.as_str()).collect();
                    if matches!(reduced, Reduced::Reshape(..)) && root.opset < 5 {
                        return None; // Reshape took its target as an attribute then
                    }
                    let (op, inputs, attrs) = match reduced {
                        Reduced::Nothing(x) => ("Identity", vec![Some(x)], vec![]),
                        Reduced::Transpose(x, p) => ("Transpose", vec![Some(x)], vec![ints_attr("perm", &p)]),
                        Reduced::Reshape(x, s) => {
                            let n = s.len();
                            let sv = consts.add(format!("{}.shape", root.name), Tensor::from_vec(&[n], s).ok()?);
                            ("Reshape", vec![Some(x), Some(sv)], vec![])
                        }
                    };
                    notes.push(format!("{}: {} → {}", root.name, chain.join("∘"), if op == "Identity" { "nothing" } else { op }));
                    Some(replacing(mx, m, op, "", root.opset, inputs, attrs))
                });
                // The Identities standing for "nothing" go the way of all Identities.
                EliminateIdentity.run(model)?;
            }
            if count == before {
                break;
            }
        }
        Ok((count, notes))
    }
}

// ---------------------------------------------------------------------------------------------
// rmsnorm
// ---------------------------------------------------------------------------------------------

pub struct FuseRmsNorm;

/// x / √(mean(x²) + eps) · g, with x² as Pow or x·x and the division as Div or ·Reciprocal.
fn rmsnorm_pats() -> Vec<Pat> {
    let x = || sym("x");
    let mut pats = Vec::new();
    for sq in [pow(x(), 2.0), x() * x()] {
        let rms = || sqrt(unary("ReduceMean", sq.clone()).named("mean") + konst("eps"));
        pats.push((x() / rms()) * konst("gamma"));
        pats.push((x() * unary("Reciprocal", rms())) * konst("gamma"));
    }
    pats
}

impl Pass for FuseRmsNorm {
    fn name(&self) -> &'static str {
        "rmsnorm"
    }

    fn run(&self, model: &mut Model) -> Result<(usize, Vec<String>)> {
        let mut count = 0;
        for p in rmsnorm_pats() {
            count += rewrite_all(&mut model.graph, &p, |mx, m, _| {
                let g = mx.g;
                let (x, gamma) = (m.value("x"), m.value("gamma"));
                let r = rank(g, x)?;
                let eps = scalar_of(g, m.value("eps"))?;
                let last = g.values[x].ty.shape()?.last()?.clone();
                let t = g.konst(gamma)?;
                let per_feature = t.dtype() == DType::F32 && t.rank() == 1 && last == Dim::Fixed(t.len());
                let ok = is_f32(g, x) && r >= 1 && per_feature && reduces_last_axis(g, &g.nodes[m.node("mean")], r);
                // RMSNormalization is opset 23; the kernel reads it as that version.
                ok.then(|| {
                    replacing(mx, m, "RMSNormalization", "", 23, vec![Some(x), Some(gamma)], vec![
                        attr("axis", AttrValue::Int(-1)),
                        attr("epsilon", AttrValue::Float(eps)),
                    ])
                })
            });
        }
        Ok((count, vec![]))
    }
}

// ---------------------------------------------------------------------------------------------
// conv-affine
// ---------------------------------------------------------------------------------------------

pub struct FoldConvAffine;

fn conv_affine_pats() -> [Pat; 4] {
    let conv = |o: &'static str| op(o, vec![sym("x"), konst("w")]).named("conv");
    [conv("Conv") * konst("k"), conv("Conv") + konst("k"), conv("ConvTranspose") * konst("k"), conv("ConvTranspose") + konst("k")]
}

/// The per-output-channel values of a constant applied to a Conv output of rank `r` with `m`
/// channels: a scalar, or `m` values along axis 1 (ones elsewhere, right-aligned).
fn per_channel(t: &Tensor, r: usize, m: usize) -> Option<Vec<f32>> {
    if t.dtype() != DType::F32 || t.rank() > r {
        return None;
    }
    let t = t.clone().aligned();
    let v = t.view::<f32>().ok()?;
    if v.len() == 1 {
        return Some(vec![v[0]; m]);
    }
    let off = r - t.rank();
    let ok = t.shape().iter().enumerate().all(|(i, &d)| d == if i + off == 1 { m } else { 1 });
    (ok && v.len() == m).then(|| v.to_vec())
}

impl Pass for FoldConvAffine {
    fn name(&self) -> &'static str {
        "conv-affine"
    }

    fn run(&self, model: &mut Model) -> Result<(usize, Vec<String>)> {
        let mut count = 0;
        // Two rounds: Conv·s + c and (Conv + c)·s both fold completely.
        for p in conv_affine_pats().iter().chain(conv_affine_pats().iter()) {
            count += rewrite_all(&mut model.graph, p, |mx, m, consts| {
                let g = mx.g;
                let root = &g.nodes[m.matched[0]];
                let co = conv_out(mx, m)?;
                let k = per_channel(g.konst(m.value("k"))?, g.konst(m.value("w"))?.rank(), co.m)?;
                let tag = root.op.to_lowercase();
                if root.op == "Mul" {
                    let bias = co.bias.iter().zip(&k).map(|(b, k)| b * k).collect();
                    refold_conv(mx, m, consts, &co, Some(&k), bias, &tag)
                } else {
                    let bias = co.bias.iter().zip(&k).map(|(b, k)| b + k).collect();
                    refold_conv(mx, m, consts, &co, None, bias, &tag)
                }
            });
        }
        Ok((count, vec![]))
    }
}
