// Emulates the inference kernels as src/device/encoder.rs and src/device/adapter.rs launch them
// (grids, blocks, dynamic shared memory, arguments, host-side setup transliterated) and compares
// them with the CPU reference's outputs (examples/kernel_reference.rs, `inference`):
//   * kernels/attention.cu: the SIMT f32 and the bf16 tensor-core kernels (d32, d64, d128; the
//     mma.sync / ldmatrix / cp.async helpers from mma_sync.h) and the _any fallbacks;
//   * kernels/adapter.cu: dense candidates with every statistic, and corpus rows gathered by
//     index in f32, f16 and bf16;
//   * kernels/{embeddings,layernorm,gelu,l2norm,pooling}.cu.
// Usage: inference REFERENCE_DIR [FAMILY]. Prints "inference: N checks, M fails"; exits 1 on a
// failure.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>
#include <sys/resource.h>
#include "emu.h"
#include "sized_reader.h"
#ifndef exp2f
#define exp2f(x) std::exp2((float)(x))
#endif
#include "mma_sync.h"
#include "attention.cu"
#include "embeddings.cu"
#include "layernorm.cu"
#include "gelu.cu"
#include "l2norm.cu"
#include "pooling.cu"
#include "adapter.cu"  // last: it defines THREADS, WARPS and TP
#undef THREADS
#undef WARPS
#undef TP

static int checks = 0, fails = 0;


// One check: every |got - want| <= abs + rel * |want| (NaN fails). Prints the worst error.
static void compare(const std::string& what, const std::vector<float>& got, const std::vector<float>& want,
                    double abs, double rel, bool quiet = false) {
    ++checks;
    double worst = 0;
    long bad = 0, first = -1;
    for (size_t i = 0; i < want.size(); ++i) {
        const double e = std::fabs((double)got[i] - want[i]);
        if (!(e <= abs + rel * std::fabs(want[i]))) { if (first < 0) first = (long)i; ++bad; }
        worst = std::max(worst, std::isfinite(e) ? e : INFINITY);
    }
    if (bad) {
        ++fails;
        printf("FAIL %s: %ld of %zu off, first [%ld] %.9g vs %.9g, worst %.3g\n", what.c_str(), bad,
               want.size(), first, got[first], want[first], worst);
    } else if (!quiet) {
        printf("  %-44s worst %.2e\n", what.c_str(), worst);
    }
}

static std::vector<__nv_bfloat16> to_bf16(const std::vector<float>& x) {
    std::vector<__nv_bfloat16> r(x.size());
    for (size_t i = 0; i < x.size(); ++i) r[i] = __float2bfloat16_rn(x[i]);
    return r;
}
static std::vector<float> widen(const std::vector<__nv_bfloat16>& x) {
    std::vector<float> r(x.size());
    for (size_t i = 0; i < x.size(); ++i) r[i] = __bfloat162float(x[i]);
    return r;
}
static std::vector<__nv_bfloat16> bf16_poison(size_t n) { return std::vector<__nv_bfloat16>(n, __nv_bfloat16{0x7fc1}); }
static float max_abs(const std::vector<float>& x) { float m = 0; for (float v : x) m = std::max(m, std::fabs(v)); return m; }

// ---------------------------------------------------------------------------------------------
// attention: AttentionKernel::load and ::launch of src/device/encoder.rs
// ---------------------------------------------------------------------------------------------

using AttnF32 = void (*)(RRRA_ATTN_ARGS(float));
using AttnBf16 = void (*)(RRRA_ATTN_ARGS(bf16));

// simt_attention_smem_bytes
static unsigned simt_attention_smem_bytes(int dh) {
    const int bq = 64, bk = dh == 128 ? 32 : 64, warps = 4, ps = 20, qs = dh + 4;
    return 4 * (bq * qs + bk * qs + bk * dh + warps * bk * ps);
}

