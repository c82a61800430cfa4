//! The encoder's f32 training forward and backward on the GPU (`rrra::device::encoder_train`)
//! against the CPU reference (`rrra::train::encoder_grad::TrainableEncoder`, with and without
//! dropout: the masks are the same) on random models, and against the float64 PyTorch loss and gradients of
//! ../shared/fixtures/tiny-bert (as tests/train_golden.rs holds the CPU path). Without a GPU
//! every test skips with the reason.
//!
//! Tolerances, and why: both paths are f32 with the same operations in other summation orders
//! (cuBLAS tiles, warp reductions, the tiled attention backward) and erf/exp from CUDA's libm
//! against the CPU's polynomials: ~1e-6 relative per op, compounding over a few layers to
//! ~1e-5. So embeddings (unit vectors, or LayerNorm-scale values) agree to 1e-4 absolute, and
//! each gradient tensor to 1e-4 in relative L2 norm — the bound the CPU path meets against
//! float64 PyTorch, which the GPU is held to as well.
//!
//! With the tensor-core GEMM arithmetic (`GemmMath`), every product's operands are rounded
//! first: TF32 keeps 10 mantissa bits (relative rounding 4.9e-4), bf16 8 (3.9e-3). Errors of
//! that size per operand average down in the sums but compound over the forward and the
//! backward, so gradients are held to 5e-3 (TF32) and 3e-2 (bf16) relative L2, embeddings to
//! 5e-3 and 3e-2 absolute: bf16's ~1e-2 rule with room for two layers. The bf16 mode also runs
//! attention, forward and backward, on the tensor cores (Q, K, V, dO, the probabilities and dS
//! rounded to bf16, f32 accumulation): the same rounding, held to the same bounds.

mod common;

use rrra::device::encoder_train::GpuTrainableEncoder;
use rrra::device::GemmMath;
use rrra::index::synthetic::Rng;
use rrra::model::bert::{Bert, PackedBatch};
use rrra::model::synthetic::{batch_with_lengths, random_bert, small_config};
use rrra::model::weights::BertWeights;
use rrra::model::{Encoder, EncoderOptions, Pooling};
use rrra::train::encoder_grad::{ActivationMode, DropoutPlan, TrainBatch, TrainableEncoder};

fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    let num: f64 = got
        .iter()
        .zip(want)
        .map(|(g, w)| (*g as f64 - *w as f64).powi(2))
        .sum();
    let den: f64 = want.iter().map(|w| (*w as f64).powi(2)).sum();
    (num / den.max(1e-300)).sqrt()
}

/// CPU embeddings and gradients of `Σ d_emb ⊙ embeddings` (added to `grads`), with `dropout`.
fn cpu_step(
    bert: &Bert,
    pooling: Pooling,
    normalize: bool,
    batch: &TrainBatch,
    dropout: &DropoutPlan,
    d_emb: &[f32],
    grads: &mut BertWeights,
) -> Vec<f32> {
    let te = TrainableEncoder {
        bert,
        pooling,
        normalize,
    };
    let acts = te.forward(batch, dropout, ActivationMode::Keep).unwrap();
    let emb = acts.embeddings.clone();
    te.backward(batch, dropout, acts, d_emb, grads).unwrap();
    emb
}

fn train_batch(batch: PackedBatch, first_id: u64) -> TrainBatch {
    let n = batch.sequences() as u64;
    TrainBatch {
        packed: batch,
        example_ids: (first_id..first_id + n).collect(),
    }
}

fn filled(cfg: &rrra::model::BertConfig, v: f32) -> BertWeights {
    let mut g = BertWeights::zeros(cfg);
    for (t, _) in g.tensors_mut() {
        t.fill(v);
    }
    g
}

