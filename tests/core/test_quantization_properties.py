"""Properties of 4-bit blockwise quantization, checked on random data (hypothesis).

Each test states a property of the math in the paper, not an output of the
code: an error bound, idempotence, scale equivariance, exact absmax, exact
bit counts, and the NF4-beats-Int4/FP4 claim on normal data.
"""
import numpy as np
import pytest
from hypothesis import given, strategies as st
from hypothesis.extra import numpy as hnp

import qlora_ref
from qlora_ref import blockwise
from qlora_ref.fourbit import dequantize_absmax
from qlora_ref.validation import VALID_BLOCKSIZES

QUANT_TYPES = ["nf4", "fp4", "int4"]
EPS32 = 2.0 ** -23


TINY_SPACING = 2.0 ** -149  # float32's subnormal spacing: products near 1e-38 round to it


def arrays(max_side=300):
    """Finite float32 arrays of 1 to ~600 elements with varied magnitudes and exact zeros.

    Subnormal inputs are left out: a block whose absmax is below 1e-38 is
    scaled by the clamped 1e38 instead of 1/absmax, as bitsandbytes does, so its
    error bound is the block's absmax itself, not half a code step (see
    ``test_blocks_below_1e38_stay_finite_and_within_their_absmax``).
    """
    shape = hnp.array_shapes(min_dims=1, max_dims=2, min_side=1, max_side=max_side)
    elements = st.one_of(st.floats(-1e4, 1e4, width=32, allow_subnormal=False), st.just(0.0),
                         st.floats(-2.0 ** -10, 2.0 ** -10, width=32, allow_subnormal=False))
    return hnp.arrays(np.float32, shape, elements=elements)


def max_half_gap(code):
    s = np.sort(code.astype(np.float64))
    return np.max(np.diff(s)) / 2


def per_element_absmax(absmax, n, blocksize):
    return np.repeat(absmax.astype(np.float64), blocksize)[:n]


@given(x=arrays(), quant_type=st.sampled_from(QUANT_TYPES),
       blocksize=st.sampled_from(VALID_BLOCKSIZES), double_quant=st.booleans())
def test_error_is_bounded_by_half_the_largest_code_gap(x, quant_type, blocksize, double_quant):
    """|x - x_hat| <= c_b * max_gap / 2  (+ |c_b - c_hat_b| with double quantization) + rounding."""
    state = qlora_ref.quantize_4bit(x, quant_type, blocksize, double_quant)
    x_hat = qlora_ref.dequantize_4bit(state).astype(np.float64).reshape(-1)
    flat = x.astype(np.float64).reshape(-1)
    true_absmax = blockwise.block_absmax(x.reshape(-1), blocksize)
    c = per_element_absmax(true_absmax, flat.size, blocksize)
    c_hat = per_element_absmax(dequantize_absmax(state), flat.size, blocksize)
    bound = (c * max_half_gap(state.code) + np.abs(c - c_hat)
             + 4 * EPS32 * np.maximum(c, c_hat) + TINY_SPACING)
    error = np.abs(flat - x_hat)
    worst = np.argmax(error - bound)
    assert np.all(error <= bound), (f"element {worst}: error {error[worst]:.6g} > bound "
                                    f"{bound[worst]:.6g} (c_b={c[worst]:.6g})")


@given(x=arrays(), blocksize=st.sampled_from(VALID_BLOCKSIZES))
def test_double_quantized_constants_are_within_half_a_dynamic_code_gap(x, blocksize):
    """|c_b - c_hat_b| <= c1 * max_gap(dynamic) / 2 (+ rounding): the second level's own bound."""
    state = qlora_ref.quantize_4bit(x, "nf4", blocksize, double_quant=True)
    # the constants double quantization compresses: the absmax a single-level state stores
    # (a trailing partial block's is clamped at 1e-38, as bitsandbytes stores it)
    c = qlora_ref.quantize_4bit(x, "nf4", blocksize, double_quant=False).absmax.astype(np.float64)
    c_hat = dequantize_absmax(state).astype(np.float64)
    c1 = per_element_absmax(state.nested_absmax, c.size, state.nested_blocksize)
    bound = c1 * max_half_gap(state.nested_code) + 4 * EPS32 * (np.abs(c) + c1) + TINY_SPACING
    assert np.all(np.abs(c - c_hat) <= bound)


@given(x=arrays(), quant_type=st.sampled_from(QUANT_TYPES),
       blocksize=st.sampled_from(VALID_BLOCKSIZES))
def test_requantizing_the_dequantized_tensor_changes_nothing(x, quant_type, blocksize):
    """dequant(quant(dequant(q))) == dequant(q); for NF4 the packed bytes themselves agree.

    (FP4 has two zeros, +0 and -0: a value that rounded to -0 re-quantizes to
    the code of +0, so for FP4 only the values are compared.)
    """
    q = qlora_ref.quantize_4bit(x, quant_type, blocksize, double_quant=False)
    x_hat = qlora_ref.dequantize_4bit(q)
    q2 = qlora_ref.quantize_4bit(x_hat, quant_type, blocksize, double_quant=False)
    np.testing.assert_array_equal(qlora_ref.dequantize_4bit(q2), x_hat)
    np.testing.assert_array_equal(q2.absmax, q.absmax)
    if quant_type == "nf4":
        np.testing.assert_array_equal(q2.packed, q.packed)


@given(x=arrays(), k=st.integers(-20, 20), quant_type=st.sampled_from(QUANT_TYPES),
       blocksize=st.sampled_from(VALID_BLOCKSIZES), double_quant=st.booleans())
