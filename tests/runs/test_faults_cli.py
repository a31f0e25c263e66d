"""Fault injection, part 2: every reading command (inspect, sample, evaluate, compare, resume) against damaged run
files, sizes the machine cannot hold, decompression bombs and files beside a run. The contract (README, "Exit
status"): exit 0, or exit 2 with one line "Error: <file>: <part> ...", no traceback, the run file's bytes unchanged and
no lock or temporary file left behind; and a file that opens must hold exactly what was written (damage that reads as
a valid file would be a silent wrong result). Part 3 (test_faults_env.py): kills, two writers, a full disk."""

import gzip
import hashlib
import io
import json
import subprocess
import sys

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from cli import main
from helpers.bitwise import bitwise_problem
from helpers.faults import CLI, DIGITS, MOONS, contract_problem, count, edit, replace_leaf, set_leaf, tally_problem
from minidiff.runs.file import RunFile

pytest.importorskip("matplotlib", reason="compare and the 2-D sample scatter need matplotlib ('.[plots]')")


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """{"moons": bytes, "digits": bytes} of two finished 8-step runs (checkpoints at 4 and 8, metrics, probes, an
    evaluation; the digits with sample grids)."""
    folder = tmp_path_factory.mktemp("good")
    out = {}
    for name, args in (("moons", MOONS), ("digits", DIGITS)):
        result = invoke("train", *args, "--steps", "8", "--out", folder / f"{name}.h5", "-q")
        assert result.exit_code == 0, result.output
        out[name] = (folder / f"{name}.h5").read_bytes()
    return out


def _content(path):
    """What a reader gets from a run file: attributes that matter, metrics, checkpoint, samples."""
    run = RunFile.open(path)
    samples = {s: run.load_samples(s)[0] for s in run.sample_steps()}
    keep = {k: run.attrs.get(k) for k in ("config", "status", "status_message", "format_version")}
    return {"attrs": keep, "metrics": run.metrics(), "checkpoint": run.load_checkpoint(), "samples": samples}


# --- the damage --------------------------------------------------------------------------------------------------
def _truncations(raw):
    return {f"truncated at {f:g}": raw[:int(len(raw) * f)] for f in (0.0, 0.001, 0.01, 0.1, 0.3, 0.5, 0.8, 0.999)}


def _flips(raw, n, seed):
    rng = np.random.default_rng(seed)
    offsets = sorted(set(int(o) for o in rng.integers(0, len(raw) - 4, size=n)) | {48, 96, 200, 400, 1000})
    out = {}
    for at in offsets:
        b = bytearray(raw)
        b[at:at + 4] = bytes(x ^ 0xFF for x in b[at:at + 4])
        out[f"flipped at {at}"] = bytes(b)
    return out


def _zeroed(raw, n, seed):
    rng = np.random.default_rng(seed)
    out = {}
    for at in sorted(int(o) for o in rng.integers(0, len(raw) - 4096, size=n)) + [0]:
        b = bytearray(raw)
        b[at:at + 4096] = bytes(min(4096, len(raw) - at))
        out[f"zeroed 4 KiB at {at}"] = bytes(b)
    return out


def _foreign(tmp_path):
    paths = {}
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["images"] = np.zeros((3, 8, 8))
    paths["foreign HDF5"] = tmp_path / "other.h5"
    with h5py.File(tmp_path / "shell.h5", "w") as f:
        f.attrs.update(format="minidiff-run", format_version=1, config="{}", status="finished")
    paths["run attributes, no groups"] = tmp_path / "shell.h5"
    (tmp_path / "png.h5").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    paths["a PNG"] = tmp_path / "png.h5"
    (tmp_path / "empty.h5").write_bytes(b"")
    paths["empty"] = tmp_path / "empty.h5"
    return {k: v.read_bytes() for k, v in paths.items()}


def _json_attr(name, value):
    return lambda f: f.attrs.__setitem__(name, json.dumps(value) if not isinstance(value, str) else value)


def _config(**changes):
    def change(f):
        config = json.loads(f.attrs["config"])
        config.update(changes)
        f.attrs["config"] = json.dumps(config)
    return change


