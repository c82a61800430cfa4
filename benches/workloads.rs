//! Criterion benches of the standard workloads, scaled so one sample takes well under a second
//! (the full-size table is `rrra bench`). Throughput is reported per item.
//!   cargo bench --bench workloads [-- FILTER]
//! The encoder benches need all-MiniLM-L6-v2: `$RRRA_MODEL`, or the folder tools/fetch-model.sh fills.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rrra::bench::{topk_data, TOPK_DIM, TOPK_K};
use rrra::index::{topk, Corpus};
use rrra::model::{Encoder, EncoderOptions};
use std::path::PathBuf;

fn model_dir() -> Option<PathBuf> {
    let p = rrra::util::default_model_dir();
    p.join("model.safetensors").is_file().then_some(p)
}

fn shared() -> PathBuf {
    std::env::var_os("RRRA_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared")))
}

fn encode(c: &mut Criterion) {
    let Some(dir) = model_dir() else {
        eprintln!("encoder benches skipped: no model (run tools/fetch-model.sh or set RRRA_MODEL)");
        return;
    };
    let enc = Encoder::load(&dir, &EncoderOptions::default()).expect("model");
    let text =
        std::fs::read_to_string(shared().join("bench/sentences-56tok.txt")).expect("sentences");
    let lines: Vec<&str> = text.lines().take(32).collect();
    let mut g = c.benchmark_group("encode");
    g.sample_size(10);
    g.throughput(Throughput::Elements(lines.len() as u64));
    g.bench_function("sentences-56tok/batch32", |b| {
        b.iter(|| enc.encode(&lines, 32).unwrap())
    });
    g.finish();
}

fn search(c: &mut Criterion) {
    let (corpus, queries) = topk_data();
    let corpus = Corpus::from_f32(&corpus, TOPK_DIM).unwrap();
    let mut g = c.benchmark_group("topk-200000x384");
    g.sample_size(10);
    let batch = &queries[..100 * TOPK_DIM];
    g.throughput(Throughput::Elements(100));
    g.bench_function("batch100/k10", |b| {
        b.iter(|| topk::search_batch(&corpus, batch, TOPK_K).unwrap())
    });
    g.throughput(Throughput::Elements(1));
    g.bench_function("single/k10", |b| {
        b.iter(|| topk::search_one(&corpus, &queries[..TOPK_DIM], TOPK_K).unwrap())
    });
    g.bench_function("single/k10000", |b| {
        b.iter(|| topk::search_one(&corpus, &queries[..TOPK_DIM], 10_000).unwrap())
    });
    g.finish();
}

/// The CPU contrastive loss (forward and backward) at BERT-base's training-step shape: 64
/// queries against 512 documents (a positive and 7 hard negatives each), dim 768, with log
/// weights. What `rrra train` pays per micro-batch when the loss is not on a GPU.
fn loss(c: &mut Criterion) {
    use rrra::index::synthetic::random_unit_vectors;
    use rrra::train::loss::{info_nce, InfoNceInput};
    let (b, d, h) = (64usize, 512usize, 768usize);
    let queries = random_unit_vectors(b, h, 1);
    let docs = random_unit_vectors(d, h, 2);
    let targets: Vec<usize> = (0..b).map(|i| i * 8).collect();
    let log_weights = vec![0.0f32; b * d];
    let (mut dq, mut dd) = (vec![0.0f32; b * h], vec![0.0f32; d * h]);
    let mut g = c.benchmark_group("infonce");
    g.sample_size(10);
    g.throughput(Throughput::Elements(b as u64));
    g.bench_function("64x512x768", |bench| {
        bench.iter(|| {
            let input = InfoNceInput {
                queries: &queries,
                docs: &docs,
                dim: h,
                targets: &targets,
                log_weights: Some(&log_weights),
                tau: 0.05,
            };
            info_nce(&input, &mut dq, &mut dd).unwrap()
        })
    });
    g.finish();
}

criterion_group!(benches, encode, search, loss);
criterion_main!(benches);
