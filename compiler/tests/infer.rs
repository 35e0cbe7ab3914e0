//! Type/shape inference on hand-built graphs.

mod common;

use common::*;
use kiln_compiler::infer::infer_types;
use kiln_compiler::ir::{AttrValue, Dim, Graph, Type};
use kiln_runtime::{DType, Tensor};

fn infer(g: Graph, opset: i64) -> kiln_compiler::ir::Model {
    let mut m = model(g, opset);
    infer_types(&mut m).unwrap();
    m
}

#[test]
fn broadcasting_with_symbols() {
    let mut g = Graph::default();
    let x = input(&mut g, "x", f32t(&[s("batch"), d(1), d(384)]));
    let y = input(&mut g, "y", f32t(&[s("seq"), d(384)]));
    let z = input(&mut g, "z", f32t(&[s("other"), d(1), d(1)]));
    let w = input(&mut g, "w", f32t(&[d(1)]));
    let a = node1(&mut g, "Add", 17, &[x, y], "a", vec![]);
    node1(&mut g, "Mul", 17, &[a, z], "b", vec![]);
    node1(&mut g, "Equal", 17, &[a, w], "c", vec![]);
    node1(&mut g, "Where", 17, &[w, x, y], "wh", vec![]);
    node1(&mut g, "Sum", 17, &[x, y, w], "sum3", vec![]);
    node1(&mut g, "Relu", 17, &[a], "r", vec![]);
    let m = infer(g, 17);
    assert_eq!(value_type(&m, "a"), f32t(&[s("batch"), s("seq"), d(384)]));
    assert_eq!(value_type(&m, "b"), f32t(&[Dim::Unknown, s("seq"), d(384)]));
    assert_eq!(
        value_type(&m, "c"),
        ty(DType::Bool, &[s("batch"), s("seq"), d(384)])
    );
    assert_eq!(value_type(&m, "wh"), f32t(&[s("batch"), s("seq"), d(384)]));
    assert_eq!(
        value_type(&m, "sum3"),
        f32t(&[s("batch"), s("seq"), d(384)])
    );
    assert_eq!(value_type(&m, "r"), value_type(&m, "a"));
}

#[test]
fn matmul_shapes() {
    let mut g = Graph::default();
    let x = input(&mut g, "x", f32t(&[s("b"), s("s"), d(384)]));
    let w = input(&mut g, "w", f32t(&[d(384), d(1536)]));
    let v = input(&mut g, "v", f32t(&[d(384)]));
    let p = input(&mut g, "p", f32t(&[d(2), d(1), d(3), d(4)]));
    let q = input(&mut g, "q", f32t(&[d(5), d(4), d(6)]));
    node1(&mut g, "MatMul", 13, &[x, w], "xw", vec![]);
    node1(&mut g, "MatMul", 13, &[v, w], "vw", vec![]);
    node1(&mut g, "MatMul", 13, &[x, v], "xv", vec![]);
    node1(&mut g, "MatMul", 13, &[p, q], "pq", vec![]);
    let a = input(&mut g, "a", f32t(&[d(7), d(3)]));
    let bb = input(&mut g, "bb", f32t(&[d(5), d(3)]));
    node1(&mut g, "Gemm", 13, &[a, bb], "gemm", vec![int("transB", 1)]);
    let m = infer(g, 13);
    assert_eq!(value_type(&m, "xw"), f32t(&[s("b"), s("s"), d(1536)]));
    assert_eq!(value_type(&m, "vw"), f32t(&[d(1536)]));
    assert_eq!(value_type(&m, "xv"), f32t(&[s("b"), s("s")]));
    assert_eq!(value_type(&m, "pq"), f32t(&[d(2), d(5), d(3), d(6)]));
    assert_eq!(value_type(&m, "gemm"), f32t(&[d(7), d(5)]));
}

