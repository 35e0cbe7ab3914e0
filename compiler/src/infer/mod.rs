//! Type and shape inference: fills every value's dtype, and its shape where it is derivable, with
//! symbolic dims. Declared types (graph inputs, value_info) are kept and only refined (an inferred
//! fixed size may replace a declared symbol or unknown). Ops it does not know leave their outputs
//! as they were: inference never fails on an unknown op.
//!
//! Besides types it tracks, per graph, the compile-time contents of small integer tensors with
//! possibly symbolic elements (`Shape(x)` = `[batch, seq, 384]`), so that the usual exported shape
//! arithmetic (Shape → Gather → Concat → Reshape) still yields symbolic output shapes.

mod attention;
mod control;
mod dims;
mod dtype;
mod elementwise;
mod ml;
mod nn;
mod reduce;
mod seq;
mod symval;
mod tensor;

use std::collections::HashMap;

use kiln_runtime::{DType, Tensor};

use crate::ir::{AttrValue, Dim, Graph, Model, Node, Type, ValueId};
use crate::Result;

pub(crate) use dims::SymInt;

/// Constant inputs longer than this are weights, not arguments, and are not read by inference.
const MAX_ARG_LEN: usize = 1 << 16;

/// Infer types of every value of the model's graphs (subgraphs included).
pub fn infer_types(model: &mut Model) -> Result<()> {
    infer_graph(&mut model.graph, &Scope::default());
    Ok(())
}

/// One enclosing graph as seen from a subgraph: its values by name and the constants its captures
/// resolved to.
#[derive(Clone)]
pub(crate) struct Frame<'a> {
    graph: &'a Graph,
    names: HashMap<&'a str, ValueId>,
    captured: &'a HashMap<ValueId, Tensor>,
}

/// The chain of enclosing graphs, innermost last.
#[derive(Clone, Default)]
pub(crate) struct Scope<'a> {
    frames: Vec<Frame<'a>>,
}

impl<'a> Scope<'a> {
    pub(crate) fn with<'b>(
        &'b self,
        graph: &'b Graph,
        captured: &'b HashMap<ValueId, Tensor>,
    ) -> Scope<'b>
    where
        'a: 'b,
    {
        let names = graph
            .values
            .iter()
            .enumerate()
            .map(|(i, v)| (v.name.as_str(), i))
            .collect();
        let mut frames: Vec<Frame<'b>> = self.frames.clone();
        frames.push(Frame {
            graph,
            names,
            captured,
        });
        Scope { frames }
    }

    /// The type and constant data of an outer value named `name`.
    fn lookup(&self, name: &str) -> Option<(&'a Type, Option<&'a Tensor>)> {
        self.frames.iter().rev().find_map(|f| {
            let &id = f.names.get(name)?;
            let v = &f.graph.values[id];
            Some((&v.ty, v.konst.as_ref().or_else(|| f.captured.get(&id))))
        })
    }
}

/// Infer one graph in place; `outer` resolves its captures.
pub(crate) fn infer_graph(g: &mut Graph, outer: &Scope) {
    let captured = resolve_captures(g, outer);
    let mut syms: HashMap<ValueId, Vec<SymInt>> = HashMap::new();
    for i in 0..g.nodes.len() {
        let has_sub = g.nodes[i].subgraphs().next().is_some();
        let (types, outs_syms) = if has_sub {
            let mut node = std::mem::replace(&mut g.nodes[i], placeholder());
            let types = {
                let scope = outer.with(g, &captured);
                let cx = Cx::new(&node, g, &captured, &syms);
                let ins = cx.input_types();
                let opset = cx.opset;
                // An If whose condition is known here types like the branch it will take.
                let cond = (node.op == "If")
                    .then(|| cx.sym_ints(0).and_then(|v| v.first().and_then(|x| x.int())))
                    .flatten()
                    .map(|c| c != 0);
                control::infer(&mut node, ins, opset, cond, &scope)
            };
            g.nodes[i] = node;
            (types, Vec::new())
        } else {
            let cx = Cx::new(&g.nodes[i], g, &captured, &syms);
            let types = node_types(&cx);
            let s = symval::propagate(&cx);
            (types, s)
        };
        let outputs = g.nodes[i].outputs.clone();
        for (k, out) in outputs.iter().enumerate() {
            let Some(v) = *out else { continue };
            if let Some(t) = types.get(k) {
                let refined = refine(&g.values[v].ty, t);
                g.values[v].ty = refined;
            }
            if let Some(Some(s)) = outs_syms.get(k) {
                syms.insert(v, s.clone());
            }
        }
    }
}

