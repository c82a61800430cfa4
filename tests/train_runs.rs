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

/// CPU stand-ins for the GPU encoders of `rrra train --device cuda`, to check the trainer's side of
/// the offload hooks where no GPU is (the GPU encoders themselves are checked against the CPU
/// in tests/gpu_encoder_train.rs and tests/gpu_train_run.rs).
mod stand_in {
    use rrra::adapter::fit::{AdapterOp, CpuAdapterOp, ForwardPass};
    use rrra::adapter::AdapterParams;
    use rrra::index::{search_batch, Corpus, Hit};
    use rrra::model::weights::BertWeights;
    use rrra::model::Encoder;
    use rrra::train::collective::Collective;
    use rrra::train::encoder_grad::{
        ActivationMode, Activations, DropoutPlan, OffloadedEncoder, ResidentOptimizer, TrainBatch,
        TrainableEncoder,
    };
    use rrra::train::loss::{info_nce, InfoNceInput, InfoNceStats};
    use rrra::train::optim::{encoder_step, AdamW};
    use rrra::train::parallel::backward_groups;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// Counts of the hooks' traffic.
    #[derive(Default)]
    pub struct Counts {
        pub uploads: AtomicUsize,
        pub encodes: AtomicUsize,
        pub searches: AtomicUsize,
        pub downloads: AtomicUsize,
        /// Calls of the joint adapter's op (forward, backward and scoring).
        pub adapter_calls: AtomicUsize,
        /// Contrastive losses computed by the stand-in.
        pub losses: AtomicUsize,
    }

    /// The CPU reference adapter op behind the capacity the trainer asked for, as a GPU's
    /// buffers are sized: a call beyond it fails, as `GpuAdapterGrad`'s would.
    pub struct SizedAdapterOp {
        pub inner: CpuAdapterOp,
        pub capacity: (usize, usize),
        pub counts: Arc<Counts>,
    }

    impl SizedAdapterOp {
        fn admit(&self, queries: usize, k: usize) -> rrra::Result<()> {
            self.counts.adapter_calls.fetch_add(1, Ordering::SeqCst);
            let (q, p) = self.capacity;
            if queries > q || queries * k > p {
                return Err(rrra::Error::InvalidArgument(format!(
                    "{queries} queries × {k} candidates exceed the adapter op's {q} × {p}"
                )));
            }
            Ok(())
        }
    }

    impl AdapterOp for SizedAdapterOp {
        fn capacity(&self) -> Option<(usize, usize)> {
            Some(self.capacity)
        }
        fn logits(
            &mut self,
            params: &AdapterParams,
            queries: &[f32],
            candidates: &[f32],
            k: usize,
        ) -> rrra::Result<Vec<f32>> {
            self.admit(queries.len() / params.d, k)?;
            self.inner.logits(params, queries, candidates, k)
        }
        fn forward(
            &mut self,
            params: &AdapterParams,
            queries: &[f32],
            candidates: &[f32],
            contexts: Option<&[f32]>,
            k: usize,
        ) -> rrra::Result<ForwardPass> {
            self.admit(queries.len() / params.d, k)?;
            self.inner.forward(params, queries, candidates, contexts, k)
        }
        fn backward(
            &mut self,
            params: &AdapterParams,
            queries: &[f32],
            candidates: &[f32],
            contexts: Option<&[f32]>,
            k: usize,
            d_logit: &[f32],
            d_a_extra: Option<&[f32]>,
            grads: &mut AdapterParams,
            d_queries: Option<&mut [f32]>,
            d_candidates: Option<&mut [f32]>,
        ) -> rrra::Result<()> {
            self.admit(queries.len() / params.d, k)?;
            self.inner.backward(
                params,
                queries,
                candidates,
                contexts,
                k,
                d_logit,
                d_a_extra,
                grads,
                d_queries,
                d_candidates,
            )
        }
    }

    /// The forward and backward of `TrainableEncoder` behind `OffloadedEncoder`.
    pub struct Offloaded {
        pub enc: Encoder,
        pub batch: Option<TrainBatch>,
        pub acts: Option<Activations>,
        pub dropout: DropoutPlan,
        pub counts: Arc<Counts>,
        /// Mining searches answer worst first (to see that the trainer uses the answer).
        pub reverse_hits: bool,
        /// Offer the joint adapter a place ([`SizedAdapterOp`]), as a GPU encoder does.
        pub adapter_op: bool,
    }

