//! The adapter's fused scoring kernels (`kernels/adapter.cu`) against the CPU reference
//! (`rrra::adapter::score`) on fresh random inputs. Without a GPU every test but the build check
//! skips with the reason.
//!
//! Tolerances: both sides compute the two layers in f32 with the same operation count but in a
//! different summation order (the CPU's GEMM tiles vs the kernel's sequential sums over 2d and h
//! inputs), which moves each adapted coordinate by ≲ 1e-6 relative; the cosines then move by
//! ≲ 1e-6 absolute. So QA and CA are checked to 2e-5 absolute, the logit (beta × their
//! difference) to 2e-5 × (1 + |beta|), p (slope ≤ 1/4) to 1e-5, and alpha (a ratio whose
//! numerator is the small a − c) to 1e-4.

mod common;

use half::{bf16, f16};
use rrra::adapter::{score, AdapterParams};
use rrra::device::adapter::GpuAdapter;
use rrra::device::topk::GpuCorpus;
use rrra::device::{cuda_compiled, kernel_module};
use rrra::index::synthetic::{random_unit_vectors, Rng};
use rrra::index::{Corpus, Dtype, Vectors};
use rrra::Error;

/// An adapter with every tensor random (the initial W2 = 0 would hide the second layer).
fn random_params(d: usize, h: usize, seed: u64) -> AdapterParams {
    let mut p = AdapterParams::init(d, h, seed).unwrap();
    let mut rng = Rng::new(seed ^ 0x5eed);
    let s2 = 1.0 / (h as f64).sqrt();
    for (i, t) in p.tensors_mut().into_iter().enumerate() {
        if i == 0 {
            continue; // W1 keeps its initial scale
        }
        for v in t.iter_mut() {
            *v = (rng.normal_pair().0 * s2) as f32;
        }
    }
    p.beta = 7.5;
    p.beta0 = -0.3;
    p
}

fn check_close(what: &str, gpu: &[f32], cpu: &[f32], tol: f32) {
    assert_eq!(gpu.len(), cpu.len(), "{what}: lengths");
    for (i, (g, c)) in gpu.iter().zip(cpu).enumerate() {
        assert!(
            g.is_finite() && (g - c).abs() <= tol,
            "{what}[{i}]: gpu {g} vs cpu {c} (tolerance {tol})"
        );
    }
}

#[test]
fn dense_candidates_match_the_cpu() {
    let Some(gpu) = common::gpu_or_skip() else {
        return;
    };
    // (d, h, queries, k): the MiniLM shape, odd sizes, a k below one tile, a wide model.
    for (case, &(d, h, nq, k)) in [
        (384usize, 384usize, 3usize, 100usize),
        (37, 53, 2, 5),
        (64, 300, 5, 9),
        (768, 256, 2, 17),
        (129, 129, 1, 1),
    ]
    .iter()
    .enumerate()
    {
        let params = random_params(d, h, 10 + case as u64);
        let queries = random_unit_vectors(nq, d, 20 + case as u64);
        let mut cands = random_unit_vectors(nq * k, d, 30 + case as u64);
        // One candidate equal to its query: the alpha = 0 convention (not the only candidate of
        // a list: q = c gives QA = CA, which would hide the MLP).
        if k > 1 {
            cands[..d].copy_from_slice(&queries[..d]);
        }
        let cpu = score(&params, &queries, &cands, k).unwrap();
        // Buffers for fewer pairs than asked: the op must split into several launches.
        let mut ad = GpuAdapter::new(&gpu, &params, (nq * k).div_ceil(2).max(k)).unwrap();
        ad.poison_outputs().unwrap();
        let out = ad.score(&queries, &cands, k).unwrap();
        let tol_logit = 2e-5 * (1.0 + params.beta.abs());
        let what = |s: &str| format!("case {case} (d {d}, h {h}, {nq}x{k}) {s}");
        check_close(&what("QA"), &out.qa, &cpu.qa, 2e-5);
        check_close(&what("CA"), &out.ca, &cpu.ca, 2e-5);
        check_close(&what("logit"), &out.logit, &cpu.logit, tol_logit);
        check_close(&what("p"), &out.p, &cpu.p, 1e-5);
        check_close(&what("alpha"), &out.alpha, &cpu.alpha, 1e-4);
        if k > 1 {
            assert_eq!(out.alpha[0], 0.0, "q = c gives alpha 0");
        }
    }
}

#[test]
fn the_identity_adapter_scores_beta0() {
    let Some(gpu) = common::gpu_or_skip() else {
        return;
    };
    // At initialisation a = c exactly, so QA = cos(q, c), CA = 1 and alpha = 0.
    let (d, k) = (48, 11);
    let params = AdapterParams::init(d, 40, 4).unwrap();
    let q = random_unit_vectors(1, d, 1);
    let c = random_unit_vectors(k, d, 2);
    let out = GpuAdapter::new(&gpu, &params, k)
        .unwrap()
        .score(&q, &c, k)
        .unwrap();
    for j in 0..k {
        let cos: f32 = q
            .iter()
            .zip(&c[j * d..(j + 1) * d])
            .map(|(a, b)| a * b)
            .sum();
        assert!((out.ca[j] - 1.0).abs() < 1e-6, "CA {}", out.ca[j]);
        assert!((out.qa[j] - cos).abs() < 1e-5);
        assert_eq!(out.alpha[j], 0.0);
    }
}

