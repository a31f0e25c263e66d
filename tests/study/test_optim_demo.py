"""The optimizers on the quadratic and Rosenbrock problems, and the `minidiff optim-demo` command."""

import math
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from cli import main
from minidiff.study.optim_demo import DEMO_OPTIMIZERS, make_problem, optimize


def _steps(kappa, optimizer, tol=1e-6):
    run = optimize(make_problem("quadratic", kappa), optimizer, tol=tol, max_steps=20000)
    assert run.steps_to_tol is not None, f"{optimizer} did not reach {tol} on kappa={kappa}"
    return run.steps_to_tol


def test_gradient_descent_needs_the_steps_its_rate_predicts():
    problem = make_problem("quadratic", 100.0)
    d0 = np.linalg.norm(np.array(problem.x0) - problem.x_star)
    predicted = math.log(d0 / 1e-6) / -math.log(99 / 101)  # rate (κ − 1)/(κ + 1) at γ = 2/(L + μ)
    assert _steps(100.0, "sgd") == pytest.approx(predicted, rel=0.02)


def test_heavy_ball_needs_about_sqrt_kappa_times_fewer_steps_than_gradient_descent():
    ratios = {}
    for kappa in (100.0, 1000.0):
        ratios[kappa] = _steps(kappa, "sgd") / _steps(kappa, "momentum")
        print(f"kappa={kappa:g}: GD/heavy-ball steps = {ratios[kappa]:.1f}, sqrt(kappa) = {math.sqrt(kappa):.1f}")
        # about 0.7 √κ, not √κ: the heavy ball's transient (a double root) costs a bit, hence the wide band
        assert 0.5 * math.sqrt(kappa) <= ratios[kappa] <= 1.5 * math.sqrt(kappa)
    growth = ratios[1000.0] / ratios[100.0]
    assert growth == pytest.approx(math.sqrt(10.0), rel=0.2), "the speedup must grow like sqrt(kappa)"


@pytest.mark.parametrize("optimizer", DEMO_OPTIMIZERS)
def test_rosenbrock_from_minus_1_5_2_converges(optimizer):
    run = optimize(make_problem("rosenbrock"), optimizer, tol=1e-6, max_steps=40000)
    assert run.steps_to_tol is not None, f"{optimizer} stopped {run.final_distance:.2e} from (1, 1)"
    np.testing.assert_allclose(run.path[0], [-1.5, 2.0])
    np.testing.assert_allclose(run.path[-1], [1.0, 1.0], atol=1e-6)


def test_cli_prints_the_steps_table():
    result = CliRunner().invoke(main, ["optim-demo", "--max-steps", "300", "--tol", "1e-2"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "quadratic" in lines[1] and "rosenbrock" in lines[1]
    assert [line.split()[0] for line in lines[2:2 + len(DEMO_OPTIMIZERS)]] == list(DEMO_OPTIMIZERS)
    assert ">300" in result.output  # plain SGD cannot crawl along the Rosenbrock valley in 300 steps


def test_cli_writes_a_png_of_the_trajectories(tmp_path):
    out = tmp_path / "traj.png"
    result = CliRunner().invoke(main, ["optim-demo", "-o", "sgd", "-o", "momentum", "-p", "quadratic",
                                       "--max-steps", "200", "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


@pytest.mark.parametrize("args", [["--bogus"], ["-o", "lion"], ["--kappa", "0.5"], ["--max-steps", "0"]])
def test_cli_bad_option_is_exit_code_2_and_one_line(args):
    result = CliRunner().invoke(main, ["optim-demo", *args])
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1 and result.output.startswith("Error:")
    assert "Traceback" not in result.output


def test_cli_without_matplotlib_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes the import fail
    result = CliRunner().invoke(main, ["optim-demo", "-o", "sgd", "-p", "quadratic", "--max-steps", "10",
                                       "--out", str(tmp_path / "x.png")])
    assert result.exit_code == 2
    assert "matplotlib" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
