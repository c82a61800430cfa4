//! BEIR folders: `corpus.jsonl` (`_id`, `title`, `text`), `queries.jsonl` (`_id`, `text`) and
//! `qrels/<split>.tsv` (graded judgements).
//!
//! The readers are strict: a malformed line, a missing field or a repeated id is an error naming
//! the file and line, because a silently skipped document or judgement shifts every metric.

use super::{for_each_line, json_error_message, quoted, UniqueIds};
use crate::error::{Error, Result};
use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;
use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// One corpus document. `text` is `(title + " " + text).trim()`, the BEIR convention, so every
/// encoder sees the title the way BEIR's reference numbers were computed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Document {
    pub id: String,
    pub text: String,
}

/// One query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub id: String,
    pub text: String,
}

/// A JSON `_id`: BEIR files use strings, some converted corpora numbers. Numbers are normalised
/// to their decimal text so `"12"` and `12` name the same document as in the qrels.
struct JsonId(String);

impl<'de> Deserialize<'de> for JsonId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct IdVisitor;
        impl Visitor<'_> for IdVisitor {
            type Value = JsonId;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string or an integer")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<JsonId, E> {
                Ok(JsonId(v.to_owned()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> std::result::Result<JsonId, E> {
                Ok(JsonId(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> std::result::Result<JsonId, E> {
                Ok(JsonId(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> std::result::Result<JsonId, E> {
                Ok(JsonId(v.to_string()))
            }
        }
        d.deserialize_any(IdVisitor)
    }
}

/// The fields of one JSONL record that we use; others (BEIR's `metadata`) are ignored.
#[derive(Deserialize)]
struct RawRecord {
    #[serde(rename = "_id")]
    id: Option<JsonId>,
    #[serde(default)]
    title: Option<String>,
    text: Option<String>,
}

/// Reads JSONL records, enforcing `_id` + `text` and unique ids, and builds one item per line.
fn read_jsonl<T>(
    path: &Path,
    what: &str,
    id_of: fn(&T) -> &str,
    build: impl Fn(String, Option<String>, String) -> T,
) -> Result<Vec<T>> {
    let mut items: Vec<T> = Vec::new();
    let mut lines: Vec<usize> = Vec::new();
    let mut ids = UniqueIds::default();
    for_each_line(path, |line_no, line| {
        let rec: RawRecord = serde_json::from_str(line)
            .map_err(|e| Error::parse(path, line_no, json_error_message(&e)))?;
        let id = rec
            .id
            .ok_or_else(|| Error::parse(path, line_no, format!("{what} has no `_id`")))?
            .0;
        let text = rec
            .text
            .ok_or_else(|| Error::parse(path, line_no, format!("{what} {id:?} has no `text`")))?;
        if let Some(prev) = ids.insert(&id, items.len(), |i| id_of(&items[i])) {
            return Err(Error::parse(
                path,
                line_no,
                format!("duplicate {what} id {id:?} (first on line {})", lines[prev]),
            ));
        }
        items.push(build(id, rec.title, text));
        lines.push(line_no);
        Ok(())
    })?;
    Ok(items)
}

/// Reads `corpus.jsonl`. A missing or null `title` counts as empty.
pub fn read_corpus(path: &Path) -> Result<Vec<Document>> {
    read_jsonl(
        path,
        "document",
        |d: &Document| d.id.as_str(),
        |id, title, text| {
            let title = title.unwrap_or_default();
            let joined = if title.is_empty() {
                text.trim().to_owned()
            } else {
                format!("{title} {text}").trim().to_owned()
            };
            Document { id, text: joined }
        },
    )
}

/// Reads `queries.jsonl` (a `title`, if any, is ignored: BEIR queries are their `text`).
pub fn read_queries(path: &Path) -> Result<Vec<Query>> {
    read_jsonl(
        path,
        "query",
        |q: &Query| q.id.as_str(),
        |id, _title, text| Query { id, text },
    )
}

/// The judgements of one query, with the line it first appears on.
#[derive(Debug, Clone)]
struct QueryJudgements {
    id: String,
    line: usize,
    rels: HashMap<String, i32>,
    /// Line of every judgement, kept so [`Qrels::check_docs_known`] can point at it.
    doc_lines: HashMap<String, usize>,
}

/// Relevance judgements: query id → (doc id → integer relevance). Queries keep the order in
/// which the file first names them, so reports and errors follow the file.
#[derive(Debug, Clone, Default)]
pub struct Qrels {
    queries: Vec<QueryJudgements>,
    index: HashMap<String, usize>,
}

impl Qrels {
    /// Query ids in order of first appearance in the file.
    pub fn queries(&self) -> impl Iterator<Item = &str> + '_ {
        self.queries.iter().map(|q| q.id.as_str())
    }

    /// Query ids with their judgements, in order of first appearance.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &HashMap<String, i32>)> + '_ {
        self.queries.iter().map(|q| (q.id.as_str(), &q.rels))
    }

    /// The judgements of `qid` (doc id → relevance), if the query is judged at all.
    pub fn get(&self, qid: &str) -> Option<&HashMap<String, i32>> {
        self.index.get(qid).map(|&i| &self.queries[i].rels)
    }

    /// The 1-based line where `qid` first appears.
    pub fn line_of(&self, qid: &str) -> Option<usize> {
        self.index.get(qid).map(|&i| self.queries[i].line)
    }

    /// Number of judged queries.
    pub fn len(&self) -> usize {
        self.queries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queries.is_empty()
    }

    /// Total number of (query, doc) judgements.
    pub fn num_judgements(&self) -> usize {
        self.queries.iter().map(|q| q.rels.len()).sum()
    }

    /// Number of docs judged relevant (relevance ≥ 1, trec_eval's default level) for `qid`.
    pub fn num_relevant(&self, qid: &str) -> usize {
        self.get(qid)
            .map_or(0, |r| r.values().filter(|&&v| v >= 1).count())
    }

    /// Fails with a parse error at the first line (of the qrels file `path`) whose query id is not
    /// `known`: judgements for a query that does not exist mean the files do not belong together.
    pub fn check_queries_known(&self, path: &Path, known: impl Fn(&str) -> bool) -> Result<()> {
        match self.queries.iter().find(|q| !known(&q.id)) {
            Some(q) => Err(Error::parse(
                path,
                q.line,
                format!("query id {:?} is not in the queries file", q.id),
            )),
            None => Ok(()),
        }
    }

    /// Fails with a parse error at the first line (of the qrels file `path`) whose doc id is not
    /// `known`: such a document can never be retrieved, which silently caps recall.
    pub fn check_docs_known(&self, path: &Path, known: impl Fn(&str) -> bool) -> Result<()> {
        let first = self
            .queries
            .iter()
            .flat_map(|q| q.doc_lines.iter().map(move |(d, &l)| (l, q.id.as_str(), d)))
            .filter(|(_, _, d)| !known(d))
            .min_by_key(|&(l, _, _)| l);
        match first {
            Some((line, qid, doc)) => Err(Error::parse(
                path,
                line,
                format!("doc id {doc:?} (judged for query {qid:?}) is not in the corpus"),
            )),
            None => Ok(()),
        }
    }

    /// Adds one judgement; `Err` holds the line of the earlier judgement of the same pair.
    fn insert(&mut self, qid: &str, doc: &str, rel: i32, line: usize) -> Result<(), usize> {
        let qi = match self.index.get(qid) {
            Some(&i) => i,
            None => {
                self.queries.push(QueryJudgements {
                    id: qid.to_owned(),
                    line,
                    rels: HashMap::new(),
                    doc_lines: HashMap::new(),
                });
                self.index.insert(qid.to_owned(), self.queries.len() - 1);
                self.queries.len() - 1
            }
        };
        let q = &mut self.queries[qi];
        if let Some(&prev) = q.doc_lines.get(doc) {
            return Err(prev);
        }
        q.rels.insert(doc.to_owned(), rel);
        q.doc_lines.insert(doc.to_owned(), line);
        Ok(())
    }
}

/// Splits a qrels line: on tabs when it has any (BEIR), else on runs of whitespace (TREC).
fn qrels_fields(line: &str) -> Vec<&str> {
    if line.contains('\t') {
        line.trim().split('\t').map(str::trim).collect()
    } else {
        line.split_ascii_whitespace().collect()
    }
}

/// Reads a qrels file: BEIR TSV (`query-id corpus-id score`) or TREC (`qid 0 docid rel`), told
/// apart by the column count of the first data line. The first line is a header when its score
/// column is not an integer. Scores must be integers (negative = judged non-relevant).
pub fn read_qrels(path: &Path) -> Result<Qrels> {
    let mut qrels = Qrels::default();
    let mut columns: Option<usize> = None;
    let mut first = true;
    for_each_line(path, |line_no, line| {
        let fields = qrels_fields(line);
        let is_first = std::mem::replace(&mut first, false);
        if is_first
            && matches!(fields.len(), 3 | 4)
            && fields[fields.len() - 1].parse::<i32>().is_err()
        {
            return Ok(()); // header
        }
        let ncol = *columns.get_or_insert(fields.len());
        if fields.len() != ncol || !matches!(ncol, 3 | 4) {
            return Err(Error::parse(
                path,
                line_no,
                match ncol {
                    3 | 4 => format!("expected {ncol} columns like the lines above, found {}", fields.len()),
                    n => format!(
                        "expected 3 columns (query-id, corpus-id, score) or 4 (qid, 0, docid, rel), found {n}"
                    ),
                },
            ));
        }
        let (qid, doc, score) = if ncol == 3 {
            (fields[0], fields[1], fields[2])
        } else {
            (fields[0], fields[2], fields[3])
        };
        if qid.is_empty() || doc.is_empty() {
            return Err(Error::parse(path, line_no, "empty query or doc id"));
        }
        let rel: i32 = score.parse().map_err(|_| {
            Error::parse(
                path,
                line_no,
                format!("relevance {} is not an integer", quoted(score)),
            )
        })?;
        qrels.insert(qid, doc, rel, line_no).map_err(|prev| {
            Error::parse(
                path,
                line_no,
                format!(
                    "duplicate judgement of doc {doc:?} for query {qid:?} (first on line {prev})"
                ),
            )
        })
    })?;
    Ok(qrels)
}

/// A BEIR folder read for one split.
#[derive(Debug, Clone)]
pub struct BeirData {
    pub corpus: Vec<Document>,
    pub queries: Vec<Query>,
    pub qrels: Qrels,
    /// The qrels file that was read, for error messages that point into it.
    pub qrels_path: PathBuf,
}

impl BeirData {
    /// The queries judged in this split, in queries-file order (BEIR evaluates only these).
    pub fn judged_queries(&self) -> impl Iterator<Item = &Query> + '_ {
        self.queries
            .iter()
            .filter(|q| self.qrels.get(&q.id).is_some())
    }
}

/// Reads `dir/corpus.jsonl`, `dir/queries.jsonl` and `dir/qrels/<split>.tsv`, and checks that
/// every judged query exists (an unknown query id is a parse error at its qrels line).
/// Judged docs missing from the corpus are not checked here; see [`Qrels::check_docs_known`].
pub fn read_beir_folder(dir: &Path, split: &str) -> Result<BeirData> {
    if split.is_empty() || split.contains(['/', '\\']) {
        return Err(Error::InvalidArgument(format!(
            "split name {split:?} must be a plain file stem like \"test\""
        )));
    }
    let corpus = read_corpus(&dir.join("corpus.jsonl"))?;
    let queries = read_queries(&dir.join("queries.jsonl"))?;
    let qrels_path = dir.join("qrels").join(format!("{split}.tsv"));
    let qrels = read_qrels(&qrels_path)?;
    let known: std::collections::HashSet<&str> = queries.iter().map(|q| q.id.as_str()).collect();
    qrels.check_queries_known(&qrels_path, |q| known.contains(q))?;
    drop(known);
    Ok(BeirData {
        corpus,
        queries,
        qrels,
        qrels_path,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, body: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, body).unwrap();
        p
    }

    #[test]
    fn corpus_joins_title_and_normalises_numeric_ids() {
        let d = tempfile::tempdir().unwrap();
        let p = write(
            d.path(),
            "c.jsonl",
            "{\"_id\": 12, \"title\": \"T\", \"text\": \"body \"}\n\n\
             {\"_id\": \"a\", \"text\": \" only text\", \"metadata\": {}}\n\
             {\"_id\": \"b\", \"title\": null, \"text\": \"\"}\n",
        );
        let docs = read_corpus(&p).unwrap();
        assert_eq!(
            docs,
            vec![
                Document {
                    id: "12".into(),
                    text: "T body".into()
                },
                Document {
                    id: "a".into(),
                    text: "only text".into()
                },
                Document {
                    id: "b".into(),
                    text: "".into()
                },
            ]
        );
    }

    #[test]
    fn missing_fields_and_bad_ids_are_errors() {
        let d = tempfile::tempdir().unwrap();
        for (body, line) in [
            ("{\"_id\": \"a\", \"text\": \"x\"}\n{\"text\": \"y\"}\n", 2),
            ("{\"_id\": \"a\"}\n", 1),
            ("{\"_id\": 1.5, \"text\": \"x\"}\n", 1),
            ("{\"_id\": \"a\", \"text\": 3}\n", 1),
            ("[1, 2]\n", 1),
        ] {
            let p = write(d.path(), "q.jsonl", body);
            match read_queries(&p) {
                Err(Error::Parse { line: l, .. }) => assert_eq!(l, line, "{body}"),
                other => panic!("{body}: {other:?}"),
            }
        }
    }

    #[test]
    fn qrels_three_and_four_columns() {
        let d = tempfile::tempdir().unwrap();
        let p = write(
            d.path(),
            "a.tsv",
            "query-id\tcorpus-id\tscore\nq1\td1\t2\nq1\td2\t0\nq2\td1\t-1\n",
        );
        let q = read_qrels(&p).unwrap();
        assert_eq!(q.queries().collect::<Vec<_>>(), vec!["q1", "q2"]);
        assert_eq!(q.get("q1").unwrap()["d1"], 2);
        assert_eq!(q.get("q2").unwrap()["d1"], -1);
        assert_eq!(q.num_relevant("q1"), 1);
        assert_eq!(q.num_relevant("q2"), 0);
        assert_eq!(q.line_of("q2"), Some(4));
        assert_eq!(q.num_judgements(), 3);

        // TREC style, no header, doc ids that are not integers.
        let p = write(
            d.path(),
            "b.txt",
            "1 0 doc-a 1\n1 0 doc-b 0\n2 Q0 doc-a 3\n",
        );
        let q = read_qrels(&p).unwrap();
        assert_eq!(q.len(), 2);
        assert_eq!(q.get("2").unwrap()["doc-a"], 3);

        // A TREC file with a header too.
        let p = write(d.path(), "c.txt", "qid iter docno rel\n1 0 7 1\n");
        assert_eq!(read_qrels(&p).unwrap().get("1").unwrap()["7"], 1);
    }

    #[test]
    fn qrels_errors_have_lines() {
        let d = tempfile::tempdir().unwrap();
        for (body, line) in [
            ("q\td\ts\nq1\td1\t1\nq1\td1\t2\n", 3),
            ("q1\td1\t1\nq1\td2\n", 2),
            ("q1\td1\t1\nq1\t0\td2\t1\n", 2),
            ("q1\td1\t1\nq1\td2\t1.5\n", 2),
            ("only two\n", 1),
        ] {
            let p = write(d.path(), "q.tsv", body);
            match read_qrels(&p) {
                Err(Error::Parse { line: l, .. }) => assert_eq!(l, line, "{body}"),
                other => panic!("{body}: {other:?}"),
            }
        }
    }

    #[test]
    fn unknown_queries_and_docs_point_at_their_line() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "q.tsv", "h\th\th\na\tx\t1\nb\ty\t1\na\tz\t1\n");
        let q = read_qrels(&p).unwrap();
        let e = q.check_queries_known(&p, |id| id == "a").unwrap_err();
        assert!(matches!(e, Error::Parse { line: 3, .. }), "{e}");
        assert!(q.check_queries_known(&p, |_| true).is_ok());
        let e = q.check_docs_known(&p, |id| id == "x").unwrap_err();
        assert!(matches!(e, Error::Parse { line: 3, .. }), "{e}");
        let e = q.check_docs_known(&p, |id| id != "z").unwrap_err();
        assert!(matches!(e, Error::Parse { line: 4, .. }), "{e}");
    }
}
