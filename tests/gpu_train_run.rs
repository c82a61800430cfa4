//! `rrra train --device cuda` end to end: a few trainer steps (mining refreshes, dropout, gradient
//! accumulation) with the encoder offloaded to the GPU against the same run on the CPU, on the
//! tiny random BERT of the fixtures (dropout set to 0.1) and Cranfield: once with the optimizer
//! on the host (`GpuTrainableEncoder`), once resident on the device (`GpuTrainStep`, what
//! `rrra train --device cuda` uses), a resident run stopped and resumed from its checkpoint, and
//! two data-parallel ranks on threads sharing the GPU, each with its resident optimizer, their
//! gradients summed through the host (`InProcess`), and an RRRA run whose joint adapter trains
//! on the GPU too. Skips without a GPU.
//!
//! Tolerances, and why: the first step starts from the same weights, so its loss differs only
//! by the f32 summation orders of the encoder (~1e-6 relative). Later steps start from weights
//! that AdamW moved with gradients ~1e-5 apart; Adam's normalised update carries that into the
//! weights at about the same relative size, so the losses agree to 1e-4 relative and each
//! trained tensor to 1e-3 in relative L2 norm of its change from the start. Two things would
//! part the runs for reasons these tests do not check, and are kept out:
//! * the pool: the tiny model's scores have near-ties closer than the two encoders' f32 gap,
//!   which the device's mining would rank in another order, changing the drawn negatives. The
//!   offloaded runs mine once, at step 0, from the CPU's embeddings of the starting weights and
//!   with the CPU's search ([`HostSearch`]), so every run draws from the same pool
//!   (tests/gpu_mining.rs holds the device's mining to the CPU's);
//! * the key biases: their gradient is zero in exact arithmetic (softmax cancels it), so
//!   AdamW's normalised step turns each run's round-off into moves of a few hundredths of the
//!   learning rate with signs of their own; they are left out of the weight comparison.

mod common;

use rrra::device::encoder_train::GpuTrainableEncoder;
use rrra::device::train_step::GpuTrainStep;
use rrra::device::Gpu;
use rrra::model::weights::BertWeights;
use rrra::model::{Encoder, EncoderOptions};
use rrra::train::config::{DataSource, TrainConfig};
use rrra::train::encoder_grad::{DropoutPlan, OffloadedEncoder, ResidentOptimizer, TrainBatch};
use rrra::train::trainer::{TrainEvent, Trainer};

fn config(model: &std::path::Path, out: std::path::PathBuf) -> TrainConfig {
    let mut cfg = TrainConfig::new(
        model.to_path_buf(),
        DataSource::Beir {
            dir: common::shared().join("data/cranfield"),
            split: "train".into(),
        },
        out,
    );
    cfg.max_steps = Some(4);
    cfg.batch_size = 8;
    cfg.grad_accum = 2;
    cfg.hard_negatives = 3;
    cfg.random_negatives = 1;
    cfg.doc_max_length = 96;
    // one mining, at step 0 (see the module's notes)
    cfg.mine_every = Some(100);
    cfg.mine_top_k = 50;
    cfg.lr = 1e-3;
    cfg.checkpoint_every = Some(2);
    cfg
}

fn losses(t: &mut Trainer, stop_after: Option<u64>) -> Vec<f64> {
    let mut out = Vec::new();
    t.run(stop_after, &mut |e| {
        if let TrainEvent::Step(r) = e {
            out.push(r.loss);
        }
    })
    .unwrap();
    out
}

/// The offloaded encoder with the trainer's searches left to the CPU: everything else is the
/// device's.
struct HostSearch(Box<dyn OffloadedEncoder>);

