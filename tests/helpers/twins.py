"""A model against its PyTorch twin (minidiff.bench.torch_twin): output and every parameter gradient, on weights
perturbed so that no zero-initialised layer hides a gradient."""

import numpy as np

from minidiff.backend import to_numpy
from minidiff.bench.torch_twin import torch_twin

TOL = {"float64": 1e-8, "float32": 1e-4}


def perturbed(model, seed=1):
    """Random changes to every parameter, so the zero output conv and unit GroupNorm scales hide no gradient."""
    rng = np.random.default_rng(seed)
    new = {k: to_numpy(v) + 0.3 * rng.standard_normal(v.shape) for k, v in model.params.items()}
    model.load_params(new)
    return model


def max_rel(ours, ref):
    """max |ours - ref| / max |ref| over one tensor."""
    ref = ref.detach().numpy()
    return float(np.max(np.abs(to_numpy(ours) - ref)) / np.max(np.abs(ref)))


def compare_with_twin(torch, model, x_shape, tol, seed=2):
    """Output and every parameter gradient of model vs its torch twin, for loss = sum(out * dout)."""
    rng = np.random.default_rng(seed)
    x, dout = rng.standard_normal(x_shape), rng.standard_normal(x_shape)
    t = rng.integers(0, 1000, size=x_shape[0])
    be = model.backend
    out = model.forward(be.asarray(x, dtype=model.dtype), t)
    grads = model.backward(be.asarray(dout, dtype=model.dtype))
    twin = torch_twin(model)
    tdtype = getattr(torch, model.dtype.name)
    ref = twin(torch.from_numpy(x).to(tdtype), torch.from_numpy(t))
    (ref * torch.from_numpy(dout).to(tdtype)).sum().backward()
    errors = {"output": max_rel(out, ref)}
    errors.update({name: max_rel(grads[name], p.grad) for name, p in twin.named_parameters()})
    assert list(grads) == list(model.params) == [n for n, _ in twin.named_parameters()]
    worst = max(errors, key=errors.get)
    assert errors[worst] <= tol, f"{worst}: relative error {errors[worst]:.2e} > {tol:.0e}"
    return errors
