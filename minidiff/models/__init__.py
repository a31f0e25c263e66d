"""The model registry: name -> model class, and build_model to rebuild a model from its config."""

from __future__ import annotations

from minidiff.models.mlp import MLPDenoiser
from minidiff.models.unet import UNet

MODELS = {"unet": UNet, "mlp": MLPDenoiser}


def build_model(name, **config):
    """Build a registered model: build_model(name, **model.config) rebuilds `model` (pass device=... as well)."""
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name](**config)
