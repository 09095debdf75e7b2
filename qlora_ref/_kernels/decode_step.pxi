# decode_step.pxi -- one decoding step's small pieces (decode_step.h) and a 4-bit projection
# with its adapters in one call (included in quant4.pyx).
#
# qlora_ref.nn.decode.LlamaDecoder uses them for a single sequence's new token; its torch
# lines are the readable twin (tests/nn/test_decode_step.py). Each function checks its
# arrays' shapes once per call (a few comparisons) and then runs without the GIL.

cdef extern from "decode_step.h" nogil:
    float decode_round_bf16(float v)
    void decode_round_bf16_n(const float* x, Py_ssize_t n, float* out)
    void decode_rms_norm(const float* x, Py_ssize_t rows, Py_ssize_t hidden, const float* w,
                         float eps, float* out)
    void decode_attend(const float* qkv, const float* cos, const float* sin_signed,
                       float* k_cache, float* v_cache, Py_ssize_t total, Py_ssize_t pos,
                       Py_ssize_t n_heads, Py_ssize_t n_kv, Py_ssize_t d, float scale,
                       float* scores, float* q, float* out)
    void decode_silu_mul(const float* gu, Py_ssize_t rows, Py_ssize_t inter, float* out)
    void decode_lora(const float* x, Py_ssize_t rows, Py_ssize_t in_features,
                     const float* a_t, Py_ssize_t R, const float* b_t,
                     const Py_ssize_t* blocks, const float* scales, Py_ssize_t n_blocks,
                     float* h, float* t, float* y, Py_ssize_t out_features)


cdef int _check_same(str what, Py_ssize_t a, Py_ssize_t b) except -1:
    if a != b:
        raise ValueError(f"{what}: {a} != {b}")
    return 0


def round_bf16(const float[::1] x,     # in: (n,) float32
               float[::1] out):        # out: (n,) float32 holding bfloat16 values
    """``out = x.to(torch.bfloat16).to(torch.float32)``: nearest even, subnormals kept, NaN quieted."""
    _check_same("round_bf16: len(out) must equal len(x)", out.shape[0], x.shape[0])
    if x.shape[0]:
        decode_round_bf16_n(&x[0], x.shape[0], &out[0])


def rms_norm(const float[:, ::1] x,    # in: (rows, hidden)
             const float[::1] weight,  # in: (hidden,)
             float eps,
             float[:, ::1] out):       # out: (rows, hidden); may be x itself
    """``out = F.rms_norm(x, (hidden,), weight, eps)`` in float32 (sum order aside)."""
    _check_same("rms_norm: len(weight) must equal x.shape[1]", weight.shape[0], x.shape[1])
    _check_same("rms_norm: out.shape[0] must equal x.shape[0]", out.shape[0], x.shape[0])
    _check_same("rms_norm: out.shape[1] must equal x.shape[1]", out.shape[1], x.shape[1])
    if x.shape[0] and x.shape[1]:
        with nogil:
            decode_rms_norm(&x[0, 0], x.shape[0], x.shape[1], &weight[0], eps, &out[0, 0])


def attend_token(const float[::1] qkv,        # in: ((n_heads + 2 n_kv) d,) this token's q, k, v
                 const float[::1] cos,        # in: (d,) the position's cosines
                 const float[::1] sin_signed, # in: (d,) its sines, first half negated
                 float[:, :, ::1] k_cache,    # in/out: (n_kv, total, d); row pos written
                 float[:, :, ::1] v_cache,    # in/out: (n_kv, total, d); row pos written
                 Py_ssize_t pos,
                 Py_ssize_t n_heads,
                 float scale,
                 float[::1] out):             # out: (n_heads d,)
    """One token's grouped-query attention over the cache's rows ``0..pos``, after RoPE.

    Writes RoPE(k) and v of this token into row ``pos`` of the caches, then
    ``out[h] = softmax(scale * RoPE(q_h) . K^T) V`` with key/value head
    ``h // (n_heads // n_kv)`` (what ``F.scaled_dot_product_attention(...,
    enable_gqa=True)`` computes for one query row).
    """
    cdef Py_ssize_t n_kv = k_cache.shape[0], total = k_cache.shape[1], d = k_cache.shape[2]
    cdef float* scratch
    for axis in range(3):
        _check_same(f"attend_token: v_cache.shape[{axis}] must equal k_cache.shape[{axis}]",
                    v_cache.shape[axis], k_cache.shape[axis])
    if n_kv < 1 or n_heads < 1 or n_heads % n_kv or d < 2 or d % 2:
        raise ValueError(f"attend_token: n_heads={n_heads} must be a positive multiple of "
                         f"n_kv={n_kv}, and the head size {d} even")
    if not 0 <= pos < total:
        raise ValueError(f"attend_token: pos={pos} is outside the cache's {total} rows")
    _check_same("attend_token: len(qkv) must equal (n_heads + 2 n_kv) d", qkv.shape[0],
                (n_heads + 2 * n_kv) * d)
    _check_same("attend_token: len(cos) must equal the head size", cos.shape[0], d)
    _check_same("attend_token: len(sin_signed) must equal the head size", sin_signed.shape[0], d)
    _check_same("attend_token: len(out) must equal n_heads d", out.shape[0], n_heads * d)
    scratch = <float*>malloc((pos + 1 + d) * sizeof(float))
    if scratch == NULL:
        raise MemoryError(f"attend_token: no memory for {pos + 1} scores")
    with nogil:
        decode_attend(&qkv[0], &cos[0], &sin_signed[0], &k_cache[0, 0, 0], &v_cache[0, 0, 0],
                      total, pos, n_heads, n_kv, d, scale, scratch, scratch + pos + 1, &out[0])
    free(scratch)


