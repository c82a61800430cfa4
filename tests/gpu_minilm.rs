//! The GPU encoder end to end against sentence-transformers + PyTorch (float32) reference
//! embeddings of all-MiniLM-L6-v2: the fixture's tricky sentences and the SciFact sample.
//! Tolerances: bf16 cosine ≥ 0.9999 (GEMM inputs rounded to 8 significant bits, relative error
//! ≤ 2⁻⁹ per element, averaging out over 384 dimensions to ~1e-5 in cosine); f32 cosine ≥
//! 0.99999 (summation order only, as the CPU encoder's test). Skips without a GPU; the model is
//! `$RRRA_MODEL`, or tools/fetch-model.sh's cache.

mod common;
use common::*;
use rrra::device::encoder::{GpuBert, Precision};
use rrra::model::{Encoder, EncoderOptions};

fn model() -> Encoder {
    Encoder::load(&minilm(), &EncoderOptions::default()).unwrap()
}

fn gpu_encode(gpu: &rrra::device::Gpu, enc: &Encoder, texts: &[&str], p: Precision) -> Vec<f32> {
    let mut bert = GpuBert::new(gpu, enc.bert(), p, 32 * enc.max_length(), 32).unwrap();
    let tokens = enc.tokenizer().encode_batch(texts).unwrap();
    bert.encode_tokens(&tokens, 7, enc.pooling(), enc.normalize())
        .unwrap()
}

#[test]
fn minilm_sentences_match_reference_on_the_gpu() {
    let Some(gpu) = gpu_or_skip() else {
        return;
    };
    let enc = model();
    let fx = shared().join("fixtures/minilm");
    let texts = minilm_sentences();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let (_, want) = read_f32_tensor(&fx.join("embeddings.safetensors"), "embeddings");
    for (p, bound) in [(Precision::Bf16, 0.9999), (Precision::F32, 0.99999)] {
        let got = gpu_encode(&gpu, &enc, &refs, p);
        let mut worst = 1.0f64;
        for i in 0..texts.len() {
            let c = cosine(&got[i * 384..(i + 1) * 384], &want[i * 384..(i + 1) * 384]);
            worst = worst.min(c);
            assert!(c >= bound, "{p:?} sentence {i}: cosine {c}");
        }
        eprintln!(
            "{p:?}: worst cosine {worst:.7} over {} sentences",
            texts.len()
        );
    }
}

#[test]
fn scifact_sample_matches_reference_on_the_gpu() {
    let Some(gpu) = gpu_or_skip() else {
        return;
    };
    let enc = model();
    let fx = shared().join("fixtures/scifact-minilm/sample_embeddings.safetensors");
    let meta = safetensors_metadata(&fx);
    let doc_ids: Vec<String> = serde_json::from_str(&meta["doc_ids"]).unwrap();
    let data = shared().join("data/scifact");
    let corpus = rrra::data::beir::read_corpus(&data.join("corpus.jsonl")).unwrap();
    let docs: std::collections::HashMap<&str, &str> = corpus
        .iter()
        .map(|d| (d.id.as_str(), d.text.as_str()))
        .collect();
    let (_, want) = read_f32_tensor(&fx, "doc_embeddings");
    let texts: Vec<&str> = doc_ids.iter().map(|id| docs[id.as_str()]).collect();
    let got = gpu_encode(&gpu, &enc, &texts, Precision::Bf16);
    let mut worst = 1.0f64;
    for (i, id) in doc_ids.iter().enumerate() {
        let c = cosine(&got[i * 384..(i + 1) * 384], &want[i * 384..(i + 1) * 384]);
        worst = worst.min(c);
        assert!(c >= 0.9999, "doc {id}: cosine {c}");
    }
    eprintln!(
        "bf16: worst cosine {worst:.7} over {} documents",
        doc_ids.len()
    );
}
