//! Bad inputs, one place: every class of malformed, hostile or degenerate input gets a clear,
//! typed error naming the file (and the line for text formats) or a defined result, never a
//! panic. This file covers what the other suites do not; where a class is covered elsewhere it
//! is listed here with its test.
//!
//! Covered elsewhere:
//! - JSONL: malformed line, non-UTF-8 line, duplicate corpus/query ids (numeric and string
//!   ids alike), missing `text`; qrels: non-integer score, duplicate (query, doc) pair, unknown
//!   query; runs: wrong column count, duplicate (query, doc): `tests/data_bad_input.rs`, and
//!   the unit tests of `src/data/{mod,beir,trec}.rs` (blank lines, CRLF and BOM stripping in
//!   `for_each_line`, NaN run scores, bad ranks).
//! - Store files: truncation at every section, wrong magic, a future version, every single
//!   flipped byte, trailing bytes; the writer refusing NaN/Inf, values beyond f16, wrong
//!   lengths, duplicate/empty/multi-line ids, a non-unit row in a normalised store, dim 0:
//!   `tests/store.rs`.
//! - Exact top-k: k = 0, k beyond the corpus (every dtype), a query of the wrong length, a NaN
//!   query value (all `Error::InvalidArgument`), an empty corpus, NaN corpus values whose
//!   scores sort last: `tests/topk.rs`.
//! - `Retriever`: k = 0, k beyond the store, no queries, the rerank without an adapter, an
//!   adapter of the wrong dimension, a junk store or model folder, batch size 0:
//!   `tests/retriever.rs`.
//! - Model folders: a missing or mis-shaped tensor: `tests/model_load.rs`; the same and a
//!   store from another model or of another dimension through the CLI: `tests/cli.rs`.
//! - CLI: malformed corpus line, qrels naming an unknown query, damaged stores, `--k 0`, an
//!   unknown dtype: `tests/cli.rs`; `rrra rerank` with an unknown document or an adapter of
//!   another dimension (file named): `tests/rrra_runs.rs`; `rrra train` knobs, data and
//!   resume mistakes: `tests/train_errors.rs`.
//!
//! Decisions recorded here:
//! - Text readers take a line whole, however long: a 64 MiB JSONL line is legal JSON and loads
//!   (memory is a few times the line; there is no line-length limit). Messages never echo a
//!   long field back (they quote at most a short prefix).
//! - A UTF-8 byte-order mark at the start of a file, CRLF endings, blank lines and a last line
//!   without a newline are accepted everywhere; an empty file is an empty collection.
//! - `rrra eval` follows trec_eval: run queries absent from the qrels are ignored and unjudged
//!   documents count as non-relevant, so unknown ids are not errors there, except when not one
//!   query of the run is judged (the files do not belong together): that is an error.
//! - A store whose vectors hold NaN (not written by `StoreWriter`, checksums recomputed) opens;
//!   exact search ranks such rows last (`hit_order`), and the CLI refuses to write a run with a
//!   non-finite score, naming the store.
//! - A config `vocab_size` below the tokenizer's ids loads; encoding a text with an id outside
//!   the embedding table is `Error::InvalidArgument` (checked per batch, not at load).

mod common;

use common::*;
use rrra::adapter::calibrate::FnCalibration;
use rrra::adapter::file::AdapterFile;
use rrra::adapter::fit::AdapterTrainConfig;
use rrra::adapter::AdapterParams;
use rrra::data::{read_beir_folder, read_corpus, read_qrels, read_queries, read_run};
use rrra::index::{search_batch, search_one, write_store, Dtype, Store, StoreSpec};
use rrra::model::{Encoder, EncoderOptions};
use rrra::retriever::{Retriever, RetrieverOptions};
use rrra::train::checkpoint;
use rrra::Error;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Builds an argument list from strings and paths.
macro_rules! a {
    ($($x:expr),* $(,)?) => { [$(OsString::from(&$x)),*] };
}

fn tiny() -> PathBuf {
    shared().join("fixtures/tiny-bert")
}

fn write(dir: &Path, name: &str, body: impl AsRef<[u8]>) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    p
}

fn err_of<T>(r: rrra::Result<T>) -> Error {
    match r {
        Ok(_) => panic!("expected an error, got a value"),
        Err(e) => e,
    }
}

/// A parse error at `line` of `path`, shown as `path:line: ...`; returns the message.
fn expect_parse<T>(r: rrra::Result<T>, path: &Path, line: usize) -> String {
    let e = err_of(r);
    let shown = e.to_string();
    let prefix = format!("{}:{line}: ", path.display());
    assert!(
        matches!(&e, Error::Parse { path: p, line: l, .. } if p == path && *l == line),
        "wanted a parse error at {prefix}: {e:?}"
    );
    assert!(shown.starts_with(&prefix), "{shown}");
    shown
}

/// `Error::Format` about `path`; returns the message.
fn expect_format<T>(r: rrra::Result<T>, path: &Path) -> String {
    let e = err_of(r);
    assert!(
        matches!(&e, Error::Format { path: p, .. } if p == path),
        "wanted a format error about {}: {e:?}",
        path.display()
    );
    let shown = e.to_string();
    assert!(shown.contains(&path.display().to_string()), "{shown}");
    shown
}

/// `Error::Mismatch` about `path`; returns the message.
fn expect_mismatch<T>(r: rrra::Result<T>, path: &Path) -> String {
    let e = err_of(r);
    assert!(
        matches!(&e, Error::Mismatch { path: p, .. } if p == path),
        "wanted a mismatch about {}: {e:?}",
        path.display()
    );
    e.to_string()
}

