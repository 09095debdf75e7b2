"""Shared test settings.

* bitsandbytes' CPU fallbacks call ``torch.compile``; compiling on a 2-core
  CI machine takes longer than the tests, so dynamo is disabled for the
  test session (this changes no arithmetic: the eager path computes the same
  float32 operations).
* Hypothesis runs a fixed, moderate number of examples without deadlines
  (timings on a shared CI machine are noisy); under CI the examples are
  derandomized (profiles below).
* A test that needs an optional extra (``pyproject.toml``) that is not
  installed is skipped with the extra's name in the reason, whether it
  asked with ``pytest.importorskip`` or failed to import the module at the
  top of its file; with ``QLORA_REF_REQUIRE_EXTRAS=1`` (set by ``.ci/run``)
  it fails instead.
"""
import importlib.util
import os
import re
import sys
from pathlib import Path

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])
# local default: new random examples each run (and the failures it finds are replayed)
settings.register_profile("qlora_ref", max_examples=60, **_common)
# CI (CI=true): the same examples on every machine and every run, no example database,
# so a CI failure reproduces on a developer's machine with `HYPOTHESIS_PROFILE=ci pytest`
settings.register_profile("ci", max_examples=60, derandomize=True, database=None, **_common)
# a long random search before a release: `HYPOTHESIS_PROFILE=thorough pytest -m "not slow"`
settings.register_profile("thorough", max_examples=1000, database=None, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE")
                      or ("ci" if os.environ.get("CI") else "qlora_ref"))


def pytest_collection_modifyitems(config, items):
    """Skip ``@pytest.mark.cuda`` tests, with the reason, when no GPU is present."""
    try:
        import torch
        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU: torch.cuda.is_available() is False")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


# -- optional extras -----------------------------------------------------------------------------

#: Modules that come with an extra without being named in it (installed by its packages).
_ALSO_IN_EXTRA = {"tokenizers": "parity", "safetensors": "parity"}
_REQUIRE_EXTRAS = "QLORA_REF_REQUIRE_EXTRAS"
_MISSING = re.compile(r"(?:could not import|No module named) '([\w.]+)'")


def extra_of_module() -> dict:
    """``{top-level module: extra}`` for every package of ``pyproject.toml``'s optional extras.

    A distribution's module is its name in lower case with ``-`` as ``_``
    (true of every package the extras list). Empty before Python 3.11 (no
    ``tomllib``): pytest's own skip reasons are then kept as they are.
    """
    if sys.version_info < (3, 11):
        return {}
    import tomllib

    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    extras = tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]
    out = {}
    for extra, requirements in extras.items():
        for requirement in requirements:
            name = re.match(r"[A-Za-z0-9_.-]+", requirement).group(0)
            out.setdefault(name.lower().replace("-", "_"), extra)
    return {**_ALSO_IN_EXTRA, **out}


def missing_extra(text: str):
    """(module, extra) when ``text`` says an extra's module could not be imported, else None."""
    match = _MISSING.search(text)
    if match is None:
        return None
    module = match.group(1).split(".")[0]
    extra = extra_of_module().get(module)
    # an installed module whose import failed for another reason is a failure, never a skip
    return (module, extra) if extra and importlib.util.find_spec(module) is None else None


def _name_the_extra(report) -> None:
    """Rewrite a report for a missing extra: skipped naming it, or failed under the CI flag."""
    if not (report.skipped or report.failed):
        return
    text = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    found = missing_extra(text)
    if found is None:
        return
    module, extra = found
    reason = (f"needs the '{extra}' extra ({module} is not installed): "
              f"pip install -e '.[{extra}]'")
    if os.environ.get(_REQUIRE_EXTRAS) == "1":
        report.outcome = "failed"
        report.longrepr = f"{reason}, and {_REQUIRE_EXTRAS}=1 is set"
    else:
        path, line = (report.longrepr[:2] if isinstance(report.longrepr, tuple)
                      else (str(report.fspath), None))
        report.outcome = "skipped"
        report.longrepr = (path, line, f"Skipped: {reason}")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """A test file whose imports need a missing extra: skipped (or failed under CI), not an error."""
    outcome = yield
    _name_the_extra(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """``pytest.importorskip`` of an extra's module inside a test or fixture: the extra named."""
    outcome = yield
    _name_the_extra(outcome.get_result())


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """The converted SmolLM2-135M-Instruct folder, once per test session (the real-model extra).

    In ``$QLORA_REF_CACHE`` when set (CI, a developer who keeps it); otherwise
    converted into a session temporary folder and deleted afterwards (540 MB).
    Without the extra: skipped, or failed under ``QLORA_REF_REQUIRE_REAL_MODEL=1``.
    """
    import shutil

    import qlora_ref.models as models
    from tests.helpers import missing_extra_action

    action = missing_extra_action()
    if action is not None:
        (pytest.fail if action[0] == "fail" else pytest.skip)(action[1])
    if os.environ.get("QLORA_REF_CACHE"):
        yield models.smollm2(quiet=True)
        return
    root = tmp_path_factory.mktemp("qlora_ref_cache")
    yield models.smollm2(cache_dir=root, quiet=True)
    shutil.rmtree(root, ignore_errors=True)  # not left in pytest's kept temp folders
