//! Every knob of a training run, with its default. The whole struct is recorded in the run log,
//! in the training state and in the saved model's metadata, so a result always says how it was
//! made, and `--resume` continues with exactly the knobs the run started with.

use super::encoder_grad::ActivationMode;
use super::optim::AdamWConfig;
use super::sampler::SamplerKind;
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Where the training queries and their positives come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataSource {
    /// A BEIR folder and the qrels split to train on (positives: relevance > 0).
    Beir { dir: PathBuf, split: String },
    /// A FlagEmbedding or Tevatron JSON-lines file.
    Jsonl { path: PathBuf },
}

/// Which documents a query's hard negatives are drawn from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum NegativePool {
    /// The query's top-K from our own index (re-mined every `mine_every` steps).
    #[default]
    Mined,
    /// The negatives the data file lists (scored with the same encoder snapshot).
    Given,
}

/// Periodic retrieval evaluation on a BEIR split (never used for training decisions).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalSpec {
    pub dir: PathBuf,
    pub split: String,
    /// Evaluate every this many optimizer steps (and always at the end); `None`: at the end
    /// of every epoch.
    pub every: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// The model folder training starts from (Hugging Face / sentence-transformers layout).
    pub model: PathBuf,
    pub data: DataSource,
    /// Run folder: the model checkpoint (`model/`), the training state, the JSON-lines log.
    pub output: PathBuf,
    pub seed: u64,
    pub epochs: u32,
    /// Stop after this many optimizer steps (before the epochs run out).
    pub max_steps: Option<u64>,
    /// Queries per batch (each with one positive and its negatives).
    pub batch_size: usize,
    /// Batches whose gradients are summed per optimizer step (each batch its own InfoNCE).
    pub grad_accum: usize,
    pub lr: f32,
    /// Share of the optimizer steps spent warming the learning rate up from 0.
    pub warmup_ratio: f32,
    pub adamw: AdamWConfig,
    /// Clip the global gradient norm to this value; 0 disables.
    pub max_grad_norm: f32,
    /// InfoNCE temperature; `None`: 0.05 for normalised embeddings, 1 otherwise.
    pub tau: Option<f32>,
    pub query_max_length: usize,
    pub doc_max_length: usize,
    /// Hard negatives drawn per query from its pool.
    pub hard_negatives: usize,
    /// Random corpus negatives per query (never a positive of the query).
    pub random_negatives: usize,
    pub sampler: SamplerKind,
    pub negative_pool: NegativePool,
    /// K of mining.
    pub mine_top_k: usize,
    /// Drop a mined document whose id equals the query id (corpora that contain their queries;
    /// harmless elsewhere unless query and document ids share a numbering).
    #[serde(default = "yes")]
    pub exclude_same_id: bool,
    /// Re-mine every this many optimizer steps; `None`: at the start of every epoch.
    pub mine_every: Option<u64>,
    /// Dropout with the probabilities of config.json (off: deterministic forward).
    pub dropout: bool,
    pub activations: ActivationMode,
    /// Save the checkpoint every this many optimizer steps (and at the end); `None`: at the end
    /// of every epoch.
    pub checkpoint_every: Option<u64>,
    pub eval: Option<EvalSpec>,
    /// Texts per forward when encoding for mining and evaluation.
    pub encode_batch_size: usize,
    /// The RRRA sampler's adapter: where it starts (a stage-2 adapter file) and how it keeps
    /// training jointly with the encoder (ignored by the other samplers).
    #[serde(default)]
    pub adapter: AdapterJoint,
}

/// Stage 3 of RRRA: the adapter trained jointly with the encoder, `L = L_c + weight · L_adapter`
/// (the class-weighted BCE of the adapter on each query's positive and drawn negatives; the
/// normalisation term is dropped, as in the paper).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterJoint {
    /// A stage-2 adapter file (or a folder holding `adapter.safetensors`).
    pub init: Option<PathBuf>,
    /// lambda of the joint loss.
    pub loss_weight: f64,
    /// Peak learning rate of the adapter (same warm-up and decay shape as the encoder's).
    pub lr: f32,
}

impl Default for AdapterJoint {
    fn default() -> Self {
        AdapterJoint {
            init: None,
            loss_weight: 0.1,
            lr: 1e-3,
        }
    }
}

