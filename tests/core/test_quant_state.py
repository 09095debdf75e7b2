"""QuantState: sizes, exact file and dict round trips, and clear errors for bad input."""
import dataclasses

import numpy as np
import pytest
from hypothesis import given, strategies as st

import qlora_ref
from qlora_ref import QuantState


@given(n=st.integers(1, 3000), quant_type=st.sampled_from(["nf4", "fp4", "int4"]),
       blocksize=st.sampled_from([32, 64, 4096]), double_quant=st.booleans())
def test_save_and_load_round_trip_exactly(tmp_path_factory, n, quant_type, blocksize, double_quant):
    x = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    state = qlora_ref.quantize_4bit(x, quant_type, blocksize, double_quant)
    path = tmp_path_factory.mktemp("qs") / "state.npz"
    state.save(path)
    loaded = QuantState.load(path)
    assert loaded.equals(state)
    assert QuantState.from_dict(state.to_dict()).equals(state)
    np.testing.assert_array_equal(qlora_ref.dequantize_4bit(loaded), qlora_ref.dequantize_4bit(state))


def test_equals_notices_a_single_changed_byte():
    state = qlora_ref.quantize_4bit(np.ones((4, 64), np.float32))
    other = QuantState.from_dict(state.to_dict())
    other.packed = other.packed.copy()
    other.packed[3] ^= 1
    assert not other.equals(state)


def test_nbytes_counts_packed_codes_constants_and_offset():
    state = qlora_ref.quantize_4bit(np.ones(1000, np.float32), blocksize=64, double_quant=True)
    # 500 packed bytes + 16 uint8 constants + 1 float32 nested constant + 4-byte offset
    assert state.nbytes == 500 + 16 + 4 + 4
    plain = qlora_ref.quantize_4bit(np.ones(1000, np.float32), blocksize=64, double_quant=False)
    assert plain.nbytes == 500 + 16 * 4


def test_nbytes_agrees_with_the_memory_module():
    from qlora_ref.memory import quantized_nbytes
    for n in (1, 63, 64, 1000, 64 * 256 + 1):
        for dq in (False, True):
            state = qlora_ref.quantize_4bit(np.ones(n, np.float32), blocksize=64, double_quant=dq)
            assert state.nbytes == quantized_nbytes(n, bits=4, blocksize=64, double_quant=dq)


@pytest.mark.parametrize("field, value", [
    ("packed", np.zeros(3, np.uint8)),
    ("absmax", np.zeros(5, np.uint8)),
    ("nested_absmax", np.zeros(2, np.float32)),
    ("code", np.zeros(15, np.float32)),
    ("packed", np.zeros(32, np.float32)),
])
def test_lengths_that_disagree_with_the_shape_are_named(field, value):
    state = qlora_ref.quantize_4bit(np.ones((8, 8), np.float32), blocksize=32)
    fields = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
    fields[field] = value
    with pytest.raises(ValueError, match=f"QuantState.{field}"):
        QuantState(**fields)


def test_dequantize_checks_a_state_mutated_after_construction():
    state = qlora_ref.quantize_4bit(np.ones((8, 8), np.float32), blocksize=32)
    state.shape = (9, 8)
    with pytest.raises(ValueError, match="QuantState.packed"):
        qlora_ref.dequantize_4bit(state)


@pytest.mark.parametrize("x, message", [
    (np.array([1.0, np.nan], np.float32), "NaN or infinite"),
    (np.array([1.0, np.inf], np.float32), "NaN or infinite"),
    (np.zeros(0, np.float32), "empty"),
    (np.arange(10), "floating-point"),
    (np.ones(4, np.complex64), "floating-point"),
    (np.ones(4, bool), "floating-point"),
])
def test_bad_input_is_a_value_error_that_names_the_problem(x, message):
    for backend in ("numpy", "cython") if qlora_ref.cython_available() else ("numpy",):
        with pytest.raises(ValueError, match=message):
            qlora_ref.quantize_4bit(x, backend=backend)


