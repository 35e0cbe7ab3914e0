//! `kiln compare A B --inputs DIR`: how far two models' outputs are apart on the same inputs
//! (e.g. a float model and its quantized artifact): per output the cosine similarity, the largest
//! absolute difference and the top-1 agreement (argmax along the last axis). With `--per-layer`
//! every intermediate value computed under the same name in both is compared too, and the first
//! ones where the models diverge are listed, in A's execution order.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use kiln_compiler::ir::{Model as IrModel, ValueId};
use kiln_passes::compress::calibrate;
use kiln_runtime::manifest::ValueInfo;
use kiln_runtime::{Error, Result, Tensor, Value};

#[derive(clap::Args)]
pub struct Args {
    /// The reference: a .kiln artifact or an .onnx model (compiled in memory).
    a: PathBuf,
    /// The model compared against it (.kiln or .onnx).
    b: PathBuf,
    /// One sample (a folder with input_K.npy / .pb) or a folder of such sample folders.
    #[arg(long)]
    inputs: PathBuf,
    /// Also compare the intermediate values computed under the same name in both models and list
    /// the first ones where they diverge (an .onnx is run as imported, without passes, so all its
    /// values exist; a .kiln has the values its passes left).
    #[arg(long)]
    per_layer: bool,
    /// --per-layer: a value diverges when 1 - cosine exceeds this.
    #[arg(long, default_value_t = 1e-4)]
    tol: f64,
    /// --per-layer: how many diverging values to list.
    #[arg(long, default_value_t = 10)]
    top: usize,
    /// Worker threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

/// Accumulated agreement of one pair of tensors over the samples.
#[derive(Clone, Debug, Default)]
struct Stats {
    samples: usize,
    cos_sum: f64,
    cos_min: f64,
    max_abs: f64,
    rows: usize,
    rows_same: usize,
}

impl Stats {
    fn add(&mut self, a: &Tensor, b: &Tensor, what: &str) -> Result<()> {
        if a.shape() != b.shape() {
            return Err(Error::Input(format!("{what}: shape {:?} in A but {:?} in B", a.shape(), b.shape())));
        }
        let (x, y) = (numbers(a, what)?, numbers(b, what)?);
        let cos = kiln_passes::compress::budget::cosine(&x, &y);
        self.cos_min = if self.samples == 0 { cos } else { self.cos_min.min(cos) };
        self.cos_sum += cos;
        self.samples += 1;
        let diff = x.iter().zip(&y).map(|(p, q)| (p - q).abs()).fold(0f64, f64::max);
        self.max_abs = self.max_abs.max(diff);
        // top-1 along the last axis, when it has more than one entry to choose from
        if let Some(&last) = a.shape().last().filter(|&&n| n > 1) {
            for (ra, rb) in x.chunks(last).zip(y.chunks(last)) {
                self.rows += 1;
                self.rows_same += (argmax(ra) == argmax(rb)) as usize;
            }
        }
        Ok(())
    }

    fn cosine(&self) -> f64 {
        self.cos_sum / self.samples.max(1) as f64
    }

    fn top1(&self) -> Option<f64> {
        (self.rows > 0).then(|| self.rows_same as f64 / self.rows as f64)
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({"cosine_mean": self.cosine(), "cosine_min": self.cos_min,
            "max_abs": self.max_abs, "top1": self.top1(), "samples": self.samples})
    }
}

fn numbers(t: &Tensor, what: &str) -> Result<Vec<f64>> {
    t.to_f64_vec().map_err(|_| Error::Input(format!("{what}: {} values cannot be compared numerically", t.dtype())))
}

/// Index of the largest entry (the first one on ties; NaN never wins).
fn argmax(v: &[f64]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] || v[best].is_nan() {
            best = i;
        }
    }
    best
}

fn signature(v: &ValueInfo) -> (String, String) {
    (v.name.clone(), v.type_string())
}

/// The models must take the same inputs and give the same outputs (names and count).
fn check_io(a: &kiln_runtime::Model, b: &kiln_runtime::Model) -> Result<()> {
    let ins = |m: &kiln_runtime::Model| m.inputs().into_iter().map(signature).collect::<Vec<_>>();
    let (ia, ib) = (ins(a), ins(b));
    if ia.len() != ib.len() || ia.iter().zip(&ib).any(|(x, y)| x.0 != y.0) {
        return Err(Error::Input(format!(
            "the models take different inputs: A {:?}, B {:?}",
            ia.iter().map(|x| format!("{} {}", x.0, x.1)).collect::<Vec<_>>(),
            ib.iter().map(|x| format!("{} {}", x.0, x.1)).collect::<Vec<_>>()
        )));
    }
    let outs = |m: &kiln_runtime::Model| m.outputs().iter().map(|o| o.name.clone()).collect::<Vec<_>>();
    let (oa, ob) = (outs(a), outs(b));
    if oa != ob {
        return Err(Error::Input(format!("the models give different outputs: A {oa:?}, B {ob:?}")));
    }
    Ok(())
}

