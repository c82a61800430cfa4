//! Training runs end to end through the CLI on the tiny random BERT of the fixtures and the
//! Cranfield collection: a run killed with SIGKILL between checkpoints and resumed computes
//! bitwise the same losses (and the same final weights) as an uninterrupted run, and the saved
//! checkpoint is a model folder `rrra encode` loads to the same embeddings as the in-memory model.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn rrra() -> Command {
    Command::new(env!("CARGO_BIN_EXE_rrra"))
}

fn tiny_bert() -> PathBuf {
    common::shared().join("fixtures/tiny-bert")
}

fn cranfield() -> PathBuf {
    common::shared().join("data/cranfield")
}

/// A short run that exercises everything a resume must restore: dropout, SimANS draws, random
/// negatives, gradient accumulation, a re-mine at step 3 (after the checkpoint of step 2) and
/// AdamW moments.
fn train_args(out: &Path) -> Vec<String> {
    let mut v: Vec<String> = vec![
        "--threads".into(),
        "2".into(),
        "train".into(),
        "--model".into(),
        tiny_bert().display().to_string(),
        "--beir".into(),
        cranfield().display().to_string(),
        "--out".into(),
        out.display().to_string(),
    ];
    for a in [
        "--max-steps",
        "6",
        "--batch-size",
        "8",
        "--grad-accum",
        "2",
        "--hard-negatives",
        "3",
        "--random-negatives",
        "1",
        "--doc-max-length",
        "96",
        "--mine-every",
        "3",
        "--mine-top-k",
        "50",
        "--checkpoint-every",
        "2",
        "--lr",
        "1e-3",
    ] {
        v.push(a.into());
    }
    v
}

/// (step, loss) of every step record of a run log, in order.
fn losses(log: &Path) -> Vec<(u64, f64)> {
    let text = std::fs::read_to_string(log).unwrap();
    text.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("event").is_none())
        .map(|v| (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap()))
        .collect()
}

#[test]
fn a_killed_run_resumes_bitwise() {
    let dir = tempfile::tempdir().unwrap();
    let (full, killed) = (dir.path().join("full"), dir.path().join("killed"));

    let st = rrra().args(train_args(&full)).output().unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let reference = losses(&full.join("train_log.jsonl"));
    assert_eq!(
        reference.iter().map(|r| r.0).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5, 6]
    );

    // Run again and SIGKILL it right after it reports step 3: the last checkpoint is step 2,
    // and step 3 is in the log but not in any checkpoint.
    let mut child = rrra()
        .args(train_args(&killed))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut seen = Vec::new();
    for line in BufReader::new(stderr).lines() {
        let line = line.unwrap();
        let at_step_3 = line.starts_with("step 3/");
        seen.push(line);
        if at_step_3 {
            child.kill().unwrap(); // SIGKILL on Unix
            break;
        }
    }
    child.wait().unwrap();
    assert!(
        seen.iter().any(|l| l.starts_with("step 3/")),
        "the run never reached step 3: {seen:#?}"
    );
    let state = killed.join("training_state.safetensors");
    let meta = common::safetensors_metadata(&state);
    assert_eq!(
        meta["rrra.step"], "2",
        "the kill must land between checkpoints 2 and 4"
    );
    assert!(losses(&killed.join("train_log.jsonl"))
        .iter()
        .any(|r| r.0 == 3));

    let st = rrra()
        .args(["--threads", "1", "train", "--resume"])
        .arg(&killed)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let resumed = losses(&killed.join("train_log.jsonl"));
    // Every step once, and each loss bit for bit (different thread counts on purpose).
    assert_eq!(resumed.len(), reference.len());
    for ((s1, a), (s2, b)) in reference.iter().zip(&resumed) {
        assert_eq!(s1, s2);
        assert_eq!(a.to_bits(), b.to_bits(), "step {s1}: {a} vs {b}");
    }
    // The weights bit for bit (the files' metadata differs: it records each run's folder).
    let weights = |d: &Path| {
        rrra::train::checkpoint::read_safetensors(&d.join("model/model.safetensors"))
            .unwrap()
            .tensors
    };
    let (a, b) = (weights(&full), weights(&killed));
    assert_eq!(a.len(), b.len());
    for (name, (_, x)) in &a {
        let y = &b[name].1;
        assert!(
            x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits()),
            "final weights differ in {name}"
        );
    }
}

