//! Executes a program step by step. Kernels are looked up once at prepare time (an unsupported op
//! fails at load, naming the op and node), and every value is dropped right after its last reader
//! so intermediate memory stays at the live set.
//!
//! Steps that only compute on shapes are memoised per session: Shape and Size, and then any pure
//! step reading nothing but their results and constants (the Gather / Unsqueeze / Concat chains
//! that turn a sequence length into Reshape targets). When such a step's inputs equal those of
//! the previous run (each at most `MEMO_MAX_BYTES`), its previous outputs are reused instead of
//! dispatching the kernel. A model with dynamic shapes (MiniLM: ~100 such steps per run) pays
//! the comparisons, not the kernels, while its input shapes stay the same.
//!
//! Kernels with an owned-input form (elementwise, Softmax, LayerNormalization) receive their
//! inputs by value: an input whose last reader is the step (read once by it, not a program
//! output) is moved out of the frame instead of cloned, so if no one else holds its buffer the
//! kernel can write its result there.

use kiln_runtime::manifest::{Program, Step};
use kiln_runtime::{Artifact, Error, Result, Tensor, Value};

use super::control_flow;
use super::ctx::OpCtx;
use super::kernels::elementwise::{owned_kernel, OwnedKernel};
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
    /// Per step: the owned-input form of its kernel, if the op has one.
    owned: Vec<Option<OwnedKernel>>,
    /// Per step and input: move the value out of the frame (this is its last, only read).
    take: Vec<Vec<bool>>,
    /// Per value: made by a step, so counted in `Stats::live_bytes` (inputs and constants are not).
    counted: Vec<bool>,
    /// Per step: how it is memoised (top-level programs only).
    memo_kind: Vec<Option<MemoKind>>,
    /// Per value: a constant (same every run, never compared).
    konst: Vec<bool>,
}

/// How a step's previous result is recognised as still valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MemoKind {
    /// Shape / Size: the input's shape (and dtype) alone.
    ShapeOf,
    /// A pure step on shape-derived values and constants: its non-constant inputs' bytes.
    Values,
}

/// Inputs of one memoised step as last seen (one entry per step input).
enum KeyPart {
    Absent,
    Const,
    Shape(kiln_runtime::DType, Vec<usize>),
    Data(kiln_runtime::DType, Vec<usize>, Vec<u8>),
}

/// Largest input a `Values` step is memoised for (shape-derived values are a few integers).
const MEMO_MAX_BYTES: usize = 1024;

/// Per-session memo of shape steps (see the module docs): per step, the inputs last seen and the
/// outputs they gave.
#[derive(Default)]
pub struct Memo {
    entries: Vec<Option<(Vec<KeyPart>, Vec<Value>)>>,
}

/// Ops whose result is not a function of their inputs alone.
fn impure(op: &str) -> bool {
    matches!(op, "RandomNormal" | "RandomNormalLike" | "RandomUniform" | "RandomUniformLike" | "Multinomial" | "Bernoulli")
}

impl Prepared {
    /// Which steps are memoised: see the module docs.
    fn memo_kinds(prog: &Program, kernels: &[Kernel], konst: &[bool]) -> Vec<Option<MemoKind>> {
        // Values that depend on the inputs' shapes alone (never on their data): memoising steps
        // on them can only help when shapes repeat, never because a benchmark repeats its data.
        let mut shape_derived = konst.to_vec();
        let mut kinds = Vec::with_capacity(prog.steps.len());
        for (s, k) in prog.steps.iter().zip(kernels) {
            let onnx = s.domain.is_empty() || s.domain == "ai.onnx";
            let has_sub = s.attrs.iter().any(|a| a.g.is_some() || !a.graphs.is_empty());
            let kind = if onnx && matches!(s.op.as_str(), "Shape" | "Size") && s.inputs.len() == 1 && s.inputs[0] >= 0 {
                Some(MemoKind::ShapeOf)
            } else if matches!(k, Kernel::Tensor(_))
                && !has_sub
                && !impure(&s.op)
                && s.inputs.iter().any(|&v| v >= 0 && !konst[v as usize])
                && s.inputs.iter().all(|&v| v < 0 || shape_derived[v as usize])
            {
                Some(MemoKind::Values)
            } else {
                None
            };
            if kind.is_some() {
                for &o in s.outputs.iter().filter(|&&o| o >= 0) {
                    shape_derived[o as usize] = true;
                }
            }
            kinds.push(kind);
        }
        kinds
    }

