"""The pruners people use today, replayed on the same recorded races as ``gardener backtest``.

- ``optuna_sh``, ``optuna_hb``, ``optuna_median``: Optuna's SuccessiveHalvingPruner (reduction
  factor 4), HyperbandPruner and MedianPruner, run the way Optuna runs them: one study per race,
  the race's runs as trials one after another (in the file's order), ``trial.report(value,
  step)`` then ``trial.should_prune()`` at every evaluation; a pruned trial stops at that step.
  Their defaults otherwise (``min_resource="auto"``, Hyperband's ``max_resource="auto"``,
  the Median pruner's 5 start-up trials). Needs the ``bench`` extra (``pip install -e
  '.[bench]'``); Optuna is never a runtime dependency of the gardener.
- ``asha``: asynchronous successive halving (Li et al. 2020), this module's implementation:
  every run starts at once and advances on a shared clock (its own step); at each rung (the
  same rung fractions the gardener gets) a run records its value and goes on only if it is in
  the top ``1/eta`` of the values recorded at that rung so far (the best so far when fewer
  than ``eta`` have been recorded; Optuna's promotion rule), ``eta`` = 4.

Every peer is scored by ``gardener.race.backtest``'s own ``_outcome`` (compute, regret,
nregret, top1), so the numbers compare one to one with the gardener's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from gardener.race.backtest import Outcome, Race, _outcome, rungs_for

ETA = 4
PEERS = ("optuna_sh", "optuna_hb", "optuna_median", "asha")


def _optuna() -> Any:
    try:
        import optuna
    except ImportError as exc:  # pragma: no cover - depends on the extra
        raise SystemExit(
            "the peers need Optuna: .venv/bin/python -m pip install -e '.[bench]'"
        ) from exc
    optuna.logging.set_verbosity(logging.WARNING)
    return optuna


def _pruner(kind: str) -> Any:
    optuna = _optuna()
    if kind == "optuna_sh":
        return optuna.pruners.SuccessiveHalvingPruner(reduction_factor=ETA)
    if kind == "optuna_hb":
        return optuna.pruners.HyperbandPruner()
    if kind == "optuna_median":
        return optuna.pruners.MedianPruner()
    raise ValueError(f"unknown Optuna peer {kind!r}")


def run_optuna(race: Race, kind: str) -> Outcome:
    """One race through one Optuna pruner, trials one after another."""
    optuna = _optuna()
    study = optuna.create_study(
        study_name=f"{kind}:{race.name}",
        direction="minimize",
        pruner=_pruner(kind),
        sampler=optuna.samplers.RandomSampler(seed=0),
    )
    trained: dict[str, int] = {}
    finished: list[str] = []
    pruned = 0
    for run in race.runs:
        trial = study.ask()
        stopped = False
        for step, value in zip(run.steps.tolist(), run.values.tolist(), strict=True):
            trial.report(float(value), int(step))
            if int(step) < run.final_step and trial.should_prune():
                trained[run.name] = int(step)
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                pruned += 1
                stopped = True
                break
        if not stopped:
            trained[run.name] = run.final_step
            finished.append(run.name)
            study.tell(trial, float(run.final))
    return _outcome(race, trained, finished, pruned)


def run_asha(race: Race, fractions: Sequence[float], eta: int = ETA) -> Outcome:
    """Asynchronous successive halving on the race's rung fractions (see the module doc)."""
    rungs = [b for b in rungs_for(race, fractions) if b < race.horizon]
    # Every (arrival step, run) at each rung, processed in time order (ties by name).
    arrivals: list[tuple[int, str, int, float]] = []
    for run in race.runs:
        for i, b in enumerate(rungs):
            if run.final_step <= b:
                break
            k = int((run.steps >= b).argmax())
            arrivals.append((int(run.steps[k]), run.name, i, float(run.values[k])))
    arrivals.sort()
    recorded: list[list[float]] = [[] for _ in rungs]
    stopped: dict[str, int] = {}
    for step, name, i, value in arrivals:
        if name in stopped:
            continue
        recorded[i].append(value)
        ranked = sorted(recorded[i])
        top = len(ranked) // eta
        promotable = value <= ranked[top - 1] if top >= 1 else value <= ranked[0]
        if not promotable:
            stopped[name] = step
    trained = {r.name: stopped.get(r.name, r.final_step) for r in race.runs}
    finished = [r.name for r in race.runs if r.name not in stopped]
    return _outcome(race, trained, finished, len(stopped))


def peer_runners(fractions: Sequence[float]) -> dict[str, Callable[[Race], Outcome]]:
    return {
        "optuna_sh": lambda race: run_optuna(race, "optuna_sh"),
        "optuna_hb": lambda race: run_optuna(race, "optuna_hb"),
        "optuna_median": lambda race: run_optuna(race, "optuna_median"),
        "asha": lambda race: run_asha(race, fractions),
    }


def summarize(outcomes: list[Outcome]) -> dict[str, float | int | None]:
    """Mean compute, regret, nregret and top1 over races (as ``run_backtest`` does)."""
    if not outcomes:
        return {"compute": None, "regret": None, "nregret": None, "top1": None, "races": 0}
    n = len(outcomes)
    return {
        "compute": sum(o.compute for o in outcomes) / n,
        "regret": sum(o.regret for o in outcomes) / n,
        "nregret": sum(o.nregret for o in outcomes) / n,
        "top1": sum(1.0 for o in outcomes if o.top1) / n,
        "races": n,
    }


def run_peers(races: Sequence[Race], fractions: Sequence[float]) -> dict[str, Any]:
    """Every peer on every race with at least two runs: the summary per peer."""
    scored = [r for r in races if len(r.runs) >= 2]
    out: dict[str, Any] = {}
    for name, fn in peer_runners(fractions).items():
        out[name] = summarize([fn(r) for r in scored])
    return out
