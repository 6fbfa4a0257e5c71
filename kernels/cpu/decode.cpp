// One decode token's dense halves of a block in one call each: `v4_block_pre` (mHC collapse, norm, the attention
// projections with their norms and RoPE) and `v4_block_post` (inverse RoPE, grouped output projection, mHC expand,
// the FFN's mHC collapse and norm, routing, routed + shared experts, mHC expand). Attention over the cache stays
// in Python between them.
//
// Why: at one token each half is ~20-40 small torch ops and ctypes calls around a few weight streams. That glue
// cost 1.1 ms a layer with every cache warm (pre 0.34, post 0.75 ms: kernels replaced by no-ops, 4-layer
// mini-Flash), and more in the real loop, where each weight stream has just flushed the caches the interpreter and
// torch's dispatcher run from (a torch call there measured up to ~10x its warm time). Here the same steps run as
// plain C++ calls into the library's own kernels (v4_matmul, v4_matmul_batch, v4_moe, v4_hc_pre/post, v4_rms_norm), so
// the results equal the unfused fast path up to the router's and RoPE's f32 rounding (the dots' summation order,
// libm's cos/sin); the model's Python composition (v4cli/model/deepseek4.py, Block.pre / Block.post) is the
// reference and the parity test holds the two together. Called through ctypes (kernels/fast_decode.py).

#include <immintrin.h>
#include <stdint.h>

#include <cmath>
#include <vector>

extern "C" {
int v4_matmul(int t, const uint8_t* W, int64_t N, int64_t K, const float* x, int64_t M, float* y, int nthreads);
int v4_matmul_batch(int n, const int* types, const uint8_t* const* Ws, const int64_t* Ns, const int64_t* Ks,
                    const float* const* xs, const int64_t* ldx, int64_t M, float* const* ys, int nthreads);
int v4_moe(const float* x, int64_t T, int64_t D, const int64_t* idx, const float* wts, int64_t k, int t1,
           const uint8_t* W1, int t3, const uint8_t* W3, int t2, const uint8_t* W2, int64_t E, int64_t I, float limit,
           float* out, int nthreads);
int v4_hc_pre(const float* X, int64_t T, int64_t S, int64_t D, const float* fn, int64_t R, const float* scale,
              const float* base, int iters, float eps, float norm_eps, float* out, float* post, float* comb,
              int nthreads);
int v4_hc_post(const float* y, const float* X, const float* post, const float* comb, int64_t T, int64_t S, int64_t D,
               float* out, int nthreads);
int v4_rms_norm(const float* x, int64_t R, int64_t D, const float* w, float eps, float* y, int nthreads);
}

// Mirrored field for field by ctypes Structures in kernels/fast_decode.py: change both together.
struct V4Mixer {
    const float* fn;
    int64_t R;
    const float* scale;
    const float* base;
    int64_t iters;
    float eps, norm_eps;
};

struct V4Linear {  // one weight: ggml type, bytes, rows N of length K, bytes per row
    int64_t type;
    const uint8_t* w;
    int64_t N, K, row_bytes;
};

struct V4Pre {
    int64_t S, D, H, d, rope_dim;
    float eps;
    V4Mixer mix;
    const float* norm;                // attn_norm [D]
    V4Linear wq_a, wkv, wq_b;
    const float* q_norm;              // [q_lora]
    const float* kv_norm;             // [d]
    const float* inv_freq;            // [rope_dim / 2]
};

struct V4Post {
    int64_t S, D, H, d, rope_dim, groups;
    float eps;
    V4Linear wo_a;                    // [groups · o_rank, H·d / groups]: group g's rows are g·o_rank ..
    V4Linear wo_b;                    // [D, groups · o_rank]
    V4Mixer mix;
    const float* norm;                // ffn_norm [D]
    const float* gate;                // router [E, D] f32
    const float* bias;                // [E] (score routing) or null
    const int64_t* tid2eid;           // [vocab, k] (hash routing) or null
    int64_t vocab, E, k;
    float route_scale, limit;
    V4Linear w1, w3, w2;              // routed experts, [E·I, D] / [E·I, D] / [E·D, I] as rows
    V4Linear s1, s3, s2;              // the shared expert: [Is, D] / [Is, D] / [D, Is]
};

#pragma GCC push_options
#pragma GCC target("avx2,fma")

namespace {

#include "hsum.inc"

float dot(const float* a, const float* b, int64_t n) {  // n a multiple of 16
    __m256 u = _mm256_setzero_ps(), v = u;
    for (int64_t i = 0; i < n; i += 16) {
        u = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), u);
        v = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), v);
    }
    return hsum8(_mm256_add_ps(u, v));
}

