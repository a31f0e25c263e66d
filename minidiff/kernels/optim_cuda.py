"""One-launch optimizer updates for CuPy: each parameter's (or chunk of parameters') whole step as a single kernel.

Why: on a GPU every `out=` operation of the generic step (`Optimizer.step` -> `_update`) is its own kernel launch,
about ten per parameter for Adam, and with ~100 parameter arrays of a few thousand elements each it is the launches,
not the arithmetic, that set the step's time. Parameters laid end to end with gradients laid out alike (a model's
own, minidiff.kernels.flat) take one launch per chunk of up to Optimizer.CHUNK_SIZE_GPU elements: one for a small
model.
These kernels compute the same equations as the classes' `_update` (see their docstrings), term by term in the same
order, and write θ_t, the state buffers in place.

They agree with the generic path to float32 rounding, not bit for bit: nvcc contracts a * b + c into one fused
multiply-add, which rounds once where NumPy rounds twice. `tests/backend/test_gpu.py` compares them with NumPy.

Used by `Optimizer.step` when the array module is CuPy, `ENABLED` is true, the step asks for no diagnostics (they need
u_t and the buffers before the step) and the optimizer has a kernel (Adam/AdamW without AMSGrad, SGD in every form);
every other case takes the generic path. The kernels are built from the module object the optimizer already holds,
so this file imports nothing from CuPy itself.
"""

from __future__ import annotations

import numpy as np

from minidiff.backend import is_cupy_module
from minidiff.kernels.cuda import elementwise_kernel

ENABLED = True   # tests switch it off to compare with the generic path on the same device

# The kernels' lines are the docstrings' equations, one for one (symbols there: γ lr, β1 β2 betas, ε eps,
# λ weight_decay, μ momentum, τ dampening, c1 c2 bias corrections; the scalars arrive precomputed as named). The
# CUDA source stays plain ASCII with no comments, so the equations are written out here.

# g_t = ±∇f(θ_{t-1}) + λ θ_{t-1}, in Optimizer._effective_grad's order (λθ first, then ±∇f added)
_EFFECTIVE_GRAD = "T g = wd_coupled != (T)0 ? wd_coupled * theta + sign * grad : sign * grad;"

# m_t = m_{t-1} + (1 − β1)(g_t − m_{t-1});  v_t = β2 v_{t-1} + (1 − β2) g_t²;
# u_t = −(γ / c1) m_t / (√v_t / √c2 + ε), and for AdamW u_t −= γ λ θ_{t-1};  θ_t = θ_{t-1} + u_t
_ADAM = _EFFECTIVE_GRAD + """
m = m + (g - m) * one_minus_beta1;
v = v * beta2 + (g * one_minus_beta2) * g;
T u = m / (sqrt(v) / sqrt_c2 + eps) * neg_step_size;
if (neg_lr_wd != (T)0) u = u + theta * neg_lr_wd;
theta = theta + u;
"""

# b_1 = g_1, b_t = μ b_{t-1} + (1 − τ) g_t;  d_t = g_t + μ b_t (Nesterov) or b_t;  θ_t = θ_{t-1} − γ d_t
_SGD_MOMENTUM = _EFFECTIVE_GRAD + """
b = first ? g : b * momentum + g * one_minus_dampening;
T d = nesterov ? b * momentum + g : b;
theta = theta + d * neg_lr;
"""

# θ_t = θ_{t-1} − γ g_t
_SGD = _EFFECTIVE_GRAD + "theta = theta + g * neg_lr;"

_GRAD_IN = "T grad, T sign, T wd_coupled"


def available(xp) -> bool:
    return ENABLED and is_cupy_module(xp)


_SIGNATURES = {   # name -> (in_params, out_params, body)
    "adam": (_GRAD_IN + ", T one_minus_beta1, T beta2, T one_minus_beta2, T sqrt_c2, T eps, T neg_step_size, "
                        "T neg_lr_wd", "T theta, T m, T v", _ADAM),
    "sgd_momentum": (_GRAD_IN + ", T momentum, T one_minus_dampening, T neg_lr, int32 first, int32 nesterov",
                     "T theta, T b", _SGD_MOMENTUM),
    "sgd": (_GRAD_IN + ", T neg_lr", "T theta", _SGD),
}


def _kernel(xp, name: str):
    return elementwise_kernel(xp, *_SIGNATURES[name], "minidiff_" + name)


def _launch_all(opt, grads, name, scalars, buffer_names) -> None:
    """kernel(grad, *scalars(dtype type), theta, *buffers) for every chunk of parameters laid end to end whose
    gradients are laid out alike (Optimizer.chunk_grads: one launch for a small model), else for every parameter. The
    step's scalars are made once per dtype, in that dtype, as NumPy rounds a Python float against an array of it."""
    kernel, made = _kernel(opt.xp, name), {}
    by_chunk = opt.chunk_grads(grads) if opt.chunks_apply() else None
    if by_chunk is not None:
        work = [(chunk.theta, grad, chunk.state) for chunk, grad in zip(opt.chunks, by_chunk)]
    else:
        work = [(theta, grads[pname], opt.state[pname]) for pname, theta in opt.params.items()]
    for theta, grad, state in work:
        dt = theta.dtype
        if dt not in made:
            made[dt] = scalars(dt.type)
        if grad.dtype != dt:   # the generic path casts too, into its scratch of the parameter's dtype
            grad = grad.astype(dt)
        kernel(grad, *made[dt], theta, *(state[b] for b in buffer_names))


def _grad_scalars(opt, t) -> tuple:
    """sign and coupled λ of g_t = ±∇f + λθ."""
    return t(-1.0 if opt.maximize else 1.0), t(opt.weight_decay if opt.coupled_weight_decay else 0.0)


def adam(opt, grads: dict, coef: dict) -> None:
    """θ, m, v <- one Adam/AdamW step (`Adam._update` plus θ += u) of every parameter, a launch per chunk or array."""
    decoupled = 0.0 if opt.coupled_weight_decay else -opt.lr * opt.weight_decay
    _launch_all(opt, grads, "adam", lambda t: (*_grad_scalars(opt, t), t(1.0 - opt.beta1), t(opt.beta2),
                                               t(1.0 - opt.beta2), t(coef["sqrt_c2"]), t(opt.eps),
                                               t(-coef["step_size"]), t(decoupled)),
                ("exp_avg", "exp_avg_sq"))


def sgd(opt, grads: dict, coef: dict) -> None:
    """θ (and the momentum buffer) <- one SGD step (`SGD._update` plus θ += u) of every parameter, a launch per chunk
    or array."""
    if opt.momentum == 0.0:
        _launch_all(opt, grads, "sgd", lambda t: (*_grad_scalars(opt, t), t(-opt.lr)), ())
        return
    _launch_all(opt, grads, "sgd_momentum",
                lambda t: (*_grad_scalars(opt, t), t(opt.momentum), t(1.0 - opt.dampening), t(-opt.lr),
                           np.int32(opt.step_count == 1), np.int32(opt.nesterov)),
                ("momentum_buffer",))
