//! The retrieval API for services: a [`Retriever`] opened once from a model folder, an
//! embedding store and optionally an RRRA adapter, then shared by any number of threads
//! (`Retriever: Send + Sync`; every method takes `&self`). Errors are typed ([`Error`]); no
//! method panics on bad input or exits the process.
//!
//! ```no_run
//! use rrra::retriever::{Retriever, RetrieverOptions};
//! let r = Retriever::open(
//!     "all-MiniLM-L6-v2".as_ref(),
//!     "corpus.store".as_ref(),
//!     &RetrieverOptions { adapter: Some("adapter.safetensors".into()), ..Default::default() },
//! )?;
//! for hit in r.retrieve("what causes lift on a wing", 10, true)? {
//!     println!("{} {:.3} p={:?}", hit.id, hit.score, hit.adapter_p);
//! }
//! # Ok::<(), rrra::Error>(())
//! ```

use crate::adapter::file::AdapterFile;
use crate::adapter::rerank::{rerank_list, rerank_list_into};
use crate::adapter::serving::{query_logits, AdapterScratch, ServingWeights};
use crate::adapter::sigmoid;
use crate::data::{Query, Run};
use crate::device::retriever::{GpuEngineOptions, GpuQueryEngine};
use crate::error::{Error, Result};
use crate::index::{topk, OneQueryScratch, Store};
use crate::model::{EncodeScratch, Encoder};
use crate::pipeline::{check_store_matches, rerank_rows, store_encoder_options, GpuOptions};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// How a [`Retriever`] is opened.
#[derive(Debug, Clone)]
pub struct RetrieverOptions {
    /// An adapter file (or a folder holding `adapter.safetensors`) for the rerank.
    pub adapter: Option<PathBuf>,
    /// Candidates the adapter rescores per query (method notes 6: 100); at least `k`.
    pub rerank_depth: usize,
    /// Queries encoded per forward pass in [`Retriever::retrieve_batch`].
    pub batch_size: usize,
    /// Serve from a GPU: the encoder, the store's vectors and the adapter are uploaded at open
    /// and every query runs on the device ([`crate::device::retriever`]). `None` (the default):
    /// the CPU path. Opening fails with [`Error::CudaUnavailable`] when no GPU can be used.
    pub gpu: Option<GpuEngineOptions>,
}

impl Default for RetrieverOptions {
    fn default() -> Self {
        RetrieverOptions {
            adapter: None,
            rerank_depth: 100,
            batch_size: 32,
            gpu: None,
        }
    }
}

/// One retrieved document.
#[derive(Debug, Clone, PartialEq)]
pub struct Hit {
    /// The document's id in the store.
    pub id: String,
    /// Its row in the store.
    pub row: usize,
    /// The retriever's similarity of query and document.
    pub score: f32,
    /// The adapter's relevance probability p, when the list was reranked.
    pub adapter_p: Option<f32>,
    /// What the list is ordered by: `score`, or with the rerank `log(s_base · p^lambda)`.
    pub rank_score: f64,
}

/// One retrieved document with its id borrowed from the retriever's store: what
/// [`Retriever::retrieve_into`] fills without allocating.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HitRef<'r> {
    /// The document's id in the store.
    pub id: &'r str,
    /// Its row in the store.
    pub row: usize,
    /// The retriever's similarity of query and document.
    pub score: f32,
    /// The adapter's relevance probability p, when the list was reranked.
    pub adapter_p: Option<f32>,
    /// What the list is ordered by: `score`, or with the rerank `log(s_base · p^lambda)`.
    pub rank_score: f64,
}

impl HitRef<'_> {
    /// The owned [`Hit`].
    pub fn to_hit(&self) -> Hit {
        Hit {
            id: self.id.to_string(),
            row: self.row,
            score: self.score,
            adapter_p: self.adapter_p,
            rank_score: self.rank_score,
        }
    }
}

/// Working memory of one query on the CPU path. The retriever keeps a pool of them (one per
/// thread that has been inside a query at the same time), so a query in the steady state
/// allocates nothing.
#[derive(Debug, Default)]
struct QueryScratch {
    encode: EncodeScratch,
    emb: Vec<f32>,
    search: OneQueryScratch,
    hits: Vec<topk::Hit>,
    docs: Vec<f32>,
    scores: Vec<f32>,
    logits: Vec<f32>,
    adapter: AdapterScratch,
    ranked: Vec<(usize, f64)>,
}

