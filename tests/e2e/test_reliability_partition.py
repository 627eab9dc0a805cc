"""A leader cut off from the database by a network partition (through a TCP proxy the test
controls): the standby says the leader is gone, takes over within 30 s, and the old leader
makes no platform call once the new one leads (findings 6 and 7 of issue 11)."""

from __future__ import annotations

import json
import signal
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import anyio
import asyncpg
import httpx
import pytest

from tests.e2e.test_daemon import Daemon, readyz
from tests.integration.test_apply import make_race
from tests.tcp_proxy import TcpProxy


def via(dsn: str, port: int) -> str:
    p = urlsplit(dsn)
    user = p.netloc.rsplit("@", 1)[0] + "@" if "@" in p.netloc else ""
    return urlunsplit((p.scheme, f"{user}127.0.0.1:{port}", p.path, p.query, p.fragment))


def calls(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def recording(dsn: str, tmp: Path, name: str, calls_path: Path) -> Daemon:
    argv = [sys.executable, "-m", "tests.recording_daemon", dsn, str(calls_path), "0.05", "0.3"]
    return Daemon(dsn, tmp, name, argv=argv, env={"GARDENER_TEST_RESTLESS": "1",
                                                  "GARDENER_POLL_INTERVAL": "0.3"})


async def until(check: Any, within: float) -> None:
    """Poll an HTTP answer or a file another process writes until ``check()`` holds."""
    with anyio.fail_after(within):
        while not await check():  # noqa: ASYNC110 (another process changes it)
            await anyio.sleep(0.1)


async def role_of(port: int) -> dict[str, Any]:
    try:
        return await readyz(port)
    except httpx.HTTPError:
        return {}


async def _is(port: int, role: str) -> bool:
    return (await role_of(port)).get("role") == role


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_a_partitioned_leader_is_replaced_within_30_s_and_calls_nothing_after(
    db_dsn: str, tmp_path: Path, conn: asyncpg.Connection
) -> None:
    target = urlsplit(db_dsn)
    if not target.port or target.hostname not in ("127.0.0.1", "localhost"):
        pytest.skip("the partition goes through a TCP proxy: needs PostgreSQL over TCP")
    await make_race(conn, "part", 6, first_exp=4000, first_seed=4000)
    proxy = await TcpProxy("127.0.0.1", target.port).start()
    calls_path = tmp_path / "calls.jsonl"
    a = recording(via(db_dsn, proxy.port), tmp_path, "a", calls_path).start()
    b: Daemon | None = None
    try:
        port_a = await a.port()
        await until(lambda: _is(port_a, "leader"), 30)
        b = recording(db_dsn, tmp_path, "b", calls_path).start()
        port_b = await b.port()
        await until(lambda: _is(port_b, "standby"), 30)
        pid_a = a.proc.pid if a.proc else -1

        async def a_called() -> bool:
            return any(c["pid"] == pid_a for c in calls(calls_path))

        await until(a_called, 30)
        before = await role_of(port_b)
        assert before["ready"] and not before.get("leader_gone")

        proxy.partition()
        cut_at = time.time()
        saw_gone: dict[str, Any] | None = None
        gone_metric = False
        with anyio.fail_after(40):
            while True:
                state = await role_of(port_b)
                if state.get("leader_gone") and saw_gone is None:
                    saw_gone = state
                    async with httpx.AsyncClient() as client:
                        text = (await client.get(f"http://127.0.0.1:{port_b}/metrics")).text
                    gone_metric = "gardener_leader_gone 1.0" in text
                if state.get("role") == "leader":
                    break
                await anyio.sleep(0.1)
        took_over = time.time() - cut_at
        acquired = await b.wait_event("leader_acquired")
        leads_from = datetime.fromisoformat(acquired["timestamp"].replace("Z", "+00:00"))
        await anyio.sleep(5)  # the old leader has every chance to call the platform
        all_calls = calls(calls_path)
    finally:
        proxy.heal()
        for d in (a, b):
            if d is not None and d.proc is not None and d.proc.poll() is None:
                d.signal(signal.SIGKILL)
        await proxy.close()
        for d in (a, b):
            if d is not None:
                d.ensure_dead()
    assert took_over < 30, took_over
    assert saw_gone is not None and saw_gone["ready"] is False, saw_gone
    assert gone_metric
    assert a.proc is not None and b.proc is not None
    since = leads_from.timestamp()
    old_after = [c for c in all_calls if c["pid"] == a.proc.pid and c["t"] >= since]
    new_after = [c for c in all_calls if c["pid"] == b.proc.pid and c["t"] >= since]
    assert old_after == [], old_after[:5]
    assert new_after, "the new leader should drive the platform"
    print(json.dumps({"took_over_s": round(took_over, 2), "old_calls_after": len(old_after),
                      "new_calls_after": len(new_after)}))
