//! BERT's WordPiece tokenizer (BertNormalizer → BertPreTokenizer → WordPiece → `[CLS] … [SEP]`)
//! as one streaming pass that writes ids into caller buffers: after the first texts have grown
//! the buffers, tokenizing a query allocates nothing (the serving path's requirement).
//!
//! It reads the same `tokenizer.json` as the `tokenizers` crate and gives the same ids: the
//! crate's own Unicode tables are used (`unicode_categories`, `unicode-normalization-alignments`),
//! and `tests/wordpiece.rs` compares the two on every text of the test collections and on
//! edge cases (accents, CJK, control characters, special tokens in the text, long words,
//! truncation). A file of any other shape (BPE, Unigram, other normalizers or templates, added
//! tokens with stripping or normalisation flags) is left to the crate: [`WordPiece::from_json`]
//! returns `None` for it.
//!
//! The pipeline, in the crate's order:
//! 1. added tokens (`[CLS]`, `[MASK]`, …) are cut out of the raw text (leftmost-longest) and
//!    map to their ids;
//! 2. clean text: drop NUL, U+FFFD and control characters, map whitespace to a space;
//! 3. put spaces around CJK ideographs;
//! 4. strip accents: NFD, then drop non-spacing marks (when `strip_accents`, by default when
//!    `lowercase`);
//! 5. lowercase;
//! 6. split on whitespace, and isolate each punctuation character;
//! 7. WordPiece each word: greedy longest prefix in the vocabulary, continuations with `##`;
//!    a word longer than `max_input_chars_per_word` or with an unmatched remainder is `[UNK]`;
//! 8. truncate to `max_length − 2` and add `[CLS]` and `[SEP]` (type ids all 0).

use std::collections::HashMap;

use unicode_categories::UnicodeCategories;
use unicode_normalization_alignments::UnicodeNormalization;

use crate::error::{Error, Result};
use std::path::Path;

/// A BERT WordPiece tokenizer read from `tokenizer.json`.
#[derive(Debug, Clone)]
pub struct WordPiece {
    vocab: HashMap<String, u32>,
    unk: u32,
    cls: u32,
    sep: u32,
    prefix: String,
    max_chars_per_word: usize,
    clean_text: bool,
    handle_chinese_chars: bool,
    strip_accents: bool,
    lowercase: bool,
    /// Added tokens matched in the raw text: (content, id).
    added: Vec<(String, u32)>,
    /// Tokens per text, `[CLS]` and `[SEP]` included.
    max_length: usize,
}

/// Reusable working memory of [`WordPiece::encode_into`].
#[derive(Debug, Default)]
pub struct Scratch {
    word: String,
    piece: String,
}

/// Whitespace as BertNormalizer sees it.
fn is_bert_whitespace(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r') || c.is_whitespace()
}

/// Control characters as BertNormalizer drops them (tab, newline and CR are whitespace).
fn is_bert_control(c: char) -> bool {
    !matches!(c, '\t' | '\n' | '\r') && c.is_other()
}

fn is_bert_punctuation(c: char) -> bool {
    c.is_ascii_punctuation() || c.is_punctuation()
}

/// The CJK ideograph blocks BERT splits character by character.
fn is_chinese_char(c: char) -> bool {
    matches!(
        c as u32,
        0x4E00..=0x9FFF
            | 0x3400..=0x4DBF
            | 0x20000..=0x2A6DF
            | 0x2A700..=0x2B73F
            | 0x2B740..=0x2B81F
            | 0x2B920..=0x2CEAF
            | 0xF900..=0xFAFF
            | 0x2F800..=0x2FA1F
    )
}

