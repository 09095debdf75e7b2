/* decode_step.h -- the small pieces of one decoding step of a Llama block, for one token.
 *
 * qlora_ref.nn.decode.LlamaDecoder runs a step as torch calls: RMSNorm, RoPE, the
 * KV-cache writes, scaled_dot_product_attention, SiLU * up, the residual sums. For one
 * token each is a few hundred to a few thousand multiply-adds, and each torch call
 * costs 1-10 microseconds of dispatch; on SmolLM2 (30 layers) they took about a
 * quarter of a token's time. Here each is one loop over float32 arrays. The torch
 * lines in LlamaDecoder._forward are the readable twin; tests/nn/test_decode_step.py
 * checks every function against them (within float32 rounding: the order of the sums
 * differs) and the whole step against the twin's tokens.
 *
 *   rms_norm:  out_i = x_i / sqrt(mean_j x_j^2 + eps) * w_i          (Zhang & Sennrich 2019)
 *   rope:      out = v * cos + roll(v, d/2) * sin_signed              (Su et al. 2021; the sign
 *              of rotate_half folded into the table: sin_signed = [-sin, +sin])
 *   attention: out_h = sum_t p_t v_t,  p = softmax_t(scale * q_h . k_t),  t = 0..pos,
 *              query head h reading key/value head h / (n_heads / n_kv)   (grouped-query)
 *   silu_mul:  out_i = silu(g_i) * u_i,  silu(g) = g / (1 + exp(-g))
 *   round:     float32 -> nearest-even bfloat16 -> float32, subnormals kept (torch's
 *              .to(torch.bfloat16), which the layer applies to its input)
 *
 * Compiled with -ffp-contract=off like the rest: a * b + c rounds twice.
 */
#ifndef QLORA_REF_DECODE_STEP_H
#define QLORA_REF_DECODE_STEP_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* The loops below are plain C; on x86-64 with GCC and glibc (target_clones needs its
 * ifunc) an AVX2 copy of the heavier ones is compiled too, and the loader picks it on CPUs
 * that have AVX2: the same float32 operations in the same order (no fast-math, and
 * -ffp-contract=off holds for both copies). */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__GLIBC__)
#define DECODE_VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define DECODE_VECTOR_CLONES
#endif

/* torch's float32 -> bfloat16 (c10 round_to_nearest_even): NaN -> 0x7FC0, else add
 * 0x7FFF plus the lowest kept bit and drop 16 bits; the value comes back as float32 */
static inline float decode_round_bf16(float v) {
    uint32_t u;
    memcpy(&u, &v, 4);
    if (v != v) u = 0x7FC00000u;
    else u = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
    float r;
    memcpy(&r, &u, 4);
    return r;
}

static void decode_round_bf16_n(const float* x, ptrdiff_t n, float* out) {
    for (ptrdiff_t i = 0; i < n; i++) out[i] = decode_round_bf16(x[i]);
}

/* rows of `hidden` values; x and out may be the same array */
DECODE_VECTOR_CLONES
static void decode_rms_norm(const float* x, ptrdiff_t rows, ptrdiff_t hidden, const float* w,
                            float eps, float* out) {
    for (ptrdiff_t r = 0; r < rows; r++) {
        const float* xr = x + r * hidden;
        float* yr = out + r * hidden;
        float sum = 0.0f;
        for (ptrdiff_t i = 0; i < hidden; i++) sum += xr[i] * xr[i];
        float inv = 1.0f / sqrtf(sum / (float)hidden + eps);     /* rsqrt(mean(x^2) + eps) */
        for (ptrdiff_t i = 0; i < hidden; i++) yr[i] = xr[i] * inv * w[i];
    }
}

/* one head vector of d values, rotated; out must not alias v */
static inline void decode_rope(const float* v, const float* cos, const float* sin_signed,
                               ptrdiff_t d, float* out) {
    ptrdiff_t half = d / 2;
    for (ptrdiff_t i = 0; i < d; i++) {
        float rolled = v[i < half ? i + half : i - half];          /* roll(v, d/2)[i] */
        out[i] = v[i] * cos[i] + rolled * sin_signed[i];
    }
}

/* One new token at position `pos` of one sequence.
 * qkv:     (n_heads + 2 n_kv) * d: q heads, then k heads, then v heads (projections' output)
 * k_cache, v_cache: (n_kv, total, d); row `pos` of each head is written here
 * scores:  pos + 1 floats of scratch;  q: d floats of scratch
 * out:     n_heads * d: each query head's attention output */
