"""The ``qlora-ref`` command line (also ``python -m qlora_ref``): the top floor of the package.

One module per command; ``qlora-ref COMMAND --help`` explains each:

* ``finetune`` (:mod:`.finetune`) -- the main job: QLoRA fine-tuning of the
  shipped tiny GPT, or of any local Hugging Face causal LM on a JSONL file
  (``--model DIR --data FILE.jsonl``);
* ``generate`` (:mod:`.generate`) -- continue a prompt, with or without an adapter;
* ``compare`` (:mod:`.compare`) -- the paper's claims in miniature, over seeds;
* ``pretrain`` (:mod:`.pretrain`) -- rebuild the base model the package ships;
* ``quantize FILE`` (:mod:`.quantize`) -- quantize a ``.npy`` / ``.safetensors`` tensor, or
  ``--model DIR --save OUT``: save a model's base in 4 bits once;
* ``memory N`` (:mod:`.memory`) -- the fine-tuning memory table for an N-parameter model;
* ``bench`` (:mod:`.bench`) -- speed of the NumPy, Cython and bitsandbytes paths;
* ``info`` (:mod:`.info`) -- the NF4 table and a 4096x4096 quantization summary (the default).

Each command module holds ``HELP`` (one line for ``qlora-ref --help``),
``add_arguments(parser)`` (its flags) and ``run(args)`` (the work); it
imports torch only inside ``run`` or ``add_arguments``. ``COMMON`` names the
shared flags (:data:`SHARED_FLAGS`: ``--device``, ``--seed``, ``--quiet``) the
command uses, so its ``--help`` lists only flags that mean something to it
(all three when a module does not say).

``--model smollm2`` (any name in :data:`qlora_ref.models.MODELS`) is
replaced by the folder :func:`qlora_ref.models.smollm2` converts once, so
``finetune``, ``generate``, ``datatypes`` and ``memory`` accept it.

Errors (CUDA asked for but absent, an unknown task, an unreadable file, a
bad JSONL line) print one line, ``qlora-ref: error: ...``, and exit with
status 2.

Floors: this package may import everything below it (the NumPy core, the
kernels, :mod:`qlora_ref.nn`, :mod:`qlora_ref.train`); nothing below imports
it (``tests/test_architecture.py`` checks the import graph).

Speed of ``qlora-ref --help``: :func:`main` fills in the flags of the one
command it runs (:func:`build_parser` with ``command=``), so a command whose
flags come from a torch module (``pretrain``) costs nothing to the others.
OpenMP: importing this package imports ``qlora_ref`` first, which sets
``OMP_WAIT_POLICY=passive`` (unless the user chose) before torch or the
kernels load (:mod:`qlora_ref._runtime`).
"""
from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ["main", "build_parser", "apply_defaults", "COMMANDS", "SHARED_FLAGS"]

#: The commands, in the order ``qlora-ref --help`` lists them; each is the module ``.NAME``.
COMMANDS = ("info", "finetune", "generate", "compare", "datatypes", "pretrain", "quantize", "memory",
            "bench")


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line (``qlora-ref finetune: error: ...``) and status 2.

    ``--help`` still prints the full usage; the sub-command parsers are of this class too.
    """

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _command(name: str):
    return importlib.import_module(f"{__name__}.{name}")


#: The flags several commands share; a command module's ``COMMON`` names those it uses.
SHARED_FLAGS = ("device", "seed", "quiet")


def common_arguments(flags=SHARED_FLAGS) -> argparse.ArgumentParser:
    """A parent parser with the shared flags named in ``flags`` (``--device``, ``--seed``, ``--quiet``)."""
    unknown = set(flags) - set(SHARED_FLAGS)
    if unknown:
        raise ValueError(f"not shared flags: {sorted(unknown)} (shared: {SHARED_FLAGS})")
    common = argparse.ArgumentParser(add_help=False)
    if "device" in flags:
        common.add_argument("--device", choices=["cpu", "cuda"], default=None,
                            help="where to run (default: cuda if available, else cpu)")
    if "seed" in flags:
        common.add_argument("--seed", type=int, default=None, help="random seed (default: 0)")
    if "quiet" in flags:
        common.add_argument("--quiet", action="store_true", help="no progress bars or banners: "
                            "finetune prints only warnings and errors (its results are in its "
                            "files), the other commands only their results")
    return common


def shared_flags(module) -> tuple:
    """The shared flags a command module uses: its ``COMMON`` (all of them when it has none)."""
    return tuple(getattr(module, "COMMON", SHARED_FLAGS))


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command (``command=None``), or with only ``command``'s flags filled in.

    The other commands are still listed (name and one-line help), so
    ``qlora-ref --help`` is complete; ``command=""`` fills in none.
    """
    parser = _Parser(
        prog="qlora-ref", description="QLoRA, readable and exact: NF4 storage, LoRA on a "
        "4-bit base, a tiny GPT to fine-tune, and the same on any local Hugging Face causal "
        "LM. Run a COMMAND with --help for its options.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = _command(name)
        flags = shared_flags(module)
        p = sub.add_parser(name, parents=[common_arguments(flags)] if flags else [],
                           help=module.HELP, description=getattr(module, "DESCRIPTION", None))
        if command is None or command == name:
            module.add_arguments(p)
        p.set_defaults(func=module.run)
    return parser


def apply_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the defaults that depend on what was given: ``--seed`` is 0 unless given.

    ``args.seed_given`` records whether it was: an explicit ``--seed`` (0 too)
    overrides a config file's seed, the default does not.
    """
    args.seed_given = getattr(args, "seed", None) is not None
    if not args.seed_given:
        args.seed = 0
    return args


def _resolve_model_name(args: argparse.Namespace) -> None:
    """``--model smollm2`` (a name in :data:`qlora_ref.models.MODELS`) becomes its converted folder.

    Every command with a ``--model`` flag accepts the name this way. Without
    the optional extra: a ``RuntimeError`` whose message says what to install.
    """
    from ..models import INSTALL_HINT, MODELS, MissingExtra, resolve

    name = getattr(args, "model", None)
    if isinstance(name, str) and name in MODELS:
        try:
            args.model = resolve(name, quiet=getattr(args, "quiet", False))
        except MissingExtra:
            raise RuntimeError(f"--model {name} needs the optional extra: {INSTALL_HINT}") from None


def main(argv: list[str] | None = None) -> int:
    """Run ``qlora-ref ARGV``; return the exit status (0, 2 on an error, 130 when interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["info", *argv]
    parser = build_parser(command=argv[0] if argv[0] in COMMANDS else "")
    args = apply_defaults(parser.parse_args(argv))
    if getattr(args, "device", None) == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("qlora-ref: error: --device cuda was asked for, but no CUDA GPU is available "
                  "(torch.cuda.is_available() is False)", file=sys.stderr)
            return 2
    try:
        _resolve_model_name(args)
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as exc:
        print(f"qlora-ref: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qlora-ref: interrupted", file=sys.stderr)
        return 130
