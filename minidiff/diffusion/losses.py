"""The forward process q(x_t | x_0), conversions between prediction targets, and the training loss with its gradient.

Notation: abar_t = schedule.alphas_cumprod[t] (0-based t), alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t).
Prediction targets (`PREDICTIONS`): the noise eps (DDPM), the clean sample x0, or v = alpha_t eps - sigma_t x0
(Salimans & Ho 2022, sec. 4). Loss weightings (`WEIGHTINGS`): "uniform" (DDPM's L_simple, eq. 14) and "min_snr"
(Hang et al. 2023). Timestep samplers: `UniformSampler` and `LossAwareSampler` (improved DDPM, sec. 3.3); those that
follow the timestep buckets or the course of a run are in minidiff.diffusion.timesteps.

Arrays x0, x_t, noise and model outputs are backend arrays of shape (N, ...); t is a host int array (N,).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from minidiff.backend import backend_of, get_array_module
from minidiff.diffusion.schedules import extract

PREDICTIONS = ("epsilon", "x0", "v")
WEIGHTINGS = ("uniform", "min_snr")


def check_choice(option, value, choices):
    """ValueError naming the option unless value is one of choices."""
    if value not in choices:
        raise ValueError(f"{option} must be one of {', '.join(choices)}, got {value!r}")


# --- the forward process and the posterior -------------------------------------------------------------------------
def q_sample(schedule, x0, t, noise):
    """DDPM eq. 4: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise.  x0, noise: (N, ...) -> x_t (N, ...)."""
    return (extract(schedule.sqrt_alphas_cumprod, t, x0) * x0
            + extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * noise)


def q_posterior_mean_variance(schedule, x0, x_t, t):
    """DDPM eq. 6-7: q(x_{t-1} | x_t, x0) = N(coef1 x0 + coef2 x_t, beta-tilde_t).

    x0, x_t: (N, ...) -> (mean (N, ...), variance (N, 1, ...), log_variance clipped at t = 0 (N, 1, ...)).
    """
    mean = extract(schedule.posterior_mean_coef1, t, x_t) * x0 + extract(schedule.posterior_mean_coef2, t, x_t) * x_t
    return (mean, extract(schedule.posterior_variance, t, x_t),
            extract(schedule.posterior_log_variance_clipped, t, x_t))


# --- conversions between targets -----------------------------------------------------------------------------------
def predict_x0_from_eps(schedule, x_t, t, eps):
    """DDPM eq. 4 solved for x0: x0 = sqrt(1/abar_t) x_t - sqrt(1/abar_t - 1) eps.

    Where abar_t = 0 (zero terminal SNR) x0 is undefined; schedules.ABAR_FLOOR stands in for abar_t there.
    """
    return (extract(schedule.sqrt_recip_alphas_cumprod, t, x_t) * x_t
            - extract(schedule.sqrt_recipm1_alphas_cumprod, t, x_t) * eps)


def predict_eps_from_x0(schedule, x_t, t, x0):
    """DDPM eq. 4 solved for eps: eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)  (1 - abar_t > 0 always)."""
    return ((x_t - extract(schedule.sqrt_alphas_cumprod, t, x_t) * x0)
            / extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t))


def predict_v(schedule, x0, t, noise):
    """Salimans & Ho 2022 eq. in sec. 4: v = alpha_t eps - sigma_t x0."""
    return (extract(schedule.sqrt_alphas_cumprod, t, x0) * noise
            - extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * x0)


def x0_eps_from_v(schedule, x_t, t, v):
    """Invert v (Salimans & Ho 2022, sec. 4; alpha_t^2 + sigma_t^2 = 1):
    x0 = alpha_t x_t - sigma_t v,  eps = sigma_t x_t + alpha_t v.  Defined at abar_t = 0 too."""
    a = extract(schedule.sqrt_alphas_cumprod, t, x_t)
    s = extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t)
    return a * x_t - s * v, s * x_t + a * v


def model_output_to_x0_eps(schedule, x_t, t, output, prediction):
    """A model's output for the given target -> (x0, eps) predictions, both (N, ...)."""
    check_choice("prediction", prediction, PREDICTIONS)
    if prediction == "epsilon":
        return predict_x0_from_eps(schedule, x_t, t, output), output
    if prediction == "x0":
        return output, predict_eps_from_x0(schedule, x_t, t, output)
    return x0_eps_from_v(schedule, x_t, t, output)


