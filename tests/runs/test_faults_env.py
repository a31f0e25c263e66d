"""Fault injection, part 3: the environment fails under a running command. Kills at random moments and inside
checkpoint writes, two writers at once, a full disk (RLIMIT_FSIZE, which any user may set: a write past it fails
with EFBIG; and a real 1.6 MB tmpfs in a private mount namespace where the machine allows one), a read-only file
system. The contract: a kill leaves a file that resumes to the uninterrupted run bit for bit; a second writer is one
line, exit 2, naming the holder; a failing disk is one line, exit 74, the file readable with its last checkpoint,
and resume finishes the run once space is back. Every test here starts real processes: most are marked slow."""

import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from helpers.bitwise import bitwise_problem, untimed
from helpers.faults import CLI, MOONS, contract_problem, count, metrics_problem, run_cli, tally_problem
from minidiff.runs import lock
from minidiff.runs.file import RunFile


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted runs of 16 and 60 steps (the CLI in its own process, as the runs under test)."""
    folder = tmp_path_factory.mktemp("reference")
    out = {}
    for steps in (16, 60):
        path = folder / f"ref{steps}.h5"
        proc = run_cli("train", *MOONS, "--steps", steps, "--out", path, "-q")
        assert proc.returncode == 0, proc.stderr
        out[steps] = path
    return out


def _same_run_problem(path, reference):
    """None when the run at `path` equals the reference run bit for bit (state and metrics, clock readings aside)."""
    a, b = RunFile.open(reference), RunFile.open(path)
    if b.status != "finished":
        return f"status {b.status}: {b.attrs.get('status_message')}"
    return (bitwise_problem(untimed(a.load_checkpoint()), untimed(b.load_checkpoint()))
            or metrics_problem(a.metrics(), b.metrics()))


# --- kills -----------------------------------------------------------------------------------------------------------
# The CLI with one step of a checkpoint wrapped to SIGKILL its own process: the n-th array the checkpoint tree writes
# (the file is built in memory: nothing of it is on disk yet; n = 1 is inside the first checkpoint, before any
# exists), or the n-th file write after half of its bytes (a half-written <name>.h5.tmp is left on disk). The writes
# of this run: 1 create, 2 and 3 the logs of steps 2 and 4, 4 the checkpoint at 4, 5 the log of 6, 6 of 8, 7 the
# checkpoint at 8.
_KILL_INSIDE = """
import os, signal, sys
import minidiff.runs.file as file, minidiff.runs.tree as tree
where, n = os.environ["KILL_AT"].split(":")
calls = [0]
def kill_at(n_th):
    calls[0] += 1
    if calls[0] == int(n):
        os.kill(os.getpid(), signal.SIGKILL)
real_array, real_write = tree._write_array, file.write_synced
def array(*args, **kwargs):
    kill_at(n)
    return real_array(*args, **kwargs)
