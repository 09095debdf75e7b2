"""Shared test settings.

* bitsandbytes' CPU fallbacks call ``torch.compile``; compiling on a 2-core
  CI machine takes longer than the tests, so dynamo is disabled for the
  test session (this changes no arithmetic: the eager path computes the same
  float32 operations).
* OpenMP waits passively (see below).
* Hypothesis runs a fixed, moderate number of examples without deadlines
  (timings on a shared CI machine are noisy).
"""
import os

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
# OpenMP threads that spin while waiting make small torch ops 100x slower on a
# busy 2-core machine; passive waiting costs nothing when the machine is idle.
os.environ.setdefault("OMP_WAIT_POLICY", "passive")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("qlora_ref", deadline=None, max_examples=60,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "qlora_ref"))


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
