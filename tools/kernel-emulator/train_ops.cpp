// Emulates kernels/{sampler,infonce,adamw}.cu against C++ transliterations of their CPU
// references (train::sampler's Gumbel-top-n and RRRA log-weights, train::loss::info_nce,
// train::optim's AdamW with clipping and the bf16 copy): train_ops
#include "emu.h"
#include <cstdio>
#include <random>
#include "sampler.cu"
#include "infonce.cu"
#include "adamw.cu"

static std::mt19937_64 rng(42);
static double U(double a, double b) { return std::uniform_real_distribution<double>(a, b)(rng); }
static int fails = 0;
#define CHECK(c, ...) do { if (!(c)) { ++fails; printf("FAIL %s:%d ", __FILE__, __LINE__); printf(__VA_ARGS__); printf("\n"); } } while (0)

void test_sampler(int Q, int P, int n) {
    std::vector<double> lw(Q * P);
    for (auto& l : lw) { int r = rng() % 20; l = r < 2 ? -INFINITY : r == 2 ? NAN : r == 3 ? INFINITY : U(-6, 3); }
    if (Q > 1) for (int i = 0; i < P; ++i) lw[i] = -INFINITY;
    if (Q > 2) for (int i = 0; i < P; ++i) if (std::isfinite(lw[2 * P + i])) lw[2 * P + i] = -1.0;
    std::vector<u32> st(Q * 4);
    for (auto& w : st) w = (u32)rng();
    std::vector<double> keys(Q * P), okeys(Q * n);
    std::vector<int> out(Q * n, -7), counts(Q, -7);
    launch(Q, 256, [&] { rrra_sampler_gumbel_top_n(lw.data(), st.data(), P, n, keys.data(), out.data(), counts.data(), okeys.data()); });
    for (int q = 0; q < Q; ++q) {
        std::vector<std::pair<double, int>> ks;
        for (int i = 0; i < P; ++i) if (std::isfinite(lw[q * P + i]))
            ks.push_back({lw[q * P + i] + rrra_gumbel_at(i, st[q*4], st[q*4+1], st[q*4+2], st[q*4+3]), i});
        std::sort(ks.begin(), ks.end(), [](auto& a, auto& b) { return a.first > b.first || (a.first == b.first && a.second < b.second); });
        int take = std::min<int>(n, ks.size());
        CHECK(counts[q] == take, "sampler count q %d: %d vs %d", q, counts[q], take);
        for (int r = 0; r < n; ++r) {
            int want = r < take ? ks[r].second : -1;
            CHECK(out[q * n + r] == want, "sampler Q%d P%d n%d q %d r %d: %d vs %d", Q, P, n, q, r, out[q * n + r], want);
            if (r < take) CHECK(okeys[q * n + r] == ks[r].first, "key");
        }
    }
}

// transliteration of src/train/loss.rs::info_nce
struct Stats { double loss, acc, mpos, mneg; };
Stats cpu_infonce(const std::vector<float>& Qv, const std::vector<float>& Dv, int dim, const std::vector<int>& T,
                  const float* lw, float tau, std::vector<float>& dq, std::vector<float>& dd) {
    int B = T.size(), D = Dv.size() / dim;
    dq.assign(B * dim, 0); dd.assign(D * dim, 0);
    double inv_tau = 1.0 / (double)tau, inv_b = 1.0 / B;
    double loss = 0, pos = 0, neg = 0; long correct = 0, nc = 0;
    std::vector<double> raw(D), logit(D);
    for (int b = 0; b < B; ++b) {
        int t = T[b];
        for (int j = 0; j < D; ++j) { double s = 0; for (int k = 0; k < dim; ++k) s += (double)Qv[b*dim+k] * (double)Dv[j*dim+k]; raw[j] = s; }
        double mx = -INFINITY;
        for (int j = 0; j < D; ++j) { double w = (lw && j != t) ? (double)lw[b*D+j] : 0.0; logit[j] = raw[j]*inv_tau + w; mx = std::max(mx, logit[j]); }
        double z = 0; for (int j = 0; j < D; ++j) z += std::exp(logit[j] - mx);
        double lse = mx + std::log(z);
        loss += lse - raw[t]*inv_tau; pos += raw[t];
        double best = -INFINITY;
        for (int j = 0; j < D; ++j) if (j != t && logit[j] > -INFINITY) { best = std::max(best, raw[j]); neg += raw[j]; nc++; }
        if (raw[t] > best) correct++;
        for (int j = 0; j < D; ++j) {
            double g = std::exp(logit[j] - lse); if (j == t) g -= 1.0; if (g == 0.0) continue;
            float gs = (float)(g * inv_b * inv_tau);
            for (int k = 0; k < dim; ++k) { volatile float p = gs * Dv[j*dim+k]; dq[b*dim+k] += p; }
            for (int k = 0; k < dim; ++k) { volatile float p = gs * Qv[b*dim+k]; dd[j*dim+k] += p; }
        }
    }
    return {loss * inv_b, correct * inv_b, pos * inv_b, nc ? neg / nc : 0.0};
}

