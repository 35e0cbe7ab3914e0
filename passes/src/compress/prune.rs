//! Pruning (`--prune`), run on the fused graph before quantization:
//!
//! - `magnitude:S[:global|:layer]`: zero the fraction S of weights with the smallest |w|, ranked
//!   across every prunable weight (global) or within each one. The zeros only pay off on disk:
//!   the artifact writer stores mostly-zero constants sparse-encoded.
//! - `2:4`: in every group of 4 consecutive weights along the reduction axis keep the 2 largest.
//! - `channels:S`: structured. Each output channel space of a Conv/Gemm/MatMul is followed through
//!   everything that keeps channels aligned (activations, per-channel constants, BatchNormalization,
//!   depthwise convs, pooling, Resize, and binary joins, which merge the spaces of both operands so
//!   they are pruned identically) to the ops that reduce over it (the next Conv/MatMul/Gemm/
//!   ConvTranspose). A space is pruned only if every use of every value in it can be rewritten;
//!   anything else (graph outputs, Concat, Reshape, channel-mixing ops) leaves it whole. The
//!   fraction S of its channels with the smallest L1 norm (summed over the layers producing it) is
//!   removed from every producer, consumer, constant and value type, so the model really shrinks.
//!
//! Prunable weights: input 1 of Conv / kiln.FusedConv / MatMul / kiln.FusedMatMul / Gemm (f32
//! constants); for `magnitude` also f32 embedding tables read by Gather (the bulk of a transformer's
//! bytes). With `--calibration` the pass also reports the output error against the unpruned model.

use std::collections::{BTreeMap, HashMap, HashSet};

use kiln_compiler::ir::{AttrValue, Dim, Graph, Model, Node, ValueId};
use kiln_compiler::pass::Pass;
use kiln_runtime::{DType, Error, Result, Tensor};

use super::{calibrate, CompressOptions, Prune};

pub fn pass(p: Prune, opts: &CompressOptions) -> Result<Box<dyn Pass>> {
    Ok(Box::new(PrunePass { prune: p, calibration: opts.calibration.clone() }))
}

struct PrunePass {
    prune: Prune,
    calibration: Option<std::path::PathBuf>,
}

impl Pass for PrunePass {
    fn name(&self) -> &'static str {
        "prune"
    }

    fn run(&self, model: &mut Model) -> Result<(usize, Vec<String>)> {
        let reference = match &self.calibration {
            Some(dir) => {
                let s = calibrate::load_samples(dir, model)?;
                let outs = calibrate::run_outputs(model, &s)?;
                Some((s, outs))
            }
            None => None,
        };
        let before = census(&model.graph);
        let (changes, mut notes) = match self.prune {
            Prune::Magnitude { sparsity, global } => magnitude(&mut model.graph, sparsity, global)?,
            Prune::TwoFour => two_four(&mut model.graph)?,
            Prune::Channels(s) => channels(&mut model.graph, s)?,
        };
        notes.extend(census_notes(&before, &census(&model.graph)));
        if let Some((s, want)) = reference {
            let got = calibrate::run_outputs(model, &s)?;
            notes.extend(output_error(&want, &got));
        }
        Ok((changes, notes))
    }
}

// ---------------------------------------------------------------------------------------------
// Which weights are prunable
// ---------------------------------------------------------------------------------------------

fn is_op(n: &Node, domain: &str, op: &str) -> bool {
    let d = if n.domain == "ai.onnx" { "" } else { n.domain.as_str() };
    d == domain && n.op == op
}

fn f32_const(g: &Graph, v: Option<ValueId>) -> Option<&Tensor> {
    g.konst(v?).filter(|t| t.dtype() == DType::F32)
}

/// How a weight's elements group along its reduction axis: element (o, k, i) of a weight seen as
/// `[outer, k, inner]` sits at `(o * k + k) * inner + i`.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Reduction {
    outer: usize,
    k: usize,
    inner: usize,
}

/// A prunable weight of node `n`: (input index, kind for the report, its reduction layout if it
/// has one).
fn prunable(g: &Graph, n: &Node, with_embeddings: bool) -> Option<(usize, &'static str, Option<Reduction>)> {
    let conv = is_op(n, "", "Conv") || is_op(n, "kiln", "FusedConv");
    let matmul = is_op(n, "", "MatMul") || is_op(n, "kiln", "FusedMatMul");
    if conv {
        let w = f32_const(g, n.input(1))?;
        let s = w.shape();
        (s.len() >= 3).then(|| (1, "Conv", Some(Reduction { outer: s[0], k: s[1..].iter().product(), inner: 1 })))
    } else if matmul {
        let w = f32_const(g, n.input(1))?;
        let s = w.shape();
        let r = s.len();
        (r >= 2 && g.konst(n.input(0)?).is_none()).then(|| {
            let red = Reduction { outer: s[..r - 2].iter().product(), k: s[r - 2], inner: s[r - 1] };
            (1, "MatMul", Some(red))
        })
    } else if is_op(n, "", "Gemm") {
        let w = f32_const(g, n.input(1))?;
        let s = w.shape();
        if s.len() != 2 || g.konst(n.input(0)?).is_some() {
            return None;
        }
        let red = if n.attr_int("transB").unwrap_or(0) != 0 {
            Reduction { outer: s[0], k: s[1], inner: 1 }
        } else {
            Reduction { outer: 1, k: s[0], inner: s[1] }
        };
        Some((1, "Gemm", Some(red)))
    } else if with_embeddings && is_op(n, "", "Gather") && n.attr_int("axis").unwrap_or(0) == 0 {
        let w = f32_const(g, n.input(0))?;
        (w.rank() == 2 && g.konst(n.input(1)?).is_none()).then_some((0, "Gather", None))
    } else {
        None
    }
}

/// Every distinct prunable weight (value id) with its kind and reduction layout, in graph order.
fn prunable_weights(g: &Graph, with_embeddings: bool) -> Vec<(ValueId, &'static str, Option<Reduction>)> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for n in &g.nodes {
        if let Some((i, kind, red)) = prunable(g, n, with_embeddings) {
            let v = n.input(i).expect("prunable checked the input");
            if seen.insert(v) {
                out.push((v, kind, red));
            }
        }
    }
    out
}

