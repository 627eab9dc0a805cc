"""Seeds: exact phi anchors, the strategies in order, and NEVER REUSE."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from gardener.core import seeds
from gardener.core.seeds import MIRROR_ORDER, REPLACE_ORDER, SeedPicker, phi_seed

PHI = (1 + 5**0.5) / 2


def test_phi_seed_matches_the_formula_where_floats_are_exact() -> None:
    assert [phi_seed(k) for k in range(1, 5)] == [1618033, 2618033, 4236067, 6854101]
    for k in range(0, 30):
        assert phi_seed(k) == math.floor(PHI**k * 1e6) % 2**32


def test_phi_seed_stays_in_range_for_large_k() -> None:
    assert all(0 <= phi_seed(k) < 2**32 for k in range(100, 300, 7))


def test_replacement_takes_the_first_unused_phi_anchor() -> None:
    picker = SeedPicker("race", {"V": frozenset({phi_seed(1)})})
    assert picker.pick("V", 1, leader_seed=42, order=REPLACE_ORDER) == [
        (phi_seed(2), seeds.PHI)
    ]


def test_mirror_takes_siblings_first_then_phi() -> None:
    picker = SeedPicker("race", {"V": frozenset({42, 43})})
    got = picker.pick("V", 3, leader_seed=42, order=MIRROR_ORDER)
    assert got == [(41, seeds.SIBLING), (phi_seed(1), seeds.PHI), (phi_seed(2), seeds.PHI)]


def test_random_fallback_is_deterministic_and_fresh() -> None:
    used = frozenset(phi_seed(k) for k in range(1, seeds.PHI_MAX_K + 1)) | {6, 8}
    a = SeedPicker("race-1", {"V": used}).pick("V", 2, leader_seed=7, order=REPLACE_ORDER)
    b = SeedPicker("race-1", {"V": used}).pick("V", 2, leader_seed=7, order=REPLACE_ORDER)
    assert a == b
    assert [how for _, how in a] == [seeds.RANDOM, seeds.RANDOM]
    assert all(s not in used and 0 <= s < 2**32 for s, _ in a)
    other = SeedPicker("race-2", {"V": used}).pick("V", 2, leader_seed=7, order=REPLACE_ORDER)
    assert other != a


@settings(max_examples=60, deadline=None)
@given(
    used=st.frozensets(st.sampled_from([phi_seed(k) for k in range(1, 12)] + [40, 41, 42, 43])),
    calls=st.lists(st.tuples(st.integers(1, 5), st.booleans()), min_size=1, max_size=6),
)
def test_never_a_used_seed_nor_one_chosen_earlier(
    used: frozenset[int], calls: list[tuple[int, bool]]
) -> None:
    picker = SeedPicker("r", {"V": used})
    seen: list[int] = []
    for count, mirror in calls:
        got = picker.pick("V", count, leader_seed=42, order=MIRROR_ORDER if mirror else
                          REPLACE_ORDER)
        assert len(got) == count
        seen.extend(s for s, _ in got)
    assert len(seen) == len(set(seen))
    assert not set(seen) & used
