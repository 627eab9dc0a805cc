"""``gardener backtest CURVES.csv``: replay recorded curves through ``decide`` and score it
against the baselines (full, successive halving, median stopping)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from gardener.cli.common import AccountOpt, account_filter
from gardener.core.config import METRICS, DecisionConfig, Policy
from gardener.errors import UserError
from gardener.race.backtest import (
    BASELINES,
    SWEEP_LEVELS,
    dominated_by,
    load_curves,
    run_backtest,
)

console = Console()


def _floats(text: str | None, what: str) -> list[float] | None:
    if not text:
        return None
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{what}: a comma-separated list of numbers, got {text!r}") from None


def backtest_cmd(
    curves: Annotated[Path, typer.Argument(help="CSV with run, step, value[, group] columns.")],
    policy: Annotated[
        str, typer.Option(help="Policies to replay, comma-separated (gardener, seed).")
    ] = "gardener,seed",
    rungs: Annotated[
        str | None, typer.Option(help="Rung steps, comma-separated (default: the plan's).")
    ] = None,
    rung_fractions: Annotated[
        str | None,
        typer.Option(help="Rungs as fractions of each race's horizon, e.g. 0.1,0.2,0.4,1."),
    ] = None,
    initial: Annotated[
        int | None,
        typer.Option(help="Runs started per race; the rest is the pool spawns draw from."),
    ] = None,
    metric: Annotated[
        str,
        typer.Option(
            help="What the values are: bpb (BPB-only tripwires and gate apply) or loss "
            "(any lower-is-better metric; every threshold relative to the race's own scale)."
        ),
    ] = "bpb",
    sweep: Annotated[
        bool,
        typer.Option(
            "--sweep",
            help="Also replay the gardener at several settings of its risk knob and add the "
            "trade-off as \"frontier\" to the JSON.",
        ),
    ] = False,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write the full report as JSON here.")
    ] = None,
    acct: AccountOpt = None,
) -> None:
    """Replay recorded curves through the decision policy and report compute and regret."""
    account_filter(acct)  # recorded curves belong to no account; a given one must be known
    names = [p.strip() for p in policy.split(",") if p.strip()]
    known = {p.value for p in Policy}
    bad = [n for n in names if n not in known]
    if bad or not names:
        raise UserError(f"unknown policy {', '.join(bad) or '(none)'}; known: {sorted(known)}")
    rung_steps = _floats(rungs, "--rungs")
    fractions = _floats(rung_fractions, "--rung-fractions")
    if fractions and any(not 0 < f <= 1 for f in fractions):
        raise UserError("--rung-fractions must lie in (0, 1]")
    if initial is not None and initial < 1:
        raise UserError("--initial must be at least 1")
    if metric not in METRICS:
        raise UserError(f"--metric must be one of {', '.join(METRICS)}, got {metric!r}")
    config = DecisionConfig(metric=metric)
    if rung_steps:
        try:
            config = config.with_rungs(tuple(int(x) for x in rung_steps))
        except ValueError as exc:
            raise UserError(f"--rungs: {exc}") from None
    races = load_curves(curves)
    report = run_backtest(
        races,
        config=config,
        policies=names,
        rungs=config.rungs,
        rung_fractions=fractions,
        initial=initial,
        sweep=SWEEP_LEVELS if sweep else None,
    )
    table = Table(title=f"backtest of {curves.name}: {report['summary'][names[0]]['races']} races")
    for col in ("method", "compute", "regret", "nregret", "top1", "dominated by"):
        table.add_column(col, justify="left" if col in ("method", "dominated by") else "right")
    for method in [*names, *BASELINES]:
        s = report["summary"][method]
        if s["compute"] is None:
            continue
        dom = ", ".join(dominated_by(report["summary"], method)) if method in names else ""
        table.add_row(
            method,
            f"{s['compute']:.3f}",
            f"{s['regret']:.4f}",
            f"{s['nregret']:.3f}",
            f"{s['top1']:.2f}",
            dom,
        )
    console.print(table)
    if report["prediction"]:
        pt = Table(title="power-law prediction of the final value, per rung")
        for col in ("rung", "fraction", "runs", "fitted", "MAE", "95% PI coverage", "MAE last"):
            pt.add_column(col, justify="right")
        for p in report["prediction"]:
            pt.add_row(
                str(p["rung"]),
                f"{p['fraction']:.3f}",
                str(p["runs"]),
                str(p["fitted"]),
                "n/a" if p["mae"] is None else f"{p['mae']:.4f}",
                "n/a" if p["coverage"] is None else f"{p['coverage']:.2f}",
                f"{p['mae_last_value']:.4f}",
            )
        console.print(pt)
    quiet = [
        (r["race"], m, r["methods"][m]["no_prune"])
        for r in report["races"]
        for m in names
        if r["methods"][m].get("no_prune")
    ]
    if quiet:
        nt = Table(title="races where a policy pruned nothing, and why")
        for col in ("race", "policy", "why"):
            nt.add_column(col)
        for race, m, why in quiet:
            nt.add_row(race, m, why)
        console.print(nt)
    if report.get("frontier"):
        ft = Table(title="gardener frontier (--sweep): the risk knob")
        for col in ("knob", "compute", "nregret", "top1"):
            ft.add_column(col, justify="right")
        for f in report["frontier"]:
            ft.add_row(
                f"{f['knob']:g}", f"{f['compute']:.3f}", f"{f['nregret']:.3f}", f"{f['top1']:.2f}"
            )
        console.print(ft)
    if json_out is not None:
        json_out.write_text(json.dumps(report, indent=2, default=str) + "\n")
        console.print(f"report written to {json_out}")


def register(app: typer.Typer) -> None:
    app.command("backtest")(backtest_cmd)
