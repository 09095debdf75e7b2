"""Fault sweep (issue 20, sections 2-4): hangs, crashes and silently wrong results, by class.

Each class has a family of tests that would have caught every example of
the issue and the cases of the sweep run with the fix (see the report):

* hangs: a size read from a file or a flag is bounded before anything is
  allocated (``train_size``, an adapter's ``r``, a GPT config, ``--size``);
* crashes: a thread count, a re-signed checkpoint, a huge number, a text
  that is not Unicode, a broken model file each give one ``ValueError`` /
  ``TypeError`` (one line on the command line), never a signal or a traceback;
* silently wrong: a state that validates dequantizes to finite numbers, a
  ``.npz`` is bounded by its uncompressed size, bad API arguments are named.

Commands that used to crash the process (libgomp aborts, segfaults) run in
a subprocess with a timeout, so a regression fails here instead of killing
the test run. Everything else runs in-process and is cheap.
"""
import contextlib
import errno
import hashlib
import io
import json
import math
import subprocess
import sys
import zipfile
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st
from safetensors.torch import load_file, save_file

from qlora_ref import QuantState, dequantize_4bit, packing, prepare_model, quantize_4bit
from qlora_ref.blockwise import dequantize_blockwise
from qlora_ref.train import checkpoint as ckpt
from qlora_ref.validation import (CONFIG_BOUNDS, MAX_LORA_ALPHA, MAX_LORA_RANK, MAX_THREADS,
                                  check_config_bounds, check_int_range, check_lora_alpha,
                                  check_lora_rank, check_real, check_text)

FLOAT32_MAX = float(np.finfo(np.float32).max)

# anything a JSON file or a caller may hand over: huge ints, non-finite floats, strings, containers
ANY_VALUE = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=10 ** 300, max_value=10 ** 420),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


# ============================================================================ 3. crashes as signals

#: argv lists that crashed the process (a signal) or printed a child's traceback before the fix
_CRASHING_ARGV = [
    ["pretrain", "--threads", "100000"],    # segfault
    ["pretrain", "--threads", "20000"],     # libgomp abort
    ["pretrain", "--threads", "0"],
    ["bench", "--threads", "100000"],       # the child's traceback
    ["bench", "--threads", str(MAX_THREADS + 1)],
    ["bench", "--repeat", "0"],             # a table of nan, exit 0
    ["bench", "--warmup", "-1"],
    ["bench", "--size", "300000"],
    ["bench", "--size", "1x"],
    ["bench", "--contention", "100000"],    # 100,000 busy processes
    ["info", "--size", "300000"],           # MemoryError
    ["info", "--size", "0"],
]

_DRIVER = """
import contextlib, io, json, sys
from qlora_ref.cli import main
out = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(argv)
    except SystemExit as exc:
        code = exc.code
    out.append([code, err.getvalue()])
print(json.dumps(out))
"""


