"""The sample writer on a real PostgreSQL: rows, quarantine, summary, idempotence, NOTIFY."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import pytest
from prometheus_client import REGISTRY

from gardener.core import canon
from gardener.ingest import parse as P
from gardener.ingest.writer import SampleWriter, WriterClosed
from gardener.ledger import trials

T1 = "IGLA-HYBRID-FP32-WSD-E0005-seed200"
T2 = "IGLA-HYBRID-FP32-BS8-E0006-seed201"
T3 = "IGLA-HYBRID-FP32-EMA10-E0007-seed202"  # acc2
SHA = "0123456789abcdef" * 4


async def _admit(conn: asyncpg.Connection) -> None:
    await trials.ensure_race(conn, "r1", "acc1")
    await trials.ensure_race(conn, "r2", "acc2")
    adm = [trials.Admission(canon=canon.parse(n), steps=500) for n in (T1, T2)]
    await trials.admit(conn, "r1", "acc1", adm)
    await trials.admit(conn, "r2", "acc2", [trials.Admission(canon=canon.parse(T3), steps=500)])


@pytest.fixture
async def writer(pool: asyncpg.Pool, conn: asyncpg.Connection) -> AsyncIterator[SampleWriter]:
    await _admit(conn)
    async with SampleWriter(pool, max_latency=0.01) as w:
        yield w


async def _samples(conn: asyncpg.Connection, name: str) -> list[tuple[int, float]]:
    rows = await conn.fetch(
        "SELECT step, bpb FROM bpb_samples WHERE canon_name = $1 ORDER BY step", name
    )
    return [(r["step"], r["bpb"]) for r in rows]


async def _quarantine(conn: asyncpg.Connection) -> list[tuple[str | None, ...]]:
    rows = await conn.fetch(
        "SELECT source, account, canon_name, raw, reason FROM sample_quarantine ORDER BY id"
    )
    return [tuple(r) for r in rows]


BAD_LINES = [
    ("step=10 BPB=1.892", r"bpb_format: BPB=1.892 does not match L-R8 ^BPB=\d\.\d{4}$"),
    ("step=0 BPB=nan", r"bpb_format: BPB=nan does not match L-R8 ^BPB=\d\.\d{4}$"),
    ("step=10 BPB=12.3456", r"bpb_format: BPB=12.3456 does not match L-R8 ^BPB=\d\.\d{4}$"),
    ("step=-1 BPB=2.3456", "step_value: negative step -1"),
    ("step=abc BPB=2.3456", "step_format: step=abc is not an integer"),
    ("epoch=1 BPB=2.3456 lr=0.001", "missing_step: a BPB token without a step=N token"),
    ("DONE: bpb=nan", "done_format: the final line must be DONE: bpb=X.XXXX (L-R8)"),
    ("corpus=stdlib sha256=xyz", "corpus_format: sha256 must be 64 hex digits"),
    (
        "step=1\x00 BPB=2.3456",
        "separator: '\\x00' in a sample line; tokens are separated by spaces or tabs only",
    ),
]


async def test_every_bad_line_lands_in_quarantine_verbatim_with_its_reason(
    writer: SampleWriter, conn: asyncpg.Connection
) -> None:
    lines = ["loading data...", *(line for line, _ in BAD_LINES), "step=20 loss=3.1"]
    result = await writer.submit_lines(T1, lines, "local:T1")
    assert [r.status for r in result.items] == [
        "ignored",
        *["rejected"] * len(BAD_LINES),
        "ignored",
    ]
    escaped = [(line.replace("\x00", "\\x00"), r.replace("\x00", "\\x00")) for line, r in BAD_LINES]
    assert [r.reason for r in result.items[1:-1]] == [reason for _, reason in escaped]
    assert await _quarantine(conn) == [
        ("local:T1", "acc1", T1, line, reason) for line, reason in escaped
    ]
    assert await _samples(conn, T1) == []


async def test_good_lines_become_rows_and_update_the_summary(
    writer: SampleWriter, conn: asyncpg.Connection
) -> None:
    digest = SHA
    lines = [
        f"corpus=stdlib sha256={digest}",
        "step=10 BPB=3.1000",
        "epoch=1 step=20 BPB=2.9000 lr=0.001",
        "step=30 BPB=2.9500",
        "DONE: bpb=2.9500",
    ]
    before = datetime.now(UTC)
    result = await writer.submit_lines(T1, lines, "local:T1")
    assert result.counts() == {"corpus": 1, "accepted": 3, "done": 1}
    assert await _samples(conn, T1) == [(10, 3.1), (20, 2.9), (30, 2.95)]
    row = await conn.fetchrow("SELECT * FROM igla_race_trials WHERE canon_name = $1", T1)
    assert (row["last_step"], row["last_bpb"], row["best_bpb"]) == (30, 2.95, 2.9)
    assert row["last_sample_at"] >= before
    assert (row["corpus"], row["corpus_sha256"]) == ("stdlib", digest)
    assert row["corpus_reported_at"] >= before
    src = await conn.fetchval("SELECT DISTINCT source FROM bpb_samples WHERE canon_name = $1", T1)
    assert src == "local:T1"
    # A late sample at an earlier step is stored but does not move last_step backwards; a new
    # best moves best_bpb.
    await writer.submit_lines(T1, ["step=25 BPB=2.5000"], "local:T1")
    row = await conn.fetchrow("SELECT * FROM igla_race_trials WHERE canon_name = $1", T1)
    assert (row["last_step"], row["last_bpb"], row["best_bpb"]) == (30, 2.95, 2.5)
    other = await conn.fetchrow("SELECT * FROM igla_race_trials WHERE canon_name = $1", T2)
    assert other["last_step"] is None and other["last_sample_at"] is None


async def test_redelivery_is_a_no_op(writer: SampleWriter, conn: asyncpg.Connection) -> None:
    lines = [f"step={s} BPB=2.{s:04d}" for s in range(10, 60, 10)]
    first = await writer.submit_lines(T1, lines, "tail")
    assert first.count("accepted") == 5
    stamp = await conn.fetchval(
        "SELECT last_sample_at FROM igla_race_trials WHERE canon_name=$1", T1
    )
    again = await writer.submit_lines(T1, [*lines, lines[0]], "tail")
    assert [r.status for r in again.items] == ["duplicate"] * 6
    assert await conn.fetchval("SELECT count(*) FROM bpb_samples") == 5
    assert await _quarantine(conn) == []
    assert (
        await conn.fetchval("SELECT last_sample_at FROM igla_race_trials WHERE canon_name=$1", T1)
        == stamp
    )


async def test_a_conflicting_value_is_quarantined_and_the_first_kept(
    writer: SampleWriter, conn: asyncpg.Connection
) -> None:
    await writer.submit_lines(T1, ["step=10 BPB=2.0000"], "tail")
    result = await writer.submit_lines(
        T1,
        ["step=10 BPB=2.0001", "step=20 BPB=1.9000", "step=20 BPB=1.9500", "step=20 BPB=1.9000"],
        "tail",
    )
    assert [r.status for r in result.items] == ["rejected", "accepted", "rejected", "duplicate"]
    assert await _samples(conn, T1) == [(10, 2.0), (20, 1.9)]
    assert await _quarantine(conn) == [
        (
            "tail",
            "acc1",
            T1,
            "step=10 BPB=2.0001",
            "step_conflict: step 10 already has BPB=2.0000; BPB=2.0001 not stored "
            "(the first value is kept)",
        ),
        (
            "tail",
            "acc1",
            T1,
            "step=20 BPB=1.9500",
            "step_conflict: step 20 already has BPB=1.9000; BPB=1.9500 not stored "
            "(the first value is kept)",
        ),
    ]


async def test_a_refused_value_never_reaches_the_summary(
    writer: SampleWriter, conn: asyncpg.Connection
) -> None:
    await writer.submit_lines(T1, ["step=10 BPB=2.5000", "step=30 BPB=2.4000"], "tail")
    before = _metrics()
    res = await writer.submit_lines(
        T1,
        ["step=30 BPB=1.0000", "step=40 BPB=9.0000", "step=40 BPB=0.5000", "step=20 BPB=2.3000"],
        "tail",
    )
    assert [r.status for r in res.items] == ["rejected", "accepted", "rejected", "accepted"]
    row = await conn.fetchrow("SELECT * FROM igla_race_trials WHERE canon_name = $1", T1)
    assert (row["last_step"], row["last_bpb"], row["best_bpb"]) == (40, 9.0, 2.3)
    after = _metrics()
    assert after["accepted"] - before["accepted"] == 2
    assert after["conflict"] - before["conflict"] == 2
    assert after["batches"] - before["batches"] == 1


def _metrics() -> dict[str, float]:
    def value(name: str, labels: dict[str, str] | None = None) -> float:
        return REGISTRY.get_sample_value(name, labels or {}) or 0.0

    return {
        "accepted": value("gardener_samples_accepted_total"),
        "conflict": value("gardener_samples_rejected_total", {"reason": "step_conflict"}),
        "batches": value("gardener_ingest_batch_seconds_count"),
    }


async def test_one_notify_per_batch_with_the_max_id(
    writer: SampleWriter, db_dsn: str, conn: asyncpg.Connection
) -> None:
    got: asyncio.Queue[str] = asyncio.Queue()
    listener = await asyncpg.connect(db_dsn)
    try:
        await listener.add_listener("gardener_samples", lambda *a: got.put_nowait(a[3]))
        # Twenty sources at once are gathered into far fewer batches than calls.
        results = await asyncio.gather(
            *(
                writer.submit_lines(T1 if k % 2 else T2, [f"step={k} BPB=2.{k:04d}"], f"s{k}")
                for k in range(20)
            )
        )
        assert all(r.items[0].status == "accepted" for r in results)
        max_id = await conn.fetchval("SELECT max(id) FROM bpb_samples")
        payloads = [json.loads(await asyncio.wait_for(got.get(), 5))]
        while sum(p["count"] for p in payloads) < 20:
            payloads.append(json.loads(await asyncio.wait_for(got.get(), 5)))
        assert len(payloads) < 20
        assert payloads[-1]["max_id"] == max_id
        # Nothing new (a re-delivery, a rejection): no NOTIFY.
        await writer.submit_lines(T1, ["step=1 BPB=2.0001", "step=1 BPB=x"], "s")
        await conn.execute("SELECT pg_notify('gardener_samples', 'marker')")
        assert await asyncio.wait_for(got.get(), 5) == "marker"
    finally:
        await listener.close()


async def test_unknown_trials_and_other_accounts_are_refused(
    writer: SampleWriter, conn: asyncpg.Connection
) -> None:
    res = await writer.submit_lines("IGLA-NOPE-FP32-X-seed1", ["step=1 BPB=2.0000", "hello"], "t")
    assert [r.status for r in res.items] == ["rejected", "ignored"]
    _, ok = P.parse_structured({"canon_name": T1, "step": 5, "bpb": 2.5})
    _, theirs = P.parse_structured({"canon_name": T3, "step": 5, "bpb": 2.5})
    res = await writer.submit_samples([(T1, ok), (T3, theirs)], "http", account="acc1")
    assert [r.status for r in res.items] == ["accepted", "rejected"]
    assert await _quarantine(conn) == [
        (
            "t",
            None,
            "IGLA-NOPE-FP32-X-seed1",
            "step=1 BPB=2.0000",
            "unknown_trial: no trial 'IGLA-NOPE-FP32-X-seed1' in the ledger",
        ),
        (
            "http",
            "acc1",
            T3,
            '{"bpb": 2.5, "canon_name": "' + T3 + '", "step": 5}',
            f"cross_account: {T3} belongs to acc2, not acc1",
        ),
    ]
    assert await _samples(conn, T3) == []
    assert await _samples(conn, T1) == [(5, 2.5)]


async def test_structured_samples_keep_their_time(
    writer: SampleWriter, conn: asyncpg.Connection
) -> None:
    items = [
        P.parse_structured(
            {"canon_name": T2, "step": 1, "bpb": 3.25, "ts": "2026-01-02T03:04:05Z"}
        ),
        P.parse_structured({"canon_name": T2, "step": 2, "bpb": "nan"}),
        P.parse_structured({"step": 2, "bpb": 1}),
    ]
    res = await writer.submit_samples(items, "http", account="acc1")
    assert [r.status for r in res.items] == ["accepted", "rejected", "rejected"]
    ts = await conn.fetchval("SELECT ts FROM bpb_samples WHERE canon_name = $1", T2)
    assert ts == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    q = await _quarantine(conn)
    assert [(r[2], r[3], r[4]) for r in q] == [
        (
            T2,
            '{"bpb": "nan", "canon_name": "' + T2 + '", "step": 2}',
            "bpb_format: BPB=nan does not match L-R8",
        ),
        (None, '{"bpb": 1, "step": 2}', "bad_item: canon_name must be a non-empty string"),
    ]


async def test_flush_close_and_a_closed_writer(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    await _admit(conn)
    w = SampleWriter(pool, max_latency=60.0)  # only flush() or a full batch writes
    with pytest.raises(WriterClosed):
        await w.submit_lines(T1, ["step=1 BPB=2.0000"], "t")
    await w.start()
    pending = asyncio.create_task(w.submit_lines(T1, ["step=1 BPB=2.0000"], "t"))
    await asyncio.sleep(0)  # let it enqueue
    assert not pending.done()
    await w.flush()
    assert (await pending).items[0].status == "accepted"
    late = asyncio.create_task(w.submit_lines(T1, ["step=2 BPB=2.0000"], "t"))
    await asyncio.sleep(0)
    await w.close()
    assert (await late).items[0].status == "accepted"
    assert await _samples(conn, T1) == [(1, 2.0), (2, 2.0)]
    with pytest.raises(WriterClosed):
        await w.submit_lines(T1, ["step=3 BPB=2.0000"], "t")


async def test_a_full_batch_is_written_without_waiting_for_the_latency(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    await _admit(conn)
    async with SampleWriter(pool, max_batch=100, max_latency=60.0) as w:
        lines = [f"step={s} BPB=2.5000" for s in range(100)]
        res = await asyncio.wait_for(w.submit_lines(T1, lines, "t"), 10)
        assert res.count("accepted") == 100


async def test_two_writers_at_once_store_each_sample_once(
    db_dsn: str, pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    """Leader and standby both ingest: the same lines through two writers land once each."""
    from gardener.ledger import db

    await _admit(conn)
    other_pool = await db.create_pool(db_dsn, min_size=1, max_size=2)
    try:
        async with (
            SampleWriter(pool, max_latency=0.001) as w1,
            SampleWriter(other_pool, max_latency=0.001) as w2,
        ):
            chunks = {
                name: [
                    [f"step={s} BPB=2.{s:04d}" for s in range(k, k + 50)] for k in range(0, 500, 50)
                ]
                for name in (T1, T2)
            }

            async def feed(w: SampleWriter, name: str) -> list[str]:
                out: list[str] = []
                for chunk in chunks[name]:
                    out += [r.status for r in (await w.submit_lines(name, chunk, "tail")).items]
                return out

            results = await asyncio.gather(feed(w1, T1), feed(w2, T1), feed(w1, T2), feed(w2, T2))
        for a, b in (results[0:2], results[2:4]):
            assert all({x, y} == {"accepted", "duplicate"} for x, y in zip(a, b, strict=True))
        assert await conn.fetchval("SELECT count(*) FROM bpb_samples") == 1000
        assert await conn.fetchval("SELECT count(*) FROM sample_quarantine") == 0
        rows = await conn.fetch(
            "SELECT last_step, best_bpb FROM igla_race_trials WHERE last_step IS NOT NULL"
        )
        assert sorted(tuple(r) for r in rows) == [(499, 2.0), (499, 2.0)]
    finally:
        await other_pool.close()


async def test_batches_in_flight_at_once_keep_the_first_value(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    """One item per batch, two batches in flight: the first value to arrive is kept."""
    await _admit(conn)
    async with SampleWriter(pool, max_batch=1, max_latency=0.0, max_in_flight=2) as w:
        values = ["2.0000", "2.1000", "2.0000", "2.2000", "2.1000", "2.0000"]
        results = await asyncio.gather(
            *(w.submit_lines(T1, [f"step=10 BPB={v}"], "t") for v in values)
        )
    statuses = [r.items[0].status for r in results]
    assert statuses == ["accepted", "rejected", "duplicate", "rejected", "rejected", "duplicate"]
    assert await _samples(conn, T1) == [(10, 2.0)]


async def test_a_corpus_report_alone(writer: SampleWriter, conn: asyncpg.Connection) -> None:
    res = await writer.submit_lines(T2, [f"corpus=tinyshakespeare sha256={SHA}", "hello"], "t")
    assert [r.status for r in res.items] == ["corpus", "ignored"]
    row = await conn.fetchrow("SELECT * FROM igla_race_trials WHERE canon_name = $1", T2)
    assert (row["corpus"], row["corpus_sha256"], row["last_step"]) == ("tinyshakespeare", SHA, None)
    assert row["corpus_reported_at"] is not None


async def test_a_writer_that_dies_fails_its_callers_instead_of_hanging(
    pool: asyncpg.Pool, conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _admit(conn)
    w = SampleWriter(pool, max_latency=0.0)

    def broken() -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(w, "_take", broken)
    await w.start()
    with pytest.raises(WriterClosed, match="a bug"):
        await asyncio.wait_for(w.submit_lines(T1, ["step=1 BPB=2.0000"], "t"), 10)
    assert not w.running
    with pytest.raises(WriterClosed):
        await w.submit_lines(T1, ["step=2 BPB=2.0000"], "t")
    await w.close()
    assert await _samples(conn, T1) == []


async def test_a_failed_batch_writes_nothing_and_the_writer_goes_on(
    writer: SampleWriter, conn: asyncpg.Connection
) -> None:
    await conn.execute("ALTER TABLE sample_quarantine RENAME TO sq_away")
    with pytest.raises(asyncpg.UndefinedTableError):
        await writer.submit_lines(T1, ["step=1 BPB=2.0000", "step=2 BPB=nan"], "t")
    assert await _samples(conn, T1) == []  # the good sample went with the failed transaction
    assert (
        await conn.fetchval("SELECT last_step FROM igla_race_trials WHERE canon_name=$1", T1)
        is None
    )
    await conn.execute("ALTER TABLE sq_away RENAME TO sample_quarantine")
    res = await writer.submit_lines(T1, ["step=1 BPB=2.0000", "step=2 BPB=nan"], "t")
    assert [r.status for r in res.items] == ["accepted", "rejected"]
    assert await _samples(conn, T1) == [(1, 2.0)]
