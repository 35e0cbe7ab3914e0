//! The contract between the runtime and an execution backend (CPU now, wgpu later).
//!
//! A backend turns a validated artifact into an `Executable` once per `Model` (this is where
//! weights get prepacked, uploaded to a device or wrapped zero-copy), and each `Session` owns the
//! mutable per-session state the executable needs (shape-keyed memory plans, device buffers, scratch).
//! `run` receives every input at once and returns every output, so a GPU backend can record the whole
//! program into one submission.

use std::any::Any;
use std::sync::Arc;

use crate::artifact::Artifact;
use crate::error::Result;
use crate::value::Value;

pub trait Backend: Send + Sync {
    /// Short name shown by the CLI (e.g. "cpu-avx512").
    fn name(&self) -> String;
    /// Prepare an artifact for execution.
    fn prepare(&self, artifact: Arc<Artifact>) -> Result<Arc<dyn Executable>>;
}

/// Per-session mutable state, owned by a `Session`.
pub type SessionState = Box<dyn Any + Send>;

pub trait Executable: Send + Sync {
    fn new_state(&self) -> SessionState;
    /// Run with inputs in program-input order; outputs come back in program-output order.
    fn run(&self, state: &mut SessionState, inputs: Vec<Value>) -> Result<Vec<Value>>;
    /// Bytes of intermediate memory the last run of this state needed at its peak.
    fn peak_bytes(&self, _state: &SessionState) -> usize {
        0
    }
    /// Start (or stop) timing every op of this state's runs; a backend that cannot profile
    /// ignores it.
    fn set_profiling(&self, _state: &mut SessionState, _on: bool) {}
    /// Time spent per op type since profiling was switched on, most expensive first.
    fn profile(&self, _state: &SessionState) -> Vec<OpTime> {
        Vec::new()
    }
}

/// Accumulated time of one op type (domain-qualified for non-ONNX ops, e.g. "kiln.Attention").
#[derive(Clone, Debug, PartialEq)]
pub struct OpTime {
    pub op: String,
    pub calls: u64,
    pub nanos: u64,
}