def test_bad_counts_and_sizes_are_one_line_in_a_subprocess():
    """Each argv exits 2 with one ``qlora-ref: error:`` line; none crashes, hangs or trains."""
    done = subprocess.run([sys.executable, "-c", _DRIVER, json.dumps(_CRASHING_ARGV)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"the driver died (status {done.returncode}):\n{done.stderr[-2000:]}"
    assert "Traceback" not in done.stderr, done.stderr[-2000:]  # e.g. bench's measuring child
    for argv, (code, err) in zip(_CRASHING_ARGV, json.loads(done.stdout.splitlines()[-1])):
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("qlora-ref: error:"), (argv, err)


@given(ANY_VALUE)
def test_thread_and_size_checks_refuse_with_valueerror_only(value):
    for check in (lambda v: check_int_range(v, "x", 1, 256), check_lora_rank, check_lora_alpha,
                  lambda v: check_real(v, "x", 0.0, 1.0)):
        try:
            out = check(value)
        except ValueError as exc:
            assert "\n" not in str(exc) and len(str(exc)) < 200
        else:
            assert math.isfinite(out)


# ============================================================================ 3. checkpoints re-signed

def _rehash(folder):
    """Re-sign a checkpoint as a forger would: the manifest made to match the files."""
    manifest = json.loads((folder / ckpt.MANIFEST).read_text())
    for rel, entry in manifest["files"].items():
        data = (folder / rel).read_bytes()
        entry.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (folder / ckpt.MANIFEST).write_text(json.dumps(manifest))


def _adam_checkpoint(root, step=4):
    """A real checkpoint of a two-parameter model after ``step`` AdamW steps (no base model)."""
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        model(torch.ones(1, 3)).sum().backward()
        optimizer.step()
    tensors = {f"trainable.{n}": p.detach().clone() for n, p in model.named_parameters()}
    opt_tensors, index = ckpt.optimizer_state_to_tensors(optimizer.state_dict())
    tensors.update(opt_tensors, **{"rng.torch": torch.get_rng_state()})
    state = {"history": [[1, 2.5], [2, 2.25]], "config": {}, "world_size": 1,
             "train_seconds": 1.5, "optimizer": index}
    return ckpt.save_checkpoint(root, step, tensors, state), model, optimizer


def _edit_state(key, value):
    def edit(state, tensors):
        state[key] = value
    return edit


def _edit_optimizer(fn):
    def edit(state, tensors):
        fn(state["optimizer"])
    return edit


def _edit_tensor(name, fn):
    def edit(state, tensors):
        tensors[name] = fn(tensors[name])
    return edit


#: the issue's examples and the sweep's: each edit, re-signed, must be refused by read_checkpoint
_CHECKPOINT_EDITS = {
    "history is a number": _edit_state("history", 5),
    "history is null": _edit_state("history", None),
    "history loss is a string": _edit_state("history", [[1, "x"]]),
    "world_size is a string": _edit_state("world_size", "two"),
    "world_size is 0": _edit_state("world_size", 0),
    "train_seconds is a list": _edit_state("train_seconds", [1]),
    "config is a list": _edit_state("config", [1]),
    "optimizer.state is a list": _edit_optimizer(lambda o: o.__setitem__("state", [])),
    "optimizer slot is a number": _edit_optimizer(lambda o: o["state"].__setitem__("0", 5)),
    "optimizer id not in param_groups": _edit_optimizer(lambda o: o["state"].__setitem__("7", {})),
    "lr is a string": _edit_optimizer(lambda o: o["param_groups"][0].__setitem__("lr", "abc")),
    "params is a string": _edit_optimizer(lambda o: o["param_groups"][0].__setitem__("params", "a")),
    "optimizer step -1": _edit_tensor("optimizer.0.step", lambda t: torch.tensor(-1.0)),
    "optimizer step nan": _edit_tensor("optimizer.0.step", lambda t: torch.tensor(float("nan"))),
    "exp_avg of another shape": _edit_tensor("optimizer.0.exp_avg", lambda t: torch.zeros(7)),
    "exp_avg int32": _edit_tensor("optimizer.0.exp_avg", lambda t: t.to(torch.int32)),
    "exp_avg_sq negative": _edit_tensor("optimizer.0.exp_avg_sq", lambda t: -torch.ones_like(t)),
    "trainable NaN": _edit_tensor("trainable.weight", lambda t: torch.full_like(t, float("nan"))),
    "rng not bytes": _edit_tensor("rng.torch", lambda t: torch.zeros(3)),
}


def _forge(folder, edit=None, raw=None):
    state = json.loads((folder / ckpt.TRAINER_STATE).read_text())
    tensors = load_file(folder / ckpt.STATE_TENSORS)
    if edit is not None:
        edit(state, tensors)
    save_file(tensors, folder / ckpt.STATE_TENSORS)
    (folder / ckpt.TRAINER_STATE).write_text(raw(json.dumps(state)) if raw else json.dumps(state))
    _rehash(folder)


@pytest.mark.parametrize("name", sorted(_CHECKPOINT_EDITS))
def test_a_resigned_checkpoint_with_a_bad_field_is_refused(tmp_path, name):
    folder, _, _ = _adam_checkpoint(tmp_path / "checkpoint")
    ckpt.read_checkpoint(folder)  # the untouched one reads
    _forge(folder, _CHECKPOINT_EDITS[name])
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.read_checkpoint(folder)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("raw", [
    lambda text: text.replace('"step": 4', '"step": 1e400'),
    lambda text: text.replace('"step": 4', '"step": "4"'),
    lambda text: text.replace('"world_size": 1', '"world_size": 1e400'),
    lambda text: text.replace('"history": [', '"history": ' + "[" * 50000 + "]" * 50000 + ', "h": ['),
], ids=["step 1e400", "step a string", "world_size 1e400", "history nested deeply"])
def test_a_resigned_checkpoint_with_unusable_json_is_refused(tmp_path, raw):
    folder, _, _ = _adam_checkpoint(tmp_path / "checkpoint")
    _forge(folder, raw=raw)
    with pytest.raises(ckpt.CheckpointError):
        ckpt.read_checkpoint(folder)


def test_the_recorded_step_must_match_the_folder_name(tmp_path):
    folder, _, _ = _adam_checkpoint(tmp_path / "checkpoint", step=4)
    for name in (ckpt.TRAINER_STATE, ckpt.MANIFEST):
        data = json.loads((folder / name).read_text())
        data["step"] = 2
        (folder / name).write_text(json.dumps(data))
    _rehash(folder)
    with pytest.raises(ckpt.CheckpointError, match="step-000004"):
        ckpt.read_checkpoint(folder)


def test_a_manifest_entry_that_is_not_an_object_is_refused(tmp_path):
    folder, _, _ = _adam_checkpoint(tmp_path / "checkpoint")
    manifest = json.loads((folder / ckpt.MANIFEST).read_text())
    manifest["files"][ckpt.TRAINER_STATE] = 5
    (folder / ckpt.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ckpt.CheckpointError, match="not a qlora_ref checkpoint manifest"):
        ckpt.verify_checkpoint(folder)


@given(field=st.sampled_from(["step", "history", "config", "world_size", "train_seconds",
                              "optimizer"]), value=ANY_VALUE)
def test_any_json_value_in_any_field_is_accepted_or_refused_cleanly(field, value):
    """The schema's contract: ``ValueError``/``TypeError`` or nothing, whatever the JSON holds."""
    state = {"step": 4, "history": [[1, 2.0]], "config": {}, "world_size": 1, "train_seconds": 0.5,
             "optimizer": {"state": {}, "param_groups": [{"params": [0], "lr": 0.1}]}, field: value}
    try:
        ckpt.validate_training_state(state, {"rng.torch": torch.get_rng_state()})
    except (ValueError, TypeError) as exc:
        assert "\n" not in str(exc)


def test_a_moment_of_its_parameters_shape_is_checked_against_the_model(tmp_path):
    folder, model, optimizer = _adam_checkpoint(tmp_path / "checkpoint")
    saved, tensors = ckpt.read_checkpoint(folder)
    ckpt.check_optimizer_fits(saved["optimizer"], tensors, optimizer)  # its own model: fits
    other = torch.optim.AdamW(torch.nn.Linear(2, 3).parameters())   # weight (3, 2), not (2, 3)
    with pytest.raises(ckpt.CheckpointError, match="exp_avg has shape"):
        ckpt.check_optimizer_fits(saved["optimizer"], tensors, other)


# ============================================================================ 3. huge numbers

@pytest.mark.parametrize("kwargs", [
    dict(lora_alpha=float("nan")), dict(lora_alpha=1e308), dict(lora_alpha=10 ** 400),
    dict(lora_alpha="8"), dict(r=10 ** 400), dict(r=MAX_LORA_RANK + 1), dict(r=4.0),
    dict(lora_dropout=float("nan")),
])
def test_prepare_model_refuses_numbers_that_would_give_garbage(kwargs):
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    with pytest.raises(ValueError):
        prepare_model(model, target_modules=["0"], **kwargs)
    assert isinstance(model[0], torch.nn.Linear)  # nothing was changed


def test_prepare_model_names_a_model_that_is_not_a_module():
    for bad in ("str", None, 3):
        with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
            prepare_model(bad)


@pytest.fixture
def adapter(tmp_path):
    from qlora_ref.nn.adapters import save_adapter

    model = prepare_model(torch.nn.Sequential(torch.nn.Linear(8, 8)), r=2, lora_alpha=4,
                          target_modules=["0"])
    save_adapter(model, tmp_path / "adapter")
    return tmp_path / "adapter"


def _load(folder):
    from qlora_ref.nn.adapters import load_adapter

    return load_adapter(torch.nn.Sequential(torch.nn.Linear(8, 8)), folder)


@pytest.mark.parametrize("edit", [
    {"lora_alpha": 10 ** 400}, {"alpha_pattern": {"0": 10 ** 400}}, {"r": 10 ** 400},
    {"lora_alpha": 1e308}, {"lora_alpha": MAX_LORA_ALPHA * 2}, {"rank_pattern": {"0": 10 ** 30}},
    {"r": 100000}, {"rank_pattern": {"0": 3}},
], ids=repr)
def test_an_adapter_config_with_a_bad_number_is_refused(adapter, edit):
    path = adapter / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
    with pytest.raises(ValueError) as info:
        _load(adapter)
    assert "\n" not in str(info.value) and len(str(info.value)) < 400


def test_an_adapter_rank_is_compared_with_its_tensors_before_anything_is_allocated(adapter, monkeypatch):
    """``r: 100000`` in a 1 kB config allocated 3.9 GB before the shapes were compared."""
    from qlora_ref.nn import adapters

    path = adapter / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "r": 60000}))

    def no_allocation(*args, **kwargs):
        raise AssertionError("prepare_model was called before the rank was checked")

    monkeypatch.setattr(adapters, "prepare_model", no_allocation)
    with pytest.raises(ValueError, match="rank r=60000"):
        _load(adapter)


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool])
def test_an_adapter_with_integer_tensors_is_refused_not_cast(adapter, dtype):
    path = adapter / "adapter_model.safetensors"
    save_file({k: v.to(dtype) for k, v in load_file(path).items()}, path)
    with pytest.raises(ValueError, match="must be floating-point"):
        _load(adapter)


