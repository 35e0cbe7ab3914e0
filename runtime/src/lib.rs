//! kiln-runtime: loads `.kiln` artifacts without copying their weights and runs them through a
//! `Backend`. This crate never depends on ONNX or the compiler: an app that embeds an artifact
//! needs only this crate and a backend (kiln-backends).
//!
//! ```no_run
//! use kiln_runtime::{Model, Tensor};
//! # fn demo(backend: &dyn kiln_runtime::Backend) -> kiln_runtime::Result<()> {
//! let model = Model::open("model.kiln", backend)?;
//! let mut session = model.session();
//! let x = ndarray::ArrayD::<f32>::zeros(ndarray::IxDyn(&[1, 3, 224, 224]));
//! let outputs = session.run(vec![Tensor::from(x)])?;
//! let y = outputs[0].to_array::<f32>()?;
//! # Ok(()) }
//! ```

pub mod artifact;
pub mod backend;
pub mod dtype;
pub mod error;
pub mod manifest;
pub mod model;
pub mod tensor;
pub mod value;

pub use artifact::Artifact;
pub use backend::{Backend, Executable, OpTime, SessionState};
pub use dtype::{DType, Elem};
pub use error::{err, Error, Result};
pub use model::{Model, Session};
pub use tensor::Tensor;
pub use value::Value;

/// The kiln version that wrote or reads artifacts.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