/// `Error::Io` about `path`; returns its kind.
fn expect_io<T>(r: rrra::Result<T>, path: &Path) -> std::io::ErrorKind {
    match err_of(r) {
        Error::Io { path: p, source } if p == path => source.kind(),
        e => panic!("wanted an I/O error about {}: {e:?}", path.display()),
    }
}

fn rrra(args: &[OsString]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_rrra"))
        .arg("--threads")
        .arg("1")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn cli_ok(args: &[OsString]) -> String {
    let (ok, out, err) = rrra(args);
    assert!(ok, "{args:?} failed: {err}");
    out
}

/// A command that must fail with a non-zero exit, one `error:` line, no panic, mentioning
/// every string of `mention`; returns stderr.
fn cli_fails(args: &[OsString], mention: &[&str]) -> String {
    let (ok, _, err) = rrra(args);
    assert!(!ok, "expected a failure: {args:?}\n{err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    assert!(
        err.lines().any(|l| l.starts_with("error: ")),
        "no error line: {err}"
    );
    for m in mention {
        assert!(err.contains(m), "stderr should mention {m:?}: {err}");
    }
    err
}

/// Copies a file's bytes; the copy is writable (the fixtures are read-only, `fs::copy` would
/// keep that).
fn copy(src: &Path, dst: &Path) {
    if dst.exists() {
        let mut perm = std::fs::metadata(dst).unwrap().permissions();
        #[allow(clippy::permissions_set_readonly_false)]
        perm.set_readonly(false);
        std::fs::set_permissions(dst, perm).unwrap();
    }
    std::fs::write(dst, std::fs::read(src).unwrap()).unwrap();
}

/// The files a model folder needs, copied from tiny-bert (not its 8 MB debug state).
fn tiny_copy(dst: &Path) {
    std::fs::create_dir_all(dst.join("1_Pooling")).unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "modules.json",
        "sentence_bert_config.json",
        "1_Pooling/config.json",
    ] {
        copy(&tiny().join(f), &dst.join(f));
    }
}

/// Edits a copy of tiny-bert's config.json.
fn edit_config(model: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let p = model.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    edit(&mut v);
    copy(&p, &p); // makes it writable
    std::fs::write(&p, v.to_string()).unwrap();
}

fn load(model: &Path) -> rrra::Result<Encoder> {
    Encoder::load(model, &EncoderOptions::default())
}

fn adapter(d: usize, h: usize) -> AdapterFile {
    let mut params = AdapterParams::init(d, h, 3).unwrap();
    // A non-zero second layer, so the rerank has something to say.
    for (i, w) in params.w2.iter_mut().enumerate() {
        *w = ((i % 7) as f32 - 3.0) * 0.05;
    }
    AdapterFile {
        params,
        calibration: FnCalibration::default(),
        lambda_rr: 1.0,
        tau: 0.05,
        train_config: AdapterTrainConfig::default(),
        info: serde_json::json!({}),
    }
}

/// Overwrites element `at` of the vectors of an f32 store with `value` and recomputes the
/// vectors and header checksums: a store that is well-formed but for the value.
fn poison_f32_store(path: &Path, at: usize, value: f32) {
    let mut b = std::fs::read(path).unwrap();
    let u64_at = |b: &[u8], i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
    let (off, len) = (u64_at(&b, 48) as usize, u64_at(&b, 56) as usize);
    assert_eq!(b[16], 0, "an f32 store");
    b[off + 4 * at..off + 4 * at + 4].copy_from_slice(&value.to_le_bytes());
    let sum = xxhash_rust::xxh3::xxh3_64(&b[off..off + len]);
    b[64..72].copy_from_slice(&sum.to_le_bytes());
    let sum = xxhash_rust::xxh3::xxh3_64(&b[..120]);
    b[120..128].copy_from_slice(&sum.to_le_bytes());
    std::fs::write(path, b).unwrap();
}

/// Three documents, three queries (q1, q2 judged), encoded by tiny-bert into `c.store`.
struct Collection {
    dir: tempfile::TempDir,
}

impl Collection {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "corpus.jsonl",
            "{\"_id\": \"d1\", \"title\": \"Vitamin D\", \"text\": \"Low sun exposure causes deficiency.\"}\n\
             {\"_id\": \"d2\", \"title\": \"Guitar\", \"text\": \"Chords and strumming for beginners.\"}\n\
             {\"_id\": \"d3\", \"title\": \"\", \"text\": \"Dense retrievers mine hard negatives.\"}\n",
        );
        write(
            dir.path(),
            "queries.jsonl",
            "{\"_id\": \"q1\", \"text\": \"what causes vitamin d deficiency\"}\n\
             {\"_id\": \"q2\", \"text\": \"guitar lessons\"}\n\
             {\"_id\": \"q3\", \"text\": \"unjudged query\"}\n",
        );
        write(
            dir.path(),
            "qrels.tsv",
            "query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t1\n",
        );
        let c = Collection { dir };
        cli_ok(&a![
            "encode",
            "--model",
            tiny(),
            "--corpus",
            c.p("corpus.jsonl"),
            "--out",
            c.p("c.store")
        ]);
        c
    }
    fn p(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn search(&self, index: &Path, out: &Path, extra: &[&str]) -> Vec<OsString> {
        let mut v = a![
            "search",
            "--model",
            tiny(),
            "--index",
            index,
            "--queries",
            self.p("queries.jsonl"),
            "--out",
            out
        ]
        .to_vec();
        v.extend(extra.iter().map(OsString::from));
        v
    }
    fn rerank(&self, adapter: &Path, run: &Path, out: &Path) -> Vec<OsString> {
        a![
            "rerank",
            "--model",
            tiny(),
            "--index",
            self.p("c.store"),
            "--queries",
            self.p("queries.jsonl"),
            "--adapter",
            adapter,
            "--run",
            run,
            "--out",
            out
        ]
        .to_vec()
    }
}

