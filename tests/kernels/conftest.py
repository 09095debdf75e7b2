"""Fixtures the kernel tests share."""
import pytest


@pytest.fixture(scope="module")
def each_simd_level():
    """The vector paths this host can run; the path in use is restored after the module's tests."""
    from qlora_ref.backend import kernels

    k = kernels()
    before = k.simd_level()
    yield k.simd_levels()
    k.set_simd_level(before)
