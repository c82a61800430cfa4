//! RRRA engine: dense retrieval with a CPU reference path and CUDA kernels.
//!
//! The retrieval path, folder by folder:
//! text → [`model`] (tokenizer, BERT encoder, pooling) → [`index`] (embedding store, exact top-k)
//! → [`eval`] (trec_eval metrics) over [`data`] (BEIR folders, TREC runs).
//! [`cpu`] holds the reference kernels every GPU kernel is checked against; [`device`] the GPU side.

pub mod bench;
pub mod cpu;
pub mod data;
pub mod device;
pub mod error;
pub mod eval;
pub mod index;
pub mod model;
pub mod pipeline;
pub mod util;

pub use error::{Error, Result};