// ---------------------------------------------------------------------------------------------
// Text formats

/// A 64 MiB JSONL line is legal JSON: it loads whole, and line numbers after it stay right.
#[test]
fn huge_jsonl_line_loads_and_later_lines_keep_their_numbers() {
    let d = tempfile::tempdir().unwrap();
    let n = 64 << 20;
    let mut body = Vec::with_capacity(n + 200);
    body.extend_from_slice(b"{\"_id\": \"big\", \"title\": \"\", \"text\": \"");
    body.resize(body.len() + n, b'a');
    body.extend_from_slice(b"\"}\n{\"_id\": \"small\", \"text\": \"x\"}\n");
    let p = write(d.path(), "corpus.jsonl", &body);
    let docs = read_corpus(&p).unwrap();
    assert_eq!(docs.len(), 2);
    assert_eq!((docs[0].text.len(), docs[1].id.as_str()), (n, "small"));
    drop(docs);

    // The same huge line, then a bad third line: the error is at line 3.
    body.extend_from_slice(b"{\"_id\": \"bad\"\n");
    std::fs::write(&p, &body).unwrap();
    drop(body);
    expect_parse(read_corpus(&p), &p, 3);

    // 16 MiB of garbage without a newline: an error at line 1 that does not echo the line.
    let mut junk = vec![b'{'; 1];
    junk.resize(16 << 20, b'z');
    std::fs::write(&p, &junk).unwrap();
    let msg = expect_parse(read_corpus(&p), &p, 1);
    assert!(msg.len() < 512, "{} bytes of message", msg.len());
}

/// A 10 MB field in a run or qrels line: a valid id is kept, a malformed number is an error
/// at its line whose message stays short.
#[test]
fn huge_run_and_qrels_fields_give_short_messages() {
    let d = tempfile::tempdir().unwrap();
    let big = "x".repeat(10 << 20);
    let p = write(
        d.path(),
        "run.trec",
        format!("q1 Q0 d1 1 0.5 t\nq1 Q0 {big} 2 0.4 t\n"),
    );
    let run = read_run(&p).unwrap();
    assert_eq!(run.get("q1").unwrap()[1].0.len(), big.len());

    for (i, line) in [
        format!("q1 Q0 d2 2 {big} t\n"),
        format!("q1 Q0 d2 {big} 0.4 t\n"),
        format!("q1 Q0 d2 2 0.4 t {big}\n"),
    ]
    .iter()
    .enumerate()
    {
        let p = write(
            d.path(),
            &format!("run{i}.trec"),
            format!("q1 Q0 d1 1 0.5 t\n\n{line}"),
        );
        let msg = expect_parse(read_run(&p), &p, 3);
        assert!(msg.len() < 512, "{} bytes of message", msg.len());
    }
    let p = write(
        d.path(),
        "qrels.tsv",
        format!("query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\t{big}\n"),
    );
    let msg = expect_parse(read_qrels(&p), &p, 3);
    assert!(msg.len() < 512, "{} bytes of message", msg.len());
}

/// A leading BOM, CRLF endings, blank lines and no final newline are accepted by every text
/// reader, and the line numbers of errors count every physical line.
#[test]
fn bom_crlf_blank_lines_and_no_final_newline() {
    let d = tempfile::tempdir().unwrap();
    let bom = "\u{feff}";
    let p = write(
        d.path(),
        "corpus.jsonl",
        format!("{bom}{{\"_id\": \"d1\", \"text\": \"one\"}}\r\n\r\n{{\"_id\": \"d2\", \"text\": \"two\"}}"),
    );
    let docs = read_corpus(&p).unwrap();
    assert_eq!(
        docs.iter().map(|x| x.id.as_str()).collect::<Vec<_>>(),
        ["d1", "d2"]
    );
    assert_eq!(docs[1].text, "two");

    let p = write(
        d.path(),
        "qrels.tsv",
        format!("{bom}query-id\tcorpus-id\tscore\r\nq1\td1\t1\r\n\r\nq1\td2\t2"),
    );
    let q = read_qrels(&p).unwrap();
    assert_eq!(q.get("q1").unwrap()["d2"], 2);
    assert_eq!(q.num_judgements(), 2);
    // TREC qrels with a BOM: the first query id is "1", not "\u{feff}1".
    let p = write(d.path(), "qrels.txt", format!("{bom}1 0 a 1\r\n2 0 b 1"));
    let q = read_qrels(&p).unwrap();
    assert_eq!(q.queries().collect::<Vec<_>>(), ["1", "2"]);

    let p = write(
        d.path(),
        "run.trec",
        format!("{bom}q1 Q0 d1 1 0.9 t\r\n\r\n  \r\nq1 Q0 d2 2 0.8 t"),
    );
    let run = read_run(&p).unwrap();
    assert_eq!(run.queries().collect::<Vec<_>>(), ["q1"]);
    assert_eq!(run.num_entries(), 2);

    // Errors after CRLF and blank lines point at the physical line.
    let p = write(
        d.path(),
        "dup.tsv",
        format!("{bom}q1\td1\t1\r\n\r\nq1\td1\t1"),
    );
    expect_parse(read_qrels(&p), &p, 3);
    let p = write(
        d.path(),
        "bad.trec",
        "q1 Q0 d1 1 0.9 t\r\n\r\nq1 Q0 d2 two 0.8 t\r\n",
    );
    expect_parse(read_run(&p), &p, 3);
}

