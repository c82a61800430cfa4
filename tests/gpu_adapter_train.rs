//! The adapter's training op on the GPU (`rrra::device::adapter_train`, `kernels/adapter_train.cu`)
//! against the CPU reference (`rrra::adapter::{score, backward}`) on fresh random inputs.
//! Without a GPU every test skips with the reason.
//!
//! Tolerances, and why:
//! * adapted points, logits and alpha: both sides compute the layers in f32 with other summation
//!   orders (cuBLAS tiles versus the CPU's GEMM), ≲ 1e-6 relative per coordinate; the logit is
//!   beta × a difference of cosines, so 2e-5 × (1 + |beta|) absolute, and alpha (a ratio
//!   whose numerator is the small a − c) 1e-4 absolute, as in the serving kernel's test.
//! * gradients: the CPU sums every weight gradient over the P pairs in f64; cuBLAS sums the
//!   same products in f32, ~√P roundings of 6e-8 on terms of either sign. Each tensor is checked
//!   to 1e-4 of its largest magnitude (≈ 30× that error at P = 1 000), which a wrong term, a
//!   missing pair or a transposed product misses by orders of magnitude.

mod common;

use rrra::adapter::fit::{
    score_pairs, train_adapter, train_adapter_on, AdapterTrainConfig, Embeddings,
};
use rrra::adapter::pairs::{PairClass, QueryPairs};
use rrra::adapter::{backward, score, AdapterParams};
use rrra::device::adapter_train::GpuAdapterGrad;
use rrra::index::synthetic::{random_unit_vectors, Rng};

/// An adapter with every tensor random (the initial W2 = 0 would hide the second layer).
fn random_params(d: usize, h: usize, seed: u64) -> AdapterParams {
    let mut p = AdapterParams::init(d, h, seed).unwrap();
    let mut rng = Rng::new(seed ^ 0x7a11);
    let s2 = 1.0 / (h as f64).sqrt();
    for (i, t) in p.tensors_mut().into_iter().enumerate() {
        if i == 0 {
            continue; // W1 keeps its initial scale
        }
        for v in t.iter_mut() {
            *v = (rng.normal_pair().0 * s2) as f32;
        }
    }
    p.beta = 6.0;
    p.beta0 = 0.4;
    p
}

fn random(n: usize, scale: f64, seed: u64) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|_| (rng.normal_pair().0 * scale) as f32)
        .collect()
}

/// Every element within `rel` of the larger side's largest magnitude.
fn check_rel(what: &str, gpu: &[f32], cpu: &[f32], rel: f32) {
    assert_eq!(gpu.len(), cpu.len(), "{what}: lengths");
    let scale = cpu.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-30);
    for (i, (g, c)) in gpu.iter().zip(cpu).enumerate() {
        assert!(
            g.is_finite() && (g - c).abs() <= rel * scale,
            "{what}[{i}]: gpu {g} vs cpu {c} (tolerance {rel} × {scale})"
        );
    }
}

