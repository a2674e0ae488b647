"""Models whose code leaves the process or signals it, for the bad-input tests."""

import argparse
import os
import signal
import sys

import torch
from torch import nn


class Leaving(nn.Module):
    """A tiny model that calls sys.exit, runs argparse, sits on the meta device or signals itself."""

    def __init__(self, mode: str = "none") -> None:
        super().__init__()
        self.layer = nn.Linear(4, 2, device="meta" if mode == "meta" else None)
        self.mode, self.calls = mode, 0
        if mode == "factory_exit":
            sys.exit(3)
        if mode == "argparse":
            argparse.ArgumentParser().parse_args()  # sees no gradscope option

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.mode == "forward_exit":
            sys.exit(0)
        if self.mode in ("sigterm", "double_sigint") and self.calls == 2:
            sig = signal.SIGTERM if self.mode == "sigterm" else signal.SIGINT
            os.kill(os.getpid(), sig)
            if self.mode == "double_sigint":
                os.kill(os.getpid(), sig)
        return self.layer(x)
