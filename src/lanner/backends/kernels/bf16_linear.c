/* y = x @ w^T for bfloat16 x (M, K), w (N, K) and y (M, N), on x86-64 CPUs
 * with AVX2 and FMA but no bfloat16 instructions, with the sums PyTorch's own
 * kernel makes there, bit for bit.
 *
 * On such a CPU PyTorch multiplies bfloat16 matrices one output at a time
 * (ATen's ReducedPrecisionFloatGemvFastPathKernel, bf16_dot_with_fp32_arith):
 * per output, eight float32 accumulators of eight lanes take the products of
 * 64 inputs at a time (accumulator q the inputs j+8q..j+8q+7), are added
 * pairwise (4, 2, 1) and across lanes (halves, then pairs, then neighbours),
 * then a 16-input tail goes through one more accumulator; the float32 sum is
 * rounded to bfloat16 (nearest, ties to even). It widens x again for every
 * output and runs M rows as M separate products, which leaves a 2-core AVX2
 * VM at ~13 GB/s for one row and ~7.5 GMAC/s for a prompt of 44 rows.
 *
 * This file does the same additions in the same order (a product of two
 * bfloat16 values is exact in float32, so a fused multiply-add equals the
 * product then the add), widening x once per call and reusing each output's
 * weights, still in L1, for every row. Inputs whose K is not a multiple of 16
 * are left to PyTorch (its scalar tail rounds differently).
 *
 * Built at run time by lanner.backends.hf_kernels with
 *   cc -O2 -mavx2 -mfma -fopenmp -shared -fPIC
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline __m256 widen8(const uint16_t *p) {
    __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}

/* ATen's vec_reduce_all for 8 float lanes: halves, then pairs, then neighbours. */
static inline float across(__m256 v) {
    v = _mm256_add_ps(v, _mm256_permute2f128_ps(v, v, 0x1));
    v = _mm256_add_ps(v, _mm256_shuffle_ps(v, v, 0x4E));
    v = _mm256_add_ps(v, _mm256_shuffle_ps(v, v, 0xB1));
    return _mm256_cvtss_f32(v);
}

static inline float dot(const float *x, const uint16_t *w, int k) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0,
           a7 = a0;
    const int main_end = k & ~63, vec_end = k & ~15;
    for (int j = 0; j < main_end; j += 64) {
        a0 = _mm256_fmadd_ps(widen8(w + j), _mm256_loadu_ps(x + j), a0);
        a1 = _mm256_fmadd_ps(widen8(w + j + 8), _mm256_loadu_ps(x + j + 8), a1);
        a2 = _mm256_fmadd_ps(widen8(w + j + 16), _mm256_loadu_ps(x + j + 16), a2);
        a3 = _mm256_fmadd_ps(widen8(w + j + 24), _mm256_loadu_ps(x + j + 24), a3);
        a4 = _mm256_fmadd_ps(widen8(w + j + 32), _mm256_loadu_ps(x + j + 32), a4);
        a5 = _mm256_fmadd_ps(widen8(w + j + 40), _mm256_loadu_ps(x + j + 40), a5);
        a6 = _mm256_fmadd_ps(widen8(w + j + 48), _mm256_loadu_ps(x + j + 48), a6);
        a7 = _mm256_fmadd_ps(widen8(w + j + 56), _mm256_loadu_ps(x + j + 56), a7);
    }
    a0 = _mm256_add_ps(a0, a4);
    a1 = _mm256_add_ps(a1, a5);
    a2 = _mm256_add_ps(a2, a6);
    a3 = _mm256_add_ps(a3, a7);
    a0 = _mm256_add_ps(a0, a2);
    a1 = _mm256_add_ps(a1, a3);
    float sum = across(_mm256_add_ps(a0, a1));
    __m256 tail = _mm256_setzero_ps();
    for (int j = main_end; j < vec_end; j += 16) {
        tail = _mm256_fmadd_ps(widen8(w + j), _mm256_loadu_ps(x + j), tail);
        tail = _mm256_fmadd_ps(widen8(w + j + 8), _mm256_loadu_ps(x + j + 8), tail);
    }
    return sum + across(tail);
}

static inline uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0; /* NaN, as c10 rounds it */
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* Returns 0, or -1 where k is not a multiple of 16 or memory ran out. */
int lanner_bf16_linear(const uint16_t *x, const uint16_t *w, uint16_t *y, int m, int n, int k,
                       int threads) {
    if (k % 16 != 0 || m <= 0 || n <= 0) return -1;
    float *xf = aligned_alloc(64, (((size_t)m * k * sizeof(float)) + 63) & ~(size_t)63);
    if (xf == NULL) return -1;
    for (size_t i = 0; i < (size_t)m * k; i += 8) {
        _mm256_store_ps(xf + i, widen8(x + i));
    }
    if (threads < 1) threads = 1;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && (size_t)n * k * m >= 65536)
    for (int o = 0; o < n; ++o) {
        const uint16_t *row = w + (size_t)o * k;
        for (int r = 0; r < m; ++r) {
            y[(size_t)r * n + o] = to_bf16(dot(xf + (size_t)r * k, row, k));
        }
    }
    free(xf);
    return 0;
}
