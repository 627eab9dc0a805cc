from __future__ import annotations

import re
from pathlib import Path

import pytest

from gardener.configfiles import config_candidates, read_toml
from gardener.errors import ConfigError


@pytest.mark.parametrize("name", ["models.toml", "railway.toml", "gate0-smoke.toml"])
def test_every_shipped_config_is_found_and_parses(name: str) -> None:
    raw, source = read_toml(name)
    assert raw and source.endswith(name)


def test_missing_and_broken_files_are_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nothing\.toml not found in"):
        read_toml("nothing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[race\nname = 1")
    with pytest.raises(ConfigError, match=re.escape(f"cannot read {bad}")):
        read_toml("models.toml", bad)


def test_the_installed_copy_is_looked_at_first() -> None:
    first, second = config_candidates("models.toml")
    assert first.parent.name == "_configs" and second.parent.name == "configs"
