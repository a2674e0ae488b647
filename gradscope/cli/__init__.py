"""The ``gradscope`` command; nothing in the package imports it."""

from gradscope.cli.main import app, main

__all__ = ["app", "main"]
