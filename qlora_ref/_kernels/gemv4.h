/* gemv4.h -- y = x W^T straight from the packed 4-bit codes, for a few rows of x (decoding).
 *
 *     y[r, o] = sum_i  x[r, i] * W[o, i],     W[o, i] = code[q(o, i)] * absmax[block of (o, i)]
 *
 * Generating one token reads every weight once, so its speed is the speed of
 * reading the weights: 4 bits each instead of 16 or 32. Dequantizing the
 * whole (out, in) matrix first (what the training forward does) writes and
 * re-reads 4 or 2 bytes per weight; this kernel never forms W. Each block's
 * 16 weights code[c] * absmax[b] are formed in registers (the same float32
 * products dequantize writes) and multiplied into the running sums.
 *
 * The order of the float32 sums (so the result equals x @ dequantize(W).T up to
 * that order, not bit for bit; tests/kernels/test_kernels_equal.py checks the
 * bound gamma_n * sum |x| |w| on every path):
 *
 *   portable  one sum per output, over i = 0, 1, 2, ... in order;
 *   vector    per output, 8 (avx2) or 16 (avx512) lane sums, each fed by fused
 *             multiply-adds (one rounding per product-and-add); lane k of the
 *             high-nibble sum takes the inputs at even positions and of the
 *             low-nibble sum those at odd positions (see "x's layout" below),
 *             one input group of 32 after another; with 1 or 2 rows of x the
 *             two are separate chains, added at the end of every tile of about
 *             512 inputs, with more rows one chain; at the end the lanes are
 *             added pairwise (a tree).
 *
 * The vector paths need rows of W made of whole blocks (in_features %
 * blocksize == 0; every block size is a multiple of 32); otherwise, and on
 * other CPUs, the portable loop runs. lookup16.h's level picks the path
 * (avx512 and avx512bf16: vpermps as a 16-entry table; avx2: two 8-entry
 * lookups and a blend; portable: plain C).
 */
#ifndef QLORA_REF_GEMV4_H
#define QLORA_REF_GEMV4_H

#include "lookup16.h"

#define GEMV4_MAX_ROWS 8     /* rows of x (tokens) per call */
#define GEMV4_TASK_ROWS 16   /* most rows of W (outputs) per call */
#define GEMV4_TILE 512       /* inputs per pass: 8 rows of x, 16 KB, stay in L1 */

/* Prefetch: each block asks for the codes GEMV4_AHEAD bytes ahead (and, every 16 blocks,
 * their constants), so that a call reading its weights from DRAM (a decoding step reads
 * more than the caches hold) overlaps the reads with the arithmetic instead of waiting on
 * each line. Measured on SmolLM2's lean decoder (2-core EPYC, 1 thread, 2026-12-06):
 * 67.7 tokens/s without, 72-75 with 1-16 KB ahead (4 KB chosen; the spread is the noise). */
#ifndef GEMV4_AHEAD
#define GEMV4_AHEAD 4096
#endif
#define GEMV4_PREFETCH(row, scales, i0, blocksize) do { \
    __builtin_prefetch((row) + ((i0) >> 1) + GEMV4_AHEAD, 0, 3); \
    if (((i0) / (blocksize)) % 16 == 0) \
        __builtin_prefetch((scales) + (i0) / (blocksize) + GEMV4_AHEAD / 8, 0, 3); \
} while (0)

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

/* ---- the vector paths' layout of x ------------------------------------------------
 *
 * 16 packed bytes hold 32 weights: high nibbles at even inputs, low nibbles at odd ones.
 * Rather than interleave the looked-up weights back into input order (shuffles for
 * every 32 weights of every row of W), the vector paths read x rearranged once per
 * call: in each group of 32 inputs, the 16 at even positions, then the 16 at odd ones.
 *
 *     xs[r, g + k] = x[r, g + 2k],   xs[r, g + 16 + k] = x[r, g + 2k + 1],   k < 16, g % 32 == 0
 *
 * Each weight still meets its own x value; only the order of the float32 sums changes.
 */
static int gemv4_whole_blocks(ptrdiff_t blocksize, ptrdiff_t in_features) {
    return in_features % blocksize == 0 && blocksize % 32 == 0;
}

/* does gemv4 want xs (the layout above) at the current level, for these shapes? */
static int gemv4_wants_split_x(ptrdiff_t blocksize, ptrdiff_t in_features) {
#ifdef QLORA_REF_X86_SIMD
    return lookup16_current >= 2 && gemv4_whole_blocks(blocksize, in_features);
#else
    (void)blocksize; (void)in_features;
    return 0;
#endif
}