    impl Offloaded {
        pub fn new(enc: Encoder, counts: Arc<Counts>) -> Self {
            Offloaded {
                enc,
                batch: None,
                acts: None,
                dropout: DropoutPlan::none(),
                counts,
                reverse_hits: false,
                adapter_op: false,
            }
        }
    }

    impl OffloadedEncoder for Offloaded {
        fn set_weights(&mut self, w: &BertWeights) -> rrra::Result<()> {
            self.counts.uploads.fetch_add(1, Ordering::SeqCst);
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
            self.counts.encodes.fetch_add(1, Ordering::SeqCst);
            self.enc.encode_tokens(texts, 32, &|_| {})
        }
        fn search(
            &mut self,
            docs: &[f32],
            queries: &[f32],
            dim: usize,
            depth: usize,
        ) -> Option<rrra::Result<Vec<Vec<Hit>>>> {
            self.counts.searches.fetch_add(1, Ordering::SeqCst);
            let corpus = match Corpus::from_f32(docs, dim) {
                Ok(c) => c,
                Err(e) => return Some(Err(e)),
            };
            let mut hits = search_batch(&corpus, queries, depth);
            if let (Ok(h), true) = (&mut hits, self.reverse_hits) {
                h.iter_mut().for_each(|q| q.reverse());
            }
            Some(hits)
        }
        fn info_nce(
            &mut self,
            input: &InfoNceInput<'_>,
            dq: &mut [f32],
            dd: &mut [f32],
        ) -> Option<rrra::Result<InfoNceStats>> {
            self.counts.losses.fetch_add(1, Ordering::SeqCst);
            Some(info_nce(input, dq, dd))
        }
        fn adapter_op(
            &mut self,
            _d: usize,
            _h: usize,
            max_queries: usize,
            max_pairs: usize,
        ) -> Option<rrra::Result<Box<dyn AdapterOp>>> {
            self.adapter_op.then(|| {
                Ok(Box::new(SizedAdapterOp {
                    inner: CpuAdapterOp::default(),
                    capacity: (max_queries, max_pairs),
                    counts: self.counts.clone(),
                }) as Box<dyn AdapterOp>)
            })
        }
    }

    /// [`Offloaded`] keeping its own gradients and AdamW, as `GpuTrainStep` does on a GPU.
    pub struct Resident {
        pub inner: Offloaded,
        pub grads: BertWeights,
        pub optim: Option<AdamW>,
    }

    impl Resident {
        pub fn new(enc: Encoder, counts: Arc<Counts>) -> Self {
            let grads = BertWeights::zeros(enc.config());
            Resident {
                inner: Offloaded::new(enc, counts),
                grads,
                optim: None,
            }
        }
    }

    impl ResidentOptimizer for Resident {
        fn load(&mut self, weights: &BertWeights, optim: &AdamW) -> rrra::Result<()> {
            self.inner.set_weights(weights)?;
            self.optim = Some(optim.clone());
            Ok(())
        }
        fn zero_grads(&mut self) -> rrra::Result<()> {
            self.grads.fill_zero();
            Ok(())
        }
        fn accumulate(&mut self, d_emb: &[f32]) -> rrra::Result<()> {
            self.inner.backward(d_emb, &mut self.grads)
        }
        fn all_reduce_grads(&mut self, comm: &dyn Collective) -> rrra::Result<()> {
            // the GPU's order (tensors as the backward finishes them)
            let layers = self.grads.layers.len();
            let mut tensors = self.grads.tensors_mut();
            for group in backward_groups(layers) {
                for (t, _) in &mut tensors[group] {
                    comm.all_reduce_sum(t)?;
                }
            }
            Ok(())
        }
        fn update(&mut self, scale: f32, max_norm: f32, lr: f32) -> rrra::Result<f32> {
            let optim = self.optim.as_mut().expect("load comes first");
            let weights = &mut self.inner.enc.bert_mut().weights;
            encoder_step(optim, weights, &mut self.grads, scale, max_norm, lr)
        }
        fn store(&mut self, into: &mut BertWeights, optim: &mut AdamW) -> rrra::Result<()> {
            self.inner.counts.downloads.fetch_add(1, Ordering::SeqCst);
            let mine = self.inner.enc.bert().weights.tensors();
            for ((dst, _), src) in into.tensors_mut().into_iter().zip(mine) {
                dst.copy_from_slice(src);
            }
            *optim = self.optim.clone().expect("load comes first");
            Ok(())
        }
    }

