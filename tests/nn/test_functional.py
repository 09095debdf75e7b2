"""Specification of qlora_ref.nn.functional: dequantization in torch equals the NumPy reference.

Float32 output equals ``qlora_ref.dequantize_4bit`` bit for bit on every
path (pure torch, Cython through zero-copy views, NumPy); lower precisions
are that float32 result rounded once.
"""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qlora_ref
from qlora_ref.nn.functional import (
    dequantize_4bit_torch, dequantize_blockwise_torch, quant_state_tensors, resolve_torch_backend,
    to_quant_state,
)

TORCH_PATHS = ["torch", "cython", "numpy"]  # GPU tests skip via conftest (marker "cuda")


def bits(a) -> np.ndarray:
    """float32 values as their bit patterns, so that -0.0 != 0.0 and equality is exact."""
    return np.asarray(a, dtype=np.float32).view(np.uint32)


def random_state(rows, cols, quant_type="nf4", blocksize=64, double_quant=True, seed=0):
    w = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    return qlora_ref.quantize_4bit(w, quant_type=quant_type, blocksize=blocksize,
                                   double_quant=double_quant)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 24), cols=st.integers(1, 70),
       quant_type=st.sampled_from(["nf4", "fp4", "int4"]), blocksize=st.sampled_from([32, 64, 128]),
       double_quant=st.booleans(), path=st.sampled_from(TORCH_PATHS),
       seed=st.integers(0, 2**16))
def test_float32_equals_numpy_reference_bit_for_bit(rows, cols, quant_type, blocksize,
                                                    double_quant, path, seed):
    # odd element counts and trailing partial blocks included
    state = random_state(rows, cols, quant_type, blocksize, double_quant, seed)
    got = dequantize_4bit_torch(state, torch.float32, backend=path)
    assert got.dtype == torch.float32 and tuple(got.shape) == (rows, cols)
    for core_backend in ("numpy", "cython"):
        reference = qlora_ref.dequantize_4bit(state, backend=core_backend)
        assert np.array_equal(bits(got.numpy()), bits(reference)), (path, core_backend)


@pytest.mark.parametrize("path", TORCH_PATHS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_other_dtypes_are_the_float32_result_rounded_once(path, dtype):
    state = random_state(33, 65, seed=1)
    float32 = torch.from_numpy(qlora_ref.dequantize_4bit(state, backend="numpy"))
    got = dequantize_4bit_torch(state, dtype, backend=path)
    assert got.dtype == dtype
    assert torch.equal(got, float32.to(dtype))


def test_default_path_is_the_cores_choice_on_cpu(monkeypatch):
    monkeypatch.delenv("QLORA_REF_BACKEND", raising=False)
    assert resolve_torch_backend(None, "cpu") == qlora_ref.active_backend()
    monkeypatch.setenv("QLORA_REF_BACKEND", "numpy")
    assert resolve_torch_backend(None, "cpu") == "numpy"
    assert resolve_torch_backend(None, "cuda") == "torch"  # resolving needs no GPU


def test_dict_of_tensors_is_a_zero_copy_view_and_round_trips():
    state = random_state(16, 40, seed=2)
    tensors = quant_state_tensors(state)
    # CPU tensors share memory with the NumPy arrays: nothing copied
    assert tensors["packed"].data_ptr() == state.packed.ctypes.data
    assert tensors["offset"].dtype == torch.float32 and tensors["offset"].dim() == 0
    assert to_quant_state(tensors).equals(state)
    for path in TORCH_PATHS:
        assert torch.equal(dequantize_4bit_torch(tensors, backend=path),
                           dequantize_4bit_torch(state, backend=path))


def test_cython_path_writes_into_memory_the_tensor_owns():
    state = random_state(8, 64, seed=3)
    first = dequantize_4bit_torch(state, backend="cython")
    second = dequantize_4bit_torch(state, backend="cython")
    assert first.data_ptr() != second.data_ptr()
    first.zero_()  # the caller may modify its result freely
    assert not torch.equal(first, second)


@pytest.mark.parametrize("path", TORCH_PATHS)
def test_8bit_blockwise_equals_numpy_reference(path):
    w = np.random.default_rng(4).standard_normal((37, 29)).astype(np.float32)
    code = qlora_ref.dynamic_code()
    codes, absmax = qlora_ref.quantize_blockwise(w, code, 256)
    reference = qlora_ref.dequantize_blockwise(codes, absmax, code, 256)
    got = dequantize_blockwise_torch(torch.from_numpy(codes), torch.from_numpy(absmax),
                                     torch.from_numpy(code), 256, backend=path)
    assert tuple(got.shape) == (37, 29)
    assert np.array_equal(bits(got.numpy()), bits(reference))
    assert torch.equal(dequantize_blockwise_torch(torch.from_numpy(codes),
                                                  torch.from_numpy(absmax),
                                                  torch.from_numpy(code), 256, torch.bfloat16,
                                                  backend=path),
                       torch.from_numpy(reference).bfloat16())


def test_bad_arguments_raise_value_error():
    state = random_state(4, 64)
    with pytest.raises(ValueError, match="dtype must be"):
        dequantize_4bit_torch(state, torch.int8)
    with pytest.raises(ValueError, match="backend must be one of"):
        dequantize_4bit_torch(state, backend="triton")
    with pytest.raises(ValueError, match="CPU only"):
        resolve_torch_backend("cython", "meta")
    with pytest.raises(ValueError, match="QuantState or a dict"):
        dequantize_4bit_torch(state.packed)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pure_torch_path_on_cuda_equals_numpy(dtype):
    state = random_state(65, 129, seed=5)
    got = dequantize_4bit_torch(state, dtype, device="cuda")
    assert got.device.type == "cuda"
    reference = torch.from_numpy(qlora_ref.dequantize_4bit(state, backend="numpy"))
    assert torch.equal(got.cpu(), reference.to(dtype))
