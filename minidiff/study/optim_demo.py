r"""The optimizers on two classic 2-D problems: how many steps each needs, and what its path looks like.

Quadratic: f(x) = ½ (x − x*)ᵀ A (x − x*), A = R diag(1, κ) Rᵀ rotated by 30° (so no optimizer's per-coordinate scaling
can undo it), condition number κ. The tuned settings come from the theory for eigenvalues in [μ, L] = [1, κ]:
gradient descent γ = 2 / (L + μ), rate (κ − 1)/(κ + 1) per step; heavy ball γ = 4 / (√L + √μ)², momentum
((√κ − 1)/(√κ + 1))², rate (√κ − 1)/(√κ + 1): about √κ times fewer steps; Nesterov γ = 1/L, momentum
(√κ − 1)/(√κ + 1). Adam has no such theory; its settings are hand-picked.

Rosenbrock: f(x, y) = (1 − x)² + 100 (y − x²)² from (−1.5, 2), minimum at (1, 1) at the end of a long curved valley
whose floor is ~1000x flatter than its walls. The settings are hand-picked: for SGD the largest round learning rate
stable from the start (the Hessian's top eigenvalue there is ~1900); heavy ball is stable up to γ λ < 2 (1 + μ), so it
can keep that γ with μ = 0.9 and runs ~10x faster along the valley floor. NAdam is given momentum_decay 4e-2: with the
default 4e-3 its momentum μ_t stays near β1/2 for thousands of steps, half of each step is then a normalised raw
gradient that does not shrink near the minimum, and it hovers ~1e-3 away from (1, 1) instead of converging.
AdamW runs with weight_decay 0 (decay would move the minimum away from (1, 1)), so it matches Adam step for step.

Everything runs in float64 on NumPy through the same optimizer classes a model uses (params {"x": array of 2}).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from minidiff.optim import build_optimizer

PROBLEMS = ("quadratic", "rosenbrock")
DEMO_OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "adamw", "nadam")


@dataclass(frozen=True)
class Quadratic:
    kappa: float = 100.0
    angle: float = math.pi / 6
    x0: tuple = (-1.5, 2.0)

    @property
    def hessian(self) -> np.ndarray:
        c, s = math.cos(self.angle), math.sin(self.angle)
        rot = np.array([[c, -s], [s, c]])
        return rot @ np.diag([1.0, self.kappa]) @ rot.T

    @property
    def x_star(self) -> np.ndarray:
        return np.array([1.0, 1.0])

    def value(self, x):
        d = x - self.x_star
        return 0.5 * d @ self.hessian @ d

    def grad(self, x):
        return self.hessian @ (x - self.x_star)


@dataclass(frozen=True)
class Rosenbrock:
    x0: tuple = (-1.5, 2.0)

    @property
    def x_star(self) -> np.ndarray:
        return np.array([1.0, 1.0])

    def value(self, x):
        return (1.0 - x[0]) ** 2 + 100.0 * (x[1] - x[0] ** 2) ** 2

    def grad(self, x):
        r = x[1] - x[0] ** 2
        return np.array([-2.0 * (1.0 - x[0]) - 400.0 * x[0] * r, 200.0 * r])


def make_problem(name: str, kappa: float = 100.0):
    if name == "quadratic":
        return Quadratic(kappa=kappa)
    if name == "rosenbrock":
        return Rosenbrock()
    raise ValueError(f"unknown problem {name!r}; choose one of {', '.join(PROBLEMS)}")


def tuned_hyper(problem, optimizer: str) -> dict:
    """The settings the table uses: theory-optimal on the quadratic where theory exists, hand-picked otherwise."""
    if isinstance(problem, Quadratic):
        mu, big_l = 1.0, problem.kappa
        q = (math.sqrt(big_l) - math.sqrt(mu)) / (math.sqrt(big_l) + math.sqrt(mu))
        table = {"sgd": {"lr": 2.0 / (big_l + mu)},
                 "momentum": {"lr": 4.0 / (math.sqrt(big_l) + math.sqrt(mu)) ** 2, "momentum": q * q},
                 "nesterov": {"lr": 1.0 / big_l, "momentum": q},
                 "adam": {"lr": 0.05}, "adamw": {"lr": 0.05, "weight_decay": 0.0}, "nadam": {"lr": 0.05}}
    else:
        table = {"sgd": {"lr": 1e-3}, "momentum": {"lr": 1e-3, "momentum": 0.9},
                 "nesterov": {"lr": 1e-3, "momentum": 0.9},
                 "adam": {"lr": 0.02}, "adamw": {"lr": 0.02, "weight_decay": 0.0},
                 "nadam": {"lr": 2e-3, "momentum_decay": 4e-2}}
    if optimizer not in table:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose from {', '.join(DEMO_OPTIMIZERS)}")
    return dict(table[optimizer])


@dataclass
class Trajectory:
    problem_name: str
    problem: object
    optimizer: str
    hyper: dict
    path: np.ndarray  # (steps + 1, 2): x_0 ... x_k
    steps_to_tol: int | None  # first k with ||x_k − x*|| <= tol, None if not within max_steps
    final_distance: float = field(default=float("nan"))


def optimize(problem, optimizer: str, tol: float = 1e-6, max_steps: int = 40000, hyper: dict | None = None,
             problem_name: str = "") -> Trajectory:
    """Iterate until ||x − x*|| <= tol or max_steps; the whole path is kept for plotting."""
    hyper = tuned_hyper(problem, optimizer) if hyper is None else hyper
    x = np.array(problem.x0, dtype=np.float64)
    opt = build_optimizer(optimizer, {"x": x}, **hyper)
    path, reached = [x.copy()], None
    for k in range(1, max_steps + 1):
        opt.step({"x": problem.grad(x)})
        path.append(x.copy())
        if not np.all(np.isfinite(x)):
            break
        if np.linalg.norm(x - problem.x_star) <= tol:
            reached = k
            break
    return Trajectory(problem_name or type(problem).__name__.lower(), problem, optimizer, hyper, np.array(path),
                      reached, float(np.linalg.norm(x - problem.x_star)))


def optimize_all(optimizers=DEMO_OPTIMIZERS, problems=PROBLEMS, kappa: float = 100.0, tol: float = 1e-6,
                 max_steps: int = 40000) -> list:
    return [optimize(make_problem(p, kappa), o, tol, max_steps, problem_name=p)
            for p in problems for o in optimizers]


def format_table(trajectories: list, tol: float, max_steps: int) -> str:
    """Rows: optimizers; columns: problems; cells: steps to ||x − x*|| <= tol (or '> max_steps')."""
    problems = list(dict.fromkeys(r.problem_name for r in trajectories))
    optimizers = list(dict.fromkeys(r.optimizer for r in trajectories))
    cell = {(r.problem_name, r.optimizer): r for r in trajectories}
    head = f"steps to ||x - x*|| <= {tol:g} (at most {max_steps})"
    lines = [head, f"{'optimizer':<10}" + "".join(f"{p:>14}" for p in problems)]
    for o in optimizers:
        row = f"{o:<10}"
        for p in problems:
            r = cell.get((p, o))
            row += f"{'' if r is None else (r.steps_to_tol if r.steps_to_tol is not None else f'>{max_steps}'):>14}"
        lines.append(row)
    return "\n".join(lines)


def _pyplot_free_figure():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise RuntimeError("writing a PNG needs matplotlib: pip install 'minidiff[plots]'") from None
    fig = Figure(figsize=(11, 5), dpi=100)
    FigureCanvasAgg(fig)  # attaches itself to fig; no pyplot, no global backend state
    return fig


def plot_trajectories(trajectories: list, path: str) -> None:
    """One panel per problem: contour lines of f and each optimizer's path from x_0."""
    fig = _pyplot_free_figure()
    problems = {r.problem_name: r.problem for r in trajectories}
    for i, (pname, problem) in enumerate(problems.items()):
        ax = fig.add_subplot(1, len(problems), i + 1)
        gx, gy = np.meshgrid(np.linspace(-2.0, 2.0, 200), np.linspace(-1.0, 3.0, 200))
        z = np.vectorize(lambda a, b: problem.value(np.array([a, b])))(gx, gy)
        ax.contour(gx, gy, np.log1p(z), levels=25, linewidths=0.5, colors="0.7")
        for r in (r for r in trajectories if r.problem_name == pname):
            ax.plot(r.path[:, 0], r.path[:, 1], lw=1.0, label=f"{r.optimizer} ({r.steps_to_tol or '-'})")
        ax.plot(*problem.x_star, "k*", ms=10)
        ax.set(title=pname, xlim=(-2, 2), ylim=(-1, 3), xlabel="x", ylabel="y")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def run_demo(optimizers=DEMO_OPTIMIZERS, problems=PROBLEMS, kappa: float = 100.0, tol: float = 1e-6,
             max_steps: int = 40000, out: str | None = None) -> str:
    """What `minidiff optim-demo` does: run, return the table, optionally save the trajectories PNG."""
    for o in optimizers:
        if o not in DEMO_OPTIMIZERS:
            raise ValueError(f"unknown optimizer {o!r}; choose from {', '.join(DEMO_OPTIMIZERS)}")
    trajectories = optimize_all(optimizers, problems, kappa, tol, max_steps)
    if out is not None:
        plot_trajectories(trajectories, out)
    return format_table(trajectories, tol, max_steps)
