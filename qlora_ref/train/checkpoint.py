r"""Training checkpoints that survive a kill, a full disk and a hostile file.

A checkpoint is one folder, written next to the previous one and switched
into place only when it is complete (the write-fsync-rename discipline of
databases and of ``git``'s object store). Nothing in it is a pickle:
tensors are safetensors, everything else JSON, so reading a checkpoint runs
no code. The layout under a run's output folder::

    OUTPUT_DIR/
      .qlora-ref.lock                   flock'ed by the run writing here (see output_lock)
      checkpoint/                       what --resume takes (OUTPUT_DIR works too)
        LATEST                          "step-000010": the complete checkpoint to resume
        step-000008/                    the previous complete one, kept as a fallback
        step-000010/
          training_state.safetensors    trainable weights, optimizer tensors, RNG states
          trainer_state.json            step, loss history, config, optimizer index, seconds
          adapter/                      the adapters in PEFT's layout (adapter_config.json,
                                        adapter_model.safetensors)
          manifest.json                 written last: the step, and bytes + sha256 of each file
        .tmp-step-000012-<pid>-<random>/ being written (marked, see qlora_ref._atomic); a later
                                        save deletes a leftover one once its writer is gone

Saving step ``s``: write every file into ``.tmp-step-s-<pid>-<random>`` and fsync it;
write ``manifest.json`` last; publish the folder as ``step-s``
(:func:`qlora_ref._atomic.atomic_directory`); write ``LATEST.tmp`` and rename
it over ``LATEST`` (an atomic switch); then delete the ``step-`` folders this
process wrote before, except the new one and the one ``LATEST`` named before.
A kill at any moment leaves ``LATEST`` naming a complete checkpoint (the old
one or the new one), and the previous complete one on disk.

Note (what cleanup deletes): only folders this process wrote into this
``checkpoint`` folder -- recorded in memory with their inode when published,
and still the same folder, holding our manifest -- and the marked temporary
folders of dead writers. A ``step-`` folder someone else put there, or one
an earlier run wrote, is never deleted -- except that a resumed run adopts
the checkpoint it resumes from and the one that checkpoint's manifest
records as kept beside it (:func:`adopt_checkpoint`: same name, same
manifest sha256), so resuming leaves no old checkpoint behind. A ``checkpoint`` folder that is a symlink is
refused, so nothing is written or deleted outside the output folder.

Note (hostile files): ``LATEST``, ``manifest.json``, ``trainer_state.json``
and the tensors are read only when they are regular files
(:func:`qlora_ref._atomic.read_regular_file`): a FIFO, a device or a
symlink to ``/dev/zero`` is one ``CheckpointError`` line, never a hang.

Resuming verifies the manifest (every file present, its size and sha256,
the step in ``trainer_state.json``). A folder that fails is refused with one
line naming the file; given the ``checkpoint`` folder (not one ``step-``
folder), resuming falls back to the newest other complete checkpoint and
says so.

Test hook (fault injection): ``QLORA_REF_FAULT_AFTER=POINT[:half][@STEP]``
makes the writer SIGKILL its own process at ``POINT`` (only while saving step
``STEP``, if given), so tests can kill a real run at a known place. POINT is
a file of the checkpoint (``training_state.safetensors``,
``trainer_state.json``, ``adapter/adapter_config.json``,
``adapter/adapter_model.safetensors``, ``manifest.json``): killed right after
that file is written into the temporary folder, or with ``:half`` after
cutting it to half its length (a kill in the middle of the write); ``rename``:
after the folder is renamed into place, before ``LATEST`` switches;
``LATEST``: after ``LATEST.tmp`` is written; ``published``: after ``LATEST``
switched, before old folders are deleted; ``step``: after optimizer step
``STEP`` (see :mod:`qlora_ref.train.finetune`); the ``swap.*`` points of the
folder swap (:mod:`qlora_ref._atomic`). Never set it outside tests.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import stat
from pathlib import Path
from typing import Callable, Optional

from qlora_ref import _atomic  # absolute: tests load this file on its own
from qlora_ref._atomic import (FAULT_ENV, atomic_directory, fsync_path, open_regular_file,
                               read_regular_file, recover_directory, refuse_symlink,
                               replace_directory_atomically)
from qlora_ref.train.training_state import (  # noqa: F401  (part of this module's API)
    CheckpointError, _step_value, check_optimizer_fits, optimizer_state_from_tensors,
    optimizer_state_to_tensors, validate_training_state)
from qlora_ref.validation import is_int

__all__ = [
    "CheckpointError", "DiskFullError", "save_checkpoint", "find_checkpoint", "read_checkpoint",
    "adopt_checkpoint",
    "verify_checkpoint", "latest_checkpoint", "output_lock", "replace_directory",
    "optimizer_state_to_tensors", "optimizer_state_from_tensors", "sha256_file", "fault_point",
    "disk_full_guard", "LOCK_NAME", "FAULT_ENV", "validate_training_state", "check_optimizer_fits",
]

STATE_TENSORS = "training_state.safetensors"
TRAINER_STATE = "trainer_state.json"
MANIFEST = "manifest.json"
LATEST = "LATEST"
LOCK_NAME = ".qlora-ref.lock"
FORMAT = "qlora_ref.checkpoint"
VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d+)$")
_LEFTOVER = re.compile(r"^\.(?:tmp|old)-(step-\d+)-\d+-[0-9a-f]{8}$")
_MAX_SMALL = 64                 # bytes of LATEST, of the lock file
_MAX_JSON = 64 << 20            # bytes of manifest.json / trainer_state.json
#: step folders this process published or resumed from (and the one each recorded as its
#: predecessor), per checkpoint folder: {root: {name: (st_dev, st_ino)}}
_WRITTEN: dict = {}


class DiskFullError(OSError):
    """No space left on the device while writing outputs (the previous checkpoint is intact)."""


# ----------------------------------------------------------------------------- test hook

def fault_point(point: str, step: int, path: Optional[Path] = None) -> None:
    """Test hook: SIGKILL this process if ``QLORA_REF_FAULT_AFTER`` names ``point`` (and ``step``).

    ``path`` is the file just written; with ``:half`` it is first cut to half
    its length, which is what a kill in the middle of writing it leaves.
    """
    _atomic.fault_point(point, step, path)


# ----------------------------------------------------------------------------- small file-system helpers

_fsync_path = fsync_path


def _write_bytes(path: Path, data: bytes) -> None:
    """Create ``path`` (it must not exist) with ``data`` and fsync it; a short write is an error."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    """The sha256 of the regular file ``path`` (anything else: one ``ValueError`` line, no hang)."""
    h = hashlib.sha256()
    with open_regular_file(path) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _is_disk_full(exc: BaseException) -> bool:
    # OSError from Python's own writes carries errno; safetensors' Rust writer only says it in words
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    return "No space left on device" in text or "os error 28" in text or "Disk quota exceeded" in text


def _free_bytes(path: Path) -> Optional[int]:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


@contextlib.contextmanager
def disk_full_guard(what: str, where: Path, keep: str = ""):
    """Turn "no space left on device" raised inside the block into one :class:`DiskFullError` line."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as exc:
        if not _is_disk_full(exc):
            raise
        free = _free_bytes(where)
        error = DiskFullError(f"disk full: no space left on device while writing {what} in {where}"
                              + (f" ({free:,} bytes free)" if free is not None else "")
                              + (f"; {keep}" if keep else ""))
        error.errno = errno.ENOSPC
        raise error from None


