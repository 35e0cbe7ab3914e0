//! If, Loop, Scan and SequenceMap: run subgraph programs with the enclosing frame visible for
//! captures.

use kiln_runtime::{Artifact, DType, Error, Result, Tensor, Value};

use super::ctx::OpCtx;
use super::interp::{Prepared, Stats};
use super::util::norm_axis;

fn sub<'a>(subs: &'a [(String, Prepared)], name: &str) -> Result<&'a Prepared> {
    subs.iter()
        .find(|(n, _)| n == name)
        .map(|(_, p)| p)
        .ok_or_else(|| Error::InvalidArtifact(format!("missing subgraph attribute '{name}'")))
}

pub fn run(
    ctx: &OpCtx,
    subs: &[(String, Prepared)],
    artifact: Option<&Artifact>,
    inputs: Vec<Option<Value>>,
    frame: &[Option<Value>],
    stats: &mut Stats,
) -> Result<Vec<Value>> {
    match ctx.op() {
        "If" => {
            let cond = inputs.first().cloned().flatten().ok_or_else(|| Error::Other("If needs cond".into()))?;
            let branch = sub(subs, if scalar_bool(&cond)? { "then_branch" } else { "else_branch" })?;
            branch.run(artifact, vec![], frame, stats)
        }
        "Loop" => run_loop(ctx, subs, artifact, inputs, frame, stats),
        "Scan" if ctx.opset() < 9 => run_scan8(ctx, subs, artifact, inputs, frame, stats),
        "Scan" => run_scan(ctx, subs, artifact, inputs, frame, stats),
        "SequenceMap" => run_sequence_map(subs, artifact, inputs, frame, stats),
        op => Err(ctx.unsupported(format!("{op} is not a control-flow op"))),
    }
}

fn scalar_bool(v: &Value) -> Result<bool> {
    let t = v.tensor()?;
    match t.dtype() {
        DType::Bool => t.view::<bool>()?.first().copied(),
        _ => t.to_i64_vec()?.first().map(|&x| x != 0),
    }
    .ok_or_else(|| Error::Shape("condition is empty".into()))
}

fn run_loop(
    _ctx: &OpCtx,
    subs: &[(String, Prepared)],
    artifact: Option<&Artifact>,
    inputs: Vec<Option<Value>>,
    frame: &[Option<Value>],
    stats: &mut Stats,
) -> Result<Vec<Value>> {
    let body = sub(subs, "body")?;
    let max_trips = match inputs.first().cloned().flatten() {
        Some(v) => Some(v.tensor()?.to_i64_vec()?.first().copied().unwrap_or(0)),
        None => None,
    };
    let mut cond = match inputs.get(1).cloned().flatten() {
        Some(v) => scalar_bool(&v)?,
        None => true,
    };
    let mut carried: Vec<Value> = inputs[2.min(inputs.len())..]
        .iter()
        .map(|v| v.clone().ok_or_else(|| Error::Other("Loop carried value missing".into())))
        .collect::<Result<_>>()?;
    let n_carried = carried.len();
    let n_body_out = body.prog.outputs.len();
    if n_body_out < 1 + n_carried {
        return Err(Error::InvalidArtifact("Loop body has too few outputs".into()));
    }
    let n_scan = n_body_out - 1 - n_carried;
    let mut scans: Vec<Vec<Tensor>> = vec![Vec::new(); n_scan];
    let mut i: i64 = 0;
    while cond && max_trips.is_none_or(|m| i < m) {
        let mut body_in = vec![Value::Tensor(Tensor::scalar(i)), Value::Tensor(Tensor::scalar(cond))];
        body_in.extend(carried.iter().cloned());
        // Bodies may declare fewer inputs only if malformed; check to avoid a confusing error.
        if body.prog.inputs.len() != body_in.len() {
            return Err(Error::InvalidArtifact(format!(
                "Loop body takes {} inputs, expected {}",
                body.prog.inputs.len(),
                body_in.len()
            )));
        }
        let outs = body.run(artifact, body_in, frame, stats)?;
        cond = scalar_bool(&outs[0])?;
        carried = outs[1..1 + n_carried].to_vec();
        for (k, v) in outs[1 + n_carried..].iter().enumerate() {
            scans[k].push(v.tensor()?.clone());
        }
        i += 1;
        if max_trips.is_none() && i > (1 << 40) {
            return Err(Error::Other("Loop ran 2^40 iterations without stopping".into()));
        }
    }
    let mut out = carried;
    for (k, s) in scans.into_iter().enumerate() {
        let vi = &body.prog.values[body.prog.outputs[1 + n_carried + k] as usize];
        let dt = DType::from_onnx(vi.dtype).unwrap_or(DType::F32);
        out.push(Value::Tensor(stack(&s, 0, dt)?));
    }
    Ok(out)
}

