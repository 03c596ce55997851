"""The ``merged`` store: one merged body shared by every expert, plus each expert's task head.

Experts that are task classes (``...ForSequenceClassification`` with 2, 5 and 3 labels) cannot
become one checkpoint: their heads differ. So when the plan finds heads, the registry writes a
static or learned merge through this store (:func:`polymerge.registry.output_method`, a lookup
by name): the body is merged by the recipe's method and stored once, as ``merged`` pieces that
every expert shares, and each expert keeps its own head. A runtime serves it by switching (the
body never changes; the routed expert's head answers) and ``polymerge export --expert NAME``
writes an ordinary ``...ForSequenceClassification`` checkpoint of the merged body with that
expert's head.

Static methods stream through the store's build loop like any store (one merge per tensor);
any other method (a learned merge) first writes its checkpoint into a scratch folder inside the
output, which is then stored as the body (its ``coefficients.json`` and heatmap are kept).

As a recipe of its own: ``merge_method: merged`` with ``method: ties`` (any static method) and
that method's parameters.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import torch

from polymerge.engine import write_tensors
from polymerge.errors import RecipeError
from polymerge.io.checkpoint import open_checkpoint
from polymerge.methods.schema import MergeMethod, Param, Schema
from polymerge.plan import MergePlan, TensorJob, check_free_disk
from polymerge.recipe import Recipe
from polymerge.registry import (
    HEADS_METHOD,
    Method,
    RunOptions,
    TensorMethod,
    get,
    get_tensor_method,
    register,
    write_plan_extras,
)
from polymerge.stores.build import StoreMethod, store_manifest
from polymerge.stores.manifest import (
    PIECES_DIR,
    TensorEntry,
    check_expert_name,
    head_entries,
    merged_entry,
    piece_name,
    shared_entry,
    write_manifest,
)
from polymerge.stores.store import Store

DEFAULT_METHOD = "task_arithmetic"
KEPT_FILES = ("coefficients.json", "coefficients.png")
"""Files of a learned merge's output that the store keeps beside its pieces."""


def body_method(recipe: Recipe) -> MergeMethod:
    """The static method a ``merged`` recipe names under ``method``."""
    name = recipe.parameters.get("method", DEFAULT_METHOD)
    if not isinstance(name, str):
        raise RecipeError("merged: method must be one static method's name")
    if name == HEADS_METHOD:
        raise RecipeError("merged: method must be a static method, not 'merged'")
    return get_tensor_method(name)


def merged_params(recipe: Recipe) -> tuple[Param, ...]:
    return (Param("method", str, default=DEFAULT_METHOD,
                  help="static method merging the body (its parameters apply too)"),
            *body_method(recipe).params)


class MergedBuilder:
    """Per body tensor: the static method's merge, stored once."""

    def __init__(self, plan: MergePlan, method: MergeMethod) -> None:
        self.method = method
        self.names = {p.name for p in method.params}

    def entry(self, job: TensorJob) -> TensorEntry:
        return merged_entry(job)

    def compute(self, job: TensorJob, base: torch.Tensor | None, inputs: list[torch.Tensor],
                generator: torch.Generator) -> dict[str, torch.Tensor]:
        params = {k: v for k, v in job.params.items() if k in self.names}
        return {piece_name(job.name, "merged"):
                self.method.fn(base, inputs, generator=generator, **params)}

    def finalize(self) -> dict[str, Any]:
        return {"method": self.method.name, "kind": "tensor"}


class MergedStore(Store):
    """A loaded ``merged`` store: the same body for every expert (lookups only copy it)."""

    method = HEADS_METHOD
    serving = "switch"

    def describe_extra(self) -> str:
        s = self.summary
        return (f"body: one {s.get('method', '?')} merge ({s.get('kind', 'tensor')}), shared by "
                "every expert; each expert answers with its own head")