#[test]
fn non_utf8_qrels_and_runs_name_the_line() {
    let d = tempfile::tempdir().unwrap();
    let p = write(
        d.path(),
        "qrels.tsv",
        b"query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\tcaf\xe9\t1\n".as_slice(),
    );
    let msg = expect_parse(read_qrels(&p), &p, 3);
    assert!(msg.contains("UTF-8"), "{msg}");
    let p = write(
        d.path(),
        "run.trec",
        b"q1 Q0 d1 1 0.9 t\nq1 Q0 \xff\xfe 2 0.8 t\n".as_slice(),
    );
    let msg = expect_parse(read_run(&p), &p, 2);
    assert!(msg.contains("UTF-8"), "{msg}");
    // A UTF-16 file (BOM FF FE) is not UTF-8: line 1.
    let p = write(
        d.path(),
        "utf16.jsonl",
        b"\xff\xfe{\x00}\x00\n\x00".as_slice(),
    );
    expect_parse(read_queries(&p), &p, 1);
}

/// Non-finite or out-of-range run scores are errors at their line.
#[test]
fn run_scores_must_be_finite() {
    let d = tempfile::tempdir().unwrap();
    for score in ["inf", "-inf", "NaN", "infinity", "1e400", "-1e999"] {
        let p = write(
            d.path(),
            "run.trec",
            format!("q1 Q0 d1 1 0.9 t\nq1 Q0 d2 2 {score} t\n"),
        );
        let msg = expect_parse(read_run(&p), &p, 2);
        assert!(msg.contains("finite"), "{score}: {msg}");
    }
}

/// An empty (or blank) file is an empty collection; a BEIR folder of empty files loads empty.
#[test]
fn empty_files_are_empty_collections() {
    let d = tempfile::tempdir().unwrap();
    for body in ["", "\n\n", " \r\n\t\n", "\u{feff}"] {
        let p = write(d.path(), "f", body);
        assert!(read_corpus(&p).unwrap().is_empty());
        assert!(read_queries(&p).unwrap().is_empty());
        assert!(read_qrels(&p).unwrap().is_empty());
        assert!(read_run(&p).unwrap().is_empty());
    }
    // A qrels file that is only its header judges nothing.
    let p = write(d.path(), "h.tsv", "query-id\tcorpus-id\tscore\n");
    assert!(read_qrels(&p).unwrap().is_empty());

    let beir = d.path().join("beir");
    std::fs::create_dir_all(beir.join("qrels")).unwrap();
    for f in ["corpus.jsonl", "queries.jsonl", "qrels/test.tsv"] {
        write(&beir, f, "");
    }
    let data = read_beir_folder(&beir, "test").unwrap();
    assert!(data.corpus.is_empty() && data.queries.is_empty() && data.qrels.is_empty());
}

/// A missing file or a directory where a file is expected: an I/O error (or a format error
/// for folders-or-files arguments) naming the path.
#[test]
fn missing_files_and_directories_are_named() {
    let d = tempfile::tempdir().unwrap();
    let missing = d.path().join("missing.jsonl");
    assert_eq!(
        expect_io(read_corpus(&missing), &missing),
        std::io::ErrorKind::NotFound
    );
    expect_io(read_qrels(&missing), &missing);
    expect_io(read_run(&missing), &missing);
    expect_io(Store::open(&missing), &missing);
    let dir = d.path().join("a-folder");
    std::fs::create_dir(&dir).unwrap();
    expect_io(read_corpus(&dir), &dir);
    expect_io(read_queries(&dir), &dir);
    expect_io(read_qrels(&dir), &dir);
    expect_io(read_run(&dir), &dir);
    let e = err_of(Store::open(&dir));
    assert!(
        matches!(&e, Error::Io { path, .. } | Error::Format { path, .. } if path == &dir),
        "{e:?}"
    );
    // A folder without a model, a file where the model folder should be.
    expect_io(load(&dir), &dir.join("config.json"));
    let file = write(d.path(), "file", "x");
    expect_format(load(&file), &file);
    expect_format(load(&missing), &missing);
    // An adapter path that is a folder without adapter.safetensors, or missing.
    expect_format(
        AdapterFile::load(&dir),
        &dir.join(rrra::adapter::file::FILE_NAME),
    );
    expect_format(AdapterFile::load(&missing), &missing);
    // A BEIR folder whose qrels split does not exist names the file it looked for.
    write(&dir, "corpus.jsonl", "");
    write(&dir, "queries.jsonl", "");
    let want = dir.join("qrels/test.tsv");
    expect_io(read_beir_folder(&dir, "test"), &want);
}

// ---------------------------------------------------------------------------------------------
// Duplicates and NaN/Inf

/// Duplicate corpus ids through `rrra encode`: the line of the repeat, and no store written.
#[test]
fn duplicate_corpus_id_through_encode() {
    let d = tempfile::tempdir().unwrap();
    let corpus = write(
        d.path(),
        "corpus.jsonl",
        "{\"_id\": \"d1\", \"text\": \"a\"}\n{\"_id\": \"d2\", \"text\": \"b\"}\n{\"_id\": \"d1\", \"text\": \"c\"}\n",
    );
    let out = d.path().join("c.store");
    let err = cli_fails(
        &a![
            "encode",
            "--model",
            tiny(),
            "--corpus",
            corpus,
            "--out",
            out
        ],
        &["corpus.jsonl:3:", "duplicate", "line 1"],
    );
    assert!(!out.exists(), "{err}");
}

