//! Each fusion on a small hand-built graph: the default pipeline must rewrite it into the expected
//! op and compute the same outputs as the graph compiled with every optimisation skipped (both run
//! on the CPU backend). The fused IR of each is snapshot-tested with insta.

use kiln_backends::CpuBackend;
use kiln_compiler::dump::dump;
use kiln_compiler::ir::{AttrValue, Attribute, Dim, Graph, Model, Node, Type, ValueId};
use kiln_passes::pipeline::compile_model;
use kiln_passes::{CompileOptions, OPTIMIZATIONS};
use kiln_runtime::{Artifact, DType, Tensor};

struct Builder {
    g: Graph,
}

impl Builder {
    fn new() -> Builder {
        Builder { g: Graph { name: "main".into(), ..Default::default() } }
    }

    fn input(&mut self, name: &str, shape: &[usize]) -> ValueId {
        let v = self.g.add_value(name, Type::tensor(DType::F32, shape.iter().map(|&d| Dim::Fixed(d)).collect()));
        self.g.inputs.push(v);
        v
    }

    fn konst(&mut self, name: &str, shape: &[usize], v: Vec<f32>) -> ValueId {
        self.g.add_const(name, Tensor::from_vec(shape, v).unwrap())
    }

    fn scalar(&mut self, v: f32) -> ValueId {
        let name = format!("c{}", self.g.values.len());
        self.g.add_const(name, Tensor::scalar(v))
    }

    fn node(&mut self, op: &str, opset: i64, inputs: &[ValueId], attrs: Vec<Attribute>) -> ValueId {
        let out = self.g.add_value(format!("{}_{}", op.to_lowercase(), self.g.values.len()), Type::Unknown);
        self.g.nodes.push(Node {
            name: format!("{op}_{}", self.g.nodes.len()),
            op: op.into(),
            domain: String::new(),
            opset,
            inputs: inputs.iter().map(|&v| Some(v)).collect(),
            outputs: vec![Some(out)],
            attrs,
        });
        out
    }

    fn finish(mut self, outputs: &[ValueId]) -> Model {
        self.g.outputs = outputs.to_vec();
        Model { graph: self.g, opsets: vec![(String::new(), 17)], ir_version: 8, ..Default::default() }
    }
}

fn ints(name: &str, v: &[i64]) -> Attribute {
    Attribute { name: name.into(), value: AttrValue::Ints(v.to_vec()) }
}

/// A deterministic spread of values in [-3, 3].
fn data(n: usize, seed: u32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2654435761).wrapping_add(12345);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(1664525).wrapping_add(1013904223);
            (s >> 8) as f32 / (1u32 << 24) as f32 * 6.0 - 3.0
        })
        .collect()
}

fn run(model: &Model, opts: &CompileOptions, inputs: &[Tensor]) -> (Vec<Tensor>, Model) {
    let compiled = compile_model(model.clone(), opts).expect("compiles");
    let bytes = kiln_compiler::writer::to_bytes(&compiled.lowered).expect("serializes");
    let art = Artifact::from_vec(bytes).expect("valid artifact");
    let m = kiln_runtime::Model::new(art, &CpuBackend::new(1).unwrap()).expect("loads");
    let out = m.session().run(inputs.to_vec()).expect("runs");
    (out, compiled.model)
}

/// Compile with and without optimisations, require the same outputs, return the fused IR.
fn check(model: Model, inputs: &[Tensor], expect_ops: &[&str]) -> Model {
    let unopt = CompileOptions { skip: OPTIMIZATIONS.iter().map(|s| s.to_string()).collect(), ..Default::default() };
    let (want, _) = run(&model, &unopt, inputs);
    // Weight prepacking has its own tests; its output depends on this machine's ISA, which would
    // make the snapshots differ between machines.
    let fuse_only = CompileOptions { skip: vec!["prepack".into()], ..Default::default() };
    let (got, fused) = run(&model, &fuse_only, inputs);
    let ops: Vec<String> = fused.graph.nodes.iter().map(|n| n.op.clone()).collect();
    assert_eq!(ops, expect_ops, "ops after fusion");
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g.shape(), w.shape());
        for (a, b) in g.view::<f32>().unwrap().iter().zip(w.view::<f32>().unwrap()) {
            assert!((a - b).abs() <= 1e-5 + 1e-5 * b.abs(), "fused {a} vs unfused {b}");
        }
    }
    fused
}