fn run_scan(
    ctx: &OpCtx,
    subs: &[(String, Prepared)],
    artifact: Option<&Artifact>,
    inputs: Vec<Option<Value>>,
    frame: &[Option<Value>],
    stats: &mut Stats,
) -> Result<Vec<Value>> {
    let body = sub(subs, "body")?;
    let m = ctx.attr_i("num_scan_inputs", 0) as usize;
    let inputs: Vec<Tensor> = inputs
        .into_iter()
        .map(|v| v.ok_or_else(|| Error::Other("Scan input missing".into()))?.into_tensor())
        .collect::<Result<_>>()?;
    if m > inputs.len() {
        return Err(Error::Other("num_scan_inputs exceeds the inputs".into()));
    }
    let n = inputs.len() - m;
    let in_axes = ctx.attr_ints("scan_input_axes").unwrap_or_else(|| vec![0; m]);
    let in_dirs = ctx.attr_ints("scan_input_directions").unwrap_or_else(|| vec![0; m]);
    let mut state: Vec<Value> = inputs[..n].iter().cloned().map(Value::Tensor).collect();
    let scan_in = &inputs[n..];
    let mut axes = Vec::new();
    let mut len = None;
    for (j, t) in scan_in.iter().enumerate() {
        let a = norm_axis(*in_axes.get(j).unwrap_or(&0), t.rank())?;
        let l = t.shape()[a];
        if len.is_some_and(|x| x != l) {
            return Err(Error::Shape("Scan inputs differ in sequence length".into()));
        }
        len = Some(l);
        axes.push(a);
    }
    let len = len.unwrap_or(0);
    let k = body.prog.outputs.len() - n;
    let out_axes = ctx.attr_ints("scan_output_axes").unwrap_or_else(|| vec![0; k]);
    let out_dirs = ctx.attr_ints("scan_output_directions").unwrap_or_else(|| vec![0; k]);
    let mut scans: Vec<Vec<Tensor>> = vec![Vec::new(); k];
    for it in 0..len {
        let mut body_in = state.clone();
        for (j, t) in scan_in.iter().enumerate() {
            let idx = if in_dirs.get(j).copied().unwrap_or(0) == 1 { len - 1 - it } else { it };
            body_in.push(Value::Tensor(take(t, axes[j], idx)?));
        }
        let outs = body.run(artifact, body_in, frame, stats)?;
        state = outs[..n].to_vec();
        for (j, v) in outs[n..].iter().enumerate() {
            scans[j].push(v.tensor()?.clone());
        }
    }
    let mut out = state;
    for (j, mut s) in scans.into_iter().enumerate() {
        if out_dirs.get(j).copied().unwrap_or(0) == 1 {
            s.reverse();
        }
        let vi = &body.prog.values[body.prog.outputs[n + j] as usize];
        let dt = DType::from_onnx(vi.dtype).unwrap_or(DType::F32);
        let stacked = stack(&s, 0, dt)?;
        let r = stacked.rank();
        let a = norm_axis(*out_axes.get(j).unwrap_or(&0), r)?;
        out.push(Value::Tensor(if a == 0 { stacked } else { move_axis0(&stacked, a)? }));
    }
    Ok(out)
}