impl WordPiece {
    /// Reads `path` (a `tokenizer.json`); `Ok(None)` when it is not a BERT WordPiece pipeline
    /// this module reproduces exactly.
    pub fn from_file(path: &Path, max_length: usize) -> Result<Option<WordPiece>> {
        // As the tokenizers crate reports it: the model folder is malformed.
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::format(path, format!("cannot load tokenizer: {e}")))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::format(path, format!("line {}: {e}", e.line())))?;
        Ok(Self::from_json(&json, max_length))
    }

    /// [`WordPiece::from_file`] on parsed JSON.
    pub fn from_json(j: &serde_json::Value, max_length: usize) -> Option<WordPiece> {
        if max_length < 2 {
            return None;
        }
        let norm = &j["normalizer"];
        if norm["type"] != "BertNormalizer" || j["pre_tokenizer"]["type"] != "BertPreTokenizer" {
            return None;
        }
        let model = &j["model"];
        if model["type"] != "WordPiece" {
            return None;
        }
        let vocab: HashMap<String, u32> = model["vocab"]
            .as_object()?
            .iter()
            .map(|(k, v)| Some((k.clone(), u32::try_from(v.as_u64()?).ok()?)))
            .collect::<Option<_>>()?;
        let id_of = |t: &str| vocab.get(t).copied();
        let unk = id_of(model["unk_token"].as_str()?)?;
        let (cls, sep) = Self::template(&j["post_processor"])?;
        let mut added = Vec::new();
        for t in j["added_tokens"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or(&[])
        {
            let plain = [
                t["single_word"].as_bool(),
                t["lstrip"].as_bool(),
                t["rstrip"].as_bool(),
            ]
            .iter()
            .all(|f| *f == Some(false));
            if !plain || t["normalized"].as_bool() != Some(false) {
                return None;
            }
            added.push((
                t["content"].as_str()?.to_string(),
                u32::try_from(t["id"].as_u64()?).ok()?,
            ));
        }
        let lowercase = norm["lowercase"].as_bool()?;
        Some(WordPiece {
            unk,
            cls,
            sep,
            prefix: model["continuing_subword_prefix"].as_str()?.to_string(),
            max_chars_per_word: usize::try_from(model["max_input_chars_per_word"].as_u64()?)
                .ok()?,
            clean_text: norm["clean_text"].as_bool()?,
            handle_chinese_chars: norm["handle_chinese_chars"].as_bool()?,
            strip_accents: norm["strip_accents"].as_bool().unwrap_or(lowercase),
            lowercase,
            added,
            max_length,
            vocab,
        })
    }

    /// The ids of `[CLS]` and `[SEP]` from a single-sequence template `[CLS] $A [SEP]` (type 0)
    /// or a BertProcessing post-processor.
    fn template(p: &serde_json::Value) -> Option<(u32, u32)> {
        let special_id = |name: &serde_json::Value| -> Option<u32> {
            let ids = p["special_tokens"][name.as_str()?]["ids"].as_array()?;
            match ids.as_slice() {
                [id] => u32::try_from(id.as_u64()?).ok(),
                _ => None,
            }
        };
        match p["type"].as_str()? {
            "TemplateProcessing" => match p["single"].as_array()?.as_slice() {
                [first, mid, last]
                    if first["SpecialToken"]["type_id"] == 0
                        && mid["Sequence"]["id"] == "A"
                        && mid["Sequence"]["type_id"] == 0
                        && last["SpecialToken"]["type_id"] == 0 =>
                {
                    Some((
                        special_id(&first["SpecialToken"]["id"])?,
                        special_id(&last["SpecialToken"]["id"])?,
                    ))
                }
                _ => None,
            },
            "BertProcessing" => Some((
                u32::try_from(p["cls"][1].as_u64()?).ok()?,
                u32::try_from(p["sep"][1].as_u64()?).ok()?,
            )),
            _ => None,
        }
    }

    /// Tokens per text, special tokens included.
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// The ids of `text` into `ids` (cleared first), `[CLS]` and `[SEP]` included. Allocates
    /// only while `ids` and `scratch` grow.
    pub fn encode_into(&self, text: &str, scratch: &mut Scratch, ids: &mut Vec<u32>) {
        ids.clear();
        ids.push(self.cls);
        let limit = self.max_length - 1; // room for [SEP]
        let mut rest = text;
        while !rest.is_empty() && ids.len() < limit {
            let (before, special) = self.next_added(rest);
            self.segment(before, scratch, ids, limit);
            match special {
                Some((len, id)) => {
                    ids.push(id);
                    rest = &rest[before.len() + len..];
                }
                None => break,
            }
        }
        ids.truncate(limit);
        ids.push(self.sep);
    }

    /// The text before the leftmost added token in `s` (all of `s` if none), and that token's
    /// byte length and id (the longest one starting there).
    fn next_added<'s>(&self, s: &'s str) -> (&'s str, Option<(usize, u32)>) {
        if self.added.is_empty() {
            return (s, None);
        }
        for (i, _) in s.char_indices() {
            let tail = &s[i..];
            let best = self
                .added
                .iter()
                .filter(|(t, _)| !t.is_empty() && tail.starts_with(t.as_str()))
                .max_by_key(|(t, _)| t.len());
            if let Some((t, id)) = best {
                return (&s[..i], Some((t.len(), *id)));
            }
        }
        (s, None)
    }

    /// Steps 2–7 for one stretch of text without added tokens, appending ids until `limit`.
    fn segment(&self, s: &str, scratch: &mut Scratch, ids: &mut Vec<u32>, limit: usize) {
        let cleaned = s.chars().filter_map(|c| {
            if !self.clean_text {
                Some(c)
            } else if c == '\0' || c == '\u{fffd}' || is_bert_control(c) {
                None
            } else if is_bert_whitespace(c) {
                Some(' ')
            } else {
                Some(c)
            }
        });
        let spaced = cleaned.flat_map(|c| {
            let pad = self.handle_chinese_chars && is_chinese_char(c);
            [pad.then_some(' '), Some(c), pad.then_some(' ')]
                .into_iter()
                .flatten()
        });
        if self.strip_accents {
            let stripped = spaced
                .nfd()
                .map(|(c, _)| c)
                .filter(|c| !c.is_mark_nonspacing());
            self.words(stripped, scratch, ids, limit);
        } else {
            self.words(spaced, scratch, ids, limit);
        }
    }

    /// Steps 5–7: lowercases, splits into words and WordPieces each.
    fn words(
        &self,
        chars: impl Iterator<Item = char>,
        scratch: &mut Scratch,
        ids: &mut Vec<u32>,
        limit: usize,
    ) {
        scratch.word.clear();
        for c in chars {
            if ids.len() >= limit {
                return;
            }
            if c.is_whitespace() {
                self.flush(scratch, ids);
            } else if is_bert_punctuation(c) {
                self.flush(scratch, ids);
                scratch.word.push(c);
                self.flush(scratch, ids);
            } else if self.lowercase {
                scratch.word.extend(c.to_lowercase());
            } else {
                scratch.word.push(c);
            }
        }
        self.flush(scratch, ids);
    }

    /// WordPieces the pending word (if any) and clears it.
    fn flush(&self, scratch: &mut Scratch, ids: &mut Vec<u32>) {
        let Scratch { word, piece } = scratch;
        if word.is_empty() {
            return;
        }
        if word.chars().count() > self.max_chars_per_word {
            ids.push(self.unk);
            word.clear();
            return;
        }
        let mark = ids.len();
        let mut start = 0;
        while start < word.len() {
            let mut end = word.len();
            let mut found = None;
            while start < end {
                let sub = &word[start..end];
                let id = if start == 0 {
                    self.vocab.get(sub)
                } else {
                    piece.clear();
                    piece.push_str(&self.prefix);
                    piece.push_str(sub);
                    self.vocab.get(piece.as_str())
                };
                if let Some(&id) = id {
                    found = Some(id);
                    break;
                }
                end -= sub.chars().next_back().map_or(1, char::len_utf8);
            }
            match found {
                Some(id) => {
                    ids.push(id);
                    start = end;
                }
                None => {
                    ids.truncate(mark);
                    ids.push(self.unk);
                    break;
                }
            }
        }
        word.clear();
    }
}
