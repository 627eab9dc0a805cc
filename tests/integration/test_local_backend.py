"""The local backend with real subprocesses: process groups, restart policy, adoption, logs."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from gardener.backends.base import EnsureOutcome, ServiceSpec, Status
from gardener.backends.local import NONCE_VAR, LocalBackend, ProcessRecord, _proc_stat
from gardener.backends.railway.names import service_name
from gardener.backends.reconcile import Backoff, reconcile_once
from gardener.core.types import DesiredState
from gardener.errors import CrossAccountKillForbidden

SCRIPT = textwrap.dedent(
    """
    import os, signal, subprocess, sys, time
    mode = os.environ["MODE"]
    print("started", os.environ["GARDENER_CANON_NAME"], os.environ.get("TRAIN_STEPS"), flush=True)
    if mode == "exit0":
        print("DONE: bpb=1.9000", flush=True)
        sys.exit(0)
    if mode == "crash":
        sys.exit(3)
    if mode == "ignore_term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if mode == "grandchild":
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        open(os.environ["CHILD_PID_FILE"], "w").write(str(child.pid))
    for i in range(100000):
        print(f"step={i} BPB=3.0000", flush=True)
        time.sleep(0.05)
    """
)
_n = itertools.count()


@pytest.fixture
def script(tmp_path: Path) -> Path:
    path = tmp_path / "fake_trainer.py"
    path.write_text(SCRIPT)
    return path


@pytest.fixture
async def backend(tmp_path: Path) -> AsyncIterator[LocalBackend]:
    b = LocalBackend("acc1", tmp_path / "data", grace=1.0, poll=0.01)
    yield b
    await b.teardown()


def spec(script: Path, mode: str, *, account: str = "acc1", name: str | None = None,
         desired: DesiredState = DesiredState.RUNNING, **env: str) -> ServiceSpec:
    return ServiceSpec(
        canon_name=name or f"IGLA-NCA-FP32-SMOKE-seed{500 + next(_n)}", account=account,
        desired=desired, variables={"MODE": mode, "TRAIN_STEPS": "500", **env},
        command=(sys.executable, str(script)),
    )


async def until(predicate: Callable[[], object], within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    for _ in itertools.count():
        if predicate():
            return
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.02)


async def status_of(b: LocalBackend, canon: str) -> Status | None:
    for s in await b.observe():
        if s.canon_name == canon:
            return s.status
    return None


def pid_alive(pid: int) -> bool:
    st = _proc_stat(pid)
    return st is not None and st[0] not in ("Z", "X")


async def test_start_observe_logs_and_idempotence(backend: LocalBackend, script: Path) -> None:
    s = spec(script, "sleep")
    assert await backend.ensure(s) is EnsureOutcome.CREATED
    assert await backend.ensure(s) is EnsureOutcome.UNCHANGED
    states = await backend.observe()
    assert [(x.canon_name, x.status, x.owned) for x in states] == [
        (s.canon_name, Status.RUNNING, True)
    ]
    rec = backend.records()[0]
    assert rec.pgid == rec.pid and os.getpgid(rec.pid) == rec.pid != os.getpgid(0)
    assert rec.short_name == service_name(s.canon_name)
    log_file = backend.state_dir / f"{rec.short_name}.log"
    await until(lambda: len(log_file.read_text().splitlines()) >= 3)
    first = await backend.tail(s.canon_name)
    assert first[0].message == f"started {s.canon_name} 500"  # the spec's variables + the marker
    assert first[1].message.startswith("step=0 BPB=")
    again = await backend.tail(s.canon_name, first[-1].cursor)
    seen = [x.message for x in first + again]
    assert len(seen) == len(set(seen)), "no line twice"
    follow = backend.logs(s.canon_name, poll_interval=0.01, cursor=(again or first)[-1].cursor)
    nxt = await asyncio.wait_for(follow.__anext__(), 10)
    assert nxt.message not in seen and nxt.message.startswith("step=")
    await follow.aclose()  # type: ignore[attr-defined]
    assert await backend.stop(s.canon_name)
    assert not pid_alive(rec.pid or 0)
    assert await status_of(backend, s.canon_name) is Status.STOPPED


async def test_clean_exit_is_succeeded(backend: LocalBackend, script: Path) -> None:
    s = spec(script, "exit0")
    await backend.ensure(s)
    await until(lambda: backend._exit_code(backend.records()[0]) is not None)
    assert await status_of(backend, s.canon_name) is Status.SUCCEEDED
    report = await reconcile_once([s], backend)
    assert report.converged and report.results == []
    assert [x.message for x in await backend.tail(s.canon_name)][-1] == "DONE: bpb=1.9000"


async def test_crashes_restart_twice_then_fail(backend: LocalBackend, script: Path) -> None:
    s = spec(script, "crash")
    backoff = Backoff(base=0.0, cap=0.0, jitter=0.0)
    restarted: list[str] = []
    failed: list[str] = []
    for _ in range(40):
        report = await reconcile_once([s], backend, backoff=backoff)
        restarted += report.restarted
        failed += report.failed
        if failed:
            break
        await asyncio.sleep(0.1)
    assert restarted == [s.canon_name, s.canon_name]  # ON_FAILURE, max 2 retries
    assert failed and failed[0] == s.canon_name
    assert await status_of(backend, s.canon_name) is Status.FAILED
    starts = [x for x in await backend.tail(s.canon_name) if x.message.startswith("started")]
    assert len(starts) == 3
    assert (await reconcile_once([s], backend)).failed == [s.canon_name]  # stays failed


async def test_stop_kills_the_whole_group(
    backend: LocalBackend, script: Path, tmp_path: Path
) -> None:
    pid_file = tmp_path / "child.pid"
    s = spec(script, "grandchild", CHILD_PID_FILE=str(pid_file))
    await backend.ensure(s)
    await until(pid_file.exists)
    await until(lambda: pid_file.read_text().strip() != "")
    grandchild = int(pid_file.read_text())
    assert pid_alive(grandchild)
    assert await backend.stop(s.canon_name)
    await until(lambda: not pid_alive(grandchild), within=5)
    assert not await backend.stop(s.canon_name)  # idempotent


async def test_sigkill_after_the_grace(backend: LocalBackend, script: Path) -> None:
    backend.grace = 0.3
    s = spec(script, "ignore_term")
    await backend.ensure(s)
    log_file = backend.state_dir / f"{backend.records()[0].short_name}.log"
    await until(lambda: log_file.exists() and log_file.stat().st_size > 0)
    pid = backend.records()[0].pid or 0
    t0 = time.monotonic()
    assert await backend.stop(s.canon_name)
    assert time.monotonic() - t0 >= 0.3
    assert not pid_alive(pid)


async def test_a_restarted_gardener_adopts_live_trials(
    backend: LocalBackend, script: Path, tmp_path: Path
) -> None:
    s = spec(script, "sleep")
    await backend.ensure(s)
    pid = backend.records()[0].pid
    log_file = backend.state_dir / f"{backend.records()[0].short_name}.log"
    await until(lambda: log_file.exists() and log_file.stat().st_size > 40)
    early = await backend.tail(s.canon_name)
    # a new gardener on the same data directory: it did not start the process
    again = LocalBackend("acc1", tmp_path / "data", grace=1.0, poll=0.01)
    report = await reconcile_once([s], again)
    assert report.adopted == [s.canon_name]
    assert report.results == [] and report.restarted == []
    assert again.records()[0].pid == pid and pid_alive(pid or 0)
    await until(lambda: log_file.stat().st_size > int(early[-1].cursor) + 20)
    more = await again.tail(s.canon_name, early[-1].cursor)
    assert more and not {x.message for x in more} & {x.message for x in early}
    assert await again.stop(s.canon_name)
    assert not pid_alive(pid or 0)


async def test_a_restarted_gardener_restarts_dead_trials(
    backend: LocalBackend, script: Path, tmp_path: Path
) -> None:
    s = spec(script, "sleep")
    await backend.ensure(s)
    rec = backend.records()[0]
    os.killpg(rec.pgid or 0, signal.SIGKILL)  # the trial died with the machine: no exit code
    await until(lambda: not pid_alive(rec.pid or 0))
    again = LocalBackend("acc1", tmp_path / "data", grace=1.0, poll=0.01)
    states = await again.observe()
    assert states[0].status is Status.CRASHED and states[0].raw_status == "LOST"
    report = await reconcile_once([s], again)
    assert report.restarted == [s.canon_name] and report.adopted == []
    new = again.records()[0]
    assert new.pid != rec.pid and pid_alive(new.pid or 0) and new.restarts == 1
    await again.teardown()


async def test_a_spawn_interrupted_before_its_record_is_found(
    backend: LocalBackend, script: Path
) -> None:
    """The record is written before the spawn; a process with its nonce is claimed later."""
    canon = "IGLA-NCA-FP32-SMOKE-seed999"
    short = service_name(canon)
    nonce = "f" * 32
    rec = ProcessRecord(canon_name=canon, account="acc1", short_name=short, nonce=nonce,
                        log_path=str(backend.state_dir / f"{short}.log"),
                        exit_path=str(backend.state_dir / f"{short}.exit"))
    backend._save(rec)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(script), start_new_session=True,
        stdout=asyncio.subprocess.DEVNULL,
        env={**os.environ, "MODE": "sleep", "GARDENER_CANON_NAME": canon, NONCE_VAR: nonce},
    )
    try:
        states = await backend.observe()
        assert [(x.canon_name, x.status) for x in states] == [(canon, Status.RUNNING)]
        assert backend.records()[0].pid == proc.pid
        assert await backend.stop(canon)
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def test_accounts_are_kept_apart(backend: LocalBackend, script: Path, tmp_path: Path) -> None:
    other = LocalBackend("acc2", tmp_path / "data", grace=1.0, poll=0.01)
    theirs = spec(script, "sleep", account="acc2")
    await other.ensure(theirs)
    with pytest.raises(CrossAccountKillForbidden):
        await backend.ensure(theirs)
    with pytest.raises(CrossAccountKillForbidden):
        await backend.stop(theirs.canon_name)  # the record says acc2
    with pytest.raises(CrossAccountKillForbidden):
        await backend.remove(theirs.canon_name, account="acc2")
    states = await backend.observe()
    assert [(x.canon_name, x.owned) for x in states] == [(theirs.canon_name, False)]
    report = await reconcile_once([], backend, prune_orphans=True)
    assert report.orphans == [] and report.results == []
    assert await status_of(other, theirs.canon_name) is Status.RUNNING
    await other.teardown()


async def test_orphans_are_pruned_only_when_asked(backend: LocalBackend, script: Path) -> None:
    keep, orphan = spec(script, "sleep"), spec(script, "sleep")
    await reconcile_once([keep, orphan], backend)
    report = await reconcile_once([keep], backend)
    assert report.orphans == [orphan.canon_name] and report.results == []
    report = await reconcile_once([keep], backend, prune_orphans=True)
    assert [(r.canon_name, r.outcome) for r in report.results] == [(orphan.canon_name, "removed")]
    assert [r.canon_name for r in backend.records()] == [keep.canon_name]


async def test_desired_stopped_then_running_again(backend: LocalBackend, script: Path) -> None:
    s = spec(script, "sleep")
    await reconcile_once([s], backend)
    stopped = ServiceSpec(**{**s.__dict__, "desired": DesiredState.STOPPED})
    report = await reconcile_once([stopped], backend)
    assert [r.outcome for r in report.results] == ["stopped"]
    assert await status_of(backend, s.canon_name) is Status.STOPPED
    report = await reconcile_once([s], backend)
    assert [r.outcome for r in report.results] == ["deployed"]
    assert await status_of(backend, s.canon_name) is Status.RUNNING


async def test_the_reference_trainer_runs_as_a_local_trial(backend: LocalBackend) -> None:
    from gardener.core.canon import parse
    from gardener.trainer.spec import load_models_config, trainer_variables

    canon = "IGLA-HYBRID-FP32-WSD-SMOKE-seed500"
    variables = trainer_variables(parse(canon), steps=20, corpus="stdlib",
                                  models=load_models_config())
    s = ServiceSpec(canon_name=canon, account="acc1", variables=variables)  # default command
    await backend.ensure(s)
    await until(lambda: backend._exit_code(backend.records()[0]) is not None, within=60)
    assert await status_of(backend, canon) is Status.SUCCEEDED
    lines = [x.message for x in await backend.tail(canon)]
    assert lines[0].startswith("corpus=stdlib sha256=")
    assert any(line.startswith("step=20 BPB=") for line in lines)
    assert lines[-1].startswith("DONE: bpb=")


GARDENER_PROCESS = """
import asyncio, sys
from gardener.backends.base import ServiceSpec
from gardener.backends.local import LocalBackend

