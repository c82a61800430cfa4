//! Exact top-k against a brute-force reference.
//!
//! Reference: every score as an f64 dot product of the stored values (f16/bf16 converted to f32
//! exactly), all documents stably sorted by score descending, then index ascending.
//!
//! Tolerance: the engine computes each score as a sequential f32 sum over k (one rounding per
//! step, with or without FMA), so |engine − exact| ≤ γ_d · Σ_k |q_k c_k| with γ_d = d·u/(1 − d·u)
//! and u = 2⁻²⁴ (the classic bound for recursive summation). For unit vectors and d = 384 that
//! is at most ~2.3e-5 and typically ~100× smaller. We check every returned score against its
//! exact value within that bound, and check the returned indices position by position wherever
//! the exact scores around that position are separated by more than twice the bound (closer
//! scores may legitimately swap). Exact ties are tested separately with duplicate rows, whose
//! scores are bit-identical by construction, so their order must be exactly by index.

use half::{bf16, f16};
use rrra::index::synthetic::{random_unit_vectors, Rng};
use rrra::index::{
    search_batch, search_one, search_one_into, write_store, Corpus, Dtype, Hit, OneQueryScratch,
    Store, StoreSpec, Vectors,
};
use rrra::Error;

/// A corpus in one dtype plus its values as f32 (what the engine computes with).
struct Data {
    dim: usize,
    f32s: Vec<f32>,
    f16s: Vec<f16>,
    bf16s: Vec<bf16>,
    dtype: Dtype,
}

impl Data {
    fn new(values: &[f32], dim: usize, dtype: Dtype) -> Data {
        let f16s: Vec<f16> = values.iter().map(|&x| f16::from_f32(x)).collect();
        let bf16s: Vec<bf16> = values.iter().map(|&x| bf16::from_f32(x)).collect();
        let f32s = match dtype {
            Dtype::F32 => values.to_vec(),
            Dtype::F16 => f16s.iter().map(|x| x.to_f32()).collect(),
            Dtype::Bf16 => bf16s.iter().map(|x| x.to_f32()).collect(),
        };
        Data {
            dim,
            f32s,
            f16s,
            bf16s,
            dtype,
        }
    }

    fn corpus(&self) -> Corpus<'_> {
        let v = match self.dtype {
            Dtype::F32 => Vectors::F32(&self.f32s),
            Dtype::F16 => Vectors::F16(&self.f16s),
            Dtype::Bf16 => Vectors::Bf16(&self.bf16s),
        };
        Corpus::new(v, self.dim).unwrap()
    }
}

/// (exact score, error bound, index) for every document, in reference order.
fn reference(data: &Data, q: &[f32]) -> Vec<(f64, f64, usize)> {
    let d = data.dim;
    let gamma = {
        let du = d as f64 * (f32::EPSILON as f64 / 2.0);
        du / (1.0 - du)
    };
    let mut all: Vec<(f64, f64, usize)> = data
        .f32s
        .chunks_exact(d)
        .enumerate()
        .map(|(i, c)| {
            let (mut s, mut a) = (0f64, 0f64);
            for (x, y) in q.iter().zip(c) {
                let p = *x as f64 * *y as f64;
                s += p;
                a += p.abs();
            }
            (s, gamma * a + 1e-30, i)
        })
        .collect();
    // Stable sort by score descending; equal scores keep index order.
    all.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap());
    all
}

fn check_against_reference(got: &[Hit], reference: &[(f64, f64, usize)], k: usize, what: &str) {
    let n = reference.len();
    assert_eq!(got.len(), k.min(n), "{what}: length");
    let max_tol = reference.iter().map(|r| r.1).fold(0.0, f64::max);
    let mut exact = vec![(0f64, 0f64); n];
    for &(s, t, i) in reference {
        exact[i] = (s, t);
    }
    for (j, h) in got.iter().enumerate() {
        let (s, t) = exact[h.index];
        assert!(
            (h.score as f64 - s).abs() <= t,
            "{what}: score of doc {} is {} but exactly {s} (bound {t})",
            h.index,
            h.score
        );
        if j > 0 {
            let p = got[j - 1];
            assert!(
                p.score > h.score || (p.score == h.score && p.index < h.index),
                "{what}: hits {j} and {} out of order",
                j - 1
            );
        }
        let sep_before = j == 0 || reference[j - 1].0 - reference[j].0 > 2.0 * max_tol;
        let sep_after = j + 1 >= n || reference[j].0 - reference[j + 1].0 > 2.0 * max_tol;
        if sep_before && sep_after {
            assert_eq!(
                h.index, reference[j].2,
                "{what}: wrong document at rank {j}"
            );
        }
    }
    // Nothing returned may be clearly worse than something left out.
    if let (Some(last), Some(out)) = (got.last(), reference.get(got.len())) {
        assert!(
            exact[last.index].0 >= out.0 - 2.0 * max_tol,
            "{what}: missed a better document"
        );
    }
}