#[test]
fn gelu_erf_form() {
    let mut b = Builder::new();
    let x = b.input("x", &[2, 8]);
    let sqrt2 = b.scalar(std::f32::consts::SQRT_2);
    let one = b.scalar(1.0);
    let half = b.scalar(0.5);
    let d = b.node("Div", 17, &[x, sqrt2], vec![]);
    let e = b.node("Erf", 17, &[d], vec![]);
    let a = b.node("Add", 17, &[e, one], vec![]);
    let m = b.node("Mul", 17, &[x, a], vec![]);
    let y = b.node("Mul", 17, &[m, half], vec![]);
    let fused = check(b.finish(&[y]), &[Tensor::from_vec(&[2, 8], data(16, 1)).unwrap()], &["Gelu"]);
    insta::assert_snapshot!(dump(&fused));
}

#[test]
fn gelu_tanh_form() {
    let mut b = Builder::new();
    let x = b.input("x", &[3, 5]);
    let three = b.scalar(3.0);
    let c = b.scalar(0.044715);
    let k = b.scalar((2.0f32 / std::f32::consts::PI).sqrt());
    let one = b.scalar(1.0);
    let half = b.scalar(0.5);
    let cube = b.node("Pow", 17, &[x, three], vec![]);
    let cc = b.node("Mul", 17, &[cube, c], vec![]);
    let inner = b.node("Add", 17, &[x, cc], vec![]);
    let arg = b.node("Mul", 17, &[inner, k], vec![]);
    let t = b.node("Tanh", 17, &[arg], vec![]);
    let t1 = b.node("Add", 17, &[t, one], vec![]);
    let xh = b.node("Mul", 17, &[x, half], vec![]);
    let y = b.node("Mul", 17, &[xh, t1], vec![]);
    check(b.finish(&[y]), &[Tensor::from_vec(&[3, 5], data(15, 2)).unwrap()], &["Gelu"]);
}

#[test]
fn layernorm_decomposed() {
    let mut b = Builder::new();
    let x = b.input("x", &[2, 3, 8]);
    let two = b.scalar(2.0);
    let eps = b.scalar(1e-5);
    let gamma = b.konst("gamma", &[8], data(8, 3));
    let beta = b.konst("beta", &[8], data(8, 4));
    let mean = b.node("ReduceMean", 17, &[x], vec![ints("axes", &[-1])]);
    let d = b.node("Sub", 17, &[x, mean], vec![]);
    let sq = b.node("Pow", 17, &[d, two], vec![]);
    let var = b.node("ReduceMean", 17, &[sq], vec![ints("axes", &[-1])]);
    let ve = b.node("Add", 17, &[var, eps], vec![]);
    let sd = b.node("Sqrt", 17, &[ve], vec![]);
    let n = b.node("Div", 17, &[d, sd], vec![]);
    let sc = b.node("Mul", 17, &[n, gamma], vec![]);
    let y = b.node("Add", 17, &[sc, beta], vec![]);
    let fused = check(b.finish(&[y]), &[Tensor::from_vec(&[2, 3, 8], data(48, 5)).unwrap()], &["LayerNormalization"]);
    insta::assert_snapshot!(dump(&fused));
}

