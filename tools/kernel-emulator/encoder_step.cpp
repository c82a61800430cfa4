// Emulates one training step of src/device/encoder_train.rs (GpuTrainableEncoder::forward_train
// with its DropoutPlan, then backward: d_embeddings in, every parameter gradient added to the
// host's) as a whole: the launch order, buffers and their reuse, strides and offsets, grids,
// blocks, shared memory and argument order of encoder_train.rs, backward.rs,
// attention_backward.rs and encoder.rs's AttentionKernel, transliterated; cuBLAS replaced by a
// column-major f32 GEMM behind runtime::sgemm_row_major's mapping (GemmMath::F32), with cuBLAS's
// argument checks. Compares the embeddings and every gradient with TrainableEncoder's
// (examples/kernel_reference.rs, `encoder_step`), and for tiny-bert with the float64 PyTorch
// ones, with tests/gpu_encoder_train.rs's tolerances. A case of two micro-batches runs
// zero_grads, forward_train + accumulate_backward twice, then add_grads_to. Cases with a
// tiled head dim and mean or CLS pooling run again in GemmMath::Bf16's mixed precision: bf16
// activations and working weights, products on bf16 operands with f32 accumulation (emulated
// exactly: operands widened, f32 sums), the tensor-core attention's bf16 twins
// (rrra_attention_train_mma_bf16_d*, rrra_attention_backward_{dq,dkdv}_mma_bf16_d*), held to
// the test's bf16 bounds.
// Usage: encoder_step REFERENCE_DIR [CASE]
//
// Device buffers are sized as the Rust allocates them (max_tokens / max_sequences above the
// batch's), filled with NaN where the GPU's would be uninitialised, and fenced by NaN guards
// that are checked after the step: a read of an unwritten element or past a buffer shows as a
// NaN or a mismatch, a write past one as a changed guard.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <array>
#include <map>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>
#include "emu.h"
#include "sized_reader.h"
#ifndef exp2f
#define exp2f(x) std::exp2((float)(x))
#endif
#include "mma_sync.h"
#include "attention.cu"
#include "pooling.cu"
#include "backward.cu"
#include "attention_backward.cu"
#include "encoder_train.cu"  // last: it defines THREADS, which attb:: also names
#undef THREADS

static int checks = 0, fails = 0;
#define FAIL(...) do { if (++fails <= 40) { printf("FAIL "); printf(__VA_ARGS__); printf("\n"); } } while (0)
#define REQUIRE(c, ...) do { if (!(c)) { printf("error: "); printf(__VA_ARGS__); printf("\n"); exit(2); } } while (0)

// ---- device memory: cudaMalloc-like buffers with NaN guards ----

constexpr size_t GUARD = 64;  // elements each side
struct Alloc { unsigned char* base; size_t bytes, guard_bytes; std::string what; };
static std::vector<Alloc> g_allocs;
template <class T> struct Slice {
    T* p = nullptr;
    size_t n = 0;
    T* ptr() const { return p; }
    size_t len() const { return n; }
};
// runtime::alloc: uninitialised (here NaN bytes), at least one element
template <class T> static Slice<T> alloc(size_t len, const char* what) {
    len = std::max<size_t>(len, 1);
    const size_t gb = GUARD * sizeof(T), bytes = len * sizeof(T);
    auto* raw = static_cast<unsigned char*>(std::aligned_alloc(256, (gb * 2 + bytes + 255) / 256 * 256));
    std::memset(raw, 0xFF, gb * 2 + bytes);
    g_allocs.push_back({raw, bytes, gb, what});
    return {reinterpret_cast<T*>(raw + gb), len};
}
template <class T> static Slice<T> upload(const std::vector<T>& host, const char* what) {
    Slice<T> s = alloc<T>(host.size(), what);
    if (!host.empty()) std::memcpy(s.p, host.data(), host.size() * sizeof(T));
    return s;
}
template <class T> static void memcpy_htod(const std::vector<T>& host, T* dst) {
    if (!host.empty()) std::memcpy(dst, host.data(), host.size() * sizeof(T));
}
static void check_guards() {
    for (const Alloc& a : g_allocs) {
        bool ok = true;
        for (size_t i = 0; i < a.guard_bytes; ++i)
            ok &= a.base[i] == 0xFF && a.base[a.guard_bytes + a.bytes + i] == 0xFF;
        ++checks;
        if (!ok) FAIL("a write past the buffer of %s", a.what.c_str());
    }
}
static void free_all() {
    for (const Alloc& a : g_allocs) std::free(a.base);
    g_allocs.clear();
}

// ---- runtime.rs ----

struct LaunchConfig { unsigned gx = 1, gy = 1, gz = 1, block = 1, smem = 0; };
// the default dynamic shared memory limit; allow_smem raises a function's
constexpr unsigned DEFAULT_SMEM = 48 * 1024;
static LaunchConfig launch_cfg(size_t grid, unsigned block, size_t smem) {
    return {(unsigned)std::max<size_t>(grid, 1), 1, 1, block, (unsigned)smem};
}
static LaunchConfig grid_stride(size_t n, unsigned threads) {
    return launch_cfg(std::min<size_t>((n + threads - 1) / threads, 1 << 16), threads, 0);
}
template <class F> static void run(const LaunchConfig& c, F f, unsigned smem_limit = DEFAULT_SMEM) {
    REQUIRE(c.smem <= smem_limit, "%u bytes of dynamic shared memory over the function's limit %u", c.smem, smem_limit);
    REQUIRE(c.block <= 1024 && c.gy <= 65535 && c.gz <= 65535, "launch dimensions");
    launch3(c.gx, c.gy, c.gz, c.block, f, c.smem);
}

// cublasGemmEx, column-major, CUBLAS_COMPUTE_32F: C = alpha op(A) op(B) + beta C (C not read when
// beta is 0), f32 accumulation in k order; with cuBLAS's argument checks.
static void gemm_ex(bool ta, bool tb, int m, int n, int k, float alpha, const float* A, int lda, const float* B,
                    int ldb, float beta, float* C, int ldc) {
    REQUIRE(m >= 0 && n >= 0 && k >= 0 && lda >= std::max(1, ta ? k : m) && ldb >= std::max(1, tb ? n : k) &&
                ldc >= std::max(1, m),
            "cuBLAS would refuse GEMM m %d n %d k %d lda %d ldb %d ldc %d", m, n, k, lda, ldb, ldc);
    for (int j = 0; j < n; ++j)
        for (int i = 0; i < m; ++i) {
            float s = 0.0f;
            for (int l = 0; l < k; ++l) {
                const float a = ta ? A[l + (size_t)i * lda] : A[i + (size_t)l * lda];
                const float b = tb ? B[j + (size_t)l * ldb] : B[l + (size_t)j * ldb];
                s = std::fma(a, b, s);
            }
            float& c = C[i + (size_t)j * ldc];
            c = beta == 0.0f ? alpha * s : alpha * s + beta * c;
        }
}
// the same for GemmMath::Bf16's products with bf16 operands (runtime::Operands::Bf16 / Bf16Out):
// the operands widened exactly, f32 accumulation, C f32 or rounded once to bf16
static float widen(float x) { return x; }
static float widen(bf16 x) { return __bfloat162float(x); }
static void store_c(float& c, float v) { c = v; }
static void store_c(bf16& c, float v) { c = __float2bfloat16_rn(v); }
template <class TC>
static void gemm_ex_bf16(bool ta, bool tb, int m, int n, int k, const bf16* A, int lda, const bf16* B, int ldb,
                         float beta, TC* C, int ldc) {
    REQUIRE(m >= 0 && n >= 0 && k >= 0 && lda >= std::max(1, ta ? k : m) && ldb >= std::max(1, tb ? n : k) &&
                ldc >= std::max(1, m),
            "cuBLAS would refuse GEMM m %d n %d k %d lda %d ldb %d ldc %d", m, n, k, lda, ldb, ldc);
    for (int j = 0; j < n; ++j)
        for (int i = 0; i < m; ++i) {
            float s = 0.0f;
            for (int l = 0; l < k; ++l) {
                const float a = widen(ta ? A[l + (size_t)i * lda] : A[i + (size_t)l * lda]);
                const float b = widen(tb ? B[j + (size_t)l * ldb] : B[l + (size_t)j * ldb]);
                s = std::fma(a, b, s);
            }
            TC& c = C[i + (size_t)j * ldc];
            store_c(c, beta == 0.0f ? s : s + beta * widen(c));
        }
}
struct ColMajorGemm { bool trans_first, trans_second; size_t m, n, k, ld_first, ld_second, ldc; };
static ColMajorGemm col_major(bool trans_a, bool trans_b, size_t m, size_t n, size_t k) {
    return {trans_b, trans_a, n, m, k, trans_b ? k : n, trans_a ? m : k, n};
}
static void sgemm_row_major(bool trans_a, bool trans_b, size_t m, size_t n, size_t k, const float* a,
                            const float* b, float beta, float* c) {
    const ColMajorGemm g = col_major(trans_a, trans_b, m, n, k);
    const float alpha = 1.0f;
    gemm_ex(g.trans_first, g.trans_second, (int)g.m, (int)g.n, (int)g.k, alpha, b, (int)g.ld_first, a,
            (int)g.ld_second, beta, c, (int)g.ldc);
}
// runtime::gemm_row_major with bf16 A and B, C of type TC (Operands::Bf16: f32, Bf16Out: bf16)
template <class TC>
static void gemm_row_major_bf16(bool trans_a, bool trans_b, size_t m, size_t n, size_t k, const bf16* a,
                                const bf16* b, float beta, TC* c) {
    const ColMajorGemm g = col_major(trans_a, trans_b, m, n, k);
    gemm_ex_bf16(g.trans_first, g.trans_second, (int)g.m, (int)g.n, (int)g.k, b, (int)g.ld_first, a,
                 (int)g.ld_second, beta, c, (int)g.ldc);
}

