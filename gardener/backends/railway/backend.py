"""The Railway backend: one account, one project, one environment, over the GraphQL client.

- observe: one ``ListServices`` read per pass (service instances with their latest
  deployment, paged by 100). A service whose name has our shape has its variables read once per
  process to check the ownership marker (``GARDENER_OWNED=1``, ``GARDENER_CANON_NAME``,
  ``GARDENER_ACCOUNT``); services we create are known without that read.
- ensure: look the service up by name (the pass's observation, or a fresh one), create it
  with its variables (marker included, so it is never unmarked), set source / start command /
  restart policy with ``serviceInstanceUpdate``, deploy with ``serviceInstanceDeployV2``.
  ``serviceCreate`` is not idempotent: after a failed or timed-out create we look again before
  anything else. A deploy is remembered for ``deploy_grace`` seconds because a new deployment
  can be missing from reads for a moment; during the grace the service reads as pending.
- Railway's own restart policy restarts a crashing deployment; CRASHED is what is left after
  it gave up, so it reads as ``failed``.
- Asked to act for another account, every verb raises ``CrossAccountKillForbidden`` before
  any request.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Any

import structlog

from gardener.backends.base import (
    ACCOUNT_VAR,
    ACTIVE,
    CANON_VAR,
    OWNED_VAR,
    EnsureOutcome,
    ForeignService,
    LogLine,
    NameTaken,
    NotFound,
    PermanentBackendError,
    ServiceSpec,
    ServiceState,
    Status,
    TemporaryBackendError,
    check_account,
)
from gardener.backends.railway.client import RailwayClient
from gardener.backends.railway.names import is_gardener_name, service_name

log = structlog.get_logger("gardener.backends.railway")

_STATUS = {
    "QUEUED": Status.PENDING,
    "WAITING": Status.PENDING,
    "INITIALIZING": Status.PENDING,
    "DEPLOYING": Status.PENDING,
    "NEEDS_APPROVAL": Status.PENDING,
    "BUILDING": Status.BUILDING,
    "SUCCESS": Status.RUNNING,
    "SLEEPING": Status.RUNNING,
    "CRASHED": Status.FAILED,
    "FAILED": Status.FAILED,
    "REMOVED": Status.STOPPED,
    "REMOVING": Status.STOPPED,
    "SKIPPED": Status.STOPPED,
}


def normalize(raw: str | None, stopped: bool = False) -> Status:
    """Railway's DeploymentStatus to ours; SUCCESS with every instance stopped is 'succeeded'."""
    if raw is None:
        return Status.STOPPED
    status = _STATUS.get(raw, Status.PENDING)
    if status is Status.RUNNING and stopped:
        return Status.SUCCEEDED
    return status


def parse_rfc3339_ns(text: str) -> int:
    """RFC 3339 with up to nine fraction digits to nanoseconds since the epoch (exact)."""
    from datetime import datetime

    text = text.strip()
    head, frac, tz = text[:19], "", text[19:]
    if tz.startswith("."):
        digits = len(tz[1:]) - len(tz[1:].lstrip("0123456789"))
        frac, tz = tz[1 : 1 + digits], tz[1 + digits :]
    tz = "+00:00" if tz in ("", "Z", "z") else tz
    dt = datetime.fromisoformat(head + tz)
    return int(dt.timestamp()) * 1_000_000_000 + int((frac + "0" * 9)[:9])


