//! The comparison experiment of the method notes (section 7), as one call: on one BEIR
//! collection, for each seed, the pretrained encoder and encoders fine-tuned with uniform,
//! SimANS, TriSampler and RRRA hard negatives (same budget), each assessed with and without the
//! adapter's rerank, plus the adapter's detection of planted false negatives. Writes
//! `results.json` (every knob, every number, the wall time of each stage), `results.md` (the
//! table, mean ± std over seeds) and PNG plots (training loss curves; s_FN of planted false
//! negatives against the other candidates).

pub mod assess;
pub mod prepare;
pub mod report;

use crate::error::{Error, Result};
use crate::train::config::{DataSource, TrainConfig};
use crate::train::sampler::SamplerKind;
use crate::train::trainer::{MiningSnapshot, TrainEvent, Trainer};
use assess::{assess, encode_sets, AssessConfig, Assessment, EncodedSets};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// An encoder of the comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    Pretrained,
    Uniform,
    SimAns,
    TriSampler,
    Rrra,
}

impl Method {
    pub const ALL: [Method; 5] = [
        Method::Pretrained,
        Method::Uniform,
        Method::SimAns,
        Method::TriSampler,
        Method::Rrra,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Method::Pretrained => "pretrained",
            Method::Uniform => "uniform",
            Method::SimAns => "simans",
            Method::TriSampler => "trisampler",
            Method::Rrra => "rrra",
        }
    }

    /// Table labels without and with the adapter's rerank.
    pub fn labels(self) -> (&'static str, &'static str) {
        match self {
            Method::Pretrained => (
                "pretrained encoder",
                "RRRA rerank only (pretrained + rerank)",
            ),
            Method::Uniform => ("uniform hard negatives", "uniform + rerank"),
            Method::SimAns => ("SimANS", "SimANS + rerank"),
            Method::TriSampler => ("TriSampler", "TriSampler + rerank"),
            Method::Rrra => ("RRRA resample only", "RRRA full (resample + rerank)"),
        }
    }

    fn sampler(self, cfg: &ExperimentConfig) -> Option<SamplerKind> {
        match self {
            Method::Pretrained => None,
            Method::Uniform => Some(SamplerKind::Uniform {
                range_min: 0,
                range_max: None,
            }),
            Method::SimAns => Some(SamplerKind::SimAns { a: 0.5, b: 0.0 }),
            Method::TriSampler => Some(SamplerKind::TriSampler {
                max_angle_deg: 60.0,
                require_closer_to_positive: true,
            }),
            Method::Rrra => Some(SamplerKind::Rrra {
                gamma: cfg.gamma,
                t_h: cfg.t_h,
                soft: cfg.soft,
            }),
        }
    }
}

impl std::str::FromStr for Method {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Method::ALL
            .into_iter()
            .find(|m| m.name() == s.to_ascii_lowercase())
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "unknown method `{s}` (valid: pretrained, uniform, simans, trisampler, rrra)"
                ))
            })
    }
}

/// Every knob of the experiment.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ExperimentConfig {
    pub data: PathBuf,
    pub model: PathBuf,
    pub out: PathBuf,
    pub train_split: String,
    pub test_split: String,
    pub dev_fraction: f64,
    pub plant_fraction: f64,
    pub seeds: Vec<u64>,
    pub methods: Vec<Method>,
    /// Fine-tuning budget, the same for every method.
    pub epochs: u32,
    pub max_steps: Option<u64>,
    pub batch_size: usize,
    pub lr: f32,
    pub hard_negatives: usize,
    pub random_negatives: usize,
    pub query_max_length: usize,
    pub doc_max_length: usize,
    pub mine_top_k: usize,
    /// RRRA sampler knobs.
    pub gamma: f64,
    pub t_h: f64,
    pub soft: bool,
    pub adapter_loss_weight: f64,
    pub adapter_lr: f32,
    pub assess: AssessConfig,
    /// Fine-tune on this GPU (encoder forward, backward, AdamW, and the mining's encodes and
    /// search; the loss, samplers and the joint adapter stay on the CPU); `None`: all on the CPU.
    #[serde(default)]
    pub gpu: Option<usize>,
    /// The arithmetic of the GPU fine-tuning's products.
    #[serde(default)]
    pub gpu_math: crate::device::GemmMath,
}

