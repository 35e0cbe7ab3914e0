//! `kiln run MODEL --inputs DIR --output-dir OUT`

use std::path::PathBuf;

use kiln_runtime::{Result, Value};

#[derive(clap::Args)]
pub struct Args {
    /// A .kiln artifact, or an .onnx model (compiled in memory).
    model: PathBuf,
    /// Folder with input_K.npy or input_K.pb for the K-th model input.
    #[arg(long)]
    inputs: Option<PathBuf>,
    /// NAME=FILE, an input by name (repeatable; .npy or .pb).
    #[arg(long = "input")]
    input: Vec<String>,
    /// Where to write output_K.npy (a sequence as folder output_K/ of 0.npy…, an empty optional as
    /// output_K.none); otherwise outputs are only summarised.
    #[arg(long)]
    output_dir: Option<PathBuf>,
    /// Worker threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Print the output summary as JSON.
    #[arg(long)]
    json: bool,
}

fn summary(v: &Value) -> (String, Vec<usize>, String) {
    match v {
        Value::Tensor(t) => {
            let head = t
                .to_f64_vec()
                .map(|x| {
                    let s: Vec<String> = x.iter().take(6).map(|v| format!("{v:.6}")).collect();
                    format!("[{}{}]", s.join(", "), if x.len() > 6 { ", …" } else { "" })
                })
                .or_else(|_| t.strings().map(|s| format!("{:?}", &s[..s.len().min(6)])))
                .unwrap_or_default();
            (t.dtype().to_string(), t.shape().to_vec(), head)
        }
        // A sequence's "shape" is its length; the head lists its elements' shapes.
        Value::Sequence(dt, items) => {
            let shapes: Vec<String> = items.iter().take(6).map(|t| format!("{:?}", t.shape())).collect();
            let more = if items.len() > 6 { ", …" } else { "" };
            (format!("seq<{dt}>"), vec![items.len()], format!("[{}{more}]", shapes.join(", ")))
        }
        Value::Optional(None) => ("optional".to_string(), vec![], "none".to_string()),
        Value::Optional(Some(inner)) => {
            let (dt, shape, head) = summary(inner);
            (format!("optional<{dt}>"), shape, head)
        }
    }
}

pub fn run(a: Args) -> Result<()> {
    let loaded = crate::load::model(&a.model, a.threads)?;
    let infos = loaded.model.inputs();
    let values = crate::inputs::gather(&infos, a.inputs.as_deref(), &a.input)?;
    let mut session = loaded.model.session();
    let outputs = session.run_values(values)?;
    if let Some(dir) = &a.output_dir {
        crate::inputs::write_outputs(dir, &outputs)?;
    }
    let names: Vec<String> = loaded.model.outputs().iter().map(|o| o.name.clone()).collect();
    if a.json {
        let outs: Vec<_> = outputs
            .iter()
            .zip(&names)
            .map(|(v, n)| {
                let (dt, shape, head) = summary(v);
                serde_json::json!({"name": n, "dtype": dt, "shape": shape, "head": head})
            })
            .collect();
        println!("{}", serde_json::json!({"outputs": outs}));
    } else {
        for (k, (v, n)) in outputs.iter().zip(&names).enumerate() {
            let (dt, shape, head) = summary(v);
            println!("output {k} '{n}': {dt}{shape:?} {head}");
        }
    }
    Ok(())
}
