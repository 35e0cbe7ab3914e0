//! Model compression driven by `kiln compile`: pruning, calibration and quantization.
//!
//! `CompressOptions` is what the CLI parsed; `passes` turns it into ordinary `Pass`es that the
//! pipeline runs after the fusion passes and before weight prepacking, in the order
//! prune → quantize (pruning first so quantization sees the final weights; both need the fused
//! graph so that a FusedMatMul's weight is quantized once, with its bias and activation kept).
//!
//! Files: `calibrate.rs` (calibration samples, observers running the float model on kiln's own
//! runtime, calibrators), `quant_int8.rs` (int8 static and dynamic), `quant_int4.rs` (weight-only
//! int4, RTN and AWQ), `prune.rs` (magnitude, channels, 2:4), `budget.rs` (accuracy budget and the
//! per-layer error table).

use std::path::PathBuf;

use kiln_compiler::pass::Pass;
use kiln_runtime::{Error, Result};

pub mod calibrate;
pub mod quant_int8;
pub mod quant_int4;
pub mod prune;
pub mod budget;
pub mod gptq;

/// `--quantize`
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quantize {
    /// Static int8: calibrated activation ranges, per-output-channel symmetric int8 weights.
    Int8,
    /// int8 weights, activations quantized per row at run time.
    Int8Dynamic,
    /// Weight-only int4, block-wise along K.
    Int4,
}

/// `--calibrator`: how an activation range is chosen from the observed values.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Calibrator {
    MinMax,
    /// Keep this percentile of |x| (e.g. 99.99).
    Percentile(f32),
    /// KL-divergence threshold search over a histogram (TensorRT's entropy calibration).
    Entropy,
    /// The clipping threshold minimising the mean squared quantization error.
    Mse,
}

/// `--int4-method`
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Int4Method {
    /// Round to nearest.
    Rtn,
    /// Activation-aware: scale salient input channels (from calibration) before rounding.
    Awq,
    /// GPTQ: round one input row at a time, pushing the error onto the rows not yet rounded
    /// (needs calibration; embedding tables are rounded to nearest).
    Gptq,
}

/// `--prune`
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Prune {
    /// Unstructured: zero the fraction `sparsity` of weights with the smallest magnitude, across
    /// all prunable weights (`global`) or per layer.
    Magnitude { sparsity: f32, global: bool },
    /// Structured: remove this fraction of output channels of Conv/Gemm/MatMul by L1 norm.
    Channels(f32),
    /// Semi-structured 2:4: in every group of 4 consecutive weights along K keep the 2 largest.
    TwoFour,
}

/// `--smoothing` (static int8). Each input channel c of a quantized layer is divided by
/// s_c = max|X_c|^α / max|W_c|^(1-α) and its weight rows multiplied by it, so that one
/// per-tensor u8 range fits channels of unequal magnitude (SmoothQuant).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Smoothing {
    Off,
    /// Per input value, the α (or none) with the least estimated output quantization noise.
    Auto,
    /// This α for every input value.
    Alpha(f32),
}

impl std::str::FromStr for Smoothing {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "off" => Ok(Smoothing::Off),
            "auto" => Ok(Smoothing::Auto),
            _ => match s.parse::<f32>() {
                Ok(a) if a > 0.0 && a <= 1.0 => Ok(Smoothing::Alpha(a)),
                _ => Err(Error::Input(format!("bad --smoothing '{s}' (auto, off, or an α in (0, 1])"))),
            },
        }
    }
}

#[derive(Clone, Debug)]
pub struct CompressOptions {
    pub quantize: Option<Quantize>,
    pub prune: Option<Prune>,
    /// Folder with one sub-folder per sample, each holding input_K.npy (as `kiln run --inputs`).
    pub calibration: Option<PathBuf>,
    pub calibrator: Calibrator,
    /// int4 block size along K: 32, 64 or 128.
    pub block_size: usize,
    pub int4_method: Int4Method,
    /// int4 scales stored as f16 (default) or f32.
    pub int4_f16_scales: bool,
    /// int4 with zero points (asymmetric) instead of symmetric.
    pub int4_zero_points: bool,
    /// Keep the most sensitive layers in float until the model-level output error is within this.
    pub accuracy_budget: Option<f32>,
    /// Static int8: SmoothQuant-style smoothing of the layers' inputs.
    pub smoothing: Smoothing,
    /// Static int8: round weights with GPTQ (from the calibration inputs) instead of to nearest.
    pub int8_gptq: bool,
    /// Static int8 and calibrated int4: take the mean output shift of each layer's rounded
    /// weights (on the calibration inputs) off its bias.
    pub bias_correction: bool,
    /// Layers that stay float whatever else is asked: node names or the names of their first
    /// output (as `--report`'s layer table prints them).
    pub keep_float: Vec<String>,
}

