"""One figure: a metric against NFE (network evaluations per sample), one line per solver, written as a PNG.

Used by the quickstart (normalized score vs NFE, the dataset's average as a reference line) and toy2d
(sliced Wasserstein distance vs NFE). matplotlib is imported here only, with the Agg backend (no display).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path


def metric_vs_nfe(rows: Sequence[dict], path: str | os.PathLike, *, metric: str, ylabel: str, title: str,
                  se: str | None = None, reference: float | None = None, reference_label: str = "",
                  logy: bool = False) -> Path:
    """Plot `rows` (dicts with solver, nfe, `metric`, optionally `se`) as `metric` against NFE (log x), one line
    per solver, plus a dashed horizontal `reference` line; rows without a finite value are left out.
    Writes `path` (PNG) and returns it."""
    import math

    from matplotlib.figure import Figure  # no pyplot: no global state, no display backend needed

    fig = Figure(figsize=(7.5, 4.5))
    ax = fig.subplots()
    for solver in dict.fromkeys(r["solver"] for r in rows):
        points = sorted((r["nfe"], r[metric], (r.get(se) or 0.0) if se else 0.0) for r in rows
                        if r["solver"] == solver and r.get("nfe") and r.get(metric) is not None
                        and math.isfinite(r[metric]))
        if points:
            x, y, err = zip(*points)
            ax.errorbar(x, y, yerr=err if se else None, marker="o", markersize=3, capsize=2, linewidth=1,
                        label=solver)
    if reference is not None:
        ax.axhline(reference, color="black", linestyle="--", linewidth=1.2, label=reference_label or None)
    ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("NFE (network evaluations per sample, log scale)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
