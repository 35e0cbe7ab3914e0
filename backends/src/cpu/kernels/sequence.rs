//! Sequence and optional ops (value kernels): SequenceConstruct, SequenceEmpty, SequenceAt,
//! SequenceInsert, SequenceErase, SequenceLength, SplitToSequence, ConcatFromSequence, Optional,
//! OptionalHasElement, OptionalGetElement.

use kiln_runtime::{DType, Error, Result, Tensor, Value};

use crate::cpu::ctx::OpCtx;
use crate::cpu::registry::Registry;
use crate::cpu::util::norm_axis;

pub fn register(r: &mut Registry) {
    r.add_value("SequenceConstruct", sequence_construct);
    r.add_value("SequenceEmpty", sequence_empty);
    r.add_value("SequenceAt", sequence_at);
    r.add_value("SequenceInsert", sequence_insert);
    r.add_value("SequenceErase", sequence_erase);
    r.add_value("SequenceLength", sequence_length);
    r.add_value("SplitToSequence", split_to_sequence);
    r.add_value("ConcatFromSequence", concat_from_sequence);
    r.add_value("Optional", optional);
    r.add_value("OptionalHasElement", optional_has_element);
    r.add_value("OptionalGetElement", optional_get_element);
}

fn value(inputs: &[Option<Value>], i: usize) -> Result<&Value> {
    inputs.get(i).and_then(|v| v.as_ref()).ok_or_else(|| Error::Other(format!("required input {i} is missing")))
}

fn tensor_in(inputs: &[Option<Value>], i: usize) -> Result<&Tensor> {
    value(inputs, i)?.tensor()
}

fn sequence_in(inputs: &[Option<Value>], i: usize) -> Result<(DType, &Vec<Tensor>)> {
    match value(inputs, i)? {
        Value::Sequence(d, v) => Ok((*d, v)),
        other => Err(Error::DType(format!("expected a sequence, got {}", other.kind_name()))),
    }
}

/// A position input (scalar int32/int64), or None if omitted.
fn position(inputs: &[Option<Value>], i: usize) -> Result<Option<i64>> {
    match inputs.get(i).and_then(|v| v.as_ref()) {
        Some(v) => {
            let t = v.tensor()?;
            if t.len() != 1 {
                return Err(Error::Shape(format!("position must be a scalar, got shape {:?}", t.shape())));
            }
            Ok(Some(t.to_i64_vec()?[0]))
        }
        None => Ok(None),
    }
}

/// Resolve `pos` in [-len, len) (or [-len, len] if `end_ok`) to an index.
fn resolve(pos: i64, len: usize, end_ok: bool) -> Result<usize> {
    let n = len as i64;
    let p = if pos < 0 { pos + n } else { pos };
    let hi = if end_ok { n } else { n - 1 };
    if p < 0 || p > hi {
        return Err(Error::Shape(format!("position {pos} is out of range for a sequence of {len}")));
    }
    Ok(p as usize)
}

fn check_dtype(seq_dt: DType, t: &Tensor) -> Result<()> {
    if t.dtype() != seq_dt {
        return Err(Error::DType(format!("a sequence of {seq_dt} cannot hold a {} tensor", t.dtype())));
    }
    Ok(())
}

fn sequence_construct(_ctx: &OpCtx, inputs: &[Option<Value>]) -> Result<Vec<Value>> {
    let ts = (0..inputs.len()).map(|i| tensor_in(inputs, i).cloned()).collect::<Result<Vec<_>>>()?;
    let dt = ts.first().map(|t| t.dtype()).ok_or_else(|| Error::Other("SequenceConstruct needs an input".into()))?;
    for t in &ts {
        check_dtype(dt, t)?;
    }
    Ok(vec![Value::Sequence(dt, ts)])
}

fn sequence_empty(ctx: &OpCtx, _inputs: &[Option<Value>]) -> Result<Vec<Value>> {
    let code = ctx.attr_i("dtype", DType::F32 as i64);
    let dt = DType::from_onnx(code as i32).ok_or_else(|| ctx.unsupported(format!("dtype {code}")))?;
    Ok(vec![Value::Sequence(dt, Vec::new())])
}