class MergedStoreMethod(StoreMethod):
    """The ``merged`` store method; :meth:`wrapping` makes any method write through it."""

    def wrapping(self, inner: Method) -> Method:
        """``inner``'s output as a ``merged`` store (what the registry runs when the experts
        have task heads)."""
        return _Wrapped(self, inner)

    def write(self, plan: MergePlan, folder: Path, options: RunOptions) -> None:
        inner = get(plan.schema.name) if plan.schema.name != self.name else None
        if inner is None or not isinstance(inner, TensorMethod):
            inner = get(body_method(plan.recipe).name)
        self.write_with(plan, folder, options, inner)

    def write_with(self, plan: MergePlan, folder: Path, options: RunOptions,
                   inner: Method) -> None:
        for name in plan.input_names:
            check_expert_name(name, "the experts have task heads, so the output is a store")
        if isinstance(inner, TensorMethod):
            self.build(plan, folder, options, MergedBuilder(plan, inner.method))
            return
        self._write_from_checkpoint(plan, folder, options, inner)

    def _write_from_checkpoint(self, plan: MergePlan, folder: Path, options: RunOptions,
                               inner: Method) -> None:
        """Run ``inner`` into a scratch folder, then store its checkpoint as the body."""
        start = time.perf_counter()
        scratch = folder / ".body"
        scratch.mkdir()
        inner.write(plan, scratch, options)
        entries = [merged_entry(job) if job.merge else shared_entry(job) for job in plan.jobs]
        heads = head_entries(plan.heads, plan.out_dtype)
        pieces = [p for e in entries for p in e.pieces] + \
            [p for h in heads for p in h.tensors.values()]
        check_free_disk(folder, sum(p.nbytes for p in pieces))
        body = open_checkpoint(scratch, label=f"{inner.name} output")
        read: dict[str, Any] = {}
        for entry in entries:
            read[entry.pieces[0].name] = lambda _n=entry.name: body.read(_n)
        for spec, head in zip(plan.heads, heads, strict=True):
            for name, piece in head.tensors.items():
                read[piece.name] = lambda _s=spec, _n=name: _s.read(_n)
        (folder / PIECES_DIR).mkdir()
        try:
            files = write_tensors(folder / PIECES_DIR, pieces, lambda n: read[n](),
                                  max_shard_bytes=options.shard_size,
                                  metadata={"polymerge_store": self.name})
        finally:
            body.close()
        for kept in KEPT_FILES:
            if (scratch / kept).is_file():
                shutil.move(str(scratch / kept), str(folder / kept))
        shutil.rmtree(scratch)
        manifest = store_manifest(
            plan, self.name, entries, {"method": inner.name, "kind": inner.kind},
            engine={"tensors": len(entries)}, build_seconds=time.perf_counter() - start,
            files=files, heads=heads)
        write_plan_extras(plan, folder, description=f"{inner.description} (body of a "
                          f"{self.name} store with each expert's head)")
        write_manifest(folder, manifest)


class _Wrapped(Method):
    """A method whose output goes through the ``merged`` store."""

    kind = "store"

    def __init__(self, store: MergedStoreMethod, inner: Method) -> None:
        self.store = store
        self.inner = inner
        self.name = inner.name
        self.description = inner.description

    def schema(self, recipe: Recipe) -> Schema:
        return self.inner.schema(recipe)

    def write(self, plan: MergePlan, folder: Path, options: RunOptions) -> None:
        self.store.write_with(plan, folder, options, self.inner)


def _validate(recipe: Recipe, n_experts: int) -> None:
    body_method(recipe)


MERGED = register(MergedStoreMethod(
    name=HEADS_METHOD,
    description="One static merge of the experts' bodies, stored once and shared by every "
                "expert, plus each expert's own task head; what a static or learned merge of "
                "experts with task heads writes.",
    params=merged_params,
    make_builder=lambda plan: MergedBuilder(plan, body_method(plan.recipe)),
    store_cls=MergedStore,
    validate=_validate,
))