#[test]
fn forward_and_backward_match_the_cpu() {
    let Some(gpu) = common::gpu_or_skip() else {
        return;
    };
    // (d, h, queries, k): the MiniLM shape at a stage-2 batch, odd sizes, one candidate per
    // query, one pair, and more query floats than weights.
    for (case, &(d, h, nq, k)) in [
        (384usize, 384usize, 8usize, 100usize),
        (37, 53, 3, 7),
        (64, 200, 5, 1),
        (33, 17, 1, 1),
        (16, 2, 40, 2),
    ]
    .iter()
    .enumerate()
    {
        let seed = 100 + case as u64 * 10;
        let params = random_params(d, h, seed);
        let queries = random_unit_vectors(nq, d, seed + 1);
        let mut cands = random_unit_vectors(nq * k, d, seed + 2);
        if k > 1 {
            cands[..d].copy_from_slice(&queries[..d]); // q = c: the clamped-alpha corner
        }
        let pairs = nq * k;
        let d_logit = random(pairs, 1.0, seed + 3);
        let d_a = random(pairs * d, 0.05, seed + 4);
        let what = |s: &str| format!("case {case} (d {d}, h {h}, {nq}x{k}) {s}");

        let cpu = score(&params, &queries, &cands, k).unwrap();
        // buffers larger than the call: the op must use only what it is given
        let mut dev = GpuAdapterGrad::new(&gpu, &params, nq + 1, pairs + 3).unwrap();
        let logits = dev.forward(&queries, &cands, k).unwrap();
        let tol = 2e-5 * (1.0 + params.beta.abs());
        for (i, (g, c)) in logits.iter().zip(&cpu.logit).enumerate() {
            assert!((g - c).abs() <= tol, "{}[{i}]: {g} vs {c}", what("logit"));
        }
        check_rel(&what("a"), &dev.adapted().unwrap(), cpu.cache.a(), 1e-5);
        // alpha: a ratio whose numerator is the small a − c, as in the serving kernel's test
        for (i, (g, c)) in dev.alphas().unwrap().iter().zip(&cpu.alpha).enumerate() {
            assert!((g - c).abs() <= 1e-4, "{}[{i}]: {g} vs {c}", what("alpha"));
        }

        for with_inputs in [false, true] {
            for extra in [None, Some(d_a.as_slice())] {
                let tag = format!("inputs {with_inputs}, extra {}", extra.is_some());
                // Non-zero starting values: both sides must add to them.
                let start = {
                    let mut g = params.zeros_like();
                    for t in g.tensors_mut() {
                        t.fill(0.25);
                    }
                    g
                };
                let (mut g_cpu, mut g_gpu) = (start.clone(), start);
                let (mut dq_cpu, mut dq_gpu) = (vec![0.5f32; nq * d], vec![0.5f32; nq * d]);
                let (mut dc_cpu, mut dc_gpu) = (vec![-0.5f32; pairs * d], vec![-0.5f32; pairs * d]);
                backward(
                    &params,
                    &queries,
                    &cands,
                    k,
                    &cpu.cache,
                    &d_logit,
                    extra,
                    &mut g_cpu,
                    with_inputs.then_some(dq_cpu.as_mut_slice()),
                    with_inputs.then_some(dc_cpu.as_mut_slice()),
                )
                .unwrap();
                dev.backward(
                    &d_logit,
                    extra,
                    &mut g_gpu,
                    with_inputs.then_some(dq_gpu.as_mut_slice()),
                    with_inputs.then_some(dc_gpu.as_mut_slice()),
                )
                .unwrap();
                // every tensor, beta and beta0 included
                for ((name, c), (_, g)) in g_cpu.tensors().into_iter().zip(g_gpu.tensors()) {
                    check_rel(&what(&format!("{tag}: d{name}")), g, c, 1e-4);
                }
                if with_inputs {
                    check_rel(&what(&format!("{tag}: dq")), &dq_gpu, &dq_cpu, 1e-4);
                    check_rel(&what(&format!("{tag}: dc")), &dc_gpu, &dc_cpu, 1e-4);
                }
            }
        }
    }
}

#[test]
fn a_step_replays_bit_for_bit_and_new_weights_take_effect() {
    let Some(gpu) = common::gpu_or_skip() else {
        return;
    };
    let (d, h, nq, k) = (96, 64, 4, 25);
    let params = random_params(d, h, 7);
    let queries = random_unit_vectors(nq, d, 8);
    let cands = random_unit_vectors(nq * k, d, 9);
    let d_logit = random(nq * k, 1.0, 10);
    let mut dev = GpuAdapterGrad::new(&gpu, &params, nq, nq * k).unwrap();
    let run = |dev: &mut GpuAdapterGrad| {
        let logits = dev.forward(&queries, &cands, k).unwrap();
        let mut g = params.zeros_like();
        dev.backward(&d_logit, None, &mut g, None, None).unwrap();
        (logits, g)
    };
    let (l1, g1) = run(&mut dev);
    let (l2, g2) = run(&mut dev);
    assert_eq!(l1, l2, "logits replay");
    assert_eq!(g1, g2, "gradients replay");
    // a changed W1 must reach the re-cut first layer
    let mut moved = params.clone();
    moved.w1.iter_mut().for_each(|w| *w *= 1.5);
    dev.set_params(&moved).unwrap();
    let l3 = dev.forward(&queries, &cands, k).unwrap();
    let cpu = score(&moved, &queries, &cands, k).unwrap();
    for (g, c) in l3.iter().zip(&cpu.logit) {
        assert!(
            (g - c).abs() <= 2e-5 * (1.0 + moved.beta.abs()),
            "{g} vs {c}"
        );
    }
}

