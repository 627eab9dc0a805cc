"""Where the database is, and connections to it.

With ``DATABASE_URL`` set, that server is used. Without it, an embedded PostgreSQL (the
``pgserver`` package) is started under the data directory; it stops when the last gardener
process using it exits (``gardener db start`` keeps one running on purpose, ``gardener db
stop`` stops that).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import asyncpg

from gardener.errors import ConfigError, UserError
from gardener.settings import Settings


def embedded_dir(settings: Settings) -> Path:
    return (settings.data_dir / "pgdata").resolve()


def start_embedded(data_dir: Path, keep_running: bool = False) -> str:
    """Start (or find running) the embedded server and return its URL.

    Each process that uses the server holds a handle on it; the server stops when the last
    process holding one exits, so a command leaves nothing running behind it. With
    ``keep_running`` (``gardener db start``) it is started on purpose: a marker beside the data
    directory says so, and no command stops it until ``gardener db stop``.
    """
    os.environ.setdefault("XDG_RUNTIME_DIR", str(data_dir.parent))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver

        data_dir.mkdir(parents=True, exist_ok=True)
        kept = data_dir.parent / _KEEP
        if keep_running:
            kept.touch()
        _forget_dead_handles(data_dir)
        on_purpose = kept.exists()
        server = pgserver.get_server(str(data_dir), cleanup_mode=None if on_purpose else "stop")
    return str(server.get_uri())


def embedded_users(data_dir: Path) -> list[int]:
    """Process ids of the live processes holding a handle on the embedded server."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _forget_dead_handles(data_dir)
    handles = data_dir / _HANDLES
    pids = json.loads(handles.read_text()) if handles.exists() else []
    return [pid for pid in pids if pid != os.getpid()]


def stop_embedded(data_dir: Path) -> bool:
    """Stop the embedded server if one runs there; say whether one did.

    Refused while another gardener process still uses it (it would lose its database).
    """
    if not (data_dir / "postmaster.pid").exists():
        (data_dir.parent / _KEEP).unlink(missing_ok=True)
        return False
    users = embedded_users(data_dir)
    if users:
        raise UserError(
            f"the embedded PostgreSQL in {data_dir} is in use by gardener process(es) "
            f"{', '.join(map(str, users))}; it stops by itself when the last one exits"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver

        server = pgserver.get_server(str(data_dir), cleanup_mode="stop")
        server.cleanup()
    (data_dir.parent / _KEEP).unlink(missing_ok=True)
    return True


_HANDLES = ".handle_pids.json"  # pgserver's list of the processes holding a handle
_KEEP = "pg-keep-running"  # beside the data directory: `gardener db start` asked for it


def _forget_dead_handles(data_dir: Path) -> None:
    """Drop handles of processes that died without exiting cleanly (SIGKILL, a crash), so
    they do not keep the server running forever."""
    handles = data_dir / _HANDLES
    if not handles.exists():
        return
    import psutil
    from pgserver.postgres_server import PostgresServer

    with PostgresServer._lock:  # pgserver's own inter-process lock over the handle list
        try:
            pids = json.loads(handles.read_text())
        except ValueError:
            pids = []
        alive = [pid for pid in pids if isinstance(pid, int) and psutil.pid_exists(pid)]
        if alive != pids:
            handles.write_text(json.dumps(alive))


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


# The pool's sessions (the daemon's ticks, reconciler and ingest) plan without JIT: their
# queries take milliseconds, and a cost estimate above jit_above_cost (the stall check's
# per-trial fallback subquery, at 10,000 trials) compiled for 180 ms on every rescan.
POOL_SETTINGS = {"jit": "off"}


async def create_pool(dsn: str, *, min_size: int = 1, max_size: int = 8) -> asyncpg.Pool:
    try:
        pool = await asyncpg.create_pool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            init=_init_connection,
            server_settings=POOL_SETTINGS,
        )
    except (OSError, asyncpg.PostgresError) as exc:
        raise ConfigError(f"cannot reach the database ({_describe(dsn)}): {exc}") from None
    assert pool is not None
    return pool
