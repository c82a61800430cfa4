// Emulates kernels/topk.cu as src/device/topk.rs drives it (GpuSearcher::search and
// search_streamed: chunk sizes, thresholds, ping-pong candidate lists, query preparation, select,
// sort, decode) against an exact CPU top-k in the CPU search's order (score descending, NaN last,
// index ascending; -0.0 reported as 0.0): topk
#include <cstdio>
#include <cstdlib>
#include <random>
#include <set>
#include <string>
#include <vector>
#include "emu.h"

// cp.async has no host form: a synchronous 16-byte copy that zero-fills past src_bytes, so the
// commit and wait have nothing left to do. Both addresses must be 16-byte aligned, as on the GPU.
static inline void cp_async16(void* smem, const void* gmem, unsigned src_bytes) {
    if ((reinterpret_cast<uintptr_t>(smem) | reinterpret_cast<uintptr_t>(gmem)) & 15) __trap();
    std::memset(smem, 0, 16);
    if (src_bytes) std::memcpy(smem, gmem, std::min(src_bytes, 16u));
}
static inline void cp_async_commit() {}
template <int N> static inline void cp_async_wait() {}
// Fast math of the synthetic-corpus kernels (compiled with the module, not checked here).
#define __logf(x) std::log((float)(x))
#define __cosf(x) std::cos((float)(x))
#define rsqrtf(x) (1.0f / std::sqrt((float)(x)))
#include "topk.cu"

static int fails = 0, cases = 0;
#define CHECK(c, ...) do { if (!(c)) { if (++fails < 40) { printf("FAIL "); printf(__VA_ARGS__); printf("\n"); } } } while (0)
static std::mt19937_64 rng(7);
static std::set<std::string> launched;  // kernels and select paths exercised

// ---------------------------------------------------------------------------------------------
// src/device/topk.rs, transliterated (constants, chunking, paths, launches, decode)

enum Dtype { F32 = 0, F16 = 1, BF16 = 2 };
static const char* dtype_name[] = {"f32", "f16", "bf16"};
static size_t esize(int dt) { return dt == F32 ? 4 : 2; }
constexpr size_t MAX_K = 10000, FIRST_ROWS = 16384, SIMT_MAX_QUERIES_F32 = 24, SIMT_MAX_QUERIES_16BIT = 8;
constexpr size_t SIMT_STATIC_SMEM = 1024, RS_TC_BM = 256, RS_TC_BN = 32, RS_TC_BK = 32, RS_TC_SMEM = 84480;
constexpr size_t RS_G_BM = 128, RS_G_BN = 64, RS_G_BK = 16, SEL_SMEM = 12288 * 8;
static_assert(RS_TC_BM == TC_BM && RS_TC_BN == TC_BN && RS_TC_BK == TC_BK && RS_TC_SMEM == TC_SMEM_BYTES);
static_assert(RS_G_BM == G_BM && RS_G_BN == G_BN && RS_G_BK == G_BK && SEL_SMEM == SEL_CAP * 8);
static size_t round_up(size_t x, size_t m) { return (x + m - 1) / m * m; }
static size_t div_ceil(size_t x, size_t m) { return (x + m - 1) / m; }
static size_t next_pow2(size_t x) { size_t p = 1; while (p < x) p <<= 1; return p; }

static size_t chunk_len(size_t seen, size_t remaining, size_t k, size_t cap) {
    const size_t want = seen == 0 ? std::max(4 * k, FIRST_ROWS) : 3 * seen;
    return std::max<size_t>(std::min({want, cap, remaining}), 1);
}
enum Path { SIMT, TC, GEMM };
static Path path_for(int dt, size_t nq) {
    if (dt == F32) return nq <= SIMT_MAX_QUERIES_F32 ? SIMT : GEMM;
    return nq <= SIMT_MAX_QUERIES_16BIT ? SIMT : TC;
}
static size_t simt_width(size_t remaining) { return remaining == 1 ? 1 : remaining <= 4 ? 4 : 8; }
static size_t simt_dpad(size_t dim, int dt) {
    const size_t es = esize(dt), step = (dim * es) % 16 == 0 ? 32 * (16 / es) : 32;
    return round_up(dim, step);
}

struct Hit { size_t index; float score; };
static Hit decode(u64 key) {
    const unsigned asc = (unsigned)(key >> 32);
    float score;
    if (asc == 0) score = NAN;
    else if (asc >> 31) score = __uint_as_float(asc & 0x7fffffffu);
    else score = __uint_as_float(~asc);
    return {(size_t)(unsigned)~(unsigned)key, score};
}

