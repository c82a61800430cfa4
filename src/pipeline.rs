//! The retrieval path end to end, as the CLI and services use it: encode a corpus into an
//! embedding store (on the CPU or a GPU), and search a store with encoded queries into a TREC
//! run (on a GPU: `retriever::search_on_gpu`, through the GPU `Retriever`).

use crate::adapter::rerank::rerank_list;
use crate::adapter::serving::{query_logits, AdapterScratch, ServingWeights};
use crate::data::{Document, Query, Run};
use crate::device::encoder::{GpuBert, Precision};
use crate::device::Gpu;
use crate::error::{Error, Result};
use crate::index::store::{Store, StoreSpec, StoreWriter};
use crate::index::topk;
use crate::index::Dtype;
use crate::model::Encoder;
use std::path::Path;

/// Documents are encoded and written in windows of this many, so memory stays bounded however
/// large the corpus is (the store writer streams vectors to disk).
const ENCODE_WINDOW: usize = 4096;

/// xxh3 over the ids and texts of a corpus: tells whether a store was built from this corpus.
pub fn corpus_hash(docs: &[Document]) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for d in docs {
        h.update(d.id.as_bytes());
        h.update(&[0]);
        h.update(d.text.as_bytes());
        h.update(&[0]);
    }
    h.digest()
}

/// Encodes `docs` and writes them atomically as an embedding store at `out`.
pub fn encode_corpus(
    encoder: &Encoder,
    docs: &[Document],
    out: &Path,
    dtype: Dtype,
    batch_size: usize,
    progress: &(dyn Fn(usize) + Sync),
) -> Result<()> {
    encode_corpus_with(encoder, docs, out, dtype, &mut |texts| {
        encoder.encode_with_progress(texts, batch_size, progress)
    })
}

/// [`encode_corpus`] with the embeddings computed by `embed` (texts → `texts × dim` floats,
/// e.g. on a GPU), which must encode as `encoder` does: the store records `encoder`'s
/// description and fingerprint.
pub fn encode_corpus_with(
    encoder: &Encoder,
    docs: &[Document],
    out: &Path,
    dtype: Dtype,
    embed: &mut dyn FnMut(&[&str]) -> Result<Vec<f32>>,
) -> Result<()> {
    let mut meta = encoder.describe();
    meta["corpus_xxh3"] = format!("{:016x}", corpus_hash(docs)).into();
    meta["documents"] = docs.len().into();
    let spec = StoreSpec {
        dim: encoder.dim(),
        dtype,
        normalized: encoder.normalize(),
        fingerprint: encoder.fingerprint(),
        metadata_json: meta.to_string(),
    };
    let mut writer = StoreWriter::create(out, spec)?;
    for window in docs.chunks(ENCODE_WINDOW) {
        let texts: Vec<&str> = window.iter().map(|d| d.text.as_str()).collect();
        let vecs = embed(&texts)?;
        if vecs.len() != texts.len() * encoder.dim() {
            return Err(Error::InvalidArgument(format!(
                "{} floats embedded for {} texts of dimension {}",
                vecs.len(),
                texts.len(),
                encoder.dim()
            )));
        }
        for (doc, v) in window.iter().zip(vecs.chunks_exact(encoder.dim())) {
            writer.push(&doc.id, v)?;
        }
    }
    writer.finish()
}

/// Where and how [`GpuTextEncoder`] and `retriever::search_on_gpu` run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuOptions {
    /// CUDA device ordinal.
    pub ordinal: usize,
    /// The encoder's arithmetic.
    pub precision: Precision,
    /// Texts per forward pass of the encoder.
    pub batch_size: usize,
}

/// `encoder`'s forward on a CUDA device, for texts: its weights uploaded once, texts tokenized
/// on the host and embedded on the device with `encoder`'s pooling and normalisation.
pub struct GpuTextEncoder<'e> {
    encoder: &'e Encoder,
    bert: GpuBert,
    batch: usize,
}

impl<'e> GpuTextEncoder<'e> {
    /// Uploads `encoder` to the device of `gpu`; [`Error::CudaUnavailable`] when no GPU can be
    /// used.
    pub fn new(encoder: &'e Encoder, gpu: &GpuOptions) -> Result<Self> {
        Self::on(&Gpu::open(gpu.ordinal)?, encoder, gpu)
    }

