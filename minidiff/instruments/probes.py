"""Instruments for the momentum study: how gradients differ across timesteps, how noisy they are, how they align.

    edges = bucket_edges(T, 4)                                         # t buckets [0, 250), [250, 500), ...
    probe = timestep_bucket_gradients(model, schedule, x0_probe, 4)    # per-bucket |g| and the B x B cosine matrix
    ns = noise_scale(model, schedule, x0_batch, micro_batches=4)  # B_simple = tr(Sigma) / |G|^2, overall, per bucket
    cosine(grads, buffers), momentum_alignment(grads, opt), GradientCosine, update_to_weight(before, after)

Probes that run extra forward/backward passes (the first two) take a FIXED host batch and draw t and noise from a
seeded host generator of their own, so at a given step they are a function of the weights only and never disturb
the training run's random stream; they return host NumPy numbers. They overwrite nothing but the model's tape: call
them between training steps. The cheap per-step instruments (cosines, update ratios) return 0-d backend arrays and
never synchronise, like the optimizers' diagnostics; copy them to the host (`to_float`) only where they are logged.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from minidiff.backend import backend_of, get_array_module, to_numpy
from minidiff.diffusion.losses import training_loss


# --- timestep buckets -----------------------------------------------------------------------------------------------

def bucket_edges(num_timesteps, buckets) -> np.ndarray:
    """buckets: a count B (equal-width buckets over t in [0, T)) or explicit increasing edges [0, ..., T].

    -> host int64 edges (B + 1,): bucket b holds t with edges[b] <= t < edges[b + 1]; every bucket is non-empty.
    """
    if np.ndim(buckets) == 0:
        b = int(buckets)
        if not 1 <= b <= num_timesteps:
            raise ValueError(f"buckets must be in [1, {num_timesteps}], got {buckets}")
        return np.round(np.linspace(0, num_timesteps, b + 1)).astype(np.int64)
    edges = np.asarray(buckets, dtype=np.int64)
    if edges.ndim != 1 or len(edges) < 2 or edges[0] != 0 or edges[-1] != num_timesteps or np.any(np.diff(edges) <= 0):
        raise ValueError(f"bucket edges must rise strictly from 0 to {num_timesteps}, got {list(buckets)}")
    return edges


def bucket_index(t, edges) -> np.ndarray:
    """Host t (N,) -> host int64 bucket of each t (N,)."""
    return np.searchsorted(edges, np.asarray(t), side="right").astype(np.int64) - 1


def bucket_sums(values, t, edges):
    """Per-bucket sums of per-sample values without leaving the device (for per-bucket training loss).

    values: backend (N,) (e.g. `LossOutput.per_sample_loss`), t host int (N,) -> (sums backend (B,), counts host
    int64 (B,)); mean = sums / counts where counts > 0. One (B, N) one-hot matrix goes to the device.
    """
    idx = bucket_index(t, edges)
    onehot = np.zeros((len(edges) - 1, len(idx)))
    onehot[idx, np.arange(len(idx))] = 1.0
    return backend_of(values).asarray(onehot, dtype=values.dtype) @ values, np.bincount(idx, minlength=len(edges) - 1)


# --- flattened gradients --------------------------------------------------------------------------------------------

def flatten(grads: dict, dtype=np.float64):
    """{name: array} -> one backend vector (P,) in `dtype`, parameters in dict order."""
    arrays = list(grads.values())
    xp = get_array_module(*arrays)
    return xp.concatenate([a.reshape(-1).astype(dtype) for a in arrays])


def _gram_to_norms_cosines(gram):
    """Host Gram matrix (B, B) of flattened gradients -> (norms (B,), cosines (B, B)); a zero gradient has cosine 0."""
    norms = np.sqrt(np.clip(np.diag(gram), 0.0, None))
    denom = np.maximum(np.outer(norms, norms), 1e-300)
    cos = np.clip(gram / denom, -1.0, 1.0)
    np.fill_diagonal(cos, (norms > 0).astype(np.float64))
    return norms, cos


class BucketProbe(NamedTuple):
    edges: np.ndarray       # int64 (B + 1,)
    losses: np.ndarray      # float64 (B,): the probe batch's loss in each bucket
    grad_norms: np.ndarray  # float64 (B,): |g_b|
    cosine: np.ndarray      # float64 (B, B): cos(g_a, g_b), symmetric, ones on the diagonal
    t: np.ndarray           # int64 (B, N): the timesteps used for each bucket
    grads: list | None      # [{name: backend array}] per bucket, only with keep_grads=True
    split_half: np.ndarray | None = None   # float64 (B,): cos(g_b on one half, g_b on the other); split_half=True


def _probe_inputs(model, x0_probe):
    return model.backend.asarray(to_numpy(x0_probe), dtype=model.dtype)


def timestep_bucket_gradients(model, schedule, x0_probe, buckets=4, rng_seed=0, prediction="epsilon",
                              weighting="uniform", min_snr_gamma=5.0, keep_grads=False,
                              split_half=False) -> BucketProbe:
    """The loss gradient on a fixed probe batch, computed separately for each timestep bucket.

    x0_probe: host (N, ...). From numpy.random.default_rng(rng_seed): first the noise (N, ...), shared by every
    bucket, then for each bucket b in order t_b ~ U{edges[b], ..., edges[b+1] - 1}^N. g_b = grad of
    `diffusion.training_loss` (mean over the N samples) at (x0_probe, t_b, noise). Same seed, same weights -> same
    numbers, so changes over training are changes of the weights. cos(g_a, g_b) is taken over all parameters
    flattened, in float64. Costs B forward/backward passes on N samples.

    Because the loss is a per-sample mean and the models have no batch coupling, the mean of the g_b equals the
    gradient of the B*N batch (x0_probe repeated, t = concat(t_b), the noise repeated).

    split_half=True adds each bucket's split-half cosine cos(g_b^A, g_b^B), the gradients of the same loss on the
    first and the second h = N // 2 rows (x0, t_b, noise) of the probe batch (an odd last row left out): the
    ceiling a cross-bucket cosine of N-sample gradients is read against. Two independent h-sample estimates of a
    gradient G with per-sample covariance Sigma meet at cos ~ |G|^2 / (|G|^2 + tr(Sigma) / h), so a value near 1
    means the bucket's gradient is measured well, near 0 that it is noise. Costs 2B more passes of h samples and
    changes none of the other numbers.
    """
    edges = bucket_edges(schedule.num_train_timesteps, buckets)
    x0 = _probe_inputs(model, x0_probe)
    rng = np.random.default_rng(rng_seed)
    noise = rng.standard_normal(x0.shape)
    ts = np.stack([rng.integers(lo, hi, size=x0.shape[0], dtype=np.int64) for lo, hi in zip(edges[:-1], edges[1:])])
    loss_kw = dict(prediction=prediction, weighting=weighting, min_snr_gamma=min_snr_gamma)
    losses, flats, kept, halves = [], [], [], []
    for t in ts:
        out = training_loss(model.forward, x0, schedule, None, t=t, noise=noise, **loss_kw)
        grads = model.backward(out.dout)
        losses.append(out.loss)
        flats.append(flatten(grads))
        if keep_grads:
            kept.append(grads)
        if split_half:
            halves.append(_split_half_cosine(model, schedule, x0, t, noise, loss_kw))
    xp = get_array_module(flats[0])
    m = xp.stack(flats)
    gram = to_numpy(m @ m.T)
    norms, cos = _gram_to_norms_cosines(gram)
    return BucketProbe(edges, to_numpy(xp.stack(losses)).astype(np.float64), norms, cos, ts,
                       kept if keep_grads else None, np.array(halves, dtype=np.float64) if split_half else None)


def _split_half_cosine(model, schedule, x0, t, noise, loss_kw) -> float:
    """cos between the loss gradients on rows [0, h) and [h, 2h) of (x0, t, noise), h = N // 2; host float."""
    h = x0.shape[0] // 2
    if h < 1:
        raise ValueError(f"a split-half cosine needs a probe batch of at least 2 samples, got {x0.shape[0]}")
    a, b = (flatten(model.backward(training_loss(model.forward, x0[sl], schedule, None, t=t[sl], noise=noise[sl],
                                                 **loss_kw).dout))
            for sl in (slice(0, h), slice(h, 2 * h)))
    gram = to_numpy(get_array_module(a).stack([a @ a, a @ b, b @ b]))
    return float(np.clip(gram[1] / max(np.sqrt(gram[0] * gram[2]), 1e-300), -1.0, 1.0))