using SimtFn = void (*)(const void*, long long, int, unsigned, const float*, int, int, const unsigned*, u64*, unsigned*, long long);
static const SimtFn simt_fns[3][3] = {
    {rrra_topk_score_f32_q1, rrra_topk_score_f32_q4, rrra_topk_score_f32_q8},
    {rrra_topk_score_f16_q1, rrra_topk_score_f16_q4, rrra_topk_score_f16_q8},
    {rrra_topk_score_bf16_q1, rrra_topk_score_bf16_q4, rrra_topk_score_bf16_q8}};
static const char* simt_names[3][3] = {
    {"score_f32_q1", "score_f32_q4", "score_f32_q8"},
    {"score_f16_q1", "score_f16_q4", "score_f16_q8"},
    {"score_bf16_q1", "score_bf16_q4", "score_bf16_q8"}};

// Device memory: 256-byte aligned like cudaMalloc, poisoned so that a read of a slot no kernel
// wrote shows up as a wrong result.
struct DevBuf {
    std::vector<unsigned char> raw;
    unsigned char* p = nullptr;
    size_t bytes = 0;
    void alloc(size_t n, unsigned char poison = 0xA5) {
        raw.assign(n + 256, poison);
        p = raw.data() + ((256 - ((size_t)raw.data() & 255)) & 255);
        bytes = n;
    }
    template <class T> T* as() const { return reinterpret_cast<T*>(p); }
};

// The host-side classification of one select launch's radix walk (which kernel branch it takes),
// to report what the cases covered.
static const char* select_branch(const u64* in, unsigned n, unsigned k) {
    if (n <= k) return "select: n <= k, all kept";
    u64 prefix = 0;
    unsigned need = k;
    for (int shift = 56; shift >= 0; shift -= 8) {
        unsigned hist[256] = {};
        for (unsigned i = 0; i < n; ++i)
            if (shift == 56 || (in[i] >> (shift + 8)) == prefix) ++hist[(in[i] >> shift) & 255];
        unsigned above = 0;
        int b = 255;
        for (; b >= 0 && above + hist[b] < need; --b) above += hist[b];
        need -= above;
        prefix = (prefix << 8) | (unsigned)b;
        if (hist[b] == need || shift == 0) return "select: radix in global memory";
        if (hist[b] <= (unsigned)SEL_CAP)
            return shift == 56 ? "select: radix, compacted to shared memory at the first digit"
                               : "select: radix, compacted to shared memory after digits in global memory";
    }
    return "select: radix in global memory";
}

struct Corpus { int dt; size_t dim, rows; DevBuf data; std::vector<float> vals; std::vector<char> copy_of_1; };

struct Searcher {
    size_t sms, smem_optin, max_queries, max_k, chunk_rows, stride;
    DevBuf lists[2], counts[2], min_key, sorted, qexp, queries, prepared;
    size_t reserved_dim = 0;
    int cur = 0;
    std::vector<u64> host_sorted;

    // sms: the device's multiprocessors (few here: fewer host threads, and grid-stride loops);
    // optin: an H200's opt-in shared memory per block, 227 KiB.
    Searcher(size_t sms_, size_t max_queries_, size_t max_k_, size_t chunk_rows_, size_t optin = 232448)
        : sms(sms_), smem_optin(optin), max_queries(max_queries_), max_k(max_k_), chunk_rows(chunk_rows_) {
        stride = max_k + chunk_rows;
        const size_t list_len = max_queries * stride;
        const size_t need = std::max({next_pow2(max_k) * 8, SEL_SMEM + 2048, RS_TC_SMEM});
        if (need > smem_optin) { printf("searcher: %zu bytes of shared memory needed\n", need); std::abort(); }
        lists[0].alloc(list_len * 8);
        lists[1].alloc(list_len * 8);
        counts[0].alloc(max_queries * 4);
        counts[1].alloc(max_queries * 4);
        min_key.alloc(max_queries * 4);
        sorted.alloc(max_queries * max_k * 8);
        qexp.alloc(round_up(max_queries, RS_TC_BN) * 4);
        host_sorted.assign(max_queries * max_k, 0);
    }
    void reserve(size_t dim) {
        size_t dpad = 0;
        for (int dt : {F32, F16, BF16}) dpad = std::max(dpad, simt_dpad(dim, dt));
        if (dpad * 4 + SIMT_STATIC_SMEM > smem_optin) { printf("dimension %zu too large\n", dim); std::abort(); }
        if (dim > reserved_dim) {
            const size_t tc = 3 * round_up(max_queries, RS_TC_BN) * round_up(dim, RS_TC_BK) * 2;
            const size_t gemm = round_up(dim, RS_G_BK) * round_up(max_queries, RS_G_BN) * 4;
            queries.alloc(max_queries * dim * 4);
            prepared.alloc(std::max(tc, gemm));
            reserved_dim = dim;
        }
    }
    size_t next_len(size_t seen, size_t remaining, size_t k) const { return chunk_len(seen, remaining, k, chunk_rows); }

