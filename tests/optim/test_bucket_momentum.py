"""Per-bucket first moments: one bucket is the plain optimizer bit for bit; with several, each bucket's buffer is
exactly the first moment of a plain optimizer fed only that bucket's gradients; runs checkpoint and resume bitwise."""

import numpy as np
import pytest

from helpers.bitwise import assert_bitwise_equal, untimed
from minidiff.optim import SGD, Adam, AdamW, NAdam
from minidiff.optim.bucket_momentum import BucketMomentum
from minidiff.training.config import TrainConfig
from minidiff.training.trainer import Trainer
from minidiff.training.session import resume_run, start_run

SHAPES = {"w": (5, 3), "b": (5,), "gain": ()}
OPTIMIZERS = [("momentum", SGD, {"lr": 0.05, "momentum": 0.9}),
              ("momentum-damp-wd", SGD, {"lr": 0.05, "momentum": 0.8, "dampening": 0.3, "weight_decay": 0.1}),
              ("nesterov", SGD, {"lr": 0.05, "momentum": 0.9, "nesterov": True}),
              ("adam", Adam, {"lr": 0.01}),
              ("adamw", AdamW, {"lr": 0.01, "weight_decay": 0.1})]


def _params(rng):
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}


def _grads(rng):
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}


@pytest.mark.parametrize("case", OPTIMIZERS, ids=[c[0] for c in OPTIMIZERS])
def test_one_bucket_is_the_plain_optimizer_bit_for_bit(case):
    _, cls, hyper = case
    rng = np.random.default_rng(0)
    init = _params(rng)
    plain_params, bucket_params = ({k: v.copy() for k, v in init.items()} for _ in range(2))
    plain, split = cls(plain_params, **hyper), cls(bucket_params, **hyper)
    buckets = BucketMomentum(split, 1)
    for step in range(30):
        g = _grads(rng)
        buckets.select(0)
        a = plain.step(g, diagnostics=step % 7 == 0)
        b = split.step({k: v.copy() for k, v in g.items()}, diagnostics=step % 7 == 0)
        assert_bitwise_equal((bucket_params, split.state), (plain_params, plain.state), f"step {step}")
        if a is not None:
            assert {k: float(v) for k, v in a.items() if np.ndim(v) == 0} == \
                   {k: float(v) for k, v in b.items() if np.ndim(v) == 0}


@pytest.mark.parametrize("case", OPTIMIZERS[:3], ids=[c[0] for c in OPTIMIZERS[:3]])
def test_each_bucket_buffer_is_a_plain_momentum_buffer_fed_only_its_gradients(case):
    """For SGD the buffer update b = g (first), b = mu b + (1 - tau) g never reads theta except through coupled
    weight decay, so it is checked without weight decay: a plain SGD per bucket on its own copy gets the same bits."""
    _, cls, hyper = case
    hyper = {k: v for k, v in hyper.items() if k != "weight_decay"}
    rng = np.random.default_rng(1)
    B = 3
    params = _params(rng)
    opt = cls(params, **hyper)
    buckets = BucketMomentum(opt, B)
    refs = [cls({k: v.copy() for k, v in params.items()}, **hyper) for _ in range(B)]
    sequence = rng.integers(0, B, size=40)   # an irregular order, every bucket several times
    assert set(sequence.tolist()) == set(range(B))
    for k in sequence:
        g = _grads(rng)
        buckets.select(k)
        opt.step(g)
        refs[k].step({n: v.copy() for n, v in g.items()})
        for b in range(B):
            for n in SHAPES:
                ref = refs[b].state[n]["momentum_buffer"]
                assert buckets.buffer(b)[n].tobytes() == ref.tobytes(), f"bucket {b} {n}"
    np.testing.assert_array_equal(buckets.steps, np.bincount(sequence, minlength=B))