/// Scan-8: a leading batch axis on states and scan inputs (the sequence axis is 1), an optional
/// first input `sequence_lens`, and only per-input directions. Each batch row is scanned on its
/// own; scan outputs past a row's length stay zero.
fn run_scan8(
    ctx: &OpCtx,
    subs: &[(String, Prepared)],
    artifact: Option<&Artifact>,
    mut inputs: Vec<Option<Value>>,
    frame: &[Option<Value>],
    stats: &mut Stats,
) -> Result<Vec<Value>> {
    let body = sub(subs, "body")?;
    if inputs.is_empty() {
        return Err(Error::Other("Scan needs inputs".into()));
    }
    let seq_lens = inputs.remove(0).map(|v| v.into_tensor()?.to_i64_vec()).transpose()?;
    let inputs: Vec<Tensor> = inputs
        .into_iter()
        .map(|v| v.ok_or_else(|| Error::Other("Scan input missing".into()))?.into_tensor())
        .collect::<Result<_>>()?;
    let m = ctx.attr_i("num_scan_inputs", 0) as usize;
    if m > inputs.len() || m == 0 {
        return Err(Error::Other("num_scan_inputs must be between 1 and the number of inputs".into()));
    }
    let n = inputs.len() - m;
    let dirs = ctx.attr_ints("directions").unwrap_or_else(|| vec![0; m]);
    let scan_in = &inputs[n..];
    if scan_in.iter().any(|t| t.rank() < 2) || inputs.iter().any(|t| t.rank() == 0) {
        return Err(Error::Shape("Scan-8 inputs need a batch axis (and scan inputs a sequence axis)".into()));
    }
    let batch = scan_in[0].shape()[0];
    let max_len = scan_in[0].shape()[1];
    if inputs.iter().any(|t| t.shape()[0] != batch) || scan_in.iter().any(|t| t.shape()[1] != max_len) {
        return Err(Error::Shape("Scan inputs differ in batch size or sequence length".into()));
    }
    let k = body.prog.outputs.len().checked_sub(n).ok_or_else(|| Error::InvalidArtifact("Scan body has too few outputs".into()))?;
    let mut states_out: Vec<Vec<Tensor>> = vec![Vec::new(); n];
    let mut scans_out: Vec<Vec<Tensor>> = vec![Vec::new(); k];
    for b in 0..batch {
        let len = match &seq_lens {
            Some(l) => {
                let v = *l.get(b).ok_or_else(|| Error::Shape("sequence_lens is shorter than the batch".into()))?;
                usize::try_from(v).ok().filter(|&v| v <= max_len).ok_or_else(|| Error::Shape(format!("sequence length {v} out of range")))?
            }
            None => max_len,
        };
        let mut state: Vec<Value> = inputs[..n].iter().map(|t| take(t, 0, b).map(Value::Tensor)).collect::<Result<_>>()?;
        let rows: Vec<Tensor> = scan_in.iter().map(|t| take(t, 0, b)).collect::<Result<_>>()?;
        let mut scans: Vec<Vec<Tensor>> = vec![Vec::new(); k];
        for it in 0..len {
            let mut body_in = state.clone();
            for (j, t) in rows.iter().enumerate() {
                let idx = if dirs.get(j).copied().unwrap_or(0) == 1 { len - 1 - it } else { it };
                body_in.push(Value::Tensor(take(t, 0, idx)?));
            }
            let outs = body.run(artifact, body_in, frame, stats)?;
            state = outs[..n].to_vec();
            for (j, v) in outs[n..].iter().enumerate() {
                scans[j].push(v.tensor()?.clone());
            }
        }
        for (j, v) in state.into_iter().enumerate() {
            states_out[j].push(v.into_tensor()?);
        }
        for (j, mut s) in scans.into_iter().enumerate() {
            if let Some(first) = s.first().cloned() {
                s.resize(max_len, Tensor::zeros(first.dtype(), first.shape()));
            }
            let vi = &body.prog.values[body.prog.outputs[n + j] as usize];
            scans_out[j].push(stack(&s, 0, DType::from_onnx(vi.dtype).unwrap_or(DType::F32))?);
        }
    }
    let mut out = Vec::with_capacity(n + k);
    for (j, s) in states_out.iter().chain(&scans_out).enumerate() {
        let vi = &body.prog.values[body.prog.outputs[j] as usize];
        out.push(Value::Tensor(stack(s, 0, DType::from_onnx(vi.dtype).unwrap_or(DType::F32))?));
    }
    Ok(out)
}

