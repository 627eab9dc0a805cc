"""The sample writer: many sources in, one batched transaction out.

Log tails and HTTP requests call ``submit_lines`` / ``submit_samples``; each call waits until
its items are committed and gets one ``ItemResult`` per item. A background task gathers
pending calls into a batch (up to ``max_batch`` items, or whatever arrived within
``max_latency`` of the first) and writes it in one transaction:

1. samples: one multi-row ``INSERT ... SELECT FROM unnest(...) ON CONFLICT DO NOTHING`` that
   also updates the per-trial summary (last_step, last_bpb, best_bpb, last_sample_at);
2. samples the insert skipped are compared with the stored value: equal is a re-delivery (a
   no-op), different is a conflict (the first value stays, the new one is quarantined);
3. every rejection, verbatim with its reason, into sample_quarantine in one statement;
4. corpus reports onto their trials; 5. one NOTIFY on ``gardener_samples`` (``{"max_id", "count"}``)
   when anything new was written.

The trial's seed and account come from the ledger (cached; a miss is looked up once per batch).
A caller passing ``account`` (the HTTP path) may only write that account's trials.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import asyncpg
import structlog

from gardener.ingest import metrics
from gardener.ingest import parse as P
from gardener.ledger.queries import Queries

Q = Queries("ingest.sql")
CHANNEL = "gardener_samples"
log = structlog.get_logger("gardener.ingest")  # lazy: honours logs.configure() made later

ACCEPTED = "accepted"
DUPLICATE = "duplicate"
REJECTED = "rejected"
CORPUS = "corpus"
DONE = "done"
IGNORED = "ignored"


@dataclass(frozen=True, slots=True)
class ItemResult:
    """What became of one submitted item. ``reason`` is set for rejections."""

    status: str
    reason: str | None = None
    code: str | None = None

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": self.status}
        if self.reason is not None:
            out["code"] = self.code
            out["reason"] = self.reason
        return out


R_ACCEPTED = ItemResult(ACCEPTED)
R_DUPLICATE = ItemResult(DUPLICATE)
R_CORPUS = ItemResult(CORPUS)
R_DONE = ItemResult(DONE)
R_IGNORED = ItemResult(IGNORED)


@dataclass
class SubmitResult:
    """Per-item results of one call, in the order submitted, and their counts."""

    items: list[ItemResult]

    def count(self, status: str) -> int:
        return sum(1 for r in self.items if r.status == status)

    def counts(self) -> dict[str, int]:
        return dict(Counter(r.status for r in self.items))


@dataclass
class _Job:
    names: str | list[str | None]  # one canon name for all items, or one per item
    items: list[P.Parsed]
    source: str
    account: str | None
    future: asyncio.Future[SubmitResult]

    def name(self, i: int) -> str | None:
        return self.names if isinstance(self.names, str) else self.names[i]


@dataclass
class _Batch:
    """The arrays of one write, built from many jobs."""

    results: list[list[ItemResult | None]]
    names: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    bpbs: list[float] = field(default_factory=list)
    tss: list[Any] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    accounts: list[str | None] = field(default_factory=list)
    where: list[tuple[int, int]] = field(default_factory=list)  # (job, item) per sample row
    samples: list[P.Sample] = field(default_factory=list)
    # in-batch repeats of a (name, step): (job, item, first row, sample, source, account)
    repeats: list[tuple[int, int, int, P.Sample, str, str | None]] = field(default_factory=list)
    quarantine: list[tuple[str, str | None, str | None, str, str]] = field(default_factory=list)
    corpus: dict[str, tuple[str, str]] = field(default_factory=dict)
    rejected_codes: Counter[str] = field(default_factory=Counter)

    def reject(
        self,
        j: int,
        i: int,
        source: str,
        account: str | None,
        name: str | None,
        raw: str,
        code: str,
        reason: str,
    ) -> None:
        reason = P.safe_text(reason)
        self.results[j][i] = ItemResult(REJECTED, reason, code)
        self.quarantine.append(
            (source, account, None if name is None else P.safe_text(name), P.safe_text(raw), reason)
        )
        self.rejected_codes[code] += 1


class WriterClosed(RuntimeError):
    """The writer is not running: start it (or use it as an async context manager)."""


class SampleWriter:
    """Batches samples from many sources into few transactions; see the module docstring."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        max_batch: int = 10_000,
        max_latency: float = 0.05,
        channel: str = CHANNEL,
    ) -> None:
        self._pool = pool
        self.max_batch = max_batch
        self.max_latency = max_latency
        self.channel = channel
        self._trials: dict[str, tuple[int, str]] = {}  # canon_name -> (seed, account)
        self._pending: list[_Job] = []
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
        """Write everything pending now and wait for it."""
        jobs = list(self._pending)
        if not jobs:
            return
        self._urgent = True
        self._hurry.set()
        await asyncio.gather(*(asyncio.shield(j.future) for j in jobs), return_exceptions=True)

    async def _submit(
        self,
        names: str | list[str | None],
        items: list[P.Parsed],
        source: str,
        account: str | None,
    ) -> SubmitResult:
        if self._task is None or self._closing:
            raise WriterClosed("the sample writer is not running")
        if not items:
            return SubmitResult([])
        loop = asyncio.get_running_loop()
        job = _Job(names, items, source, account, loop.create_future())
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
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
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
                results = await self._write(jobs)
            except Exception as exc:  # the callers get the error; the writer lives on
                log.error("ingest.batch_failed", error=str(exc), jobs=len(jobs))
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(exc)
            else:
                for job, res in zip(jobs, results, strict=True):
                    if not job.future.done():
                        job.future.set_result(SubmitResult(res))

    def _take(self) -> list[_Job]:
        taken: list[_Job] = []
        n = 0
        while self._pending and (not taken or n + len(self._pending[0].items) <= self.max_batch):
            job = self._pending.pop(0)
            taken.append(job)
            n += len(job.items)
        self._pending_items -= n
        if self._pending:
            self._first_at = asyncio.get_running_loop().time()
        else:
            self._urgent = False
        return taken

    # --- one batch ----------------------------------------------------------------------

    async def _write(self, jobs: list[_Job]) -> list[list[ItemResult]]:
        started = time.perf_counter()
        async with self._pool.acquire() as conn:
            await self._resolve_trials(conn, jobs)
            batch = self._build(jobs)
            async with conn.transaction():
                inserted = await self._insert(conn, batch)
                if batch.quarantine:
                    cols = list(zip(*batch.quarantine, strict=True))
                    await conn.execute(Q.quarantine, *cols)
                if batch.corpus:
                    names = list(batch.corpus)
                    await conn.execute(
                        Q.record_corpus,
                        names,
                        [batch.corpus[n][0] for n in names],
                        [batch.corpus[n][1] for n in names],
                    )
                if inserted:
                    payload = json.dumps(
                        {"max_id": max(r[0] for r in inserted), "count": len(inserted)}
                    )
                    await conn.execute(Q.notify_samples, payload)
        elapsed = time.perf_counter() - started
        metrics.BATCH_SECONDS.observe(elapsed)
        metrics.BATCH_ITEMS.observe(sum(len(j.items) for j in jobs))
        metrics.SAMPLES_ACCEPTED.inc(len(inserted))
        for code, n in batch.rejected_codes.items():
            metrics.SAMPLES_REJECTED.labels(code).inc(n)
        duplicates = sum(1 for res in batch.results for r in res if r is R_DUPLICATE)
        if duplicates:
            metrics.SAMPLES_DUPLICATE.inc(duplicates)
        if batch.corpus:
            metrics.CORPUS_REPORTS.inc(len(batch.corpus))
        if batch.rejected_codes:
            log.info("ingest.rejected", counts=dict(batch.rejected_codes))
        log.debug("ingest.batch", accepted=len(inserted), seconds=round(elapsed, 4))
        out: list[list[ItemResult]] = []
        for res in batch.results:
            assert all(r is not None for r in res)
            out.append(res)  # type: ignore[arg-type]
        return out

    async def _resolve_trials(self, conn: asyncpg.Connection, jobs: list[_Job]) -> None:
        wanted: set[str] = set()
        for job in jobs:
            if isinstance(job.names, str):
                wanted.add(job.names)
            else:
                wanted.update(n for n in job.names if n is not None)
        missing = [n for n in wanted if n not in self._trials and _storable(n)]
        if missing:
            for row in await conn.fetch(Q.trials_by_name, missing):
                self._trials[row["canon_name"]] = (int(row["seed"]), row["account"])

    def _build(self, jobs: list[_Job]) -> _Batch:
        batch = _Batch(results=[[None] * len(j.items) for j in jobs])
        first: dict[tuple[str, int], int] = {}
        trials = self._trials
        for j, job in enumerate(jobs):
            res = batch.results[j]
            source, account = job.source, job.account
            single = job.names if isinstance(job.names, str) else None
            trial = trials.get(single) if single is not None else None
            for i, item in enumerate(job.items):
                if item is None:
                    res[i] = R_IGNORED
                    continue
                if isinstance(item, P.Done):
                    res[i] = R_DONE
                    continue
                name = single if single is not None else job.name(i)
                if single is None:
                    trial = trials.get(name) if name is not None else None
                owner = account if account is not None else (trial[1] if trial else None)
                if isinstance(item, P.Rejected):
                    batch.reject(j, i, source, owner, name, item.raw, item.code, item.reason)
                    continue
                if trial is None:
                    batch.reject(
                        j,
                        i,
                        source,
                        owner,
                        name,
                        _raw_of(item),
                        P.UNKNOWN_TRIAL,
                        f"{P.UNKNOWN_TRIAL}: no trial {name!r} in the ledger",
                    )
                    continue
                if account is not None and trial[1] != account:
                    batch.reject(
                        j,
                        i,
                        source,
                        owner,
                        name,
                        _raw_of(item),
                        P.CROSS_ACCOUNT,
                        f"{P.CROSS_ACCOUNT}: {name} belongs to {trial[1]}, not {account}",
                    )
                    continue
                assert name is not None
                if isinstance(item, P.CorpusReport):
                    batch.corpus[name] = (item.corpus, item.sha256)
                    res[i] = R_CORPUS
                    continue
                key = (name, item.step)
                row = first.get(key)
                if row is not None:
                    batch.repeats.append((j, i, row, item, source, owner))
                    continue
                first[key] = len(batch.names)
                batch.names.append(name)
                batch.seeds.append(trial[0])
                batch.steps.append(item.step)
                batch.bpbs.append(item.bpb)
                batch.tss.append(item.ts)
                batch.sources.append(source)
                batch.accounts.append(owner)
                batch.samples.append(item)
                batch.where.append((j, i))
        return batch

    async def _insert(self, conn: asyncpg.Connection, batch: _Batch) -> list[Any]:
        """Insert the batch's samples; settle skipped ones and in-batch repeats. Returns the
        inserted rows (id, canon_name, step)."""
        if not batch.names:
            return []
        inserted = await conn.fetch(
            Q.insert_samples,
            batch.names,
            batch.seeds,
            batch.steps,
            batch.bpbs,
            batch.tss,
            batch.sources,
        )
        n = len(batch.names)
        kept: list[float] = batch.bpbs  # the value each row's (name, step) holds after this batch
        if len(inserted) == n:
            for j, i in batch.where:
                batch.results[j][i] = R_ACCEPTED
        else:
            done = {(r["canon_name"], r["step"]) for r in inserted}
            skipped = [k for k in range(n) if (batch.names[k], batch.steps[k]) not in done]
            stored = await conn.fetch(
                Q.existing_samples,
                [batch.names[k] for k in skipped],
                [batch.seeds[k] for k in skipped],
                [batch.steps[k] for k in skipped],
            )
            existing = {skipped[r["i"] - 1]: float(r["bpb"]) for r in stored}
            kept = list(batch.bpbs)
            skipped_set = set(skipped)
            for k, (j, i) in enumerate(batch.where):
                if k not in skipped_set:
                    batch.results[j][i] = R_ACCEPTED
                    continue
                old = existing.get(k, batch.bpbs[k])
                kept[k] = old
                if old == batch.bpbs[k]:
                    batch.results[j][i] = R_DUPLICATE
                else:
                    batch.reject(
                        j,
                        i,
                        batch.sources[k],
                        batch.accounts[k],
                        batch.names[k],
                        batch.samples[k].raw_text(),
                        P.STEP_CONFLICT,
                        _conflict(batch.steps[k], old, batch.bpbs[k]),
                    )
        for j, i, row, sample, source, owner in batch.repeats:
            if kept[row] == sample.bpb:
                batch.results[j][i] = R_DUPLICATE
            else:
                batch.reject(
                    j,
                    i,
                    source,
                    owner,
                    batch.names[row],
                    sample.raw_text(),
                    P.STEP_CONFLICT,
                    _conflict(batch.steps[row], kept[row], sample.bpb),
                )
        return list(inserted)


def _conflict(step: int, kept: float, new: float) -> str:
    return (
        f"{P.STEP_CONFLICT}: step {step} already has BPB={kept:.4f}; "
        f"BPB={new:.4f} not stored (the first value is kept)"
    )


def _raw_of(item: P.Sample | P.CorpusReport) -> str:
    return item.raw_text() if isinstance(item, P.Sample) else item.raw


def _storable(name: str) -> bool:
    """A name PostgreSQL can hold; anything else cannot be a trial and is never looked up."""
    return P.safe_text(name) == name and len(name) <= 512
