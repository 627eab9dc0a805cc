"""The Railway GraphQL client: one POST per operation, typed errors, retries, a request budget.

Behaviour, in the order a request meets it:
- the budget: a sliding window of requests per hour (default 1000, the Hobby plan) on an
  injected clock; when it is spent the client raises ``BudgetExhausted`` without sending;
- the request: ``Authorization: Bearer <token>``, JSON ``{query, variables, operationName}``,
  variables whose value is None left out (Railway reads null as "unset this field");
- the answer: 429 honours ``Retry-After``; 5xx, timeouts, transport errors and HTML bodies are
  temporary and retried with exponential backoff and jitter (tenacity); GraphQL ``errors`` in a
  200 become typed errors ("Not Authorized" is permanent). An operation that is not idempotent
  (serviceCreate, serviceInstanceDeployV2) is retried only when the server certainly did not
  run it (429, refused connection); otherwise the caller gets a ``TemporaryBackendError`` with
  ``maybe_applied=True`` and looks before trying again.
The token is never logged and never part of ``repr``.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import httpx
import structlog
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

from gardener.backends.base import (
    BudgetExhausted,
    NameTaken,
    NotAuthorized,
    NotFound,
    PermanentBackendError,
    TemporaryBackendError,
)
from gardener.backends.metrics import REQUESTS
from gardener.backends.railway.documents import DOCUMENTS, IDEMPOTENT

DEFAULT_URL = "https://backboard.railway.com/graphql/v2"
log = structlog.get_logger("gardener.backends.railway")

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


class RequestBudget:
    """At most ``per_hour`` requests in any sliding window of ``window`` seconds, and at most
    ``per_second`` in any second (Hobby: 1000/h and 10/s)."""

    def __init__(
        self, per_hour: int = 1000, *, per_second: int | None = 10, window: float = 3600.0,
        clock: Clock = time.monotonic,
    ) -> None:
        if per_hour < 1 or (per_second is not None and per_second < 1):
            raise ValueError("a request budget needs at least one request per window")
        self.per_hour = per_hour
        self.per_second = per_second
        self.window = window
        self._clock = clock
        self._sent: deque[float] = deque()

    def _trim(self, now: float) -> None:
        while self._sent and self._sent[0] <= now - self.window:
            self._sent.popleft()

    def try_acquire(self) -> float | None:
        """Take one request: None when granted, else the seconds until one frees."""
        now = self._clock()
        self._trim(now)
        if len(self._sent) >= self.per_hour:
            return self._sent[0] + self.window - now
        self._sent.append(now)
        return None

    def second_wait(self) -> float:
        """Seconds to wait before the next request keeps the per-second rate (0: go now)."""
        if self.per_second is None or len(self._sent) < self.per_second:
            return 0.0
        now = self._clock()
        oldest = self._sent[-self.per_second]
        return max(0.0, oldest + 1.0 - now)

    @property
    def remaining(self) -> int:
        self._trim(self._clock())
        return self.per_hour - len(self._sent)


class _Retryable(Exception):
    """One failed attempt that may succeed if repeated."""

    def __init__(
        self, message: str, *, outcome: str, retry_after: float | None = None,
        maybe_applied: bool = True,
    ) -> None:
        super().__init__(message)
        self.outcome = outcome
        self.retry_after = retry_after
        self.maybe_applied = maybe_applied


_TEMPORARY_MESSAGE = re.compile(
    r"internal|try again|timed? ?out|temporar|unavailable|overload", re.I
)
_RATE_LIMITED = re.compile(r"rate limit|too many requests", re.I)
_NOT_FOUND = re.compile(r"not found|does not exist|no such", re.I)


def drop_none(value: Any) -> Any:
    """Leave out keys whose value is None, recursively (never send a variable as null)."""
    if isinstance(value, Mapping):
        return {k: drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [drop_none(v) for v in value]
    return value


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds (Railway sends an integer); None when absent or unreadable."""
    if value is None:
        return None
    try:
        return max(0.0, float(value.strip()))
    except ValueError:
        return None


