//! The standard benchmark workloads (defined in `../shared/bench/README.md`), shared by
//! `rrra bench` (a table against peer figures) and the criterion benches.

use crate::data::Document;
use crate::error::Result;
use crate::index::synthetic::random_unit_vectors;
use crate::index::{topk, Corpus};
use crate::model::Encoder;
use std::time::Instant;

/// One measured workload.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Measurement {
    pub workload: &'static str,
    /// Items per second (the median of the timed repetitions).
    pub throughput: f64,
    pub unit: &'static str,
    pub repetitions: usize,
    /// Peer figure range (low, high) in the same unit, and who measured it.
    pub peer: (f64, f64),
    pub peer_name: &'static str,
    /// Arithmetic or bandwidth ceiling on the reference machine, where one is stated.
    pub ceiling: Option<f64>,
}

pub const TOPK_CORPUS: usize = 200_000;
pub const TOPK_DIM: usize = 384;
pub const TOPK_QUERIES: usize = 1_000;
pub const TOPK_K: usize = 10;

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    xs[xs.len() / 2]
}

/// Runs `f` once untimed (warm caches, page in weights), then `reps` timed times; returns the
/// median seconds.
fn time<F: FnMut() -> Result<()>>(reps: usize, mut f: F) -> Result<f64> {
    f()?;
    let mut secs = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        f()?;
        secs.push(t.elapsed().as_secs_f64());
    }
    Ok(median(secs))
}

/// encode-sentences: all-MiniLM-L6-v2 over `sentences` (512 lines of ~56 tokens), batch 32.
pub fn encode_sentences(enc: &Encoder, sentences: &[&str], reps: usize) -> Result<Measurement> {
    let s = time(reps, || enc.encode(sentences, 32).map(|_| ()))?;
    Ok(Measurement {
        workload: "encode-sentences",
        throughput: sentences.len() as f64 / s,
        unit: "sentences/s",
        repetitions: reps,
        peer: (69.0, 73.0),
        peer_name: "sentence-transformers + PyTorch (MKL)",
        ceiling: Some(125.0),
    })
}

/// encode-docs: all-MiniLM-L6-v2 over the first 1 024 SciFact documents, max length 256, batch 32.
pub fn encode_docs(enc: &Encoder, docs: &[Document], reps: usize) -> Result<Measurement> {
    let texts: Vec<&str> = docs.iter().take(1024).map(|d| d.text.as_str()).collect();
    let s = time(reps, || enc.encode(&texts, 32).map(|_| ()))?;
    Ok(Measurement {
        workload: "encode-docs",
        throughput: texts.len() as f64 / s,
        unit: "documents/s",
        repetitions: reps,
        peer: (15.0, 15.0),
        peer_name: "sentence-transformers + PyTorch (MKL)",
        ceiling: None,
    })
}

/// The top-k data: 200 000 × 384 corpus and 1 000 queries, unit vectors from fixed seeds.
pub fn topk_data() -> (Vec<f32>, Vec<f32>) {
    (
        random_unit_vectors(TOPK_CORPUS, TOPK_DIM, 1),
        random_unit_vectors(TOPK_QUERIES, TOPK_DIM, 2),
    )
}

/// topk-batch: all 1 000 queries in one call, k = 10.
pub fn topk_batch(corpus: &[f32], queries: &[f32], reps: usize) -> Result<Measurement> {
    let c = Corpus::from_f32(corpus, TOPK_DIM)?;
    let s = time(reps, || topk::search_batch(&c, queries, TOPK_K).map(|_| ()))?;
    Ok(Measurement {
        workload: "topk-batch",
        throughput: (queries.len() / TOPK_DIM) as f64 / s,
        unit: "queries/s",
        repetitions: reps,
        peer: (714.0, 872.0),
        peer_name: "faiss-cpu IndexFlatIP",
        // 2·n·d flops per query at ≈150 GFLOP/s.
        ceiling: Some(150e9 / (2.0 * (TOPK_CORPUS * TOPK_DIM) as f64)),
    })
}

/// topk-single: one query per call, k = 10 (`queries` of them timed per repetition).
pub fn topk_single(corpus: &[f32], queries: &[f32], reps: usize) -> Result<Measurement> {
    let c = Corpus::from_f32(corpus, TOPK_DIM)?;
    let s = time(reps, || {
        for q in queries.chunks_exact(TOPK_DIM) {
            topk::search_one(&c, q, TOPK_K)?;
        }
        Ok(())
    })?;
    Ok(Measurement {
        workload: "topk-single",
        throughput: (queries.len() / TOPK_DIM) as f64 / s,
        unit: "queries/s",
        repetitions: reps,
        peer: (31.0, 33.0),
        peer_name: "faiss-cpu IndexFlatIP",
        ceiling: None,
    })
}