def _rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def replace_directory(new: Path, final: Path) -> None:
    """Move the complete folder ``new`` to ``final``, replacing what is there (the old one goes last).

    Recovers what a killed earlier swap of ``final`` left, then swaps
    (:func:`qlora_ref._atomic.replace_directory_atomically`): a kill at any
    point leaves a complete ``final`` or a complete marked copy the next
    writer restores. A ``final`` that is a symlink is refused.
    """
    new, final = Path(new), Path(final)
    recover_directory(final, exclude=new)
    replace_directory_atomically(new, final)


# ----------------------------------------------------------------------------- the lock

@contextlib.contextmanager
def output_lock(directory: Path):
    """Hold an exclusive ``flock`` on ``DIRECTORY/.qlora-ref.lock`` while the block runs.

    A second run into the same folder is refused with one line naming the
    holder's pid. The kernel drops the lock when its holder exits, however it
    exits, so a killed run never leaves a stale lock. (On a system without
    ``fcntl`` there is no lock.)
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    directory = Path(directory)
    path = directory / LOCK_NAME
    flags = (os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
             | getattr(os, "O_CLOEXEC", 0))
    try:  # never through a symlink; O_NONBLOCK: a FIFO planted here does not block the open
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP or os.path.islink(path):
            raise ValueError(f"lock file {path} is a symlink; refusing to write through it "
                             "(remove it)") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            what = ("a regular file with other hard links" if stat.S_ISREG(st.st_mode)
                    else _atomic._kind(st.st_mode))
            raise ValueError(f"lock file {path} is {what}, not a lock file of qlora-ref; refusing "
                             "to write to it (remove it)")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise RuntimeError(f"{directory} is in use by another qlora-ref run (pid {holder}); "
                               "wait for it to finish or choose another --output-dir") from None
        held = os.pread(fd, _MAX_SMALL + 1, 0)
        if not re.fullmatch(rb"\d*\n?", held):  # ours hold a pid: never truncate anything else
            raise ValueError(f"lock file {path} holds other data than a pid; refusing to "
                             "overwrite it (remove it if it is not needed)")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the last descriptor releases the flock


# ----------------------------------------------------------------------------- writing

def _step_name(step: int) -> str:
    return f"step-{step:06d}"


def _read_latest(root: Path) -> Optional[str]:
    """The step folder ``root/LATEST`` names; None if it is missing or garbled.

    Raises :class:`CheckpointError` (one line) if ``LATEST`` is not a regular
    file: a FIFO there would block a plain read forever.
    """
    try:
        name = read_regular_file(root / LATEST, _MAX_SMALL, "checkpoint pointer").decode().strip()
    except ValueError as exc:
        if isinstance(exc, UnicodeDecodeError):
            return None
        raise CheckpointError(str(exc)) from None
    except OSError:
        return None
    return name if _STEP_DIR.match(name) else None


def _same_folder(path: Path, ident: tuple) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and (st.st_dev, st.st_ino) == ident


def _record(root: Path, name: str) -> None:
    """Note ``root/name`` (a real folder now) as one this run may delete later."""
    st = os.lstat(root / name)
    _WRITTEN.setdefault(str(root.resolve()), {})[name] = (st.st_dev, st.st_ino)


def _predecessor(root: Path, previous: Optional[str]) -> Optional[dict]:
    """The manifest's record of the checkpoint kept beside a new one, if this run owns it.

    ``{"name": "step-N", "manifest_sha256": ...}``: a run resuming from the new
    checkpoint adopts that folder too (:func:`adopt_checkpoint`), so it is
    deleted in turn instead of staying behind forever.
    """
    written = _WRITTEN.get(str(root.resolve()), {})
    if not previous or previous not in written or not _same_folder(root / previous, written[previous]):
        return None
    try:
        return {"name": previous, "manifest_sha256": sha256_file(root / previous / MANIFEST)}
    except (OSError, ValueError):
        return None


def adopt_checkpoint(folder: Path) -> None:
    """Let this run delete, in time, the checkpoint it resumes from and the one that recorded as kept.

    A resumed run continues the run that wrote ``folder``: after its next two
    saves, ``folder`` and the older checkpoint ``folder``'s manifest records as
    its predecessor (``"previous"``: name and the sha256 of its manifest) are
    old checkpoints of this training run, and cleanup removes them as it
    removes its own. Only a ``step-N`` folder directly beside ``folder``, a real
    folder whose manifest has exactly the recorded sha256, is adopted; a
    folder someone else put there never matches.
    """
    folder = Path(folder)
    root = folder.parent
    if not _STEP_DIR.match(folder.name) or not _is_real_folder(folder):
        return
    _record(root, folder.name)
    try:
        manifest = json.loads(read_regular_file(folder / MANIFEST, _MAX_JSON, "checkpoint manifest"))
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        return
    previous = manifest.get("previous") if isinstance(manifest, dict) else None
    if not isinstance(previous, dict):
        return
    name, digest = previous.get("name"), previous.get("manifest_sha256")
    if not (isinstance(name, str) and _STEP_DIR.match(name) and isinstance(digest, str)
            and name != folder.name and _is_real_folder(root / name)):
        return
    try:
        if sha256_file(root / name / MANIFEST) != digest:
            return
    except (OSError, ValueError):
        return
    _record(root, name)


def _is_real_folder(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def _clean(root: Path, keep: set) -> None:
    """Delete the step folders this process wrote into ``root`` (but ``keep``), and dead writers' leftovers."""
    written = _WRITTEN.get(str(root.resolve()), {})
    for name, ident in list(written.items()):
        if name in keep:
            continue
        folder = root / name
        if _same_folder(folder, ident) and os.path.isfile(folder / MANIFEST):
            _rmtree(folder)
        written.pop(name, None)
    for entry in os.scandir(root):
        m = _LEFTOVER.match(entry.name)
        if m and m.group(1) not in keep:
            recover_directory(root / m.group(1))  # only marked folders of dead writers


