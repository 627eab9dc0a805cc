"""Gates over final results: gate-0 (the smoke race), gate-2 and GATE-FINAL.

Pure functions over ``Row(canon_name, seed, variant, bpb)``: each returns the rows ranked
(lower BPB first, ties by name) and a verdict with the reasons a person needs. A row counts
toward a gate only if it reached the gate's step (its race's horizon) and has no open
tripwire; gate names are case-insensitive (``GATE-FINAL`` as the plan writes it).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from gardener.core.config import GATE2_BPB, GATE2_SEEDS, GATE_FINAL_BPB, GATE_QUORUM


@dataclass(frozen=True)
class Row:
    canon_name: str
    seed: int
    variant: str
    bpb: float | None  # the final BPB; None when the trial never reported one
    step: int | None = None  # the step of the final BPB
    horizon: int | None = None  # the step the gate needs (None: not checked)
    open_tripwires: int = 0


GATE_NAMES = ("gate-0", "gate-2", "gate-final")


def gate_name(name: str) -> str | None:
    """The canonical name of a gate (``GATE-FINAL``, ``Gate-2``, ``gate_0`` ...), else None."""
    key = name.strip().lower().replace("_", "-")
    return key if key in GATE_NAMES else None


def why_not_counted(row: Row) -> str | None:
    """Why a row does not count toward a gate (None: it counts)."""
    if row.open_tripwires:
        return f"{row.canon_name}: {row.open_tripwires} open tripwire(s)"
    if row.horizon is not None and (row.step is None or row.step < row.horizon):
        at = "no sample" if row.step is None else f"step {row.step}"
        return f"{row.canon_name}: {at}, short of the horizon {row.horizon}"
    return None


@dataclass(frozen=True)
class Verdict:
    gate: str
    passed: bool
    ranked: tuple[Row, ...]
    reasons: tuple[str, ...]


def _final(row: Row) -> float | None:
    return row.bpb if row.bpb is not None and math.isfinite(row.bpb) else None


def rank(rows: Iterable[Row]) -> tuple[Row, ...]:
    """Rows with a final BPB first, lowest BPB first; ties and the rest by name."""
    return tuple(sorted(rows, key=lambda r: (_final(r) is None, _final(r) or 0.0, r.canon_name)))


def gate0(rows: Iterable[Row], expected: int | None = None) -> Verdict:
    """Smoke gate: every trial has a final BPB, the BPBs are distinct, and (when given) the
    race has exactly ``expected`` trials, one per canon name."""
    rs = rank(rows)
    reasons: list[str] = []
    excluded = [w for r in rs if (w := why_not_counted(r)) is not None]
    if excluded:
        reasons.append(f"{len(excluded)} trial(s) do not count: " + "; ".join(excluded[:3]))
    missing = [r.canon_name for r in rs if _final(r) is None]
    if missing:
        reasons.append(f"{len(missing)} trial(s) without a final BPB: {', '.join(missing[:5])}")
    names = [r.canon_name for r in rs]
    if len(set(names)) != len(names):
        reasons.append("a canon name appears more than once")
    if expected is not None and len(rs) != expected:
        reasons.append(f"{len(rs)} trials, expected {expected}")
    finals = [f for r in rs if (f := _final(r)) is not None]
    if len(set(finals)) != len(finals):
        reasons.append("two trials share the same final BPB")
    if not rs:
        reasons.append("no trials")
    passed = not reasons
    if passed:
        reasons.append(f"{len(rs)} trials ranked, every one with a distinct final BPB")
    return Verdict("gate-0", passed, rs, tuple(reasons))


def _quorum_gate(
    name: str, rows: Iterable[Row], threshold: float, seeds: tuple[int, ...] | None, quorum: int
) -> Verdict:
    rs = rank(rows)
    reasons: list[str] = []
    candidates = [r for r in rs if seeds is None or r.seed in seeds]
    excluded = [w for r in candidates if (w := why_not_counted(r)) is not None]
    pool = [r for r in candidates if why_not_counted(r) is None]
    by_variant: dict[str, list[Row]] = {}
    for r in pool:
        by_variant.setdefault(r.variant, []).append(r)
    winners: list[str] = []
    for variant in sorted(by_variant):
        vrows = by_variant[variant]
        passing = [r for r in vrows if (f := _final(r)) is not None and f < threshold]
        if len(passing) >= quorum:
            winners.append(variant)
        else:
            best = _final(vrows[0])
            best_txt = "none" if best is None else f"{best:.4f}"
            reasons.append(
                f"{variant}: {len(passing)}/{quorum} seeds below {threshold} (best {best_txt})"
            )
    if not pool:
        want = "any seed" if seeds is None else f"seeds {sorted(seeds)}"
        reasons.append(f"no trial with a final BPB on {want}")
    if excluded:
        reasons.append(f"{len(excluded)} trial(s) do not count: " + "; ".join(excluded[:3]))
    passed = bool(winners)
    if passed:
        reasons = [f"{v}: {quorum}/{quorum} seeds below {threshold}" for v in winners]
    return Verdict(name, passed, rs, tuple(reasons))


def gate2(
    rows: Iterable[Row],
    *,
    threshold: float = GATE2_BPB,
    seeds: tuple[int, ...] = GATE2_SEEDS,
    quorum: int = GATE_QUORUM,
) -> Verdict:
    """Gate-2: some variant has ``quorum`` of the seeds {43, 44, 45} below 1.85 BPB."""
    return _quorum_gate("gate-2", rows, threshold, seeds, quorum)


def gate_final(
    rows: Iterable[Row],
    *,
    threshold: float = GATE_FINAL_BPB,
    seeds: tuple[int, ...] | None = None,
    quorum: int = GATE_QUORUM,
) -> Verdict:
    """GATE-FINAL: some variant has ``quorum`` seeds below 1.50 BPB."""
    return _quorum_gate("gate-final", rows, threshold, seeds, quorum)