impl Default for CompressOptions {
    fn default() -> Self {
        CompressOptions {
            quantize: None,
            prune: None,
            calibration: None,
            calibrator: Calibrator::Mse,
            block_size: 32,
            int4_method: Int4Method::Rtn,
            int4_f16_scales: true,
            int4_zero_points: false,
            accuracy_budget: None,
            smoothing: Smoothing::Auto,
            int8_gptq: true,
            bias_correction: true,
            keep_float: Vec::new(),
        }
    }
}

impl CompressOptions {
    /// Whether `--keep-float` names the node (by its name or its first output's name).
    pub fn keeps_float(&self, g: &kiln_compiler::ir::Graph, node: usize) -> bool {
        self.keep_float.iter().any(|k| names(g, node, k))
    }

    /// An error for a `--keep-float` name that is none of the `layers` (node indices) a
    /// quantization pass would rewrite: a typo would otherwise quantize the layer silently.
    pub fn check_keep_float(&self, g: &kiln_compiler::ir::Graph, layers: &[usize]) -> Result<()> {
        match self.keep_float.iter().find(|k| !layers.iter().any(|&i| names(g, i, k))) {
            Some(k) => Err(Error::Input(format!("--keep-float {k}: no quantizable layer has that name (`kiln compile --report` with --accuracy-budget lists them)"))),
            None => Ok(()),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.quantize.is_none() && self.prune.is_none()
    }
}

impl std::str::FromStr for Quantize {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "int8" => Quantize::Int8,
            "int8-dynamic" => Quantize::Int8Dynamic,
            "int4" => Quantize::Int4,
            _ => return Err(Error::Input(format!("unknown --quantize '{s}' (int8, int8-dynamic, int4)"))),
        })
    }
}

impl std::str::FromStr for Calibrator {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::Input(format!("unknown --calibrator '{s}' (minmax, percentile[:P], entropy, mse)"));
        Ok(match s.split_once(':') {
            None if s == "minmax" => Calibrator::MinMax,
            None if s == "percentile" => Calibrator::Percentile(99.99),
            None if s == "entropy" => Calibrator::Entropy,
            None if s == "mse" => Calibrator::Mse,
            Some(("percentile", p)) => {
                let p: f32 = p.parse().map_err(|_| bad())?;
                if !(p > 0.0 && p <= 100.0) {
                    return Err(Error::Input(format!("--calibrator percentile:{p}: P must be in (0, 100]")));
                }
                Calibrator::Percentile(p)
            }
            _ => return Err(bad()),
        })
    }
}

impl std::str::FromStr for Int4Method {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "rtn" => Int4Method::Rtn,
            "awq" => Int4Method::Awq,
            "gptq" => Int4Method::Gptq,
            _ => return Err(Error::Input(format!("unknown --int4-method '{s}' (rtn, awq, gptq)"))),
        })
    }
}

impl std::str::FromStr for Prune {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            Error::Input(format!(
                "bad --prune '{s}' (magnitude:S[:global|:layer], channels:S, 2:4; S a fraction in (0, 1))"
            ))
        };
        let frac = |v: &str| -> Result<f32> {
            let f: f32 = v.parse().map_err(|_| bad())?;
            if f > 0.0 && f < 1.0 { Ok(f) } else { Err(bad()) }
        };
        if s == "2:4" {
            return Ok(Prune::TwoFour);
        }
        let parts: Vec<&str> = s.split(':').collect();
        Ok(match parts.as_slice() {
            ["magnitude", v] => Prune::Magnitude { sparsity: frac(v)?, global: true },
            ["magnitude", v, "global"] => Prune::Magnitude { sparsity: frac(v)?, global: true },
            ["magnitude", v, "layer"] => Prune::Magnitude { sparsity: frac(v)?, global: false },
            ["channels", v] => Prune::Channels(frac(v)?),
            _ => return Err(bad()),
        })
    }
}

