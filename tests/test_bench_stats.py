"""The overhead benchmark's statistics (scripts/bench_stats.py) on made-up times: nothing is timed."""

import random
import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from bench_stats import Estimate, bootstrap_interval, estimate, per_round_ratios, verdict  # noqa: E402


def test_ratios_are_taken_round_by_round():
    assert per_round_ratios([2.0, 4.0, 9.0], [1.0, 2.0, 3.0]) == [2.0, 2.0, 3.0]
    with pytest.raises(ValueError, match="one base time per round: 2 times, 3 base times"):
        per_round_ratios([1.0, 1.0], [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="positive, got 0.0"):
        per_round_ratios([1.0], [0.0])


def test_a_slow_round_divides_out_and_an_outlier_does_not_move_the_median():
    base = [1.0, 3.0, 1.0, 1.0, 1.0]  # the second round ran beside another process
    times = [1.1, 3.3, 1.1, 1.1, 9.0]  # and the last one was hit by something else
    e = estimate(times, base)
    assert e.median == pytest.approx(1.1)
    assert e.median == pytest.approx(statistics.median(t / b for t, b in zip(times, base)))


def test_bootstrap_interval_matches_the_exact_distribution_of_a_resampled_median():
    # Resampling [1, 2, 3] three times: the median is 1 or 3 with probability 7/27 each, else 2.
    # The 2.5% and 97.5% points are then 1 and 3; the 30% and 70% points are both 2.
    assert bootstrap_interval([1.0, 2.0, 3.0]) == (1.0, 3.0)
    assert bootstrap_interval([1.0, 2.0, 3.0], level=0.4) == (2.0, 2.0)
    assert bootstrap_interval([1.2] * 7) == (1.2, 1.2)
    with pytest.raises(ValueError, match="at least one value"):
        bootstrap_interval([])


def test_bootstrap_interval_holds_the_true_median_and_narrows_with_more_rounds():
    draw = random.Random(1)
    few = [draw.gauss(1.05, 0.02) for _ in range(10)]
    many = [draw.gauss(1.05, 0.02) for _ in range(400)]
    low_few, high_few = bootstrap_interval(few)
    low_many, high_many = bootstrap_interval(many)
    assert low_many < 1.05 < high_many
    assert low_few <= statistics.median(few) <= high_few
    assert high_many - low_many < (high_few - low_few) / 2


def rounds(ratio: float, noise: float, n: int = 15, seed: int = 0) -> tuple[list[float], list[float]]:
    """Made-up plain and mode times: each round's load moves both; the mode is ``ratio`` slower."""
    draw = random.Random(seed)
    load = [draw.uniform(1.0, 1.6) for _ in range(n)]  # the machine's load, shared by both in a round
    plain = [w * draw.gauss(1.0, noise) for w in load]
    mode = [w * ratio * draw.gauss(1.0, noise) for w in load]
    return plain, mode


def test_three_percent_is_told_apart_on_steady_rounds():
    plain, mode = rounds(1.03, noise=0.005)
    e = estimate(mode, plain)
    assert not e.holds_one and e.low > 1.0
    assert verdict("stats", mode, "lightning", plain).endswith("stats is slower")
    assert verdict("lightning", plain, "stats", mode).endswith("lightning is faster")


def test_equal_modes_cannot_be_told_apart():
    plain, mode = rounds(1.0, noise=0.02, seed=3)
    assert estimate(mode, plain).holds_one
    assert verdict("all", mode, "stats", plain).endswith("cannot be told apart")


def test_three_percent_in_noisy_rounds_cannot_be_told_apart():
    plain, mode = rounds(1.03, noise=0.15, n=5, seed=2)
    assert "cannot be told apart" in verdict("stats", mode, "lightning", plain)


def test_an_estimate_reads_as_median_and_interval():
    assert str(Estimate(1.0512, 1.0234, 1.0791)) == "1.051x [1.023, 1.079]"
    assert Estimate(1.0, 0.98, 1.0).holds_one and not Estimate(1.02, 1.001, 1.04).holds_one


def test_the_benchmark_runs_its_modes_and_prints_their_table(tmp_path):
    # A smoke run of scripts/bench_overhead.py on the smallest model: every mode it names is in the
    # table, with a ratio and an interval; nothing here reads the times themselves.
    import subprocess

    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_overhead.py"
    command = [sys.executable, str(script), "--quick", "--models", "resnet", "--modes", "stats", "first", "ledger"]
    result = subprocess.run([*command, "--threads", "1", "--clock", "cpu"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "cpu clock; 3 rounds" in result.stdout
    header, _, row = result.stdout.strip().splitlines()[-3:]
    assert header == "| model | stats | first | ledger |"
    assert row.startswith("| ResNet CNN (BatchNorm) | ") and row.count("x [") == 3
    assert "ledger vs first: " in result.stdout
    wrong = subprocess.run([*command, "--clock", "cpu", "--device", "meta"], capture_output=True, text=True)
    assert wrong.returncode == 2 and "--clock cpu times the CPU's work only; the device is meta" in wrong.stderr
