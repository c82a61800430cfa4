// The training ops on the GPU against their CPU references: negative sampling
// (`device::sampler` vs `train::sampler`), the fused InfoNCE loss (`device::infonce` vs
// `train::loss::info_nce`) and the fused AdamW step (`device::adamw` vs `train::optim`).
// Inputs are fresh random values (fixed seeds). Without a GPU every GPU test skips (and fails if
// `RRRA_REQUIRE_GPU` is set); the stream-word and ptxas checks run everywhere.

mod common;

use half::bf16;
use rrra::device::adamw::GpuAdamW;
use rrra::device::infonce::GpuInfoNce;
use rrra::device::sampler::{DeviceStream, GpuSampler};
use rrra::device::{cuda_compiled, kernel_module, Gpu};
use rrra::index::synthetic::Rng;
use rrra::train::loss::{info_nce, InfoNceInput};
use rrra::train::optim::{clip_grad_norm, AdamW, AdamWConfig};
use rrra::train::rng::{Site, Stream};
use rrra::train::sampler::{
    first_draw_probabilities, log_weights, rrra_log_weights, sample_without_replacement,
    SamplerKind,
};
use rrra::Error;

fn gpu() -> Option<Gpu> {
    common::gpu_or_skip()
}

fn uniform(rng: &mut Rng, lo: f64, hi: f64) -> f64 {
    lo + (hi - lo) * rng.next_f64()
}

// ---------------------------------------------------------------------------------------------
// Sampler

/// The device's stream words regenerate the CPU stream exactly (no GPU needed).
#[test]
fn device_stream_words_match_cpu_streams() {
    let mut rng = Rng::new(1);
    let sites = [Site::Sampler, Site::Shuffle, Site::AttentionDropout];
    for case in 0..200 {
        let seed = rng.next_u64();
        let step = if case % 2 == 0 {
            rng.next_u64() % 100_000
        } else {
            rng.next_u64()
        };
        let example = rng.next_u64() % (1 << 24);
        let layer = (rng.next_u64() % 300) as u32;
        let site = sites[case % sites.len()];
        let cpu = Stream::new(seed, step, example, layer, site);
        let dev = DeviceStream::new(seed, step, example, layer, site);
        for i in [0u64, 1, 2, 99, 1 << 33, u64::MAX / 2] {
            assert_eq!(dev.block(i), cpu.block(i), "case {case} block {i}");
        }
    }
}

/// Random log weights with excluded entries (-inf mostly, some NaN and +inf).
fn random_log_weights(rng: &mut Rng, len: usize) -> Vec<f64> {
    (0..len)
        .map(|_| match rng.below(20) {
            0 | 1 => f64::NEG_INFINITY,
            2 if rng.below(4) == 0 => f64::NAN,
            3 if rng.below(4) == 0 => f64::INFINITY,
            _ => uniform(rng, -6.0, 3.0),
        })
        .collect()
}

