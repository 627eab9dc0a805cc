"""The Typer application. Each area of the CLI lives in its own module with ``register(app)``.

A ``UserError`` becomes one line on stderr and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import Annotated

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


@app.callback(invoke_without_command=True)
def root(
    ctx: typer.Context,
    acct: Annotated[str | None, typer.Option(
        "--account", help="Account to act for, for every command (the plan's "
        "`tri --account acc1 --kill NAME`).")] = None,
    kill: Annotated[str | None, typer.Option(
        "--kill", help="Stop this trial (canon name, EXP_ID or seed): `tri kill NAME`.")] = None,
) -> None:
    """An autonomous race scheduler for fleets of training runs (also installed as `tri`)."""
    if acct:  # a command's own --account still wins; this is its default
        os.environ["GARDENER_ACCOUNT"] = acct
        from gardener.settings import get_settings

        get_settings.cache_clear()
    if kill is not None:
        if ctx.invoked_subcommand is not None:
            raise typer.BadParameter("--kill is a command of its own", param_hint="--kill")
        from gardener.cli.common import account
        from gardener.cli.ledger import kill_line

        typer.echo(kill_line(kill, account(None)))
        raise typer.Exit(0)
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())
        raise typer.Exit(0)


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
