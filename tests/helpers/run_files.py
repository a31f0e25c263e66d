"""A fresh run file for the run-file tests: created the way `minidiff train` creates one, with a small config."""

from minidiff.runs.file import RunFile


def new_run(tmp_path, name="run.h5", **kw) -> RunFile:
    return RunFile.create(tmp_path / name, {"lr": 1e-3, "optimizer": "adam"}, "minidiff train --lr 1e-3", **kw)