    impl OffloadedEncoder for Resident {
        fn set_weights(&mut self, w: &BertWeights) -> rrra::Result<()> {
            self.inner.set_weights(w)
        }
        fn forward(&mut self, batch: &TrainBatch, dropout: &DropoutPlan) -> rrra::Result<Vec<f32>> {
            self.inner.forward(batch, dropout)
        }
        fn backward(&mut self, d_emb: &[f32], grads: &mut BertWeights) -> rrra::Result<()> {
            self.inner.backward(d_emb, grads)
        }
        fn encode(&mut self, texts: &[rrra::model::tokenizer::Tokens]) -> rrra::Result<Vec<f32>> {
            self.inner.encode(texts)
        }
        fn info_nce(
            &mut self,
            input: &InfoNceInput<'_>,
            dq: &mut [f32],
            dd: &mut [f32],
        ) -> Option<rrra::Result<InfoNceStats>> {
            self.inner.info_nce(input, dq, dd)
        }
        fn resident(&mut self) -> Option<&mut dyn ResidentOptimizer> {
            Some(self)
        }
    }
}

/// A short offloaded run: dropout on or off, gradient accumulation, and a second mining after
/// an update.
fn offload_config(model: &Path, out: PathBuf, dropout: bool) -> rrra::train::config::TrainConfig {
    use rrra::train::config::{DataSource, TrainConfig};
    let mut cfg = TrainConfig::new(
        model.to_path_buf(),
        DataSource::Beir {
            dir: cranfield(),
            split: "train".into(),
        },
        out,
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
}

fn assert_same_weights(a: &rrra::model::Encoder, b: &rrra::model::Encoder, what: &str) {
    let (a, b) = (a.bert().weights.tensors(), b.bert().weights.tensors());
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(
            x.iter()
                .zip(y.iter())
                .all(|(p, q)| p.to_bits() == q.to_bits()),
            "{what}: tensor {i} differs"
        );
    }
}

/// The trainer's offload hook with a CPU stand-in for the GPU encoder: the same steps, dropout
/// on, must give bitwise the same model as the plain CPU path, with the weights uploaded once
/// per optimizer step used, and every loss computed by the stand-in.
#[test]
fn an_offloaded_encoder_trains_like_the_cpu_path() {
    use rrra::model::{Encoder, EncoderOptions};
    use rrra::train::trainer::Trainer;
    use std::sync::atomic::Ordering;
    use std::sync::Arc;

    let dir = tempfile::tempdir().unwrap();
    let model = common::tiny_bert_with_dropout(dir.path());
    let counts = Arc::new(stand_in::Counts::default());
    let load = || Encoder::load(&model, &EncoderOptions::default()).unwrap();

    // dropout on: the stand-in must get the run's masks (plan and example ids)
    let mut plain = Trainer::new(offload_config(&model, dir.path().join("plain"), true)).unwrap();
    plain.run(None, &mut |_| {}).unwrap();
    let mut offloaded =
        Trainer::new(offload_config(&model, dir.path().join("offloaded"), true)).unwrap();
    offloaded
        .offload_encoder(Box::new(stand_in::Offloaded::new(load(), counts.clone())))
        .unwrap();
    offloaded.run(None, &mut |_| {}).unwrap();

    assert_eq!(
        counts.uploads.load(Ordering::SeqCst),
        3,
        "one upload per optimizer step"
    );
    assert_eq!(
        counts.encodes.load(Ordering::SeqCst),
        4,
        "two minings, each encoding the documents and the queries"
    );
    assert_eq!(
        counts.searches.load(Ordering::SeqCst),
        2,
        "two minings, each searching where the encoder runs"
    );
    assert_eq!(
        counts.losses.load(Ordering::SeqCst),
        6,
        "three steps of two micro-batches, each loss where the encoder runs"
    );
    assert_same_weights(plain.encoder(), offloaded.encoder(), "offloaded");
    let a = plain.encoder().bert().weights.tensors();
    assert!(load().bert().weights.tensors() != a, "the run trained");
    // and dropout was on: a run without it ends elsewhere
    let mut no_dropout =
        Trainer::new(offload_config(&model, dir.path().join("no-dropout"), false)).unwrap();
    no_dropout.run(None, &mut |_| {}).unwrap();
    assert!(
        no_dropout.encoder().bert().weights.tensors() != a,
        "dropout changed the run"
    );
}

