"""A small digits classifier whose penultimate layer is the feature space of minidiff's Frechet distance.

Built from the layer pairs in `minidiff.nn.layers`, with a hand-written backward like every model here:

    h1 = SiLU(conv1(x))             conv 3x3, 1 -> 16, padding 1        (N, 16, 8, 8)
    h2 = SiLU(conv2(h1))            conv 3x3, 16 -> 32, stride 2, pad 1 (N, 32, 4, 4)
    f  = SiLU(features(flat(h2)))   linear 512 -> 64                    (N, 64)   <- the FD features
    z  = logits(f)                  linear 64 -> 10                     (N, 10)

Trained with softmax cross-entropy and `minidiff.optim.Adam` (`train_digits_classifier`, run by
`scripts/train_classifier.py`); the shipped weights live in `data/digits_classifier.npz` with their test accuracy.
Images are (N, 1, 8, 8) in [-1, 1], as `load_dataset("digits")` gives them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from minidiff.backend import Backend, backend_of, get_array_module, get_backend, resolve_dtype, to_numpy
from minidiff.nn.layers import (conv2d_backward, conv2d_forward, conv2d_params, init_param, linear_backward,
                                linear_forward, linear_params, named_specs, silu_backward, silu_forward)
from minidiff.datasets.builtin import bundled_file
from minidiff.optim import Adam

CLASSIFIER_FILE = "digits_classifier.npz"
NUM_CLASSES = 10


# --- softmax cross-entropy ------------------------------------------------------------------------------------------

def softmax_cross_entropy_forward(logits, labels):
    """Mean cross-entropy L = (1/N) sum_i [log sum_k exp z_ik - z_{i, y_i}].

    logits (N, K) backend array, labels host int array (N,) -> (loss 0-d backend array, cache). The log-sum-exp is
    taken after subtracting each row's max, so large logits do not overflow.
    """
    xp = get_array_module(logits)
    n, k = logits.shape
    labels = np.asarray(labels)
    if labels.shape != (n,) or labels.dtype.kind not in "iu":
        raise ValueError(f"labels must be a host int array of shape ({n},), got {labels.dtype} {labels.shape}")
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = xp.exp(shifted)
    sum_exp = exp.sum(axis=1, keepdims=True)
    onehot = backend_of(logits).asarray(np.eye(k)[labels], dtype=logits.dtype)
    loss = xp.mean(xp.log(sum_exp[:, 0]) - (shifted * onehot).sum(axis=1))
    return loss, (exp / sum_exp, onehot)


# dL/dz_ik = (1/N) (d/dz_ik log sum_j exp z_ij - [k = y_i]) = (softmax(z_i)_k - onehot_ik) / N.
def softmax_cross_entropy_backward(cache):
    """-> dlogits (N, K) for dout = 1 on the mean loss."""
    probs, onehot = cache
    return (probs - onehot) / probs.shape[0]


# --- the network ----------------------------------------------------------------------------------------------------

class DigitsClassifier:
    """conv -> SiLU -> conv(stride 2) -> SiLU -> linear features -> SiLU -> linear logits (see the module doc).

    params: dict name -> backend array with PyTorch names ("conv1.weight", ...), initialised like PyTorch's layers
    from a seeded host generator. forward(x) keeps caches for backward(dlogits); features(x) keeps nothing.
    """

    def __init__(self, channels=(16, 32), feature_dim=64, image_size=8, seed=0, dtype="float32", device=None):
        c1, c2 = channels
        self.config = dict(channels=[int(c1), int(c2)], feature_dim=int(feature_dim), image_size=int(image_size),
                           seed=int(seed))
        self.dtype = resolve_dtype(dtype)
        self.backend = device if isinstance(device, Backend) else get_backend(device)
        flat = c2 * ((image_size + 1) // 2) ** 2
        spec = {"conv1": conv2d_params(1, c1, 3), "conv2": conv2d_params(c1, c2, 3),
                "features": linear_params(flat, feature_dim), "logits": linear_params(feature_dim, NUM_CLASSES)}
        rng = np.random.default_rng(seed)
        self.params = {name: self.backend.asarray(init_param(rng, shape, init), dtype=self.dtype)
                       for prefix, sp in spec.items() for name, shape, init in named_specs(prefix, sp)}
        self._tape = None

    def _trunk(self, x, tape):
        """x (N, 1, H, W) -> features (N, feature_dim), pushing caches onto tape (a list) when it is not None."""
        p = self.params
        steps = []
        h, c = conv2d_forward(x, p["conv1.weight"], p["conv1.bias"], stride=1, padding=1)
        steps.append(c)
        h, c = silu_forward(h)
        steps.append(c)
        h, c = conv2d_forward(h, p["conv2.weight"], p["conv2.bias"], stride=2, padding=1)
        steps.append(c)
        h, c = silu_forward(h)
        steps += [c, h.shape]
        h, c = linear_forward(h.reshape(h.shape[0], -1), p["features.weight"], p["features.bias"])
        steps.append(c)
        f, c = silu_forward(h)
        steps.append(c)
        if tape is not None:
            tape.extend(steps)
        return f

    def _input(self, x):
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"need images (N, 1, H, W), got shape {tuple(x.shape)}")
        return self.backend.asarray(x, dtype=self.dtype)

    def features(self, x):
        """x (N, 1, H, W) host or backend array in [-1, 1] -> penultimate activations (N, feature_dim), backend."""
        return self._trunk(self._input(x), None)

    def forward(self, x):
        """x (N, 1, H, W) -> logits (N, 10); keeps the caches for `backward`."""
        self._tape = []
        f = self._trunk(self._input(x), self._tape)
        z, c = linear_forward(f, self.params["logits.weight"], self.params["logits.bias"])
        self._tape.append(c)
        return z

    def backward(self, dlogits):
        """dlogits (N, 10) -> {name: gradient} for every parameter (pops the caches in reverse order)."""
        if self._tape is None:
            raise RuntimeError("backward needs a forward(x) first (and runs once per forward)")
        tape, grads = self._tape, {}
        self._tape = None

        def layer(name, backward_fn, d):
            dx, g = backward_fn(d, tape.pop())
            grads.update({f"{name}.{k}": v for k, v in g.items()})
            return dx

        d = layer("logits", linear_backward, dlogits)
        d = silu_backward(d, tape.pop())[0]
        d = layer("features", linear_backward, d)
        d = d.reshape(tape.pop())
        d = silu_backward(d, tape.pop())[0]
        d = layer("conv2", conv2d_backward, d)
        d = silu_backward(d, tape.pop())[0]
        layer("conv1", conv2d_backward, d)
        return {name: grads[name] for name in self.params}

    def predict(self, x, batch_size=512):
        """x (N, 1, H, W) -> host int64 class labels (N,), evaluated in batches without caches."""
        out = []
        for i in range(0, x.shape[0], batch_size):
            f = self.features(x[i:i + batch_size])
            z, _ = linear_forward(f, self.params["logits.weight"], self.params["logits.bias"])
            out.append(to_numpy(z.argmax(axis=1)))
        return np.concatenate(out).astype(np.int64)

    def accuracy(self, x, labels) -> float:
        """Fraction of x classified as labels (host int array (N,))."""
        return float(np.mean(self.predict(x) == np.asarray(labels)))

    # --- weights file -----------------------------------------------------------------------------------------------
    def save(self, path, **meta) -> None:
        """Write the parameters (float32) and a JSON `meta` record (config plus whatever is given) to an .npz file."""
        arrays = {name: np.asarray(to_numpy(p), dtype=np.float32) for name, p in self.params.items()}
        record = dict(meta, config=self.config)
        np.savez_compressed(path, __meta__=np.array(json.dumps(record)), **arrays)

    def load_params(self, arrays) -> None:
        """Copy host arrays into the parameters; names and shapes must match."""
        missing, extra = set(self.params) - set(arrays), set(arrays) - set(self.params)
        if missing or extra:
            raise KeyError(f"classifier parameter names differ: missing {sorted(missing)}, unexpected {sorted(extra)}")
        for name, p in self.params.items():
            if tuple(arrays[name].shape) != tuple(p.shape):
                raise ValueError(f"{name}: shape {tuple(arrays[name].shape)} does not match {tuple(p.shape)}")
            p[...] = self.backend.asarray(arrays[name], dtype=self.dtype)


def default_classifier_path() -> Path:
    """The shipped weights: `data/digits_classifier.npz`, found like the bundled digits ($MINIDIFF_DATA_DIR first)."""
    return bundled_file(CLASSIFIER_FILE)


def load_classifier(path=None, device=None, dtype="float32") -> DigitsClassifier:
    """Load a classifier written by `DigitsClassifier.save` (default: the shipped weights). Its `meta` attribute holds
    the saved record (config, test accuracy, how it was trained)."""
    path = default_classifier_path() if path is None else Path(path)
    with np.load(path) as f:
        meta = json.loads(str(f["__meta__"]))
        arrays = {k: f[k] for k in f.files if k != "__meta__"}
    cfg = meta["config"]
    clf = DigitsClassifier(channels=tuple(cfg["channels"]), feature_dim=cfg["feature_dim"],
                           image_size=cfg["image_size"], seed=cfg["seed"], dtype=dtype, device=device)
    clf.load_params(arrays)
    clf.meta = meta
    return clf


# --- training -------------------------------------------------------------------------------------------------------

def train_digits_classifier(train_x, train_y, epochs=20, batch_size=64, lr=2e-3, seed=0, log=None,
                            device=None) -> DigitsClassifier:
    """Minibatch Adam on the mean softmax cross-entropy; the data order is reshuffled each epoch by a seeded host RNG.

    train_x (N, 1, H, W) host images in [-1, 1], train_y host int labels (N,). No early stopping and no look at any
    held-out data, so the test accuracy reported afterwards is honest. log(epoch, mean_loss, seconds) per epoch.
    """
    clf = DigitsClassifier(image_size=train_x.shape[-1], seed=seed, device=device)
    opt = Adam(clf.params, lr=lr)
    rng = np.random.default_rng(seed)
    n, start = train_x.shape[0], time.perf_counter()
    for epoch in range(epochs):
        order = rng.permutation(n)
        total = None
        for i in range(0, n, batch_size):
            idx = order[i:i + batch_size]
            loss, cache = softmax_cross_entropy_forward(clf.forward(train_x[idx]), train_y[idx])
            opt.step(clf.backward(softmax_cross_entropy_backward(cache)))
            total = loss * len(idx) if total is None else total + loss * len(idx)
        if log is not None:
            log(epoch + 1, float(to_numpy(total)) / n, time.perf_counter() - start)
    return clf
