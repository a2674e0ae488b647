"""What the tests against the real trainers share: a fresh accelerate state per test, a short SGD run."""

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture
def fresh_accelerate() -> Iterator[None]:
    """accelerate keeps one process-wide state (its mixed precision among it): each test starts anew."""
    from accelerate.state import AcceleratorState, GradientState

    def reset() -> None:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()

    reset()
    yield
    reset()


def sgd_steps(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    """``TrainingArguments`` of a short CPU run the loop tests share: 6 constant-lr SGD steps, nothing saved."""
    return (
        dict(
            output_dir=str(tmp_path / "out"),
            per_device_train_batch_size=4,
            max_steps=6,
            learning_rate=0.1,
            optim="sgd",
            report_to=[],
            use_cpu=True,
            save_strategy="no",
            disable_tqdm=True,
            lr_scheduler_type="constant",
        )
        | overrides
    )
