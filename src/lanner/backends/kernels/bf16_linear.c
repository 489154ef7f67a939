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
 * product then the add), widening x once per call and reusing each widened
 * weight vector: for 8 rows of a small batch (dot8), or, in products of 16
 * rows or more (prompts), two outputs' weights for 4 rows at a time (dot4x2,
 * 6 loads per 8 FMAs: ~1.4x dot8 on a 44-row prompt, a little slower on 8
 * rows). Rows go in blocks of 32 that stay in L2 while a thread's outputs
 * pass over them. Inputs whose K is not a multiple of 16 are left to PyTorch
 * (its scalar tail rounds differently).
 *
 * Built at run time by lanner.backends.hf_kernels with
 *   cc -O2 -mavx2 -mfma -fopenmp -shared -fPIC
 */
#include <immintrin.h>
#ifdef _OPENMP
#include <omp.h>
#endif
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

/* One output of one row from its eight accumulators (part[q]: the products
 * of inputs j+8q..j+8q+7 of every 64-input block j): ATen's pairwise, then
 * across-lane additions, then the 16-input tail of x row xr against w. */
static inline float finish(const float part[8][8], const float *xr, const uint16_t *w, int k) {
    const int main_end = k & ~63, vec_end = k & ~15;
    __m256 a0 = _mm256_add_ps(_mm256_load_ps(part[0]), _mm256_load_ps(part[4]));
    __m256 a1 = _mm256_add_ps(_mm256_load_ps(part[1]), _mm256_load_ps(part[5]));
    __m256 a2 = _mm256_add_ps(_mm256_load_ps(part[2]), _mm256_load_ps(part[6]));
    __m256 a3 = _mm256_add_ps(_mm256_load_ps(part[3]), _mm256_load_ps(part[7]));
    a0 = _mm256_add_ps(a0, a2);
    a1 = _mm256_add_ps(a1, a3);
    float sum = across(_mm256_add_ps(a0, a1));
    __m256 tail = _mm256_setzero_ps();
    for (int j = main_end; j < vec_end; j += 16) {
        tail = _mm256_fmadd_ps(widen8(w + j), _mm256_loadu_ps(xr + j), tail);
        tail = _mm256_fmadd_ps(widen8(w + j + 8), _mm256_loadu_ps(xr + j + 8), tail);
    }
    return sum + across(tail);
}

static inline float dot(const float *x, const uint16_t *w, int k) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0,
           a7 = a0;
    const int main_end = k & ~63;
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
    float part[8][8] __attribute__((aligned(32)));
    _mm256_store_ps(part[0], a0);
    _mm256_store_ps(part[1], a1);
    _mm256_store_ps(part[2], a2);
    _mm256_store_ps(part[3], a3);
    _mm256_store_ps(part[4], a4);
    _mm256_store_ps(part[5], a5);
    _mm256_store_ps(part[6], a6);
    _mm256_store_ps(part[7], a7);
    return finish(part, x, w, k);
}

static inline uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0; /* NaN, as c10 rounds it */
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* The same sums as dot() for 8 rows of x (row r at x + r * ldx) and one
 * output's weights: each of the eight accumulators of each row takes its
 * products in dot()'s order, but one widening of 8 weights serves all 8 rows
 * (8 of the 16 vector registers hold one accumulator per row at a time). */
static void dot8(const float *x, size_t ldx, const uint16_t *w, int k, float *out) {
    float part[8][8][8] __attribute__((aligned(32))); /* [row][accumulator][lane] */
    const int main_end = k & ~63;
    for (int q = 0; q < 8; ++q) {
        __m256 r0 = _mm256_setzero_ps(), r1 = r0, r2 = r0, r3 = r0, r4 = r0, r5 = r0, r6 = r0,
               r7 = r0;
        for (int j = q * 8; j < main_end; j += 64) {
            const __m256 v = widen8(w + j);
            r0 = _mm256_fmadd_ps(v, _mm256_loadu_ps(x + j), r0);
            r1 = _mm256_fmadd_ps(v, _mm256_loadu_ps(x + ldx + j), r1);
            r2 = _mm256_fmadd_ps(v, _mm256_loadu_ps(x + 2 * ldx + j), r2);
            r3 = _mm256_fmadd_ps(v, _mm256_loadu_ps(x + 3 * ldx + j), r3);
            r4 = _mm256_fmadd_ps(v, _mm256_loadu_ps(x + 4 * ldx + j), r4);
            r5 = _mm256_fmadd_ps(v, _mm256_loadu_ps(x + 5 * ldx + j), r5);
            r6 = _mm256_fmadd_ps(v, _mm256_loadu_ps(x + 6 * ldx + j), r6);
            r7 = _mm256_fmadd_ps(v, _mm256_loadu_ps(x + 7 * ldx + j), r7);
        }
        _mm256_store_ps(part[0][q], r0);
        _mm256_store_ps(part[1][q], r1);
        _mm256_store_ps(part[2][q], r2);
        _mm256_store_ps(part[3][q], r3);
        _mm256_store_ps(part[4][q], r4);
        _mm256_store_ps(part[5][q], r5);
        _mm256_store_ps(part[6][q], r6);
        _mm256_store_ps(part[7][q], r7);
    }
    for (int r = 0; r < 8; ++r) out[r] = finish(part[r], x + r * ldx, w, k);
}