/// A model, its store and an optional adapter, ready to answer queries.
pub struct Retriever {
    encoder: Encoder,
    store: Store,
    /// The adapter with its first layer prepared for scoring (built once at open).
    adapter: Option<(AdapterFile, ServingWeights)>,
    /// The device copy of all of the above, when serving from a GPU.
    gpu: Option<GpuQueryEngine>,
    opts: RetrieverOptions,
    scratch: Mutex<Vec<QueryScratch>>,
}

impl std::fmt::Debug for Retriever {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Retriever")
            .field("model", &self.encoder.dir())
            .field("store", &self.store.path())
            .field("documents", &self.store.len())
            .field("adapter", &self.adapter.is_some())
            .field(
                "gpu",
                &self.gpu.as_ref().map(|g| g.gpu().info().to_string()),
            )
            .finish()
    }
}

// Services share one retriever across threads; keep that a compile-time fact.
const _: fn() = || {
    fn shared<T: Send + Sync>() {}
    shared::<Retriever>();
};

impl Retriever {
    /// Opens the store at `store`, loads the encoder in `model` with the options the store was
    /// built with, and the adapter if one is given. A store built by another encoder, or an
    /// adapter of another dimension, is an error naming the file.
    pub fn open(model: &Path, store: &Path, opts: &RetrieverOptions) -> Result<Self> {
        if opts.batch_size == 0 {
            return Err(Error::InvalidArgument(
                "the batch size must be at least 1".into(),
            ));
        }
        let s = Store::open(store)?;
        let encoder = Encoder::load(model, &store_encoder_options(&s))?;
        check_store_matches(&s, store, &encoder)?;
        let adapter = match &opts.adapter {
            Some(p) => {
                let a = AdapterFile::load(p)?;
                a.check_dim(s.dim(), p)?;
                if a.params.positive_aware() {
                    return Err(Error::mismatch(
                        p,
                        "a positive-aware adapter needs labelled positives and cannot rerank \
                         queries",
                    ));
                }
                let weights = ServingWeights::of(&a.params)?;
                Some((a, weights))
            }
            None => None,
        };
        let gpu = match &opts.gpu {
            Some(g) => {
                // the GPU top-k stops at MAX_K; deeper lists take the CPU path (`retrieve_batch`)
                let depth = opts
                    .rerank_depth
                    .max(g.max_depth)
                    .min(crate::device::topk::MAX_K);
                let g = GpuEngineOptions {
                    max_batch: g.max_batch.min(opts.batch_size),
                    max_depth: depth,
                    ..g.clone()
                };
                Some(GpuQueryEngine::new(
                    &encoder,
                    &s.corpus(),
                    adapter.as_ref().map(|(a, _)| &a.params),
                    &g,
                )?)
            }
            None => None,
        };
        if gpu.is_none() {
            encoder.prepare_queries();
        }
        Ok(Retriever {
            encoder,
            store: s,
            adapter,
            gpu,
            opts: opts.clone(),
            scratch: Mutex::new(Vec::new()),
        })
    }

    /// Embedding dimension.
    pub fn dim(&self) -> usize {
        self.store.dim()
    }

    /// Documents in the store.
    pub fn len(&self) -> usize {
        self.store.len()
    }

    /// True for a store without documents.
    pub fn is_empty(&self) -> bool {
        self.store.is_empty()
    }

    /// Whether an adapter is loaded (the rerank is available).
    pub fn has_adapter(&self) -> bool {
        self.adapter.is_some()
    }

    /// Encodes texts as the store's documents were encoded: `texts.len() × dim()` floats.
    pub fn encode(&self, texts: &[&str]) -> Result<Vec<f32>> {
        match &self.gpu {
            None => self.encoder.encode(texts, self.opts.batch_size),
            Some(g) => {
                let mut out = Vec::with_capacity(texts.len() * self.dim());
                for chunk in texts.chunks(g.max_batch()) {
                    out.extend(g.embed(&self.pack(chunk)?)?);
                }
                Ok(out)
            }
        }
    }

