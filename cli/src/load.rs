//! Opening a model for the CLI: a `.kiln` is memory-mapped; anything else is compiled in memory.

use std::path::Path;
use std::time::Instant;

use kiln_backends::CpuBackend;
use kiln_passes::{compile_file, CompileOptions};
use kiln_runtime::artifact::MAGIC;
use kiln_runtime::{Artifact, Error, Model, Result};

pub struct Loaded {
    pub model: Model,
    /// Milliseconds to read (and, for .onnx, compile) and prepare the model.
    pub load_ms: f64,
}

pub fn is_artifact(path: &Path) -> Result<bool> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)
        .map_err(|e| Error::Input(format!("cannot open {}: {e}", path.display())))?;
    let mut head = [0u8; 8];
    let n = f.read(&mut head)?;
    Ok(n == 8 && &head == MAGIC)
}

/// Read an artifact, compiling first if `path` is not one.
pub fn artifact(path: &Path) -> Result<Artifact> {
    if is_artifact(path)? {
        Artifact::open(path)
    } else {
        let compiled = compile_file(path, &CompileOptions::default())?;
        Artifact::from_vec(kiln_compiler::writer::to_bytes(&compiled.lowered)?)
    }
}

pub fn model(path: &Path, threads: usize) -> Result<Loaded> {
    let t = Instant::now();
    let backend = CpuBackend::new(threads)?;
    let model = Model::new(artifact(path)?, &backend)?;
    Ok(Loaded { model, load_ms: t.elapsed().as_secs_f64() * 1e3 })
}
