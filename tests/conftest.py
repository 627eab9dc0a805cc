"""Test databases: one migrated template per session, one clone per test.

``GARDENER_TEST_DATABASE_URL`` names a server to use (CI uses this machine's PostgreSQL);
without it the session starts an embedded server in a temporary directory.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import uuid
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from gardener.ledger import db, migrate

ROOT = Path(__file__).resolve().parent.parent


def _with_database(dsn: str, name: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


@pytest.fixture(scope="session")
def pg_server_dsn() -> Iterator[str]:
    """A maintenance DSN of the server the tests use."""
    url = os.environ.get("GARDENER_TEST_DATABASE_URL")
    if url:
        yield url
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver

        tmp = tempfile.mkdtemp(prefix="gardener-test-pg-")
        os.environ.setdefault("XDG_RUNTIME_DIR", tmp)
        server = pgserver.get_server(tmp, cleanup_mode="delete")
        try:
            yield str(server.get_uri())
        finally:
            server.cleanup()


def _template_name() -> str:
    digest = hashlib.sha256()
    for m in migrate.discover():
        digest.update(m.version.encode() + m.checksum.encode())
    return f"gardener_tpl_{digest.hexdigest()[:12]}"


async def _ensure_template(server_dsn: str) -> str:
    name = _template_name()
    admin = await asyncpg.connect(server_dsn)
    try:
        await admin.execute("SELECT pg_advisory_lock(4242)")
        try:
            exists = await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
            if not exists:
                building = name + "_building"
                await admin.execute(f'DROP DATABASE IF EXISTS "{building}"')
                await admin.execute(f'CREATE DATABASE "{building}"')
                conn = await asyncpg.connect(_with_database(server_dsn, building))
                try:
                    await migrate.migrate(conn)
                finally:
                    await conn.close()
                await admin.execute(f'ALTER DATABASE "{building}" RENAME TO "{name}"')
        finally:
            await admin.execute("SELECT pg_advisory_unlock(4242)")
    finally:
        await admin.close()
    return name


@pytest.fixture(scope="session")
async def template_db(pg_server_dsn: str) -> str:
    return await _ensure_template(pg_server_dsn)


async def create_test_database(server_dsn: str, template: str) -> str:
    name = f"gardener_t_{uuid.uuid4().hex[:16]}"
    admin = await asyncpg.connect(server_dsn)
    try:
        for _ in range(50):
            try:
                await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
                break
            except asyncpg.ObjectInUseError:  # another session is cloning the template now
                import anyio

                await anyio.sleep(0.1)
        else:
            raise RuntimeError("template database stayed busy")
    finally:
        await admin.close()
    return _with_database(server_dsn, name)


async def drop_test_database(server_dsn: str, dsn: str) -> None:
    name = urlsplit(dsn).path.lstrip("/")
    admin = await asyncpg.connect(server_dsn)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
async def db_dsn(pg_server_dsn: str, template_db: str) -> AsyncIterator[str]:
    """A fresh, migrated database of this test's own."""
    dsn = await create_test_database(pg_server_dsn, template_db)
    try:
        yield dsn
    finally:
        await drop_test_database(pg_server_dsn, dsn)


@pytest.fixture
async def empty_db_dsn(pg_server_dsn: str) -> AsyncIterator[str]:
    """A fresh database with no migrations applied."""
    name = f"gardener_e_{uuid.uuid4().hex[:16]}"
    admin = await asyncpg.connect(pg_server_dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    dsn = _with_database(pg_server_dsn, name)
    try:
        yield dsn
    finally:
        await drop_test_database(pg_server_dsn, dsn)


@pytest.fixture
async def conn(db_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    c = await db.connect(db_dsn)
    try:
        yield c
    finally:
        await c.close()


@pytest.fixture
async def pool(db_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    p = await db.create_pool(db_dsn, min_size=1, max_size=10)
    try:
        yield p
    finally:
        await p.close()


@pytest.fixture
def embedded_home() -> Iterator[Path]:
    """A directory for a data directory of the gardener's own embedded server.

    Not under pytest's tmp_path: run as root, pgserver runs PostgreSQL as a system user that
    must traverse every parent, and each pytest session resets its tmp root to mode 0700.
    """
    home = Path(tempfile.mkdtemp(prefix="gardener-e2e-"))
    home.chmod(0o755)
    try:
        yield home
    finally:
        import shutil

        shutil.rmtree(home, ignore_errors=True)
