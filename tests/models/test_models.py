"""MLPDenoiser against PyTorch autograd, the model registry, the passes a wrapper uses, and `execution.wrap`."""

import json

import numpy as np
import pytest

from helpers.bitwise import assert_bitwise_equal
from helpers.twins import TOL, compare_with_twin, perturbed
from minidiff.backend import to_numpy
from minidiff.execution import DataParallel, ModelWrapper, wrap
from minidiff.models import MODELS, MLPDenoiser, build_model
from minidiff.models.unet import UNet
from minidiff.nn.tape import NoTape, Tape


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_mlp_denoiser_output_and_every_gradient_match_torch_autograd(backend, torch, dtype):
    model = perturbed(build_model("mlp", data_dim=3, hidden=16, num_blocks=2, temb_dim=8, dtype=dtype, device=backend))
    compare_with_twin(torch, model, (5, 3), TOL[dtype])


def test_mlp_zero_output_layer_predicts_zero_at_init_and_still_gets_gradients(cpu_backend):
    model = MLPDenoiser(device=cpu_backend)
    x = cpu_backend.asarray(np.random.default_rng(0).standard_normal((4, 2)), dtype=np.float32)
    t = np.array([0, 1, 500, 999])
    assert not np.any(to_numpy(model.forward(x, t)))
    grads = model.backward(x)
    assert list(grads) == list(model.params) and np.any(to_numpy(grads["out_proj.weight"]))
    assert all(g.dtype == np.float32 and g.shape == model.params[k].shape for k, g in grads.items())


def test_registry_rebuilds_every_model_from_its_json_config():
    assert MODELS == {"unet": UNet, "mlp": MLPDenoiser}
    for name, kwargs in [("unet", dict(base_channels=8, groups=4)), ("mlp", dict(hidden=8, num_blocks=1))]:
        model = build_model(name, seed=5, **kwargs)
        clone = build_model(name, **json.loads(json.dumps(model.config)))
        assert clone.config == model.config
        assert_bitwise_equal(clone.params, model.params)


def test_mlp_rejects_wrong_shapes():
    with pytest.raises(ValueError, match="need x"):
        MLPDenoiser(data_dim=2).forward(np.zeros((3, 3), np.float32), np.zeros(3, int))


SMALL = {"unet": (dict(base_channels=8, groups=4), (3, 1, 8, 8)), "mlp": (dict(hidden=8, num_blocks=1), (5, 2))}


def _trained_once(backend, name):
    """A small model of `name` with nonzero weights, its inputs (x, t, dout), and its output and gradients for them."""
    kwargs, shape = SMALL[name]
    model = perturbed(build_model(name, **kwargs, device=backend))
    rng = np.random.default_rng(0)
    x, dout = (backend.asarray(rng.standard_normal(shape), dtype=np.float32) for _ in range(2))
    t = rng.integers(0, 1000, shape[0])
    return model, (x, t, dout), model.forward(x, t), model.backward(dout)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_the_passes_on_a_tape_of_the_callers_are_the_forward_and_backward_and_keep_nothing(cpu_backend, name):
    model, (x, t, dout), out, grads = _trained_once(cpu_backend, name)
    tape = Tape()
    assert_bitwise_equal(model.forward_pass(x, t, tape), out)
    assert len(tape) > 0
    with pytest.raises(RuntimeError, match="backward needs a forward"):   # the model kept no tape of its own
        model.backward(dout)
    with pytest.raises(RuntimeError, match="out of step"):   # a cache below the forward's is left on the tape
        model.backward_pass(dout, Tape(["an earlier cache", *tape]))
    passed = model.backward_pass(dout, tape)
    assert not tape and model.params.same_layout(passed)
    assert_bitwise_equal(passed.flat, grads.flat)
    assert_bitwise_equal(model.forward_pass(x.astype(np.float64), t, NoTape()), out)   # cast to the model's dtype


def test_moved_parameters_keep_their_values_and_layout_and_the_model_uses_them():
    model = perturbed(UNet(base_channels=8, groups=4))
    before = model.params.flat.copy()
    flat = np.full(before.shape, np.nan, dtype=before.dtype)
    model.move_params(flat)
    assert model.params.flat is flat and model.params.intact()
    assert_bitwise_equal(flat, before)
    model.params["conv_in.bias"][...] = 7.0
    assert flat[model.params.spans["conv_in.bias"][0]] == 7.0


@pytest.mark.parametrize("name", sorted(SMALL))
def test_wrap_splits_only_independent_images_and_keeps_the_model_interface_and_its_bits(cpu_backend, name):
    model, (x, t, dout), out, grads = _trained_once(cpu_backend, name)
    runner = wrap(model)
    assert isinstance(runner, ModelWrapper) and isinstance(runner, DataParallel) == (name == "unet")
    assert runner.params is model.params and runner.config == model.config and runner.dtype == model.dtype
    assert runner.backend == model.backend and runner.num_params() == model.num_params()
    assert_bitwise_equal(runner.forward(x, t), out)   # one chunk here
    assert_bitwise_equal(runner.backward(dout).flat, grads.flat)
    with pytest.raises(RuntimeError, match="once per forward"):
        runner.backward(dout)
    runner.load_params({k: np.zeros(v.shape) for k, v in model.params.items()})
    assert not to_numpy(model.params.flat).any()
    runner.stop_workers()
