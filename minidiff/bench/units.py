"""The benchmarked workloads (`CONFIGS`) and one timed *unit* of each, ours and the PyTorch twin's.

  train   forward + backward + Adam step of the UNet on a fixed batch (x, t, target drawn once from a seeded host
          RNG; loss = mean squared error against the target). Ours: model.forward, model.backward on
          dL/dout = 2 (out - target) / size, `Adam.step`. PyTorch: the twin (`minidiff.bench.torch_twin`) with the same
          weights, F.mse_loss, backward, `torch.optim.Adam` (its defaults: single-tensor on the CPU).
  sample  one call of `ddim_sample` (S steps) on `batch` images; the model_fn is our forward(cache=False), or the
          twin's forward under torch.inference_mode() (arrays cross by DLPack, no copies), so only the network differs.
Used by minidiff.bench.benchmark (timing) and minidiff.bench.memory (peak memory).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from minidiff.diffusion.samplers import ddim_sample
from minidiff.diffusion.schedules import make_schedule
from minidiff.models.unet import UNet
from minidiff.optim import build_optimizer
from minidiff.bench.torch_twin import torch_twin

LR = 2e-4  # DDPM's learning rate; the value does not change the work of a step


@dataclass(frozen=True)
class BenchConfig:
    """A benchmarked workload: UNet kwargs `model`, `batch` images of in_channels x image_size^2.

    sample_steps = 0 times a training step; sample_steps = S > 0 times DDIM sampling with S steps.
    """

    name: str
    batch: int
    image_size: int
    model: dict = field(default_factory=dict)
    sample_steps: int = 0

    @property
    def input_shape(self) -> tuple:
        return (self.batch, int(self.model.get("in_channels", 1)), self.image_size, self.image_size)

    @property
    def unit(self) -> str:
        return f"ddim{self.sample_steps} sampling" if self.sample_steps else "train step"


CONFIGS = {
    "digits": BenchConfig("digits", 128, 8),
    "digits32": BenchConfig("digits32", 128, 8, {"base_channels": 32}),   # the digits model at twice the width
    "16x16": BenchConfig("16x16", 64, 16, {"base_channels": 32, "channel_mults": [1, 2, 2]}),
    "32x32": BenchConfig("32x32", 64, 32, {"base_channels": 32, "channel_mults": [1, 2, 2, 2],
                                           "attention_levels": [2]}),
    "ddim50": BenchConfig("ddim50", 64, 8, sample_steps=50),
}


def host_batch(cfg, seed=0):
    """The fixed batch: x, target ~ N(0, 1) in float64, t uniform in [0, 1000), all host arrays."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal(cfg.input_shape), rng.integers(0, 1000, cfg.batch), rng.standard_normal(cfg.input_shape)


def build_model(cfg, backend, dtype="float32"):
    """The UNet of `cfg` (wrap it to run it: minidiff.execution.wrap; the PyTorch twin is made from it)."""
    return UNet(**cfg.model, dtype=dtype, seed=0, device=backend)


def ours_unit(cfg, model):
    """-> a callable running one unit of `cfg` with our code, `model` wrapped as training runs it
    (minidiff.execution.wrap); optimizer state is made here, once."""
    be, dt = model.backend, model.dtype
    if cfg.sample_steps:
        schedule = make_schedule("linear", 1000)
        fn = lambda x, t: model.forward(x, t, cache=False)  # noqa: E731
        return lambda: ddim_sample(fn, schedule, cfg.input_shape, num_steps=cfg.sample_steps, backend=be, dtype=dt)
    model.start_workers(cfg.input_shape)   # before the optimizer state (DataParallel.start_workers)
    opt = build_optimizer("adam", model.params, lr=LR)
    x, t, y = host_batch(cfg)
    x, y = be.asarray(x, dtype=dt), be.asarray(y, dtype=dt)
    scale = 2.0 / y.size  # d/d out of mean((out - y)^2)

    def step():
        out = model.forward(x, t)
        opt.step(model.backward((out - y) * scale))
    return step


def torch_unit(cfg, model, twin):
    """-> a callable running one unit of `cfg` with the PyTorch twin on the twin's device."""
    import torch
    import torch.nn.functional as F

    be, dev = model.backend, next(twin.parameters()).device
    if cfg.sample_steps:
        schedule = make_schedule("linear", 1000)

        def fn(x, t):
            with torch.inference_mode():
                out = twin(torch.from_dlpack(x), torch.as_tensor(t, device=dev))
            return be.xp.from_dlpack(out)
        return lambda: ddim_sample(fn, schedule, cfg.input_shape, num_steps=cfg.sample_steps, backend=be,
                                   dtype=model.dtype)
    opt = torch.optim.Adam(twin.parameters(), lr=LR)
    tdt = getattr(torch, model.dtype.name)
    x, t, y = host_batch(cfg)
    x, y = (torch.as_tensor(a, dtype=tdt, device=dev) for a in (x, y))
    t = torch.as_tensor(t, device=dev)

    def step():
        loss = F.mse_loss(twin(x, t), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def make_twin(model):
    """The PyTorch twin on the matching device (CUDA for CuPy), TF32 off so both sides compute in true float32."""
    import torch

    if model.backend.name == "cupy":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False  # on by default for convolutions; CuPy's matmul does not use TF32
        return torch_twin(model, device="cuda")
    return torch_twin(model)
