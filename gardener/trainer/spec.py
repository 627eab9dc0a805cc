"""From a canon name to the trainer's environment: the contract between backends and trainer.

Pure and cheap to import (no numpy): the backends call ``trainer_variables`` to build the
environment of a Railway service or a local subprocess, and the trainer reads the same
``TRAIN_*`` names back. ``configs/models.toml`` maps each race model name to a small stand-in
architecture with its default hidden size, learning rate and context.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gardener.configfiles import read_toml
from gardener.core.canon import CanonName
from gardener.errors import ConfigError

ARCHITECTURES: tuple[str, ...] = ("mlp", "resmlp", "hybrid")
SCHEDULES: tuple[str, ...] = ("wsd", "cosine", "constant")
DEFAULT_EVAL_EVERY = 10

# Every variable the trainer reads; the backends pass exactly these.
VARIABLES: tuple[str, ...] = (
    "TRAIN_CANON_NAME",
    "TRAIN_MODEL",
    "TRAIN_FORMAT",
    "TRAIN_SEED",
    "TRAIN_STEPS",
    "TRAIN_HIDDEN",
    "TRAIN_LR",
    "TRAIN_SCHEDULE",
    "TRAIN_BATCH",
    "TRAIN_EMA",
    "TRAIN_GRAD_CLIP",
    "TRAIN_CORPUS",
    "TRAIN_EVAL_EVERY",
    "TRAIN_EXP_ID",
)

_BS_RE = re.compile(r"^BS(\d+)$")
_EMA_RE = re.compile(r"^EMA(\d+)$")
_TAG_KEYS = frozenset({"schedule", "batch", "ema", "grad_clip", "lr", "hidden"})


@dataclass(frozen=True)
class ModelSpec:
    """One race model name and the stand-in architecture that plays it."""

    name: str
    arch: str
    hidden: int
    lr: float
    context: int
    embed: int
    blocks: int = 1


@dataclass(frozen=True)
class ModelsConfig:
    """The parsed ``models.toml``: models, run defaults, and what each named tag sets."""

    models: Mapping[str, ModelSpec]
    schedule: str = "cosine"
    batch: int = 32
    ema: float = 0.0
    grad_clip: float = 0.0
    eval_every: int = DEFAULT_EVAL_EVERY
    tags: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    source: str = ""

    def model(self, name: str) -> ModelSpec:
        try:
            return self.models[name]
        except KeyError:
            known = ", ".join(self.models)
            raise ConfigError(f"model {name!r} not in {self.source or 'models config'} "
                              f"(known: {known})") from None


def load_models_config(path: str | Path | None = None) -> ModelsConfig:
    """Read and validate ``models.toml`` (an explicit path, else the shipped one)."""
    raw, source = read_toml("models.toml", path)
    return parse_models_config(raw, source=source)


def parse_models_config(raw: Mapping[str, Any], source: str = "") -> ModelsConfig:
    """Validate the TOML tables; every error names the file and the bad entry."""
    where = source or "models config"
    models: dict[str, ModelSpec] = {}
    for name, entry in dict(raw.get("models", {})).items():
        try:
            spec = ModelSpec(
                name=name,
                arch=str(entry["arch"]),
                hidden=int(entry["hidden"]),
                lr=float(entry["lr"]),
                context=int(entry["context"]),
                embed=int(entry.get("embed", 16)),
                blocks=int(entry.get("blocks", 1)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: model {name!r}: bad or missing {exc}") from None
        if spec.arch not in ARCHITECTURES:
            raise ConfigError(f"{where}: model {name!r}: arch {spec.arch!r} not in {ARCHITECTURES}")
        if min(spec.hidden, spec.context, spec.embed, spec.blocks) < 1 or spec.lr <= 0:
            raise ConfigError(f"{where}: model {name!r}: sizes and lr must be positive")
        models[name] = spec
    if not models:
        raise ConfigError(f"{where}: no [models.*] tables")
    d = dict(raw.get("defaults", {}))
    tags = {str(k): dict(v) for k, v in dict(raw.get("tags", {})).items()}
    for tag, sets in tags.items():
        unknown = set(sets) - _TAG_KEYS
        if unknown:
            raise ConfigError(f"{where}: tag {tag!r} sets unknown keys {sorted(unknown)}")
        if "schedule" in sets and sets["schedule"] not in SCHEDULES:
            raise ConfigError(f"{where}: tag {tag!r}: schedule must be one of {SCHEDULES}")
    cfg = ModelsConfig(
        models=models,
        schedule=str(d.get("schedule", "cosine")),
        batch=int(d.get("batch", 32)),
        ema=float(d.get("ema", 0.0)),
        grad_clip=float(d.get("grad_clip", 0.0)),
        eval_every=int(d.get("eval_every", DEFAULT_EVAL_EVERY)),
        tags=tags,
        source=where,
    )
    if cfg.schedule not in SCHEDULES:
        raise ConfigError(f"{where}: defaults.schedule must be one of {SCHEDULES}")
    return cfg


def hidden_size_for(canon: CanonName, models: ModelsConfig) -> int:
    """The hidden size a run will use: its ``h<N>`` tag, else the model's default (for L-R9)."""
    tagged = canon.hidden_size
    if tagged is not None:
        return tagged
    for tag in canon.tags:
        if "hidden" in models.tags.get(tag, {}):
            return int(models.tags[tag]["hidden"])
    return models.model(canon.model).hidden


