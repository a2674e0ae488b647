"""What the memory ledger costs ``gradscope inspect``: the same config run with ``memory: {ledger:
false}`` and with the ledger (its pack hook, module hooks and FLOP counter on the first step), in
interleaved rounds in one process; medians and the ratio.

    python scripts/bench_ledger.py                       # the LM configs, 5 rounds of 3-step runs
    python scripts/bench_ledger.py --models gpt2 --rounds 7 --steps 10 --threads 1

Each round builds the model (not timed) and times ``Inspection.run()``: every step, the ledger's
first one included. ``first step`` times that step alone (``run()`` of a one-step config). Times are
this process's CPU time (``time.process_time``), steadier than wall time on a shared machine.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from typing import Any

import torch

from gradscope.config import settings_from_dict
from gradscope.inspection import Inspection

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


def bench(raw: dict[str, Any], rounds: int, steps: int) -> dict[str, float]:
    """Median seconds of each variant over interleaved rounds."""
    variants = {
        "run, no ledger": (False, steps),
        "run, ledger": (True, steps),
        "first step, no ledger": (False, 1),
        "first step, ledger": (True, 1),
    }
    for ledger, n in variants.values():  # warm-up
        _run(raw, ledger, n)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, (ledger, n) in variants.items():
            times[name].append(_run(raw, ledger, n))
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="steps per run (the config's `steps`)")
    parser.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, cpu {torch.get_num_threads()} threads; {args.rounds} rounds, medians")
    for name in args.models:
        t = bench(CONFIGS[name], args.rounds, args.steps)
        print(f"\n{name}")
        for variant, seconds in t.items():
            print(f"  {variant:22} {1e3 * seconds:9.1f} ms CPU")
        print(f"  ratio, {args.steps}-step run      {t['run, ledger'] / t['run, no ledger']:9.3f}x")
        print(f"  ratio, first step       {t['first step, ledger'] / t['first step, no ledger']:9.3f}x")


if __name__ == "__main__":
    main()
