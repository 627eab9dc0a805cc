"""The daemon's HTTP face: /healthz, /readyz, /metrics, ingest's POST /v1/samples, the view.

/healthz says the process is alive (the event loop answers). /readyz checks the database
(one query), that every migration is applied, and reports the role (leader or standby) in
JSON; it answers 503 when the database is unreachable or behind, and on a standby whose
leader is gone (its lease ran out: ``leader_gone``), so a partitioned leader is never
silent; otherwise a standby stays ready (it serves ingest). /metrics renders the default
Prometheus registry: the loop's, ingest's and the backends' metrics. uvicorn runs inside
the daemon's task group on a socket the daemon binds itself, with uvicorn's own signal
handling turned off (the daemon owns it).
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Generator
from typing import Any

import anyio
import asyncpg
import structlog
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from gardener import view
from gardener.ingest import http as ingest_http
from gardener.ingest.writer import SampleWriter
from gardener.ledger import migrate
from gardener.loop.control import LoopState
from gardener.settings import Settings

log = structlog.get_logger("gardener.loop.http")  # lazy: resolved after logs.configure


def ingest_routes(writer: SampleWriter, settings: Settings) -> list[BaseRoute]:
    """Ingest's ``POST /v1/samples`` (gardener/ingest/http.py)."""
    return list(ingest_http.routes(writer, settings))


def view_routes(pool: asyncpg.Pool, settings: Settings, state: LoopState) -> list[BaseRoute]:
    """The race view (``/`` and ``/api/*``, gardener/view); its event streams end on stop."""
    return view.routes(pool, settings, stop=state.stop)


def make_app(
    state: LoopState,
    pool: asyncpg.Pool,
    *,
    extra_routes: list[BaseRoute] | None = None,
) -> Starlette:
    async def healthz(_: Request) -> JSONResponse:
        return JSONResponse({"status": "alive", "role": state.role})

    async def readyz(_: Request) -> JSONResponse:
        body: dict[str, Any] = {
            "role": state.role,
            "leader_gone": state.leader_gone,
            "paused": state.paused,
            "last_tick_at": state.last_tick_at,
            "last_reconcile_at": state.last_reconcile_at,
        }
        try:
            with anyio.fail_after(5):
                async with pool.acquire() as conn:
                    await conn.fetchval("SELECT 1")
                    pending = await migrate.pending(conn)
        except Exception as exc:  # any failure here means not ready; say which
            body |= {"ready": False, "database": f"unreachable: {type(exc).__name__}"}
            return JSONResponse(body, status_code=503)
        ready = not pending and state.role in ("leader", "standby") and not state.leader_gone
        body |= {"ready": ready, "database": "ok", "pending_migrations": pending}
        if state.leader_gone:
            body["reason"] = "standby: the leader's lease ran out; taking over"
        return JSONResponse(body, status_code=200 if ready else 503)

    async def metrics_endpoint(_: Request) -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    routes: list[BaseRoute] = [
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics_endpoint),
        *(extra_routes or []),
    ]
    return Starlette(routes=routes)


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers: SIGTERM belongs to the daemon."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def bind(host: str, port: int) -> socket.socket:
    """Bind the listening socket first, so port 0 works and the real port is known."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(512)
    sock.setblocking(False)
    return sock


async def serve_http(app: Starlette, sock: socket.socket, state: LoopState) -> None:
    """Serve until the stop event, then let in-flight requests finish."""
    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off")
    server = _Server(config)

    async def stopper() -> None:
        await state.stop.wait()
        server.should_exit = True

    async with anyio.create_task_group() as tg:
        tg.start_soon(stopper)
        await server.serve(sockets=[sock])
        tg.cancel_scope.cancel()