/* dot()'s sums for 4 rows against 2 outputs' weights (w0, w1): each widened
 * weight vector serves 4 rows, each row's vector 2 outputs. */
static void dot4x2(const float *x, size_t ldx, const uint16_t *w0, const uint16_t *w1, int k,
                   float *out0, float *out1) {
    float part[2][4][8][8] __attribute__((aligned(32)));
    const int main_end = k & ~63;
    for (int q = 0; q < 8; ++q) {
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0,
               b3 = a0;
        for (int j = q * 8; j < main_end; j += 64) {
            const __m256 u = widen8(w0 + j), v = widen8(w1 + j);
            const __m256 x0 = _mm256_loadu_ps(x + j), x1 = _mm256_loadu_ps(x + ldx + j);
            a0 = _mm256_fmadd_ps(u, x0, a0);
            b0 = _mm256_fmadd_ps(v, x0, b0);
            a1 = _mm256_fmadd_ps(u, x1, a1);
            b1 = _mm256_fmadd_ps(v, x1, b1);
            const __m256 x2 = _mm256_loadu_ps(x + 2 * ldx + j);
            const __m256 x3 = _mm256_loadu_ps(x + 3 * ldx + j);
            a2 = _mm256_fmadd_ps(u, x2, a2);
            b2 = _mm256_fmadd_ps(v, x2, b2);
            a3 = _mm256_fmadd_ps(u, x3, a3);
            b3 = _mm256_fmadd_ps(v, x3, b3);
        }
        _mm256_store_ps(part[0][0][q], a0);
        _mm256_store_ps(part[0][1][q], a1);
        _mm256_store_ps(part[0][2][q], a2);
        _mm256_store_ps(part[0][3][q], a3);
        _mm256_store_ps(part[1][0][q], b0);
        _mm256_store_ps(part[1][1][q], b1);
        _mm256_store_ps(part[1][2][q], b2);
        _mm256_store_ps(part[1][3][q], b3);
    }
    for (int r = 0; r < 4; ++r) {
        out0[r] = finish(part[0][r], x + r * ldx, w0, k);
        out1[r] = finish(part[1][r], x + r * ldx, w1, k);
    }
}

enum { ROW_BLOCK = 32 }; /* rows of x kept in L2 while a thread's outputs pass over them */

/* Returns 0, or -1 where k is not a multiple of 16 or memory ran out. */
int lanner_bf16_linear(const uint16_t *x, const uint16_t *w, uint16_t *y, int m, int n, int k,
                       int threads) {
    if (k % 16 != 0 || m <= 0 || n <= 0) return -1;
    float *xf = aligned_alloc(64, (((size_t)m * k * sizeof(float)) + 63) & ~(size_t)63);
    if (xf == NULL) return -1;
    for (size_t i = 0; i < (size_t)m * k; i += 8) {
        _mm256_store_ps(xf + i, widen8(x + i));
    }
    if (threads < 1 || (size_t)n * k * m < 65536) threads = 1;
#pragma omp parallel num_threads(threads)
    {
        int team = 1, me = 0;
#ifdef _OPENMP
        team = omp_get_num_threads();
        me = omp_get_thread_num();
#endif
        const int first = (int)((long long)n * me / team);
        const int last = (int)((long long)n * (me + 1) / team);
        float sums[8];
        for (int r0 = 0; r0 < m; r0 += ROW_BLOCK) {
            const int r1 = r0 + ROW_BLOCK < m ? r0 + ROW_BLOCK : m;
            int o = first;
            for (; o + 2 <= last && m >= 16; o += 2) {
                const uint16_t *row0 = w + (size_t)o * k, *row1 = row0 + k;
                int r = r0;
                float s0[4], s1[4];
                for (; r + 4 <= r1; r += 4) {
                    dot4x2(xf + (size_t)r * k, (size_t)k, row0, row1, k, s0, s1);
                    for (int i = 0; i < 4; ++i) {
                        y[(size_t)(r + i) * n + o] = to_bf16(s0[i]);
                        y[(size_t)(r + i) * n + o + 1] = to_bf16(s1[i]);
                    }
                }
                for (; r < r1; ++r) {
                    y[(size_t)r * n + o] = to_bf16(dot(xf + (size_t)r * k, row0, k));
                    y[(size_t)r * n + o + 1] = to_bf16(dot(xf + (size_t)r * k, row1, k));
                }
            }
            for (; o < last; ++o) {
                const uint16_t *row = w + (size_t)o * k;
                int r = r0;
                for (; r + 8 <= r1; r += 8) {
                    dot8(xf + (size_t)r * k, (size_t)k, row, k, sums);
                    for (int i = 0; i < 8; ++i) y[(size_t)(r + i) * n + o] = to_bf16(sums[i]);
                }
                for (; r < r1; ++r) {
                    y[(size_t)r * n + o] = to_bf16(dot(xf + (size_t)r * k, row, k));
                }
            }
        }
    }
    free(xf);
    return 0;
}
