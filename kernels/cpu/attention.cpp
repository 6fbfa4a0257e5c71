// The lightning indexer's decode-time scores, fused: for one query's H heads q [H, d] with weights w [H],
//   score[n] = scale · Σ_h w[h] · relu(q[h] · k[n])      over the stored index keys k [N, d] (f32 or bf16).
// The torch reference (kernels/attention.py) decodes every key to f32, multiplies out an [H, N] logit matrix, then
// applies relu and the weighted head sum: at long context that is three passes over N·H values per layer and
// step, where this reads each key once (in its stored format) and keeps the H dots in registers. f32 FMAs against
// the keys widened to f32: the same products as the reference, only the summation order differs.
// Called through ctypes (kernels/cpu_ext.py), only when the CPU has AVX2 + FMA.

#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include <vector>

#pragma GCC push_options
#pragma GCC target("avx2,fma")

namespace {

constexpr int HG = 8;         // heads per accumulator vector
constexpr int MAX_GROUPS = 8;  // up to 64 heads in registers

#include "hsum.inc"

// one key row k [d] (f32) against qt [d][G·8] (the heads transposed: channel-major) → the weighted relu sum
template <int G>
float score_row(const float* k, const float* qt, int64_t d, const __m256* w) {
    __m256 acc[G];
    for (int g = 0; g < G; ++g) acc[g] = _mm256_setzero_ps();
    for (int64_t c = 0; c < d; ++c) {
        const __m256 kc = _mm256_broadcast_ss(k + c);
        const float* qc = qt + c * G * HG;
        for (int g = 0; g < G; ++g) acc[g] = _mm256_fmadd_ps(kc, _mm256_loadu_ps(qc + g * HG), acc[g]);
    }
    __m256 s = _mm256_setzero_ps();
    for (int g = 0; g < G; ++g) s = _mm256_fmadd_ps(_mm256_max_ps(acc[g], _mm256_setzero_ps()), w[g], s);
    return hsum8(s);
}

template <int G>
void score_rows(const uint8_t* keys, int bf16, int64_t n0, int64_t n1, int64_t d, const float* qt, const float* wv,
                float scale, float* out) {
    __m256 w[G];
    for (int g = 0; g < G; ++g) w[g] = _mm256_loadu_ps(wv + g * HG);
    std::vector<float> row(bf16 ? d : 0);
    for (int64_t n = n0; n < n1; ++n) {
        const float* k;
        if (bf16) {  // widen the row once: bf16 is the top half of an f32
            const uint16_t* src = (const uint16_t*)keys + n * d;
            int64_t c = 0;
            for (; c + 8 <= d; c += 8)
                _mm256_storeu_ps(row.data() + c, _mm256_castsi256_ps(_mm256_slli_epi32(
                    _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(src + c))), 16)));
            for (; c < d; ++c) {
                const uint32_t u = (uint32_t)src[c] << 16;
                memcpy(row.data() + c, &u, 4);
            }
            k = row.data();
        } else {
            k = (const float*)keys + n * d;
        }
        out[n] = scale * score_row<G>(k, qt, d, w);
    }
}

}  // namespace

extern "C" {

// q [H, d] f32, w [H] f32, keys [N, d] f32 (key_bf16 = 0) or bf16 (1) → out [N]. Returns 0, or -1 for H not a
// multiple of 8 or above 64.
int v4_index_scores(const float* q, const float* w, const void* keys, int key_bf16, int64_t N, int64_t d, int64_t H,
                    float scale, float* out, int nthreads) {
    if (H % HG || H <= 0 || H > HG * MAX_GROUPS || d <= 0) return -1;
    std::vector<float> qt(d * H);  // channel-major: each channel's H values are contiguous
    for (int64_t h = 0; h < H; ++h)
        for (int64_t c = 0; c < d; ++c) qt[c * H + h] = q[h * d + c];
    const uint8_t* k = (const uint8_t*)keys;
    const int G = (int)(H / HG);
    const int64_t per = 64;  // keys per task
    const int64_t tasks = (N + per - 1) / per;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1 && N * H * d > (1 << 20))
    for (int64_t t = 0; t < tasks; ++t) {
        const int64_t n0 = t * per, n1 = n0 + per < N ? n0 + per : N;
        switch (G) {
            case 1: score_rows<1>(k, key_bf16, n0, n1, d, qt.data(), w, scale, out); break;
            case 2: score_rows<2>(k, key_bf16, n0, n1, d, qt.data(), w, scale, out); break;
            case 3: score_rows<3>(k, key_bf16, n0, n1, d, qt.data(), w, scale, out); break;
            case 4: score_rows<4>(k, key_bf16, n0, n1, d, qt.data(), w, scale, out); break;
            case 5: score_rows<5>(k, key_bf16, n0, n1, d, qt.data(), w, scale, out); break;
            case 6: score_rows<6>(k, key_bf16, n0, n1, d, qt.data(), w, scale, out); break;
            case 7: score_rows<7>(k, key_bf16, n0, n1, d, qt.data(), w, scale, out); break;
            default: score_rows<8>(k, key_bf16, n0, n1, d, qt.data(), w, scale, out); break;
        }
    }
    return 0;
}

}  // extern "C"

#pragma GCC pop_options
