//! kiln's core IR: a typed dataflow graph that every frontend translates into once.
//!
//! Values live in an arena indexed by `ValueId`; every value has a type (dtype + shape with
//! symbolic dims where known) and constants carry their data as runtime `Tensor`s that share the
//! source file's bytes (no copies). Nodes are kept in topological order. A subgraph (If/Loop/Scan
//! body) is a `Graph` whose `captures` name values of the enclosing scope it reads.

use std::collections::{HashMap, HashSet};
use std::fmt;

use kiln_runtime::{DType, Tensor};

pub type ValueId = usize;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Dim {
    Fixed(usize),
    Sym(String),
    Unknown,
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Fixed(n) => write!(f, "{n}"),
            Dim::Sym(s) => f.write_str(s),
            Dim::Unknown => f.write_str("?"),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Type {
    /// dtype None = not inferred; shape None = rank unknown.
    Tensor { dtype: Option<DType>, shape: Option<Vec<Dim>> },
    Sequence(Box<Type>),
    Optional(Box<Type>),
    Unknown,
}

impl Type {
    pub fn tensor(dtype: DType, shape: Vec<Dim>) -> Type {
        Type::Tensor { dtype: Some(dtype), shape: Some(shape) }
    }

    pub fn dtype(&self) -> Option<DType> {
        match self {
            Type::Tensor { dtype, .. } => *dtype,
            _ => None,
        }
    }

    pub fn shape(&self) -> Option<&[Dim]> {
        match self {
            Type::Tensor { shape, .. } => shape.as_deref(),
            _ => None,
        }
    }
}

impl fmt::Display for Type {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Type::Tensor { dtype, shape } => {
                match dtype {
                    Some(d) => write!(f, "{d}")?,
                    None => f.write_str("?")?,
                }
                match shape {
                    Some(s) => {
                        let dims: Vec<String> = s.iter().map(|d| d.to_string()).collect();
                        write!(f, "[{}]", dims.join(","))
                    }
                    None => f.write_str("[..]"),
                }
            }
            Type::Sequence(t) => write!(f, "seq<{t}>"),
            Type::Optional(t) => write!(f, "optional<{t}>"),
            Type::Unknown => f.write_str("?"),
        }
    }
}

#[derive(Clone, Debug)]
pub struct ValueInfo {
    pub name: String,
    pub ty: Type,
    /// Constant data (initializers, Constant nodes, folded results).
    pub konst: Option<Tensor>,
}

#[derive(Clone, Debug)]
pub enum AttrValue {
    Float(f32),
    Int(i64),
    String(Vec<u8>),
    Tensor(Tensor),
    Graph(Box<Graph>),
    Floats(Vec<f32>),
    Ints(Vec<i64>),
    Strings(Vec<Vec<u8>>),
    Tensors(Vec<Tensor>),
    Graphs(Vec<Graph>),
    Type(Type),
}

#[derive(Clone, Debug)]
pub struct Attribute {
    pub name: String,
    pub value: AttrValue,
}

#[derive(Clone, Debug)]
pub struct Node {
    pub name: String,
    pub op: String,
    pub domain: String,
    /// The opset version of `domain` the model imports (kernels follow that version's semantics).
    pub opset: i64,
    pub inputs: Vec<Option<ValueId>>,
    pub outputs: Vec<Option<ValueId>>,
    pub attrs: Vec<Attribute>,
}

impl Node {
    pub fn attr(&self, name: &str) -> Option<&AttrValue> {
        self.attrs.iter().find(|a| a.name == name).map(|a| &a.value)
    }

    pub fn attr_int(&self, name: &str) -> Option<i64> {
        match self.attr(name) {
            Some(AttrValue::Int(i)) => Some(*i),
            _ => None,
        }
    }

    pub fn attr_ints(&self, name: &str) -> Option<&[i64]> {
        match self.attr(name) {
            Some(AttrValue::Ints(v)) => Some(v),
            _ => None,
        }
    }

    pub fn attr_float(&self, name: &str) -> Option<f32> {
        match self.attr(name) {
            Some(AttrValue::Float(f)) => Some(*f),
            _ => None,
        }
    }

