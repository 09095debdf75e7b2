"""Write safety: what the package writes is whole or absent, only inside the output folder; what it
reads is a regular file or one error line, never a hang.

Families (each would have caught every example of its class in the issue):

1. the lock file: a symlink, a hard link, a FIFO or foreign data at ``.qlora-ref.lock``;
2. checkpoint cleanup: a symlinked ``checkpoint/`` and foreign ``step-*`` / ``.tmp-*`` /
   ``.old-*`` folders (hypothesis draws their names);
3. SIGKILL before every file-system change of a folder swap, an adapter save and a
   checkpoint save (a forked child counts its ``os`` calls and kills itself before the K-th);
   with and without ``renameat2(RENAME_EXCHANGE)``;
4. a full disk: a real 64 KiB tmpfs where mount is permitted, and everywhere a writer
   that raises ``ENOSPC`` half-way: the previous QuantState file, PNG and adapter stay loadable;
5. the installed package: ``compare``, ``quantize --histogram``, ``pretrain`` refuse it;
6. non-regular inputs (FIFO, symlink to ``/dev/zero``, folder) for every reader: one
   ``ValueError`` line within an alarm, never a hang.
"""
from __future__ import annotations

import builtins
import contextlib
import errno
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import qlora_ref
from qlora_ref import _atomic
from qlora_ref.nn import load_adapter, prepare_model, save_adapter
from qlora_ref.quant_state import QuantState
from qlora_ref import quantize_4bit
from qlora_ref.train import checkpoint as ckpt
from tests.helpers import cli, no_hang, one_line

PACKAGE = Path(qlora_ref.__file__).resolve().parent


# ----------------------------------------------------------------------------- helpers

def hostile(path: Path, kind: str) -> Path:
    """Put a non-regular file of ``kind`` at ``path``."""
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev-zero":
        path.symlink_to("/dev/zero")
    elif kind == "directory":
        path.mkdir()
    return path


HOSTILE = ("fifo", "dev-zero", "directory")


_MUTATORS = ("rename", "replace", "unlink", "remove", "rmdir", "mkdir", "write", "pwrite",
             "ftruncate", "truncate", "fsync", "symlink", "link")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC


def _install_kill_counter(limit, counter_file=None):
    """In a forked child: SIGKILL before the ``limit``-th file-system change (None: count them)."""
    state = {"n": 0}

    def step():
        state["n"] += 1
        if limit is not None and state["n"] >= limit:
            os.kill(os.getpid(), signal.SIGKILL)

    def wrap(fn, when=lambda *a, **k: True):
        def wrapped(*args, **kwargs):
            if when(*args, **kwargs):
                step()
            return fn(*args, **kwargs)
        return wrapped

    for name in _MUTATORS:
        if hasattr(os, name):
            setattr(os, name, wrap(getattr(os, name)))
    os.open = wrap(os.open, lambda path, flags, *a, **k: bool(flags & _WRITE_FLAGS))
    builtins.open = wrap(builtins.open, lambda f, mode="r", *a, **k: any(c in mode for c in "wax+"))
    _atomic._exchange = wrap(_atomic._exchange)
    return state


def run_killed(fn, limit, tmp_path) -> tuple[str, int]:
    """Run ``fn()`` in a forked child killed before its ``limit``-th change: ("killed"|"done", count)."""
    counter = tmp_path / f".count-{limit}"
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 0
        try:
            state = _install_kill_counter(limit)
            fn()
            counter.write_text(str(state["n"]))
        except BaseException:  # noqa: BLE001 - reported through the exit status
            code = 3
        os._exit(code)
    deadline = 60
    for _ in range(deadline * 100):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.01)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail(f"the child blocked for {deadline} s")
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL
        return "killed", limit
    assert os.WEXITSTATUS(status) == 0, "the child raised"
    n = int(counter.read_text())
    counter.unlink()
    return "done", n