/// The trainer mines from the hits of the offloaded encoder's search (the GPU's top-k), not
/// from a search of its own: a stand-in answering worst first gives rank-1 negatives that
/// score lower than those of the CPU search.
#[test]
fn mining_uses_the_offloaded_encoders_search() {
    use rrra::model::{Encoder, EncoderOptions};
    use rrra::train::trainer::{TrainEvent, Trainer};
    use std::sync::Arc;

    let dir = tempfile::tempdir().unwrap();
    let model = common::tiny_bert_with_dropout(dir.path());
    let rank1 = |out: &str, reverse: Option<bool>| -> Vec<f64> {
        let mut cfg = offload_config(&model, dir.path().join(out), false);
        cfg.max_steps = Some(1);
        let mut t = Trainer::new(cfg).unwrap();
        if let Some(reverse) = reverse {
            let enc = Encoder::load(&model, &EncoderOptions::default()).unwrap();
            let mut dev = stand_in::Offloaded::new(enc, Arc::default());
            dev.reverse_hits = reverse;
            t.offload_encoder(Box::new(dev)).unwrap();
        }
        let mut means = Vec::new();
        t.run(None, &mut |e| {
            if let TrainEvent::Mined(s) = e {
                means.push(s.negative_rank1.mean);
            }
        })
        .unwrap();
        means
    };
    let (cpu, same, reversed) = (
        rank1("cpu", None),
        rank1("same", Some(false)),
        rank1("reversed", Some(true)),
    );
    assert_eq!(cpu.len(), 1);
    assert_eq!(same, cpu, "the same hits, the same pool");
    assert!(
        reversed[0] < cpu[0] - 1e-3,
        "rank-1 negatives {reversed:?} vs {cpu:?}: the trainer ignored the search"
    );
}

/// With an offloaded encoder that keeps the optimizer too (`rrra train --device cuda`), the
/// trainer must hand it the weights and AdamW state once, copy them back for every checkpoint
/// (and not otherwise: evaluations encode on the offloaded encoder), and give it the same
/// scale, clip and learning rate as its own step: bitwise the CPU run, evaluations included,
/// for an uninterrupted run and for one stopped after its checkpoint at step 2 and resumed
/// (the moments go to the device and back).
#[test]
fn a_resident_optimizer_trains_like_the_cpu_path() {
    use rrra::model::{Encoder, EncoderOptions};
    use rrra::train::config::EvalSpec;
    use rrra::train::trainer::Trainer;
    use std::sync::atomic::Ordering;
    use std::sync::Arc;

    let dir = tempfile::tempdir().unwrap();
    let model = common::tiny_bert_with_dropout(dir.path());
    let load = || Encoder::load(&model, &EncoderOptions::default()).unwrap();
    let config = |out: &str| {
        let mut cfg = offload_config(&model, dir.path().join(out), true);
        cfg.max_steps = Some(4);
        cfg.max_grad_norm = 0.05; // small enough that clipping acts
        cfg.checkpoint_every = Some(2);
        cfg.eval = Some(EvalSpec {
            dir: cranfield(),
            split: "test".into(),
            every: Some(3),
        });
        cfg
    };
    let norms = |t: &mut Trainer, stop: Option<u64>| {
        let mut out = Vec::new();
        t.run(stop, &mut |e| {
            if let rrra::train::trainer::TrainEvent::Step(r) = e {
                out.push((r.grad_norm, r.loss));
            }
        })
        .unwrap();
        out
    };

    let mut plain = Trainer::new(config("plain")).unwrap();
    let plain_steps = norms(&mut plain, None);
    assert!(
        plain_steps.iter().any(|&(n, _)| n > 0.05),
        "clipping acted: {plain_steps:?}"
    );

    let counts = Arc::new(stand_in::Counts::default());
    let mut resident = Trainer::new(config("resident")).unwrap();
    resident
        .offload_encoder(Box::new(stand_in::Resident::new(load(), counts.clone())))
        .unwrap();
    let resident_steps = norms(&mut resident, None);
    assert_eq!(resident_steps, plain_steps, "norms and losses");
    assert_same_weights(plain.encoder(), resident.encoder(), "resident");
    assert_eq!(
        counts.uploads.load(Ordering::SeqCst),
        1,
        "one upload, at the start"
    );
    // the checkpoints of steps 2 and 4; the evaluations of steps 3 and 4 encode on the
    // offloaded encoder, with its weights, and copy nothing back
    assert_eq!(counts.downloads.load(Ordering::SeqCst), 2, "copies back");
    assert!(
        counts.encodes.load(Ordering::SeqCst) >= 2 * 2 + 2 * 2,
        "two minings and two evaluations, each encoding documents and queries there"
    );
    let saved = Encoder::load(&dir.path().join("resident/model"), &Default::default()).unwrap();
    assert_same_weights(plain.encoder(), &saved, "resident checkpoint");
    let eval_lines = |out: &str| -> Vec<String> {
        std::fs::read_to_string(dir.path().join(out).join("train_log.jsonl"))
            .unwrap()
            .lines()
            .filter(|l| l.contains("\"event\":\"eval\""))
            .map(String::from)
            .collect()
    };
    assert_eq!(eval_lines("resident"), eval_lines("plain"), "evaluations");
    assert_eq!(eval_lines("plain").len(), 2);

    // stopped after the checkpoint of step 2, resumed with a fresh stand-in
    let out = dir.path().join("resumed");
    let mut first = Trainer::new(config("resumed")).unwrap();
    first
        .offload_encoder(Box::new(stand_in::Resident::new(load(), counts.clone())))
        .unwrap();
    let mut steps = norms(&mut first, Some(2));
    drop(first);
    let mut again = Trainer::resume(&out).unwrap();
    again
        .offload_encoder(Box::new(stand_in::Resident::new(load(), counts.clone())))
        .unwrap();
    steps.extend(norms(&mut again, None));
    assert_eq!(steps, plain_steps, "resumed: norms and losses");
    assert_same_weights(plain.encoder(), again.encoder(), "resumed");
}