    pub fn attr_str(&self, name: &str) -> Option<&str> {
        match self.attr(name) {
            Some(AttrValue::String(s)) => std::str::from_utf8(s).ok(),
            _ => None,
        }
    }

    /// The subgraphs this node carries (If branches, Loop/Scan bodies).
    pub fn subgraphs(&self) -> impl Iterator<Item = &Graph> {
        self.attrs.iter().flat_map(|a| match &a.value {
            AttrValue::Graph(g) => std::slice::from_ref(g.as_ref()),
            AttrValue::Graphs(gs) => gs.as_slice(),
            _ => &[],
        })
    }

    pub fn input(&self, i: usize) -> Option<ValueId> {
        self.inputs.get(i).copied().flatten()
    }

    pub fn output(&self, i: usize) -> Option<ValueId> {
        self.outputs.get(i).copied().flatten()
    }
}

#[derive(Clone, Debug, Default)]
pub struct Graph {
    pub name: String,
    pub values: Vec<ValueInfo>,
    /// Topological order.
    pub nodes: Vec<Node>,
    pub inputs: Vec<ValueId>,
    pub outputs: Vec<ValueId>,
    /// Values of this graph bound to same-named values of the enclosing scope.
    pub captures: Vec<ValueId>,
}

impl Graph {
    pub fn add_value(&mut self, name: impl Into<String>, ty: Type) -> ValueId {
        self.values.push(ValueInfo { name: name.into(), ty, konst: None });
        self.values.len() - 1
    }

    pub fn add_const(&mut self, name: impl Into<String>, t: Tensor) -> ValueId {
        let shape = t.shape().iter().map(|&d| Dim::Fixed(d)).collect();
        let id = self.add_value(name, Type::tensor(t.dtype(), shape));
        self.values[id].konst = Some(t);
        id
    }

    pub fn konst(&self, v: ValueId) -> Option<&Tensor> {
        self.values[v].konst.as_ref()
    }

    /// Names of outer-scope values read by this graph or any graph nested in it.
    pub fn captured_names(&self) -> HashSet<String> {
        let mut out: HashSet<String> =
            self.captures.iter().map(|&v| self.values[v].name.clone()).collect();
        let own: HashSet<&str> = self.values.iter().map(|v| v.name.as_str()).collect();
        for n in &self.nodes {
            for g in n.subgraphs() {
                for name in g.captured_names() {
                    // A nested capture of one of our own values is not a capture of ours.
                    if !own.contains(name.as_str()) {
                        out.insert(name);
                    }
                }
            }
        }
        out
    }

    /// For each value, the indices of nodes reading it (captures by subgraphs count as reads).
    pub fn consumers(&self) -> Vec<Vec<usize>> {
        let mut uses = vec![Vec::new(); self.values.len()];
        let by_name: HashMap<&str, ValueId> =
            self.values.iter().enumerate().map(|(i, v)| (v.name.as_str(), i)).collect();
        for (ni, n) in self.nodes.iter().enumerate() {
            for v in n.inputs.iter().flatten() {
                uses[*v].push(ni);
            }
            for g in n.subgraphs() {
                for name in g.captured_names() {
                    if let Some(&v) = by_name.get(name.as_str()) {
                        uses[v].push(ni);
                    }
                }
            }
        }
        uses
    }

    /// Index of the node producing each value, if any.
    pub fn producers(&self) -> Vec<Option<usize>> {
        let mut p = vec![None; self.values.len()];
        for (ni, n) in self.nodes.iter().enumerate() {
            for v in n.outputs.iter().flatten() {
                p[*v] = Some(ni);
            }
        }
        p
    }
}

/// A whole model: the main graph plus what the source said about itself.
#[derive(Clone, Debug, Default)]
pub struct Model {
    pub graph: Graph,
    /// (domain, version); "" is ai.onnx.
    pub opsets: Vec<(String, i64)>,
    pub ir_version: i64,
    pub producer: String,
    pub props: Vec<(String, String)>,
    /// Hex sha256 of the source file.
    pub source_sha256: String,
    pub source_name: String,
}
