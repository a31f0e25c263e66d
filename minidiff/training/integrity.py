"""Whether a trainer's state is sound: a stored checkpoint that is to continue a run, and the live state of a run.

check_checkpoint(trainer, state, path)   before a checkpoint is loaded: it must have the layout of this trainer's
                                         own state (keys, types, shapes, dtypes), counters that agree and a data order
                                         that is a permutation; RunFileError naming the file and the part otherwise
nonfinite_part(trainer, metrics)         at a log step: the first of loss, gradient norm, parameters, EMA weights
                                         and each optimizer buffer that holds NaN or Inf, or None

The file-level checks (checksums, finiteness of every leaf, the step attribute) are minidiff.runs.validate's; these
need the trainer, which knows what a checkpoint of this run must hold.
"""

from __future__ import annotations

import numpy as np

from minidiff.backend import to_numpy
from minidiff.kernels.flat import FlatArrays
from minidiff.runs.file import RunFileError

# Entries a checkpoint may lack: the instruments' state is optional in format 1 (without it the probes start afresh)
OPTIONAL = {"instruments"}
# The instruments' carried gradient: None, or one array per parameter (a fresh trainer's state has None)
CARRIED_GRADS = "instruments/previous_grads"


def check_checkpoint(trainer, state, path) -> None:
    """RunFileError "<path>: checkpoint/state/<part> ..." when `state` cannot continue `trainer`'s run exactly."""
    template = trainer.state_dict()
    problem = _layout_problem(state, template, "", template["params"])
    if problem is None:
        problem = _counter_problem(trainer, state)
    if problem is not None:
        where, what = problem
        raise RunFileError(f"{path}: checkpoint/state{'/' + where if where else ''} {what}")


def _layout_problem(value, template, where, params):
    """(where, what) of the first place `value` differs from `template` in layout, or None. `params` is the layout of
    the carried gradients (CARRIED_GRADS)."""
    if isinstance(template, dict):
        if not isinstance(value, dict):
            return where, f"is a {type(value).__name__}, a group of entries expected"
        missing = [k for k in template if k not in value and f"{where}/{k}".strip("/") not in OPTIONAL]
        if missing:
            return where, f"lacks {', '.join(missing)}"
        extra = [k for k in value if k not in template]
        if extra:
            return where, f"holds {', '.join(extra)}, which this run does not have"
        for key in (k for k in template if k in value):
            path = f"{where}/{key}".lstrip("/")
            expected = params if path == CARRIED_GRADS else template[key]
            if path == CARRIED_GRADS and value[key] is None:
                continue
            found = _layout_problem(value[key], expected, path, params)
            if found is not None:
                return found
        return None
    if isinstance(template, (list, tuple)):
        if type(value) is not type(template) or len(value) != len(template):
            return where, f"does not fit this run (a {type(template).__name__} of {len(template)} expected)"
        for i, (v, t) in enumerate(zip(value, template)):
            found = _layout_problem(v, t, f"{where}/{i}", params)
            if found is not None:
                return found
        return None
    if isinstance(template, (np.ndarray, np.generic)):
        if not isinstance(value, type(template)) or value.dtype != template.dtype or value.shape != template.shape:
            have = f"{getattr(value, 'dtype', type(value).__name__)} {getattr(value, 'shape', '')}".strip()
            return where, f"is {have}, this run needs {template.dtype} {template.shape}"
        return None
    if type(value) is not type(template) and not (isinstance(template, float) and type(value) is int):
        return where, f"is a {type(value).__name__}, this run needs a {type(template).__name__}"
    return None


def _counter_problem(trainer, state):
    step = state["step"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        return "step", f"is {step!r}, a step count expected"
    for where, count in (("optimizer/step", state["optimizer"]["step"]), ("ema/num_updates",
                                                                          state["ema"]["num_updates"])):
        if count != step:   # one optimizer step and one EMA update per training step
            return where, f"({count}) disagrees with checkpoint/state/step ({step})"
    order, n = state["data_order"], len(trainer.dataset.train)
    perm = order["permutation"]
    if not np.array_equal(np.sort(perm), np.arange(n)):
        return "data_order/permutation", f"is not a permutation of the {n} training samples"
    if not 0 <= order["position"] <= n or order["epoch"] < 0:
        return "data_order", f"position {order['position']} or epoch {order['epoch']} is out of range"
    for where, rng_state in (("rng", state["rng"]), ("data_order/rng", order["rng"])):
        try:
            np.random.default_rng().bit_generator.state = rng_state
        except (ValueError, TypeError, KeyError) as exc:
            return where, f"is not a generator state ({exc})"
    acc = state["accumulators"]
    if acc["steps"] < 0 or np.any(acc["bucket_count"] < 0) or state["train_time"] < 0:
        return "accumulators", "hold negative counts or times"
    return None


def load_checked(trainer, state, path) -> None:
    """check_checkpoint, then load; anything the trainer still refuses is a RunFileError naming the file."""
    check_checkpoint(trainer, state, path)
    try:
        trainer.load_state_dict(state)
    except (ValueError, TypeError, KeyError, IndexError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        raise RunFileError(f"{path}: checkpoint/state does not fit this run: {message}") from None


def nonfinite_part(trainer, metrics: dict):
    """At a log step (metrics holds the host loss and grad_norm): what of the run is NaN or Inf, or None.

    The arrays are checked on the device, a flag per part, and the flags read back together: one synchronisation
    at a step that synchronises anyway (the log's), nothing on the other steps."""
    if not np.isfinite(metrics["loss"]):
        return "loss"
    if not np.isfinite(metrics["grad_norm"]):
        return "gradient norm"
    parts = [("parameters", trainer.model.params), ("EMA weights", trainer.ema.params)]
    buffers: dict = {}
    for bufs in trainer.optimizer.state.values():
        for name, a in bufs.items():
            buffers.setdefault(name, []).append(a)
    parts += [(f"optimizer state ({name})", arrays) for name, arrays in buffers.items()]
    xp = trainer.backend.xp
    flags = to_numpy(xp.stack([_all_finite(xp, arrays) for _, arrays in parts]))
    return next((what for (what, _), ok in zip(parts, flags) if not ok), None)


def _all_finite(xp, arrays):
    """A 0-d device bool: every element of `arrays` (a dict or list) finite. Arrays laid end to end in one buffer
    (a model's parameters, an EMA, an optimizer's buffers) are checked in one call over that buffer."""
    if isinstance(arrays, FlatArrays) and arrays.intact():
        return xp.all(xp.isfinite(arrays.flat))
    arrays = list(arrays.values()) if isinstance(arrays, dict) else arrays
    base = getattr(arrays[0], "base", None)
    if base is not None and base.ndim == 1 and all(getattr(a, "base", None) is base for a in arrays) \
            and base.size == sum(a.size for a in arrays):
        return xp.all(xp.isfinite(base))
    return xp.all(xp.stack([xp.all(xp.isfinite(a)) for a in arrays]))