#[test]
fn conv_and_pool_shapes() {
    let mut g = Graph::default();
    let x = input(&mut g, "x", f32t(&[s("n"), d(3), d(224), d(224)]));
    let w = input(&mut g, "w", f32t(&[d(64), d(3), d(7), d(7)]));
    let c = node1(
        &mut g,
        "Conv",
        13,
        &[x, w],
        "conv",
        vec![ints("strides", &[2, 2]), ints("pads", &[3, 3, 3, 3])],
    );
    node1(
        &mut g,
        "Conv",
        13,
        &[x, w],
        "same",
        vec![ints("strides", &[2, 2]), string("auto_pad", "SAME_UPPER")],
    );
    node1(
        &mut g,
        "Conv",
        13,
        &[x, w],
        "valid",
        vec![string("auto_pad", "VALID"), ints("dilations", &[2, 2])],
    );
    let mp = node_v(
        &mut g,
        "MaxPool",
        13,
        &[Some(c)],
        &["pool", "idx"],
        vec![
            ints("kernel_shape", &[3, 3]),
            ints("strides", &[2, 2]),
            ints("pads", &[1, 1, 1, 1]),
        ],
    );
    let small = input(&mut g, "small", f32t(&[d(1), d(1), d(6), d(6)]));
    node1(
        &mut g,
        "MaxPool",
        13,
        &[small],
        "ceil",
        vec![
            ints("kernel_shape", &[3, 3]),
            ints("strides", &[2, 2]),
            int("ceil_mode", 1),
        ],
    );
    node1(
        &mut g,
        "AveragePool",
        13,
        &[small],
        "floor",
        vec![ints("kernel_shape", &[3, 3]), ints("strides", &[2, 2])],
    );
    node1(&mut g, "GlobalAveragePool", 13, &[mp[0]], "gap", vec![]);
    let dynx = input(&mut g, "dyn", f32t(&[d(1), d(3), s("h"), d(32)]));
    node1(&mut g, "Conv", 13, &[dynx, w], "dynconv", vec![]);
    let wt = input(&mut g, "wt", f32t(&[d(64), d(16), d(4), d(4)]));
    node1(
        &mut g,
        "ConvTranspose",
        13,
        &[c, wt],
        "deconv",
        vec![ints("strides", &[2, 2]), ints("pads", &[1, 1, 1, 1])],
    );
    let m = infer(g, 13);
    assert_eq!(
        value_type(&m, "conv"),
        f32t(&[s("n"), d(64), d(112), d(112)])
    );
    assert_eq!(
        value_type(&m, "same"),
        f32t(&[s("n"), d(64), d(112), d(112)])
    );
    assert_eq!(
        value_type(&m, "valid"),
        f32t(&[s("n"), d(64), d(212), d(212)])
    );
    assert_eq!(value_type(&m, "pool"), f32t(&[s("n"), d(64), d(56), d(56)]));
    assert_eq!(
        value_type(&m, "idx"),
        ty(DType::I64, &[s("n"), d(64), d(56), d(56)])
    );
    assert_eq!(value_type(&m, "ceil"), f32t(&[d(1), d(1), d(3), d(3)]));
    assert_eq!(value_type(&m, "floor"), f32t(&[d(1), d(1), d(2), d(2)]));
    assert_eq!(value_type(&m, "gap"), f32t(&[s("n"), d(64), d(1), d(1)]));
    assert_eq!(
        value_type(&m, "dynconv"),
        f32t(&[d(1), d(64), Dim::Unknown, d(26)])
    );
    assert_eq!(
        value_type(&m, "deconv"),
        f32t(&[s("n"), d(16), d(224), d(224)])
    );
}

