"""The layering holds: the decision core imports no database, network or event loop, and
each layer (cli > race > loop > ingest > ledger | backends | trainer > core) only imports
from the layers below it."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_import_contracts_hold() -> None:
    exe = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    result = subprocess.run(
        [exe, "--config", str(ROOT / "pyproject.toml")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    kept = re.search(r"Contracts: (\d+) kept, (\d+) broken", result.stdout)
    assert kept is not None, result.stdout
    assert int(kept.group(1)) >= 2 and int(kept.group(2)) == 0, result.stdout
    assert re.search(r"Layers: .* KEPT", result.stdout.replace("\n", " ")), result.stdout
