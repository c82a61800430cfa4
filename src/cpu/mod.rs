//! The CPU reference kernels: plain, deterministic f32 code parallelised with rayon.
//! Every CUDA kernel is checked against these; they are also the real fallback path.
//!
//! Each op is written for row-major matrices. Results never depend on the thread count:
//! parallelism only ever splits independent rows.

pub mod gemm;
pub mod math;
