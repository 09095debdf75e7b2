"""The bfloat16 rule of the dequantize kernels, on every vector path, and bitsandbytes' bits.

The kernels round each float32 product ``code[c] * absmax`` to bfloat16 by one
rule (``lookup16_bf16_bits`` in ``qlora_ref/_kernels/lookup16.h``):

* NaN: a quiet NaN, sign and top bits kept (``qlora_ref.dtypes.bfloat16_bits``);
* a subnormal float32 (|v| < 2**-126): a zero of the same sign;
* otherwise: round to nearest, ties to even.

That is what VCVTNEPS2BF16 computes (Intel SDM: denormal inputs are treated as
zero, rounding is to nearest even), so the ``avx512bf16`` path uses the
instruction and every other path the integer rule; and it is what
bitsandbytes' CPU kernel writes on a CPU with AVX512-BF16. torch's
``.to(torch.bfloat16)`` differs only on subnormals (it rounds them).
"""
import numpy as np
import pytest

import qlora_ref
from qlora_ref.dtypes import bfloat16_bits

pytestmark = pytest.mark.skipif(not qlora_ref.cython_available(),
                                reason="the Cython extension is not built in this environment")

#: float32 bit patterns around every case of the rule
SPECIALS = np.array([
    0x3F808000, 0x3F818000,                   # ties: to even (down, then up)
    0x3F80FFFF, 0x3F7FFFFF,                   # carries into the next exponent
    0x7F7FFFFF, 0xFF7FFFFF, 0x7F7F8000,       # the largest finite values round to infinity
    0x00000001, 0x00008000, 0x0000FFFF,       # subnormals: flushed
    0x00400000, 0x007FFFFF, 0x807FFFFF,       # the largest subnormals: flushed, sign kept
    0x00800000, 0x80800000, 0x00808000,       # the smallest normals: kept
    0x00000000, 0x80000000,                   # zeros keep their sign
    0x7F800000, 0xFF800000,                   # infinities
    0x7FC00000, 0xFFC12345, 0x7F800001,       # NaNs: quiet, sign and top bits kept
], dtype=np.uint32).view(np.float32)


def the_rule(x32):
    """The rule in NumPy: subnormals to signed zeros, then round (``dtypes.bfloat16_bits``)."""
    return bfloat16_bits(x32, flush_subnormals=True)


def _kernels():
    from qlora_ref.backend import kernels
    return kernels()


def test_the_rule_flushes_subnormals_and_rounds_ties_to_even():
    """The NumPy statement itself, on values whose bfloat16 bits are known by hand."""
    values = np.array([0x00400000, 0x80000001, 0x00800000, 0x3F808000, 0x3F818000],
                      np.uint32).view(np.float32)
    assert the_rule(values).tolist() == [0x0000, 0x8000, 0x0080, 0x3F80, 0x3F82]