#[test]
fn layernorm_over_a_middle_axis_is_left_alone() {
    let mut b = Builder::new();
    let x = b.input("x", &[2, 8, 3]);
    let two = b.scalar(2.0);
    let eps = b.scalar(1e-5);
    let gamma = b.konst("gamma", &[1, 3], data(3, 3));
    let beta = b.konst("beta", &[1, 3], data(3, 4));
    let mean = b.node("ReduceMean", 17, &[x], vec![ints("axes", &[1])]);
    let d = b.node("Sub", 17, &[x, mean], vec![]);
    let sq = b.node("Pow", 17, &[d, two], vec![]);
    let var = b.node("ReduceMean", 17, &[sq], vec![ints("axes", &[1])]);
    let ve = b.node("Add", 17, &[var, eps], vec![]);
    let sd = b.node("Sqrt", 17, &[ve], vec![]);
    let n = b.node("Div", 17, &[d, sd], vec![]);
    let sc = b.node("Mul", 17, &[n, gamma], vec![]);
    let y = b.node("Add", 17, &[sc, beta], vec![]);
    check(
        b.finish(&[y]),
        &[Tensor::from_vec(&[2, 8, 3], data(48, 6)).unwrap()],
        &["ReduceMean", "Sub", "Pow", "ReduceMean", "Add", "Sqrt", "Div", "Mul", "Add"],
    );
}

#[test]
fn matmul_bias_relu_becomes_one_fused_matmul() {
    let mut b = Builder::new();
    let x = b.input("x", &[1, 4, 6]);
    let w = b.konst("w", &[6, 5], data(30, 7));
    let bias = b.konst("bias", &[5], data(5, 8));
    let mm = b.node("MatMul", 17, &[x, w], vec![]);
    let a = b.node("Add", 17, &[mm, bias], vec![]);
    let y = b.node("Relu", 17, &[a], vec![]);
    let fused = check(b.finish(&[y]), &[Tensor::from_vec(&[1, 4, 6], data(24, 9)).unwrap()], &["FusedMatMul"]);
    insta::assert_snapshot!(dump(&fused));
}

#[test]
fn conv_batchnorm_clip_becomes_one_fused_conv() {
    let mut b = Builder::new();
    let x = b.input("x", &[1, 2, 5, 5]);
    let w = b.konst("w", &[3, 2, 3, 3], data(54, 10));
    let cb = b.konst("cb", &[3], data(3, 11));
    let scale = b.konst("scale", &[3], vec![0.5, 1.5, -1.0]);
    let bias = b.konst("bias", &[3], data(3, 12));
    let mean = b.konst("mean", &[3], data(3, 13));
    let var = b.konst("var", &[3], vec![0.25, 1.0, 4.0]);
    let lo = b.scalar(0.0);
    let hi = b.scalar(6.0);
    let pads = ints("pads", &[1, 1, 1, 1]);
    let c = b.node("Conv", 17, &[x, w, cb], vec![pads]);
    let bn = b.node("BatchNormalization", 15, &[c, scale, bias, mean, var], vec![]);
    let y = b.node("Clip", 17, &[bn, lo, hi], vec![]);
    let fused = check(b.finish(&[y]), &[Tensor::from_vec(&[1, 2, 5, 5], data(50, 14)).unwrap()], &["FusedConv"]);
    insta::assert_snapshot!(dump(&fused));
}