def half_write(path, data):
    if calls[0] + 1 == int(n):
        with open(path, "wb") as fh:
            fh.write(data[:len(data) // 2])
    kill_at(n)
    return real_write(path, data)
if where == "array":
    tree._write_array = array
else:
    file.write_synced = half_write
import cli
cli.main()
"""


@pytest.mark.slow
@pytest.mark.parametrize("at, kept", [("array:1", None), ("array:30", None), ("array:170", 8), ("disk:4", None),
                                      ("disk:5", 4), ("disk:7", 4)],
                         ids=["first array", "mid first checkpoint", "mid third", "half of the first checkpoint's "
                              "file", "half of a log flush", "half of the second checkpoint's file"])
def test_a_kill_inside_a_checkpoint_write_leaves_a_file_that_resumes_to_the_uninterrupted_run(reference, tmp_path,
                                                                                              at, kept):
    path = tmp_path / "r.h5"
    proc = subprocess.run([sys.executable, "-c", _KILL_INSIDE, "train", *MOONS, "--steps", "16", "--out", str(path),
                           "-q"], capture_output=True, text=True, env={**os.environ, "KILL_AT": at}, timeout=300)
    killed = proc.returncode == -signal.SIGKILL and (not at.startswith("disk") or (tmp_path / "r.h5.tmp").exists())
    first = RunFile.open(path).checkpoint_step   # opens: every part checked
    resumed = run_cli("resume", path, "-q")
    problem = contract_problem(resumed, 0) or _same_run_problem(path, reference[16])
    held = killed and first == kept and problem is None and not (tmp_path / "r.h5.tmp").exists()
    assert count("kill inside a checkpoint write", held), (proc.returncode, first, problem)


@pytest.mark.slow
def test_kills_at_random_moments_leave_a_file_that_resumes_to_the_uninterrupted_run(reference, tmp_path):
    delays = np.random.default_rng(20261203).uniform(0.0, 1.2, size=4)   # fixed: a failure can be rerun
    stopped_early = 0
    for trial, delay in enumerate(delays):
        path = tmp_path / f"k{trial}.h5"
        sig = signal.SIGTERM if trial == 0 else signal.SIGKILL
        proc = subprocess.Popen(CLI + ["train", *MOONS, "--steps", "60", "--out", str(path), "-q"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        assert proc.stderr.readline().startswith("training mlp")
        time.sleep(delay)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        expected = {signal.SIGTERM: 130, signal.SIGKILL: -signal.SIGKILL}[sig]
        ended = proc.returncode in (expected, 0)   # 0: it finished before the signal came
        stopped_early += proc.returncode == expected
        resumed = run_cli("resume", path, "-q")
        problem = None if "nothing to do" in resumed.stdout else contract_problem(resumed, 0)
        problem = problem or _same_run_problem(path, reference[60])
        held = ended and "Traceback" not in err and problem is None and lock.holder(path) is None
        assert count("kill at a random moment", held), (trial, delay, proc.returncode, err[-400:], problem)
    assert stopped_early >= 3   # the signals came while the runs trained


# --- two writers ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_second_writer_is_refused_naming_the_first_while_readers_keep_reading(tmp_path):
    path = tmp_path / "r.h5"
    first = subprocess.Popen(CLI + ["train", *MOONS, "--steps", "100000", "--out", str(path), "-q"],
                             stderr=subprocess.PIPE, text=True)
    try:
        assert first.stderr.readline().startswith("training mlp")
        while RunFile.open(path).checkpoint_step is None:
            time.sleep(0.1)
        holder = f"being written by process {first.pid}"
        trials = [("resume", run_cli("resume", path), 2, holder),
                  ("train --overwrite", run_cli("train", *MOONS, "--out", path, "--overwrite"), 2, holder),
                  ("inspect", run_cli("inspect", path), 0, None),
                  ("sample", run_cli("sample", path, "--n", "4", "--steps", "2", "--out", tmp_path / "s.png"), 0,
                   None),
                  ("evaluate", run_cli("evaluate", path, "--n", "8", "--steps", "2"), 0, None)]
        for what, proc, code, fragment in trials:
            problem = contract_problem(proc, code, *([fragment, str(path)] if fragment else []))
            assert count("two writers", problem is None), (what, problem)
        assert "running" in trials[2][1].stdout
    finally:
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=120)
    assert count("two writers", first.returncode == 130 and lock.holder(path) is None)
    # two resumes started together: one trains, the other is refused
    both = [subprocess.Popen(CLI + ["resume", str(path), "--steps", "100000", "-q"], stderr=subprocess.PIPE,
                             text=True) for _ in range(2)]
    while all(p.poll() is None for p in both):
        time.sleep(0.05)
    loser = next(p for p in both if p.poll() is not None)
    winner = next(p for p in both if p is not loser)
    loser_err = loser.stderr.read()
    time.sleep(1.0)   # let the winner reach its training loop (a signal before it is handled as well; see below)
    winner.send_signal(signal.SIGINT)
    winner_err = winner.communicate(timeout=120)[1]
    problem = contract_problem(subprocess.CompletedProcess([], loser.returncode, "", loser_err), 2,
                               f"being written by process {winner.pid}")
    held = problem is None and winner.returncode == 130 and "Traceback" not in winner_err
    assert count("two writers", held), (problem, winner.returncode, winner_err[-300:])


def test_a_signal_before_training_starts_is_exit_130_in_one_line_and_changes_nothing(tmp_path):
    path = tmp_path / "r.h5"
    assert run_cli("train", *MOONS, "--steps", "4", "--out", path, "-q").returncode == 0
    before = path.read_bytes()
    # resume stopped while it still checks the file: SIGTERM delivered from inside, at the check of the checkpoint
    script = ("import os, signal, minidiff.training.integrity as i; real = i.check_checkpoint\n"
              "def stop(*a): os.kill(os.getpid(), signal.SIGTERM); return real(*a)\n"
              "i.check_checkpoint = stop\nimport cli; cli.main()")
    proc = subprocess.run([sys.executable, "-c", script, "resume", str(path), "--steps", "8", "-q"],
                          capture_output=True, text=True, timeout=300)
    problem = contract_problem(proc, 130)
    held = problem is None and "interrupted" in proc.stderr and path.read_bytes() == before
    assert count("signal before training", held), (problem, proc.stderr[-300:])
    assert lock.holder(path) is None and not (tmp_path / "r.h5.lock").exists()


# --- a full disk, a read-only file system -----------------------------------------------------------------------
def _file_size_limit(nbytes):
    def limit():   # in the child: a write past nbytes fails with EFBIG instead of killing it with SIGXFSZ
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
    return limit


@pytest.mark.slow
def test_a_write_past_the_file_size_limit_ends_with_exit_74_and_resume_finishes_the_run(reference, tmp_path):
    path = tmp_path / "r.h5"
    proc = run_cli("train", *MOONS, "--steps", "16", "--out", path, "-q", preexec_fn=_file_size_limit(200_000))
    problem = contract_problem(proc, 74, f"cannot write {path}: File too large at step 4",
                               "holds no checkpoint yet", f"minidiff resume {path}")
    run = RunFile.open(path)
    held = (problem is None and run.status == "interrupted" and "File too large" in run.attrs["status_message"]
            and lock.holder(path) is None)
    assert count("full disk (RLIMIT_FSIZE)", held), (problem, run.status)
    png = tmp_path / "s.png"
    proc = run_cli("sample", reference[16], "--n", "50", "--steps", "2", "--out", png,
                   preexec_fn=_file_size_limit(1000))
    assert count("full disk (RLIMIT_FSIZE)", contract_problem(proc, 74, "File too large") is None), proc.stderr
    resumed = run_cli("resume", path, "-q")
    problem = contract_problem(resumed, 0) or _same_run_problem(path, reference[16])
    assert count("full disk (RLIMIT_FSIZE)", problem is None), problem


_TMPFS_SCRIPT = r"""
D="$1"; OUT="$2"; shift 2
mount -t tmpfs -o size=2000k tmpfs "$D" || exit 99
cd "$D"
"$@" train {args} --steps 16 --out r.h5 -q 2> "$OUT/train.err"; echo $? > "$OUT/train.rc"
"$@" inspect r.h5 > "$OUT/inspect.out" 2>&1; echo $? > "$OUT/inspect.rc"
mount -o remount,ro "$D"
sha256sum r.h5 > "$OUT/ro.before"; "$@" resume r.h5 -q 2> "$OUT/ro.err"; echo $? > "$OUT/ro.rc"
sha256sum r.h5 > "$OUT/ro.after"
mount -o remount,rw,size=64m "$D"
"$@" resume r.h5 -q 2> "$OUT/resume.err"; echo $? > "$OUT/resume.rc"
cp r.h5 "$OUT/final.h5"
"""


def _private_mount_namespace():
    """The unshare command that gives a private mount namespace here (root: -m; a user: -rm), or None."""
    if shutil.which("unshare") is None:
        return None
    for cmd in (["unshare", "-m"], ["unshare", "-rm"]):
        if subprocess.run(cmd + ["true"], capture_output=True).returncode == 0:
            return cmd
    return None


@pytest.mark.slow
def test_a_full_tmpfs_then_a_read_only_one_end_with_exit_74_and_resume_finishes_once_space_is_back(reference,
                                                                                                   tmp_path):
    unshare = _private_mount_namespace()
    if unshare is None:
        pytest.skip("no private mount namespace here (unshare -m needs root, unshare -rm unprivileged user "
                    "namespaces); the RLIMIT_FSIZE test covers a full disk")
    (tmp_path / "mnt").mkdir()
    (tmp_path / "out").mkdir()
    script = _TMPFS_SCRIPT.replace("{args}", " ".join(MOONS))
    proc = subprocess.run(unshare + ["bash", "-c", script, "tmpfs", str(tmp_path / "mnt"), str(tmp_path / "out"),
                                     *CLI], capture_output=True, text=True, timeout=600)
    if proc.returncode == 99:
        pytest.skip(f"tmpfs cannot be mounted in the namespace: {proc.stderr.strip()[:200]}")
    out = tmp_path / "out"

    def ended(name):
        code = int((out / f"{name}.rc").read_text())
        err = (out / f"{name}.err").read_text() if (out / f"{name}.err").exists() else ""
        return subprocess.CompletedProcess([], code, "", err)
    trials = [("train on a full disk", contract_problem(ended("train"), 74, "No space left on device",
                                                         "the file keeps its checkpoint at step 4",
                                                         "minidiff resume")),
              ("inspect after it", None if (out / "inspect.rc").read_text().strip() == "0" else "inspect failed"),
              ("resume on a read-only disk", contract_problem(ended("ro"), 74, "Read-only file system")
               or (None if (out / "ro.before").read_text().split()[0] == (out / "ro.after").read_text().split()[0]
                   else "the file changed")),
              ("resume once space is back", contract_problem(ended("resume"), 0)
               or _same_run_problem(out / "final.h5", reference[16]))]
    for what, problem in trials:
        assert count("full disk (tmpfs), read-only", problem is None), (what, problem, proc.stderr[-500:])


def test_zz_print_the_tally_of_trials_per_family():
    """Last in the file (pytest keeps file order): every family's trials so far, and how many held the contract."""
    assert not tally_problem()
