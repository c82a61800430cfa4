//! Training sets for fine-tuning, and the order in which an epoch visits them.
//!
//! Three inputs are read into one [`TrainSet`] (documents, queries with positive and given
//! negative documents as indices into the corpus):
//!
//! - a **BEIR folder** and split ([`read_beir_train`]): the whole corpus is kept (random
//!   negatives are drawn from it); positives are the qrels with relevance > 0. Judgements with
//!   relevance ≤ 0 are not used as negatives, only counted: their meaning varies between data
//!   sets, and a wrong hard negative hurts more than a missing one.
//! - a **FlagEmbedding** JSON-lines file (`{"query", "pos": [text], "neg": [text]}`): passages
//!   are texts only, so documents are deduplicated by exact text and named `p{index}`; lines with
//!   the same query text are one query (named `q{index}`), otherwise a query could meet its own
//!   positives as in-batch negatives.
//! - a **Tevatron** JSON-lines file (`{"query_id", "query", "positive_passages",
//!   "negative_passages"}`, passages `{"docid", "title"?, "text"}`): documents are keyed by
//!   docid with text `(title + " " + text).trim()` as BEIR builds it, and a docid seen again with
//!   another text is an error (one of the two copies is wrong, and guessing which would train on
//!   it). Lines repeating a `query_id` (with the same query text) are merged: the union of their
//!   positives and of their negatives, which is what a file split into several lines per query
//!   means.
//!
//! The format of a JSON-lines file is told from the keys of its first record; a later record in
//! the other format, a missing field, a wrong type or an empty query text is an
//! [`Error::Parse`] naming the line. Per query, repeated labels are kept once and positives are
//! sorted (so [`TrainSet::is_positive`] is a binary search); a given negative that is labelled
//! positive for the same query is dropped, because training would push the query away from a
//! relevant document. Queries without a positive cannot make a training example and are
//! skipped. Everything dropped or merged is counted in [`DataStats`].
//!
//! [`epoch_batches`] turns a set into one epoch's batches of (query, positive) pairs.

use crate::data::{for_each_line, json_error_message, read_beir_folder, Document, UniqueIds};
use crate::error::{Error, Result};
use crate::train::rng::{Site, Stream};
use serde_json::{Map, Value};
use std::collections::{HashMap, HashSet};
use std::path::Path;

/// A training query: its text, its labelled positives and any negatives the data file gives, as
/// indices into [`TrainSet::corpus`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrainQuery {
    pub id: String,
    pub text: String,
    /// Sorted ascending, without repeats, never empty in a set built by the readers
    /// ([`TrainSet::is_positive`] relies on the order).
    pub positives: Vec<usize>,
    /// In file order, without repeats, none of them in `positives`.
    pub given_negatives: Vec<usize>,
}

/// Everything training reads: the documents (shared by all queries), the queries, and what was
/// dropped.
#[derive(Debug, Clone)]
pub struct TrainSet {
    pub corpus: Vec<Document>,
    pub queries: Vec<TrainQuery>,
    pub stats: DataStats,
}

/// What the readers merged or dropped, so a user can see how much of the input was used.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct DataStats {
    /// Distinct queries in the input (BEIR: the queries judged in the split).
    pub queries_read: usize,
    /// Queries skipped because none of their documents is labelled positive.
    pub queries_without_positive: usize,
    /// JSON lines whose query had appeared on an earlier line and were merged into it.
    pub lines_merged: usize,
    /// Passage occurrences naming a document already in the corpus (the same text for
    /// FlagEmbedding, the same docid and text for Tevatron), merged into it.
    pub duplicate_passages_merged: usize,
    /// Labels repeated for one query (a document listed twice as positive, or twice as
    /// negative), kept once.
    pub repeated_labels: usize,
    /// Given negatives dropped because the same document is labelled positive for that query.
    pub negatives_dropped_positive: usize,
    /// BEIR judgements with relevance ≤ 0, not used.
    pub judgements_not_positive: usize,
}

impl TrainSet {
    /// The corpus index of document `id`. This scans the corpus (the set keeps no id map, so
    /// that it stays a plain value); build a map for many look-ups.
    pub fn doc_index(&self, id: &str) -> Option<usize> {
        self.corpus.iter().position(|d| d.id == id)
    }

    /// Whether `doc` is labelled positive for `query` (false for indices out of range).
    pub fn is_positive(&self, query: usize, doc: usize) -> bool {
        self.queries
            .get(query)
            .is_some_and(|q| q.positives.binary_search(&doc).is_ok())
    }

    /// Number of (query, positive) pairs: the examples of one epoch.
    pub fn num_pairs(&self) -> usize {
        self.queries.iter().map(|q| q.positives.len()).sum()
    }
}

/// A query as read, before its labels are cleaned up.
struct Pending {
    id: String,
    text: String,
    /// Line of the query's first record (0 for BEIR, where no line applies).
    line: usize,
    positives: Vec<usize>,
    negatives: Vec<usize>,
}

impl Pending {
    fn new(id: String, text: String, line: usize) -> Self {
        Pending {
            id,
            text,
            line,
            positives: Vec::new(),
            negatives: Vec::new(),
        }
    }
}

