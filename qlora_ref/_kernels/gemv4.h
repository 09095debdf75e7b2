/* gemv4.h -- y = x W^T straight from the packed 4-bit codes, for a few rows of x (decoding).
 *
 *     y[r, o] = sum_i  x[r, i] * W[o, i],     W[o, i] = code[q(o, i)] * absmax[block of (o, i)]
 *
 * Generating one token reads every weight once, so its speed is the speed of
 * reading the weights: 4 bits each instead of 16 or 32. Dequantizing the
 * whole (out, in) matrix first (what the training forward does) writes and
 * re-reads 4 or 2 bytes per weight; this kernel never forms W. Each block's
 * 16 weights code[c] * absmax[b] are formed in registers (the same float32
 * products dequantize writes) and multiplied into the running sums, so the
 * result equals x @ dequantize(W).T up to the order of the float32 sums, not
 * bit for bit (tests/test_kernels_equal.py states the bound).
 *
 * The vector paths need rows of W made of whole blocks (in_features %
 * blocksize == 0; every block size is a multiple of 32); otherwise, and on
 * other CPUs, the portable loop runs. lookup16.h's level picks the path (avx512: vpermps as a 16-entry table and fused multiply-adds;
 * avx2: the same with two 8-entry lookups and a blend; portable: plain C).
 */
#ifndef QLORA_REF_GEMV4_H
#define QLORA_REF_GEMV4_H

#include "lookup16.h"

#define GEMV4_MAX_ROWS 8     /* rows of x (tokens) per call */
#define GEMV4_TASK_ROWS 16   /* most rows of W (outputs) per call */
#define GEMV4_TILE 512       /* inputs per pass: 8 rows of x, 16 KB, stay in L1 */

/* inputs per pass over the task's rows: whole blocks, about GEMV4_TILE of them */
static inline ptrdiff_t gemv4_tile(ptrdiff_t blocksize, ptrdiff_t in_features) {
    ptrdiff_t tile = blocksize >= GEMV4_TILE ? blocksize : GEMV4_TILE / blocksize * blocksize;
    return tile < in_features ? tile : in_features;
}

/* ---- portable ------------------------------------------------------------------ */

static void gemv4_portable(const uint8_t* packed, const float* absmax, const float* code,
                           ptrdiff_t blocksize, const float* x, ptrdiff_t m,
                           ptrdiff_t in_features, ptrdiff_t o_start, ptrdiff_t o_end,
                           float* y, ptrdiff_t out_features) {
    for (ptrdiff_t o = o_start; o < o_end; o++) {
        float acc[GEMV4_MAX_ROWS] = {0};
        ptrdiff_t row = o * in_features;                  /* flat index of W[o, 0] */
        for (ptrdiff_t i = 0; i < in_features; i++) {
            uint8_t byte = packed[(row + i) >> 1];
            float w = code[(row + i) & 1 ? byte & 15 : byte >> 4]      /* high nibble first */
                      * absmax[(row + i) / blocksize];                 /* = dequantize's W[o, i] */
            for (ptrdiff_t r = 0; r < m; r++) acc[r] += x[r * in_features + i] * w;
        }
        for (ptrdiff_t r = 0; r < m; r++) y[r * out_features + o] = acc[r];
    }
}

#ifdef QLORA_REF_X86_SIMD

/* ---- avx2 ----------------------------------------------------------------------- */

__attribute__((target("avx2,fma")))
static inline float gemv4_sum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

