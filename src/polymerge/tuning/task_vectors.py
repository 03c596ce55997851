"""Task vectors held in memory for training, read through the engine's one per-tensor loop.

A *node* is an expert of one level of the merge tree: a weighted sum of original experts' task
vectors, ``tau_node = sum_i c_i(layer) * (theta_i - theta_base)``. At the first level every node
is one original expert with weight 1; a hierarchical merge's later levels are groups merged
below. Loading a level streams the original experts tensor by tensor (``engine.stream``) and
keeps only each node's task vector, so what stays resident is one task vector per node of the
group being trained, never the N experts.

Task vectors are held in float32 (the engine's compute dtype) whatever the input dtype, and
only for tensors where they are not exactly zero (a LoRA expert's untouched weights, buffers).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from polymerge.engine import stream
from polymerge.errors import RecipeError
from polymerge.methods.schema import Schema
from polymerge.plan import MergePlan, TensorJob, build_plan
from polymerge.recipe import ModelEntry, Recipe
from polymerge.tuning.coefficients import layer_of
from polymerge.tuning.params import PARAMS, Granularity

Weights = dict[str, float] | None
"""layer -> weight of one original expert inside a node; None means 1 everywhere."""


@dataclass(frozen=True)
class Node:
    """An expert of one merge level: original experts with per-layer weights."""

    name: str
    tasks: tuple[str, ...]
    parts: dict[str, Weights]

    def weight(self, original: str, layer: str) -> float:
        w = self.parts[original]
        return 1.0 if w is None else w.get(layer, 0.0)


def leaf(name: str) -> Node:
    """An original expert as a node of the first level."""
    return Node(name, (name,), {name: None})


@dataclass
class TaskVectors:
    """Per node, its non-zero task-vector tensors (float32), in plan order."""

    nodes: list[Node]
    names: list[str] = field(default_factory=list)
    """Tensors where at least one node's task vector is non-zero."""
    taus: list[dict[str, torch.Tensor]] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for taus in self.taus for t in taus.values())

    def present(self, layers: Sequence[str], granularity: Granularity) -> torch.Tensor:
        """``[nodes, layers]``: True where the node has a non-zero task vector in the layer."""
        index = {layer: j for j, layer in enumerate(layers)}
        mask = torch.zeros((len(self.nodes), len(layers)), dtype=torch.bool)
        for i, taus in enumerate(self.taus):
            for name in taus:
                mask[i, index[layer_of(name, granularity)]] = True
        return mask


def plan_for(recipe: Recipe, originals: Sequence[str], *, out_dir: Path | None = None,
             allow_pickle: bool = False, dtype: str | None = None) -> MergePlan:
    """A validated plan over the base and the named experts of the recipe."""
    by_name = {e.display_name: e for e in recipe.experts()}
    entries = [by_name[n].model_copy(update={"name": n}) for n in originals]
    return plan_over(recipe, entries, out_dir=out_dir, allow_pickle=allow_pickle, dtype=dtype)


def plan_over(recipe: Recipe, entries: Sequence[ModelEntry], *, base: str | None = None,
              out_dir: Path | None = None, allow_pickle: bool = False,
              dtype: str | None = None) -> MergePlan:
    """A validated plan over ``entries`` (experts, or group results of a hierarchical merge)
    and ``base`` (the recipe's base by default), reusing the static planner.

    The planner checks paths, architectures, tensor sets, shapes and dtypes, and the recipe's
    parameters against the learned method's schema.
    """
    update: dict[str, Any] = {"models": list(entries)}
    if base is not None:
        update["base_model"] = base
    return build_plan(recipe.model_copy(update=update), out_dir=out_dir,
                      allow_pickle=allow_pickle, dtype=dtype,
                      schema=Schema(name=recipe.merge_method, params=PARAMS))


NodeDelta = Callable[[TensorJob, torch.Tensor, list[torch.Tensor]], list[torch.Tensor | None]]


def node_deltas(plan: MergePlan, nodes: Sequence[Node], granularity: Granularity) -> NodeDelta:
    """Per tensor, each node's task vector from the plan's inputs (None where exactly zero)."""
    column = {name: k for k, name in enumerate(plan.input_names)}
    for node in nodes:
        for original in node.parts:
            if original not in column:
                raise RecipeError(f"internal: expert {original!r} is not in the plan")

    def deltas(job: TensorJob, base: torch.Tensor, inputs: list[torch.Tensor]
               ) -> list[torch.Tensor | None]:
        layer = layer_of(job.name, granularity)
        out: list[torch.Tensor | None] = []
        for node in nodes:
            acc: torch.Tensor | None = None
            for original in node.parts:
                w = node.weight(original, layer)
                if w == 0.0:
                    continue
                d = inputs[column[original]] - base
                acc = d.mul_(w) if acc is None else acc.add_(d, alpha=w)
            out.append(acc if acc is not None and bool(acc.any()) else None)
        return out

    return deltas


def load_task_vectors(plan: MergePlan, nodes: Sequence[Node], granularity: Granularity, *,
                      device: str = "cpu", progress: bool = False) -> TaskVectors:
    """Stream the plan once and keep each node's non-zero task-vector tensors."""
    tv = TaskVectors(list(nodes), [], [{} for _ in nodes])
    deltas = node_deltas(plan, nodes, granularity)

    def compute(job: TensorJob, base: torch.Tensor | None, inputs: list[torch.Tensor],
                generator: torch.Generator) -> list[torch.Tensor | None]:
        assert base is not None
        return deltas(job, base, inputs)

    def consume(job: TensorJob, result: Any) -> None:
        if not job.merge:
            return
        kept = False
        for taus, tau in zip(tv.taus, result, strict=True):
            if tau is not None:
                taus[job.name] = tau.contiguous()
                kept = True
        if kept:
            tv.names.append(job.name)

    stream(plan, compute, consume, device=device, progress=progress,
           desc="reading task vectors")
    return tv
