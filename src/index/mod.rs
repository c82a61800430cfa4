//! Embeddings at rest and exact search over them.
//!
//! * [`store`]: the versioned, checksummed, memory-mapped embedding file (docs/FORMAT.md), with
//!   a streaming writer that only ever replaces a store atomically.
//! * [`vectors`]: element types ([`Dtype`]) and borrowed matrix views ([`Vectors`], [`Corpus`]).
//! * [`topk`]: exact top-k by inner product, batched (GEMM micro-kernel) or single-query
//!   (bandwidth-bound scan), deterministic whatever the thread count.
//! * [`npy`]: export to NumPy `.npy` and a plain id list.
//! * [`synthetic`]: deterministic random unit vectors for tests and benchmarks.

pub mod npy;
mod simd;
pub mod store;
pub mod synthetic;
pub mod topk;
pub mod vectors;

pub use npy::{export_ids, export_npy};
pub use store::{write_store, Store, StoreSpec, StoreWriter};
pub use topk::{hit_order, search_batch, search_one, search_one_into, Hit, OneQueryScratch};
pub use vectors::{Corpus, Dtype, Vectors};
