//! The retrieval pipeline on a GPU (`pipeline::encode_corpus_on_gpu`,
//! `retriever::search_on_gpu` and `pipeline::rerank_run_on`, what `rrra encode`, `rrra search`
//! and `rrra rerank` run with `--device cuda`) against the CPU pipeline, on the tiny random BERT
//! of the fixtures and Cranfield. Skips without a GPU.
//!
//! Tolerances, and why: with f32 arithmetic the GPU encoder differs from the CPU's by summation
//! order only (≲ 1e-6 relative per coordinate; 1e-4 of 1 + |x| leaves room), and scores by the
//! same, so each position's score agrees to 1e-4 and documents swap places only at near-ties
//! (as in tests/gpu_retriever.rs). A rerank score is `s/tau − LSE + lambda·log σ(logit)`: a
//! 1e-5 score error grows to 2e-4 through 1/tau (0.05), and the adapter logit's
//! 2e-5·(1 + |beta|) (beta 10, the serving kernel's bound) doubles through lambda (2), so
//! rerank scores are compared to 1e-3.

mod common;

use rrra::adapter::file::AdapterFile;
use rrra::data::beir::read_beir_folder;
use rrra::data::Run;
use rrra::device::encoder::Precision;
use rrra::index::store::Store;
use rrra::index::Dtype;
use rrra::model::{Encoder, EncoderOptions};
use rrra::pipeline::{self, GpuOptions};

/// Position by position: the same queries and list lengths, scores within `tol`, and at most
/// `max_swaps` positions holding another document.
fn assert_runs_match(want: &Run, got: &Run, tol: f64, max_swaps: usize, what: &str) {
    let (w, g): (Vec<_>, Vec<_>) = (want.iter().collect(), got.iter().collect());
    assert_eq!(w.len(), g.len(), "{what}: queries");
    let mut swapped = 0;
    for ((q, wl), (gq, gl)) in w.iter().zip(&g) {
        assert_eq!(q, gq, "{what}: query order");
        assert_eq!(wl.len(), gl.len(), "{what}: query {q}");
        for (i, (x, y)) in wl.iter().zip(gl.iter()).enumerate() {
            assert!(
                (x.1 - y.1).abs() <= tol,
                "{what}: query {q} [{i}]: cpu {} {} vs gpu {} {}",
                x.0,
                x.1,
                y.0,
                y.1
            );
            swapped += usize::from(x.0 != y.0);
        }
    }
    assert!(swapped <= max_swaps, "{what}: {swapped} positions differ");
}

#[test]
fn encode_and_search_on_the_gpu_match_the_cpu() {
    let Some(_gpu) = common::gpu_or_skip() else {
        return;
    };
    let t = common::tiny_cranfield();
    let data = read_beir_folder(&common::shared().join("data/cranfield"), "test").unwrap();
    let encoder = Encoder::load(&t.model, &EncoderOptions::default()).unwrap();
    let f32_gpu = GpuOptions {
        ordinal: 0,
        precision: Precision::F32,
        batch_size: 32,
    };

    // encode: the CPU store's vectors (tiny_cranfield encoded it on the CPU)
    let gpu_store = t.dir.path().join("gpu.store");
    pipeline::encode_corpus_on_gpu(
        &encoder,
        &data.corpus,
        &gpu_store,
        Dtype::F32,
        &f32_gpu,
        &|_| {},
    )
    .unwrap();
    let (cpu, gpu) = (
        Store::open(&t.store).unwrap(),
        Store::open(&gpu_store).unwrap(),
    );
    assert_eq!((cpu.len(), cpu.dim()), (gpu.len(), gpu.dim()));
    assert_eq!(cpu.fingerprint(), gpu.fingerprint());
    let (mut c, mut g) = (vec![0.0f32; cpu.dim()], vec![0.0f32; cpu.dim()]);
    for i in 0..cpu.len() {
        assert_eq!(cpu.id(i), gpu.id(i));
        cpu.row_f32(i, &mut c).unwrap();
        gpu.row_f32(i, &mut g).unwrap();
        for (x, y) in c.iter().zip(&g) {
            assert!(
                (x - y).abs() <= 1e-4 * (1.0 + x.abs()),
                "row {i}: {x} vs {y}"
            );
        }
    }

    // search, then the adapter's rerank of the top k, against the CPU's
    let queries: Vec<_> = data
        .queries
        .iter()
        .filter(|q| data.qrels.get(&q.id).is_some())
        .cloned()
        .collect();
    let k = 10;
    let want = pipeline::search(&encoder, &cpu, &queries, k, 32, &|_| {}).unwrap();
    let got =
        rrra::retriever::search_on_gpu(&t.model, &t.store, &queries, k, None, &f32_gpu, &|_| {})
            .unwrap();
    assert_runs_match(&want, &got, 1e-4, 20, "search");
    let adapter = AdapterFile::load(&t.adapter).unwrap();
    let want_rr =
        pipeline::rerank_run(&encoder, &cpu, &queries, &want, &t.store, &adapter, k).unwrap();
    let got_rr = rrra::retriever::search_on_gpu(
        &t.model,
        &t.store,
        &queries,
        k,
        Some(&t.adapter),
        &f32_gpu,
        &|_| {},
    )
    .unwrap();
    assert_runs_match(&want_rr, &got_rr, 1e-3, 20, "rerank");

    // a run's rerank on the GPU (`rrra rerank --device cuda`), lists of uneven lengths so that
    // runs of equal lengths are scored together and the length changes between them
    let mut uneven = Run::new();
    for (i, (q, list)) in want.iter().enumerate() {
        let keep = [k, k, 3, 3, 3, 1, k][i % 7];
        uneven.add_query(q, list[..keep].to_vec()).unwrap();
    }
    let want_rr =
        pipeline::rerank_run(&encoder, &cpu, &queries, &uneven, &t.store, &adapter, k).unwrap();
    let got_rr = pipeline::rerank_run_on(
        &encoder,
        &cpu,
        &queries,
        &uneven,
        &t.store,
        &adapter,
        k,
        Some(&f32_gpu),
    )
    .unwrap();
    assert_runs_match(&want_rr, &got_rr, 1e-3, 20, "rerank of a run");

    // bf16, the default on a GPU, end to end: the same queries and depths
    let bf16 = GpuOptions {
        precision: Precision::Bf16,
        ..f32_gpu
    };
    let got = rrra::retriever::search_on_gpu(&t.model, &t.store, &queries, k, None, &bf16, &|_| {})
        .unwrap();
    assert_eq!(got.queries().count(), want.queries().count());
    assert!(got.iter().all(|(_, hits)| hits.len() == k));
}