/// Data-parallel trainer runs on threads (`InProcess` ranks).
mod ranks {
    use super::stand_in::Resident;
    use rrra::model::Encoder;
    use rrra::train::collective::{Collective, InProcess};
    use rrra::train::config::TrainConfig;
    use rrra::train::trainer::{TrainEvent, Trainer};
    use std::sync::Arc;

    pub type Weights = Vec<Vec<f32>>;

    /// What a run reports per step: the loss and the mean s_FN of the drawn negatives.
    pub fn steps(t: &mut Trainer, stop: Option<u64>) -> Vec<(f64, Option<f64>)> {
        let mut out = Vec::new();
        t.run(stop, &mut |e| {
            if let TrainEvent::Step(r) = e {
                out.push((r.loss, r.fn_mean_drawn));
            }
        })
        .unwrap();
        out
    }

    pub fn weights(t: &Trainer) -> Weights {
        let w = t.encoder().bert().weights.tensors();
        w.iter().map(|x| x.to_vec()).collect()
    }

    pub fn bits(w: &Weights) -> Vec<u32> {
        w.iter().flatten().map(|v| v.to_bits()).collect()
    }

    /// Every rank of a `world`-rank run of `cfg` in its own thread (a fresh run, or a resume of
    /// `cfg.output`), to the end or `stop` more steps: rank 0's steps; the ranks must end with
    /// bitwise the same weights, which are returned.
    pub fn run(
        cfg: &TrainConfig,
        world: usize,
        stop: Option<u64>,
        resume: bool,
    ) -> (Vec<(f64, Option<f64>)>, Weights) {
        run_with(cfg, world, stop, resume, false)
    }

