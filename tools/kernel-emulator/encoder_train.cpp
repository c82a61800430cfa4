// Emulates the kernels of kernels/encoder_train.cu: the row-wise forward steps against plain
// loops (the CPU reference's arithmetic), and the dropout and training-attention kernels against
// the CPU's own outputs (examples/kernel_reference.rs), and the tensor-core training attention
// of kernels/attention.cu against attention_sequence_train: encoder_train REFERENCE_DIR
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>
#include "emu.h"
#include "sized_reader.h"
#include "encoder_train.cu"
#ifndef exp2f
#define exp2f(x) std::exp2((float)(x))
#endif
#include "mma_sync.h"
#include "attention.cu"
static int fails = 0;
#define CHECK(c, ...) do { if (!(c)) { if (++fails < 30) { printf("FAIL "); printf(__VA_ARGS__); printf("\n"); } } } while (0)
static std::mt19937_64 rng(1);
static float U(float a, float b) { return std::uniform_real_distribution<float>(a, b)(rng); }
static float gelu(float x) { return 0.5f * x * (1.0f + std::erf(x * 0.70710678118654752440f)); }
static bf16 to_bf(float x) { return __float2bfloat16_rn(x); }
static float wide(bf16 x) { return __bfloat162float(x); }
static bool same(bf16 a, bf16 b) { return a.x == b.x; }

