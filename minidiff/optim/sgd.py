"""Stochastic gradient descent: plain, heavy-ball momentum and Nesterov momentum, with PyTorch's semantics."""

from __future__ import annotations

from minidiff.kernels import optim_cuda as fused
from minidiff.optim.base import Optimizer, check_nonnegative


class SGD(Optimizer):
    r"""SGD exactly as `torch.optim.SGD` defines it (torch/optim/sgd.py, `_single_tensor_sgd`).

    Symbols: θ parameters, γ = lr, μ = momentum, τ = dampening, λ = weight_decay, b = the momentum buffer
    ("momentum_buffer"), t = 1, 2, ... the step count. One step, in the order the code runs it:

        g_t = ∇f(θ_{t-1})                     (−∇f(θ_{t-1}) when maximize=True)
        g_t = g_t + λ θ_{t-1}                 coupled L2 weight decay, when λ ≠ 0
        if μ ≠ 0:
            b_t = g_t                         t = 1: the buffer starts as a copy of g_1 (no dampening; under
                                              per-bucket buffers, a bucket's first step: bucket_momentum)
            b_t = μ b_{t-1} + (1 − τ) g_t     t > 1
            d_t = g_t + μ b_t                 Nesterov
            d_t = b_t                         otherwise (heavy ball)
        else:
            d_t = g_t
        u_t = −γ d_t
        θ_t = θ_{t-1} + u_t

    Nesterov needs μ > 0 and τ = 0. Under a constant gradient g (τ = 0) b_t → g / (1 − μ), so the step tends to
    γ g / (1 − μ): momentum multiplies the effective learning rate by 1 / (1 − μ) (10 for μ = 0.9).

    How the other common ways of writing momentum map onto this one:

    1. Polyak's heavy ball, v_t = μ v_{t-1} − γ g_t, θ_t = θ_{t-1} + v_t (CS231n; equivalently
       θ_{t+1} = θ_t − α ∇f(θ_t) + β (θ_t − θ_{t-1}) with α = γ, β = μ). With τ = 0, v_t = −γ b_t, so the two are
       the same trajectory — while γ is constant. The PyTorch form applies the *current* γ to the whole buffer, i.e.
       to every past gradient; the v form keeps each past gradient at the γ it was taken with. Change γ at step s
       (a schedule, warmup) and the two part from step s on: after a drop from γ to γ/10 the v form still carries
       the old, large steps in its velocity for ~1/(1 − μ) steps, the PyTorch form slows down at once.
    2. u_t = μ u_{t-1} + γ g_t, θ_t = θ_{t-1} − u_t: form 1 with u = −v; same agreement, same caveat.
    3. The EMA form v_t = β v_{t-1} + (1 − β) g_t, θ_t = θ_{t-1} − γ v_t (Adam's first moment, started at v_0 = 0).
       Unrolled, v_t = (1 − β) Σ_i β^{t-i} g_i and (τ = 0, μ = β) b_t = Σ_i β^{t-i} g_i, so it is exactly this class
       with τ = 0 and γ' = γ (1 − β) — even under a schedule, as long as γ' tracks γ. With τ = μ = β instead it agrees
       only up to the first gradient: PyTorch skips dampening at t = 1 (b_1 = g_1, not (1 − β) g_1), so g_1 keeps a
       1 / (1 − β) times larger weight, fading as β^t. The EMA form's steady step under a constant gradient is γ g, not
       γ g / (1 − μ): the same "momentum 0.9" means a 10x different step size.
    4. Sutskever et al. (2013) Nesterov: v_t = μ v_{t-1} − γ ∇f(θ_{t-1} + μ v_{t-1}), θ_t = θ_{t-1} + v_t, the
       gradient taken at the look-ahead point φ = θ + μ v. Substituting φ_t = θ_t + μ v_t gives
       φ_t = φ_{t-1} + μ v_t − γ ∇f(φ_{t-1}), and with v_t = −γ b_t this is the Nesterov branch above:
       b_t = μ b_{t-1} + g_t, φ_t = φ_{t-1} − γ (g_t + μ b_t). PyTorch's parameters are Sutskever's look-ahead
       point φ, not θ; the identification v = −γ b again holds only while γ is constant.
    """

    elementwise_update = True   # chunks of parameters (Optimizer._lay_out_chunks)
    name = "sgd"
    hyper_names = ("lr", "momentum", "dampening", "nesterov", "weight_decay", "maximize")

    def __init__(self, params: dict, lr: float, momentum: float = 0.0, dampening: float = 0.0,
                 nesterov: bool = False, weight_decay: float = 0.0, maximize: bool = False):
        self.momentum, self.dampening, self.nesterov = momentum, dampening, nesterov
        self.weight_decay, self.maximize = weight_decay, maximize
        self.validate()
        self.momentum, self.dampening, self.nesterov = float(momentum), float(dampening), bool(nesterov)
        self.weight_decay, self.maximize = float(weight_decay), bool(maximize)
        super().__init__(params, lr)

    def validate(self) -> None:
        super().validate()
        check_nonnegative("momentum", self.momentum)
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError(f"nesterov requires momentum > 0 and dampening == 0, "
                             f"got momentum={self.momentum!r}, dampening={self.dampening!r}")

    def buffer_names(self) -> tuple:
        return ("momentum_buffer",) if self.momentum != 0.0 else ()

    def direction_buffer(self, name: str):
        return self.state[name]["momentum_buffer"] if self.momentum != 0.0 else None

    @property
    def _fused_update(self):
        # see Adam._fused_update; the kernel knows only the global step count, not a bucket's (first_moment_steps)
        own_rule = type(self)._update is SGD._update
        return fused.sgd if own_rule and self.first_moment_step_count is None else None

    def _update(self, st, theta, g, tmp, u, coef, diag) -> None:
        xp, lr, mu = self._xp, self.lr, self.momentum
        if mu == 0.0:
            xp.multiply(g, -lr, out=u)                  # u_t = −γ g_t
            return
        b = st["momentum_buffer"]
        if self.first_moment_steps() == 1:
            b[...] = g                                  # b_1 = g_1
        else:
            b *= mu                                     # b_t = μ b_{t-1} + (1 − τ) g_t
            if self.dampening != 0.0:
                xp.multiply(g, 1.0 - self.dampening, out=tmp)
                b += tmp
            else:
                b += g
        if self.nesterov:
            xp.multiply(b, mu, out=u)                   # d_t = g_t + μ b_t
            u += g
            u *= -lr                                    # u_t = −γ d_t
        else:
            xp.multiply(b, -lr, out=u)                  # u_t = −γ b_t
