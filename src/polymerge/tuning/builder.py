"""The learned merges (``supermerge``, ``adamerging``) as registry entries: plan, learn, write.

1. validate the recipe's parameters and every input (the static planner's checks);
2. load the model once from the base, and the training data (a JSONL file or a zoo suite's
   validation split), with a seeded held-out part per task for early stopping;
3. walk the merge tree (one group when flat): per group read its members' task vectors
   through the engine, learn the group's coefficients, and (below the root) write the group's
   result as a temporary float32 checkpoint that the next level reads as one expert;
4. stream the root group's result into the output folder (the registry's atomic one), with
   ``coefficients.json`` (per-level and effective coefficients, ``c_eff(i, layer)``: the
   product along expert i's path) and ``coefficients.png``.
"""

from __future__ import annotations

import resource
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from polymerge.engine import resolve_device
from polymerge.errors import RecipeError
from polymerge.io.dtypes import dtype_name
from polymerge.io.hf_files import tokenizer_source_dir
from polymerge.methods.schema import Schema
from polymerge.plan import MergePlan
from polymerge.recipe import Recipe
from polymerge.registry import Method, RunOptions, write_plan_extras
from polymerge.tuning.coefficients import layer_order
from polymerge.tuning.data import load_examples, split_heldout
from polymerge.tuning.hierarchical import TreeRun
from polymerge.tuning.objectives import make_objective
from polymerge.tuning.output import (
    COEFFICIENTS_PNG,
    effective_table,
    write_checkpoint,
    write_coefficients_json,
    write_heatmap,
)
from polymerge.tuning.params import PARAMS, LearnedMethod, TuningConfig, parse_config
from polymerge.tuning.task_vectors import Node, plan_for