impl OffloadedEncoder for HostSearch {
    fn set_weights(&mut self, weights: &BertWeights) -> rrra::Result<()> {
        self.0.set_weights(weights)
    }
    fn forward(&mut self, batch: &TrainBatch, dropout: &DropoutPlan) -> rrra::Result<Vec<f32>> {
        self.0.forward(batch, dropout)
    }
    fn backward(&mut self, d_embeddings: &[f32], grads: &mut BertWeights) -> rrra::Result<()> {
        self.0.backward(d_embeddings, grads)
    }
    fn encode(&mut self, texts: &[rrra::model::tokenizer::Tokens]) -> rrra::Result<Vec<f32>> {
        self.0.encode(texts)
    }
    fn info_nce(
        &mut self,
        input: &rrra::train::loss::InfoNceInput<'_>,
        dq: &mut [f32],
        dd: &mut [f32],
    ) -> Option<rrra::Result<rrra::train::loss::InfoNceStats>> {
        self.0.info_nce(input, dq, dd)
    }
    fn resident(&mut self) -> Option<&mut dyn ResidentOptimizer> {
        self.0.resident()
    }
    fn adapter_op(
        &mut self,
        d: usize,
        h: usize,
        max_queries: usize,
        max_pairs: usize,
    ) -> Option<rrra::Result<Box<dyn rrra::adapter::fit::AdapterOp>>> {
        self.0.adapter_op(d, h, max_queries, max_pairs)
    }
}

/// Hands `t`'s encoder to the GPU, with the optimizer there too when `resident`; a fresh run
/// first takes the CPU's embeddings of its starting weights for its one mining.
fn offload(gpu: &Gpu, t: &mut Trainer, resident: bool) {
    if t.step() == 0 {
        let snap = t.mining_snapshot().unwrap();
        t.reuse_first_snapshot(snap).unwrap();
    }
    let (sequences, tokens) = t.batch_capacity();
    let enc = t.encoder();
    let (bert, pooling, normalize) = (enc.bert(), enc.pooling(), enc.normalize());
    if resident {
        let adamw = t.config().adamw;
        let dev =
            GpuTrainStep::new(gpu, bert, pooling, normalize, adamw, tokens, sequences).unwrap();
        t.offload_encoder(Box::new(HostSearch(Box::new(dev))))
            .unwrap();
    } else {
        let dev =
            GpuTrainableEncoder::new(gpu, bert, pooling, normalize, tokens, sequences).unwrap();
        t.offload_encoder(Box::new(HostSearch(Box::new(dev))))
            .unwrap();
    }
}

/// Step by step, `gpu`'s losses within the tolerances above of `cpu`'s: 1e-5 relative at the
/// first step, 1e-4 after.
fn assert_losses_follow(cpu: &[f64], gpu: &[f64], what: &str) {
    for (i, (c, g)) in cpu.iter().zip(gpu).enumerate() {
        let tol = if i == 0 { 1e-5 } else { 1e-4 };
        assert!(
            (c - g).abs() <= tol * c.abs(),
            "{what}, step {}: cpu {c} vs gpu {g}",
            i + 1
        );
    }
}

/// Whether element `j` of tensor `i` (`BertWeights::tensors` order: 5 embedding tensors, then
/// 12 per layer, the fused QKV bias second) is a key bias.
fn is_key_bias(i: usize, j: usize, len: usize) -> bool {
    i >= 5 && (i - 5) % 12 == 1 && (len / 3..2 * len / 3).contains(&j)
}

/// Each trained tensor of `b` within 1e-3 (relative L2) of `a`'s change from `start`, key
/// biases left out (see the module's notes).
fn assert_close(start: &[&[f32]], a: &[&[f32]], b: &[&[f32]], what: &str) {
    for (i, ((s, c), g)) in start.iter().zip(a).zip(b).enumerate() {
        let sq = |x: &[f32], y: &[f32]| -> f64 {
            (x.iter().zip(y).enumerate())
                .filter(|(j, _)| !is_key_bias(i, *j, x.len()))
                .map(|(_, (p, q))| ((q - p) as f64).powi(2))
                .sum()
        };
        let (moved, apart) = (sq(s, c), sq(c, g));
        assert!(
            apart <= 1e-6 * moved.max(1e-30),
            "{what}, tensor {i}: the runs are {:.2e} apart, the reference moved {:.2e}",
            apart.sqrt(),
            moved.sqrt()
        );
    }
}

