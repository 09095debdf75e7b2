"""The training state a checkpoint holds, as data: how the optimizer's state becomes tensors
plus a JSON index, and the schema every value read back must follow.

:mod:`qlora_ref.train.checkpoint` writes and reads the files; this module says
what their contents must be. Everything read from a checkpoint is input: a
field of the wrong JSON type, a count past 2**53, an Adam moment of the wrong
shape or a negative second moment is one :class:`CheckpointError` line naming
it, before any tensor reaches a model.
"""
from __future__ import annotations

import json

from qlora_ref.validation import is_int, is_json_number

__all__ = ["CheckpointError", "optimizer_state_to_tensors", "optimizer_state_from_tensors",
           "validate_training_state", "check_optimizer_fits"]


class CheckpointError(ValueError):
    """A checkpoint that is torn, modified, of another format, or from another configuration."""


# ----------------------------------------------------------------------------- optimizer state as JSON

def optimizer_state_to_tensors(state_dict: dict, prefix: str = "optimizer.") -> tuple[dict, dict]:
    """Split ``optimizer.state_dict()`` into safetensors-ready tensors and a JSON index.

    ``state[i][key]`` tensors become ``{prefix}{i}.{key}``; plain numbers,
    strings and booleans stay in the index, as do ``param_groups``.
    """
    import torch

    tensors, index = {}, {}
    for pid, entries in state_dict["state"].items():
        slot = {}
        for key, value in entries.items():
            if torch.is_tensor(value):
                name = f"{prefix}{pid}.{key}"
                tensors[name] = value.detach().to("cpu").contiguous()
                slot[key] = {"tensor": name}
            elif value is None or isinstance(value, (bool, int, float, str)):
                slot[key] = {"value": value}
            else:
                raise TypeError(f"optimizer state {key!r} is a {type(value).__name__}; only tensors "
                                "and plain numbers can be checkpointed")
        index[str(pid)] = slot
    groups = json.loads(json.dumps(state_dict["param_groups"]))  # tuples -> lists; raises on others
    return tensors, {"state": index, "param_groups": groups}


def optimizer_state_from_tensors(index: dict, tensors: dict, template: dict) -> dict:
    """Rebuild a ``state_dict`` from :func:`optimizer_state_to_tensors`' output.

    ``template`` is the receiving optimizer's own ``state_dict()``: where its
    param groups hold a tuple (``betas``), the list read from JSON becomes a tuple.
    """
    state = {}
    for pid, slot in index["state"].items():
        state[int(pid)] = {key: tensors[v["tensor"]] if "tensor" in v else v["value"]
                           for key, v in slot.items()}
    groups = []
    for saved, mine in zip(index["param_groups"], template["param_groups"]):
        groups.append({k: tuple(v) if isinstance(mine.get(k), tuple) and isinstance(v, list) else v
                       for k, v in saved.items()})
    if len(groups) != len(template["param_groups"]):
        raise CheckpointError(f"the checkpoint has {len(index['param_groups'])} optimizer parameter "
                              f"groups, this optimizer {len(template['param_groups'])}")
    return {"state": state, "param_groups": groups}


# ----------------------------------------------------------------------------- the training-state schema

#: The largest step, world size and optimizer step a checkpoint may record (2**53: exact in JSON).
_MAX_COUNT = 2 ** 53


def _step_value(value, what: str) -> int:
    """A step count read from JSON: an int in 0..2**53 (not ``"4"``, ``4.0``, ``1e400`` or ``true``)."""
    if not is_int(value) or not 0 <= value <= _MAX_COUNT:
        raise TypeError(f"{what} must be an integer from 0 to 2**53, got {_short(value)}")
    return value


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_tensor(name: str, tensor, *, low=None, shape=None) -> None:
    """A float tensor of finite values (>= ``low``), of ``shape`` if given."""
    import torch

    if not tensor.is_floating_point():
        raise ValueError(f"tensor {name} is {tensor.dtype}, not a floating-point tensor")
    if shape is not None and tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"tensor {name} has shape {tuple(tensor.shape)}, expected {tuple(shape)}")
    if tensor.numel() and not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"tensor {name} holds NaN or infinite values")
    if low is not None and tensor.numel() and float(tensor.min()) < low:
        raise ValueError(f"tensor {name} holds values below {low} (min {float(tensor.min())!r})")