# --- gradient noise scale -------------------------------------------------------------------------------------------

class NoiseScaleEstimate(NamedTuple):
    b_simple: object     # tr(Sigma) / |G|^2 (inf where the |G|^2 estimate is <= 0)
    trace_sigma: object  # tr(Sigma), the per-sample gradient covariance's trace
    grad_sq: object      # |G|^2, the squared norm of the true gradient
    g_small_sq: object   # the inputs: |G_small|^2 and |G_big|^2 as measured
    g_big_sq: object


def noise_scale_from_norms(g_small_sq, g_big_sq, b_small, b_big) -> NoiseScaleEstimate:
    """McCandlish et al. 2018, appendix A: unbiased |G|^2 and tr(Sigma) from gradient norms at two batch sizes.

    With E|G_B|^2 = |G|^2 + tr(Sigma) / B for a mean gradient over B independent samples:
        |G|^2     = (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
        tr(Sigma) = (|G_small|^2 - |G_big|^2) / (1 / B_small - 1 / B_big)
    Host numbers or NumPy arrays (element-wise, e.g. per bucket). Each estimate is unbiased but B_simple, their
    ratio, is not: for a stable curve average tr(Sigma) and |G|^2 over several probes before dividing (the paper).
    """
    if not 0 < b_small < b_big:
        raise ValueError(f"need 0 < b_small < b_big, got {b_small}, {b_big}")
    g_small_sq, g_big_sq = np.asarray(g_small_sq, dtype=np.float64), np.asarray(g_big_sq, dtype=np.float64)
    grad_sq = (b_big * g_big_sq - b_small * g_small_sq) / (b_big - b_small)
    trace = (g_small_sq - g_big_sq) / (1.0 / b_small - 1.0 / b_big)
    with np.errstate(divide="ignore", invalid="ignore"):
        b_simple = np.where(grad_sq > 0, trace / np.where(grad_sq > 0, grad_sq, 1.0), np.inf)
    return NoiseScaleEstimate(b_simple[()], trace[()], grad_sq[()], g_small_sq[()], g_big_sq[()])