/* xs from x, m rows of in_features (a multiple of 32) */
static void gemv4_split_x(const float* x, ptrdiff_t m, ptrdiff_t in_features, float* xs) {
    for (ptrdiff_t g = 0; g < m * in_features; g += 32)
        for (int k = 0; k < 16; k++) {
            xs[g + k] = x[g + 2 * k];
            xs[g + 16 + k] = x[g + 2 * k + 1];
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

/* table[idx & 15] for 8 indexes: vpermps reads idx & 7; bit 3, shifted into the sign
 * bit, picks the upper half (blendv reads only the sign) */
__attribute__((target("avx2,fma"), always_inline))
static inline __m256 gemv4_lookup8_avx2(__m256i idx, __m256 low8, __m256 high8) {
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(low8, idx),
                            _mm256_permutevar8x32_ps(high8, idx),
                            _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

/* M rows of x at once (M a constant after inlining, so the accumulators stay in registers);
 * xs in the layout above */
__attribute__((target("avx2,fma"), always_inline))
static inline void gemv4_avx2_rows(const uint8_t* packed, const float* absmax, const float* code,
                                   ptrdiff_t blocksize, const float* xs, const int M,
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
            __m256 acc_hi[GEMV4_MAX_ROWS], acc_lo[GEMV4_MAX_ROWS];
            for (int r = 0; r < M; r++) {
                acc_hi[r] = sums[o - o_start][r];
                acc_lo[r] = _mm256_setzero_ps();
            }
            const uint8_t* row = packed + (o * in_features >> 1);
            const float* scales = absmax + o * in_features / blocksize;
            for (ptrdiff_t i0 = t0; i0 < t1; i0 += blocksize) {
                GEMV4_PREFETCH(row, scales, i0, blocksize);
                __m256 s = _mm256_set1_ps(scales[i0 / blocksize]);
                __m256 low8 = _mm256_mul_ps(code_low, s), high8 = _mm256_mul_ps(code_high, s);
                for (ptrdiff_t i = i0; i < i0 + blocksize; i += 32) {   /* 16 bytes, 32 weights */
                    for (int half = 0; half < 2; half++) {               /* 8 bytes each */
                        __m256i lo = _mm256_cvtepu8_epi32(
                            _mm_loadl_epi64((const __m128i*)(row + (i >> 1) + 8 * half)));
                        __m256i hi = _mm256_srli_epi32(lo, 4);
                        __m256 w_hi = gemv4_lookup8_avx2(hi, low8, high8);   /* even inputs */
                        __m256 w_lo = gemv4_lookup8_avx2(lo, low8, high8);   /* odd inputs */
                        for (int r = 0; r < M; r++) {
                            const float* xr = xs + r * in_features + i + 8 * half;
                            __m256 x_even = _mm256_loadu_ps(xr), x_odd = _mm256_loadu_ps(xr + 16);
                            acc_hi[r] = _mm256_fmadd_ps(x_even, w_hi, acc_hi[r]);
                            if (M <= 2)    /* few sums: two chains each, the adds need not wait */
                                acc_lo[r] = _mm256_fmadd_ps(x_odd, w_lo, acc_lo[r]);
                            else          /* M chains already: the registers go to them */
                                acc_hi[r] = _mm256_fmadd_ps(x_odd, w_lo, acc_hi[r]);
                        }
                    }
                }
            }
            for (int r = 0; r < M; r++) sums[o - o_start][r] = _mm256_add_ps(acc_hi[r], acc_lo[r]);
        }
    }
    for (ptrdiff_t o = o_start; o < o_end; o++)
        for (int r = 0; r < M; r++) y[r * out_features + o] = gemv4_sum8(sums[o - o_start][r]);
}

__attribute__((target("avx2,fma")))
static void gemv4_avx2(const uint8_t* packed, const float* absmax, const float* code,
                       ptrdiff_t blocksize, const float* xs, ptrdiff_t m, ptrdiff_t in_features,
                       ptrdiff_t o_start, ptrdiff_t o_end, float* y, ptrdiff_t out_features) {
#define GEMV4_CASE(M) case M: gemv4_avx2_rows(packed, absmax, code, blocksize, xs, M,          \
                          in_features, o_start, o_end, y, out_features); break;
    switch (m) { GEMV4_CASE(1) GEMV4_CASE(2) GEMV4_CASE(3) GEMV4_CASE(4)
                 GEMV4_CASE(5) GEMV4_CASE(6) GEMV4_CASE(7) GEMV4_CASE(8) }
#undef GEMV4_CASE
}

/* ---- avx512 --------------------------------------------------------------------- */