#[test]
fn forward_and_backward_match_the_cpu_on_random_models() {
    let Some(gpu) = common::gpu_or_skip() else {
        return;
    };
    // (hidden, heads, layers, ffn, pooling, normalise, dropout): head dim 16 (the general
    // attention kernels) and 32 (the tiled ones), every pooling, with and without
    // normalisation, and with dropout at every site (the training attention kernel and the
    // masks in backward).
    let drop = DropoutPlan {
        hidden: 0.1,
        attention: 0.15,
        seed: 11,
        step: 3,
    };
    let cases = [
        (
            64usize,
            4usize,
            2usize,
            128usize,
            Pooling::Mean,
            true,
            DropoutPlan::none(),
        ),
        (128, 4, 1, 256, Pooling::Cls, false, DropoutPlan::none()),
        (64, 2, 2, 96, Pooling::Max, true, DropoutPlan::none()),
        (64, 4, 2, 128, Pooling::Mean, true, drop),
        (128, 4, 2, 256, Pooling::Cls, true, drop),
    ];
    for (case, &(h, heads, layers, inter, pooling, normalize, dropout)) in cases.iter().enumerate()
    {
        let cfg = small_config(h, heads, layers, inter);
        let bert = random_bert(cfg.clone(), 40 + case as u64);
        let batch = train_batch(
            batch_with_lengths(&cfg, &[5, 1, 17, 9, 33], 50 + case as u64),
            1000 * case as u64,
        );
        let mut rng = Rng::new(60 + case as u64);
        let d_emb: Vec<f32> = (0..batch.packed.sequences() * h)
            .map(|_| rng.normal_pair().0 as f32)
            .collect();
        let what =
            |s: &str| format!("case {case} (h {h}, heads {heads}, {pooling:?}, {dropout:?}) {s}");

        // starting values that both sides must add to: 2^-10, whose rounding step (2^-33)
        // sits far below the gradients, so the sums keep what was added
        const START: f32 = 1.0 / 1024.0;
        let mut g_cpu = filled(&cfg, START);
        let emb_cpu = cpu_step(
            &bert, pooling, normalize, &batch, &dropout, &d_emb, &mut g_cpu,
        );
        let mut dev = GpuTrainableEncoder::new(&gpu, &bert, pooling, normalize, 80, 8).unwrap();
        let emb_gpu = dev.forward_train(&batch, &dropout).unwrap();
        for (i, (g, c)) in emb_gpu.iter().zip(&emb_cpu).enumerate() {
            assert!(
                (g - c).abs() <= 1e-4,
                "{}[{i}]: {g} vs {c}",
                what("embedding")
            );
        }
        let mut g_gpu = filled(&cfg, START);
        dev.backward(&d_emb, &mut g_gpu).unwrap();
        let (gc, gg) = (g_cpu.tensors(), g_gpu.tensors());
        for (i, (c, g)) in gc.iter().zip(&gg).enumerate() {
            assert!(
                g.iter().all(|v| v.is_finite()),
                "{}",
                what(&format!("tensor {i}"))
            );
            // what the backward added (a start in the denominator would dilute the error)
            let added = |v: &[f32]| v.iter().map(|x| x - START).collect::<Vec<f32>>();
            let err = rel_l2(&added(g), &added(c));
            assert!(
                err <= 1e-4,
                "{}: relative L2 {err:.2e}",
                what(&format!("tensor {i}"))
            );
        }

        // the same step again: bitwise the same gradients
        let mut again = filled(&cfg, START);
        dev.forward_train(&batch, &dropout).unwrap();
        dev.backward(&d_emb, &mut again).unwrap();
        assert!(
            again.tensors().iter().zip(&gg).all(|(a, b)| a
                .iter()
                .zip(b.iter())
                .all(|(x, y)| x.to_bits() == y.to_bits())),
            "{}",
            what("replay")
        );
    }
}

