//! The `rrra` binary end to end on small inputs (the tiny-bert fixture model), and its handling
//! of bad input: a non-zero exit, one clear message naming the file (and line), no panic, and
//! no half-written output.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Builds an argument list from strings and paths.
macro_rules! a {
    ($($x:expr),* $(,)?) => { [$(std::ffi::OsString::from(&$x)),*] };
}

fn rrra(args: &[std::ffi::OsString]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_rrra"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs a command that must fail; returns its stderr after the common checks.
fn fails(args: &[std::ffi::OsString], must_mention: &[&str]) -> String {
    let (ok, _, err) = rrra(args);
    assert!(!ok, "expected failure: {args:?}");
    assert!(!err.contains("panicked"), "panic: {err}");
    assert!(
        err.lines().any(|l| l.starts_with("error: ")),
        "no error line: {err}"
    );
    for m in must_mention {
        assert!(err.contains(m), "error should mention {m:?}: {err}");
    }
    err
}

fn tiny() -> PathBuf {
    shared().join("fixtures/tiny-bert")
}

/// Only the expected files are in `dir` (no temporary leftovers).
fn assert_files(dir: &Path, expected: &[&str]) {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut want: Vec<String> = expected.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(names, want);
}

struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let corpus = "{\"_id\": \"d1\", \"title\": \"Vitamin D\", \"text\": \"Low sun exposure causes deficiency.\"}\n\
                      {\"_id\": \"d2\", \"title\": \"Guitar\", \"text\": \"Chords and strumming for beginners.\"}\n\
                      {\"_id\": \"d3\", \"title\": \"\", \"text\": \"Dense retrievers mine hard negatives.\"}\n";
        std::fs::write(dir.path().join("corpus.jsonl"), corpus).unwrap();
        let queries = "{\"_id\": \"q1\", \"text\": \"what causes vitamin d deficiency\"}\n\
                       {\"_id\": \"q2\", \"text\": \"guitar lessons\"}\n\
                       {\"_id\": \"q3\", \"text\": \"unjudged query\"}\n";
        std::fs::write(dir.path().join("queries.jsonl"), queries).unwrap();
        std::fs::write(
            dir.path().join("qrels.tsv"),
            "query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t1\n",
        )
        .unwrap();
        Fixture { dir }
    }
    fn p(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn encode(&self, model: &Path, out: &str) {
        let (ok, _, err) = rrra(&a![
            "encode",
            "--model",
            model,
            "--corpus",
            self.p("corpus.jsonl"),
            "--out",
            self.p(out)
        ]);
        assert!(ok, "{err}");
    }
    /// `search` of the fixture's queries with `model` over `index` into `out`, then `extra`.
    fn search(
        &self,
        model: &Path,
        index: &Path,
        out: &Path,
        extra: &[&str],
    ) -> Vec<std::ffi::OsString> {
        let mut args = a![
            "search",
            "--model",
            model,
            "--index",
            index,
            "--queries",
            self.p("queries.jsonl"),
            "--out",
            out
        ]
        .to_vec();
        args.extend(extra.iter().map(std::ffi::OsString::from));
        args
    }
}

