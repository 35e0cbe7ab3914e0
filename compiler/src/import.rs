//! ONNX → IR translation, done once per model.
//!
//! Initializers and `Constant` nodes become constant values (sharing the file's bytes), model-local
//! functions are inlined at their call sites, subgraphs are imported recursively with the outer
//! names they read recorded as `captures`, and nodes are put in topological order. Only declared
//! types are carried: inference and folding happen later. Every malformed input is an
//! `Error::InvalidModel` naming the node or value at fault.

use std::borrow::Cow;
use std::cell::{Cell, RefCell};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::path::Path;
use std::rc::Rc;

use kiln_runtime::{Error, Result, Tensor};

use crate::ir::{AttrValue, Attribute, Dim, Graph, Model, Node, Type, ValueId};
use crate::onnx::load::{read_model, ExternalStore};
use crate::onnx::proto::{
    tensor_shape_proto::DimValue, type_proto, AttributeProto, AttributeType, FunctionProto,
    GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TypeProto,
};
use crate::onnx::tensor::{dtype_of, shape_of, sparse_to_tensor, to_tensor};

/// Highest ai.onnx opset accepted (the newest onnx 1.22 knows; kernels decide what each version
/// means for their op).
pub const MAX_AI_ONNX_OPSET: i64 = 27;
/// How deeply function calls may nest when inlining.
const MAX_INLINE_DEPTH: usize = 32;
/// Upper bound on nodes produced by inlining (guards against exponential call trees).
const MAX_INLINED_NODES: usize = 4_000_000;

fn invalid(msg: impl Into<String>) -> Error {
    Error::InvalidModel(msg.into())
}

/// Read, decode and import an ONNX file.
pub fn import_model(path: &Path) -> Result<Model> {
    let (proto, sha) = read_model(path)?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    import_proto(&proto, dir, sha, name)
}

/// Import a decoded model; external data is resolved inside `base_dir`.
pub fn import_proto(
    model: &ModelProto,
    base_dir: &Path,
    sha256: String,
    name: String,
) -> Result<Model> {
    let graph = model.graph.as_ref().ok_or_else(|| invalid("the model has no graph"))?;
    let opsets = opset_map(&model.opset_import);
    if let Some(&v) = opsets.get("") {
        if !(1..=MAX_AI_ONNX_OPSET).contains(&v) {
            return Err(invalid(format!(
                "the model imports ai.onnx opset {v}; kiln supports opsets 1 to {MAX_AI_ONNX_OPSET}"
            )));
        }
    }
    let mut used = HashSet::new();
    collect_graph_names(graph, &mut used);
    for f in &model.functions {
        for n in &f.node {
            collect_node_names(n, &mut used);
        }
    }
    let imp = Importer {
        functions: model
            .functions
            .iter()
            .map(|f| ((norm_domain(&f.domain).to_string(), f.name.clone(), f.overload.clone()), f))
            .collect(),
        ext: ExternalStore::new(base_dir),
        used: RefCell::new(used),
        counter: Cell::new(0),
        inlined: Cell::new(0),
    };
    let ir_graph = imp.graph(graph, None, &Rc::new(opsets.clone()))?;

    let mut opsets: Vec<(String, i64)> = opsets.into_iter().collect();
    opsets.sort();
    let mut props: Vec<(String, String)> =
        model.metadata_props.iter().map(|p| (p.key.clone(), p.value.clone())).collect();
    if !model.doc_string.is_empty() {
        props.push(("doc_string".into(), model.doc_string.clone()));
    }
    let producer = format!("{} {}", model.producer_name, model.producer_version).trim().to_string();
    Ok(Model {
        graph: ir_graph,
        opsets,
        ir_version: model.ir_version,
        producer,
        props,
        source_sha256: sha256,
        source_name: name,
    })
}

type Opsets = HashMap<String, i64>;

/// "" and "ai.onnx" name the same domain.
fn norm_domain(d: &str) -> &str {
    if d == "ai.onnx" {
        ""
    } else {
        d
    }
}

fn opset_map(imports: &[OperatorSetIdProto]) -> Opsets {
    imports.iter().map(|o| (norm_domain(&o.domain).to_string(), o.version)).collect()
}

fn collect_graph_names(g: &GraphProto, out: &mut HashSet<String>) {
    out.extend(g.input.iter().map(|v| v.name.clone()));
    out.extend(g.output.iter().map(|v| v.name.clone()));
    out.extend(g.initializer.iter().map(|t| t.name.clone()));
    for n in &g.node {
        collect_node_names(n, out);
    }
}

fn collect_node_names(n: &NodeProto, out: &mut HashSet<String>) {
    out.extend(n.input.iter().cloned());
    out.extend(n.output.iter().cloned());
    for a in &n.attribute {
        for g in a.g.iter().chain(&a.graphs) {
            collect_graph_names(g, out);
        }
    }
}

/// A node after function inlining, still named by strings.
struct RawNode<'g> {
    name: String,
    op: String,
    domain: String,
    inputs: Vec<String>,
    outputs: Vec<String>,
    attrs: Vec<Cow<'g, AttributeProto>>,
    /// The opsets in force where the node was written (the model's, or its function's).
    opsets: Rc<Opsets>,
}

/// A node to expand: either a graph node or a function-body node already renamed.
struct Call<'g> {
    name: String,
    op: String,
    domain: String,
    overload: String,
    inputs: Vec<String>,
    outputs: Vec<String>,
    attrs: Vec<Cow<'g, AttributeProto>>,
}

#[derive(Default)]
struct Expanded<'g> {
    nodes: Vec<RawNode<'g>>,
    /// Declared types of inlined function values (already renamed).
    types: Vec<(String, TypeProto)>,
}

/// One graph level's names with their declared types, chained to the enclosing levels.
struct Scope<'s> {
    names: HashMap<String, Type>,
    parent: Option<&'s Scope<'s>>,
}

impl Scope<'_> {
    fn lookup(&self, name: &str) -> Option<&Type> {
        self.names.get(name).or_else(|| self.parent.and_then(|p| p.lookup(name)))
    }
}

struct Importer<'m> {
    functions: HashMap<(String, String, String), &'m FunctionProto>,
    ext: ExternalStore,
    /// Every name in the model, so inlined values get fresh ones.
    used: RefCell<HashSet<String>>,
    counter: Cell<usize>,
    inlined: Cell<usize>,
}

impl<'m> Importer<'m> {
    fn fresh(&self, hint: &str) -> String {
        let mut used = self.used.borrow_mut();
        loop {
            let k = self.counter.get();
            self.counter.set(k + 1);
            let name = format!("{hint}__{k}");
            if used.insert(name.clone()) {
                return name;
            }
        }
    }