/// Exact equality of every draw with the CPU's `sample_without_replacement` for the same streams,
/// over several batch shapes (odd pools, n = 1, n = P, n > P, all-excluded rows, ties in the log
/// weights); the drawn keys equal the CPU's `log_w + gumbel_at` to 1e-14 relative (CUDA's double
/// `ln` is within 1 ulp of the CPU's; the keys are O(1)-O(10), so 1e-14 is a few ulps).
#[test]
fn sampler_draws_equal_the_cpu() {
    let Some(gpu) = gpu() else { return };
    let s = GpuSampler::new(&gpu).unwrap();
    let mut rng = Rng::new(2);
    let shapes = [
        (1usize, 1usize, 1usize),
        (3, 7, 3),
        (64, 200, 7),
        (5, 257, 257),
        (9, 31, 100),
        (4, 1000, 50),
        (2, 2500, 2500), // more than two shared-memory tiles
        (33, 64, 1),
    ];
    for (case, &(q_n, pool, n)) in shapes.iter().enumerate() {
        let mut log_w = random_log_weights(&mut rng, q_n * pool);
        if q_n > 1 {
            // one row with nothing eligible, one with many equal weights
            log_w[..pool].fill(f64::NEG_INFINITY);
            for l in &mut log_w[pool..2 * pool] {
                if l.is_finite() {
                    *l = -1.0;
                }
            }
        }
        let seed = rng.next_u64();
        let step = rng.next_u64() % 10_000;
        let cpu_streams: Vec<Stream> = (0..q_n)
            .map(|q| Stream::new(seed, step, q as u64, 0, Site::Sampler))
            .collect();
        let dev_streams: Vec<DeviceStream> = (0..q_n)
            .map(|q| DeviceStream::new(seed, step, q as u64, 0, Site::Sampler))
            .collect();
        let got = s
            .sample_with_keys(&gpu, &log_w, pool, n, &dev_streams)
            .unwrap();
        assert_eq!(got.picks.len(), q_n);
        for q in 0..q_n {
            let row = &log_w[q * pool..(q + 1) * pool];
            let want = sample_without_replacement(row, n, &cpu_streams[q]);
            assert_eq!(
                got.picks[q], want,
                "case {case} ({q_n}x{pool}, n {n}) query {q}"
            );
            for (&i, &k) in want.iter().zip(&got.keys[q]) {
                let cpu_key = row[i] + cpu_streams[q].gumbel_at(i as u64);
                assert!(
                    (k - cpu_key).abs() <= 1e-14 * cpu_key.abs().max(1.0),
                    "case {case} query {q} candidate {i}: key {k} vs CPU {cpu_key}"
                );
            }
        }
        // prefix consistency: the first m of a draw of n are the draw of m
        if n > 2 {
            let fewer = s.sample(&gpu, &log_w, pool, 2, &dev_streams).unwrap();
            for (q, (few, all)) in fewer.iter().zip(&got.picks).enumerate() {
                assert_eq!(few[..], all[..all.len().min(2)], "case {case} query {q}");
            }
        }
    }
}

/// Frequencies of the first draw over 40 000 streams against `first_draw_probabilities`, within
/// 5 standard errors of a binomial proportion (a false alarm is a ~1e-6 event per entry).
#[test]
fn sampler_first_draw_frequencies() {
    let Some(gpu) = gpu() else { return };
    let s = GpuSampler::new(&gpu).unwrap();
    let row = [
        0.0,
        -0.5,
        f64::NEG_INFINITY,
        1.2,
        -3.0,
        0.7,
        f64::NAN,
        -1.0,
        0.0,
    ];
    let pool = row.len();
    let q_n = 40_000;
    let log_w: Vec<f64> = (0..q_n).flat_map(|_| row).collect();
    let streams: Vec<DeviceStream> = (0..q_n)
        .map(|q| DeviceStream::new(77 + q as u64, 3, 5, 0, Site::Sampler))
        .collect();
    let picks = s.sample(&gpu, &log_w, pool, 3, &streams).unwrap();
    let mut counts = vec![0u64; pool];
    for p in &picks {
        assert_eq!(p.len(), 3);
        counts[p[0]] += 1;
    }
    let probs = first_draw_probabilities(&row);
    let n = q_n as f64;
    for i in 0..pool {
        let (f, p) = (counts[i] as f64 / n, probs[i]);
        let se = (p * (1.0 - p) / n).sqrt();
        assert!(
            (f - p).abs() <= 5.0 * se,
            "candidate {i}: frequency {f} vs probability {p} (se {se})"
        );
    }
    assert_eq!(counts[2] + counts[6], 0, "an excluded candidate was drawn");
}

