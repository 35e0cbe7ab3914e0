//! Lowering: turns the IR into the artifact manifest's programs (one per graph, subgraphs nested
//! in their node's attributes) and collects the weight blobs the writer streams after it.
//!
//! Value ids are kept 1:1 with the IR's (a subgraph may get extra values appended: pass-through
//! captures for names it only forwards to a deeper subgraph). Constants nothing reads are not
//! emitted, so weights replaced by passes do not end up in the artifact.

use std::collections::{HashMap, HashSet};

use kiln_runtime::artifact::align_up;
use kiln_runtime::manifest::{
    Attr, AttrKind, Blob, Capture, ConstBinding, Dim as MDim, KeyValue, Manifest, Metadata, Opset,
    Program, Step, TensorData, ValueInfo as MValueInfo, ValueKind, FORMAT_VERSION,
};
use kiln_runtime::{DType, Tensor};

use crate::ir::{AttrValue, Attribute, Dim, Graph, Model, Node, Type, ValueId};
use crate::{Error, Result};

/// Tensors with more bytes than this go to the weight section; smaller ones stay inline.
pub const INLINE_MAX_BYTES: usize = 64;

/// A lowered model: the manifest plus the data of each blob it references (`blobs[i]` is
/// `manifest.blobs[i]`, whose offsets are already laid out 64-byte aligned).
#[derive(Clone, Debug)]
pub struct Lowered {
    pub manifest: Manifest,
    pub blobs: Vec<Tensor>,
}

pub fn lower(model: &Model, target: &str, passes: &[String]) -> Result<Lowered> {
    let mut blobs = Blobs::default();
    let mut stack = Vec::new();
    let program = lower_graph(&model.graph, &mut stack, &mut blobs)?;
    let metadata = Metadata {
        source_sha256: model.source_sha256.clone(),
        kiln_version: kiln_runtime::VERSION.to_string(),
        target: target.to_string(),
        passes: passes.to_vec(),
        source_name: model.source_name.clone(),
        producer: model.producer.clone(),
        opsets: model
            .opsets
            .iter()
            .map(|(d, v)| Opset {
                domain: norm_domain(d).to_string(),
                version: *v,
            })
            .collect(),
        props: model
            .props
            .iter()
            .map(|(k, v)| KeyValue {
                key: k.clone(),
                value: v.clone(),
            })
            .collect(),
        ir_version: model.ir_version,
    };
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        metadata: Some(metadata),
        program: Some(program),
        blobs: blobs.entries,
    };
    Ok(Lowered {
        manifest,
        blobs: blobs.tensors,
    })
}

/// One node as a standalone step with every tensor attribute inline (for evaluating single nodes,
/// e.g. constant folding). Value ids are the graph's. Graph attributes are refused.
pub fn lower_node(node: &Node, _graph: &Graph) -> Result<Step> {
    lower_step(node, &mut |a| match &a.value {
        AttrValue::Graph(_) | AttrValue::Graphs(_) => Err(Error::InvalidModel(format!(
            "node '{}' ({}): graph attribute '{}' cannot be lowered standalone",
            node.name, node.op, a.name
        ))),
        v => Ok(plain_attr(&a.name, v, None)),
    })
}

fn norm_domain(d: &str) -> &str {
    if d == "ai.onnx" {
        ""
    } else {
        d
    }
}

/// Weight blobs in file order; a buffer shared by several constants is stored once, and so are
/// equal contents (folding a weight inside several subgraphs makes equal copies of it).
#[derive(Default)]
struct Blobs {
    tensors: Vec<Tensor>,
    entries: Vec<Blob>,
    end: u64,
    seen: HashMap<(usize, usize, i32), u32>,
    /// (content hash, length, dtype) → blobs with that key.
    by_content: HashMap<(u64, usize, i32), Vec<u32>>,
}

impl Blobs {
    fn add(&mut self, t: &Tensor) -> u32 {
        let bytes = t.bytes();
        let key = (bytes.as_ptr() as usize, bytes.len(), t.dtype().onnx_code());
        if let Some(&i) = self.seen.get(&key) {
            return i;
        }
        let ckey = (xxhash_rust::xxh3::xxh3_64(bytes), bytes.len(), t.dtype().onnx_code());
        let same = self.by_content.get(&ckey).and_then(|c| c.iter().copied().find(|&i| self.tensors[i as usize].bytes() == bytes));
        if let Some(i) = same {
            self.seen.insert(key, i);
            return i;
        }
        let offset = align_up(self.end as usize) as u64;
        let i = self.entries.len() as u32;
        self.entries.push(Blob {
            offset,
            len: bytes.len() as u64,
        });
        self.tensors.push(t.clone());
        self.end = offset + bytes.len() as u64;
        self.seen.insert(key, i);
        self.by_content.entry(ckey).or_default().push(i);
        i
    }
}

