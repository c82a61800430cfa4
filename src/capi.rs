//! The C ABI: [`crate::retriever::Retriever`] for services written in other languages.
//!
//! `include/rrra.h` is generated from this file by `build.rs` (cbindgen); its opening comment
//! states the contract (errors, ownership, threads). Every entry point runs its body under
//! `catch_unwind`, so no panic crosses the boundary; NULL pointers and strings that are not
//! UTF-8 are `RRRA_INVALID_ARGUMENT`, never undefined behaviour.

#![deny(unsafe_op_in_unsafe_fn)]

use crate::error::Error;
use crate::retriever::{Hit, Retriever, RetrieverOptions};
use std::cell::RefCell;
use std::ffi::{c_char, c_int, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;

/// What a call returns: 0 on success, a negative code on failure (then `rrra_last_error()`
/// says why). Functions return it as an `int`.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum rrra_status {
    /// Success.
    RRRA_OK = 0,
    /// A NULL pointer, a string that is not UTF-8, a rerank without an adapter, a buffer too small.
    RRRA_INVALID_ARGUMENT = -1,
    /// The operating system refused an operation on a file (missing, unreadable).
    RRRA_IO = -2,
    /// A text file (JSON config, ...) has a bad line.
    RRRA_PARSE = -3,
    /// A file is not what it claims to be (bad magic, checksum, truncated, missing tensor).
    RRRA_FORMAT = -4,
    /// Two inputs disagree (a store built by another model, an adapter of another dimension).
    RRRA_MISMATCH = -5,
    /// The CUDA driver or a device is not available.
    RRRA_CUDA_UNAVAILABLE = -6,
    /// A CUDA call failed on an available device.
    RRRA_CUDA = -7,
    /// An internal error (a Rust panic, caught at the boundary). Please report it.
    RRRA_PANIC = -8,
}

use rrra_status::*;

/// A model, its embedding store and an optional adapter, opened by `rrra_open`. Opaque.
#[allow(non_camel_case_types)]
pub struct rrra_retriever {
    inner: Retriever,
}

/// One retrieved document.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct rrra_hit {
    /// The document id, NUL-terminated, owned by the `rrra_hits` it belongs to.
    pub id: *const c_char,
    /// Its length in bytes without the terminator (an id may hold NUL bytes).
    pub id_len: usize,
    /// The document's row in the store.
    pub row: usize,
    /// The retriever's similarity of query and document.
    pub score: f32,
    /// The adapter's relevance probability in [0, 1]; NaN when the list was not reranked.
    pub adapter_p: f32,
    /// What the list is ordered by (descending): `score`, or with the rerank
    /// `log(score * adapter_p^lambda)`.
    pub rank_score: f64,
}

/// A ranked list, best first, owned by the caller: free it with `rrra_hits_free`.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug)]
pub struct rrra_hits {
    /// `count` hits; NULL when `count` is 0.
    pub hits: *const rrra_hit,
    /// Number of hits: `min(k, documents in the store)`.
    pub count: usize,
}

/// The allocation behind an `rrra_hits`: the public part first, so the two pointers are one.
#[repr(C)]
struct OwnedHits {
    public: rrra_hits,
    items: Vec<rrra_hit>,
    ids: Vec<u8>,
}

/// A failure on its way to the caller.
struct Failure {
    status: rrra_status,
    msg: String,
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        // Exhaustive on purpose: a new error variant must choose its C status here.
        let status = match &e {
            Error::Io { .. } => RRRA_IO,
            Error::Parse { .. } => RRRA_PARSE,
            Error::Format { .. } | Error::MissingTensor { .. } | Error::TensorShape { .. } => {
                RRRA_FORMAT
            }
            Error::Mismatch { .. } => RRRA_MISMATCH,
            Error::InvalidArgument(_) => RRRA_INVALID_ARGUMENT,
            Error::CudaUnavailable(_) => RRRA_CUDA_UNAVAILABLE,
            Error::Cuda(_) => RRRA_CUDA,
        };
        Failure {
            status,
            msg: e.to_string(),
        }
    }
}

