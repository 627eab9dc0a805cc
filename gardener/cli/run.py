"""``gardener run``: the worker loop as a long-running service (see gardener/loop/daemon.py)."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import anyio
import typer

from gardener import logs
from gardener.cli.common import AccountOpt
from gardener.ledger import db, migrate
from gardener.settings import get_settings


def register(app: typer.Typer) -> None:
    app.command("run")(run_cmd)


def run_cmd(
    acct: AccountOpt = None,
    backend: Annotated[
        str | None,
        typer.Option(
            "--backend",
            envvar="GARDENER_BACKEND",
            help="Where trials run: local (subprocesses) or railway.",
        ),
    ] = None,
    port: Annotated[
        int | None, typer.Option("--port", envvar="PORT", help="HTTP port (0: any free one).")
    ] = None,
    once: Annotated[
        bool, typer.Option("--once", help="One tick and one reconcile pass, print JSON, exit.")
    ] = False,
) -> None:
    """Run the gardener: ingest, decide, apply and reconcile until SIGTERM (exit 0)."""
    base = get_settings()
    update: dict[str, Any] = {}
    if acct is not None:
        update["account"] = base.require_account(acct)
    if backend is not None:
        if backend not in ("local", "railway"):
            raise typer.BadParameter("--backend must be local or railway")
        update["backend"] = backend
    if port is not None:
        update["port"] = port
    settings = base.model_copy(update=update)
    logs.configure(settings.log_format, settings.log_level, stream=sys.stdout)
    log = logs.get_logger("gardener.run", account=settings.account, backend=settings.backend)
    dsn, where = db.resolve_dsn(settings)

    async def prepare() -> list[str]:
        conn = await db.connect(dsn)
        try:
            return await migrate.migrate(conn)
        finally:
            await conn.close()

    applied = anyio.run(prepare)
    log.info("migrated", database=where, applied=applied)
    if once:
        from gardener.loop.daemon import run_once

        result = anyio.run(lambda: run_once(settings, dsn=dsn))
        typer.echo(json.dumps(result, indent=2, default=str))
        return
    from gardener.loop.daemon import serve

    try:
        anyio.run(lambda: serve(settings, dsn=dsn))
    except BaseException as exc:  # a task died: say so in one event, exit non-zero
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            raise
        log.error("daemon_failed", error=_describe(exc))
        raise typer.Exit(1) from None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_describe(e) for e in exc.exceptions)
    return f"{type(exc).__name__}: {exc}"