    /// [`GpuTextEncoder::new`] on a device already open (`gpu.ordinal` is not read).
    pub fn on(device: &Gpu, encoder: &'e Encoder, gpu: &GpuOptions) -> Result<Self> {
        let batch = gpu.batch_size.max(1);
        let bert = GpuBert::new(
            device,
            encoder.bert(),
            gpu.precision,
            batch.saturating_mul(encoder.max_length()),
            batch,
        )?;
        Ok(GpuTextEncoder {
            encoder,
            bert,
            batch,
        })
    }

    /// Embeddings of `texts`, `[texts × dim]` in order, as `Encoder::encode` gives them.
    pub fn encode(&mut self, texts: &[&str]) -> Result<Vec<f32>> {
        let enc = self.encoder;
        let tokens = enc.tokenizer().encode_batch(texts)?;
        self.bert
            .encode_tokens(&tokens, self.batch, enc.pooling(), enc.normalize())
    }
}

/// [`encode_corpus`] on a CUDA device ([`GpuTextEncoder`]); the store records `encoder`'s
/// description and fingerprint. [`Error::CudaUnavailable`] when no GPU can be used (before
/// any file is written).
pub fn encode_corpus_on_gpu(
    encoder: &Encoder,
    docs: &[Document],
    out: &Path,
    dtype: Dtype,
    gpu: &GpuOptions,
    progress: &(dyn Fn(usize) + Sync),
) -> Result<()> {
    let mut on_gpu = GpuTextEncoder::new(encoder, gpu)?;
    encode_corpus_with(encoder, docs, out, dtype, &mut |texts| {
        let v = on_gpu.encode(texts)?;
        progress(texts.len());
        Ok(v)
    })
}

/// Refuses a store that another encoder (other weights, max length or pooling) produced, or
/// whose dimension differs: its scores would be meaningless.
pub fn check_store_matches(store: &Store, store_path: &Path, encoder: &Encoder) -> Result<()> {
    if store.dim() != encoder.dim() {
        return Err(Error::mismatch(
            store_path,
            format!(
                "store vectors have dimension {}, the model produces {}",
                store.dim(),
                encoder.dim()
            ),
        ));
    }
    if store.fingerprint() != encoder.fingerprint() {
        return Err(Error::mismatch(
            store_path,
            format!(
                "store was built by another encoder (fingerprint {:016x}, this model with its options gives {:016x}); \
                 re-encode the corpus or pass the same model, --max-length and --pooling",
                store.fingerprint(),
                encoder.fingerprint()
            ),
        ));
    }
    Ok(())
}

/// The encoder options a store was built with (from its metadata), so search can rebuild the
/// same encoder without the user repeating them.
pub fn store_encoder_options(store: &Store) -> crate::model::EncoderOptions {
    let meta: serde_json::Value = serde_json::from_str(store.metadata_json()).unwrap_or_default();
    crate::model::EncoderOptions {
        max_length: meta["max_length"].as_u64().map(|n| n as usize),
        pooling: meta["pooling"].as_str().and_then(|p| p.parse().ok()),
        normalize: meta["normalize"].as_bool(),
    }
}

/// Encodes `queries` and retrieves the top `k` documents of `store` for each, in query order.
pub fn search(
    encoder: &Encoder,
    store: &Store,
    queries: &[Query],
    k: usize,
    batch_size: usize,
    progress: &(dyn Fn(usize) + Sync),
) -> Result<Run> {
    let corpus = store.corpus();
    let mut run = Run::new();
    for window in queries.chunks(1024) {
        let texts: Vec<&str> = window.iter().map(|q| q.text.as_str()).collect();
        let vecs = encoder.encode(&texts, batch_size)?;
        let hits = topk::search_batch(&corpus, &vecs, k)?;
        for (q, hits) in window.iter().zip(hits) {
            let docs = hits
                .into_iter()
                .map(|h| {
                    // Queries are finite, so a NaN or infinite score comes from the stored row
                    // (a store not written by `StoreWriter`, which refuses such values).
                    if h.score.is_finite() {
                        Ok((store.id(h.index).to_string(), h.score as f64))
                    } else {
                        Err(non_finite_row(store, h.index))
                    }
                })
                .collect::<Result<_>>()?;
            run.add_query(q.id.clone(), docs)?;
        }
        progress(window.len());
    }
    Ok(run)
}

/// The error for a stored row whose score with a finite query is not finite.
fn non_finite_row(store: &Store, row: usize) -> Error {
    Error::format(
        store.path(),
        format!(
            "document {:?} (row {row}) scores NaN or infinity: its stored vector is not finite",
            store.id(row)
        ),
    )
}