fn invalid(msg: impl Into<String>) -> Failure {
    Failure {
        status: RRRA_INVALID_ARGUMENT,
        msg: format!("invalid argument: {}", msg.into()),
    }
}

thread_local! {
    static LAST_ERROR: RefCell<(c_int, CString)> = RefCell::new((0, CString::default()));
}

fn set_last_error(status: rrra_status, msg: &str) {
    // A message with a NUL byte would be cut short in C; show it escaped instead.
    let c = CString::new(msg.replace('\0', "\\0")).unwrap_or_default();
    // try_with: during thread teardown the slot may be gone; the status still reaches the caller.
    let _ = LAST_ERROR.try_with(|l| *l.borrow_mut() = (status as c_int, c));
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s
    } else {
        "unknown panic"
    }
}

/// Runs an entry point's body: a failure or a panic becomes the last error and `fail`.
fn guard<T>(fail: T, body: impl FnOnce() -> Result<T, Failure>) -> T {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(v)) => v,
        Ok(Err(f)) => {
            set_last_error(f.status, &f.msg);
            fail
        }
        Err(payload) => {
            let msg = format!(
                "internal error (panic): {}",
                panic_message(payload.as_ref())
            );
            set_last_error(RRRA_PANIC, &msg);
            fail
        }
    }
}

/// [`guard`] for the functions that return a status.
fn guard_status(body: impl FnOnce() -> Result<(), Failure>) -> c_int {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => RRRA_OK as c_int,
        Ok(Err(f)) => {
            set_last_error(f.status, &f.msg);
            f.status as c_int
        }
        Err(payload) => {
            let msg = format!(
                "internal error (panic): {}",
                panic_message(payload.as_ref())
            );
            set_last_error(RRRA_PANIC, &msg);
            RRRA_PANIC as c_int
        }
    }
}

/// A NUL-terminated argument as bytes.
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string that outlives the returned slice.
unsafe fn c_bytes<'a>(p: *const c_char, what: &str) -> Result<&'a [u8], Failure> {
    if p.is_null() {
        return Err(invalid(format!("{what} is NULL")));
    }
    // SAFETY: non-NULL (checked above) and NUL-terminated, alive for 'a (the caller's promise).
    Ok(unsafe { CStr::from_ptr(p) }.to_bytes())
}

/// A string argument, which must be UTF-8.
///
/// # Safety
/// As [`c_bytes`].
unsafe fn c_text<'a>(p: *const c_char, what: &str) -> Result<&'a str, Failure> {
    // SAFETY: forwarded from this function's contract.
    let bytes = unsafe { c_bytes(p, what) }?;
    std::str::from_utf8(bytes).map_err(|e| invalid(format!("{what} is not UTF-8 ({e})")))
}

/// A path argument: any bytes on Unix (paths are bytes there), UTF-8 elsewhere.
///
/// # Safety
/// As [`c_bytes`].
unsafe fn c_path(p: *const c_char, what: &str) -> Result<PathBuf, Failure> {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        // SAFETY: forwarded from this function's contract.
        let bytes = unsafe { c_bytes(p, what) }?;
        Ok(PathBuf::from(std::ffi::OsStr::from_bytes(bytes)))
    }
    #[cfg(not(unix))]
    {
        // SAFETY: forwarded from this function's contract.
        Ok(PathBuf::from(unsafe { c_text(p, what) }?))
    }
}

/// The retriever behind a handle.
///
/// # Safety
/// `r` is NULL or a handle from `rrra_open` not yet closed.
unsafe fn handle<'a>(r: *const rrra_retriever) -> Result<&'a Retriever, Failure> {
    // SAFETY: a live handle points to a boxed rrra_retriever (the caller's promise); NULL is
    // turned into an error by as_ref.
    match unsafe { r.as_ref() } {
        Some(r) => Ok(&r.inner),
        None => Err(invalid("the retriever is NULL")),
    }
}