DECODE_VECTOR_CLONES
static void decode_attend(const float* qkv, const float* cos, const float* sin_signed,
                          float* k_cache, float* v_cache, ptrdiff_t total, ptrdiff_t pos,
                          ptrdiff_t n_heads, ptrdiff_t n_kv, ptrdiff_t d, float scale,
                          float* scores, float* q, float* out) {
    const float* k_new = qkv + n_heads * d;
    const float* v_new = qkv + (n_heads + n_kv) * d;
    for (ptrdiff_t j = 0; j < n_kv; j++) {                      /* the cache takes k and v */
        decode_rope(k_new + j * d, cos, sin_signed, d, k_cache + (j * total + pos) * d);
        memcpy(v_cache + (j * total + pos) * d, v_new + j * d, d * sizeof(float));
    }
    ptrdiff_t group = n_heads / n_kv;
    for (ptrdiff_t h = 0; h < n_heads; h++) {
        const float* keys = k_cache + (h / group) * total * d;
        const float* values = v_cache + (h / group) * total * d;
        decode_rope(qkv + h * d, cos, sin_signed, d, q);
        float top = -INFINITY;
        for (ptrdiff_t t = 0; t <= pos; t++) {                  /* scale * q . k_t */
            float dot = 0.0f;
            for (ptrdiff_t i = 0; i < d; i++) dot += q[i] * keys[t * d + i];
            scores[t] = dot * scale;
            if (scores[t] > top) top = scores[t];
        }
        float total_p = 0.0f;
        for (ptrdiff_t t = 0; t <= pos; t++) {                  /* exp(s - max): softmax's top */
            scores[t] = expf(scores[t] - top);
            total_p += scores[t];
        }
        float* o = out + h * d;
        for (ptrdiff_t i = 0; i < d; i++) o[i] = 0.0f;
        for (ptrdiff_t t = 0; t <= pos; t++)                    /* sum_t p_t v_t */
            for (ptrdiff_t i = 0; i < d; i++) o[i] += scores[t] * values[t * d + i];
        float inv = 1.0f / total_p;
        for (ptrdiff_t i = 0; i < d; i++) o[i] *= inv;
    }
}

/* rows of [g | u] (2 * inter each) -> rows of silu(g) * u (inter each) */
DECODE_VECTOR_CLONES
static void decode_silu_mul(const float* gu, ptrdiff_t rows, ptrdiff_t inter, float* out) {
    for (ptrdiff_t r = 0; r < rows; r++) {
        const float* g = gu + r * 2 * inter;
        const float* u = g + inter;
        float* y = out + r * inter;
        for (ptrdiff_t i = 0; i < inter; i++) y[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    }
}

/* The adapters' update of a few rows, after the base product is in y:
 *     h = x A_cat^T                 (rows, R): a_t is A_cat^T, (in, R)
 *     y[:, o0:o1] += s (h[:, r0:r1] B_i^T)   for each layer i of the projection
 * b_t holds each B_i^T, (r_i, o1 - o0), one after another; blocks is n_blocks rows of
 * (o0, o1, r0, r1); scales one s per block. h: rows * R floats of scratch; t: the
 * widest block's outputs of scratch. */
DECODE_VECTOR_CLONES
static void decode_lora(const float* restrict x, ptrdiff_t rows, ptrdiff_t in_features,
                        const float* restrict a_t, ptrdiff_t R, const float* restrict b_t,
                        const ptrdiff_t* blocks, const float* scales, ptrdiff_t n_blocks,
                        float* restrict h, float* restrict t, float* restrict y,
                        ptrdiff_t out_features) {
    for (ptrdiff_t r = 0; r < rows; r++) {
        float* hr = h + r * R;
        for (ptrdiff_t c = 0; c < R; c++) hr[c] = 0.0f;
        for (ptrdiff_t i = 0; i < in_features; i++) {            /* h = x A^T */
            float xi = x[r * in_features + i];
            for (ptrdiff_t c = 0; c < R; c++) hr[c] += xi * a_t[i * R + c];
        }
        const float* b = b_t;
        for (ptrdiff_t k = 0; k < n_blocks; k++) {
            ptrdiff_t o0 = blocks[4 * k], o1 = blocks[4 * k + 1];
            ptrdiff_t r0 = blocks[4 * k + 2], r1 = blocks[4 * k + 3], size = o1 - o0;
            for (ptrdiff_t j = 0; j < size; j++) t[j] = 0.0f;
            for (ptrdiff_t c = r0; c < r1; c++) {                /* h_i B_i^T */
                float hc = hr[c];
                for (ptrdiff_t j = 0; j < size; j++) t[j] += hc * b[j];
                b += size;
            }
            float* yr = y + r * out_features + o0;
            for (ptrdiff_t j = 0; j < size; j++) yr[j] += scales[k] * t[j];
        }
    }
}

#endif  /* QLORA_REF_DECODE_STEP_H */
