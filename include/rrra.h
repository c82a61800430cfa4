/*
 * rrra.h: the C interface of rrra, a dense-retrieval engine.
 *
 * A retriever (model folder + embedding store + optional RRRA adapter) is opened once with
 * rrra_open and queried with rrra_retrieve; each call returns a ranked list the caller frees
 * with rrra_hits_free. rrra_close frees the retriever.
 *
 * Errors. Functions that can fail return an int status: RRRA_OK (0) or a negative
 * rrra_status; rrra_open returns NULL instead. Either way rrra_last_error() then gives a
 * one-line message (naming the file at fault, where there is one) and rrra_last_status() the
 * status, both for the calling thread. The message stays valid until the next failing call
 * on that thread. NULL pointers and strings that are not UTF-8 are RRRA_INVALID_ARGUMENT,
 * never undefined behaviour; an internal error is RRRA_PANIC, never a crash. No function
 * prints or exits the process.
 *
 * Threads. One rrra_retriever may be used by any number of threads at once (every call but
 * rrra_close only reads it); rrra_close must come after every other call on it has returned.
 * Lists (rrra_hits) belong to the caller, are independent of the retriever and of each other,
 * and may be read and freed on any thread. Work is spread over a pool of worker threads
 * (all cores; rrra_set_threads or RAYON_NUM_THREADS to change).
 *
 * Strings are NUL-terminated; queries are UTF-8; paths are bytes on Unix. Sizes are size_t.
 *
 * Linking: -lrrra (librrra.so, built by `cargo build --release` in target/release).
 */


#ifndef RRRA_H
#define RRRA_H

/* Generated from src/capi.rs by build.rs (cbindgen): edit those, not this file. */

#include <stddef.h>

/**
 * What a call returns: 0 on success, a negative code on failure (then `rrra_last_error()`
 * says why). Functions return it as an `int`.
 */
typedef enum rrra_status {
  /**
   * Success.
   */
  RRRA_OK = 0,
  /**
   * A NULL pointer, a string that is not UTF-8, a rerank without an adapter, a buffer too small.
   */
  RRRA_INVALID_ARGUMENT = -1,
  /**
   * The operating system refused an operation on a file (missing, unreadable).
   */
  RRRA_IO = -2,
  /**
   * A text file (JSON config, ...) has a bad line.
   */
  RRRA_PARSE = -3,
  /**
   * A file is not what it claims to be (bad magic, checksum, truncated, missing tensor).
   */
  RRRA_FORMAT = -4,
  /**
   * Two inputs disagree (a store built by another model, an adapter of another dimension).
   */
  RRRA_MISMATCH = -5,
  /**
   * The CUDA driver or a device is not available.
   */
  RRRA_CUDA_UNAVAILABLE = -6,
  /**
   * A CUDA call failed on an available device.
   */
  RRRA_CUDA = -7,
  /**
   * An internal error (a Rust panic, caught at the boundary). Please report it.
   */
  RRRA_PANIC = -8,
} rrra_status;

/**
 * A model, its embedding store and an optional adapter, opened by `rrra_open`. Opaque.
 */
typedef struct rrra_retriever rrra_retriever;

/**
 * One retrieved document.
 */
typedef struct rrra_hit {
  /**
   * The document id, NUL-terminated, owned by the `rrra_hits` it belongs to.
   */
  const char *id;
  /**
   * Its length in bytes without the terminator (an id may hold NUL bytes).
   */
  size_t id_len;
  /**
   * The document's row in the store.
   */
  size_t row;
  /**
   * The retriever's similarity of query and document.
   */
  float score;
  /**
   * The adapter's relevance probability in [0, 1]; NaN when the list was not reranked.
   */
  float adapter_p;
  /**
   * What the list is ordered by (descending): `score`, or with the rerank
   * `log(score * adapter_p^lambda)`.
   */
  double rank_score;
} rrra_hit;

/**
 * A ranked list, best first, owned by the caller: free it with `rrra_hits_free`.
 */
typedef struct rrra_hits {
  /**
   * `count` hits; NULL when `count` is 0.
   */
  const struct rrra_hit *hits;
  /**
   * Number of hits: `min(k, documents in the store)`.
   */
  size_t count;
} rrra_hits;

