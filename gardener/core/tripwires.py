"""Tripwires: pure checks that say when the data cannot be trusted, with the evidence.

Each check returns ``TripwireEvent`` values; ``decide`` turns new ones into TRIPWIRE decisions
and lets the blocking ones hold promotions. ``check_sample`` is the per-sample validator ingest
uses to reject a sample with a reason (rejected samples go to quarantine, never dropped).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from gardener.core.config import DecisionConfig
from gardener.core.types import FloatArray, IntArray, Snapshot, TrialView, TripwireEvent

BAD_SAMPLE = "bad_sample"
STEP_BACKWARDS = "step_backwards"
STEP_CONFLICT = "step_conflict"
BELOW_FLOOR = "below_floor"
LEAK = "leak"
STALLED = "stalled"
DUPLICATE_RUN = "duplicate_run"
CORPUS_MISMATCH = "corpus_mismatch"
CORPUS_UNREPORTED = "corpus_unreported"
GF16_HIDDEN = "gf16_hidden"

# A trial with one of these open is quarantined: ``decide`` neither acts on it nor compares
# anything with it (a corrupt below-floor curve would otherwise become the leader).
QUARANTINE_KINDS = frozenset({BELOW_FLOOR, LEAK, DUPLICATE_RUN, CORPUS_MISMATCH, GF16_HIDDEN})
# Blocking kinds that hold only promotions and mirrors (pruning goes on without the trial).
FLOOR_KINDS = frozenset({BELOW_FLOOR, LEAK})


def check_sample(step: int, bpb: float) -> str | None:
    """Why one sample must be rejected, or None when it is acceptable."""
    if isinstance(step, float) and not math.isfinite(step):
        return f"step {step} is not finite"
    if step < 0:
        return f"negative step {step}"
    if math.isnan(bpb):
        return "BPB is NaN"
    if math.isinf(bpb):
        return f"BPB is {'+' if bpb > 0 else '-'}infinite"
    if bpb < 0:
        return f"negative BPB {bpb}"
    return None


@dataclass(frozen=True)
class CleanCurve:
    """A curve with bad samples, backward steps and repeated steps removed, and what went."""

    steps: IntArray
    bpb: FloatArray
    bad: tuple[tuple[int, float, str], ...] = ()  # (step, bpb, reason)
    backwards: tuple[tuple[int, int], ...] = ()  # (previous step, step)
    conflicts: tuple[tuple[int, float, float], ...] = ()  # (step, kept bpb, other bpb)


def clean_curve(steps: IntArray, bpb: FloatArray) -> CleanCurve:
    """Keep valid samples in arrival order; a step that goes backwards, or repeats with a
    different value, is left out (the first value of a step wins).

    Vectorised: a valid sample is kept exactly when its step is above every valid step
    before it (a skipped sample never raises that maximum, so the maximum of the kept steps
    and of the valid steps agree); a skipped one repeats a kept step (a conflict when the
    value differs) or went backwards. The common case, a clean increasing curve, costs a
    few array operations.
    """
    s = np.asarray(steps).astype(np.int64, copy=False)
    v = np.asarray(bpb).astype(np.float64, copy=False)
    n = len(s)
    if n == 0:
        return CleanCurve(s, v)
    if (n == 1 or bool((s[1:] > s[:-1]).all())) and s[0] >= 0:
        # Increasing from a valid first step; the values: a NaN makes min() NaN, never >= 0.
        if v.min() >= 0.0 and v.max() < np.inf:
            return CleanCurve(s, v)
    valid = (s >= 0) & (v >= 0.0) & (v < np.inf)  # NaN fails both comparisons
    all_valid = bool(valid.all())
    bad: list[tuple[int, float, str]] = []
    if not all_valid:
        for i in np.flatnonzero(~valid).tolist():
            si, vi = int(s[i]), float(v[i])
            why = check_sample(si, vi)
            assert why is not None
            bad.append((si, vi, why))
    vi_idx = np.flatnonzero(valid)
    vs, vv = s[vi_idx], v[vi_idx]
    if len(vs) == 0:
        return CleanCurve(vs, vv, tuple(bad))
    before = np.empty(len(vs), dtype=np.int64)  # the highest valid step before each one
    before[0] = np.iinfo(np.int64).min
    if len(vs) > 1:
        np.maximum.accumulate(vs[:-1], out=before[1:])
    keep = vs > before
    ks, kv = vs[keep], vv[keep]
    back: list[tuple[int, int]] = []
    conf: list[tuple[int, float, float]] = []
    skipped = np.flatnonzero(~keep)
    if len(skipped):
        ss, sv, sb = vs[skipped], vv[skipped], before[skipped]
        pos = np.minimum(np.searchsorted(ks, ss), len(ks) - 1)
        repeat = ks[pos] == ss
        for j in range(len(skipped)):
            if repeat[j]:
                first = float(kv[pos[j]])
                if first != float(sv[j]):
                    conf.append((int(ss[j]), first, float(sv[j])))
            else:
                back.append((int(sb[j]), int(ss[j])))
    return CleanCurve(ks, kv, tuple(bad), tuple(back), tuple(conf))


def stall_event(trial: TrialView, now: float, config: DecisionConfig) -> TripwireEvent | None:
    """The one per-trial tripwire that depends on the clock: a running trial gone silent."""
    running = trial.desired_state.value == "running" and trial.observed_state == "running"
    if running and trial.last_sample_at is not None:
        silent = now - trial.last_sample_at
        if silent > config.stall_timeout_s:
            return TripwireEvent(
                STALLED, trial.canon_name, {"silent_s": silent, "timeout_s": config.stall_timeout_s}
            )
    return None


def standing_events(
    trial: TrialView,
    c: CleanCurve,
    config: DecisionConfig,
    expected_sha256: str | None,
    expected_corpus: str | None,
) -> list[TripwireEvent]:
    """The per-trial tripwires that depend on the trial and the race's settings only (all
    but the stall): bad samples, step order, floor, leak, corpus, L-R9; the same for as long
    as the trial's view is. The floor, the leak and the GF16 format rule are about BPB: they
    apply only when the race's metric is ``bpb``."""
    name = trial.canon_name
    out: list[TripwireEvent] = []
    if c.bad:
        out.append(
            TripwireEvent(
                BAD_SAMPLE, name, {"samples": [list(b) for b in c.bad[:10]], "count": len(c.bad)}
            )
        )
    if c.backwards:
        out.append(
            TripwireEvent(STEP_BACKWARDS, name, {"pairs": [list(b) for b in c.backwards[:10]]})
        )
    if c.conflicts:
        out.append(
            TripwireEvent(STEP_CONFLICT, name, {"kept_first": [list(b) for b in c.conflicts[:10]]})
        )
    low = float(c.bpb.min()) if len(c.bpb) and config.is_bpb else math.inf
    if low < config.leak_bpb or low < config.architectural_floor_bpb:
        low_step = int(c.steps[int(np.argmin(c.bpb))])  # the first step at the lowest value
        if low < config.leak_bpb:
            out.append(
                TripwireEvent(
                    LEAK, name, {"bpb": low, "step": low_step, "leak_bpb": config.leak_bpb}, True
                )
            )
        if low < config.architectural_floor_bpb:
            out.append(
                TripwireEvent(
                    BELOW_FLOOR,
                    name,
                    {
                        "bpb": low,
                        "step": low_step,
                        "floor": config.architectural_floor_bpb,
                        "note": "quarantined; ledger suspected corrupt until a person reviews it",
                    },
                    True,
                )
            )
    expected = expected_sha256
    if expected is not None:
        if trial.corpus_sha256 is None:
            if len(c.steps):
                out.append(TripwireEvent(CORPUS_UNREPORTED, name, {"expected": expected}))
        elif trial.corpus_sha256 != expected:
            out.append(
                TripwireEvent(
                    CORPUS_MISMATCH, name, {"expected": expected, "reported": trial.corpus_sha256}
                )
            )
    elif expected_corpus is not None and trial.corpus is not None:
        if trial.corpus != expected_corpus:
            out.append(
                TripwireEvent(
                    CORPUS_MISMATCH,
                    name,
                    {"expected_name": expected_corpus, "reported_name": trial.corpus},
                )
            )
    if (
        config.is_bpb
        and trial.format == "GF16"
        and (trial.hidden_size is None or trial.hidden_size < config.gf16_min_hidden)
    ):
        out.append(
            TripwireEvent(
                GF16_HIDDEN,
                name,
                {"hidden_size": trial.hidden_size, "min_hidden": config.gf16_min_hidden},
            )
        )
    return out


