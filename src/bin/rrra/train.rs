//! `rrra train`: fine-tune a bi-encoder with mined hard negatives (the CPU reference path, or
//! the encoder's step on a GPU with `--device cuda[:N]`).

use crate::device_arg::{check_gpu_math, Device};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use rrra::device::train_step::GpuTrainStep;
use rrra::train::collective::Collective;
use rrra::train::config::{DataSource, EvalSpec, NegativePool, TrainConfig};
use rrra::train::encoder_grad::ActivationMode;
use rrra::train::sampler::SamplerKind;
use rrra::train::trainer::{TrainEvent, Trainer};
use rrra::{Error, Result};
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Args)]
pub struct TrainArgs {
    /// Model folder to start from (Hugging Face / sentence-transformers layout).
    #[arg(long, value_name = "DIR", required_unless_present = "resume")]
    pub model: Option<PathBuf>,
    /// BEIR folder to train on (corpus.jsonl, queries.jsonl, qrels/<split>.tsv).
    #[arg(long, value_name = "DIR", conflicts_with = "train_jsonl")]
    pub beir: Option<PathBuf>,
    /// Qrels split of --beir to train on.
    #[arg(long, default_value = "train", value_name = "SPLIT")]
    pub split: String,
    /// Training file in FlagEmbedding ({"query","pos","neg"}) or Tevatron JSON-lines format.
    #[arg(long = "train-jsonl", value_name = "FILE")]
    pub train_jsonl: Option<PathBuf>,
    /// Run folder: model/ checkpoint, training_state.safetensors, train_log.jsonl.
    #[arg(long, value_name = "DIR", required_unless_present = "resume")]
    pub out: Option<PathBuf>,
    /// Continue the run in this folder from its last checkpoint (with its own configuration).
    #[arg(long, value_name = "DIR")]
    pub resume: Option<PathBuf>,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    #[arg(long, default_value_t = 1)]
    pub epochs: u32,
    /// Stop after this many optimizer steps.
    #[arg(long, value_name = "N")]
    pub max_steps: Option<u64>,
    /// Queries per batch (each with one positive and its negatives).
    #[arg(long, default_value_t = 16, value_name = "N")]
    pub batch_size: usize,
    /// Batches per optimizer step.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub grad_accum: usize,
    #[arg(long, default_value_t = 2e-5, allow_negative_numbers = true)]
    pub lr: f32,
    /// Share of steps spent warming the learning rate up.
    #[arg(long, default_value_t = 0.1)]
    pub warmup_ratio: f32,
    #[arg(long, default_value_t = 0.01)]
    pub weight_decay: f32,
    /// Global gradient-norm clip (0: off).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f32,
    /// InfoNCE temperature [default: 0.05 for normalised embeddings, else 1].
    #[arg(long)]
    pub tau: Option<f32>,
    #[arg(long, default_value_t = 64, value_name = "N")]
    pub query_max_length: usize,
    #[arg(long, default_value_t = 256, value_name = "N")]
    pub doc_max_length: usize,
    /// Hard negatives per query (signed so that a negative value gets a clear error).
    #[arg(
        long,
        default_value_t = 7,
        allow_negative_numbers = true,
        value_name = "N"
    )]
    pub hard_negatives: i64,
    /// Random corpus negatives per query.
    #[arg(
        long,
        default_value_t = 0,
        allow_negative_numbers = true,
        value_name = "N"
    )]
    pub random_negatives: i64,
    /// Negative sampler: uniform, simans, trisampler or rrra, optionally with knobs
    /// (e.g. simans:a=0.5,b=0, uniform:range_min=10,range_max=100, rrra:gamma=2,t_h=1,soft=false).
    /// rrra needs --adapter.
    #[arg(long, default_value = "simans", value_name = "SPEC")]
    pub sampler: String,
    /// Draw negatives from the mined top-K (mined) or from the file's own negatives (given).
    #[arg(long, default_value = "mined", value_name = "POOL")]
    pub negative_pool: String,
    /// K of hard-negative mining.
    #[arg(
        long,
        default_value_t = 200,
        allow_negative_numbers = true,
        value_name = "K"
    )]
    pub mine_top_k: i64,
    /// Keep mined documents whose id equals the query id (by default they are dropped, for
    /// corpora that contain their queries).
    #[arg(long)]
    pub keep_same_id: bool,
    /// Re-mine every N optimizer steps [default: at the start of every epoch].
    #[arg(long, value_name = "N")]
    pub mine_every: Option<u64>,
    /// Disable dropout (deterministic forward).
    #[arg(long)]
    pub no_dropout: bool,
    /// Where the encoder trains: cpu, or a CUDA device (cuda is cuda:0), which runs the
    /// encoder's training forward (with the CPU's dropout masks) and backward, its AdamW step
    /// (weights, gradients and moments stay on the device), the fused InfoNCE, the encodes and
    /// searches of mining and evaluation (f32) and the RRRA joint adapter's forward and
    /// backward; the samplers and the adapter's loss and optimizer stay on the CPU.
    #[arg(long, default_value = "cpu", value_name = "cpu|cuda[:N]")]
    pub device: Device,
    /// The encoder's arithmetic with --device cuda: f32 (the CPU's, up to summation order),
    /// tf32 (products on the tensor cores, f32 activations), or bf16: mixed precision as bf16
    /// autocast runs it (bf16 activations and working weights, f32 master weights, gradients
    /// and accumulation; attention forward and backward on the tensor cores; head dims 32, 64
    /// and 128, other head dims keep f32 activations).
    #[arg(long, default_value = "f32", value_name = "f32|tf32|bf16")]
    pub gpu_math: rrra::device::GemmMath,
    /// Data-parallel training over NCCL: this process is rank R of --nccl-world processes,
    /// one per GPU (--device cuda:N names this one's). Each rank takes its share of every batch;
    /// rank 0 writes the log and checkpoints.
    #[cfg(feature = "nccl")]
    #[arg(long, value_name = "R", requires_all = ["device", "nccl_world", "nccl_id"])]
    pub nccl_rank: Option<usize>,
    /// Number of ranks of a data-parallel run.
    #[cfg(feature = "nccl")]
    #[arg(long, value_name = "N", requires = "nccl_rank")]
    pub nccl_world: Option<usize>,
    /// File through which rank 0 hands the NCCL unique id to the others; fresh for each
    /// launch (the ranks wait up to 10 minutes for it).
    #[cfg(feature = "nccl")]
    #[arg(long, value_name = "FILE", requires = "nccl_rank")]
    pub nccl_id: Option<PathBuf>,
    /// Recompute each layer's activations in backward instead of keeping them (less memory).
    #[arg(long)]
    pub recompute: bool,
    /// Save a checkpoint every N optimizer steps [default: every epoch] (always at the end).
    #[arg(long, value_name = "N")]
    pub checkpoint_every: Option<u64>,
    /// BEIR folder to evaluate on while training (with --eval-split).
    #[arg(long, value_name = "DIR")]
    pub eval_beir: Option<PathBuf>,
    #[arg(long, default_value = "dev", value_name = "SPLIT")]
    pub eval_split: String,
    /// Evaluate every N optimizer steps [default: every epoch] (always at the end).
    #[arg(long, value_name = "N")]
    pub eval_every: Option<u64>,
    /// The RRRA sampler's starting adapter: an `adapter.safetensors` from `rrra adapter` (or
    /// the folder holding it). It keeps training jointly with the encoder.
    #[arg(long, value_name = "PATH")]
    pub adapter: Option<PathBuf>,
    /// lambda of the joint loss L_c + lambda·L_adapter (rrra sampler).
    #[arg(long, default_value_t = 0.1)]
    pub adapter_loss_weight: f64,
    /// Peak learning rate of the adapter in joint training (rrra sampler).
    #[arg(long, default_value_t = 1e-3)]
    pub adapter_lr: f32,
    /// Stop (as if killed) after this many optimizer steps of this invocation; the run stays
    /// resumable. For staged runs.
    #[arg(long, value_name = "N", hide = true)]
    pub stop_after: Option<u64>,
}

