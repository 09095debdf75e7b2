"""Byte-for-byte parity with bitsandbytes, the implementation people fine-tune with.

On CPU we compare against bitsandbytes 0.50's CPU path (pinned in the test
extra); the same checks run against its CUDA kernels when a GPU is present.

Error budget, with its source (anything else must be exactly equal):

* **Trailing partial block.** bitsandbytes' CPU path divides the partial
  block by its absmax (``A / am``) where every full block, its CUDA kernel
  and we multiply by the float32 reciprocal. The two roundings differ by an
  ulp; a code can differ only when that ulp straddles a decision boundary,
  and the test checks that this is the case for every differing code.
* **FP4 negative zero.** Code 0b1000 decodes to -0.0 in bitsandbytes'
  compiled kernels and in ours; its Python fallback (used for an odd last
  dimension) decodes +0.0. Zeros are compared as numbers there.
* **Double quantization on CPU.** (a) The offset is a float32 mean: torch
  sums in float32 in its own order, we sum in float64 and round once (the
  correctly rounded mean). Theirs stays within the float32 summation bound
  ``n * 2**-24 * mean``; we have seen 2 ulps apart. (b) bitsandbytes' CPU kernel quantizes the 8-bit constants
  through a lookup table that is not always the nearest code; given the
  same input, ours is never farther from the value than theirs, at most 2
  codes apart, on under 1% of the constants. CUDA rounds to nearest, so
  there the codes must agree.
"""
import numpy as np
import pytest
from hypothesis import given, strategies as st
from hypothesis.extra import numpy as hnp

import qlora_ref
from qlora_ref import blockwise

torch = pytest.importorskip("torch")
F = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is the test oracle")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]


def bits(a):
    a = np.ascontiguousarray(a).reshape(-1)  # bitsandbytes returns (n, 1) for a (1, n) input
    return a.view({2: np.uint16, 4: np.uint32}[a.dtype.itemsize])


def zeros_as_numbers(a):
    return np.where(a == 0, np.zeros_like(a), a)


def bnb_dequantize_float32(packed, state):
    """bitsandbytes' dequantize_4bit with float32 output (it otherwise returns state.dtype)."""
    original = state.dtype
    state.dtype = torch.float32
    try:
        return F.dequantize_4bit(packed, state).numpy()
    finally:
        state.dtype = original


def random_weight(seed, shape, dtype):
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(shape[0], 1, generator=g) * 4 + 0.01  # rows with different ranges
    return (torch.randn(*shape, generator=g) * scale).to(DTYPES[dtype])


shapes = st.tuples(st.integers(1, 70), st.integers(1, 300))
cases = dict(seed=st.integers(0, 2**31 - 1), shape=shapes,
             dtype=st.sampled_from(sorted(DTYPES)), quant_type=st.sampled_from(["nf4", "fp4"]),
             blocksize=st.sampled_from(BLOCKSIZES))


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
    midpoints, _ = blockwise.decision_boundaries(qlora_ref.codebooks.code_for(quant_type))
    by_reciprocal = flat[differ] * (np.float32(1) / c)
    by_division = flat[differ] / c
    side_r = np.searchsorted(midpoints, by_reciprocal, side="left")
    side_d = np.searchsorted(midpoints, by_division, side="left")
    assert np.all(side_r != side_d), "a differing code not explained by reciprocal vs division"
    return differ.size


@given(**cases)
def test_without_double_quant_bytes_absmax_and_values_equal_bitsandbytes_cpu(
        seed, shape, dtype, quant_type, blocksize):
    x = random_weight(seed, shape, dtype)
    ours = qlora_ref.quantize_4bit(x, quant_type, blocksize, double_quant=False)
    packed, state = F.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type,
                                    compress_statistics=False)
    theirs = qlora_ref.from_bitsandbytes(packed, state)
    np.testing.assert_array_equal(bits(ours.absmax), bits(theirs.absmax))
    explain_partial_block_differences(x, ours, theirs, quant_type, blocksize)
    if not np.array_equal(ours.packed, theirs.packed):
        return  # explained above; the values below would differ at the same places
    out_theirs = bnb_dequantize_float32(packed, state)
    out_ours = qlora_ref.dequantize_4bit(ours, dtype="float32")
    if shape[-1] % 2 and quant_type == "fp4":
        out_ours, out_theirs = zeros_as_numbers(out_ours), zeros_as_numbers(out_theirs)
    np.testing.assert_array_equal(bits(out_ours), bits(out_theirs))
    # and in the input's dtype (rounded once from the float32 product)
    ours_native = qlora_ref.dequantize_4bit(ours)
    theirs_native = F.dequantize_4bit(packed, state)
    if dtype == "bfloat16":
        ours_native = ours_native.view(torch.int16).numpy()
        theirs_native = theirs_native.view(torch.int16).numpy()
        if quant_type == "fp4":  # compare -0 and +0 bfloat16 patterns as equal numbers
            ours_native = np.where(ours_native == -32768, 0, ours_native)
            theirs_native = np.where(theirs_native == -32768, 0, theirs_native)
        np.testing.assert_array_equal(ours_native, theirs_native)
    else:
        np.testing.assert_array_equal(ours_native, theirs_native.numpy())


