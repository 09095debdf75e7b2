r"""``prepare_model``: turn any torch model into a QLoRA model; ``trainable_parameters``: count what that buys.

Paper section 3, "QLoRA": every linear layer of the network gets a frozen
4-bit base and trainable adapters (section 4, "Default LoRA hyperparameters
do not match full finetuning performance": LoRA "on all linear transformer
block layers" is what matches full fine-tuning). Nothing here is specific to
transformers -- QLoRA works for any network made of dense layers.

Mirrors PEFT's ``get_peft_model`` with a ``LoraConfig`` and
``prepare_model_for_kbit_training`` (freeze everything but the adapters),
including its module matching:

* ``target_modules="all-linear"``: every linear layer except the output head
  (a module named ``lm_head``, or the one ``model.get_output_embeddings()`` returns);
  a linear layer is an ``nn.Linear`` (bitsandbytes' ``Linear4bit`` is one) or
  a ``transformers`` ``Conv1D`` (GPT-2), as PEFT counts them;
* a list of names: a module matches if its path equals a name or ends in
  ``"." + name`` (``"q_proj"`` matches ``"layers.0.attn.q_proj"``);
* any other string: a regular expression the full path must match (``re.fullmatch``).

Note (Conv1D): GPT-2's ``Conv1D`` stores :math:`\mathbf W^\top`, ``(in, out)``,
and computes :math:`\mathbf X\mathbf W^\top + \mathbf b` as ``addmm(b, X, W^T)``.
A quantized base holds :math:`\mathbf W`, ``(out, in)``, as bitsandbytes does
when transformers loads GPT-2 in 4 bits; a 16-bit base stays the ``Conv1D``
(same storage, same ``addmm``, so the model's outputs are unchanged bit for
bit) and ``LoRALinear.fan_in_fan_out`` is True, PEFT's flag for it.

Note (bitsandbytes-loaded models): a ``bitsandbytes.nn.Linear4bit`` (a model
loaded with ``BitsAndBytesConfig(load_in_4bit=True)``) is imported as the
4-bit base with its bytes unchanged; its format must be the one asked for.
Any other layer whose weight is not floating point (``Linear8bitLt``, ...)
is a ``ValueError`` naming it.

Note (saving and loading): a prepared model's ``state_dict`` holds tensors
only (the 4-bit bases in bitsandbytes' serialized layout, see
:mod:`~qlora_ref.nn.quantized`), so ``model.save_pretrained(dir)``,
``safetensors.torch.save_model`` and ``transformers.Trainer`` checkpoints
(with ``resume_from_checkpoint``) work. To reload, prepare the same base
with the same settings and load the file::

    model = prepare_model(AutoModelForCausalLM.from_pretrained(base), r=8)
    safetensors.torch.load_model(model, f"{dir}/model.safetensors")

The keys are ``<path>.base_layer.weight...`` and ``<path>.lora_A`` /
``<path>.lora_B``, so ``AutoModelForCausalLM.from_pretrained(dir)`` alone does
not rebuild the adapters. The 4-bit base alone does load there: with each
``LoRALinear`` replaced by its ``base_layer`` and
``model.config.quantization_config = BitsAndBytesConfig(load_in_4bit=True,
...)`` (the base's format), ``save_pretrained`` writes what transformers +
bitsandbytes load (``tests/interop/test_hf_checkpoints.py``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn as nn

from .autograd import dense_weight, is_conv1d
from .linear4bit import Linear4bit
from .lora import LoRALinear
from .quantized import QuantizedLinear
from .targets import check_regex_cost, matches_suffix
from ..validation import INITS, QUANT_BITS, check_lora_alpha, check_lora_rank

__all__ = ["prepare_model", "trainable_parameters", "find_target_modules", "ParameterCount"]

_OUTPUT_HEAD = "lm_head"


def _output_head_names(model: nn.Module) -> set:
    names = {name for name, _ in model.named_modules() if name.split(".")[-1] == _OUTPUT_HEAD}
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is not None:
        names |= {name for name, module in model.named_modules() if module is head}
    return names


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


_LINEAR_TYPES = "nn.Linear (bitsandbytes' Linear4bit included) or transformers' Conv1D"


def find_target_modules(model: nn.Module, target_modules="all-linear") -> list[str]:
    """Paths of the linear layers that ``target_modules`` selects (see the module docstring).

    Raises
    ------
    ValueError
        If a listed name matches no module, or matches a module that is not
        a linear layer (the message lists the linear layers there are), or
        ``"all-linear"`` finds none.
    """
    linear = [name for name, m in model.named_modules() if _is_linear(m)]
    if target_modules == "all-linear":
        heads = _output_head_names(model)
        chosen = [name for name in linear if name not in heads]
        if not chosen:
            raise ValueError(f"target_modules='all-linear' found no layer to wrap in "
                             f"{type(model).__name__}: it looked for {_LINEAR_TYPES}, output "
                             f"head excluded, and found {linear or 'none'}")
        return chosen
    if isinstance(target_modules, str):
        check_regex_cost(target_modules, "target_modules", max_length=None)  # must not hang
        chosen = [name for name in linear if re.fullmatch(target_modules, name)]
        if not chosen:
            raise ValueError(f"target_modules regex {target_modules!r} matches no nn.Linear; "
                             f"the model's linear layers are {linear}")
        return chosen
    if not isinstance(target_modules, Iterable) or not target_modules:
        raise ValueError(f"target_modules must be 'all-linear', a regex or a non-empty list "
                         f"of names, got {target_modules!r}")
    modules = dict(model.named_modules())
    for target in target_modules:
        hits = [name for name in modules if name and matches_suffix(name, target)]
        if not hits:
            leaves = sorted({name.split(".")[-1] for name in linear})
            raise ValueError(f"target module {target!r} is not in the model; its nn.Linear "
                             f"layers are named {leaves}")
        wrong = [f"{name} ({type(modules[name]).__name__})" for name in hits
                 if not _is_linear(modules[name])]
        if wrong:
            raise ValueError(f"target module {target!r} matches {wrong}, which is not an "
                             f"{_LINEAR_TYPES}; only linear layers can get LoRA adapters")
    return [name for name in linear if any(matches_suffix(name, t) for t in target_modules)]


def prepare_model(model: nn.Module, r: int = 8, lora_alpha: float = 16, lora_dropout: float = 0.0,
                  target_modules="all-linear", quant_type: str | None = "nf4",
                  double_quant: bool = True, blocksize: int | None = None, compute_dtype=None,
                  quant_bits: int | None = None, init: str = "lora",
                  loftq_iters: int = 1) -> nn.Module:
    r"""Replace the chosen ``nn.Linear`` layers by :class:`~qlora_ref.nn.LoRALinear` over a frozen base.

    Every chosen layer becomes :math:`\mathbf Y = \mathbf X\hat{\mathbf W}^\top
    + \mathbf b + \frac{\alpha}{r}\,d(\mathbf X)\mathbf A^\top\mathbf B^\top`;
    every other parameter of the model is frozen, so only the adapters train.
    The model is changed in place and returned (if ``model`` is itself a
    chosen ``nn.Linear``, the new layer is returned).

    Parameters
    ----------
    model : nn.Module
        Any torch model (``nn.Linear``, GPT-2's ``Conv1D``, or bitsandbytes'
        ``Linear4bit`` layers); must not hold ``LoRALinear`` layers already.
    r, lora_alpha, lora_dropout
        See :class:`~qlora_ref.nn.LoRALinear`.
    target_modules : "all-linear", list of str, or str
        Which layers (see the module docstring).
    quant_type : {"nf4", "fp4", "int4"} or None
        4-bit data type; ``None`` means a 16-bit base (plain LoRA).
    double_quant : bool
        Double-quantize the 4-bit constants.
    blocksize : int, optional
        Default 64 for 4 bits (the paper), 256 for 8 bits.
    compute_dtype : torch.dtype, optional
        dtype of the matmuls of a quantized base (default: the input's).
    quant_bits : {4, 8, 16}, optional
        Storage of the base: 4 (``quant_type``), 8 (blockwise, dynamic code)
        or 16 (the layer as it is). Default: 4, or 16 when ``quant_type`` is None.
    init : {"lora", "gaussian", "loftq"}
    loftq_iters : int
        LoftQ alternations for ``init="loftq"``.

    Returns
    -------
    nn.Module

    Examples
    --------
    >>> import torch
    >>> mlp = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    >>> mlp = prepare_model(mlp, r=4)
    >>> type(mlp[0]).__name__, type(mlp[0].base_layer).__name__, mlp[0].lora_A.shape
    ('LoRALinear', 'Linear4bit', torch.Size([4, 64]))
    >>> trainable_parameters(mlp).trainable == 4 * (64 + 128) + 4 * (128 + 10)
    True
    """
    if quant_bits is None:
        quant_bits = 16 if quant_type is None else 4
    if quant_bits not in QUANT_BITS:
        raise ValueError(f"quant_bits must be one of {QUANT_BITS}, got {quant_bits!r}")
    if quant_bits == 4 and quant_type is None:
        raise ValueError("quant_bits=4 needs a quant_type ('nf4', 'fp4' or 'int4')")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_lora_rank(r)
    check_lora_alpha(lora_alpha)  # NaN would make every output NaN; 1e308 garbage
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("the model already has LoRALinear layers; prepare it only once")
    config = {}
    if quant_bits == 4:
        config = dict(quant_type=quant_type, double_quant=double_quant,
                      blocksize=64 if blocksize is None else blocksize)
    elif quant_bits == 8:
        config = dict(blocksize=256 if blocksize is None else blocksize)

    names = find_target_modules(model, target_modules)
    modules = dict(model.named_modules())
    for name in names:  # all checked before anything changes
        _check_supported(name, modules[name])
    model.requires_grad_(False)  # freeze everything; the new adapters are created trainable
    for name in names:
        linear = modules[name]
        layer = LoRALinear.from_linear(linear, r=r, lora_alpha=lora_alpha,
                                       lora_dropout=lora_dropout, init=init, quant_bits=quant_bits,
                                       compute_dtype=compute_dtype, loftq_iters=loftq_iters,
                                       **config)
        layer.name = layer.base_layer.name = name
        model = replace_module(model, name, layer)
    return model


def _check_supported(name: str, module: nn.Module) -> None:
    """Raise ``ValueError`` naming the layer if it cannot become a base (see the module note)."""
    if Linear4bit.is_bitsandbytes_layer(module):
        return
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        raise ValueError(f"layer '{name}' ({type(module).__module__}.{type(module).__name__}) "
                         f"holds a {getattr(weight, 'dtype', type(weight).__name__)} weight: "
                         "it is quantized by another library, and only bitsandbytes' Linear4bit "
                         "can be imported; load the model in 16 or 32 bits instead")


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` where the submodule ``name`` is; return the model (``new`` itself if ``name`` is "")."""
    if not name:  # the model is the layer
        return new
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent), leaf, new)
    return model


