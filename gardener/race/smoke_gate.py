"""Smoke before fire: a batch for an account needs a SMOKE_DONE race on the same trainer.

"The same trainer configuration" is what decides how a trainer runs and reports, and nothing
that only names or sizes the race:
- the backend kind (local processes or Railway);
- the trainer's source: on Railway the service template (image, or repository and branch, and
  the start command and the ingest path); locally the reference trainer of this gardener's
  version;
- the model architectures (``models.toml``), which map canon names to trainers.
The corpus, the step count, the tags and the seeds are not part of it: the smoke race runs 500
steps on its own corpus by design, and the corpus tripwire checks each trial's data anyway.

The configuration is stored with every smoke race (``races.config.trainer``) with its
fingerprint; ``--skip-smoke-gate --reason`` overrides the gate and the override is an audit row.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import asyncpg

from gardener import __version__
from gardener.configfiles import read_toml
from gardener.errors import SmokeGateClosed

OPEN_GATE = """
SELECT r.name, r.finished_at
FROM races r
JOIN gardener_decisions d ON d.race = r.name AND d.canon_name = r.name AND d.action = 'verdict'
WHERE r.account = $1 AND r.kind = 'smoke' AND r.status = 'done'
  AND r.config->>'trainer_fingerprint' = $2
  AND (d.numbers->>'smoke_done')::boolean
ORDER BY r.finished_at DESC NULLS LAST
LIMIT 1
"""

LAST_SMOKE = """
SELECT name, status, config->>'trainer_fingerprint' AS fingerprint
FROM races WHERE account = $1 AND kind = 'smoke' ORDER BY created_at DESC LIMIT 1
"""


def trainer_configuration(backend: str, railway_config: Path | None = None) -> dict[str, Any]:
    """The trainer configuration a smoke race proves (see the module docstring)."""
    models, _ = read_toml("models.toml")
    conf: dict[str, Any] = {
        "backend": backend,
        "models": hashlib.sha256(json.dumps(models, sort_keys=True).encode()).hexdigest()[:16],
    }
    if backend == "railway":
        from gardener.backends.railway.templates import load_templates, source_of

        tpl = load_templates(railway_config).default
        image, repo, branch = source_of(tpl)
        conf["trainer"] = {
            "image": image, "repo": repo, "branch": branch,
            "start_command": tpl.start_command, "ingest": tpl.ingest,
        }
    else:
        conf["trainer"] = {"module": "gardener.trainer", "version": __version__}
    return conf


def fingerprint(conf: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(conf, sort_keys=True).encode()).hexdigest()[:16]


async def check(conn: asyncpg.Connection, account: str, conf: dict[str, Any]) -> str:
    """The SMOKE_DONE race that opens the gate for ``account``; ``SmokeGateClosed`` naming what
    is missing otherwise."""
    fp = fingerprint(conf)
    race = await conn.fetchval(OPEN_GATE, account, fp)
    if race is not None:
        return str(race)
    last = await conn.fetchrow(LAST_SMOKE, account)
    trainer = conf["trainer"]
    what = f"{conf['backend']} backend, trainer {json.dumps(trainer, sort_keys=True)}"
    if last is None:
        why = f"{account} never ran a smoke race"
    elif last["fingerprint"] != fp:
        why = f"{account}'s last smoke race {last['name']} ran another trainer configuration"
    else:
        why = f"{account}'s last smoke race {last['name']} ended {last['status']}, not SMOKE_DONE"
    raise SmokeGateClosed(
        f"smoke before fire: {why} ({what}); run `tri smoke-race --account {account} "
        f"--backend {conf['backend']}` first, or pass --skip-smoke-gate --reason \"...\""
    )


async def record_skip(
    conn: asyncpg.Connection,
    race: str,
    account: str,
    by: str,
    reason: str,
    conf: dict[str, Any],
    admitted: list[str],
) -> None:
    """The audit row of a batch admitted past the smoke gate: who, why, what was admitted."""
    await conn.execute(
        """INSERT INTO gardener_decisions (race, rung, canon_name, action, numbers, reason,
                                           applied, applied_at, decided_by)
           VALUES ($1, -1, $1, 'skip-smoke-gate:' || to_char(clock_timestamp(),
                   'YYYYMMDD"T"HH24MISS.US'), $2, $3, true, now(), $4)""",
        race,
        {"account": account, "trainer": conf, "fingerprint": fingerprint(conf),
         "admitted": admitted},
        f"smoke gate skipped by {by} for {account}: {reason}",
        by,
    )
