"""Samplers: DDPM ancestral sampling (Ho et al. 2020, Algorithm 2) and DDIM (Song et al. 2021, eq. 12).

Both take any `model_fn(x_t, t) -> prediction` (x_t a backend array (N, ...), t a host int64 array (N,)) and the
prediction target it was trained on. All noise comes from `np.random.default_rng(seed)` on the host, in this order:
x_T first, then one standard normal draw of `shape` per step that adds noise, so a seed gives the same samples on
NumPy, the strict backend and CuPy. The last step (to t = 0's x0) adds no noise.
"""

from __future__ import annotations

import math

import numpy as np

from minidiff.backend import Backend, get_backend, resolve_dtype
from minidiff.diffusion.losses import PREDICTIONS, check_choice, model_output_to_x0_eps, predict_eps_from_x0, \
    q_posterior_mean_variance

VARIANCES = ("posterior", "beta")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


def _setup(schedule, shape, seed, prediction, clip_x0, backend, dtype):
    """Validate the common options -> (backend, dtype, host rng, x_T on the backend)."""
    check_choice("prediction", prediction, PREDICTIONS)
    if clip_x0 is not None and not clip_x0 > 0:
        raise ValueError(f"clip_x0 must be None or > 0, got {clip_x0}")
    shape = tuple(int(s) for s in shape)
    if len(shape) < 1 or min(shape) < 1:
        raise ValueError(f"shape must be a non-empty tuple of positive sizes (N, ...), got {shape}")
    be = backend if isinstance(backend, Backend) else get_backend(backend)
    dt = resolve_dtype(dtype)
    rng = np.random.default_rng(seed)
    return be, dt, rng, be.asarray(rng.standard_normal(shape), dtype=dt)


def _predict(model_fn, schedule, x, t, prediction, clip_x0, xp):
    """Run the model at timestep t (an int) -> (x0, eps), x0 clipped to [-clip_x0, clip_x0] and eps re-derived."""
    t_batch = np.full(x.shape[0], t, dtype=np.int64)
    x0, eps = model_output_to_x0_eps(schedule, x, t_batch, model_fn(x, t_batch), prediction)
    if clip_x0 is not None:
        x0 = xp.clip(x0, -clip_x0, clip_x0)
        eps = predict_eps_from_x0(schedule, x, t_batch, x0)
    return x0, eps


def p_sample(model_fn, schedule, x, t, rng, be, prediction="epsilon", variance="posterior", clip_x0=None):
    """One ancestral step, DDPM Algorithm 2 in its x0 form: x_{t-1} = mu~(x_t, x0_pred) + sigma_t z (eq. 7),
    sigma_t^2 = beta~_t ("posterior") or beta_t ("beta"), z = 0 at t = 0.  -> (x_{t-1}, x0_pred), both (N, ...)."""
    x0, _ = _predict(model_fn, schedule, x, t, prediction, clip_x0, be.xp)
    t_batch = np.full(x.shape[0], t, dtype=np.int64)
    mean, _, _ = q_posterior_mean_variance(schedule, x0, x, t_batch)
    if t == 0:
        return mean, x0
    var = schedule.posterior_variance[t] if variance == "posterior" else schedule.betas[t]
    z = be.asarray(rng.standard_normal(x.shape), dtype=x.dtype)
    return mean + math.sqrt(var) * z, x0