/// NaN or infinite adapter weights or knobs: `Error::Format` naming the file and the tensor.
#[test]
fn non_finite_adapter_files_are_format_errors() {
    let d = tempfile::tempdir().unwrap();
    type Edit = fn(&mut AdapterFile);
    let cases: [(&str, Edit); 8] = [
        ("w1", |a| a.params.w1[5] = f32::NAN),
        ("b1", |a| a.params.b1[0] = f32::INFINITY),
        ("w2", |a| a.params.w2[1] = f32::NEG_INFINITY),
        ("b2", |a| a.params.b2[3] = f32::NAN),
        ("beta", |a| a.params.beta = f32::NAN),
        ("lambda_rr", |a| a.lambda_rr = f64::NAN),
        ("tau", |a| a.tau = f32::INFINITY),
        ("tau", |a| a.tau = 0.0),
    ];
    for (what, edit) in cases {
        let p = d.path().join(format!("{what}.safetensors"));
        let mut f = adapter(4, 3);
        edit(&mut f);
        f.save(&p).unwrap();
        let msg = expect_format(AdapterFile::load(&p), &p);
        assert!(msg.contains(what), "{what}: {msg}");
    }
    // Sizes in the metadata that are not integers, or absurd: refused before any product.
    let good = d.path().join("good.safetensors");
    adapter(4, 3).save(&good).unwrap();
    let loaded = checkpoint::read_safetensors(&good).unwrap();
    for dim in [
        "4.5",
        "-4",
        "1e30",
        "99999999999999999999",
        "4611686018427387904",
    ] {
        let mut meta = loaded.metadata.clone();
        meta.insert("rrra.dim".into(), dim.into());
        let tensors: Vec<checkpoint::NamedTensor> = loaded
            .tensors
            .iter()
            .map(|(n, (s, v))| checkpoint::NamedTensor {
                name: n.clone(),
                shape: s.clone(),
                data: v,
            })
            .collect();
        let p = d.path().join("dim.safetensors");
        checkpoint::write_safetensors(&p, &tensors, &meta).unwrap();
        expect_format(AdapterFile::load(&p), &p);
    }
}

/// NaN in model weights: refused at load, naming the file and the tensor.
#[test]
fn non_finite_model_weights_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let name = "encoder.layer.1.attention.output.dense.bias";
    model_variant(&tiny(), d.path(), |t| {
        let x = t.iter_mut().find(|x| x.0 == name).unwrap();
        x.3[4..8].copy_from_slice(&f32::NAN.to_le_bytes());
    });
    let p = d.path().join("model.safetensors");
    let msg = expect_format(load(d.path()), &p);
    assert!(msg.contains(name) && msg.contains("non-finite"), "{msg}");
}

/// A store whose id table repeats an id (not written by `StoreWriter`, which refuses that;
/// checksums recomputed): refused at open, naming both rows.
#[test]
fn duplicate_ids_in_a_store_file() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("dup.store");
    let spec = StoreSpec {
        dim: 2,
        dtype: Dtype::F32,
        normalized: false,
        fingerprint: 1,
        metadata_json: "{}".into(),
    };
    let ids: Vec<String> = ["d1", "d2", "d3"].iter().map(|s| s.to_string()).collect();
    write_store(&p, spec, &ids, &[1.0, 0.0, 0.0, 1.0, 1.0, 1.0]).unwrap();
    assert!(Store::open(&p).is_ok());
    let mut b = std::fs::read(&p).unwrap();
    let u64_at = |b: &[u8], i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
    let (off, len) = (u64_at(&b, 96) as usize, u64_at(&b, 104) as usize);
    let blob = off + 4 * 8; // after the offset table of 3 + 1 entries
    assert_eq!(&b[blob..blob + 6], b"d1d2d3");
    b[blob + 5] = b'1'; // d3 → d1
    let sum = xxhash_rust::xxh3::xxh3_64(&b[off..off + len]);
    b[112..120].copy_from_slice(&sum.to_le_bytes());
    let sum = xxhash_rust::xxh3::xxh3_64(&b[..120]);
    b[120..128].copy_from_slice(&sum.to_le_bytes());
    std::fs::write(&p, b).unwrap();
    let msg = expect_format(Store::open(&p), &p);
    assert!(
        msg.contains("\"d1\"") && msg.contains("row 2") && msg.contains("row 0"),
        "{msg}"
    );
}

