"""The ``dessilbi`` command line: parses arguments and prints; nothing imports it."""

from .main import main

__all__ = ["main"]
