"""Plain data shared by the core, the daemon and the backtest.

``decide(snapshot, config) -> list[Decision]`` is the one decision function; the daemon builds
a ``Snapshot`` from the ledger, the backtest builds one from recorded curves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


class Action(StrEnum):
    PRUNE = "prune"  # stop a trial (a loser at a rung, or DIVERGING)
    REPLACE = "replace"  # start a new seed in place of a killed trial
    MIRROR = "mirror"  # start sibling seeds of the leader
    PROMOTE = "promote"  # mark the leader of a rung
    KEEP = "keep"  # an explicit "leave it running", with the numbers
    HOLD = "hold"  # a mutating decision withheld (paused, or a floor tripwire open)
    VERDICT = "verdict"  # a gate verdict at the final rung
    FINISH = "finish"  # a trial reached the horizon
    TRIPWIRE = "tripwire"  # a tripwire fired (the event rides in ``Decision.tripwire``)


class SeedState(StrEnum):
    LEADING = "LEADING"
    TIED = "TIED"
    CATCHING_UP = "CATCHING_UP"
    PARALLEL_LOSING = "PARALLEL_LOSING"
    DIVERGING = "DIVERGING"
    UNKNOWN = "UNKNOWN"


class Status(StrEnum):
    """A service's observed status, the same words for every backend and in the ledger's
    ``observed_state`` column."""

    PENDING = "pending"  # queued, initializing, deploying: on its way to running
    BUILDING = "building"
    RUNNING = "running"
    SUCCEEDED = "succeeded"  # exited cleanly (the trainer finished)
    CRASHED = "crashed"  # exited non-zero; the restart policy still has retries
    FAILED = "failed"  # crashed with no retries left, or the build failed
    STOPPED = "stopped"  # exists, nothing running (never deployed, or stopped)
    REMOVED = "removed"


# A service that runs or is on its way to running; one that will write nothing more.
ACTIVE = frozenset({Status.PENDING, Status.BUILDING, Status.RUNNING})
FINAL = frozenset({Status.SUCCEEDED, Status.FAILED, Status.STOPPED, Status.REMOVED})


class DesiredState(StrEnum):
    RUNNING = "running"
    STOPPED = "stopped"
    REMOVED = "removed"


@dataclass(frozen=True)
class TrialView:
    """One trial as the core sees it: identity, wishes, and its samples as arrays."""

    canon_name: str
    variant: str
    seed: int
    steps: IntArray
    bpb: FloatArray
    desired_state: DesiredState = DesiredState.RUNNING
    observed_state: str = "running"
    parent: str | None = None
    rung: int = -1  # the highest rung already decided for this trial
    last_sample_at: float | None = None  # seconds on the snapshot's clock
    corpus_sha256: str | None = None
    corpus: str | None = None  # the corpus name the trainer reported
    hidden_size: int | None = None
    format: str = "FP32"

    @property
    def last_step(self) -> int:
        return int(self.steps[-1]) if len(self.steps) else -1


@dataclass(frozen=True)
class TripwireEvent:
    """A tripwire that fired: what, on which trial, with the evidence."""

    kind: str
    canon_name: str | None
    evidence: dict[str, Any]
    blocks_promotions: bool = False

    @property
    def key(self) -> str:
        """A stable key so the same condition is recorded once, not once per tick."""
        return f"{self.kind}:{self.canon_name or '*'}"


@dataclass(frozen=True)
class Snapshot:
    """Everything ``decide`` may look at for one race, at one moment."""

    race: str
    now: float
    trials: tuple[TrialView, ...]
    used_seeds: dict[str, frozenset[int]] = field(default_factory=dict)  # variant -> seeds
    open_tripwires: tuple[TripwireEvent, ...] = ()  # fired and not yet acknowledged
    paused: bool = False
    horizon: int | None = None  # the final step of the race, when known
    expected_corpus_sha256: str | None = None
    expected_corpus: str | None = None  # the configured corpus name, checked when no sha is pinned
    reviewed_tripwires: frozenset[str] = frozenset()  # keys a person reviewed and cleared


@dataclass(frozen=True)
class NewTrial:
    """A trial a decision asks to start: same variant as ``parent``, a fresh seed."""

    variant: str
    seed: int
    seed_strategy: str  # phi-anchored | sibling | random
    parent: str


@dataclass(frozen=True)
class Decision:
    """One decision with the numbers behind it and a reason a person can read."""

    action: Action
    canon_name: str
    rung: int
    reason: str
    seed_state: SeedState = SeedState.UNKNOWN
    numbers: dict[str, Any] = field(default_factory=dict)
    spawn: tuple[NewTrial, ...] = ()
    tripwire: TripwireEvent | None = None  # set for Action.TRIPWIRE

    @property
    def key(self) -> tuple[str, int, str]:
        """The natural key (canon name, rung, action) that makes applying it exactly once.

        A tripwire's action part names its kind, and a hold names the action it holds, so two
        of them on one trial at one rung stay distinct.
        """
        if self.action is Action.TRIPWIRE and self.tripwire is not None:
            return (self.canon_name, self.rung, f"tripwire:{self.tripwire.kind}")
        if self.action is Action.HOLD and "held_action" in self.numbers:
            return (self.canon_name, self.rung, f"hold:{self.numbers['held_action']}")
        return (self.canon_name, self.rung, self.action.value)

    @property
    def mutates(self) -> bool:
        """Whether applying it changes what runs (held while paused)."""
        return self.action in {Action.PRUNE, Action.REPLACE, Action.MIRROR, Action.PROMOTE}