def save_checkpoint(root: Path, step: int, tensors: dict, trainer_state: dict,
                    write_extra: Optional[Callable[[Path], None]] = None) -> Path:
    """Write a complete checkpoint of ``step`` under ``root`` and switch ``LATEST`` to it.

    Parameters
    ----------
    root : path
        The ``checkpoint`` folder (created if needed).
    step : int
    tensors : dict of str to torch.Tensor
        Everything numeric: trainable weights, optimizer moments, RNG states.
    trainer_state : dict
        JSON-serialisable; ``step`` is added.
    write_extra : callable, optional
        ``write_extra(folder)`` writes more files (the PEFT adapter) into the new folder.

    Returns
    -------
    pathlib.Path
        The new ``step-NNNNNN`` folder.

    Raises
    ------
    DiskFullError
        When the device is full; the partial folder is deleted and the previous checkpoint kept.
    """
    from safetensors.torch import save as safetensors_bytes

    root = Path(root)
    refuse_symlink(root, "checkpoint folder")
    root.mkdir(parents=True, exist_ok=True)
    name = _step_name(step)
    previous = _read_latest(root)
    final = root / name
    keep = (f"the previous checkpoint {root / previous} is intact" if previous
            else "no earlier checkpoint exists")
    with disk_full_guard(f"checkpoint {name}", root, keep):
        with atomic_directory(final) as tmp:  # a folder of this step left by a killed run is replaced
            files = []

            def add(rel: str, data: bytes) -> None:
                _write_bytes(tmp / rel, data)
                files.append(rel)
                fault_point(rel, step, tmp / rel)

            add(STATE_TENSORS, safetensors_bytes(tensors, metadata={"format": "pt"}))
            add(TRAINER_STATE, json.dumps({"format": FORMAT, "version": VERSION, **trainer_state,
                                           "step": step}, indent=1).encode())
            if write_extra is not None:
                write_extra(tmp)
                extra = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*")
                               if p.is_file() and p.name != _atomic.MARKER
                               and str(p.relative_to(tmp)) not in files)
                for rel in extra:
                    _fsync_path(tmp / rel)
                    files.append(rel)
                    fault_point(rel, step, tmp / rel)
                for sub in {p.parent for p in tmp.rglob("*") if p.is_file()}:
                    _fsync_path(sub)
            manifest = {"format": FORMAT + ".manifest", "version": VERSION, "step": step,
                        "files": {rel: {"bytes": (tmp / rel).stat().st_size,
                                        "sha256": sha256_file(tmp / rel)} for rel in files}}
            kept = _predecessor(root, previous)
            if kept is not None:
                manifest["previous"] = kept
            add(MANIFEST, json.dumps(manifest, indent=1).encode())  # last: the folder is complete
            _fsync_path(tmp)
        _record(root, name)
        fault_point("rename", step)
        pointer = root / (LATEST + ".tmp")
        if os.path.lexists(pointer):  # left by a writer killed here before (a file, not a folder)
            if os.path.isdir(pointer) and not os.path.islink(pointer):
                raise CheckpointError(f"{pointer} is a folder; refusing to replace it")
            os.unlink(pointer)
        _write_bytes(pointer, (name + "\n").encode())
        fault_point(LATEST, step, pointer)
        os.replace(pointer, root / LATEST)  # the atomic switch
        _fsync_path(root)
        fault_point("published", step)
    # keep the new checkpoint and the one before it; delete only what this process wrote
    _clean(root, {name, previous})
    return final


