"""Gates: gate-0 (smoke), gate-2 (1.85, quorum 3/3 on seeds 43-45) and GATE-FINAL (1.50)."""

from __future__ import annotations

import math

from gardener.core.gates import Row, gate0, gate2, gate_final, rank


def rows(variant: str, finals: dict[int, float | None]) -> list[Row]:
    return [Row(f"{variant}-seed{s}", s, variant, b) for s, b in finals.items()]


def test_rank_puts_missing_last_and_breaks_ties_by_name() -> None:
    rs = rank([Row("b", 1, "V", 2.0), Row("c", 2, "V", None), Row("a", 3, "V", 2.0),
               Row("d", 4, "V", 1.9)])
    assert [r.canon_name for r in rs] == ["d", "a", "b", "c"]


def test_gate0_passes_with_distinct_finals() -> None:
    v = gate0(rows("V", {500: 2.1, 501: 2.2, 502: 2.3}), expected=3)
    assert v.passed and [r.seed for r in v.ranked] == [500, 501, 502]


def test_gate0_fails_on_a_missing_final_a_tie_or_a_wrong_count() -> None:
    missing = gate0(rows("V", {500: 2.1, 501: None}))
    assert not missing.passed and "without a final BPB" in missing.reasons[0]
    tie = gate0(rows("V", {500: 2.1, 501: 2.1}))
    assert not tie.passed and any("same final" in r for r in tie.reasons)
    count = gate0(rows("V", {500: 2.1}), expected=21)
    assert not count.passed and any("expected 21" in r for r in count.reasons)
    nan = gate0(rows("V", {500: math.nan, 501: 2.0}))
    assert not nan.passed


def test_gate2_needs_all_three_seeds_below_the_bar() -> None:
    assert gate2(rows("V", {43: 1.80, 44: 1.84, 45: 1.849})).passed
    two = gate2(rows("V", {43: 1.80, 44: 1.84, 45: 1.85}))
    assert not two.passed and "2/3" in two.reasons[0]


def test_gate2_only_counts_seeds_43_to_45_of_one_variant() -> None:
    assert not gate2(rows("V", {42: 1.7, 43: 1.8, 44: 1.8})).passed
    mixed = rows("V", {43: 1.8, 44: 1.8}) + rows("W", {45: 1.8})
    assert not gate2(mixed).passed
    both = gate2(rows("V", {43: 1.8, 44: 1.8, 45: 1.8}) + rows("W", {43: 1.9}))
    assert both.passed and "V: 3/3" in both.reasons[0]


def test_gate2_reports_the_best_seed_of_a_failing_variant() -> None:
    v = gate2(rows("V", {43: 2.7835, 44: 2.9, 45: 2.8337}))
    assert "best 2.7835" in v.reasons[0]


def test_gate_final_uses_1_50_and_any_seeds() -> None:
    assert gate_final(rows("V", {1: 1.4, 2: 1.45, 3: 1.49})).passed
    assert not gate_final(rows("V", {1: 1.4, 2: 1.45, 3: 1.5})).passed
