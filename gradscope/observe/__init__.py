"""Watching a training loop: the Watch, its history, optimizer hooks, run facts, distributed runs."""