#[test]
fn a_checkpoint_encodes_like_the_in_memory_model() {
    use rrra::train::config::{DataSource, TrainConfig};
    use rrra::train::trainer::Trainer;

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let mut cfg = TrainConfig::new(
        tiny_bert(),
        DataSource::Beir {
            dir: cranfield(),
            split: "train".into(),
        },
        out.clone(),
    );
    cfg.max_steps = Some(2);
    cfg.batch_size = 4;
    cfg.hard_negatives = 2;
    cfg.doc_max_length = 64;
    cfg.lr = 1e-3;
    let mut trainer = Trainer::new(cfg).unwrap();
    trainer.run(None, &mut |_| {}).unwrap();

    // A few corpus documents through `rrra encode` from the checkpoint folder...
    let docs = rrra::data::read_corpus(&cranfield().join("corpus.jsonl")).unwrap();
    let sample = &docs[..20];
    let corpus = dir.path().join("corpus.jsonl");
    let lines: Vec<String> = sample
        .iter()
        .map(|d| serde_json::json!({"_id": d.id, "title": "", "text": d.text}).to_string())
        .collect();
    std::fs::write(&corpus, lines.join("\n")).unwrap();
    let store = dir.path().join("sample.rrra");
    let st = rrra()
        .args(["encode", "--max-length", "64", "--model"])
        .arg(out.join("model"))
        .arg("--corpus")
        .arg(&corpus)
        .arg("--out")
        .arg(&store)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let store = rrra::index::store::Store::open(&store).unwrap();

    // ...equal the trained encoder's own embeddings, bit for bit (weights are saved as f32; the
    // folder keeps the source model's inference length, so the training length is passed).
    let texts: Vec<&str> = sample.iter().map(|d| d.text.as_str()).collect();
    let mem = trainer.encoder().encode(&texts, 32).unwrap();
    let dim = trainer.encoder().dim();
    let mut got = vec![0.0f32; mem.len()];
    store.vectors().to_f32(0, &mut got);
    assert_eq!(store.dim(), dim);
    for (i, (got, want)) in got.chunks_exact(dim).zip(mem.chunks_exact(dim)).enumerate() {
        assert!(
            got.iter()
                .zip(want)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "document {i} differs"
        );
    }
    // The trained weights differ from the starting ones (the run did train).
    let start = std::fs::read(tiny_bert().join("model.safetensors")).unwrap();
    assert!(std::fs::read(out.join("model/model.safetensors")).unwrap() != start);
}

#[test]
fn a_flagembedding_file_trains_on_its_given_negatives() {
    let dir = tempfile::tempdir().unwrap();
    let docs = rrra::data::read_corpus(&cranfield().join("corpus.jsonl")).unwrap();
    // eight queries, each with one positive and three given negatives drawn from Cranfield texts
    let lines: Vec<String> = (0..8)
        .map(|i| {
            serde_json::json!({
                "query": format!("question number {i} about {}", &docs[i * 5].text[..20]),
                "pos": [docs[i * 5].text],
                "neg": [docs[i * 5 + 1].text, docs[i * 5 + 2].text, docs[i * 5 + 3].text],
            })
            .to_string()
        })
        .collect();
    let data = dir.path().join("train.jsonl");
    std::fs::write(&data, lines.join("\n")).unwrap();
    let out = dir.path().join("run");
    let st = rrra()
        .args(["train", "--model"])
        .arg(tiny_bert())
        .arg("--train-jsonl")
        .arg(&data)
        .arg("--out")
        .arg(&out)
        .args([
            "--negative-pool",
            "given",
            "--hard-negatives",
            "2",
            "--batch-size",
            "4",
        ])
        .args(["--doc-max-length", "64", "--sampler", "uniform"])
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let text = std::fs::read_to_string(out.join("train_log.jsonl")).unwrap();
    let steps: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &serde_json::Value| v.get("event").is_none())
        .collect();
    assert_eq!(steps.len(), 2, "8 pairs in batches of 4");
    for s in &steps {
        // two of each query's three given negatives are drawn (none is a positive)
        assert_eq!(s["hard_negatives_per_query"].as_f64(), Some(2.0));
        assert!(s["loss"].as_f64().unwrap().is_finite());
    }
    assert!(out.join("model/model.safetensors").exists());
}