#[test]
fn reshape_with_constant_and_symbolic_shapes() {
    let mut g = Graph::default();
    let x = input(&mut g, "x", f32t(&[s("batch"), s("seq"), d(384)]));
    let shape = i64_const(&mut g, "shape", &[0, 0, 12, -1]);
    node1(&mut g, "Reshape", 14, &[x, shape], "heads", vec![]);
    let flat = i64_const(&mut g, "flat", &[-1, 384]);
    node1(&mut g, "Reshape", 14, &[x, flat], "flat_out", vec![]);
    let z = i64_const(&mut g, "z", &[0, 3]);
    let e = input(&mut g, "e", f32t(&[d(0), d(3)]));
    node1(
        &mut g,
        "Reshape",
        14,
        &[e, z],
        "allowzero",
        vec![int("allowzero", 1)],
    );
    // Shape → Gather → Concat → Reshape, as exporters write it.
    let sh = node1(&mut g, "Shape", 14, &[x], "sh", vec![]);
    let i0 = g.add_const("i0", Tensor::from_vec(&[1], vec![0i64]).unwrap());
    let b = node1(&mut g, "Gather", 14, &[sh, i0], "b", vec![int("axis", 0)]);
    let i1 = g.add_const("i1", Tensor::scalar(1i64));
    let sq = node1(&mut g, "Gather", 14, &[sh, i1], "sq", vec![int("axis", 0)]);
    let sq1 = i64_const(&mut g, "zero", &[0]);
    let squ = node1(&mut g, "Unsqueeze", 14, &[sq, sq1], "squ", vec![]);
    let rest = i64_const(&mut g, "rest", &[6, 64]);
    let target = node1(
        &mut g,
        "Concat",
        14,
        &[b, squ, rest],
        "target",
        vec![int("axis", 0)],
    );
    node1(&mut g, "Reshape", 14, &[x, target], "dyn", vec![]);
    node1(&mut g, "Flatten", 14, &[x], "flatten", vec![int("axis", 2)]);
    let m = infer(g, 14);
    assert_eq!(
        value_type(&m, "heads"),
        f32t(&[s("batch"), s("seq"), d(12), d(32)])
    );
    assert_eq!(value_type(&m, "flat_out"), f32t(&[Dim::Unknown, d(384)]));
    assert_eq!(value_type(&m, "allowzero"), f32t(&[d(0), d(3)]));
    assert_eq!(value_type(&m, "sh"), ty(DType::I64, &[d(3)]));
    assert_eq!(value_type(&m, "sq"), ty(DType::I64, &[]));
    assert_eq!(value_type(&m, "target"), ty(DType::I64, &[d(4)]));
    assert_eq!(
        value_type(&m, "dyn"),
        f32t(&[s("batch"), s("seq"), d(6), d(64)])
    );
    assert_eq!(value_type(&m, "flatten"), f32t(&[Dim::Unknown, d(384)]));
}

#[test]
fn slice_with_constant_arguments() {
    let mut g = Graph::default();
    let x = input(&mut g, "x", f32t(&[d(10), s("b"), d(20)]));
    let starts = i64_const(&mut g, "starts", &[2, 0]);
    let ends = i64_const(&mut g, "ends", &[8, i64::MAX]);
    let axes = i64_const(&mut g, "axes", &[0, 1]);
    node1(&mut g, "Slice", 13, &[x, starts, ends, axes], "s1", vec![]);
    let st2 = i64_const(&mut g, "st2", &[-1]);
    let en2 = i64_const(&mut g, "en2", &[i64::MIN]);
    let ax2 = i64_const(&mut g, "ax2", &[-1]);
    let sp2 = i64_const(&mut g, "sp2", &[-3]);
    node1(&mut g, "Slice", 13, &[x, st2, en2, ax2, sp2], "s2", vec![]);
    let st3 = i64_const(&mut g, "st3", &[1]);
    let en3 = i64_const(&mut g, "en3", &[3]);
    let ax3 = i64_const(&mut g, "ax3", &[1]);
    node1(&mut g, "Slice", 13, &[x, st3, en3, ax3], "s3", vec![]);
    node1(
        &mut g,
        "Slice",
        9,
        &[x],
        "old",
        vec![
            ints("starts", &[-5]),
            ints("ends", &[100]),
            ints("axes", &[2]),
        ],
    );
    let m = infer(g, 13);
    assert_eq!(value_type(&m, "s1"), f32t(&[d(6), s("b"), d(20)]));
    assert_eq!(value_type(&m, "s2"), f32t(&[d(10), s("b"), d(7)]));
    assert_eq!(value_type(&m, "s3"), f32t(&[d(10), Dim::Unknown, d(20)]));
    assert_eq!(value_type(&m, "old"), f32t(&[d(10), s("b"), d(5)]));
}