fn tensor_data(t: &Tensor, blobs: Option<&mut Blobs>) -> TensorData {
    let mut d = TensorData {
        dtype: t.dtype().onnx_code(),
        dims: t.shape().iter().map(|&n| n as u64).collect(),
        ..Default::default()
    };
    if t.dtype() == DType::String {
        d.strings = t
            .strings()
            .map(|s| s.iter().map(|x| x.as_bytes().to_vec()).collect())
            .unwrap_or_default();
        return d;
    }
    match blobs {
        Some(b) if t.bytes().len() > INLINE_MAX_BYTES => d.blob = Some(b.add(t)),
        _ => d.inline = t.bytes().to_vec(),
    }
    d
}

/// Kind, element dtype and dims of an IR type (sequences/optionals describe their elements).
fn type_parts(ty: &Type) -> (ValueKind, Option<DType>, Option<&[Dim]>) {
    fn innermost(t: &Type) -> (Option<DType>, Option<&[Dim]>) {
        match t {
            Type::Tensor { dtype, shape } => (*dtype, shape.as_deref()),
            Type::Sequence(e) | Type::Optional(e) => innermost(e),
            Type::Unknown => (None, None),
        }
    }
    let kind = match ty {
        Type::Tensor { .. } => ValueKind::Tensor,
        Type::Sequence(_) => ValueKind::Sequence,
        Type::Optional(_) => ValueKind::Optional,
        Type::Unknown => ValueKind::Unknown,
    };
    let (dtype, shape) = innermost(ty);
    (kind, dtype, shape)
}

fn lower_dim(d: &Dim) -> MDim {
    match d {
        Dim::Fixed(n) => MDim {
            size: *n as i64,
            symbol: String::new(),
        },
        Dim::Sym(s) => MDim {
            size: -1,
            symbol: s.clone(),
        },
        Dim::Unknown => MDim {
            size: -1,
            symbol: String::new(),
        },
    }
}

fn value_info(v: &crate::ir::ValueInfo) -> MValueInfo {
    let (kind, dtype, shape) = type_parts(&v.ty);
    let konst_shape: Option<Vec<Dim>> = v
        .konst
        .as_ref()
        .map(|t| t.shape().iter().map(|&n| Dim::Fixed(n)).collect());
    let dtype = dtype.or(v.konst.as_ref().map(|t| t.dtype()));
    let shape = shape.or(konst_shape.as_deref());
    let kind = if kind == ValueKind::Unknown && v.konst.is_some() {
        ValueKind::Tensor
    } else {
        kind
    };
    MValueInfo {
        name: v.name.clone(),
        kind: kind as i32,
        dtype: dtype.map_or(0, |d| d.onnx_code()),
        has_shape: shape.is_some(),
        dims: shape
            .map(|s| s.iter().map(lower_dim).collect())
            .unwrap_or_default(),
    }
}

/// A program being built, as seen by the subgraphs nested in it.
struct Frame {
    values: Vec<MValueInfo>,
    names: HashMap<String, u32>,
    captures: Vec<Capture>,
}

/// The id of the value `name` in the innermost frame, capturing it through every frame between
/// it and the one that defines it.
fn resolve(stack: &mut [Frame], name: &str) -> Option<u32> {
    let (last, outer) = stack.split_last_mut()?;
    if let Some(&id) = last.names.get(name) {
        return Some(id);
    }
    let oid = resolve(outer, name)?;
    let info = outer.last()?.values[oid as usize].clone();
    let id = last.values.len() as u32;
    last.values.push(info);
    last.names.insert(name.to_string(), id);
    last.captures.push(Capture {
        inner: id,
        outer: oid,
    });
    Some(id)
}

fn vid(v: ValueId) -> Result<u32> {
    u32::try_from(v)
        .ok()
        .filter(|&x| x < i32::MAX as u32)
        .ok_or_else(|| Error::InvalidModel("too many values".into()))
}

fn lower_graph(g: &Graph, stack: &mut Vec<Frame>, blobs: &mut Blobs) -> Result<Program> {
    let n = g.values.len();
    vid(n)?;
    let mut names = HashMap::new();
    for (i, v) in g.values.iter().enumerate() {
        if !v.name.is_empty() {
            names.entry(v.name.clone()).or_insert(i as u32);
        }
    }
    let values: Vec<MValueInfo> = g.values.iter().map(value_info).collect();
    stack.push(Frame {
        values,
        names,
        captures: Vec::new(),
    });
    let result = lower_graph_body(g, stack, blobs);
    let frame = stack.pop().expect("pushed above");
    let mut p = result?;
    p.values = frame.values;
    p.captures = frame.captures;
    Ok(p)
}

/// Which values are read: by nodes, as outputs, or by name from nested subgraphs.
fn read_values(g: &Graph) -> Vec<bool> {
    let mut read = vec![false; g.values.len()];
    let mut nested: HashSet<String> = HashSet::new();
    for node in &g.nodes {
        for &v in node.inputs.iter().flatten() {
            read[v] = true;
        }
        for sg in node.subgraphs() {
            nested.extend(sg.captured_names());
        }
    }
    for &v in &g.outputs {
        read[v] = true;
    }
    for (i, v) in g.values.iter().enumerate() {
        if nested.contains(&v.name) {
            read[i] = true;
        }
    }
    read
}

