"""structlog set-up: JSON lines when not on a terminal, readable output on one.

Every event has a name and bound context; values that look like secrets are masked before
rendering, so a token can never reach the logs even if someone binds it by mistake: a key
that names a secret is masked whole, a password inside a URL is masked, and the values of
the secret environment variables (tokens, database URLs) are masked wherever they appear,
exception text and tracebacks included.

In JSON an exception is a structured field (``exception``: type, message, frames), never a
multi-line traceback; records of the standard ``logging`` module (uvicorn, asyncio's "Task
exception was never retrieved") and an uncaught exception go through the same renderer, so
every line the daemon prints is one JSON object.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
from collections.abc import Iterable, MutableMapping
from types import TracebackType
from typing import Any

import structlog

_SECRET_KEYS = re.compile(r"(token|password|secret|authorization|dsn|database_url)", re.I)
_URL_PASSWORD = re.compile(r"(\w+://[^:/@\s]+:)([^@\s]+)(@)")
_SECRET_ENV = re.compile(r"(TOKEN|PASSWORD|SECRET|DATABASE_URL|DSN)", re.I)
_MIN_SECRET = 6  # shorter values would mask ordinary words
_secrets: set[str] = set()


def register_secrets(values: Iterable[str | None]) -> None:
    """Values to mask wherever they appear in a log line (tokens, passwords)."""
    for value in values:
        if value and len(value) >= _MIN_SECRET:
            _secrets.add(value)


def _environment_secrets() -> list[str]:
    out: list[str] = []
    for name, value in os.environ.items():
        if _SECRET_ENV.search(name):
            out.append(value)
            m = _URL_PASSWORD.search(value)
            if m:
                out.append(m.group(2))
    return out


def mask_text(text: str) -> str:
    text = _URL_PASSWORD.sub(r"\1***\3", text)
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, "***")
    return text


def _mask(value: Any) -> Any:
    if isinstance(value, str):
        return mask_text(value)
    if isinstance(value, dict):
        return {k: _mask(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_mask(v) for v in value]
    return value


def redact_secrets(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Mask secret-looking keys, passwords inside URLs and known secret values."""
    for key in list(event):
        if _SECRET_KEYS.search(key):
            event[key] = "***"
        else:
            event[key] = _mask(event[key])
    return event


def configure(fmt: str = "auto", level: str = "info", stream: Any = None) -> None:
    """Configure structlog (and the standard ``logging`` module) once for the process."""
    stream = stream or sys.stdout
    register_secrets(_environment_secrets())
    use_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    # Exceptions become data first, then everything (their text included) is masked.
    exc_step: Any = (
        structlog.processors.ExceptionRenderer(
            structlog.tracebacks.ExceptionDictTransformer(show_locals=False, max_frames=20)
        )
        if use_json
        else structlog.processors.StackInfoRenderer()
    )
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    numeric = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    structlog.configure(
        processors=[*shared, exc_step, redact_secrets, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    _route_stdlib(stream, shared, exc_step, renderer, max(numeric, logging.WARNING))


class _Handler(logging.StreamHandler):
    """Stdlib records rendered like structlog events; never raises into the caller."""

    def handleError(self, record: logging.LogRecord) -> None:
        pass


def _route_stdlib(stream: Any, shared: list[Any], exc_step: Any, renderer: Any,
                  level: int) -> None:
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            exc_step,
            redact_secrets,
            renderer,
        ],
    )
    handler = _Handler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "asyncio"):
        # Whatever configured these before (uvicorn's own defaults print plain text to
        # stderr), their records go to the root's one renderer.
        named = logging.getLogger(name)
        named.handlers.clear()
        named.propagate = True
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_thread_uncaught


def _log_uncaught(
    et: type[BaseException], e: BaseException, tb: TracebackType | None
) -> None:
    """An exception nobody caught: one JSON event, not a traceback on stderr."""
    if issubclass(et, KeyboardInterrupt):
        sys.__excepthook__(et, e, tb)
        return
    structlog.get_logger("gardener").critical("uncaught_exception", exc_info=(et, e, tb))


def _log_thread_uncaught(args: threading.ExceptHookArgs) -> None:
    if args.exc_value is None:
        return
    structlog.get_logger("gardener").critical(
        "uncaught_exception",
        thread=args.thread.name if args.thread else None,
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
    )


def get_logger(name: str, **context: Any) -> Any:
    """A lazy logger: it follows ``configure`` even when created at import time."""
    return structlog.get_logger(logger_name=name, **context)
