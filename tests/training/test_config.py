"""TrainConfig's defaults that depend on another option."""

import pytest

from minidiff.training.config import CAPPED_DEFAULTS, TrainConfig


def test_step_counts_default_to_their_usual_value_capped_at_timesteps():
    assert {k: getattr(TrainConfig(), k) for k in CAPPED_DEFAULTS} == CAPPED_DEFAULTS
    short = TrainConfig.from_dict({"timesteps": 8})
    assert {k: getattr(short, k) for k in CAPPED_DEFAULTS} == {k: min(v, 8) for k, v in CAPPED_DEFAULTS.items()}
    assert TrainConfig.from_dict(short.to_dict()) == short   # stored concrete: a run file's config reloads as it was


def test_an_explicit_step_count_above_timesteps_is_still_refused():
    with pytest.raises(ValueError, match="sample_steps"):
        TrainConfig.from_dict({"timesteps": 8, "sample_steps": 9})
