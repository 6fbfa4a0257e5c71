// Fused dequantize-and-multiply CPU kernels for ggml block formats, called through ctypes (kernels/cpu_ext.py).
//
// y[M, N] = x[M, K] · W[N, K]ᵀ with W in its GGUF encoding. Activations are quantized to int8 per 32 elements
// (scale = absmax / 127) for the integer formats; BF16 / F16 weights multiply f32 activations directly, except
// BF16 on CPUs with AVX512-BF16, which dots bf16-rounded activations (see bf16dot below).
// The ISA body is compiled twice (AVX2, AVX-512 VNNI) and picked at run time, so one build runs on both.
// Work is split over output rows with OpenMP; the library links the same libgomp that torch loaded, so the
// thread count is torch's.

#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

// ggml type ids
enum : int { T_F16 = 1, T_Q4_0 = 2, T_Q5_0 = 6, T_Q8_0 = 8, T_Q2_K = 10, T_Q3_K = 11, T_Q4_K = 12, T_Q5_K = 13,
             T_Q6_K = 14, T_IQ2_XXS = 16, T_IQ2_XS = 17, T_IQ3_XXS = 18, T_IQ1_S = 19, T_IQ4_NL = 20, T_IQ3_S = 21,
             T_IQ2_S = 22, T_IQ4_XS = 23, T_IQ1_M = 29, T_BF16 = 30, T_MXFP4 = 39, T_COUNT = 40 };

// The I-quants' lattices and IQ4_NL's 16 values, copied once from gguf-py's tables by v4_set_grid (see
// kernels/cpu_ext.py): an 8-value entry is one 64-bit word (a 4-value one 32 bits), so a decode loads one word per
// entry from L1. Lattice values g are kept as g + OFFSET (the type's largest g, lattice_offset), IQ1_S's and IQ1_M's
// shared lattice as 8·(g + 1) ∈ {0, 8, 16} (see iquant_isa.inc). The kernels of a type are offered (supported())
// only once its table is set.
struct Grids {
    alignas(64) uint64_t iq2xxs[256];
    alignas(64) uint64_t iq2xs[512];
    alignas(64) uint64_t iq2s[1024];
    alignas(64) uint64_t iq1[2048];
    alignas(64) uint32_t iq3xxs[256];
    alignas(64) uint32_t iq3s[512];
    alignas(16) int8_t iq4nl[16];
    bool ready[T_COUNT];
};
Grids g_grid;

// The largest lattice value of each lattice type: its chunks come out as OFFSET ± g (iquant_isa.inc).
constexpr int lattice_offset(int t) {
    return t == T_IQ3_XXS ? 62 : t == T_IQ3_S ? 15 : t == T_IQ2_XXS || t == T_IQ2_XS || t == T_IQ2_S ? 43 : 0;
}

// One activation row: int8 values with per-32 scales and per-16 / per-32 sums (of the quantized values, so the
// offset terms see the same x as the dots), and the f32 row for the float kernels.
struct XRow {
    const int8_t* q;
    const float* d;
    const float* s16;
    const float* s32;
    const int8_t* qp;  // q with block pairs interleaved by 16-halves (the 256-bit MXFP4 order), see XQuant::pair
    const float* f;
    const float* fp;  // f with each 16 reordered evens-then-odds (BF16's decode order), see XQuant::deinterleave
    const uint16_t* fb16;  // f rounded to bf16 (nearest even), for the AVX512-BF16 dot
    const int32_t* c32;  // −128·Σq per 32-block: takes back the +128 the VNNI Q8_0 kernel adds to its weights
    // For the 512-bit MXFP4 kernel (zmm::rows_mxfp4), per group of 4 blocks: q4 the 128 values as the four blocks'
    // 0-15 halves then their 16-31 halves, d4 each block's scale 4 times (one per dot lane), c4 −12·Σq over each
    // dot lane's 8 values. MXFP4 callers get these where that kernel runs (Kernels::quads, rows of whole groups),
    // else qp.
    const int8_t* q4;
    const float* d4;
    const int32_t* c4;
};

using RowFn = void (*)(const uint8_t* W, int64_t rb, int64_t K, const XRow* xs, float* const* y, int64_t r0, int64_t r1);
using DeqFn = void (*)(const uint8_t* w, int64_t K, float* out);
using QuantFn = void (*)(const float* x, int64_t K, int8_t* q, float* d, float* s16, float* s32);

// Activation rows per kernel call; more rows run in groups of MAX_M over the same (cached) weight rows.
constexpr int MAX_M = 4;

// M activation rows quantized once for the int8 GEMM (qgemm_isa.inc), row-major: q [M][K], d [M][K/32], and
// per scale group of the weight type (ng = K/gs groups a row): s [M][ng] = d·Σq (mins), corr [M][ng] = −bias·Σq.
struct GemmX {
    const int8_t* q;
    const float* d;
    const float* s;
    const int32_t* corr;
    int64_t M, K;
};

// Packs weight rows n0..n0+valid into buf and writes y[:, n0..n0+valid] for all M rows.
using GemmTileFn = void (*)(const uint8_t* W, int64_t rb, int64_t n0, int valid, const GemmX& x, float* y,
                            int64_t ldy, uint8_t* buf);
