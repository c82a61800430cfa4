//! Deterministic random BERT models and token batches, for tests and benchmarks that need a
//! model of a given shape (BERT-base, all-MiniLM-L6-v2, tiny test shapes) without its weights.
//!
//! Weights follow BERT's initialiser: matrices and embeddings normal(0, 0.02); LayerNorm gamma
//! 1 + normal(0, 0.05) and beta normal(0, 0.02), biases normal(0, 0.02) (a fresh model has
//! gamma 1 and zero biases; the noise makes every parameter matter in a comparison). Each tensor
//! is drawn in fixed-size chunks, each chunk from its own generator seeded by
//! `(seed, tensor, chunk)`: identical output for identical arguments on every machine and thread
//! count, and the chunks are drawn in parallel (BERT-base has 110M parameters).

use super::bert::{Bert, PackedBatch};
use super::config::BertConfig;
use super::weights::{BertWeights, LayerWeights};
use crate::index::synthetic::Rng;
use rayon::prelude::*;
use std::ops::RangeInclusive;

/// Elements drawn from one generator.
const CHUNK: usize = 1 << 16;

/// BERT-base (uncased) shape: 12 layers, hidden 768, 12 heads, FFN 3072, 30522 tokens, 512
/// positions, 2 token types, LayerNorm eps 1e-12.
pub fn bert_base_config() -> BertConfig {
    BertConfig {
        vocab_size: 30522,
        hidden_size: 768,
        num_hidden_layers: 12,
        num_attention_heads: 12,
        intermediate_size: 3072,
        hidden_act: "gelu".into(),
        max_position_embeddings: 512,
        type_vocab_size: 2,
        layer_norm_eps: 1e-12,
        hidden_dropout_prob: 0.1,
        attention_probs_dropout_prob: 0.1,
        position_embedding_type: "absolute".into(),
        model_type: Some("bert".into()),
    }
}

/// all-MiniLM-L6-v2 shape: 6 layers, hidden 384, 12 heads (head dim 32), FFN 1536.
pub fn minilm_l6_config() -> BertConfig {
    BertConfig {
        hidden_size: 384,
        num_hidden_layers: 6,
        intermediate_size: 1536,
        ..bert_base_config()
    }
}

/// A small model of the given shape (vocabulary 1000, 512 positions, 2 token types), for tests.
pub fn small_config(hidden: usize, heads: usize, layers: usize, intermediate: usize) -> BertConfig {
    BertConfig {
        vocab_size: 1000,
        hidden_size: hidden,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        intermediate_size: intermediate,
        ..bert_base_config()
    }
}

/// A random model of shape `cfg` (see the module docs for the distributions).
pub fn random_bert(cfg: BertConfig, seed: u64) -> Bert {
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    // Every tensor gets its own stream index, so adding a layer changes no other tensor.
    let mut tensor = 0u64;
    let mut draw = |n: usize, mean: f32, std: f32| {
        tensor += 1;
        normal_tensor(n, mean, std, seed, tensor)
    };
    let word_emb = draw(cfg.vocab_size * h, 0.0, 0.02);
    let pos_emb = draw(cfg.max_position_embeddings * h, 0.0, 0.02);
    let type_emb = draw(cfg.type_vocab_size * h, 0.0, 0.02);
    let emb_ln_g = draw(h, 1.0, 0.05);
    let emb_ln_b = draw(h, 0.0, 0.02);
    let layers = (0..cfg.num_hidden_layers)
        .map(|_| LayerWeights {
            qkv_w: draw(3 * h * h, 0.0, 0.02),
            qkv_b: draw(3 * h, 0.0, 0.02),
            attn_out_w: draw(h * h, 0.0, 0.02),
            attn_out_b: draw(h, 0.0, 0.02),
            attn_ln_g: draw(h, 1.0, 0.05),
            attn_ln_b: draw(h, 0.0, 0.02),
            inter_w: draw(i * h, 0.0, 0.02),
            inter_b: draw(i, 0.0, 0.02),
            out_w: draw(h * i, 0.0, 0.02),
            out_b: draw(h, 0.0, 0.02),
            out_ln_g: draw(h, 1.0, 0.05),
            out_ln_b: draw(h, 0.0, 0.02),
        })
        .collect();
    // Identifies the weights the way a file hash would: same seed and shape, same model.
    let key = format!("rrra-random-bert|{seed}|{cfg:?}");
    let weights = BertWeights {
        word_emb,
        pos_emb,
        type_emb,
        emb_ln_g,
        emb_ln_b,
        layers,
        file_hash: xxhash_rust::xxh3::xxh3_64(key.as_bytes()),
    };
    Bert { cfg, weights }
}

