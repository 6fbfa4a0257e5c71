// mHC (manifold-constrained hyper-connection) mixers and RMSNorm, fused: the per-block "pre" (RMS-normalized streams → 24
// mixing logits → sigmoid weights, Sinkhorn-balanced comb, collapsed block input) and "post" (expand the block
// output back over the S streams). The torch references are kernels/mhc.py; there each step is a separate op,
// and at decode (T = 1, S = 4) the ~130 tiny ops of one "pre" cost ~0.6 ms of dispatch, here ~0.05 ms.
// Called through ctypes (kernels/cpu_ext.py); the Python side only calls it when the CPU has AVX2 + FMA.

#include <immintrin.h>
#include <omp.h>
#include <stdint.h>

#include <cmath>
#include <vector>

#pragma GCC push_options
#pragma GCC target("avx2,fma")

namespace {

#include "hsum.inc"

// dots[o] = fn[o] · x for rows o0..o1 (n a multiple of 8), four rows per pass so x is read a quarter as often
void dot_rows(const float* fn, const float* x, int64_t n, int64_t o0, int64_t o1, float* dots) {
    int64_t o = o0;
    for (; o + 4 <= o1; o += 4) {
        const float* f = fn + o * n;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t i = 0; i < n; i += 8) {
            const __m256 v = _mm256_loadu_ps(x + i);
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(f + i), v, a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(f + n + i), v, a1);
            a2 = _mm256_fmadd_ps(_mm256_loadu_ps(f + 2 * n + i), v, a2);
            a3 = _mm256_fmadd_ps(_mm256_loadu_ps(f + 3 * n + i), v, a3);
        }
        dots[o] = hsum8(a0), dots[o + 1] = hsum8(a1), dots[o + 2] = hsum8(a2), dots[o + 3] = hsum8(a3);
    }
    for (; o < o1; ++o) {
        __m256 a = _mm256_setzero_ps();
        for (int64_t i = 0; i < n; i += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(fn + o * n + i), _mm256_loadu_ps(x + i), a);
        dots[o] = hsum8(a);
    }
}

float sumsq(const float* x, int64_t n) {
    __m256 a = _mm256_setzero_ps(), b = a;
    for (int64_t i = 0; i < n; i += 16) {
        const __m256 u = _mm256_loadu_ps(x + i), v = _mm256_loadu_ps(x + i + 8);
        a = _mm256_fmadd_ps(u, u, a);
        b = _mm256_fmadd_ps(v, v, b);
    }
    return hsum8(_mm256_add_ps(a, b));
}

inline float sigmoid(float v) { return 1.0f / (1.0f + std::exp(-v)); }

// Σ_s w[s] · X[s, d0:d1] into out[d0:d1]
void weighted_sum(const float* X, int64_t S, int64_t D, const float* w, int64_t d0, int64_t d1, float* out) {
    for (int64_t d = d0; d < d1; d += 8) {
        __m256 acc = _mm256_mul_ps(_mm256_set1_ps(w[0]), _mm256_loadu_ps(X + d));
        for (int64_t s = 1; s < S; ++s) acc = _mm256_fmadd_ps(_mm256_set1_ps(w[s]), _mm256_loadu_ps(X + s * D + d), acc);
        _mm256_storeu_ps(out + d, acc);
    }
}

constexpr int ROW_GROUP = 4;  // fn rows per parallel task
constexpr int64_t D_CHUNK = 1024;  // columns per parallel task in the weighted sums

}  // namespace