impl ExperimentConfig {
    /// The defaults: every method, 3 seeds, one epoch of batch 16 with 3 hard negatives and 1
    /// random negative per query, documents cut to 128 tokens in training.
    pub fn new(data: PathBuf, model: PathBuf, out: PathBuf) -> Self {
        ExperimentConfig {
            data,
            model,
            out,
            train_split: "train".into(),
            test_split: "test".into(),
            dev_fraction: 0.2,
            plant_fraction: 0.5,
            seeds: vec![1, 2, 3],
            methods: Method::ALL.to_vec(),
            epochs: 1,
            max_steps: None,
            batch_size: 16,
            lr: 2e-5,
            hard_negatives: 3,
            random_negatives: 1,
            query_max_length: 64,
            doc_max_length: 128,
            mine_top_k: 200,
            gamma: 2.0,
            t_h: 1.0,
            soft: false,
            adapter_loss_weight: 0.1,
            adapter_lr: 1e-3,
            assess: AssessConfig::default(),
            gpu: None,
            gpu_math: crate::device::GemmMath::F32,
        }
    }
}

/// One (method, seed) result.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Trial {
    pub method: Method,
    pub seed: u64,
    pub assessment: Assessment,
    /// Wall seconds of fine-tuning (0 for the pretrained encoder).
    pub train_s: f64,
    /// (step, loss) of fine-tuning.
    pub losses: Vec<(u64, f64)>,
}

