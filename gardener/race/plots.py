"""PNG plots of a race from plain data: every curve, and each curve's power-law fit at each rung.

Matplotlib with the Agg backend (no display); the fits are ``gardener.core.fit`` on the prefix
of the curve up to each rung boundary, drawn out to the horizon with the 95% prediction band,
so a reader sees what the gardener could have predicted at that rung. Prune and mirror points
are marked where the decision was taken.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np

from gardener.core import fit as fitmod
from gardener.core.types import FloatArray, IntArray

MARKERS = {"prune": ("X", "tab:red"), "mirror": ("^", "tab:green"), "promote": ("*", "gold")}


@dataclass(frozen=True)
class Curve:
    steps: IntArray
    bpb: FloatArray


@dataclass(frozen=True)
class Mark:
    """A decision drawn on a curve: ``action`` at ``step`` of ``canon_name``."""

    canon_name: str
    action: str
    step: int


def value_at(curve: Curve, step: int) -> float | None:
    """The curve's value at the first sample at or after ``step`` (its last one if none)."""
    if not len(curve.steps):
        return None
    i = int(np.searchsorted(curve.steps, step, side="left"))
    return float(curve.bpb[min(i, len(curve.bpb) - 1)])


def _group(name: str) -> str:
    return name.rsplit("-seed", 1)[0]


def plot_curves(
    curves: Mapping[str, Curve], marks: Sequence[Mark], out: Path, *, title: str
) -> Path:
    """Every curve of the race on one axes, one colour per variant, decisions marked."""
    groups = sorted({_group(n) for n in curves})
    cmap = plt.get_cmap("tab10")
    colour = {g: cmap(i % 10) for i, g in enumerate(groups)}
    fig, ax = plt.subplots(figsize=(11, 6.5))
    for name in sorted(curves):
        c = curves[name]
        label = _group(name).replace("IGLA-", "") if name == min(
            n for n in curves if _group(n) == _group(name)) else None
        ax.plot(c.steps, c.bpb, lw=1.1, alpha=0.85, color=colour[_group(name)], label=label)
    _draw_marks(ax, curves, marks)
    ax.set_xlabel("step")
    ax.set_ylabel("validation BPB")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    _clip_y(ax, curves)
    ax.legend(fontsize=8, ncol=2, loc="upper right")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _clip_y(ax: plt.Axes, curves: Mapping[str, Curve]) -> None:
    """Leave out the first steep points so the differences between runs are visible."""
    tails = [c.bpb[len(c.bpb) // 10:] for c in curves.values() if len(c.bpb) > 3]
    if tails:
        allv = np.concatenate(tails)
        lo, hi = float(np.min(allv)), float(np.percentile(allv, 99))
        pad = 0.05 * (hi - lo or 1.0)
        ax.set_ylim(lo - pad, hi + pad)


def _draw_marks(ax: plt.Axes, curves: Mapping[str, Curve], marks: Sequence[Mark]) -> None:
    seen: set[str] = set()
    for m in marks:
        style = MARKERS.get(m.action)
        c = curves.get(m.canon_name)
        if style is None or c is None:
            continue
        y = value_at(c, m.step)
        if y is None:
            continue
        ax.scatter([m.step], [y], marker=style[0], s=70, color=style[1], zorder=5,
                   edgecolor="black", linewidth=0.5,
                   label=m.action if m.action not in seen else None)
        seen.add(m.action)


def plot_fits(
    curves: Mapping[str, Curve],
    rungs: Sequence[int],
    horizon: int,
    marks: Sequence[Mark],
    out: Path,
    *,
    title: str,
    columns: int = 3,
) -> tuple[Path, dict[str, dict[int, fitmod.Prediction]]]:
    """One panel per trial: samples, and at each rung the fit on the samples so far, drawn to
    the horizon with its 95% prediction band. Returns the predictions at the horizon."""
    names = sorted(curves)
    rows = max(1, math.ceil(len(names) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 2.6 * rows), squeeze=False)
    colours = plt.get_cmap("viridis")
    predictions: dict[str, dict[int, fitmod.Prediction]] = {}
    for k, name in enumerate(names):
        ax = axes[k // columns][k % columns]
        c = curves[name]
        ax.plot(c.steps, c.bpb, ".", ms=2.5, color="black", label="samples")
        predictions[name] = {}
        reached = [r for r in rungs if len(c.steps) and c.steps[-1] >= r]
        for j, r in enumerate(reached):
            keep = c.steps <= r
            f = fitmod.fit_power_law(c.steps[keep], c.bpb[keep])
            if not f.ok:
                continue
            grid = np.unique(np.geomspace(max(1, int(c.steps[0])), max(horizon, r), 40).round())
            preds = [f.predict(float(t)) for t in grid]
            col = colours(0.15 + 0.7 * j / max(1, len(reached) - 1))
            ax.plot(grid, [p.mean for p in preds], lw=1.2, color=col, label=f"fit at {r}")
            ax.fill_between(grid, [p.pi.low for p in preds], [p.pi.high for p in preds],
                            color=col, alpha=0.18, lw=0)
            ax.axvline(r, color=col, lw=0.6, ls=":")
            predictions[name][r] = f.predict(float(horizon))
        _draw_marks(ax, {name: c}, [m for m in marks if m.canon_name == name])
        ax.set_title(name.replace("IGLA-", ""), fontsize=8)
        ax.tick_params(labelsize=7)
        tail = c.bpb[len(c.bpb) // 10:] if len(c.bpb) > 3 else c.bpb
        if len(tail):
            lo, hi = float(np.min(tail)), float(np.max(tail))
            ax.set_ylim(lo - 0.1 * (hi - lo or 1), hi + 0.1 * (hi - lo or 1))
        ax.grid(alpha=0.3)
        if k == 0:
            ax.legend(fontsize=6)
    for k in range(len(names), rows * columns):
        axes[k // columns][k % columns].axis("off")
    fig.suptitle(title + " (band: 95% prediction interval)", fontsize=10)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out, predictions