def prediction_target(schedule, x0, t, noise, prediction):
    """The regression target the model is trained on: eps (noise), x0, or v (Salimans & Ho 2022)."""
    check_choice("prediction", prediction, PREDICTIONS)
    if prediction == "epsilon":
        return noise
    if prediction == "x0":
        return x0
    return predict_v(schedule, x0, t, noise)


def loss_weights(schedule, t, prediction="epsilon", weighting="uniform", min_snr_gamma=5.0):
    """Per-sample loss weights, host float64 (N,).

    uniform: 1 (DDPM's L_simple). min_snr (Hang et al. 2023, eq. 9 and sec. 3.4): the x0-space weight min(SNR, gamma),
    divided by what the target's MSE already carries relative to x0's: eps-MSE = SNR x0-MSE, v-MSE = (SNR + 1) x0-MSE,
    so eps: min(SNR, gamma)/SNR = gamma / max(SNR, gamma) (written so SNR = 0 gives 1, not 0/0);
    x0: min(SNR, gamma); v: min(SNR, gamma)/(SNR + 1).
    """
    check_choice("prediction", prediction, PREDICTIONS)
    check_choice("weighting", weighting, WEIGHTINGS)
    t = np.asarray(t)
    if weighting == "uniform":
        return np.ones(t.shape, dtype=np.float64)
    if not min_snr_gamma > 0:
        raise ValueError(f"min_snr_gamma must be > 0, got {min_snr_gamma}")
    snr = schedule.snr[t]
    if prediction == "epsilon":
        return min_snr_gamma / np.maximum(snr, min_snr_gamma)
    if prediction == "x0":
        return np.minimum(snr, min_snr_gamma)
    return np.minimum(snr, min_snr_gamma) / (snr + 1.0)


# --- timestep samplers ---------------------------------------------------------------------------------------------
class UniformSampler:
    """t ~ U{0, ..., T-1}, importance weights 1 (DDPM, Algorithm 1)."""

    def __init__(self, num_timesteps):
        if num_timesteps < 1:
            raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
        self.num_timesteps = int(num_timesteps)

    def probabilities(self):
        """p_t = 1/T, host float64 (T,)."""
        return np.full(self.num_timesteps, 1.0 / self.num_timesteps)

    def sample(self, n, rng):
        """-> (t host int64 (n,), weights host float64 (n,) all ones)."""
        return rng.integers(0, self.num_timesteps, size=n, dtype=np.int64), np.ones(n, dtype=np.float64)

    def update(self, t, losses):
        """Nothing to learn."""

    def state_dict(self):
        """Plain numbers and arrays (for HDF5), enough to resume exactly."""
        return {"num_timesteps": self.num_timesteps}

    def load_state_dict(self, state):
        """Restore from `state_dict()`; a different T is a ValueError."""
        if int(state["num_timesteps"]) != self.num_timesteps:
            raise ValueError(f"num_timesteps mismatch: state has {state['num_timesteps']}, "
                             f"sampler {self.num_timesteps}")


