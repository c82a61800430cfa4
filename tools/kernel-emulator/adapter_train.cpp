// Emulates kernels/adapter_train.cu as src/device/adapter_train.rs launches it (the same order,
// the same row-major GEMM mapping as device::runtime::sgemm_row_major, cuBLAS replaced by a
// column-major f32 sgemm) and compares every output with the CPU reference's
// (examples/kernel_reference.rs): adapter_train D H Q K REFERENCE.bin
// Tolerances as tests/gpu_adapter_train.rs states them.
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <string>
#include "emu.h"
#include "adapter_train.cu"
#include "backward.cu"  // rrra_gelu_backward_f32, the GELU gradient

static int fails = 0;
#define CHECK(c, ...) do { if (!(c)) { if (++fails < 40) { printf("FAIL "); printf(__VA_ARGS__); printf("\n"); } } } while (0)

// BLAS sgemm, column-major, f32 accumulation in k order
static void sgemm_cm(bool ta, bool tb, int m, int n, int k, const float* A, int lda, const float* B, int ldb, float beta, float* C, int ldc) {
    for (int j = 0; j < n; ++j) for (int i = 0; i < m; ++i) {
        float s = 0;
        for (int l = 0; l < k; ++l) {
            float a = ta ? A[l + i * lda] : A[i + l * lda];
            float b = tb ? B[j + l * ldb] : B[l + j * ldb];
            s = std::fma(a, b, s);
        }
        C[i + j * ldc] = beta == 0.0f ? s : s + beta * C[i + j * ldc];
    }
}
// transliteration of runtime::col_major + sgemm_row_major
static void gemm_rm(bool ta, bool tb, int m, int n, int k, const float* a, const float* b, float beta, float* c) {
    bool tf = tb, ts = ta; int M = n, N = m, K = k;
    int ldf = tb ? k : n, lds = ta ? m : k, ldc = n;
    sgemm_cm(tf, ts, M, N, K, b, ldf, a, lds, beta, c, ldc);
}
static unsigned gs(long n) { long b = (n + 255) / 256; return (unsigned)std::min(b, 65536L); }
static unsigned wpr(long rows) { return (unsigned)((rows * 32 + 255) / 256); }

