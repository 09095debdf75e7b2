"""What a killed writer leaves is cleaned up; a file swapped under a reader never blocks it;
a non-finite constant never dequantizes silently.

Issue 20's last four cases, each as a family:

* a temporary file a kill left in the middle of a single-file write is removed
  by the next write of that file, and nothing that merely looks like one;
* a resumed run deletes, in time, the checkpoints of the run it continues
  (the one it resumes from and the one that recorded as kept), and nothing else;
* a FIFO swapped in between the regular-file check and a library's open cannot
  block the read (the library is handed the already-opened file);
* ``dequantize_blockwise`` and its twins refuse a NaN or infinite constant.
"""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import qlora_ref
from qlora_ref import _atomic
from qlora_ref.nn import dequantize_blockwise_torch, load_adapter, prepare_model, save_adapter
from qlora_ref.train import checkpoint as ckpt
from tests.helpers import no_hang


def killed_inside_a_write(path: Path) -> Path:
    """Fork a child that starts an atomic write of ``path`` and SIGKILLs itself in the middle.

    Returns the temporary file it left (the child's writes, never published).
    """
    before = set(os.listdir(path.parent))
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            with _atomic.atomic_file(path) as f:
                f.write(b"half of a new ")
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    left = set(os.listdir(path.parent)) - before
    assert len(left) == 1, left
    return path.parent / left.pop()


# ----------------------------------------------------------------------------- single-file temps

@pytest.mark.parametrize("name", ["report.json", "LATEST", "loss_curve.png", "state.npz"])
def test_the_next_write_removes_the_temporary_file_a_kill_left(tmp_path, name):
    path = tmp_path / name
    _atomic.write_atomic(path, b"old")
    left = killed_inside_a_write(path)
    assert path.read_bytes() == b"old", "a kill mid-write must leave the final name as it was"
    _atomic.write_atomic(path, b"new")
    assert path.read_bytes() == b"new"
    assert not left.exists(), f"{left.name} of a dead writer is still there"
    assert sorted(os.listdir(tmp_path)) == [name]


def _dead_pid() -> int:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tag=st.text("0123456789abcdef", min_size=8, max_size=8),
       kind=st.sampled_from(["wrong tag", "other file's name", "live writer", "symlink",
                             "folder", "longer tag"]))
def test_a_look_alike_of_a_temporary_file_is_never_deleted(tmp_path_factory, tag, kind):
    """Only a name this module gives (tag = hash of name and pid), of a dead writer,
    a regular file: a user's ``.report.tmp-123-cafebabe.json`` stays."""
    folder = tmp_path_factory.mktemp("lookalike")
    path = folder / "report.json"
    pid = os.getppid() if kind == "live writer" else _dead_pid()
    ours = _atomic._temp_name(path, pid, 0).name
    if kind == "wrong tag":
        name = f".report.tmp-{pid}-{tag}.json"
        if name == ours:
            name = f".report.tmp-{pid}-{'0' if tag[0] != '0' else '1'}{tag[1:]}.json"
    elif kind == "other file's name":
        name = _atomic._temp_name(folder / "other.json", pid, 0).name
    elif kind == "longer tag":
        name = ours.replace(".json", "0.json")
    else:
        name = ours
    victim = folder / name
    target = folder / "target.txt"
    target.write_text("keep")
    if kind == "symlink":
        victim.symlink_to(target)
    elif kind == "folder":
        victim.mkdir()
    else:
        victim.write_text("a user's file")
    _atomic.write_atomic(path, b"{}")
    assert os.path.lexists(victim), f"{kind}: {name} was deleted"
    assert target.read_text() == "keep"


def test_the_temporary_file_of_a_kill_beside_a_quant_state_and_a_figure_goes_too(tmp_path):
    """The writers that go through the helper (``QuantState.save``, the histogram) get it for free."""
    state = qlora_ref.quantize_4bit(np.linspace(-1, 1, 256, dtype=np.float32))
    path = tmp_path / "w.npz"
    state.save(path)
    left = killed_inside_a_write(path)
    state.save(path)
    assert not left.exists()
    assert qlora_ref.QuantState.load(path).packed.tobytes() == state.packed.tobytes()


