"""Every Cython kernel gives the same bytes as its readable NumPy twin.

One test per kernel of :mod:`qlora_ref._kernels.quant4`, called directly
(not through :func:`qlora_ref.quantize_4bit`), on random lengths: odd
counts, trailing partial blocks, one-element inputs, with 1 and 2 threads.
The data mixes normal values with the cases the fast paths treat
specially: exact zeros and all-zero blocks, subnormals, huge magnitudes,
and values lying *exactly* on a decision midpoint (the tie rule: the lower
code wins, ``searchsorted(..., side="left")``).

The bfloat16 kernels are compared with torch: the NumPy float32 result,
rounded by ``torch.Tensor.to(torch.bfloat16)`` after float32 subnormals are
flushed to zeros of their sign (the kernels' rule, bitsandbytes' on this
CPU: ``tests/kernels/test_bfloat16_rule.py``).

The twins also agree on what they reject: a pad outside 0..15 and a code of
16 or more raise ``ValueError`` in ``packing.pack_nibbles`` and in the
kernels alike (more tampered inputs: ``tests/robustness/test_tampered_inputs.py``).
"""
import numpy as np
import pytest
from hypothesis import given, strategies as st

import qlora_ref
from qlora_ref import blockwise, packing
from qlora_ref.codebooks import code_for, dynamic_code
from qlora_ref.double_quant import NESTED_BLOCKSIZE, double_dequantize
from tests.helpers import bf16_bits, quantize_4bit_reference

pytestmark = pytest.mark.skipif(not qlora_ref.cython_available(),
                                reason="the Cython extension is not built in this environment")

BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]
THREADS = st.sampled_from([1, 2])


def _kernels():
    from qlora_ref.backend import kernels
    return kernels()


def _tables(code):
    """What the kernels take for a codebook: sorted midpoints, sort order, the code of 0."""
    midpoints, order = blockwise.decision_boundaries(code)
    pad = int(blockwise.nearest_code(np.zeros(1, np.float32), code)[0])
    return midpoints, order.astype(np.uint8), pad