// ---- train::rng::Stream::new(..).words() ----

enum Site : unsigned { EmbeddingDropout = 1, AttentionDropout = 2, AttentionOutputDropout = 3, FfnOutputDropout = 4 };
static std::array<unsigned, 4> stream_words(uint64_t seed, uint64_t step, uint64_t example, unsigned layer, Site site) {
    const unsigned tag = ((unsigned)example << 12) ^ ((layer & 0xffu) << 4) ^ (unsigned)site;
    const unsigned hi = (unsigned)(step >> 32);
    return {(unsigned)seed, (unsigned)(seed >> 32), (unsigned)step ^ ((hi << 16) | (hi >> 16)),
            tag ^ (unsigned)(example >> 20)};
}

struct DropoutPlan { float hidden = 0, attention = 0; uint64_t seed = 0, step = 0; };
enum class Pooling { Mean, Cls, Max };
struct Config { int h, heads, layers, inter, vocab, positions, types; double eps; int head_dim() const { return h / heads; } };

// ---- backward.rs: EmbeddingGradPlan, GpuBackward ----

constexpr size_t LN_ROWS_PER_BLOCK = 32, BIAS_ROWS_PER_PART = 256, EMBED_CHUNK = 64, WARPS = 8;
constexpr unsigned BW_THREADS = 256, BIAS_THREADS = 128;
static size_t grid_of(size_t n, size_t per) { return std::max<size_t>((n + per - 1) / per, 1); }

struct EmbeddingGradPlan {
    size_t tokens, vocab, positions, type_vocab;
    std::vector<unsigned> order;
    std::vector<int> items, slots, segments;
    size_t n_slots = 0;
};
static EmbeddingGradPlan plan_new(const std::vector<unsigned>& ids, const std::vector<unsigned>& type_ids,
                                  const std::vector<size_t>& offsets, size_t vocab, size_t positions, size_t type_vocab) {
    const size_t t_n = ids.size();
    std::vector<unsigned> pos(t_n, 0);
    for (size_t s = 0; s + 1 < offsets.size(); ++s)
        for (size_t t = offsets[s]; t < offsets[s + 1]; ++t) pos[t] = (unsigned)(t - offsets[s]);
    const std::vector<unsigned>* keys_of[3] = {&ids, &pos, &type_ids};
    const size_t rows_of[3] = {vocab, positions, type_vocab};
    EmbeddingGradPlan plan{t_n, vocab, positions, type_vocab, {}, {}, {}, {}, 0};
    for (int table = 0; table < 3; ++table) {
        const auto& keys = *keys_of[table];
        for (unsigned k : keys) REQUIRE(k < rows_of[table], "key %u outside table %d", k, table);
        std::vector<unsigned> idx(t_n);
        for (size_t t = 0; t < t_n; ++t) idx[t] = (unsigned)t;
        std::stable_sort(idx.begin(), idx.end(), [&](unsigned a, unsigned b) { return keys[a] < keys[b]; });
        const size_t base = plan.order.size();
        size_t a = 0;
        while (a < t_n) {
            const unsigned key = keys[idx[a]];
            size_t b = a + 1;
            while (b < t_n && keys[idx[b]] == key) ++b;
            const int tb = table, k = (int)key;
            if (b - a <= EMBED_CHUNK) {
                plan.items.insert(plan.items.end(), {tb, k, (int)(base + a), (int)(base + b)});
                plan.slots.push_back(-1);
            } else {
                const size_t first = plan.n_slots;
                for (size_t c = a; c < b; c += EMBED_CHUNK) {
                    const size_t e = std::min(c + EMBED_CHUNK, b);
                    plan.items.insert(plan.items.end(), {tb, k, (int)(base + c), (int)(base + e)});
                    plan.slots.push_back((int)plan.n_slots);
                    plan.n_slots += 1;
                }
                plan.segments.insert(plan.segments.end(), {tb, k, (int)first, (int)(plan.n_slots - first)});
            }
            a = b;
        }
        plan.order.insert(plan.order.end(), idx.begin(), idx.end());
    }
    return plan;
}
struct DeviceEmbeddingPlan {
    size_t tokens, vocab, positions, type_vocab, n_items, n_segments, n_slots;
    Slice<unsigned> order;
    Slice<int> items, slots, segments;
};
static DeviceEmbeddingPlan upload_on(const EmbeddingGradPlan& p) {
    return {p.tokens, p.vocab, p.positions, p.type_vocab, p.slots.size(), p.segments.size() / 4, p.n_slots,
            upload(p.order, "the embedding plan"), upload(p.items, "the embedding plan"),
            upload(p.slots, "the embedding plan"), upload(p.segments, "the embedding plan")};
}

struct GpuBackward {
    Slice<float> scratch_buf;
    bool has_scratch = false;
    float* scratch(size_t len) {
        if (!has_scratch || scratch_buf.len() < len) { scratch_buf = alloc<float>(len, "backward scratch"); has_scratch = true; }
        return scratch_buf.ptr();
    }
    void launch_final(const float* partials, size_t parts, size_t cols, int groups, bool accumulate, float* out) {
        const int parts_i = (int)parts, cols_i = (int)cols, acc = accumulate;
        run(launch_cfg(grid_of(cols, 32), BW_THREADS, 0),
            [&] { rrra_bias_backward_final_f32(partials, parts_i, cols_i, groups, acc, out); });
    }
    void layernorm(const Slice<float>& s, const Slice<float>& gamma, const Slice<float>& dy, size_t rows, size_t h,
                   float eps, Slice<float>& ds, Slice<float>& dgamma, Slice<float>& dbeta, bool accumulate) {
        const size_t widths[5] = {128, 256, 512, 768, 1024};
        int variant = -1;
        for (int i = 0; i < 5; ++i) if (h <= widths[i]) { variant = i; break; }
        REQUIRE(variant >= 0 && h > 0, "LayerNorm width %zu", h);
        const size_t n = rows * h;
        REQUIRE(s.len() >= n && dy.len() >= n && ds.len() >= n && gamma.len() >= h && dgamma.len() >= h && dbeta.len() >= h,
                "LayerNorm backward buffers");
        if (rows == 0) { if (!accumulate) { std::fill_n(dgamma.p, h, 0.0f); std::fill_n(dbeta.p, h, 0.0f); } return; }
        const size_t blocks = (rows + LN_ROWS_PER_BLOCK - 1) / LN_ROWS_PER_BLOCK;
        float* part = scratch(2 * blocks * h);
        float* part_b = part + blocks * h;
        const int rows_i = (int)rows, h_i = (int)h, rpb = (int)LN_ROWS_PER_BLOCK;
        const float *sp = s.p, *gp = gamma.p, *dyp = dy.p;
        float* dsp = ds.p;
        run(launch_cfg(blocks, BW_THREADS, 0), [&] {
            switch (variant) {
                case 0: rrra_layernorm_backward_f32_h128(sp, gp, dyp, eps, rows_i, h_i, rpb, dsp, part, part_b); break;
                case 1: rrra_layernorm_backward_f32_h256(sp, gp, dyp, eps, rows_i, h_i, rpb, dsp, part, part_b); break;
                case 2: rrra_layernorm_backward_f32_h512(sp, gp, dyp, eps, rows_i, h_i, rpb, dsp, part, part_b); break;
                case 3: rrra_layernorm_backward_f32_h768(sp, gp, dyp, eps, rows_i, h_i, rpb, dsp, part, part_b); break;
                default: rrra_layernorm_backward_f32_h1024(sp, gp, dyp, eps, rows_i, h_i, rpb, dsp, part, part_b);
            }
        });
        const int groups = (int)std::min(WARPS, blocks);
        launch_final(part, blocks, h, groups, accumulate, dgamma.p);
        launch_final(part_b, blocks, h, groups, accumulate, dbeta.p);
    }
    // bias and bias_bf16 (the partial kernel of dy's type)
    template <class T>
    void bias(const Slice<T>& dy, size_t rows, size_t cols, Slice<float>& db, bool accumulate) {
        REQUIRE(dy.len() >= rows * cols && db.len() >= cols, "bias gradient buffers");
        if (cols == 0) return;
        if (rows == 0) { if (!accumulate) std::fill_n(db.p, cols, 0.0f); return; }
        const size_t parts = (rows + BIAS_ROWS_PER_PART - 1) / BIAS_ROWS_PER_PART;
        float* part = scratch(parts * cols);
        const int rows_i = (int)rows, cols_i = (int)cols, rpp = (int)BIAS_ROWS_PER_PART;
        const T* dyp = dy.p;
        LaunchConfig cfg{(unsigned)grid_of(cols, BIAS_THREADS), (unsigned)parts, 1, BIAS_THREADS, 0};
        if constexpr (std::is_same_v<T, float>)
            run(cfg, [&] { rrra_bias_backward_partial_f32(dyp, rows_i, cols_i, rpp, part); });
        else
            run(cfg, [&] { rrra_bias_backward_partial_bf16(dyp, rows_i, cols_i, rpp, part); });
        launch_final(part, parts, cols, 1, accumulate, db.p);
    }
    // gelu and gelu_bf16
    template <class T>
    void gelu(const Slice<T>& pre, Slice<T>& dy, size_t n) {
        REQUIRE(pre.len() >= n && dy.len() >= n, "GELU buffers");
        if (n == 0) return;
        const long long n_i = (long long)n;
        const size_t blocks = std::min<size_t>(grid_of(n, 4 * BW_THREADS), 8192);
        const T* pp = pre.p;
        T* dp = dy.p;
        if constexpr (std::is_same_v<T, float>)
            run(launch_cfg(blocks, BW_THREADS, 0), [&] { rrra_gelu_backward_f32(pp, dp, n_i); });
        else
            run(launch_cfg(blocks, BW_THREADS, 0), [&] { rrra_gelu_backward_bf16(pp, dp, n_i); });
    }
    void pool(Pooling pooling, const Slice<float>& d_pooled, const Slice<float>* hidden, const Slice<unsigned>& offsets,
              size_t sequences, size_t tokens, size_t h, Slice<float>& dx) {
        REQUIRE(d_pooled.len() >= sequences * h && offsets.len() >= sequences + 1 && dx.len() >= tokens * h, "pool buffers");
        const float* hid = nullptr;
        if (pooling == Pooling::Max) { REQUIRE(hidden && hidden->len() >= tokens * h, "hidden states"); hid = hidden->p; }
        if (sequences == 0 || h == 0) return;
        const int s_i = (int)sequences, h_i = (int)h;
        const float* dp = d_pooled.p;
        const unsigned* op = offsets.p;
        float* dxp = dx.p;
        run(launch_cfg(sequences, BW_THREADS, 0), [&] {
            switch (pooling) {
                case Pooling::Mean: rrra_pool_mean_backward_f32(dp, hid, op, s_i, h_i, dxp); break;
                case Pooling::Cls: rrra_pool_cls_backward_f32(dp, hid, op, s_i, h_i, dxp); break;
                case Pooling::Max: rrra_pool_max_backward_f32(dp, hid, op, s_i, h_i, dxp); break;
            }
        });
    }
    void l2_normalize(const Slice<float>& x, const Slice<float>* dy, size_t rows, size_t dim, Slice<float>& dx) {
        const size_t n = rows * dim;
        REQUIRE(x.len() >= n && dx.len() >= n && (!dy || dy->len() >= n), "L2 buffers");
        if (n == 0) return;
        const float* xp = x.p;
        float* dxp = dx.p;
        const float* dyp = dy ? dy->p : dxp;
        const int r_i = (int)rows, d_i = (int)dim;
        run(launch_cfg(grid_of(rows, WARPS), BW_THREADS, 0), [&] { rrra_l2_normalize_backward_f32(xp, dyp, r_i, d_i, dxp); });
    }
    void embedding(const DeviceEmbeddingPlan& plan, const Slice<float>& grad, size_t h, Slice<float>& word,
                   Slice<float>& pos, Slice<float>& types) {
        REQUIRE(grad.len() >= plan.tokens * h && word.len() >= plan.vocab * h && pos.len() >= plan.positions * h &&
                    types.len() >= plan.type_vocab * h,
                "embedding buffers");
        if (plan.n_items == 0 || h == 0) return;
        float* part = scratch(plan.n_slots * h);
        const float* gp = grad.p;
        const unsigned* op = plan.order.p;
        const int4* ip = reinterpret_cast<const int4*>(plan.items.p);
        const int* sp = plan.slots.p;
        const int4* segp = reinterpret_cast<const int4*>(plan.segments.p);
        float *wp = word.p, *pp = pos.p, *tp = types.p;
        const int ni = (int)plan.n_items, ns = (int)plan.n_segments, h_i = (int)h;
        run(launch_cfg(grid_of(plan.n_items, WARPS), BW_THREADS, 0),
            [&] { rrra_embedding_backward_items_f32(gp, op, ip, sp, ni, h_i, wp, pp, tp, part); });
        if (plan.n_segments > 0)
            run(launch_cfg(grid_of(plan.n_segments, WARPS), BW_THREADS, 0),
                [&] { rrra_embedding_backward_final_f32(segp, ns, h_i, part, wp, pp, tp); });
    }
};

