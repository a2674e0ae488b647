"""How much a gradscope step costs next to a plain training step and next to the peer tools, in one process.

    python scripts/bench_overhead.py --threads 1                 # every model and mode, CPU or the first GPU
    python scripts/bench_overhead.py --models lm5m many_tensors --modes stats lightning --rounds 21
    python scripts/bench_overhead.py --quick                     # a smoke run: 3 short rounds

A training step is zero_grad, forward, loss, backward, clip_grad_norm_ and an AdamW step. The
modes (``scripts/bench_peers.py``):
  plain         the step with no tool;
  stats         inside gradscope.watch with gradient statistics only (per-parameter
                norms, max |g|, zeros, parameter norms, the pre-clip norms and clip
                coefficient, the NaN/Inf detector: one host transfer per step);
  all           everything on: statistics and activation statistics (dead and
                saturated units, which modules ran);
  all+tb        everything on, plus TensorBoard with every gradient's histogram every
                step (the round waits, inside its timing, until its events are written);
  first         everything on, timing the watch's first step alone (no untimed step first);
  ledger        the same with the memory ledger, which measures that step (compare it with ``first``);
  lightning     Lightning's grad_norm(model, 2) after backward (norms only);
  wandb         wandb.watch(log="all", log_freq=1), offline, and a wandb.log of the loss;
  anomaly       torch.autograd.detect_anomaly;
  nan_detector  fairseq's NanDetector (forward and backward hooks on every module);
  hf_debug      transformers' DebugUnderflowOverflow (forward hooks on every module).
A mode whose package is not installed (``pip install gradscope[bench]``) is reported and skipped.

How it decides (``scripts/bench_stats.py``). Each round runs every mode once, in a random order,
each for the same number of timed steps (enough for ``--seconds`` of plain steps, measured at
warm-up), after one untimed step. A mode's ratio in a round is its time per step over plain's
in that round, so what slowed the whole round divides out; the table gives the median of the
per-round ratios and its bootstrap 95% interval. Pairs of modes (``--compare``) are judged by
the median of their own per-round ratio: "cannot be told apart" when its interval holds 1.
Intervals narrow with more rounds and a quieter machine: ``--threads 1`` on a shared machine
(two threads spin-waiting against other processes measure contention rather than the code).
CUDA times are taken with torch.cuda.synchronize() around each timed stretch. ``--clock cpu`` (CPU
only) times this process's CPU time instead of wall time: what other processes take from its
cores is left out, and short single steps (``first``, ``ledger``) become comparable. With --memory it
also runs each mode in a process of its own and prints its peak memory (max RSS on the CPU,
torch.cuda.max_memory_allocated on CUDA) and the ratio to plain.
"""

from __future__ import annotations

import argparse
import math
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from bench_peers import MODES, finish, missing  # scripts/, next to this file
from bench_stats import estimate, verdict
from torch import nn

from gradscope import zoo
from gradscope.loading import Batch, cross_entropy


@dataclass
class Case:
    name: str
    build: Callable[[], nn.Module]
    batch: Callable[[torch.device], Batch]


def _tokens(vocab: int, rows: int, length: int) -> Callable[[torch.device], Batch]:
    def make(device: torch.device) -> Batch:
        x = torch.randint(vocab, (rows, length), device=device)
        return Batch(x, torch.roll(x, -1, dims=1))

    return make


def _dense(shape: tuple[int, ...], classes: int) -> Callable[[torch.device], Batch]:
    def make(device: torch.device) -> Batch:
        return Batch(torch.randn(shape, device=device), torch.randint(classes, (shape[0],), device=device))

    return make


CASES = {
    "lm5m": Case(
        "transformer LM ~5M",
        lambda: zoo.TransformerLM(vocab=8192, d_model=256, n_layers=4, n_heads=4, max_len=128),
        _tokens(8192, 8, 128),
    ),
    "lm50m": Case(
        "transformer LM ~50M",
        lambda: zoo.TransformerLM(vocab=16384, d_model=512, n_layers=12, n_heads=8, max_len=128),
        _tokens(16384, 2, 128),
    ),
    "resnet": Case(
        "ResNet CNN (BatchNorm)",
        lambda: zoo.ResNet(in_channels=3, width=32, stages=(2, 2, 2), classes=10),
        _dense((16, 3, 32, 32), 10),
    ),
    "many_tensors": Case(
        "residual MLP, 1,004 tensors",
        lambda: zoo.MLP(in_features=32, hidden=32, depth=250, classes=10, residual=True, norm=True),
        _dense((32, 32), 10),
    ),
}