@pytest.mark.parametrize("blocksize", [32, 64, 2048])
@pytest.mark.parametrize("odd_tail", [False, True])
def test_every_path_writes_the_rule(each_simd_level, blocksize, odd_tail):
    """One block per special value, every code 1: each output is that value, through the
    block loop of each path, its scalar tail (``odd_tail``) and the float32 kernel too."""
    k = _kernels()
    code = np.ones(16, np.float32)
    n = blocksize * len(SPECIALS) - (1 if odd_tail else 0)
    packed = np.full((n + 1) // 2, 0x5A, np.uint8)            # codes 5 and 10: both are 1
    want = np.repeat(the_rule(SPECIALS), blocksize)[:n]
    with np.errstate(invalid="ignore"):                       # x 1 quiets the signalling NaN
        want32 = np.repeat(SPECIALS * np.float32(1), blocksize)[:n].view(np.uint32)
    for level in each_simd_level:
        k.set_simd_level(level)
        for threads in (1, 2):
            bits = np.full(n, 0x1234, np.uint16)
            k.dequantize_4bit_packed(packed, SPECIALS, code, blocksize, bits, threads)
            bad = np.flatnonzero(bits != want)
            assert bad.size == 0, (f"{level}: element {bad[0]} (block {bad[0] // blocksize}, "
                                   f"float32 {SPECIALS[bad[0] // blocksize].view(np.uint32):#x})"
                                   f" gave {bits[bad[0]]:#06x}, the rule {want[bad[0]]:#06x}")
            f32 = np.full(n, np.nan, np.float32)
            k.dequantize_4bit_packed(packed, SPECIALS, code, blocksize, f32, threads)
            assert f32.view(np.uint32).tolist() == want32.tolist(), f"{level}: float32 differs"


def test_the_merged_kernels_choose_by_the_output_dtype_and_name_a_wrong_one():
    k = _kernels()
    state = qlora_ref.quantize_4bit(np.linspace(-1, 1, 128, dtype=np.float32), "nf4", 64,
                                    double_quant=False)
    args = (state.packed, state.absmax, state.code, 64)
    f32, bits = np.empty(128, np.float32), np.empty(128, np.uint16)
    k.dequantize_4bit_packed(*args, f32)
    k.dequantize_4bit_packed_bf16(*args, bits)        # the former name: the same function
    assert bits.tolist() == the_rule(f32).tolist()
    with pytest.raises(ValueError, match="double"):
        k.dequantize_4bit_packed(*args, np.empty(128, np.float64))


def _bnb_uses_avx512_bf16():
    try:
        import bitsandbytes.functional as F
        return bool(F.has_avx512bf16())
    except Exception:  # noqa: BLE001 - any failure to ask means "not known to"
        return False


def _subnormal_products_state():
    """Blocks whose constant makes products subnormal, normal and tied (blocksize 64)."""
    rng = np.random.default_rng(0)
    absmax = np.concatenate([SPECIALS[np.isfinite(SPECIALS)],
                             np.float32(2.0) ** rng.integers(-149, -110, 40)]).astype(np.float32)
    absmax = np.abs(absmax)                      # a block's absmax is not negative
    x = np.zeros((len(absmax), 64), np.float32)  # (blocks, 64)
    x[:, :] = rng.uniform(-1, 1, x.shape).astype(np.float32) * absmax[:, None]
    x[:, 0] = absmax                             # each block's absmax is exactly that value
    state = qlora_ref.quantize_4bit(x, "nf4", 64, double_quant=False)
    f32 = qlora_ref.dequantize_4bit(state, dtype="float32", backend="numpy").reshape(-1)
    subnormal = (f32.view(np.uint32) & 0x7F800000) == 0
    assert (subnormal & (f32 != 0)).sum() > 100, "the data has too few subnormal products"
    return state, f32


def test_the_numpy_twin_writes_the_rule_the_kernels_write():
    """The reference (``backend="numpy"``) and the kernels agree on subnormal products too."""
    state, f32 = _subnormal_products_state()
    twin = qlora_ref.dequantize_4bit(state, dtype="bfloat16", backend="numpy").reshape(-1)
    kernel = qlora_ref.dequantize_4bit(state, dtype="bfloat16", backend="cython").reshape(-1)
    np.testing.assert_array_equal(twin, the_rule(f32))
    np.testing.assert_array_equal(kernel, twin)


@pytest.mark.skipif(not _bnb_uses_avx512_bf16(),
                    reason="bitsandbytes' CPU kernel rounds with AVX512-BF16 only on CPUs "
                           "that have it; elsewhere it keeps subnormals (torch's rule)")
def test_bitsandbytes_writes_the_same_bits_for_subnormal_products():
    """The same blocks through bitsandbytes' public ``dequantize_4bit`` (blocksize 64: its C kernel)."""
    import logging

    import torch
    logging.disable(logging.WARNING)  # its note about an optional CPU gemm package
    try:
        import bitsandbytes.functional as F
    finally:
        logging.disable(logging.NOTSET)
    state, f32 = _subnormal_products_state()
    packed, qs = qlora_ref.to_bitsandbytes(state)
    qs.dtype = torch.bfloat16
    theirs = F.dequantize_4bit(packed, qs).view(torch.int16).numpy().view(np.uint16).reshape(-1)
    ours = qlora_ref.dequantize_4bit(state, dtype="bfloat16", backend="cython").reshape(-1)
    np.testing.assert_array_equal(theirs, the_rule(f32))
    np.testing.assert_array_equal(ours, theirs)