#[test]
fn tensor_core_gemm_math_stays_within_its_rounding() {
    let Some(gpu) = common::gpu_or_skip() else {
        return;
    };
    // head dim 32: GemmMath::Bf16 stores the activations in bf16, runs the products on bf16
    // operands and attention on the tensor cores (rrra_attention_train_mma_bf16_d32, backward
    // rrra_attention_backward_{dq,dkdv}_mma_bf16_d32), without and with dropout; the others
    // keep f32 activations and the f32 attention kernels. Bounds: 1e-4 for f32 (summation
    // order, erf/exp), 5e-3 for TF32 operands (2^-11), 3e-2 for bf16 storage and operands
    // (2^-9 per rounding, a few per value across two layers; the block emulator's whole step
    // in this mode was within 1.8e-2 (embeddings) and 8.4e-3 (gradients) of the CPU).
    let (h, heads, layers, inter) = (128usize, 4usize, 2usize, 256usize);
    let cfg = small_config(h, heads, layers, inter);
    let bert = random_bert(cfg.clone(), 77);
    let batch = train_batch(batch_with_lengths(&cfg, &[5, 1, 17, 9, 33, 70], 78), 0);
    let mut rng = Rng::new(79);
    let d_emb: Vec<f32> = (0..batch.packed.sequences() * h)
        .map(|_| rng.normal_pair().0 as f32)
        .collect();
    let drop = DropoutPlan {
        hidden: 0.1,
        attention: 0.15,
        seed: 21,
        step: 4,
    };
    for dropout in [DropoutPlan::none(), drop] {
        let mut g_cpu = BertWeights::zeros(&cfg);
        let emb_cpu = cpu_step(
            &bert,
            Pooling::Mean,
            true,
            &batch,
            &dropout,
            &d_emb,
            &mut g_cpu,
        );
        let mut f32_grads: Option<BertWeights> = None;
        for (math, tol) in [
            (GemmMath::F32, 1e-4),
            (GemmMath::Tf32, 5e-3),
            (GemmMath::Bf16, 3e-2),
        ] {
            let what = format!("{math}, dropout {}", dropout.attention);
            let mut dev =
                GpuTrainableEncoder::new(&gpu, &bert, Pooling::Mean, true, 200, 8).unwrap();
            dev.set_gemm_math(math).unwrap();
            assert_eq!(
                dev.bf16_activations(),
                math == GemmMath::Bf16,
                "{what}: storage"
            );
            let emb = dev.forward_train(&batch, &dropout).unwrap();
            let worst = emb
                .iter()
                .zip(&emb_cpu)
                .map(|(g, c)| (g - c).abs())
                .fold(0.0f32, f32::max);
            assert!(worst as f64 <= tol, "{what}: embeddings {worst:.2e} apart");
            let mut g = BertWeights::zeros(&cfg);
            dev.backward(&d_emb, &mut g).unwrap();
            let mut largest = 0.0f64;
            for (i, (c, d)) in g_cpu.tensors().iter().zip(g.tensors()).enumerate() {
                let err = rel_l2(d, c);
                assert!(err <= tol, "{what}, tensor {i}: relative L2 {err:.2e}");
                largest = largest.max(err);
            }
            // How far the rounded products moved the gradients from full f32, for the log:
            // cuBLAS may keep small products off the tensor cores, so zero is not a failure.
            let moved = match &f32_grads {
                Some(f) => f
                    .tensors()
                    .iter()
                    .zip(g.tensors())
                    .map(|(a, b)| rel_l2(b, a))
                    .fold(0.0, f64::max),
                None => 0.0,
            };
            eprintln!(
                "{what}: embeddings within {worst:.2e} and gradients within {largest:.2e} of \
                 the CPU; {moved:.2e} from the f32 products"
            );
            if math == GemmMath::F32 {
                f32_grads = Some(g);
            }
        }
    }
}

#[test]
fn micro_batches_accumulate_on_the_device_like_the_cpu() {
    let Some(gpu) = common::gpu_or_skip() else {
        return;
    };
    // Two micro-batches of different shapes on one encoder, added up on the device (the
    // resident step's path) against the CPU's sum: max pooling with dropout, and sequences past
    // 64 tokens (the attention backward's multi-tile path) in the second batch.
    let (h, heads, layers, inter) = (64usize, 2usize, 2usize, 128usize);
    let cfg = small_config(h, heads, layers, inter);
    let bert = random_bert(cfg.clone(), 90);
    let drop = DropoutPlan {
        hidden: 0.1,
        attention: 0.1,
        seed: 3,
        step: 9,
    };
    let batches = [
        train_batch(batch_with_lengths(&cfg, &[7, 3, 12], 91), 0),
        train_batch(batch_with_lengths(&cfg, &[100, 9, 130, 1], 92), 1 << 14),
    ];
    let mut rng = Rng::new(93);
    let d: Vec<Vec<f32>> = batches
        .iter()
        .map(|b| {
            (0..b.packed.sequences() * h)
                .map(|_| rng.normal_pair().0 as f32)
                .collect()
        })
        .collect();
    let mut g_cpu = BertWeights::zeros(&cfg);
    for (b, d) in batches.iter().zip(&d) {
        cpu_step(&bert, Pooling::Max, true, b, &drop, d, &mut g_cpu);
    }
    let mut dev = GpuTrainableEncoder::new(&gpu, &bert, Pooling::Max, true, 260, 4).unwrap();
    dev.zero_grads().unwrap();
    for (b, d) in batches.iter().zip(&d) {
        dev.forward_train(b, &drop).unwrap();
        dev.accumulate_backward(d).unwrap();
    }
    let mut g = BertWeights::zeros(&cfg);
    dev.add_grads_to(&mut g).unwrap();
    for (i, (c, d)) in g_cpu.tensors().iter().zip(g.tensors()).enumerate() {
        let err = rel_l2(d, c);
        assert!(err <= 1e-4, "tensor {i}: relative L2 {err:.2e}");
    }
    // the activations are spent after a backward, and a mining encode replaces them
    assert!(dev.accumulate_backward(&d[1]).is_err(), "a second backward");
    dev.forward_train(&batches[0], &drop).unwrap();
    let texts: Vec<rrra::model::tokenizer::Tokens> = Vec::new();
    dev.encode(&texts).unwrap();
    assert!(
        dev.accumulate_backward(&d[0]).is_err(),
        "a backward after encode"
    );
}

