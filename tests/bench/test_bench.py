"""The benchmark machinery: the FLOP counter against hand counts and PyTorch's counter, and run_benchmarks' output.

No speed is asserted anywhere: timings on a shared machine are noise; these tests check that the numbers are
computed from the right quantities and reported under the documented keys.
"""

import importlib.util
import json
import math

import pytest

from helpers.paths import REPO
from minidiff.bench.benchmark import format_table, interleaved_times, run_benchmarks
from minidiff.bench.units import CONFIGS, BenchConfig
from minidiff.bench.flops import attention_flops, conv2d_flops, linear_flops, unet_flops
from minidiff.models.unet import UNet

TINY = {"base_channels": 8, "groups": 4}


def test_flop_counter_matches_a_hand_count_of_a_one_level_unet():
    # N=2 images of 1x4x4, base 4 channels, temb 16, no attention, no resampling. Forward FLOPs per layer, by hand:
    n, hw = 2, 16
    conv3 = lambda cin, cout: 2 * n * cout * hw * cin * 9  # noqa: E731
    res = lambda cin, cout: conv3(cin, cout) + conv3(cout, cout) + 2 * n * 16 * cout + (  # noqa: E731
        2 * n * cout * hw * cin if cin != cout else 0)
    fwd_needing_dx = 2 * n * 16 * 16 + 3 * res(4, 4) + 2 * res(8, 4) + conv3(4, 1)  # time_embed.2 ... out_conv
    fwd_no_dx = 2 * n * 4 * 16 + conv3(1, 4)  # time_embed.0 (input: the embedding) and conv_in (input: the image)
    model = UNet(in_channels=1, base_channels=4, channel_mults=(1,), num_res_blocks=1, attention_levels=(),
                 groups=2, mid_attention=False)
    count = unet_flops(model, n, 4, 4)
    assert count.forward == fwd_needing_dx + fwd_no_dx == 121856
    assert count.training == 3 * fwd_needing_dx + 2 * fwd_no_dx == 363008
    linear = 2 * n * 4 * 16 * 2 + 2 * n * 16 * 16 * 3 + 5 * 2 * n * 16 * 4 * 3  # time_embed.0, .2, 5 temb_proj
    assert count.by_kind() == {"linear": linear, "conv": count.training - linear}


def test_flop_counter_counts_stride2_downsampling_and_attention_at_the_low_resolution():
    n, c = 3, 16  # level 1 has 2 * 8 = 16 channels at 8x8 / 2 = 4x4, i.e. 16 tokens
    model = UNet(base_channels=8, channel_mults=(1, 2), attention_levels=(1,), num_heads=2, groups=4)
    rows = {name: (kind, fwd, bwd) for name, kind, fwd, bwd in unet_flops(model, n, 8, 8).layers}
    assert rows["down.0.downsample"] == ("conv", conv2d_flops(n, 8, 8, 3, 4, 4),
                                         2 * conv2d_flops(n, 8, 8, 3, 4, 4))
    assert rows["down.1.attn.0.attention"] == ("attention", 4 * n * 16 * 16 * c, 8 * n * 16 * 16 * c)
    assert rows["mid.attn.attention"][1] == attention_flops(n, c, 16)
    assert rows["up.1.upsample"][1] == conv2d_flops(n, 16, 16, 3, 8, 8)  # runs at the upsampled 8x8
    assert rows["time_embed.0"][1:] == (linear_flops(n, 8, 32), linear_flops(n, 8, 32))


@pytest.mark.slow
def test_flop_counter_agrees_exactly_with_torch_flop_counter_on_the_twin(torch):
    from torch.utils.flop_counter import FlopCounterMode

    from minidiff.bench.torch_twin import torch_twin
    model = UNet(base_channels=8, channel_mults=(1, 2, 2), num_res_blocks=2, attention_levels=(1, 2), num_heads=2,
                 groups=4)
    twin = torch_twin(model)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 700])
    with FlopCounterMode(display=False) as fwd:
        twin(x, t)
    with FlopCounterMode(display=False) as step:
        twin(x, t).square().mean().backward()
    count = unet_flops(model, 2, 8, 8)
    assert (count.forward, count.training) == (fwd.get_total_flops(), step.get_total_flops())


def test_interleaved_times_alternates_order_and_drops_warmup():
    calls = []
    times = interleaved_times([lambda: calls.append("a"), lambda: calls.append("b")], warmup=1, repeats=3,
                              sync=lambda: None)
    assert calls == list("ab" "ba" "ab" "ba")
    assert [len(t) for t in times] == [3, 3] and all(s >= 0 for t in times for s in t)


def test_settle_runs_each_timed_call_right_after_untimed_calls_of_the_same_side():
    calls = []
    times = interleaved_times([lambda: calls.append("a"), lambda: calls.append("b")], warmup=0, repeats=2,
                              sync=lambda: None, settle=1e-9)
    assert calls == list("aa" "bb" "bb" "aa")   # one untimed call (the settle time is tiny), then the timed one
    assert [len(t) for t in times] == [2, 2]


