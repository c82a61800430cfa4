//! GPU exact top-k against the CPU reference (`search_batch`).
//!
//! Every scoring path is covered: the SIMT streaming kernel (1 and 7 queries; 20 f32 queries in
//! three passes), the tensor-core kernel for f16/bf16 and the FP32 tiled kernel for f32 (64 and
//! 300 queries, the latter in batches of 128), with dimensions whose rows are (384, 768) and are
//! not (99, 100) a multiple of 16 bytes, and corpora whose row counts leave partial chunks and
//! tiles. Scores are compared within the tolerance `CpuCheck` derives (summation order only);
//! exact ties come from duplicated rows, whose scores are bit-identical on both sides, so there
//! the GPU must return exactly the CPU's rows. Without a GPU every test skips (and fails if
//! `RRRA_REQUIRE_GPU` is set).

mod common;

use half::{bf16, f16};
use rrra::device::topk::{CpuCheck, GpuCorpus, GpuSearcher, MAX_K};
use rrra::device::{cuda_compiled, kernel_module, Gpu};
use rrra::index::synthetic::{random_unit_vectors, Rng};
use rrra::index::{search_batch, Corpus, Dtype, Hit, Vectors};
use rrra::Error;

/// A corpus in one dtype, owned.
struct Data {
    dim: usize,
    dtype: Dtype,
    f32s: Vec<f32>,
    f16s: Vec<f16>,
    bf16s: Vec<bf16>,
}

impl Data {
    fn new(values: Vec<f32>, dim: usize, dtype: Dtype) -> Data {
        let (mut f16s, mut bf16s, mut f32s) = (Vec::new(), Vec::new(), Vec::new());
        match dtype {
            Dtype::F32 => f32s = values,
            Dtype::F16 => f16s = values.iter().map(|&x| f16::from_f32(x)).collect(),
            Dtype::Bf16 => bf16s = values.iter().map(|&x| bf16::from_f32(x)).collect(),
        }
        Data {
            dim,
            dtype,
            f32s,
            f16s,
            bf16s,
        }
    }

