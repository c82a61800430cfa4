//! Every reader must name the file and the exact line of a bad input, and must load the real
//! BEIR folders we ship as test data.

use rrra::data::{read_beir_folder, read_corpus, read_qrels, read_queries, read_run};
use rrra::Error;
use std::collections::HashSet;
use std::path::{Path, PathBuf};

fn shared() -> PathBuf {
    std::env::var("RRRA_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared")))
}

fn write(dir: &Path, name: &str, body: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    p
}

/// Asserts `result` is a parse error at `line` whose message names `path` and `path:line`.
fn assert_parse_error<T: std::fmt::Debug>(result: rrra::Result<T>, path: &Path, line: usize) {
    let err = match result {
        Ok(v) => panic!("{}: expected an error, got {v:?}", path.display()),
        Err(e) => e,
    };
    let shown = err.to_string();
    assert!(
        matches!(err, Error::Parse { line: l, .. } if l == line),
        "wanted line {line}: {shown}"
    );
    let prefix = format!("{}:{line}: ", path.display());
    assert!(
        shown.starts_with(&prefix),
        "{shown:?} should start with {prefix:?}"
    );
    println!("{shown}");
}

#[test]
fn malformed_jsonl_line() {
    let d = tempfile::tempdir().unwrap();
    let p = write(
        d.path(),
        "corpus.jsonl",
        b"{\"_id\": \"a\", \"title\": \"\", \"text\": \"x\"}\n\n{\"_id\": \"b\", \"text\": \"y\"\n",
    );
    assert_parse_error(read_corpus(&p), &p, 3);
}

#[test]
fn non_utf8_line() {
    let d = tempfile::tempdir().unwrap();
    let p = write(
        d.path(),
        "queries.jsonl",
        b"{\"_id\": \"1\", \"text\": \"ok\"}\n{\"_id\": \"2\", \"text\": \"caf\xe9\"}\n",
    );
    assert_parse_error(read_queries(&p), &p, 2);
}

#[test]
fn duplicate_id() {
    let d = tempfile::tempdir().unwrap();
    let p = write(
        d.path(),
        "corpus.jsonl",
        b"{\"_id\": 7, \"text\": \"x\"}\n{\"_id\": \"8\", \"text\": \"y\"}\n{\"_id\": \"7\", \"text\": \"z\"}\n",
    );
    assert_parse_error(read_corpus(&p), &p, 3);
    let p = write(
        d.path(),
        "queries.jsonl",
        b"{\"_id\": \"q\", \"text\": \"x\"}\n{\"_id\": \"q\", \"text\": \"y\"}\n",
    );
    assert_parse_error(read_queries(&p), &p, 2);
}

#[test]
fn missing_text_field() {
    let d = tempfile::tempdir().unwrap();
    let p = write(
        d.path(),
        "corpus.jsonl",
        b"{\"_id\": \"a\", \"title\": \"t\"}\n",
    );
    assert_parse_error(read_corpus(&p), &p, 1);
}

#[test]
fn qrels_non_integer_score() {
    let d = tempfile::tempdir().unwrap();
    let p = write(
        d.path(),
        "test.tsv",
        b"query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\thigh\n",
    );
    assert_parse_error(read_qrels(&p), &p, 3);
}

#[test]
fn qrels_duplicate_pair() {
    let d = tempfile::tempdir().unwrap();
    let p = write(d.path(), "test.tsv", b"q1\td1\t1\nq2\td1\t1\nq1\td1\t0\n");
    assert_parse_error(read_qrels(&p), &p, 3);
}

#[test]
fn qrels_unknown_query() {
    let d = tempfile::tempdir().unwrap();
    let p = write(
        d.path(),
        "test.tsv",
        b"query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\t1\nq404\td1\t1\n",
    );
    let qrels = read_qrels(&p).unwrap();
    assert_parse_error(qrels.check_queries_known(&p, |q| q == "q1"), &p, 4);

    // The same through a whole folder: the error points into qrels/test.tsv.
    let dir = d.path().join("beir");
    std::fs::create_dir_all(dir.join("qrels")).unwrap();
    write(
        &dir,
        "corpus.jsonl",
        b"{\"_id\": \"d1\", \"title\": \"t\", \"text\": \"x\"}\n",
    );
    write(
        &dir,
        "queries.jsonl",
        b"{\"_id\": \"q1\", \"text\": \"x\"}\n",
    );
    let qp = write(
        &dir.join("qrels"),
        "test.tsv",
        b"query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td1\t1\n",
    );
    assert_parse_error(read_beir_folder(&dir, "test"), &qp, 3);
}

