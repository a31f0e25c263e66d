"""The command line as a user meets it: bad input is one line and exit code 2, runs can be resumed and sampled."""

import json
import subprocess
import sys

import click._termui_impl
import numpy as np
import pytest
from click.testing import CliRunner

from cli import main
from helpers.bitwise import assert_bitwise_equal
from helpers.cli import assert_one_line_error
from helpers.paths import CLI_PY, REPO
from minidiff.runs.file import RunFile

FAST = ["--dataset", "moons", "--steps", "6", "--timesteps", "50", "--batch-size", "32", "--log-every", "2",
        "--ckpt-every", "3", "--sample-every", "100", "-q"]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def bad_files(tmp_path):
    (tmp_path / "nan.npy").write_bytes(b"")
    np.save(tmp_path / "nan.npy", np.full((4, 8, 8), np.nan))
    np.save(tmp_path / "rank.npy", np.zeros(5))
    (tmp_path / "garbage.h5").write_bytes(b"not an hdf5 file at all")
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "bad.toml").write_text("lr = [")
    (tmp_path / "neg.json").write_text(json.dumps({"beta1": 2.0}))
    return tmp_path


@pytest.mark.parametrize("args, fragments", [
    (["train", "--optimizer", "rmsprop"], ["--optimizer", "rmsprop"]),
    (["train", "--beta1", "1.0"], ["beta1", "[0, 1)"]),
    (["train", "--beta2", "-0.1"], ["beta2"]),
    (["train", "--lr", "0"], ["lr must be > 0"]),
    (["train", "--lr", "abc"], ["--lr"]),
    (["train", "--momentum", "-1"], ["momentum"]),
    (["train", "--batch-size", "0"], ["batch_size"]),
    (["train", "--steps", "-5"], ["steps"]),
    (["train", "--dataset", "nosuch"], ["digits", "moons"]),
    (["train", "--dataset", "{d}/missing.npy"], ["missing.npy"]),
    (["train", "--dataset", "{d}/nan.npy"], ["nan.npy"]),
    (["train", "--dataset", "{d}/rank.npy"], ["rank.npy"]),
    (["train", "--config", "{d}/bad.json"], ["bad.json"]),
    (["train", "--config", "{d}/bad.toml"], ["bad.toml"]),
    (["train", "--config", "{d}/neg.json"], ["beta1"]),
    (["train", "--config", "{d}/none.json"], ["none.json"]),
    (["train", "--dataset", "moons", "--model", "unet"], ["needs image data"]),
    (["train", "--device", "tpu"], ["--device"]),
    (["train", "--probe-every", "-1"], ["--probe-every"]),
    (["train", "--eval-samples", "1"], ["--eval-samples"]),
    (["train", "--timesteps", "50", "--probe-buckets", "60"], ["probe_buckets", "timesteps"]),
    (["inspect", "{d}/garbage.h5"], ["garbage.h5"]),
    (["sample", "{d}/garbage.h5"], ["garbage.h5"]),
    (["resume", "{d}/garbage.h5"], ["garbage.h5"]),
    (["evaluate", "{d}/garbage.h5"], ["garbage.h5"]),
    (["inspect", "{d}/absent.h5"], ["absent.h5"]),
    (["optim-demo", "--kappa", "0.5"], ["--kappa"]),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_input_is_one_line_exit_2_no_traceback(bad_files, args, fragments):
    args = [a.format(d=bad_files) for a in args]
    assert_one_line_error(invoke(*args, "--out", bad_files / "run.h5") if args[0] == "train" else invoke(*args),
                    *fragments)
    assert not (bad_files / "run.h5").exists()


def test_existing_run_is_not_overwritten_without_the_flag(tmp_path):
    out = tmp_path / "r.h5"
    assert invoke("train", *FAST, "--out", out).exit_code == 0
    before = out.read_bytes()
    assert_one_line_error(invoke("train", *FAST, "--out", out), "already exists", "--overwrite")
    assert out.read_bytes() == before
    assert invoke("train", *FAST, "--seed", "1", "--out", out, "--overwrite").exit_code == 0
    assert RunFile.open(out).config["seed"] == 1


def test_config_file_sets_options_and_command_line_wins(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('optimizer = "nesterov"\nlr = 0.01\nbatch-size = 16\n')
    out = tmp_path / "r.h5"
    result = invoke("train", *FAST, "--config", cfg, "--lr", "0.02", "--out", out)
    assert result.exit_code == 0, result.output
    config = RunFile.open(out).config
    assert (config["optimizer"], config["lr"], config["batch_size"]) == ("nesterov", 0.02, 32)


def test_probe_and_eval_options_reach_the_run_config_and_its_metrics(tmp_path):
    out = tmp_path / "r.h5"
    result = invoke("train", *FAST, "--probe-every", 3, "--probe-buckets", 2, "--eval-every", 3, "--eval-samples", 16,
                    "--out", out)
    assert result.exit_code == 0, result.output
    run = RunFile.open(out)
    c = run.config
    assert (c["probe_every"], c["probe_buckets"], c["eval_every"], c["eval_samples"]) == (3, 2, 3, 16)
    m = run.metrics()
    probed = np.isin(m["step"], [3, 6])
    assert m["probe_grad_norm"].shape[1] == 2 and np.all(m["probe_grad_norm"][probed] > 0)
    assert list(m["step"][np.isfinite(m["swd"])]) == [3, 6]
    off = tmp_path / "off.h5"
    assert invoke("train", *FAST, "--probe-every", 0, "--eval-every", 0, "--out", off).exit_code == 0
    assert not {"probe_grad_norm", "swd"} & set(RunFile.open(off).metrics())


@pytest.mark.slow
def test_train_then_resume_then_inspect_then_sample(tmp_path):
    out = tmp_path / "r.h5"
    assert invoke("train", *FAST, "--out", out).exit_code == 0
    result = invoke("resume", out, "--steps", "10", "-q")
    assert result.exit_code == 0, result.output
    run = RunFile.open(out)
    assert run.checkpoint_step == 10 and run.status == "finished"
    text = invoke("inspect", out).output
    assert "status     finished" in text and "loss" in text
    png = tmp_path / "points.png"
    result = invoke("sample", out, "--n", "50", "--steps", "5", "--out", png)
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert_one_line_error(invoke("sample", out, "--n", "50", "--steps", "5", "--out", png), "already exists")


def _checkpoint(path):
    state = RunFile.open(path).load_checkpoint()
    return {k: state[k] for k in ("step", "params", "optimizer", "ema", "rng", "data_order")}


@pytest.mark.slow
def test_resume_past_the_planned_steps_equals_a_run_planned_that_long(tmp_path):
    straight, split = tmp_path / "straight.h5", tmp_path / "split.h5"
    assert invoke("train", *FAST, "--steps", "12", "--out", straight).exit_code == 0
    assert invoke("train", *FAST, "--out", split).exit_code == 0  # FAST plans 6 steps
    result = invoke("resume", split, "--steps", "12", "-q")
    assert result.exit_code == 0, result.output
    assert_bitwise_equal(_checkpoint(straight), _checkpoint(split))
    assert RunFile.open(split).config["steps"] == 12  # the file's plan is the extended one, as inspect reports
    assert "12 logged / 12 planned" in invoke("inspect", split).output


class FakeBlas:
    """threadpoolctl's controller of NumPy's BLAS, with a thread count of our choosing."""

    def __init__(self, threads):
        self.num_threads = threads

    def set_num_threads(self, n):
        self.num_threads = n


def test_resume_with_another_cpu_thread_count_says_so(tmp_path, monkeypatch):
    """The run file records the thread count; a resume with another one says it will not be bit for bit."""
    from minidiff.execution import threads as parallel
    out = tmp_path / "r.h5"
    monkeypatch.setattr(parallel, "_blas_controller", lambda: FakeBlas(1))
    assert invoke("train", *FAST, "--out", out).exit_code == 0
    assert RunFile.open(out).attrs["cpu_threads"] == 1
    result = invoke("resume", out, "--steps", "8", "-q")
    assert result.exit_code == 0 and "CPU thread" not in result.output
    monkeypatch.setattr(parallel, "_blas_controller", lambda: FakeBlas(2))
    result = invoke("resume", out, "--steps", "10", "-q")
    assert result.exit_code == 0, result.output
    assert "trained with 1 CPU thread(s) and resumes with 2" in result.output
    assert "OPENBLAS_NUM_THREADS=1" in result.output


@pytest.mark.parametrize("schedule", [["cosine"], ["warmup", "--warmup-steps", "10"]], ids=["cosine", "long-warmup"])
def test_resume_past_the_plan_of_a_total_dependent_lr_schedule_is_refused_untouched(tmp_path, schedule):
    out = tmp_path / "r.h5"
    assert invoke("train", *FAST, "--lr-schedule", *schedule, "--out", out).exit_code == 0
    before = out.read_bytes()
    assert_one_line_error(invoke("resume", out, "--steps", "12"), schedule[0], "at most 6 steps", "--steps 12")
    assert out.read_bytes() == before
    assert invoke("resume", out, "--steps", "6").exit_code == 0  # up to the plan is fine


def test_diverging_train_prints_one_error_line_no_warnings_and_marks_the_run_diverged(tmp_path):
    out = tmp_path / "div.h5"
    # a real process: pytest's own warning capture would hide the RuntimeWarnings this is about
    proc = subprocess.run([sys.executable, str(CLI_PY), "train", *FAST,
                           "--optimizer", "sgd", "--lr", "1e6", "--out", str(out)], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 1, proc.stderr  # documented in `minidiff --help`: 1 = diverged
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    assert lines[0].startswith("training mlp") and len(lines) == 2, lines  # the header, then the one error line
    assert lines[1].startswith("Error: training diverged") and "--lr" in lines[1]
    run = RunFile.open(out)
    assert run.status == "diverged" and run.attrs["status_message"] in lines[1]
    assert "1    the run diverged" in invoke("--help").output


def test_sample_progress_bar_shows_step_of_total_and_rate(tmp_path, monkeypatch):
    out = tmp_path / "r.h5"
    assert invoke("train", *FAST, "--out", out).exit_code == 0
    monkeypatch.setattr(click._termui_impl, "isatty", lambda f: True)  # render the bar as on a terminal
    result = invoke("sample", out, "--n", "8", "--steps", "4", "--out", tmp_path / "s.png")
    assert result.exit_code == 0, result.output
    assert "step 4/4" in result.output and " it/s" in result.output, result.output


def test_config_file_may_set_out_overwrite_quiet_and_base_channels(tmp_path):
    tiny_unet = {"dataset": "digits", "steps": 1, "timesteps": 50, "batch-size": 8, "eval_every": 0,
                 "sample_count": 2, "sample_steps": 2, "probe_every": 0}
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({**tiny_unet, "out": str(tmp_path / "from-file.h5"), "overwrite": True, "quiet": True,
                               "base-channels": 8}))
    (tmp_path / "from-file.h5").write_bytes(b"old run")  # replaced: the file says overwrite
    result = invoke("train", "--config", cfg)
    assert result.exit_code == 0, result.output
    assert "train" not in result.output.splitlines()  # quiet: no progress bar (off a terminal, just its label)
    run = RunFile.open(tmp_path / "from-file.h5")
    assert run.config["model_options"] == {"base_channels": 8}
    assert run.load_checkpoint()["params"]["time_embed.0.weight"].shape == (32, 8)

    other = tmp_path / "flag.h5"
    result = invoke("train", "--config", cfg, "--out", other, "--base-channels", "16")
    assert result.exit_code == 0, result.output  # the command line wins over the file
    assert RunFile.open(other).config["model_options"] == {"base_channels": 16}
    cfg.write_text(json.dumps({**tiny_unet, "overwrite": "yes"}))
    assert_one_line_error(invoke("train", "--config", cfg, "--out", other), "overwrite", "yes")


def test_console_script_and_python_cli_both_work():
    for cmd in (["minidiff", "--help"], [sys.executable, "cli.py", "--help"]):
        result = subprocess.run(cmd, capture_output=True, text=True, cwd=str(REPO))
        assert result.returncode == 0 and "train" in result.stdout


def test_a_digits_run_diverging_at_an_evaluation_step_ends_with_one_line_and_status_diverged(tmp_path):
    """Evaluation (the FD of EMA samples) comes after the divergence check: on NaN samples it would raise a
    traceback and leave the file 'running'. Here the run blows up before its first evaluation (step 5)."""
    out = tmp_path / "div.h5"
    proc = subprocess.run([sys.executable, str(CLI_PY), "train", "--dataset", "digits",
                           "--base-channels", "8", "--steps", "10", "--log-every", "5", "--eval-every", "5",
                           "--eval-samples", "16", "--probe-every", "0", "--timesteps", "50", "--batch-size", "16",
                           "--optimizer", "sgd", "--lr", "1e8", "--grad-clip", "0", "--out", str(out), "-q"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("Error: training diverged")
    assert RunFile.open(out).status == "diverged"


def test_sample_defaults_to_at_most_the_runs_timesteps(tmp_path):
    out = tmp_path / "r.h5"
    assert invoke("train", *FAST, "--timesteps", "10", "--out", out).exit_code == 0
    result = invoke("sample", out, "--n", "4", "--out", tmp_path / "s.png")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "s.png").stat().st_size > 0


# --- for people who read logs -----------------------------------------------------------------------------------------
def test_off_a_terminal_training_and_sampling_print_plain_progress_lines_and_done_gives_the_final_numbers(
        tmp_path, monkeypatch):
    from minidiff.training import progress as progress_lines
    monkeypatch.setattr(progress_lines, "PROGRESS_SECONDS", 0.0)   # a line every step, not every 10 s
    out = tmp_path / "r.h5"
    result = invoke("train", *[a for a in FAST if a != "-q"], "--eval-every", 6, "--eval-samples", 16, "--out", out)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    train_lines = [ln for ln in lines if ln.startswith("train  step ")]
    assert len(train_lines) == 6 and "loss" not in train_lines[0] and " loss " in train_lines[1], train_lines
    assert " it/s  ETA " in train_lines[0] and train_lines[-1].startswith("train  step 6/6  loss ")
    m = RunFile.open(out).metrics()
    done = next(ln for ln in lines if ln.startswith("done: "))
    assert f"final loss {m['loss'][-1]:.4g} (step 6)" in done and f"swd {m['swd'][-1]:.4g} (step 6" in done, done
    result = invoke("sample", out, "--sampler", "ddpm", "--n", "4", "--out", tmp_path / "s.png")
    sample_lines = [ln for ln in result.output.splitlines() if ln.startswith("ddpm  step ")]
    assert result.exit_code == 0 and len(sample_lines) == 50 and sample_lines[-1].startswith("ddpm  step 50/50  ")


def test_the_bar_shows_no_loss_before_the_first_logged_one(tmp_path, monkeypatch):
    from minidiff import console
    monkeypatch.setattr(console, "on_terminal", lambda: True)
    monkeypatch.setattr(click._termui_impl, "isatty", lambda f: True)   # render the bar as on a terminal
    result = invoke("train", *[a for a in FAST if a != "-q"], "--log-every", 3, "--out", tmp_path / "r.h5")
    assert result.exit_code == 0, result.output
    frames = result.output.replace("\r", "\n").splitlines()
    assert "loss nan" not in result.output and any("step 2/6" in f and "loss" not in f for f in frames), frames
    assert any("step 3/6  loss " in f for f in frames), frames


def test_dataset_key_picks_the_array_of_a_file_holding_several(tmp_path):
    images = np.random.default_rng(0).integers(0, 255, size=(40, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "two.npz", images=images, labels=np.arange(40))
    tiny_unet = ["--base-channels", "8", "--steps", "2", "--timesteps", "20", "--batch-size", "8", "--eval-every",
                 "0", "--probe-every", "0", "-q"]
    assert_one_line_error(invoke("train", "--dataset", tmp_path / "two.npz", *tiny_unet, "--out", tmp_path / "a.h5"),
                          "holds 2 arrays (images, labels)", "--dataset-key")
    result = invoke("train", "--dataset", tmp_path / "two.npz", "--dataset-key", "images", *tiny_unet, "--out",
                    tmp_path / "b.h5")
    assert result.exit_code == 0, result.output
    assert RunFile.open(tmp_path / "b.h5").config["dataset_options"] == {"key": "images"}


def test_inspect_leaves_out_the_probe_fields_of_a_row_without_a_probe(tmp_path):
    out = tmp_path / "r.h5"
    assert invoke("train", *FAST, "--probe-every", 4, "--probe-buckets", 2, "--out", out).exit_code == 0
    last = next(ln for ln in invoke("inspect", out).output.splitlines() if ln.startswith("last "))
    assert "nan" not in last and "noise_scale" not in last and "loss=" in last, last   # step 6 did not probe


def test_compare_draws_a_series_of_one_point_as_a_marker():
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure
    from minidiff.study import figures

    class Run:
        metrics = {"step": np.array([50]), "loss": np.array([0.3]), "wall_time": np.array([1.0])}
    ax = Figure().subplots()
    group = type("G", (), {"runs": [Run()], "color": "C0", "label": "adam"})()
    assert figures._curves(ax, [group], "loss")
    (line,) = ax.get_lines()
    assert line.get_marker() == "o" and list(line.get_xdata()) == [50.0]


def test_train_never_replaces_the_grid_png_beside_the_run_without_overwrite(tmp_path):
    tiny_unet = ["--dataset", "digits", "--base-channels", "8", "--steps", "2", "--timesteps", "20",
                 "--batch-size", "8", "--eval-every", "0", "--probe-every", "0", "-q"]
    png = tmp_path / "r.png"
    png.write_bytes(b"someone's picture")
    assert_one_line_error(invoke("train", *tiny_unet, "--out", tmp_path / "r.h5"), "r.png already exists",
                          "--overwrite")
    assert png.read_bytes() == b"someone's picture" and not (tmp_path / "r.h5").exists()
    assert invoke("train", *tiny_unet, "--out", tmp_path / "r.h5", "--overwrite").exit_code == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ours = png.read_bytes()
    result = invoke("resume", tmp_path / "r.h5", "--steps", "4", "-q")   # the grid is the run's own: updated
    assert result.exit_code == 0 and png.read_bytes() != ours, result.output
    png.write_bytes(b"someone's picture")
    result = invoke("resume", tmp_path / "r.h5", "--steps", "6", "-q")   # not the run's own: left alone, said so
    assert result.exit_code == 0 and png.read_bytes() == b"someone's picture"
    assert "is not this run's grid, so it was left as it is" in result.output


def test_inspect_tells_a_live_run_from_one_that_stopped_without_a_status(tmp_path):
    out = tmp_path / "r.h5"
    run = RunFile.create(out, {"steps": 10}, "minidiff train")
    assert "status     running\n" in invoke("inspect", out).output + "\n"   # this process writes it
    run.close()
    assert "status     running (but no process is writing it" in invoke("inspect", out).output
