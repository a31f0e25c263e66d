"""Noise schedules: every per-timestep coefficient of DDPM, precomputed once in float64 on the host.

Timesteps are 0-based, t in {0, ..., T-1}: index t holds the coefficients of the paper's step t + 1, so
`alphas_cumprod[t]` is abar_{t+1} = prod_{s<=t} (1 - beta_s) and `alphas_cumprod_prev[0]` is abar_0 = 1.

Schedules (`SCHEDULES`):
  linear         DDPM (Ho et al. 2020): betas = linspace(beta_start, beta_end, T), 1e-4 .. 0.02 at T = 1000.
  scaled_linear  latent diffusion: betas = linspace(sqrt(beta_start), sqrt(beta_end), T)^2 (same endpoints).
  sigmoid        betas = sigmoid(linspace(-6, 6, T)) * (beta_end - beta_start) + beta_start.
  cosine         Nichol & Dhariwal 2021 eq. 17: abar(u) = cos^2(((u + s)/(1 + s)) pi/2), s = 0.008,
                 beta_i = min(1 - abar((i+1)/T) / abar(i/T), max_beta) with max_beta = 0.999.

T != 1000 for the three beta-range schedules: beta_start and beta_end are the values *for T = 1000*; with
scale_with_T=True (the default, as improved DDPM's `get_named_beta_schedule`) both are multiplied by 1000/T, so the
schedule keeps the same total noise (terminal signal sqrt(abar) stays ~0.003-0.006 for T = 50 .. 1000 instead of
0.78 at T = 50 unscaled). For T < 50 the scaled betas pass 1; every schedule clips betas at max_beta (0.999).
scale_with_T=False gives the plain diffusers-style linspace for any T.

Any schedule can be rescaled to zero terminal SNR (Lin et al. 2024, Algorithm 1): rescale_zero_terminal_snr=True.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from minidiff.backend import backend_of

SCHEDULES = ("linear", "cosine", "scaled_linear", "sigmoid")

_BETA_RANGE_OPTIONS = {"beta_start": 1e-4, "beta_end": 0.02, "scale_with_T": True, "max_beta": 0.999}
_OPTIONS = {
    "linear": _BETA_RANGE_OPTIONS,
    "scaled_linear": _BETA_RANGE_OPTIONS,
    "sigmoid": _BETA_RANGE_OPTIONS,
    "cosine": {"s": 0.008, "max_beta": 0.999},
}
_COMMON_OPTIONS = {"rescale_zero_terminal_snr": False}

# Where abar_t = 0 (zero terminal SNR), x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar) is undefined: the eps -> x0
# conversion uses abar = ABAR_FLOOR there instead (the value diffusers substitutes for the same case), which turns
# the optimal eps = x_t into x0 ~ 0. Every other entry and every other array keeps the exact abar.
ABAR_FLOOR = 2.0 ** -24


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """All DDPM coefficients as read-only float64 host arrays of shape (T,), indexed by 0-based t."""

    name: str
    num_train_timesteps: int
    options: dict
    betas: np.ndarray
    # for q(x_t | x_0), DDPM eq. 4: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps
    alphas: np.ndarray
    alphas_cumprod: np.ndarray
    alphas_cumprod_prev: np.ndarray
    sqrt_alphas_cumprod: np.ndarray
    sqrt_one_minus_alphas_cumprod: np.ndarray
    # for x_0 from eps: x_0 = sqrt(1/abar) x_t - sqrt(1/abar - 1) eps (abar = 0 replaced by ABAR_FLOOR)
    sqrt_recip_alphas_cumprod: np.ndarray
    sqrt_recipm1_alphas_cumprod: np.ndarray
    # for the posterior q(x_{t-1} | x_t, x_0), DDPM eq. 6-7
    posterior_mean_coef1: np.ndarray
    posterior_mean_coef2: np.ndarray
    posterior_variance: np.ndarray
    posterior_log_variance_clipped: np.ndarray
    # for Min-SNR weighting (Hang et al. 2023): SNR_t = abar_t / (1 - abar_t)
    snr: np.ndarray = field(repr=False)

    def __len__(self):
        return self.num_train_timesteps


def schedule_from_betas(betas, name="custom", options=None) -> NoiseSchedule:
    """Precompute every coefficient from betas (T,) in (0, 1].

    DDPM eq. 4 (q(x_t | x_0)), eq. 6-7 (posterior mean coefficients and beta-tilde); the log variance is clipped at
    t = 0 (where beta-tilde = 0) by repeating t = 1, as the DDPM and improved-diffusion code do.
    """
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.size < 2:
        raise ValueError(f"num_train_timesteps must be >= 2, got betas of shape {betas.shape}")
    if not (np.all(betas > 0) and np.all(betas <= 1)):
        raise ValueError("betas must lie in (0, 1]")
    alphas = 1.0 - betas
    abar = np.cumprod(alphas)
    abar_prev = np.append(1.0, abar[:-1])
    one_minus_abar = 1.0 - abar  # > 0 everywhere: betas > 0 makes abar_t < 1
    abar_floored = np.where(abar > 0.0, abar, ABAR_FLOOR)
    posterior_variance = betas * (1.0 - abar_prev) / one_minus_abar
    arrays = dict(
        betas=betas,
        alphas=alphas,
        alphas_cumprod=abar,
        alphas_cumprod_prev=abar_prev,
        sqrt_alphas_cumprod=np.sqrt(abar),
        sqrt_one_minus_alphas_cumprod=np.sqrt(one_minus_abar),
        sqrt_recip_alphas_cumprod=np.sqrt(1.0 / abar_floored),
        sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / abar_floored - 1.0),
        posterior_mean_coef1=betas * np.sqrt(abar_prev) / one_minus_abar,
        posterior_mean_coef2=(1.0 - abar_prev) * np.sqrt(alphas) / one_minus_abar,
        posterior_variance=posterior_variance,
        posterior_log_variance_clipped=np.log(np.append(posterior_variance[1], posterior_variance[1:])),
        snr=abar / one_minus_abar,
    )
    for a in arrays.values():
        a.setflags(write=False)
    return NoiseSchedule(name=name, num_train_timesteps=int(betas.size), options=dict(options or {}), **arrays)


def rescale_zero_terminal_snr(betas):
    """Lin et al. 2024, Algorithm 1: shift and scale sqrt(abar) so that sqrt(abar_0) is kept and sqrt(abar_T) = 0.

    sqrt(abar)' = (sqrt(abar) - sqrt(abar_T)) * sqrt(abar_0) / (sqrt(abar_0) - sqrt(abar_T)); betas' from the ratios.
    The last beta becomes exactly 1.
    """
    sqrt_abar = np.sqrt(np.cumprod(1.0 - np.asarray(betas, dtype=np.float64)))
    first, last = sqrt_abar[0], sqrt_abar[-1]
    sqrt_abar = (sqrt_abar - last) * (first / (first - last))
    abar = sqrt_abar ** 2
    alphas = np.append(abar[0], abar[1:] / abar[:-1])
    return 1.0 - alphas


def _beta_range(name, T, beta_start, beta_end, scale_with_T, max_beta):
    """linear / scaled_linear / sigmoid betas; endpoints are for T = 1000 and scaled by 1000/T when asked."""
    if not 0 < beta_start <= beta_end:
        raise ValueError(f"beta_start must satisfy 0 < beta_start <= beta_end, got {beta_start}, {beta_end}")
    scale = 1000.0 / T if scale_with_T else 1.0
    start, end = scale * beta_start, scale * beta_end
    if name == "linear":
        betas = np.linspace(start, end, T, dtype=np.float64)
    elif name == "scaled_linear":
        betas = np.linspace(start ** 0.5, end ** 0.5, T, dtype=np.float64) ** 2
    else:
        betas = 1.0 / (1.0 + np.exp(-np.linspace(-6.0, 6.0, T, dtype=np.float64))) * (end - start) + start
    return np.minimum(betas, max_beta)


def _cosine(T, s, max_beta):
    """Nichol & Dhariwal 2021 eq. 17: beta_i = min(1 - abar((i+1)/T) / abar(i/T), max_beta)."""
    if s < 0:
        raise ValueError(f"s must be >= 0, got {s}")
    u = np.arange(T + 1, dtype=np.float64) / T
    abar = np.cos((u + s) / (1.0 + s) * math.pi / 2.0) ** 2
    return np.minimum(1.0 - abar[1:] / abar[:-1], max_beta)


def make_schedule(name, num_train_timesteps=1000, **options) -> NoiseSchedule:
    """Build a named schedule (see the module docstring for the formulas and for T != 1000).

    Options: linear / scaled_linear / sigmoid take beta_start=1e-4, beta_end=0.02 (values for T = 1000),
    scale_with_T=True, max_beta=0.999; cosine takes s=0.008, max_beta=0.999; all take
    rescale_zero_terminal_snr=False. Unknown names or options raise ValueError naming them.
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule name {name!r}; choose one of {', '.join(SCHEDULES)}")
    if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, (int, np.integer)) \
            or num_train_timesteps < 2:
        raise ValueError(f"num_train_timesteps must be an integer >= 2, got {num_train_timesteps!r}")
    allowed = {**_OPTIONS[name], **_COMMON_OPTIONS}
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"unknown option {unknown[0]!r} for schedule {name!r}; allowed: {', '.join(sorted(allowed))}")
    opts = {**allowed, **options}
    if not 0 < opts["max_beta"] <= 1:
        raise ValueError(f"max_beta must lie in (0, 1], got {opts['max_beta']}")
    T = int(num_train_timesteps)
    if name == "cosine":
        betas = _cosine(T, opts["s"], opts["max_beta"])
    else:
        betas = _beta_range(name, T, opts["beta_start"], opts["beta_end"], bool(opts["scale_with_T"]),
                            opts["max_beta"])
    if opts["rescale_zero_terminal_snr"]:
        betas = rescale_zero_terminal_snr(betas)
    return schedule_from_betas(betas, name=name, options=opts)


def extract(coef, t, x):
    """Per-timestep host coefficients -> coef[t] on the backend of x, shaped (N, 1, ..., 1) to broadcast against x.

    coef: host (T,) float64; t: host int array (N,); x: backend array (N, ...). The result has x's dtype and is moved
    with `backend_of(x).asarray` (one small host -> device copy).
    """
    t, coef = np.asarray(t), np.asarray(coef)
    if t.ndim != 1 or t.shape[0] != x.shape[0] or t.dtype.kind not in "iu":
        raise ValueError(f"t must be a host integer array of shape ({x.shape[0]},), got {t.dtype} {t.shape}")
    if t.size and (t.min() < 0 or t.max() >= coef.shape[0]):  # a negative t would silently wrap around
        raise ValueError(f"t must lie in [0, {coef.shape[0] - 1}], got [{t.min()}, {t.max()}]")
    values = coef[t].reshape((t.shape[0],) + (1,) * (x.ndim - 1))
    return backend_of(x).asarray(values, dtype=x.dtype)
