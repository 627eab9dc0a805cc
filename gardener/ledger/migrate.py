"""Apply ``migrations/*.sql`` in order, once each, under an advisory lock.

Each file runs in its own transaction and is recorded in ``schema_migrations`` with its
checksum, so two instances starting at once cannot both apply it and a second run is a no-op.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from gardener.errors import ConfigError

MIGRATION_LOCK = 0x6761_7264_6E72  # "gardnr": the advisory lock key for migrations


def migrations_dir() -> Path:
    """The packaged copy in a wheel, else the repository's ``migrations/``."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "_migrations", here.parent / "migrations"):
        if candidate.is_dir():
            return candidate
    raise ConfigError("cannot find the migrations directory")


@dataclass(frozen=True)
class Migration:
    version: str
    path: Path

    @property
    def sql(self) -> str:
        return self.path.read_text()

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()


def discover(directory: Path | None = None) -> list[Migration]:
    directory = directory or migrations_dir()
    return [Migration(p.stem, p) for p in sorted(directory.glob("*.sql"))]


async def applied_versions(conn: asyncpg.Connection) -> dict[str, str]:
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    if not exists:
        return {}
    rows = await conn.fetch("SELECT version, checksum FROM schema_migrations")
    return {r["version"]: r["checksum"] for r in rows}


async def migrate(conn: asyncpg.Connection, directory: Path | None = None) -> list[str]:
    """Apply what is missing; return the versions applied by this call."""
    done: list[str] = []
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
    try:
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version text PRIMARY KEY,
                   checksum text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        have = await applied_versions(conn)
        for migration in discover(directory):
            if migration.version in have:
                if have[migration.version] != migration.checksum:
                    raise ConfigError(f"migration {migration.version} changed after it was applied")
                continue
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, checksum) VALUES ($1, $2)",
                    migration.version,
                    migration.checksum,
                )
            done.append(migration.version)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)
    return done


async def pending(conn: asyncpg.Connection, directory: Path | None = None) -> list[str]:
    """Versions not yet applied (the readiness check uses this)."""
    have = await applied_versions(conn)
    return [m.version for m in discover(directory) if m.version not in have]
