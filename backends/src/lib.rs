//! kiln-backends: implementations of the runtime's `Backend` trait.
//!
//! `cpu` interprets the artifact's program with kernels chosen per step at prepare time and
//! rayon for parallel loops. A wgpu backend will sit beside it behind the same trait.

pub mod cpu;

pub use cpu::CpuBackend;