/// The first line of the run file `path` about query `qid` (and `doc`, when given), so an
/// error about the run's content points at the line; `None` when `path` is not such a file.
/// Only called on the error path: reading the file again is cheap next to the search.
fn run_line(path: &Path, qid: &str, doc: Option<&str>) -> Option<usize> {
    let mut found = None;
    let _ = crate::data::for_each_line(path, |n, line| {
        let mut f = line.split_ascii_whitespace();
        let (q, d) = (f.next(), f.nth(1));
        if q == Some(qid) && doc.is_none_or(|doc| d == Some(doc)) {
            found = Some(n);
            // Stops the scan; the error itself is dropped.
            return Err(Error::InvalidArgument(String::new()));
        }
        Ok(())
    });
    found
}

/// An error about the run file: a parse error at the line it is about when that line can be
/// found, else a mismatch naming the file.
fn run_error(path: &Path, qid: &str, doc: Option<&str>, msg: String) -> Error {
    match run_line(path, qid, doc) {
        Some(line) => Error::parse(path, line, msg),
        None => Error::mismatch(path, msg),
    }
}

/// Reranks the top `k` of every query of `run` with the adapter (method notes 6): documents are
/// looked up in `store`, scored against the encoded query (the run's own scores only choose the
/// candidates, so runs from any retriever work), and reordered by `s_base · p^lambda_rr` with
/// the adapter file's lambda. Scores in the result are the log of that product. A query missing
/// from `queries` or a document missing from the store is an error naming `run_path` and, when
/// `run_path` is the run's file, the line (`Error::Parse`).
pub fn rerank_run(
    encoder: &Encoder,
    store: &Store,
    queries: &[Query],
    run: &Run,
    run_path: &Path,
    adapter: &crate::adapter::file::AdapterFile,
    k: usize,
) -> Result<Run> {
    rerank_run_on(encoder, store, queries, run, run_path, adapter, k, None)
}

/// [`rerank_run`], with the queries encoded ([`GpuTextEncoder`]) and the candidates scored by
/// the adapter's fused kernel ([`rerank_rows_on_gpu`]) on a CUDA device when `gpu` is given.
/// The lists are the same; the scores differ from the CPU's by summation order (and by the
/// encoder's bf16 arithmetic when `gpu.precision` says so). [`Error::CudaUnavailable`] when no
/// GPU can be used.
#[allow(clippy::too_many_arguments)]
pub fn rerank_run_on(
    encoder: &Encoder,
    store: &Store,
    queries: &[Query],
    run: &Run,
    run_path: &Path,
    adapter: &crate::adapter::file::AdapterFile,
    k: usize,
    gpu: Option<&GpuOptions>,
) -> Result<Run> {
    use std::collections::HashMap;
    let dim = store.dim();
    adapter.check_dim(dim, run_path)?;
    let text: HashMap<&str, &str> = queries
        .iter()
        .map(|q| (q.id.as_str(), q.text.as_str()))
        .collect();
    let rows: HashMap<&str, usize> = store.ids().enumerate().map(|(i, id)| (id, i)).collect();
    let qids: Vec<&str> = run.queries().collect();
    let mut texts = Vec::with_capacity(qids.len());
    for q in &qids {
        texts.push(*text.get(q).ok_or_else(|| {
            run_error(
                run_path,
                q,
                None,
                format!("query {q:?} of the run is not in the queries file"),
            )
        })?);
    }
    let device = gpu.map(|g| Gpu::open(g.ordinal)).transpose()?;
    let q_emb = match (&device, gpu) {
        (Some(d), Some(g)) => GpuTextEncoder::on(d, encoder, g)?.encode(&texts)?,
        _ => encoder.encode(&texts, 32)?,
    };
    let mut lists = Vec::with_capacity(qids.len());
    let mut row = vec![0.0f32; dim];
    for (qi, q) in qids.iter().enumerate() {
        let list = run.get(q).unwrap_or(&[]);
        let mut l = Vec::with_capacity(k.min(list.len()));
        for (d, _) in list.iter().take(k) {
            let r = *rows.get(d.as_str()).ok_or_else(|| {
                run_error(
                    run_path,
                    q,
                    Some(d),
                    format!(
                        "document {d:?} (query {q:?}) is not in the index {}",
                        store.path().display()
                    ),
                )
            })?;
            store.row_f32(r, &mut row)?;
            let s: f32 = row
                .iter()
                .zip(&q_emb[qi * dim..(qi + 1) * dim])
                .map(|(a, b)| a * b)
                .sum();
            if !s.is_finite() {
                return Err(non_finite_row(store, r));
            }
            l.push((r, s));
        }
        lists.push(l);
    }
    let ranked = match &device {
        Some(d) => rerank_rows_on_gpu(d, store, adapter, &q_emb, &lists)?,
        None => rerank_rows(
            store,
            adapter,
            &ServingWeights::of(&adapter.params)?,
            &q_emb,
            &lists,
        )?,
    };
    let mut out = Run::new();
    for (q, ranked) in qids.iter().zip(ranked) {
        out.add_query(
            q.to_string(),
            ranked
                .into_iter()
                .map(|c| (store.id(c.row).to_string(), c.rank_score))
                .collect(),
        )?;
    }
    Ok(out)
}