#[test]
fn an_offloaded_run_follows_the_cpu_run() {
    let Some(gpu) = common::gpu_or_skip() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let model = common::tiny_bert_with_dropout(dir.path());
    let mut cpu = Trainer::new(config(&model, dir.path().join("cpu"))).unwrap();
    let cpu_losses = losses(&mut cpu, None);
    assert_eq!(cpu_losses.len(), 4);
    let start = Encoder::load(&model, &EncoderOptions::default()).unwrap();
    let s = start.bert().weights.tensors();
    let c = cpu.encoder().bert().weights.tensors();
    for resident in [false, true] {
        let what = if resident {
            "resident"
        } else {
            "host optimizer"
        };
        let mut dev = Trainer::new(config(&model, dir.path().join(what))).unwrap();
        offload(&gpu, &mut dev, resident);
        let gpu_losses = losses(&mut dev, None);
        assert_eq!(gpu_losses.len(), 4);
        assert_losses_follow(&cpu_losses, &gpu_losses, &format!("{what} loss"));
        assert_close(&s, &c, &dev.encoder().bert().weights.tensors(), what);
        // the checkpoint holds the device's weights, not the host's stale copy
        let saved =
            Encoder::load(&dir.path().join(what).join("model"), &Default::default()).unwrap();
        assert_close(&s, &c, &saved.bert().weights.tensors(), "checkpoint");
    }

    // stopped after 2 steps, resumed on a fresh device state: the AdamW moments must come back
    let out = dir.path().join("resumed");
    let mut first = Trainer::new(config(&model, out.clone())).unwrap();
    offload(&gpu, &mut first, true);
    let mut resumed_losses = losses(&mut first, Some(2));
    drop(first);
    let mut again = Trainer::resume(&out).unwrap();
    offload(&gpu, &mut again, true);
    resumed_losses.extend(losses(&mut again, None));
    assert_eq!(resumed_losses.len(), 4);
    for (i, (c, g)) in cpu_losses.iter().zip(&resumed_losses).enumerate() {
        assert!(
            (c - g).abs() <= 1e-4 * c.abs(),
            "resumed, step {}: cpu loss {c} vs gpu {g}",
            i + 1
        );
    }
    assert_close(&s, &c, &again.encoder().bert().weights.tensors(), "resumed");
}

/// RRRA's stage 3 on the GPU: the sampler reads the joint adapter's s_FN and the adapter
/// trains with the encoder, its forward and backward on the device beside the resident step
/// (`GpuTrainStep::adapter_op`). Encoder and adapter losses follow the CPU run within the
/// tolerances above (the adapter's op differs from the CPU by f32 summation order, as the
/// encoder's does), and so do the encoder's weights and the evaluations, which encode and
/// search on the device.
#[test]
fn an_rrra_run_with_its_joint_adapter_on_the_gpu_follows_the_cpu_run() {
    use rrra::adapter::AdapterParams;
    use rrra::train::sampler::SamplerKind;
    let Some(gpu) = common::gpu_or_skip() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let model = common::tiny_bert_with_dropout(dir.path());
    let start = Encoder::load(&model, &EncoderOptions::default()).unwrap();
    let adapter = dir.path().join("stage2.safetensors");
    common::write_adapter(&adapter, AdapterParams::init(start.dim(), 16, 5).unwrap());
    let rrra_config = |out: &str| {
        let mut cfg = config(&model, dir.path().join(out));
        cfg.sampler = SamplerKind::parse("rrra").unwrap();
        cfg.adapter.init = Some(adapter.clone());
        cfg.eval = Some(rrra::train::config::EvalSpec {
            dir: common::shared().join("data/cranfield"),
            split: "test".into(),
            every: Some(2),
        });
        cfg
    };
    // losses per step, and nDCG@10 per evaluation
    let run = |t: &mut Trainer| -> (Vec<(f64, f64)>, Vec<f64>) {
        let (mut out, mut ndcg) = (Vec::new(), Vec::new());
        t.run(None, &mut |e| match e {
            TrainEvent::Step(r) => out.push((r.loss, r.adapter_loss.unwrap_or(f64::NAN))),
            TrainEvent::Evaluated { metrics, .. } => {
                ndcg.push(metrics["ndcg@10"].as_f64().unwrap_or(f64::NAN))
            }
            _ => {}
        })
        .unwrap();
        (out, ndcg)
    };
    let mut cpu = Trainer::new(rrra_config("cpu")).unwrap();
    let (cpu_losses, cpu_ndcg) = run(&mut cpu);
    let mut dev = Trainer::new(rrra_config("gpu")).unwrap();
    offload(&gpu, &mut dev, true);
    let (gpu_losses, gpu_ndcg) = run(&mut dev);
    // evaluations encoded and searched on the GPU: the same rankings up to near-ties (225
    // queries; a swap inside one top 10 moves the mean nDCG@10 by well under 0.005)
    assert_eq!(cpu_ndcg.len(), 2, "evaluations at steps 2 and 4");
    assert_eq!(gpu_ndcg.len(), cpu_ndcg.len());
    for (c, g) in cpu_ndcg.iter().zip(&gpu_ndcg) {
        assert!((c - g).abs() <= 0.01, "nDCG@10: cpu {c} vs gpu {g}");
    }
    assert_eq!(cpu_losses.len(), 4);
    assert_eq!(gpu_losses.len(), 4);
    let (cpu_enc, cpu_adapter): (Vec<f64>, Vec<f64>) = cpu_losses.into_iter().unzip();
    let (gpu_enc, gpu_adapter): (Vec<f64>, Vec<f64>) = gpu_losses.into_iter().unzip();
    assert_losses_follow(&cpu_enc, &gpu_enc, "loss");
    assert_losses_follow(&cpu_adapter, &gpu_adapter, "adapter loss");
    let s = start.bert().weights.tensors();
    let c = cpu.encoder().bert().weights.tensors();
    assert_close(&s, &c, &dev.encoder().bert().weights.tensors(), "rrra");
}

