"""Parameters laid end to end (minidiff.kernels.flat): FlatArrays and its chunks, the optimizers that step a chunk of
arrays at a time, with the same bits as one array at a time, and a model's gradients laid out like its parameters."""

import numpy as np
import pytest

from helpers.bitwise import assert_bitwise_equal
from helpers.optim_cases import CONFIGS, on_backend
from minidiff.backend import get_backend, to_numpy
from minidiff.kernels.flat import FlatArrays, gather, chunks as flat_chunks, total_size
from minidiff.optim import Adam, build_optimizer

CHUNK_SHAPES = {"a": (7, 3), "b": (4,), "c": (3, 2, 2), "d": (40,), "e": (5,)}   # CHUNK_SIZE 16: a | b c | d | e


def _flat_or_not(be, flat, start):
    shapes = {k: v.shape for k, v in start.items()}
    if flat:
        params = FlatArrays(shapes, be.xp.zeros(total_size(shapes), dtype=np.float32))
    else:
        params = {k: be.xp.zeros(s, dtype=np.float32) for k, s in shapes.items()}
    for k, v in start.items():
        params[k][...] = be.asarray(v)
    return params


@pytest.mark.parametrize("device", ["cpu", "strict"])
@pytest.mark.parametrize("config", CONFIGS, ids=list(CONFIGS))
def test_parameters_end_to_end_are_stepped_a_chunk_at_a_time_with_the_same_bits(config, device, monkeypatch):
    """Arrays laid end to end are updated a chunk at a time: the same elementwise operations on the same elements,
    so parameters and state must equal the one-array-at-a-time step bit for bit, through an lr change and a
    diagnostics step (which goes one array at a time)."""
    from minidiff.optim.base import Optimizer
    monkeypatch.setattr(Optimizer, "CHUNK_SIZE", 16)
    calls, copies = [], []
    step_chunks, effective_grad = Optimizer._step_chunks, Optimizer._effective_grad
    monkeypatch.setattr(Optimizer, "_step_chunks", lambda self, *a: (calls.append(1), step_chunks(self, *a)))
    monkeypatch.setattr(Optimizer, "_effective_grad", lambda self, *a: (copies.append(1), effective_grad(self, *a)))
    name, hyper = CONFIGS[config]
    be = get_backend(device)
    rng = np.random.default_rng(6)
    start = {k: rng.standard_normal(s).astype(np.float32) for k, s in CHUNK_SHAPES.items()}
    grads = [{k: rng.standard_normal(s) for k, s in CHUNK_SHAPES.items()} for _ in range(6)]
    results = []
    # parameters as separate arrays; laid end to end with separate gradients; both laid end to end (a model's)
    for flat, flat_grads in ((False, False), (True, False), (True, True)):
        params = _flat_or_not(be, flat, start)
        opt = build_optimizer(name, params, **hyper)
        assert [len(chunk.members) for chunk in opt.chunks] == ([1, 2, 1, 1] if flat else [])
        calls.clear()
        for step, g in enumerate(grads):
            if step == 2:
                opt.lr = opt.lr * 0.5
            copies.clear()
            g = on_backend(be, g, np.float32)
            opt.step(_flat_or_not(be, True, g) if flat_grads else g, diagnostics=step == 3)
            # g_t of a chunk comes from one slice of gradients laid out like the parameters, else array by array
            assert len(copies) == (4 if flat_grads and step != 3 else 5)
        assert len(calls) == (5 if flat else 0)
        results.append(({k: to_numpy(v) for k, v in params.items()}, opt.state_dict()["buffers"]))
    want, want_bufs = results[0]
    for got, got_bufs in results[1:]:
        assert_bitwise_equal(got, want)
        assert_bitwise_equal(got_bufs, want_bufs)


