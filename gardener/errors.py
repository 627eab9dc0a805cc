"""Typed errors. A ``UserError`` is printed as one line by the CLI, never as a traceback."""

from __future__ import annotations


class GardenerError(Exception):
    """Base of every error the gardener raises on purpose."""


class UserError(GardenerError):
    """Bad input or a refused request: the message says what was wrong, nothing changed."""

    exit_code = 2


class InvalidCanonName(UserError):
    """A canon name that does not parse; the message names the bad part."""


class GF16HiddenTooSmall(UserError):
    """L-R9: GF16 is only valid for hidden size h >= 256."""


class ReusedChampionSlot(UserError):
    """A claim or deploy into a locked or already used champion slot / EXP_ID."""


class SlotStillOccupied(UserError):
    """``--force-replace`` of a champion slot whose service still runs (kill before spin)."""


class CrossAccountKillForbidden(UserError):
    """A mutation of a trial that belongs to another account."""


class SeedReused(UserError):
    """A seed already used for the same variant (NEVER REUSE)."""


class UnknownTrial(UserError):
    """A canon name the ledger does not know."""


class ConfigError(UserError):
    """Settings or a configuration file that cannot be used."""


class ExpIdReused(UserError):
    """An EXP_ID another trial or claim already holds: never two trials with one EXP_ID."""


class SmokeGateClosed(UserError):
    """A batch for an account without a SMOKE_DONE race on the same trainer configuration."""


class GardenerPaused(UserError):
    """A mutating action asked for while the gardener is paused."""
