"""The tick and the reconciler against a real PostgreSQL, with an in-memory backend.

Samples in, decisions out; the level-triggered rescan catches a row committed behind the
watermark; pause holds (logged once) and resume applies; stalls fire once; a race whose trials
all ended is marked done and torn down; the reconciler drives a backend, writes observed state
back, makes no change while paused, and feeds service logs to the ingest writer. The loop's
sample cache gives the snapshot a full read gives (after a restart, a new trial, a row committed
behind the watermark), and a tripwire acknowledgement releases held promotions at once.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable

import anyio
import asyncpg
import pytest

from gardener.backends.base import EnsureOutcome, LogLine, ServiceSpec, ServiceState, Status
from gardener.core import canon
from gardener.core.types import Snapshot
from gardener.ingest.writer import SampleWriter
from gardener.ledger import control, trials
from gardener.ledger.snapshot import RaceInfo, SampleCache, load_snapshot, race_info
from gardener.loop.control import LoopState
from gardener.loop.leader import _END_HOLDER, LEADER_LOCK
from gardener.loop.reconciler import QUIET_TAILS_PER_S, Reconciler
from gardener.loop.tick import Q, Ticker
from gardener.settings import Settings
from tests.conftest import create_test_database, drop_test_database
from tests.integration.test_apply import add_samples, curve, make_race


class MemoryBackend:
    """The backend protocol in memory: services by canon name, log lines by canon name."""

    kind = "memory"

    def __init__(self, account: str) -> None:
        self.account = account
        self.services: dict[str, Status] = {}
        self.specs: dict[str, ServiceSpec] = {}
        self.output: dict[str, list[str]] = {}
        self.calls: list[tuple[str, str]] = []

    async def observe(self) -> list[ServiceState]:
        return [
            ServiceState(n, n, f"svc-{n[-12:]}", s, s.value, True, deployment_id="d1")
            for n, s in self.services.items()
        ]

    async def ensure(self, spec: ServiceSpec) -> EnsureOutcome:
        self.calls.append(("ensure", spec.canon_name))
        self.specs[spec.canon_name] = spec
        if self.services.get(spec.canon_name) is Status.RUNNING:
            return EnsureOutcome.UNCHANGED
        self.services[spec.canon_name] = Status.RUNNING
        return EnsureOutcome.CREATED

    async def stop(self, canon_name: str, *, account: str | None = None) -> bool:
        self.calls.append(("stop", canon_name))
        self.services[canon_name] = Status.STOPPED
        return True

    async def remove(self, canon_name: str, *, account: str | None = None) -> bool:
        self.calls.append(("remove", canon_name))
        return self.services.pop(canon_name, None) is not None

    async def tail(self, canon_name: str, cursor: str | None = None) -> list[LogLine]:
        lines = self.output.get(canon_name, [])
        start = int(cursor or 0)
        return [
            LogLine(canon_name, m, "2026-01-01T00:00:00Z", str(i + 1))
            for i, m in enumerate(lines[start:], start)
        ]

    async def logs(self, canon_name: str, *, poll_interval: float = 2.0) -> AsyncIterator[LogLine]:
        for line in await self.tail(canon_name):
            yield line

    async def aclose(self) -> None:
        return None


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def ticker(pool: asyncpg.Pool, **kw: object) -> Ticker:
    settings = Settings(stall_after=kw.pop("stall_after", 600.0))  # type: ignore[arg-type]
    kw.setdefault("soft_share", None)
    return Ticker(pool, settings, min_interval=0.0, **kw)  # type: ignore[arg-type]


async def applied(conn: asyncpg.Connection, race: str) -> list[tuple[str, int, str]]:
    rows = await conn.fetch(
        "SELECT canon_name, rung, action FROM gardener_decisions WHERE race = $1 AND applied "
        "ORDER BY id",
        race,
    )
    return [(r["canon_name"], r["rung"], r["action"]) for r in rows]


async def test_samples_in_decisions_out(conn: asyncpg.Connection, pool: asyncpg.Pool) -> None:
    names = await make_race(conn, "r-tick", 6, first_exp=600)
    t = ticker(pool)
    first = await t.tick()  # nothing to decide yet
    assert first.applied == 0
    for i, name in enumerate(names):
        await add_samples(conn, name, curve(0.04 * i, 25, seed=i))
    report = await t.tick()
    assert report.crossings == ["r-tick"]
    assert report.applied == 6  # rung 0 (collect): a KEEP per trial, with the numbers
    assert {a for _, r, a in await applied(conn, "r-tick") if r == 0} == {"keep"}
    quiet = await t.tick()
    assert quiet.crossings == [] and quiet.applied == 0
    for i, name in enumerate(names):
        await add_samples(conn, name, curve(0.04 * i, 45, seed=i))
    report = await t.tick()
    assert report.crossings == ["r-tick"] and report.stopped
    rows = await conn.fetch("SELECT canon_name, desired_state, rung FROM igla_race_trials")
    assert {r["canon_name"] for r in rows if r["desired_state"] == "stopped"} == set(
        report.stopped
    )
    assert all(r["rung"] == 1 for r in rows)


async def test_a_row_committed_behind_the_watermark_is_found_by_the_rescan(
    conn: asyncpg.Connection, pool: asyncpg.Pool, db_dsn: str
) -> None:
    names = await make_race(conn, "r-late", 4, first_exp=700)
    for i, name in enumerate(names):
        await add_samples(conn, name, curve(0.04 * i, 15, seed=i))
    clock = Clock()
    t = ticker(pool, clock=clock, rescan_every=30.0)
    assert (await t.tick()).applied == 0
    late = await asyncpg.connect(db_dsn)
    try:
        tx = late.transaction()
        await tx.start()
        seed = int(names[0].rsplit("seed", 1)[1])
        await late.execute(
            "INSERT INTO bpb_samples (canon_name, seed, step, bpb) VALUES ($1, $2, 20, 2.5)",
            names[0],
            seed,
        )
        for i, name in enumerate(names[1:], 1):  # higher ids, committed first
            await add_samples(conn, name, curve(0.04 * i, 20, seed=i))
        await t.tick()
        await tx.commit()
    finally:
        await late.close()
    clock.t += 31.0
    report = await t.tick()
    assert "r-late" in report.crossings
    assert (names[0], 0, "keep") in await applied(conn, "r-late")


async def test_a_row_committed_just_behind_the_watermark_is_found_at_once(
    conn: asyncpg.Connection, pool: asyncpg.Pool, db_dsn: str
) -> None:
    names = await make_race(conn, "r-settle", 3, first_exp=750, first_seed=750)
    for i, name in enumerate(names):
        await add_samples(conn, name, curve(0.04 * i, 15, seed=i))
    clock = Clock()
    t = ticker(pool, clock=clock, rescan_every=3600.0, settle=2.0)
    await t.tick()
    late = await asyncpg.connect(db_dsn)
    try:
        tx = late.transaction()
        await tx.start()
        await late.execute(
            "INSERT INTO bpb_samples (canon_name, seed, step, bpb) VALUES ($1, $2, 20, 2.5)",
            names[0],
            750,
        )
        await add_samples(conn, names[1], [(16, 2.6)])  # a higher id, committed first
        clock.t += 0.5
        assert (await t.tick()).crossings == []
        await tx.commit()
    finally:
        await late.close()
    clock.t += 0.5  # within the settle window, long before any rescan
    report = await t.tick()
    assert report.crossings == ["r-settle"]
    assert (names[0], 0, "keep") in await applied(conn, "r-settle")


async def test_paused_decisions_are_held_once_then_applied_on_resume(
    conn: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    names = await make_race(conn, "r-pause", 6, first_exp=800)
    for i, name in enumerate(names):
        await add_samples(conn, name, curve(0.05 * i, 45, seed=i))
    await control.set_paused(conn, True, "maintenance", "pytest")
    state = LoopState(stop=anyio.Event())
    t = ticker(pool, state=state)
    report = await t.tick()
    assert report.paused and state.paused and report.held > 0 and not report.stopped
    for i, name in enumerate(names):  # more samples: decided again, held rows not repeated
        await add_samples(conn, name, [(46 + i, 2.3)])
    again = await t.tick()
    assert again.held == 0
    held_rows = await conn.fetchval("SELECT count(*) FROM gardener_decisions WHERE NOT applied")
    assert held_rows == report.held
    assert await conn.fetchval(
        "SELECT count(*) FROM igla_race_trials WHERE desired_state <> 'running'"
    ) == 0
    await control.set_paused(conn, False, "resumed", "pytest")
    resumed = await t.tick()
    assert not state.paused and resumed.stopped
    assert len(resumed.stopped) == report.held


async def test_a_stalled_trial_fires_one_tripwire(
    conn: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    names = await make_race(conn, "r-stall", 3, first_exp=900)
    for i, name in enumerate(names):
        await add_samples(conn, name, curve(0.04 * i, 15, seed=i))
    await conn.execute(
        "UPDATE igla_race_trials SET observed_state = 'running', "
        "last_sample_at = now() - interval '2 hours'"
    )
    await conn.execute(
        "UPDATE bpb_samples SET ts = now() - interval '2 hours'"
    )
    await conn.execute(
        "UPDATE igla_race_trials SET last_sample_at = now() WHERE canon_name = $1", names[0]
    )
    t = ticker(pool, stall_after=600.0)
    report = await t.tick()
    assert report.tripwires == 2
    kinds = await conn.fetch("SELECT kind, canon_name FROM tripwire_events ORDER BY canon_name")
    assert [(k["kind"], k["canon_name"]) for k in kinds] == [
        ("stalled", n) for n in sorted(names[1:])
    ]
    assert (await t.tick()).tripwires == 0


async def test_a_trainer_on_another_corpus_fires_the_corpus_tripwire(
    conn: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    names = await make_race(conn, "r-corpus", 2, first_exp=950)
    for i, name in enumerate(names):
        await add_samples(conn, name, curve(0.04 * i, 15, seed=i))
    await conn.execute("UPDATE igla_race_trials SET corpus = 'stdlib' WHERE canon_name = $1",
                       names[0])
    await conn.execute(
        "UPDATE igla_race_trials SET corpus = 'tiny_shakespeare' WHERE canon_name = $1", names[1]
    )
    report = await ticker(pool).tick()  # the configured corpus is the default, stdlib
    assert report.tripwires == 1
    event = await conn.fetchrow("SELECT kind, canon_name, evidence FROM tripwire_events")
    assert (event["kind"], event["canon_name"]) == ("corpus_mismatch", names[1])
    assert event["evidence"] == {"expected_name": "stdlib", "reported_name": "tiny_shakespeare"}


async def test_a_race_whose_trials_all_ended_is_done_and_torn_down(
    conn: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    names = await make_race(conn, "r-done", 3, first_exp=950, config={"auto_teardown": True})
    await conn.execute("UPDATE igla_race_trials SET observed_state = 'running'")
    t = ticker(pool)
    assert (await t.tick()).finished == []
    await conn.execute("UPDATE igla_race_trials SET observed_state = 'succeeded'")
    await trials.kill(conn, names[0], "acc1", by="pytest")
    await conn.execute(
        "UPDATE igla_race_trials SET observed_state = 'stopped' WHERE canon_name = $1", names[0]
    )
    await control.set_paused(conn, True, "hold on", "pytest")
    assert (await t.tick()).finished == []  # no teardown while paused
    await control.set_paused(conn, False, "go", "pytest")
    report = await t.tick()
    assert report.finished == ["r-done"]
    race = await conn.fetchrow("SELECT status, finished_at FROM races WHERE name = 'r-done'")
    assert race["status"] == "done" and race["finished_at"] is not None
    assert {r["desired_state"] for r in await conn.fetch("SELECT desired_state FROM "
                                                         "igla_race_trials")} == {"removed"}
    assert ("r-done", -1, "race_done") in await applied(conn, "r-done")
    assert (await t.tick()).finished == []


@pytest.fixture
async def writer(pool: asyncpg.Pool) -> AsyncIterator[SampleWriter]:
    async with SampleWriter(pool) as w:
        yield w


async def test_reconciler_drives_the_backend_and_writes_back_what_it_sees(
    conn: asyncpg.Connection, pool: asyncpg.Pool, writer: SampleWriter
) -> None:
    names = await make_race(conn, "r-rec", 3, first_exp=1000)
    backend = MemoryBackend("acc1")
    state = LoopState(stop=anyio.Event())
    rec = Reconciler(pool, Settings(), state, {"acc1": backend}, writer)
    await rec.pass_once()
    assert sorted(backend.services) == sorted(names)
    spec = backend.specs[names[1]]
    assert spec.variables["TRAIN_CANON_NAME"] == names[1]
    assert spec.variables["TRAIN_SEED"] == names[1].rsplit("seed", 1)[1]
    assert spec.variables["TRAIN_STEPS"] == "320"
    await rec.pass_once()
    rows = await conn.fetch("SELECT observed_state, service_id, observed_at FROM igla_race_trials")
    assert {r["observed_state"] for r in rows} == {"running"}
    assert all(r["service_id"] and r["observed_at"] for r in rows)

    # Logs: the trainer's lines reach bpb_samples through the ingest writer.
    backend.output[names[0]] = ["step=10 BPB=2.5000", "step=20 BPB=2.4000", "noise"]
    assert await rec.pump_once() == 3
    assert await rec.pump_once() == 0  # the cursor moved on
    got = await conn.fetch(
        "SELECT step, bpb FROM bpb_samples WHERE canon_name = $1 ORDER BY step", names[0]
    )
    assert [(r["step"], r["bpb"]) for r in got] == [(10, 2.5), (20, 2.4)]

    # Paused: a kill changes the desired state, the backend sees no stop until resume.
    await control.set_paused(conn, True, "hold", "pytest")
    state.paused = True
    await trials.kill(conn, names[2], "acc1", by="pytest")
    backend.calls.clear()
    assert (await rec.pass_once()) == {"acc1": None}
    assert backend.calls == []
    state.paused = False
    await rec.pass_once()
    assert backend.calls == [("stop", names[2])]
    await rec.pass_once()
    # "stopped" is written only once the service's log was read to its end.
    assert await conn.fetchval(
        "SELECT observed_state FROM igla_race_trials WHERE canon_name = $1", names[2]
    ) == "running"
    await rec.pump_once()
    await rec.pass_once()
    assert await conn.fetchval(
        "SELECT observed_state FROM igla_race_trials WHERE canon_name = $1", names[2]
    ) == "stopped"


class BrokenBackend(MemoryBackend):
    """A backend with a bug: observing raises something no one expects."""

    async def observe(self) -> list[ServiceState]:
        raise RuntimeError("observe is broken")


async def test_a_task_that_dies_stops_the_daemon_loudly(db_dsn: str, tmp_path: object) -> None:
    from gardener.loop.daemon import serve

    settings = Settings(account="acc1", poll_interval=0.2)
    state = LoopState(stop=anyio.Event())
    with anyio.fail_after(30):
        with pytest.raises(BaseExceptionGroup) as info:
            await serve(settings, dsn=db_dsn, backend_factory=BrokenBackend, http=False,
                        install_signal_handlers=False, state=state)
    assert info.group_contains(RuntimeError, match="observe is broken")
    assert not state.stop.is_set()  # it did not stop on request: it failed


def same_snapshot(a: Snapshot, b: Snapshot) -> None:
    """Equal field by field, the sample arrays element by element (in arrival order)."""
    assert [t.canon_name for t in a.trials] == [t.canon_name for t in b.trials]
    for x, y in zip(a.trials, b.trials, strict=True):
        assert x.steps.dtype == y.steps.dtype and x.bpb.dtype == y.bpb.dtype
        assert x.steps.tolist() == y.steps.tolist(), x.canon_name
        assert x.bpb.tobytes() == y.bpb.tobytes(), x.canon_name
        fields = ("variant", "seed", "desired_state", "observed_state", "parent", "rung",
                  "last_sample_at", "corpus_sha256", "corpus", "hidden_size", "format")
        assert [getattr(x, f) for f in fields] == [getattr(y, f) for f in fields], x.canon_name
    for f in ("race", "now", "used_seeds", "open_tripwires", "paused", "horizon",
              "expected_corpus_sha256", "expected_corpus", "reviewed_tripwires"):
        assert getattr(a, f) == getattr(b, f), f


async def poll_until(check: Callable[[], Awaitable[bool]], limit: float, every: float) -> None:
    """Until ``check`` holds (a row another process writes), failing after ``limit`` s."""
    with anyio.fail_after(limit):
        while True:
            if await check():
                return
            await anyio.sleep(every)


async def race_row(conn: asyncpg.Connection, name: str) -> RaceInfo:
    info = await race_info(conn, name)
    assert info is not None
    return info


async def test_the_sample_cache_gives_the_snapshot_of_a_full_read(
    conn: asyncpg.Connection, db_dsn: str
) -> None:
    names = await make_race(conn, "r-cache", 4, first_exp=950, first_seed=950)
    other = await make_race(conn, "r-other", 2, first_exp=960, first_seed=960)
    for i, name in enumerate([*names, *other]):
        await add_samples(conn, name, curve(0.03 * i, 30, seed=i))
    race = await race_row(conn, "r-cache")
    cache = SampleCache()

    async def check() -> None:
        full = await load_snapshot(conn, race, paused=False, now=0.0)
        cached = await load_snapshot(conn, race, paused=False, now=0.0, cache=cache)
        same_snapshot(cached, full)

    await check()  # first sight: every trial with samples is read in full
    assert cache.full_reads == 4
    for i, name in enumerate(names[:2]):
        await add_samples(conn, name, [(35, 2.3 + i), (40, 2.29 + i)])
    await add_samples(conn, other[0], [(35, 2.3)])  # another race: not this cache's business
    await check()
    assert cache.full_reads == 4 and cache.rows_read == 4  # only the new rows
    # A trial added to the race, with samples it sent before its row existed.
    late = canon.CanonName("HYBRID", "FP32", ("WSD",), 999, 999)
    await add_samples(conn, str(late), [(5, 2.9), (10, 2.8)])
    await trials.admit(conn, "r-cache", "acc1", [trials.Admission(late, steps=320)])
    await check()
    assert cache.full_reads == 5
    # A row committed behind the watermark: its id is below rows already cached.
    straggler = await asyncpg.connect(db_dsn)
    try:
        tx = straggler.transaction()
        await tx.start()
        await straggler.execute(
            "INSERT INTO bpb_samples (canon_name, seed, step, bpb) VALUES ($1, $2, 45, 2.25)",
            names[0],
            950,
        )
        await add_samples(conn, names[0], [(50, 2.24)])  # higher id, same trial, visible first
        await add_samples(conn, names[1], [(45, 2.31)])
        await check()
        await tx.commit()
    finally:
        await straggler.close()
    await check()  # the count gave it away: names[0] read again, 45 before 50 (arrival order)
    assert cache.full_reads == 6
    snap = await load_snapshot(conn, race, paused=False, now=0.0, cache=cache)
    assert snap.trials[0].steps.tolist()[-2:] == [45, 50]
    # A restart: an empty cache reads everything again and agrees.
    cache = SampleCache()
    await check()
    assert cache.full_reads == 5
    cache.retain({"r-other"})
    assert cache.races == {}


async def test_a_ticker_decides_from_its_cache_as_from_a_full_read(
    conn: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    names = await make_race(conn, "r-cached-tick", 6, first_exp=970, first_seed=970)
    for i, name in enumerate(names):
        await add_samples(conn, name, curve(0.04 * i, 25, seed=i))
    t = ticker(pool)
    assert (await t.tick()).applied == 6  # rung 0
    for i, name in enumerate(names):
        await add_samples(conn, name, curve(0.04 * i, 45, seed=i))
    report = await t.tick()
    assert report.crossings == ["r-cached-tick"] and report.stopped
    assert t.samples.rows_read > 0  # the second snapshot read only the new rows
    full = await load_snapshot(conn, await race_row(conn, "r-cached-tick"), paused=False, now=0.0)
    cached = await load_snapshot(
        conn, await race_row(conn, "r-cached-tick"), paused=False, now=0.0, cache=t.samples
    )
    same_snapshot(cached, full)


async def test_a_tripwire_acknowledgement_releases_the_held_promotion_at_once(
    conn: asyncpg.Connection, db_dsn: str
) -> None:
    """The daemon holds a promotion behind a below-floor tripwire; `tri tripwire ack` sends a
    notification and the promotion is applied within a second or two, with a poll interval
    and a rescan far longer than that."""
    from gardener.loop.daemon import serve

    names = await make_race(conn, "r-ack", 4, first_exp=980, first_seed=980)
    for i, name in enumerate(names):
        await add_samples(conn, name, curve(0.05 * i, 165, seed=i))
    await add_samples(conn, names[3], [(170, 1.5)])  # below the floor: promotions wait
    settings = Settings(account="acc1", poll_interval=60.0)
    state = LoopState(stop=anyio.Event())

    async def promoted() -> bool:
        return bool(
            await conn.fetchval(
                "SELECT count(*) FROM gardener_decisions WHERE race = 'r-ack' AND applied "
                "AND action = 'promote'"
            )
        )

    async def held() -> bool:
        return bool(
            await conn.fetchval(
                "SELECT count(*) FROM gardener_decisions WHERE race = 'r-ack' AND NOT applied "
                "AND numbers->>'held_action' = 'promote'"
            )
        )

    async with anyio.create_task_group() as tg:
        tg.start_soon(
            lambda: serve(
                settings, dsn=db_dsn, backend_factory=MemoryBackend, http=False,
                install_signal_handlers=False, state=state,
            )
        )
        await poll_until(held, 30.0, 0.05)
        event = await conn.fetchval("SELECT id FROM tripwire_events WHERE kind = 'below_floor'")
        await anyio.sleep(0.3)
        assert not await promoted()  # held, and staying held
        started = time.perf_counter()
        assert await control.ack_tripwire(conn, event, "acc1", "pytest")
        await poll_until(promoted, 10.0, 0.02)
        took = time.perf_counter() - started
        state.request_stop()
    assert took < 2.0, took
    assert await conn.fetchval(
        "SELECT count(*) FROM gardener_decisions WHERE race = 'r-ack' AND applied "
        "AND action = 'mirror'"
    )


# -- scale: the tick's fleet-wide questions answer per race or per crossing trial -------------


async def test_the_rescan_returns_only_crossing_trials_by_each_races_rungs(
    conn: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    short = await make_race(conn, "r-short", 3, first_exp=1100, first_seed=1100,
                            config={"rungs": [50, 200]})
    long = await make_race(conn, "r-long", 3, first_exp=1110, first_seed=1110,
                           config={"rungs": [100, 400]})
    for name in [*short, *long]:
        await add_samples(conn, name, curve(0.0, 40))
    await add_samples(conn, short[0], [(60, 2.3)])  # reaches r-short's first rung (50)
    await add_samples(conn, long[0], [(60, 2.3)])  # below r-long's (100)
    # A trial the ingest writer moved: its last_step says it crossed, with no sample read.
    await conn.execute("UPDATE igla_race_trials SET last_step = 120 WHERE canon_name = $1",
                       long[1])
    t = ticker(pool)
    races = await t._races(conn)
    rows = await conn.fetch(Q.live_crossings, t._next_boundaries(races), 0)
    assert sorted((r["race"], r["canon_name"]) for r in rows) == sorted(
        [("r-short", short[0]), ("r-long", long[1])]
    )
    # Above a mark, only the newer samples are read; last_step still counts.
    high = await conn.fetchval("SELECT max(id) FROM bpb_samples")
    rows = await conn.fetch(Q.live_crossings, t._next_boundaries(races), high)
    assert [r["canon_name"] for r in rows] == [long[1]]
    # Decided at rung 0: no longer a crossing, until the next rung's boundary.
    await conn.execute("UPDATE igla_race_trials SET rung = 0")
    assert await conn.fetch(Q.live_crossings, t._next_boundaries(races), 0) == []
    await add_samples(conn, short[1], [(200, 2.2)])
    rows = await conn.fetch(Q.live_crossings, t._next_boundaries(races), 0)
    assert [r["canon_name"] for r in rows] == [short[1]]
    # A stopped trial is not a crossing.
    await conn.execute("UPDATE igla_race_trials SET desired_state = 'stopped' "
                       "WHERE canon_name = $1", short[1])
    assert await conn.fetch(Q.live_crossings, t._next_boundaries(races), 0) == []


async def test_new_samples_come_back_one_row_per_race(
    conn: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    rungs = {"rungs": [100, 400]}
    a = await make_race(conn, "r-many-a", 20, first_exp=1200, first_seed=1200, config=rungs)
    b = await make_race(conn, "r-many-b", 20, first_exp=1220, first_seed=1220, config=rungs)
    c = await make_race(conn, "r-many-c", 2, first_exp=1240, first_seed=1240, config=rungs)
    low = await conn.fetchval("SELECT coalesce(max(id), 0) FROM bpb_samples")
    for name in [*a, *b]:
        await add_samples(conn, name, curve(0.0, 60))  # below rung 0 (100)
    await add_samples(conn, b[3], [(100, 2.4)])  # b crosses
    await add_samples(conn, c[0], [(10, 0.05)])  # c: below the floor, no crossing
    high = await conn.fetchval("SELECT max(id) FROM bpb_samples")
    t = ticker(pool)
    races = await t._races(conn)
    rows = await conn.fetch(Q.new_samples_by_race, low, high, t._next_boundaries(races), t.floor)
    got = {r["race"]: (r["crossed"], r["below_floor"]) for r in rows}
    assert got == {"r-many-a": (False, False), "r-many-b": (True, False),
                   "r-many-c": (False, True)}
    report = await t.tick()  # the first tick: the rescan finds b's crossing
    assert report.crossings == ["r-many-b"]
    await add_samples(conn, a[0], [(100, 2.4)])
    report = await t.tick()  # the watermark path finds a's
    assert report.crossings == ["r-many-a"]


async def test_finished_races_are_looked_for_among_the_named_ones(
    conn: asyncpg.Connection,
) -> None:
    for name, exp in (("r-end-1", 1300), ("r-end-2", 1310)):
        await make_race(conn, name, 2, first_exp=exp, first_seed=exp)
    await conn.execute("UPDATE igla_race_trials SET observed_state = 'succeeded'")
    every = await conn.fetch(Q.finished_races, 0, None)
    assert sorted(r["name"] for r in every) == ["r-end-1", "r-end-2"]
    named = await conn.fetch(Q.finished_races, 0, ["r-end-2"])
    assert [r["name"] for r in named] == ["r-end-2"]


def test_quiet_services_are_tailed_no_more_than_the_fleet_allows() -> None:
    state = LoopState(stop=anyio.Event())
    backends = {"acc1": MemoryBackend("acc1")}
    rec = Reconciler(None, Settings(), state, backends, None)
    assert rec._intervals("local") == (rec.log_interval, rec.max_log_interval)
    rec.known = {f"t{i}": ("acc1", Status.RUNNING) for i in range(10_000)}
    base, most = rec._intervals("local")
    assert base == rec.log_interval and most == pytest.approx(10_000 / QUIET_TAILS_PER_S)
    assert rec._intervals("railway")[1] >= 300.0


async def test_ending_a_stale_leader_spares_the_leaders_of_other_ledgers_on_the_server(
    db_dsn: str, pg_server_dsn: str, template_db: str
) -> None:
    """Two ledgers on one PostgreSQL server (or a benchmark beside a test suite): their
    leaders hold the same advisory key, and ending one's stale holder must not end the
    other's (pg_locks and pg_stat_activity span the server)."""
    other_dsn = await create_test_database(pg_server_dsn, template_db)
    other = await asyncpg.connect(other_dsn)
    mine = await asyncpg.connect(db_dsn)
    try:
        assert await other.fetchval("SELECT pg_try_advisory_lock($1)", LEADER_LOCK)
        ended = await mine.fetch(_END_HOLDER, LEADER_LOCK, None)
        assert ended == []
        assert await other.fetchval("SELECT 1") == 1  # the other ledger's leader lives on
        # In its own database, the holder is ended.
        holder = await asyncpg.connect(db_dsn)
        assert await holder.fetchval("SELECT pg_try_advisory_lock($1)", LEADER_LOCK)
        assert len(await mine.fetch(_END_HOLDER, LEADER_LOCK, None)) == 1
        await holder.close(timeout=2)
    finally:
        await mine.close()
        await other.close()
        await drop_test_database(pg_server_dsn, other_dsn)


