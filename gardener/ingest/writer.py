"""The sample writer: many sources in, one batched transaction out.

Log tails and HTTP requests call ``submit_lines`` / ``submit_samples``; each call waits until
its items are committed and gets one ``ItemResult`` per item. A background task gathers
pending calls into a batch (up to ``max_batch`` items, or whatever arrived within
``max_latency`` of the first) and writes it in one transaction:

1. samples: one COPY into bpb_samples inside a savepoint; if any (canon_name, seed, step) is
   already stored the COPY fails whole and one ``INSERT ... SELECT FROM unnest ... ON CONFLICT
   DO NOTHING`` writes the rest;
2. samples that were skipped are compared with the stored value: equal is a re-delivery (a
   no-op), different is a conflict (the first value stays, the new one is quarantined); a
   step repeated inside one batch is settled the same way against the first occurrence;
3. every rejection, verbatim with its reason, into sample_quarantine in one statement;
4. the per-trial summary (last_step, last_bpb, best_bpb, last_sample_at) from the inserted
   rows and the corpus reports, on trial rows locked in name order (two writers cannot
   deadlock; a deadlock with another updater retries the batch, which is idempotent);
5. one NOTIFY on ``gardener_samples`` with ``{"max_id", "count"}`` when anything was inserted.

The trial's seed and account come from the ledger (cached; a miss is looked up once per batch).
A caller passing ``account`` (the HTTP path) may only write that account's trials. How the
items of a batch are sorted (pure) is ``batch.py``; this module does the I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import asyncpg
import structlog

from gardener.ingest import metrics
from gardener.ingest import parse as P
from gardener.ingest.batch import (
    R_ACCEPTED,
    R_DUPLICATE,
    Batch,
    ItemResult,
    Job,
    SubmitResult,
    build,
    overlap,
)
from gardener.ledger.queries import Queries

Q = Queries("ingest.sql")
CHANNEL = "gardener_samples"
DEADLOCK_ATTEMPTS = 3
log = structlog.get_logger("gardener.ingest")  # lazy: honours logs.configure() made later


class WriterClosed(RuntimeError):
    """The writer is not running: start it (or use it as an async context manager)."""


class SampleWriter:
    """Batches samples from many sources into few transactions; see the module docstring."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        max_batch: int = 10_000,
        max_latency: float = 0.005,
        max_in_flight: int = 2,
        channel: str = CHANNEL,
    ) -> None:
        self._pool = pool
        self.max_batch = max_batch
        self.max_latency = max_latency
        self.channel = channel
        # Two batches in flight keep the client and the server busy at once (one builds and
        # encodes while the other is written); batches sharing a (trial, step) never overlap.
        self._slots = asyncio.Semaphore(max_in_flight)
        self._in_flight: dict[asyncio.Task[None], dict[str, dict[int, int]]] = {}
        self._trials: dict[str, tuple[int, str]] = {}  # canon_name -> (seed, account)
        self._pending: deque[Job] = deque()
        self._pending_items = 0
        self._first_at = 0.0
        self._wake = asyncio.Event()
        self._hurry = asyncio.Event()
        self._urgent = False
        self._closing = False
        self._task: asyncio.Task[None] | None = None

    # --- life cycle -------------------------------------------------------------------

    async def start(self) -> None:
        if self._task is None:
            self._closing = False
            self._task = asyncio.create_task(self._run(), name="ingest-writer")

    async def close(self) -> None:
        """Write what is pending, then stop the background task."""
        if self._task is None:
            return
        self._closing = True
        self._wake.set()
        self._hurry.set()
        task, self._task = self._task, None
        with contextlib.suppress(Exception):  # a writer that died has said so in the log
            await task

    async def __aenter__(self) -> SampleWriter:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    # --- submitting ---------------------------------------------------------------------

    async def submit_lines(
        self, canon_name: str, lines: Sequence[str], source: str, *, account: str | None = None
    ) -> SubmitResult:
        """Trainer output lines of one trial; waits until they are committed."""
        return await self._submit(canon_name, P.parse_lines(list(lines)), source, account)

    async def submit_samples(
        self,
        samples: Sequence[tuple[str | None, P.Sample | P.Rejected]],
        source: str,
        *,
        account: str | None = None,
    ) -> SubmitResult:
        """Structured samples as ``(canon_name, parsed)`` pairs (``parse.parse_structured``)."""
        names = [n for n, _ in samples]
        items: list[P.Parsed] = [s for _, s in samples]
        return await self._submit(names, items, source, account)

    async def flush(self) -> None:
        """Write everything pending now and wait for it (and for batches already in flight)."""
        waits: list[asyncio.Future[Any]] = [asyncio.shield(j.future) for j in self._pending]
        waits += [asyncio.shield(t) for t in self._in_flight]
        if self._pending:
            self._urgent = True
            self._hurry.set()
        if waits:
            await asyncio.gather(*waits, return_exceptions=True)

    async def _submit(
        self,
        names: str | list[str | None],
        items: list[P.Parsed],
        source: str,
        account: str | None,
    ) -> SubmitResult:
        if self._task is None or self._closing or self._task.done():
            raise WriterClosed("the sample writer is not running")
        if not items:
            return SubmitResult([])
        loop = asyncio.get_running_loop()
        job = Job(names, items, source, account, loop.create_future())
        if not self._pending:
            self._first_at = loop.time()
        self._pending.append(job)
        self._pending_items += len(items)
        self._wake.set()
        if self._pending_items >= self.max_batch:
            self._hurry.set()
        return await job.future

    # --- the background task ------------------------------------------------------------

    async def _run(self) -> None:
        try:
            await self._loop()
        except BaseException as exc:
            # The writer cannot go on: nobody may wait forever for it.
            log.error("ingest.writer_died", error=str(exc) or type(exc).__name__)
            died = WriterClosed(f"the sample writer stopped: {exc!r}")
            while self._pending:
                _fail([self._pending.popleft()], died)
            self._pending_items = 0
            raise

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                if self._closing:
                    break
                self._wake.clear()
                await self._wake.wait()
                continue
            # A free slot first: while both batches are in flight, items gather anyway.
            await self._slots.acquire()
            delay = self._first_at + self.max_latency - loop.time()
            if (
                delay > 0
                and not self._closing
                and not self._urgent
                and self._pending_items < self.max_batch
            ):
                self._hurry.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._hurry.wait()
            jobs = self._take()
            try:
                await self._resolve_trials(jobs)
                batch = build(jobs, self._trials)
            except Exception as exc:  # the lookup failed: these callers get the error
                self._slots.release()
                _fail(jobs, exc)
                continue
            for task, busy in list(self._in_flight.items()):
                if overlap(busy, batch.by_name):
                    # A (trial, step) of this batch is in one being written: wait for it, so
                    # the first value to arrive is the one kept.
                    await asyncio.wait([task])
            task = asyncio.create_task(self._write_jobs(batch), name="ingest-batch")
            self._in_flight[task] = batch.by_name
            task.add_done_callback(self._batch_done)
        if self._in_flight:
            await asyncio.wait(list(self._in_flight))

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        self._in_flight.pop(task, None)
        self._slots.release()

    async def _write_jobs(self, batch: Batch) -> None:
        jobs = batch.jobs
        try:
            results = await self._write(batch)
        except Exception as exc:  # the callers get the error; the writer lives on
            if len(jobs) > 1 and not _connection_error(exc):
                # Something in one call's items broke the statement (input no check foresaw):
                # write each call alone, so it fails only its own caller, never the others.
                log.error("ingest.batch_failed_isolating", error=str(exc), jobs=len(jobs))
                for job in jobs:
                    await self._write_jobs(build([job], self._trials))
                return
            log.error("ingest.batch_failed", error=str(exc), jobs=len(jobs))
            _fail(jobs, exc)
        else:
            for job, res in zip(jobs, results, strict=True):
                if not job.future.done():
                    job.future.set_result(SubmitResult(res))

    def _take(self) -> list[Job]:
        taken: list[Job] = []
        n = 0
        while self._pending and (not taken or n + len(self._pending[0].items) <= self.max_batch):
            job = self._pending.popleft()
            taken.append(job)
            n += len(job.items)
        self._pending_items -= n
        if self._pending:
            self._first_at = asyncio.get_running_loop().time()
        else:
            self._urgent = False
        return taken

    # --- one batch ----------------------------------------------------------------------

    async def _write(self, batch: Batch) -> list[list[ItemResult]]:
        started = time.perf_counter()
        jobs = batch.jobs
        for attempt in range(1, DEADLOCK_ATTEMPTS + 1):
            try:
                inserted = await self._write_once(batch)
                break
            except asyncpg.DeadlockDetectedError:
                # Another transaction locked trial rows in another order; ours was rolled
                # back whole, and writing the batch again (built afresh) is idempotent.
                if attempt == DEADLOCK_ATTEMPTS:
                    raise
                log.warning("ingest.deadlock_retry", attempt=attempt)
                batch = build(jobs, self._trials)
        elapsed = time.perf_counter() - started
        metrics.BATCH_SECONDS.observe(elapsed)
        metrics.BATCH_ITEMS.observe(sum(len(j.items) for j in jobs))
        metrics.SAMPLES_ACCEPTED.inc(inserted)
        for code, n in batch.rejected_codes.items():
            metrics.SAMPLES_REJECTED.labels(code).inc(n)
        if batch.duplicates:
            metrics.SAMPLES_DUPLICATE.inc(batch.duplicates)
        if batch.corpus:
            metrics.CORPUS_REPORTS.inc(len(batch.corpus))
        if batch.rejected_codes:
            log.info("ingest.rejected", counts=dict(batch.rejected_codes))
        log.debug("ingest.batch", accepted=inserted, seconds=round(elapsed, 4))
        out: list[list[ItemResult]] = []
        for res in batch.results:
            assert all(r is not None for r in res)
            out.append(res)  # type: ignore[arg-type]
        return out

    async def _write_once(self, batch: Batch) -> int:
        async with self._pool.acquire() as conn:
            async with conn.transaction():
                inserted, max_id = await self._insert(conn, batch)
                if batch.quarantine:
                    cols = list(zip(*batch.quarantine, strict=True))
                    await conn.execute(Q.quarantine, *cols)
                # Trial rows last and in name order, so the row locks are held briefly and two
                # writers (leader and standby both ingest) cannot deadlock each other.
                summary = batch.summary_params() if inserted else None
                touched = sorted({*(summary[0] if summary else ()), *batch.corpus})
                if touched:
                    await conn.execute(Q.lock_trials, touched)
                if summary is not None:
                    await conn.execute(Q.update_summaries, *summary)
                if batch.corpus:
                    names = list(batch.corpus)
                    await conn.execute(
                        Q.record_corpus,
                        names,
                        [batch.corpus[n][0] for n in names],
                        [batch.corpus[n][1] for n in names],
                    )
                if inserted:
                    payload = json.dumps({"max_id": max_id, "count": inserted})
                    await conn.execute(Q.notify_samples, self.channel, payload)
        return inserted

    async def _resolve_trials(self, jobs: list[Job]) -> None:
        """Seed and account of every trial named in ``jobs``; one query for the names not
        cached yet (a trial never changes either, so the cache needs no expiry)."""
        wanted: set[str] = set()
        for job in jobs:
            if isinstance(job.names, str):
                wanted.add(job.names)
            else:
                wanted.update(n for n in job.names if n is not None)
        missing = [n for n in wanted if n not in self._trials and _storable(n)]
        if missing:
            async with self._pool.acquire() as conn:
                for row in await conn.fetch(Q.trials_by_name, missing):
                    self._trials[row["canon_name"]] = (int(row["seed"]), row["account"])

    async def _insert(self, conn: asyncpg.Connection, batch: Batch) -> tuple[int, int | None]:
        """Insert the batch's samples and their trials' summary; settle skipped ones and
        in-batch repeats. Returns how many rows were inserted and the highest new id.

        Fast path: one COPY into bpb_samples inside a savepoint (about twice the speed of
        ``INSERT ... ON CONFLICT``). If any (canon_name, seed, step) is already stored the COPY
        fails as a whole and the batch goes through ``insert_samples``, which skips those rows.
        """
        n = len(batch.where)
        kept: list[float] = batch.row_bpb  # the value each row's (name, step) holds afterwards
        skipped: list[int] = []
        if not n:
            inserted, max_id = 0, None
        else:
            try:
                async with conn.transaction():
                    await self._copy(conn, batch)
                inserted = n
                max_id = await conn.fetchval(Q.last_sample_id)
            except asyncpg.UniqueViolationError:
                row = await conn.fetchrow(Q.insert_samples, *batch.params())
                assert row is not None
                inserted, max_id, skipped = row["inserted"], row["max_id"], row["skipped"]
            batch.skipped = skipped
        results = batch.results
        if not skipped:
            for j, i in batch.where:
                results[j][i] = R_ACCEPTED
        else:
            rows = [r - 1 for r in skipped]
            stored = await conn.fetch(
                Q.existing_samples,
                [batch.names[batch.row_name[r] - 1] for r in rows],
                [batch.seeds[batch.row_name[r] - 1] for r in rows],
                [batch.row_step[r] for r in rows],
            )
            existing = {rows[x["i"] - 1]: float(x["bpb"]) for x in stored}
            kept = list(batch.row_bpb)
            skipped_rows = set(rows)
            for r, (j, i) in enumerate(batch.where):
                if r not in skipped_rows:
                    results[j][i] = R_ACCEPTED
                    continue
                old = existing.get(r)
                if old is None:  # the stored row is gone again (nothing deletes samples)
                    results[j][i] = R_DUPLICATE
                    batch.duplicates += 1
                    continue
                kept[r] = old
                if old == batch.row_bpb[r]:
                    results[j][i] = R_DUPLICATE
                    batch.duplicates += 1
                else:
                    batch.conflict(j, i, r, batch.rows[r], old)
        for j, i, r, sample in batch.repeats:
            if kept[r] == sample.bpb:
                results[j][i] = R_DUPLICATE
                batch.duplicates += 1
            else:
                batch.conflict(j, i, r, sample, kept[r])
        return inserted, max_id

    @staticmethod
    async def _copy(conn: asyncpg.Connection, batch: Batch) -> None:
        names, seeds, sources = batch.names, batch.seeds, batch.sources
        columns = ["canon_name", "seed", "step", "bpb", "source"]
        rows = zip(batch.row_name, batch.row_step, batch.row_bpb, batch.row_sources(), strict=True)
        records: list[tuple[Any, ...]]
        if batch.row_ts is not None:
            now = await conn.fetchval("SELECT now()")
            columns.append("ts")
            records = [
                (names[k - 1], seeds[k - 1], st, b, sources[s - 1], now if t is None else t)
                for (k, st, b, s), t in zip(rows, batch.row_ts, strict=True)
            ]
        else:
            records = [(names[k - 1], seeds[k - 1], st, b, sources[s - 1]) for k, st, b, s in rows]
        await conn.copy_records_to_table("bpb_samples", records=records, columns=columns)


def _fail(jobs: list[Job], exc: BaseException) -> None:
    for job in jobs:
        if not job.future.done():
            job.future.set_exception(exc)


def _connection_error(exc: BaseException) -> bool:
    """An error of the connection rather than of the data: every call would fail alike."""
    return isinstance(
        exc,
        (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
         asyncpg.InternalClientError, asyncpg.exceptions.OperatorInterventionError,
         TimeoutError),
    )


def _storable(name: str) -> bool:
    """A name PostgreSQL can hold; anything else cannot be a trial and is never looked up."""
    return P.safe_text(name) == name and len(name) <= 512
