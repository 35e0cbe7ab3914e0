//! `prepack`: constant GEMM weights stored in the artifact already packed for the target's kernels.
//!
//! A `kiln.FusedMatMul` (or a plain MatMul, which becomes a FusedMatMul without bias) whose B is a
//! constant f32 `[K, N]` gets instead a U8 constant holding `PackedB` bytes (64-byte header, then
//! NR-wide panels), with attributes `packed_b = 1` and `b_shape = [K, N]`. The runtime reads the
//! panels in place from the mapped artifact, so no call packs B again; a machine whose kernels
//! want another panel width repacks once at load.
//!
//! The ISA comes from the compile target: `avx512`, `avx2`, `neon`, `scalar` (an optional `cpu-`
//! prefix is accepted), or the compiling machine's best ISA for `native` and `cpu-generic`.

use std::collections::HashMap;

use kiln_backends::cpu::gemm::{MatRef, PackedB};
use kiln_backends::cpu::isa::{self, Isa};
use kiln_compiler::ir::{AttrValue, Attribute, Graph, Model, ValueId};
use kiln_compiler::pass::Pass;
use kiln_compiler::Result;
use kiln_runtime::{DType, Tensor};

use crate::fuse::KILN_DOMAIN;

pub struct Prepack {
    /// The compile target (see the module doc).
    pub target: String,
}

impl Default for Prepack {
    fn default() -> Self {
        Prepack { target: "cpu-generic".into() }
    }
}

impl Prepack {
    pub fn for_target(target: &str) -> Prepack {
        Prepack { target: target.into() }
    }
}

/// The ISA whose kernels a target's weights are packed for (None: unknown target, no packing).
pub fn target_isa(target: &str) -> Option<Isa> {
    let t = target.trim().to_ascii_lowercase();
    match t.as_str() {
        "" | "native" | "cpu" | "cpu-generic" | "cpu-native" => Some(isa::best()),
        _ => Isa::parse(t.strip_prefix("cpu-").unwrap_or(&t)),
    }
}

impl Pass for Prepack {
    fn name(&self) -> &'static str {
        "prepack"
    }

    fn run(&self, model: &mut Model) -> Result<(usize, Vec<String>)> {
        let Some(isa) = target_isa(&self.target) else {
            return Ok((0, vec![format!("unknown target '{}': weights left unpacked", self.target)]));
        };
        let count = prepack_graph(&mut model.graph, isa)?;
        Ok((count, vec![format!("packed for {isa}")]))
    }
}

/// Pack the constant weights of this graph's products (and of its subgraphs'); returns how many
/// nodes now read packed weights.
fn prepack_graph(g: &mut Graph, isa: Isa) -> Result<usize> {
    let mut count = 0;
    // One packed constant per weight, however many products read it.
    let mut packed: HashMap<ValueId, ValueId> = HashMap::new();
    for ni in 0..g.nodes.len() {
        for a in g.nodes[ni].attrs.iter_mut() {
            match &mut a.value {
                AttrValue::Graph(sg) => count += prepack_graph(sg, isa)?,
                AttrValue::Graphs(gs) => {
                    for sg in gs.iter_mut() {
                        count += prepack_graph(sg, isa)?;
                    }
                }
                _ => {}
            }
        }
        let Some((w, k, n, plain)) = packable(g, ni) else { continue };
        let pv = match packed.get(&w) {
            Some(&pv) => pv,
            None => {
                let Some(wt) = g.konst(w) else { continue };
                // Weights straight from an .onnx map may sit at any offset.
                let wt = wt.clone().aligned();
                let p = PackedB::new(isa, MatRef::rows(wt.view::<f32>()?, n), k, n)?;
                let bytes = p.as_bytes();
                let t = Tensor::from_bytes(DType::U8, &[bytes.len()], bytes)?;
                let name = format!("{}.packed_{}.{}", g.values[w].name, isa.name(), g.values.len());
                let pv = g.add_const(name, t);
                packed.insert(w, pv);
                pv
            }
        };
        let node = &mut g.nodes[ni];
        node.inputs[1] = Some(pv);
        if plain {
            node.op = "FusedMatMul".into();
            node.domain = KILN_DOMAIN.into();
            node.opset = 1;
        }
        node.attrs.push(Attribute { name: "packed_b".into(), value: AttrValue::Int(1) });
        node.attrs.push(Attribute { name: "b_shape".into(), value: AttrValue::Ints(vec![k as i64, n as i64]) });
        count += 1;
    }
    Ok(count)
}