def peak_rss_bytes() -> int:
    """This process's peak resident set so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class LearnedMerge(Method):
    """A learned merge (kind ``learned``): its schema, validation and training run."""

    kind = "learned"

    def __init__(self, method: LearnedMethod) -> None:
        self.method = method
        self.name = method.name
        self.description = method.description
        self.reference = method.reference

    def schema(self, recipe: Recipe) -> Schema:
        return Schema(name=self.name, params=PARAMS, description=self.description,
                      base_policy="required", min_experts=1, reference=self.reference)

    def validate(self, recipe: Recipe) -> None:
        _config(self.method, recipe)

    def plan(self, recipe: Recipe, *, out_dir: Path | None = None, allow_pickle: bool = False,
             dtype: str | None = None) -> MergePlan:
        self.validate(recipe)
        return plan_for(recipe, [e.display_name for e in recipe.experts()], out_dir=out_dir,
                        allow_pickle=allow_pickle, dtype=dtype)

    def write(self, plan: MergePlan, folder: Path, options: RunOptions) -> None:
        learn_and_write(plan, folder, self.method, options)


def _config(method: LearnedMethod, recipe: Recipe) -> TuningConfig:
    cfg = parse_config(method, dict(recipe.parameters), recipe.seed,
                       {e.display_name: dict(e.parameters) for e in recipe.models})
    if recipe.base_model is None:
        raise RecipeError(f"merge_method {method.name} needs a base_model")
    return cfg


def learn_and_write(full_plan: MergePlan, folder: Path, method: LearnedMethod,
                    options: RunOptions) -> None:
    """Learn the coefficients of the planned experts and write the merged model to
    ``folder``."""
    start = time.perf_counter()
    recipe = full_plan.recipe
    cfg = _config(method, recipe)
    experts = recipe.experts()
    device = options.device
    dev = resolve_device(device)
    names = [e.display_name for e in experts]
    base = Path(str(recipe.base_model))
    objective = make_objective(
        base, [(e.display_name, Path(e.model)) for e in experts],
        tokenizer_source_dir(recipe.tokenizer_source, full_plan.reference.path),
        cfg.max_length, full_plan.heads, allow_pickle=options.allow_pickle).to(dev)
    examples = load_examples(cfg.data, objective.specs, base, needs_labels=method.needs_labels,
                             sources=options.data_sources)
    train_ex, held_ex = split_heldout(examples, cfg.holdout, cfg.seed)
    scratch = Path(tempfile.mkdtemp(prefix=".levels-", dir=folder))
    try:
        dtype = options.dtype or dtype_name(full_plan.out_dtype)
        run = TreeRun(recipe, cfg, objective, objective.prepare(train_ex),
                      objective.prepare(held_ex), scratch, device=device, dtype=dtype,
                      allow_pickle=options.allow_pickle, progress=options.progress)
        top_plan, local, final = run.walk(full_plan.reference)
        try:
            _write_output(folder, full_plan, top_plan, local, final, cfg, run, names,
                          len(train_ex), len(held_ex), start, options)
        finally:
            top_plan.close()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _write_output(tmp: Path, full_plan: MergePlan, top_plan: MergePlan, local: Node,
                  final: Node, cfg: TuningConfig, run: TreeRun, names: list[str],
                  n_train: int, n_held: int, start: float, options: RunOptions) -> None:
    """The merged checkpoint (from the last group's inputs), extras, coefficients, heatmap."""
    method = cfg.method
    layers = [layer for layer in layer_order((j.name for j in full_plan.jobs if j.merge),
                                             cfg.granularity)
              if any((final.parts[e] or {}).get(layer) is not None for e in names)]
    table = effective_table(final, names, layers)
    write_checkpoint(top_plan, local, cfg.granularity, tmp, method=method.name,
                     max_shard_bytes=options.shard_size, device=options.device,
                     progress=options.progress)
    info = _info(cfg, run, names, layers, table, n_train, n_held, time.perf_counter() - start)
    write_plan_extras(full_plan, tmp, description=method.description,
                      card_extra=f"\n## Learned coefficients\n\n{_card(info)}\n")
    write_coefficients_json(tmp, info)
    hierarchy = "hierarchical" if len(run.levels) > 1 else "flat"
    write_heatmap(tmp / COEFFICIENTS_PNG, table, layers,
                  title=f"{method.name} ({hierarchy}, {cfg.granularity}-wise): "
                        "weight of each expert's task vector",
                  value_range=(-1.0, 1.0) if method.activation == "tanh" else (0.0, 1.0))


def _info(cfg: TuningConfig, run: TreeRun, names: list[str], layers: list[str],
          table: dict[str, dict[str, float | None]], n_train: int, n_held: int,
          total_seconds: float) -> dict[str, Any]:
    params = {k: v for k, v in asdict(cfg).items() if k != "method"}
    return {
        "method": cfg.method.name,
        "activation": cfg.method.activation,
        "criterion": cfg.method.criterion,
        "parameters": params,
        "hierarchical": len(run.levels) > 1,
        "experts": names,
        "layers": layers,
        "coefficients": table,
        "trainable_coefficients": run.trainable,
        "tuning_seconds": round(run.tuning_seconds, 3),
        "total_seconds": round(total_seconds, 3),
        "examples": {"train": n_train, "heldout": n_held},
        "memory": {"task_vector_dtype": "float32",
                   "peak_task_vector_bytes": run.peak_task_vector_bytes,
                   "peak_rss_bytes": peak_rss_bytes()},
        "levels": run.levels,
    }


def _card(info: dict[str, Any]) -> str:
    groups = [g for level in info["levels"] for g in level["groups"]]
    lines = [f"- {info['trainable_coefficients']} trainable coefficients "
             f"({info['parameters']['granularity']}-wise, "
             f"{'hierarchical' if info['hierarchical'] else 'flat'}), "
             f"{info['tuning_seconds']:.1f} s of tuning",
             *(f"- {g['name']}: held-out loss {g['initial_heldout_loss']:.4f} -> "
               f"{g['best_heldout_loss']:.4f} (best at step {g['best_step']} of "
               f"{g['steps_run']})" for g in groups),
             "- per-layer weights: `coefficients.json`, heatmap: `coefficients.png`"]
    return "\n".join(lines)