async def test_decides_without_a_crossing_take_a_bounded_share_of_the_ticker(
    conn: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    t = Ticker(pool, Settings(), min_interval=10.0, soft_share=0.02)
    t._soft = {f"r{i}" for i in range(10)}
    assert t._soft_interval("r0") == 10.0  # never decided: the floor
    t._cost["r0"] = 0.1  # a race of a thousand trials
    assert t._soft_interval("r0") == pytest.approx(0.1 * 10 / 0.02)  # ten waiting: 50 s
    t._cost["r1"] = 0.005
    assert t._soft_interval("r1") == 10.0
    assert Ticker(pool, Settings(), min_interval=10.0, soft_share=None)._soft_interval("r0") == 10.0


async def test_the_sample_cache_hands_back_the_same_view_of_an_unchanged_trial(
    conn: asyncpg.Connection, db_dsn: str
) -> None:
    """decide keeps what a view says while it gets the same view object: an unchanged trial
    keeps its view, one with a new sample or a changed row gets a new one."""
    names = await make_race(conn, "r-views", 3, first_exp=970, first_seed=970)
    for i, name in enumerate(names):
        await add_samples(conn, name, curve(0.03 * i, 30, seed=i))
    race = await race_row(conn, "r-views")
    cache = SampleCache()

    async def views() -> dict[str, object]:
        snap = await load_snapshot(conn, race, paused=False, now=0.0, cache=cache)
        return {t.canon_name: t for t in snap.trials}

    first = await views()
    again = await views()
    assert all(again[n] is first[n] for n in names)
    await add_samples(conn, names[0], [(35, 2.3)])
    await conn.execute("UPDATE igla_race_trials SET rung = 0 WHERE canon_name = $1", names[1])
    moved = await views()
    assert moved[names[0]] is not first[names[0]] and moved[names[1]] is not first[names[1]]
    assert moved[names[2]] is first[names[2]]
