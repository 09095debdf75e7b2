r"""Files and folders written whole or not at all; files read only when they are regular files.

Writing a file: a temporary file beside the target (created with
``O_EXCL | O_NOFOLLOW``, so a symlink planted at its name is never followed),
fsync, ``os.replace``, fsync of the folder. A kill, a crash or a full disk in
the middle leaves the previous file as it was (or no file), never a torn one
at the final name, and a symlink at the final name is replaced, not written
through. A temporary file a killed writer left (``.STEM.tmp-PID-TAG.SUFFIX``,
its tag a hash of the name and pid, so only names this module gives match)
is removed by the next write of the same file. Every file the package writes for a user goes through
:func:`atomic_file` / :func:`atomic_path` / :func:`write_atomic`.

Writing a folder (an adapter, a checkpoint): :func:`atomic_directory` yields
a temporary folder ``.tmp-NAME-PID-RANDOM`` beside ``NAME``; when the block ends it
is published by :func:`replace_directory_atomically`. Every folder this
module creates or moves aside carries a marker file (:data:`MARKER`, JSON:
the final name and whether the copy is complete); only a folder whose name
matches ``.tmp-NAME-PID-RANDOM`` / ``.old-NAME-PID-RANDOM`` *and* that holds such a
marker (or nothing but the marker's own temporary file: a kill between
``mkdir`` and the marker), written by a process that is gone, is ever
deleted or restored (:func:`recover_directory`), so a user's own
``.tmp-foo`` is never touched.

Note (the swap, step by step, and what a kill at each step leaves)::

    1  .tmp-NAME-PID-RANDOM/ + marker {complete: false}  kill: tmp deleted by the next run
    2  the writer fills it; fsync; marker {complete: true}
    3  marker {complete: true} written into NAME/ (the old copy)
    4a renameat2(RENAME_EXCHANGE): NAME <-> .tmp   kill: NAME is new, .tmp holds the
                                                    marked old copy (deleted next run)
    4b (no exchange) NAME -> .old-NAME-PID-RANDOM  kill: no NAME; the next run or a
                                                    reader restores the complete .tmp
       .tmp -> NAME                                 kill: NAME is new, .old deleted next run
    5  marker removed from NAME; the old copy deleted

At every point either ``NAME`` is a complete copy (old or new), or a
complete marked copy sits beside it and :func:`recover_directory` (every
writer, first) or :func:`complete_directory` (a reader, without writing)
finds it. Linux's ``renameat2(RENAME_EXCHANGE)`` (ext4, xfs, btrfs, tmpfs)
swaps two folders in one step; elsewhere the two renames of 4b leave a gap
that recovery closes. A marker left inside ``NAME`` is stale and removed by
the next writer; readers ignore it.

Reading: :func:`open_regular_file` / :func:`read_regular_file` refuse a
FIFO, a device, a folder or a symlink to one (``/dev/zero``) with one
``ValueError`` line and never block: ``stat`` first, then ``open`` with
``O_NONBLOCK`` and ``fstat`` of what was opened (the name may change between).

Test hook: ``QLORA_REF_FAULT_AFTER=POINT`` (see :func:`fault_point` and
:mod:`qlora_ref.train.checkpoint`) SIGKILLs the process at ``swap.*`` points
of the folder swap: ``swap.begun`` (step 1), ``swap.filled`` (2),
``swap.old-marked`` (3), ``swap.aside`` (between the renames of 4b),
``swap.renamed`` (after 4a/4b), ``swap.unmarked`` (after 5's marker removal).
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import io
import json
import os
import re
import secrets
import shutil
import signal
import stat
from pathlib import Path
from typing import Optional

__all__ = ["regular_file_path", "write_atomic", "atomic_path", "atomic_file", "atomic_directory",
           "replace_directory_atomically", "recover_directory", "complete_directory",
           "is_temporary_directory", "is_marker_part",
           "read_regular_file", "open_regular_file", "check_regular_file", "refuse_inside_package",
           "refuse_symlink", "fsync_path", "fault_point", "MARKER", "FAULT_ENV"]

#: Test hook: SIGKILL this process at a named write step (never set it outside tests).
FAULT_ENV = "QLORA_REF_FAULT_AFTER"
#: The marker file in every folder this module creates or moves aside.
MARKER = ".qlora-ref-swap.json"
_MARKER_FORMAT = "qlora_ref.directory-swap"
_MARKER_MAX = 4096


# ----------------------------------------------------------------------------- test hook

def fault_point(point: str, step: Optional[int] = None, path: Optional[Path] = None) -> None:
    """Test hook: SIGKILL this process if ``QLORA_REF_FAULT_AFTER`` names ``point`` (and ``step``).

    The value is ``POINT[:half][@STEP]``; ``path`` is the file just written,
    and with ``:half`` it is first cut to half its length (what a kill in the
    middle of writing it leaves).
    """
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    target, _, at_step = spec.partition("@")
    target, _, mode = target.partition(":")
    if target != point or (at_step and (step is None or int(at_step) != step)):
        return
    if mode == "half" and path is not None:
        with open(path, "r+b") as f:
            f.truncate(os.fstat(f.fileno()).st_size // 2)
            f.flush()
            os.fsync(f.fileno())
    os.kill(os.getpid(), signal.SIGKILL)


# ----------------------------------------------------------------------------- reading

def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symlink")):
        if test(mode):
            return name
    return "not a regular file"


def check_regular_file(path, what: str = "file", follow_symlinks: bool = True) -> os.stat_result:
    """``os.stat(path)`` if ``path`` is a regular file, else one ``ValueError`` line (never blocks).

    A missing file is ``FileNotFoundError``; with ``follow_symlinks=False`` a symlink is refused.
    """
    try:
        st = os.stat(path, follow_symlinks=follow_symlinks)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} does not exist") from None
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{what} {path} is {_kind(st.st_mode)}, not a regular file; refusing to read it")
    return st


def open_regular_file(path, what: str = "file", follow_symlinks: bool = True) -> io.BufferedReader:
    """Open ``path`` for binary reading if it is a regular file; one ``ValueError`` line if not.

    Checked before the open (so a FIFO never blocks it), opened with
    ``O_NONBLOCK`` (a FIFO swapped in meanwhile does not block either) and
    checked again on the descriptor (what was opened is what is read).
    """
    check_regular_file(path, what, follow_symlinks)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    if not follow_symlinks:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ValueError(f"{what} {path} is a symlink; refusing to read it") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{what} {path} is {_kind(st.st_mode)}, not a regular file; "
                             "refusing to read it")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)  # a regular file: ordinary reads from here on
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


@contextlib.contextmanager
def regular_file_path(path, what: str = "file", follow_symlinks: bool = True):
    """Yield a path naming exactly the regular file ``path`` names now, to hand to a library.

    Libraries (``safetensors.safe_open``, ``load_file``) open by name, so a
    check before them leaves a gap: a FIFO swapped in between would block the
    library's open. Here the file is opened once with :func:`open_regular_file`
    (never blocks, checked on the descriptor) and the library is given
    ``/proc/self/fd/N``, which reopens that very file, whatever ``path`` names
    by then. Where ``/proc`` is missing the checked ``path`` itself is yielded.
    """
    with open_regular_file(path, what, follow_symlinks) as f:
        by_descriptor = f"/proc/self/fd/{f.fileno()}"
        yield by_descriptor if os.path.exists(by_descriptor) else os.fspath(path)


def read_regular_file(path, max_bytes: int, what: str = "file",
                      follow_symlinks: bool = True) -> bytes:
    """The bytes of the regular file ``path``, at most ``max_bytes`` of them.

    Raises
    ------
    ValueError
        One line, when ``path`` is not a regular file (FIFO, device, folder,
        a symlink to one) or holds more than ``max_bytes``.
    FileNotFoundError
        When it does not exist.
    """
    with open_regular_file(path, what, follow_symlinks) as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"{what} {path} is larger than {max_bytes:,} bytes; refusing to read it")
    return data


# ----------------------------------------------------------------------------- path policies

def _package_dir() -> Path:
    return Path(__file__).resolve().parent


def refuse_inside_package(path, what: str = "output") -> None:
    """Raise one ``ValueError`` line if ``path`` lies inside the installed ``qlora_ref`` package.

    ``path`` is resolved first (relative to the working directory, through
    the symlinks of its existing parents), so ``runs/x`` run from inside the
    package folder, or a link into it, is caught too. Creates nothing.
    """
    package = _package_dir()
    resolved = Path(path).resolve()
    if resolved == package or package in resolved.parents:
        raise ValueError(f"refusing to write {what} {path} inside the installed package ({package}); "
                         "choose a path outside it")


def refuse_symlink(path, what: str = "folder") -> None:
    """Raise one ``ValueError`` line if ``path`` is a symlink (writing through it would leave the output folder)."""
    if os.path.islink(path):
        raise ValueError(f"{what} {path} is a symlink (to {os.readlink(path)}); refusing to write "
                         "through it: remove the link or choose another output folder")


# ----------------------------------------------------------------------------- files

def fsync_path(path) -> None:
    """fsync a file or a folder (a folder's fsync makes the names in it durable)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    try:
        os.fsync(fd)
    except OSError as exc:  # some file systems cannot fsync a folder; the data is still written
        if exc.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(fd)


#: How many names :func:`_create_temp` tries before giving up.
_TEMP_TRIES = 100


def _temp_name(path: Path, pid: int, attempt: int) -> Path:
    """``.STEM.tmp-PID-TAG.SUFFIX``: TAG is a hash of the final name, the pid and the attempt.

    The tag is not random: it lets a later writer recognise a temporary file
    that this module wrote (and a killed process left) and tell it from a
    user's file that merely looks like one.
    """
    tag = hashlib.sha256(f"qlora_ref temp {path.name} {pid} {attempt}".encode()).hexdigest()[:8]
    return path.with_name(f".{path.stem}.tmp-{pid}-{tag}{path.suffix}")


def _remove_stale_temps(path: Path) -> None:
    """Delete temporary files of ``path`` that a killed writer left (none of a live one).

    Deleted only if all hold: the name is exactly one :func:`_temp_name`
    gives for ``path`` (tag included), its pid is not this process and no
    process has it, it is a regular file (not a symlink) and it belongs to
    this user. Anything else beside ``path`` is left alone.
    """
    pattern = re.compile(rf"\.{re.escape(path.stem)}\.tmp-(\d{{1,10}})-[0-9a-f]{{8}}"
                         rf"{re.escape(path.suffix)}")
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return
    for entry in entries:
        m = pattern.fullmatch(entry.name)
        if not m:
            continue
        pid = int(m.group(1))
        if not 0 < pid < 2**31 or pid == os.getpid() or _pid_alive(pid):
            continue
        if entry.name not in {_temp_name(path, pid, k).name for k in range(_TEMP_TRIES)}:
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path.parent / entry.name)