fn placeholder() -> Node {
    Node {
        name: String::new(),
        op: String::new(),
        domain: String::new(),
        opset: 0,
        inputs: Vec::new(),
        outputs: Vec::new(),
        attrs: Vec::new(),
    }
}

/// Give captured values the types of the outer values they bind to; returns their constant data.
fn resolve_captures(g: &mut Graph, outer: &Scope) -> HashMap<ValueId, Tensor> {
    let mut bound = vec![false; g.values.len()];
    for &v in &g.inputs {
        bound[v] = true;
    }
    for n in &g.nodes {
        for v in n.outputs.iter().flatten() {
            bound[*v] = true;
        }
    }
    // Declared captures, plus (defensively) any unbound non-constant value an outer scope defines.
    let mut caps: Vec<ValueId> = g.captures.clone();
    for (v, info) in g.values.iter().enumerate() {
        if !bound[v] && info.konst.is_none() && !caps.contains(&v) {
            caps.push(v);
        }
    }
    let mut consts = HashMap::new();
    for v in caps {
        if let Some((ty, k)) = outer.lookup(&g.values[v].name) {
            g.values[v].ty = refine(&g.values[v].ty, ty);
            if let Some(k) = k {
                consts.insert(v, k.clone());
            }
        }
    }
    consts
}

/// A declared type refined by an inferred one.
pub(crate) fn refine(declared: &Type, inferred: &Type) -> Type {
    match (declared, inferred) {
        (Type::Unknown, t) => t.clone(),
        (d, Type::Unknown) => d.clone(),
        (
            Type::Tensor {
                dtype: dd,
                shape: ds,
            },
            Type::Tensor {
                dtype: id,
                shape: is,
            },
        ) => {
            let shape = match (ds, is) {
                (None, s) => s.clone(),
                (Some(d), Some(i)) if d.len() == i.len() => Some(
                    d.iter()
                        .zip(i)
                        .map(|(a, b)| dims::refine_dim(a, b))
                        .collect(),
                ),
                (Some(d), _) => Some(d.clone()),
            };
            Type::Tensor {
                dtype: dd.or(*id),
                shape,
            }
        }
        (Type::Sequence(d), Type::Sequence(i)) => Type::Sequence(Box::new(refine(d, i))),
        (Type::Optional(d), Type::Optional(i)) => Type::Optional(Box::new(refine(d, i))),
        // The kinds disagree: trust the declaration.
        (d, _) => d.clone(),
    }
}

/// The common type of two values that may differ (If branches, loop-carried values).
pub(crate) fn join(a: &Type, b: &Type) -> Type {
    match (a, b) {
        (
            Type::Tensor {
                dtype: da,
                shape: sa,
            },
            Type::Tensor {
                dtype: db,
                shape: sb,
            },
        ) => {
            let dtype = if da == db { *da } else { None };
            let shape = match (sa, sb) {
                (Some(x), Some(y)) if x.len() == y.len() => {
                    Some(x.iter().zip(y).map(|(p, q)| dims::join_dim(p, q)).collect())
                }
                _ => None,
            };
            Type::Tensor { dtype, shape }
        }
        (Type::Sequence(x), Type::Sequence(y)) => Type::Sequence(Box::new(join(x, y))),
        (Type::Optional(x), Type::Optional(y)) => Type::Optional(Box::new(join(x, y))),
        _ if a == b => a.clone(),
        _ => Type::Unknown,
    }
}

/// A tensor type from what is known; nothing known is `Unknown` (so it refines nothing).
pub(crate) fn tensor_type(dtype: Option<DType>, shape: Option<Vec<Dim>>) -> Type {
    if dtype.is_none() && shape.is_none() {
        Type::Unknown
    } else {
        Type::Tensor { dtype, shape }
    }
}

/// Output types of a node without subgraphs.
fn node_types(cx: &Cx) -> Vec<Type> {
    if let Some(types) = ml::infer(cx) {
        return types;
    }
    if let Some(types) = attention::infer(cx) {
        return types;
    }
    if !matches!(cx.node.domain.as_str(), "" | "ai.onnx") {
        return Vec::new();
    }
    if let Some(types) = seq::infer(cx) {
        return types;
    }
    let shapes = shape_rules(cx);
    (0..cx.n_out())
        .map(|k| tensor_type(dtype::out_dtype(cx, k), shapes.get(k).cloned().flatten()))
        .collect()
}

