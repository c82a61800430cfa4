//! Mining on the GPU (`device::mining`) against the CPU's `mine_from_embeddings`, on the tiny
//! random BERT of the fixtures and Cranfield's training queries. Skips without a GPU.
//!
//! Tolerance: in f32 the GPU encoder differs from the CPU by summation order (≲ 3e-6 on hidden
//! states), so scores differ by ≲ 1e-5; candidate lists are compared position by position,
//! scores to 1e-4, and documents may differ only where two scores are that close.

mod common;

use rrra::device::encoder::Precision;
use rrra::device::mining::{mine, MiningEncoder};
use rrra::model::tokenizer::TextTokenizer;
use rrra::model::{Encoder, EncoderOptions};
use rrra::train::data::read_beir_train;
use rrra::train::mining::mine_from_embeddings;

#[test]
fn gpu_mining_finds_the_cpu_pool() {
    let Some(gpu) = common::gpu_or_skip() else {
        return;
    };
    let model = common::shared().join("fixtures/tiny-bert");
    let enc = Encoder::load(&model, &EncoderOptions::default()).unwrap();
    let set = read_beir_train(&common::shared().join("data/cranfield"), "train").unwrap();
    let tok_path = model.join("tokenizer.json");
    let doc_tok = TextTokenizer::from_file(&tok_path, 128).unwrap();
    let query_tok = TextTokenizer::from_file(&tok_path, 64).unwrap();
    let docs: Vec<&str> = set.corpus.iter().map(|d| d.text.as_str()).collect();
    let queries: Vec<&str> = set.queries.iter().map(|q| q.text.as_str()).collect();
    let doc_tokens = doc_tok.encode_batch(&docs).unwrap();
    let query_tokens = query_tok.encode_batch(&queries).unwrap();
    let top_k = 50;
    let (gpu_pool, gpu_stats) = mine(
        &gpu,
        &MiningEncoder {
            bert: enc.bert(),
            pooling: enc.pooling(),
            normalize: enc.normalize(),
            precision: Precision::F32,
            batch: 64,
        },
        &set,
        &doc_tokens,
        &query_tokens,
        top_k,
        true,
    )
    .unwrap();
    let cpu_docs = enc.encode_tokens(&doc_tokens, 64, &|_| {}).unwrap();
    let cpu_queries = enc.encode_tokens(&query_tokens, 64, &|_| {}).unwrap();
    for (g, c) in gpu_pool.doc_embeddings.iter().zip(&cpu_docs) {
        assert!((g - c).abs() < 1e-4, "document embedding {g} vs {c}");
    }
    let (cpu_pool, cpu_stats) =
        mine_from_embeddings(&set, enc.dim(), cpu_queries, cpu_docs, top_k, true).unwrap();
    assert_eq!(gpu_stats.removed_positive, cpu_stats.removed_positive);
    assert_eq!(gpu_stats.short_pools, cpu_stats.short_pools);
    let mut swapped = 0;
    for (qi, (g, c)) in gpu_pool
        .candidates
        .iter()
        .zip(&cpu_pool.candidates)
        .enumerate()
    {
        assert_eq!(g.len(), c.len(), "query {qi}: pool sizes");
        for (j, (a, b)) in g.iter().zip(c).enumerate() {
            assert!(
                (a.1 - b.1).abs() <= 1e-4,
                "query {qi} rank {j}: {} vs {}",
                a.1,
                b.1
            );
            swapped += usize::from(a.0 != b.0);
        }
    }
    let total: usize = cpu_pool.candidates.iter().map(Vec::len).sum();
    assert!(
        swapped * 100 <= total,
        "{swapped} of {total} positions differ"
    );
}
