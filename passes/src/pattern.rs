//! Declarative graph patterns for fusion passes.
//!
//! A pattern is an expression tree written with ordinary operators: `(x.clone() * 0.5) *
//! (erf(x.clone() / SQRT_2) + 1.0)` is GELU. Leaves are symbols (`sym("x")`: any value, the same
//! name must bind the same value everywhere), constants (`konst("w")`) and scalars (`1.0`: a
//! constant whose every element equals it). `Add`/`Mul` match either operand order. A `Matcher`
//! finds the pattern rooted at a node and checks that every interior value is used only inside
//! the match, so replacing the match by one node never changes what other nodes read.

use std::collections::{HashMap, HashSet};
use std::ops::{Add, Div, Mul, Sub};

use kiln_compiler::ir::{Graph, Node, ValueId};
use kiln_runtime::Tensor;

#[derive(Clone, Debug)]
pub enum Pat {
    /// Any value, bound by name.
    Sym(&'static str),
    /// A constant value, bound by name.
    Const(&'static str),
    /// A float constant whose every element is within 1e-4 (relative) of this.
    Scalar(f32),
    /// Output 0 of an ai.onnx node of this op type. Inputs beyond those listed must be absent or
    /// constant (e.g. ReduceMean's axes input); the fusion checks their meaning.
    Op { op: &'static str, inputs: Vec<Pat>, commutative: bool, bind: Option<&'static str> },
}

pub fn sym(name: &'static str) -> Pat {
    Pat::Sym(name)
}

pub fn konst(name: &'static str) -> Pat {
    Pat::Const(name)
}

pub fn op(op: &'static str, inputs: Vec<Pat>) -> Pat {
    Pat::Op { op, inputs, commutative: false, bind: None }
}

pub fn unary(name: &'static str, x: Pat) -> Pat {
    op(name, vec![x])
}

pub fn erf(x: Pat) -> Pat {
    unary("Erf", x)
}

pub fn tanh(x: Pat) -> Pat {
    unary("Tanh", x)
}

pub fn sqrt(x: Pat) -> Pat {
    unary("Sqrt", x)
}

pub fn pow(x: Pat, y: impl Into<Pat>) -> Pat {
    op("Pow", vec![x, y.into()])
}

impl Pat {
    /// Bind the node this pattern matches under `name` (to read its attributes).
    pub fn named(self, name: &'static str) -> Pat {
        match self {
            Pat::Op { op, inputs, commutative, .. } => Pat::Op { op, inputs, commutative, bind: Some(name) },
            other => other,
        }
    }
}

impl From<f32> for Pat {
    fn from(v: f32) -> Pat {
        Pat::Scalar(v)
    }
}

macro_rules! binop {
    ($tr:ident, $f:ident, $op:literal, $comm:literal) => {
        impl<R: Into<Pat>> $tr<R> for Pat {
            type Output = Pat;
            fn $f(self, rhs: R) -> Pat {
                Pat::Op { op: $op, inputs: vec![self, rhs.into()], commutative: $comm, bind: None }
            }
        }
        impl $tr<Pat> for f32 {
            type Output = Pat;
            fn $f(self, rhs: Pat) -> Pat {
                Pat::Op { op: $op, inputs: vec![Pat::Scalar(self), rhs], commutative: $comm, bind: None }
            }
        }
    };
}
binop!(Add, add, "Add", true);
binop!(Mul, mul, "Mul", true);
binop!(Sub, sub, "Sub", false);
binop!(Div, div, "Div", false);

/// What a match bound: values by symbol/constant name, nodes by `named`, and every node matched
/// (the root first).
#[derive(Clone, Debug, Default)]
pub struct Match {
    pub values: HashMap<&'static str, ValueId>,
    pub nodes: HashMap<&'static str, usize>,
    pub matched: Vec<usize>,
}

impl Match {
    pub fn value(&self, name: &str) -> ValueId {
        self.values[name]
    }

    pub fn node(&self, name: &str) -> usize {
        self.nodes[name]
    }
}

/// Use/definition facts of one graph, computed once per round of rewrites.
pub struct Matcher<'g> {
    pub g: &'g Graph,
    producers: Vec<Option<usize>>,
    consumers: Vec<Vec<usize>>,
    outputs: HashSet<ValueId>,
}

fn is_onnx(n: &Node) -> bool {
    n.domain.is_empty() || n.domain == "ai.onnx"
}

impl<'g> Matcher<'g> {
    pub fn new(g: &'g Graph) -> Matcher<'g> {
        Matcher { g, producers: g.producers(), consumers: g.consumers(), outputs: g.outputs.iter().copied().collect() }
    }

    /// Nodes reading value `v`.
    pub fn consumers(&self, v: ValueId) -> &[usize] {
        &self.consumers[v]
    }

    pub fn producer(&self, v: ValueId) -> Option<usize> {
        self.producers[v]
    }

    /// Whether `v` is read by anything besides nodes in `inside` (graph outputs count).
    pub fn escapes(&self, v: ValueId, inside: &HashSet<usize>) -> bool {
        self.outputs.contains(&v) || self.consumers[v].iter().any(|c| !inside.contains(c))
    }

    /// Match `pat` (an `Op` pattern) rooted at node `root`.
    pub fn at(&self, pat: &Pat, root: usize) -> Option<Match> {
        let out = self.g.nodes[root].output(0)?;
        let mut m = Match::default();
        if !self.value(pat, out, &mut m) {
            return None;
        }
        let inside: HashSet<usize> = m.matched.iter().copied().collect();
        for &ni in &m.matched[1..] {
            let n = &self.g.nodes[ni];
            if n.outputs.iter().flatten().any(|&v| self.escapes(v, &inside)) {
                return None;
            }
        }
        Some(m)
    }

    fn scalar_ok(&self, v: ValueId, want: f32) -> bool {
        let Some(t) = self.g.konst(v) else { return false };
        let Ok(vals) = t.to_f64_vec() else { return false };
        !vals.is_empty() && vals.iter().all(|&x| (x - want as f64).abs() <= 1e-4 * (want.abs() as f64).max(1e-3))
    }

    fn value(&self, pat: &Pat, v: ValueId, m: &mut Match) -> bool {
        match pat {
            Pat::Sym(name) | Pat::Const(name) => {
                if matches!(pat, Pat::Const(_)) && self.g.konst(v).is_none() {
                    return false;
                }
                match m.values.get(name) {
                    Some(&bound) => bound == v,
                    None => {
                        m.values.insert(name, v);
                        true
                    }
                }
            }
            Pat::Scalar(want) => self.scalar_ok(v, *want),
            Pat::Op { op, inputs, commutative, bind } => {
                let Some(ni) = self.producers[v] else { return false };
                let n = &self.g.nodes[ni];
                if n.op != *op || !is_onnx(n) || n.output(0) != Some(v) || n.inputs.len() < inputs.len() {
                    return false;
                }
                if m.matched.contains(&ni) {
                    // A node reached twice (a shared subexpression such as x - mean) must be bound
                    // consistently, which the value bindings below it already ensure.
                    return true;
                }
                if n.inputs[inputs.len()..].iter().flatten().any(|&extra| self.g.konst(extra).is_none()) {
                    return false;
                }
                let orders: &[[usize; 2]] = if *commutative && inputs.len() == 2 { &[[0, 1], [1, 0]] } else { &[[0, 1]] };
                for order in orders {
                    let saved = m.clone();
                    m.matched.push(ni);
                    if let Some(b) = bind {
                        m.nodes.insert(b, ni);
                    }
                    let ok = inputs.iter().enumerate().all(|(i, p)| {
                        let src = if inputs.len() == 2 { order[i] } else { i };
                        n.input(src).is_some_and(|iv| self.value(p, iv, m))
                    });
                    if ok {
                        return true;
                    }
                    *m = saved;
                }
                false
            }
        }
    }
}

/// Constants a rewrite creates (new weights); their ids are known before they are added.
pub struct NewConsts {
    base: usize,
    items: Vec<(String, Tensor)>,
}

impl NewConsts {
    pub fn add(&mut self, name: impl Into<String>, t: Tensor) -> ValueId {
        self.items.push((name.into(), t));
        self.base + self.items.len() - 1
    }
}

/// Apply `rewrite` wherever `pat` matches, until nothing more matches. `rewrite` gets the match
/// and returns the node replacing the matched subgraph (it must produce the root's outputs), or
/// None to leave this match alone. Returns how many rewrites were made.
pub fn rewrite_all(g: &mut Graph, pat: &Pat, mut rewrite: impl FnMut(&Matcher, &Match, &mut NewConsts) -> Option<Node>) -> usize {
    let mut count = 0;
    let mut skip: HashSet<usize> = HashSet::new();
    loop {
        let found = {
            let mx = Matcher::new(g);
            let mut declined = Vec::new();
            let hit = (0..g.nodes.len()).find_map(|ni| {
                if skip.contains(&ni) {
                    return None;
                }
                let m = mx.at(pat, ni)?;
                let mut consts = NewConsts { base: g.values.len(), items: Vec::new() };
                match rewrite(&mx, &m, &mut consts) {
                    Some(node) => Some((m, node, consts)),
                    None => {
                        declined.push(ni);
                        None
                    }
                }
            });
            skip.extend(declined);
            hit
        };
        let Some((m, node, consts)) = found else { return count };
        for (name, t) in consts.items {
            g.add_const(name, t);
        }
        replace(g, &m, node);
        count += 1;
        // Node indices shift after a replacement; declined roots are re-examined.
        skip.clear();
    }
}

/// Put `node` where the match's root was and drop the match's other nodes. The root is the last
/// of them in topological order and every bound input precedes it, so order stays valid.
pub fn replace(g: &mut Graph, m: &Match, node: Node) {
    let root = m.matched[0];
    g.nodes[root] = node;
    let drop: HashSet<usize> = m.matched[1..].iter().copied().collect();
    let mut i = 0;
    g.nodes.retain(|_| {
        let keep = !drop.contains(&i);
        i += 1;
        keep
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_compiler::ir::{Model, Type};
    use kiln_runtime::DType;

    fn node(g: &mut Graph, op: &str, inputs: Vec<ValueId>) -> ValueId {
        let out = g.add_value(format!("v{}", g.values.len()), Type::Tensor { dtype: Some(DType::F32), shape: None });
        g.nodes.push(Node {
            name: format!("n{}", g.nodes.len()),
            op: op.into(),
            domain: String::new(),
            opset: 17,
            inputs: inputs.into_iter().map(Some).collect(),
            outputs: vec![Some(out)],
            attrs: vec![],
        });
        out
    }

    fn gelu_graph() -> (Graph, ValueId) {
        let mut g = Graph::default();
        let x = g.add_value("x", Type::Tensor { dtype: Some(DType::F32), shape: None });
        g.inputs.push(x);
        let c = g.add_const("sqrt2", Tensor::scalar(std::f32::consts::SQRT_2));
        let one = g.add_const("one", Tensor::scalar(1.0f32));
        let half = g.add_const("half", Tensor::scalar(0.5f32));
        let d = node(&mut g, "Div", vec![x, c]);
        let e = node(&mut g, "Erf", vec![d]);
        let a = node(&mut g, "Add", vec![one, e]);
        let m = node(&mut g, "Mul", vec![x, a]);
        let y = node(&mut g, "Mul", vec![m, half]);
        g.outputs.push(y);
        (g, x)
    }

    fn gelu_pat() -> Pat {
        let x = sym("x");
        (x.clone() * (erf(x / std::f32::consts::SQRT_2) + 1.0)) * 0.5
    }

    #[test]
    fn matches_commuted_operands_and_binds_symbols() {
        let (g, x) = gelu_graph();
        let mx = Matcher::new(&g);
        let m = mx.at(&gelu_pat(), 4).expect("gelu matches at the last Mul");
        assert_eq!(m.value("x"), x);
        assert_eq!(m.matched.len(), 5);
        assert!(mx.at(&gelu_pat(), 3).is_none(), "the inner Mul is not the root");
    }

    #[test]
    fn refuses_when_an_interior_value_escapes() {
        let (mut g, _) = gelu_graph();
        let erf_out = g.nodes[1].output(0).unwrap();
        g.outputs.push(erf_out);
        assert!(Matcher::new(&g).at(&gelu_pat(), 4).is_none());
    }

    #[test]
    fn refuses_wrong_constants_and_inconsistent_symbols() {
        let (mut g, _) = gelu_graph();
        g.values[g.nodes[4].input(1).unwrap()].konst = Some(Tensor::scalar(0.25f32));
        assert!(Matcher::new(&g).at(&gelu_pat(), 4).is_none());
        let (mut g, _) = gelu_graph();
        let other = g.add_value("y", Type::Tensor { dtype: Some(DType::F32), shape: None });
        g.nodes[3].inputs[0] = Some(other);
        assert!(Matcher::new(&g).at(&gelu_pat(), 4).is_none(), "x must be the same value in both places");
    }

    #[test]
    fn rewrite_replaces_the_match_with_one_node() {
        let (g, x) = gelu_graph();
        let mut model = Model { graph: g, ..Default::default() };
        let n = rewrite_all(&mut model.graph, &gelu_pat(), |mx, m, _| {
            let root = &mx.g.nodes[m.matched[0]];
            Some(Node { op: "Gelu".into(), inputs: vec![Some(m.value("x"))], attrs: vec![], ..root.clone() })
        });
        assert_eq!(n, 1);
        assert_eq!(model.graph.nodes.len(), 1);
        assert_eq!(model.graph.nodes[0].op, "Gelu");
        assert_eq!(model.graph.nodes[0].input(0), Some(x));
        assert_eq!(model.graph.nodes[0].output(0), Some(model.graph.outputs[0]));
    }
}
