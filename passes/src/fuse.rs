//! Fusion passes, each a small named unit over `pattern`'s declarative matcher:
//!
//! - `identity`: Identity and inference-mode Dropout disappear (their readers read the input).
//! - `conv-bn`: Conv followed by BatchNormalization (constant statistics) becomes one Conv with
//!   rescaled weights and bias.
//! - `gelu`, `layernorm`, `hardswish`, `softmax`: decomposed forms exporters emit are recognised
//!   and replaced by the standard ONNX op (Gelu-20, LayerNormalization-17, HardSwish-14,
//!   Softmax-13), which run as one kernel.
//! - `matmul-bias`: MatMul by a constant 2-D weight followed by a constant bias Add becomes
//!   `kiln.FusedMatMul` (A, W, bias); Conv becomes `kiln.FusedConv` when an activation follows.
//! - `epilogue`: an activation after a FusedMatMul / FusedConv / Conv / MatMul moves into that
//!   node's `activation` attribute, applied while the output is still in cache.
//!
//! Every pass leaves the graph computing the same outputs (within float tolerance); the node
//! suite and the real-model goldens run with all of them on.

use std::collections::HashSet;

use kiln_compiler::ir::{AttrValue, Attribute, Graph, Model, Node, ValueId};
use kiln_compiler::pass::Pass;
use kiln_compiler::Result;
use kiln_runtime::{DType, Tensor};

use crate::pattern::{erf, konst, op, pow, rewrite_all, sqrt, sym, tanh, unary, Match, Matcher, Pat};

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

fn conv_bn_pat() -> Pat {
    op("BatchNormalization", vec![op("Conv", vec![sym("x"), konst("w")]).named("conv"), konst("scale"), konst("bias"), konst("mean"), konst("var")])
        .named("bn")
}

fn f32s(g: &Graph, v: ValueId) -> Option<Vec<f32>> {
    let t = g.konst(v)?;
    (t.dtype() == DType::F32).then(|| t.view::<f32>().ok().map(|s| s.to_vec())).flatten()
}

impl Pass for FoldConvBatchNorm {
    fn name(&self) -> &'static str {
        "conv-bn"
    }

    fn run(&self, model: &mut Model) -> Result<(usize, Vec<String>)> {
        let count = rewrite_all(&mut model.graph, &conv_bn_pat(), |mx, m, consts| {
            let g = mx.g;
            let conv = &g.nodes[m.node("conv")];
            let bn = &g.nodes[m.node("bn")];
            // Training-mode outputs (running mean/var) must be unused; Conv has at most a bias.
            if bn.outputs.iter().skip(1).flatten().next().is_some() || conv.inputs.len() > 3 {
                return None;
            }
            let w = f32s(g, m.value("w"))?;
            let (s, b, mu, var) =
                (f32s(g, m.value("scale"))?, f32s(g, m.value("bias"))?, f32s(g, m.value("mean"))?, f32s(g, m.value("var"))?);
            let wshape = g.konst(m.value("w"))?.shape().to_vec();
            let mch = *wshape.first()?;
            if mch == 0 || [s.len(), b.len(), mu.len(), var.len()].iter().any(|&l| l != mch) {
                return None;
            }
            let conv_bias = match conv.input(2) {
                Some(cb) => f32s(g, cb).filter(|v| v.len() == mch)?,
                None => vec![0.0; mch],
            };
            let eps = bn.attr_float("epsilon").unwrap_or(1e-5);
            let per = w.len() / mch;
            let mut w2 = w;
            let mut b2 = vec![0.0f32; mch];
            for c in 0..mch {
                let k = s[c] / (var[c] + eps).sqrt();
                w2[c * per..(c + 1) * per].iter_mut().for_each(|x| *x *= k);
                b2[c] = (conv_bias[c] - mu[c]) * k + b[c];
            }
            let wv = consts.add(format!("{}.w_bn", conv.name), Tensor::from_vec(&wshape, w2).ok()?);
            let bv = consts.add(format!("{}.b_bn", conv.name), Tensor::from_vec(&[mch], b2).ok()?);
            let mut n = replacing(mx, m, "Conv", "", conv.opset, vec![Some(m.value("x")), Some(wv), Some(bv)], conv.attrs.clone());
            n.name = conv.name.clone();
            Some(n)
        });
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
                let (name, params) = activation_of(g, act)?;
                let x = act.input(0)?;
                if !is_f32(g, x) || g.outputs.contains(&x) || uses[x].len() != 1 {
                    return None;
                }
                let pi = producers[x]?;
                let p = &g.nodes[pi];
                let fusable = match (p.domain.as_str(), p.op.as_str()) {
                    (KILN_DOMAIN, "FusedMatMul" | "FusedConv") => p.attr_str("activation").is_none(),
                    ("" | "ai.onnx", "Conv") => p.outputs.len() == 1,
                    _ => false,
                };
                fusable.then(|| (ai, pi, name, params))
            });
            let Some((ai, pi, name, params)) = found else { break };
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
            g.nodes.remove(ai);
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
