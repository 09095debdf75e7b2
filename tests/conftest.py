"""Shared test settings.

* bitsandbytes' CPU fallbacks call ``torch.compile``; compiling on a 2-core
  CI machine takes longer than the tests, so dynamo is disabled for the
  test session (this changes no arithmetic: the eager path computes the same
  float32 operations).
* Hypothesis runs a fixed, moderate number of examples without deadlines
  (timings on a shared CI machine are noisy); under CI the examples are
  derandomized (profiles below).
"""
import os

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
