//! The RRRA pipeline through the CLI on the tiny random BERT of the fixtures and Cranfield:
//! stage 2 (`rrra adapter`) writes an adapter that `rrra search --rerank` and `rrra rerank`
//! use; bad inputs (an adapter of another dimension, a run naming unknown documents) give
//! errors naming the file; and a run with the RRRA sampler (joint adapter) stopped between
//! checkpoints and resumed ends with bitwise the same encoder and adapter as an uninterrupted one.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn rrra(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rrra"))
        .args(args)
        .output()
        .unwrap()
}

fn ok(o: &Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "{err}");
    err
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn tiny_bert() -> PathBuf {
    common::shared().join("fixtures/tiny-bert")
}

fn cranfield() -> PathBuf {
    common::shared().join("data/cranfield")
}

/// Stage 2 on tiny-bert: the adapter file and its assessment.
fn stage2(out: &Path) -> PathBuf {
    let e = ok(&rrra(&[
        "--threads",
        "2",
        "adapter",
        "--model",
        s(&tiny_bert()),
        "--beir",
        s(&cranfield()),
        "--out",
        s(out),
        "--adapter-epochs",
        "2",
        "--adapter-top-k",
        "40",
        "--rerank-k",
        "20",
        "--eval-max-length",
        "64",
    ]));
    assert!(e.contains("reranked"), "{e}");
    out.join("adapter.safetensors")
}