def _data(seed, n, blocksize, code):
    """float32 data of length n with zeros, zero blocks, subnormals, huge values and ties."""
    rng = np.random.default_rng(seed)
    scale = np.float32(10.0) ** rng.integers(-30, 30)
    x = (rng.standard_normal(n) * scale).astype(np.float32)
    x[rng.random(n) < 0.05] = 0.0
    x[rng.random(n) < 0.02] = np.float32(1e-41) * rng.choice([-1, 1])    # subnormals
    if n > blocksize and rng.random() < 0.3:
        x[:blocksize] = 0.0                                                # a whole zero block
    # A block whose absmax is exactly 1 (so the scale is exactly 1) holding
    # values exactly on the midpoints: every tie, in both directions.
    midpoints = blockwise.decision_boundaries(code)[0]
    b = rng.integers(0, -(-n // blocksize))
    block = x[b * blocksize:(b + 1) * blocksize]
    ties = np.concatenate([[1.0], midpoints, rng.choice(code, 8)]).astype(np.float32)
    block[: len(ties)] = ties[: len(block)]
    block[len(ties):] = np.clip(block[len(ties):], -1, 1)
    return x


# -- quantization ----------------------------------------------------------------

@given(n=st.integers(1, 9000), seed=st.integers(0, 2**32 - 1),
       quant_type=st.sampled_from(["nf4", "fp4", "int4"]), blocksize=st.sampled_from(BLOCKSIZES),
       num_threads=THREADS)
def test_quantize_4bit_packed(n, seed, quant_type, blocksize, num_threads):
    code = code_for(quant_type)
    midpoints, order, pad = _tables(code)
    x = _data(seed, n, blocksize, code)
    packed_ref, absmax_ref = quantize_4bit_reference(x, code, blocksize, pad)

    n_blocks = -(-n // blocksize)
    packed = np.full((n + 1) // 2, 0xAA, np.uint8)
    absmax = np.full(n_blocks, np.nan, np.float32)
    _kernels().quantize_4bit_packed(x, midpoints, order, blocksize, pad, packed, absmax,
                                    num_threads)
    np.testing.assert_array_equal(absmax.view(np.uint32), absmax_ref.view(np.uint32))
    np.testing.assert_array_equal(packed, packed_ref)


@given(n=st.integers(1, 5000), seed=st.integers(0, 2**32 - 1),
       which=st.sampled_from(["nf4", "fp4", "int4", "dynamic"]),
       blocksize=st.sampled_from([32, 64, 256, 4096]), num_threads=THREADS)
def test_quantize_blockwise(n, seed, which, blocksize, num_threads):
    """The generic kernel: 4-bit codes, and the 8-bit dynamic code of double quantization."""
    code = dynamic_code() if which == "dynamic" else code_for(which)
    midpoints, order, _ = _tables(code)
    x = _data(seed, n, blocksize, code)
    codes_ref, absmax_ref = blockwise.quantize_blockwise(x, code, blocksize)

    codes = np.full(n, 0xAA, np.uint8)
    absmax = np.full(-(-n // blocksize), np.nan, np.float32)
    log2_levels = int(np.log2(len(code)))
    _kernels().quantize_blockwise(x, midpoints, order, log2_levels, blocksize, codes, absmax,
                                  num_threads)
    np.testing.assert_array_equal(absmax.view(np.uint32), absmax_ref.view(np.uint32))
    np.testing.assert_array_equal(codes, codes_ref)


# -- dequantization --------------------------------------------------------------

def _random_state(seed, n, blocksize, quant_type="nf4"):
    """Random packed codes and constants (every byte value, not only ones quantize makes)."""
    rng = np.random.default_rng(seed)
    n_blocks = -(-n // blocksize)
    packed = rng.integers(0, 256, (n + 1) // 2).astype(np.uint8)
    absmax = (rng.random(n_blocks) * np.float32(10.0) ** rng.integers(-30, 30)).astype(np.float32)
    absmax[rng.random(n_blocks) < 0.1] = 0.0
    absmax_codes = rng.integers(0, 256, n_blocks).astype(np.uint8)
    nested_absmax = rng.random(-(-n_blocks // NESTED_BLOCKSIZE)).astype(np.float32)
    offset = np.float32(rng.random())
    return code_for(quant_type), packed, absmax, absmax_codes, nested_absmax, offset


@given(n=st.integers(1, 9000), seed=st.integers(0, 2**32 - 1),
       quant_type=st.sampled_from(["nf4", "fp4", "int4"]), blocksize=st.sampled_from(BLOCKSIZES),
       num_threads=THREADS)
def test_dequantize_4bit_packed_f32_and_bf16(n, seed, quant_type, blocksize, num_threads):
    code, packed, absmax, *_ = _random_state(seed, n, blocksize, quant_type)
    ref = blockwise.dequantize_blockwise(packing.unpack_nibbles(packed, n), absmax, code,
                                         blocksize)
    out = np.full(n, np.nan, np.float32)
    _kernels().dequantize_4bit_packed(packed, absmax, code, blocksize, out, num_threads)
    np.testing.assert_array_equal(out.view(np.uint32), ref.view(np.uint32))

    bits = np.full(n, 0xFFFF, np.uint16)
    _kernels().dequantize_4bit_packed_bf16(packed, absmax, code, blocksize, bits, num_threads)
    np.testing.assert_array_equal(bits, bf16_bits(ref))


@given(n=st.integers(1, 40000), seed=st.integers(0, 2**32 - 1),
       blocksize=st.sampled_from([32, 64, 128]), num_threads=THREADS)
def test_dequantize_4bit_packed_nested_f32_and_bf16(n, seed, blocksize, num_threads):
    """Up to 40000 elements so that several nested blocks (256 constants each) occur."""
    code, packed, _, absmax_codes, nested_absmax, offset = _random_state(seed, n, blocksize)
    nested_code = dynamic_code()
    absmax = double_dequantize(absmax_codes, nested_absmax, offset, NESTED_BLOCKSIZE)
    ref = blockwise.dequantize_blockwise(packing.unpack_nibbles(packed, n), absmax, code,
                                         blocksize)
    args = (packed, absmax_codes, nested_absmax, nested_code, float(offset), NESTED_BLOCKSIZE,
            code, blocksize)
    out = np.full(n, np.nan, np.float32)
    _kernels().dequantize_4bit_packed_nested(*args, out, num_threads)
    np.testing.assert_array_equal(out.view(np.uint32), ref.view(np.uint32))

    bits = np.full(n, 0xFFFF, np.uint16)
    _kernels().dequantize_4bit_packed_nested_bf16(*args, bits, num_threads)
    np.testing.assert_array_equal(bits, bf16_bits(ref))


@given(n=st.integers(1, 5000), seed=st.integers(0, 2**32 - 1),
       blocksize=st.sampled_from([32, 256, 4096]), num_threads=THREADS)
def test_dequantize_blockwise(n, seed, blocksize, num_threads):
    rng = np.random.default_rng(seed)
    code = dynamic_code()
    codes = rng.integers(0, 256, n).astype(np.uint8)
    absmax = rng.standard_normal(-(-n // blocksize)).astype(np.float32)
    ref = blockwise.dequantize_blockwise(codes, absmax, code, blocksize)
    out = np.full(n, np.nan, np.float32)
    _kernels().dequantize_blockwise(codes, absmax, code, blocksize, out, num_threads)
    np.testing.assert_array_equal(out.view(np.uint32), ref.view(np.uint32))


def test_bfloat16_rounding_edges():
    """Ties to even, carries into the exponent, the largest finite values, subnormals (flushed
    to zeros of their sign), the smallest normals, zeros."""
    specials = np.array([0x3F808000, 0x3F818000, 0x3F80FFFF, 0x3F7FFFFF, 0x7F7FFFFF, 0xFF7FFFFF,
                         0x7F7F8000, 0x00008000, 0x00018000, 0x0000FFFF, 0x80000000, 0x00000000,
                         0x00400000, 0x80408000, 0x007FFFFF, 0x807FFFFF, 0x00800000,
                         0x80800000], dtype=np.uint32).view(np.float32)
    code = np.ones(16, np.float32)                    # every code is 1: the output is the scale
    absmax = specials.copy()                          # one block of 32 per special value
    packed = np.zeros(16 * len(specials), np.uint8)
    bits = np.empty(32 * len(specials), np.uint16)
    _kernels().dequantize_4bit_packed_bf16(packed, absmax, code, 32, bits, 1)
    np.testing.assert_array_equal(bits[::32], bf16_bits(specials))


# -- packing ---------------------------------------------------------------------

@given(n=st.integers(1, 100_000), seed=st.integers(0, 2**32 - 1), pad=st.integers(0, 15),
       num_threads=THREADS)
def test_pack_and_unpack_nibbles(n, seed, pad, num_threads):
    """Lengths past one parallel span (16384 bytes), odd and even."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 16, n).astype(np.uint8)
    packed = np.full((n + 1) // 2, 0xAA, np.uint8)
    _kernels().pack_nibbles(codes, pad, packed, num_threads)
    np.testing.assert_array_equal(packed, packing.pack_nibbles(codes, pad=pad))

    unpacked = np.full(n, 0xAA, np.uint8)
    _kernels().unpack_nibbles(packed, unpacked, num_threads)
    np.testing.assert_array_equal(unpacked, packing.unpack_nibbles(packed, n))


_PADS = st.one_of(st.integers(-300, 300), st.sampled_from(
    [2**40, -2**40, 7.0, True, None, "7", np.uint8(7), np.uint8(0x23), np.int64(16)]))


def _outcome(call):
    """The bytes a call returns, or ValueError (any other exception fails the test)."""
    try:
        return call().tobytes()
    except ValueError:
        return ValueError


@given(n=st.integers(1, 300).map(lambda k: 2 * k - 1), seed=st.integers(0, 2**32 - 1),
       quant_type=st.sampled_from(["nf4", "fp4", "int4"]), pad=_PADS, num_threads=THREADS)
def test_pad_is_checked_and_placed_alike_by_both_twins(n, seed, quant_type, pad, num_threads):
    """An odd count: the last low nibble is the pad, a 4-bit code 0..15, in every twin.

    Was: for pad 0x23, ``packing.pack_nibbles`` wrote 0xf3 (the pad's high bits spilled
    into the code's nibble) and ``quantize_4bit_packed`` 0x73 (masked). Now a pad outside
    0..15 (or not an integer) is a ValueError in the NumPy twin and in both kernels.
    """
    code = code_for(quant_type)
    midpoints, order, _ = _tables(code)
    x = _data(seed, n, 64, code)
    codes = blockwise.nearest_code(blockwise.normalize(x, blockwise.block_absmax(x, 64), 64),
                                   code)
    reference = _outcome(lambda: packing.pack_nibbles(codes, pad=pad))

    def fused():
        packed = np.full((n + 1) // 2, 0xAA, np.uint8)
        absmax = np.empty(-(-n // 64), np.float32)
        _kernels().quantize_4bit_packed(x, midpoints, order, 64, pad, packed, absmax,
                                        num_threads)
        return packed

    def pack_only():
        packed = np.full((n + 1) // 2, 0xAA, np.uint8)
        _kernels().pack_nibbles(codes, pad, packed, num_threads)
        return packed

    valid = isinstance(pad, (int, np.integer)) and not isinstance(pad, bool) and 0 <= pad <= 15
    assert (reference is ValueError) != valid, f"pack_nibbles with pad={pad!r}"
    assert _outcome(fused) == reference, f"quantize_4bit_packed with pad={pad!r}"
    assert _outcome(pack_only) == reference, f"kernels().pack_nibbles with pad={pad!r}"
    if valid:
        assert reference[-1] & 15 == pad, "the pad is the last low nibble"


@given(n=st.integers(1, 5000), seed=st.integers(0, 2**32 - 1), num_threads=THREADS)
def test_codes_of_16_or_more_are_rejected_by_both_pack_twins(n, seed, num_threads):
    """Was: ``pack_nibbles([16, 1])`` gave ``[1]``; a code must fit its nibble."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 16, n).astype(np.uint8)
    codes[rng.integers(0, n)] = rng.integers(16, 256)
    with pytest.raises(ValueError, match="codes must be 4-bit codes"):
        packing.pack_nibbles(codes)
    with pytest.raises(ValueError, match="codes must be 4-bit codes"):
        _kernels().pack_nibbles(codes, 0, np.empty((n + 1) // 2, np.uint8), num_threads)


# -- through the public API --------------------------------------------------------

@given(n=st.integers(1, 5000), seed=st.integers(0, 2**32 - 1), double_quant=st.booleans(),
       num_threads=THREADS)
def test_dequantize_4bit_to_bfloat16_uses_the_kernel_and_matches_torch(n, seed, double_quant,
                                                                       num_threads):
    import torch

    def bits(out):  # bfloat16 as a torch tensor, or its uint16 bit patterns as NumPy
        if isinstance(out, torch.Tensor):
            assert out.dtype == torch.bfloat16
            return out.view(torch.int16).numpy().view(np.uint16)
        assert out.dtype == np.uint16
        return out

    x = _data(seed, n, 64, code_for("nf4"))
    state = qlora_ref.quantize_4bit(x, double_quant=double_quant, backend="numpy")
    ref = qlora_ref.dequantize_4bit(state, dtype="bfloat16", backend="numpy")
    fast = qlora_ref.dequantize_4bit(state, dtype="bfloat16", backend="cython",
                                     num_threads=num_threads)
    assert fast.shape == ref.shape == (n,)
    np.testing.assert_array_equal(bits(fast), bits(ref))
    f32 = qlora_ref.dequantize_4bit(state, dtype="float32", backend="numpy")
    np.testing.assert_array_equal(bits(fast), bf16_bits(f32))


# -- the vector paths of the dequantize kernels (qlora_ref/_kernels/lookup16.h) ---------------
#
# The kernels pick, at run time, the widest path the CPU has. Each path copies entries
# of the same 16-value table (the same float32 products, rounded to bfloat16 by the same
# integer rule), so every path must write the same bytes. Each path this host can run is
# tested here; "portable" runs everywhere.

def test_the_portable_path_is_always_available_and_the_best_is_the_default():
    k = _kernels()
    levels = k.simd_levels()
    assert levels[0] == "portable" and set(levels) <= set(k.SIMD_LEVELS)
    assert qlora_ref.backend.simd_level() in levels
    with pytest.raises(ValueError, match="not available"):
        k.set_simd_level("sse9")


@given(n=st.integers(1, 9000), seed=st.integers(0, 2**32 - 1),
       quant_type=st.sampled_from(["nf4", "fp4", "int4"]), blocksize=st.sampled_from(BLOCKSIZES),
       double_quant=st.booleans(), num_threads=THREADS)
def test_every_vector_path_writes_the_bytes_of_the_numpy_reference(
        each_simd_level, n, seed, quant_type, blocksize, double_quant, num_threads):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(n) * np.float32(10.0) ** rng.integers(-20, 20)).astype(np.float32)
    x[rng.random(n) < 0.05] = 0.0
    state = qlora_ref.quantize_4bit(x, quant_type, blocksize, double_quant, backend="numpy")
    want32 = qlora_ref.dequantize_4bit(state, backend="numpy")                   # (n,) float32
    want16 = bf16_bits(want32)
    for level in each_simd_level:
        _kernels().set_simd_level(level)
        got32 = np.empty(n, np.float32)
        got16 = np.empty(n, np.uint16)
        qlora_ref.fourbit.run_dequantize_kernel(state, got32, num_threads)
        qlora_ref.fourbit.run_dequantize_kernel(state, got16, num_threads)
        assert got32.tobytes() == want32.tobytes(), f"{level}: float32 bytes differ"
        assert got16.tobytes() == want16.tobytes(), f"{level}: bfloat16 bits differ"


def test_the_environment_variable_chooses_the_path(tmp_path):
    import subprocess
    import sys

    code = "import qlora_ref.backend as b; b.kernels(); print(b.simd_level())"
    for level in _kernels().simd_levels():
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env={**__import__("os").environ, "QLORA_REF_SIMD": level}, timeout=60)
        assert out.returncode == 0 and out.stdout.strip() == level, out.stderr
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**__import__("os").environ, "QLORA_REF_SIMD": "sse9"}, timeout=60)
    assert out.returncode != 0 and "QLORA_REF_SIMD" in out.stderr and "sse9" in out.stderr


# -- the fused matrix-vector product for decoding (qlora_ref/_kernels/gemv4.h) ----------------
#
# gemv_4bit computes y = x W^T from the packed codes without forming W. Every weight it
# multiplies is the float32 product code[q] * absmax[b] that dequantize writes, so the only
# difference from x @ dequantize(W).T is the order of the float32 sums. The bound is the
# textbook one for a dot product of length n summed in any order (Higham, Accuracy and
# Stability of Numerical Algorithms, eq. 3.5, with the FMA's single rounding included):
#     |y - x.w| <= gamma_n * sum_i |x_i| |w_i|,   gamma_n = n u / (1 - n u),  u = 2^-24.

def _gamma(n):
    u = 2.0 ** -24
    return n * u / (1 - n * u)


@given(rows=st.integers(1, 20), out_features=st.integers(1, 70),
       in_blocks=st.integers(1, 6), partial=st.sampled_from([0, 2, 7]),
       blocksize=st.sampled_from([32, 64, 128]), quant_type=st.sampled_from(["nf4", "fp4"]),
       seed=st.integers(0, 2**32 - 1), num_threads=THREADS)
def test_gemv_equals_dequantize_then_matmul_within_the_summation_bound(
        each_simd_level, rows, out_features, in_blocks, partial, blocksize, quant_type, seed,
        num_threads):
    rng = np.random.default_rng(seed)
    in_features = in_blocks * blocksize + partial         # partial > 0: rows split blocks
    w = rng.standard_normal((out_features, in_features)).astype(np.float32)
    state = qlora_ref.quantize_4bit(w, quant_type, blocksize, double_quant=False, backend="numpy")
    w_hat = qlora_ref.dequantize_4bit(state, backend="numpy").astype(np.float64)  # (out, in)
    x = (rng.standard_normal((rows, in_features)) * 10.0 ** rng.integers(-3, 3)).astype(np.float32)
    exact = x.astype(np.float64) @ w_hat.T                                       # (rows, out)
    bound = _gamma(in_features) * (np.abs(x.astype(np.float64)) @ np.abs(w_hat).T)
    for level in each_simd_level:
        _kernels().set_simd_level(level)
        y = np.full((rows, out_features), np.nan, np.float32)
        _kernels().gemv_4bit(state.packed, state.absmax, state.code, blocksize, x, y,
                             num_threads)
        assert np.all(np.abs(y - exact) <= bound), (
            f"{level}: max error {np.abs(y - exact).max():.3g} over the bound")


def test_gemv_names_what_is_wrong_with_its_arguments():
    k = _kernels()
    state = qlora_ref.quantize_4bit(np.ones((4, 64), np.float32), "nf4", 64, double_quant=False)
    args = (state.packed, state.absmax, state.code, 64)
    with pytest.raises(ValueError, match="y: expected 1 rows"):
        k.gemv_4bit(*args, np.ones((1, 64), np.float32), np.empty((2, 4), np.float32))
    with pytest.raises(ValueError, match="packed has length"):   # W is (5, 64), not (4, 64)
        k.gemv_4bit(*args, np.ones((1, 64), np.float32), np.empty((1, 5), np.float32))
    with pytest.raises(ValueError, match="absmax has length"):
        k.gemv_4bit(state.packed, state.absmax[:-1], state.code, 64,
                    np.ones((1, 64), np.float32), np.empty((1, 4), np.float32))
