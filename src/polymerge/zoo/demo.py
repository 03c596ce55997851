"""The demo: build (or reuse) the cls zoo, merge it three ways, and show what each keeps.

It runs task arithmetic, TIES and DARE with the settings their papers recommend (printed with
the table), evaluates them with each task's own head, and prints them next to the base, each
expert and the ensemble, plus where the bar chart was written.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from polymerge.zoo.evaluate import comparison_rows, cross_task_table, text_table
from polymerge.zoo.report import Plan, plan_method, reference_table_rows, run_plans
from polymerge.zoo.suite import Suite

DEMO_METHODS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    # (registry name, label, parameters): lambda 0.3 as in Twin-Merging's task arithmetic,
    # TIES keeping the top 20% of each task vector (its paper's default), DARE dropping 90%.
    ("task_arithmetic", "task arithmetic (lambda=0.3)", {"lambda": 0.3}),
    ("ties", "TIES (density=0.2, lambda=1)", {"density": 0.2, "lambda": 1.0}),
    ("dare_ties", "DARE-TIES (density=0.1, lambda=1)", {"density": 0.1, "lambda": 1.0}),
)


def demo_plans(suite: Suite) -> list[Plan]:
    """The demo's three merges, skipping (with a note) any method the registry lacks."""
    from polymerge.errors import RecipeError
    from polymerge.registry import get_tensor_method as get_method

    plans = []
    for name, label, params in DEMO_METHODS:
        try:
            method = get_method(name)
        except RecipeError as exc:
            plans.append(Plan(label, None, f"not available: {exc}"))
            continue
        plans.append(plan_method(method, suite, params, label=label))
    return plans


def run_demo(suite: Suite, *, out: Path | None = None, progress: bool = True,
             echo: Any = print) -> dict[str, Any]:
    """Everything the ``polymerge demo`` command does; returns the rows and the plot path."""
    from polymerge.zoo.evaluate import reference_rows
    from polymerge.zoo.plot import bar_chart

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
    rows = run_plans(suite, demo_plans(suite), progress=progress)
    base, ensemble = reference_table_rows(suite, refs)
    header, cells = comparison_rows(suite, [base] + rows + [ensemble], refs["ensemble"])
    echo("")
    echo(f"Test {suite.primary} (%) with each task's own head; normalized = score / own "
         "expert x 100, averaged over tasks:")
    echo(text_table(header, cells))
    echo("")
    echo("Each expert on every task (the diagonal is the ensemble):")
    echo(cross_task_table(suite, refs, markdown=False))
    for r in rows:
        if not r.scores:
            echo(f"  {r.name}: {r.note}")
    png = Path(out) if out else suite.root / "demo" / f"demo-{suite.name}.png"
    bar_chart(suite, [base] + rows + [ensemble], refs["ensemble"], png,
              f"{suite.name} suite: merged vs experts (test {suite.primary})")
    echo("")
    echo(f"plot written to {png}")
    echo(f"merged checkpoints in {suite.root / 'merges'}")
    echo(f"done in {time.time() - start:.0f} s")
    return {"rows": rows, "reference": refs, "plot": png}