    /// The previous outputs of memoised step `i` if its inputs are unchanged.
    fn memo_hit(&self, memo: &Memo, i: usize, step: &Step, frame: &[Option<Value>]) -> Option<Vec<Value>> {
        let (key, outs) = memo.entries.get(i)?.as_ref()?;
        for (&v, part) in step.inputs.iter().zip(key) {
            let t = usize::try_from(v).ok().and_then(|v| frame[v].as_ref());
            let same = match (part, t) {
                (KeyPart::Absent, None) => true,
                (KeyPart::Const, Some(_)) => true,
                (KeyPart::Shape(d, sh), Some(Value::Tensor(t))) => t.dtype() == *d && t.shape() == &sh[..],
                (KeyPart::Data(d, sh, b), Some(Value::Tensor(t))) => {
                    t.dtype() == *d && t.shape() == &sh[..] && t.bytes() == &b[..]
                }
                _ => false,
            };
            if !same {
                return None;
            }
        }
        (key.len() == step.inputs.len()).then(|| outs.clone())
    }

    /// The key of step `i`'s current inputs, or None when they are too big to be worth it.
    fn memo_key(&self, kind: MemoKind, step: &Step, frame: &[Option<Value>]) -> Option<Vec<KeyPart>> {
        step.inputs
            .iter()
            .map(|&v| {
                if v < 0 {
                    return Some(KeyPart::Absent);
                }
                if self.konst[v as usize] {
                    return Some(KeyPart::Const);
                }
                match frame[v as usize].as_ref()? {
                    Value::Tensor(t) if kind == MemoKind::ShapeOf => Some(KeyPart::Shape(t.dtype(), t.shape().to_vec())),
                    Value::Tensor(t) if t.bytes().len() <= MEMO_MAX_BYTES => {
                        Some(KeyPart::Data(t.dtype(), t.shape().to_vec(), t.bytes().to_vec()))
                    }
                    _ => None,
                }
            })
            .collect()
    }
}

#[derive(Default)]
pub struct Stats {
    pub live_bytes: usize,
    pub peak_bytes: usize,
    /// When set, (calls, nanoseconds) per op type; steps inside subgraphs count on their own and
    /// in their control-flow op.
    pub profile: Option<std::collections::HashMap<String, (u64, u64)>>,
    /// The session's memo of shape steps, used by the top-level program (`outer` empty).
    pub memo: Option<Memo>,
}

