r"""Which modules a name or pattern selects, PEFT's way, at a bounded cost.

PEFT selects modules by name in two places, and so do we:

* ``target_modules`` (:func:`~qlora_ref.nn.model.find_target_modules`): a
  listed name matches a module path equal to it or ending in ``"." + name``
  (:func:`matches_suffix`); a string is a regular expression the whole path
  must match, so it must pass :func:`check_regex_cost` first;
* ``rank_pattern`` / ``alpha_pattern`` in ``adapter_config.json``
  (:func:`~qlora_ref.nn.adapters.load_adapter`): each key is tested against a
  module path with :func:`pattern_matcher`, and :func:`pattern_value` takes the
  first key that matches.

Mirrors ``peft.tuners.tuners_utils.check_target_module_exists`` and
``peft.utils.other.get_pattern_key``. A leaf module: it imports only the
standard library, so the model code and the adapter files can both use it.

Note (hostile patterns): keys come from files and command lines. Run as
given, a crafted regular expression backtracks exponentially, so every
regex is parsed and its repetitions counted before it runs.
"""
from __future__ import annotations

import re

try:  # the standard library's regex parser (a private module, renamed in Python 3.11)
    from re import _parser as _sre_parse
except ImportError:  # pragma: no cover - Python 3.10
    import sre_parse as _sre_parse

__all__ = ["matches_suffix", "pattern_matcher", "pattern_value", "check_regex_cost",
           "MAX_PATTERN_LENGTH", "MAX_PATTERN_REPEATS"]


def matches_suffix(name: str, target: str) -> bool:
    """PEFT's rule for a listed target name: the path is ``target`` or ends in ``"." + target``."""
    return name == target or name.endswith("." + target)


#: Longest ``rank_pattern`` / ``alpha_pattern`` key run as a regular expression.
MAX_PATTERN_LENGTH = 256
#: Most repetitions (``*``, ``+``, ``{m,n}``) in one such key.
MAX_PATTERN_REPEATS = 2
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_.\-]*")  # module paths: no regex syntax but "."


def pattern_matcher(key: str):
    r"""A test ``name -> bool`` equal to PEFT's ``re.match(rf"(.*\.)?({key})$", name)``, at bounded cost.

    PEFT matches a ``rank_pattern`` / ``alpha_pattern`` key against a module
    path with that regular expression: the key matches the whole path or a
    suffix that starts after a ``.``. Run as given, a crafted key such as
    ``(.*.*)*Z`` backtracks exponentially (minutes for a 20-character path).

    Decision:

    * A key made of letters, digits, ``_``, ``-`` and ``.`` (every key PEFT
      writes, and module paths) is matched without a regex, by comparing the
      path's last ``len(key)`` characters (``.`` matching any character, as
      in the regex) and checking what precedes them is empty or ends in ``.``:
      linear time, the same answer.
    * Any other key must parse as a regex on its own (so it cannot close
      PEFT's group and change the pattern around it), be at most
      :data:`MAX_PATTERN_LENGTH` characters, have no repetition or
      alternation inside a repetition, no back-references, and at most
      :data:`MAX_PATTERN_REPEATS` repetitions. It then runs as PEFT runs it.
      Without nesting, backtracking is polynomial: with PEFT's own ``.*``
      prefix at most :math:`O(L^3)` steps for a path of length :math:`L`
      (a few milliseconds at 200 characters).

    Anything else is a ``ValueError`` naming the key and the rule.
    """
    if not isinstance(key, str):
        raise ValueError(f"pattern key {key!r} must be a string")
    if _PLAIN_KEY.fullmatch(key):
        n = len(key)

        def plain(name: str) -> bool:
            start = len(name) - n
            if start < 0 or (start > 0 and name[start - 1] != "."):
                return False
            return all(k == "." or k == c for k, c in zip(key, name[start:]))

        return plain
    check_regex_cost(key, "pattern key")
    try:
        compiled = re.compile(rf"(.*\.)?({key})$")  # PEFT's (peft.utils.other.get_pattern_key)
    except re.error as exc:  # e.g. inline flags, valid alone but not inside PEFT's group
        raise ValueError(f"pattern key {key!r} is not valid inside PEFT's pattern: {exc}") from None
    return lambda name: compiled.match(name) is not None


def check_regex_cost(pattern: str, what: str = "pattern",
                     max_length: int | None = MAX_PATTERN_LENGTH) -> None:
    """Raise ``ValueError`` unless ``pattern`` is a regex whose matching cost is bounded.

    The rules of :func:`pattern_matcher`: it parses on its own, has at most
    ``max_length`` characters (None: any length, e.g. an alternation of
    many module names, as PEFT builds for ``target_modules``) and
    :data:`MAX_PATTERN_REPEATS` repetitions, and nests no repetition or
    alternation inside a repetition and no back-reference. ``what`` names
    the field in the message.
    """
    if max_length is not None and len(pattern) > max_length:
        raise ValueError(f"{what} {pattern[:40]!r}... has {len(pattern)} characters; at most "
                         f"{max_length} are run as a regular expression")
    try:
        parsed = _sre_parse.parse(pattern)
    except (re.error, RecursionError, OverflowError) as exc:
        raise ValueError(f"{what} {pattern!r} is not a valid regular expression: {exc}") from None
    repeats = _count_repeats(parsed, f"{what} {pattern!r}", inside_repeat=False)
    if repeats > MAX_PATTERN_REPEATS:
        raise ValueError(f"{what} {pattern!r} has {repeats} repetitions; at most "
                         f"{MAX_PATTERN_REPEATS} are allowed (bounded matching cost)")


def _count_repeats(items, what: str, inside_repeat: bool) -> int:
    """Repetitions (max > 1) in a parsed regex; ``ValueError`` on nesting or back-references."""
    count = 0
    for op, av in items:
        name = getattr(op, "name", str(op))
        if name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
            low, high, sub = av
            repeats = high > 1
            if repeats and inside_repeat:
                raise ValueError(f"{what} nests a repetition inside another; "
                                 "its matching cost could be exponential")
            count += repeats + _count_repeats(sub, what, inside_repeat or repeats)
        elif name == "BRANCH":
            if inside_repeat:
                raise ValueError(f"{what} repeats an alternation; "
                                 "its matching cost could be exponential")
            count += sum(_count_repeats(sub, what, inside_repeat) for sub in av[1])
        elif name == "SUBPATTERN":
            count += _count_repeats(av[-1], what, inside_repeat)
        elif name in ("ASSERT", "ASSERT_NOT"):
            count += _count_repeats(av[1], what, inside_repeat)
        elif name == "ATOMIC_GROUP":
            count += _count_repeats(av, what, inside_repeat)
        elif name.startswith("GROUPREF"):
            raise ValueError(f"{what} uses a back-reference, which is not supported")
    return count


def pattern_value(matchers: list, name: str, default):
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup: the first key that matches ``name``."""
    for match, value in matchers:
        if match(name):
            return value
    return default
