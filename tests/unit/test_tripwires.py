"""Tripwires: one test per kind, the sample validator, and review suppression."""

from __future__ import annotations

import math

import numpy as np

from gardener.core import tripwires as tw
from gardener.core.config import DecisionConfig
from gardener.core.tripwires import check_sample, check_snapshot, clean_curve
from gardener.core.types import DesiredState, Snapshot, TrialView

CFG = DecisionConfig()


def trial(name: str, steps: list[int], bpb: list[float], **kw: object) -> TrialView:
    return TrialView(
        name, "V", int(name[-1]) if name[-1].isdigit() else 1,
        np.asarray(steps, dtype=np.int64), np.asarray(bpb, dtype=np.float64), **kw,  # type: ignore[arg-type]
    )


def kinds(*trials: TrialView, **snap: object) -> dict[str, set[str | None]]:
    s = Snapshot("r", snap.pop("now", 0.0), tuple(trials), **snap)  # type: ignore[arg-type]
    out: dict[str, set[str | None]] = {}
    for e in check_snapshot(s, CFG):
        out.setdefault(e.kind, set()).add(e.canon_name)
    return out


def test_check_sample_reasons() -> None:
    assert check_sample(10, 2.5) is None
    assert check_sample(0, 0.0) is None
    assert "NaN" in (check_sample(0, math.nan) or "")
    assert "infinite" in (check_sample(5, math.inf) or "")
    assert "negative BPB" in (check_sample(5, -0.1) or "")
    assert "negative step" in (check_sample(-1, 2.5) or "")


def test_clean_curve_keeps_the_first_value_and_drops_backward_steps() -> None:
    c = clean_curve(np.array([10, 20, 20, 15, 30, 40]), np.array([3.0, 2.9, 2.8, 2.95, math.nan,
                                                                  2.7]))
    assert c.steps.tolist() == [10, 20, 40]
    assert c.bpb.tolist() == [3.0, 2.9, 2.7]
    assert c.conflicts == ((20, 2.9, 2.8),)
    assert c.backwards == ((20, 15),)
    assert c.bad[0][2] == "BPB is NaN"


def test_a_repeated_step_with_the_same_value_is_not_a_conflict() -> None:
    assert clean_curve(np.array([10, 10]), np.array([3.0, 3.0])).conflicts == ()


def test_bad_samples_and_step_order_fire() -> None:
    k = kinds(trial("a-seed1", [0, 10, 5, 10], [math.nan, 3.0, 3.1, 2.9]))
    assert k[tw.BAD_SAMPLE] == {"a-seed1"}
    assert k[tw.STEP_BACKWARDS] == {"a-seed1"}
    assert k[tw.STEP_CONFLICT] == {"a-seed1"}


def test_below_the_floor_blocks_promotions() -> None:
    s = Snapshot("r", 0.0, (trial("a-seed1", [10, 20], [2.5, 1.7]),))
    events = check_snapshot(s, CFG)
    floor = [e for e in events if e.kind == tw.BELOW_FLOOR]
    assert len(floor) == 1 and floor[0].blocks_promotions
    assert floor[0].evidence["bpb"] == 1.7 and floor[0].evidence["step"] == 20
    assert tw.LEAK not in {e.kind for e in events}


def test_a_leak_fires_both_leak_and_floor() -> None:
    k = kinds(trial("a-seed1", [10, 20], [2.5, 0.05]))
    assert k[tw.LEAK] == {"a-seed1"} and k[tw.BELOW_FLOOR] == {"a-seed1"}


def test_a_reviewed_floor_tripwire_does_not_fire_again() -> None:
    t = trial("a-seed1", [10, 20], [2.5, 1.7])
    assert tw.BELOW_FLOOR not in kinds(t, reviewed_tripwires=frozenset({"below_floor:a-seed1"}))


def test_stalled_running_trial() -> None:
    fresh = trial("a-seed1", [10], [3.0], last_sample_at=1000.0)
    silent = trial("b-seed2", [10], [3.0], last_sample_at=0.0)
    stopped = trial("c-seed3", [10], [3.0], last_sample_at=0.0,
                    desired_state=DesiredState.STOPPED)
    k = kinds(fresh, silent, stopped, now=CFG.stall_timeout_s + 1.0)
    assert k[tw.STALLED] == {"b-seed2"}


