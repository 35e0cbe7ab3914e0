//! Helpers to build IR graphs by hand in tests.
#![allow(dead_code)]

use kiln_compiler::ir::{AttrValue, Attribute, Dim, Graph, Model, Node, Type, ValueId};
use kiln_runtime::{DType, Tensor};

pub fn d(n: usize) -> Dim {
    Dim::Fixed(n)
}

pub fn s(name: &str) -> Dim {
    Dim::Sym(name.to_string())
}

pub fn ty(dtype: DType, dims: &[Dim]) -> Type {
    Type::tensor(dtype, dims.to_vec())
}

pub fn f32t(dims: &[Dim]) -> Type {
    ty(DType::F32, dims)
}

pub fn attr(name: &str, value: AttrValue) -> Attribute {
    Attribute {
        name: name.to_string(),
        value,
    }
}

pub fn ints(name: &str, v: &[i64]) -> Attribute {
    attr(name, AttrValue::Ints(v.to_vec()))
}

pub fn int(name: &str, v: i64) -> Attribute {
    attr(name, AttrValue::Int(v))
}

pub fn string(name: &str, v: &str) -> Attribute {
    attr(name, AttrValue::String(v.as_bytes().to_vec()))
}

pub fn input(g: &mut Graph, name: &str, t: Type) -> ValueId {
    let v = g.add_value(name, t);
    g.inputs.push(v);
    v
}

pub fn i64_const(g: &mut Graph, name: &str, v: &[i64]) -> ValueId {
    g.add_const(name, Tensor::from_vec(&[v.len()], v.to_vec()).unwrap())
}

/// Append a node (ai.onnx, given opset) whose outputs are new untyped values.
pub fn node_v(
    g: &mut Graph,
    op: &str,
    opset: i64,
    inputs: &[Option<ValueId>],
    outs: &[&str],
    attrs: Vec<Attribute>,
) -> Vec<ValueId> {
    let outputs: Vec<ValueId> = outs
        .iter()
        .map(|n| g.add_value(*n, Type::Unknown))
        .collect();
    g.nodes.push(Node {
        name: format!("{}_{}", op.to_lowercase(), g.nodes.len()),
        op: op.to_string(),
        domain: String::new(),
        opset,
        inputs: inputs.to_vec(),
        outputs: outputs.iter().map(|&v| Some(v)).collect(),
        attrs,
    });
    outputs
}

/// `node_v` with every input present and a single output.
pub fn node1(
    g: &mut Graph,
    op: &str,
    opset: i64,
    inputs: &[ValueId],
    out: &str,
    attrs: Vec<Attribute>,
) -> ValueId {
    let ins: Vec<Option<ValueId>> = inputs.iter().map(|&v| Some(v)).collect();
    node_v(g, op, opset, &ins, &[out], attrs)[0]
}

pub fn model(g: Graph, opset: i64) -> Model {
    Model {
        graph: g,
        opsets: vec![(String::new(), opset)],
        ir_version: 8,
        ..Default::default()
    }
}

pub fn value_type(m: &Model, name: &str) -> Type {
    m.graph
        .values
        .iter()
        .find(|v| v.name == name)
        .map(|v| v.ty.clone())
        .unwrap_or_else(|| panic!("no value {name}"))
}