/// A well-formed store whose vectors hold a NaN: it opens (the reader checks structure and
/// checksums, not values), exact search ranks the row last, the retriever returns it last,
/// and `rrra search` refuses to write a non-finite score, naming the store.
#[test]
fn nan_in_stored_vectors() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("nan.store");
    let spec = StoreSpec {
        dim: 4,
        dtype: Dtype::F32,
        normalized: false,
        fingerprint: 1,
        metadata_json: "{}".into(),
    };
    let ids: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
    let v = [
        1.0f32, 0.0, 0.0, 0.0, //
        0.0, 1.0, 0.0, 0.0, //
        0.5, 0.5, 0.0, 0.0,
    ];
    write_store(&p, spec, &ids, &v).unwrap();
    poison_f32_store(&p, 4, f32::NAN);
    let s = Store::open(&p).unwrap();
    let q = [1.0f32, 1.0, 0.0, 0.0];
    let all = search_one(&s.corpus(), &q, 10).unwrap();
    assert_eq!(all.iter().map(|h| h.index).collect::<Vec<_>>(), [0, 2, 1]);
    assert!(all[2].score.is_nan());
    // NaN != NaN: compare the bits.
    let bits = |h: &[rrra::index::Hit]| -> Vec<(usize, u32)> {
        h.iter().map(|h| (h.index, h.score.to_bits())).collect()
    };
    assert_eq!(
        bits(&search_batch(&s.corpus(), &q, 10).unwrap()[0]),
        bits(&all)
    );
    let top2 = search_one(&s.corpus(), &q, 2).unwrap();
    assert!(top2.iter().all(|h| h.score.is_finite()));

    // The same through the tiny model's store: the CLI and the retriever.
    let c = Collection::new();
    poison_f32_store(&c.p("c.store"), 32 + 7, f32::NAN); // row 1 (d2)
    let run = c.p("run.trec");
    cli_fails(
        &c.search(&c.p("c.store"), &run, &["--k", "3"]),
        &["c.store", "d2", "not finite"],
    );
    assert!(!run.exists());
    let r = Retriever::open(&tiny(), &c.p("c.store"), &RetrieverOptions::default()).unwrap();
    let hits = r.retrieve("guitar lessons", 3, false).unwrap();
    assert_eq!(hits.len(), 3);
    assert_eq!(hits[2].id, "d2");
    assert!(hits[2].score.is_nan() && hits[..2].iter().all(|h| h.score.is_finite()));
}

// ---------------------------------------------------------------------------------------------
// Zero-length corpus, zero queries, k

/// An empty corpus encodes to an empty store; search, export, eval and the retriever over it
/// give empty results; an empty queries file gives an empty run.
#[test]
fn empty_corpus_and_zero_queries() {
    let d = tempfile::tempdir().unwrap();
    let corpus = write(d.path(), "corpus.jsonl", "");
    let store = d.path().join("empty.store");
    cli_ok(&a![
        "encode",
        "--model",
        tiny(),
        "--corpus",
        corpus,
        "--out",
        store
    ]);
    let info = cli_ok(&a!["info", store]);
    assert!(info.contains("documents   0"), "{info}");
    let queries = write(
        d.path(),
        "queries.jsonl",
        "{\"_id\": \"q1\", \"text\": \"anything\"}\n{\"_id\": \"q2\", \"text\": \"else\"}\n",
    );
    let run = d.path().join("run.trec");
    let search = |queries: &Path| {
        a![
            "search",
            "--model",
            tiny(),
            "--index",
            store,
            "--queries",
            queries,
            "--out",
            run,
            "--k",
            "10"
        ]
    };
    cli_ok(&search(&queries));
    assert_eq!(std::fs::read_to_string(&run).unwrap(), "");
    let qrels = write(d.path(), "qrels.tsv", "q1\td1\t1\nq2\td2\t1\n");
    let json = cli_ok(&a!["eval", "--run", run, "--qrels", qrels, "--json"]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["ndcg@10"].as_f64(), Some(0.0));
    assert_eq!(v["missing_queries"].as_u64(), Some(2));
    cli_ok(&a![
        "export",
        "--index",
        store,
        "--out",
        d.path().join("v.npy"),
        "--ids",
        d.path().join("ids.txt")
    ]);
    assert_eq!(
        std::fs::read_to_string(d.path().join("ids.txt")).unwrap(),
        ""
    );

    let r = Retriever::open(&tiny(), &store, &RetrieverOptions::default()).unwrap();
    assert!(r.is_empty());
    assert!(r.retrieve("anything", 10, false).unwrap().is_empty());
    assert_eq!(
        r.retrieve_batch(&["a", "b"], 5, false).unwrap(),
        vec![Vec::new(), Vec::new()]
    );

    // Zero queries over a non-empty store.
    let c = Collection::new();
    let none = write(d.path(), "none.jsonl", "\n");
    let run2 = d.path().join("run2.trec");
    cli_ok(&a![
        "search",
        "--model",
        tiny(),
        "--index",
        c.p("c.store"),
        "--queries",
        none,
        "--out",
        run2
    ]);
    assert_eq!(std::fs::read_to_string(&run2).unwrap(), "");
}

/// k beyond the corpus lists every document; k beyond the CLI's limit and a rerank of 0
/// documents are refused; a rerank depth below k still gives k reranked hits.
#[test]
fn k_bounds_and_rerank_depth() {
    let c = Collection::new();
    let run = c.p("run.trec");
    cli_ok(&c.search(&c.p("c.store"), &run, &["--k", "50"]));
    let text = std::fs::read_to_string(&run).unwrap();
    assert_eq!(text.lines().count(), 9, "3 queries × 3 documents: {text}");
    cli_fails(
        &c.search(&c.p("c.store"), &c.p("x.trec"), &["--k", "10001"]),
        &["--k"],
    );
    let ad = c.p("adapter.safetensors");
    adapter(32, 8).save(&ad).unwrap();
    let mut args = c.rerank(&ad, &run, &c.p("rr.trec"));
    args.extend(a!["--k", "0"]);
    cli_fails(&args, &["--k"]);
    assert!(!c.p("rr.trec").exists());

    for depth in [0, 1, 2] {
        let opts = RetrieverOptions {
            adapter: Some(ad.clone()),
            rerank_depth: depth,
            ..Default::default()
        };
        let r = Retriever::open(&tiny(), &c.p("c.store"), &opts).unwrap();
        let hits = r.retrieve("guitar lessons", 3, true).unwrap();
        assert_eq!(hits.len(), 3, "depth {depth}");
        assert!(hits.iter().all(|h| h.adapter_p.is_some()));
        assert!(r.retrieve("guitar", 0, true).unwrap().is_empty());
    }
}