def test_bit_identical_curves_need_enough_points() -> None:
    steps, bpb = [10, 20, 30, 40, 50], [3.0, 2.9, 2.8, 2.7, 2.6]
    k = kinds(trial("a-seed1", steps, bpb), trial("b-seed2", steps, bpb))
    assert k[tw.DUPLICATE_RUN] == {"b-seed2"}
    short = kinds(trial("a-seed1", [10], [3.0]), trial("b-seed2", [10], [3.0]))
    assert tw.DUPLICATE_RUN not in short
    nearly = kinds(trial("a-seed1", steps, bpb), trial("b-seed2", steps, [*bpb[:4], 2.6001]))
    assert tw.DUPLICATE_RUN not in nearly


def test_corpus_mismatch_and_unreported() -> None:
    k = kinds(
        trial("a-seed1", [10], [3.0], corpus_sha256="aa"),
        trial("b-seed2", [10], [3.0], corpus_sha256="bb"),
        trial("c-seed3", [10], [3.0]),
        expected_corpus_sha256="aa",
    )
    assert k[tw.CORPUS_MISMATCH] == {"b-seed2"}
    assert k[tw.CORPUS_UNREPORTED] == {"c-seed3"}
    assert tw.CORPUS_MISMATCH not in kinds(trial("b-seed2", [10], [3.0], corpus_sha256="bb"))


def test_corpus_name_is_checked_when_no_sha_is_pinned() -> None:
    k = kinds(
        trial("a-seed1", [10], [3.0], corpus="stdlib"),
        trial("b-seed2", [10], [3.0], corpus="tiny_shakespeare"),
        trial("c-seed3", [10], [3.0]),
        expected_corpus="stdlib",
    )
    assert k[tw.CORPUS_MISMATCH] == {"b-seed2"}
    assert tw.CORPUS_UNREPORTED not in k
    pinned = kinds(
        trial("a-seed1", [10], [3.0], corpus="other-name", corpus_sha256="aa"),
        expected_corpus="stdlib",
        expected_corpus_sha256="aa",
    )
    assert tw.CORPUS_MISMATCH not in pinned


def test_gf16_needs_hidden_256() -> None:
    k = kinds(
        trial("a-seed1", [10], [3.0], format="GF16", hidden_size=128),
        trial("b-seed2", [10], [3.0], format="GF16", hidden_size=256),
        trial("c-seed3", [10], [3.0], format="FP32", hidden_size=64),
    )
    assert k[tw.GF16_HIDDEN] == {"a-seed1"}


def test_a_clean_trial_fires_nothing() -> None:
    assert kinds(trial("a-seed1", [10, 20, 30], [3.0, 2.9, 2.8], corpus_sha256="aa"),
                 expected_corpus_sha256="aa") == {}


def test_bpb_only_tripwires_stay_off_for_a_loss() -> None:
    # A loss of 0.05 is no leak and no floor breach, and GF16 is a BPB-race format rule:
    # with metric "loss" none of them fires; the generic ones (bad sample, stall) still do.
    low = trial("a-seed1", [1, 2, 3, 4, 5, 6], [0.3, 0.2, 0.1, 0.07, 0.06, 0.05], format="GF16")
    bad = trial("b-seed2", [1, 2, 3], [0.3, math.nan, 0.2])
    as_bpb = kinds(low, bad)
    assert {tw.LEAK, tw.BELOW_FLOOR, tw.GF16_HIDDEN} <= set(as_bpb)
    s = Snapshot("r", 0.0, (low, bad))
    loss = {e.kind for e in check_snapshot(s, DecisionConfig(metric="loss"))}
    assert loss == {tw.BAD_SAMPLE}


def test_duplicates_are_confirmed_on_the_samples_not_the_digest() -> None:
    """Curves whose digests collide are told apart by their samples; of three alike, the
    first name is the original and the other two fire."""
    s = np.asarray([10, 20, 30, 40, 50], dtype=np.int64)
    a = tw.CleanCurve(s, np.asarray([3.0, 2.9, 2.8, 2.7, 2.6]))
    b = tw.CleanCurve(s, np.asarray([3.0, 2.9, 2.8, 2.7, 2.5]))
    curves = {"d-seed4": a, "a-seed1": a, "b-seed2": b, "c-seed3": a}
    same = {name: 7 for name in curves}  # every digest collides
    events = tw.check_duplicates(curves, 5, same)
    assert {(e.canon_name, e.evidence["same_as"]) for e in events} == {
        ("c-seed3", "a-seed1"),
        ("d-seed4", "a-seed1"),
    }
    assert tw.check_duplicates(curves, 5) == events