def test_scaling_by_a_power_of_two_scales_the_result_exactly(x, k, quant_type, blocksize,
                                                             double_quant):
    x = x.copy()
    x[np.abs(x) < 1e-20] = 0  # keep clear of float32 subnormals, where 2**k is not exact
    q = qlora_ref.quantize_4bit(x, quant_type, blocksize, double_quant)
    qk = qlora_ref.quantize_4bit(x * np.float32(2.0 ** k), quant_type, blocksize, double_quant)
    np.testing.assert_array_equal(qk.packed, q.packed)
    np.testing.assert_array_equal(qlora_ref.dequantize_4bit(qk),
                                  qlora_ref.dequantize_4bit(q) * np.float32(2.0 ** k))


@given(x=arrays(), quant_type=st.sampled_from(QUANT_TYPES),
       blocksize=st.sampled_from(VALID_BLOCKSIZES))
def test_each_blocks_absmax_element_is_reproduced_exactly(x, quant_type, blocksize):
    q = qlora_ref.quantize_4bit(x, quant_type, blocksize, double_quant=False)
    flat, x_hat = x.reshape(-1), qlora_ref.dequantize_4bit(q).reshape(-1)
    for b in range(q.n_blocks):
        block = flat[b * blocksize:(b + 1) * blocksize]
        i = b * blocksize + int(np.argmax(np.abs(block)))
        assert x_hat[i] == flat[i], f"block {b}: {x_hat[i]!r} != {flat[i]!r}"


@given(n_extra=st.integers(0, 3), blocksize=st.sampled_from(VALID_BLOCKSIZES))
def test_bits_per_param_is_exact(n_extra, blocksize):
    n = blocksize * 256 * (1 + n_extra)  # whole first- and second-level blocks
    x = np.ones(n, dtype=np.float32)
    plain = qlora_ref.quantize_4bit(x, "nf4", blocksize, double_quant=False)
    nested = qlora_ref.quantize_4bit(x, "nf4", blocksize, double_quant=True)
    assert plain.bits_per_param == 4 + 32 / blocksize
    assert nested.bits_per_param == 4 + 8 / blocksize + 32 / (blocksize * 256) + 32 / n
    if blocksize == 64:
        assert plain.bits_per_param == 4.5


def test_double_quantization_costs_0127_bits_at_blocksize_64():
    """Paper: 8/64 + 32/(64*256) = 0.127 bits of constants instead of 32/64 = 0.5."""
    x = np.ones(64 * 256 * 64, dtype=np.float32)
    nested = qlora_ref.quantize_4bit(x, "nf4", 64, double_quant=True)
    assert round(nested.bits_per_param - 4, 3) == 0.127
    assert round(4.5 - nested.bits_per_param, 3) == 0.373


def test_zero_blocks_round_trip_to_zeros_not_nan():
    x = np.zeros((3, 100), dtype=np.float32)
    x[1, 5] = 3.0  # one non-zero block among zero blocks, plus a zero partial block
    for quant_type in QUANT_TYPES:
        for dq in (False, True):
            out = qlora_ref.dequantize_4bit(qlora_ref.quantize_4bit(x, quant_type, 32, dq))
            assert np.isfinite(out).all()
            assert np.all(out[0] == 0) and np.all(out[2] == 0)


def test_blocks_below_1e38_stay_finite_and_within_their_absmax():
    """bitsandbytes clamps absmax to 1e-38 before 1/absmax, so a block of float32
    subnormals is scaled by 1e38 instead of 1/c_b: its codes undershoot, but the
    result stays finite and |x - x_hat| <= c_b (the parity tests check the bytes)."""
    x = np.float32([3e-39, -1e-40] + [0.0] * 62 + [1.0] * 64)
    out = qlora_ref.dequantize_4bit(qlora_ref.quantize_4bit(x, "nf4", 64, double_quant=False))
    assert np.isfinite(out).all() and np.all(out[64:] == 1)
    assert np.all(np.abs(out[:64] - x[:64]) <= np.float32(3e-39))
    assert out[0] != 0, "the clamp under-scales; it does not zero the block"


def test_trailing_partial_block_is_its_own_block():
    x = np.concatenate([np.full(64, 100.0), np.full(5, 0.01)]).astype(np.float32)
    q = qlora_ref.quantize_4bit(x, "nf4", 64, double_quant=False)
    np.testing.assert_array_equal(q.absmax, np.float32([100.0, 0.01]))
    np.testing.assert_array_equal(qlora_ref.dequantize_4bit(q)[64:], x[64:])


def test_nf4_has_lower_error_than_int4_and_fp4_on_normal_data():
    """Paper, section 3 / Figure 3: NF4 suits normally distributed weights best."""
    x = np.random.default_rng(0).standard_normal(1 << 18).astype(np.float32)
    mse = {}
    for quant_type in QUANT_TYPES:
        q = qlora_ref.quantize_4bit(x, quant_type, 64, double_quant=False)
        mse[quant_type] = float(np.mean((qlora_ref.dequantize_4bit(q) - x) ** 2))
    assert mse["nf4"] < mse["int4"] and mse["nf4"] < mse["fp4"], mse


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_output_dtype_defaults_to_the_input_dtype(dtype):
    x = np.linspace(-1, 1, 130).astype(dtype)
    out = qlora_ref.dequantize_4bit(qlora_ref.quantize_4bit(x))
    assert out.dtype == dtype and out.shape == x.shape


def test_the_cached_tables_cannot_be_changed_by_a_caller():
    """The tables every call shares are read-only: one mutation must not corrupt later calls."""
    from qlora_ref.fourbit import _dynamic_tables, _tables
    for table in (*_tables("nf4")[:3], *_dynamic_tables()):
        assert not table.flags.writeable
        with pytest.raises(ValueError, match="read-only"):
            table[0] = 0