extern "C" {

// For T rows of streams X [T, S, D] and a mixing matrix fn [R, S·D]: m = rmsnorm(X[t] flattened) · fnᵀ, then
//   pre[s]  = sigmoid(m[s]·scale[0] + base[s]) + eps          (s < S)
//   out[t]  = Σ_s pre[s] · X[t, s]                             [T, D]
// and when R = (2 + S)·S (a block's mixer; R = S is the head's collapse, which has no post/comb):
//   post[t, s] = 2·sigmoid(m[S + s]·scale[1] + base[S + s])
//   comb[t] = Sinkhorn(softmax_k(m[2S + jS + k]·scale[2] + base[2S + jS + k]) + eps): first the columns
//             (sums over j) normalized, then `iters` − 1 rounds of rows then columns, each sum + eps.
// Returns 0, or -1 for a shape it does not handle (D not a multiple of 16, R not S or (2 + S)·S, S > 16).
int v4_hc_pre(const float* X, int64_t T, int64_t S, int64_t D, const float* fn, int64_t R, const float* scale,
              const float* base, int iters, float eps, float norm_eps, float* out, float* post, float* comb,
              int nthreads) {
    const bool full = R == (2 + S) * S;
    if (D % 16 || S < 1 || S > 16 || !(full || R == S) || (full && (!post || !comb))) return -1;
    const int64_t n = S * D, groups = (R + ROW_GROUP - 1) / ROW_GROUP;
    std::vector<float> m(T * R), ss(T);
    // the dots read fn (~1.5 MB for Flash) once per token: split the rows over threads even for one token
    const int64_t tasks = T * (groups + 1);
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1 && T * R * n > (1 << 16))
    for (int64_t i = 0; i < tasks; ++i) {
        const int64_t t = i / (groups + 1), g = i % (groups + 1);
        const float* x = X + t * n;
        if (g == groups)
            ss[t] = sumsq(x, n);
        else
            dot_rows(fn, x, n, g * ROW_GROUP, (g + 1) * ROW_GROUP < R ? (g + 1) * ROW_GROUP : R, m.data() + t * R);
    }
    std::vector<float> pre(T * S);
    for (int64_t t = 0; t < T; ++t) {
        // rmsnorm has no weight here, so it is one scalar per token and commutes with the dots
        const float r = 1.0f / std::sqrt(ss[t] / (float)n + norm_eps);
        const float* mt = m.data() + t * R;
        for (int64_t s = 0; s < S; ++s) pre[t * S + s] = sigmoid(mt[s] * r * scale[0] + base[s]) + eps;
        if (!full) continue;
        for (int64_t s = 0; s < S; ++s) post[t * S + s] = 2.0f * sigmoid(mt[S + s] * r * scale[1] + base[S + s]);
        float* c = comb + t * S * S;
        for (int64_t j = 0; j < S; ++j) {
            float mx = -INFINITY, sum = 0.0f;
            for (int64_t k = 0; k < S; ++k) {
                c[j * S + k] = mt[2 * S + j * S + k] * r * scale[2] + base[2 * S + j * S + k];
                mx = c[j * S + k] > mx ? c[j * S + k] : mx;
            }
            for (int64_t k = 0; k < S; ++k) sum += (c[j * S + k] = std::exp(c[j * S + k] - mx));
            for (int64_t k = 0; k < S; ++k) c[j * S + k] = c[j * S + k] / sum + eps;
        }
        for (int it = 0; it < iters; ++it) {
            if (it > 0)
                for (int64_t j = 0; j < S; ++j) {
                    float sum = 0.0f;
                    for (int64_t k = 0; k < S; ++k) sum += c[j * S + k];
                    for (int64_t k = 0; k < S; ++k) c[j * S + k] /= sum + eps;
                }
            for (int64_t k = 0; k < S; ++k) {
                float sum = 0.0f;
                for (int64_t j = 0; j < S; ++j) sum += c[j * S + k];
                for (int64_t j = 0; j < S; ++j) c[j * S + k] /= sum + eps;
            }
        }
    }
    const int64_t chunks = (D + D_CHUNK - 1) / D_CHUNK;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1 && T * n > (1 << 16))
    for (int64_t i = 0; i < T * chunks; ++i) {
        const int64_t t = i / chunks, d0 = (i % chunks) * D_CHUNK, d1 = d0 + D_CHUNK < D ? d0 + D_CHUNK : D;
        weighted_sum(X + t * n, S, D, pre.data() + t * S, d0, d1, out + t * D);
    }
    return 0;
}

// out[t, k] = post[t, k] · y[t] + Σ_j comb[t, j, k] · X[t, j]  (out [T, S, D]). Returns 0, or -1 for a bad shape.
int v4_hc_post(const float* y, const float* X, const float* post, const float* comb, int64_t T, int64_t S, int64_t D,
               float* out, int nthreads) {
    if (D % 16 || S < 1 || S > 16) return -1;
    const int64_t chunks = (D + D_CHUNK - 1) / D_CHUNK;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1 && T * S * D > (1 << 16))
    for (int64_t i = 0; i < T * chunks; ++i) {
        const int64_t t = i / chunks, d0 = (i % chunks) * D_CHUNK, d1 = d0 + D_CHUNK < D ? d0 + D_CHUNK : D;
        const float* Xt = X + t * S * D;
        const float* c = comb + t * S * S;
        for (int64_t k = 0; k < S; ++k) {
            float* o = out + (t * S + k) * D;
            const __m256 p = _mm256_set1_ps(post[t * S + k]);
            for (int64_t d = d0; d < d1; d += 8) {
                __m256 acc = _mm256_mul_ps(p, _mm256_loadu_ps(y + t * D + d));
                for (int64_t j = 0; j < S; ++j)
                    acc = _mm256_fmadd_ps(_mm256_set1_ps(c[j * S + k]), _mm256_loadu_ps(Xt + j * D + d), acc);
                _mm256_storeu_ps(o + d, acc);
            }
        }
    }
    return 0;
}

// RMSNorm of R rows of D: y[r] = x[r] · rsqrt(mean(x[r]²) + eps) · w (w may be null). One call for what torch
// runs as ~6 ops (~0.1 ms per call at decode, 5-6 calls per layer). Returns 0, or -1 when D is not a multiple of 16.
int v4_rms_norm(const float* x, int64_t R, int64_t D, const float* w, float eps, float* y, int nthreads) {
    if (D % 16 || D <= 0) return -1;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1 && R * D >= (1 << 18))
    for (int64_t r = 0; r < R; ++r) {
        const float* xr = x + r * D;
        float* yr = y + r * D;
        const __m256 s = _mm256_set1_ps(1.0f / std::sqrt(sumsq(xr, D) / (float)D + eps));
        for (int64_t d = 0; d < D; d += 8) {
            const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(xr + d), s);
            _mm256_storeu_ps(yr + d, w ? _mm256_mul_ps(v, _mm256_loadu_ps(w + d)) : v);
        }
    }
    return 0;
}

}  // extern "C"

#pragma GCC pop_options