def test_a_parameter_array_replaced_in_the_dict_is_stepped_where_it_now_is():
    rng = np.random.default_rng(7)
    params = _flat_or_not(get_backend("cpu"), True, {k: rng.standard_normal(s) for k, s in CHUNK_SHAPES.items()})
    opt = build_optimizer("sgd", params, lr=0.5)
    params["b"] = np.ones(4, dtype=np.float32)   # no longer part of the flat buffer
    before = {k: v.copy() for k, v in params.items()}
    grads = {k: np.full(s, 2.0, dtype=np.float32) for k, s in CHUNK_SHAPES.items()}
    opt.step(grads)
    for k in CHUNK_SHAPES:
        np.testing.assert_array_equal(params[k], before[k] - 1.0)


def test_chunks_cover_every_array_once_in_order_each_just_long_enough():
    shapes = {f"p{i}": (n,) for i, n in enumerate([5, 30, 1, 1, 12, 3, 3, 3, 3, 40, 2])}
    arrays = FlatArrays(shapes, np.zeros(total_size(shapes)))
    chunks = flat_chunks(arrays, 10)
    assert [names for _, _, names in chunks] == [("p0", "p1"), ("p2", "p3", "p4"), ("p5", "p6", "p7", "p8"),
                                               ("p9",), ("p10",)]
    assert [(a, b) for a, b, _ in chunks] == [(0, 35), (35, 49), (49, 61), (61, 101), (101, 103)]
    with pytest.raises(ValueError, match="flat buffer has shape"):
        FlatArrays(shapes, np.zeros(total_size(shapes) + 1))


@pytest.mark.parametrize("device", ["cpu", "strict"])
def test_a_models_parameters_are_laid_end_to_end_and_its_optimizer_uses_chunks(device):
    from minidiff.models.unet import UNet
    model = UNet(base_channels=8, device=device)
    assert isinstance(model.params, FlatArrays) and model.params.intact()
    opt = build_optimizer("adam", model.params)
    assert sum(len(chunk.members) for chunk in opt.chunks) == len(model.params) > len(opt.chunks)


def test_a_copy_of_parameters_laid_end_to_end_is_laid_over_its_own_buffer():
    """copy.deepcopy / pickle of a FlatArrays (a model copied for an EMA, say): the copy's arrays are views of the
    copy's buffer, so an optimizer on the copy updates the copy, and the original is untouched."""
    import copy
    import pickle
    start = {k: np.random.default_rng(9).standard_normal(s).astype(np.float32) for k, s in CHUNK_SHAPES.items()}
    original = _flat_or_not(get_backend("cpu"), True, start)
    for clone in (copy.deepcopy(original), pickle.loads(pickle.dumps(original))):
        assert isinstance(clone, FlatArrays) and clone.intact()
        build_optimizer("sgd", clone, lr=1.0).step({k: np.ones(s, dtype=np.float32) for k, s in CHUNK_SHAPES.items()})
        for k in CHUNK_SHAPES:
            np.testing.assert_array_equal(clone[k], start[k] - 1.0)
            np.testing.assert_array_equal(original[k], start[k])
    original["b"] = np.zeros(4, dtype=np.float32)   # layout broken: a copy is a plain dict
    assert type(copy.deepcopy(original)) is dict


def test_a_subclass_with_its_own_update_rule_is_stepped_array_by_array():
    """Chunks are for rules declared elementwise; a subclass's own _update (a per-tensor trust ratio, say) is not."""
    class PerTensor(Adam):
        def _update(self, *args):
            super()._update(*args)

    class Declared(PerTensor):
        elementwise_update = True

        def _update(self, *args):
            super()._update(*args)

    params = _flat_or_not(get_backend("cpu"), True, {k: np.ones(s) for k, s in CHUNK_SHAPES.items()})
    assert build_optimizer("adamw", params).chunks and build_optimizer("nadam", params).chunks
    assert not PerTensor(params).chunks
    assert Declared(params).chunks