#[test]
fn conv_then_x_times_sigmoid_x_becomes_one_fused_conv_with_silu() {
    // YOLOv8's Conv → SiLU, exported as Mul(x, Sigmoid(x)); the second Conv has it the other way
    // round, and the third's Sigmoid is read elsewhere too, so it stays apart.
    let mut b = Builder::new();
    let x = b.input("x", &[1, 2, 5, 5]);
    let w1 = b.konst("w1", &[3, 2, 3, 3], data(54, 20));
    let w2 = b.konst("w2", &[3, 3, 1, 1], data(9, 21));
    let w3 = b.konst("w3", &[2, 3, 1, 1], data(6, 22));
    let c1 = b.node("Conv", 17, &[x, w1], vec![ints("pads", &[1, 1, 1, 1])]);
    let s1 = b.node("Sigmoid", 13, &[c1], vec![]);
    let y1 = b.node("Mul", 14, &[c1, s1], vec![]);
    let c2 = b.node("Conv", 17, &[y1, w2], vec![]);
    let s2 = b.node("Sigmoid", 13, &[c2], vec![]);
    let y2 = b.node("Mul", 14, &[s2, c2], vec![]);
    let c3 = b.node("Conv", 17, &[y2, w3], vec![]);
    let s3 = b.node("Sigmoid", 13, &[c3], vec![]);
    let y3 = b.node("Mul", 14, &[c3, s3], vec![]);
    let fused = check(
        b.finish(&[y3, s3]),
        &[Tensor::from_vec(&[1, 2, 5, 5], data(50, 23)).unwrap()],
        &["FusedConv", "FusedConv", "Conv", "Sigmoid", "Mul"],
    );
    let acts: Vec<Option<&str>> = fused.graph.nodes.iter().map(|n| n.attr_str("activation")).collect();
    assert_eq!(acts[..2], [Some("Silu"), Some("Silu")]);
}

/// ConvTranspose's weight is [C, M/group, kh, kw]: the BatchNormalization scale of output
/// channel m lands on the second index, per input group.
#[test]
fn conv_transpose_batchnorm_folds_into_the_conv_transpose() {
    for group in [1usize, 2] {
        let mut b = Builder::new();
        let x = b.input("x", &[1, 4, 3, 3]);
        let w = b.konst("w", &[4, 3, 2, 2], data(48, 20));
        let cb = b.konst("cb", &[3 * group], data(3 * group, 21));
        let scale = b.konst("scale", &[3 * group], data(3 * group, 22));
        let bias = b.konst("bias", &[3 * group], data(3 * group, 23));
        let mean = b.konst("mean", &[3 * group], data(3 * group, 24));
        let var = b.konst("var", &[3 * group], (0..3 * group).map(|i| 0.5 + i as f32).collect());
        let attrs = vec![ints("strides", &[2, 2]), Attribute { name: "group".into(), value: AttrValue::Int(group as i64) }];
        let c = b.node("ConvTranspose", 11, &[x, w, cb], attrs.clone());
        let y = b.node("BatchNormalization", 15, &[c, scale, bias, mean, var], vec![]);
        // The form PaddleOCR exports: the bias as a separate Add between the two.
        let ab = b.konst("ab", &[1, 3 * group, 1, 1], data(3 * group, 26));
        let c2 = b.node("ConvTranspose", 11, &[x, w], attrs);
        let a2 = b.node("Add", 14, &[c2, ab], vec![]);
        let y2 = b.node("BatchNormalization", 15, &[a2, scale, bias, mean, var], vec![]);
        check(b.finish(&[y, y2]), &[Tensor::from_vec(&[1, 4, 3, 3], data(36, 25)).unwrap()], &["ConvTranspose", "ConvTranspose"]);
    }
}

#[test]
fn hardswish_softmax_and_identity() {
    let mut b = Builder::new();
    let x = b.input("x", &[2, 6]);
    let three = b.scalar(3.0);
    let zero = b.scalar(0.0);
    let six = b.scalar(6.0);
    let id = b.node("Identity", 17, &[x], vec![]);
    let p3 = b.node("Add", 17, &[id, three], vec![]);
    let r6 = b.node("Clip", 17, &[p3, zero, six], vec![]);
    let m = b.node("Mul", 17, &[id, r6], vec![]);
    let six2 = b.scalar(6.0);
    let hs = b.node("Div", 17, &[m, six2], vec![]);
    let mx = b.node("ReduceMax", 17, &[hs], vec![ints("axes", &[-1])]);
    let sh = b.node("Sub", 17, &[hs, mx], vec![]);
    let e = b.node("Exp", 17, &[sh], vec![]);
    let axes = b.g.add_const("axes", Tensor::from_vec(&[1], vec![-1i64]).unwrap());
    let s = b.node("ReduceSum", 17, &[e, axes], vec![]);
    let y = b.node("Div", 17, &[e, s], vec![]);
    check(b.finish(&[y]), &[Tensor::from_vec(&[2, 6], data(12, 15)).unwrap()], &["HardSwish", "Softmax"]);
}