/// SimANS log weights on the device equal the CPU's `log_weights` bit for bit (same f64
/// operations in the same order, no contraction).
#[test]
fn simans_log_weights_equal_the_cpu() {
    let Some(gpu) = gpu() else { return };
    let s = GpuSampler::new(&gpu).unwrap();
    let mut rng = Rng::new(3);
    let (q_n, pool) = (13, 77);
    let scores: Vec<f32> = (0..q_n * pool)
        .map(|_| uniform(&mut rng, -1.0, 1.0) as f32)
        .collect();
    let pos: Vec<f32> = (0..q_n)
        .map(|_| uniform(&mut rng, 0.0, 1.0) as f32)
        .collect();
    for (a, b) in [(0.5, 0.0), (2.0, 0.1), (0.25, 0.0), (7.5, -0.3)] {
        let got = s.simans_log_weights(&gpu, &scores, &pos, a, b).unwrap();
        for q in 0..q_n {
            let want = log_weights(
                &SamplerKind::SimAns { a, b },
                &scores[q * pool..(q + 1) * pool],
                pos[q],
                None,
            )
            .unwrap();
            for (i, (&g, &w)) in got[q * pool..(q + 1) * pool].iter().zip(&want).enumerate() {
                assert_eq!(g.to_bits(), w.to_bits(), "a {a} b {b} query {q} cand {i}");
            }
        }
    }
}

/// RRRA log weights on the device vs the CPU's `rrra_log_weights`: 1e-14 relative to the row's
/// largest |log w| (everything is the CPU's f64 operations in order except CUDA's log1p, within
/// 1 ulp of the CPU's ln_1p, times gamma), and -inf exactly where s_FN = 1.
#[test]
fn rrra_log_weights_match_the_cpu() {
    let Some(gpu) = gpu() else { return };
    let s = GpuSampler::new(&gpu).unwrap();
    let mut rng = Rng::new(6);
    let (q_n, pool) = (11, 300);
    let scores: Vec<f32> = (0..q_n * pool)
        .map(|_| uniform(&mut rng, -1.0, 1.0) as f32)
        .collect();
    let s_fn: Vec<f32> = (0..q_n * pool)
        .map(|i| match i % 50 {
            0 => 1.0,
            1 => 0.0,
            _ => rng.next_f64() as f32,
        })
        .collect();
    for (tau, gamma, t_h) in [(0.05f32, 2.0, 1.0), (0.02, 0.0, 0.5), (1.0, 0.7, 3.0)] {
        let got = s
            .rrra_log_weights(&gpu, &scores, &s_fn, pool, tau, gamma, t_h)
            .unwrap();
        for q in 0..q_n {
            let r = q * pool..(q + 1) * pool;
            let want =
                rrra_log_weights(&scores[r.clone()], &s_fn[r.clone()], tau, gamma, t_h).unwrap();
            let scale = want
                .iter()
                .filter(|w| w.is_finite())
                .fold(1.0f64, |m, w| m.max(w.abs()));
            for (i, (&g, &w)) in got[r].iter().zip(&want).enumerate() {
                if w.is_finite() {
                    assert!(
                        (g - w).abs() <= 1e-14 * scale,
                        "tau {tau} gamma {gamma} query {q} cand {i}: {g} vs {w}"
                    );
                } else {
                    assert_eq!(g, w, "tau {tau} gamma {gamma} query {q} cand {i}");
                }
            }
        }
    }
    assert!(matches!(
        s.rrra_log_weights(&gpu, &scores[..10], &s_fn[..10], 5, 0.05, 2.0, 1.0)
            .map(|v| v.len()),
        Ok(10)
    ));
    let mut bad = s_fn.clone();
    bad[3] = 1.5;
    assert!(matches!(
        s.rrra_log_weights(&gpu, &scores, &bad, pool, 0.05, 2.0, 1.0),
        Err(Error::InvalidArgument(_))
    ));
}

#[test]
fn sampler_rejects_bad_shapes() {
    let Some(gpu) = gpu() else { return };
    let s = GpuSampler::new(&gpu).unwrap();
    let st = [DeviceStream::new(1, 0, 0, 0, Site::Sampler); 2];
    assert!(matches!(
        s.sample(&gpu, &[0.0; 5], 3, 2, &st),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        s.simans_log_weights(&gpu, &[0.0; 5], &[0.0; 2], 0.5, 0.0),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        s.simans_log_weights(&gpu, &[0.0; 4], &[0.0; 2], 0.0, 0.0),
        Err(Error::InvalidArgument(_))
    ));
    // n = 0 and no queries: empty draws, no launch
    assert_eq!(
        s.sample(&gpu, &[0.0; 6], 3, 0, &st).unwrap(),
        vec![Vec::<usize>::new(); 2]
    );
    assert!(s.sample(&gpu, &[], 3, 2, &[]).unwrap().is_empty());
}