    /// Whether queries run on a GPU.
    pub fn on_gpu(&self) -> bool {
        self.gpu.is_some()
    }

    /// Tokenized texts, packed back to back.
    fn pack(&self, texts: &[&str]) -> Result<crate::model::bert::PackedBatch> {
        let mut batch = crate::model::bert::PackedBatch::new();
        for t in self.encoder.tokenizer().encode_batch(texts)? {
            batch.push(&t.ids, &t.type_ids);
        }
        Ok(batch)
    }

    /// The top `k` documents for `query`, reranked by the adapter when `rerank` (an error
    /// without an adapter). `k = 0` gives an empty list; `k` beyond the store gives every
    /// document.
    pub fn retrieve(&self, query: &str, k: usize, rerank: bool) -> Result<Vec<Hit>> {
        let mut out = Vec::new();
        self.retrieve_into(query, k, rerank, &mut out)?;
        Ok(out.iter().map(HitRef::to_hit).collect())
    }

    /// [`Retriever::retrieve`] into `out` (cleared first), with ids borrowed from the store:
    /// the path for latency budgets. On the CPU, once the retriever has served a few queries
    /// (its pooled working memory grown to their lengths) and `out` has room for `k` hits, the
    /// engine allocates nothing per query (queries under 256 tokens, WordPiece tokenizer).
    /// Called from a thread outside rayon's pool, the pool's shared job queue still allocates
    /// a block per 63 parallel steps handed to it (one per 10–25 queries); from a pool thread,
    /// nothing. See `tests/retriever_alloc.rs`. The GPU path allocates per query.
    ///
    /// ```no_run
    /// # use rrra::retriever::{Retriever, RetrieverOptions};
    /// # let r = Retriever::open("m".as_ref(), "s.store".as_ref(), &RetrieverOptions::default())?;
    /// let mut hits = Vec::with_capacity(10);
    /// for q in ["lift on a wing", "boundary layer transition"] {
    ///     r.retrieve_into(q, 10, false, &mut hits)?;
    ///     println!("{q}: {}", hits.first().map_or("-", |h| h.id));
    /// }
    /// # Ok::<(), rrra::Error>(())
    /// ```
    pub fn retrieve_into<'r>(
        &'r self,
        query: &str,
        k: usize,
        rerank: bool,
        out: &mut Vec<HitRef<'r>>,
    ) -> Result<()> {
        out.clear();
        if rerank && self.adapter.is_none() {
            return Err(Error::InvalidArgument(
                "rerank asked of a retriever opened without an adapter".into(),
            ));
        }
        let k = k.min(self.store.len());
        if k == 0 {
            return Ok(());
        }
        if self.gpu.is_some() {
            let mut lists = self.retrieve_batch(&[query], k, rerank)?;
            let hits = lists.pop().unwrap_or_default();
            out.extend(hits.iter().map(|h| HitRef {
                id: self.store.id(h.row),
                row: h.row,
                score: h.score,
                adapter_p: h.adapter_p,
                rank_score: h.rank_score,
            }));
            return Ok(());
        }
        let depth = if rerank {
            self.opts.rerank_depth.max(k).min(self.store.len())
        } else {
            k
        };
        // The query runs on the calling thread, its parallel steps on the pool. (Running the
        // whole query as a pool job would keep rayon's shared queue out of it, but a pool
        // thread waiting inside one query then picks up another whole query: under 8 clients
        // that tripled the p99.)
        let mut scratch = self.take_scratch();
        let r = self.query_cpu(query, k, depth, rerank, &mut scratch, out);
        self.put_scratch(scratch);
        r
    }

    fn take_scratch(&self) -> QueryScratch {
        let pooled = match self.scratch.lock() {
            Ok(mut pool) => pool.pop(),
            Err(poisoned) => poisoned.into_inner().pop(),
        };
        pooled.unwrap_or_default()
    }

    fn put_scratch(&self, s: QueryScratch) {
        match self.scratch.lock() {
            Ok(mut pool) => pool.push(s),
            Err(poisoned) => poisoned.into_inner().push(s),
        }
    }

    /// One query on the CPU: encode, search `depth`, rerank when asked, keep `k`.
    fn query_cpu<'r>(
        &'r self,
        query: &str,
        k: usize,
        depth: usize,
        rerank: bool,
        s: &mut QueryScratch,
        out: &mut Vec<HitRef<'r>>,
    ) -> Result<()> {
        let dim = self.dim();
        s.emb.resize(dim, 0.0);
        self.encoder
            .encode_one_into(query, &mut s.encode, &mut s.emb)?;
        // One query streams the store once through the single-query kernel.
        topk::search_one_into(
            &self.store.corpus(),
            &s.emb,
            depth,
            &mut s.search,
            &mut s.hits,
        )?;
        let hit = |h: &topk::Hit, adapter_p: Option<f32>, rank_score: f64| HitRef {
            id: self.store.id(h.index),
            row: h.index,
            score: h.score,
            adapter_p,
            rank_score,
        };
        match (&self.adapter, rerank) {
            (Some((a, weights)), true) => {
                let n = s.hits.len();
                s.docs.resize(n * dim, 0.0);
                for (h, v) in s.hits.iter().zip(s.docs.chunks_exact_mut(dim)) {
                    self.store.row_f32(h.index, v)?;
                }
                s.logits.resize(n, 0.0);
                query_logits(
                    &a.params,
                    weights,
                    &s.emb,
                    &s.docs[..n * dim],
                    &mut s.logits[..n],
                    &mut s.adapter,
                )?;
                s.scores.clear();
                s.scores.extend(s.hits.iter().map(|h| h.score));
                rerank_list_into(&s.scores, &s.logits[..n], a.tau, a.lambda_rr, &mut s.ranked);
                out.extend(s.ranked.iter().take(k).map(|&(i, rank_score)| {
                    let p = sigmoid(s.logits[i] as f64) as f32;
                    hit(&s.hits[i], Some(p), rank_score)
                }));
            }
            _ => out.extend(s.hits.iter().map(|h| hit(h, None, h.score as f64))),
        }
        Ok(())
    }

    /// [`Retriever::retrieve`] for many queries, encoded in batches; lists in query order.
    pub fn retrieve_batch(
        &self,
        queries: &[&str],
        k: usize,
        rerank: bool,
    ) -> Result<Vec<Vec<Hit>>> {
        if rerank && self.adapter.is_none() {
            return Err(Error::InvalidArgument(
                "rerank asked of a retriever opened without an adapter".into(),
            ));
        }
        if queries.is_empty() {
            return Ok(Vec::new());
        }
        let k = k.min(self.store.len());
        if k == 0 {
            return Ok(vec![Vec::new(); queries.len()]);
        }
        let depth = if rerank {
            self.opts.rerank_depth.max(k).min(self.store.len())
        } else {
            k
        };
        // Deeper lists than the device's buffers take the CPU search (after a GPU encode).
        if let Some(g) = self.gpu.as_ref().filter(|g| depth <= g.max_depth()) {
            return self.retrieve_on_gpu(g, queries, k, depth, rerank);
        }
        let q_emb = self.encode(queries)?;
        // One query streams the store once through the single-query kernel; several share
        // each pass over it (the batch kernel).
        let hits = if queries.len() == 1 {
            vec![topk::search_one(&self.store.corpus(), &q_emb, depth)?]
        } else {
            topk::search_batch(&self.store.corpus(), &q_emb, depth)?
        };
        match (&self.adapter, rerank) {
            (Some((a, weights)), true) => self.reranked(a, weights, &q_emb, hits, k),
            _ => Ok(hits
                .into_iter()
                .map(|h| {
                    h.into_iter()
                        .map(|x| Hit {
                            id: self.store.id(x.index).to_string(),
                            row: x.index,
                            score: x.score,
                            adapter_p: None,
                            rank_score: x.score as f64,
                        })
                        .collect()
                })
                .collect()),
        }
    }

    /// The GPU path of [`Retriever::retrieve_batch`]: per batch, embeddings, hits and the
    /// adapter's logits come from the device; the rerank's ordering (O(depth)) is done here.
    fn retrieve_on_gpu(
        &self,
        g: &GpuQueryEngine,
        queries: &[&str],
        k: usize,
        depth: usize,
        rerank: bool,
    ) -> Result<Vec<Vec<Hit>>> {
        let mut out = Vec::with_capacity(queries.len());
        for chunk in queries.chunks(g.max_batch()) {
            let ans = g.query(&self.pack(chunk)?, depth, rerank)?;
            match (&self.adapter, ans.logits) {
                (Some((a, _)), Some(logits)) => {
                    for (hits, logits) in ans.hits.iter().zip(&logits) {
                        let scores: Vec<f32> = hits.iter().map(|h| h.score).collect();
                        let ranked = rerank_list(&scores, logits, a.tau, a.lambda_rr);
                        out.push(
                            ranked
                                .into_iter()
                                .take(k)
                                .map(|(i, rank_score)| Hit {
                                    id: self.store.id(hits[i].index).to_string(),
                                    row: hits[i].index,
                                    score: hits[i].score,
                                    adapter_p: Some(sigmoid(logits[i] as f64) as f32),
                                    rank_score,
                                })
                                .collect(),
                        );
                    }
                }
                _ => out.extend(ans.hits.into_iter().map(|h| {
                    h.into_iter()
                        .map(|x| Hit {
                            id: self.store.id(x.index).to_string(),
                            row: x.index,
                            score: x.score,
                            adapter_p: None,
                            rank_score: x.score as f64,
                        })
                        .collect()
                })),
            }
        }
        Ok(out)
    }

    /// Scores each query's candidates with the adapter and keeps the best `k` of the rerank.
    fn reranked(
        &self,
        adapter: &AdapterFile,
        weights: &ServingWeights,
        q_emb: &[f32],
        hits: Vec<Vec<topk::Hit>>,
        k: usize,
    ) -> Result<Vec<Vec<Hit>>> {
        let lists: Vec<Vec<(usize, f32)>> = hits
            .iter()
            .map(|h| h.iter().map(|x| (x.index, x.score)).collect())
            .collect();
        Ok(rerank_rows(&self.store, adapter, weights, q_emb, &lists)?
            .into_iter()
            .map(|ranked| {
                ranked
                    .into_iter()
                    .take(k)
                    .map(|c| Hit {
                        id: self.store.id(c.row).to_string(),
                        row: c.row,
                        score: c.score,
                        adapter_p: Some(sigmoid(c.logit as f64) as f32),
                        rank_score: c.rank_score,
                    })
                    .collect()
            })
            .collect())
    }
}