def ddpm_sample(model_fn, schedule, shape, seed=0, prediction="epsilon", variance="posterior", clip_x0=None,
                return_x0_preds=False, progress=None, backend=None, dtype="float32"):
    """Ancestral sampling over all T steps, t = T-1, ..., 0 (DDPM Algorithm 2), from x_T ~ N(0, I).

    variance: "posterior" (beta~_t, DDPM's lower bound) or "beta" (beta_t, the upper bound); progress(step_index,
    total) is called after each step (0-based). backend: a Backend, a device name, or None ($MINIDIFF_DEVICE / cpu).
    -> x0 samples, a backend array of `shape`, or (samples, [x0 prediction of each step]) with return_x0_preds.
    """
    check_choice("variance", variance, VARIANCES)
    be, _, rng, x = _setup(schedule, shape, seed, prediction, clip_x0, backend, dtype)
    total = schedule.num_train_timesteps
    x0_preds = []
    for i, t in enumerate(range(total - 1, -1, -1)):
        x, x0 = p_sample(model_fn, schedule, x, t, rng, be, prediction, variance, clip_x0)
        if return_x0_preds:
            x0_preds.append(x0)
        if progress is not None:
            progress(i, total)
    return (x, x0_preds) if return_x0_preds else x


def ddim_timesteps(num_train_timesteps, num_steps, spacing="leading"):
    """The DDIM timestep sequence, host int64 (num_steps,), descending, unique, in [0, T-1] (diffusers' spacings):
    leading   (S-1, ..., 0) * (T // S);
    trailing  round(T - k T/S) - 1 for k = 0 .. S-1;
    linspace  round(linspace(T-1, 0, S)).
    num_steps = T gives T-1, ..., 0 for all three."""
    check_choice("timestep_spacing", spacing, TIMESTEP_SPACINGS)
    T, S = int(num_train_timesteps), int(num_steps)
    if not 1 <= S <= T:
        raise ValueError(f"num_steps must lie in [1, num_train_timesteps={T}], got {num_steps}")
    if spacing == "leading":
        ts = np.arange(S - 1, -1, -1) * (T // S)
    elif spacing == "trailing":
        ts = np.round(T - np.arange(S) * (T / S)) - 1
    else:
        ts = np.round(np.linspace(T - 1, 0, S))
    return ts.astype(np.int64)


def ddim_step_coefficients(abar_t, abar_prev, eta):
    """DDIM eq. 12 with eq. 16: x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z,
    sigma = eta sqrt((1 - abar_prev)/(1 - abar_t)) sqrt(1 - abar_t/abar_prev).  -> host (c_x0, c_eps, sigma)."""
    sigma = eta * math.sqrt((1.0 - abar_prev) / (1.0 - abar_t) * (1.0 - abar_t / abar_prev))
    return math.sqrt(abar_prev), math.sqrt(max(1.0 - abar_prev - sigma * sigma, 0.0)), sigma


def ddim_sample(model_fn, schedule, shape, num_steps=50, eta=0.0, seed=0, timestep_spacing="leading",
                prediction="epsilon", clip_x0=None, return_x0_preds=False, progress=None, backend=None,
                dtype="float32"):
    """DDIM sampling (Song et al. 2021, eq. 12) over `ddim_timesteps`; the step after the last timestep goes to
    abar_prev = 1, i.e. returns the x0 prediction. eta = 0: deterministic; eta = 1 with num_steps = T: DDPM with the
    posterior variance. Other arguments as `ddpm_sample`.
    """
    if not eta >= 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    timesteps = ddim_timesteps(schedule.num_train_timesteps, num_steps, timestep_spacing)
    be, _, rng, x = _setup(schedule, shape, seed, prediction, clip_x0, backend, dtype)
    abar = schedule.alphas_cumprod
    x0_preds = []
    for i, t in enumerate(timesteps.tolist()):
        abar_prev = abar[timesteps[i + 1]] if i + 1 < len(timesteps) else 1.0
        x0, eps = _predict(model_fn, schedule, x, t, prediction, clip_x0, be.xp)
        c_x0, c_eps, sigma = ddim_step_coefficients(abar[t], abar_prev, eta)
        x = c_x0 * x0 + c_eps * eps
        if sigma > 0:
            x = x + sigma * be.asarray(rng.standard_normal(x.shape), dtype=x.dtype)
        if return_x0_preds:
            x0_preds.append(x0)
        if progress is not None:
            progress(i, len(timesteps))
    return (x, x0_preds) if return_x0_preds else x