static void attention(const std::string& dir) {
    Reader r(dir + "/inference_attention.bin");
    while (r.more()) {
        const auto shape = r.next(), lens = r.next();
        const int dh = (int)shape[0], heads = (int)shape[1], h = dh * heads;
        auto qkv = r.next(), bias = r.next();
        const auto want = r.next(), want_bf = r.next();
        std::vector<unsigned> offs = {0};
        unsigned max_len = 0;
        for (float l : lens) { offs.push_back(offs.back() + (unsigned)l); max_len = std::max(max_len, (unsigned)l); }
        const unsigned seqs = (unsigned)lens.size(), tokens = offs.back();
        const bool tiled = dh == 32 || dh == 64 || dh == 128;
        const unsigned rows = tiled ? 64 : 4;
        const unsigned gx = std::max(1u, (max_len + rows - 1) / rows);
        const float scale_log2e = 1.44269504088896340736f / std::sqrt((float)dh);
        AttnF32 f32k = rrra_attention_varlen_f32_any;
        AttnBf16 bfk = rrra_attention_varlen_bf16_any;
        if (dh == 32) { f32k = rrra_attention_varlen_f32_d32; bfk = rrra_attention_varlen_bf16_d32; }
        if (dh == 64) { f32k = rrra_attention_varlen_f32_d64; bfk = rrra_attention_varlen_bf16_d64; }
        if (dh == 128) { f32k = rrra_attention_varlen_f32_d128; bfk = rrra_attention_varlen_bf16_d128; }
        std::string lstr;
        for (float l : lens) lstr += (lstr.empty() ? "" : ",") + std::to_string((int)l);
        const std::string tag = "attention dh " + std::to_string(dh) + " x" + std::to_string(heads) + " [" + lstr + "]";

        // f32 path: dynamic shared memory as AttentionKernel::load sizes it
        std::vector<float> ctx(tokens * h, NAN);
        launch3(gx, heads, seqs, 128, [&] { f32k(qkv.data(), bias.data(), offs.data(), h, dh, scale_log2e, ctx.data()); },
                tiled ? simt_attention_smem_bytes(dh) : 0);
        // same f32 math in another order (exp2 of log2-scaled scores vs the CPU's polynomial
        // exp, online vs two-pass softmax): ~1e-6 of the output's scale
        const float s = std::max(1.0f, max_abs(want));
        compare(tag + " f32", ctx, want, 1e-5 * s, 0);

        // bf16 path: static shared memory only
        const auto qkv_bf = to_bf16(qkv);
        auto ctx_bf = bf16_poison(tokens * h);
        launch3(gx, heads, seqs, 128, [&] { bfk(qkv_bf.data(), bias.data(), offs.data(), h, dh, scale_log2e, ctx_bf.data()); }, 0);
        // the reference reads the same bf16 inputs in f32; the kernel also rounds the scaled Q,
        // P and the output to bf16 (2^-9 relative each): ~2e-3 of the output's scale
        compare(tag + " bf16", widen(ctx_bf), want_bf, 5e-3 * std::max(1.0f, max_abs(want_bf)), 0);
    }
}

// ---------------------------------------------------------------------------------------------
// adapter: GpuAdapter::{on_stream, score, logits_for_rows, run} of src/device/adapter.rs
// ---------------------------------------------------------------------------------------------

// TILE_PAIRS and SUMS of src/device/adapter.rs (host constants, not the kernel's)
constexpr int TILE_PAIRS_H = 8, SUMS_H = 6;

struct Adapter {
    int d, h, max_pairs;
    float beta, beta0;
    std::vector<float> w_sum_t, b1, w_pair_t, w2_t, b2;
    std::vector<float> queries, u, cands, logits, stats;
    std::vector<unsigned> rows;
    int smem_floats;
    unsigned smem_bytes;
};

static Adapter adapter_new(int d, int h, const std::vector<float>& w1, const std::vector<float>& b1,
                           const std::vector<float>& w2, const std::vector<float>& b2, float beta, float beta0,
                           int max_pairs) {
    Adapter a;
    a.d = d; a.h = h; a.max_pairs = max_pairs; a.beta = beta; a.beta0 = beta0;
    int sf = d + TILE_PAIRS_H * 2 * d + TILE_PAIRS_H * h;
    a.smem_floats = (sf + 1) / 2 * 2;
    a.smem_bytes = a.smem_floats * 4 + (256 / 32) * (TILE_PAIRS_H * SUMS_H + 1) * 8;
    // transposed_weights
    a.w_sum_t.assign(d * h, 0); a.w_pair_t.assign(2 * d * h, 0); a.w2_t.assign(h * d, 0);
    for (int j = 0; j < h; ++j)
        for (int l = 0; l < d; ++l) {
            const float wa = w1[j * 3 * d + l], wb = w1[j * 3 * d + d + l], wc = w1[j * 3 * d + 2 * d + l];
            a.w_sum_t[l * h + j] = wa + wc;
            a.w_pair_t[l * h + j] = wc - wa;
            a.w_pair_t[(d + l) * h + j] = wb;
        }
    for (int i = 0; i < d; ++i)
        for (int j = 0; j < h; ++j) a.w2_t[j * d + i] = w2[i * h + j];
    a.b1 = b1; a.b2 = b2;
    const size_t pairs_d = (size_t)max_pairs * std::max(d, h);
    a.queries.assign(pairs_d, NAN); a.u.assign(pairs_d, NAN); a.cands.assign(pairs_d, NAN);
    a.rows.assign(max_pairs, ~0u); a.logits.assign(max_pairs, NAN); a.stats.assign(max_pairs * 4, NAN);
    return a;
}

