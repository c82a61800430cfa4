//! The GPU serving path (`RetrieverOptions::gpu`) against the CPU path, on the tiny random BERT
//! of the fixtures and the Cranfield documents: same lists with and without the adapter's
//! rerank, the same answers from 8 threads as from one, and CUDA graphs that change nothing.
//! Without a GPU each test skips with the reason.
//!
//! Tolerance: in f32 the GPU encoder differs from the CPU by summation order only (≲ 3e-6 on the
//! hidden states, see `device::encoder`), so scores differ by ≲ 1e-5. A list's k-th best score
//! moves by at most the largest perturbation, so the sorted score sequences are compared
//! position by position to 1e-4; ids may swap only where two scores are that close. A rerank
//! score `s/tau − LSE + lambda·log σ(logit)` carries the score error times 1/tau (20) and the
//! logit's times lambda, and a near-tie at the rerank depth can change the candidates, so rank
//! scores are compared to 1e-3 where both lists hold the same document, as in
//! tests/gpu_pipeline.rs.

mod common;

use rrra::data::beir::read_queries;
use rrra::device::encoder::Precision;
use rrra::device::retriever::GpuEngineOptions;
use rrra::retriever::{Hit, Retriever, RetrieverOptions};
use std::path::Path;

fn open(model: &Path, store: &Path, adapter: &Path, gpu: Option<GpuEngineOptions>) -> Retriever {
    Retriever::open(
        model,
        store,
        &RetrieverOptions {
            adapter: Some(adapter.to_path_buf()),
            gpu,
            ..Default::default()
        },
    )
    .unwrap()
}

fn f32_engine(graphs: bool) -> GpuEngineOptions {
    GpuEngineOptions {
        precision: Precision::F32,
        graphs,
        ..Default::default()
    }
}

/// Position-wise closeness of two ranked lists (see the module docs); returns how many
/// positions hold different documents.
fn compare(cpu: &[Hit], gpu: &[Hit], what: &str) -> usize {
    assert_eq!(cpu.len(), gpu.len(), "{what}: lengths");
    let mut swapped = 0;
    for (i, (c, g)) in cpu.iter().zip(gpu).enumerate() {
        assert!(
            (c.score - g.score).abs() <= 1e-4 || c.id != g.id,
            "{what}[{i}] {}: score {} vs {}",
            c.id,
            c.score,
            g.score
        );
        assert!(
            (c.rank_score - g.rank_score).abs() <= 1e-3 || c.id != g.id,
            "{what}[{i}]: rank score {} vs {}",
            c.rank_score,
            g.rank_score
        );
        match (c.adapter_p, g.adapter_p) {
            (None, None) => {}
            (Some(a), Some(b)) if c.id != g.id || (a - b).abs() <= 1e-4 => {}
            (a, b) => panic!("{what}[{i}]: adapter p {a:?} vs {b:?}"),
        }
        swapped += usize::from(c.id != g.id);
    }
    swapped
}

#[test]
fn the_gpu_path_gives_the_cpu_lists() {
    let Some(_gpu) = common::gpu_or_skip() else {
        return;
    };
    let t = common::tiny_cranfield();
    let queries = read_queries(&common::shared().join("data/cranfield/queries.jsonl")).unwrap();
    let texts: Vec<&str> = queries.iter().map(|q| q.text.as_str()).collect();
    let cpu = open(&t.model, &t.store, &t.adapter, None);
    let gpu = open(&t.model, &t.store, &t.adapter, Some(f32_engine(true)));
    assert!(gpu.on_gpu() && !cpu.on_gpu());
    for rerank in [false, true] {
        let want = cpu.retrieve_batch(&texts, 10, rerank).unwrap();
        let got = gpu.retrieve_batch(&texts, 10, rerank).unwrap();
        let mut swapped = 0;
        for ((q, w), g) in queries.iter().zip(&want).zip(&got) {
            swapped += compare(w, g, &format!("query {} rerank {rerank}", q.id));
        }
        // near-ties only: a few positions out of 2 250
        assert!(
            swapped <= 20,
            "{swapped} positions differ (rerank {rerank})"
        );
        // one query at a time (batch of one: the fixed-shape, graph-captured path)
        for (q, w) in texts.iter().zip(&want).take(20) {
            compare(w, &gpu.retrieve(q, 10, rerank).unwrap(), "single query");
        }
    }
}

#[test]
fn graphs_change_nothing_and_threads_agree() {
    let Some(_gpu) = common::gpu_or_skip() else {
        return;
    };
    let t = common::tiny_cranfield();
    let queries = read_queries(&common::shared().join("data/cranfield/queries.jsonl")).unwrap();
    let texts: Vec<&str> = queries.iter().map(|q| q.text.as_str()).collect();
    let eager = open(&t.model, &t.store, &t.adapter, Some(f32_engine(false)));
    let graphed = open(&t.model, &t.store, &t.adapter, Some(f32_engine(true)));
    // Twice: the first call of a shape captures its graph, the second replays it.
    let want = eager.encode(&texts[..40]).unwrap();
    for _ in 0..2 {
        for (i, q) in texts[..40].iter().enumerate() {
            let e = graphed.encode(&[q]).unwrap();
            let w = eager.encode(&[q]).unwrap();
            assert_eq!(e, w, "query {i}: graph replay differs from eager launches");
            // alone or in a batch of 40: cuBLAS may choose other kernels (another summation
            // order) for another token count, so f32 rounding apart, not bitwise (unit
            // vectors: 1e-5 per coordinate is ~100 roundings of the largest coordinate)
            let row = &want[i * w.len()..(i + 1) * w.len()];
            let gap = w
                .iter()
                .zip(row)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(gap <= 1e-5, "query {i}: alone vs batched, max |Δ| {gap}");
        }
    }
    // 8 threads × all queries one by one on one shared retriever = the sequential answers.
    let sequential: Vec<Vec<Hit>> = texts
        .iter()
        .map(|q| graphed.retrieve(q, 10, true).unwrap())
        .collect();
    std::thread::scope(|s| {
        for t in 0..8 {
            let (graphed, texts, sequential) = (&graphed, &texts, &sequential);
            s.spawn(move || {
                for i in (t..texts.len()).step_by(3) {
                    let hits = graphed.retrieve(texts[i], 10, true).unwrap();
                    assert_eq!(hits, sequential[i], "thread {t}, query {i}");
                }
            });
        }
    });
}

#[test]
fn gpu_errors_are_typed() {
    let Some(_gpu) = common::gpu_or_skip() else {
        return;
    };
    let t = common::tiny_cranfield();
    let bad = Retriever::open(
        &t.model,
        &t.store,
        &RetrieverOptions {
            gpu: Some(GpuEngineOptions {
                workers: 0,
                ..Default::default()
            }),
            ..Default::default()
        },
    );
    assert!(matches!(bad, Err(rrra::Error::InvalidArgument(_))));
    let r = Retriever::open(
        &t.model,
        &t.store,
        &RetrieverOptions {
            gpu: Some(Default::default()),
            ..Default::default()
        },
    )
    .unwrap();
    assert!(
        r.retrieve("a wing", 10, true).is_err(),
        "rerank without adapter"
    );
    assert_eq!(r.retrieve("a wing", 0, false).unwrap(), vec![]);
    assert_eq!(r.retrieve("a wing", 5000, false).unwrap().len(), 1400);
}