class RailwayClient:
    """Sends the documents of ``documents.py`` to one endpoint with one account's token."""

    def __init__(
        self,
        token: str,
        *,
        base_url: str = DEFAULT_URL,
        timeout: float = 30.0,
        budget: RequestBudget | None = None,
        max_attempts: int = 4,
        backoff_base: float = 0.5,
        backoff_max: float = 8.0,
        max_inline_wait: float = 10.0,
        sleep: Sleep = asyncio.sleep,
        rng: random.Random | None = None,
        label: str = "railway",
    ) -> None:
        if not token:
            raise PermanentBackendError("a Railway token is required")
        self.__token = token
        self.base_url = base_url
        self.budget = budget if budget is not None else RequestBudget()
        self.max_attempts = max_attempts
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.max_inline_wait = max_inline_wait
        self._sleep = sleep
        self._rng = rng or random.Random()
        self.label = label
        self.requests_sent = 0
        self._http = httpx.AsyncClient(timeout=timeout)

    def __repr__(self) -> str:
        return f"RailwayClient(base_url={self.base_url!r}, token=***)"

    async def aclose(self) -> None:
        await self._http.aclose()

    async def execute(self, operation: str, variables: Mapping[str, Any] | None = None) -> Any:
        """Run one named operation and return its ``data``; raise a typed backend error."""
        query = DOCUMENTS[operation]
        body = {
            "query": query,
            "variables": drop_none(dict(variables or {})),
            "operationName": operation,
        }
        idempotent = operation in IDEMPOTENT

        def should_retry(exc: BaseException) -> bool:
            if not isinstance(exc, _Retryable):
                return False
            if exc.retry_after is not None and exc.retry_after > self.max_inline_wait:
                return False
            return idempotent or not exc.maybe_applied

        def wait(state: RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            if isinstance(exc, _Retryable) and exc.retry_after is not None:
                return exc.retry_after
            cap = min(self.backoff_max, self.backoff_base * 2 ** (state.attempt_number - 1))
            return self._rng.uniform(0, cap)  # full jitter

        retrying = AsyncRetrying(
            retry=retry_if_exception(should_retry),
            stop=stop_after_attempt(self.max_attempts),
            wait=wait,
            sleep=self._sleep,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    return await self._attempt(operation, body)
        except _Retryable as exc:
            log.warning(
                "railway_request_gave_up", operation=operation, outcome=exc.outcome,
                retry_after=exc.retry_after, maybe_applied=exc.maybe_applied,
            )
            raise TemporaryBackendError(
                f"{operation}: {exc}", retry_after=exc.retry_after, maybe_applied=exc.maybe_applied
            ) from None
        raise AssertionError("unreachable")  # pragma: no cover

    async def _attempt(self, operation: str, body: dict[str, Any]) -> Any:
        pause = self.budget.second_wait()
        if pause > 0:
            await self._sleep(pause)
        wait = self.budget.try_acquire()
        if wait is not None:
            log.warning("railway_budget_exhausted", operation=operation, retry_after=wait)
            raise BudgetExhausted(
                f"request budget of {self.budget.per_hour}/h spent", retry_after=wait
            )
        self.requests_sent += 1
        outcome = "ok"
        try:
            data = await self._send(operation, body)
            return data
        except _Retryable as exc:
            outcome = exc.outcome
            raise
        except NotAuthorized:
            outcome = "not_authorized"
            raise
        except PermanentBackendError:
            outcome = "graphql_error"
            raise
        finally:
            REQUESTS.labels(self.label, operation, outcome).inc()

    async def _send(self, operation: str, body: dict[str, Any]) -> Any:
        headers = {"Authorization": f"Bearer {self.__token}", "Content-Type": "application/json"}
        try:
            resp = await self._http.post(self.base_url, json=body, headers=headers)
        except httpx.TimeoutException as exc:
            raise _Retryable(f"timed out ({type(exc).__name__})", outcome="timeout") from None
        except httpx.ConnectError:
            raise _Retryable("connection refused", outcome="transport_error",
                             maybe_applied=False) from None
        except httpx.TransportError as exc:
            raise _Retryable(f"transport error ({type(exc).__name__})",
                             outcome="transport_error") from None
        if resp.status_code == 429:
            raise _Retryable(
                "rate limited (429)", outcome="rate_limited",
                retry_after=parse_retry_after(resp.headers.get("Retry-After")),
                maybe_applied=False,
            )
        if resp.status_code >= 500:
            raise _Retryable(f"server error {resp.status_code}", outcome="server_error")
        if resp.status_code in (401, 403):
            raise NotAuthorized(f"{operation}: HTTP {resp.status_code}")
        try:
            payload = json.loads(resp.content)
        except ValueError:
            if resp.status_code >= 400:
                raise PermanentBackendError(f"{operation}: HTTP {resp.status_code}") from None
            raise _Retryable("non-JSON (HTML) body", outcome="html") from None
        if not isinstance(payload, dict):
            raise _Retryable("unexpected body", outcome="html")
        errors = payload.get("errors")
        if errors:
            raise _graphql_error(operation, errors)
        if resp.status_code >= 400:
            raise PermanentBackendError(f"{operation}: HTTP {resp.status_code}")
        return payload.get("data")


def _graphql_error(operation: str, errors: Any) -> Exception:
    """Type the first GraphQL error by its message."""
    messages = [str(e.get("message", e)) if isinstance(e, dict) else str(e) for e in errors]
    text = "; ".join(messages)
    if "not authorized" in text.lower():
        return NotAuthorized(f"{operation}: {text}")
    if "already exists" in text:
        return NameTaken(f"{operation}: {text}")
    if _RATE_LIMITED.search(text):  # refused, so not applied
        return _Retryable(text, outcome="rate_limited", maybe_applied=False)
    if _TEMPORARY_MESSAGE.search(text):
        return _Retryable(text, outcome="graphql_error")
    if _NOT_FOUND.search(text):
        return NotFound(f"{operation}: {text}")
    return PermanentBackendError(f"{operation}: {text}")
