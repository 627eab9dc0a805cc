"""What a rung decides for the trials that reached it, under either policy.

The cohort of a rung is every trial whose samples reached it while it was live (or that was
decided there or later): the same set before and after this call's decisions are applied.

- ``seed`` (the plan, literally): rank by the power-law prediction at the horizon and prune
  to the rung's quota (collect, halve, top 3, promote and mirror, top 1, verdict).
- ``gardener`` (the default): every rung but the last keeps about ``1/eta`` of the cohort and
  prunes only the trials clearly worse than the cut (``promotion.cut``); the plan's promote
  rung also promotes and mirrors the best; the last rung gives the verdict (gate 2 for BPB).
"""

from __future__ import annotations

import math
from typing import Any

from gardener.core import gates
from gardener.core.config import Policy, RungRule
from gardener.core.levels import JITTER_MIN_POINTS, Level, jitter
from gardener.core.promotion import RESHUFFLE_PRIOR, CutResult, cut
from gardener.core.promotion import Verdict as CutVerdict
from gardener.core.race_view import Curve, RaceView, num
from gardener.core.rungs import keep_count, prefix_at, prune_quota
from gardener.core.seeds import MIRROR_ORDER
from gardener.core.states import StateReading, common_deltas
from gardener.core.types import Action, Decision, DesiredState, NewTrial

CAUSE_RUNG = "rung"

# Why a trial was kept, in a word (the backtest counts them to say why a race pruned nothing).
KEPT_WITHIN_CUT = "within_cut"
KEPT_UNCLEAR = "not_clearly_worse"
KEPT_WAITING = "cohort_incomplete"
KEPT_LEADER = "leader"
KEPT_FINAL = "final_rung"
KEPT_COLLECT = "collect"
KEPT_QUOTA = "quota_spent"
KEPT_FEW_POINTS = "too_few_points"


def _fmt(x: Any) -> str:
    return "n/a" if x is None else f"{float(x):+.4g}"


def _cohort(view: RaceView, r: int, pend: set[str]) -> list[Curve]:
    boundary = view.cfg.rungs[r]
    out = [
        c
        for c in view.curves
        if c.name in pend or c.trial.rung >= r or (c.alive and c.reached >= r)
    ]
    return [c for c in out if len(prefix_at(c.steps, c.values, boundary)[0])]


def _mirrored_parents(view: RaceView, promote_rung: int) -> int:
    """How many trials of the race were already mirrored: parents of other trials that had
    passed the promotion rung (a trial replaced after that rung counts too; harmless)."""
    names = {t.canon_name: t for t in view.snap.trials}
    parents = {t.parent for t in view.snap.trials if t.parent}
    return sum(1 for p in parents if p in names and names[p].rung >= promote_rung)


