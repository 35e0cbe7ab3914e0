//! Accuracy budget: measure how much each quantized layer hurts the model's outputs on the
//! calibration set, and keep the most sensitive layers in float until the model-level error is
//! within `--accuracy-budget`. Also formats the per-layer error table `kiln compile --report`
//! prints (as pass notes).
//!
//! The quantization passes call `select` with their own "quantize these layers" function, so the
//! same search serves int8 (static and dynamic) and int4. A layer is named by the first output
//! value of its node: value ids stay valid while a pass inserts or replaces nodes, node indices
//! do not.
//!
//! Error metric: for each float output, the mean over samples of 1 - cosine(quantized, float);
//! the model's error is that of its worst output. Non-float outputs count the fraction of
//! elements that differ.

use kiln_compiler::ir::{Model, ValueId};
use kiln_runtime::{Error, Result, Tensor};

use super::calibrate::{run_outputs, Samples};

/// A quantizable layer: the first output value of its node.
pub type LayerId = ValueId;

/// Quantizes the given layers of a model in place (the caller's pass, restricted to them).
pub type QuantizeFn<'a> = dyn Fn(&mut Model, &[LayerId]) -> Result<()> + 'a;

/// Single-layer sensitivity is measured on at most this many samples (it costs one run of the
/// calibration set per layer); the final model-level check uses them all.
pub const SENSITIVITY_SAMPLES: usize = 8;

/// One layer's row of the error table.
#[derive(Clone, Debug)]
pub struct LayerError {
    pub layer: LayerId,
    /// The node's name and op.
    pub name: String,
    pub op: String,
    /// Model-level output error (1 - cosine, worst output) with only this layer quantized.
    pub error: f64,
    /// Largest absolute output difference with only this layer quantized.
    pub max_abs: f64,
    /// Left in float by the budget.
    pub kept_float: bool,
}

/// What `select` decided.
#[derive(Clone, Debug)]
pub struct Selection {
    /// Layers to leave in float (the most sensitive first).
    pub kept_float: Vec<LayerId>,
    /// Every candidate, most sensitive first.
    pub layers: Vec<LayerError>,
    /// Model-level error with every candidate quantized, and with the selection applied.
    pub error_all: f64,
    pub error_final: f64,
    pub budget: f64,
}

/// Per-output error of `got` against `want` over all samples: (1 - mean cosine, max |diff|) for
/// float outputs; (fraction of differing elements, max |diff|) otherwise.
pub fn output_errors(want: &[Vec<Tensor>], got: &[Vec<Tensor>]) -> Result<Vec<(f64, f64)>> {
    if want.len() != got.len() {
        return Err(Error::Other(format!("{} samples against {}", got.len(), want.len())));
    }
    let n_out = want.first().map_or(0, |w| w.len());
    let mut acc = vec![(0f64, 0f64); n_out];
    for (w, g) in want.iter().zip(got) {
        if w.len() != n_out || g.len() != n_out {
            return Err(Error::Other(format!("{} outputs against {}", g.len(), w.len())));
        }
        for (k, (a, b)) in w.iter().zip(g).enumerate() {
            let (e, m) = tensor_error(a, b)?;
            acc[k].0 += e;
            acc[k].1 = acc[k].1.max(m);
        }
    }
    let n = want.len().max(1) as f64;
    Ok(acc.into_iter().map(|(e, m)| (e / n, m)).collect())
}

/// (error, max |diff|) of one tensor pair; see `output_errors`.
pub fn tensor_error(want: &Tensor, got: &Tensor) -> Result<(f64, f64)> {
    if want.shape() != got.shape() {
        return Err(Error::Shape(format!("output shape {:?} against {:?}", got.shape(), want.shape())));
    }
    let (a, b) = (want.to_f64_vec()?, got.to_f64_vec()?);
    let max_abs = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f64, f64::max);
    if want.dtype().is_float() {
        Ok((1.0 - cosine(&a, &b), max_abs))
    } else {
        let differ = a.iter().zip(&b).filter(|(x, y)| x != y).count();
        Ok((differ as f64 / a.len().max(1) as f64, max_abs))
    }
}

/// Cosine similarity; 1 when both are zero, 0 when only one is.
pub fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    match (aa > 0.0, bb > 0.0) {
        (false, false) => 1.0,
        (true, true) => (ab / (aa.sqrt() * bb.sqrt())).clamp(-1.0, 1.0),
        _ => 0.0,
    }
}

/// The worst output's (error, max |diff|).
fn model_error(want: &[Vec<Tensor>], got: &[Vec<Tensor>]) -> Result<(f64, f64)> {
    Ok(output_errors(want, got)?.into_iter().fold((0f64, 0f64), |(e, m), (e2, m2)| (e.max(e2), m.max(m2))))
}

/// The error of `model` with `layers` quantized, against the float outputs `want` on `s`.
fn error_with(
    model: &Model,
    s: &Samples,
    want: &[Vec<Tensor>],
    layers: &[LayerId],
    quantize: &QuantizeFn,
) -> Result<(f64, f64)> {
    let mut m = model.clone();
    quantize(&mut m, layers)?;
    model_error(want, &run_outputs(&m, s)?)
}

