//! The one dispatch point from (domain, op type) to a CPU kernel.

use std::collections::HashMap;
use std::sync::OnceLock;

use kiln_runtime::{Result, Tensor, Value};

use super::ctx::OpCtx;

/// A kernel over tensors: inputs in step order (None = omitted optional input); returns every
/// output in order (the interpreter drops the ones the step does not bind).
pub type TensorKernel = fn(&OpCtx, &[Option<Tensor>]) -> Result<Vec<Tensor>>;
/// A kernel over any values (sequences, optionals).
pub type ValueKernel = fn(&OpCtx, &[Option<Value>]) -> Result<Vec<Value>>;

#[derive(Clone, Copy)]
pub enum Kernel {
    Tensor(TensorKernel),
    Value(ValueKernel),
    /// Executed by the interpreter itself (If, Loop, Scan).
    ControlFlow,
}

#[derive(Default)]
pub struct Registry {
    map: HashMap<(&'static str, &'static str), Kernel>,
}

/// ONNX's default domain, spelled both ways models spell it.
fn canonical_domain(domain: &str) -> &str {
    if domain == "ai.onnx" {
        ""
    } else {
        domain
    }
}

impl Registry {
    /// Register a tensor kernel for op `op` of the ai.onnx domain.
    pub fn add(&mut self, op: &'static str, k: TensorKernel) {
        self.map.insert(("", op), Kernel::Tensor(k));
    }

    pub fn add_in(&mut self, domain: &'static str, op: &'static str, k: TensorKernel) {
        self.map.insert((domain, op), Kernel::Tensor(k));
    }

    pub fn add_value(&mut self, op: &'static str, k: ValueKernel) {
        self.map.insert(("", op), Kernel::Value(k));
    }

    pub fn get(&self, domain: &str, op: &str) -> Option<Kernel> {
        self.map.get(&(canonical_domain(domain), op)).copied()
    }

    pub fn supports(&self, domain: &str, op: &str) -> bool {
        self.get(domain, op).is_some()
    }

    /// Every registered (domain, op), sorted.
    pub fn ops(&self) -> Vec<(&'static str, &'static str)> {
        let mut v: Vec<_> = self.map.keys().copied().collect();
        v.sort();
        v
    }
}

/// The process-wide registry of CPU kernels.
pub fn registry() -> &'static Registry {
    static REG: OnceLock<Registry> = OnceLock::new();
    REG.get_or_init(|| {
        let mut r = Registry::default();
        for op in ["If", "Loop", "Scan", "SequenceMap"] {
            r.map.insert(("", op), Kernel::ControlFlow);
        }
        super::kernels::register_all(&mut r);
        r
    })
}
