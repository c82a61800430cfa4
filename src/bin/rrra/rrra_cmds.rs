//! The RRRA commands: `adapter` (stage 2 on a frozen encoder), `rerank` (a TREC run through the
//! adapter) and `experiment` (the comparison table).

use crate::device_arg::{check_gpu_math, cuda_precision, parse_precision, Device};
use clap::Args;
use rrra::adapter::calibrate::FnScorer;
use rrra::adapter::file::AdapterFile;
use rrra::data::beir::read_queries;
use rrra::data::trec::{read_run, write_run};
use rrra::device::encoder::Precision;
use rrra::error::{Error, Result};
use rrra::experiment::assess::{assess, encode_sets, AssessConfig};
use rrra::experiment::{prepare, ExperimentConfig, Method};
use rrra::index::store::Store;
use rrra::model::Encoder;
use rrra::pipeline::{self, GpuOptions};
use std::path::PathBuf;

/// Knobs of stage 2 shared by `adapter` and `experiment`.
#[derive(Args, Clone)]
pub struct AdapterKnobs {
    /// Adapter training epochs over the training queries.
    #[arg(long, default_value_t = 5)]
    pub adapter_epochs: usize,
    /// Adapter learning rate (Adam).
    #[arg(long, default_value_t = 1e-3)]
    pub adapter_train_lr: f32,
    /// Hidden width of the adapter MLP [default: the embedding dimension].
    #[arg(long)]
    pub adapter_hidden: Option<usize>,
    /// Retriever cut-off r of the TP/FN/FP/TN classes.
    #[arg(long, default_value_t = 10)]
    pub rank_cutoff: usize,
    /// Weight mu of the linear-normalisation loss.
    #[arg(long, default_value_t = 0.1)]
    pub mu: f64,
    /// Class-imbalance weights of the adapter's BCE: classes (TP/FN/FP/TN each an equal share),
    /// target (positives and negatives each half), or none.
    #[arg(long, default_value = "classes")]
    pub class_weights: String,
    /// k-fold cross-fitting of the training queries' false-negative scores (0 = off).
    #[arg(long, default_value_t = 0)]
    pub cross_fit_folds: usize,
    /// Also train a positive-aware adapter (reads the mean of the query's labelled positives)
    /// and report its false-negative detection; the rerank keeps the plain adapter.
    #[arg(long)]
    pub positive_aware: bool,
    /// False-negative score: combined (retriever score + adapter logit, fitted), adapter-only,
    /// or score-plus-log-p (s/tau + log p, intercept fitted).
    #[arg(long, default_value = "combined")]
    pub fn_scorer: String,
    /// Documents reranked per query.
    #[arg(long, default_value_t = 100)]
    pub rerank_k: usize,
    /// K of the mined pool the adapter trains on.
    #[arg(long, default_value_t = 200)]
    pub adapter_top_k: usize,
    /// Max tokens per text when encoding for the adapter and evaluation.
    #[arg(long, default_value_t = 256)]
    pub eval_max_length: usize,
}

impl AdapterKnobs {
    /// The stage-2 configuration: the encodes and the adapter's training on `device`.
    fn config(&self, device: Device) -> Result<AssessConfig> {
        let mut c = AssessConfig::default();
        c.adapter.epochs = self.adapter_epochs;
        c.adapter.lr = self.adapter_train_lr;
        c.adapter.hidden = self.adapter_hidden;
        c.adapter.rank_cutoff = self.rank_cutoff;
        c.adapter.mu = self.mu;
        c.adapter.class_weights = self.class_weights.parse()?;
        c.adapter.cross_fit_folds = self.cross_fit_folds;
        c.positive_aware = self.positive_aware;
        c.adapter.validate()?;
        c.fn_scorer = self.fn_scorer.parse::<FnScorer>()?;
        c.rerank_k = self.rerank_k;
        c.mine_top_k = self.adapter_top_k;
        c.max_length = self.eval_max_length;
        c.adapter_gpu = device.cuda_ordinal();
        c.encode_gpu = device.cuda_ordinal();
        Ok(c)
    }
}

