//! Test support: where the shared data and fixtures are, and the reference model (fetched once
//! per machine from the package registry by tools/fetch-model.sh).
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::OnceLock;

/// `../shared` next to the repository, or `$RRRA_SHARED`.
pub fn shared() -> PathBuf {
    std::env::var_os("RRRA_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared")))
}

/// all-MiniLM-L6-v2: `$RRRA_MODEL` if set, else fetched into the cache by tools/fetch-model.sh.
pub fn minilm() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(p) = std::env::var_os("RRRA_MODEL") {
            return PathBuf::from(p);
        }
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tools/fetch-model.sh");
        let out = std::process::Command::new("bash")
            .arg(script)
            .output()
            .expect("cannot run tools/fetch-model.sh");
        assert!(
            out.status.success(),
            "tools/fetch-model.sh failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    })
    .clone()
}

/// The texts of the MiniLM fixture (`fixtures/minilm/sentences.jsonl`), in file order.
pub fn minilm_sentences() -> Vec<String> {
    std::fs::read_to_string(shared().join("fixtures/minilm/sentences.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["text"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

/// A named f32 tensor and the file's metadata from a safetensors fixture.
pub fn read_f32_tensor(path: &std::path::Path, name: &str) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(name).unwrap();
    assert_eq!(t.dtype(), safetensors::Dtype::F32);
    let v = t
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    (t.shape().to_vec(), v)
}

pub fn safetensors_metadata(path: &std::path::Path) -> std::collections::HashMap<String, String> {
    let bytes = std::fs::read(path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    meta.metadata().clone().unwrap_or_default()
}

pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

/// A safetensors tensor as (name, dtype, shape, little-endian bytes).
pub type RawTensor = (String, safetensors::Dtype, Vec<usize>, Vec<u8>);

/// Every tensor of a safetensors file, sorted by name.
pub fn read_tensors(path: &std::path::Path) -> Vec<RawTensor> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut v: Vec<RawTensor> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.dtype(), t.shape().to_vec(), t.data().to_vec()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

pub fn write_tensors(path: &std::path::Path, tensors: &[RawTensor]) {
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// Copies a model folder into `dst` with its weights edited by `edit` (a corrupted or changed
/// model for error tests).
pub fn model_variant(
    src: &std::path::Path,
    dst: &std::path::Path,
    edit: impl FnOnce(&mut Vec<RawTensor>),
) {
    copy_dir_except(src, dst, "model.safetensors");
    let mut tensors = read_tensors(&src.join("model.safetensors"));
    edit(&mut tensors);
    write_tensors(&dst.join("model.safetensors"), &tensors);
}

fn copy_dir_except(src: &std::path::Path, dst: &std::path::Path, skip: &str) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let p = e.unwrap().path();
        let to = dst.join(p.file_name().unwrap());
        if p.is_dir() {
            copy_dir_except(&p, &to, skip);
        } else if p.file_name().unwrap() != skip {
            std::fs::copy(&p, &to).unwrap();
        }
    }
}

/// The GPU, or `None` with the reason printed (the test then skips). With `RRRA_REQUIRE_GPU`
/// set (the device check script sets it) a missing GPU fails the test instead.
pub fn gpu_or_skip() -> Option<rrra::device::Gpu> {
    match rrra::device::Gpu::open(0) {
        Ok(g) => Some(g),
        Err(e) => {
            assert!(
                std::env::var_os("RRRA_REQUIRE_GPU").is_none(),
                "RRRA_REQUIRE_GPU is set but no GPU can be used: {e}"
            );
            eprintln!("skipped: {e}");
            None
        }
    }
}

/// A store of the Cranfield documents encoded by the tiny random BERT of the fixtures, and a
/// random adapter file (W2 non-zero, so the rerank moves documents), in a temporary folder:
/// what the retriever and C ABI tests serve.
pub struct TinyCranfield {
    pub dir: tempfile::TempDir,
    pub model: PathBuf,
    pub store: PathBuf,
    pub adapter: PathBuf,
}

pub fn tiny_cranfield() -> TinyCranfield {
    use rrra::adapter::file::AdapterFile;
    use rrra::adapter::AdapterParams;
    use rrra::model::{Encoder, EncoderOptions};
    let dir = tempfile::tempdir().unwrap();
    let model = shared().join("fixtures/tiny-bert");
    let data = shared().join("data/cranfield");
    let enc = Encoder::load(&model, &EncoderOptions::default()).unwrap();
    let docs = rrra::data::beir::read_corpus(&data.join("corpus.jsonl")).unwrap();
    let store = dir.path().join("cranfield.store");
    rrra::pipeline::encode_corpus(&enc, &docs, &store, rrra::index::Dtype::F32, 64, &|_| {})
        .unwrap();
    let mut params = AdapterParams::init(enc.dim(), 16, 5).unwrap();
    for (i, w) in params.w2.iter_mut().enumerate() {
        *w = ((i * 7919 % 13) as f32 - 6.0) * 0.05;
    }
    let adapter = dir.path().join("adapter.safetensors");
    AdapterFile {
        params,
        calibration: Default::default(),
        lambda_rr: 2.0,
        tau: 0.05,
        train_config: Default::default(),
        info: serde_json::json!({}),
    }
    .save(&adapter)
    .unwrap();
    TinyCranfield {
        dir,
        model,
        store,
        adapter,
    }
}

/// A three-document, two-query BEIR folder with train qrels, written to `dir/beir`: the
/// smallest training set the trainer accepts.
pub fn tiny_beir(dir: &std::path::Path) -> PathBuf {
    let beir = dir.join("beir");
    std::fs::create_dir_all(beir.join("qrels")).unwrap();
    let files = [
        (
            "corpus.jsonl",
            "{\"_id\":\"d1\",\"text\":\"one\"}\n{\"_id\":\"d2\",\"text\":\"two\"}\n{\"_id\":\"d3\",\"text\":\"three\"}\n",
        ),
        (
            "queries.jsonl",
            "{\"_id\":\"q1\",\"text\":\"first\"}\n{\"_id\":\"q2\",\"text\":\"second\"}\n",
        ),
        ("qrels/train.tsv", "q1\td1\t1\nq2\td2\t1\n"),
    ];
    for (name, body) in files {
        std::fs::write(beir.join(name), body).unwrap();
    }
    beir
}

/// ../shared/fixtures/tiny-bert/debug_state.safetensors: a batch, its embeddings, the InfoNCE
/// loss and every parameter gradient in float64 (PyTorch), with the temperature.
pub struct TinyBertFixture {
    pub tensors: std::collections::HashMap<String, (Vec<usize>, Vec<f64>)>,
    pub tau: f32,
}

pub fn tiny_bert_fixture() -> TinyBertFixture {
    use safetensors::{Dtype, SafeTensors};
    let path = shared().join("fixtures/tiny-bert/debug_state.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors = std::collections::HashMap::new();
    for (name, t) in st.tensors() {
        let v: Vec<f64> = match t.dtype() {
            Dtype::F64 => t
                .data()
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
                .collect(),
            Dtype::I64 => t
                .data()
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f64)
                .collect(),
            other => panic!("unexpected dtype {other:?} for {name}"),
        };
        tensors.insert(name.clone(), (t.shape().to_vec(), v));
    }
    let meta = safetensors_metadata(&path);
    TinyBertFixture {
        tensors,
        tau: meta["tau"].parse().unwrap(),
    }
}

impl TinyBertFixture {
    /// The fixture's InfoNCE (3 queries, then 6 documents, query i's positive is document i)
    /// over embeddings `[9 × h]`: the loss and its gradient with respect to the embeddings.
    pub fn loss_and_gradient(&self, emb: &[f32], h: usize) -> (f64, Vec<f32>) {
        use rrra::train::loss::{info_nce, InfoNceInput};
        let (q, d) = emb.split_at(3 * h);
        let mut d_emb = vec![0.0f32; emb.len()];
        let (dq, dd) = d_emb.split_at_mut(3 * h);
        let stats = info_nce(
            &InfoNceInput {
                queries: q,
                docs: d,
                dim: h,
                targets: &[0, 1, 2],
                log_weights: None,
                tau: self.tau,
            },
            dq,
            dd,
        )
        .unwrap();
        (stats.loss, d_emb)
    }

    /// Packs the rows of an `input_ids` tensor, keeping only the tokens its attention mask
    /// keeps.
    pub fn push_rows(&self, batch: &mut rrra::model::bert::PackedBatch, ids: &str, mask: &str) {
        let (shape, ids) = &self.tensors[ids];
        let (_, mask) = &self.tensors[mask];
        for r in 0..shape[0] {
            let row: Vec<u32> = (0..shape[1])
                .filter(|&c| mask[r * shape[1] + c] != 0.0)
                .map(|c| ids[r * shape[1] + c] as u32)
                .collect();
            batch.push(&row, &vec![0; row.len()]);
        }
    }
}

/// The tiny random BERT of the fixtures with dropout 0.1 on hidden states and attention (the
/// fixture's config has none), copied into `dir`: training runs that exercise the masks.
pub fn tiny_bert_with_dropout(dir: &std::path::Path) -> PathBuf {
    let model = dir.join("tiny-dropout");
    model_variant(&shared().join("fixtures/tiny-bert"), &model, |_| {});
    let config_path = model.join("config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    json["hidden_dropout_prob"] = 0.1.into();
    json["attention_probs_dropout_prob"] = 0.1.into();
    std::fs::write(&config_path, json.to_string()).unwrap();
    model
}

/// Writes an adapter file holding `params` with default calibration and training knobs: a
/// stand-in for a stage-2 adapter (`rrra adapter`) where a test needs only the weights.
pub fn write_adapter(path: &std::path::Path, params: rrra::adapter::AdapterParams) {
    rrra::adapter::file::AdapterFile {
        params,
        calibration: Default::default(),
        lambda_rr: 1.0,
        tau: 0.05,
        train_config: Default::default(),
        info: serde_json::json!({}),
    }
    .save(path)
    .unwrap();
}
