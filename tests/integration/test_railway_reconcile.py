"""The whole reconcile path against the fake Railway: a race converges, faults do not duplicate,
foreign services are never touched, accounts are kept apart, a killed pass leaves no duplicate."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator

import pytest
import structlog

from gardener.backends.base import CANON_VAR, ServiceSpec, Status
from gardener.backends.railway.backend import RailwayBackend, normalize
from gardener.backends.railway.names import service_name
from gardener.backends.reconcile import Backoff, ReconcileReport, reconcile_once
from gardener.core.types import DesiredState
from gardener.errors import CrossAccountKillForbidden
from tests.fake_railway import FakeRailway, make_backend

TAGS = ["WSD", "BS8", "GRADFIX", "EMA10", "h512", "h768", "COSINE"]
_n = itertools.count()


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeRailway]:
    with FakeRailway(step_seconds=0.005, visibility_delay=0.02, timeout_sleep=1.3) as server:
        yield server


def race(n: int = 21, account: str = "acc1", **kw: object) -> list[ServiceSpec]:
    names = [f"IGLA-HYBRID-FP32-{t}-SMOKE-seed{s}" for t in TAGS for s in (500, 501, 502)]
    return [
        ServiceSpec(canon_name=c, account=account, variables={"TRAIN_CANON_NAME": c},
                    image="ghcr.io/example/gardener:test",
                    start_command="python -m gardener.trainer", race="smoke",
                    **kw)  # type: ignore[arg-type]
        for c in names[:n]
    ]


class Project:
    def __init__(self, fake: FakeRailway) -> None:
        self.fake = fake
        self.token = f"tok-{next(_n)}-{os.getpid()}"
        self.ids = fake.add_project(self.token)

    def backend(self, **kw: object) -> RailwayBackend:
        return make_backend(self.fake, self.ids, self.token, **kw)  # type: ignore[arg-type]

    def services(self) -> list[object]:
        return [s for s in self.fake.all_services() if s.project_id == self.ids[0]]

    def canon_counts(self) -> Counter[str]:
        return Counter(s.variables.get(CANON_VAR, "") for s in self.services())  # type: ignore[attr-defined]


@pytest.fixture
def project(fake: FakeRailway) -> Project:
    return Project(fake)


async def wait_until(predicate: Callable[[], bool], within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    for _ in itertools.count():
        if predicate():
            return
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.002)


async def converge(
    desired: list[ServiceSpec], backend: RailwayBackend, *, passes: int = 60, **kw: object
) -> tuple[ReconcileReport, int]:
    """Reconcile until nothing is left to do and everything desired running runs."""
    backoff = kw.pop("backoff", None) or Backoff(base=0.0, cap=0.0, jitter=0.0)
    report = None
    for i in range(passes):
        report = await reconcile_once(desired, backend, backoff=backoff, **kw)  # type: ignore[arg-type]
        states = {s.canon_name: s for s in await backend.observe()}
        wanted = [d for d in desired if d.desired is DesiredState.RUNNING]
        if report.converged and all(
            d.canon_name in states and states[d.canon_name].status is Status.RUNNING for d in wanted
        ):
            return report, i + 1
        await asyncio.sleep(0.02)
    raise AssertionError(f"no convergence: {report and report.summary()}")


async def test_a_21_service_race_converges_once(project: Project) -> None:
    backend = project.backend()
    desired = race()
    await converge(desired, backend)
    counts = project.canon_counts()
    assert sorted(counts) == sorted(d.canon_name for d in desired)
    assert set(counts.values()) == {1}
    for svc in project.services():
        assert len(svc.name) <= 32  # type: ignore[attr-defined]
        assert svc.variables["GARDENER_OWNED"] == "1"  # type: ignore[attr-defined]
        assert svc.variables["GARDENER_ACCOUNT"] == "acc1"  # type: ignore[attr-defined]
        assert svc.settings["startCommand"] == "python -m gardener.trainer"  # type: ignore[attr-defined]
        assert svc.settings["restartPolicyType"] == "ON_FAILURE"  # type: ignore[attr-defined]
        assert len(svc.deployments) == 1  # type: ignore[attr-defined]
    # one list read per pass, not one per service
    again = await reconcile_once(desired, backend)
    assert again.converged and again.results == []
    states = await backend.observe()
    assert {s.canon_name for s in states} == {d.canon_name for d in desired}
    await backend.aclose()


async def test_a_second_gardener_adopts_instead_of_duplicating(project: Project) -> None:
    desired = race(5)
    first = project.backend()
    await converge(desired, first)
    second = project.backend()  # a restart: empty caches
    before = project.fake.requests_by_operation["ServiceCreate"]
    report = await reconcile_once(desired, second)
    assert report.converged
    assert project.fake.requests_by_operation["ServiceCreate"] == before
    assert set(project.canon_counts().values()) == {1}
    await first.aclose()
    await second.aclose()


async def test_foreign_services_are_never_touched(project: Project) -> None:
    fake = project.fake
    fake.add_foreign_service(project.ids[0], "postgres", {"PGDATA": "/data"})
    # a foreign service wearing our exact name for one desired trial, without the marker
    desired = race(3)
    fake.add_foreign_service(project.ids[0], service_name(desired[0].canon_name), {})
    backend = project.backend()
    report = await reconcile_once(desired, backend, prune_orphans=True)
    assert report.conflicts == [desired[0].canon_name]
    assert report.orphans == []
    report, _ = await converge(desired[1:], backend, prune_orphans=True)
    names = {s.name for s in project.services()}  # type: ignore[attr-defined]
    assert "postgres" in names and service_name(desired[0].canon_name) in names
    pg = fake.service_by_name("postgres", project.ids[0])
    assert pg is not None and pg.deployments[-1].override is None  # still running
    await backend.aclose()


async def test_orphans_are_reported_and_pruned_only_when_asked(project: Project) -> None:
    backend = project.backend()
    desired = race(4)
    await converge(desired, backend)
    report = await reconcile_once(desired[:2], backend)
    assert sorted(report.orphans) == sorted(d.canon_name for d in desired[2:])
    assert len(project.services()) == 4
    report = await reconcile_once(desired[:2], backend, prune_orphans=True)
    assert sorted(r.canon_name for r in report.results if r.outcome == "removed") == sorted(
        d.canon_name for d in desired[2:]
    )
    assert sorted(project.canon_counts()) == sorted(d.canon_name for d in desired[:2])
    await backend.aclose()


async def test_stop_and_remove(project: Project) -> None:
    backend = project.backend()
    desired = race(2)
    await converge(desired, backend)
    stopped = [ServiceSpec(**{**d.__dict__, "desired": DesiredState.STOPPED}) for d in desired]
    report = await reconcile_once(stopped, backend)
    assert [r.outcome for r in report.results] == ["stopped", "stopped"]
    svc = project.fake.service_by_name(service_name(desired[0].canon_name), project.ids[0])
    assert svc is not None and svc.deployments[-1].override == "REMOVED"
    assert all(s.status is Status.STOPPED for s in await backend.observe())
    assert (await reconcile_once(stopped, backend)).results == []
    removed = [ServiceSpec(**{**d.__dict__, "desired": DesiredState.REMOVED}) for d in desired]
    report = await reconcile_once(removed, backend)
    assert [r.outcome for r in report.results] == ["removed", "removed"]
    assert project.services() == []
    await backend.aclose()


async def test_cross_account_is_refused_before_any_request(project: Project) -> None:
    backend = project.backend(account="acc1")
    before = project.fake.requests
    other = race(1, account="acc2")[0]
    with pytest.raises(CrossAccountKillForbidden):
        await backend.ensure(other)
    with pytest.raises(CrossAccountKillForbidden):
        await backend.stop(other.canon_name, account="acc2")
    with pytest.raises(CrossAccountKillForbidden):
        await backend.remove(other.canon_name, account="acc2")
    assert project.fake.requests == before
    report = await reconcile_once([other], backend)  # the reconciler reports it, touches nothing
    assert report.errors and "acc2" in (report.errors[0].error or "")
    assert project.services() == []
    await backend.aclose()


async def test_a_create_that_timed_out_but_happened_is_found(project: Project) -> None:
    backend = project.backend()
    desired = race(1)
    project.fake.push_fault("applied_timeout", "ServiceCreate")
    report = await reconcile_once(desired, backend)
    assert report.errors == [], report.errors
    assert project.fake.requests_by_operation["ServiceCreate"] >= 1
    await converge(desired, backend)
    assert project.canon_counts() == Counter({desired[0].canon_name: 1})
    await backend.aclose()


async def test_one_broken_service_does_not_stall_the_rest(project: Project) -> None:
    backend = project.backend(max_attempts=2)
    desired = race(3)
    project.fake.push_fault("500", "ServiceInstanceUpdate", count=2)  # all attempts of one service
    clock = [100.0]
    backoff = Backoff(base=5.0, cap=60.0, jitter=0.0)
    report = await reconcile_once(desired, backend, backoff=backoff, clock=lambda: clock[0],
                                  concurrency=1)
    assert len(report.errors) == 1 and report.errors[0].temporary
    broken = report.errors[0].canon_name
    assert len([r for r in report.results if r.error is None]) == 2
    assert not backoff.ready(broken, 101.0)
    report = await reconcile_once(desired, backend, backoff=backoff, clock=lambda: clock[0])
    assert broken in report.backing_off
    clock[0] = 106.0
    await converge(desired, backend, backoff=backoff, clock=lambda: clock[0])
    assert set(project.canon_counts().values()) == {1}
    await backend.aclose()


async def test_a_spent_budget_stops_the_pass_early(project: Project) -> None:
    backend = project.backend(budget_per_hour=8)
    desired = race(6)
    report = await reconcile_once(desired, backend, concurrency=1)
    assert report.budget_exhausted
    assert report.deferred, "the rest waits for the next pass"
    assert backend.client.requests_sent == 8
    await backend.aclose()


async def test_a_step_budget_defers_the_rest(project: Project) -> None:
    backend = project.backend()
    report = await reconcile_once(race(5), backend, budget=2)
    assert len(report.results) == 2 and len(report.deferred) == 3
    await backend.aclose()


async def test_a_deploy_not_yet_visible_is_not_repeated(fake: FakeRailway) -> None:
    slow = FakeRailway(visibility_delay=2.0, step_seconds=0.01)
    with slow:
        project = Project(slow)
        backend = project.backend(deploy_grace=30.0)
        desired = race(2)
        await reconcile_once(desired, backend)
        t0 = time.monotonic()
        passes = 0
        while time.monotonic() - t0 < 1.5:  # well inside the 2 s the fake hides them
            report = await reconcile_once(desired, backend)
            assert report.results == []
            raw = {s.raw_status for s in await backend.observe()}
            assert raw <= {"DEPLOY_REQUESTED", "QUEUED", "INITIALIZING", "BUILDING",
                           "DEPLOYING", "SUCCESS"}
            passes += 1
            await asyncio.sleep(0.05)
        assert passes >= 2
        assert slow.requests_by_operation["ServiceDeploy"] == 2

        def all_running() -> bool:
            return slow.requests_by_operation["ListServices"] > 0 and all(
                s.variables and s.deployments and slow.visible(s.deployments[-1])
                for s in slow.all_services()
            )

        await wait_until(all_running, within=10)
        assert all(s.status is Status.RUNNING for s in await backend.observe())
        assert slow.requests_by_operation["ServiceDeploy"] == 2
        await backend.aclose()


async def test_crashed_is_reported_as_failed(project: Project) -> None:
    backend = project.backend()
    desired = race(2)
    await converge(desired, backend)
    project.fake.crash(service_name(desired[0].canon_name), project.ids[0])
    report = await reconcile_once(desired, backend)
    assert report.failed == [desired[0].canon_name]
    assert normalize("CRASHED") is Status.FAILED
    project.fake.finish(service_name(desired[1].canon_name), project.ids[0])
    states = {s.canon_name: s for s in await backend.observe()}
    assert states[desired[1].canon_name].status is Status.SUCCEEDED
    await backend.aclose()


async def test_deployment_logs_are_tailed_without_duplicates(project: Project) -> None:
    backend = project.backend()
    desired = race(1)
    await converge(desired, backend)
    name = service_name(desired[0].canon_name)
    canon = desired[0].canon_name
    t0 = time.time_ns()
    fake = project.fake
    fake.add_log(name, "corpus=stdlib sha256=abc", t0, project.ids[0])
    fake.add_log(name, "step=10 BPB=3.1000", t0 + 1, project.ids[0])
    # the same nanosecond as the line before: the boundary case
    fake.add_log(name, "step=20 BPB=2.9000", t0 + 1, project.ids[0])
    first = await backend.tail(canon)
    assert [x.message for x in first] == [
        "corpus=stdlib sha256=abc", "step=10 BPB=3.1000", "step=20 BPB=2.9000"
    ]
    assert first[-1].timestamp.endswith("Z") and len(first[-1].timestamp.split(".")[1]) == 10
    assert await backend.tail(canon, first[-1].cursor) == []
    # a line arriving later with the same timestamp again
    fake.add_log(name, "step=30 BPB=2.8000", t0 + 1, project.ids[0])
    fake.add_log(name, "step=40 BPB=2.7000", t0 + 5, project.ids[0])
    second = await backend.tail(canon, first[-1].cursor)
    assert [x.message for x in second] == ["step=30 BPB=2.8000", "step=40 BPB=2.7000"]
    # resuming from a middle cursor gives exactly the lines after it
    middle = await backend.tail(canon, first[1].cursor)
    assert [x.message for x in middle] == [
        "step=20 BPB=2.9000", "step=30 BPB=2.8000", "step=40 BPB=2.7000"
    ]
    follow = backend.logs(canon, poll_interval=0.01, cursor=second[-1].cursor)
    fake.add_log(name, "DONE: bpb=2.7000", t0 + 9, project.ids[0])
    line = await asyncio.wait_for(follow.__anext__(), 5)
    assert line.message == "DONE: bpb=2.7000"
    await follow.aclose()  # type: ignore[attr-defined]
    await backend.aclose()


async def test_the_token_never_reaches_the_logs(project: Project) -> None:
    backend = project.backend(max_attempts=2)
    project.fake.push_fault("500", "ServiceDeploy", count=2)
    with structlog.testing.capture_logs() as logs:
        await converge(race(3), backend)
    assert len(logs) > 5
    assert project.token not in repr(logs)
    assert project.token not in repr(backend) and project.token not in repr(backend.client)
    await backend.aclose()


async def test_cancelling_a_pass_midway_leaves_no_duplicate(project: Project) -> None:
    desired = race()
    backend = project.backend()
    task = asyncio.create_task(reconcile_once(desired, backend, concurrency=4))
    await wait_until(lambda: len(project.services()) >= 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    partial = len(project.services())
    assert 0 < partial < len(desired)
    await backend.aclose()
    restarted = project.backend()
    await converge(desired, restarted)
    counts = project.canon_counts()
    assert sorted(counts) == sorted(d.canon_name for d in desired) and set(counts.values()) == {1}
    await restarted.aclose()


KILLED_PASS = """
import asyncio, sys
from gardener.backends.base import ServiceSpec
from gardener.backends.railway.backend import RailwayBackend
from gardener.backends.railway.client import RailwayClient
from gardener.backends.reconcile import reconcile_once

