r"""A prepared 4-bit model on disk: written once, then loaded without quantizing again.

Paper section 3, "QLoRA": the base is quantized once and then only ever
*stored*; a model that is quantized again at every start pays for the
quantization (about 4 s for SmolLM2-135M on one CPU) before its first token.
:func:`save_quantized` writes the 4-bit base the way a Hugging Face model
folder holds a bitsandbytes model, and :func:`load_quantized` reads it back
into :class:`~qlora_ref.nn.Linear4bit` layers, bytes unchanged::

    DIR/
        config.json            the model's config + quantization_config
                               {"quant_method": "bitsandbytes", "load_in_4bit": true,
                                "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": true,
                                "llm_int8_skip_modules": [the linear layers kept in float]}
        model.safetensors      <layer>.weight                 uint8 (ceil(out*in/2), 1)  codes
                               <layer>.weight.absmax, .quant_map, .nested_absmax,
                               .nested_quant_map, .quant_state.bitsandbytes__nf4 (JSON)
                               every other tensor as the model holds it (a tied
                               output embedding once, as save_pretrained writes it)
        generation_config.json, tokenizer files

Mirrors ``transformers``' ``save_pretrained`` of a model loaded with
``BitsAndBytesConfig(load_in_4bit=True)`` (the entries are
:func:`~qlora_ref.interop.bitsandbytes.to_linear4bit_state_dict`'s), so
``AutoModelForCausalLM.from_pretrained(DIR)`` with bitsandbytes installed
opens the folder too, and dequantizes to our weights byte for byte
(``tests/interop/test_saved_4bit.py``).

Loading (:func:`load_quantized`) allocates no float weight it would then
overwrite: the model's skeleton is built with its *parameters* on the meta
device (:func:`parameters_on_meta`; buffers such as rotary frequencies are
computed for real, they are not in the file), the file's codes go into
``Linear4bit`` layers (:meth:`~qlora_ref.nn.Linear4bit.from_quant_state`)
and its other tensors are assigned in place of the meta parameters. Nothing
is quantized, so the loaded layers hold exactly the saved codes.

Note (what is read): ``config.json`` and ``model.safetensors`` must be
regular files in the folder (a symlink, a FIFO or a device is one
``ValueError`` line, and nothing blocks); the weights are parsed by
``safetensors`` (no pickle). Every 4-bit entry is checked (quant type and
double quantization against the config, shape against the layer, dtypes and
lengths by :class:`~qlora_ref.QuantState`), every other tensor against the
skeleton's shape, and a tensor missing or left over is named.

Note (formats): bitsandbytes stores NF4 and FP4 only, so INT4 is refused on
save; a sharded checkpoint (``model.safetensors.index.json``) is refused on
load.

Note (memory while loading): the file is read whole through one checked
descriptor and parsed from those bytes, so for a moment the process holds
the file twice (safetensors copies each tensor out of the bytes); for
SmolLM2-135M that is 2 x 169 MB. Reading by path with ``safe_open`` (mmap)
would avoid the copy but open the file a second time, after the check.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path

import torch.nn as nn

from .._atomic import (atomic_directory, check_regular_file, open_regular_file, read_regular_file,
                       refuse_inside_package, refuse_symlink, regular_file_path, write_atomic)
from ..interop.bitsandbytes import from_linear4bit_state_dict, linear4bit_state_dict_keys
from .adapters import (WEIGHTS_NAME as ADAPTER_WEIGHTS, adapter_key, canonical_safetensors,
                       load_adapter, read_base_record)
from .autograd import is_conv1d
from .linear4bit import Linear4bit
from .lora import LoRALinear, freeze_base
from .model import find_target_modules, replace_module

__all__ = ["save_quantized", "load_quantized", "quantize_model", "is_quantized_folder",
           "check_save_folder", "attach_adapter", "parameters_on_meta", "WEIGHTS", "CONFIG"]

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
#: Quant types bitsandbytes can load (INT4 is ours only).
BNB_TYPES = ("nf4", "fp4")
_CONFIG_MAX = 1 << 20  # a config.json larger than 1 MiB is not a model config
_META_KEY = re.compile(r"^(?P<layer>.+)\.weight\.quant_state\.bitsandbytes__(?P<type>nf4|fp4)$")


# ----------------------------------------------------------------------------- writing

def quantize_model(model: nn.Module, quant_type: str = "nf4", blocksize: int = 64,
                   double_quant: bool = True, target_modules="all-linear",
                   compute_dtype=None) -> nn.Module:
    """Replace the chosen linear layers of ``model`` by frozen :class:`~qlora_ref.nn.Linear4bit` layers (in place).

    The same layers and the same bytes as :func:`~qlora_ref.prepare_model`
    with these settings (both quantize through
    :func:`~qlora_ref.nn.lora.freeze_base`), without the adapters.
    """
    names = find_target_modules(model, target_modules)
    modules = dict(model.named_modules())
    model.requires_grad_(False)
    for name in names:
        layer = freeze_base(modules[name], 4, compute_dtype, quant_type=quant_type,
                            blocksize=blocksize, double_quant=double_quant)
        layer.name = name
        model = replace_module(model, name, layer)
    return model


def _linear_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) or is_conv1d(m)]


def _bnb_config(model: nn.Module, layers: dict) -> dict:
    """``quantization_config`` for config.json: the one 4-bit format of ``layers``, as transformers writes it."""
    formats = {(m.quant_type, m.double_quant) for m in layers.values()}
    if len(formats) != 1:
        raise ValueError(f"the model's 4-bit layers use {len(formats)} formats {sorted(formats)}; "
                         "a saved model (one quantization_config) holds one")
    quant_type, double_quant = formats.pop()
    if quant_type not in BNB_TYPES:
        raise ValueError(f"{quant_type} is not a bitsandbytes type (it stores {BNB_TYPES}); "
                         "a saved 4-bit model must load with transformers + bitsandbytes too")
    from transformers import BitsAndBytesConfig

    skip = sorted(_linear_names(model))  # layers kept in float: bitsandbytes must not quantize them
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                bnb_4bit_use_double_quant=double_quant,
                                llm_int8_skip_modules=skip or None)
    return config.to_dict()


def _tensors_to_save(model: nn.Module) -> dict:
    """The state dict, each tensor once (a tied output embedding is the input embedding's)."""
    seen, tensors = set(), {}
    for key, value in model.state_dict(keep_vars=True).items():
        if id(value) in seen:  # tied: transformers ties it again on load
            continue
        seen.add(id(value))
        tensors[key] = value.detach().to("cpu").contiguous()
    return tensors


def check_save_folder(directory: str | os.PathLike, overwrite: bool = False) -> None:
    """Refuse, in one line, a folder :func:`save_quantized` must not write (call it before the work).

    Not inside the installed package, not a symlink; an existing non-empty
    folder only with ``overwrite``, and only if it is a saved 4-bit model.
    """
    directory = Path(directory)
    refuse_inside_package(directory, "the saved model")
    refuse_symlink(directory, "output folder")
    if os.path.lexists(directory) and not directory.is_dir():
        raise ValueError(f"{directory} exists and is not a folder")
    if directory.is_dir() and any(directory.iterdir()):
        if not overwrite:
            raise ValueError(f"{directory} is not empty; pass --overwrite (overwrite=True) to "
                             "replace the saved model there")
        if not is_quantized_folder(directory):
            raise ValueError(f"{directory} is not a saved 4-bit model; refusing to replace it "
                             "(choose an empty or new folder)")


def save_quantized(model: nn.Module, directory: str | os.PathLike, tokenizer=None,
                   overwrite: bool = False) -> Path:
    """Write a model whose linear layers are :class:`~qlora_ref.nn.Linear4bit` as a 4-bit model folder.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        With ``Linear4bit`` layers (:func:`quantize_model`); ``LoRALinear``
        layers are refused (save the adapters with
        :func:`~qlora_ref.save_adapter`, the base with this).
    directory : path
        The folder (see the module docstring), written whole or not at all
        (:func:`qlora_ref._atomic.atomic_directory`); never inside the package.
    tokenizer : optional
        Saved beside the weights, so the folder is a complete model.
    overwrite : bool
        Replace an existing non-empty folder, which must itself be a saved
        4-bit model (anything else is never deleted).

    Returns
    -------
    pathlib.Path
        ``directory``.
    """
    directory = Path(directory)
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("the model has LoRALinear layers: save its adapters with save_adapter and "
                         "quantize the base alone (quantize_model) to save it here")
    layers = {name: m for name, m in model.named_modules() if isinstance(m, Linear4bit)}
    if not layers:
        raise ValueError("the model has no Linear4bit layers; quantize it first (quantize_model)")
    if not hasattr(model, "config") or not hasattr(model.config, "to_dict"):
        raise ValueError(f"{type(model).__name__} has no transformers config; only a Hugging Face "
                         "model can be saved as a 4-bit model folder")
    check_save_folder(directory, overwrite)
    from safetensors.torch import save as safetensors_bytes

    config = model.config.to_dict()
    config["quantization_config"] = _bnb_config(model, layers)
    for key in ("_name_or_path", "_model_name_or_path"):
        config.pop(key, None)
    data = canonical_safetensors(safetensors_bytes(_tensors_to_save(model),
                                                   metadata={"format": "pt"}))
    with atomic_directory(directory) as tmp:
        write_atomic(tmp / WEIGHTS, data)
        write_atomic(tmp / CONFIG, json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
        generation = getattr(model, "generation_config", None)
        if generation is not None:
            write_atomic(tmp / "generation_config.json", generation.to_json_string())
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return directory


# ----------------------------------------------------------------------------- reading

def _read_config(folder: Path) -> dict:
    """config.json as a dict; one ``ValueError`` line if it is not a regular file of a JSON object."""
    path = folder / CONFIG
    text = read_regular_file(path, _CONFIG_MAX, CONFIG, follow_symlinks=False)
    try:
        config = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object, got a {type(config).__name__}")
    return config


def _quant_format(config: dict, path) -> tuple[str, bool]:
    """(quant_type, double_quant) of a 4-bit bitsandbytes ``quantization_config``; ValueError otherwise."""
    qc = config.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != "bitsandbytes" \
            or qc.get("load_in_4bit") is not True:
        raise ValueError(f"{path}: no 4-bit bitsandbytes quantization_config (quant_method "
                         "'bitsandbytes', load_in_4bit true); not a saved 4-bit model")
    quant_type = qc.get("bnb_4bit_quant_type", "fp4")  # bitsandbytes' own default
    double_quant = qc.get("bnb_4bit_use_double_quant", False)
    if quant_type not in BNB_TYPES:
        raise ValueError(f"{path}: bnb_4bit_quant_type must be one of {BNB_TYPES}, got {quant_type!r}")
    if not isinstance(double_quant, bool):
        raise ValueError(f"{path}: bnb_4bit_use_double_quant must be true or false, "
                         f"got {double_quant!r}")
    return quant_type, double_quant


def is_quantized_folder(directory) -> bool:
    """Whether ``directory`` is a folder whose config.json declares a 4-bit bitsandbytes model."""
    folder = Path(directory)
    try:
        if folder.is_symlink() or not folder.is_dir():
            return False
        _quant_format(_read_config(folder), folder / CONFIG)
    except (OSError, ValueError):
        return False
    return True


@contextlib.contextmanager
def parameters_on_meta():
    """Inside the block, every ``nn.Parameter`` a module registers is put on the meta device.

    A model built this way holds no float weight (no memory, no random
    initialisation: ``reset_parameters`` runs on meta tensors), while its
    buffers -- computed, not stored, e.g. rotary frequencies -- are made as
    usual. What ``accelerate.init_empty_weights(include_buffers=False)``
    does, with plain torch. Each such parameter also carries transformers'
    ``_is_hf_initialized`` mark, so ``post_init`` skips initialising it
    (random draws on meta tensors cost nothing but their dispatch, about
    0.3 s for SmolLM2's 273 tensors).

    Note (scope): the patch is of ``nn.Module.register_parameter`` itself, so
    a module built in another thread meanwhile would get meta parameters too;
    the loader builds one model, in the calling thread, and restores the
    method when the block ends (also on an error).
    """
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
            param._is_hf_initialized = True  # transformers' mark: its init_weights skips it
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _read_tensors(folder: Path) -> dict:
    """The tensors of ``folder/model.safetensors`` (a regular file, not a symlink; no pickle)."""
    from safetensors import SafetensorError
    from safetensors.torch import load as safetensors_load

    path = folder / WEIGHTS
    if not os.path.lexists(path) and os.path.lexists(folder / (WEIGHTS + ".index.json")):
        raise ValueError(f"{folder} holds a sharded checkpoint ({WEIGHTS}.index.json); "
                         "a saved 4-bit model is one model.safetensors")
    with open_regular_file(path, WEIGHTS, follow_symlinks=False) as f:
        data = f.read()  # what was checked is what is read (same descriptor)
    try:
        return safetensors_load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{path} is not a readable safetensors file: {exc}") from None


def _skeleton(config: dict, path):
    """The model of ``config`` with its parameters on the meta device (see :func:`parameters_on_meta`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {k: v for k, v in config.items() if k != "quantization_config"}
    model_type = fields.pop("model_type", None)
    try:
        hf_config = AutoConfig.for_model(model_type, **fields)
        with parameters_on_meta():
            return AutoModelForCausalLM.from_config(hf_config)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds here
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ValueError(f"{path}: no causal language model can be built from it "
                         f"({type(exc).__name__}: {first})") from None


def _out_in(module: nn.Module) -> tuple[int, int]:
    """``(out_features, in_features)`` of an ``nn.Linear`` or a ``Conv1D`` (weight ``(in, out)``)."""
    if is_conv1d(module):
        return module.nf, module.weight.shape[0]
    return module.out_features, module.in_features


def _load_layer(name: str, module: nn.Module, tensors: dict, quant: tuple, compute_dtype,
                where: Path) -> Linear4bit:
    """The ``Linear4bit`` for the skeleton layer ``name`` from the file's entries (checked, not quantized)."""
    if not (isinstance(module, nn.Linear) or is_conv1d(module)):
        raise ValueError(f"{where}: 4-bit entries for '{name}', which is a "
                         f"{type(module).__name__}, not a linear layer of the model")
    key = f"{name}.weight"
    entries = {k: tensors.pop(k) for k in linear4bit_state_dict_keys(tensors, key)}
    try:
        state = from_linear4bit_state_dict(entries, key)
    except ValueError as exc:
        raise ValueError(f"{where}: '{name}': {exc}") from None
    out_features, in_features = _out_in(module)
    got = (state.quant_type, state.double_quant)
    if got != quant:
        raise ValueError(f"{where}: '{name}' is stored as quant_type={got[0]!r}, "
                         f"double_quant={got[1]}, but config.json says {quant[0]!r}, {quant[1]}")
    if tuple(state.shape) != (out_features, in_features):
        raise ValueError(f"{where}: '{name}' holds a weight of shape {tuple(state.shape)}; the "
                         f"model's layer is ({out_features}, {in_features})")
    packed = entries[key]
    if tuple(packed.shape) != ((out_features * in_features + 1) // 2, 1):  # bitsandbytes' layout
        raise ValueError(f"{where}: '{key}' has shape {tuple(packed.shape)}, expected "
                         f"({(out_features * in_features + 1) // 2}, 1)")
    bias = None
    if module.bias is not None:
        bias = tensors.pop(f"{name}.bias", None)
        if bias is None:
            raise ValueError(f"{where}: no tensor '{name}.bias' for the layer's bias")
        if not bias.is_floating_point() or tuple(bias.shape) != (out_features,):
            raise ValueError(f"{where}: '{name}.bias' is {bias.dtype} {tuple(bias.shape)}, "
                             f"expected a floating-point ({out_features},)")
    layer = Linear4bit.from_quant_state(state, bias=bias, compute_dtype=compute_dtype)
    layer.name = name
    return layer


def load_quantized(directory: str | os.PathLike, device="cpu", compute_dtype=None,
                   adapter: str | os.PathLike | None = None) -> nn.Module:
    """A saved 4-bit model (:func:`save_quantized`, or transformers + bitsandbytes) with its codes as stored.

    Parameters
    ----------
    directory : path
        The folder (see the module docstring).
    device : str or torch.device
    compute_dtype : torch.dtype, optional
        Of the ``Linear4bit`` layers' matmuls (default: the input's dtype).
    adapter : path, optional
        A PEFT LoRA adapter folder to put on the 4-bit layers (:func:`attach_adapter`).

    Returns
    -------
    transformers.PreTrainedModel
        In eval mode, the quantized layers :class:`~qlora_ref.nn.Linear4bit`.

    Raises
    ------
    ValueError
        One line naming the file and the problem: not a regular file, not a
        4-bit model, a tensor of the wrong shape or dtype, missing or extra.
    """
    folder = Path(directory)
    refuse_symlink(folder, "saved model folder")
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such folder (a saved 4-bit model)")
    config = _read_config(folder)
    quant = _quant_format(config, folder / CONFIG)
    model = _skeleton(config, folder / CONFIG)
    where = folder / WEIGHTS
    tensors = _read_tensors(folder)
    modules = dict(model.named_modules())
    expected = model.state_dict(keep_vars=True)  # meta parameters: nothing is copied
    layers = sorted(m["layer"] for m in map(_META_KEY.match, tensors) if m)
    if not layers:
        raise ValueError(f"{where} holds no 4-bit weight ('<layer>.weight.quant_state."
                         "bitsandbytes__nf4' entries)")
    for name in layers:
        if name not in modules:
            raise ValueError(f"{where}: 4-bit entries for '{name}', which the model does not have")
        model = replace_module(model, name, _load_layer(name, modules[name], tensors, quant,
                                                        compute_dtype, where))
        for key in [k for k in expected if k.startswith(name + ".")]:
            del expected[key]
    for key, tensor in tensors.items():
        if key not in expected:
            raise ValueError(f"{where}: unexpected tensor {key!r}, which the model does not have")
        want = expected[key]
        if tuple(tensor.shape) != tuple(want.shape) or \
                tensor.is_floating_point() != want.is_floating_point():
            raise ValueError(f"{where}: {key!r} is {str(tensor.dtype).replace('torch.', '')} "
                             f"{tuple(tensor.shape)}; the model needs "
                             f"{'a floating-point' if want.is_floating_point() else want.dtype} "
                             f"{tuple(want.shape)}")
    model.load_state_dict(tensors, strict=False, assign=True)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()  # the output embedding is the input one again (saved once)
    left = [k for k, v in (*model.named_parameters(), *model.named_buffers())
            if v.device.type == "meta"]
    if left:
        raise ValueError(f"{where} has no tensor {left[0]!r}" +
                         (f" (and {len(left) - 1} more)" if len(left) > 1 else ""))
    model.config.name_or_path = str(folder)
    model.name_or_path = str(folder)
    model = model.to(device).eval()
    if adapter is not None:
        model = attach_adapter(model, adapter)
    return model


# ----------------------------------------------------------------------------- adapters

def attach_adapter(model: nn.Module, adapter_dir: str | os.PathLike) -> nn.Module:
    """Put the LoRA adapters of ``adapter_dir`` on the 4-bit layers of a loaded model (in place).

    Each layer the adapter names is wrapped in a :class:`~qlora_ref.nn.LoRALinear`
    of the saved rank over the loaded base (its codes unchanged), then
    :func:`~qlora_ref.load_adapter` fills in the weights and the config's
    alpha and dropout. The base the adapter records (``qlora_ref.base``) must
    be this model's 4-bit format: adapters trained on another base would
    compute something else, so that is a ``ValueError``. An adapter with no
    record (saved by PEFT) is put on as it is.
    """
    from safetensors import safe_open

    directory = Path(adapter_dir)
    weights = directory / ADAPTER_WEIGHTS
    check_regular_file(weights, "adapter weights")  # as load_adapter reads it: a FIFO never blocks
    record = read_base_record(weights)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, Linear4bit)}
    if record is not None:
        held = {json.dumps(dict(quant_bits=4, **m.quant_config()), sort_keys=True)
                for m in layers.values()}
        wanted = {k: record[k] for k in ("quant_bits", "quant_type", "blocksize", "double_quant")
                  if k in record}
        if held != {json.dumps(wanted, sort_keys=True)}:
            raise ValueError(f"{directory} was trained on a base stored as {wanted}; this model's "
                             f"4-bit layers are {sorted(held)}: the adapters belong to another base")
    with regular_file_path(weights, "adapter weights") as name, \
            safe_open(name, framework="pt") as f:  # the checked file itself, whatever is swapped in
        shapes = {key: f.get_slice(key).get_shape() for key in f.keys()}
    for name, base in layers.items():
        shape = shapes.get(adapter_key(name, "A"))
        if shape:  # (r, in)
            layer = LoRALinear(base, r=int(shape[0]), lora_alpha=int(shape[0]))
            layer.name = name
            model = replace_module(model, name, layer)
    return load_adapter(model, directory)
