"""Gradients by central finite differences in float64, and the relative error the suite holds them to.

Relative error is CS231n's elementwise max |a - b| / (|a| + |b|), with the denominator floored at 1e-3 of the
tensor's largest |a| + |b|: central differences carry an absolute error near 1e-10, which makes the relative error of
an element that happens to sit near zero (GroupNorm and SiLU gradients cross zero) meaningless. The bar is 1e-6.
"""

import numpy as np

from minidiff.backend import to_numpy

H = 1e-5  # central-difference step: truncation ~H^2 and round-off ~1e-16/H both stay far below the 1e-6 bar


def rel_error(a, b):
    scale = np.abs(a) + np.abs(b)
    return float(np.max(np.abs(a - b) / np.maximum(scale, max(1e-3 * scale.max(), 1e-12))))


def numeric_grad(f, a, dout):
    """d sum(f() * dout) / d a by central differences; `a` is a host array that f() reads (perturbed in place).

    The two outputs are subtracted before the sum, so outputs an element does not touch cancel exactly instead of
    adding the round-off of the whole sum to every difference.
    """
    g = np.zeros_like(a)
    for idx in np.ndindex(a.shape):
        old = a[idx]
        a[idx] = old + H
        up = f()
        a[idx] = old - H
        down = f()
        a[idx] = old
        g[idx] = np.sum((up - down) * dout) / (2 * H)
    return g


def check_gradients(backend, forward, backward, inputs, wrt, seed=0, **kwargs):
    """forward(**inputs, **kwargs) on `backend`; compare backward's gradients with finite differences.

    inputs: name -> host float64 array; wrt: input name -> "dx" | key of the backward's grads dict | index into a
    tuple dx. Returns the worst relative error (also asserted <= 1e-6).
    """
    def run():
        return forward(**{k: backend.asarray(v, dtype=np.float64) for k, v in inputs.items()}, **kwargs)

    out, cache = run()
    dout = np.random.default_rng(seed).standard_normal(out.shape)
    dx, grads = backward(backend.asarray(dout, dtype=np.float64), cache)

    def f():
        return to_numpy(run()[0])

    worst = 0.0
    for name, which in wrt.items():
        analytic = dx if which == "dx" else dx[which] if isinstance(which, int) else grads[which]
        err = rel_error(to_numpy(analytic), numeric_grad(f, inputs[name], dout))
        assert err <= 1e-6, f"{forward.__name__}: gradient wrt {name} off by {err:.2e}"
        worst = max(worst, err)
    return worst


def randn(rng, *shape):
    return rng.standard_normal(shape)