@dataclass(frozen=True)
class ParameterCount:
    """What :func:`trainable_parameters` reports.

    Attributes
    ----------
    trainable : int
        Parameters that receive gradients (the adapters).
    total : int
        All parameters, quantized weights counted as one parameter each.
    base_params : int
        Weights of the frozen base layers (those under LoRA or quantized).
    base_bytes : int
        Their storage as held: 4-bit codes plus constants, 8-bit codes plus
        constants, or the 16-bit tensor.
    base_bytes_16bit : int
        The same weights in 16 bits, ``2 * base_params``.
    """

    trainable: int
    total: int
    base_params: int
    base_bytes: int
    base_bytes_16bit: int

    @property
    def trainable_percent(self) -> float:
        """``100 * trainable / total``."""
        return 100.0 * self.trainable / self.total if self.total else 0.0

    @property
    def bits_per_base_param(self) -> float:
        """``8 * base_bytes / base_params``: about 4.127 for NF4 with double quantization."""
        return 8.0 * self.base_bytes / self.base_params if self.base_params else 0.0

    def __str__(self) -> str:
        return (f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
                f"trainable%: {self.trainable_percent:.4f} || base weights: "
                f"{self.base_bytes:,} bytes stored vs {self.base_bytes_16bit:,} in 16-bit "
                f"({self.bits_per_base_param:.3f} bits/param)")


def trainable_parameters(model: nn.Module) -> ParameterCount:
    """Count trainable and total parameters, and the bytes of the frozen base in storage vs 16-bit.

    Like PEFT's ``print_trainable_parameters``, but quantized weights count
    as the number of weights they stand for (not the number of bytes that
    hold them), and the base's memory is reported beside its 16-bit size.
    """
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    base_params = base_bytes = 0
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            total += module.weight_numel
            base_params += module.weight_numel
            base_bytes += module.nbytes
        elif isinstance(module, LoRALinear) and _is_linear(module.base_layer):
            weight = dense_weight(module.base_layer)
            base_params += weight.numel()
            base_bytes += weight.numel() * weight.element_size()
    return ParameterCount(trainable, total, base_params, base_bytes, 2 * base_params)