// ---- attention_backward.rs: GpuAttentionBackward ----

struct AttnDropoutPlan { float p; uint64_t seed, step; unsigned layer; const std::vector<uint64_t>* example_ids; };
using AttbKernel = void (*)(const float*, const float*, const float*, const unsigned*, int, int, int, float, float,
                            float, const unsigned*, float*, float*);
using AttbKernelConst = void (*)(const float*, const float*, const float*, const unsigned*, int, int, int, float,
                                 float, float, const unsigned*, const float*, float*);
using AttbKernelBf16 = void (*)(const bf16*, const float*, const float*, const unsigned*, int, int, int, float, float,
                                float, const unsigned*, float*, bf16*);
using AttbKernelBf16Const = void (*)(const bf16*, const float*, const float*, const unsigned*, int, int, int, float,
                                     float, float, const unsigned*, const float*, bf16*);
struct GpuAttentionBackward {
    AttbKernel dq, dq_mma = nullptr;
    AttbKernelConst dkdv, dkdv_mma = nullptr;
    AttbKernelBf16 dq_bf16 = nullptr;  // the tensor-core pair's bf16 twin (MmaKernels::bf16)
    AttbKernelBf16Const dkdv_bf16 = nullptr;
    bool tensor_cores = false;  // use_tensor_cores
    std::pair<size_t, size_t> smem;
    size_t h, heads, dh, max_tokens, max_sequences;
    Slice<unsigned> offsets;
    Slice<float> stats;
    Slice<unsigned> drop_ctr;
    struct Batch { size_t tokens, sequences, max_len; float drop_p, drop_scale; };

    static std::pair<size_t, size_t> smem_bytes(size_t dmax) {
        const size_t ld = dmax + 1, pld = 64 + 1;
        return {(4 * 64 * ld + 64 * pld) * 4, (4 * 64 * ld + 2 * 64 * pld + 2 * 64) * 4};
    }
    GpuAttentionBackward(size_t h_, size_t heads_, size_t max_tokens_, size_t max_sequences_)
        : h(h_), heads(heads_), dh(h_ / heads_), max_tokens(max_tokens_), max_sequences(max_sequences_) {
        REQUIRE(heads > 0 && h % heads == 0 && dh <= 128, "attention backward shape");
        size_t dmax = 128;
        dq = rrra_attention_backward_dq_f32_any;
        dkdv = rrra_attention_backward_dkdv_f32_any;
        if (dh == 32) { dq = rrra_attention_backward_dq_f32_d32; dkdv = rrra_attention_backward_dkdv_f32_d32; dmax = 32; }
        if (dh == 64) { dq = rrra_attention_backward_dq_f32_d64; dkdv = rrra_attention_backward_dkdv_f32_d64; dmax = 64; }
        if (dh == 128) { dq = rrra_attention_backward_dq_f32_d128; dkdv = rrra_attention_backward_dkdv_f32_d128; dmax = 128; }
        if (dh == 32) { dq_mma = rrra_attention_backward_dq_mma_d32; dkdv_mma = rrra_attention_backward_dkdv_mma_d32; }
        if (dh == 64) { dq_mma = rrra_attention_backward_dq_mma_d64; dkdv_mma = rrra_attention_backward_dkdv_mma_d64; }
        if (dh == 128) { dq_mma = rrra_attention_backward_dq_mma_d128; dkdv_mma = rrra_attention_backward_dkdv_mma_d128; }
        if (dh == 32) { dq_bf16 = rrra_attention_backward_dq_mma_bf16_d32; dkdv_bf16 = rrra_attention_backward_dkdv_mma_bf16_d32; }
        if (dh == 64) { dq_bf16 = rrra_attention_backward_dq_mma_bf16_d64; dkdv_bf16 = rrra_attention_backward_dkdv_mma_bf16_d64; }
        if (dh == 128) { dq_bf16 = rrra_attention_backward_dq_mma_bf16_d128; dkdv_bf16 = rrra_attention_backward_dkdv_mma_bf16_d128; }
        smem = smem_bytes(dmax);  // allow_smem raises both functions' limits to these
        offsets = alloc<unsigned>(max_sequences + 1, "attention backward offsets");
        stats = alloc<float>(2 * heads * max_tokens, "attention backward scratch");
        drop_ctr = alloc<unsigned>(4 * max_sequences, "attention backward dropout streams");
    }
    template <class Q>
    Batch prepare(const std::vector<unsigned>& offs, const Slice<Q>& qkv, const Slice<float>* bias,
                  const Slice<float>& dctx, const Slice<Q>& dqkv, const AttnDropoutPlan* dropout) {
        const size_t sequences = offs.size() - 1, tokens = offs.back();
        size_t max_len = 0;
        for (size_t s = 0; s < sequences; ++s) { REQUIRE(offs[s + 1] >= offs[s], "offsets"); max_len = std::max<size_t>(max_len, offs[s + 1] - offs[s]); }
        REQUIRE(offs[0] == 0 && tokens <= max_tokens && sequences <= max_sequences, "attention backward batch");
        REQUIRE(qkv.len() >= tokens * 3 * h && dctx.len() >= tokens * h && dqkv.len() >= tokens * 3 * h &&
                    (!bias || bias->len() >= 3 * h),
                "attention backward buffers");
        float drop_p = 0.0f, drop_scale = 1.0f;
        if (dropout) {
            REQUIRE(dropout->p >= 0.0f && dropout->p < 1.0f && dropout->example_ids->size() == sequences, "attention dropout plan");
            if (dropout->p > 0.0f && tokens > 0) {
                std::vector<unsigned> words;
                for (uint64_t e : *dropout->example_ids) {
                    const auto w = stream_words(dropout->seed, dropout->step, e, dropout->layer, AttentionDropout);
                    words.insert(words.end(), w.begin(), w.end());
                }
                memcpy_htod(words, drop_ctr.p);
                drop_p = dropout->p;
                drop_scale = 1.0f / (1.0f - dropout->p);
            }
        }
        if (tokens > 0) memcpy_htod(offs, offsets.p);
        return {tokens, sequences, max_len, drop_p, drop_scale};
    }
    void launch_one(bool is_dkdv, const Batch& b, const float* qkv, const float* bias, const float* dctx, float* dqkv) {
        const unsigned* offs = offsets.p;
        float* st = stats.p;
        const unsigned* ctr = b.drop_p > 0.0f ? drop_ctr.p : nullptr;
        const int tokens = (int)b.tokens, h_i = (int)h, dh_i = (int)dh;
        const float scale = 1.0f / std::sqrt((float)dh);
        const float dp = b.drop_p, ds = b.drop_scale;
        const bool mma = tensor_cores && dq_mma;
        const size_t sm = mma ? 0 : is_dkdv ? smem.second : smem.first;
        LaunchConfig cfg = launch_cfg((b.max_len + 63) / 64, mma ? 128 : 256, sm);
        cfg.gy = (unsigned)heads;
        cfg.gz = (unsigned)b.sequences;
        const AttbKernel fq = mma ? dq_mma : dq;
        const AttbKernelConst fkv = mma ? dkdv_mma : dkdv;
        if (is_dkdv)
            run(cfg, [&] { fkv(qkv, bias, dctx, offs, tokens, h_i, dh_i, scale, dp, ds, ctr, st, dqkv); }, (unsigned)sm);
        else
            run(cfg, [&] { fq(qkv, bias, dctx, offs, tokens, h_i, dh_i, scale, dp, ds, ctr, st, dqkv); }, (unsigned)sm);
    }
    void backward(const std::vector<unsigned>& offs, const Slice<float>& qkv, const Slice<float>* bias,
                  const Slice<float>& dctx, const AttnDropoutPlan* dropout, Slice<float>& dqkv) {
        const Batch b = prepare(offs, qkv, bias, dctx, dqkv, dropout);
        if (b.tokens == 0) return;
        launch_one(false, b, qkv.p, bias ? bias->p : nullptr, dctx.p, dqkv.p);
        launch_one(true, b, qkv.p, bias ? bias->p : nullptr, dctx.p, dqkv.p);
    }
    // backward_bf16: bf16 QKV and dQKV, the twin pair whatever use_tensor_cores says
    void backward_bf16(const std::vector<unsigned>& offs, const Slice<bf16>& qkv, const Slice<float>* bias,
                       const Slice<float>& dctx, const AttnDropoutPlan* dropout, Slice<bf16>& dqkv) {
        REQUIRE(dq_bf16 != nullptr, "no tensor-core kernels for head dim %zu", dh);
        const Batch b = prepare(offs, qkv, bias, dctx, dqkv, dropout);
        if (b.tokens == 0) return;
        const unsigned* op = offsets.p;
        float* st = stats.p;
        const unsigned* ctr = b.drop_p > 0.0f ? drop_ctr.p : nullptr;
        const int tokens = (int)b.tokens, h_i = (int)h, dh_i = (int)dh;
        const float scale = 1.0f / std::sqrt((float)dh);
        const float dp = b.drop_p, ds = b.drop_scale;
        LaunchConfig cfg = launch_cfg((b.max_len + 63) / 64, 128, 0);
        cfg.gy = (unsigned)heads;
        cfg.gz = (unsigned)b.sequences;
        const float* bp = bias ? bias->p : nullptr;
        const bf16* q = qkv.p;
        bf16* d = dqkv.p;
        run(cfg, [&] { dq_bf16(q, bp, dctx.p, op, tokens, h_i, dh_i, scale, dp, ds, ctr, st, d); });
        run(cfg, [&] { dkdv_bf16(q, bp, dctx.p, op, tokens, h_i, dh_i, scale, dp, ds, ctr, st, d); });
    }
};