@pytest.mark.parametrize("kwargs, message", [
    (dict(blocksize=48), "blocksize"), (dict(blocksize=16), "blocksize"),
    (dict(blocksize=8192), "blocksize"), (dict(blocksize=True), "blocksize"),
    (dict(quant_type="nf3"), "quant_type"), (dict(backend="cuda"), "backend"),
])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        qlora_ref.quantize_4bit(np.ones(64, np.float32), **kwargs)


def test_dequantize_rejects_unknown_dtype_and_non_states():
    state = qlora_ref.quantize_4bit(np.ones(64, np.float32))
    with pytest.raises(ValueError, match="dtype"):
        qlora_ref.dequantize_4bit(state, dtype="int8")
    with pytest.raises(ValueError, match="QuantState"):
        qlora_ref.dequantize_4bit(np.ones(3))


def test_torch_inputs_including_bfloat16():
    torch = pytest.importorskip("torch")
    x = torch.randn(16, 64).to(torch.bfloat16)
    state = qlora_ref.quantize_4bit(x)
    assert state.dtype == "bfloat16"
    out = qlora_ref.dequantize_4bit(state)  # NumPy has no bfloat16: the bit patterns, as uint16
    assert isinstance(out, np.ndarray) and out.dtype == np.uint16 and out.shape == (16, 64)
    same = qlora_ref.quantize_4bit(x.float().numpy())
    np.testing.assert_array_equal(state.packed, same.packed)
    expected = torch.from_numpy(qlora_ref.dequantize_4bit(same)).to(torch.bfloat16)
    np.testing.assert_array_equal(out, expected.view(torch.int16).numpy().view(np.uint16))
    as_tensor = qlora_ref.dequantize_4bit_torch(state, dtype=torch.bfloat16)
    assert torch.equal(as_tensor, expected)


@pytest.mark.parametrize("spelling", ["float16", np.float16, np.dtype("float16"), "torch.float16"])
def test_dequantize_accepts_every_spelling_of_a_dtype(spelling):
    state = qlora_ref.quantize_4bit(np.linspace(-1, 1, 128, dtype=np.float32))
    out = qlora_ref.dequantize_4bit(state, dtype=spelling)
    assert out.dtype == np.float16
    np.testing.assert_array_equal(out, qlora_ref.dequantize_4bit(state).astype(np.float16))


def test_dequantize_accepts_torch_dtypes():
    torch = pytest.importorskip("torch")
    state = qlora_ref.quantize_4bit(np.linspace(-1, 1, 128, dtype=np.float32))
    assert qlora_ref.dequantize_4bit(state, dtype=torch.float16).dtype == np.float16
    bf16 = qlora_ref.dequantize_4bit(state, dtype=torch.bfloat16)
    reference = torch.from_numpy(qlora_ref.dequantize_4bit(state)).to(torch.bfloat16)
    np.testing.assert_array_equal(bf16, reference.view(torch.int16).numpy().view(np.uint16))
    with pytest.raises(ValueError, match="dtype must be one of"):
        qlora_ref.dequantize_4bit(state, dtype=torch.int8)


@pytest.mark.parametrize("num_threads", [0, -1, 100_000, 2.5, True, "2"])
@pytest.mark.parametrize("backend", ["numpy", "cython"])
def test_a_bad_thread_count_is_a_value_error_not_a_dead_process(num_threads, backend):
    if backend == "cython" and not qlora_ref.cython_available():
        pytest.skip("the Cython extension is not built in this environment")
    x = np.ones((4, 64), np.float32)
    with pytest.raises(ValueError, match="num_threads"):
        qlora_ref.quantize_4bit(x, backend=backend, num_threads=num_threads)
    state = qlora_ref.quantize_4bit(x, backend=backend)
    with pytest.raises(ValueError, match="num_threads"):
        qlora_ref.dequantize_4bit(state, backend=backend, num_threads=num_threads)
