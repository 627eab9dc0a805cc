"""Trainer output and posted samples to typed values: pure, no I/O, a few microseconds a line.

A line is one of four things:
  ``step=N BPB=X.XXXX``   a sample (other ``key=value`` tokens may surround it)
  ``corpus=NAME sha256=HEX``  a corpus report, for the corpus tripwire
  ``DONE: bpb=X.XXXX``    the end of a run
  anything else           ordinary log output, ignored

A line that *looks like* a sample (``bpb`` followed by ``=``, ``:`` or a number) but breaks
a rule becomes a ``Rejected`` carrying the line verbatim and a reason; nothing that looks like
a sample is dropped or accepted silently. The BPB token must match L-R8 (``^BPB=\\d\\.\\d{4}$``)
exactly; value checks (NaN, infinity, negative) are ``gardener.core.tripwires.check_sample``,
so the rule lives in one place.

Every reason starts with a short code (``bpb_format: ...``): the code is the metric label, the
rest is for a person. The result types are plain (unfrozen) slotted dataclasses because one is
built per line on the hot path (a frozen one costs four times as much); treat them as values.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from gardener.core.tripwires import check_sample

MAX_STEP = 2**31 - 1  # bpb_samples.step is a PostgreSQL integer
MAX_BPB = 10.0  # L-R8 allows one integer digit: 0.0000 .. 9.9999
MAX_RAW = 8192  # longer quarantined text is cut, with a marker saying how much went

# Reason codes (the ``reason`` label of gardener_samples_rejected_total).
BPB_FORMAT = "bpb_format"
BPB_VALUE = "bpb_value"
BPB_RANGE = "bpb_range"
BPB_PRECISION = "bpb_precision"
STEP_FORMAT = "step_format"
STEP_VALUE = "step_value"
STEP_RANGE = "step_range"
MISSING_STEP = "missing_step"
DUPLICATE_TOKEN = "duplicate_token"
CORPUS_FORMAT = "corpus_format"
DONE_FORMAT = "done_format"
BAD_ITEM = "bad_item"
TS_FORMAT = "ts_format"
SEPARATOR = "separator"
# Decided by the writer against the ledger.
STEP_CONFLICT = "step_conflict"
UNKNOWN_TRIAL = "unknown_trial"
CROSS_ACCOUNT = "cross_account"

L_R8 = re.compile(r"\d\.\d{4}", re.ASCII)  # the value part of ^BPB=\d\.\d{4}$, used with fullmatch
# The trainer's own line, exactly.
_FAST = re.compile(r"step=(0|[1-9]\d{0,9}) BPB=(\d\.\d{4})", re.ASCII)
# "bpb" then "=" or ":", or then a number after a space ("val BPB 2.3456"): a sample, or a
# broken one. "computing bpb on the validation set" is not.
_LOOKS_LIKE_BPB = re.compile(r"bpb(?:\s*[=:]|\s+[-+]?(?:\d|\.\d|nan|inf))", re.I)
_STEP_VALUE = re.compile(r"0|-?[1-9]\d*", re.ASCII)  # no "-0", no leading zeros
# Tokens are separated by spaces and tabs only: any other whitespace or control character
# (NBSP, U+3000, \x1c..\x1f, a bare \r) in a line that looks like a sample is refused, since
# str.split() would quietly treat it as a separator.
_BAD_SEPARATOR = re.compile(r"[^\S \t]|[\x00-\x08\x0e-\x1f\x7f]")
_KEY = re.compile(r"(?:^|[ \t])(step|bpb)=", re.I | re.ASCII)
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
_DONE = re.compile(r"DONE:\s*(.*)")


@dataclass(slots=True)
class Sample:
    """A sample that passed every rule that can be judged without the ledger."""

    step: int
    bpb: float
    raw: str  # the line; "" for a posted sample, whose JSON is made only if it is quarantined
    ts: datetime | None = None
    item: Any = field(default=None, compare=False, repr=False)  # the posted object

    def raw_text(self) -> str:
        return self.raw if self.raw or self.item is None else _raw_json(self.item)


@dataclass(slots=True)
class Rejected:
    """Input that looks like a sample (or a report) but breaks a rule: quarantined verbatim."""

    raw: str
    code: str
    reason: str  # "<code>: <detail>", what the quarantine row says


@dataclass(slots=True)
class CorpusReport:
    corpus: str
    sha256: str  # lower-case hex
    raw: str


@dataclass(slots=True)
class Done:
    """The trainer's final line; its value is reported back, not stored (the last
    ``step=N BPB=...`` line already carries it)."""

    bpb: float
    raw: str


Parsed = Sample | Rejected | CorpusReport | Done | None


def reject(raw: str, code: str, detail: str) -> Rejected:
    return Rejected(raw, code, f"{code}: {detail}")


def safe_text(text: str) -> str:
    """Text PostgreSQL can store: NUL and lone surrogates escaped, long text cut with a marker."""
    if len(text) > MAX_RAW:
        text = text[:MAX_RAW] + f"...[{len(text) - MAX_RAW} more chars cut]"
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def _value_reason(raw: str, step: int, bpb: float) -> Rejected | None:
    why = check_sample(step, bpb)
    if why is None:
        return None
    return reject(raw, STEP_VALUE if "step" in why else BPB_VALUE, why)


def parse_line(line: str) -> Parsed:
    """One line of trainer output; None for ordinary log output."""
    m = _FAST.fullmatch(line)
    if m is not None:
        step = int(m.group(1))
        if step <= MAX_STEP:
            return Sample(step, float(m.group(2)), line)
    if _LOOKS_LIKE_BPB.search(line) is None:
        if "sha256=" in line and "corpus=" in line:
            return _parse_corpus(line)
        return None
    stripped = line.strip()
    if stripped.startswith("DONE:"):
        return _parse_done(line, stripped)
    return _parse_sample(line)


def _tokens(line: str, key: str) -> list[str]:
    """Values of the space- or tab-separated ``key=value`` tokens with exactly this key."""
    prefix = key + "="
    return [t[len(prefix) :] for t in re.split(r"[ \t]+", line) if t.startswith(prefix)]


def _parse_sample(line: str) -> Sample | Rejected:
    bad_sep = _BAD_SEPARATOR.search(line)
    if bad_sep is not None:
        return reject(
            line, SEPARATOR, f"{bad_sep.group()!r} in a sample line; tokens are separated by "
            "spaces or tabs only"
        )
    keys = [k.lower() for k in _KEY.findall(line)]
    for key, label in (("bpb", "BPB"), ("step", "step")):
        if keys.count(key) > 1:
            return reject(line, DUPLICATE_TOKEN, f"{keys.count(key)} {label} tokens in one line")
    bpbs = _tokens(line, "BPB")
    if not bpbs:
        found = _LOOKS_LIKE_BPB.search(line)
        assert found is not None
        near = line[found.start() : found.start() + 24].split()[0] if line else ""
        return reject(line, BPB_FORMAT, f"no BPB= token (L-R8 ^BPB=\\d\\.\\d{{4}}$); saw {near!r}")
    if len(bpbs) > 1:
        return reject(line, DUPLICATE_TOKEN, f"{len(bpbs)} BPB tokens in one line")
    value = bpbs[0]
    if L_R8.fullmatch(value) is None:
        return reject(line, BPB_FORMAT, f"BPB={value} does not match L-R8 ^BPB=\\d\\.\\d{{4}}$")
    steps = _tokens(line, "step")
    if not steps:
        return reject(line, MISSING_STEP, "a BPB token without a step=N token")
    if len(steps) > 1:
        return reject(line, DUPLICATE_TOKEN, f"{len(steps)} step tokens in one line")
    step_text = steps[0]
    if len(step_text) > 12 or _STEP_VALUE.fullmatch(step_text) is None:
        return reject(line, STEP_FORMAT, f"step={step_text[:40]} is not an integer")
    step = int(step_text)
    bpb = float(value)
    bad = _value_reason(line, step, bpb)
    if bad is not None:
        return bad
    if step > MAX_STEP:
        return reject(line, STEP_RANGE, f"step {step} above {MAX_STEP}")
    return Sample(step, bpb, line)


def _parse_done(line: str, stripped: str) -> Done | Rejected:
    m = _DONE.fullmatch(stripped)
    rest = m.group(1) if m else ""
    if not rest.startswith("bpb=") or L_R8.fullmatch(rest[4:]) is None:
        return reject(line, DONE_FORMAT, "the final line must be DONE: bpb=X.XXXX (L-R8)")
    bpb = float(rest[4:])
    bad = _value_reason(line, 0, bpb)
    return bad if bad is not None else Done(bpb, line)


def _parse_corpus(line: str) -> CorpusReport | Rejected:
    corpora, hashes = _tokens(line, "corpus"), _tokens(line, "sha256")
    if len(corpora) != 1 or len(hashes) != 1:
        return reject(line, CORPUS_FORMAT, "a corpus report is one corpus=NAME and one sha256=HEX")
    name, digest = corpora[0], hashes[0]
    if not name:
        return reject(line, CORPUS_FORMAT, "empty corpus name")
    if _SHA256.fullmatch(digest) is None:
        return reject(line, CORPUS_FORMAT, "sha256 must be 64 hex digits")
    return CorpusReport(name, digest.lower(), line)


def parse_lines(lines: list[str]) -> list[Parsed]:
    """``parse_line`` over many lines; the hot path of the log tails."""
    fast = _FAST.fullmatch
    out: list[Parsed] = []
    append = out.append
    for line in lines:
        m = fast(line)
        if m is not None:
            step, bpb = m.groups()
            if len(step) < 10:  # below 10 digits it fits an integer
                append(Sample(int(step), float(bpb), line))
                continue
        append(parse_line(line))
    return out


# --- structured samples (posted as JSON) ------------------------------------------------


def parse_structured(item: Any) -> tuple[str | None, Sample | Rejected]:
    """One posted ``{"canon_name", "step", "bpb", "ts"?}`` object: the canon name (when there is
    one) and the sample or its rejection.

    ``bpb`` may be a JSON number or a string. A string must match L-R8 exactly, like a log
    token. A number has lost its trailing zeros, so L-R8 is applied as: finite, within
    [0, 10), and at most four decimals; it is stored rounded to four decimals.
    ``ts`` is optional: ISO 8601 (a naive time is UTC) or seconds since the epoch.
    """

    if type(item) is dict and len(item) == 3:  # the common shape, checked in a few steps
        name, step, value = item.get("canon_name"), item.get("step"), item.get("bpb")
        if (
            type(name) is str
            and name
            and type(step) is int
            and 0 <= step <= MAX_STEP
            and type(value) is float
            and 0.0 <= value < MAX_BPB
        ):
            if round(value, 4) == value and check_sample(step, value) is None:
                return name, Sample(step, value, "", None, item)

    def bad(code: str, detail: str) -> Rejected:
        return reject(_raw_json(item), code, detail)

    if not isinstance(item, dict):
        return None, bad(BAD_ITEM, "a sample must be a JSON object")
    name = item.get("canon_name")
    if not isinstance(name, str) or not name:
        return None, bad(BAD_ITEM, "canon_name must be a non-empty string")
    extra = set(item) - {"canon_name", "step", "bpb", "ts"}
    if extra:
        return name, bad(BAD_ITEM, f"unknown fields {sorted(extra)}")
    step = item.get("step")
    if isinstance(step, bool) or not isinstance(step, int):
        return name, bad(STEP_FORMAT, f"step must be an integer, got {_short(step)}")
    value = item.get("bpb")
    bpb: float
    if isinstance(value, str):
        if L_R8.fullmatch(value) is None:
            return name, bad(BPB_FORMAT, f"BPB={value[:40]} does not match L-R8")
        bpb = float(value)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        bpb = float(value)
        if math.isfinite(bpb) and bpb >= 0:
            if bpb >= MAX_BPB:
                return name, bad(BPB_RANGE, f"BPB {bpb} not below {MAX_BPB:g} (L-R8)")
            # Exactly four decimals or fewer: 2.000001 or a denormal such as 5e-324 is refused,
            # never rounded (5e-324 rounded is 0.0, which would fire the leak tripwire).
            if round(bpb, 4) != bpb:
                return name, bad(BPB_PRECISION, f"BPB {bpb!r} has more than 4 decimals")
    else:
        return name, bad(BPB_FORMAT, f"bpb must be a number or string, got {_short(value)}")
    why = check_sample(step, bpb)
    if why is not None:
        return name, bad(STEP_VALUE if "step" in why else BPB_VALUE, why)
    if step > MAX_STEP:
        return name, bad(STEP_RANGE, f"step {step} above {MAX_STEP}")
    ts_value = item.get("ts")
    ts: datetime | None = None
    if ts_value is not None:
        ts = _parse_ts(ts_value)
        if ts is None:
            return name, bad(
                TS_FORMAT,
                f"ts {_short(ts_value)} is not an ISO 8601 time or epoch seconds within "
                "the years 1..9999 in UTC",
            )
    return name, Sample(step, bpb, "", ts, item)


def _parse_ts(value: Any) -> datetime | None:
    try:
        if isinstance(value, bool):
            return None
        if isinstance(value, (int, float)):
            if not math.isfinite(value):
                return None
            return datetime.fromtimestamp(value, UTC)
        if isinstance(value, str):
            ts = datetime.fromisoformat(value)
            # In UTC now, as the database stores it: 0001-01-01T00:00:00+14:00 has no UTC time
            # in Python's range, and must be refused here rather than fail a whole batch.
            return ts.astimezone(UTC) if ts.tzinfo is not None else ts.replace(tzinfo=UTC)
    except (ValueError, OverflowError, OSError):
        return None
    return None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _raw_json(item: Any) -> str:
    try:
        return json.dumps(item, sort_keys=True, allow_nan=True, default=str)
    except (TypeError, ValueError):
        return repr(item)