#[test]
fn a_value_read_outside_the_pattern_blocks_the_fusion() {
    // The MatMul result is also a graph output, so MatMul + Add must stay apart.
    let mut b = Builder::new();
    let x = b.input("x", &[2, 3]);
    let w = b.konst("w", &[3, 2], data(6, 16));
    let bias = b.konst("bias", &[2], data(2, 17));
    let mm = b.node("MatMul", 17, &[x, w], vec![]);
    let y = b.node("Add", 17, &[mm, bias], vec![]);
    check(b.finish(&[y, mm]), &[Tensor::from_vec(&[2, 3], data(6, 18)).unwrap()], &["MatMul", "Add"]);
}

fn i64s(b: &mut Builder, name: &str, v: &[i64]) -> ValueId {
    b.g.add_const(name, Tensor::from_vec(&[v.len()], v.to_vec()).unwrap())
}

fn perm(v: &[i64]) -> Vec<Attribute> {
    vec![ints("perm", v)]
}

#[test]
fn attention_in_the_exported_bert_form() {
    // MiniLM's self-attention: heads split by Reshape + Transpose, scores divided by √D, an
    // additive [B,1,1,S] mask, Softmax, ·V, heads merged by Transpose + Reshape.
    let (bs, s, h, d) = (2usize, 5usize, 2usize, 4usize);
    let mut b = Builder::new();
    let xq = b.input("q", &[bs, s, h * d]);
    let xk = b.input("k", &[bs, s, h * d]);
    let xv = b.input("v", &[bs, s, h * d]);
    let mask = b.input("mask", &[bs, 1, 1, s]);
    let split = i64s(&mut b, "split", &[bs as i64, s as i64, h as i64, d as i64]);
    let merge = i64s(&mut b, "merge", &[bs as i64, s as i64, (h * d) as i64]);
    let rq = b.node("Reshape", 17, &[xq, split], vec![]);
    let rk = b.node("Reshape", 17, &[xk, split], vec![]);
    let rv = b.node("Reshape", 17, &[xv, split], vec![]);
    let q = b.node("Transpose", 17, &[rq], perm(&[0, 2, 1, 3]));
    let kt = b.node("Transpose", 17, &[rk], perm(&[0, 2, 3, 1]));
    let v = b.node("Transpose", 17, &[rv], perm(&[0, 2, 1, 3]));
    let sc = b.node("MatMul", 17, &[q, kt], vec![]);
    let sqrt_d = b.scalar((d as f32).sqrt());
    let scaled = b.node("Div", 17, &[sc, sqrt_d], vec![]);
    let masked = b.node("Add", 17, &[scaled, mask], vec![]);
    let p = b.node("Softmax", 17, &[masked], vec![Attribute { name: "axis".into(), value: AttrValue::Int(-1) }]);
    let o = b.node("MatMul", 17, &[p, v], vec![]);
    let ot = b.node("Transpose", 17, &[o], perm(&[0, 2, 1, 3]));
    let y = b.node("Reshape", 17, &[ot, merge], vec![]);
    let n = bs * s * h * d;
    let m: Vec<f32> = data(bs * s, 23).into_iter().map(|x| if x < -1.0 { -10000.0 } else { 0.0 }).collect();
    let inputs = [
        Tensor::from_vec(&[bs, s, h * d], data(n, 20)).unwrap(),
        Tensor::from_vec(&[bs, s, h * d], data(n, 21)).unwrap(),
        Tensor::from_vec(&[bs, s, h * d], data(n, 22)).unwrap(),
        Tensor::from_vec(&[bs, 1, 1, s], m).unwrap(),
    ];
    let fused = check(b.finish(&[y]), &inputs, &["Reshape", "Reshape", "Reshape", "Attention", "Reshape"]);
    insta::assert_snapshot!(dump(&fused));
}