// ---------------------------------------------------------------------------------------------
// InfoNCE

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
        .sum();
    let den: f64 = b.iter().map(|&y| (y as f64).powi(2)).sum();
    (num / den.max(1e-300)).sqrt()
}

/// One batch: B queries, each with a positive and `neg` negatives laid out as the trainer does
/// (D = B × (1 + neg), query b's positive at b × (1 + neg)); log weights random, with -inf on the
/// other queries' positives for some queries (the same-query mask) and on random entries.
struct Batch {
    queries: Vec<f32>,
    docs: Vec<f32>,
    targets: Vec<usize>,
    log_w: Vec<f32>,
}

fn batch(rng: &mut Rng, b_n: usize, neg: usize, dim: usize) -> Batch {
    let d_n = b_n * (1 + neg);
    let vec = |rng: &mut Rng, n: usize| -> Vec<f32> {
        (0..n).map(|_| uniform(rng, -0.2, 0.2) as f32).collect()
    };
    let queries = vec(rng, b_n * dim);
    let docs = vec(rng, d_n * dim);
    let targets: Vec<usize> = (0..b_n).map(|b| b * (1 + neg)).collect();
    let mut log_w: Vec<f32> = (0..b_n * d_n)
        .map(|_| uniform(rng, -2.0, 0.5) as f32)
        .collect();
    for b in 0..b_n {
        for j in 0..d_n {
            if rng.below(10) == 0 || (b % 3 == 0 && j % (1 + neg) == 0 && j != targets[b]) {
                log_w[b * d_n + j] = f32::NEG_INFINITY;
            }
        }
        // the positive's weight is ignored whatever it says
        log_w[b * d_n + targets[b]] = f32::NEG_INFINITY;
    }
    Batch {
        queries,
        docs,
        targets,
        log_w,
    }
}

/// Loss and statistics vs the CPU (loss 1e-5 relative, as asked; both sides compute scores and
/// the LSE in f64, so the expected gap is ~1e-14), gradients 1e-5 relative L2 (both sum the same
/// f32 terms in the same order; a term differs only when g rounds to f32 differently, ~1e-7
/// relative, so 1e-5 leaves a 100× margin). Accuracy is a count and must match exactly. The
/// host gradient buffers start as NaN, and the device ones are NaN-poisoned by the op itself.
#[test]
fn infonce_matches_the_cpu() {
    let Some(gpu) = gpu() else { return };
    let mut op = GpuInfoNce::new(&gpu).unwrap();
    let mut rng = Rng::new(4);
    let shapes = [
        (1usize, 0usize, 1usize),
        (3, 1, 7),
        (8, 3, 33),
        (17, 2, 129),
        (64, 7, 768),
        (40, 1, 1000),
    ];
    for (case, &(b_n, neg, dim)) in shapes.iter().enumerate() {
        let bt = batch(&mut rng, b_n, neg, dim);
        for (with_w, tau) in [(true, 0.05f32), (false, 1.0)] {
            let inp = InfoNceInput {
                queries: &bt.queries,
                docs: &bt.docs,
                dim,
                targets: &bt.targets,
                log_weights: with_w.then_some(&bt.log_w[..]),
                tau,
            };
            let d_n = bt.docs.len() / dim;
            let (mut dq_c, mut dd_c) = (vec![0.0; b_n * dim], vec![0.0; d_n * dim]);
            let want = info_nce(&inp, &mut dq_c, &mut dd_c).unwrap();
            let (mut dq_g, mut dd_g) = (vec![f32::NAN; b_n * dim], vec![f32::NAN; d_n * dim]);
            let got = op.run(&gpu, &inp, &mut dq_g, &mut dd_g).unwrap();
            let what = format!("case {case} (B {b_n}, D {d_n}, d {dim}, weights {with_w})");
            assert!(
                dq_g.iter().chain(&dd_g).all(|x| x.is_finite()),
                "{what}: a gradient is not finite"
            );
            assert!(
                (got.loss - want.loss).abs() <= 1e-5 * want.loss.abs().max(1e-3),
                "{what}: loss {} vs {}",
                got.loss,
                want.loss
            );
            assert_eq!(got.accuracy, want.accuracy, "{what}");
            // score sums in f64 (order differs): 1e-9 relative to the score scale
            let scale = want
                .mean_positive
                .abs()
                .max(want.mean_negative.abs())
                .max(1e-3);
            assert!(
                (got.mean_positive - want.mean_positive).abs() <= 1e-9 * scale,
                "{what}: mean positive {} vs {}",
                got.mean_positive,
                want.mean_positive
            );
            assert!(
                (got.mean_negative - want.mean_negative).abs() <= 1e-9 * scale,
                "{what}: mean negative {} vs {}",
                got.mean_negative,
                want.mean_negative
            );
            let (eq, ed) = (rel_l2(&dq_g, &dq_c), rel_l2(&dd_g, &dd_c));
            assert!(eq <= 1e-5, "{what}: dq relative L2 error {eq}");
            assert!(ed <= 1e-5, "{what}: dd relative L2 error {ed}");
            // the op keeps its buffers: the same problem again allocates nothing and, the
            // kernels being deterministic, gives the same bits
            let allocations = op.device_allocations();
            let (mut dq_2, mut dd_2) = (vec![f32::NAN; b_n * dim], vec![f32::NAN; d_n * dim]);
            let again = op.run(&gpu, &inp, &mut dq_2, &mut dd_2).unwrap();
            assert_eq!(
                op.device_allocations(),
                allocations,
                "{what}: allocated again"
            );
            assert_eq!(
                again.loss.to_bits(),
                got.loss.to_bits(),
                "{what}: loss differs"
            );
            assert!(dq_2 == dq_g && dd_2 == dd_g, "{what}: gradients differ");
        }
    }
}

