"""POST /v1/samples through a real uvicorn on 127.0.0.1 and httpx, into a real PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest
import uvicorn
from starlette.applications import Starlette

from gardener.core import canon
from gardener.errors import ConfigError
from gardener.ingest.http import routes, token_map
from gardener.ingest.writer import SampleWriter
from gardener.ledger import trials
from gardener.settings import Settings

A1 = "IGLA-HYBRID-FP32-WSD-E0005-seed200"
A1B = "IGLA-HYBRID-FP32-BS8-E0006-seed201"
A2 = "IGLA-HYBRID-FP32-EMA10-E0007-seed202"
TOK1, TOK2 = "tok-acc1-9f8e7d", "tok-acc2-1a2b3c"


async def _admit(conn: asyncpg.Connection) -> None:
    await trials.ensure_race(conn, "r1", "acc1")
    await trials.ensure_race(conn, "r2", "acc2")
    await trials.admit(
        conn, "r1", "acc1", [trials.Admission(canon=canon.parse(n)) for n in (A1, A1B)]
    )
    await trials.admit(conn, "r2", "acc2", [trials.Admission(canon=canon.parse(A2))])


@contextlib.asynccontextmanager
async def _serve(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    """A real uvicorn on 127.0.0.1 (a free port) and an httpx client for it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="off"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        for _ in range(500):
            if server.started:
                break
            await asyncio.sleep(0.01)
        assert server.started
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as c:
            yield c
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)
        sock.close()


