"""The fake Railway server: state, GraphQL resolvers, fault injection and the HTTP app."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import graphql
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from gardener.backends.railway.documents import schema_sdl

MAX_NAME = 32
STAGES = ("QUEUED", "INITIALIZING", "BUILDING", "DEPLOYING", "SUCCESS")
FAULT_KINDS = ("429", "500", "timeout", "html", "graphql_error", "applied_timeout")
_SCHEMA: graphql.GraphQLSchema | None = None


def load_schema() -> graphql.GraphQLSchema:
    """Railway's schema (the dump's one SDL defect, a deprecated Team.id, is ignored)."""
    global _SCHEMA
    if _SCHEMA is None:
        _SCHEMA = graphql.build_schema(schema_sdl(), assume_valid=True)
    return _SCHEMA


@functools.lru_cache(maxsize=256)
def _checked(query: str) -> tuple[graphql.DocumentNode | None, list[dict[str, Any]]]:
    """Parse and validate a document against the schema (memoised: documents repeat)."""
    try:
        doc = graphql.parse(query)
    except graphql.GraphQLError as exc:
        return None, [exc.formatted]
    errors = graphql.validate(load_schema(), doc)
    return doc, [dict(e.formatted) for e in errors]


def rfc3339_ns(ns: int) -> str:
    """Nanoseconds since the epoch as RFC 3339 with nine fraction digits, as Railway sends."""
    sec, frac = divmod(ns, 1_000_000_000)
    return datetime.fromtimestamp(sec, UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{frac:09d}Z"


def parse_ns(text: str) -> int:
    """RFC 3339 (any fraction length, Z or offset) to nanoseconds since the epoch."""
    head, _, rest = text.partition(".")
    frac = ""
    tz = "Z"
    if rest:
        digits = len(rest) - len(rest.lstrip("0123456789"))
        frac, tz = rest[:digits], rest[digits:] or "Z"
    else:
        for sep in ("Z", "+", "-"):
            idx = head.find(sep, 19)
            if idx != -1:
                head, tz = head[:idx], head[idx:]
                break
    dt = datetime.fromisoformat(head + ("+00:00" if tz in ("Z", "z") else tz))
    return int(dt.timestamp()) * 1_000_000_000 + int((frac + "000000000")[:9])


class FakeError(Exception):
    """An error the fake reports as a GraphQL error."""


@dataclass
class Deployment:
    id: str
    service_id: str
    created: float
    override: str | None = None  # CRASHED | REMOVED | FAILED
    finished: bool = False  # the process exited 0
    logs: list[tuple[int, str]] = field(default_factory=list)
    process: subprocess.Popen[bytes] | None = None  # with ``run_processes``: the service's

    def status(self, now: float, step: float) -> str:
        if self.override:
            return self.override
        if step <= 0:
            return "SUCCESS"
        return STAGES[min(len(STAGES) - 1, int((now - self.created) / step))]


@dataclass
class Service:
    id: str
    name: str
    project_id: str
    environment_id: str
    variables: dict[str, str]
    created_at: str
    source: dict[str, str] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    deployments: list[Deployment] = field(default_factory=list)


@dataclass
class Project:
    id: str
    environment_id: str
    token: str
    services: dict[str, Service] = field(default_factory=dict)


@dataclass
class Fault:
    kind: str
    operation: str | None = None


class FakeRailway:
    """In-memory Railway behind a real HTTP server; see the package docstring."""

    def __init__(
        self,
        *,
        step_seconds: float = 0.01,
        visibility_delay: float = 0.03,
        timeout_sleep: float = 0.5,
        retry_after: int = 1,
        run_processes: bool = False,
        workdir: str | Path | None = None,
    ) -> None:
        self.run_processes = run_processes
        self.workdir = Path(workdir) if workdir is not None else Path(__file__).parents[2]
        self.step_seconds = step_seconds
        self.visibility_delay = visibility_delay
        self.timeout_sleep = timeout_sleep
        self.retry_after = retry_after
        self.projects: dict[str, Project] = {}
        self.lock = threading.RLock()
        self.requests = 0
        self.requests_by_operation: Counter[str] = Counter()
        self.faults_injected: Counter[str] = Counter()
        self.auth_headers: list[str] = []
        self.calls: list[tuple[str, dict[str, Any]]] = []  # (operation, variables) as received
        self._faults: deque[Fault] = deque()
        self._fault_rate = 0.0
        self._fault_kinds: tuple[str, ...] = FAULT_KINDS
        self._rng = random.Random(0)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    # ---- set-up and the test API -------------------------------------------------------
    def add_project(self, token: str) -> tuple[str, str]:
        """A project with one environment, reachable with ``token``: (project id, env id)."""
        with self.lock:
            proj = Project(id=str(uuid.uuid4()), environment_id=str(uuid.uuid4()), token=token)
            self.projects[proj.id] = proj
            return proj.id, proj.environment_id

    def push_fault(self, kind: str, operation: str | None = None, count: int = 1) -> None:
        """Script the next ``count`` requests (of ``operation``, or any) to fail as ``kind``."""
        if kind not in FAULT_KINDS:
            raise ValueError(kind)
        with self.lock:
            self._faults.extend(Fault(kind, operation) for _ in range(count))

    def set_fault_rate(
        self, rate: float, *, seed: int = 0, kinds: tuple[str, ...] = FAULT_KINDS
    ) -> None:
        """Fail a fraction ``rate`` of requests, drawing the kind from ``kinds`` (seeded)."""
        with self.lock:
            self._fault_rate, self._fault_kinds, self._rng = rate, kinds, random.Random(seed)

    def add_foreign_service(self, project_id: str, name: str, variables: dict[str, str]) -> str:
        """A service someone else created (no gardener marker), deployed and running."""
        with self.lock:
            svc = self._create(self.projects[project_id], name, variables, {"image": "nginx"})
            self._deploy(svc, back_dated=True)
            return svc.id

    def service_by_name(self, name: str, project_id: str | None = None) -> Service | None:
        """The service called ``name`` (in ``project_id``, or in any project)."""
        with self.lock:
            for proj in self.projects.values():
                if project_id is not None and proj.id != project_id:
                    continue
                for svc in proj.services.values():
                    if svc.name == name:
                        return svc
        return None

    def all_services(self) -> list[Service]:
        with self.lock:
            return [s for p in self.projects.values() for s in p.services.values()]

    def crash(self, name: str, project_id: str | None = None) -> None:
        """Mark the service's latest deployment CRASHED."""
        with self.lock:
            svc = self.service_by_name(name, project_id)
            assert svc and svc.deployments, name
            svc.deployments[-1].override = "CRASHED"

    def finish(self, name: str, project_id: str | None = None) -> None:
        """The service's process exited 0: SUCCESS with all instances stopped."""
        with self.lock:
            svc = self.service_by_name(name, project_id)
            assert svc and svc.deployments, name
            svc.deployments[-1].finished = True

    def add_log(
        self, name: str, message: str, ns: int | None = None, project_id: str | None = None
    ) -> int:
        """Append a line to the latest deployment's log; returns its timestamp in ns."""
        with self.lock:
            svc = self.service_by_name(name, project_id)
            assert svc and svc.deployments, name
            ts = ns if ns is not None else time.time_ns()
            svc.deployments[-1].logs.append((ts, message))
            svc.deployments[-1].logs.sort(key=lambda x: x[0])
            return ts

    # ---- the server ----------------------------------------------------------------------
    def start(self) -> str:
        load_schema()  # built before the first request, which must not outlast a client timeout
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        app = Starlette(routes=[Route("/graphql/v2", self._endpoint, methods=["POST"])])
        config = uvicorn.Config(
            app, log_level="error", lifespan="off", timeout_graceful_shutdown=1,
            access_log=False, log_config=None,  # leave the process's logging as it is
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("fake Railway did not start")
            time.sleep(0.005)
        self._sock = sock
        self.url = f"http://127.0.0.1:{port}/graphql/v2"
        return self.url

    def stop(self) -> None:
        with self.lock:
            deployments = [d for svc in self.all_services() for d in svc.deployments]
        for dep in deployments:
            self._kill(dep)
        if self._server is not None:
            self._server.should_exit = True
            if self._thread:
                self._thread.join(timeout=10)
            self._sock.close()
            self._server = None

    def __enter__(self) -> FakeRailway:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _endpoint(self, request: Request) -> Response:
        raw = await request.body()
        try:
            body = json.loads(raw)
            query, variables = body["query"], body.get("variables") or {}
            op_name = body.get("operationName")
        except (ValueError, KeyError, TypeError):
            return JSONResponse({"errors": [{"message": "Bad request"}]}, status_code=400)
        with self.lock:
            self.requests += 1
            self.requests_by_operation[op_name or "?"] += 1
            self.auth_headers.append(request.headers.get("authorization", ""))
            self.calls.append((op_name or "?", variables))
            fault = self._next_fault(op_name)
            if fault:
                self.faults_injected[fault] += 1
        if fault == "429":
            return PlainTextResponse(
                "Too Many Requests", status_code=429,
                headers={"Retry-After": str(self.retry_after), "X-RateLimit-Remaining": "0"},
            )
        if fault == "500":
            return PlainTextResponse("Internal Server Error", status_code=500)
        if fault == "html":
            return HTMLResponse("<html><body><h1>Bad gateway</h1></body></html>")
        if fault == "graphql_error":
            return JSONResponse(
                {"data": None, "errors": [{"message": "Internal server error, try again"}]}
            )
        if fault == "timeout":
            await asyncio.sleep(self.timeout_sleep)
            return PlainTextResponse("Gateway Timeout", status_code=504)
        token = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        result, status = self._execute(query, variables, op_name, token)
        if fault == "applied_timeout":
            await asyncio.sleep(self.timeout_sleep)
        return JSONResponse(result, status_code=status)

    def _next_fault(self, op_name: str | None) -> str | None:
        for i, f in enumerate(self._faults):
            if f.operation is None or f.operation == op_name:
                del self._faults[i]
                return f.kind
        if self._fault_rate and self._rng.random() < self._fault_rate:
            return self._rng.choice(self._fault_kinds)
        return None

    def _execute(
        self, query: str, variables: dict[str, Any], op_name: str | None, token: str
    ) -> tuple[dict[str, Any], int]:
        schema = load_schema()
        doc, errors = _checked(query)
        if errors:
            return {"errors": errors}, 400
        with self.lock:
            allowed = {p.id for p in self.projects.values() if token and p.token == token}
            if not allowed:
                return {"data": None, "errors": [{"message": "Not Authorized"}]}, 200
            assert doc is not None
            result = graphql.execute_sync(
                schema, doc, root_value=_Root(self, allowed), variable_values=variables,
                operation_name=op_name,
            )
        out: dict[str, Any] = {"data": result.data}
        if result.errors:
            out["errors"] = [e.formatted for e in result.errors]
        return out, 200

    # ---- state changes -----------------------------------------------------------------
    def _create(
        self, proj: Project, name: str, variables: dict[str, str], source: dict[str, str]
    ) -> Service:
        if not name:
            raise FakeError("A service name is required")
        if len(name) > MAX_NAME:
            raise FakeError(f"Service name must be at most {MAX_NAME} characters")
        if any(s.name == name for s in proj.services.values()):
            raise FakeError(f'A service named "{name}" already exists in this project')
        svc = Service(
            id=str(uuid.uuid4()), name=name, project_id=proj.id,
            environment_id=proj.environment_id, variables=dict(variables),
            created_at=rfc3339_ns(time.time_ns()), source=dict(source),
        )
        proj.services[svc.id] = svc
        return svc

    def _deploy(self, svc: Service, *, back_dated: bool = False) -> Deployment:
        now = time.monotonic()
        for old in svc.deployments:
            if old.override is None and not old.finished:
                old.override = "REMOVED"
            self._kill(old)
        dep = Deployment(
            id=str(uuid.uuid4()), service_id=svc.id,
            created=now - (100.0 if back_dated else 0.0),
        )
        svc.deployments.append(dep)
        if self.run_processes and svc.source and not back_dated:
            self._start_process(svc, dep)
        return dep

    # ---- the emulator: a deployment is a real local process ---------------------------
    def _start_process(self, svc: Service, dep: Deployment) -> None:
        """Run the service's start command (else the image's default, ``gardener run``) as
        a local process with the service's variables and the ones Railway adds, as the
        repository's Dockerfile would; its output becomes the deployment's log."""
        command = svc.settings.get("startCommand") or "gardener run"
        here = str(Path(sys.executable).parent)
        env = {"PATH": f"{here}{os.pathsep}{os.environ.get('PATH', '')}",
               "HOME": os.environ.get("HOME", "/tmp"), "LANG": "C.UTF-8"}
        env.update(svc.variables)
        env.update(RAILWAY_SERVICE_ID=svc.id, RAILWAY_SERVICE_NAME=svc.name,
                   RAILWAY_DEPLOYMENT_ID=dep.id, RAILWAY_PROJECT_ID=svc.project_id,
                   RAILWAY_ENVIRONMENT_ID=svc.environment_id, RAILWAY_ENVIRONMENT="production")
        try:
            dep.process = subprocess.Popen(
                shlex.split(command), cwd=self.workdir, env=env, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
            )
        except OSError as exc:
            dep.logs.append((time.time_ns(), f"failed to start {command!r}: {exc}"))
            dep.override = "CRASHED"
            return
        threading.Thread(target=self._follow, args=(dep,), daemon=True).start()

    def _follow(self, dep: Deployment) -> None:
        """Copy the process's output into the log; its exit decides the deployment's end."""
        proc = dep.process
        assert proc is not None and proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            with self.lock:
                dep.logs.append((time.time_ns(), line))
        code = proc.wait()
        with self.lock:
            if dep.override is None and not dep.finished:
                if code == 0:
                    dep.finished = True
                else:
                    dep.override = "CRASHED"

    def _kill(self, dep: Deployment) -> None:
        """Stop a deployment's process group: SIGTERM, then SIGKILL after 5 s."""
        proc = dep.process
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return

        def reap() -> None:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()

        threading.Thread(target=reap, daemon=True).start()

    def processes(self) -> list[subprocess.Popen[bytes]]:
        """The emulated deployments' processes still alive."""
        with self.lock:
            return [d.process for svc in self.all_services() for d in svc.deployments
                    if d.process is not None and d.process.poll() is None]

    def visible(self, dep: Deployment) -> bool:
        return time.monotonic() - dep.created >= self.visibility_delay

    def deployment_view(self, dep: Deployment) -> dict[str, Any]:
        status = dep.status(time.monotonic(), self.step_seconds)
        svc = self._service(dep.service_id)
        return {
            "id": dep.id,
            "status": status,
            "serviceId": dep.service_id,
            "projectId": svc.project_id if svc else "",
            "environmentId": svc.environment_id if svc else "",
            "createdAt": rfc3339_ns(int((time.time() - (time.monotonic() - dep.created)) * 1e9)),
            "deploymentStopped": status in ("REMOVED", "CRASHED", "FAILED") or dep.finished,
        }

    def _service(self, service_id: str) -> Service | None:
        for proj in self.projects.values():
            if service_id in proj.services:
                return proj.services[service_id]
        return None


class _Root:
    """Query and mutation resolvers (graphql-core calls ``root.<field>(info, **args)``)."""

    def __init__(self, fake: FakeRailway, allowed: set[str]) -> None:
        self.fake = fake
        self.allowed = allowed

    def _project(self, project_id: str) -> Project:
        proj = self.fake.projects.get(project_id)
        if proj is None or proj.id not in self.allowed:
            raise FakeError("Not Authorized")
        return proj

    def _env_project(self, environment_id: str) -> Project:
        for proj in self.fake.projects.values():
            if proj.environment_id == environment_id:
                return self._project(proj.id)
        raise FakeError("Not Authorized")

    def _svc(self, service_id: str) -> Service:
        svc = self.fake._service(service_id)
        if svc is None:
            raise FakeError("Service not found")
        self._project(svc.project_id)
        return svc

    def _dep(self, deployment_id: str) -> tuple[Service, Deployment]:
        for proj in self.fake.projects.values():
            for svc in proj.services.values():
                for dep in svc.deployments:
                    if dep.id == deployment_id and self.fake.visible(dep):
                        self._project(proj.id)
                        return svc, dep
        raise FakeError("Deployment not found")

    # ---- queries -------------------------------------------------------------------------
    def environment(self, info: Any, id: str, projectId: str | None = None) -> dict[str, Any]:
        proj = self._env_project(id)

        def service_instances(
            info: Any, first: int | None = None, after: str | None = None, **_: Any
        ) -> dict[str, Any]:
            services = sorted(proj.services.values(), key=lambda s: s.created_at + s.id)
            start = int(after) if after else 0
            page = services[start : start + (first or 100)]
            edges = []
            for i, svc in enumerate(page, start=start):
                visible = [d for d in svc.deployments if self.fake.visible(d)]
                latest = self.fake.deployment_view(visible[-1]) if visible else None
                node = {
                    "id": f"{svc.id}:{proj.environment_id}",
                    "serviceId": svc.id,
                    "serviceName": svc.name,
                    "environmentId": proj.environment_id,
                    "latestDeployment": latest,
                    "startCommand": svc.settings.get("startCommand"),
                    "restartPolicyType": svc.settings.get("restartPolicyType", "ON_FAILURE"),
                    "restartPolicyMaxRetries": svc.settings.get("restartPolicyMaxRetries", 10),
                    "numReplicas": svc.settings.get("numReplicas", 1),
                }
                edges.append({"cursor": str(i + 1), "node": node})
            end = start + len(page)
            return {
                "edges": edges,
                "pageInfo": {
                    "hasNextPage": end < len(services),
                    "endCursor": str(end) if page else None,
                    "hasPreviousPage": start > 0,
                    "startCursor": str(start + 1) if page else None,
                },
            }

        return {
            "id": proj.environment_id, "name": "production", "projectId": proj.id,
            "serviceInstances": service_instances,
        }

    def variables(
        self, info: Any, projectId: str, environmentId: str, serviceId: str | None = None,
        unrendered: bool | None = None,
    ) -> dict[str, str]:
        self._project(projectId)
        if serviceId is None:
            return {}
        return dict(self._svc(serviceId).variables)

    def deployment(self, info: Any, id: str) -> dict[str, Any]:
        _, dep = self._dep(id)
        return self.fake.deployment_view(dep)

    def deploymentLogs(
        self, info: Any, deploymentId: str, startDate: str | None = None,
        endDate: str | None = None, filter: str | None = None, limit: int | None = None,
    ) -> list[dict[str, Any]]:
        _, dep = self._dep(deploymentId)
        lo = parse_ns(startDate) if startDate else None
        hi = parse_ns(endDate) if endDate else None
        lines = [
            {"message": msg, "timestamp": rfc3339_ns(ts), "severity": "info", "attributes": []}
            for ts, msg in dep.logs
            if (lo is None or ts >= lo) and (hi is None or ts <= hi)
            and (not filter or filter in msg)
        ]
        return lines[: min(limit or 100, 5000)]

    # ---- mutations -----------------------------------------------------------------------
    def serviceCreate(self, info: Any, input: dict[str, Any]) -> dict[str, Any]:
        proj = self._project(input["projectId"])
        source = {k: v for k, v in (input.get("source") or {}).items() if v}
        svc = self.fake._create(proj, input.get("name") or "", input.get("variables") or {}, source)
        if source:
            self.fake._deploy(svc)  # Railway deploys a service created with a source
        return {"id": svc.id, "name": svc.name, "projectId": proj.id}

    def variableCollectionUpsert(self, info: Any, input: dict[str, Any]) -> bool:
        self._project(input["projectId"])
        svc = self._svc(input["serviceId"])
        if input.get("replace"):
            svc.variables.clear()
        svc.variables.update(input["variables"])
        if not input.get("skipDeploys") and svc.deployments:
            self.fake._deploy(svc)
        return True

    def serviceInstanceUpdate(
        self, info: Any, serviceId: str, input: dict[str, Any], environmentId: str | None = None
    ) -> bool:
        svc = self._svc(serviceId)
        for key, value in input.items():
            if key == "source":
                svc.source = {k: v for k, v in value.items() if v}
            else:
                svc.settings[key] = value
        return True

    def serviceInstanceDeployV2(
        self, info: Any, environmentId: str, serviceId: str, commitSha: str | None = None
    ) -> str:
        svc = self._svc(serviceId)
        if not svc.source:
            raise FakeError("Service has no source to deploy")
        return self.fake._deploy(svc).id

    def deploymentStop(self, info: Any, id: str) -> bool:
        _, dep = self._dep(id)
        if dep.override is None and not dep.finished:
            dep.override = "REMOVED"
        self.fake._kill(dep)
        return True

    def serviceDelete(self, info: Any, id: str, environmentId: str | None = None) -> bool:
        svc = self._svc(id)
        for dep in svc.deployments:
            self.fake._kill(dep)
        del self.fake.projects[svc.project_id].services[svc.id]
        return True
