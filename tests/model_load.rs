//! Loading Hugging Face BERT-family folders: dtypes, name prefixes, BERT-base shapes, and clear
//! errors for missing or mis-shaped tensors. Also the tiny-bert fixture's forward pass against
//! its float64 PyTorch reference (padded batches with an attention mask).

mod common;
use common::*;
use rrra::model::bert::PackedBatch;
use rrra::model::{Encoder, EncoderOptions};
use rrra::Error;
use safetensors::{Dtype, SafeTensors};

fn to_f16(bytes: &[u8]) -> Vec<u8> {
    bytes
        .chunks_exact(4)
        .flat_map(|b| {
            half::f16::from_f32(f32::from_le_bytes([b[0], b[1], b[2], b[3]])).to_le_bytes()
        })
        .collect()
}

fn tiny() -> std::path::PathBuf {
    shared().join("fixtures/tiny-bert")
}

#[test]
fn tiny_bert_forward_matches_float64_reference() {
    let fx = tiny().join("debug_state.safetensors");
    let bytes = std::fs::read(&fx).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let i64s = |name: &str| -> (Vec<usize>, Vec<i64>) {
        let t = st.tensor(name).unwrap();
        let v = t
            .data()
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
            .collect();
        (t.shape().to_vec(), v)
    };
    let f64s = |name: &str| -> Vec<f64> {
        st.tensor(name)
            .unwrap()
            .data()
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
            .collect()
    };
    let enc = Encoder::load(&tiny(), &EncoderOptions::default()).unwrap();
    for side in ["query", "doc"] {
        let (shape, ids) = i64s(&format!("{side}_input_ids"));
        let (_, mask) = i64s(&format!("{side}_attention_mask"));
        let want = f64s(&format!("{side}_embeddings"));
        let (n, len) = (shape[0], shape[1]);
        // The reference pads to a common length with an attention mask; we pack the real tokens.
        let mut batch = PackedBatch::new();
        for s in 0..n {
            let real: Vec<u32> = (0..len)
                .filter(|&t| mask[s * len + t] == 1)
                .map(|t| ids[s * len + t] as u32)
                .collect();
            batch.push(&real, &vec![0; real.len()]);
        }
        let got = enc.embed_batch(&batch).unwrap();
        for s in 0..n {
            let g = &got[s * 32..(s + 1) * 32];
            let w: Vec<f32> = want[s * 32..(s + 1) * 32]
                .iter()
                .map(|&x| x as f32)
                .collect();
            // f32 forward against a float64 one: ~1e-6 relative per element.
            for (a, b) in g.iter().zip(&w) {
                assert!((a - b).abs() < 2e-5, "{side} {s}: {a} vs {b}");
            }
            assert!(cosine(g, &w) > 0.99999);
        }
    }
}

#[test]
fn f16_weights_load_and_agree_with_f32() {
    let dir = tempfile::tempdir().unwrap();
    model_variant(&tiny(), dir.path(), |t| {
        for x in t.iter_mut() {
            *x = (x.0.clone(), Dtype::F16, x.2.clone(), to_f16(&x.3));
        }
    });
    let texts = [
        "what causes vitamin d deficiency",
        "guitar lessons for beginners",
    ];
    let a = Encoder::load(&tiny(), &EncoderOptions::default())
        .unwrap()
        .encode(&texts, 2)
        .unwrap();
    let b = Encoder::load(dir.path(), &EncoderOptions::default())
        .unwrap()
        .encode(&texts, 2)
        .unwrap();
    for s in 0..2 {
        // f16 weights carry a 2^-11 relative rounding error: embeddings stay within cos 0.999.
        assert!(cosine(&a[s * 32..(s + 1) * 32], &b[s * 32..(s + 1) * 32]) > 0.999);
    }
}

