"""The command line: ``gardener`` and ``tri`` are the same program."""

from gardener.cli.app import main

__all__ = ["main"]
