//! `tokenizer.json` through the `tokenizers` crate, with the file's own padding and truncation
//! replaced: no padding (the encoder packs sequences) and truncation to our max length,
//! counted with the special tokens as sentence-transformers does.

use crate::error::{Error, Result};
use std::path::Path;
use tokenizers::{Tokenizer, TruncationParams};

pub struct TextTokenizer {
    inner: Tokenizer,
    max_length: usize,
}

/// One tokenized text: word-piece ids and token-type ids, special tokens included.
pub struct Tokens {
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
}

impl TextTokenizer {
    pub fn from_file(path: &Path, max_length: usize) -> Result<Self> {
        if max_length < 2 {
            return Err(Error::InvalidArgument(format!(
                "max length {max_length} is below 2"
            )));
        }
        let mut inner = Tokenizer::from_file(path)
            .map_err(|e| Error::format(path, format!("cannot load tokenizer: {e}")))?;
        inner.with_padding(None);
        inner
            .with_truncation(Some(TruncationParams {
                max_length,
                ..Default::default()
            }))
            .map_err(|e| Error::format(path, format!("cannot set truncation: {e}")))?;
        Ok(TextTokenizer { inner, max_length })
    }

    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// Tokenizes texts (in parallel inside the `tokenizers` crate).
    pub fn encode_batch(&self, texts: &[&str]) -> Result<Vec<Tokens>> {
        let encs = self
            .inner
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| Error::InvalidArgument(format!("tokenization failed: {e}")))?;
        Ok(encs
            .into_iter()
            .map(|e| Tokens {
                ids: e.get_ids().to_vec(),
                type_ids: e.get_type_ids().to_vec(),
            })
            .collect())
    }
}
