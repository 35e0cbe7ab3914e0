//! `kiln compile MODEL.onnx -o OUT.kiln`

use std::path::PathBuf;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use kiln_passes::pipeline::compile_model;
use kiln_passes::CompileOptions;
use kiln_runtime::{Error, Result};

#[derive(clap::Args)]
pub struct Args {
    /// The ONNX model to compile.
    model: PathBuf,
    /// Where to write the artifact (default: MODEL with the extension .kiln).
    #[arg(short, long)]
    output: Option<PathBuf>,
    /// Target recorded in the artifact.
    #[arg(long, default_value = "cpu-generic")]
    target: String,
    /// Skip constant folding.
    #[arg(long)]
    no_fold: bool,
    /// Skip dead-node removal.
    #[arg(long)]
    no_dce: bool,
    /// Skip an optimisation pass by name (repeatable): identity, conv-bn, gelu, layernorm,
    /// hardswish, softmax, matmul-bias, epilogue; `all` skips every one.
    #[arg(long = "skip-pass", value_name = "PASS")]
    skip_pass: Vec<String>,
    /// Print what each pass changed.
    #[arg(long)]
    report: bool,
    /// Print the IR after the passes.
    #[arg(long)]
    dump_ir: bool,
    /// Print a JSON summary instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> Result<()> {
    let out = a.output.clone().unwrap_or_else(|| a.model.with_extension("kiln"));
    if out == a.model {
        return Err(Error::Input("output path equals the input path".into()));
    }
    let mut skip = Vec::new();
    for name in &a.skip_pass {
        match name.as_str() {
            "all" => skip.extend(kiln_passes::OPTIMIZATIONS.iter().map(|s| s.to_string())),
            n if kiln_passes::OPTIMIZATIONS.contains(&n) => skip.push(n.to_string()),
            n => {
                return Err(Error::Input(format!(
                    "unknown pass '{n}' (passes: {}, or all)",
                    kiln_passes::OPTIMIZATIONS.join(", ")
                )))
            }
        }
    }
    let opts = CompileOptions { target: a.target.clone(), fold: !a.no_fold, dce: !a.no_dce, skip };
    let bar = ProgressBar::new_spinner();
    bar.set_style(ProgressStyle::with_template("{spinner} {msg} [{elapsed}]").unwrap());
    bar.enable_steady_tick(Duration::from_millis(100));
    let t0 = Instant::now();
    bar.set_message(format!("importing {}", a.model.display()));
    let model = kiln_compiler::import::import_model(&a.model)?;
    bar.set_message("running passes");
    let compiled = compile_model(model, &opts)?;
    bar.set_message(format!("writing {}", out.display()));
    let bytes = kiln_compiler::writer::write_artifact(&compiled.lowered, &out)?;
    bar.finish_and_clear();
    let secs = t0.elapsed().as_secs_f64();
    let steps = compiled.lowered.manifest.program.as_ref().map_or(0, |p| p.steps.len());
    if a.dump_ir {
        println!("{}", kiln_compiler::dump::dump(&compiled.model));
    }
    if a.json {
        let passes: Vec<_> = compiled
            .reports
            .iter()
            .map(|r| {
                serde_json::json!({"pass": r.name, "nodes_before": r.nodes_before,
                    "nodes_after": r.nodes_after, "changes": r.changes, "ms": r.millis})
            })
            .collect();
        let j = serde_json::json!({"output": out, "bytes": bytes, "steps": steps,
            "seconds": secs, "passes": passes});
        println!("{j}");
        return Ok(());
    }
    if a.report {
        println!("{:<10} {:>8} {:>8} {:>8} {:>9}", "pass", "before", "after", "changes", "ms");
        for r in &compiled.reports {
            println!(
                "{:<10} {:>8} {:>8} {:>8} {:>9.1}",
                r.name, r.nodes_before, r.nodes_after, r.changes, r.millis
            );
        }
    }
    println!(
        "wrote {} ({:.1} MB, {} steps) in {:.2} s",
        out.display(),
        bytes as f64 / 1e6,
        steps,
        secs
    );
    Ok(())
}