@pytest.mark.slow
def test_run_benchmarks_reports_documented_keys_with_sane_values_and_torch_columns(torch):
    cfg = BenchConfig("tiny", 4, 8, TINY)
    (row,) = run_benchmarks([cfg], repeats=2, warmup=1, threads=None, settle=0.0)
    json.dumps(row)  # --json must be able to print it
    assert row["name"] == "tiny" and row["batch"] == 4 and row["device"] == "cpu" and row["unit"] == "train step"
    assert row["step_ms"] > 0 and len(row["step_ms_runs"]) == 2
    assert math.isclose(row["images_per_s"], 4 / (row["step_ms"] / 1e3))
    model = UNet(**TINY)
    assert math.isclose(row["gflop_per_step"], unet_flops(model, 4, 8, 8).training / 1e9)
    assert math.isclose(row["gflops"], row["gflop_per_step"] / (row["step_ms"] / 1e3))
    assert 0 < row["peak_fraction"] < 1 and row["peak_gflops"] == max(row["peak_gflops_readings"]) > 0
    assert row["torch_step_ms"] > 0 and 0 < row["torch_peak_fraction"] < 1
    assert math.isclose(row["ratio_vs_torch"], row["step_ms"] / row["torch_step_ms"])
    rounds = [a / b for a, b in zip(row["step_ms_runs"], row["torch_step_ms_runs"])]
    assert all(math.isclose(a, b) for a, b in zip(row["ratio_vs_torch_rounds"], rounds))
    paired = sorted(rounds)
    assert math.isclose(row["ratio_vs_torch_paired"], (paired[0] + paired[1]) / 2)
    assert row["peak_mem_mb"] > 0 and row["torch_peak_mem_mb"] > 0
    assert row["threads"] == row["torch_threads"] >= 1
    table = format_table([row])
    assert "tiny" in table and "matmul peak" in table and f"{paired[0]:.2f}-{paired[1]:.2f}" in table


def test_run_benchmarks_without_torch_or_memory_leaves_those_columns_empty_for_sampling():
    cfg = BenchConfig("tinyddim", 2, 8, TINY, sample_steps=2)
    (row,) = run_benchmarks([cfg], repeats=1, warmup=0, with_torch=False, memory=False, settle=0.0)
    assert row["unit"] == "ddim2 sampling" and row["step_ms"] > 0
    assert math.isclose(row["gflop_per_step"], 2 * unet_flops(UNet(**TINY), 2, 8, 8).forward / 1e9)
    for key in ("torch_step_ms", "ratio_vs_torch", "torch_peak_fraction", "peak_mem_mb", "torch_peak_mem_mb"):
        assert row[key] is None, key
    assert "-" in format_table([row])


def test_unknown_configuration_name_is_refused_before_any_timing():
    with pytest.raises(ValueError, match="choose from digits"):
        run_benchmarks(["digits", "nope"])
    assert set(CONFIGS) == {"digits", "digits32", "16x16", "32x32", "ddim50"}


def test_cli_gpu_without_cupy_is_exit_code_2_and_one_line():
    if importlib.util.find_spec("cupy") is not None:
        pytest.skip("CuPy is installed: the GPU path is the one under test elsewhere")
    from click.testing import CliRunner

    from cli import main
    result = CliRunner().invoke(main, ["bench", "--device", "gpu", "--quick", "--config", "digits"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1].startswith("Error:") and "cupy" in result.output.lower()


def _run_script(name, *args):
    import os
    import subprocess
    import sys
    root = REPO
    env = dict(os.environ, PYTHONPATH=str(root))
    out = subprocess.run([sys.executable, str(root / "benchmarks" / name), *args], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.parametrize("unit", ["trainer", "bench"])
def test_gpu_profile_script_runs_on_the_cpu_and_prints_the_step_time_and_both_tables(unit):
    """benchmarks/gpu_profile.py is run on lent GPU machines with little time to spare: it must not have rotted.
    On the CPU it profiles the same Trainer step, or a benchmark unit (without the device's kernel table)."""
    extra = ["--bench", "digits"] if unit == "bench" else []
    out = _run_script("gpu_profile.py", "--device", "cpu", "--steps", "1", "--top", "5", "--kernels", *extra)
    label = "bench unit digits" if unit == "bench" else "Trainer.train_step, default config"
    assert f"{label}, cpu: median" in out
    assert "--- by tottime" in out and "--- by cumulative" in out
    assert ("train_step" if unit == "trainer" else "backward") in out


def test_graph_ab_script_runs_on_the_cpu_and_reports_both_sides_and_their_bits():
    """benchmarks/graph_ab.py likewise (on the CPU both sides run eagerly, so their bits must agree)."""
    out = _run_script("graph_ab.py", "--device", "cpu", "--steps", "5")
    assert "graphs " in out and "eager " in out and "paired ratio graphs / eager" in out
    assert "bitwise equal True" in out
