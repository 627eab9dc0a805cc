"""The per-call working state of ``decide``: cleaned curves, tripwires, the leader, the seeds,
and cached levels, fits and states. Built once per call, thrown away after it."""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field, replace
from operator import attrgetter
from typing import Any, NamedTuple

import numpy as np

from gardener.core import fit as fitmod
from gardener.core.config import DecisionConfig, Policy
from gardener.core.levels import Level, level_at, median1, median_jitter, tail_jitter
from gardener.core.rungs import prefix_at, rung_reached
from gardener.core.seeds import SeedPicker
from gardener.core.states import Comparison, StateReading, compare, state_of
from gardener.core.tripwires import (
    QUARANTINE_KINDS,
    CleanCurve,
    check_snapshot,
    clean_curve,
    curve_digest,
    standing_events,
)
from gardener.core.types import (
    DesiredState,
    FloatArray,
    IntArray,
    SeedState,
    Snapshot,
    TrialView,
    TripwireEvent,
)

# The gardener's seed-state thresholds in units of the race's jitter (the plan's are in BPB):
# a tie within 2 jitters, parallel-losing beyond 20, and DIVERGING when the gap to the leader
# grows by more than 10 jitters over the slope window *and* the trial's own curve rises by
# more than 4 (a run that merely improves slower than the leader is not diverging).
TIE_JITTERS = 2.0
PARALLEL_JITTERS = 20.0
DIVERGING_JITTERS = 10.0
RISING_JITTERS = 4.0


def num(x: float | None) -> float | None:
    """A JSON-safe float: NaN and infinities become None."""
    if x is None:
        return None
    xf = float(x)
    return xf if math.isfinite(xf) else None


class Curve(NamedTuple):
    """A trial's cleaned curve in one call (a tuple: thousands are made per call)."""

    trial: TrialView
    steps: IntArray
    values: FloatArray
    reached: int  # the highest rung its samples reached
    name: str  # the trial's canon name
    alive: bool  # the trial is meant to run


def fit_numbers(s: IntArray, v: FloatArray, horizon: int, level: float) -> dict[str, Any]:
    """The power-law fit of a prefix and its prediction at the horizon, JSON-ready."""
    return fit_result_numbers(fitmod.fit_power_law(s, v, level=level), v, horizon)


def fit_result_numbers(f: fitmod.PowerLawFit, v: FloatArray, horizon: int) -> dict[str, Any]:
    """A fit and its prediction at the horizon, JSON-ready; an implausible prediction
    (``fit.insane_prediction``) turns the fit into a no-fit with the reason."""
    out: dict[str, Any] = {"ok": f.ok, "reason": f.reason, "n": f.n}
    if f.ok:
        pred = f.predict(horizon)
        out.update(
            bpb_inf=num(f.bpb_inf),
            a=num(f.a),
            p=num(f.p),
            bpb_inf_ci=[num(f.bpb_inf_ci.low), num(f.bpb_inf_ci.high)],
            sigma=num(f.sigma),
            horizon=horizon,
            predicted=num(pred.mean),
            pi=[num(pred.pi.low), num(pred.pi.high)],
        )
        why = fitmod.insane_prediction(v, pred.mean)
        if why is not None:
            out.update(ok=False, reason=why, predicted=None)
    return out


# Fits of curve prefixes already seen (a prefix at a rung never changes once the trial is past
# it): a bounded memo of a pure function, so a later call does not refit the same samples.
_MemoKey = tuple[bytes, bytes, int, float]
_FIT_MEMO: dict[_MemoKey, dict[str, Any]] = {}
_FIT_MEMO_SIZE = 4096


def _memo_key(s: IntArray, v: FloatArray, horizon: int, level: float) -> _MemoKey:
    return (s.tobytes(), v.tobytes(), horizon, level)


