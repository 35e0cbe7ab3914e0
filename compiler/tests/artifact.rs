//! Lowering + writing round trips through the runtime's artifact reader.

mod common;

use common::*;
use kiln_compiler::ir::{AttrValue, Graph, Model, Type};
use kiln_compiler::lower::{lower, lower_node, Lowered};
use kiln_compiler::writer::{to_bytes, write_artifact};
use kiln_runtime::manifest::{AttrKind, Program, ValueKind, FORMAT_VERSION};
use kiln_runtime::{Artifact, DType, Error, Tensor};

fn weights(n: usize) -> Vec<f32> {
    (0..n).map(|i| i as f32 * 0.5 - 3.0).collect()
}

/// MatMul + Add with a 100x100 weight, and an If whose else branch nests another If that reads a
/// main-graph value the middle branch never mentions.
fn sample_model() -> Model {
    let mut g = Graph {
        name: "main".into(),
        ..Default::default()
    };
    let x = input(&mut g, "x", f32t(&[s("batch"), d(100)]));
    let cond = input(&mut g, "cond", ty(DType::Bool, &[]));
    let w = g.add_const("W", Tensor::from_vec(&[100, 100], weights(10_000)).unwrap());
    let b = g.add_const("b", Tensor::from_vec(&[100], weights(100)).unwrap());
    let _unused = g.add_const("unused", Tensor::from_vec(&[1000], weights(1000)).unwrap());
    let h = node1(&mut g, "MatMul", 17, &[x, w], "h", vec![]);
    let y = node1(&mut g, "Add", 17, &[h, b], "y", vec![]);

    let mut then_g = Graph {
        name: "then".into(),
        ..Default::default()
    };
    let ty_ = then_g.add_value("y", Type::Unknown);
    then_g.captures.push(ty_);
    let t_out = node1(&mut then_g, "Relu", 17, &[ty_], "t_out", vec![]);
    then_g.outputs.push(t_out);

    // Innermost: reads `x` from main.
    let mut inner_then = Graph {
        name: "inner_then".into(),
        ..Default::default()
    };
    let ix = inner_then.add_value("x", Type::Unknown);
    inner_then.captures.push(ix);
    let io = node1(&mut inner_then, "Neg", 17, &[ix], "io", vec![]);
    inner_then.outputs.push(io);
    let mut inner_else = Graph {
        name: "inner_else".into(),
        ..Default::default()
    };
    let iy = inner_else.add_value("y", Type::Unknown);
    inner_else.captures.push(iy);
    let k = inner_else.add_const("k", Tensor::from_vec(&[2], vec![2.0f32, 3.0]).unwrap());
    let _ = k;
    let ie = node1(&mut inner_else, "Abs", 17, &[iy], "ie", vec![]);
    inner_else.outputs.push(ie);

    let mut else_g = Graph {
        name: "else".into(),
        ..Default::default()
    };
    let ec = else_g.add_value("cond", Type::Unknown);
    else_g.captures.push(ec);
    let e_out = node1(
        &mut else_g,
        "If",
        17,
        &[ec],
        "e_out",
        vec![
            attr("then_branch", AttrValue::Graph(Box::new(inner_then))),
            attr("else_branch", AttrValue::Graph(Box::new(inner_else))),
        ],
    );
    else_g.outputs.push(e_out);

    let r = node1(
        &mut g,
        "If",
        17,
        &[cond],
        "r",
        vec![
            attr("then_branch", AttrValue::Graph(Box::new(then_g))),
            attr("else_branch", AttrValue::Graph(Box::new(else_g))),
        ],
    );
    let small = i64_const(&mut g, "axes", &[0, 1]);
    let big_attr = Tensor::from_vec(&[64], weights(64)).unwrap();
    let red = node1(
        &mut g,
        "ReduceSum",
        17,
        &[y, small],
        "red",
        vec![int("keepdims", 0), attr("big", AttrValue::Tensor(big_attr))],
    );
    g.outputs = vec![y, r, red];
    let mut m = model(g, 17);
    m.source_sha256 = "ab".repeat(32);
    m.source_name = "sample.onnx".into();
    m.producer = "hand".into();
    m.props = vec![("author".into(), "me".into())];
    kiln_compiler::infer::infer_types(&mut m).unwrap();
    m
}

