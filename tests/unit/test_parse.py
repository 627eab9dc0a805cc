"""The line and structured-sample parser: L-R8 exactly, every bad sample rejected with a reason."""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from gardener.ingest import parse as P

L_R8 = re.compile(r"^BPB=\d\.\d{4}$")

key = st.from_regex(r"[a-z_]{1,8}", fullmatch=True).filter(
    lambda k: k not in {"step", "bpb", "corpus", "sha256"}
)
value = st.from_regex(r"[A-Za-z0-9.\-]{0,10}", fullmatch=True).filter(
    lambda v: "bpb" not in v.lower()
)
other_token = st.builds(lambda k, v: f"{k}={v}", key, value)
steps = st.integers(min_value=0, max_value=P.MAX_STEP)
tenths = st.integers(min_value=0, max_value=99_999)  # BPB in units of 1e-4


def bpb_text(units: int) -> str:
    return f"{units // 10_000}.{units % 10_000:04d}"


@given(
    steps,
    tenths,
    st.lists(other_token, max_size=3),
    st.lists(other_token, max_size=3),
    st.booleans(),
)
def test_any_well_formed_line_parses_back_to_its_numbers(
    step: int, units: int, before: list[str], after: list[str], bpb_first: bool
) -> None:
    core = (
        [f"BPB={bpb_text(units)}", f"step={step}"]
        if bpb_first
        else [f"step={step}", f"BPB={bpb_text(units)}"]
    )
    line = " ".join([*before, *core, *after])
    parsed = P.parse_line(line)
    assert isinstance(parsed, P.Sample), parsed
    assert parsed.step == step
    assert parsed.bpb == float(bpb_text(units))
    assert round(parsed.bpb * 10_000) == units
    assert parsed.raw == line
    assert P.parse_lines([line]) == [parsed]


fragments = st.lists(
    st.one_of(
        st.sampled_from(
            [
                "BPB=",
                "bpb=",
                "BPB:",
                "step=",
                "DONE:",
                " ",
                "\t",
                ".",
                "-",
                "nan",
                "corpus=",
                "sha256=",
                "=",
                "lr=0.1",
            ]
        ),
        st.from_regex(r"\d{1,5}", fullmatch=True),
        st.text(max_size=3),
    ),
    max_size=10,
).map("".join)


@settings(max_examples=400)
@given(fragments)
def test_any_line_either_parses_to_an_l_r8_sample_or_is_not_a_sample(line: str) -> None:
    """Nothing that looks like a sample is accepted unless its BPB token obeys L-R8."""
    parsed = P.parse_lines([line])[0]
    if isinstance(parsed, P.Sample):
        tokens = [t for t in line.split() if t.startswith("BPB=")]
        assert len(tokens) == 1 and L_R8.match(tokens[0])
        step_tokens = [t for t in line.split() if t.startswith("step=")]
        assert len(step_tokens) == 1 and int(step_tokens[0][5:]) == parsed.step >= 0
        assert parsed.bpb == float(tokens[0][4:])
    elif re.search(r"bpb\s*[=:]|bpb\s+\d", line, re.I) and not line.strip().startswith("DONE:"):
        assert isinstance(parsed, P.Rejected)
        assert parsed.reason.startswith(parsed.code + ": ")
        assert parsed.raw == line


def corruptions(good: str) -> st.SearchStrategy[str]:
    """A BPB value text that breaks L-R8 in one of the ways trainers have broken it."""
    return st.one_of(
        st.just(good[:-1]),  # three decimals
        st.just(good + "7"),  # five decimals
        st.just("1" + good),  # two integer digits
        st.sampled_from(
            [
                "nan",
                "NaN",
                "inf",
                "-inf",
                "",
                "-" + good,
                "+" + good,
                good + "e0",
                good.replace(".", ","),
                " " + good,
            ]
        ),
        st.from_regex(r"[0-9.eE+\-a-z]{1,8}", fullmatch=True).filter(
            lambda v: re.fullmatch(r"\d\.\d{4}", v) is None
        ),
    )


@given(steps, tenths, st.data())
def test_any_corrupted_bpb_is_rejected_with_a_reason_never_accepted(
    step: int, units: int, data: st.DataObject
) -> None:
    bad = data.draw(corruptions(bpb_text(units)))
    line = f"step={step} BPB={bad}"
    parsed = P.parse_line(line)
    assert isinstance(parsed, P.Rejected), (line, parsed)
    assert parsed.raw == line
    assert parsed.code in {P.BPB_FORMAT, P.DUPLICATE_TOKEN}
    assert parsed.reason.startswith(parsed.code + ": ")