/// Per kind: (weights, zero weights), over the prunable weights.
fn census(g: &Graph) -> BTreeMap<&'static str, (usize, usize)> {
    let mut m = BTreeMap::new();
    for (v, kind, _) in prunable_weights(g, true) {
        let w = g.konst(v).and_then(|t| t.view::<f32>().ok()).unwrap_or(&[]);
        let e = m.entry(kind).or_insert((0, 0));
        e.0 += w.len();
        e.1 += w.iter().filter(|x| **x == 0.0).count();
    }
    m
}

fn census_notes(before: &BTreeMap<&str, (usize, usize)>, after: &BTreeMap<&str, (usize, usize)>) -> Vec<String> {
    let pct = |z: usize, n: usize| if n == 0 { 0.0 } else { 100.0 * z as f64 / n as f64 };
    let mut notes = Vec::new();
    let (mut nb, mut na, mut zb, mut za) = (0, 0, 0, 0);
    for (kind, &(n1, z1)) in before {
        let (n2, z2) = after.get(kind).copied().unwrap_or((0, 0));
        notes.push(format!(
            "{kind}: {n1} weights ({:.1}% zero) -> {n2} weights ({:.1}% zero), {} non-zero -> {}",
            pct(z1, n1),
            pct(z2, n2),
            n1 - z1,
            n2 - z2
        ));
        (nb, na, zb, za) = (nb + n1, na + n2, zb + z1, za + z2);
    }
    notes.push(format!(
        "all prunable weights: {nb} ({:.1}% zero) -> {na} ({:.1}% zero); non-zero {} -> {}",
        pct(zb, nb),
        pct(za, na),
        nb - zb,
        na - za
    ));
    notes
}

/// Cosine and max abs error of each output over the samples, pruned vs unpruned.
fn output_error(want: &[Vec<Tensor>], got: &[Vec<Tensor>]) -> Vec<String> {
    let n_out = want.first().map_or(0, |w| w.len());
    (0..n_out)
        .map(|k| {
            let (mut cos_sum, mut max_abs, mut n) = (0.0f64, 0.0f64, 0usize);
            for (w, g) in want.iter().zip(got) {
                let (Ok(a), Ok(b)) = (w[k].to_f64_vec(), g[k].to_f64_vec()) else { continue };
                if a.len() != b.len() {
                    continue;
                }
                let dot: f64 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
                let na: f64 = a.iter().map(|x| x * x).sum::<f64>().sqrt();
                let nb: f64 = b.iter().map(|x| x * x).sum::<f64>().sqrt();
                cos_sum += if na == 0.0 && nb == 0.0 { 1.0 } else { dot / (na * nb).max(f64::MIN_POSITIVE) };
                max_abs = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(max_abs, f64::max);
                n += 1;
            }
            format!(
                "output {k} vs unpruned on {n} calibration samples: mean cosine {:.5}, max abs error {:.4}",
                cos_sum / n.max(1) as f64,
                max_abs
            )
        })
        .collect()
}

/// Replace constant `v`'s data (every reader sees the pruned weight).
fn set_const(g: &mut Graph, v: ValueId, data: Vec<f32>) -> Result<()> {
    let shape = g.konst(v).map(|t| t.shape().to_vec()).unwrap_or_default();
    g.values[v].konst = Some(Tensor::from_vec(&shape, data)?);
    Ok(())
}

fn weights_of(g: &Graph, v: ValueId) -> Result<Vec<f32>> {
    Ok(g.konst(v).ok_or_else(|| Error::Other("prune: weight is not a constant".into()))?.view::<f32>()?.to_vec())
}

// ---------------------------------------------------------------------------------------------
// magnitude
// ---------------------------------------------------------------------------------------------

/// Zero the `k` smallest-magnitude entries of `w` (exactly `k`, ties broken by position).
fn zero_smallest(w: &mut [f32], k: usize) {
    if k == 0 {
        return;
    }
    if k >= w.len() {
        w.fill(0.0);
        return;
    }
    let mut mags: Vec<f32> = w.iter().map(|x| x.abs()).collect();
    let thr = *mags.select_nth_unstable_by(k - 1, |a, b| a.total_cmp(b)).1;
    zero_below(w, thr, k);
}

/// Zero every entry with |x| < thr, then entries with |x| == thr until `k` are zeroed in all.
fn zero_below(w: &mut [f32], thr: f32, k: usize) -> usize {
    let mut left = k;
    for x in w.iter_mut() {
        if x.abs() < thr && left > 0 {
            *x = 0.0;
            left -= 1;
        }
    }
    for x in w.iter_mut() {
        if left == 0 {
            break;
        }
        if x.abs() == thr && *x != 0.0 {
            *x = 0.0;
            left -= 1;
        }
    }
    k - left
}

fn magnitude(g: &mut Graph, sparsity: f32, global: bool) -> Result<(usize, Vec<String>)> {
    let weights = prunable_weights(g, true);
    if global {
        let mut mags: Vec<f32> = Vec::new();
        for &(v, _, _) in &weights {
            mags.extend(g.konst(v).unwrap().view::<f32>()?.iter().map(|x| x.abs()));
        }
        let k = (sparsity as f64 * mags.len() as f64) as usize;
        if k == 0 || mags.is_empty() {
            return Ok((0, vec!["no weights to prune".into()]));
        }
        let thr = *mags.select_nth_unstable_by(k - 1, |a, b| a.total_cmp(b)).1;
        // Strictly smaller ones first everywhere, then ties, so the global count is exact.
        let below = mags.iter().filter(|x| **x < thr).count();
        drop(mags);
        let mut ties_left = k - below;
        for &(v, _, _) in &weights {
            let mut w = weights_of(g, v)?;
            let lt = w.iter().filter(|x| x.abs() < thr).count();
            let eq = w.iter().filter(|x| x.abs() == thr && **x != 0.0).count().min(ties_left);
            ties_left -= eq;
            zero_below(&mut w, thr, lt + eq);
            set_const(g, v, w)?;
        }
    } else {
        for &(v, _, _) in &weights {
            let mut w = weights_of(g, v)?;
            let k = (sparsity as f64 * w.len() as f64) as usize;
            zero_smallest(&mut w, k);
            set_const(g, v, w)?;
        }
    }
    let how = if global { "global" } else { "per layer" };
    Ok((weights.len(), vec![format!("magnitude {how}: {} weight tensors pruned to {:.0}%", weights.len(), sparsity * 100.0)]))
}

