//! The library API (`rrra::retriever`) on the tiny random BERT of the fixtures and the
//! Cranfield documents: it agrees with the batch pipeline (search, rerank), it gives the same
//! answers from many threads as from one, and bad inputs are typed errors.

mod common;

use rrra::adapter::calibrate::FnCalibration;
use rrra::adapter::file::AdapterFile;
use rrra::adapter::fit::AdapterTrainConfig;
use rrra::adapter::AdapterParams;
use rrra::data::beir::read_queries;
use rrra::model::Encoder;
use rrra::pipeline;
use rrra::retriever::{Hit, Retriever, RetrieverOptions};
use std::path::{Path, PathBuf};

struct Setup {
    _dir: tempfile::TempDir,
    model: PathBuf,
    store: PathBuf,
    adapter: PathBuf,
    queries: Vec<rrra::data::beir::Query>,
}

/// A store of the Cranfield documents encoded by tiny-bert, and a random adapter (W2 non-zero,
/// so the rerank moves documents).
fn setup() -> Setup {
    let common::TinyCranfield {
        dir,
        model,
        store,
        adapter,
    } = common::tiny_cranfield();
    let data = common::shared().join("data/cranfield");
    let queries = read_queries(&data.join("queries.jsonl")).unwrap();
    Setup {
        _dir: dir,
        model,
        store,
        adapter,
        queries,
    }
}

fn open(s: &Setup, adapter: Option<&Path>) -> rrra::Result<Retriever> {
    Retriever::open(
        &s.model,
        &s.store,
        &RetrieverOptions {
            adapter: adapter.map(Path::to_path_buf),
            ..Default::default()
        },
    )
}

fn ids(hits: &[Hit]) -> Vec<&str> {
    hits.iter().map(|h| h.id.as_str()).collect()
}

#[test]
fn agrees_with_the_pipeline_and_is_thread_safe() {
    let s = setup();
    let r = open(&s, Some(&s.adapter)).unwrap();
    assert!(r.has_adapter() && r.len() == 1400);
    let texts: Vec<&str> = s.queries.iter().map(|q| q.text.as_str()).collect();

    // Without the rerank: the pipeline's search, same documents, same order.
    let store = rrra::index::Store::open(&s.store).unwrap();
    let enc = Encoder::load(&s.model, &pipeline::store_encoder_options(&store)).unwrap();
    let run = pipeline::search(&enc, &store, &s.queries, 100, 32, &|_| {}).unwrap();
    let plain = r.retrieve_batch(&texts, 10, false).unwrap();
    for (q, hits) in s.queries.iter().zip(&plain) {
        let want: Vec<&str> = run.get(&q.id).unwrap()[..10]
            .iter()
            .map(|(d, _)| d.as_str())
            .collect();
        assert_eq!(ids(hits), want, "query {}", q.id);
        assert!(hits.iter().all(|h| h.adapter_p.is_none()));
    }

    // With the rerank: the pipeline's rerank of the top 100.
    let file = AdapterFile::load(&s.adapter).unwrap();
    let reranked =
        pipeline::rerank_run(&enc, &store, &s.queries, &run, &s.store, &file, 100).unwrap();
    let rr = r.retrieve_batch(&texts, 10, true).unwrap();
    let mut moved = 0;
    for ((q, hits), base) in s.queries.iter().zip(&rr).zip(&plain) {
        let want: Vec<&str> = reranked.get(&q.id).unwrap()[..10]
            .iter()
            .map(|(d, _)| d.as_str())
            .collect();
        assert_eq!(ids(hits), want, "query {}", q.id);
        assert!(hits
            .iter()
            .all(|h| h.adapter_p.is_some_and(|p| (0.0..=1.0).contains(&p))));
        moved += (ids(hits) != ids(base)) as usize;
    }
    assert!(moved > 0, "the rerank never changed a list");

    // One at a time agrees with the batch: same documents in the same order, scores equal to
    // float rounding (a lone query takes the few-row GEMM, a batch the packed one: another
    // summation order, ~1e-7 apart).
    let alone: Vec<[Vec<Hit>; 2]> = texts
        .iter()
        .map(|t| [false, true].map(|rerank| r.retrieve(t, 10, rerank).unwrap()))
        .collect();
    for (i, [p, q]) in alone.iter().enumerate() {
        for (got, want) in [(p, &plain[i]), (q, &rr[i])] {
            assert_eq!(ids(got), ids(want), "query {i}");
            for (g, w) in got.iter().zip(want) {
                assert!(
                    (g.score - w.score).abs() < 1e-5,
                    "query {i}: {g:?} vs {w:?}"
                );
            }
        }
    }

    // 8 threads, each answering every query, share one retriever: the sequential answers,
    // bit for bit.
    std::thread::scope(|scope| {
        for t in 0..8 {
            let (r, texts, alone) = (&r, &texts, &alone);
            scope.spawn(move || {
                for i in (0..texts.len()).map(|i| (i * 7 + t) % texts.len()) {
                    let rerank = (i + t) % 2 == 0;
                    let got = r.retrieve(texts[i], 10, rerank).unwrap();
                    assert_eq!(got, alone[i][rerank as usize], "query {i}");
                }
            });
        }
    });
}

#[test]
fn edge_cases_and_bad_inputs_are_defined() {
    let s = setup();
    let r = open(&s, None).unwrap();
    assert!(r.retrieve("lift", 0, false).unwrap().is_empty());
    assert_eq!(r.retrieve("lift", 5000, false).unwrap().len(), 1400);
    assert!(r.retrieve_batch(&[], 10, false).unwrap().is_empty());
    assert!(r.retrieve("", 3, false).unwrap().len() == 3);
    // the rerank needs an adapter
    let e = r.retrieve("lift", 10, true).unwrap_err();
    assert!(e.to_string().contains("without an adapter"), "{e}");
    // an adapter of another dimension names its file
    let wrong = s.adapter.with_file_name("wrong.safetensors");
    AdapterFile {
        params: AdapterParams::init(r.dim() + 1, 4, 1).unwrap(),
        calibration: FnCalibration::default(),
        lambda_rr: 1.0,
        tau: 0.05,
        train_config: AdapterTrainConfig::default(),
        info: serde_json::json!({}),
    }
    .save(&wrong)
    .unwrap();
    let e = open(&s, Some(&wrong)).unwrap_err();
    assert!(e.to_string().contains("wrong.safetensors"), "{e}");
    // a store that is not a store, a model folder that is not a model
    let junk = s.store.with_file_name("junk.store");
    std::fs::write(&junk, b"not a store").unwrap();
    assert!(Retriever::open(&s.model, &junk, &RetrieverOptions::default()).is_err());
    let e = Retriever::open(&junk, &s.store, &RetrieverOptions::default()).unwrap_err();
    assert!(!e.to_string().is_empty());
    let zero = RetrieverOptions {
        batch_size: 0,
        ..Default::default()
    };
    assert!(Retriever::open(&s.model, &s.store, &zero).is_err());
}