/// Moves a ranked list into one C allocation: the hits, then the ids they point into.
fn into_c_hits(hits: Vec<Hit>) -> *mut rrra_hits {
    let mut ids = Vec::with_capacity(hits.iter().map(|h| h.id.len() + 1).sum());
    let mut offsets = Vec::with_capacity(hits.len());
    for h in &hits {
        offsets.push(ids.len());
        ids.extend_from_slice(h.id.as_bytes());
        ids.push(0);
    }
    // `ids` is not touched again, so pointers into its buffer stay valid after the moves below
    // (moving a Vec does not move its heap buffer).
    let items: Vec<rrra_hit> = hits
        .iter()
        .zip(&offsets)
        .map(|(h, &off)| rrra_hit {
            id: ids[off..].as_ptr().cast(),
            id_len: h.id.len(),
            row: h.row,
            score: h.score,
            adapter_p: h.adapter_p.unwrap_or(f32::NAN),
            rank_score: h.rank_score,
        })
        .collect();
    let public = rrra_hits {
        hits: if items.is_empty() {
            std::ptr::null()
        } else {
            items.as_ptr()
        },
        count: items.len(),
    };
    let owned = Box::new(OwnedHits { public, items, ids });
    // OwnedHits is repr(C) with rrra_hits first: a pointer to it is a pointer to its public part.
    Box::into_raw(owned).cast()
}

/// Opens a retriever: the model folder (`config.json`, `model.safetensors`, `tokenizer.json`),
/// the embedding store built with that model, and optionally an adapter file (or a folder
/// holding `adapter.safetensors`) for the rerank; NULL for none. `rerank_depth` is how many
/// candidates the adapter rescores per query (0: the default, 100; raised to k when smaller).
///
/// Returns NULL on failure; `rrra_last_error()` and `rrra_last_status()` say why. Paths are
/// bytes on Unix (UTF-8 elsewhere).
///
/// # Safety
/// The strings are NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn rrra_open(
    model_dir: *const c_char,
    store_path: *const c_char,
    adapter_path_or_null: *const c_char,
    rerank_depth: usize,
) -> *mut rrra_retriever {
    guard(std::ptr::null_mut(), || {
        // SAFETY: the strings are NULL or NUL-terminated (this function's contract).
        let (model, store) = unsafe {
            (
                c_path(model_dir, "the model folder")?,
                c_path(store_path, "the store path")?,
            )
        };
        let adapter = if adapter_path_or_null.is_null() {
            None
        } else {
            // SAFETY: as above; non-NULL.
            Some(unsafe { c_path(adapter_path_or_null, "the adapter path") }?)
        };
        let defaults = RetrieverOptions::default();
        let opts = RetrieverOptions {
            adapter,
            rerank_depth: if rerank_depth == 0 {
                defaults.rerank_depth
            } else {
                rerank_depth
            },
            ..defaults
        };
        let inner = Retriever::open(&model, &store, &opts)?;
        Ok(Box::into_raw(Box::new(rrra_retriever { inner })))
    })
}

/// Closes a retriever and frees it. NULL is ignored. No other thread may be using it.
///
/// # Safety
/// `r` is NULL or a handle from `rrra_open`, closed once.
#[no_mangle]
pub unsafe extern "C" fn rrra_close(r: *mut rrra_retriever) {
    guard((), || {
        if !r.is_null() {
            // SAFETY: a handle comes from Box::into_raw in rrra_open and is closed once.
            drop(unsafe { Box::from_raw(r) });
        }
        Ok(())
    })
}

