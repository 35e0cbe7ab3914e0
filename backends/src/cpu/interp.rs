//! Executes a program step by step. Kernels are looked up once at prepare time (an unsupported op
//! fails at load, naming the op and node), and every value is dropped right after its last reader
//! so intermediate memory stays at the live set.

use kiln_runtime::manifest::{Program, Step};
use kiln_runtime::{Artifact, Error, Result, Tensor, Value};

use super::control_flow;
use super::ctx::OpCtx;
use super::registry::{registry, Kernel};

/// A program ready to run: constants materialised (zero-copy), kernels resolved, lifetimes known.
pub struct Prepared {
    pub(crate) prog: Program,
    consts: Vec<(usize, Tensor)>,
    kernels: Vec<Kernel>,
    /// Values to drop after each step.
    free_after: Vec<Vec<usize>>,
    /// Per step: prepared subgraphs by attribute name.
    pub(crate) subs: Vec<Vec<(String, Prepared)>>,
}

#[derive(Default)]
pub struct Stats {
    pub live_bytes: usize,
    pub peak_bytes: usize,
}

fn value_bytes(v: &Value) -> usize {
    match v {
        Value::Tensor(t) => t.buffer().filter(|b| !b.is_borrowed()).map_or(0, |b| b.len()),
        Value::Sequence(_, ts) => ts.iter().map(|t| t.bytes().len()).sum(),
        Value::Optional(Some(v)) => value_bytes(v),
        Value::Optional(None) => 0,
    }
}

impl Prepared {
    pub fn new(prog: &Program, artifact: Option<&Artifact>) -> Result<Prepared> {
        let reg = registry();
        let mut kernels = Vec::with_capacity(prog.steps.len());
        let mut subs = Vec::with_capacity(prog.steps.len());
        for s in &prog.steps {
            let k = reg.get(&s.domain, &s.op).ok_or_else(|| Error::Unsupported {
                op: s.op.clone(),
                domain: if s.domain.is_empty() { "ai.onnx".into() } else { s.domain.clone() },
                opset: s.opset,
                node: s.name.clone(),
                detail: "no CPU kernel".into(),
            })?;
            kernels.push(k);
            let mut mine = Vec::new();
            for a in &s.attrs {
                if let Some(g) = &a.g {
                    mine.push((a.name.clone(), Prepared::new(g, artifact)?));
                }
            }
            subs.push(mine);
        }
        let mut consts = Vec::new();
        for c in &prog.constants {
            let t = c.tensor.as_ref().ok_or_else(|| {
                Error::InvalidArtifact("constant without data".into())
            })?;
            consts.push((c.value as usize, kiln_runtime::artifact::tensor_from_data(t, artifact)?));
        }
        // Last reader of each value; program outputs live to the end.
        let n = prog.values.len();
        let mut last: Vec<Option<usize>> = vec![None; n];
        for (i, s) in prog.steps.iter().enumerate() {
            for &v in s.inputs.iter().filter(|&&v| v >= 0) {
                last[v as usize] = Some(i);
            }
            for a in &s.attrs {
                for g in a.g.iter().chain(&a.graphs) {
                    for c in &g.captures {
                        last[c.outer as usize] = Some(i);
                    }
                }
            }
        }
        for &o in &prog.outputs {
            last[o as usize] = None;
        }
        let mut free_after = vec![Vec::new(); prog.steps.len()];
        for (v, l) in last.iter().enumerate() {
            if let Some(i) = l {
                if !prog.outputs.contains(&(v as u32)) {
                    free_after[*i].push(v);
                }
            }
        }
        Ok(Prepared { prog: prog.clone(), consts, kernels, free_after, subs })
    }