url, token, project_id, environment_id = sys.argv[1:5]
names = sys.argv[5:]

async def main():
    client = RailwayClient(token, base_url=url, timeout=5)
    backend = RailwayBackend("acc1", client, project_id=project_id, environment_id=environment_id)
    specs = [ServiceSpec(canon_name=n, account="acc1", image="img") for n in names]
    while True:
        await reconcile_once(specs, backend, concurrency=2)

asyncio.run(main())
"""


async def test_killing_the_gardener_mid_pass_leaves_no_duplicate(project: Project) -> None:
    desired = race()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", KILLED_PASS, project.fake.url, project.token, *project.ids,
        *(d.canon_name for d in desired),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        await wait_until(
            lambda: len(project.services()) >= 8 or proc.returncode is not None, within=60
        )
        assert proc.returncode is None, "the pass ended by itself"
    finally:
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    assert len(project.services()) < len(desired)
    backend = project.backend()
    await converge(desired, backend)
    counts = project.canon_counts()
    assert sorted(counts) == sorted(d.canon_name for d in desired) and set(counts.values()) == {1}
    await backend.aclose()


async def test_twenty_percent_faults_converge_without_duplicates(project: Project) -> None:
    fake = project.fake
    desired = race()
    backend = project.backend()
    fake.set_fault_rate(0.2, seed=7)
    try:
        await converge(desired, backend, passes=200)
    finally:
        fake.set_fault_rate(0.0)
    counts = project.canon_counts()
    assert sorted(counts) == sorted(d.canon_name for d in desired) and set(counts.values()) == {1}
    assert sum(fake.faults_injected.values()) > 0
    await backend.aclose()


async def test_trainer_services_from_templates(project: Project) -> None:
    """railway.toml template + TRAIN_* variables + marker, reconciled onto the fake."""
    from gardener.backends.railway.templates import load_templates, parse_templates, trainer_spec
    from gardener.core.canon import parse
    from gardener.errors import ConfigError
    from gardener.trainer.spec import load_models_config, trainer_variables

    shipped = load_templates()  # the repository's configs/railway.toml parses
    assert shipped.default.start_command == "python -m gardener.trainer"
    templates = parse_templates({
        "defaults": {"image": "ghcr.io/example/gardener:1", "variables": {"PYTHONUNBUFFERED": "1"}},
        "models": {"PHI": {"max_retries": 5, "restart_policy": "NEVER"}},
    })
    models = load_models_config()
    canons = ["IGLA-HYBRID-FP32-WSD-SMOKE-seed500", "IGLA-PHI-GF16-h512-SMOKE-seed501"]
    specs = [
        trainer_spec(c, "acc1", trainer_variables(parse(c), steps=500, corpus="stdlib",
                                                  models=models), templates, race="smoke")
        for c in canons
    ]
    backend = project.backend()
    await converge(specs, backend)
    hybrid = project.fake.service_by_name(service_name(canons[0]), project.ids[0])
    phi = project.fake.service_by_name(service_name(canons[1]), project.ids[0])
    assert hybrid is not None and phi is not None
    assert hybrid.variables["TRAIN_CANON_NAME"] == canons[0]
    assert hybrid.variables["TRAIN_STEPS"] == "500" and hybrid.variables["PYTHONUNBUFFERED"] == "1"
    assert hybrid.variables["GARDENER_RACE"] == "smoke"
    assert hybrid.source == {"image": "ghcr.io/example/gardener:1"}
    assert hybrid.settings["restartPolicyMaxRetries"] == 2
    assert phi.settings["restartPolicyType"] == "NEVER"
    assert phi.settings["restartPolicyMaxRetries"] == 5
    with pytest.raises(ConfigError, match="restart_policy"):
        parse_templates({"defaults": {"restart_policy": "SOMETIMES"}})
    http = parse_templates({"defaults": {"image": "x", "ingest": "http", "ingest_url": "https://g/v1"}})
    spec = trainer_spec(canons[0], "acc1", {}, http,
                        environ={"GARDENER_INGEST_TOKEN_ACC1": "ingest-secret"})
    assert spec.variables["GARDENER_INGEST_URL"] == "https://g/v1"
    assert spec.variables["GARDENER_INGEST_TOKEN"] == "ingest-secret"
    with pytest.raises(ConfigError, match="GARDENER_INGEST_TOKEN_ACC1"):
        trainer_spec(canons[0], "acc1", {}, http, environ={})
    await backend.aclose()


async def test_a_service_deleted_behind_our_back_is_created_again(project: Project) -> None:
    from gardener.backends.base import TemporaryBackendError

    backend = project.backend()
    desired = race(1)
    await converge(desired, backend)
    await backend.stop(desired[0].canon_name)
    await backend.observe()  # the cache now says: exists, stopped
    svc = project.fake.service_by_name(service_name(desired[0].canon_name), project.ids[0])
    assert svc is not None
    with project.fake.lock:
        del project.fake.projects[project.ids[0]].services[svc.id]
    with pytest.raises(TemporaryBackendError, match="vanished"):
        await backend.ensure(desired[0])
    await converge(desired, backend)
    assert project.canon_counts() == Counter({desired[0].canon_name: 1})
    await backend.aclose()


async def test_a_failed_marker_read_fails_the_observe_with_a_typed_error(project: Project) -> None:
    from gardener.backends.base import TemporaryBackendError

    desired = race(6)
    first = project.backend()
    await converge(desired, first)
    await first.aclose()
    fresh = project.backend(max_attempts=1)  # a restart: every marker is read again
    project.fake.push_fault("500", "ServiceVariables")
    with pytest.raises(TemporaryBackendError):
        await fresh.observe()
    report = await reconcile_once(desired, fresh)  # the next pass reads the rest and goes on
    assert report.observe_error is None and report.converged
    assert len(report.states) == 6 and all(s.owned for s in report.states)
    await fresh.aclose()