static void adapter_run(Adapter& a, const float* qs, int nq, int k, const void* cands, int dtype, const unsigned* rows,
                        bool with_stats) {
    std::copy(qs, qs + nq * a.d, a.queries.begin());
    RrraAdapterArgs args{};
    args.queries = a.queries.data();
    args.candidates = cands;
    args.rows = rows;
    args.u = a.u.data();
    args.w_sum_t = a.w_sum_t.data();
    args.b1 = a.b1.data();
    args.w_pair_t = a.w_pair_t.data();
    args.w2_t = a.w2_t.data();
    args.b2 = a.b2.data();
    args.logits = a.logits.data();
    args.stats = with_stats ? a.stats.data() : nullptr;
    args.d = a.d; args.h = a.h; args.k = k; args.smem_floats = a.smem_floats;
    args.beta = a.beta; args.beta0 = a.beta0;
    launch(nq, 256, [&] { rrra_adapter_query_bias(args); }, a.d * 4);
    const unsigned gx = (k + TILE_PAIRS_H - 1) / TILE_PAIRS_H;
    if (dtype == 0) launch3(gx, nq, 1, 256, [&] { rrra_adapter_pairs_f32(args); }, a.smem_bytes);
    if (dtype == 1) launch3(gx, nq, 1, 256, [&] { rrra_adapter_pairs_f16(args); }, a.smem_bytes);
    if (dtype == 2) launch3(gx, nq, 1, 256, [&] { rrra_adapter_pairs_bf16(args); }, a.smem_bytes);
}

