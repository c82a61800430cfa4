//! TREC run files: `qid Q0 docid rank score tag`, one retrieved document per line.
//!
//! A [`Run`] keeps each query's documents in the order they were given and the queries in the
//! order they first appear, so a run written from search results comes out in query-file order
//! and evaluation re-sorts by score itself (as trec_eval does) instead of trusting ranks.

use super::{for_each_line, quoted, UniqueIds};
use crate::error::{Error, Result};
use crate::util::atomic_write;
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

/// Retrieved documents per query: query id → ordered list of (doc id, score).
///
/// Scores are `f64` because trec_eval compares the scores it parses as doubles; the engine's
/// `f32` scores convert exactly. A doc id appears at most once per query (trec_eval rejects
/// duplicates), which every constructor enforces.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Run {
    queries: Vec<(String, Vec<(String, f64)>)>,
    index: HashMap<String, usize>,
}

/// Ids are written space-separated, so they must be non-empty and whitespace-free.
fn check_id(kind: &str, id: &str) -> Result<()> {
    if id.is_empty() || id.chars().any(char::is_whitespace) {
        return Err(Error::InvalidArgument(format!(
            "{kind} {id:?} cannot be written to a TREC run: it is empty or contains whitespace"
        )));
    }
    Ok(())
}

impl Run {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the ranked documents of a query not yet in the run. Fails (`InvalidArgument`) if the
    /// query is already present, a doc id repeats, an id is empty or has whitespace, or a score
    /// is not finite.
    pub fn add_query(&mut self, qid: impl Into<String>, docs: Vec<(String, f64)>) -> Result<()> {
        let qid = qid.into();
        check_id("query id", &qid)?;
        if self.index.contains_key(&qid) {
            return Err(Error::InvalidArgument(format!(
                "query {qid:?} is already in the run"
            )));
        }
        let mut seen = UniqueIds::default();
        for (i, (doc, score)) in docs.iter().enumerate() {
            check_id("doc id", doc)?;
            if !score.is_finite() {
                return Err(Error::InvalidArgument(format!(
                    "query {qid:?}, doc {doc:?}: score {score} is not finite"
                )));
            }
            if seen.insert(doc, i, |j| docs[j].0.as_str()).is_some() {
                return Err(Error::InvalidArgument(format!(
                    "query {qid:?} lists doc {doc:?} twice"
                )));
            }
        }
        self.index.insert(qid.clone(), self.queries.len());
        self.queries.push((qid, docs));
        Ok(())
    }

    /// The documents of `qid` in stored order.
    pub fn get(&self, qid: &str) -> Option<&[(String, f64)]> {
        self.index.get(qid).map(|&i| self.queries[i].1.as_slice())
    }

    /// Query ids in insertion order.
    pub fn queries(&self) -> impl Iterator<Item = &str> + '_ {
        self.queries.iter().map(|(q, _)| q.as_str())
    }

    /// (query id, documents) in insertion order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[(String, f64)])> + '_ {
        self.queries.iter().map(|(q, d)| (q.as_str(), d.as_slice()))
    }

    /// Number of queries.
    pub fn len(&self) -> usize {
        self.queries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queries.is_empty()
    }

    /// Total number of (query, doc) lines.
    pub fn num_entries(&self) -> usize {
        self.queries.iter().map(|(_, d)| d.len()).sum()
    }
}

/// A query while its run is being read: the line of each document and a duplicate detector
/// only live until the file is done.
struct PendingQuery {
    qid: String,
    docs: Vec<(String, f64)>,
    lines: Vec<usize>,
    seen: UniqueIds,
}

