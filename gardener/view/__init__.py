"""The race view: a read-only page and JSON API over the ledger, served by the daemon.

``routes(pool, settings, stop=...)`` gives the Starlette routes (``gardener/view/http.py``);
the reads and their caches are in ``data.py``; the fits, bands and ranks the page draws are
computed, pure, in ``curves.py``; the page itself is ``static/``. See docs/view.md.
"""

from __future__ import annotations

from gardener.view.http import routes

__all__ = ["page_address", "routes"]


def page_address(host: str, port: int, race: str | None = None) -> str:
    """The address a person opens: loopback for a wildcard bind, the race preselected."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
    if ":" in shown:
        shown = f"[{shown}]"
    return f"http://{shown}:{port}/" + (f"#race={race}" if race else "")