/// Cleans every query's labels (see the module doc), skips queries without a positive and fails
/// on an empty result. `rename` names queries `q{index}` (for formats without query ids).
fn finish(
    corpus: Vec<Document>,
    pending: Vec<Pending>,
    mut stats: DataStats,
    source: &Path,
    rename: bool,
) -> Result<TrainSet> {
    stats.queries_read = pending.len();
    let mut queries = Vec::with_capacity(pending.len());
    let mut seen = HashSet::new();
    for p in pending {
        let mut positives = p.positives;
        let listed = positives.len();
        positives.sort_unstable();
        positives.dedup();
        stats.repeated_labels += listed - positives.len();
        if positives.is_empty() {
            stats.queries_without_positive += 1;
            continue;
        }
        seen.clear();
        let mut given_negatives = Vec::with_capacity(p.negatives.len());
        for d in p.negatives {
            if !seen.insert(d) {
                stats.repeated_labels += 1;
            } else if positives.binary_search(&d).is_ok() {
                stats.negatives_dropped_positive += 1;
            } else {
                given_negatives.push(d);
            }
        }
        let id = if rename {
            format!("q{}", queries.len())
        } else {
            p.id
        };
        queries.push(TrainQuery {
            id,
            text: p.text,
            positives,
            given_negatives,
        });
    }
    if queries.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "{}: empty training set: none of the {} queries read has a positive document",
            source.display(),
            stats.queries_read
        )));
    }
    Ok(TrainSet {
        corpus,
        queries,
        stats,
    })
}

/// Reads a BEIR folder and split for training: positives are the qrels with relevance > 0;
/// queries with none are skipped and counted; a judged document missing from the corpus is an
/// [`Error::Parse`] naming the qrels file and line. Queries follow the queries file's order.
pub fn read_beir_train(dir: &Path, split: &str) -> Result<TrainSet> {
    let data = read_beir_folder(dir, split)?;
    let mut stats = DataStats::default();
    let mut pending = Vec::with_capacity(data.qrels.len());
    {
        let index: HashMap<&str, usize> = data
            .corpus
            .iter()
            .enumerate()
            .map(|(i, d)| (d.id.as_str(), i))
            .collect();
        data.qrels
            .check_docs_known(&data.qrels_path, |d| index.contains_key(d))?;
        for q in &data.queries {
            let Some(rels) = data.qrels.get(&q.id) else {
                continue; // not part of this split
            };
            let mut p = Pending::new(q.id.clone(), q.text.clone(), 0);
            for (doc, &rel) in rels {
                match index.get(doc.as_str()) {
                    Some(&d) if rel > 0 => p.positives.push(d),
                    _ => stats.judgements_not_positive += 1,
                }
            }
            pending.push(p);
        }
    }
    finish(data.corpus, pending, stats, &data.qrels_path, false)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    FlagEmbedding,
    Tevatron,
}

impl Format {
    fn name(self) -> &'static str {
        match self {
            Format::FlagEmbedding => "FlagEmbedding (query, pos, neg)",
            Format::Tevatron => "Tevatron (query_id, query, positive_passages, negative_passages)",
        }
    }
}

/// The format a record's keys point to; `Err` when they point to both.
fn format_of(obj: &Map<String, Value>) -> std::result::Result<Option<Format>, String> {
    let flag = obj.contains_key("pos") || obj.contains_key("neg");
    let tev = ["query_id", "positive_passages", "negative_passages"]
        .iter()
        .any(|k| obj.contains_key(*k));
    match (flag, tev) {
        (true, true) => Err(
            "the record has keys of both FlagEmbedding (pos/neg) and Tevatron \
             (query_id/positive_passages/negative_passages)"
                .to_owned(),
        ),
        (true, false) => Ok(Some(Format::FlagEmbedding)),
        (false, true) => Ok(Some(Format::Tevatron)),
        (false, false) => Ok(None),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A required string field.
fn req_str<'a>(obj: &'a Map<String, Value>, key: &str, what: &str) -> Result<&'a str, String> {
    match obj.get(key) {
        None => Err(format!("{what}missing field `{key}`")),
        Some(Value::String(s)) => Ok(s),
        Some(v) => Err(format!(
            "{what}field `{key}` must be a string, found {}",
            type_name(v)
        )),
    }
}

/// A required id field: a non-empty string, or an integer written as its decimal text (so `7`
/// and `"7"` name the same query or document, as in the BEIR readers).
fn req_id(obj: &Map<String, Value>, key: &str, what: &str) -> Result<String, String> {
    let id = match obj.get(key) {
        None => return Err(format!("{what}missing field `{key}`")),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) if n.is_i64() || n.is_u64() => n.to_string(),
        Some(v) => {
            return Err(format!(
                "{what}field `{key}` must be a string or an integer, found {}",
                type_name(v)
            ))
        }
    };
    if id.is_empty() {
        return Err(format!("{what}field `{key}` is empty"));
    }
    Ok(id)
}

/// An array field; a missing or null optional field is empty.
fn array<'a>(
    obj: &'a Map<String, Value>,
    key: &str,
    required: bool,
) -> Result<&'a [Value], String> {
    match (obj.get(key), required) {
        (None, true) => Err(format!("missing field `{key}`")),
        (None | Some(Value::Null), false) => Ok(&[]),
        (Some(Value::Array(a)), _) => Ok(a),
        (Some(v), _) => Err(format!(
            "field `{key}` must be an array, found {}",
            type_name(v)
        )),
    }
}