def _validate_optimizer(index, tensors: dict) -> None:
    """The optimizer index of :func:`optimizer_state_to_tensors` and the tensors it names."""
    if not isinstance(index, dict) or not isinstance(index.get("state"), dict) \
            or not isinstance(index.get("param_groups"), list):
        raise TypeError("optimizer must be {state: {id: {...}}, param_groups: [...]}")
    ids = []
    for g, group in enumerate(index["param_groups"]):
        if not isinstance(group, dict) or not isinstance(group.get("params"), list) \
                or not all(is_int(i) and 0 <= i < _MAX_COUNT for i in group["params"]):
            raise TypeError(f"optimizer.param_groups[{g}] must be an object whose params are "
                            "parameter ids (non-negative integers)")
        ids += group["params"]
        for key, value in group.items():
            if key in ("lr", "eps", "weight_decay") and not (is_json_number(value) and value >= 0):
                raise TypeError(f"optimizer.param_groups[{g}].{key} must be a finite number "
                                f">= 0, got {_short(value)}")
            if key == "betas" and not (isinstance(value, list) and len(value) == 2
                                       and all(is_json_number(b) and 0 <= b < 1 for b in value)):
                raise TypeError(f"optimizer.param_groups[{g}].betas must be two numbers in "
                                f"[0, 1), got {_short(value)}")
    if len(set(ids)) != len(ids):
        raise ValueError("optimizer.param_groups list a parameter id twice")
    for pid, slot in index["state"].items():
        if not (isinstance(pid, str) and pid.isdigit() and str(int(pid)) == pid and int(pid) in ids):
            raise ValueError(f"optimizer.state has an entry {_short(pid)} that is not a parameter "
                             "id of its param_groups")
        if not isinstance(slot, dict):
            raise TypeError(f"optimizer.state[{pid}] must be an object, got {_short(slot)}")
        values = {}
        for key, entry in slot.items():
            where = f"optimizer.state[{pid}].{key}"
            if isinstance(entry, dict) and set(entry) == {"tensor"}:
                name = entry["tensor"]
                if not isinstance(name, str) or not name.startswith("optimizer.") \
                        or name not in tensors:
                    raise ValueError(f"{where} names a tensor the checkpoint lacks: {_short(name)}")
                values[key] = tensors[name]
            elif isinstance(entry, dict) and set(entry) == {"value"} and (
                    entry["value"] is None or isinstance(entry["value"], (bool, str))
                    or is_json_number(entry["value"])):
                values[key] = entry["value"]
            else:
                raise TypeError(f"{where} must be {{tensor: name}} or {{value: a finite number, "
                                f"string, bool or null}}, got {_short(entry)}")
        _validate_adam_slot(pid, values)


def _validate_adam_slot(pid: str, values: dict) -> None:
    """Adam's per-parameter state: ``step`` >= 0, moments finite, ``exp_avg_sq`` >= 0, equal shapes.

    A step of -1 would make the bias correction ``1 - beta ** 0`` zero (a
    division by zero at the next update); a negative second moment gives NaN.
    """
    import torch

    if "step" in values:
        step = values["step"]
        if torch.is_tensor(step):
            if step.numel() != 1 or step.dtype.is_complex or step.dtype == torch.bool:
                raise ValueError(f"optimizer.state[{pid}].step must be one number")
            step = float(step.reshape(()))
        if not is_json_number(step) or not 0 <= step <= _MAX_COUNT or step != int(step):
            raise ValueError(f"optimizer.state[{pid}].step must be a whole number from 0 to 2**53, "
                             f"got {_short(step)}")
    moments = [k for k in ("exp_avg", "exp_avg_sq") if k in values]
    for key in moments:
        if not torch.is_tensor(values[key]):
            raise TypeError(f"optimizer.state[{pid}].{key} must be a tensor")
        _check_tensor(f"optimizer.state[{pid}].{key}", values[key],
                      low=0.0 if key == "exp_avg_sq" else None)
    if len(moments) == 2 and values["exp_avg"].shape != values["exp_avg_sq"].shape:
        raise ValueError(f"optimizer.state[{pid}]: exp_avg {tuple(values['exp_avg'].shape)} and "
                         f"exp_avg_sq {tuple(values['exp_avg_sq'].shape)} differ in shape")


