//! A readable, deterministic text dump of the IR (`kiln compile --dump-ir`, snapshot tests):
//! inputs, constants (small ones with their values), one line per node with its output types,
//! attributes, and nested subgraphs indented under their node.

use std::fmt::Write;

use kiln_runtime::{DType, Tensor};

use crate::ir::{AttrValue, Graph, Model, Node, ValueId};

/// Constants with at most this many elements show their values.
const SHOW_ELEMS: usize = 8;

pub fn dump(model: &Model) -> String {
    let mut out = String::new();
    let opsets: Vec<String> = model
        .opsets
        .iter()
        .map(|(d, v)| format!("{}={v}", if d.is_empty() { "ai.onnx" } else { d }))
        .collect();
    let _ = writeln!(
        out,
        "graph {} (opsets {})",
        name_or(&model.graph.name, "main"),
        opsets.join(", ")
    );
    if !model.producer.is_empty() || model.ir_version != 0 {
        let _ = writeln!(
            out,
            "  # producer '{}', ir_version {}",
            model.producer, model.ir_version
        );
    }
    graph_body(&mut out, &model.graph, &model.opsets, 1);
    out
}

/// The opset the model imports for `domain` ("" and "ai.onnx" being the same).
fn model_opset(opsets: &[(String, i64)], domain: &str) -> Option<i64> {
    let norm = |d: &str| {
        if d == "ai.onnx" {
            String::new()
        } else {
            d.to_string()
        }
    };
    opsets
        .iter()
        .find(|(d, _)| norm(d) == norm(domain))
        .map(|(_, v)| *v)
}

fn name_or<'a>(name: &'a str, default: &'a str) -> &'a str {
    if name.is_empty() {
        default
    } else {
        name
    }
}

fn indent(out: &mut String, depth: usize) {
    for _ in 0..depth {
        out.push_str("  ");
    }
}

/// How a value is referred to: its name, or `%id` when it has none.
fn vname(g: &Graph, v: ValueId) -> String {
    match g.values.get(v) {
        Some(info) if !info.name.is_empty() => info.name.clone(),
        _ => format!("%{v}"),
    }
}

fn typed(g: &Graph, v: ValueId) -> String {
    match g.values.get(v) {
        Some(info) => format!("{}: {}", vname(g, v), info.ty),
        None => format!("%{v}: <missing value>"),
    }
}

type Opsets = [(String, i64)];

fn graph_body(out: &mut String, g: &Graph, opsets: &Opsets, depth: usize) {
    for &v in &g.captures {
        indent(out, depth);
        let _ = writeln!(out, "capture {}", typed(g, v));
    }
    for &v in &g.inputs {
        indent(out, depth);
        let _ = writeln!(out, "input  {}", typed(g, v));
    }
    for (v, info) in g.values.iter().enumerate() {
        if let Some(t) = &info.konst {
            indent(out, depth);
            let _ = writeln!(out, "const  {}{}", typed(g, v), tensor_summary(t));
        }
    }
    for n in &g.nodes {
        node(out, g, n, opsets, depth);
    }
    for &v in &g.outputs {
        indent(out, depth);
        let _ = writeln!(out, "output {}", typed(g, v));
    }
}

