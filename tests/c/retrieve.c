/*
 * A C client of librrra (include/rrra.h), built and run by tests/c_api.rs.
 *
 *   retrieve [--batch] MODEL_DIR STORE QUERIES K [ADAPTER]
 *
 * QUERIES holds one query per line, `qid<TAB>text` (or just the text: the qid is then the
 * line number). For each query it prints the top K as `qid<TAB>rank<TAB>docid<TAB>score`
 * lines (rank from 1, score with 9 significant digits, enough to read the float back
 * exactly), reranked by the adapter when one is given; from one rrra_retrieve call per query,
 * or with --batch from one rrra_retrieve_batch call. On the way it checks the error paths,
 * that four threads sharing the retriever give the same lists, and frees everything. Exit
 * status 0 when every check passed; each failed check is a `FAIL:` line on stderr.
 */
#include "rrra.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define THREADS 4

static int failures = 0;

#define CHECK(cond, ...)                                                     \
    do {                                                                     \
        if (!(cond)) {                                                       \
            fprintf(stderr, "FAIL: %s:%d: %s: ", __FILE__, __LINE__, #cond); \
            fprintf(stderr, __VA_ARGS__);                                    \
            fprintf(stderr, " (last error: %s)\n", rrra_last_error());       \
            failures++;                                                      \
        }                                                                    \
    } while (0)

struct query {
    char *qid;
    char *text;
};

/* Reads QUERIES into an array; *n is set to its length. Exits on an unreadable file. */
static struct query *read_queries(const char *path, size_t *n) {
    FILE *f = fopen(path, "r");
    if (!f) {
        perror(path);
        exit(2);
    }
    size_t cap = 16, len = 0;
    struct query *qs = malloc(cap * sizeof *qs);
    char line[8192];
    while (qs && fgets(line, sizeof line, f)) {
        line[strcspn(line, "\r\n")] = '\0';
        if (line[0] == '\0')
            continue;
        if (len == cap) {
            cap *= 2;
            struct query *more = realloc(qs, cap * sizeof *qs);
            if (!more) {
                free(qs);
                qs = NULL;
                break;
            }
            qs = more;
        }
        char *tab = strchr(line, '\t');
        char number[32];
        snprintf(number, sizeof number, "%zu", len + 1);
        if (tab)
            *tab = '\0';
        const char *qid = tab ? line : number;
        const char *text = tab ? tab + 1 : line;
        qs[len].qid = malloc(strlen(qid) + 1);
        qs[len].text = malloc(strlen(text) + 1);
        if (!qs[len].qid || !qs[len].text) {
            fprintf(stderr, "out of memory\n");
            exit(2);
        }
        strcpy(qs[len].qid, qid);
        strcpy(qs[len].text, text);
        len++;
    }
    fclose(f);
    if (!qs) {
        fprintf(stderr, "out of memory\n");
        exit(2);
    }
    *n = len;
    return qs;
}

/* Two lists are the same: same documents in the same order, bit-identical scores. */
static int same_hits(const rrra_hits *a, const rrra_hits *b) {
    if (!a || !b || a->count != b->count)
        return 0;
    for (size_t i = 0; i < a->count; i++) {
        const rrra_hit *x = &a->hits[i], *y = &b->hits[i];
        if (x->row != y->row || x->id_len != y->id_len || strcmp(x->id, y->id) != 0 ||
            memcmp(&x->score, &y->score, sizeof x->score) != 0 ||
            memcmp(&x->rank_score, &y->rank_score, sizeof x->rank_score) != 0)
            return 0;
    }
    return 1;
}

struct worker {
    const rrra_retriever *r;
    const struct query *qs;
    rrra_hits *const *want;
    size_t n, k, start;
    int rerank, mismatches;
};

/* Answers every query (starting at its own offset) and counts lists that differ. */
static void *work(void *arg) {
    struct worker *w = arg;
    for (size_t j = 0; j < w->n; j++) {
        size_t i = (j + w->start) % w->n;
        rrra_hits *got = NULL;
        if (rrra_retrieve(w->r, w->qs[i].text, w->k, w->rerank, &got) != RRRA_OK ||
            !same_hits(got, w->want[i]))
            w->mismatches++;
        rrra_hits_free(got);
    }
    return NULL;
}

/* The error paths: each one a status, a NULL result and a message, never a crash. */
static void check_errors(const char *model, const char *store, rrra_retriever *r, int rerank) {
    char missing[4096];
    snprintf(missing, sizeof missing, "%s.missing", store);
    CHECK(rrra_open(model, missing, NULL, 0) == NULL, "a missing store opened");
    CHECK(rrra_last_status() == RRRA_IO, "status %s", rrra_status_name(rrra_last_status()));
    CHECK(strstr(rrra_last_error(), ".missing") != NULL, "the message names the file");
    CHECK(rrra_open(NULL, store, NULL, 0) == NULL, "a NULL model folder opened");
    CHECK(rrra_last_status() == RRRA_INVALID_ARGUMENT, "status %d", rrra_last_status());

    rrra_hits *hits = (rrra_hits *)&hits; /* not NULL: a failed call must reset it */
    CHECK(rrra_retrieve(r, NULL, 5, 0, &hits) == RRRA_INVALID_ARGUMENT, "NULL query");
    CHECK(hits == NULL, "*out is NULL after a failure");
    CHECK(strlen(rrra_last_error()) > 0, "a message");
    CHECK(rrra_retrieve(NULL, "lift", 5, 0, &hits) == RRRA_INVALID_ARGUMENT, "NULL retriever");
    CHECK(rrra_retrieve(r, "lift", 5, 0, NULL) == RRRA_INVALID_ARGUMENT, "NULL out");
    CHECK(rrra_retrieve(r, "lift \xff\xfe", 5, 0, &hits) == RRRA_INVALID_ARGUMENT, "not UTF-8");
    CHECK(strstr(rrra_last_error(), "UTF-8") != NULL, "the message says why");
    if (!rerank) {
        CHECK(rrra_retrieve(r, "lift", 5, 1, &hits) == RRRA_INVALID_ARGUMENT, "rerank, no adapter");
        CHECK(strstr(rrra_last_error(), "adapter") != NULL, "the message says why");
    }
    CHECK(strcmp(rrra_status_name(RRRA_IO), "RRRA_IO") == 0, "status name");
    CHECK(strcmp(rrra_status_name(42), "RRRA_UNKNOWN") == 0, "unknown status name");

    /* k = 0: an empty list; k beyond the store: every document. */
    CHECK(rrra_retrieve(r, "lift", 0, rerank, &hits) == RRRA_OK, "k = 0");
    CHECK(hits && hits->count == 0 && hits->hits == NULL, "an empty list");
    rrra_hits_free(hits);
    CHECK(rrra_retrieve(r, "lift", (size_t)-1, 0, &hits) == RRRA_OK, "k = SIZE_MAX");
    CHECK(hits && hits->count == rrra_len(r), "every document");
    rrra_hits_free(hits);
    rrra_hits_free(NULL);
    rrra_close(NULL);

    /* The encoder: a buffer too small is refused, a large enough one is filled. */
    size_t dim = rrra_dim(r);
    float *v = calloc(dim + 1, sizeof *v);
    CHECK(v != NULL, "calloc");
    if (v) {
        CHECK(rrra_encode(r, "lift", v, dim - 1) == RRRA_INVALID_ARGUMENT, "small buffer");
        v[dim] = 12345.0f;
        CHECK(rrra_encode(r, "lift", v, dim + 1) == RRRA_OK, "encode");
        double norm = 0;
        for (size_t i = 0; i < dim; i++)
            norm += (double)v[i] * v[i];
        CHECK(norm > 0 && isfinite(norm), "a vector (norm %g)", norm);
        CHECK(v[dim] == 12345.0f, "nothing written past the dimension");
        free(v);
    }
    /* The worker pool has started: its size can no longer change. */
    CHECK(rrra_set_threads(1) == RRRA_INVALID_ARGUMENT, "threads after start");
}

/* Prints a list as `qid rank docid score` lines. */
static void print_hits(const char *qid, const rrra_hits *hits, int rerank) {
    for (size_t j = 0; hits && j < hits->count; j++) {
        const rrra_hit *h = &hits->hits[j];
        CHECK(rerank ? (h->adapter_p >= 0 && h->adapter_p <= 1) : isnan(h->adapter_p),
              "adapter_p %g", h->adapter_p);
        CHECK(strlen(h->id) == h->id_len, "id_len");
        printf("%s\t%zu\t%s\t%.9g\n", qid, j + 1, h->id, h->score);
    }
}

int main(int argc, char **argv) {
    int batch_mode = argc > 1 && strcmp(argv[1], "--batch") == 0;
    argc -= batch_mode;
    argv += batch_mode;
    if (argc != 5 && argc != 6) {
        fprintf(stderr, "usage: retrieve [--batch] MODEL_DIR STORE QUERIES K [ADAPTER]\n");
        return 2;
    }
    const char *model = argv[1], *store = argv[2], *adapter = argc == 6 ? argv[5] : NULL;
    size_t k = strtoul(argv[4], NULL, 10), n = 0;
    int rerank = adapter != NULL;
    struct query *qs = read_queries(argv[3], &n);

    CHECK(rrra_set_threads(2) == RRRA_OK, "set threads");
    CHECK(strlen(rrra_last_error()) == 0, "no failure yet");
    rrra_retriever *r = rrra_open(model, store, adapter, 0);
    if (!r) {
        fprintf(stderr, "rrra_open: %s (%s)\n", rrra_last_error(),
                rrra_status_name(rrra_last_status()));
        return 1;
    }
    CHECK(rrra_has_adapter(r) == rerank, "has_adapter");
    CHECK(rrra_dim(r) > 0 && rrra_len(r) > 0, "dim %zu, len %zu", rrra_dim(r), rrra_len(r));
    CHECK(strlen(rrra_version()) > 0, "version");

    /* One query at a time. */
    rrra_hits **lists = calloc(n ? n : 1, sizeof *lists);
    if (!lists)
        return 2;
    for (size_t i = 0; i < n; i++) {
        int st = rrra_retrieve(r, qs[i].text, k, rerank, &lists[i]);
        CHECK(st == RRRA_OK, "query %s: %s", qs[i].qid, rrra_status_name(st));
        if (!batch_mode)
            print_hits(qs[i].qid, lists[i], rerank);
    }

    /* All queries in one call. A batch goes through the encoder as one padded matrix (other
     * GEMM shapes), so its scores may differ from single calls in the last bits: the Rust
     * side compares it with its own batch call. */
    const char **texts = calloc(n ? n : 1, sizeof *texts);
    rrra_hits **batch = calloc(n ? n : 1, sizeof *batch);
    if (!texts || !batch)
        return 2;
    for (size_t i = 0; i < n; i++)
        texts[i] = qs[i].text;
    CHECK(rrra_retrieve_batch(r, texts, n, k, rerank, batch) == RRRA_OK, "batch");
    for (size_t i = 0; i < n; i++) {
        CHECK(batch[i] && lists[i] && batch[i]->count == lists[i]->count, "batch list %zu", i);
        if (batch_mode)
            print_hits(qs[i].qid, batch[i], rerank);
        rrra_hits_free(batch[i]);
    }
    if (n > 1) {
        texts[1] = NULL;
        batch[0] = (rrra_hits *)texts;
        CHECK(rrra_retrieve_batch(r, texts, n, k, rerank, batch) == RRRA_INVALID_ARGUMENT,
              "a NULL query in a batch");
        CHECK(batch[0] == NULL, "every slot is NULL after a failure");
    }

    /* Four threads share the retriever: the same lists. */
    pthread_t tids[THREADS];
    struct worker ws[THREADS];
    for (int t = 0; t < THREADS; t++) {
        ws[t] = (struct worker){r, qs, lists, n, k, (size_t)t * 7, rerank, 0};
        CHECK(pthread_create(&tids[t], NULL, work, &ws[t]) == 0, "pthread_create");
    }
    for (int t = 0; t < THREADS; t++) {
        pthread_join(tids[t], NULL);
        CHECK(ws[t].mismatches == 0, "thread %d: %d lists differ", t, ws[t].mismatches);
    }

    check_errors(model, store, r, rerank);

    for (size_t i = 0; i < n; i++) {
        rrra_hits_free(lists[i]);
        free(qs[i].qid);
        free(qs[i].text);
    }
    free(lists);
    free(batch);
    free(texts);
    free(qs);
    rrra_close(r);
    if (failures)
        fprintf(stderr, "%d check(s) failed\n", failures);
    return failures ? 1 : 0;
}
