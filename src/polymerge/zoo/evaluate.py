"""Scoring anything against a suite: targets, reference rows, normalized scores.

The normalized score of a task is the evaluated model's score divided by the score of that task's
own expert, times 100 (for lower-is-better metrics such as perplexity: expert / model x 100), so
100 means "as good as the specialist" whatever the task's difficulty. Reference rows (the base,
every expert on every task, and the ensemble that picks each task's own expert) are computed once
per suite and cached next to the experts.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from polymerge.errors import CheckpointError, PolymergeError
from polymerge.io.checkpoint import is_lora_adapter, open_checkpoint
from polymerge.zoo.cache import fingerprint, load_json, save_json
from polymerge.zoo.stores import store_target
from polymerge.zoo.suite import Row, Scores, Suite, WeightsFn


def resolve_target(target: str | Path, suite: Suite, *, allow_pickle: bool = False
                   ) -> WeightsFn:
    """Per-task weights for a checkpoint folder (same weights for every task) or a store.

    A checkpoint's weights are first opened with polymerge's reader (files inside the folder,
    headers valid, pickles only with ``allow_pickle``) before transformers or PEFT load them."""
    path = Path(target).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint")
    fn = store_target(path, suite)
    if fn is not None:
        return fn
    check_target(path, suite, allow_pickle=allow_pickle)
    own = getattr(suite, "target_weights", None)
    if own is not None:
        fn = own(path)
        if fn is not None:
            return fn
    if path.is_dir() and (path / "config.json").exists():
        return lambda _task: path
    raise CheckpointError(f"{path}: not a model folder (no config.json) nor a known expert store")


def check_target(path: Path, suite: Suite, *, allow_pickle: bool = False) -> None:
    """A checkpoint target opens with polymerge's reader (a LoRA adapter against the suite's
    base): the files transformers then loads are the ones checked here."""
    if is_lora_adapter(path):
        base = open_checkpoint(suite.base_dir, label="base")
        try:
            open_checkpoint(path, base=base).close()
        finally:
            base.close()
    elif path.is_dir() and (path / "config.json").exists():
        open_checkpoint(path, allow_pickle=allow_pickle).close()


def primary(suite: Suite, scores: Scores) -> dict[str, float]:
    """The suite's primary metric per task."""
    return {t: scores[t][suite.primary] for t in suite.tasks if t in scores}


def normalize_value(value: float, expert: float, higher_is_better: bool) -> float:
    """value / expert x 100, or expert / value x 100 when lower is better; NaN if undefined."""
    num, den = (value, expert) if higher_is_better else (expert, value)
    if not (math.isfinite(num) and math.isfinite(den)) or den == 0:
        return float("nan")
    return num / den * 100.0


def normalized(suite: Suite, scores: Scores, ensemble: Scores, metric: str | None = None
               ) -> dict[str, float]:
    """Normalized score per task against each task's own expert (``ensemble`` scores)."""
    m = suite.metric(metric or suite.primary)
    return {t: normalize_value(scores[t][m.name], ensemble[t][m.name], m.higher_is_better)
            for t in suite.tasks if t in scores and m.name in scores[t]}


def mean(values: dict[str, float] | list[float]) -> float:
    """Mean of the finite values (NaN when there are none)."""
    xs = [v for v in (values.values() if isinstance(values, dict) else values)
          if math.isfinite(v)]
    return sum(xs) / len(xs) if xs else float("nan")


def summary(suite: Suite, scores: Scores, ensemble: Scores) -> dict[str, Any]:
    """Primary score per task, its mean, normalized per task and the normalized mean."""
    p = primary(suite, scores)
    n = normalized(suite, scores, ensemble)
    return {"primary": p, "mean": mean(p), "normalized": n, "normalized_mean": mean(n)}


# ----------------------------------------------------------------------------- reference rows


