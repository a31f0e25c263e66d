"""MLPDenoiser against PyTorch autograd, and the model registry."""

import json

import numpy as np
import pytest

from minidiff.backend import to_numpy
from minidiff.models import MODELS, MLPDenoiser, build_model
from minidiff.models.unet import UNet
from test_unet import TOL, compare_with_twin, perturbed


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
        assert all(np.array_equal(clone.params[k], model.params[k]) for k in model.params)


def test_mlp_rejects_wrong_shapes():
    with pytest.raises(ValueError, match="need x"):
        MLPDenoiser(data_dim=2).forward(np.zeros((3, 3), np.float32), np.zeros(3, int))