fn node(out: &mut String, g: &Graph, n: &Node, opsets: &Opsets, depth: usize) {
    indent(out, depth);
    let outs: Vec<String> = n
        .outputs
        .iter()
        .map(|o| o.map_or_else(|| "_".to_string(), |v| typed(g, v)))
        .collect();
    let ins: Vec<String> = n
        .inputs
        .iter()
        .map(|i| i.map_or_else(|| "_".to_string(), |v| vname(g, v)))
        .collect();
    let op = match n.domain.as_str() {
        "" | "ai.onnx" => n.op.clone(),
        d => format!("{d}.{}", n.op),
    };
    let _ = write!(out, "{} = {op}({})", outs.join(", "), ins.join(", "));
    if !n.name.is_empty() {
        let _ = write!(out, "  # {}", n.name);
    }
    // Nodes normally follow the model's opset; say so when one does not.
    if model_opset(opsets, &n.domain) != Some(n.opset) {
        let _ = write!(out, "  (opset {})", n.opset);
    }
    out.push('\n');
    let plain: Vec<String> = n
        .attrs
        .iter()
        .filter(|a| !matches!(a.value, AttrValue::Graph(_) | AttrValue::Graphs(_)))
        .map(|a| format!("{}={}", a.name, attr_value(&a.value)))
        .collect();
    if !plain.is_empty() {
        indent(out, depth + 1);
        let _ = writeln!(out, "attrs: {}", plain.join(", "));
    }
    for a in &n.attrs {
        let graphs: Vec<&Graph> = match &a.value {
            AttrValue::Graph(sg) => vec![sg.as_ref()],
            AttrValue::Graphs(gs) => gs.iter().collect(),
            _ => continue,
        };
        for (i, sg) in graphs.iter().enumerate() {
            indent(out, depth + 1);
            let label = if graphs.len() > 1 {
                format!("{}[{i}]", a.name)
            } else {
                a.name.clone()
            };
            let _ = writeln!(out, "{label}: graph {} {{", name_or(&sg.name, "_"));
            graph_body(out, sg, opsets, depth + 2);
            indent(out, depth + 1);
            out.push_str("}\n");
        }
    }
}

fn bytes_str(b: &[u8]) -> String {
    format!("{:?}", String::from_utf8_lossy(b))
}

fn list<T>(v: &[T], f: impl Fn(&T) -> String) -> String {
    format!("[{}]", v.iter().map(f).collect::<Vec<_>>().join(", "))
}

fn attr_value(v: &AttrValue) -> String {
    match v {
        AttrValue::Float(f) => format!("{f:?}"),
        AttrValue::Int(i) => i.to_string(),
        AttrValue::String(s) => bytes_str(s),
        AttrValue::Tensor(t) => format!("tensor {}{}", tensor_type(t), tensor_summary(t)),
        AttrValue::Floats(v) => list(v, |f| format!("{f:?}")),
        AttrValue::Ints(v) => list(v, |i| i.to_string()),
        AttrValue::Strings(v) => list(v, |s| bytes_str(s)),
        AttrValue::Tensors(v) => list(v, |t| {
            format!("tensor {}{}", tensor_type(t), tensor_summary(t))
        }),
        AttrValue::Type(t) => format!("type {t}"),
        AttrValue::Graph(_) | AttrValue::Graphs(_) => "<graph>".to_string(),
    }
}

fn tensor_type(t: &Tensor) -> String {
    let dims: Vec<String> = t.shape().iter().map(|d| d.to_string()).collect();
    format!("{}[{}]", t.dtype(), dims.join(","))
}

/// ` = [values]` for small tensors, ` (N bytes)` for the others.
fn tensor_summary(t: &Tensor) -> String {
    if t.len() <= SHOW_ELEMS {
        if let Some(vals) = tensor_values(t) {
            return format!(" = [{}]", vals.join(", "));
        }
    }
    if t.dtype() == DType::String {
        return format!(" ({} strings)", t.len());
    }
    format!(" ({} bytes)", t.bytes().len())
}

fn tensor_values(t: &Tensor) -> Option<Vec<String>> {
    let d = t.dtype();
    Some(match d {
        DType::String => t.strings().ok()?.iter().map(|s| format!("{s:?}")).collect(),
        DType::Bool => t
            .view::<bool>()
            .ok()?
            .iter()
            .map(|b| b.to_string())
            .collect(),
        DType::F32 => t
            .view::<f32>()
            .ok()?
            .iter()
            .map(|f| format!("{f:?}"))
            .collect(),
        DType::F64 | DType::F16 | DType::BF16 => t
            .to_f64_vec()
            .ok()?
            .iter()
            .map(|f| format!("{f:?}"))
            .collect(),
        DType::U64 => t
            .view::<u64>()
            .ok()?
            .iter()
            .map(|v| v.to_string())
            .collect(),
        d if d.is_int() => t.to_i64_vec().ok()?.iter().map(|v| v.to_string()).collect(),
        _ => return None,
    })
}