/// The top `k` documents for a UTF-8 query, best first; with `rerank` non-zero, reranked by
/// the adapter (`RRRA_INVALID_ARGUMENT` if the retriever has none). `k` = 0 gives an empty
/// list, `k` beyond the store every document. On success `*out` is a new list for the caller
/// to free with `rrra_hits_free`; on failure `*out` is set to NULL.
///
/// # Safety
/// `r` is NULL or an open handle; `query` is NULL or NUL-terminated; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn rrra_retrieve(
    r: *const rrra_retriever,
    query_utf8: *const c_char,
    k: usize,
    rerank: c_int,
    out: *mut *mut rrra_hits,
) -> c_int {
    guard_status(|| {
        if out.is_null() {
            return Err(invalid("out is NULL"));
        }
        // SAFETY: out is non-NULL and writable (this function's contract).
        unsafe { out.write(std::ptr::null_mut()) };
        // SAFETY: r and query_utf8 as this function's contract says.
        let (r, q) = unsafe { (handle(r)?, c_text(query_utf8, "the query")?) };
        let hits = r.retrieve(q, k, rerank != 0)?;
        // SAFETY: as above.
        unsafe { out.write(into_c_hits(hits)) };
        Ok(())
    })
}

/// `rrra_retrieve` for `n` queries at once (encoded in batches, faster than one by one):
/// `out` is an array of `n` slots, each set to the list of the query at the same index (free
/// each with `rrra_hits_free`). On failure every slot is set to NULL. `n` = 0 does nothing.
///
/// # Safety
/// `r` is NULL or an open handle; `queries` is NULL or `n` pointers, each NULL or
/// NUL-terminated; `out` is NULL or `n` writable slots.
#[no_mangle]
pub unsafe extern "C" fn rrra_retrieve_batch(
    r: *const rrra_retriever,
    queries_utf8: *const *const c_char,
    n: usize,
    k: usize,
    rerank: c_int,
    out: *mut *mut rrra_hits,
) -> c_int {
    guard_status(|| {
        if n == 0 {
            return Ok(());
        }
        if out.is_null() {
            return Err(invalid("out is NULL"));
        }
        // SAFETY: out is non-NULL with n writable slots (this function's contract).
        let out = unsafe { std::slice::from_raw_parts_mut(out, n) };
        out.fill(std::ptr::null_mut());
        if queries_utf8.is_null() {
            return Err(invalid("the query array is NULL"));
        }
        // SAFETY: queries_utf8 is non-NULL with n readable pointers (this function's contract).
        let ptrs = unsafe { std::slice::from_raw_parts(queries_utf8, n) };
        let texts = ptrs
            .iter()
            .enumerate()
            // SAFETY: each pointer is NULL or NUL-terminated (this function's contract).
            .map(|(i, &p)| unsafe { c_text(p, &format!("query {i}")) })
            .collect::<Result<Vec<&str>, _>>()?;
        // SAFETY: r as this function's contract says.
        let r = unsafe { handle(r) }?;
        let lists = r.retrieve_batch(&texts, k, rerank != 0)?;
        for (slot, hits) in out.iter_mut().zip(lists) {
            *slot = into_c_hits(hits);
        }
        Ok(())
    })
}

/// Frees a list from `rrra_retrieve`. NULL is ignored.
///
/// # Safety
/// `hits` is NULL or a list from this library, freed once.
#[no_mangle]
pub unsafe extern "C" fn rrra_hits_free(hits: *mut rrra_hits) {
    guard((), || {
        if !hits.is_null() {
            // SAFETY: every list is an OwnedHits from Box::into_raw in into_c_hits, freed once.
            drop(unsafe { Box::from_raw(hits.cast::<OwnedHits>()) });
        }
        Ok(())
    })
}

/// Encodes a UTF-8 text as the store's documents were encoded, writing `rrra_dim(r)` floats
/// to `out`; `out_len` is the capacity of `out` in floats (`RRRA_INVALID_ARGUMENT` when it is
/// smaller than the dimension).
///
/// # Safety
/// `r` is NULL or an open handle; `text_utf8` is NULL or NUL-terminated; `out` is NULL or
/// `out_len` writable floats.
#[no_mangle]
pub unsafe extern "C" fn rrra_encode(
    r: *const rrra_retriever,
    text_utf8: *const c_char,
    out: *mut f32,
    out_len: usize,
) -> c_int {
    guard_status(|| {
        // SAFETY: r and text_utf8 as this function's contract says.
        let (r, text) = unsafe { (handle(r)?, c_text(text_utf8, "the text")?) };
        if out.is_null() {
            return Err(invalid("out is NULL"));
        }
        if out_len < r.dim() {
            return Err(invalid(format!(
                "out holds {out_len} floats, the dimension is {}",
                r.dim()
            )));
        }
        let v = r.encode(&[text])?;
        // SAFETY: out is non-NULL with out_len >= dim = v.len() writable floats (checked above
        // and this function's contract); a Rust Vec never overlaps the caller's buffer.
        unsafe { std::ptr::copy_nonoverlapping(v.as_ptr(), out, v.len().min(out_len)) };
        Ok(())
    })
}