#[test]
fn infonce_rejects_what_the_cpu_rejects() {
    let Some(gpu) = gpu() else { return };
    let mut op = GpuInfoNce::new(&gpu).unwrap();
    let q = [0.1f32; 4];
    let d = [0.2f32; 6];
    let (mut dq, mut dd) = (vec![0.0; 4], vec![0.0; 6]);
    let base = InfoNceInput {
        queries: &q,
        docs: &d,
        dim: 2,
        targets: &[0, 2],
        log_weights: None,
        tau: 0.05,
    };
    assert!(op.run(&gpu, &base, &mut dq, &mut dd).is_ok());
    let bad = [
        InfoNceInput {
            targets: &[0, 3],
            ..base
        },
        InfoNceInput { tau: 0.0, ..base },
        InfoNceInput { dim: 0, ..base },
        InfoNceInput {
            log_weights: Some(&[0.0; 5]),
            ..base
        },
        InfoNceInput {
            queries: &q[..3],
            ..base
        },
    ];
    for (i, inp) in bad.iter().enumerate() {
        assert!(
            matches!(
                op.run(&gpu, inp, &mut dq, &mut dd),
                Err(Error::InvalidArgument(_))
            ),
            "bad input {i}"
        );
    }
    assert!(matches!(
        op.run(&gpu, &base, &mut dq[..3], &mut dd),
        Err(Error::InvalidArgument(_))
    ));
}

// ---------------------------------------------------------------------------------------------
// AdamW

/// Max |a - b| over a tensor relative to max |b|.
fn rel_max(a: &[f32], b: &[f32]) -> f64 {
    let diff = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y as f64).abs())
        .fold(0.0, f64::max);
    let scale = b.iter().map(|&y| (y as f64).abs()).fold(0.0, f64::max);
    diff / scale.max(1e-30)
}

