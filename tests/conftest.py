"""Shared fixtures: the backends every layer/model test runs under, and the torch reference import."""

import numpy as np
import pytest

from minidiff.backend import BackendError, get_backend


def _available_backends():
    names = ["cpu", "strict"]
    try:
        get_backend("gpu")
        names.append("gpu")
    except BackendError:
        pass
    return names


BACKENDS = _available_backends()


@pytest.fixture(params=BACKENDS)
def backend(request):
    """NumPy, the strict backend (raises on implicit host conversion, as CuPy does), and CuPy where a GPU exists."""
    return get_backend(request.param)


@pytest.fixture(params=["cpu", "strict"])
def cpu_backend(request):
    return get_backend(request.param)


def requires_torch():
    """Import torch (the test-only reference) or skip with a visible reason."""
    return pytest.importorskip("torch", reason="PyTorch reference tests need torch==2.13.0 (pip install torch==2.13.0)")


@pytest.fixture
def torch():
    t = requires_torch()
    t.set_num_threads(2)
    return t


@pytest.fixture
def rng():
    return np.random.default_rng(0)