fn queries(nq: usize, dim: usize, seed: u64) -> Vec<f32> {
    random_unit_vectors(nq, dim, seed)
}

#[test]
fn matches_brute_force_all_dtypes_sizes_and_k() {
    // n not a multiple of any block or tile size, n < k in most cases, and one case with
    // several shards and k < n.
    let shapes = [
        (1usize, 5usize),
        (13, 384),
        (1000, 33),
        (5003, 128),
        (20011, 24),
    ];
    let nq = 21; // not a multiple of the 16-query panel
    for &(n, dim) in &shapes {
        let values = random_unit_vectors(n, dim, n as u64);
        let qs = queries(nq, dim, 7 + n as u64);
        for dtype in [Dtype::F32, Dtype::F16, Dtype::Bf16] {
            let data = Data::new(&values, dim, dtype);
            let corpus = data.corpus();
            let refs: Vec<_> = qs.chunks_exact(dim).map(|q| reference(&data, q)).collect();
            for k in [1usize, 10, 100, 1000, 10000] {
                let batch = search_batch(&corpus, &qs, k).unwrap();
                assert_eq!(batch.len(), nq);
                for (qi, q) in qs.chunks_exact(dim).enumerate() {
                    let what = format!("n={n} d={dim} {dtype} k={k} q={qi}");
                    check_against_reference(&batch[qi], &refs[qi], k, &format!("batch {what}"));
                    let one = search_one(&corpus, q, k).unwrap();
                    assert_eq!(
                        one, batch[qi],
                        "search_one differs from search_batch: {what}"
                    );
                }
            }
        }
    }
}

#[test]
fn exact_ties_are_ordered_by_index() {
    let (n, dim) = (10_007usize, 48usize);
    let mut values = random_unit_vectors(n, dim, 3);
    // Row 5 duplicated at positions spread over every shard.
    let row5 = values[5 * dim..6 * dim].to_vec();
    let dups = [5usize, 6, 2500, 5003, 7777, 10_006];
    for &i in &dups {
        values[i * dim..(i + 1) * dim].copy_from_slice(&row5);
    }
    // More duplicates of another row, a mid-ranked one.
    let row9 = values[9 * dim..10 * dim].to_vec();
    for i in (100..n).step_by(997) {
        values[i * dim..(i + 1) * dim].copy_from_slice(&row9);
    }
    for dtype in [Dtype::F32, Dtype::F16, Dtype::Bf16] {
        let data = Data::new(&values, dim, dtype);
        let corpus = data.corpus();
        let q = data.f32s[5 * dim..6 * dim].to_vec();
        let hits = search_one(&corpus, &q, 6).unwrap();
        let idx: Vec<usize> = hits.iter().map(|h| h.index).collect();
        assert_eq!(idx, dups, "{dtype}");
        assert!(hits
            .windows(2)
            .all(|w| w[0].score.to_bits() == w[1].score.to_bits()));
        assert_eq!(search_batch(&corpus, &q, 6).unwrap()[0], hits);
        // The whole ranking: equal scores always in index order, both paths identical.
        let mut qs = q.clone();
        qs.extend_from_slice(&data.f32s[9 * dim..10 * dim]);
        let batch = search_batch(&corpus, &qs, n).unwrap();
        for (qi, q) in qs.chunks_exact(dim).enumerate() {
            assert_eq!(batch[qi].len(), n);
            for w in batch[qi].windows(2) {
                assert!(
                    w[0].score > w[1].score
                        || (w[0].score == w[1].score && w[0].index < w[1].index)
                );
            }
            assert_eq!(search_one(&corpus, q, n).unwrap(), batch[qi]);
        }
    }
    // All rows identical: the top k is exactly 0..k.
    let row = random_unit_vectors(1, dim, 11);
    let same: Vec<f32> = row.iter().cycle().take(5000 * dim).copied().collect();
    let corpus = Corpus::from_f32(&same, dim).unwrap();
    for k in [1, 10, 1000] {
        let want: Vec<usize> = (0..k).collect();
        let got: Vec<usize> = search_one(&corpus, &row, k)
            .unwrap()
            .iter()
            .map(|h| h.index)
            .collect();
        assert_eq!(got, want);
        let got: Vec<usize> = search_batch(&corpus, &row, k).unwrap()[0]
            .iter()
            .map(|h| h.index)
            .collect();
        assert_eq!(got, want);
    }
}

