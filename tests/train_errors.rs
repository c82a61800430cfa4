//! `rrra train` refuses bad configuration and bad data with one clear sentence (naming the file
//! and line where there is one), a failure exit status, and never a panic.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

fn tiny_bert() -> PathBuf {
    common::shared().join("fixtures/tiny-bert")
}

/// Runs `rrra train` with `args` after the model and output; returns stderr of a failed run.
fn train_fails(out: &Path, args: &[&str]) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_rrra"))
        .args(["train", "--model"])
        .arg(tiny_bert())
        .arg("--out")
        .arg(out)
        .args(args)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "expected a failure: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    err
}

/// A two-document BEIR folder whose qrels are given.
fn beir(dir: &Path, qrels: &str) -> PathBuf {
    let root = dir.join("beir");
    std::fs::create_dir_all(root.join("qrels")).unwrap();
    std::fs::write(
        root.join("corpus.jsonl"),
        "{\"_id\":\"d1\",\"title\":\"\",\"text\":\"one\"}\n{\"_id\":\"d2\",\"title\":\"\",\"text\":\"two\"}\n",
    )
    .unwrap();
    std::fs::write(
        root.join("queries.jsonl"),
        "{\"_id\":\"q1\",\"text\":\"first\"}\n",
    )
    .unwrap();
    std::fs::write(root.join("qrels/train.tsv"), qrels).unwrap();
    root
}

#[test]
fn bad_knobs_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let data = beir(dir.path(), "query-id\tcorpus-id\tscore\nq1\td1\t1\n");
    let data = data.to_str().unwrap();
    let out = dir.path().join("run");
    let err = train_fails(&out, &["--beir", data, "--sampler", "bm25"]);
    assert!(
        err.contains("unknown sampler `bm25`") && err.contains("simans"),
        "{err}"
    );
    let err = train_fails(&out, &["--beir", data, "--hard-negatives", "-3"]);
    assert!(err.contains("--hard-negatives must be 0 or more"), "{err}");
    let err = train_fails(&out, &["--beir", data, "--mine-top-k", "-1"]);
    assert!(err.contains("--mine-top-k must be 0 or more"), "{err}");
    let err = train_fails(&out, &["--beir", data, "--sampler", "simans:a=0"]);
    assert!(err.contains("a must be finite and > 0"), "{err}");
    let err = train_fails(&out, &["--beir", data, "--batch-size", "0"]);
    assert!(err.contains("batch size must be at least 1"), "{err}");
    let err = train_fails(&out, &["--beir", data, "--lr", "-1"]);
    assert!(err.contains("learning rate must be positive"), "{err}");
    let err = train_fails(&out, &[]);
    assert!(err.contains("--beir DIR or --train-jsonl FILE"), "{err}");
    assert!(
        !out.exists(),
        "nothing is written for a refused configuration"
    );
}

#[test]
fn bad_data_names_the_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    // every judgement has relevance 0: nothing to train on
    let data = beir(dir.path(), "query-id\tcorpus-id\tscore\nq1\td1\t0\n");
    let err = train_fails(&out, &["--beir", data.to_str().unwrap()]);
    assert!(err.contains("empty training set"), "{err}");
    assert!(err.contains("train.tsv"), "{err}");

    let jsonl = dir.path().join("train.jsonl");
    std::fs::write(
        &jsonl,
        "{\"query\":\"a\",\"pos\":[\"x\"],\"neg\":[\"y\"]}\n{\"query\":\"b\",\"pos\":\"not a list\"}\n",
    )
    .unwrap();
    let err = train_fails(&out, &["--train-jsonl", jsonl.to_str().unwrap()]);
    assert!(err.contains("train.jsonl:2:"), "{err}");
}

#[test]
fn resume_and_overwrite_mistakes_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_rrra"))
        .args(["train", "--resume"])
        .arg(dir.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && !err.contains("panicked"));
    assert!(err.contains("training_state.safetensors"), "{err}");

    // a folder that already holds a run is not silently overwritten
    let out = dir.path().join("run");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("training_state.safetensors"), b"x").unwrap();
    let data = beir(dir.path(), "query-id\tcorpus-id\tscore\nq1\td1\t1\n");
    let err = train_fails(&out, &["--beir", data.to_str().unwrap()]);
    assert!(err.contains("already holds a training run"), "{err}");
}