def reference_rows(suite: Suite, *, progress: bool = True, refresh: bool = False
                   ) -> dict[str, Scores]:
    """``base``, ``expert:<task>`` (each expert on every task) and ``ensemble``, cached.

    The cache key covers the experts' fingerprints and the evaluation settings, so rebuilding
    an expert recomputes the rows.
    """
    suite.require_built()
    path = suite.root / "reference.json"
    key = fingerprint(suite.eval_fingerprint())
    cached = None if refresh else load_json(path, key)
    if cached is not None:
        return cached
    rows: dict[str, Scores] = {}
    rows["base"] = suite.evaluate(lambda _t: suite.base_dir, progress=progress)
    for e in suite.tasks:
        d = suite.expert_dir(e)
        rows[f"expert:{e}"] = suite.evaluate(lambda _t, _d=d: _d, progress=progress)
    rows["ensemble"] = {t: rows[f"expert:{t}"][t] for t in suite.tasks}
    save_json(path, key, rows)
    return rows


def fmt(suite: Suite, metric: str, value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    m = suite.metric(metric)
    return format(value * m.scale, m.fmt)


def markdown_table(header: list[str], rows: list[list[str]], align_first_left: bool = True
                   ) -> str:
    """A GitHub markdown table, first column left-aligned and the rest right-aligned."""
    sep = [":--" if (i == 0 and align_first_left) else "--:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def text_table(header: list[str], rows: list[list[str]]) -> str:
    """A plain aligned table for the terminal."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    out = []
    for i, r in enumerate([header] + rows):
        cells = [str(c).ljust(w) if j == 0 else str(c).rjust(w)
                 for j, (c, w) in enumerate(zip(r, widths, strict=True))]
        out.append("  ".join(cells))
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def cross_task_table(suite: Suite, refs: dict[str, Scores], markdown: bool = True) -> str:
    """Each expert (rows) on every task (columns): the diagonal shows specialization."""
    header = ["expert \\ task"] + list(suite.tasks) + ["mean"]
    rows = []
    for name in ["base"] + [f"expert:{t}" for t in suite.tasks] + ["ensemble"]:
        p = primary(suite, refs[name])
        rows.append([name.removeprefix("expert:")]
                    + [fmt(suite, suite.primary, p[t]) for t in suite.tasks]
                    + [fmt(suite, suite.primary, mean(p))])
    return markdown_table(header, rows) if markdown else text_table(header, rows)


def comparison_rows(suite: Suite, rows: list[Row], ensemble: Scores) -> tuple[list[str],
                                                                             list[list[str]]]:
    """Header and cells: tasks, mean, normalized mean, stored parameters, build time."""
    extra = [(t, m) for t, m in suite.extra_columns if t in suite.tasks]
    header = (["model"] + list(suite.tasks) + [f"{t} {m.replace('_', ' ')}" for t, m in extra]
              + ["mean", "normalized", "params vs ensemble", "build s"])
    cells = []
    for r in rows:
        if not r.scores:
            cells.append([r.name] + ["–"] * (len(suite.tasks) + len(extra) + 4))
            continue
        s = summary(suite, r.scores, ensemble)
        cells.append(
            [r.name]
            + [fmt(suite, suite.primary, s["primary"].get(t)) for t in suite.tasks]
            + [fmt(suite, m, r.scores.get(t, {}).get(m)) for t, m in extra]
            + [fmt(suite, suite.primary, s["mean"]),
               "–" if not math.isfinite(s["normalized_mean"]) else f"{s['normalized_mean']:.1f}",
               "–" if r.params_ratio is None else f"{r.params_ratio:.2f}",
               "–" if r.build_seconds is None else f"{r.build_seconds:.1f}"])
    return header, cells


def result_json(suite: Suite, target: str, scores: Scores, refs: dict[str, Scores]
                ) -> dict[str, Any]:
    """What ``polymerge eval --json`` writes."""
    s = summary(suite, scores, refs["ensemble"])
    return {"suite": suite.name, "scale": suite.scale, "target": target,
            "primary_metric": suite.primary, "scores": scores, **s,
            "reference": {k: {"scores": v, **summary(suite, v, refs["ensemble"])}
                          for k, v in refs.items()}}


def write_json(path: Path, value: Any) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value, indent=2, default=float))
    except OSError as exc:
        raise PolymergeError(f"cannot write {path} ({exc.strerror or exc})") from None
