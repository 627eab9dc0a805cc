"""The corpus: bytes to train on, their sha256, and a deterministic validation split.

By default the corpus is the Python standard library's own top-level ``*.py`` files (always
present, no download), sorted by name and capped at ``DEFAULT_CAP`` bytes so start-up stays
fast. A file or a folder (all regular files below it, sorted by relative path, hidden ones
skipped) can be given instead. The sha256 covers exactly the bytes used, so the gardener can
compare what a trainer reports with the corpus it was configured with: see ``describe``.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

DEFAULT_CAP = 4_000_000  # bytes
BLOCK = 16_384  # validation takes every VAL_EVERY-th block of this many bytes
VAL_EVERY = 10
STDLIB = "stdlib"


@dataclass(frozen=True)
class Corpus:
    name: str
    data: bytes
    sha256: str

    def header(self) -> str:
        """The first line a trainer prints: the gardener's corpus tripwire reads it."""
        return f"corpus={self.name} sha256={self.sha256}"


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.glob("*.py") if p.is_file())


def _folder_files(root: Path) -> list[Path]:
    files = [p for p in root.rglob("*") if p.is_file()
             and not any(part.startswith(".") for part in p.relative_to(root).parts)]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _read_capped(files: list[Path], cap: int) -> bytes:
    chunks: list[bytes] = []
    total = 0
    for path in files:
        if total >= cap:
            break
        with path.open("rb") as fh:
            chunk = fh.read(cap - total)
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


def load_corpus(spec: str | None = None, cap: int = DEFAULT_CAP) -> Corpus:
    """Load ``spec`` (None, "" or "stdlib" for the default; else a file or a folder)."""
    if not spec or spec == STDLIB:
        name, files = STDLIB, _stdlib_files()
    else:
        path = Path(spec).expanduser()
        if path.is_file():
            files = [path]
        elif path.is_dir():
            files = _folder_files(path)
        else:
            raise FileNotFoundError(f"corpus {spec!r} is neither a file nor a folder")
        name = path.resolve().name or str(path)
    data = _read_capped(files, cap)
    if len(data) < 4 * BLOCK:
        raise ValueError(f"corpus {name!r} has {len(data)} bytes; need at least {4 * BLOCK}")
    return Corpus(name=name, data=data, sha256=hashlib.sha256(data).hexdigest())


def describe(spec: str | None = None, cap: int = DEFAULT_CAP) -> tuple[str, str]:
    """(name, sha256) a trainer given ``spec`` will report: what the tripwire compares with."""
    c = load_corpus(spec, cap)
    return c.name, c.sha256


def split(corpus: Corpus) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
    """(train, validation) bytes: every 10th 16 KiB block is held out for validation."""
    arr = np.frombuffer(corpus.data, dtype=np.uint8)
    n_blocks = -(-arr.size // BLOCK)
    held = np.zeros(arr.size, dtype=bool)
    for b in range(VAL_EVERY - 1, n_blocks, VAL_EVERY):
        held[b * BLOCK : (b + 1) * BLOCK] = True
    return arr[~held].copy(), arr[held].copy()


def windows(
    stream: npt.NDArray[np.uint8], starts: npt.NDArray[np.int64], context: int
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]:
    """Contexts ``stream[s : s + context]`` and next bytes ``stream[s + context]``."""
    idx = starts[:, None] + np.arange(context + 1)
    w = stream[idx].astype(np.intp)
    return w[:, :context], w[:, context]
