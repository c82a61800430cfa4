//! The C ABI (`src/capi.rs`, `include/rrra.h`): a C program (`tests/c/retrieve.c`) built with
//! the system C compiler against librrra finds the same top-k as the Rust API, with and
//! without the adapter's rerank; and the entry points, called directly, give every field of
//! `Retriever::retrieve` and typed statuses for bad inputs. The tiny random BERT of the
//! fixtures over the Cranfield documents, as in tests/retriever.rs.

mod common;

use rrra::capi::*;
use rrra::data::beir::read_queries;
use rrra::retriever::{Hit, Retriever, RetrieverOptions};
use std::ffi::{c_char, c_int, CStr, CString};
use std::path::{Path, PathBuf};
use std::process::Command;

struct Setup {
    dir: tempfile::TempDir,
    model: PathBuf,
    store: PathBuf,
    adapter: PathBuf,
    /// (id, text) with whitespace runs folded to one space, so a query is one line.
    queries: Vec<(String, String)>,
}

/// A store of the Cranfield documents encoded by tiny-bert, and a random adapter (W2 non-zero,
/// so the rerank moves documents).
fn setup() -> Setup {
    let common::TinyCranfield {
        dir,
        model,
        store,
        adapter,
    } = common::tiny_cranfield();
    let data = common::shared().join("data/cranfield");
    let queries = read_queries(&data.join("queries.jsonl"))
        .unwrap()
        .into_iter()
        .take(40)
        .map(|q| {
            (
                q.id,
                q.text.split_whitespace().collect::<Vec<_>>().join(" "),
            )
        })
        .collect();
    Setup {
        dir,
        model,
        store,
        adapter,
        queries,
    }
}

fn retriever(s: &Setup, adapter: bool) -> Retriever {
    let opts = RetrieverOptions {
        adapter: adapter.then(|| s.adapter.clone()),
        ..Default::default()
    };
    Retriever::open(&s.model, &s.store, &opts).unwrap()
}

/// The C compiler: `$CC`, else `cc`; `None` when it does not run.
fn c_compiler() -> Option<String> {
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let runs = Command::new(&cc)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    runs.then_some(cc)
}

/// The folder holding the librrra.so of this build: the `deps` folder this test runs from
/// (cargo builds the cdylib with the rlib the test links).
fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    let lib = if cfg!(target_os = "macos") {
        "librrra.dylib"
    } else {
        "librrra.so"
    };
    // deps/ first: `cargo test` builds the cdylib there and copies it up only on `cargo build`,
    // so the one in target/<profile> may be older than this test.
    let found = [deps, deps.parent().unwrap()]
        .into_iter()
        .find(|d| d.join(lib).is_file())
        .unwrap_or_else(|| panic!("{lib} not found next to {}", exe.display()))
        .to_path_buf();
    found
}

