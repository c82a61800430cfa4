//! The serving path on one GPU, for [`crate::retriever::Retriever`]: the encoder, the corpus and
//! the adapter resident on the device, and a pool of workers that threads borrow one query
//! batch at a time. Each worker owns a stream, an encoder workspace (with CUDA graphs of the
//! fixed query shapes), a top-k searcher and the adapter's buffers, so concurrent queries run on
//! separate streams and nothing is allocated on the device after [`GpuQueryEngine::new`]. The
//! corpus is uploaded once and shared; the encoder's weights are uploaded once per worker (a
//! MiniLM-sized model is 90 MB, so a handful of workers is cheap; BERT-base-sized models want
//! fewer).
//!
//! One query batch: token ids → embeddings (`GpuBert::embed`) → exact top-`depth`
//! (`GpuSearcher::search`) → the adapter's logits of those hits read straight from the resident
//! corpus (`GpuAdapter::logits_for_rows`). The rerank's final ordering, O(depth) per query, is
//! done by the caller on the host from the logits.

use super::adapter::GpuAdapter;
use super::encoder::{GpuBert, Precision};
use super::runtime::Gpu;
use super::topk::{GpuCorpus, GpuSearcher};
use crate::adapter::AdapterParams;
use crate::error::{Error, Result};
use crate::index::{Corpus, Hit};
use crate::model::bert::PackedBatch;
use crate::model::Encoder;
use std::sync::{Condvar, Mutex};

/// How a [`GpuQueryEngine`] is built.
#[derive(Debug, Clone)]
pub struct GpuEngineOptions {
    /// Device ordinal.
    pub ordinal: usize,
    /// Worker slots (streams): how many query batches run on the device at once.
    pub workers: usize,
    /// The encoder's arithmetic. bf16 (the default) matches the reference embeddings to a
    /// cosine of 0.9999 and is several times faster than f32 on tensor cores.
    pub precision: Precision,
    /// Queries per batch the workspaces are sized for.
    pub max_batch: usize,
    /// The deepest list searched (and rescored by the adapter) per query.
    pub max_depth: usize,
    /// CUDA graphs of the encoder's launches per batch shape (see `GpuBert::use_graphs`).
    pub graphs: bool,
}

impl Default for GpuEngineOptions {
    fn default() -> Self {
        GpuEngineOptions {
            ordinal: 0,
            workers: 2,
            precision: Precision::Bf16,
            max_batch: 32,
            max_depth: 1000,
            graphs: true,
        }
    }
}

/// What one query batch gives: embeddings `[Q × dim]`, each query's hits (best first), and with
/// the adapter asked, each hit's logit in the same order.
#[derive(Debug, Clone)]
pub struct GpuAnswer {
    pub embeddings: Vec<f32>,
    pub hits: Vec<Vec<Hit>>,
    pub logits: Option<Vec<Vec<f32>>>,
}

struct Worker {
    bert: GpuBert,
    searcher: GpuSearcher,
    adapter: Option<GpuAdapter>,
    rows: Vec<u32>,
    logits: Vec<f32>,
}

/// A model, a corpus and an optional adapter on one GPU; `Send + Sync`, shared by any number of
/// threads (they queue for the worker slots).
pub struct GpuQueryEngine {
    gpu: Gpu,
    corpus: GpuCorpus,
    pooling: crate::model::Pooling,
    normalize: bool,
    max_batch: usize,
    max_depth: usize,
    workers: Mutex<Vec<Worker>>,
    free: Condvar,
}

const _: fn() = || {
    fn shared<T: Send + Sync>() {}
    shared::<GpuQueryEngine>();
};

