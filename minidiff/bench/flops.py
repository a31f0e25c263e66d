"""FLOPs of a UNet training step or forward pass, counted from the layer shapes; the machine's BLAS and matmul peak.

What is counted: the matrix products only -- convolutions, linear layers and the two attention products -- at
2 FLOPs per multiply-add, as PyTorch's `torch.utils.flop_counter.FlopCounterMode` counts them (the tests check the
two agree exactly on the twin):

  conv     2 * N * Cout * Hout * Wout * Cin * kh * kw          (forward; the bias add is not counted)
  linear   2 * N * fin * fout
  attention  q^T k and v p^T: 2 * (2 * N * L * L * C), L = H * W tokens, C = heads * head_dim channels

Backward: each product Y = W X needs dW = dY X^T and dX = W^T dY, each as large as the forward, so backward = 2x
forward -- except where the input needs no gradient (the image into `conv_in`, the sinusoidal embedding into
`time_embed.0`): there only dW is counted, since neither we nor PyTorch have to form dX. Attention's backward is
four products (dv, dp, dq, dk), again 2x its forward.

Not counted: GroupNorm, SiLU, softmax, residual adds, upsampling, concatenation and the optimizer update. They are
O(activations) elementwise work (a few % of the product FLOPs here), memory-bound, and leaving them out keeps
"GFLOP/s" comparable with the matrix-multiply peak it is divided by.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field

import numpy as np

from minidiff.backend import resolve_dtype


def conv2d_flops(n, cin, cout, k, hout, wout):
    """Forward FLOPs of a k x k Conv2d producing (n, cout, hout, wout) from cin channels."""
    return 2 * n * cout * hout * wout * cin * k * k


def linear_flops(n, fin, fout):
    """Forward FLOPs of a Linear(fin, fout) on n rows."""
    return 2 * n * fin * fout


def attention_flops(n, channels, tokens):
    """Forward FLOPs of the two attention products (scores and weighted values) over `tokens` positions.

    The head split does not change the count: heads * (L * L * head_dim) = L * L * channels per product.
    """
    return 2 * (2 * n * tokens * tokens * channels)


@dataclass
class FlopCount:
    """Per-layer counts: rows of (name, kind, forward, backward) and their totals."""

    layers: list = field(default_factory=list)

    def add(self, name, kind, forward, input_grad=True):
        """Record a product layer; its backward is dW (= forward) plus dX (= forward) when the input needs one."""
        self.layers.append((name, kind, forward, forward * (2 if input_grad else 1)))

    @property
    def forward(self) -> int:
        return sum(row[2] for row in self.layers)

    @property
    def backward(self) -> int:
        return sum(row[3] for row in self.layers)

    @property
    def training(self) -> int:
        """Forward + backward: one training step (the optimizer update is not a product and is not counted)."""
        return self.forward + self.backward

    def by_kind(self) -> dict:
        """kind -> forward + backward FLOPs, e.g. {"conv": ..., "linear": ..., "attention": ...}."""
        out: dict = {}
        for _, kind, fwd, bwd in self.layers:
            out[kind] = out.get(kind, 0) + fwd + bwd
        return out


def _conv(count, conv, n, h, w, input_grad=True):
    """Count a minidiff.models.blocks.Conv (or Upsample, already at its output resolution) on an (h, w) input ->
    (ho, wo)."""
    cout, cin, k, _ = conv.spec["weight"][0]
    ho, wo = (h + 2 * conv.padding - k) // conv.stride + 1, (w + 2 * conv.padding - k) // conv.stride + 1
    count.add(conv.name, "conv", conv2d_flops(n, cin, cout, k, ho, wo), input_grad)
    return ho, wo


def _res_block(count, block, n, h, w):
    """A ResBlock keeps the resolution: conv1, temb_proj, conv2 and the 1x1 skip when channels change."""
    for layer in ("conv1", "conv2", "skip"):
        if layer in block.spec:
            cout, cin, k, _ = block.spec[layer]["weight"][0]
            count.add(f"{block.name}.{layer}", "conv", conv2d_flops(n, cin, cout, k, h, w))
    fout, fin = block.spec["temb_proj"]["weight"][0]
    count.add(f"{block.name}.temb_proj", "linear", linear_flops(n, fin, fout))


def _attn_block(count, block, n, h, w):
    c = block.channels
    count.add(f"{block.name}.qkv", "conv", conv2d_flops(n, c, 3 * c, 1, h, w))
    count.add(f"{block.name}.attention", "attention", attention_flops(n, c, h * w))
    count.add(f"{block.name}.proj", "conv", conv2d_flops(n, c, c, 1, h, w))


def _level(count, lvl, n, h, w, upsample):
    for res, attn in zip(lvl.res, lvl.attn):
        _res_block(count, res, n, h, w)
        if attn is not None:
            _attn_block(count, attn, n, h, w)
    if lvl.resample is None:
        return h, w
    if upsample:  # nearest 2x first, then the 3x3 conv runs at the doubled resolution
        h, w = 2 * h, 2 * w
    return _conv(count, lvl.resample, n, h, w)


def unet_flops(model, batch, height, width) -> FlopCount:
    """Walk a minidiff.models.unet.UNet's modules in forward order for a (batch, C, height, width) input.

    -> FlopCount; `.forward` is one forward pass, `.training` one forward + backward (see the module docstring).
    """
    n, count = batch, FlopCount()
    for i, (name, spec) in enumerate(model.time_spec.items()):
        fout, fin = spec["weight"][0]
        count.add(name, "linear", linear_flops(n, fin, fout), input_grad=i > 0)  # t's embedding needs no gradient
    h, w = _conv(count, model.conv_in, n, height, width, input_grad=False)   # nor does the image
    for lvl in model.down:
        h, w = _level(count, lvl, n, h, w, upsample=False)
    res1, attn, res2 = model.mid
    _res_block(count, res1, n, h, w)
    if attn is not None:
        _attn_block(count, attn, n, h, w)
    _res_block(count, res2, n, h, w)
    for lvl in reversed(model.up):
        h, w = _level(count, lvl, n, h, w, upsample=True)
    cout, cin, k, _ = model.out_spec["out_conv"]["weight"][0]
    count.add("out_conv", "conv", conv2d_flops(n, cin, cout, k, h, w))
    return count


# --- the machine: its BLAS, threads and matrix-multiply peak ----------------------------------------------------

def blas_info() -> dict:
    """What threadpoolctl says about NumPy's BLAS, plus the OpenBLAS variables that change its kernels."""
    env = {k: os.environ[k] for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OMP_NUM_THREADS") if k in os.environ}
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return {"blas": "unknown (pip install threadpoolctl)", "blas_threads": None, "env": env}
    pools = [p for p in threadpool_info() if p.get("user_api") == "blas"]
    if not pools:
        return {"blas": "none found", "blas_threads": None, "env": env}
    p = pools[0]
    name = f"{p.get('internal_api')} {p.get('version')} ({p.get('architecture') or '?'} kernels)"
    return {"blas": name, "blas_threads": p.get("num_threads"), "env": env}


@contextlib.contextmanager
def limit_threads(threads):
    """Limit NumPy's BLAS to `threads` (None: leave it) for the duration; needs threadpoolctl to limit."""
    if threads is None:
        yield
        return
    from threadpoolctl import threadpool_limits
    with threadpool_limits(limits=int(threads), user_api="blas"):
        yield


def matmul_peak_gflops(backend, dtype="float32", n=None, repeats=5) -> float:
    """Best-of-`repeats` GFLOP/s of an n x n x n matmul (2 n^3 FLOPs) on this backend: the machine's usable peak."""
    n = n or (8192 if backend.name == "cupy" else 2048)
    rng, dt = np.random.default_rng(0), resolve_dtype(dtype)
    a, b = (backend.asarray(rng.standard_normal((n, n)), dtype=dt) for _ in range(2))
    out = backend.xp.empty((n, n), dtype=dt)
    backend.xp.matmul(a, b, out=out)  # warm-up: thread pool start, GPU handle and kernel choice
    best = float("inf")
    for _ in range(repeats):
        backend.synchronize()
        t0 = time.perf_counter()
        backend.xp.matmul(a, b, out=out)
        backend.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best / 1e9