// ---- encoder.rs: AttentionKernel (Precision::F32) ----

using AttnF32 = void (*)(RRRA_ATTN_ARGS(float));
struct AttentionKernel {
    AttnF32 f;
    unsigned rows, smem;
    static unsigned simt_attention_smem_bytes(int dh) {
        const int bq = 64, bk = dh == 128 ? 32 : 64, warps = 4, ps = 20, qs = dh + 4;
        return 4 * (bq * qs + bk * qs + bk * dh + warps * bk * ps);
    }
    static AttentionKernel load(const Config& cfg) {
        const int dh = cfg.head_dim();
        const bool tiled = dh == 32 || dh == 64 || dh == 128;
        AttnF32 f = rrra_attention_varlen_f32_any;
        if (dh == 32) f = rrra_attention_varlen_f32_d32;
        if (dh == 64) f = rrra_attention_varlen_f32_d64;
        if (dh == 128) f = rrra_attention_varlen_f32_d128;
        return {f, tiled ? 64u : 4u, tiled ? simt_attention_smem_bytes(dh) : 0u};  // the limit raised to smem
    }
    void launch(const Config& cfg, const float* qkv, const float* bias, const unsigned* offsets, size_t sequences,
                size_t max_len, float* ctx) const {
        const int h = cfg.h, dh = cfg.head_dim();
        const float scale_log2e = 1.44269504088896340736f / std::sqrt((float)cfg.head_dim());  // LOG2_E / sqrt(dh)
        LaunchConfig c{std::max(((unsigned)max_len + rows - 1) / rows, 1u), (unsigned)cfg.heads, (unsigned)sequences, 128, smem};
        const AttnF32 fn = f;
        run(c, [&] { fn(qkv, bias, offsets, h, dh, scale_log2e, ctx); }, std::max(smem, DEFAULT_SMEM));
    }
};

// ---- encoder_train.rs: GpuTrainableEncoder ----

namespace t {
constexpr size_t QKV_W = 0, QKV_B = 1, ATTN_OUT_W = 2, ATTN_OUT_B = 3, ATTN_LN_G = 4, ATTN_LN_B = 5, INTER_W = 6,
                 INTER_B = 7, OUT_W = 8, OUT_B = 9, OUT_LN_G = 10, OUT_LN_B = 11, PER_LAYER = 12, EMBEDDING = 5,
                 WORD = 0, POS = 1, TYPE = 2, EMB_LN_G = 3, EMB_LN_B = 4;
}
constexpr unsigned THREADS = 256;
constexpr size_t DROPOUT_ATTENTION_MAX_LEN = 512;

static size_t site_slot(size_t layer, Site site) {
    switch (site) {
        case EmbeddingDropout: return 0;
        case AttentionDropout: return 1 + 3 * layer;
        case AttentionOutputDropout: return 2 + 3 * layer;
        case FfnOutputDropout: return 3 + 3 * layer;
    }
    abort();
}

struct PackedBatch { std::vector<unsigned> ids, type_ids; std::vector<size_t> offsets; };
enum class SliceId { DsA, DsB, Dctx, Dmid, Dqkv };

struct GpuTrainableEncoder {
    struct LayerActs { Slice<float> qkv, ctx, s1, x1, mid_pre, s2; };
    struct Batch {
        size_t tokens, sequences;
        std::vector<unsigned> offsets;
        EmbeddingGradPlan plan;
        DropoutPlan dropout;
        std::vector<uint64_t> example_ids;
    };
    Config cfg;
    Pooling pooling;
    bool normalize;
    AttentionKernel attention;
    GpuBackward bw;
    GpuAttentionBackward attn_bw;
    size_t max_tokens, max_sequences;
    std::vector<Slice<float>> w, g;
    Slice<unsigned> ids, type_ids, offsets, drop_words;
    Slice<float> emb_sum;
    std::vector<Slice<float>> inputs;
    std::vector<LayerActs> layers;
    Slice<float> pooled, embeddings, mid, d_emb, d_pooled, dx, ds_a, ds_b, dctx, dqkv, dmid;
    std::optional<Batch> last;
    // GemmMath::Bf16 with a tiled head dim: bf16 activations (LayerActsBf16, Bf16Acts)
    struct LayerActsBf16 { Slice<bf16> x, qkv, ctx; Slice<float> s1; Slice<bf16> x1, mid_pre; Slice<float> s2; };
    struct Bf16Acts {
        std::vector<LayerActsBf16> layers;
        std::vector<std::array<Slice<bf16>, 4>> weights;
        bool weights_current = false;
        Slice<float> x1;
        Slice<bf16> mid, dy, dmid;
    };
    std::optional<Bf16Acts> mixed;
    static constexpr size_t LINEAR_WEIGHTS[4] = {t::QKV_W, t::ATTN_OUT_W, t::INTER_W, t::OUT_W};

    // set_gemm_math(GemmMath::Bf16) for a tiled head dim: allocate_activations(true)
    void set_gemm_math_bf16() {
        const int dh = cfg.head_dim();
        if (!(dh == 32 || dh == 64 || dh == 128)) return;
        last.reset();
        inputs.clear();
        layers.clear();
        mixed.reset();
        const size_t h = cfg.h, inter = cfg.inter, nl = cfg.layers, mt = max_tokens;
        auto buf = [](size_t n, const char* what) { return alloc<float>(n, what); };
        auto half = [](size_t n, const char* what) { return alloc<bf16>(n, what); };
        mid = buf(1, "FFN activations");
        dmid = buf(1, "FFN gradients");
        for (int i = 0; i < 3; ++i) inputs.push_back(buf(mt * h, "layer inputs"));
        Bf16Acts m;
        for (size_t l = 0; l < nl; ++l) {
            m.layers.push_back({half(mt * h, "bf16 layer inputs"), half(mt * 3 * h, "bf16 QKV projections"),
                                half(mt * h, "bf16 attention contexts"), buf(mt * h, "attention sums"),
                                half(mt * h, "bf16 attention outputs"), half(mt * inter, "bf16 FFN pre-activations"),
                                buf(mt * h, "FFN sums")});
            std::array<Slice<bf16>, 4> ws;
            for (int i = 0; i < 4; ++i) ws[i] = half(layer_w(l, LINEAR_WEIGHTS[i]).len(), "bf16 working weights");
            m.weights.push_back(ws);
        }
        m.x1 = buf(mt * h, "attention outputs");
        m.mid = half(mt * inter, "bf16 FFN activations");
        m.dy = half(mt * 3 * h, "bf16 output gradients");
        m.dmid = half(mt * inter, "bf16 FFN gradients");
        mixed = std::move(m);
    }
    size_t input_slot(size_t l) const {
        const size_t nl = cfg.layers;
        if (inputs.size() == nl + 1) return l;
        return l == nl ? 2 : l % 2;
    }

