/* lookup16.h -- the inner loop of 4-bit dequantization: one block, one table lookup per nibble.
 *
 *     table[c]    = code[c] * scale            (float32 product; bfloat16: then rounded)
 *     out[2j]     = table[bytes[j] >> 4]      (the first value of a pair is the high nibble)
 *     out[2j + 1] = table[bytes[j] & 15]      for j in [0, n_bytes)
 *
 * A block has only 16 distinct outputs, so the 16 products are formed first and
 * every output is a copy of one of them. Each path below forms the same
 * float32 products (IEEE multiplication, no fused multiply-add: the extension
 * is built with -ffp-contract=off) and rounds them to bfloat16 by the one rule
 * of lookup16_bf16_bits, so the bytes written are the same whatever the path;
 * tests/kernels/test_kernels_equal.py checks it on every path the CPU has.
 *
 * Four paths, chosen once at run time from the CPU (one build, every x86-64 host):
 *
 *   portable    plain C, the reference (any CPU, any compiler);
 *   avx2        8 lanes: vpermps looks up 8 of the 16 floats per instruction, two
 *               lookups and a blend give the 16-entry table; bfloat16 uses vpshufb,
 *               a 16-entry *byte* table, once for the low and once for the high bytes;
 *   avx512      16 lanes: vpermps over a 512-bit register *is* a 16-entry float
 *               table, and vpermw (AVX-512BW) a 32-entry 16-bit one;
 *   avx512bf16  avx512, with the bfloat16 table rounded by one vcvtneps2bf16
 *               (AVX512-BF16) instead of the integer rule: the same bits (below).
 *
 * lookup16_select(level) picks a path: 0 = the best the CPU has, 1 = portable,
 * 2 = avx2, 3 = avx512, 4 = avx512bf16; asking for one the CPU (or the build)
 * lacks returns -1 and changes nothing. lookup16_level() says which one is in use.
 */
#ifndef QLORA_REF_LOOKUP16_H
#define QLORA_REF_LOOKUP16_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* One block's loop is inlined into a loop over blocks (LOOKUP16_BLOCKS), so that each
 * path's constants are set up once per call, not once per block. */
#define LOOKUP16_BODY static inline __attribute__((always_inline))

/* NAME_blocks: NAME over consecutive blocks of block_bytes bytes (the last may be shorter),
 * block k scaled by scales[k]: one call for a run of blocks */
#define LOOKUP16_BLOCKS(TARGET, NAME, T)                                                      \
    TARGET static void NAME##_blocks(const uint8_t* bytes, ptrdiff_t n_bytes,                  \
                                     ptrdiff_t block_bytes, const float* scales,              \
                                     const float* code, T* out) {                             \
        for (ptrdiff_t j = 0; j < n_bytes; j += block_bytes, scales++)                        \
            NAME(bytes + j, n_bytes - j < block_bytes ? n_bytes - j : block_bytes, code,       \
                 *scales, out + 2 * j);                                                       \
    }

/* ---- the bfloat16 rule (written once; vcvtneps2bf16 computes the same) ----------------
 *
 * float32 bits u -> bfloat16 bits:
 *   NaN                        (u >> 16) | 0x0040      a quiet NaN, sign and top bits kept
 *   |v| < 2^-126 (subnormal)   (u >> 16) & 0x8000      a zero of the same sign
 *   otherwise                  (u + 0x7FFF + ((u >> 16) & 1)) >> 16   nearest, ties to even
 *
 * This is what VCVTNEPS2BF16 does (Intel SDM: round to nearest even, denormal
 * inputs treated as zero, NaN quieted) and so what bitsandbytes' CPU kernel
 * writes on a CPU with AVX512-BF16; torch's .to(torch.bfloat16) differs only on
 * subnormals, which it rounds instead of flushing. Written without branches so
 * that a loop of 16 (lookup16_bf16_table) vectorises.
 */