def _remember(key: _MemoKey, nums: dict[str, Any]) -> None:
    if len(_FIT_MEMO) >= _FIT_MEMO_SIZE:
        _FIT_MEMO.pop(next(iter(_FIT_MEMO)))  # the oldest entry
    _FIT_MEMO[key] = nums


@dataclass(frozen=True)
class TrialFacts:
    """What one trial's samples say on their own, the same in every call that sees them."""

    clean: CleanCurve
    jitter: float  # its term of the race's typical jitter (``levels.tail_jitter``)
    spacing: float | None  # median step between samples (None below two samples)
    digest: int  # ``tripwires.curve_digest`` of the clean curve
    last_step: int | None  # the clean curve's last step (None when it has no sample)
    # What was derived from the trial under given settings: ("level", boundary, ...) ->
    # Level, ("standing", settings) -> tripwire events. Kept with the facts, one lookup.
    derived: dict[tuple[Any, ...], Any] = field(default_factory=dict, compare=False)


class _IdentityMemo:
    """A memo keyed on the objects themselves, not their contents, for as long as they live.

    The daemon's sample cache hands ``decide`` the same ``TrialView`` object for a trial whose
    samples and row did not change (and a new one when they did); views and their arrays are
    never changed in place. So facts derived from a view, or a pair of views, can be kept
    across calls at the cost of one dictionary lookup, where hashing the samples would cost
    as much as deriving the facts again. An entry holds its objects weakly and goes when one
    of them does (so an ``id`` in the memo always names the object it was made for, and the
    memo never keeps a replaced view's samples alive); ``size`` bounds it all the same.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.entries: dict[tuple[int, int, tuple[Any, ...]], tuple[object, Any]] = {}

    def get(self, a: object, b: object = None, extra: tuple[Any, ...] = ()) -> Any:
        hit = self.entries.get((id(a), id(b), extra))
        return None if hit is None else hit[1]

    def put(self, a: object, value: Any, b: object = None, extra: tuple[Any, ...] = ()) -> None:
        key = (id(a), id(b), extra)
        entries = self.entries

        def gone(_: object) -> None:
            entries.pop(key, None)

        refs = (weakref.ref(a, gone), None if b is None else weakref.ref(b, gone))
        if len(entries) >= self.size:
            entries.clear()  # only when far more views live than any fleet holds
        entries[key] = (refs, value)


# The facts (with what was derived from them) and the comparisons with a leader of the trial
# views alive.
_FACTS = _IdentityMemo(1 << 20)
_COMPARISONS = _IdentityMemo(1 << 20)


def trial_facts(t: TrialView) -> TrialFacts:
    """The facts of one trial's samples (kept while the daemon hands back the same view)."""
    facts: TrialFacts | None = _FACTS.get(t)
    if facts is None:
        c = clean_curve(np.asarray(t.steps), np.asarray(t.bpb))
        spacing = median1(np.diff(c.steps).astype(np.float64)) if len(c.steps) >= 2 else None
        last = int(c.steps[-1]) if len(c.steps) else None
        facts = TrialFacts(c, tail_jitter(c.bpb), spacing, curve_digest(c), last)
        _FACTS.put(t, facts)
    return facts


def _standing(
    t: TrialView, f: TrialFacts, config: DecisionConfig, settings: tuple[Any, ...]
) -> list[TripwireEvent]:
    """``tripwires.standing_events`` of a trial, kept while its view and the settings they
    read (``settings``) are the same."""
    key = ("standing", settings)
    events: list[TripwireEvent] | None = f.derived.get(key)
    if events is None:
        events = standing_events(t, f.clean, config, settings[4], settings[5])
        f.derived[key] = events
    return events


