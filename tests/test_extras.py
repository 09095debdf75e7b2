"""Optional extras: each test that needs one names it when it is missing, and fails under CI's flag.

The mapping from modules to extras is read from ``pyproject.toml`` itself
(``tests/conftest.py``), so a package moved between extras moves its reason too.
"""
import importlib.util
import sys
from types import SimpleNamespace

import pytest

from tests import conftest

pytestmark = pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib is Python 3.11+")


def test_every_package_of_every_extra_maps_to_its_extra():
    import tomllib

    from tests.helpers import ROOT

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert {"test", "parity", "docs", "notebooks", "real"} <= set(extras), sorted(extras)
    mapping = conftest.extra_of_module()
    for module, extra in (("bitsandbytes", "parity"), ("peft", "parity"), ("sphinx", "docs"),
                          ("playwright", "docs"), ("nbclient", "notebooks"), ("gguf", "real"),
                          ("hypothesis", "test"), ("sphinx_mathjax_offline", "docs")):
        assert mapping[module] == extra, (module, mapping.get(module))
    assert all(extra in extras for extra in mapping.values())


def report(outcome: str, text: str):
    """A pytest report as the hooks see it: skipped ones carry (path, line, reason)."""
    longrepr = ("tests/x.py", 3, f"Skipped: {text}") if outcome == "skipped" else text
    return SimpleNamespace(outcome=outcome, skipped=outcome == "skipped",
                           failed=outcome == "failed", longrepr=longrepr, fspath="tests/x.py")


@pytest.fixture
def peft_missing(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "peft" else real(name, *a))
    monkeypatch.delenv("QLORA_REF_REQUIRE_EXTRAS", raising=False)


@pytest.mark.parametrize("outcome, text", [
    ("skipped", "could not import 'peft': No module named 'peft'"),            # importorskip
    ("failed", "ModuleNotFoundError: No module named 'peft.tuners'"),          # a plain import
])
def test_a_missing_extra_skips_with_the_extra_named(peft_missing, outcome, text):
    r = report(outcome, text)
    conftest._name_the_extra(r)
    assert r.outcome == "skipped"
    assert "'parity' extra" in r.longrepr[2] and "pip install -e '.[parity]'" in r.longrepr[2]


def test_under_the_ci_flag_a_missing_extra_fails(peft_missing, monkeypatch):
    monkeypatch.setenv("QLORA_REF_REQUIRE_EXTRAS", "1")
    r = report("skipped", "could not import 'peft': No module named 'peft'")
    conftest._name_the_extra(r)
    assert r.outcome == "failed" and "'parity' extra" in r.longrepr
    assert "QLORA_REF_REQUIRE_EXTRAS=1" in r.longrepr


@pytest.mark.parametrize("text", [
    "ModuleNotFoundError: No module named 'peft.not_a_module'",   # peft installed: a real failure
    "ModuleNotFoundError: No module named 'no_such_module'",      # in no extra
    "AssertionError: 1 != 2",
])
def test_other_failures_stay_failures(text, monkeypatch):
    monkeypatch.delenv("QLORA_REF_REQUIRE_EXTRAS", raising=False)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",   # peft installed, whatever this machine has
                        lambda name, *a: object() if name == "peft" else real(name, *a))
    r = report("failed", text)
    conftest._name_the_extra(r)
    assert r.outcome == "failed" and r.longrepr == text
