//! BERT weights from `model.safetensors`, memory-mapped and converted once to f32.
//!
//! Accepts f32, f16 and bf16 tensors, names with or without the `bert.` prefix (BertModel vs
//! BertFor* checkpoints) and the old `gamma`/`beta` LayerNorm names; ignores tensors it does not
//! use (`position_ids`, pooler, heads). Q, K and V are fused into one `[3h × h]` matrix so
//! the projection is one GEMM.

use super::config::BertConfig;
use crate::error::{Error, Result};
use safetensors::{Dtype, SafeTensors};
use std::path::{Path, PathBuf};

pub struct LayerWeights {
    pub qkv_w: Vec<f32>,
    pub qkv_b: Vec<f32>,
    pub attn_out_w: Vec<f32>,
    pub attn_out_b: Vec<f32>,
    pub attn_ln_g: Vec<f32>,
    pub attn_ln_b: Vec<f32>,
    pub inter_w: Vec<f32>,
    pub inter_b: Vec<f32>,
    pub out_w: Vec<f32>,
    pub out_b: Vec<f32>,
    pub out_ln_g: Vec<f32>,
    pub out_ln_b: Vec<f32>,
}

pub struct BertWeights {
    pub word_emb: Vec<f32>,
    pub pos_emb: Vec<f32>,
    pub type_emb: Vec<f32>,
    pub emb_ln_g: Vec<f32>,
    pub emb_ln_b: Vec<f32>,
    pub layers: Vec<LayerWeights>,
    /// xxh3-64 of the safetensors file: identifies the exact weights.
    pub file_hash: u64,
}

struct Loader<'a> {
    st: SafeTensors<'a>,
    path: PathBuf,
    prefix: &'static str,
}

impl Loader<'_> {
    fn get(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let full = format!("{}{}", self.prefix, name);
        let t = self.st.tensor(&full).or_else(|_| {
            // Old checkpoints call LayerNorm parameters gamma/beta.
            let alt = full
                .replace("LayerNorm.weight", "LayerNorm.gamma")
                .replace("LayerNorm.bias", "LayerNorm.beta");
            self.st.tensor(&alt)
        });
        let t = t.map_err(|_| Error::MissingTensor {
            path: self.path.clone(),
            name: full.clone(),
        })?;
        if t.shape() != shape {
            return Err(Error::TensorShape {
                path: self.path.clone(),
                name: full,
                expected: shape.to_vec(),
                found: t.shape().to_vec(),
            });
        }
        let data = t.data();
        // The mmap gives no alignment guarantee for a tensor's bytes, so decode element-wise.
        let out: Vec<f32> = match t.dtype() {
            Dtype::F32 => data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::F16 => data
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::BF16 => data
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            other => {
                return Err(Error::format(
                    &self.path,
                    format!("tensor `{full}` has dtype {other:?}; expected F32, F16 or BF16"),
                ))
            }
        };
        if let Some(i) = out.iter().position(|v| !v.is_finite()) {
            return Err(Error::format(
                &self.path,
                format!("tensor `{full}` has a non-finite value at element {i}"),
            ));
        }
        Ok(out)
    }
}

impl BertWeights {
    pub fn load(path: &Path, cfg: &BertConfig) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the file is opened read-only; concurrent truncation by another process is the
        // usual mmap caveat and is outside what a model folder is used for.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let file_hash = xxhash_rust::xxh3::xxh3_64(&mmap);
        let st = SafeTensors::deserialize(&mmap)
            .map_err(|e| Error::format(path, format!("not a valid safetensors file: {e}")))?;
        let prefix = if st.tensor("embeddings.word_embeddings.weight").is_ok() {
            ""
        } else {
            "bert."
        };
        let l = Loader {
            st,
            path: path.to_path_buf(),
            prefix,
        };
        let h = cfg.hidden_size;
        let i = cfg.intermediate_size;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for n in 0..cfg.num_hidden_layers {
            let p = format!("encoder.layer.{n}.");
            let g = |s: &str, shape: &[usize]| l.get(&format!("{p}{s}"), shape);
            let mut qkv_w = g("attention.self.query.weight", &[h, h])?;
            qkv_w.extend(g("attention.self.key.weight", &[h, h])?);
            qkv_w.extend(g("attention.self.value.weight", &[h, h])?);
            let mut qkv_b = g("attention.self.query.bias", &[h])?;
            qkv_b.extend(g("attention.self.key.bias", &[h])?);
            qkv_b.extend(g("attention.self.value.bias", &[h])?);
            layers.push(LayerWeights {
                qkv_w,
                qkv_b,
                attn_out_w: g("attention.output.dense.weight", &[h, h])?,
                attn_out_b: g("attention.output.dense.bias", &[h])?,
                attn_ln_g: g("attention.output.LayerNorm.weight", &[h])?,
                attn_ln_b: g("attention.output.LayerNorm.bias", &[h])?,
                inter_w: g("intermediate.dense.weight", &[i, h])?,
                inter_b: g("intermediate.dense.bias", &[i])?,
                out_w: g("output.dense.weight", &[h, i])?,
                out_b: g("output.dense.bias", &[h])?,
                out_ln_g: g("output.LayerNorm.weight", &[h])?,
                out_ln_b: g("output.LayerNorm.bias", &[h])?,
            });
        }
        Ok(BertWeights {
            word_emb: l.get("embeddings.word_embeddings.weight", &[cfg.vocab_size, h])?,
            pos_emb: l.get(
                "embeddings.position_embeddings.weight",
                &[cfg.max_position_embeddings, h],
            )?,
            type_emb: l.get(
                "embeddings.token_type_embeddings.weight",
                &[cfg.type_vocab_size, h],
            )?,
            emb_ln_g: l.get("embeddings.LayerNorm.weight", &[h])?,
            emb_ln_b: l.get("embeddings.LayerNorm.bias", &[h])?,
            layers,
            file_hash,
        })
    }
}