/// One candidate after the adapter's rerank.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reranked {
    /// Row in the store.
    pub row: usize,
    /// The retriever's similarity.
    pub score: f32,
    /// The adapter's logit (p = sigmoid(logit)).
    pub logit: f32,
    /// `log(s_base · p^lambda)`, what the list is ordered by.
    pub rank_score: f64,
}

/// The adapter's rerank of candidate lists `(store row, retriever score)`, one per row of
/// `q_emb`: each list's vectors are gathered from `store` (as f32), scored with the adapter's
/// prepared weights (`weights`, from [`ServingWeights::of`] of the file's parameters), and ordered
/// by `s_base · p^lambda_rr` of the adapter file. Lists are scored in parallel.
pub fn rerank_rows(
    store: &Store,
    adapter: &crate::adapter::file::AdapterFile,
    weights: &ServingWeights,
    q_emb: &[f32],
    lists: &[Vec<(usize, f32)>],
) -> Result<Vec<Vec<Reranked>>> {
    use rayon::prelude::*;
    let dim = store.dim();
    check_lists(q_emb, lists, dim)?;
    lists
        .par_iter()
        .zip(q_emb.par_chunks_exact(dim))
        .map_init(AdapterScratch::default, |scratch, (l, q)| {
            let mut docs = vec![0.0f32; l.len() * dim];
            for (&(r, _), v) in l.iter().zip(docs.chunks_exact_mut(dim)) {
                store.row_f32(r, v)?;
            }
            let mut logits = vec![0.0f32; l.len()];
            query_logits(&adapter.params, weights, q, &docs, &mut logits, scratch)?;
            Ok(reranked(l, &logits, adapter))
        })
        .collect()
}

/// The calls of [`rerank_rows_on_gpu`] for lists of lengths `lens`: `(first, last, len)`, the
/// lists `first..last`, consecutive and all of length `len`, in order; each call at most
/// `budget` pairs, or one list where a list alone is longer. Empty lists make no call.
fn gpu_rerank_calls(
    lens: impl Iterator<Item = usize>,
    budget: usize,
) -> Vec<(usize, usize, usize)> {
    let mut calls: Vec<(usize, usize, usize)> = Vec::new();
    for (i, len) in lens.enumerate().filter(|&(_, len)| len > 0) {
        match calls.last_mut() {
            // the list right after the last call, of its length, while the budget allows
            Some((first, last, l))
                if *last == i && *l == len && (i + 1 - *first) * len <= budget =>
            {
                *last = i + 1
            }
            _ => calls.push((i, i + 1, len)),
        }
    }
    calls
}

/// One query vector of `dim` floats per candidate list.
fn check_lists(q_emb: &[f32], lists: &[Vec<(usize, f32)>], dim: usize) -> Result<()> {
    if q_emb.len() != lists.len() * dim {
        return Err(Error::InvalidArgument(format!(
            "{} query floats for {} lists of dimension {dim}",
            q_emb.len(),
            lists.len()
        )));
    }
    Ok(())
}

/// `list` (store row, retriever score) ordered by `s_base · p^lambda_rr` of its candidates'
/// adapter `logits`.
fn reranked(
    list: &[(usize, f32)],
    logits: &[f32],
    adapter: &crate::adapter::file::AdapterFile,
) -> Vec<Reranked> {
    let scores: Vec<f32> = list.iter().map(|x| x.1).collect();
    rerank_list(&scores, logits, adapter.tau, adapter.lambda_rr)
        .into_iter()
        .map(|(i, rank_score)| Reranked {
            row: list[i].0,
            score: list[i].1,
            logit: logits[i],
            rank_score,
        })
        .collect()
}