#[test]
fn squeeze_unsqueeze_by_opset() {
    let mut g = Graph::default();
    let x = input(&mut g, "x", f32t(&[s("a"), d(3)]));
    node1(
        &mut g,
        "Unsqueeze",
        11,
        &[x],
        "u11",
        vec![ints("axes", &[0, 3])],
    );
    let axes = i64_const(&mut g, "axes", &[-1, 1]);
    node1(&mut g, "Unsqueeze", 13, &[x, axes], "u13", vec![]);
    let y = input(&mut g, "y", f32t(&[d(1), s("a"), d(1), d(4)]));
    node1(
        &mut g,
        "Squeeze",
        11,
        &[y],
        "sq11",
        vec![ints("axes", &[0, -2])],
    );
    let sa = i64_const(&mut g, "sa", &[2]);
    node1(&mut g, "Squeeze", 13, &[y, sa], "sq13", vec![]);
    node1(&mut g, "Squeeze", 13, &[y], "sq_all_sym", vec![]);
    let z = input(&mut g, "z", f32t(&[d(1), d(5), d(1)]));
    node1(&mut g, "Squeeze", 13, &[z], "sq_all", vec![]);
    let m = infer(g, 13);
    assert_eq!(value_type(&m, "u11"), f32t(&[d(1), s("a"), d(3), d(1)]));
    assert_eq!(value_type(&m, "u13"), f32t(&[s("a"), d(1), d(3), d(1)]));
    assert_eq!(value_type(&m, "sq11"), f32t(&[s("a"), d(4)]));
    assert_eq!(value_type(&m, "sq13"), f32t(&[d(1), s("a"), d(4)]));
    assert_eq!(
        value_type(&m, "sq_all_sym"),
        Type::Tensor {
            dtype: Some(DType::F32),
            shape: None
        }
    );
    assert_eq!(value_type(&m, "sq_all"), f32t(&[d(5)]));
}

#[test]
fn reductions_and_shape_ops() {
    let mut g = Graph::default();
    let x = input(&mut g, "x", f32t(&[s("b"), d(4), d(6)]));
    node1(
        &mut g,
        "ReduceMean",
        17,
        &[x],
        "rm",
        vec![ints("axes", &[-1])],
    );
    node1(
        &mut g,
        "ReduceMax",
        17,
        &[x],
        "rall",
        vec![int("keepdims", 0)],
    );
    let ax = i64_const(&mut g, "ax", &[1]);
    node1(
        &mut g,
        "ReduceSum",
        18,
        &[x, ax],
        "rs",
        vec![int("keepdims", 0)],
    );
    node1(
        &mut g,
        "ReduceSum",
        18,
        &[x],
        "noop",
        vec![int("noop_with_empty_axes", 1)],
    );
    node1(
        &mut g,
        "ArgMax",
        18,
        &[x],
        "am",
        vec![int("axis", 2), int("keepdims", 0)],
    );
    node1(
        &mut g,
        "Transpose",
        18,
        &[x],
        "tr",
        vec![ints("perm", &[2, 0, 1])],
    );
    node1(&mut g, "Concat", 18, &[x, x], "cat", vec![int("axis", -1)]);
    let parts = node_v(
        &mut g,
        "Split",
        18,
        &[Some(x)],
        &["p0", "p1", "p2"],
        vec![int("axis", 2), int("num_outputs", 3)],
    );
    let _ = parts;
    let idx = input(&mut g, "idx", ty(DType::I64, &[s("n"), d(2)]));
    node1(&mut g, "Gather", 18, &[x, idx], "ga", vec![int("axis", 1)]);
    node1(&mut g, "Shape", 18, &[x], "shp", vec![int("start", 1)]);
    node1(&mut g, "Size", 18, &[x], "size", vec![]);
    node1(
        &mut g,
        "Cast",
        18,
        &[x],
        "half",
        vec![int("to", DType::F16 as i64)],
    );
    let es = i64_const(&mut g, "es", &[3, 1, 1, 1]);
    node1(&mut g, "Expand", 18, &[x, es], "ex", vec![]);
    let pads = i64_const(&mut g, "pads", &[0, 1, 2, 0, 1, 2]);
    node1(&mut g, "Pad", 18, &[x, pads], "pad", vec![]);
    let k = i64_const(&mut g, "k", &[2]);
    node_v(
        &mut g,
        "TopK",
        18,
        &[Some(x), Some(k)],
        &["tv", "ti"],
        vec![],
    );
    let m = infer(g, 18);
    assert_eq!(value_type(&m, "rm"), f32t(&[s("b"), d(4), d(1)]));
    assert_eq!(value_type(&m, "rall"), f32t(&[]));
    assert_eq!(value_type(&m, "rs"), f32t(&[s("b"), d(6)]));
    assert_eq!(value_type(&m, "noop"), f32t(&[s("b"), d(4), d(6)]));
    assert_eq!(value_type(&m, "am"), ty(DType::I64, &[s("b"), d(4)]));
    assert_eq!(value_type(&m, "tr"), f32t(&[d(6), s("b"), d(4)]));
    assert_eq!(value_type(&m, "cat"), f32t(&[s("b"), d(4), d(12)]));
    assert_eq!(value_type(&m, "p2"), f32t(&[s("b"), d(4), d(2)]));
    assert_eq!(value_type(&m, "ga"), f32t(&[s("b"), s("n"), d(2), d(6)]));
    assert_eq!(value_type(&m, "shp"), ty(DType::I64, &[d(2)]));
    assert_eq!(value_type(&m, "size"), ty(DType::I64, &[]));
    assert_eq!(
        value_type(&m, "half"),
        ty(DType::F16, &[s("b"), d(4), d(6)])
    );
    assert_eq!(value_type(&m, "ex"), f32t(&[d(3), s("b"), d(4), d(6)]));
    assert_eq!(value_type(&m, "pad"), f32t(&[s("b"), d(6), d(10)]));
    assert_eq!(value_type(&m, "ti"), ty(DType::I64, &[s("b"), d(4), d(2)]));
}