EDITS = {
    "format_version array": lambda f: f.attrs.__setitem__("format_version", [1, 2]),
    "format_version 99": lambda f: f.attrs.__setitem__("format_version", 99),
    "config a JSON list": _json_attr("config", [1, 2]),
    "config a JSON string": _json_attr("config", "\"digits\""),
    "config not JSON": _json_attr("config", "{oops"),
    "status bogus": _json_attr("status", "flying"),
    "checkpoint step text": lambda f: f["checkpoint"].attrs.__setitem__("step", "abc"),
    "checkpoint step disagrees": lambda f: f["checkpoint"].attrs.__setitem__("step", 6),
    "samples/abc": lambda f: f["samples"].create_dataset("abc", data=np.zeros((1, 1, 8, 8), np.uint8)),
    "NaN EMA": lambda f: set_leaf(f, _first(f, "checkpoint/state/ema/params"), np.nan),
    "NaN parameter": lambda f: set_leaf(f, _first(f, "checkpoint/state/params"), np.nan),
    "Inf exp_avg_sq": lambda f: set_leaf(f, _first(f, "checkpoint/state/optimizer/buffers") + "/exp_avg_sq", np.inf),
    "parameter of another shape": lambda f: replace_leaf(f, _first(f, "checkpoint/state/params"), np.zeros(3)),
    "permutation out of range": lambda f: set_leaf(f, "checkpoint/state/data_order/permutation", 10 ** 6),
    "metrics group is a dataset": lambda f: (f.__delitem__("metrics"), f.create_dataset("metrics", data=1)),
    "metric with other rows": lambda f: replace_leaf(f, "metrics/loss", np.zeros(2)),
    "dataset is another file": _config(dataset="/etc/hostname"),
    "dataset is the run itself": lambda f: _config(dataset=str(f.filename))(f),
    "batch size 1e12": _config(batch_size=10 ** 12),
    "timesteps 1e12": _config(timesteps=10 ** 12),
    "model_options 5": _config(model_options=5),
    "unknown option": _config(colour="blue"),
}


def _first(f, group):
    return f"{group}/{next(iter(f[group]))}"


def _damaged(good, tmp_path):
    """name -> bytes of every damaged file (both runs)."""
    cases = {}
    for run, raw in good.items():
        damage = {**_truncations(raw), **_flips(raw, 10 if run == "moons" else 6, 7), **_zeroed(raw, 4, 8)}
        cases.update({f"{run} {k}": v for k, v in damage.items()})
    cases.update(_foreign(tmp_path))
    for name, change in EDITS.items():
        path = tmp_path / "edit.h5"
        path.write_bytes(good["digits"])
        edit(path, change)
        cases[f"digits edited: {name}"] = path.read_bytes()
    return cases


COMMANDS = {
    "inspect": lambda p, t: ["inspect", p],
    "sample": lambda p, t: ["sample", p, "--n", "4", "--steps", "2", "--out", t / "s.png", "--overwrite"],
    "evaluate": lambda p, t: ["evaluate", p, "--n", "8", "--steps", "2"],
    "compare": lambda p, t: ["compare", p, "--out", t / "cmp"],
    "resume": lambda p, t: ["resume", p, "--steps", "10", "-q"],
}


@pytest.mark.slow
def test_every_reading_command_meets_every_damaged_file_with_exit_2_and_one_line_or_reads_it_exactly(good,
                                                                                                      tmp_path):
    originals = {}
    for run, raw in good.items():
        (tmp_path / f"{run}-good.h5").write_bytes(raw)
        originals[run] = _content(tmp_path / f"{run}-good.h5")
    refused = read_fine = 0
    for name, raw in _damaged(good, tmp_path).items():
        path = tmp_path / "case" / "r.h5"
        path.parent.mkdir(exist_ok=True)
        for command, args in COMMANDS.items():
            path.write_bytes(raw)
            digest = hashlib.sha256(raw).hexdigest()
            result = invoke(*args(path, tmp_path))
            problem = _one_invocation_problem(result, path, digest, command)
            if problem is None and result.exit_code == 0 and command == "inspect" and "edited" not in name:
                path.write_bytes(raw)   # it opened: it must hold exactly what was written
                run = "moons" if name.startswith("moons") else "digits"
                problem = bitwise_problem(originals[run], _content(path))
            refused += result.exit_code == 2
            read_fine += result.exit_code == 0
            assert count(f"damaged file x {command}", problem is None), (name, command, problem)
    print(f"\ndamaged-file trials: {refused} refused (exit 2), {read_fine} read fine (damage in unused bytes)")
    assert refused > 3 * read_fine   # the damage really hit what the checks guard