double rel_l2(const std::vector<float>& a, const std::vector<float>& b) {
    double n = 0, d = 0; for (size_t i = 0; i < a.size(); ++i) { n += ((double)a[i]-b[i])*((double)a[i]-b[i]); d += (double)b[i]*b[i]; }
    return std::sqrt(n / std::max(d, 1e-300));
}

void test_infonce(int B, int neg, int dim, bool with_w, float tau) {
    int D = B * (1 + neg);
    std::vector<float> Qv(B*dim), Dv(D*dim), lw(B*D);
    for (auto& x : Qv) x = U(-0.2, 0.2); for (auto& x : Dv) x = U(-0.2, 0.2);
    std::vector<int> T(B); for (int b = 0; b < B; ++b) T[b] = b * (1 + neg);
    for (int b = 0; b < B; ++b) for (int j = 0; j < D; ++j) lw[b*D+j] = (rng() % 10 == 0) ? -INFINITY : U(-2, 0.5);
    std::vector<float> dqc, ddc;
    Stats want = cpu_infonce(Qv, Dv, dim, T, with_w ? lw.data() : nullptr, tau, dqc, ddc);
    std::vector<double> lse(B, NAN), st(B * 5, NAN);
    std::vector<float> dq(B*dim, NAN), dd(D*dim, NAN);
    double inv_tau = 1.0 / (double)tau, inv_b = 1.0 / B;
    const float* lwp = with_w ? lw.data() : nullptr;
    launch(B, 256, [&] { rrra_infonce_rows(Qv.data(), Dv.data(), T.data(), lwp, D, dim, inv_tau, lse.data(), st.data()); });
    launch(B, 256, [&] { rrra_infonce_dq(Qv.data(), Dv.data(), T.data(), lwp, D, dim, inv_tau, inv_b, lse.data(), dq.data()); });
    launch(D, 256, [&] { rrra_infonce_dd(Qv.data(), Dv.data(), T.data(), lwp, B, D, dim, inv_tau, inv_b, lse.data(), dd.data()); });
    double loss = 0, corr = 0, pos = 0, ng = 0, cnt = 0;
    for (int b = 0; b < B; ++b) { loss += st[b*5]; corr += st[b*5+1]; pos += st[b*5+2]; ng += st[b*5+3]; cnt += st[b*5+4]; }
    loss *= inv_b;
    CHECK(std::fabs(loss - want.loss) <= 1e-12 * std::max(std::fabs(want.loss), 1e-3), "loss %g vs %g", loss, want.loss);
    CHECK(corr * inv_b == want.acc, "acc");
    CHECK(std::fabs(pos * inv_b - want.mpos) < 1e-12, "mpos");
    CHECK(std::fabs((cnt ? ng / cnt : 0) - want.mneg) < 1e-12, "mneg");
    double eq = rel_l2(dq, dqc), ed = rel_l2(dd, ddc);
    CHECK(eq <= 1e-6 && ed <= 1e-6, "B%d D%d d%d: dq err %g dd err %g", B, D, dim, eq, ed);
    printf("infonce B%d D%d d%d w%d: loss %.10g (cpu %.10g) dq %g dd %g\n", B, D, dim, with_w, loss, want.loss, eq, ed);
}