// ---------------------------------------------------------------------------------------------
// Mismatched dimensions and ids

/// A store of dimension 384 opened with the 32-dimensional tiny model.
#[test]
fn store_of_another_dimension() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("minilm-sized.store");
    let spec = StoreSpec {
        dim: 384,
        dtype: Dtype::F16,
        normalized: true,
        fingerprint: 7,
        metadata_json: "{}".into(),
    };
    let v = rrra::index::synthetic::random_unit_vectors(2, 384, 1);
    write_store(&p, spec, &["a".into(), "b".into()], &v).unwrap();
    let msg = expect_mismatch(
        Retriever::open(&tiny(), &p, &RetrieverOptions::default()),
        &p,
    );
    assert!(msg.contains("384") && msg.contains("32"), "{msg}");
}

/// `rrra rerank` with an adapter of another dimension, and with runs naming unknown queries
/// or documents: errors naming the file (and the run's line).
#[test]
fn rerank_refuses_mismatched_adapter_and_unknown_ids() {
    let c = Collection::new();
    let out = c.p("rr.trec");
    let run = write(
        c.dir.path(),
        "run.trec",
        "q1 Q0 d1 1 0.9 bm25\nq1 Q0 d2 2 0.5 bm25\nq2 Q0 d2 1 0.7 bm25\n",
    );
    let wrong = c.p("wrong.safetensors");
    adapter(33, 8).save(&wrong).unwrap();
    cli_fails(
        &c.rerank(&wrong, &run, &out),
        &["wrong.safetensors", "33-dimensional", "32"],
    );
    let ad = c.p("adapter.safetensors");
    adapter(32, 8).save(&ad).unwrap();
    cli_ok(&c.rerank(&ad, &run, &out));
    assert_eq!(std::fs::read_to_string(&out).unwrap().lines().count(), 3);
    std::fs::remove_file(&out).unwrap();

    let bad_q = write(
        c.dir.path(),
        "bad-query.trec",
        "q1 Q0 d1 1 0.9 bm25\n\nq404 Q0 d2 1 0.7 bm25\n",
    );
    cli_fails(&c.rerank(&ad, &bad_q, &out), &["bad-query.trec:3:", "q404"]);
    let bad_d = write(
        c.dir.path(),
        "bad-doc.trec",
        "q1 Q0 d1 1 0.9 bm25\nq2 Q0 d2 1 0.7 bm25\nq1 Q0 d999 2 0.5 bm25\n",
    );
    cli_fails(
        &c.rerank(&ad, &bad_d, &out),
        &["bad-doc.trec:3:", "d999", "c.store"],
    );
    assert!(!out.exists());

    // The library entry gives the same typed errors.
    let store = Store::open(c.p("c.store")).unwrap();
    let enc = Encoder::load(&tiny(), &rrra::pipeline::store_encoder_options(&store)).unwrap();
    let queries = read_queries(&c.p("queries.jsonl")).unwrap();
    let file = AdapterFile::load(&ad).unwrap();
    let rerank = |p: &Path| {
        let run = read_run(p).unwrap();
        rrra::pipeline::rerank_run(&enc, &store, &queries, &run, p, &file, 10)
    };
    expect_parse(rerank(&bad_q), &bad_q, 3);
    expect_parse(rerank(&bad_d), &bad_d, 3);
    // A document beyond the reranked depth is not looked up.
    let run = read_run(&bad_d).unwrap();
    let rr = rrra::pipeline::rerank_run(&enc, &store, &queries, &run, &bad_d, &file, 1).unwrap();
    assert_eq!(rr.num_entries(), 2);
}

