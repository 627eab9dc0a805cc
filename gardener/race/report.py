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
    lines.append(f"## Decisions ({len(decisions)})")
    lines.append("")
    if decisions:
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
