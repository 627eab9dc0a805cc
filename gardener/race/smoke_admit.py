"""Planning and admitting a smoke race: fresh seeds per tag (NEVER REUSE), one transaction.

Each tag owns seeds base..base+9; a run takes the first ones no run used before. Planning and
admission run in one transaction under an advisory lock, so two runs at once never pick the
same seeds, and the race records the trainer configuration it proves (``smoke_gate``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import asyncpg

from gardener.core import canon as canon_mod
from gardener.errors import UserError
from gardener.ledger import trials
from gardener.ledger.queries import Queries
from gardener.race import smoke_gate
from gardener.race.smoke_config import SmokeConfig
from gardener.trainer import spec as trainer_spec

Q = Queries("race.sql")


class SeedsExhausted(UserError):
    """A tag's seed block has fewer unused seeds than the run needs (NEVER REUSE)."""


@dataclass(frozen=True)
class PlannedTrial:
    tag: str
    canon: canon_mod.CanonName
    hidden_size: int
    variables: dict[str, str]

    @property
    def name(self) -> str:
        return str(self.canon)


async def plan(conn: asyncpg.Connection, cfg: SmokeConfig) -> list[PlannedTrial]:
    """The run's trials: per tag, the first ``seeds_per_tag`` seeds of its block not used yet."""
    models = trainer_spec.load_models_config()
    block = cfg.criteria.seed_block
    out: list[PlannedTrial] = []
    for tag in cfg.tags:
        ts = cfg.tag_specs[tag]
        base = canon_mod.parse(f"{ts.canon}-seed{ts.seed_base}")
        used = {int(r["seed"]) for r in await conn.fetch(
            Q.used_seeds_in_block, base.variant, ts.seed_base, ts.seed_base + block - 1)}
        free = [s for s in range(ts.seed_base, ts.seed_base + block) if s not in used]
        if len(free) < cfg.seeds_per_tag:
            hint = (f"--seeds-per-tag {len(free)} takes what is left" if free else
                    "a new ledger (another GARDENER_DATA_DIR or DATABASE_URL) starts every "
                    "block afresh")
            raise SeedsExhausted(
                f"tag {tag}: seed block {ts.seed_base}..{ts.seed_base + block - 1} of "
                f"{base.variant} has {len(free)} unused seed(s), the run needs "
                f"{cfg.seeds_per_tag} (NEVER REUSE; used: {sorted(used)}); seeds are never "
                f"reused in one ledger: {hint}"
            )
        for seed in free[: cfg.seeds_per_tag]:
            c = base.with_seed(seed)
            hidden = trainer_spec.hidden_size_for(c, models)
            variables = trainer_spec.trainer_variables(
                c, steps=cfg.max_steps, corpus=cfg.corpus, models=models)
            out.append(PlannedTrial(tag, c, hidden, variables))
    return out


def race_name(prefix: str, now: datetime) -> str:
    return f"{prefix}-{now.astimezone(UTC):%Y%m%dT%H%M%SZ}"


async def admit_race(
    conn: asyncpg.Connection,
    cfg: SmokeConfig,
    name: str,
    *,
    corpus_sha256: str | None,
    railway_config: Path | None = None,
) -> list[PlannedTrial]:
    """Plan and admit in one transaction, serialised with other smoke runs by an advisory lock,
    so two runs at once can never pick the same seeds. The race records the trainer
    configuration it proves (``smoke_gate``)."""
    trainer = smoke_gate.trainer_configuration(cfg.backend, railway_config)
    async with conn.transaction():
        await conn.execute(Q.advisory_lock_smoke)
        if await conn.fetchval("SELECT 1 FROM races WHERE name = $1", name):
            raise UserError(f"race {name!r} already exists")
        planned = await plan(conn, cfg)
        config = {
            "smoke": True,
            "tags": list(cfg.tags),
            "seeds_per_tag": cfg.seeds_per_tag,
            "max_steps": cfg.max_steps,
            "rungs": list(cfg.rungs),
            "decision": dict(cfg.decision),
            "corpus": cfg.corpus,
            "corpus_sha256": corpus_sha256,
            "backend": cfg.backend,
            "source": cfg.source,
            "trainer": trainer,
            "trainer_fingerprint": smoke_gate.fingerprint(trainer),
        }
        await trials.ensure_race(conn, name, cfg.account, kind="smoke", horizon=cfg.max_steps,
                                 config=config)
        await trials.admit(
            conn, name, cfg.account,
            [trials.Admission(p.canon, hidden_size=p.hidden_size, steps=cfg.max_steps,
                              spawn_reason="smoke", seed_strategy="smoke-block",
                              variables=p.variables) for p in planned],
            backend=cfg.backend,
        )
    return planned