# ----------------------------------------------------------------------------- resumed checkpoints

def _tensors(step):
    return {"w": torch.full((4,), float(step))}


def _new_process():
    """What a fresh process knows about the checkpoint folders it wrote: nothing."""
    ckpt._WRITTEN.clear()


def _steps(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("step-"))


def test_a_resumed_run_leaves_no_old_checkpoint_behind(tmp_path):
    root = tmp_path / "checkpoint"
    for step in (1, 2, 3):
        ckpt.save_checkpoint(root, step, _tensors(step), {})
    assert _steps(root) == ["step-000002", "step-000003"]
    _new_process()                                   # killed; a new run resumes from LATEST
    ckpt.adopt_checkpoint(ckpt.latest_checkpoint(root))
    ckpt.save_checkpoint(root, 4, _tensors(4), {})
    assert _steps(root) == ["step-000003", "step-000004"], "step-2 of the run it continues stays"
    ckpt.save_checkpoint(root, 5, _tensors(5), {})
    assert _steps(root) == ["step-000004", "step-000005"]


def test_resuming_twice_in_a_row_still_cleans_up(tmp_path):
    root = tmp_path / "checkpoint"
    for step in (1, 2):
        ckpt.save_checkpoint(root, step, _tensors(step), {})
    for step in (3, 4, 5):                           # each run saves once, then is killed
        _new_process()
        ckpt.adopt_checkpoint(ckpt.latest_checkpoint(root))
        ckpt.save_checkpoint(root, step, _tensors(step), {})
        assert _steps(root) == [f"step-{step - 1:06d}", f"step-{step:06d}"]


@pytest.mark.parametrize("forgery", ["another manifest", "a path outside", "itself"])
def test_a_forged_predecessor_record_deletes_nothing(tmp_path, forgery):
    """The record names a folder and the sha256 of its manifest: a user's folder never matches."""
    root = tmp_path / "checkpoint"
    for step in (1, 2):
        ckpt.save_checkpoint(root, step, _tensors(step), {})
    foreign = root / "step-000007"                   # a user's folder, never written by us
    foreign.mkdir()
    (foreign / ckpt.MANIFEST).write_text("{}")
    outside = tmp_path / "precious"
    outside.mkdir()
    latest = ckpt.latest_checkpoint(root)
    manifest = json.loads((latest / ckpt.MANIFEST).read_text())
    record = {"another manifest": {"name": foreign.name, "manifest_sha256": "0" * 64},
              "a path outside": {"name": "../precious", "manifest_sha256": "0" * 64},
              "itself": {"name": latest.name, "manifest_sha256": "0" * 64}}[forgery]
    manifest["previous"] = record
    (latest / ckpt.MANIFEST).write_text(json.dumps(manifest))
    _new_process()
    ckpt.adopt_checkpoint(latest)
    for step in (3, 4, 5):
        ckpt.save_checkpoint(root, step, _tensors(step), {})
    assert foreign.is_dir() and (foreign / ckpt.MANIFEST).read_text() == "{}"
    assert outside.is_dir()


def test_the_finetune_command_resumed_keeps_two_checkpoints(tmp_path, capsys):
    """End to end: a run stopped after step 4 of 8 (checkpoints 2 and 4), resumed to 8."""
    from tests.helpers import cli

    out = tmp_path / "run"
    common = ["finetune", "--max-steps", "8", "--save-steps", "2", "--output-dir", out]
    code, _, err = cli(capsys, *common, "--stop-after", "4")
    assert code == 0, err
    assert _steps(out / "checkpoint") == ["step-000002", "step-000004"]
    _new_process()
    code, _, err = cli(capsys, *common, "--resume", out)
    assert code == 0, err
    assert _steps(out / "checkpoint") == ["step-000006", "step-000008"]


# ----------------------------------------------------------------------------- swapped for a FIFO

def _swap_for_fifo_after_open(monkeypatch, path: Path):
    """After the reader's checked open of ``path``, replace ``path`` by a FIFO (the race)."""
    real = _atomic.open_regular_file

    def open_then_swap(p, *args, **kwargs):
        handle = real(p, *args, **kwargs)
        if Path(p) == path:
            os.unlink(path)
            os.mkfifo(path)
        return handle

    monkeypatch.setattr(_atomic, "open_regular_file", open_then_swap)