/// An array of strings (FlagEmbedding passages).
fn str_array<'a>(
    obj: &'a Map<String, Value>,
    key: &str,
    required: bool,
) -> Result<Vec<&'a str>, String> {
    array(obj, key, required)?
        .iter()
        .enumerate()
        .map(|(i, v)| match v {
            Value::String(s) => Ok(s.as_str()),
            v => Err(format!(
                "`{key}[{i}]` must be a string, found {}",
                type_name(v)
            )),
        })
        .collect()
}

/// An array of Tevatron passages, as (docid, BEIR-joined text).
fn passages(
    obj: &Map<String, Value>,
    key: &str,
    required: bool,
) -> Result<Vec<(String, String)>, String> {
    array(obj, key, required)?
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let Value::Object(p) = v else {
                return Err(format!(
                    "`{key}[{i}]` must be an object, found {}",
                    type_name(v)
                ));
            };
            let what = format!("`{key}[{i}]`: ");
            let docid = req_id(p, "docid", &what)?;
            let title = match p.get("title") {
                None | Some(Value::Null) => "",
                Some(Value::String(s)) => s.as_str(),
                Some(v) => {
                    return Err(format!(
                        "{what}field `title` must be a string, found {}",
                        type_name(v)
                    ))
                }
            };
            let text = req_str(p, "text", &what)?;
            Ok((docid, join_title(title, text)))
        })
        .collect()
}

/// `(title + " " + text).trim()`, the BEIR convention (the same as the BEIR corpus reader).
fn join_title(title: &str, text: &str) -> String {
    if title.is_empty() {
        text.trim().to_owned()
    } else {
        format!("{title} {text}").trim().to_owned()
    }
}

/// The state of a JSON-lines read.
#[derive(Default)]
struct Builder {
    corpus: Vec<Document>,
    /// Line where each document first appeared, for conflict messages.
    doc_lines: Vec<usize>,
    /// Docid (Tevatron) or text (FlagEmbedding) → corpus index.
    doc_keys: UniqueIds,
    queries: Vec<Pending>,
    /// Query id (Tevatron) or text (FlagEmbedding) → index in `queries`.
    query_keys: UniqueIds,
    stats: DataStats,
}

impl Builder {
    fn flag_line(&mut self, obj: &Map<String, Value>, line: usize) -> Result<(), String> {
        let query = req_str(obj, "query", "")?;
        if query.trim().is_empty() {
            return Err("empty query text".to_owned());
        }
        let pos = str_array(obj, "pos", true)?;
        let neg = str_array(obj, "neg", false)?;
        let queries = &self.queries;
        let qi = match self
            .query_keys
            .insert(query, queries.len(), |i| queries[i].text.as_str())
        {
            Some(prev) => {
                self.stats.lines_merged += 1;
                prev
            }
            None => {
                self.queries
                    .push(Pending::new(String::new(), query.to_owned(), line));
                self.queries.len() - 1
            }
        };
        let pos: Vec<usize> = pos.into_iter().map(|t| self.flag_doc(t, line)).collect();
        let neg: Vec<usize> = neg.into_iter().map(|t| self.flag_doc(t, line)).collect();
        let q = &mut self.queries[qi];
        q.positives.extend(pos);
        q.negatives.extend(neg);
        Ok(())
    }

    /// The corpus index of a FlagEmbedding passage, adding it if its text is new.
    fn flag_doc(&mut self, text: &str, line: usize) -> usize {
        let corpus = &self.corpus;
        match self
            .doc_keys
            .insert(text, corpus.len(), |i| corpus[i].text.as_str())
        {
            Some(prev) => {
                self.stats.duplicate_passages_merged += 1;
                prev
            }
            None => {
                let i = self.corpus.len();
                self.corpus.push(Document {
                    id: format!("p{i}"),
                    text: text.to_owned(),
                });
                self.doc_lines.push(line);
                i
            }
        }
    }

    fn tevatron_line(&mut self, obj: &Map<String, Value>, line: usize) -> Result<(), String> {
        let qid = req_id(obj, "query_id", "")?;
        let query = req_str(obj, "query", "")?;
        if query.trim().is_empty() {
            return Err(format!("empty query text (query_id {qid:?})"));
        }
        let pos = passages(obj, "positive_passages", true)?;
        let neg = passages(obj, "negative_passages", false)?;
        let queries = &self.queries;
        let qi = match self
            .query_keys
            .insert(&qid, queries.len(), |i| queries[i].id.as_str())
        {
            Some(prev) => {
                let first = &self.queries[prev];
                if first.text != query {
                    return Err(format!(
                        "query_id {qid:?} has a different query text than on line {}",
                        first.line
                    ));
                }
                self.stats.lines_merged += 1;
                prev
            }
            None => {
                self.queries.push(Pending::new(qid, query.to_owned(), line));
                self.queries.len() - 1
            }
        };
        let mut pos_idx = Vec::with_capacity(pos.len());
        for (docid, text) in pos {
            pos_idx.push(self.tevatron_doc(docid, text, line)?);
        }
        let mut neg_idx = Vec::with_capacity(neg.len());
        for (docid, text) in neg {
            neg_idx.push(self.tevatron_doc(docid, text, line)?);
        }
        let q = &mut self.queries[qi];
        q.positives.extend(pos_idx);
        q.negatives.extend(neg_idx);
        Ok(())
    }

