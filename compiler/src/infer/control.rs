//! If / Loop / Scan: infer the bodies (with the enclosing scopes visible for captures) and derive
//! the node's output types from the bodies' outputs. Loop-carried values are iterated to a fixed
//! point, so a value whose shape changes between iterations ends up with unknown dims rather than
//! the first iteration's.

use kiln_runtime::DType;

use super::dims::norm_axis;
use super::{infer_graph, join, refine, Scope};
use crate::ir::{AttrValue, Dim, Graph, Node, Type};

/// Attempts at a loop-carried fixed point before settling for the last one.
const MAX_ROUNDS: usize = 4;

pub(crate) fn infer(
    node: &mut Node,
    ins: Vec<Option<Type>>,
    opset: i64,
    cond: Option<bool>,
    scope: &Scope,
) -> Vec<Type> {
    let is_onnx = matches!(node.domain.as_str(), "" | "ai.onnx");
    let ins: Vec<Type> = ins
        .into_iter()
        .map(|t| t.unwrap_or(Type::Unknown))
        .collect();
    match node.op.as_str() {
        "If" if is_onnx => infer_if(node, cond, scope),
        "Loop" if is_onnx => infer_loop(node, &ins, scope),
        "Scan" if is_onnx && opset >= 9 => infer_scan(node, &ins, scope),
        "Scan" if is_onnx => infer_scan8(node, &ins, scope),
        "SequenceMap" if is_onnx => infer_sequence_map(node, &ins, scope),
        _ => {
            // Unknown op with subgraphs: still type what is inside them.
            for a in &mut node.attrs {
                match &mut a.value {
                    AttrValue::Graph(g) => infer_graph(g, scope),
                    AttrValue::Graphs(gs) => gs.iter_mut().for_each(|g| infer_graph(g, scope)),
                    _ => {}
                }
            }
            Vec::new()
        }
    }
}

fn graph_attr<'a>(node: &'a mut Node, name: &str) -> Option<&'a mut Graph> {
    node.attrs
        .iter_mut()
        .find(|a| a.name == name)
        .and_then(|a| match &mut a.value {
            AttrValue::Graph(g) => Some(g.as_mut()),
            _ => None,
        })
}

fn output_types(g: &Graph) -> Vec<Type> {
    g.outputs.iter().map(|&v| g.values[v].ty.clone()).collect()
}

fn infer_if(node: &mut Node, cond: Option<bool>, scope: &Scope) -> Vec<Type> {
    let mut branches = Vec::new();
    for name in ["then_branch", "else_branch"] {
        if let Some(g) = graph_attr(node, name) {
            infer_graph(g, scope);
            branches.push(output_types(g));
        }
    }
    match (branches.as_slice(), cond) {
        ([a, _], Some(true)) => a.clone(),
        ([_, b], Some(false)) => b.clone(),
        ([a, b], None) => a.iter().zip(b).map(|(x, y)| join(x, y)).collect(),
        _ => Vec::new(),
    }
}

/// Infer a body whose inputs `carried_in..` feed back from outputs `carried_out..` (`n` of
/// them), widening those inputs' types until they are stable.
fn infer_body(
    body: &mut Graph,
    mut in_types: Vec<Type>,
    (carried_in, carried_out, n): (usize, usize, usize),
    scope: &Scope,
) {
    let original = body.clone();
    for round in 0..MAX_ROUNDS {
        *body = original.clone();
        for (k, &v) in body.inputs.iter().enumerate() {
            if let Some(t) = in_types.get(k) {
                body.values[v].ty = refine(&body.values[v].ty, t);
            }
        }
        infer_graph(body, scope);
        let outs = output_types(body);
        let mut stable = true;
        for j in 0..n {
            let (Some(&iv), Some(out)) =
                (body.inputs.get(carried_in + j), outs.get(carried_out + j))
            else {
                continue;
            };
            let inp = &body.values[iv].ty;
            if std::mem::discriminant(inp) != std::mem::discriminant(out) {
                // E.g. an optional initial value feeding a body that yields a plain sequence.
                continue;
            }
            let joined = join(inp, out);
            if &joined != inp {
                stable = false;
                in_types[carried_in + j] = joined;
            }
        }
        if stable || round + 1 == MAX_ROUNDS {
            return;
        }
    }
}

fn infer_loop(node: &mut Node, ins: &[Type], scope: &Scope) -> Vec<Type> {
    let n_out = node.outputs.len();
    let Some(body) = graph_attr(node, "body") else {
        return Vec::new();
    };
    let carried = ins.len().saturating_sub(2);
    let mut in_types = vec![
        Type::tensor(DType::I64, vec![]),
        Type::tensor(DType::Bool, vec![]),
    ];
    in_types.extend(ins.iter().skip(2).cloned());
    infer_body(body, in_types, (2, 1, carried), scope);
    let outs = output_types(body);
    (0..n_out)
        .map(|k| {
            if k < carried {
                carried_type(body, 2 + k, outs.get(1 + k))
            } else {
                // Scan outputs stack one body output per iteration.
                stacked(outs.get(1 + k), Dim::Unknown, 0)
            }
        })
        .collect()
}