#[test]
fn attention_scaled_on_q_without_mask() {
    let mut b = Builder::new();
    let q = b.input("q", &[1, 2, 3, 4]);
    let k = b.input("k", &[1, 2, 6, 4]);
    let v = b.input("v", &[1, 2, 6, 5]);
    let half = b.scalar(0.5);
    let qs = b.node("Mul", 17, &[half, q], vec![]);
    let kt = b.node("Transpose", 17, &[k], perm(&[0, 1, 3, 2]));
    let sc = b.node("MatMul", 17, &[qs, kt], vec![]);
    let p = b.node("Softmax", 17, &[sc], vec![]);
    let y = b.node("MatMul", 17, &[p, v], vec![]);
    let inputs = [
        Tensor::from_vec(&[1, 2, 3, 4], data(24, 30)).unwrap(),
        Tensor::from_vec(&[1, 2, 6, 4], data(48, 31)).unwrap(),
        Tensor::from_vec(&[1, 2, 6, 5], data(60, 32)).unwrap(),
    ];
    let fused = check(b.finish(&[y]), &inputs, &["Attention"]);
    insta::assert_snapshot!(dump(&fused));
}

#[test]
fn attention_needs_softmax_over_the_last_axis() {
    let mut b = Builder::new();
    let q = b.input("q", &[1, 1, 3, 3]);
    let kt = b.input("kt", &[1, 1, 3, 3]);
    let v = b.input("v", &[1, 1, 3, 2]);
    let sc = b.node("MatMul", 17, &[q, kt], vec![]);
    let p = b.node("Softmax", 17, &[sc], vec![Attribute { name: "axis".into(), value: AttrValue::Int(2) }]);
    let y = b.node("MatMul", 17, &[p, v], vec![]);
    let inputs = [
        Tensor::from_vec(&[1, 1, 3, 3], data(9, 33)).unwrap(),
        Tensor::from_vec(&[1, 1, 3, 3], data(9, 34)).unwrap(),
        Tensor::from_vec(&[1, 1, 3, 2], data(6, 35)).unwrap(),
    ];
    check(b.finish(&[y]), &inputs, &["MatMul", "Softmax", "MatMul"]);
}

#[test]
fn transposes_cancel_and_compose() {
    let mut b = Builder::new();
    let x = b.input("x", &[2, 3, 4]);
    let t1 = b.node("Transpose", 17, &[x], perm(&[1, 0, 2]));
    let t2 = b.node("Transpose", 17, &[t1], perm(&[1, 0, 2]));
    let r = b.node("Relu", 17, &[t2], vec![]);
    let t3 = b.node("Transpose", 17, &[r], perm(&[2, 0, 1]));
    let y = b.node("Transpose", 17, &[t3], perm(&[0, 2, 1]));
    let fused = check(b.finish(&[y]), &[Tensor::from_vec(&[2, 3, 4], data(24, 40)).unwrap()], &["Relu", "Transpose"]);
    insta::assert_snapshot!(dump(&fused));
}

#[test]
fn reshapes_squeezes_and_unit_axis_transposes_simplify() {
    let mut b = Builder::new();
    let x = b.input("x", &[2, 3, 4]);
    let s64 = i64s(&mut b, "s64", &[6, 4]);
    let s46 = i64s(&mut b, "s46", &[4, 6]);
    let ax0 = i64s(&mut b, "ax0", &[0]);
    let ax1 = i64s(&mut b, "ax1", &[1]);
    let r1 = b.node("Reshape", 17, &[x, s64], vec![]);
    let r2 = b.node("Reshape", 17, &[r1, s46], vec![]);
    let u = b.node("Unsqueeze", 17, &[r2, ax0], vec![]);
    let sq = b.node("Squeeze", 17, &[u, ax0], vec![]);
    let r3 = b.node("Reshape", 17, &[sq, s46], vec![]);
    let a = b.node("Relu", 17, &[r3], vec![]);
    let u1 = b.node("Unsqueeze", 17, &[a, ax1], vec![]);
    let y = b.node("Transpose", 17, &[u1], perm(&[1, 0, 2]));
    let fused = check(
        b.finish(&[y]),
        &[Tensor::from_vec(&[2, 3, 4], data(24, 41)).unwrap()],
        &["Reshape", "Relu", "Unsqueeze", "Reshape"],
    );
    insta::assert_snapshot!(dump(&fused));
}

