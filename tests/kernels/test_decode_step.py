"""One decoding step's kernels (``decode_step.h``, ``decode_step.pxi``) against float64 and torch.

Each kernel computes a float32 formula whose only freedom is the order of its
sums. The bounds: a sum of ``n`` products is off by at most
:math:`\\gamma_n = n u / (1 - n u)` times the sum of their magnitudes,
:math:`u = 2^{-24}` (Higham, "Accuracy and Stability of Numerical
Algorithms", section 3.1); an elementwise formula of ``k`` roundings by
about ``k u`` of its magnitude. The torch lines the decoder runs otherwise
(its readable twin) are checked against the same bounds, so a bound that
torch misses would be a wrong bound, not a slack one.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import qlora_ref

pytestmark = pytest.mark.skipif(not qlora_ref.cython_available(),
                                reason="the step kernels are in the Cython extension")

U = 2.0 ** -24


def _gamma(n):
    return n * U / (1 - n * U)


@pytest.fixture(scope="module")
def k():
    from qlora_ref.backend import kernels

    return kernels()


# -- rounding to bfloat16 -------------------------------------------------------------

SPECIAL = np.array([0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, np.nan, 1e-40, -1e-40, 1e-45,
                    3.4e38, -3.4e38, 1.00390625, 1.01171875, 2.0 ** -126, 2.0 ** -133],
                   dtype=np.float32)  # 1 + 2^-8 and 1 + 3 * 2^-8: ties to even, down and up


def _torch_round(x):
    return torch.from_numpy(x).to(torch.bfloat16).to(torch.float32).numpy()


def test_round_bf16_is_torchs_conversion_on_special_values(k):
    out = np.empty_like(SPECIAL)
    k.round_bf16(SPECIAL, out)
    expected = _torch_round(SPECIAL)
    nan = np.isnan(SPECIAL)
    assert np.array_equal(out[~nan].view(np.uint32), expected[~nan].view(np.uint32))
    assert np.isnan(out[nan]).all()   # NaN stays NaN (torch sets every payload bit; we quiet it)
    assert out[7] != 0 and out[8] != 0    # subnormals kept (the layer's .to(bfloat16) keeps them)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(width=32, allow_nan=False), min_size=1, max_size=64))
def test_round_bf16_is_torchs_conversion(k, values):
    x = np.array(values, dtype=np.float32)
    out = np.empty_like(x)
    k.round_bf16(x, out)
    assert np.array_equal(out.view(np.uint32), _torch_round(x).view(np.uint32))


# -- RMSNorm --------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 4), hidden=st.integers(1, 300), seed=st.integers(0, 2 ** 16),
       scale=st.sampled_from([1e-3, 1.0, 1e3]))
def test_rms_norm_is_within_the_float32_bound_of_float64(k, rows, hidden, seed, scale):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, hidden)) * scale).astype(np.float32)
    w = rng.standard_normal(hidden).astype(np.float32)
    eps = 1e-5
    out = np.empty_like(x)
    k.rms_norm(x, w, eps, out)
    x64 = x.astype(np.float64)
    exact = x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + np.float32(eps)) * w
    bound = (_gamma(hidden) + 8 * U) * np.abs(exact) + 1e-45
    assert np.all(np.abs(out - exact) <= bound)
    twin = F.rms_norm(torch.from_numpy(x), (hidden,), torch.from_numpy(w), eps).numpy()
    assert np.all(np.abs(twin - exact) <= bound)   # the bound holds for torch too
    in_place = x.copy()
    k.rms_norm(in_place, w, eps, in_place)          # out may be x itself (the decoder's xn)
    assert np.array_equal(in_place, out)


# -- SiLU(gate) * up ------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 3), inter=st.integers(1, 200), seed=st.integers(0, 2 ** 16),
       scale=st.sampled_from([0.1, 3.0, 40.0]))
def test_silu_mul_is_within_a_few_roundings_of_float64(k, rows, inter, seed, scale):
    rng = np.random.default_rng(seed)
    gu = (rng.standard_normal((rows, 2 * inter)) * scale).astype(np.float32)
    out = np.empty((rows, inter), np.float32)
    k.silu_mul(gu, out)
    g, u = gu[:, :inter].astype(np.float64), gu[:, inter:].astype(np.float64)
    exact = g / (1 + np.exp(-g)) * u
    # below g = -88.7, exp(-g) overflows float32 and silu(g) comes out 0; |silu(g)| < 3e-37 there
    bound = 8 * U * np.abs(exact) + 3e-37 * np.abs(u)
    assert np.all(np.abs(out - exact) <= bound)
    t = torch.from_numpy(gu)
    twin = (F.silu(t[:, :inter]) * t[:, inter:]).numpy()
    assert np.all(np.abs(twin - exact) <= bound)


# -- one token's attention ------------------------------------------------------------

def _rope64(v, cos, sin_signed):
    half = v.shape[-1] // 2
    return v * cos + np.roll(v, half, axis=-1) * sin_signed


def _attend_case(seed, n_heads, n_kv, d, pos, total):
    rng = np.random.default_rng(seed)
    qkv = rng.standard_normal((n_heads + 2 * n_kv) * d).astype(np.float32)
    angle = rng.uniform(0, 6.3, d // 2)
    cos = np.cos(np.concatenate([angle, angle])).astype(np.float32)
    sin = np.sin(np.concatenate([angle, angle]))
    sin_signed = np.concatenate([-sin[:d // 2], sin[d // 2:]]).astype(np.float32)
    k_cache = rng.standard_normal((n_kv, total, d)).astype(np.float32)
    v_cache = rng.standard_normal((n_kv, total, d)).astype(np.float32)
    return qkv, cos, sin_signed, k_cache, v_cache


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2 ** 16), shape=st.sampled_from([(4, 2, 8), (9, 3, 64), (2, 2, 16),
                                                            (6, 1, 32)]),
       pos=st.integers(0, 40), extra=st.integers(0, 5))
def test_attend_token_is_within_the_float32_bound_and_writes_only_its_cache_row(
        k, seed, shape, pos, extra):
    n_heads, n_kv, d = shape
    total = pos + 1 + extra
    qkv, cos, sin_s, k_cache, v_cache = _attend_case(seed, n_heads, n_kv, d, pos, total)
    scale = d ** -0.5
    kc, vc = k_cache.copy(), v_cache.copy()
    out = np.empty(n_heads * d, np.float32)
    k.attend_token(qkv, cos, sin_s, kc, vc, pos, n_heads, scale, out)

    # float64: RoPE, the cache row, softmax(scale q.k) v with key/value head h // group
    heads = qkv.astype(np.float64).reshape(n_heads + 2 * n_kv, d)
    q = _rope64(heads[:n_heads], cos, sin_s)
    k_new = _rope64(heads[n_heads:n_heads + n_kv], cos, sin_s)
    keys, values = k_cache.astype(np.float64), v_cache.astype(np.float64)
    keys[:, pos], values[:, pos] = k_new, heads[n_heads + n_kv:]
    rope_mag = np.abs(heads[n_heads:n_heads + n_kv] * cos) \
        + np.abs(np.roll(heads[n_heads:n_heads + n_kv], d // 2, -1) * sin_s)
    assert np.all(np.abs(kc[:, pos] - k_new) <= 3 * U * rope_mag)
    assert np.array_equal(vc[:, pos], qkv[(n_heads + n_kv) * d:].reshape(n_kv, d))  # copied
    others = np.ones(total, bool)
    others[pos] = False
    assert np.array_equal(kc[:, others], k_cache[:, others])      # no other row is touched
    assert np.array_equal(vc[:, others], v_cache[:, others])

    group = n_heads // n_kv
    expected, bound = np.empty((n_heads, d)), np.empty(n_heads)
    for h in range(n_heads):
        kk, vv = keys[h // group, :pos + 1], values[h // group, :pos + 1]
        s = scale * kk @ q[h]
        p = np.exp(s - s.max())
        expected[h] = p @ vv / p.sum()
        # a score off by e moves p by a factor e^(2e) at most; q itself carries RoPE's 3u
        score_err = scale * (_gamma(d) + 6 * U) * (np.abs(kk) @ np.abs(q[h])).max() + 4 * U
        bound[h] = (4 * score_err + _gamma(pos + 2) + 4 * U) * np.abs(vv).max()
    err = np.abs(out.reshape(n_heads, d) - expected).max(-1)
    assert np.all(err <= bound), f"off by {err - bound}"

    # the torch lines of LlamaDecoder._forward meet the same bound
    t = torch.from_numpy
    qk = t(qkv[:(n_heads + n_kv) * d]).reshape(1, 1, n_heads + n_kv, d)
    qk = torch.addcmul(qk * t(cos), qk.roll(d // 2, -1), t(sin_s))
    kt, vt = t(k_cache.copy())[None], t(v_cache.copy())[None]
    kt[0, :, pos] = qk[0, 0, n_heads:]
    vt[0, :, pos] = t(qkv[(n_heads + n_kv) * d:]).reshape(n_kv, d)
    twin = F.scaled_dot_product_attention(qk[:, :, :n_heads].transpose(1, 2),
                                          kt[:, :, :pos + 1], vt[:, :, :pos + 1], scale=scale,
                                          enable_gqa=n_kv != n_heads)
    twin_err = np.abs(twin[0, :, 0].numpy() - expected).max(-1)
    assert np.all(twin_err <= bound)


# -- a 4-bit projection with its adapters, in one call --------------------------------

def _projection(seed, outs, n_in, rank, blocksize=64, bias=True):
    """Codes, constants and adapters of layers of width ``outs`` sharing an input of n_in."""
    rng = np.random.default_rng(seed)
    n_out = sum(outs)
    packed = rng.integers(0, 256, n_out * n_in // 2, dtype=np.uint8)
    absmax = rng.uniform(0.01, 2, n_out * n_in // blocksize).astype(np.float32)
    code = np.asarray(qlora_ref.normal_float_code(), np.float32)
    a_t = rng.standard_normal((n_in, rank * len(outs))).astype(np.float32)
    blocks, b_parts, row = [], [], 0
    for i, size in enumerate(outs):
        blocks += [row, row + size, i * rank, (i + 1) * rank]
        b_parts.append(rng.standard_normal((rank, size)).astype(np.float32))
        row += size
    return dict(packed=packed, absmax=absmax, code=code, blocksize=blocksize, in_features=n_in,
                out_features=n_out,
                a_t=a_t, b_t=np.concatenate([b.reshape(-1) for b in b_parts]),
                blocks=np.array(blocks, np.intp),
                scales=rng.uniform(0.5, 4, len(outs)).astype(np.float32),
                bias=rng.standard_normal(n_out).astype(np.float32) if bias else None), b_parts


@pytest.mark.parametrize("round_input", [False, True])
def test_lean_projection_base_is_the_bytes_of_gemv_4bit_and_adapters_within_the_bound(
        k, round_input):
    args, b_parts = _projection(0, (96, 32, 32), 128, rank=4)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 128)).astype(np.float32)
    xr = _torch_round(x) if round_input else x
    base = np.empty((3, 160), np.float32)
    k.gemv_4bit(args["packed"], args["absmax"], args["code"], 64, xr, base)

    plain = k.LeanProjection(**{**args, "a_t": None, "b_t": None, "blocks": None,
                                "scales": None, "bias": None}, round_input=round_input)
    y = np.empty((3, 160), np.float32)
    plain.run(x, y)
    assert np.array_equal(y, base)               # same kernel, same rounded input: same bytes

    full = k.LeanProjection(**args, round_input=round_input)
    full.run(x, y)
    h = xr.astype(np.float64) @ args["a_t"]
    update = np.concatenate([s * h[:, i * 4:(i + 1) * 4] @ b
                             for i, (b, s) in enumerate(zip(b_parts, args["scales"]))], -1)
    h_mag = np.abs(xr) @ np.abs(args["a_t"])
    mag = np.abs(base) + np.concatenate(
        [s * h_mag[:, i * 4:(i + 1) * 4] @ np.abs(b)
         for i, (b, s) in enumerate(zip(b_parts, args["scales"]))], -1) + np.abs(args["bias"])
    expected = base + update + args["bias"]
    assert np.all(np.abs(y - expected) <= 2 * _gamma(128 + 8) * mag)

    again = np.full((3, 160), 0.5, np.float32)
    full.run(x, again, True)                     # accumulate: the residual sum, one add
    assert np.array_equal(again, np.float32(0.5) + y)
    two = np.empty_like(y)
    full.run(x, two, False, 2)
    assert np.array_equal(two, y)                # threads split output rows, not sums


@settings(max_examples=40, deadline=None)
@given(outs=st.lists(st.integers(1, 40), min_size=1, max_size=3),
       blocks_in=st.integers(1, 3), blocksize=st.sampled_from([32, 64, 128]),
       rank=st.integers(1, 6), rows=st.integers(1, 12), round_input=st.booleans(),
       bias=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_lean_projection_on_any_shape_is_gemv_4bit_plus_the_adapters(
        k, outs, blocks_in, blocksize, rank, rows, round_input, bias, seed):
    """Any widths, ranks, block sizes and row counts (more than one pass of 8 rows too)."""
    n_in, n_out = blocks_in * blocksize, sum(outs)
    args, b_parts = _projection(seed, tuple(outs), n_in, rank, blocksize, bias)
    x = np.random.default_rng(seed + 1).standard_normal((rows, n_in)).astype(np.float32)
    xr = _torch_round(x) if round_input else x
    base = np.empty((rows, n_out), np.float32)
    k.gemv_4bit(args["packed"], args["absmax"], args["code"], blocksize, xr, base)
    lean = k.LeanProjection(**args, round_input=round_input, max_rows=12)
    y = np.empty((rows, n_out), np.float32)
    lean.run(x, y)
    h = xr.astype(np.float64) @ args["a_t"]                               # (rows, sum r)
    h_mag = np.abs(xr) @ np.abs(args["a_t"])
    parts = [(s * h[:, i * rank:(i + 1) * rank] @ b, s * h_mag[:, i * rank:(i + 1) * rank]
              @ np.abs(b)) for i, (b, s) in enumerate(zip(b_parts, args["scales"]))]
    bias_v = args["bias"] if bias else np.zeros(n_out, np.float32)
    expected = base + np.concatenate([p[0] for p in parts], -1) + bias_v
    mag = np.abs(base) + np.concatenate([p[1] for p in parts], -1) + np.abs(bias_v)
    assert np.all(np.abs(y - expected) <= 2 * _gamma(n_in + 2 * rank + 4) * mag)
    no_adapters = k.LeanProjection(**{**args, "a_t": None, "b_t": None, "blocks": None,
                                      "scales": None, "bias": None},
                                   round_input=round_input, max_rows=12)
    no_adapters.run(x, y)
    assert np.array_equal(y, base)                   # the base alone: gemv_4bit's bytes


def test_lean_projection_names_what_is_wrong(k):
    args, _ = _projection(0, (64,), 128, rank=2)
    lean = k.LeanProjection(**args, round_input=False)
    x, y = np.zeros((1, 128), np.float32), np.zeros((1, 64), np.float32)
    with pytest.raises(ValueError, match="1 to 8 rows"):
        lean.run(np.zeros((9, 128), np.float32), np.zeros((9, 64), np.float32))
    with pytest.raises(ValueError, match="in_features"):
        lean.run(np.zeros((1, 64), np.float32), y)
    with pytest.raises(ValueError, match="out_features"):
        lean.run(x, np.zeros((1, 65), np.float32))
    with pytest.raises(ValueError, match="num_threads"):
        lean.run(x, y, False, 0)
    both = np.zeros((1, 192), np.float32)
    with pytest.raises(ValueError, match="overlaps"):     # y written while x is read
        lean.run(both[:, :128], both[:, 96:160])
    lean.run(both[:, :128], both[:, 128:])               # side by side: fine
    with pytest.raises(ValueError, match="packed"):
        k.LeanProjection(**{**args, "packed": args["packed"][:-1]}, round_input=False)
    with pytest.raises(ValueError, match="block 0"):
        k.LeanProjection(**{**args, "blocks": np.array([0, 65, 0, 2], np.intp)},
                         round_input=False)
    with pytest.raises(ValueError, match="b_t"):
        k.LeanProjection(**{**args, "b_t": args["b_t"][:-1]}, round_input=False)
    with pytest.raises(ValueError, match="multiple of blocksize"):
        k.LeanProjection(**{**args, "in_features": 96, "packed": args["packed"][:64 * 48]},
                         round_input=False)


def test_step_kernels_name_what_is_wrong(k):
    qkv, cos, sin_s, kc, vc = _attend_case(0, 4, 2, 8, 3, 6)
    out = np.empty(32, np.float32)
    with pytest.raises(ValueError, match="outside the cache"):
        k.attend_token(qkv, cos, sin_s, kc, vc, 6, 4, 0.3, out)
    with pytest.raises(ValueError, match="multiple of n_kv"):
        k.attend_token(qkv, cos, sin_s, kc, vc, 2, 3, 0.3, np.empty(24, np.float32))
    with pytest.raises(ValueError, match="len\\(qkv\\)"):
        k.attend_token(qkv[:-1], cos, sin_s, kc, vc, 2, 4, 0.3, out)
    with pytest.raises(ValueError, match="v_cache"):
        k.attend_token(qkv, cos, sin_s, kc, vc[:, :5].copy(), 2, 4, 0.3, out)
    with pytest.raises(ValueError, match="weight"):
        k.rms_norm(np.zeros((1, 8), np.float32), np.zeros(7, np.float32), 1e-5,
                   np.zeros((1, 8), np.float32))
    with pytest.raises(ValueError, match="silu_mul"):
        k.silu_mul(np.zeros((1, 8), np.float32), np.zeros((1, 5), np.float32))
    with pytest.raises(ValueError, match="round_bf16"):
        k.round_bf16(np.zeros(3, np.float32), np.zeros(2, np.float32))
