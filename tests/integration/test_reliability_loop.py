"""The loop under stops, pauses, broken accounts, database blips, a deposed leader and
restarts (findings 2, 5, 7, 8, 10 and 12 of issue 11), on a real PostgreSQL."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import asyncpg
import pytest
import structlog
from prometheus_client import REGISTRY

from bench.chaos import RUNGS as CHAOS_RUNGS
from bench.chaos import recorded_trials
from gardener import logs
from gardener.backends.base import (
    EnsureOutcome,
    LogLine,
    NotAuthorized,
    ServiceSpec,
    ServiceState,
    Status,
)
from gardener.core import canon
from gardener.core.types import Action
from gardener.ingest.writer import SampleWriter
from gardener.ledger import apply as apply_mod
from gardener.ledger import control, trials
from gardener.ledger.apply import apply_group
from gardener.loop.control import LoopState
from gardener.loop.daemon import tick_loop
from gardener.loop.leader import Leadership, LeadershipLost
from gardener.loop.reconciler import Reconciler
from gardener.loop.tick import Ticker, TickReport
from gardener.settings import Settings
from tests.integration.test_apply import add_samples, curve, make_race


class RecordingBackend:
    """An in-memory platform that records when each mutating call started."""

    kind = "memory"

    def __init__(self, account: str, delay: float = 0.0) -> None:
        self.account = account
        self.delay = delay
        self.services: dict[str, Status] = {}
        self.calls: list[tuple[float, str, str]] = []  # (monotonic start, verb, name)
        self.observes = 0
        self.lines: dict[str, list[str]] = {}
        self.tail_cursors: list[str | None] = []

    async def observe(self) -> list[ServiceState]:
        self.observes += 1
        return [ServiceState(n, n, n, s, s.value, True) for n, s in self.services.items()]

    async def ensure(self, spec: ServiceSpec) -> EnsureOutcome:
        self.calls.append((time.monotonic(), "ensure", spec.canon_name))
        await asyncio.sleep(self.delay)
        self.services[spec.canon_name] = Status.RUNNING
        return EnsureOutcome.CREATED

    async def stop(self, name: str, *, account: str | None = None) -> bool:
        self.calls.append((time.monotonic(), "stop", name))
        await asyncio.sleep(self.delay)
        self.services[name] = Status.STOPPED
        return True

    async def remove(self, name: str, *, account: str | None = None) -> bool:
        self.calls.append((time.monotonic(), "remove", name))
        return self.services.pop(name, None) is not None

    async def tail(self, name: str, cursor: str | None = None) -> list[LogLine]:
        self.tail_cursors.append(cursor)
        start = int(cursor) if cursor else 0
        return [LogLine(name, text, "", str(i + 1))
                for i, text in enumerate(self.lines.get(name, [])) if i >= start]

    async def logs(self, name: str, *, poll_interval: float = 2.0) -> AsyncIterator[LogLine]:
        for line in await self.tail(name):
            yield line

    async def aclose(self) -> None:
        pass


class UnauthorizedBackend(RecordingBackend):
    async def observe(self) -> list[ServiceState]:
        self.observes += 1
        raise NotAuthorized("Not Authorized (a revoked token)")


def _state() -> LoopState:
    return LoopState(stop=anyio.Event())


# -- finding 2: a leader's MIRROR and PROMOTE commit together ----------------------------------


@pytest.mark.parametrize("interruption", ["stop", "pause"])
async def test_a_stop_or_pause_between_mirror_and_promote_loses_no_decision(
    pool: asyncpg.Pool, conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch,
    interruption: str,
) -> None:
    names = await make_race(conn, "r-group", 8)
    for i, name in enumerate(names):
        await add_samples(conn, name, curve(0.01 * i, 85, seed=i))
    settings = Settings(account="acc1", poll_interval=0.2)
    await Ticker(pool, settings, state=_state(), account="acc1").tick()
    for i, name in enumerate(names):
        await add_samples(conn, name, curve(0.01 * i, 165, seed=i))
    state = _state()
    admit = trials.admit

    async def admit_then_interrupt(*args: Any, **kwargs: Any) -> list[str]:
        out = await admit(*args, **kwargs)  # the MIRROR's spawn: interrupt right after it
        if interruption == "stop":
            state.stop.set()
        else:
            state.paused = True
        return out

    monkeypatch.setattr(trials, "admit", admit_then_interrupt)
    await Ticker(pool, settings, state=state, account="acc1").tick()
    monkeypatch.setattr(trials, "admit", admit)
    # A restarted loop (fresh state, not paused) finishes whatever is left.
    await Ticker(pool, settings, state=_state(), account="acc1").tick()
    rows = await conn.fetch(
        "SELECT canon_name, rung, action FROM gardener_decisions WHERE applied AND rung = 3"
    )
    mirrors = {(r["canon_name"], r["rung"]) for r in rows if r["action"] == "mirror"}
    promotes = {(r["canon_name"], r["rung"]) for r in rows if r["action"] == "promote"}
    assert mirrors, "the race should have mirrored its rung-3 leader"
    assert mirrors <= promotes, (mirrors, promotes)


async def test_a_group_commits_all_or_nothing(pool: asyncpg.Pool, conn: asyncpg.Connection) -> None:
    """A failure on the PROMOTE rolls back the MIRROR of the same trial and rung."""
    from gardener.core.types import Decision, SeedState

    names = await make_race(conn, "r-atomic", 2)
    ok = Decision(Action.KEEP, names[0], 1, "keep", SeedState.UNKNOWN, {})
    broken = Decision(Action.TRIPWIRE, names[0], 1, "a tripwire without its event",
                      SeedState.UNKNOWN, {})
    with pytest.raises(Exception, match="without an event"):
        await apply_group(conn, "r-atomic", "acc1", [ok, broken])
    assert await conn.fetchval("SELECT count(*) FROM gardener_decisions") == 0
    assert await conn.fetchval("SELECT rung FROM igla_race_trials WHERE canon_name = $1",
                               names[0]) == -1


# -- finding 5: a pause stops a pass already under way -----------------------------------------


async def test_a_pause_stops_a_reconcile_pass_under_way(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    await make_race(conn, "r-pause", 16, first_exp=500)
    state = _state()
    backend = RecordingBackend("acc1", delay=0.6)
    rec = Reconciler(pool, Settings(account="acc1"), state, {"acc1": backend}, None)
    task = asyncio.create_task(rec.pass_once())
    await asyncio.sleep(0.3)
    state.paused = True
    paused_at = time.monotonic()
    await asyncio.wait_for(task, 30)
    late = [t - paused_at for t, _, _ in backend.calls if t > paused_at]
    assert backend.calls, "the pass should have started some creates before the pause"
    assert not late, f"{len(late)} platform calls started after the pause: {late}"


# -- finding 8: one account's bad token stops no other account ----------------------------------


async def test_one_accounts_bad_token_is_its_own_failure(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    await make_race(conn, "r-acc1", 2, first_exp=600)
    await make_race(conn, "r-acc2", 3, account="acc2", first_exp=700, first_seed=2000)
    bad, good = UnauthorizedBackend("acc1"), RecordingBackend("acc2")
    rec = Reconciler(pool, Settings(), _state(), {"acc1": bad, "acc2": good}, None)
    first = await rec.pass_once()
    second = await rec.pass_once()
    assert "acc1" not in first and first["acc2"] is not None
    assert len({name for _, verb, name in good.calls if verb == "ensure"}) == 3
    assert second["acc2"] is not None and "acc1" not in second
    assert bad.observes == 1  # retried slowly: not on the very next pass
    assert REGISTRY.get_sample_value("gardener_account_failing", {"account": "acc1"}) == 1
    assert REGISTRY.get_sample_value("gardener_account_failing", {"account": "acc2"}) == 0
    assert (REGISTRY.get_sample_value(
        "gardener_account_errors_total", {"account": "acc1", "error": "NotAuthorized"}
    ) or 0) >= 1


# -- finding 10: a database blip is temporary ---------------------------------------------------


class BlipTicker:
    def __init__(self, state: LoopState, error: BaseException) -> None:
        self.state, self.error, self.calls = state, error, 0

    async def tick(self) -> TickReport:
        self.calls += 1
        if self.calls == 1:
            raise self.error
        self.state.request_stop()
        return TickReport()


@pytest.mark.parametrize(
    "error",
    [asyncpg.InternalClientError("cannot switch to state 15"),
     asyncpg.AdminShutdownError("terminating connection due to administrator command")],
    ids=["internal_client_error", "admin_shutdown"],
)
async def test_a_database_blip_in_the_tick_is_retried(error: BaseException) -> None:
    state = _state()
    ticker = BlipTicker(state, error)
    with anyio.fail_after(10):
        await tick_loop(ticker, state, 0.05)  # type: ignore[arg-type]
    assert ticker.calls == 2


# -- finding 7: a deposed leader commits and calls nothing --------------------------------------


async def test_a_deposed_leader_commits_nothing_and_calls_no_platform(
    db_dsn: str, pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    from gardener.core.types import Decision, SeedState

    names = await make_race(conn, "r-fence", 2, first_exp=800)
    a_state, b_state = _state(), _state()
    # A renews rarely: when B takes over, A's own clock still says it leads, so only the
    # fencing token in the ledger can stop it.
    a = Leadership(db_dsn, a_state, retry=0.1, renew_every=30.0, ttl=60.0, pool=pool)
    b = Leadership(db_dsn, b_state, retry=0.1, renew_every=0.5, ttl=5.0, pool=pool)
    lost: list[BaseException] = []

    async def run_a() -> None:
        try:
            await a.run()
        except LeadershipLost as exc:
            lost.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(run_a)
        with anyio.fail_after(10):
            await a.became_leader.wait()
        tg.start_soon(b.run)
        assert a_state.fence is not None and await a.still_leader()
        # The lock session is terminated: B takes over while A's pool still works.
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' "
            "AND granted AND objid = ($1::bigint & 4294967295) AND database = "
            "(SELECT oid FROM pg_database WHERE datname = current_database())", a.key,
        )
        with anyio.fail_after(10):
            await b.became_leader.wait()
        keep = Decision(Action.KEEP, names[0], 1, "keep", SeedState.UNKNOWN, {})
        async with pool.acquire() as c:
            with pytest.raises(LeadershipLost):
                await apply_group(c, "r-fence", "acc1", [keep], fence=a.fence)
        assert not await a.still_leader()
        assert await b.still_leader()
        async with pool.acquire() as c:
            await apply_group(c, "r-fence", "acc1", [keep], fence=b.fence)
        a_state.request_stop()
        b_state.request_stop()
    assert await conn.fetchval("SELECT count(*) FROM gardener_decisions") == 1
    assert await conn.fetchval("SELECT epoch FROM gardener_leader") == b.epoch == a.epoch + 1


# -- finding 12: log cursors survive a restart; exceptions are JSON fields, secrets masked -----


async def test_log_cursors_survive_a_restart(pool: asyncpg.Pool, conn: asyncpg.Connection) -> None:
    names = await make_race(conn, "r-cursor", 1, first_exp=900)
    backend = RecordingBackend("acc1")
    backend.lines[names[0]] = [f"step={10 * (i + 1)} BPB=3.{i:04d}" for i in range(5)]
    async with SampleWriter(pool, max_latency=0.01) as writer:
        first = Reconciler(pool, Settings(account="acc1"), _state(), {"acc1": backend}, writer)
        first.known[names[0]] = ("acc1", Status.RUNNING)
        assert await first.pump_once() == 5
        backend.tail_cursors.clear()
        again = Reconciler(pool, Settings(account="acc1"), _state(), {"acc1": backend}, writer)
        again.known[names[0]] = ("acc1", Status.RUNNING)
        assert await again.pump_once() == 0
    assert backend.tail_cursors == ["5"], backend.tail_cursors
    assert await conn.fetchval("SELECT count(*) FROM bpb_samples") == 5


def test_exceptions_are_json_fields_and_secrets_are_masked_in_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RAILWAY_TOKEN_ACC1", "rw-live-token-4242")
    out = io.StringIO()
    logs.configure("json", "info", stream=out)
    try:
        try:
            raise RuntimeError("Not Authorized for token rw-live-token-4242")
        except RuntimeError:
            logs.get_logger("t").exception("account_failed")
        logging.getLogger("uvicorn.error").error(
            "Exception in ASGI application",
            exc_info=ValueError("bad\nvalue at postgresql://gardener:hunter22@db/ledger"),
        )
        text = out.getvalue()
    finally:
        structlog.reset_defaults()
        for h in list(logging.getLogger().handlers):
            if type(h).__name__ == "_Handler":
                logging.getLogger().removeHandler(h)
    lines = text.strip().splitlines()
    events = [json.loads(line) for line in lines]  # every line is one JSON object
    assert [e["event"] for e in events] == ["account_failed", "Exception in ASGI application"]
    for e in events:
        assert isinstance(e["exception"], list) and e["exception"][0]["exc_type"]
    assert "rw-live-token-4242" not in text and "hunter22" not in text



@pytest.mark.parametrize("interruption", ["pause", "connection_lost"])
async def test_an_interruption_inside_a_rungs_decisions_ends_as_if_it_never_happened(
    pool: asyncpg.Pool, conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch,
    interruption: str,
) -> None:
    """Two identical races on the chaos harness's recorded curves; in one, the loop is
    paused (or loses its connection) right after the first decision of a rung, then
    restarts. It must end with the same actions as the other (a regression guard: the
    decide re-derives a rung from a partly applied one)."""
    stream = recorded_trials(16)
    races: dict[str, list[str]] = {}
    for k, race in enumerate(("r-clean", "r-hurt")):
        await trials.ensure_race(conn, race, "acc1", horizon=CHAOS_RUNGS[-1],
                                 config={"rungs": CHAOS_RUNGS})
        races[race] = await trials.admit(conn, race, "acc1", [
            trials.Admission(canon.CanonName("HYBRID", "FP32", ("WSD",), 3000 + 100 * k + i,
                                             3000 + 100 * k + i), steps=CHAOS_RUNGS[-1])
            for i in range(len(stream))
        ])
    clean, hurt = races["r-clean"], races["r-hurt"]
    settings = Settings(account="acc1", poll_interval=0.2)
    real = apply_mod.apply_decision
    low = 0
    for upto in CHAOS_RUNGS[:3]:
        for names in (clean, hurt):
            for name, t in zip(names, stream, strict=True):
                await add_samples(conn, name, [(st, b) for st, b in t.curve if low < st <= upto])
        low = upto
        state = _state()
        seen = 0

        async def interrupt(c: asyncpg.Connection, race: str, *a: Any,
                            state: LoopState = state, **k: Any) -> Any:
            nonlocal seen
            if race == "r-hurt":
                seen += 1
                if seen == 2 and interruption == "connection_lost":
                    raise asyncpg.ConnectionDoesNotExistError("connection was closed")
            out = await real(c, race, *a, **k)
            if race == "r-hurt" and seen == 1 and interruption == "pause":
                state.paused = True
            return out

        monkeypatch.setattr(apply_mod, "apply_decision", interrupt)
        try:
            await Ticker(pool, settings, state=state, account="acc1").tick()
        except asyncpg.ConnectionDoesNotExistError:
            pass
        monkeypatch.setattr(apply_mod, "apply_decision", real)
        await Ticker(pool, settings, state=_state(), account="acc1").tick()

    async def actions(names: list[str]) -> list[tuple[int, int, str]]:
        rows = await conn.fetch(
            "SELECT canon_name, rung, action FROM gardener_decisions WHERE applied "
            "AND canon_name = ANY($1::text[])", names)
        return sorted((names.index(r["canon_name"]), r["rung"], r["action"]) for r in rows)

    done = await actions(clean)
    assert any(a == "prune" for _, _, a in done), done
    assert await actions(hurt) == done


class FailingSink:
    """A writer whose batch fails (what finding 1's poisoned batch did to the log pump)."""

    def __init__(self) -> None:
        self.calls = 0

    async def submit_lines(self, canon_name: str, lines: Any, source: str) -> Any:
        self.calls += 1
        raise asyncpg.DataError("date/time field value out of range")


async def test_a_failed_write_never_stops_the_log_pump_and_loses_no_line(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    names = await make_race(conn, "r-pump", 1, first_exp=950)
    backend = RecordingBackend("acc1")
    backend.lines[names[0]] = ["step=10 BPB=3.0000", "step=20 BPB=2.9000"]
    sink = FailingSink()
    rec = Reconciler(pool, Settings(account="acc1"), _state(), {"acc1": backend}, sink)
    rec.known[names[0]] = ("acc1", Status.RUNNING)
    assert await rec.pump_once() == 0  # the write failed: nothing counted, nothing raised
    assert sink.calls == 1 and rec.cursors.get(names[0]) is None
    async with SampleWriter(pool, max_latency=0.01) as writer:
        rec.sink = writer
        assert await rec.pump_once() == 2  # the same lines again, from the same cursor
    assert await conn.fetchval("SELECT count(*) FROM bpb_samples") == 2


async def test_a_rung_decided_while_paused_is_decided_whole_on_resume(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    """Two identical races on the recorded curves, one decided through a pause at rung 2
    (its KEEPs written, its PRUNE held): after the resume both end with the same actions
    (a regression guard for the pause path the chaos harness exercises)."""
    stream = recorded_trials(16)
    races: dict[str, list[str]] = {}
    for k, race in enumerate(("r-calm", "r-paused")):
        await trials.ensure_race(conn, race, "acc1", horizon=CHAOS_RUNGS[-1],
                                 config={"rungs": CHAOS_RUNGS})
        races[race] = await trials.admit(conn, race, "acc1", [
            trials.Admission(canon.CanonName("HYBRID", "FP32", ("WSD",), 5000 + 100 * k + i,
                                             5000 + 100 * k + i), steps=CHAOS_RUNGS[-1])
            for i in range(len(stream))
        ])
    settings = Settings(account="acc1", poll_interval=0.2)
    low = 0
    for stage, upto in enumerate(CHAOS_RUNGS[:4]):
        for race in ("r-calm", "r-paused"):
            for name, t in zip(races[race], stream, strict=True):
                await add_samples(conn, name, [(st, b) for st, b in t.curve if low < st <= upto])
            if race == "r-paused" and stage == 2:  # rung 2 is decided while paused
                await control.set_paused(conn, True, "chaos", "pytest")
                report = await Ticker(pool, settings, state=_state(), account="acc1").tick()
                assert report.held > 0
                await control.set_paused(conn, False, None, "pytest")
            await Ticker(pool, settings, state=_state(), account="acc1").tick()
        low = upto

    async def actions(names: list[str]) -> list[tuple[int, int, str]]:
        rows = await conn.fetch(
            "SELECT canon_name, rung, action FROM gardener_decisions WHERE applied "
            "AND canon_name = ANY($1::text[])", names)
        return sorted((names.index(r["canon_name"]), r["rung"], r["action"]) for r in rows)

    calm = await actions(races["r-calm"])
    assert any(rung == 2 and a == "prune" for _, rung, a in calm), calm
    assert await actions(races["r-paused"]) == calm


async def test_a_database_blip_in_a_reconcile_pass_is_retried(pool: asyncpg.Pool) -> None:
    """The chaos harness saw the reconcile task die of ``InternalClientError`` and of a
    terminated session: a pass that meets one is tried again, the task lives on."""
    state = _state()
    rec = Reconciler(pool, Settings(account="acc1"), state, {"acc1": RecordingBackend("acc1")},
                     None, interval=0.05)
    calls = 0
    errors = [asyncpg.InternalClientError("cannot switch to state 15"),
              asyncpg.ConnectionDoesNotExistError("connection was closed")]

    async def flaky() -> dict[str, Any]:
        nonlocal calls
        calls += 1
        if errors:
            raise errors.pop(0)
        state.request_stop()
        return {}

    rec.pass_once = flaky  # type: ignore[method-assign]
    with anyio.fail_after(10):
        await rec.run()
    assert calls == 3
