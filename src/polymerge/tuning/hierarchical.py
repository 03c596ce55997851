"""Hierarchical merging (SuperMerge): a tree of small groups bounds what is resident.

With group size m, the N experts are cut into consecutive groups of m; each group's learned
merge becomes one expert of the next level, and so on until one model remains. A group's result
is written to a temporary float32 checkpoint, so every level reads, holds and trains on only the
m task vectors of the group at hand (and the engine's per-tensor reads are m wide, not N). A
group of one (a leftover) moves up unchanged. Without a group size, or with m >= N, the tree is
a single group: the flat merge, through exactly the same code.

Because every level is linear in the task vectors, the final model is ``base + sum_i
c_eff(i, layer) * tau_i`` with ``c_eff`` the product of the coefficients along expert i's path
to the root (up to float32 rounding of the group results); that is what ``coefficients.json``
reports and the heatmap shows. When the base is not float32, levels above the first read a
float32 copy of it, so that rounding never eats a task vector.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from polymerge.engine import write_tensors
from polymerge.errors import PolymergeError
from polymerge.io.checkpoint import Checkpoint, TensorInfo
from polymerge.io.hf_files import write_config
from polymerge.plan import MergePlan
from polymerge.recipe import ModelEntry, Recipe
from polymerge.tuning.coefficients import Coefficients, layer_order
from polymerge.tuning.objectives import Item, Objective
from polymerge.tuning.output import write_checkpoint
from polymerge.tuning.params import TuningConfig
from polymerge.tuning.task_vectors import Node, leaf, load_task_vectors, plan_over
from polymerge.tuning.trainer import train_coefficients

SHARD_BYTES = 2 * 10**9


@dataclass(frozen=True)
class Member:
    """An expert of one level: what it is made of (for the report) and where to read it."""

    node: Node
    entry: ModelEntry
    """An original expert of the recipe, or a group result written by a lower level."""


def merge_tree(n: int, group_size: int | None) -> list[list[list[int]]]:
    """Levels of groups; each group lists node indices of the level below (leaves first)."""
    if n < 1:
        raise ValueError("no experts to merge")
    m = n if group_size is None or group_size >= n else group_size
    if m < 2 and n > 1:
        raise ValueError("group size must be at least 2")
    levels: list[list[list[int]]] = []
    width = n
    while True:
        groups = [list(range(s, min(s + m, width))) for s in range(0, width, m)]
        levels.append(groups)
        if len(groups) == 1:
            return levels
        width = len(groups)


def compose(members: Sequence[Node], coefs: Coefficients, name: str) -> Node:
    """The node a trained group becomes: member weights times the group's coefficients."""
    table = coefs.as_table()
    parts: dict[str, dict[str, float] | None] = {}
    for member in members:
        row = table[member.name]
        for original, weights in member.parts.items():
            combined: dict[str, float] = {}
            for layer, c in row.items():
                if c is None:
                    continue  # the member has no task vector in this layer
                inner = 1.0 if weights is None else weights.get(layer)
                if inner is not None:
                    combined[layer] = c * inner
            parts[original] = combined
    tasks = tuple(t for m in members for t in m.tasks)
    return Node(name, tasks, parts)


def group_name(level: int, index: int) -> str:
    return f"level{level}.group{index}"


def local_node(members: Sequence[Member], coefs: Coefficients, name: str) -> Node:
    """The group's result in terms of its members (the plan's inputs): weights = coefficients."""
    table = coefs.as_table()
    parts: dict[str, dict[str, float] | None] = {
        m.node.name: {layer: c for layer, c in table[m.node.name].items() if c is not None}
        for m in members}
    return Node(name, tuple(t for m in members for t in m.node.tasks), parts)


def is_float32(ckpt: Checkpoint) -> bool:
    return all(i.dtype == torch.float32 for i in ckpt.tensors().values()
               if i.dtype.is_floating_point)


def write_float32_copy(ckpt: Checkpoint, folder: Path) -> Path:
    """The base in float32, one tensor at a time, for levels that read float32 group results
    (a bf16 group result would round away most of a task vector)."""
    folder.mkdir(parents=True, exist_ok=True)
    infos = [TensorInfo(n, i.shape, torch.float32 if i.dtype.is_floating_point else i.dtype)
             for n, i in ckpt.tensors().items()]
    write_tensors(folder, infos, ckpt.read, max_shard_bytes=SHARD_BYTES)
    write_config(folder, ckpt.config, torch.float32)
    return folder


def group_seed(seed: int, level: int, index: int) -> int:
    """Each group's own seed; the flat merge (level 0, group 0) uses the recipe seed itself."""
    return seed + 1009 * level + index


