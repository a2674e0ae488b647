"""What the memory ledger costs ``gradscope inspect``: the same config run with ``memory: {ledger:
false}`` and with the ledger (its pack hook, module hooks and FLOP counter on the first step), in
interleaved rounds in one process (the variants in a fresh random order each round); the median
of the per-round ratios and its bootstrap 95% interval (``scripts/bench_stats.py``).

    python scripts/bench_ledger.py                       # the LM configs, 5 rounds of 3-step runs
    python scripts/bench_ledger.py --models gpt2 --rounds 7 --steps 10 --threads 1

Each round builds the model (not timed) and times ``Inspection.run()``: every step, the ledger's
first one included. ``first step`` times that step alone (``run()`` of a one-step config). Times are
this process's CPU time (``time.process_time``), steadier than wall time on a shared machine.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
import warnings
from typing import Any

import torch
from bench_stats import Estimate, estimate  # scripts/, next to this file

from gradscope.config import settings_from_dict
from gradscope.runner.inspection import Inspection

GPT2_ARGS = {"n_layer": 6, "n_embd": 256, "n_head": 8, "vocab_size": 4096, "n_positions": 256}
CONFIGS: dict[str, dict[str, Any]] = {
    "lm5m": {
        "model": {
            "target": "gradscope.zoo:TransformerLM",
            "args": {"vocab": 8192, "d_model": 256, "n_layers": 4, "n_heads": 4, "max_len": 128},
        },
        "data": {"batch_size": 8, "input": {"tokens": {"vocab": 8192, "length": 128}}, "labels": "next_token"},
    },
    "gpt2": {
        "model": {
            "target": "transformers:GPT2LMHeadModel",
            "args": {"config": {"target": "transformers:GPT2Config", "args": GPT2_ARGS}},
        },
        "data": {"batch_size": 8, "input": {"tokens": {"vocab": 4096, "length": 256}}, "labels": "input"},
        "loss": "output",
    },
}


def _run(raw: dict[str, Any], ledger: bool, steps: int) -> float:
    settings = settings_from_dict({**raw, "steps": steps, "optimizer": {"name": "adamw"}, "memory": {"ledger": ledger}})
    inspection = Inspection(settings)
    start = time.process_time()
    inspection.run()
    return time.process_time() - start


VARIANTS = {
    "run, no ledger": (False, None),
    "run, ledger": (True, None),
    "first step, no ledger": (False, 1),
    "first step, ledger": (True, 1),
}


def bench(raw: dict[str, Any], rounds: int, steps: int, seed: int = 0) -> dict[str, list[float]]:
    """Each variant's seconds in every round, the variants in a fresh random order each round."""
    order = random.Random(seed)
    for ledger, n in VARIANTS.values():  # warm-up
        _run(raw, ledger, n or steps)
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(rounds):
        for name in order.sample(list(VARIANTS), len(VARIANTS)):
            ledger, n = VARIANTS[name]
            times[name].append(_run(raw, ledger, n or steps))
    return times


def ratios(times: dict[str, list[float]]) -> dict[str, Estimate]:
    """The ledger's cost as the median per-round ratio, with its interval."""
    return {
        "run": estimate(times["run, ledger"], times["run, no ledger"]),
        "first step": estimate(times["first step, ledger"], times["first step, no ledger"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="steps per run (the config's `steps`)")
    parser.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--seed", type=int, default=0, help="of the variants' order in each round")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, cpu {torch.get_num_threads()} threads; {args.rounds} rounds")
    print("the ledger's cost: median of the per-round ratios [bootstrap 95% interval]")
    for name in args.models:
        times = bench(CONFIGS[name], args.rounds, args.steps, args.seed)
        print(f"\n{name}")
        for variant, seconds in times.items():
            print(f"  {variant:22} {1e3 * statistics.median(seconds):9.1f} ms CPU (median)")
        for what, e in ratios(times).items():
            label = f"{args.steps}-step run" if what == "run" else what
            print(f"  ratio, {label:16} {e}")


if __name__ == "__main__":
    main()