// The rotation at one position as (cos, sin) pairs [dim/2][2]: the angle pos · inv_freq[i] rounded to f32 first,
// as the torch reference forms it (Rope.cos_sin), then cos/sin in double rounded to f32.
void cos_sin(const float* inv, int64_t half, int64_t pos, float* cs) {
    for (int64_t i = 0; i < half; ++i) {
        const float f = (float)pos * inv[i];
        cs[2 * i] = (float)std::cos((double)f);
        cs[2 * i + 1] = (float)std::sin((double)f);
    }
}

// Rotate the trailing `dim` channels of each of `rows` rows of length D: every interleaved pair (a, b) times
// cos ± i·sin (inverse: the conjugate), Rope.apply's complex product written out.
void rope(float* x, int64_t rows, int64_t D, int64_t dim, const float* cs, bool inverse) {
    const float sgn = inverse ? -1.0f : 1.0f;
    for (int64_t r = 0; r < rows; ++r) {
        float* p = x + r * D + (D - dim);
        for (int64_t i = 0; i < dim / 2; ++i) {
            const float a = p[2 * i], b = p[2 * i + 1], c = cs[2 * i], s = sgn * cs[2 * i + 1];
            p[2 * i] = a * c - b * s;
            p[2 * i + 1] = a * s + b * c;
        }
    }
}

inline float softplus(float v) { return v > 20.0f ? v : std::log1p(std::exp(v)); }  // torch's threshold 20

// The router for one token: scores sqrt(softplus(x · gate[e])); the k experts by hash (tid2eid[token]) or by the
// largest score + bias (ties to the lower id, ordered best first as torch.topk returns them); weights the chosen
// scores normalized to sum 1, times route_scale. Returns -2 for a token outside the hash table.
int route(const V4Post& p, const float* x, int64_t token, int64_t* idx, float* wts) {
    std::vector<float> score(p.E);
    for (int64_t e = 0; e < p.E; ++e) score[e] = std::sqrt(softplus(dot(x, p.gate + e * p.D, p.D)));
    if (p.tid2eid) {
        if (token < 0 || token >= p.vocab) return -2;
        for (int64_t j = 0; j < p.k; ++j) {
            idx[j] = p.tid2eid[token * p.k + j];
            if (idx[j] < 0 || idx[j] >= p.E) return -2;
        }
    } else {
        std::vector<char> taken(p.E, 0);
        for (int64_t j = 0; j < p.k; ++j) {
            int64_t best = -1;
            float bv = 0.0f;
            for (int64_t e = 0; e < p.E; ++e) {
                const float v = score[e] + p.bias[e];
                if (!taken[e] && (best < 0 || v > bv)) best = e, bv = v;
            }
            taken[best] = 1;
            idx[j] = best;
        }
    }
    float sum = 0.0f;
    for (int64_t j = 0; j < p.k; ++j) sum += (wts[j] = score[idx[j]]);
    for (int64_t j = 0; j < p.k; ++j) wts[j] = wts[j] / (sum + 1e-20f) * p.route_scale;
    return 0;
}

}  // namespace