class LossAwareSampler(UniformSampler):
    """Improved DDPM sec. 3.3 importance sampling: p_t ∝ sqrt(E[L_t^2]) over the last `history` losses of each t,
    mixed with uniform: p = (1 - uniform_prob) p / sum(p) + uniform_prob / T; weights 1 / (T p_t) keep the loss
    unbiased. Uniform until every t has `history` losses (as improved-diffusion's LossSecondMomentResampler).
    """

    def __init__(self, num_timesteps, history=10, uniform_prob=0.001):
        super().__init__(num_timesteps)
        if int(history) < 1:
            raise ValueError(f"history must be >= 1, got {history}")
        if not 0.0 <= uniform_prob <= 1.0:
            raise ValueError(f"uniform_prob must lie in [0, 1], got {uniform_prob}")
        self.history, self.uniform_prob = int(history), float(uniform_prob)
        self.loss_history = np.zeros((self.num_timesteps, self.history), dtype=np.float64)
        self.loss_counts = np.zeros(self.num_timesteps, dtype=np.int64)

    def warmed_up(self):
        """True once every t holds `history` losses."""
        return bool((self.loss_counts == self.history).all())

    def probabilities(self):
        """Host float64 (T,), sums to 1."""
        if not self.warmed_up():
            return super().probabilities()
        p = np.sqrt(np.mean(self.loss_history ** 2, axis=-1))
        total = p.sum()
        p = p / total if total > 0 else np.full_like(p, 1.0 / self.num_timesteps)
        return p * (1.0 - self.uniform_prob) + self.uniform_prob / self.num_timesteps

    def sample(self, n, rng):
        """-> (t host int64 (n,) drawn from p, weights 1 / (T p_t) host float64 (n,))."""
        p = self.probabilities()
        t = rng.choice(self.num_timesteps, size=n, p=p).astype(np.int64)
        return t, 1.0 / (self.num_timesteps * p[t])

    def update(self, t, losses):
        """Record per-sample losses (host (N,)) in the history of their t, oldest dropped first, in batch order."""
        t, losses = np.asarray(t), np.asarray(losses, dtype=np.float64)
        if t.shape != losses.shape:
            raise ValueError(f"t and losses must have the same shape, got {t.shape} and {losses.shape}")
        for ti, loss in zip(t.tolist(), losses.tolist()):
            if self.loss_counts[ti] == self.history:
                self.loss_history[ti, :-1] = self.loss_history[ti, 1:]
                self.loss_history[ti, -1] = loss
            else:
                self.loss_history[ti, self.loss_counts[ti]] = loss
                self.loss_counts[ti] += 1

    def state_dict(self):
        """Config plus loss_history (T, history) float64 and loss_counts (T,) int64, copied."""
        return {"num_timesteps": self.num_timesteps, "history": self.history, "uniform_prob": self.uniform_prob,
                "loss_history": self.loss_history.copy(), "loss_counts": self.loss_counts.copy()}

    def load_state_dict(self, state):
        """Restore from `state_dict()` (T and history must match)."""
        super().load_state_dict(state)
        if int(state["history"]) != self.history:
            raise ValueError(f"history mismatch: state has {state['history']}, sampler {self.history}")
        self.uniform_prob = float(state["uniform_prob"])
        self.loss_history = np.array(state["loss_history"], dtype=np.float64).reshape(self.num_timesteps, self.history)
        self.loss_counts = np.array(state["loss_counts"], dtype=np.int64).reshape(self.num_timesteps)


# --- the training loss ---------------------------------------------------------------------------------------------
class LossOutput(NamedTuple):
    loss: Any             # 0-d backend array (not synchronised to the host)
    dout: Any             # d loss / d model_output, backend (N, ...)
    per_sample_loss: Any  # backend (N,): Min-SNR weight * MSE, before the importance weight
    t: np.ndarray         # host int64 (N,)
    model_output: Any     # backend (N, ...)


def training_loss(model_fn, x0, schedule, rng, prediction="epsilon", weighting="uniform", min_snr_gamma=5.0,
                  timestep_sampler=None, t=None, noise=None) -> LossOutput:
    """L = (1/N) sum_i w_i (1/D) sum_j (out_ij - target_ij)^2 (DDPM eq. 14 generalised), and dL/dout.

    w_i = importance weight 1/(T p_t) (1 when t is given or sampling is uniform) * the weighting's factor
    (`loss_weights`). Draws, in this order and only when not given: t from `timestep_sampler` (uniform by default)
    with the host rng, then noise = rng.standard_normal(x0.shape) moved to x0's backend in x0's dtype.
    dL/dout_ij = 2 w_i (out_ij - target_ij) / (N D).
    x0: backend (N, ...); model_fn(x_t, t) -> (N, ...).
    """
    check_choice("prediction", prediction, PREDICTIONS)
    check_choice("weighting", weighting, WEIGHTINGS)
    be, xp = backend_of(x0), get_array_module(x0)
    n = x0.shape[0]
    if t is None:
        sampler = timestep_sampler or UniformSampler(schedule.num_train_timesteps)
        t, importance = sampler.sample(n, rng)
    else:
        t, importance = np.asarray(t, dtype=np.int64), np.ones(n, dtype=np.float64)
    if noise is None:
        noise = rng.standard_normal(x0.shape)
    noise = be.asarray(noise, dtype=x0.dtype)
    out = model_fn(q_sample(schedule, x0, t, noise), t)
    if tuple(out.shape) != tuple(x0.shape):
        raise ValueError(f"model output shape {tuple(out.shape)} must equal the input shape {tuple(x0.shape)}")
    diff = out - prediction_target(schedule, x0, t, noise, prediction)
    weight = loss_weights(schedule, t, prediction, weighting, min_snr_gamma)
    mse = xp.mean(diff * diff, axis=tuple(range(1, x0.ndim)))
    per_sample = be.asarray(weight, dtype=x0.dtype) * mse
    w = be.asarray(weight * importance, dtype=x0.dtype)
    loss = xp.mean(w * mse)
    scale = w.reshape((n,) + (1,) * (x0.ndim - 1)) * (2.0 / x0.size)
    return LossOutput(loss=loss, dout=scale * diff, per_sample_loss=per_sample, t=t, model_output=out)