/// One scratch reused across corpora of other sizes, dimensions and types, and across k, gives
/// what a fresh search gives; a failed search leaves an empty list.
#[test]
fn reused_scratch_gives_fresh_results() {
    let mut scratch = OneQueryScratch::default();
    let mut out = vec![Hit {
        index: 9,
        score: 9.0,
    }];
    for (n, dim, dtype, seed) in [
        (20_000, 32, Dtype::F32, 1),
        (37, 19, Dtype::F16, 2),
        (9_000, 32, Dtype::Bf16, 3),
        (20_000, 8, Dtype::F32, 4),
    ] {
        let data = Data::new(&random_unit_vectors(n, dim, seed), dim, dtype);
        let corpus = data.corpus();
        let q = random_unit_vectors(1, dim, seed + 100);
        for k in [1, 10, 100, n + 5] {
            search_one_into(&corpus, &q, k, &mut scratch, &mut out).unwrap();
            assert_eq!(
                out,
                search_one(&corpus, &q, k).unwrap(),
                "n {n} dim {dim} k {k}"
            );
        }
        assert!(search_one_into(&corpus, &q, 0, &mut scratch, &mut out).is_err());
        assert!(out.is_empty());
    }
}

#[test]
fn results_do_not_depend_on_thread_count() {
    let (n, dim) = (30_011usize, 40usize);
    let values = random_unit_vectors(n, dim, 5);
    let qs = queries(37, dim, 6);
    let data = Data::new(&values, dim, Dtype::F16);
    let corpus = data.corpus();
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let batch = search_batch(&corpus, &qs, 50).unwrap();
            let one: Vec<Vec<Hit>> = qs
                .chunks_exact(dim)
                .map(|q| search_one(&corpus, q, 50).unwrap())
                .collect();
            (batch, one)
        })
    };
    let (b1, o1) = run(1);
    assert_eq!(b1, o1);
    for threads in [2, 3, 5, 8] {
        let (b, o) = run(threads);
        assert_eq!(b, b1, "batch with {threads} threads");
        assert_eq!(o, o1, "single with {threads} threads");
    }
}

#[test]
fn nan_scores_sort_last() {
    let dim = 4;
    let mut values = random_unit_vectors(9, dim, 8);
    values[3 * dim + 1] = f32::NAN;
    let corpus = Corpus::from_f32(&values, dim).unwrap();
    let q = random_unit_vectors(1, dim, 9);
    let all = search_one(&corpus, &q, 100).unwrap();
    assert_eq!(all.len(), 9);
    assert_eq!(all[8].index, 3);
    assert!(all[8].score.is_nan());
    assert_eq!(search_batch(&corpus, &q, 100).unwrap()[0].len(), 9);
    let top = search_batch(&corpus, &q, 8).unwrap();
    assert!(top[0].iter().all(|h| h.index != 3));
    assert_eq!(search_one(&corpus, &q, 8).unwrap(), top[0]);
}

#[test]
fn invalid_arguments_are_errors() {
    let dim = 8;
    let values = random_unit_vectors(50, dim, 1);
    let corpus = Corpus::from_f32(&values, dim).unwrap();
    let q = random_unit_vectors(2, dim, 2);
    let invalid = |r: Result<(), Error>| match r {
        Err(Error::InvalidArgument(m)) => m,
        other => panic!("expected InvalidArgument, got {other:?}"),
    };
    let m = invalid(search_one(&corpus, &q[..dim], 0).map(|_| ()));
    assert!(m.contains('k'), "{m}");
    invalid(search_batch(&corpus, &q, 0).map(|_| ()));
    let m = invalid(search_one(&corpus, &q[..5], 3).map(|_| ()));
    assert!(m.contains('5') && m.contains('8'), "{m}");
    let m = invalid(search_batch(&corpus, &q[..13], 3).map(|_| ()));
    assert!(m.contains("13") && m.contains('8'), "{m}");
    let mut bad = q.clone();
    bad[9] = f32::NAN;
    invalid(search_batch(&corpus, &bad, 3).map(|_| ()));
    invalid(search_one(&corpus, &bad[dim..], 3).map(|_| ()));
    invalid(Corpus::from_f32(&values[..13], dim).map(|_| ()));
    invalid(Corpus::from_f32(&values, 0).map(|_| ()));
    // Degenerate but valid.
    assert!(search_batch(&corpus, &[], 3).unwrap().is_empty());
    let empty = Corpus::from_f32(&[], dim).unwrap();
    assert_eq!(
        search_batch(&empty, &q, 3).unwrap(),
        vec![Vec::<Hit>::new(); 2]
    );
    assert!(search_one(&empty, &q[..dim], 3).unwrap().is_empty());
}

