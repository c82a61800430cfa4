//! The fuzzing corpus as a regression test on the stable toolchain: every input kept under
//! `fuzz/corpus/<target>/` goes through the same entry point its fuzz target calls
//! (`rrra::fuzzing`) and must come back as `Ok` or a typed `Err`, never a panic. The seed
//! inputs are generated here with the crate's own writers and must be accepted;
//! `RRRA_WRITE_SEEDS=1` (re)writes them into the corpus (`tools/fuzz.sh` does).
//! Inputs that once crashed a reader are tests of their own at the end.

use rrra::fuzzing::{self, TARGETS};
use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target)
}

/// Runs `target` on `bytes`; `Err` holds the panic message.
fn replay(target: &str, bytes: &[u8]) -> Result<rrra::Result<()>, String> {
    catch_unwind(AssertUnwindSafe(|| {
        fuzzing::run(target, bytes).expect("a known target")
    }))
    .map_err(|p| {
        p.downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "non-string panic".into())
    })
}

#[test]
fn corpus_replays_without_panics() {
    let mut failures = Vec::new();
    for target in TARGETS {
        let dir = corpus_dir(target);
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        assert!(!files.is_empty(), "{}: no inputs", dir.display());
        let (mut ok, mut err) = (0, 0);
        for f in &files {
            let bytes = std::fs::read(f).unwrap();
            match replay(target, &bytes) {
                Ok(Ok(())) => ok += 1,
                Ok(Err(_)) => err += 1,
                Err(msg) => failures.push(format!("{}: {msg}", f.display())),
            }
        }
        println!(
            "{target}: {} inputs, {ok} accepted, {err} refused",
            files.len()
        );
    }
    assert!(failures.is_empty(), "panics:\n{}", failures.join("\n"));
}