fn lowered() -> Lowered {
    lower(&sample_model(), "cpu-generic", &["fold".to_string()]).unwrap()
}

fn value_id(p: &Program, name: &str) -> u32 {
    p.values
        .iter()
        .position(|v| v.name == name)
        .unwrap_or_else(|| panic!("no value {name}")) as u32
}

fn subgraph<'a>(p: &'a Program, op: &str, attr: &str) -> &'a Program {
    let step = p.steps.iter().find(|s| s.op == op).unwrap();
    step.attr(attr).unwrap().g.as_ref().unwrap()
}

#[test]
fn round_trip_through_a_file() {
    let low = lowered();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.kiln");
    let n = write_artifact(&low, &path).unwrap();
    assert_eq!(n, std::fs::metadata(&path).unwrap().len());
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        1,
        "no temporary file left"
    );
    assert_eq!(std::fs::read(&path).unwrap(), to_bytes(&low).unwrap());

    let art = Artifact::open(&path).unwrap();
    let p = art.program();
    let meta = art.metadata();
    assert_eq!(meta.kiln_version, kiln_runtime::VERSION);
    assert_eq!(meta.target, "cpu-generic");
    assert_eq!(meta.passes, vec!["fold".to_string()]);
    assert_eq!(meta.source_name, "sample.onnx");
    assert_eq!(meta.producer, "hand");
    assert_eq!(meta.opsets[0].domain, "");
    assert_eq!(meta.opsets[0].version, 17);
    assert_eq!(meta.props[0].key, "author");
    assert_eq!(meta.ir_version, 8);
    assert_eq!(art.manifest().format_version, FORMAT_VERSION);

    // Values and types.
    let x = &p.values[p.inputs[0] as usize];
    assert_eq!(x.name, "x");
    assert_eq!(x.type_string(), "f32[batch,100]");
    assert_eq!(
        p.values[value_id(p, "y") as usize].type_string(),
        "f32[batch,100]"
    );
    assert_eq!(p.values[value_id(p, "red") as usize].type_string(), "f32[]");
    assert_eq!(p.outputs.len(), 3);

    // Steps.
    let ops: Vec<&str> = p.steps.iter().map(|s| s.op.as_str()).collect();
    assert_eq!(ops, ["MatMul", "Add", "If", "ReduceSum"]);
    let mm = &p.steps[0];
    assert_eq!(
        mm.inputs,
        vec![value_id(p, "x") as i32, value_id(p, "W") as i32]
    );
    assert_eq!(mm.outputs, vec![value_id(p, "h") as i32]);
    assert_eq!(mm.domain, "");
    assert_eq!(mm.opset, 17);
    let rs = &p.steps[3];
    assert_eq!(rs.attr("keepdims").unwrap().kind, AttrKind::Int as i32);
    let big = rs.attr("big").unwrap();
    assert_eq!(big.kind, AttrKind::Tensor as i32);
    let big_t = art.tensor(big.t.as_ref().unwrap()).unwrap();
    assert_eq!(big_t.view::<f32>().unwrap(), weights(64).as_slice());

    // Constants: W and b in blobs, the small axes inline, the unused weight dropped.
    let names: Vec<&str> = p
        .constants
        .iter()
        .map(|c| p.values[c.value as usize].name.as_str())
        .collect();
    assert_eq!(names, ["W", "b", "axes"]);
    let w = art.tensor(p.constants[0].tensor.as_ref().unwrap()).unwrap();
    assert_eq!(w.shape(), &[100, 100]);
    assert_eq!(w.view::<f32>().unwrap(), weights(10_000).as_slice());
    assert!(p.constants[0].tensor.as_ref().unwrap().blob.is_some());
    let axes = p.constants[2].tensor.as_ref().unwrap();
    assert!(axes.blob.is_none());
    assert_eq!(art.tensor(axes).unwrap().view::<i64>().unwrap(), &[0, 1]);
    let blobs = &art.manifest().blobs;
    assert_eq!(blobs.len(), 3);
    for b in blobs {
        assert_eq!(b.offset % 64, 0);
    }
    assert_eq!(blobs[0].len, 40_000);

    // Captures: then reads y; else forwards x (for its inner then) and y (inner else).
    let then_p = subgraph(p, "If", "then_branch");
    assert_eq!(then_p.captures.len(), 1);
    assert_eq!(then_p.captures[0].outer, value_id(p, "y"));
    assert_eq!(then_p.values[then_p.captures[0].inner as usize].name, "y");
    let else_p = subgraph(p, "If", "else_branch");
    let outer_of = |prog: &Program, name: &str| {
        prog.captures
            .iter()
            .find(|c| prog.values[c.inner as usize].name == name)
            .map(|c| c.outer)
            .unwrap_or_else(|| panic!("no capture of {name}"))
    };
    assert_eq!(outer_of(else_p, "cond"), value_id(p, "cond"));
    assert_eq!(outer_of(else_p, "x"), value_id(p, "x"));
    assert_eq!(outer_of(else_p, "y"), value_id(p, "y"));
    let inner_then = subgraph(else_p, "If", "then_branch");
    assert_eq!(outer_of(inner_then, "x"), value_id(else_p, "x"));
    let inner_else = subgraph(else_p, "If", "else_branch");
    assert_eq!(outer_of(inner_else, "y"), value_id(else_p, "y"));
    // The nested constant is unused and so not emitted; the inner output is typed.
    assert!(inner_else.constants.is_empty());
    assert_eq!(
        inner_else.values[inner_else.outputs[0] as usize].type_string(),
        "f32[batch,100]"
    );
    assert_eq!(
        else_p.values[value_id(else_p, "x") as usize].kind,
        ValueKind::Tensor as i32
    );
}