def count_changes(fn, tmp_path) -> int:
    outcome, n = run_killed(fn, None, tmp_path)
    assert outcome == "done"
    return n


def use_swap_mode(mode: str, monkeypatch) -> None:
    """One of both ways to swap folders: renameat2(RENAME_EXCHANGE), or two renames plus recovery.

    ``fsync`` becomes a no-op (still counted as a step): a SIGKILL keeps the page cache, so
    fsync changes nothing these tests see (it matters for power loss), and on a real disk it
    costs most of their time.
    """
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    if mode == "two-renames":
        monkeypatch.setattr(_atomic, "_exchange", lambda a, b: False)
    else:
        probe = Path(os.environ.get("TMPDIR", "/tmp"))
        if not _atomic._exchange(probe, probe):  # exchanging a name with itself is a no-op
            pytest.skip("renameat2(RENAME_EXCHANGE) is not available on this system")


@pytest.fixture(params=["exchange", "two-renames"])
def swap_mode(request, monkeypatch):
    use_swap_mode(request.param, monkeypatch)
    return request.param


def _mount_tmpfs(path: Path, size: int) -> None:
    path.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                              capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("no mount command here")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")


@contextlib.contextmanager
def small_disk(tmp_path: Path, size: int = 64 * 1024):
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, size)
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)])


def tiny_model(seed: int, alpha: float):
    torch.manual_seed(seed)
    model = prepare_model(torch.nn.Sequential(torch.nn.Linear(16, 8)), r=2, lora_alpha=alpha,
                          quant_type=None)
    with torch.no_grad():
        model[0].lora_B.normal_()  # not zero: the two versions differ in every tensor
    return model


def adapter_version(folder: Path):
    """Which model an adapter folder loads as: (alpha, A bytes), checked for a consistent pair."""
    model = load_adapter(torch.nn.Sequential(torch.nn.Linear(16, 8)), folder)
    return model[0].lora_alpha, model[0].lora_A.detach().numpy().tobytes()


def version_of(model):
    return model[0].lora_alpha, model[0].lora_A.detach().numpy().tobytes()


# ----------------------------------------------------------------------------- 1. the lock

@pytest.mark.parametrize("kind", ["symlink", "hardlink", "fifo", "foreign-data"])
def test_the_lock_never_writes_through_what_is_at_its_name(tmp_path, kind):
    out, victim = tmp_path / "out", tmp_path / "victim.txt"
    out.mkdir()
    victim.write_text("precious\n")
    lock = out / ckpt.LOCK_NAME
    if kind == "symlink":
        lock.symlink_to(victim)
    elif kind == "hardlink":
        os.link(victim, lock)
    elif kind == "fifo":
        os.mkfifo(lock)
    else:
        lock.write_text("precious\n")
        victim = lock
    with no_hang(), pytest.raises(ValueError, match="lock file") as info:
        with ckpt.output_lock(out):
            pass
    assert "\n" not in str(info.value)
    assert victim.read_text() == "precious\n", "the file behind the lock was changed"


def test_a_lock_file_of_ours_is_reused(tmp_path):
    (tmp_path / ckpt.LOCK_NAME).write_text("12345\n")  # left by a run that was killed
    with ckpt.output_lock(tmp_path):
        assert (tmp_path / ckpt.LOCK_NAME).read_text() == f"{os.getpid()}\n"


# ----------------------------------------------------------------------------- 2. checkpoint cleanup

def _tensors(step):
    return {"w": torch.full((4,), float(step))}


