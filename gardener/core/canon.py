"""Canon names: ``IGLA-<MODEL>-<FORMAT>-<TAG>[-<TAG>...]-E<EXP_ID:04>-seed<SEED>``.

MODEL may itself contain a hyphen (JEPA-T), so the FORMAT token is the anchor the name is
split on. Smoke and champion names carry no EXP_ID; their last tag is SMOKE or CHAMP.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from gardener.errors import GF16HiddenTooSmall, InvalidCanonName

PREFIX = "IGLA"
DEFAULT_MODELS: tuple[str, ...] = ("HYBRID", "TRAIN_V2", "JEPA-T", "NCA", "PHI")
FORMATS: tuple[str, ...] = ("FP32", "GF16", "BF16", "DLFLOAT", "FP8E4M3", "FP8E5M2")
NO_EXP_ID_TAGS: frozenset[str] = frozenset({"SMOKE", "CHAMP"})
GF16_MIN_HIDDEN = 256  # L-R9
MAX_SEED = 2**32
MAX_EXP_ID = 2**31 - 1  # the ledger's integer column; E<EXP_ID:04> is a minimum width

_TAG_RE = re.compile(r"^[A-Za-z0-9_]+$")
_EXP_RE = re.compile(r"^E(\d{4,})$")
_SEED_RE = re.compile(r"^(.*)-seed(\d+)$")
_HIDDEN_RE = re.compile(r"^h(\d+)$")


@dataclass(frozen=True, order=True)
class CanonName:
    """A parsed canon name; ``str()`` gives the name back exactly."""

    model: str
    format: str
    tags: tuple[str, ...]
    seed: int
    exp_id: int | None = None
    models: tuple[str, ...] = field(default=DEFAULT_MODELS, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.model not in self.models:
            raise InvalidCanonName(
                f"unknown model {self.model!r} (known: {', '.join(self.models)})"
            )
        if self.format not in FORMATS:
            raise InvalidCanonName(f"unknown format {self.format!r} (known: {', '.join(FORMATS)})")
        if not self.tags:
            raise InvalidCanonName("a canon name needs at least one tag")
        for tag in self.tags:
            if not _TAG_RE.match(tag):
                raise InvalidCanonName(f"bad tag {tag!r}: letters, digits and _ only")
        if not 0 <= self.seed < MAX_SEED:
            raise InvalidCanonName(f"seed {self.seed} outside [0, 2^32)")
        if self.exp_id is None and self.tags[-1] not in NO_EXP_ID_TAGS:
            raise InvalidCanonName(
                "missing EXP_ID: only SMOKE and CHAMP names may omit the E<NNNN> part"
            )
        if self.exp_id is not None and not 1 <= self.exp_id <= MAX_EXP_ID:
            raise InvalidCanonName(f"EXP_ID {self.exp_id} outside E0001..E{MAX_EXP_ID}")

    @property
    def variant(self) -> str:
        """Model, format and tags: what 'the same variant' means for NEVER REUSE of seeds."""
        return "-".join((PREFIX, self.model, self.format, *self.tags))

    @property
    def hidden_size(self) -> int | None:
        """The hidden size named by an ``h<N>`` tag, if any."""
        for tag in self.tags:
            m = _HIDDEN_RE.match(tag)
            if m:
                return int(m.group(1))
        return None

    @property
    def is_smoke(self) -> bool:
        return "SMOKE" in self.tags

    @property
    def is_champion(self) -> bool:
        return "CHAMP" in self.tags

    def with_seed(self, seed: int, exp_id: int | None = None) -> CanonName:
        """The same variant with another seed (and EXP_ID): how mirrors are named."""
        return CanonName(self.model, self.format, self.tags, seed, exp_id, self.models)

    def __str__(self) -> str:
        parts = [PREFIX, self.model, self.format, *self.tags]
        if self.exp_id is not None:
            parts.append(f"E{self.exp_id:04d}")
        return "-".join(parts) + f"-seed{self.seed}"


def parse(name: str, models: Iterable[str] = DEFAULT_MODELS) -> CanonName:
    """Parse a canon name, or raise ``InvalidCanonName`` naming the bad part."""
    models = tuple(models)
    text = name.strip()
    if not text.startswith(PREFIX + "-"):
        raise InvalidCanonName(f"{name!r} does not start with '{PREFIX}-'")
    m = _SEED_RE.match(text)
    if not m:
        raise InvalidCanonName(f"missing '-seed<N>' at the end of {name!r}")
    body, seed = m.group(1)[len(PREFIX) + 1 :], int(m.group(2))
    tokens = body.split("-")
    fmt_at = next((i for i, t in enumerate(tokens) if t in FORMATS), None)
    if fmt_at is None:
        guess = _format_guess(tokens, models)
        what = f"unknown format {guess!r}" if guess else "no number format"
        raise InvalidCanonName(f"{what} in {name!r} (known: {', '.join(FORMATS)})")
    model = "-".join(tokens[:fmt_at])
    if model not in models:
        raise InvalidCanonName(f"unknown model {model!r} in {name!r} (known: {', '.join(models)})")
    rest = tokens[fmt_at + 1 :]
    exp_id = None
    if rest:
        em = _EXP_RE.match(rest[-1])
        if em:
            exp_id = int(em.group(1))
            rest = rest[:-1]
    try:
        return CanonName(model, tokens[fmt_at], tuple(rest), seed, exp_id, models)
    except InvalidCanonName as exc:
        raise InvalidCanonName(f"{exc} in {name!r}") from None


def _format_guess(tokens: list[str], models: tuple[str, ...]) -> str | None:
    """The token that stands where the format should be, for the error message."""
    for width in (2, 1):
        if "-".join(tokens[:width]) in models and len(tokens) > width:
            return tokens[width]
    return tokens[1] if len(tokens) > 1 else None


def check_gf16_hidden(canon: CanonName, hidden_size: int | None) -> None:
    """L-R9: refuse GF16 with a hidden size below 256 (or unknown)."""
    if canon.format != "GF16":
        return
    if hidden_size is None or hidden_size < GF16_MIN_HIDDEN:
        raise GF16HiddenTooSmall(
            f"L-R9: GF16 needs hidden size h >= {GF16_MIN_HIDDEN}, {canon} has h={hidden_size}"
        )