def test_adam_buckets_keep_their_own_m_and_bias_correction_and_share_v():
    """The direct formula: m_k as a plain Adam's m fed only bucket k's gradients, v as a plain Adam's v fed all,
    u = -(lr / (1 - beta1^{n_k})) m_k / (sqrt(v) / sqrt(1 - beta2^t) + eps)."""
    rng = np.random.default_rng(2)
    B, lr, b1, b2, eps = 3, 0.01, 0.9, 0.99, 1e-8
    params = {k: v.astype(np.float64) for k, v in _params(rng).items()}
    opt = Adam(params, lr=lr, betas=(b1, b2), eps=eps)
    buckets = BucketMomentum(opt, B)
    m = [{k: np.zeros(s) for k, s in SHAPES.items()} for _ in range(B)]
    v = {k: np.zeros(s) for k, s in SHAPES.items()}
    theta = {k: p.copy() for k, p in params.items()}
    counts = np.zeros(B, dtype=int)
    for t, k in enumerate(rng.integers(0, B, size=30), start=1):
        g = {n: rng.standard_normal(s) for n, s in SHAPES.items()}
        counts[k] += 1
        for n in SHAPES:
            m[k][n] = b1 * m[k][n] + (1 - b1) * g[n]
            v[n] = b2 * v[n] + (1 - b2) * g[n] ** 2
            theta[n] = theta[n] - lr / (1 - b1 ** counts[k]) * m[k][n] / (np.sqrt(v[n]) / np.sqrt(1 - b2 ** t) + eps)
        buckets.select(k)
        opt.step(g)
        for n in SHAPES:
            np.testing.assert_allclose(params[n], theta[n], rtol=1e-12, atol=1e-15)
            np.testing.assert_allclose(opt.state[n]["exp_avg_sq"], v[n], rtol=1e-12)
            for b in range(B):
                np.testing.assert_allclose(buckets.buffer(b)[n], m[b][n], rtol=1e-12, atol=1e-300)


def test_bucket_state_round_trips_and_continues_exactly():
    rng = np.random.default_rng(3)
    init = _params(rng)
    gs = [(int(rng.integers(0, 4)), _grads(rng)) for _ in range(20)]

    def run(stop_and_reload_at=None):
        params = {k: v.copy() for k, v in init.items()}
        opt = Adam(params, lr=0.01)
        buckets = BucketMomentum(opt, 4)
        for i, (k, g) in enumerate(gs):
            if i == stop_and_reload_at:
                state, ostate = buckets.state_dict(), opt.state_dict()
                params = {n: p.copy() for n, p in params.items()}
                opt = Adam(params, lr=0.01)
                opt.load_state_dict(ostate)
                buckets = BucketMomentum(opt, 4)
                buckets.load_state_dict(state)
            buckets.select(k)
            opt.step(g)
        return params, buckets.state_dict()

    (pa, sa), (pb, sb) = run(), run(stop_and_reload_at=11)
    assert_bitwise_equal((pb, sb), (pa, sa))


def test_optimizers_without_a_first_moment_of_their_own_are_refused():
    params = {"x": np.zeros(3)}
    with pytest.raises(ValueError, match="none that can be split"):
        BucketMomentum(SGD(params, lr=0.1), 2)
    with pytest.raises(ValueError, match="none that can be split"):
        BucketMomentum(NAdam(params), 2)


# --- in a run ------------------------------------------------------------------------------------------------------

def _moons(**changes):
    base = dict(dataset="moons", steps=12, timesteps=40, batch_size=32, log_every=3, ckpt_every=4, sample_every=100,
                probe_every=3, probe_buckets=2, probe_batch=8, eval_every=0, timestep_buckets=3,
                timestep_sampling="bucket_cycle", bucket_momentum=True)
    return TrainConfig(**{**base, **changes})


@pytest.mark.parametrize("changes, match", [(dict(timestep_sampling="uniform"), "bucket_cycle"),
                                            (dict(optimizer="sgd"), "plain sgd"),
                                            (dict(optimizer="nadam"), "nadam")])
def test_bucket_momentum_is_refused_where_it_means_nothing(changes, match):
    with pytest.raises(ValueError, match=match):
        _moons(**changes).validated()


def test_a_run_with_one_bucket_trains_exactly_like_one_without(tmp_path):
    a = Trainer(_moons(timestep_buckets=1, probe_every=0))
    b = Trainer(_moons(timestep_buckets=1, probe_every=0, bucket_momentum=False))
    for _ in range(6):
        a.train_step()
        b.train_step()
    assert_bitwise_equal(a.model.params, b.model.params)


@pytest.mark.parametrize("optimizer", ["adam", "momentum"])
def test_a_bucket_momentum_run_resumes_bitwise(tmp_path, optimizer):
    config = _moons(optimizer=optimizer)
    straight, run = start_run(config, tmp_path / "s.h5")
    straight.train(run, 12)
    half, run = start_run(config, tmp_path / "h.h5")
    half.train(run, 5)   # stops in the middle of a cycle of 3 buckets
    run.close()
    resumed, run = resume_run(tmp_path / "h.h5")
    resumed.train(run, 12)
    a, b = straight.state_dict(), resumed.state_dict()
    np.testing.assert_array_equal(a["bucket_momentum"]["steps"], [4, 4, 4])
    assert_bitwise_equal(untimed(b), untimed(a))