class RaceView:
    """Curves of one snapshot as ``decide`` sees them, with the caches of one call."""

    def __init__(self, snapshot: Snapshot, config: DecisionConfig) -> None:
        self.snap = snapshot
        trials = sorted(snapshot.trials, key=attrgetter("canon_name"))
        settings = (
            config.is_bpb,
            config.leak_bpb,
            config.architectural_floor_bpb,
            config.gf16_min_hidden,
            snapshot.expected_corpus_sha256,
            snapshot.expected_corpus,
        )
        # One pass over the trials (a race of a thousand is walked several times per call).
        self.facts: dict[str, TrialFacts] = {}
        self.clean: dict[str, CleanCurve] = {}
        digests: dict[str, int] = {}
        standing: dict[str, list[TripwireEvent]] = {}
        seeds: dict[str, list[int]] = {}
        for t in trials:
            name = t.canon_name
            f = self.facts[name] = trial_facts(t)
            self.clean[name] = f.clean
            digests[name] = f.digest
            standing[name] = _standing(t, f, config, settings)
            seeds.setdefault(t.variant, []).append(t.seed)
        self.events = check_snapshot(snapshot, config, self.clean, digests, standing)
        reviewed = snapshot.reviewed_tripwires
        self.active: list[TripwireEvent] = [
            e for e in snapshot.open_tripwires if e.key not in reviewed
        ] + self.events
        quarantined = {e.canon_name for e in self.active if e.kind in QUARANTINE_KINDS}
        self.curves: list[Curve] = []
        running = DesiredState.RUNNING
        for t in trials:
            name = t.canon_name
            f = self.facts[name]
            if f.last_step is None or name in quarantined:
                continue
            c = f.clean
            reached = rung_reached(config, f.last_step)
            self.curves.append(Curve(t, c.steps, c.bpb, reached, name, t.desired_state is running))
        self.by_name = {c.name: c for c in self.curves}
        self.unit = 0.0  # the race's typical jitter (set for the gardener policy)
        self.cfg = self._state_config(config)
        self.horizon = int(snapshot.horizon or config.rungs[-1])
        self.picker = SeedPicker(snapshot.race, dict(snapshot.used_seeds))
        for variant, taken in seeds.items():
            self.picker.reserve(variant, taken)
        self._levels: dict[tuple[str, int], Level | None] = {}
        self._fits: dict[tuple[str, int], dict[str, Any]] = {}
        self.leader = self._leader()

    # -- scale ----------------------------------------------------------------------------
    def _state_config(self, config: DecisionConfig) -> DecisionConfig:
        """The plan's absolute BPB thresholds for ``seed``; for the gardener, thresholds in
        units of the race's own jitter (the median over its curves)."""
        if config.policy is Policy.SEED:
            return config
        # The race's typical jitter, from the live curves (the ones being compared).
        unit = median_jitter([self.facts[c.name].jitter for c in self.curves if c.alive])
        spacing = [sp for c in self.curves if (sp := self.facts[c.name].spacing) is not None]
        span = (float(np.median(spacing)) if spacing else 1.0) * max(1, config.slope_window - 1)
        self.unit = unit
        return replace(
            config,
            tied_band=TIE_JITTERS * unit,
            parallel_losing_delta=PARALLEL_JITTERS * unit,
            diverging_slope=DIVERGING_JITTERS * unit / max(span, 1.0),
        )

    # -- levels and fits --------------------------------------------------------------------
    def level(self, c: Curve, boundary: int) -> Level | None:
        key = (c.name, boundary)
        if key not in self._levels:
            how = ("level", boundary, self.cfg.recent_fraction, self.cfg.recent_min_points)
            derived = self.facts[c.name].derived
            if how in derived:
                lv: Level | None = derived[how]
            else:
                lv = level_at(
                    c.steps,
                    c.values,
                    boundary,
                    recent_fraction=self.cfg.recent_fraction,
                    min_points=self.cfg.recent_min_points,
                )
                derived[how] = lv
            self._levels[key] = lv
        return self._levels[key]

    def fit_all(self, curves: list[Curve], r: int) -> None:
        """Fit the prefixes of ``curves`` at rung ``r`` in one batch (filling the cache);
        prefixes fitted by an earlier call come from ``_FIT_MEMO``."""
        if not (self.cfg.record_fits or self.cfg.policy is Policy.SEED):
            return
        todo = []
        for c in curves:
            if (c.name, r) in self._fits:
                continue
            s, v = prefix_at(c.steps, c.values, self.cfg.rungs[r])
            memo = _FIT_MEMO.get(_memo_key(s, v, self.horizon, self.cfg.level))
            if memo is not None:
                self._fits[(c.name, r)] = memo
            else:
                todo.append((c, s, v))
        if not todo:
            return
        width = max(len(s) for _, s, _ in todo)
        ts = np.full((len(todo), width), np.nan)
        vs = np.full((len(todo), width), np.nan)
        for i, (_, s, v) in enumerate(todo):
            ts[i, : len(s)] = s
            vs[i, : len(v)] = v
        batch = fitmod.fit_many(ts, vs, [len(s) for _, s, _ in todo], level=self.cfg.level)
        for i, (c, s, v) in enumerate(todo):
            nums = fit_result_numbers(batch.fit(i), v, self.horizon)
            self._fits[(c.name, r)] = nums
            _remember(_memo_key(s, v, self.horizon, self.cfg.level), nums)

    def fit(self, c: Curve, r: int) -> dict[str, Any]:
        key = (c.name, r)
        if not self.cfg.record_fits and self.cfg.policy is not Policy.SEED:
            return {"ok": False, "reason": "not fitted (record_fits off)", "n": len(c.steps)}
        if key not in self._fits:
            self.fit_all([c], r)
        return self._fits[key]

    # -- the leader and the states -----------------------------------------------------------
    def _leader(self) -> Curve | None:
        live = [c for c in self.curves if c.alive]
        if not live:
            return None
        top = max(c.reached for c in live)
        boundary = self.cfg.rungs[top] if top >= 0 else max(int(c.steps[-1]) for c in live)
        at_top = [c for c in live if c.reached == top]

        def key(c: Curve) -> tuple[float, str]:
            lv = self.level(c, boundary)
            return (lv.value if lv is not None else math.inf, c.name)

        return min(at_top, key=key)

    def comparison(self, c: Curve) -> Comparison | None:
        """``c`` against the leader (None for the leader itself, or without one)."""
        lead = self.leader
        if lead is None or c.name == lead.name:
            return None
        w = self.cfg.slope_window
        cmp: Comparison | None = _COMPARISONS.get(c.trial, lead.trial, (w,))
        if cmp is None:
            cmp = compare(c.steps, c.values, lead.steps, lead.values, w)
            _COMPARISONS.put(c.trial, cmp, lead.trial, (w,))
        return cmp

    def state(self, c: Curve) -> StateReading:
        cmp = self.comparison(c)
        if cmp is None:
            if self.leader is None:
                return StateReading(SeedState.UNKNOWN, None, None, 0)
            return StateReading(SeedState.LEADING, 0.0, 0.0, len(c.steps))
        return state_of(cmp, self.cfg)

    def rising(self, c: Curve) -> bool:
        """The gardener's extra test for DIVERGING: the trial's own curve goes up clearly over
        the slope window (always true for ``seed``, which keeps the plan's rule)."""
        if self.cfg.policy is Policy.SEED:
            return True
        w = self.cfg.slope_window
        s, v = c.steps[-w:], c.values[-w:]
        if len(s) < w:
            return False
        slope = float(np.polyfit(s.astype(np.float64), v, 1)[0])
        return slope * float(s[-1] - s[0]) > RISING_JITTERS * self.unit

    def base_numbers(self, c: Curve, r: int, st: StateReading) -> dict[str, Any]:
        return {
            "policy": self.cfg.policy.value,
            "metric": self.cfg.metric,
            "step": int(c.steps[-1]),
            "rung_step": self.cfg.rungs[r] if r >= 0 else None,
            "leader": self.leader.name if self.leader else None,
            **{k: (num(v) if isinstance(v, float) else v) for k, v in st.as_numbers().items()},
        }
