//! kiln-compiler: ONNX in, `.kiln` out.
//!
//! Data flow: `onnx` decodes the protobuf (zero-copy over a memory map) → `import` translates it
//! once into the core IR (`ir`), inlining functions and resolving opsets → `infer` fills in dtypes
//! and shapes (symbolic dims) → passes (kiln-passes, run by `pass::PassManager`) rewrite the IR →
//! `lower` turns it into the manifest's program of steps → `writer` writes the artifact atomically.

pub mod dump;
pub mod import;
pub mod infer;
pub mod ir;
pub mod lower;
pub mod onnx;
pub mod pass;
pub mod writer;

pub use kiln_runtime::{Error, Result};