#[test]
fn encode_search_eval_round_trip() {
    let f = Fixture::new();
    f.encode(&tiny(), "c.store");
    let qrels = f.p("qrels.tsv");
    let extra = ["--qrels", qrels.to_str().unwrap(), "--k", "2"];
    let (ok, _, err) = rrra(&f.search(&tiny(), &f.p("c.store"), &f.p("run.trec"), &extra));
    assert!(ok, "{err}");
    let run = std::fs::read_to_string(f.p("run.trec")).unwrap();
    // Only the judged queries are searched, k = 2 each.
    assert_eq!(run.lines().count(), 4, "{run}");
    assert!(run
        .lines()
        .all(|l| l.starts_with("q1 Q0 ") || l.starts_with("q2 Q0 ")));
    let (ok, out, err) = rrra(&a![
        "eval",
        "--run",
        f.p("run.trec"),
        "--qrels",
        f.p("qrels.tsv"),
        "--json"
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    for key in [
        "ndcg@10",
        "mrr@10",
        "recall@1",
        "recall@10",
        "recall@100",
        "map@100",
    ] {
        let x = v[key].as_f64().unwrap_or(-1.0);
        assert!((0.0..=1.0).contains(&x), "{key} = {x}");
    }
    let (ok, out, _) = rrra(&a!["info", f.p("c.store")]);
    assert!(
        ok && out.contains("documents   3") && out.contains("dimension   32"),
        "{out}"
    );
    let (ok, _, err) = rrra(&a![
        "export",
        "--index",
        f.p("c.store"),
        "--out",
        f.p("v.npy"),
        "--ids",
        f.p("ids.txt")
    ]);
    assert!(ok, "{err}");
    assert_eq!(
        std::fs::read_to_string(f.p("ids.txt")).unwrap(),
        "d1\nd2\nd3\n"
    );
}

#[test]
fn malformed_corpus_line_names_file_and_line() {
    let f = Fixture::new();
    let mut c = std::fs::read_to_string(f.p("corpus.jsonl")).unwrap();
    c.push_str("{\"_id\": \"d4\", \"text\": \"unterminated}\n");
    std::fs::write(f.p("corpus.jsonl"), c).unwrap();
    let args = a![
        "encode",
        "--model",
        tiny(),
        "--corpus",
        f.p("corpus.jsonl"),
        "--out",
        f.p("c.store")
    ];
    fails(&args, &["corpus.jsonl:4:"]);
    assert_files(
        f.dir.path(),
        &["corpus.jsonl", "queries.jsonl", "qrels.tsv"],
    );
}

#[test]
fn qrels_naming_unknown_query_is_an_error() {
    let f = Fixture::new();
    f.encode(&tiny(), "c.store");
    std::fs::write(
        f.p("qrels.tsv"),
        "query-id\tcorpus-id\tscore\nq1\td1\t1\nq404\td2\t1\n",
    )
    .unwrap();
    let run = f.p("run.trec");
    let qrels = f.p("qrels.tsv");
    let args = f.search(
        &tiny(),
        &f.p("c.store"),
        &run,
        &["--qrels", qrels.to_str().unwrap()],
    );
    fails(&args, &["qrels.tsv:3:", "q404"]);
    assert!(!run.exists());
}

#[test]
fn damaged_stores_are_refused() {
    let f = Fixture::new();
    f.encode(&tiny(), "c.store");
    let good = std::fs::read(f.p("c.store")).unwrap();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("truncated", good[..good.len() - 7].to_vec()),
        ("truncated-header", good[..20].to_vec()),
        ("wrong-magic", {
            let mut b = good.clone();
            b[0] ^= 0xff;
            b
        }),
        ("flipped-vector-byte", {
            let mut b = good.clone();
            let n = b.len();
            b[n - 9] ^= 0x10;
            b
        }),
        ("flipped-middle-byte", {
            let mut b = good.clone();
            let n = b.len();
            b[n / 2] ^= 0x01;
            b
        }),
    ];
    for (name, bytes) in cases {
        let store = f.p(&format!("{name}.store"));
        std::fs::write(&store, bytes).unwrap();
        let run = f.p("run.trec");
        let args = f.search(&tiny(), &store, &run, &[]);
        fails(&args, &[&format!("{name}.store")]);
        assert!(!run.exists(), "{name}: run written");
    }
}

#[test]
fn missing_tensor_is_named() {
    let f = Fixture::new();
    let model = f.p("model");
    let gone = "encoder.layer.0.attention.self.key.weight";
    model_variant(&tiny(), &model, |t| t.retain(|x| x.0 != gone));
    let args = a![
        "encode",
        "--model",
        model,
        "--corpus",
        f.p("corpus.jsonl"),
        "--out",
        f.p("c.store")
    ];
    fails(&args, &["model.safetensors", gone]);
    assert!(!f.p("c.store").exists());
}

#[test]
fn store_from_another_model_is_refused() {
    let f = Fixture::new();
    f.encode(&tiny(), "c.store");
    // Same architecture, one weight changed: same dimension, different fingerprint.
    let model = f.p("model");
    model_variant(&tiny(), &model, |t| {
        let bias = t
            .iter_mut()
            .find(|x| x.0 == "embeddings.LayerNorm.bias")
            .unwrap();
        bias.3[0] ^= 0x01;
    });
    let run = f.p("run.trec");
    let args = f.search(&model, &f.p("c.store"), &run, &[]);
    fails(&args, &["c.store", "fingerprint"]);
    // A model of another dimension (all-MiniLM-L6-v2, 384 vs 32).
    let args = f.search(&minilm(), &f.p("c.store"), &run, &[]);
    fails(&args, &["c.store", "dimension"]);
    assert!(!run.exists());
}

#[test]
fn bad_arguments_are_clear() {
    let f = Fixture::new();
    f.encode(&tiny(), "c.store");
    let args = f.search(&tiny(), &f.p("c.store"), &f.p("r"), &["--k", "0"]);
    fails(&args, &["--k"]);
    let (ok, _, err) = rrra(&a![
        "encode",
        "--model",
        tiny(),
        "--corpus",
        f.p("corpus.jsonl"),
        "--out",
        f.p("x"),
        "--dtype",
        "f64"
    ]);
    assert!(!ok && err.contains("f64"), "{err}");
}

/// Every command that takes `--device` refuses a value outside cpu, cuda and cuda:N with the
/// accepted forms, before it reads anything.
#[test]
fn unknown_devices_are_refused() {
    let f = Fixture::new();
    let commands: [&[&str]; 9] = [
        &["encode"],
        &["search"],
        &["rerank"],
        &["train"],
        &["adapter"],
        &["experiment"],
        &["bench"],
        &["demo"],
        &["device-check"],
    ];
    for cmd in commands {
        for bad in ["gpu0", "cuda:x", "0"] {
            let mut args: Vec<std::ffi::OsString> = cmd.iter().map(Into::into).collect();
            args.extend(a!["--device", bad]);
            let err = fails(&args, &[&format!("{bad:?}: expected cpu, cuda or cuda:N")]);
            assert!(err.contains("--device"), "{cmd:?}: {err}");
        }
    }
    // The GPU-only options say so with --device cpu (the default) instead of being ignored.
    let encode = a![
        "encode",
        "--model",
        tiny(),
        "--corpus",
        f.p("corpus.jsonl"),
        "--out",
        f.p("c.store"),
        "--precision",
        "f32"
    ];
    fails(&encode, &["--precision f32", "--device cuda"]);
    let args = f.search(
        &tiny(),
        &f.p("c.store"),
        &f.p("run.trec"),
        &["--device", "cpu", "--precision", "bf16"],
    );
    fails(&args, &["--precision bf16", "--device cuda"]);
    let rerank = a![
        "rerank",
        "--model",
        tiny(),
        "--index",
        f.p("c.store"),
        "--queries",
        f.p("queries.jsonl"),
        "--adapter",
        f.p("adapter"),
        "--run",
        f.p("run.trec"),
        "--out",
        f.p("rr.trec"),
        "--precision",
        "f32"
    ];
    fails(&rerank, &["--precision f32", "--device cuda"]);
    let train = a![
        "train",
        "--model",
        tiny(),
        "--beir",
        f.p("beir"),
        "--out",
        f.p("t"),
        "--gpu-math",
        "bf16"
    ];
    fails(&train, &["--gpu-math bf16", "--device cuda"]);
    let experiment = a![
        "experiment",
        "--synthetic",
        "--model",
        tiny(),
        "--out",
        f.p("e"),
        "--gpu-math",
        "tf32"
    ];
    fails(&experiment, &["--gpu-math tf32", "--device cuda"]);
    fails(&a!["device-check", "--device", "cpu"], &["--device cpu"]);
    assert_files(
        f.dir.path(),
        &["corpus.jsonl", "queries.jsonl", "qrels.tsv"],
    );
}

/// `--device cpu` is the default: the same store and the same run, byte for byte.
#[test]
fn device_cpu_is_the_default() {
    let f = Fixture::new();
    f.encode(&tiny(), "c.store");
    let (ok, _, err) = rrra(&a![
        "encode",
        "--model",
        tiny(),
        "--corpus",
        f.p("corpus.jsonl"),
        "--out",
        f.p("cpu.store"),
        "--device",
        "cpu"
    ]);
    assert!(ok, "{err}");
    assert_eq!(
        std::fs::read(f.p("c.store")).unwrap(),
        std::fs::read(f.p("cpu.store")).unwrap()
    );
    let (ok, _, err) = rrra(&f.search(&tiny(), &f.p("c.store"), &f.p("a.trec"), &[]));
    assert!(ok, "{err}");
    let extra = ["--device", "cpu"];
    let (ok, _, err) = rrra(&f.search(&tiny(), &f.p("c.store"), &f.p("b.trec"), &extra));
    assert!(ok, "{err}");
    assert_eq!(
        std::fs::read(f.p("a.trec")).unwrap(),
        std::fs::read(f.p("b.trec")).unwrap()
    );
}

/// Without a usable GPU, `--device cuda` is one clear error (CUDA unavailable, and why), with
/// no panic and nothing written. On a GPU machine the GPU path is checked by
/// tests/gpu_pipeline.rs instead.
#[test]
fn cuda_without_a_gpu_is_a_clear_error() {
    if let Ok(gpu) = rrra::device::Gpu::open(0) {
        eprintln!("skipped: a GPU can be used ({})", gpu.info());
        return;
    }
    let t = tiny_cranfield();
    let p = |name: &str| t.dir.path().join(name);
    let data = shared().join("data/cranfield");
    for device in ["cuda", "cuda:1"] {
        let encode = a![
            "encode",
            "--model",
            t.model,
            "--corpus",
            data.join("corpus.jsonl"),
            "--out",
            p("gpu.store"),
            "--device",
            device
        ];
        fails(&encode, &["CUDA unavailable"]);
        let adapter = t.adapter.to_str().unwrap();
        for rerank in [&[][..], &["--rerank", adapter][..]] {
            let mut args = a![
                "search",
                "--model",
                t.model,
                "--index",
                t.store,
                "--queries",
                data.join("queries.jsonl"),
                "--out",
                p("run.trec"),
                "--device",
                device,
                "--precision",
                "f32"
            ]
            .to_vec();
            args.extend(rerank.iter().map(std::ffi::OsString::from));
            fails(&args, &["CUDA unavailable"]);
        }
    }
    // rerank: a run made on the CPU, then its rerank on a GPU
    let (ok, _, err) = rrra(&a![
        "search",
        "--model",
        t.model,
        "--index",
        t.store,
        "--queries",
        data.join("queries.jsonl"),
        "--out",
        p("cpu.trec"),
        "--k",
        "5"
    ]);
    assert!(ok, "{err}");
    for device in ["cuda", "cuda:1"] {
        let rerank = a![
            "rerank",
            "--model",
            t.model,
            "--index",
            t.store,
            "--queries",
            data.join("queries.jsonl"),
            "--adapter",
            t.adapter,
            "--run",
            p("cpu.trec"),
            "--out",
            p("rr.trec"),
            "--device",
            device
        ];
        fails(&rerank, &["CUDA unavailable"]);
    }
    let beir = tiny_beir(t.dir.path());
    let train = a![
        "train",
        "--model",
        t.model,
        "--beir",
        beir,
        "--out",
        p("t"),
        "--device",
        "cuda"
    ];
    fails(&train, &["CUDA unavailable"]);
    assert!(!p("gpu.store").exists() && !p("run.trec").exists() && !p("t").exists());
    assert!(!p("rr.trec").exists());
}