/// The embedding dimension; 0 for a NULL handle.
///
/// # Safety
/// `r` is NULL or an open handle.
#[no_mangle]
pub unsafe extern "C" fn rrra_dim(r: *const rrra_retriever) -> usize {
    // SAFETY: r as this function's contract says.
    guard(0, || Ok(unsafe { handle(r) }?.dim()))
}

/// The number of documents in the store; 0 for a NULL handle.
///
/// # Safety
/// `r` is NULL or an open handle.
#[no_mangle]
pub unsafe extern "C" fn rrra_len(r: *const rrra_retriever) -> usize {
    // SAFETY: r as this function's contract says.
    guard(0, || Ok(unsafe { handle(r) }?.len()))
}

/// 1 when an adapter is loaded (the rerank is available), else 0 (also for a NULL handle).
///
/// # Safety
/// `r` is NULL or an open handle.
#[no_mangle]
pub unsafe extern "C" fn rrra_has_adapter(r: *const rrra_retriever) -> c_int {
    // SAFETY: r as this function's contract says.
    guard(0, || Ok(unsafe { handle(r) }?.has_adapter() as c_int))
}

/// Sets the number of worker threads for encoding and search (0: the default, all cores or
/// `RAYON_NUM_THREADS`). Call it first, before `rrra_open`: once the pool has started it fails
/// with `RRRA_INVALID_ARGUMENT`.
#[no_mangle]
pub extern "C" fn rrra_set_threads(n: usize) -> c_int {
    guard_status(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .map_err(|e| invalid(format!("cannot set the thread count: {e}")))
    })
}

/// The message of the last failure on the calling thread, or "" if none failed yet. The
/// string belongs to the library and stays valid until the next failing call on this thread.
#[no_mangle]
pub extern "C" fn rrra_last_error() -> *const c_char {
    guard(c"".as_ptr(), || {
        Ok(LAST_ERROR
            .try_with(|l| l.borrow().1.as_ptr())
            .unwrap_or(c"".as_ptr()))
    })
}

/// The status of the last failure on the calling thread (`RRRA_OK` if none failed yet).
#[no_mangle]
pub extern "C" fn rrra_last_status() -> c_int {
    guard(RRRA_PANIC as c_int, || {
        Ok(LAST_ERROR.try_with(|l| l.borrow().0).unwrap_or(0))
    })
}

/// A status's name ("RRRA_IO", ...), a static string; "RRRA_UNKNOWN" for other values.
#[no_mangle]
pub extern "C" fn rrra_status_name(status: c_int) -> *const c_char {
    // No guard: a match on an integer cannot panic.
    let name = match status {
        0 => c"RRRA_OK",
        -1 => c"RRRA_INVALID_ARGUMENT",
        -2 => c"RRRA_IO",
        -3 => c"RRRA_PARSE",
        -4 => c"RRRA_FORMAT",
        -5 => c"RRRA_MISMATCH",
        -6 => c"RRRA_CUDA_UNAVAILABLE",
        -7 => c"RRRA_CUDA",
        -8 => c"RRRA_PANIC",
        _ => c"RRRA_UNKNOWN",
    };
    name.as_ptr()
}

/// The library version ("0.1.0"), a static string.
#[no_mangle]
pub extern "C" fn rrra_version() -> *const c_char {
    // No guard: a static string.
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}
