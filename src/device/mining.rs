//! Hard-negative mining on the GPU: the corpus and the training queries encoded by the GPU
//! encoder, every query's exact top-K by the GPU top-k over the resident document embeddings,
//! then the same filtering as the CPU ([`mining::mine_from_hits`]: labelled positives and a
//! same-id document dropped). The pool keeps host copies of the embeddings, as the CPU
//! samplers read them; the encode and the search, which are the cost of a refresh, stay on the
//! device.

use super::encoder::{GpuBert, Precision};
use super::runtime::Gpu;
use super::topk::{GpuCorpus, GpuSearcher};
use crate::error::Result;
use crate::index::{Corpus, Hit};
use crate::model::bert::Bert;
use crate::model::tokenizer::Tokens;
use crate::model::Pooling;
use crate::train::data::TrainSet;
use crate::train::mining::{self, MinedPool, MiningStats};

/// What to encode with: the model and its pooling, and the arithmetic.
pub struct MiningEncoder<'a> {
    pub bert: &'a Bert,
    pub pooling: Pooling,
    pub normalize: bool,
    pub precision: Precision,
    /// Sequences per encoder batch.
    pub batch: usize,
}

/// Mines `set` on `gpu`: `doc_tokens` are the corpus's documents and `query_tokens` the training
/// queries, tokenized with the run's max lengths (as the trainer tokenizes them).
pub fn mine(
    gpu: &Gpu,
    enc: &MiningEncoder<'_>,
    set: &TrainSet,
    doc_tokens: &[Tokens],
    query_tokens: &[Tokens],
    top_k: usize,
    exclude_same_id: bool,
) -> Result<(MinedPool, MiningStats)> {
    let _range = super::nvtx::range(c"rrra mining");
    let batch = enc.batch.max(1);
    let longest = doc_tokens
        .iter()
        .chain(query_tokens)
        .map(|t| t.ids.len())
        .max()
        .unwrap_or(1)
        .max(1);
    let mut bert = GpuBert::new(gpu, enc.bert, enc.precision, batch * longest, batch)?;
    let docs = bert.encode_tokens(doc_tokens, batch, enc.pooling, enc.normalize)?;
    let queries = bert.encode_tokens(query_tokens, batch, enc.pooling, enc.normalize)?;
    drop(bert);
    let dim = enc.bert.cfg.hidden_size;
    let depth = mining::search_depth(set, top_k.max(1)).max(1);
    let hits = search(gpu, &docs, &queries, dim, depth)?;
    mining::mine_from_hits(set, dim, queries, docs, &hits, top_k, exclude_same_id)
}

/// Every query's exact top-`depth` documents by the GPU top-k, best first: `docs`
/// (`[documents × dim]`) uploaded for the search and freed after it; the contract of
/// `index::topk::search_batch`. The search of a trainer's mining refresh
/// (`OffloadedEncoder::search`).
pub fn search(
    gpu: &Gpu,
    docs: &[f32],
    queries: &[f32],
    dim: usize,
    depth: usize,
) -> Result<Vec<Vec<Hit>>> {
    let _range = super::nvtx::range(c"rrra mining search");
    let corpus = GpuCorpus::upload(gpu, &Corpus::from_f32(docs, dim)?)?;
    // candidate lists of 16 bytes per query and row of a chunk: a chunk no longer than the
    // corpus (4 GB for chunks of 2^20 rows would sit beside the training activations)
    let chunk = corpus.len().clamp(1, 1 << 20);
    let mut searcher = GpuSearcher::new(gpu, 256, depth.max(1), chunk)?;
    searcher.search(&corpus, queries, depth)
}