#[test]
fn run_line_with_five_columns() {
    let d = tempfile::tempdir().unwrap();
    let p = write(
        d.path(),
        "run.trec",
        b"q1 Q0 d1 1 0.9 tag\nq1 Q0 d2 2 0.8 tag\nq1 Q0 d3 3 0.7\n",
    );
    assert_parse_error(read_run(&p), &p, 3);
}

#[test]
fn run_duplicate_doc() {
    let d = tempfile::tempdir().unwrap();
    let p = write(
        d.path(),
        "run.trec",
        b"q1 Q0 d1 1 0.9 tag\nq2 Q0 d1 1 0.9 tag\n\nq1 Q0 d1 2 0.5 tag\n",
    );
    assert_parse_error(read_run(&p), &p, 4);
}

#[test]
fn real_scifact_folder_loads() {
    let dir = shared().join("data/scifact");
    let data = read_beir_folder(&dir, "test").unwrap();
    println!(
        "scifact: {} docs, {} queries, test qrels: {} queries / {} judgements, {} judged queries",
        data.corpus.len(),
        data.queries.len(),
        data.qrels.len(),
        data.qrels.num_judgements(),
        data.judged_queries().count()
    );
    assert_eq!(data.corpus.len(), 5183);
    assert_eq!(data.queries.len(), 1109);
    assert_eq!(data.qrels.len(), 300);
    assert_eq!(data.qrels.num_judgements(), 339);
    assert_eq!(data.judged_queries().count(), 300);
    assert!(data.corpus.iter().all(|d| !d.text.is_empty()));
    let docs: HashSet<&str> = data.corpus.iter().map(|d| d.id.as_str()).collect();
    data.qrels
        .check_docs_known(&data.qrels_path, |d| docs.contains(d))
        .unwrap();
    let train = read_qrels(&dir.join("qrels/train.tsv")).unwrap();
    assert_eq!((train.len(), train.num_judgements()), (809, 919));
}

#[test]
fn real_cranfield_folder_loads() {
    let dir = shared().join("data/cranfield");
    let data = read_beir_folder(&dir, "all").unwrap();
    println!(
        "cranfield: {} docs, {} queries, all qrels: {} queries / {} judgements",
        data.corpus.len(),
        data.queries.len(),
        data.qrels.len(),
        data.qrels.num_judgements()
    );
    assert_eq!(data.corpus.len(), 1400);
    assert_eq!(data.queries.len(), 225);
    assert_eq!((data.qrels.len(), data.qrels.num_judgements()), (225, 1612));
    // Two documents are empty in the source and must still load.
    let empty: Vec<&str> = data
        .corpus
        .iter()
        .filter(|d| d.text.is_empty())
        .map(|d| d.id.as_str())
        .collect();
    assert_eq!(empty, vec!["471", "995"]);
    // Graded judgements 1..4 survive as integers.
    let mut grades: Vec<i32> = data
        .qrels
        .iter()
        .flat_map(|(_, j)| j.values().copied())
        .collect();
    grades.sort_unstable();
    grades.dedup();
    assert_eq!(grades, vec![1, 2, 3, 4]);
    let docs: HashSet<&str> = data.corpus.iter().map(|d| d.id.as_str()).collect();
    data.qrels
        .check_docs_known(&data.qrels_path, |d| docs.contains(d))
        .unwrap();
    for split in ["train", "test"] {
        let d = read_beir_folder(&dir, split).unwrap();
        println!("cranfield {split}: {} judged queries", d.qrels.len());
    }
    // The separate score-0 pairs load too (judged, none relevant).
    let zero = read_qrels(&dir.join("qrels/code_minus1_pairs.tsv")).unwrap();
    assert_eq!(zero.len(), 225);
    assert!(zero.queries().all(|q| zero.num_relevant(q) == 0));
}
