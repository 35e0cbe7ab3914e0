//! Types of sequence and optional ops (and Identity over them), which are not plain tensors.

use kiln_runtime::DType;

use super::dims::norm_axis;
use super::{join, Cx};
use crate::ir::{AttrValue, Dim, Type};

fn elem(t: Option<&Type>) -> Type {
    match t {
        Some(Type::Sequence(e)) | Some(Type::Optional(e)) => (**e).clone(),
        _ => Type::Unknown,
    }
}

fn seq_of(t: Type) -> Type {
    Type::Sequence(Box::new(t))
}

pub(crate) fn infer(cx: &Cx) -> Option<Vec<Type>> {
    let t = match cx.op() {
        "SequenceEmpty" => seq_of(Type::Tensor {
            dtype: Some(cx.attr_dtype("dtype").unwrap_or(DType::F32)),
            shape: None,
        }),
        "SequenceConstruct" => {
            let mut it = (0..cx.n_in()).map(|i| cx.ty(i).cloned().unwrap_or(Type::Unknown));
            let first = it.next().unwrap_or(Type::Unknown);
            seq_of(it.fold(first, |a, b| join(&a, &b)))
        }
        "SequenceInsert" => {
            let e = elem(cx.ty(0));
            let ins = cx.ty(1).cloned().unwrap_or(Type::Unknown);
            // An empty sequence's element type carries no shape: take the inserted one's.
            let e = match &e {
                Type::Tensor { shape: None, dtype } if *dtype == ins.dtype() => ins,
                _ => join(&e, &ins),
            };
            seq_of(e)
        }
        "SequenceErase" => cx.ty(0).cloned().unwrap_or(Type::Unknown),
        "SequenceAt" => elem(cx.ty(0)),
        "SequenceLength" => Type::tensor(DType::I64, vec![]),
        "SplitToSequence" => seq_of(split_to_sequence(cx)),
        "ConcatFromSequence" => concat_from_sequence(cx),
        "Optional" => match cx.ty(0) {
            Some(t) => Type::Optional(Box::new(t.clone())),
            None => match cx.attr("type") {
                Some(AttrValue::Type(t)) => Type::Optional(Box::new(t.clone())),
                _ => Type::Optional(Box::new(Type::Unknown)),
            },
        },
        "OptionalGetElement" => match cx.ty(0) {
            Some(Type::Optional(e)) => (**e).clone(),
            Some(t @ Type::Tensor { .. }) | Some(t @ Type::Sequence(_)) => t.clone(),
            _ => Type::Unknown,
        },
        "OptionalHasElement" => Type::tensor(DType::Bool, vec![]),
        "Identity" if matches!(cx.ty(0), Some(Type::Sequence(_)) | Some(Type::Optional(_))) => {
            cx.ty(0).cloned().unwrap_or(Type::Unknown)
        }
        _ => return None,
    };
    Some(vec![t])
}

fn split_to_sequence(cx: &Cx) -> Type {
    let dtype = cx.dtype(0);
    let Some(s) = cx.shape(0) else {
        return Type::Tensor { dtype, shape: None };
    };
    let Some(axis) = norm_axis(cx.attr_i("axis", 0), s.len()) else {
        return Type::Tensor { dtype, shape: None };
    };
    let mut shape = s.to_vec();
    if cx.has(1) {
        shape[axis] = Dim::Unknown;
    } else if cx.attr_i("keepdims", 1) != 0 {
        shape[axis] = Dim::Fixed(1);
    } else {
        shape.remove(axis);
    }
    Type::Tensor {
        dtype,
        shape: Some(shape),
    }
}

fn concat_from_sequence(cx: &Cx) -> Type {
    let e = elem(cx.ty(0));
    let dtype = e.dtype();
    let Some(s) = e.shape() else {
        return Type::Tensor { dtype, shape: None };
    };
    let new_axis = cx.attr_i("new_axis", 0) != 0;
    let rank = s.len() + new_axis as usize;
    let Some(axis) = norm_axis(cx.attr_i("axis", 0), rank) else {
        return Type::Tensor { dtype, shape: None };
    };
    let mut shape = s.to_vec();
    if new_axis {
        shape.insert(axis, Dim::Unknown);
    } else {
        shape[axis] = Dim::Unknown;
    }
    Type::Tensor {
        dtype,
        shape: Some(shape),
    }
}
