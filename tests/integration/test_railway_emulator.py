"""The Railway path's parts: the emulator runs and stops real processes, service templates
build from the gardener's repository and pick HTTP or the log, trainers post their lines."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest

from gardener.backends.base import ServiceSpec, Status
from gardener.backends.railway.templates import parse_templates, trainer_spec
from gardener.backends.reconcile import reconcile_once
from gardener.core.types import DesiredState
from gardener.errors import ConfigError
from gardener.trainer.post import SamplePoster
from tests.fake_railway import FakeRailway, make_backend

TOKEN = "emulator-token"
CANON = "IGLA-HYBRID-FP32-WSD-E0005-seed200"
SCRIPT = ("import os, sys, time; print('hello from', os.environ['TRAIN_CANON_NAME'], "
          "os.environ['RAILWAY_SERVICE_NAME'], flush=True); "
          "time.sleep(float(os.environ['NAP'])); sys.exit(int(os.environ['CODE']))")


@pytest.fixture
def emulator() -> Iterator[FakeRailway]:
    with FakeRailway(step_seconds=0.01, visibility_delay=0.0, run_processes=True) as fake:
        yield fake


def spec(nap: float, code: int = 0, desired: DesiredState = DesiredState.RUNNING) -> ServiceSpec:
    return ServiceSpec(
        canon_name=CANON, account="acc1", desired=desired, image="example/gardener:1",
        start_command=f'python -c "{SCRIPT}"',
        variables={"TRAIN_CANON_NAME": CANON, "NAP": str(nap), "CODE": str(code)},
    )


def wait_for(check: object, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


async def test_a_deploy_runs_the_start_command_and_a_stop_stops_it(
    emulator: FakeRailway,
) -> None:
    project = emulator.add_project(TOKEN)
    backend = make_backend(emulator, project, TOKEN)
    report = await reconcile_once([spec(nap=60)], backend)
    assert report.results and report.results[0].error is None
    wait_for(lambda: len(emulator.processes()) == 1)
    (svc,) = emulator.all_services()
    wait_for(lambda: any("hello from" in m for _, m in svc.deployments[-1].logs))
    line = next(m for _, m in svc.deployments[-1].logs if "hello from" in m)
    assert line == f"hello from {CANON} {svc.name}"  # its variables, and Railway's own
    await backend.observe()  # the backend learns the deployment it tails
    lines = await backend.tail(CANON, None)
    assert any("hello from" in ln.message for ln in lines)  # deploymentLogs serves the output
    assert await backend.stop(CANON)
    wait_for(lambda: emulator.processes() == [])
    await backend.aclose()


async def test_a_process_exit_ends_the_deployment(emulator: FakeRailway) -> None:
    project = emulator.add_project(TOKEN)
    backend = make_backend(emulator, project, TOKEN)
    await reconcile_once([spec(nap=0.2, code=0)], backend)
    (svc,) = emulator.all_services()
    wait_for(lambda: svc.deployments[-1].finished)
    states = {s.canon_name: s.status for s in await backend.observe()}
    assert states[CANON] is Status.SUCCEEDED
    await backend.aclose()
    crash = make_backend(emulator, emulator.add_project("other"), "other", account="acc1")
    await reconcile_once([spec(nap=0.1, code=3)], crash)
    svc2 = next(s for s in emulator.all_services() if s is not svc)
    wait_for(lambda: svc2.deployments[-1].override == "CRASHED")
    await crash.aclose()


def test_templates_build_from_the_gardeners_repository_and_choose_the_ingest() -> None:
    shipped = parse_templates({"defaults": {
        "repo": "${RAILWAY_GIT_REPO_OWNER}/${RAILWAY_GIT_REPO_NAME}",
        "branch": "${RAILWAY_GIT_BRANCH}", "start_command": "python -m gardener.trainer"}})
    git = {"RAILWAY_GIT_REPO_OWNER": "team", "RAILWAY_GIT_REPO_NAME": "gardener",
           "RAILWAY_GIT_BRANCH": "main"}
    logs_only = trainer_spec(CANON, "acc1", {}, shipped, environ=git)
    assert (logs_only.repo, logs_only.branch, logs_only.image) == ("team/gardener", "main", None)
    assert "GARDENER_INGEST_URL" not in logs_only.variables  # no address: the log it is
    private = trainer_spec(CANON, "acc1", {}, shipped, environ={
        **git, "RAILWAY_PRIVATE_DOMAIN": "gardener.railway.internal", "PORT": "8080",
        "GARDENER_INGEST_TOKEN_ACC1": "t1"})
    assert private.variables["GARDENER_INGEST_URL"] == \
        "http://gardener.railway.internal:8080/v1/samples"
    assert private.variables["GARDENER_INGEST_TOKEN"] == "t1"
    public = trainer_spec(CANON, "acc2", {}, shipped, environ={
        **git, "RAILWAY_PUBLIC_DOMAIN": "g.up.railway.app", "GARDENER_INGEST_TOKEN_ACC2": "t2"})
    assert public.variables["GARDENER_INGEST_URL"] == "https://g.up.railway.app/v1/samples"
    with pytest.raises(ConfigError, match="RAILWAY_GIT_REPO_OWNER"):
        trainer_spec(CANON, "acc1", {}, shipped, environ={})


class _Gardener(BaseHTTPRequestHandler):
    """A /v1/samples stand-in: answers from a script, records what it took."""

    script: ClassVar[list[int]] = []
    taken: ClassVar[list[dict]] = []
    auth: ClassVar[list[str]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        code = self.script.pop(0) if self.script else 200
        self.auth.append(self.headers.get("Authorization", ""))
        if code == 200:
            self.taken.append(body)
        self.send_response(code)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        pass


def test_the_trainer_posts_in_batches_and_keeps_what_was_not_taken() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Gardener)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Gardener.script, _Gardener.taken, _Gardener.auth = [503, 401], [], []
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1/samples"
        poster = SamplePoster(url, "tok", CANON, batch=2, interval=3600)
        poster.add("corpus=stdlib sha256=ab")
        poster.add("step=10 BPB=2.5000")  # 503: kept
        assert poster.pending == ["corpus=stdlib sha256=ab", "step=10 BPB=2.5000"]
        poster.add("step=20 BPB=2.4000")  # 401: refused for good, dropped (the log has them)
        assert poster.pending == []
        poster.add("step=30 BPB=2.3000")
        poster.add("DONE: bpb=2.3000")
        assert poster.close()
        assert _Gardener.taken == [{"canon_name": CANON,
                                    "lines": ["step=30 BPB=2.3000", "DONE: bpb=2.3000"]}]
        assert set(_Gardener.auth) == {"Bearer tok"}
        assert SamplePoster.from_env({"TRAIN_CANON_NAME": CANON}) is None
    finally:
        server.shutdown()
