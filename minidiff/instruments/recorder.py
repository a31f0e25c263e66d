"""The study's instruments inside a training run: what the trainer records besides the loss, and when.

Every `probe_every` steps (cost: a few extra forward/backward passes on fixed batches, none of it timed as training):
  probe_loss, probe_grad_norm, probe_cosine   the loss gradient on a fixed probe batch for each t bucket separately,
                                              its norms and the B x B cosine matrix (flattened row-major)
  probe_split_half                            per bucket, cos of its gradient on the two halves of the probe batch:
                                              the noise ceiling the cosines are read against
  noise_scale, noise_scale_bucket             B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018), overall /
                                              per bucket
  momentum_alignment                          cos(g_t, momentum buffer or Adam's m before it absorbs g_t)
  grad_cos_consecutive                        cos(g_t, g_{t-1})
  layer_update_to_weight                      |delta theta| / |theta| per layer (names in the root attr layer_names)
Every `eval_every` steps: `fd` (Frechet distance of EMA DDIM samples to held-out digits in the shipped classifier's
feature space) for the digits, `swd` (sliced Wasserstein to held-out points) for 2-D data.
Every `val_every` steps (default: with the evaluations): val_loss, val_loss_ema and their per-bucket vectors, the
denoising loss of the raw and EMA weights on fixed held-out triples (minidiff.instruments.validation).

Probes draw from their own fixed seeds and use fixed batches, so they never change the training run itself: a run
with probes is bitwise the same run as one without.
"""

from __future__ import annotations

import json

import numpy as np

from minidiff.backend import to_float, to_numpy
from minidiff.instruments import probes, quality, validation


def eval_seed(config) -> int:
    """The seed of a run's quality evaluations: its own seed, offset so the samples never reuse its training noise.
    `minidiff evaluate` uses it too, so it reproduces a run's logged value."""
    return config.seed + 3000


