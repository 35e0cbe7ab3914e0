//! The ONNX frontend: protobuf messages (`proto`), zero-copy file loading with confined external
//! data (`load`), and TensorProto ⇄ runtime Tensor conversion for every dtype (`tensor`).
//! `crate::import` translates a decoded model into the IR.

pub mod load;
pub mod proto;
pub mod tensor;

pub use load::{
    decode_tensor_file, decode_value_file, read_model, read_value_file, read_value_file_for,
    ExternalStore,
};
pub use proto::*;
