"""Bar charts of suite results, written as PNG with matplotlib's non-interactive backend."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from polymerge.errors import PolymergeError
from polymerge.io.checkpoint import first_line
from polymerge.zoo.evaluate import Row, primary, summary
from polymerge.zoo.suite import Scores, Suite


def bar_chart(suite: Suite, rows: list[Row], ensemble: Scores, out: Path, title: str) -> Path:
    """Grouped bars: the primary score per task for each row, plus the normalized mean.

    Left panel: per-task scores (one colour per row). Right panel: each row's normalized mean
    (100 = every task as good as its own expert).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.scores]
    metric = suite.metric(suite.primary)
    tasks = list(suite.tasks)
    fig, (ax, ax2) = plt.subplots(
        1, 2, figsize=(max(9.0, 1.6 * len(tasks) + 5), 4.8),
        gridspec_kw={"width_ratios": [max(3, len(tasks)), 1.6]})
    width = 0.8 / max(1, len(rows))
    cmap = plt.get_cmap("tab20" if len(rows) > 10 else "tab10")
    for i, r in enumerate(rows):
        p = primary(suite, r.scores)
        xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(tasks))]
        ys = [p.get(t, float("nan")) * metric.scale for t in tasks]
        ax.bar(xs, [0 if not math.isfinite(y) else y for y in ys], width, label=r.name,
               color=cmap(i % cmap.N))
    ax.set_xticks(range(len(tasks)), tasks, rotation=20, ha="right")
    ax.set_ylabel(f"{metric.name}" + (" (%)" if metric.scale == 100 else ""))
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    # No legend here: the right panel names every colour.
    norms = [summary(suite, r.scores, ensemble)["normalized_mean"] for r in rows]
    ax2.barh(range(len(rows)), [0 if not math.isfinite(v) else v for v in norms],
             color=[cmap(i % cmap.N) for i in range(len(rows))])
    ax2.set_yticks(range(len(rows)), [r.name for r in rows], fontsize=7)
    ax2.invert_yaxis()
    ax2.axvline(100, color="k", lw=0.8, ls="--")
    ax2.set_xlabel("normalized mean (expert = 100)")
    for i, v in enumerate(norms):
        if math.isfinite(v):
            ax2.text(v, i, f" {v:.0f}", va="center", fontsize=7)
    fig.tight_layout()
    out = Path(out)
    save_figure(fig, out)
    return out


def save_figure(fig: Any, out: Path) -> None:
    """Write a figure to ``out`` (its folder created); a path that cannot be written is one
    line. The figure is closed either way."""
    import matplotlib.pyplot as plt

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=120)
    except (OSError, ValueError) as exc:  # ValueError: a suffix matplotlib cannot write
        raise PolymergeError(f"cannot write the plot {out} ({first_line(exc)})") from None
    finally:
        plt.close(fig)


FAMILY_STYLE: dict[str, tuple[str, str]] = {
    "static": ("o", "tab:gray"),
    "supermerge": ("P", "tab:brown"),
    "channel": ("s", "tab:blue"),
    "twin": ("D", "tab:green"),
    "emr": ("^", "tab:red"),
    "onebit": ("v", "tab:purple"),
}
"""Marker and colour per family of the score-against-size map (others: grey circles)."""


def score_size_map(suite: Suite, rows: list[Row], base: Row, ensemble: Row, ensemble_scores: Scores,
                   out: Path, title: str) -> Path:
    """Normalized score against stored size relative to the ensemble: one marker per method and
    setting (filled: oracle routing or a checkpoint; hollow: the store's router), the Pareto
    front as a dashed staircase, the base and the ensemble as black reference points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from polymerge.zoo.sweep import pareto_front

    def norm(r: Row) -> float:
        return summary(suite, r.scores, ensemble_scores)["normalized_mean"] if r.scores \
            else float("nan")

    shown = [r for r in rows if r.scores and r.params_ratio is not None]
    everything = [base, *shown, ensemble]
    points = [(float(r.params_ratio or math.nan), norm(r)) for r in everything]
    fig, ax = plt.subplots(figsize=(10.5, 6.5))
    seen: set[str] = set()
    for r, (x, y) in zip(everything, points, strict=True):
        if not (math.isfinite(x) and math.isfinite(y)):
            continue
        family = r.extra.get("family", "")
        if r in (base, ensemble):
            ax.scatter([x], [y], marker="X" if r is base else "*", s=160, c="k", zorder=4,
                       label=r.name)
            ax.annotate(r.name.split(" (")[0], (x, y), textcoords="offset points",
                        xytext=(6, -10), fontsize=8)
            continue
        marker, colour = FAMILY_STYLE.get(family, ("o", "tab:gray"))
        router = r.extra.get("routing") == "router"
        label = None
        key = f"{family}{' (router)' if router else ''}"
        if key not in seen:
            seen.add(key)
            label = key
        ax.scatter([x], [y], marker=marker, s=55, zorder=3, label=label,
                   facecolors="none" if router else colour, edgecolors=colour, linewidths=1.4)
        setting = r.extra.get("setting") or r.extra.get("cell") or r.name
        ax.annotate(str(setting)[:28], (x, y), textcoords="offset points", xytext=(4, 3),
                    fontsize=6, color=colour)
    front = [points[i] for i in pareto_front(points)]
    if front:
        xs, ys = [], []
        for i, (x, y) in enumerate(front):
            if i:
                xs.append(x)
                ys.append(front[i - 1][1])
            xs.append(x)
            ys.append(y)
        ax.plot(xs, ys, ls="--", c="k", lw=0.9, alpha=0.7, zorder=2, label="Pareto front")
    ax.set_xscale("log")
    ticks = [t for t in (0.1, 0.15, 0.2, 0.3, 0.5, 0.7, 1.0)
             if any(math.isfinite(p[0]) and p[0] <= t * 1.6 and p[0] >= t / 1.6
                    for p in points)]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.set_xlabel("stored size / ensemble's (log scale)")
    ax.set_ylabel("normalized score (own expert = 100)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    out = Path(out)
    save_figure(fig, out)
    return out
