//! Values that flow through a program: tensors, and the ONNX sequence and optional types.

use crate::error::{Error, Result};
use crate::tensor::Tensor;
use crate::DType;

#[derive(Clone, Debug)]
pub enum Value {
    Tensor(Tensor),
    /// A sequence of tensors, with the element dtype (needed when the sequence is empty).
    Sequence(DType, Vec<Tensor>),
    /// An optional: `None` is an empty optional.
    Optional(Option<Box<Value>>),
}

impl Value {
    pub fn tensor(&self) -> Result<&Tensor> {
        match self {
            Value::Tensor(t) => Ok(t),
            other => Err(Error::DType(format!("expected a tensor, got {}", other.kind_name()))),
        }
    }

    pub fn into_tensor(self) -> Result<Tensor> {
        match self {
            Value::Tensor(t) => Ok(t),
            other => Err(Error::DType(format!("expected a tensor, got {}", other.kind_name()))),
        }
    }

    pub fn kind_name(&self) -> &'static str {
        match self {
            Value::Tensor(_) => "tensor",
            Value::Sequence(..) => "sequence",
            Value::Optional(_) => "optional",
        }
    }
}

impl From<Tensor> for Value {
    fn from(t: Tensor) -> Value {
        Value::Tensor(t)
    }
}
