//! Text → embedding: tokenize, bucket by length, run the encoder, pool, L2-normalise.
//! `Encoder::load` accepts any Hugging Face BERT-family folder (config.json, model.safetensors,
//! tokenizer.json, and the sentence-transformers files when present).

use super::bert::{Bert, PackedBatch, PackedLayers, Workspace};
use super::config::BertConfig;
use super::pooling::{Pooling, SentenceTransformersConfig};
use super::tokenizer::{TextTokenizer, Tokens};
use super::weights::BertWeights;
use super::wordpiece::Scratch;
use crate::cpu::{gemm, math};
use crate::error::{Error, Result};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Overrides for what the model folder says; `None` keeps the folder's choice.
#[derive(Debug, Clone, Default)]
pub struct EncoderOptions {
    /// Max tokens per text, special tokens included. Default: `sentence_bert_config.json`'s
    /// `max_seq_length`, else 256; never above the model's position table.
    pub max_length: Option<usize>,
    /// Default: `1_Pooling/config.json`, else CLS.
    pub pooling: Option<Pooling>,
    /// Default: true when `modules.json` lists a Normalize module.
    pub normalize: Option<bool>,
}

pub const DEFAULT_MAX_LENGTH: usize = 256;

/// Reusable working memory of [`Encoder::encode_one_into`].
#[derive(Debug, Default)]
pub struct EncodeScratch {
    tokens: Scratch,
    ids: Vec<u32>,
    type_ids: Vec<u32>,
    batch: PackedBatch,
    activations: Workspace,
}

pub struct Encoder {
    bert: Bert,
    /// The layer weights packed for forwards of few tokens, built at the first one (or by
    /// [`Encoder::prepare_queries`]) and dropped when the weights are lent out for change.
    packed: OnceLock<PackedLayers>,
    tokenizer: TextTokenizer,
    pooling: Pooling,
    normalize: bool,
    dir: PathBuf,
}

