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

/// Queries per train-step batch, and documents per query (a positive and three negatives).
pub const TRAIN_QUERIES: usize = 16;
pub const TRAIN_DOCS_PER_QUERY: usize = 4;

/// train-step: one optimizer step of a model (all-MiniLM-L6-v2 for the published figure) on a
/// fixed batch — 16 queries, each with 4 documents (query 64 / document 128 tokens, dropout
/// on): forward with kept activations, fused InfoNCE over all 64 documents, backward, AdamW.
/// Query i's positive is document 4i (the labels do not change the cost). Examples/s counts
/// queries. The model's weights change; the encoder is the caller's scratch copy.
pub fn train_step(
    enc: &mut Encoder,
    queries: &[&str],
    docs: &[&str],
    reps: usize,
) -> Result<Measurement> {
    use crate::model::bert::PackedBatch;
    use crate::model::tokenizer::TextTokenizer;
    use crate::model::weights::BertWeights;
    use crate::train::encoder_grad::{ActivationMode, DropoutPlan, TrainBatch, TrainableEncoder};
    use crate::train::loss::{info_nce, InfoNceInput};
    use crate::train::optim::{AdamW, AdamWConfig};

    let n_docs = TRAIN_QUERIES * TRAIN_DOCS_PER_QUERY;
    if queries.len() < TRAIN_QUERIES || docs.len() < n_docs {
        return Err(crate::Error::InvalidArgument(format!(
            "train-step needs {TRAIN_QUERIES} queries and {n_docs} documents"
        )));
    }
    let tok = enc.dir().join("tokenizer.json");
    let q_tok = TextTokenizer::from_file(&tok, 64)?.encode_batch(&queries[..TRAIN_QUERIES])?;
    let d_tok = TextTokenizer::from_file(&tok, 128)?.encode_batch(&docs[..n_docs])?;
    let mut packed = PackedBatch::new();
    for t in q_tok.iter().chain(&d_tok) {
        packed.push(&t.ids, &t.type_ids);
    }
    let tokens = packed.tokens();
    let seqs = packed.sequences() as u64;
    let batch = TrainBatch {
        packed,
        example_ids: (0..seqs).collect(),
    };
    let targets: Vec<usize> = (0..TRAIN_QUERIES)
        .map(|i| i * TRAIN_DOCS_PER_QUERY)
        .collect();
    let mut grads = BertWeights::zeros(enc.config());
    let sizes: Vec<usize> = grads.tensors_mut().iter().map(|(t, _)| t.len()).collect();
    let mut optim = AdamW::new(AdamWConfig::default(), &sizes);
    let (hidden_p, attn_p) = (
        enc.config().hidden_dropout_prob as f32,
        enc.config().attention_probs_dropout_prob as f32,
    );
    let dim = enc.dim();
    let mut step = 0u64;
    let s = time(reps, || {
        let dropout = DropoutPlan {
            hidden: hidden_p,
            attention: attn_p,
            seed: 1,
            step,
        };
        step += 1;
        grads.fill_zero();
        let te = TrainableEncoder {
            bert: enc.bert(),
            pooling: enc.pooling(),
            normalize: enc.normalize(),
        };
        let acts = te.forward(&batch, &dropout, ActivationMode::Keep)?;
        let (q, d) = acts.embeddings.split_at(TRAIN_QUERIES * dim);
        let mut d_emb = vec![0.0f32; acts.embeddings.len()];
        let (dq, dd) = d_emb.split_at_mut(TRAIN_QUERIES * dim);
        info_nce(
            &InfoNceInput {
                queries: q,
                docs: d,
                dim,
                targets: &targets,
                log_weights: None,
                tau: 0.05,
            },
            dq,
            dd,
        )?;
        te.backward(&batch, &dropout, acts, &d_emb, &mut grads)?;
        let g: Vec<&[f32]> = grads.tensors();
        let mut params = enc.bert_mut().weights.tensors_mut();
        let decay: Vec<bool> = params.iter().map(|(_, d)| *d).collect();
        let mut p: Vec<&mut [f32]> = params.iter_mut().map(|(t, _)| t.as_mut_slice()).collect();
        optim.update(&mut p, &g, &decay, 1e-6)
    })?;
    // Forward ≈ 2 FLOP per weight per token (≈21 MFLOP/token for MiniLM's 10.6 M non-embedding
    // weights), training ≈ 3× that; at ≈150 GFLOP/s on the reference machine.
    let flop_per_token = 2.0 * non_embedding_weights(enc) as f64;
    let ceiling = 150e9 / (3.0 * flop_per_token * tokens as f64) * TRAIN_QUERIES as f64;
    Ok(Measurement {
        workload: "train-step",
        throughput: TRAIN_QUERIES as f64 / s,
        unit: "examples/s",
        repetitions: reps,
        peer: (0.6, 0.8),
        peer_name: "sentence-transformers trainer (1 hard negative, shared cores; indicative)",
        ceiling: Some(ceiling),
    })
}

