"""The local backend: one subprocess per trial, in its own process group, state on disk.

Each trial runs ``/bin/sh -c '"$@"; echo $? > EXIT' EXIT <command...>`` with an allowlisted
environment (``trainer_env``: the spec's variables, ownership marker included, and nothing of
the gardener's secrets), in a new session (so its process
group can be killed as a whole), stdout and stderr appended to ``<short>.log``. The record
``<data_dir>/local/<short>.json`` holds pid, pgid, the kernel start time of the pid, the
canon name, the account, restarts and paths, so that after a gardener restart a live trial is
ADOPTED (the pid is alive, not a zombie, and has the recorded start time: it is ours) and a
dead one is seen as crashed and RESTARTED by the reconciler. Because output goes to a file, a
trial survives the gardener dying, and ``tail`` resumes from a byte offset.

Statuses: alive -> running; exit 0 -> succeeded; non-zero exit (or vanished without an exit
code) -> crashed while the restart policy has retries (ON_FAILURE, default 2), then failed.
Stop sends SIGTERM to the group, then SIGKILL after ``grace`` seconds.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import structlog

from gardener.backends.base import (
    EnsureOutcome,
    LogLine,
    RestartPolicy,
    ServiceSpec,
    ServiceState,
    Status,
    check_account,
)
from gardener.backends.railway.names import service_name
from gardener.backends.railway.templates import INGEST_TOKEN_VAR, INGEST_URL_VAR

log = structlog.get_logger("gardener.backends.local")

DEFAULT_COMMAND: tuple[str, ...] = (sys.executable, "-m", "gardener.trainer")
_WRAPPER = '"$@"; code=$?; echo "$code" > "$0.tmp" && mv "$0.tmp" "$0"; exit "$code"'
NONCE_VAR = "GARDENER_LOCAL_NONCE"


@dataclass
class ProcessRecord:
    """What is on disk for one trial (no secrets: variables are not stored)."""

    canon_name: str
    account: str
    short_name: str
    nonce: str
    log_path: str
    exit_path: str
    pid: int | None = None
    pgid: int | None = None
    start_ticks: int | None = None  # /proc/<pid>/stat field 22: tells a reused pid apart
    started_at: float | None = None  # wall clock
    restarts: int = 0
    max_retries: int = 2
    restart_policy: str = RestartPolicy.ON_FAILURE.value
    stopped: bool = False  # stopped on purpose: never restarted by the policy
    failed: bool = False  # retries spent


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, pgrp, start ticks) of a pid from /proc, None when it does not exist."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = text[text.rfind(")") + 2 :].split()
    return fields[0], int(fields[2]), int(fields[19])


def _group_alive(pgid: int) -> bool:
    """Whether any non-zombie process is left in the process group."""
    proc = Path("/proc")
    if not proc.exists():  # not Linux: zombies cannot be told apart
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True
    for entry in proc.iterdir():
        if entry.name.isdigit():
            st = _proc_stat(int(entry.name))
            if st is not None and st[1] == pgid and st[0] not in ("Z", "X"):
                return True
    return False


def _pids_with_nonce(nonce: str) -> list[int]:
    """Processes whose environment carries ``GARDENER_LOCAL_NONCE=nonce`` (a crash mid-spawn)."""
    needle = f"{NONCE_VAR}={nonce}".encode()
    found = []
    for entry in Path("/proc").iterdir() if Path("/proc").exists() else ():
        if entry.name.isdigit():
            try:
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return sorted(found)


# What a trainer inherits from the gardener's environment: how to run a program, never a
# credential or the gardener's own settings.
_INHERITED = frozenset(
    {"PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TERM",
     "PYTHONPATH", "PYTHONHASHSEED", "PYTHONUNBUFFERED", "VIRTUAL_ENV", "LD_LIBRARY_PATH",
     "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "XDG_RUNTIME_DIR"}
)


def _inherited(name: str) -> bool:
    return name in _INHERITED or name.startswith("LC_")


def _secret_name(name: str) -> bool:
    """A variable the gardener never hands to a trainer, whatever a trial row stores."""
    upper = name.upper()
    return (
        upper.startswith(("RAILWAY_TOKEN", "GARDENER_INGEST_TOKEN_", "DATABASE_URL", "PG"))
        or upper in ("GARDENER_DATABASE_URL",)
    )


def _read_from(path: str, offset: int) -> bytes:
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            return fh.read()
    except FileNotFoundError:
        return b""


class LocalBackend:
    """Trials as local subprocesses; see the module docstring."""

    kind = "local"
    service_name_of = staticmethod(service_name)

    def __init__(
        self,
        account: str,
        data_dir: str | Path,
        *,
        default_command: tuple[str, ...] = DEFAULT_COMMAND,
        grace: float = 5.0,
        base_env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
        poll: float = 0.02,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.account = account
        self.state_dir = Path(data_dir) / "local"
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.default_command = tuple(default_command)
        self.grace = grace
        self.base_env = dict(os.environ if base_env is None else base_env)
        self.cwd = str(cwd) if cwd is not None else None
        self.poll = poll
        self._clock = clock
        self._children: dict[int, subprocess.Popen[bytes]] = {}  # pid -> our own child
        self._adopted: set[str] = set()
        self._log = log.bind(account=account)

    def __repr__(self) -> str:
        return f"LocalBackend(account={self.account!r}, state_dir={str(self.state_dir)!r})"

    # ---- records -------------------------------------------------------------------------
    def _path(self, short: str) -> Path:
        return self.state_dir / f"{short}.json"

    def _load(self, canon_name: str) -> ProcessRecord | None:
        return self._read(self._path(service_name(canon_name)))

    @staticmethod
    def _read(path: Path) -> ProcessRecord | None:
        try:
            return ProcessRecord(**json.loads(path.read_text()))
        except FileNotFoundError:
            return None

    def _save(self, rec: ProcessRecord) -> None:
        path = self._path(rec.short_name)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(asdict(rec), indent=1))
        os.replace(tmp, path)

    def records(self) -> list[ProcessRecord]:
        out = []
        for path in sorted(self.state_dir.glob("*.json")):
            rec = self._read(path)
            if rec is not None:
                out.append(rec)
        return out

    # ---- liveness ------------------------------------------------------------------------
    def _alive(self, rec: ProcessRecord) -> bool:
        """The recorded pid runs and is the process we started (same kernel start time)."""
        if rec.pid is None:
            return False
        child = self._children.get(rec.pid)
        if child is not None:
            return child.poll() is None
        st = _proc_stat(rec.pid)
        if st is None or st[0] in ("Z", "X"):
            return False
        return rec.start_ticks is None or st[2] == rec.start_ticks

    def _exit_code(self, rec: ProcessRecord) -> int | None:
        try:
            return int(Path(rec.exit_path).read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def _recover_spawn(self, rec: ProcessRecord) -> None:
        """A record written before its pid (the gardener died mid-spawn): find it by nonce."""
        pids = _pids_with_nonce(rec.nonce)
        if pids:
            pid = pids[0]
            st = _proc_stat(pid)
            rec.pid, rec.pgid = pid, st[1] if st else pid
            rec.start_ticks = st[2] if st else None
            self._save(rec)

    def _status(self, rec: ProcessRecord) -> tuple[Status, str]:
        if rec.pid is None:
            self._recover_spawn(rec)
        code = self._exit_code(rec)  # written by the wrapper as its last act: done even if
        if code is None and self._alive(rec):  # the shell has not quite exited yet
            return Status.RUNNING, "RUNNING"
        if rec.stopped:
            return Status.STOPPED, "STOPPED"
        if rec.failed:
            return Status.FAILED, "FAILED"
        raw = "LOST" if code is None else f"EXITED({code})"
        if code == 0 and rec.restart_policy != RestartPolicy.ALWAYS.value:
            return Status.SUCCEEDED, raw
        if rec.restart_policy == RestartPolicy.NEVER.value or rec.restarts >= rec.max_retries:
            return Status.FAILED, raw
        return Status.CRASHED, raw

    # ---- the Backend verbs ---------------------------------------------------------------
    async def observe(self) -> list[ServiceState]:
        states = []
        for rec in self.records():
            status, raw = self._status(rec)
            adopted = False
            if status is Status.RUNNING and rec.pid not in self._children:
                adopted = True
                if rec.canon_name not in self._adopted:
                    self._adopted.add(rec.canon_name)
                    self._log.info("local_trial_adopted", canon_name=rec.canon_name, pid=rec.pid)
            states.append(
                ServiceState(
                    canon_name=rec.canon_name, service_name=rec.short_name,
                    service_id=rec.short_name, status=status, raw_status=raw,
                    owned=rec.account == self.account,
                    deployment_id=str(rec.pid) if rec.pid else None,
                    restarts=rec.restarts, adopted=adopted,
                )
            )
        return states

    async def ensure(self, spec: ServiceSpec) -> EnsureOutcome:
        check_account(self.account, spec.account, spec.canon_name)
        rec = self._load(spec.canon_name)
        if rec is None:
            short = service_name(spec.canon_name)
            rec = ProcessRecord(
                canon_name=spec.canon_name, account=spec.account, short_name=short,
                nonce="", log_path=str(self.state_dir / f"{short}.log"),
                exit_path=str(self.state_dir / f"{short}.exit"),
            )
            self._spawn(rec, spec)
            return EnsureOutcome.CREATED
        check_account(self.account, rec.account, spec.canon_name)
        status, raw = self._status(rec)
        if status in (Status.RUNNING, Status.SUCCEEDED):
            return EnsureOutcome.UNCHANGED
        if status is Status.FAILED:
            if not rec.failed:
                rec.failed = True
                self._save(rec)
                self._log.warning("local_trial_failed", canon_name=spec.canon_name, raw=raw,
                                  restarts=rec.restarts)
            return EnsureOutcome.FAILED
        if status is Status.STOPPED:  # asked to run again after a stop: a fresh start
            rec.stopped, rec.restarts = False, 0
            self._spawn(rec, spec)
            return EnsureOutcome.DEPLOYED
        rec.restarts += 1
        self._log.warning("local_trial_restarted", canon_name=spec.canon_name, raw=raw,
                          restarts=rec.restarts, max_retries=rec.max_retries)
        self._spawn(rec, spec)
        return EnsureOutcome.RESTARTED

    def trainer_env(self, spec: ServiceSpec) -> dict[str, str]:
        """A trainer's whole environment: what a process needs to run at all (PATH, locale,
        temporary directory, Python's own), the spec's variables (its ``TRAIN_*`` and the
        ownership marker) and, when it posts to ``GARDENER_INGEST_URL``, its own account's
        ingest token. Nothing else of the gardener's: no other account's token, no database
        URL, no Railway token (a trainer could read them from ``/proc/<pid>/environ``)."""
        env = {k: v for k, v in self.base_env.items() if _inherited(k)}
        variables = spec.all_variables()
        env.update({k: v for k, v in variables.items() if not _secret_name(k)})
        if INGEST_URL_VAR in variables:
            token = self.base_env.get(f"GARDENER_INGEST_TOKEN_{spec.account.upper()}")
            if token:
                env[INGEST_TOKEN_VAR] = token
        return env

    def _spawn(self, rec: ProcessRecord, spec: ServiceSpec) -> None:
        command = spec.command or self.default_command
        rec.nonce = uuid.uuid4().hex
        rec.pid = rec.pgid = rec.start_ticks = None
        rec.max_retries, rec.restart_policy = spec.max_retries, spec.restart_policy.value
        rec.failed = False
        Path(rec.exit_path).unlink(missing_ok=True)
        self._save(rec)  # before the spawn: a crash in between is found again by the nonce
        env = {**self.trainer_env(spec), NONCE_VAR: rec.nonce}
        with open(rec.log_path, "ab") as out:
            child = subprocess.Popen(
                ["/bin/sh", "-c", _WRAPPER, rec.exit_path, *command],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                cwd=self.cwd, start_new_session=True,
            )
        self._children[child.pid] = child
        st = _proc_stat(child.pid)
        rec.pid, rec.pgid = child.pid, child.pid
        rec.start_ticks = st[2] if st else None
        rec.started_at = self._clock()
        self._save(rec)
        self._log.info("local_trial_started", canon_name=rec.canon_name, pid=child.pid,
                       restarts=rec.restarts)

    async def stop(self, canon_name: str, *, account: str | None = None) -> bool:
        check_account(self.account, account, canon_name)
        rec = self._load(canon_name)
        if rec is None:
            return False
        check_account(self.account, rec.account, canon_name)
        was_alive = self._alive(rec)
        rec.stopped = True
        self._save(rec)
        if rec.pgid is not None:
            await self._kill_group(rec)
        if was_alive:
            self._log.info("local_trial_stopped", canon_name=canon_name, pid=rec.pid)
        return was_alive

    async def _kill_group(self, rec: ProcessRecord) -> None:
        assert rec.pgid is not None
        if not self._alive(rec) and not _group_alive(rec.pgid):
            return
        try:
            os.killpg(rec.pgid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + self.grace
        while time.monotonic() < deadline:
            self._reap(rec)
            if not _group_alive(rec.pgid):
                break
            await asyncio.sleep(self.poll)
        else:
            self._log.warning("local_trial_killed", canon_name=rec.canon_name, pid=rec.pid)
            try:
                os.killpg(rec.pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            while _group_alive(rec.pgid):
                self._reap(rec)
                await asyncio.sleep(self.poll)
        self._reap(rec)

    def _reap(self, rec: ProcessRecord) -> None:
        child = self._children.get(rec.pid or -1)
        if child is not None and child.poll() is not None:
            del self._children[child.pid]

    def _forget(self, rec: ProcessRecord) -> None:
        Path(rec.exit_path).unlink(missing_ok=True)
        self._path(rec.short_name).unlink(missing_ok=True)

    async def remove(self, canon_name: str, *, account: str | None = None) -> bool:
        check_account(self.account, account, canon_name)
        rec = self._load(canon_name)
        if rec is None:
            return False
        await self.stop(canon_name, account=account)
        self._forget(rec)
        self._log.info("local_trial_removed", canon_name=canon_name)
        return True

    async def tail(self, canon_name: str, cursor: str | None = None) -> list[LogLine]:
        """Complete lines after byte offset ``cursor``; a partial last line waits."""
        rec = self._load(canon_name)
        if rec is None:
            return []
        offset = int(cursor) if cursor else 0
        data = _read_from(rec.log_path, offset)
        now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        out: list[LogLine] = []
        # Only "\n" ends a line (bytes.splitlines would also split on "\r", "\x0b", "\x1c"...
        # and a progress bar's bare "\r" would then hold the tail still for good); the
        # pieces of a line that a "\r" redrew are handed over one by one.
        for raw in data.split(b"\n")[:-1]:
            offset += len(raw) + 1
            pieces = [p for p in raw.decode("utf-8", "replace").split("\r") if p] or [""]
            out.extend(LogLine(canon_name, text, now, str(offset)) for text in pieces)
        return out

    async def logs(
        self, canon_name: str, *, poll_interval: float = 0.5, cursor: str | None = None
    ) -> AsyncIterator[LogLine]:
        while True:
            for line in await self.tail(canon_name, cursor):
                yield line
                cursor = line.cursor
            await asyncio.sleep(poll_interval)

    async def aclose(self) -> None:
        """Reap finished children; running trials keep running (they are adopted later)."""
        for pid, child in list(self._children.items()):
            if child.poll() is not None:
                del self._children[pid]

    async def teardown(self) -> list[str]:
        """Stop every trial of this account (what 'nothing left running' needs)."""
        stopped = []
        for rec in self.records():
            if rec.account == self.account and await self.stop(rec.canon_name):
                stopped.append(rec.canon_name)
        return stopped