fn sequence_at(_ctx: &OpCtx, inputs: &[Option<Value>]) -> Result<Vec<Value>> {
    let (_, seq) = sequence_in(inputs, 0)?;
    let p = position(inputs, 1)?.ok_or_else(|| Error::Other("SequenceAt needs a position".into()))?;
    Ok(vec![Value::Tensor(seq[resolve(p, seq.len(), false)?].clone())])
}

fn sequence_insert(_ctx: &OpCtx, inputs: &[Option<Value>]) -> Result<Vec<Value>> {
    let (dt, seq) = sequence_in(inputs, 0)?;
    let t = tensor_in(inputs, 1)?;
    // An empty sequence of unknown element type takes the first tensor's.
    let dt = if seq.is_empty() { t.dtype() } else { dt };
    check_dtype(dt, t)?;
    let at = match position(inputs, 2)? {
        Some(p) => resolve(p, seq.len(), true)?,
        None => seq.len(),
    };
    let mut v = seq.clone();
    v.insert(at, t.clone());
    Ok(vec![Value::Sequence(dt, v)])
}

fn sequence_erase(_ctx: &OpCtx, inputs: &[Option<Value>]) -> Result<Vec<Value>> {
    let (dt, seq) = sequence_in(inputs, 0)?;
    if seq.is_empty() {
        return Err(Error::Shape("cannot erase from an empty sequence".into()));
    }
    let at = match position(inputs, 1)? {
        Some(p) => resolve(p, seq.len(), false)?,
        None => seq.len() - 1,
    };
    let mut v = seq.clone();
    v.remove(at);
    Ok(vec![Value::Sequence(dt, v)])
}

fn sequence_length(_ctx: &OpCtx, inputs: &[Option<Value>]) -> Result<Vec<Value>> {
    let (_, seq) = sequence_in(inputs, 0)?;
    Ok(vec![Value::Tensor(Tensor::scalar(seq.len() as i64))])
}

/// Elements [start, start+len) along `axis` of `t` (shape is the caller's business).
fn slice_axis(t: &Tensor, axis: usize, start: usize, len: usize, out_shape: &[usize]) -> Result<Tensor> {
    let s = t.shape();
    let outer: usize = s[..axis].iter().product();
    let n = s[axis];
    let inner: usize = s[axis + 1..].iter().product();
    if t.dtype() == DType::String {
        let src = t.strings()?;
        let mut v = Vec::with_capacity(outer * len * inner);
        for o in 0..outer {
            v.extend_from_slice(&src[(o * n + start) * inner..(o * n + start + len) * inner]);
        }
        return Tensor::from_strings(out_shape, v);
    }
    let es = t.dtype().size();
    let src = t.bytes();
    let mut v = Vec::with_capacity(outer * len * inner * es);
    for o in 0..outer {
        v.extend_from_slice(&src[(o * n + start) * inner * es..(o * n + start + len) * inner * es]);
    }
    Tensor::from_bytes(t.dtype(), out_shape, &v)
}

fn split_to_sequence(ctx: &OpCtx, inputs: &[Option<Value>]) -> Result<Vec<Value>> {
    let x = tensor_in(inputs, 0)?;
    let rank = x.rank();
    let axis = norm_axis(ctx.attr_i("axis", 0), rank)?;
    if rank == 0 {
        return Err(Error::Shape("SplitToSequence needs an input of rank >= 1".into()));
    }
    let n = x.shape()[axis];
    let split = match inputs.get(1).and_then(|v| v.as_ref()) {
        Some(v) => Some(v.tensor()?),
        None => None,
    };
    let (sizes, squeeze): (Vec<usize>, bool) = match split {
        None => (vec![1; n], ctx.attr_i("keepdims", 1) == 0),
        Some(s) if s.rank() == 0 => {
            let c = s.to_i64_vec()?[0];
            if c <= 0 {
                return Err(Error::Shape(format!("split size {c} must be positive")));
            }
            let c = c as usize;
            let mut v = vec![c; n / c];
            if n % c != 0 {
                v.push(n % c);
            }
            (v, false)
        }
        Some(s) => {
            let v = s.to_i64_vec()?;
            if v.iter().any(|&l| l < 0) || v.iter().sum::<i64>() != n as i64 {
                return Err(Error::Shape(format!("split {v:?} does not add up to {n}")));
            }
            (v.into_iter().map(|l| l as usize).collect(), false)
        }
    };
    let mut out = Vec::with_capacity(sizes.len());
    let mut start = 0;
    for len in sizes {
        let mut shape = x.shape().to_vec();
        if squeeze {
            shape.remove(axis);
        } else {
            shape[axis] = len;
        }
        out.push(slice_axis(x, axis, start, len, &shape)?);
        start += len;
    }
    Ok(vec![Value::Sequence(x.dtype(), out)])
}

