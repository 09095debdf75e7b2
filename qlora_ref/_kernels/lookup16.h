/* lookup16.h -- the inner loop of 4-bit dequantization: one block, one table lookup per nibble.
 *
 *     table[c]    = code[c] * scale            (float32 product; bfloat16: then rounded)
 *     out[2j]     = table[bytes[j] >> 4]      (the first value of a pair is the high nibble)
 *     out[2j + 1] = table[bytes[j] & 15]      for j in [0, n_bytes)
 *
 * A block has only 16 distinct outputs, so the 16 products are formed first and
 * every output is a copy of one of them. Each path below forms the same
 * float32 products (IEEE multiplication, no fused multiply-add: the extension
 * is built with -ffp-contract=off) and rounds them to bfloat16 with the same
 * integer rule, so the bytes written are the same whatever the path;
 * tests/test_kernels_equal.py checks it on every path the CPU has.
 *
 * Three paths, chosen once at run time from the CPU (one build, every x86-64 host):
 *
 *   portable  plain C, the reference (any CPU, any compiler);
 *   avx2      8 lanes: vpermps looks up 8 of the 16 floats per instruction, two
 *             lookups and a blend give the 16-entry table; bfloat16 uses vpshufb,
 *             a 16-entry *byte* table, once for the low and once for the high bytes;
 *   avx512    16 lanes: vpermps over a 512-bit register *is* a 16-entry float
 *             table, and vpermw (AVX-512BW) a 32-entry 16-bit one.
 *
 * The nibble split is the same in both SIMD paths: shift each byte right by 4
 * (high nibbles), mask with 15 (low nibbles), interleave high and low so the
 * indexes come out in output order.
 *
 * lookup16_select(level) picks a path: 0 = the best the CPU has, 1 = portable,
 * 2 = avx2, 3 = avx512; asking for one the CPU (or the build) lacks returns -1
 * and changes nothing. lookup16_level() says which one is in use.
 */
#ifndef QLORA_REF_LOOKUP16_H
#define QLORA_REF_LOOKUP16_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* ---- portable ------------------------------------------------------------------ */

/* float32 -> bfloat16 bits, round to nearest, ties to even (torch's rule); NaN -> 0x7FC0 */
static inline uint16_t lookup16_bf16_bits(float v) {
    uint32_t u;
    memcpy(&u, &v, 4);
    uint16_t rounded = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    return v != v ? (uint16_t)0x7FC0 : rounded;
}

static void lookup16_f32_portable(const uint8_t* bytes, ptrdiff_t n_bytes, const float* code,
                                  float scale, float* out) {
    float table[16];
    for (int c = 0; c < 16; c++) table[c] = code[c] * scale;
    for (ptrdiff_t j = 0; j < n_bytes; j++) {
        out[2 * j] = table[bytes[j] >> 4];
        out[2 * j + 1] = table[bytes[j] & 15];
    }
}

static void lookup16_bf16_portable(const uint8_t* bytes, ptrdiff_t n_bytes, const float* code,
                                   float scale, uint16_t* out) {
    uint16_t table[16];
    for (int c = 0; c < 16; c++) table[c] = lookup16_bf16_bits(code[c] * scale);
    for (ptrdiff_t j = 0; j < n_bytes; j++) {
        out[2 * j] = table[bytes[j] >> 4];
        out[2 * j + 1] = table[bytes[j] & 15];
    }
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(QLORA_REF_NO_SIMD)
#define QLORA_REF_X86_SIMD 1
#include <immintrin.h>

/* 16 packed bytes -> their 32 nibble indexes in output order, as two vectors of 16 bytes */
#define LOOKUP16_SPLIT(src, first16, last16)                                           \
    do {                                                                               \
        __m128i b_ = _mm_loadu_si128((const __m128i*)(src));                           \
        __m128i hi_ = _mm_and_si128(_mm_srli_epi16(b_, 4), _mm_set1_epi8(15));         \
        __m128i lo_ = _mm_and_si128(b_, _mm_set1_epi8(15));                            \
        first16 = _mm_unpacklo_epi8(hi_, lo_);   /* hi0 lo0 hi1 lo1 ... hi7 lo7 */     \
        last16 = _mm_unpackhi_epi8(hi_, lo_);    /* hi8 lo8 ...        hi15 lo15 */    \
    } while (0)

/* ---- avx2 ----------------------------------------------------------------------- */

/* bfloat16 bits of 8 floats (the rule of lookup16_bf16_bits), zero-extended to 32 bits */
__attribute__((target("avx2")))
static inline __m256i lookup16_round_bf16_avx2(__m256 v) {
    __m256i u = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i rounded = _mm256_srli_epi32(
        _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb), 16);
    __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    return _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), nan);
}