void test_adamw() {
    std::vector<size_t> sizes = {1, 7, 16384, 16385, 40000, 3};
    std::vector<int> decay = {1, 0, 1, 1, 0, 1};
    size_t N = 0; for (auto s : sizes) N += s;
    std::vector<float> p(N), m(N, 0), v(N, 0), pc, mc(N, 0), vc(N, 0), g(N);
    std::vector<__nv_bfloat16> bf(N);
    for (auto& x : p) x = U(-1, 1); pc = p;
    std::vector<u64> table;
    size_t start = 0;
    std::vector<int> edecay(N);
    for (size_t t = 0; t < sizes.size(); ++t) {
        for (size_t off = 0; off < sizes[t]; off += 16384) {
            size_t len = std::min<size_t>(16384, sizes[t] - off);
            table.push_back(start + off); table.push_back(len | ((u64)decay[t] << 32));
        }
        for (size_t i = 0; i < sizes[t]; ++i) edecay[start + i] = decay[t];
        start += sizes[t];
    }
    int C = table.size() / 2;
    std::vector<double> partial(C), norm(1);
    std::vector<float> control(2);
    float b1 = 0.9f, b2 = 0.999f, eps = 1e-8f, wd = 0.1f;
    // gscale: the trainer's 1 / micro-batches, applied in place first as the CPU does
    struct S { float lr, maxn; double gs; float gscale; } steps[] = {{1e-3f, 50.f, 1, 1.f}, {2e-3f, 1e4f, 1, 0.5f}, {5e-4f, INFINITY, 3, 1.f / 3}, {1e-3f, 0.f, 1, 1.f}, {1e-2f, 10.f, 0.01, 0.25f}};
    int t = 0;
    for (auto s : steps) {
        ++t;
        for (auto& x : g) x = (float)(U(-0.5, 0.5) * s.gs);
        // CPU reference
        std::vector<float> gc = g;
        if (s.gscale != 1.f) for (auto& x : gc) x *= s.gscale;
        double sum = 0; for (size_t c = 0; c < (size_t)C; ++c) { double a = 0; for (size_t i = 0; i < (table[2*c+1] & 0xffffffff); ++i) { double x = gc[table[2*c] + i]; a += x * x; } sum += a; }
        double nrm = std::sqrt(sum);
        double scale = (double)s.maxn / (nrm + 1e-6);
        if (scale < 1.0 && s.maxn > 0) { float sf = (float)scale; for (auto& x : gc) x *= sf; }
        double bias1 = 1.0 - std::pow((double)b1, (double)t), bias2 = 1.0 - std::pow((double)b2, (double)t);
        float step_size = (float)(s.lr / bias1), bias2_sqrt = (float)std::sqrt(bias2), df = (float)(1.0 - (double)s.lr * wd);
        float omb1 = 1.0f - b1, omb2 = 1.0f - b2;
        for (size_t i = 0; i < N; ++i) {
            volatile float P = pc[i];
            if (edecay[i]) P = P * df;
            volatile float a1 = b1 * mc[i], a2 = omb1 * gc[i]; mc[i] = a1 + a2;
            volatile float gg = gc[i] * gc[i]; volatile float c1 = vc[i] * b2, c2 = omb2 * gg; vc[i] = c1 + c2;
            volatile float sq = std::sqrt(vc[i]); volatile float den = sq / bias2_sqrt; den = den + eps;
            volatile float r = mc[i] / den; volatile float up = -step_size * r; P = P + up; pc[i] = P;
        }
        launch(C, 256, [&] { rrra_adamw_norm_partial(g.data(), table.data(), s.gscale, partial.data()); });
        launch(1, 1024, [&] { rrra_adamw_norm_final(partial.data(), C, s.maxn, norm.data(), control.data()); });
        launch(C, 256, [&] { rrra_adamw_update(p.data(), g.data(), m.data(), v.data(), bf.data(), table.data(), control.data(), s.gscale, df, b1, b2, omb1, omb2, bias2_sqrt, eps, step_size); });
        CHECK(std::fabs(norm[0] - nrm) <= 1e-12 * nrm, "norm %g vs %g", norm[0], nrm);
        size_t diff = 0; double mx = 0;
        for (size_t i = 0; i < N; ++i) { if (p[i] != pc[i] || m[i] != mc[i] || v[i] != vc[i]) { ++diff; mx = std::max(mx, (double)std::fabs(p[i]-pc[i])); } }
        size_t bfbad = 0; for (size_t i = 0; i < N; ++i) if (bf[i].x != __float2bfloat16_rn(p[i]).x) ++bfbad;
        printf("adamw step %d: norm %.12g (cpu %.12g) clip %g, %zu elements differ (max %g), bf16 bad %zu\n", t, norm[0], nrm, control[0], diff, mx, bfbad);
        CHECK(bfbad == 0, "bf16");
        CHECK(diff == 0 || mx < 1e-6, "adamw");
    }
    // a norm finite in f64 but not in f32 (as the CPU returns it): the step is skipped
    {
        for (auto& x : g) x = 3.0e38f;
        std::vector<float> p0 = p, m0 = m, v0 = v;
        launch(C, 256, [&] { rrra_adamw_norm_partial(g.data(), table.data(), 1.f, partial.data()); });
        launch(1, 1024, [&] { rrra_adamw_norm_final(partial.data(), C, 1.f, norm.data(), control.data()); });
        launch(C, 256, [&] { rrra_adamw_update(p.data(), g.data(), m.data(), v.data(), bf.data(), table.data(), control.data(), 1.f, 0.9f, b1, b2, 1 - b1, 1 - b2, 1.f, eps, 1e-3f); });
        CHECK(std::isfinite(norm[0]) && !std::isfinite((float)norm[0]), "huge norm %g", norm[0]);
        CHECK(control[1] == 1.0f && p == p0 && m == m0 && v == v0, "a step past f32's range must be skipped");
        printf("adamw norm %.3g (not finite in f32): skipped %d\n", norm[0], (int)control[1]);
    }
    // a norm past FLT_MAX in f64 that rounds down to FLT_MAX in f32: the CPU takes that step
    {
        for (auto& x : g) x = 0.0f;
        g[0] = 3.4028234663852886e38f;
        g[1] = 2.6e34f;
        std::vector<float> p0 = p;
        launch(C, 256, [&] { rrra_adamw_norm_partial(g.data(), table.data(), 1.f, partial.data()); });
        launch(1, 1024, [&] { rrra_adamw_norm_final(partial.data(), C, 1.f, norm.data(), control.data()); });
        launch(C, 256, [&] { rrra_adamw_update(p.data(), g.data(), m.data(), v.data(), bf.data(), table.data(), control.data(), 1.f, 0.9f, b1, b2, 1 - b1, 1 - b2, 1.f, eps, 1e-3f); });
        CHECK(norm[0] > 3.4028234663852886e38 && std::isfinite((float)norm[0]), "norm %.17g", norm[0]);
        CHECK(control[1] == 0.0f && p != p0, "a norm finite in f32 must not skip the step");
        for (float x : p) CHECK(std::isfinite(x), "a weight is not finite after the clipped step");
        printf("adamw norm %.17g (f32 %g): skipped %d\n", norm[0], (float)norm[0], (int)control[1]);
    }
}

