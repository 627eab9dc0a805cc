"""``decide(snapshot, config) -> [Decision]``: the one decision function of the race.

Pure and deterministic: trials are handled in canon-name order, ties break by name, and new
seeds come from ``SeedPicker``. One call does, in order:

1. tripwires: new events become TRIPWIRE decisions; quarantined trials leave the race's
   comparisons; blocking ones turn mutating decisions into HOLD (see ``_hold``);
2. the leader: the best live trial at the highest rung any live trial reached;
3. DIVERGING trials are pruned at once and replaced with a fresh seed;
4. every live trial that reached a rung above ``TrialView.rung`` is decided at its highest
   reached rung, against the cohort of every trial that reached that rung
   (``rung_decisions``: the plan's rules for policy ``seed``, the noise-aware cut of
   ``promotion`` for the default ``gardener``).

The pieces: ``race_view`` (curves, levels, fits, states of one call), ``levels`` (a trial's
smoothed level and jitter), ``promotion`` (the gardener's cut), ``rung_decisions`` (both
policies' rung rules), ``replay`` (``apply_to_snapshot``).
"""

from __future__ import annotations

from dataclasses import replace

from gardener.core.config import DecisionConfig
from gardener.core.race_view import RaceView
from gardener.core.replay import apply_to_snapshot
from gardener.core.rung_decisions import rung_decisions
from gardener.core.seeds import REPLACE_ORDER
from gardener.core.states import may_diverge, state_of
from gardener.core.tripwires import FLOOR_KINDS
from gardener.core.types import Action, Decision, NewTrial, SeedState, Snapshot

__all__ = ["CAUSE_DIVERGING", "apply_to_snapshot", "decide", "leader_of"]

CAUSE_DIVERGING = "diverging"


def _diverging(view: RaceView, out: list[Decision]) -> set[str]:
    """Prune and replace every live DIVERGING trial now, whatever its rung."""
    killed: set[str] = set()
    lead = view.leader
    for c in view.curves:
        if not c.alive or lead is None or c.name == lead.name:
            continue
        cmp = view.comparison(c)
        if cmp is None or not may_diverge(cmp, view.cfg):
            continue  # the common case, without building a state reading
        st = state_of(cmp, view.cfg)
        if st.state is not SeedState.DIVERGING or not view.rising(c):
            continue
        r = max(c.trial.rung, c.reached)
        nums = view.base_numbers(c, r, st) | {"cause": CAUSE_DIVERGING}
        why = (
            f"DIVERGING from leader {lead.name}: delta {st.delta:+.4g} and growing "
            f"{st.slope:+.3g}/step over {min(st.common_points, view.cfg.slope_window)} points "
            f"(limit +{view.cfg.diverging_slope:.3g}/step)"
        )
        out.append(Decision(Action.PRUNE, c.name, r, f"kill now: {why}", st.state, nums))
        leader_seed = lead.trial.seed if lead.trial.variant == c.trial.variant else None
        picked = view.picker.pick(c.trial.variant, 1, leader_seed=leader_seed, order=REPLACE_ORDER)
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


def _hold(view: RaceView, decisions: list[Decision]) -> list[Decision]:
    """Paused, or a blocking tripwire open: mutating decisions become HOLD with the reason.

    A floor or leak tripwire holds only PROMOTE and MIRROR: the suspect trial is quarantined
    (out of every comparison), so prunes among the others rest on data that passed the
    floor; holding them too would only burn compute. Any other blocking tripwire holds all.
    """
    blocking = [e for e in view.active if e.blocks_promotions]
    hold_all = [e for e in blocking if e.kind not in FLOOR_KINDS]
    floor = [e for e in blocking if e.kind in FLOOR_KINDS]
    out: list[Decision] = []
    for d in decisions:
        why = None
        if d.mutates:
            if view.snap.paused:
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
    view = RaceView(snapshot, config)
    out: list[Decision] = []
    open_keys = {e.key for e in snapshot.open_tripwires}
    for e in view.events:
        if e.key in open_keys:
            continue
        name = e.canon_name or "*"
        trial = view.by_name.get(name)
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
    killed = _diverging(view, out)
    pending: dict[int, list] = {}
    for c in view.curves:
        if c.alive and c.name not in killed and c.reached > c.trial.rung:
            pending.setdefault(c.reached, []).append(c)
    for r in sorted(pending):
        rung_decisions(view, r, pending[r], out)
    return _hold(view, out)


def leader_of(snapshot: Snapshot, config: DecisionConfig) -> str | None:
    """The canon name of the race leader ``decide`` protects (never pruned), if any."""
    lead = RaceView(snapshot, config).leader
    return lead.name if lead else None
