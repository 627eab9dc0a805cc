"""The race view's JSON API and event stream through a real uvicorn on 127.0.0.1, over a real
PostgreSQL: what it shows, what it hides, who may see it, and how fast a change is announced."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import asyncpg
import httpx
import numpy as np
import pytest
import uvicorn
from pydantic import SecretStr
from starlette.applications import Starlette

from gardener import view
from gardener.core import canon
from gardener.core.decide import decide
from gardener.errors import ConfigError
from gardener.ledger import trials
from gardener.ledger.apply import apply_decisions
from gardener.ledger.snapshot import load_snapshot, race_info
from gardener.settings import Settings
from gardener.view import curves
from tests.integration.test_apply import CONFIG, RUNGS, add_samples, curve, make_race

SECRET_VARIABLE = "s3cret-variable-value"


@contextlib.asynccontextmanager
async def serve(
    pool: asyncpg.Pool, settings: Settings, stop: anyio.Event | None = None
) -> AsyncIterator[httpx.AsyncClient]:
    """The view's routes on a real uvicorn (a free loopback port) and an httpx client."""
    app = Starlette(routes=view.routes(pool, settings, stop=stop))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="off"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        for _ in range(200):
            if server.started:
                break
            await asyncio.sleep(0.01)
        assert server.started
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
            yield c
    finally:
        if stop is not None:
            stop.set()
        server.should_exit = True
        await asyncio.wait_for(task, 10)
        sock.close()


async def seed_races(conn: asyncpg.Connection) -> list[str]:
    """Race r-view (acc1, 6 trials, samples to step 45, one variable a secret would be in)
    and race r-other (acc2, 2 trials)."""
    names = await make_race(conn, "r-view", 6)
    await conn.execute(
        "UPDATE igla_race_trials SET variables = $1, service_id = 'svc-hidden' WHERE race = $2",
        {"API_KEY": SECRET_VARIABLE}, "r-view",
    )
    for i, name in enumerate(names):
        await add_samples(conn, name, curve(0.03 * i, 45, seed=i))
    await trials.ensure_race(conn, "r-other", "acc2", horizon=100)
    await trials.admit(conn, "r-other", "acc2", [
        trials.Admission(canon.CanonName("HYBRID", "FP32", ("WSD",), 900 + i, 900 + i), steps=100)
        for i in range(2)
    ])
    return names


async def decide_and_apply(conn: asyncpg.Connection, race: str) -> list[Any]:
    info = await race_info(conn, race)
    assert info is not None
    decisions = decide(await load_snapshot(conn, info, paused=False), CONFIG)
    await apply_decisions(conn, info.name, info.account, decisions)
    return decisions