/// `rrra eval` with unknown ids: trec_eval semantics (ignored / non-relevant) while the run
/// and the qrels share a query; an error naming the run when they share none.
#[test]
fn eval_with_unknown_ids() {
    let d = tempfile::tempdir().unwrap();
    let qrels = write(
        d.path(),
        "qrels.tsv",
        "query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t1\n",
    );
    let run = write(
        d.path(),
        "run.trec",
        "q1 Q0 nowhere 1 0.9 t\nq1 Q0 d1 2 0.8 t\nq404 Q0 d1 1 0.9 t\n",
    );
    let json = cli_ok(&a!["eval", "--run", run, "--qrels", qrels, "--json"]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    // q1: the relevant doc at rank 2 (mrr 0.5); q2 missing (0); q404 ignored.
    assert_eq!(v["mrr@10"].as_f64(), Some(0.25));
    assert_eq!(v["missing_queries"].as_u64(), Some(1));

    let other = write(
        d.path(),
        "other.trec",
        "x1 Q0 d1 1 0.9 t\nx2 Q0 d2 1 0.9 t\n",
    );
    cli_fails(
        &a!["eval", "--run", other, "--qrels", qrels],
        &["other.trec", "qrels.tsv", "none of the 2 queries"],
    );
    let bad = write(d.path(), "bad.trec", "q1 Q0 d1 1 0.9 t\nq1 Q0 d2 x 0.8 t\n");
    cli_fails(
        &a!["eval", "--run", bad, "--qrels", qrels],
        &["bad.trec:2:"],
    );
}

// ---------------------------------------------------------------------------------------------
// Model folders

#[test]
fn broken_model_configs_name_config_json() {
    let d = tempfile::tempdir().unwrap();
    let m = d.path().join("m");
    tiny_copy(&m);
    let cfg = m.join("config.json");

    std::fs::write(&cfg, "not json at all").unwrap();
    expect_parse(load(&m), &cfg, 1);
    std::fs::write(&cfg, "{\n  \"hidden_size\": 32,\n  oops\n}").unwrap();
    expect_parse(load(&m), &cfg, 3);
    std::fs::write(&cfg, "").unwrap();
    expect_parse(load(&m), &cfg, 1);

    copy(&tiny().join("config.json"), &cfg);
    edit_config(&m, |v| v["num_attention_heads"] = 5.into());
    let msg = expect_format(load(&m), &cfg);
    assert!(msg.contains("multiple"), "{msg}");

    copy(&tiny().join("config.json"), &cfg);
    edit_config(&m, |v| v["num_hidden_layers"] = 0.into());
    expect_format(load(&m), &cfg);

    copy(&tiny().join("config.json"), &cfg);
    edit_config(&m, |v| v["hidden_size"] = (-32).into());
    expect_parse(load(&m), &cfg, 1);

    // A config that disagrees with the weights: the tensor of the wrong shape is named.
    copy(&tiny().join("config.json"), &cfg);
    edit_config(&m, |v| v["intermediate_size"] = 48.into());
    let e = err_of(load(&m));
    assert!(
        matches!(&e, Error::TensorShape { path, .. } if path == &m.join("model.safetensors")),
        "{e:?}"
    );

    // A broken pooling config names its own file.
    copy(&tiny().join("config.json"), &cfg);
    let pool = m.join("1_Pooling/config.json");
    std::fs::write(&pool, "{\"pooling_mode_mean_tokens\": tru").unwrap();
    expect_parse(load(&m), &pool, 1);
    std::fs::write(&pool, "{}").unwrap();
    expect_format(load(&m), &pool);
}

/// config.json's vocab_size below the tokenizer's ids (embedding table cut to match): loads,
/// and encoding a text whose ids fall outside the table is a typed error, not a panic.
#[test]
fn vocab_smaller_than_the_tokenizer() {
    let d = tempfile::tempdir().unwrap();
    model_variant(&tiny(), d.path(), |t| {
        let x = t
            .iter_mut()
            .find(|x| x.0 == "embeddings.word_embeddings.weight")
            .unwrap();
        x.2 = vec![1000, 32];
        x.3.truncate(1000 * 32 * 4);
    });
    edit_config(d.path(), |v| v["vocab_size"] = 1000.into());
    let enc = load(d.path()).unwrap();
    let e = err_of(enc.encode(&["zebra crossing"], 4));
    assert!(
        matches!(&e, Error::InvalidArgument(m) if m.contains("vocabulary")),
        "{e:?}"
    );
}

#[test]
fn broken_tokenizer_and_weights_files() {
    let d = tempfile::tempdir().unwrap();
    let m = d.path().join("m");
    tiny_copy(&m);
    let tok = m.join("tokenizer.json");
    std::fs::write(&tok, b"\x00\x01garbage").unwrap();
    expect_format(load(&m), &tok);
    std::fs::write(&tok, "{\"version\": \"1.0\"}").unwrap();
    expect_format(load(&m), &tok);
    std::fs::remove_file(&tok).unwrap();
    expect_format(load(&m), &tok);
    copy(&tiny().join("tokenizer.json"), &tok);

    let w = m.join("model.safetensors");
    let good = std::fs::read(tiny().join("model.safetensors")).unwrap();
    let header_len = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    let mut cases: Vec<(String, Vec<u8>)> = vec![
        ("empty".into(), Vec::new()),
        ("cut in the length".into(), good[..5].to_vec()),
        (
            "cut in the header".into(),
            good[..8 + header_len / 2].to_vec(),
        ),
        ("cut in the data".into(), good[..good.len() / 2].to_vec()),
        ("one byte short".into(), good[..good.len() - 1].to_vec()),
        ("one byte long".into(), [&good[..], b"\0"].concat()),
    ];
    for claimed in [good.len() as u64, 1 << 40, u64::MAX] {
        let mut b = good.clone();
        b[..8].copy_from_slice(&claimed.to_le_bytes());
        cases.push((format!("header length {claimed}"), b));
    }
    let mut b = good.clone();
    b[8] = b'[';
    cases.push(("header not an object".into(), b));
    for (what, bytes) in cases {
        std::fs::write(&w, &bytes).unwrap();
        let msg = expect_format(load(&m), &w);
        println!("{what}: {msg}");
    }
    std::fs::remove_file(&w).unwrap();
    expect_io(load(&m), &w);
}

// ---------------------------------------------------------------------------------------------
// Training state

/// A training state cut anywhere: `rrra train --resume` fails naming the file, and the library
/// gives `Error::Format` for it.
#[test]
fn resume_from_a_truncated_training_state() {
    let d = tempfile::tempdir().unwrap();
    let beir = common::tiny_beir(d.path());
    let out = d.path().join("run");
    cli_ok(&a![
        "train",
        "--model",
        tiny(),
        "--beir",
        beir,
        "--out",
        out,
        "--max-steps",
        "1",
        "--batch-size",
        "2"
    ]);
    let state = out.join("training_state.safetensors");
    let good = std::fs::read(&state).unwrap();
    let header_len = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    for cut in [
        0,
        3,
        8,
        8 + header_len / 2,
        8 + header_len,
        good.len() / 2,
        good.len() - 1,
    ] {
        std::fs::write(&state, &good[..cut]).unwrap();
        let e = err_of(rrra::train::trainer::Trainer::resume(&out).map(|_| ()));
        assert!(
            matches!(&e, Error::Format { path, .. } if path == &state),
            "cut at {cut}: {e:?}"
        );
        cli_fails(
            &a!["train", "--resume", out],
            &["training_state.safetensors"],
        );
    }
    std::fs::write(&state, &good).unwrap();
}