static void row_kernels() {
    for (int h : {32, 36, 384}) {
        std::vector<unsigned> lens = {5, 1, 17, 0, 9};
        std::vector<unsigned> offs = {0};
        for (unsigned l : lens) offs.push_back(offs.back() + l);
        int S = lens.size(), T = offs.back(), V = 50, Pn = 20, Ty = 2;
        std::vector<unsigned> ids(T), tys(T);
        for (int t = 0; t < T; ++t) { ids[t] = rng() % V; tys[t] = rng() % Ty; }
        std::vector<float> W(V * h), Pe(Pn * h), Te(Ty * h), out(T * h, NAN);
        for (auto* v : {&W, &Pe, &Te}) for (auto& x : *v) x = U(-1, 1);
        launch(S, 256, [&] { rrra_train_embed_sum_f32(ids.data(), tys.data(), offs.data(), W.data(), Pe.data(), Te.data(), h, out.data()); });
        for (int s = 0; s < S; ++s) for (unsigned t = offs[s]; t < offs[s + 1]; ++t) for (int j = 0; j < h; ++j) {
            float want = W[ids[t] * h + j] + Pe[(t - offs[s]) * h + j] + Te[tys[t] * h + j];
            CHECK(out[t * h + j] == want, "embed h %d t %u j %d", h, t, j);
        }
        // layernorm, one warp per row
        int R = 37;
        std::vector<float> s(R * h), g(h), b(h), y(R * h, NAN);
        for (auto& x : s) x = U(-3, 5); for (auto& x : g) x = U(0.5, 1.5); for (auto& x : b) x = U(-0.2, 0.2);
        launch((R * 32 + 255) / 256, 256, [&] { rrra_train_layernorm_f32(s.data(), g.data(), b.data(), 1e-12f, R, h, y.data()); });
        double worst = 0;
        for (int r = 0; r < R; ++r) {
            double m = 0; for (int j = 0; j < h; ++j) m += s[r * h + j]; m /= h;
            double v = 0; for (int j = 0; j < h; ++j) v += (s[r * h + j] - m) * (s[r * h + j] - m); v /= h;
            for (int j = 0; j < h; ++j) {
                double want = (s[r * h + j] - m) / std::sqrt(v + 1e-12) * g[j] + b[j];
                double e = std::fabs(y[r * h + j] - want);
                worst = std::max(worst, std::isfinite(e) ? e : 1e9);
                CHECK(e < 2e-5, "layernorm h %d r %d j %d: %g vs %g", h, r, j, y[r * h + j], want);
            }
        }
        printf("h %d: layernorm worst %.2e\n", h, worst);
        // bias + residual, bias + GELU, GELU, add
        long n = (long)R * h;
        std::vector<float> yy(n), r(n), bb(h), pre(n), o(n, NAN), ref(n);
        for (auto& x : yy) x = U(-2, 2); for (auto& x : r) x = U(-2, 2); for (auto& x : bb) x = U(-1, 1);
        for (long i = 0; i < n; ++i) ref[i] = (yy[i] + bb[i % h]) + r[i];
        auto y2 = yy;
        launch((n + 255) / 256, 256, [&] { rrra_train_bias_residual_f32(y2.data(), bb.data(), r.data(), R, h); });
        for (long i = 0; i < n; ++i) CHECK(y2[i] == ref[i], "bias_residual %ld", i);
        pre = yy;
        launch(3, 256, [&] { rrra_train_bias_gelu_f32(pre.data(), bb.data(), R, h, o.data()); });  // grid-stride with a small grid
        for (long i = 0; i < n; ++i) {
            float p = yy[i] + bb[i % h];
            CHECK(pre[i] == p, "bias_gelu pre %ld", i);
            CHECK(std::fabs(o[i] - gelu(p)) <= 1e-7f * (1 + std::fabs(p)), "bias_gelu %ld", i);
        }
        std::vector<float> o2(n, NAN);
        launch(2, 256, [&] { rrra_train_gelu_f32(yy.data(), n, o2.data()); });
        for (long i = 0; i < n; ++i) CHECK(o2[i] == gelu(yy[i]), "gelu %ld", i);
        auto dst = yy;
        launch(1, 256, [&] { rrra_train_add_f32(dst.data(), r.data(), n); });
        for (long i = 0; i < n; ++i) CHECK(dst[i] == yy[i] + r[i], "add %ld", i);
        // the bf16-activation step's variants: f32 math, one rounding per store
        std::vector<float> y32(R * h, NAN);
        std::vector<bf16> ybf(R * h, to_bf(NAN));
        launch((R * 32 + 255) / 256, 256, [&] { rrra_train_layernorm_f32_bf16(s.data(), g.data(), b.data(), 1e-12f, R, h, y32.data(), ybf.data()); });
        for (int i = 0; i < R * h; ++i) {
            CHECK(y32[i] == y[i], "layernorm_f32_bf16 f32 %d", i);
            CHECK(same(ybf[i], to_bf(y[i])), "layernorm_f32_bf16 copy %d", i);
        }
        std::vector<bf16> pre16(n), out16(n, to_bf(NAN)), in16(n);
        for (long i = 0; i < n; ++i) in16[i] = pre16[i] = to_bf(yy[i]);
        launch(3, 256, [&] { rrra_train_bias_gelu_bf16(pre16.data(), bb.data(), R, h, out16.data()); });
        for (long i = 0; i < n; ++i) {
            const bf16 want = to_bf(wide(in16[i]) + bb[i % h]);
            CHECK(same(pre16[i], want), "bias_gelu_bf16 pre %ld", i);
            CHECK(same(out16[i], to_bf(gelu_erf(wide(want)))), "bias_gelu_bf16 %ld", i);
            // the stored pre-activation, not the unrounded sum, is what GELU saw
            CHECK(std::fabs(wide(out16[i]) - gelu(wide(want))) <= 8e-3f * (1 + std::fabs(wide(want))), "bias_gelu_bf16 value %ld", i);
        }
        std::vector<bf16> g16(n, to_bf(NAN));
        launch(2, 256, [&] { rrra_train_gelu_bf16(in16.data(), n, g16.data()); });
        for (long i = 0; i < n; ++i) CHECK(same(g16[i], to_bf(gelu_erf(wide(in16[i])))), "gelu_bf16 %ld", i);
        std::vector<bf16> c16(n, to_bf(NAN));
        launch(2, 256, [&] { rrra_train_to_bf16(yy.data(), n, c16.data()); });
        for (long i = 0; i < n; ++i) CHECK(same(c16[i], to_bf(yy[i])), "to_bf16 %ld", i);
    }
}