fn yes() -> bool {
    true
}

impl TrainConfig {
    /// The defaults for a model and data source.
    pub fn new(model: PathBuf, data: DataSource, output: PathBuf) -> Self {
        TrainConfig {
            model,
            data,
            output,
            seed: 42,
            epochs: 1,
            max_steps: None,
            batch_size: 16,
            grad_accum: 1,
            lr: 2e-5,
            warmup_ratio: 0.1,
            adamw: AdamWConfig::default(),
            max_grad_norm: 1.0,
            tau: None,
            query_max_length: 64,
            doc_max_length: 256,
            hard_negatives: 7,
            random_negatives: 0,
            sampler: SamplerKind::SimAns { a: 0.5, b: 0.0 },
            negative_pool: NegativePool::Mined,
            mine_top_k: 200,
            exclude_same_id: true,
            mine_every: None,
            dropout: true,
            activations: ActivationMode::Keep,
            checkpoint_every: None,
            eval: None,
            encode_batch_size: 32,
            adapter: AdapterJoint::default(),
        }
    }

    /// Refuses configurations that cannot train, with a sentence saying which knob and why.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::InvalidArgument(msg));
        if self.batch_size == 0 {
            return bad("batch size must be at least 1".into());
        }
        if self.grad_accum == 0 {
            return bad("gradient accumulation must be at least 1 batch".into());
        }
        if self.epochs == 0 && self.max_steps.is_none() {
            return bad("epochs must be at least 1".into());
        }
        if self.max_steps == Some(0) {
            return bad("max steps must be at least 1".into());
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return bad(format!("learning rate must be positive, got {}", self.lr));
        }
        if !(0.0..1.0).contains(&self.warmup_ratio) {
            return bad(format!(
                "warm-up ratio must be in [0, 1), got {}",
                self.warmup_ratio
            ));
        }
        if !(self.max_grad_norm >= 0.0 && self.max_grad_norm.is_finite()) {
            return bad(format!(
                "max gradient norm must be ≥ 0, got {}",
                self.max_grad_norm
            ));
        }
        if let Some(t) = self.tau {
            if !(t > 0.0 && t.is_finite()) {
                return bad(format!("temperature must be positive, got {t}"));
            }
        }
        if self.query_max_length < 2 || self.doc_max_length < 2 {
            return bad("max lengths must be at least 2 tokens ([CLS] and [SEP])".into());
        }
        if self.hard_negatives > 0
            && self.mine_top_k == 0
            && self.negative_pool == NegativePool::Mined
        {
            return bad("mining top-K must be at least 1 when hard negatives are drawn".into());
        }
        if self.mine_every == Some(0) || self.checkpoint_every == Some(0) {
            return bad("refresh and checkpoint intervals must be at least 1 step".into());
        }
        if let Some(e) = &self.eval {
            if e.every == Some(0) {
                return bad("evaluation interval must be at least 1 step".into());
            }
        }
        if self.encode_batch_size == 0 {
            return bad("encode batch size must be at least 1".into());
        }
        if matches!(self.sampler, SamplerKind::Rrra { .. }) {
            if self.adapter.init.is_none() {
                return bad("sampler rrra needs an adapter: train one with `rrra adapter` and pass --adapter".into());
            }
            if self.negative_pool != NegativePool::Mined {
                return bad(
                    "sampler rrra scores a mined pool; it cannot use the file's negatives".into(),
                );
            }
        }
        if !(self.adapter.loss_weight >= 0.0 && self.adapter.loss_weight.is_finite()) {
            return bad(format!(
                "adapter loss weight must be >= 0, got {}",
                self.adapter.loss_weight
            ));
        }
        if !(self.adapter.lr >= 0.0 && self.adapter.lr.is_finite()) {
            return bad(format!(
                "adapter learning rate must be >= 0, got {}",
                self.adapter.lr
            ));
        }
        self.sampler.validate()
    }

    /// Everything as one JSON object (for logs and metadata).
    pub fn to_json(&self) -> serde_json::Value {
        // Through text, so f32 knobs print as written (0.9, not 0.8999999761581421).
        serde_json::to_string(self)
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or(serde_json::Value::Null)
    }
}
