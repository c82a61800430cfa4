//! Tokenization of texts for the encoder. BERT WordPiece files (`tokenizer.json` with
//! BertNormalizer, BertPreTokenizer, WordPiece and a `[CLS] $A [SEP]` template, as every
//! sentence-transformers BERT has) run through [`super::wordpiece`], which gives the same ids
//! and can tokenize into reused buffers; any other file runs through the `tokenizers` crate.
//! Either way the file's own padding and truncation are replaced: no padding (the encoder
//! packs sequences) and truncation to our max length, counted with the special tokens as
//! sentence-transformers does.

use super::wordpiece::{Scratch, WordPiece};
use crate::error::{Error, Result};
use rayon::prelude::*;
use std::path::Path;
use tokenizers::{Tokenizer, TruncationParams};

pub struct TextTokenizer {
    backend: Backend,
    max_length: usize,
}

enum Backend {
    WordPiece(WordPiece),
    Crate(Box<Tokenizer>),
}

/// One tokenized text: word-piece ids and token-type ids, special tokens included.
pub struct Tokens {
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
}

impl TextTokenizer {
    pub fn from_file(path: &Path, max_length: usize) -> Result<Self> {
        Self::check_length(max_length)?;
        match WordPiece::from_file(path, max_length)? {
            Some(wp) => Ok(TextTokenizer {
                backend: Backend::WordPiece(wp),
                max_length,
            }),
            None => Self::from_file_with_crate(path, max_length),
        }
    }

    /// The `tokenizers` crate's pipeline whatever the file holds (the reference the WordPiece
    /// path is tested against).
    pub fn from_file_with_crate(path: &Path, max_length: usize) -> Result<Self> {
        Self::check_length(max_length)?;
        let mut inner = Tokenizer::from_file(path)
            .map_err(|e| Error::format(path, format!("cannot load tokenizer: {e}")))?;
        inner.with_padding(None);
        inner
            .with_truncation(Some(TruncationParams {
                max_length,
                ..Default::default()
            }))
            .map_err(|e| Error::format(path, format!("cannot set truncation: {e}")))?;
        Ok(TextTokenizer {
            backend: Backend::Crate(Box::new(inner)),
            max_length,
        })
    }

    fn check_length(max_length: usize) -> Result<()> {
        if max_length < 2 {
            return Err(Error::InvalidArgument(format!(
                "max length {max_length} is below 2"
            )));
        }
        Ok(())
    }

    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// Whether texts go through this crate's WordPiece (else through the `tokenizers` crate).
    pub fn is_wordpiece(&self) -> bool {
        matches!(self.backend, Backend::WordPiece(_))
    }

    /// Tokenizes texts, in parallel.
    pub fn encode_batch(&self, texts: &[&str]) -> Result<Vec<Tokens>> {
        match &self.backend {
            Backend::WordPiece(wp) => Ok(texts
                .par_iter()
                .map_init(Scratch::default, |scratch, t| {
                    let mut ids = Vec::new();
                    wp.encode_into(t, scratch, &mut ids);
                    let type_ids = vec![0; ids.len()];
                    Tokens { ids, type_ids }
                })
                .collect()),
            Backend::Crate(tok) => {
                let encs = tok
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
    }

    /// One text's ids and type ids into reused buffers (cleared first). With WordPiece this
    /// allocates only while the buffers grow; the `tokenizers` crate allocates per call.
    pub fn encode_into(
        &self,
        text: &str,
        scratch: &mut Scratch,
        ids: &mut Vec<u32>,
        type_ids: &mut Vec<u32>,
    ) -> Result<()> {
        match &self.backend {
            Backend::WordPiece(wp) => wp.encode_into(text, scratch, ids),
            Backend::Crate(_) => {
                let mut one = self.encode_batch(&[text])?;
                let t = one.pop().ok_or_else(|| {
                    Error::InvalidArgument("the tokenizer returned no encoding".into())
                })?;
                *ids = t.ids;
                *type_ids = t.type_ids;
                return Ok(());
            }
        }
        type_ids.clear();
        type_ids.resize(ids.len(), 0);
        Ok(())
    }
}