#[test]
fn bad_calls_are_errors() {
    let Some(gpu) = common::gpu_or_skip() else {
        return;
    };
    let (d, h) = (16, 8);
    let params = random_params(d, h, 1);
    let mut dev = GpuAdapterGrad::new(&gpu, &params, 2, 10).unwrap();
    let mut g = params.zeros_like();
    assert!(
        dev.backward(&[0.0; 5], None, &mut g, None, None).is_err(),
        "no forward yet"
    );
    let q = random_unit_vectors(2, d, 2);
    assert!(
        dev.forward(&q, &random_unit_vectors(12, d, 3), 6).is_err(),
        "too many pairs"
    );
    assert!(
        dev.forward(&q, &random_unit_vectors(9, d, 3), 5).is_err(),
        "wrong length"
    );
    dev.forward(&q, &random_unit_vectors(10, d, 3), 5).unwrap();
    assert!(
        dev.backward(&[0.0; 9], None, &mut g, None, None).is_err(),
        "short d_logit"
    );
    assert!(
        dev.set_params(&AdapterParams::init(d, h + 1, 1).unwrap())
            .is_err(),
        "other shape"
    );
    let aware = AdapterParams::init_with(d, h, true, 1).unwrap();
    assert!(
        GpuAdapterGrad::new(&gpu, &aware, 2, 10).is_err(),
        "positive-aware"
    );
}

/// Queries with 30 candidates each: 2 labelled positives, 2 near but unlabelled, 26 far.
fn toy_pairs(nq: usize, dim: usize) -> (Vec<f32>, Vec<f32>, Vec<QueryPairs>) {
    let q = random_unit_vectors(nq, dim, 1);
    let noise = random_unit_vectors(nq * 30, dim, 2);
    let (mut docs, mut pairs) = (Vec::new(), Vec::new());
    for i in 0..nq {
        let mut p = QueryPairs {
            query: i,
            ..Default::default()
        };
        for j in 0..30 {
            let mix = if j < 4 { 0.8 } else { 0.1 };
            let n = &noise[(i * 30 + j) * dim..(i * 30 + j + 1) * dim];
            let v: Vec<f32> = (0..dim)
                .map(|l| mix * q[i * dim + l] + (1.0 - mix) * n[l])
                .collect();
            let s: f32 = v.iter().zip(&q[i * dim..]).map(|(a, b)| a * b).sum();
            p.docs.push((docs.len() / dim) as u32);
            p.scores.push(s);
            p.classes.push(PairClass::of(j < 2, j, 3));
            docs.extend(v);
        }
        // lists of different lengths: batches are padded
        p.docs.truncate(30 - i % 3);
        p.scores.truncate(30 - i % 3);
        p.classes.truncate(30 - i % 3);
        pairs.push(p);
    }
    (q, docs, pairs)
}

#[test]
fn stage_two_on_the_gpu_follows_the_cpu() {
    let Some(gpu) = common::gpu_or_skip() else {
        return;
    };
    let dim = 32;
    let (q, docs, pairs) = toy_pairs(40, dim);
    let emb = Embeddings {
        queries: &q,
        docs: &docs,
        dim,
    };
    let cfg = AdapterTrainConfig {
        epochs: 4,
        batch_queries: 8,
        lr: 3e-3,
        ..Default::default()
    };
    let (cpu_params, cpu_hist) = train_adapter(&cfg, emb, &pairs, &mut |_| {}).unwrap();
    let mut op = GpuAdapterGrad::for_training(&gpu, dim, dim, cfg.batch_queries, &pairs).unwrap();
    let (gpu_params, gpu_hist) = train_adapter_on(&cfg, emb, &pairs, &mut |_| {}, &mut op).unwrap();
    // The same batches and losses; the gradients differ by f32 summation order, which Adam
    // carries into the weights at that scale: the epoch losses agree to 1e-3 relative.
    for (c, g) in cpu_hist.iter().zip(&gpu_hist) {
        assert!(
            (c.loss - g.loss).abs() <= 1e-3 * c.loss.abs().max(1e-6),
            "epoch {}: cpu {} vs gpu {}",
            c.epoch,
            c.loss,
            g.loss
        );
    }
    assert!(
        gpu_hist.last().unwrap().loss < gpu_hist[0].loss,
        "{gpu_hist:?}"
    );
    // and the GPU-trained adapter scores like the CPU-trained one
    let lc = score_pairs(&cpu_params, emb, &pairs).unwrap();
    let lg = score_pairs(&gpu_params, emb, &pairs).unwrap();
    for (a, b) in lc.iter().flatten().zip(lg.iter().flatten()) {
        assert!(
            (a - b).abs() <= 1e-2 * (1.0 + a.abs()),
            "logit cpu {a} vs gpu {b}"
        );
    }
}