def validate_training_state(state: dict, tensors: dict) -> None:
    """Check a checkpoint's trainer state (JSON) and tensors against the schema :func:`save_checkpoint` writes.

    The schema (optional keys are checked when present)::

        step            int, 0 .. 2**53 (compared with the manifest and the folder name)
        history         [[int step, finite loss], ...]         (required with optimizer)
        config          object                                 (required with optimizer)
        world_size      int, 1 .. 2**53                        (optional)
        train_seconds   finite number >= 0                     (optional)
        optimizer       {state: {"id": {key: {tensor: name} | {value: scalar}}},
                         param_groups: [{params: [id, ...], lr, eps, weight_decay >= 0, betas}]}
        tensors         trainable.*: finite float; optimizer.*: as the index says
                        (Adam: step >= 0 whole, exp_avg finite, exp_avg_sq finite >= 0,
                        both of one shape); rng.torch: uint8 vector

    A forger can re-sign the manifest, so every field a resume reads is
    checked here, before anything uses it. Moments are compared with their
    parameter's shape by :func:`check_optimizer_fits`, which needs the model.

    Raises
    ------
    ValueError or TypeError
        One line naming the first field that does not fit.
    """
    import torch

    if not isinstance(state, dict):
        raise TypeError("the trainer state is not an object")
    _step_value(state.get("step"), "step")
    if "optimizer" in state:  # a training loop's state: it resumes from all three together
        missing = [key for key in ("history", "config") if key not in state]
        if missing:
            raise TypeError(f"the trainer state has an optimizer but no {' or '.join(missing)}")
    history = state.get("history", [])
    if not isinstance(history, list) or not all(
            isinstance(h, list) and len(h) == 2 and is_int(h[0]) and 0 <= h[0] <= _MAX_COUNT
            and is_json_number(h[1]) for h in history):
        raise TypeError("history must be a list of [step, finite loss] pairs")
    if "config" in state and not isinstance(state["config"], dict):
        raise TypeError(f"config must be an object, got {_short(state['config'])}")
    if "world_size" in state and not (is_int(state["world_size"])
                                      and 1 <= state["world_size"] <= _MAX_COUNT):
        raise TypeError(f"world_size must be a positive integer, got {_short(state['world_size'])}")
    if "train_seconds" in state and not (is_json_number(state["train_seconds"])
                                         and state["train_seconds"] >= 0):
        raise TypeError(f"train_seconds must be a finite number >= 0, got "
                        f"{_short(state['train_seconds'])}")
    for name, tensor in tensors.items():
        if name.startswith("trainable."):
            _check_tensor(name, tensor)
        elif name == "rng.torch" and (tensor.dtype != torch.uint8 or tensor.ndim != 1):
            raise ValueError(f"tensor rng.torch must be a uint8 vector, got {tensor.dtype} "
                             f"{tuple(tensor.shape)}")
    if "optimizer" in state:
        _validate_optimizer(state["optimizer"], tensors)


def check_optimizer_fits(index: dict, tensors: dict, optimizer) -> None:
    """Each saved Adam moment has its parameter's shape (``optimizer``: the receiving one).

    Parameter ids are positions in ``optimizer.param_groups``' order, as
    ``torch.optim.Optimizer.state_dict`` numbers them. Call after
    :func:`validate_training_state` (which :func:`read_checkpoint` runs).

    Raises
    ------
    CheckpointError
        Naming the first moment whose shape differs from its parameter's.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for pid, slot in index.get("state", {}).items():
        if int(pid) >= len(params):
            raise CheckpointError(f"optimizer.state[{pid}] has no parameter in this optimizer "
                                  f"({len(params)} parameters)")
        for key, entry in slot.items():
            if "tensor" in entry and key in ("exp_avg", "exp_avg_sq"):
                shape = tuple(tensors[entry["tensor"]].shape)
                if shape != tuple(params[int(pid)].shape):
                    raise CheckpointError(
                        f"optimizer.state[{pid}].{key} has shape {shape}, its parameter "
                        f"{tuple(params[int(pid)].shape)}: the checkpoint does not fit this model")