fn concat_from_sequence(ctx: &OpCtx, inputs: &[Option<Value>]) -> Result<Vec<Value>> {
    let (dt, seq) = sequence_in(inputs, 0)?;
    let new_axis = ctx.attr_i("new_axis", 0) != 0;
    let axis = ctx.attr_i_opt("axis").ok_or_else(|| Error::Other("ConcatFromSequence needs axis".into()))?;
    let first = seq.first().ok_or_else(|| Error::Shape("cannot concatenate an empty sequence".into()))?;
    let rank = first.rank();
    // With new_axis the pieces are stacked: view each as having a size-1 dim at `axis`.
    let axis = norm_axis(axis, if new_axis { rank + 1 } else { rank })?;
    let pieces: Vec<Tensor> = seq
        .iter()
        .map(|t| {
            check_dtype(dt, t)?;
            if new_axis {
                let mut s = t.shape().to_vec();
                s.insert(axis, 1);
                t.reshape(&s)
            } else {
                Ok(t.clone())
            }
        })
        .collect::<Result<_>>()?;
    let base = pieces[0].shape().to_vec();
    let mut total = 0;
    for p in &pieces {
        let s = p.shape();
        if s.len() != base.len() || s.iter().zip(&base).enumerate().any(|(i, (a, b))| i != axis && a != b) {
            return Err(Error::Shape(format!("cannot concatenate {:?} with {:?} along axis {axis}", base, s)));
        }
        total += s[axis];
    }
    let mut shape = base.clone();
    shape[axis] = total;
    let outer: usize = shape[..axis].iter().product();
    let inner: usize = shape[axis + 1..].iter().product();
    let out = if dt == DType::String {
        let mut v = Vec::with_capacity(outer * total * inner);
        for o in 0..outer {
            for p in &pieces {
                let l = p.shape()[axis] * inner;
                v.extend_from_slice(&p.strings()?[o * l..(o + 1) * l]);
            }
        }
        Tensor::from_strings(&shape, v)?
    } else {
        let es = dt.size();
        let mut v = Vec::with_capacity(outer * total * inner * es);
        for o in 0..outer {
            for p in &pieces {
                let l = p.shape()[axis] * inner * es;
                v.extend_from_slice(&p.bytes()[o * l..(o + 1) * l]);
            }
        }
        Tensor::from_bytes(dt, &shape, &v)?
    };
    Ok(vec![Value::Tensor(out)])
}

fn optional(_ctx: &OpCtx, inputs: &[Option<Value>]) -> Result<Vec<Value>> {
    let v = inputs.first().cloned().flatten();
    Ok(vec![Value::Optional(v.map(Box::new))])
}

fn optional_has_element(_ctx: &OpCtx, inputs: &[Option<Value>]) -> Result<Vec<Value>> {
    let has = match inputs.first().and_then(|v| v.as_ref()) {
        None | Some(Value::Optional(None)) => false,
        Some(_) => true,
    };
    Ok(vec![Value::Tensor(Tensor::scalar(has))])
}