#[test]
fn corrupted_truncated_and_wrong_version_files_are_refused() {
    let bytes = to_bytes(&lowered()).unwrap();
    assert!(Artifact::from_vec(bytes.clone()).is_ok());
    for pos in [70, bytes.len() / 2, bytes.len() - 20, bytes.len() - 1] {
        let mut bad = bytes.clone();
        bad[pos] ^= 0x40;
        assert!(
            Artifact::from_vec(bad).is_err(),
            "flipped byte {pos} accepted"
        );
    }
    assert!(Artifact::from_vec(bytes[..bytes.len() - 1].to_vec()).is_err());
    assert!(Artifact::from_vec(bytes[..100].to_vec()).is_err());
    let mut v = bytes.clone();
    v[8..12].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
    assert!(matches!(Artifact::from_vec(v), Err(Error::Version { .. })));
    let mut m = bytes;
    m[0] = b'X';
    assert!(Artifact::from_vec(m).is_err());
}

#[test]
fn failed_write_leaves_nothing_behind() {
    let mut low = lowered();
    low.blobs[0] = Tensor::from_strings(&[1], vec!["not a blob".into()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.kiln");
    assert!(write_artifact(&low, &path).is_err());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    assert!(write_artifact(&lowered(), &dir.path().join("missing/out.kiln")).is_err());
}

#[test]
fn overwrite_replaces_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.kiln");
    std::fs::write(&path, b"old").unwrap();
    write_artifact(&lowered(), &path).unwrap();
    assert!(Artifact::open(&path).is_ok());
}

#[test]
fn lower_node_keeps_tensor_attributes_inline() {
    let m = sample_model();
    let g = &m.graph;
    let rs = g.nodes.iter().find(|n| n.op == "ReduceSum").unwrap();
    let step = lower_node(rs, g).unwrap();
    let t = step.attr("big").unwrap().t.as_ref().unwrap();
    assert!(t.blob.is_none());
    assert_eq!(t.inline.len(), 256);
    let tensor = kiln_runtime::artifact::tensor_from_data(t, None).unwrap();
    assert_eq!(tensor.view::<f32>().unwrap(), weights(64).as_slice());
    let iff = g.nodes.iter().find(|n| n.op == "If").unwrap();
    assert!(lower_node(iff, g).is_err());
}

#[test]
fn reading_a_value_nobody_produces_is_an_error() {
    let mut g = Graph::default();
    let ghost = g.add_value("ghost", f32t(&[d(1)]));
    let o = node1(&mut g, "Relu", 17, &[ghost], "o", vec![]);
    g.outputs.push(o);
    assert!(lower(&model(g, 17), "cpu", &[]).is_err());
}
