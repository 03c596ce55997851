"""The learned merge's output folder: the merged checkpoint, its coefficients and a heatmap.

The checkpoint is written like a static merge's (through the engine's one output path, with
the side files of :func:`polymerge.registry.write_plan_extras`); ``coefficients.json``
holds the learned weights per expert and layer with how they were trained, and
``coefficients.png`` shows them as an experts x layers heatmap.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from polymerge.engine import EngineStats, write_folder
from polymerge.plan import MergePlan, TensorJob
from polymerge.tuning.params import Granularity
from polymerge.tuning.task_vectors import Node, node_deltas

COEFFICIENTS_JSON = "coefficients.json"
COEFFICIENTS_PNG = "coefficients.png"


def write_checkpoint(plan: MergePlan, node: Node, granularity: Granularity, folder: Path, *,
                     method: str, max_shard_bytes: int, device: str, progress: bool
                     ) -> EngineStats:
    """Stream ``base + tau_node`` for every tensor into sharded safetensors in ``folder``."""
    deltas = node_deltas(plan, [node], granularity)

    def compute(job: TensorJob, base: torch.Tensor | None, inputs: list[torch.Tensor],
                generator: torch.Generator) -> torch.Tensor:
        assert base is not None
        (delta,) = deltas(job, base, inputs)
        return base if delta is None else base + delta

    stats, _ = write_folder(plan, folder, compute, [job.out for job in plan.jobs],
                            max_shard_bytes=max_shard_bytes,
                            metadata={"polymerge_method": method}, device=device,
                            progress=progress, desc="writing merged model")
    return stats


def effective_table(node: Node, experts: list[str], layers: list[str]
                    ) -> dict[str, dict[str, float | None]]:
    """expert -> layer -> the weight its task vector has in the output (None: no vector)."""
    table: dict[str, dict[str, float | None]] = {}
    for e in experts:
        weights = node.parts.get(e)
        table[e] = {layer: (1.0 if weights is None else weights.get(layer)) for layer in layers}
    return table


def write_coefficients_json(folder: Path, info: dict[str, Any]) -> Path:
    path = folder / COEFFICIENTS_JSON
    path.write_text(json.dumps(info, indent=2, default=_json_default) + "\n")
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def write_heatmap(path: Path, table: dict[str, dict[str, float | None]], layers: list[str], *,
                  title: str, value_range: tuple[float, float]) -> Path:
    """An experts x layers heatmap (grey where an expert has no task vector)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    experts = list(table)
    grid = torch.full((len(experts), len(layers)), float("nan"))
    for i, e in enumerate(experts):
        for j, layer in enumerate(layers):
            v = table[e].get(layer)
            if v is not None:
                grid[i, j] = v
    width = min(16.0, max(6.0, 0.12 * len(layers) + 3.0))
    height = max(3.2, 0.4 * len(experts) + 2.2)
    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    lo, hi = value_range
    from matplotlib import colormaps

    # grey: the expert has no task vector there
    cmap = colormaps["RdBu_r" if lo < 0 else "viridis"].with_extremes(bad="#d9d9d9")
    image = ax.imshow(grid.numpy(), aspect="auto", cmap=cmap, vmin=lo, vmax=hi,
                      interpolation="nearest")
    ax.set_yticks(range(len(experts)), experts)
    step = max(1, len(layers) // 40)
    ticks = list(range(0, len(layers), step))
    ax.set_xticks(ticks, [_short(layers[j]) for j in ticks], rotation=90, fontsize=6)
    ax.set_xlabel("layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.03, pad=0.01)
    fig.tight_layout()
    fig.savefig(path)
    return path


def _short(layer: str) -> str:
    return layer.removesuffix(".weight").replace("encoder.layer.", "L").replace(
        "model.layers.", "L")