    /// Expand function calls (recursively) into plain nodes.
    fn expand<'g>(
        &self,
        call: Call<'g>,
        opsets: &Rc<Opsets>,
        depth: usize,
        out: &mut Expanded<'g>,
    ) -> Result<()> {
        let key = (call.domain.clone(), call.op.clone(), call.overload.clone());
        let Some(&f) = self.functions.get(&key) else {
            out.nodes.push(RawNode {
                name: call.name,
                op: call.op,
                domain: call.domain,
                inputs: call.inputs,
                outputs: call.outputs,
                attrs: call.attrs,
                opsets: opsets.clone(),
            });
            return Ok(());
        };
        if depth >= MAX_INLINE_DEPTH {
            return Err(invalid(format!(
                "function '{}' at node '{}': calls nest deeper than {MAX_INLINE_DEPTH} \
                 (recursive function?)",
                call.op, call.name
            )));
        }
        let inlined = self.inlined.get() + f.node.len();
        if inlined > MAX_INLINED_NODES {
            return Err(invalid(format!(
                "inlining functions produces over {MAX_INLINED_NODES} nodes"
            )));
        }
        self.inlined.set(inlined);
        if call.inputs.len() > f.input.len() || call.outputs.len() > f.output.len() {
            return Err(invalid(format!(
                "node '{}' calls function '{}' with {} inputs and {} outputs; it takes {} and {}",
                call.name,
                f.name,
                call.inputs.len(),
                call.outputs.len(),
                f.input.len(),
                f.output.len()
            )));
        }

        // Formal names map to the call's actual names; everything else made inside gets a fresh one.
        let mut map: HashMap<String, String> = HashMap::new();
        for (i, formal) in f.input.iter().enumerate() {
            map.insert(formal.clone(), call.inputs.get(i).cloned().unwrap_or_default());
        }
        let prefix = if call.name.is_empty() { f.name.clone() } else { call.name.clone() };
        for (i, formal) in f.output.iter().enumerate() {
            let actual = match call.outputs.get(i) {
                Some(a) if !a.is_empty() => a.clone(),
                _ => self.fresh(&format!("{prefix}/{formal}")),
            };
            map.insert(formal.clone(), actual);
        }
        for n in &f.node {
            for o in &n.output {
                if !o.is_empty() && !map.contains_key(o) {
                    map.insert(o.clone(), self.fresh(&format!("{prefix}/{o}")));
                }
            }
        }
        let rename = |s: &String| map.get(s).cloned().unwrap_or_else(|| s.clone());

        let mut fn_opsets = (**opsets).clone();
        fn_opsets.extend(opset_map(&f.opset_import));
        let fn_opsets = Rc::new(fn_opsets);

        for vi in &f.value_info {
            if let (Some(ty), Some(actual)) = (&vi.r#type, map.get(&vi.name)) {
                out.types.push((actual.clone(), ty.clone()));
            }
        }
        for (k, n) in f.node.iter().enumerate() {
            let mut attrs = Vec::with_capacity(n.attribute.len());
            for a in &n.attribute {
                if let Some(a) = substitute(a, &call.attrs, f, &map, &HashSet::new())? {
                    attrs.push(Cow::Owned(a));
                }
            }
            let inner =
                if n.name.is_empty() { format!("{}_{k}", n.op_type) } else { n.name.clone() };
            let body_call = Call {
                name: format!("{prefix}/{inner}"),
                op: n.op_type.clone(),
                domain: norm_domain(&n.domain).to_string(),
                overload: n.overload.clone(),
                inputs: n
                    .input
                    .iter()
                    .map(|s| if s.is_empty() { s.clone() } else { rename(s) })
                    .collect(),
                outputs: n
                    .output
                    .iter()
                    .map(|s| if s.is_empty() { s.clone() } else { rename(s) })
                    .collect(),
                attrs,
            };
            self.expand(body_call, &fn_opsets, depth + 1, out)?;
        }
        Ok(())
    }

    /// Import one graph level. `outer` is the enclosing scope (None for the main graph).
    fn graph(&self, g: &GraphProto, outer: Option<&Scope>, opsets: &Rc<Opsets>) -> Result<Graph> {
        let gname = if g.name.is_empty() { "<graph>" } else { g.name.as_str() };

        let mut ex = Expanded::default();
        for (k, n) in g.node.iter().enumerate() {
            let call = Call {
                name: if n.name.is_empty() { format!("{}_{k}", n.op_type) } else { n.name.clone() },
                op: n.op_type.clone(),
                domain: norm_domain(&n.domain).to_string(),
                overload: n.overload.clone(),
                inputs: n.input.clone(),
                outputs: n.output.clone(),
                attrs: n.attribute.iter().map(Cow::Borrowed).collect(),
            };
            self.expand(call, opsets, 0, &mut ex)?;
        }

        // Declared types of every name this level defines (for captures by nested graphs too).
        let mut decl: HashMap<String, Type> = HashMap::new();
        for vi in g.value_info.iter().chain(&g.output).chain(&g.input) {
            if let Some(tp) = &vi.r#type {
                decl.insert(vi.name.clone(), convert_type(tp, &vi.name)?);
            }
        }
        for (name, tp) in &ex.types {
            decl.entry(name.clone()).or_insert(convert_type(tp, name)?);
        }
        for t in &g.initializer {
            let what = format!("initializer '{}'", t.name);
            let (shape, _) = shape_of(&t.dims, &what)?;
            let shape = shape.into_iter().map(Dim::Fixed).collect();
            decl.insert(t.name.clone(), Type::tensor(dtype_of(t.data_type, &what)?, shape));
        }
        let mut local: HashMap<String, Type> = HashMap::new();
        let names = g
            .input
            .iter()
            .map(|v| &v.name)
            .chain(g.initializer.iter().map(|t| &t.name))
            .chain(g.sparse_initializer.iter().filter_map(|s| s.values.as_ref().map(|v| &v.name)))
            .chain(ex.nodes.iter().flat_map(|n| n.outputs.iter()));
        for name in names.filter(|n| !n.is_empty()) {
            local.insert(name.clone(), decl.get(name).cloned().unwrap_or(Type::Unknown));
        }
        let scope = Scope { names: local, parent: outer };

        let mut b = Builder {
            g: Graph { name: g.name.clone(), ..Graph::default() },
            by_name: HashMap::new(),
        };

        // Constants: initializers (an input of the same name is only a default: kiln fixes it).
        for t in &g.initializer {
            if t.name.is_empty() {
                return Err(invalid(format!("graph '{gname}' has an initializer without a name")));
            }
            let tensor = to_tensor(t, &self.ext)?;
            b.define_const(&t.name, tensor, gname)?;
        }
        for s in &g.sparse_initializer {
            let name = s.values.as_ref().map(|v| v.name.clone()).unwrap_or_default();
            if name.is_empty() {
                return Err(invalid(format!(
                    "graph '{gname}' has a sparse initializer without a name"
                )));
            }
            let tensor = sparse_to_tensor(s, &self.ext)?;
            b.define_const(&name, tensor, gname)?;
        }
        for vi in &g.input {
            if vi.name.is_empty() {
                return Err(invalid(format!("graph '{gname}' has an input without a name")));
            }
            if b.by_name.contains_key(&vi.name) {
                if g.initializer.iter().any(|t| t.name == vi.name)
                    || g.sparse_initializer
                        .iter()
                        .any(|s| s.values.as_ref().is_some_and(|v| v.name == vi.name))
                {
                    continue;
                }
                return Err(invalid(format!("graph '{gname}' lists input '{}' twice", vi.name)));
            }
            let ty = decl.get(&vi.name).cloned().unwrap_or(Type::Unknown);
            let id = b.g.add_value(vi.name.clone(), ty);
            b.by_name.insert(vi.name.clone(), id);
            b.g.inputs.push(id);
        }

        // Constant nodes become constants; every other node's outputs become values.
        let mut ops = Vec::new();
        for n in &ex.nodes {
            if n.op == "Constant" && n.domain.is_empty() {
                let t = self.constant(n)?;
                let out = match n.outputs.as_slice() {
                    [o] if !o.is_empty() => o,
                    _ => {
                        return Err(invalid(format!(
                            "Constant node '{}' must have one output",
                            n.name
                        )))
                    }
                };
                b.define_const(out, t, gname).map_err(|_| duplicate(out, n))?;
                continue;
            }
            for o in n.outputs.iter().filter(|o| !o.is_empty()) {
                if b.by_name.contains_key(o) {
                    return Err(duplicate(o, n));
                }
                let ty = decl.get(o).cloned().unwrap_or(Type::Unknown);
                let id = b.g.add_value(o.clone(), ty);
                b.by_name.insert(o.clone(), id);
            }
            ops.push(n);
        }

        let mut nodes = Vec::with_capacity(ops.len());
        for n in ops {
            nodes.push(self.node(n, &mut b, &scope)?);
        }
        for vi in &g.output {
            if vi.name.is_empty() {
                return Err(invalid(format!("graph '{gname}' has an output without a name")));
            }
            let id = b.resolve(&vi.name, &scope).ok_or_else(|| {
                invalid(format!("graph '{gname}' output '{}' is not produced by any node", vi.name))
            })?;
            b.g.outputs.push(id);
        }
        b.g.nodes = toposort(nodes, &b.g, gname)?;
        Ok(b.g)
    }

    fn node(&self, n: &RawNode, b: &mut Builder, scope: &Scope) -> Result<Node> {
        let opset = match n.opsets.get(&n.domain) {
            Some(&v) => v,
            None if n.domain.is_empty() => {
                return Err(invalid(format!(
                    "node '{}' ({}) is in the ai.onnx domain, which the model does not import",
                    n.name, n.op
                )))
            }
            // Custom domains missing from opset_import: version 1 is the only sensible reading.
            None => 1,
        };
        let mut inputs = Vec::with_capacity(n.inputs.len());
        for i in &n.inputs {
            if i.is_empty() {
                inputs.push(None);
                continue;
            }
            let id = b.resolve(i, scope).ok_or_else(|| {
                invalid(format!("node '{}' ({}) reads '{i}', which nothing produces", n.name, n.op))
            })?;
            inputs.push(Some(id));
        }
        let outputs = n
            .outputs
            .iter()
            .map(|o| if o.is_empty() { None } else { b.by_name.get(o).copied() })
            .collect();
        let mut attrs = Vec::with_capacity(n.attrs.len());
        for a in &n.attrs {
            let value = self.attr_value(a, scope, &n.opsets).map_err(|e| {
                with_context(e, &format!("node '{}' ({}) attribute '{}'", n.name, n.op, a.name))
            })?;
            if let AttrValue::Graph(g) = &value {
                b.capture_for(g, scope)?;
            }
            if let AttrValue::Graphs(gs) = &value {
                for g in gs {
                    b.capture_for(g, scope)?;
                }
            }
            attrs.push(Attribute { name: a.name.clone(), value });
        }
        Ok(Node {
            name: n.name.clone(),
            op: n.op.clone(),
            domain: n.domain.clone(),
            opset,
            inputs,
            outputs,
            attrs,
        })
    }

    fn subgraph(&self, g: &GraphProto, scope: &Scope, opsets: &Rc<Opsets>) -> Result<Graph> {
        self.graph(g, Some(scope), opsets)
    }

    fn attr_value(
        &self,
        a: &AttributeProto,
        scope: &Scope,
        opsets: &Rc<Opsets>,
    ) -> Result<AttrValue> {
        if !a.ref_attr_name.is_empty() {
            return Err(invalid(format!(
                "refers to function attribute '{}' outside a function",
                a.ref_attr_name
            )));
        }
        let tensor = |t| to_tensor(t, &self.ext);
        Ok(match attr_kind(a)? {
            AttributeType::Float => AttrValue::Float(a.f.unwrap_or_default()),
            AttributeType::Int => AttrValue::Int(a.i.unwrap_or_default()),
            AttributeType::String => AttrValue::String(a.s.clone().unwrap_or_default()),
            AttributeType::Tensor => AttrValue::Tensor(tensor(
                a.t.as_ref().ok_or_else(|| invalid("TENSOR without a tensor"))?,
            )?),
            AttributeType::SparseTensor => AttrValue::Tensor(sparse_to_tensor(
                a.sparse_tensor
                    .as_ref()
                    .ok_or_else(|| invalid("SPARSE_TENSOR without a tensor"))?,
                &self.ext,
            )?),
            AttributeType::Graph => AttrValue::Graph(Box::new(self.subgraph(
                a.g.as_ref().ok_or_else(|| invalid("GRAPH without a graph"))?,
                scope,
                opsets,
            )?)),
            AttributeType::TypeProto => AttrValue::Type(convert_type(
                a.tp.as_ref().ok_or_else(|| invalid("TYPE_PROTO without a type"))?,
                &a.name,
            )?),
            AttributeType::Floats => AttrValue::Floats(a.floats.clone()),
            AttributeType::Ints => AttrValue::Ints(a.ints.clone()),
            AttributeType::Strings => AttrValue::Strings(a.strings.clone()),
            AttributeType::Tensors => {
                AttrValue::Tensors(a.tensors.iter().map(tensor).collect::<Result<_>>()?)
            }
            AttributeType::SparseTensors => AttrValue::Tensors(
                a.sparse_tensors
                    .iter()
                    .map(|s| sparse_to_tensor(s, &self.ext))
                    .collect::<Result<_>>()?,
            ),
            AttributeType::Graphs => AttrValue::Graphs(
                a.graphs.iter().map(|g| self.subgraph(g, scope, opsets)).collect::<Result<_>>()?,
            ),
            AttributeType::TypeProtos => {
                return Err(Error::Other("TYPE_PROTOS attributes are not supported".into()))
            }
            AttributeType::Undefined => return Err(invalid("has no value")),
        })
    }

    /// The tensor a `Constant` node holds.
    fn constant(&self, n: &RawNode) -> Result<Tensor> {
        let [a] = n.attrs.as_slice() else {
            return Err(invalid(format!(
                "Constant node '{}' must have exactly one attribute, has {}",
                n.name,
                n.attrs.len()
            )));
        };
        let ctx = |e: Error| with_context(e, &format!("Constant node '{}'", n.name));
        let kind = attr_kind(a).map_err(ctx)?;
        let t = match (a.name.as_str(), kind) {
            ("value", AttributeType::Tensor) => {
                to_tensor(a.t.as_ref().ok_or_else(|| invalid("value without a tensor"))?, &self.ext)
            }
            ("sparse_value", AttributeType::SparseTensor) => sparse_to_tensor(
                a.sparse_tensor.as_ref().ok_or_else(|| invalid("sparse_value without a tensor"))?,
                &self.ext,
            ),
            ("value_float", AttributeType::Float) => Ok(Tensor::scalar(a.f.unwrap_or_default())),
            ("value_floats", AttributeType::Floats) => {
                Tensor::from_vec(&[a.floats.len()], a.floats.clone())
            }
            ("value_int", AttributeType::Int) => Ok(Tensor::scalar(a.i.unwrap_or_default())),
            ("value_ints", AttributeType::Ints) => {
                Tensor::from_vec(&[a.ints.len()], a.ints.clone())
            }
            ("value_string", AttributeType::String) => Tensor::from_strings(
                &[],
                vec![String::from_utf8_lossy(a.s.as_deref().unwrap_or_default()).into_owned()],
            ),
            ("value_strings", AttributeType::Strings) => Tensor::from_strings(
                &[a.strings.len()],
                a.strings.iter().map(|s| String::from_utf8_lossy(s).into_owned()).collect(),
            ),
            (name, kind) => Err(invalid(format!("unexpected attribute '{name}' of type {kind:?}"))),
        };
        t.map_err(ctx)
    }
}

