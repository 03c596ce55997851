"""Run merge methods over a suite and write the comparison: markdown table and bar chart.

Methods come from the registry (``polymerge.registry.tensor_methods()``), so a method added later
shows up without touching this file. Each runs with its registered defaults; a parameter that
has no default gets the neutral value the zoo knows for it (``weight`` = 1.0 per expert,
``t`` = 0.5) and the table says so; a method that needs something else is listed as not
applicable with the reason.
"""

from __future__ import annotations

import platform
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from polymerge.errors import PolymergeError
from polymerge.zoo.cache import safetensors_numel
from polymerge.zoo.evaluate import (
    Row,
    comparison_rows,
    cross_task_table,
    markdown_table,
    reference_rows,
)
from polymerge.zoo.suite import Suite

FILLED_DEFAULTS: dict[str, Any] = {"weight": 1.0, "t": 0.5}
"""Values the zoo gives to parameters that have no registered default."""
PAPER_SETTINGS: dict[str, tuple[str, dict[str, Any]]] = {
    "task_arithmetic lambda=0.3": ("task_arithmetic", {"lambda": 0.3}),
    "ties density=0.2": ("ties", {"density": 0.2}),
    "ties density=0.7 lambda=0.5": ("ties", {"density": 0.7, "lambda": 0.5}),
    "dare_ties density=0.7 lambda=0.5": ("dare_ties", {"density": 0.7, "lambda": 0.5}),
}
"""The settings the papers use, next to the registered (mergekit) defaults: Twin-Merging's task
arithmetic (lambda 0.3), TIES' top 20%, and Channel Merging's 30% trimmed or dropped with
lambda 0.5 (the same merge as one TIES-CM/DARE-CM group)."""


@dataclass
class Plan:
    """What the report will run for one method: its recipe, or why it cannot run."""

    name: str
    recipe: dict[str, Any] | None
    note: str = ""


def plan_method(method: Any, suite: Suite, overrides: Mapping[str, Any] | None = None,
                label: str | None = None) -> Plan:
    """A mergekit-style recipe for ``method`` over the suite's experts.

    ``overrides`` sets parameters (per-model ones apply to every expert).
    """
    overrides = dict(overrides or {})
    experts = list(suite.tasks)
    notes: list[str] = []
    if method.max_experts is not None and len(experts) > method.max_experts:
        experts = experts[: method.max_experts]
        notes.append(f"first {method.max_experts} expert(s) only: {', '.join(experts)}")
    if len(experts) < method.min_experts:
        return Plan(label or method.name, None,
                    f"not applicable: needs at least {method.min_experts} experts")
    shared: dict[str, Any] = {}
    per_model: dict[str, Any] = {}
    for p in method.params:
        if p.name in overrides:
            value = overrides.pop(p.name)
        elif p.required:
            if p.name not in FILLED_DEFAULTS:
                return Plan(label or method.name, None,
                            f"not applicable: parameter {p.name!r} has no default")
            value = FILLED_DEFAULTS[p.name]
            notes.append(f"{p.name}={value:g}" + (" per expert" if p.scope == "per_model"
                                                  else ""))
        else:
            continue
        (per_model if p.scope == "per_model" else shared)[p.name] = value
    if overrides:
        raise PolymergeError(f"{method.name} has no parameter(s) {sorted(overrides)}")
    recipe = {
        "merge_method": method.name,
        "base_model": str(suite.base_dir),
        "models": [{"model": str(suite.expert_dir(e)), "name": e,
                    "parameters": dict(per_model)} for e in experts],
        "parameters": shared,
        "dtype": "float32",
        "seed": 0,
    }
    if method.base_policy == "input":
        notes.append("experts only (base not an input)")
    return Plan(label or method.name, recipe, "; ".join(notes))


def stored_params_ratio(suite: Suite, folder: Path) -> float:
    """Parameters stored by ``folder`` (plus the experts' private parts, e.g. heads) relative to
    the ensemble (N full experts plus the same private parts)."""
    shared, private = suite.expert_parameters()
    stored = sum(safetensors_numel(f) for f in folder.glob("*.safetensors"))
    ensemble = len(suite.tasks) * shared + private
    return (stored + private) / ensemble if ensemble else float("nan")


