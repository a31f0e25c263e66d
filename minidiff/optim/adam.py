"""Adam (with AMSGrad and switchable bias correction) and AdamW, with PyTorch's semantics."""

from __future__ import annotations

from minidiff.kernels import optim_cuda as fused
from minidiff.optim.base import Optimizer, check_beta, check_positive



def update_moments(xp, m, v, g, tmp, beta1: float, beta2: float) -> None:
    """The moments Adam and NAdam share, in place (tmp is scratch like g):
        m_t = m_{t-1} + (1 − β1)(g_t − m_{t-1})   = β1 m_{t-1} + (1 − β1) g_t  (PyTorch's lerp form)
        v_t = β2 v_{t-1} + (1 − β2) g_t²"""
    xp.subtract(g, m, out=tmp)
    tmp *= 1.0 - beta1
    m += tmp
    v *= beta2
    xp.multiply(g, 1.0 - beta2, out=tmp)
    tmp *= g
    v += tmp

class Adam(Optimizer):
    r"""Adam exactly as `torch.optim.Adam` defines it (torch/optim/adam.py, `_single_tensor_adam`).

    Symbols: γ = lr, β1, β2 = betas, ε = eps, λ = weight_decay, m = first moment ("exp_avg"), v = second moment
    ("exp_avg_sq"), v^max ("max_exp_avg_sq", AMSGrad), t = 1, 2, ... the step count. One step, in code order:

        g_t = ∇f(θ_{t-1})                     (−∇f when maximize=True)
        g_t = g_t + λ θ_{t-1}                 coupled L2 weight decay (Adam only; AdamW decays θ instead, below)
        m_t = m_{t-1} + (1 − β1)(g_t − m_{t-1})   = β1 m_{t-1} + (1 − β1) g_t  (PyTorch's lerp form)
        v_t = β2 v_{t-1} + (1 − β2) g_t²
        v_t^max = max(v_{t-1}^max, v_t)       AMSGrad only, on the *raw* v; then v_t^max replaces v_t below
        c1 = 1 − β1^t,  c2 = 1 − β2^t         bias corrections (both 1 with bias_correction=False; under per-bucket
                                              first moments c1 counts the bucket's own updates of m instead of t,
                                              minidiff.optim.bucket_momentum)
        D_t = √v_t / √c2 + ε                  = √v̂_t + ε, with v̂_t = v_t / c2
        u_t = −(γ / c1) · m_t / D_t           = −γ m̂_t / (√v̂_t + ε), with m̂_t = m_t / c1
        θ_t = θ_{t-1} + u_t

    Why the corrections: m and v start at 0, so early on they are averages shrunk toward 0 by the factor c1 (c2);
    dividing by it makes m̂, v̂ unbiased for a stationary gradient. At t = 1, m̂ = g and v̂ = g², so the first step
    is −γ g / (|g| + ε) ≈ −γ sign(g) whatever the gradient's scale. Without the correction (constant g) the step is
    −γ (1 − β1^t) / (1 − β2^t)^½ · sign(g): 3.2 γ at t = 1, a peak of 6.6 γ at t = 12, still 1.26 γ at t = 1000 for
    the default betas — v, the slower average, lags m, so early steps are too large. Where ε sits matters when v is
    small: here it is added to the *corrected* √v̂; TF1's Adam (the original DDPM code) adds it to the uncorrected √v,
    i.e. uses ε √c2 in this formula.

    Momentum forms: m is the EMA form of momentum (form 3 in `SGD`'s docstring), v_0 = 0 start included; with the
    bias correction, m̂ is a properly normalised average and γ multiplies it alone, so a change of γ mid-run acts on the
    whole averaged direction at once, like PyTorch's SGD form and unlike v = μv − γg.
    """

    elementwise_update = True   # chunks of parameters (Optimizer._lay_out_chunks)
    name = "adam"
    hyper_names = ("lr", "beta1", "beta2", "eps", "weight_decay", "amsgrad", "maximize", "bias_correction")

    def __init__(self, params: dict, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, amsgrad: bool = False, maximize: bool = False,
                 bias_correction: bool = True):
        self.beta1, self.beta2 = betas
        self.eps, self.weight_decay = eps, weight_decay
        self.validate()
        self.beta1, self.beta2, self.eps, self.weight_decay = map(float, (*betas, eps, weight_decay))
        self.amsgrad, self.maximize, self.bias_correction = bool(amsgrad), bool(maximize), bool(bias_correction)
        super().__init__(params, lr)

    @property
    def betas(self) -> tuple:
        return (self.beta1, self.beta2)

    def validate(self) -> None:
        super().validate()
        check_beta("betas[0]", self.beta1)
        check_beta("betas[1]", self.beta2)
        check_positive("eps", self.eps)

    def buffer_names(self) -> tuple:
        return ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if self.amsgrad else ())

    def direction_buffer(self, name: str):
        return self.state[name]["exp_avg"]

    def _coefficients(self) -> dict:
        t = self.step_count   # c1 counts the updates of m: t, or its bucket's own count (first_moment_steps)
        c1 = 1.0 - self.beta1 ** self.first_moment_steps() if self.bias_correction else 1.0
        c2 = 1.0 - self.beta2 ** t if self.bias_correction else 1.0
        return {"c1": c1, "c2": c2, "sqrt_c2": c2 ** 0.5, "step_size": self.lr / c1}

    @property
    def _fused_update(self):
        # the kernel is this class's _update: a subclass that changes the rule must not inherit it
        return fused.adam if type(self)._update is Adam._update and not self.amsgrad else None

    def _update(self, st, theta, g, tmp, u, coef, diag) -> None:
        xp = self._xp
        m, v = st["exp_avg"], st["exp_avg_sq"]
        update_moments(xp, m, v, g, tmp, self.beta1, self.beta2)
        if self.amsgrad:
            xp.maximum(st["max_exp_avg_sq"], v, out=st["max_exp_avg_sq"])   # v_t^max = max(v_{t-1}^max, v_t)
            v = st["max_exp_avg_sq"]
        xp.sqrt(v, out=tmp)                             # D_t = √v_t / √c2 + ε
        tmp /= coef["sqrt_c2"]
        tmp += self.eps
        xp.divide(m, tmp, out=u)                        # m_t / D_t  (= c1 · m̂_t / (√v̂_t + ε))
        if diag is not None:
            diag.add_rms("adam_ratio_rms", u)           # divided by c1 in _diag_host
        u *= -coef["step_size"]                         # u_t = −(γ / c1) m_t / D_t
        if not self.coupled_weight_decay and self.weight_decay != 0.0:
            xp.multiply(theta, -self.lr * self.weight_decay, out=tmp)   # AdamW: u_t −= γ λ θ_{t-1}
            u += tmp

    def _diag_host(self, diag, coef) -> None:
        # RMS of m̂ / (√v̂ + ε) = RMS(m / D) / c1: near 1 when gradient signs are consistent, ≪ 1 when noise dominates
        diag.sums["adam_ratio_rms"] = diag.sums["adam_ratio_rms"] / coef["c1"] ** 2
        diag.host.update(bias_correction1=coef["c1"], bias_correction2=coef["c2"])


class AdamW(Adam):
    r"""AdamW (Loshchilov & Hutter 2019) exactly as `torch.optim.AdamW`: Adam with *decoupled* weight decay.

    Same symbols and steps as `Adam`, except that λ never enters the gradient (so it never enters m or v):

        g_t = ∇f(θ_{t-1})                     (−∇f when maximize=True)
        m_t, v_t, (v_t^max), c1, c2, D_t      as in Adam, from the raw g_t
        u_t = −γ λ θ_{t-1} − (γ / c1) · m_t / D_t
        θ_t = θ_{t-1} + u_t

    PyTorch writes this as θ ← θ (1 − γλ) first, then the Adam step; both use θ_{t-1}, so it is the same update.
    With coupled decay (Adam's weight_decay) the λθ term is divided by √v̂ like the gradient, so heavily-updated
    weights are barely decayed; decoupled decay shrinks every weight by the same factor (1 − γλ) per step.
    Default λ = 1e-2, as in PyTorch.
    """

    name = "adamw"
    coupled_weight_decay = False

    def __init__(self, params: dict, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, maximize: bool = False,
                 bias_correction: bool = True):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize, bias_correction)