__attribute__((target("avx2")))
static inline __m256 lookup16_8floats_avx2(__m128i idx8, __m256 low8, __m256 high8) {
    __m256i idx = _mm256_cvtepu8_epi32(idx8);                     /* 8 indexes 0..15 */
    __m256 from_low = _mm256_permutevar8x32_ps(low8, idx);        /* uses idx & 7 */
    __m256 from_high = _mm256_permutevar8x32_ps(high8, idx);
    __m256 is_high = _mm256_castsi256_ps(_mm256_cmpgt_epi32(idx, _mm256_set1_epi32(7)));
    return _mm256_blendv_ps(from_low, from_high, is_high);
}

__attribute__((target("avx2")))
static void lookup16_f32_avx2(const uint8_t* bytes, ptrdiff_t n_bytes, const float* code,
                              float scale, float* out) {
    __m256 s = _mm256_set1_ps(scale);
    __m256 low8 = _mm256_mul_ps(_mm256_loadu_ps(code), s);        /* table[0..7] */
    __m256 high8 = _mm256_mul_ps(_mm256_loadu_ps(code + 8), s);   /* table[8..15] */
    ptrdiff_t j = 0;
    for (; j + 16 <= n_bytes; j += 16) {           /* 16 bytes -> 32 floats */
        __m128i first16, last16;
        LOOKUP16_SPLIT(bytes + j, first16, last16);
        float* o = out + 2 * j;
        _mm256_storeu_ps(o, lookup16_8floats_avx2(first16, low8, high8));
        _mm256_storeu_ps(o + 8, lookup16_8floats_avx2(_mm_srli_si128(first16, 8), low8, high8));
        _mm256_storeu_ps(o + 16, lookup16_8floats_avx2(last16, low8, high8));
        _mm256_storeu_ps(o + 24, lookup16_8floats_avx2(_mm_srli_si128(last16, 8), low8, high8));
    }
    lookup16_f32_portable(bytes + j, n_bytes - j, code, scale, out + 2 * j);
}

__attribute__((target("avx2")))
static void lookup16_bf16_avx2(const uint8_t* bytes, ptrdiff_t n_bytes, const float* code,
                               float scale, uint16_t* out) {
    __m256 s = _mm256_set1_ps(scale);
    __m256i t0 = lookup16_round_bf16_avx2(_mm256_mul_ps(_mm256_loadu_ps(code), s));      /* 0..7 */
    __m256i t1 = lookup16_round_bf16_avx2(_mm256_mul_ps(_mm256_loadu_ps(code + 8), s));  /* 8..15 */
    /* 16 x 32-bit -> 16 x 16-bit (packus works per 128-bit lane: restore the order) */
    __m256i t16 = _mm256_permute4x64_epi64(_mm256_packus_epi32(t0, t1), 0xD8);
    /* the 16 entries as two byte tables, low bytes and high bytes: vpshufb looks up bytes */
    __m256i split = _mm256_shuffle_epi8(t16, _mm256_setr_epi8(
        0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
        0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15));
    split = _mm256_permute4x64_epi64(split, 0xD8);   /* lo0..lo15 | hi0..hi15 */
    __m128i low_bytes = _mm256_castsi256_si128(split);
    __m128i high_bytes = _mm256_extracti128_si256(split, 1);
    ptrdiff_t j = 0;
    for (; j + 16 <= n_bytes; j += 16) {           /* 16 bytes -> 32 values */
        __m128i first16, last16;
        LOOKUP16_SPLIT(bytes + j, first16, last16);
        __m128i* o = (__m128i*)(out + 2 * j);
        __m128i lo = _mm_shuffle_epi8(low_bytes, first16), hi = _mm_shuffle_epi8(high_bytes, first16);
        _mm_storeu_si128(o, _mm_unpacklo_epi8(lo, hi));
        _mm_storeu_si128(o + 1, _mm_unpackhi_epi8(lo, hi));
        lo = _mm_shuffle_epi8(low_bytes, last16);
        hi = _mm_shuffle_epi8(high_bytes, last16);
        _mm_storeu_si128(o + 2, _mm_unpacklo_epi8(lo, hi));
        _mm_storeu_si128(o + 3, _mm_unpackhi_epi8(lo, hi));
    }
    lookup16_bf16_portable(bytes + j, n_bytes - j, code, scale, out + 2 * j);
}