    GpuTrainableEncoder(const Config& c, const std::vector<std::vector<float>>& host, Pooling pooling_, bool normalize_,
                        size_t mt, size_t ms)
        : cfg(c), pooling(pooling_), normalize(normalize_), attention(AttentionKernel::load(c)),
          attn_bw(c.h, c.heads, mt, ms), max_tokens(mt), max_sequences(ms) {
        REQUIRE(mt > 0 && ms > 0 && ms <= 65535, "buffer sizes");
        const size_t h = cfg.h, inter = cfg.inter, nl = cfg.layers;
        for (const auto& tns : host) {
            w.push_back(upload(tns, "encoder weights"));
            g.push_back(alloc<float>(tns.size(), "encoder gradients"));
        }
        auto buf = [](size_t n, const char* what) { return alloc<float>(n, what); };
        for (size_t i = 0; i <= nl; ++i) inputs.push_back(buf(mt * h, "layer inputs"));
        for (size_t i = 0; i < nl; ++i)
            layers.push_back({buf(mt * 3 * h, "QKV projections"), buf(mt * h, "attention contexts"),
                              buf(mt * h, "attention sums"), buf(mt * h, "attention outputs"),
                              buf(mt * inter, "FFN pre-activations"), buf(mt * h, "FFN sums")});
        ids = alloc<unsigned>(mt, "token ids");
        type_ids = alloc<unsigned>(mt, "token type ids");
        offsets = alloc<unsigned>(ms + 1, "sequence offsets");
        drop_words = alloc<unsigned>((1 + 3 * nl) * ms * 4, "dropout streams");
        emb_sum = buf(mt * h, "embedding sums");
        pooled = buf(ms * h, "pooled vectors");
        embeddings = buf(ms * h, "embeddings");
        mid = buf(mt * inter, "FFN activations");
        d_emb = buf(ms * h, "embedding gradients");
        d_pooled = buf(ms * h, "pooled gradients");
        dx = buf(mt * h, "hidden gradients");
        ds_a = buf(mt * h, "hidden gradients (a)");
        ds_b = buf(mt * h, "hidden gradients (b)");
        dctx = buf(mt * h, "context gradients");
        dqkv = buf(mt * 3 * h, "QKV gradients");
        dmid = buf(mt * inter, "FFN gradients");
    }
    const Slice<float>& layer_w(size_t l, size_t i) const { return w[t::EMBEDDING + l * t::PER_LAYER + i]; }

    std::vector<float> forward_train(const PackedBatch& batch, const std::vector<uint64_t>& example_ids,
                                     const DropoutPlan& dropout) {
        last.reset();
        Batch b = upload_batch(batch, example_ids, dropout);
        const size_t h = cfg.h, inter = cfg.inter, tok = b.tokens;
        const float eps = (float)cfg.eps;
        const unsigned *idp = ids.p, *tyd = type_ids.p, *offs = offsets.p;
        const float *we = w[t::WORD].p, *pe = w[t::POS].p, *te = w[t::TYPE].p;
        const int hi = (int)h;
        float* es = emb_sum.p;
        run(launch_cfg(b.sequences, THREADS, 0), [&] { rrra_train_embed_sum_f32(idp, tyd, offs, we, pe, te, hi, es); });
        float* x0 = inputs[0].p;
        layernorm(es, w[t::EMB_LN_G].p, w[t::EMB_LN_B].p, eps, tok, x0);
        const float hidden_p = b.dropout.hidden;
        if (hidden_p > 0.0f) dropout_launch(x0, x0, b, h, hidden_p, site_slot(0, EmbeddingDropout));
        size_t max_len = 0;
        for (size_t s = 0; s + 1 < b.offsets.size(); ++s) max_len = std::max<size_t>(max_len, b.offsets[s + 1] - b.offsets[s]);
        if (mixed) forward_layers_bf16(b, max_len, *mixed);
        else for (size_t l = 0; l < (size_t)cfg.layers; ++l) forward_layer_f32(l, b, max_len);
        float* hidden = inputs[input_slot(cfg.layers)].p;
        pool(hidden, b.sequences, false, pooled.p);
        pool(hidden, b.sequences, normalize, embeddings.p);
        std::vector<float> out(embeddings.p, embeddings.p + b.sequences * h);
        last = std::move(b);
        return out;
    }

    void forward_layer_f32(size_t l, const Batch& b, size_t max_len) {
        const size_t h = cfg.h, inter = cfg.inter, tok = b.tokens;
        const float eps = (float)cfg.eps;
        const unsigned* offs = offsets.p;
        float* x = inputs[l].p;
        const LayerActs& a = layers[l];
        float *qkv = a.qkv.p, *ctx = a.ctx.p, *s1 = a.s1.p, *x1 = a.x1.p, *mid_pre = a.mid_pre.p, *s2 = a.s2.p,
              *m = mid.p;
        auto wp = [&](size_t i) { return layer_w(l, i).p; };
        linear(x, tok, h, wp(t::QKV_W), 3 * h, qkv);
        if (b.dropout.attention > 0.0f) {
            attention_dropout(qkv, wp(t::QKV_B), b, max_len, site_slot(l, AttentionDropout), ctx);
        } else {
            attention.launch(cfg, qkv, wp(t::QKV_B), offs, b.sequences, max_len, ctx);
        }
        linear(ctx, tok, h, wp(t::ATTN_OUT_W), h, s1);
        bias_residual(s1, wp(t::ATTN_OUT_B), x, b, h, site_slot(l, AttentionOutputDropout));
        layernorm(s1, wp(t::ATTN_LN_G), wp(t::ATTN_LN_B), eps, tok, x1);
        linear(x1, tok, h, wp(t::INTER_W), inter, mid_pre);
        bias_gelu(mid_pre, wp(t::INTER_B), tok, inter, m);
        linear(m, tok, inter, wp(t::OUT_W), h, s2);
        bias_residual(s2, wp(t::OUT_B), x1, b, h, site_slot(l, FfnOutputDropout));
        layernorm(s2, wp(t::OUT_LN_G), wp(t::OUT_LN_B), eps, tok, inputs[l + 1].p);
    }

    // forward_layers_bf16 / forward_layer_bf16
    void forward_layers_bf16(const Batch& b, size_t max_len, Bf16Acts& m) {
        if (!m.weights_current) {
            for (size_t l = 0; l < m.weights.size(); ++l)
                for (int i = 0; i < 4; ++i) {
                    const Slice<float>& wt = layer_w(l, LINEAR_WEIGHTS[i]);
                    to_bf16(wt.p, wt.len(), m.weights[l][i].p);
                }
            m.weights_current = true;
        }
        to_bf16(inputs[0].p, b.tokens * cfg.h, m.layers[0].x.p);
        for (size_t l = 0; l < (size_t)cfg.layers; ++l) forward_layer_bf16(l, b, max_len, m);
    }
    void forward_layer_bf16(size_t l, const Batch& b, size_t max_len, Bf16Acts& m) {
        const size_t h = cfg.h, inter = cfg.inter, tok = b.tokens;
        const float eps = (float)cfg.eps;
        auto wp = [&](size_t i) { return layer_w(l, i).p; };
        LayerActsBf16& a = m.layers[l];
        auto wb = [&](int i) { return m.weights[l][i].p; };
        float* x = inputs[input_slot(l)].p;
        gemm_row_major_bf16(false, true, tok, 3 * h, h, a.x.p, wb(0), 0.0f, a.qkv.p);
        attention_mma_bf16(a.qkv.p, wp(t::QKV_B), b, max_len, site_slot(l, AttentionDropout), a.ctx.p);
        gemm_row_major_bf16(false, true, tok, h, h, a.ctx.p, wb(1), 0.0f, a.s1.p);
        bias_residual(a.s1.p, wp(t::ATTN_OUT_B), x, b, h, site_slot(l, AttentionOutputDropout));
        layernorm(a.s1.p, wp(t::ATTN_LN_G), wp(t::ATTN_LN_B), eps, tok, m.x1.p, a.x1.p);
        gemm_row_major_bf16(false, true, tok, inter, h, a.x1.p, wb(2), 0.0f, a.mid_pre.p);
        bias_gelu(a.mid_pre.p, wp(t::INTER_B), tok, inter, m.mid.p);
        gemm_row_major_bf16(false, true, tok, h, inter, m.mid.p, wb(3), 0.0f, a.s2.p);
        bias_residual(a.s2.p, wp(t::OUT_B), m.x1.p, b, h, site_slot(l, FfnOutputDropout));
        bf16* out16 = l + 1 < m.layers.size() ? m.layers[l + 1].x.p : nullptr;
        layernorm(a.s2.p, wp(t::OUT_LN_G), wp(t::OUT_LN_B), eps, tok, inputs[input_slot(l + 1)].p, out16);
    }

