"""Byte-for-byte parity with bitsandbytes, the implementation people fine-tune with.

On CPU we compare against bitsandbytes 0.50.2 (pinned in the test extra);
the CUDA-marked test compares against its CUDA kernels when a GPU is present.

Which bitsandbytes CPU path serves a call depends on the host, so this module
models the choice (:func:`bnb_dequantize_path`) and checks the model itself
(``test_the_path_model_predicts_which_constant_scales_each_element``):

=================  =================================================  =============  =======
path               taken when (``dequantize_4bit``)                    block of x_i   FP4 0b1000
=================  =================================================  =============  =======
``"torch"``        last dim odd, or torch reports AVX-512 and          i // B         +0.0
                   blocksize >= 2048 (a Python fallback)
``"avx512-rows"``  the CPU has AVX-512F (cpuid, whatever torch         row r, col c:  +0.0
                   reports) and the last dim is a multiple of 16      r*(n//B)+c//B
``"scalar"``       otherwise                                           i // B         -0.0
=================  =================================================  =============  =======

``"avx512-rows"`` is wrong whenever a row is not a whole number of blocks
(n % B != 0 with more than one block): it scales rows after the first by the
wrong constants (for (3, 16) at blocksize 32 the last 16 values use block 0's
absmax). Those cases are bitsandbytes' bug, listed in ``BITSANDBYTES_BUGS`` and
tested as strict xfails on hosts that take that path; everywhere else the
values must be equal. Run the module twice to see both of torch's dispatches
on an AVX-512 host: as is, and with ``ATEN_CPU_CAPABILITY=avx2`` (the slow test
at the end does that in a subprocess).

Error budget, with its source (anything else must be exactly equal):

* **Trailing partial block.** bitsandbytes' CPU quantize divides the partial
  block by its absmax (``A / am``) where every full block, its CUDA kernel
  and we multiply by the float32 reciprocal. A code can differ only when
  that ulp straddles a decision boundary; the test checks each one.
* **FP4 zero.** Code 0b1000 decodes to -0.0 in ours and on the scalar path,
  +0.0 on the two others (table above): zeros are compared as numbers there.
* **Double quantization on CPU.** (a) The offset is a float32 mean: torch
  sums in float32 in its own order, we sum in float64 and round once (the
  correctly rounded mean). Theirs stays within the float32 summation bound
  ``n * 2**-24 * mean``. (b) bitsandbytes' CPU kernel picks the 8-bit codes
  through a lookup that is not always the nearest code; on the same input
  ours is never farther from the value than theirs (but for a value exactly
  on a float32 midpoint, which goes to the lower code as on CUDA); theirs is
  at most one lookup bucket (2**-15 of the normalized range) farther than
  ours, which near 0 can be 4 codes apart; under 1% of a large layer's
  constants differ. CUDA
  rounds to nearest through float32 midpoints, as we do, so there the codes
  must agree.
"""
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, strategies as st

import qlora_ref
from qlora_ref import blockwise, dtypes, fourbit
from qlora_ref.codebooks import code_for

torch = pytest.importorskip("torch")
F = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is the test oracle")
bnb_cpu_ops = pytest.importorskip("bitsandbytes.backends.cpu.ops")

BNB_VERSION = "0.50.2"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]
LOOKUP_BUCKET = 2.0 ** -15  # the width of one bucket of bitsandbytes' 8-bit CPU lookup


# -- the model of bitsandbytes' CPU paths ------------------------------------------------------

