//! The pass manager: runs named graph rewrites in order and collects what each changed.

use std::time::Instant;

use crate::ir::{Graph, Model};
use crate::Result;

/// What one pass did.
#[derive(Clone, Debug, Default)]
pub struct PassReport {
    pub name: String,
    pub nodes_before: usize,
    pub nodes_after: usize,
    /// Pass-specific count of rewrites (folded nodes, removed nodes, fusions…).
    pub changes: usize,
    pub notes: Vec<String>,
    pub millis: f64,
}

pub trait Pass {
    fn name(&self) -> &'static str;
    /// Rewrite `model` in place; return how many rewrites were made and any notes.
    fn run(&self, model: &mut Model) -> Result<(usize, Vec<String>)>;
}

#[derive(Default)]
pub struct PassManager {
    passes: Vec<Box<dyn Pass>>,
}

/// Nodes in a graph including those inside subgraphs.
pub fn count_nodes(g: &Graph) -> usize {
    g.nodes.len() + g.nodes.iter().flat_map(|n| n.subgraphs()).map(count_nodes).sum::<usize>()
}

impl PassManager {
    pub fn new() -> PassManager {
        PassManager::default()
    }

    pub fn add(&mut self, pass: Box<dyn Pass>) -> &mut Self {
        self.passes.push(pass);
        self
    }

    pub fn names(&self) -> Vec<&'static str> {
        self.passes.iter().map(|p| p.name()).collect()
    }

    pub fn run(&self, model: &mut Model) -> Result<Vec<PassReport>> {
        let mut reports = Vec::new();
        for p in &self.passes {
            let before = count_nodes(&model.graph);
            let t = Instant::now();
            let (changes, notes) = p.run(model)?;
            reports.push(PassReport {
                name: p.name().to_string(),
                nodes_before: before,
                nodes_after: count_nodes(&model.graph),
                changes,
                notes,
                millis: t.elapsed().as_secs_f64() * 1e3,
            });
        }
        Ok(reports)
    }
}