fn lower_graph_body(g: &Graph, stack: &mut Vec<Frame>, blobs: &mut Blobs) -> Result<Program> {
    let read = read_values(g);
    let mut bound = vec![false; g.values.len()];
    for &v in &g.inputs {
        bound[v] = true;
    }
    for node in &g.nodes {
        for &v in node.outputs.iter().flatten() {
            bound[v] = true;
        }
    }
    let mut constants = Vec::new();
    for (i, v) in g.values.iter().enumerate() {
        if let (Some(t), true) = (&v.konst, read[i]) {
            constants.push(ConstBinding {
                value: vid(i)?,
                tensor: Some(tensor_data(t, Some(blobs))),
            });
        }
    }
    // Captures: declared ones, and any value read without being produced here.
    for (i, v) in g.values.iter().enumerate() {
        let declared = g.captures.contains(&i);
        if v.konst.is_some() || bound[i] || !(declared || read[i]) {
            continue;
        }
        let depth = stack.len();
        let outer = if depth > 1 {
            resolve(&mut stack[..depth - 1], &v.name)
        } else {
            None
        };
        let Some(outer) = outer else {
            return Err(Error::InvalidModel(format!(
                "graph '{}' reads value '{}' which nothing produces{}",
                g.name,
                v.name,
                if depth > 1 {
                    " and no enclosing graph defines"
                } else {
                    ""
                }
            )));
        };
        stack[depth - 1].captures.push(Capture {
            inner: vid(i)?,
            outer,
        });
    }
    let mut steps = Vec::with_capacity(g.nodes.len());
    for node in &g.nodes {
        let step = lower_step(node, &mut |a| match &a.value {
            AttrValue::Graph(sg) => Ok(Attr {
                name: a.name.clone(),
                kind: AttrKind::Graph as i32,
                g: Some(lower_graph(sg, stack, blobs)?),
                ..Default::default()
            }),
            AttrValue::Graphs(gs) => Ok(Attr {
                name: a.name.clone(),
                kind: AttrKind::Graphs as i32,
                graphs: gs
                    .iter()
                    .map(|sg| lower_graph(sg, stack, blobs))
                    .collect::<Result<_>>()?,
                ..Default::default()
            }),
            v => Ok(plain_attr(&a.name, v, Some(blobs))),
        })?;
        steps.push(step);
    }
    Ok(Program {
        values: Vec::new(),
        inputs: g.inputs.iter().map(|&v| vid(v)).collect::<Result<_>>()?,
        outputs: g.outputs.iter().map(|&v| vid(v)).collect::<Result<_>>()?,
        constants,
        steps,
        captures: Vec::new(),
    })
}

fn lower_step(node: &Node, attr: &mut dyn FnMut(&Attribute) -> Result<Attr>) -> Result<Step> {
    let ids = |v: &[Option<ValueId>]| -> Result<Vec<i32>> {
        v.iter()
            .map(|x| x.map_or(Ok(-1), |v| vid(v).map(|v| v as i32)))
            .collect()
    };
    Ok(Step {
        op: node.op.clone(),
        domain: norm_domain(&node.domain).to_string(),
        opset: node.opset,
        name: node.name.clone(),
        inputs: ids(&node.inputs)?,
        outputs: ids(&node.outputs)?,
        attrs: node.attrs.iter().map(attr).collect::<Result<_>>()?,
    })
}

/// A non-graph attribute; tensors go to blobs when `blobs` is given and they are big.
fn plain_attr(name: &str, v: &AttrValue, mut blobs: Option<&mut Blobs>) -> Attr {
    let mut a = Attr {
        name: name.to_string(),
        ..Default::default()
    };
    let kind = match v {
        AttrValue::Float(f) => {
            a.f = *f;
            AttrKind::Float
        }
        AttrValue::Int(i) => {
            a.i = *i;
            AttrKind::Int
        }
        AttrValue::String(s) => {
            a.s = s.clone();
            AttrKind::String
        }
        AttrValue::Tensor(t) => {
            a.t = Some(tensor_data(t, blobs));
            AttrKind::Tensor
        }
        AttrValue::Floats(v) => {
            a.floats = v.clone();
            AttrKind::Floats
        }
        AttrValue::Ints(v) => {
            a.ints = v.clone();
            AttrKind::Ints
        }
        AttrValue::Strings(v) => {
            a.strings = v.clone();
            AttrKind::Strings
        }
        AttrValue::Tensors(ts) => {
            a.tensors = ts
                .iter()
                .map(|t| tensor_data(t, blobs.as_deref_mut()))
                .collect();
            AttrKind::Tensors
        }
        AttrValue::Type(t) => {
            let (kind, dtype, _) = type_parts(t);
            a.type_kind = kind as i32;
            a.type_dtype = dtype.map_or(0, |d| d.onnx_code());
            AttrKind::TypeProto
        }
        AttrValue::Graph(_) => AttrKind::Graph,
        AttrValue::Graphs(_) => AttrKind::Graphs,
    };
    a.kind = kind as i32;
    a
}