/// One parameter tensor as Hugging Face names it, for saving and for comparing gradients.
pub struct NamedSlice<'a> {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: &'a [f32],
}

impl LayerWeights {
    fn zeros(h: usize, inter: usize) -> Self {
        let z = |n: usize| vec![0.0f32; n];
        LayerWeights {
            qkv_w: z(3 * h * h),
            qkv_b: z(3 * h),
            attn_out_w: z(h * h),
            attn_out_b: z(h),
            attn_ln_g: z(h),
            attn_ln_b: z(h),
            inter_w: z(inter * h),
            inter_b: z(inter),
            out_w: z(h * inter),
            out_b: z(h),
            out_ln_g: z(h),
            out_ln_b: z(h),
        }
    }

    /// (tensor, weight-decay flag) in a fixed order: biases and LayerNorm parameters are not
    /// decayed, the convention of BERT fine-tuning recipes.
    fn tensors_mut(&mut self) -> [(&mut Vec<f32>, bool); 12] {
        let d = LAYER_DECAY;
        [
            (&mut self.qkv_w, d[0]),
            (&mut self.qkv_b, d[1]),
            (&mut self.attn_out_w, d[2]),
            (&mut self.attn_out_b, d[3]),
            (&mut self.attn_ln_g, d[4]),
            (&mut self.attn_ln_b, d[5]),
            (&mut self.inter_w, d[6]),
            (&mut self.inter_b, d[7]),
            (&mut self.out_w, d[8]),
            (&mut self.out_b, d[9]),
            (&mut self.out_ln_g, d[10]),
            (&mut self.out_ln_b, d[11]),
        ]
    }
}

/// Weight decay of the embedding tensors (word, position, type tables, then the LayerNorm's
/// gamma and beta) and of a layer's 12 (`LayerWeights::tensors_mut`): biases and LayerNorm
/// parameters are not decayed, the convention of BERT fine-tuning recipes.
const EMBEDDING_DECAY: [bool; 5] = [true, true, true, false, false];
const LAYER_DECAY: [bool; 12] = [
    true, false, true, false, false, false, true, false, true, false, false, false,
];

impl BertWeights {
    /// All-zero tensors of the shapes `cfg` gives: the gradient accumulator of a model.
    pub fn zeros(cfg: &BertConfig) -> Self {
        let h = cfg.hidden_size;
        BertWeights {
            word_emb: vec![0.0; cfg.vocab_size * h],
            pos_emb: vec![0.0; cfg.max_position_embeddings * h],
            type_emb: vec![0.0; cfg.type_vocab_size * h],
            emb_ln_g: vec![0.0; h],
            emb_ln_b: vec![0.0; h],
            layers: (0..cfg.num_hidden_layers)
                .map(|_| LayerWeights::zeros(h, cfg.intermediate_size))
                .collect(),
            file_hash: 0,
        }
    }

    /// Every tensor with its weight-decay flag, in a fixed order (the optimizer's order).
    pub fn tensors_mut(&mut self) -> Vec<(&mut Vec<f32>, bool)> {
        let d = EMBEDDING_DECAY;
        let mut out: Vec<(&mut Vec<f32>, bool)> = vec![
            (&mut self.word_emb, d[0]),
            (&mut self.pos_emb, d[1]),
            (&mut self.type_emb, d[2]),
            (&mut self.emb_ln_g, d[3]),
            (&mut self.emb_ln_b, d[4]),
        ];
        for l in &mut self.layers {
            out.extend(l.tensors_mut());
        }
        out
    }