#[derive(Args)]
pub struct AdapterArgs {
    /// The (frozen) encoder's model folder.
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// BEIR folder with the training and test qrels.
    #[arg(long, value_name = "DIR")]
    pub beir: PathBuf,
    #[arg(long, default_value = "train")]
    pub split: String,
    #[arg(long, default_value = "test")]
    pub test_split: String,
    /// Share of the training queries held out to choose lambda_rr.
    #[arg(long, default_value_t = 0.2)]
    pub dev_fraction: f64,
    /// Output folder: adapter.safetensors, assessment.json and the prepared split.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Where the encodes and the adapter's training run: cpu, or a CUDA device (cuda is
    /// cuda:0) for the encodes (f32) and the adapter's forward and backward; the losses and the
    /// optimizer stay on the CPU. Cross-fitted and positive-aware adapters train on the CPU.
    #[arg(long, default_value = "cpu", value_name = "cpu|cuda[:N]")]
    pub device: Device,
    #[command(flatten)]
    pub knobs: AdapterKnobs,
}

pub fn adapter(a: AdapterArgs) -> Result<()> {
    let cfg = a.knobs.config(a.device)?;
    let data = prepare::prepare(
        &a.beir,
        &a.out.join("data"),
        &a.split,
        &a.test_split,
        a.dev_fraction,
        0.0,
    )?;
    let path = a.out.join(rrra::adapter::file::FILE_NAME);
    let mut say = |m: String| eprintln!("{m}");
    let encoded = encode_sets(&a.model, &data, &cfg, &mut say)?;
    let r = assess(&encoded, &a.model, &data, &cfg, a.seed, &path, &mut say)?;
    let json = serde_json::json!({"config": cfg, "data": data.summary, "assessment": r});
    let report = a.out.join("assessment.json");
    std::fs::write(
        &report,
        serde_json::to_string_pretty(&json).unwrap_or_default(),
    )
    .map_err(|e| Error::io(&report, e))?;
    let m = |map: &std::collections::BTreeMap<String, f64>, k: &str| {
        map.get(k).copied().unwrap_or(f64::NAN)
    };
    eprintln!(
        "{} test: nDCG@10 {:.4} → {:.4} reranked (lambda_rr {} chosen on {} dev queries); wrote {}",
        a.test_split,
        m(&r.test, "ndcg@10"),
        m(&r.test_reranked, "ndcg@10"),
        r.lambda_rr,
        data.dev.queries.len(),
        path.display()
    );
    Ok(())
}

#[derive(Args)]
pub struct RerankArgs {
    /// The encoder's model folder (the one that built the index).
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// Embedding store of the corpus.
    #[arg(long, value_name = "STORE")]
    pub index: PathBuf,
    #[arg(long, value_name = "FILE")]
    pub queries: PathBuf,
    /// Adapter file (or a folder holding adapter.safetensors).
    #[arg(long, value_name = "PATH")]
    pub adapter: PathBuf,
    /// TREC run to rerank (any retriever).
    #[arg(long, value_name = "FILE")]
    pub run: PathBuf,
    /// Documents reranked per query (the rest are dropped).
    #[arg(long, default_value_t = 100)]
    pub k: usize,
    /// Override the adapter's lambda_rr.
    #[arg(long)]
    pub lambda: Option<f64>,
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Where the queries are encoded and the candidates scored by the adapter: cpu, or a CUDA
    /// device (cuda is cuda:0).
    #[arg(long, default_value = "cpu", value_name = "cpu|cuda[:N]")]
    pub device: Device,
    /// The GPU encoder's arithmetic: bf16 (tensor cores) or f32 [default: bf16; only with
    /// --device cuda].
    #[arg(long, value_name = "bf16|f32", value_parser = parse_precision)]
    pub precision: Option<Precision>,
}