/* ---- avx512 --------------------------------------------------------------------- */

__attribute__((target("avx512f,avx512bw")))
static void lookup16_f32_avx512(const uint8_t* bytes, ptrdiff_t n_bytes, const float* code,
                                float scale, float* out) {
    __m512 table = _mm512_mul_ps(_mm512_loadu_ps(code), _mm512_set1_ps(scale));
    ptrdiff_t j = 0;
    for (; j + 16 <= n_bytes; j += 16) {           /* 16 bytes -> 32 floats */
        __m128i first16, last16;
        LOOKUP16_SPLIT(bytes + j, first16, last16);
        _mm512_storeu_ps(out + 2 * j, _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(first16), table));
        _mm512_storeu_ps(out + 2 * j + 16,
                         _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(last16), table));
    }
    lookup16_f32_portable(bytes + j, n_bytes - j, code, scale, out + 2 * j);
}

__attribute__((target("avx512f,avx512bw")))
static void lookup16_bf16_avx512(const uint8_t* bytes, ptrdiff_t n_bytes, const float* code,
                                 float scale, uint16_t* out) {
    __m512 v = _mm512_mul_ps(_mm512_loadu_ps(code), _mm512_set1_ps(scale));
    __m512i u = _mm512_castps_si512(v);               /* the rule of lookup16_bf16_bits */
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i bits = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)),
                                                      lsb), 16);
    bits = _mm512_mask_mov_epi32(bits, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q),
                                 _mm512_set1_epi32(0x7FC0));
    __m512i table = _mm512_castsi256_si512(_mm512_cvtepi32_epi16(bits));   /* 16 x 16-bit */
    ptrdiff_t j = 0;
    for (; j + 16 <= n_bytes; j += 16) {           /* 16 bytes -> 32 values */
        __m128i first16, last16;
        LOOKUP16_SPLIT(bytes + j, first16, last16);
        __m512i idx = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_cvtepu8_epi16(first16)),
                                         _mm256_cvtepu8_epi16(last16), 1);   /* 32 indexes */
        _mm512_storeu_si512((void*)(out + 2 * j), _mm512_permutexvar_epi16(idx, table));
    }
    lookup16_bf16_portable(bytes + j, n_bytes - j, code, scale, out + 2 * j);
}
#endif  /* x86-64 SIMD */

/* ---- dispatch ------------------------------------------------------------------- */

typedef void (*lookup16_f32_fn)(const uint8_t*, ptrdiff_t, const float*, float, float*);
typedef void (*lookup16_bf16_fn)(const uint8_t*, ptrdiff_t, const float*, float, uint16_t*);

static lookup16_f32_fn lookup16_f32 = lookup16_f32_portable;
static lookup16_bf16_fn lookup16_bf16 = lookup16_bf16_portable;
static int lookup16_current = 1;

/* The best level this CPU and this build can run: 1 portable, 2 avx2, 3 avx512. */
static int lookup16_best(void) {
#ifdef QLORA_REF_X86_SIMD
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) return 3;
    if (__builtin_cpu_supports("avx2")) return 2;
#endif
    return 1;
}

static int lookup16_select(int level) {
    int best = lookup16_best();
    if (level == 0) level = best;
    if (level < 1 || level > best) return -1;
    lookup16_f32 = lookup16_f32_portable;
    lookup16_bf16 = lookup16_bf16_portable;
#ifdef QLORA_REF_X86_SIMD
    if (level == 2) { lookup16_f32 = lookup16_f32_avx2; lookup16_bf16 = lookup16_bf16_avx2; }
    if (level == 3) { lookup16_f32 = lookup16_f32_avx512; lookup16_bf16 = lookup16_bf16_avx512; }
#endif
    lookup16_current = level;
    return level;
}

static int lookup16_level(void) { return lookup16_current; }

#endif  /* QLORA_REF_LOOKUP16_H */
