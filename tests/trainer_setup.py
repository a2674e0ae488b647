"""What the tests against the real trainers share: a fresh accelerate state per test."""

from collections.abc import Iterator

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
