"""New seeds for mirrors and replacements: phi-anchored, the leader's siblings, then random.

NEVER REUSE: a seed already used for the variant, or already handed out earlier in the same
``decide`` call, is never returned. The random fallback is derived from a hash of the race,
the variant and a counter, so ``decide`` stays pure and deterministic.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from math import isqrt

SEED_SPACE = 2**32
PHI_SCALE = 10**6
PHI_MAX_K = 256  # phi-anchored seeds tried before falling back
PHI = "phi-anchored"
SIBLING = "sibling"
RANDOM = "random"
MIRROR_ORDER: tuple[str, ...] = (SIBLING, PHI, RANDOM)
REPLACE_ORDER: tuple[str, ...] = (PHI, SIBLING, RANDOM)


def _lucas_fib(k: int) -> tuple[int, int]:
    """(L_k, F_k): phi^k = (L_k + F_k * sqrt(5)) / 2 exactly."""
    f0, f1 = 0, 1
    for _ in range(k):
        f0, f1 = f1, f0 + f1
    # f0 = F_k, f1 = F_{k+1}; L_k = F_{k-1} + F_{k+1} = 2 F_{k+1} - F_k.
    return 2 * f1 - f0, f0


def phi_seed(k: int) -> int:
    """``floor(phi^k * 1e6) mod 2^32``, computed exactly with integers (no float drift)."""
    if k < 0:
        raise ValueError("k must be >= 0")
    lk, fk = _lucas_fib(k)
    # phi^k * 1e6 = (L_k * 1e6 + sqrt(5 * F_k^2 * 1e12)) / 2; floor(y / 2) = floor(floor(y) / 2).
    root = isqrt(5 * fk * fk * PHI_SCALE * PHI_SCALE)
    return ((lk * PHI_SCALE + root) // 2) % SEED_SPACE


def _random_seed(race: str, variant: str, counter: int) -> int:
    digest = hashlib.sha256(f"{race}\x00{variant}\x00{counter}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


@dataclass
class SeedPicker:
    """Hands out fresh seeds per variant within one ``decide`` call, never twice."""

    race: str
    used: dict[str, frozenset[int]]
    chosen: dict[str, set[int]] = field(default_factory=dict)

    def taken(self, variant: str) -> set[int]:
        return set(self.used.get(variant, frozenset())) | self.chosen.setdefault(variant, set())

    def reserve(self, variant: str, seeds: Iterable[int]) -> None:
        """Mark seeds as taken (for example the seeds of trials already in the snapshot)."""
        self.chosen.setdefault(variant, set()).update(seeds)

    def pick(
        self, variant: str, count: int, *, leader_seed: int | None, order: tuple[str, ...]
    ) -> list[tuple[int, str]]:
        """``count`` fresh seeds as (seed, strategy), trying the strategies in ``order``."""
        out: list[tuple[int, str]] = []
        taken = self.taken(variant)
        for strategy in order:
            for seed in self._candidates(strategy, variant, leader_seed, taken):
                if len(out) == count:
                    break
                if seed in taken:
                    continue
                taken.add(seed)
                out.append((seed, strategy))
            if len(out) == count:
                break
        self.chosen[variant].update(s for s, _ in out)
        return out

    def _candidates(
        self, strategy: str, variant: str, leader_seed: int | None, taken: set[int]
    ) -> Iterable[int]:
        if strategy == PHI:
            return (phi_seed(k) for k in range(1, PHI_MAX_K + 1))
        if strategy == SIBLING:
            if leader_seed is None:
                return ()
            return (s for s in (leader_seed + 1, leader_seed - 1) if 0 <= s < SEED_SPACE)
        if strategy == RANDOM:
            return (_random_seed(self.race, variant, i) for i in range(len(taken) + 10_000))
        raise ValueError(f"unknown seed strategy {strategy!r}")