def test_a_symlinked_checkpoint_folder_is_refused_and_its_target_untouched(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    for name in ("step-000001", ".tmp-step-000002-1", ".old-step-000003-1", "step-000009"):
        (elsewhere / name).mkdir(parents=True)
        (elsewhere / name / "data").write_text("mine")
    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoint").symlink_to(elsewhere)
    before = sorted(p.relative_to(elsewhere) for p in elsewhere.rglob("*"))
    with pytest.raises(ValueError, match="is a symlink") as info:
        ckpt.save_checkpoint(out / "checkpoint", 5, _tensors(5), {})
    assert "\n" not in str(info.value)
    assert sorted(p.relative_to(elsewhere) for p in elsewhere.rglob("*")) == before


_foreign_names = st.one_of(
    st.integers(100, 10**7).map(lambda n: f"step-{n:06d}"),
    st.from_regex(r"\.tmp-[a-z0-9-]{1,12}", fullmatch=True),
    st.from_regex(r"\.old-[a-z0-9-]{1,12}", fullmatch=True),
    st.integers(1, 99).map(lambda n: f".tmp-step-{n:06d}-{os.getpid()}"),  # our pattern, no marker
    st.integers(1, 99).map(lambda n: f".old-step-{n:06d}-1"),
)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(names=st.sets(_foreign_names, min_size=1, max_size=4))
def test_checkpoint_cleanup_deletes_only_what_this_run_wrote(tmp_path_factory, monkeypatch, names):
    monkeypatch.setattr(os, "fsync", lambda fd: None)  # durability is not what this checks
    root = tmp_path_factory.mktemp("run") / "checkpoint"
    root.mkdir()
    for name in names:
        (root / name).mkdir()
        (root / name / "data").write_text(name)
    for step in (1, 2, 3, 4):
        ckpt.save_checkpoint(root, step, _tensors(step), {})
    for name in names:
        assert (root / name / "data").read_text() == name, f"{name} was deleted or changed"
    mine = sorted(p.name for p in root.iterdir() if p.name.startswith("step-0000") and p.name not in names)
    assert mine == ["step-000003", "step-000004"], mine  # this run's older ones are deleted
    assert ckpt.find_checkpoint(root) == (root / "step-000004", None)


def test_a_foreign_folder_swapped_in_under_a_name_we_wrote_is_kept(tmp_path):
    root = tmp_path / "checkpoint"
    ckpt.save_checkpoint(root, 1, _tensors(1), {})
    ckpt.save_checkpoint(root, 2, _tensors(2), {})
    os.rename(root / "step-000001", tmp_path / "ours")
    (root / "step-000001").mkdir()
    (root / "step-000001" / "data").write_text("theirs")
    ckpt.save_checkpoint(root, 3, _tensors(3), {})
    assert (root / "step-000001" / "data").read_text() == "theirs"


# ----------------------------------------------------------------------------- 3. kill -9 at every step

def _write_version(final: Path, text: str):
    with _atomic.atomic_directory(final) as tmp:
        (tmp / "a").write_text(text)
        (tmp / "b").write_text(text * 3)


def _folder_version(folder: Path):
    a, b = (folder / "a").read_text(), (folder / "b").read_text()
    assert b == a * 3, f"a torn folder: {a!r} / {b!r}"
    return a


@pytest.mark.slow
def test_a_killed_folder_swap_leaves_a_complete_copy_and_the_next_writer_cleans(tmp_path, swap_mode):
    out = tmp_path / "out"
    _write_version(out / "data", "old")
    (out / ".tmp-data-1").mkdir()  # a user's folder with our pattern but no marker: kept
    n = count_changes(lambda: _write_version(out / "data", "new"), tmp_path)
    _write_version(out / "data", "old")
    assert n > 5
    for k in range(1, n + 1):
        outcome, _ = run_killed(lambda: _write_version(out / "data", "new"), k, tmp_path)
        assert outcome == "killed"
        found = _atomic.complete_directory(out / "data")
        assert _folder_version(found) in ("old", "new"), k
        _write_version(out / "data", "old")  # the next run
        assert sorted(os.listdir(out)) == [".tmp-data-1", "data"], (k, sorted(os.listdir(out)))
        assert _folder_version(out / "data") == "old"
        assert not (out / "data" / _atomic.MARKER).exists()


@pytest.mark.slow
@pytest.mark.parametrize("mode,writer", [("exchange", "save_adapter"), ("two-renames", "save_adapter"),
                                         ("two-renames", "atomic_directory")])
def test_a_killed_adapter_save_leaves_a_loadable_adapter(tmp_path, monkeypatch, mode, writer):
    use_swap_mode(mode, monkeypatch)
    out = tmp_path / "out"
    old, new = tiny_model(0, 4.0), tiny_model(1, 8.0)

    def write(model):
        if writer == "save_adapter":
            save_adapter(model, out / "adapter")
        else:  # the pattern a training loop uses: fill a temporary folder, publish it whole
            with _atomic.atomic_directory(out / "adapter") as tmp:
                save_adapter(model, tmp)

    write(old)
    n = count_changes(lambda: write(new), tmp_path)
    write(old)
    versions = {version_of(old), version_of(new)}
    for k in range(1, n + 1):
        assert run_killed(lambda: write(new), k, tmp_path)[0] == "killed"
        with no_hang():
            assert adapter_version(out / "adapter") in versions, f"killed before change {k}"
        write(old)  # the next run restores or cleans, then writes
        assert sorted(os.listdir(out)) == ["adapter"], (k, sorted(os.listdir(out)))
        assert adapter_version(out / "adapter") == version_of(old)


@pytest.mark.slow
def test_a_killed_checkpoint_save_leaves_a_complete_checkpoint(tmp_path, monkeypatch):
    # a new step folder is renamed into place (no exchange): one swap mode covers it
    use_swap_mode("two-renames", monkeypatch)
    root = tmp_path / "checkpoint"
    extra = lambda step: (lambda folder: save_adapter(tiny_model(step, 4.0), folder / "adapter"))
    save = lambda step: ckpt.save_checkpoint(root, step, _tensors(step), {}, extra(step))
    save(1)
    n = count_changes(lambda: save(2), tmp_path)
    seen = set()
    for k in range(1, n + 1):
        shutil.rmtree(root)
        save(1)
        assert run_killed(lambda: save(2), k, tmp_path)[0] == "killed"
        with no_hang():
            folder, _ = ckpt.find_checkpoint(root)
        assert folder.name in ("step-000001", "step-000002"), k
        state, tensors = ckpt.read_checkpoint(folder)
        assert float(tensors["w"][0]) == state["step"]
        seen.add(folder.name)
        save(2)  # the resumed run saves that step again
        assert ckpt.find_checkpoint(root) == (root / "step-000002", None)
        leftovers = [p.name for p in root.iterdir() if p.name.startswith((".tmp-", ".old-"))]
        assert not leftovers, (k, leftovers)
    assert seen == {"step-000001", "step-000002"}  # kills both before and after the switch


# ----------------------------------------------------------------------------- 4. a full disk

def _big_state():
    return quantize_4bit(np.random.default_rng(0).standard_normal(200_000).astype(np.float32))


def _small_state():
    return quantize_4bit(np.linspace(-1, 1, 256, dtype=np.float32))


def test_quant_state_save_on_a_full_tmpfs_keeps_the_previous_file(tmp_path):
    with small_disk(tmp_path) as disk:
        _small_state().save(disk / "s.npz")
        with pytest.raises(OSError) as info:
            _big_state().save(disk / "s.npz")
        assert info.value.errno == errno.ENOSPC or "No space" in str(info.value)
        assert QuantState.load(disk / "s.npz").equals(_small_state())
        assert os.listdir(disk) == ["s.npz"], os.listdir(disk)


def _enospc_after(nbytes=100):
    """A writer to a file object or path that writes ``nbytes``, then fails with ENOSPC."""
    def failing(target, *args, **kwargs):
        if hasattr(target, "write"):
            target.write(b"x" * nbytes)
        else:
            Path(target).write_bytes(b"x" * nbytes)
        raise OSError(errno.ENOSPC, "No space left on device")
    return failing


def test_quant_state_save_when_the_disk_fills_keeps_the_previous_file(tmp_path, monkeypatch):
    _small_state().save(tmp_path / "s.npz")
    monkeypatch.setattr(np, "savez", _enospc_after())
    with pytest.raises(OSError):
        _big_state().save(tmp_path / "s.npz")
    assert QuantState.load(tmp_path / "s.npz").equals(_small_state())
    assert os.listdir(tmp_path) == ["s.npz"]


def _npy(tmp_path):
    np.save(tmp_path / "w.npy", np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32))
    return tmp_path / "w.npy"


