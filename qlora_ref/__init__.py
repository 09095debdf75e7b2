"""qlora_ref: a readable, exact reference implementation of QLoRA.

The NumPy core (codebooks, blockwise and double quantization, packing,
``QuantState``, memory accounting) imports without torch. The torch side
(``qlora_ref.nn``, ``qlora_ref.optim``, ``prepare_model`` and the adapter
functions) is imported on first use.

>>> import qlora_ref, sys
>>> state = qlora_ref.quantize_4bit(qlora_ref.nf4_code().reshape(2, 8), blocksize=32)
>>> bool((qlora_ref.dequantize_4bit(state) == qlora_ref.nf4_code().reshape(2, 8)).all())
True
"""
from __future__ import annotations

import importlib

# before the extension (and so an OpenMP runtime) loads: how OpenMP threads wait
from ._runtime import apply_openmp_policy as _apply_openmp_policy

_apply_openmp_policy()

from .backend import active_backend, cython_available
from .blockwise import dequantize_blockwise, quantize_blockwise
from .codebooks import dynamic_code, fp4_code, int4_code, nf4_code, normal_float_code
from .double_quant import double_dequantize, double_quantize
from .fourbit import dequantize_4bit, quantize_4bit
from .packing import pack_nibbles, unpack_nibbles
from .quant_state import QuantState

__version__ = "0.1.0"

# name -> module that defines it; imported lazily (PEP 562) so that the
# NumPy core never pulls in torch or bitsandbytes.
_LAZY = {
    "memory": "qlora_ref.memory",
    "nn": "qlora_ref.nn",
    "optim": "qlora_ref.optim",
    "to_bitsandbytes": "qlora_ref.interop.bitsandbytes",
    "from_bitsandbytes": "qlora_ref.interop.bitsandbytes",
    "to_linear4bit_state_dict": "qlora_ref.interop.bitsandbytes",
    "from_linear4bit_state_dict": "qlora_ref.interop.bitsandbytes",
    "dequantize_4bit_torch": "qlora_ref.nn.functional",
    "prepare_model": "qlora_ref.nn.model",
    "trainable_parameters": "qlora_ref.nn.model",
    "save_adapter": "qlora_ref.nn.adapters",
    "load_adapter": "qlora_ref.nn.adapters",
    "merge_and_unload": "qlora_ref.nn.merge",
    "save_quantized": "qlora_ref.nn.saved4bit",
    "load_quantized": "qlora_ref.nn.saved4bit",
}

__all__ = [
    "QuantState", "quantize_4bit", "dequantize_4bit", "quantize_blockwise",
    "dequantize_blockwise", "double_quantize", "double_dequantize", "pack_nibbles",
    "unpack_nibbles", "nf4_code", "fp4_code", "int4_code", "dynamic_code",
    "normal_float_code", "active_backend", "cython_available", *sorted(_LAZY),
]


def __getattr__(name):
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name])
        value = module if module.__name__.endswith("." + name) else getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'qlora_ref' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
