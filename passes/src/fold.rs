//! Constant folding: evaluates at compile time every node whose inputs are all known, using the
//! CPU backend's kernels, and `Shape`/`Size` (and `Gather` over a `Shape`) wherever the needed dims
//! are fixed. Exporters emit long Shape → Gather → Concat → Reshape chains; with static dims these
//! collapse to one constant shape. Types are re-inferred between rounds so newly fixed shapes feed
//! the next round.

use kiln_backends::cpu::eval_step;
use kiln_compiler::infer::infer_types;
use std::collections::HashMap;

use kiln_compiler::ir::{AttrValue, Dim, Graph, Model, Node, Type};
use kiln_compiler::lower::lower_node;
use kiln_compiler::pass::Pass;
use kiln_compiler::Result;
use kiln_runtime::Tensor;

pub struct ConstantFolding {
    /// A folded result larger than this (and larger than its inputs) stays a runtime computation,
    /// so folding never bloats the artifact (e.g. a ConstantOfShape of a huge shape).
    pub max_grow_bytes: usize,
}

impl Default for ConstantFolding {
    fn default() -> Self {
        ConstantFolding { max_grow_bytes: 1 << 20 }
    }
}

/// Ops whose result is not a function of their inputs alone.
const NONDETERMINISTIC: &[&str] = &[
    "RandomNormal",
    "RandomUniform",
    "RandomNormalLike",
    "RandomUniformLike",
    "Multinomial",
    "Bernoulli",
];

fn fixed_dims(g: &Graph, v: usize) -> Option<Vec<Option<usize>>> {
    g.values[v].ty.shape().map(|s| {
        s.iter().map(|d| if let Dim::Fixed(n) = d { Some(*n) } else { None }).collect()
    })
}

/// The dims a `Shape` node reports (honouring start/end, opset 15).
fn shape_slice(node: &Node, dims: &[Option<usize>]) -> Vec<Option<usize>> {
    let r = dims.len() as i64;
    let clamp = |x: i64| (if x < 0 { x + r } else { x }).clamp(0, r) as usize;
    let start = clamp(node.attr_int("start").unwrap_or(0));
    let end = clamp(node.attr_int("end").unwrap_or(r));
    if start >= end {
        return vec![];
    }
    dims[start..end].to_vec()
}

fn i64_tensor(v: Vec<i64>, scalar: bool) -> Tensor {
    let shape = if scalar { vec![] } else { vec![v.len()] };
    Tensor::from_vec(&shape, v).expect("shape matches")
}

/// Fold a node using shape knowledge only (its data inputs need not be constant).
fn fold_by_shape(node: &Node, g: &Graph, producers: &[Option<usize>]) -> Option<Tensor> {
    if !node.domain.is_empty() && node.domain != "ai.onnx" {
        return None;
    }
    match node.op.as_str() {
        "Shape" => {
            let dims = shape_slice(node, &fixed_dims(g, node.input(0)?)?);
            let v: Option<Vec<i64>> = dims.iter().map(|d| d.map(|n| n as i64)).collect();
            Some(i64_tensor(v?, false))
        }
        "Size" => {
            let dims = fixed_dims(g, node.input(0)?)?;
            let n: Option<usize> = dims.iter().copied().product();
            Some(i64_tensor(vec![n? as i64], true))
        }
        "Gather" => {
            // Gather(Shape(x), const idx) where the picked dims are fixed.
            let data = node.input(0)?;
            let shape_node = &g.nodes[producers[data]?];
            if shape_node.op != "Shape" || g.konst(data).is_some() {
                return None;
            }
            let dims = shape_slice(shape_node, &fixed_dims(g, shape_node.input(0)?)?);
            let idx_t = g.konst(node.input(1)?)?;
            let idx = idx_t.to_i64_vec().ok()?;
            let n = dims.len() as i64;
            let picked: Option<Vec<i64>> = idx
                .iter()
                .map(|&i| {
                    let i = if i < 0 { i + n } else { i };
                    if i < 0 || i >= n {
                        return None;
                    }
                    dims[i as usize].map(|d| d as i64)
                })
                .collect();
            let picked = picked?;
            let t = Tensor::from_vec(idx_t.shape(), picked).ok()?;
            Some(t)
        }
        _ => None,
    }
}