/// The compression passes `opts` asks for, in the order they must run.
/// Whether `name` is node `i`'s name or its first output's.
fn names(g: &kiln_compiler::ir::Graph, i: usize, name: &str) -> bool {
    let n = &g.nodes[i];
    n.name == name || n.output(0).is_some_and(|o| g.values[o].name == name)
}

pub fn passes(opts: &CompressOptions) -> Result<Vec<Box<dyn Pass>>> {
    if opts.quantize == Some(Quantize::Int8) && opts.calibration.is_none() {
        return Err(Error::Input("--quantize int8 needs --calibration DIR (or use int8-dynamic)".into()));
    }
    if matches!(opts.int4_method, Int4Method::Awq | Int4Method::Gptq) && opts.quantize == Some(Quantize::Int4) && opts.calibration.is_none() {
        let name = if opts.int4_method == Int4Method::Awq { "awq" } else { "gptq" };
        return Err(Error::Input(format!("--int4-method {name} needs --calibration DIR")));
    }
    if opts.accuracy_budget.is_some() && opts.calibration.is_none() {
        return Err(Error::Input("--accuracy-budget needs --calibration DIR to measure errors on".into()));
    }
    if ![32, 64, 128].contains(&opts.block_size) {
        return Err(Error::Input(format!("--block-size {} (32, 64 or 128)", opts.block_size)));
    }
    let mut out: Vec<Box<dyn Pass>> = Vec::new();
    if opts.is_empty() {
        return Ok(out);
    }
    out.push(Box::new(AlignWeights));
    if let Some(p) = opts.prune {
        out.push(prune::pass(p, opts)?);
    }
    match opts.quantize {
        Some(Quantize::Int8) | Some(Quantize::Int8Dynamic) => out.push(quant_int8::pass(opts)?),
        Some(Quantize::Int4) => out.push(quant_int4::pass(opts)?),
        None => {}
    }
    Ok(out)
}

/// Copies constants that sit at an odd offset of the .onnx memory map into aligned memory, so
/// the compression passes can read every weight as `&[f32]` (they rewrite the weights anyway).
struct AlignWeights;

impl Pass for AlignWeights {
    fn name(&self) -> &'static str {
        "align-weights"
    }

    fn run(&self, model: &mut kiln_compiler::ir::Model) -> Result<(usize, Vec<String>)> {
        fn align(g: &mut kiln_compiler::ir::Graph) -> usize {
            let mut n = 0;
            for v in &mut g.values {
                if let Some(t) = v.konst.take() {
                    let before = t.bytes().as_ptr();
                    let t = t.aligned();
                    n += usize::from(t.bytes().as_ptr() != before);
                    v.konst = Some(t);
                }
            }
            for node in &mut g.nodes {
                for a in &mut node.attrs {
                    match &mut a.value {
                        kiln_compiler::ir::AttrValue::Graph(sg) => n += align(sg),
                        kiln_compiler::ir::AttrValue::Graphs(gs) => n += gs.iter_mut().map(align).sum::<usize>(),
                        _ => {}
                    }
                }
            }
            n
        }
        Ok((align(&mut model.graph), Vec::new()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_flags() {
        assert_eq!("int8-dynamic".parse::<Quantize>().unwrap(), Quantize::Int8Dynamic);
        assert!("int3".parse::<Quantize>().is_err());
        assert_eq!("percentile:99.9".parse::<Calibrator>().unwrap(), Calibrator::Percentile(99.9));
        assert!("percentile:0".parse::<Calibrator>().is_err());
        assert_eq!("2:4".parse::<Prune>().unwrap(), Prune::TwoFour);
        assert_eq!(
            "magnitude:0.5:layer".parse::<Prune>().unwrap(),
            Prune::Magnitude { sparsity: 0.5, global: false }
        );
        assert!("channels:1.5".parse::<Prune>().is_err());
        assert!("channels".parse::<Prune>().is_err());
        assert_eq!("auto".parse::<Smoothing>().unwrap(), Smoothing::Auto);
        assert_eq!("0.5".parse::<Smoothing>().unwrap(), Smoothing::Alpha(0.5));
        assert!("0".parse::<Smoothing>().is_err());
        assert!("1.5".parse::<Smoothing>().is_err());
    }
}
