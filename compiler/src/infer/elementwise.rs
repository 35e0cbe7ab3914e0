//! Shapes of elementwise ops: unary ops keep their input's shape, n-ary ops broadcast.

use super::dims::broadcast;
use super::Cx;
use crate::ir::Dim;

/// Every output has input 0's shape.
const SAME_SHAPE: &[&str] = &[
    "Abs",
    "Acos",
    "Acosh",
    "Asin",
    "Asinh",
    "Atan",
    "Atanh",
    "Bernoulli",
    "BitCast",
    "BitwiseNot",
    "Cast",
    "CastLike",
    "Ceil",
    "Celu",
    "Clip",
    "Cos",
    "Cosh",
    "CumProd",
    "CumSum",
    "DequantizeLinear",
    "Dropout",
    "Elu",
    "Erf",
    "Exp",
    "EyeLike",
    "Floor",
    "Gelu",
    "GroupNormalization",
    "HardSigmoid",
    "Hardmax",
    "HardSwish",
    "Identity",
    "InstanceNormalization",
    "IsInf",
    "IsNaN",
    "LeakyRelu",
    "Log",
    "LogSoftmax",
    "LpNormalization",
    "LRN",
    "MeanVarianceNormalization",
    "Mish",
    "Neg",
    "Not",
    "QuantizeLinear",
    "RandomNormalLike",
    "RandomUniformLike",
    "Reciprocal",
    "RegexFullMatch",
    "Relu",
    "ReverseSequence",
    "RMSNormalization",
    "RotaryEmbedding",
    "Round",
    "Scatter",
    "ScatterElements",
    "ScatterND",
    "Selu",
    "Shrink",
    "Sigmoid",
    "Sign",
    "Sin",
    "Sinh",
    "Softmax",
    "Softplus",
    "Softsign",
    "Sqrt",
    "Swish",
    "Tan",
    "Tanh",
    "TensorScatter",
    "ThresholdedRelu",
    "Trilu",
];

/// Output 0 is the multidirectional broadcast of all inputs.
const BROADCAST: &[&str] = &[
    "Add",
    "And",
    "BitShift",
    "BitwiseAnd",
    "BitwiseOr",
    "BitwiseXor",
    "Div",
    "Equal",
    "Greater",
    "GreaterOrEqual",
    "Less",
    "LessOrEqual",
    "Max",
    "Mean",
    "Min",
    "Mod",
    "Mul",
    "Or",
    "Pow",
    "StringConcat",
    "Sub",
    "Sum",
    "Where",
    "Xor",
];

pub(crate) fn shapes(cx: &Cx) -> Option<Vec<Option<Vec<Dim>>>> {
    let op = cx.op();
    if SAME_SHAPE.contains(&op) {
        let s = cx.shape(0).map(|s| s.to_vec());
        return Some(vec![s; cx.n_out()]);
    }
    if op == "PRelu" {
        // The slope broadcasts to X, never the other way.
        return Some(vec![cx.shape(0).map(|s| s.to_vec())]);
    }
    if BROADCAST.contains(&op) {
        let shapes: Option<Vec<&[Dim]>> = (0..cx.n_in()).map(|i| cx.shape(i)).collect();
        return Some(vec![shapes.map(|s| broadcast(&s))]);
    }
    None
}