def _create_temp(path: Path) -> tuple[Path, int]:
    """A new empty file beside ``path``, never through a symlink: (its path, an open descriptor).

    Temporary files of ``path`` left by a killed writer are removed first
    (:func:`_remove_stale_temps`).
    """
    _remove_stale_temps(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    for attempt in range(_TEMP_TRIES):
        tmp = _temp_name(path, os.getpid(), attempt)
        try:
            return tmp, os.open(tmp, flags, 0o644)
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file beside {path}")


def _publish_file(tmp: Path, path: Path) -> None:
    fd = os.open(tmp, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)  # replaces a symlink at ``path`` itself, never its target
    fsync_path(path.parent)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path`` to write to (by any library); on success, fsync and rename it over ``path``.

    The temporary name keeps ``path``'s suffix, so writers that choose a
    format from it (``matplotlib.savefig``) still do. The file exists (empty,
    created by us) when the block starts. On an error the temporary file is
    removed and ``path`` is left as it was.
    """
    path = Path(path)
    tmp, fd = _create_temp(path)
    os.close(fd)
    try:
        yield tmp
        _publish_file(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike):
    """Yield a binary file object to write ``path``'s new content to; published as :func:`atomic_path` does."""
    path = Path(path)
    tmp, fd = _create_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        _publish_file(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
    """Write ``data`` (text is UTF-8) to ``path`` through :func:`atomic_file`."""
    with atomic_file(path) as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)


# ----------------------------------------------------------------------------- folders

def _write_marker(folder: Path, final_name: str, complete: bool) -> None:
    # written atomically inside ``folder``: a reader sees the old marker or the new, never half
    write_atomic(folder / MARKER, json.dumps({"format": _MARKER_FORMAT, "final": final_name,
                                              "complete": complete}) + "\n")


def _read_marker(folder: Path, final_name: Optional[str]) -> Optional[dict]:
    """The marker of ``folder`` if it is a real folder holding a marker of ours for ``final_name``."""
    try:
        if not stat.S_ISDIR(os.lstat(folder).st_mode):
            return None
        marker = json.loads(read_regular_file(folder / MARKER, _MARKER_MAX, "marker",
                                              follow_symlinks=False))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if (isinstance(marker, dict) and marker.get("format") == _MARKER_FORMAT
            and (final_name is None or marker.get("final") == final_name)
            and isinstance(marker.get("complete"), bool)):
        return marker
    return None


def is_temporary_directory(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is a temporary folder :func:`atomic_directory` is filling (marked incomplete)."""
    folder = Path(folder)
    marker = _read_marker(folder, None)
    return marker is not None and marker["complete"] is False


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # ours: a leftover of an earlier call in this process (recovery runs first)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _remove_marked(folder: Path) -> None:
    """Delete a marked folder, its marker last: a kill midway leaves it still marked (or empty)."""
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(folder):
            if entry.name == MARKER:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(folder / MARKER)
        os.rmdir(folder)


def _only_marker_parts(folder: Path) -> bool:
    """Whether ``folder`` is a real folder holding nothing but (the temporary file of) a marker."""
    try:
        if not stat.S_ISDIR(os.lstat(folder).st_mode):
            return False
        names = os.listdir(folder)
    except OSError:
        return False
    return all(is_marker_part(name) for name in names)


_MARKER_PART = re.compile(rf"^\.{re.escape(Path(MARKER).stem)}\.tmp-\d+-[0-9a-f]{{8}}"
                          rf"{re.escape(Path(MARKER).suffix)}$")  # the name _create_temp gives it


def is_marker_part(name: str) -> bool:
    """Whether ``name`` is the marker or the temporary file of one (a kill while writing it)."""
    return name == MARKER or bool(_MARKER_PART.match(name))


def _siblings(final: Path) -> list[tuple[str, int, Path, dict]]:
    """Marked ``.tmp-NAME-PID-RANDOM`` / ``.old-NAME-PID-RANDOM`` folders beside ``final`` of dead writers."""
    pattern = re.compile(rf"^\.(tmp|old)-{re.escape(final.name)}-(\d+)-[0-9a-f]{{8}}$")
    found = []
    try:
        entries = list(os.scandir(final.parent))
    except (FileNotFoundError, NotADirectoryError):
        return []
    for entry in entries:
        m = pattern.match(entry.name)
        if not m or _pid_alive(int(m.group(2))):
            continue
        marker = _read_marker(Path(entry.path), final.name)
        if marker is None and _only_marker_parts(Path(entry.path)):
            marker = {"complete": False}  # killed between mkdir and the marker: nothing else in it
        if marker is not None:
            found.append((m.group(1), int(m.group(2)), Path(entry.path), marker))
    return found


def _is_real_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def complete_directory(final: str | os.PathLike) -> Path:
    """Where a reader finds the complete copy of the folder ``final``, without writing anything.

    ``final`` itself when it exists; else a complete marked copy a killed
    swap left beside it (the new one first); else ``final`` (which the
    reader then reports missing).
    """
    final = Path(final)
    if os.path.lexists(final):
        return final
    copies = sorted((kind != "tmp", -pid, path) for kind, pid, path, marker in _siblings(final)
                    if marker["complete"])
    return copies[0][2] if copies else final


def recover_directory(final: str | os.PathLike, exclude: str | os.PathLike | None = None) -> None:
    """Finish or undo what a killed swap of ``final`` left: restore a complete copy, delete the rest.

    Touches only marked folders of dead writers (see the module note). If
    ``final`` is missing, the complete new copy (else the old one) is renamed
    back to it; every other marked copy is deleted; a stale marker inside
    ``final`` is removed. ``exclude`` names a folder beside ``final`` to leave
    alone (the one about to be published).
    """
    final = Path(final)
    refuse_symlink(final)
    leftovers = [item for item in _siblings(final)
                 if exclude is None or item[2].name != Path(exclude).name]
    if not os.path.lexists(final):
        complete = sorted((kind != "tmp", -pid, path) for kind, pid, path, marker in leftovers
                          if marker["complete"])
        if complete:
            os.rename(complete[0][2], final)
            fsync_path(final.parent)
    for _, _, path, _ in leftovers:
        if os.path.lexists(path):
            _remove_marked(path)
    if _is_real_dir(final):  # stale markers (and half-written ones) of a killed swap
        for name in os.listdir(final):
            if name != MARKER and is_marker_part(name) and not _pid_alive(int(name.split("-")[-2])):
                os.unlink(final / name)
        if os.path.lexists(final / MARKER) and _read_marker(final, final.name):
            os.unlink(final / MARKER)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_exchange_supported: Optional[bool] = None


def _exchange(a: Path, b: Path) -> bool:
    """Swap the names ``a`` and ``b`` in one step (Linux ``renameat2``); False where unsupported."""
    global _exchange_supported
    if _exchange_supported is False:
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        _exchange_supported = False
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        _exchange_supported = True
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False  # this file system (or kernel) cannot exchange: the two renames
    raise OSError(err, f"renameat2 exchange of {a} and {b} failed: {os.strerror(err)}")


def replace_directory_atomically(new: str | os.PathLike, final: str | os.PathLike) -> None:
    """Make the complete folder ``new`` (beside ``final``) be ``final``; delete the old copy.

    See the module note for the steps and what a kill at each leaves. A
    ``final`` that is a symlink is refused (one line). ``new`` is marked
    complete first, so a kill after this call began never loses it.
    """
    new, final = Path(new), Path(final)
    refuse_symlink(final)
    if not _is_real_dir(new):
        raise ValueError(f"{new} is not a folder")
    _write_marker(new, final.name, complete=True)
    fsync_path(new)
    if not re.fullmatch(rf"\.tmp-{re.escape(final.name)}-\d+-[0-9a-f]{{8}}", new.name):
        # a folder the caller named: under our pattern, a kill from here on leaves it recoverable
        moved = _new_name(final, "tmp")
        os.rename(new, moved)
        new = moved
    fault_point("swap.filled")
    if os.path.lexists(final):
        if not _is_real_dir(final):
            raise ValueError(f"{final} exists and is not a folder; refusing to replace it")
        _write_marker(final, final.name, complete=True)  # the old copy: ours to delete later
        fault_point("swap.old-marked")
        if _exchange(new, final):
            old = new  # now holds the old copy
        else:
            old = _new_name(final, "old")
            os.rename(final, old)  # ``old`` does not exist: rename never replaces a folder here
            fsync_path(final.parent)
            fault_point("swap.aside")
            os.rename(new, final)
    else:
        old = None
        os.rename(new, final)
    fsync_path(final.parent)
    fault_point("swap.renamed")
    os.unlink(final / MARKER)
    fsync_path(final)
    fault_point("swap.unmarked")
    if old is not None:
        _remove_marked(old)


def _new_name(final: Path, kind: str) -> Path:
    """``.KIND-NAME-PID-RANDOM`` beside ``final``, a name nothing holds now."""
    for _ in range(100):
        path = final.with_name(f".{kind}-{final.name}-{os.getpid()}-{secrets.token_hex(4)}")
        if not os.path.lexists(path):
            return path
    raise FileExistsError(f"could not find a free temporary name beside {final}")


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike):
    """Yield an empty temporary folder beside ``final``; when the block ends, it becomes ``final``.

    What a killed earlier swap left is recovered first
    (:func:`recover_directory`). On an error in the block the temporary
    folder is deleted and ``final`` is left as it was.

    >>> import tempfile
    >>> out = Path(tempfile.mkdtemp())
    >>> with atomic_directory(out / "adapter") as tmp:
    ...     _ = (tmp / "weights.bin").write_bytes(b"1234")
    >>> sorted(p.name for p in out.iterdir()), (out / "adapter" / "weights.bin").read_bytes()
    (['adapter'], b'1234')
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(final)
    tmp = _new_name(final, "tmp")
    os.mkdir(tmp)  # fails rather than reuse a folder that is there
    try:
        _write_marker(tmp, final.name, complete=False)
        fault_point("swap.begun")
        yield tmp
        for root, dirs, files in os.walk(tmp):
            for name in files:
                fsync_path(Path(root) / name)
            fsync_path(root)
        replace_directory_atomically(tmp, final)
    except BaseException:
        # an incomplete tmp is deleted; a swap cut short by an error is finished or undone
        with contextlib.suppress(Exception):
            recover_directory(final)
        raise
