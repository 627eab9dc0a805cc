"""Where the database is, and connections to it.

With ``DATABASE_URL`` set, that server is used. Without it, an embedded PostgreSQL (the
``pgserver`` package) is started under the data directory and left running, so the next
command finds it at once; ``gardener db stop`` stops it.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import asyncpg

from gardener.errors import ConfigError
from gardener.settings import Settings


def embedded_dir(settings: Settings) -> Path:
    return (settings.data_dir / "pgdata").resolve()


def start_embedded(data_dir: Path) -> str:
    """Start (or find running) the embedded server and return its URL."""
    os.environ.setdefault("XDG_RUNTIME_DIR", str(data_dir.parent))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver

        data_dir.mkdir(parents=True, exist_ok=True)
        server = pgserver.get_server(str(data_dir), cleanup_mode=None)
    return str(server.get_uri())


def stop_embedded(data_dir: Path) -> bool:
    """Stop the embedded server if one runs there; say whether one did."""
    if not (data_dir / "postmaster.pid").exists():
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver

        server = pgserver.get_server(str(data_dir), cleanup_mode="stop")
        server.cleanup()
    return True


def resolve_dsn(settings: Settings) -> tuple[str, str]:
    """The URL to connect to and a description of it that is safe to print."""
    dsn = settings.database_dsn()
    if dsn:
        return dsn, _describe(dsn)
    where = embedded_dir(settings)
    return start_embedded(where), f"embedded PostgreSQL in {where}"


def _describe(dsn: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(dsn)
    host = parts.hostname or "localhost"
    return f"PostgreSQL at {host}:{parts.port or 5432}{parts.path or ''}"


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec(
        "jsonb", encoder=_json_dumps, decoder=_json_loads, schema="pg_catalog"
    )
    await conn.set_type_codec("json", encoder=_json_dumps, decoder=_json_loads, schema="pg_catalog")


def _json_dumps(value: Any) -> str:
    import json

    return json.dumps(value, default=str, allow_nan=False)


def _json_loads(text: str) -> Any:
    import json

    return json.loads(text)


async def connect(dsn: str) -> asyncpg.Connection:
    """One connection with the JSON codecs installed."""
    try:
        conn = await asyncpg.connect(dsn)
    except (OSError, asyncpg.PostgresError) as exc:
        raise ConfigError(f"cannot reach the database ({_describe(dsn)}): {exc}") from None
    await _init_connection(conn)
    return conn


async def create_pool(dsn: str, *, min_size: int = 1, max_size: int = 8) -> asyncpg.Pool:
    try:
        pool = await asyncpg.create_pool(
            dsn, min_size=min_size, max_size=max_size, init=_init_connection
        )
    except (OSError, asyncpg.PostgresError) as exc:
        raise ConfigError(f"cannot reach the database ({_describe(dsn)}): {exc}") from None
    assert pool is not None
    return pool