using GemmCorrFn = void (*)(const int8_t* q, int64_t K, int gs, int bias, int32_t* out);

struct GemmKernel {
    GemmTileFn tile;
    int gs, bias;  // scale-group size (16 / 32) and the weight bias that GemmX::corr takes back out
};

struct Kernels {
    RowFn rows[T_COUNT][MAX_M];
    DeqFn deq[T_COUNT];
    QuantFn quant;
    GemmKernel gemm[T_COUNT];
    int gemm_rows;  // weight rows per GEMM tile
    GemmCorrFn gemm_corr;
    bool quads;  // the MXFP4 rows read XRow::q4 / d4 / c4
};

}  // namespace

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
#define V4_VNNI 0
#include "qmatmul_isa.inc"
#include "qgemm_isa.inc"
#undef V4_VNNI
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")
namespace vnni {
#define V4_VNNI 1
#include "qmatmul_isa.inc"
#include "qgemm_isa.inc"
#undef V4_VNNI
}  // namespace vnni
#pragma GCC pop_options

// BF16 rows with AVX512-BF16's dot (vdpbf16ps: 16 bf16 products summed pairwise into 8 f32 lanes per op) against
// the activations rounded to bf16, as llama.cpp does: one instruction per 32 bytes of weights, where the
// shift/mask decode + two FMAs leave too few loads in flight to stream at the memory's rate on one core. Costs
// the activations' bf16 rounding (~2e-3 relative on a row's dot), the same order as the int8 types' quantization.
#pragma GCC push_options
#pragma GCC target("avx2,fma,avx512f,avx512vl,avx512bw,avx512bf16")
namespace bf16dot {

template <int M>
void rows(const uint8_t* W, int64_t rb, int64_t K, const XRow* xs, float* const* y, int64_t r0, int64_t r1) {
    constexpr int A = M <= 2 ? 4 : 2;  // 16-element steps per iteration, one accumulator each
    for (int64_t r = r0; r < r1; ++r) {
        const uint8_t* w = W + r * rb;
        __m256 acc[M][A];
        for (int m = 0; m < M; ++m)
            for (int a = 0; a < A; ++a) acc[m][a] = _mm256_setzero_ps();
        int64_t k = 0;
        for (; k + 16 * A <= K; k += 16 * A)
            for (int a = 0; a < A; ++a) {
                const __m256bh v = (__m256bh)_mm256_loadu_si256((const __m256i*)(w + 2 * (k + 16 * a)));
                for (int m = 0; m < M; ++m)
                    acc[m][a] = _mm256_dpbf16_ps(acc[m][a], v, (__m256bh)_mm256_loadu_si256((const __m256i*)(xs[m].fb16 + k + 16 * a)));
            }
        for (int m = 0; m < M; ++m) {
            __m256 t = acc[m][0];
            for (int a = 1; a < A; ++a) t = _mm256_add_ps(t, acc[m][a]);
            __m128 h = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
            h = _mm_add_ps(h, _mm_movehl_ps(h, h));
            float sum = _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
            for (int64_t j = k; j < K; ++j) {  // tail: plain f32
                const uint32_t u = (uint32_t)(w[2 * j] | (w[2 * j + 1] << 8)) << 16;
                float f;
                memcpy(&f, &u, 4);
                sum += f * xs[m].f[j];
            }
            y[m][r] = sum;
        }
    }
}

void install(Kernels* k) {
    k->rows[T_BF16][0] = rows<1>;
    k->rows[T_BF16][1] = rows<2>;
    k->rows[T_BF16][2] = rows<3>;
    k->rows[T_BF16][3] = rows<4>;
}

}  // namespace bf16dot
#pragma GCC pop_options