fn duplicate(name: &str, n: &RawNode) -> Error {
    invalid(format!("node '{}' ({}) redefines '{name}', which is already defined", n.name, n.op))
}

fn with_context(e: Error, ctx: &str) -> Error {
    match e {
        Error::InvalidModel(m) => Error::InvalidModel(format!("{ctx}: {m}")),
        Error::Other(m) => Error::Other(format!("{ctx}: {m}")),
        Error::DType(m) => Error::DType(format!("{ctx}: {m}")),
        e => e,
    }
}

/// The attribute's kind, from `type` or (old files) from the field that is set.
fn attr_kind(a: &AttributeProto) -> Result<AttributeType> {
    let declared = AttributeType::try_from(a.r#type)
        .map_err(|_| invalid(format!("attribute '{}' has unknown type {}", a.name, a.r#type)))?;
    if declared != AttributeType::Undefined {
        return Ok(declared);
    }
    use AttributeType as T;
    let kind = if a.t.is_some() {
        T::Tensor
    } else if a.g.is_some() {
        T::Graph
    } else if a.sparse_tensor.is_some() {
        T::SparseTensor
    } else if a.tp.is_some() {
        T::TypeProto
    } else if !a.floats.is_empty() {
        T::Floats
    } else if !a.ints.is_empty() {
        T::Ints
    } else if !a.strings.is_empty() {
        T::Strings
    } else if !a.tensors.is_empty() {
        T::Tensors
    } else if !a.graphs.is_empty() {
        T::Graphs
    } else if !a.sparse_tensors.is_empty() {
        T::SparseTensors
    } else if a.f.is_some() {
        T::Float
    } else if a.i.is_some() {
        T::Int
    } else if a.s.is_some() {
        T::String
    } else {
        return Err(invalid(format!("attribute '{}' has neither a type nor a value", a.name)));
    };
    Ok(kind)
}

/// A function-body attribute for one call: `ref_attr_name` replaced by the caller's attribute
/// (or the function's default; None if neither exists), names in subgraphs renamed.
fn substitute(
    a: &AttributeProto,
    call_attrs: &[Cow<AttributeProto>],
    f: &FunctionProto,
    map: &HashMap<String, String>,
    shadow: &HashSet<String>,
) -> Result<Option<AttributeProto>> {
    if !a.ref_attr_name.is_empty() {
        let src = call_attrs
            .iter()
            .map(|c| c.as_ref())
            .find(|c| c.name == a.ref_attr_name)
            .or_else(|| f.attribute_proto.iter().find(|d| d.name == a.ref_attr_name));
        return Ok(src.map(|s| {
            let mut s = s.clone();
            s.name = a.name.clone();
            s.ref_attr_name.clear();
            s
        }));
    }
    let mut a = a.clone();
    if let Some(g) = &mut a.g {
        rename_graph(g, call_attrs, f, map, shadow)?;
    }
    for g in &mut a.graphs {
        rename_graph(g, call_attrs, f, map, shadow)?;
    }
    Ok(Some(a))
}

/// Rename the free names of a subgraph inside an inlined function body (names it defines itself,
/// or that an enclosing subgraph defines, shadow the function's names).
fn rename_graph(
    g: &mut GraphProto,
    call_attrs: &[Cow<AttributeProto>],
    f: &FunctionProto,
    map: &HashMap<String, String>,
    shadow: &HashSet<String>,
) -> Result<()> {
    let mut shadow = shadow.clone();
    shadow.extend(g.input.iter().map(|v| v.name.clone()));
    shadow.extend(g.initializer.iter().map(|t| t.name.clone()));
    shadow.extend(
        g.sparse_initializer.iter().filter_map(|s| s.values.as_ref().map(|v| v.name.clone())),
    );
    shadow.extend(g.node.iter().flat_map(|n| n.output.iter().cloned()));
    let rename = |s: &mut String| {
        if !shadow.contains(s.as_str()) {
            if let Some(new) = map.get(s.as_str()) {
                *s = new.clone();
            }
        }
    };
    for n in &mut g.node {
        n.input.iter_mut().for_each(rename);
        let mut attrs = Vec::with_capacity(n.attribute.len());
        for a in &n.attribute {
            if let Some(a) = substitute(a, call_attrs, f, map, &shadow)? {
                attrs.push(a);
            }
        }
        n.attribute = attrs;
    }
    g.output.iter_mut().for_each(|v| rename(&mut v.name));
    Ok(())
}

/// A declared ONNX type in IR form.
fn convert_type(tp: &TypeProto, what: &str) -> Result<Type> {
    use type_proto::Value as V;
    let elem = |e: &Option<Box<TypeProto>>| -> Result<Type> {
        match e {
            Some(t) => convert_type(t, what),
            None => Ok(Type::Unknown),
        }
    };
    Ok(match &tp.value {
        None => Type::Unknown,
        Some(V::TensorType(t)) => {
            let dtype = if t.elem_type == 0 {
                None
            } else {
                Some(dtype_of(t.elem_type, &format!("value '{what}'"))?)
            };
            let shape = t.shape.as_ref().map(|s| {
                s.dim
                    .iter()
                    .map(|d| match &d.value {
                        Some(DimValue::DimValue(v)) if *v >= 0 => Dim::Fixed(*v as usize),
                        // "?" is how some exporters (Paddle) say "unknown": it names no shared size.
                        Some(DimValue::DimParam(p)) if !p.is_empty() && p != "?" => Dim::Sym(p.clone()),
                        _ => Dim::Unknown,
                    })
                    .collect()
            });
            Type::Tensor { dtype, shape }
        }
        Some(V::SequenceType(s)) => Type::Sequence(Box::new(elem(&s.elem_type)?)),
        Some(V::OptionalType(o)) => Type::Optional(Box::new(elem(&o.elem_type)?)),
        Some(V::MapType(_)) => {
            return Err(Error::Other(format!(
                "value '{what}' has a map type, which kiln does not support"
            )))
        }
        Some(V::SparseTensorType(_)) => {
            return Err(Error::Other(format!(
                "value '{what}' has a sparse tensor type, which kiln does not support"
            )))
        }
        Some(V::OpaqueType(o)) => {
            return Err(Error::Other(format!(
                "value '{what}' has opaque type {}.{}, which kiln does not support",
                o.domain, o.name
            )))
        }
    })
}

/// The graph under construction with its name table.
struct Builder {
    g: Graph,
    by_name: HashMap<String, ValueId>,
}

impl Builder {
    fn define_const(&mut self, name: &str, t: Tensor, gname: &str) -> Result<()> {
        if self.by_name.contains_key(name) {
            return Err(invalid(format!("graph '{gname}' defines '{name}' twice")));
        }
        let id = self.g.add_const(name.to_string(), t);
        self.by_name.insert(name.to_string(), id);
        Ok(())
    }

    /// A local value, or a capture of a same-named value of an enclosing scope.
    fn resolve(&mut self, name: &str, scope: &Scope) -> Option<ValueId> {
        if let Some(&id) = self.by_name.get(name) {
            return Some(id);
        }
        let ty = scope.parent?.lookup(name)?.clone();
        let id = self.g.add_value(name.to_string(), ty);
        self.by_name.insert(name.to_string(), id);
        self.g.captures.push(id);
        Some(id)
    }

    /// Names a nested graph captures that this level does not define are captured here too.
    fn capture_for(&mut self, sub: &Graph, scope: &Scope) -> Result<()> {
        let mut names: Vec<String> = sub.captured_names().into_iter().collect();
        names.sort();
        for name in names {
            if self.resolve(&name, scope).is_none() {
                return Err(invalid(format!(
                    "subgraph '{}' reads '{name}', which nothing produces",
                    sub.name
                )));
            }
        }
        Ok(())
    }
}

/// Order nodes so producers come first, keeping the file's order where it already is valid.
fn toposort(nodes: Vec<Node>, g: &Graph, gname: &str) -> Result<Vec<Node>> {
    let mut producer: HashMap<ValueId, usize> = HashMap::new();
    for (i, n) in nodes.iter().enumerate() {
        for &v in n.outputs.iter().flatten() {
            producer.insert(v, i);
        }
    }
    let by_name: HashMap<&str, ValueId> =
        g.values.iter().enumerate().map(|(i, v)| (v.name.as_str(), i)).collect();
    let mut users: Vec<Vec<usize>> = vec![Vec::new(); nodes.len()];
    let mut pending = vec![0usize; nodes.len()];
    for (i, n) in nodes.iter().enumerate() {
        let mut deps: HashSet<usize> =
            n.inputs.iter().flatten().filter_map(|v| producer.get(v).copied()).collect();
        for sub in n.subgraphs() {
            for name in sub.captured_names() {
                if let Some(p) = by_name.get(name.as_str()).and_then(|v| producer.get(v)) {
                    deps.insert(*p);
                }
            }
        }
        if deps.contains(&i) {
            return Err(invalid(format!("node '{}' ({}) reads its own output", n.name, n.op)));
        }
        pending[i] = deps.len();
        for d in deps {
            users[d].push(i);
        }
    }
    let mut ready: BinaryHeap<Reverse<usize>> =
        (0..nodes.len()).filter(|&i| pending[i] == 0).map(Reverse).collect();
    let mut order = Vec::with_capacity(nodes.len());
    while let Some(Reverse(i)) = ready.pop() {
        order.push(i);
        for &u in &users[i] {
            pending[u] -= 1;
            if pending[u] == 0 {
                ready.push(Reverse(u));
            }
        }
    }
    if order.len() < nodes.len() {
        let stuck: Vec<usize> = (0..nodes.len()).filter(|&i| pending[i] > 0).collect();
        let shown: Vec<String> = stuck
            .iter()
            .take(5)
            .map(|&i| format!("'{}' ({})", nodes[i].name, nodes[i].op))
            .collect();
        return Err(invalid(format!(
            "graph '{gname}' has a cycle: {} nodes depend on it, e.g. {}",
            stuck.len(),
            shown.join(", ")
        )));
    }
    let mut slots: Vec<Option<Node>> = nodes.into_iter().map(Some).collect();
    Ok(order.into_iter().map(|i| slots[i].take().expect("each node is ordered once")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::proto::tensor_shape_proto::Dimension;
    use crate::onnx::proto::{type_proto, TensorShapeProto, ValueInfoProto};
    use crate::onnx::tensor::from_tensor;
    use kiln_runtime::DType;
    use prost::Message;
    use std::path::PathBuf;

    fn node_model(case: &str) -> Option<PathBuf> {
        let root = std::env::var_os("KILN_CACHE")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/kiln")))?;
        let p = root.join("onnx-1.22.0/onnx/backend/test/data/node").join(case).join("model.onnx");
        if p.exists() {
            Some(p)
        } else {
            eprintln!("skipping: {} not found", p.display());
            None
        }
    }

    fn names(g: &Graph, ids: &[ValueId]) -> Vec<String> {
        ids.iter().map(|&v| g.values[v].name.clone()).collect()
    }

    #[test]
    fn node_suite_add() {
        let Some(p) = node_model("test_add") else { return };
        let m = import_model(&p).unwrap();
        assert_eq!(m.source_name, "model.onnx");
        assert_eq!(m.source_sha256.len(), 64);
        assert_eq!(m.producer, "backend-test");
        assert!(m.opsets.iter().any(|(d, v)| d.is_empty() && *v >= 7));
        let g = &m.graph;
        assert_eq!(names(g, &g.inputs), ["x", "y"]);
        assert_eq!(names(g, &g.outputs), ["sum"]);
        assert_eq!(g.nodes.len(), 1);
        let n = &g.nodes[0];
        assert_eq!((n.op.as_str(), n.domain.as_str()), ("Add", ""));
        assert_eq!(n.opset, m.opsets.iter().find(|(d, _)| d.is_empty()).unwrap().1);
        assert_eq!(n.inputs, vec![Some(g.inputs[0]), Some(g.inputs[1])]);
        let f = |n| Dim::Fixed(n);
        assert_eq!(g.values[g.inputs[0]].ty, Type::tensor(DType::F32, vec![f(3), f(4), f(5)]));
    }

    #[test]
    fn node_suite_control_flow() {
        let Some(p) = node_model("test_if") else { return };
        let m = import_model(&p).unwrap();
        let n = &m.graph.nodes[0];
        assert_eq!(n.op, "If");
        let then = match n.attr("then_branch") {
            Some(AttrValue::Graph(g)) => g,
            other => panic!("{other:?}"),
        };
        // The branch is just a Constant, which becomes a constant output.
        assert!(then.nodes.is_empty());
        assert_eq!(
            then.konst(then.outputs[0]).unwrap().view::<f32>().unwrap(),
            &[1.0, 2.0, 3.0, 4.0, 5.0]
        );

        let m = import_model(&node_model("test_loop11").unwrap()).unwrap();
        let body = m.graph.nodes[0].subgraphs().next().unwrap();
        assert_eq!(names(body, &body.inputs), ["iter_count", "cond_in", "y_in"]);
        assert_eq!(names(body, &body.outputs), ["cond_out", "y_out", "scan_out"]);
        assert!(body.captures.is_empty());
        assert_eq!(body.values.iter().filter(|v| v.konst.is_some()).count(), 2);
        assert_eq!(body.nodes.len(), 7);
        assert_eq!(body.nodes[0].opset, 11);

        let m = import_model(&node_model("test_scan9_sum").unwrap()).unwrap();
        assert_eq!(m.graph.nodes[0].attr_int("num_scan_inputs"), Some(1));
        assert_eq!(m.graph.nodes[0].opset, 9);

        // A Loop body reading an outer value: `delta` becomes a capture.
        let m = import_model(&node_model("test_range_float_type_positive_delta_expanded").unwrap())
            .unwrap();
        let lp = m.graph.nodes.iter().find(|n| n.op == "Loop").unwrap();
        let body = lp.subgraphs().next().unwrap();
        assert_eq!(names(body, &body.captures), ["delta"]);
        assert_eq!(body.values[body.captures[0]].ty.dtype(), Some(DType::F32));
        // The Loop comes after everything producing its inputs.
        let pos = m.graph.nodes.iter().position(|n| n.op == "Loop").unwrap();
        assert_eq!(pos, m.graph.nodes.len() - 1);
    }

    #[test]
    fn node_suite_sequences_and_optionals() {
        let Some(p) = node_model("test_identity_opt") else { return };
        let m = import_model(&p).unwrap();
        let g = &m.graph;
        let want = Type::Optional(Box::new(Type::Sequence(Box::new(Type::tensor(
            DType::F32,
            vec![Dim::Fixed(5)],
        )))));
        assert_eq!(g.values[g.inputs[0]].ty, want);
    }

    // ---- hand-built models ----

    fn vi(name: &str, dtype: DType, dims: &[&str]) -> ValueInfoProto {
        let dim = dims
            .iter()
            .map(|d| Dimension {
                value: Some(match d.parse::<i64>() {
                    Ok(v) => DimValue::DimValue(v),
                    Err(_) => DimValue::DimParam(d.to_string()),
                }),
                denotation: String::new(),
            })
            .collect();
        ValueInfoProto {
            name: name.into(),
            r#type: Some(TypeProto {
                value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                    elem_type: dtype.onnx_code(),
                    shape: Some(TensorShapeProto { dim }),
                })),
                denotation: String::new(),
            }),
            ..Default::default()
        }
    }

    fn untyped(name: &str) -> ValueInfoProto {
        ValueInfoProto { name: name.into(), ..Default::default() }
    }

    fn node(op: &str, inputs: &[&str], outputs: &[&str]) -> NodeProto {
        NodeProto {
            op_type: op.into(),
            name: format!("{op}:{}", outputs.join(",")),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn with_attr(mut n: NodeProto, a: AttributeProto) -> NodeProto {
        n.attribute.push(a);
        n
    }

    fn attr_graph(name: &str, g: GraphProto) -> AttributeProto {
        AttributeProto {
            name: name.into(),
            r#type: AttributeType::Graph as i32,
            g: Some(g),
            ..Default::default()
        }
    }

    fn attr_f(name: &str, f: f32) -> AttributeProto {
        AttributeProto {
            name: name.into(),
            r#type: AttributeType::Float as i32,
            f: Some(f),
            ..Default::default()
        }
    }

    fn model(graph: GraphProto, opset: i64) -> ModelProto {
        ModelProto {
            ir_version: 9,
            producer_name: "test".into(),
            producer_version: "1.0".into(),
            opset_import: vec![OperatorSetIdProto { domain: String::new(), version: opset }],
            graph: Some(graph),
            ..Default::default()
        }
    }

    fn import(m: &ModelProto) -> Result<Model> {
        import_proto(m, Path::new("."), "00".into(), "test.onnx".into())
    }

    fn err_text(m: &ModelProto) -> String {
        match import(m) {
            Err(e @ Error::InvalidModel(_)) => e.to_string(),
            other => panic!("expected InvalidModel, got {other:?}"),
        }
    }

    #[test]
    fn sorts_nodes_and_folds_constants_and_initializers() {
        let w = from_tensor(&Tensor::from_vec(&[2], vec![1.0f32, 2.0]).unwrap(), "w").unwrap();
        let g = GraphProto {
            name: "main".into(),
            // IR < 4 style: the initializer is also listed as an input.
            input: vec![vi("x", DType::F32, &["N", "2"]), vi("w", DType::F32, &["2"])],
            output: vec![vi("z", DType::F32, &["N", "2"])],
            initializer: vec![w],
            node: vec![
                node("Mul", &["y", "c"], &["z"]),
                with_attr(
                    node("Constant", &[], &["c"]),
                    AttributeProto {
                        name: "value_floats".into(),
                        r#type: AttributeType::Floats as i32,
                        floats: vec![3.0, 4.0],
                        ..Default::default()
                    },
                ),
                node("Add", &["x", "w"], &["y"]),
            ],
            ..Default::default()
        };
        let mut m = model(g, 17);
        m.doc_string = "doc".into();
        let m = import(&m).unwrap();
        let g = &m.graph;
        assert_eq!(names(g, &g.inputs), ["x"]);
        let ops: Vec<&str> = g.nodes.iter().map(|n| n.op.as_str()).collect();
        assert_eq!(ops, ["Add", "Mul"]);
        let c = g.nodes[1].input(1).unwrap();
        assert_eq!(g.konst(c).unwrap().view::<f32>().unwrap(), &[3.0, 4.0]);
        let w = g.nodes[0].input(1).unwrap();
        assert_eq!(g.konst(w).unwrap().view::<f32>().unwrap(), &[1.0, 2.0]);
        assert_eq!(g.values[g.inputs[0]].ty.shape().unwrap()[0], Dim::Sym("N".into()));
        assert_eq!(m.producer, "test 1.0");
        assert_eq!(m.props, vec![("doc_string".to_string(), "doc".to_string())]);
        assert_eq!(m.source_name, "test.onnx");
    }

    #[test]
    fn malformed_graphs_are_errors() {
        let cyclic = GraphProto {
            input: vec![vi("x", DType::F32, &["1"])],
            output: vec![untyped("b")],
            node: vec![node("Add", &["x", "b"], &["a"]), node("Relu", &["a"], &["b"])],
            ..Default::default()
        };
        assert!(err_text(&model(cyclic, 17)).contains("cycle"));

        let missing = GraphProto {
            input: vec![vi("x", DType::F32, &["1"])],
            output: vec![untyped("a")],
            node: vec![node("Add", &["x", "nope"], &["a"])],
            ..Default::default()
        };
        let e = err_text(&model(missing, 17));
        assert!(e.contains("nope") && e.contains("Add"), "{e}");

        let dup = GraphProto {
            input: vec![vi("x", DType::F32, &["1"])],
            output: vec![untyped("a")],
            node: vec![node("Relu", &["x"], &["a"]), node("Abs", &["x"], &["a"])],
            ..Default::default()
        };
        assert!(err_text(&model(dup, 17)).contains("redefines 'a'"));

        let self_loop = GraphProto {
            output: vec![untyped("a")],
            node: vec![node("Relu", &["a"], &["a"])],
            ..Default::default()
        };
        assert!(import(&model(self_loop, 17)).is_err());

        let no_output = GraphProto { output: vec![untyped("ghost")], ..Default::default() };
        assert!(err_text(&model(no_output, 17)).contains("ghost"));

        let ok = GraphProto {
            input: vec![vi("x", DType::F32, &["1"])],
            output: vec![untyped("a")],
            node: vec![node("Relu", &["x"], &["a"])],
            ..Default::default()
        };
        assert!(import(&model(ok.clone(), 17)).is_ok());
        assert!(err_text(&model(ok.clone(), 0)).contains("opset 0"));
        assert!(err_text(&model(ok.clone(), 99)).contains("opset 99"));
        let mut no_onnx = model(ok, 17);
        no_onnx.opset_import[0].domain = "com.other".into();
        assert!(import(&no_onnx).is_err());
    }

    #[test]
    fn bad_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let good = GraphProto {
            input: vec![vi("x", DType::F32, &["1"])],
            output: vec![untyped("a")],
            node: vec![node("Relu", &["x"], &["a"])],
            ..Default::default()
        };
        let bytes = model(good, 17).encode_to_vec();
        let p = dir.path().join("m.onnx");
        std::fs::write(&p, &bytes).unwrap();
        let m = import_model(&p).unwrap();
        assert_eq!(m.source_sha256, crate::onnx::load::sha256_hex(&bytes));
        for cut in [1, bytes.len() / 2, bytes.len() - 1] {
            std::fs::write(&p, &bytes[..cut]).unwrap();
            assert!(import_model(&p).is_err(), "truncated at {cut}");
        }
        std::fs::write(&p, b"\xff\xfe garbage \x00\x01").unwrap();
        assert!(import_model(&p).is_err());
        // The repository's own broken fixtures.
        let bad = Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/bad");
        for f in ["cyclic.onnx", "missing_input.onnx"] {
            let p = bad.join(f);
            if p.exists() {
                assert!(matches!(import_model(&p), Err(Error::InvalidModel(_))), "{f}");
            }
        }
    }

    #[test]
    fn nested_subgraphs_capture_transitively() {
        // main: o = If(c) { then: If(c) { then: Relu(x_outer) } else: Identity(x_outer) }
        let inner_then = GraphProto {
            name: "inner_then".into(),
            output: vec![untyped("r")],
            node: vec![node("Relu", &["x"], &["r"])],
            ..Default::default()
        };
        let inner_else = GraphProto {
            name: "inner_else".into(),
            output: vec![untyped("x")],
            ..Default::default()
        };
        let mid = GraphProto {
            name: "mid".into(),
            output: vec![untyped("m")],
            node: vec![with_attr(
                with_attr(node("If", &["c"], &["m"]), attr_graph("then_branch", inner_then)),
                attr_graph("else_branch", inner_else),
            )],
            ..Default::default()
        };
        let mid_else = GraphProto {
            name: "mid_else".into(),
            output: vec![untyped("e")],
            node: vec![node("Neg", &["x"], &["e"])],
            ..Default::default()
        };
        let main = GraphProto {
            name: "main".into(),
            input: vec![vi("c", DType::Bool, &[]), vi("x0", DType::F32, &["2"])],
            output: vec![untyped("o")],
            node: vec![
                with_attr(
                    with_attr(node("If", &["c"], &["o"]), attr_graph("then_branch", mid)),
                    attr_graph("else_branch", mid_else),
                ),
                // Produced after its reader in file order: sorting must put it first.
                node("Relu", &["x0"], &["x"]),
            ],
            ..Default::default()
        };
        let m = import(&model(main, 16)).unwrap();
        let g = &m.graph;
        assert_eq!(g.nodes[0].op, "Relu", "the capture's producer comes first");
        let mid = match g.nodes[1].attr("then_branch") {
            Some(AttrValue::Graph(g)) => g,
            other => panic!("{other:?}"),
        };
        let mut caps = names(mid, &mid.captures);
        caps.sort();
        assert_eq!(caps, ["c", "x"], "the middle graph captures what its inner graphs read");
        let inner = mid.nodes[0].subgraphs().next().unwrap();
        assert_eq!(names(inner, &inner.captures), ["x"]);
        let inner_else = mid.nodes[0].subgraphs().nth(1).unwrap();
        assert_eq!(inner_else.outputs, inner_else.captures, "an output may be a captured value");
        assert_eq!(
            mid.nodes[0].inputs,
            vec![Some(
                mid.captures[names(mid, &mid.captures).iter().position(|n| n == "c").unwrap()]
            )]
        );

        // A subgraph reading a name nobody defines.
        let bad_branch = GraphProto {
            output: vec![untyped("r")],
            node: vec![node("Relu", &["zzz"], &["r"])],
            ..Default::default()
        };
        let main = GraphProto {
            input: vec![vi("c", DType::Bool, &[])],
            output: vec![untyped("o")],
            node: vec![with_attr(
                with_attr(
                    node("If", &["c"], &["o"]),
                    attr_graph("then_branch", bad_branch.clone()),
                ),
                attr_graph("else_branch", bad_branch),
            )],
            ..Default::default()
        };
        let e = err_text(&model(main, 16));
        assert!(e.contains("zzz"), "{e}");
    }

    fn function(name: &str, domain: &str) -> FunctionProto {
        // Y = LeakyRelu(Mul(X, X)) with alpha from the caller (default 0.5); Z = Constant 7.
        FunctionProto {
            name: name.into(),
            domain: domain.into(),
            input: vec!["X".into()],
            output: vec!["Y".into(), "Z".into()],
            attribute_proto: vec![attr_f("alpha", 0.5)],
            opset_import: vec![OperatorSetIdProto { domain: String::new(), version: 13 }],
            node: vec![
                node("Mul", &["X", "X"], &["t"]),
                with_attr(
                    node("LeakyRelu", &["t"], &["Y"]),
                    AttributeProto {
                        name: "alpha".into(),
                        ref_attr_name: "alpha".into(),
                        r#type: AttributeType::Float as i32,
                        ..Default::default()
                    },
                ),
                with_attr(
                    node("Constant", &[], &["Z"]),
                    AttributeProto {
                        name: "value_int".into(),
                        r#type: AttributeType::Int as i32,
                        i: Some(7),
                        ..Default::default()
                    },
                ),
            ],
            ..Default::default()
        }
    }

    #[test]
    fn functions_are_inlined() {
        let mut call1 = node("Square", &["a"], &["b"]);
        call1.domain = "my.fns".into();
        call1.attribute.push(attr_f("alpha", 0.25));
        let mut call2 = node("Square", &["b"], &["c", "k"]);
        call2.domain = "my.fns".into();
        let g = GraphProto {
            input: vec![vi("a", DType::F32, &["3"])],
            output: vec![untyped("c"), untyped("k")],
            node: vec![call1, call2],
            ..Default::default()
        };
        let mut m = model(g, 18);
        m.opset_import.push(OperatorSetIdProto { domain: "my.fns".into(), version: 1 });
        m.functions.push(function("Square", "my.fns"));
        let m = import(&m).unwrap();
        let g = &m.graph;
        let ops: Vec<&str> = g.nodes.iter().map(|n| n.op.as_str()).collect();
        assert_eq!(ops, ["Mul", "LeakyRelu", "Mul", "LeakyRelu"]);
        assert!(
            g.nodes.iter().all(|n| n.domain.is_empty() && n.opset == 13),
            "function opsets apply"
        );
        assert_eq!(g.nodes[1].attr_float("alpha"), Some(0.25), "caller's attribute");
        assert_eq!(g.nodes[3].attr_float("alpha"), Some(0.5), "function default");
        // Inner values are distinct per call; formal names map to the actual ones.
        assert_ne!(g.nodes[0].output(0), g.nodes[2].output(0));
        assert_eq!(g.values[g.nodes[1].output(0).unwrap()].name, "b");
        assert_eq!(g.nodes[2].input(0), g.nodes[1].output(0));
        assert_eq!(names(g, &g.outputs), ["c", "k"]);
        assert_eq!(g.konst(g.outputs[1]).unwrap().item::<i64>().unwrap(), 7);
        let unique: HashSet<&str> = g.values.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(unique.len(), g.values.len());
    }

    #[test]
    fn nested_and_recursive_functions() {
        // Outer(X) = Square(X) with a subgraph in the body reading a function-local value.
        let mut inner_call = node("Square", &["X"], &["s"]);
        inner_call.domain = "my.fns".into();
        let branch = GraphProto {
            output: vec![untyped("r")],
            node: vec![node("Relu", &["s"], &["r"])],
            ..Default::default()
        };
        let outer = FunctionProto {
            name: "Outer".into(),
            domain: "my.fns".into(),
            input: vec!["X".into()],
            output: vec!["Y".into()],
            opset_import: vec![OperatorSetIdProto { domain: String::new(), version: 11 }],
            node: vec![
                inner_call,
                node("Shape", &["s"], &["shape"]),
                node("Size", &["shape"], &["n"]),
                node("Cast", &["n"], &["cond"]),
                with_attr(
                    with_attr(
                        node("If", &["cond"], &["Y"]),
                        attr_graph("then_branch", branch.clone()),
                    ),
                    attr_graph("else_branch", branch),
                ),
            ],
            ..Default::default()
        };
        let mut call = node("Outer", &["a"], &["b"]);
        call.domain = "my.fns".into();
        let g = GraphProto {
            input: vec![vi("a", DType::F32, &["3"])],
            output: vec![untyped("b")],
            node: vec![call],
            ..Default::default()
        };
        let mut m = model(g, 18);
        m.functions = vec![outer.clone(), function("Square", "my.fns")];
        let imported = import(&m).unwrap();
        let g = &imported.graph;
        let iff = g.nodes.iter().find(|n| n.op == "If").unwrap();
        assert_eq!(iff.opset, 11);
        let then = iff.subgraphs().next().unwrap();
        let cap = &then.values[then.captures[0]].name;
        let s_val = g.nodes.iter().find(|n| n.op == "LeakyRelu").unwrap().output(0).unwrap();
        assert_eq!(cap, &g.values[s_val].name, "subgraph free names follow the renaming");
        assert_eq!(g.nodes.iter().find(|n| n.op == "Mul").unwrap().opset, 13);

        // A function calling itself is caught by the depth limit.
        let mut rec = function("Loopy", "my.fns");
        let mut self_call = node("Loopy", &["X"], &["Y"]);
        self_call.domain = "my.fns".into();
        rec.node = vec![self_call];
        rec.output = vec!["Y".into()];
        let mut call = node("Loopy", &["a"], &["b"]);
        call.domain = "my.fns".into();
        let g = GraphProto {
            input: vec![vi("a", DType::F32, &["3"])],
            output: vec![untyped("b")],
            node: vec![call],
            ..Default::default()
        };
        let mut m = model(g, 18);
        m.functions = vec![rec];
        assert!(err_text(&m).contains("nest deeper"));
    }

    #[test]
    fn types_are_carried() {
        let seq = ValueInfoProto {
            name: "s".into(),
            r#type: Some(TypeProto {
                value: Some(type_proto::Value::SequenceType(type_proto::Sequence {
                    elem_type: Some(Box::new(vi("", DType::I64, &["?x"]).r#type.unwrap())),
                })),
                denotation: String::new(),
            }),
            ..Default::default()
        };
        let unknown_dim = ValueInfoProto {
            name: "u".into(),
            r#type: Some(TypeProto {
                value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                    elem_type: 1,
                    shape: Some(TensorShapeProto { dim: vec![Dimension::default()] }),
                })),
                denotation: String::new(),
            }),
            ..Default::default()
        };
        let g = GraphProto {
            input: vec![seq, unknown_dim, untyped("n")],
            output: vec![untyped("s"), untyped("u"), untyped("n")],
            ..Default::default()
        };
        let m = import(&model(g, 18)).unwrap();
        let g = &m.graph;
        let t = |i: usize| &g.values[g.inputs[i]].ty;
        assert_eq!(
            t(0),
            &Type::Sequence(Box::new(Type::tensor(DType::I64, vec![Dim::Sym("?x".into())])))
        );
        assert_eq!(
            t(1),
            &Type::Tensor { dtype: Some(DType::F32), shape: Some(vec![Dim::Unknown]) }
        );
        assert_eq!(t(2), &Type::Unknown);

        let map = ValueInfoProto {
            name: "m".into(),
            r#type: Some(TypeProto {
                value: Some(type_proto::Value::MapType(type_proto::Map {
                    key_type: 7,
                    value_type: None,
                })),
                denotation: String::new(),
            }),
            ..Default::default()
        };
        let g = GraphProto { input: vec![map], output: vec![untyped("m")], ..Default::default() };
        assert!(import(&model(g, 18)).is_err());
    }
}