class NoiseScale(NamedTuple):
    overall: NoiseScaleEstimate      # t ~ U{0, ..., T-1}
    per_bucket: NoiseScaleEstimate   # arrays (B,), t restricted to each bucket; None without buckets
    edges: np.ndarray | None
    b_small: int
    b_big: int


def _micro_batch_norms(model, schedule, x0, noise, t, k, loss_kw):
    """K equal micro-batches of (x0, t, noise) -> host (mean_k |g_k|^2, |mean_k g_k|^2), accumulated in float64."""
    b = x0.shape[0] // k
    total, small_sq = None, None
    for i in range(k):
        sl = slice(i * b, (i + 1) * b)
        out = training_loss(model.forward, x0[sl], schedule, None, t=t[sl], noise=noise[sl], **loss_kw)
        g = flatten(model.backward(out.dout))
        sq = g @ g
        total = g if total is None else total + g
        small_sq = sq if small_sq is None else small_sq + sq
    big = total / k
    return float(to_numpy(small_sq)) / k, float(to_numpy(big @ big))


def noise_scale(model, schedule, x0_batch, micro_batches=4, buckets=None, rng_seed=0, prediction="epsilon",
                weighting="uniform", min_snr_gamma=5.0) -> NoiseScale:
    """Gradient noise scale B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018) at the current weights.

    x0_batch: host (N, ...), split into K = micro_batches equal micro-batches of B_small = N // K samples (a
    remainder is dropped); B_big = K * B_small. The K micro-batch gradients g_k give |G_small|^2 = mean_k |g_k|^2
    and their mean gives |G_big|^2 (the B_big-sample gradient), fed to `noise_scale_from_norms`. From
    numpy.random.default_rng(rng_seed): the noise, then t ~ U{0..T-1} for the overall estimate, then per bucket (if
    `buckets`) t within the bucket for the same x0 and noise. Costs K (1 + B) forward/backward passes of B_small.
    """
    k = int(micro_batches)
    if k < 2 or x0_batch.shape[0] // k < 1:
        raise ValueError(f"need micro_batches >= 2 and at least one sample per micro-batch, got {micro_batches} "
                         f"for a batch of {x0_batch.shape[0]}")
    b_small = x0_batch.shape[0] // k
    x0 = _probe_inputs(model, x0_batch[:k * b_small])
    T = schedule.num_train_timesteps
    rng = np.random.default_rng(rng_seed)
    noise = rng.standard_normal(x0.shape)
    loss_kw = dict(prediction=prediction, weighting=weighting, min_snr_gamma=min_snr_gamma)
    small, big = _micro_batch_norms(model, schedule, x0, noise, rng.integers(0, T, size=x0.shape[0]), k, loss_kw)
    overall = noise_scale_from_norms(small, big, b_small, k * b_small)
    if buckets is None:
        return NoiseScale(overall, None, None, b_small, k * b_small)
    edges = bucket_edges(T, buckets)
    norms = np.array([_micro_batch_norms(model, schedule, x0, noise, rng.integers(lo, hi, size=x0.shape[0]), k,
                                         loss_kw) for lo, hi in zip(edges[:-1], edges[1:])])
    per_bucket = noise_scale_from_norms(norms[:, 0], norms[:, 1], b_small, k * b_small)
    return NoiseScale(overall, per_bucket, edges, b_small, k * b_small)


