//! kiln-passes: graph rewrites over the compiler's IR, and the default compile pipeline.
//!
//! Each pass is a small named unit implementing `kiln_compiler::pass::Pass`. Constant folding
//! evaluates nodes with the CPU backend's own kernels, so folding and execution can never disagree
//! about an op's meaning.

pub mod compress;
pub mod dce;
pub mod fold;
pub mod fuse;
pub mod pattern;
pub mod pipeline;
pub mod prepack;

pub use dce::DeadCodeElimination;
pub use fold::ConstantFolding;
pub use pipeline::{compile_file, CompileOptions, Compiled, OPTIMIZATIONS};