    /// Run with `inputs` in program order; `outer` is the enclosing frame for captures.
    pub fn run(
        &self,
        artifact: Option<&Artifact>,
        inputs: Vec<Value>,
        outer: &[Option<Value>],
        stats: &mut Stats,
    ) -> Result<Vec<Value>> {
        let p = &self.prog;
        if inputs.len() != p.inputs.len() {
            return Err(Error::Input(format!(
                "program takes {} inputs, {} given",
                p.inputs.len(),
                inputs.len()
            )));
        }
        let mut frame: Vec<Option<Value>> = vec![None; p.values.len()];
        for (id, t) in &self.consts {
            frame[*id] = Some(Value::Tensor(t.clone()));
        }
        for c in &p.captures {
            let v = outer.get(c.outer as usize).cloned().flatten().ok_or_else(|| {
                Error::Other(format!(
                    "subgraph reads outer value '{}' which is not available",
                    p.values[c.inner as usize].name
                ))
            })?;
            frame[c.inner as usize] = Some(v);
        }
        for (&id, v) in p.inputs.iter().zip(inputs) {
            frame[id as usize] = Some(v);
        }
        let base_live = stats.live_bytes;
        for (i, step) in p.steps.iter().enumerate() {
            let outs = self
                .run_step(i, step, artifact, &frame, stats)
                .map_err(|e| e.at_node(&step.op, &step.name))?;
            for (k, &o) in step.outputs.iter().enumerate() {
                if o < 0 {
                    continue;
                }
                let v = outs.get(k).cloned().ok_or_else(|| Error::Kernel {
                    op: step.op.clone(),
                    node: step.name.clone(),
                    msg: format!("kernel produced {} outputs, step binds output {k}", outs.len()),
                })?;
                stats.live_bytes += value_bytes(&v);
                frame[o as usize] = Some(v);
            }
            stats.peak_bytes = stats.peak_bytes.max(stats.live_bytes);
            for &v in &self.free_after[i] {
                if let Some(old) = frame[v].take() {
                    stats.live_bytes = stats.live_bytes.saturating_sub(value_bytes(&old));
                }
            }
        }
        let mut out = Vec::with_capacity(p.outputs.len());
        for &o in &p.outputs {
            let v = frame[o as usize].clone().ok_or_else(|| {
                Error::Other(format!("output '{}' was never computed", p.values[o as usize].name))
            })?;
            out.push(v);
        }
        stats.live_bytes = base_live;
        Ok(out)
    }

    fn run_step(
        &self,
        i: usize,
        step: &Step,
        artifact: Option<&Artifact>,
        frame: &[Option<Value>],
        stats: &mut Stats,
    ) -> Result<Vec<Value>> {
        let inputs: Vec<Option<Value>> = step
            .inputs
            .iter()
            .map(|&v| if v < 0 { None } else { frame[v as usize].clone() })
            .collect();
        for (k, (&v, x)) in step.inputs.iter().zip(&inputs).enumerate() {
            if v >= 0 && x.is_none() {
                return Err(Error::Other(format!(
                    "input {k} ('{}') has no value",
                    self.prog.values[v as usize].name
                )));
            }
        }
        let ctx = OpCtx::new(step, artifact);
        match self.kernels[i] {
            Kernel::Tensor(k) => {
                let ts = inputs
                    .into_iter()
                    .map(|v| v.map(|v| v.into_tensor()).transpose())
                    .collect::<Result<Vec<_>>>()?;
                Ok(guarded(step, || k(&ctx, &ts))?.into_iter().map(Value::Tensor).collect())
            }
            Kernel::Value(k) => guarded(step, || k(&ctx, &inputs)),
            Kernel::ControlFlow => {
                control_flow::run(&ctx, &self.subs[i], artifact, inputs, frame, stats)
            }
        }
    }
}

/// Run a kernel so that a bug in it (an index out of bounds on an input combination nobody
/// foresaw) becomes an error naming the step instead of taking down the embedding app. Kernels
/// are meant to return `Err` themselves; this is the backstop, and costs nothing when no panic.
fn guarded<T>(step: &Step, f: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|payload| {
        let msg = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        Err(Error::Other(format!("internal error in {} kernel at node '{}': {msg}", step.op, step.name)))
    })
}

/// Evaluate one step on concrete inputs (used by compile-time constant folding).
pub fn eval_step(step: &Step, inputs: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let k = registry().get(&step.domain, &step.op).ok_or_else(|| Error::Unsupported {
        op: step.op.clone(),
        domain: step.domain.clone(),
        opset: step.opset,
        node: step.name.clone(),
        detail: "no CPU kernel".into(),
    })?;
    match k {
        Kernel::Tensor(k) => guarded(step, || k(&OpCtx::new(step, None), inputs)),
        _ => Err(Error::Other(format!("{} cannot be evaluated as a single step", step.op))),
    }
}
