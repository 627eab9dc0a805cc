"""One batch of the sample writer, as plain data: pure, no I/O.

``build(jobs, trials)`` sorts the parsed items of many calls into the rows to write (deduped
by (trial, step), the first occurrence kept), the in-batch repeats to settle after the write,
the refusals to quarantine (unknown trial, another account's trial, parse rejections) and the
corpus reports; ``Batch`` then gives the parameters of each statement. The writer
(``writer.py``) does the I/O around it.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from gardener.ingest import parse as P

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
        if self.reason is None:
            return _STATUS_JSON[self.status]
        return {"status": self.status, "code": self.code, "reason": self.reason}


_STATUS_JSON = {s: {"status": s} for s in (ACCEPTED, DUPLICATE, CORPUS, DONE, IGNORED)}
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
class Job:
    names: str | list[str | None]  # one canon name for all items, or one per item
    items: list[P.Parsed]
    source: str
    account: str | None
    future: asyncio.Future[SubmitResult]


@dataclass
class Batch:
    """One write, built from many jobs: per sample row its sample, where it came from and its
    trial (an index into the small ``names`` table), plus what to quarantine."""

    jobs: list[Job]
    results: list[list[ItemResult | None]]
    names: list[str] = field(default_factory=list)  # distinct canon names of the rows
    seeds: list[int] = field(default_factory=list)  # their seeds
    owners: list[str] = field(default_factory=list)  # their accounts
    name_ix: dict[str, int] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)  # distinct sources
    job_source: list[int] = field(default_factory=list)  # per job, 1-based into sources
    rows: list[P.Sample] = field(default_factory=list)
    row_name: list[int] = field(default_factory=list)  # 1-based into names
    where: list[tuple[int, int]] = field(default_factory=list)  # (job, item) per row
    by_name: dict[str, dict[int, int]] = field(default_factory=dict)  # name -> step -> row
    # derived by finish()
    row_step: list[int] = field(default_factory=list)
    row_bpb: list[float] = field(default_factory=list)
    row_ts: list[Any] | None = None  # None when no row carries a time
    # in-batch repeats of a (name, step): (job, item, first row, sample)
    repeats: list[tuple[int, int, int, P.Sample]] = field(default_factory=list)
    quarantine: list[tuple[str, str | None, str | None, str, str]] = field(default_factory=list)
    corpus: dict[str, tuple[str, str]] = field(default_factory=dict)
    rejected_codes: Counter[str] = field(default_factory=Counter)
    duplicates: int = 0
    skipped: list[int] = field(default_factory=list)  # 1-based rows the insert skipped

    def reject(
        self,
        j: int,
        i: int,
        account: str | None,
        name: str | None,
        raw: str,
        code: str,
        reason: str,
    ) -> None:
        reason = P.safe_text(reason)
        self.results[j][i] = ItemResult(REJECTED, reason, code)
        self.quarantine.append(
            (
                self.jobs[j].source,
                account,
                None if name is None else P.safe_text(name),
                P.safe_text(raw),
                reason,
            )
        )
        self.rejected_codes[code] += 1

    def index(self, name: str, trial: tuple[int, str]) -> int:
        """1-based index of a trial in the batch's table of names (an SQL array)."""
        k = self.name_ix.get(name)
        if k is None:
            self.names.append(name)
            self.seeds.append(trial[0])
            self.owners.append(trial[1])
            k = self.name_ix[name] = len(self.names)
        return k

    def finish(self, any_ts: bool) -> None:
        rows = self.rows
        self.row_step = [r.step for r in rows]
        self.row_bpb = [r.bpb for r in rows]
        if any_ts and any(r.ts is not None for r in rows):
            self.row_ts = [r.ts for r in rows]

    def conflict(self, j: int, i: int, r: int, sample: P.Sample, kept: float) -> None:
        k = self.row_name[r] - 1
        self.reject(
            j,
            i,
            self.jobs[j].account or self.owners[k],
            self.names[k],
            sample.raw_text(),
            P.STEP_CONFLICT,
            conflict_reason(sample.step, kept, sample.bpb),
        )

    def row_sources(self) -> list[int]:
        js = self.job_source
        return [js[j] for j, _ in self.where]

    def summary_params(self) -> tuple[list[Any], ...]:
        """Per trial, from the rows inserted: the highest step and its value, the lowest value."""
        gone = {r - 1 for r in self.skipped}
        bpb = self.row_bpb
        names: list[str] = []
        tops: list[int] = []
        top_bpbs: list[float] = []
        bests: list[float] = []
        for name, steps in sorted(self.by_name.items()):
            if gone:
                steps = {st: r for st, r in steps.items() if r not in gone}
            if not steps:
                continue
            top = max(steps)
            names.append(name)
            tops.append(top)
            top_bpbs.append(bpb[steps[top]])
            bests.append(min(map(bpb.__getitem__, steps.values())))
        return names, tops, top_bpbs, bests

    def params(self) -> tuple[Any, ...]:
        """The insert's parameters: the small tables as arrays, the rows as comma-joined text,
        which costs the client a fraction of encoding six arrays element by element."""
        ts = (
            ",".join("" if t is None else t.isoformat() for t in self.row_ts)
            if self.row_ts is not None
            else None
        )
        return (
            self.names,
            self.seeds,
            self.sources,
            ",".join(map(str, self.row_name)),
            ",".join(map(str, self.row_step)),
            ",".join(map(repr, self.row_bpb)),
            ts,
            ",".join(map(str, self.row_sources())),
        )