/// Five steps on tensors of odd sizes (one element, several chunks, a chunk boundary ± 1), with
/// and without decay, clipping active on some steps and not on others, against the CPU's
/// `clip_grad_norm` + `AdamW::update`. Tolerance 1e-6 relative to each tensor's largest value:
/// the update is the CPU's f32 operations in the CPU's order (bit-identical for an identical clip
/// factor); the factor comes from the norm, whose f64 sum is in another order, so it may differ
/// in its last f32 bit (6e-8 relative), which moves the state by about that much. The norm
/// itself: 1e-6 relative (f64 sum, returned as f32). The bf16 copy must equal
/// round-to-nearest-even of the GPU's master weights exactly.
#[test]
fn adamw_matches_the_cpu() {
    let Some(gpu) = gpu() else { return };
    let mut rng = Rng::new(5);
    let sizes = [1usize, 7, 16_384, 16_385, 40_000, 3, 100_003];
    let decay: Vec<bool> = (0..sizes.len()).map(|i| i % 3 != 1).collect();
    let mut p_cpu: Vec<Vec<f32>> = sizes
        .iter()
        .map(|&n| {
            (0..n)
                .map(|_| uniform(&mut rng, -1.0, 1.0) as f32)
                .collect()
        })
        .collect();
    let cfg = AdamWConfig {
        weight_decay: 0.1,
        ..AdamWConfig::default()
    };
    let views: Vec<&[f32]> = p_cpu.iter().map(|p| &p[..]).collect();
    let mut gpu_opt = GpuAdamW::new(&gpu, cfg, &views, &decay, true).unwrap();
    let mut cpu_opt = AdamW::new(cfg, &sizes);
    // grads ~ U(-0.5, 0.5): norm ~ 0.29 * sqrt(total) ~ 125; max_norm 50 clips, 1e4 does not
    for (step, (lr, max_norm, gscale)) in [
        (1e-3f32, 50.0f32, 1.0f64),
        (2e-3, 1e4, 1.0),
        (5e-4, f32::INFINITY, 3.0),
        (1e-3, 0.0, 1.0),
        (1e-2, 10.0, 0.01),
    ]
    .into_iter()
    .enumerate()
    {
        let mut grads: Vec<Vec<f32>> = sizes
            .iter()
            .map(|&n| {
                (0..n)
                    .map(|_| (uniform(&mut rng, -0.5, 0.5) * gscale) as f32)
                    .collect()
            })
            .collect();
        let gviews: Vec<&[f32]> = grads.iter().map(|g| &g[..]).collect();
        gpu_opt.upload_grads(&gpu, &gviews).unwrap();
        let norm_gpu = gpu_opt.step(&gpu, lr, max_norm).unwrap();

        let mut gmut: Vec<&mut [f32]> = grads.iter_mut().map(|g| &mut g[..]).collect();
        let norm_cpu = clip_grad_norm(&mut gmut, max_norm);
        let gro: Vec<&[f32]> = grads.iter().map(|g| &g[..]).collect();
        let mut pmut: Vec<&mut [f32]> = p_cpu.iter_mut().map(|p| &mut p[..]).collect();
        cpu_opt.update(&mut pmut, &gro, &decay, lr).unwrap();

        assert!(
            ((norm_gpu - norm_cpu).abs() as f64) <= 1e-6 * norm_cpu as f64,
            "step {step}: norm {norm_gpu} vs {norm_cpu}"
        );
        assert_eq!(gpu_opt.step, cpu_opt.step);
        let p_gpu = gpu_opt.params(&gpu).unwrap();
        let m_gpu = gpu_opt.first_moments(&gpu).unwrap();
        let v_gpu = gpu_opt.second_moments(&gpu).unwrap();
        let copy = gpu_opt.bf16_copy(&gpu).unwrap().unwrap();
        for t in 0..sizes.len() {
            let what = format!("step {step} tensor {t} ({} elements)", sizes[t]);
            assert!(rel_max(&p_gpu[t], &p_cpu[t]) <= 1e-6, "{what}: params");
            assert!(rel_max(&m_gpu[t], &cpu_opt.m[t]) <= 1e-6, "{what}: m");
            assert!(rel_max(&v_gpu[t], &cpu_opt.v[t]) <= 1e-6, "{what}: v");
            for (i, (&b, &p)) in copy[t].iter().zip(&p_gpu[t]).enumerate() {
                assert_eq!(b, bf16::from_f32(p).to_bits(), "{what}: bf16 copy at {i}");
            }
        }
    }
}