/// If node `ni` is a product by a constant f32 [K, N] weight: (weight, K, N, is a plain MatMul).
fn packable(g: &Graph, ni: usize) -> Option<(ValueId, usize, usize, bool)> {
    let n = &g.nodes[ni];
    let fused = n.domain == KILN_DOMAIN && n.op == "FusedMatMul" && n.attr_int("packed_b").unwrap_or(0) == 0;
    let plain = matches!(n.domain.as_str(), "" | "ai.onnx") && n.op == "MatMul" && n.inputs.len() == 2;
    if !fused && !plain {
        return None;
    }
    let (a, w) = (n.input(0)?, n.input(1)?);
    let a_ty = &g.values[a].ty;
    // A must be f32 and at least 1-D (the fused kernel's contract; MatMul's too).
    if a_ty.dtype() != Some(DType::F32) || a_ty.shape().is_some_and(|s| s.is_empty()) {
        return None;
    }
    let wt = g.konst(w)?;
    if wt.dtype() != DType::F32 || wt.rank() != 2 {
        return None;
    }
    let (k, nn) = (wt.shape()[0], wt.shape()[1]);
    (k > 0 && nn > 0).then_some((w, k, nn, plain))
}

#[cfg(test)]
mod tests {
    use kiln_backends::CpuBackend;
    use kiln_compiler::ir::{Dim, Node, Type};
    use kiln_runtime::Artifact;

    use super::*;
    use crate::pipeline::compile_model;
    use crate::{CompileOptions, OPTIMIZATIONS};

    fn data(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(12345);
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(1664525).wrapping_add(1013904223);
                (s >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0
            })
            .collect()
    }

    /// x[3, 40] · W1[40, 70] (MatMul) → + b (matmul-bias: FusedMatMul) → · W2[70, 5] (MatMul).
    fn model() -> Model {
        let mut g = Graph { name: "main".into(), ..Default::default() };
        let x = g.add_value("x", Type::tensor(DType::F32, vec![Dim::Fixed(3), Dim::Fixed(40)]));
        g.inputs.push(x);
        let w1 = g.add_const("w1", Tensor::from_vec(&[40, 70], data(40 * 70, 1)).unwrap());
        let b1 = g.add_const("b1", Tensor::from_vec(&[70], data(70, 2)).unwrap());
        let w2 = g.add_const("w2", Tensor::from_vec(&[70, 5], data(70 * 5, 3)).unwrap());
        let node = |g: &mut Graph, op: &str, ins: &[ValueId]| {
            let out = g.add_value(format!("{op}_{}", g.values.len()), Type::Unknown);
            g.nodes.push(Node {
                name: format!("n{}", g.nodes.len()),
                op: op.into(),
                domain: String::new(),
                opset: 17,
                inputs: ins.iter().map(|&v| Some(v)).collect(),
                outputs: vec![Some(out)],
                attrs: vec![],
            });
            out
        };
        let h = node(&mut g, "MatMul", &[x, w1]);
        let h = node(&mut g, "Add", &[h, b1]);
        let y = node(&mut g, "MatMul", &[h, w2]);
        g.outputs = vec![y];
        Model { graph: g, opsets: vec![(String::new(), 17)], ir_version: 8, ..Default::default() }
    }

    fn run(opts: &CompileOptions) -> (Vec<f32>, Model) {
        let compiled = compile_model(model(), opts).unwrap();
        let bytes = kiln_compiler::writer::to_bytes(&compiled.lowered).unwrap();
        let m = kiln_runtime::Model::new(Artifact::from_vec(bytes).unwrap(), &CpuBackend::new(1).unwrap()).unwrap();
        let x = Tensor::from_vec(&[3, 40], data(120, 4)).unwrap();
        let out = m.session().run(vec![x]).unwrap();
        (out[0].view::<f32>().unwrap().to_vec(), compiled.model)
    }

    #[test]
    fn packed_artifacts_compute_the_same_outputs() {
        let unpacked = CompileOptions { skip: vec!["prepack".into()], ..Default::default() };
        let (want, m) = run(&unpacked);
        assert!(m.graph.nodes.iter().all(|n| n.attr_int("packed_b").is_none()));
        // The running machine's ISA (read in place) and others (relaid at load).
        for target in ["cpu-generic", "native", "scalar", "avx2", "avx512", "neon"] {
            let (got, m) = run(&CompileOptions { target: target.into(), ..Default::default() });
            let ops: Vec<&str> = m.graph.nodes.iter().map(|n| n.op.as_str()).collect();
            assert_eq!(ops, ["FusedMatMul", "FusedMatMul"], "{target}");
            assert!(m.graph.nodes.iter().all(|n| n.attr_int("packed_b") == Some(1)), "{target}");
            assert_eq!(m.graph.nodes[1].attr_ints("b_shape"), Some(&[70i64, 5][..]));
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{target}: {a} vs {b}");
            }
        }
        assert!(OPTIMIZATIONS.last() == Some(&"prepack"));
    }

    #[test]
    fn targets_map_to_isas() {
        assert_eq!(target_isa("avx2"), Some(Isa::Avx2Fma));
        assert_eq!(target_isa("cpu-avx512"), Some(Isa::Avx512));
        assert_eq!(target_isa("scalar"), Some(Isa::Scalar));
        assert_eq!(target_isa("native"), Some(isa::best()));
        assert_eq!(target_isa("cpu-generic"), Some(isa::best()));
        assert_eq!(target_isa("riscv-vector"), None);
    }
}
