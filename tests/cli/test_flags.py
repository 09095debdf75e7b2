"""Each subcommand's ``--help`` lists exactly the shared flags (``--device``, ``--seed``, ``--quiet``) it uses.

The table below is the specification: a shared flag a command ignores is not
offered (``qlora-ref memory --device cuda`` is a usage error, not a no-op).
"""
import re

import pytest

from qlora_ref.cli import COMMANDS, SHARED_FLAGS, build_parser, common_arguments
from tests.helpers import cli, one_line

#: command -> the shared flags it uses (bench's --seed is its own: the benchmark's data).
USES = {
    "info": {"seed"},                          # the random matrix it quantizes
    "finetune": {"device", "seed", "quiet"},
    "generate": {"device", "quiet"},           # greedy: nothing random
    "compare": {"device", "seed", "quiet"},
    "datatypes": {"quiet"},                    # progress lines; CPU only, nothing random
    "pretrain": {"device", "seed", "quiet"},
    "quantize": {"quiet"},                     # progress of --model; deterministic, CPU
    "memory": {"quiet"},                       # --model smollm2's conversion; computes a table
    "bench": {"seed"},
}


def listed_flags(help_text: str) -> set:
    """The long options of a ``--help`` text (``--seed`` from ``  --seed SEED  random ...``)."""
    return set(re.findall(r"^\s{2}(?:-\w(?: \w+)?, )?--([\w-]+)", help_text, re.M))


def test_the_table_covers_every_command():
    assert set(USES) == set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_lists_exactly_the_shared_flags_the_command_uses(capsys, command):
    code, out, _ = cli(capsys, command, "--help")
    assert code == 0
    shared = listed_flags(out) & set(SHARED_FLAGS)
    assert shared == USES[command], f"qlora-ref {command} --help lists {sorted(shared)}"


@pytest.mark.parametrize("argv", [["memory", "7B", "--device", "cpu"], ["memory", "7B", "--seed", "1"],
                                  ["info", "--device", "cpu"], ["quantize", "w.npy", "--seed", "1"]])
def test_a_shared_flag_the_command_does_not_use_is_a_usage_error(capsys, argv):
    code, _, err = cli(capsys, *argv)
    assert code == 2 and f"unrecognized arguments: {argv[-2]}" in one_line(err), err


def test_the_parent_parser_refuses_a_flag_that_is_not_shared():
    with pytest.raises(ValueError, match="not shared flags"):
        common_arguments(("seed", "threads"))


def test_each_command_still_parses_its_shared_flags():
    args = build_parser().parse_args(["info", "--seed", "3"])
    assert args.seed == 3 and not hasattr(args, "device")
    args = build_parser().parse_args(["memory", "7B", "--quiet"])
    assert args.quiet and not hasattr(args, "seed")
