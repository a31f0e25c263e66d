"""Shared fixtures: the backends every layer/model test runs under, the torch reference import, one BLAS thread.

Shared functions (the one bitwise comparison, finite differences, the CLI and fault-injection tools) live in
tests/helpers, imported as `helpers.<module>`: a conftest.py is pytest's to load, not a module to import."""

import numpy as np
import pytest

from minidiff.backend import BackendError, get_backend


def _available_backends():
    names = ["cpu", "strict"]
    try:
        get_backend("gpu")
        names.append(pytest.param("gpu", marks=pytest.mark.gpu))
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


@pytest.fixture(scope="module")
def one_blas_thread():
    """One BLAS thread for a module (use with pytestmark = pytest.mark.usefixtures("one_blas_thread")): tiny matrices
    gain nothing from BLAS threads, and on a small loaded machine they only add contention."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(1):
        yield


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def torch64(torch):
    """torch with float64 as default dtype: its optimizers keep scalar state (step, NAdam's mu_product) in it."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield torch
    torch.set_default_dtype(old)