impl Encoder {
    pub fn load(dir: &Path, opts: &EncoderOptions) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::format(
                dir,
                "model folder not found (expected config.json, model.safetensors, tokenizer.json)",
            ));
        }
        let cfg = BertConfig::from_file(&dir.join("config.json"))?;
        let st = SentenceTransformersConfig::read(dir)?;
        let max_length = opts
            .max_length
            .or(st.max_seq_length)
            .unwrap_or(DEFAULT_MAX_LENGTH)
            .min(cfg.max_position_embeddings);
        let tokenizer = TextTokenizer::from_file(&dir.join("tokenizer.json"), max_length)?;
        let weights = BertWeights::load(&dir.join("model.safetensors"), &cfg)?;
        Ok(Encoder {
            bert: Bert { cfg, weights },
            packed: OnceLock::new(),
            tokenizer,
            pooling: opts.pooling.or(st.pooling).unwrap_or(Pooling::Cls),
            normalize: opts.normalize.or(st.normalize).unwrap_or(false),
            dir: dir.to_path_buf(),
        })
    }

    pub fn dim(&self) -> usize {
        self.bert.cfg.hidden_size
    }
    pub fn config(&self) -> &BertConfig {
        &self.bert.cfg
    }
    pub fn bert(&self) -> &Bert {
        &self.bert
    }
    pub fn max_length(&self) -> usize {
        self.tokenizer.max_length()
    }
    pub fn pooling(&self) -> Pooling {
        self.pooling
    }
    pub fn normalize(&self) -> bool {
        self.normalize
    }
    /// The weights, for training. Whoever changes them should update `weights.file_hash`
    /// (training sets it to the hash of the checkpoint it writes) so fingerprints stay honest.
    pub fn bert_mut(&mut self) -> &mut Bert {
        self.packed = OnceLock::new();
        &mut self.bert
    }

    /// Packs the weights for few-token forwards now (a second copy of the layer weights, a few
    /// tens of milliseconds for a small model) instead of at the first query: services call it
    /// at start.
    pub fn prepare_queries(&self) {
        self.packed.get_or_init(|| PackedLayers::of(&self.bert));
    }

    /// The packed weights when a forward of `tokens` rows should use them (see
    /// `cpu::gemm::linear`'s few-row path, which they replace).
    fn packed_for(&self, tokens: usize) -> Option<&PackedLayers> {
        (tokens < gemm::SMALL_ROWS)
            .then(|| self.packed.get_or_init(|| PackedLayers::of(&self.bert)))
    }

    /// The model folder this encoder was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.tokenizer
    }

    /// Identifies what produced an embedding: the exact weights, the architecture, max length,
    /// pooling and normalisation. Stores record it; search refuses a store from another encoder.
    pub fn fingerprint(&self) -> u64 {
        let cfg = serde_json::to_string(&self.bert.cfg).unwrap_or_default();
        let key = format!(
            "rrra-encoder-v1|{:016x}|{cfg}|{}|{}|{}",
            self.bert.weights.file_hash,
            self.max_length(),
            self.pooling,
            self.normalize
        );
        xxhash_rust::xxh3::xxh3_64(key.as_bytes())
    }

    /// A JSON description for store metadata and run logs.
    pub fn describe(&self) -> serde_json::Value {
        serde_json::json!({
            "model": self.dir.file_name().map(|n| n.to_string_lossy().into_owned()),
            "weights_xxh3": format!("{:016x}", self.bert.weights.file_hash),
            "hidden_size": self.dim(),
            "layers": self.bert.cfg.num_hidden_layers,
            "max_length": self.max_length(),
            "pooling": self.pooling.to_string(),
            "normalize": self.normalize,
            "fingerprint": format!("{:016x}", self.fingerprint()),
        })
    }

    /// Embeds `texts` into a row-major `[texts × dim]` matrix, in input order.
    pub fn encode(&self, texts: &[&str], batch_size: usize) -> Result<Vec<f32>> {
        self.encode_with_progress(texts, batch_size, &|_| {})
    }

    /// As [`Encoder::encode`], calling `progress(n)` after each batch of `n` texts.
    ///
    /// Texts are taken in windows, tokenized, sorted by length and cut into batches of
    /// `batch_size`, so each batch holds texts of similar length: attention cost is balanced
    /// across the threads that run a batch's sequences.
    pub fn encode_with_progress(
        &self,
        texts: &[&str],
        batch_size: usize,
        progress: &(dyn Fn(usize) + Sync),
    ) -> Result<Vec<f32>> {
        if batch_size == 0 {
            return Err(Error::InvalidArgument(
                "batch size must be at least 1".into(),
            ));
        }
        let window = batch_size * 32;
        let dim = self.dim();
        let mut out = Vec::with_capacity(texts.len() * dim);
        for chunk in texts.chunks(window) {
            let tokens = self.tokenizer.encode_batch(chunk)?;
            out.extend(self.encode_tokens(&tokens, batch_size, progress)?);
        }
        Ok(out)
    }

    /// Embeds already tokenized texts (e.g. with another max length than the encoder's own),
    /// sorted by length into batches of `batch_size` as [`Encoder::encode_with_progress`] does.
    pub fn encode_tokens(
        &self,
        tokens: &[Tokens],
        batch_size: usize,
        progress: &(dyn Fn(usize) + Sync),
    ) -> Result<Vec<f32>> {
        if batch_size == 0 {
            return Err(Error::InvalidArgument(
                "batch size must be at least 1".into(),
            ));
        }
        let dim = self.dim();
        let mut out = vec![0.0f32; tokens.len() * dim];
        let mut order: Vec<usize> = (0..tokens.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(tokens[i].ids.len()));
        for group in order.chunks(batch_size) {
            let mut batch = PackedBatch::new();
            for &i in group {
                batch.push(&tokens[i].ids, &tokens[i].type_ids);
            }
            let pooled = self.embed_batch(&batch)?;
            for (j, &i) in group.iter().enumerate() {
                out[i * dim..(i + 1) * dim].copy_from_slice(&pooled[j * dim..(j + 1) * dim]);
            }
            progress(group.len());
        }
        Ok(out)
    }

    /// One text's embedding into `out` (`dim` values) with reused working memory: the serving
    /// path. With a WordPiece tokenizer and a text under 256 tokens nothing is allocated once
    /// `scratch` has grown; the values are those of [`Encoder::encode`] on the text alone.
    pub fn encode_one_into(
        &self,
        text: &str,
        scratch: &mut EncodeScratch,
        out: &mut [f32],
    ) -> Result<()> {
        let dim = self.dim();
        if out.len() != dim {
            return Err(Error::InvalidArgument(format!(
                "an output of {} values for embeddings of dimension {dim}",
                out.len()
            )));
        }
        let EncodeScratch {
            tokens,
            ids,
            type_ids,
            batch,
            activations,
        } = scratch;
        self.tokenizer.encode_into(text, tokens, ids, type_ids)?;
        batch.clear();
        batch.push(ids, type_ids);
        let packed = self.packed_for(batch.tokens());
        let hidden = self.bert.forward_with(batch, activations, packed)?;
        self.pooling.pool(hidden, ids.len(), dim, out);
        if self.normalize {
            math::l2_normalize(out);
        }
        Ok(())
    }

    /// Pooled (and normalised when configured) embeddings `[sequences × dim]` of a packed batch.
    pub fn embed_batch(&self, batch: &PackedBatch) -> Result<Vec<f32>> {
        let dim = self.dim();
        let mut activations = Workspace::default();
        let packed = self.packed_for(batch.tokens());
        let hidden = self.bert.forward_with(batch, &mut activations, packed)?;
        let mut pooled = vec![0.0f32; batch.sequences() * dim];
        for (s, out) in pooled.chunks_exact_mut(dim).enumerate() {
            let rows = &hidden[batch.offsets[s] * dim..batch.offsets[s + 1] * dim];
            self.pooling.pool(rows, batch.len_of(s), dim, out);
            if self.normalize {
                math::l2_normalize(out);
            }
        }
        Ok(pooled)
    }
}
