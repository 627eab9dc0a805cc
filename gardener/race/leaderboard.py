"""The leaderboard: each trial's final and best BPB from the ledger, ranked, with a gate verdict.

The ranking and the verdict are the pure ``gardener.core.gates`` functions; this module only
reads the ledger (``race.sql``) and shapes rows for the CLI, the report and criterion 6.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import asyncpg

from gardener.core import gates
from gardener.errors import UserError
from gardener.ledger.queries import Queries

Q = Queries("race.sql")
GATES = gates.GATE_NAMES


@dataclass(frozen=True)
class BoardRow:
    rank: int
    canon_name: str
    seed: int
    variant: str
    final_bpb: float | None  # the value at the trial's last step
    final_step: int | None
    best_bpb: float | None
    samples: int
    desired_state: str
    observed_state: str
    horizon: int | None = None
    open_tripwires: int = 0
    counted: bool = True  # reached the horizon with no open tripwire

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


@dataclass(frozen=True)
class Leaderboard:
    gate: str
    race: str | None
    rows: tuple[BoardRow, ...]
    verdict: gates.Verdict

    def to_dict(self) -> dict[str, Any]:
        return {
            "gate": self.gate,
            "race": self.race,
            "passed": self.verdict.passed,
            "reasons": list(self.verdict.reasons),
            "rows": [r.to_dict() for r in self.rows],
        }


async def latest_race(
    conn: asyncpg.Connection, kind: str | None = None, account: str | None = None
) -> str | None:
    if account is not None and kind is None:
        name = await conn.fetchval(Q.latest_race_of, account)
    else:
        name = await conn.fetchval(Q.latest_race, kind)
    return str(name) if name is not None else None


async def rank(
    conn: asyncpg.Connection, gate: str, race: str | None = None, account: str | None = None
) -> Leaderboard:
    """The ranked trials of ``race`` (every race when None; ``account``'s only when given)
    and the gate's verdict.

    A trial counts toward a gate only if it reached its horizon and has no open tripwire.
    Gate-0 expects every trial of the race to count, with a distinct final BPB; gate-2 and
    gate-final are the quorum gates of ``gardener.core.gates``."""
    name = gates.gate_name(gate)
    if name is None:
        raise UserError(f"unknown gate {gate!r} (known: {', '.join(GATES)}, any case)")
    gate = name
    known = race is None or await conn.fetchval("SELECT 1 FROM races WHERE name = $1", race)
    if not known:
        raise UserError(f"unknown race {race!r}")
    records = await conn.fetch(Q.leaderboard, race, account)
    by_name = {r["canon_name"]: r for r in records}
    rows = [
        gates.Row(r["canon_name"], int(r["seed"]), r["variant"],
                  None if r["final_bpb"] is None else float(r["final_bpb"]),
                  step=r["final_step"], horizon=r["horizon"],
                  open_tripwires=int(r["open_tripwires"]))
        for r in records
    ]
    if gate == "gate-0":
        verdict = gates.gate0(rows, expected=len(rows))
    elif gate == "gate-2":
        verdict = gates.gate2(rows)
    else:
        verdict = gates.gate_final(rows)
    board: list[BoardRow] = []
    for i, row in enumerate(verdict.ranked, start=1):
        rec = by_name[row.canon_name]
        board.append(
            BoardRow(
                rank=i,
                canon_name=row.canon_name,
                seed=row.seed,
                variant=row.variant,
                final_bpb=row.bpb,
                final_step=rec["final_step"],
                best_bpb=None if rec["best_bpb"] is None else float(rec["best_bpb"]),
                samples=int(rec["samples"]),
                desired_state=rec["desired_state"],
                observed_state=rec["observed_state"],
                horizon=row.horizon,
                open_tripwires=row.open_tripwires,
                counted=gates.why_not_counted(row) is None,
            )
        )
    return Leaderboard(gate, race, tuple(board), verdict)


def _bpb(x: float | None) -> str:
    return "—" if x is None else f"{x:.4f}"


def markdown(board: Leaderboard) -> str:
    """The board as a Markdown table, with the verdict underneath."""
    lines = [
        "| # | canon name | final BPB | at step | best BPB | samples | state | counts |",
        "|---:|---|---:|---:|---:|---:|---|---|",
    ]
    for r in board.rows:
        counts = "yes" if r.counted else (
            f"no: {r.open_tripwires} open tripwire(s)" if r.open_tripwires
            else f"no: short of {r.horizon}")
        lines.append(
            f"| {r.rank} | `{r.canon_name}` | {_bpb(r.final_bpb)} | {r.final_step or '—'} | "
            f"{_bpb(r.best_bpb)} | {r.samples} | {r.desired_state}/{r.observed_state} | "
            f"{counts} |"
        )
    word = "PASSES" if board.verdict.passed else "does not pass"
    lines.append("")
    lines.append(f"**{board.gate} {word}**: " + "; ".join(board.verdict.reasons))
    return "\n".join(lines)
