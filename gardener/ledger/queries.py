"""Named SQL queries, kept in ``.sql`` files beside this module under ``-- name: ...`` headers."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

_HEADER = re.compile(r"^--\s*name:\s*(\w+)\s*$", re.M)


@cache
def load(filename: str) -> dict[str, str]:
    """All queries of one file, by name."""
    text = (Path(__file__).parent / "sql" / filename).read_text()
    parts = _HEADER.split(text)
    return {name: sql.strip() for name, sql in zip(parts[1::2], parts[2::2], strict=True)}


class Queries:
    """Attribute access to a file's queries: ``Q.claim_next_exp_id``."""

    def __init__(self, filename: str) -> None:
        self._filename = filename

    def __getattr__(self, name: str) -> str:
        try:
            return load(self._filename)[name]
        except KeyError:
            raise AttributeError(f"no query {name!r} in {self._filename}") from None
