"""Short service names: at most 32 characters, deterministic, distinct for distinct canon names."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from gardener.backends.railway.names import MAX_LEN, is_gardener_name, matches, service_name
from gardener.core.canon import DEFAULT_MODELS, FORMATS, CanonName


def _canon(model: str, fmt: str, tags: list[str], seed: int, exp: int | None) -> str:
    tail = ("SMOKE",) if exp is None else ()
    return str(CanonName(model, fmt, (*tags, *tail), seed, exp))


canon_names = st.builds(
    _canon,
    st.sampled_from(DEFAULT_MODELS),
    st.sampled_from(FORMATS),
    st.lists(st.sampled_from(["WSD", "BS8", "GRADFIX", "EMA10", "h512", "h768", "COSINE"]),
             min_size=1, max_size=4),
    st.integers(0, 2**32 - 1),
    st.one_of(st.none(), st.integers(1, 10**7)),
)


def test_examples_from_the_brief() -> None:
    name = service_name("IGLA-HYBRID-FP32-WSD-E0005-seed200")
    assert len("IGLA-HYBRID-FP32-WSD-E0005-seed200") > MAX_LEN
    assert len(name) <= MAX_LEN
    assert name.startswith("gd-hybrid") and "s200" in name
    assert is_gardener_name(name)
    assert matches(name, "IGLA-HYBRID-FP32-WSD-E0005-seed200")
    assert not matches(name, "IGLA-HYBRID-FP32-WSD-E0005-seed201")


@given(canon_names)
def test_short_deterministic_and_recognisable(canon: str) -> None:
    name = service_name(canon)
    assert len(name) <= MAX_LEN
    assert name == service_name(canon)
    assert is_gardener_name(name)


@settings(max_examples=50)
@given(st.lists(canon_names, min_size=2, max_size=200, unique=True))
def test_distinct_canon_names_get_distinct_service_names(canons: list[str]) -> None:
    assert len({service_name(c) for c in canons}) == len(canons)


def test_race_of_21_and_seed_neighbours_do_not_collide() -> None:
    canons = [f"IGLA-HYBRID-FP32-T{t}-SMOKE-seed{s}" for t in range(7) for s in range(500, 600)]
    canons += [f"IGLA-PHI-GF16-h512-E{e:04d}-seed{s}" for e in range(1, 50) for s in range(40)]
    assert len({service_name(c) for c in canons}) == len(canons)


def test_foreign_names_are_not_ours() -> None:
    assert not is_gardener_name("postgres")
    assert not is_gardener_name("gd-hybrid-fp32-s200")
    assert not is_gardener_name("gd-" + "a" * 40 + "-0123456789ab")