#[test]
fn gradients_match_the_float64_reference_on_the_gpu() {
    let Some(gpu) = common::gpu_or_skip() else {
        return;
    };
    // tests/train_golden.rs's setting on the GPU: the fixture's batch (3 queries, 6 documents),
    // InfoNCE on the host, every gradient against float64 PyTorch.
    let f = common::tiny_bert_fixture();
    let enc = Encoder::load(
        &common::shared().join("fixtures/tiny-bert"),
        &EncoderOptions::default(),
    )
    .unwrap();
    let mut batch = PackedBatch::new();
    f.push_rows(&mut batch, "query_input_ids", "query_attention_mask");
    f.push_rows(&mut batch, "doc_input_ids", "doc_attention_mask");
    let h = enc.dim();
    let mut dev = GpuTrainableEncoder::new(
        &gpu,
        enc.bert(),
        enc.pooling(),
        enc.normalize(),
        batch.tokens(),
        batch.sequences(),
    )
    .unwrap();
    let emb = dev.forward(&batch).unwrap();
    let (_, qe) = &f.tensors["query_embeddings"];
    let (_, de) = &f.tensors["doc_embeddings"];
    for (i, (g, w)) in emb.iter().zip(qe.iter().chain(de)).enumerate() {
        assert!((*g as f64 - w).abs() < 1e-5, "embedding {i}: {g} vs {w}");
    }
    let (loss, d_emb) = f.loss_and_gradient(&emb, h);
    let want_loss = f.tensors["loss"].1[0];
    assert!(
        ((loss - want_loss) / want_loss).abs() < 1e-5,
        "loss {loss} vs {want_loss}"
    );
    let mut grads = BertWeights::zeros(enc.config());
    dev.backward(&d_emb, &mut grads).unwrap();
    let named = grads.named(enc.config());
    for t in &named {
        let (shape, want) = &f.tensors[&format!("grad.{}", t.name)];
        assert_eq!(&t.shape, shape, "{}", t.name);
        if t.name.ends_with("attention.self.key.bias") {
            // zero in exact arithmetic (softmax cancels it): round-off against the weight's
            // (the GPU's attention backward rounds on other paths than the CPU's, so its
            // round-off is of the same order, not the same; 1e-5 holds that, and a slip that
            // leaves a real gradient there is O(1))
            let norm = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
            let w_name = t.name.replace(".bias", ".weight");
            let w = named.iter().find(|n| n.name == w_name).unwrap();
            assert!(norm(t.data) <= 1e-5 * norm(w.data), "{}", t.name);
            continue;
        }
        let want: Vec<f32> = want.iter().map(|&v| v as f32).collect();
        let err = rel_l2(t.data, &want);
        assert!(err <= 1e-4, "{}: relative L2 {err:.2e}", t.name);
    }
}

#[test]
fn switching_storage_and_weights_keeps_results() {
    let Some(gpu) = common::gpu_or_skip() else {
        return;
    };
    // head dim 64: GemmMath::Bf16 reallocates the activations in bf16, F32 back in f32; each
    // mode's results are deterministic, so a switch and back must give them bit for bit, and
    // new weights must reach the bf16 working copies (a stale copy would keep the old output)
    let cfg = small_config(128, 2, 2, 256);
    let (bert, other) = (random_bert(cfg.clone(), 3), random_bert(cfg.clone(), 4));
    let batch = train_batch(batch_with_lengths(&cfg, &[9, 70, 1], 5), 0);
    let dropout = DropoutPlan {
        hidden: 0.1,
        attention: 0.1,
        seed: 2,
        step: 3,
    };
    let fresh = |b: &rrra::model::bert::Bert, math: GemmMath| {
        let mut dev = GpuTrainableEncoder::new(&gpu, b, Pooling::Mean, true, 100, 4).unwrap();
        dev.set_gemm_math(math).unwrap();
        dev.forward_train(&batch, &dropout).unwrap()
    };
    let f32_emb = fresh(&bert, GemmMath::F32);
    let bf16_emb = fresh(&bert, GemmMath::Bf16);
    assert_ne!(f32_emb, bf16_emb, "bf16 storage rounds");
    let mut dev = GpuTrainableEncoder::new(&gpu, &bert, Pooling::Mean, true, 100, 4).unwrap();
    for (math, want) in [
        (GemmMath::Bf16, &bf16_emb),
        (GemmMath::F32, &f32_emb),
        (GemmMath::Bf16, &bf16_emb),
    ] {
        dev.set_gemm_math(math).unwrap();
        assert_eq!(
            &dev.forward_train(&batch, &dropout).unwrap(),
            want,
            "{math}"
        );
    }
    dev.set_weights(&other.weights).unwrap();
    let got = dev.forward_train(&batch, &dropout).unwrap();
    assert_eq!(got, fresh(&other, GemmMath::Bf16), "new weights in bf16");
}

