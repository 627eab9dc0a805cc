"""The Typer application. Each area of the CLI lives in its own module with ``register(app)``.

A ``UserError`` becomes one line on stderr and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

import typer

from gardener.errors import UserError

app = typer.Typer(
    name="gardener",
    help="An autonomous race scheduler for fleets of training runs (also installed as `tri`).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# One module per area; each defines ``register(app)``.
COMMAND_MODULES = (
    "gardener.cli.ledger",  # migrate, status, exp, canon, pause/resume, tripwire
    "gardener.cli.run",  # run (the daemon)
    "gardener.cli.hunt",  # hunt status/prune/mirror
    "gardener.cli.backtest",  # backtest
    "gardener.cli.railway",  # railway batch-deploy, kill, services
    "gardener.cli.race",  # smoke-race, leaderboard, report
)


def _register_all() -> None:
    for name in COMMAND_MODULES:
        if importlib.util.find_spec(name) is None:
            continue
        importlib.import_module(name).register(app)


_register_all()


def main() -> None:
    """Entry point of both console scripts; click handles usage errors and exit codes."""
    try:
        app()
    except UserError as exc:
        typer.secho(f"error: {type(exc).__name__}: {exc}", err=True, fg=typer.colors.RED)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