def build(jobs: list[Job], trials: dict[str, tuple[int, str]]) -> Batch:
    """Sort the items of ``jobs`` into the rows to write, the in-batch repeats, the refusals
    and the reports; ``trials`` maps a canon name to its (seed, account)."""
    batch = Batch(jobs=jobs, results=[[None] * len(j.items) for j in jobs])
    by_name = batch.by_name
    sample_cls = P.Sample
    rows, row_name, where = batch.rows, batch.row_name, batch.where
    source_ix: dict[str, int] = {}
    any_ts = False
    for j, job in enumerate(jobs):
        s = source_ix.get(job.source)
        if s is None:
            batch.sources.append(job.source)
            s = source_ix[job.source] = len(batch.sources)
        batch.job_source.append(s)
        account = job.account
        if isinstance(job.names, str):
            # One trial for every item (a log tail): decide the trial once.
            name = job.names
            trial = trials.get(name)
            if trial is None or (account is not None and trial[1] != account):
                for i, item in enumerate(job.items):
                    _other(batch, j, i, item, name, trial, account)
                continue
            k = batch.index(name, trial)
            seen = by_name.setdefault(name, {})
            n0 = len(rows)
            for i, item in enumerate(job.items):
                if type(item) is sample_cls:
                    r = seen.get(item.step)
                    if r is not None:
                        batch.repeats.append((j, i, r, item))
                        continue
                    seen[item.step] = len(rows)
                    rows.append(item)
                    where.append((j, i))
                else:
                    _other(batch, j, i, item, name, trial, account)
            row_name.extend([k] * (len(rows) - n0))
            continue
        any_ts = True
        for i, item in enumerate(job.items):
            name_i = job.names[i]
            trial = trials.get(name_i) if name_i is not None else None
            if (
                type(item) is sample_cls
                and trial is not None
                and name_i is not None
                and (account is None or trial[1] == account)
            ):
                seen = by_name.setdefault(name_i, {})
                r = seen.get(item.step)
                if r is not None:
                    batch.repeats.append((j, i, r, item))
                    continue
                seen[item.step] = len(rows)
                rows.append(item)
                row_name.append(batch.index(name_i, trial))
                where.append((j, i))
            else:
                _other(batch, j, i, item, name_i, trial, account)
    batch.finish(any_ts)
    return batch


def _other(
    batch: Batch,
    j: int,
    i: int,
    item: P.Parsed,
    name: str | None,
    trial: tuple[int, str] | None,
    account: str | None,
) -> None:
    """Everything but an acceptable sample: ignored lines, reports, refusals."""
    res = batch.results[j]
    if item is None:
        res[i] = R_IGNORED
        return
    if isinstance(item, P.Done):
        res[i] = R_DONE
        return
    owner = account if account is not None else (trial[1] if trial else None)
    if isinstance(item, P.Rejected):
        batch.reject(j, i, owner, name, item.raw, item.code, item.reason)
        return
    if trial is None:
        why = f"{P.UNKNOWN_TRIAL}: no trial {name!r} in the ledger"
        batch.reject(j, i, owner, name, raw_of(item), P.UNKNOWN_TRIAL, why)
        return
    if account is not None and trial[1] != account:
        why = f"{P.CROSS_ACCOUNT}: {name} belongs to {trial[1]}, not {account}"
        batch.reject(j, i, owner, name, raw_of(item), P.CROSS_ACCOUNT, why)
        return
    assert name is not None and isinstance(item, P.CorpusReport)
    batch.corpus[name] = (item.corpus, item.sha256)
    res[i] = R_CORPUS


def conflict_reason(step: int, kept: float, new: float) -> str:
    return (
        f"{P.STEP_CONFLICT}: step {step} already has BPB={kept:.4f}; "
        f"BPB={new:.4f} not stored (the first value is kept)"
    )


def overlap(a: dict[str, dict[int, int]], b: dict[str, dict[int, int]]) -> bool:
    """Whether two batches share a (canon_name, step)."""
    if len(a) > len(b):
        a, b = b, a
    return any(name in b and not b[name].keys().isdisjoint(steps) for name, steps in a.items())


def raw_of(item: P.Sample | P.CorpusReport) -> str:
    return item.raw_text() if isinstance(item, P.Sample) else item.raw
