"""Short service names: Railway allows 32 characters, canon names are longer.

``service_name(canon)`` is ``gd-<readable>-<hash>``: a lowercase readable part (model, format,
tags, seed, cut to fit) and the first 12 hex digits of the SHA-256 of the full canon name, which
is what makes it collision-free (48 bits). The name is deterministic, so looking a service up
by name before creating it works across restarts; the full canon name lives in the service's
``GARDENER_CANON_NAME`` variable (and in the ledger).
"""

from __future__ import annotations

import hashlib
import re

MAX_LEN = 32
PREFIX = "gd-"
HASH_LEN = 12
_NAME_RE = re.compile(rf"^{PREFIX}[a-z0-9-]*-[0-9a-f]{{{HASH_LEN}}}$")
_SEED_RE = re.compile(r"-seed(\d+)$")


def name_hash(canon_name: str) -> str:
    return hashlib.sha256(canon_name.encode()).hexdigest()[:HASH_LEN]


def service_name(canon_name: str) -> str:
    """The deterministic short service name for a canon name (at most 32 characters)."""
    room = MAX_LEN - len(PREFIX) - 1 - HASH_LEN
    text = canon_name.strip()
    text = text[5:] if text.upper().startswith("IGLA-") else text
    seed = ""
    m = _SEED_RE.search(text)
    if m:
        seed, text = f"-s{m.group(1)}", text[: m.start()]
    text = re.sub(r"[^a-z0-9-]", "", text.lower().replace("_", ""))
    head = text[: max(0, room - len(seed))].strip("-")
    readable = (head + seed).strip("-")[:room].strip("-") or "trial"
    return f"{PREFIX}{readable}-{name_hash(canon_name)}"


def is_gardener_name(name: str) -> bool:
    """Whether a service name has the shape of ours (ownership is then checked by variable)."""
    return len(name) <= MAX_LEN and bool(_NAME_RE.match(name))


def matches(name: str, canon_name: str) -> bool:
    """Whether ``name`` is the service name of ``canon_name``."""
    return name == service_name(canon_name)