/// Candidate pairs the adapter's device buffers hold per launch in [`rerank_rows_on_gpu`]
/// (16 384 × 768 floats is 50 MB).
const GPU_RERANK_PAIRS: usize = 16_384;

/// [`rerank_rows`] with the adapter's fused scoring kernel on `device`
/// ([`crate::device::adapter::GpuAdapter`]): the candidates' vectors are gathered from `store`
/// on the host, lists of the same length are scored together, and each list is ordered on the
/// host as on the CPU.
pub fn rerank_rows_on_gpu(
    device: &Gpu,
    store: &Store,
    adapter: &crate::adapter::file::AdapterFile,
    q_emb: &[f32],
    lists: &[Vec<(usize, f32)>],
) -> Result<Vec<Vec<Reranked>>> {
    let dim = store.dim();
    check_lists(q_emb, lists, dim)?;
    let longest = lists.iter().map(Vec::len).max().unwrap_or(0);
    let mut op = crate::device::adapter::GpuAdapter::new(
        device,
        &adapter.params,
        GPU_RERANK_PAIRS.max(longest),
    )?;
    let mut logits: Vec<Vec<f32>> = vec![Vec::new(); lists.len()];
    let mut docs = Vec::new();
    for (first, last, len) in gpu_rerank_calls(lists.iter().map(Vec::len), GPU_RERANK_PAIRS) {
        docs.resize((last - first) * len * dim, 0.0);
        let rows = lists[first..last].iter().flatten();
        for (&(r, _), v) in rows.zip(docs.chunks_exact_mut(dim)) {
            store.row_f32(r, v)?;
        }
        let scored = op.score(&q_emb[first * dim..last * dim], &docs, len)?;
        for (out, l) in logits[first..last]
            .iter_mut()
            .zip(scored.logit.chunks_exact(len))
        {
            *out = l.to_vec();
        }
    }
    Ok(lists
        .iter()
        .zip(&logits)
        .map(|(l, lg)| reranked(l, lg, adapter))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::gpu_rerank_calls;

    #[test]
    fn gpu_rerank_calls_group_equal_lengths_within_the_budget() {
        let calls = gpu_rerank_calls([3, 3, 3, 0, 3, 5, 5, 1].into_iter(), 6);
        assert_eq!(
            calls,
            [
                (0, 2, 3),
                (2, 3, 3),
                (4, 5, 3),
                (5, 6, 5),
                (6, 7, 5),
                (7, 8, 1)
            ]
        );
        // a list longer than the budget goes alone
        assert_eq!(
            gpu_rerank_calls([10, 10].into_iter(), 4),
            [(0, 1, 10), (1, 2, 10)]
        );
        assert!(gpu_rerank_calls([0, 0].into_iter(), 4).is_empty());
    }

    /// Random lengths: every non-empty list in exactly one call, in order; a call's lists are
    /// consecutive and of its length, within the budget unless alone; a call ends only where
    /// the next list could not join it.
    #[test]
    fn gpu_rerank_calls_cover_every_list_once() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % n) as usize
        };
        for _ in 0..200 {
            let lens: Vec<usize> = (0..next(40)).map(|_| [0, 1, 2, 7, 100][next(5)]).collect();
            let budget = 1 + next(300);
            let calls = gpu_rerank_calls(lens.iter().copied(), budget);
            let mut covered = vec![0u32; lens.len()];
            for (k, &(first, last, len)) in calls.iter().enumerate() {
                assert!(first < last && len > 0);
                assert!(lens[first..last].iter().all(|&l| l == len));
                assert!(last - first == 1 || (last - first) * len <= budget);
                covered[first..last].iter_mut().for_each(|c| *c += 1);
                if let Some(&(next_first, _, next_len)) = calls.get(k + 1) {
                    assert!(next_first >= last);
                    let could_join =
                        next_first == last && next_len == len && (last + 1 - first) * len <= budget;
                    assert!(!could_join, "{lens:?} {budget}: {calls:?}");
                }
            }
            for (l, c) in lens.iter().zip(&covered) {
                assert_eq!(*c, u32::from(*l > 0), "{lens:?} {budget}: {calls:?}");
            }
        }
    }
}