def _one_invocation_problem(result, path, digest, command):
    if isinstance(result.exception, BaseException) and not isinstance(result.exception, SystemExit):
        return f"exception {type(result.exception).__name__}: {result.exception}"
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    if result.exit_code not in (0, 2):
        return f"exit {result.exit_code}: {result.output[-500:]}"
    if result.exit_code == 2:
        errors = [ln for ln in lines if ln.startswith("Error:")]
        if len(errors) != 1 or str(path) not in errors[0]:
            return f"not one error line naming the file: {lines}"
        if hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            return "exit 2, but the file's bytes changed"
    elif command != "resume" and hashlib.sha256(path.read_bytes()).hexdigest() != digest:
        return "a reader changed the file"
    leftovers = [p.name for p in path.parent.iterdir() if p.suffix in (".lock", ".tmp")]
    return f"left behind: {leftovers}" if leftovers else None


# --- sizes the machine cannot hold, images the UNet cannot halve --------------------------------------------------
@pytest.mark.parametrize("args, fragment", [
    (["train", *MOONS, "--timesteps", "1000000000000"], "timesteps 1000000000000 needs ~"),
    (["train", *MOONS, "--eval-samples", "1000000000000"], "eval_samples 1000000000000 needs ~"),
    (["train", *MOONS, "--batch-size", "1000000000000"], "batch_size 1000000000000 needs ~"),
    (["train", *DIGITS, "--base-channels", "1048576"], "needs ~"),
], ids=["timesteps", "eval-samples", "batch-size", "base-channels"])
def test_sizes_the_machine_cannot_hold_are_refused_before_any_file_exists(tmp_path, args, fragment):
    result = invoke(*args, "--out", tmp_path / "r.h5")
    problem = _one_line_problem(result, fragment, "this machine has")
    assert count("sizes (CLI)", problem is None and not list(tmp_path.iterdir())), problem


@pytest.mark.parametrize("command", ["sample", "evaluate"])
def test_sample_counts_the_machine_cannot_hold_are_refused(good, tmp_path, command):
    path = tmp_path / "r.h5"
    path.write_bytes(good["digits"])
    extra = ["--out", tmp_path / "s.png"] if command == "sample" else []
    result = invoke(command, path, "--n", "1000000000000", *extra)
    problem = _one_line_problem(result, "1000000000000 samples needs ~")
    assert count("sizes (CLI)", problem is None and path.read_bytes() == good["digits"]), problem


@pytest.mark.parametrize("shape", [(12, 7, 9), (12, 1, 1), (12, 9, 8, 3)], ids=["7x9", "1x1", "9x8 rgb"])
def test_images_the_unet_cannot_halve_are_refused_before_any_file_exists(tmp_path, shape):
    np.save(tmp_path / "odd.npy", np.random.default_rng(0).integers(0, 255, size=shape, dtype=np.uint8))
    result = invoke("train", "--dataset", tmp_path / "odd.npy", "--base-channels", "8", "--batch-size", "4",
                    "--steps", "2", "--timesteps", "20", "--out", tmp_path / "r.h5")
    problem = _one_line_problem(result, "cannot be halved", "multiples of 2")
    assert count("sizes (CLI)", problem is None and not (tmp_path / "r.h5").exists()), problem


def _one_line_problem(result, *fragments):
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    if result.exit_code != 2 or len(lines) != 1 or not lines[0].startswith("Error:"):
        return f"exit {result.exit_code}: {result.output[-600:]}"
    missing = [f for f in fragments if f not in lines[0]]
    return f"{missing} not in {lines[0]}" if missing else None


@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_run_file_that_cannot_be_read_is_the_machines_failure_exit_74(good, tmp_path, monkeypatch, command):
    """A denied read (permissions, a lost mount): simulated, since the suite may run as root, who reads anything."""
    import builtins
    from minidiff.runs import validate

    path = tmp_path / "r.h5"
    path.write_bytes(good["moons"])

    def denied(name, *args, **kwargs):
        if str(name) == str(path):
            raise PermissionError(13, "Permission denied", str(name))
        return builtins.open(name, *args, **kwargs)
    monkeypatch.setattr(validate, "open", denied, raising=False)
    result = invoke(*COMMANDS[command](path, tmp_path))
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    held = (result.exit_code == 74 and len(lines) == 1 and f"cannot read {path}: Permission denied" in lines[0]
            and path.read_bytes() == good["moons"])
    assert count("unreadable run file (CLI)", held), result.output


