"""Codebooks are derived, not pasted, and equal bitsandbytes' tables bit for bit."""
import numpy as np
import pytest
from hypothesis import assume, given, strategies as st
from scipy.stats import norm

import qlora_ref
from qlora_ref.codebooks import NF4_OFFSET, linspace_float32, normal_float_code

bnb_functional = pytest.importorskip("bitsandbytes.functional",
                                     reason="bitsandbytes is the oracle (test extra)")
torch = pytest.importorskip("torch")


def bits(a):
    return np.asarray(a, dtype=np.float32).view(np.uint32)


def test_nf4_equals_bitsandbytes_table_bit_for_bit():
    ours = qlora_ref.nf4_code()
    theirs = bnb_functional.get_4bit_type("nf4", device="cpu").numpy()
    assert ours.dtype == np.float32 and ours.shape == (16,)
    np.testing.assert_array_equal(bits(ours), bits(theirs))


def test_nf4_equals_bitsandbytes_create_normal_map():
    full = bnb_functional.create_normal_map().numpy()       # 256 entries, zero-padded
    nonzero = np.concatenate([full[:7], [0.0], full[-8:]]).astype(np.float32)
    np.testing.assert_array_equal(bits(qlora_ref.nf4_code()), bits(nonzero))


def test_nf4_shape_of_the_type():
    code = qlora_ref.nf4_code()
    assert np.all(np.diff(code) > 0), "sorted, strictly increasing"
    assert code[0] == -1.0 and code[-1] == 1.0
    assert np.count_nonzero(code == 0) == 1 and code[7] == 0.0, "one exact zero at index 7"
    assert np.count_nonzero(code < 0) == 7 and np.count_nonzero(code > 0) == 8, "asymmetric"


def test_float32_steps_sit_within_ulps_of_the_float64_derivation():
    ours = qlora_ref.nf4_code()
    exact = normal_float_code(4, float32_steps=False)
    difference = np.abs(ours.astype(np.float64) - exact.astype(np.float64))
    assert difference.max() <= 1.2e-7, difference.max()
    assert np.any(difference > 0), "the float32 derivation must differ somewhere (the point of the note)"


def test_nf4_positive_levels_are_normal_quantiles():
    # q+_i = ppf(p_i) / ppf(offset) for p from offset down to 1/2 in 8 steps
    p = np.linspace(NF4_OFFSET, 0.5, 9)[:-1]
    expected = np.sort(norm.ppf(p) / norm.ppf(NF4_OFFSET))
    np.testing.assert_allclose(qlora_ref.nf4_code()[8:], expected, atol=2e-7)


def test_offset_is_the_midpoint_of_two_quantile_grids():
    assert abs((1 - NF4_OFFSET) - 0.5 * (1 / 30 + 1 / 32)) < 1e-7


@given(st.integers(2, 512), st.floats(-2, 2), st.floats(-2, 2))
def test_linspace_float32_matches_torch(num, start, stop):
    # the documented domain of exactness: endpoints 0 or in [2**-10, 2], apart by >= 2**-10
    a, b = np.float32(start), np.float32(stop)
    assume(abs(b - a) >= 2.0 ** -10)
    assume(all(v == 0 or abs(v) >= 2.0 ** -10 for v in (a, b)))
    expected = torch.linspace(start, stop, num, dtype=torch.float32).numpy()
    np.testing.assert_array_equal(bits(linspace_float32(start, stop, num)), bits(expected))


def test_fp4_equals_bitsandbytes_in_code_order():
    ours = qlora_ref.fp4_code()
    theirs = bnb_functional.get_4bit_type("fp4", device="cpu").numpy()
    np.testing.assert_array_equal(ours, theirs)  # as numbers (+0 == -0)
    assert np.signbit(ours[8]) and not np.signbit(theirs[8]), \
        "index 0b1000 is -0.0 for us (bitsandbytes' kernels), +0.0 in its Python table"
    mask = np.arange(16) != 8
    np.testing.assert_array_equal(bits(ours[mask]), bits(theirs[mask]))


def test_dynamic_code_bit_identical_to_create_dynamic_map():
    for signed in (True, False):
        ours = qlora_ref.dynamic_code(signed=signed)
        theirs = bnb_functional.create_dynamic_map(signed=signed).numpy()
        np.testing.assert_array_equal(bits(ours), bits(theirs))


def test_int4_is_symmetric_uniform():
    code = qlora_ref.int4_code()
    assert code.shape == (16,) and np.all(np.diff(code) >= 0)
    np.testing.assert_array_equal(np.unique(code), np.arange(-7, 8, dtype=np.float32) / np.float32(7))


@pytest.mark.parametrize("bits_", [2, 3, 5, 8])
def test_normal_float_family(bits_):
    code = normal_float_code(bits_)
    assert code.shape == (2 ** bits_,) and np.all(np.diff(code) > 0)
    assert code[0] == -1 and code[-1] == 1 and np.count_nonzero(code == 0) == 1


@pytest.mark.parametrize("bad", [1, 9, 4.5])
def test_normal_float_code_rejects_bad_bits(bad):
    with pytest.raises(ValueError, match="bits"):
        normal_float_code(bad)