static void adapter(const std::string& dir) {
    Reader r(dir + "/inference_adapter.bin");
    while (r.more()) {
        const auto shape = r.next();
        const int d = (int)shape[0], h = (int)shape[1], nq = (int)shape[2], k = (int)shape[3];
        const int max_pairs = (int)shape[4], nrows = (int)shape[5];
        const auto w1 = r.next(), b1 = r.next(), w2 = r.next(), b2 = r.next(), sc = r.next();
        const auto q = r.next(), c = r.next();
        const auto logit = r.next(), p = r.next(), qa = r.next(), ca = r.next(), alpha = r.next();
        const auto corpus = r.next(), picks_f = r.next();
        const std::string tag = "adapter d " + std::to_string(d) + " h " + std::to_string(h) + " " +
                                std::to_string(nq) + "x" + std::to_string(k) + " (" + std::to_string(max_pairs) + " pairs)";
        Adapter a = adapter_new(d, h, w1, b1, w2, b2, sc[0], sc[1], max_pairs);
        const int per = max_pairs / k;  // queries_per_launch
        // score: dense candidates, uploaded per launch, every statistic
        std::vector<float> g_logit, g_p, g_qa, g_ca, g_alpha;
        for (int q0 = 0; q0 < nq; q0 += per) {
            const int n = std::min(per, nq - q0);
            std::copy(c.begin() + (size_t)q0 * k * d, c.begin() + (size_t)(q0 + n) * k * d, a.cands.begin());
            a.logits.assign(max_pairs, NAN); a.stats.assign(max_pairs * 4, NAN);
            adapter_run(a, q.data() + (size_t)q0 * d, n, k, a.cands.data(), 0, nullptr, true);
            for (int i = 0; i < n * k; ++i) {
                g_logit.push_back(a.logits[i]);
                g_p.push_back(a.stats[4 * i]); g_qa.push_back(a.stats[4 * i + 1]);
                g_ca.push_back(a.stats[4 * i + 2]); g_alpha.push_back(a.stats[4 * i + 3]);
            }
        }
        // tolerances of tests/gpu_adapter.rs
        compare(tag + " logit", g_logit, logit, 2e-5 * (1 + std::fabs(sc[0])), 0);
        compare(tag + " p", g_p, p, 1e-5, 0, true);
        compare(tag + " QA", g_qa, qa, 2e-5, 0, true);
        compare(tag + " CA", g_ca, ca, 2e-5, 0, true);
        compare(tag + " alpha", g_alpha, alpha, 1e-4, 0, true);
        if (k > 1) { ++checks; if (g_alpha[0] != 0.0f) { ++fails; printf("FAIL %s: q = c gives alpha %g\n", tag.c_str(), g_alpha[0]); } }
        // logits_for_rows: the corpus in each element type, gathered by row
        std::vector<unsigned> picks(picks_f.begin(), picks_f.end());
        std::vector<__half> c16(corpus.size());
        for (size_t i = 0; i < corpus.size(); ++i) c16[i] = __float2half_rn(corpus[i]);
        const auto cbf = to_bf16(corpus);
        const void* tables[3] = {corpus.data(), c16.data(), cbf.data()};
        const char* names[3] = {"f32", "f16", "bf16"};
        for (int t = 0; t < 3; ++t) {
            const auto want = r.next();
            std::vector<float> got;
            for (int q0 = 0; q0 < nq; q0 += per) {
                const int n = std::min(per, nq - q0);
                std::copy(picks.begin() + (size_t)q0 * k, picks.begin() + (size_t)(q0 + n) * k, a.rows.begin());
                a.logits.assign(max_pairs, NAN);
                adapter_run(a, q.data() + (size_t)q0 * d, n, k, tables[t], t, a.rows.data(), false);
                got.insert(got.end(), a.logits.begin(), a.logits.begin() + n * k);
            }
            compare(tag + " rows of " + std::to_string(nrows) + " " + names[t], got, want, 2e-5 * (1 + std::fabs(sc[0])), 0);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// row kernels: launch_embed, launch_add_ln, launch_gelu, launch_pool of src/device/encoder.rs;
// the L2 kernel as tests/gpu_runtime.rs launches it
// ---------------------------------------------------------------------------------------------

using EmbedK = void (*)(RRRA_EMBED_ARGS);
using AddLnK = void (*)(RRRA_ADD_LN_ARGS);
static unsigned grid1(unsigned items, unsigned per_block) { return std::max(1u, (items + per_block - 1) / per_block); }

static void rows(const std::string& dir) {
    Reader r(dir + "/inference_rows.bin");
    const float eps = 1e-12f;
    for (int pass = 0; pass < 3; ++pass) {
        const int h = (int)r.next()[0];
        const auto lens = r.next();
        const auto ids_f = r.next(), tys_f = r.next(), word = r.next(), pos = r.next(), ty = r.next();
        const auto gamma = r.next(), beta = r.next(), x = r.next();
        std::vector<unsigned> offs = {0}, ids(ids_f.begin(), ids_f.end()), tys(tys_f.begin(), tys_f.end());
        for (float l : lens) offs.push_back(offs.back() + (unsigned)l);
        const int seqs = (int)lens.size(), toks = (int)offs.back();
        const std::string hs = "h " + std::to_string(h);
        // Kernels::load picks the smallest variant that holds h
        const int sizes[5] = {128, 256, 512, 768, 1024};
        int v = 0;
        while (h > sizes[v]) ++v;
        EmbedK ef[5][2] = {{rrra_embed_layernorm_f32_h128, rrra_embed_layernorm_bf16_h128},
                           {rrra_embed_layernorm_f32_h256, rrra_embed_layernorm_bf16_h256},
                           {rrra_embed_layernorm_f32_h512, rrra_embed_layernorm_bf16_h512},
                           {rrra_embed_layernorm_f32_h768, rrra_embed_layernorm_bf16_h768},
                           {rrra_embed_layernorm_f32_h1024, rrra_embed_layernorm_bf16_h1024}};
        AddLnK af[5][2] = {{rrra_add_layernorm_f32_h128, rrra_add_layernorm_bf16_h128},
                           {rrra_add_layernorm_f32_h256, rrra_add_layernorm_bf16_h256},
                           {rrra_add_layernorm_f32_h512, rrra_add_layernorm_bf16_h512},
                           {rrra_add_layernorm_f32_h768, rrra_add_layernorm_bf16_h768},
                           {rrra_add_layernorm_f32_h1024, rrra_add_layernorm_bf16_h1024}};
        // two-pass LayerNorm in f32 as the CPU, summed in another order: a few ulps of outputs
        // of magnitude <= ~6
        for (int bf = 0; bf < 2; ++bf) {
            std::vector<float> out(toks * h, NAN);
            auto out_bf = bf16_poison(bf ? toks * h : 0);
            launch(grid1(toks, 8), 256, [&] {
                ef[v][bf](ids.data(), tys.data(), offs.data(), seqs, toks, word.data(), pos.data(), ty.data(),
                          gamma.data(), beta.data(), eps, h, out.data(), bf ? out_bf.data() : nullptr);
            });
            compare("embed_layernorm " + hs + (bf ? " bf16" : " f32"), out, x, 1e-5, 0);
            if (bf) compare("embed_layernorm " + hs + " bf16 copy", widen(out_bf), widen(to_bf16(out)), 0, 0, true);
        }
        const auto y = r.next(), b = r.next(), res = r.next(), z = r.next();
        const int rws = (int)(y.size() / h);
        for (int bf = 0; bf < 2; ++bf) {
            auto xx = y;
            auto out_bf = bf16_poison(bf ? rws * h : 0);
            launch(grid1(rws, 8), 256, [&] {
                af[v][bf](xx.data(), b.data(), res.data(), gamma.data(), beta.data(), eps, rws, h, bf ? out_bf.data() : nullptr);
            });
            compare("add_layernorm " + hs + (bf ? " bf16" : " f32"), xx, z, 1e-5, 0);
            if (bf) compare("add_layernorm " + hs + " bf16 copy", widen(out_bf), widen(to_bf16(xx)), 0, 0, true);
        }
        // pooling of x: CLS and max are exact; mean sums in another order; L2 adds a block sum
        const char* modes[3] = {"mean", "cls", "max"};
        void (*pf[3])(const float*, const unsigned*, int, int, int, float*) = {rrra_pool_mean_f32, rrra_pool_cls_f32,
                                                                               rrra_pool_max_f32};
        for (int m = 0; m < 3; ++m)
            for (int norm = 0; norm < 2; ++norm) {
                const auto want = r.next();
                std::vector<float> out(seqs * h, NAN);
                launch(seqs, 256, [&] { pf[m](x.data(), offs.data(), seqs, h, norm, out.data()); });
                const double tol = norm ? 1e-6 : (m == 0 ? 2e-6 : 0);
                compare(std::string("pool_") + modes[m] + (norm ? "+l2 " : " ") + hs, out, want, tol, 0);
            }
    }
    // bias + GELU: launch_gelu's block size; erff vs the CPU's rational erf (<= 5e-7 apart)
    for (int pass = 0; pass < 3; ++pass) {
        const int cols = (int)r.next()[0];
        const auto y = r.next(), b = r.next(), want = r.next(), want_bf = r.next();
        const int rws = (int)(y.size() / cols);
        const unsigned threads = std::clamp((unsigned)((cols + 3) / 4 + 31) / 32 * 32, 32u, 256u);
        auto yy = y;
        launch(rws, threads, [&] { rrra_bias_gelu_f32(yy.data(), b.data(), rws, cols); });
        compare("bias_gelu f32 cols " + std::to_string(cols), yy, want, 1e-6, 1e-6);
        auto ybf = to_bf16(y);
        launch(rws, threads, [&] { rrra_bias_gelu_bf16(ybf.data(), b.data(), rws, cols); });
        // one rounding to bf16 of a value within 1e-6 of the reference's
        compare("bias_gelu bf16 cols " + std::to_string(cols), widen(ybf), want_bf, 1e-6, 1.0 / 256);
    }
    // L2 normalisation, as tests/gpu_runtime.rs launches it (8 warps per block)
    for (int pass = 0; pass < 2; ++pass) {
        const int dim = (int)r.next()[0];
        auto x = r.next();
        const auto want = r.next();
        const int rws = (int)(x.size() / dim);
        launch(grid1(rws, 8), 256, [&] { rrra_l2_normalize_f32(x.data(), rws, dim); });
        compare("l2_normalize dim " + std::to_string(dim), x, want, 1e-6, 0);
    }
}

// user + system time of every thread so far: the emulator's cost, whatever else the machine runs
static double cpu_seconds() {
    rusage u;
    getrusage(RUSAGE_SELF, &u);
    return u.ru_utime.tv_sec + u.ru_stime.tv_sec + 1e-6 * (u.ru_utime.tv_usec + u.ru_stime.tv_usec);
}

int main(int argc, char** argv) {
    if (argc != 2 && argc != 3) { fprintf(stderr, "usage: inference REFERENCE_DIR [attention|adapter|row kernels]\n"); return 2; }
    const std::string dir = argv[1];
    using Family = void (*)(const std::string&);
    const std::pair<const char*, Family> families[] = {{"attention", attention}, {"adapter", adapter}, {"row kernels", rows}};
    for (auto [name, family] : families) {
        if (argc == 3 && argv[2] != std::string(name)) continue;
        const auto t0 = std::chrono::steady_clock::now();
        const double c0 = cpu_seconds();
        family(dir);
        printf("%s: %.1f s (%.1f s of CPU)\n", name,
               std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), cpu_seconds() - c0);
    }
    printf("inference: %d checks, %d fails\n", checks, fails);
    return fails ? 1 : 0;
}