impl GpuQueryEngine {
    /// Opens the device, uploads `corpus` and, per worker, the encoder and the adapter.
    pub fn new(
        encoder: &Encoder,
        corpus: &Corpus,
        adapter: Option<&AdapterParams>,
        opts: &GpuEngineOptions,
    ) -> Result<GpuQueryEngine> {
        if opts.workers == 0 || opts.max_batch == 0 || opts.max_depth == 0 {
            return Err(Error::InvalidArgument(format!(
                "GPU workers ({}), batch ({}) and depth ({}) must be at least 1",
                opts.workers, opts.max_batch, opts.max_depth
            )));
        }
        let gpu = Gpu::open(opts.ordinal)?;
        let gcorpus = GpuCorpus::upload(&gpu, corpus)?;
        let max_depth = opts.max_depth.min(corpus.len()).max(1);
        let max_tokens = opts.max_batch * encoder.max_length().max(1);
        let mut workers = Vec::with_capacity(opts.workers);
        for _ in 0..opts.workers {
            let stream = gpu.new_stream()?;
            let mut bert = GpuBert::on_stream(
                &gpu,
                stream.clone(),
                encoder.bert(),
                opts.precision,
                max_tokens,
                opts.max_batch,
            )?;
            bert.use_graphs(opts.graphs);
            let mut searcher =
                GpuSearcher::on_stream(&gpu, stream.clone(), opts.max_batch, max_depth, 1 << 20)?;
            searcher.reserve(corpus.dim)?;
            let adapter = adapter
                .map(|p| GpuAdapter::on_stream(&gpu, stream.clone(), p, opts.max_batch * max_depth))
                .transpose()?;
            workers.push(Worker {
                bert,
                searcher,
                adapter,
                rows: Vec::with_capacity(opts.max_batch * max_depth),
                logits: Vec::with_capacity(opts.max_batch * max_depth),
            });
        }
        Ok(GpuQueryEngine {
            gpu,
            corpus: gcorpus,
            pooling: encoder.pooling(),
            normalize: encoder.normalize(),
            max_batch: opts.max_batch,
            max_depth,
            workers: Mutex::new(workers),
            free: Condvar::new(),
        })
    }

    /// The device, for logs.
    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// Queries per batch.
    pub fn max_batch(&self) -> usize {
        self.max_batch
    }

    /// The deepest list [`GpuQueryEngine::query`] takes.
    pub fn max_depth(&self) -> usize {
        self.max_depth
    }

    /// Pooled embeddings of a packed batch, `[sequences × dim]`.
    pub fn embed(&self, batch: &PackedBatch) -> Result<Vec<f32>> {
        let (pooling, normalize) = (self.pooling, self.normalize);
        self.with_worker(|w| w.bert.embed(batch, pooling, normalize))
    }

    /// Embeds the batch's queries, finds each one's top `depth` rows and, with `score`, the
    /// adapter's logits of those hits (an error when the engine has no adapter).
    pub fn query(&self, batch: &PackedBatch, depth: usize, score: bool) -> Result<GpuAnswer> {
        if depth == 0 || depth > self.max_depth {
            return Err(Error::InvalidArgument(format!(
                "search depth {depth} outside 1..={} (the engine's buffers)",
                self.max_depth
            )));
        }
        let (pooling, normalize) = (self.pooling, self.normalize);
        let corpus = &self.corpus;
        self.with_worker(|w| {
            let _range = super::nvtx::range(c"rrra query batch");
            let embeddings = w.bert.embed(batch, pooling, normalize)?;
            let hits = w.searcher.search(corpus, &embeddings, depth)?;
            let logits = if score {
                let adapter = w.adapter.as_mut().ok_or_else(|| {
                    Error::InvalidArgument("scoring asked of an engine without an adapter".into())
                })?;
                let per = hits.first().map_or(0, Vec::len);
                if per == 0 {
                    Some(vec![Vec::new(); hits.len()])
                } else {
                    w.rows.clear();
                    w.rows.extend(hits.iter().flatten().map(|h| h.index as u32));
                    w.logits.clear();
                    w.logits.resize(w.rows.len(), 0.0);
                    adapter.logits_for_rows(corpus, &embeddings, &w.rows, per, &mut w.logits)?;
                    Some(w.logits.chunks(per).map(<[f32]>::to_vec).collect())
                }
            } else {
                None
            };
            Ok(GpuAnswer {
                embeddings,
                hits,
                logits,
            })
        })
    }

    /// Runs `f` with a worker slot, waiting for one to be free; the slot goes back afterwards,
    /// whatever `f` returned.
    fn with_worker<T>(&self, f: impl FnOnce(&mut Worker) -> Result<T>) -> Result<T> {
        let poisoned = || Error::Cuda("the GPU worker pool was poisoned by a panic".into());
        let mut w = {
            let mut free = self.workers.lock().map_err(|_| poisoned())?;
            loop {
                if let Some(w) = free.pop() {
                    break w;
                }
                free = self.free.wait(free).map_err(|_| poisoned())?;
            }
        };
        let out = f(&mut w);
        self.workers.lock().map_err(|_| poisoned())?.push(w);
        self.free.notify_one();
        out
    }
}