/// Small valid inputs of every format: (target, name, bytes).
fn seeds(scratch: &Path) -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let mut s: Vec<(&'static str, &'static str, Vec<u8>)> = Vec::new();
    let text = |t: &str| t.as_bytes().to_vec();
    s.push((
        "jsonl_corpus",
        "beir",
        text(concat!(
            "{\"_id\": \"d1\", \"title\": \"Lift\", \"text\": \"Wings make lift.\"}\n",
            "{\"_id\": 2, \"title\": null, \"text\": \"Numeric id, no title.\", \"metadata\": {}}\n",
            "\n",
            "{\"_id\": \"d3\", \"text\": \"\\u00e9t\\u00e9 \\\"quoted\\\"\"}\n",
        )),
    ));
    s.push((
        "jsonl_corpus",
        "bom-crlf",
        [
            &b"\xEF\xBB\xBF"[..],
            b"{\"_id\":\"a\",\"text\":\"x\"}\r\n{\"_id\":\"b\",\"text\":\"y\"}",
        ]
        .concat(),
    ));
    s.push((
        "jsonl_queries",
        "beir",
        text(concat!(
            "{\"_id\": \"q1\", \"text\": \"what causes lift\", \"metadata\": {\"k\": 1}}\n",
            "{\"_id\": 7, \"text\": \"numeric id\"}\n",
        )),
    ));
    s.push((
        "train_jsonl",
        "flagembedding",
        text(concat!(
            "{\"query\": \"q one\", \"pos\": [\"p a\"], \"neg\": [\"n b\", \"n c\"]}\n",
            "{\"query\": \"q one\", \"pos\": [\"p d\"], \"neg\": [\"p a\"]}\n",
            "{\"query\": \"q two\", \"pos\": [\"n b\"], \"neg\": []}\n",
        )),
    ));
    s.push((
        "train_jsonl",
        "tevatron",
        text(concat!(
            "{\"query_id\": \"1\", \"query\": \"q one\", \"positive_passages\": ",
            "[{\"docid\": \"d1\", \"title\": \"T\", \"text\": \"a\"}], ",
            "\"negative_passages\": [{\"docid\": \"d2\", \"text\": \"b\"}]}\n",
            "{\"query_id\": \"1\", \"query\": \"q one\", \"positive_passages\": ",
            "[{\"docid\": \"d3\", \"text\": \"c\"}], \"negative_passages\": []}\n",
        )),
    ));
    s.push((
        "qrels_tsv",
        "beir",
        text("query-id\tcorpus-id\tscore\nq1\td1\t2\nq1\td2\t0\nq2\td1\t-1\n"),
    ));
    s.push((
        "qrels_tsv",
        "trec",
        text("1 0 doc-a 1\n1 0 doc-b 0\n2 0 doc-a 3\n"),
    ));
    s.push((
        "trec_run",
        "run",
        text(concat!(
            "q1 Q0 d1 1 0.91 tag\n",
            "q1 Q0 d2 2 0.354013 tag\n",
            "q2 Q0 d1 1 -2.5e-8 tag\n",
            "q1 Q0 d3 3 1e300 tag\n",
        )),
    ));

    // Stores of each dtype, and an empty one.
    use rrra::index::{write_store, Dtype, StoreSpec};
    let store = |name: &str, dtype: Dtype, dim: usize, n: usize| {
        let p = scratch.join(name);
        let ids: Vec<String> = (0..n).map(|i| format!("doc-{i}")).collect();
        let mut v = vec![0f32; n * dim];
        for (i, row) in v.chunks_exact_mut(dim).enumerate() {
            row[i % dim] = 1.0;
        }
        let spec = StoreSpec {
            dim,
            dtype,
            normalized: true,
            fingerprint: 0x0123_4567_89AB_CDEF,
            metadata_json: r#"{"model":"tiny","max_len":32,"pooling":"mean"}"#.into(),
        };
        write_store(&p, spec, &ids, &v).unwrap();
        std::fs::read(&p).unwrap()
    };
    s.push(("store", "f32", store("a.rrra", Dtype::F32, 4, 3)));
    s.push(("store", "f16", store("b.rrra", Dtype::F16, 8, 2)));
    s.push(("store", "bf16", store("c.rrra", Dtype::Bf16, 3, 2)));
    s.push(("store", "empty", store("d.rrra", Dtype::F32, 2, 0)));

    // A safetensors file with metadata, and a small training state with a mined pool.
    use rrra::train::checkpoint::{write_safetensors, write_safetensors_with_u32};
    use rrra::train::checkpoint::{NamedTensor, U32Tensor};
    let meta = |pairs: &[(&str, String)]| -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    };
    let w: Vec<f32> = (0..6).map(|i| i as f32 * 0.5).collect();
    let p = scratch.join("w.safetensors");
    write_safetensors(
        &p,
        &[NamedTensor {
            name: "w".into(),
            shape: vec![2, 3],
            data: &w,
        }],
        &meta(&[("format", "pt".into()), ("step", "3".into())]),
    )
    .unwrap();
    s.push(("safetensors_meta", "weights", std::fs::read(&p).unwrap()));
    let cfg = rrra::train::config::TrainConfig::new(
        "model".into(),
        rrra::train::config::DataSource::Jsonl {
            path: "train.jsonl".into(),
        },
        "out".into(),
    );
    let (q, d, scores) = ([0.6f32, 0.8], [1.0f32, 0.0, 0.0, 1.0], [0.8f32]);
    let (doc_ids, offsets) = ([1u32], [0u32, 1]);
    let p = scratch.join("training_state.safetensors");
    write_safetensors_with_u32(
        &p,
        &[
            NamedTensor {
                name: "param.000".into(),
                shape: vec![2],
                data: &w[..2],
            },
            NamedTensor {
                name: "pool.query_embeddings".into(),
                shape: vec![1, 2],
                data: &q,
            },
            NamedTensor {
                name: "pool.doc_embeddings".into(),
                shape: vec![2, 2],
                data: &d,
            },
            NamedTensor {
                name: "pool.scores".into(),
                shape: vec![1],
                data: &scores,
            },
        ],
        &[
            U32Tensor {
                name: "pool.doc_ids".into(),
                shape: vec![1],
                data: &doc_ids,
            },
            U32Tensor {
                name: "pool.offsets".into(),
                shape: vec![2],
                data: &offsets,
            },
        ],
        &meta(&[
            ("format", "rrra-train-state-v1".into()),
            ("rrra.config", cfg.to_json().to_string()),
            ("rrra.step", "4".into()),
            ("rrra.epoch", "0".into()),
            ("rrra.cursor", "1".into()),
            ("rrra.adam_step", "4".into()),
            ("rrra.pool_step", "0".into()),
            ("rrra.has_pool", "true".into()),
        ]),
    )
    .unwrap();
    s.push((
        "safetensors_meta",
        "training-state",
        std::fs::read(&p).unwrap(),
    ));

    s.push((
        "bert_config",
        "tiny-bert",
        text(concat!(
            "{\n  \"architectures\": [\"BertModel\"],\n  \"model_type\": \"bert\",\n",
            "  \"vocab_size\": 30522,\n  \"hidden_size\": 32,\n  \"num_hidden_layers\": 2,\n",
            "  \"num_attention_heads\": 2,\n  \"intermediate_size\": 37,\n",
            "  \"hidden_act\": \"gelu\",\n  \"max_position_embeddings\": 512,\n",
            "  \"type_vocab_size\": 2,\n  \"layer_norm_eps\": 1e-12\n}\n",
        )),
    ));
    s.push((
        "bert_config",
        "minimal",
        text(r#"{"vocab_size":8,"hidden_size":4,"num_hidden_layers":1,"num_attention_heads":1,"intermediate_size":8}"#),
    ));

    use rrra::adapter::calibrate::FnCalibration;
    use rrra::adapter::file::AdapterFile;
    let p = scratch.join("adapter.safetensors");
    AdapterFile {
        params: rrra::adapter::AdapterParams::init(4, 3, 1).unwrap(),
        calibration: FnCalibration::default(),
        lambda_rr: 2.0,
        tau: 0.05,
        train_config: Default::default(),
        info: serde_json::json!({"encoder": "tiny"}),
    }
    .save(&p)
    .unwrap();
    s.push(("adapter_file", "adapter", std::fs::read(&p).unwrap()));
    s
}

#[test]
fn seeds_are_accepted() {
    let scratch = tempfile::tempdir().unwrap();
    let write = std::env::var_os("RRRA_WRITE_SEEDS").is_some_and(|v| v == "1");
    let seeds = seeds(scratch.path());
    for target in TARGETS {
        assert!(
            seeds.iter().any(|(t, _, _)| *t == target),
            "no seed for {target}"
        );
    }
    for (target, name, bytes) in seeds {
        match replay(target, &bytes) {
            Ok(Ok(())) => {}
            other => panic!("seed {target}/{name}: {other:?}"),
        }
        if write {
            let dir = corpus_dir(target);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(format!("seed-{name}")), &bytes).unwrap();
        }
    }
}