fn describe(model: &Model, layer: LayerId) -> (String, String) {
    let g = &model.graph;
    match g.nodes.iter().find(|n| n.output(0) == Some(layer)) {
        Some(n) => (if n.name.is_empty() { g.values[layer].name.clone() } else { n.name.clone() }, n.op.clone()),
        None => (g.values.get(layer).map_or_else(|| format!("value {layer}"), |v| v.name.clone()), "?".into()),
    }
}

/// Each candidate's error when it alone is quantized (on the first `SENSITIVITY_SAMPLES`
/// samples), most sensitive first.
pub fn layer_errors(
    model: &Model,
    s: &Samples,
    candidates: &[LayerId],
    quantize: &QuantizeFn,
) -> Result<Vec<LayerError>> {
    let sub = s.first(SENSITIVITY_SAMPLES);
    let want = run_outputs(model, &sub)?;
    let mut rows = Vec::with_capacity(candidates.len());
    for &c in candidates {
        let (error, max_abs) = error_with(model, &sub, &want, &[c], quantize)?;
        let (name, op) = describe(model, c);
        rows.push(LayerError { layer: c, name, op, error, max_abs, kept_float: false });
    }
    rows.sort_by(|a, b| b.error.total_cmp(&a.error));
    Ok(rows)
}

/// Choose the layers to keep in float so that the model's error on `s` with all other
/// `candidates` quantized is within `budget` (1 - cosine, worst output): layers are ranked by
/// their single-layer error and the smallest number of top-ranked ones is kept in float
/// (binary search, assuming that keeping more in float never hurts).
pub fn select(
    model: &Model,
    s: &Samples,
    candidates: &[LayerId],
    quantize: &QuantizeFn,
    budget: f32,
) -> Result<Selection> {
    if s.is_empty() {
        return Err(Error::Input("--accuracy-budget: the calibration set is empty".into()));
    }
    if !(budget >= 0.0) {
        return Err(Error::Input(format!("--accuracy-budget {budget}: must be >= 0")));
    }
    let budget = budget as f64;
    let mut layers = layer_errors(model, s, candidates, quantize)?;
    let want = run_outputs(model, s)?;
    let ranked: Vec<LayerId> = layers.iter().map(|l| l.layer).collect();
    let err_keeping = |k: usize| -> Result<f64> {
        if k == ranked.len() {
            return Ok(0.0);
        }
        Ok(error_with(model, s, &want, &ranked[k..], quantize)?.0)
    };
    let error_all = err_keeping(0)?;
    let (mut lo, mut hi, mut error_final) = (0usize, ranked.len(), 0f64);
    if error_all <= budget {
        hi = 0;
        error_final = error_all;
    } else {
        // Invariant: keeping `hi` layers is within budget (or keeps everything), `lo` is not.
        while hi - lo > 1 {
            let mid = (lo + hi) / 2;
            let e = err_keeping(mid)?;
            if e <= budget {
                hi = mid;
                error_final = e;
            } else {
                lo = mid;
            }
        }
        if hi == ranked.len() {
            error_final = 0.0;
        } else if error_final == 0.0 {
            error_final = err_keeping(hi)?;
        }
    }
    for l in layers.iter_mut().take(hi) {
        l.kept_float = true;
    }
    Ok(Selection { kept_float: ranked[..hi].to_vec(), layers, error_all, error_final, budget })
}

/// The per-layer error table, one line per row (for `PassReport` notes).
pub fn table(sel: &Selection) -> Vec<String> {
    let mut out = layer_table(&sel.layers);
    out.push(format!(
        "model error (1 - cos, worst output): all quantized {:.3e}, final {:.3e} (budget {:.3e}); {} of {} layers kept in float",
        sel.error_all,
        sel.error_final,
        sel.budget,
        sel.kept_float.len(),
        sel.layers.len()
    ));
    out
}

