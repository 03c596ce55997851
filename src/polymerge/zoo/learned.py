"""What ``polymerge report`` needs to include the learned merges: recipes and their costs.

The zoo's report runs recipes and scores the outputs with the suite's own evaluation; this
module only says which learned-merge recipes to run on a suite and reads back, from an output
folder's ``coefficients.json``, the columns that only learned merges have (trainable
coefficients, tuning time, memory).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from polymerge.tuning.output import COEFFICIENTS_JSON

# label -> (method, parameters); data is the suite itself (its validation split)
CLS_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "supermerge": ("supermerge", {"granularity": "tensor"}),
    "supermerge hierarchical (m=2)": ("supermerge", {"granularity": "tensor", "group_size": 2}),
    "adamerging task-wise": ("adamerging", {"granularity": "expert"}),
    "adamerging layer-wise": ("adamerging", {"granularity": "tensor"}),
}
GEN_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "supermerge": ("supermerge", {"granularity": "tensor", "steps": 40, "batch_size": 2,
                                  "eval_every": 10, "patience": 3}),
}
VARIANTS = {"cls": CLS_VARIANTS, "gen": GEN_VARIANTS}


def learned_recipes(suite: Any, **overrides: Any) -> dict[str, dict[str, Any]]:
    """label -> recipe (a dict for ``polymerge.merge``) for each learned variant of a suite.

    ``overrides`` change the parameters of every variant (e.g. ``steps=20`` for a smoke run).
    """
    variants = VARIANTS.get(suite.name, {})
    recipes = {}
    max_len = getattr(getattr(suite, "config", None), "max_len", None)
    if isinstance(max_len, int) and suite.name == "cls":
        overrides = {"max_length": max_len, **overrides}  # the length the experts trained at
    for label, (method, params) in variants.items():
        recipes[label] = {
            "merge_method": method,
            "base_model": str(suite.base_dir),
            "models": [{"model": str(suite.expert_dir(t)), "name": t} for t in suite.tasks],
            "parameters": {"data": suite.name, **params, **overrides},
            "dtype": "float32",
            "seed": 0,
        }
    return recipes


def learned_summary(folder: str | Path) -> dict[str, Any] | None:
    """Trainable coefficients, tuning seconds and memory of a learned merge's output, or None
    when ``folder`` is not one."""
    path = Path(folder) / COEFFICIENTS_JSON
    if not path.is_file():
        return None
    info = json.loads(path.read_text())
    return {"method": info["method"], "hierarchical": info["hierarchical"],
            "granularity": info["parameters"]["granularity"],
            "trainable_coefficients": info["trainable_coefficients"],
            "tuning_seconds": info["tuning_seconds"], "total_seconds": info["total_seconds"],
            "peak_task_vector_bytes": info["memory"]["peak_task_vector_bytes"],
            "peak_rss_bytes": info["memory"]["peak_rss_bytes"]}


def learned_note(folder: str | Path) -> str:
    """One line for a report row: ``1,234 coefficients, 95 s tuning, peak RSS 1.2 GB``."""
    s = learned_summary(folder)
    if s is None:
        return ""
    return (f"{s['trainable_coefficients']:,} learned coefficients "
            f"({s['granularity']}-wise{', hierarchical' if s['hierarchical'] else ''}), "
            f"{s['tuning_seconds']:.0f} s tuning, peak RSS {s['peak_rss_bytes'] / 1e9:.2f} GB, "
            f"task vectors resident {s['peak_task_vector_bytes'] / 1e9:.2f} GB")