# --- alignment: momentum, consecutive gradients, update size --------------------------------------------------------

def _dot_norms(a: dict, b: dict):
    missing = set(a) ^ set(b)
    if missing:
        raise KeyError(f"the two dicts differ in {sorted(missing)}")
    xp = get_array_module(*a.values())
    dot = sum(xp.vdot(a[k], b[k]) for k in a)
    na = sum(xp.vdot(a[k], a[k]) for k in a)
    nb = sum(xp.vdot(b[k], b[k]) for k in a)
    return xp, dot, na, nb


def cosine(a: dict, b: dict):
    """cos between two dicts of arrays (same keys and shapes) flattened into one vector each: 0-d backend array.

    <a, b> / (|a| |b|), with 0 when either is all zero (e.g. a momentum buffer before the first step).
    """
    xp, dot, na, nb = _dot_norms(a, b)
    return dot / xp.maximum(xp.sqrt(na * nb), 1e-30)


def momentum_alignment(grads: dict, optimizer):
    """cos(g_t, buffer_{t-1}) over all parameters: the gradient against the optimizer's momentum buffer (SGD) or
    first moment m (Adam, NAdam), via `optimizer.direction_buffer(name)`. Call it BEFORE `optimizer.step(grads)`,
    when the buffer does not yet hold g_t (a negative value: the new gradient opposes the accumulated direction).
    Uses the raw gradient (the optimizer's own `cos_grad_momentum` diagnostic includes coupled weight decay).
    -> 0-d backend array, or None for an optimizer without a buffer (plain SGD).
    """
    buffers = {name: optimizer.direction_buffer(name) for name in grads}
    if any(b is None for b in buffers.values()):
        return None
    return cosine(grads, buffers)


class GradientCosine:
    """cos(g_t, g_{t-1}) between consecutive gradients: keeps a copy of the last gradient (one model's worth).

    update(grads) -> 0-d backend array, or None on the first call. Call it on the gradient the optimizer will use
    (after clipping: a global scale does not change the cosine, so either is fine).
    """

    def __init__(self):
        self.previous = None

    def update(self, grads: dict):
        result = None if self.previous is None else cosine(grads, self.previous)
        if self.previous is None:
            self.previous = {k: v.copy() for k, v in grads.items()}
        else:
            for k, v in grads.items():
                self.previous[k][...] = v
        return result

    def reset(self) -> None:
        self.previous = None


def snapshot(params: dict) -> dict:
    """Copies of the parameters (on their backend), to measure an update against: `update_to_weight(before, after)`."""
    return {k: v.copy() for k, v in params.items()}


def layer_of(name: str) -> str:
    """Parameter name -> its layer: "down.0.res.0.conv1.weight" -> "down.0.res.0.conv1"."""
    return name.rsplit(".", 1)[0]


def update_to_weight(before: dict, after: dict, per="layer") -> dict:
    """|theta_t - theta_{t-1}| / |theta_{t-1}| per layer (per="layer", a layer's weight and bias together) or per
    parameter (per="param"): {name: 0-d backend array}. An all-zero theta_{t-1} (a zero-initialised output layer)
    divides by 1e-30, so its ratio is huge rather than NaN.
    """
    if per not in ("layer", "param"):
        raise ValueError(f"per must be 'layer' or 'param', got {per!r}")
    xp = get_array_module(*before.values())
    du2, w2 = {}, {}
    for name, old in before.items():
        key = layer_of(name) if per == "layer" else name
        d = after[name] - old
        du2[key] = du2.get(key, 0.0) + xp.vdot(d, d)
        w2[key] = w2.get(key, 0.0) + xp.vdot(old, old)
    return {k: xp.sqrt(du2[k]) / xp.maximum(xp.sqrt(w2[k]), 1e-30) for k in du2}