def test_a_config_may_not_ask_for_minutes_of_work_or_overflowing_numbers():
    from qlora_ref.train.config import FinetuneConfig
    import dataclasses

    fields = dataclasses.asdict(FinetuneConfig())
    check_config_bounds(SimpleNamespace(**fields))  # the defaults pass
    for name, high in CONFIG_BOUNDS.items():
        check_config_bounds(SimpleNamespace(**{**fields, name: high}))
        for bad in (high + 1, 1e9, float(high)):
            with pytest.raises(ValueError, match=name):
                check_config_bounds(SimpleNamespace(**{**fields, name: bad}))
    for name, bad in (("lora_alpha", 10 ** 400), ("lora_alpha", 1e308), ("r", 10 ** 400),
                      ("num_train_epochs", float("inf"))):
        with pytest.raises(ValueError, match=name):
            check_config_bounds(SimpleNamespace(**{**fields, name: bad}))


# ============================================================================ 3. text

def _jsonl(tmp_path, second_line: bytes):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"text": "fine"}\n' + second_line + b"\n")
    return path


@pytest.mark.parametrize("line", [
    b'{"text": "a\\ud800b"}', b'{"prompt": "\\udc00", "completion": "x"}',
    b'{"text": ' + b"9" * 5000 + b"}", b'{"text": "a", "n": ' + b"9" * 5000 + b"}",
    b'{"text": ' + b"[" * 100000 + b"]" * 100000 + b"}", b'{"a":' * 50000 + b"1" + b"}" * 50000,
    b'{"text": "\xff"}', b'{"text": 1e400}',
], ids=["lone surrogate", "low surrogate", "5000 digits", "5000 digits elsewhere", "deep array",
        "deep object", "not UTF-8", "1e400"])
