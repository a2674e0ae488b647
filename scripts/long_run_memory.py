"""Resident memory of a long ``gradscope.watch`` run: RSS at chosen steps of a many-tensor model.

The watch keeps full per-parameter records only for a bounded set of steps (``gradscope.Retention``),
so its memory should stay flat however long the run. Run:

    python scripts/long_run_memory.py                      # 20,000 steps, 100 parameter tensors
    python scripts/long_run_memory.py --at 1000 5000 20000 --tensors 100

It prints the RSS (from /proc/self/statm, or ru_maxrss where there is no /proc) at each step of
``--at`` and the growth since the first.
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import torch

import gradscope
from gradscope import zoo


def rss_mb() -> float:
    """The process's resident set size now, in MB (the peak where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def model_of(tensors: int) -> torch.nn.Module:
    """A residual MLP with ``tensors`` parameter tensors (weight and bias per linear layer, plus two
    per block's LayerNorm): small widths, so the step is cheap and the records dominate."""
    # zoo.MLP with residual blocks: input layer (2) + 4 per block + output layer (2).
    depth = max(1, (tensors - 4) // 4)
    return zoo.MLP(in_features=16, hidden=16, depth=depth, classes=4, residual=True, norm=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--at", type=int, nargs="+", default=[1000, 5000, 20000], help="steps to print RSS at")
    parser.add_argument("--tensors", type=int, default=100, help="parameter tensors of the model (about)")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = model_of(args.tensors)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(16, 16), torch.randint(4, (16,))
    count = sum(1 for _ in model.parameters())
    print(f"model: {count} parameter tensors; steps: {max(args.at)}")
    first = None
    start = time.perf_counter()
    with gradscope.watch(model, optimizer=opt, activations=False) as scope:
        for step in range(1, max(args.at) + 1):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            scope.step(loss)
            opt.step()
            if step in args.at:
                now = rss_mb()
                first = now if first is None else first
                kept = len(scope.steps)
                print(
                    f"step {step:>7,}: RSS {now:8.1f} MB ({now - first:+6.1f} MB since step {min(args.at):,}); "
                    f"records kept in full: {kept}; {time.perf_counter() - start:.0f} s"
                )
    report = scope.report
    print(
        f"report: {len(report.steps)} steps in full of {report.run.steps_completed}; findings: {len(report.anomalies)}"
    )


if __name__ == "__main__":
    main()
