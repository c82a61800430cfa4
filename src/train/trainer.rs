//! The training loop: batches of (query, positive) examples with sampled hard negatives,
//! InfoNCE over all passages of the batch, AdamW with warm-up and linear decay, periodic
//! re-mining, evaluation and checkpoints, and an exact resume.
//!
//! Reproducibility: every random choice (epoch order, negative draws, random negatives,
//! dropout masks) comes from the counter-based RNG keyed by (seed, step, example, ...), every
//! op is deterministic, and the state file holds everything else that changes (weights, AdamW
//! moments, the mined pool with the embeddings it was mined with, the data cursor). So a run
//! resumed from a checkpoint computes bit for bit the steps the uninterrupted run computes.

use super::collective::Collective;
use super::config::{DataSource, NegativePool, TrainConfig};
use super::data::{self, Example, TrainSet};
use super::encoder_grad::{
    DropoutPlan, OffloadedEncoder, ResidentOptimizer, TrainBatch, TrainableEncoder,
};
use super::loss::{info_nce, InfoNceInput, InfoNceStats};
use super::mining::{self, MinedPool, MiningStats};
use super::optim::{encoder_step, linear_warmup_decay, AdamW};
use super::parallel::{self, GlobalLayout, Shard};
use super::rng::{Site, Stream};
use super::rrra::JointAdapter;
use super::sampler::{self, PoolGeometry, SamplerKind};
use super::state;
use crate::error::{Error, Result};
use crate::eval::metrics::{evaluate, EvalOptions};
use crate::model::bert::PackedBatch;
use crate::model::tokenizer::{TextTokenizer, Tokens};
use crate::model::weights::BertWeights;
use crate::model::{Encoder, EncoderOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// What the loop reports as it goes (the CLI draws progress from it).
pub enum TrainEvent<'a> {
    Message(String),
    Step(&'a StepRecord),
    Mined(&'a MiningStats),
    Evaluated {
        step: u64,
        metrics: &'a serde_json::Value,
    },
    Checkpoint {
        step: u64,
        dir: &'a Path,
    },
}

/// One optimizer step, as logged.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StepRecord {
    pub step: u64,
    pub total_steps: u64,
    pub epoch: u64,
    pub loss: f64,
    pub lr: f32,
    pub grad_norm: f32,
    pub accuracy: f64,
    pub mean_positive: f64,
    pub mean_negative: f64,
    /// Hard negatives actually drawn per query (below the knob when pools run short).
    pub hard_negatives_per_query: f64,
    pub examples: usize,
    /// Over the optimizer steps of this process so far (mining and evaluation excluded).
    pub examples_per_s: f64,
    /// Seconds spent in optimizer steps by this process.
    pub train_s: f64,
    /// Remaining steps at the mean step time (mining and evaluation excluded).
    pub eta_s: f64,
    /// RRRA only: the adapter's joint BCE (before the weight lambda).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adapter_loss: Option<f64>,
    /// RRRA only: mean s_FN of the drawn hard negatives.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fn_mean_drawn: Option<f64>,
    /// RRRA only: candidates with s_FN > 0.5 in the batch's pools, per query.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fn_over_half: Option<f64>,
}

/// One query's hard negatives as drawn.
struct Drawn {
    docs: Vec<usize>,
    /// Soft RRRA: the InfoNCE log-weight of each drawn negative.
    loss_log_weights: Option<Vec<f32>>,
    /// RRRA: s_FN of each drawn negative, and how many pool candidates exceed 0.5.
    s_fn: Vec<f32>,
    over_half: usize,
}

/// What one batch adds to the step's record.
struct BatchOutcome {
    stats: InfoNceStats,
    hard_drawn: usize,
    adapter_loss: Option<f64>,
    s_fn_drawn: Vec<f32>,
    over_half: usize,
}

/// Time and examples of the optimizer steps run by this process.
#[derive(Default)]
struct StepClock {
    seconds: f64,
    steps: u64,
    examples: usize,
}

/// The files of a run folder.
pub struct RunPaths {
    pub model: PathBuf,
    pub state: PathBuf,
    pub log: PathBuf,
}

impl RunPaths {
    pub fn new(output: &Path) -> Self {
        RunPaths {
            model: output.join("model"),
            state: output.join("training_state.safetensors"),
            log: output.join("train_log.jsonl"),
        }
    }
}

pub struct Trainer {
    pub(crate) cfg: TrainConfig,
    pub(crate) encoder: Encoder,
    query_tok: TextTokenizer,
    doc_tok: TextTokenizer,
    set: TrainSet,
    /// Tokenized once: documents with the document max length, queries with the query one.
    doc_tokens: Vec<Tokens>,
    query_tokens: Vec<Tokens>,
    pub(crate) optim: AdamW,
    grads: BertWeights,
    pub(crate) step: u64,
    /// Epoch and index of the next batch within it.
    pub(crate) epoch: u64,
    pub(crate) cursor: usize,
    pub(crate) pool: Option<MinedPool>,
    pub(crate) pool_step: u64,
    tau: f32,
    batches: Vec<Vec<Example>>,
    batches_epoch: Option<u64>,
    paths: RunPaths,
    /// The run log; `None` on data-parallel ranks other than 0, which write nothing.
    log: Option<std::fs::File>,
    eval: Option<crate::data::beir::BeirData>,
    /// The RRRA sampler's adapter (stage 3), when that sampler is chosen.
    pub(crate) joint: Option<JointAdapter>,
    /// Embeddings given by the caller for the first mining (see `reuse_first_snapshot`).
    preset_snapshot: Option<MiningSnapshot>,
    /// Where the encoder's forward and backward run when not here (see `offload_encoder`),
    /// and whether its weights are behind the host's.
    offload: Option<(Box<dyn OffloadedEncoder>, bool)>,
    /// Whether the host's weights and AdamW state are behind a resident optimizer's.
    host_behind: bool,
    /// The other ranks of a data-parallel run (see `new_rank`).
    comm: Option<Arc<dyn Collective>>,
}

/// The training documents' and queries' embeddings by one encoder, as mining computes them.
#[derive(Debug, Clone)]
pub struct MiningSnapshot {
    /// `[corpus × dim]`.
    pub docs: Vec<f32>,
    /// `[queries × dim]`, in training-set order.
    pub queries: Vec<f32>,
}

impl Trainer {
    /// A fresh run. Refuses to overwrite a run folder that already holds a training state.
    pub fn new(cfg: TrainConfig) -> Result<Self> {
        Self::start(cfg, None)
    }

    /// Rank `comm.rank()` of a fresh data-parallel run over `comm.world()` ranks: every rank
    /// is given the same configuration, takes its contiguous share of each global batch, and
    /// the ranks together compute the single-process run's steps (`train::parallel`: the
    /// embeddings are gathered for the loss, the gradients summed before each update). Rank 0
    /// writes the log and the checkpoints; the other ranks write nothing. A mining refresh
    /// divides the encoding among the ranks; the RRRA sampler's joint adapter is computed on
    /// the whole gathered batch by every rank.
    pub fn new_rank(cfg: TrainConfig, comm: Arc<dyn Collective>) -> Result<Self> {
        Self::start(cfg, Some(comm))
    }

    fn start(cfg: TrainConfig, comm: Option<Arc<dyn Collective>>) -> Result<Self> {
        cfg.validate()?;
        let paths = RunPaths::new(&cfg.output);
        if paths.state.exists() {
            return Err(Error::InvalidArgument(format!(
                "{} already holds a training run; resume it with --resume or choose another output",
                cfg.output.display()
            )));
        }
        let writer = comm.as_ref().is_none_or(|c| c.rank() == 0);
        if writer {
            std::fs::create_dir_all(&cfg.output).map_err(|e| Error::io(&cfg.output, e))?;
            std::fs::write(&paths.log, b"").map_err(|e| Error::io(&paths.log, e))?;
        }
        let encoder = load_encoder(&cfg)?;
        Self::assemble(cfg, encoder, paths, comm)
    }

    /// Continues the run in `output` from its last checkpoint, with the knobs it started with.
    /// The log is cut back to that checkpoint, so it holds every step once.
    pub fn resume(output: &Path) -> Result<Self> {
        Self::restart(output, None)
    }

    /// [`Trainer::resume`] for rank `comm.rank()` of a data-parallel run: every rank reads the
    /// checkpoint rank 0 wrote (the ranks hold the same state).
    pub fn resume_rank(output: &Path, comm: Arc<dyn Collective>) -> Result<Self> {
        Self::restart(output, Some(comm))
    }

    fn restart(output: &Path, comm: Option<Arc<dyn Collective>>) -> Result<Self> {
        let paths = RunPaths::new(output);
        let saved = state::read_config(&paths.state)?;
        let mut cfg = saved;
        cfg.output = output.to_path_buf();
        let encoder = load_encoder(&cfg)?;
        let mut t = Self::assemble(cfg, encoder, paths, comm)?;
        let state_path = t.paths.state.clone();
        state::restore(&mut t, &state_path)?;
        if t.log.is_some() {
            truncate_log(&t.paths.log, t.step)?;
            t.log = Some(open_append(&t.paths.log)?);
        }
        Ok(t)
    }

    fn assemble(
        cfg: TrainConfig,
        encoder: Encoder,
        paths: RunPaths,
        comm: Option<Arc<dyn Collective>>,
    ) -> Result<Self> {
        let set = match &cfg.data {
            DataSource::Beir { dir, split } => data::read_beir_train(dir, split)?,
            DataSource::Jsonl { path } => data::read_jsonl_train(path)?,
        };
        if set.queries.is_empty() {
            return Err(Error::InvalidArgument(
                "empty training set: no query has a positive document".into(),
            ));
        }
        let max_pos = encoder.config().max_position_embeddings;
        let tok_path = encoder.dir().join("tokenizer.json");
        let query_tok = TextTokenizer::from_file(&tok_path, cfg.query_max_length.min(max_pos))?;
        let doc_tok = TextTokenizer::from_file(&tok_path, cfg.doc_max_length.min(max_pos))?;
        let docs: Vec<&str> = set.corpus.iter().map(|d| d.text.as_str()).collect();
        let doc_tokens = doc_tok.encode_batch(&docs)?;
        let queries: Vec<&str> = set.queries.iter().map(|q| q.text.as_str()).collect();
        let query_tokens = query_tok.encode_batch(&queries)?;
        let eval = match &cfg.eval {
            Some(e) => Some(crate::data::beir::read_beir_folder(&e.dir, &e.split)?),
            None => None,
        };
        let tau = cfg
            .tau
            .unwrap_or(if encoder.normalize() { 0.05 } else { 1.0 });
        let mut grads = BertWeights::zeros(encoder.config());
        let sizes: Vec<usize> = grads.tensors_mut().iter().map(|(t, _)| t.len()).collect();
        let writer = comm.as_ref().is_none_or(|c| c.rank() == 0);
        let log = if writer {
            Some(open_append(&paths.log)?)
        } else {
            None
        };
        let joint = match (&cfg.sampler, &cfg.adapter.init) {
            (SamplerKind::Rrra { .. }, Some(path)) => {
                let j = JointAdapter::load(path)?;
                j.file.check_dim(encoder.dim(), path)?;
                Some(j)
            }
            _ => None,
        };
        Ok(Trainer {
            joint,
            optim: AdamW::new(cfg.adamw, &sizes),
            cfg,
            encoder,
            query_tok,
            doc_tok,
            set,
            doc_tokens,
            query_tokens,
            grads,
            step: 0,
            epoch: 0,
            cursor: 0,
            pool: None,
            pool_step: 0,
            tau,
            batches: Vec::new(),
            batches_epoch: None,
            paths,
            log,
            eval,
            preset_snapshot: None,
            offload: None,
            host_behind: false,
            comm,
        })
    }

    /// Runs each step's encoder forward and backward (with the run's dropout masks), and the
    /// encodes of a mining refresh and of an evaluation, on `encoder` (a GPU's), and the
    /// step's loss and those searches too when it offers them ([`OffloadedEncoder::info_nce`],
    /// [`OffloadedEncoder::search`]); the samplers stay here. The optimizer stays here too,
    /// with the weights uploaded after every optimizer step, unless `encoder` is a
    /// [`ResidentOptimizer`]: then it takes the weights and the AdamW state now and keeps them,
    /// and the host copies them back for checkpoints and at the end of [`Trainer::run`]. In a
    /// data-parallel run a resident optimizer also sums the ranks' gradients itself
    /// ([`ResidentOptimizer::accumulate_and_reduce`]). The RRRA joint adapter's forward and
    /// backward go where `encoder` offers them a place ([`OffloadedEncoder::adapter_op`]).
    pub fn offload_encoder(&mut self, mut encoder: Box<dyn OffloadedEncoder>) -> Result<()> {
        self.sync_host()?;
        let stale = match encoder.resident() {
            Some(r) => {
                r.load(&self.encoder.bert().weights, &self.optim)?;
                false
            }
            None => true,
        };
        self.offload = Some((encoder, stale));
        // a resumed run's pool is already mined: the adapter moves now, not at the next refresh
        match self.pool.as_ref().map(|p| self.joint_op_size(p)) {
            Some(size) => self.place_joint_adapter(size),
            None => Ok(()),
        }
    }

    /// The offloaded encoder's optimizer, when it keeps one.
    fn resident(&mut self) -> Option<&mut dyn ResidentOptimizer> {
        self.offload.as_mut().and_then(|(e, _)| e.resident())
    }

    /// Copies a resident optimizer's weights and AdamW state to the host, when behind.
    fn sync_host(&mut self) -> Result<()> {
        if !self.host_behind {
            return Ok(());
        }
        let Some((enc, _)) = self.offload.as_mut() else {
            return Ok(());
        };
        if let Some(r) = enc.resident() {
            r.store(&mut self.encoder.bert_mut().weights, &mut self.optim)?;
        }
        self.host_behind = false;
        Ok(())
    }

    /// The most sequences and tokens one batch of this run holds: queries, their positives and
    /// negatives, at the configured (position-capped) lengths. What an offloaded encoder's
    /// buffers must take.
    pub fn batch_capacity(&self) -> (usize, usize) {
        let max_pos = self.encoder.config().max_position_embeddings;
        let (ql, dl) = (
            self.cfg.query_max_length.min(max_pos),
            self.cfg.doc_max_length.min(max_pos),
        );
        let b = self.cfg.batch_size;
        let docs = b * (1 + self.cfg.hard_negatives + self.cfg.random_negatives);
        (b + docs, b * ql + docs * dl)
    }

    pub fn config(&self) -> &TrainConfig {
        &self.cfg
    }
    pub fn train_set(&self) -> &TrainSet {
        &self.set
    }
    pub fn encoder(&self) -> &Encoder {
        &self.encoder
    }
    pub fn paths(&self) -> &RunPaths {
        &self.paths
    }
    pub fn step(&self) -> u64 {
        self.step
    }

    /// Batches per epoch and optimizer steps per epoch.
    fn steps_per_epoch(&self) -> Result<(usize, u64)> {
        let batches = data::epoch_batches(&self.set, self.cfg.seed, 0, self.cfg.batch_size)?.len();
        Ok((batches, batches.div_ceil(self.cfg.grad_accum) as u64))
    }

    /// Total optimizer steps of the run.
    pub fn total_steps(&self) -> Result<u64> {
        let (_, per_epoch) = self.steps_per_epoch()?;
        let total = per_epoch * self.cfg.epochs as u64;
        Ok(match self.cfg.max_steps {
            Some(m) if self.cfg.epochs == 0 => m,
            Some(m) => m.min(total),
            None => total,
        })
    }

    /// Runs to the end (or to `stop_after` more steps, for tests and staged runs).
    pub fn run(&mut self, stop_after: Option<u64>, on: &mut dyn FnMut(TrainEvent)) -> Result<()> {
        let total = self.total_steps()?;
        let (_, per_epoch) = self.steps_per_epoch()?;
        let warmup = (total as f64 * self.cfg.warmup_ratio as f64).ceil() as u64;
        let mine_every = self.cfg.mine_every.unwrap_or(per_epoch).max(1);
        let ckpt_every = self.cfg.checkpoint_every.unwrap_or(per_epoch).max(1);
        let eval_every = self
            .cfg
            .eval
            .as_ref()
            .map(|e| e.every.unwrap_or(per_epoch).max(1));
        if self.step == 0 {
            self.log_json(&serde_json::json!({
                "event": "start", "step": 0, "config": self.cfg.to_json(),
                "encoder": self.encoder.describe(), "data": self.set.stats,
                "total_steps": total, "tau": self.tau,
            }))?;
        }
        let mut clock = StepClock::default();
        let mut done_here = 0u64;
        while self.step < total && stop_after.is_none_or(|n| done_here < n) {
            let needs_pool = self.cfg.hard_negatives > 0;
            if needs_pool
                && (self.pool.is_none()
                    || (self.step.is_multiple_of(mine_every) && self.pool_step != self.step))
            {
                self.refresh_pool(on)?;
            }
            let rec = self.train_step(total, warmup, &mut clock)?;
            done_here += 1;
            self.log_json(&serde_json::to_value(&rec).unwrap_or_default())?;
            on(TrainEvent::Step(&rec));
            let last = self.step == total;
            if let Some(every) = eval_every {
                if self.step.is_multiple_of(every) || last {
                    self.evaluate(on)?;
                }
            }
            if self.step.is_multiple_of(ckpt_every) || last {
                self.save_checkpoint(on)?;
            }
        }
        // the caller reads the trained encoder from the host
        self.sync_host()
    }

    /// One optimizer step over `grad_accum` batches.
    fn train_step(&mut self, total: u64, warmup: u64, clock: &mut StepClock) -> Result<StepRecord> {
        let started = Instant::now();
        match self.resident() {
            Some(r) => r.zero_grads()?,
            None => self.grads.fill_zero(),
        }
        let mut stats = Vec::new();
        let mut examples = 0;
        let mut negatives = 0usize;
        let (mut adapter_losses, mut s_fn_drawn, mut over_half) = (Vec::new(), Vec::new(), 0usize);
        for micro in 0..self.cfg.grad_accum {
            if self.batches_epoch != Some(self.epoch) {
                self.batches =
                    data::epoch_batches(&self.set, self.cfg.seed, self.epoch, self.cfg.batch_size)?;
                self.batches_epoch = Some(self.epoch);
            }
            let batch = self.batches[self.cursor].clone();
            // the step's last micro-batch: the grad_accum-th, or the epoch's last batch
            let last = micro + 1 == self.cfg.grad_accum || self.cursor + 1 == self.batches.len();
            let out = self.batch_gradients(&batch, micro, last)?;
            stats.push(out.stats);
            examples += batch.len();
            negatives += out.hard_drawn;
            adapter_losses.extend(out.adapter_loss);
            s_fn_drawn.extend(out.s_fn_drawn);
            over_half += out.over_half;
            self.cursor += 1;
            if self.cursor == self.batches.len() {
                self.cursor = 0;
                self.epoch += 1;
                break; // an epoch's last step may hold fewer batches
            }
        }
        let scale = 1.0 / stats.len() as f32;
        let lr = linear_warmup_decay(self.step, total, warmup, self.cfg.lr);
        let max_norm = if self.cfg.max_grad_norm > 0.0 {
            self.cfg.max_grad_norm
        } else {
            f32::INFINITY
        };
        let resident = self.resident().is_some();
        if let (Some(comm), false) = (&self.comm, resident) {
            // the ranks' shares summed: every rank now holds the global batch's gradient (a
            // resident optimizer summed its own during the last micro-batch)
            parallel::all_reduce_gradients(comm.as_ref(), &mut self.grads)?;
        }
        let grad_norm = match self.resident() {
            Some(r) => r.update(scale, max_norm, lr)?,
            None => self.host_update(scale, max_norm, lr)?,
        };
        self.host_behind |= resident;
        if !grad_norm.is_finite() {
            return Err(Error::InvalidArgument(format!(
                "the gradient norm became {grad_norm} at step {}: lower the learning rate",
                self.step
            )));
        }
        if let Some(j) = self.joint.as_mut() {
            // the adapter follows the encoder's schedule, scaled to its own peak
            let adapter_lr = self.cfg.adapter.lr * (lr / self.cfg.lr);
            j.update(adapter_lr, scale)?;
        }
        self.step += 1;

        let n = stats.len() as f64;
        let mean = |f: fn(&InfoNceStats) -> f64| stats.iter().map(f).sum::<f64>() / n;
        clock.seconds += started.elapsed().as_secs_f64();
        clock.steps += 1;
        clock.examples += examples;
        let per_step = clock.seconds / clock.steps as f64;
        Ok(StepRecord {
            step: self.step,
            total_steps: total,
            epoch: self.epoch,
            loss: mean(|s| s.loss),
            lr,
            grad_norm,
            accuracy: mean(|s| s.accuracy),
            mean_positive: mean(|s| s.mean_positive),
            mean_negative: mean(|s| s.mean_negative),
            hard_negatives_per_query: negatives as f64 / examples.max(1) as f64,
            examples,
            examples_per_s: clock.examples as f64 / clock.seconds.max(1e-9),
            train_s: clock.seconds,
            eta_s: per_step * (total - self.step) as f64,
            adapter_loss: (!adapter_losses.is_empty())
                .then(|| adapter_losses.iter().sum::<f64>() / adapter_losses.len() as f64),
            fn_mean_drawn: (self.joint.is_some() && !s_fn_drawn.is_empty()).then(|| {
                s_fn_drawn.iter().map(|&v| v as f64).sum::<f64>() / s_fn_drawn.len() as f64
            }),
            fn_over_half: self
                .joint
                .is_some()
                .then(|| over_half as f64 / examples.max(1) as f64),
        })
    }

    /// The optimizer step on the host ([`encoder_step`]); the weights on an offloaded encoder
    /// are then behind.
    fn host_update(&mut self, scale: f32, max_norm: f32, lr: f32) -> Result<f32> {
        let weights = &mut self.encoder.bert_mut().weights;
        let norm = encoder_step(
            &mut self.optim,
            weights,
            &mut self.grads,
            scale,
            max_norm,
            lr,
        )?;
        if norm.is_finite() {
            if let Some((_, stale)) = self.offload.as_mut() {
                *stale = true;
            }
        }
        Ok(norm)
    }

    /// The items of `n` (a global batch's examples, the texts to encode for mining) this
    /// process computes: all of them, or a data-parallel rank's contiguous share.
    fn shard_of(&self, n: usize) -> std::ops::Range<usize> {
        match &self.comm {
            Some(c) => share(n, c.rank(), c.world()),
            None => 0..n,
        }
    }

    /// The training documents' (`docs`) or queries' embeddings for a mining refresh, with the
    /// current encoder: on the offloaded encoder when there is one (the refresh's cost), and
    /// in a data-parallel run each rank encodes its share and the shares are gathered, so
    /// every rank mines the same pool from the same embeddings.
    fn mining_encode(&mut self, docs: bool) -> Result<Vec<f32>> {
        let tokens = if docs {
            &self.doc_tokens
        } else {
            &self.query_tokens
        };
        let part = &tokens[self.shard_of(tokens.len())];
        let local = encode_where_trained(
            &mut self.offload,
            &self.encoder,
            part,
            self.cfg.encode_batch_size,
        )?;
        let Some(comm) = &self.comm else {
            return Ok(local);
        };
        let (n, dim, world) = (tokens.len(), self.encoder.dim(), comm.world());
        let counts: Vec<usize> = (0..world).map(|r| share(n, r, world).len() * dim).collect();
        let mut all = vec![0.0f32; n * dim];
        comm.all_gather(&local, &counts, &mut all)?;
        Ok(all)
    }

    /// Whether this process writes the log, checkpoints and evaluations (rank 0 of a
    /// data-parallel run, or the only process).
    fn writes(&self) -> bool {
        self.comm.as_ref().is_none_or(|c| c.rank() == 0)
    }

    /// Forward, loss and backward of one batch; gradients added to `self.grads` (and to the
    /// joint adapter's). In a data-parallel run, of this rank's share of the batch, with the
    /// loss over the whole batch.
    fn batch_gradients(
        &mut self,
        global: &[Example],
        micro: usize,
        last: bool,
    ) -> Result<BatchOutcome> {
        let shard = self.shard_of(global.len());
        let batch = &global[shard.clone()];
        let b_n = batch.len();
        // Documents: the B positives first, then each query's negatives. `own[b]` lists the
        // columns of query b's own negatives with their soft log-weights (0 = weight 1).
        let mut docs: Vec<usize> = batch.iter().map(|e| e.positive).collect();
        let mut own: Vec<Vec<(usize, f32)>> = Vec::with_capacity(b_n);
        let (mut hard_drawn, mut s_fn_drawn, mut over_half) = (0, Vec::new(), 0);
        for (b, ex) in batch.iter().enumerate() {
            // keyed by the position in the global batch: the same draws on any rank
            let example = (micro * global.len() + shard.start + b) as u64;
            let drawn = self.draw_hard_negatives(ex, example)?;
            hard_drawn += drawn.docs.len();
            s_fn_drawn.extend_from_slice(&drawn.s_fn);
            over_half += drawn.over_half;
            let random = self.draw_random_negatives(ex, example, &drawn.docs);
            let mut cols = Vec::new();
            for (i, &d) in drawn.docs.iter().enumerate() {
                let lw = drawn.loss_log_weights.as_ref().map_or(0.0, |w| w[i]);
                cols.push((docs.len(), lw));
                docs.push(d);
            }
            for d in random {
                cols.push((docs.len(), 0.0));
                docs.push(d);
            }
            own.push(cols);
        }
        let mut packed = PackedBatch::new();
        for ex in batch {
            let t = &self.query_tokens[ex.query];
            packed.push(&t.ids, &t.type_ids);
        }
        for &d in &docs {
            let t = &self.doc_tokens[d];
            packed.push(&t.ids, &t.type_ids);
        }
        let te = TrainableEncoder {
            bert: self.encoder.bert(),
            pooling: self.encoder.pooling(),
            normalize: self.encoder.normalize(),
        };
        // A data-parallel rank learns where its sequences sit in the global batch.
        let layout = match &self.comm {
            Some(comm) => {
                let lw: Vec<f32> = own.iter().flatten().map(|c| c.1).collect();
                let keys = |v: &mut dyn Iterator<Item = usize>| -> Vec<u32> {
                    v.map(|i| i as u32).collect()
                };
                Some(GlobalLayout::gather(
                    comm.as_ref(),
                    &Shard {
                        packed: &packed,
                        query_keys: &keys(&mut batch.iter().map(|e| e.query)),
                        doc_keys: &keys(&mut docs.iter().copied()),
                        negatives: &own.iter().map(Vec::len).collect::<Vec<_>>(),
                        negative_log_weights: Some(&lw),
                    },
                    &te,
                )?)
            }
            None => None,
        };
        // Dropout streams are keyed by (micro-batch, sequence of the global batch).
        let seqs = packed.sequences();
        let rank = self.comm.as_ref().map_or(0, |c| c.rank());
        let train_batch = TrainBatch {
            packed,
            example_ids: (0..seqs)
                .map(|s| {
                    let g = layout.as_ref().map_or(s, |l| l.global_sequence(rank, s));
                    ((micro as u64) << 14) | g as u64
                })
                .collect(),
        };
        let cfg = self.encoder.config();
        let dropout = if self.cfg.dropout {
            DropoutPlan {
                hidden: cfg.hidden_dropout_prob as f32,
                attention: cfg.attention_probs_dropout_prob as f32,
                seed: self.cfg.seed,
                step: self.step,
            }
        } else {
            DropoutPlan::none()
        };
        let (embeddings, cpu_acts) = match self.offload.as_mut() {
            // a rank may hold no example at an uneven epoch end: it only joins the collectives
            _ if seqs == 0 => (Vec::new(), None),
            Some((enc, stale)) => {
                if *stale {
                    enc.set_weights(&self.encoder.bert().weights)?;
                    *stale = false;
                }
                (enc.forward(&train_batch, &dropout)?, None)
            }
            None => {
                let acts = te.forward(&train_batch, &dropout, self.cfg.activations)?;
                (acts.embeddings.clone(), Some(acts))
            }
        };
        let h = self.encoder.dim();
        if let (Some(comm), Some(layout)) = (&self.comm, &layout) {
            let (queries, all_docs) =
                parallel::gather_embeddings(comm.as_ref(), layout, &embeddings, h)?;
            let set = &self.set;
            let log_w = layout.log_weights(&|q, d| set.is_positive(q as usize, d as usize));
            let mut dq = vec![0.0f32; queries.len()];
            let mut dd = vec![0.0f32; all_docs.len()];
            let stats = loss_where_trained(
                &mut self.offload,
                &InfoNceInput {
                    queries: &queries,
                    docs: &all_docs,
                    dim: h,
                    targets: &layout.targets(),
                    log_weights: Some(&log_w),
                    tau: self.tau,
                },
                &mut dq,
                &mut dd,
            )?;
            self.check_loss(stats.loss)?;
            // The joint adapter's loss over the whole batch, like InfoNCE on every rank: the
            // same adapter gradient everywhere, and the embeddings' share of it per rank.
            let mut adapter_loss = None;
            if let (Some(joint), Some(pool)) = (self.joint.as_mut(), self.pool.as_ref()) {
                let lists = joint_lists(
                    joint,
                    &self.set,
                    pool,
                    layout.batch(),
                    |g| {
                        let cols = std::iter::once(g).chain(layout.own_negatives(g)).collect();
                        (layout.query_keys[g] as usize, cols)
                    },
                    |j| layout.doc_keys[j] as usize,
                );
                let weight = self.cfg.adapter.loss_weight;
                adapter_loss = Some(
                    joint.batch_loss(&queries, &all_docs, h, &lists, weight, &mut dq, &mut dd)?,
                );
            }
            // A resident optimizer sums the ranks' gradients with the step's last backward
            // (a rank without examples joins at the same point of the step).
            let reduce = match self.offload.as_mut().and_then(|(e, _)| e.resident()) {
                Some(r) if last && seqs == 0 => {
                    r.all_reduce_grads(comm.as_ref())?;
                    None
                }
                Some(_) if last => Some(comm.as_ref()),
                _ => None,
            };
            if seqs > 0 {
                let d_emb = parallel::local_rows(layout, rank, &dq, &dd, h);
                encoder_backward(
                    &mut self.offload,
                    &te,
                    &mut self.grads,
                    &train_batch,
                    &dropout,
                    cpu_acts,
                    &d_emb,
                    reduce,
                )?;
            }
            // the log's counts over the whole batch
            let mut counts = [hard_drawn as f32, over_half as f32];
            comm.all_reduce_sum(&mut counts)?;
            return Ok(BatchOutcome {
                stats,
                hard_drawn: counts[0] as usize,
                adapter_loss,
                s_fn_drawn: parallel::gather_all(comm.as_ref(), &s_fn_drawn)?,
                over_half: counts[1] as usize,
            });
        }
        let d_n = docs.len();
        // Another positive of the same query is never its negative.
        let mut log_w = vec![0.0f32; b_n * d_n];
        for (b, ex) in batch.iter().enumerate() {
            for (j, &d) in docs.iter().enumerate() {
                if j != b && self.set.is_positive(ex.query, d) {
                    log_w[b * d_n + j] = f32::NEG_INFINITY;
                }
            }
            for &(j, lw) in &own[b] {
                if log_w[b * d_n + j] != f32::NEG_INFINITY {
                    log_w[b * d_n + j] = lw;
                }
            }
        }
        let targets: Vec<usize> = (0..b_n).collect();
        let (q, d) = embeddings.split_at(b_n * h);
        let mut d_emb = vec![0.0f32; embeddings.len()];
        let (dq, dd) = d_emb.split_at_mut(b_n * h);
        let stats = loss_where_trained(
            &mut self.offload,
            &InfoNceInput {
                queries: q,
                docs: d,
                dim: h,
                targets: &targets,
                log_weights: Some(&log_w),
                tau: self.tau,
            },
            dq,
            dd,
        )?;
        self.check_loss(stats.loss)?;
        let mut adapter_loss = None;
        if let (Some(joint), Some(pool)) = (self.joint.as_mut(), self.pool.as_ref()) {
            let lists = joint_lists(
                joint,
                &self.set,
                pool,
                b_n,
                |b| {
                    let cols = std::iter::once(b)
                        .chain(own[b].iter().map(|c| c.0))
                        .collect();
                    (batch[b].query, cols)
                },
                |j| docs[j],
            );
            let (dq, dd) = d_emb.split_at_mut(b_n * h);
            adapter_loss =
                Some(joint.batch_loss(q, d, h, &lists, self.cfg.adapter.loss_weight, dq, dd)?);
        }
        encoder_backward(
            &mut self.offload,
            &te,
            &mut self.grads,
            &train_batch,
            &dropout,
            cpu_acts,
            &d_emb,
            None,
        )?;
        Ok(BatchOutcome {
            stats,
            hard_drawn,
            adapter_loss,
            s_fn_drawn,
            over_half,
        })
    }

    fn check_loss(&self, loss: f64) -> Result<()> {
        if loss.is_finite() {
            return Ok(());
        }
        Err(Error::InvalidArgument(format!(
            "the loss became {loss} at step {}: lower the learning rate",
            self.step
        )))
    }

    /// The sampler's draw from the query's pool (corpus indices, draw order).
    fn draw_hard_negatives(&self, ex: &Example, example: u64) -> Result<Drawn> {
        let n = self.cfg.hard_negatives;
        let mut out = Drawn {
            docs: Vec::new(),
            loss_log_weights: None,
            s_fn: Vec::new(),
            over_half: 0,
        };
        let Some(pool) = &self.pool else {
            return Ok(out);
        };
        let cands = &pool.candidates[ex.query];
        if n == 0 || cands.is_empty() {
            return Ok(out);
        }
        let scores: Vec<f32> = cands.iter().map(|&(_, s)| s).collect();
        let stream = Stream::new(self.cfg.seed, self.step, example, 0, Site::Sampler);
        if let SamplerKind::Rrra { gamma, t_h, soft } = self.cfg.sampler {
            let joint = self.joint.as_ref().ok_or_else(|| {
                Error::InvalidArgument("sampler rrra: the adapter is not loaded".into())
            })?;
            let s_fn = joint.fn_scores.get(ex.query).ok_or_else(|| {
                Error::InvalidArgument("sampler rrra: the pool has not been scored".into())
            })?;
            let log_w = sampler::rrra_log_weights(&scores, s_fn, self.tau, gamma, t_h)?;
            let picks = if soft {
                // uniform draw, weighted in the loss by w·K/n (never above the pool size)
                let uniform: Vec<f64> = log_w
                    .iter()
                    .map(|w| {
                        if w.is_finite() {
                            0.0
                        } else {
                            f64::NEG_INFINITY
                        }
                    })
                    .collect();
                let picks = sampler::sample_without_replacement(&uniform, n, &stream);
                let ratio = (cands.len() as f64 / picks.len().max(1) as f64).ln();
                out.loss_log_weights =
                    Some(picks.iter().map(|&i| (log_w[i] + ratio) as f32).collect());
                picks
            } else {
                sampler::sample_without_replacement(&log_w, n, &stream)
            };
            out.s_fn = picks.iter().map(|&i| s_fn[i]).collect();
            out.over_half = s_fn.iter().filter(|&&f| f > 0.5).count();
            out.docs = picks.into_iter().map(|i| cands[i].0 as usize).collect();
            return Ok(out);
        }
        let pos_score = pool.score(ex.query, ex.positive);
        let dim = pool.dim;
        let cand_emb: Vec<f32>;
        let geometry = if matches!(self.cfg.sampler, SamplerKind::TriSampler { .. }) {
            cand_emb = cands
                .iter()
                .flat_map(|&(d, _)| {
                    pool.doc_embeddings[d as usize * dim..(d as usize + 1) * dim]
                        .iter()
                        .copied()
                })
                .collect();
            Some(PoolGeometry {
                query: &pool.query_embeddings[ex.query * dim..(ex.query + 1) * dim],
                positive: &pool.doc_embeddings[ex.positive * dim..(ex.positive + 1) * dim],
                candidates: &cand_emb,
                dim,
            })
        } else {
            None
        };
        let log_w = sampler::log_weights(&self.cfg.sampler, &scores, pos_score, geometry.as_ref())?;
        out.docs = sampler::sample_without_replacement(&log_w, n, &stream)
            .into_iter()
            .map(|i| cands[i].0 as usize)
            .collect();
        Ok(out)
    }

    /// Uniform corpus documents that are not positives of the query and not already drawn.
    fn draw_random_negatives(&self, ex: &Example, example: u64, hard: &[usize]) -> Vec<usize> {
        let n = self.cfg.random_negatives;
        let corpus = self.set.corpus.len() as u64;
        let stream = Stream::new(self.cfg.seed, self.step, example, 0, Site::RandomNegative);
        let mut out = Vec::with_capacity(n);
        // Bounded attempts: a tiny corpus full of positives must not loop forever.
        for i in 0..(n as u64 * 16 + 16) {
            if out.len() == n {
                break;
            }
            let d = (stream.u32_at(i) as u64 % corpus) as usize;
            if !self.set.is_positive(ex.query, d) && !hard.contains(&d) && !out.contains(&d) {
                out.push(d);
            }
        }
        out
    }

    /// The embeddings the next mining would compute with the current encoder. Runs that start
    /// from the same encoder on the same data and lengths can share them through
    /// `reuse_first_snapshot` instead of each encoding the corpus again.
    pub fn mining_snapshot(&self) -> Result<MiningSnapshot> {
        let bs = self.cfg.encode_batch_size;
        Ok(MiningSnapshot {
            docs: self.encoder.encode_tokens(&self.doc_tokens, bs, &|_| {})?,
            queries: self
                .encoder
                .encode_tokens(&self.query_tokens, bs, &|_| {})?,
        })
    }

    /// Uses `snap` for the first mining of a fresh run instead of encoding. The caller vouches
    /// that it comes from this run's starting encoder, data and max lengths (`mining_snapshot`
    /// of a twin run); only the shapes can be checked here.
    pub fn reuse_first_snapshot(&mut self, snap: MiningSnapshot) -> Result<()> {
        let dim = self.encoder.dim();
        if self.step != 0 || self.pool.is_some() {
            return Err(Error::InvalidArgument(
                "a mining snapshot can only seed the first mining of a fresh run".into(),
            ));
        }
        if snap.docs.len() != self.doc_tokens.len() * dim
            || snap.queries.len() != self.query_tokens.len() * dim
        {
            return Err(Error::InvalidArgument(format!(
                "mining snapshot of {} document and {} query values does not fit {} documents \
                 and {} queries of dimension {dim}",
                snap.docs.len(),
                snap.queries.len(),
                self.doc_tokens.len(),
                self.query_tokens.len()
            )));
        }
        self.preset_snapshot = Some(snap);
        Ok(())
    }

    fn refresh_pool(&mut self, on: &mut dyn FnMut(TrainEvent)) -> Result<()> {
        on(TrainEvent::Message(format!(
            "mining hard negatives at step {}",
            self.step
        )));
        let snap = match self.preset_snapshot.take() {
            Some(s) => s,
            None => MiningSnapshot {
                docs: self.mining_encode(true)?,
                queries: self.mining_encode(false)?,
            },
        };
        let (doc_emb, q_emb) = (snap.docs, snap.queries);
        let (dim, top_k) = (self.encoder.dim(), self.cfg.mine_top_k.max(1));
        let depth = mining::search_depth(&self.set, top_k);
        let hits = search_where_trained(&mut self.offload, &doc_emb, &q_emb, dim, depth)?;
        let exclude = self.cfg.exclude_same_id;
        let (mut pool, stats) =
            mining::mine_from_hits(&self.set, dim, q_emb, doc_emb, &hits, top_k, exclude)?;
        if self.cfg.negative_pool == NegativePool::Given {
            // The file's negatives, ranked by the same snapshot's scores.
            for (qi, q) in self.set.queries.iter().enumerate() {
                let mut c: Vec<(u32, f32)> = q
                    .given_negatives
                    .iter()
                    .map(|&d| (d as u32, pool.score(qi, d)))
                    .collect();
                c.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
                pool.candidates[qi] = c;
            }
        }
        self.log_json(&serde_json::json!({"event": "mine", "step": self.step, "stats": stats}))?;
        on(TrainEvent::Mined(&stats));
        self.place_joint_adapter(self.joint_op_size(&pool))?;
        if let Some(joint) = self.joint.as_mut() {
            let fs = joint.refresh(&self.set, &pool)?;
            on(TrainEvent::Message(format!(
                "adapter scored the pool: mean s_FN {:.3}, {:.2} candidates per query above 0.5",
                fs.mean_s_fn, fs.over_half_per_query
            )));
            self.log_json(
                &serde_json::json!({"event": "fn_scores", "step": self.step, "stats": fs}),
            )?;
        }
        self.pool = Some(pool);
        self.pool_step = self.step;
        Ok(())
    }

    /// What the joint adapter's op must take per call (queries, pairs): the run's batches,
    /// and `pool`'s rescoring at 32 queries a call.
    fn joint_op_size(&self, pool: &MinedPool) -> (usize, usize) {
        let b = self.cfg.batch_size;
        let per_query = 1 + self.cfg.hard_negatives + self.cfg.random_negatives;
        let longest = (pool.candidates.iter().zip(&self.set.queries))
            .map(|(c, q)| c.len() + q.positives.len())
            .max()
            .unwrap_or(0);
        (b.max(32), (b * per_query).max(32 * longest))
    }

    /// Moves the joint adapter's forward and backward beside an offloaded encoder (its GPU)
    /// when that encoder offers a place of `size` ([`Trainer::joint_op_size`]). Kept while
    /// large enough; replaced (the only allocation, at a refresh) when a longer pool list
    /// needs more.
    fn place_joint_adapter(&mut self, (queries, pairs): (usize, usize)) -> Result<()> {
        let (Some(joint), Some((enc, _))) = (self.joint.as_mut(), self.offload.as_mut()) else {
            return Ok(());
        };
        if joint
            .op_capacity()
            .is_some_and(|(q, p)| q >= queries && p >= pairs)
        {
            return Ok(());
        }
        let params = &joint.file.params;
        if let Some(op) = enc.adapter_op(params.d, params.h, queries, pairs) {
            joint.set_op(op?);
        }
        Ok(())
    }

    /// Retrieval metrics of the current encoder on the evaluation split: encoded and searched
    /// where the encoder trains (an offloaded encoder's GPU, as a mining refresh is), else here.
    pub fn evaluate(&mut self, on: &mut dyn FnMut(TrainEvent)) -> Result<()> {
        if self.eval.is_none() || !self.writes() {
            return Ok(()); // no split, or a data-parallel rank other than 0
        }
        // the weights that encode are current wherever the encoder trains: nothing to copy back
        let Some(ev) = &self.eval else { return Ok(()) };
        let (dim, batch) = (self.encoder.dim(), self.cfg.encode_batch_size);
        let docs: Vec<&str> = ev.corpus.iter().map(|d| d.text.as_str()).collect();
        let mut doc_emb = Vec::with_capacity(docs.len() * dim);
        for chunk in docs.chunks(batch * 32) {
            let tokens = self.doc_tok.encode_batch(chunk)?;
            let emb = encode_where_trained(&mut self.offload, &self.encoder, &tokens, batch)?;
            doc_emb.extend(emb);
        }
        let queries: Vec<&crate::data::beir::Query> = ev.judged_queries().collect();
        let texts: Vec<&str> = queries.iter().map(|q| q.text.as_str()).collect();
        let tokens = self.query_tok.encode_batch(&texts)?;
        let q_emb = encode_where_trained(&mut self.offload, &self.encoder, &tokens, batch)?;
        let depth = 100.min(ev.corpus.len());
        let hits = search_where_trained(&mut self.offload, &doc_emb, &q_emb, dim, depth)?;
        let mut run = crate::data::trec::Run::new();
        for (q, hits) in queries.iter().zip(hits) {
            let docs = hits
                .into_iter()
                .map(|h| (ev.corpus[h.index].id.clone(), h.score as f64))
                .collect();
            run.add_query(q.id.clone(), docs)?;
        }
        let result = evaluate(&run, &ev.qrels, &EvalOptions::default());
        let metrics = serde_json::json!(result.mean);
        self.log_json(
            &serde_json::json!({"event": "eval", "step": self.step, "metrics": metrics}),
        )?;
        on(TrainEvent::Evaluated {
            step: self.step,
            metrics: &metrics,
        });
        Ok(())
    }

    /// Writes the model folder, then the training state (each atomically).
    pub fn save_checkpoint(&mut self, on: &mut dyn FnMut(TrainEvent)) -> Result<()> {
        self.sync_host()?;
        if !self.writes() {
            return Ok(()); // a data-parallel rank other than 0: rank 0 writes
        }
        state::write_model(self)?;
        if let Some(j) = self.joint.as_mut() {
            // the jointly trained adapter, beside the encoder it now belongs to
            j.file.info = serde_json::json!({
                "stage": "joint", "step": self.step, "encoder": self.paths.model,
            });
            j.file.tau = self.tau;
            j.file
                .save(&self.paths.model.join(crate::adapter::file::FILE_NAME))?;
        }
        state::write_state(self)?;
        self.log_json(&serde_json::json!({"event": "checkpoint", "step": self.step}))?;
        on(TrainEvent::Checkpoint {
            step: self.step,
            dir: &self.paths.model,
        });
        Ok(())
    }

    fn log_json(&mut self, v: &serde_json::Value) -> Result<()> {
        let Some(log) = self.log.as_mut() else {
            return Ok(());
        };
        let line = format!("{v}\n");
        log.write_all(line.as_bytes())
            .and_then(|_| log.flush())
            .map_err(|e| Error::io(&self.paths.log, e))
    }
}

/// The joint adapter's pairs of a batch of `queries`: for each query (its training-set index
/// and document columns from `query_cols`: its positive's column, then its own negatives'),
/// the columns with their classes by the mined pool; `doc` gives a column's corpus index.
fn joint_lists(
    joint: &JointAdapter,
    set: &TrainSet,
    pool: &MinedPool,
    queries: usize,
    query_cols: impl Fn(usize) -> (usize, Vec<usize>),
    doc: impl Fn(usize) -> usize,
) -> Vec<(Vec<usize>, Vec<crate::adapter::pairs::PairClass>)> {
    (0..queries)
        .map(|b| {
            let (query, cols) = query_cols(b);
            let classes = cols
                .iter()
                .map(|&j| joint.class_of(set, pool, query, doc(j)))
                .collect();
            (cols, classes)
        })
        .collect()
}

/// Embeddings of `tokens` (no dropout) by the current weights, where the encoder trains: on an
/// offloaded encoder (given the host's weights first when it is behind them), else on the CPU
/// `encoder`.
fn encode_where_trained(
    offload: &mut Option<(Box<dyn OffloadedEncoder>, bool)>,
    encoder: &Encoder,
    tokens: &[Tokens],
    batch: usize,
) -> Result<Vec<f32>> {
    match offload.as_mut() {
        Some((enc, stale)) => {
            if *stale {
                enc.set_weights(&encoder.bert().weights)?;
                *stale = false;
            }
            enc.encode(tokens)
        }
        None => encoder.encode_tokens(tokens, batch, &|_| {}),
    }
}

/// The contrastive loss of `input` where the encoder runs when it offers one (a GPU's fused
/// InfoNCE), else here ([`info_nce`]).
fn loss_where_trained(
    offload: &mut Option<(Box<dyn OffloadedEncoder>, bool)>,
    input: &InfoNceInput<'_>,
    dq: &mut [f32],
    dd: &mut [f32],
) -> Result<InfoNceStats> {
    match offload
        .as_mut()
        .and_then(|(enc, _)| enc.info_nce(input, dq, dd))
    {
        Some(stats) => stats,
        None => info_nce(input, dq, dd),
    }
}

/// The exact top `depth` of `docs` for each of `queries` by inner product, where the encoder
/// runs when it can search there (a GPU's top-k), else here.
fn search_where_trained(
    offload: &mut Option<(Box<dyn OffloadedEncoder>, bool)>,
    docs: &[f32],
    queries: &[f32],
    dim: usize,
    depth: usize,
) -> Result<Vec<Vec<crate::index::Hit>>> {
    let device_hits = match offload.as_mut() {
        Some((enc, _)) if depth > 0 => enc.search(docs, queries, dim, depth),
        _ => None,
    };
    match device_hits {
        Some(hits) => hits,
        None => {
            let corpus = crate::index::Corpus::from_f32(docs, dim)?;
            crate::index::topk::search_batch(&corpus, queries, depth)
        }
    }
}

/// Rank `r`'s contiguous share of `n` items among `world` ranks.
fn share(n: usize, r: usize, world: usize) -> std::ops::Range<usize> {
    n * r / world..n * (r + 1) / world
}

/// The encoder's backward of `d_emb` wherever its forward ran: added to `grads`, or to an
/// offloaded encoder's own accumulator (summed over `reduce`'s ranks with it, when given).
#[allow(clippy::too_many_arguments)]
fn encoder_backward(
    offload: &mut Option<(Box<dyn OffloadedEncoder>, bool)>,
    te: &TrainableEncoder<'_>,
    grads: &mut BertWeights,
    batch: &TrainBatch,
    dropout: &DropoutPlan,
    cpu_acts: Option<super::encoder_grad::Activations>,
    d_emb: &[f32],
    reduce: Option<&dyn Collective>,
) -> Result<()> {
    match (offload.as_mut(), cpu_acts) {
        (Some((enc, _)), _) => match (enc.resident(), reduce) {
            (Some(r), Some(comm)) => r.accumulate_and_reduce(d_emb, comm),
            (Some(r), None) => r.accumulate(d_emb),
            (None, _) => enc.backward(d_emb, grads),
        },
        (None, Some(acts)) => te.backward(batch, dropout, acts, d_emb, grads),
        (None, None) => Err(Error::InvalidArgument(
            "the encoder's activations are missing".into(),
        )),
    }
}

fn load_encoder(cfg: &TrainConfig) -> Result<Encoder> {
    Encoder::load(
        &cfg.model,
        &EncoderOptions {
            max_length: Some(cfg.doc_max_length),
            ..Default::default()
        },
    )
}

fn open_append(path: &Path) -> Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| Error::io(path, e))
}

/// Keeps the log lines up to the checkpoint of `step` (the lines a resumed run would write
/// again are dropped), rewriting the file atomically.
fn truncate_log(path: &Path, step: u64) -> Result<()> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(Error::io(path, e)),
    };
    let mut keep = 0;
    for (i, line) in text.lines().enumerate() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_default();
        if v["event"] == "checkpoint" && v["step"].as_u64() == Some(step) {
            keep = i + 1;
        }
    }
    let kept: String = text.lines().take(keep).map(|l| format!("{l}\n")).collect();
    crate::util::atomic_write(path, |w| {
        w.write_all(kept.as_bytes()).map_err(|e| Error::io(path, e))
    })
}
