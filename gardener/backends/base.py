"""The backend interface: plain data in (``ServiceSpec``), plain data out (``ServiceState``).

Every backend (Railway over GraphQL, local subprocesses) offers the same five verbs, each
idempotent, so the reconciler can repeat any step after a crash or a timeout. Errors are typed
by what the caller should do next: a ``TemporaryBackendError`` carries how long to wait, a
``PermanentBackendError`` means retrying will not help.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol, runtime_checkable

# The one status vocabulary lives in the core; backends and their callers take it from here.
from gardener.core.types import ACTIVE as ACTIVE
from gardener.core.types import FINAL as FINAL
from gardener.core.types import DesiredState
from gardener.core.types import Status as Status
from gardener.errors import GardenerError

OWNED_VAR = "GARDENER_OWNED"
CANON_VAR = "GARDENER_CANON_NAME"
ACCOUNT_VAR = "GARDENER_ACCOUNT"
RACE_VAR = "GARDENER_RACE"
MARKER_VARS = (OWNED_VAR, CANON_VAR, ACCOUNT_VAR, RACE_VAR)


class RestartPolicy(StrEnum):
    ALWAYS = "ALWAYS"
    NEVER = "NEVER"
    ON_FAILURE = "ON_FAILURE"


@dataclass(frozen=True)
class ServiceSpec:
    """What one trial should look like: the reconciler's desired state for one service."""

    canon_name: str
    account: str
    desired: DesiredState = DesiredState.RUNNING
    variables: Mapping[str, str] = field(default_factory=dict)
    command: tuple[str, ...] | None = None  # local: argv; None means the backend default
    start_command: str | None = None  # Railway: the start command string
    image: str | None = None  # Railway source: a container image ...
    repo: str | None = None  # ... or a repository (with ``branch``)
    branch: str | None = None
    restart_policy: RestartPolicy = RestartPolicy.ON_FAILURE
    max_retries: int = 2
    race: str | None = None

    def marker_variables(self) -> dict[str, str]:
        """The ownership marker every service the gardener creates carries."""
        marks = {OWNED_VAR: "1", CANON_VAR: self.canon_name, ACCOUNT_VAR: self.account}
        if self.race:
            marks[RACE_VAR] = self.race
        return marks

    def all_variables(self) -> dict[str, str]:
        """The spec's variables with the ownership marker on top (the marker always wins)."""
        return {**dict(self.variables), **self.marker_variables()}


@dataclass(frozen=True)
class ServiceState:
    """One service as a backend sees it now. ``owned`` is False for anything we did not create."""

    canon_name: str | None  # None for a service without our marker
    service_name: str
    service_id: str
    status: Status
    raw_status: str
    owned: bool
    deployment_id: str | None = None
    restarts: int = 0
    adopted: bool = False  # local: found running after a gardener restart and kept


@dataclass(frozen=True)
class LogLine:
    """One line of a service's output, with an opaque cursor to resume after it."""

    canon_name: str
    message: str
    timestamp: str  # RFC 3339; Railway gives nanoseconds
    cursor: str


class EnsureOutcome(StrEnum):
    """What ``ensure`` did, for the reconcile report."""

    CREATED = "created"
    DEPLOYED = "deployed"
    RESTARTED = "restarted"
    UNCHANGED = "unchanged"
    FAILED = "failed"  # retries spent: nothing started


class BackendError(GardenerError):
    """Base of the backend errors."""


class TemporaryBackendError(BackendError):
    """Try again later: ``retry_after`` seconds if the server said so, else None.

    ``maybe_applied`` is True when the request may have run on the server (a timeout after
    sending): the caller must look before repeating anything that is not idempotent.
    """

    def __init__(
        self, message: str, retry_after: float | None = None, *, maybe_applied: bool = False
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.maybe_applied = maybe_applied


class PermanentBackendError(BackendError):
    """Retrying the same request will not help (bad document, no permission, bad input)."""


class BudgetExhausted(TemporaryBackendError):
    """The request budget (requests per hour) is spent; ``retry_after`` says when one frees."""


class NotAuthorized(PermanentBackendError):
    """The token may not do this (Railway's "Not Authorized")."""


class NotFound(PermanentBackendError):
    """The service or deployment does not exist (any more)."""


class NameTaken(PermanentBackendError):
    """``A service named "..." already exists in this project``."""


class ForeignService(PermanentBackendError):
    """A service with our name that the gardener did not create: never touched."""


@runtime_checkable
class Backend(Protocol):
    """Where trials run. Each verb is idempotent; errors are Temporary or Permanent."""

    kind: str
    account: str

    async def observe(self) -> list[ServiceState]:
        """Every service the backend can see (owned or not), in one cheap read."""
        ...

    async def ensure(self, spec: ServiceSpec) -> EnsureOutcome:
        """Create, configure and start the service if needed; a no-op when it already runs."""
        ...

    async def stop(self, canon_name: str, *, account: str | None = None) -> bool:
        """Stop what runs (the service stays); True if something was stopped."""
        ...

    async def remove(self, canon_name: str, *, account: str | None = None) -> bool:
        """Stop and delete the service; True if something was removed."""
        ...

    async def tail(self, canon_name: str, cursor: str | None = None) -> list[LogLine]:
        """Log lines after ``cursor`` (all when None), oldest first, never a line twice."""
        ...

    def logs(self, canon_name: str, *, poll_interval: float = 2.0) -> AsyncIterator[LogLine]:
        """Follow the service's log forever (``tail`` in a loop)."""
        ...

    async def aclose(self) -> None:
        """Release connections (processes keep running)."""
        ...


def check_account(bound: str, requested: str | None, canon_name: str) -> None:
    """Refuse, before any request, to act on another account's trial."""
    from gardener.errors import CrossAccountKillForbidden

    if requested is not None and requested != bound:
        raise CrossAccountKillForbidden(
            f"{canon_name} belongs to account {requested!r}; this backend acts for {bound!r}"
        )