int main(int argc, char** argv) {
    if (argc != 6) { fprintf(stderr, "usage: adapter_train D H Q K REFERENCE.bin\n"); return 2; }
    int d = atoi(argv[1]), h = atoi(argv[2]), nq = atoi(argv[3]), k = atoi(argv[4]);
    FILE* f = fopen(argv[5], "rb");
    if (!f) { perror(argv[5]); return 2; }
    auto rd = [&](size_t n) { std::vector<float> v(n); if (fread(v.data(), 4, n, f) != n) { printf("short file\n"); exit(2); } return v; };
    long P = (long)nq * k;
    auto w1 = rd(h * 3 * d), b1 = rd(h), w2 = rd(d * h), b2 = rd(d), sc = rd(2);
    auto q = rd(nq * d), c = rd(P * d), dl = rd(P), ex = rd(P * d);
    auto want_logit = rd(P), want_a = rd(P * d), want_alpha = rd(P);
    auto gw1w = rd(h * 3 * d), gb1w = rd(h), gw2w = rd(d * h), gb2w = rd(d), gsw = rd(2);
    auto dqw = rd(nq * d), dcw = rd(P * d);
    float beta = sc[0], beta0 = sc[1];
    const float NaNf = std::nanf("");
    auto buf = [&](size_t n) { return std::vector<float>(n, NaNf); };
    auto wsum = buf(h * d), wpair = buf(h * 2 * d), F = buf(P * 2 * d), U = buf(nq * h), pre = buf(P * h), G = buf(P * h), A = buf(P * d), logit = buf(P), alpha = buf(P);
    std::vector<double> geo(P * 8, NAN);
    launch(gs((long)h * d), 256, [&] { rrra_adapter_train_recut(w1.data(), d, h, wsum.data(), wpair.data()); });
    launch(gs(P * d), 256, [&] { rrra_adapter_train_features(q.data(), c.data(), k, P, d, F.data()); });
    gemm_rm(false, true, nq, h, d, q.data(), wsum.data(), 0, U.data());
    gemm_rm(false, true, P, h, 2 * d, F.data(), wpair.data(), 0, pre.data());
    launch(gs(P * h), 256, [&] { rrra_adapter_train_hidden(pre.data(), U.data(), b1.data(), k, P, h, G.data()); });
    gemm_rm(false, true, P, d, h, G.data(), w2.data(), 0, A.data());
    launch(wpr(P), 256, [&] { rrra_adapter_train_geometry(q.data(), c.data(), A.data(), b2.data(), k, P, d, beta, beta0, logit.data(), alpha.data(), geo.data()); });
    float tol = 2e-5f * (1 + std::fabs(beta));
    for (long i = 0; i < P; ++i) {
        CHECK(std::fabs(logit[i] - want_logit[i]) <= tol, "logit %ld: %g vs %g", i, logit[i], want_logit[i]);
        CHECK(std::fabs(alpha[i] - want_alpha[i]) <= 1e-4, "alpha %ld: %g vs %g", i, alpha[i], want_alpha[i]);
    }
    auto rel = [&](const char* what, const std::vector<float>& g, const std::vector<float>& w, float r) {
        float s = 1e-30f; for (float v : w) s = std::max(s, std::fabs(v));
        double worst = 0;
        for (size_t i = 0; i < w.size(); ++i) { double e = std::fabs(g[i] - w[i]) / s; if (!(e <= r)) { CHECK(false, "%s[%zu]: %g vs %g (scale %g)", what, i, g[i], w[i], s); } worst = std::max(worst, std::isfinite(e) ? e : 1e9); }
        printf("  %-6s worst %.2e\n", what, worst);
    };
    rel("a", A, want_a, 1e-5f);
    // backward, with inputs and the extra gradient
    auto da = buf(P * d), dpre = buf(P * h), dqd = buf(P * d), dc = buf(P * d), ds = buf(P * 2), dsq = buf(nq * 2), du = buf(nq * h), daq = buf(nq * d);
    auto uq = buf(h * d), cf = buf(h * 2 * d), df = buf(P * 2 * d), e = buf(nq * d), dq = buf(nq * d);
    auto gw1 = buf(h * 3 * d), gb1 = buf(h), gw2 = buf(d * h), gb2 = buf(d), gsc = buf(2);
    launch(wpr(P), 256, [&] { rrra_adapter_train_pair_grad(q.data(), c.data(), A.data(), geo.data(), dl.data(), ex.data(), k, P, d, beta, da.data(), dqd.data(), dc.data(), ds.data()); });
    gemm_rm(false, false, P, h, d, da.data(), w2.data(), 0, dpre.data());
    launch(std::min<long>(gs(P * h), 8192), 256, [&] { rrra_gelu_backward_f32(pre.data(), dpre.data(), P * h); });
    auto sums = [&](const float* x, int groups, int per, int cols, float* out) {
        launch((unsigned)((groups * cols + 255) / 256), 256, [&] { rrra_adapter_train_group_sums(x, groups, per, cols, out); });
    };
    sums(dpre.data(), nq, k, h, du.data());
    sums(du.data(), 1, nq, h, gb1.data());
    sums(da.data(), nq, k, d, daq.data());
    sums(daq.data(), 1, nq, d, gb2.data());
    sums(ds.data(), nq, k, 2, dsq.data());
    sums(dsq.data(), 1, nq, 2, gsc.data());
    gemm_rm(true, false, d, h, P, da.data(), G.data(), 0, gw2.data());
    gemm_rm(true, false, h, 2 * d, P, dpre.data(), F.data(), 0, cf.data());
    gemm_rm(true, false, h, d, nq, du.data(), q.data(), 0, uq.data());
    launch(gs((long)d * h), 256, [&] { rrra_adapter_train_w1_grad(uq.data(), cf.data(), d, h, gw1.data()); });
    gemm_rm(false, false, P, 2 * d, h, dpre.data(), wpair.data(), 0, df.data());
    gemm_rm(false, false, nq, d, h, du.data(), wsum.data(), 0, e.data());
    launch((unsigned)((nq * d + 255) / 256), 256, [&] { rrra_adapter_train_input_grads(q.data(), c.data(), df.data(), dqd.data(), e.data(), nq, k, d, dc.data(), dq.data()); });
    rel("dW1", gw1, gw1w, 1e-4f); rel("db1", gb1, gb1w, 1e-4f); rel("dW2", gw2, gw2w, 1e-4f); rel("db2", gb2, gb2w, 1e-4f);
    std::vector<float> gb = {gsc[0]}, wb = {gsw[0]}, gb0 = {gsc[1]}, wb0 = {gsw[1]};
    rel("dbeta", gb, wb, 1e-4f); rel("dbeta0", gb0, wb0, 1e-4f);
    rel("dq", dq, dqw, 1e-4f); rel("dc", dc, dcw, 1e-4f);
    printf("d %d h %d %dx%d: %s\n", d, h, nq, k, fails ? "FAILED" : "ok");
    return fails ? 1 : 0;
}