// MXFP4 rows in 512-bit registers, four 17-byte blocks per step, for CPUs with AVX512-VBMI (Zen 4, Ice Lake on).
// The 256-bit kernel issues ~40 instructions per 4 blocks (two unaligned pair loads, per-pair scale permutes, an
// exponent gather) and runs at ~15 GB/s a core from cache, under the memory's rate. Here a step is ~15: two
// loads and one byte permute (vpermt2b) line the four blocks' nibbles up, vpermb looks the values up, a masked
// vpermb puts each exponent under its dot lanes, and vscalefps applies 2^(e−128) to the activation scale
// directly. Each lane's dot is seeded with −12·Σq (XRow::c4) to take out the table's +12, so the integer dots stay
// exact and only the f32 summation order differs from the 256-bit kernel. Zen 4, one thread, interleaved in one
// process: 19.0 → 21.4-22.6 GB/s from L2; from DRAM only with the software prefetch below (without it the two
// overlapping 64-byte loads per step streamed slower than the 256-bit kernel: 11 vs 13 GB/s).
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512vbmi")
namespace zmm {

// Bytes ahead of the step to prefetch (4 KB, ~60 steps): 12.3 → 16.5 GB/s one thread, 22.0 → 25.2 two, 71 MB from
// DRAM, interleaved in one process. The same prefetch made the Q8_0 and BF16 kernels slower, so they have none.
constexpr int PREFETCH = 4096;

// Byte permutes of one step, over the 68 bytes of 4 blocks loaded as bytes 0-63 and 4-67.
struct Perm {
    alignas(64) uint8_t nib[64];  // block i/16's nibble byte i % 16 (past byte 63: from the second load)
    alignas(64) uint8_t ex[64];   // block i/16's exponent byte, in each of its dot lanes (only the low byte is kept)
};
constexpr Perm make_perm() {
    Perm p{};
    for (int i = 0; i < 64; ++i) {
        const int src = 17 * (i / 16) + 1 + i % 16;
        p.nib[i] = (uint8_t)(src < 64 ? src : 64 + src - 4);
        p.ex[i] = (uint8_t)(17 * (i / 16));
    }
    return p;
}
constexpr Perm PERM = make_perm();

template <int M>
void rows_mxfp4(const uint8_t* W, int64_t rb, int64_t K, const XRow* xs, float* const* y, int64_t r0, int64_t r1) {
    const int64_t ng = K / 128;
    if (K % 128) return vnni::rows_mxfp4<M>(W, rb, K, xs, y, r0, r1);
    constexpr int A = M == 1 ? 4 : 2;  // accumulators per activation row: cover the FMA latency
    const __m512i nib_idx = _mm512_load_si512(PERM.nib), ex_idx = _mm512_load_si512(PERM.ex);
    // vpermb reads 6 index bits: the table repeats 4 times, so the bits above a nibble need no mask
    const __m512i table = _mm512_broadcast_i32x4(_mm_setr_epi8(12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0));
    const __m512 bias = _mm512_set1_ps(128.0f);
    for (int64_t r = r0; r < r1; ++r) {
        const uint8_t* w = W + r * rb;
        __m512 acc[A][M];
        for (int a = 0; a < A; ++a)
            for (int m = 0; m < M; ++m) acc[a][m] = _mm512_setzero_ps();
        auto group = [&](int64_t g, __m512* ac) {
            const uint8_t* b = w + g * 4 * 17;
            _mm_prefetch((const char*)b + PREFETCH, _MM_HINT_T0);
            const __m512i v0 = _mm512_loadu_si512(b), v1 = _mm512_loadu_si512(b + 4);
            const __m512i q = _mm512_permutex2var_epi8(v0, nib_idx, v1);
            const __m512i e = _mm512_maskz_permutexvar_epi8(0x1111111111111111ULL, ex_idx, v0);
            const __m512 pow2 = _mm512_sub_ps(_mm512_cvtepi32_ps(e), bias);
            const __m512i lo = _mm512_permutexvar_epi8(q, table);
            const __m512i hi = _mm512_permutexvar_epi8(_mm512_srli_epi16(q, 4), table);
            for (int m = 0; m < M; ++m) {
                const int8_t* x = xs[m].q4 + 128 * g;
                __m512i d = _mm512_load_si512(xs[m].c4 + 16 * g);
                d = _mm512_dpbusd_epi32(d, lo, _mm512_load_si512(x));
                d = _mm512_dpbusd_epi32(d, hi, _mm512_load_si512(x + 64));
                const __m512 sc = _mm512_scalef_ps(_mm512_load_ps(xs[m].d4 + 16 * g), pow2);
                ac[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), sc, ac[m]);
            }
        };
        int64_t g = 0;
        for (; g + A <= ng; g += A)  // unrolled so that each accumulator stays in a register
#pragma GCC unroll 4
            for (int a = 0; a < A; ++a) group(g + a, acc[a]);
        for (; g < ng; ++g) group(g, acc[0]);
        for (int m = 0; m < M; ++m) {
            __m512 t = acc[0][m];
            for (int a = 1; a < A; ++a) t = _mm512_add_ps(t, acc[a][m]);
            y[m][r] = _mm512_reduce_add_ps(t);
        }
    }
}

void install(Kernels* k) {
    k->rows[T_MXFP4][0] = rows_mxfp4<1>;
    k->rows[T_MXFP4][1] = rows_mxfp4<2>;
    k->rows[T_MXFP4][2] = rows_mxfp4<3>;
    k->rows[T_MXFP4][3] = rows_mxfp4<4>;
    k->quads = true;
}

}  // namespace zmm
#pragma GCC pop_options

namespace {

int g_isa = -1;
Kernels g_k;

// The best ISA level this CPU runs: 2 (AVX-512 VNNI), 1 (AVX2), 0 (neither).
int cpu_isa() {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw"))
        return 2;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) return 1;
    return 0;
}

void install_isa(int level) {
    memset(&g_k, 0, sizeof g_k);
    if (level == 2) {
        vnni::install(&g_k);
        vnni::install_gemm(&g_k);
        if (__builtin_cpu_supports("avx512bf16")) bf16dot::install(&g_k);
        if (__builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("avx512dq")) zmm::install(&g_k);
    } else if (level == 1) {
        avx2::install(&g_k);
        avx2::install_gemm(&g_k);
    }
    g_isa = level;
}

void init() {
    if (g_isa < 0) install_isa(cpu_isa());
}