@pytest.mark.parametrize("model_name", ["unet", "mlp"])
def test_a_models_gradients_come_laid_out_like_its_parameters_in_a_new_buffer_each_backward(model_name):
    """backward returns the gradients end to end (minidiff.kernels.flat.gather), in a buffer of their own: a later
    backward must not overwrite gradients the caller still holds, and they must not be the parameters' buffer."""
    from minidiff.models import build_model
    kwargs = {"unet": dict(base_channels=8), "mlp": dict(data_dim=2)}[model_name]
    model = build_model(model_name, **kwargs)
    rng = np.random.default_rng(3)
    shape = (4, 1, 8, 8) if model_name == "unet" else (4, 2)
    x, t = rng.standard_normal(shape).astype(np.float32), np.array([1, 50, 300, 999])
    grads, first = [], None
    for k in range(2):
        model.forward(x * (k + 1), t)
        grads.append(model.backward(np.ones(shape, dtype=np.float32)))
        first = first or {name: g.copy() for name, g in grads[0].items()}   # before the second backward
    for g in grads:
        assert model.params.same_layout(g) and g.flat.dtype == model.params.flat.dtype
        assert not np.shares_memory(g.flat, model.params.flat)
    assert not np.shares_memory(grads[0].flat, grads[1].flat)
    assert not np.array_equal(grads[0].flat, grads[1].flat)
    for name, g in grads[0].items():
        np.testing.assert_array_equal(g, first[name])


def test_gradients_laid_out_in_another_order_are_not_taken_for_the_parameters_layout():
    """Same names and shapes in another order put each array elsewhere in `flat`: the optimizer must not apply the
    slices of such gradients chunk by chunk (each parameter would get another's gradient)."""
    params = _flat_or_not(get_backend("cpu"), True, {k: np.zeros(s) for k, s in CHUNK_SHAPES.items()})
    grads = {k: np.full(s, float(i + 1), dtype=np.float32) for i, (k, s) in enumerate(CHUNK_SHAPES.items())}
    reordered = {k: CHUNK_SHAPES[k] for k in reversed(CHUNK_SHAPES)}
    flipped = FlatArrays(reordered, np.concatenate([grads[k].ravel() for k in reordered]))
    assert not params.same_layout(flipped) and params.same_layout(gather(params, grads, np))
    build_optimizer("sgd", params, lr=1.0).step(flipped)
    for k in CHUNK_SHAPES:
        np.testing.assert_array_equal(params[k], -grads[k])


def test_gathered_gradients_take_the_layouts_dtype_and_chunks_cast_flat_gradients_of_another():
    rng = np.random.default_rng(4)
    start = {k: rng.standard_normal(s).astype(np.float32) for k, s in CHUNK_SHAPES.items()}
    grads = {k: rng.standard_normal(s) for k, s in CHUNK_SHAPES.items()}   # float64
    results = []
    for flat64 in (False, True):
        params = _flat_or_not(get_backend("cpu"), True, start)
        gathered = gather(params, grads, np)
        assert gathered.flat.dtype == np.float32
        wide = FlatArrays(CHUNK_SHAPES, np.concatenate([grads[k].ravel() for k in CHUNK_SHAPES]))
        build_optimizer("adam", params).step(wide if flat64 else grads)
        results.append(params.flat.copy())
    np.testing.assert_array_equal(results[1], results[0])


def test_gather_while_a_cuda_graph_captures_copies_span_by_span_to_the_same_bits(monkeypatch):
    from minidiff.kernels import flat
    rng = np.random.default_rng(0)
    shapes = {"a": (3, 4), "b": (5,), "c": (2, 2, 2)}
    layout = FlatArrays(shapes, np.zeros(total_size(shapes), dtype=np.float32))
    arrays = {k: rng.standard_normal(s) for k, s in shapes.items()}
    want = gather(layout, arrays, np)
    monkeypatch.setattr(flat, "is_capturing", lambda xp: True)
    got = gather(layout, arrays, np)
    assert layout.same_layout(got) and got.flat.dtype == np.float32
    np.testing.assert_array_equal(got.flat, want.flat)
