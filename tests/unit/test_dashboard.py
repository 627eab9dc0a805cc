"""deploy/grafana-dashboard.json queries only metrics the daemon really exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import REGISTRY

import gardener.backends.metrics
import gardener.ingest.metrics
import gardener.loop.metrics  # noqa: F401  (registers the loop's metrics)

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana-dashboard.json"
NAME = re.compile(r"\b(gardener_[a-z_]+)\b")


def exported() -> set[str]:
    names: set[str] = set()
    for family in REGISTRY.collect():
        names.update(sample.name for sample in family.samples)
    return names


def test_every_queried_metric_is_exported_and_every_panel_has_a_query() -> None:
    dash = json.loads(DASHBOARD.read_text())
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert panels and all(p["targets"] and all(t["expr"] for t in p["targets"]) for p in panels)
    queried = {m for p in panels for t in p["targets"] for m in NAME.findall(t["expr"])}
    known = exported()
    # Histograms export _bucket, _count and _sum; labelled counters may have no sample yet.
    families = {f.name for f in REGISTRY.collect()}
    missing = sorted(
        m for m in queried
        if m not in known and m.removesuffix("_total") not in families
        and m.removesuffix("_bucket") not in families
    )
    assert missing == [], missing
    for needed in ("gardener_samples_accepted_total", "gardener_samples_rejected_total",
                   "gardener_decisions_total", "gardener_tripwires_total",
                   "gardener_backend_requests_total", "gardener_leader"):
        assert needed in queried, needed