    Path begin(const float* batch, size_t nb, size_t dim, int dt) {
        const Path path = path_for(dt, nb);
        std::memcpy(queries.p, batch, nb * dim * 4);
        std::memset(counts[0].p, 0, nb * 4);
        std::memset(min_key.p, 0, nb * 4);
        cur = 0;
        const int nq_i = (int)nb, dim_i = (int)dim;
        if (path == TC) {
            const size_t q_pad = round_up(nb, RS_TC_BN), d_pad = round_up(dim, RS_TC_BK);
            const int qp = (int)q_pad, dp = (int)d_pad;
            const float* q = queries.as<float>();
            auto* out = prepared.as<unsigned short>();
            int* qe = qexp.as<int>();
            if (dt == F16) {
                launched.insert("split_queries_f16");
                launch(q_pad, 256, [&] { rrra_topk_split_queries_f16(q, nq_i, dim_i, qp, dp, out, qe); });
            } else {
                launched.insert("split_queries_bf16");
                launch(q_pad, 256, [&] { rrra_topk_split_queries_bf16(q, nq_i, dim_i, qp, dp, out, qe); });
            }
        } else if (path == GEMM) {
            const size_t q_pad = round_up(nb, RS_G_BN), d_pad = round_up(dim, RS_G_BK);
            const int qp = (int)q_pad, dp = (int)d_pad;
            const size_t blocks = std::min(div_ceil(q_pad * d_pad, 256), sms * 8);
            const float* q = queries.as<float>();
            float* qT = prepared.as<float>();
            launched.insert("transpose_queries");
            launch(blocks, 256, [&] { rrra_topk_transpose_queries(q, nq_i, dim_i, qp, dp, qT); });
        }
        return path;
    }

    void score(Path path, const unsigned char* ptr, size_t len, size_t dim, int dt, size_t row0, size_t nb) {
        const long long n_rows = (long long)len, stride_i = (long long)stride;
        const int dim_i = (int)dim, nq_i = (int)nb;
        const unsigned row0_u = (unsigned)row0;
        const float* qptr = queries.as<float>();
        const unsigned* mk = min_key.as<unsigned>();
        u64* cand = lists[cur].as<u64>();
        unsigned* cnt = counts[cur].as<unsigned>();
        if (path == SIMT) {
            const size_t dpad = simt_dpad(dim, dt);
            size_t q0 = 0;
            while (q0 < nb) {
                size_t width = simt_width(nb - q0);
                while (width > 1 && width * dpad * 4 + SIMT_STATIC_SMEM > smem_optin) width = width == 8 ? 4 : 1;
                const int variant = width == 1 ? 0 : width == 4 ? 1 : 2;
                const size_t rows_per_warp = width == 8 ? 4 : 8;
                const size_t blocks = std::min(div_ceil(div_ceil(len, rows_per_warp), 8), sms * 8);
                const SimtFn f = simt_fns[dt][variant];
                const int q0_i = (int)q0;
                launched.insert(std::string(simt_names[dt][variant]) + ((dim * esize(dt)) % 16 ? " (scalar rows)" : " (16-byte rows)"));
                launch(blocks, 256, [&] { f(ptr, n_rows, dim_i, row0_u, qptr, q0_i, nq_i, mk, cand, cnt, stride_i); },
                       width * dpad * 4);
                q0 += width;
            }
        } else if (path == TC) {
            const size_t q_pad = round_up(nb, RS_TC_BN), d_pad = round_up(dim, RS_TC_BK), q_tiles = q_pad / RS_TC_BN;
            const size_t grid = div_ceil(len, RS_TC_BM) * q_tiles;
            const int qp = (int)q_pad, dp = (int)d_pad, qt = (int)q_tiles;
            const auto* corpus = reinterpret_cast<const unsigned short*>(ptr);
            const auto* qs = prepared.as<unsigned short>();
            const int* qe = qexp.as<int>();
            const bool aligned = dim % 8 == 0;
            if (dt == F16) {
                launched.insert(std::string("score_tc_f16") + (aligned ? " (cp.async rows)" : " (scalar rows)"));
                launch(grid, 256, [&] { rrra_topk_score_tc_f16(corpus, n_rows, dim_i, row0_u, qs, qe, nq_i, qp, dp, mk, cand, cnt, stride_i, qt); }, RS_TC_SMEM);
            } else {
                launched.insert(std::string("score_tc_bf16") + (aligned ? " (cp.async rows)" : " (scalar rows)"));
                launch(grid, 256, [&] { rrra_topk_score_tc_bf16(corpus, n_rows, dim_i, row0_u, qs, qe, nq_i, qp, dp, mk, cand, cnt, stride_i, qt); }, RS_TC_SMEM);
            }
        } else {
            const size_t q_pad = round_up(nb, RS_G_BN), d_pad = round_up(dim, RS_G_BK), q_tiles = q_pad / RS_G_BN;
            const size_t grid = div_ceil(len, RS_G_BM) * q_tiles;
            const int qp = (int)q_pad, dp = (int)d_pad, qt = (int)q_tiles;
            const auto* corpus = reinterpret_cast<const float*>(ptr);
            const float* qT = prepared.as<float>();
            launched.insert(std::string("score_f32_gemm") + (dim % 4 ? " (scalar rows)" : " (16-byte rows)"));
            launch(grid, 256, [&] { rrra_topk_score_f32_gemm(corpus, n_rows, dim_i, row0_u, qT, nq_i, qp, dp, mk, cand, cnt, stride_i, qt); });
        }
    }