# --- config files with values of the wrong kind, and a run that diverges only in its optimizer state ----------------
@pytest.mark.parametrize("values, extra, fragment", [
    ({"model_options": 5}, ["--base-channels", "8"], "json must be a mapping (a table), got 5"),
    ({"model_options": {"base_channels": "abc"}}, [], "model_options base_channels must be a positive integer"),
    ({"model_options": {"channel_mults": 2}}, [], "model_options channel_mults must be a list"),
    ({"dataset_options": 5}, ["--dataset-key", "x"], "json must be a mapping (a table), got 5"),
    ({"dataset": "moons", "dataset_options": {"key": "x"}}, [], "unknown option key"),
], ids=["model_options 5", "base_channels text", "channel_mults 2", "dataset_options 5", "key for built-in data"])
def test_config_values_of_the_wrong_kind_are_one_line_naming_the_option(tmp_path, values, extra, fragment):
    (tmp_path / "c.json").write_text(json.dumps(values))
    result = invoke("train", "--config", tmp_path / "c.json", *extra, "--steps", "2", "--out", tmp_path / "r.h5")
    problem = _one_line_problem(result, fragment)
    assert count("config values (CLI)", problem is None and not (tmp_path / "r.h5").exists()), problem


def test_a_run_whose_optimizer_state_overflows_is_diverged_not_finished(tmp_path):
    result = invoke("train", *MOONS, "--steps", "8", "--weight-decay", "1e30", "--out", tmp_path / "r.h5", "-q")
    lines = [ln for ln in result.output.splitlines() if ln.startswith("Error:")]
    held = (result.exit_code == 1 and len(lines) == 1 and "non-finite optimizer state (exp_avg_sq)" in lines[0]
            and RunFile.open(tmp_path / "r.h5").status == "diverged")
    assert count("divergence (CLI)", held), result.output


# --- a decompression bomb: refused in bounded memory, in a real process --------------------------------------------
_MEASURED = ("import resource, subprocess, sys; p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
             "sys.stderr.write(p.stderr); print(p.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


@pytest.mark.slow
def test_a_decompression_bomb_is_refused_after_inflating_at_most_what_its_header_declares(tmp_path):
    buf = io.BytesIO()
    np.save(buf, np.zeros((10, 8, 8), np.uint8))
    header = buf.getvalue()[:-640]   # the .npy header alone: it declares 640 bytes of data
    member = gzip.compress(bytes(1 << 20), compresslevel=9)
    (tmp_path / "bomb.npy.gz").write_bytes(gzip.compress(header) + member * 2600)   # inflates to 2.6 GiB
    proc = subprocess.run([sys.executable, "-c", _MEASURED, *CLI, "train", "--dataset", tmp_path / "bomb.npy.gz",
                           "--out", tmp_path / "r.h5"], capture_output=True, text=True, timeout=300)
    code, max_rss_kib = (int(v) for v in proc.stdout.split())
    proc.returncode = code
    problem = contract_problem(proc, 2, "bomb.npy.gz", "decompression bomb")
    held = problem is None and max_rss_kib < 600 * 1024 and not (tmp_path / "r.h5").exists()
    assert count("decompression bomb", held), (problem, max_rss_kib)


# --- the contract in real processes (warnings and tracebacks show as a user sees them) ------------------------------
@pytest.mark.slow
def test_in_a_real_process_each_command_refuses_a_damaged_file_in_one_line(good, tmp_path):
    path = tmp_path / "r.h5"
    path.write_bytes(good["digits"])
    edit(path, EDITS["NaN EMA"])
    before = path.read_bytes()
    for command, args in COMMANDS.items():
        proc = subprocess.run(CLI + [str(a) for a in args(path, tmp_path)], capture_output=True, text=True,
                              timeout=300)
        if command in ("inspect", "compare"):   # the file-level check: finiteness is every reader's
            expected = "checkpoint/state/ema/params/"
        else:
            expected = "holds NaN"
        problem = contract_problem(proc, 2, str(path), expected)
        assert count("damaged file, real process", problem is None and path.read_bytes() == before), problem


def test_zz_print_the_tally_of_trials_per_family():
    """Last in the file (pytest keeps file order): every family's trials so far, and how many held the contract."""
    assert not tally_problem()