    void backward(const std::vector<float>& d_embeddings, std::vector<std::vector<float>>& grads) {
        zero_grads();
        backward_on_device(d_embeddings);
        add_grads_to(grads);
    }
    void add_grads_to(std::vector<std::vector<float>>& grads) const {
        REQUIRE(grads.size() == g.size(), "gradient accumulator");
        for (size_t i = 0; i < g.size(); ++i) {
            REQUIRE(grads[i].size() == g[i].len(), "gradient tensor %zu", i);
            for (size_t j = 0; j < grads[i].size(); ++j) grads[i][j] += g[i].p[j];
        }
    }
    void zero_grads() { for (auto& s : g) std::fill_n(s.p, s.len(), 0.0f); }
    void accumulate_backward(const std::vector<float>& d_embeddings) { backward_on_device(d_embeddings); }
    void backward_on_device(const std::vector<float>& d_embeddings) {
        REQUIRE(last.has_value(), "the encoder's backward needs a forward first");
        Batch b = std::move(*last);
        last.reset();
        backward_batch(b, d_embeddings);
    }

    void backward_batch(const Batch& b, const std::vector<float>& d_embeddings) {
        const size_t h = cfg.h, inter = cfg.inter, tok = b.tokens, seqs = b.sequences;
        const float eps = (float)cfg.eps;
        const float hidden_p = b.dropout.hidden;
        REQUIRE(d_embeddings.size() == seqs * h, "embedding gradient size");
        memcpy_htod(d_embeddings, d_emb.p);
        if (normalize) {
            bw.l2_normalize(pooled, &d_emb, seqs, h, d_pooled);
        } else {
            std::memcpy(d_pooled.p, d_emb.p, seqs * h * sizeof(float));
        }
        const Slice<float>& hidden = inputs[input_slot(cfg.layers)];
        bw.pool(pooling, d_pooled, &hidden, offsets, seqs, tok, h, dx);
        for (size_t l = cfg.layers; l-- > 0;) {
            if (mixed) backward_layer_bf16(l, b, *mixed);
            else backward_layer_f32(l, b);
        }
        if (hidden_p > 0.0f) dropout_launch(dx.p, dx.p, b, h, hidden_p, site_slot(0, EmbeddingDropout));
        layernorm_backward(t::EMB_LN_G, emb_sum, dx, ds_a, tok, h, eps);
        const DeviceEmbeddingPlan plan = upload_on(b.plan);
        bw.embedding(plan, ds_a, h, g[t::WORD], g[t::POS], g[t::TYPE]);
    }

    void backward_layer_f32(size_t l, const Batch& b) {
        const size_t h = cfg.h, inter = cfg.inter, tok = b.tokens;
        const float eps = (float)cfg.eps;
        const float hidden_p = b.dropout.hidden;
        const size_t base = t::EMBEDDING + l * t::PER_LAYER;
        auto gi = [&](size_t i) { return base + i; };
        layernorm_backward(gi(t::OUT_LN_G), layers[l].s2, dx, ds_a, tok, h, eps);
        SliceId d_ffn = SliceId::DsA;
        if (hidden_p > 0.0f) {
            dropout_launch(dctx.p, ds_a.p, b, h, hidden_p, site_slot(l, FfnOutputDropout));
            d_ffn = SliceId::Dctx;
        }
        gelu(layers[l].mid_pre.p, tok * inter, mid.p);
        linear_backward(mid.p, tok, inter, gi(t::OUT_W), gi(t::OUT_B), h, d_ffn, dmid.p);
        bw.gelu(layers[l].mid_pre, dmid, tok * inter);
        linear_backward(layers[l].x1.p, tok, h, gi(t::INTER_W), gi(t::INTER_B), inter, SliceId::Dmid, ds_b.p);
        add(ds_b.p, ds_a.p, tok * h);
        layernorm_backward(gi(t::ATTN_LN_G), layers[l].s1, ds_b, ds_a, tok, h, eps);
        SliceId d_attn = SliceId::DsA;
        if (hidden_p > 0.0f) {
            dropout_launch(ds_b.p, ds_a.p, b, h, hidden_p, site_slot(l, AttentionOutputDropout));
            d_attn = SliceId::DsB;
        }
        linear_backward(layers[l].ctx.p, tok, h, gi(t::ATTN_OUT_W), gi(t::ATTN_OUT_B), h, d_attn, dctx.p);
        AttnDropoutPlan plan{b.dropout.attention, b.dropout.seed, b.dropout.step, (unsigned)l + 1, &b.example_ids};
        attn_bw.backward(b.offsets, layers[l].qkv, &w[gi(t::QKV_B)], dctx,
                         b.dropout.attention > 0.0f ? &plan : nullptr, dqkv);
        linear_backward(inputs[l].p, tok, h, gi(t::QKV_W), gi(t::QKV_B), 3 * h, SliceId::Dqkv, dx.p);
        add(dx.p, ds_a.p, tok * h);
    }
    // backward_layer_bf16
    void backward_layer_bf16(size_t l, const Batch& b, Bf16Acts& m) {
        const size_t h = cfg.h, inter = cfg.inter, tok = b.tokens;
        const float eps = (float)cfg.eps;
        const float hidden_p = b.dropout.hidden;
        auto gi = [&](size_t i) { return t::EMBEDDING + l * t::PER_LAYER + i; };
        LayerActsBf16& a = m.layers[l];
        auto wb = [&](int i) { return m.weights[l][i].p; };
        layernorm_backward(gi(t::OUT_LN_G), a.s2, dx, ds_a, tok, h, eps);
        SliceId d_ffn = SliceId::DsA;
        if (hidden_p > 0.0f) {
            dropout_launch(dctx.p, ds_a.p, b, h, hidden_p, site_slot(l, FfnOutputDropout));
            d_ffn = SliceId::Dctx;
        }
        to_bf16(scratch(d_ffn).p, tok * h, m.dy.p);
        gelu(a.mid_pre.p, tok * inter, m.mid.p);
        linear_backward_bf16(m.mid.p, tok, inter, wb(3), gi(t::OUT_W), h, m.dy.p, m.dmid.p);
        bw.bias(scratch(d_ffn), tok, h, g[gi(t::OUT_B)], true);
        bw.gelu(a.mid_pre, m.dmid, tok * inter);
        linear_backward_bf16(a.x1.p, tok, h, wb(2), gi(t::INTER_W), inter, m.dmid.p, ds_b.p);
        bw.bias(m.dmid, tok, inter, g[gi(t::INTER_B)], true);
        add(ds_b.p, ds_a.p, tok * h);
        layernorm_backward(gi(t::ATTN_LN_G), a.s1, ds_b, ds_a, tok, h, eps);
        SliceId d_attn = SliceId::DsA;
        if (hidden_p > 0.0f) {
            dropout_launch(ds_b.p, ds_a.p, b, h, hidden_p, site_slot(l, AttentionOutputDropout));
            d_attn = SliceId::DsB;
        }
        to_bf16(scratch(d_attn).p, tok * h, m.dy.p);
        linear_backward_bf16(a.ctx.p, tok, h, wb(1), gi(t::ATTN_OUT_W), h, m.dy.p, dctx.p);
        bw.bias(scratch(d_attn), tok, h, g[gi(t::ATTN_OUT_B)], true);
        AttnDropoutPlan plan{b.dropout.attention, b.dropout.seed, b.dropout.step, (unsigned)l + 1, &b.example_ids};
        attn_bw.backward_bf16(b.offsets, a.qkv, &w[gi(t::QKV_B)], dctx, b.dropout.attention > 0.0f ? &plan : nullptr, m.dy);
        linear_backward_bf16(a.x.p, tok, h, wb(0), gi(t::QKV_W), 3 * h, m.dy.p, dx.p);
        bw.bias(m.dy, tok, 3 * h, g[gi(t::QKV_B)], true);
        add(dx.p, ds_a.p, tok * h);
    }
    // linear_backward_bf16: dx = dy·W (its type), ∂W += dyᵀ·x in f32
    template <class TX>
    void linear_backward_bf16(const bf16* x, size_t rows, size_t inp, const bf16* wt, size_t w_index, size_t out,
                              const bf16* dy, TX* dxp) {
        gemm_row_major_bf16(false, false, rows, inp, out, dy, wt, 0.0f, dxp);
        gemm_row_major_bf16(true, false, out, inp, rows, dy, x, 1.0f, g[w_index].p);
    }
    Slice<float>& scratch(SliceId id) {
        switch (id) {
            case SliceId::DsA: return ds_a;
            case SliceId::DsB: return ds_b;
            case SliceId::Dctx: return dctx;
            case SliceId::Dmid: return dmid;
            case SliceId::Dqkv: return dqkv;
        }
        abort();
    }