/// The final type of a loop-carried value: the (widened) body input's, unless the body turns it
/// into another kind of value, in which case the body output's.
fn carried_type(body: &Graph, input: usize, out: Option<&Type>) -> Type {
    let inp = body.inputs.get(input).map(|&v| &body.values[v].ty);
    match (inp, out) {
        (Some(i), Some(o)) if std::mem::discriminant(i) == std::mem::discriminant(o) => i.clone(),
        (_, Some(o)) => o.clone(),
        (Some(i), None) => i.clone(),
        (None, None) => Type::Unknown,
    }
}

/// A body output stacked along a new `axis` of length `len`.
fn stacked(t: Option<&Type>, len: Dim, axis: i64) -> Type {
    match t {
        Some(Type::Tensor { dtype, shape }) => {
            let shape = shape.as_ref().and_then(|s| {
                let a = norm_axis(axis, s.len() + 1)?;
                let mut s = s.clone();
                s.insert(a, len);
                Some(s)
            });
            Type::Tensor {
                dtype: *dtype,
                shape,
            }
        }
        _ => Type::Unknown,
    }
}

/// A type with dim `axis` removed (one slice of a scanned input).
fn sliced(t: &Type, axis: i64) -> Type {
    match t {
        Type::Tensor { dtype, shape } => {
            let shape = shape.as_ref().and_then(|s| {
                let a = norm_axis(axis, s.len())?;
                let mut s = s.clone();
                s.remove(a);
                Some(s)
            });
            Type::Tensor {
                dtype: *dtype,
                shape,
            }
        }
        _ => Type::Unknown,
    }
}

fn dim_of(t: &Type, axis: i64) -> Dim {
    t.shape()
        .and_then(|s| norm_axis(axis, s.len()).map(|a| s[a].clone()))
        .unwrap_or(Dim::Unknown)
}

fn infer_scan(node: &mut Node, ins: &[Type], scope: &Scope) -> Vec<Type> {
    let n_out = node.outputs.len();
    let m = node.attr_int("num_scan_inputs").unwrap_or(0).max(0) as usize;
    let n = ins.len().saturating_sub(m);
    let in_axes = node
        .attr_ints("scan_input_axes")
        .map(|v| v.to_vec())
        .unwrap_or(vec![0; m]);
    let out_axes = node
        .attr_ints("scan_output_axes")
        .map(|v| v.to_vec())
        .unwrap_or_default();
    let mut in_types: Vec<Type> = ins[..n].to_vec();
    for (j, t) in ins[n..].iter().enumerate() {
        in_types.push(sliced(t, in_axes.get(j).copied().unwrap_or(0)));
    }
    let len = ins.get(n).map_or(Dim::Unknown, |t| {
        dim_of(t, in_axes.first().copied().unwrap_or(0))
    });
    let Some(body) = graph_attr(node, "body") else {
        return Vec::new();
    };
    infer_body(body, in_types, (0, 0, n), scope);
    let outs = output_types(body);
    (0..n_out)
        .map(|k| {
            if k < n {
                carried_type(body, k, outs.get(k))
            } else {
                let axis = out_axes.get(k - n).copied().unwrap_or(0);
                stacked(outs.get(k), len.clone(), axis)
            }
        })
        .collect()
}

/// Scan-8: every input has a leading batch axis; scanned inputs scan over axis 1.
fn infer_scan8(node: &mut Node, ins: &[Type], scope: &Scope) -> Vec<Type> {
    let n_out = node.outputs.len();
    let m = node.attr_int("num_scan_inputs").unwrap_or(0).max(0) as usize;
    let rest = ins.get(1..).unwrap_or(&[]);
    let n = rest.len().saturating_sub(m);
    let batch = rest.first().map_or(Dim::Unknown, |t| dim_of(t, 0));
    let len = rest.get(n).map_or(Dim::Unknown, |t| dim_of(t, 1));
    let mut in_types: Vec<Type> = rest[..n].iter().map(|t| sliced(t, 0)).collect();
    in_types.extend(rest[n..].iter().map(|t| sliced(&sliced(t, 0), 0)));
    let Some(body) = graph_attr(node, "body") else {
        return Vec::new();
    };
    infer_body(body, in_types, (0, 0, n), scope);
    let outs = output_types(body);
    (0..n_out)
        .map(|k| {
            let t = outs.get(k);
            if k < n {
                stacked(t, batch.clone(), 0)
            } else {
                stacked(Some(&stacked(t, len.clone(), 0)), batch.clone(), 0)
            }
        })
        .collect()
}

/// SequenceMap: the body sees one element of each sequence input (tensors as they are), and
/// every body output is collected into a sequence.
fn infer_sequence_map(node: &mut Node, ins: &[Type], scope: &Scope) -> Vec<Type> {
    let in_types: Vec<Type> = ins
        .iter()
        .map(|t| match t {
            Type::Sequence(e) => (**e).clone(),
            t => t.clone(),
        })
        .collect();
    let Some(body) = graph_attr(node, "body") else {
        return Vec::new();
    };
    infer_body(body, in_types, (0, 0, 0), scope);
    output_types(body)
        .into_iter()
        .map(|t| Type::Sequence(Box::new(t)))
        .collect()
}