# ----------------------------------------------------------------------------- reading

def verify_checkpoint(folder: Path) -> dict:
    """Check a ``step-`` folder against its manifest; return the manifest.

    Raises
    ------
    CheckpointError
        One line naming the first file that is missing, torn or changed.
    """
    folder = Path(folder)
    path = folder / MANIFEST
    if not os.path.lexists(path):
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete (torn)")
    try:
        manifest = json.loads(read_regular_file(path, _MAX_JSON, "checkpoint manifest"))
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT + ".manifest":
            raise KeyError("format")
        files, step = manifest["files"], _step_value(manifest.get("step"), "its step")
        if not isinstance(files, dict):
            raise TypeError("its files are not an object")
        for rel, entry in files.items():
            if not (isinstance(entry, dict) and is_int(entry.get("bytes"))
                    and isinstance(entry.get("sha256"), str)):
                raise TypeError(f"its entry for {rel!r} is not {{bytes: int, sha256: str}}")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{path} is not a qlora_ref checkpoint manifest ({exc})") from None
    named = _STEP_DIR.match(folder.name)
    if named and int(named.group(1)) != step:
        raise CheckpointError(f"{path} says step {step}, but the folder is named {folder.name}: "
                              "the checkpoint is inconsistent")
    for rel, entry in files.items():
        file = folder / rel
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise CheckpointError(f"{path} names a file outside the checkpoint: {rel!r}")
        if not os.path.lexists(file):
            raise CheckpointError(f"{file} is missing: the checkpoint is incomplete (torn)")
        try:
            size = _atomic.check_regular_file(file, "checkpoint file").st_size
        except (ValueError, OSError) as exc:
            raise CheckpointError(str(exc)) from None
        if size != entry.get("bytes"):
            raise CheckpointError(f"{file} is torn or modified: {size} bytes, the manifest says "
                                  f"{entry.get('bytes')}")
        try:
            digest = sha256_file(file)
        except ValueError as exc:
            raise CheckpointError(str(exc)) from None
        if digest != entry.get("sha256"):
            raise CheckpointError(f"{file} is torn or modified: its sha256 differs from the manifest's")
    for required in (STATE_TENSORS, TRAINER_STATE):
        if required not in files:
            raise CheckpointError(f"{path} does not list {required}")
    return {**manifest, "step": step}