def silu_mul(const float[:, ::1] gu,   # in: (rows, 2 inter): [gate | up]
             float[:, ::1] out):       # out: (rows, inter)
    """``out = F.silu(gu[:, :inter]) * gu[:, inter:]``."""
    _check_same("silu_mul: out.shape[0] must equal gu.shape[0]", out.shape[0], gu.shape[0])
    _check_same("silu_mul: gu.shape[1] must equal 2 out.shape[1]", gu.shape[1], 2 * out.shape[1])
    if out.shape[0] and out.shape[1]:
        with nogil:
            decode_silu_mul(&gu[0, 0], gu.shape[0], out.shape[1], &out[0, 0])


cdef class LeanProjection:
    """``y (+)= round(x) @ dequantize(W).T + s (round(x) A^T) B^T + b`` for a few rows, in one call.

    The fused 4-bit product (``gemv_4bit``, the same kernel and bytes) of one
    or more layers that share an input, their adapters (``A_cat^T`` and one
    block of ``B^T`` per layer) and bias, with the input first rounded to
    bfloat16 when ``round_input`` (the layer's compute dtype). Built once per
    joined projection by ``qlora_ref.nn.projection.Projection`` and once per
    layer by ``LoRALinear._decode_kernel``; :meth:`run` then takes only the
    input and the output. Its twins are their torch paths.
    """
    cdef const u8[::1] packed
    cdef const float[::1] absmax
    cdef const float[::1] code
    cdef Py_ssize_t blocksize, n_in, n_out, R, n_blocks, widest, max_rows
    cdef bint round_input, has_lora, has_bias
    cdef const float[:, ::1] a_t
    cdef const float[::1] b_t
    cdef const Py_ssize_t[::1] blocks
    cdef const float[::1] scales
    cdef const float[::1] bias

    def __init__(self, packed, absmax, code, Py_ssize_t blocksize, Py_ssize_t in_features,
                 Py_ssize_t out_features, bint round_input, a_t=None, b_t=None, blocks=None,
                 scales=None, bias=None, Py_ssize_t max_rows=GEMV4_MAX_ROWS):
        cdef Py_ssize_t k, expected = 0
        _check_blocksize("blocksize", blocksize, True)
        if in_features < 1 or out_features < 1 or in_features % blocksize:
            raise ValueError(f"LeanProjection: in_features={in_features} must be a positive "
                             f"multiple of blocksize={blocksize}, out_features={out_features} "
                             "positive")
        self.packed, self.absmax, self.code = packed, absmax, code
        _check_packed("packed", self.packed.shape[0], out_features * in_features,
                      "out_features * in_features")
        _check_blocks("absmax", self.absmax.shape[0], out_features * in_features,
                      "out_features * in_features", blocksize, "blocksize")
        _check_code("code", self.code, 16)
        self.blocksize, self.n_in, self.n_out = blocksize, in_features, out_features
        self.round_input = round_input
        self.has_lora = a_t is not None
        self.R = self.n_blocks = self.widest = 0
        if self.has_lora:
            self.a_t, self.b_t, self.blocks, self.scales = a_t, b_t, blocks, scales
            self.R = self.a_t.shape[1]
            _check_same("LeanProjection: a_t.shape[0] must equal in_features",
                        self.a_t.shape[0], in_features)
            if self.blocks.shape[0] % 4:
                raise ValueError("LeanProjection: blocks must hold (o0, o1, r0, r1) rows")
            self.n_blocks = self.blocks.shape[0] // 4
            _check_same("LeanProjection: len(scales) must equal the number of blocks",
                        self.scales.shape[0], self.n_blocks)
            for k in range(self.n_blocks):
                o0, o1, r0, r1 = (self.blocks[4 * k], self.blocks[4 * k + 1],
                                  self.blocks[4 * k + 2], self.blocks[4 * k + 3])
                if not (0 <= o0 < o1 <= out_features and 0 <= r0 < r1 <= self.R):
                    raise ValueError(f"LeanProjection: block {k} = {(o0, o1, r0, r1)} is "
                                     f"outside ({out_features} outputs, {self.R} ranks)")
                expected += (o1 - o0) * (r1 - r0)
                self.widest = max(self.widest, o1 - o0)
            _check_same("LeanProjection: len(b_t) must equal the blocks' sizes summed",
                        self.b_t.shape[0], expected)
        self.has_bias = bias is not None
        if self.has_bias:
            self.bias = bias
            _check_same("LeanProjection: len(bias) must equal out_features",
                        self.bias.shape[0], out_features)
        if max_rows < 1:
            raise ValueError(f"LeanProjection: max_rows must be at least 1, got {max_rows}")
        self.max_rows = max_rows

    def run(self, const float[:, ::1] x,   # in: (rows, in) float32, rows <= max_rows
            float[:, ::1] y,               # out: (rows, out) float32, not overlapping x
            bint accumulate=False, int threads=1):
        """``y = ...`` (or ``y += ...`` with ``accumulate``: the residual sum) for ``rows <= max_rows``.

        ``threads`` > 1 splits the output rows over OpenMP threads (the bytes do not
        depend on it). Reentrant: the scratch (the rounded and reordered input, the
        adapter product, the update before it is added) is allocated per call, so
        two threads may run one projection at once.
        """
        cdef Py_ssize_t m = x.shape[0], t
        cdef Py_ssize_t n_round, n_split, n_tmp, n_h, n_t
        cdef const float* xin
        cdef const float* xs = NULL
        cdef float* out
        cdef float* scratch
        cdef float* free_at
        _check_threads(threads)
        if not 1 <= m <= self.max_rows:
            raise ValueError(f"LeanProjection.run takes 1 to {self.max_rows} rows, got {m}")
        _check_same("LeanProjection.run: x.shape[1] must equal in_features", x.shape[1], self.n_in)
        _check_same("LeanProjection.run: y.shape[0] must equal x.shape[0]", y.shape[0], m)
        _check_same("LeanProjection.run: y.shape[1] must equal out_features", y.shape[1],
                    self.n_out)
        if (<char*>&y[0, 0] < <char*>(&x[0, 0] + m * self.n_in)
                and <char*>&x[0, 0] < <char*>(&y[0, 0] + m * self.n_out)):
            raise ValueError("LeanProjection.run: y overlaps x (the output would overwrite "
                             "the input while it is read)")
        n_round = m * self.n_in if self.round_input else 0
        n_split = m * self.n_in if gemv4_wants_split_x(self.blocksize, self.n_in) else 0
        n_tmp = m * self.n_out if accumulate else 0
        n_h = m * self.R if self.has_lora else 0
        n_t = self.widest if self.has_lora else 0
        scratch = <float*>malloc((n_round + n_split + n_tmp + n_h + n_t + 1) * sizeof(float))
        if scratch == NULL:
            raise MemoryError(f"LeanProjection.run: no memory for {m} rows of scratch")
        with nogil:
            free_at = scratch
            xin = &x[0, 0]
            if n_round:
                decode_round_bf16_n(xin, m * self.n_in, free_at)
                xin = free_at
                free_at += n_round
            if n_split:
                gemv4_split_x(xin, m, self.n_in, free_at)
                xs = free_at
                free_at += n_split
            out = &y[0, 0]
            if accumulate:
                out = free_at
                free_at += n_tmp
            if threads == 1:
                gemv4(&self.packed[0], &self.absmax[0], &self.code[0], self.blocksize, xin, xs,
                      m, self.n_in, 0, self.n_out, out, self.n_out)
            else:
                for t in prange(_ceil_div(self.n_out, GEMV_ROWS_PER_TASK),
                                num_threads=threads, schedule="static"):
                    gemv4(&self.packed[0], &self.absmax[0], &self.code[0], self.blocksize, xin,
                          xs, m, self.n_in, t * GEMV_ROWS_PER_TASK,
                          _block_end(t, GEMV_ROWS_PER_TASK, self.n_out), out, self.n_out)
            if self.has_lora:
                decode_lora(xin, m, self.n_in, &self.a_t[0, 0], self.R, &self.b_t[0],
                            &self.blocks[0], &self.scales[0], self.n_blocks, free_at,
                            free_at + n_h, out, self.n_out)
            if self.has_bias:
                _add_bias(out, &self.bias[0], m, self.n_out)
            if accumulate:
                _add_into(&y[0, 0], out, m * self.n_out)
        free(scratch)


cdef inline void _add_bias(float* y, const float* bias, Py_ssize_t m,
                           Py_ssize_t n) noexcept nogil:
    """y[r, :] += bias for each of m rows of n."""
    cdef Py_ssize_t r, i
    for r in range(m):
        for i in range(n):
            y[r * n + i] += bias[i]


cdef inline void _add_into(float* y, const float* update, Py_ssize_t n) noexcept nogil:
    """y += update, n values (the residual sum)."""
    cdef Py_ssize_t i
    for i in range(n):
        y[i] += update[i]