pub fn rerank(a: RerankArgs) -> Result<()> {
    // k = 0 would drop every document and write an empty run: refused, as `search --k 0` is.
    if a.k == 0 {
        return Err(Error::InvalidArgument(
            "--k 0: at least one document per query must be reranked".into(),
        ));
    }
    let gpu = cuda_precision(a.device, a.precision)?.map(|(ordinal, precision)| GpuOptions {
        ordinal,
        precision,
        batch_size: 32,
    });
    let store = Store::open(&a.index)?;
    let encoder = Encoder::load(&a.model, &pipeline::store_encoder_options(&store))?;
    pipeline::check_store_matches(&store, &a.index, &encoder)?;
    let mut adapter = AdapterFile::load(&a.adapter)?;
    adapter.check_dim(encoder.dim(), &a.adapter)?;
    if let Some(l) = a.lambda {
        adapter.lambda_rr = l;
    }
    let queries = read_queries(&a.queries)?;
    let run = read_run(&a.run)?;
    let out = pipeline::rerank_run_on(
        &encoder,
        &store,
        &queries,
        &run,
        &a.run,
        &adapter,
        a.k,
        gpu.as_ref(),
    )?;
    write_run(&a.out, &out, "rrra-rerank")?;
    eprintln!(
        "wrote {} ({} queries reranked, lambda_rr {})",
        a.out.display(),
        out.len(),
        adapter.lambda_rr
    );
    Ok(())
}

#[derive(Args)]
pub struct ExperimentArgs {
    /// BEIR folder (train and test qrels).
    #[arg(long, value_name = "DIR", required_unless_present = "synthetic")]
    pub data: Option<PathBuf>,
    /// Generate the built-in collection (multi-positive queries with hard decoys) into
    /// OUT/collection and run on it.
    #[arg(long, conflicts_with = "data")]
    pub synthetic: bool,
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    #[arg(long, default_value = "train")]
    pub train_split: String,
    #[arg(long, default_value = "test")]
    pub test_split: String,
    #[arg(long, value_delimiter = ',', default_values_t = [1u64, 2, 3])]
    pub seeds: Vec<u64>,
    /// Encoders to compare (pretrained, uniform, simans, trisampler, rrra).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "pretrained,uniform,simans,trisampler,rrra"
    )]
    pub methods: Vec<String>,
    #[arg(long, default_value_t = 0.2)]
    pub dev_fraction: f64,
    #[arg(long, default_value_t = 0.5)]
    pub plant_fraction: f64,
    #[arg(long, default_value_t = 1)]
    pub epochs: u32,
    #[arg(long)]
    pub max_steps: Option<u64>,
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 2e-5)]
    pub lr: f32,
    #[arg(long, default_value_t = 3)]
    pub hard_negatives: usize,
    #[arg(long, default_value_t = 1)]
    pub random_negatives: usize,
    #[arg(long, default_value_t = 128)]
    pub doc_max_length: usize,
    #[arg(long, default_value_t = 64)]
    pub query_max_length: usize,
    /// RRRA sampler: exponent of (1 − s_FN).
    #[arg(long, default_value_t = 2.0)]
    pub gamma: f64,
    /// RRRA sampler: hardness temperature (in units of the InfoNCE logits).
    #[arg(long, default_value_t = 1.0)]
    pub t_h: f64,
    /// RRRA sampler: soft mode (uniform draw, w as loss weights).
    #[arg(long)]
    pub soft: bool,
    /// lambda of the joint loss L_c + lambda·L_adapter.
    #[arg(long, default_value_t = 0.1)]
    pub adapter_loss_weight: f64,
    /// Peak learning rate of the adapter in joint training.
    #[arg(long, default_value_t = 1e-3)]
    pub adapter_lr: f32,
    /// Where every stage runs: cpu, or a CUDA device (cuda is cuda:0) for the evaluation
    /// encodes (f32), the fine-tuning's encoder forward, backward, AdamW, mining and
    /// evaluations, and (unless --adapter-device says otherwise) the stage-2 adapter's forward
    /// and backward, and the stage-3 joint adapter's, and the fine-tuning's InfoNCE. The
    /// samplers and the adapters' losses and optimizers stay on the CPU.
    #[arg(long, default_value = "cpu", value_name = "cpu|cuda[:N]")]
    pub device: Device,
    /// Where the stage-2 adapter's forward and backward run [default: --device].
    #[arg(long, value_name = "cpu|cuda[:N]")]
    pub adapter_device: Option<Device>,
    /// The arithmetic of the fine-tuning's products with --device cuda (f32, tf32, bf16).
    #[arg(long, default_value = "f32", value_name = "f32|tf32|bf16")]
    pub gpu_math: rrra::device::GemmMath,
    #[command(flatten)]
    pub knobs: AdapterKnobs,
}

