"""Bar charts of suite results, written as PNG with matplotlib's non-interactive backend."""

from __future__ import annotations

import math
from pathlib import Path

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
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
