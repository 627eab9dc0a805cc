from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from gardener.core import canon
from gardener.errors import GF16HiddenTooSmall, InvalidCanonName

DATA = Path(__file__).resolve().parent.parent / "data"


def plan_names() -> list[str]:
    lines = (DATA / "seed_names.txt").read_text().splitlines()
    return [line for line in lines if line and not line.startswith("#")]


@pytest.mark.parametrize("name", plan_names())
def test_every_name_of_the_plan_parses_and_round_trips(name: str) -> None:
    parsed = canon.parse(name)
    assert str(parsed) == name


def test_parts_of_a_name() -> None:
    n = canon.parse("IGLA-JEPA-T-FP32-GRADFIX-E0011-seed220")
    assert (n.model, n.format, n.tags, n.exp_id, n.seed) == (
        "JEPA-T",
        "FP32",
        ("GRADFIX",),
        11,
        220,
    )
    assert n.variant == "IGLA-JEPA-T-FP32-GRADFIX"
    smoke = canon.parse("IGLA-HYBRID-FP32-h768-SMOKE-seed560")
    assert smoke.exp_id is None and smoke.is_smoke and smoke.hidden_size == 768
    assert canon.parse("IGLA-TRAIN_V2-GF16-CHAMP-seed300").is_champion


def test_exp_ids_beyond_e9999_parse_and_print() -> None:
    name = canon.parse("IGLA-HYBRID-FP32-WSD-E10000-seed1")
    assert name.exp_id == 10000
    assert str(name) == "IGLA-HYBRID-FP32-WSD-E10000-seed1"
    assert str(canon.parse("IGLA-HYBRID-FP32-WSD-E123456-seed7")).endswith("-E123456-seed7")


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("IGLA-HYBRID-FP33-WSD-E0005-seed200", "unknown format 'FP33'"),
        ("IGLA-HYBRUD-FP32-WSD-E0005-seed200", "unknown model 'HYBRUD'"),
        ("IGLA-HYBRID-FP32-WSD-E0005", "missing '-seed<N>'"),
        ("XGLA-HYBRID-FP32-WSD-E0005-seed1", "does not start with 'IGLA-'"),
        ("IGLA-HYBRID-FP32-WSD-seed1", "missing EXP_ID"),
        ("IGLA-HYBRID-FP32-E0005-seed1", "at least one tag"),
        ("IGLA-HYBRID-FP32-W$D-E0005-seed1", "bad tag 'W$D'"),
        ("IGLA-HYBRID-FP32-WSD-E0005-seed4294967296", "outside [0, 2^32)"),
        ("IGLA-HYBRID-FP32-WSD-E0000-seed1", "EXP_ID 0 outside E0001..E2147483647"),
    ],
)
def test_bad_names_name_the_bad_part(name: str, fragment: str) -> None:
    with pytest.raises(InvalidCanonName) as err:
        canon.parse(name)
    assert fragment in str(err.value)


def test_models_are_configurable() -> None:
    with pytest.raises(InvalidCanonName):
        canon.parse("IGLA-MAMBA-FP32-WSD-E0005-seed1")
    n = canon.parse("IGLA-MAMBA-FP32-WSD-E0005-seed1", models=("MAMBA",))
    assert n.model == "MAMBA"


def test_l_r9_refuses_gf16_below_256() -> None:
    n = canon.parse("IGLA-TRAIN_V2-GF16-CHAMP-seed300")
    canon.check_gf16_hidden(n, 256)
    canon.check_gf16_hidden(canon.parse("IGLA-HYBRID-FP32-WSD-E0005-seed1"), 64)
    with pytest.raises(GF16HiddenTooSmall, match="L-R9"):
        canon.check_gf16_hidden(n, 255)
    with pytest.raises(GF16HiddenTooSmall):
        canon.check_gf16_hidden(n, None)


tags = st.lists(st.from_regex(r"[A-Za-z0-9_]{1,8}", fullmatch=True), min_size=1, max_size=4)


@given(
    model=st.sampled_from(canon.DEFAULT_MODELS),
    fmt=st.sampled_from(canon.FORMATS),
    tags=tags,
    seed=st.integers(0, 2**32 - 1),
    exp_id=st.one_of(st.none(), st.integers(1, 10**7)),
)
def test_round_trip(model: str, fmt: str, tags: list[str], seed: int, exp_id: int | None) -> None:
    if exp_id is None:
        tags = [*tags, "SMOKE"]
    assume(not any(t in canon.FORMATS for t in tags))
    name = canon.CanonName(model, fmt, tuple(tags), seed, exp_id)
    parsed = canon.parse(str(name))
    assert parsed == name
    assert str(parsed) == str(name)