#[test]
fn adapter_rerank_and_resumable_rrra_training() {
    let dir = tempfile::tempdir().unwrap();
    let adapter = stage2(&dir.path().join("stage2"));
    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("stage2/assessment.json")).unwrap(),
    )
    .unwrap();
    let a = &report["assessment"];
    let lambda = a["lambda_rr"].as_f64().unwrap();
    assert!(rrra::adapter::rerank::LAMBDA_GRID.contains(&lambda));
    assert_eq!(a["lambda_table"].as_array().unwrap().len(), 7);
    assert!(
        a["test"]["ndcg@10"].as_f64().is_some() && a["test_reranked"]["ndcg@10"].as_f64().is_some()
    );
    let file = rrra::adapter::file::AdapterFile::load(&adapter).unwrap();
    assert_eq!(file.lambda_rr, lambda);
    assert_eq!(file.train_config.epochs, 2);

    // search --rerank and rerank of a run give the same list
    let store = dir.path().join("c.rrra");
    ok(&rrra(&[
        "encode",
        "--model",
        s(&tiny_bert()),
        "--corpus",
        s(&cranfield().join("corpus.jsonl")),
        "--out",
        s(&store),
        "--max-length",
        "64",
    ]));
    let q = cranfield().join("queries.jsonl");
    let qrels = cranfield().join("qrels/test.tsv");
    let (plain, reranked, again) = (
        dir.path().join("p.trec"),
        dir.path().join("r.trec"),
        dir.path().join("r2.trec"),
    );
    ok(&rrra(&[
        "search",
        "--model",
        s(&tiny_bert()),
        "--index",
        s(&store),
        "--queries",
        s(&q),
        "--qrels",
        s(&qrels),
        "--k",
        "20",
        "--out",
        s(&plain),
    ]));
    ok(&rrra(&[
        "search",
        "--model",
        s(&tiny_bert()),
        "--index",
        s(&store),
        "--queries",
        s(&q),
        "--qrels",
        s(&qrels),
        "--k",
        "20",
        "--out",
        s(&reranked),
        "--rerank",
        s(&adapter),
    ]));
    ok(&rrra(&[
        "rerank",
        "--model",
        s(&tiny_bert()),
        "--index",
        s(&store),
        "--queries",
        s(&q),
        "--adapter",
        s(&adapter),
        "--run",
        s(&plain),
        "--k",
        "20",
        "--out",
        s(&again),
    ]));
    let docs = |p: &Path| -> Vec<String> {
        std::fs::read_to_string(p)
            .unwrap()
            .lines()
            .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .collect()
    };
    assert_eq!(docs(&reranked), docs(&again));
    let mut sorted_plain = docs(&plain);
    let mut sorted_rr = docs(&reranked);
    sorted_plain.sort();
    sorted_rr.sort();
    assert_eq!(
        sorted_plain, sorted_rr,
        "reranking reorders, never changes the set"
    );
    if lambda > 0.0 {
        assert_ne!(
            docs(&plain),
            docs(&reranked),
            "a positive lambda moves something"
        );
    }

    // bad inputs
    let bad_run = dir.path().join("bad.trec");
    let text = std::fs::read_to_string(&plain)
        .unwrap()
        .replacen(" Q0 ", " Q0 no-such-doc-", 1);
    std::fs::write(&bad_run, text).unwrap();
    let o = rrra(&[
        "rerank",
        "--model",
        s(&tiny_bert()),
        "--index",
        s(&store),
        "--queries",
        s(&q),
        "--adapter",
        s(&adapter),
        "--run",
        s(&bad_run),
        "--out",
        s(&again),
    ]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("bad.trec") && e.contains("no-such-doc-"),
        "{e}"
    );
    let wrong = dir.path().join("wrong.safetensors");
    let mut other = file.clone();
    other.params = rrra::adapter::AdapterParams::init(7, 3, 1).unwrap();
    other.save(&wrong).unwrap();
    let o = rrra(&[
        "rerank",
        "--model",
        s(&tiny_bert()),
        "--index",
        s(&store),
        "--queries",
        s(&q),
        "--adapter",
        s(&wrong),
        "--run",
        s(&plain),
        "--out",
        s(&again),
    ]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("wrong.safetensors") && e.contains("dimension"),
        "{e}"
    );

    // stage 3: RRRA sampler with the joint adapter, stopped after 2 steps and resumed
    let (tb, cf) = (tiny_bert(), cranfield());
    let train = |out: &Path, extra: &[&str]| {
        let mut args = vec![
            "--threads",
            "2",
            "train",
            "--model",
            s(&tb),
            "--beir",
            s(&cf),
            "--out",
            s(out),
            "--sampler",
            "rrra",
            "--adapter",
            s(&adapter),
            "--max-steps",
            "4",
            "--batch-size",
            "6",
            "--hard-negatives",
            "2",
            "--random-negatives",
            "1",
            "--doc-max-length",
            "64",
            "--mine-top-k",
            "30",
            "--mine-every",
            "3",
            "--checkpoint-every",
            "2",
            "--lr",
            "1e-3",
        ];
        args.extend_from_slice(extra);
        ok(&rrra(&args));
    };
    let (full, staged) = (dir.path().join("full"), dir.path().join("staged"));
    train(&full, &[]);
    train(&staged, &["--stop-after", "2"]);
    ok(&rrra(&["--threads", "1", "train", "--resume", s(&staged)]));
    // the metadata name each run's own folder; the tensors must be equal bit for bit
    let tensors = |p: &Path| {
        rrra::train::checkpoint::read_safetensors(p)
            .unwrap()
            .tensors
    };
    let f = "model/model.safetensors";
    assert!(
        tensors(&full.join(f)) == tensors(&staged.join(f)),
        "{f} differs after the resume"
    );
    let f = "model/adapter.safetensors";
    assert!(
        tensors(&full.join(f)) == tensors(&staged.join(f)),
        "{f} differs after the resume"
    );
    let log = std::fs::read_to_string(full.join("train_log.jsonl")).unwrap();
    let steps: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &serde_json::Value| v.get("event").is_none())
        .collect();
    assert_eq!(steps.len(), 4);
    assert!(steps.iter().all(|v| v["fn_mean_drawn"]
        .as_f64()
        .is_some_and(|f| (0.0..=1.0).contains(&f))));
    assert!(steps
        .iter()
        .all(|v| v["adapter_loss"].as_f64().is_some_and(f64::is_finite)));
    assert_eq!(
        log.matches("\"event\":\"fn_scores\"").count(),
        2,
        "scored at the mines of steps 0 and 3"
    );
    // the adapter trained on: it differs from the stage-2 one
    let joint = rrra::adapter::file::AdapterFile::load(&full.join("model")).unwrap();
    assert_ne!(joint.params, file.params);
}

#[test]
fn rrra_sampler_without_adapter_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let o = rrra(&[
        "train",
        "--model",
        s(&tiny_bert()),
        "--beir",
        s(&cranfield()),
        "--out",
        s(&dir.path().join("x")),
        "--sampler",
        "rrra",
    ]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("--adapter"), "{e}");
}