    void select(size_t nb, size_t k) {
        const int c = cur, next = 1 - cur;
        const long long stride_i = (long long)stride;
        const int k_i = (int)k;
        for (size_t q = 0; q < nb; ++q)
            launched.insert(select_branch(lists[c].as<u64>() + q * stride, counts[c].as<unsigned>()[q], (unsigned)k));
        const u64* in = lists[c].as<u64>();
        const unsigned* cin = counts[c].as<unsigned>();
        u64* out = lists[next].as<u64>();
        unsigned* cout = counts[next].as<unsigned>();
        unsigned* mk = min_key.as<unsigned>();
        launch(nb, 1024, [&] { rrra_topk_select(in, cin, out, cout, mk, stride_i, k_i); }, SEL_SMEM);
        cur = next;
    }

    // Returns false where the Rust code would return an error (a row index out of range).
    bool finish(size_t nb, size_t k, size_t rows, std::vector<std::vector<Hit>>& out) {
        const size_t p = next_pow2(k);
        const unsigned threads = (unsigned)std::clamp<size_t>(p / 2, 32, 1024);
        const long long stride_i = (long long)stride;
        const int k_i = (int)k;
        const u64* lists_p = lists[cur].as<u64>();
        const unsigned* cnt = counts[cur].as<unsigned>();
        u64* s = sorted.as<u64>();
        launched.insert("sort");
        launch(nb, threads, [&] { rrra_topk_sort(lists_p, cnt, stride_i, k_i, s); }, p * 8);
        std::memcpy(host_sorted.data(), s, nb * k * 8);
        bool ok = true;
        for (size_t q = 0; q < nb; ++q) {
            std::vector<Hit> hits;
            for (size_t i = 0; i < k; ++i) {
                hits.push_back(decode(host_sorted[q * k + i]));
                if (hits.back().index >= rows) ok = false;
            }
            out.push_back(std::move(hits));
        }
        return ok;
    }

    bool search(const Corpus& c, const std::vector<float>& qs, size_t k, std::vector<std::vector<Hit>>& out) {
        const size_t dim = c.dim, rows = c.rows, nq = qs.size() / dim;
        if (k == 0 || nq == 0 || std::min(k, rows) > max_k) std::abort();
        k = std::min(k, rows);
        reserve(dim);
        const size_t row_bytes = dim * esize(c.dt);
        bool ok = true;
        for (size_t b0 = 0; b0 < nq; b0 += max_queries) {
            const size_t nb = std::min(max_queries, nq - b0);
            const Path path = begin(qs.data() + b0 * dim, nb, dim, c.dt);
            size_t seen = 0;
            while (seen < rows) {
                const size_t len = next_len(seen, rows - seen, k);
                score(path, c.data.p + seen * row_bytes, len, dim, c.dt, seen, nb);
                select(nb, k);
                seen += len;
            }
            ok &= finish(nb, k, rows, out);
        }
        return ok;
    }