impl ExperimentArgs {
    pub fn config(&self) -> Result<ExperimentConfig> {
        let data = match &self.data {
            Some(d) => d.clone(),
            None => self.out.join("collection"),
        };
        let mut c = ExperimentConfig::new(data, self.model.clone(), self.out.clone());
        c.train_split = self.train_split.clone();
        c.test_split = self.test_split.clone();
        c.seeds = self.seeds.clone();
        c.methods = self
            .methods
            .iter()
            .map(|m| m.parse::<Method>())
            .collect::<Result<_>>()?;
        c.dev_fraction = self.dev_fraction;
        c.plant_fraction = self.plant_fraction;
        c.epochs = self.epochs;
        c.max_steps = self.max_steps;
        c.batch_size = self.batch_size;
        c.lr = self.lr;
        c.hard_negatives = self.hard_negatives;
        c.random_negatives = self.random_negatives;
        c.doc_max_length = self.doc_max_length;
        c.query_max_length = self.query_max_length;
        c.gamma = self.gamma;
        c.t_h = self.t_h;
        c.soft = self.soft;
        c.adapter_loss_weight = self.adapter_loss_weight;
        c.adapter_lr = self.adapter_lr;
        c.assess = self
            .knobs
            .config(self.adapter_device.unwrap_or(self.device))?;
        check_gpu_math(self.device, self.gpu_math)?;
        c.gpu = self.device.cuda_ordinal();
        c.assess.encode_gpu = c.gpu;
        c.gpu_math = self.gpu_math;
        Ok(c)
    }
}

#[derive(Args)]
pub struct MergeArgs {
    /// Output folders of `rrra experiment` runs (each holding results.json).
    #[arg(required = true, value_name = "RUN")]
    pub runs: Vec<PathBuf>,
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
}

pub fn experiment_merge(a: MergeArgs) -> Result<()> {
    rrra::experiment::merge(&a.runs, &a.out, &mut |m| eprintln!("{m}"))?;
    let md = std::fs::read_to_string(a.out.join("results.md"))
        .map_err(|e| Error::io(a.out.join("results.md"), e))?;
    println!("{md}");
    Ok(())
}

pub fn experiment(a: ExperimentArgs) -> Result<()> {
    let cfg = a.config()?;
    if a.synthetic {
        let spec = rrra::data::synthetic::SyntheticSpec::default();
        let s = rrra::data::synthetic::write_collection(&cfg.data, &spec)?;
        eprintln!(
            "generated {}: {} documents, {} train / {} test queries ({} / {} relevant pairs)",
            cfg.data.display(),
            s.documents,
            s.train_queries,
            s.test_queries,
            s.train_pairs,
            s.test_pairs
        );
    }
    let started = std::time::Instant::now();
    rrra::experiment::run(&cfg, &mut |m| {
        eprintln!("[{:>6.0}s] {m}", started.elapsed().as_secs_f64())
    })?;
    let md = std::fs::read_to_string(cfg.out.join("results.md"))
        .map_err(|e| Error::io(cfg.out.join("results.md"), e))?;
    println!("{md}");
    Ok(())
}