/// Rows of layer errors, most sensitive first.
pub fn layer_table(rows: &[LayerError]) -> Vec<String> {
    let mut out = vec![format!("{:<40} {:<16} {:>11} {:>11} {:>6}", "layer", "op", "1-cos", "max|diff|", "float")];
    for r in rows {
        let name = if r.name.chars().count() > 40 {
            let tail: String = r.name.chars().rev().take(39).collect::<Vec<_>>().into_iter().rev().collect();
            format!("…{tail}")
        } else {
            r.name.clone()
        };
        out.push(format!(
            "{:<40} {:<16} {:>11.3e} {:>11.3e} {:>6}",
            name,
            r.op,
            r.error,
            r.max_abs,
            if r.kept_float { "yes" } else { "" }
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_compiler::ir::{Dim, Graph, Node, Type};

    /// x[4] -> Add(c0) -> Add(c1) -> Add(c2) -> y; each Add is a "layer".
    fn chain() -> (Model, Vec<LayerId>) {
        let mut g = Graph::default();
        let ty = || Type::tensor(kiln_runtime::DType::F32, vec![Dim::Fixed(4)]);
        let x = g.add_value("x", ty());
        g.inputs = vec![x];
        let mut prev = x;
        let mut layers = Vec::new();
        for i in 0..3 {
            let c = g.add_const(format!("c{i}"), Tensor::from_vec(&[4], vec![0.1f32, -0.2, 0.3, 0.0]).unwrap());
            let out = g.add_value(format!("a{i}"), ty());
            g.nodes.push(Node {
                name: format!("add{i}"),
                op: "Add".into(),
                domain: String::new(),
                opset: 17,
                inputs: vec![Some(prev), Some(c)],
                outputs: vec![Some(out)],
                attrs: vec![],
            });
            layers.push(out);
            prev = out;
        }
        g.outputs = vec![prev];
        (Model { graph: g, opsets: vec![(String::new(), 17)], ir_version: 8, ..Default::default() }, layers)
    }

    /// "Quantizing" layer i adds a perturbation of size 0.5 / 10^i to its constant.
    fn perturb(m: &mut Model, layers: &[LayerId]) -> Result<()> {
        for &l in layers {
            let g = &mut m.graph;
            let n = g.nodes.iter().position(|n| n.output(0) == Some(l)).ok_or_else(|| Error::Other("no layer".into()))?;
            let c = g.nodes[n].input(1).unwrap();
            let i: i32 = g.nodes[n].name[3..].parse().unwrap();
            let d = 0.5f32 / 10f32.powi(i);
            let old = g.values[c].konst.clone().unwrap();
            let new: Vec<f32> = old.view::<f32>()?.iter().enumerate().map(|(k, v)| v + if k % 2 == 0 { d } else { -d }).collect();
            g.values[c].konst = Some(Tensor::from_vec(&[4], new)?);
        }
        Ok(())
    }

    fn samples() -> Samples {
        let s = |v: [f32; 4]| vec![Tensor::from_vec(&[4], v.to_vec()).unwrap()];
        Samples { names: vec!["x".into()], samples: vec![s([1.0, 2.0, 0.5, -1.0]), s([0.3, -0.7, 2.0, 1.5])] }
    }

    #[test]
    fn cosine_and_errors() {
        assert!((cosine(&[1.0, 0.0], &[0.0, 1.0])).abs() < 1e-12);
        assert!((cosine(&[1.0, 2.0], &[2.0, 4.0]) - 1.0).abs() < 1e-12);
        assert_eq!(cosine(&[0.0, 0.0], &[0.0, 0.0]), 1.0);
        assert_eq!(cosine(&[0.0, 0.0], &[1.0, 0.0]), 0.0);
        let a = Tensor::from_vec(&[2], vec![1.0f32, 0.0]).unwrap();
        let b = Tensor::from_vec(&[2], vec![1.0f32, 1.0]).unwrap();
        let (e, m) = tensor_error(&a, &b).unwrap();
        assert!((e - (1.0 - 1.0 / 2f64.sqrt())).abs() < 1e-9 && m == 1.0);
        let i = Tensor::from_vec(&[4], vec![1i64, 2, 3, 4]).unwrap();
        let j = Tensor::from_vec(&[4], vec![1i64, 2, 0, 4]).unwrap();
        assert_eq!(tensor_error(&i, &j).unwrap(), (0.25, 3.0));
        assert!(tensor_error(&a, &i).is_err());
    }

    #[test]
    fn ranks_layers_and_keeps_the_most_sensitive_in_float() {
        let (model, layers) = chain();
        let s = samples();
        let rows = layer_errors(&model, &s, &layers, &perturb).unwrap();
        let order: Vec<LayerId> = rows.iter().map(|r| r.layer).collect();
        assert_eq!(order, layers, "the largest perturbation hurts most");
        assert!(rows[0].error > rows[1].error && rows[1].error > rows[2].error && rows[2].error > 0.0);
        assert_eq!(rows[0].name, "add0");

        let want = run_outputs(&model, &s).unwrap();
        let err = |ls: &[LayerId]| error_with(&model, &s, &want, ls, &perturb).unwrap().0;
        let (all, rest) = (err(&layers), err(&layers[1..]));
        assert!(rest < all);

        let sel = select(&model, &s, &layers, &perturb, 1.0).unwrap();
        assert!(sel.kept_float.is_empty() && (sel.error_all - all).abs() < 1e-12);
        let sel = select(&model, &s, &layers, &perturb, ((all + rest) / 2.0) as f32).unwrap();
        assert_eq!(sel.kept_float, vec![layers[0]]);
        assert!((sel.error_final - rest).abs() < 1e-9, "{} vs {rest}", sel.error_final);
        assert!(sel.layers[0].kept_float && !sel.layers[1].kept_float);
        let sel = select(&model, &s, &layers, &perturb, 0.0).unwrap();
        assert_eq!(sel.kept_float, layers);
        assert_eq!(sel.error_final, 0.0);
        let lines = table(&sel);
        assert_eq!(lines.len(), 1 + 3 + 1);
        assert!(lines[1].starts_with("add0") && lines[1].ends_with("yes"), "{}", lines[1]);
        assert!(select(&model, &s, &layers, &perturb, -1.0).is_err());
        assert!(select(&model, &s.first(0), &layers, &perturb, 0.1).is_err());
    }
}