/// [`crate::pipeline::search`] on a CUDA device, through the GPU serving path of [`Retriever`]
/// (the model in `model` is checked against the store at `store` as [`Retriever::open`]
/// does): the top `k` documents of each query, in query order. With `adapter` (a file, or a
/// folder holding `adapter.safetensors`) each top `k` is reranked by `s_base · p^lambda_rr`,
/// scores being the log of that product, as [`crate::pipeline::rerank_run`] does on the CPU.
/// [`Error::CudaUnavailable`] when no GPU can be used.
pub fn search_on_gpu(
    model: &Path,
    store: &Path,
    queries: &[Query],
    k: usize,
    adapter: Option<&Path>,
    gpu: &GpuOptions,
    progress: &(dyn Fn(usize) + Sync),
) -> Result<Run> {
    let retriever = Retriever::open(
        model,
        store,
        &RetrieverOptions {
            adapter: adapter.map(Path::to_path_buf),
            // the rerank takes exactly the top k, as `rerank_run` does
            rerank_depth: k,
            batch_size: gpu.batch_size,
            gpu: Some(GpuEngineOptions {
                ordinal: gpu.ordinal,
                precision: gpu.precision,
                max_batch: gpu.batch_size,
                max_depth: k,
                ..Default::default()
            }),
        },
    )?;
    let mut run = Run::new();
    for window in queries.chunks(1024) {
        let texts: Vec<&str> = window.iter().map(|q| q.text.as_str()).collect();
        let lists = retriever.retrieve_batch(&texts, k, adapter.is_some())?;
        for (q, hits) in window.iter().zip(lists) {
            // rank_score: the similarity, or the rerank's log(s_base · p^lambda)
            let docs = hits.into_iter().map(|h| (h.id, h.rank_score)).collect();
            run.add_query(q.id.clone(), docs)?;
        }
        progress(window.len());
    }
    Ok(run)
}