    // search_streamed: chunk_rows rows at a time through two staging buffers, each scored in
    // next_len sub-chunks.
    bool search_streamed(const Corpus& c, const std::vector<float>& qs, size_t k, std::vector<std::vector<Hit>>& out) {
        const size_t dim = c.dim, rows = c.rows, nq = qs.size() / dim;
        k = std::min(k, rows);
        reserve(dim);
        const size_t row_bytes = dim * esize(c.dt);
        DevBuf dev[2];
        dev[0].alloc(chunk_rows * row_bytes);
        dev[1].alloc(chunk_rows * row_bytes);
        size_t turn = 0;
        bool ok = true;
        for (size_t b0 = 0; b0 < nq; b0 += max_queries) {
            const size_t nb = std::min(max_queries, nq - b0);
            const Path path = begin(qs.data() + b0 * dim, nb, dim, c.dt);
            size_t seen = 0;
            while (seen < rows) {
                const size_t len = std::min(chunk_rows, rows - seen);
                const size_t b = turn++ % 2;
                std::memcpy(dev[b].p, c.data.p + seen * row_bytes, len * row_bytes);
                size_t pos = 0;
                while (pos < len) {
                    const size_t sub = next_len(seen + pos, len - pos, k);
                    score(path, dev[b].p + pos * row_bytes, sub, dim, c.dt, seen + pos, nb);
                    select(nb, k);
                    pos += sub;
                }
                seen += len;
            }
            ok &= finish(nb, k, rows, out);
        }
        return ok;
    }
};

// ---------------------------------------------------------------------------------------------
// Exact CPU reference: each score summed in f64 (f32 x f32 products are exact there, and the
// sum's error, below d * 2^-53 of sum |q c|, is far under f32's 2^-24), rounded once to f32;
// ordered as hit_order.

struct Ref { std::vector<float> score; std::vector<double> scale; };  // per row: score, sum |q c|
static Ref ref_scores(const Corpus& c, const float* q) {
    Ref r;
    r.score.resize(c.rows);
    r.scale.resize(c.rows);
    for (size_t i = 0; i < c.rows; ++i) {
        double s = 0, a = 0;
        for (size_t j = 0; j < c.dim; ++j) {
            const double p = (double)q[j] * (double)c.vals[i * c.dim + j];
            s += p;
            a += std::fabs(p);
        }
        r.score[i] = (float)s;
        r.scale[i] = a;
    }
    return r;
}
static bool hit_before(const Hit& a, const Hit& b) {
    const bool na = std::isnan(a.score), nb = std::isnan(b.score);
    if (na != nb) return nb;
    if (!na && a.score != b.score) return a.score > b.score;
    return a.index < b.index;
}
static std::vector<Hit> ref_topk(const Ref& r, size_t k) {
    std::vector<Hit> all;
    for (size_t i = 0; i < r.score.size(); ++i) all.push_back({i, std::isnan(r.score[i]) ? NAN : r.score[i] + 0.0f});
    k = std::min(k, all.size());
    std::partial_sort(all.begin(), all.begin() + k, all.end(), hit_before);
    all.resize(k);
    return all;
}

// ---------------------------------------------------------------------------------------------
// Data

static unsigned short to_bits(int dt, float x) {
    return dt == F16 ? __half_as_ushort(__float2half_rn(x)) : __bfloat16_as_ushort(__float2bfloat16_rn(x));
}
static float from_bits(int dt, unsigned short b) {
    return dt == F16 ? __half2float(__ushort_as_half(b)) : __uint_as_float((unsigned)b << 16);
}

struct Case {
    const char* what;
    int dt;
    size_t rows, dim, nq, k;
    bool dyadic;            // exact data: bitwise comparison
    size_t max_queries = 0, max_k = MAX_K, chunk_rows = 1 << 15, sms = 1;  // max_queries 0: all
    double dup = 0;         // fraction of rows copied from row 1 (ties; many equal keys)
    size_t nan_rows = 0, inf_rows = 0, zero_rows = 0;
    bool streamed = false;
    bool qspread = false;   // random queries of magnitudes 2^-30 .. 2^14 (the f16 split's scaling)
    bool ulps = false;      // scores 1 + j ulp: thresholds must be exact to the last bit
    bool huge = false;      // query 0 holds f32's largest value (rounds to infinity in bf16)
};