/// Non-unit, unnormalised data with a wide dynamic range, through a random order of corpora.
#[test]
fn unnormalised_data() {
    let (n, dim) = (3001usize, 77usize);
    let mut rng = Rng::new(42);
    let values: Vec<f32> = (0..n * dim)
        .map(|_| (rng.normal_pair().0 * 10f64.powi(rng.below(5) as i32 - 2)) as f32)
        .collect();
    let qs: Vec<f32> = (0..5 * dim).map(|_| rng.normal_pair().0 as f32).collect();
    let data = Data::new(&values, dim, Dtype::F32);
    let corpus = data.corpus();
    let batch = search_batch(&corpus, &qs, 64).unwrap();
    for (qi, q) in qs.chunks_exact(dim).enumerate() {
        check_against_reference(&batch[qi], &reference(&data, q), 64, "unnormalised");
        assert_eq!(search_one(&corpus, q, 64).unwrap(), batch[qi]);
    }
}

/// Throughput on the faiss IndexFlatIP workload: 200 000 random unit vectors of dimension 384,
/// 1 000 queries, k = 10; best of 5 runs (the host is shared, single runs vary by ±15%).
/// Run with `cargo test --release --test topk -- --ignored --nocapture timing`;
/// `TIMING_DTYPES=f32,f16,bf16` and `TIMING_K=10,1000` choose the cases.
#[test]
#[ignore]
fn timing_200k_x_384() {
    use std::time::Instant;
    let (n, dim, nq) = (200_000usize, 384usize, 1000usize);
    let list = |var: &str, default: &str| -> Vec<String> {
        let v = std::env::var(var).unwrap_or_else(|_| default.to_string());
        v.split(',').map(|s| s.trim().to_string()).collect()
    };
    let t = Instant::now();
    let values = random_unit_vectors(n, dim, 1);
    let qs = queries(nq, dim, 2);
    eprintln!("generate: {:.2}s", t.elapsed().as_secs_f64());
    let dir = tempfile::tempdir().unwrap();
    for dtype in list("TIMING_DTYPES", "f32,f16") {
        let dtype: Dtype = dtype.parse().unwrap();
        // Search the memory-mapped store, as the engine does.
        let path = dir.path().join(format!("bench-{dtype}.rrra"));
        let ids: Vec<String> = (0..n).map(|i| format!("doc{i}")).collect();
        let spec = StoreSpec {
            dim,
            dtype,
            normalized: true,
            fingerprint: 1,
            metadata_json: "{}".into(),
        };
        let t = Instant::now();
        write_store(&path, spec, &ids, &values).unwrap();
        let write_s = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let store = Store::open(&path).unwrap();
        let open_s = t.elapsed().as_secs_f64();
        let t = Instant::now();
        Store::open_unverified(&path).unwrap();
        eprintln!(
            "{dtype}: write_store {write_s:.2} s, open {open_s:.3} s, open_unverified {:.3} s",
            t.elapsed().as_secs_f64()
        );
        let corpus = store.corpus();
        for k in list("TIMING_K", "10") {
            let k: usize = k.parse().unwrap();
            search_batch(&corpus, &qs[..16 * dim], k).unwrap();
            let mut best_batch = f64::MAX;
            for _ in 0..5 {
                let t = Instant::now();
                let r = search_batch(&corpus, &qs, k).unwrap();
                best_batch = best_batch.min(t.elapsed().as_secs_f64());
                assert_eq!(r.len(), nq);
            }
            let mut best_one = f64::MAX;
            for _ in 0..5 {
                let t = Instant::now();
                for q in qs[..50 * dim].chunks_exact(dim) {
                    search_one(&corpus, q, k).unwrap();
                }
                best_one = best_one.min(t.elapsed().as_secs_f64() / 50.0);
            }
            eprintln!(
                "{dtype} {n}x{dim} k={k} threads={}: search_batch {:.0} queries/s ({:.3} s for {nq}), \
                 search_one {:.1} queries/s ({:.1} ms each)",
                rayon::current_num_threads(),
                nq as f64 / best_batch,
                best_batch,
                1.0 / best_one,
                best_one * 1e3
            );
        }
    }
}