/// Reads a TREC run. Lines of one query need not be contiguous; documents keep file order. The
/// rank column must be an integer but is otherwise ignored (trec_eval ranks by score); the
/// second and sixth columns are ignored.
pub fn read_run(path: &Path) -> Result<Run> {
    let mut queries: Vec<PendingQuery> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    for_each_line(path, |line_no, line| {
        let f: Vec<&str> = line.split_ascii_whitespace().collect();
        if f.len() != 6 {
            return Err(Error::parse(
                path,
                line_no,
                format!(
                    "expected 6 columns (qid Q0 docid rank score tag), found {}",
                    f.len()
                ),
            ));
        }
        let (qid, doc, rank, score) = (f[0], f[2], f[3], f[4]);
        if rank.parse::<i64>().is_err() {
            return Err(Error::parse(
                path,
                line_no,
                format!("rank {} is not an integer", quoted(rank)),
            ));
        }
        let score: f64 = match score.parse::<f64>() {
            Ok(s) if s.is_finite() => s,
            _ => {
                return Err(Error::parse(
                    path,
                    line_no,
                    format!("score {} is not a finite number", quoted(score)),
                ))
            }
        };
        let qi = match index.get(qid) {
            Some(&i) => i,
            None => {
                index.insert(qid.to_owned(), queries.len());
                queries.push(PendingQuery {
                    qid: qid.to_owned(),
                    docs: Vec::new(),
                    lines: Vec::new(),
                    seen: UniqueIds::default(),
                });
                queries.len() - 1
            }
        };
        let PendingQuery {
            docs, lines, seen, ..
        } = &mut queries[qi];
        if let Some(prev) = seen.insert(doc, docs.len(), |j| docs[j].0.as_str()) {
            return Err(Error::parse(
                path,
                line_no,
                format!(
                    "doc {doc:?} is listed twice for query {qid:?} (first on line {})",
                    lines[prev]
                ),
            ));
        }
        docs.push((doc.to_owned(), score));
        lines.push(line_no);
        Ok(())
    })?;
    Ok(Run {
        queries: queries.into_iter().map(|q| (q.qid, q.docs)).collect(),
        index,
    })
}

/// Formats a score so that reading it back gives the same ranking, ties included.
///
/// A score that is exactly an `f32` (what the engine produces) is written as the shortest text
/// that parses back to that `f32` (e.g. `0.354013`); different `f32`s stay strictly ordered
/// after the round trip and equal ones stay equal. Any other score is written as the shortest
/// text that parses back to the same `f64`.
fn format_score(s: f64) -> String {
    let narrow = s as f32;
    if f64::from(narrow) == s {
        format!("{narrow}")
    } else {
        format!("{s}")
    }
}