fn shape_rules(cx: &Cx) -> Vec<Option<Vec<Dim>>> {
    if let Some(s) = elementwise::shapes(cx) {
        return s;
    }
    if let Some(s) = tensor::shapes(cx) {
        return s;
    }
    if let Some(s) = reduce::shapes(cx) {
        return s;
    }
    nn::shapes(cx).unwrap_or_default()
}

/// What a shape rule sees of one node: its attributes, input types, constant inputs and the
/// symbolic contents of small integer inputs.
pub(crate) struct Cx<'a> {
    pub node: &'a Node,
    pub opset: i64,
    ins: Vec<Option<&'a Type>>,
    consts: Vec<Option<&'a Tensor>>,
    syms: Vec<Option<&'a [SymInt]>>,
}

impl<'a> Cx<'a> {
    fn new(
        node: &'a Node,
        g: &'a Graph,
        captured: &'a HashMap<ValueId, Tensor>,
        syms: &'a HashMap<ValueId, Vec<SymInt>>,
    ) -> Cx<'a> {
        let ins = node
            .inputs
            .iter()
            .map(|v| v.map(|v| &g.values[v].ty))
            .collect();
        let consts = node
            .inputs
            .iter()
            .map(|v| v.and_then(|v| g.konst(v).or_else(|| captured.get(&v))))
            .collect();
        let syms = node
            .inputs
            .iter()
            .map(|v| v.and_then(|v| syms.get(&v)).map(|s| s.as_slice()))
            .collect();
        Cx {
            node,
            opset: node.opset,
            ins,
            consts,
            syms,
        }
    }

    fn input_types(&self) -> Vec<Option<Type>> {
        self.ins.iter().map(|t| t.cloned()).collect()
    }

    pub fn op(&self) -> &'a str {
        &self.node.op
    }

    pub fn n_in(&self) -> usize {
        self.ins.len()
    }

    pub fn n_out(&self) -> usize {
        self.node.outputs.len()
    }

    pub fn has(&self, i: usize) -> bool {
        self.ins.get(i).is_some_and(|t| t.is_some())
    }

    pub fn ty(&self, i: usize) -> Option<&'a Type> {
        self.ins.get(i).copied().flatten()
    }

    pub fn dtype(&self, i: usize) -> Option<DType> {
        self.ty(i).and_then(|t| t.dtype())
    }

    pub fn shape(&self, i: usize) -> Option<&'a [Dim]> {
        self.ty(i).and_then(|t| t.shape())
    }

    pub fn rank(&self, i: usize) -> Option<usize> {
        self.shape(i).map(|s| s.len())
    }

    pub fn konst(&self, i: usize) -> Option<&'a Tensor> {
        self.consts.get(i).copied().flatten()
    }

    /// A small constant input (shape-like arguments, not weights).
    fn small_konst(&self, i: usize) -> Option<&'a Tensor> {
        self.konst(i).filter(|t| t.len() <= MAX_ARG_LEN)
    }

    /// A constant integer input's elements.
    pub fn const_ints(&self, i: usize) -> Option<Vec<i64>> {
        self.small_konst(i).and_then(|t| t.to_i64_vec().ok())
    }

    /// A constant real input's elements.
    pub fn const_floats(&self, i: usize) -> Option<Vec<f64>> {
        self.small_konst(i).and_then(|t| t.to_f64_vec().ok())
    }

    /// An integer input's elements when known at compile time, possibly symbolic.
    pub fn sym_ints(&self, i: usize) -> Option<Vec<SymInt>> {
        if let Some(v) = self.const_ints(i) {
            return Some(v.into_iter().map(SymInt::Int).collect());
        }
        self.syms.get(i).copied().flatten().map(|s| s.to_vec())
    }

    pub fn attr(&self, name: &str) -> Option<&'a AttrValue> {
        self.node.attr(name)
    }

    pub fn attr_i_opt(&self, name: &str) -> Option<i64> {
        self.node.attr_int(name)
    }

    pub fn attr_i(&self, name: &str, default: i64) -> i64 {
        self.node.attr_int(name).unwrap_or(default)
    }

    pub fn attr_s(&self, name: &str, default: &'a str) -> &'a str {
        self.node.attr_str(name).unwrap_or(default)
    }

    pub fn attr_ints(&self, name: &str) -> Option<&'a [i64]> {
        self.node.attr_ints(name)
    }

    pub fn attr_floats(&self, name: &str) -> Option<&'a [f32]> {
        match self.node.attr(name) {
            Some(AttrValue::Floats(v)) => Some(v),
            _ => None,
        }
    }

    pub fn attr_dtype(&self, name: &str) -> Option<DType> {
        self.attr_i_opt(name)
            .and_then(|c| DType::from_onnx(c as i32))
    }
}
