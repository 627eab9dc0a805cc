"""The view's routes: the page (static files) and its read-only JSON API, with live updates.

``GET /`` and ``/static/*`` are the page; they carry no data and are served to anyone, so the
page can ask for the token. Everything under ``/api`` needs ``GARDENER_VIEW_TOKEN`` when it is
set: as ``Authorization: Bearer <token>`` (tools) or the ``gardener_view_token`` cookie (the
page sets it; an ``EventSource`` cannot send headers), compared in constant time.

Live updates are server-sent events (``GET /api/events``): every ``POLL_S`` the stream looks at
the ledger's watermarks (one query shared by every open page) and sends a ``change`` event
when any moved; the page then fetches what it shows. A stream ends when the daemon stops.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import anyio
import asyncpg
import structlog
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from gardener.errors import ConfigError
from gardener.settings import Settings
from gardener.view.data import ViewData

STATIC = Path(__file__).resolve().parent / "static"
COOKIE = "gardener_view_token"
POLL_S = 0.25  # how often an event stream looks at the watermarks
KEEPALIVE_S = 15.0  # a comment line this often keeps proxies from closing an idle stream
MAX_LIMIT = 1000
log = structlog.get_logger("gardener.view")

_NO_CACHE = {"Cache-Control": "no-store"}


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=_NO_CACHE)


def _authorised(request: Request, token: bytes | None) -> bool:
    if token is None:
        return True
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    candidates = []
    if scheme.lower() == "bearer" and given.strip():
        candidates.append(given.strip())
    cookie = request.cookies.get(COOKIE)
    if cookie:
        candidates.append(unquote(cookie))
    ok = False
    for c in candidates:  # compare every candidate, each in constant time
        ok |= hmac.compare_digest(c.encode(), token)
    return ok


def _int_param(request: Request, name: str, default: int | None, lo: int, hi: int) -> int | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise _BadParam(f"{name} must be an integer, got {raw!r}") from None
    if not lo <= value <= hi:
        raise _BadParam(f"{name} must be in {lo}..{hi}, got {value}")
    return value


class _BadParam(Exception):
    pass


def _dumps(body: Any) -> bytes:
    return json.dumps(body, separators=(",", ":"), allow_nan=False).encode()


def _json(body: Any) -> Response:
    return Response(_dumps(body), media_type="application/json", headers=_NO_CACHE)


CURVE_KEYS = ("points", "band")


def routes(
    pool: asyncpg.Pool, settings: Settings, *, stop: anyio.Event | None = None
) -> list[BaseRoute]:
    """The page and ``/api/*`` for the daemon's Starlette app (``stop`` ends event streams)."""
    if settings.view_account is not None and settings.view_account not in settings.accounts:
        raise ConfigError(f"GARDENER_VIEW_ACCOUNT {settings.view_account!r} is not a known "
                          f"account (known: {', '.join(settings.accounts)})")
    data = ViewData(pool, settings)
    secret = settings.view_token
    token = secret.get_secret_value().encode() if secret is not None else None
    stopping = stop or anyio.Event()

    def guarded(handler: Any) -> Any:
        async def endpoint(request: Request) -> Response:
            if not _authorised(request, token):
                return JSONResponse(
                    {"error": "this view needs its token (GARDENER_VIEW_TOKEN)"},
                    status_code=401,
                    headers={"WWW-Authenticate": 'Bearer realm="gardener view"', **_NO_CACHE},
                )
            try:
                response: Response = await handler(request)
                return response
            except _BadParam as exc:
                return _error(400, str(exc))
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("view_unavailable", error=str(exc) or type(exc).__name__)
                return _error(503, "the ledger cannot be read now; retry")

        return endpoint

    async def page(_: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers=_NO_CACHE)

    async def meta(_: Request) -> Response:
        # Unguarded on purpose: tells the page whether to ask for a token; no data.
        return _json({"token_required": token is not None, "account": settings.view_account})

    async def races(_: Request) -> Response:
        return _json({"account": settings.view_account, "races": await data.races()})

    def render_detail(view: dict[str, Any]) -> bytes:
        trials = [{k: v for k, v in t.items() if k not in CURVE_KEYS} for t in view["trials"]]
        return _dumps({**view, "trials": trials})

    def render_curves(view: dict[str, Any]) -> bytes:
        race_info = view["race"]
        return _dumps({
            "race": race_info["name"],
            "horizon": race_info["horizon"],
            "rungs": race_info["rungs"],
            "level": race_info["level"],
            "curves": [
                {
                    "canon_name": t["canon_name"],
                    "seed_state": t["seed_state"],
                    "pruned": t["pruned"],
                    "points": t["points"],
                    "band": t["band"],
                }
                for t in view["trials"]
            ],
        })

    async def race(request: Request) -> Response:
        name = request.path_params["name"]
        body = await data.race_part(name, "detail", render_detail)
        if body is None:
            return _error(404, f"no race {name!r}")
        return Response(body, media_type="application/json", headers=_NO_CACHE)

    async def race_curves(request: Request) -> Response:
        name = request.path_params["name"]
        body = await data.race_part(name, "curves", render_curves)
        if body is None:
            return _error(404, f"no race {name!r}")
        return Response(body, media_type="application/json", headers=_NO_CACHE)

    async def decisions(request: Request) -> Response:
        name = request.path_params["name"]
        after = _int_param(request, "after", None, 0, 2**63 - 1)
        limit = _int_param(request, "limit", 200, 1, MAX_LIMIT)
        assert limit is not None
        found = await data.decisions(name, after=after, limit=limit)
        if found is None:
            return _error(404, f"no race {name!r}")
        return _json({"race": name, "decisions": found})

    async def events(request: Request) -> Response:
        async def stream() -> AsyncIterator[bytes]:
            yield b"retry: 1000\n\n"
            last: dict[str, Any] | None = None
            quiet = 0.0
            while not stopping.is_set():
                marks: dict[str, Any] | None
                try:
                    marks = await data.watermarks()
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                    log.warning("view_events_unavailable", error=str(exc) or type(exc).__name__)
                    marks = last
                if marks is not None and marks != last:
                    yield b"event: change\ndata: " + _dumps(marks) + b"\n\n"
                    last, quiet = marks, 0.0
                elif quiet >= KEEPALIVE_S:
                    yield b": keepalive\n\n"
                    quiet = 0.0
                with anyio.move_on_after(POLL_S):
                    await stopping.wait()
                quiet += POLL_S
                if await request.is_disconnected():  # a closed tab stops its own stream
                    return

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    return [
        Route("/", page),
        Route("/api/meta", meta),
        Route("/api/races", guarded(races)),
        Route("/api/races/{name}", guarded(race)),
        Route("/api/races/{name}/curves", guarded(race_curves)),
        Route("/api/races/{name}/decisions", guarded(decisions)),
        Route("/api/events", guarded(events)),
        Mount("/static", app=StaticFiles(directory=STATIC), name="view-static"),
    ]