/// Writes `run` atomically in TREC format: queries in the run's insertion order, each query's
/// documents in stored order with ranks 1, 2, ..., scores in the shortest text that reads back
/// to the same ranking (an `f32`-exact score as its shortest `f32` text, any other as its
/// shortest `f64` text).
/// `tag` (the run name, last column) must be non-empty and whitespace-free.
pub fn write_run(path: &Path, run: &Run, tag: &str) -> Result<()> {
    check_id("run tag", tag)?;
    atomic_write(path, |w| {
        for (qid, docs) in run.iter() {
            for (rank, (doc, score)) in docs.iter().enumerate() {
                writeln!(
                    w,
                    "{qid} Q0 {doc} {} {} {tag}",
                    rank + 1,
                    format_score(*score)
                )
                .map_err(|e| Error::io(path, e))?;
            }
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn docs(v: &[(&str, f64)]) -> Vec<(String, f64)> {
        v.iter().map(|(d, s)| (d.to_string(), *s)).collect()
    }

    #[test]
    fn write_then_read_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("run.trec");
        let mut run = Run::new();
        // Engine-style f32 scores, including ones that need many digits and a tie.
        let f32s: [f32; 4] = [0.354_013_f32, 1.0 / 3.0, 1.0 / 3.0, -2.5e-8];
        run.add_query(
            "q2",
            docs(&[("b", 0.0), ("a", 0.0)])
                .into_iter()
                .zip(f32s)
                .map(|((d, _), s)| (d, f64::from(s)))
                .collect(),
        )
        .unwrap();
        run.add_query("q10", docs(&[("x", 0.1), ("y", 1e300), ("z", -7.0)]))
            .unwrap();
        run.add_query(
            "q1",
            docs(&[("c", f64::from(f32s[2])), ("d", f64::from(f32s[3]))]),
        )
        .unwrap();
        run.add_query("empty", Vec::new()).unwrap();
        write_run(&p, &run, "my-run").unwrap();
        let back = read_run(&p).unwrap();
        // The empty query has no line, so it does not come back. Ids and order are exact;
        // f32-born scores come back as the same f32, other scores as the same f64.
        assert_eq!(back.queries().collect::<Vec<_>>(), vec!["q2", "q10", "q1"]);
        for (qid, docs) in back.iter() {
            let orig = run.get(qid).unwrap();
            assert_eq!(docs.len(), orig.len());
            for ((d, s), (od, os)) in docs.iter().zip(orig) {
                assert_eq!(d, od);
                if f64::from(*os as f32) == *os {
                    assert_eq!(*s as f32, *os as f32, "{qid} {d}");
                } else {
                    assert_eq!(s, os, "{qid} {d}");
                }
            }
        }
        // A run read from text is a fixed point of write + read.
        let p2 = dir.path().join("run2.trec");
        write_run(&p2, &back, "my-run").unwrap();
        assert_eq!(read_run(&p2).unwrap(), back);
        assert_eq!(std::fs::read(&p).unwrap(), std::fs::read(&p2).unwrap());
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.starts_with("q2 Q0 b 1 0.354013 my-run\n"), "{text}");
        assert!(text.contains("q10 Q0 x 1 0.1 my-run\n"), "{text}");
    }

    #[test]
    fn add_query_rejects_bad_input() {
        let mut run = Run::new();
        assert!(run.add_query("q", docs(&[("a", 1.0), ("a", 0.5)])).is_err());
        assert!(run.add_query("q", docs(&[("a b", 1.0)])).is_err());
        assert!(run.add_query("q", docs(&[("a", f64::NAN)])).is_err());
        assert!(run.add_query("", docs(&[])).is_err());
        run.add_query("q", docs(&[("a", 1.0)])).unwrap();
        assert!(run.add_query("q", docs(&[("b", 1.0)])).is_err());
        let dir = tempfile::tempdir().unwrap();
        assert!(write_run(&dir.path().join("r"), &run, "bad tag").is_err());
    }

    #[test]
    fn interleaved_queries_merge_in_file_order() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("run.trec");
        std::fs::write(&p, "q2 Q0 a 1 3 t\nq1 Q0 b 1 2.5 t\n\nq2 Q0 c 2 1e-3 t\n").unwrap();
        let run = read_run(&p).unwrap();
        assert_eq!(run.queries().collect::<Vec<_>>(), vec!["q2", "q1"]);
        assert_eq!(
            run.get("q2").unwrap(),
            &docs(&[("a", 3.0), ("c", 0.001)])[..]
        );
        assert_eq!(run.num_entries(), 3);
    }

    #[test]
    fn bad_lines_are_reported_with_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("run.trec");
        for (body, line) in [
            ("q Q0 a 1 1.0 t\nq Q0 b 2 1.0\n", 2),
            ("q Q0 a 1 1.0 t\nq Q0 b x 1.0 t\n", 2),
            ("q Q0 a 1 nan t\n", 1),
            ("q Q0 a 1 1.0 t\nr Q0 a 1 1.0 t\nq Q0 a 2 0.5 t\n", 3),
        ] {
            std::fs::write(&p, body).unwrap();
            match read_run(&p) {
                Err(Error::Parse { line: l, .. }) => assert_eq!(l, line, "{body}"),
                other => panic!("{body}: {other:?}"),
            }
        }
    }
}