/* M rows of x at once (M a constant after inlining, so the accumulators stay in registers) */
__attribute__((target("avx2,fma"), always_inline))
static inline void gemv4_avx2_rows(const uint8_t* packed, const float* absmax, const float* code,
                                   ptrdiff_t blocksize, const float* x, const int M,
                                   ptrdiff_t in_features, ptrdiff_t o_start, ptrdiff_t o_end,
                                   float* y, ptrdiff_t out_features) {
    __m256 code_low = _mm256_loadu_ps(code), code_high = _mm256_loadu_ps(code + 8);
    __m256 sums[GEMV4_TASK_ROWS][GEMV4_MAX_ROWS];
    ptrdiff_t tile = gemv4_tile(blocksize, in_features);
    for (ptrdiff_t o = o_start; o < o_end; o++)
        for (int r = 0; r < M; r++) sums[o - o_start][r] = _mm256_setzero_ps();
    for (ptrdiff_t t0 = 0; t0 < in_features; t0 += tile) {
        ptrdiff_t t1 = t0 + tile < in_features ? t0 + tile : in_features;
        for (ptrdiff_t o = o_start; o < o_end; o++) {
            __m256 acc[GEMV4_MAX_ROWS];
            for (int r = 0; r < M; r++) acc[r] = sums[o - o_start][r];
            const uint8_t* row = packed + (o * in_features >> 1);
            const float* scales = absmax + o * in_features / blocksize;
            for (ptrdiff_t i0 = t0; i0 < t1; i0 += blocksize) {
                __m256 s = _mm256_set1_ps(scales[i0 / blocksize]);
                __m256 low8 = _mm256_mul_ps(code_low, s), high8 = _mm256_mul_ps(code_high, s);
                for (ptrdiff_t i = i0; i < i0 + blocksize; i += 32) {   /* 16 bytes, 32 weights */
                    __m128i first16, last16;
                    LOOKUP16_SPLIT(row + (i >> 1), first16, last16);
                    __m256 w0 = lookup16_8floats_avx2(first16, low8, high8);
                    __m256 w1 = lookup16_8floats_avx2(_mm_srli_si128(first16, 8), low8, high8);
                    __m256 w2 = lookup16_8floats_avx2(last16, low8, high8);
                    __m256 w3 = lookup16_8floats_avx2(_mm_srli_si128(last16, 8), low8, high8);
                    for (int r = 0; r < M; r++) {
                        const float* xr = x + r * in_features + i;
                        __m256 p = _mm256_fmadd_ps(_mm256_loadu_ps(xr), w0,
                                                   _mm256_mul_ps(_mm256_loadu_ps(xr + 8), w1));
                        p = _mm256_fmadd_ps(_mm256_loadu_ps(xr + 16), w2, p);
                        p = _mm256_fmadd_ps(_mm256_loadu_ps(xr + 24), w3, p);
                        acc[r] = _mm256_add_ps(acc[r], p);
                    }
                }
            }
            for (int r = 0; r < M; r++) sums[o - o_start][r] = acc[r];
        }
    }
    for (ptrdiff_t o = o_start; o < o_end; o++)
        for (int r = 0; r < M; r++) y[r * out_features + o] = gemv4_sum8(sums[o - o_start][r]);
}

__attribute__((target("avx2,fma")))
static void gemv4_avx2(const uint8_t* packed, const float* absmax, const float* code,
                       ptrdiff_t blocksize, const float* x, ptrdiff_t m, ptrdiff_t in_features,
                       ptrdiff_t o_start, ptrdiff_t o_end, float* y, ptrdiff_t out_features) {
#define GEMV4_CASE(M) case M: gemv4_avx2_rows(packed, absmax, code, blocksize, x, M,           \
                          in_features, o_start, o_end, y, out_features); break;
    switch (m) { GEMV4_CASE(1) GEMV4_CASE(2) GEMV4_CASE(3) GEMV4_CASE(4)
                 GEMV4_CASE(5) GEMV4_CASE(6) GEMV4_CASE(7) GEMV4_CASE(8) }
#undef GEMV4_CASE
}

/* ---- avx512 --------------------------------------------------------------------- */