class TreeRun:
    """One learned merge's tree, walked group by group: train, fold, write, go up."""

    def __init__(self, recipe: Recipe, cfg: TuningConfig, objective: Objective,
                 train_items: list[Item], held_items: list[Item], scratch: Path, *,
                 device: str, dtype: str, allow_pickle: bool, progress: bool) -> None:
        self.recipe = recipe
        self.cfg = cfg
        self.objective = objective
        self.train_items = train_items
        self.held_items = held_items
        self.scratch = scratch
        self.device = device
        self.dtype = dtype
        self.allow_pickle = allow_pickle
        self.progress = progress
        self.levels: list[dict[str, Any]] = []
        self.trainable = 0
        self.tuning_seconds = 0.0
        self.peak_task_vector_bytes = 0
        self.upper_base: str | None = None

    def plan(self, members: list[Member], level: int, final: bool) -> MergePlan:
        """Lower levels write float32 group results; the last group writes the output."""
        base = None if level == 0 else self.upper_base
        return plan_over(self.recipe, [m.entry for m in members], base=base,
                         allow_pickle=self.allow_pickle,
                         dtype=self.dtype if final else "float32")

    def train_group(self, plan: MergePlan, members: list[Member], level: int, index: int,
                    name: str) -> Coefficients:
        cfg = self.cfg
        tv = load_task_vectors(plan, [leaf(m.node.name) for m in members], cfg.granularity,
                               device=self.device, progress=self.progress)
        if not tv.names:
            raise PolymergeError(f"{name}: {', '.join(plan.input_names)} do not differ from "
                                 "the base; there is nothing to learn")
        self.peak_task_vector_bytes = max(self.peak_task_vector_bytes, tv.nbytes)
        layers = layer_order(tv.names, cfg.granularity)
        coefs = Coefficients([m.node.name for m in members], layers, cfg.method.activation,
                             cfg.init, tv.present(layers, cfg.granularity)).to(self.device)
        tasks = {t for m in members for t in m.node.tasks}
        result = train_coefficients(
            self.objective, tv, coefs,
            [it for it in self.train_items if it.task in tasks],
            [it for it in self.held_items if it.task in tasks],
            criterion=cfg.method.criterion, granularity=cfg.granularity, steps=cfg.steps,
            lr=cfg.lr, batch_size=cfg.batch_size, eval_every=cfg.eval_every,
            patience=cfg.patience, seed=group_seed(cfg.seed, level, index),
            progress=self.progress, desc=f"{cfg.method.name} {name}")
        del tv
        self.trainable += coefs.trainable
        self.tuning_seconds += result.seconds
        self.levels[level]["groups"].append({
            "name": name, "members": [m.node.name for m in members],
            "experts": [e for m in members for e in m.node.parts],
            "trainable_coefficients": coefs.trainable, "steps_run": result.steps_run,
            "best_step": result.best_step, "stopped_early": result.stopped_early,
            "initial_heldout_loss": result.initial_heldout,
            "best_heldout_loss": result.best_heldout, "seconds": round(result.seconds, 3),
            "coefficients": coefs.as_table(), "history": result.history,
        })
        return coefs

    def write_group(self, plan: MergePlan, node: Node) -> ModelEntry:
        """A lower group's result as a float32 checkpoint the next level reads."""
        folder = self.scratch / node.name
        folder.mkdir(parents=True)
        write_checkpoint(plan, node, self.cfg.granularity, folder, method=self.cfg.method.name,
                         max_shard_bytes=SHARD_BYTES, device=self.device, progress=False)
        write_config(folder, plan.reference.config, torch.float32)
        return ModelEntry(model=str(folder), name=node.name)

    def promote(self, member: Member) -> Member:
        """A leftover moving up; rewritten in float32 when upper levels use a float32 base."""
        if self.upper_base == self.recipe.base_model or \
                Path(member.entry.model).parent == self.scratch:
            return member
        plan = self.plan([member], 0, final=False)
        try:
            entry = self.write_group(plan, Node(member.node.name, member.node.tasks,
                                                {member.node.name: None}))
        finally:
            plan.close()
        return Member(member.node, entry)

    def walk(self, reference: Checkpoint) -> tuple[MergePlan, Node, Node]:
        """Train the tree; returns the last group's open plan, its result in terms of that
        plan's inputs, and the same result in terms of the original experts."""
        members = [Member(leaf(e.display_name), e.model_copy(update={"name": e.display_name}))
                   for e in self.recipe.experts()]
        tree = merge_tree(len(members), self.cfg.group_size)
        if len(tree) > 1:
            self.upper_base = (self.recipe.base_model if is_float32(reference) else
                               str(write_float32_copy(reference, self.scratch / "base")))
        for level, groups in enumerate(tree):
            self.levels.append({"level": level, "groups": []})
            final = level == len(tree) - 1
            next_members = []
            for index, group in enumerate(groups):
                group_members = [members[i] for i in group]
                if len(group_members) == 1 and len(groups) > 1:
                    next_members.append(self.promote(group_members[0]))
                    continue
                name = group_name(level, index)
                plan = self.plan(group_members, level, final)
                try:
                    coefs = self.train_group(plan, group_members, level, index, name)
                except BaseException:
                    plan.close()
                    raise
                local = local_node(group_members, coefs, name)
                composed = compose([m.node for m in group_members], coefs, name)
                if final:
                    return plan, local, composed
                try:
                    next_members.append(Member(composed, self.write_group(plan, local)))
                finally:
                    plan.close()
            members = next_members
        raise AssertionError("the merge tree has no root")