#[test]
fn missing_and_misshaped_tensors_are_named() {
    let name = "encoder.layer.1.intermediate.dense.weight";
    let dir = tempfile::tempdir().unwrap();
    model_variant(&tiny(), dir.path(), |t| t.retain(|x| x.0 != name));
    let err = Encoder::load(dir.path(), &EncoderOptions::default())
        .err()
        .expect("must fail");
    assert!(
        matches!(&err, Error::MissingTensor { name: n, .. } if n == name),
        "{err}"
    );
    assert!(err.to_string().contains("model.safetensors") && err.to_string().contains(name));

    model_variant(&tiny(), dir.path(), |t| {
        let x = t.iter_mut().find(|x| x.0 == name).unwrap();
        x.2 = vec![32, 64];
    });
    let err = Encoder::load(dir.path(), &EncoderOptions::default())
        .err()
        .expect("must fail");
    let msg = err.to_string();
    assert!(
        msg.contains(name) && msg.contains("[32, 64]") && msg.contains("[64, 32]"),
        "{msg}"
    );
}

/// Deterministic pseudo-random bf16 bytes (splitmix64), scaled like BERT's init (std 0.02).
fn random_bf16(n: usize, seed: u64) -> Vec<u8> {
    let mut s = seed;
    (0..n)
        .flat_map(|_| {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            let u = ((z ^ (z >> 31)) >> 11) as f32 / (1u64 << 53) as f32;
            half::bf16::from_f32((u - 0.5) * 0.07).to_le_bytes()
        })
        .collect()
}

#[test]
fn bert_base_shapes_load_with_prefix_in_bf16() {
    let (v, h, i, p, layers) = (30522usize, 768usize, 3072usize, 512usize, 12usize);
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        tiny().join("tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();
    let cfg = serde_json::json!({
        "architectures": ["BertForMaskedLM"], "model_type": "bert", "vocab_size": v, "hidden_size": h,
        "num_hidden_layers": layers, "num_attention_heads": 12, "intermediate_size": i,
        "hidden_act": "gelu", "max_position_embeddings": p, "type_vocab_size": 2, "layer_norm_eps": 1e-12
    });
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    let mut t: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut seed = 0;
    let mut add = |name: &str, shape: Vec<usize>| {
        seed += 1;
        let n = shape.iter().product();
        t.push((
            format!("bert.{name}"),
            Dtype::BF16,
            shape,
            random_bf16(n, seed),
        ));
    };
    add("embeddings.word_embeddings.weight", vec![v, h]);
    add("embeddings.position_embeddings.weight", vec![p, h]);
    add("embeddings.token_type_embeddings.weight", vec![2, h]);
    add("embeddings.LayerNorm.weight", vec![h]);
    add("embeddings.LayerNorm.bias", vec![h]);
    for l in 0..layers {
        for (n, s) in [
            ("attention.self.query.weight", vec![h, h]),
            ("attention.self.query.bias", vec![h]),
            ("attention.self.key.weight", vec![h, h]),
            ("attention.self.key.bias", vec![h]),
            ("attention.self.value.weight", vec![h, h]),
            ("attention.self.value.bias", vec![h]),
            ("attention.output.dense.weight", vec![h, h]),
            ("attention.output.dense.bias", vec![h]),
            ("attention.output.LayerNorm.weight", vec![h]),
            ("attention.output.LayerNorm.bias", vec![h]),
            ("intermediate.dense.weight", vec![i, h]),
            ("intermediate.dense.bias", vec![i]),
            ("output.dense.weight", vec![h, i]),
            ("output.dense.bias", vec![h]),
            ("output.LayerNorm.weight", vec![h]),
            ("output.LayerNorm.bias", vec![h]),
        ] {
            add(&format!("encoder.layer.{l}.{n}"), s);
        }
    }
    add("pooler.dense.weight", vec![h, h]);
    // position_ids is a buffer some checkpoints save; it must be ignored.
    t.push((
        "bert.embeddings.position_ids".into(),
        Dtype::I64,
        vec![1, p],
        vec![0u8; p * 8],
    ));
    write_tensors(&dir.path().join("model.safetensors"), &t);

    let enc = Encoder::load(dir.path(), &EncoderOptions::default()).unwrap();
    assert_eq!(enc.dim(), 768);
    assert_eq!(enc.max_length(), 256);
    assert_eq!(enc.pooling(), rrra::model::Pooling::Cls);
    assert!(!enc.normalize());
    let out = enc
        .encode(
            &["a first text", "and a second, longer one for the batch"],
            2,
        )
        .unwrap();
    assert_eq!(out.len(), 2 * 768);
    assert!(out.iter().all(|x| x.is_finite()));
}
