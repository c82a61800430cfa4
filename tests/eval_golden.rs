//! Our metrics against pytrec_eval: per-query values on a small fixture with ties and graded
//! judgements, and the mean metrics of a real SciFact run.

use rrra::data::{read_qrels, read_run};
use rrra::eval::{evaluate, EvalOptions};
use std::path::PathBuf;

fn shared() -> PathBuf {
    std::env::var("RRRA_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared")))
}

/// pytrec_eval measure name → our metric key.
fn our_key(name: &str) -> String {
    match name {
        "recip_rank" => "mrr".to_owned(),
        _ => {
            let (family, k) = name
                .rsplit_once('_')
                .unwrap_or_else(|| panic!("unexpected measure {name}"));
            let ours = match family {
                "P" => "p",
                "ndcg_cut" => "ndcg",
                "map_cut" => "map",
                "recall" => "recall",
                other => panic!("unexpected measure family {other}"),
            };
            format!("{ours}@{k}")
        }
    }
}

fn load_json(path: &std::path::Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

#[test]
fn per_query_metrics_match_pytrec_eval() {
    let dir = shared().join("fixtures/metrics");
    let run = read_run(&dir.join("run.trec")).unwrap();
    let qrels = read_qrels(&dir.join("qrels.tsv")).unwrap();
    let golden = load_json(&dir.join("pytrec_eval.json"));
    let golden = golden["per_query"].as_object().unwrap();

    let eval = evaluate(&run, &qrels, &EvalOptions::default());
    // trec_eval lists exactly the queries that are judged and in the run.
    let ours: Vec<&String> = eval.per_query.keys().collect();
    let theirs: Vec<&String> = golden.keys().collect();
    assert_eq!(ours, theirs);

    let mut checked = 0;
    for (qid, measures) in golden {
        let got = &eval.per_query[qid];
        for (name, want) in measures.as_object().unwrap() {
            let want = want.as_f64().unwrap();
            let key = our_key(name);
            let have = *got
                .get(&key)
                .unwrap_or_else(|| panic!("{qid}: no metric {key}"));
            assert!(
                (have - want).abs() <= 1e-9,
                "{qid} {name} ({key}): ours {have}, pytrec_eval {want}"
            );
            checked += 1;
        }
    }
    assert!(checked >= 9 * 40, "only {checked} values checked");
}

#[test]
fn scifact_minilm_means_match_expected() {
    let root = shared();
    let run = read_run(&root.join("fixtures/scifact-minilm/run.trec")).unwrap();
    let qrels = read_qrels(&root.join("data/scifact/qrels/test.tsv")).unwrap();
    let expected = load_json(&root.join("fixtures/scifact-minilm/expected_metrics.json"));

    let eval = evaluate(&run, &qrels, &EvalOptions::default());
    assert_eq!(
        eval.num_queries as u64,
        expected["queries"].as_u64().unwrap()
    );
    assert_eq!(eval.missing_queries, 0);
    let metrics = expected["metrics"].as_object().unwrap();
    assert!(!metrics.is_empty());
    for (name, want) in metrics {
        let want = want.as_f64().unwrap();
        let key = our_key(name);
        let have = eval.mean[&key];
        assert!(
            (have - want).abs() <= 1e-6,
            "{name} ({key}): ours {have}, expected {want}"
        );
    }
    println!("{}", eval.table());
}