/// SequenceMap: run the body once per position of the input sequences (tensor inputs are passed
/// whole each time) and collect each body output into a sequence.
fn run_sequence_map(
    subs: &[(String, Prepared)],
    artifact: Option<&Artifact>,
    inputs: Vec<Option<Value>>,
    frame: &[Option<Value>],
    stats: &mut Stats,
) -> Result<Vec<Value>> {
    let body = sub(subs, "body")?;
    let inputs: Vec<Value> = inputs
        .into_iter()
        .map(|v| v.ok_or_else(|| Error::Other("SequenceMap input missing".into())))
        .collect::<Result<_>>()?;
    let len = match inputs.first() {
        Some(Value::Sequence(_, items)) => items.len(),
        _ => return Err(Error::DType("SequenceMap's first input must be a sequence".into())),
    };
    if inputs.iter().any(|v| matches!(v, Value::Sequence(_, s) if s.len() != len)) {
        return Err(Error::Shape("SequenceMap's input sequences differ in length".into()));
    }
    let n_out = body.prog.outputs.len();
    let mut collected: Vec<Vec<Tensor>> = vec![Vec::with_capacity(len); n_out];
    for i in 0..len {
        let body_in = inputs
            .iter()
            .map(|v| match v {
                Value::Sequence(_, items) => Value::Tensor(items[i].clone()),
                other => other.clone(),
            })
            .collect();
        for (j, v) in body.run(artifact, body_in, frame, stats)?.into_iter().enumerate() {
            collected[j].push(v.into_tensor()?);
        }
    }
    Ok(collected
        .into_iter()
        .enumerate()
        .map(|(j, items)| {
            let vi = &body.prog.values[body.prog.outputs[j] as usize];
            let dt = items.first().map(|t| t.dtype()).or(DType::from_onnx(vi.dtype)).unwrap_or(DType::F32);
            Value::Sequence(dt, items)
        })
        .collect())
}

/// Element size in bytes for byte-wise copies (strings are handled by index).
fn esize(t: &Tensor) -> usize {
    t.dtype().size()
}

/// Slice index `idx` of `axis`, dropping that axis.
fn take(t: &Tensor, axis: usize, idx: usize) -> Result<Tensor> {
    let shape = t.shape();
    let outer: usize = shape[..axis].iter().product();
    let inner: usize = shape[axis + 1..].iter().product();
    let n = shape[axis];
    let mut out_shape = shape.to_vec();
    out_shape.remove(axis);
    if t.dtype() == DType::String {
        let s = t.strings()?;
        let v = (0..outer)
            .flat_map(|o| s[(o * n + idx) * inner..(o * n + idx + 1) * inner].iter().cloned())
            .collect();
        return Tensor::from_strings(&out_shape, v);
    }
    let es = esize(t);
    let b = t.bytes();
    let mut out = Vec::with_capacity(outer * inner * es);
    for o in 0..outer {
        let start = (o * n + idx) * inner * es;
        out.extend_from_slice(&b[start..start + inner * es]);
    }
    Tensor::from_bytes(t.dtype(), &out_shape, &out)
}

/// Stack equally-shaped tensors along a new axis 0.
fn stack(ts: &[Tensor], _axis: usize, dtype: DType) -> Result<Tensor> {
    let Some(first) = ts.first() else {
        return Ok(Tensor::zeros(dtype, &[0]));
    };
    let mut shape = vec![ts.len()];
    shape.extend_from_slice(first.shape());
    if ts.iter().any(|t| t.shape() != first.shape() || t.dtype() != first.dtype()) {
        return Err(Error::Shape("scan outputs differ in shape between iterations".into()));
    }
    if first.dtype() == DType::String {
        let mut v = Vec::new();
        for t in ts {
            v.extend(t.strings()?.iter().cloned());
        }
        return Tensor::from_strings(&shape, v);
    }
    let mut out = Vec::with_capacity(ts.len() * first.bytes().len());
    for t in ts {
        out.extend_from_slice(t.bytes());
    }
    Tensor::from_bytes(first.dtype(), &shape, &out)
}

/// Move axis 0 to position `a` (the other axes keep their order).
fn move_axis0(t: &Tensor, a: usize) -> Result<Tensor> {
    let shape = t.shape();
    let n0 = shape[0];
    let mid: usize = shape[1..=a].iter().product();
    let inner: usize = shape[a + 1..].iter().product();
    let mut out_shape: Vec<usize> = shape[1..=a].to_vec();
    out_shape.push(n0);
    out_shape.extend_from_slice(&shape[a + 1..]);
    let es = esize(t);
    let b = t.bytes();
    let mut out = vec![0u8; b.len()];
    for i in 0..n0 {
        for m in 0..mid {
            let src = (i * mid + m) * inner * es;
            let dst = (m * n0 + i) * inner * es;
            out[dst..dst + inner * es].copy_from_slice(&b[src..src + inner * es]);
        }
    }
    if t.dtype() == DType::String {
        return Err(Error::DType("string scan outputs on a non-zero axis are not supported".into()));
    }
    Tensor::from_bytes(t.dtype(), &out_shape, &out)
}
