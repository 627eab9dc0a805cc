"""Local trainers: an allowlisted environment (finding 3) and log tails that no byte sequence
can freeze (finding 9), with real subprocesses."""

from __future__ import annotations

import asyncio
import sys
import textwrap
from pathlib import Path

from gardener.backends.base import ServiceSpec, Status
from gardener.backends.local import LocalBackend
from gardener.backends.railway.templates import INGEST_TOKEN_VAR, INGEST_URL_VAR

SECRETS = {
    "RAILWAY_TOKEN_ACC1": "rw-acc1-secret",
    "RAILWAY_TOKEN_ACC2": "rw-acc2-secret",
    "GARDENER_INGEST_TOKEN_ACC1": "ingest-acc1-secret",
    "GARDENER_INGEST_TOKEN_ACC2": "ingest-acc2-secret",
    "DATABASE_URL": "postgresql://postgres:superuser-pw@127.0.0.1:5432/postgres",
    "GARDENER_DATABASE_URL": "postgresql://postgres:superuser-pw@127.0.0.1/x",
    "PGPASSWORD": "superuser-pw",
    "GARDENER_RAILWAY_PROJECT_ACC1": "project-1",
}
DUMP_ENV = "import os, json; print(json.dumps(dict(os.environ)), flush=True)"


async def _wait_exit(backend: LocalBackend, name: str) -> None:
    for _ in range(500):
        states = {s.canon_name: s.status for s in await backend.observe()}
        if states.get(name) in (Status.SUCCEEDED, Status.FAILED, Status.CRASHED):
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{name} did not finish")


async def _env_of(backend: LocalBackend, spec: ServiceSpec) -> dict[str, str]:
    import json

    await backend.ensure(spec)
    await _wait_exit(backend, spec.canon_name)
    lines = [ln.message for ln in await backend.tail(spec.canon_name)]
    return dict(json.loads(lines[-1]))


async def test_a_trainer_gets_its_variables_and_nothing_of_the_gardeners_secrets(
    tmp_path: Path,
) -> None:
    base = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "LANG": "C.UTF-8", **SECRETS}
    backend = LocalBackend("acc2", tmp_path / "data", base_env=base, grace=1.0, poll=0.01)
    spec = ServiceSpec(
        "IGLA-HYBRID-FP32-WSD-E0005-seed200", "acc2",
        variables={"TRAIN_STEPS": "100", "TRAIN_SEED": "200"},
        command=(sys.executable, "-c", DUMP_ENV),
    )
    env = await _env_of(backend, spec)
    assert env["TRAIN_STEPS"] == "100" and env["TRAIN_SEED"] == "200"
    assert env["GARDENER_CANON_NAME"] == spec.canon_name and env["GARDENER_ACCOUNT"] == "acc2"
    assert env["PATH"] == "/usr/bin:/bin"
    text = repr(env)
    for name, value in SECRETS.items():
        assert name not in env, name
        assert value not in text, name
    assert INGEST_TOKEN_VAR not in env  # it does not post over HTTP


async def test_a_trainer_that_posts_gets_its_own_accounts_ingest_token_only(
    tmp_path: Path,
) -> None:
    backend = LocalBackend("acc2", tmp_path / "data", base_env={"PATH": "/usr/bin:/bin",
                                                                **SECRETS})
    spec = ServiceSpec(
        "IGLA-HYBRID-FP32-WSD-E0006-seed201", "acc2",
        variables={"TRAIN_STEPS": "10", INGEST_URL_VAR: "http://127.0.0.1:9/v1/samples",
                   "RAILWAY_TOKEN_ACC1": "smuggled-in-a-trial-row"},
        command=(sys.executable, "-c", DUMP_ENV),
    )
    env = await _env_of(backend, spec)
    assert env[INGEST_TOKEN_VAR] == "ingest-acc2-secret"
    assert "ingest-acc1-secret" not in repr(env) and "RAILWAY_TOKEN_ACC1" not in env


PROGRESS = textwrap.dedent(
    r"""
    import sys, time
    out = sys.stdout.buffer
    out.write(b"loading 10%\rloading 50%\rloading 100%\n")
    for i in range(1, 61):
        out.write(b"eval " + str(i).encode() + b"%\r")      # a bare \r: a progress bar
        out.write(b"step=%d BPB=2.%04d\n" % (i * 10, i))
        if i == 20:
            out.write(b"\x0b\x0c\x1c\x1d\x1e\x85\xe2\x80\xa8 odd separators\n")
        if i == 40:
            out.write(b"\xff\xfe invalid utf-8 \x00 nul\n")
        out.flush()
    """
)


async def test_no_byte_sequence_freezes_a_log_tail(tmp_path: Path) -> None:
    script = tmp_path / "progress.py"
    script.write_text(PROGRESS)
    backend = LocalBackend("acc1", tmp_path / "data", grace=1.0, poll=0.01)
    name = "IGLA-HYBRID-FP32-WSD-E0007-seed202"
    await backend.ensure(ServiceSpec(name, "acc1", command=(sys.executable, str(script))))
    await _wait_exit(backend, name)
    lines: list[str] = []
    cursor = None
    for _ in range(20):  # tail as the pump does, resuming at the cursor
        got = await backend.tail(name, cursor)
        if not got:
            break
        lines += [ln.message for ln in got]
        cursor = got[-1].cursor
    samples = [ln for ln in lines if ln.startswith("step=")]
    assert len(samples) == 60, samples[-3:]
    assert samples[-1] == "step=600 BPB=2.0060"
    assert "loading 100%" in lines and "eval 60%" in lines
