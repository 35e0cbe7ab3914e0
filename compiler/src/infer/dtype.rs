//! Output element types of ai.onnx ops. Most ops produce their first input's dtype; the table
//! below lists the ones that do not, and which ops are known to follow input 0.

use kiln_runtime::DType;

use super::Cx;
use crate::ir::AttrValue;

/// Ops whose every output has input 0's dtype (those not listed are handled case by case).
const SAME_AS_INPUT0: &[&str] = &[
    "Abs",
    "Acos",
    "Acosh",
    "Add",
    "AffineGrid",
    "Asin",
    "Asinh",
    "Atan",
    "Atanh",
    "AveragePool",
    "BatchNormalization",
    "BitShift",
    "BitwiseAnd",
    "BitwiseNot",
    "BitwiseOr",
    "BitwiseXor",
    "Ceil",
    "Celu",
    "CenterCropPad",
    "Clip",
    "Col2Im",
    "Compress",
    "Concat",
    "Conv",
    "ConvTranspose",
    "Cos",
    "Cosh",
    "CumProd",
    "CumSum",
    "DeformConv",
    "DepthToSpace",
    "Det",
    "DFT",
    "Div",
    "Einsum",
    "Elu",
    "Erf",
    "Exp",
    "Expand",
    "Flatten",
    "Floor",
    "Gather",
    "GatherElements",
    "GatherND",
    "Gelu",
    "Gemm",
    "GlobalAveragePool",
    "GlobalLpPool",
    "GlobalMaxPool",
    "GridSample",
    "GroupNormalization",
    "GRU",
    "HardSigmoid",
    "Hardmax",
    "HardSwish",
    "Identity",
    "InstanceNormalization",
    "LeakyRelu",
    "Log",
    "LogSoftmax",
    "LpNormalization",
    "LpPool",
    "LRN",
    "LSTM",
    "MatMul",
    "Max",
    "MaxRoiPool",
    "MaxUnpool",
    "Mean",
    "MeanVarianceNormalization",
    "Min",
    "Mish",
    "Mod",
    "Mul",
    "Neg",
    "NegativeLogLikelihoodLoss",
    "Pad",
    "Pow",
    "PRelu",
    "Range",
    "Reciprocal",
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSum",
    "ReduceLogSumExp",
    "ReduceMax",
    "ReduceMean",
    "ReduceMin",
    "ReduceProd",
    "ReduceSum",
    "ReduceSumSquare",
    "Relu",
    "Reshape",
    "Resize",
    "ReverseSequence",
    "RMSNormalization",
    "RNN",
    "RoiAlign",
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
    "Slice",
    "Softmax",
    "SoftmaxCrossEntropyLoss",
    "Softplus",
    "Softsign",
    "SpaceToDepth",
    "Split",
    "Sqrt",
    "Squeeze",
    "STFT",
    "Sub",
    "Sum",
    "Swish",
    "Tan",
    "Tanh",
    "TensorScatter",
    "ThresholdedRelu",
    "Tile",
    "TopK",
    "Transpose",
    "Trilu",
    "Unique",
    "Unsqueeze",
    "Upsample",
    "Attention",
];

pub(crate) fn out_dtype(cx: &Cx, k: usize) -> Option<DType> {
    use DType::*;
    let op = cx.op();
    let in0 = cx.dtype(0);
    match (op, k) {
        (
            "Equal" | "Greater" | "Less" | "GreaterOrEqual" | "LessOrEqual" | "IsNaN" | "IsInf"
            | "And" | "Or" | "Xor" | "Not" | "RegexFullMatch",
            0,
        ) => Some(Bool),
        ("Dropout", 0) => in0,
        ("Dropout", 1) => Some(Bool),
        ("Shape" | "Size" | "ArgMax" | "ArgMin" | "NonZero" | "NonMaxSuppression", _) => Some(I64),
        ("TopK" | "MaxPool", 1) | ("Unique", 1..=3) => Some(I64),
        ("MaxPool", 0) => in0,
        ("Cast" | "BitCast", 0) => cx.attr_dtype("to"),
        ("CastLike", 0) => cx.dtype(1),
        ("EyeLike" | "RandomNormalLike" | "RandomUniformLike" | "Bernoulli", 0) => {
            cx.attr_dtype("dtype").or(in0)
        }
        ("RandomNormal" | "RandomUniform", 0) => Some(cx.attr_dtype("dtype").unwrap_or(F32)),
        ("Multinomial", 0) => Some(cx.attr_dtype("dtype").unwrap_or(I32)),
        ("ConstantOfShape", 0) => match cx.attr("value") {
            Some(AttrValue::Tensor(t)) => Some(t.dtype()),
            _ => Some(F32),
        },
        ("Constant", 0) => constant_dtype(cx),
        ("QuantizeLinear", 0) => cx
            .dtype(2)
            .or_else(|| {
                cx.attr_dtype("output_dtype")
                    .filter(|_| cx.attr_i("output_dtype", 0) != 0)
            })
            .or(Some(U8)),
        ("DequantizeLinear", 0) => {
            if cx.opset >= 23 && cx.attr_i("output_dtype", 0) != 0 {
                cx.attr_dtype("output_dtype")
            } else if cx.opset >= 19 {
                cx.dtype(1)
            } else {
                Some(F32)
            }
        }
        ("DynamicQuantizeLinear", 0 | 2) => Some(U8),
        ("DynamicQuantizeLinear", 1) => Some(F32),
        ("MatMulInteger" | "ConvInteger", 0) => Some(I32),
        ("QLinearMatMul" | "QLinearConv", 0) => cx.dtype(7),
        ("Where", 0) => cx.dtype(1).or(cx.dtype(2)),
        ("OneHot", 0) => cx.dtype(2),
        ("HannWindow" | "HammingWindow" | "BlackmanWindow" | "MelWeightMatrix", 0) => {
            Some(cx.attr_dtype("output_datatype").unwrap_or(F32))
        }
        ("LayerNormalization", 0) => in0,
        ("LayerNormalization", 1 | 2) => Some(cx.attr_dtype("stash_type").unwrap_or(F32)),
        ("BatchNormalization", 1 | 2) if cx.opset >= 14 => cx.dtype(3).or(in0),
        ("StringConcat" | "StringNormalizer", 0) => Some(String),
        ("StringSplit", 0) => Some(String),
        ("StringSplit", 1) => Some(I64),
        ("TfIdfVectorizer", 0) => Some(F32),
        ("ImageDecoder", 0) => Some(U8),
        ("Range", 0) => in0.or(cx.dtype(1)).or(cx.dtype(2)),
        (op, _) if SAME_AS_INPUT0.contains(&op) => in0,
        _ => None,
    }
}

fn constant_dtype(cx: &Cx) -> Option<DType> {
    for a in &cx.node.attrs {
        return Some(match (a.name.as_str(), &a.value) {
            ("value", AttrValue::Tensor(t)) => t.dtype(),
            ("value_float" | "value_floats", _) => DType::F32,
            ("value_int" | "value_ints", _) => DType::I64,
            ("value_string" | "value_strings", _) => DType::String,
            _ => continue,
        });
    }
    None
}