extern "C" {

// Streams X [S, D] at position *pos → the attention input x [D], q [H, d] (normed per head, rotated), kv [d]
// (normed, rotated), the normed q latent qr [q_lora], the rotation cs [rope_dim/2][2], and the mHC post [S] and
// comb [S, S]. Returns 0, or the first failing kernel's code (nothing is written that the caller keeps then).
int v4_block_pre(const V4Pre* p, const float* X, const int64_t* pos, float* x, float* q, float* kv, float* qr, float* cs,
                 float* post, float* comb, int nthreads) {
    const V4Pre& P = *p;
    std::vector<float> a(P.D), qa(P.wq_a.N);
    int rc = v4_hc_pre(X, 1, P.S, P.D, P.mix.fn, P.mix.R, P.mix.scale, P.mix.base, (int)P.mix.iters, P.mix.eps,
                       P.mix.norm_eps, a.data(), post, comb, nthreads);
    if (rc == 0) rc = v4_rms_norm(a.data(), 1, P.D, P.norm, P.eps, x, nthreads);
    if (rc) return rc;
    const int types[2] = {(int)P.wq_a.type, (int)P.wkv.type};
    const uint8_t* Ws[2] = {P.wq_a.w, P.wkv.w};
    const int64_t Ns[2] = {P.wq_a.N, P.wkv.N}, Ks[2] = {P.wq_a.K, P.wkv.K}, ldx[2] = {P.D, P.D};
    const float* xs[2] = {x, x};
    float* ys[2] = {qa.data(), kv};
    rc = v4_matmul_batch(2, types, Ws, Ns, Ks, xs, ldx, 1, ys, nthreads);
    if (rc == 0) rc = v4_rms_norm(qa.data(), 1, P.wq_a.N, P.q_norm, P.eps, qr, nthreads);
    if (rc == 0) rc = v4_matmul((int)P.wq_b.type, P.wq_b.w, P.wq_b.N, P.wq_b.K, qr, 1, q, nthreads);
    if (rc == 0) rc = v4_rms_norm(q, P.H, P.d, nullptr, P.eps, q, nthreads);
    if (rc == 0) rc = v4_rms_norm(kv, 1, P.d, P.kv_norm, P.eps, kv, nthreads);
    if (rc) return rc;
    cos_sin(P.inv_freq, P.rope_dim / 2, *pos, cs);
    rope(q, P.H, P.d, P.rope_dim, cs, false);
    rope(kv, 1, P.d, P.rope_dim, cs, false);
    return 0;
}

// The attention output attn [H, d] (before the inverse rotation; not modified) and the block's input streams X
// [S, D] with their mHC post / comb → the streams after the whole block, Xout [S, D]; *token is the token id (hash
// routing). Returns 0, -2 for a token or expert id out of range, or the first failing kernel's code.
int v4_block_post(const V4Post* p, const float* attn, const float* cs, const float* X, const float* post,
                  const float* comb, const int64_t* token, float* Xout, int nthreads) {
    const V4Post& P = *p;
    const int64_t HD = P.H * P.d, G = P.groups, R = P.wo_a.N / G;
    std::vector<float> o(attn, attn + HD), y(P.wo_a.N), h(P.D), X1(P.S * P.D), a(P.D), post2(P.S), comb2(P.S * P.S),
        xm(P.D), routed(P.D), shared(P.D);
    rope(o.data(), P.H, P.d, P.rope_dim, cs, true);
    // the output groups in one batch: group g's rows of wo_a against its slice of the heads
    std::vector<int> types(G, (int)P.wo_a.type);
    std::vector<const uint8_t*> Ws(G);
    std::vector<int64_t> Ns(G, R), Ks(G, P.wo_a.K), ldx(G, P.wo_a.K);
    std::vector<const float*> xs(G);
    std::vector<float*> ys(G);
    for (int64_t g = 0; g < G; ++g) {
        Ws[g] = P.wo_a.w + g * R * P.wo_a.row_bytes;
        xs[g] = o.data() + g * P.wo_a.K;
        ys[g] = y.data() + g * R;
    }
    int rc = v4_matmul_batch((int)G, types.data(), Ws.data(), Ns.data(), Ks.data(), xs.data(), ldx.data(), 1,
                             ys.data(), nthreads);
    if (rc == 0) rc = v4_matmul((int)P.wo_b.type, P.wo_b.w, P.wo_b.N, P.wo_b.K, y.data(), 1, h.data(), nthreads);
    if (rc == 0) rc = v4_hc_post(h.data(), X, post, comb, 1, P.S, P.D, X1.data(), nthreads);
    if (rc == 0)
        rc = v4_hc_pre(X1.data(), 1, P.S, P.D, P.mix.fn, P.mix.R, P.mix.scale, P.mix.base, (int)P.mix.iters,
                       P.mix.eps, P.mix.norm_eps, a.data(), post2.data(), comb2.data(), nthreads);
    if (rc == 0) rc = v4_rms_norm(a.data(), 1, P.D, P.norm, P.eps, xm.data(), nthreads);
    if (rc) return rc;
    std::vector<int64_t> idx(P.k);
    std::vector<float> wts(P.k);
    if ((rc = route(P, xm.data(), *token, idx.data(), wts.data()))) return rc;
    const int64_t I = P.w1.N / P.E, Is = P.s1.N, zero = 0;
    const float one = 1.0f;
    rc = v4_moe(xm.data(), 1, P.D, idx.data(), wts.data(), P.k, (int)P.w1.type, P.w1.w, (int)P.w3.type, P.w3.w,
                (int)P.w2.type, P.w2.w, P.E, I, P.limit, routed.data(), nthreads);
    if (rc == 0)
        rc = v4_moe(xm.data(), 1, P.D, &zero, &one, 1, (int)P.s1.type, P.s1.w, (int)P.s3.type, P.s3.w, (int)P.s2.type,
                    P.s2.w, 1, Is, P.limit, shared.data(), nthreads);
    if (rc) return rc;
    for (int64_t i = 0; i < P.D; ++i) routed[i] += shared[i];
    return v4_hc_post(routed.data(), X1.data(), post2.data(), comb2.data(), 1, P.S, P.D, Xout, nthreads);
}

}  // extern "C"

#pragma GCC pop_options
