"""The race report: Markdown with the criteria, the leaderboard, the decisions and the plots.

Everything comes from the ledger, so ``gardener report --race NAME`` rebuilds the report of
any race later: the criteria of a smoke race are the ones its verdict decision recorded
(criterion 14 is re-checked from the ledger), unless the caller passes fresh ones.
Images go to ``img/`` beside the report, named ``smoke_*.png`` for a smoke race.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import asyncpg
import numpy as np

from gardener.core.config import DEFAULT_RUNGS
from gardener.errors import UserError
from gardener.ledger.queries import Queries
from gardener.race import criteria as crit
from gardener.race import leaderboard

if TYPE_CHECKING:
    from gardener.race import plots

Q = Queries("race.sql")


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def image_prefix(race: str, kind: str) -> str:
    return "smoke" if kind == "smoke" else re.sub(r"[^A-Za-z0-9_.-]+", "_", race)


async def load_curves(conn: asyncpg.Connection, race: str) -> dict[str, plots.Curve]:
    from gardener.race import plots

    acc: dict[str, tuple[list[int], list[float]]] = {}
    for r in await conn.fetch(Q.race_samples, race):
        s, v = acc.setdefault(r["canon_name"], ([], []))
        s.append(int(r["step"]))
        v.append(float(r["bpb"]))
    return {n: plots.Curve(np.asarray(s, dtype=np.int64), np.asarray(v, dtype=np.float64))
            for n, (s, v) in acc.items()}


def _marks(decisions: Sequence[asyncpg.Record], rungs: Sequence[int],
           curves: dict[str, plots.Curve]) -> list[plots.Mark]:
    from gardener.race import plots

    out = []
    for d in decisions:
        if d["action"] not in plots.MARKERS:
            continue
        nums = d["numbers"] or {}
        step = nums.get("step") or nums.get("last_step")
        if step is None and 0 <= d["rung"] < len(rungs):
            step = rungs[d["rung"]]
        if step is None:
            c = curves.get(d["canon_name"])
            step = int(c.steps[-1]) if c is not None and len(c.steps) else None
        if step is not None:
            out.append(plots.Mark(d["canon_name"], d["action"], int(step)))
    return out


async def write_report(
    conn: asyncpg.Connection,
    race: str,
    out: Path,
    *,
    criteria: Sequence[crit.Criterion] | None = None,
    timings: dict[str, float] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``out`` (and its images) for ``race``; returns the path written."""
    from gardener.race import plots  # matplotlib and scipy: only when a report is written

    row = await conn.fetchrow("SELECT * FROM races WHERE name = $1", race)
    if row is None:
        raise UserError(f"unknown race {race!r}")
    config = dict(row["config"] or {})
    horizon = int(row["horizon"] or config.get("max_steps") or DEFAULT_RUNGS[-1])
    rungs = [int(r) for r in config.get("rungs", [r for r in DEFAULT_RUNGS if r <= horizon])]
    decisions = await conn.fetch(Q.race_decisions, race)
    curves = await load_curves(conn, race)
    if criteria is None and row["kind"] == "smoke":
        verdict = await conn.fetchrow(Q.race_verdict, race)
        if verdict is not None:
            criteria = [crit.Criterion.from_dict(c) for c in verdict["numbers"].get("criteria", [])]
            timings = timings or verdict["numbers"].get("timings") or None
            ctx = crit.RaceContext(race, row["account"], (), horizon, 10, "", None)
            criteria = [*criteria, await crit.smoke_done(conn, ctx)]
    board = await leaderboard.rank(conn, "gate-0", race=race)
    img_dir = out.parent / "img"
    prefix = image_prefix(race, row["kind"])
    marks = _marks(decisions, rungs, curves)
    images: list[tuple[str, Path]] = []
    predictions: dict[str, dict[int, Any]] = {}
    if curves:
        images.append(("Every curve", plots.plot_curves(
            curves, marks, img_dir / f"{prefix}_curves.png", title=f"{race}: every curve")))
        p, predictions = plots.plot_fits(curves, rungs, horizon, marks,
                                         img_dir / f"{prefix}_fits.png",
                                         title=f"{race}: power-law fit at each rung")
        images.append(("Power-law fit at each rung", p))

    lines: list[str] = []
    lines.append(f"# {'Gate-0 smoke race' if row['kind'] == 'smoke' else 'Race'} report: `{race}`")
    lines.append("")
    lines.append("Generated from the ledger of a real run by `gardener smoke-race` or "
                 "`gardener report` (nothing in this file is typed by hand).")
    lines.append("")
    lines.append(f"- account: `{row['account']}`, kind `{row['kind']}`, status **{row['status']}**")
    lines.append(f"- started {row['created_at']:%Y-%m-%d %H:%M:%S} UTC"
                 + (f", finished {row['finished_at']:%Y-%m-%d %H:%M:%S} UTC"
                    if row["finished_at"] else ""))
    lines.append(f"- {len(board.rows)} trials, horizon {horizon} steps, rungs {rungs}, "
                 f"backend `{config.get('backend', '?')}`, corpus `{config.get('corpus', '?')}`"
                 + (f" (sha256 `{str(config['corpus_sha256'])[:16]}…`)"
                    if config.get("corpus_sha256") else ""))
    if timings:
        lines.append("- timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
    for k, v in (extra or {}).items():
        lines.append(f"- {k}: {v}")
    lines.append("")
    if criteria:
        green = sum(c.green for c in criteria)
        done = all(c.green for c in criteria)
        lines.append(f"## Acceptance criteria: {green}/{len(criteria)} GREEN"
                     + (f" — **{crit.SMOKE_DONE}**" if done else " — **not done**"))
        lines.append("")
        lines.append("| # | criterion | status | evidence |")
        lines.append("|---:|---|---|---|")
        for c in criteria:
            badge = "🟢 GREEN" if c.green else "🔴 RED"
            lines.append(f"| {c.number} | {_cell(c.title)} | {badge} | {_cell(c.evidence)} |")
        lines.append("")
    lines.append("## Leaderboard (gate-0)")
    lines.append("")
    lines.append(leaderboard.markdown(board))
    lines.append("")
    if predictions:
        lines.append(f"### Power-law prediction of the BPB at step {horizon}, per rung")
        lines.append("")
        lines.append("| canon name | " + " | ".join(f"fit at {r}: mean [95% PI]" for r in rungs)
                     + " | observed |")
        lines.append("|---|" + "---:|" * (len(rungs) + 1))
        finals = {r.canon_name: r.final_bpb for r in board.rows}
        for name in sorted(predictions):
            cells = []
            for r in rungs:
                pr = predictions[name].get(r)
                if pr is None or not math.isfinite(pr.mean):
                    cells.append("—")
                else:
                    cells.append(f"{pr.mean:.4f} [{pr.pi.low:.3f}, {pr.pi.high:.3f}]")
            fb = finals.get(name)
            observed = "—" if fb is None else f"{fb:.4f}"
            lines.append(f"| `{name}` | " + " | ".join(cells) + f" | {observed} |")
        lines.append("")
    for caption, path in images:
        rel = path.relative_to(out.parent).as_posix()
        lines.append(f"### {caption}")
        lines.append("")
        lines.append(f"![{caption}]({rel})")
        lines.append("")
    lines.extend(decisions_by_rung(decisions, rungs, config, row["kind"]))
    lines.append(f"## Decisions ({len(decisions)})")
    lines.append("")
    if decisions:
        lines.append("Every decision in the order it was taken, with its full reason.")
        lines.append("")
        lines.append("| time (UTC) | rung | trial | action | state | applied | reason |")
        lines.append("|---|---:|---|---|---|---|---|")
        for d in decisions:
            lines.append(
                f"| {d['decided_at']:%H:%M:%S} | {d['rung']} | `{d['canon_name']}` | "
                f"{d['action']} | {d['seed_state'] or ''} | {'yes' if d['applied'] else 'no'} | "
                f"{_cell(d['reason'])} |"
            )
    else:
        lines.append("No decisions were recorded for this race.")
    lines.append("")
    text = "\n".join(lines)
    await anyio.to_thread.run_sync(_write, out, text)
    return out


def _write(out: Path, text: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")


def _fmt(value: Any, digits: int = 4) -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return "—"
    return f"{v:.{digits}f}" if math.isfinite(v) else "—"


def _interval(pair: Any, digits: int = 3) -> str:
    if not isinstance(pair, list | tuple) or len(pair) != 2:
        return ""
    return f" [{_fmt(pair[0], digits)}, {_fmt(pair[1], digits)}]"


def _switches(decision_config: dict[str, Any]) -> list[str]:
    """What a race's ``[decision]`` table turned off, in words."""
    out = []
    slope = decision_config.get("diverging_slope")
    if isinstance(slope, int | float) and slope >= 1e6:
        out.append(f"`diverging_slope = {slope:g}`: no trial is killed as DIVERGING")
    if decision_config.get("mirror_count") == 0:
        out.append("`mirror_count = 0`: no leader is mirrored with new seeds")
    others = {k: v for k, v in decision_config.items()
              if k not in ("diverging_slope", "mirror_count")}
    if others:
        out.append("also " + ", ".join(f"`{k} = {v}`" for k, v in sorted(others.items())))
    return out


def decisions_by_rung(
    decisions: Sequence[asyncpg.Record], rungs: Sequence[int], config: dict[str, Any],
    kind: str = "hunt",
) -> list[str]:
    """Markdown: per rung, what was decided for each trial and the numbers it rested on
    (seed state, the score and rank in its cohort, the power-law fit and its prediction)."""
    lines = ["## What the gardener decided, rung by rung", ""]
    switches = _switches(dict(config.get("decision") or {}))
    if switches:
        lines.append("This race's `[decision]` table changes the defaults: "
                     + "; ".join(switches) + ". Seed states, fits, ranks, tripwires and the "
                     "verdict are computed as in any race.")
        lines.append("")
    lines.append("A trial is decided on when it reaches a rung; its cohort is every trial that "
                 "had reached that rung while live, so early arrivals rank among fewer trials. "
                 "The score is the mean of the recent samples; the fit is the power law "
                 "`BPB(t) = bpb_inf + a * t^(-p)` on the samples so far, with the 95% interval "
                 "of bpb_inf and the 95% prediction interval of the BPB at the horizon.")
    if kind == "smoke":
        lines.append("")
        lines.append("The verdict at the last rung judges each trial by the race gate (gate-2: "
                     "BPB < 1.85 on seeds 43, 44, 45), which no smoke trial can reach; the "
                     "smoke race itself is judged by gate-0 and the criteria above.")
    lines.append("")
    per_rung: dict[int, list[asyncpg.Record]] = {}
    for d in decisions:
        if d["rung"] >= 0:
            per_rung.setdefault(int(d["rung"]), []).append(d)
    if not per_rung:
        lines.extend(["No trial reached a rung.", ""])
    skipped = [f"{i} (step {r})" for i, r in enumerate(rungs) if i not in per_rung
               and per_rung and i < max(per_rung)]
    if skipped:
        lines.extend([f"No decision was recorded at rung {', '.join(skipped)}: the trials were "
                      "past it when the loop first looked at them, and a trial is decided on "
                      "at the highest rung it has reached.", ""])
    for rung in sorted(per_rung):
        rows = per_rung[rung]
        step = rungs[rung] if rung < len(rungs) else None
        rules = sorted({str((d["numbers"] or {}).get("rule") or "") for d in rows} - {""})
        lines.append(f"### Rung {rung}" + (f" — step {step}" if step is not None else "")
                     + (f" ({', '.join(rules)})" if rules else ""))
        lines.append("")
        actions: dict[str, int] = {}
        states: dict[str, int] = {}
        for d in rows:
            key = d["action"] if d["applied"] else f"{d['action']} (held)"
            actions[key] = actions.get(key, 0) + 1
            if d["seed_state"]:
                states[d["seed_state"]] = states.get(d["seed_state"], 0) + 1
        lines.append(f"- {len(rows)} decisions: "
                     + ", ".join(f"{n} {a}" for a, n in sorted(actions.items())))
        if states:
            lines.append("- seed states: "
                         + ", ".join(f"{s} {n}" for s, n in sorted(states.items())))
        leaders = {(d["numbers"] or {}).get("leader") for d in rows} - {None}
        if len(leaders) == 1:
            lines.append(f"- leader: `{leaders.pop()}`")
        lines.append("")
        lines.append("| trial | action | state | score | rank | bpb_inf [95% CI] | "
                     "predicted at horizon [95% PI] | p | final BPB | why |")
        lines.append("|---|---|---|---:|---:|---:|---:|---:|---:|---|")

        def order(d: asyncpg.Record) -> tuple[float, str]:
            score = (d["numbers"] or {}).get("score")
            return (float(score) if isinstance(score, int | float) else math.inf, d["canon_name"])

        for d in sorted(rows, key=order):
            n = d["numbers"] or {}
            raw_fit = n.get("fit")
            fit: dict[str, Any] = raw_fit if isinstance(raw_fit, dict) else {}
            action = d["action"] if d["applied"] else f"{d['action']} (held: {d['held_reason']})"
            rank = f"{n['rank']}/{n['cohort']}" if "rank" in n and "cohort" in n else "—"
            fit_ok = bool(fit.get("ok"))
            no_fit = f"no fit: {fit['reason']}" if fit.get("reason") else "no fit"
            bpb_inf = (_fmt(fit.get("bpb_inf")) + _interval(fit.get("bpb_inf_ci"))
                       if fit_ok else no_fit)
            predicted = (_fmt(fit.get("predicted")) + _interval(fit.get("pi"))) if fit_ok else "—"
            reason = str(d["reason"])
            why = reason.split(": ", 1)[1] if reason.startswith(f"{d['action']}: ") else reason
            lines.append(
                f"| `{d['canon_name']}` | {_cell(action)} | {d['seed_state'] or ''} | "
                f"{_fmt(n.get('score'))} | {rank} | {_cell(bpb_inf)} | {predicted} | "
                f"{_fmt(fit.get('p'), 2) if fit_ok else '—'} | {_fmt(n.get('final_bpb'))} | "
                f"{_cell(why)} |")
        lines.append("")
    race_level = [d for d in decisions if d["rung"] < 0]
    if race_level:
        lines.append("### The race")
        lines.append("")
        for d in race_level:
            lines.append(f"- {d['decided_at']:%H:%M:%S} **{d['action']}** "
                         f"({d['decided_by'] or 'gardener'}): {_cell(d['reason'])}")
        lines.append("")
    return lines