fn non_embedding_weights(enc: &Encoder) -> usize {
    enc.bert()
        .weights
        .layers
        .iter()
        .map(|l| l.qkv_w.len() + l.attn_out_w.len() + l.inter_w.len() + l.out_w.len())
        .sum()
}

/// Store size and rerank depth of the batch-1 query-path benchmark.
pub const QUERY_STORE: usize = 100_000;
pub const QUERY_RERANK_K: usize = 100;
pub const QUERY_MAX_TOKENS: usize = 16;

/// Latency percentiles of one stage, in milliseconds.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
}

impl Percentiles {
    pub fn of(ms: &[f64]) -> Percentiles {
        let mut v = ms.to_vec();
        v.sort_by(|a, b| a.total_cmp(b));
        let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
        Percentiles {
            p50: at(0.50),
            p95: at(0.95),
            p99: at(0.99),
        }
    }
}

/// Per-stage latency of the batch-1 query path: encode one query (≤ 16 tokens), top-100 over
/// a `QUERY_STORE × dim` store of the given dtype, then the adapter's serving path: gather the
/// 100 candidate rows as f32, score them with prepared weights, rerank.
#[derive(Debug, Clone, serde::Serialize)]
pub struct QueryLatency {
    pub store_dtype: &'static str,
    pub queries: usize,
    pub encode: Percentiles,
    pub search: Percentiles,
    pub adapter: Percentiles,
    pub total: Percentiles,
    /// Median over queries of each query's adapter time / total time.
    pub adapter_share: f64,
}

/// A random adapter of the encoder's width with a non-zero output layer, as a trained one has
/// (the cost does not depend on the values).
fn bench_adapter(dim: usize) -> Result<crate::adapter::AdapterParams> {
    let mut params = crate::adapter::AdapterParams::init(dim, dim, 3)?;
    for (i, w) in params.w2.iter_mut().enumerate() {
        *w = ((i % 7) as f32 - 3.0) * 1e-3;
    }
    Ok(params)
}

/// Times the batch-1 query path on `queries` (one untimed warm-up pass over the first few).
/// The store is random unit vectors (converted to `dtype`) and the adapter a random one of
/// the encoder's width: the cost of both does not depend on their values.
pub fn query_path(
    enc: &Encoder,
    queries: &[&str],
    dtype: crate::index::Dtype,
) -> Result<QueryLatency> {
    use crate::adapter::rerank::rerank_list;
    use crate::adapter::serving::{query_logits, AdapterScratch, ServingWeights};
    use crate::index::{Dtype, Vectors};
    if queries.is_empty() {
        return Err(crate::Error::InvalidArgument(
            "the query-path benchmark needs queries".into(),
        ));
    }
    let dim = enc.dim();
    let store = random_unit_vectors(QUERY_STORE, dim, 7);
    let (h16, b16): (Vec<half::f16>, Vec<half::bf16>) = match dtype {
        Dtype::F32 => (Vec::new(), Vec::new()),
        Dtype::F16 => (
            store.iter().map(|&v| half::f16::from_f32(v)).collect(),
            Vec::new(),
        ),
        Dtype::Bf16 => (
            Vec::new(),
            store.iter().map(|&v| half::bf16::from_f32(v)).collect(),
        ),
    };
    let vectors = match dtype {
        Dtype::F32 => Vectors::F32(&store),
        Dtype::F16 => Vectors::F16(&h16),
        Dtype::Bf16 => Vectors::Bf16(&b16),
    };
    let corpus = Corpus::new(vectors, dim)?;
    let params = bench_adapter(dim)?;
    let weights = ServingWeights::of(&params)?;
    let mut docs = vec![0.0f32; QUERY_RERANK_K * dim];
    let mut logits = vec![0.0f32; QUERY_RERANK_K];
    // The serving path's functions with their reused working memory (as `Retriever` runs them).
    let mut adapter_scratch = AdapterScratch::default();
    let mut encode_scratch = crate::model::EncodeScratch::default();
    let mut search_scratch = topk::OneQueryScratch::default();
    let (mut emb, mut hits) = (vec![0.0f32; dim], Vec::new());
    let mut one = |q: &str| -> Result<[f64; 3]> {
        let t0 = Instant::now();
        enc.encode_one_into(q, &mut encode_scratch, &mut emb)?;
        let t1 = Instant::now();
        topk::search_one_into(
            &corpus,
            &emb,
            QUERY_RERANK_K,
            &mut search_scratch,
            &mut hits,
        )?;
        let t2 = Instant::now();
        let n = hits.len();
        for (h, v) in hits.iter().zip(docs.chunks_exact_mut(dim)) {
            corpus.vectors.to_f32(h.index * dim, v);
        }
        query_logits(
            &params,
            &weights,
            &emb,
            &docs[..n * dim],
            &mut logits[..n],
            &mut adapter_scratch,
        )?;
        let scores: Vec<f32> = hits.iter().map(|h| h.score).collect();
        let reranked = rerank_list(&scores, &logits[..n], 0.05, 1.0);
        let t3 = Instant::now();
        std::hint::black_box(reranked);
        let ms = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e3;
        Ok([ms(t0, t1), ms(t1, t2), ms(t2, t3)])
    };
    for q in queries.iter().take(5) {
        one(q)?;
    }
    let mut stages = [Vec::new(), Vec::new(), Vec::new()];
    let (mut total, mut share) = (Vec::new(), Vec::new());
    for q in queries {
        let t = one(q)?;
        let sum: f64 = t.iter().sum();
        for (s, v) in stages.iter_mut().zip(t) {
            s.push(v);
        }
        total.push(sum);
        share.push(t[2] / sum);
    }
    Ok(QueryLatency {
        store_dtype: dtype.name(),
        queries: queries.len(),
        encode: Percentiles::of(&stages[0]),
        search: Percentiles::of(&stages[1]),
        adapter: Percentiles::of(&stages[2]),
        total: Percentiles::of(&total),
        adapter_share: median(share),
    })
}