/// `n` values `mean + std · N(0, 1)`, chunk by chunk from generators seeded by
/// `(seed, tensor, chunk)`.
fn normal_tensor(n: usize, mean: f32, std: f32, seed: u64, tensor: u64) -> Vec<f32> {
    let mut out = vec![0.0f32; n];
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, xs)| {
        let mut rng = Rng::new(
            seed ^ tensor.wrapping_mul(0x9E37_79B9_7F4A_7C15)
                ^ (c as u64).wrapping_mul(0xD1B5_4A32_D192_ED03),
        );
        rng.next_u64();
        for pair in xs.chunks_mut(2) {
            let (a, b) = rng.normal_pair();
            pair[0] = mean + std * a as f32;
            if let Some(x) = pair.get_mut(1) {
                *x = mean + std * b as f32;
            }
        }
    });
    out
}

/// `sequences` random sequences packed back to back, each of a length drawn uniformly from
/// `len_range` (clamped to `1..=max_position_embeddings`, so the batch is always valid for a
/// model of shape `cfg`), token ids uniform over the vocabulary, token types 0.
pub fn random_batch(
    cfg: &BertConfig,
    sequences: usize,
    len_range: RangeInclusive<usize>,
    seed: u64,
) -> PackedBatch {
    let max_len = cfg.max_position_embeddings.max(1);
    let lo = (*len_range.start()).clamp(1, max_len);
    let hi = (*len_range.end()).clamp(lo, max_len);
    let mut rng = Rng::new(seed ^ 0x5EED_BA7C_0000_0000);
    let mut batch = PackedBatch::new();
    for _ in 0..sequences {
        let len = lo + rng.below(hi - lo + 1);
        let ids: Vec<u32> = (0..len)
            .map(|_| rng.below(cfg.vocab_size.max(1)) as u32)
            .collect();
        batch.push(&ids, &vec![0; len]);
    }
    batch
}

/// A packed batch with the given sequence lengths (random ids as [`random_batch`] draws them).
pub fn batch_with_lengths(cfg: &BertConfig, lengths: &[usize], seed: u64) -> PackedBatch {
    let mut rng = Rng::new(seed ^ 0x5EED_1E45_0000_0000);
    let mut batch = PackedBatch::new();
    for &len in lengths {
        let ids: Vec<u32> = (0..len)
            .map(|_| rng.below(cfg.vocab_size.max(1)) as u32)
            .collect();
        batch.push(&ids, &vec![0; len]);
    }
    batch
}

/// Parameters of the non-embedding matrices (the GEMM weights): what `2 · tokens · this`
/// counts as the dense FLOPs of a forward pass.
pub fn gemm_parameters(cfg: &BertConfig) -> usize {
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    cfg.num_hidden_layers * (4 * h * h + 2 * h * i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_bert_runs_on_the_cpu_and_is_deterministic() {
        let cfg = small_config(64, 2, 2, 128);
        let a = random_bert(cfg.clone(), 7);
        let b = random_bert(cfg.clone(), 7);
        let c = random_bert(cfg.clone(), 8);
        assert_eq!(a.weights.tensors(), b.weights.tensors());
        assert_eq!(a.weights.file_hash, b.weights.file_hash);
        assert_ne!(a.weights.word_emb, c.weights.word_emb);
        assert_ne!(a.weights.file_hash, c.weights.file_hash);

        let batch = random_batch(&cfg, 5, 1..=40, 3);
        assert_eq!(batch.sequences(), 5);
        assert!(batch.ids.iter().all(|&id| (id as usize) < cfg.vocab_size));
        let ya = a.forward(&batch).unwrap();
        let yb = b.forward(&batch).unwrap();
        assert_eq!(ya.len(), batch.tokens() * 64);
        assert!(ya.iter().all(|v| v.is_finite()));
        assert_eq!(ya, yb);
        // post-LN output: every row has mean ≈ beta's mean and spread ≈ gamma's
        let row = &ya[..64];
        let mean = row.iter().sum::<f32>() / 64.0;
        assert!(mean.abs() < 0.1, "{mean}");
    }

    #[test]
    fn initialiser_statistics() {
        let bert = random_bert(small_config(64, 2, 1, 128), 1);
        let w = &bert.weights.layers[0].qkv_w;
        let n = w.len() as f64;
        let mean = w.iter().map(|&x| x as f64).sum::<f64>() / n;
        let std = (w.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
        assert!(
            mean.abs() < 1e-3 && (std - 0.02).abs() < 1e-3,
            "{mean} {std}"
        );
        let g = &bert.weights.layers[0].attn_ln_g;
        assert!(g.iter().all(|&x| (x - 1.0).abs() < 0.3));
    }

    #[test]
    fn batches_respect_the_position_table() {
        let cfg = small_config(64, 2, 1, 128);
        let batch = random_batch(&cfg, 20, 0..=10_000, 9);
        for s in 0..batch.sequences() {
            assert!((1..=cfg.max_position_embeddings).contains(&batch.len_of(s)));
        }
        let fixed = batch_with_lengths(&cfg, &[1, 0, 3], 2);
        assert_eq!(fixed.offsets, vec![0, 1, 1, 4]);
    }
}