def curve_digest(c: CleanCurve) -> int:
    """A hash of a curve's samples: equal curves have equal digests (``check_duplicates``
    confirms a match on the samples themselves)."""
    return hash((c.steps.tobytes(), c.bpb.tobytes()))


def check_duplicates(
    curves: dict[str, CleanCurve], min_points: int, digests: Mapping[str, int] | None = None
) -> list[TripwireEvent]:
    """Bit-identical curves under different canon names; the first name (sorted) is kept as
    the original, every other one fires. Curves shorter than ``min_points`` never match.
    ``digests`` (``curve_digest`` of each curve, when the caller keeps them) saves hashing."""
    least = max(1, min_points)
    names = [n for n, c in curves.items() if len(c.steps) >= least]
    keys = [digests[n] if digests is not None else curve_digest(curves[n]) for n in names]
    if len(set(keys)) == len(keys):  # the common case: no two curves alike
        return []
    groups: dict[int, list[str]] = defaultdict(list)
    for key, name in sorted(zip(keys, names, strict=True), key=lambda kn: kn[1]):
        groups[key].append(name)
    out: list[TripwireEvent] = []
    for names in groups.values():
        while len(names) > 1:  # the same digest: split by the samples themselves
            first = curves[names[0]]
            same = [
                n
                for n in names[1:]
                if np.array_equal(curves[n].steps, first.steps)
                and np.array_equal(curves[n].bpb, first.bpb)
            ]
            for other in same:
                out.append(
                    TripwireEvent(
                        DUPLICATE_RUN,
                        other,
                        {"same_as": names[0], "points": len(curves[other].steps)},
                    )
                )
            names = [n for n in names[1:] if n not in same]
    return out


