//! The CPU encoder against sentence-transformers + PyTorch (float32) reference embeddings.
//! Tolerance: cosine ≥ 0.99999 per text — both sides compute in f32, so differences come only
//! from summation order (≈1e-6 relative); a real bug (mask, pooling, GELU form, eps) costs >1e-3.

mod common;
use common::*;
use rrra::model::{Encoder, EncoderOptions};

#[test]
fn minilm_sentences_match_reference() {
    let fx = shared().join("fixtures/minilm");
    let texts = minilm_sentences();
    let (shape, want) = read_f32_tensor(&fx.join("embeddings.safetensors"), "embeddings");
    assert_eq!(shape, vec![texts.len(), 384]);

    let enc = Encoder::load(&minilm(), &EncoderOptions::default()).unwrap();
    assert_eq!(enc.max_length(), 256);
    assert!(enc.normalize());
    let refs: Vec<&str> = texts.iter().map(|s| s.as_str()).collect();
    // Batch size 3 mixes lengths across batches and exercises the packed layout.
    let got = enc.encode(&refs, 3).unwrap();
    for (i, t) in texts.iter().enumerate() {
        let c = cosine(&got[i * 384..(i + 1) * 384], &want[i * 384..(i + 1) * 384]);
        assert!(
            c >= 0.99999,
            "sentence {i} ({:?}...): cosine {c}",
            &t.chars().take(30).collect::<String>()
        );
    }
    // The same texts one at a time give the same vectors (packing does not leak across texts).
    let single = enc.encode(&refs[..4], 1).unwrap();
    for (a, b) in single.iter().zip(&got[..4 * 384]) {
        assert!((a - b).abs() < 1e-5);
    }
}

#[test]
fn scifact_sample_matches_reference() {
    let fx = shared().join("fixtures/scifact-minilm/sample_embeddings.safetensors");
    let meta = safetensors_metadata(&fx);
    let doc_ids: Vec<String> = serde_json::from_str(&meta["doc_ids"]).unwrap();
    let query_ids: Vec<String> = serde_json::from_str(&meta["query_ids"]).unwrap();
    let data = shared().join("data/scifact");
    let corpus = rrra::data::beir::read_corpus(&data.join("corpus.jsonl")).unwrap();
    let queries = rrra::data::beir::read_queries(&data.join("queries.jsonl")).unwrap();
    let docs: std::collections::HashMap<&str, &str> = corpus
        .iter()
        .map(|d| (d.id.as_str(), d.text.as_str()))
        .collect();
    let qs: std::collections::HashMap<&str, &str> = queries
        .iter()
        .map(|q| (q.id.as_str(), q.text.as_str()))
        .collect();

    let enc = Encoder::load(&minilm(), &EncoderOptions::default()).unwrap();
    for (name, ids, texts_by_id) in [
        ("doc_embeddings", &doc_ids, &docs),
        ("query_embeddings", &query_ids, &qs),
    ] {
        let (shape, want) = read_f32_tensor(&fx, name);
        assert_eq!(shape, vec![ids.len(), 384]);
        let texts: Vec<&str> = ids.iter().map(|id| texts_by_id[id.as_str()]).collect();
        let got = enc.encode(&texts, 32).unwrap();
        for (i, id) in ids.iter().enumerate() {
            let c = cosine(&got[i * 384..(i + 1) * 384], &want[i * 384..(i + 1) * 384]);
            assert!(c >= 0.99999, "{name} {id}: cosine {c}");
        }
    }
}
