//! Reading and writing the text formats retrieval is evaluated with: BEIR folders ([`beir`]:
//! corpus, queries, qrels) and TREC runs ([`trec`]).
//!
//! Every reader streams its file line by line and reports a bad line as
//! [`Error::Parse`] with the file and the 1-based line number, so a user can open
//! the file at the right place instead of guessing.

pub mod beir;
pub mod synthetic;
pub mod trec;

pub use beir::{
    read_beir_folder, read_corpus, read_qrels, read_queries, BeirData, Document, Qrels, Query,
};
pub use trec::{read_run, write_run, Run};

use crate::error::{Error, Result};
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;

/// Calls `f(line_number, line)` for every non-blank line of `path` (1-based numbers, line ending
/// and a leading UTF-8 byte-order mark removed).
///
/// Lines are read as bytes and validated here, rather than with `BufRead::lines`, so that a
/// non-UTF-8 line is reported with its number instead of as an anonymous I/O error.
pub(crate) fn for_each_line(
    path: &Path,
    mut f: impl FnMut(usize, &str) -> Result<()>,
) -> Result<()> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut buf = Vec::new();
    let mut line_no = 0usize;
    loop {
        buf.clear();
        let n = reader
            .read_until(b'\n', &mut buf)
            .map_err(|e| Error::io(path, e))?;
        if n == 0 {
            return Ok(());
        }
        line_no += 1;
        let mut bytes = buf.as_slice();
        if let Some(rest) = bytes.strip_suffix(b"\n") {
            bytes = rest;
        }
        if let Some(rest) = bytes.strip_suffix(b"\r") {
            bytes = rest;
        }
        if line_no == 1 {
            if let Some(rest) = bytes.strip_prefix(b"\xEF\xBB\xBF") {
                bytes = rest;
            }
        }
        let line = std::str::from_utf8(bytes).map_err(|e| {
            Error::parse(
                path,
                line_no,
                format!(
                    "not valid UTF-8 (bad byte at column {})",
                    e.valid_up_to() + 1
                ),
            )
        })?;
        if line.trim().is_empty() {
            continue;
        }
        f(line_no, line)?;
    }
}

/// An exact set of string ids that stores only a 64-bit hash per id; the ids themselves live in
/// the caller's records and are looked up through a closure on a hash hit.
///
/// Corpora can hold millions of ids; keeping a second copy of every id just to detect duplicates
/// would double their memory. A hash collision between two different ids (astronomically rare)
/// falls back to an owned side table, so the answer is always exact.
#[derive(Default)]
pub(crate) struct UniqueIds {
    by_hash: HashMap<u64, usize>,
    collided: HashMap<String, usize>,
}

impl UniqueIds {
    /// Records `id` under `slot` (an index into the caller's records) and returns `None`, or, if
    /// `id` was recorded before, returns the earlier slot and records nothing. `id_at(slot)` must
    /// return the id recorded under `slot`.
    pub(crate) fn insert<'a>(
        &mut self,
        id: &str,
        slot: usize,
        id_at: impl Fn(usize) -> &'a str,
    ) -> Option<usize> {
        let h = xxhash_rust::xxh3::xxh3_64(id.as_bytes());
        match self.by_hash.get(&h) {
            None => {
                self.by_hash.insert(h, slot);
                None
            }
            Some(&prev) if id_at(prev) == id => Some(prev),
            Some(_) => match self.collided.get(id) {
                Some(&prev) => Some(prev),
                None => {
                    self.collided.insert(id.to_owned(), slot);
                    None
                }
            },
        }
    }
}

/// A field quoted in an error message: its `Debug` form, cut to a short prefix so that a huge
/// field (a 10 MB token on one line) does not become a 10 MB message.
pub(crate) fn quoted(s: &str) -> String {
    const MAX_CHARS: usize = 40;
    match s.char_indices().nth(MAX_CHARS) {
        None => format!("{s:?}"),
        Some((cut, _)) => format!("{:?}... ({} bytes)", &s[..cut], s.len()),
    }
}

/// Formats a `serde_json` error for a single-line document: its own "line 1" is meaningless
/// there, the caller reports the file line, so only the column is kept.
pub(crate) fn json_error_message(e: &serde_json::Error) -> String {
    let s = e.to_string();
    match s.rfind(" at line ") {
        Some(pos) => format!("invalid JSON: {} at column {}", &s[..pos], e.column()),
        None => format!("invalid JSON: {s}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_ids_detects_duplicates_and_keeps_slots() {
        let ids = ["a", "b", "a", "c", "b"];
        let mut set = UniqueIds::default();
        let mut got = Vec::new();
        for (i, id) in ids.iter().enumerate() {
            got.push(set.insert(id, i, |s| ids[s]));
        }
        assert_eq!(got, vec![None, None, Some(0), None, Some(1)]);
    }

    #[test]
    fn unique_ids_exact_under_forced_collision() {
        // Simulate a collision: pretend "x" was stored under the hash of "y".
        let ids = ["x", "y", "y"];
        let mut set = UniqueIds::default();
        set.by_hash.insert(xxhash_rust::xxh3::xxh3_64(b"y"), 0usize);
        assert_eq!(set.insert("y", 1, |s| ids[s]), None);
        assert_eq!(set.insert("y", 2, |s| ids[s]), Some(1));
    }

    #[test]
    fn lines_skip_blanks_and_strip_endings() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.txt");
        std::fs::write(&p, b"\xEF\xBB\xBFa\r\n\n  \nb\nc").unwrap();
        let mut seen = Vec::new();
        for_each_line(&p, |n, l| {
            seen.push((n, l.to_string()));
            Ok(())
        })
        .unwrap();
        assert_eq!(
            seen,
            vec![(1, "a".into()), (4, "b".into()), (5, "c".into())]
        );
    }

    #[test]
    fn non_utf8_line_has_its_number() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.txt");
        std::fs::write(&p, b"ok\nbad \xFF here\n").unwrap();
        let err = for_each_line(&p, |_, _| Ok(())).unwrap_err();
        assert!(matches!(err, Error::Parse { line: 2, .. }), "{err}");
    }
}