    Batch upload_batch(const PackedBatch& batch, const std::vector<uint64_t>& example_ids, const DropoutPlan& dropout) {
        const size_t tokens = batch.ids.size(), sequences = batch.offsets.size() - 1;
        REQUIRE(example_ids.size() == sequences, "one example id per sequence");
        REQUIRE(dropout.hidden >= 0 && dropout.hidden < 1 && dropout.attention >= 0 && dropout.attention < 1, "dropout p");
        size_t longest = 0;
        for (size_t s = 0; s < sequences; ++s) longest = std::max(longest, batch.offsets[s + 1] - batch.offsets[s]);
        REQUIRE(!(dropout.attention > 0.0f && longest > DROPOUT_ATTENTION_MAX_LEN), "attention dropout length");
        REQUIRE(tokens <= max_tokens && sequences <= max_sequences && sequences > 0, "batch over the buffers");
        EmbeddingGradPlan plan = plan_new(batch.ids, batch.type_ids, batch.offsets, cfg.vocab, cfg.positions, cfg.types);
        std::vector<unsigned> offs(batch.offsets.begin(), batch.offsets.end());
        if (tokens > 0) { memcpy_htod(batch.ids, ids.p); memcpy_htod(batch.type_ids, type_ids.p); }
        memcpy_htod(offs, offsets.p);
        if (dropout.hidden > 0.0f || dropout.attention > 0.0f) {
            std::vector<unsigned> words;
            auto push = [&](unsigned layer, Site site) {
                for (uint64_t e : example_ids) {
                    const auto sw = stream_words(dropout.seed, dropout.step, e, layer, site);
                    words.insert(words.end(), sw.begin(), sw.end());
                }
            };
            push(0, EmbeddingDropout);
            for (unsigned l = 0; l < (unsigned)cfg.layers; ++l) {
                push(l + 1, AttentionDropout);
                push(l + 1, AttentionOutputDropout);
                push(l + 1, FfnOutputDropout);
            }
            REQUIRE(words.size() <= drop_words.len(), "dropout words");
            memcpy_htod(words, drop_words.p);
        }
        return {tokens, sequences, offs, std::move(plan), dropout, example_ids};
    }
    const unsigned* words_at(const Batch& b, size_t slot) const { return drop_words.p + slot * b.sequences * 4; }

    void dropout_launch(float* dst, const float* src, const Batch& b, size_t width, float p, size_t slot) {
        const unsigned *offs = offsets.p, *words = words_at(b, slot);
        const int wd = (int)width;
        const float scale = 1.0f / (1.0f - p);
        run(launch_cfg(b.sequences, THREADS, 0), [&] { rrra_train_dropout_f32(dst, src, offs, words, wd, p, scale); });
    }
    void attention_dropout(const float* qkv, const float* bias, const Batch& b, size_t max_len, size_t slot, float* ctx) {
        const unsigned *offs = offsets.p, *words = words_at(b, slot);
        const int h = cfg.h, dh = cfg.head_dim();
        const float scale = 1.0f / std::sqrt((float)cfg.head_dim());
        const float p = b.dropout.attention;
        const float keep_scale = 1.0f / (1.0f - p);
        LaunchConfig c{(unsigned)std::max<size_t>((max_len + 7) / 8, 1), (unsigned)cfg.heads, (unsigned)b.sequences, THREADS, 0};
        run(c, [&] { rrra_train_attention_dropout_f32(qkv, bias, offs, words, h, dh, scale, p, keep_scale, ctx); });
    }
    // attention_bf16 → attention_mma with the bf16 twin
    void attention_mma_bf16(const bf16* qkv, const float* bias, const Batch& b, size_t max_len, size_t slot, bf16* ctx) {
        using Mma = void (*)(const bf16*, const float*, const unsigned*, const unsigned*, int, float, float, float, bf16*);
        const int dh = cfg.head_dim();
        const Mma f = dh == 32 ? rrra_attention_train_mma_bf16_d32 : dh == 64 ? rrra_attention_train_mma_bf16_d64 : rrra_attention_train_mma_bf16_d128;
        const unsigned *offs = offsets.p, *words = words_at(b, slot);
        const int h = cfg.h;
        const float scale_log2e = 1.44269504088896340736f / std::sqrt((float)dh);
        const float p = b.dropout.attention;
        const float keep_scale = p > 0.0f ? 1.0f / (1.0f - p) : 1.0f;
        LaunchConfig c{(unsigned)std::max<size_t>((max_len + 63) / 64, 1), (unsigned)cfg.heads, (unsigned)b.sequences, 128, 0};
        run(c, [&] { f(qkv, bias, offs, words, h, scale_log2e, p, keep_scale, ctx); });
    }
    void linear(const float* x, size_t rows, size_t inp, const float* wt, size_t out, float* y) {
        sgemm_row_major(false, true, rows, out, inp, x, wt, 0.0f, y);
    }
    void linear_backward(const float* x, size_t rows, size_t inp, size_t w_index, size_t b_index, size_t out, SliceId dy,
                         float* dxp) {
        const Slice<float>* dy_slice = nullptr;
        switch (dy) {
            case SliceId::DsA: dy_slice = &ds_a; break;
            case SliceId::DsB: dy_slice = &ds_b; break;
            case SliceId::Dctx: dy_slice = &dctx; break;
            case SliceId::Dmid: dy_slice = &dmid; break;
            case SliceId::Dqkv: dy_slice = &dqkv; break;
        }
        const float* dy_ptr = dy_slice->p;
        const float *wt = w[w_index].p;
        float* gw = g[w_index].p;
        if (dxp) sgemm_row_major(false, false, rows, inp, out, dy_ptr, wt, 0.0f, dxp);
        sgemm_row_major(true, false, out, inp, rows, dy_ptr, x, 1.0f, gw);
        bw.bias(*dy_slice, rows, out, g[b_index], true);
    }
    void layernorm(const float* s, const float* gm, const float* bt, float eps, size_t rows, float* y,
                   bf16* y16 = nullptr) {
        const int r = (int)rows, h = cfg.h;
        const LaunchConfig c = launch_cfg((rows * 32 + THREADS - 1) / THREADS, THREADS, 0);
        if (y16) run(c, [&] { rrra_train_layernorm_f32_bf16(s, gm, bt, eps, r, h, y, y16); });
        else run(c, [&] { rrra_train_layernorm_f32(s, gm, bt, eps, r, h, y); });
    }
    void bias_residual(float* y, const float* bias, const float* r, const Batch& batch, size_t cols, size_t slot) {
        const size_t rows = batch.tokens;
        const float p = batch.dropout.hidden;
        if (p > 0.0f) {
            const unsigned *offs = offsets.p, *words = words_at(batch, slot);
            const int wd = (int)cols;
            const float scale = 1.0f / (1.0f - p);
            run(launch_cfg(batch.sequences, THREADS, 0),
                [&] { rrra_train_bias_dropout_residual_f32(y, bias, r, offs, words, wd, p, scale); });
            return;
        }
        const long long rl = (long long)rows;
        const int c = (int)cols;
        run(grid_stride(rows * cols, THREADS), [&] { rrra_train_bias_residual_f32(y, bias, r, rl, c); });
    }
    void to_bf16(const float* src, size_t n, bf16* dst) {
        const long long nl = (long long)n;
        run(grid_stride(std::max<size_t>(n, 1), THREADS), [&] { rrra_train_to_bf16(src, nl, dst); });
    }
    // bias_gelu and gelu with `bf16`: the kernel of the stored type
    template <class T>
    void bias_gelu(T* pre, const float* bias, size_t rows, size_t cols, T* out) {
        const long long rl = (long long)rows;
        const int c = (int)cols;
        if constexpr (std::is_same_v<T, float>)
            run(grid_stride(rows * cols, THREADS), [&] { rrra_train_bias_gelu_f32(pre, bias, rl, c, out); });
        else
            run(grid_stride(rows * cols, THREADS), [&] { rrra_train_bias_gelu_bf16(pre, bias, rl, c, out); });
    }
    template <class T>
    void gelu(const T* pre, size_t n, T* out) {
        const long long nl = (long long)n;
        if constexpr (std::is_same_v<T, float>)
            run(grid_stride(n, THREADS), [&] { rrra_train_gelu_f32(pre, nl, out); });
        else
            run(grid_stride(n, THREADS), [&] { rrra_train_gelu_bf16(pre, nl, out); });
    }
    void add(float* dst, const float* src, size_t n) {
        const long long nl = (long long)n;
        run(grid_stride(n, THREADS), [&] { rrra_train_add_f32(dst, src, nl); });
    }
    void pool(const float* hidden, size_t sequences, bool norm_on, float* out) {
        const unsigned* offs = offsets.p;
        const int s = (int)sequences, h = cfg.h, norm = norm_on;
        run(launch_cfg(sequences, 256, 0), [&] {
            switch (pooling) {
                case Pooling::Mean: rrra_pool_mean_f32(hidden, offs, s, h, norm, out); break;
                case Pooling::Cls: rrra_pool_cls_f32(hidden, offs, s, h, norm, out); break;
                case Pooling::Max: rrra_pool_max_f32(hidden, offs, s, h, norm, out); break;
            }
        });
    }
    // the free function layernorm_backward: gamma's gradient at `gamma`, beta's at the next
    void layernorm_backward(size_t gamma, const Slice<float>& s, const Slice<float>& dy, Slice<float>& ds, size_t rows,
                            size_t h, float eps) {
        bw.layernorm(s, w[gamma], dy, rows, h, eps, ds, g[gamma], g[gamma + 1], true);
    }
};

// ---- the comparison ----


static double rel_l2(const std::vector<float>& got, const std::vector<float>& want) {
    double num = 0, den = 0;
    for (size_t i = 0; i < want.size(); ++i) {
        num += ((double)got[i] - want[i]) * ((double)got[i] - want[i]);
        den += (double)want[i] * want[i];
    }
    return std::sqrt(num / std::max(den, 1e-300));
}

static std::string tensor_name(size_t i) {
    static const char* emb[] = {"word_emb", "pos_emb", "type_emb", "emb_ln_g", "emb_ln_b"};
    static const char* lay[] = {"qkv_w", "qkv_b", "attn_out_w", "attn_out_b", "attn_ln_g", "attn_ln_b",
                                "inter_w", "inter_b", "out_w", "out_b", "out_ln_g", "out_ln_b"};
    if (i < 5) return emb[i];
    return "layer " + std::to_string((i - 5) / 12) + " " + lay[(i - 5) % 12];
}