/// The trainer's offload hook with a CPU stand-in for the GPU encoder: the same steps, dropout
/// on, must give bitwise the same model as the plain CPU path, with the weights uploaded once
/// per optimizer step used. (The GPU encoder itself is checked against the CPU in
/// tests/gpu_encoder_train.rs.)
#[test]
fn an_offloaded_encoder_trains_like_the_cpu_path() {
    use rrra::model::weights::BertWeights;
    use rrra::model::{Encoder, EncoderOptions};
    use rrra::train::config::{DataSource, TrainConfig};
    use rrra::train::encoder_grad::{
        ActivationMode, Activations, DropoutPlan, OffloadedEncoder, TrainBatch, TrainableEncoder,
    };
    use rrra::train::trainer::Trainer;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    struct CpuStandIn {
        enc: Encoder,
        batch: Option<TrainBatch>,
        acts: Option<Activations>,
        dropout: DropoutPlan,
        uploads: Arc<AtomicUsize>,
        encodes: Arc<AtomicUsize>,
    }
    impl OffloadedEncoder for CpuStandIn {
        fn set_weights(&mut self, w: &BertWeights) -> rrra::Result<()> {
            self.uploads.fetch_add(1, Ordering::SeqCst);
            let mine = &mut self.enc.bert_mut().weights;
            for ((dst, _), src) in mine.tensors_mut().into_iter().zip(w.tensors()) {
                dst.copy_from_slice(src);
            }
            Ok(())
        }
        fn forward(&mut self, batch: &TrainBatch, dropout: &DropoutPlan) -> rrra::Result<Vec<f32>> {
            let te = TrainableEncoder {
                bert: self.enc.bert(),
                pooling: self.enc.pooling(),
                normalize: self.enc.normalize(),
            };
            let acts = te.forward(batch, dropout, ActivationMode::Keep)?;
            let emb = acts.embeddings.clone();
            let tb = TrainBatch {
                packed: batch.packed.clone(),
                example_ids: batch.example_ids.clone(),
            };
            (self.batch, self.acts, self.dropout) = (Some(tb), Some(acts), *dropout);
            Ok(emb)
        }
        fn backward(&mut self, d_emb: &[f32], grads: &mut BertWeights) -> rrra::Result<()> {
            let te = TrainableEncoder {
                bert: self.enc.bert(),
                pooling: self.enc.pooling(),
                normalize: self.enc.normalize(),
            };
            let (tb, acts) = (self.batch.take().unwrap(), self.acts.take().unwrap());
            te.backward(&tb, &self.dropout, acts, d_emb, grads)
        }
        fn encode(&mut self, texts: &[rrra::model::tokenizer::Tokens]) -> rrra::Result<Vec<f32>> {
            self.encodes.fetch_add(1, Ordering::SeqCst);
            self.enc.encode_tokens(texts, 32, &|_| {})
        }
    }

    let dir = tempfile::tempdir().unwrap();
    let model = common::tiny_bert_with_dropout(dir.path());
    let config = |out: &str, dropout: bool| {
        let mut cfg = TrainConfig::new(
            model.clone(),
            DataSource::Beir {
                dir: cranfield(),
                split: "train".into(),
            },
            dir.path().join(out),
        );
        cfg.max_steps = Some(3);
        cfg.batch_size = 4;
        cfg.grad_accum = 2;
        cfg.hard_negatives = 2;
        cfg.doc_max_length = 64;
        cfg.lr = 1e-3;
        cfg.dropout = dropout;
        cfg.mine_every = Some(2); // a second mining, after an update
        cfg
    };
    let (uploads, encodes) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let stand_in = || {
        Box::new(CpuStandIn {
            enc: Encoder::load(&model, &EncoderOptions::default()).unwrap(),
            batch: None,
            acts: None,
            dropout: DropoutPlan::none(),
            uploads: uploads.clone(),
            encodes: encodes.clone(),
        })
    };

    // dropout on: the stand-in must get the run's masks (plan and example ids)
    let mut plain = Trainer::new(config("plain", true)).unwrap();
    plain.run(None, &mut |_| {}).unwrap();
    let mut offloaded = Trainer::new(config("offloaded", true)).unwrap();
    offloaded.offload_encoder(stand_in());
    offloaded.run(None, &mut |_| {}).unwrap();

    assert_eq!(
        uploads.load(Ordering::SeqCst),
        3,
        "one upload per optimizer step"
    );
    let (a, b) = (
        plain.encoder().bert().weights.tensors(),
        offloaded.encoder().bert().weights.tensors(),
    );
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(
            x.iter()
                .zip(y.iter())
                .all(|(p, q)| p.to_bits() == q.to_bits()),
            "tensor {i} differs"
        );
    }
    let start = Encoder::load(&model, &EncoderOptions::default()).unwrap();
    assert!(start.bert().weights.tensors() != a, "the run trained");
    // and dropout was on: a run without it ends elsewhere
    let mut no_dropout = Trainer::new(config("no-dropout", false)).unwrap();
    no_dropout.run(None, &mut |_| {}).unwrap();
    assert!(
        no_dropout.encoder().bert().weights.tensors() != a,
        "dropout changed the run"
    );
}