    /// The corpus index of a Tevatron passage, adding it if its docid is new.
    fn tevatron_doc(&mut self, docid: String, text: String, line: usize) -> Result<usize, String> {
        let corpus = &self.corpus;
        match self
            .doc_keys
            .insert(&docid, corpus.len(), |i| corpus[i].id.as_str())
        {
            Some(prev) => {
                if self.corpus[prev].text != text {
                    return Err(format!(
                        "docid {docid:?} has a different text than on line {}",
                        self.doc_lines.get(prev).copied().unwrap_or(0)
                    ));
                }
                self.stats.duplicate_passages_merged += 1;
                Ok(prev)
            }
            None => {
                self.corpus.push(Document { id: docid, text });
                self.doc_lines.push(line);
                Ok(self.corpus.len() - 1)
            }
        }
    }
}

/// Reads a JSON-lines training file, FlagEmbedding or Tevatron, told from the first record's
/// keys (see the module doc for both formats and how they are merged and cleaned).
pub fn read_jsonl_train(path: &Path) -> Result<TrainSet> {
    let mut format: Option<(Format, usize)> = None;
    let mut b = Builder::default();
    for_each_line(path, |line_no, line| {
        let bad = |msg: String| Error::parse(path, line_no, msg);
        let value: Value = serde_json::from_str(line).map_err(|e| bad(json_error_message(&e)))?;
        let Value::Object(obj) = value else {
            return Err(bad(format!(
                "expected a JSON object, found {}",
                type_name(&value)
            )));
        };
        let hint = format_of(&obj).map_err(&bad)?;
        let fmt = match (format, hint) {
            (Some((f, first)), Some(h)) if h != f => {
                return Err(bad(format!(
                    "this record is in {} format, but the file is in {} format (from line {first})",
                    h.name(),
                    f.name()
                )))
            }
            (Some((f, _)), _) => f,
            (None, Some(h)) => {
                format = Some((h, line_no));
                h
            }
            (None, None) => {
                let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
                return Err(bad(format!(
                    "cannot tell the format from the keys {keys:?}: expected {} or {}",
                    Format::FlagEmbedding.name(),
                    Format::Tevatron.name()
                )));
            }
        };
        match fmt {
            Format::FlagEmbedding => b.flag_line(&obj, line_no),
            Format::Tevatron => b.tevatron_line(&obj, line_no),
        }
        .map_err(bad)
    })?;
    let rename = matches!(format, Some((Format::FlagEmbedding, _)));
    finish(b.corpus, b.queries, b.stats, path, rename)
}

/// One training example: a query and one of its positives (indices into the set).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Example {
    pub query: usize,
    pub positive: usize,
}

/// One epoch's training examples in batch order: every (query, positive) pair once, shuffled by
/// a Fisher–Yates driven by `Stream::new(seed, epoch, 0, 0, Site::Shuffle)`, cut into batches of
/// `batch_size` such that a query appears at most once per batch (a repeated query moves to the
/// next batch that does not hold it, keeping the order otherwise: first fit); the last partial
/// batch is kept, and so is any earlier batch that only repeated queries could have filled.
///
/// Two different queries may still share a positive within a batch; whoever builds in-batch
/// negatives masks those with [`TrainSet::is_positive`].
pub fn epoch_batches(
    set: &TrainSet,
    seed: u64,
    epoch: u64,
    batch_size: usize,
) -> Result<Vec<Vec<Example>>> {
    if batch_size == 0 {
        return Err(Error::InvalidArgument(
            "batch size must be at least 1".to_owned(),
        ));
    }
    let mut pairs = Vec::with_capacity(set.num_pairs());
    for (qi, q) in set.queries.iter().enumerate() {
        for &p in &q.positives {
            if p >= set.corpus.len() {
                return Err(Error::InvalidArgument(format!(
                    "query {:?} has positive {p}, outside the corpus of {} documents",
                    q.id,
                    set.corpus.len()
                )));
            }
            pairs.push(Example {
                query: qi,
                positive: p,
            });
        }
    }
    if pairs.is_empty() {
        return Err(Error::InvalidArgument(
            "empty training set: no query has a positive document".to_owned(),
        ));
    }
    shuffle(&mut pairs, &Stream::new(seed, epoch, 0, 0, Site::Shuffle));
    Ok(pack(&pairs, set.queries.len(), batch_size))
}

/// Fisher–Yates from the end: draw `k` picks uniformly in `0..=i` for `i = n-1, ..., 1` from the
/// `k`-th 64-bit number of the stream (multiply-shift; its bias, below `n / 2^64`, is far
/// under anything measurable), so the order is a pure function of the stream.
fn shuffle<T>(items: &mut [T], stream: &Stream) {
    for (k, i) in (1..items.len()).rev().enumerate() {
        let b = stream.block(k as u64 / 2);
        let (hi, lo) = if k % 2 == 0 {
            (b[0], b[1])
        } else {
            (b[2], b[3])
        };
        let r = ((hi as u64) << 32) | lo as u64;
        let j = ((r as u128 * (i as u128 + 1)) >> 64) as usize;
        items.swap(i, j);
    }
}