// Elements and bytes per block (the ggml layouts, as in gguf-py's GGML_QUANT_SIZES); 0 for types with no kernels.
struct BlockSize { int elems, bytes; };
BlockSize block_layout(int t) {
    switch (t) {
        case T_Q8_0: return {32, 34};
        case T_Q4_0: case T_IQ4_NL: return {32, 18};
        case T_Q5_0: return {32, 22};
        case T_MXFP4: return {32, 17};
        case T_Q2_K: return {256, 84};
        case T_Q3_K: return {256, 110};
        case T_Q4_K: return {256, 144};
        case T_Q5_K: return {256, 176};
        case T_Q6_K: return {256, 210};
        case T_IQ2_XXS: return {256, 66};
        case T_IQ2_XS: return {256, 74};
        case T_IQ2_S: return {256, 82};
        case T_IQ3_XXS: return {256, 98};
        case T_IQ3_S: return {256, 110};
        case T_IQ1_S: return {256, 50};
        case T_IQ1_M: return {256, 56};
        case T_IQ4_XS: return {256, 136};
        case T_BF16: case T_F16: return {1, 2};
        default: return {0, 0};
    }
}

int block_size(int t) { return block_layout(t).elems; }

bool is_float(int t) { return t == T_BF16 || t == T_F16; }

// Quantized activations for R rows of length K, kept in one reusable per-thread buffer.
struct XQuant {
    std::vector<int8_t> q, qp;
    std::vector<float> d, s16, s32, fp;
    std::vector<int32_t> c32;
    std::vector<uint16_t> b16;
    std::vector<int8_t> q4;
    std::vector<float> d4;
    std::vector<int32_t> c4;
    std::vector<XRow> rows;

    // `ints`: the int8 rows and sums the integer kernels read; `floats`: the reordered f32 and the bf16 copies the
    // float kernels read; `mxfp4`: also the order the MXFP4 kernel in use reads (quads or pairs, see XRow). Only
    // what some kernel of the call reads is built.
    void quantize(const float* x, int64_t R, int64_t K, int64_t ldx, bool ints, bool floats, bool mxfp4) {
        rows.resize(R);
        for (int64_t r = 0; r < R; ++r) {
            rows[r] = XRow{};
            rows[r].f = x + r * ldx;
        }
        if (floats) {
            float* fb = aligned(fp, R * K);
            uint16_t* hb = aligned(b16, R * K);
            for (int64_t r = 0; r < R; ++r) {
                deinterleave(x + r * ldx, K, fb + r * K);
                to_bf16(x + r * ldx, K, hb + r * K);
                rows[r].fp = fb + r * K;
                rows[r].fb16 = hb + r * K;
            }
        }
        if (!ints) return;
        const int64_t nb = K / 32;
        int8_t* qb = aligned(q, R * K);
        d.resize(R * nb);
        s32.resize(R * nb);
        s16.resize(R * nb * 2);
        c32.resize(R * nb);
        for (int64_t r = 0; r < R; ++r) {
            int8_t* qr = qb + r * K;
            g_k.quant(x + r * ldx, K, qr, d.data() + r * nb, s16.data() + r * nb * 2, s32.data() + r * nb);
            rows[r].q = qr, rows[r].d = d.data() + r * nb, rows[r].s16 = s16.data() + r * nb * 2;
            rows[r].s32 = s32.data() + r * nb;
            g_k.gemm_corr(qr, K, 32, 128, c32.data() + r * nb);  // the GEMM's −bias·Σq per group, here per 32
            rows[r].c32 = c32.data() + r * nb;
        }
        if (!mxfp4) return;
        if (!g_k.quads || K % 128) {
            int8_t* qpb = aligned(qp, R * K);
            for (int64_t r = 0; r < R; ++r) {
                pair(rows[r].q, K, qpb + r * K);
                rows[r].qp = qpb + r * K;
            }
            return;
        }
        int8_t* q4b = aligned(q4, R * K);
        float* d4b = aligned(d4, R * K / 8);
        int32_t* c4b = aligned(c4, R * K / 8);
        for (int64_t r = 0; r < R; ++r) {
            quad(rows[r].q, rows[r].d, K, q4b + r * K, d4b + r * K / 8, c4b + r * K / 8);
            rows[r].q4 = q4b + r * K, rows[r].d4 = d4b + r * K / 8, rows[r].c4 = c4b + r * K / 8;
        }
    }

    // Groups of 4 blocks in the 512-bit MXFP4 kernel's order: the blocks' 0-15 halves, then their 16-31 halves;
    // per dot lane (4 per block, each over values 4j..4j+3 and 16+4j..16+4j+3) the block's scale and −12·Σq.
    static void quad(const int8_t* q, const float* d, int64_t K, int8_t* q4, float* d4, int32_t* c4) {
        for (int64_t g = 0; g < K / 128; ++g)
            for (int k = 0; k < 4; ++k) {
                const int8_t* s = q + 128 * g + 32 * k;
                memcpy(q4 + 128 * g + 16 * k, s, 16);
                memcpy(q4 + 128 * g + 64 + 16 * k, s + 16, 16);
                for (int j = 0; j < 4; ++j) {
                    int32_t sum = 0;
                    for (int i = 0; i < 4; ++i) sum += s[4 * j + i] + s[16 + 4 * j + i];
                    d4[16 * g + 4 * k + j] = d[4 * g + k];
                    c4[16 * g + 4 * k + j] = -12 * sum;
                }
            }
    }

