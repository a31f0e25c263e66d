import numpy as np
import pytest

from minidiff import backend as B
from minidiff.backend.strict import StrictArray


def test_default_device_is_numpy(monkeypatch):
    monkeypatch.delenv("MINIDIFF_DEVICE", raising=False)
    assert B.get_backend().name == "numpy"


def test_environment_variable_chooses_device(monkeypatch):
    monkeypatch.setenv("MINIDIFF_DEVICE", "strict")
    assert B.get_backend().name == "strict"


def test_unknown_device_is_a_clear_error():
    with pytest.raises(B.BackendError, match="unknown device 'tpu'"):
        B.get_backend("tpu")


def test_gpu_without_cupy_or_device_is_a_clear_error():
    try:
        import cupy  # noqa: F401
        cupy.zeros(1)
        pytest.skip("a working GPU is present")
    except Exception:
        pass
    with pytest.raises(B.BackendError, match="gpu"):
        B.get_backend("gpu")


def test_auto_falls_back_to_numpy_or_cupy():
    assert B.get_backend("auto").name in ("numpy", "cupy")


def test_resolve_dtype():
    assert B.resolve_dtype(None) == np.float32
    assert B.resolve_dtype("float64") == np.float64
    with pytest.raises(ValueError, match="dtype"):
        B.resolve_dtype("float16")


def test_strict_refuses_implicit_host_conversion():
    be = B.get_backend("strict")
    a = be.asarray(np.arange(6.0).reshape(2, 3))
    for convert in (np.asarray, np.array, float, bool, int):
        with pytest.raises(TypeError, match="host"):
            convert(a.sum())
    with pytest.raises(TypeError, match="host NumPy array was mixed"):
        np.ones(3) + a[0]
    with pytest.raises(TypeError, match="host NumPy array was mixed"):
        be.xp.concatenate([a, np.ones((1, 3))])


def test_strict_computes_like_numpy_and_stays_strict():
    be = B.get_backend("strict")
    host = np.random.default_rng(0).standard_normal((3, 4))
    a = be.asarray(host)
    xp = be.xp
    out = xp.zeros((3, 3))
    xp.matmul(a, a.T, out=out)
    out += 1.0
    results = [out, a.sum(axis=0), xp.exp(a), a.reshape(4, 3), a[:, 1:], xp.einsum("ij,kj->ik", a, a), a.mean()]
    assert all(isinstance(r, StrictArray) for r in results)
    np.testing.assert_allclose(B.to_numpy(out), host @ host.T + 1.0)
    assert B.to_float(a.sum()) == pytest.approx(host.sum())
    assert B.get_array_module(a) is xp and B.get_array_module(host) is np