    /// The weight-decay flag of every tensor, in the order of [`BertWeights::tensors_mut`].
    pub fn decay_flags(&self) -> Vec<bool> {
        let mut out = EMBEDDING_DECAY.to_vec();
        for _ in &self.layers {
            out.extend(LAYER_DECAY);
        }
        out
    }

    /// Every tensor, read-only, in the order of [`BertWeights::tensors_mut`].
    pub fn tensors(&self) -> Vec<&[f32]> {
        let mut out: Vec<&[f32]> = vec![
            &self.word_emb,
            &self.pos_emb,
            &self.type_emb,
            &self.emb_ln_g,
            &self.emb_ln_b,
        ];
        for l in &self.layers {
            out.extend([
                &l.qkv_w[..],
                &l.qkv_b,
                &l.attn_out_w,
                &l.attn_out_b,
                &l.attn_ln_g,
                &l.attn_ln_b,
                &l.inter_w,
                &l.inter_b,
                &l.out_w,
                &l.out_b,
                &l.out_ln_g,
                &l.out_ln_b,
            ]);
        }
        out
    }

    /// Sets every element to zero (reuses the allocations).
    pub fn fill_zero(&mut self) {
        for (t, _) in self.tensors_mut() {
            t.fill(0.0);
        }
    }

    /// The tensors under their Hugging Face `BertModel` names and shapes; the fused QKV matrix
    /// is split back into query, key and value.
    pub fn named(&self, cfg: &BertConfig) -> Vec<NamedSlice<'_>> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        fn t(name: String, shape: Vec<usize>, data: &[f32]) -> NamedSlice<'_> {
            NamedSlice { name, shape, data }
        }
        let mut out = vec![
            t(
                "embeddings.word_embeddings.weight".into(),
                vec![cfg.vocab_size, h],
                &self.word_emb,
            ),
            t(
                "embeddings.position_embeddings.weight".into(),
                vec![cfg.max_position_embeddings, h],
                &self.pos_emb,
            ),
            t(
                "embeddings.token_type_embeddings.weight".into(),
                vec![cfg.type_vocab_size, h],
                &self.type_emb,
            ),
            t(
                "embeddings.LayerNorm.weight".into(),
                vec![h],
                &self.emb_ln_g,
            ),
            t("embeddings.LayerNorm.bias".into(), vec![h], &self.emb_ln_b),
        ];
        for (n, l) in self.layers.iter().enumerate() {
            let p = |s: &str| format!("encoder.layer.{n}.{s}");
            for (k, part) in ["query", "key", "value"].iter().enumerate() {
                out.push(t(
                    p(&format!("attention.self.{part}.weight")),
                    vec![h, h],
                    &l.qkv_w[k * h * h..(k + 1) * h * h],
                ));
                out.push(t(
                    p(&format!("attention.self.{part}.bias")),
                    vec![h],
                    &l.qkv_b[k * h..(k + 1) * h],
                ));
            }
            out.extend([
                t(
                    p("attention.output.dense.weight"),
                    vec![h, h],
                    &l.attn_out_w,
                ),
                t(p("attention.output.dense.bias"), vec![h], &l.attn_out_b),
                t(
                    p("attention.output.LayerNorm.weight"),
                    vec![h],
                    &l.attn_ln_g,
                ),
                t(p("attention.output.LayerNorm.bias"), vec![h], &l.attn_ln_b),
                t(p("intermediate.dense.weight"), vec![i, h], &l.inter_w),
                t(p("intermediate.dense.bias"), vec![i], &l.inter_b),
                t(p("output.dense.weight"), vec![h, i], &l.out_w),
                t(p("output.dense.bias"), vec![h], &l.out_b),
                t(p("output.LayerNorm.weight"), vec![h], &l.out_ln_g),
                t(p("output.LayerNorm.bias"), vec![h], &l.out_ln_b),
            ]);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decay_flags_follow_the_tensor_order() {
        let mut w = BertWeights::zeros(&crate::model::synthetic::small_config(8, 2, 3, 16));
        let flags = w.decay_flags();
        let from_tensors: Vec<bool> = w.tensors_mut().iter().map(|(_, d)| *d).collect();
        assert_eq!(flags, from_tensors);
        assert_eq!(flags.len(), 5 + 3 * 12);
        assert_eq!(flags.iter().filter(|&&d| d).count(), 3 + 3 * 4);
    }
}
