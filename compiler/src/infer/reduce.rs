//! Shapes of reductions (Reduce*, ArgMax/ArgMin): axes from the attribute or, from the opset that
//! moved them, a constant input; keepdims and noop_with_empty_axes.

use super::dims::norm_axis;
use super::Cx;
use crate::ir::Dim;

pub(crate) fn shapes(cx: &Cx) -> Option<Vec<Option<Vec<Dim>>>> {
    let op = cx.op();
    let s = match op {
        "ArgMax" | "ArgMin" => arg_reduce(cx),
        _ if op.starts_with("Reduce") => reduce(cx, if op == "ReduceSum" { 13 } else { 18 }),
        _ => return None,
    };
    Some(vec![s])
}

fn reduce(cx: &Cx, axes_input_from: i64) -> Option<Vec<Dim>> {
    let s = cx.shape(0)?;
    let keep = cx.attr_i("keepdims", 1) != 0;
    let axes = if cx.opset >= axes_input_from {
        if cx.has(1) {
            match cx.const_ints(1) {
                Some(a) => a,
                None if cx.shape(1) == Some(&[Dim::Fixed(0)][..]) => vec![],
                // Which axes go is unknown: the rank survives only with keepdims.
                None => return keep.then(|| vec![Dim::Unknown; s.len()]),
            }
        } else {
            vec![]
        }
    } else {
        cx.attr_ints("axes").map(|a| a.to_vec()).unwrap_or_default()
    };
    if axes.is_empty() {
        if cx.opset >= axes_input_from && cx.attr_i("noop_with_empty_axes", 0) != 0 {
            return Some(s.to_vec());
        }
        return Some(if keep {
            vec![Dim::Fixed(1); s.len()]
        } else {
            vec![]
        });
    }
    let axes: Vec<usize> = axes
        .iter()
        .map(|&a| norm_axis(a, s.len()))
        .collect::<Option<_>>()?;
    Some(reduced(s, &axes, keep))
}

fn reduced(s: &[Dim], axes: &[usize], keep: bool) -> Vec<Dim> {
    s.iter()
        .enumerate()
        .filter_map(|(i, d)| match (axes.contains(&i), keep) {
            (false, _) => Some(d.clone()),
            (true, true) => Some(Dim::Fixed(1)),
            (true, false) => None,
        })
        .collect()
}

fn arg_reduce(cx: &Cx) -> Option<Vec<Dim>> {
    let s = cx.shape(0)?;
    let axis = norm_axis(cx.attr_i("axis", 0), s.len())?;
    Some(reduced(s, &[axis], cx.attr_i("keepdims", 1) != 0))
}