// Row 1 (and its copies) is the best row for query 0: its copies fill the top of the list.
static Corpus make_corpus(const Case& cs, const std::vector<float>& q) {
    Corpus c{cs.dt, cs.dim, cs.rows, {}, {}, std::vector<char>(cs.rows, 0)};
    const size_t n = cs.rows * cs.dim;
    c.vals.resize(n);
    // dyadic: values {-4..4} / 4 and queries {-8..8} / 8 give products that are multiples of 2^-5
    // of magnitude <= 1, so any partial sum of d <= 2^16 of them is exact in f32 (< 2^21 units).
    for (auto& v : c.vals) v = cs.dyadic ? (float)((int)(rng() % 9) - 4) * 0.25f : std::uniform_real_distribution<float>(-1, 1)(rng);
    auto row = [&](size_t i) { return &c.vals[i * cs.dim]; };
    if (cs.ulps)
        for (size_t i = 0; i < cs.rows; ++i) {
            std::fill_n(row(i), cs.dim, 0.0f);
            row(i)[0] = 1.0f + (float)(rng() % 40) * 0x1p-23f;
        }
    if (cs.dup > 0) {
        for (size_t j = 0; j < cs.dim; ++j) row(1)[j] = q[j] > 0 ? 1.0f : q[j] < 0 ? -1.0f : 0.0f;
        c.copy_of_1[1] = 1;
        for (size_t i = 2; i < cs.rows; ++i)
            if (std::uniform_real_distribution<double>(0, 1)(rng) < cs.dup) std::copy(row(1), row(1) + cs.dim, row(i)), c.copy_of_1[i] = 1;
    }
    auto pick = [&] { return (size_t)(rng() % cs.rows); };
    for (size_t i = 0; i < cs.zero_rows; ++i) std::fill_n(row(pick()), cs.dim, 0.0f);
    for (size_t i = 0; i < cs.nan_rows; ++i) row(cs.nan_rows >= cs.rows ? i : pick())[rng() % cs.dim] = NAN;
    for (size_t i = 0; i < cs.inf_rows; ++i) row(pick())[rng() % cs.dim] = (rng() & 1) ? INFINITY : -INFINITY;
    c.data.alloc(n * esize(cs.dt));
    for (size_t i = 0; i < n; ++i) {
        if (cs.dt == F32) {
            c.data.as<float>()[i] = c.vals[i];
        } else {
            const unsigned short b = to_bits(cs.dt, c.vals[i]);
            c.data.as<unsigned short>()[i] = b;
            c.vals[i] = from_bits(cs.dt, b);  // the reference sees the stored values
        }
    }
    return c;
}

static std::vector<float> make_queries(const Case& cs) {
    std::vector<float> q(cs.nq * cs.dim);
    for (size_t i = 0; i < q.size(); ++i) {
        if (cs.ulps && i % cs.dim == 0) {
            q[i] = 1.0f;
        } else if (cs.dyadic) {
            q[i] = (float)((int)(rng() % 17) - 8) * 0.125f;
        } else {
            // magnitudes over 2^-8 .. 1 within a query (the split terms' ranges differ), and
            // with qspread whole queries scaled by 2^-30 .. 2^14
            static const int spread[] = {-30, -12, 0, 8, 14};
            const int e = cs.qspread ? spread[(i / cs.dim) % 5] : 0;
            const float m = std::ldexp(1.0f, e - (int)(rng() % 9));
            q[i] = std::uniform_real_distribution<float>(-1, 1)(rng) * m;
        }
    }
    if (cs.huge) q[0] = 0x1.fffffep127f;
    return q;
}

static bool same_bits(float a, float b) {
    return (std::isnan(a) && std::isnan(b)) || __float_as_uint(a) == __float_as_uint(b);
}