    // n elements of v starting on a 64-byte boundary: a vector load that straddles two cache lines costs two,
    // and with K a multiple of 32 every row then starts aligned too
    template <class T>
    static T* aligned(std::vector<T>& v, int64_t n) {
        v.resize(n + 64 / sizeof(T));
        const uintptr_t p = (uintptr_t)v.data();
        return (T*)((p + 63) & ~(uintptr_t)63);
    }

    // Round to nearest even (the activations are finite: no NaN case).
    static void to_bf16(const float* x, int64_t K, uint16_t* o) {
        for (int64_t k = 0; k < K; ++k) {
            uint32_t u;
            memcpy(&u, x + k, 4);
            o[k] = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
        }
    }

    // Each whole 16 as its 8 even then its 8 odd elements; a tail shorter than 16 is copied as is.
    static void deinterleave(const float* x, int64_t K, float* o) {
        int64_t k = 0;
        for (; k + 16 <= K; k += 16)
            for (int i = 0; i < 8; ++i) {
                o[k + i] = x[k + 2 * i];
                o[k + 8 + i] = x[k + 2 * i + 1];
            }
        for (; k < K; ++k) o[k] = x[k];
    }

    // Blocks 2p, 2p+1 as [2p: 0-15, 2p+1: 0-15, 2p: 16-31, 2p+1: 16-31]; an odd last block is copied as is.
    static void pair(const int8_t* q, int64_t K, int8_t* qp) {
        const int64_t nb = K / 32;
        for (int64_t b = 0; b + 1 < nb; b += 2) {
            const int8_t* s = q + 32 * b;
            int8_t* o = qp + 32 * b;
            memcpy(o, s, 16);
            memcpy(o + 16, s + 32, 16);
            memcpy(o + 32, s + 16, 16);
            memcpy(o + 48, s + 48, 16);
        }
        if (nb & 1) memcpy(qp + 32 * (nb - 1), q + 32 * (nb - 1), 32);
    }
};

XQuant& scratch(int i) {
    static thread_local XQuant bufs[2];
    return bufs[i];
}

// Rows per parallel task: small enough to balance, large enough that a task reads a few KB of weights.
constexpr int64_t ROWS_PER_TASK = 16;

// Decode products hand out their rows in ~2 MB runs, first come first served (OpenMP dynamic schedule), rather
// than one contiguous half per thread. On a shared machine one core's stream is often slower for a while, and with
// fixed halves the other core then idles at the end of every call: over 30 calls of 35 MB (Q8_0, two threads,
// interleaved in one process) the dynamic split measured 1.06-1.22x the static one; 0.5 MB runs gained less, and
// 9 MB runs (two per thread) lost. Each run is still a long contiguous stream for the hardware prefetchers.
constexpr int64_t RUN_BYTES = 2 << 20;

// Tasks per dynamic run for `ntask` tasks of `task_bytes` weight bytes each, and at most ntask / (2·nthreads), so
// that a product under ~4 MB a thread still feeds every thread: with whole 2 MB runs a 2048×4096 IQ2_XXS matrix
// (2.2 MB) was one run and ran on one of two threads.
inline int run_tasks(int64_t task_bytes, int64_t ntask, int nthreads) {
    const int64_t by_bytes = RUN_BYTES / std::max<int64_t>(1, task_bytes);
    return (int)std::max<int64_t>(1, std::min(by_bytes, ntask / (2 * std::max(1, nthreads))));
}

// All M activation rows against weight rows r0..r1, MAX_M at a time; the weight rows stay in L1/L2 between
// groups, so memory sees each weight byte once.
void run_rows(int t, const uint8_t* W, int64_t rb, int64_t K, const XRow* xs, int64_t M, float* y, int64_t ldy,
              int64_t r0, int64_t r1) {
    float* yp[MAX_M];
    for (int64_t m0 = 0; m0 < M; m0 += MAX_M) {
        const int64_t mm = M - m0 < MAX_M ? M - m0 : MAX_M;
        for (int64_t m = 0; m < mm; ++m) yp[m] = y + (m0 + m) * ldy;
        g_k.rows[t][mm - 1](W, rb, K, xs + m0, yp, r0, r1);
    }
}

int64_t row_bytes(int t, int64_t K) {
    const BlockSize b = block_layout(t);
    return K / b.elems * b.bytes;
}

bool needs_grid(int t) {
    switch (t) {
        case T_IQ2_XXS: case T_IQ2_XS: case T_IQ2_S: case T_IQ3_XXS: case T_IQ3_S: case T_IQ1_S: case T_IQ1_M:
        case T_IQ4_XS: case T_IQ4_NL: return true;
        default: return false;
    }
}

bool supported(int t, int64_t K) {
    init();
    if (t < 0 || t >= T_COUNT || !g_k.rows[t][0] || (needs_grid(t) && !g_grid.ready[t])) return false;
    const int bs = block_size(t);
    // the int8 activation layout needs whole 32-blocks even for float types' callers of quantize
    return bs > 0 && K > 0 && K % bs == 0;
}

// The GEMM's quantized activations, shared by the threads of one call.
struct GemmScratch {
    std::vector<int8_t> q;
    std::vector<float> d, s16, s32;
    std::vector<int32_t> corr;
};