def _promote(
    view: RaceView, r: int, best: Curve, nums: dict[str, Any], why: str, out: list[Decision]
) -> Decision:
    cfg = view.cfg
    st = view.state(best)
    d = Decision(Action.PROMOTE, best.name, r, f"promote: {why}", st.state, nums)
    if _mirrored_parents(view, r) < cfg.mirror_rounds and cfg.mirror_count > 0:
        picked = view.picker.pick(
            best.trial.variant, cfg.mirror_count, leader_seed=best.trial.seed, order=MIRROR_ORDER
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
    return d


def _verdict(
    view: RaceView, r: int, c: Curve, cohort: list[Curve], st: StateReading, nums: dict[str, Any]
) -> Decision:
    cfg = view.cfg
    boundary = cfg.rungs[r]
    last = float(prefix_at(c.steps, c.values, boundary)[1][-1])
    if not cfg.is_bpb:
        nums |= {"final_value": last, "keep_why": KEPT_FINAL}
        return Decision(
            Action.KEEP,
            c.name,
            r,
            f"keep: final rung; value {last:.6g} ({cfg.metric}: no gate)",
            st.state,
            nums,
        )
    rows = [
        gates.Row(
            x.name,
            x.trial.seed,
            x.trial.variant,
            float(prefix_at(x.steps, x.values, boundary)[1][-1]),
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
    return Decision(
        Action.VERDICT,
        c.name,
        r,
        f"gate-2: final BPB {last:.4f} {'<' if ok else '>='} {cfg.gate2_bpb}; "
        f"race {'PASSES' if verdict.passed else 'does not pass'} ({'; '.join(verdict.reasons)})",
        st.state,
        nums,
    )


# -- gardener -------------------------------------------------------------------------------------
def _gardener_cut(view: RaceView, r: int, cohort: list[Curve], wait: bool) -> CutResult:
    cfg = view.cfg
    boundary = cfg.rungs[r]
    past = max(1, boundary // 2)
    levels: dict[str, Level] = {}
    earlier: dict[str, Level] = {}
    for c in cohort:
        lv = view.level(c, boundary)
        if lv is None:
            continue
        levels[c.name] = lv
        if int(c.steps[0]) <= past:
            ev = view.level(c, past)
            if ev is not None and ev.last_step < lv.first_step:
                earlier[c.name] = ev
    names = {c.name for c in cohort}
    # Live trials one rung behind are on their way: the cut counts them, and the rung waits
    # for them (``_gardener_rung``). Trials further behind (started later) do not hold it up.
    coming = sum(
        1 for c in view.curves if c.alive and c.reached == r - 1 and c.name not in names
    )
    protected = frozenset({view.leader.name}) if view.leader else frozenset()
    return cut(
        levels,
        earlier,
        boundary=boundary,
        past=past,
        horizon=view.horizon,
        coming=coming,
        eta=cfg.reduction_factor,
        prune_level=cfg.prune_level,
        prior_ratio=RESHUFFLE_PRIOR if cfg.reshuffle_prior is None else cfg.reshuffle_prior,
        protected=protected,
        paired_se=lambda a, b: _paired_se(view, view.by_name[a], view.by_name[b], boundary),
        wait=wait,
    )


def _paired_se(view: RaceView, a: Curve, b: Curve, boundary: int) -> float | None:
    """The standard error of a's level minus b's from the jitter of their difference at the
    steps both have (None when they share too few steps to tell)."""
    s1, v1 = prefix_at(a.steps, a.values, boundary)
    s2, v2 = prefix_at(b.steps, b.values, boundary)
    common, d = common_deltas(s1, v1, s2, v2)
    if len(common) < JITTER_MIN_POINTS:
        return None
    lv = view.level(a, boundary)
    points = lv.points if lv is not None else 1
    return jitter(d) / math.sqrt(points)


def _cut_numbers(res: CutResult, v: CutVerdict) -> dict[str, Any]:
    rs = res.reshuffle
    return {
        "keep": res.keep,
        "expected": res.expected,
        "cut": res.cut_name,
        "quota": max(0, res.expected - res.keep),
        "separation": {
            **{k: num(x) if isinstance(x, float) else x for k, x in v.as_numbers().items()},
            "z": num(res.z),
            "remaining_log_steps": num(res.remaining_log_steps),
            "reshuffle_per_log_step": num(rs.rate),
            "reshuffle_measured": num(rs.measured),
            "reshuffle_members": rs.members,
            "cohort_spread": num(rs.spread),
        },
    }


_NO = CutVerdict("", 0, False, False, None, None, None)


def _gardener_rung(view: RaceView, r: int, pending: list[Curve], out: list[Decision]) -> None:
    cfg = view.cfg
    rule = cfg.rung_rules[r]
    pend = {c.name for c in pending}
    cohort = _cohort(view, r, pend)
    final = rule is RungRule.VERDICT or r == len(cfg.rungs) - 1
    # While part of the cohort is still on its way, an early arrival is kept for now (it
    # runs on) and judged with the rest when the last of them arrives (below).
    res = _gardener_cut(view, r, cohort, wait=not final)
    complete = res.expected <= len(res.verdicts)
    ranked = sorted(res.verdicts.values(), key=lambda v: v.rank)
    best = view.by_name[ranked[0].name] if ranked else None
    n = len(ranked)
    lead = view.leader
    view.fit_all(pending, r)
    # Trials kept at this rung while the cohort was still arriving, and still between this
    # rung and the next: now that the cohort is complete, the clearly worse of them go too.
    early = [
        c
        for c in cohort
        if complete and not final and c.name not in pend and c.alive
        and c.trial.rung == r and c.reached == r and res.verdicts.get(c.name, _NO).prune
    ]
    for c in [*pending, *early]:
        v = res.verdicts.get(c.name)
        st = view.state(c)
        nums = view.base_numbers(c, r, st) | {"rule": "cut" if not final else rule.value}
        lv = view.level(c, cfg.rungs[r])
        if v is None or lv is None:
            nums |= {"rank": None, "score": None, "keep_why": KEPT_FEW_POINTS}
            why = "keep: no sample at the rung"
            out.append(Decision(Action.KEEP, c.name, r, why, st.state, nums))
            continue
        nums |= {
            "rank": v.rank,
            "cohort": n,
            "score": num(lv.value),
            "score_se": num(lv.se),
            "basis": f"mean of {lv.points} samples (steps {lv.first_step}..{lv.last_step})",
            "best": best.name if best else None,
            "fit": view.fit(c, r),
        } | _cut_numbers(res, v)
        head = f"rung {r}: rank {v.rank}/{n} (level {lv.value:.6g} ± {lv.se:.2g})"
        if final:
            out.append(_verdict(view, r, c, cohort, st, nums))
            continue
        if v.prune:
            nums["cause"] = CAUSE_RUNG
            why = f"{head}, below the cut (keep {res.keep} of {res.expected}) and " + (
                f"clearly worse than {res.cut_name}: gap {_fmt(v.gap)} > {res.z:.2f} x sd "
                f"{v.sd:.3g} (jitter and reshuffling to the horizon)"
                if v.clearly_worse
                else f"not worth its remaining compute: expected gain over {res.cut_name} "
                f"{_fmt(v.gain)} < {_fmt(v.worth)} (gap {_fmt(v.gap)}, sd {_fmt(v.sd)})"
            )
            out.append(Decision(Action.PRUNE, c.name, r, f"prune: {why}", st.state, nums))
            continue
        if rule is RungRule.PROMOTE and best is not None and c.name == best.name:
            nums["keep_why"] = KEPT_WITHIN_CUT
            out.append(_promote(view, r, c, nums, f"best of {n} at rung {r}; {head}", out))
            continue
        if lead is not None and c.name == lead.name:
            kw, why = KEPT_LEADER, f"{head}: the race leader is never pruned"
        elif not complete:
            kw = KEPT_WAITING
            why = (
                f"{head}: {len(res.verdicts)} of {res.expected} have reached the rung; kept "
                f"for now, judged with the rest when they arrive"
            )
        elif res.cut_name is None:
            kw = KEPT_WAITING
            why = f"{head}: fewer than {res.keep} of {res.expected} have reached the rung"
        elif not v.below_cut:
            kw, why = KEPT_WITHIN_CUT, f"{head}: within the best {res.keep} of {res.expected}"
        else:
            kw = KEPT_UNCLEAR
            why = (
                f"{head}: below the cut but not clearly worse than {res.cut_name} "
                f"(gap {_fmt(v.gap)}, sd {_fmt(v.sd)}, z {res.z:.2f})"
            )
        nums["keep_why"] = kw
        out.append(Decision(Action.KEEP, c.name, r, f"keep: {why}", st.state, nums))


# -- seed (the plan) ---------------------------------------------------------------------------
def _seed_score(view: RaceView, c: Curve, r: int) -> tuple[float, str, dict[str, Any]]:
    fn = view.fit(c, r)
    if fn["ok"] and fn.get("predicted") is not None:
        return fn["predicted"], f"power-law prediction at step {view.horizon}", fn
    s, v = prefix_at(c.steps, c.values, view.cfg.rungs[r])
    return float(v[-1]), f"last value at step {int(s[-1])} (no fit: {fn['reason']})", fn


def _seed_rung(view: RaceView, r: int, pending: list[Curve], out: list[Decision]) -> None:
    cfg = view.cfg
    rule = cfg.rung_rules[r]
    pend = {c.name for c in pending}
    cohort = _cohort(view, r, pend)
    view.fit_all(cohort, r)
    scores = {c.name: _seed_score(view, c, r) for c in cohort}
    ranked = sorted(cohort, key=lambda c: (scores[c.name][0], c.name))
    rank = {c.name: i for i, c in enumerate(ranked)}
    n = len(ranked)
    best = ranked[0]
    lead = view.leader
    keep_n = keep_count(rule, n)
    already = sum(
        1
        for c in cohort
        if c.name not in pend
        and c.trial.rung == r
        and c.trial.desired_state is DesiredState.STOPPED
    )
    allowed = max(0, prune_quota(rule, n) - already)

    def numbers(c: Curve, st: StateReading) -> dict[str, Any]:
        value, basis, fn = scores[c.name]
        return view.base_numbers(c, r, st) | {
            "rule": rule.value,
            "rank": rank[c.name] + 1,
            "cohort": n,
            "keep": keep_n,
            "quota": prune_quota(rule, n),
            "score": num(value),
            "basis": basis,
            "best": best.name,
            "best_score": num(scores[best.name][0]),
            "fit": fn,
        }

    decided: dict[str, Decision] = {}
    if rule in (RungRule.HALVE, RungRule.TOP3, RungRule.TOP1):
        for c in sorted(pending, key=lambda c: (-rank[c.name], c.name)):  # worst first
            if allowed <= 0 or rank[c.name] < keep_n or (lead and c.name == lead.name):
                continue
            st = view.state(c)
            nums = numbers(c, st) | {"cause": CAUSE_RUNG}
            value, basis, _ = scores[c.name]
            why = (
                f"rung {r} ({rule.value}): rank {rank[c.name] + 1}/{n}, outside the top "
                f"{keep_n}; {basis} {value:.4f}"
            )
            decided[c.name] = Decision(Action.PRUNE, c.name, r, f"prune: {why}", st.state, nums)
            allowed -= 1
    if rule is RungRule.PROMOTE and best.name in pend:
        value, basis, _ = scores[best.name]
        decided[best.name] = _promote(
            view, r, best, numbers(best, view.state(best)),
            f"best of {n} at rung {r}; {basis} {value:.4f}", out,
        )
    for c in pending:
        if c.name in decided:
            out.append(decided[c.name])
            continue
        st = view.state(c)
        nums = numbers(c, st)
        value, basis, _ = scores[c.name]
        at = f"rank {rank[c.name] + 1}/{n}"
        if rule is RungRule.VERDICT:
            out.append(_verdict(view, r, c, cohort, st, nums))
            continue
        if rule is RungRule.COLLECT:
            kw = KEPT_COLLECT
            why = f"rung {r} (collect): no kills yet; {basis} {value:.4f}, {at}"
        elif rule is RungRule.PROMOTE:
            kw, why = KEPT_WITHIN_CUT, f"rung {r} (promote): {best.name} leads; keep, {at}"
        elif lead is not None and c.name == lead.name:
            kw, why = KEPT_LEADER, f"rung {r} ({rule.value}): the race leader is never pruned"
        elif rank[c.name] < keep_n:
            kw = KEPT_WITHIN_CUT
            why = f"rung {r} ({rule.value}): rank {rank[c.name] + 1}/{n} within the top {keep_n}"
        else:
            kw = KEPT_QUOTA
            why = f"rung {r} ({rule.value}): rank {rank[c.name] + 1}/{n}, but the quota is spent"
        nums["keep_why"] = kw
        out.append(Decision(Action.KEEP, c.name, r, f"keep: {why}", st.state, nums))


def rung_decisions(view: RaceView, r: int, pending: list[Curve], out: list[Decision]) -> None:
    """Append the decisions of rung ``r`` for the ``pending`` trials (those that reached it)."""
    if view.cfg.policy is Policy.SEED:
        _seed_rung(view, r, pending, out)
    else:
        _gardener_rung(view, r, pending, out)
