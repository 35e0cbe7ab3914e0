//! Dead-node removal: drops nodes none of whose outputs is read (by a node, a subgraph capture or
//! the graph outputs), and forgets constants nobody reads so they are not written to the artifact.

use std::collections::HashSet;

use kiln_compiler::ir::{Graph, Model};
use kiln_compiler::pass::Pass;
use kiln_compiler::Result;

pub struct DeadCodeElimination;

/// Ops with effects beyond their outputs would be kept here; ONNX inference ops have none.
fn remove_dead(g: &mut Graph) -> usize {
    let mut removed = 0;
    // Subgraphs first: their own dead nodes, which may drop captures of ours.
    for n in &mut g.nodes {
        for a in &mut n.attrs {
            match &mut a.value {
                kiln_compiler::ir::AttrValue::Graph(sg) => removed += remove_dead(sg),
                kiln_compiler::ir::AttrValue::Graphs(gs) => {
                    for sg in gs {
                        removed += remove_dead(sg)
                    }
                }
                _ => {}
            }
        }
    }
    loop {
        let uses = g.consumers();
        let outputs: HashSet<usize> = g.outputs.iter().copied().collect();
        let live = |v: usize| outputs.contains(&v) || !uses[v].is_empty();
        let before = g.nodes.len();
        g.nodes.retain(|n| n.outputs.iter().flatten().any(|&v| live(v)));
        let now = g.nodes.len();
        removed += before - now;
        if now == before {
            break;
        }
    }
    let uses = g.consumers();
    let outputs: HashSet<usize> = g.outputs.iter().copied().collect();
    for (v, info) in g.values.iter_mut().enumerate() {
        if info.konst.is_some() && uses[v].is_empty() && !outputs.contains(&v) {
            info.konst = None;
        }
    }
    removed
}

impl Pass for DeadCodeElimination {
    fn name(&self) -> &'static str {
        "dce"
    }

    fn run(&self, model: &mut Model) -> Result<(usize, Vec<String>)> {
        Ok((remove_dead(&mut model.graph), vec![]))
    }
}