static void dropout_and_attention(const std::string& dir) {
    const int h = 64, heads = 4, dh = h / heads;
    std::vector<unsigned> lens = {5, 1, 17, 0, 40}, offs = {0};
    for (unsigned l : lens) offs.push_back(offs.back() + l);
    int S = lens.size(), T = offs.back();
    FILE* f = fopen((dir + "/dropout.bin").c_str(), "rb");
    if (!f) { perror("dropout.bin"); exit(2); }
    auto rd = [&](size_t n) { std::vector<float> v(n); if (fread(v.data(), 4, n, f) != n) exit(2); return v; };
    auto qkv = rd((size_t)T * 3 * h), bias = rd(3 * h), x = rd((size_t)T * h), ctx_want = rd((size_t)T * h), xd_want = rd((size_t)T * h);
    std::vector<unsigned> words(2 * S * 4);
    FILE* g = fopen((dir + "/dropout_words.bin").c_str(), "rb");
    if (!g) { perror("dropout_words.bin"); exit(2); }
    if (fread(words.data(), 4, words.size(), g) != words.size()) exit(2);
    const unsigned* att = words.data(); const unsigned* hid = words.data() + S * 4;
    // hidden dropout: out of place, in place, and fused with bias and residual
    float p = 0.1f, scale = 1.0f / (1.0f - p);
    std::vector<float> xd(T * h, NAN);
    launch(S, 256, [&] { rrra_train_dropout_f32(xd.data(), x.data(), offs.data(), hid, h, p, scale); });
    for (int i = 0; i < T * h; ++i) if (xd[i] != xd_want[i]) { if (++fails < 30) printf("dropout %d: %g vs %g\n", i, xd[i], xd_want[i]); }
    auto xin = x;
    launch(S, 256, [&] { rrra_train_dropout_f32(xin.data(), xin.data(), offs.data(), hid, h, p, scale); });
    for (int i = 0; i < T * h; ++i) if (xin[i] != xd_want[i]) { if (++fails < 30) printf("in place %d\n", i); }
    std::vector<float> zb(h, 0.0f), zr(T * h, 0.0f); auto y = x;
    launch(S, 256, [&] { rrra_train_bias_dropout_residual_f32(y.data(), zb.data(), zr.data(), offs.data(), hid, h, p, scale); });
    for (int i = 0; i < T * h; ++i) if (y[i] != xd_want[i]) { if (++fails < 30) printf("fused %d\n", i); }
    // attention with dropout
    std::vector<float> ctx(T * h, NAN);
    unsigned maxlen = 40;
    float sc = 1.0f / std::sqrt((float)dh), pa = 0.15f, ks = 1.0f / (1.0f - pa);
    launch3((maxlen + 7) / 8, heads, S, 256, [&] { rrra_train_attention_dropout_f32(qkv.data(), bias.data(), offs.data(), att, h, dh, sc, pa, ks, ctx.data()); });
    double worst = 0; int zeros = 0;
    for (int i = 0; i < T * h; ++i) {
        double e = std::fabs(ctx[i] - ctx_want[i]);
        worst = std::max(worst, std::isfinite(e) ? e : 1e9);
        if (!(e <= 2e-5)) { if (++fails < 30) printf("attention %d: %g vs %g\n", i, ctx[i], ctx_want[i]); }
    }
    for (int i = 0; i < T * h; ++i) zeros += xd_want[i] == 0.0f;
    CHECK(zeros > 0, "the reference dropped nothing");
    printf("dropout: %d of %d hidden values dropped; attention with dropout within %.2e\n", zeros, T * h, worst);
}