#[test]
fn a_transpose_moving_real_axes_stays() {
    let mut b = Builder::new();
    let x = b.input("x", &[2, 1, 3]);
    let y = b.node("Transpose", 17, &[x], perm(&[2, 1, 0]));
    check(b.finish(&[y]), &[Tensor::from_vec(&[2, 1, 3], data(6, 42)).unwrap()], &["Transpose"]);
}

#[test]
fn rmsnorm_decomposed() {
    let mut b = Builder::new();
    let x = b.input("x", &[2, 3, 8]);
    let two = b.scalar(2.0);
    let eps = b.scalar(1e-6);
    let gamma = b.konst("gamma", &[8], data(8, 50));
    let axes = i64s(&mut b, "axes", &[-1]);
    let sq = b.node("Pow", 17, &[x, two], vec![]);
    let ms = b.node("ReduceMean", 18, &[sq, axes], vec![]);
    let ve = b.node("Add", 17, &[ms, eps], vec![]);
    let sd = b.node("Sqrt", 17, &[ve], vec![]);
    let inv = b.node("Reciprocal", 17, &[sd], vec![]);
    let n = b.node("Mul", 17, &[x, inv], vec![]);
    let y = b.node("Mul", 17, &[gamma, n], vec![]);
    let fused = check(b.finish(&[y]), &[Tensor::from_vec(&[2, 3, 8], data(48, 51)).unwrap()], &["RMSNormalization"]);
    insta::assert_snapshot!(dump(&fused));
}

#[test]
fn conv_then_per_channel_mul_and_add_fold_into_the_conv() {
    let mut b = Builder::new();
    let x = b.input("x", &[1, 2, 4, 4]);
    let w = b.konst("w", &[3, 2, 3, 3], data(54, 60));
    let s = b.konst("s", &[3, 1, 1], vec![0.5, -2.0, 1.5]);
    let c = b.konst("c", &[1, 3, 1, 1], data(3, 61));
    let conv = b.node("Conv", 17, &[x, w], vec![ints("pads", &[1, 1, 1, 1])]);
    let add = b.node("Add", 17, &[conv, c], vec![]);
    let y = b.node("Mul", 17, &[s, add], vec![]);
    let fused = check(b.finish(&[y]), &[Tensor::from_vec(&[1, 2, 4, 4], data(32, 62)).unwrap()], &["Conv"]);
    insta::assert_snapshot!(dump(&fused));
}

/// A branch graph of `If` that captures the outer values named in `captures`.
fn branch(name: &str, captures: &[(&str, &[usize])]) -> (Graph, Vec<ValueId>) {
    let mut g = Graph { name: name.into(), ..Default::default() };
    let ids = captures
        .iter()
        .map(|(n, s)| {
            let v = g.add_value(*n, Type::tensor(DType::F32, s.iter().map(|&d| Dim::Fixed(d)).collect()));
            g.captures.push(v);
            v
        })
        .collect();
    (g, ids)
}

fn branch_node(g: &mut Graph, op: &str, inputs: &[ValueId], attrs: Vec<Attribute>) -> ValueId {
    let out = g.add_value(format!("{}_{}", op.to_lowercase(), g.values.len()), Type::Unknown);
    g.nodes.push(Node {
        name: format!("{}_{op}_{}", g.name, g.nodes.len()),
        op: op.into(),
        domain: String::new(),
        opset: 17,
        inputs: inputs.iter().map(|&v| Some(v)).collect(),
        outputs: vec![Some(out)],
        attrs,
    });
    out
}

