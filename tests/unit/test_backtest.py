"""Backtest on small synthetic CSVs whose answers are worked out by hand."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from gardener.cli.app import app
from gardener.core.config import DecisionConfig, Policy
from gardener.errors import UserError
from gardener.race.backtest import (
    Race,
    Run,
    full,
    halving,
    load_curves,
    median_rule,
    run_backtest,
    rungs_for,
    simulate,
)

STEPS = range(100, 1001, 100)


def write(path: Path, curves: dict[str, list[float]], group: str | None = "g") -> Path:
    lines = ["run,step,value" + (",group" if group else "")]
    for name, values in curves.items():
        for step, v in zip(STEPS, values, strict=True):
            lines.append(f"{name},{step},{v}" + (f",{group}" if group else ""))
    path.write_text("\n".join(lines) + "\n")
    return path


def parallel(offsets: list[float]) -> dict[str, list[float]]:
    """Curves 3 + offset + 8/step: parallel, so every ranking is the final one."""
    return {f"r{i}-seed{i}": [3.0 + o + 8.0 / s for s in STEPS] for i, o in enumerate(offsets)}


@pytest.fixture
def race(tmp_path: Path) -> Race:
    # Finals 3.008, 3.133, 3.258, 3.383: best 3.008, mean 3.1955.
    return load_curves(write(tmp_path / "c.csv", parallel([0.0, 0.125, 0.25, 0.375])))[0]


def test_full_trains_everything_and_has_no_regret(race: Race) -> None:
    o = full(race)
    assert (o.compute, o.regret, o.nregret, o.top1) == (1.0, 0.0, 0.0, True)


def test_halving_keeps_a_quarter_at_each_rung(race: Race) -> None:
    # Rung 250 is first reached at step 300: keep ceil(4/4) = 1, the other three stop at 300.
    o = halving(race, (250, 500, 1000))
    assert o.compute == pytest.approx((1000 + 3 * 300) / 4000)
    assert o.pruned == 3 and o.regret == 0.0 and o.top1


def test_median_rule_stops_runs_worse_than_the_median(race: Race) -> None:
    # Rung 500: r2 (3.266) and r3 (3.391) are worse than the median of the others
    # (3.141 and 3.141); r0 and r1 are not. The first rung is a warm-up.
    o = median_rule(race, (250, 500, 1000))
    assert o.compute == pytest.approx((1000 + 1000 + 500 + 500) / 4000)
    assert o.pruned == 2 and o.top1


def test_the_plan_halves_clear_losers_at_rung_one(race: Race) -> None:
    # Rules for three rungs: collect, halve, verdict. The curves are exact and parallel, so
    # the plan prunes the bottom half (r2, r3) at rung 500 and keeps the best.
    cfg = DecisionConfig(policy=Policy.SEED).with_rungs((250, 500, 1000))
    o = simulate(race, cfg)
    assert o.compute == pytest.approx((1000 + 1000 + 500 + 500) / 4000)
    assert o.champion == "r0-seed0" and o.regret == 0.0 and o.nregret == 0.0


def test_the_gardener_prunes_clear_losers_earlier_than_the_plan(race: Race) -> None:
    # The same parallel curves: the gardener may cut at the first rung already (the gap of r3
    # is twice the pack's spread), and never loses the best.
    cfg = DecisionConfig(metric="loss").with_rungs((250, 500, 1000))
    o = simulate(race, cfg)
    assert o.pruned >= 2 and o.compute < (1000 + 1000 + 500 + 500) / 4000
    assert o.champion == "r0-seed0" and o.regret == 0.0


def test_regret_and_nregret_of_a_wrong_pick(tmp_path: Path) -> None:
    # r1 leads until step 400, then r0 overtakes it; halving at rung 250 keeps only r1.
    crossing = {
        "r0-seed0": [3.5, 3.4, 3.3, 3.0, 2.9, 2.8, 2.7, 2.6, 2.5, 2.4],
        "r1-seed1": [3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0],
        "r2-seed2": [3.6, 3.6, 3.6, 3.6, 3.6, 3.6, 3.6, 3.6, 3.6, 3.6],
    }
    race = load_curves(write(tmp_path / "x.csv", crossing))[0]
    o = halving(race, (250, 1000))
    assert o.champion == "r1-seed1"
    assert o.regret == pytest.approx(0.6)  # 3.0 - 2.4
    assert o.nregret == pytest.approx(0.6 / ((2.4 + 3.0 + 3.6) / 3 - 2.4))
    assert not o.top1


def test_a_diverging_run_is_replaced_from_the_pool(tmp_path: Path) -> None:
    # r1's gap to r0 grows 0.002 per step: DIVERGING once 8 common points exist (step 800).
    # With --initial 2, its replacement is r2, started at simulated step 800, which then runs
    # its full 1000 steps. One rung at 1000 (the verdict), so nothing else stops.
    curves = {
        "r0-seed0": [3.0] * 10,
        "r1-seed1": [3.0 + 0.002 * s for s in STEPS],
        "r2-seed2": [2.9] * 10,
    }
    race = load_curves(write(tmp_path / "d.csv", curves))[0]
    cfg = DecisionConfig().with_rungs((1000,))
    o = simulate(race, cfg, initial=2)
    assert o.compute == pytest.approx((1000 + 800 + 1000) / 3000)
    assert o.pruned == 1 and o.decisions["replace"] == 1
    assert o.champion == "r2-seed2" and o.top1


def test_rung_fractions_follow_each_race_horizon(race: Race) -> None:
    assert rungs_for(race, (0.25, 0.5, 1.0)) == (250, 500, 1000)


def test_load_curves_without_group_is_one_race_and_checks_columns(tmp_path: Path) -> None:
    races = load_curves(write(tmp_path / "n.csv", parallel([0.0, 0.1]), group=None))
    assert len(races) == 1 and len(races[0].runs) == 2
    bad = tmp_path / "bad.csv"
    bad.write_text("name,step,value\na,1,2\n")
    with pytest.raises(UserError, match="missing column"):
        load_curves(bad)


def test_run_backtest_summary_and_cli_json(tmp_path: Path) -> None:
    path = write(tmp_path / "c.csv", parallel([0.0, 0.125, 0.25, 0.375]))
    report = run_backtest(load_curves(path), rung_fractions=(0.25, 0.5, 1.0))
    assert set(report["summary"]) == {"gardener", "seed", "full", "halving", "median"}
    assert report["summary"]["gardener"]["compute"] < 0.75
    assert report["prediction"] and report["prediction"][0]["runs"] == 4
    out = tmp_path / "r.json"
    result = CliRunner().invoke(
        app,
        ["backtest", str(path), "--rung-fractions", "0.25,0.5,1", "--metric", "loss",
         "--sweep", "--json", str(out)],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["metric"] == "loss"
    assert data["summary"]["halving"]["compute"] == pytest.approx((1000 + 3 * 300) / 4000)
    assert "gardener" in result.output
    # The frontier: one point per knob setting, and a riskier knob never trains more.
    front = data["frontier"]
    assert len(front) >= 6 and {"knob", "compute", "nregret", "top1"} <= set(front[0])
    by_knob = sorted(front, key=lambda f: f["knob"])
    assert by_knob[0]["compute"] <= by_knob[-1]["compute"]
    bad = CliRunner().invoke(app, ["backtest", str(path), "--metric", "perplexity"])
    assert bad.exit_code != 0 and "--metric" in str(bad.exception)


def test_the_backtest_says_why_a_race_pruned_nothing(tmp_path: Path) -> None:
    # AlgoPerf-like losses (0.1-0.3) read as BPB are below the architectural floor: the floor
    # tripwire quarantines every run and nothing is pruned, and the report says so. Read as a
    # loss, the same race prunes its clear losers.
    curves = {f"r{i}-seed{i}": [0.1 + 0.05 * i + 0.8 / s for s in STEPS] for i in range(4)}
    path = write(tmp_path / "low.csv", curves)
    as_bpb = run_backtest(load_curves(path), rung_fractions=(0.25, 0.5, 1.0), prediction=False,
                          policies=("gardener",))
    why = as_bpb["races"][0]["methods"]["gardener"]["no_prune"]
    assert as_bpb["races"][0]["methods"]["gardener"]["pruned"] == 0
    assert "below_floor" in why
    as_loss = run_backtest(load_curves(path), rung_fractions=(0.25, 0.5, 1.0), prediction=False,
                           policies=("gardener",), config=DecisionConfig(metric="loss"))
    assert as_loss["races"][0]["methods"]["gardener"]["pruned"] > 0
    assert as_loss["races"][0]["methods"]["gardener"]["no_prune"] is None


def test_the_gardener_is_scale_free(tmp_path: Path) -> None:
    # The same races on another scale (x 1/16, exact in floating point) and shifted: the
    # gardener makes the same choices, so every figure is the same.
    rng = np.random.default_rng(5)
    base = {f"r{i}-seed{i}": [3.0 + 0.02 * i + 8.0 / s + rng.normal(0, 0.01) for s in STEPS]
            for i in range(6)}
    races = {
        k: load_curves(write(tmp_path / f"{k}.csv", {n: [f(x) for x in v]
                                                    for n, v in base.items()}))
        for k, f in {"bpb": lambda x: x, "small": lambda x: x / 16,
                     "shifted": lambda x: x / 16 - 0.125}.items()
    }
    cfg = DecisionConfig(metric="loss").with_rungs((250, 500, 1000))
    outs = {k: simulate(r[0], cfg) for k, r in races.items()}
    assert outs["bpb"].pruned > 0
    assert outs["small"].compute == outs["bpb"].compute == outs["shifted"].compute
    assert outs["small"].champion == outs["bpb"].champion == outs["shifted"].champion


def test_a_lower_prune_level_reaches_the_replay_and_stops_more() -> None:
    # Six seeds 0.01 apart under shared and per-run noise (sd 0.02): at 95% the gardener keeps
    # trials it prunes at 90%; both keep the best run.
    rng = np.random.default_rng(3)
    steps = np.arange(50, 3201, 50, dtype=np.int64)
    shared = rng.normal(0, 0.01, len(steps))
    runs = tuple(
        Run(f"r{i}-seed{i}", steps,
            2.5 + 3.0 * steps**-0.4 + 0.01 * i + shared + rng.normal(0, 0.02, len(steps)))
        for i in range(6)
    )
    base = DecisionConfig().with_rungs((100, 200, 400, 800, 1600, 3200))
    strict = simulate(Race("noisy", runs), replace(base, prune_level=0.95))
    loose = simulate(Race("noisy", runs), replace(base, prune_level=0.90))
    assert (strict.pruned, loose.pruned) == (1, 3)
    assert loose.compute < strict.compute
    assert strict.champion == loose.champion == "r0-seed0"