__attribute__((target("avx512f,avx512bw"), always_inline))
static inline void gemv4_avx512_rows(const uint8_t* packed, const float* absmax,
                                     const float* code, ptrdiff_t blocksize, const float* x,
                                     const int M, ptrdiff_t in_features, ptrdiff_t o_start,
                                     ptrdiff_t o_end, float* y, ptrdiff_t out_features) {
    __m512 code16 = _mm512_loadu_ps(code);
    __m512 sums[GEMV4_TASK_ROWS][GEMV4_MAX_ROWS];   /* running sums of the task's outputs */
    ptrdiff_t tile = gemv4_tile(blocksize, in_features);
    for (ptrdiff_t o = o_start; o < o_end; o++)
        for (int r = 0; r < M; r++) sums[o - o_start][r] = _mm512_setzero_ps();
    for (ptrdiff_t t0 = 0; t0 < in_features; t0 += tile) {  /* M x tile inputs stay in L1 */
        ptrdiff_t t1 = t0 + tile < in_features ? t0 + tile : in_features;
        for (ptrdiff_t o = o_start; o < o_end; o++) {
            __m512 acc[GEMV4_MAX_ROWS];
            for (int r = 0; r < M; r++) acc[r] = sums[o - o_start][r];
            const uint8_t* row = packed + (o * in_features >> 1);
            const float* scales = absmax + o * in_features / blocksize;
            for (ptrdiff_t i0 = t0; i0 < t1; i0 += blocksize) {
                /* the block's 16 weights: the float32 products of dequantize, exactly */
                __m512 table = _mm512_mul_ps(code16, _mm512_set1_ps(scales[i0 / blocksize]));
                for (ptrdiff_t i = i0; i < i0 + blocksize; i += 32) {   /* 16 bytes, 32 weights */
                    __m128i first16, last16;
                    LOOKUP16_SPLIT(row + (i >> 1), first16, last16);
                    __m512 w0 = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(first16), table);
                    __m512 w1 = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(last16), table);
                    for (int r = 0; r < M; r++) {
                        const float* xr = x + r * in_features + i;
                        if (M == 1) {   /* one sum: keep its dependency chain to one add */
                            acc[r] = _mm512_add_ps(acc[r], _mm512_fmadd_ps(_mm512_loadu_ps(xr), w0,
                                _mm512_mul_ps(_mm512_loadu_ps(xr + 16), w1)));
                        } else {        /* M independent sums: fewer instructions instead */
                            acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(xr), w0, acc[r]);
                            acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(xr + 16), w1, acc[r]);
                        }
                    }
                }
            }
            for (int r = 0; r < M; r++) sums[o - o_start][r] = acc[r];
        }
    }
    for (ptrdiff_t o = o_start; o < o_end; o++)
        for (int r = 0; r < M; r++)
            y[r * out_features + o] = _mm512_reduce_add_ps(sums[o - o_start][r]);
}

__attribute__((target("avx512f,avx512bw")))
static void gemv4_avx512(const uint8_t* packed, const float* absmax, const float* code,
                         ptrdiff_t blocksize, const float* x, ptrdiff_t m, ptrdiff_t in_features,
                         ptrdiff_t o_start, ptrdiff_t o_end, float* y, ptrdiff_t out_features) {
#define GEMV4_CASE(M) case M: gemv4_avx512_rows(packed, absmax, code, blocksize, x, M,         \
                          in_features, o_start, o_end, y, out_features); break;
    switch (m) { GEMV4_CASE(1) GEMV4_CASE(2) GEMV4_CASE(3) GEMV4_CASE(4)
                 GEMV4_CASE(5) GEMV4_CASE(6) GEMV4_CASE(7) GEMV4_CASE(8) }
#undef GEMV4_CASE
}
#endif  /* x86-64 SIMD */

/* Up to GEMV4_MAX_ROWS rows of x: the path of lookup16.h's current level, or the portable one
 * whenever rows of W are not whole blocks. */
static void gemv4_rows(const uint8_t* packed, const float* absmax, const float* code,
                       ptrdiff_t blocksize, const float* x, ptrdiff_t m, ptrdiff_t in_features,
                       ptrdiff_t o_start, ptrdiff_t o_end, float* y, ptrdiff_t out_features) {
#ifdef QLORA_REF_X86_SIMD
    int whole = in_features % blocksize == 0 && blocksize % 32 == 0;
    if (whole && lookup16_current >= 2) {
        for (ptrdiff_t o = o_start; o < o_end; o += GEMV4_TASK_ROWS) {
            ptrdiff_t end = o + GEMV4_TASK_ROWS < o_end ? o + GEMV4_TASK_ROWS : o_end;
            (lookup16_current == 3 ? gemv4_avx512 : gemv4_avx2)(
                packed, absmax, code, blocksize, x, m, in_features, o, end, y, out_features);
        }
        return;
    }
#endif
    gemv4_portable(packed, absmax, code, blocksize, x, m, in_features, o_start, o_end, y,
                   out_features);
}

/* Any number of rows of x, GEMV4_MAX_ROWS at a time (each group reads the codes again;
 * the rows of W a task covers stay in cache between groups). */
static void gemv4(const uint8_t* packed, const float* absmax, const float* code,
                  ptrdiff_t blocksize, const float* x, ptrdiff_t m, ptrdiff_t in_features,
                  ptrdiff_t o_start, ptrdiff_t o_end, float* y, ptrdiff_t out_features) {
    for (ptrdiff_t r = 0; r < m; r += GEMV4_MAX_ROWS) {
        ptrdiff_t rows = m - r < GEMV4_MAX_ROWS ? m - r : GEMV4_MAX_ROWS;
        gemv4_rows(packed, absmax, code, blocksize, x + r * in_features, rows, in_features,
                   o_start, o_end, y + r * out_features, out_features);
    }
}

#endif  /* QLORA_REF_GEMV4_H */
