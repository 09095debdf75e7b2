"""Checks for the notebooks' exercises, with the solutions kept apart.

Each exercise in a notebook leaves a placeholder for the student (``None``,
or a function whose body returns ``None``) and is followed by a check cell::

    from exercises import check, require

    def test(nf_k):                      # what a right answer must satisfy
        levels = require(nf_k(4), "nf_k(4)")
        assert len(levels) == 16, f"NF4 has 16 levels, yours has {len(levels)}"

    nf_k = check("01", "nf_k", nf_k, test)

:func:`check` runs ``test(answer)`` and prints one line:

* ``[not done] ...`` -- the answer is still a placeholder (``None``, or
  :func:`require` met ``None``): nothing fails, the notebook runs on;
* ``[wrong] ...`` -- ``test`` raised ``AssertionError``; its message says what is wrong;
* ``[correct] ...`` -- ``test`` passed.

With ``QLORA_REF_SOLUTIONS=1`` in the environment, the answer is replaced by
the solution (``solutions/<notebook>.py``, the attribute named ``name``),
and anything but ``[correct]`` raises: the test suite runs every notebook
this way, which proves every exercise can be solved and every check passes
on a right answer. It also runs them as shipped, where every check must say
``[not done]``, which proves the checks can tell.

:func:`check` returns the answer it checked (the solution in solutions mode),
so later cells can use it.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

__all__ = ["NotDone", "require", "check", "solutions_mode", "solution"]

SOLUTIONS_DIR = Path(__file__).resolve().parent / "solutions"


class NotDone(Exception):
    """The exercise still holds its placeholder."""


def solutions_mode() -> bool:
    """Whether ``QLORA_REF_SOLUTIONS=1`` is set (checks then use the solutions and must pass)."""
    return os.environ.get("QLORA_REF_SOLUTIONS", "") == "1"


def require(value, what: str = "the answer"):
    """``value``, or :class:`NotDone` if it is still ``None`` (the placeholder)."""
    if value is None:
        raise NotDone(f"{what} is still None")
    return value


def solution(notebook: str, name: str):
    """The solution ``name`` of notebook ``notebook`` (``"01"`` reads ``solutions/01_*.py``)."""
    matches = sorted(SOLUTIONS_DIR.glob(f"{notebook}_*.py"))
    if len(matches) != 1:
        raise FileNotFoundError(f"expected one solutions/{notebook}_*.py, found "
                                f"{[p.name for p in matches]}")
    spec = importlib.util.spec_from_file_location(f"solutions_{notebook}", matches[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, name):
        raise AttributeError(f"{matches[0].name} has no solution named {name!r}")
    return getattr(module, name)


def check(notebook: str, name: str, answer, test):
    """Run ``test(answer)`` and print ``[correct]``, ``[wrong] why`` or ``[not done]``; return the answer.

    In solutions mode the answer is ``solution(notebook, name)`` and a result
    other than ``[correct]`` raises ``AssertionError``.
    """
    label = f"exercise {notebook}/{name}"
    if solutions_mode():
        answer = solution(notebook, name)
    try:
        require(answer, name)
        test(answer)
    except NotDone as exc:
        verdict = f"[not done] {label}: {exc} -- replace the placeholder with your answer"
    except AssertionError as exc:
        verdict = f"[wrong] {label}: {exc}"
    else:
        print(f"[correct] {label}")
        return answer
    if solutions_mode():
        raise AssertionError(f"the solution fails its own check: {verdict}")
    print(verdict)
    return answer