#[test]
fn captured_constants_fold_inside_subgraphs_and_equal_blobs_are_stored_once() {
    // then: x + Concat(Slice(W, rows 0..32), Slice(W, rows 32..64)), all of it constant but x;
    // else: x - W, which must keep reading W from the enclosing graph.
    let mut b = Builder::new();
    let _x = b.input("x", &[64, 64]);
    let cond = b.g.add_value("cond", Type::tensor(DType::Bool, vec![]));
    b.g.inputs.push(cond);
    b.konst("W", &[64, 64], data(64 * 64, 7));
    let i64c = |g: &mut Graph, name: &str, v: i64| g.add_const(name, Tensor::from_vec(&[1], vec![v]).unwrap());
    let (mut then_g, ids) = branch("then", &[("x", &[64, 64]), ("W", &[64, 64])]);
    let (zero, half, full) = (i64c(&mut then_g, "zero", 0), i64c(&mut then_g, "half", 32), i64c(&mut then_g, "full", 64));
    let top = branch_node(&mut then_g, "Slice", &[ids[1], zero, half, zero], vec![]);
    let bottom = branch_node(&mut then_g, "Slice", &[ids[1], half, full, zero], vec![]);
    let w2 = branch_node(&mut then_g, "Concat", &[top, bottom], vec![Attribute { name: "axis".into(), value: AttrValue::Int(0) }]);
    let y = branch_node(&mut then_g, "Add", &[ids[0], w2], vec![]);
    then_g.outputs = vec![y];
    let (mut else_g, ids) = branch("else", &[("x", &[64, 64]), ("W", &[64, 64])]);
    let y = branch_node(&mut else_g, "Sub", &[ids[0], ids[1]], vec![]);
    else_g.outputs = vec![y];
    let out = b.g.add_value("y", Type::Unknown);
    b.g.nodes.push(Node {
        name: "If_0".into(),
        op: "If".into(),
        domain: String::new(),
        opset: 17,
        inputs: vec![Some(cond)],
        outputs: vec![Some(out)],
        attrs: vec![
            Attribute { name: "then_branch".into(), value: AttrValue::Graph(Box::new(then_g)) },
            Attribute { name: "else_branch".into(), value: AttrValue::Graph(Box::new(else_g)) },
        ],
    });
    let model = b.finish(&[out]);
    let xv = Tensor::from_vec(&[64, 64], data(64 * 64, 8)).unwrap();
    let mut fused = None;
    for c in [true, false] {
        fused = Some(check(model.clone(), &[xv.clone(), Tensor::scalar(c)], &["If"]));
    }
    let fused = fused.unwrap();
    let sub = |name: &str| match &fused.graph.nodes[0].attrs.iter().find(|a| a.name == name).unwrap().value {
        AttrValue::Graph(g) => (**g).clone(),
        _ => unreachable!(),
    };
    let (then_g, else_g) = (sub("then_branch"), sub("else_branch"));
    let ops: Vec<&str> = then_g.nodes.iter().map(|n| n.op.as_str()).collect();
    assert_eq!(ops, ["Add"], "the slices and the concat are folded");
    let captured = |g: &Graph| g.captures.iter().map(|&v| g.values[v].name.clone()).collect::<Vec<_>>();
    assert_eq!(captured(&then_g), ["x"], "W is no longer read from outside");
    assert_eq!(captured(&else_g), ["x", "W"], "W stays a capture where it is still read");
    // The folded concat equals W byte for byte: the artifact stores it once.
    let opts = CompileOptions { skip: vec!["prepack".into()], ..Default::default() };
    let compiled = compile_model(model, &opts).expect("compiles");
    assert_eq!(compiled.lowered.blobs.len(), 1, "one 16 KB blob for W and its folded copy");
}