static void run(const Case& cs) {
    ++cases;
    const std::vector<float> qs = make_queries(cs);
    const Corpus c = make_corpus(cs, qs);
    Searcher s(cs.sms, cs.max_queries ? cs.max_queries : cs.nq, cs.max_k, cs.chunk_rows);
    std::vector<std::vector<Hit>> got;
    const int before = fails;
    const bool ok = cs.streamed ? s.search_streamed(c, qs, cs.k, got) : s.search(c, qs, cs.k, got);
    CHECK(ok, "%s: a row index out of range (the Rust code reports an internal error)", cs.what);
    CHECK(got.size() == cs.nq, "%s: %zu result lists for %zu queries", cs.what, got.size(), cs.nq);
    const size_t kk = std::min(cs.k, cs.rows);
    size_t near_ties = 0;
    for (size_t q = 0; q < cs.nq && q < got.size() && fails == before; ++q) {
        const Ref r = ref_scores(c, &qs[q * cs.dim]);
        const std::vector<Hit> want = ref_topk(r, cs.k);
        const std::vector<Hit>& g = got[q];
        CHECK(g.size() == kk, "%s q %zu: %zu hits, want %zu", cs.what, q, g.size(), kk);
        if (g.size() != kk) break;
        std::set<size_t> ids;
        for (size_t i = 0; i < kk; ++i) {
            CHECK(g[i].index < cs.rows && ids.insert(g[i].index).second, "%s q %zu rank %zu: row %zu repeated or out of range", cs.what, q, i, g[i].index);
            if (i) CHECK(hit_before(g[i - 1], g[i]), "%s q %zu: ranks %zu, %zu out of order", cs.what, q, i - 1, i);
        }
        if (fails != before) break;
        // equal rows, equal bits: every scoring path sums each row in the same order
        const Hit* first = nullptr;
        for (const Hit& h : g)
            if (c.copy_of_1[h.index]) {
                if (!first) first = &h;
                CHECK(same_bits(h.score, first->score), "%s q %zu: copies of row 1 score %a and %a", cs.what, q, first->score, h.score);
            }
        for (size_t i = 0; i < kk && fails == before; ++i) {
            const Hit& a = g[i];
            const Hit& b = want[i];
            if (cs.dyadic) {
                // every sum is exact in any order: the same rows, the same bits
                CHECK(a.index == b.index && same_bits(a.score, b.score), "%s q %zu rank %zu: row %zu score %a, want row %zu score %a",
                      cs.what, q, i, a.index, a.score, b.index, b.score);
                continue;
            }
            // Random data: the GPU sums in another order (per-lane FMA chains and a shuffle tree,
            // a register-tiled FMA chain, or the 3d exact products of the split query in f32).
            // n terms summed in f32 are within n * 2^-24 * sum |q c| of the exact value in the
            // worst case and ~sqrt(n) * 2^-24 * sum |q c| for random signs (n <= 3 * 96 here:
            // ~1e-6), so 1e-5 * sum |q c| is the tolerance: relative to the sum of |products|,
            // since under cancellation the score's own relative error is unbounded.
            const double tol = 1e-5 * r.scale[a.index] + 1e-30;
            const double exact = r.score[a.index];
            CHECK(same_bits(a.score, exact) || std::fabs((double)a.score - exact) <= tol,
                  "%s q %zu rank %zu: row %zu GPU score %.9g, exact %.9g (tol %.3g)", cs.what, q, i, a.index, a.score, exact, tol);
            CHECK(same_bits(a.score, b.score) || std::fabs((double)a.score - b.score) <= 1e-5 * std::max(r.scale[a.index], r.scale[b.index]) + 1e-30,
                  "%s q %zu rank %zu: GPU score %.9g vs reference %.9g", cs.what, q, i, a.score, b.score);
            if (a.index != b.index) {
                // A different row only where the two rows' exact scores are a near-tie (within
                // the two scores' tolerances): the summation order may swap them.
                const double t2 = 1e-5 * (r.scale[a.index] + r.scale[b.index]) + 1e-30;
                CHECK(same_bits(r.score[a.index], r.score[b.index]) || std::fabs((double)r.score[a.index] - r.score[b.index]) <= t2,
                      "%s q %zu rank %zu: row %zu (exact %.9g), want row %zu (%.9g): not a near-tie", cs.what, q, i, a.index,
                      r.score[a.index], b.index, b.score);
                ++near_ties;
            }
        }
    }
    printf("%-44s %-4s rows %6zu d %4zu q %3zu k %5zu: %s%s\n", cs.what, dtype_name[cs.dt], cs.rows, cs.dim, cs.nq, cs.k,
           fails == before ? "ok" : "FAILED", near_ties ? (" (" + std::to_string(near_ties) + " near-tie swaps)").c_str() : "");
    fflush(stdout);
}