// One thread's packed-tile buffer: TR·K weight bytes, then a scale and a min per (row, group of ≥ 16).
uint8_t* gemm_buffer(int64_t K) {
    static thread_local std::vector<uint8_t> buf;
    return (uint8_t*)XQuant::aligned(buf, 2 * g_k.gemm_rows * K);
}

}  // namespace

extern "C" {

// 0: no usable SIMD (callers keep the torch reference), 1: AVX2, 2: AVX-512 VNNI.
int v4_isa(void) {
    init();
    return g_isa;
}

int v4_supported(int t, int64_t K) { return supported(t, K) ? 1 : 0; }

// Type t's block layout (0 elements: no kernels) and whether its kernels read a value table set by v4_set_grid:
// the Python side checks these against its one type table (quant/ggml.py) instead of keeping lists of its own.
int v4_block_layout(int t, int64_t* elems, int64_t* bytes) {
    const BlockSize b = t >= 0 && t < T_COUNT ? block_layout(t) : BlockSize{0, 0};
    *elems = b.elems, *bytes = b.bytes;
    return 0;
}

int v4_needs_grid(int t) { return t >= 0 && t < T_COUNT && needs_grid(t) ? 1 : 0; }

// The lattice (or value table) of type t as n int8 values, entry after entry in gguf-py's order; called once at
// load, before any kernel of t runs. Returns 0, or -1 (nothing written) for a type without a table, a wrong size or
// a value outside the type's range.
int v4_set_grid(int t, const int8_t* v, int64_t n) {
    int64_t want;
    int lo, hi;  // the values' range
    switch (t) {
        case T_IQ2_XXS: want = 256 * 8, lo = 0, hi = lattice_offset(t); break;
        case T_IQ2_XS: want = 512 * 8, lo = 0, hi = lattice_offset(t); break;
        case T_IQ2_S: want = 1024 * 8, lo = 0, hi = lattice_offset(t); break;
        case T_IQ3_XXS: want = 256 * 4, lo = 0, hi = lattice_offset(t); break;
        case T_IQ3_S: want = 512 * 4, lo = 0, hi = lattice_offset(t); break;
        case T_IQ1_S: case T_IQ1_M: want = 2048 * 8, lo = -1, hi = 1; break;
        case T_IQ4_NL: case T_IQ4_XS: want = 16, lo = -128, hi = 127; break;
        default: return -1;
    }
    if (n != want) return -1;
    for (int64_t i = 0; i < n; ++i)
        if (v[i] < lo || v[i] > hi) return -1;
    uint8_t* dst;
    switch (t) {
        case T_IQ2_XXS: dst = (uint8_t*)g_grid.iq2xxs; break;
        case T_IQ2_XS: dst = (uint8_t*)g_grid.iq2xs; break;
        case T_IQ2_S: dst = (uint8_t*)g_grid.iq2s; break;
        case T_IQ3_XXS: dst = (uint8_t*)g_grid.iq3xxs; break;
        case T_IQ3_S: dst = (uint8_t*)g_grid.iq3s; break;
        case T_IQ1_S: case T_IQ1_M: dst = (uint8_t*)g_grid.iq1; break;
        default: dst = (uint8_t*)g_grid.iq4nl; break;
    }
    // entries are little-endian words: value i of an entry is its byte i
    for (int64_t i = 0; i < n; ++i) {
        const int x = v[i];
        dst[i] = (uint8_t)(t == T_IQ1_S || t == T_IQ1_M ? 8 * (x + 1) : t == T_IQ4_NL || t == T_IQ4_XS ? x : x + lattice_offset(t));
    }
    g_grid.ready[t] = true;
    return 0;
}

// Tests: switch to the kernels of ISA `level` (1 runs the AVX2 build on an AVX-512 machine) and return the level
// in effect; a level above what the CPU runs, or 0, is ignored. Not thread-safe against running kernels.
int v4_set_isa(int level) {
    init();
    if (level >= 1 && level <= cpu_isa()) install_isa(level);
    return g_isa;
}

// y[M, N] = x[M, K] · W[N, K]ᵀ. Returns 0, or -1 for an unsupported type / row length.
int v4_matmul(int t, const uint8_t* W, int64_t N, int64_t K, const float* x, int64_t M, float* y, int nthreads) {
    if (!supported(t, K)) return -1;
    XQuant& xq = scratch(0);
    xq.quantize(x, M, K, K, !is_float(t), is_float(t), t == T_MXFP4);
    const XRow* xs = xq.rows.data();
    const int64_t rb = row_bytes(t, K), ntask = (N + ROWS_PER_TASK - 1) / ROWS_PER_TASK;
    const int run = run_tasks(ROWS_PER_TASK * rb, ntask, nthreads);
#pragma omp parallel for schedule(dynamic, run) num_threads(nthreads) if (nthreads > 1 && N * rb * M > (1 << 16))
    for (int64_t i = 0; i < ntask; ++i) {
        const int64_t r0 = i * ROWS_PER_TASK, r1 = r0 + ROWS_PER_TASK < N ? r0 + ROWS_PER_TASK : N;
        run_rows(t, W, rb, K, xs, M, y, N, r0, r1);
    }
    return 0;
}

int v4_gemm_supported(int t, int64_t K) { return supported(t, K) && g_k.gemm[t].tile ? 1 : 0; }

// y[M, N] = x[M, K] · W[N, K]ᵀ with the int8 GEMM (same quantized activations as v4_matmul). Returns 0, or -1
// for a type / row length it does not cover.
int v4_gemm(int t, const uint8_t* W, int64_t N, int64_t K, const float* x, int64_t M, float* y, int nthreads) {
    if (!v4_gemm_supported(t, K)) return -1;
    const GemmKernel& gk = g_k.gemm[t];
    const int64_t nb = K / 32, ng = K / gk.gs, rb = row_bytes(t, K), tr = g_k.gemm_rows;
    static thread_local GemmScratch xs;  // the calling thread's; the workers see it through these pointers
    int8_t* q = XQuant::aligned(xs.q, M * K);
    xs.d.resize(M * nb);
    xs.s16.resize(M * nb * 2);
    xs.s32.resize(M * nb);
    xs.corr.resize(M * ng);
    float *d = xs.d.data(), *s16 = xs.s16.data(), *s32 = xs.s32.data();
    int32_t* corr = xs.corr.data();
    const float* s = gk.gs == 16 ? s16 : s32;
    const int64_t ntile = (N + tr - 1) / tr;
    // Few tiles for the threads (small N): split the activation rows too, into parts of ≥ 32 rows; each part
    // decodes its tile again.
    const int64_t want = ntile >= 4 * nthreads ? 1 : (4 * nthreads + ntile - 1) / ntile;
    const int64_t parts = std::max<int64_t>(1, std::min(want, M / 32));
    const int64_t mper = (M + parts - 1) / parts;
    // static contiguous tile ranges: each thread streams its own slice of W, so its prefetch stream stays intact
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
    {
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; ++m) {
            g_k.quant(x + m * K, K, q + m * K, d + m * nb, s16 + m * 2 * nb, s32 + m * nb);
            if (gk.bias) g_k.gemm_corr(q + m * K, K, gk.gs, gk.bias, corr + m * ng);
        }
        uint8_t* buf = gemm_buffer(K);
#pragma omp for schedule(static)
        for (int64_t i = 0; i < ntile * parts; ++i) {
            const int64_t n0 = i / parts * tr, m0 = i % parts * mper, mm = std::min(mper, M - m0);
            if (mm <= 0) continue;
            const GemmX part{q + m0 * K, d + m0 * nb, s + m0 * ng, corr + m0 * ng, mm, K};
            gk.tile(W, rb, n0, (int)std::min(tr, N - n0), part, y + m0 * N, N, buf);
        }
    }
    return 0;
}