/// Two data-parallel ranks (threads, `InProcess`) each holding a resident `GpuTrainStep` on the
/// one GPU: each encodes its half of every batch and the gradients are summed after the step's
/// last backward (through the host: the in-process group has no NCCL). The run follows the
/// single-process CPU run within the tolerances above, and both ranks end with bitwise the
/// same weights (every rank adds the same sums in rank order).
#[test]
fn resident_data_parallel_ranks_follow_the_cpu_run() {
    use rrra::train::collective::{Collective, InProcess};
    use std::sync::Arc;
    let Some(gpu) = common::gpu_or_skip() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let model = common::tiny_bert_with_dropout(dir.path());
    let mut cpu = Trainer::new(config(&model, dir.path().join("cpu"))).unwrap();
    let cpu_losses = losses(&mut cpu, None);
    let out = dir.path().join("ranks");
    let ranks: Vec<(Vec<f64>, Vec<Vec<f32>>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = InProcess::group(2)
            .into_iter()
            .map(|comm| {
                let (ordinal, cfg) = (gpu.info().ordinal, config(&model, out.clone()));
                scope.spawn(move || {
                    // each rank opens the device itself, as its own process would
                    let gpu = Gpu::open(ordinal).unwrap();
                    let comm: Arc<dyn Collective> = Arc::new(comm);
                    let mut t = Trainer::new_rank(cfg, comm).unwrap();
                    offload(&gpu, &mut t, true);
                    let l = losses(&mut t, None);
                    let w = t.encoder().bert().weights.tensors();
                    (l, w.iter().map(|x| x.to_vec()).collect())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let bits = |w: &[Vec<f32>]| -> Vec<u32> { w.iter().flatten().map(|v| v.to_bits()).collect() };
    assert!(
        bits(&ranks[0].1) == bits(&ranks[1].1),
        "the two ranks hold different weights"
    );
    let (rank_losses, w) = &ranks[0];
    assert_eq!(rank_losses.len(), 4);
    assert_losses_follow(&cpu_losses, rank_losses, "two ranks loss");
    let start = Encoder::load(&model, &EncoderOptions::default()).unwrap();
    let w: Vec<&[f32]> = w.iter().map(Vec::as_slice).collect();
    assert_close(
        &start.bert().weights.tensors(),
        &cpu.encoder().bert().weights.tensors(),
        &w,
        "two ranks",
    );
}