static inline uint16_t lookup16_bf16_bits(float v) {
    uint32_t u;
    memcpy(&u, &v, 4);
    uint32_t kept = (u & 0x7F800000u) ? u : (u & 0x80000000u);     /* flush subnormals */
    uint16_t rounded = (uint16_t)((kept + 0x7FFFu + ((kept >> 16) & 1u)) >> 16);
    uint16_t quiet_nan = (uint16_t)((u >> 16) | 0x0040u);
    return (u & 0x7FFFFFFFu) > 0x7F800000u ? quiet_nan : rounded;
}

/* the block's 16 outputs in bfloat16: table[c] = bf16(code[c] * scale) */
static inline void lookup16_bf16_table(const float* code, float scale, uint16_t* table) {
    for (int c = 0; c < 16; c++) table[c] = lookup16_bf16_bits(code[c] * scale);
}

/* ---- portable ------------------------------------------------------------------ */

LOOKUP16_BODY void lookup16_f32_portable(const uint8_t* bytes, ptrdiff_t n_bytes,
                                         const float* code, float scale, float* out) {
    float table[16];
    for (int c = 0; c < 16; c++) table[c] = code[c] * scale;
    for (ptrdiff_t j = 0; j < n_bytes; j++) {
        out[2 * j] = table[bytes[j] >> 4];
        out[2 * j + 1] = table[bytes[j] & 15];
    }
}

LOOKUP16_BODY void lookup16_bf16_portable(const uint8_t* bytes, ptrdiff_t n_bytes,
                                          const float* code, float scale, uint16_t* out) {
    uint16_t table[16];
    lookup16_bf16_table(code, scale, table);
    for (ptrdiff_t j = 0; j < n_bytes; j++) {
        out[2 * j] = table[bytes[j] >> 4];
        out[2 * j + 1] = table[bytes[j] & 15];
    }
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(QLORA_REF_NO_SIMD)
#define QLORA_REF_X86_SIMD 1
#if defined(__clang__) ? __clang_major__ >= 9 : __GNUC__ >= 9   /* they know avx512bf16 */
#define QLORA_REF_AVX512BF16 1
#endif
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

__attribute__((target("avx2")))
static inline __m256 lookup16_8floats_avx2(__m128i idx8, __m256 low8, __m256 high8) {
    __m256i idx = _mm256_cvtepu8_epi32(idx8);                     /* 8 indexes 0..15 */
    __m256 from_low = _mm256_permutevar8x32_ps(low8, idx);        /* uses idx & 7 */
    __m256 from_high = _mm256_permutevar8x32_ps(high8, idx);
    __m256 is_high = _mm256_castsi256_ps(_mm256_cmpgt_epi32(idx, _mm256_set1_epi32(7)));
    return _mm256_blendv_ps(from_low, from_high, is_high);
}

__attribute__((target("avx2"))) LOOKUP16_BODY
void lookup16_f32_avx2(const uint8_t* bytes, ptrdiff_t n_bytes, const float* code,
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

__attribute__((target("avx2"))) LOOKUP16_BODY
void lookup16_bf16_avx2(const uint8_t* bytes, ptrdiff_t n_bytes, const float* code,
                        float scale, uint16_t* out) {
    uint16_t table[16];
    lookup16_bf16_table(code, scale, table);
    /* the 16 entries as two byte tables, low bytes and high bytes (vpshufb looks up bytes
     * within each 128-bit lane, so each table is repeated in both lanes) */
    __m256i split = _mm256_shuffle_epi8(_mm256_loadu_si256((const __m256i*)table),
        _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                         0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15));
    split = _mm256_permute4x64_epi64(split, 0xD8);               /* lo0..lo15 | hi0..hi15 */
    __m256i low_bytes = _mm256_permute2x128_si256(split, split, 0x00);
    __m256i high_bytes = _mm256_permute2x128_si256(split, split, 0x11);
    /* bytes d = 4-byte groups D0..D7; in-lane unpacking doubles twice, so lane 0 takes
     * D0 D2 D4 D6 and lane 1 D1 D3 D5 D7 for the four stores to come out in order */
    const __m256i groups = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
    const __m256i fifteen = _mm256_set1_epi8(15);
    ptrdiff_t j = 0;
    for (; j + 32 <= n_bytes; j += 32) {           /* 32 bytes -> 64 values */
        __m256i b = _mm256_permutevar8x32_epi32(_mm256_loadu_si256((const __m256i*)(bytes + j)),
                                                groups);
        __m256i hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), fifteen);
        __m256i lo = _mm256_and_si256(b, fifteen);
        __m256i idx_a = _mm256_unpacklo_epi8(hi, lo), idx_b = _mm256_unpackhi_epi8(hi, lo);
        __m256i* o = (__m256i*)(out + 2 * j);
        __m256i l = _mm256_shuffle_epi8(low_bytes, idx_a);
        __m256i h = _mm256_shuffle_epi8(high_bytes, idx_a);
        _mm256_storeu_si256(o, _mm256_unpacklo_epi8(l, h));        /* values 0..15 */
        _mm256_storeu_si256(o + 1, _mm256_unpackhi_epi8(l, h));    /* 16..31 */
        l = _mm256_shuffle_epi8(low_bytes, idx_b);
        h = _mm256_shuffle_epi8(high_bytes, idx_b);
        _mm256_storeu_si256(o + 2, _mm256_unpacklo_epi8(l, h));    /* 32..47 */
        _mm256_storeu_si256(o + 3, _mm256_unpackhi_epi8(l, h));    /* 48..63 */
    }
    for (; j < n_bytes; j++) {
        out[2 * j] = table[bytes[j] >> 4];
        out[2 * j + 1] = table[bytes[j] & 15];
    }
}