def test_a_library_reads_the_checked_file_even_if_a_fifo_is_swapped_in(tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    path = tmp_path / "t.safetensors"
    save_file({"x": torch.arange(3.0)}, str(path))
    _swap_for_fifo_after_open(monkeypatch, path)
    with no_hang(), _atomic.regular_file_path(path) as name:
        assert torch.equal(load_file(name)["x"], torch.arange(3.0))
    assert path.is_fifo()


def test_load_adapter_hands_its_libraries_the_checked_file_not_the_name(tmp_path, monkeypatch):
    """Every safetensors read of ``load_adapter``: the path is swapped for a FIFO just before
    the library opens; the library must get the already-opened file, never the name."""
    from qlora_ref.nn import adapters

    torch.manual_seed(0)
    model = prepare_model(torch.nn.Sequential(torch.nn.Linear(64, 64)), r=4)
    save_adapter(model, tmp_path / "adapter")
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    handed = []

    def racing(real):
        def call(name, *args, **kwargs):
            handed.append(str(name))
            assert Path(name) != weights, "the library was handed the name: a FIFO would block it"
            if not weights.is_fifo():
                data = weights.read_bytes()
                os.unlink(weights)
                os.mkfifo(weights)
                handed.append(len(data))
            return real(name, *args, **kwargs)
        return call

    monkeypatch.setattr(adapters, "load_file", racing(adapters.load_file))
    monkeypatch.setattr(adapters, "safe_open", racing(adapters.safe_open))
    fresh = prepare_model(torch.nn.Sequential(torch.nn.Linear(64, 64)), r=4)
    with no_hang():
        try:
            load_adapter(fresh, tmp_path / "adapter")  # reads the file as it was checked
        except ValueError as exc:                       # or a later read meets the FIFO: one line
            assert "FIFO" in str(exc) and "\n" not in str(exc)
    assert handed and all(str(h).startswith("/proc/self/fd/") for h in handed if isinstance(h, str))


# ----------------------------------------------------------------------------- NaN constants

BAD = [np.nan, np.inf, -np.inf]


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 600), blocksize=st.sampled_from([1, 3, 64, 256]),
       bad=st.sampled_from(BAD), where=st.floats(0, 0.999), seed=st.integers(0, 2**16))
def test_a_non_finite_constant_is_refused_by_every_dequantize_entry(n, blocksize, bad, where, seed):
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 256, n).astype(np.uint8)
    absmax = rng.random(-(-n // blocksize)).astype(np.float32)
    absmax[int(where * absmax.size)] = bad
    code = qlora_ref.dynamic_code()
    with pytest.raises(ValueError, match="absmax holds 1 NaN or infinite"):
        qlora_ref.dequantize_blockwise(codes, absmax, code, blocksize)
    t = [torch.from_numpy(a) for a in (codes, absmax, code)]
    for backend in ["numpy", "torch"] + (["cython"] if qlora_ref.cython_available() else []):
        with pytest.raises(ValueError, match="absmax holds 1 NaN or infinite"):
            dequantize_blockwise_torch(*t, blocksize, backend=backend)


@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize("field", ["nested_absmax", "offset"])
def test_double_dequantize_refuses_a_non_finite_nested_constant(bad, field):
    absmax = np.random.default_rng(0).random(600).astype(np.float32)
    codes, nested, offset = qlora_ref.double_quantize(absmax)
    if field == "nested_absmax":
        nested = nested.copy()
        nested[1] = bad
    else:
        offset = bad
    with pytest.raises(ValueError, match=f"{field} holds 1 NaN or infinite"):
        qlora_ref.double_dequantize(codes, nested, offset)


def test_finite_constants_still_dequantize_exactly():
    """The check changes nothing for good input: the product is the reference's."""
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 256, 1000).astype(np.uint8)
    absmax = rng.random(16).astype(np.float32)
    code = qlora_ref.dynamic_code()
    out = qlora_ref.dequantize_blockwise(codes, absmax, code, 64)
    expected = code[codes] * np.repeat(absmax, 64)[:1000]
    assert out.tobytes() == expected.astype(np.float32).tobytes()
