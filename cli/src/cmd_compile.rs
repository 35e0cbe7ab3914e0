//! `kiln compile MODEL.onnx -o OUT.kiln`

use std::path::PathBuf;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use kiln_passes::pipeline::compile_model;
use kiln_passes::compress::{CompressOptions, Int4Method};
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
    /// Quantize: int8 (static, needs --calibration), int8-dynamic, int4 (weight-only).
    #[arg(long, value_name = "MODE")]
    quantize: Option<String>,
    /// Calibration data: a folder with one sub-folder per sample, each holding input_K.npy
    /// (laid out as for `kiln run --inputs`).
    #[arg(long, value_name = "DIR")]
    calibration: Option<PathBuf>,
    /// How activation ranges are chosen: minmax, percentile[:P], entropy, mse.
    #[arg(long, default_value = "mse", value_name = "NAME")]
    calibrator: String,
    /// int8 (static): smooth input channels into the weights (SmoothQuant). auto picks, per
    /// layer input, the strength with the least estimated quantization noise; off; or an α in (0, 1].
    #[arg(long, default_value = "auto", value_name = "auto|off|ALPHA")]
    smoothing: String,
    /// int8 (static): weight rounding, gptq (error-compensating, from the calibration inputs)
    /// or rtn (round to nearest).
    #[arg(long, default_value = "gptq", value_name = "METHOD")]
    int8_weights: String,
    /// int8 (static) and int4 with --calibration: do not correct each layer's bias for the mean
    /// output shift its rounded weights cause on the calibration inputs.
    #[arg(long)]
    no_bias_correction: bool,
    /// int4: block size along K (32, 64 or 128).
    #[arg(long, default_value_t = 32)]
    block_size: usize,
    /// int4: rtn (round to nearest), awq (activation-aware) or gptq (error-compensating); awq
    /// and gptq need --calibration. Default: gptq with --calibration, else rtn.
    #[arg(long, value_name = "METHOD")]
    int4_method: Option<String>,
    /// int4: scale type, f16 or f32.
    #[arg(long, default_value = "f16", value_name = "TYPE")]
    int4_scales: String,
    /// int4: asymmetric blocks with zero points.
    #[arg(long)]
    int4_zero_points: bool,
    /// Keep the most sensitive quantized layers in float until the model's output error on the
    /// calibration set is within this budget (1 - cosine).
    #[arg(long, value_name = "X")]
    accuracy_budget: Option<f32>,
    /// Keep these layers in float (node names, or their first output's name, comma-separated;
    /// `--report` lists the quantized layers).
    #[arg(long, value_name = "NAMES", value_delimiter = ',')]
    keep_float: Vec<String>,
    /// Prune: magnitude:S[:global|:layer] (unstructured, stored sparsely), channels:S (removes
    /// output channels), 2:4 (semi-structured).
    #[arg(long, value_name = "SPEC")]
    prune: Option<String>,
}

/// The compression options the flags ask for.
fn compress_options(a: &Args) -> Result<CompressOptions> {
    let mut c = CompressOptions {
        quantize: a.quantize.as_deref().map(str::parse).transpose()?,
        prune: a.prune.as_deref().map(str::parse).transpose()?,
        calibration: a.calibration.clone(),
        calibrator: a.calibrator.parse()?,
        block_size: a.block_size,
        int4_method: match (&a.int4_method, &a.calibration) {
            (Some(m), _) => m.parse()?,
            (None, Some(_)) => Int4Method::Gptq,
            (None, None) => Int4Method::Rtn,
        },
        int4_zero_points: a.int4_zero_points,
        accuracy_budget: a.accuracy_budget,
        keep_float: a.keep_float.clone(),
        bias_correction: !a.no_bias_correction,
        smoothing: a.smoothing.parse()?,
        int8_gptq: match a.int8_weights.as_str() {
            "gptq" => true,
            "rtn" => false,
            s => return Err(Error::Input(format!("--int8-weights {s} (gptq or rtn)"))),
        },
        ..Default::default()
    };
    c.int4_f16_scales = match a.int4_scales.as_str() {
        "f16" => true,
        "f32" => false,
        s => return Err(Error::Input(format!("--int4-scales {s} (f16 or f32)"))),
    };
    if let Some(dir) = &c.calibration {
        if !dir.is_dir() {
            return Err(Error::Input(format!("--calibration {}: not a folder", dir.display())));
        }
    }
    Ok(c)
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
    let opts = CompileOptions {
        target: a.target.clone(),
        fold: !a.no_fold,
        dce: !a.no_dce,
        skip,
        compress: compress_options(&a)?,
    };
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
                    "nodes_after": r.nodes_after, "changes": r.changes, "ms": r.millis,
                    "notes": r.notes})
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
        print_notes(&compiled.reports);
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

/// What the passes noted (e.g. the compression passes' per-layer error tables), under a heading
/// per pass.
fn print_notes(reports: &[kiln_compiler::pass::PassReport]) {
    for r in reports.iter().filter(|r| !r.notes.is_empty()) {
        println!("\n{}:", r.name);
        for line in &r.notes {
            println!("  {line}");
        }
    }
}