__attribute__((target("avx512f,avx512bw"), always_inline))
static inline void gemv4_avx512_rows(const uint8_t* packed, const float* absmax,
                                     const float* code, ptrdiff_t blocksize, const float* xs,
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
            __m512 acc_hi[GEMV4_MAX_ROWS], acc_lo[GEMV4_MAX_ROWS];
            for (int r = 0; r < M; r++) {
                acc_hi[r] = sums[o - o_start][r];
                acc_lo[r] = _mm512_setzero_ps();
            }
            const uint8_t* row = packed + (o * in_features >> 1);
            const float* scales = absmax + o * in_features / blocksize;
            for (ptrdiff_t i0 = t0; i0 < t1; i0 += blocksize) {
                GEMV4_PREFETCH(row, scales, i0, blocksize);
                /* the block's 16 weights: the float32 products of dequantize, exactly */
                __m512 table = _mm512_mul_ps(code16, _mm512_set1_ps(scales[i0 / blocksize]));
                for (ptrdiff_t i = i0; i < i0 + blocksize; i += 32) {   /* 16 bytes, 32 weights */
                    /* vpermps reads an index's low 4 bits: the byte itself is the low
                     * nibble's index, the byte >> 4 the high nibble's */
                    __m512i lo = _mm512_cvtepu8_epi32(
                        _mm_loadu_si128((const __m128i*)(row + (i >> 1))));
                    __m512i hi = _mm512_srli_epi32(lo, 4);
                    __m512 w_hi = _mm512_permutexvar_ps(hi, table);   /* even inputs */
                    __m512 w_lo = _mm512_permutexvar_ps(lo, table);   /* odd inputs */
                    for (int r = 0; r < M; r++) {
                        const float* xr = xs + r * in_features + i;
                        __m512 x_even = _mm512_loadu_ps(xr), x_odd = _mm512_loadu_ps(xr + 16);
                        acc_hi[r] = _mm512_fmadd_ps(x_even, w_hi, acc_hi[r]);
                        if (M <= 2)    /* few sums: two chains each, the adds need not wait */
                            acc_lo[r] = _mm512_fmadd_ps(x_odd, w_lo, acc_lo[r]);
                        else          /* M chains already: the registers go to them */
                            acc_hi[r] = _mm512_fmadd_ps(x_odd, w_lo, acc_hi[r]);
                    }
                }
            }
            for (int r = 0; r < M; r++) sums[o - o_start][r] = _mm512_add_ps(acc_hi[r], acc_lo[r]);
        }
    }
    for (ptrdiff_t o = o_start; o < o_end; o++)
        for (int r = 0; r < M; r++)
            y[r * out_features + o] = _mm512_reduce_add_ps(sums[o - o_start][r]);
}

__attribute__((target("avx512f,avx512bw")))
static void gemv4_avx512(const uint8_t* packed, const float* absmax, const float* code,
                         ptrdiff_t blocksize, const float* xs, ptrdiff_t m, ptrdiff_t in_features,
                         ptrdiff_t o_start, ptrdiff_t o_end, float* y, ptrdiff_t out_features) {
#define GEMV4_CASE(M) case M: gemv4_avx512_rows(packed, absmax, code, blocksize, xs, M,        \
                          in_features, o_start, o_end, y, out_features); break;
    switch (m) { GEMV4_CASE(1) GEMV4_CASE(2) GEMV4_CASE(3) GEMV4_CASE(4)
                 GEMV4_CASE(5) GEMV4_CASE(6) GEMV4_CASE(7) GEMV4_CASE(8) }
#undef GEMV4_CASE
}
#endif  /* x86-64 SIMD */

/* Up to GEMV4_MAX_ROWS rows of x: the path of lookup16.h's current level when xs (x in the
 * vector paths' layout) is given, or the portable one */
static void gemv4_rows(const uint8_t* packed, const float* absmax, const float* code,
                       ptrdiff_t blocksize, const float* x, const float* xs, ptrdiff_t m,
                       ptrdiff_t in_features, ptrdiff_t o_start, ptrdiff_t o_end, float* y,
                       ptrdiff_t out_features) {
#ifdef QLORA_REF_X86_SIMD
    if (xs != NULL && gemv4_whole_blocks(blocksize, in_features) && lookup16_current >= 2) {
        for (ptrdiff_t o = o_start; o < o_end; o += GEMV4_TASK_ROWS) {
            ptrdiff_t end = o + GEMV4_TASK_ROWS < o_end ? o + GEMV4_TASK_ROWS : o_end;
            (lookup16_current >= 3 ? gemv4_avx512 : gemv4_avx2)(
                packed, absmax, code, blocksize, xs, m, in_features, o, end, y, out_features);
        }
        return;
    }
#endif
    (void)xs;
    gemv4_portable(packed, absmax, code, blocksize, x, m, in_features, o_start, o_end, y,
                   out_features);
}

/* Any number of rows of x, GEMV4_MAX_ROWS at a time (each group reads the codes again;
 * the rows of W a task covers stay in cache between groups). xs: x in the vector paths'
 * layout (gemv4_split_x), or NULL for the portable path. */
static void gemv4(const uint8_t* packed, const float* absmax, const float* code,
                  ptrdiff_t blocksize, const float* x, const float* xs, ptrdiff_t m,
                  ptrdiff_t in_features, ptrdiff_t o_start, ptrdiff_t o_end, float* y,
                  ptrdiff_t out_features) {
    for (ptrdiff_t r = 0; r < m; r += GEMV4_MAX_ROWS) {
        ptrdiff_t rows = m - r < GEMV4_MAX_ROWS ? m - r : GEMV4_MAX_ROWS;
        gemv4_rows(packed, absmax, code, blocksize, x + r * in_features,
                   xs != NULL ? xs + r * in_features : NULL, rows, in_features, o_start, o_end,
                   y + r * out_features, out_features);
    }
}

#endif  /* QLORA_REF_GEMV4_H */