int main() {
    int shapes[][3] = {{1,1,1},{3,7,3},{64,200,7},{5,257,257},{9,31,100},{4,1000,50},{2,2500,2500},{33,64,1}};
    for (auto& s : shapes) test_sampler(s[0], s[1], std::min(s[2], s[1]));
    printf("sampler done, fails %d\n", fails);
    int is[][3] = {{1,0,1},{3,1,7},{8,3,33},{17,2,129},{20,7,300}};
    for (auto& s : is) { test_infonce(s[0], s[1], s[2], true, 0.05f); test_infonce(s[0], s[1], s[2], false, 1.0f); }
    test_adamw();
    // rrra log weights
    {
        int Q = 3, P = 300; std::vector<float> sc(Q*P), fn(Q*P); std::vector<double> out(Q*P);
        for (int i = 0; i < Q*P; ++i) { sc[i] = U(-1,1); fn[i] = i % 50 == 0 ? 1.0f : U(0,1); }
        double scale = 1.0 / (0.05f * 1.0), gamma = 2.0;
        launch(Q, 256, [&] { rrra_sampler_rrra_log_weights(sc.data(), fn.data(), P, scale, gamma, out.data()); });
        for (int q = 0; q < Q; ++q) { float mx = -INFINITY; for (int i = 0; i < P; ++i) mx = std::max(mx, sc[q*P+i]);
            for (int i = 0; i < P; ++i) { double w = ((double)sc[q*P+i] - mx) * scale + gamma * std::log1p(-(double)fn[q*P+i]); CHECK(w == out[q*P+i] || (std::isinf(w) && w == out[q*P+i]), "rrra %d %d %g %g", q, i, w, out[q*P+i]); } }
    }
    printf("all done, fails %d\n", fails);
    return fails != 0;
}