def _fingerprint(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


@dataclass
class _Pending:
    deployment_id: str | None  # None: the deploy call's answer was lost
    previous_id: str | None
    at: float


class RailwayBackend:
    """See the module docstring. ``clock`` is injected so the grace windows are testable."""

    kind = "railway"
    service_name_of = staticmethod(service_name)

    def __init__(
        self,
        account: str,
        client: RailwayClient,
        *,
        project_id: str,
        environment_id: str,
        clock: Callable[[], float] = time.monotonic,
        deploy_grace: float = 30.0,
        lookup_max_age: float = 10.0,
        page_size: int = 100,
        log_limit: int = 500,
    ) -> None:
        self.account = account
        self.client = client
        self.project_id = project_id
        self.environment_id = environment_id
        self._clock = clock
        self.deploy_grace = deploy_grace
        self.lookup_max_age = lookup_max_age
        self.page_size = page_size
        self.log_limit = log_limit
        self._owners: dict[str, str | None] = {}  # service id -> canon name (None: not ours)
        self._states: dict[str, ServiceState] = {}  # service name -> last observation
        self._observed_at: float | None = None
        self._pending: dict[str, _Pending] = {}  # service id -> a deploy not yet visible
        self._vars_fp: dict[str, str] = {}
        self._inst_fp: dict[str, str] = {}
        self._log = log.bind(account=account, project_id=project_id)

    def __repr__(self) -> str:
        return f"RailwayBackend(account={self.account!r}, project_id={self.project_id!r})"

    async def aclose(self) -> None:
        await self.client.aclose()

    # ---- observe -------------------------------------------------------------------------
    async def observe(self) -> list[ServiceState]:
        nodes: list[dict[str, Any]] = []
        after: str | None = None
        while True:
            data = await self.client.execute(
                "ListServices",
                {"environmentId": self.environment_id, "first": self.page_size, "after": after},
            )
            conn = data["environment"]["serviceInstances"]
            nodes.extend(edge["node"] for edge in conn["edges"])
            if not conn["pageInfo"]["hasNextPage"]:
                break
            after = conn["pageInfo"]["endCursor"]
        await self._learn_owners(nodes)
        now = self._clock()
        states = [await self._state(node, now) for node in nodes]
        self._states = {s.service_name: s for s in states}
        self._observed_at = now
        seen = {s.service_id for s in states}
        for sid in list(self._pending):
            if sid not in seen:
                del self._pending[sid]
        return states

    async def _state(self, node: dict[str, Any], now: float) -> ServiceState:
        sid, name = node["serviceId"], node["serviceName"]
        canon = await self._owner(sid, name)
        latest = node.get("latestDeployment")
        raw = latest["status"] if latest else None
        dep_id = latest["id"] if latest else None
        status = normalize(raw, bool(latest and latest.get("deploymentStopped")))
        pending = self._pending.get(sid)
        if pending is not None:
            arrived = dep_id is not None and (
                dep_id == pending.deployment_id
                or (pending.deployment_id is None and dep_id != pending.previous_id)
            )
            if arrived or now - pending.at > self.deploy_grace:
                del self._pending[sid]
            else:
                status, raw, dep_id = Status.PENDING, "DEPLOY_REQUESTED", pending.deployment_id
        return ServiceState(
            canon_name=canon, service_name=name, service_id=sid, status=status,
            raw_status=raw or "NO_DEPLOYMENT", owned=canon is not None, deployment_id=dep_id,
        )

    async def _learn_owners(self, nodes: list[dict[str, Any]]) -> None:
        """Read the marker of every unknown service with our name shape, a few at a time."""
        unknown = [n for n in nodes if n["serviceId"] not in self._owners]
        gate = asyncio.Semaphore(4)

        async def one(node: dict[str, Any]) -> None:
            async with gate:
                await self._owner(node["serviceId"], node["serviceName"])

        results = await asyncio.gather(*(one(n) for n in unknown), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result  # the first failure, typed as the client raised it

    async def _owner(self, service_id: str, name: str) -> str | None:
        """The canon name if the service carries our marker for this account, else None."""
        if service_id in self._owners:
            return self._owners[service_id]
        canon: str | None = None
        if is_gardener_name(name):
            data = await self.client.execute(
                "ServiceVariables",
                {"projectId": self.project_id, "environmentId": self.environment_id,
                 "serviceId": service_id},
            )
            variables = data.get("variables") or {}
            if (
                variables.get(OWNED_VAR) == "1"
                and variables.get(ACCOUNT_VAR, self.account) == self.account
                and variables.get(CANON_VAR)
                and service_name(variables[CANON_VAR]) == name
            ):
                canon = variables[CANON_VAR]
        self._owners[service_id] = canon
        return canon

    async def _find(self, canon_name: str, *, fresh: bool = False) -> ServiceState | None:
        """The service of ``canon_name``, by name, from an observation at most a few s old."""
        now = self._clock()
        if fresh or self._observed_at is None or now - self._observed_at > self.lookup_max_age:
            await self.observe()
        return self._states.get(service_name(canon_name))

    async def _lookup_by_name(self, canon_name: str) -> ServiceState | None:
        """A fresh look, including services that are not ours (name conflicts)."""
        return await self._find(canon_name, fresh=True)

    # ---- ensure --------------------------------------------------------------------------
    async def ensure(self, spec: ServiceSpec) -> EnsureOutcome:
        check_account(self.account, spec.account, spec.canon_name)
        if not (spec.image or spec.repo):
            raise PermanentBackendError(f"{spec.canon_name}: a Railway service needs a source")
        known = await self._find(spec.canon_name)
        if known is not None and not known.owned:
            raise ForeignService(
                f"a service named {known.service_name} exists and was not created by the gardener"
            )
        log_ = self._log.bind(canon_name=spec.canon_name)
        if known is None:
            sid = await self._create(spec)
            outcome = EnsureOutcome.CREATED
            previous = None
        else:
            if known.status in ACTIVE or known.status is Status.SUCCEEDED:
                return EnsureOutcome.UNCHANGED
            sid, previous = known.service_id, known.deployment_id
            outcome = EnsureOutcome.DEPLOYED
        try:
            await self._configure(sid, spec)
            await self._deploy(sid, previous)
        except NotFound:  # deleted behind our back since we looked: forget it, create next pass
            self._forget(sid)
            raise TemporaryBackendError(f"{spec.canon_name}: service vanished", 0.0) from None
        log_.info("railway_service_ensured", service_id=sid, outcome=outcome.value)
        return outcome

    async def _create(self, spec: ServiceSpec) -> str:
        name = service_name(spec.canon_name)
        variables = spec.all_variables()
        try:
            data = await self.client.execute(
                "ServiceCreate",
                {"input": {"projectId": self.project_id, "environmentId": self.environment_id,
                           "name": name, "variables": variables,
                           "branch": spec.branch if spec.repo else None}},
            )
            sid = str(data["serviceCreate"]["id"])
        except NameTaken:
            found = await self._lookup_by_name(spec.canon_name)
            if found is None:
                raise TemporaryBackendError(f"{name} exists but is not listed yet") from None
            if not found.owned:
                raise ForeignService(f"{name} exists and was not created by the gardener") from None
            sid = found.service_id
            self._log.info("railway_create_found_existing", canon_name=spec.canon_name)
        except TemporaryBackendError as exc:
            if not exc.maybe_applied:
                raise
            found = await self._lookup_by_name(spec.canon_name)
            if found is None:
                raise
            if not found.owned:
                raise ForeignService(f"{name} exists and was not created by the gardener") from None
            sid = found.service_id
            self._log.info("railway_create_applied_despite_error", canon_name=spec.canon_name)
        self._owners[sid] = spec.canon_name
        self._vars_fp[sid] = _fingerprint(variables)
        self._states[name] = ServiceState(
            canon_name=spec.canon_name, service_name=name, service_id=sid,
            status=Status.STOPPED, raw_status="NO_DEPLOYMENT", owned=True,
        )
        return sid

    async def _configure(self, sid: str, spec: ServiceSpec) -> None:
        variables = spec.all_variables()
        fp = _fingerprint(variables)
        if self._vars_fp.get(sid) != fp:
            await self.client.execute(
                "VariablesUpsert",
                {"input": {"projectId": self.project_id, "environmentId": self.environment_id,
                           "serviceId": sid, "variables": variables, "skipDeploys": True}},
            )
            self._vars_fp[sid] = fp
        source = {"image": spec.image} if spec.image else {"repo": spec.repo}
        instance: dict[str, Any] = {
            "source": source,
            "startCommand": spec.start_command,
            "restartPolicyType": spec.restart_policy.value,
            "restartPolicyMaxRetries": spec.max_retries,
            "numReplicas": 1,
        }
        fp = _fingerprint(instance)
        if self._inst_fp.get(sid) != fp:
            await self.client.execute(
                "ServiceInstanceUpdate",
                {"serviceId": sid, "environmentId": self.environment_id, "input": instance},
            )
            self._inst_fp[sid] = fp

    async def _deploy(self, sid: str, previous: str | None) -> None:
        try:
            data = await self.client.execute(
                "ServiceDeploy", {"environmentId": self.environment_id, "serviceId": sid}
            )
        except TemporaryBackendError as exc:
            if exc.maybe_applied:
                self._pending[sid] = _Pending(None, previous, self._clock())
            raise
        self._pending[sid] = _Pending(str(data["serviceInstanceDeployV2"]), previous, self._clock())

    # ---- stop and remove -----------------------------------------------------------------
    async def _owned(self, canon_name: str, account: str | None) -> ServiceState | None:
        """The trial's service, if any; refused before any change when it is not ours."""
        check_account(self.account, account, canon_name)
        known = await self._find(canon_name)
        if known is not None and not known.owned:
            raise ForeignService(f"{known.service_name} was not created by the gardener")
        return known

    async def stop(self, canon_name: str, *, account: str | None = None) -> bool:
        known = await self._owned(canon_name, account)
        if known is None:
            return False
        if known.status not in ACTIVE:
            return False
        dep_id = known.deployment_id
        if dep_id is None:  # a deploy whose id we never saw: wait until it is visible
            raise TemporaryBackendError(f"{canon_name}: deployment not visible yet", 1.0)
        try:
            await self.client.execute("DeploymentStop", {"id": dep_id})
        except NotFound:
            pass
        self._pending.pop(known.service_id, None)
        self._states[known.service_name] = replace(
            known, status=Status.STOPPED, raw_status="REMOVED"
        )
        self._log.info("railway_service_stopped", canon_name=canon_name, deployment_id=dep_id)
        return True

    async def remove(self, canon_name: str, *, account: str | None = None) -> bool:
        known = await self._owned(canon_name, account)
        if known is None:
            return False
        try:
            await self.client.execute(
                "ServiceDelete", {"id": known.service_id, "environmentId": self.environment_id}
            )
        except NotFound:
            pass
        self._forget(known.service_id)
        self._log.info("railway_service_removed", canon_name=canon_name)
        return True

    def _forget(self, sid: str) -> None:
        self._owners.pop(sid, None)
        self._pending.pop(sid, None)
        self._vars_fp.pop(sid, None)
        self._inst_fp.pop(sid, None)
        for name, state in list(self._states.items()):
            if state.service_id == sid:
                del self._states[name]

    # ---- logs ----------------------------------------------------------------------------
    async def tail(self, canon_name: str, cursor: str | None = None) -> list[LogLine]:
        """New deployment log lines after ``cursor`` ("<deployment>|<timestamp>|<n at it>")."""
        known = await self._find(canon_name)
        if known is None or known.deployment_id is None:
            return []
        dep_id, start, seen_at_start = known.deployment_id, None, 0
        if cursor:
            c_dep, c_ts, c_n = cursor.split("|")
            if c_dep == dep_id:
                start, seen_at_start = c_ts, int(c_n)
        data = await self.client.execute(
            "DeploymentLogs",
            {"deploymentId": dep_id, "startDate": start, "limit": self.log_limit},
        )
        raw = sorted(
            ((parse_rfc3339_ns(x["timestamp"]), x) for x in data["deploymentLogs"]),
            key=lambda pair: pair[0],
        )
        start_ns = parse_rfc3339_ns(start) if start else None
        out: list[LogLine] = []
        skip = seen_at_start
        last_ns, count_at_last = start_ns, seen_at_start
        for ns, item in raw:
            if start_ns is not None and ns < start_ns:
                continue
            if start_ns is not None and ns == start_ns and skip > 0:
                skip -= 1
                continue
            count_at_last = count_at_last + 1 if ns == last_ns else 1
            last_ns = ns
            out.append(
                LogLine(
                    canon_name=canon_name, message=item["message"], timestamp=item["timestamp"],
                    cursor=f"{dep_id}|{item['timestamp']}|{count_at_last}",
                )
            )
        return out

    async def logs(
        self, canon_name: str, *, poll_interval: float = 2.0, cursor: str | None = None
    ) -> AsyncIterator[LogLine]:
        while True:
            lines = await self.tail(canon_name, cursor)
            for line in lines:
                yield line
                cursor = line.cursor
            await asyncio.sleep(poll_interval)
