"""``POST /v1/samples``: trainers (or anything else) post samples over HTTP.

Authentication is a bearer token per account (``GARDENER_INGEST_TOKEN_<ACCOUNT>``), mapped to
its account once when the routes are built. A token may only write its own account's trials:
a sample for another account's trial is refused *per item* (reason ``cross_account``, and it
is quarantined like every refusal), so one mixed request still lands its own samples.

Body (JSON object), either or both of:
  ``{"samples": [{"canon_name": ..., "step": N, "bpb": X, "ts": ...?}, ...]}``
  ``{"canon_name": ..., "lines": ["step=10 BPB=2.3456", ...]}``
Answers: 200 with one result per item (``accepted``, ``duplicate``, ``rejected`` with code
and reason, ``corpus``, ``done``, ``ignored``) and the counts; 400 for a body that is not
that shape; 401 for a missing or unknown token; 408 for a body not received within
``body_timeout`` seconds (a stalled client does not hold a request open forever); 413 for
more than ``max_items`` items or ``max_body`` bytes; 503 when the ledger cannot be written
(retry: a re-sent sample already stored comes back ``duplicate``).
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections import Counter
from typing import Any

import asyncpg
import structlog
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from gardener.errors import ConfigError
from gardener.ingest import parse as P
from gardener.ingest.writer import SampleWriter, SubmitResult, WriterClosed
from gardener.settings import Settings

MAX_ITEMS = 10_000
MAX_BODY = 8 * 1024 * 1024
BODY_TIMEOUT = 30.0  # seconds for the whole body: a client that stalls is answered 408
SOURCE = "http"
log = structlog.get_logger("gardener.ingest.http")


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def token_map(settings: Settings) -> dict[bytes, str]:
    """Token -> account for every account that has an ingest token; a token shared by two
    accounts could not say whose samples it carries, so it is refused at start."""
    out: dict[bytes, str] = {}
    for account in settings.accounts:
        secret = settings.ingest_token(account)
        if secret is None:
            continue
        token = secret.get_secret_value().encode()
        if token in out:
            raise ConfigError(f"accounts {out[token]} and {account} share one ingest token")
        out[token] = account
    return out


def _authenticate(request: Request, tokens: dict[bytes, str]) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        return None
    candidate = given.strip().encode()
    found: str | None = None
    for token, account in tokens.items():  # compare with every token, in constant time each
        if hmac.compare_digest(candidate, token):
            found = account
    return found


async def _read_body(request: Request, max_body: int, within: float = BODY_TIMEOUT) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_body:
        raise _BadRequest(413, f"body of {declared} bytes is over the {max_body} byte limit")
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(within):
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_body:
                    raise _BadRequest(413, f"body is over the {max_body} byte limit")
                chunks.append(chunk)
    except TimeoutError:
        raise _BadRequest(408, f"body not received within {within:g} s") from None
    return b"".join(chunks)


def _shape(body: bytes, max_items: int) -> tuple[list[Any] | None, str | None, list[str] | None]:
    """The samples list and the (canon_name, lines) pair of a body, or a 400/413."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise _BadRequest(400, f"body is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise _BadRequest(400, "body must be a JSON object")
    unknown = set(doc) - {"samples", "canon_name", "lines"}
    if unknown:
        raise _BadRequest(400, f"unknown fields {sorted(unknown)}")
    samples = doc.get("samples")
    lines = doc.get("lines")
    name = doc.get("canon_name")
    if samples is None and lines is None:
        raise _BadRequest(400, 'body needs "samples" or "canon_name" with "lines"')
    if samples is not None and not isinstance(samples, list):
        raise _BadRequest(400, '"samples" must be a list')
    if lines is not None:
        if not isinstance(lines, list) or not all(isinstance(x, str) for x in lines):
            raise _BadRequest(400, '"lines" must be a list of strings')
        if not isinstance(name, str) or not name:
            raise _BadRequest(400, '"lines" need "canon_name", a non-empty string')
    elif name is not None:
        raise _BadRequest(400, '"canon_name" at the top level goes with "lines"')
    total = len(samples or ()) + len(lines or ())
    if total > max_items:
        raise _BadRequest(413, f"{total} items is over the {max_items} item limit")
    return samples, name, lines


def routes(
    writer: SampleWriter,
    settings: Settings,
    *,
    max_items: int = MAX_ITEMS,
    max_body: int = MAX_BODY,
    body_timeout: float = BODY_TIMEOUT,
) -> list[Route]:
    """The ingest routes for the daemon's Starlette app."""
    tokens = token_map(settings)
    if not tokens:
        log.warning(
            "ingest_no_tokens", note="no GARDENER_INGEST_TOKEN_<ACCOUNT>: every post is 401"
        )

    async def post_samples(request: Request) -> JSONResponse:
        account = _authenticate(request, tokens)
        if account is None:
            return JSONResponse(
                {"error": "missing or unknown bearer token"},
                status_code=401,
                headers={"WWW-Authenticate": 'Bearer realm="gardener"'},
            )
        try:
            body = await _read_body(request, max_body, body_timeout)
            samples, name, lines = _shape(body, max_items)
        except _BadRequest as exc:
            close = {"Connection": "close"} if exc.status in (408, 413) else None
            return JSONResponse({"error": str(exc)}, status_code=exc.status, headers=close)
        except ClientDisconnect:
            return JSONResponse({"error": "client went away"}, status_code=400)
        calls = []
        if samples is not None:
            parsed = [P.parse_structured(item) for item in samples]
            calls.append(writer.submit_samples(parsed, SOURCE, account=account))
        if lines is not None:
            assert name is not None
            calls.append(writer.submit_lines(name, lines, SOURCE, account=account))
        try:
            done: list[SubmitResult] = list(await asyncio.gather(*calls))
        except (WriterClosed, asyncpg.PostgresError, OSError, asyncpg.InterfaceError) as exc:
            log.warning("ingest_unavailable", error=str(exc) or type(exc).__name__)
            return JSONResponse(
                {"error": "the ledger cannot be written now; retry (re-sending is safe)"},
                status_code=503,
                headers={"Retry-After": "1"},
            )
        counts: Counter[str] = Counter()
        answer: dict[str, Any] = {"account": account}
        keys = [k for k, v in (("samples", samples), ("lines", lines)) if v is not None]
        for key, res in zip(keys, done, strict=True):
            counts.update(r.status for r in res.items)
            answer[key] = [r.as_json() for r in res.items]
        answer["counts"] = dict(counts)
        return JSONResponse(answer)

    return [Route("/v1/samples", post_samples, methods=["POST"])]
