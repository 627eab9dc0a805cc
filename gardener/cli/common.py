"""What every command shares: settings, the account option, a database session, output."""

from __future__ import annotations

import getpass
import json
import re
import sys
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import anyio
import asyncpg
import typer

from gardener import logs
from gardener.ledger import db, migrate
from gardener.settings import Settings, get_settings

T = TypeVar("T")

AccountOpt = Annotated[
    str | None,
    typer.Option("--account", envvar="GARDENER_ACCOUNT", help="Account to act for (acc1, ...)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


def settings() -> Settings:
    s = get_settings()
    logs.configure(s.log_format, s.log_level, stream=sys.stderr)
    return s


def account(value: str | None) -> str:
    """The account a mutating command acts for: the flag, else GARDENER_ACCOUNT (required)."""
    return settings().require_account(value)


def account_filter(value: str | None) -> str | None:
    """The account a read command shows (None: every account); an unknown one is refused."""
    s = settings()
    chosen = value or s.account
    return s.require_account(chosen) if chosen else None


def user() -> str:
    """The person at the keyboard, for the audit trail."""
    try:
        return getpass.getuser()
    except Exception:  # no user database entry in some containers
        return "unknown"


def actor(acct: str | None) -> str:
    """Who acts, as the audit trail records it: ``user`` or ``user@account``."""
    return f"{user()}@{acct}" if acct else user()


def with_db(
    fn: Callable[[asyncpg.Connection], Awaitable[T]], *, apply_migrations: bool = True
) -> T:
    """Run ``fn`` on one connection to the configured (or embedded) database."""

    async def main() -> T:
        dsn, _ = db.resolve_dsn(settings())
        conn = await db.connect(dsn)
        try:
            if apply_migrations:
                await migrate.migrate(conn)
            return await fn(conn)
        finally:
            await conn.close()

    return anyio.run(main)


def emit(data: Any, as_json: bool, human: Callable[[], None]) -> None:
    """JSON for scripts, or the human rendering."""
    if as_json:
        typer.echo(json.dumps(data, default=str, indent=2))
    else:
        human()


def rows_to_dicts(rows: list[asyncpg.Record]) -> list[dict[str, Any]]:
    return [dict(r) for r in rows]


_EXP_ID = re.compile(r"-E(\d{4,})-seed\d+$")


def by_exp_id(canon_name: str) -> tuple[int, int, str]:
    """Sort key for tables: names with an EXP_ID by its number (E9999 before E10000, which a
    text sort gets wrong), then the rest by name."""
    m = _EXP_ID.search(canon_name)
    return (0, int(m.group(1)), canon_name) if m else (1, 0, canon_name)