def test_a_bad_jsonl_line_is_named_by_file_and_line(tmp_path, line):
    from qlora_ref.train.jsonl import read_examples

    path = _jsonl(tmp_path, line)
    with pytest.raises(ValueError) as info:
        read_examples(path)
    assert str(info.value).startswith(f"{path}:2:"), str(info.value)[:200]


@given(st.text(max_size=20))
def test_any_text_field_is_read_or_refused_with_its_line(text):
    import tempfile
    from pathlib import Path

    from qlora_ref.train.jsonl import read_examples

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "d.jsonl"
        path.write_text(json.dumps({"text": "x" + text}) + "\n")  # surrogates escaped as \udXXX
        try:
            (example,) = read_examples(path)
        except ValueError as exc:
            assert str(exc).startswith(f"{path}:1:") and "surrogate" in str(exc)
        else:
            assert example.completion == "x" + text


def test_check_text_names_a_non_utf8_argument():
    bad = b"caf\xff".decode("utf-8", "surrogateescape")  # how Python decodes such an argv
    with pytest.raises(ValueError, match="--prompt is not valid Unicode text"):
        check_text(bad, "--prompt")
    assert check_text("café", "--prompt") == "café"


# ============================================================================ 3. models

@given(field=st.sampled_from(["vocab_size", "block_size", "n_layer", "n_head", "n_embd", "dropout",
                              "bias"]), value=ANY_VALUE)
def test_any_gpt_config_value_builds_or_is_a_valueerror(field, value):
    from qlora_ref.train.gpt import GPTConfig

    fields = dict(vocab_size=21, block_size=32, n_layer=2, n_head=4, n_embd=32, dropout=0.0, bias=False)
    try:
        GPTConfig(**{**fields, field: value})
    except ValueError as exc:
        assert "\n" not in str(exc)