int main(int argc, char** argv) {
    if (argc != 2 && argc != 3) { fprintf(stderr, "usage: encoder_step REFERENCE_DIR [CASE]\n"); return 2; }
    const int only = argc == 3 ? atoi(argv[2]) : -1;
    Reader r(std::string(argv[1]) + "/encoder_step.bin");
    const auto t0 = std::chrono::steady_clock::now();
    for (int c = 0; r.more(); ++c) {
        const auto shape = r.next();
        Config cfg{(int)shape[0], (int)shape[1], (int)shape[2], (int)shape[3], (int)shape[4], (int)shape[5], (int)shape[6], shape[7]};
        const Pooling pooling = (Pooling)(int)shape[8];
        const bool normalize = shape[9] != 0;
        const DropoutPlan dropout{shape[10], shape[11], (uint64_t)shape[12], (uint64_t)shape[13]};
        const int n_micro = (int)shape[14];
        const float grad_start = shape[15];
        const bool float64 = shape[16] != 0;
        const size_t n_tensors = 5 + 12 * (size_t)cfg.layers;
        std::vector<std::vector<float>> weights, want_grads;
        for (size_t i = 0; i < n_tensors; ++i) weights.push_back(r.next());
        struct Micro { PackedBatch batch; std::vector<uint64_t> example_ids; std::vector<float> d_emb, want_emb; };
        std::vector<Micro> micro(n_micro);
        size_t max_tokens = 0, max_seqs = 0;
        std::string lens_s;
        for (Micro& m : micro) {
            const auto lens = r.next(), idf = r.next(), tyf = r.next(), exf = r.next();
            m.d_emb = r.next();
            m.want_emb = r.next();
            m.batch.offsets = {0};
            for (float l : lens) m.batch.offsets.push_back(m.batch.offsets.back() + (size_t)l);
            for (float v : idf) m.batch.ids.push_back((unsigned)v);
            for (float v : tyf) m.batch.type_ids.push_back((unsigned)v);
            for (float v : exf) m.example_ids.push_back((uint64_t)v);
            max_tokens = std::max(max_tokens, m.batch.ids.size());
            max_seqs = std::max(max_seqs, lens.size());
            lens_s += lens_s.empty() ? "[" : " + [";
            for (size_t i = 0; i < lens.size(); ++i) lens_s += (i ? "," : "") + std::to_string((int)lens[i]);
            lens_s += "]";
        }
        for (size_t i = 0; i < n_tensors; ++i) want_grads.push_back(r.next());
        // the float64 PyTorch embeddings and gradients (tiny-bert), fused as the tensors are
        std::vector<float> f64_emb;
        std::vector<std::vector<float>> f64_grads;
        if (float64) {
            f64_emb = r.next();
            for (size_t i = 0; i < n_tensors; ++i) f64_grads.push_back(r.next());
        }
        if (only >= 0 && c != only) continue;
        static const char* pool_names[] = {"mean", "cls", "max"};
        char tag[240];
        snprintf(tag, sizeof tag, "case %d (h %d, heads %d, %s%s, dropout %g / %g, lengths %s)", c, cfg.h, cfg.heads,
                 pool_names[(int)pooling], normalize ? " + L2" : "", dropout.hidden, dropout.attention, lens_s.c_str());
        const auto c0 = std::chrono::steady_clock::now();
        {
            // buffers larger than the batches (as a trainer sizes them): strides must use the batch's
            GpuTrainableEncoder enc(cfg, weights, pooling, normalize, max_tokens + 13, max_seqs + 3);
            // gradients added to the reference's starting values
            std::vector<std::vector<float>> grads;
            for (const auto& t : weights) grads.push_back(std::vector<float>(t.size(), grad_start));
            // one micro-batch: forward_train + backward; several: zero_grads, then forward_train +
            // accumulate_backward each, then add_grads_to (the resident step's path)
            if (n_micro > 1) enc.zero_grads();
            double worst = 0;
            std::vector<float> enc_emb0;
            for (const Micro& m : micro) {
                const auto emb = enc.forward_train(m.batch, m.example_ids, dropout);
                if (&m == &micro[0]) enc_emb0 = emb;
                // the test's tolerance: embeddings 1e-4 absolute
                ++checks;
                double e_max = emb.size() == m.want_emb.size() ? 0.0 : INFINITY;
                for (size_t i = 0; i < m.want_emb.size() && i < emb.size(); ++i) {
                    const double e = std::fabs((double)emb[i] - m.want_emb[i]);
                    e_max = std::max(e_max, std::isfinite(e) ? e : INFINITY);
                }
                if (!(e_max <= 1e-4)) FAIL("%s embeddings: worst %.2e (tolerance 1e-4)", tag, e_max);
                worst = std::max(worst, e_max);
                if (n_micro > 1) enc.accumulate_backward(m.d_emb);
                else enc.backward(m.d_emb, grads);
            }
            if (n_micro > 1) enc.add_grads_to(grads);
            // the test's tolerance: every gradient tensor finite and within 1e-4 relative L2
            double worst_g = 0;
            std::string worst_at;
            for (size_t i = 0; i < n_tensors; ++i) {
                ++checks;
                bool finite = true;
                for (float v : grads[i]) finite &= std::isfinite(v);
                const double e = rel_l2(grads[i], want_grads[i]);
                if (!finite || !(e <= 1e-4))
                    FAIL("%s %s: relative L2 %.2e%s (tolerance 1e-4)", tag, tensor_name(i).c_str(), e, finite ? "" : ", not finite");
                if (!(e <= worst_g)) { worst_g = e; worst_at = tensor_name(i); }
            }
            if (float64) {
                // the test's float64 checks: embeddings within 1e-5, gradients 1e-4 relative L2
                // (per fused tensor here; the key bias, zero in exact arithmetic, is a third of
                // qkv_b and adds only round-off to it)
                ++checks;
                double e64 = 0;
                for (size_t i = 0; i < f64_emb.size(); ++i) e64 = std::max(e64, std::fabs((double)enc_emb0[i] - f64_emb[i]));
                if (!(e64 < 1e-5)) FAIL("%s embeddings against float64: %.2e (tolerance 1e-5)", tag, e64);
                double w64 = 0;
                for (size_t i = 0; i < n_tensors; ++i) {
                    ++checks;
                    const double e = rel_l2(grads[i], f64_grads[i]);
                    if (!(e <= 1e-4)) FAIL("%s %s against float64: relative L2 %.2e (tolerance 1e-4)", tag, tensor_name(i).c_str(), e);
                    w64 = std::max(w64, std::isfinite(e) ? e : INFINITY);
                }
                printf("%s: against float64 PyTorch, embeddings within %.2e, gradients within %.2e relative L2\n", tag, e64, w64);
            }
            check_guards();
            const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - c0).count();
            printf("%s: embeddings within %.2e, gradients within %.2e relative L2 (worst %s), %.1f s\n", tag, worst,
                   worst_g, worst_at.c_str(), secs);
        }
        free_all();
        const int dh = cfg.head_dim();
        if ((dh == 32 || dh == 64 || dh == 128) && pooling != Pooling::Max) {
            // GemmMath::Bf16's step (micro-batches as above): bf16 activations, weights and
            // product operands, tensor-core attention forward and backward; every stored
            // activation and every operand rounded to bf16 (2^-9 relative each) against the
            // CPU's f32, held to tests/gpu_encoder_train.rs's bf16 bounds (3e-2 absolute,
            // 3e-2 relative L2).
            // Not with max pooling: a rounding that moves a column's maximum to another token
            // sends that column's whole gradient elsewhere (1e-1 relative on the embedding
            // tables here), a discontinuity of max pooling, not an error of the kernel.
            GpuTrainableEncoder enc(cfg, weights, pooling, normalize, max_tokens + 13, max_seqs + 3);
            enc.set_gemm_math_bf16();
            std::vector<std::vector<float>> grads;
            for (const auto& t : weights) grads.push_back(std::vector<float>(t.size(), grad_start));
            if (n_micro > 1) enc.zero_grads();
            double e_max = 0;
            for (const Micro& m : micro) {
                const auto emb = enc.forward_train(m.batch, m.example_ids, dropout);
                ++checks;
                double e = emb.size() == m.want_emb.size() ? 0.0 : INFINITY;
                for (size_t i = 0; i < m.want_emb.size() && i < emb.size(); ++i) {
                    const double d = std::fabs((double)emb[i] - m.want_emb[i]);
                    e = std::max(e, std::isfinite(d) ? d : INFINITY);
                }
                if (!(e <= 3e-2)) FAIL("%s, bf16 activations: embeddings %.2e apart (tolerance 3e-2)", tag, e);
                e_max = std::max(e_max, e);
                if (n_micro > 1) enc.accumulate_backward(m.d_emb);
                else enc.backward(m.d_emb, grads);
            }
            if (n_micro > 1) enc.add_grads_to(grads);
            double worst_g = 0;
            for (size_t i = 0; i < n_tensors; ++i) {
                ++checks;
                const double e = rel_l2(grads[i], want_grads[i]);
                if (!(e <= 3e-2)) FAIL("%s, bf16 activations: %s relative L2 %.2e (tolerance 3e-2)", tag, tensor_name(i).c_str(), e);
                worst_g = std::max(worst_g, std::isfinite(e) ? e : INFINITY);
            }
            check_guards();
            printf("%s, bf16 activations: embeddings within %.2e, gradients within %.2e relative L2\n", tag, e_max, worst_g);
        }
        free_all();
    }
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    printf("encoder_step: %d checks, %d fails (%.1f s)\n", checks, fails, secs);
    return fails != 0;
}