/// A non-finite gradient norm leaves weights, moments and the step count unchanged; bad
/// arguments are typed errors.
#[test]
fn adamw_skips_non_finite_norms_and_rejects_bad_arguments() {
    let Some(gpu) = gpu() else { return };
    let p = vec![0.5f32; 100];
    let mut opt = GpuAdamW::new(&gpu, AdamWConfig::default(), &[&p], &[true], false).unwrap();
    let mut g = vec![0.1f32; 100];
    opt.upload_grads(&gpu, &[&g]).unwrap();
    assert!(opt.step(&gpu, 1e-3, 1.0).unwrap().is_finite());
    assert_eq!(opt.step, 1);
    let before = opt.params(&gpu).unwrap();
    g[17] = f32::NAN;
    opt.upload_grads(&gpu, &[&g]).unwrap();
    assert!(!opt.step(&gpu, 1e-3, 1.0).unwrap().is_finite());
    assert_eq!(opt.step, 1);
    assert_eq!(opt.params(&gpu).unwrap(), before);
    assert!(opt.bf16_copy(&gpu).unwrap().is_none());

    assert!(matches!(
        opt.upload_grads(&gpu, &[&g[..99]]),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        opt.step(&gpu, -1.0, 1.0),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        GpuAdamW::new(&gpu, AdamWConfig::default(), &[&p], &[], false),
        Err(Error::InvalidArgument(_))
    ));
    let bad = AdamWConfig {
        beta1: 1.0,
        ..AdamWConfig::default()
    };
    assert!(matches!(
        GpuAdamW::new(&gpu, bad, &[&p], &[true], false),
        Err(Error::InvalidArgument(_))
    ));
}

// ---------------------------------------------------------------------------------------------
// Build checks and benchmarks

/// Every kernel of the three modules is in its ptxas report and spilled nothing (no GPU needed).
#[test]
fn train_op_kernels_compile_without_spills() {
    if !cuda_compiled() {
        eprintln!("skipped: built without nvcc (CPU-only build)");
        return;
    }
    for (module, kernels) in [
        (
            "sampler",
            &[
                "rrra_sampler_gumbel_top_n",
                "rrra_sampler_simans_log_weights",
            ][..],
        ),
        (
            "infonce",
            &["rrra_infonce_rows", "rrra_infonce_dq", "rrra_infonce_dd"][..],
        ),
        (
            "adamw",
            &[
                "rrra_adamw_norm_partial",
                "rrra_adamw_norm_final",
                "rrra_adamw_update",
            ][..],
        ),
    ] {
        let report = kernel_module(module)
            .unwrap_or_else(|| panic!("module {module} missing"))
            .ptxas_report;
        for k in kernels {
            assert!(report.contains(k), "{module}: {k} not compiled\n{report}");
        }
        let spills: Vec<&str> = report
            .lines()
            .filter(|l| {
                l.contains("spill") && !l.contains("0 bytes spill stores, 0 bytes spill loads")
            })
            .collect();
        assert!(spills.is_empty(), "{module} spills: {spills:?}\n{report}");
    }
}

/// The benchmark table, on demand:
/// `cargo test --release --test gpu_train_ops -- --ignored --nocapture`.
#[test]
#[ignore]
fn bench_table() {
    let Some(gpu) = gpu() else { return };
    println!("{}", gpu.info());
    let mut rows = rrra::device::sampler::bench(&gpu).unwrap();
    rows.extend(rrra::device::infonce::bench(&gpu).unwrap());
    rows.extend(rrra::device::adamw::bench(&gpu).unwrap());
    for t in &rows {
        println!(
            "{:<44} {:<40} {:>9.4} ms {:>8.1} GB/s {:>8.3} TFLOP/s",
            t.name,
            t.shape,
            t.ms,
            t.bytes / t.ms / 1e6,
            t.flops / t.ms / 1e9
        );
    }
}