#[test]
fn resize_lstm_and_layernorm() {
    let mut g = Graph::default();
    let x = input(&mut g, "x", f32t(&[d(1), d(3), d(10), d(20)]));
    let scales = g.add_const(
        "scales",
        Tensor::from_vec(&[4], vec![1f32, 1.0, 2.0, 0.5]).unwrap(),
    );
    node_v(
        &mut g,
        "Resize",
        13,
        &[Some(x), None, Some(scales)],
        &["up"],
        vec![],
    );
    let sizes = i64_const(&mut g, "sizes", &[5, 5]);
    node_v(
        &mut g,
        "Resize",
        19,
        &[Some(x), None, None, Some(sizes)],
        &["fit"],
        vec![
            ints("axes", &[2, 3]),
            string("keep_aspect_ratio_policy", "not_larger"),
        ],
    );
    let seq = input(&mut g, "seq", f32t(&[s("t"), s("b"), d(8)]));
    let w = input(&mut g, "W", f32t(&[d(2), d(64), d(8)]));
    let r = input(&mut g, "R", f32t(&[d(2), d(64), d(16)]));
    node_v(
        &mut g,
        "LSTM",
        14,
        &[Some(seq), Some(w), Some(r)],
        &["Y", "Y_h", "Y_c"],
        vec![int("hidden_size", 16), string("direction", "bidirectional")],
    );
    node_v(
        &mut g,
        "LayerNormalization",
        17,
        &[Some(seq), Some(w)],
        &["ln", "mean", "inv"],
        vec![int("axis", -1)],
    );
    let m = infer(g, 19);
    assert_eq!(value_type(&m, "up"), f32t(&[d(1), d(3), d(20), d(10)]));
    assert_eq!(value_type(&m, "fit"), f32t(&[d(1), d(3), d(3), d(5)]));
    assert_eq!(value_type(&m, "Y"), f32t(&[s("t"), d(2), s("b"), d(16)]));
    assert_eq!(value_type(&m, "Y_c"), f32t(&[d(2), s("b"), d(16)]));
    assert_eq!(value_type(&m, "ln"), f32t(&[s("t"), s("b"), d(8)]));
    assert_eq!(value_type(&m, "mean"), f32t(&[s("t"), s("b"), d(1)]));
}