#[test]
fn corpus_rows_match_dense_candidates_in_every_element_type() {
    let Some(gpu) = common::gpu_or_skip() else {
        return;
    };
    let (d, h, rows, nq, k) = (96, 80, 1000, 4, 33);
    let params = random_params(d, h, 77);
    let values = random_unit_vectors(rows, d, 78);
    let queries = random_unit_vectors(nq, d, 79);
    let mut rng = Rng::new(80);
    let picks: Vec<u32> = (0..nq * k).map(|_| rng.below(rows) as u32).collect();
    let f16s: Vec<f16> = values.iter().map(|&v| f16::from_f32(v)).collect();
    let bf16s: Vec<bf16> = values.iter().map(|&v| bf16::from_f32(v)).collect();
    for dtype in [Dtype::F32, Dtype::F16, Dtype::Bf16] {
        let (vectors, as_f32): (Vectors, Vec<f32>) = match dtype {
            Dtype::F32 => (Vectors::F32(&values), values.clone()),
            Dtype::F16 => (
                Vectors::F16(&f16s),
                f16s.iter().map(|v| v.to_f32()).collect(),
            ),
            Dtype::Bf16 => (
                Vectors::Bf16(&bf16s),
                bf16s.iter().map(|v| v.to_f32()).collect(),
            ),
        };
        let corpus = GpuCorpus::upload(&gpu, &Corpus::new(vectors, d).unwrap()).unwrap();
        let gathered: Vec<f32> = picks
            .iter()
            .flat_map(|&r| as_f32[r as usize * d..(r as usize + 1) * d].to_vec())
            .collect();
        let cpu = score(&params, &queries, &gathered, k).unwrap();
        let mut ad = GpuAdapter::new(&gpu, &params, nq * k).unwrap();
        let allocations = ad.device_allocations();
        ad.poison_outputs().unwrap();
        let mut logits = vec![f32::NAN; nq * k];
        for _ in 0..3 {
            ad.logits_for_rows(&corpus, &queries, &picks, k, &mut logits)
                .unwrap();
        }
        check_close(
            &format!("{dtype:?} logits"),
            &logits,
            &cpu.logit,
            2e-5 * (1.0 + params.beta.abs()),
        );
        assert_eq!(
            ad.device_allocations(),
            allocations,
            "scoring allocated on the device"
        );
    }
}

#[test]
fn bad_arguments_are_errors() {
    let Some(gpu) = common::gpu_or_skip() else {
        return;
    };
    let d = 16;
    let aware = AdapterParams::init_with(d, 8, true, 1).unwrap();
    assert!(matches!(
        GpuAdapter::new(&gpu, &aware, 10),
        Err(Error::InvalidArgument(_))
    ));
    let params = random_params(d, 8, 2);
    let mut ad = GpuAdapter::new(&gpu, &params, 10).unwrap();
    let q = random_unit_vectors(1, d, 3);
    let c = random_unit_vectors(20, d, 4);
    // k beyond the buffers, k = 0, a ragged query, a NaN query
    assert!(ad.score(&q, &c, 20).is_err());
    assert!(ad.score(&q, &c[..0], 0).is_err());
    assert!(ad.score(&q[..d - 1], &c[..d], 1).is_err());
    let mut nan = q.clone();
    nan[3] = f32::NAN;
    assert!(ad.score(&nan, &c[..d], 1).is_err());
    // a row outside the corpus, a corpus of another dimension
    let corpus = GpuCorpus::upload(&gpu, &Corpus::new(Vectors::F32(&c), d).unwrap()).unwrap();
    let mut out = [0.0f32; 2];
    assert!(ad
        .logits_for_rows(&corpus, &q, &[0, 20], 2, &mut out)
        .is_err());
    let wide = random_unit_vectors(4, 2 * d, 5);
    let corpus2 =
        GpuCorpus::upload(&gpu, &Corpus::new(Vectors::F32(&wide), 2 * d).unwrap()).unwrap();
    assert!(ad
        .logits_for_rows(&corpus2, &q, &[0, 1], 2, &mut out)
        .is_err());
    // the adapter still works after the errors
    ad.logits_for_rows(&corpus, &q, &[0, 19], 2, &mut out)
        .unwrap();
    assert!(out.iter().all(|v| v.is_finite()));
}

#[test]
fn adapter_kernels_compile_without_spills() {
    if !cuda_compiled() {
        eprintln!("skipped: built without nvcc");
        return;
    }
    let m = kernel_module("adapter").expect("the adapter module is embedded");
    assert!(!m.fatbin.is_empty());
    for name in [
        "rrra_adapter_query_bias",
        "rrra_adapter_pairs_f32",
        "rrra_adapter_pairs_f16",
        "rrra_adapter_pairs_bf16",
    ] {
        assert!(
            m.ptxas_report.contains(name),
            "{name} missing from the report"
        );
    }
    for line in m.ptxas_report.lines().filter(|l| l.contains("spill")) {
        assert!(
            line.contains(" 0 bytes spill stores, 0 bytes spill loads"),
            "register spills: {line}"
        );
    }
}