def test_the_histogram_when_the_disk_fills_keeps_the_previous_png(tmp_path, capsys, monkeypatch):
    from matplotlib.figure import Figure

    png = tmp_path / "h.png"
    assert cli(capsys, "quantize", _npy(tmp_path), "--histogram", png)[0] == 0
    before = png.read_bytes()
    monkeypatch.setattr(Figure, "savefig", lambda self, target, **kw: _enospc_after()(target))
    code, _, err = cli(capsys, "quantize", _npy(tmp_path), "--histogram", png)
    assert code == 2 and "No space left" in one_line(err)
    assert png.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["h.png", "w.npy"]


def test_the_histogram_on_a_full_tmpfs_keeps_the_previous_png(tmp_path, capsys):
    npy = _npy(tmp_path)
    with small_disk(tmp_path, 96 * 1024) as disk:
        (disk / "h.png").write_bytes(b"\x89PNG old")
        (disk / "filler").write_bytes(b"\0" * (90 * 1024))
        code, _, err = cli(capsys, "quantize", npy, "--histogram", disk / "h.png")
        assert code == 2 and "No space left" in one_line(err)
        assert (disk / "h.png").read_bytes() == b"\x89PNG old"
        assert sorted(os.listdir(disk)) == ["filler", "h.png"]