@given(
    tenths,
    st.one_of(
        st.integers(max_value=-1).map(str),
        st.from_regex(r"[0-9a-z.+\-]{1,6}", fullmatch=True).filter(
            lambda v: re.fullmatch(r"\d+", v) is None
        ),
        st.integers(min_value=P.MAX_STEP + 1, max_value=10**11).map(str),
    ),
)
def test_any_corrupted_step_is_rejected_with_a_reason(units: int, step_text: str) -> None:
    line = f"step={step_text} BPB={bpb_text(units)}"
    parsed = P.parse_line(line)
    assert isinstance(parsed, P.Rejected), (line, parsed)
    assert parsed.code in {P.STEP_FORMAT, P.STEP_VALUE, P.STEP_RANGE}


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("step=10 BPB=1.892", r"bpb_format: BPB=1.892 does not match L-R8 ^BPB=\d\.\d{4}$"),
        ("step=0 BPB=nan", r"bpb_format: BPB=nan does not match L-R8 ^BPB=\d\.\d{4}$"),
        ("step=10 BPB=12.3456", r"bpb_format: BPB=12.3456 does not match L-R8 ^BPB=\d\.\d{4}$"),
        ("step=-1 BPB=2.3456", "step_value: negative step -1"),
        ("step=abc BPB=2.3456", "step_format: step=abc is not an integer"),
        ("BPB=2.3456", "missing_step: a BPB token without a step=N token"),
        ("epoch=1 BPB=2.3456 lr=0.001", "missing_step: a BPB token without a step=N token"),
        ("step=10 BPB=2.3456 BPB=2.3457", "duplicate_token: 2 BPB tokens in one line"),
        ("step=10 step=20 BPB=2.3456", "duplicate_token: 2 step tokens in one line"),
        ("step=3000000000 BPB=2.3456", "step_range: step 3000000000 above 2147483647"),
        (
            "step=10 bpb=2.3456",
            r"bpb_format: no BPB= token (L-R8 ^BPB=\d\.\d{4}$); saw 'bpb=2.3456'",
        ),
        ("step=10 BPB: 2.3456", r"bpb_format: no BPB= token (L-R8 ^BPB=\d\.\d{4}$); saw 'BPB:'"),
        ("DONE: bpb=nan", "done_format: the final line must be DONE: bpb=X.XXXX (L-R8)"),
        (
            "step 10: val BPB 2.3456",
            r"bpb_format: no BPB= token (L-R8 ^BPB=\d\.\d{4}$); saw 'BPB'",
        ),
        (
            "step=10 BPB=\uff12.\uff13\uff14\uff15\uff16",
            "bpb_format: BPB=\uff12.\uff13\uff14\uff15\uff16 does not match L-R8 "
            "^BPB=\\d\\.\\d{4}$",
        ),
        ("step=\u0663 BPB=2.3456", "step_format: step=\u0663 is not an integer"),
        ("corpus=stdlib sha256=abc", "corpus_format: sha256 must be 64 hex digits"),
    ],
)
def test_each_bad_line_has_its_reason(line: str, reason: str) -> None:
    parsed = P.parse_line(line)
    assert parsed == P.Rejected(line, reason.split(":")[0], reason)


def test_ordinary_lines_are_ignored_and_reports_recognised() -> None:
    digest = "ab" * 32
    assert P.parse_line("loading model, hidden=512") is None
    assert P.parse_line("step=10 loss=3.21 lr=0.001") is None
    assert P.parse_line("computing bpb on the validation set") is None
    assert P.parse_line("") is None
    assert P.parse_line(f"corpus=stdlib sha256={digest.upper()}") == P.CorpusReport(
        "stdlib", digest, f"corpus=stdlib sha256={digest.upper()}"
    )
    assert P.parse_line("DONE: bpb=1.9012") == P.Done(1.9012, "DONE: bpb=1.9012")
    assert P.parse_line("epoch=1 step=10 BPB=2.3456 lr=0.001") == P.Sample(
        10, 2.3456, "epoch=1 step=10 BPB=2.3456 lr=0.001"
    )
    assert P.parse_line("  step=10\tBPB=0.0000  ") == P.Sample(10, 0.0, "  step=10\tBPB=0.0000  ")


def test_trainer_output_parses() -> None:
    """The reference trainer's own format helper produces lines the parser accepts."""
    from gardener.trainer.train import format_bpb

    assert P.parse_line(f"step=500 BPB={format_bpb(2.34561)}") == P.Sample(
        500, 2.3456, "step=500 BPB=2.3456"
    )
    assert isinstance(P.parse_line(f"step=0 BPB={format_bpb(math.nan)}"), P.Rejected)