def _cpu_has_avx512f() -> bool:
    """What bitsandbytes' C library asks (cpuid), which ATEN_CPU_CAPABILITY does not change."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: torch's own detection, when nothing overrides it
        return (not os.environ.get("ATEN_CPU_CAPABILITY")
                and torch.backends.cpu.get_cpu_capability() == "AVX512")
    return " avx512f" in flags


CPU_HAS_AVX512F = _cpu_has_avx512f()


def bnb_dequantize_path(shape, blocksize) -> str:
    """Which bitsandbytes 0.50.2 CPU path dequantizes a tensor of ``shape`` (table above)."""
    n = shape[-1]
    if n % 2 or (bnb_cpu_ops._has_avx512 and blocksize >= 2048):  # read at call time, as it does
        return "torch"
    if CPU_HAS_AVX512F and n % 16 == 0:
        return "avx512-rows"
    return "scalar"


def bnb_block_of_each_element(shape, blocksize) -> np.ndarray:
    """The index of the constant bitsandbytes' CPU dequantize multiplies each element by."""
    n = shape[-1]
    i = np.arange(math.prod(shape))
    if bnb_dequantize_path(shape, blocksize) == "avx512-rows":
        row, col = np.divmod(i, n)
        return row * (n // blocksize) + col // blocksize
    return i // blocksize


def bnb_dequantize_is_wrong(shape, blocksize) -> bool:
    return not np.array_equal(bnb_block_of_each_element(shape, blocksize),
                              np.arange(math.prod(shape)) // blocksize)


def bnb_fp4_zero_is_positive(shape, blocksize) -> bool:
    return bnb_dequantize_path(shape, blocksize) != "scalar"


# -- helpers -----------------------------------------------------------------------------------

def bits(a):
    a = np.ascontiguousarray(a).reshape(-1)  # bitsandbytes returns (n, 1) for a (1, n) input
    return a.view({2: np.uint16, 4: np.uint32}[a.dtype.itemsize])


def zeros_as_numbers(a):
    return np.where(a == 0, np.zeros_like(a), a)


def bnb_dequantize(packed, state, dtype=torch.float32) -> np.ndarray:
    """bitsandbytes' dequantize_4bit in ``dtype``, as bits (it otherwise returns state.dtype)."""
    original = state.dtype
    state.dtype = dtype
    try:
        out = F.dequantize_4bit(packed, state)
    finally:
        state.dtype = original
    if dtype == torch.bfloat16:
        return out.view(torch.int16).numpy().view(np.uint16).reshape(-1)
    return bits(out.numpy())


def ours_dequantize(state, dtype="float32") -> np.ndarray:
    out = qlora_ref.dequantize_4bit(state, dtype=dtype)
    return out.reshape(-1) if dtype == "bfloat16" else bits(out)  # bfloat16 comes as its bits


def positive_zeros(bit_patterns, dtype) -> np.ndarray:
    """Replace the bit pattern of -0.0 by +0.0 (compare zeros as numbers)."""
    sign = {"float32": np.uint32(0x80000000), "float16": np.uint16(0x8000),
            "bfloat16": np.uint16(0x8000)}[dtype]
    return np.where(bit_patterns == sign, np.zeros_like(bit_patterns), bit_patterns)


def assert_values_equal_bitsandbytes(ours_state, packed, bnb_state, dtype="float32"):
    """Our dequantized values against bitsandbytes' on the same state, per the path model.

    Where bitsandbytes' path is correct the bits must be equal everywhere.
    Where it is wrong (its bug), its output must equal our model of the bug
    (each code times the constant the model names), and ours must equal
    theirs on every element the bug leaves alone.
    """
    shape, blocksize = tuple(bnb_state.shape), int(bnb_state.blocksize)
    theirs = bnb_dequantize(packed, bnb_state, DTYPES[dtype])
    ours = ours_dequantize(ours_state, dtype)
    if ours_state.quant_type == "fp4" and bnb_fp4_zero_is_positive(shape, blocksize):
        ours, theirs = positive_zeros(ours, dtype), positive_zeros(theirs, dtype)
    if not bnb_dequantize_is_wrong(shape, blocksize):
        np.testing.assert_array_equal(ours, theirs)
        return
    used = bnb_block_of_each_element(shape, blocksize)
    codes = qlora_ref.unpack_nibbles(ours_state.packed, ours_state.n_elements)
    bug = ours_state.code[codes] * fourbit.dequantize_absmax(ours_state)[used]
    bug = dtypes.bfloat16_bits(bug) if dtype == "bfloat16" \
        else bits(bug.astype(dtype))
    bug = positive_zeros(bug, dtype) if ours_state.quant_type == "fp4" else bug
    np.testing.assert_array_equal(bug, theirs, err_msg="bitsandbytes' bug is not the modelled one")
    right = used == np.arange(used.size) // blocksize
    np.testing.assert_array_equal(ours[right], theirs[right])


def random_weight(seed, shape, dtype, zero_first_row=False):
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(shape[0], 1, generator=g) * 4 + 0.01  # rows with different ranges
    x = torch.randn(*shape, generator=g) * scale
    if zero_first_row:  # all-zero blocks (a whole block, or a trailing partial one)
        x[0] = 0
    return x.to(DTYPES[dtype])


shapes = st.tuples(st.integers(1, 70), st.integers(1, 300))
cases = dict(seed=st.integers(0, 2**31 - 1), shape=shapes,
             dtype=st.sampled_from(sorted(DTYPES)), quant_type=st.sampled_from(["nf4", "fp4"]),
             blocksize=st.sampled_from(BLOCKSIZES), zero_first_row=st.booleans())


def explain_partial_block_differences(x, ours, theirs, quant_type, blocksize):
    """Every differing code must sit in the trailing partial block and be explained by
    x * (1/c) and x / c falling on different sides of a decision boundary."""
    flat = x.reshape(-1).float().numpy()
    n = flat.size
    codes_ours = qlora_ref.unpack_nibbles(ours.packed, n)
    codes_theirs = qlora_ref.unpack_nibbles(theirs.packed, n)
    differ = np.nonzero(codes_ours != codes_theirs)[0]
    if differ.size == 0:
        return 0
    full = n - n % blocksize
    assert n % blocksize and differ.min() >= full, \
        f"codes differ outside the trailing partial block at {differ[:5]}"
    c = blockwise.block_absmax(flat, blocksize)[-1]  # the partial block's true absmax
    midpoints, _ = blockwise.decision_boundaries(code_for(quant_type))
    by_reciprocal = flat[differ] * (np.float32(1) / c)
    by_division = flat[differ] / c
    side_r = np.searchsorted(midpoints, by_reciprocal, side="left")
    side_d = np.searchsorted(midpoints, by_division, side="left")
    assert np.all(side_r != side_d), "a differing code not explained by reciprocal vs division"
    return differ.size


# -- the model is right on this host ----------------------------------------------------------

PROBE_SHAPES = [(1, 64), (2, 30), (3, 16), (3, 40), (4, 48), (3, 96), (2, 1000), (5, 16),
                (10, 96), (128, 128), (2, 62), (3, 4098), (2, 33), (1, 4096), (7, 4096)]


@pytest.mark.parametrize("torch_reports_avx512", [False, True])
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_the_path_model_predicts_which_constant_scales_each_element(
        blocksize, torch_reports_avx512, monkeypatch):
    """Codes all 1.0 and constants 2**b: log2 of bitsandbytes' output is the block it used.

    Both of bitsandbytes' Python dispatches (torch reporting AVX-512 or not)
    are exercised on any host by setting the flag it reads at call time.
    """
    monkeypatch.setattr(bnb_cpu_ops, "_has_avx512", torch_reports_avx512)
    for shape in PROBE_SHAPES:
        n_blocks = -(-math.prod(shape) // blocksize)
        state = F.QuantState(absmax=torch.tensor([2.0 ** (b % 100) for b in range(n_blocks)]),
                             shape=torch.Size(shape), code=torch.from_numpy(code_for("nf4")),
                             blocksize=blocksize, quant_type="nf4", dtype=torch.float32)
        packed = torch.full(((math.prod(shape) + 1) // 2, 1), 0xFF, dtype=torch.uint8)
        used = np.log2(F.dequantize_4bit(packed, state).numpy().reshape(-1))
        expected = bnb_block_of_each_element(shape, blocksize) % 100
        np.testing.assert_array_equal(used, expected, err_msg=f"shape {shape}: path "
                                      f"{bnb_dequantize_path(shape, blocksize)}")


@pytest.mark.parametrize("torch_reports_avx512", [False, True])
@pytest.mark.parametrize("shape", [(2, 30), (2, 32), (3, 33), (2, 64)])
def test_the_path_model_predicts_the_sign_of_fp4_zero(shape, torch_reports_avx512, monkeypatch):
    monkeypatch.setattr(bnb_cpu_ops, "_has_avx512", torch_reports_avx512)
    for blocksize in (64, 2048):
        n_blocks = -(-math.prod(shape) // blocksize)
        state = F.QuantState(absmax=torch.ones(n_blocks), shape=torch.Size(shape),
                             code=torch.from_numpy(code_for("fp4")), blocksize=blocksize,
                             quant_type="fp4", dtype=torch.float32)
        packed = torch.full(((math.prod(shape) + 1) // 2, 1), 0x88, dtype=torch.uint8)
        negative = np.signbit(F.dequantize_4bit(packed, state).numpy())
        assert negative.all() != bnb_fp4_zero_is_positive(shape, blocksize), \
            (shape, blocksize, bnb_dequantize_path(shape, blocksize))


def quantized_both_ways(x, quant_type, blocksize, double_quant):
    """(ours, bitsandbytes' packed tensor, its QuantState, its state as ours) for the same input."""
    ours = qlora_ref.quantize_4bit(x, quant_type, blocksize, double_quant=double_quant)
    packed, state = F.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type,
                                    compress_statistics=double_quant)
    return ours, packed, state, qlora_ref.from_bitsandbytes(packed, state)


# -- without double quantization: everything equal --------------------------------------------

@given(**cases)
def test_without_double_quant_bytes_absmax_and_values_equal_bitsandbytes_cpu(
        seed, shape, dtype, quant_type, blocksize, zero_first_row):
    x = random_weight(seed, shape, dtype, zero_first_row)
    ours, packed, state, theirs = quantized_both_ways(x, quant_type, blocksize, False)
    np.testing.assert_array_equal(bits(ours.absmax), bits(theirs.absmax))
    explained = explain_partial_block_differences(x, ours, theirs, quant_type, blocksize)
    # values from the same bytes, in float32 and in the input's dtype (rounded once):
    # dequantize *their* state with ours, so a partial-block code difference cannot hide one
    for out_dtype in sorted({"float32", dtype}):
        assert_values_equal_bitsandbytes(theirs, packed, state, out_dtype)
    if explained == 0:
        np.testing.assert_array_equal(ours.packed, theirs.packed)


# -- with double quantization: 4-bit bytes equal, constants within the budget -----------------

@given(**cases)
def test_with_double_quant_the_4bit_bytes_equal_and_constants_stay_in_budget(
        seed, shape, dtype, quant_type, blocksize, zero_first_row):
    x = random_weight(seed, shape, dtype, zero_first_row)
    ours, packed, state, theirs = quantized_both_ways(x, quant_type, blocksize, True)
    explain_partial_block_differences(x, ours, theirs, quant_type, blocksize)
    # the first-level constants before double quantization are equal (see the test above) ...
    absmax = qlora_ref.quantize_4bit(x, quant_type, blocksize, double_quant=False).absmax
    exact = absmax.astype(np.float64).mean()
    # ... ours is the correctly rounded mean of the constants ...
    half_ulp = float(np.spacing(np.float32(exact))) / 2  # in float64: subnormal means too
    assert abs(float(ours.offset) - exact) <= half_ulp
    # ... theirs is a float32 sum in torch's order: within the classic bound n * u * mean
    budget = absmax.size * 2.0 ** -24 * exact + half_ulp
    assert abs(float(theirs.offset) - exact) <= budget, \
        f"bitsandbytes' offset is {abs(float(theirs.offset) - exact):.3g} from the mean (budget {budget:.3g})"
    # the 8-bit codes of *their* centred constants: ours nearest, theirs within the lookup budget
    centered = absmax - np.float32(theirs.offset)
    codes, nested_absmax = qlora_ref.quantize_blockwise(centered, qlora_ref.dynamic_code(), 256)
    np.testing.assert_array_equal(bits(nested_absmax), bits(theirs.nested_absmax))
    assert_nearest_and_within_lookup_budget(centered, codes, theirs.absmax, nested_absmax)
    # and the values bitsandbytes gives for its state are ours for the same state
    assert_values_equal_bitsandbytes(theirs, packed, state, "float32")


def assert_nearest_and_within_lookup_budget(values, ours, theirs, absmax, blocksize=256):
    code = qlora_ref.dynamic_code()
    normalized = blockwise.normalize(values, absmax, blocksize, floor=0)
    finite = np.isfinite(normalized)  # 0 * inf (zero blocks) is written as index 0 by both
    np.testing.assert_array_equal(ours[~finite], theirs[~finite])
    v, ours_f, theirs_f = normalized[finite], ours[finite], theirs[finite]
    worse = np.nonzero(np.abs(v - code[ours_f]) > np.abs(v - code[theirs_f]))[0]
    # the one exception: a value exactly on the float32 midpoint of two neighbouring codes
    # goes to the lower one (bitsandbytes' CUDA rule, `x > midpoint`), and that rounded
    # midpoint can sit up to half an ulp off the true one, so "lower" may be farther by less
    # than an ulp (seen: -0.8453125 between codes 10 and 11)
    a, b = code[ours_f[worse]], code[theirs_f[worse]]
    on_midpoint = (np.abs(ours_f[worse].astype(int) - theirs_f[worse]) == 1) \
        & (v[worse] == (a + b) / np.float32(2)) & (a < b)
    assert on_midpoint.all(), f"ours is not the nearest code at {worse[~on_midpoint][:5]}: " \
                              f"{v[worse[~on_midpoint][:5]]}"
    # bitsandbytes' lookup is off by at most one bucket of a 2**16-bucket table over [-1, 1]:
    # measured 3.03e-5 at most over 4 million values (up to 4 codes apart near 0, where the
    # dynamic code's steps are smaller than a bucket)
    excess = (np.abs(v - code[theirs_f]) - np.abs(v - code[ours_f])).max(initial=0)
    assert excess <= LOOKUP_BUCKET, \
        f"bitsandbytes' code is {excess:.3g} farther than ours (budget {LOOKUP_BUCKET:.3g})"


@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 5000))
def test_8bit_constants_are_nearest_where_bitsandbytes_cpu_lookup_is_not(seed, n):
    rng = np.random.default_rng(seed)
    centered = (rng.random(n, dtype=np.float32) - np.float32(0.5)) * np.float32(rng.random() * 8)
    ours, ours_absmax = qlora_ref.quantize_blockwise(centered, qlora_ref.dynamic_code(), 256)
    theirs, state2 = F.quantize_blockwise(torch.from_numpy(centered), blocksize=256)
    np.testing.assert_array_equal(bits(ours_absmax), bits(state2.absmax.numpy()))
    assert_nearest_and_within_lookup_budget(centered, ours, theirs.numpy(), ours_absmax)


def test_8bit_lookup_differences_are_rare_on_a_large_tensor():
    """The budget above, measured on a 4096x4096 layer's 262144 constants."""
    x = random_weight(0, (4096, 4096), "float32")
    absmax = qlora_ref.quantize_4bit(x, "nf4", 64, double_quant=False).absmax
    centered = absmax - np.float32(np.mean(absmax, dtype=np.float64))
    ours, _ = qlora_ref.quantize_blockwise(centered, qlora_ref.dynamic_code(), 256)
    theirs, _ = F.quantize_blockwise(torch.from_numpy(centered), blocksize=256)
    fraction = float(np.mean(ours != theirs.numpy()))
    assert fraction < 0.01, f"{fraction:.4%} of 8-bit constants differ (budget: 1%)"


# -- zero blocks: the same bytes, not just the same values -----------------------------------

@pytest.mark.parametrize("backend", ["numpy", "cython"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", [(64, 64), (3, 50), (1000,), (7,), (1, 1), (300, 5)])
def test_all_zero_inputs_give_bitsandbytes_bytes(shape, quant_type, double_quant, backend):
    if backend == "cython" and not qlora_ref.cython_available():
        pytest.skip("the Cython extension is not built in this environment")
    x = torch.zeros(shape)
    ours = qlora_ref.quantize_4bit(x, quant_type, 64, double_quant, backend=backend)
    packed, state = F.quantize_4bit(x, blocksize=64, quant_type=quant_type,
                                    compress_statistics=double_quant)
    theirs = qlora_ref.from_bitsandbytes(packed, state)
    np.testing.assert_array_equal(ours.packed, theirs.packed)
    np.testing.assert_array_equal(bits(ours.absmax) if not double_quant else ours.absmax,
                                  bits(theirs.absmax) if not double_quant else theirs.absmax)
    if double_quant:
        np.testing.assert_array_equal(bits(ours.nested_absmax), bits(theirs.nested_absmax))
        assert bits(np.float32(ours.offset)) == bits(np.float32(theirs.offset))
    assert not np.any(qlora_ref.dequantize_4bit(ours, backend=backend))


def test_the_dynamic_map_equals_bitsandbytes_for_every_setting_it_accepts():
    accepted = 0
    for signed in (True, False):
        for max_exponent_bits in range(10):
            for total_bits in range(1, 9):
                try:
                    reference = F.create_dynamic_map(signed, max_exponent_bits, total_bits).numpy()
                except Exception:  # bitsandbytes rejects it (AssertionError or NameError)
                    with pytest.raises(ValueError):
                        qlora_ref.dynamic_code(signed, max_exponent_bits, total_bits)
                    continue
                ours = qlora_ref.dynamic_code(signed, max_exponent_bits, total_bits)
                np.testing.assert_array_equal(bits(ours), bits(reference),
                                              err_msg=f"{signed, max_exponent_bits, total_bits}")
                accepted += 1
    assert accepted == 81, f"bitsandbytes {BNB_VERSION} accepts 81 settings; saw {accepted}"


# -- exchanging states ------------------------------------------------------------------------

@given(**cases, double_quant=st.booleans())
def test_bitsandbytes_dequantizes_our_exported_state_to_exactly_our_values(
        seed, shape, dtype, quant_type, blocksize, zero_first_row, double_quant):
    x = random_weight(seed, shape, dtype, zero_first_row)
    ours = qlora_ref.quantize_4bit(x, quant_type, blocksize, double_quant)
    packed, state = qlora_ref.to_bitsandbytes(ours)
    assert_values_equal_bitsandbytes(ours, packed, state, "float32")
    assert qlora_ref.from_bitsandbytes(packed, state).equals(ours)


@given(**cases, double_quant=st.booleans())
def test_we_dequantize_bitsandbytes_states_to_exactly_its_values(
        seed, shape, dtype, quant_type, blocksize, zero_first_row, double_quant):
    x = random_weight(seed, shape, dtype, zero_first_row)
    packed, state = F.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type,
                                    compress_statistics=double_quant)
    mine = qlora_ref.from_bitsandbytes(packed, state)
    for out_dtype in sorted({"float32", dtype}):
        assert_values_equal_bitsandbytes(mine, packed, state, out_dtype)


# -- bitsandbytes' bug, kept visible ----------------------------------------------------------

#: (shape, blocksize) that bitsandbytes 0.50.2's AVX-512 CPU dequantize gets wrong:
#: rows that are not a whole number of blocks.
BITSANDBYTES_BUGS = [((3, 16), 32), ((128, 128), 256), ((300, 400), 64), ((10, 96), 64),
                     ((4, 1024), 2048)]


def _bug_param(shape, blocksize):
    wrong = bnb_dequantize_is_wrong(shape, blocksize)
    return pytest.param(shape, blocksize, id=f"{shape}-{blocksize}", marks=pytest.mark.xfail(
        wrong, strict=True, reason=f"bitsandbytes {BNB_VERSION}: its AVX-512 CPU dequantize_4bit "
        "scales row r, column c by constant r*(n//blocksize) + c//blocksize, wrong when n % "
        "blocksize != 0; a fixed bitsandbytes makes this XPASS, which fails (strict)"))


@pytest.mark.parametrize("shape, blocksize", [_bug_param(*case) for case in BITSANDBYTES_BUGS])
def test_bitsandbytes_cpu_dequantize_of_rows_that_are_not_whole_blocks(shape, blocksize):
    """Where bitsandbytes' path is right this passes; where it is wrong it fails (strict xfail)."""
    x = random_weight(0, shape, "float32")
    packed, state = F.quantize_4bit(x, blocksize=blocksize, quant_type="nf4",
                                    compress_statistics=False)
    theirs = F.dequantize_4bit(packed, state).numpy()
    ours = qlora_ref.dequantize_4bit(qlora_ref.from_bitsandbytes(packed, state))
    error_theirs = float(np.abs(theirs - x.numpy()).max())
    error_ours = float(np.abs(ours - x.numpy()).max())
    np.testing.assert_array_equal(bits(ours), bits(theirs), err_msg=(
        f"max |error| bitsandbytes {error_theirs:.3g} vs ours {error_ours:.3g}"))


def test_the_bug_list_is_the_model_of_the_bug():
    """On an AVX-512 host every listed case is one the model calls wrong (the xfails are real)."""
    if not CPU_HAS_AVX512F:
        pytest.skip("this CPU has no AVX-512F: bitsandbytes takes its correct scalar path here")
    for shape, blocksize in BITSANDBYTES_BUGS:
        if bnb_dequantize_path(shape, blocksize) == "avx512-rows":
            assert bnb_dequantize_is_wrong(shape, blocksize), (shape, blocksize)


# -- Linear4bit checkpoints -------------------------------------------------------------------

@pytest.mark.parametrize("double_quant", [False, True])
def test_linear4bit_state_dict_round_trip(double_quant):
    bnb = pytest.importorskip("bitsandbytes")
    linear = torch.nn.Linear(256, 96)
    layer = bnb.nn.Linear4bit(256, 96, quant_type="nf4", compress_statistics=double_quant)
    layer.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4",
                                     compress_statistics=double_quant)._quantize("cpu")
    state_dict = layer.state_dict()
    ours = qlora_ref.from_linear4bit_state_dict(state_dict)
    expected = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state).numpy()
    np.testing.assert_array_equal(bits(qlora_ref.dequantize_4bit(ours)), bits(expected))
    # and back: our entries have the same keys, dtypes and bytes as bitsandbytes'
    written = qlora_ref.to_linear4bit_state_dict(ours)
    for key, value in written.items():
        reference = state_dict[key]
        assert value.dtype == reference.dtype, key
        if key.endswith("bitsandbytes__nf4"):  # JSON: compare parsed content
            import json
            assert json.loads(bytes(value.numpy())) == json.loads(bytes(reference.numpy()))
        else:
            assert torch.equal(value.reshape(-1), reference.reshape(-1)), key


def test_linear4bit_state_dict_missing_entry_is_named():
    state = qlora_ref.quantize_4bit(np.ones((8, 64), np.float32))
    entries = qlora_ref.to_linear4bit_state_dict(state)
    del entries["weight.nested_absmax"]
    with pytest.raises(ValueError, match="weight.nested_absmax"):
        qlora_ref.from_linear4bit_state_dict(entries)


# -- the other dispatch -----------------------------------------------------------------------

@pytest.mark.slow
def test_this_module_passes_under_the_avx2_dispatch_too():
    """On an AVX-512 host, run this module again with torch told to report AVX2.

    torch then takes its AVX2 kernels (another float32 summation order for the
    double-quantization offset), and bitsandbytes its non-AVX-512 Python
    dispatch. On a host without AVX-512 this run already *is* that dispatch.
    """
    if os.environ.get("ATEN_CPU_CAPABILITY"):
        pytest.skip("already running under a forced ATEN_CPU_CAPABILITY")
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        pytest.skip(f"torch reports {torch.backends.cpu.get_cpu_capability()}: this run already "
                    "takes the non-AVX-512 dispatch (the monkeypatched tests cover the other)")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider",
         "-m", "not slow and not cuda"],
        env=env, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2])
    summary = result.stdout.strip().splitlines()[-1:] or ["(no output)"]
    assert result.returncode == 0, f"under ATEN_CPU_CAPABILITY=avx2: {summary[0]}\n" \
                                   f"{result.stdout[-4000:]}{result.stderr[-2000:]}"
    print("under ATEN_CPU_CAPABILITY=avx2:", summary[0])


# -- CUDA -------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_cuda_kernels_give_our_bytes(quant_type, double_quant, dtype, blocksize):
    """On a GPU: bitsandbytes' CUDA quantize_4bit gives our bytes and constants exactly.

    The 4-bit codes must agree everywhere (CUDA multiplies by the reciprocal in
    every block). Without double quantization the constants must agree. With
    it, the offset may differ from ours by the float32 summation bound (CUDA
    sums in its own order), so the 8-bit codes are compared on the same input:
    their centred constants, quantized by us to the nearest code, must give
    their codes exactly (the CUDA kernel rounds to nearest). Finally
    bitsandbytes' CUDA dequantize of our exported state gives our values.
    """
    x = random_weight(blocksize, (67, 1000), dtype)
    ours = qlora_ref.quantize_4bit(x, quant_type, blocksize, double_quant)
    packed, state = F.quantize_4bit(x.cuda(), blocksize=blocksize, quant_type=quant_type,
                                    compress_statistics=double_quant)
    theirs = qlora_ref.from_bitsandbytes(packed.cpu(), _state_to_cpu(state))
    np.testing.assert_array_equal(ours.packed, theirs.packed)
    if double_quant:
        absmax = qlora_ref.quantize_4bit(x, quant_type, blocksize, double_quant=False).absmax
        exact = absmax.astype(np.float64).mean()
        budget = absmax.size * 2.0 ** -24 * exact + float(np.spacing(np.float32(exact))) / 2
        assert abs(float(theirs.offset) - exact) <= budget
        centered = absmax - np.float32(theirs.offset)
        codes, nested = qlora_ref.quantize_blockwise(centered, qlora_ref.dynamic_code(), 256)
        np.testing.assert_array_equal(codes, theirs.absmax)
        np.testing.assert_array_equal(bits(nested), bits(theirs.nested_absmax))
    else:
        np.testing.assert_array_equal(bits(ours.absmax), bits(theirs.absmax))
    exported_packed, exported_state = qlora_ref.to_bitsandbytes(ours, device="cuda")
    on_gpu = F.dequantize_4bit(exported_packed, exported_state).float().cpu().numpy()
    np.testing.assert_array_equal(bits(on_gpu), bits(qlora_ref.dequantize_4bit(ours, "float32")))


def _state_to_cpu(state):
    state.to("cpu")
    return state