// Several products in one call: y_j[M, N_j] = x_j[M, K_j] · W_j[N_j, K_j]ᵀ for j < n, x_j with row stride ldx_j.
// At decode a layer's small projections (q_a and kv from one input, a compressor's kv and gate, the shared
// expert's gate and up, the eight output groups) are each well under a millisecond, so separate calls pay the
// per-call costs (activation quantization, waking the thread team) many times; here an input shared by several
// weights is quantized once and all their rows go to the threads in ~2 MB runs (RUN_BYTES).
// Returns 0, or -1 for an unsupported type / row length.
int v4_matmul_batch(int n, const int* types, const uint8_t* const* Ws, const int64_t* Ns, const int64_t* Ks,
                    const float* const* xs, const int64_t* ldx, int64_t M, float* const* ys, int nthreads) {
    static thread_local std::vector<XQuant> quants;
    if ((int64_t)quants.size() < n) quants.resize(n);
    std::vector<int> qi(n);  // which quantized input each product reads
    for (int j = 0; j < n; ++j) {
        if (!supported(types[j], Ks[j])) return -1;
        qi[j] = j;
        for (int i = 0; i < j; ++i)
            if (xs[i] == xs[j] && Ks[i] == Ks[j] && ldx[i] == ldx[j]) {
                qi[j] = qi[i];
                break;
            }
    }
    for (int j = 0; j < n; ++j) {
        if (qi[j] != j) continue;
        bool ints = false, floats = false, mxfp4 = false;  // what the products reading this input need of it
        for (int i = j; i < n; ++i)
            if (qi[i] == j) (is_float(types[i]) ? floats : ints) = true, mxfp4 |= types[i] == T_MXFP4;
        quants[j].quantize(xs[j], M, Ks[j], ldx[j], ints, floats, mxfp4);
    }
    std::vector<const XRow*> xr(n);  // taken here: `quants` is thread-local, the team's other threads see their own
    for (int j = 0; j < n; ++j) xr[j] = quants[qi[j]].rows.data();
    struct Task { int j; int64_t r0, r1; };
    std::vector<Task> tasks;
    int64_t work = 0;
    for (int j = 0; j < n; ++j) {
        for (int64_t r0 = 0; r0 < Ns[j]; r0 += ROWS_PER_TASK)
            tasks.push_back({j, r0, r0 + ROWS_PER_TASK < Ns[j] ? r0 + ROWS_PER_TASK : Ns[j]});
        work += Ns[j] * row_bytes(types[j], Ks[j]);
    }
    const int64_t ntask = (int64_t)tasks.size();
    const int run = run_tasks(work / std::max<int64_t>(1, ntask), ntask, nthreads);
#pragma omp parallel for schedule(dynamic, run) num_threads(nthreads) if (nthreads > 1 && work * M > (1 << 16))
    for (int64_t i = 0; i < ntask; ++i) {
        const Task& tk = tasks[i];
        const int j = tk.j;
        run_rows(types[j], Ws[j], row_bytes(types[j], Ks[j]), Ks[j], xr[j], M, ys[j], Ns[j], tk.r0, tk.r1);
    }
    return 0;
}

