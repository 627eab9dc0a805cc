"""``decide(snapshot, config) -> [Decision]``: the one decision function of the race.

Pure and deterministic: trials are handled in canon-name order, ties break by name, and new
seeds come from ``SeedPicker``. One call does, in order:

1. tripwires: new events become TRIPWIRE decisions; quarantined trials leave the race's
   comparisons; blocking ones turn mutating decisions into HOLD (see ``_hold``);
2. the leader: the best live trial at the highest rung any live trial reached;
3. DIVERGING trials are pruned at once and replaced with a fresh seed;
4. every live trial that reached a rung above ``TrialView.rung`` is decided at its highest
   reached rung, against the cohort of every trial that reached that rung (so a late seed is
   compared with the values the others had at the same step).

Two policies rank a cohort: ``seed`` (the plan: rank by the power-law prediction at the
horizon, prune to the rung's quota) and ``gardener`` (rank by the mean of the recent samples,
which shares the noise every run sees at the same steps, and prune only trials whose paired
difference from the rung's best is confidently above the tie band and not closing, never
beyond the quota).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from scipy import special

from gardener.core import fit as fitmod
from gardener.core import gates
from gardener.core.config import DecisionConfig, Policy, RungRule
from gardener.core.rungs import keep_count, prefix_at, prune_quota, rung_reached
from gardener.core.seeds import MIRROR_ORDER, REPLACE_ORDER, SeedPicker
from gardener.core.states import StateReading, classify, common_deltas
from gardener.core.tripwires import (
    FLOOR_KINDS,
    QUARANTINE_KINDS,
    CleanCurve,
    check_snapshot,
    clean_curve,
)
from gardener.core.types import (
    Action,
    Decision,
    DesiredState,
    FloatArray,
    IntArray,
    NewTrial,
    SeedState,
    Snapshot,
    TrialView,
    TripwireEvent,
)

CAUSE_DIVERGING = "diverging"
CAUSE_RUNG = "rung"
CHI2_1_MEDIAN = 0.454936423119572  # median of chi-square(1): scales a median to a variance


def _num(x: float | None) -> float | None:
    """A JSON-safe float: NaN and infinities become None."""
    if x is None:
        return None
    xf = float(x)
    return xf if math.isfinite(xf) else None


@dataclass(frozen=True)
class _Curve:
    trial: TrialView
    steps: IntArray
    bpb: FloatArray
    reached: int

    @property
    def name(self) -> str:
        return self.trial.canon_name

    @property
    def alive(self) -> bool:
        return self.trial.desired_state is DesiredState.RUNNING


@dataclass(frozen=True)
class _Score:
    value: float
    basis: str
    numbers: dict[str, Any]


def recent_mean(
    steps: IntArray, bpb: FloatArray, boundary: int, config: DecisionConfig
) -> tuple[float, IntArray, FloatArray]:
    """The mean of the samples in the last ``recent_fraction`` of the steps up to a rung
    (at least ``recent_min_points``): a smoothed value that every trial of the cohort
    takes over the same steps, so the noise they share cancels out of the ranking."""
    s, v = prefix_at(steps, bpb, boundary)
    lo = boundary * (1.0 - config.recent_fraction)
    idx = np.nonzero(s >= lo)[0]
    if len(idx) < config.recent_min_points:
        idx = np.arange(max(0, len(s) - config.recent_min_points), len(s))
    return float(np.mean(v[idx])), s[idx], v[idx]


def _fit_numbers(s: IntArray, v: FloatArray, horizon: int, level: float) -> dict[str, Any]:
    f = fitmod.fit_power_law(s, v, level=level)
    out: dict[str, Any] = {"ok": f.ok, "reason": f.reason, "n": f.n}
    if f.ok:
        pred = f.predict(horizon)
        out.update(
            bpb_inf=_num(f.bpb_inf),
            a=_num(f.a),
            p=_num(f.p),
            bpb_inf_ci=[_num(f.bpb_inf_ci.low), _num(f.bpb_inf_ci.high)],
            sigma=_num(f.sigma),
            horizon=horizon,
            predicted=_num(pred.mean),
            pi=[_num(pred.pi.low), _num(pred.pi.high)],
        )
    return out


class _Race:
    """The per-call working state of ``decide``: curves, leader, seeds, decisions."""

    def __init__(self, snapshot: Snapshot, config: DecisionConfig) -> None:
        self.snap = snapshot
        self.cfg = config
        trials = sorted(snapshot.trials, key=lambda t: t.canon_name)
        self.clean: dict[str, CleanCurve] = {
            t.canon_name: clean_curve(np.asarray(t.steps), np.asarray(t.bpb)) for t in trials
        }
        self.events = check_snapshot(snapshot, config, self.clean)
        reviewed = snapshot.reviewed_tripwires
        self.active: list[TripwireEvent] = [
            e for e in snapshot.open_tripwires if e.key not in reviewed
        ] + self.events
        quarantined = {e.canon_name for e in self.active if e.kind in QUARANTINE_KINDS}
        self.curves: list[_Curve] = []
        for t in trials:
            c = self.clean[t.canon_name]
            if t.canon_name in quarantined or len(c.steps) == 0:
                continue
            self.curves.append(_Curve(t, c.steps, c.bpb, rung_reached(config, int(c.steps[-1]))))
        self.by_name = {c.name: c for c in self.curves}
        self.horizon = int(snapshot.horizon or config.rungs[-1])
        self.picker = SeedPicker(snapshot.race, dict(snapshot.used_seeds))
        for t in trials:
            self.picker.reserve(t.variant, [t.seed])
        self.leader = self._leader()
        self._score_cache: dict[tuple[str, int], _Score] = {}
        self._fit_cache: dict[tuple[str, int], dict[str, Any]] = {}
        self._drift_cache: dict[tuple[str, int], float | None] = {}

    # -- the leader and the states ------------------------------------------------------------
    def _leader(self) -> _Curve | None:
        live = [c for c in self.curves if c.alive]
        if not live:
            return None
        top = max(c.reached for c in live)
        boundary = self.cfg.rungs[top] if top >= 0 else max(int(c.steps[-1]) for c in live)
        at_top = [c for c in live if c.reached == top]
        return min(
            at_top,
            key=lambda c: (recent_mean(c.steps, c.bpb, boundary, self.cfg)[0], c.name),
        )

    def state(self, c: _Curve) -> StateReading:
        lead = self.leader
        if lead is None:
            return StateReading(SeedState.UNKNOWN, None, None, 0)
        return classify(
            c.steps, c.bpb, lead.steps, lead.bpb, self.cfg, is_leader=c.name == lead.name
        )

    # -- scores -------------------------------------------------------------------------------
    def fit_numbers(self, c: _Curve, r: int) -> dict[str, Any]:
        key = (c.name, r)
        if key not in self._fit_cache:
            s, v = prefix_at(c.steps, c.bpb, self.cfg.rungs[r])
            self._fit_cache[key] = _fit_numbers(s, v, self.horizon, self.cfg.level)
        return self._fit_cache[key]

    def score(self, c: _Curve, r: int) -> _Score:
        key = (c.name, r)
        if key in self._score_cache:
            return self._score_cache[key]
        boundary = self.cfg.rungs[r]
        if self.cfg.policy is Policy.SEED:
            fn = self.fit_numbers(c, r)
            if fn["ok"] and fn.get("predicted") is not None:
                sc = _Score(fn["predicted"], f"power-law prediction at step {self.horizon}", fn)
            else:
                s, v = prefix_at(c.steps, c.bpb, boundary)
                sc = _Score(
                    float(v[-1]),
                    f"last value at step {int(s[-1])} (too little to fit: {fn['reason']})",
                    fn,
                )
        else:
            value, s, _ = recent_mean(c.steps, c.bpb, boundary, self.cfg)
            sc = _Score(
                value,
                f"mean of {len(s)} recent samples (steps {int(s[0])}..{int(s[-1])})",
                {"recent_points": len(s)},
            )
        self._score_cache[key] = sc
        return sc

    def drift_var(self, r: int, cohort: list[_Curve]) -> float | None:
        """How fast the cohort reshuffles, per unit of log-step.

        Each trial's curve is centred on the cohort mean at every step (the noise all runs
        share cancels). The change of its smoothed centred value over the last octave (half
        the rung step to the rung step) has variance ``drift * log 2`` plus the jitter of the
        two smoothed values; the jitter comes from second differences and is subtracted
        (method of moments) when there are enough points to tell it from drift, otherwise it
        stays in, which errs on keeping. Pooled over the cohort; None without two trials
        that have data an octave back (so the first rungs cannot prune)."""
        key = ("*drift*", r)
        if key in self._drift_cache:
            return self._drift_cache[key]
        boundary = self.cfg.rungs[r]
        out = self._drift_since(cohort, boundary, boundary // 2) if boundary >= 2 else None
        self._drift_cache[key] = out
        return out

    def _drift_since(self, cohort: list[_Curve], boundary: int, past: int) -> float | None:
        """The drift estimate of ``drift_var`` between the steps ``past`` and ``boundary``."""
        members = [c for c in cohort if len(c.steps) and int(c.steps[0]) <= past]
        if len(members) < 2:
            return None
        cols: dict[int, list[float]] = {}
        prefixes = [prefix_at(c.steps, c.bpb, boundary) for c in members]
        for st, v in prefixes:
            for k, x in zip(st.tolist(), v.tolist(), strict=True):
                cols.setdefault(int(k), []).append(float(x))
        mean_at = {k: float(np.mean(x)) for k, x in cols.items() if len(x) >= 2}
        changes, jitter = [], []
        for st, v in prefixes:
            keep = np.array([int(k) in mean_at for k in st.tolist()], dtype=bool)
            st2 = st[keep]
            e = v[keep] - np.array([mean_at[int(k)] for k in st2.tolist()])
            if len(st2) < 2:
                continue
            now, s_now, _ = recent_mean(st2, e, boundary, self.cfg)
            then, s_then, _ = recent_mean(st2, e, past, self.cfg)
            if int(s_then[0]) == int(s_now[0]) and len(s_then) == len(s_now):
                continue  # the two windows are the same samples: nothing to compare
            changes.append(now - then)
            # Jitter from second differences (blind to a locally linear drift; var = 6 s^2),
            # only with a full slope window of points: fewer cannot tell jitter from drift.
            span = e[st2 >= past]
            enough = len(span) >= self.cfg.slope_window
            noise2 = float(np.mean(np.diff(span, 2) ** 2)) / 6 if enough else 0.0
            jitter.append(noise2 * (1 / len(s_now) + 1 / len(s_then)))
        if len(changes) < 2:
            return None
        ch = np.asarray(changes)
        # Robust to a few wild curves: the median squared deviation over the median of a
        # chi-square with one degree of freedom estimates the variance of the typical trial.
        var = float(np.median((ch - np.median(ch)) ** 2)) / CHI2_1_MEDIAN
        return max(0.0, var - float(np.mean(jitter))) / math.log(boundary / past)

    def paired(self, c: _Curve, ref: _Curve, r: int, drift: float | None) -> dict[str, Any]:
        """How sure we are that c ends worse than ref. The difference c - ref over their
        common recent steps at rung r has a standard error (jitter) and may still drift
        until the horizon: variance ``2 * drift * log(horizon / rung step)`` (both trials
        drift). The lower bound at ``prune_level`` of that predicted final difference is ``low``."""
        boundary = self.cfg.rungs[r]
        s1, v1 = prefix_at(c.steps, c.bpb, boundary)
        s2, v2 = prefix_at(ref.steps, ref.bpb, boundary)
        common, d = common_deltas(s1, v1, s2, v2)
        lo = boundary * (1.0 - self.cfg.recent_fraction)
        idx = np.nonzero(common >= lo)[0]
        if len(idx) < self.cfg.recent_min_points:
            idx = np.arange(max(0, len(common) - self.cfg.recent_min_points), len(common))
        d = d[idx]
        m = len(d)
        if m == 0 or drift is None:
            return {
                "points": m,
                "mean": float(np.mean(d)) if m else None,
                "low": None,
                "drift_per_log_step": drift,
            }
        mean = float(np.mean(d))
        se = float(np.std(d, ddof=1)) / math.sqrt(m) if m >= 2 else 0.0
        remaining = max(0.0, math.log(max(self.horizon, boundary) / boundary))
        sd = math.sqrt(se**2 + 2.0 * drift * remaining)
        # A normal quantile, per comparison: a Student-t on the few recent points, or a
        # family-wise level, kept nearly every trial on real curves (docs/backtest.md).
        z = float(special.ndtri(self.cfg.prune_level))  # the normal quantile
        return {
            "points": m,
            "mean": mean,
            "se": se,
            "drift_per_log_step": drift,
            "remaining_log_steps": remaining,
            "sd_final": sd,
            "low": mean - z * sd,
        }


def _base_numbers(race: _Race, c: _Curve, r: int, st: StateReading) -> dict[str, Any]:
    return {
        "policy": race.cfg.policy.value,
        "step": int(c.steps[-1]),
        "rung_step": race.cfg.rungs[r] if r >= 0 else None,
        "leader": race.leader.name if race.leader else None,
        **{k: (_num(v) if isinstance(v, float) else v) for k, v in st.as_numbers().items()},
    }


def _diverging(race: _Race, out: list[Decision]) -> set[str]:
    """Prune and replace every live DIVERGING trial now, whatever its rung."""
    killed: set[str] = set()
    lead = race.leader
    for c in race.curves:
        if not c.alive or lead is None or c.name == lead.name:
            continue
        st = race.state(c)
        if st.state is not SeedState.DIVERGING:
            continue
        r = max(c.trial.rung, c.reached)
        nums = _base_numbers(race, c, r, st) | {"cause": CAUSE_DIVERGING}
        why = (
            f"DIVERGING from leader {lead.name}: delta {st.delta:+.4f} BPB and growing "
            f"{st.slope:+.5f}/step over {min(st.common_points, race.cfg.slope_window)} points "
            f"(limit +{race.cfg.diverging_slope}/step)"
        )
        out.append(Decision(Action.PRUNE, c.name, r, f"kill now: {why}", st.state, nums))
        leader_seed = lead.trial.seed if lead.trial.variant == c.trial.variant else None
        picked = race.picker.pick(c.trial.variant, 1, leader_seed=leader_seed, order=REPLACE_ORDER)
        spawn = tuple(NewTrial(c.trial.variant, s, how, c.name) for s, how in picked)
        seeds = ", ".join(f"{s} ({how})" for s, how in picked) or "none left"
        out.append(
            Decision(
                Action.REPLACE,
                c.name,
                r,
                f"replace the DIVERGING trial with a fresh seed: {seeds}",
                st.state,
                nums,
                spawn,
            )
        )
        killed.add(c.name)
    return killed


def _mirrored_parents(race: _Race, promote_rung: int) -> int:
    """How many trials of the race were already mirrored: parents of other trials that had
    passed the promotion rung (a trial replaced after that rung counts too; harmless)."""
    names = {t.canon_name: t for t in race.snap.trials}
    parents = {t.parent for t in race.snap.trials if t.parent}
    return sum(1 for p in parents if p in names and names[p].rung >= promote_rung)


def _rung_decisions(race: _Race, r: int, pending: list[_Curve], out: list[Decision]) -> None:
    cfg = race.cfg
    rule = cfg.rung_rules[r]
    boundary = cfg.rungs[r]
    pend = {c.name for c in pending}
    # Everyone whose samples reached the rung while it was live (or was decided there or
    # later): the same set before and after this call's decisions are applied.
    cohort = [
        c
        for c in race.curves
        if c.name in pend or c.trial.rung >= r or (c.alive and c.reached >= r)
    ]
    cohort = [c for c in cohort if len(prefix_at(c.steps, c.bpb, boundary)[0])]
    ranked = sorted(cohort, key=lambda c: (race.score(c, r).value, c.name))
    rank = {c.name: i for i, c in enumerate(ranked)}
    n = len(ranked)
    best = ranked[0]
    lead = race.leader
    keep_n = keep_count(rule, n)
    already = sum(
        1
        for c in cohort
        if c.name not in pend
        and c.trial.rung == r
        and c.trial.desired_state is DesiredState.STOPPED
    )
    allowed = max(0, prune_quota(rule, n) - already)

    def numbers(c: _Curve, st: StateReading) -> dict[str, Any]:
        sc = race.score(c, r)
        nums = _base_numbers(race, c, r, st) | {
            "rule": rule.value,
            "rank": rank[c.name] + 1,
            "cohort": n,
            "keep": keep_n,
            "score": _num(sc.value),
            "basis": sc.basis,
            "best": best.name,
            "best_score": _num(race.score(best, r).value),
        }
        nums["fit"] = sc.numbers if cfg.policy is Policy.SEED else race.fit_numbers(c, r)
        return nums

    decided: dict[str, Decision] = {}
    if rule in (RungRule.HALVE, RungRule.TOP3, RungRule.TOP1):
        # Worst first, so the quota goes to the clearest losers.
        for c in sorted(pending, key=lambda c: (-rank[c.name], c.name)):
            if allowed <= 0 or rank[c.name] < keep_n or (lead and c.name == lead.name):
                continue
            st = race.state(c)
            nums = numbers(c, st)
            sc = race.score(c, r)
            if cfg.policy is Policy.GARDENER:
                pr = race.paired(c, best, r, race.drift_var(r, cohort))
                nums["paired"] = {k: _num(v) if isinstance(v, float) else v for k, v in pr.items()}
                low = pr.get("low")
                if low is None or low <= cfg.tied_band:
                    continue  # not sure enough it ends worse: keep (below)
                why = (
                    f"rung {r} ({rule.value}): rank {rank[c.name] + 1}/{n}, outside the top "
                    f"{keep_n}; {sc.basis} {sc.value:.4f}; worse than {best.name} by "
                    f"{pr['mean']:+.4f} BPB now, and at the horizon by more than {low:+.4f} "
                    f"with {cfg.prune_level:.0%} confidence (tie band {cfg.tied_band}); "
                    f"state {st.state.value}"
                )
            else:
                why = (
                    f"rung {r} ({rule.value}): rank {rank[c.name] + 1}/{n}, outside the top "
                    f"{keep_n}; {sc.basis} {sc.value:.4f}"
                )
            nums["cause"] = CAUSE_RUNG
            decided[c.name] = Decision(Action.PRUNE, c.name, r, f"prune: {why}", st.state, nums)
            allowed -= 1
    if rule is RungRule.PROMOTE and best.name in pend:
        st = race.state(best)
        nums = numbers(best, st)
        sc = race.score(best, r)
        decided[best.name] = Decision(
            Action.PROMOTE,
            best.name,
            r,
            f"promote: best of {n} at rung {r}; {sc.basis} {sc.value:.4f}",
            st.state,
            nums,
        )
        if _mirrored_parents(race, r) < cfg.mirror_rounds and cfg.mirror_count > 0:
            picked = race.picker.pick(
                best.trial.variant,
                cfg.mirror_count,
                leader_seed=best.trial.seed,
                order=MIRROR_ORDER,
            )
            spawn = tuple(NewTrial(best.trial.variant, s, how, best.name) for s, how in picked)
            seeds = ", ".join(f"{s} ({how})" for s, how in picked) or "none left"
            out.append(
                Decision(
                    Action.MIRROR,
                    best.name,
                    r,
                    f"mirror the rung-{r} leader with {len(spawn)} sibling seeds: {seeds}",
                    st.state,
                    nums,
                    spawn,
                )
            )
    for c in pending:
        if c.name in decided:
            out.append(decided[c.name])
            continue
        st = race.state(c)
        nums = numbers(c, st)
        sc = race.score(c, r)
        if rule is RungRule.VERDICT:
            last = float(prefix_at(c.steps, c.bpb, boundary)[1][-1])
            rows = [
                gates.Row(
                    x.name,
                    x.trial.seed,
                    x.trial.variant,
                    float(prefix_at(x.steps, x.bpb, boundary)[1][-1]),
                )
                for x in cohort
            ]
            verdict = gates.gate2(
                rows, threshold=cfg.gate2_bpb, seeds=cfg.gate2_seeds, quorum=cfg.gate_quorum
            )
            ok = last < cfg.gate2_bpb
            nums |= {
                "final_bpb": last,
                "gate": "gate-2",
                "trial_passes": ok,
                "race_verdict": verdict.passed,
                "race_reasons": list(verdict.reasons),
            }
            out.append(
                Decision(
                    Action.VERDICT,
                    c.name,
                    r,
                    f"gate-2: final BPB {last:.4f} {'<' if ok else '>='} {cfg.gate2_bpb}; "
                    f"race {'PASSES' if verdict.passed else 'does not pass'} "
                    f"({'; '.join(verdict.reasons)})",
                    st.state,
                    nums,
                )
            )
            continue
        if rule is RungRule.COLLECT:
            why = (
                f"rung {r} (collect): no kills yet; {sc.basis} {sc.value:.4f}, "
                f"rank {rank[c.name] + 1}/{n}"
            )
        elif rule is RungRule.PROMOTE:
            why = f"rung {r} (promote): {best.name} leads; keep, rank {rank[c.name] + 1}/{n}"
        elif lead is not None and c.name == lead.name:
            why = f"rung {r} ({rule.value}): the race leader is never pruned"
        elif rank[c.name] < keep_n:
            why = f"rung {r} ({rule.value}): rank {rank[c.name] + 1}/{n} within the top {keep_n}"
        elif allowed <= 0 and cfg.policy is Policy.SEED:
            why = f"rung {r} ({rule.value}): rank {rank[c.name] + 1}/{n}, but the quota is spent"
        else:
            pr = nums.get("paired") or race.paired(c, best, r, race.drift_var(r, cohort))
            nums["paired"] = {k: _num(v) if isinstance(v, float) else v for k, v in pr.items()}
            why = (
                f"rung {r} ({rule.value}): rank {rank[c.name] + 1}/{n} but not confidently worse "
                f"than {best.name} (difference {_fmt(pr.get('mean'))}, bound "
                f"{_fmt(pr.get('low'))}, state {st.state.value}) or quota spent: keep"
            )
        out.append(Decision(Action.KEEP, c.name, r, f"keep: {why}", st.state, nums))


def _fmt(x: Any) -> str:
    return "n/a" if x is None else f"{float(x):+.4f}"


def _hold(race: _Race, decisions: list[Decision]) -> list[Decision]:
    """Paused, or a blocking tripwire open: mutating decisions become HOLD with the reason.

    A floor or leak tripwire holds only PROMOTE and MIRROR: the suspect trial is quarantined
    (out of every comparison), so prunes among the others rest on data that passed the
    floor; holding them too would only burn compute. Any other blocking tripwire holds all.
    """
    blocking = [e for e in race.active if e.blocks_promotions]
    hold_all = [e for e in blocking if e.kind not in FLOOR_KINDS]
    floor = [e for e in blocking if e.kind in FLOOR_KINDS]
    out: list[Decision] = []
    for d in decisions:
        why = None
        if d.mutates:
            if race.snap.paused:
                why = "the race is paused"
            elif hold_all:
                why = f"tripwire {hold_all[0].key} is open"
            elif floor and d.action in (Action.PROMOTE, Action.MIRROR):
                why = f"tripwire {floor[0].key} is open (promotions held until reviewed)"
        if why is None:
            out.append(d)
        else:
            out.append(
                replace(
                    d,
                    action=Action.HOLD,
                    reason=f"hold {d.action.value}: {why}; would have: {d.reason}",
                    numbers=d.numbers | {"held_action": d.action.value},
                    spawn=(),
                )
            )
    return out


def decide(snapshot: Snapshot, config: DecisionConfig) -> list[Decision]:
    """Every decision the race calls for now; empty when nothing changed since the last call
    whose decisions were applied."""
    race = _Race(snapshot, config)
    out: list[Decision] = []
    open_keys = {e.key for e in snapshot.open_tripwires}
    for e in race.events:
        if e.key in open_keys:
            continue
        name = e.canon_name or "*"
        trial = race.by_name.get(name)
        r = trial.trial.rung if trial else -1
        out.append(
            Decision(
                Action.TRIPWIRE,
                name,
                r,
                f"tripwire {e.kind}: {e.evidence}",
                numbers={"kind": e.kind, "key": e.key, "blocks_promotions": e.blocks_promotions},
                tripwire=e,
            )
        )
    killed = _diverging(race, out)
    pending: dict[int, list[_Curve]] = {}
    for c in race.curves:
        if c.alive and c.name not in killed and c.reached > c.trial.rung:
            pending.setdefault(c.reached, []).append(c)
    for r in sorted(pending):
        _rung_decisions(race, r, pending[r], out)
    return _hold(race, out)


def leader_of(snapshot: Snapshot, config: DecisionConfig) -> str | None:
    """The canon name of the race leader ``decide`` protects (never pruned), if any."""
    lead = _Race(snapshot, config).leader
    return lead.name if lead else None


def apply_to_snapshot(snapshot: Snapshot, decisions: list[Decision]) -> Snapshot:
    """The snapshot as the daemon would record it after applying ``decisions``: decided
    rungs, stopped trials, spawned trials (no samples yet) and their seeds, opened
    tripwires. HOLD changes nothing, so a held decision comes back until released."""
    trials = {t.canon_name: t for t in snapshot.trials}
    order = [t.canon_name for t in snapshot.trials]
    used = {k: set(v) for k, v in snapshot.used_seeds.items()}
    opened = list(snapshot.open_tripwires)
    open_keys = {e.key for e in opened}
    for d in decisions:
        if d.action is Action.HOLD:
            continue
        if d.action is Action.TRIPWIRE:
            if d.tripwire is not None and d.tripwire.key not in open_keys:
                opened.append(d.tripwire)
                open_keys.add(d.tripwire.key)
            continue
        t = trials.get(d.canon_name)
        if t is not None:
            t = replace(t, rung=max(t.rung, d.rung))
            if d.action is Action.PRUNE:
                t = replace(t, desired_state=DesiredState.STOPPED)
            trials[d.canon_name] = t
        for nt in d.spawn:
            name = f"{nt.variant}-seed{nt.seed}"
            used.setdefault(nt.variant, set()).add(nt.seed)
            if name in trials:
                continue
            fmt = t.format if t is not None else "FP32"
            hidden = t.hidden_size if t is not None else None
            trials[name] = TrialView(
                canon_name=name,
                variant=nt.variant,
                seed=nt.seed,
                steps=np.zeros(0, dtype=np.int64),
                bpb=np.zeros(0, dtype=np.float64),
                parent=nt.parent,
                format=fmt,
                hidden_size=hidden,
                corpus_sha256=t.corpus_sha256 if t is not None else None,
            )
            order.append(name)
    return replace(
        snapshot,
        trials=tuple(trials[n] for n in order),
        used_seeds={k: frozenset(v) for k, v in used.items()},
        open_tripwires=tuple(opened),
    )
