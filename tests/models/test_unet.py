"""The whole UNet against PyTorch autograd (through minidiff.bench.torch_twin), plus the model interface contract."""

import json
import subprocess
import sys

import numpy as np
import pytest

from helpers.bitwise import assert_bitwise_equal
from helpers.gradcheck import numeric_grad, rel_error
from helpers.twins import TOL, compare_with_twin, perturbed
from minidiff.nn.attention import AttnBlock
from minidiff.backend import to_numpy
from minidiff.nn.tape import Tape
from minidiff.models import build_model
from minidiff.models.blocks import ResBlock
from minidiff.models.unet import UNet

CONFIGS = {  # (constructor kwargs, input shape)
    "2-level-attention": (dict(in_channels=1, base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
                               attention_levels=(1,), groups=4, num_heads=2), (2, 1, 8, 8)),
    "no-attention-2-blocks-non-square": (dict(in_channels=2, base_channels=8, channel_mults=(1, 2), num_res_blocks=2,
                                             attention_levels=(), mid_attention=False, groups=4), (3, 2, 8, 12)),
    "3-level-16x16-batch1": (dict(in_channels=3, base_channels=8, channel_mults=(1, 2, 2), num_res_blocks=1,
                                  attention_levels=(2,), groups=4), (1, 3, 16, 16)),
}
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_unet_output_and_every_gradient_match_torch_autograd(backend, torch, name, dtype):
    kwargs, x_shape = CONFIGS[name]
    model = perturbed(UNet(**kwargs, dtype=dtype, device=backend))
    compare_with_twin(torch, model, x_shape, TOL[dtype])


# --- modules against finite differences (a check independent of torch) -------------------------------------------

def _module_fd(module, backend, x_shape, extra_shape=None, seed=0):
    """{name: (analytic, finite-difference)} for the input x, the extra input (temb) and every parameter."""
    rng = np.random.default_rng(seed)
    params = {n: rng.standard_normal(shape) * 0.5 for n, shape, _ in module.param_specs()}
    inputs = {"x": rng.standard_normal(x_shape), **({"temb": rng.standard_normal(extra_shape)} if extra_shape else {})}
    a = lambda v: backend.asarray(v, dtype=np.float64)  # noqa: E731

    def run(tape):
        return module.forward({k: a(v) for k, v in params.items()}, *[a(v) for v in inputs.values()], tape)

    tape = Tape()
    out = run(tape)
    dout = rng.standard_normal(out.shape)
    grads = {}
    res = module.backward(a(dout), grads, tape)
    assert not tape, "backward left caches on the tape"
    grads.update(zip(inputs, res if extra_shape else (res,)))
    f = lambda: to_numpy(run(Tape()))  # noqa: E731
    return {n: (to_numpy(grads[n]), numeric_grad(f, v, dout)) for n, v in {**inputs, **params}.items()}


def test_resblock_gradients_match_finite_differences(backend):
    block = ResBlock("r", cin=2, cout=4, temb_dim=3, groups=2)   # with the 1x1 skip conv
    for name, (analytic, numeric) in _module_fd(block, backend, (2, 3, 3, 2), extra_shape=(2, 3)).items():  # NHWC
        assert rel_error(analytic, numeric) <= 1e-6, name


def test_attnblock_gradients_match_finite_differences(backend):
    C = 4
    block = AttnBlock("a", C, groups=2, num_heads=2)
    for name, (analytic, numeric) in _module_fd(block, backend, (2, 2, 3, C)).items():   # channels-last
        if name == "a.qkv.bias":
            # A key bias adds q_i . b to a whole softmax row, which softmax ignores: its true gradient is zero, where a
            # relative error only compares round-off. Check it is zero; compare the query and value biases.
            assert np.max(np.abs(analytic[C:2 * C])) < 1e-12 and np.max(np.abs(numeric[C:2 * C])) < 1e-8
            analytic, numeric = np.delete(analytic, np.s_[C:2 * C]), np.delete(numeric, np.s_[C:2 * C])
        assert rel_error(analytic, numeric) <= 1e-6, name


# --- the interface contract ------------------------------------------------------------------------------------------

def _run(model, seed=0, shape=(2, 1, 8, 8)):
    rng = np.random.default_rng(seed)
    x = model.backend.asarray(rng.standard_normal(shape), dtype=model.dtype)
    return x, rng.integers(0, 1000, size=shape[0])


def test_same_seed_gives_identical_params_outputs_and_gradients(cpu_backend):
    a, b = (perturbed(UNet(base_channels=8, groups=4, device=cpu_backend)) for _ in range(2))
    x, t = _run(a)
    assert_bitwise_equal(a.params, b.params)
    assert_bitwise_equal(a.forward(x, t), b.forward(x, t))
    assert_bitwise_equal(a.backward(x), b.backward(x))
    c = UNet(base_channels=8, groups=4, seed=1, device=cpu_backend)
    assert not np.array_equal(to_numpy(c.params["conv_in.weight"]), to_numpy(UNet(base_channels=8, groups=4).params[
        "conv_in.weight"]))


def test_strict_backend_computes_bitwise_the_same_as_numpy():
    cpu, strict = (perturbed(UNet(base_channels=8, groups=4, device=d)) for d in ("cpu", "strict"))
    x, t = _run(cpu)
    y_cpu, y_strict = cpu.forward(x, t), strict.forward(strict.backend.asarray(x), t)
    assert_bitwise_equal(y_cpu, to_numpy(y_strict))
    g_cpu, g_strict = cpu.backward(y_cpu), strict.backward(y_strict)
    assert_bitwise_equal(dict(g_cpu), {k: to_numpy(g) for k, g in g_strict.items()})