// rrra_attention_train_mma_d* (kernels/attention.cu) as GpuTrainableEncoder::attention_mma
// launches it: grid (ceil(max_len / 64), heads, sequences), 128 threads, static shared memory.
static void train_attention_mma(const std::string& dir) {
    Reader r(dir + "/train_attention.bin");
    using Kernel = void (*)(const float*, const float*, const unsigned*, const unsigned*, int, float, float, float, float*);
    while (r.more()) {
        const auto shape = r.next(), lens = r.next();
        const int dh = (int)shape[0], heads = (int)shape[1], h = dh * heads;
        const float p = shape[2];
        const auto qkv = r.next(), bias = r.next(), wf = r.next(), want = r.next();
        std::vector<unsigned> offs = {0}, words(wf.size());
        for (size_t i = 0; i < wf.size(); ++i) words[i] = __float_as_uint(wf[i]);
        unsigned max_len = 0;
        for (float l : lens) { offs.push_back(offs.back() + (unsigned)l); max_len = std::max(max_len, (unsigned)l); }
        const unsigned seqs = (unsigned)lens.size(), tokens = offs.back();
        Kernel k = dh == 32 ? rrra_attention_train_mma_d32 : dh == 64 ? rrra_attention_train_mma_d64 : rrra_attention_train_mma_d128;
        const float scale_log2e = 1.44269504088896340736f / std::sqrt((float)dh);
        const float keep = p > 0 ? 1.0f / (1.0f - p) : 1.0f;
        std::vector<float> ctx(tokens * h, NAN);
        launch3(std::max(1u, (max_len + 63) / 64), heads, seqs, 128,
                [&] { k(qkv.data(), bias.data(), offs.data(), words.data(), h, scale_log2e, p, keep, ctx.data()); });
        // Q + b, K + b, V + b and the kept probabilities are rounded to bf16 (2^-9 relative
        // each) against the CPU's f32: the scores move by ~2^-8 and the output by ~1e-3 of
        // its scale; 1e-2 of the scale (the house's bf16 tolerance) leaves room, while one
        // wrong mask bit at p 0.5 on the short sequences moves an output by ~0.1 of it.
        float scale = 1.0f;
        for (float v : want) scale = std::max(scale, std::fabs(v));
        double worst = 0, sum = 0;
        for (size_t i = 0; i < want.size(); ++i) {
            const double e = std::fabs((double)ctx[i] - want[i]);
            worst = std::max(worst, std::isfinite(e) ? e : 1e9);
            sum += e;
            CHECK(e <= 1e-2 * scale, "attention mma dh %d p %g [%zu]: %g vs %g", dh, p, i, ctx[i], want[i]);
        }
        printf("attention mma dh %d x%d p %.2f over %u tokens: within %.2e (mean %.1e) of the scale %.2f\n", dh, heads,
               p, tokens, worst, sum / std::max<size_t>(1, want.size()), scale);
        // The bf16 twin (the bf16-activation step's) on QKV rounded to bf16 against the f32
        // kernel on the same values widened: identical arithmetic, so its output must be the
        // f32 one's rounded to bf16, bit for bit; and the CPU's within the same 1e-2.
        using Kernel16 = void (*)(const bf16*, const float*, const unsigned*, const unsigned*, int, float, float, float, bf16*);
        Kernel16 k16 = dh == 32 ? rrra_attention_train_mma_bf16_d32 : dh == 64 ? rrra_attention_train_mma_bf16_d64 : rrra_attention_train_mma_bf16_d128;
        std::vector<bf16> qkv16(qkv.size()), ctx16(tokens * h, to_bf(NAN));
        std::vector<float> qkv_r(qkv.size()), ctx_r(tokens * h, NAN);
        for (size_t i = 0; i < qkv.size(); ++i) qkv_r[i] = wide(qkv16[i] = to_bf(qkv[i]));
        launch3(std::max(1u, (max_len + 63) / 64), heads, seqs, 128,
                [&] { k(qkv_r.data(), bias.data(), offs.data(), words.data(), h, scale_log2e, p, keep, ctx_r.data()); });
        launch3(std::max(1u, (max_len + 63) / 64), heads, seqs, 128,
                [&] { k16(qkv16.data(), bias.data(), offs.data(), words.data(), h, scale_log2e, p, keep, ctx16.data()); });
        double worst16 = 0;
        for (size_t i = 0; i < ctx16.size(); ++i) {
            CHECK(same(ctx16[i], to_bf(ctx_r[i])), "attention mma bf16 twin dh %d p %g [%zu]: %g vs %g", dh, p, i, wide(ctx16[i]), ctx_r[i]);
            const double e = std::fabs((double)wide(ctx16[i]) - want[i]);
            worst16 = std::max(worst16, std::isfinite(e) ? e : 1e9);
            CHECK(e <= 1e-2 * scale, "attention mma bf16 dh %d p %g [%zu]: %g vs %g", dh, p, i, wide(ctx16[i]), want[i]);
        }
        printf("  bf16 twin: the f32 kernel's output rounded, bit for bit; within %.2e of the CPU's on unrounded QKV\n", worst16);
    }
}

int main(int argc, char** argv) {
    if (argc != 2) { fprintf(stderr, "usage: encoder_train REFERENCE_DIR\n"); return 2; }
    row_kernels();
    dropout_and_attention(argv[1]);
    train_attention_mma(argv[1]);
    printf("encoder_train kernels: %s\n", fails ? "FAILED" : "ok");
    return fails != 0;
}