int main() {
    std::vector<Case> cs;
    auto add = [&](Case c) { cs.push_back(c); return &cs.back(); };
    // Each select block is 1024 host threads: cases with many queries take k = rows (every score
    // ranked, the select's keep-all branch); thresholds across chunks use few queries.
    // SIMT scoring, exact data: each dtype and width, 16-byte and scalar (odd byte length) rows
    add({"simt q1, 4 chunks, NaN rows", F32, 1000, 64, 1, 10, true})->chunk_rows = 256;
    cs.back().nan_rows = 5;
    add({"simt q4 (3 queries), odd d, k = 1", F32, 400, 33, 3, 1, true})->chunk_rows = 200;
    add({"simt q8 + q1 passes, odd d, thresholds", F32, 120, 17, 9, 6, true})->chunk_rows = 60;
    add({"simt q8 + q8 passes (13 queries)", F32, 100, 40, 13, 100, true});
    add({"simt f16 q1, ties", F16, 500, 24, 1, 12, true})->dup = 0.3;
    add({"simt f16 q4, odd d", F16, 300, 13, 4, 9, true})->chunk_rows = 150;
    add({"simt f16 q8", F16, 150, 72, 8, 150, true});
    add({"simt bf16 q1, odd d", BF16, 600, 9, 1, 3, true})->chunk_rows = 200;
    add({"simt bf16 q4 (2 queries)", BF16, 300, 16, 2, 30, true});
    add({"simt bf16 q8", BF16, 100, 24, 8, 100, true});
    add({"simt q4 width fallback (d 7300, 8 queries)", F32, 40, 7300, 8, 40, true});
    // tensor cores (> 8 queries on 16-bit rows), with the query split
    add({"tc f16, cp.async rows, thresholds, NaN rows", F16, 400, 40, 9, 20, true})->chunk_rows = 200;
    cs.back().nan_rows = 8;
    add({"tc f16, scalar rows, 2 query tiles, NaN rows", F16, 270, 13, 33, 270, true})->nan_rows = 8;
    add({"tc bf16, cp.async rows", BF16, 260, 64, 9, 260, true});
    // f32 GEMM (> 24 queries)
    add({"gemm, scalar rows, 2 query tiles", F32, 130, 7, 65, 130, true});
    // k at the edges, NaN thresholds, many equal keys, batches, streaming
    add({"k > rows, odd d", F16, 30, 7, 1, 100, true});
    add({"NaN, inf and zero rows in the top k", F32, 60, 12, 3, 55, true})->nan_rows = 10;
    cs.back().inf_rows = 4;
    cs.back().zero_rows = 3;
    add({"scores 1 ulp apart, 8 chunks", F32, 400, 3, 1, 10, true})->ulps = true;
    cs.back().chunk_rows = 50;
    add({"all rows NaN, 3 chunks", F32, 40, 4, 1, 10, true})->nan_rows = 40;
    cs.back().chunk_rows = 16;
    add({"k = 10000, many equal keys, 2 chunks", F32, 16400, 2, 1, 10000, true})->dup = 0.95;
    cs.back().chunk_rows = 10000;
    add({"many equal keys, small k", BF16, 3000, 8, 1, 50, true})->dup = 0.9;
    add({"2 query batches (q8, q1), odd d", F16, 100, 15, 7, 4, true})->max_queries = 6;
    add({"streamed, sub-chunks, odd d", BF16, 600, 20, 2, 10, true})->chunk_rows = 250;
    cs.back().streamed = true;
    // random data (tolerances)
    add({"random simt q1, equal rows", F32, 1500, 100, 1, 20, false})->dup = 0.2;
    add({"random simt f16 q4", F16, 800, 64, 4, 10, false});
    add({"random simt bf16 q8, odd d", BF16, 600, 45, 7, 10, false});
    add({"random tc f16, query scales 2^-30 .. 2^14", F16, 300, 64, 9, 300, false})->qspread = true;
    add({"random tc bf16, scalar rows, query at f32 max", BF16, 300, 93, 9, 300, false})->huge = true;
    add({"random gemm, 16-byte rows, NaN and inf rows", F32, 300, 52, 25, 300, false})->nan_rows = 6;
    cs.back().inf_rows = 3;
    for (auto& c : cs) run(c);
    for (const auto& l : launched) printf("covered: %s\n", l.c_str());
    printf("topk: %d cases, %d fails\n", cases, fails);
    return fails != 0;
}