/// Runs the experiment, writing into `cfg.out` as it goes; `say` gets progress lines.
pub fn run(cfg: &ExperimentConfig, say: &mut dyn FnMut(String)) -> Result<Vec<Trial>> {
    if cfg.seeds.is_empty() || cfg.methods.is_empty() {
        return Err(Error::InvalidArgument(
            "the experiment needs at least one seed and one method".into(),
        ));
    }
    // a missing device fails now, not after the first stages
    let devices = [cfg.gpu, cfg.assess.adapter_gpu, cfg.assess.encode_gpu];
    for ordinal in devices.into_iter().flatten() {
        let gpu = crate::device::Gpu::open(ordinal)?;
        say(format!("training on {}", gpu.info()));
    }
    let started = Instant::now();
    std::fs::create_dir_all(&cfg.out).map_err(|e| Error::io(&cfg.out, e))?;
    let data = prepare::prepare(
        &cfg.data,
        &cfg.out.join("data"),
        &cfg.train_split,
        &cfg.test_split,
        cfg.dev_fraction,
        cfg.plant_fraction,
    )?;
    say(format!("data: {}", data.summary));
    let mut trials: Vec<Trial> = Vec::new();
    // Every fine-tuning starts from the same encoder on the same data, so the first mining's
    // embeddings and the pretrained encoder's assessment embeddings are computed once.
    let mut first_mining: Option<MiningSnapshot> = None;
    let mut base_encoded: Option<EncodedSets> = None;
    for &seed in &cfg.seeds {
        // The pretrained encoder's adapter starts RRRA's stage 3, so it comes first.
        let base_dir = cfg.out.join(format!("seed{seed}/pretrained"));
        std::fs::create_dir_all(&base_dir).map_err(|e| Error::io(&base_dir, e))?;
        let base_adapter = base_dir.join(crate::adapter::file::FILE_NAME);
        let needs_base = cfg
            .methods
            .iter()
            .any(|m| matches!(m, Method::Pretrained | Method::Rrra));
        if needs_base {
            say(format!("seed {seed}: assessing the pretrained encoder"));
            let fresh = base_encoded.is_none();
            if fresh {
                base_encoded = Some(encode_sets(&cfg.model, &data, &cfg.assess, say)?);
            }
            let encoded = base_encoded.as_ref().ok_or_else(|| {
                Error::InvalidArgument("the pretrained encoder's embeddings are missing".into())
            })?;
            let mut a = assess(
                encoded,
                &cfg.model,
                &data,
                &cfg.assess,
                seed,
                &base_adapter,
                say,
            )?;
            if !fresh {
                a.seconds.insert("encode".into(), 0.0); // reused from the first seed
            }
            if cfg.methods.contains(&Method::Pretrained) {
                trials.push(Trial {
                    method: Method::Pretrained,
                    seed,
                    assessment: a,
                    train_s: 0.0,
                    losses: Vec::new(),
                });
            }
        }
        for &m in cfg.methods.iter().filter(|&&m| m != Method::Pretrained) {
            let run_dir = cfg.out.join(format!("seed{seed}/{}", m.name()));
            say(format!("seed {seed}: fine-tuning with {}", m.name()));
            let clock = Instant::now();
            let losses = fine_tune(
                cfg,
                &data,
                m,
                seed,
                &run_dir,
                &base_adapter,
                &mut first_mining,
                say,
            )?;
            let train_s = clock.elapsed().as_secs_f64();
            let model_dir = run_dir.join("model");
            say(format!("seed {seed}: assessing {}", m.name()));
            let encoded = encode_sets(&model_dir, &data, &cfg.assess, say)?;
            let a = assess(
                &encoded,
                &model_dir,
                &data,
                &cfg.assess,
                seed,
                &model_dir.join("rerank_adapter.safetensors"),
                say,
            )?;
            trials.push(Trial {
                method: m,
                seed,
                assessment: a,
                train_s,
                losses,
            });
            report::write(cfg, &data.summary, &trials, started.elapsed().as_secs_f64())?;
        }
        report::write(cfg, &data.summary, &trials, started.elapsed().as_secs_f64())?;
    }
    Ok(trials)
}

/// What `results.json` holds.
#[derive(serde::Deserialize)]
struct SavedRun {
    config: ExperimentConfig,
    data: serde_json::Value,
    wall_s: f64,
    trials: Vec<Trial>,
}

