"""Ingest under hostile input: one item never fails another's write, parsing is as strict as
L-R8, and a stalled body is answered (findings 1, 11 and the body timeout of 12, issue 11)."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timedelta, timezone

import asyncpg
import pytest
from starlette.applications import Starlette

from gardener.ingest import parse as P
from gardener.ingest.http import routes
from gardener.ingest.writer import SampleWriter
from tests.integration.test_ingest_http import (
    A1,
    A1B,
    A2,
    TOK1,
    TOK2,
    _admit,
    _serve,
)
from tests.integration.test_ingest_http import _settings as _token_settings

FAR_EAST = timezone(timedelta(hours=14))


async def _quarantined(conn: asyncpg.Connection) -> dict[str, str]:
    rows = await conn.fetch("SELECT raw, reason FROM sample_quarantine")
    return {r["raw"]: r["reason"] for r in rows}


@pytest.mark.parametrize("ts", ["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00"])
async def test_a_time_out_of_range_is_quarantined_and_fails_no_other_request(
    pool: asyncpg.Pool, conn: asyncpg.Connection, ts: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _admit(conn)
    async with SampleWriter(pool, max_latency=0.05) as writer:
        app = Starlette(routes=routes(writer, _token_settings(monkeypatch)))
        async with _serve(app) as client:
            poison = client.post(
                "/v1/samples",
                json={"samples": [{"canon_name": A1, "step": 1, "bpb": 2.5, "ts": ts},
                                  {"canon_name": A1, "step": 2, "bpb": 2.4}]},
                headers={"Authorization": f"Bearer {TOK1}"},
            )
            others = [
                client.post(
                    "/v1/samples",
                    json={"samples": [{"canon_name": A2, "step": 10 + i, "bpb": 2.3}]},
                    headers={"Authorization": f"Bearer {TOK2}"},
                )
                for i in range(20)
            ]
            answers = await asyncio.gather(poison, *others)
    assert [a.status_code for a in answers] == [200] * 21, [a.text for a in answers]
    first = answers[0].json()["samples"]
    assert first[0]["status"] == "rejected" and first[0]["code"] == P.TS_FORMAT
    assert first[1]["status"] == "accepted"
    assert all(a.json()["samples"][0]["status"] == "accepted" for a in answers[1:])
    assert await conn.fetchval("SELECT count(*) FROM bpb_samples WHERE canon_name = $1", A2) == 20
    reasons = await _quarantined(conn)
    assert any(ts in raw and why.startswith("ts_format: ") for raw, why in reasons.items())


async def test_an_item_that_breaks_the_statement_fails_only_its_own_call(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    """Input no check foresaw (here a time built past the parser) fails its own caller; the
    calls batched with it are written."""
    await _admit(conn)
    bad = P.Sample(5, 2.5, "", datetime(1, 1, 1, tzinfo=FAR_EAST))
    async with SampleWriter(pool, max_latency=0.05) as writer:
        results = await asyncio.gather(
            writer.submit_samples([(A1, bad)], "http"),
            writer.submit_lines(A1B, ["step=10 BPB=2.3456"], "railway-log"),
            writer.submit_samples([(A2, P.Sample(7, 2.25, ""))], "http"),
            return_exceptions=True,
        )
    assert isinstance(results[0], Exception)
    assert not isinstance(results[1], BaseException) and results[1].count("accepted") == 1
    assert not isinstance(results[2], BaseException) and results[2].count("accepted") == 1
    assert await conn.fetchval("SELECT count(*) FROM bpb_samples") == 2


LOOSE_LINES = [
    ("step=10\u00a0BPB=2.1234", "separator"),
    ("step=10\u3000BPB=2.1234", "separator"),
    ("step=10\x1cBPB=2.1234", "separator"),
    ("step=-0 BPB=2.1234", P.STEP_FORMAT),
    ("step=10 BPB=2.1234 bpb=9.0000", P.DUPLICATE_TOKEN),
    ("STEP=3 step=10 BPB=2.1234", P.DUPLICATE_TOKEN),
]
LOOSE_NUMBERS = [2.000001, 2.1234567, 5e-324, 1.0000001]


async def test_values_looser_than_l_r8_are_refused_into_quarantine_with_their_reason(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    await _admit(conn)
    async with SampleWriter(pool, max_latency=0.01) as writer:
        lines = await writer.submit_lines(A1, [line for line, _ in LOOSE_LINES], "local-log")
        numbers = await writer.submit_samples(
            [P.parse_structured({"canon_name": A1B, "step": 20 + i, "bpb": v})
             for i, v in enumerate(LOOSE_NUMBERS)],
            "http",
        )
    assert [r.code for r in lines.items] == [code for _, code in LOOSE_LINES]
    assert [r.code for r in numbers.items] == [P.BPB_PRECISION] * len(LOOSE_NUMBERS)
    assert await conn.fetchval("SELECT count(*) FROM bpb_samples") == 0
    reasons = await _quarantined(conn)
    for line, code in LOOSE_LINES:
        assert reasons[line].startswith(code + ": "), (line, reasons.get(line))
    assert sum(why.startswith("bpb_precision: ") for why in reasons.values()) == 4


async def test_a_stalled_body_is_answered_408_and_the_server_goes_on(
    pool: asyncpg.Pool, conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _admit(conn)
    async with SampleWriter(pool, max_latency=0.01) as writer:
        app = Starlette(routes=routes(writer, _token_settings(monkeypatch), body_timeout=0.5))
        async with _serve(app) as client:
            port = int(str(client.base_url).rsplit(":", 1)[1].strip("/"))
            reader, out = await asyncio.open_connection("127.0.0.1", port)
            out.write(
                b"POST /v1/samples HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Authorization: Bearer {TOK1}\r\n".encode()
                + b"Content-Length: 100\r\n\r\n{\"samples\": ["
            )
            await out.drain()
            started = time.monotonic()
            head = await asyncio.wait_for(reader.read(200), 10)
            took = time.monotonic() - started
            out.close()
            assert head.startswith(b"HTTP/1.1 408"), head
            assert 0.4 < took < 5, took
            ok = await client.post(
                "/v1/samples", json={"canon_name": A1, "lines": ["step=1 BPB=2.0000"]},
                headers={"Authorization": f"Bearer {TOK1}"},
            )
    assert ok.status_code == 200 and ok.json()["counts"] == {"accepted": 1}