class Instruments:
    def __init__(self, trainer):
        c = trainer.config
        self.trainer = trainer
        self.enabled = c.probe_every > 0
        train = trainer.dataset.train
        self.probe_batch = train[:min(c.probe_batch, len(train))]
        n_ns = min(len(train), max(2 * c.noise_scale_micro_batches, c.batch_size))
        self.noise_batch = train[len(train) - n_ns:]  # a different fixed slice from the probe batch
        self._previous_grads = None
        self._before = None
        self.val_every = c.resolved_val_every
        if self.val_every and len(trainer.dataset.test) == 0:
            if c.val_every:   # asked for explicitly: say why it cannot be done
                raise ValueError(f"val_every {c.val_every}: the data has no held-out samples to validate on "
                                 f"(holdout {c.holdout})")
            self.val_every = 0
        self._validation_set = None

    # --- around the optimizer step (only on the steps that need it) -----------------------------------------------
    def _probing_at(self, step: int) -> bool:
        return self.enabled and step % self.trainer.config.probe_every == 0

    def before_step(self, next_step: int, grads) -> dict:
        """Called between backward and the optimizer step that will make the run reach `next_step`."""
        if not self.enabled:
            return {}
        out = {}
        probing = self._probing_at(next_step)
        if probing and self._previous_grads is not None:
            out["grad_cos_consecutive"] = probes.cosine(grads, self._previous_grads)
        # cos(g_t, g_{t-1}) needs the previous step's gradient: keep a copy only on the step before a probe
        before_probe = (next_step + 1) % self.trainer.config.probe_every == 0
        self._previous_grads = {k: v.copy() for k, v in grads.items()} if before_probe else None
        if probing:
            alignment = probes.momentum_alignment(grads, self.trainer.optimizer)
            if alignment is not None:
                out["momentum_alignment"] = alignment
            self._before = probes.snapshot(self.trainer.model.params)
        return out

    def after_step(self, step: int, pending: dict) -> dict:
        """Called after the optimizer step that reached `step`; returns host metrics to log at this step."""
        if not self._probing_at(step):
            return {}
        metrics = {k: to_float(v) for k, v in pending.items()}
        ratios = probes.update_to_weight(self._before, self.trainer.model.params, per="layer")
        self._before = None
        metrics["layer_update_to_weight"] = np.array([to_float(v) for v in ratios.values()])
        metrics.update(self.probe())
        return metrics

    # --- checkpoints ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """What a resumed run needs to log exactly what an uninterrupted one does: g_{t-1} for grad_cos_consecutive
        when the next step probes ({"previous_grads": None} otherwise), as host copies that go to HDF5 bit for bit.
        The fixed probe batches and seeds come from the config; `_before` lives only within one step."""
        grads = self._previous_grads
        return {"previous_grads": None if grads is None else {k: np.array(to_numpy(v), copy=True)
                                                              for k, v in grads.items()}}

    def load_state_dict(self, state: dict) -> None:
        grads = state.get("previous_grads")
        if grads is None:
            self._previous_grads = None
            return
        params = self.trainer.model.params
        if set(grads) != set(params):
            raise ValueError(f"instruments state has gradients for {sorted(grads)}, the model has {sorted(params)}")
        be = self.trainer.backend
        self._previous_grads = {k: be.asarray(grads[k], dtype=params[k].dtype) for k in params}

    def layer_names(self) -> str:
        names = [probes.layer_of(n) for n in self.trainer.model.params]
        return json.dumps(list(dict.fromkeys(names)))

    # --- the fixed-batch probes ----------------------------------------------------------------------------------
    def probe(self) -> dict:
        t, c = self.trainer, self.trainer.config
        kw = dict(prediction=c.prediction, weighting=c.weighting, min_snr_gamma=c.min_snr_gamma)
        bp = probes.timestep_bucket_gradients(t.model, t.schedule, self.probe_batch, buckets=c.probe_buckets,
                                              rng_seed=c.seed + 1000, split_half=len(self.probe_batch) >= 2, **kw)
        ns = probes.noise_scale(t.model, t.schedule, self.noise_batch, micro_batches=c.noise_scale_micro_batches,
                                buckets=c.probe_buckets, rng_seed=c.seed + 2000, **kw)
        split = {} if bp.split_half is None else {"probe_split_half": bp.split_half}
        return {**split, "probe_loss": bp.losses, "probe_grad_norm": bp.grad_norms, "probe_cosine": bp.cosine.ravel(),
                "noise_scale": float(ns.overall.b_simple),
                "noise_scale_bucket": np.asarray(ns.per_bucket.b_simple, dtype=np.float64)}

    # --- the held-out denoising loss ------------------------------------------------------------------------------
    def validate(self) -> dict:
        """val_loss, val_loss_bucket (raw weights) and val_loss_ema, val_loss_ema_bucket on the fixed held-out triples
        (minidiff.instruments.validation), forward only on the sampling model."""
        t, c = self.trainer, self.trainer.config
        if self._validation_set is None:
            self._validation_set = validation.validation_set(t.dataset.test, c.timesteps, c.timestep_buckets,
                                                             c.val_samples)
        kw = dict(prediction=c.prediction, weighting=c.weighting, min_snr_gamma=c.min_snr_gamma)
        out, model = {}, None
        try:
            for suffix, use_ema in (("", False), ("_ema", True)):
                model = t.weights_model(use_ema)
                loss, per_bucket = validation.validation_loss(
                    lambda x_t, ts: model.forward(x_t, ts, cache=False), t.schedule, self._validation_set,
                    c.batch_size, t.backend, model.dtype, **kw)
                out[f"val_loss{suffix}"], out[f"val_loss{suffix}_bucket"] = loss, per_bucket
        finally:
            if model is not None:   # as after sampling: no idle workers holding copies of training's pages
                model.stop_workers()
        return out

    # --- sample quality ------------------------------------------------------------------------------------------
    def evaluate(self) -> dict:
        """FD (digits) or sliced Wasserstein (points) of EMA samples against the held-out split; {} otherwise."""

        t, c = self.trainer, self.trainer.config
        metric = quality.metric_for(t.dataset)
        if metric is None:
            return {}
        x = t.sample(c.eval_samples, num_steps=c.eval_steps, seed=eval_seed(c))
        if metric == "swd":
            return {"swd": quality.sliced_wasserstein(x, t.dataset.test, seed=0)}
        if not np.isfinite(to_numpy(x)).all():   # weights gone bad between logs: the next check stops the run
            return {"fd": float("nan")}
        return {"fd": quality.digits_fd(x)}