def _settings(monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("GARDENER_INGEST_TOKEN_ACC1", TOK1)
    monkeypatch.setenv("GARDENER_INGEST_TOKEN_ACC2", TOK2)
    monkeypatch.delenv("GARDENER_INGEST_TOKEN_ACC3", raising=False)
    return Settings(accounts=("acc1", "acc2", "acc3"))


@pytest.fixture
async def client(
    pool: asyncpg.Pool, conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[httpx.AsyncClient]:
    await _admit(conn)
    settings = _settings(monkeypatch)
    async with SampleWriter(pool, max_latency=0.005) as writer:
        app = Starlette(routes=routes(writer, settings, max_items=50, max_body=64 * 1024))
        async with _serve(app) as c:
            yield c


async def test_a_writer_that_cannot_write_answers_503(
    pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = SampleWriter(pool)  # never started
    app = Starlette(routes=routes(writer, _settings(monkeypatch)))
    async with _serve(app) as c:
        r = await c.post(
            "/v1/samples",
            json={"samples": [{"canon_name": A1, "step": 1, "bpb": 2.5}]},
            headers=_auth(TOK1),
        )
    assert r.status_code == 503
    assert r.headers["retry-after"] == "1"


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_tokens_are_required_and_checked(
    client: httpx.AsyncClient, conn: asyncpg.Connection
) -> None:
    body = {"samples": [{"canon_name": A1, "step": 1, "bpb": 2.5}]}
    for headers in ({}, _auth("wrong"), {"Authorization": TOK1}, _auth(TOK1 + "x")):
        r = await client.post("/v1/samples", json=body, headers=headers)
        assert r.status_code == 401, headers
        assert r.headers["www-authenticate"].startswith("Bearer")
    assert await conn.fetchval("SELECT count(*) FROM bpb_samples") == 0
    assert await conn.fetchval("SELECT count(*) FROM sample_quarantine") == 0
    r = await client.post("/v1/samples", json=body, headers=_auth(TOK1))
    assert r.status_code == 200
    assert r.json() == {
        "account": "acc1",
        "samples": [{"status": "accepted"}],
        "counts": {"accepted": 1},
    }
    assert (await client.get("/v1/samples", headers=_auth(TOK1))).status_code == 405


async def test_a_mixed_batch_gets_an_answer_per_item(
    client: httpx.AsyncClient, conn: asyncpg.Connection
) -> None:
    await client.post(
        "/v1/samples",
        json={"samples": [{"canon_name": A1, "step": 10, "bpb": 2.0}]},
        headers=_auth(TOK1),
    )
    samples = [
        {"canon_name": A1, "step": 20, "bpb": 1.95, "ts": "2026-01-01T00:00:00Z"},  # accepted
        {"canon_name": A1, "step": 10, "bpb": 2.0},  # duplicate
        {"canon_name": A1, "step": 10, "bpb": 2.1},  # conflict
        {"canon_name": A2, "step": 10, "bpb": 2.0},  # acc2's trial
        {"canon_name": "IGLA-HYBRID-FP32-WSD-E0099-seed9", "step": 1, "bpb": 2.0},
        {"canon_name": A1B, "step": 5, "bpb": 2.34567},
        {"canon_name": A1B, "step": 6, "bpb": "1.892"},
        {"canon_name": A1B, "step": -1, "bpb": 2.0},
        "not an object",
    ]
    lines = ["hello", "step=30 BPB=1.9000", "step=40 BPB=1.89", "corpus=stdlib sha256=" + "a" * 64]
    r = await client.post(
        "/v1/samples",
        content=json.dumps({"samples": samples, "canon_name": A1, "lines": lines}),
        headers=_auth(TOK1),
    )
    assert r.status_code == 200, r.text
    got = r.json()
    assert [x["status"] for x in got["samples"]] == [
        "accepted",
        "duplicate",
        "rejected",
        "rejected",
        "rejected",
        "rejected",
        "rejected",
        "rejected",
        "rejected",
    ]
    assert [x.get("code") for x in got["samples"][2:]] == [
        "step_conflict",
        "cross_account",
        "unknown_trial",
        "bpb_precision",
        "bpb_format",
        "step_value",
        "bad_item",
    ]
    assert got["samples"][3]["reason"] == f"cross_account: {A2} belongs to acc2, not acc1"
    assert [x["status"] for x in got["lines"]] == ["ignored", "accepted", "rejected", "corpus"]
    assert got["counts"] == {
        "accepted": 2,
        "duplicate": 1,
        "rejected": 8,
        "ignored": 1,
        "corpus": 1,
    }
    stored = await conn.fetch("SELECT canon_name, step, bpb FROM bpb_samples ORDER BY id")
    assert [tuple(x) for x in stored] == [(A1, 10, 2.0), (A1, 20, 1.95), (A1, 30, 1.9)]
    q = await conn.fetch(
        "SELECT source, account, canon_name, raw, reason FROM sample_quarantine ORDER BY id"
    )
    reasons = {row["raw"]: row["reason"] for row in q}
    assert len(q) == 8
    assert all(row["source"] == "http" and row["account"] == "acc1" for row in q)
    assert reasons[json.dumps(samples[3], sort_keys=True)] == (
        f"cross_account: {A2} belongs to acc2, not acc1"
    )
    assert reasons['"not an object"'] == "bad_item: a sample must be a JSON object"
    assert reasons["step=40 BPB=1.89"] == (
        r"bpb_format: BPB=1.89 does not match L-R8 ^BPB=\d\.\d{4}$"
    )
    row = await conn.fetchrow("SELECT * FROM igla_race_trials WHERE canon_name = $1", A1)
    assert (row["last_step"], row["last_bpb"], row["best_bpb"], row["corpus"]) == (
        30,
        1.9,
        1.9,
        "stdlib",
    )
    assert await conn.fetchval("SELECT count(*) FROM bpb_samples WHERE canon_name = $1", A2) == 0


async def test_acc2_cannot_write_acc1_lines(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/samples", json={"canon_name": A1, "lines": ["step=1 BPB=2.0000"]}, headers=_auth(TOK2)
    )
    assert r.status_code == 200
    assert r.json()["lines"] == [
        {
            "status": "rejected",
            "code": "cross_account",
            "reason": f"cross_account: {A1} belongs to acc1, not acc2",
        }
    ]


async def test_nan_and_infinity_in_json_are_rejected_per_item(
    client: httpx.AsyncClient, conn: asyncpg.Connection
) -> None:
    item = '{"canon_name": "' + A1 + '", "step": %d, "bpb": %s}'
    raw = '{"samples": [' + (item % (0, "NaN")) + ", " + (item % (1, "1e999")) + "]}"
    r = await client.post("/v1/samples", content=raw, headers=_auth(TOK1))
    assert r.status_code == 200
    assert [(x["code"], x["reason"]) for x in r.json()["samples"]] == [
        ("bpb_value", "bpb_value: BPB is NaN"),
        ("bpb_value", "bpb_value: BPB is +infinite"),
    ]
    assert await conn.fetchval("SELECT count(*) FROM sample_quarantine") == 2


@pytest.mark.parametrize(
    ("content", "status"),
    [
        ("{not json", 400),
        ("[]", 400),
        ("{}", 400),
        ('{"samples": {}}', 400),
        ('{"lines": ["step=1 BPB=2.0000"]}', 400),
        ('{"canon_name": "X", "lines": [1]}', 400),
        ('{"canon_name": "X"}', 400),
        ('{"samples": [], "extra": 1}', 400),
        (
            json.dumps({"samples": [{"canon_name": A1, "step": s, "bpb": 2.0} for s in range(51)]}),
            413,
        ),
        (json.dumps({"canon_name": A1, "lines": ["x" * 70_000]}), 413),
    ],
)
async def test_malformed_and_oversize_bodies(
    client: httpx.AsyncClient, conn: asyncpg.Connection, content: str, status: int
) -> None:
    r = await client.post("/v1/samples", content=content, headers=_auth(TOK1))
    assert r.status_code == status, r.text
    assert "error" in r.json()
    assert await conn.fetchval("SELECT count(*) FROM bpb_samples") == 0


def test_a_token_shared_by_two_accounts_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GARDENER_INGEST_TOKEN_ACC1", "same")
    monkeypatch.setenv("GARDENER_INGEST_TOKEN_ACC2", "same")
    with pytest.raises(ConfigError, match="share one ingest token"):
        token_map(Settings(accounts=("acc1", "acc2")))
    monkeypatch.setenv("GARDENER_INGEST_TOKEN_ACC2", "other")
    assert token_map(Settings(accounts=("acc1", "acc2"))) == {b"same": "acc1", b"other": "acc2"}