def _fmt_float(x: float) -> str:
    return repr(float(x))


def trainer_variables(
    canon: CanonName,
    *,
    steps: int,
    corpus: str | None,
    models: ModelsConfig,
    hidden_size: int | None = None,
) -> dict[str, str]:
    """The ``TRAIN_*`` environment for one trial.

    Tags: ``WSD`` (and the other named tags of models.toml) set what the table says,
    ``BS<N>`` the batch size, ``EMA<N>`` an EMA of the weights with decay ``1 - 1/N``,
    ``GRADFIX`` gradient clipping, ``h<N>`` the hidden size; SMOKE and CHAMP only label.
    ``hidden_size`` overrides everything else. L-R9 is not checked here: callers use
    ``check_gf16_hidden(canon, hidden_size_for(canon, models))``.
    """
    if steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}")
    spec = models.model(canon.model)
    schedule, batch, ema = models.schedule, models.batch, models.ema
    grad_clip, lr = models.grad_clip, spec.lr
    for tag in canon.tags:
        sets = models.tags.get(tag)
        if sets is not None:
            schedule = str(sets.get("schedule", schedule))
            batch = int(sets.get("batch", batch))
            ema = float(sets.get("ema", ema))
            grad_clip = float(sets.get("grad_clip", grad_clip))
            lr = float(sets.get("lr", lr))
            continue
        if m := _BS_RE.match(tag):
            batch = int(m.group(1))
        elif m := _EMA_RE.match(tag):
            n = int(m.group(1))
            ema = 1.0 - 1.0 / n if n > 1 else 0.0
    hidden = hidden_size if hidden_size is not None else hidden_size_for(canon, models)
    if batch < 1 or hidden < 1:
        raise ConfigError(f"{canon}: batch and hidden size must be positive")
    return {
        "TRAIN_CANON_NAME": str(canon),
        "TRAIN_MODEL": canon.model,
        "TRAIN_FORMAT": canon.format,
        "TRAIN_SEED": str(canon.seed),
        "TRAIN_STEPS": str(steps),
        "TRAIN_HIDDEN": str(hidden),
        "TRAIN_LR": _fmt_float(lr),
        "TRAIN_SCHEDULE": schedule,
        "TRAIN_BATCH": str(batch),
        "TRAIN_EMA": _fmt_float(ema),
        "TRAIN_GRAD_CLIP": _fmt_float(grad_clip),
        "TRAIN_CORPUS": corpus if corpus else "stdlib",
        "TRAIN_EVAL_EVERY": str(models.eval_every),
        "TRAIN_EXP_ID": f"{canon.exp_id:04d}" if canon.exp_id is not None else "",
    }
