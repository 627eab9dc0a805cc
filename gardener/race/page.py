"""Serving the page from a command that runs the daemon in-process (the smoke race).

The configured port (``PORT``, 8080) when it is free, else any free one, so a second run on
one machine still starts; loopback unless ``GARDENER_HOST`` says otherwise, so a laptop run
does not publish the page. When trainers post their samples to the gardener, it listens
where they were told, as configured. The address is printed to stderr (and logged) once it
listens.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import structlog

from gardener.loop.control import LoopState
from gardener.settings import Settings
from gardener.view import page_address

log = structlog.get_logger("gardener.view")


def free_or_any(host: str, port: int) -> int:
    """``port`` if it can be bound on ``host`` now, else 0 (the system picks one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return 0
    return port


async def serve_with_page(
    serve: Callable[..., Awaitable[None]],
    settings: Settings,
    race: str,
    *,
    stop: anyio.Event,
    public: bool = False,
    **kwargs: Any,
) -> None:
    """Run ``serve`` (the daemon) with its HTTP face on and say where the race's page is.

    ``public``: trainers were told to post their samples to the configured address, so the
    daemon listens exactly there (``GARDENER_HOST``, ``PORT``).
    """
    if public:
        host = settings.host
    else:
        host = settings.host if "GARDENER_HOST" in os.environ else "127.0.0.1"
        settings = settings.model_copy(
            update={"host": host, "port": free_or_any(host, settings.port)})
    state = LoopState(stop=stop)

    async def announce() -> None:  # the daemon binds its socket first thing; say where
        while not stop.is_set():
            if state.http_port is not None:
                url = page_address(host, state.http_port, race)
                print(f"view: {url}", file=sys.stderr, flush=True)
                log.info("view_listening", url=url, race=race)
                return
            await anyio.sleep(0.05)

    async with anyio.create_task_group() as tg:
        tg.start_soon(announce)
        await serve(settings, stop=stop, state=state, http=True, **kwargs)
        tg.cancel_scope.cancel()