/// Request latency and throughput of one shared [`crate::retriever::Retriever`] under
/// `clients` threads that each send their queries back to back.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LoadPoint {
    pub clients: usize,
    pub requests: usize,
    pub latency: Percentiles,
    /// Requests answered per second of wall time.
    pub throughput: f64,
}

/// The serving path under concurrent load: a retriever opened on `model` (queries cut at
/// [`QUERY_MAX_TOKENS`]), a `QUERY_STORE`-document store of random unit vectors of `dtype`
/// written to `dir`, and a random adapter; every request is `retrieve(query, 10, rerank)` with
/// the rerank over the top [`QUERY_RERANK_K`]. Each client count answers every query once
/// (after a warm-up pass), the queries dealt round-robin to the clients. With `gpu` the
/// retriever serves from that GPU (`RetrieverOptions::gpu`), else from the CPU.
pub fn query_load(
    model: &std::path::Path,
    dir: &std::path::Path,
    queries: &[&str],
    clients: &[usize],
    dtype: crate::index::Dtype,
    gpu: Option<crate::device::retriever::GpuEngineOptions>,
) -> Result<Vec<LoadPoint>> {
    use crate::adapter::file::AdapterFile;
    use crate::index::store::{StoreSpec, StoreWriter};
    use crate::model::EncoderOptions;
    use crate::retriever::{Retriever, RetrieverOptions};
    if queries.is_empty() || clients.contains(&0) {
        return Err(crate::Error::InvalidArgument(
            "the query-load benchmark needs queries and at least one client".into(),
        ));
    }
    let enc = Encoder::load(
        model,
        &EncoderOptions {
            max_length: Some(QUERY_MAX_TOKENS),
            ..Default::default()
        },
    )?;
    let dim = enc.dim();
    let store_path = dir.join("bench.store");
    let mut w = StoreWriter::create(
        &store_path,
        StoreSpec {
            dim,
            dtype,
            normalized: true,
            fingerprint: enc.fingerprint(),
            metadata_json: enc.describe().to_string(),
        },
    )?;
    for (i, v) in random_unit_vectors(QUERY_STORE, dim, 7)
        .chunks_exact(dim)
        .enumerate()
    {
        w.push(&format!("d{i}"), v)?;
    }
    w.finish()?;
    let adapter_path = dir.join("adapter.safetensors");
    AdapterFile {
        params: bench_adapter(dim)?,
        calibration: Default::default(),
        lambda_rr: 1.0,
        tau: 0.05,
        train_config: Default::default(),
        info: serde_json::json!({}),
    }
    .save(&adapter_path)?;
    drop(enc);
    let r = Retriever::open(
        model,
        &store_path,
        &RetrieverOptions {
            adapter: Some(adapter_path),
            gpu,
            ..Default::default()
        },
    )?;
    for q in queries.iter().take(10) {
        r.retrieve(q, 10, true)?;
    }
    let mut points = Vec::new();
    for &c in clients {
        let t0 = Instant::now();
        let per_client: Vec<Result<Vec<f64>>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..c)
                .map(|t| {
                    let r = &r;
                    scope.spawn(move || {
                        let mut ms = Vec::new();
                        for q in queries.iter().skip(t).step_by(c) {
                            let s = Instant::now();
                            std::hint::black_box(r.retrieve(q, 10, true)?);
                            ms.push(s.elapsed().as_secs_f64() * 1e3);
                        }
                        Ok(ms)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(crate::Error::InvalidArgument("a client panicked".into()))
                    })
                })
                .collect()
        });
        let wall = t0.elapsed().as_secs_f64();
        let mut all = Vec::new();
        for ms in per_client {
            all.extend(ms?);
        }
        points.push(LoadPoint {
            clients: c,
            requests: all.len(),
            latency: Percentiles::of(&all),
            throughput: all.len() as f64 / wall,
        });
    }
    Ok(points)
}