    /// [`run`], with each rank's encoder behind the resident-optimizer stand-in when
    /// `resident` (the ranks then sum their gradients through it).
    pub fn run_with(
        cfg: &TrainConfig,
        world: usize,
        stop: Option<u64>,
        resume: bool,
        resident: bool,
    ) -> (Vec<(f64, Option<f64>)>, Weights) {
        let results: Vec<_> = std::thread::scope(|scope| {
            let handles: Vec<_> = InProcess::group(world)
                .into_iter()
                .map(|comm| {
                    let cfg = cfg.clone();
                    scope.spawn(move || {
                        let comm: Arc<dyn Collective> = Arc::new(comm);
                        let mut t = if resume {
                            Trainer::resume_rank(&cfg.output, comm).unwrap()
                        } else {
                            Trainer::new_rank(cfg.clone(), comm).unwrap()
                        };
                        if resident {
                            let enc = Encoder::load(&cfg.model, &Default::default()).unwrap();
                            let counts = Default::default();
                            t.offload_encoder(Box::new(Resident::new(enc, counts)))
                                .unwrap();
                        }
                        (steps(&mut t, stop), weights(&t))
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (r, (_, w)) in results.iter().enumerate().skip(1) {
            assert_eq!(
                bits(w),
                bits(&results[0].1),
                "{}: rank {r} holds other weights than rank 0",
                cfg.output.display()
            );
        }
        results.into_iter().next().unwrap()
    }

    /// Each tensor of `b` within `tol` of `a`'s distance from `start` (relative L2).
    pub fn assert_near(start: &[&[f32]], a: &Weights, b: &Weights, tol: f64, what: &str) {
        let dist = |x: &[f32], y: &[f32]| -> f64 {
            x.iter()
                .zip(y)
                .map(|(p, q)| ((p - q) as f64).powi(2))
                .sum::<f64>()
                .sqrt()
        };
        for (i, ((s, p), d)) in start.iter().zip(a).zip(b).enumerate() {
            let (moved, apart) = (dist(s, p), dist(p, d));
            assert!(
                apart <= tol * moved.max(1e-30),
                "{what}, tensor {i}: {apart:.2e} from the single process, which moved {moved:.2e}"
            );
        }
    }
}

/// Data-parallel runs of the trainer on threads (`InProcess` ranks): one rank is bitwise the
/// single-process run; two and three ranks (uneven shares of the 4-query batches) follow it
/// within f32 summation order and end bitwise equal to each other; only rank 0 writes; a
/// two-rank run stopped after its checkpoint and resumed is bitwise the uninterrupted one.
/// Mining is divided among the ranks too (each encodes its share), so it is checked as well.
///
/// Tolerance, and why: the ranks sum the per-token weight-gradient terms in another grouping
/// than one process (tests/data_parallel.rs: up to 4e-6 relative per tensor), and AdamW's
/// normalised update carries such differences into the weights at about the same relative
/// size per step; so losses agree to 1e-5 relative and each tensor's distance from the
/// single-process weights stays under 1e-3 of how far that run moved it.
#[test]
fn data_parallel_ranks_train_like_one_process() {
    use rrra::model::{Encoder, EncoderOptions};
    use rrra::train::trainer::Trainer;

    let dir = tempfile::tempdir().unwrap();
    let model = common::tiny_bert_with_dropout(dir.path());
    let config = |out: &str| {
        let mut cfg = offload_config(&model, dir.path().join(out), true);
        cfg.max_steps = Some(4);
        cfg.random_negatives = 1;
        cfg.checkpoint_every = Some(2);
        cfg
    };
    let mut plain = Trainer::new(config("plain")).unwrap();
    let plain_steps = ranks::steps(&mut plain, None);
    let plain_w = ranks::weights(&plain);
    let start = Encoder::load(&model, &EncoderOptions::default()).unwrap();
    let start_w = start.bert().weights.tensors();

    let (s1, w1) = ranks::run(&config("world-1"), 1, None, false);
    assert_eq!(s1, plain_steps, "one rank: losses");
    assert_eq!(ranks::bits(&w1), ranks::bits(&plain_w), "one rank: weights");

    let mut two = None;
    for world in [2, 3] {
        let out = format!("world-{world}");
        let (s, w) = ranks::run(&config(&out), world, None, false);
        assert_eq!(s.len(), plain_steps.len());
        for (i, ((a, _), (b, _))) in plain_steps.iter().zip(&s).enumerate() {
            assert!(
                (a - b).abs() <= 1e-5 * a.abs(),
                "{world} ranks, step {}: loss {b} vs {a}",
                i + 1
            );
        }
        ranks::assert_near(&start_w, &plain_w, &w, 1e-3, &format!("{world} ranks"));
        // rank 0 alone wrote the log: every step once
        let log = std::fs::read_to_string(dir.path().join(&out).join("train_log.jsonl")).unwrap();
        let logged = log.lines().filter(|l| l.contains("\"loss\"")).count();
        assert_eq!(logged, 4, "{world} ranks: steps in the log");
        if world == 2 {
            two = Some(w);
        }
    }

    // two ranks stopped after the checkpoint of step 2, then resumed from rank 0's files
    let resumed = config("resumed");
    let (mut s, _) = ranks::run(&resumed, 2, Some(2), false);
    let (rest, w) = ranks::run(&resumed, 2, None, true);
    s.extend(rest);
    assert_eq!(s.len(), 4);
    assert_eq!(
        ranks::bits(&w),
        ranks::bits(&two.unwrap()),
        "resumed: weights"
    );
}

/// Stage 3 across ranks: with the RRRA sampler every rank scores the pool with the same joint
/// adapter, draws its share's negatives by s_FN, and adds the adapter's loss over the whole
/// gathered batch, so one rank is bitwise the single process and two ranks follow it (same
/// tolerances as above), the mean s_FN of the drawn negatives included.
#[test]
fn data_parallel_ranks_train_the_joint_adapter_like_one_process() {
    use rrra::adapter::file::AdapterFile;
    use rrra::adapter::AdapterParams;
    use rrra::model::{Encoder, EncoderOptions};
    use rrra::train::sampler::SamplerKind;
    use rrra::train::trainer::Trainer;

    let dir = tempfile::tempdir().unwrap();
    let model = common::tiny_bert_with_dropout(dir.path());
    let start = Encoder::load(&model, &EncoderOptions::default()).unwrap();
    let adapter = dir.path().join("adapter.safetensors");
    let mut params = AdapterParams::init(start.dim(), 16, 5).unwrap();
    // away from the identity, so the adapter has an opinion about the pool
    for (i, w) in params.w2.iter_mut().enumerate() {
        *w = ((i % 11) as f32 - 5.0) * 1e-2;
    }
    common::write_adapter(&adapter, params);
    let config = |out: &str| {
        let mut cfg = offload_config(&model, dir.path().join(out), true);
        cfg.max_steps = Some(3);
        cfg.sampler = SamplerKind::Rrra {
            gamma: 2.0,
            t_h: 1.0,
            soft: false,
        };
        cfg.adapter.init = Some(adapter.clone());
        cfg.adapter.loss_weight = 0.5;
        cfg
    };
    let mut plain = Trainer::new(config("plain")).unwrap();
    let plain_steps = ranks::steps(&mut plain, None);
    let plain_w = ranks::weights(&plain);
    assert!(plain_steps.iter().all(|s| s.1.is_some()), "s_FN logged");

    let (s1, w1) = ranks::run(&config("world-1"), 1, None, false);
    assert_eq!(s1, plain_steps, "one rank: losses and s_FN");
    assert_eq!(ranks::bits(&w1), ranks::bits(&plain_w), "one rank: weights");

    let (s2, w2) = ranks::run(&config("world-2"), 2, None, false);
    for (i, ((a, fa), (b, fb))) in plain_steps.iter().zip(&s2).enumerate() {
        assert!(
            (a - b).abs() <= 1e-5 * a.abs(),
            "two ranks, step {}: loss {b} vs {a}",
            i + 1
        );
        let (fa, fb) = (fa.unwrap(), fb.unwrap());
        assert!(
            (fa - fb).abs() <= 1e-5 * fa.abs().max(1e-6),
            "two ranks, step {}: drawn s_FN {fb} vs {fa}",
            i + 1
        );
    }
    let start_w = start.bert().weights.tensors();
    ranks::assert_near(&start_w, &plain_w, &w2, 1e-3, "two ranks");
    // and the joint adapter that rank 0 saved moved like the single process's
    let saved = |out: &str| {
        AdapterFile::load(&dir.path().join(out).join("model/adapter.safetensors"))
            .unwrap()
            .params
            .w2
    };
    let (p, d) = (saved("plain"), saved("world-2"));
    let init = AdapterFile::load(&adapter).unwrap().params.w2;
    ranks::assert_near(&[&init], &vec![p], &vec![d], 1e-3, "joint adapter W2");
}

/// Data-parallel ranks whose optimizer is resident (as on GPUs, where the ranks' gradients are
/// summed in place, during the step's last backward): the same run as with the host
/// optimizer, bitwise, for two ranks and for five ranks on 4-query batches (one rank holds no
/// example in every batch and must still join the sums at the same point of the step, or
/// the collectives mismatch).
#[test]
fn data_parallel_ranks_with_a_resident_optimizer_train_like_the_host_optimizer() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::tiny_bert_with_dropout(dir.path());
    let config = |out: &str| {
        let mut cfg = offload_config(&model, dir.path().join(out), true);
        cfg.max_steps = Some(3);
        cfg
    };
    for world in [2, 5] {
        let host = config(&format!("host-{world}"));
        let (host_steps, host_w) = ranks::run(&host, world, None, false);
        let resident = config(&format!("resident-{world}"));
        let (steps, w) = ranks::run_with(&resident, world, None, false, true);
        assert_eq!(steps, host_steps, "{world} ranks: losses");
        assert_eq!(
            ranks::bits(&w),
            ranks::bits(&host_w),
            "{world} ranks: weights"
        );
    }
}

/// Stage 3 where the encoder runs: with an offloaded encoder that offers the joint adapter a
/// place (a GPU does, `GpuAdapterGrad`), the adapter's pool rescoring, forward and backward go
/// there, within the capacity the trainer asked for, and the run (encoder and adapter) is
/// bitwise the CPU's. The GPU op itself is checked against the CPU in
/// tests/gpu_adapter_train.rs.
#[test]
fn the_joint_adapter_runs_beside_an_offloaded_encoder() {
    use rrra::adapter::file::{AdapterFile, FILE_NAME};
    use rrra::adapter::AdapterParams;
    use rrra::model::{Encoder, EncoderOptions};
    use rrra::train::sampler::SamplerKind;
    use rrra::train::trainer::Trainer;
    use std::sync::atomic::Ordering;
    use std::sync::Arc;

    let dir = tempfile::tempdir().unwrap();
    let model = common::tiny_bert_with_dropout(dir.path());
    let load = || Encoder::load(&model, &EncoderOptions::default()).unwrap();
    let adapter = dir.path().join("stage2.safetensors");
    common::write_adapter(&adapter, AdapterParams::init(load().dim(), 8, 3).unwrap());
    let run = |out: &str, offload: Option<bool>| -> (Trainer, Arc<stand_in::Counts>) {
        let mut cfg = offload_config(&model, dir.path().join(out), true);
        cfg.sampler = SamplerKind::parse("rrra").unwrap();
        cfg.adapter.init = Some(adapter.clone());
        let mut t = Trainer::new(cfg).unwrap();
        let counts = Arc::new(stand_in::Counts::default());
        if let Some(adapter_op) = offload {
            let mut dev = stand_in::Offloaded::new(load(), counts.clone());
            dev.adapter_op = adapter_op;
            t.offload_encoder(Box::new(dev)).unwrap();
        }
        t.run(None, &mut |_| {}).unwrap();
        (t, counts)
    };
    let (cpu, _) = run("cpu", None);
    let (beside, counts) = run("beside", Some(true));
    let (offloaded, no_op) = run("offloaded", Some(false));
    let calls = counts.adapter_calls.load(Ordering::SeqCst);
    // 2 minings × ⌈queries / 32⌉ scoring calls, and a forward and a backward per micro-batch
    assert!(calls >= 2 + 3 * 2 * 2, "{calls} adapter calls");
    assert_eq!(no_op.adapter_calls.load(Ordering::SeqCst), 0);
    for (t, what) in [(&beside, "beside"), (&offloaded, "offloaded")] {
        assert_same_weights(cpu.encoder(), t.encoder(), what);
    }
    let saved = |out: &str| AdapterFile::load(&dir.path().join(out).join("model").join(FILE_NAME));
    let (a, b) = (saved("cpu").unwrap(), saved("beside").unwrap());
    assert_eq!(a.params, b.params, "the joint adapter trained the same");
    assert_eq!(a.calibration, b.calibration);
    let start = AdapterFile::load(&adapter).unwrap();
    assert!(a.params != start.params, "the joint adapter trained");

    // A resumed run has its pool already: the adapter moves with the encoder, before the next
    // refresh.
    let out = dir.path().join("resumed");
    let mut cfg = offload_config(&model, out.clone(), true);
    cfg.sampler = SamplerKind::parse("rrra").unwrap();
    cfg.adapter.init = Some(adapter.clone());
    cfg.checkpoint_every = Some(1);
    Trainer::new(cfg)
        .unwrap()
        .run(Some(1), &mut |_| {})
        .unwrap();
    let mut t = Trainer::resume(&out).unwrap();
    let counts = Arc::new(stand_in::Counts::default());
    let mut dev = stand_in::Offloaded::new(load(), counts.clone());
    dev.adapter_op = true;
    t.offload_encoder(Box::new(dev)).unwrap();
    let mut before_refresh = None;
    t.run(None, &mut |e| {
        if let rrra::train::trainer::TrainEvent::Mined(_) = e {
            before_refresh.get_or_insert(counts.adapter_calls.load(Ordering::SeqCst));
        }
    })
    .unwrap();
    assert!(
        before_refresh.is_some_and(|n| n > 0),
        "adapter calls before the resumed run's refresh: {before_refresh:?}"
    );
    assert_same_weights(cpu.encoder(), t.encoder(), "resumed");
}