/// Cuts `order` into batches, each example going to the first batch that is not full and does
/// not hold its query yet.
///
/// That batch is the first non-full one after the last batch holding the query: every batch
/// before that one was full or held the query when the query was last placed, and both stay
/// so. Full batches are skipped through a path-compressed "next open batch" forest, so the
/// whole cut is near-linear even when one query has many positives.
fn pack(order: &[Example], num_queries: usize, batch_size: usize) -> Vec<Vec<Example>> {
    let cap = batch_size.min(order.len());
    let mut batches: Vec<Vec<Example>> = Vec::new();
    // next[b] == b: batch b is open; else a later batch to look at instead.
    let mut next: Vec<usize> = Vec::new();
    // 1 + the last batch holding each query; 0 = none yet.
    let mut after = vec![0usize; num_queries];
    for &ex in order {
        let b = open_batch(&mut next, after[ex.query]);
        if b == batches.len() {
            batches.push(Vec::with_capacity(cap));
            next.push(b);
        }
        batches[b].push(ex);
        if batches[b].len() == batch_size {
            next[b] = b + 1;
        }
        after[ex.query] = b + 1;
    }
    batches
}

/// The first open batch at or after `b` (`next.len()` when a new one is needed).
fn open_batch(next: &mut [usize], b: usize) -> usize {
    let mut root = b;
    while root < next.len() && next[root] != root {
        root = next[root];
    }
    let mut c = b;
    while c < next.len() && next[c] != c {
        let n = next[c];
        next[c] = root;
        c = n;
    }
    root
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn write(dir: &Path, name: &str, body: &str) -> PathBuf {
        let p = dir.join(name);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(&p, body).unwrap();
        p
    }

    fn parse_line(r: Result<TrainSet>) -> (usize, String) {
        match r {
            Err(Error::Parse { line, msg, .. }) => (line, msg),
            Err(e) => panic!("expected a parse error, got {e}"),
            Ok(s) => panic!("expected a parse error, got {} queries", s.queries.len()),
        }
    }

    fn beir_folder(dir: &Path, qrels: &str) {
        write(
            dir,
            "corpus.jsonl",
            "{\"_id\": \"d1\", \"text\": \"one\"}\n\
             {\"_id\": \"d2\", \"text\": \"two\"}\n\
             {\"_id\": \"d3\", \"title\": \"T\", \"text\": \"three\"}\n",
        );
        write(
            dir,
            "queries.jsonl",
            "{\"_id\": \"q1\", \"text\": \"first\"}\n\
             {\"_id\": \"q2\", \"text\": \"second\"}\n\
             {\"_id\": \"q3\", \"text\": \"third\"}\n\
             {\"_id\": \"q4\", \"text\": \"unjudged\"}\n",
        );
        write(dir, "qrels/train.tsv", qrels);
    }

    #[test]
    fn beir_positives_skips_and_counts() {
        let d = tempfile::tempdir().unwrap();
        // q3 before q1 in the qrels: the set follows the queries file.
        beir_folder(
            d.path(),
            "query-id\tcorpus-id\tscore\nq3\td3\t2\nq1\td1\t1\nq1\td2\t0\nq2\td2\t0\nq3\td1\t1\n",
        );
        let s = read_beir_train(d.path(), "train").unwrap();
        assert_eq!(s.corpus.len(), 3);
        assert_eq!(s.corpus[2].text, "T three");
        let ids: Vec<&str> = s.queries.iter().map(|q| q.id.as_str()).collect();
        assert_eq!(ids, ["q1", "q3"]);
        assert_eq!(s.queries[0].text, "first");
        assert_eq!(s.queries[0].positives, [0]);
        assert_eq!(s.queries[1].positives, [0, 2]);
        assert!(s.queries.iter().all(|q| q.given_negatives.is_empty()));
        assert_eq!(
            s.stats,
            DataStats {
                queries_read: 3,
                queries_without_positive: 1,
                judgements_not_positive: 2,
                ..DataStats::default()
            }
        );
        assert_eq!(s.num_pairs(), 3);
        assert!(s.is_positive(1, 2));
        assert!(!s.is_positive(0, 1));
        assert!(!s.is_positive(9, 0));
        assert_eq!(s.doc_index("d3"), Some(2));
        assert_eq!(s.doc_index("nope"), None);
    }

    #[test]
    fn beir_unknown_doc_and_empty_set() {
        let d = tempfile::tempdir().unwrap();
        beir_folder(
            d.path(),
            "query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\tnope\t1\n",
        );
        match read_beir_train(d.path(), "train") {
            Err(Error::Parse { path, line, msg }) => {
                assert_eq!(line, 3);
                assert!(path.ends_with("qrels/train.tsv"), "{path:?}");
                assert!(msg.contains("nope"), "{msg}");
            }
            other => panic!("{other:?}"),
        }
        beir_folder(d.path(), "q1\td1\t0\nq2\td2\t0\n");
        match read_beir_train(d.path(), "train") {
            Err(Error::InvalidArgument(m)) => {
                assert!(
                    m.contains("empty training set") && m.contains("train.tsv"),
                    "{m}"
                )
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn flagembedding_dedups_and_drops_positive_negatives() {
        let d = tempfile::tempdir().unwrap();
        let p = write(
            d.path(),
            "f.jsonl",
            "{\"query\": \"a\", \"pos\": [\"P1\"], \"neg\": [\"N1\", \"P2\"]}\n\
             {\"query\": \"b\", \"pos\": [\"P2\"], \"neg\": [\"P2\", \"N1\"], \"prompt\": \"x\"}\n\
             \n\
             {\"query\": \"c\", \"pos\": [], \"neg\": [\"x\"]}\n\
             {\"query\": \"a\", \"pos\": [\"P3\", \"P1\"]}\n",
        );
        let s = read_jsonl_train(&p).unwrap();
        let texts: Vec<&str> = s.corpus.iter().map(|d| d.text.as_str()).collect();
        assert_eq!(texts, ["P1", "N1", "P2", "x", "P3"]);
        let ids: Vec<&str> = s.corpus.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(ids, ["p0", "p1", "p2", "p3", "p4"]);
        assert_eq!(s.queries.len(), 2);
        let (a, b) = (&s.queries[0], &s.queries[1]);
        assert_eq!((a.id.as_str(), a.text.as_str()), ("q0", "a"));
        assert_eq!(a.positives, [0, 4]);
        // P2 is b's positive, not a's: a keeps it as a negative.
        assert_eq!(a.given_negatives, [1, 2]);
        assert_eq!((b.id.as_str(), b.text.as_str()), ("q1", "b"));
        assert_eq!(b.positives, [2]);
        assert_eq!(b.given_negatives, [1]);
        assert!(s.is_positive(1, 2) && !s.is_positive(0, 1));
        assert_eq!(
            s.stats,
            DataStats {
                queries_read: 3,
                queries_without_positive: 1,
                lines_merged: 1,
                // line 2: P2 twice and N1; line 5: P1
                duplicate_passages_merged: 4,
                // P1 listed again for a on line 5
                repeated_labels: 1,
                negatives_dropped_positive: 1,
                judgements_not_positive: 0,
            }
        );
    }

    const TEV1: &str = "{\"query_id\": 7, \"query\": \"what\", \
        \"positive_passages\": [{\"docid\": \"d1\", \"title\": \"T\", \"text\": \"body\"}], \
        \"negative_passages\": [{\"docid\": \"d2\", \"text\": \" neg \"}, \
                                {\"docid\": 5, \"title\": null, \"text\": \"five\"}]}\n";

    #[test]
    fn tevatron_joins_titles_and_merges_query_lines() {
        let d = tempfile::tempdir().unwrap();
        let body = format!(
            "{TEV1}\
             {{\"query_id\": \"8\", \"query\": \"other\", \
               \"positive_passages\": [{{\"docid\": \"d2\", \"title\": \"\", \"text\": \"neg\"}}], \
               \"negative_passages\": [{{\"docid\": \"d1\", \"title\": \"T\", \"text\": \"body\"}}]}}\n\
             {{\"query_id\": \"7\", \"query\": \"what\", \
               \"positive_passages\": [{{\"docid\": \"5\", \"text\": \"five\"}}], \
               \"negative_passages\": []}}\n\
             {{\"query_id\": 9, \"query\": \"none\", \"positive_passages\": []}}\n"
        );
        let p = write(d.path(), "t.jsonl", &body);
        let s = read_jsonl_train(&p).unwrap();
        let docs: Vec<(&str, &str)> = s
            .corpus
            .iter()
            .map(|d| (d.id.as_str(), d.text.as_str()))
            .collect();
        assert_eq!(docs, [("d1", "T body"), ("d2", "neg"), ("5", "five")]);
        assert_eq!(s.queries.len(), 2);
        let (q7, q8) = (&s.queries[0], &s.queries[1]);
        assert_eq!((q7.id.as_str(), q7.text.as_str()), ("7", "what"));
        assert_eq!(q7.positives, [0, 2]);
        // "5" became a positive of 7 on line 3, so its negative from line 1 is dropped.
        assert_eq!(q7.given_negatives, [1]);
        assert_eq!(q8.id, "8");
        assert_eq!(q8.positives, [1]);
        assert_eq!(q8.given_negatives, [0]);
        assert_eq!(
            s.stats,
            DataStats {
                queries_read: 3,
                queries_without_positive: 1,
                lines_merged: 1,
                duplicate_passages_merged: 3,
                repeated_labels: 0,
                negatives_dropped_positive: 1,
                judgements_not_positive: 0,
            }
        );
        assert_eq!(s.doc_index("5"), Some(2));
    }

    #[test]
    fn tevatron_conflicts_name_the_line() {
        let d = tempfile::tempdir().unwrap();
        let conflict = format!(
            "{TEV1}{{\"query_id\": \"8\", \"query\": \"x\", \
             \"positive_passages\": [{{\"docid\": \"d1\", \"text\": \"different\"}}]}}\n"
        );
        let (line, msg) = parse_line(read_jsonl_train(&write(d.path(), "a.jsonl", &conflict)));
        assert_eq!(line, 2);
        assert!(msg.contains("d1") && msg.contains("line 1"), "{msg}");
        let requery = format!(
            "{TEV1}{{\"query_id\": \"7\", \"query\": \"else\", \
             \"positive_passages\": [{{\"docid\": \"d1\", \"title\": \"T\", \"text\": \"body\"}}]}}\n"
        );
        let (line, msg) = parse_line(read_jsonl_train(&write(d.path(), "b.jsonl", &requery)));
        assert_eq!(line, 2);
        assert!(msg.contains("query text"), "{msg}");
    }

    #[test]
    fn bad_lines_are_parse_errors_with_their_line() {
        let flag = "{\"query\": \"a\", \"pos\": [\"x\"], \"neg\": [\"y\"]}\n";
        let tev = "{\"query_id\": \"1\", \"query\": \"a\", \
                   \"positive_passages\": [{\"docid\": \"x\", \"text\": \"x\"}]}\n";
        let cases: Vec<(String, usize, &str)> = vec![
            (format!("{flag}not json\n"), 2, "invalid JSON"),
            (format!("{flag}\n[1, 2]\n"), 3, "JSON object"),
            (
                format!("{flag}{{\"query\": \"b\", \"neg\": []}}\n"),
                2,
                "`pos`",
            ),
            (format!("{flag}{{\"pos\": [\"z\"]}}\n"), 2, "`query`"),
            ("{\"query\": 3, \"pos\": [\"x\"]}\n".into(), 1, "string"),
            ("{\"query\": \"a\", \"pos\": \"x\"}\n".into(), 1, "array"),
            (
                "{\"query\": \"a\", \"pos\": [\"x\", 2]}\n".into(),
                1,
                "`pos[1]`",
            ),
            (
                "{\"query\": \"a\", \"pos\": [\"x\"], \"neg\": 1}\n".into(),
                1,
                "`neg`",
            ),
            (
                "{\"query\": \" \", \"pos\": [\"x\"]}\n".into(),
                1,
                "empty query",
            ),
            (format!("{flag}{tev}"), 2, "Tevatron"),
            (format!("{tev}{flag}"), 2, "FlagEmbedding"),
            ("{\"query\": \"a\"}\n".into(), 1, "cannot tell"),
            (
                "{\"query\": \"a\", \"pos\": [], \"positive_passages\": []}\n".into(),
                1,
                "both",
            ),
            (
                format!("{tev}{{\"query\": \"a\", \"positive_passages\": []}}\n"),
                2,
                "`query_id`",
            ),
            (
                "{\"query_id\": 1.5, \"query\": \"a\", \"positive_passages\": []}\n".into(),
                1,
                "integer",
            ),
            (
                "{\"query_id\": \"\", \"query\": \"a\", \"positive_passages\": []}\n".into(),
                1,
                "empty",
            ),
            (
                "{\"query_id\": \"1\", \"query\": \"a\", \"positive_passages\": {}}\n".into(),
                1,
                "array",
            ),
            (
                format!(
                    "{tev}{{\"query_id\": \"2\", \"query\": \"b\", \
                     \"positive_passages\": [{{\"docid\": \"x\", \"text\": \"x\"}}, \
                                             {{\"docid\": \"y\"}}]}}\n"
                ),
                2,
                "`positive_passages[1]`: missing field `text`",
            ),
            (
                "{\"query_id\": \"1\", \"query\": \"a\", \"positive_passages\": [\"x\"]}\n".into(),
                1,
                "object",
            ),
            (
                "{\"query_id\": \"1\", \"query\": \"a\", \"positive_passages\": [], \
                 \"negative_passages\": [{\"docid\": \"x\", \"title\": 1, \"text\": \"t\"}]}\n"
                    .into(),
                1,
                "`title`",
            ),
        ];
        let d = tempfile::tempdir().unwrap();
        for (body, want_line, want_msg) in cases {
            let p = write(d.path(), "bad.jsonl", &body);
            let (line, msg) = parse_line(read_jsonl_train(&p));
            assert_eq!(line, want_line, "{body}: {msg}");
            assert!(msg.contains(want_msg), "{body}: {msg:?} lacks {want_msg:?}");
        }
    }

    #[test]
    fn empty_training_sets_are_errors_naming_the_file() {
        let d = tempfile::tempdir().unwrap();
        for body in [
            "",
            "\n\n",
            "{\"query\": \"a\", \"pos\": [], \"neg\": [\"n\"]}\n",
        ] {
            let p = write(d.path(), "empty.jsonl", body);
            match read_jsonl_train(&p) {
                Err(Error::InvalidArgument(m)) => {
                    assert!(
                        m.contains("empty training set") && m.contains("empty.jsonl"),
                        "{m}"
                    )
                }
                other => panic!("{body:?}: {other:?}"),
            }
        }
    }

    /// A set of `sizes.len()` queries where query `q` has `sizes[q]` positives.
    fn synthetic(sizes: &[usize]) -> TrainSet {
        let mut corpus = Vec::new();
        let mut queries = Vec::new();
        for (q, &n) in sizes.iter().enumerate() {
            let start = corpus.len();
            for k in 0..n {
                corpus.push(Document {
                    id: format!("d{q}_{k}"),
                    text: String::new(),
                });
            }
            queries.push(TrainQuery {
                id: format!("q{q}"),
                text: format!("query {q}"),
                positives: (start..start + n).collect(),
                given_negatives: Vec::new(),
            });
        }
        TrainSet {
            corpus,
            queries,
            stats: DataStats::default(),
        }
    }

    fn check_epoch(set: &TrainSet, batches: &[Vec<Example>], batch_size: usize) {
        let mut got: Vec<Example> = batches.iter().flatten().copied().collect();
        let mut want: Vec<Example> = set
            .queries
            .iter()
            .enumerate()
            .flat_map(|(q, t)| {
                t.positives.iter().map(move |&p| Example {
                    query: q,
                    positive: p,
                })
            })
            .collect();
        got.sort_by_key(|e| (e.query, e.positive));
        want.sort_by_key(|e| (e.query, e.positive));
        assert_eq!(got, want, "every pair exactly once");
        for b in batches {
            assert!(!b.is_empty() && b.len() <= batch_size);
            let qs: HashSet<usize> = b.iter().map(|e| e.query).collect();
            assert_eq!(qs.len(), b.len(), "a query twice in a batch: {b:?}");
        }
    }

    #[test]
    fn epoch_batches_cover_every_pair_once_without_repeated_queries() {
        let set = synthetic(&[1, 3, 2, 1, 1, 5, 1, 1, 2, 1, 1, 1, 4, 1, 1, 1, 1, 2, 1, 1]);
        for bs in [1, 2, 3, 4, 7, 16, 100] {
            for epoch in 0..5 {
                let b = epoch_batches(&set, 42, epoch, bs).unwrap();
                check_epoch(&set, &b, bs);
            }
        }
        let a = epoch_batches(&set, 42, 3, 4).unwrap();
        assert_eq!(a, epoch_batches(&set, 42, 3, 4).unwrap());
        assert_ne!(a, epoch_batches(&set, 42, 4, 4).unwrap());
        assert_ne!(a, epoch_batches(&set, 43, 3, 4).unwrap());
    }

    #[test]
    fn epoch_batch_sizes() {
        // One positive per query: plain cuts, the last one partial.
        let set = synthetic(&[1; 10]);
        let sizes: Vec<usize> = epoch_batches(&set, 1, 0, 4)
            .unwrap()
            .iter()
            .map(Vec::len)
            .collect();
        assert_eq!(sizes, [4, 4, 2]);
        let sizes: Vec<usize> = epoch_batches(&set, 1, 0, 5)
            .unwrap()
            .iter()
            .map(Vec::len)
            .collect();
        assert_eq!(sizes, [5, 5]);
        // A single query with five positives needs five batches of one.
        let set = synthetic(&[5]);
        let b = epoch_batches(&set, 1, 0, 4).unwrap();
        assert_eq!(b.iter().map(Vec::len).collect::<Vec<_>>(), [1; 5]);
    }

    #[test]
    fn pack_moves_repeats_to_the_next_batch_without_them() {
        let ex = |query, positive| Example { query, positive };
        let order = [ex(0, 0), ex(0, 1), ex(1, 2), ex(2, 3), ex(0, 4), ex(3, 5)];
        let got = pack(&order, 4, 2);
        assert_eq!(
            got,
            vec![
                vec![ex(0, 0), ex(1, 2)],
                vec![ex(0, 1), ex(2, 3)],
                vec![ex(0, 4), ex(3, 5)],
            ]
        );
        let got = pack(&order, 4, 3);
        assert_eq!(
            got,
            vec![
                vec![ex(0, 0), ex(1, 2), ex(2, 3)],
                vec![ex(0, 1), ex(3, 5)],
                vec![ex(0, 4)]
            ]
        );
    }

    #[test]
    fn shuffle_reaches_every_permutation() {
        let mut seen = HashSet::new();
        for epoch in 0..300 {
            let mut v = [0u8, 1, 2];
            shuffle(&mut v, &Stream::new(5, epoch, 0, 0, Site::Shuffle));
            seen.insert(v);
        }
        assert_eq!(seen.len(), 6);
    }

    #[test]
    fn epoch_batches_argument_errors() {
        let set = synthetic(&[1, 2]);
        assert!(matches!(
            epoch_batches(&set, 0, 0, 0),
            Err(Error::InvalidArgument(_))
        ));
        match epoch_batches(&synthetic(&[]), 0, 0, 4) {
            Err(Error::InvalidArgument(m)) => assert!(m.contains("empty training set"), "{m}"),
            other => panic!("{other:?}"),
        }
        let mut broken = synthetic(&[1]);
        broken.queries[0].positives = vec![3];
        assert!(matches!(
            epoch_batches(&broken, 0, 0, 4),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn scifact_train_split_smoke() {
        let dir = match std::env::var_os("RRRA_SHARED") {
            Some(s) => PathBuf::from(s).join("data/scifact"),
            None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/scifact"),
        };
        if !dir.join("qrels/train.tsv").is_file() {
            println!("skipped: no SciFact folder at {}", dir.display());
            return;
        }
        let s = read_beir_train(&dir, "train").unwrap();
        assert!(s.queries.len() > 800, "{} queries", s.queries.len());
        assert!(s.corpus.len() > 5000, "{} documents", s.corpus.len());
        assert_eq!(
            s.stats.queries_read,
            s.queries.len() + s.stats.queries_without_positive
        );
        assert!(s.num_pairs() >= s.queries.len());
        for q in &s.queries {
            assert!(!q.text.trim().is_empty());
            assert!(!q.positives.is_empty());
            assert!(q.positives.iter().all(|&p| p < s.corpus.len()));
            assert!(q.positives.windows(2).all(|w| w[0] < w[1]));
        }
        let b = epoch_batches(&s, 7, 0, 32).unwrap();
        check_epoch(&s, &b, 32);
        assert!(
            b.len() <= s.num_pairs().div_ceil(32) + 2,
            "{} batches",
            b.len()
        );
    }
}