def check_snapshot(
    snapshot: Snapshot,
    config: DecisionConfig,
    curves: dict[str, CleanCurve] | None = None,
    digests: Mapping[str, int] | None = None,
    standing: Mapping[str, list[TripwireEvent]] | None = None,
) -> list[TripwireEvent]:
    """All tripwires of a snapshot, except those a person already reviewed; sorted by key.
    ``digests`` and ``standing`` (each trial's ``standing_events``), when the caller keeps
    them, save recomputing what did not change."""
    cs = (
        curves
        if curves is not None
        else {t.canon_name: clean_curve(t.steps, t.bpb) for t in snapshot.trials}
    )
    events: list[TripwireEvent] = []
    for t in snapshot.trials:
        if standing is not None:
            events.extend(standing[t.canon_name])
        else:
            events.extend(
                standing_events(
                    t,
                    cs[t.canon_name],
                    config,
                    snapshot.expected_corpus_sha256,
                    snapshot.expected_corpus,
                )
            )
        stall = stall_event(t, snapshot.now, config)
        if stall is not None:
            events.append(stall)
    events.extend(check_duplicates(cs, config.duplicate_min_points, digests))
    fresh = [e for e in events if e.key not in snapshot.reviewed_tripwires]
    return sorted(fresh, key=lambda e: e.key)