class Plain:
    """The user's step without gradscope; a mode's ``after_backward`` runs between backward and clipping."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer
        self.after_backward: Callable[[torch.Tensor], None] | None = None

    def step(self, batch: Batch) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss = cross_entropy(self.model(batch.inputs), batch.labels)
        loss.backward()
        if self.after_backward is not None:
            self.after_backward(loss)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()


def _time(plain: Plain, batch: Batch, steps: int, device: torch.device, mode: str, folder: Path) -> float:
    """Seconds per step over ``steps`` steps; each round enters the mode afresh (outside the timing),
    since a watch's activation mode would otherwise see the other modes' steps too. Each round's
    first step is not timed (in every mode but ``first`` and ``ledger``, which time it alone): in a
    watch it is the step that finds the activation sites, which a training run takes once."""
    with MODES[mode][0](plain.model, plain.optimizer, folder) as hooks:
        plain.after_backward = hooks.after_backward
        steps = 1 if hooks.first_only else steps
        try:
            if not hooks.first_only:
                plain.step(batch)
            if hooks.settle is not None:
                hooks.settle()
            _sync(device)
            start = CLOCK[0]()
            for _ in range(steps):
                plain.step(batch)
            if hooks.settle is not None:
                hooks.settle()
            _sync(device)
            return (CLOCK[0]() - start) / steps
        finally:
            plain.after_backward = None


# The timer of every timed stretch: wall time, or with ``--clock cpu`` this process's CPU time (all
# its threads), which leaves out the time other processes on a shared machine hold its cores.
CLOCK: list[Callable[[], float]] = [time.perf_counter]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Plan:
    """How long each round is: ``rounds`` rounds, each mode timed for ``steps_for`` steps of a model
    (``--seconds`` of plain steps, at least ``min_steps``)."""

    rounds: int
    seconds: float
    min_steps: int
    seed: int


def bench(case: Case, device: torch.device, plan: Plan, modes: list[str]) -> tuple[int, dict[str, list[float]]]:
    """Steps per round, and each mode's seconds per step in every round (one model, so the same
    weights), the modes in a fresh random order each round."""
    torch.manual_seed(0)
    model = case.build().to(device)
    batch = case.batch(device)
    plain = Plain(model, torch.optim.AdamW(model.parameters(), lr=1e-4))
    order = random.Random(plan.seed)
    with tempfile.TemporaryDirectory(prefix="gradscope-bench-") as folder:
        for mode in modes:  # warm-up: allocator, optimizer state, kernels
            _time(plain, batch, 2, device, mode, Path(folder))
        one = _time(plain, batch, 2, device, "plain", Path(folder))
        steps = max(plan.min_steps, math.ceil(plan.seconds / one))
        times: dict[str, list[float]] = {mode: [] for mode in modes}
        for _ in range(plan.rounds):
            for mode in order.sample(modes, len(modes)):
                times[mode].append(_time(plain, batch, steps, device, mode, Path(folder)))
        finish()
    return steps, times


def peak(case: Case, device: torch.device, mode: str, steps: int) -> float:
    """Peak memory in MiB of ``steps`` steps of one mode (call in a process of its own)."""
    torch.manual_seed(0)
    model = case.build().to(device)
    batch = case.batch(device)
    plain = Plain(model, torch.optim.AdamW(model.parameters(), lr=1e-4))
    with tempfile.TemporaryDirectory(prefix="gradscope-bench-") as folder:
        _time(plain, batch, steps, device, mode, Path(folder))
        finish()
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return _rss_high_water_mib()


def _rss_high_water_mib() -> float:
    # VmHWM belongs to this process's memory map; ru_maxrss on Linux carries the parent's peak over
    # fork and exec, so a child started by a large parent would report the parent's peak.
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**10  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def peaks(key: str, device: torch.device, modes: list[str], steps: int) -> dict[str, float]:
    """Each mode's peak memory, each in a fresh process so one mode's peak cannot hide another's."""
    out = {}
    for mode in modes:
        command = [sys.executable, __file__, "--peak-of", key, mode, str(steps), "--device", str(device)]
        command += ["--threads", str(torch.get_num_threads())]
        result = subprocess.run(command, capture_output=True, text=True, check=True)
        out[mode] = float(result.stdout.strip().splitlines()[-1])
    return out