// ---------------------------------------------------------------------------------------------
// 2:4
// ---------------------------------------------------------------------------------------------

/// In every group of 4 consecutive entries along `red.k` keep the 2 of largest magnitude (a short
/// last group of 3 keeps 2 as well; groups of 1-2 keep all).
fn two_four_weights(w: &mut [f32], red: Reduction) {
    for o in 0..red.outer {
        for i in 0..red.inner {
            let at = |kk: usize| (o * red.k + kk) * red.inner + i;
            for k0 in (0..red.k).step_by(4) {
                let idx: Vec<usize> = (k0..(k0 + 4).min(red.k)).map(at).collect();
                if idx.len() <= 2 {
                    continue;
                }
                let mut order = idx.clone();
                // Largest first; on equal magnitude the earlier one wins.
                order.sort_by(|&a, &b| w[b].abs().total_cmp(&w[a].abs()).then(a.cmp(&b)));
                for &j in &order[2..] {
                    w[j] = 0.0;
                }
            }
        }
    }
}

fn two_four(g: &mut Graph) -> Result<(usize, Vec<String>)> {
    let weights: Vec<_> = prunable_weights(g, false).into_iter().filter_map(|(v, _, r)| Some((v, r?))).collect();
    for &(v, red) in &weights {
        let mut w = weights_of(g, v)?;
        two_four_weights(&mut w, red);
        set_const(g, v, w)?;
    }
    Ok((weights.len(), vec![format!("2:4: {} weight tensors", weights.len())]))
}

// ---------------------------------------------------------------------------------------------
// channels
// ---------------------------------------------------------------------------------------------

/// Ops that apply per element and keep their first input's layout (other inputs, if any, must be
/// scalar constants).
const UNARY: &[&str] = &[
    "Relu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "LeakyRelu", "Elu", "Selu", "Celu", "Gelu",
    "Erf", "Exp", "Abs", "Neg", "Sqrt", "Softplus", "Softsign", "Mish", "Identity", "Clip", "Cast",
    "Floor", "Ceil", "Round", "Reciprocal", "ThresholdedRelu", "Sin", "Cos", "Dropout",
];

/// Elementwise binary ops whose operands broadcast against each other.
const BINARY: &[&str] = &["Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "PRelu"];

/// Ops over N,C,spatial... that keep channel c of the input in channel c of the output.
const CHANNELWISE: &[&str] = &["GlobalAveragePool", "GlobalMaxPool", "MaxPool", "AveragePool", "LpPool"];

/// One rewrite to apply once the kept channels of `space` are known.
#[derive(Clone, Debug)]
enum Edit {
    /// Keep only the kept channels along `axis` of the constant at `node`'s input `input`.
    Slice { node: usize, input: usize, axis: usize, space: usize },
    /// Set a depthwise conv's `group` to the number of kept channels.
    Group { node: usize, space: usize },
    /// Set the channel dim (`pos` from the end) of value `value`'s type.
    Type { value: ValueId, pos: usize, space: usize },
}

/// Channel spaces with union-find.
#[derive(Default)]
struct Spaces {
    parent: Vec<usize>,
    channels: Vec<usize>,
    frozen: Vec<bool>,
    /// Producers: (node, weight input, output-channel axis of the weight).
    roots: Vec<Vec<(usize, usize, usize)>>,
}

impl Spaces {
    fn new_space(&mut self, channels: usize) -> usize {
        self.parent.push(self.parent.len());
        self.channels.push(channels);
        self.frozen.push(channels < 2);
        self.roots.push(Vec::new());
        self.parent.len() - 1
    }

    fn find(&mut self, mut s: usize) -> usize {
        while self.parent[s] != s {
            self.parent[s] = self.parent[self.parent[s]];
            s = self.parent[s];
        }
        s
    }

    fn freeze(&mut self, s: usize) {
        let r = self.find(s);
        self.frozen[r] = true;
    }

    fn union(&mut self, a: usize, b: usize) -> usize {
        let (a, b) = (self.find(a), self.find(b));
        if a == b {
            return a;
        }
        self.parent[b] = a;
        let roots = std::mem::take(&mut self.roots[b]);
        self.roots[a].extend(roots);
        self.frozen[a] |= self.frozen[b] || self.channels[a] != self.channels[b];
        a
    }
}

/// Static facts about the graph the channel analysis reads.
struct Analysis<'g> {
    g: &'g Graph,
    sp: Spaces,
    /// value -> (space, channel position counted from the end: 1 = last axis).
    of: HashMap<ValueId, (usize, usize)>,
    edits: Vec<Edit>,
}

fn rank_of(g: &Graph, v: ValueId) -> Option<usize> {
    g.values[v].ty.shape().map(|s| s.len()).or_else(|| g.konst(v).map(|t| t.rank()))
}

fn dim_at(g: &Graph, v: ValueId, pos: usize) -> Option<Dim> {
    let s = g.values[v].ty.shape()?;
    (pos <= s.len()).then(|| s[s.len() - pos].clone())
}

impl<'g> Analysis<'g> {
    fn new(g: &'g Graph) -> Self {
        Analysis { g, sp: Spaces::default(), of: HashMap::new(), edits: Vec::new() }
    }

    fn assign(&mut self, v: ValueId, space: usize, pos: usize) {
        match self.of.get(&v).copied() {
            Some((s, p)) if p == pos => {
                self.sp.union(s, space);
            }
            Some((s, _)) => {
                self.sp.freeze(s);
                self.sp.freeze(space);
            }
            None => {
                self.of.insert(v, (space, pos));
                self.edits.push(Edit::Type { value: v, pos, space });
            }
        }
    }