fn non_negative(name: &str, v: i64) -> Result<usize> {
    usize::try_from(v)
        .map_err(|_| Error::InvalidArgument(format!("--{name} must be 0 or more, got {v}")))
}

impl TrainArgs {
    fn config(&self) -> Result<TrainConfig> {
        let data = match (&self.beir, &self.train_jsonl) {
            (Some(dir), None) => DataSource::Beir {
                dir: dir.clone(),
                split: self.split.clone(),
            },
            (None, Some(path)) => DataSource::Jsonl { path: path.clone() },
            _ => {
                return Err(Error::InvalidArgument(
                    "give the training data with --beir DIR or --train-jsonl FILE".into(),
                ))
            }
        };
        let model = self.model.clone().unwrap_or_default();
        let out = self.out.clone().unwrap_or_default();
        let mut c = TrainConfig::new(model, data, out);
        c.seed = self.seed;
        c.epochs = self.epochs;
        c.max_steps = self.max_steps;
        c.batch_size = self.batch_size;
        c.grad_accum = self.grad_accum;
        c.lr = self.lr;
        c.warmup_ratio = self.warmup_ratio;
        c.adamw.weight_decay = self.weight_decay;
        c.max_grad_norm = self.max_grad_norm;
        c.tau = self.tau;
        c.query_max_length = self.query_max_length;
        c.doc_max_length = self.doc_max_length;
        c.hard_negatives = non_negative("hard-negatives", self.hard_negatives)?;
        c.random_negatives = non_negative("random-negatives", self.random_negatives)?;
        c.sampler = SamplerKind::parse(&self.sampler)?;
        c.negative_pool = match self.negative_pool.as_str() {
            "mined" => NegativePool::Mined,
            "given" => NegativePool::Given,
            other => {
                return Err(Error::InvalidArgument(format!(
                    "unknown negative pool `{other}` (valid: mined, given)"
                )))
            }
        };
        c.mine_top_k = non_negative("mine-top-k", self.mine_top_k)?;
        c.mine_every = self.mine_every;
        c.exclude_same_id = !self.keep_same_id;
        c.dropout = !self.no_dropout;
        c.activations = if self.recompute {
            ActivationMode::Recompute
        } else {
            ActivationMode::Keep
        };
        c.checkpoint_every = self.checkpoint_every;
        c.adapter.init = self.adapter.clone();
        c.adapter.loss_weight = self.adapter_loss_weight;
        c.adapter.lr = self.adapter_lr;
        c.eval = self.eval_beir.as_ref().map(|dir| EvalSpec {
            dir: dir.clone(),
            split: self.eval_split.clone(),
            every: self.eval_every,
        });
        c.validate()?;
        Ok(c)
    }
}

