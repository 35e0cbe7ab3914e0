//! Snapshot tests of the IR text dump.

mod common;

use common::*;
use kiln_compiler::dump::dump;
use kiln_compiler::infer::infer_types;
use kiln_compiler::ir::{AttrValue, Graph, Node, Type};
use kiln_runtime::{DType, Tensor};

fn small_model() -> kiln_compiler::ir::Model {
    let mut g = Graph {
        name: "main".into(),
        ..Default::default()
    };
    let ids = input(&mut g, "input_ids", ty(DType::I64, &[s("batch"), s("seq")]));
    let emb = g.add_const(
        "emb",
        Tensor::from_vec(&[100, 16], vec![0.25f32; 1600]).unwrap(),
    );
    let w = g.add_const(
        "weight",
        Tensor::from_vec(&[16, 2], vec![1.5f32; 32]).unwrap(),
    );
    let bias = g.add_const("bias", Tensor::from_vec(&[2], vec![0.5f32, -1.0]).unwrap());
    let e = node1(
        &mut g,
        "Gather",
        17,
        &[emb, ids],
        "embedded",
        vec![int("axis", 0)],
    );
    let mm = node1(&mut g, "MatMul", 17, &[e, w], "", vec![]);
    let logits = node1(&mut g, "Add", 17, &[mm, bias], "logits", vec![]);
    let flag = input(&mut g, "flag", ty(DType::Bool, &[]));

    let mut then_g = Graph {
        name: "then".into(),
        ..Default::default()
    };
    let cap = then_g.add_value("logits", Type::Unknown);
    then_g.captures.push(cap);
    let t = node1(
        &mut then_g,
        "Softmax",
        17,
        &[cap],
        "probs",
        vec![int("axis", -1)],
    );
    then_g.outputs.push(t);
    let mut else_g = Graph {
        name: "else".into(),
        ..Default::default()
    };
    let cap2 = else_g.add_value("logits", Type::Unknown);
    else_g.captures.push(cap2);
    let e2 = node1(&mut else_g, "Identity", 17, &[cap2], "same", vec![]);
    else_g.outputs.push(e2);
    let out = node1(
        &mut g,
        "If",
        17,
        &[flag],
        "out",
        vec![
            attr("then_branch", AttrValue::Graph(Box::new(then_g))),
            attr("else_branch", AttrValue::Graph(Box::new(else_g))),
        ],
    );
    g.outputs = vec![logits, out];
    let mut m = model(g, 17);
    m.producer = "hand".into();
    infer_types(&mut m).unwrap();
    m
}

#[test]
fn dump_small_model() {
    insta::assert_snapshot!(dump(&small_model()));
}

#[test]
fn dump_attribute_kinds() {
    let mut g = Graph::default();
    let x = input(
        &mut g,
        "x",
        Type::Tensor {
            dtype: Some(DType::F16),
            shape: None,
        },
    );
    let names = g.add_const(
        "names",
        Tensor::from_strings(&[2], vec!["a".into(), "b\"q".into()]).unwrap(),
    );
    let _ = names;
    let o1 = g.add_value("o1", Type::Unknown);
    let o3 = g.add_value(
        "o3",
        Type::Sequence(Box::new(Type::tensor(DType::F32, vec![]))),
    );
    g.nodes.push(Node {
        name: "custom".into(),
        op: "Fancy".into(),
        domain: "com.example".into(),
        opset: 1,
        inputs: vec![Some(x), None, Some(x)],
        outputs: vec![Some(o1), None, Some(o3)],
        attrs: vec![
            attr("alpha", AttrValue::Float(0.5)),
            ints("perm", &[1, 0]),
            attr("scales", AttrValue::Floats(vec![1.0, 2.5])),
            string("mode", "linear"),
            attr(
                "tags",
                AttrValue::Strings(vec![b"x".to_vec(), b"y".to_vec()]),
            ),
            attr(
                "value",
                AttrValue::Tensor(Tensor::from_vec(&[3], vec![true, false, true]).unwrap()),
            ),
            attr("big", AttrValue::Tensor(Tensor::zeros(DType::I8, &[4, 4]))),
            attr(
                "type",
                AttrValue::Type(Type::Optional(Box::new(Type::tensor(DType::I32, vec![])))),
            ),
        ],
    });
    g.outputs = vec![o1];
    insta::assert_snapshot!(dump(&model(g, 13)));
}