def test_default_unet_is_small_with_zero_output_and_float32_gradients(cpu_backend):
    model = UNet(device=cpu_backend)
    assert model.dtype == np.float32 and 0.1e6 < model.num_params() < 1.5e6
    assert not np.any(to_numpy(model.params["out_conv.weight"])) and not np.any(to_numpy(model.params["out_conv.bias"]))
    x, t = _run(model, shape=(3, 1, 8, 8))
    assert not np.any(to_numpy(model.forward(x, t)))  # DDPM's zero output layer: the first prediction is 0
    grads = model.backward(x)
    assert list(grads) == list(model.params)
    assert all(g.shape == model.params[k].shape and g.dtype == np.float32 for k, g in grads.items())


@pytest.mark.parametrize("size", [16, 32])
def test_three_level_unet_handles_16_and_32_pixel_images(size):
    model = UNet(in_channels=3, base_channels=8, channel_mults=(1, 2, 2), groups=4)
    x, t = _run(model, shape=(2, 3, size, size))
    assert model.forward(x, t).shape == (2, 3, size, size)
    grads = model.backward(x)
    assert grads["down.1.attn.0.qkv.weight"].shape == (48, 16, 1, 1) and "down.2.downsample.weight" not in grads
    assert all(np.all(np.isfinite(g)) for g in grads.values())


def test_config_rebuilds_the_model_through_json():
    model = UNet(base_channels=8, channel_mults=[1, 2, 2], attention_levels=[2], groups=4, num_heads=2,
                 dtype="float64", seed=3)
    config = json.loads(json.dumps(model.config))
    assert "device" not in config and config["dtype"] == "float64"
    clone = build_model("unet", **config)
    assert clone.config == model.config and list(clone.params) == list(model.params)
    assert_bitwise_equal(clone.params, model.params)


def _gradients(model, dout):
    """A host copy of model.backward(dout): a later backward may reuse the arrays it returns."""
    return {k: to_numpy(g).copy() for k, g in model.backward(dout).items()}


def test_forward_without_cache_matches_and_keeps_no_tape_for_backward(cpu_backend):
    model = perturbed(UNet(base_channels=8, groups=4, device=cpu_backend))
    x, t = _run(model)
    y_eval = model.forward(x, t, cache=False)
    with pytest.raises(RuntimeError, match="forward"):
        model.backward(x)
    assert_bitwise_equal(y_eval, model.forward(x, t))
    want = _gradients(model, x)
    model.forward(x, t)
    model.forward(x, t, cache=False)  # an evaluation pass between a forward and its backward changes nothing
    assert_bitwise_equal(_gradients(model, x), want)
    with pytest.raises(RuntimeError, match="once per forward"):
        model.backward(x)


def test_load_params_copies_in_place_and_checks_names_and_shapes(cpu_backend):
    model = UNet(base_channels=8, groups=4, device=cpu_backend)
    before = {k: id(v) for k, v in model.params.items()}
    new = {k: np.full(v.shape, 0.5) for k, v in model.params.items()}
    model.load_params(new)
    assert {k: id(v) for k, v in model.params.items()} == before
    assert np.all(to_numpy(model.params["conv_in.weight"]) == np.float32(0.5))
    with pytest.raises(ValueError, match="shape"):
        model.load_params({**new, "conv_in.weight": np.zeros((1, 1, 1, 1))})
    with pytest.raises(KeyError, match="missing"):
        model.load_params({k: v for k, v in new.items() if k != "conv_in.bias"})


def test_bad_inputs_are_clear_errors():
    model = UNet(base_channels=8, groups=4)
    with pytest.raises(ValueError, match="divisible by 2"):
        model.forward(np.zeros((1, 1, 7, 8), np.float32), np.array([0]))
    with pytest.raises(ValueError, match="t must be"):
        model.forward(np.zeros((2, 1, 8, 8), np.float32), np.array([0]))
    with pytest.raises(ValueError, match="groups=5"):
        UNet(base_channels=8, groups=5)
    with pytest.raises(ValueError, match="attention_levels"):
        UNet(attention_levels=(2,))
    with pytest.raises(KeyError, match="unknown model"):
        build_model("transformer")


def test_package_import_does_not_need_torch():
    code = ("import sys; sys.modules['torch'] = None; import minidiff.models, minidiff.bench.torch_twin; "
            "minidiff.models.build_model('unet', base_channels=8, groups=4)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_forward_without_cache_gives_the_same_output_as_the_training_forward(backend):
    """cache=False skips the work only a backward needs (SiLU's derivative in GroupNorm): the output must not move."""
    model = UNet(base_channels=8, groups=4, device=backend, seed=3)
    model.params["out_conv.weight"][...] = 0.1   # DDPM's zero output layer would hide any difference
    x, t = _run(model, shape=(3, 1, 8, 8))
    model.forward(x, t)
    want = _gradients(model, x)   # a backward right after the training forward
    kept = to_numpy(model.forward(x, t)).copy()
    assert_bitwise_equal(to_numpy(model.forward(x, t, cache=False)), kept)
    assert_bitwise_equal(_gradients(model, x), want)   # the lean forward left the training forward's tape alone