#[test]
fn declared_types_are_kept_and_refined() {
    let mut g = Graph::default();
    let x = input(&mut g, "x", f32t(&[s("b"), d(4)]));
    let y = node1(&mut g, "Relu", 17, &[x], "y", vec![]);
    g.values[y].ty = Type::Tensor {
        dtype: None,
        shape: Some(vec![Dim::Unknown, s("four")]),
    };
    let u = node1(&mut g, "SomeCustomOp", 17, &[x], "u", vec![]);
    g.values[u].ty = f32t(&[d(9)]);
    node1(&mut g, "OtherCustomOp", 17, &[x], "v", vec![]);
    let m = infer(g, 17);
    assert_eq!(value_type(&m, "y"), f32t(&[s("b"), d(4)]));
    assert_eq!(value_type(&m, "u"), f32t(&[d(9)]));
    assert_eq!(value_type(&m, "v"), Type::Unknown);
}

fn branch(name: &str, op: &str, outer: &str, t: Type) -> Graph {
    let mut b = Graph {
        name: name.into(),
        ..Default::default()
    };
    let cap = b.add_value(outer, Type::Unknown);
    b.captures.push(cap);
    let o = node1(&mut b, op, 17, &[cap], &format!("{name}_out"), vec![]);
    let _ = t;
    b.outputs.push(o);
    b
}

#[test]
fn if_merges_branch_types() {
    let mut g = Graph::default();
    let c = input(&mut g, "cond", ty(DType::Bool, &[]));
    let x = input(&mut g, "x", f32t(&[s("b"), d(4)]));
    let _ = x;
    let then_g = branch("then", "Relu", "x", Type::Unknown);
    let else_g = branch("else", "Neg", "x", Type::Unknown);
    node1(
        &mut g,
        "If",
        17,
        &[c],
        "res",
        vec![
            attr("then_branch", AttrValue::Graph(Box::new(then_g))),
            attr("else_branch", AttrValue::Graph(Box::new(else_g))),
        ],
    );
    let m = infer(g, 17);
    assert_eq!(value_type(&m, "res"), f32t(&[s("b"), d(4)]));
    let node = &m.graph.nodes[0];
    let tb = node.subgraphs().next().unwrap();
    assert_eq!(tb.values[tb.outputs[0]].ty, f32t(&[s("b"), d(4)]));
}

#[test]
fn loop_carried_shape_widens_to_a_fixed_point() {
    // acc = Concat(acc, x) each iteration: its length is not the initial one.
    let mut body = Graph {
        name: "body".into(),
        ..Default::default()
    };
    let it = input(&mut body, "i", Type::Unknown);
    let cin = input(&mut body, "cin", Type::Unknown);
    let acc = input(&mut body, "acc", Type::Unknown);
    let keep = input(&mut body, "keep", Type::Unknown);
    let _ = it;
    let xcap = body.add_value("x", Type::Unknown);
    body.captures.push(xcap);
    let cout = node1(&mut body, "Identity", 17, &[cin], "cout", vec![]);
    let acc2 = node1(
        &mut body,
        "Concat",
        17,
        &[acc, xcap],
        "acc2",
        vec![int("axis", 0)],
    );
    let keep2 = node1(&mut body, "Identity", 17, &[keep], "keep2", vec![]);
    let scan = node1(&mut body, "Relu", 17, &[xcap], "scan", vec![]);
    body.outputs = vec![cout, acc2, keep2, scan];

    let mut g = Graph::default();
    let m_ = input(&mut g, "M", ty(DType::I64, &[]));
    let c = input(&mut g, "cond", ty(DType::Bool, &[]));
    let init = input(&mut g, "init", f32t(&[d(0), d(3)]));
    let keep0 = input(&mut g, "keep0", f32t(&[s("k"), d(3)]));
    let _x = input(&mut g, "x", f32t(&[d(2), d(3)]));
    node_v(
        &mut g,
        "Loop",
        17,
        &[Some(m_), Some(c), Some(init), Some(keep0)],
        &["acc_final", "keep_final", "scans"],
        vec![attr("body", AttrValue::Graph(Box::new(body)))],
    );
    let m = infer(g, 17);
    assert_eq!(value_type(&m, "acc_final"), f32t(&[Dim::Unknown, d(3)]));
    assert_eq!(value_type(&m, "keep_final"), f32t(&[s("k"), d(3)]));
    assert_eq!(value_type(&m, "scans"), f32t(&[Dim::Unknown, d(2), d(3)]));
}