    /// The channel count of a constant input `c` broadcast against a value whose channels are at
    /// `pos` from the end: Some(axis) if it holds one entry per channel there, None if it
    /// broadcasts (size 1 / too short), Err if it cannot follow the pruning.
    fn const_axis(&self, c: &Tensor, pos: usize, channels: usize) -> std::result::Result<Option<usize>, ()> {
        let s = c.shape();
        if pos > s.len() || s[s.len() - pos] == 1 {
            return Ok(None);
        }
        if s[s.len() - pos] == channels {
            Ok(Some(s.len() - pos))
        } else {
            Err(())
        }
    }

    fn run(&mut self) {
        let g = self.g;
        for (ni, n) in g.nodes.iter().enumerate() {
            self.visit(ni, n);
        }
        for &o in &g.outputs {
            if let Some(&(s, _)) = self.of.get(&o) {
                self.sp.freeze(s);
            }
        }
    }

    /// Record what node `ni` does with the spaced values it reads and writes.
    fn visit(&mut self, ni: usize, n: &Node) {
        let spaced: Vec<(usize, ValueId, usize, usize)> = n
            .inputs
            .iter()
            .enumerate()
            .filter_map(|(i, v)| {
                let v = (*v)?;
                self.of.get(&v).map(|&(s, p)| (i, v, s, p))
            })
            .collect();
        let handled = if spaced.is_empty() { true } else { self.consume(ni, n, &spaced) };
        if !handled {
            for &(_, _, s, _) in &spaced {
                self.sp.freeze(s);
            }
            // Anything it produces from frozen channels is not a space of its own either.
        }
        self.maybe_root(ni, n);
    }

    /// Conv/FusedConv (group 1), MatMul/FusedMatMul, Gemm with constant weights start a space.
    fn maybe_root(&mut self, ni: usize, n: &Node) {
        let g = self.g;
        let Some(out) = n.output(0) else { return };
        if n.outputs.iter().skip(1).any(|o| o.is_some()) {
            return;
        }
        let conv = is_op(n, "", "Conv") || is_op(n, "kiln", "FusedConv");
        let matmul = is_op(n, "", "MatMul") || is_op(n, "kiln", "FusedMatMul");
        let Some(w) = f32_const(g, n.input(1)) else { return };
        let bias = n.input(2);
        if bias.is_some_and(|b| f32_const(g, Some(b)).is_none()) {
            return;
        }
        let (channels, w_axis, pos) = if conv {
            if n.attr_int("group").unwrap_or(1) != 1 || w.rank() < 3 {
                return;
            }
            (w.shape()[0], 0, w.rank() - 1)
        } else if matmul {
            if w.rank() != 2 || n.input(0).is_none_or(|a| g.konst(a).is_some()) {
                return;
            }
            (w.shape()[1], 1, 1)
        } else if is_op(n, "", "Gemm") {
            if w.rank() != 2 || n.attr_int("transA").unwrap_or(0) != 0 {
                return;
            }
            let tb = n.attr_int("transB").unwrap_or(0) != 0;
            (w.shape()[if tb { 0 } else { 1 }], if tb { 0 } else { 1 }, 1)
        } else {
            return;
        };
        // The bias must hold one entry per output channel (or broadcast).
        if let Some(b) = bias.and_then(|b| g.konst(b)) {
            if self.const_axis(b, 1, channels).is_err() {
                return;
            }
        }
        let s = self.sp.new_space(channels);
        self.sp.roots[s].push((ni, 1, w_axis));
        self.edits.push(Edit::Slice { node: ni, input: 1, axis: w_axis, space: s });
        if let Some(b) = bias.and_then(|b| g.konst(b)) {
            if let Ok(Some(axis)) = self.const_axis(b, 1, channels) {
                self.edits.push(Edit::Slice { node: ni, input: 2, axis, space: s });
            }
        }
        self.assign(out, s, pos);
    }