/* ---- avx512 --------------------------------------------------------------------- */

__attribute__((target("avx512f,avx512bw"))) LOOKUP16_BODY
void lookup16_f32_avx512(const uint8_t* bytes, ptrdiff_t n_bytes, const float* code,
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

/* out[2j], out[2j+1] from a 32-entry table of 16-bit values holding the 16 entries twice:
 * each byte b becomes the dword (b << 16) | (b >> 4), two word indexes in output order;
 * vpermw reads an index's low 5 bits, so b & 31 finds table[b & 15] in either copy */
__attribute__((target("avx512f,avx512bw"), always_inline))
static inline void lookup16_bf16_avx512_loop(const uint8_t* bytes, ptrdiff_t n_bytes,
                                             __m512i table2, const uint16_t* table,
                                             uint16_t* out) {
    ptrdiff_t j = 0;
    for (; j + 16 <= n_bytes; j += 16) {           /* 16 bytes -> 32 values */
        __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(bytes + j)));
        __m512i idx = _mm512_or_si512(_mm512_slli_epi32(b, 16), _mm512_srli_epi32(b, 4));
        _mm512_storeu_si512((void*)(out + 2 * j), _mm512_permutexvar_epi16(idx, table2));
    }
    for (; j < n_bytes; j++) {
        out[2 * j] = table[bytes[j] >> 4];
        out[2 * j + 1] = table[bytes[j] & 15];
    }
}

__attribute__((target("avx512f,avx512bw"))) LOOKUP16_BODY
void lookup16_bf16_avx512(const uint8_t* bytes, ptrdiff_t n_bytes, const float* code,
                          float scale, uint16_t* out) {
    uint16_t table[16];
    lookup16_bf16_table(code, scale, table);
    __m512i table2 = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)table));
    lookup16_bf16_avx512_loop(bytes, n_bytes, table2, table, out);
}

/* ---- avx512bf16 ----------------------------------------------------------------- */
#ifdef QLORA_REF_AVX512BF16