#[test]
fn scan_outputs_stack_along_the_sequence() {
    let mut body = Graph {
        name: "body".into(),
        ..Default::default()
    };
    let st = input(&mut body, "st", Type::Unknown);
    let xi = input(&mut body, "xi", Type::Unknown);
    let st2 = node1(&mut body, "Add", 17, &[st, xi], "st2", vec![]);
    let y = node1(&mut body, "Identity", 17, &[st2], "y", vec![]);
    body.outputs = vec![st2, y];
    let mut g = Graph::default();
    let s0 = input(&mut g, "s0", f32t(&[d(4)]));
    let xs = input(&mut g, "xs", f32t(&[s("t"), d(4)]));
    node_v(
        &mut g,
        "Scan",
        17,
        &[Some(s0), Some(xs)],
        &["s_final", "ys"],
        vec![
            attr("body", AttrValue::Graph(Box::new(body))),
            int("num_scan_inputs", 1),
            ints("scan_output_axes", &[1]),
        ],
    );
    let m = infer(g, 17);
    assert_eq!(value_type(&m, "s_final"), f32t(&[d(4)]));
    assert_eq!(value_type(&m, "ys"), f32t(&[d(4), s("t")]));
}

#[test]
fn sequences_and_constants() {
    let mut g = Graph::default();
    let x = input(&mut g, "x", f32t(&[d(2), d(3)]));
    let sq = node1(&mut g, "SequenceConstruct", 17, &[x, x], "seq", vec![]);
    let pos = g.add_const("pos", Tensor::scalar(0i64));
    node1(&mut g, "SequenceAt", 17, &[sq, pos], "at", vec![]);
    node1(&mut g, "SequenceLength", 17, &[sq], "len", vec![]);
    node_v(
        &mut g,
        "Constant",
        17,
        &[],
        &["k"],
        vec![attr(
            "value",
            AttrValue::Tensor(Tensor::from_vec(&[2, 2], vec![1i32, 2, 3, 4]).unwrap()),
        )],
    );
    node_v(
        &mut g,
        "Constant",
        17,
        &[],
        &["kf"],
        vec![attr("value_floats", AttrValue::Floats(vec![1.0, 2.0]))],
    );
    let shp = i64_const(&mut g, "shp", &[2, 5]);
    node_v(
        &mut g,
        "ConstantOfShape",
        17,
        &[Some(shp)],
        &["cos"],
        vec![attr(
            "value",
            AttrValue::Tensor(Tensor::from_vec(&[1], vec![1i64]).unwrap()),
        )],
    );
    let m = infer(g, 17);
    assert_eq!(
        value_type(&m, "seq"),
        Type::Sequence(Box::new(f32t(&[d(2), d(3)])))
    );
    assert_eq!(value_type(&m, "at"), f32t(&[d(2), d(3)]));
    assert_eq!(value_type(&m, "len"), ty(DType::I64, &[]));
    assert_eq!(value_type(&m, "k"), ty(DType::I32, &[d(2), d(2)]));
    assert_eq!(value_type(&m, "kf"), f32t(&[d(2)]));
    assert_eq!(value_type(&m, "cos"), ty(DType::I64, &[d(2), d(5)]));
}