NOW = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("item", "code"),
    [
        ({"canon_name": "X", "step": 1, "bpb": math.nan}, "bpb_value"),
        ({"canon_name": "X", "step": 1, "bpb": math.inf}, "bpb_value"),
        ({"canon_name": "X", "step": 1, "bpb": -0.5}, "bpb_value"),
        ({"canon_name": "X", "step": 1, "bpb": 10.0}, "bpb_range"),
        ({"canon_name": "X", "step": 1, "bpb": 2.34567}, "bpb_precision"),
        ({"canon_name": "X", "step": 1, "bpb": "1.892"}, "bpb_format"),
        ({"canon_name": "X", "step": 1, "bpb": None}, "bpb_format"),
        ({"canon_name": "X", "step": 1, "bpb": True}, "bpb_format"),
        ({"canon_name": "X", "step": -1, "bpb": 2.0}, "step_value"),
        ({"canon_name": "X", "step": 1.5, "bpb": 2.0}, "step_format"),
        ({"canon_name": "X", "step": "10", "bpb": 2.0}, "step_format"),
        ({"canon_name": "X", "step": 2**40, "bpb": 2.0}, "step_range"),
        ({"canon_name": "X", "step": 1, "bpb": 2.0, "ts": "yesterday"}, "ts_format"),
        ({"canon_name": "X", "step": 1, "bpb": 2.0, "extra": 1}, "bad_item"),
        ({"step": 1, "bpb": 2.0}, "bad_item"),
        ([1, 2], "bad_item"),
    ],
)
def test_bad_structured_samples_are_rejected(item: object, code: str) -> None:
    _, parsed = P.parse_structured(item)
    assert isinstance(parsed, P.Rejected) and parsed.code == code, parsed
    assert parsed.reason.startswith(code + ": ")


def test_structured_samples_round_to_four_decimals_and_take_a_time() -> None:
    item = {"canon_name": "X", "step": 7, "bpb": 2.345, "ts": 0}
    name, s = P.parse_structured(item)
    assert name == "X" and s == P.Sample(7, 2.345, "", datetime(1970, 1, 1, tzinfo=UTC))
    assert isinstance(s, P.Sample) and s.item is item
    assert s.raw_text() == '{"bpb": 2.345, "canon_name": "X", "step": 7, "ts": 0}'
    _, s = P.parse_structured({"canon_name": "X", "step": 7, "bpb": "2.3450"})
    assert isinstance(s, P.Sample) and s.bpb == 2.345
    _, s = P.parse_structured({"canon_name": "X", "step": 7, "bpb": 2, "ts": "2026-01-01T00:00:00"})
    assert isinstance(s, P.Sample) and s.bpb == 2.0 and s.ts == NOW


@settings(max_examples=300)
@given(steps, tenths)
def test_any_four_decimal_number_is_accepted_as_itself(step: int, units: int) -> None:
    bpb = units / 10_000
    assume(bpb < P.MAX_BPB)
    _, s = P.parse_structured({"canon_name": "X", "step": step, "bpb": bpb})
    assert isinstance(s, P.Sample) and s.bpb == float(bpb_text(units)) and s.step == step


def test_safe_text_keeps_postgres_happy() -> None:
    assert P.safe_text("a\x00b") == "a\\x00b"
    assert P.safe_text("\ud800x") == "\\ud800x"
    long = "x" * (P.MAX_RAW + 5)
    assert P.safe_text(long) == "x" * P.MAX_RAW + "...[5 more chars cut]"


@settings(max_examples=400)
@given(st.one_of(st.floats(), st.integers(min_value=-5, max_value=20)), st.integers())
def test_any_posted_number_is_refused_or_kept_to_four_decimals(value: float, step: int) -> None:
    _, s = P.parse_structured({"canon_name": "X", "step": step, "bpb": value})
    if isinstance(s, P.Sample):
        assert 0 <= step <= P.MAX_STEP and s.step == step
        assert 0.0 <= s.bpb < P.MAX_BPB and math.isfinite(s.bpb)
        assert s.bpb == float(f"{s.bpb:.4f}")  # four decimals exactly, as L-R8 writes them
        assert s.bpb == value
    else:
        assert s.reason.startswith(s.code + ": ")
        # More than four decimals (2.000001, a denormal) is refused, never rounded.
        bad_value = not (math.isfinite(value) and 0 <= value < P.MAX_BPB) or round(
            value, 4
        ) != value
        assert bad_value or not 0 <= step <= P.MAX_STEP