PAIRS = [("stats", "lightning"), ("all", "stats"), ("all+tb", "all"), ("ledger", "first")]


def report(
    name: str, times: dict[str, list[float]], memory: dict[str, float], pairs: list[tuple[str, str]]
) -> list[str]:
    """Print one model's table and verdicts; return its markdown row (ratio [interval] per mode)."""
    plain = times["plain"]
    row = [name]
    for mode, t in times.items():
        e = estimate(t, plain)
        line = f"  {mode:14} {1e3 * statistics.median(t):10.2f} ms  {e}"
        if memory:
            line += f" {memory[mode]:10.0f} MiB {memory[mode] / memory['plain']:6.3f}x"
        print(line, flush=True)
        if mode != "plain":
            row.append(f"{e.median:.2f}x [{e.low:.2f}, {e.high:.2f}]")
    for a, b in pairs:
        if a in times and b in times:
            print("  " + verdict(a, times[a], b, times[b]))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(CASES), default=list(CASES))
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--seconds", type=float, default=1.0, help="timed seconds of plain steps per mode and round")
    parser.add_argument("--min-steps", type=int, default=3, help="timed steps per mode and round, at least")
    parser.add_argument("--seed", type=int, default=0, help="of the modes' order in each round")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 3 rounds of 2 steps")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES), help="plain is always run")
    parser.add_argument(
        "--compare", nargs="+", default=[f"{a}:{b}" for a, b in PAIRS], help="pairs A:B to judge A against B"
    )
    parser.add_argument("--memory", action="store_true", help="also measure each mode's peak memory")
    parser.add_argument(
        "--threads", type=int, help="CPU threads (torch.set_num_threads); 1 is steadier on a shared machine"
    )
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall time, or this process's CPU time (CPU only: steadier on a shared machine)",
    )
    parser.add_argument("--peak-of", nargs=3, metavar=("MODEL", "MODE", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    # The peers' own warnings (detect_anomaly's "enabled", the full backward hook on the first module) per round.
    warnings.filterwarnings("ignore", message="Anomaly Detection has been enabled")
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    device = torch.device(args.device)
    if args.clock == "cpu":
        if device.type != "cpu":
            parser.error(f"--clock cpu times the CPU's work only; the device is {device}: use --clock wall")
        CLOCK[0] = time.process_time
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.peak_of:
        key, mode, steps = args.peak_of
        print(peak(CASES[key], device, mode, int(steps)))
        return
    plan = Plan(3, 0.0, 2, args.seed) if args.quick else Plan(args.rounds, args.seconds, args.min_steps, args.seed)
    modes = ["plain"] + [m for m in args.modes if m != "plain"]
    for mode in [m for m in modes if missing(m)]:
        print(f"skipped {mode}: needs {missing(mode)}")
        modes.remove(mode)
    pairs = [tuple(p.split(":", 1)) for p in args.compare]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(
        f"device: {where}; torch {torch.__version__}; {args.clock} clock; {plan.rounds} rounds, random order (seed {plan.seed})"
    )
    print("per mode: median ms/step, median of per-round ratios to plain [bootstrap 95% interval]")
    rows = []
    for key in args.models:
        case = CASES[key]
        n = sum(p.numel() for p in case.build().parameters())
        tensors = sum(1 for _ in case.build().parameters())
        started = time.perf_counter()
        steps, times = bench(case, device, plan, modes)
        took = time.perf_counter() - started
        print(f"\n{case.name} ({n / 1e6:.1f}M parameters, {tensors} tensors): {steps} steps per round, {took:.0f} s")
        memory = peaks(key, device, modes, steps + 2) if args.memory else {}
        rows.append(report(case.name, times, memory, pairs))
    print("\n| model | " + " | ".join(modes[1:]) + " |")
    print("|---" * len(modes) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
