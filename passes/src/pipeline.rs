//! The default compile pipeline: import → infer → passes → support check → lower.

use std::path::Path;

use kiln_backends::cpu::registry;
use kiln_compiler::import::import_model;
use kiln_compiler::infer::infer_types;
use kiln_compiler::ir::{Graph, Model};
use kiln_compiler::lower::{lower, Lowered};
use kiln_compiler::pass::{PassManager, PassReport};
use kiln_runtime::{Error, Result};

use crate::{ConstantFolding, DeadCodeElimination};

#[derive(Clone, Debug)]
pub struct CompileOptions {
    pub target: String,
    pub fold: bool,
    pub dce: bool,
    /// Names of optimisation passes to leave out (see `OPTIMIZATIONS`).
    pub skip: Vec<String>,
    /// Pruning and quantization (none by default).
    pub compress: crate::compress::CompressOptions,
}

impl Default for CompileOptions {
    fn default() -> Self {
        CompileOptions {
            target: "cpu-generic".into(),
            fold: true,
            dce: true,
            skip: Vec::new(),
            compress: Default::default(),
        }
    }
}

/// The optimisation passes run by default, in order (each can be skipped by name).
pub const OPTIMIZATIONS: &[&str] =
    &["identity", "layout", "conv-bn", "conv-affine", "gelu", "layernorm", "rmsnorm", "hardswish", "softmax", "attention", "matmul-bias", "epilogue", "prepack"];

fn optimization(name: &str) -> Box<dyn kiln_compiler::pass::Pass> {
    use crate::fuse::*;
    match name {
        "identity" => Box::new(EliminateIdentity),
        "layout" => Box::new(CancelLayout),
        "conv-bn" => Box::new(FoldConvBatchNorm),
        "conv-affine" => Box::new(FoldConvAffine),
        "gelu" => Box::new(FuseGelu),
        "layernorm" => Box::new(FuseLayerNorm),
        "rmsnorm" => Box::new(FuseRmsNorm),
        "hardswish" => Box::new(FuseHardSwish),
        "softmax" => Box::new(FuseSoftmax),
        "attention" => Box::new(FuseAttention),
        "matmul-bias" => Box::new(FuseMatMulBias),
        "epilogue" => Box::new(FuseEpilogue),
        "prepack" => Box::new(crate::prepack::Prepack::default()),
        other => unreachable!("OPTIMIZATIONS lists an unknown pass {other}"),
    }
}

pub struct Compiled {
    pub model: Model,
    pub lowered: Lowered,
    pub reports: Vec<PassReport>,
}

/// Optimisation passes that must see the final (pruned, quantized) weights, so compression runs
/// before them.
const AFTER_COMPRESSION: &[&str] = &["prepack"];

/// The passes `opts` selects, in order: folding, the fusions, compression, weight layout, DCE.
pub fn pass_manager(opts: &CompileOptions) -> Result<PassManager> {
    let mut pm = PassManager::new();
    if opts.fold {
        pm.add(Box::new(ConstantFolding::default()));
    }
    let enabled = |name: &&&str| !opts.skip.iter().any(|s| s == *name);
    for name in OPTIMIZATIONS.iter().filter(|n| !AFTER_COMPRESSION.contains(n)).filter(enabled) {
        pm.add(optimization(name));
    }
    for p in crate::compress::passes(&opts.compress)? {
        pm.add(p);
    }
    for name in OPTIMIZATIONS.iter().filter(|n| AFTER_COMPRESSION.contains(n)).filter(enabled) {
        pm.add(if *name == "prepack" { Box::new(crate::prepack::Prepack::for_target(&opts.target)) } else { optimization(name) });
    }
    if opts.dce {
        pm.add(Box::new(DeadCodeElimination));
    }
    Ok(pm)
}

/// Fail with the first op the CPU backend cannot run, naming op, domain, opset and node.
pub fn check_supported(g: &Graph) -> Result<()> {
    let reg = registry();
    for n in &g.nodes {
        if !reg.supports(&n.domain, &n.op) {
            return Err(Error::Unsupported {
                op: n.op.clone(),
                domain: if n.domain.is_empty() { "ai.onnx".into() } else { n.domain.clone() },
                opset: n.opset,
                node: n.name.clone(),
                detail: "no CPU kernel".into(),
            });
        }
        for sg in n.subgraphs() {
            check_supported(sg)?;
        }
    }
    Ok(())
}

/// Compile an IR model that is already imported.
pub fn compile_model(mut model: Model, opts: &CompileOptions) -> Result<Compiled> {
    infer_types(&mut model)?;
    let pm = pass_manager(opts)?;
    let reports = pm.run(&mut model)?;
    infer_types(&mut model)?;
    check_supported(&model.graph)?;
    let names: Vec<String> = pm.names().iter().map(|s| s.to_string()).collect();
    let lowered = lower(&model, &opts.target, &names)?;
    Ok(Compiled { model, lowered, reports })
}

/// Compile an `.onnx` file.
pub fn compile_file(path: &Path, opts: &CompileOptions) -> Result<Compiled> {
    compile_model(import_model(path)?, opts)
}
