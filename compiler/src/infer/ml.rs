//! Output types of the ai.onnx.ml ops kiln runs (LabelEncoder, TreeEnsemble,
//! TreeEnsembleRegressor, ArrayFeatureExtractor, Binarizer) and of the ai.onnx.preview.training
//! optimizers (whose outputs mirror the tensors they update).

use kiln_runtime::DType;

use super::{tensor_type, Cx};
use crate::ir::{AttrValue, Dim, Type};

/// The output types of a node of one of these domains; None for anything else.
pub(crate) fn infer(cx: &Cx) -> Option<Vec<Type>> {
    match cx.node.domain.as_str() {
        "ai.onnx.ml" => ml(cx),
        "ai.onnx.preview.training" => training(cx),
        _ => None,
    }
}

fn ml(cx: &Cx) -> Option<Vec<Type>> {
    let in_shape = cx.shape(0).map(|s| s.to_vec());
    let batch = || cx.shape(0).and_then(|s| s.first().cloned()).unwrap_or(Dim::Unknown);
    let (dtype, shape) = match cx.op() {
        "LabelEncoder" => (label_encoder_dtype(cx), in_shape),
        "Binarizer" => (cx.dtype(0), in_shape),
        "TreeEnsemble" => {
            let targets = cx.attr_i_opt("n_targets").map(|t| Dim::Fixed(t.max(0) as usize));
            (cx.dtype(0), targets.map(|t| vec![batch(), t]))
        }
        "TreeEnsembleRegressor" => {
            let targets = Dim::Fixed(cx.attr_i("n_targets", 1).max(0) as usize);
            (Some(DType::F32), Some(vec![batch(), targets]))
        }
        "ArrayFeatureExtractor" => (cx.dtype(0), feature_extractor_shape(cx)),
        _ => return None,
    };
    Some(vec![tensor_type(dtype, shape)])
}

fn label_encoder_dtype(cx: &Cx) -> Option<DType> {
    if cx.opset <= 1 {
        return match cx.dtype(0)? {
            DType::String => Some(DType::I64),
            _ => Some(DType::String),
        };
    }
    if let Some(AttrValue::Tensor(t)) = cx.attr("values_tensor") {
        return Some(t.dtype());
    }
    [("values_strings", DType::String), ("values_int64s", DType::I64), ("values_floats", DType::F32)]
        .into_iter()
        .find(|(name, _)| cx.attr(name).is_some())
        .map(|(_, d)| d)
}

/// Input 0's leading dims (one row for a 1-D input) followed by the number of indices.
fn feature_extractor_shape(cx: &Cx) -> Option<Vec<Dim>> {
    let x = cx.shape(0)?;
    let k = match cx.shape(1) {
        Some(s) if s.iter().all(|d| matches!(d, Dim::Fixed(_))) => {
            Dim::Fixed(s.iter().map(|d| if let Dim::Fixed(n) = d { *n } else { 1 }).product())
        }
        _ => Dim::Unknown,
    };
    let mut shape = if x.len() <= 1 { vec![Dim::Fixed(1)] } else { x[..x.len() - 1].to_vec() };
    shape.push(k);
    Some(shape)
}

/// Inputs are R, T, then groups of n tensors (X, G, states...); outputs are the X group and the
/// state groups, each output typed like the input it updates.
fn training(cx: &Cx) -> Option<Vec<Type>> {
    let kinds = match cx.op() {
        "Adagrad" | "Momentum" => 3,
        "Adam" => 4,
        _ => return None,
    };
    let n = cx.n_in().checked_sub(2)? / kinds;
    if n == 0 {
        return None;
    }
    let types = (0..cx.n_out())
        .map(|k| {
            // Output group 0 is X; output group g >= 1 is input group g + 1 (G has no output).
            let group = k / n;
            let src_group = if group == 0 { 0 } else { group + 1 };
            cx.ty(2 + src_group * n + k % n).cloned().unwrap_or(Type::Unknown)
        })
        .collect();
    Some(types)
}