#[test]
fn exporter_shape_arithmetic_keeps_symbols() {
    // torch's Expand pattern: where(shape == -1, 1, shape), and position ids sliced to [0:seq].
    let mut g = Graph::default();
    let ids = input(&mut g, "ids", ty(DType::I64, &[s("b"), s("seq")]));
    let pos = g.add_const(
        "pos",
        Tensor::from_vec(&[1, 512], (0..512i64).collect()).unwrap(),
    );
    let sh = node1(&mut g, "Shape", 17, &[ids], "sh", vec![]);
    let one = g.add_const("one", Tensor::scalar(1i64));
    let seq = node1(&mut g, "Gather", 17, &[sh, one], "seq", vec![]);
    let zero = i64_const(&mut g, "zero", &[0]);
    let seq1 = node1(&mut g, "Unsqueeze", 17, &[seq, zero], "seq1", vec![]);
    let ax1 = i64_const(&mut g, "ax1", &[1]);
    let sl = node1(&mut g, "Slice", 17, &[pos, zero, seq1, ax1], "sl", vec![]);
    let two = i64_const(&mut g, "two", &[2]);
    let ones = node1(
        &mut g,
        "ConstantOfShape",
        17,
        &[two],
        "ones",
        vec![attr(
            "value",
            AttrValue::Tensor(Tensor::from_vec(&[1], vec![1i64]).unwrap()),
        )],
    );
    let neg = i64_const(&mut g, "neg", &[-1]);
    let minus = node1(&mut g, "Mul", 17, &[ones, neg], "minus", vec![]);
    let eq = node1(&mut g, "Equal", 17, &[sh, minus], "eq", vec![]);
    let wh = node1(&mut g, "Where", 17, &[eq, ones, sh], "wh", vec![]);
    node1(&mut g, "Expand", 17, &[sl, wh], "ex", vec![]);
    let m = infer(g, 17);
    assert_eq!(value_type(&m, "sl"), ty(DType::I64, &[d(1), s("seq")]));
    assert_eq!(value_type(&m, "ex"), ty(DType::I64, &[s("b"), s("seq")]));
}

#[test]
fn stride_one_same_padding_keeps_symbolic_spatial_dims() {
    let mut g = Graph::default();
    let x = input(&mut g, "x", f32t(&[s("n"), d(3), s("h"), s("w")]));
    let w = input(&mut g, "w", f32t(&[d(8), d(3), d(3), d(3)]));
    node1(
        &mut g,
        "Conv",
        13,
        &[x, w],
        "same",
        vec![ints("pads", &[1, 1, 1, 1])],
    );
    node1(&mut g, "Conv", 13, &[x, w], "nopad", vec![]);
    let m = infer(g, 13);
    assert_eq!(
        value_type(&m, "same"),
        f32t(&[s("n"), d(8), s("h"), s("w")])
    );
    assert_eq!(
        value_type(&m, "nopad"),
        f32t(&[s("n"), d(8), Dim::Unknown, Dim::Unknown])
    );
}

#[test]
fn if_with_a_known_condition_types_like_its_branch() {
    let mut g = Graph::default();
    let x = input(&mut g, "x", f32t(&[s("b"), d(4)]));
    let sh = node1(&mut g, "Shape", 17, &[x], "sh", vec![]);
    let i1 = g.add_const("i1", Tensor::scalar(1i64));
    let last = node1(&mut g, "Gather", 17, &[sh, i1], "last", vec![]);
    let four = g.add_const("four", Tensor::scalar(4i64));
    let c = node1(&mut g, "Equal", 17, &[last, four], "c", vec![]);
    let mut then_g = Graph {
        name: "then".into(),
        ..Default::default()
    };
    let cap = then_g.add_value("x", Type::Unknown);
    then_g.captures.push(cap);
    let o = node1(&mut then_g, "Identity", 17, &[cap], "t", vec![]);
    then_g.outputs.push(o);
    let mut else_g = Graph {
        name: "else".into(),
        ..Default::default()
    };
    let cap2 = else_g.add_value("x", Type::Unknown);
    else_g.captures.push(cap2);
    node1(
        &mut else_g,
        "Flatten",
        17,
        &[cap2],
        "e",
        vec![int("axis", 0)],
    );
    let e = else_g.values.len() - 1;
    else_g.outputs.push(e);
    node1(
        &mut g,
        "If",
        17,
        &[c],
        "res",
        vec![
            attr("then_branch", AttrValue::Graph(Box::new(then_g))),
            attr("else_branch", AttrValue::Graph(Box::new(else_g))),
        ],
    );
    let m = infer(g, 17);
    assert_eq!(value_type(&m, "res"), f32t(&[s("b"), d(4)]));
}

#[test]
fn inferred_symbols_replace_made_up_declared_ones() {
    let mut g = Graph::default();
    let x = input(&mut g, "x", f32t(&[s("batch"), d(4)]));
    let y = node1(&mut g, "Relu", 17, &[x], "y", vec![]);
    g.values[y].ty = f32t(&[s("Relu_dim_0"), Dim::Unknown]);
    let m = infer(g, 17);
    assert_eq!(value_type(&m, "y"), f32t(&[s("batch"), d(4)]));
}