__attribute__((target("avx512f,avx512bw,avx512bf16"))) LOOKUP16_BODY
void lookup16_bf16_avx512bf16(const uint8_t* bytes, ptrdiff_t n_bytes, const float* code,
                              float scale, uint16_t* out) {
    /* vcvtneps2bf16: the rule of lookup16_bf16_bits in one instruction */
    __m256i t16 = (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(code),
                                                             _mm512_set1_ps(scale)));
    uint16_t table[16];
    _mm256_storeu_si256((__m256i*)table, t16);     /* for a tail of fewer than 16 bytes */
    lookup16_bf16_avx512_loop(bytes, n_bytes, _mm512_broadcast_i64x4(t16), table, out);
}
#endif  /* QLORA_REF_AVX512BF16 */
#endif  /* x86-64 SIMD */

/* ---- dispatch ------------------------------------------------------------------- */

LOOKUP16_BLOCKS(, lookup16_f32_portable, float)
LOOKUP16_BLOCKS(, lookup16_bf16_portable, uint16_t)
#ifdef QLORA_REF_X86_SIMD
LOOKUP16_BLOCKS(__attribute__((target("avx2"))), lookup16_f32_avx2, float)
LOOKUP16_BLOCKS(__attribute__((target("avx2"))), lookup16_bf16_avx2, uint16_t)
LOOKUP16_BLOCKS(__attribute__((target("avx512f,avx512bw"))), lookup16_f32_avx512, float)
LOOKUP16_BLOCKS(__attribute__((target("avx512f,avx512bw"))), lookup16_bf16_avx512, uint16_t)
#ifdef QLORA_REF_AVX512BF16
LOOKUP16_BLOCKS(__attribute__((target("avx512f,avx512bw,avx512bf16"))), lookup16_bf16_avx512bf16,
                uint16_t)
#endif
#endif

typedef void (*lookup16_f32_fn)(const uint8_t*, ptrdiff_t, ptrdiff_t, const float*, const float*,
                                float*);
typedef void (*lookup16_bf16_fn)(const uint8_t*, ptrdiff_t, ptrdiff_t, const float*, const float*,
                                 uint16_t*);

/* lookup16_f32 / lookup16_bf16(bytes, n_bytes, block_bytes, scales, code, out): the path chosen */
static lookup16_f32_fn lookup16_f32 = lookup16_f32_portable_blocks;
static lookup16_bf16_fn lookup16_bf16 = lookup16_bf16_portable_blocks;
static int lookup16_current = 1;

/* The best level this CPU and this build can run: 1 portable, 2 avx2, 3 avx512, 4 avx512bf16. */
static int lookup16_best(void) {
#ifdef QLORA_REF_X86_SIMD
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) {
#ifdef QLORA_REF_AVX512BF16
        if (__builtin_cpu_supports("avx512bf16")) return 4;
#endif
        return 3;
    }
    if (__builtin_cpu_supports("avx2")) return 2;
#endif
    return 1;
}

static int lookup16_select(int level) {
    int best = lookup16_best();
    if (level == 0) level = best;
    if (level < 1 || level > best) return -1;
    lookup16_f32 = lookup16_f32_portable_blocks;
    lookup16_bf16 = lookup16_bf16_portable_blocks;
#ifdef QLORA_REF_X86_SIMD
    if (level >= 2) {
        lookup16_f32 = lookup16_f32_avx2_blocks;
        lookup16_bf16 = lookup16_bf16_avx2_blocks;
    }
    if (level >= 3) {
        lookup16_f32 = lookup16_f32_avx512_blocks;
        lookup16_bf16 = lookup16_bf16_avx512_blocks;
    }
#ifdef QLORA_REF_AVX512BF16
    if (level == 4) lookup16_bf16 = lookup16_bf16_avx512bf16_blocks;
#endif
#endif
    lookup16_current = level;
    return level;
}

static int lookup16_level(void) { return lookup16_current; }

#endif  /* QLORA_REF_LOOKUP16_H */