// out[R, K] = the R rows of W as f32.
int v4_dequant(int t, const uint8_t* W, int64_t R, int64_t K, float* out, int nthreads) {
    if (!supported(t, K)) return -1;
    const int64_t rb = row_bytes(t, K);
    DeqFn f = g_k.deq[t];
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads) if (nthreads > 1 && R * K > (1 << 15))
    for (int64_t r = 0; r < R; ++r) f(W + r * rb, K, out + r * K);
    return 0;
}

// Routed experts for T tokens, k experts each: out[t] = Σ_j wts[t,j] · W2[e] (swiglu(W1[e] x_t, W3[e] x_t)),
// e = idx[t,j]. W1/W3 are [E, I, D] and W2 is [E, D, I] in their GGUF encodings; swiglu is DeepSeek-V4's
// silu(min(g, L)) · clamp(u, −L, L). Works one (token, expert) pair at a time, so it suits decode (few pairs).
// Returns 0, -1 for an unsupported type / shape, -2 for an expert id out of range.
int v4_moe(const float* x, int64_t T, int64_t D, const int64_t* idx, const float* wts, int64_t k, int t1,
           const uint8_t* W1, int t3, const uint8_t* W3, int t2, const uint8_t* W2, int64_t E, int64_t I, float limit,
           float* out, int nthreads) {
    if (!supported(t1, D) || !supported(t3, D) || !supported(t2, I)) return -1;
    const int64_t P = T * k;
    for (int64_t p = 0; p < P; ++p)
        if (idx[p] < 0 || idx[p] >= E) return -2;
    const int64_t rb1 = row_bytes(t1, D), rb3 = row_bytes(t3, D), rb2 = row_bytes(t2, I);
    XQuant& xq = scratch(0);
    xq.quantize(x, T, D, D, !is_float(t1) || !is_float(t3), is_float(t1) || is_float(t3),
                t1 == T_MXFP4 || t3 == T_MXFP4);
    std::vector<float> h(P * I);

    // gate and up for every pair, fused with the activation. The threads take runs of one pair's rows (~2 MB of W1
    // and W3 together) first come first served, and read each as long streams: the run's W1 rows, then the same W3
    // rows (interleaving them in 16-row tasks measured ~20 % under a plain matvec's rate).
    const int nt1 = nthreads > 1 ? nthreads : 1;
    const int64_t run1 = std::max<int64_t>(16, RUN_BYTES / (rb1 + rb3)), per1 = (I + run1 - 1) / run1;
#pragma omp parallel num_threads(nt1) if (nt1 > 1)
    {
        std::vector<float> g(run1), u(run1);
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < P * per1; ++task) {
            const int64_t p = task / per1, r0 = task % per1 * run1, r1 = std::min(I, r0 + run1);
            const int64_t e = idx[p];
            const XRow* xr = &xq.rows[p / k];
            float* gp = g.data();
            float* up = u.data();
            g_k.rows[t1][0](W1 + (e * I + r0) * rb1, rb1, D, xr, &gp, 0, r1 - r0);
            g_k.rows[t3][0](W3 + (e * I + r0) * rb3, rb3, D, xr, &up, 0, r1 - r0);
            float* hp = h.data() + p * I + r0;
            for (int64_t r = 0; r < r1 - r0; ++r) {
                const float gv = g[r] < limit ? g[r] : limit;
                const float uv = u[r] < -limit ? -limit : (u[r] > limit ? limit : u[r]);
                hp[r] = gv / (1.0f + std::exp(-gv)) * uv;
            }
        }
    }

    XQuant& hq = scratch(1);
    hq.quantize(h.data(), P, I, I, !is_float(t2), is_float(t2), t2 == T_MXFP4);
    // down projection in runs of output rows (~2 MB over the k experts' rows), first come first served: a run owns
    // its rows for every token (so no two threads write one value) and reads each expert's rows of it as one stream
    const int64_t run2 = std::max<int64_t>(16, RUN_BYTES / (k * rb2)), per2 = (D + run2 - 1) / run2;
#pragma omp parallel num_threads(nt1) if (nt1 > 1)
    {
        std::vector<float> tmp(run2);
        float* tp = tmp.data();
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < per2; ++task) {
            const int64_t r0 = task * run2, r1 = std::min(D, r0 + run2);
            for (int64_t t = 0; t < T; ++t) {
                float* o = out + t * D + r0;
                for (int64_t r = 0; r < r1 - r0; ++r) o[r] = 0.0f;
                for (int64_t j = 0; j < k; ++j) {
                    const int64_t p = t * k + j;
                    g_k.rows[t2][0](W2 + (idx[p] * D + r0) * rb2, rb2, I, &hq.rows[p], &tp, 0, r1 - r0);
                    for (int64_t r = 0; r < r1 - r0; ++r) o[r] += wts[p] * tmp[r];
                }
            }
        }
    }
    return 0;
}

}  // extern "C"