impl ConstantFolding {
    fn try_fold(&self, node: &Node, g: &Graph) -> Option<Vec<Tensor>> {
        if node.subgraphs().next().is_some() || NONDETERMINISTIC.contains(&node.op.as_str()) {
            return None;
        }
        let mut inputs = Vec::with_capacity(node.inputs.len());
        let mut in_bytes = 0;
        for i in &node.inputs {
            match i {
                None => inputs.push(None),
                Some(v) => {
                    let t = g.konst(*v)?.clone().aligned();
                    in_bytes += t.bytes().len();
                    inputs.push(Some(t));
                }
            }
        }
        let step = lower_node(node, g).ok()?;
        // A kernel error here is left for run time, where it is reported with the node's context.
        let outs = eval_step(&step, &inputs).ok()?;
        let out_bytes: usize = outs.iter().map(|t| t.bytes().len()).sum();
        if out_bytes > self.max_grow_bytes && out_bytes > in_bytes {
            return None;
        }
        Some(outs)
    }

    fn fold_graph(&self, g: &mut Graph, outer: &HashMap<String, Tensor>) -> Result<usize> {
        let mut folded = 0;
        let nodes = std::mem::take(&mut g.nodes);
        let mut kept = Vec::with_capacity(nodes.len());
        for node in nodes {
            g.nodes = kept; // producers() must see the nodes kept so far
            let producers = g.producers();
            let by_shape = if node.outputs.len() == 1 {
                fold_by_shape(&node, g, &producers).map(|t| vec![t])
            } else {
                None
            };
            kept = std::mem::take(&mut g.nodes);
            match by_shape.or_else(|| self.try_fold(&node, g)) {
                Some(outs) if outs.len() >= node.outputs.iter().flatten().count() => {
                    for (o, t) in node.outputs.iter().zip(outs) {
                        if let Some(v) = o {
                            g.values[*v].ty = const_type(&t);
                            g.values[*v].konst = Some(t);
                        }
                    }
                    folded += 1;
                }
                _ => kept.push(node),
            }
        }
        g.nodes = kept;
        let Graph { nodes, values, .. } = g;
        for n in nodes.iter_mut() {
            for a in &mut n.attrs {
                let subs: Vec<&mut Graph> = match &mut a.value {
                    AttrValue::Graph(sg) => vec![sg],
                    AttrValue::Graphs(gs) => gs.iter_mut().collect(),
                    _ => vec![],
                };
                for sg in subs {
                    // The constants this subgraph (or one nested in it) reads from enclosing
                    // scopes, the nearest scope first.
                    let mut scope = HashMap::new();
                    for name in sg.captured_names() {
                        let own = values.iter().find(|v| v.name == name).and_then(|v| v.konst.as_ref());
                        if let Some(t) = own.or_else(|| outer.get(&name)) {
                            scope.insert(name, t.clone());
                        }
                    }
                    folded += self.fold_subgraph(sg, &scope)?;
                }
            }
        }
        Ok(folded)
    }

    /// Fold inside a subgraph with its captured constants visible: they are made constants of
    /// the subgraph for the folding (Silero VAD's If branches slice and concatenate outer weights
    /// on every run otherwise), and go back to being captures where something still reads them,
    /// so no weight is duplicated into the subgraph.
    fn fold_subgraph(&self, sg: &mut Graph, scope: &HashMap<String, Tensor>) -> Result<usize> {
        let mut inlined = Vec::new();
        let captures = std::mem::take(&mut sg.captures);
        for c in captures {
            match scope.get(&sg.values[c].name) {
                Some(t) => {
                    let ty = std::mem::replace(&mut sg.values[c].ty, const_type(t));
                    sg.values[c].konst = Some(t.clone());
                    inlined.push((c, ty));
                }
                None => sg.captures.push(c),
            }
        }
        let folded = self.fold_graph(sg, scope)?;
        let uses = sg.consumers();
        for (c, ty) in inlined {
            if !uses[c].is_empty() || sg.outputs.contains(&c) {
                sg.values[c].konst = None;
                sg.values[c].ty = ty;
                sg.captures.push(c);
            }
        }
        Ok(folded)
    }
}

fn const_type(t: &Tensor) -> Type {
    Type::tensor(t.dtype(), t.shape().iter().map(|&d| Dim::Fixed(d)).collect())
}

impl Pass for ConstantFolding {
    fn name(&self) -> &'static str {
        "fold"
    }

    fn run(&self, model: &mut Model) -> Result<(usize, Vec<String>)> {
        let mut total = 0;
        for _ in 0..16 {
            infer_types(model)?;
            let n = self.fold_graph(&mut model.graph, &HashMap::new())?;
            total += n;
            if n == 0 {
                break;
            }
        }
        Ok((total, vec![]))
    }
}