#[test]
fn bad_calls_are_errors() {
    let Some(gpu) = common::gpu_or_skip() else {
        return;
    };
    let cfg = small_config(64, 4, 1, 128);
    let bert = random_bert(cfg.clone(), 1);
    let mut dev = GpuTrainableEncoder::new(&gpu, &bert, Pooling::Mean, true, 20, 2).unwrap();
    let mut g = BertWeights::zeros(&cfg);
    assert!(dev.backward(&[0.0; 64], &mut g).is_err(), "no forward yet");
    let big = batch_with_lengths(&cfg, &[15, 10], 1);
    assert!(dev.forward(&big).is_err(), "more tokens than the buffers");
    let three = batch_with_lengths(&cfg, &[3, 3, 3], 1);
    assert!(
        dev.forward(&three).is_err(),
        "more sequences than the buffers"
    );
    let ok = batch_with_lengths(&cfg, &[4, 6], 1);
    dev.forward(&ok).unwrap();
    assert!(dev.backward(&[0.0; 10], &mut g).is_err(), "short gradient");
    let other = BertWeights::zeros(&small_config(64, 4, 2, 128));
    assert!(dev.set_weights(&other).is_err(), "other shape");
}

#[test]
fn tensor_core_attention_matches_the_f32_kernels_with_the_same_masks() {
    let Some(gpu) = common::gpu_or_skip() else {
        return;
    };
    // head dims 32, 64 and 128, sequences around the 64-query and 32/64-key tiles, and a one-
    // token one; without dropout and with p 0.5, where one wrong mask bit moves an output of
    // a 5-token sequence by ~0.1 of the scale. Q, K, V and the probabilities are rounded to
    // bf16 (2^-9 relative each): the outputs move by ~1e-3 of their scale, held to bf16's 1e-2
    // (the block emulator's bound for the same kernel against the CPU).
    for (case, heads) in [4usize, 2, 1].into_iter().enumerate() {
        let h = 128;
        let cfg = small_config(h, heads, 1, 256);
        let bert = random_bert(cfg.clone(), 90 + case as u64);
        let batch = train_batch(batch_with_lengths(&cfg, &[65, 5, 1, 130, 33], 91), 7);
        for attention in [0.0, 0.5] {
            let dropout = DropoutPlan {
                hidden: 0.0,
                attention,
                seed: 5,
                step: 1,
            };
            // f32 storage: the tensor-core kernel on f32 QKV; bf16 storage (GemmMath::Bf16):
            // its bf16 twin on the kept bf16 QKV, the f32 kernels on the same values widened
            for math in [GemmMath::F32, GemmMath::Bf16] {
                let mut dev =
                    GpuTrainableEncoder::new(&gpu, &bert, Pooling::Mean, true, 240, 8).unwrap();
                dev.set_gemm_math(math).unwrap();
                dev.forward_train(&batch, &dropout).unwrap();
                let want = dev.rerun_attention(0, false).unwrap();
                let got = dev.rerun_attention(0, true).unwrap();
                let scale = want.iter().fold(1.0f32, |m, v| m.max(v.abs()));
                let worst =
                    got.iter()
                        .zip(&want)
                        .map(|(g, w)| (g - w).abs())
                        .fold(
                            0.0f32,
                            |m, e| if e.is_nan() { f32::INFINITY } else { m.max(e) },
                        );
                let what = format!("head dim {}, dropout {attention}, {math}", h / heads);
                assert!(
                    worst <= 1e-2 * scale,
                    "{what}: {worst:.2e} apart (scale {scale})"
                );
                eprintln!("{what}: within {worst:.2e} of the f32 kernel");
            }
        }
    }
}