@given(**cases)
def test_with_double_quant_the_4bit_bytes_equal_and_constants_stay_in_budget(
        seed, shape, dtype, quant_type, blocksize):
    x = random_weight(seed, shape, dtype)
    ours = qlora_ref.quantize_4bit(x, quant_type, blocksize, double_quant=True)
    packed, state = F.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type,
                                    compress_statistics=True)
    theirs = qlora_ref.from_bitsandbytes(packed, state)
    explain_partial_block_differences(x, ours, theirs, quant_type, blocksize)
    # ours is the correctly rounded mean of the constants ...
    absmax = blockwise.block_absmax(x.reshape(-1).float().numpy(), blocksize).astype(np.float64)
    exact = absmax.mean()
    half_ulp = np.spacing(np.float32(exact)) / 2
    assert abs(float(ours.offset) - exact) <= half_ulp
    # ... theirs is a float32 sum in torch's order: within the classic bound n * u * mean
    budget = absmax.size * 2.0 ** -24 * exact + half_ulp
    assert abs(float(theirs.offset) - exact) <= budget, \
        f"bitsandbytes' offset is {abs(float(theirs.offset) - exact):.3g} from the mean (budget {budget:.3g})"


@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 5000))
def test_8bit_constants_are_nearest_where_bitsandbytes_cpu_lookup_is_not(seed, n):
    rng = np.random.default_rng(seed)
    centered = (rng.random(n, dtype=np.float32) - np.float32(0.5)) * np.float32(rng.random() * 8)
    code = qlora_ref.dynamic_code()
    ours, ours_absmax = qlora_ref.quantize_blockwise(centered, code, 256)
    theirs, state2 = F.quantize_blockwise(torch.from_numpy(centered), blocksize=256)
    theirs = theirs.numpy()
    np.testing.assert_array_equal(bits(ours_absmax), bits(state2.absmax.numpy()))
    normalized = blockwise.normalize(centered, ours_absmax, 256)
    dist_ours = np.abs(normalized - code[ours])
    dist_theirs = np.abs(normalized - code[theirs])
    assert np.all(dist_ours <= dist_theirs), "ours must be the nearest code"
    differ = ours != theirs
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 2
    assert differ.mean() <= 0.01 or differ.sum() <= 1, f"{differ.mean():.2%} of codes differ"


def test_8bit_lookup_differences_are_rare_on_a_large_tensor():
    """The budget above, measured on a 4096x4096 layer's 262144 constants."""
    x = random_weight(0, (4096, 4096), "float32")
    absmax = qlora_ref.quantize_4bit(x, "nf4", 64, double_quant=False).absmax
    centered = absmax - np.float32(np.mean(absmax, dtype=np.float64))
    ours, _ = qlora_ref.quantize_blockwise(centered, qlora_ref.dynamic_code(), 256)
    theirs, _ = F.quantize_blockwise(torch.from_numpy(centered), blocksize=256)
    fraction = float(np.mean(ours != theirs.numpy()))
    assert fraction < 0.01, f"{fraction:.4%} of 8-bit constants differ"


@given(**cases, double_quant=st.booleans())
def test_bitsandbytes_dequantizes_our_exported_state_to_exactly_our_values(
        seed, shape, dtype, quant_type, blocksize, double_quant):
    x = random_weight(seed, shape, dtype)
    ours = qlora_ref.quantize_4bit(x, quant_type, blocksize, double_quant)
    packed, state = qlora_ref.to_bitsandbytes(ours)
    theirs = bnb_dequantize_float32(packed, state)
    mine = qlora_ref.dequantize_4bit(ours, dtype="float32")
    if shape[-1] % 2 and quant_type == "fp4":
        mine, theirs = zeros_as_numbers(mine), zeros_as_numbers(theirs)
    np.testing.assert_array_equal(bits(mine), bits(theirs))
    assert qlora_ref.from_bitsandbytes(packed, state).equals(ours)


@given(**cases, double_quant=st.booleans())
def test_we_dequantize_bitsandbytes_states_to_exactly_its_values(
        seed, shape, dtype, quant_type, blocksize, double_quant):
    x = random_weight(seed, shape, dtype)
    packed, state = F.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type,
                                    compress_statistics=double_quant)
    theirs = bnb_dequantize_float32(packed, state)
    mine = qlora_ref.dequantize_4bit(qlora_ref.from_bitsandbytes(packed, state), dtype="float32")
    if shape[-1] % 2 and quant_type == "fp4":
        mine, theirs = zeros_as_numbers(mine), zeros_as_numbers(theirs)
    np.testing.assert_array_equal(bits(mine), bits(theirs))


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


@pytest.mark.cuda
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_cuda_kernels_give_our_bytes(quant_type, double_quant, dtype, blocksize):
    """On a GPU: bitsandbytes' CUDA quantize_4bit gives our bytes and constants exactly.

    The CUDA kernel rounds the 8-bit constants to the nearest code, so the
    codes must agree; the offset may still differ by 1 ulp (float32 mean),
    in which case the nested codes are compared on the same centred input.
    """
    x = random_weight(blocksize, (67, 1000), dtype)
    ours = qlora_ref.quantize_4bit(x, quant_type, blocksize, double_quant)
    packed, state = F.quantize_4bit(x.cuda(), blocksize=blocksize, quant_type=quant_type,
                                    compress_statistics=double_quant)
    theirs = qlora_ref.from_bitsandbytes(packed.cpu(), _state_to_cpu(state))
    np.testing.assert_array_equal(ours.packed, theirs.packed)
    if double_quant and np.float32(ours.offset) == np.float32(theirs.offset):
        np.testing.assert_array_equal(ours.absmax, theirs.absmax)
        np.testing.assert_array_equal(bits(ours.nested_absmax), bits(theirs.nested_absmax))
    elif not double_quant:
        np.testing.assert_array_equal(bits(ours.absmax), bits(theirs.absmax))
    exported_packed, exported_state = qlora_ref.to_bitsandbytes(ours, device="cuda")
    on_gpu = F.dequantize_4bit(exported_packed, exported_state).float().cpu().numpy()
    np.testing.assert_array_equal(bits(on_gpu), bits(qlora_ref.dequantize_4bit(ours, "float32")))


def _state_to_cpu(state):
    state.to("cpu")
    return state
