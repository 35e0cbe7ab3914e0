//! `kiln inspect MODEL [--json]`: inputs/outputs with symbolic dims, op histogram, parameters,
//! opsets and metadata. An .onnx model is compiled in memory first, so what is shown is what runs.

use std::collections::BTreeMap;
use std::path::PathBuf;

use kiln_runtime::manifest::Program;
use kiln_runtime::{Artifact, DType, Result};

#[derive(clap::Args)]
pub struct Args {
    /// A .kiln artifact or an .onnx model.
    model: PathBuf,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

fn histogram(p: &Program, h: &mut BTreeMap<String, usize>) {
    for s in &p.steps {
        let key = if s.domain.is_empty() { s.op.clone() } else { format!("{}:{}", s.domain, s.op) };
        *h.entry(key).or_default() += 1;
        for a in &s.attrs {
            for g in a.g.iter().chain(&a.graphs) {
                histogram(g, h);
            }
        }
    }
}

/// (parameter count, bytes, constant count) over a program and its subgraphs.
fn params(p: &Program, acc: &mut (u64, u64, u64)) {
    for c in &p.constants {
        if let Some(t) = &c.tensor {
            let n: u64 = t.dims.iter().product();
            let size = DType::from_onnx(t.dtype).map_or(0, |d| d.size()) as u64;
            acc.0 += n;
            acc.1 += n * size;
            acc.2 += 1;
        }
    }
    for s in &p.steps {
        for a in &s.attrs {
            for g in a.g.iter().chain(&a.graphs) {
                params(g, acc);
            }
        }
    }
}

pub fn describe(art: &Artifact) -> serde_json::Value {
    let p = art.program();
    let io = |ids: &[u32]| -> Vec<serde_json::Value> {
        ids.iter()
            .map(|&i| {
                let v = &p.values[i as usize];
                serde_json::json!({"name": v.name, "type": v.type_string()})
            })
            .collect()
    };
    let mut h = BTreeMap::new();
    histogram(p, &mut h);
    let mut acc = (0, 0, 0);
    params(p, &mut acc);
    let md = art.metadata();
    let opsets: BTreeMap<String, i64> = md
        .opsets
        .iter()
        .map(|o| (if o.domain.is_empty() { "ai.onnx".to_string() } else { o.domain.clone() }, o.version))
        .collect();
    let props: BTreeMap<String, String> = md.props.iter().map(|kv| (kv.key.clone(), kv.value.clone())).collect();
    serde_json::json!({
        "inputs": io(&p.inputs),
        "outputs": io(&p.outputs),
        "steps": h.values().sum::<usize>(),
        "ops": h,
        "parameters": acc.0,
        "parameter_bytes": acc.1,
        "constants": acc.2,
        "weights_section_bytes": art.weights_len(),
        "opsets": opsets,
        "metadata": {
            "source_name": md.source_name,
            "source_sha256": md.source_sha256,
            "producer": md.producer,
            "ir_version": md.ir_version,
            "kiln_version": md.kiln_version,
            "target": md.target,
            "passes": md.passes,
            "format_version": art.manifest().format_version,
            "props": props,
        }
    })
}

pub fn run(a: Args) -> Result<()> {
    let art = crate::load::artifact(&a.model)?;
    let d = describe(&art);
    if a.json {
        println!("{d}");
        return Ok(());
    }
    let md = &d["metadata"];
    println!("model    {}", a.model.display());
    println!(
        "source   {} (sha256 {}), producer {}, ir_version {}",
        md["source_name"].as_str().unwrap_or(""),
        md["source_sha256"].as_str().unwrap_or(""),
        md["producer"].as_str().unwrap_or(""),
        md["ir_version"]
    );
    let opsets: Vec<String> = d["opsets"]
        .as_object()
        .map(|o| o.iter().map(|(k, v)| format!("{k}={v}")).collect())
        .unwrap_or_default();
    println!("opsets   {}", opsets.join(", "));
    println!(
        "kiln     {} (format {}), target {}, passes [{}]",
        md["kiln_version"].as_str().unwrap_or(""),
        md["format_version"],
        md["target"].as_str().unwrap_or(""),
        md["passes"].as_array().map(|p| p.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join(", ")).unwrap_or_default()
    );
    println!("inputs");
    for v in d["inputs"].as_array().into_iter().flatten() {
        println!("  {}: {}", v["name"].as_str().unwrap_or(""), v["type"].as_str().unwrap_or(""));
    }
    println!("outputs");
    for v in d["outputs"].as_array().into_iter().flatten() {
        println!("  {}: {}", v["name"].as_str().unwrap_or(""), v["type"].as_str().unwrap_or(""));
    }
    println!(
        "parameters {} ({:.2} MB in {} constants)",
        d["parameters"],
        d["parameter_bytes"].as_u64().unwrap_or(0) as f64 / 1e6,
        d["constants"]
    );
    println!("ops ({} steps)", d["steps"]);
    let mut ops: Vec<(String, u64)> = d["ops"]
        .as_object()
        .map(|o| o.iter().map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0))).collect())
        .unwrap_or_default();
    ops.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    for (op, n) in ops {
        println!("  {op:<28} {n}");
    }
    if let Some(props) = md["props"].as_object().filter(|p| !p.is_empty()) {
        println!("metadata");
        for (k, v) in props {
            println!("  {k}: {}", v.as_str().unwrap_or(""));
        }
    }
    Ok(())
}
