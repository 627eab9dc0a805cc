"""The shipped configuration files (``configs/*.toml``) and reading them with clear errors.

A wheel carries ``configs/`` as ``gardener/_configs/``; a checkout has it at the top. The
installed copy wins, so an installed gardener never reads a stray file from the working dir.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from gardener.errors import ConfigError

_PACKAGE = Path(__file__).resolve().parent


def config_candidates(filename: str) -> list[Path]:
    """Where a shipped config file is looked for, in order."""
    return [_PACKAGE / "_configs" / filename, _PACKAGE.parent / "configs" / filename]


def read_toml(filename: str, path: str | Path | None = None) -> tuple[dict[str, Any], str]:
    """The parsed TOML of ``path`` (else the shipped ``filename``) and where it came from."""
    if path is None:
        path = next((p for p in config_candidates(filename) if p.is_file()), None)
        if path is None:
            where = ", ".join(map(str, config_candidates(filename)))
            raise ConfigError(f"{filename} not found in {where}")
    path = Path(path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8")), str(path)
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
