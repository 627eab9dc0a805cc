"""The smoke race's configuration: ``configs/gate0-smoke.toml`` and the command's flags.

The tags name a canon base and a seed block each; ``[race]`` the account, backend, steps,
wallclock, teardown and report; ``[decision]`` and ``[criteria]`` the decision config and the
criteria's thresholds. Every key is checked: an unknown one is an error naming it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from gardener.configfiles import config_candidates as shipped
from gardener.configfiles import read_toml
from gardener.core import canon as canon_mod
from gardener.errors import ConfigError, UserError
from gardener.race import criteria as crit

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*$")

def parse_duration(text: str | float | int) -> float:
    """Seconds from ``90``, ``90s``, ``30m`` or ``1.5h``."""
    if isinstance(text, int | float):
        return float(text)
    m = _DURATION.match(text)
    if not m:
        raise ConfigError(f"bad duration {text!r}: use e.g. 90s, 30m or 1h")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


@dataclass(frozen=True)
class TagSpec:
    """A tag of the smoke command and what it names: canon base and seed block."""

    spec: str
    canon: str
    seed_base: int


@dataclass(frozen=True)
class SmokeConfig:
    """``configs/gate0-smoke.toml`` after the command's flags were applied."""

    tags: tuple[str, ...]
    tag_specs: Mapping[str, TagSpec]
    name_prefix: str = "gate0-smoke"
    account: str = "acc1"
    backend: str = "local"
    seeds_per_tag: int = 3
    max_steps: int = 500
    wallclock_s: float = 1800.0
    auto_teardown: bool = True
    report: str | None = "docs/SMOKE_GATE_0_REPORT.md"
    corpus: str = "stdlib"
    rungs: tuple[int, ...] = (100, 500)
    decision: Mapping[str, Any] = field(default_factory=dict)
    criteria: crit.CriteriaConfig = field(default_factory=crit.CriteriaConfig)
    source: str = ""

    def with_overrides(self, **changes: Any) -> SmokeConfig:
        """The config with the non-None flags applied; rungs follow a changed ``max_steps``."""
        given = {k: v for k, v in changes.items() if v is not None}
        if "wallclock" in given:
            given["wallclock_s"] = parse_duration(given.pop("wallclock"))
        if "tags" in given and isinstance(given["tags"], str):
            given["tags"] = tuple(t.strip() for t in given["tags"].split(",") if t.strip())
        if "criteria" in given and isinstance(given["criteria"], Mapping):
            given["criteria"] = replace(self.criteria, **given["criteria"])
        out = replace(self, **given)
        if "max_steps" in given and "rungs" not in given:
            first = self.rungs[0] if self.rungs[0] < out.max_steps else out.max_steps // 2
            out = replace(out, rungs=(first, out.max_steps))
        out.validate()
        return out

    def validate(self) -> None:
        unknown = [t for t in self.tags if t not in self.tag_specs]
        if unknown:
            known = ", ".join(self.tag_specs)
            raise ConfigError(f"unknown smoke tag(s) {unknown} (known: {known})")
        if not self.tags:
            raise ConfigError("no smoke tags")
        if not 1 <= self.seeds_per_tag <= self.criteria.seed_block:
            raise ConfigError(
                f"--seeds-per-tag must be 1..{self.criteria.seed_block}, got {self.seeds_per_tag}"
            )
        if self.max_steps < 20:
            raise ConfigError(f"--max-steps must be at least 20, got {self.max_steps}")
        if self.backend not in ("local", "railway"):
            raise ConfigError(f"unknown backend {self.backend!r} (local or railway)")


def config_candidates() -> list[Path]:
    """Where gate0-smoke.toml is looked for: the installed wheel's copy, then the repository."""
    return shipped("gate0-smoke.toml")


def load_config(path: str | Path | None = None) -> SmokeConfig:
    """Read and validate the smoke config (an explicit path, else the shipped one)."""
    raw, source = read_toml("gate0-smoke.toml", path)
    return parse_config(raw, source=source)


def parse_config(raw: Mapping[str, Any], source: str = "") -> SmokeConfig:
    where = source or "smoke config"
    race = dict(raw.get("race", {}))
    specs: dict[str, TagSpec] = {}
    for spec, entry in dict(raw.get("tags", {})).items():
        try:
            specs[spec] = TagSpec(spec, str(entry["canon"]), int(entry["seed_base"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: tag {spec!r}: bad or missing {exc}") from None
        try:
            canon_mod.parse(f"{specs[spec].canon}-seed{specs[spec].seed_base}")
        except UserError as exc:
            raise ConfigError(f"{where}: tag {spec!r}: {exc}") from None
    from gardener.core.config import DecisionConfig

    bad_decision = set(dict(raw.get("decision", {}))) - set(DecisionConfig.__dataclass_fields__)
    if bad_decision:
        raise ConfigError(f"{where}: unknown [decision] keys {sorted(bad_decision)}")
    known = {f.name for f in crit.CriteriaConfig.__dataclass_fields__.values()}
    c_raw = dict(raw.get("criteria", {}))
    bad = set(c_raw) - known
    if bad:
        raise ConfigError(f"{where}: unknown [criteria] keys {sorted(bad)}")
    try:
        cfg = SmokeConfig(
            tags=tuple(race.get("tags", list(specs))),
            tag_specs=specs,
            name_prefix=str(race.get("name_prefix", "gate0-smoke")),
            account=str(race.get("account", "acc1")),
            backend=str(race.get("backend", "local")),
            seeds_per_tag=int(race.get("seeds_per_tag", 3)),
            max_steps=int(race.get("max_steps", 500)),
            wallclock_s=parse_duration(race.get("wallclock", "30m")),
            auto_teardown=bool(race.get("auto_teardown", True)),
            report=race.get("report"),
            corpus=str(race.get("corpus", "stdlib")),
            rungs=tuple(int(r) for r in race.get("rungs", (100, 500))),
            decision=dict(raw.get("decision", {})),
            criteria=crit.CriteriaConfig(**c_raw),
            source=where,
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None
    cfg.validate()
    return cfg