/// Compiles tests/c/retrieve.c (strict C99, warnings are errors) against include/rrra.h.
fn build_c_program(cc: &str, out: &Path) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let lib = lib_dir();
    let output = Command::new(cc)
        .args(["-std=c99", "-D_POSIX_C_SOURCE=200809L", "-O1", "-g"])
        .args(["-Wall", "-Wextra", "-Werror", "-pedantic"])
        .arg("-I")
        .arg(root.join("include"))
        .arg(root.join("tests/c/retrieve.c"))
        .arg("-o")
        .arg(out)
        .arg(format!("-L{}", lib.display()))
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .args(["-lrrra", "-pthread", "-lm"])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{cc} failed on tests/c/retrieve.c:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The header is also valid C++ (its `extern "C"` guard), where a C++ compiler is found.
fn header_compiles_as_cpp() {
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let header = Path::new(env!("CARGO_MANIFEST_DIR")).join("include/rrra.h");
    match Command::new(&cxx)
        .args([
            "-std=c++11",
            "-fsyntax-only",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-x",
            "c++",
        ])
        .arg(&header)
        .output()
    {
        Ok(out) => assert!(
            out.status.success(),
            "{cxx} rejects include/rrra.h:\n{}",
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => eprintln!("C++ check skipped: cannot run {cxx}: {e}"),
    }
}

/// Runs the C program; its `qid rank docid score` lines as (qid, docid, score) per line.
fn run_c_program(
    exe: &Path,
    s: &Setup,
    k: usize,
    adapter: bool,
    batch: bool,
) -> Vec<(String, String, f32)> {
    let queries = s.dir.path().join("queries.tsv");
    let text: String = s
        .queries
        .iter()
        .map(|(id, t)| format!("{id}\t{t}\n"))
        .collect();
    std::fs::write(&queries, text).unwrap();
    let mut cmd = Command::new(exe);
    // cargo puts target/<profile> on the loader path, whose librrra.so may be older than
    // this build's (see lib_dir): put this build's first.
    let mut path = std::ffi::OsString::from(lib_dir());
    if let Some(old) = std::env::var_os("LD_LIBRARY_PATH") {
        path.push(":");
        path.push(old);
    }
    cmd.env("LD_LIBRARY_PATH", path);
    if batch {
        cmd.arg("--batch");
    }
    cmd.arg(&s.model)
        .arg(&s.store)
        .arg(&queries)
        .arg(k.to_string());
    if adapter {
        cmd.arg(&s.adapter);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "the C program failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let mut rows = Vec::new();
    let mut last = (String::new(), 0usize);
    for line in stdout.lines() {
        let f: Vec<&str> = line.split('\t').collect();
        assert_eq!(f.len(), 4, "bad line {line:?}");
        let rank: usize = f[1].parse().unwrap();
        // ranks count from 1 within each query
        let want = if f[0] == last.0 { last.1 + 1 } else { 1 };
        assert_eq!(rank, want, "line {line:?}");
        last = (f[0].to_string(), rank);
        rows.push((f[0].to_string(), f[2].to_string(), f[3].parse().unwrap()));
    }
    rows
}

#[test]
fn the_c_program_finds_the_same_top_k_as_rust() {
    let Some(cc) = c_compiler() else {
        eprintln!("skipped: no C compiler (set CC or install cc)");
        return;
    };
    let s = setup();
    let exe = s.dir.path().join("retrieve");
    build_c_program(&cc, &exe);
    header_compiles_as_cpp();
    let k = 10;
    let texts: Vec<&str> = s.queries.iter().map(|(_, t)| t.as_str()).collect();
    for adapter in [false, true] {
        let r = retriever(&s, adapter);
        let singles: Vec<Vec<Hit>> = texts
            .iter()
            .map(|t| r.retrieve(t, k, adapter).unwrap())
            .collect();
        let batch = r.retrieve_batch(&texts, k, adapter).unwrap();
        for (lists, batch_mode) in [(singles, false), (batch, true)] {
            let want: Vec<(String, String, f32)> = s
                .queries
                .iter()
                .zip(lists)
                .flat_map(|((qid, _), hits)| hits.into_iter().map(|h| (qid.clone(), h.id, h.score)))
                .collect();
            assert_eq!(want.len(), s.queries.len() * k);
            let got = run_c_program(&exe, &s, k, adapter, batch_mode);
            // Same documents in the same order; %.9g reads back to the same float.
            assert_eq!(got, want, "adapter: {adapter}, batch: {batch_mode}");
        }
    }
}

fn cstr(s: &str) -> CString {
    CString::new(s).unwrap()
}

fn cpath(p: &Path) -> CString {
    cstr(p.to_str().unwrap())
}

fn last_error() -> String {
    // SAFETY: rrra_last_error returns a NUL-terminated string valid until the next failure.
    unsafe { CStr::from_ptr(rrra_last_error()) }
        .to_str()
        .unwrap()
        .to_string()
}

/// rrra_retrieve as Rust values: the status, and the hits (freed here) on success.
fn c_retrieve(
    r: *const rrra_retriever,
    q: *const c_char,
    k: usize,
    rerank: bool,
) -> (c_int, Vec<Hit>) {
    let mut out: *mut rrra_hits = std::ptr::null_mut();
    // SAFETY: r is an open handle or NULL, q NULL or NUL-terminated, out writable.
    let st = unsafe { rrra_retrieve(r, q, k, rerank as c_int, &mut out) };
    if st != rrra_status::RRRA_OK as c_int {
        assert!(out.is_null());
        return (st, Vec::new());
    }
    (st, take_hits(out))
}

/// Copies a C list into Hits and frees it.
fn take_hits(out: *mut rrra_hits) -> Vec<Hit> {
    // SAFETY: out is a list from rrra_retrieve, read before it is freed below.
    let list = unsafe { &*out };
    let items: &[rrra_hit] = if list.count == 0 {
        assert!(list.hits.is_null());
        &[]
    } else {
        // SAFETY: hits holds count entries while the list lives.
        unsafe { std::slice::from_raw_parts(list.hits, list.count) }
    };
    let hits = items
        .iter()
        .map(|h| {
            // SAFETY: id is NUL-terminated with id_len bytes before the terminator.
            let id = unsafe { CStr::from_ptr(h.id) }
                .to_str()
                .unwrap()
                .to_string();
            assert_eq!(id.len(), h.id_len);
            Hit {
                id,
                row: h.row,
                score: h.score,
                adapter_p: (!h.adapter_p.is_nan()).then_some(h.adapter_p),
                rank_score: h.rank_score,
            }
        })
        .collect();
    // SAFETY: out is a list from rrra_retrieve, freed once.
    unsafe { rrra_hits_free(out) };
    hits
}

#[test]
fn the_entry_points_match_the_rust_api_and_fail_with_statuses() {
    use rrra_status::*;
    let s = setup();
    let (model, store, adapter) = (cpath(&s.model), cpath(&s.store), cpath(&s.adapter));
    // SAFETY: NUL-terminated strings.
    let c = unsafe { rrra_open(model.as_ptr(), store.as_ptr(), adapter.as_ptr(), 0) };
    assert!(!c.is_null(), "{}", last_error());
    let r = retriever(&s, true);
    // SAFETY: c is an open handle.
    unsafe {
        assert_eq!(rrra_dim(c), r.dim());
        assert_eq!(rrra_len(c), r.len());
        assert_eq!(rrra_has_adapter(c), 1);
    }

    // Every field, bit for bit, with and without the rerank, single and batch calls.
    let texts: Vec<CString> = s.queries.iter().map(|(_, t)| cstr(t)).collect();
    let strs: Vec<&str> = s.queries.iter().map(|(_, t)| t.as_str()).collect();
    for rerank in [false, true] {
        for (t, text) in texts.iter().zip(&strs) {
            let (st, got) = c_retrieve(c, t.as_ptr(), 7, rerank);
            assert_eq!(st, RRRA_OK as c_int, "{}", last_error());
            assert_eq!(got, r.retrieve(text, 7, rerank).unwrap(), "{text}");
            assert!(got.iter().all(|h| h.adapter_p.is_some() == rerank));
        }
        let ptrs: Vec<*const c_char> = texts.iter().map(|t| t.as_ptr()).collect();
        let mut outs = vec![std::ptr::null_mut(); ptrs.len()];
        // SAFETY: ptrs and outs hold ptrs.len() entries.
        let st = unsafe {
            rrra_retrieve_batch(
                c,
                ptrs.as_ptr(),
                ptrs.len(),
                7,
                rerank as c_int,
                outs.as_mut_ptr(),
            )
        };
        assert_eq!(st, RRRA_OK as c_int, "{}", last_error());
        let batch: Vec<Vec<Hit>> = outs.into_iter().map(take_hits).collect();
        assert_eq!(batch, r.retrieve_batch(&strs, 7, rerank).unwrap());
    }

    // The encoder equals the Rust one.
    let mut v = vec![f32::NAN; r.dim()];
    // SAFETY: v holds v.len() floats.
    let st = unsafe { rrra_encode(c, texts[0].as_ptr(), v.as_mut_ptr(), v.len()) };
    assert_eq!(st, RRRA_OK as c_int);
    assert_eq!(v, r.encode(&[&s.queries[0].1]).unwrap());
    // SAFETY: as above, with a length one short.
    let st = unsafe { rrra_encode(c, texts[0].as_ptr(), v.as_mut_ptr(), v.len() - 1) };
    assert_eq!(st, RRRA_INVALID_ARGUMENT as c_int);

    // Bad inputs: statuses and messages, never a crash.
    let bad = [0x6cu8, 0xff, 0];
    let (st, _) = c_retrieve(c, bad.as_ptr().cast(), 5, false);
    assert_eq!(st, RRRA_INVALID_ARGUMENT as c_int);
    assert!(last_error().contains("not UTF-8"), "{}", last_error());
    assert_eq!(rrra_last_status(), st);
    let (st, _) = c_retrieve(c, std::ptr::null(), 5, false);
    assert_eq!(st, RRRA_INVALID_ARGUMENT as c_int);
    assert!(last_error().contains("query is NULL"), "{}", last_error());
    let (st, _) = c_retrieve(std::ptr::null(), texts[0].as_ptr(), 5, false);
    assert_eq!(st, RRRA_INVALID_ARGUMENT as c_int);
    // SAFETY: NULL handles are allowed.
    unsafe { assert_eq!(rrra_dim(std::ptr::null()), 0) };

    let open_fails = |m: &Path, st: &Path, a: Option<&Path>| {
        let (m, st, a) = (cpath(m), cpath(st), a.map(cpath));
        let a = a.as_ref().map_or(std::ptr::null(), |a| a.as_ptr());
        // SAFETY: NUL-terminated strings or NULL.
        let h = unsafe { rrra_open(m.as_ptr(), st.as_ptr(), a, 0) };
        assert!(h.is_null());
        (rrra_last_status(), last_error())
    };
    let missing = s.dir.path().join("missing.store");
    let (st, msg) = open_fails(&s.model, &missing, None);
    assert_eq!(st, RRRA_IO as c_int);
    assert!(msg.contains("missing.store"), "{msg}");
    let junk = s.dir.path().join("junk.store");
    std::fs::write(&junk, b"not a store").unwrap();
    let (st, msg) = open_fails(&s.model, &junk, None);
    assert_eq!(st, RRRA_FORMAT as c_int, "{msg}");
    let (st, msg) = open_fails(&s.model, &s.store, Some(&missing));
    assert!(st < 0 && msg.contains("missing.store"), "{st}: {msg}");
    // SAFETY: NUL-terminated strings and a NULL.
    let h = unsafe { rrra_open(std::ptr::null(), store.as_ptr(), std::ptr::null(), 0) };
    assert!(h.is_null());
    assert_eq!(rrra_last_status(), RRRA_INVALID_ARGUMENT as c_int);

    // The last error belongs to the thread that failed.
    let before = last_error();
    std::thread::spawn(|| {
        assert_eq!(last_error(), "");
        assert_eq!(rrra_last_status(), 0);
        let (st, _) = c_retrieve(std::ptr::null(), std::ptr::null(), 1, false);
        assert_eq!(st, RRRA_INVALID_ARGUMENT as c_int);
    })
    .join()
    .unwrap();
    assert_eq!(last_error(), before);

    // SAFETY: a static string.
    let name = unsafe { CStr::from_ptr(rrra_status_name(RRRA_MISMATCH as c_int)) };
    assert_eq!(name.to_str().unwrap(), "RRRA_MISMATCH");
    // SAFETY: a static string.
    let version = unsafe { CStr::from_ptr(rrra_version()) };
    assert_eq!(version.to_str().unwrap(), env!("CARGO_PKG_VERSION"));
    // SAFETY: c is open and closed once; NULL is ignored.
    unsafe {
        rrra_close(c);
        rrra_close(std::ptr::null_mut());
    }
}