#ifdef __cplusplus
extern "C" {
#endif // __cplusplus

/**
 * Opens a retriever: the model folder (`config.json`, `model.safetensors`, `tokenizer.json`),
 * the embedding store built with that model, and optionally an adapter file (or a folder
 * holding `adapter.safetensors`) for the rerank; NULL for none. `rerank_depth` is how many
 * candidates the adapter rescores per query (0: the default, 100; raised to k when smaller).
 *
 * Returns NULL on failure; `rrra_last_error()` and `rrra_last_status()` say why. Paths are
 * bytes on Unix (UTF-8 elsewhere).
 *
 * # Safety
 * The strings are NULL or NUL-terminated.
 */
struct rrra_retriever *rrra_open(const char *model_dir, const char *store_path, const char *adapter_path_or_null, size_t rerank_depth);

/**
 * Closes a retriever and frees it. NULL is ignored. No other thread may be using it.
 *
 * # Safety
 * `r` is NULL or a handle from `rrra_open`, closed once.
 */
void rrra_close(struct rrra_retriever *r);

/**
 * The top `k` documents for a UTF-8 query, best first; with `rerank` non-zero, reranked by
 * the adapter (`RRRA_INVALID_ARGUMENT` if the retriever has none). `k` = 0 gives an empty
 * list, `k` beyond the store every document. On success `*out` is a new list for the caller
 * to free with `rrra_hits_free`; on failure `*out` is set to NULL.
 *
 * # Safety
 * `r` is NULL or an open handle; `query` is NULL or NUL-terminated; `out` is NULL or writable.
 */
int rrra_retrieve(const struct rrra_retriever *r, const char *query_utf8, size_t k, int rerank, struct rrra_hits **out);

/**
 * `rrra_retrieve` for `n` queries at once (encoded in batches, faster than one by one):
 * `out` is an array of `n` slots, each set to the list of the query at the same index (free
 * each with `rrra_hits_free`). On failure every slot is set to NULL. `n` = 0 does nothing.
 *
 * # Safety
 * `r` is NULL or an open handle; `queries` is NULL or `n` pointers, each NULL or
 * NUL-terminated; `out` is NULL or `n` writable slots.
 */
int rrra_retrieve_batch(const struct rrra_retriever *r, const char *const *queries_utf8, size_t n, size_t k, int rerank, struct rrra_hits **out);

/**
 * Frees a list from `rrra_retrieve`. NULL is ignored.
 *
 * # Safety
 * `hits` is NULL or a list from this library, freed once.
 */
void rrra_hits_free(struct rrra_hits *hits);

/**
 * Encodes a UTF-8 text as the store's documents were encoded, writing `rrra_dim(r)` floats
 * to `out`; `out_len` is the capacity of `out` in floats (`RRRA_INVALID_ARGUMENT` when it is
 * smaller than the dimension).
 *
 * # Safety
 * `r` is NULL or an open handle; `text_utf8` is NULL or NUL-terminated; `out` is NULL or
 * `out_len` writable floats.
 */
int rrra_encode(const struct rrra_retriever *r, const char *text_utf8, float *out, size_t out_len);

/**
 * The embedding dimension; 0 for a NULL handle.
 *
 * # Safety
 * `r` is NULL or an open handle.
 */
size_t rrra_dim(const struct rrra_retriever *r);

/**
 * The number of documents in the store; 0 for a NULL handle.
 *
 * # Safety
 * `r` is NULL or an open handle.
 */
size_t rrra_len(const struct rrra_retriever *r);

/**
 * 1 when an adapter is loaded (the rerank is available), else 0 (also for a NULL handle).
 *
 * # Safety
 * `r` is NULL or an open handle.
 */
int rrra_has_adapter(const struct rrra_retriever *r);

/**
 * Sets the number of worker threads for encoding and search (0: the default, all cores or
 * `RAYON_NUM_THREADS`). Call it first, before `rrra_open`: once the pool has started it fails
 * with `RRRA_INVALID_ARGUMENT`.
 */
int rrra_set_threads(size_t n);

/**
 * The message of the last failure on the calling thread, or "" if none failed yet. The
 * string belongs to the library and stays valid until the next failing call on this thread.
 */
const char *rrra_last_error(void);

/**
 * The status of the last failure on the calling thread (`RRRA_OK` if none failed yet).
 */
int rrra_last_status(void);

/**
 * A status's name ("RRRA_IO", ...), a static string; "RRRA_UNKNOWN" for other values.
 */
const char *rrra_status_name(int status);

/**
 * The library version ("0.1.0"), a static string.
 */
const char *rrra_version(void);

#ifdef __cplusplus
}  // extern "C"
#endif  // __cplusplus

#endif  /* RRRA_H */