@pytest.fixture(scope="module")
def base_file():
    from qlora_ref.train.pretrain import default_base_model_path

    path = default_base_model_path()
    if not path.is_file():
        pytest.skip("the shipped base model is missing")
    return path


@pytest.mark.parametrize("change", [
    {"n_head": 0}, {"vocab_size": 5}, {"n_embd": 10 ** 9}, {"vocab_size": 10 ** 12}, {"n_layer": 3},
    {"n_layer": "4"}, None,
], ids=repr)
def test_a_broken_base_model_is_one_line(tmp_path, base_file, change):
    from safetensors import safe_open

    from qlora_ref.train.pretrain import _CONFIG_KEY, load_base_model

    with safe_open(str(base_file), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(base_file)
    if change is None:  # missing tensors: load_state_dict's error has a line per key
        tensors = dict(list(tensors.items())[4:])
    else:
        metadata = {**metadata, _CONFIG_KEY: json.dumps({**json.loads(metadata[_CONFIG_KEY]), **change})}
    path = tmp_path / "bad.safetensors"
    save_file(tensors, path, metadata=metadata)
    with pytest.raises(ValueError) as info:
        load_base_model(path)
    assert "\n" not in str(info.value) and "is not a valid qlora_ref base model" in str(info.value)


def test_pretrain_on_a_full_disk_is_an_oserror(tmp_path, monkeypatch):
    """The file is written by Python, so ENOSPC is an ``OSError`` (one line), not a SafetensorError."""
    from qlora_ref.train import pretrain
    from qlora_ref.train.gpt import GPT, GPTConfig

    class Full(io.RawIOBase):
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    @contextlib.contextmanager
    def full_disk(path):
        yield Full()

    monkeypatch.setattr(pretrain, "atomic_file", full_disk)
    model = GPT(GPTConfig(vocab_size=21, block_size=4, n_layer=1, n_head=1, n_embd=4))
    with pytest.raises(OSError) as info:
        pretrain.save_base_model(model, tmp_path / "m.safetensors")
    assert info.value.errno == errno.ENOSPC


# ============================================================================ 4. silently wrong: states

def _double_quant_state():
    x = np.random.default_rng(0).standard_normal(512).astype(np.float32)
    return quantize_4bit(x, "nf4", 64, double_quant=True)


@given(offset=st.floats(-4e38, 4e38, width=64), peak=st.floats(0, 4e38, width=64))
def test_a_state_that_validates_dequantizes_to_finite_numbers(offset, peak):
    d = _double_quant_state().to_dict()
    d["offset"] = offset
    d["nested_absmax"] = np.full_like(d["nested_absmax"], np.float32(min(peak, FLOAT32_MAX)))
    try:
        state = QuantState.from_dict(d)
    except ValueError:
        return
    for backend in ("numpy", "cython"):
        try:
            out = dequantize_4bit(state, backend=backend)
        except ValueError:
            continue  # no Cython build
        assert np.isfinite(out).all(), (offset, peak, backend)


def test_the_issue_examples_of_overflowing_constants_are_refused():
    d = _double_quant_state().to_dict()
    with pytest.raises(ValueError, match="offset must be finite in float32"):
        QuantState.from_dict({**d, "offset": 1e39})
    state = _double_quant_state()
    state.offset = 1e39  # set after construction: validate() on dequantization refuses it
    with pytest.raises(ValueError, match="offset"):
        dequantize_4bit(state)
    big = np.full_like(d["nested_absmax"], np.float32(3e38))
    with pytest.raises(ValueError, match="overflow float32"):  # 3e38 + 3e38
        QuantState.from_dict({**d, "offset": np.float32(3e38), "nested_absmax": big})


def test_a_float64_beyond_float32_is_named_as_such():
    with pytest.raises(ValueError, match="beyond float32's range"):
        quantize_4bit(np.full(64, 1e39), "nf4", 64)
    with pytest.raises(ValueError, match="NaN or infinite"):
        quantize_4bit(np.full(64, np.inf), "nf4", 64)


def _npz_with(members: dict, method=zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def _members(state) -> dict:
    path_buf = io.BytesIO()
    arrays = {k: (np.asarray(v, np.int64) if k == "shape" else np.asarray(v))
              for k, v in state.to_dict().items() if v is not None}
    np.savez(path_buf, **arrays)
    z = zipfile.ZipFile(io.BytesIO(path_buf.getvalue()))
    return {i.filename: z.read(i) for i in z.infolist()}


def _npy(array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def test_an_npz_is_bounded_by_its_uncompressed_size(tmp_path):
    """A 220 KB deflated file loaded as a 225 MB state: the bound is the uncompressed size."""
    members = _members(_double_quant_state())
    n = 450_000_000
    members["shape.npy"] = _npy(np.array([n], np.int64))
    members["packed.npy"] = _npy(np.zeros(n // 2, np.uint8))
    members["absmax.npy"] = _npy(np.zeros(n // 64, np.uint8))
    members["nested_absmax.npy"] = _npy(np.zeros(-(-(n // 64) // 256), np.float32))
    path = tmp_path / "bomb.npz"
    path.write_bytes(_npz_with(members, zipfile.ZIP_DEFLATED))
    assert path.stat().st_size < 1_000_000
    with pytest.raises(ValueError, match="more than the"):
        QuantState.load(path)


def _patch_headers(data: bytes, flag: int = 0, method: int | None = None) -> bytes:
    data = bytearray(data)
    for signature, flag_at, method_at in ((b"PK\x03\x04", 6, 8), (b"PK\x01\x02", 8, 10)):
        i = data.find(signature)
        while i >= 0:
            data[i + flag_at] |= flag
            if method is not None:
                data[i + method_at:i + method_at + 2] = method.to_bytes(2, "little")
            i = data.find(signature, i + 4)
    return bytes(data)


def _corrupt_deflate(data: bytes) -> bytes:
    data = bytearray(data)
    start = data.find(b"packed.npy") + len(b"packed.npy")
    data[start:start + 8] = b"\xff" * 8  # the first bytes of the deflate stream: an invalid block
    return bytes(data)


@pytest.mark.parametrize("damage", [
    lambda d: _patch_headers(d, flag=1), lambda d: _patch_headers(d, method=99), _corrupt_deflate,
], ids=["encrypted flag", "method 99", "corrupt deflate stream"])
def test_a_broken_zip_member_is_a_valueerror(tmp_path, damage):
    path = tmp_path / "s.npz"
    path.write_bytes(damage(_npz_with(_members(_double_quant_state()), zipfile.ZIP_DEFLATED)))
    with pytest.raises(ValueError):
        QuantState.load(path)


def test_a_deflated_state_file_still_loads(tmp_path):
    state = _double_quant_state()
    path = tmp_path / "s.npz"
    path.write_bytes(_npz_with(_members(state), zipfile.ZIP_DEFLATED))
    assert QuantState.load(path).equals(state)


# ============================================================================ 4. silently wrong: API

@pytest.mark.parametrize("call, error", [
    (lambda: quantize_4bit(torch.empty(64, device="meta"), "nf4", 64), "meta"),
    (lambda: packing.unpack_nibbles([300], 2), "packed must be bytes"),
    (lambda: packing.unpack_nibbles(np.zeros(1), 2), "packed must be bytes"),
    (lambda: packing.unpack_nibbles(np.zeros(1, np.uint8), 2.0), "n must be"),
    (lambda: packing.unpack_nibbles(np.zeros(1, np.uint8), 10 ** 30), "packed has length"),
    (lambda: packing.unpack_nibbles(np.zeros(1, np.uint8), True), "n must be"),
], ids=["meta tensor", "300 is no byte", "float bytes", "n float", "n huge", "n bool"])
def test_bad_api_arguments_are_one_valueerror_naming_them(call, error):
    with pytest.raises(ValueError, match=error):
        call()


@given(st.lists(st.integers(-10 ** 6, 10 ** 6), max_size=8), st.integers(-3, 20))
def test_unpack_nibbles_accepts_bytes_or_names_the_problem(values, n):
    try:
        out = packing.unpack_nibbles(values, n)
    except ValueError:
        assert not (all(0 <= v <= 255 for v in values) and len(values) == (n + 1) // 2 and n >= 0)
    else:
        assert out.dtype == np.uint8 and out.size == n
        assert packing.pack_nibbles(out).tolist() == [v & (0xF0 if i == len(values) - 1 and n % 2
                                                           else 0xFF) for i, v in enumerate(values)]


def test_a_prompt_with_a_non_utf8_byte_is_one_line(capsys):
    """``--prompt`` with a byte that is not UTF-8 (Python decodes it as a lone surrogate)."""
    from qlora_ref.cli import main

    assert main(["generate", "--prompt", "s31\udcff=", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--prompt is not valid Unicode text" in err[0], err


def test_compare_refuses_zero_steps_before_any_run(capsys):
    from qlora_ref.cli import main

    assert main(["compare", "--quick", "--max-steps", "0", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "max_steps" in err[0], err

