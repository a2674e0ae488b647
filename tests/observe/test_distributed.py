"""gradscope across processes: DDP and FSDP2 on gloo, two ranks, compared with one process over the whole batch.

Each test starts its ranks as torchrun would (RANK, WORLD_SIZE, MASTER_ADDR/PORT in the environment),
bounded in time, so that each rank's own exit code and output can be checked.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gradscope.parallel import shard
from gradscope.report import Anomaly, NonfiniteOrigin, RankStep, Report, RunInfo, StepRecord
from gradscope.rules.ranks import rank_divergence

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "tests" / "dist_models.py"
LIMIT_S = 180  # no rank may take longer: a hang fails the test instead of the suite

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(rank: int, world: int, port: int) -> dict[str, str]:
    return {
        **os.environ,
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world),
        "LOCAL_WORLD_SIZE": str(world),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
    }


def launch(args: list[str], world: int = 2, module: str = "gradscope") -> list[tuple[int, str, str]]:
    """Run ``python -m module args`` as ``world`` ranks; each rank's (exit code, stdout, stderr)."""
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", module, *args],
            env=_env(rank, world, port),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(world)
    ]
    deadline = time.monotonic() + LIMIT_S
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append((proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return results


def single(args: list[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "gradscope", *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=LIMIT_S
    )


def gated_config(tmp_path: Path, name: str, steps: int = 2, **data_args: object) -> Path:
    """A small ReLU MLP (dead-unit statistics to compare) on a batch from ``tests/dist_models.py``."""
    args = {"rows": 8, **data_args}
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        f"model: {{target: {MODELS}:GatedMLP}}\n"
        f"data: {{target: {MODELS}:batch, args: {json.dumps(args)}}}\n"
        f"steps: {steps}\n"
        "optimizer: {name: sgd, lr: 0.1}\n"
        "clip: {max_norm: 0.05}\n"
        "distributed: {timeout_s: 60}\n"
    )
    return path


def assert_same_numbers(one: dict, many: dict) -> None:
    """Per-step, per-parameter numbers of a distributed report equal the single-process one's."""
    assert len(one["steps"]) == len(many["steps"])
    for a, b in zip(one["steps"], many["steps"]):
        assert b["loss"] == (pytest.approx(a["loss"], rel=1e-5) if a["loss"] is not None else None)
        assert b["grad_norm_total"] == pytest.approx(a["grad_norm_total"], rel=1e-5)
        if a.get("clip_coefficient") is not None:
            assert b["clip_coefficient"] == pytest.approx(a["clip_coefficient"], rel=1e-5)
        assert set(a["parameters"]) == set(b["parameters"])
        for name, p in a["parameters"].items():
            q = b["parameters"][name]
            if p["grad_norm"] is None:  # no gradient (unused) on both
                assert q["grad_norm"] is None, name
                continue
            for key in ("grad_norm", "grad_max_abs", "param_norm"):
                assert q[key] == pytest.approx(p[key], rel=1e-5, abs=1e-9), (a["step"], name, key)
            # An entry whose exact gradient is 0 can round to +-1e-12 in another summation order.
            assert q["zero_fraction"] == pytest.approx(p["zero_fraction"], abs=0.01), (name,)
        for key, act in a["activations"].items():
            assert b["activations"][key]["fraction"] == pytest.approx(act["fraction"]), key
            assert b["activations"][key]["samples"] == act["samples"]


# --- the CLI under two ranks ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm_single(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("single") / "single.json"
    result = single(["inspect", "configs/transformer_lm.yaml", "--steps", "2", "--json", str(out)])
    assert result.returncode == 0, result.stderr
    return json.loads(out.read_text())


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_transformer_numbers_equal_one_process_over_the_whole_batch(
    strategy: str, lm_single: dict, tmp_path: Path
) -> None:
    # Tied embeddings, activation checkpointing, AdamW and clipping: two steps, so the update matches too.
    out = tmp_path / "report.json"
    args = ["inspect", "configs/transformer_lm.yaml", "--steps", "2", "--distributed", strategy, "--json", str(out)]
    results = launch(args)
    assert [code for code, _, _ in results] == [0, 0], [err[-2000:] for _, _, err in results]
    assert "gradscope TransformerLM" in results[0][1] and results[1][1] == ""  # rank 0 writes
    report = json.loads(out.read_text())
    assert report["run"]["distributed"] == {"strategy": strategy, "world_size": 2, "backend": "gloo"}
    assert_same_numbers(lm_single, report)
    ranks = report["steps"][0]["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert math.fsum(r["loss"] for r in ranks) / 2 == pytest.approx(report["steps"][0]["loss"])
    if strategy == "ddp":  # each rank's own gradient before the all-reduce is seen
        assert all(r["grad_norm"] > 0 for r in ranks)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_relu_statistics_and_clipping_cover_every_ranks_slice(strategy: str, tmp_path: Path) -> None:
    config = gated_config(tmp_path, "gated")
    one = tmp_path / "one.json"
    assert single(["inspect", str(config), "--json", str(one)]).returncode == 0
    many = tmp_path / "many.json"
    results = launch(["inspect", str(config), "--distributed", strategy, "--json", str(many)])
    assert [code for code, _, _ in results] == [0, 0], [err[-2000:] for _, _, err in results]
    first = json.loads(one.read_text())
    assert any(a["fraction"] > 0 for a in first["steps"][0]["activations"].values())  # something to compare
    assert_same_numbers(first, json.loads(many.read_text()))


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_nan_on_rank_1_only_is_found_with_its_rank_and_origin(strategy: str, tmp_path: Path) -> None:
    config = gated_config(tmp_path, "poisoned", poison=6)  # row 6 is in rank 1's half of the batch
    out = tmp_path / "report.json"
    results = launch(["inspect", str(config), "--distributed", strategy, "--json", str(out)])
    assert [code for code, _, _ in results] == [1, 1]  # every rank fails the run
    report = json.loads(out.read_text())
    (finding,) = [a for a in report["anomalies"] if a["severity"] == "error"]
    where = (finding["kind"], finding["module"], finding["rank"], finding["step"])
    assert where == ("nonfinite_forward", "gate", 1, 0), finding
    assert finding["evidence"]["op"] == "torch.sqrt"
    assert "dist_models.py:13" in finding["evidence"]["source"]
    assert "On rank 1" in finding["message"]
    ranks = report["steps"][0]["ranks"]
    assert math.isfinite(ranks[0]["loss"]) and ranks[1]["loss"] == "nan"  # strict JSON
    if strategy == "ddp":
        assert ranks[0]["nonfinite"] == [] and "head.weight" in ranks[1]["nonfinite"]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_unused_parameters_are_reported_not_fatal(strategy: str, tmp_path: Path) -> None:
    # Plain DDP stops at the second step when a parameter gets no gradient; gradscope reports it.
    args = ["inspect", "configs/faults/unused_detached.yaml", "--steps", "3", "--json"]
    one = tmp_path / "one.json"
    assert single([*args, str(one)]).returncode == 0
    many = tmp_path / "many.json"
    results = launch([*args, str(many), "--distributed", strategy])
    assert [code for code, _, _ in results] == [0, 0], [err[-2000:] for _, _, err in results]
    first, report = json.loads(one.read_text()), json.loads(many.read_text())
    assert [(a["kind"], a["module"]) for a in report["anomalies"]] == [
        (a["kind"], a["module"]) for a in first["anomalies"]
    ]
    assert {a["module"] for a in report["anomalies"]} == {"encoder", "aux_head"}
    assert_same_numbers(first, report)


def test_a_rank_whose_gradients_stand_out_is_named(tmp_path: Path) -> None:
    config = gated_config(tmp_path, "scaled", steps=1, scale_from=4)  # rank 1's rows are 1000x larger
    out, logdir = tmp_path / "report.json", tmp_path / "tb"
    args = ["inspect", str(config), "--distributed", "ddp", "--json", str(out), "--fail-on", "warning"]
    results = launch([*args, "--logdir", str(logdir)])
    assert [code for code, _, _ in results] == [1, 1]
    report = json.loads(out.read_text())
    (finding,) = [a for a in report["anomalies"] if a["kind"] == "rank_divergence"]
    assert finding["rank"] == 1 and "dominates" in finding["message"]
    assert finding["evidence"]["rank_grad_norms"]["1"] > 100 * finding["evidence"]["rank_grad_norms"]["0"]
    # One TensorBoard run (rank 0's), with each rank's own curves.
    assert len(list(logdir.glob("events.out.tfevents.*"))) == 1
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    for rank in (0, 1):
        (event,) = acc.Scalars(f"rank_grad_norm/{rank}")
        assert event.value == pytest.approx(report["steps"][0]["ranks"][rank]["grad_norm"], rel=1e-6)


def test_healthy_gated_model_gives_no_rank_divergence(tmp_path: Path) -> None:
    config = gated_config(tmp_path, "healthy", steps=2)
    out = tmp_path / "report.json"
    results = launch(["inspect", str(config), "--distributed", "ddp", "--json", str(out)])
    assert [code for code, _, _ in results] == [0, 0]
    kinds = [a["kind"] for a in json.loads(out.read_text())["anomalies"]]
    assert "rank_divergence" not in kinds and not any(k.startswith("nonfinite") for k in kinds)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_rank_that_fails_does_not_hang_the_others(strategy: str, tmp_path: Path) -> None:
    config = tmp_path / "raises.yaml"
    config.write_text(
        f"model: {{target: {MODELS}:RaisesOnPoison}}\n"
        f"data: {{target: {MODELS}:batch, args: {{rows: 8, poison: 6}}}}\n"
        # Torn down by the failing rank, not by the timeout: a wait of timeout_s would outlast LIMIT_S
        # and fail launch, whatever the machine's speed.
        f"steps: 2\ndistributed: {{timeout_s: {2 * LIMIT_S}}}\n"
    )
    out = tmp_path / "report.json"
    results = launch(["inspect", str(config), "--distributed", strategy, "--json", str(out)])
    (code0, _, err0), (code1, _, err1) = results
    assert code1 == 2 and "gradscope[rank 1]: error:" in err1 and "a poisoned row reached the model" in err1
    assert code0 == 2 and "another rank failed" in err0 and "Traceback" not in err0
    run = json.loads(out.read_text())["run"]  # rank 0 still writes what it has
    assert run["status"] == "failed" and "RankFailure" in run["error"]


def test_a_rank_that_stops_answering_times_out_the_others(tmp_path: Path) -> None:
    config = tmp_path / "stalls.yaml"
    config.write_text(
        f"model: {{target: {MODELS}:StallsOnPoison, args: {{seconds: 15}}}}\n"
        f"data: {{target: {MODELS}:batch, args: {{rows: 8, poison: 6}}}}\n"
        "steps: 2\ndistributed: {timeout_s: 5}\n"
    )
    out = tmp_path / "report.json"
    results = launch(["inspect", str(config), "--distributed", "ddp", "--json", str(out)])
    # Without the timeout the others would wait out the stall and the run would complete (exit 0).
    (code0, out0, err0), (code1, _, _) = results
    assert code0 == 2 and "another rank failed or stopped answering" in err0, (code0, out0[-1500:], err0[-1500:])
    assert "backward_error" not in out0  # a collective that timed out is not the model's backward failing
    assert code1 != 0  # it wakes up to a group that is gone
    assert json.loads(out.read_text())["run"]["status"] == "failed"


def test_torchrun_command_from_the_readme(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += ["-m", "gradscope", "inspect", "configs/transformer_lm.yaml", "--distributed", "ddp"]
    command += ["--steps", "1", "--json", str(out)]
    result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=LIMIT_S)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(out.read_text())["run"]["distributed"]["world_size"] == 2


# --- configuration errors ---------------------------------------------------------------------------


def test_distributed_without_torchrun_says_how_to_launch(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    result = subprocess.run(
        [sys.executable, "-m", "gradscope", "inspect", "configs/transformer_lm.yaml", "--distributed", "fsdp"],
        env={**env, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=LIMIT_S,
    )
    assert result.returncode == 2
    assert "torchrun --nproc_per_node=N -m gradscope inspect CONFIG --distributed fsdp" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_batch_that_does_not_split_over_the_ranks_is_a_config_error(tmp_path: Path) -> None:
    config = gated_config(tmp_path, "odd", steps=1)  # 8 rows over 3 ranks
    results = launch(["inspect", str(config), "--distributed", "ddp"], world=3)
    assert [code for code, _, _ in results] == [2, 2, 2]
    assert "must split evenly over 3 ranks" in results[0][2]


# --- the Python API in a user's own DDP / FSDP2 loop ----------------------------------------------------


@pytest.fixture(scope="module")
def watch_single(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("watch") / "single.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(
        [sys.executable, "-m", "tests.dist_watch", "single", str(out)], env=env, cwd=ROOT, check=True, timeout=LIMIT_S
    )
    return json.loads(out.read_text())


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_watch_in_a_users_distributed_loop(strategy: str, watch_single: dict, tmp_path: Path) -> None:
    # The user's loop clips with clip_grad_norm_ (DTensor-aware under FSDP2): gradscope reports the
    # true norms and the coefficient, and histograms over the whole gradients.
    out = tmp_path / "report.json"
    results = launch([strategy, str(out)], module="tests.dist_watch")
    assert [code for code, _, _ in results] == [0, 0], [err[-2000:] for _, _, err in results]
    report = json.loads(out.read_text())
    assert report["run"]["model"] == "GatedMLP"
    assert report["run"]["distributed"]["strategy"] == strategy
    assert_same_numbers(watch_single, report)
    for a, b in zip(watch_single["steps"], report["steps"]):
        assert b["clip_coefficient"] == pytest.approx(a["clip_coefficient"], rel=1e-5)
        assert a["clip_coefficient"] < 1  # clipping did happen
        for name, hist in a["histograms"].items():
            assert b["histograms"][name]["count"] == hist["count"]
            assert b["histograms"][name]["min"] == pytest.approx(hist["min"], rel=1e-5)
            assert sum(b["histograms"][name]["buckets"]) == sum(hist["buckets"])


# --- pieces ---------------------------------------------------------------------------------------------


def test_shard_gives_each_rank_its_rows_of_every_batch_tensor() -> None:
    x, y = torch.arange(8).reshape(8, 1), torch.arange(8)
    parts = [shard({"x": x, "y": y, "scale": torch.tensor(2.0)}, rank, 2, 8) for rank in range(2)]
    assert parts[1]["x"].flatten().tolist() == [4, 5, 6, 7] and parts[0]["y"].tolist() == [0, 1, 2, 3]
    assert torch.equal(torch.cat([p["x"] for p in parts]), x)
    assert parts[0]["scale"].item() == 2.0  # not batch-shaped: every rank gets it whole


def _step(*ranks: RankStep) -> StepRecord:
    return StepRecord(0, 1.0, 1.0, {}, {}, ranks=ranks)


def _report(*steps: StepRecord) -> Report:
    return Report(RunInfo("M", "cpu", "fp32", 1, 1, 0, 0), (), steps)


def test_rank_divergence_names_the_outlier_of_three() -> None:
    check = type("Check", (), {"factor": 10.0})()
    step = _step(RankStep(0, 1.0, 1.0), RankStep(1, 1.0, 1.3), RankStep(2, 1.0, 0.01))
    (finding,) = rank_divergence(_report(step), check)
    assert finding.rank == 2 and "adds almost nothing" in finding.message
    assert rank_divergence(_report(_step(RankStep(0, 1.0, 1.0), RankStep(1, 1.0, 5.0))), check) == []
    # Non-finite gradients belong to the non-finite rules.
    assert rank_divergence(_report(_step(RankStep(0, 1.0, 1.0), RankStep(1, 1.0, math.nan))), check) == []


def test_ranks_and_rank_survive_the_json_round_trip() -> None:
    origin = NonfiniteOrigin(phase="forward", kind="nan", op="torch.sqrt", module="gate", rank=1)
    step = StepRecord(
        0, math.nan, math.nan, {}, {}, origin=origin, ranks=(RankStep(0, 1.0, 2.0), RankStep(1, math.nan, None, ("w",)))
    )
    run = RunInfo("M", "cpu", "fp32", 1, 1, 0, 0, distributed={"strategy": "ddp", "world_size": 2, "backend": "gloo"})
    report = Report(run, (), (step,), anomalies=(Anomaly("nonfinite_forward", "error", "m", rank=1),))
    back = Report.from_dict(json.loads(json.dumps(report.to_dict())))
    assert back.steps[0].ranks[1].nonfinite == ("w",) and back.steps[0].ranks[1].bad
    assert back.steps[0].origin is not None and back.steps[0].origin.rank == 1
    assert back.anomalies[0].rank == 1 and back.run.distributed == run.distributed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (NCCL)")
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_nccl_on_the_gpus_there_are(strategy: str, tmp_path: Path) -> None:
    # One rank per GPU (at most 2): NCCL, each rank on its LOCAL_RANK device, numbers as one process's.
    world = min(2, torch.cuda.device_count())
    config = gated_config(tmp_path, "gated_cuda")
    one = tmp_path / "one.json"
    assert single(["inspect", str(config), "--device", "cuda", "--json", str(one)]).returncode == 0
    many = tmp_path / "many.json"
    args = ["inspect", str(config), "--device", "cuda", "--distributed", strategy, "--json", str(many)]
    results = launch(args, world=world)
    assert [code for code, _, _ in results] == [0] * world, [err[-2000:] for _, _, err in results]
    report = json.loads(many.read_text())
    assert report["run"]["distributed"]["backend"] == "nccl" and report["run"]["device"] == "cuda:0"
    assert_same_numbers(json.loads(one.read_text()), report)
