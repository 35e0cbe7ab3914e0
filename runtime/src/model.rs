//! `Model` (an artifact prepared by a backend, shareable across threads) and `Session` (one
//! caller's execution state). Inputs are checked against the artifact's declared types before any
//! kernel runs: dtype, rank, fixed dims, and that one symbol takes one size across all inputs.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use crate::artifact::Artifact;
use crate::backend::{Backend, Executable, SessionState};
use crate::error::{Error, Result};
use crate::manifest::{ValueInfo, ValueKind};
use crate::tensor::Tensor;
use crate::value::Value;
use crate::DType;

/// A model ready to run. Cheap to clone; `Send + Sync`.
#[derive(Clone)]
pub struct Model {
    artifact: Arc<Artifact>,
    exec: Arc<dyn Executable>,
    backend_name: String,
}

impl Model {
    pub fn new(artifact: Artifact, backend: &dyn Backend) -> Result<Model> {
        let artifact = Arc::new(artifact);
        let exec = backend.prepare(artifact.clone())?;
        Ok(Model { artifact, exec, backend_name: backend.name() })
    }

    /// Memory-map and prepare a `.kiln` file.
    pub fn open(path: impl AsRef<Path>, backend: &dyn Backend) -> Result<Model> {
        Model::new(Artifact::open(path)?, backend)
    }

    /// Prepare an artifact embedded with `include_artifact!`.
    pub fn from_static(bytes: &'static [u8], backend: &dyn Backend) -> Result<Model> {
        Model::new(Artifact::from_static(bytes)?, backend)
    }

    pub fn artifact(&self) -> &Artifact {
        &self.artifact
    }

    pub fn backend_name(&self) -> &str {
        &self.backend_name
    }

    pub fn inputs(&self) -> Vec<&ValueInfo> {
        let p = self.artifact.program();
        p.inputs.iter().map(|&i| &p.values[i as usize]).collect()
    }

    pub fn outputs(&self) -> Vec<&ValueInfo> {
        let p = self.artifact.program();
        p.outputs.iter().map(|&i| &p.values[i as usize]).collect()
    }

    pub fn session(&self) -> Session {
        Session { model: self.clone(), state: self.exec.new_state() }
    }
}

/// One caller's execution state (memory plans, scratch). `Send`, not shared.
pub struct Session {
    model: Model,
    state: SessionState,
}

impl Session {
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Run with tensors in graph-input order.
    pub fn run(&mut self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>> {
        let values = self.run_values(inputs.into_iter().map(Value::Tensor).collect())?;
        values.into_iter().map(|v| v.into_tensor()).collect()
    }

    /// Run with named tensors (any order; every input must be given once).
    pub fn run_named(&mut self, inputs: Vec<(&str, Tensor)>) -> Result<Vec<Tensor>> {
        let infos = self.model.inputs();
        let mut by_name: HashMap<&str, Tensor> = HashMap::new();
        for (name, t) in inputs {
            if !infos.iter().any(|i| i.name == name) {
                let names: Vec<&str> = infos.iter().map(|i| i.name.as_str()).collect();
                return Err(Error::Input(format!("model has no input '{name}' (inputs: {names:?})")));
            }
            if by_name.insert(name, t).is_some() {
                return Err(Error::Input(format!("input '{name}' given twice")));
            }
        }
        let mut ordered = Vec::new();
        for info in infos {
            ordered.push(
                by_name
                    .remove(info.name.as_str())
                    .ok_or_else(|| Error::Input(format!("missing input '{}'", info.name)))?,
            );
        }
        self.run(ordered)
    }

    /// Run with any values (tensors, sequences, optionals) in graph-input order.
    pub fn run_values(&mut self, mut inputs: Vec<Value>) -> Result<Vec<Value>> {
        check_inputs(&self.model.inputs(), &mut inputs)?;
        self.model.exec.run(&mut self.state, inputs)
    }

    /// Peak bytes of intermediate memory used by the last run.
    pub fn peak_bytes(&self) -> usize {
        self.model.exec.peak_bytes(&self.state)
    }

    /// Time every op of the following runs (costs a clock read per op).
    pub fn set_profiling(&mut self, on: bool) {
        self.model.exec.set_profiling(&mut self.state, on)
    }

    /// Time per op type accumulated while profiling was on, most expensive first.
    pub fn profile(&self) -> Vec<crate::backend::OpTime> {
        self.model.exec.profile(&self.state)
    }
}

/// Kernels take typed views, which need aligned data; a tensor decoded in place from a file may
/// not be aligned (copied only then).
fn align_value(v: &mut Value) {
    let take = |t: &mut Tensor| *t = std::mem::replace(t, Tensor::scalar(0u8)).aligned();
    match v {
        Value::Tensor(t) => take(t),
        Value::Sequence(_, ts) => ts.iter_mut().for_each(take),
        Value::Optional(Some(inner)) => align_value(inner),
        Value::Optional(None) => {}
    }
}

/// Exporters write "?" for a dim they know nothing about; it names no shared size.
fn is_named_symbol(s: &str) -> bool {
    !s.is_empty() && s != "?"
}

fn check_inputs(infos: &[&ValueInfo], inputs: &mut [Value]) -> Result<()> {
    if infos.len() != inputs.len() {
        return Err(Error::Input(format!(
            "model takes {} inputs, {} given",
            infos.len(),
            inputs.len()
        )));
    }
    let mut symbols: HashMap<&str, usize> = HashMap::new();
    for (info, value) in infos.iter().zip(inputs.iter_mut()) {
        // A one-element tensor given for a declared scalar is taken as that scalar (numpy and
        // other runtimes make [1]-shaped arrays where a scalar is meant).
        align_value(value);
        if let Value::Tensor(t) = value {
            if info.has_shape && info.dims.is_empty() && t.rank() > 0 && t.len() == 1 {
                *t = t.reshape(&[])?;
            }
        }
        let t = match (info.kind(), &*value) {
            (ValueKind::Tensor, Value::Tensor(t)) => t,
            (ValueKind::Tensor, v) => {
                return Err(Error::Input(format!(
                    "input '{}' must be a tensor, got a {}",
                    info.name,
                    v.kind_name()
                )))
            }
            _ => continue,
        };
        if let Some(want) = DType::from_onnx(info.dtype) {
            if t.dtype() != want {
                return Err(Error::Input(format!(
                    "input '{}' must be {}, got {}",
                    info.name,
                    info.type_string(),
                    t.dtype()
                )));
            }
        }
        if !info.has_shape {
            continue;
        }
        let shape = t.shape();
        let mismatch = || {
            Error::Input(format!(
                "input '{}' must have shape {}, got {:?}",
                info.name,
                info.type_string(),
                shape
            ))
        };
        if shape.len() != info.dims.len() {
            return Err(mismatch());
        }
        for (d, &n) in info.dims.iter().zip(shape) {
            if d.size >= 0 {
                if d.size as usize != n {
                    return Err(mismatch());
                }
            } else if is_named_symbol(&d.symbol) {
                if let Some(&prev) = symbols.get(d.symbol.as_str()) {
                    if prev != n {
                        return Err(Error::Input(format!(
                            "input '{}': dimension '{}' is {n} here but {prev} in an earlier input",
                            info.name, d.symbol
                        )));
                    }
                } else {
                    symbols.insert(&d.symbol, n);
                }
            }
        }
    }
    Ok(())
}
