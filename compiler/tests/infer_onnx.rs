//! Checks inference against the types the ONNX backend node tests declare for their outputs:
//! every node output's type is erased, re-inferred, and compared. Needs the unpacked test suite
//! (skipped when absent); run with `cargo test -p kiln-compiler --test infer_onnx -- --ignored --nocapture`.

use std::path::Path;

use kiln_compiler::import::import_model;
use kiln_compiler::infer::infer_types;
use kiln_compiler::ir::{AttrValue, Dim, Graph, Type};

const SUITE: &str = "/root/.cache/kiln/onnx-1.22.0/onnx/backend/test/data/node";

fn erase(g: &mut Graph) {
    for n in &mut g.nodes {
        for a in &mut n.attrs {
            match &mut a.value {
                AttrValue::Graph(sg) => erase(sg),
                AttrValue::Graphs(gs) => gs.iter_mut().for_each(erase),
                _ => {}
            }
        }
    }
    let outs: Vec<usize> = g
        .nodes
        .iter()
        .flat_map(|n| n.outputs.iter().flatten().copied())
        .collect();
    for v in outs {
        g.values[v].ty = Type::Unknown;
    }
}

#[derive(PartialEq)]
enum Verdict {
    Same,
    LessPrecise,
    Missing,
    Wrong(String),
}

fn compare(decl: &Type, inf: &Type) -> Verdict {
    match (decl, inf) {
        (_, Type::Unknown) => Verdict::Missing,
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
            if let (Some(a), Some(b)) = (dd, id) {
                if a != b {
                    return Verdict::Wrong(format!("dtype {a} vs {b}"));
                }
            }
            let mut less = id.is_none() && dd.is_some();
            match (ds, is) {
                (Some(a), Some(b)) => {
                    if a.len() != b.len() {
                        return Verdict::Wrong(format!("rank {} vs {}", a.len(), b.len()));
                    }
                    for (x, y) in a.iter().zip(b) {
                        match (x, y) {
                            (Dim::Fixed(p), Dim::Fixed(q)) if p != q => {
                                return Verdict::Wrong(format!("dims {decl} vs {inf}"))
                            }
                            (Dim::Fixed(_), Dim::Sym(_) | Dim::Unknown) => less = true,
                            _ => {}
                        }
                    }
                }
                (Some(_), None) => less = true,
                _ => {}
            }
            if less {
                Verdict::LessPrecise
            } else {
                Verdict::Same
            }
        }
        (Type::Sequence(a), Type::Sequence(b)) | (Type::Optional(a), Type::Optional(b)) => {
            compare(a, b)
        }
        _ => Verdict::Wrong(format!("kind {decl} vs {inf}")),
    }
}

#[test]
#[ignore]
fn inference_matches_backend_test_declarations() {
    let Ok(dir) = std::fs::read_dir(SUITE) else {
        eprintln!("{SUITE} not found; skipped");
        return;
    };
    let mut cases: Vec<_> = dir.flatten().map(|e| e.path()).collect();
    cases.sort();
    let (mut same, mut less, mut missing, mut wrong, mut failed) =
        (0, 0, Vec::new(), Vec::new(), 0);
    for case in cases {
        let name = case.file_name().unwrap().to_string_lossy().into_owned();
        let Ok(mut m) = import_model(&case.join("model.onnx")) else {
            failed += 1;
            continue;
        };
        let decl: Vec<Type> = m
            .graph
            .outputs
            .iter()
            .map(|&v| m.graph.values[v].ty.clone())
            .collect();
        erase(&mut m.graph);
        infer_types(&mut m).unwrap();
        for (k, &v) in m.graph.outputs.iter().enumerate() {
            let inf = &m.graph.values[v].ty;
            match compare(&decl[k], inf) {
                Verdict::Same => same += 1,
                Verdict::LessPrecise => {
                    less += 1;
                    if std::env::var("SHOW_LESS").is_ok() {
                        eprintln!("LESS {name}[{k}]: {} vs {inf}", decl[k]);
                    }
                }
                Verdict::Missing => missing.push(format!("{name}[{k}]")),
                Verdict::Wrong(why) => wrong.push(format!("{name}[{k}]: {why}")),
            }
        }
    }
    let _ = Path::new(SUITE);
    eprintln!(
        "same {same}, less precise {less}, missing {}, wrong {}, import failed {failed}",
        missing.len(),
        wrong.len()
    );
    for w in &wrong {
        eprintln!("WRONG {w}");
    }
    if std::env::var("SHOW_MISSING").is_ok() {
        for w in &missing {
            eprintln!("MISSING {w}");
        }
    }
    assert!(wrong.is_empty());
}