/// Merges runs of one experiment made separately (other seeds or methods, same data, encoder
/// and knobs) into one report in `out`: `results.json`, `results.md` and the loss plot, with
/// mean ± std over every seed. A (method, seed) present in several runs is taken from the
/// first; runs whose knobs differ are refused. Returns the merged trials.
pub fn merge(runs: &[PathBuf], out: &Path, say: &mut dyn FnMut(String)) -> Result<Vec<Trial>> {
    let mut merged: Option<(ExperimentConfig, serde_json::Value)> = None;
    let (mut trials, mut wall_s): (Vec<Trial>, f64) = (Vec::new(), 0.0);
    for dir in runs {
        let path = dir.join("results.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let run: SavedRun = serde_json::from_str(&text)
            .map_err(|e| Error::format(&path, format!("line {}: {e}", e.line())))?;
        // The knobs that must agree: everything but the seeds, the methods and the folder.
        let knobs = |c: &ExperimentConfig| ExperimentConfig {
            seeds: Vec::new(),
            methods: Vec::new(),
            out: PathBuf::new(),
            ..c.clone()
        };
        match &mut merged {
            None => merged = Some((run.config.clone(), run.data.clone())),
            Some((cfg, data)) => {
                if knobs(cfg) != knobs(&run.config) || *data != run.data {
                    return Err(Error::mismatch(
                        &path,
                        "this run's data, encoder or knobs differ from the first run's",
                    ));
                }
                cfg.seeds.extend(&run.config.seeds);
                cfg.methods.extend(&run.config.methods);
            }
        }
        wall_s += run.wall_s;
        for t in run.trials {
            if trials
                .iter()
                .any(|u| u.method == t.method && u.seed == t.seed)
            {
                say(format!(
                    "{} seed {} is also in an earlier run; {} not taken",
                    t.method.name(),
                    t.seed,
                    path.display()
                ));
            } else {
                trials.push(t);
            }
        }
    }
    let (mut cfg, data) =
        merged.ok_or_else(|| Error::InvalidArgument("no runs to merge".into()))?;
    cfg.seeds.sort_unstable();
    cfg.seeds.dedup();
    cfg.methods = Method::ALL
        .into_iter()
        .filter(|m| cfg.methods.contains(m))
        .collect();
    cfg.out = out.to_path_buf();
    trials.sort_by_key(|t| (t.seed, Method::ALL.iter().position(|&m| m == t.method)));
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    report::write(&cfg, &data, &trials, wall_s)?;
    Ok(trials)
}

/// Fine-tunes the base model with method `m`; returns (step, loss) of every step.
/// `first_mining` carries the base encoder's mining embeddings from one run to the next.
#[allow(clippy::too_many_arguments)]
fn fine_tune(
    cfg: &ExperimentConfig,
    data: &prepare::Prepared,
    m: Method,
    seed: u64,
    run_dir: &Path,
    base_adapter: &Path,
    first_mining: &mut Option<MiningSnapshot>,
    say: &mut dyn FnMut(String),
) -> Result<Vec<(u64, f64)>> {
    if run_dir.exists() {
        std::fs::remove_dir_all(run_dir).map_err(|e| Error::io(run_dir, e))?;
    }
    let mut tc = TrainConfig::new(
        cfg.model.clone(),
        DataSource::Beir {
            dir: data.dir.clone(),
            split: "fit".into(),
        },
        run_dir.to_path_buf(),
    );
    tc.seed = seed;
    tc.epochs = cfg.epochs;
    tc.max_steps = cfg.max_steps;
    tc.batch_size = cfg.batch_size;
    tc.lr = cfg.lr;
    tc.hard_negatives = cfg.hard_negatives;
    tc.random_negatives = cfg.random_negatives;
    tc.query_max_length = cfg.query_max_length;
    tc.doc_max_length = cfg.doc_max_length;
    tc.mine_top_k = cfg.mine_top_k;
    tc.sampler = m
        .sampler(cfg)
        .ok_or_else(|| Error::InvalidArgument("the pretrained encoder is not fine-tuned".into()))?;
    tc.adapter.init = (m == Method::Rrra).then(|| base_adapter.to_path_buf());
    tc.adapter.loss_weight = cfg.adapter_loss_weight;
    tc.adapter.lr = cfg.adapter_lr;
    let mut trainer = Trainer::new(tc)?;
    if let Some(ordinal) = cfg.gpu {
        let gpu = crate::device::Gpu::open(ordinal)?;
        let (sequences, tokens) = trainer.batch_capacity();
        let enc = trainer.encoder();
        let mut dev = crate::device::train_step::GpuTrainStep::new(
            &gpu,
            enc.bert(),
            enc.pooling(),
            enc.normalize(),
            trainer.config().adamw,
            tokens,
            sequences,
        )?;
        dev.set_gemm_math(cfg.gpu_math)?;
        trainer.offload_encoder(Box::new(dev))?;
    }
    let snap = match first_mining.take() {
        Some(s) => s,
        None => trainer.mining_snapshot()?,
    };
    trainer.reuse_first_snapshot(snap.clone())?;
    *first_mining = Some(snap);
    let mut losses = Vec::new();
    let mut last_print = Instant::now();
    trainer.run(None, &mut |ev| match ev {
        TrainEvent::Step(r) => {
            losses.push((r.step, r.loss));
            if last_print.elapsed().as_secs_f64() > 30.0 || r.step == r.total_steps {
                last_print = Instant::now();
                let fnote = r
                    .fn_mean_drawn
                    .map(|f| format!(", drawn s_FN {f:.3}"))
                    .unwrap_or_default();
                say(format!(
                    "  step {}/{} loss {:.4}{fnote} ({:.1} ex/s)",
                    r.step, r.total_steps, r.loss, r.examples_per_s
                ));
            }
        }
        TrainEvent::Message(msg) => say(format!("  {msg}")),
        _ => {}
    })?;
    Ok(losses)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn trial(method: Method, seed: u64, ndcg: f64) -> Trial {
        let metrics: BTreeMap<String, f64> = [("ndcg@10".to_string(), ndcg)].into();
        let detection = [(
            "s_fn".to_string(),
            crate::eval::fn_detection::Detection {
                auc_per_query: 0.9,
                ..Default::default()
            },
        )]
        .into();
        Trial {
            method,
            seed,
            assessment: Assessment {
                test: metrics.clone(),
                test_reranked: metrics,
                lambda_rr: 1.0,
                lambda_table: vec![(1.0, ndcg)],
                detection,
                classes: [1, 1, 1, 1],
                calibration: Default::default(),
                adapter_epochs: Vec::new(),
                seconds: BTreeMap::new(),
                s_fn_planted: Vec::new(),
                s_fn_others: Vec::new(),
            },
            train_s: 0.0,
            losses: vec![(1, 2.0), (2, 1.5)],
        }
    }

    fn save(dir: &Path, seeds: &[u64], trials: &[Trial], lr: f32) {
        let mut cfg = ExperimentConfig::new("data".into(), "model".into(), dir.to_path_buf());
        cfg.seeds = seeds.to_vec();
        cfg.methods = vec![Method::Pretrained, Method::Uniform];
        cfg.lr = lr;
        std::fs::create_dir_all(dir).unwrap();
        report::write(&cfg, &serde_json::json!({"documents": 3}), trials, 10.0).unwrap();
    }

    /// Two runs of other seeds give one table over both; a (method, seed) in both is taken
    /// once, from the first; a run with other knobs is refused.
    #[test]
    fn merge_pools_seeds_and_refuses_other_knobs() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b, c) = (
            tmp.path().join("a"),
            tmp.path().join("b"),
            tmp.path().join("c"),
        );
        save(
            &a,
            &[1],
            &[
                trial(Method::Pretrained, 1, 0.5),
                trial(Method::Uniform, 1, 0.6),
            ],
            2e-5,
        );
        save(
            &b,
            &[1, 2],
            &[
                trial(Method::Pretrained, 1, 0.9),
                trial(Method::Uniform, 2, 0.7),
            ],
            2e-5,
        );
        let out = tmp.path().join("merged");
        let mut notes = Vec::new();
        let trials = merge(&[a.clone(), b], &out, &mut |m| notes.push(m)).unwrap();
        let got: Vec<(Method, u64, f64)> = trials
            .iter()
            .map(|t| (t.method, t.seed, t.assessment.test["ndcg@10"]))
            .collect();
        assert_eq!(
            got,
            [
                (Method::Pretrained, 1, 0.5),
                (Method::Uniform, 1, 0.6),
                (Method::Uniform, 2, 0.7)
            ]
        );
        assert_eq!(notes.len(), 1, "{notes:?}");
        let md = std::fs::read_to_string(out.join("results.md")).unwrap();
        assert!(md.contains("seeds 1, 2"), "{md}");
        assert!(md.contains("0.6500 ± 0.0707"), "{md}"); // uniform over seeds 1 and 2
        save(&c, &[3], &[trial(Method::Uniform, 3, 0.1)], 1e-4);
        assert!(matches!(
            merge(&[a, c], &out, &mut |_| {}),
            Err(Error::Mismatch { .. })
        ));
    }
}