/// Stage 3's adapter on the GPU: `JointAdapter` with the device op gives the CPU's BCE,
/// embedding gradients and adapter gradients (tolerances as in the op's own test above), and
/// its pool scoring (`score_lists_on`, the refresh's) the CPU's logits.
#[test]
fn the_joint_adapter_on_the_gpu_follows_the_cpu() {
    use rrra::adapter::fit::score_lists_on;
    use rrra::train::rrra::JointAdapter;
    let Some(gpu) = common::gpu_or_skip() else {
        return;
    };
    let (d, h, nq, k) = (48usize, 40usize, 6usize, 5usize);
    let params = random_params(d, h, 31);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("adapter.safetensors");
    common::write_adapter(&path, params.clone());
    let (mut cpu, mut dev) = (
        JointAdapter::load(&path).unwrap(),
        JointAdapter::load(&path).unwrap(),
    );
    dev.set_op(Box::new(
        GpuAdapterGrad::new(&gpu, &params, nq, nq * k).unwrap(),
    ));
    // a batch: each query's positive (its own column) and negatives, lists of unequal length
    let queries = random_unit_vectors(nq, d, 32);
    let docs = random_unit_vectors(nq * k, d, 33);
    let classes = PairClass::ALL;
    let lists: Vec<(Vec<usize>, Vec<PairClass>)> = (0..nq)
        .map(|b| {
            let cols: Vec<usize> = (0..k - b % 2).map(|j| (b * k + j) % (nq * k)).collect();
            let cls = (0..cols.len()).map(|j| classes[(b + j) % 4]).collect();
            (cols, cls)
        })
        .collect();
    let (mut dq_c, mut dd_c) = (vec![0.0f32; nq * d], vec![0.0f32; nq * k * d]);
    let (mut dq_g, mut dd_g) = (dq_c.clone(), dd_c.clone());
    let bce_c = cpu
        .batch_loss(&queries, &docs, d, &lists, 0.3, &mut dq_c, &mut dd_c)
        .unwrap();
    let bce_g = dev
        .batch_loss(&queries, &docs, d, &lists, 0.3, &mut dq_g, &mut dd_g)
        .unwrap();
    assert!(
        (bce_c - bce_g).abs() <= 1e-5 * bce_c.abs(),
        "bce {bce_c} vs {bce_g}"
    );
    check_rel("joint dq", &dq_g, &dq_c, 1e-4);
    check_rel("joint dd", &dd_g, &dd_c, 1e-4);
    for ((name, c), (_, g)) in cpu.grads.tensors().into_iter().zip(dev.grads.tensors()) {
        check_rel(&format!("joint d{name}"), g, c, 1e-4);
    }
    // the refresh's scoring, in calls of at most nq × k pairs
    let emb = Embeddings {
        queries: &queries,
        docs: &docs,
        dim: d,
    };
    let pool: Vec<Vec<u32>> = (0..nq).map(|b| (0..(b % k) as u32 + 1).collect()).collect();
    let pool_lists: Vec<(usize, &[u32])> =
        pool.iter().enumerate().map(|(b, l)| (b, &l[..])).collect();
    let mut op = GpuAdapterGrad::new(&gpu, &params, 2, 2 * k).unwrap();
    let lg = score_lists_on(&params, emb, &pool_lists, &mut op).unwrap();
    let lc = score_pairs(
        &params,
        emb,
        &pool
            .iter()
            .enumerate()
            .map(|(b, l)| QueryPairs {
                query: b,
                docs: l.clone(),
                scores: vec![0.0; l.len()],
                classes: vec![PairClass::TrueNegative; l.len()],
            })
            .collect::<Vec<_>>(),
    )
    .unwrap();
    let tol = 2e-5 * (1.0 + params.beta.abs());
    for (a, b) in lc.iter().flatten().zip(lg.iter().flatten()) {
        assert!((a - b).abs() <= tol, "pool logit cpu {a} vs gpu {b}");
    }
    assert_eq!(
        lg.iter().map(Vec::len).sum::<usize>(),
        lc.iter().map(Vec::len).sum::<usize>()
    );
}
