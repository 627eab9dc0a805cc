"""The repository stands alone: no tracked file names a path on one machine or a folder
outside the checkout, so a fresh clone anywhere has everything its code, tests, benchmarks
and docs refer to."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Home and work folders of a machine, and any relative path that climbs out of the checkout
# into a sibling folder (two dots, a slash, a name, a slash). System paths every machine
# has (/usr/bin, /proc, /etc/postgresql, /tmp) are not machine-specific and stay allowed.
FORBIDDEN = re.compile(
    r"(?<![\w.~-])/(?:work|root|home|Users|mnt|srv|opt)/[\w.-]+"
    r"|(?<![\w.])\.\./[\w-]+/"
)


def _path(*parts: str) -> str:
    return "/".join(parts)


def machine_paths(text: str) -> list[str]:
    """What in ``text`` names a machine-specific path or a folder outside the repository."""
    return [m.group(0) for m in FORBIDDEN.finditer(text)]


def _tracked_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                             check=True, timeout=30).stdout
    except (OSError, subprocess.CalledProcessError):  # an unpacked sdist: every file counts
        return [p for p in ROOT.rglob("*") if p.is_file() and ".venv" not in p.parts
                and ".git" not in p.parts]
    return [ROOT / name for name in out.decode().split("\0") if name]


def test_no_tracked_file_names_a_machine_path() -> None:
    found = {}
    files = _tracked_files()
    assert len(files) > 50  # the scan really sees the repository
    for path in files:
        if not path.exists() or path == Path(__file__).resolve():  # deleted; or this file's
            continue  # own examples of what the check catches
        data = path.read_bytes()
        if b"\0" in data[:4096]:  # binary (images, gzipped curves)
            continue
        hits = machine_paths(data.decode("utf-8", errors="replace"))
        if hits:
            found[str(path.relative_to(ROOT))] = sorted(set(hits))
    assert found == {}, f"machine-specific paths in tracked files: {found}"


@pytest.mark.parametrize(
    "text",
    [
        # Built from parts, so that this file names no such path itself.
        f'SCHEMA = Path("{_path("", "work", "elsewhere", "schema.graphql")}")',
        f"see {_path('..', 'elsewhere', 'curves.csv')}",
        f"python {_path('', 'root', 'project', 'bench', 'x.py')}",
        f"open('{_path('', 'home', 'alice', 'data.csv')}')",
    ],
)
def test_the_check_catches_a_machine_path(text: str) -> None:
    assert machine_paths(text)


@pytest.mark.parametrize(
    "text",
    [
        "/usr/bin/chromium --headless",
        "read /proc/<pid>/environ",
        "pg_ctlcluster $(ls /etc/postgresql) main start",
        "bench/data/igla_trios_results.csv",
        "https://backboard.railway.com/graphql/v2",
        "./.gardener/pgdata",
        "--json > /tmp/backtest.json",
    ],
)
def test_the_check_allows_what_every_machine_has(text: str) -> None:
    assert machine_paths(text) == []


PARENTS = re.compile(r"\.parents\[(\d+)\]")


def climbs_out(relative: Path, text: str) -> list[str]:
    """``Path(__file__).parents[k]`` in the file at ``relative`` (from the repository's
    root) that reaches above the root: ``parents[len(relative.parts) - 1]`` is the root."""
    return [m.group(0) for m in PARENTS.finditer(text)
            if int(m.group(1)) >= len(relative.parts)]


def test_no_python_file_climbs_out_of_the_repository() -> None:
    found = {}
    for path in _tracked_files():
        if path.suffix != ".py" or not path.exists() or path == Path(__file__).resolve():
            continue
        rel = path.relative_to(ROOT)
        hits = climbs_out(rel, path.read_text(encoding="utf-8", errors="replace"))
        if hits:
            found[str(rel)] = hits
    assert found == {}, f"paths above the repository: {found}"


def test_the_climb_check_knows_where_the_root_is() -> None:
    here = Path("tests/unit/test_x.py")
    assert climbs_out(here, 'Path(__file__).resolve().parents[3] / "x"') == [".parents[3]"]
    assert climbs_out(here, "Path(__file__).resolve().parents[2]") == []
