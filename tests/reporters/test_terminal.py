"""The terminal reporter: colour only on a terminal, and never with NO_COLOR."""

import io
import re

import gradscope
from gradscope.reporters.terminal import TerminalReporter
from tests.conftest import config


class FakeTty(io.StringIO):
    def isatty(self) -> bool:
        return True


def render(monkeypatch, no_color: bool) -> str:
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    monkeypatch.delenv("TERM", raising=False)
    if no_color:
        monkeypatch.setenv("NO_COLOR", "1")
    stream = FakeTty()
    TerminalReporter(stream).write(gradscope.inspect(config()))
    return stream.getvalue()


def colour_codes(text: str) -> set[int]:
    """The SGR foreground-colour codes (30-38, 90-97) in ``text``."""
    codes = {int(c) for params in re.findall(r"\x1b\[([0-9;]*)m", text) for c in params.split(";") if c}
    return {c for c in codes if 30 <= c <= 38 or 90 <= c <= 97}


def test_colour_on_a_terminal(monkeypatch):
    assert colour_codes(render(monkeypatch, no_color=False))


def test_no_color_is_respected(monkeypatch):
    text = render(monkeypatch, no_color=True)
    assert not colour_codes(text)
    assert "per parameter" in text