fn profile_shapes() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("KILN_PROFILE").is_ok_and(|v| v == "shapes"))
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
        // Weights prepacked for other GEMM kernels than the running ones: relaid once, here.
        super::prepack::relayout_for_active(prog, &mut consts)?;
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
        let (owned, take) = owned_calls(prog, &free_after);
        let mut counted = vec![false; n];
        for &o in prog.steps.iter().flat_map(|s| &s.outputs).filter(|&&o| o >= 0) {
            counted[o as usize] = true;
        }
        let mut konst = vec![false; n];
        for (id, _) in &consts {
            konst[*id] = true;
        }
        let memo_kind = Self::memo_kinds(prog, &kernels, &konst);
        Ok(Prepared { prog: prog.clone(), consts, kernels, free_after, subs, owned, take, counted, memo_kind, konst })
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
        let mut taken = Vec::new();
        let mut memo = if outer.is_empty() { stats.memo.take() } else { None };
        if let Some(m) = memo.as_mut() {
            m.entries.resize_with(p.steps.len(), || None);
        }
        for (i, step) in p.steps.iter().enumerate() {
            taken.clear();
            // KILN_PROFILE=shapes splits the profile by input shapes (which layer is slow).
            let shapes = (stats.profile.is_some() && profile_shapes()).then(|| {
                let dims: Vec<String> = step
                    .inputs
                    .iter()
                    .map(|&v| match usize::try_from(v).ok().and_then(|v| frame[v].as_ref()) {
                        Some(Value::Tensor(t)) => format!("{:?}", t.shape()),
                        _ => "-".into(),
                    })
                    .collect();
                dims.join(" ")
            });
            let t0 = stats.profile.is_some().then(std::time::Instant::now);
            let memo_step = self.memo_kind[i].zip(memo.as_mut());
            let outs = match memo_step {
                Some((kind, m)) => match self.memo_hit(m, i, step, &frame) {
                    Some(outs) => outs,
                    None => {
                        let key = self.memo_key(kind, step, &frame);
                        let outs = self
                            .run_step(i, step, artifact, &mut frame, stats, &mut taken)
                            .map_err(|e| e.at_node(&step.op, &step.name))?;
                        m.entries[i] = key.map(|k| (k, outs.clone()));
                        outs
                    }
                },
                None => self
                    .run_step(i, step, artifact, &mut frame, stats, &mut taken)
                    .map_err(|e| e.at_node(&step.op, &step.name))?,
            };
            if let (Some(t0), Some(prof)) = (t0, stats.profile.as_mut()) {
                let mut key = if step.domain.is_empty() { step.op.clone() } else { format!("{}.{}", step.domain, step.op) };
                if let Some(sh) = &shapes {
                    key = format!("{key} {sh}");
                }
                let e = prof.entry(key).or_default();
                e.0 += 1;
                e.1 += t0.elapsed().as_nanos() as u64;
            }
            // While the kernel ran, its inputs and its new outputs were live; an output written
            // into a moved-in input's buffer adds nothing.
            let before = stats.live_bytes;
            let mut fresh = 0;
            for (k, &o) in step.outputs.iter().enumerate() {
                if o < 0 {
                    continue;
                }
                let v = outs.get(k).cloned().ok_or_else(|| Error::Kernel {
                    op: step.op.clone(),
                    node: step.name.clone(),
                    msg: format!("kernel produced {} outputs, step binds output {k}", outs.len()),
                })?;
                let b = value_bytes(&v);
                if !taken.iter().any(|&(ptr, _)| b > 0 && data_ptr(&v) == Some(ptr)) {
                    fresh += b;
                }
                stats.live_bytes += b;
                frame[o as usize] = Some(v);
            }
            stats.peak_bytes = stats.peak_bytes.max(before + fresh);
            let moved: usize = taken.iter().map(|&(_, b)| b).sum();
            stats.live_bytes = stats.live_bytes.saturating_sub(moved);
            for &v in &self.free_after[i] {
                if let Some(old) = frame[v].take() {
                    if self.counted[v] {
                        stats.live_bytes = stats.live_bytes.saturating_sub(value_bytes(&old));
                    }
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
        if memo.is_some() {
            stats.memo = memo;
        }
        Ok(out)
    }

    /// Run step `i`. Counted inputs moved out of the frame for an owned kernel are listed in
    /// `taken` as (data address, live bytes) for the caller's memory accounting.
    fn run_step(
        &self,
        i: usize,
        step: &Step,
        artifact: Option<&Artifact>,
        frame: &mut [Option<Value>],
        stats: &mut Stats,
        taken: &mut Vec<(usize, usize)>,
    ) -> Result<Vec<Value>> {
        if let Some(k) = self.owned[i] {
            let mut ts = Vec::with_capacity(step.inputs.len());
            for (n, (&v, &take)) in step.inputs.iter().zip(&self.take[i]).enumerate() {
                if v < 0 {
                    ts.push(None);
                    continue;
                }
                let slot = &mut frame[v as usize];
                let val = if take { slot.take() } else { slot.clone() }.ok_or_else(|| {
                    Error::Other(format!(
                        "input {n} ('{}') has no value",
                        self.prog.values[v as usize].name
                    ))
                })?;
                if take && self.counted[v as usize] {
                    if let Some(ptr) = data_ptr(&val) {
                        taken.push((ptr, value_bytes(&val)));
                    }
                }
                ts.push(Some(val.into_tensor()?));
            }
            let ctx = OpCtx::new(step, artifact);
            let outs = guarded(step, || k(&ctx, ts))?;
            return Ok(outs.into_iter().map(Value::Tensor).collect());
        }
        let frame: &[Option<Value>] = frame;
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

/// For each step with an owned-input kernel, which inputs to move out of the frame: those whose
/// last reader it is (so they are in `free_after`, which already excludes program outputs) and
/// that it reads only once (a value read twice must stay in the frame for the second read).
fn owned_calls(prog: &Program, free_after: &[Vec<usize>]) -> (Vec<Option<OwnedKernel>>, Vec<Vec<bool>>) {
    let mut owned = Vec::with_capacity(prog.steps.len());
    let mut take = Vec::with_capacity(prog.steps.len());
    for (i, s) in prog.steps.iter().enumerate() {
        let k = owned_kernel(&s.domain, &s.op);
        let t = s
            .inputs
            .iter()
            .map(|&v| {
                k.is_some()
                    && v >= 0
                    && free_after[i].contains(&(v as usize))
                    && s.inputs.iter().filter(|&&w| w == v).count() == 1
            })
            .collect();
        owned.push(k);
        take.push(t);
    }
    (owned, take)
}

/// Address of a tensor value's bytes (to recognise an output written into an input's buffer).
fn data_ptr(v: &Value) -> Option<usize> {
    match v {
        Value::Tensor(t) => t.buffer().map(|b| b.as_slice().as_ptr() as usize),
        _ => None,
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

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_runtime::manifest::ValueInfo;

    fn step(op: &str, inputs: &[i32], out: i32) -> Step {
        Step { op: op.into(), opset: 14, inputs: inputs.to_vec(), outputs: vec![out], ..Default::default() }
    }

    fn f32s(v: &Value) -> Vec<f32> {
        v.tensor().unwrap().view::<f32>().unwrap().to_vec()
    }

    #[test]
    fn dead_inputs_are_reused_and_live_ones_are_not() {
        // x(0) y(1) | a = Relu(x) | b = Add(x, a) | c = Mul(b, b) | d = Sigmoid(c) | e = Add(d, y)
        // Outputs c and e. x dies at b (moved), b is read twice by c (kept), c is an output
        // (kept), d and y die at e (y is still held by the caller, so it is not unique).
        let prog = Program {
            values: (0..7).map(|i| ValueInfo { name: format!("v{i}"), ..Default::default() }).collect(),
            inputs: vec![0, 1],
            outputs: vec![4, 6],
            steps: vec![
                step("Relu", &[0], 2),
                step("Add", &[0, 2], 3),
                step("Mul", &[3, 3], 4),
                step("Sigmoid", &[4], 5),
                step("Add", &[5, 1], 6),
            ],
            ..Default::default()
        };
        let p = Prepared::new(&prog, None).unwrap();
        assert_eq!(p.take[1], vec![true, true]);
        assert_eq!(p.take[2], vec![false, false]);
        assert_eq!(p.take[3], vec![false]);
        assert_eq!(p.take[4], vec![true, true]);
        let xs = vec![-1.0f32, 0.5, 2.0, -3.0];
        let ys = vec![10.0f32, 20.0, 30.0, 40.0];
        let y = Tensor::from_vec(&[4], ys.clone()).unwrap();
        let inputs = vec![Value::Tensor(Tensor::from_vec(&[4], xs.clone()).unwrap()), Value::Tensor(y.clone())];
        let mut stats = Stats::default();
        let out = p.run(None, inputs, &[], &mut stats).unwrap();
        let c: Vec<f32> = xs.iter().map(|&x| (x + x.max(0.0)) * (x + x.max(0.0))).collect();
        assert_eq!(f32s(&out[0]), c);
        let e = f32s(&out[1]);
        for i in 0..4 {
            let want = 1.0 / (1.0 + (-(c[i] as f64)).exp()) + ys[i] as f64;
            assert!((e[i] as f64 - want).abs() < 1e-5, "{} vs {want}", e[i]);
        }
        assert_eq!(y.view::<f32>().unwrap(), &ys[..], "the caller's tensor is untouched");
        // Intermediates (16 bytes each; inputs are not counted): a; b written over the input x
        // (a new intermediate, no new memory, counted); a dies; c; b dies; d (c is an output, so
        // not reused); e written over d. Never more than two at once.
        assert_eq!(stats.peak_bytes, 32);
    }

    /// Shape steps are memoised per session and recomputed when the input shape changes.
    #[test]
    fn shape_steps_follow_the_input_shape_across_runs() {
        // x(0) | s = Shape(x) | d = Add(s, s) | y = Relu(x): d is shape-derived, y is data.
        let prog = Program {
            values: (0..4).map(|i| ValueInfo { name: format!("v{i}"), ..Default::default() }).collect(),
            inputs: vec![0],
            outputs: vec![2, 3],
            steps: vec![step("Shape", &[0], 1), step("Add", &[1, 1], 2), step("Relu", &[0], 3)],
            ..Default::default()
        };
        let p = Prepared::new(&prog, None).unwrap();
        assert_eq!(p.memo_kind, vec![Some(MemoKind::ShapeOf), Some(MemoKind::Values), None]);
        let mut stats = Stats { memo: Some(Memo::default()), ..Default::default() };
        for (shape, want) in [(vec![2usize, 3], vec![4i64, 6]), (vec![2, 3], vec![4, 6]), (vec![5], vec![10]), (vec![2, 3], vec![4, 6])] {
            let n: usize = shape.iter().product();
            let x = Tensor::from_vec(&shape, vec![-1.0f32; n]).unwrap();
            let out = p.run(None, vec![Value::Tensor(x)], &[], &mut stats).unwrap();
            assert_eq!(out[0].tensor().unwrap().view::<i64>().unwrap(), &want[..]);
            assert_eq!(out[1].tensor().unwrap().shape(), &shape[..]);
            assert!(stats.memo.as_ref().is_some_and(|m| m.entries[1].is_some()), "the memo stays with the session");
        }
    }
}