def test_an_adapter_save_on_a_full_disk_keeps_the_previous_adapter(tmp_path, monkeypatch):
    old = tiny_model(0, 4.0)
    save_adapter(old, tmp_path / "adapter")
    import qlora_ref.nn.adapters as adapters

    real = adapters.write_atomic

    def failing(path, data):
        if Path(path).name == "adapter_model.safetensors":
            Path(path).write_bytes(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(adapters, "write_atomic", failing)
    with pytest.raises(OSError):
        save_adapter(tiny_model(1, 8.0), tmp_path / "adapter")
    assert adapter_version(tmp_path / "adapter") == version_of(old)
    assert os.listdir(tmp_path) == ["adapter"]


def test_an_adapter_save_on_a_full_tmpfs_keeps_the_previous_adapter(tmp_path):
    torch.manual_seed(0)
    small = prepare_model(torch.nn.Sequential(torch.nn.Linear(16, 8)), r=2, quant_type=None)
    big = prepare_model(torch.nn.Sequential(torch.nn.Linear(4096, 4096)), r=8, quant_type=None)
    with small_disk(tmp_path) as disk:
        save_adapter(small, disk / "adapter")
        with pytest.raises(OSError):
            save_adapter(big, disk / "adapter")
        assert adapter_version(disk / "adapter") == version_of(small)
        assert os.listdir(disk) == ["adapter"]


def test_atomic_writes_replace_a_symlink_at_the_final_name_never_its_target(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    link = tmp_path / "out.npz"
    link.symlink_to(victim)
    _small_state().save(link)
    assert victim.read_text() == "precious" and not link.is_symlink()
    assert QuantState.load(link).equals(_small_state())


# ----------------------------------------------------------------------------- 5. the installed package

def test_nothing_writes_into_the_installed_package(tmp_path, capsys, monkeypatch):
    npy = _npy(tmp_path)
    before = sorted(p.relative_to(PACKAGE) for p in PACKAGE.rglob("*") if "__pycache__" not in p.parts)
    monkeypatch.chdir(PACKAGE)
    for argv in (["quantize", npy, "--histogram", "h.png"],
                 ["quantize", npy, "--histogram", PACKAGE / "assets" / "h.png"],
                 ["compare", "--quick"],  # its default --output-dir runs/compare
                 ["compare", "--quick", "--output-dir", PACKAGE / "x"],
                 ["pretrain", "--steps", "1", "--output", "base.safetensors"]):
        code, _, err = cli(capsys, *argv)
        assert code == 2 and "inside the installed package" in one_line(err), (argv, err)
    after = sorted(p.relative_to(PACKAGE) for p in PACKAGE.rglob("*") if "__pycache__" not in p.parts)
    assert after == before


def test_refuse_inside_package_follows_symlinks_of_parents(tmp_path):
    (tmp_path / "link").symlink_to(PACKAGE)
    with pytest.raises(ValueError, match="inside the installed package"):
        _atomic.refuse_inside_package(tmp_path / "link" / "new" / "file.png")
    _atomic.refuse_inside_package(tmp_path / "new" / "file.png")  # elsewhere: fine


# ----------------------------------------------------------------------------- 6. non-regular inputs

def _checkpoint_with(tmp_path, member: str, kind: str) -> Path:
    root = tmp_path / "checkpoint"
    ckpt.save_checkpoint(root, 1, _tensors(1), {})
    target = root / member if member == "LATEST" else root / "step-000001" / member
    target.unlink()
    hostile(target, kind)
    return root


@pytest.mark.parametrize("kind", HOSTILE)
@pytest.mark.parametrize("member", ["LATEST", "manifest.json", "trainer_state.json",
                                    "training_state.safetensors"])
def test_checkpoint_readers_refuse_non_regular_files(tmp_path, member, kind):
    root = _checkpoint_with(tmp_path, member, kind)
    with no_hang():
        if member == "LATEST":
            with pytest.raises(ValueError, match="not a regular file") as info:
                ckpt.save_checkpoint(root, 2, _tensors(2), {})  # every save reads LATEST first
            assert "\n" not in str(info.value)
            folder, note = ckpt.find_checkpoint(root)  # resume falls back, saying why
            assert folder.name == "step-000001" and "not a regular file" in note
        else:
            with pytest.raises(ckpt.CheckpointError) as info:
                ckpt.read_checkpoint(root / "step-000001")
            assert "\n" not in str(info.value)
            with pytest.raises(ckpt.CheckpointError):
                ckpt.find_checkpoint(root)


@pytest.mark.parametrize("kind", HOSTILE)
def test_quant_state_load_refuses_non_regular_files(tmp_path, kind):
    with no_hang(), pytest.raises(ValueError, match="not a regular file"):
        QuantState.load(hostile(tmp_path / "s.npz", kind))


@pytest.mark.parametrize("kind", HOSTILE)
@pytest.mark.parametrize("name", ["w.npy", "w.safetensors"])
def test_quantize_refuses_non_regular_inputs(tmp_path, capsys, kind, name):
    with no_hang():
        code, _, err = cli(capsys, "quantize", hostile(tmp_path / name, kind))
    assert code == 2 and "not a regular file" in one_line(err)


@settings(max_examples=30, deadline=None)
@given(kind=st.sampled_from(HOSTILE), size=st.integers(0, 4096), follow=st.booleans())
def test_read_regular_file_reads_files_and_refuses_the_rest(tmp_path_factory, kind, size, follow):
    folder = tmp_path_factory.mktemp("read")
    (folder / "f").write_bytes(b"a" * size)
    with no_hang():
        assert _atomic.read_regular_file(folder / "f", 4096, follow_symlinks=follow) == b"a" * size
        with pytest.raises(ValueError, match="larger than"):
            _atomic.read_regular_file(folder / "f", size - 1) if size else _atomic.read_regular_file(
                folder / "f", -1)
        with pytest.raises(ValueError) as info:
            _atomic.read_regular_file(hostile(folder / "h", kind), 4096, "config",
                                      follow_symlinks=follow)
        assert "\n" not in str(info.value) and "config" in str(info.value)
