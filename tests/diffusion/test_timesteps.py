"""The bucket- and course-aware timestep samplers: what each batch draws, and runs that resume through them bitwise."""

import numpy as np
import pytest

from helpers.bitwise import assert_bitwise_equal, untimed
from minidiff.diffusion.losses import UniformSampler
from minidiff.diffusion.timesteps import (BucketCycleSampler, CurriculumSampler, StratifiedSampler,
                                          make_timestep_sampler, timestep_bucket_edges)
from minidiff.runs.file import RunFile
from minidiff.training.config import TrainConfig
from minidiff.training.trainer import Trainer
from minidiff.training.session import resume_run, start_run


@pytest.mark.parametrize("T, K", [(1000, 10), (100, 7), (10, 10), (53, 4), (5, 1)])
def test_bucket_edges_are_those_of_the_trainers_timestep_loss(T, K):
    edges = timestep_bucket_edges(T, K)
    t = np.arange(T)
    assert edges[0] == 0 and edges[-1] == T and np.all(np.diff(edges) > 0)
    np.testing.assert_array_equal(np.searchsorted(edges, t, side="right") - 1, (t * K) // T)


@pytest.mark.parametrize("n", [128, 130, 7, 10])
def test_stratified_puts_equal_counts_in_every_bucket_and_spreads_the_remainder(n):
    T, K = 100, 10
    sampler, rng = StratifiedSampler(T, K), np.random.default_rng(0)
    extra_seen = np.zeros(K)
    for _ in range(200):
        t, w = sampler.sample(n, rng)
        counts = np.bincount((t * K) // T, minlength=K)
        assert t.dtype == np.int64 and np.all(w == 1.0)
        assert set(counts.tolist()) <= {n // K, n // K + 1} and counts.sum() == n
        extra_seen += counts - n // K
    if n % K:   # the remainder goes to random buckets: over 200 batches every bucket gets some of it
        assert np.all(extra_seen > 0)
        assert extra_seen.sum() == 200 * (n % K)


def test_stratified_draws_t_uniformly_within_each_bucket():
    T, K = 20, 4
    sampler, rng = StratifiedSampler(T, K), np.random.default_rng(1)
    t = np.concatenate([sampler.sample(400, rng)[0] for _ in range(200)])
    freq = np.bincount(t, minlength=T) / len(t)
    np.testing.assert_allclose(freq, 1.0 / T, atol=0.004)   # 80 000 draws: 4 standard errors


def test_bucket_cycle_draws_each_batch_from_the_next_bucket():
    T, K = 100, 4
    sampler, rng = BucketCycleSampler(T, K), np.random.default_rng(0)
    seen = []
    for k in range(10):
        t, _ = sampler.sample(64, rng)
        buckets = set(((t * K) // T).tolist())
        assert len(buckets) == 1 and sampler.last_bucket == buckets.pop() == k % K
        seen.append(sampler.last_bucket)
        lo, hi = timestep_bucket_edges(T, K)[k % K: k % K + 2]
        assert t.min() >= lo and t.max() < hi
    assert seen == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]


def test_curriculum_starts_at_the_top_bucket_and_reaches_every_t_at_its_step():
    T, K, S = 1000, 10, 100
    sampler, rng = CurriculumSampler(T, K, S), np.random.default_rng(0)
    expected = {0: 900, 25: 675, 50: 450, 99: 9, 100: 0, 150: 0}
    for k in range(151):
        t, w = sampler.sample(256, rng)
        assert np.all(w == 1.0) and t.max() < T
        if k in expected:
            assert sampler.low_end(k) == expected[k]
            assert t.min() >= expected[k]
            assert t.min() < expected[k] + 30   # 256 draws reach the bottom of the range
    p = sampler.probabilities()
    np.testing.assert_allclose(p, 1.0 / T)


@pytest.mark.parametrize("make", [lambda: StratifiedSampler(50, 5), lambda: BucketCycleSampler(50, 5),
                                  lambda: CurriculumSampler(50, 5, 7)], ids=["stratified", "cycle", "curriculum"])
def test_state_dict_continues_the_draws_exactly(make):
    straight, rng = make(), np.random.default_rng(3)
    ref = [straight.sample(16, rng)[0] for _ in range(9)]
    first, rng2 = make(), np.random.default_rng(3)
    got = [first.sample(16, rng2)[0] for _ in range(4)]
    state, rng_state = first.state_dict(), rng2.bit_generator.state
    second, rng3 = make(), np.random.default_rng(99)
    second.load_state_dict(state)
    rng3.bit_generator.state = rng_state
    got += [second.sample(16, rng3)[0] for _ in range(5)]
    for a, b in zip(ref, got):
        assert a.tobytes() == b.tobytes()


def test_mismatched_sampler_state_is_refused():
    with pytest.raises(ValueError, match="buckets"):
        StratifiedSampler(50, 5).load_state_dict(StratifiedSampler(50, 4).state_dict())
    with pytest.raises(ValueError, match="curriculum"):
        CurriculumSampler(50, 5, 7).load_state_dict(CurriculumSampler(50, 5, 8).state_dict())


def test_make_timestep_sampler_keeps_uniform_and_refuses_unknown_names():
    assert type(make_timestep_sampler("uniform", 10, 2)) is UniformSampler
    with pytest.raises(ValueError, match="timestep sampling"):
        make_timestep_sampler("bogus", 10, 2)


# --- in a run ------------------------------------------------------------------------------------------------------

def _moons(**changes):
    base = dict(dataset="moons", steps=12, timesteps=40, batch_size=32, log_every=3, ckpt_every=4, sample_every=100,
                probe_every=0, eval_every=0, timestep_buckets=4)
    return TrainConfig(**{**base, **changes})


@pytest.mark.parametrize("sampling", ["stratified", "bucket_cycle", "curriculum"])
def test_a_run_resumed_mid_way_continues_bitwise_through_each_sampler(tmp_path, sampling):
    config = _moons(timestep_sampling=sampling, curriculum_steps=8 if sampling == "curriculum" else None)
    straight, run = start_run(config, tmp_path / "straight.h5")
    straight.train(run, 12)
    half, run = start_run(config, tmp_path / "half.h5")
    half.train(run, 5)   # off the checkpoint grid and mid-cycle (5 mod 4) / mid-curriculum (5 < 8)
    run.close()
    resumed, run = resume_run(tmp_path / "half.h5")
    resumed.train(run, 12)
    assert_bitwise_equal(untimed(straight.state_dict()), untimed(resumed.state_dict()))
    a, b = (RunFile.open(tmp_path / f"{n}.h5").metrics() for n in ("straight", "half"))
    assert_bitwise_equal(b["loss"], a["loss"])


def test_the_samplers_draw_what_the_trainer_trains_on():
    trainer = Trainer(_moons(timestep_sampling="bucket_cycle"))
    for k in range(6):
        trainer.train_step()
        counts = trainer._acc["bucket_count"]
        assert counts[k % 4] == 32 * (k // 4 + 1) and counts.sum() == 32 * (k + 1)


def test_curriculum_steps_default_to_half_the_run_and_a_longer_plan_is_refused_on_resume(tmp_path):
    assert _moons(timestep_sampling="curriculum").resolved_curriculum_steps == 6
    trainer, run = start_run(_moons(timestep_sampling="curriculum"), tmp_path / "c.h5")
    trainer.train(run, 4)
    run.close()
    with pytest.raises(ValueError, match="curriculum"):
        resume_run(tmp_path / "c.h5", steps=40)
    trainer, run = start_run(_moons(timestep_sampling="curriculum", curriculum_steps=6), tmp_path / "d.h5")
    trainer.train(run, 4)
    run.close()
    resumed, run = resume_run(tmp_path / "d.h5", steps=20)   # a fixed curriculum_steps does not depend on the total
    assert resumed.config.steps == 20