    /// Whether every spaced input of node `ni` can follow its space's pruning (recording how).
    fn consume(&mut self, ni: usize, n: &Node, spaced: &[(usize, ValueId, usize, usize)]) -> bool {
        let g = self.g;
        let onnx = n.domain.is_empty() || n.domain == "ai.onnx";
        let op = n.op.as_str();
        let (i0, _, s0, p0) = spaced[0];
        let channels = self.sp.channels[s0];
        let other_inputs_scalar = |from: usize| {
            n.inputs.iter().skip(from).flatten().all(|&v| g.konst(v).is_some_and(|t| t.len() <= 1))
        };
        let conv = is_op(n, "", "Conv") || is_op(n, "kiln", "FusedConv");
        let matmul = is_op(n, "", "MatMul") || is_op(n, "kiln", "FusedMatMul");
        if spaced.len() == 1 && i0 == 0 && conv {
            let Some(w) = f32_const(g, n.input(1)) else { return false };
            let group = n.attr_int("group").unwrap_or(1) as usize;
            if p0 + 1 != w.rank() {
                return false;
            }
            if group == 1 && w.shape()[1] == channels {
                self.edits.push(Edit::Slice { node: ni, input: 1, axis: 1, space: s0 });
                return true;
            }
            // Depthwise: channel c in, channel c out; prune the conv with its input.
            let depthwise = group == channels && w.shape()[0] == channels && w.shape()[1] == 1;
            let bias_ok = n.input(2).is_none_or(|b| f32_const(g, Some(b)).is_some_and(|t| t.shape() == [channels]));
            let Some(out) = n.output(0) else { return false };
            if !depthwise || !bias_ok || n.outputs.len() > 1 {
                return false;
            }
            self.edits.push(Edit::Slice { node: ni, input: 1, axis: 0, space: s0 });
            if n.input(2).is_some() {
                self.edits.push(Edit::Slice { node: ni, input: 2, axis: 0, space: s0 });
            }
            self.edits.push(Edit::Group { node: ni, space: s0 });
            self.assign(out, s0, p0);
            return true;
        }
        if spaced.len() == 1 && i0 == 0 && matmul {
            let Some(w) = f32_const(g, n.input(1)) else { return false };
            if p0 != 1 || w.rank() != 2 || w.shape()[0] != channels {
                return false;
            }
            self.edits.push(Edit::Slice { node: ni, input: 1, axis: 0, space: s0 });
            return true;
        }
        if !onnx {
            return false;
        }
        match op {
            "Gemm" if spaced.len() == 1 && i0 == 0 => {
                let Some(w) = f32_const(g, n.input(1)) else { return false };
                let tb = n.attr_int("transB").unwrap_or(0) != 0;
                let axis = if tb { 1 } else { 0 };
                if p0 != 1 || n.attr_int("transA").unwrap_or(0) != 0 || w.rank() != 2 || w.shape()[axis] != channels {
                    return false;
                }
                self.edits.push(Edit::Slice { node: ni, input: 1, axis, space: s0 });
                true
            }
            "ConvTranspose" if spaced.len() == 1 && i0 == 0 => {
                let Some(w) = f32_const(g, n.input(1)) else { return false };
                let ok = n.attr_int("group").unwrap_or(1) == 1 && p0 + 1 == w.rank() && w.shape()[0] == channels;
                if ok {
                    self.edits.push(Edit::Slice { node: ni, input: 1, axis: 0, space: s0 });
                }
                ok
            }
            _ if UNARY.contains(&op) && spaced.len() == 1 && i0 == 0 && other_inputs_scalar(1) => {
                if op == "Dropout" && n.outputs.iter().skip(1).any(|o| o.is_some()) {
                    return false;
                }
                if let Some(out) = n.output(0) {
                    self.assign(out, s0, p0);
                }
                true
            }
            _ if CHANNELWISE.contains(&op) && spaced.len() == 1 && i0 == 0 && n.inputs.len() == 1 => {
                let Some(out) = n.output(0) else { return false };
                if n.outputs.iter().skip(1).any(|o| o.is_some()) || rank_of(g, out).is_none_or(|r| r != p0 + 1) {
                    return false;
                }
                self.assign(out, s0, p0);
                true
            }
            "BatchNormalization" | "InstanceNormalization" if spaced.len() == 1 && i0 == 0 => {
                let Some(out) = n.output(0) else { return false };
                let params: Vec<usize> = (1..n.inputs.len()).collect();
                let ok = n.outputs.iter().skip(1).all(|o| o.is_none())
                    && rank_of(g, out).is_some_and(|r| r == p0 + 1)
                    && params.iter().all(|&i| f32_const(g, n.input(i)).is_some_and(|t| t.shape() == [channels]));
                if !ok {
                    return false;
                }
                for i in params {
                    self.edits.push(Edit::Slice { node: ni, input: i, axis: 0, space: s0 });
                }
                self.assign(out, s0, p0);
                true
            }
            "Resize" | "Upsample" if spaced.len() == 1 && i0 == 0 => {
                // Scales leave channels alone only when their channel entry is 1; sizes name the
                // channel count, so they must be absent.
                let Some(out) = n.output(0) else { return false };
                let sizes_absent = n.input(3).is_none_or(|v| g.konst(v).is_some_and(|t| t.is_empty()));
                let scales_idx = if op == "Resize" { 2 } else { 1 };
                let scales_ok = n.input(scales_idx).is_none_or(|v| {
                    g.konst(v).and_then(|t| t.to_f64_vec().ok()).is_some_and(|s| {
                        s.is_empty() || (s.len() == p0 + 1 && s[1] == 1.0)
                    })
                });
                let inputs_const = n.inputs.iter().skip(1).flatten().all(|&v| g.konst(v).is_some());
                if !(sizes_absent && scales_ok && inputs_const) {
                    return false;
                }
                self.assign(out, s0, p0);
                true
            }
            _ if BINARY.contains(&op) => self.binary(ni, n, spaced),
            _ => false,
        }
    }

    /// Elementwise join: spaced operands merge into one space; constants follow it; other
    /// operands must broadcast over channels.
    fn binary(&mut self, ni: usize, n: &Node, spaced: &[(usize, ValueId, usize, usize)]) -> bool {
        let g = self.g;
        let (_, _, s0, p0) = spaced[0];
        if spaced.iter().any(|&(_, _, _, p)| p != p0) {
            return false;
        }
        let mut s = s0;
        for &(_, _, si, _) in &spaced[1..] {
            s = self.sp.union(s, si);
        }
        let root = self.sp.find(s);
        let channels = self.sp.channels[root];
        for (i, v) in n.inputs.iter().enumerate() {
            let Some(v) = *v else { continue };
            if spaced.iter().any(|&(j, ..)| j == i) {
                continue;
            }
            if let Some(c) = g.konst(v) {
                match self.const_axis(c, p0, channels) {
                    Ok(Some(axis)) => self.edits.push(Edit::Slice { node: ni, input: i, axis, space: s }),
                    Ok(None) => {}
                    Err(()) => return false,
                }
            } else if !matches!(dim_at(g, v, p0), Some(Dim::Fixed(1))) && rank_of(g, v).is_none_or(|r| r >= p0) {
                return false;
            }
        }
        let Some(out) = n.output(0) else { return false };
        self.assign(out, s, p0);
        true
    }
}

/// Keep `keep` (sorted indices) along `axis` of `t`.
fn slice_axis(t: &Tensor, axis: usize, keep: &[usize]) -> Result<Tensor> {
    let s = t.shape();
    let esize = t.dtype().size();
    let outer: usize = s[..axis].iter().product();
    let dim = s[axis];
    let inner: usize = s[axis + 1..].iter().product::<usize>() * esize;
    let src = t.bytes();
    let mut out = Vec::with_capacity(outer * keep.len() * inner);
    for o in 0..outer {
        for &k in keep {
            let at = (o * dim + k) * inner;
            out.extend_from_slice(&src[at..at + inner]);
        }
    }
    let mut shape = s.to_vec();
    shape[axis] = keep.len();
    Tensor::from_bytes(t.dtype(), &shape, &out)
}

