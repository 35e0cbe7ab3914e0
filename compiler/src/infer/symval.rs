//! Compile-time contents of small integer tensors whose elements may be symbolic dims: what
//! `Shape(x)` yields and what Gather/Slice/Concat/Unsqueeze/arithmetic make of it. Lets Reshape,
//! Expand, ConstantOfShape… get symbolic output shapes in dynamically shaped exported models.

use super::dims::{norm_axis, prod_dim, SymInt};
use super::tensor::{shape_range, slice_len};
use super::Cx;
use crate::ir::AttrValue;

/// Longest tensor whose contents are tracked (shape vectors are short).
const MAX_LEN: usize = 64;

pub(crate) fn propagate(cx: &Cx) -> Vec<Option<Vec<SymInt>>> {
    if !matches!(cx.node.domain.as_str(), "" | "ai.onnx") {
        return Vec::new();
    }
    let v = value(cx).filter(|v| v.len() <= MAX_LEN);
    vec![v]
}

fn int_dtype(cx: &Cx, i: usize) -> bool {
    cx.dtype(i).is_some_and(|d| d.is_int())
}

fn value(cx: &Cx) -> Option<Vec<SymInt>> {
    match cx.op() {
        "Shape" => {
            let s = cx.shape(0)?;
            let (a, b) = shape_range(cx, s.len());
            Some(s[a..b.max(a)].iter().map(SymInt::from_dim).collect())
        }
        "Size" => Some(vec![SymInt::from_dim(&prod_dim(cx.shape(0)?))]),
        "Identity" | "Squeeze" | "Unsqueeze" | "Reshape" | "Flatten" => cx.sym_ints(0),
        "Cast" => {
            let to = cx.attr_dtype("to")?;
            (to.is_int() && int_dtype(cx, 0))
                .then(|| cx.sym_ints(0))
                .flatten()
        }
        "Concat" => {
            let mut out = Vec::new();
            for i in 0..cx.n_in() {
                out.extend(cx.sym_ints(i)?);
            }
            Some(out)
        }
        "Gather" => {
            let data = cx.sym_ints(0)?;
            if cx.rank(0)? != 1 {
                return None;
            }
            let idx = cx.const_ints(1)?;
            idx.iter()
                .map(|&i| norm_axis(i, data.len()).map(|i| data[i].clone()))
                .collect()
        }
        "Slice" if cx.opset >= 10 => {
            let data = cx.sym_ints(0)?;
            if cx.rank(0)? != 1 {
                return None;
            }
            let start = *cx.const_ints(1)?.first()?;
            let end = *cx.const_ints(2)?.first()?;
            if cx.has(3) && cx.const_ints(3)?.first().is_none_or(|&a| a != 0 && a != -1) {
                return None;
            }
            let step = if cx.has(4) {
                *cx.const_ints(4)?.first()?
            } else {
                1
            };
            let n = data.len() as i64;
            let len = slice_len(n, start, end, step);
            let first = if start < 0 { start + n } else { start };
            let first = if step > 0 {
                first.clamp(0, n)
            } else {
                first.clamp(0, n - 1)
            };
            Some(
                (0..len)
                    .map(|k| data[(first + k * step) as usize].clone())
                    .collect(),
            )
        }
        "Add" | "Sub" | "Mul" | "Div" | "Max" | "Min" if int_dtype(cx, 0) => {
            let (a, b) = (cx.sym_ints(0)?, cx.sym_ints(1)?);
            zip_broadcast(&a, &b, |x, y| arith(cx.op(), x, y))
        }
        "ConstantOfShape" => {
            let dims: Option<Vec<i64>> = cx.sym_ints(0)?.iter().map(|d| d.int()).collect();
            let n: i64 = dims?.iter().product();
            let fill = match cx.attr("value") {
                Some(AttrValue::Tensor(t)) => *t.to_i64_vec().ok()?.first()?,
                _ => return None,
            };
            (0..=MAX_LEN as i64)
                .contains(&n)
                .then(|| vec![SymInt::Int(fill); n as usize])
        }
        "Equal" => {
            let (a, b) = (cx.sym_ints(0)?, cx.sym_ints(1)?);
            zip_broadcast(&a, &b, |x, y| match (x, y) {
                (SymInt::Int(p), SymInt::Int(q)) => SymInt::Int((p == q) as i64),
                // A dim is never negative.
                (SymInt::Sym(_), SymInt::Int(q)) | (SymInt::Int(q), SymInt::Sym(_)) if *q < 0 => {
                    SymInt::Int(0)
                }
                (SymInt::Sym(p), SymInt::Sym(q)) if p == q => SymInt::Int(1),
                _ => SymInt::Unknown,
            })
        }
        "Where" => {
            let (c, a, b) = (cx.sym_ints(0)?, cx.sym_ints(1)?, cx.sym_ints(2)?);
            let n = c.len().max(a.len()).max(b.len());
            if [c.len(), a.len(), b.len()]
                .iter()
                .any(|&l| l != n && l != 1)
            {
                return None;
            }
            let pick = |v: &[SymInt], i: usize| v.get(if v.len() == 1 { 0 } else { i }).cloned();
            (0..n)
                .map(|i| match pick(&c, i)? {
                    SymInt::Int(0) => pick(&b, i),
                    SymInt::Int(_) => pick(&a, i),
                    _ => Some(SymInt::Unknown),
                })
                .collect()
        }
        "Neg" => Some(
            cx.sym_ints(0)?
                .iter()
                .map(|x| x.int().map_or(SymInt::Unknown, |v| SymInt::Int(-v)))
                .collect(),
        ),
        _ => None,
    }
}

/// Elementwise over two 1-D (or one-element) value lists.
fn zip_broadcast(
    a: &[SymInt],
    b: &[SymInt],
    f: impl Fn(&SymInt, &SymInt) -> SymInt,
) -> Option<Vec<SymInt>> {
    let n = a.len().max(b.len());
    if (a.len() != n && a.len() != 1) || (b.len() != n && b.len() != 1) {
        return None;
    }
    let at = |v: &'_ [SymInt], i: usize| if v.len() == 1 { 0 } else { i };
    Some((0..n).map(|i| f(&a[at(a, i)], &b[at(b, i)])).collect())
}

fn arith(op: &str, a: &SymInt, b: &SymInt) -> SymInt {
    use SymInt::*;
    match (op, a, b) {
        ("Add", Int(x), Int(y)) => Int(x.wrapping_add(*y)),
        ("Sub", Int(x), Int(y)) => Int(x.wrapping_sub(*y)),
        ("Mul", Int(x), Int(y)) => Int(x.wrapping_mul(*y)),
        ("Div", Int(x), Int(y)) if *y != 0 => Int(x.wrapping_div(*y)),
        ("Max", Int(x), Int(y)) => Int(*x.max(y)),
        ("Min", Int(x), Int(y)) => Int(*x.min(y)),
        ("Add" | "Sub", s @ Sym(_), Int(0)) | ("Add", Int(0), s @ Sym(_)) => s.clone(),
        ("Mul" | "Div", s @ Sym(_), Int(1)) | ("Mul", Int(1), s @ Sym(_)) => s.clone(),
        ("Max" | "Min", Sym(x), Sym(y)) if x == y => a.clone(),
        _ => Unknown,
    }
}
