//! `rrra train --gpu` end to end: a few trainer steps (mining refreshes, dropout, gradient
//! accumulation) with the encoder offloaded to the GPU against the same run on the CPU, on the
//! tiny random BERT of the fixtures (dropout set to 0.1) and Cranfield. Skips without a GPU.
//!
//! Tolerances, and why: the first step starts from the same weights, so its loss differs only
//! by the f32 summation orders of the encoder (~1e-6 relative). Later steps start from weights
//! that AdamW moved with gradients ~1e-5 apart; Adam's normalised update carries that into the
//! weights at about the same relative size, so the losses agree to 1e-4 relative and each
//! trained tensor to 1e-3 in relative L2 norm of its change from the start.

mod common;

use rrra::device::encoder_train::GpuTrainableEncoder;
use rrra::model::{Encoder, EncoderOptions};
use rrra::train::config::{DataSource, TrainConfig};
use rrra::train::trainer::{TrainEvent, Trainer};

#[test]
fn an_offloaded_run_follows_the_cpu_run() {
    let Some(gpu) = common::gpu_or_skip() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let model = common::tiny_bert_with_dropout(dir.path());
    let config = |out: &str| {
        let mut cfg = TrainConfig::new(
            model.clone(),
            DataSource::Beir {
                dir: common::shared().join("data/cranfield"),
                split: "train".into(),
            },
            dir.path().join(out),
        );
        cfg.max_steps = Some(4);
        cfg.batch_size = 8;
        cfg.grad_accum = 2;
        cfg.hard_negatives = 3;
        cfg.random_negatives = 1;
        cfg.doc_max_length = 96;
        cfg.mine_every = Some(2);
        cfg.mine_top_k = 50;
        cfg.lr = 1e-3;
        cfg
    };
    let losses = |t: &mut Trainer| {
        let mut out = Vec::new();
        t.run(None, &mut |e| {
            if let TrainEvent::Step(r) = e {
                out.push(r.loss);
            }
        })
        .unwrap();
        out
    };
    let mut cpu = Trainer::new(config("cpu")).unwrap();
    let cpu_losses = losses(&mut cpu);
    let mut dev = Trainer::new(config("gpu")).unwrap();
    let (sequences, tokens) = dev.batch_capacity();
    let enc = dev.encoder();
    let offloaded = GpuTrainableEncoder::new(
        &gpu,
        enc.bert(),
        enc.pooling(),
        enc.normalize(),
        tokens,
        sequences,
    )
    .unwrap();
    dev.offload_encoder(Box::new(offloaded));
    let gpu_losses = losses(&mut dev);

    assert_eq!(cpu_losses.len(), 4);
    assert_eq!(gpu_losses.len(), 4);
    for (i, (c, g)) in cpu_losses.iter().zip(&gpu_losses).enumerate() {
        let tol = if i == 0 { 1e-5 } else { 1e-4 };
        assert!(
            (c - g).abs() <= tol * c.abs(),
            "step {}: cpu loss {c} vs gpu {g}",
            i + 1
        );
    }
    let start = Encoder::load(&model, &EncoderOptions::default()).unwrap();
    let s = start.bert().weights.tensors();
    let (c, g) = (
        cpu.encoder().bert().weights.tensors(),
        dev.encoder().bert().weights.tensors(),
    );
    for (i, ((s, c), g)) in s.iter().zip(&c).zip(&g).enumerate() {
        let moved: f64 = s
            .iter()
            .zip(c.iter())
            .map(|(a, b)| ((b - a) as f64).powi(2))
            .sum();
        let apart: f64 = c
            .iter()
            .zip(g.iter())
            .map(|(a, b)| ((b - a) as f64).powi(2))
            .sum();
        assert!(
            apart <= 1e-6 * moved.max(1e-30),
            "tensor {i}: the runs are {:.2e} apart, the CPU run moved {:.2e}",
            apart.sqrt(),
            moved.sqrt()
        );
    }
}
