"""The base of the execution wrappers: a model run from outside, the way torch's DistributedDataParallel wraps a module.

A wrapper has the model interface (minidiff.models.base) and hands it on to the model it wraps: the parameters,
config, dtype, backend, load_params, num_params, and the passes with explicit tapes (check_input, forward_pass,
backward_pass). Its forward and backward keep a tape of the wrapper's own. Subclasses change how the passes run
(minidiff.execution.data_parallel: chunks of the batch on the CPU cores; minidiff.execution.graphs: CUDA-graph
replay); this class runs the model as it is. Build the optimizer and the EMA from the wrapper's `params` after
wrapping: a wrapper may move the parameters (into shared memory).
"""

from __future__ import annotations

from minidiff.kernels.workspace import retain_freed_memory
from minidiff.models.base import OwnTape


class ModelWrapper(OwnTape):
    """The model interface around `model` (a model or another wrapper), everything handed on to it."""

    def __init__(self, model):
        self.model = model
        if model.backend.name != "cupy":
            retain_freed_memory()   # a CPU step reallocates what the last one freed: keep it (kernels.workspace)

    @property
    def params(self):
        return self.model.params

    @property
    def config(self):
        return self.model.config

    @property
    def dtype(self):
        return self.model.dtype

    @property
    def backend(self):
        return self.model.backend

    @property
    def images_independent(self):
        return self.model.images_independent

    def load_params(self, arrays):
        self.model.load_params(arrays)

    def num_params(self) -> int:
        return self.model.num_params()

    def check_input(self, x, t):
        self.model.check_input(x, t)

    def forward_pass(self, x, t, tape):
        return self.model.forward_pass(x, t, tape)

    def backward_pass(self, dout, tape):
        return self.model.backward_pass(dout, tape)

    def start_workers(self, batch_shape) -> None:
        """Start now the worker processes that batches of `batch_shape` run in (if any), instead of at the first
        call: memory allocated afterwards (an optimizer's state, an EMA) is then the caller's alone. See
        minidiff.execution.data_parallel."""
        if isinstance(self.model, ModelWrapper):
            self.model.start_workers(batch_shape)

    def stop_workers(self) -> None:
        """Close the worker processes (if any); the next call that needs them starts new ones."""
        if isinstance(self.model, ModelWrapper):
            self.model.stop_workers()

    def worker_memory_mib(self) -> float:
        """Peak memory (MiB) that the worker processes added since they started; 0.0 without workers."""
        return self.model.worker_memory_mib() if isinstance(self.model, ModelWrapper) else 0.0
