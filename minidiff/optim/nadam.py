"""NAdam: Adam with Nesterov momentum and a momentum warmup schedule, with PyTorch's semantics."""

from __future__ import annotations

from minidiff.optim.adam import update_moments
from minidiff.optim.base import Optimizer, check_beta, check_nonnegative, check_positive


class NAdam(Optimizer):
    r"""NAdam (Dozat 2016) exactly as `torch.optim.NAdam` defines it (torch/optim/nadam.py, `_single_tensor_nadam`).

    Symbols as in `Adam`, plus ψ = momentum_decay and the momentum schedule μ_t with its running product Π_t
    ("mu_product", a host number kept in the state). One step, in code order:

        g_t = ∇f(θ_{t-1})                     (−∇f when maximize=True)
        g_t = g_t + λ θ_{t-1}                 coupled weight decay (decoupled_weight_decay=False, the default)
        μ_t = β1 (1 − ½ · 0.96^{t ψ}),  μ_{t+1} = β1 (1 − ½ · 0.96^{(t+1) ψ})
        Π_t = Π_{t-1} μ_t                     (Π_0 = 1)
        m_t = m_{t-1} + (1 − β1)(g_t − m_{t-1})   = β1 m_{t-1} + (1 − β1) g_t
        v_t = β2 v_{t-1} + (1 − β2) g_t²
        D_t = √(v_t / (1 − β2^t)) + ε         = √v̂_t + ε
        u_t = −γ (1 − μ_t) / (1 − Π_t) · g_t / D_t  −  γ μ_{t+1} / (1 − Π_t μ_{t+1}) · m_t / D_t
              (− γ λ θ_{t-1} with decoupled_weight_decay=True, the AdamW way, instead of the coupled term)
        θ_t = θ_{t-1} + u_t

    Reading it: the bracket is a bias-corrected Nesterov look-ahead of m. Plain Nesterov (`SGD`, form 4) steps along
    g_t + μ b_t, the gradient plus the *next* momentum; NAdam does the same with Adam's EMA momentum, each term
    divided by its own bias correction (1 − Π). The momentum coefficient is warmed up: μ_1 ≈ β1/2, rising toward β1
    as 0.96^{tψ} → 0 (slowly: with ψ = 4e-3, μ_t is 0.58 β1 at t = 1000 and 0.90 β1 at t = 10 000) — a cure for
    the early steps, when m is an average over too few gradients to be trusted.
    """

    elementwise_update = True   # chunks of parameters (Optimizer._lay_out_chunks)
    name = "nadam"
    hyper_names = ("lr", "beta1", "beta2", "eps", "weight_decay", "momentum_decay", "decoupled_weight_decay",
                   "maximize")
    scalar_state_names = ("step", "mu_product")

    def __init__(self, params: dict, lr: float = 2e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, momentum_decay: float = 4e-3, decoupled_weight_decay: bool = False,
                 maximize: bool = False):
        self.beta1, self.beta2 = betas
        self.eps, self.weight_decay, self.momentum_decay = eps, weight_decay, momentum_decay
        self.validate()
        self.beta1, self.beta2, self.eps, self.weight_decay, self.momentum_decay = map(
            float, (*betas, eps, weight_decay, momentum_decay))
        self.decoupled_weight_decay, self.maximize = bool(decoupled_weight_decay), bool(maximize)
        self.mu_product = 1.0
        super().__init__(params, lr)

    @property
    def betas(self) -> tuple:
        return (self.beta1, self.beta2)

    @property
    def coupled_weight_decay(self) -> bool:
        return not self.decoupled_weight_decay

    def validate(self) -> None:
        super().validate()
        check_beta("betas[0]", self.beta1)
        check_beta("betas[1]", self.beta2)
        check_positive("eps", self.eps)
        check_nonnegative("momentum_decay", self.momentum_decay)

    def buffer_names(self) -> tuple:
        return ("exp_avg", "exp_avg_sq")

    def direction_buffer(self, name: str):
        return self.state[name]["exp_avg"]

    def _coefficients(self) -> dict:
        """Advances the momentum schedule's product Π_t (host state) and returns this step's coefficients."""
        t, b1, psi = self.step_count, self.beta1, self.momentum_decay
        mu = b1 * (1.0 - 0.5 * (0.96 ** (t * psi)))
        mu_next = b1 * (1.0 - 0.5 * (0.96 ** ((t + 1) * psi)))
        self.mu_product *= mu
        return {"c2": 1.0 - self.beta2 ** t, "mu": mu,
                "coef_g": -self.lr * (1.0 - mu) / (1.0 - self.mu_product),
                "coef_m": -self.lr * mu_next / (1.0 - self.mu_product * mu_next)}

    def _update(self, st, theta, g, tmp, u, coef, diag) -> None:
        xp = self._xp
        m, v = st["exp_avg"], st["exp_avg_sq"]
        update_moments(xp, m, v, g, tmp, self.beta1, self.beta2)
        xp.divide(v, coef["c2"], out=tmp)               # D_t = √(v_t / (1 − β2^t)) + ε
        xp.sqrt(tmp, out=tmp)
        tmp += self.eps
        xp.divide(g, tmp, out=u)                        # u_t = coef_g · g_t / D_t + coef_m · m_t / D_t
        u *= coef["coef_g"]
        xp.divide(m, tmp, out=g)
        g *= coef["coef_m"]
        u += g
        if self.decoupled_weight_decay and self.weight_decay != 0.0:
            xp.multiply(theta, -self.lr * self.weight_decay, out=tmp)   # u_t −= γ λ θ_{t-1}
            u += tmp

    def _diag_host(self, diag, coef) -> None:
        diag.host.update(mu=coef["mu"], bias_correction2=coef["c2"])