fn tensors(values: Vec<Value>, which: &str) -> Result<Vec<Tensor>> {
    values
        .into_iter()
        .map(|v| v.into_tensor().map_err(|_| Error::Input(format!("model {which} gives a non-tensor output"))))
        .collect()
}

/// Output statistics over every sample folder.
fn compare_outputs(a: &Args, folders: &[PathBuf]) -> Result<(Vec<String>, Vec<Stats>)> {
    let ma = crate::load::model(&a.a, a.threads)?.model;
    let mb = crate::load::model(&a.b, a.threads)?.model;
    check_io(&ma, &mb)?;
    let names: Vec<String> = ma.outputs().iter().map(|o| o.name.clone()).collect();
    let mut stats = vec![Stats::default(); names.len()];
    let (mut sa, mut sb) = (ma.session(), mb.session());
    let bar = calibrate::progress(folders.len(), "comparing");
    for f in folders {
        let ia = crate::inputs::gather(&ma.inputs(), Some(f), &[])?;
        let ib = crate::inputs::gather(&mb.inputs(), Some(f), &[])?;
        let oa = tensors(sa.run_values(ia)?, "A")?;
        let ob = tensors(sb.run_values(ib)?, "B")?;
        for (k, ((x, y), st)) in oa.iter().zip(&ob).zip(stats.iter_mut()).enumerate() {
            st.add(x, y, &format!("{}: output {k} '{}'", f.display(), names[k]))?;
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok((names, stats))
}

/// One compared intermediate value.
struct Layer {
    name: String,
    op: String,
    stats: Stats,
}

/// A model prepared to also output its intermediate values: `values[j]` = (name, op) of output
/// `n_outputs + j`.
struct Probe {
    model: kiln_runtime::Model,
    n_outputs: usize,
    values: Vec<(String, String)>,
}

fn is_float_code(dtype: i32) -> bool {
    kiln_runtime::DType::from_onnx(dtype).is_some_and(|d| d.is_float())
}

/// An .onnx model imported as it is (no passes) with every named float value a node of the main
/// graph computes as an extra output.
fn probe_onnx(path: &Path, threads: usize) -> Result<Probe> {
    let mut m: IrModel = kiln_compiler::import::import_model(path)?;
    kiln_compiler::infer::infer_types(&mut m)?;
    let g = &m.graph;
    let mut ids: Vec<ValueId> = Vec::new();
    let mut values = Vec::new();
    for n in &g.nodes {
        for &v in n.outputs.iter().flatten() {
            let info = &g.values[v];
            let float = info.ty.dtype().is_some_and(|d| d.is_float());
            if !info.name.is_empty() && float && !g.outputs.contains(&v) && !ids.contains(&v) {
                ids.push(v);
                values.push((info.name.clone(), n.op.clone()));
            }
        }
    }
    let model = calibrate::prepare(&m, &ids, threads)?;
    Ok(Probe { model, n_outputs: m.graph.outputs.len(), values })
}

/// A .kiln artifact rewritten with every named float value its top-level steps compute as an
/// extra output (the weight blobs are carried over byte for byte).
fn probe_artifact(path: &Path, threads: usize) -> Result<Probe> {
    use kiln_runtime::manifest::TensorData;
    let art = kiln_runtime::Artifact::open(path)?;
    let mut manifest = art.manifest().clone();
    let blobs = manifest
        .blobs
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let raw = TensorData {
                dtype: kiln_runtime::DType::U8.onnx_code(),
                dims: vec![b.len],
                blob: Some(i as u32),
                ..Default::default()
            };
            art.tensor(&raw)
        })
        .collect::<Result<Vec<Tensor>>>()?;
    let p = manifest.program.as_mut().ok_or_else(|| Error::InvalidArtifact("no program".into()))?;
    let n_outputs = p.outputs.len();
    let mut values = Vec::new();
    let mut extra = Vec::new();
    for st in &p.steps {
        // (a negative id marks an output the step does not bind)
        for v in st.outputs.iter().filter_map(|&v| u32::try_from(v).ok()) {
            let Some(info) = p.values.get(v as usize) else { continue };
            if !info.name.is_empty() && is_float_code(info.dtype) && !p.outputs.contains(&v) && !extra.contains(&v) {
                extra.push(v);
                values.push((info.name.clone(), st.op.clone()));
            }
        }
    }
    p.outputs.extend(extra);
    let lowered = kiln_compiler::lower::Lowered { manifest, blobs };
    let bytes = kiln_compiler::writer::to_bytes(&lowered)?;
    let backend = kiln_backends::CpuBackend::new(threads)?;
    let model = kiln_runtime::Model::new(kiln_runtime::Artifact::from_vec(bytes)?, &backend)?;
    Ok(Probe { model, n_outputs, values })
}