/// L1 norm of each slice of `t` along `axis`.
fn l1_along(t: &Tensor, axis: usize) -> Result<Vec<f64>> {
    let s = t.shape();
    let w = t.view::<f32>()?;
    let dim = s[axis];
    let inner: usize = s[axis + 1..].iter().product();
    let mut out = vec![0.0f64; dim];
    for (i, x) in w.iter().enumerate() {
        out[(i / inner) % dim] += x.abs() as f64;
    }
    Ok(out)
}

/// The channels each prunable space keeps, by L1 norm of its producers' filters.
fn choose(g: &Graph, sp: &mut Spaces, fraction: f32) -> Result<HashMap<usize, Vec<usize>>> {
    let mut keep = HashMap::new();
    for s in 0..sp.parent.len() {
        if sp.find(s) != s || sp.frozen[s] {
            continue;
        }
        let c = sp.channels[s];
        let mut score = vec![0.0f64; c];
        for &(ni, input, axis) in &sp.roots[s] {
            let w = g.konst(g.nodes[ni].input(input).unwrap()).unwrap();
            let l1 = l1_along(w, axis)?;
            // Normalised per producer, so every producer of a joined space counts equally.
            let mean = l1.iter().sum::<f64>() / c as f64;
            for (a, b) in score.iter_mut().zip(&l1) {
                *a += b / mean.max(f64::MIN_POSITIVE);
            }
        }
        let remove = ((c as f64 * fraction as f64) as usize).min(c - 1);
        if remove == 0 {
            continue;
        }
        let mut order: Vec<usize> = (0..c).collect();
        order.sort_by(|&a, &b| score[b].total_cmp(&score[a]).then(a.cmp(&b)));
        let mut kept: Vec<usize> = order[..c - remove].to_vec();
        kept.sort_unstable();
        keep.insert(s, kept);
    }
    Ok(keep)
}

