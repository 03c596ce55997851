"""The demo: what polymerge is for, on the cls zoo, as one table and one picture.

It builds (or reuses) the cls zoo, merges it three ways with the settings the papers recommend
(task arithmetic, TIES, DARE), builds three expert stores with their defaults (channel, twin,
EMR) and trains their routers on the suite's validation queries, scores everything on the test
sets with each task's own head, and prints the table next to the base and the ensemble, then
writes the score-against-size picture. A store is scored twice: with each request naming its
expert (what a client does with the server's ``model`` field) and routed by its router, whose
mistakes cost what the gap between the two rows shows. The work is cells of
:mod:`polymerge.zoo.sweep`, so a second run reuses every row (``fresh=True`` recomputes).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from polymerge.zoo.evaluate import cross_task_table, fmt, primary, text_table
from polymerge.zoo.suite import Suite
from polymerge.zoo.sweep import (
    ORACLE,
    ROUTER,
    Cell,
    normalized_of,
    reference_map_rows,
    run_cells,
)

DEMO_METHODS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    # (registry name, label, parameters): lambda 0.3 as in Twin-Merging's task arithmetic,
    # TIES keeping the top 20% of each task vector (its paper's default), DARE dropping 90%.
    ("task_arithmetic", "task arithmetic (lambda=0.3)", {"lambda": 0.3}),
    ("ties", "TIES (density=0.2, lambda=1)", {"density": 0.2, "lambda": 1.0}),
    ("dare_ties", "DARE-TIES (density=0.1, lambda=1)", {"density": 0.1, "lambda": 1.0}),
)
DEMO_STORES: tuple[tuple[str, str, str, dict[str, Any]], ...] = (
    # (store method, label, family, parameters): each with its defaults
    ("channel", "channel store (K = N/2)", "channel", {}),
    ("twin", "twin store (rank 0.1)", "twin", {}),
    ("emr", "EMR store", "emr", {}),
)


def demo_cells(suite: Suite) -> list[Cell]:
    """The demo's merges and stores as sweep cells (a method the registry lacks is noted)."""
    from polymerge.errors import RecipeError
    from polymerge.registry import get_tensor_method as get_method
    from polymerge.zoo.report import plan_method
    from polymerge.zoo.stores import store_recipe

    cells = []
    for name, label, params in DEMO_METHODS:
        try:
            method = get_method(name)
        except RecipeError as exc:
            cells.append(Cell(label, "static", label, None, note=f"not available: {exc}"))
            continue
        plan = plan_method(method, suite, params, label=label)
        cells.append(Cell(label, "static", label.split(" (")[0], plan.recipe, note=plan.note))
    for method, label, family, params in DEMO_STORES:
        cells.append(Cell(label, family, label, store_recipe(suite, method, **params),
                          (ORACLE, ROUTER)))
    return cells


def run_demo(suite: Suite, *, out: Path | None = None, progress: bool = True,
             echo: Any = print, fresh: bool = False) -> dict[str, Any]:
    """Everything the ``polymerge demo`` command does; returns the rows and the plot path."""
    from polymerge.zoo.evaluate import reference_rows
    from polymerge.zoo.plot import score_size_map

    start = time.time()
    echo(f"polymerge demo: {suite.description}")
    echo(f"zoo cache: {suite.root}")
    report = suite.build(progress=progress)
    if report.built:
        echo(f"built {len(report.built)} expert(s) in {report.seconds:.0f} s: "
             f"{', '.join(report.built)}")
    else:
        echo(f"reusing the {len(report.reused)} experts already built")
    refs = reference_rows(suite, progress=progress)
    root = suite.root / "sweep"
    rows = run_cells(suite, demo_cells(suite), root=root, keep=True, fresh=fresh,
                     progress=progress)
    base, ensemble = reference_map_rows(suite, refs)
    header = ["model", *suite.tasks, "normalized", "size vs ensemble", "seconds"]
    table = []
    for r in [base, *rows, ensemble]:
        p = primary(suite, r.scores)
        norm = normalized_of(suite, r, refs["ensemble"])
        name = r.name.replace(f" ({ROUTER})", ", routed").replace(f" ({ORACLE})",
                                                                   ", expert named")
        table.append([name, *[fmt(suite, suite.primary, p.get(t)) for t in suite.tasks],
                      "–" if not math.isfinite(norm) else f"{norm:.1f}",
                      "–" if r.params_ratio is None else f"{r.params_ratio:.2f}",
                      "–" if r.build_seconds is None else f"{r.build_seconds:.0f}"])
    echo("")
    echo(f"Test {suite.primary} (%) with each task's own head; normalized = score / own "
         "expert x 100, averaged over tasks; size = bytes stored / the ensemble's (N "
         "experts); a store either answers each request with the expert it names (as a "
         "client names it in the server's `model` field) or routes it with its trained "
         "router:")
    echo(text_table(header, table))
    echo("")
    echo("Each expert on every task (the diagonal is the ensemble):")
    echo(cross_task_table(suite, refs, markdown=False))
    for r in rows:
        if r.note:
            echo(f"  {r.name}: {r.note}")
    png = Path(out) if out else suite.root / "demo" / f"demo-{suite.name}.png"
    score_size_map(suite, rows, base, ensemble, refs["ensemble"], png,
                   f"{suite.name} suite: normalized score against stored size")
    echo("")
    echo(f"plot written to {png}")
    echo(f"merged checkpoints and stores in {root / 'artifacts'}")
    echo(f"done in {time.time() - start:.0f} s")
    return {"rows": rows, "reference": refs, "plot": png}