fn probe(path: &Path, threads: usize) -> Result<Probe> {
    if crate::load::is_artifact(path)? { probe_artifact(path, threads) } else { probe_onnx(path, threads) }
}

/// Per-layer statistics of every value computed under the same name in both models, in A's
/// execution order.
fn compare_layers(a: &Args, folders: &[PathBuf]) -> Result<Vec<Layer>> {
    let (pa, pb) = (probe(&a.a, a.threads)?, probe(&a.b, a.threads)?);
    let in_b: HashMap<&str, usize> = pb.values.iter().enumerate().map(|(j, v)| (v.0.as_str(), j)).collect();
    let pairs: Vec<(usize, usize)> =
        pa.values.iter().enumerate().filter_map(|(i, v)| in_b.get(v.0.as_str()).map(|&j| (i, j))).collect();
    let mut layers: Vec<Layer> = pairs
        .iter()
        .map(|&(i, _)| Layer { name: pa.values[i].0.clone(), op: pa.values[i].1.clone(), stats: Stats::default() })
        .collect();
    let (mut sa, mut sb) = (pa.model.session(), pb.model.session());
    let bar = calibrate::progress(folders.len(), "comparing layers");
    for f in folders {
        let oa = tensors(sa.run_values(crate::inputs::gather(&pa.model.inputs(), Some(f), &[])?)?, "A")?;
        let ob = tensors(sb.run_values(crate::inputs::gather(&pb.model.inputs(), Some(f), &[])?)?, "B")?;
        for (l, &(i, j)) in layers.iter_mut().zip(&pairs) {
            let (x, y) = (&oa[pa.n_outputs + i], &ob[pb.n_outputs + j]);
            // A value whose shape or type differs between the models (e.g. rewritten by a pass)
            // is not comparable; skip it.
            if x.shape() == y.shape() && x.dtype().is_float() && y.dtype().is_float() {
                l.stats.add(x, y, &format!("{}: value '{}'", f.display(), l.name))?;
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    layers.retain(|l| l.stats.samples > 0);
    Ok(layers)
}

pub fn run(a: Args) -> Result<()> {
    let folders = calibrate::sample_folders(&a.inputs)?;
    let (names, stats) = compare_outputs(&a, &folders)?;
    let layers = if a.per_layer { Some(compare_layers(&a, &folders)?) } else { None };
    let diverging: Vec<&Layer> = layers
        .iter()
        .flatten()
        .filter(|l| 1.0 - l.stats.cosine() > a.tol || l.stats.cosine().is_nan())
        .collect();
    if a.json {
        let outs: Vec<_> = names
            .iter()
            .zip(&stats)
            .enumerate()
            .map(|(k, (n, s))| {
                let mut j = s.json();
                j["index"] = k.into();
                j["name"] = n.as_str().into();
                j
            })
            .collect();
        let mut j = serde_json::json!({"a": a.a, "b": a.b, "samples": folders.len(), "outputs": outs});
        if let Some(layers) = &layers {
            let first: Vec<_> = diverging
                .iter()
                .take(a.top)
                .map(|l| {
                    let mut x = l.stats.json();
                    x["name"] = l.name.as_str().into();
                    x["op"] = l.op.as_str().into();
                    x
                })
                .collect();
            j["per_layer"] = serde_json::json!({"compared": layers.len(), "tol": a.tol,
                "diverging": diverging.len(), "first": first});
        }
        println!("{j}");
        return Ok(());
    }
    println!("{} sample{}", folders.len(), if folders.len() == 1 { "" } else { "s" });
    println!("{:<4} {:<28} {:>12} {:>12} {:>11} {:>8}", "out", "name", "cosine mean", "cosine min", "max|diff|", "top-1");
    for (k, (n, s)) in names.iter().zip(&stats).enumerate() {
        let top1 = s.top1().map_or("-".to_string(), |t| format!("{:.1}%", t * 100.0));
        println!("{k:<4} {n:<28} {:>12.6} {:>12.6} {:>11.3e} {top1:>8}", s.cosine(), s.cos_min, s.max_abs);
    }
    if let Some(layers) = &layers {
        println!(
            "\nper layer: {} values with the same name compared, {} diverge (1 - cosine > {:e})",
            layers.len(),
            diverging.len(),
            a.tol
        );
        if !diverging.is_empty() {
            println!("{:<36} {:<18} {:>12} {:>11}", "first diverging", "op", "cosine", "max|diff|");
            for l in diverging.iter().take(a.top) {
                println!("{:<36} {:<18} {:>12.6} {:>11.3e}", l.name, l.op, l.stats.cosine(), l.stats.max_abs);
            }
        }
    }
    Ok(())
}