async def test_races_and_one_race_with_fits_ranks_bands_and_no_secret(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    names = await seed_races(conn)
    async with serve(pool, Settings()) as c:
        races = (await c.get("/api/races")).json()
        by_name = {r["name"]: r for r in races["races"]}
        assert set(by_name) == {"r-view", "r-other"}
        assert by_name["r-view"]["trials"] == 6 and by_name["r-view"]["live"] == 6
        assert by_name["r-other"]["account"] == "acc2"

        r = await c.get("/api/races/r-view")
        assert r.status_code == 200
        body = r.json()
        assert body["race"]["rungs"] == list(RUNGS)
        assert body["race"]["horizon"] == RUNGS[-1]
        rows = body["trials"]
        assert [t["canon_name"] for t in rows] == names
        for t in rows:
            assert t["fit"]["ok"], t["fit"]
            p = t["predicted_final"]
            assert p["step"] == RUNGS[-1] and p["low"] < p["mean"] < p["high"]
            assert t["last_step"] == 45 and t["samples"] == 9 and t["account"] == "acc1"
            assert "points" not in t and "band" not in t
        # Rank 1 is the lowest predicted final; the curves were built with rising offsets.
        by_rank = sorted(rows, key=lambda t: t["rank"])
        assert [t["rank"] for t in by_rank] == [1, 2, 3, 4, 5, 6]
        means = [t["predicted_final"]["mean"] for t in by_rank]
        assert means == sorted(means)
        assert by_rank[0]["canon_name"] == names[0]

        cv = (await c.get("/api/races/r-view/curves")).json()
        assert [x["canon_name"] for x in cv["curves"]] == names
        for x in cv["curves"]:
            assert x["points"]["step"] == list(range(5, 46, 5))
            band = x["band"]
            assert band["step"][-1] == RUNGS[-1] and len(band["step"]) == curves.BAND_POINTS
            assert all(lo <= m <= hi for lo, m, hi in
                       zip(band["low"], band["mean"], band["high"], strict=True))
        everything = "".join([r.text, json.dumps(cv), json.dumps(races)])
        assert SECRET_VARIABLE not in everything and "svc-hidden" not in everything
        assert "variables" not in everything

        missing = await c.get("/api/races/no-such-race")
        assert missing.status_code == 404 and missing.json() == {"error": "no race 'no-such-race'"}


async def test_decisions_feed_and_pruned_trials(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    await seed_races(conn)
    async with serve(pool, Settings()) as c:
        assert (await c.get("/api/races/r-view/decisions")).json()["decisions"] == []
        made = await decide_and_apply(conn, "r-view")
        pruned = {d.canon_name for d in made if d.action.value == "prune"}
        assert pruned
        feed = (await c.get("/api/races/r-view/decisions")).json()["decisions"]
        assert len(feed) == len(made)
        assert [d["id"] for d in feed] == sorted(d["id"] for d in feed)
        first = feed[0]
        assert first["reason"] and first["numbers"] and first["applied"] is True
        assert {d["canon_name"] for d in feed if d["action"] == "prune"} == pruned
        after = (await c.get(f"/api/races/r-view/decisions?after={feed[1]['id']}")).json()
        assert [d["id"] for d in after["decisions"]] == [d["id"] for d in feed[2:]]
        latest = (await c.get("/api/races/r-view/decisions?limit=2")).json()["decisions"]
        assert [d["id"] for d in latest] == [d["id"] for d in feed[-2:]]

        rows = (await c.get("/api/races/r-view")).json()["trials"]
        assert {t["canon_name"] for t in rows if t["pruned"]} == pruned
        assert {t["state"] for t in rows if t["pruned"]} == {"pruned"}
        assert all(t["seed_state"] for t in rows)  # the decisions recorded seed states
        cv = (await c.get("/api/races/r-view/curves")).json()["curves"]
        assert {x["canon_name"] for x in cv if x["pruned"]} == pruned

        bad = await c.get("/api/races/r-view/decisions?limit=abc")
        assert bad.status_code == 400 and "limit must be an integer" in bad.json()["error"]
        big = await c.get("/api/races/r-view/decisions?limit=5000")
        assert big.status_code == 400 and "limit must be in 1..1000" in big.json()["error"]
        gone = await c.get("/api/races/nope/decisions")
        assert gone.status_code == 404


async def test_the_token_is_asked_for_and_compared(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    await seed_races(conn)
    settings = Settings(view_token=SecretStr("v1ew-t0ken"))
    async with serve(pool, settings) as c:
        page = await c.get("/")
        assert page.status_code == 200 and "app.js" in page.text  # the page asks for it
        assert (await c.get("/static/app.js")).status_code == 200
        assert (await c.get("/api/meta")).json() == {"token_required": True, "account": None}
        for path in ("/api/races", "/api/races/r-view", "/api/races/r-view/curves",
                     "/api/races/r-view/decisions", "/api/events"):
            assert (await c.get(path)).status_code == 401, path
            wrong = await c.get(path, headers={"Authorization": "Bearer v1ew-t0keN"})
            assert wrong.status_code == 401, path
        ok = await c.get("/api/races", headers={"Authorization": "Bearer v1ew-t0ken"})
        assert ok.status_code == 200 and len(ok.json()["races"]) == 2
        c.cookies.set("gardener_view_token", "v1ew-t0ken")
        assert (await c.get("/api/races/r-view")).status_code == 200
        assert "v1ew-t0ken" not in (await c.get("/api/meta")).text


async def test_one_account_deployment_sees_only_its_races(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    await seed_races(conn)
    async with serve(pool, Settings(view_account="acc2")) as c:
        races = (await c.get("/api/races")).json()
        assert races["account"] == "acc2"
        assert [r["name"] for r in races["races"]] == ["r-other"]
        for path in ("/api/races/r-view", "/api/races/r-view/curves",
                     "/api/races/r-view/decisions"):
            assert (await c.get(path)).status_code == 404, path
        other = (await c.get("/api/races/r-other")).json()
        assert {t["account"] for t in other["trials"]} == {"acc2"}
        # No sample yet: listed, not fitted, not ranked.
        assert all(t["predicted_final"] is None and t["rank"] is None for t in other["trials"])


async def test_an_unknown_view_account_is_refused_at_start(pool: asyncpg.Pool) -> None:
    with pytest.raises(ConfigError, match="GARDENER_VIEW_ACCOUNT 'acc9' is not a known account"):
        view.routes(pool, Settings(view_account="acc9"))


async def _next_change(lines: AsyncIterator[str]) -> dict[str, Any]:
    event = None
    async for line in lines:
        if line.startswith("event: "):
            event = line[len("event: "):]
        elif line.startswith("data: ") and event == "change":
            return dict(json.loads(line[len("data: "):]))
    raise AssertionError("the stream ended")


async def test_a_committed_decision_is_announced_within_a_second_and_streams_end_on_stop(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    await seed_races(conn)
    stop = anyio.Event()
    async with serve(pool, Settings(), stop=stop) as c:
        async with c.stream("GET", "/api/events") as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            lines = stream.aiter_lines()
            first = await _next_change(lines)
            assert set(first) == {"samples", "decisions", "tripwires", "trials", "races"}
            await decide_and_apply(conn, "r-view")
            committed = time.monotonic()
            with anyio.fail_after(5):
                second = await _next_change(lines)
            latency = time.monotonic() - committed
            assert second["decisions"] > first["decisions"]
            assert latency < 1.0, latency
            stop.set()  # the daemon stopping ends every stream
            with anyio.fail_after(3):
                async for _ in lines:
                    pass


def test_thinning_keeps_the_ends_and_the_horizon_covers_what_was_seen() -> None:
    assert list(curves.thin(5, 10)) == [0, 1, 2, 3, 4]
    idx = curves.thin(5000, 100)
    assert idx[0] == 0 and idx[-1] == 4999 and len(idx) <= 100
    assert np.all(np.diff(idx) > 0)
    s = curves.Series("a", np.array([10, 20, 700]), np.array([3.0, 2.9, 2.8]))
    assert curves.horizon_of(None, (100, 500), [s]) == 700
    assert curves.horizon_of(1000, (100, 500), [s]) == 1000
    assert curves.horizon_of(None, (), []) == 1


def test_a_big_race_gets_fewer_points_per_curve() -> None:
    assert curves.budget(6) == (curves.BAND_POINTS, curves.MAX_POINTS)
    assert curves.budget(1000) == (curves.BAND_POINTS // 2, 40)
    steps = np.arange(10, 3010, 10)
    many = [curves.Series(f"t{i}", steps, 2.0 + 0.001 * i + 1.5 * steps ** -0.3)
            for i in range(1000)]
    out = curves.compute(many, 5000)
    assert all(30 <= len(c["points"]["step"]) <= 40 for c in out)  # duplicates merged
    assert {len(c["band"]["step"]) for c in out} == {curves.BAND_POINTS // 2}
    assert all(c["points"]["step"][0] == 10 and c["points"]["step"][-1] == 3000 for c in out)


def test_a_curve_that_cannot_be_fitted_is_shown_with_its_reason_and_ranked_by_its_value() -> None:
    good = curves.Series("good", np.arange(10, 110, 10), 2.0 + 1.2 * np.arange(10, 110, 10) ** -0.3)
    short = curves.Series("short", np.array([10, 20]), np.array([2.5, 2.4]))
    empty = curves.Series("empty", np.zeros(0, np.int64), np.zeros(0))
    out = {c["canon_name"]: c for c in curves.compute([good, short, empty], 500)}
    assert out["good"]["fit"]["ok"] and out["good"]["rank"] == 1
    assert out["short"]["fit"]["ok"] is False and "fewer than 4" in out["short"]["fit"]["reason"]
    assert out["short"]["band"] is None and out["short"]["predicted_final"] is None
    assert out["short"]["rank"] == 2
    assert out["empty"]["rank"] is None and out["empty"]["last_step"] is None


@pytest.mark.parametrize("host,expected", [
    ("0.0.0.0", "http://127.0.0.1:8080/#race=r1"),
    ("10.0.0.5", "http://10.0.0.5:8080/#race=r1"),
    ("::1", "http://[::1]:8080/#race=r1"),
])
def test_page_address(host: str, expected: str) -> None:
    assert view.page_address(host, 8080, "r1") == expected