def run_plans(suite: Suite, plans: Sequence[Plan], *, progress: bool = True,
              keep: bool = True) -> list[Row]:
    """Merge, time and evaluate each plan; a failing method becomes a row with its reason."""
    from polymerge.stores import is_store
    from polymerge.zoo.sources import run_merge as merge
    from polymerge.zoo.stores import score_store, store_params_ratio

    rows: list[Row] = []
    out_root = suite.root / "merges"
    for plan in tqdm(plans, desc="methods", disable=not progress, dynamic_ncols=True):
        if plan.recipe is None:
            rows.append(Row(plan.name, {}, note=plan.note))
            continue
        out = out_root / re.sub(r"[^A-Za-z0-9_.-]+", "_", plan.name)
        start = time.time()
        try:
            merge(plan.recipe, out, force=True, progress=False)
        except PolymergeError as exc:
            rows.append(Row(plan.name, {}, note=f"failed: {exc}"))
            continue
        seconds = time.time() - start
        if is_store(out):  # experts with task heads: the merge is a store of them
            scores = score_store(suite, out, progress=progress)
            ratio = store_params_ratio(suite, out)
        else:
            scores = suite.evaluate(lambda _t, _o=out: _o, progress=progress)
            ratio = stored_params_ratio(suite, out)
        rows.append(Row(plan.name, scores, note=plan.note, build_seconds=seconds,
                        params_ratio=ratio,
                        extra={"path": str(out), "recipe": plan.recipe}))
        if not keep:
            shutil.rmtree(out, ignore_errors=True)
    return rows


def paper_plans(suite: Suite) -> list[Plan]:
    """Plans for :data:`PAPER_SETTINGS` (the papers' parameters instead of the defaults)."""
    from polymerge.registry import get_tensor_method as get_method

    return [plan_method(get_method(m), suite, params, label=label)
            for label, (m, params) in PAPER_SETTINGS.items()]


def learned_rows(suite: Suite, *, progress: bool = True, keep: bool = True,
                 **overrides: Any) -> list[Row]:
    """Rows for the learned merges (SuperMerge, AdaMerging) the suite defines, each noted with
    its number of coefficients, tuning time and memory; none when tuning is not installed."""
    try:
        from polymerge.zoo.learned import learned_note, learned_recipes
    except ImportError:
        return []
    plans = [Plan(label, recipe) for label, recipe in
             learned_recipes(suite, **overrides).items()]
    rows = run_plans(suite, plans, progress=progress, keep=True)
    for row in rows:
        path = row.extra.get("path")
        if path:
            row.note = learned_note(path)
            if not keep:
                shutil.rmtree(path, ignore_errors=True)
    return rows


def reference_table_rows(suite: Suite, refs: dict[str, Any]) -> tuple[Row, Row]:
    """The base and the ensemble as comparison rows (stored params 1/N and 1)."""
    shared, private = suite.expert_parameters()
    n = len(suite.tasks)
    ens = n * shared + private
    base = Row("base", refs["base"], kind="base",
               params_ratio=(shared + private) / ens if ens else None)
    ensemble = Row("ensemble (own expert per task)", refs["ensemble"], kind="ensemble",
                   params_ratio=1.0)
    return base, ensemble