data_dir, script, canon = sys.argv[1:4]

async def main():
    backend = LocalBackend("acc1", data_dir)
    spec = ServiceSpec(canon_name=canon, account="acc1", variables={"MODE": "sleep"},
                       command=(sys.executable, script))
    print((await backend.ensure(spec)).value, backend.records()[0].pid, flush=True)

asyncio.run(main())
"""


async def test_trials_outlive_the_gardener_process_and_are_adopted(
    backend: LocalBackend, script: Path, tmp_path: Path
) -> None:
    """A gardener process starts a trial and exits; the next one adopts it, then stops it."""
    canon = "IGLA-PHI-FP32-SMOKE-seed777"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", GARDENER_PROCESS, str(tmp_path / "data"), str(script), canon,
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0
    outcome, pid_text = out.decode().splitlines()[-1].split()  # after the log lines
    pid = int(pid_text)
    assert outcome == "created" and pid_alive(pid)  # the gardener is gone, the trial is not
    spec_ = ServiceSpec(canon_name=canon, account="acc1", variables={"MODE": "sleep"},
                        command=(sys.executable, str(script)))
    report = await reconcile_once([spec_], backend)
    assert report.adopted == [canon] and report.results == []
    assert await backend.ensure(spec_) is EnsureOutcome.UNCHANGED
    log_file = backend.state_dir / f"{service_name(canon)}.log"
    await until(lambda: log_file.stat().st_size > 40)
    lines = await backend.tail(canon)
    assert lines[0].message.startswith(f"started {canon}")
    assert await backend.stop(canon)
    assert not pid_alive(pid)
    assert await status_of(backend, canon) is Status.STOPPED
