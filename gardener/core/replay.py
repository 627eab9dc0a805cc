"""``apply_to_snapshot``: what the daemon records after applying decisions, as a snapshot.

The backtest replays a race with it and the property tests check that deciding again after
applying adds nothing; ``gardener.ledger.apply`` makes exactly these changes in the ledger.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from gardener.core.types import Action, Decision, DesiredState, Snapshot, TrialView


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