/// The data-parallel group this process joins, if any: NCCL on a stream of `gpu`.
#[cfg(feature = "nccl")]
fn collective(
    a: &TrainArgs,
    gpu: Option<&rrra::device::Gpu>,
) -> Result<Option<Arc<dyn Collective>>> {
    let (Some(rank), Some(world), Some(id)) = (a.nccl_rank, a.nccl_world, a.nccl_id.as_ref())
    else {
        return Ok(None);
    };
    let Some(gpu) = gpu else {
        return Err(Error::InvalidArgument(format!(
            "--nccl-rank {rank} needs this rank's GPU: pass --device cuda:N, not --device {}",
            a.device
        )));
    };
    let timeout = std::time::Duration::from_secs(600);
    let stream = gpu.new_stream()?;
    let comm = rrra::train::collective::nccl::Nccl::join(stream, rank, world, id, timeout)?;
    eprintln!("rank {rank} of {world} (NCCL)");
    Ok(Some(Arc::new(comm)))
}

#[cfg(not(feature = "nccl"))]
fn collective(_: &TrainArgs, _: Option<&rrra::device::Gpu>) -> Result<Option<Arc<dyn Collective>>> {
    Ok(None)
}

pub fn run(a: TrainArgs) -> Result<()> {
    check_gpu_math(a.device, a.gpu_math)?;
    let gpu = a
        .device
        .cuda_ordinal()
        .map(rrra::device::Gpu::open)
        .transpose()?;
    let comm = collective(&a, gpu.as_ref())?;
    let mut trainer = match (&a.resume, comm) {
        (Some(dir), comm) => {
            let t = match comm {
                Some(c) => Trainer::resume_rank(dir, c)?,
                None => Trainer::resume(dir)?,
            };
            eprintln!("resuming {} at step {}", dir.display(), t.step());
            t
        }
        (None, Some(c)) => Trainer::new_rank(a.config()?, c)?,
        (None, None) => Trainer::new(a.config()?)?,
    };
    if let Some(gpu) = &gpu {
        let (sequences, tokens) = trainer.batch_capacity();
        let enc = trainer.encoder();
        let (bert, pooling, normalize) = (enc.bert(), enc.pooling(), enc.normalize());
        let adamw = trainer.config().adamw;
        // data parallel too: the ranks' gradients are summed on the GPUs (NCCL)
        let mut dev = GpuTrainStep::new(gpu, bert, pooling, normalize, adamw, tokens, sequences)?;
        dev.set_gemm_math(a.gpu_math)?;
        trainer.offload_encoder(Box::new(dev))?;
        eprintln!(
            "encoder forward, backward and AdamW ({} products) on {}",
            a.gpu_math,
            gpu.info()
        );
    }
    let cfg = trainer.config().clone();
    let total = trainer.total_steps()?;
    let set = trainer.train_set();
    eprintln!(
        "training {} on {} queries ({} pairs, {} documents): {} steps, batch {}, {} hard negatives ({}), {} random, lr {}, tau {}",
        cfg.model.display(),
        set.queries.len(),
        set.num_pairs(),
        set.corpus.len(),
        total,
        cfg.batch_size,
        cfg.hard_negatives,
        cfg.sampler,
        cfg.random_negatives,
        cfg.lr,
        cfg.tau.map(|t| t.to_string()).unwrap_or_else(|| "auto".into()),
    );
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:25}] {pos}/{len} elapsed {elapsed} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_position(trainer.step());
    // println on a hidden bar (output not a terminal) prints nothing: fall back to stderr.
    let say = |m: String| {
        if bar.is_hidden() {
            eprintln!("{m}");
        } else {
            bar.println(m);
        }
    };
    let mut on = |ev: TrainEvent| match ev {
        TrainEvent::Message(m) => say(m),
        TrainEvent::Step(r) => {
            bar.set_position(r.step);
            bar.set_message(format!(
                "loss {:.4} lr {:.2e} {:.2} ex/s",
                r.loss, r.lr, r.examples_per_s
            ));
            if !bar.is_hidden() {
                return;
            }
            // Not a terminal (a log file): one line per step instead of a bar.
            eprintln!(
                "step {}/{} epoch {} loss {:.4} acc {:.3} lr {:.3e} |g| {:.3} {:.2} ex/s eta {:.0} s",
                r.step, r.total_steps, r.epoch, r.loss, r.accuracy, r.lr, r.grad_norm, r.examples_per_s, r.eta_s
            );
        }
        TrainEvent::Mined(stats) => say(stats.to_string()),
        TrainEvent::Evaluated { step, metrics } => {
            let get = |k: &str| metrics[k].as_f64().unwrap_or(f64::NAN);
            say(format!(
                "eval at step {step}: nDCG@10 {:.4}  MRR@10 {:.4}  R@100 {:.4}",
                get("ndcg@10"),
                get("mrr@10"),
                get("recall@100")
            ))
        }
        TrainEvent::Checkpoint { step, dir } => {
            say(format!("checkpoint at step {step}: {}", dir.display()))
        }
    };
    trainer.run(a.stop_after, &mut on)?;
    bar.finish_and_clear();
    eprintln!(
        "done: step {} of {}; model in {}, log in {}",
        trainer.step(),
        total,
        trainer.paths().model.display(),
        trainer.paths().log.display()
    );
    Ok(())
}
