"""How a model is executed: wrappers around a model with its interface (minidiff.execution.wrapper), and `wrap`."""

from __future__ import annotations

from minidiff.execution import graphs
from minidiff.execution.data_parallel import DataParallel
from minidiff.execution.graphs import CudaGraphs
from minidiff.execution.wrapper import ModelWrapper


def wrap(model) -> ModelWrapper:
    """The model as it runs fastest here: replayed as CUDA graphs on CuPy (unless graphs.ENABLED is off,
    MINIDIFF_CUDA_GRAPHS=0), its batches split into chunks on the CPU cores where its images are independent, else
    as it is. Wrap before making the optimizer and the EMA: the wrapper may move the parameters."""
    if model.backend.name == "cupy":
        return CudaGraphs(model, enabled=graphs.ENABLED)
    if model.images_independent:
        return DataParallel(model)
    return ModelWrapper(model)
