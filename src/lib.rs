//! RRRA engine: dense retrieval with a CPU reference path and CUDA kernels.
//!
//! The retrieval path, folder by folder:
//! text → [`model`] (tokenizer, BERT encoder, pooling) → [`index`] (embedding store, exact top-k)
//! → [`eval`] (trec_eval metrics) over [`data`] (BEIR folders, TREC runs).
//! [`train`] fine-tunes the encoder (backward pass, InfoNCE, AdamW, mining, samplers, checkpoints);
//! [`adapter`] is RRRA's false-negative adapter (its fused scoring op and losses).
//! [`retriever`] is the API for services: open once, retrieve (and rerank) from many threads.
//! [`cpu`] holds the reference kernels every GPU kernel is checked against; [`device`] the GPU
//! side (runtime, top-k, encoder forward).
//!
//! Exact top-k over vectors in memory (a [`index::Store`] gives the same view of a file):
//! ```
//! use rrra::index::{topk, Corpus};
//! // three 2-d unit vectors
//! let docs = [1.0f32, 0.0, 0.0, 1.0, 0.6, 0.8];
//! let corpus = Corpus::from_f32(&docs, 2)?;
//! let hits = topk::search_one(&corpus, &[0.0, 1.0], 2)?;
//! assert_eq!(hits.iter().map(|h| h.index).collect::<Vec<_>>(), [1, 2]);
//! assert!((hits[1].score - 0.8).abs() < 1e-6);
//! # Ok::<(), rrra::Error>(())
//! ```
//!
//! Encoding with a model folder, then searching ([`pipeline`] does this for whole files):
//! ```no_run
//! use rrra::model::{Encoder, EncoderOptions};
//! let enc = Encoder::load("all-MiniLM-L6-v2".as_ref(), &EncoderOptions::default())?;
//! let vectors = enc.encode(&["a first text", "a second one"], 32)?; // 2 × enc.dim() floats
//! # Ok::<(), rrra::Error>(())
//! ```

pub mod adapter;
pub mod bench;
pub mod capi;
pub mod cpu;
pub mod data;
pub mod device;
pub mod error;
pub mod eval;
pub mod experiment;
#[doc(hidden)]
pub mod fuzzing;
pub mod index;
pub mod model;
pub mod pipeline;
pub mod report;
pub mod retriever;
pub mod train;
pub mod util;

pub use error::{Error, Result};