fn optional_get_element(_ctx: &OpCtx, inputs: &[Option<Value>]) -> Result<Vec<Value>> {
    match value(inputs, 0)? {
        Value::Optional(Some(v)) => Ok(vec![(**v).clone()]),
        Value::Optional(None) => Err(Error::Other("OptionalGetElement on an empty optional".into())),
        v => Ok(vec![v.clone()]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_runtime::manifest::{Attr, Step};

    fn run(op: &str, attrs: Vec<Attr>, inputs: Vec<Option<Value>>) -> Result<Value> {
        let s = Step { op: op.into(), opset: 17, attrs, ..Default::default() };
        let k = match crate::cpu::registry().get("", op) {
            Some(crate::cpu::Kernel::Value(k)) => k,
            _ => panic!("no kernel"),
        };
        Ok(k(&OpCtx::new(&s, None), &inputs)?.remove(0))
    }

    fn int(name: &str, i: i64) -> Attr {
        Attr { name: name.into(), i, ..Default::default() }
    }

    fn tv(shape: &[usize], v: &[f32]) -> Option<Value> {
        Some(Value::Tensor(Tensor::from_vec(shape, v.to_vec()).unwrap()))
    }

    fn pos(p: i64) -> Option<Value> {
        Some(Value::Tensor(Tensor::scalar(p)))
    }

    #[test]
    fn construct_at_erase_length() {
        let seq = run("SequenceConstruct", vec![], vec![tv(&[1], &[1.]), tv(&[2], &[2., 3.]), tv(&[1], &[4.])]).unwrap();
        let at = run("SequenceAt", vec![], vec![Some(seq.clone()), pos(-2)]).unwrap();
        assert_eq!(at.tensor().unwrap().view::<f32>().unwrap(), &[2., 3.]);
        let erased = run("SequenceErase", vec![], vec![Some(seq.clone()), pos(0)]).unwrap();
        let len = run("SequenceLength", vec![], vec![Some(erased.clone())]).unwrap();
        assert_eq!(len.tensor().unwrap().item::<i64>().unwrap(), 2);
        assert!(run("SequenceAt", vec![], vec![Some(erased), pos(2)]).is_err());
    }

    #[test]
    fn split_and_concat_round_trip() {
        let x = tv(&[2, 3], &[1., 2., 3., 4., 5., 6.]);
        let seq = run("SplitToSequence", vec![int("axis", 1), int("keepdims", 0)], vec![x.clone()]).unwrap();
        match &seq {
            Value::Sequence(_, v) => {
                assert_eq!(v.len(), 3);
                assert_eq!(v[1].shape(), &[2]);
                assert_eq!(v[1].view::<f32>().unwrap(), &[2., 5.]);
            }
            _ => panic!("not a sequence"),
        }
        let y = run("ConcatFromSequence", vec![int("axis", 1), int("new_axis", 1)], vec![Some(seq)]).unwrap();
        let y = y.tensor().unwrap();
        assert_eq!(y.shape(), &[2, 3]);
        assert_eq!(y.view::<f32>().unwrap(), &[1., 2., 3., 4., 5., 6.]);
        // Uneven chunks of 2 along axis 1: [2, 2] and [2, 1].
        let split = Some(Value::Tensor(Tensor::scalar(2i64)));
        let seq = run("SplitToSequence", vec![int("axis", 1)], vec![x, split]).unwrap();
        let y = run("ConcatFromSequence", vec![int("axis", 0)], vec![Some(seq)]);
        assert!(y.is_err(), "pieces of different widths cannot stack along axis 0");
    }

    #[test]
    fn optionals() {
        let none = run("Optional", vec![], vec![None]).unwrap();
        let has = run("OptionalHasElement", vec![], vec![Some(none.clone())]).unwrap();
        assert!(!has.tensor().unwrap().item::<bool>().unwrap());
        let some = run("Optional", vec![], vec![tv(&[1], &[7.])]).unwrap();
        let got = run("OptionalGetElement", vec![], vec![Some(some)]).unwrap();
        assert_eq!(got.tensor().unwrap().view::<f32>().unwrap(), &[7.]);
        assert!(run("OptionalGetElement", vec![], vec![Some(none)]).is_err());
    }
}