fn channels(g: &mut Graph, fraction: f32) -> Result<(usize, Vec<String>)> {
    let (mut sp, edits) = {
        let mut a = Analysis::new(g);
        a.run();
        (a.sp, a.edits)
    };
    let keep = choose(g, &mut sp, fraction)?;
    for e in &edits {
        match *e {
            Edit::Slice { node, input, axis, space } => {
                let Some(k) = keep.get(&sp.find(space)) else { continue };
                let v = g.nodes[node].input(input).expect("edit input exists");
                let t = g.konst(v).expect("edit input is constant").clone();
                let new = slice_axis(&t, axis, k)?;
                let name = format!("{}_pruned", g.values[v].name);
                let nv = g.add_const(name, new);
                g.nodes[node].inputs[input] = Some(nv);
            }
            Edit::Group { node, space } => {
                let Some(k) = keep.get(&sp.find(space)) else { continue };
                let n = &mut g.nodes[node];
                match n.attrs.iter_mut().find(|a| a.name == "group") {
                    Some(a) => a.value = AttrValue::Int(k.len() as i64),
                    None => unreachable!("depthwise conv has a group attribute"),
                }
            }
            Edit::Type { value, pos, space } => {
                let Some(k) = keep.get(&sp.find(space)) else { continue };
                if let kiln_compiler::ir::Type::Tensor { shape: Some(s), .. } = &mut g.values[value].ty {
                    if pos <= s.len() {
                        let at = s.len() - pos;
                        s[at] = Dim::Fixed(k.len());
                    }
                }
            }
        }
    }
    let reps: Vec<usize> = (0..sp.parent.len()).filter(|&s| sp.find(s) == s).collect();
    let groups = reps.len();
    let layers: usize = keep.keys().map(|&s| sp.roots[s].len()).sum();
    let (total, removed): (usize, usize) = keep.iter().fold((0, 0), |(t, r), (&s, k)| (t + sp.channels[s], r + sp.channels[s] - k.len()));
    let all_channels: usize = reps.iter().map(|&s| sp.channels[s]).sum();
    let notes = vec![format!(
        "channels: pruned {} of {groups} channel groups ({layers} producing layers): removed {removed} of {total} channels \
         ({} channels in groups left whole: graph outputs, Concat or ops that mix channels)",
        keep.len(),
        all_channels - total
    )];
    Ok((removed, notes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_compiler::ir::{Attribute, Type};

    fn t(shape: &[usize], v: Vec<f32>) -> Tensor {
        Tensor::from_vec(shape, v).unwrap()
    }

    fn node(g: &mut Graph, op: &str, ins: &[ValueId], attrs: Vec<(&str, AttrValue)>) -> ValueId {
        let out = g.add_value(format!("{op}{}", g.nodes.len()), Type::Unknown);
        g.nodes.push(Node {
            name: format!("n{}", g.nodes.len()),
            op: op.into(),
            domain: String::new(),
            opset: 17,
            inputs: ins.iter().map(|&v| Some(v)).collect(),
            outputs: vec![Some(out)],
            attrs: attrs.into_iter().map(|(n, v)| Attribute { name: n.into(), value: v }).collect(),
        });
        out
    }

    /// Deterministic pseudo-random values in [-1, 1).
    fn vals(n: usize, seed: u32) -> Vec<f32> {
        let mut x = seed.wrapping_mul(747796405).wrapping_add(2891336453);
        (0..n)
            .map(|_| {
                x = x.wrapping_mul(1664525).wrapping_add(1013904223);
                (x >> 8) as f32 / (1u32 << 23) as f32 - 1.0
            })
            .collect()
    }

    fn model(g: Graph) -> Model {
        let mut m = Model { graph: g, opsets: vec![(String::new(), 17)], ..Default::default() };
        kiln_compiler::infer::infer_types(&mut m).unwrap();
        m
    }

    fn run(m: &Model, x: &Tensor) -> Vec<Tensor> {
        let s = calibrate::Samples { names: vec!["x".into()], samples: vec![vec![x.clone()]] };
        calibrate::run_outputs(m, &s).unwrap().remove(0)
    }

    fn assert_close(a: &Tensor, b: &Tensor) {
        assert_eq!(a.shape(), b.shape());
        for (x, y) in a.view::<f32>().unwrap().iter().zip(b.view::<f32>().unwrap()) {
            assert!((x - y).abs() <= 1e-5 + 1e-4 * y.abs(), "{x} vs {y}");
        }
    }

    /// Zero entries `chans` of `v` along `axis` of `shape`.
    fn zero_channels(v: &mut [f32], shape: &[usize], axis: usize, chans: &[usize]) {
        let inner: usize = shape[axis + 1..].iter().product();
        for (i, x) in v.iter_mut().enumerate() {
            if chans.contains(&((i / inner) % shape[axis])) {
                *x = 0.0;
            }
        }
    }

    /// conv → relu → depthwise → BN → SE (GAP → conv → HardSigmoid → Mul join) → per-channel Mul
    /// → scalar Add → conv. Channels 1 and 5 carry nothing (zero filters, biases and consumer
    /// weights), so removing them must leave the output unchanged.
    fn se_block(dead: &[usize]) -> (Model, Vec<ValueId>) {
        let mut g = Graph::default();
        let x = g.add_value("x", Type::tensor(DType::F32, vec![Dim::Fixed(1), Dim::Fixed(4), Dim::Fixed(5), Dim::Fixed(5)]));
        g.inputs.push(x);
        let mut w1 = vals(32, 1);
        zero_channels(&mut w1, &[8, 4, 1, 1], 0, dead);
        let mut b1 = vals(8, 2);
        zero_channels(&mut b1, &[8], 0, dead);
        let w1 = g.add_const("w1", t(&[8, 4, 1, 1], w1));
        let b1 = g.add_const("b1", t(&[8], b1));
        let c1 = node(&mut g, "Conv", &[x, w1, b1], vec![]);
        let r = node(&mut g, "Relu", &[c1], vec![]);
        let wd = g.add_const("wd", t(&[8, 1, 3, 3], vals(72, 3)));
        let mut bd = vals(8, 4);
        zero_channels(&mut bd, &[8], 0, dead);
        let bd = g.add_const("bd", t(&[8], bd));
        let d = node(&mut g, "Conv", &[r, wd, bd], vec![("group", AttrValue::Int(8)), ("pads", AttrValue::Ints(vec![1; 4]))]);
        let mut bn_bias = vals(8, 5);
        zero_channels(&mut bn_bias, &[8], 0, dead);
        let (sc, bb) = (g.add_const("sc", t(&[8], vals(8, 6))), g.add_const("bb", t(&[8], bn_bias)));
        let (mean, var) = (g.add_const("mean", t(&[8], vec![0.0; 8])), g.add_const("var", t(&[8], vec![1.5; 8])));
        let bn = node(&mut g, "BatchNormalization", &[d, sc, bb, mean, var], vec![]);
        let gap = node(&mut g, "GlobalAveragePool", &[bn], vec![]);
        let mut ws = vals(64, 7);
        zero_channels(&mut ws, &[8, 8, 1, 1], 0, dead);
        let ws = g.add_const("ws", t(&[8, 8, 1, 1], ws));
        let se = node(&mut g, "Conv", &[gap, ws], vec![]);
        let hs = node(&mut g, "HardSigmoid", &[se], vec![]);
        let m = node(&mut g, "Mul", &[bn, hs], vec![]);
        let pc = g.add_const("pc", t(&[1, 8, 1, 1], vals(8, 8)));
        let k = node(&mut g, "Mul", &[pc, m], vec![]);
        let half = g.add_const("half", t(&[], vec![0.5]));
        let a = node(&mut g, "Add", &[k, half], vec![]);
        let mut w2 = vals(24, 9);
        zero_channels(&mut w2, &[3, 8, 1, 1], 1, dead);
        let w2 = g.add_const("w2", t(&[3, 8, 1, 1], w2));
        let y = node(&mut g, "Conv", &[a, w2], vec![]);
        g.outputs.push(y);
        (model(g), vec![c1, d, bn, se, m, a])
    }

    fn weight_shape(m: &Model, node: usize, input: usize) -> Vec<usize> {
        m.graph.konst(m.graph.nodes[node].input(input).unwrap()).unwrap().shape().to_vec()
    }

    #[test]
    fn channels_removes_dead_channels_through_every_consumer() {
        let (mut m, spaced) = se_block(&[1, 5]);
        let x = t(&[1, 4, 5, 5], vals(100, 10));
        let want = run(&m, &x);
        let (removed, notes) = channels(&mut m.graph, 0.25).unwrap();
        assert_eq!(removed, 2, "{notes:?}");
        assert_eq!(weight_shape(&m, 0, 1), [6, 4, 1, 1]);
        assert_eq!(weight_shape(&m, 0, 2), [6]);
        assert_eq!(weight_shape(&m, 2, 1), [6, 1, 3, 3]);
        assert_eq!(m.graph.nodes[2].attr_int("group"), Some(6));
        for i in 1..=4 {
            assert_eq!(weight_shape(&m, 3, i), [6]);
        }
        assert_eq!(weight_shape(&m, 5, 1), [6, 6, 1, 1]);
        assert_eq!(weight_shape(&m, 8, 0), [1, 6, 1, 1]);
        assert_eq!(weight_shape(&m, 10, 1), [3, 6, 1, 1]);
        for v in spaced {
            assert_eq!(m.graph.values[v].ty.shape().unwrap()[1], Dim::Fixed(6));
        }
        // The kept channels are the live ones: the output is unchanged.
        assert_close(&run(&m, &x)[0], &want[0]);
        kiln_compiler::infer::infer_types(&mut m).unwrap();
        assert_close(&run(&m, &x)[0], &want[0]);
    }

    #[test]
    fn channels_leaves_spaces_that_reach_an_output_or_an_unknown_op() {
        let (mut m, spaced) = se_block(&[1, 5]);
        // The SE-joined space now also reaches a graph output.
        m.graph.outputs.push(spaced[4]);
        let (removed, _) = channels(&mut m.graph, 0.25).unwrap();
        assert_eq!(removed, 0);
        assert_eq!(weight_shape(&m, 0, 1), [8, 4, 1, 1]);

        let (mut m, spaced) = se_block(&[1, 5]);
        let f = node(&mut m.graph, "Flatten", &[spaced[5]], vec![]);
        m.graph.outputs.push(f);
        assert_eq!(channels(&mut m.graph, 0.25).unwrap().0, 0);
    }

    #[test]
    fn channels_prunes_matmul_chains() {
        let mut g = Graph::default();
        let x = g.add_value("x", Type::tensor(DType::F32, vec![Dim::Fixed(2), Dim::Fixed(3), Dim::Fixed(4)]));
        g.inputs.push(x);
        let mut w1 = vals(40, 1);
        zero_channels(&mut w1, &[4, 10], 1, &[0, 3, 7]);
        let w1 = g.add_const("w1", t(&[4, 10], w1));
        let mut b = vals(10, 2);
        zero_channels(&mut b, &[10], 0, &[0, 3, 7]);
        let b = g.add_const("b", t(&[10], b));
        let h = node(&mut g, "MatMul", &[x, w1], vec![]);
        let hb = node(&mut g, "Add", &[h, b], vec![]);
        let r = node(&mut g, "Relu", &[hb], vec![]);
        let w2 = g.add_const("w2", t(&[10, 5], vals(50, 3)));
        let y = node(&mut g, "MatMul", &[r, w2], vec![]);
        g.outputs.push(y);
        let mut m = model(g);
        let x = t(&[2, 3, 4], vals(24, 4));
        let want = run(&m, &x);
        let (removed, _) = channels(&mut m.graph, 0.3).unwrap();
        assert_eq!(removed, 3);
        assert_eq!(weight_shape(&m, 0, 1), [4, 7]);
        assert_eq!(weight_shape(&m, 1, 1), [7]);
        assert_eq!(weight_shape(&m, 3, 1), [7, 5]);
        assert_close(&run(&m, &x)[0], &want[0]);
    }

    #[test]
    fn magnitude_zeroes_exactly_the_smallest() {
        let mut w = vec![3.0, -1.0, 0.5, -0.5, 2.0, 0.5, -4.0, 1.0];
        zero_smallest(&mut w, 3);
        // |0.5| ties: the first two are taken, then -1 or 1 is not.
        assert_eq!(w, [3.0, -1.0, 0.0, 0.0, 2.0, 0.0, -4.0, 1.0]);
        let mut w = vec![1.0, 1.0, 1.0, 1.0];
        zero_smallest(&mut w, 2);
        assert_eq!(w, [0.0, 0.0, 1.0, 1.0]);
        let mut w = vec![1.0, 2.0];
        zero_smallest(&mut w, 5);
        assert_eq!(w, [0.0, 0.0]);
    }

    fn two_matmuls() -> Model {
        let mut g = Graph::default();
        let x = g.add_value("x", Type::tensor(DType::F32, vec![Dim::Fixed(2), Dim::Fixed(8)]));
        g.inputs.push(x);
        let w1 = g.add_const("w1", t(&[8, 8], (0..64).map(|i| i as f32 + 1.0).collect()));
        let w2 = g.add_const("w2", t(&[8, 4], (0..32).map(|i| -(i as f32) * 0.01 - 0.5).collect()));
        let h = node(&mut g, "MatMul", &[x, w1], vec![]);
        let y = node(&mut g, "MatMul", &[h, w2], vec![]);
        g.outputs.push(y);
        model(g)
    }

    fn zeros(m: &Model, name: &str) -> usize {
        let v = m.graph.nodes.iter().flat_map(|n| n.inputs.iter().flatten()).find(|&&v| m.graph.values[v].name == name).unwrap();
        m.graph.konst(*v).unwrap().view::<f32>().unwrap().iter().filter(|x| **x == 0.0).count()
    }

    #[test]
    fn magnitude_global_and_per_layer() {
        // Global: the 48 smallest of 96 are all of w2 (|w| < 1) and the 16 smallest of w1.
        let mut m = two_matmuls();
        magnitude(&mut m.graph, 0.5, true).unwrap();
        assert_eq!((zeros(&m, "w1"), zeros(&m, "w2")), (16, 32));
        let w1 = m.graph.konst(m.graph.nodes[0].input(1).unwrap()).unwrap().view::<f32>().unwrap().to_vec();
        assert!(w1[..16].iter().all(|x| *x == 0.0) && w1[16..].iter().all(|x| *x != 0.0));
        let mut m = two_matmuls();
        magnitude(&mut m.graph, 0.5, false).unwrap();
        assert_eq!((zeros(&m, "w1"), zeros(&m, "w2")), (32, 16));
        let mut m = two_matmuls();
        let before = census(&m.graph);
        magnitude(&mut m.graph, 0.25, true).unwrap();
        let notes = census_notes(&before, &census(&m.graph));
        assert!(notes.last().unwrap().contains("96 (0.0% zero) -> 96 (25.0% zero)"), "{notes:?}");
    }

    #[test]
    fn two_four_keeps_the_two_largest_of_every_four_along_k() {
        // MatMul weight [K=6, N=2]: groups along K are rows 0-3 and 4-5 (short: kept whole).
        let mut w = vec![
            1.0, -8.0, //
            -5.0, 2.0, //
            3.0, 1.0, //
            0.5, -3.0, //
            0.1, 0.2, //
            0.3, 0.4,
        ];
        two_four_weights(&mut w, Reduction { outer: 1, k: 6, inner: 2 });
        assert_eq!(w, [0.0, -8.0, -5.0, 0.0, 3.0, 0.0, 0.0, -3.0, 0.1, 0.2, 0.3, 0.4]);
        // Conv weight [O=1, K=7]: groups 0-3 and 4-6 (3 long: keeps 2).
        let mut w = vec![1.0, 2.0, 3.0, 4.0, -7.0, 6.0, 5.0];
        two_four_weights(&mut w, Reduction { outer: 1, k: 7, inner: 1 });
        assert_eq!(w, [0.0, 0.0, 3.0, 4.0, -7.0, 6.0, 0.0]);
        // Through the pass: every weight of the model is exactly 50% zero.
        let mut m = two_matmuls();
        two_four(&mut m.graph).unwrap();
        assert_eq!((zeros(&m, "w1"), zeros(&m, "w2")), (32, 16));
    }
}