def machine_line() -> str:
    import os

    import torch

    cpu = platform.processor() or platform.machine()
    return (f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores ({cpu}), "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def render_markdown(suite: Suite, rows: list[Row], refs: dict[str, Any], command: str) -> str:
    """The report: comparison table, notes, cross-task table, and how it was made."""
    base, ensemble = reference_table_rows(suite, refs)
    header, cells = comparison_rows(suite, [base] + rows + [ensemble], refs["ensemble"])
    lines = [
        f"## {suite.name} suite: {suite.description}",
        "",
        f"{time.strftime('%Y-%m-%d')}, {machine_line()}. Command: `{command}`.",
        "",
        f"Scores are test {suite.primary} per task ({_metric_text(suite)}); *normalized* is the "
        "mean over tasks of score / own expert's score x 100; *params vs ensemble* counts the "
        "stored parameters (task heads included) against keeping every expert; *build s* is the "
        "merge's wall time. Methods run with their registered defaults.",
        "",
        markdown_table(header, cells),
        "",
    ]
    notes = [f"- **{r.name}**: {r.note}" for r in rows if r.note]
    if notes:
        lines += ["Notes:", "", *notes, ""]
    lines += ["Each expert on every task (rows: the model; columns: the task and its head):", "",
              cross_task_table(suite, refs), ""]
    return "\n".join(lines)


def _metric_text(suite: Suite) -> str:
    m = suite.metric(suite.primary)
    return ("x100, higher is better" if m.scale == 100 else "lower is better"
            if not m.higher_is_better else "higher is better")


def update_marked_section(path: Path, suite_name: str, content: str) -> None:
    """Replace (or append) the section between this suite's markers in ``path``."""
    start, end = (f"<!-- polymerge-report:{suite_name}:start -->",
                  f"<!-- polymerge-report:{suite_name}:end -->")
    block = f"{start}\n{content.rstrip()}\n{end}"
    try:
        text = path.read_text() if path.exists() else ""
    except (OSError, UnicodeDecodeError) as exc:
        raise PolymergeError(f"cannot read {path} ({exc})") from None
    if start in text and end in text:
        before, rest = text.split(start, 1)
        after = rest.split(end, 1)[1]
        text = before + block + after
    else:
        text = (text.rstrip() + "\n\n" if text.strip() else "") + block + "\n"
    try:
        path.write_text(text)
    except OSError as exc:
        raise PolymergeError(f"cannot write {path} ({exc.strerror or exc})") from None


def store_rows(suite: Suite, *, progress: bool = True, keep: bool = True) -> list[Row]:
    """Rows for the expert stores, when the stores part is installed (else none)."""
    try:
        from polymerge.zoo.stores import REPORT_VARIANTS
        from polymerge.zoo.stores import store_rows as rows_for_stores
    except ImportError:
        return []
    try:
        return list(rows_for_stores(suite, REPORT_VARIANTS, progress=progress, keep=keep))
    except PolymergeError as exc:
        return [Row("expert stores", {}, note=f"failed: {exc}")]


def run_report(suite: Suite, *, methods: Sequence[str] | None = None,
               md_path: Path | None = None, png_path: Path | None = None,
               progress: bool = True, keep: bool = True, command: str = "",
               stores: bool = False, paper: bool = False, learned: bool = False
               ) -> dict[str, Any]:
    """Build (or reuse) the zoo, run the methods (with ``paper``, also at the papers' settings;
    with ``stores``, the expert stores; with ``learned``, the learned merges), write markdown
    and PNG; return the paths, rows and text."""
    from polymerge.registry import get_tensor_method as get_method
    from polymerge.registry import tensor_methods
    from polymerge.zoo.plot import bar_chart

    chosen = [get_method(m) for m in methods] if methods else tensor_methods()  # before work
    suite.build(progress=progress)
    refs = reference_rows(suite, progress=progress)
    plans = [plan_method(m, suite) for m in chosen]
    if paper:
        plans += paper_plans(suite)
    rows = run_plans(suite, plans, progress=progress, keep=keep)
    if learned:
        rows += learned_rows(suite, progress=progress, keep=keep)
    if stores:
        rows += store_rows(suite, progress=progress, keep=keep)
    out_dir = suite.root / "report"
    md_path = Path(md_path) if md_path else out_dir / f"report-{suite.name}.md"
    png_path = Path(png_path) if png_path else md_path.with_suffix(".png")
    text = render_markdown(suite, rows, refs, command or f"polymerge report --suite {suite.name}")
    text += f"\n![{suite.name} results]({png_path.name})\n"
    try:
        md_path.parent.mkdir(parents=True, exist_ok=True)
        md_path.write_text(text)
    except OSError as exc:
        raise PolymergeError(f"cannot write {md_path} ({exc.strerror or exc})") from None
    base, ensemble = reference_table_rows(suite, refs)
    bar_chart(suite, [base] + rows + [ensemble], refs["ensemble"], png_path,
              f"{suite.name} suite: test {suite.primary}")
    return {"markdown": md_path, "plot": png_path, "rows": rows, "reference": refs,
            "text": text}