def _step_folders(root: Path) -> list:
    found = []
    for entry in root.iterdir() if root.is_dir() else []:
        m = _STEP_DIR.match(entry.name)
        if m and entry.is_dir():
            found.append((int(m.group(1)), entry))
    return [p for _, p in sorted(found, reverse=True)]


def _is_root(path: Path) -> bool:
    """Whether ``path`` is a ``checkpoint`` folder: it has ``LATEST`` or a ``step-`` folder."""
    return (path / LATEST).exists() or bool(_step_folders(path))


def latest_checkpoint(root: Path) -> Optional[Path]:
    """The folder ``root/LATEST`` names, or None."""
    name = _read_latest(Path(root))
    return Path(root) / name if name else None


def find_checkpoint(path: str | os.PathLike) -> tuple[Path, Optional[str]]:
    """Resolve what ``--resume`` was given to one verified ``step-`` folder.

    ``path`` may be a ``step-`` folder (used as it is, or refused), the
    ``checkpoint`` folder, or the run's output folder.

    Returns
    -------
    (folder, note)
        ``note`` is None, or one line saying that a fallback was taken and why.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if (path / MANIFEST).exists() or _STEP_DIR.match(path.name):
        verify_checkpoint(path)  # asked for by name: this one or none
        return path, None
    if not _is_root(path) and (path / "checkpoint").is_dir():
        path = path / "checkpoint"  # the run's output folder
    if not _is_root(path):
        if (path / "training_state.pt").is_file():
            raise CheckpointError(
                f"{path / 'training_state.pt'} is an old-format checkpoint (a pickle, which qlora_ref "
                "no longer loads because unpickling can run code); start a new run")
        raise FileNotFoundError(f"no checkpoint in {path} (no {LATEST} file and no step-* folder)")
    candidates = _step_folders(path)
    try:
        named = latest_checkpoint(path)
    except CheckpointError as exc:
        named, unreadable = None, str(exc)
    else:
        unreadable = f"{path / LATEST} is missing or unreadable"
    problem = None
    if named is not None:
        try:
            verify_checkpoint(named)
            return named, None
        except CheckpointError as exc:
            problem = str(exc)
    else:
        problem = unreadable
    for folder in candidates:
        if named is not None and folder == named:
            continue
        try:
            verify_checkpoint(folder)
        except CheckpointError:
            continue
        return folder, f"{problem}; resuming from the previous complete checkpoint {folder}"
    raise CheckpointError(problem + "; no other complete checkpoint in " + str(path))


def read_checkpoint(folder: Path) -> tuple[dict, dict]:
    """Load a verified checkpoint folder: (trainer state from JSON, tensors from safetensors).

    Neither format can carry code: a crafted file is refused, never run.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load as load_tensors

    folder = Path(folder)
    manifest = verify_checkpoint(folder)
    try:
        state = json.loads(read_regular_file(folder / TRAINER_STATE, _MAX_JSON, "trainer state"))
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise ValueError("not a qlora_ref trainer state")
        if _step_value(state.get("step"), "its step") != manifest["step"]:
            raise CheckpointError(f"{folder / TRAINER_STATE} says step {state['step']}, the manifest "
                                  f"step {manifest['step']}: the checkpoint is inconsistent")
    except CheckpointError:
        raise
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{folder / TRAINER_STATE} is not readable: {exc}") from None
    try:  # the bytes read are the bytes hashed: a file swapped after verification is refused
        size = manifest["files"][STATE_TENSORS]["bytes"]
        data = read_regular_file(folder / STATE_TENSORS, size, "checkpoint tensors")
        if hashlib.sha256(data).hexdigest() != manifest["files"][STATE_TENSORS]["sha256"]:
            raise CheckpointError(f"{folder / STATE_TENSORS} changed after it was verified")
        tensors = load_tensors(data)
    except CheckpointError:
        raise
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{folder / STATE_TENSORS} is not a readable safetensors file: "
                              f"{exc}") from None
    try:
        validate_training_state(state, tensors)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{folder}: {exc}") from None
    return state, tensors