    fn random(rows: usize, dim: usize, dtype: Dtype, seed: u64) -> Data {
        Data::new(random_unit_vectors(rows, dim, seed), dim, dtype)
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

/// The CPU's top `k` from its top `kmax` (the order is total, so a prefix is the smaller top k).
fn prefix(lists: &[Vec<Hit>], k: usize) -> Vec<Vec<Hit>> {
    lists.iter().map(|h| h[..k.min(h.len())].to_vec()).collect()
}

/// GPU (resident) against CPU for every query count and k.
fn check_matrix(
    gpu: &Gpu,
    data: &Data,
    query_counts: &[usize],
    ks: &[usize],
    chunk_rows: usize,
    query_scale: f32,
) {
    let corpus = data.corpus();
    let on_gpu = GpuCorpus::upload(gpu, &corpus).unwrap();
    let check = CpuCheck::new(&corpus);
    let mut searcher = GpuSearcher::new(gpu, 128, MAX_K, chunk_rows).unwrap();
    let kmax = *ks.iter().max().unwrap();
    for &nq in query_counts {
        let mut queries = random_unit_vectors(nq, data.dim, 1000 + nq as u64);
        queries.iter_mut().for_each(|x| *x *= query_scale);
        let cpu = search_batch(&corpus, &queries, kmax).unwrap();
        for &k in ks {
            let got = searcher.search(&on_gpu, &queries, k).unwrap();
            check
                .compare(&queries, &got, &prefix(&cpu, k))
                .unwrap_or_else(|e| {
                    panic!(
                        "{} x {} {}, {nq} queries (x{query_scale}), k {k}: {e}",
                        corpus.len(),
                        data.dim,
                        data.dtype
                    )
                });
        }
    }
}

const QUERY_COUNTS: [usize; 5] = [1, 7, 20, 64, 300];
const KS: [usize; 5] = [1, 10, 100, 2048, 10_000];

#[test]
fn f32_matches_cpu() {
    let Some(gpu) = common::gpu_or_skip() else {
        return;
    };
    let data = Data::random(100_003, 384, Dtype::F32, 1);
    check_matrix(&gpu, &data, &QUERY_COUNTS, &KS, 40_000, 1.0);
    // 99 floats per row: neither the SIMT kernel's nor the tiled kernel's vector loads apply.
    let data = Data::random(30_011, 99, Dtype::F32, 2);
    check_matrix(&gpu, &data, &[1, 7, 64], &[10, 2048], 40_000, 1.0);
}

#[test]
fn bf16_matches_cpu() {
    let Some(gpu) = common::gpu_or_skip() else {
        return;
    };
    let data = Data::random(100_003, 768, Dtype::Bf16, 3);
    check_matrix(&gpu, &data, &QUERY_COUNTS, &KS, 40_000, 1.0);
    // 200-byte rows: scalar loads in both the SIMT and the tensor-core kernels.
    let data = Data::random(30_011, 100, Dtype::Bf16, 4);
    check_matrix(&gpu, &data, &[1, 7, 64], &[10, 2048], 40_000, 1.0);
}

#[test]
fn f16_matches_cpu() {
    let Some(gpu) = common::gpu_or_skip() else {
        return;
    };
    let data = Data::random(100_003, 384, Dtype::F16, 5);
    check_matrix(&gpu, &data, &QUERY_COUNTS, &KS, 40_000, 1.0);
    // The tensor path scales each query by a power of two into f16 range: large and small ones.
    check_matrix(&gpu, &data, &[64], &[100], 40_000, 1e3);
    check_matrix(&gpu, &data, &[64], &[100], 40_000, 1e-3);
    let data = Data::random(30_011, 100, Dtype::F16, 6);
    check_matrix(&gpu, &data, &[1, 7, 64], &[10, 2048], 40_000, 1.0);
}

/// Duplicated rows score bit-identically on both sides, so the GPU must return exactly the CPU's
/// rows: within a run of equal scores, the lowest indices, in ascending order.
#[test]
fn exact_ties_are_ordered_by_index() {
    let Some(gpu) = common::gpu_or_skip() else {
        return;
    };
    let (dim, distinct, rows) = (16, 12, 40_000);
    let pool = random_unit_vectors(distinct, dim, 7);
    let mut rng = Rng::new(8);
    let mut values = Vec::with_capacity(rows * dim);
    let mut which = Vec::with_capacity(rows);
    for _ in 0..rows {
        let j = rng.below(distinct);
        which.push(j);
        values.extend_from_slice(&pool[j * dim..(j + 1) * dim]);
    }
    for dtype in [Dtype::F32, Dtype::F16, Dtype::Bf16] {
        let data = Data::new(values.clone(), dim, dtype);
        let corpus = data.corpus();
        let on_gpu = GpuCorpus::upload(&gpu, &corpus).unwrap();
        let check = CpuCheck::new(&corpus);
        let mut searcher = GpuSearcher::new(&gpu, 64, MAX_K, 16_384).unwrap();
        // The distinct rows as stored (after rounding to the dtype).
        let mut distinct_rows = vec![0f32; distinct * dim];
        for (j, r) in distinct_rows.chunks_mut(dim).enumerate() {
            let i = which
                .iter()
                .position(|&w| w == j)
                .expect("every row occurs");
            corpus.vectors.to_f32(i * dim, r);
        }
        // Only queries whose distinct scores are far apart compared to any rounding (1e-4 vs
        // ~1e-6 at most): both sides then rank the groups alike, and only the tie rule decides
        // within a group.
        let separated = |q: &[f32]| {
            let mut s: Vec<f64> = distinct_rows
                .chunks(dim)
                .map(|r| r.iter().zip(q).map(|(a, b)| *a as f64 * *b as f64).sum())
                .collect();
            s.sort_by(|a, b| a.total_cmp(b));
            s.windows(2).all(|w| w[1] - w[0] > 1e-4)
        };
        for nq in [1, 7, 64] {
            let mut queries = Vec::with_capacity(nq * dim);
            let mut seed = 100;
            while queries.len() < nq * dim {
                let q = random_unit_vectors(1, dim, seed);
                seed += 1;
                if separated(&q) {
                    queries.extend_from_slice(&q);
                }
            }
            let cpu = search_batch(&corpus, &queries, MAX_K).unwrap();
            for k in [1, 10, 1000, 5000, MAX_K] {
                let got = searcher.search(&on_gpu, &queries, k).unwrap();
                let want = prefix(&cpu, k);
                check.compare(&queries, &got, &want).unwrap();
                for (qi, (g, c)) in got.iter().zip(&want).enumerate() {
                    let gi: Vec<usize> = g.iter().map(|h| h.index).collect();
                    let ci: Vec<usize> = c.iter().map(|h| h.index).collect();
                    if gi != ci {
                        // Tell a tie-rule bug from duplicates that did not score identically.
                        let same_group_differs = g.windows(2).find(|w| {
                            which[w[0].index] == which[w[1].index] && w[0].score != w[1].score
                        });
                        panic!(
                            "{dtype}, {nq} queries, k {k}, query {qi}: rows differ from the CPU \
                             (duplicate rows scored differently: {same_group_differs:?})"
                        );
                    }
                }
            }
        }
    }
}

/// Like `search_batch`, k beyond the corpus size returns every row; other misuse is an error.
#[test]
fn k_beyond_the_corpus_and_invalid_arguments() {
    let Some(gpu) = common::gpu_or_skip() else {
        return;
    };
    let data = Data::random(50, 32, Dtype::F32, 11);
    let corpus = data.corpus();
    let on_gpu = GpuCorpus::upload(&gpu, &corpus).unwrap();
    let mut searcher = GpuSearcher::new(&gpu, 8, 100, 1000).unwrap();
    let queries = random_unit_vectors(3, 32, 12);
    for k in [50, 100, 1_000_000] {
        let got = searcher.search(&on_gpu, &queries, k).unwrap();
        let want = search_batch(&corpus, &queries, k).unwrap();
        assert!(got.iter().all(|h| h.len() == 50));
        CpuCheck::new(&corpus)
            .compare(&queries, &got, &want)
            .unwrap();
        let streamed = searcher.search_streamed(&corpus, &queries, k).unwrap();
        assert_eq!(streamed, got);
    }
    assert!(searcher.search(&on_gpu, &[], 10).unwrap().is_empty());

    let invalid = |r: rrra::Result<Vec<Vec<Hit>>>| matches!(r, Err(Error::InvalidArgument(_)));
    assert!(invalid(searcher.search(&on_gpu, &queries, 0)));
    assert!(invalid(searcher.search(&on_gpu, &queries[..40], 5)));
    let mut bad = queries.clone();
    bad[7] = f32::NAN;
    assert!(invalid(searcher.search(&on_gpu, &bad, 5)));
    assert!(invalid(searcher.search_streamed(&corpus, &bad, 5)));
    assert!(invalid(searcher.search_streamed(&corpus, &queries, 0)));

    // k above max_k (after clamping to the corpus) is refused, like k above MAX_K anywhere.
    let big = Data::random(20_000, 32, Dtype::Bf16, 13);
    let big_gpu = GpuCorpus::upload(&gpu, &big.corpus()).unwrap();
    assert!(invalid(searcher.search(&big_gpu, &queries, 101)));
    let mut wide = GpuSearcher::new(&gpu, 8, MAX_K, 4096).unwrap();
    assert!(invalid(wide.search(&big_gpu, &queries, MAX_K + 1)));
    assert_eq!(
        wide.search(&big_gpu, &queries, MAX_K).unwrap()[0].len(),
        MAX_K
    );

    assert!(matches!(
        GpuSearcher::new(&gpu, 8, MAX_K + 1, 1000),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        GpuSearcher::new(&gpu, 0, 10, 1000),
        Err(Error::InvalidArgument(_))
    ));
    let empty = Corpus::new(Vectors::F32(&[]), 32).unwrap();
    assert!(matches!(
        GpuCorpus::upload(&gpu, &empty),
        Err(Error::InvalidArgument(_))
    ));
    assert!(invalid(searcher.search_streamed(&empty, &queries, 5)));
}

/// The streamed path (host corpus, chunks through pinned buffers) gives the resident path's
/// results: bit for bit on the SIMT kernel (a row's score does not depend on how the rows were
/// chunked), within the CPU tolerance everywhere.
#[test]
fn streamed_equals_resident() {
    let Some(gpu) = common::gpu_or_skip() else {
        return;
    };
    for (dtype, dim) in [(Dtype::Bf16, 384), (Dtype::F32, 99)] {
        let data = Data::random(100_003, dim, dtype, 21);
        let corpus = data.corpus();
        let on_gpu = GpuCorpus::upload(&gpu, &corpus).unwrap();
        let check = CpuCheck::new(&corpus);
        // 30 000-row transfers: four uploads, the last one partial, both staging buffers reused.
        let mut searcher = GpuSearcher::new(&gpu, 64, MAX_K, 30_000).unwrap();
        for nq in [1, 7, 64] {
            let queries = random_unit_vectors(nq, dim, 22 + nq as u64);
            let cpu = search_batch(&corpus, &queries, 2048).unwrap();
            for k in [100, 2048] {
                let resident = searcher.search(&on_gpu, &queries, k).unwrap();
                let streamed = searcher.search_streamed(&corpus, &queries, k).unwrap();
                check
                    .compare(&queries, &streamed, &prefix(&cpu, k))
                    .unwrap_or_else(|e| panic!("{dtype} streamed, {nq} queries, k {k}: {e}"));
                if nq <= 8 {
                    assert_eq!(streamed, resident, "{dtype}, {nq} queries, k {k}");
                }
            }
        }
    }
}

/// Every buffer is allocated up front (or by the first search of a dimension): later searches,
/// resident or streamed, allocate nothing. The searcher counts its allocations.
#[test]
fn repeated_searches_do_not_allocate() {
    let Some(gpu) = common::gpu_or_skip() else {
        return;
    };
    let data = Data::random(50_000, 256, Dtype::Bf16, 31);
    let corpus = data.corpus();
    let on_gpu = GpuCorpus::upload(&gpu, &corpus).unwrap();
    let mut searcher = GpuSearcher::new(&gpu, 64, 1000, 20_000).unwrap();
    searcher.reserve(256).unwrap();
    let after_reserve = searcher.device_allocations();
    let q1 = random_unit_vectors(1, 256, 32);
    let q64 = random_unit_vectors(64, 256, 33);
    let first = searcher.search(&on_gpu, &q64, 1000).unwrap();
    searcher.search(&on_gpu, &q1, 10).unwrap();
    assert_eq!(searcher.device_allocations(), after_reserve);
    assert_eq!(searcher.search(&on_gpu, &q64, 1000).unwrap(), first);
    assert_eq!(searcher.device_allocations(), after_reserve);

    searcher.search_streamed(&corpus, &q64, 1000).unwrap();
    let after_streaming = searcher.device_allocations();
    assert!(after_streaming > after_reserve, "staging is allocated once");
    for _ in 0..2 {
        searcher.search_streamed(&corpus, &q1, 100).unwrap();
    }
    assert_eq!(searcher.device_allocations(), after_streaming);
}

/// Build-time check (no GPU needed): every kernel the searcher loads was compiled for sm_90, and
/// ptxas spilled nothing in any of them.
#[test]
fn topk_kernels_compile_without_spills() {
    if !cuda_compiled() {
        eprintln!("skipped: built without nvcc (CPU-only build)");
        return;
    }
    let report = kernel_module("topk").expect("topk module").ptxas_report;
    let mut names: Vec<String> = ["f32", "f16", "bf16"]
        .iter()
        .flat_map(|d| [1, 4, 8].map(|q| format!("rrra_topk_score_{d}_q{q}")))
        .collect();
    names.extend(
        [
            "rrra_topk_score_tc_f16",
            "rrra_topk_score_tc_bf16",
            "rrra_topk_split_queries_f16",
            "rrra_topk_split_queries_bf16",
            "rrra_topk_score_f32_gemm",
            "rrra_topk_transpose_queries",
            "rrra_topk_select",
            "rrra_topk_sort",
            "rrra_topk_synth_f32",
            "rrra_topk_synth_f16",
            "rrra_topk_synth_bf16",
        ]
        .map(String::from),
    );
    for name in &names {
        let entry = format!("Compiling entry function '{name}' for 'sm_90'");
        assert!(report.contains(&entry), "{name} missing:\n{report}");
    }
    let spills: Vec<&str> = report
        .lines()
        .filter(|l| l.contains("spill") && !l.contains("0 bytes spill stores, 0 bytes spill loads"))
        .collect();
    assert!(spills.is_empty(), "spills: {spills:?}\n{report}");
}

/// The benchmark table, on demand (about half a minute on an H200):
/// `cargo test --release --test gpu_topk -- --ignored --nocapture`.
#[test]
#[ignore]
fn bench_table() {
    let Some(gpu) = common::gpu_or_skip() else {
        return;
    };
    let rows = rrra::device::topk::bench(&gpu).unwrap();
    println!("{}", gpu.info());
    for t in &rows {
        println!(
            "{:<44} {:<44} {:>9.3} ms {:>8.1} GB/s {:>7.2} TFLOP/s",
            t.name,
            t.shape,
            t.ms,
            t.bytes / t.ms / 1e6,
            t.flops / t.ms / 1e9
        );
    }
    println!("{}", serde_json::to_string(&rows).unwrap());
}
